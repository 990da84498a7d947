"""MQTT 3.1.1 through the gateway with the Eclipse Paho client, plaintext and TLS, and the
same messages read by the official Pulsar client from the Pulsar topic they land in."""
import queue
import ssl
import uuid

import paho.mqtt.client as mqtt
import pulsar
import pytest

TIMEOUT = 20


class Paho:
    """A connected paho client whose received messages land in a queue."""

    def __init__(self, port, client_id=None, tls_ca=None, clean_session=True, will=None):
        self.messages = queue.Queue()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id or f"paho-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv311,
            clean_session=clean_session,
        )
        if tls_ca:
            self.client.tls_set(ca_certs=tls_ca, cert_reqs=ssl.CERT_REQUIRED)
        self.full = queue.Queue()
        self.disconnects = queue.Queue()

        def on_message(c, u, m):
            self.messages.put((m.topic, m.payload, m.qos))
            self.full.put(m)

        self.client.on_message = on_message
        self.client.on_disconnect = lambda c, u, flags, rc, p: self.disconnects.put(rc)
        if will:
            self.client.will_set(*will)
        self.client.connect("localhost" if tls_ca else "127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        deadline = TIMEOUT
        import time

        start = time.monotonic()
        while not self.client.is_connected():
            assert time.monotonic() - start < deadline, "paho did not connect"
            time.sleep(0.02)

    def subscribe(self, topic_filter, qos):
        acked = queue.Queue()
        self.client.on_subscribe = lambda c, u, mid, rc, p: acked.put(rc)
        result, _ = self.client.subscribe(topic_filter, qos)
        assert result == mqtt.MQTT_ERR_SUCCESS
        codes = acked.get(timeout=TIMEOUT)
        assert not any(rc.is_failure for rc in codes), codes

    def publish(self, topic, payload, qos, retain=False):
        info = self.client.publish(topic, payload, qos, retain=retain)
        info.wait_for_publish(timeout=TIMEOUT)
        assert info.is_published()

    def receive(self, n):
        return [self.messages.get(timeout=TIMEOUT) for _ in range(n)]

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
def test_qos0_and_qos1_with_wildcards(gateway, tls):
    port = gateway.mqtts_port if tls else gateway.mqtt_port
    ca = gateway.ca_file if tls else None
    sub = Paho(port, tls_ca=ca)
    pub = Paho(port, tls_ca=ca)
    try:
        sub.subscribe("home/+/temperature", 1)
        sub.subscribe("home/garage/#", 0)
        pub.publish("home/kitchen/temperature", b"21.0", 1)
        pub.publish("home/kitchen/humidity", b"40", 1)
        pub.publish("home/garage/door/state", b"open", 0)
        got = sorted(sub.receive(2))
        assert got == [
            ("home/garage/door/state", b"open", 0),
            ("home/kitchen/temperature", b"21.0", 1),
        ]
        with pytest.raises(queue.Empty):
            sub.messages.get(timeout=0.7)
    finally:
        sub.close()
        pub.close()


def test_pulsar_consumer_reads_what_mqtt_published(gateway):
    client = pulsar.Client(gateway.service_url, operation_timeout_seconds=10)
    try:
        consumer = client.subscribe(
            "persistent://public/default/mqtt",
            "analytics",
            initial_position=pulsar.InitialPosition.Earliest,
        )
        pub = Paho(gateway.mqtt_port)
        try:
            pub.publish("plant/line-3/pressure", b"1013", 1)
        finally:
            pub.close()
        msg = consumer.receive(timeout_millis=TIMEOUT * 1000)
        assert msg.data() == b"1013"
        assert msg.properties()["mqtt.topic"] == "plant/line-3/pressure"
        assert msg.partition_key() == "plant/line-3/pressure"
        consumer.acknowledge(msg)
    finally:
        client.close()


def test_pulsar_client_produces_and_consumes_on_the_embedded_broker(gateway):
    client = pulsar.Client(gateway.service_url, operation_timeout_seconds=10)
    try:
        consumer = client.subscribe("orders", "billing", consumer_type=pulsar.ConsumerType.Shared)
        producer = client.create_producer("orders")
        for i in range(50):
            producer.send(f"order-{i}".encode(), properties={"n": str(i)})
        got = []
        for _ in range(50):
            m = consumer.receive(timeout_millis=TIMEOUT * 1000)
            got.append(m.data().decode())
            consumer.acknowledge(m)
        assert got == [f"order-{i}" for i in range(50)]
    finally:
        client.close()


def test_mqtt_subscriber_gets_what_pulsar_producer_sent(gateway):
    sub = Paho(gateway.mqtt_port)
    client = pulsar.Client(gateway.service_url, operation_timeout_seconds=10)
    try:
        sub.subscribe("from-pulsar/#", 1)
        producer = client.create_producer("persistent://public/default/mqtt")
        producer.send(b"hello mqtt", properties={"mqtt.topic": "from-pulsar/greeting", "mqtt.qos": "1"})
        assert sub.receive(1) == [("from-pulsar/greeting", b"hello mqtt", 1)]
    finally:
        sub.close()
        client.close()


def test_qos2_exactly_once_both_ways(gateway):
    sub = Paho(gateway.mqtt_port)
    pub = Paho(gateway.mqtt_port)
    try:
        sub.subscribe("exact/#", 2)
        for i in range(10):
            pub.publish(f"exact/{i}", f"m{i}".encode(), 2)
        got = sorted(sub.receive(10))
        assert got == sorted((f"exact/{i}", f"m{i}".encode(), 2) for i in range(10))
        with pytest.raises(queue.Empty):
            sub.messages.get(timeout=0.7)
    finally:
        sub.close()
        pub.close()


def test_retained_message_on_subscribe_and_cleared_by_empty_payload(gateway):
    pub = Paho(gateway.mqtt_port)
    try:
        pub.publish("status/door", b"open", 1, retain=True)
        pub.publish("status/window", b"closed", 2, retain=True)
        sub = Paho(gateway.mqtt_port)
        try:
            sub.subscribe("status/+", 2)
            got = sorted((m.topic, m.payload, m.qos, m.retain) for m in (sub.full.get(timeout=TIMEOUT) for _ in range(2)))
            assert got == [("status/door", b"open", 1, True), ("status/window", b"closed", 2, True)]
            # Established subscription: RETAIN 0 (§3.3.1.3).
            pub.publish("status/door", b"", 1, retain=True)
            m = sub.full.get(timeout=TIMEOUT)
            assert (m.topic, m.payload, m.retain) == ("status/door", b"", False)
        finally:
            sub.close()
        late = Paho(gateway.mqtt_port)
        try:
            late.subscribe("status/#", 1)
            m = late.full.get(timeout=TIMEOUT)
            assert (m.topic, m.payload, m.retain) == ("status/window", b"closed", True)
            with pytest.raises(queue.Empty):
                late.full.get(timeout=0.7)
        finally:
            late.close()
    finally:
        pub.close()


def test_will_published_when_the_socket_dies_not_after_disconnect(gateway):
    watch = Paho(gateway.mqtt_port)
    try:
        watch.subscribe("lwt/#", 1)
        polite = Paho(gateway.mqtt_port, will=("lwt/polite", b"no", 1, False))
        polite.close()
        rude = Paho(gateway.mqtt_port, will=("lwt/rude", b"gone", 1, True))
        rude.client.loop_stop()
        rude.client.socket().close()
        m = watch.full.get(timeout=TIMEOUT)
        assert (m.topic, m.payload, m.qos) == ("lwt/rude", b"gone", 1)
        with pytest.raises(queue.Empty):
            watch.full.get(timeout=0.7)
        # Will Retain: the will is now the topic's retained message.
        late = Paho(gateway.mqtt_port)
        try:
            late.subscribe("lwt/rude", 1)
            m = late.full.get(timeout=TIMEOUT)
            assert (m.payload, m.retain) == (b"gone", True)
        finally:
            late.close()
    finally:
        watch.close()


def test_same_client_id_takes_the_session_over(gateway):
    first = Paho(gateway.mqtt_port, client_id="paho-twin", clean_session=False)
    first.client.reconnect_delay_set(60, 60)
    first.subscribe("twin/#", 1)
    second = Paho(gateway.mqtt_port, client_id="paho-twin", clean_session=False)
    pub = Paho(gateway.mqtt_port)
    try:
        first.disconnects.get(timeout=TIMEOUT)
        pub.publish("twin/a", b"for the second", 1)
        assert second.receive(1) == [("twin/a", b"for the second", 1)]
    finally:
        first.client.loop_stop()
        second.close()
        pub.close()
