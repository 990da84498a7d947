"""The Kafka plugin against the clients Kafka users run: librdkafka through confluent-kafka
and Debian's kcat, on a real gateway with its embedded broker; and the official Pulsar
client reading what Kafka wrote, and the reverse.

Every topic is fresh (uuid), every consumer and producer is closed by the test, the
gateway is stopped by the fixture, every wait is bounded.
"""
import json
import socket
import subprocess
import time
import uuid

import pulsar
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from conftest import Gateway, wait_for_port

TIMEOUT = 20


class KafkaGateway(Gateway):
    """A gateway with a `kafka` listener on a free port, advertised as itself."""

    def __init__(self, tmp):
        # Held while the other ports are chosen, so that none of them is the same.
        held = socket.socket()
        held.bind(("127.0.0.1", 0))
        self.kafka_port = held.getsockname()[1]
        try:
            super().__init__(
                tmp,
                extra_config=(
                    f'\n[[listeners]]\nname = "kafka"\nbind = "127.0.0.1:{self.kafka_port}"\n'
                    'plugin = "kafka"\n\n'
                    f"[plugins.config.kafka]\nadvertised_port = {self.kafka_port}\n"
                ),
            )
        finally:
            held.close()

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.kafka_port}"

    def start(self) -> "KafkaGateway":
        # Free ports are chosen before the gateway binds them, and the gateway's own
        # connections to its embedded broker (and other tests on the machine) may take one
        # meanwhile: on "address in use" the ports are chosen again (the data stays).
        for attempt in range(5):
            try:
                super().start()
                wait_for_port(self.kafka_port, self.proc, self.log)
                return self
            except RuntimeError as e:
                if attempt == 4 or "Address already in use" not in str(e):
                    raise
                self.stop()
                type(self).__init__(self, self.tmp)
        return self


@pytest.fixture
def kafka(tmp_path):
    gw = KafkaGateway(tmp_path).start()
    try:
        yield gw
    finally:
        gw.stop()


def topic_name() -> str:
    return f"k-{uuid.uuid4().hex[:12]}"


def create_topic(gw, topic: str, partitions: int = 1) -> None:
    admin = AdminClient({"bootstrap.servers": gw.bootstrap})
    futures = admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    futures[topic].result(timeout=TIMEOUT)


def produce_batches(gw, topic: str, batches: int, per_batch: int, **config) -> list:
    """Produces `batches` batches of `per_batch` records to partition 0 (a flush after each,
    so each is one batch); the (offset, key) of every delivery, in order."""
    producer = Producer({"bootstrap.servers": gw.bootstrap, "linger.ms": 50, **config})
    delivered = []

    def on_delivery(err, msg):
        assert err is None, err
        delivered.append((msg.offset(), msg.key()))

    n = 0
    for _ in range(batches):
        for _ in range(per_batch):
            producer.produce(
                topic,
                key=f"k{n}".encode(),
                value=f"value {n}".encode() * 10,
                partition=0,
                headers=[("n", str(n).encode())],
                on_delivery=on_delivery,
            )
            n += 1
        assert producer.flush(TIMEOUT) == 0
    return delivered


def consume(gw, topic: str, count: int, offset: int = 0) -> list:
    consumer = Consumer(
        {
            "bootstrap.servers": gw.bootstrap,
            "group.id": f"g-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
        }
    )
    try:
        consumer.assign([TopicPartition(topic, 0, offset)])
        got = []
        deadline = time.monotonic() + TIMEOUT
        while len(got) < count and time.monotonic() < deadline:
            msg = consumer.poll(1.0)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            got.append(msg)
        return got
    finally:
        consumer.close()


def test_offsets_are_contiguous_across_batches(kafka):
    topic = topic_name()
    create_topic(kafka, topic)
    delivered = produce_batches(kafka, topic, batches=4, per_batch=5)
    assert [o for o, _ in delivered] == list(range(20))
    got = consume(kafka, topic, 20)
    assert [m.offset() for m in got] == list(range(20))
    assert [m.key() for m in got] == [f"k{i}".encode() for i in range(20)]
    assert got[7].value() == b"value 7" * 10
    assert got[7].headers() == [("n", b"7")]
    # From the middle.
    assert [m.offset() for m in consume(kafka, topic, 3, offset=17)] == [17, 18, 19]


@pytest.mark.parametrize("codec", ["none", "gzip", "snappy", "lz4", "zstd"])
def test_every_compression_codec(kafka, codec):
    topic = topic_name()
    create_topic(kafka, topic)
    delivered = produce_batches(kafka, topic, batches=2, per_batch=10, **{"compression.type": codec})
    assert [o for o, _ in delivered] == list(range(20))
    got = consume(kafka, topic, 20)
    assert [m.value() for m in got] == [f"value {i}".encode() * 10 for i in range(20)]


def test_list_offsets_earliest_latest_and_by_time(kafka):
    topic = topic_name()
    create_topic(kafka, topic)
    consumer = Consumer({"bootstrap.servers": kafka.bootstrap, "group.id": "lo"})
    try:
        tp = TopicPartition(topic, 0)
        assert consumer.get_watermark_offsets(tp, timeout=TIMEOUT, cached=False) == (0, 0)
        producer = Producer({"bootstrap.servers": kafka.bootstrap})
        now = int(time.time() * 1000)
        for i in range(6):
            producer.produce(topic, value=b"x", partition=0, timestamp=now + i * 1000)
        assert producer.flush(TIMEOUT) == 0
        assert consumer.get_watermark_offsets(tp, timeout=TIMEOUT, cached=False) == (0, 6)
        found = consumer.offsets_for_times([TopicPartition(topic, 0, now + 2500)], timeout=TIMEOUT)
        assert found[0].offset == 3
    finally:
        consumer.close()


def test_pulsar_client_reads_a_kafka_record(kafka):
    topic = topic_name()
    create_topic(kafka, topic)
    producer = Producer({"bootstrap.servers": kafka.bootstrap})
    producer.produce(
        topic, key=b"order-7", value=b"paid", partition=0, headers=[("source", b"shop")], timestamp=1_700_000_000_123
    )
    assert producer.flush(TIMEOUT) == 0
    client = pulsar.Client(kafka.service_url, operation_timeout_seconds=10)
    try:
        reader = client.create_reader(f"persistent://public/default/{topic}-partition-0", pulsar.MessageId.earliest)
        msg = reader.read_next(timeout_millis=TIMEOUT * 1000)
        assert msg.data() == b"paid"
        assert msg.partition_key() == "order-7"
        assert msg.properties() == {"source": "shop"}
        assert msg.event_timestamp() == 1_700_000_000_123
    finally:
        client.close()


def test_kafka_consumer_reads_a_pulsar_record(kafka):
    topic = topic_name()
    create_topic(kafka, topic)
    client = pulsar.Client(kafka.service_url, operation_timeout_seconds=10)
    try:
        producer = client.create_producer(f"persistent://public/default/{topic}-partition-0")
        producer.send(b"from pulsar", properties={"a": "1"}, partition_key="pk", event_timestamp=1_700_000_000_456)
    finally:
        client.close()
    got = consume(kafka, topic, 1)
    assert len(got) == 1
    m = got[0]
    assert (m.offset(), m.key(), m.value()) == (0, b"pk", b"from pulsar")
    assert m.headers() == [("a", b"1")]
    assert m.timestamp()[1] == 1_700_000_000_456


def kcat(gw, *args, stdin: bytes = b"") -> str:
    out = subprocess.run(
        ["kcat", "-b", gw.bootstrap, *args], input=stdin, capture_output=True, timeout=TIMEOUT, check=True
    )
    return out.stdout.decode()


def test_kcat_metadata_produce_and_consume(kafka):
    topic = topic_name()
    create_topic(kafka, topic, partitions=3)
    meta = json.loads(kcat(kafka, "-L", "-J", "-t", topic))
    assert [(b["id"], b["name"]) for b in meta["brokers"]] == [(1, kafka.bootstrap)]
    (t,) = meta["topics"]
    assert t["topic"] == topic
    assert [p["partition"] for p in t["partitions"]] == [0, 1, 2]
    assert all(p["leader"] == 1 for p in t["partitions"])

    kcat(kafka, "-P", "-t", topic, "-p", "2", "-K", ":", stdin=b"a:one\nb:two\nc:three\n")
    out = kcat(kafka, "-C", "-t", topic, "-p", "2", "-o", "beginning", "-e", "-f", "%o %k %s\n")
    assert out.splitlines() == ["0 a one", "1 b two", "2 c three"]


def test_a_batch_of_more_records_than_a_receiver_queue_is_fetched(kafka):
    """librdkafka sends up to 10,000 records in one batch, one backend entry: a Fetch must
    read such an entry whole (the gateway's backend consumers queue 1,000 messages; closing
    one inside a larger batch used to hang, and the Fetch with it)."""
    topic = topic_name()
    create_topic(kafka, topic)
    producer = Producer({"bootstrap.servers": kafka.bootstrap, "linger.ms": 1000, "batch.num.messages": 10000})
    for i in range(3000):
        producer.produce(topic, value=f"v{i}".encode(), partition=0)
    assert producer.flush(TIMEOUT) == 0
    got = consume(kafka, topic, 3000)
    assert [m.offset() for m in got] == list(range(3000))
    assert got[2999].value() == b"v2999"
