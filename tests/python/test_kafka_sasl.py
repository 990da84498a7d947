"""Kafka SASL through the host's SASL service, on the contract of examples/two-tenants.toml
(anonymous access off; alice of tenant acme, bob of tenant globex): librdkafka through
confluent-kafka with `security.protocol=SASL_PLAINTEXT` and PLAIN, SCRAM-SHA-256,
SCRAM-SHA-512; kafka-python with PLAIN and SCRAM-SHA-512. A user's records land in its
tenant's namespace (found with the official Pulsar client and the user's token: the
example's tenants encrypt payloads at rest, so the key is checked); a wrong password, an
unoffered mechanism and a client without SASL are refused.

Every topic is fresh (uuid), every client is closed by the test, the gateway is stopped by
the fixture, every wait is bounded.
"""
import time
import uuid
from pathlib import Path

import pulsar
import pytest
from confluent_kafka import (
    Consumer,
    ConsumerGroupTopicPartitions,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient
from kafka import KafkaConsumer, KafkaProducer
from kafka import TopicPartition as KpTopicPartition

from test_kafka import TIMEOUT, KafkaGateway, topic_name
from test_tenancy import token

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "two-tenants.toml"


class TenantKafkaGateway(KafkaGateway):
    def __init__(self, tmp):
        super().__init__(tmp)
        self.config.write_text(self.config.read_text() + "\n" + EXAMPLE.read_text())


@pytest.fixture
def tenants(tmp_path):
    gw = TenantKafkaGateway(tmp_path).start()
    try:
        yield gw
    finally:
        gw.stop()


def sasl(gw, mechanism: str, user: str, password: str) -> dict:
    return {
        "bootstrap.servers": gw.bootstrap,
        "security.protocol": "SASL_PLAINTEXT",
        "sasl.mechanism": mechanism,
        "sasl.username": user,
        "sasl.password": password,
    }


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_confluent_kafka_sasl_into_the_tenants_namespace(tenants, mechanism):
    gw = tenants
    topic = topic_name()
    producer = Producer({**sasl(gw, mechanism, "alice", "alice-secret"), "linger.ms": 5})
    delivered = []

    def on_delivery(err, msg):
        assert err is None, err
        delivered.append(msg.offset())

    for i in range(5):
        producer.produce(topic, key=f"k{i}".encode(), value=f"v{i}".encode(), partition=0, on_delivery=on_delivery)
    assert producer.flush(TIMEOUT) == 0
    assert delivered == list(range(5))

    consumer = Consumer(
        {**sasl(gw, mechanism, "alice", "alice-secret"), "group.id": f"g-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False}
    )
    try:
        consumer.assign([TopicPartition(topic, 0, 0)])
        got = []
        deadline = time.monotonic() + TIMEOUT
        while len(got) < 5 and time.monotonic() < deadline:
            msg = consumer.poll(1.0)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            got.append((msg.offset(), msg.key(), msg.value()))
        assert got == [(i, f"k{i}".encode(), f"v{i}".encode()) for i in range(5)]
    finally:
        consumer.close()

    # The records are in acme/default, read with alice's token by the Pulsar client.
    client = pulsar.Client(
        gw.service_url, authentication=pulsar.AuthenticationToken(token(gw, "alice")), operation_timeout_seconds=10
    )
    try:
        reader = client.create_reader(f"persistent://acme/default/{topic}-partition-0", pulsar.MessageId.earliest)
        # The tenant encrypts payloads at rest (the example's `encryption = true`): the
        # record is there, with its key.
        assert reader.read_next(timeout_millis=TIMEOUT * 1000).partition_key() == "k0"
    finally:
        client.close()

    # bob (globex) does not see acme's topic.
    bob = AdminClient(sasl(gw, mechanism, "bob", "bob-secret"))
    assert topic not in bob.list_topics(timeout=TIMEOUT).topics
    assert topic in AdminClient(sasl(gw, mechanism, "alice", "alice-secret")).list_topics(timeout=TIMEOUT).topics


def client_errors(config: dict) -> list:
    """The errors a producer of `config` reports (its error callback, served by poll) until
    it reports one, within 10 s; its Metadata request fails meanwhile."""
    errors = []
    producer = Producer({**config, "error_cb": errors.append})
    with pytest.raises(KafkaException):
        producer.list_topics(timeout=3)
    deadline = time.monotonic() + 10
    while not errors and time.monotonic() < deadline:
        producer.poll(0.2)
    producer.flush(1)
    return errors


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256"])
def test_a_wrong_password_is_refused(tenants, mechanism):
    errors = client_errors(sasl(tenants, mechanism, "alice", "wrong"))
    assert any(e.code() == KafkaError._AUTHENTICATION for e in errors), errors
    assert any("Authentication failed" in e.str() for e in errors), errors


def test_a_client_without_sasl_is_refused_when_anonymous_is_off(tenants):
    errors = client_errors({"bootstrap.servers": tenants.bootstrap})
    assert errors, "the client saw its connection closed"


def test_an_unoffered_mechanism_is_refused(tenants):
    errors = client_errors(
        {
            "bootstrap.servers": tenants.bootstrap,
            "security.protocol": "SASL_PLAINTEXT",
            "sasl.mechanism": "OAUTHBEARER",
            "enable.sasl.oauthbearer.unsecure.jwt": True,
            "sasl.oauthbearer.config": "principal=alice",
        }
    )
    assert any("OAUTHBEARER" in e.str() and "PLAIN" in e.str() for e in errors), errors


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-512"])
def test_kafka_python_sasl(tenants, mechanism):
    gw = tenants
    topic = topic_name()
    common = dict(
        bootstrap_servers=gw.bootstrap,
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism=mechanism,
        sasl_plain_username="bob",
        sasl_plain_password="bob-secret",
    )
    producer = KafkaProducer(acks="all", **common)
    try:
        futures = [producer.send(topic, key=f"k{i}".encode(), value=f"v{i}".encode(), partition=0) for i in range(3)]
        producer.flush(timeout=TIMEOUT)
        assert [f.get(timeout=TIMEOUT).offset for f in futures] == [0, 1, 2]
    finally:
        producer.close(timeout=TIMEOUT)
    consumer = KafkaConsumer(group_id=None, enable_auto_commit=False, **common)
    try:
        tp = KpTopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        got = []
        deadline = time.monotonic() + TIMEOUT
        while len(got) < 3 and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=1000).values():
                got.extend(records)
        assert [(r.offset, r.value) for r in got] == [(i, f"v{i}".encode()) for i in range(3)]
    finally:
        consumer.close()
    client = pulsar.Client(
        gw.service_url, authentication=pulsar.AuthenticationToken(token(gw, "bob")), operation_timeout_seconds=10
    )
    try:
        reader = client.create_reader(f"persistent://globex/default/{topic}-partition-0", pulsar.MessageId.earliest)
        assert reader.read_next(timeout_millis=TIMEOUT * 1000).partition_key() == "k0"
    finally:
        client.close()


def test_one_group_name_in_two_tenants_is_two_groups(tenants):
    """alice (acme) and bob (globex) use the same topic and group names: each group reads
    its own tenant's records, and commits, members and the group listing stay apart."""
    gw = tenants
    topic, group = topic_name(), f"g-{uuid.uuid4().hex[:8]}"
    for user, count in (("alice", 3), ("bob", 5)):
        producer = Producer(sasl(gw, "SCRAM-SHA-256", user, f"{user}-secret"))
        for i in range(count):
            producer.produce(topic, value=f"{user}-{i}".encode(), partition=0)
        assert producer.flush(TIMEOUT) == 0

    def read_and_commit(user: str, count: int) -> list:
        consumer = Consumer(
            {
                **sasl(gw, "SCRAM-SHA-256", user, f"{user}-secret"),
                "group.id": group,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
            }
        )
        try:
            consumer.subscribe([topic])
            got = []
            deadline = time.monotonic() + TIMEOUT
            while len(got) < count and time.monotonic() < deadline:
                msg = consumer.poll(1.0)
                if msg is not None and msg.error() is None:
                    got.append(msg.value())
            consumer.commit(asynchronous=False)
            return got
        finally:
            consumer.close()

    assert read_and_commit("alice", 3) == [f"alice-{i}".encode() for i in range(3)]
    # alice's commit at offset 3 is not bob's: his group starts at his own first record.
    assert read_and_commit("bob", 5) == [f"bob-{i}".encode() for i in range(5)]

    def committed(user: str) -> int:
        admin = AdminClient(sasl(gw, "SCRAM-SHA-256", user, f"{user}-secret"))
        futures = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)])
        result = futures[group].result(timeout=TIMEOUT)
        return {tp.partition: tp.offset for tp in result.topic_partitions}[0]

    assert committed("alice") == 3
    assert committed("bob") == 5


SLOW_RATE = 200


class QuotaKafkaGateway(TenantKafkaGateway):
    """The tenancy example plus carol, of alice's tenant, limited to SLOW_RATE records/s."""

    def __init__(self, tmp):
        super().__init__(tmp)
        self.config.write_text(
            self.config.read_text()
            + '\n[[auth.users]]\nname = "carol"\npassword = "carol-secret"\ntenant = "acme"\n'
            + f'namespace = "default"\n[auth.users.limits]\npublish_msgs_per_sec = {SLOW_RATE}\n'
        )


def produce_throttled(gw, user: str, password: str, topic: str, n: int) -> tuple:
    """Produces n records as `user`: (offsets delivered, longest throttle_time_ms reported
    to the throttle callback, seconds taken)."""
    throttles = []
    producer = Producer(
        {
            **sasl(gw, "SCRAM-SHA-256", user, password),
            "linger.ms": 5,
            "acks": "all",
            "throttle_cb": lambda event: throttles.append(event.throttle_time),
        }
    )
    delivered = []

    def on_delivery(err, msg):
        assert err is None, err
        delivered.append(msg.offset())

    started = time.monotonic()
    for i in range(n):
        producer.produce(topic, value=b"x" * 100, partition=0, on_delivery=on_delivery)
        producer.poll(0)
    assert producer.flush(TIMEOUT) == 0
    took = time.monotonic() - started
    producer.poll(0)
    return delivered, max(throttles, default=0.0) * 1000, took


def test_a_publish_rate_quota_is_answered_with_throttle_time(tmp_path):
    """Kafka's answer to a quota: the records are all stored (never refused or dropped),
    at the user's rate, and each Produce response says how long it was held back
    (`throttle_time_ms`, reported by librdkafka's throttle callback); a user without a
    limit in the same tenant is not throttled."""
    gw = QuotaKafkaGateway(tmp_path).start()
    try:
        n = 3 * SLOW_RATE
        delivered, throttle_ms, took = produce_throttled(gw, "carol", "carol-secret", topic_name(), n)
        assert sorted(delivered) == list(range(n))
        # The bucket lends a tenth of a second's burst, then paces: n records take
        # (n - burst) / rate seconds at least.
        assert took >= (n - SLOW_RATE / 10) / SLOW_RATE * 0.9, took
        assert throttle_ms > 0, "no Produce response reported a throttle time"
        assert throttle_ms <= took * 1000, (throttle_ms, took)

        delivered, throttle_ms, _ = produce_throttled(gw, "alice", "alice-secret", topic_name(), n)
        assert sorted(delivered) == list(range(n))
        assert throttle_ms == 0
    finally:
        gw.stop()
