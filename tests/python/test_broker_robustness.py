"""The embedded broker under abuse: repeated kill -9 under load, hostile bytes, a full or
read-only disk, compressed batches. Driven by the official Python `pulsar-client` and raw
sockets against the real `magnetar-broker` binary (see test_broker_pulsar_client.py for the
fixtures; MAGNETAR_BROKER_BIN selects the binary).
"""

import hashlib
import random
import struct
import threading
import time
import uuid
from pathlib import Path

import pulsar
import pytest

from test_broker_pulsar_client import BrokerProcess, _client, _topic  # noqa: F401 (fixtures)
from test_broker_pulsar_client import broker, broker_binary  # noqa: F401


def _payload(producer, i):
    body = f"{producer}-{i}-" + "y" * (i % 700)
    digest = hashlib.sha256(body.encode()).hexdigest()[:16]
    return f"{body}|{digest}".encode()


def _check(data):
    """(producer, i) of a payload made by `_payload`; fails on any corruption."""
    body, _, digest = data.decode().rpartition("|")
    assert hashlib.sha256(body.encode()).hexdigest()[:16] == digest, f"corrupt message {data[:40]!r}"
    producer, i, _ = body.split("-", 2)
    return producer, int(i)


def _crc32c_table():
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC32C = _crc32c_table()


def _crc32c(data):
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC32C[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _journal_state(path, sub):
    """The state of `sub` in a topic's cursor journal (`broker/src/cursor.rs`), as the broker
    reads it at load: records `[u32 length][u32 CRC32C][kind][u32 name length][name][state]`
    (big-endian) up to the first that is not whole (zeros, or a torn tail); a subscription's
    last record is its state (kind 1) or its tombstone (kind 2). None if it has none."""
    data = path.read_bytes()
    pos, state = 0, None
    while pos + 8 <= len(data):
        length, crc = struct.unpack(">II", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        if length == 0 or len(body) != length or _crc32c(body) != crc:
            break
        (name_len,) = struct.unpack(">I", body[1:5])
        if body[5 : 5 + name_len].decode() == sub:
            state = body[5 + name_len :] if body[0] == 1 else None
        pos += 8 + length
    return state


def _read_cursor(data):
    """A persisted cursor state (`broker/src/cursor.rs`): MGC1 or MGC2, ack floor, count,
    individually acked entry ids, under MGC2 the partly acked batches, CRC32C.
    Returns (floor, set of acked ids above it)."""
    assert data[:4] in (b"MGC1", b"MGC2"), "cursor state magic"
    floor, count = struct.unpack(">QQ", data[4:20])
    end = 20 + 8 * count
    ids = struct.unpack(f">{count}Q", data[20:end])
    if data[:4] == b"MGC2":
        (batches,) = struct.unpack(">Q", data[end : end + 8])
        end += 8
        for _ in range(batches):
            _entry, words = struct.unpack(">QQ", data[end : end + 16])
            end += 16 + 8 * words
    assert len(data) == end + 4
    return floor, set(ids)


def _is_acked(cursor, entry_id):
    floor, ids = cursor
    return entry_id < floor or entry_id in ids


# --- crash safety ----------------------------------------------------------------------


def test_kill9_loop_under_load_loses_no_receipt_and_cursor_never_goes_back(broker):
    """Five kill -9 at random moments while three producers (two unbatched, one batched)
    send and one consumer receives and acks; restart on the same data directory each time.

    What the broker guarantees, and what is asserted:
    - every message whose send receipt a producer got is stored, byte for byte (a reader
      from the earliest position finds each one, every payload passes its checksum), and it
      is delivered to the subscription at least once;
    - the subscription's cursor on disk (read from the data directory while the broker is
      dead) only moves forward: its ack floor never decreases and an entry it held acked
      stays acked at every later kill;
    - a message whose ack the cursor on disk holds is never delivered again after a
      restart. Acks newer than the last cursor save (at most ~50 ms, CURSOR_SAVE_INTERVAL)
      may be lost by a crash, and those messages are delivered again: at least once.
    """
    rng = random.Random()
    topic = _topic()
    sub = "crash-loop"
    receipted = {}  # (producer, i) -> True
    receipted_lock = threading.Lock()
    stop = threading.Event()
    received = []  # (time, entry id, (producer, i))
    consumer_errors = []

    consumer_client = pulsar.Client(broker.url, operation_timeout_seconds=5)
    consumer = consumer_client.subscribe(topic, sub, initial_position=pulsar.InitialPosition.Earliest)

    def consume():
        while not stop.is_set():
            try:
                msg = consumer.receive(timeout_millis=200)
            except pulsar.Timeout:
                continue
            except Exception as e:  # broker down: the client reconnects by itself
                consumer_errors.append(repr(e))
                time.sleep(0.05)
                continue
            try:
                received.append((time.monotonic(), msg.message_id().entry_id(), _check(msg.data())))
                consumer.acknowledge(msg)
            except pulsar.PulsarException:
                pass

    def produce(name, batching):
        client = pulsar.Client(broker.url, operation_timeout_seconds=5)
        producer = client.create_producer(
            topic,
            producer_name=f"{name}-{uuid.uuid4().hex[:6]}",
            batching_enabled=batching,
            batching_max_publish_delay_ms=5,
            send_timeout_millis=3000,
            block_if_queue_full=True,
        )

        def done(res, _mid, key):
            if res == pulsar.Result.Ok:
                with receipted_lock:
                    receipted[key] = True

        i = 0
        while not stop.is_set():
            producer.send_async(_payload(name, i), lambda res, mid, k=(name, i): done(res, mid, k))
            i += 1
            if i % 20 == 0:
                time.sleep(0.002)
        try:
            producer.flush()
        except pulsar.PulsarException:
            pass
        try:
            client.close()
        except pulsar.PulsarException:
            pass

    threads = [threading.Thread(target=consume)] + [
        threading.Thread(target=produce, args=(n, b)) for n, b in (("pa", False), ("pb", False), ("pc", True))
    ]
    for t in threads:
        t.start()
    cursor_files = []
    snapshots = []  # (restart time, persisted cursor at the kill before it)
    try:
        for _ in range(5):
            time.sleep(rng.uniform(1.5, 4.5))
            broker.kill9()
            journals = list(Path(broker.data_dir).glob("**/cursors/journal"))
            states = [s for s in (_journal_state(j, sub) for j in journals) if s is not None]
            assert len(states) == 1, journals
            cursor_files = [j for j in journals if _journal_state(j, sub) is not None]
            cursor = _read_cursor(states[0])
            if snapshots:
                prev = snapshots[-1][1]
                assert cursor[0] >= prev[0], f"ack floor went back: {prev[0]} -> {cursor[0]}"
                went_back = [e for e in prev[1] if not _is_acked(cursor, e)]
                assert not went_back, f"acked entries un-acked after a crash: {went_back[:5]}"
            time.sleep(rng.uniform(0.0, 0.3))
            broker.start()
            snapshots.append((time.monotonic(), cursor))
        time.sleep(2.0)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "client threads did not stop"

    # Drain what the consumer still has to get (at least once), then read everything back.
    drained = 0
    while True:
        try:
            msg = consumer.receive(timeout_millis=3000)
        except pulsar.Timeout:
            break
        received.append((time.monotonic(), msg.message_id().entry_id(), _check(msg.data())))
        consumer.acknowledge(msg)
        drained += 1
    consumer_client.close()

    client = _client(broker)
    reader = client.create_reader(topic, pulsar.MessageId.earliest)
    stored = set()
    while reader.has_message_available():
        stored.add(_check(reader.read_next(5000).data()))
    client.close()

    keys = set(receipted)
    assert len(keys) > 300, f"producers made too little progress: {len(keys)}"
    missing = keys - stored
    assert not missing, f"{len(missing)} receipted messages lost, e.g. {sorted(missing)[:5]}"
    undelivered = keys - {k for _, _, k in received}
    assert not undelivered, f"{len(undelivered)} receipted messages never delivered, e.g. {sorted(undelivered)[:5]}"
    # A delivery after a restart never brings back an entry the cursor on disk held acked.
    for restarted_at, cursor in snapshots:
        back = [(e, k) for t, e, k in received if t > restarted_at and _is_acked(cursor, e)]
        assert not back, f"persisted-acked entries delivered again: {back[:5]}"
    final = _read_cursor(_journal_state(cursor_files[0], sub)) if cursor_files else (0, set())
    assert snapshots[-1][1][0] > 0 and final[0] >= snapshots[-1][1][0]
    redelivered = len(received) - len({k for _, _, k in received})
    print(
        f"kill -9 x{len(snapshots)}: {len(keys)} receipted, {len(stored)} stored, "
        f"{len(received)} deliveries ({redelivered} repeats), floors {[c[0] for _, c in snapshots]}"
    )


# --- compression -------------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["LZ4", "ZLib", "ZSTD", "SNAPPY"])
def test_compressed_batches_are_stored_as_sent_and_round_trip(broker, codec):  # noqa: F811
    """Compressed batches (key-based batching) and compressed single messages go through
    a Key_Shared subscription and a batch-index-acking one unchanged; the broker stores
    them compressed (the topic's storage is far below the raw payload bytes)."""
    from test_broker_pulsar_client import _admin

    compression = getattr(pulsar.CompressionType, codec)
    client = _client(broker)
    topic = _topic()
    keyed = client.subscribe(topic, "ks", consumer_type=pulsar.ConsumerType.KeyShared)
    acker = client.subscribe(topic, "bi", batch_index_ack_enabled=True)
    batched = client.create_producer(
        topic,
        compression_type=compression,
        batching_type=pulsar.BatchingType.KeyBased,
        batching_max_messages=50,
        batching_max_publish_delay_ms=50,
    )
    single = client.create_producer(topic, compression_type=compression, batching_enabled=False)
    payload = lambda key, i: (f"{key}:{i}:" + "compressible " * 200).encode()  # noqa: E731
    results = []
    for i in range(200):
        key = f"k{i % 4}"
        batched.send_async(payload(key, i), lambda res, _mid: results.append(res), partition_key=key)
    batched.flush()
    for i in range(200, 220):
        single.send(payload("k9", i), partition_key="k9")
    deadline = time.time() + 10
    while len(results) < 200 and time.time() < deadline:
        time.sleep(0.01)
    assert results == [pulsar.Result.Ok] * 200
    raw_bytes = sum(len(payload("k0", i)) for i in range(220))

    got = {}
    for _ in range(220):
        msg = keyed.receive(timeout_millis=10000)
        key, i, rest = msg.data().decode().split(":", 2)
        assert msg.data() == payload(key, int(i)) and msg.partition_key() == key
        got.setdefault(key, []).append(int(i))
        keyed.acknowledge(msg)
    assert got == {**{f"k{k}": list(range(k, 200, 4)) for k in range(4)}, "k9": list(range(200, 220))}

    # Batch-index acks inside compressed batches: ack the even ones, the odd ones come back.
    for _ in range(220):
        msg = acker.receive(timeout_millis=10000)
        if int(msg.data().decode().split(":")[1]) % 2 == 0:
            acker.acknowledge(msg)
    acker.close()
    time.sleep(0.3)  # acks are sent grouped (100 ms)
    acker = client.subscribe(topic, "bi", batch_index_ack_enabled=True)
    again = set()
    while True:
        try:
            msg = acker.receive(timeout_millis=1500)
        except pulsar.Timeout:
            break
        again.add(int(msg.data().decode().split(":")[1]))
        acker.acknowledge(msg)
    assert again == set(range(1, 220, 2))

    status, stats = _admin(broker, "GET", "/persistent/public/default/" + topic.rsplit("/", 1)[1] + "/stats")
    assert status == 200, stats
    assert stats["storageSize"] < raw_bytes / 4, (stats["storageSize"], raw_bytes)
    client.close()
