"""The embedded broker (`magnetar-broker` binary) driven by the official Python
`pulsar-client` (C++ core), unmodified.

Run: python -m pytest tests/python/test_broker_pulsar_client.py
The fixture builds the binary (`cargo build --release -p magnetar-broker`) unless
MAGNETAR_BROKER_BIN points at one, starts it on a free port with a temporary data
directory, and kills it at the end.
"""

import base64
import hashlib
import hmac
import json
import os
import random
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
    """A free loopback port below the kernel's ephemeral range (32768-60999 by default).

    A port from the ephemeral range can be taken, while a killed broker restarts, by a
    client's own outgoing socket (a reconnecting client may even connect to itself), which
    made restarts fail with "Address already in use".
    """
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


class BrokerProcess:
    """One broker process on a fixed port and data directory; can be killed and restarted."""

    def __init__(self, binary, data_dir, args=()):
        self.binary = binary
        self.data_dir = data_dir
        self.args = list(args)
        self.port = _free_port()
        self.admin_port = _free_port()
        self.log = Path(str(data_dir) + ".log")
        self.proc = None

    @property
    def url(self):
        return f"pulsar://127.0.0.1:{self.port}"

    @property
    def admin_url(self):
        return f"http://127.0.0.1:{self.admin_port}/admin/v2"

    def start(self, env=None):
        # The broker itself retries a port still in use for 5 s; two more attempts cover a
        # slower release. The previous process is always reaped before (see kill9/stop).
        for attempt in range(3):
            with open(self.log, "ab") as log:
                self.proc = subprocess.Popen(
                    [str(self.binary), "--listen", f"127.0.0.1:{self.port}", "--data-dir", str(self.data_dir)]
                    + ["--admin-listen", f"127.0.0.1:{self.admin_port}"]
                    + self.args,
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                    env=env,
                )
            deadline = time.time() + 20
            while time.time() < deadline:
                if self.proc.poll() is not None:
                    break
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                    return
                except OSError:
                    time.sleep(0.05)
            tail = self.log.read_text(errors="replace")[-2000:]
            if self.proc.poll() is None:
                self.kill9()
                raise RuntimeError(f"broker did not start listening:\n{tail}")
            if "Address already in use" not in tail or attempt == 2:
                raise RuntimeError(f"broker exited with {self.proc.returncode}:\n{tail}")
            time.sleep(0.5)

    def kill9(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        if self.proc:
            self.proc.wait()  # reaped: its sockets and files are released

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


def _crash_and_restart(broker, client):
    """kill -9 of the broker, then a restart on the same data; returns a new client (the old
    one's close may fail: its broker is gone)."""
    broker.kill9()
    try:
        client.close()
    except pulsar.PulsarException:
        pass
    broker.start()
    return _client(broker)


def _receive_until_quiet(consumer, value=lambda msg: msg.data().decode(), quiet_ms=2000):
    """Receives and acks until nothing comes for `quiet_ms`; returns `value` of each message."""
    got = []
    while True:
        try:
            msg = consumer.receive(timeout_millis=quiet_ms)
        except pulsar.Timeout:
            return got
        got.append(value(msg))
        consumer.acknowledge(msg)


def _receive_from_each(consumers, n, value=lambda msg: msg.data().decode(), seconds=20):
    """Receives and acks up to `n` messages in all from `consumers` (name -> consumer), taking
    turns; returns name -> `value` of each message in arrival order."""
    got = {name: [] for name in consumers}
    deadline = time.time() + seconds
    while sum(map(len, got.values())) < n and time.time() < deadline:
        for name, c in consumers.items():
            try:
                msg = c.receive(timeout_millis=50)
            except pulsar.Timeout:
                continue
            got[name].append(value(msg))
            c.acknowledge(msg)
    return got


def test_shared_subscription_splits_messages(broker):
    client = _client(broker)
    topic = _topic()
    a = client.subscribe(topic, "shared", consumer_type=pulsar.ConsumerType.Shared, receiver_queue_size=5)
    b = client.subscribe(topic, "shared", consumer_type=pulsar.ConsumerType.Shared, receiver_queue_size=5)
    producer = client.create_producer(topic, batching_enabled=False)
    for i in range(60):
        producer.send(f"s-{i}".encode())
    got = _receive_from_each({"a": a, "b": b}, 60)
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
    client = _crash_and_restart(broker, client)
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
    seen = set(_receive_until_quiet(consumer, lambda msg: _check(msg.data()), quiet_ms=3000))
    missing = receipted - seen
    print(f"kill -9 mid-stream: {len(receipted)} receipted, {len(seen)} recovered")
    assert not missing, f"{len(missing)} receipted messages lost, e.g. {sorted(missing)[:5]}"
    client.close()


# --- token authentication ---------------------------------------------------------------

SECRET = b"magnetar-test-secret-0123456789abcdef"


def _b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _jwt(claims, secret=SECRET, alg="HS256"):
    header = _b64url(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    body = _b64url(json.dumps(claims).encode())
    signing_input = f"{header}.{body}".encode()
    if alg == "none":
        return f"{header}.{body}."
    sig = hmac.new(secret, signing_input, hashlib.sha256).digest()
    return f"{header}.{body}.{_b64url(sig)}"


@pytest.fixture
def auth_broker(broker_binary, tmp_path):
    secret_file = tmp_path / "secret.key"
    # Pulsar's inline form of a secret key: `data:;base64,...`.
    secret_file.write_text("data:;base64," + base64.b64encode(SECRET).decode())
    b = BrokerProcess(
        broker_binary,
        tmp_path / "data",
        ["--token-secret-file", str(secret_file), "--superuser", "admin", "--tenant-role", "alice=acme"],
    )
    b.start()
    yield b
    b.kill9()


def _admin(broker, method, path, body=None, token=None):
    """One admin REST call; returns (status, decoded JSON body or None)."""
    import urllib.error
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(broker.admin_url + path, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw = resp.read()
            return resp.status, (json.loads(raw) if raw else None)
    except urllib.error.HTTPError as e:
        raw = e.read()
        return e.code, (json.loads(raw) if raw else None)


def _token_client(broker, token):
    auth = pulsar.AuthenticationToken(token) if token is not None else None
    return pulsar.Client(broker.url, authentication=auth, operation_timeout_seconds=2)


def test_token_auth_admits_valid_tokens_and_refuses_the_rest(auth_broker):
    topic = f"persistent://acme/ns/auth-{uuid.uuid4().hex[:8]}"
    alice = _token_client(auth_broker, _jwt({"sub": "alice", "exp": int(time.time()) + 600}))
    consumer = alice.subscribe(topic, "s", initial_position=pulsar.InitialPosition.Earliest)
    producer = alice.create_producer(topic)
    producer.send(b"hello")
    assert consumer.receive(timeout_millis=5000).data() == b"hello"
    # Another tenant's topic: authenticated, but not authorized.
    with pytest.raises(pulsar.PulsarException) as denied:
        alice.create_producer("persistent://globex/ns/secret")
    assert "Authoriz" in str(denied.value), denied.value
    with pytest.raises(pulsar.PulsarException):
        alice.subscribe("persistent://globex/ns/secret", "s")
    alice.close()

    admin = _token_client(auth_broker, _jwt({"sub": "admin"}))
    admin.create_producer("persistent://globex/ns/secret").send(b"x")
    watcher = admin.subscribe(topic, "watch", initial_position=pulsar.InitialPosition.Earliest)

    refused = {
        "wrong signature": _jwt({"sub": "alice"}, secret=b"another secret"),
        "expired": _jwt({"sub": "alice", "exp": int(time.time()) - 10}),
        "alg none": _jwt({"sub": "admin"}, alg="none"),
        "no token": None,
    }
    for why, token in refused.items():
        client = _token_client(auth_broker, token)
        with pytest.raises(pulsar.PulsarException) as err:
            client.create_producer(topic)
        # The C++ client retries a refused connection until its operation timeout.
        assert isinstance(err.value, (pulsar.AuthenticationError, pulsar.ConnectError, pulsar.Timeout)), (
            why,
            err.value,
        )
        client.close()
    # Nothing the refused clients tried reached the topic.
    assert watcher.receive(timeout_millis=5000).data() == b"hello"
    with pytest.raises(pulsar.Timeout):
        watcher.receive(timeout_millis=300)
    admin.close()

    # The admin API takes the same tokens.
    assert _admin(auth_broker, "GET", "/tenants")[0] == 401
    alice_token = _jwt({"sub": "alice"})
    status, tenants = _admin(auth_broker, "GET", "/tenants", token=alice_token)
    assert status == 200 and tenants == ["acme"], tenants
    assert _admin(auth_broker, "PUT", "/tenants/globex2", token=alice_token)[0] == 403
    assert _admin(auth_broker, "PUT", "/tenants/globex2", token=_jwt({"sub": "admin"}))[0] == 204


# --- negative acks, redelivery, seek, readers --------------------------------------------


def test_negative_ack_redelivers_with_growing_count(broker):
    client = _client(broker)
    topic = _topic()
    for kind in (pulsar.ConsumerType.Shared, pulsar.ConsumerType.Exclusive):
        sub = f"nack-{kind}"
        consumer = client.subscribe(
            topic, sub, consumer_type=kind, negative_ack_redelivery_delay_ms=100,
            initial_position=pulsar.InitialPosition.Earliest,
        )
        if kind == pulsar.ConsumerType.Shared:
            producer = client.create_producer(topic, batching_enabled=False)
            for i in range(3):
                producer.send(f"n-{i}".encode())
        first = consumer.receive(timeout_millis=5000)
        assert first.data() == b"n-0" and first.redelivery_count() == 0
        consumer.negative_acknowledge(first)
        rest = [consumer.receive(timeout_millis=5000) for _ in range(2)]
        for m in rest:
            consumer.acknowledge(m)
        assert sorted(m.data() for m in rest) == [b"n-1", b"n-2"]
        again = consumer.receive(timeout_millis=5000)
        assert again.data() == b"n-0"
        assert again.redelivery_count() == 1
        consumer.negative_acknowledge(again)
        third = consumer.receive(timeout_millis=5000)
        assert third.data() == b"n-0" and third.redelivery_count() == 2
        consumer.acknowledge(third)
        with pytest.raises(pulsar.Timeout):
            consumer.receive(timeout_millis=300)
        consumer.close()
    client.close()


def test_ack_of_unknown_message_id_is_harmless(broker):
    client = _client(broker)
    topic = _topic()
    consumer = client.subscribe(topic, "s", initial_position=pulsar.InitialPosition.Earliest)
    producer = client.create_producer(topic, batching_enabled=False)
    producer.send(b"a")
    msg = consumer.receive(timeout_millis=5000)
    bogus = pulsar.MessageId(-1, 424242, 999999, -1)
    consumer.acknowledge(bogus)
    consumer.acknowledge(msg)
    producer.send(b"b")
    assert consumer.receive(timeout_millis=5000).data() == b"b"
    client.close()


def _produce_spaced(client, topic, n, gap_after):
    """Sends n non-batched messages, pausing after `gap_after`; returns their message ids."""
    producer = client.create_producer(topic, batching_enabled=False)
    ids = []
    for i in range(n):
        ids.append(producer.send(f"m-{i}".encode()))
        if i == gap_after:
            time.sleep(0.2)
    producer.close()
    return ids


def test_seek_by_message_id_and_by_publish_time(broker):
    client = _client(broker)
    topic = _topic()
    consumer = client.subscribe(topic, "seeker", initial_position=pulsar.InitialPosition.Earliest)
    _produce_spaced(client, topic, 10, gap_after=5)
    got = [consumer.receive(timeout_millis=5000) for _ in range(10)]
    for m in got:
        consumer.acknowledge(m)
    assert [m.data().decode() for m in got] == [f"m-{i}" for i in range(10)]

    # As with Apache Pulsar, a consumer resumes after the message id it seeks to.
    consumer.seek(got[3].message_id())
    assert _receive_all(consumer, 6) == [f"m-{i}" for i in range(4, 10)]

    between = (got[5].publish_timestamp() + got[6].publish_timestamp()) // 2
    assert got[5].publish_timestamp() < between < got[6].publish_timestamp()
    consumer.seek(between)
    assert _receive_all(consumer, 4) == [f"m-{i}" for i in range(6, 10)]

    consumer.seek(pulsar.MessageId.earliest)
    assert _receive_all(consumer, 10) == [f"m-{i}" for i in range(10)]
    with pytest.raises(pulsar.Timeout):
        consumer.receive(timeout_millis=300)
    client.close()


def test_readers_last_message_id_and_message_available(broker):
    client = _client(broker)
    topic = _topic()
    empty = client.create_reader(topic, pulsar.MessageId.earliest)
    assert not empty.has_message_available()
    ids = _produce_spaced(client, topic, 5, gap_after=-1)
    assert empty.has_message_available()
    assert [empty.read_next(5000).data() for _ in range(5)] == [f"m-{i}".encode() for i in range(5)]
    assert not empty.has_message_available()

    after = client.create_reader(topic, ids[1])
    assert [after.read_next(5000).data() for _ in range(3)] == [b"m-2", b"m-3", b"m-4"]
    inclusive = client.create_reader(topic, ids[1], start_message_id_inclusive=True)
    assert inclusive.read_next(5000).data() == b"m-1"
    latest = client.create_reader(topic, pulsar.MessageId.latest)
    assert not latest.has_message_available()

    consumer = client.subscribe(topic, "last")
    last = consumer.get_last_message_id()
    assert (last.ledger_id(), last.entry_id()) == (ids[4].ledger_id(), ids[4].entry_id())

    # A reader that seeks goes back, and resumes after the id it seeks to.
    empty.seek(ids[2])
    assert empty.read_next(5000).data() == b"m-3"
    client.close()


def test_initial_position_latest_skips_the_backlog(broker):
    client = _client(broker)
    topic = _topic()
    _produce_spaced(client, topic, 3, gap_after=-1)
    latest = client.subscribe(topic, "latest")
    earliest = client.subscribe(topic, "earliest", initial_position=pulsar.InitialPosition.Earliest)
    client.create_producer(topic).send(b"new")
    assert latest.receive(timeout_millis=5000).data() == b"new"
    assert _receive_all(earliest, 4) == ["m-0", "m-1", "m-2", "new"]
    client.close()


# --- de-duplication ------------------------------------------------------------------------


@pytest.fixture
def dedup_broker(broker_binary, tmp_path):
    b = BrokerProcess(broker_binary, tmp_path / "data", ["--deduplication"])
    b.start()
    yield b
    b.kill9()


def test_dedup_exactly_once_across_resends_and_kill9(dedup_broker):
    topic = _topic()
    client = _client(dedup_broker)
    consumer = client.subscribe(topic, "s", initial_position=pulsar.InitialPosition.Earliest)
    producer = client.create_producer(topic, producer_name="exactly-once", batching_enabled=False)
    assert producer.last_sequence_id() == -1
    for i in range(10):
        producer.send(f"e-{i}".encode(), sequence_id=i)
    for i in range(5, 15):  # 5..9 are resends of what is already stored
        producer.send(f"e-{i}".encode(), sequence_id=i)
    assert _receive_all(consumer, 15) == [f"e-{i}" for i in range(15)]
    with pytest.raises(pulsar.Timeout):
        consumer.receive(timeout_millis=300)
    # A second producer with the same name is refused while the first is connected.
    with pytest.raises(pulsar.PulsarException):
        client.create_producer(topic, producer_name="exactly-once")

    client = _crash_and_restart(dedup_broker, client)
    producer = client.create_producer(topic, producer_name="exactly-once", batching_enabled=False)
    assert producer.last_sequence_id() == 14
    for i in range(10, 20):
        producer.send(f"e-{i}".encode(), sequence_id=i)
    reader = client.create_reader(topic, pulsar.MessageId.earliest)
    seen = []
    while reader.has_message_available():
        seen.append(reader.read_next(5000).data().decode())
    assert seen == [f"e-{i}" for i in range(20)]
    client.close()


# --- Failover and Key_Shared ---------------------------------------------------------------


def _partitioned_topic(broker, partitions):
    """A new partitioned topic. On a partition, Failover's active consumer is the one at the
    partition's index among the consumers sorted by name (on other topics a hash of the
    topic's name picks it)."""
    name = f"py-{uuid.uuid4().hex[:12]}"
    assert _admin(broker, "PUT", f"/persistent/public/default/{name}/partitions", partitions)[0] == 204
    return f"persistent://public/default/{name}"


def test_failover_active_consumer_and_takeover(broker):
    client = _client(broker)
    topic = _partitioned_topic(broker, 1)
    kind = pulsar.ConsumerType.Failover
    standby = client.subscribe(topic, "fo", consumer_type=kind, consumer_name="b-standby")
    active = client.subscribe(topic, "fo", consumer_type=kind, consumer_name="a-active")
    producer = client.create_producer(topic, batching_enabled=False)
    for i in range(10):
        producer.send(f"f-{i}".encode())
    got = [active.receive(timeout_millis=5000) for _ in range(10)]
    assert [m.data().decode() for m in got] == [f"f-{i}" for i in range(10)]
    with pytest.raises(pulsar.Timeout):
        standby.receive(timeout_millis=300)
    for m in got[:4]:
        active.acknowledge(m)
    time.sleep(0.3)  # let the acks reach the broker (the client groups them)
    active.close()
    # The standby takes over, from the first unacknowledged message on, in order.
    assert _receive_all(standby, 6) == [f"f-{i}" for i in range(4, 10)]
    producer.send(b"f-10")
    assert standby.receive(timeout_millis=5000).data() == b"f-10"
    client.close()


def test_failover_takeover_waits_for_the_previous_consumer_to_ack(broker):
    """A Failover consumer that joins and takes the active role from one still attached gets
    nothing for a second (Pulsar's `activeConsumerFailoverDelayTimeMillis`); then it gets what
    the previous one had not acknowledged by then, and everything new. What the previous one
    acknowledged in that second is not delivered twice."""
    client = _client(broker)
    topic = _partitioned_topic(broker, 1)
    kind = pulsar.ConsumerType.Failover
    old = client.subscribe(topic, "fo", consumer_type=kind, consumer_name="b-old")
    producer = client.create_producer(topic, batching_enabled=False)
    for i in range(10):
        producer.send(f"t-{i}".encode())
    held = [old.receive(timeout_millis=5000) for _ in range(10)]
    for m in held[:5]:
        old.acknowledge(m)
    time.sleep(0.3)  # let the acks reach the broker (the client groups them)
    joined = time.monotonic()
    new = client.subscribe(topic, "fo", consumer_type=kind, consumer_name="a-new")
    # Within the delay the old consumer finishes two more; new messages wait.
    for m in held[5:7]:
        old.acknowledge(m)
    for i in range(10, 15):
        producer.send(f"t-{i}".encode())
    first = new.receive(timeout_millis=5000)
    waited = time.monotonic() - joined
    assert waited >= 0.5, f"the takeover came after {waited:.2f} s"
    rest = _receive_all(new, 7)
    assert [first.data().decode()] + rest == [f"t-{i}" for i in range(7, 15)]
    with pytest.raises(pulsar.Timeout):
        old.receive(timeout_millis=300)
    client.close()


def test_failover_spreads_partitions_over_consumers(broker):
    client = _client(broker)
    topic = _partitioned_topic(broker, 2)
    kind = pulsar.ConsumerType.Failover
    # Both join within the first one's delay, so nothing goes out before the choice.
    consumers = {n: client.subscribe(topic, "fo", consumer_type=kind, consumer_name=n) for n in ["b", "a"]}
    producer = client.create_producer(topic, batching_enabled=False)
    for i in range(20):
        producer.send(f"{i}".encode(), partition_key=f"k{i}")
    partitions = {}
    total = 0
    deadline = time.time() + 30
    while total < 20 and time.time() < deadline:
        for name, c in consumers.items():
            try:
                msg = c.receive(timeout_millis=50)
            except pulsar.Timeout:
                continue
            partitions.setdefault(name, set()).add(msg.topic_name().rsplit("-", 1)[1])
            c.acknowledge(msg)
            total += 1
    assert total == 20
    assert partitions == {"a": {"0"}, "b": {"1"}}, partitions
    client.close()


def test_key_shared_keeps_keys_on_one_consumer_in_order(broker):
    client = _client(broker)
    topic = _topic()
    kind = pulsar.ConsumerType.KeyShared
    consumers = [client.subscribe(topic, "ks", consumer_type=kind, consumer_name=f"c{i}") for i in range(3)]
    producer = client.create_producer(topic, batching_enabled=False)
    n = 300
    for i in range(n):
        producer.send(f"{i}".encode(), partition_key=f"key-{i % 12}")
    seen = {}  # key -> (consumer index, payloads in arrival order)
    total = 0
    deadline = time.time() + 30
    while total < n and time.time() < deadline:
        for idx, c in enumerate(consumers):
            try:
                msg = c.receive(timeout_millis=50)
            except pulsar.Timeout:
                continue
            owner, values = seen.setdefault(msg.partition_key(), (idx, []))
            assert owner == idx, f"{msg.partition_key()} went to consumers {owner} and {idx}"
            values.append(int(msg.data()))
            c.acknowledge(msg)
            total += 1
    assert total == n
    assert len(seen) == 12
    assert len({owner for owner, _ in seen.values()}) > 1, "keys spread over consumers"
    for key, (_, values) in seen.items():
        assert values == sorted(values), f"order of {key} broken: {values}"
    client.close()


def test_key_shared_new_consumer_waits_for_the_old_owner_to_ack(broker):
    """A consumer joining a Key_Shared subscription while earlier messages are unacknowledged
    gets no newer message until those are acknowledged (the keys moving to it could otherwise
    be processed there while their earlier messages are still with the old owner)."""
    client = _client(broker)
    topic = _topic()
    kind = pulsar.ConsumerType.KeyShared
    first = client.subscribe(topic, "ks", consumer_type=kind, consumer_name="a")
    producer = client.create_producer(topic, batching_enabled=False)
    for i in range(20):
        producer.send(f"{i}".encode(), partition_key=f"key-{i % 10}")
    early = [first.receive(timeout_millis=5000) for _ in range(20)]
    second = client.subscribe(topic, "ks", consumer_type=kind, consumer_name="b")
    for i in range(20, 60):
        producer.send(f"{i}".encode(), partition_key=f"key-{i % 10}")
    with pytest.raises(pulsar.Timeout):
        second.receive(timeout_millis=1000)
    for m in early:
        first.acknowledge(m)
    got = _receive_from_each({0: first, 1: second}, 40, lambda msg: (msg.partition_key(), int(msg.data())))
    assert sorted(v for _, v in got[0] + got[1]) == list(range(20, 60))
    assert got[1], "keys moved to the new consumer once the old owner acknowledged"
    for idx in (0, 1):
        for key in {k for k, _ in got[idx]}:
            values = [v for k, v in got[idx] if k == key]
            assert values == sorted(values), f"order of {key} broken: {values}"
    client.close()


def test_key_shared_consumer_that_stops_reading_does_not_stall_the_others(broker):
    client = _client(broker)
    topic = _topic()
    kind = pulsar.ConsumerType.KeyShared
    stuck = client.subscribe(topic, "ks", consumer_type=kind, consumer_name="stuck", receiver_queue_size=10)
    live = client.subscribe(topic, "ks", consumer_type=kind, consumer_name="live")
    producer = client.create_producer(topic, batching_enabled=False)
    n = 400
    for i in range(n):
        producer.send_async(f"{i}".encode(), None, partition_key=f"key-{i % 16}")
    producer.flush()
    got = _receive_until_quiet(live, lambda msg: (msg.partition_key(), int(msg.data())))
    live_keys = {k for k, _ in got}
    assert 0 < len(live_keys) < 16, "keys on both consumers"
    expected = [i for i in range(n) if f"key-{i % 16}" in live_keys]
    assert sorted(v for _, v in got) == expected, "every message of its keys, though the other stopped reading"
    for key in live_keys:
        values = [v for k, v in got if k == key]
        assert values == sorted(values), f"order of {key} broken"
    # The stuck consumer's messages wait for it, in order.
    rest = _receive_until_quiet(stuck, lambda msg: int(msg.data()))
    assert sorted(rest) == [i for i in range(n) if f"key-{i % 16}" not in live_keys]
    client.close()


def test_key_shared_sticky_hash_ranges_route_keys_by_pulsars_hash(broker):
    import mmh3

    def sticky_hash(key):  # Pulsar's: Murmur3-32, sign bit cleared, modulo 65536 (0 -> 1)
        return max((mmh3.hash(key.encode(), 0, signed=False) & 0x7FFFFFFF) % 65536, 1)

    client = _client(broker)
    topic = _topic()
    kind = pulsar.ConsumerType.KeyShared

    def sticky(name, ranges):
        policy = pulsar.ConsumerKeySharedPolicy(pulsar.KeySharedMode.Sticky, sticky_ranges=ranges)
        return client.subscribe(topic, "sticky", consumer_type=kind, consumer_name=name, key_shared_policy=policy)

    low = sticky("low", [(0, 32767)])
    with pytest.raises(pulsar.PulsarException):
        sticky("overlapping", [(30000, 40000)])
    high = sticky("high", [(32768, 65535)])
    producer = client.create_producer(topic, batching_enabled=False)
    keys = [f"key-{i}" for i in range(40)]
    for i, key in enumerate(keys * 3):
        producer.send(f"{i}".encode(), partition_key=key)
    got = _receive_from_each({"low": low, "high": high}, 120, lambda msg: msg.partition_key())
    assert len(got["low"]) + len(got["high"]) == 120
    assert got["low"] and got["high"]
    assert all(sticky_hash(k) <= 32767 for k in got["low"])
    assert all(sticky_hash(k) >= 32768 for k in got["high"])
    client.close()


# --- schemas and regex subscriptions -------------------------------------------------------


def test_typed_json_producer_and_consumer(broker):
    from pulsar.schema import Integer, JsonSchema, Record, String

    class Reading(Record):
        sensor = String()
        value = Integer()

    client = _client(broker)
    topic = _topic()
    consumer = client.subscribe(topic, "typed", schema=JsonSchema(Reading))
    producer = client.create_producer(topic, schema=JsonSchema(Reading))
    producer.send(Reading(sensor="t1", value=21))
    msg = consumer.receive(timeout_millis=5000)
    assert (msg.value().sensor, msg.value().value) == ("t1", 21)
    # The same schema again is the same version; the registry survives the producer.
    again = client.create_producer(topic, schema=JsonSchema(Reading))
    again.send(Reading(sensor="t2", value=22))
    msg2 = consumer.receive(timeout_millis=5000)
    assert msg2.value().sensor == "t2"
    assert msg2.schema_version() == msg.schema_version()
    client.close()


def test_regex_consumer_finds_topics_of_the_namespace(broker):
    import re

    client = _client(broker)
    prefix = f"persistent://public/default/rx-{uuid.uuid4().hex[:8]}"
    for name in ("a", "b"):
        p = client.create_producer(f"{prefix}-{name}", batching_enabled=False)
        p.send(f"from-{name}".encode())
        p.close()
    consumer = client.subscribe(
        re.compile(f"{prefix}-.*"), "rx", initial_position=pulsar.InitialPosition.Earliest
    )
    got = sorted(_receive_all(consumer, 2))
    assert got == ["from-a", "from-b"]
    client.close()


# --- admin API and partitioned topics ------------------------------------------------------


def test_admin_api_and_partitioned_topic(broker):
    tenant = f"t{uuid.uuid4().hex[:6]}"
    assert _admin(broker, "GET", "/clusters") == (200, ["standalone"])
    assert _admin(broker, "PUT", f"/tenants/{tenant}", {"allowedClusters": ["standalone"]})[0] == 204
    assert _admin(broker, "PUT", f"/tenants/{tenant}")[0] == 409
    assert _admin(broker, "PUT", f"/namespaces/{tenant}/ns")[0] == 204
    assert _admin(broker, "GET", f"/namespaces/{tenant}") == (200, [f"{tenant}/ns"])
    base = f"/persistent/{tenant}/ns/orders"
    assert _admin(broker, "PUT", f"{base}/partitions", 3)[0] == 204
    assert _admin(broker, "PUT", f"{base}/partitions", 3)[0] == 409
    assert _admin(broker, "GET", f"{base}/partitions") == (200, {"partitions": 3})
    topic = f"persistent://{tenant}/ns/orders"
    assert _admin(broker, "GET", f"/persistent/{tenant}/ns/partitioned") == (200, [topic])
    assert _admin(broker, "GET", f"/persistent/{tenant}/ns")[1] == [f"{topic}-partition-{i}" for i in range(3)]

    client = _client(broker)
    consumer = client.subscribe(topic, "s", initial_position=pulsar.InitialPosition.Earliest)
    producer = client.create_producer(topic, batching_enabled=False)
    for i in range(30):
        producer.send(f"{i}".encode(), partition_key=f"k{i % 5}")
    by_key = {}
    partitions = set()
    for _ in range(30):
        msg = consumer.receive(timeout_millis=5000)
        by_key.setdefault(msg.partition_key(), []).append(int(msg.data()))
        partitions.add(msg.topic_name())
        consumer.acknowledge(msg)
    assert sum(len(v) for v in by_key.values()) == 30
    assert all(v == sorted(v) for v in by_key.values()), by_key
    assert len(partitions) > 1, partitions

    stats = [_admin(broker, "GET", f"{base}-partition-{i}/stats") for i in range(3)]
    assert all(status == 200 and "s" in st["subscriptions"] for status, st in stats), stats
    assert sum(st["msgInCounter"] for _, st in stats) == 30, stats
    # In use: refused; once closed: deleted with its partitions.
    assert _admin(broker, "DELETE", f"{base}/partitions")[0] == 412
    client.close()
    assert _admin(broker, "DELETE", f"{base}/partitions")[0] == 204
    assert _admin(broker, "GET", f"/persistent/{tenant}/ns") == (200, [])
    assert _admin(broker, "DELETE", f"/namespaces/{tenant}/ns")[0] == 204
    assert _admin(broker, "DELETE", f"/tenants/{tenant}")[0] == 204
    assert _admin(broker, "GET", f"{base}/stats")[0] == 404


def test_delayed_delivery_on_shared_subscription(broker):
    from datetime import timedelta

    client = _client(broker)
    topic = _topic()
    consumer = client.subscribe(topic, "delayed", consumer_type=pulsar.ConsumerType.Shared)
    producer = client.create_producer(topic, batching_enabled=False)
    start = time.time()
    producer.send(b"later", deliver_after=timedelta(milliseconds=1500))
    producer.send(b"now")
    first = consumer.receive(timeout_millis=5000)
    assert first.data() == b"now"
    assert time.time() - start < 1.0
    second = consumer.receive(timeout_millis=5000)
    assert second.data() == b"later"
    assert time.time() - start >= 1.4
    consumer.acknowledge(first)
    consumer.acknowledge(second)
    client.close()


def _send_one_batch_of_ten(client, topic, consumer, prefix):
    """Sends `<prefix>-0` .. `<prefix>-9` as one batch and returns the 10 messages `consumer`
    receives (not acknowledged)."""
    producer = client.create_producer(
        topic, batching_enabled=True, batching_max_messages=10, batching_max_publish_delay_ms=1000
    )
    for i in range(10):
        producer.send_async(f"{prefix}-{i}".encode(), None)
    producer.flush()
    got = [consumer.receive(timeout_millis=5000) for _ in range(10)]
    assert len({(m.message_id().ledger_id(), m.message_id().entry_id()) for m in got}) == 1, "one batch"
    return got


def test_batch_index_acks_redeliver_only_the_unacked_messages(broker):
    client = _client(broker)
    topic = _topic()
    consumer = client.subscribe(
        topic, "bi", consumer_type=pulsar.ConsumerType.Shared, batch_index_ack_enabled=True,
        initial_position=pulsar.InitialPosition.Earliest,
    )
    got = _send_one_batch_of_ten(client, topic, consumer, "x")
    for m in got[::2]:  # ack the even ones only
        consumer.acknowledge(m)
    time.sleep(0.3)  # the client groups acks
    consumer.close()
    again = client.subscribe(topic, "bi", consumer_type=pulsar.ConsumerType.Shared, batch_index_ack_enabled=True)
    redelivered = sorted(again.receive(timeout_millis=5000).data().decode() for _ in range(5))
    assert redelivered == [f"x-{i}" for i in range(1, 10, 2)]
    with pytest.raises(pulsar.Timeout):
        again.receive(timeout_millis=300)
    client.close()


def test_batch_index_acks_survive_a_broker_crash(broker):
    """Half a batch acknowledged by batch index, then kill -9 after the cursor's save interval:
    after the restart only the other half comes back."""
    client = _client(broker)
    topic = _topic()
    subscribe = lambda: client.subscribe(  # noqa: E731
        topic, "bi", consumer_type=pulsar.ConsumerType.Shared, batch_index_ack_enabled=True,
        initial_position=pulsar.InitialPosition.Earliest,
    )
    consumer = subscribe()
    got = _send_one_batch_of_ten(client, topic, consumer, "y")
    for m in got[:6]:
        consumer.acknowledge(m)
    time.sleep(0.5)  # the client groups acks (100 ms), the broker saves cursors (50 ms)
    client = _crash_and_restart(broker, client)
    consumer = subscribe()
    redelivered = sorted(consumer.receive(timeout_millis=5000).data().decode() for _ in range(4))
    assert redelivered == [f"y-{i}" for i in range(6, 10)]
    with pytest.raises(pulsar.Timeout):
        consumer.receive(timeout_millis=300)
    client.close()


def test_long_topic_names_work_and_are_listed_after_restart(broker):
    name = "long-" + "x" * 400 + uuid.uuid4().hex[:8]
    topic = f"persistent://public/default/{name}"
    client = _client(broker)
    consumer = client.subscribe(topic, "s", initial_position=pulsar.InitialPosition.Earliest)
    client.create_producer(topic, batching_enabled=False).send(b"long")
    assert consumer.receive(timeout_millis=5000).data() == b"long"
    client = _crash_and_restart(broker, client)
    status, topics = _admin(broker, "GET", "/persistent/public/default")
    assert status == 200 and topic in topics
    reader = client.create_reader(topic, pulsar.MessageId.earliest)
    assert reader.read_next(5000).data() == b"long"
    client.close()


def test_wait_for_exclusive_producer_gets_the_topic_when_the_others_leave(broker):
    client = _client(broker)
    topic = _topic()
    shared = client.create_producer(topic, producer_name="first")
    created = {}

    def wait_for_it():
        created["producer"] = client.create_producer(
            topic, producer_name="waiter", access_mode=pulsar.ProducerAccessMode.WaitForExclusive
        )

    waiting = threading.Thread(target=wait_for_it, daemon=True)
    waiting.start()
    waiting.join(1.5)
    assert waiting.is_alive(), "queued while another producer is connected"
    shared.send(b"before")
    shared.close()
    waiting.join(10)
    assert not waiting.is_alive() and "producer" in created, "admitted once the topic was free"
    waiter = created["producer"]
    waiter.send(b"after")
    # It holds the topic exclusively now.
    with pytest.raises(pulsar.PulsarException):
        client.create_producer(topic)
    reader = client.create_reader(topic, pulsar.MessageId.earliest)
    assert [reader.read_next(5000).data() for _ in range(2)] == [b"before", b"after"]
    client.close()


def test_exclusive_with_fencing_producer_fences_the_others(broker):
    client = _client(broker)
    topic = _topic()
    old = client.create_producer(topic, producer_name="old", send_timeout_millis=5000)
    old.send(b"old-1")
    new = client.create_producer(
        topic, producer_name="new", access_mode=pulsar.ProducerAccessMode.ExclusiveWithFencing
    )
    new.send(b"new-1")
    with pytest.raises(pulsar.PulsarException):
        old.send(b"old-2")
    with pytest.raises(pulsar.PulsarException):
        client.create_producer(topic)
    new.send(b"new-2")
    reader = client.create_reader(topic, pulsar.MessageId.earliest)
    got = [reader.read_next(5000).data() for _ in range(3)]
    assert got == [b"old-1", b"new-1", b"new-2"]
    with pytest.raises(pulsar.Timeout):
        reader.read_next(300)
    client.close()


def test_exclusive_producer_access_mode(broker):
    client = _client(broker)
    topic = _topic()
    exclusive = client.create_producer(topic, access_mode=pulsar.ProducerAccessMode.Exclusive)
    with pytest.raises(pulsar.PulsarException):
        client.create_producer(topic)
    with pytest.raises(pulsar.PulsarException):
        client.create_producer(topic, access_mode=pulsar.ProducerAccessMode.Exclusive)
    exclusive.send(b"only me")
    exclusive.close()
    shared = client.create_producer(topic)
    with pytest.raises(pulsar.PulsarException):
        client.create_producer(topic, access_mode=pulsar.ProducerAccessMode.Exclusive)
    shared.send(b"shared again")
    reader = client.create_reader(topic, pulsar.MessageId.earliest)
    assert [reader.read_next(5000).data() for _ in range(2)] == [b"only me", b"shared again"]
    client.close()


def test_unload_closes_clients_that_reconnect_and_lose_nothing(broker):
    """`PUT .../unload` closes the topic's producer and consumer (CommandCloseProducer and
    CommandCloseConsumer); the official client reconnects both, every send gets its receipt,
    and every message arrives, in order, exactly once (the first half, acked before the
    unload, is not redelivered: the unload saved the cursor)."""
    client = _client(broker)
    topic = _topic()
    consumer = client.subscribe(topic, "sub")
    producer = client.create_producer(topic, batching_enabled=False)
    for i in range(50):
        producer.send(f"m{i}".encode())
    assert _receive_all(consumer, 50) == [f"m{i}" for i in range(50)]
    # The client sends acks grouped, every 100 ms: let them reach the broker first (acks
    # still in the client at the unload are lost with the old consumer, as on Pulsar).
    time.sleep(0.5)

    path = "/persistent/public/default/" + topic.rsplit("/", 1)[1] + "/unload"
    assert _admin(broker, "PUT", path)[0] == 204
    for i in range(50, 100):
        producer.send(f"m{i}".encode())
    assert _receive_all(consumer, 50) == [f"m{i}" for i in range(50, 100)]
    with pytest.raises(pulsar.Timeout):
        consumer.receive(timeout_millis=500)

    missing = "/persistent/public/default/no-such-topic/unload"
    assert _admin(broker, "PUT", missing)[0] == 404
    client.close()


def test_unload_of_a_partitioned_topic_unloads_its_partitions(broker):
    client = _client(broker)
    topic = _partitioned_topic(broker, 3)
    consumer = client.subscribe(topic, "sub")
    producer = client.create_producer(topic, batching_enabled=False)
    # Only two of the three partitions are used: the third has nothing to unload.
    for i in range(20):
        producer.send(f"m{i}".encode(), partition_key="a" if i % 2 else "b")
    assert sorted(_receive_all(consumer, 20)) == sorted(f"m{i}" for i in range(20))
    time.sleep(0.5)  # the client's grouped acks reach the broker
    assert _admin(broker, "PUT", "/persistent/public/default/" + topic.rsplit("/", 1)[1] + "/unload")[0] == 204
    for i in range(20, 40):
        producer.send(f"m{i}".encode(), partition_key="a" if i % 2 else "b")
    assert sorted(_receive_all(consumer, 20)) == sorted(f"m{i}" for i in range(20, 40))
    with pytest.raises(pulsar.Timeout):
        consumer.receive(timeout_millis=500)
    client.close()
