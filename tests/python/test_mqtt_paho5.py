"""MQTT 5.0 through the gateway with the Eclipse Paho client (`protocol=MQTTv5`), plus a raw
socket client for enhanced authentication (paho does not answer AUTH packets).

Each test asserts what a real client sees: properties, reason codes, flow control, session
and message expiry, shared subscriptions, will delay, SCRAM-SHA-256 over AUTH."""
import base64
import hashlib
import hmac
import os
import queue
import socket
import struct
import time
import uuid

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from conftest import Gateway

TIMEOUT = 20


def props(packet_type, **values):
    p = Properties(packet_type)
    for k, v in values.items():
        setattr(p, k, v)
    return p


class Paho5:
    """A connected MQTT 5.0 paho client whose received messages land in a queue."""

    def __init__(self, port, client_id=None, clean_start=True, connect_props=None, will=None,
                 manual_ack=False):
        self.client_id = client_id if client_id is not None else f"p5-{uuid.uuid4().hex[:8]}"
        self.messages = queue.Queue()
        self.connacks = queue.Queue()
        self.disconnects = queue.Queue()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=manual_ack,
        )
        self.client.on_message = lambda c, u, m: self.messages.put(m)
        self.client.on_connect = lambda c, u, flags, rc, p: self.connacks.put((flags, rc, p))
        self.client.on_disconnect = lambda c, u, flags, rc, p: self.disconnects.put(rc)
        self.client.reconnect_delay_set(60, 60)
        if will:
            self.client.will_set(**will)
        self.client.connect("127.0.0.1", port, keepalive=30, clean_start=clean_start,
                            properties=connect_props)
        self.client.loop_start()
        self.flags, self.reason, self.connack_props = self.connacks.get(timeout=TIMEOUT)
        assert not self.reason.is_failure, self.reason

    def subscribe(self, topic_filter, qos=1, sub_props=None, **options):
        acked = queue.Queue()
        self.client.on_subscribe = lambda c, u, mid, rcs, p: acked.put(rcs)
        result, _ = self.client.subscribe(
            topic_filter, options=SubscribeOptions(qos=qos, **options), properties=sub_props)
        assert result == mqtt.MQTT_ERR_SUCCESS
        return acked.get(timeout=TIMEOUT)

    def publish(self, topic, payload, qos=1, retain=False, properties=None):
        acked = queue.Queue()
        self.client.on_publish = lambda c, u, mid, rc, p: acked.put(rc)
        info = self.client.publish(topic, payload, qos, retain=retain, properties=properties)
        if qos > 0:
            return acked.get(timeout=TIMEOUT)
        info.wait_for_publish(timeout=TIMEOUT)
        return None

    def get(self, timeout=TIMEOUT):
        return self.messages.get(timeout=timeout)

    def quiet(self, seconds=0.7):
        with pytest.raises(queue.Empty):
            m = self.messages.get(timeout=seconds)
            print("unexpected", m.topic, m.payload)

    def close(self, disconnect_props=None, reasoncode=None):
        self.client.disconnect(reasoncode=reasoncode, properties=disconnect_props)
        self.client.loop_stop()

    def kill(self):
        self.client.loop_stop()
        self.client.socket().close()


def test_connack_properties_reason_codes_and_properties_round_trip(gateway):
    sub = Paho5(gateway.mqtt_port, client_id="")
    # Assigned Client Identifier for the empty one, and our limits.
    assert sub.connack_props.AssignedClientIdentifier.startswith("auto-")
    assert sub.connack_props.ReceiveMaximum == 64
    assert sub.connack_props.TopicAliasMaximum == 32
    assert sub.connack_props.MaximumPacketSize == 1024 * 1024
    pub = Paho5(gateway.mqtt_port)
    try:
        codes = sub.subscribe("rt/#", 1, sub_props=props(PacketTypes.SUBSCRIBE,
                                                         SubscriptionIdentifier=42))
        assert [c.value for c in codes] == [1]
        # paho checks wildcards itself; a shared filter without a filter part gets past it.
        codes = sub.subscribe("$share/nofilter", 0)
        assert [c.value for c in codes] == [0x8F]  # Topic Filter invalid
        p = props(PacketTypes.PUBLISH, ContentType="application/json", ResponseTopic="reply/1",
                  CorrelationData=b"\x00\x01corr", PayloadFormatIndicator=1,
                  MessageExpiryInterval=120)
        p.UserProperty = [("k", "v1"), ("k", "v2"), ("a=b", "c&d")]
        rc = pub.publish("rt/a", b'{"x":1}', 1, properties=p)
        assert rc.value == 0
        m = sub.get()
        assert (m.topic, m.payload, m.qos) == ("rt/a", b'{"x":1}', 1)
        mp = m.properties
        assert mp.ContentType == "application/json"
        assert mp.ResponseTopic == "reply/1"
        assert mp.CorrelationData == b"\x00\x01corr"
        assert mp.PayloadFormatIndicator == 1
        assert 115 <= mp.MessageExpiryInterval <= 120
        assert mp.UserProperty == [("k", "v1"), ("k", "v2"), ("a=b", "c&d")]
        assert mp.SubscriptionIdentifier == [42]
        # Payload Format Indicator 1 with bytes that are not UTF-8: PUBACK 0x99, dropped.
        bad = props(PacketTypes.PUBLISH, PayloadFormatIndicator=1)
        assert pub.publish("rt/bad", b"\xff\xfe", 1, properties=bad).value == 0x99
        sub.quiet(0.5)
        # A client may not publish to $SYS: PUBACK 0x87, and nobody gets it.
        sys_sub = Paho5(gateway.mqtt_port)
        try:
            sys_sub.subscribe("$SYS/#", 0)
            assert pub.publish("$SYS/fake", b"x", 1).value == 0x87
            sys_sub.quiet()
            # `#` does not match `$` topics; `$app/...` may be published and subscribed.
            sys_sub.subscribe("#", 0)
            sys_sub.subscribe("$app/#", 0)
            assert pub.publish("$app/x", b"dollar", 1).value == 0
            m = sys_sub.get()
            assert (m.topic, m.payload) == ("$app/x", b"dollar")
            sys_sub.quiet(0.5)  # once, through `$app/#` only
        finally:
            sys_sub.close()
        # A packet over the client's Maximum Packet Size is not sent to it.
        small = Paho5(gateway.mqtt_port,
                      connect_props=props(PacketTypes.CONNECT, MaximumPacketSize=100))
        try:
            small.subscribe("size/#", 1)
            pub.publish("size/big", b"x" * 200, 1)
            pub.publish("size/small", b"ok", 1)
            m = small.get()
            assert (m.topic, m.payload) == ("size/small", b"ok")
        finally:
            small.close()
    finally:
        sub.close()
        pub.close()


def test_topic_alias_no_local_retain_handling_and_retain_as_published(gateway):
    a = Paho5(gateway.mqtt_port)
    b = Paho5(gateway.mqtt_port, connect_props=props(PacketTypes.CONNECT, TopicAliasMaximum=5))
    try:
        # No Local: a sees b's message on the shared topic but not its own.
        a.subscribe("nl/#", 1, noLocal=True)
        b.subscribe("nl/#", 1)
        a.publish("nl/x", b"from-a", 1)
        assert b.get().payload == b"from-a"
        a.quiet(0.5)
        b.publish("nl/y", b"from-b", 1)
        assert a.get().payload == b"from-b"
        assert b.get().payload == b"from-b"
        # Inbound Topic Alias: set with the topic, then used with an empty topic.
        a.publish("nl/aliased", b"1", 1, properties=props(PacketTypes.PUBLISH, TopicAlias=3))
        a.publish("", b"2", 1, properties=props(PacketTypes.PUBLISH, TopicAlias=3))
        got = [b.get() for _ in range(2)]
        # b allows Topic Aliases, so the server sends the topic once with an alias, then the
        # alias alone (paho hands that on as is, with an empty topic). That the second message
        # reached b's `nl/#` at all shows the server resolved a's alias.
        assert [m.payload for m in got] == [b"1", b"2"]
        assert got[0].topic == "nl/aliased"
        alias = got[0].properties.TopicAlias
        assert 1 <= alias <= 5
        assert (got[1].topic, got[1].properties.TopicAlias) == ("", alias)
        # Retain Handling 0 / 1 / 2 and Retain As Published.
        a.publish("rh/t", b"kept", 1, retain=True)
        c = Paho5(gateway.mqtt_port)
        try:
            c.subscribe("rh/t", 1, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND)
            c.quiet(0.7)
            c.subscribe("rh/#", 1, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB)
            m = c.get()
            assert (m.topic, m.payload, m.retain) == ("rh/t", b"kept", True)
            c.subscribe("rh/#", 1, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB)
            c.quiet(0.7)
            c.subscribe("rap/#", 1, retainAsPublished=True)
            c.subscribe("norap/#", 1)
            a.publish("rap/x", b"r", 1, retain=True)
            a.publish("norap/x", b"n", 1, retain=True)
            got = {m.topic: m.retain for m in (c.get(), c.get())}
            assert got == {"rap/x": True, "norap/x": False}
        finally:
            c.close()
    finally:
        a.close()
        b.close()


def test_receive_maximum_limits_unacknowledged_deliveries(gateway):
    slow = Paho5(gateway.mqtt_port, manual_ack=True,
                 connect_props=props(PacketTypes.CONNECT, ReceiveMaximum=2))
    pub = Paho5(gateway.mqtt_port)
    try:
        slow.subscribe("rm/#", 1)
        for i in range(6):
            pub.publish(f"rm/{i}", str(i).encode(), 1)
        first = [slow.get(), slow.get()]
        slow.quiet(1.0)  # a third needs a PUBACK first
        for m in first:
            slow.client.ack(m.mid, m.qos)
        rest = [slow.get(), slow.get()]
        slow.quiet(1.0)
        for m in rest:
            slow.client.ack(m.mid, m.qos)
        more = [slow.get(), slow.get()]
        for m in more:
            slow.client.ack(m.mid, m.qos)
        assert sorted(m.payload for m in first + rest + more) == [str(i).encode() for i in range(6)]
    finally:
        slow.close()
        pub.close()


def test_session_expiry_and_message_expiry(gateway):
    sess = props(PacketTypes.CONNECT, SessionExpiryInterval=3)
    s = Paho5(gateway.mqtt_port, client_id="p5-sess", connect_props=sess)
    assert s.flags.session_present is False
    s.subscribe("se/#", 1)
    s.close()
    pub = Paho5(gateway.mqtt_port)
    try:
        pub.publish("se/short", b"expires", 1,
                    properties=props(PacketTypes.PUBLISH, MessageExpiryInterval=1))
        pub.publish("se/long", b"stays", 1,
                    properties=props(PacketTypes.PUBLISH, MessageExpiryInterval=100))
        time.sleep(2.2)
        # Within the Session Expiry Interval: the session and its queue are there, minus the
        # expired message; the other one's expiry counted down.
        s = Paho5(gateway.mqtt_port, client_id="p5-sess", clean_start=False, connect_props=sess)
        assert s.flags.session_present is True
        m = s.get()
        assert (m.topic, m.payload) == ("se/long", b"stays")
        assert m.properties.MessageExpiryInterval <= 98
        s.quiet(0.7)
        s.close()
        # After it: gone.
        time.sleep(3.5)
        s = Paho5(gateway.mqtt_port, client_id="p5-sess", clean_start=False, connect_props=sess)
        assert s.flags.session_present is False
        s.close()
        # Session Expiry 0 (the default): the session ends with the connection.
        z = Paho5(gateway.mqtt_port, client_id="p5-zero")
        z.subscribe("zero/#", 1)
        z.close()
        z = Paho5(gateway.mqtt_port, client_id="p5-zero", clean_start=False)
        assert z.flags.session_present is False
        z.close()
    finally:
        pub.close()


def test_shared_subscription_splits_messages_without_loss(gateway):
    members = [Paho5(gateway.mqtt_port) for _ in range(2)]
    # A 3.1.1 client joins the same group.
    old = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="p311-share",
                      protocol=mqtt.MQTTv311)
    old_msgs = queue.Queue()
    old.on_message = lambda c, u, m: old_msgs.put(m)
    subscribed = queue.Queue()
    old.on_subscribe = lambda c, u, mid, rcs, p: subscribed.put(rcs)
    old.connect("127.0.0.1", gateway.mqtt_port)
    old.loop_start()
    pub = Paho5(gateway.mqtt_port)
    try:
        for m in members:
            assert [c.value for c in m.subscribe("$share/grp/sh/#", 1)] == [1]
        old.subscribe("$share/grp/sh/#", 1)
        assert [c.value for c in subscribed.get(timeout=TIMEOUT)] == [1]
        n = 60
        for i in range(n):
            pub.publish(f"sh/{i % 3}", f"m{i}".encode(), 1)
        got = {}
        deadline = time.monotonic() + TIMEOUT
        queues = [m.messages for m in members] + [old_msgs]
        while sum(len(v) for v in got.values()) < n and time.monotonic() < deadline:
            for idx, q in enumerate(queues):
                try:
                    msg = q.get(timeout=0.05)
                    got.setdefault(idx, []).append(msg.payload)
                except queue.Empty:
                    pass
        everything = sorted(p for v in got.values() for p in v)
        assert everything == sorted(f"m{i}".encode() for i in range(n)), "each message once"
        assert len(got) >= 2, f"split across members: { {k: len(v) for k, v in got.items()} }"
    finally:
        for m in members:
            m.close()
        old.disconnect()
        old.loop_stop()
        pub.close()


def test_will_delay_and_disconnect_with_will_message(gateway):
    watch = Paho5(gateway.mqtt_port)
    try:
        watch.subscribe("lwt5/#", 1)
        will_props = props(PacketTypes.WILLMESSAGE, WillDelayInterval=2, ContentType="text/plain")
        sess = props(PacketTypes.CONNECT, SessionExpiryInterval=60)
        dev = Paho5(gateway.mqtt_port, client_id="p5-will", connect_props=sess,
                    will=dict(topic="lwt5/dev", payload=b"gone", qos=1, properties=will_props))
        dev.kill()
        watch.quiet(1.2)  # the delay has not passed
        m = watch.get(timeout=5)
        assert (m.topic, m.payload) == ("lwt5/dev", b"gone")
        assert m.properties.ContentType == "text/plain"
        # Resumed within the delay: no will.
        dev = Paho5(gateway.mqtt_port, client_id="p5-will2", connect_props=sess,
                    will=dict(topic="lwt5/dev2", payload=b"gone2", qos=1, properties=will_props))
        dev.kill()
        dev = Paho5(gateway.mqtt_port, client_id="p5-will2", clean_start=False,
                    connect_props=sess)
        watch.quiet(3.0)
        # DISCONNECT with Reason Code 0x04 publishes the will (no delay here).
        dev.close()
        bye = Paho5(gateway.mqtt_port,
                    will=dict(topic="lwt5/bye", payload=b"asked", qos=1))
        bye.close(reasoncode=mqtt.ReasonCode(PacketTypes.DISCONNECT, identifier=0x04))
        m = watch.get()
        assert (m.topic, m.payload) == ("lwt5/bye", b"asked")
    finally:
        watch.close()


def test_session_takeover_disconnects_with_0x8e(gateway):
    first = Paho5(gateway.mqtt_port, client_id="p5-twin")
    second = Paho5(gateway.mqtt_port, client_id="p5-twin")
    try:
        rc = first.disconnects.get(timeout=TIMEOUT)
        assert rc.value == 0x8E, rc
    finally:
        first.client.loop_stop()
        second.close()


# ---- enhanced authentication (raw socket: paho does not answer AUTH) --------------------------


def _varint(n):
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(b):
    return struct.pack(">H", len(b)) + b


def _packet(first, body):
    return bytes([first]) + _varint(len(body)) + body


def _auth_props(method, data):
    p = b"\x15" + _str(method) + b"\x16" + _str(data)
    return _varint(len(p)) + p


def _read_packet(sock):
    def exact(n):
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            assert chunk, "connection closed"
            buf += chunk
        return buf
    first = exact(1)[0]
    mult, length = 1, 0
    while True:
        b = exact(1)[0]
        length += (b & 0x7F) * mult
        mult *= 128
        if not b & 0x80:
            break
    return first, exact(length)


def _props_of(data):
    """Authentication Method/Data and the rest of a property block."""
    i, length, mult = 0, 0, 1
    while True:
        b = data[i]
        i += 1
        length += (b & 0x7F) * mult
        mult *= 128
        if not b & 0x80:
            break
    block, out = data[i:i + length], {}
    j = 0
    while j < len(block):
        pid = block[j]
        j += 1
        if pid in (0x15, 0x16, 0x1F, 0x12):
            n = struct.unpack(">H", block[j:j + 2])[0]
            out[pid] = block[j + 2:j + 2 + n]
            j += 2 + n
        elif pid in (0x21, 0x22, 0x13):
            j += 2
        elif pid == 0x27:
            j += 4
        else:
            raise AssertionError(f"unexpected property {pid:#x}")
    return out


def _scram_connect(port, user, password):
    """SCRAM-SHA-256 (RFC 5802, 7677) through MQTT 5.0 AUTH; returns the CONNACK reason code
    and whether the server's signature verified."""
    method = b"SCRAM-SHA-256"
    cnonce = base64.b64encode(os.urandom(18)).decode()
    first_bare = f"n={user},r={cnonce}"
    body = _str(b"MQTT") + bytes([5, 0x02]) + struct.pack(">H", 30)
    body += _auth_props(method, b"n,," + first_bare.encode()) + _str(b"scram-dev")
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
        s.sendall(_packet(0x10, body))
        first, data = _read_packet(s)
        if first == 0x20:
            return data[1], False
        assert first == 0xF0 and data[0] == 0x18, (hex(first), data[:1])
        server_first = _props_of(data[1:])[0x16].decode()
        attrs = dict(kv.split("=", 1) for kv in server_first.split(","))
        assert attrs["r"].startswith(cnonce)
        salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(attrs["s"]),
                                     int(attrs["i"]))
        client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
        stored_key = hashlib.sha256(client_key).digest()
        final_bare = f"c=biws,r={attrs['r']}"
        auth_message = f"{first_bare},{server_first},{final_bare}".encode()
        signature = hmac.new(stored_key, auth_message, hashlib.sha256).digest()
        proof = bytes(a ^ b for a, b in zip(client_key, signature))
        final = f"{final_bare},p={base64.b64encode(proof).decode()}".encode()
        s.sendall(_packet(0xF0, bytes([0x18]) + _auth_props(method, final)))
        first, data = _read_packet(s)
        assert first == 0x20, hex(first)
        if data[1] != 0:
            return data[1], False
        p = _props_of(data[2:])
        assert p[0x15] == method
        server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
        expected = b"v=" + base64.b64encode(hmac.new(server_key, auth_message,
                                                     hashlib.sha256).digest())
        return data[1], p[0x16] == expected


def test_enhanced_authentication_with_scram_sha_256(tmp_path):
    gw = Gateway(tmp_path, extra_config='\n[[auth.users]]\nname = "alice"\npassword = "s3cret"\n')
    gw.start()
    try:
        assert _scram_connect(gw.mqtt_port, "alice", "s3cret") == (0, True)
        code, _ = _scram_connect(gw.mqtt_port, "alice", "wrong")
        assert code == 0x87  # Not authorized
        # An Authentication Method the host does not offer: 0x8C.
        body = _str(b"MQTT") + bytes([5, 0x02]) + struct.pack(">H", 30)
        body += _auth_props(b"KERBEROS", b"x") + _str(b"k")
        with socket.create_connection(("127.0.0.1", gw.mqtt_port), timeout=TIMEOUT) as s:
            s.sendall(_packet(0x10, body))
            first, data = _read_packet(s)
            assert (first, data[1]) == (0x20, 0x8C)
    finally:
        gw.stop()


@pytest.mark.parametrize("ending", ["disconnect", "vanish"])
def test_clean_start_0_without_session_expiry_resumes_the_session_once(mqtt_peer, ending):
    """MQTT 5.0 [MQTT-3.1.2-5], [MQTT-3.2.2-3]: Clean Start 0 resumes an existing session even
    when the CONNECT has no Session Expiry Interval; §3.1.2.11.2: the session then ends when
    that connection closes, whether it sends DISCONNECT or vanishes."""
    port = mqtt_peer.mqtt_port
    cid = f"p5-resume-{uuid.uuid4().hex[:6]}"
    topic = f"resume/{cid}"
    hour = props(PacketTypes.CONNECT, SessionExpiryInterval=3600)
    s = Paho5(port, client_id=cid, connect_props=hour)
    s.subscribe(topic, 1)
    s.close()
    pub = Paho5(port)
    try:
        for payload in (b"q1", b"q2"):
            assert pub.publish(topic, payload, 1).value == 0
        s = Paho5(port, client_id=cid, clean_start=False)
        assert s.flags.session_present is True
        assert [s.get().payload for _ in range(2)] == [b"q1", b"q2"]
        # The subscription came back with the session.
        pub.publish(topic, b"live", 1)
        assert s.get().payload == b"live"
        if ending == "disconnect":
            s.close()
        else:
            s.kill()
        time.sleep(0.5)
        pub.publish(topic, b"after", 1)
        # The session ended with that connection: nothing to resume, nothing queued.
        s = Paho5(port, client_id=cid, clean_start=False, connect_props=hour)
        assert s.flags.session_present is False
        s.quiet(1.0)
        s.close()
    finally:
        pub.close()
