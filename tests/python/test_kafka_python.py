"""The Kafka plugin against kafka-python pinned to the protocol of older brokers: with
`api_version` set, the client skips ApiVersions and speaks the request versions of that
Kafka release (0.11: Produce v3, Fetch v5, ListOffsets v2, Metadata v4; 1.0: Produce v5,
Fetch v6; 2.0: Produce v6, Fetch v8, ListOffsets v3). Each test produces keyed records
with headers and reads them back from the first offset on a real gateway.

0.10.x (Produce v2, Fetch v2/v3, magic-1 message sets on the wire) is
test_kafka_old.py.
"""
import time

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from test_kafka import TIMEOUT, create_topic, kafka, topic_name  # noqa: F401 (fixture)


@pytest.mark.parametrize("codec", [None, "gzip", "snappy", "lz4"], ids=lambda c: c or "none")
@pytest.mark.parametrize("api_version", [(0, 11), (1, 0), (2, 0)], ids=lambda v: ".".join(map(str, v)))
def test_pinned_version_round_trip(kafka, api_version, codec):  # noqa: F811 (fixture)
    """Every codec kafka-python has at these versions (zstd needs Produce v7, Kafka 2.1)."""
    topic = topic_name()
    create_topic(kafka, topic)
    producer = KafkaProducer(
        bootstrap_servers=kafka.bootstrap,
        api_version=api_version,
        acks="all",
        linger_ms=20,
        compression_type=codec,
    )
    try:
        futures = [
            producer.send(topic, key=f"k{i}".encode(), value=f"v{i}".encode(), headers=[("n", str(i).encode())], partition=0)
            for i in range(10)
        ]
        producer.flush(timeout=TIMEOUT)
        assert [f.get(timeout=TIMEOUT).offset for f in futures] == list(range(10))
    finally:
        producer.close(timeout=TIMEOUT)

    consumer = KafkaConsumer(
        bootstrap_servers=kafka.bootstrap,
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
        while len(got) < 10 and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=1000).values():
                got.extend(records)
        assert [(r.offset, r.key, r.value) for r in got] == [
            (i, f"k{i}".encode(), f"v{i}".encode()) for i in range(10)
        ]
        assert [list(r.headers) for r in got][3] == [("n", b"3")]
        assert consumer.end_offsets([tp]) == {tp: 10}
    finally:
        consumer.close()


@pytest.mark.parametrize("api_version", [(0, 11), (1, 0), (2, 0)], ids=lambda v: ".".join(map(str, v)))
def test_pinned_version_group_consumer_commits_and_resumes(kafka, api_version):  # noqa: F811
    """A kafka-python group consumer (JoinGroup v2/v3, SyncGroup v1/v2, OffsetCommit
    v3/v4, OffsetFetch v3/v4 at these versions) reads, commits synchronously, and the next
    consumer of the group starts after the commit."""
    topic = topic_name()
    group = f"g-{topic}"
    create_topic(kafka, topic)
    producer = KafkaProducer(bootstrap_servers=kafka.bootstrap, api_version=api_version)
    try:
        for i in range(6):
            producer.send(topic, value=f"v{i}".encode(), partition=0)
        producer.flush(timeout=TIMEOUT)
    finally:
        producer.close(timeout=TIMEOUT)

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
