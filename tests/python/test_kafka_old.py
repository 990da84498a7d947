"""The Kafka plugin against clients of the 0.10 era: kafka-python pinned to
`api_version=(0, 10, 0)` and `(0, 10, 2)` speaks the versions Kafka 4.0 removed (KIP-896),
which the plugin serves by hand (`plugins/kafka/src/codec/legacy.rs`). At those pins
kafka-python sends (its `kafka/protocol/broker_api_versions.py` table, capped by the
versions it implements): Produce v2 with magic-1 message sets (compressed ones as a
wrapper message), Fetch v2 (0.10.0) or v3 (0.10.2) answered with magic-1 message sets,
ListOffsets v0 (0.10.0) or v1 (0.10.2), OffsetCommit v2, OffsetFetch v1 (0.10.0) or v2,
CreateTopics v1 and DeleteTopics v0 (0.10.2). OffsetCommit v0/v1 and OffsetFetch v0, which
no pinned consumer sends, go through kafka-python's protocol layer.

Every topic is fresh, every client is closed by the test, the gateway stopped by the
fixture, every wait bounded.
"""
import time

import pytest
from confluent_kafka import Producer
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic as PyNewTopic
from kafka.codec import has_lz4, has_snappy
from kafka.errors import TopicAuthorizationFailedError

from test_kafka import TIMEOUT, consume, create_topic, kafka, topic_name  # noqa: F401 (fixture)
from test_kafka_groups import kafka_python_call

VERSIONS = [(0, 10, 0), (0, 10, 2)]
# Every codec kafka-python offers for message format v1 (zstd needs Produce v7).
CODECS = [None, "gzip", "snappy", "lz4"]


def version_id(v):
    return ".".join(map(str, v))


def produce_old(gw, topic, api_version, n, compression=None, start=0):
    """Produces records `start..start+n` to partition 0 with acks=all, in two flushes (two
    message sets); their offsets."""
    producer = KafkaProducer(
        bootstrap_servers=gw.bootstrap,
        api_version=api_version,
        acks="all",
        linger_ms=20,
        compression_type=compression,
    )
    try:
        futures = []
        half = n // 2
        for chunk in (range(start, start + half), range(start + half, start + n)):
            for i in chunk:
                futures.append(
                    producer.send(topic, key=f"k{i}".encode(), value=f"value {i}".encode() * 5, partition=0)
                )
            producer.flush(timeout=TIMEOUT)
        return [f.get(timeout=TIMEOUT).offset for f in futures]
    finally:
        producer.close(timeout=TIMEOUT)


def read_old(gw, topic, api_version, count):
    """Reads `count` records of partition 0 from offset 0 with a consumer pinned to
    `api_version`; the records and the beginning and end offsets it was told."""
    consumer = KafkaConsumer(
        bootstrap_servers=gw.bootstrap,
        api_version=api_version,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        got = []
        deadline = time.monotonic() + TIMEOUT
        while len(got) < count:
            assert time.monotonic() < deadline, f"read {len(got)} of {count}"
            for records in consumer.poll(timeout_ms=500).values():
                got.extend(records)
        return got, consumer.beginning_offsets([tp])[tp], consumer.end_offsets([tp])[tp]
    finally:
        consumer.close()


def test_codec_extras_are_installed():
    """Without them kafka-python refuses the codecs (and the tests below would not run
    what they claim)."""
    assert has_snappy() and has_lz4()


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c or "none")
@pytest.mark.parametrize("api_version", VERSIONS, ids=version_id)
def test_old_client_round_trip(kafka, api_version, codec):  # noqa: F811 (fixture)
    """Produce v2 (magic 1, the codec's wrapper message) with acks=all gives contiguous
    offsets across message sets; Fetch v2/v3 reads every key and value back exactly, with
    the producer's timestamps; ListOffsets (v0 for 0.10.0) answers 0 and the end."""
    topic = topic_name()
    create_topic(kafka, topic)
    before = int(time.time() * 1000)
    assert produce_old(kafka, topic, api_version, 10, codec) == list(range(10))
    got, beginning, end = read_old(kafka, topic, api_version, 10)
    assert [(r.offset, r.key, r.value) for r in got] == [
        (i, f"k{i}".encode(), f"value {i}".encode() * 5) for i in range(10)
    ]
    assert all(before - 1000 <= r.timestamp <= int(time.time() * 1000) for r in got)
    assert (beginning, end) == (0, 10)


@pytest.mark.parametrize("api_version", VERSIONS, ids=version_id)
def test_old_group_consumer_commits_and_resumes(kafka, api_version):  # noqa: F811
    """A group consumer pinned to 0.10 (JoinGroup v0/v1, SyncGroup v0, OffsetCommit v2,
    OffsetFetch v1/v2) reads, commits synchronously, and the next consumer of the group
    starts after the commit."""
    topic = topic_name()
    group = f"g-{topic}"
    create_topic(kafka, topic)
    assert produce_old(kafka, topic, api_version, 6) == list(range(6))

    def read(count):
        consumer = KafkaConsumer(
            topic,
            bootstrap_servers=kafka.bootstrap,
            api_version=api_version,
            group_id=group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=10000,
            heartbeat_interval_ms=500,
        )
        try:
            got = []
            deadline = time.monotonic() + TIMEOUT
            while len(got) < count:
                assert time.monotonic() < deadline, "timed out"
                for records in consumer.poll(timeout_ms=500, max_records=count - len(got)).values():
                    got.extend(r.offset for r in records)
            consumer.commit()
            return got
        finally:
            consumer.close()

    assert read(3) == [0, 1, 2]
    assert read(3) == [3, 4, 5]


def test_offset_commit_v0_v1_and_offset_fetch_v0(kafka):  # noqa: F811
    """OffsetCommit v0 and v1 (outside group management: generation -1) store offsets that
    OffsetFetch v0 reads back, and a consumer of the group pinned to 0.10.0 resumes after
    the one committed last."""
    from kafka.protocol.commit import OffsetCommitRequest, OffsetFetchRequest

    topic = topic_name()
    group = f"g-{topic}"
    create_topic(kafka, topic)
    assert produce_old(kafka, topic, (0, 10, 0), 6) == list(range(6))

    r = kafka_python_call(kafka, OffsetCommitRequest[0](group, [(topic, [(0, 2, "v0")])]))
    assert r.topics == [(topic, [(0, 0)])]
    r = kafka_python_call(kafka, OffsetFetchRequest[0](group, [(topic, [0])]))
    assert r.topics == [(topic, [(0, 2, "v0", 0)])]
    r = kafka_python_call(kafka, OffsetCommitRequest[1](group, -1, "", [(topic, [(0, 4, -1, "v1")])]))
    assert r.topics == [(topic, [(0, 0)])]
    r = kafka_python_call(kafka, OffsetFetchRequest[0](group, [(topic, [0])]))
    assert r.topics == [(topic, [(0, 4, "v1", 0)])]

    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=kafka.bootstrap,
        api_version=(0, 10, 0),
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    try:
        got = []
        deadline = time.monotonic() + TIMEOUT
        while len(got) < 2:
            assert time.monotonic() < deadline, "timed out"
            for records in consumer.poll(timeout_ms=500).values():
                got.extend(r.offset for r in records)
        assert got == [4, 5]
    finally:
        consumer.close()


def test_old_admin_creates_and_deletes_topics(kafka):  # noqa: F811
    """kafka-python's admin client pinned to 0.10.2: CreateTopics v1 creates three
    partitions; DeleteTopics v0 is answered per topic, here `TOPIC_AUTHORIZATION_FAILED`
    (deleting needs the `manage` permission, which the anonymous principal lacks:
    docs/tenancy.md), and the topic stays."""
    topic = topic_name()
    admin = KafkaAdminClient(bootstrap_servers=kafka.bootstrap, api_version=(0, 10, 2))
    try:
        admin.create_topics([PyNewTopic(topic, num_partitions=3, replication_factor=1)], timeout_ms=TIMEOUT * 1000)
        consumer = KafkaConsumer(bootstrap_servers=kafka.bootstrap, api_version=(0, 10, 2))
        try:
            assert consumer.partitions_for_topic(topic) == {0, 1, 2}
        finally:
            consumer.close()
        with pytest.raises(TopicAuthorizationFailedError):
            admin.delete_topics([topic], timeout_ms=TIMEOUT * 1000)
        assert topic in admin.list_topics()
    finally:
        admin.close()


def test_old_producer_to_modern_consumer(kafka):  # noqa: F811
    """A record written as a 0.10.0 message set (gzip wrapper) is read by confluent-kafka
    (record batches v2) with its key, value and offset."""
    topic = topic_name()
    create_topic(kafka, topic)
    assert produce_old(kafka, topic, (0, 10, 0), 4, "gzip") == list(range(4))
    got = consume(kafka, topic, 4)
    assert [(m.offset(), m.key(), m.value()) for m in got] == [
        (i, f"k{i}".encode(), f"value {i}".encode() * 5) for i in range(4)
    ]


def test_modern_producer_to_old_consumer(kafka):  # noqa: F811
    """Records produced by confluent-kafka (a record batch v2, with headers) are read by a
    0.10.0 consumer as magic-1 messages: keys, values, offsets and timestamps exact, the
    headers dropped (message format v1 has none, as Kafka's down-conversion drops them)."""
    topic = topic_name()
    create_topic(kafka, topic)
    producer = Producer({"bootstrap.servers": kafka.bootstrap, "linger.ms": 20, "compression.type": "lz4"})
    for i in range(5):
        producer.produce(
            topic, key=f"k{i}".encode(), value=f"v{i}".encode(), partition=0,
            headers=[("h", b"x")], timestamp=1_700_000_000_000 + i,
        )
    assert producer.flush(TIMEOUT) == 0
    got, _, end = read_old(kafka, topic, (0, 10, 0), 5)
    assert [(r.offset, r.key, r.value, r.timestamp) for r in got] == [
        (i, f"k{i}".encode(), f"v{i}".encode(), 1_700_000_000_000 + i) for i in range(5)
    ]
    assert all(not r.headers for r in got)
    assert end == 5
