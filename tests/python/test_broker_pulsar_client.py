"""The embedded broker (`magnetar-broker` binary) driven by the official Python
`pulsar-client` (C++ core), unmodified.

Run: python -m pytest tests/python/test_broker_pulsar_client.py
The fixture builds the binary (`cargo build --release -p magnetar-broker`) unless
MAGNETAR_BROKER_BIN points at one, starts it on a free port with a temporary data
directory, and kills it at the end.
"""

import hashlib
import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pulsar
import pytest

REPO = Path(__file__).resolve().parents[2]


def _binary():
    env = os.environ.get("MAGNETAR_BROKER_BIN")
    if env:
        return Path(env)
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    binary = target / "release" / "magnetar-broker"
    build = subprocess.run(
        ["cargo", "build", "--release", "-p", "magnetar-broker"], cwd=REPO
    )
    if build.returncode != 0 and not binary.exists():
        pytest.fail("cannot build magnetar-broker")
    return binary


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BrokerProcess:
    """One broker process on a fixed port and data directory; can be killed and restarted."""

    def __init__(self, binary, data_dir):
        self.binary = binary
        self.data_dir = data_dir
        self.port = _free_port()
        self.proc = None

    @property
    def url(self):
        return f"pulsar://127.0.0.1:{self.port}"

    def start(self):
        self.proc = subprocess.Popen(
            [str(self.binary), "--listen", f"127.0.0.1:{self.port}", "--data-dir", str(self.data_dir)],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.time() + 20
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"broker exited with {self.proc.returncode}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("broker did not start listening")

    def kill9(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill9()


@pytest.fixture(scope="session")
def broker_binary():
    return _binary()


@pytest.fixture
def broker(broker_binary, tmp_path):
    b = BrokerProcess(broker_binary, tmp_path / "data")
    b.start()
    yield b
    b.kill9()


def _client(broker):
    return pulsar.Client(broker.url, operation_timeout_seconds=10)


def _topic():
    return f"persistent://public/default/py-{uuid.uuid4().hex[:12]}"


def test_round_trip_with_properties_and_key(broker):
    client = _client(broker)
    topic = _topic()
    consumer = client.subscribe(topic, "sub", initial_position=pulsar.InitialPosition.Earliest)
    producer = client.create_producer(topic, batching_enabled=False)
    for i in range(10):
        producer.send(f"hello-{i}".encode(), properties={"i": str(i), "kind": "test"}, partition_key=f"k{i}")
    for i in range(10):
        msg = consumer.receive(timeout_millis=10000)
        assert msg.data() == f"hello-{i}".encode()
        assert msg.properties() == {"i": str(i), "kind": "test"}
        assert msg.partition_key() == f"k{i}"
        assert msg.redelivery_count() == 0
        consumer.acknowledge(msg)
    client.close()


def test_batching_producer_is_consumed_in_order(broker):
    client = _client(broker)
    topic = _topic()
    consumer = client.subscribe(topic, "sub", initial_position=pulsar.InitialPosition.Earliest)
    producer = client.create_producer(
        topic, batching_enabled=True, batching_max_messages=10, batching_max_publish_delay_ms=50
    )
    sent = []
    for i in range(95):
        producer.send_async(f"b-{i}".encode(), lambda res, mid: sent.append(res))
    producer.flush()
    deadline = time.time() + 10
    while len(sent) < 95 and time.time() < deadline:
        time.sleep(0.01)
    assert sent == [pulsar.Result.Ok] * 95
    assert _receive_all(consumer, 95) == [f"b-{i}" for i in range(95)]
    client.close()


def _receive_all(consumer, n):
    """Receives and acks `n` messages, returning their payloads as text in arrival order."""
    got = []
    for _ in range(n):
        msg = consumer.receive(timeout_millis=10000)
        got.append(msg.data().decode())
        consumer.acknowledge(msg)
    return got


def test_shared_subscription_splits_messages(broker):
    client = _client(broker)
    topic = _topic()
    a = client.subscribe(topic, "shared", consumer_type=pulsar.ConsumerType.Shared, receiver_queue_size=5)
    b = client.subscribe(topic, "shared", consumer_type=pulsar.ConsumerType.Shared, receiver_queue_size=5)
    producer = client.create_producer(topic, batching_enabled=False)
    for i in range(60):
        producer.send(f"s-{i}".encode())
    got = {"a": [], "b": []}
    deadline = time.time() + 20
    while len(got["a"]) + len(got["b"]) < 60 and time.time() < deadline:
        for name, c in (("a", a), ("b", b)):
            try:
                msg = c.receive(timeout_millis=100)
            except pulsar.Timeout:
                continue
            got[name].append(msg.data().decode())
            c.acknowledge(msg)
    assert got["a"] and got["b"], got
    assert sorted(got["a"] + got["b"]) == sorted(f"s-{i}" for i in range(60))
    client.close()


def test_durable_backlog_survives_kill9(broker):
    topic = _topic()
    client = _client(broker)
    consumer = client.subscribe(topic, "durable")  # creates the subscription (Latest)
    consumer.close()
    producer = client.create_producer(topic, batching_enabled=False)
    for i in range(50):
        producer.send(f"d-{i}".encode())  # returns only after the receipt
    broker.kill9()
    try:
        client.close()  # may fail: its broker is gone
    except pulsar.PulsarException:
        pass
    broker.start()
    client = _client(broker)
    consumer = client.subscribe(topic, "durable")
    assert _receive_all(consumer, 50) == [f"d-{i}" for i in range(50)]
    client.close()


def _payload(i):
    body = f"crash-{i}-" + "x" * (i % 500)
    digest = hashlib.sha256(body.encode()).hexdigest()[:16]
    return f"{body}|{digest}".encode()


def _check(data):
    body, _, digest = data.decode().rpartition("|")
    assert hashlib.sha256(body.encode()).hexdigest()[:16] == digest, "corrupt message"
    return int(body.split("-")[1])


def test_every_receipted_message_survives_kill9_mid_stream(broker):
    topic = _topic()
    acked = []
    stop = threading.Event()

    def produce(batching):
        client = pulsar.Client(broker.url, operation_timeout_seconds=5)
        producer = client.create_producer(
            topic, batching_enabled=batching, send_timeout_millis=3000, block_if_queue_full=True
        )
        i = 0 if not batching else 1_000_000
        lock = threading.Lock()

        def done(res, _mid, n):
            if res == pulsar.Result.Ok:
                with lock:
                    acked.append(n)

        while not stop.is_set():
            producer.send_async(_payload(i), lambda res, mid, n=i: done(res, mid, n))
            i += 1
            if i % 50 == 0:
                time.sleep(0.001)
        try:
            client.close()
        except Exception:
            pass

    threads = [threading.Thread(target=produce, args=(b,)) for b in (False, True)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    broker.kill9()
    time.sleep(0.3)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    receipted = set(acked)
    assert len(receipted) > 100, "the producers made progress before the kill"

    broker.start()
    client = _client(broker)
    consumer = client.subscribe(topic, "check", initial_position=pulsar.InitialPosition.Earliest)
    seen = set()
    while True:
        try:
            msg = consumer.receive(timeout_millis=3000)
        except pulsar.Timeout:
            break
        seen.add(_check(msg.data()))
        consumer.acknowledge(msg)
    missing = receipted - seen
    print(f"kill -9 mid-stream: {len(receipted)} receipted, {len(seen)} recovered")
    assert not missing, f"{len(missing)} receipted messages lost, e.g. {sorted(missing)[:5]}"
    client.close()
