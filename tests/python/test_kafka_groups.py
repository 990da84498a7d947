"""Kafka consumer groups and committed offsets on a real gateway with its embedded broker:
librdkafka (confluent-kafka) group consumers, eager and cooperative-sticky, static
membership, the Admin API's group calls, and kafka-python's protocol layer for bad input.

The coordinator's initial rebalance delay is shortened (plugin option
`initial_rebalance_delay_ms`) so that a first join completes in a fraction of a second, as
tests of Kafka brokers do. Every wait is bounded; every client is closed by its test.
"""
import subprocess
import time
import uuid

import pytest
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from test_kafka import KafkaGateway, create_topic, topic_name

TIMEOUT = 30


class GroupGateway(KafkaGateway):
    """A Kafka gateway whose group coordinator waits 300 ms for more members on a first
    join (Kafka's default is 3 s)."""

    def __init__(self, tmp):
        super().__init__(tmp)
        self.config.write_text(
            self.config.read_text() + "initial_rebalance_delay_ms = 300\n"
        )


@pytest.fixture
def kafka(tmp_path):
    gw = GroupGateway(tmp_path).start()
    try:
        yield gw
    finally:
        gw.stop()


def group_name() -> str:
    return f"g-{uuid.uuid4().hex[:10]}"


def produce(gw, topic: str, count: int, partitions: int = 1, start: int = 0) -> None:
    producer = Producer({"bootstrap.servers": gw.bootstrap, "linger.ms": 5})
    for n in range(start, start + count):
        producer.produce(topic, value=f"v{n}".encode(), partition=n % partitions)
    assert producer.flush(TIMEOUT) == 0


def consumer(gw, group: str, **config) -> Consumer:
    return Consumer(
        {
            "bootstrap.servers": gw.bootstrap,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "session.timeout.ms": 10000,
            "heartbeat.interval.ms": 500,
            **config,
        }
    )


def poll_until(consumers, done, timeout: float = TIMEOUT) -> list:
    """Polls every consumer until `done(messages received so far)`; those messages."""
    got = []
    deadline = time.monotonic() + timeout
    while not done(got):
        assert time.monotonic() < deadline, "timed out"
        for c in consumers:
            msg = c.poll(0.1)
            if msg is not None and msg.error() is None:
                got.append(msg)
    return got


def assigned(c) -> set:
    return {(tp.topic, tp.partition) for tp in c.assignment()}


def test_group_consumer_receives_produced_records_and_commits(kafka):
    topic, group = topic_name(), group_name()
    create_topic(kafka, topic)
    produce(kafka, topic, 10)
    c = consumer(kafka, group)
    try:
        c.subscribe([topic])
        got = poll_until([c], lambda got: len(got) >= 10)
        assert [m.offset() for m in got] == list(range(10))
        assert [m.value() for m in got] == [f"v{n}".encode() for n in range(10)]
        c.commit(asynchronous=False)
        committed = c.committed([TopicPartition(topic, 0)], timeout=TIMEOUT)
        assert committed[0].offset == 10
        # Exact lag: the high watermark minus the committed offset.
        produce(kafka, topic, 3, start=10)
        low, high = c.get_watermark_offsets(TopicPartition(topic, 0), timeout=TIMEOUT)
        assert (low, high) == (0, 13)
        assert high - committed[0].offset == 3
    finally:
        c.close()


def test_kcat_balanced_consumer_reads_and_commits(kafka):
    """kcat -G (librdkafka 2.0's high-level consumer in Debian's kcat) reads what was
    produced; its committed offsets are the group's for the next consumer."""
    topic, group = topic_name(), group_name()
    create_topic(kafka, topic, partitions=2)
    produce(kafka, topic, 6, partitions=2)
    out = subprocess.run(
        ["kcat", "-b", kafka.bootstrap, "-G", group, "-e", "-q", "-f", "%p:%o:%s\\n",
         "-X", "auto.offset.reset=earliest", "-X", "enable.auto.commit=true",
         "-X", "auto.commit.interval.ms=100", topic],
        capture_output=True,
        timeout=TIMEOUT * 2,
        check=True,
    ).stdout.decode()
    got = sorted(tuple(line.split(":")) for line in out.split())
    assert got == sorted((str(n % 2), str(n // 2), f"v{n}") for n in range(6))
    c = consumer(kafka, group)
    try:
        committed = c.committed(
            [TopicPartition(topic, 0), TopicPartition(topic, 1)], timeout=TIMEOUT
        )
        assert [tp.offset for tp in committed] == [3, 3]
    finally:
        c.close()


@pytest.mark.parametrize("strategy", ["range", "cooperative-sticky"])
def test_a_second_consumer_splits_the_partitions(kafka, strategy):
    topic, group = topic_name(), group_name()
    create_topic(kafka, topic, partitions=4)
    everything = {(topic, p) for p in range(4)}
    a = consumer(kafka, group, **{"partition.assignment.strategy": strategy})
    b = consumer(kafka, group, **{"partition.assignment.strategy": strategy})
    try:
        a.subscribe([topic])
        poll_until([a], lambda _: assigned(a) == everything)
        b.subscribe([topic])
        poll_until(
            [a, b],
            lambda _: len(assigned(a)) == 2 and len(assigned(b)) == 2,
        )
        assert assigned(a) | assigned(b) == everything
        assert not assigned(a) & assigned(b)
        # Each reads exactly its own partitions' records.
        produce(kafka, topic, 8, partitions=4)
        got = poll_until([a, b], lambda got: len(got) >= 8)
        assert sorted((m.partition(), m.offset()) for m in got) == sorted(
            (p, o) for p in range(4) for o in range(2)
        )
    finally:
        a.close()
        b.close()


def read_and_commit(gw, group: str, topic: str, count: int) -> list:
    """A group consumer reads `count` records, commits synchronously after each, closes."""
    c = consumer(gw, group)
    try:
        c.subscribe([topic])
        got = []
        deadline = time.monotonic() + TIMEOUT
        while len(got) < count:
            assert time.monotonic() < deadline, "timed out"
            msg = c.poll(0.1)
            if msg is None or msg.error() is not None:
                continue
            got.append(msg.offset())
            c.commit(message=msg, asynchronous=False)
        return got
    finally:
        c.close()


def test_a_restarted_consumer_resumes_after_its_committed_offset_across_a_gateway_kill9(
    tmp_path,
):
    gw = GroupGateway(tmp_path).start()
    try:
        topic, group = topic_name(), group_name()
        create_topic(gw, topic)
        produce(gw, topic, 10)
        assert read_and_commit(gw, group, topic, 4) == [0, 1, 2, 3]
        # Same group, new consumer: on from the committed offset.
        assert read_and_commit(gw, group, topic, 3) == [4, 5, 6]
        # A commit is answered once stored: kill -9 loses none.
        gw.kill9()
        gw.start()
        # After the restart the committed offset (7) is still there.
        assert read_and_commit(gw, group, topic, 3) == [7, 8, 9]
    finally:
        gw.stop()


def test_a_static_member_rejoins_without_a_rebalance(kafka):
    topic, group = topic_name(), group_name()
    create_topic(kafka, topic, partitions=4)
    revoked = []
    b = consumer(kafka, group, **{"group.instance.id": "b"})
    a = consumer(kafka, group, **{"group.instance.id": "a"})
    a2 = None
    try:
        a.subscribe([topic])
        b.subscribe([topic], on_revoke=lambda c, parts: revoked.append(list(parts)))
        poll_until([a, b], lambda _: len(assigned(a)) == 2 and len(assigned(b)) == 2)
        mine = assigned(a)
        revoked.clear()
        # A static member leaves no group on close (KIP-345): its instance comes back.
        a.close()
        a = None
        a2 = consumer(kafka, group, **{"group.instance.id": "a"})
        a2.subscribe([topic])
        poll_until([a2, b], lambda _: assigned(a2) == mine)
        # B kept polling throughout and was never asked to give anything up.
        end = time.monotonic() + 2
        while time.monotonic() < end:
            b.poll(0.1)
            a2.poll(0.1)
        assert revoked == []
        assert len(assigned(b)) == 2
    finally:
        for c in (a, a2, b):
            if c is not None:
                c.close()


def test_admin_lists_describes_and_deletes_groups(kafka):
    topic, group = topic_name(), group_name()
    create_topic(kafka, topic)
    admin = AdminClient({"bootstrap.servers": kafka.bootstrap})
    c = consumer(kafka, group)
    try:
        c.subscribe([topic])
        poll_until([c], lambda _: len(assigned(c)) == 1)
        produce(kafka, topic, 1)
        poll_until([c], lambda got: len(got) >= 1)
        c.commit(asynchronous=False)

        listed = admin.list_consumer_groups().result(timeout=TIMEOUT)
        states = {g.group_id: g.state.name for g in listed.valid}
        assert states.get(group) == "STABLE", states

        described = admin.describe_consumer_groups([group])[group].result(timeout=TIMEOUT)
        assert described.state.name == "STABLE"
        assert len(described.members) == 1
        member = described.members[0]
        assert [(tp.topic, tp.partition) for tp in member.assignment.topic_partitions] == [
            (topic, 0)
        ]

        # A group with members cannot be deleted.
        with pytest.raises(KafkaException) as err:
            admin.delete_consumer_groups([group])[group].result(timeout=TIMEOUT)
        assert err.value.args[0].code() == 68  # NON_EMPTY_GROUP
    finally:
        c.close()  # a dynamic member leaves (LeaveGroup)

    admin.delete_consumer_groups([group])[group].result(timeout=TIMEOUT)
    listed = admin.list_consumer_groups().result(timeout=TIMEOUT)
    assert group not in {g.group_id for g in listed.valid}
    # Its committed offsets went with it.
    again = consumer(kafka, group)
    try:
        committed = again.committed([TopicPartition(topic, 0)], timeout=TIMEOUT)
        assert committed[0].offset < 0
    finally:
        again.close()


def kafka_python_call(gw, request):
    """Sends one request with kafka-python's protocol layer; its response."""
    from kafka.client_async import KafkaClient

    client = KafkaClient(bootstrap_servers=gw.bootstrap, api_version=(2, 0))
    try:
        node = None
        deadline = time.monotonic() + TIMEOUT
        while node is None or not client.ready(node):
            assert time.monotonic() < deadline, "no connection"
            node = client.least_loaded_node()
            if node is not None:
                client.ready(node)
            client.poll(timeout_ms=100)
        future = client.send(node, request)
        client.poll(future=future, timeout_ms=TIMEOUT * 1000)
        assert future.succeeded(), future.exception
        return future.value
    finally:
        client.close()


def test_bad_generation_and_member_id_get_kafka_error_codes(kafka):
    from kafka.protocol.commit import OffsetCommitRequest
    from kafka.protocol.group import HeartbeatRequest, JoinGroupRequest

    group = group_name()
    joined = kafka_python_call(
        kafka,
        JoinGroupRequest[0](
            group=group,
            session_timeout=10000,
            member_id="",
            protocol_type="consumer",
            group_protocols=[("range", b"")],
        ),
    )
    assert joined.error_code == 0
    assert joined.generation_id == 1
    member = joined.member_id

    def heartbeat(generation, member_id):
        return kafka_python_call(
            kafka,
            HeartbeatRequest[0](group=group, generation_id=generation, member_id=member_id),
        ).error_code

    assert heartbeat(1, "not-a-member") == 25  # UNKNOWN_MEMBER_ID
    assert heartbeat(2, member) == 22  # ILLEGAL_GENERATION
    # Joined but never synced: the group is CompletingRebalance, the heartbeat is fine.
    assert heartbeat(1, member) == 0

    commit = kafka_python_call(
        kafka,
        OffsetCommitRequest[2](
            consumer_group=group,
            consumer_group_generation_id=7,
            consumer_id=member,
            retention_time=-1,
            topics=[("t", [(0, 5, "")])],
        ),
    )
    assert commit.topics[0][1][0][1] == 22  # ILLEGAL_GENERATION
    unknown = kafka_python_call(
        kafka,
        HeartbeatRequest[0](group=group_name(), generation_id=1, member_id=member),
    )
    assert unknown.error_code == 25


def test_a_group_of_three_on_six_partitions_loses_and_repeats_nothing_when_one_leaves(kafka):
    """Synchronous commits after every record; one member leaves mid-stream; every record
    is read exactly once by the group."""
    topic, group = topic_name(), group_name()
    create_topic(kafka, topic, partitions=6)
    produce(kafka, topic, 60, partitions=6)
    members = [consumer(kafka, group) for _ in range(3)]
    seen = []
    try:
        for c in members:
            c.subscribe([topic])

        def drain(consumers, until):
            deadline = time.monotonic() + TIMEOUT
            while not until():
                assert time.monotonic() < deadline, f"timed out with {len(seen)} records"
                for c in consumers:
                    msg = c.poll(0.05)
                    if msg is None or msg.error() is not None:
                        continue
                    # Counted once committed: a record whose commit a rebalance refused
                    # is read again by the partition's next owner, as in Kafka.
                    try:
                        c.commit(message=msg, asynchronous=False)
                    except KafkaException:
                        continue
                    seen.append((msg.partition(), msg.offset()))

        drain(members, lambda: len(seen) >= 20 and all(len(assigned(c)) == 2 for c in members))
        members[2].close()  # leaves the group
        members = members[:2]
        produce(kafka, topic, 60, partitions=6, start=60)
        drain(members, lambda: len(seen) >= 120)
        assert sorted(seen) == sorted((p, o) for p in range(6) for o in range(20))
    finally:
        for c in members:
            c.close()
