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

    def __init__(self, port, client_id=None, tls_ca=None, clean_session=True):
        self.messages = queue.Queue()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id or f"paho-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv311,
            clean_session=clean_session,
        )
        if tls_ca:
            self.client.tls_set(ca_certs=tls_ca, cert_reqs=ssl.CERT_REQUIRED)
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, m.payload, m.qos))
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

    def publish(self, topic, payload, qos):
        info = self.client.publish(topic, payload, qos)
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
