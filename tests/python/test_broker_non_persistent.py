"""Non-persistent topics of the embedded broker, driven by the official Python
`pulsar-client` (C++ core), as Apache Pulsar serves them: messages go to the consumers
connected when they are published, never stored; a consumer without permits misses them
(counted as drops in the admin stats); message ids are ledger 0, entry 0.

Run: python -m pytest tests/python/test_broker_non_persistent.py
"""

import uuid

import pulsar
import pytest

from test_broker_pulsar_client import _admin, _client  # noqa: F401
from test_broker_pulsar_client import broker, broker_binary  # noqa: F401 (fixtures)


def _topic():
    return f"non-persistent://public/default/np-{uuid.uuid4().hex[:12]}"


def _stats(broker, topic):
    path = "/non-persistent/" + topic.removeprefix("non-persistent://") + "/stats"
    status, body = _admin(broker, "GET", path)
    assert status == 200, body
    return body


def _drain(consumer, quiet_ms=1000):
    got = []
    while True:
        try:
            msg = consumer.receive(timeout_millis=quiet_ms)
        except pulsar.Timeout:
            return got
        got.append(msg)
        consumer.acknowledge(msg)


def test_messages_reach_connected_consumers_only_with_pulsars_ids(broker):
    client = _client(broker)
    topic = _topic()
    producer = client.create_producer(topic, batching_enabled=False)
    # Nobody subscribed yet: this one is gone for good.
    lost = producer.send(b"before")
    assert (lost.ledger_id(), lost.entry_id()) == (0, 0)
    consumer = client.subscribe(topic, "sub", initial_position=pulsar.InitialPosition.Earliest)
    for i in range(10):
        mid = producer.send(f"m-{i}".encode(), properties={"i": str(i)}, partition_key=f"k{i}")
        assert (mid.ledger_id(), mid.entry_id()) == (0, 0)
    got = []
    for _ in range(10):
        msg = consumer.receive(timeout_millis=10000)
        assert (msg.message_id().ledger_id(), msg.message_id().entry_id()) == (0, 0)
        got.append((msg.data().decode(), msg.properties(), msg.partition_key()))
        consumer.acknowledge(msg)  # accepted, and nothing to do
    assert got == [(f"m-{i}", {"i": str(i)}, f"k{i}") for i in range(10)]
    assert _drain(consumer) == []

    # A batch: one entry, the client numbers its messages.
    batcher = client.create_producer(
        topic, batching_enabled=True, batching_max_messages=5, batching_max_publish_delay_ms=50
    )
    for i in range(5):
        batcher.send_async(f"b-{i}".encode(), None)
    batcher.flush()
    batch = [consumer.receive(timeout_millis=10000) for _ in range(5)]
    assert [m.data().decode() for m in batch] == [f"b-{i}" for i in range(5)]
    assert [m.message_id().batch_index() for m in batch] == list(range(5))

    stats = _stats(broker, topic)
    assert stats["msgInCounter"] == 16
    assert stats["msgOutCounter"] == 15
    assert stats["storageSize"] == 0
    assert list(stats["subscriptions"]) == ["sub"]
    status, topics = _admin(broker, "GET", "/non-persistent/public/default")
    assert status == 200 and topic in topics
    client.close()


def test_a_consumer_without_permits_misses_messages_and_they_are_counted(broker):
    client = _client(broker)
    topic = _topic()
    consumer = client.subscribe(topic, "slow", receiver_queue_size=10)
    producer = client.create_producer(topic, batching_enabled=False)
    for i in range(50):
        producer.send(f"m-{i}".encode())
    # The client granted 10 permits and read nothing: the other 40 were dropped, not kept.
    got = [m.data().decode() for m in _drain(consumer)]
    assert got == [f"m-{i}" for i in range(10)]
    stats = _stats(broker, topic)
    assert stats["msgInCounter"] == 50
    assert stats["msgDropCounter"] == 40
    assert stats["subscriptions"]["slow"]["msgDropCounter"] == 40
    # Permits again: new messages flow.
    producer.send(b"after")
    assert consumer.receive(timeout_millis=10000).data() == b"after"
    client.close()


def test_subscription_types_as_pulsar_dispatches_them(broker):
    client = _client(broker)
    topic = _topic()
    shared = [
        client.subscribe(topic, "shared", consumer_type=pulsar.ConsumerType.Shared, consumer_name=f"s{i}")
        for i in range(2)
    ]
    keyed = [
        client.subscribe(topic, "keyed", consumer_type=pulsar.ConsumerType.KeyShared, consumer_name=f"k{i}")
        for i in range(2)
    ]
    failover = [
        client.subscribe(topic, "failover", consumer_type=pulsar.ConsumerType.Failover, consumer_name=f"f{i}")
        for i in range(2)
    ]
    exclusive = client.subscribe(topic, "exclusive")
    with pytest.raises(pulsar.ConsumerBusy):
        client.subscribe(topic, "exclusive")
    producer = client.create_producer(topic, batching_enabled=False)
    for i in range(40):
        producer.send(f"m-{i}".encode(), partition_key=f"key-{i % 8}")

    every = [f"m-{i}" for i in range(40)]
    shared_got = [[m.data().decode() for m in _drain(c)] for c in shared]
    assert sorted(shared_got[0] + shared_got[1], key=lambda s: int(s[2:])) == every
    assert all(shared_got), "round-robin gives both shared consumers some"

    keys = [{m.partition_key() for m in _drain(c)} for c in keyed]
    assert keys[0] | keys[1] == {f"key-{k}" for k in range(8)}
    assert not keys[0] & keys[1], "a key goes to one Key_Shared consumer"

    failover_got = [[m.data().decode() for m in _drain(c)] for c in failover]
    assert sorted(map(len, failover_got)) == [0, 40], "only the active consumer gets them"

    assert [m.data().decode() for m in _drain(exclusive)] == every
    client.close()


def test_a_reader_and_seek_on_a_non_persistent_topic(broker):
    client = _client(broker)
    topic = _topic()
    reader = client.create_reader(topic, pulsar.MessageId.latest)
    producer = client.create_producer(topic, batching_enabled=False)
    producer.send(b"one")
    assert reader.read_next(timeout_millis=10000).data() == b"one"
    consumer = client.subscribe(topic, "s")
    with pytest.raises(pulsar.PulsarException):
        consumer.seek(pulsar.MessageId.earliest)
    # The refused seek harmed nothing.
    producer.send(b"two")
    assert reader.read_next(timeout_millis=10000).data() == b"two"
    client.close()
