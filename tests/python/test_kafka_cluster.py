"""Two gateways on one backend share a Kafka consumer group and survive the kill -9 of the
group's coordinator (docs/kafka.md section 2).

`magnetar-broker` runs alone (killing a gateway must not kill the backend); two `magnetar`
gateways (`[cluster] node_id` 1 and 2) reach it through `[backend] service_url` and its
admin API through `admin_url`. A librdkafka (confluent-kafka) group of two members, each
bootstrapped with both gateways, consumes a partitioned topic, committing synchronously
after every record. Then the gateway coordinating the group is killed with SIGKILL: the
survivor must be the coordinator within the session timeout, no committed offset may be
lost, every record must be read at least once, and no record before a partition's last
synchronous commit may be read again.

Every process is stopped by the test, pass or fail; every wait is bounded.
"""
import os
import subprocess
import time
import uuid

import pytest
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from conftest import MAGNETAR, free_ports, stop_process, wait_for_port
from test_broker_pulsar_client import BrokerProcess, _binary

TIMEOUT = 60
SESSION_TIMEOUT_MS = 10_000
PARTITIONS = 4
RECORDS = 200


class ClusterGateway:
    """A gateway without an embedded broker, node `node_id`, with one Kafka listener."""

    def __init__(self, tmp, broker, node_id: int):
        self.tmp = tmp
        self.node_id = node_id
        self.kafka_port, self.admin_port = free_ports(2)
        self.log = tmp / f"gateway-{node_id}.log"
        self.config = tmp / f"gateway-{node_id}.toml"
        self.config.write_text(
            "[broker]\nembedded = false\n\n"
            f'[backend]\nservice_url = "{broker.url}"\n'
            f'admin_url = "http://127.0.0.1:{broker.admin_port}"\n\n'
            f"[cluster]\nnode_id = {node_id}\n\n"
            f'[admin]\nlisten = "127.0.0.1:{self.admin_port}"\n\n'
            f'[[listeners]]\nname = "kafka"\nbind = "127.0.0.1:{self.kafka_port}"\n'
            'plugin = "kafka"\n\n'
            "[plugins.config.kafka]\n"
            f"advertised_port = {self.kafka_port}\n"
            "initial_rebalance_delay_ms = 300\n"
        )
        self.proc = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.kafka_port}"

    def start(self) -> "ClusterGateway":
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [MAGNETAR, "--config", str(self.config), "--data-dir", str(self.tmp / f"data-{self.node_id}")],
                stdout=subprocess.DEVNULL,
                stderr=log,
                env={**os.environ, "RUST_LOG": "info"},
            )
        wait_for_port(self.kafka_port, self.proc, self.log)
        return self

    def kill9(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        stop_process(self.proc)


@pytest.fixture
def cluster(tmp_path):
    broker = BrokerProcess(_binary(), tmp_path / "broker")
    gateways = []
    try:
        broker.start()
        for node_id in (1, 2):
            gateways.append(ClusterGateway(tmp_path, broker, node_id).start())
        yield gateways
    finally:
        for gw in gateways:
            gw.stop()
        broker.stop()


def consumer(bootstrap: str, group: str) -> Consumer:
    return Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "session.timeout.ms": SESSION_TIMEOUT_MS,
            "heartbeat.interval.ms": 500,
            "reconnect.backoff.max.ms": 1000,
            "topic.metadata.refresh.interval.ms": 2000,
        }
    )


def coordinator_of(bootstrap: str, group: str):
    """The node id the gateway at `bootstrap` names as the group's coordinator (or None).
    A short request timeout: a gateway that still names the killed one makes the call
    fail (connection refused, retried until the timeout), so the timeout bounds how late a
    takeover is seen."""
    admin = AdminClient({"bootstrap.servers": bootstrap, "reconnect.backoff.max.ms": 1000})
    try:
        futures = admin.describe_consumer_groups([group], request_timeout=1)
        return futures[group].result(timeout=10).coordinator.id
    except KafkaException:
        return None


class Reader:
    """Polls consumers, commits each record synchronously, and keeps what happened."""

    def __init__(self, consumers):
        self.consumers = consumers
        # (partition, offset, value, time read) of every record, in order.
        self.read = []
        # partition -> the next offset of the last successful synchronous commit.
        self.committed = {}
        # Records read again although a synchronous commit past them had succeeded.
        self.reread = []

    def poll_until(self, done, timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, f"timed out; read {len(self.read)}"
            for c in self.consumers:
                msg = c.poll(0.1)
                if msg is None or msg.error() is not None:
                    continue
                p, offset = msg.partition(), msg.offset()
                if offset < self.committed.get(p, 0):
                    self.reread.append((p, offset, self.committed[p]))
                self.read.append((p, offset, msg.value().decode(), time.monotonic()))
                try:
                    c.commit(message=msg, asynchronous=False)
                except KafkaException:
                    # Not committed (the coordinator moved meanwhile): read again later.
                    continue
                self.committed[p] = max(self.committed.get(p, 0), offset + 1)

    def values(self) -> set:
        return {v for _, _, v, _ in self.read}


def test_two_gateways_share_a_group_and_survive_the_coordinators_kill9(cluster):
    gw1, gw2 = cluster
    topic = f"k-{uuid.uuid4().hex[:12]}"
    group = f"g-{uuid.uuid4().hex[:10]}"
    admin = AdminClient({"bootstrap.servers": gw1.bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=PARTITIONS, replication_factor=1)])[topic].result(
        timeout=TIMEOUT
    )
    producer = Producer({"bootstrap.servers": gw2.bootstrap, "linger.ms": 5})
    for n in range(RECORDS):
        producer.produce(topic, value=f"v{n}".encode(), partition=n % PARTITIONS)
    assert producer.flush(TIMEOUT) == 0

    # Each member knows both gateways, one first.
    members = [
        consumer(f"{gw1.bootstrap},{gw2.bootstrap}", group),
        consumer(f"{gw2.bootstrap},{gw1.bootstrap}", group),
    ]
    try:
        for c in members:
            c.subscribe([topic])
        reader = Reader(members)
        reader.poll_until(lambda: len(reader.values()) >= RECORDS // 2)

        # Both gateways name the same coordinator, one of the two.
        deadline = time.monotonic() + TIMEOUT
        while True:
            seen = {coordinator_of(gw.bootstrap, group) for gw in (gw1, gw2)}
            if len(seen) == 1 and seen <= {1, 2}:
                break
            assert time.monotonic() < deadline, f"coordinators named: {seen}"
            time.sleep(0.1)
        owner_id = seen.pop()
        owner, survivor = (gw1, gw2) if owner_id == 1 else (gw2, gw1)
        committed_before = dict(reader.committed)
        read_before = len(reader.read)

        owner.kill9()
        killed_at = time.monotonic()
        # The survivor coordinates the group within the session timeout.
        while coordinator_of(survivor.bootstrap, group) != survivor.node_id:
            assert time.monotonic() - killed_at < SESSION_TIMEOUT_MS / 1000, (
                "the survivor did not take the group over within the session timeout:\n"
                + survivor.log.read_text()[-4000:]
            )
            time.sleep(0.1)
        took_over = time.monotonic() - killed_at

        # No committed offset is lost: the survivor serves every one committed before.
        probe = Consumer({"bootstrap.servers": survivor.bootstrap, "group.id": group})
        try:
            parts = probe.committed([TopicPartition(topic, p) for p in range(PARTITIONS)], timeout=TIMEOUT)
        finally:
            probe.close()
        stored = {tp.partition: tp.offset for tp in parts}
        for p, offset in committed_before.items():
            assert stored[p] >= offset, f"partition {p}: committed {offset}, now {stored[p]}"

        # The group goes on and reads the rest.
        reader.poll_until(lambda: reader.values() >= {f"v{n}" for n in range(RECORDS)})
        after = reader.read[read_before:]
        # Nothing before a partition's last synchronous commit is read again: not after the
        # kill (the survivor resumed from the commits), not at any time.
        for p, offset, value, _ in after:
            assert offset >= committed_before.get(p, 0), (
                f"{value} (partition {p}, offset {offset}) read again after the commit of {committed_before.get(p)}"
            )
        assert reader.reread == [], "read again after a synchronous commit past them"
        print(f"took over in {took_over:.2f} s; read {len(reader.read)} records for {RECORDS}")
    finally:
        for c in members:
            c.close()
