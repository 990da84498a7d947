"""MQTT over WebSocket (ws:// and wss://), as browsers' MQTT clients speak it: Eclipse Paho
with `transport="websockets"` against a TCP MQTT client on the other side, and the
`websockets` client for what Paho hides (frame boundaries, pings, text frames, refused
handshakes)."""
import queue
import socket
import ssl
import time
import uuid

import paho.mqtt.client as mqtt
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect as ws_connect

from conftest import Gateway
from test_mqtt_paho import Paho

TIMEOUT = 20
BIG = 200 * 1024


@pytest.fixture(scope="module")
def ws_gateway(tmp_path_factory):
    """A gateway with a plain WebSocket listener (any path) and a TLS one (path `/mqtt`)."""
    gw = Gateway(tmp_path_factory.mktemp("ws"), websocket=True).start()
    try:
        yield gw
    finally:
        gw.stop()


class Client(Paho):
    """The Paho test client of test_mqtt_paho.py (same subscribe, publish, receive, close),
    connected over TCP, ws or wss."""

    def __init__(self, gw, transport):
        # Not Paho.__init__: it connects over TCP only.
        self.messages = queue.Queue()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"ws-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv311,
            transport="tcp" if transport == "tcp" else "websockets",
        )
        host, port = "127.0.0.1", gw.mqtt_port
        if transport == "ws":
            port = gw.ws_port
            self.client.ws_set_options(path="/mqtt")
        elif transport == "wss":
            host, port = "localhost", gw.wss_port
            self.client.ws_set_options(path="/mqtt")
            self.client.tls_set(ca_certs=gw.ca_file, cert_reqs=ssl.CERT_REQUIRED)
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, m.payload, m.qos))
        self.client.connect(host, port, keepalive=30)
        self.client.loop_start()
        start = time.monotonic()
        while not self.client.is_connected():
            assert time.monotonic() - start < TIMEOUT, f"paho over {transport} did not connect"
            time.sleep(0.02)


@pytest.mark.parametrize("transport", ["ws", "wss"])
def test_qos0_qos1_and_a_large_message_both_ways_with_a_tcp_client(ws_gateway, transport):
    base = f"wsq/{uuid.uuid4().hex[:8]}"
    web = Client(ws_gateway, transport)
    tcp = Client(ws_gateway, "tcp")
    big = bytes(range(256)) * (BIG // 256)
    try:
        web.subscribe(f"{base}/to-web/#", 1)
        tcp.subscribe(f"{base}/to-tcp/#", 1)

        for sender, receiver, to in ((tcp, web, "to-web"), (web, tcp, "to-tcp")):
            sender.publish(f"{base}/{to}/q0", b"zero", 0)
            sender.publish(f"{base}/{to}/q1", b"one", 1)
            sender.publish(f"{base}/{to}/big", big, 1)
            got = receiver.receive(3)
            assert sorted(got[:2]) == [(f"{base}/{to}/q0", b"zero", 0), (f"{base}/{to}/q1", b"one", 1)]
            assert got[2] == (f"{base}/{to}/big", big, 1)
    finally:
        web.close()
        tcp.close()


def connect_packet(client_id: bytes) -> bytes:
    """MQTT 3.1.1 CONNECT (§3.1), clean session, keep-alive 60 s."""
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(client_id).to_bytes(2, "big") + client_id
    return bytes([0x10, len(body)]) + body


def read_packets(ws, n: int) -> bytes:
    """Reads WebSocket messages until `n` bytes of MQTT arrived; returns them."""
    data = b""
    while len(data) < n:
        message = ws.recv(timeout=TIMEOUT)
        assert isinstance(message, bytes), "MQTT must come in binary frames"
        data += message
    return data


def test_packets_span_and_share_frames_and_pings_are_answered(ws_gateway):
    with ws_connect(f"ws://127.0.0.1:{ws_gateway.ws_port}/mqtt", subprotocols=["mqtt"]) as ws:
        assert ws.subprotocol == "mqtt"
        connect = connect_packet(b"raw-" + uuid.uuid4().hex[:8].encode())
        pingreq = b"\xc0\x00"
        # CONNECT across two messages, the second fragmented and sharing its last frame with
        # the first byte of a PINGREQ, whose second byte comes in a third message.
        ws.send(connect[:5])
        ws.send([connect[5:9], connect[9:] + pingreq[:1]])
        ws.send(pingreq[1:])
        assert read_packets(ws, 6) == b"\x20\x02\x00\x00" + b"\xd0\x00"  # CONNACK, PINGRESP
        assert ws.ping(b"still there?").wait(TIMEOUT), "no pong from the gateway"


def test_large_delivery_crosses_several_websocket_messages(ws_gateway):
    topic = f"wsbig/{uuid.uuid4().hex[:8]}"
    big = bytes(range(256)) * (BIG // 256)
    tcp = Client(ws_gateway, "tcp")
    with ws_connect(f"ws://127.0.0.1:{ws_gateway.ws_port}/", subprotocols=["mqtt"]) as ws:
        try:
            ws.send(connect_packet(b"raw-" + uuid.uuid4().hex[:8].encode()))
            assert read_packets(ws, 4) == b"\x20\x02\x00\x00"
            # SUBSCRIBE (§3.8) packet id 1, QoS 0.
            sub = b"\x00\x01" + len(topic).to_bytes(2, "big") + topic.encode() + b"\x00"
            ws.send(bytes([0x82, len(sub)]) + sub)
            assert read_packets(ws, 5) == b"\x90\x03\x00\x01\x00"  # SUBACK
            tcp.publish(topic, big, 0)
            messages, data = 0, b""
            expected = 1 + 3 + 2 + len(topic) + BIG  # PUBLISH with a 3-byte remaining length
            while len(data) < expected:
                message = ws.recv(timeout=TIMEOUT)
                assert isinstance(message, bytes)
                messages += 1
                data += message
            assert data[0] == 0x30 and data.endswith(big) and len(data) == expected
            assert messages >= 4, f"{BIG} bytes came in {messages} WebSocket message(s)"
        finally:
            tcp.close()


def test_text_frame_closes_the_connection_with_1003(ws_gateway):
    with ws_connect(f"ws://127.0.0.1:{ws_gateway.ws_port}/mqtt", subprotocols=["mqtt"]) as ws:
        ws.send(connect_packet(b"raw-" + uuid.uuid4().hex[:8].encode()))
        assert read_packets(ws, 4) == b"\x20\x02\x00\x00"
        ws.send("not MQTT")
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=TIMEOUT)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1003
    assert "text frame received" in ws_gateway.log.read_text()


def http_exchange(port: int, request: bytes) -> bytes:
    """Sends a raw HTTP request and reads the answer until the gateway closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
        s.sendall(request)
        answer = b""
        while chunk := s.recv(4096):
            answer += chunk
        return answer


def wss_upgrade(gw, path: str, protocols: str) -> bytes:
    """Sends a WebSocket upgrade request over TLS; returns the response head."""
    tls = ssl.create_default_context(cafile=gw.ca_file)
    raw = socket.create_connection(("127.0.0.1", gw.wss_port), timeout=TIMEOUT)
    with tls.wrap_socket(raw, server_hostname="localhost") as s:
        s.sendall(
            f"GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {protocols}\r\n\r\n".encode()
        )
        answer = b""
        while b"\r\n\r\n" not in answer and (chunk := s.recv(4096)):
            answer += chunk
        return answer


def test_bad_handshakes_are_refused_while_other_connections_go_on(ws_gateway):
    topic = f"wsbad/{uuid.uuid4().hex[:8]}"
    web = Client(ws_gateway, "ws")
    tcp = Client(ws_gateway, "tcp")
    try:
        web.subscribe(topic, 1)

        # Plain HTTP without an upgrade.
        answer = http_exchange(ws_gateway.ws_port, b"GET /mqtt HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 400"), answer
        # A WebSocket client that does not offer `mqtt`, or no subprotocol at all.
        for protocols in (["amqp"], None):
            with pytest.raises(InvalidStatus) as refused:
                ws_connect(f"ws://127.0.0.1:{ws_gateway.ws_port}/mqtt", subprotocols=protocols)
            assert refused.value.response.status_code == 400
            assert b"mqtt" in refused.value.response.body
        # The TLS listener serves only `/mqtt`; of several subprotocols offered, it picks `mqtt`.
        # (Raw requests: the `websockets` sync client sometimes stalls after its TLS handshake
        # without sending its request — python-websockets/websockets#1387.)
        answer = wss_upgrade(ws_gateway, "/other", "mqtt")
        assert answer.startswith(b"HTTP/1.1 404"), answer
        answer = wss_upgrade(ws_gateway, "/mqtt", "mqttv5, mqtt")
        assert answer.startswith(b"HTTP/1.1 101"), answer
        assert b"\r\nsec-websocket-protocol: mqtt\r\n" in answer.lower(), answer

        tcp.publish(topic, b"after the refusals", 1)
        assert web.receive(1) == [(topic, b"after the refusals", 1)]
    finally:
        web.close()
        tcp.close()
    assert "WebSocket upgrade refused" in ws_gateway.log.read_text()


def test_a_websocket_subscriber_that_stops_reading_loses_nothing(ws_gateway):
    """While the subscriber's paho loop is stopped it reads nothing: its socket fills, the
    gateway's WebSocket writes wait and its deliveries with them; resumed, every message comes."""
    topic = f"wsslow/{uuid.uuid4().hex[:8]}"
    count, size = 300, 32 * 1024
    web = Client(ws_gateway, "ws")
    tcp = Client(ws_gateway, "tcp")
    try:
        web.subscribe(topic, 1)
        web.client.loop_stop()
        for i in range(count):
            tcp.publish(topic, i.to_bytes(4, "big") * (size // 4), 1)
        web.client.loop_start()
        got = web.receive(count)
        assert [int.from_bytes(p[:4], "big") for _, p, _ in got] == list(range(count))
        assert all(len(p) == size and q == 1 for _, p, q in got)
    finally:
        web.close()
        tcp.close()
