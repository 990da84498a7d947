#!/usr/bin/env python3
"""Kafka through the gateway's `kafka` plugin, side by side in one run with (a) the same
load sent natively over the Pulsar protocol to the same embedded broker and (b) Tansu, a
Kafka-compatible broker in Rust with durable storage (issue 22: Kafka >= 0.8x native,
>= 1.0x Tansu).

Clients: librdkafka (confluent-kafka) for Kafka, the official Pulsar client (C++ core) for
the native rows: both are native libraries driven from Python the same way (asynchronous
sends with a delivery callback per message), so the ratios compare the servers. Servers are
started by the bench and stopped when it ends: the gateway (the real binary, standalone:
embedded broker and a `kafka` listener) and, when its binary is found, Tansu with its
SQLite storage (`TANSU_BIN`, default `/opt/tansu/bin/tansu`; installed by
`cargo install tansu --features libsql --root /opt/tansu`; without it its columns stay
empty).

Rows: 100 B and 1 KiB messages, 1 and 4 producers (each its own partition), acks=all,
batched (linger 5 ms); then as many consumers read everything back. Figures per row and
server: produced msgs/s (all acknowledged / time from the first send), p99 of send ->
acknowledgement, consumed msgs/s, and the server's CPU time per message (its process's
user+system time over the row / messages; the gateway's process holds the embedded broker,
so the native rows count the broker alone).

Columns "vs native" and "vs tansu" are Magnetar's produce/consume rates over theirs;
"cpu/native" is Magnetar's server CPU per message over the embedded broker's alone for the
same load natively: what the translation costs the machine, whatever the clients manage.

Run: `.venv/bin/python benches/kafka.py` after `cargo build --release` — env
`BENCH_MESSAGES` (per producer, default 50000), `BENCH_ONLY` (rows, comma-separated tags
`100x1`, `100x4`, `1024x1`, `1024x4`), `MAGNETAR_BIN`. Every wait is bounded.
"""
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pulsar
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

ROOT = Path(__file__).resolve().parents[1]
# The test suite's port and process helpers (ports below the ephemeral range, bounded waits).
sys.path.insert(0, str(ROOT / "tests" / "python"))
from conftest import free_ports, stop_process as stop, wait_for_port  # noqa: E402
MAGNETAR = os.environ.get("MAGNETAR_BIN", str(ROOT / "target" / "release" / "magnetar"))
TANSU = os.environ.get("TANSU_BIN", "/opt/tansu/bin/tansu")
MESSAGES = int(os.environ.get("BENCH_MESSAGES", "50000"))
ONLY = [t for t in os.environ.get("BENCH_ONLY", "").split(",") if t]
ROWS = [(100, 1), (100, 4), (1024, 1), (1024, 4)]
DEADLINE = 180.0
TICKS = os.sysconf("SC_CLK_TCK")
QUIET = pulsar.ConsoleLogger(pulsar.LoggerLevel.Error)


def cpu_seconds(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


class Gateway:
    def __init__(self, tmp):
        self.broker_port, self.kafka_port, self.admin_port, mqtt = free_ports(4)
        config = tmp / "magnetar.toml"
        config.write_text(
            f'[broker]\nlisten = "127.0.0.1:{self.broker_port}"\n\n'
            f'[admin]\nlisten = "127.0.0.1:{self.admin_port}"\ntoken = "bench"\n\n'
            f'[[listeners]]\nname = "mqtt"\nbind = "127.0.0.1:{mqtt}"\nplugin = "mqtt"\n\n'
            f'[[listeners]]\nname = "kafka"\nbind = "127.0.0.1:{self.kafka_port}"\nplugin = "kafka"\n\n'
            f"[plugins.config.kafka]\nadvertised_port = {self.kafka_port}\n"
        )
        log = tmp / "magnetar.log"
        self.proc = subprocess.Popen(
            [MAGNETAR, "--config", str(config), "--data-dir", str(tmp / "data")],
            stdout=subprocess.DEVNULL,
            stderr=open(log, "ab"),
        )
        wait_for_port(self.kafka_port, self.proc, log)
        wait_for_port(self.broker_port, self.proc, log)
        self.bootstrap = f"127.0.0.1:{self.kafka_port}"
        self.service_url = f"pulsar://127.0.0.1:{self.broker_port}"


class Tansu:
    """Tansu with SQLite storage in a temporary directory (`tansu broker --help`)."""

    def __init__(self, tmp):
        (port,) = free_ports(1)
        self.bootstrap = f"127.0.0.1:{port}"
        log = tmp / "tansu.log"
        env = {
            **os.environ,
            "ADVERTISED_LISTENER_URL": f"tcp://127.0.0.1:{port}",
            "LISTENER_URL": f"tcp://127.0.0.1:{port}",
            # Relative to the working directory (Tansu prefixes it).
            "STORAGE_ENGINE": "sqlite://tansu.db",
            "CLUSTER_ID": "bench",
        }
        out = open(log, "ab")
        self.proc = subprocess.Popen([TANSU, "broker"], stdout=out, stderr=out, env=env, cwd=tmp)
        wait_for_port(port, self.proc, log)


def create_topic(bootstrap, topic, partitions):
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])[
        topic
    ].result(timeout=30)


def p99(latencies):
    if not latencies:
        return float("nan")
    latencies.sort()
    return latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]


def kafka_produce(bootstrap, topic, partition, size, count, out):
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "acks": "all",
            "linger.ms": 5,
            "queue.buffering.max.messages": 1_000_000,
        }
    )
    payload = b"x" * size
    lat = []
    done = [0]

    def on_delivery(err, msg, sent):
        if err is None:
            done[0] += 1
            lat.append(time.perf_counter() - sent)

    for _ in range(count):
        sent = time.perf_counter()
        while True:
            try:
                producer.produce(
                    topic,
                    payload,
                    partition=partition,
                    on_delivery=lambda err, msg, sent=sent: on_delivery(err, msg, sent),
                )
                break
            except BufferError:
                producer.poll(0.01)
        producer.poll(0)
    producer.flush(DEADLINE)
    out.append((done[0], lat))


def kafka_consume(bootstrap, topic, partition, count, out):
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 100,
        }
    )
    consumer.assign([TopicPartition(topic, partition, 0)])
    got = 0
    deadline = time.monotonic() + DEADLINE
    while got < count and time.monotonic() < deadline:
        for msg in consumer.consume(num_messages=10_000, timeout=1.0):
            if msg.error() is None:
                got += 1
    consumer.close()
    out.append(got)


def pulsar_produce(service_url, topic, size, count, out):
    client = pulsar.Client(service_url, operation_timeout_seconds=30, logger=QUIET)
    producer = client.create_producer(
        topic,
        batching_enabled=True,
        batching_max_publish_delay_ms=5,
        max_pending_messages=100_000,
        block_if_queue_full=True,
    )
    payload = b"x" * size
    lat = []
    done = [0]
    lock = threading.Lock()

    def on_sent(res, _msg_id, sent):
        if res == pulsar.Result.Ok:
            with lock:
                done[0] += 1
                lat.append(time.perf_counter() - sent)

    for _ in range(count):
        sent = time.perf_counter()
        producer.send_async(payload, lambda res, mid, sent=sent: on_sent(res, mid, sent))
    producer.flush()
    producer.close()
    client.close()
    out.append((done[0], lat))


def pulsar_consume(service_url, topic, count, out):
    client = pulsar.Client(service_url, operation_timeout_seconds=30, logger=QUIET)
    consumer = client.subscribe(
        topic,
        f"bench-{uuid.uuid4().hex[:8]}",
        initial_position=pulsar.InitialPosition.Earliest,
        receiver_queue_size=10_000,
    )
    got = 0
    deadline = time.monotonic() + DEADLINE
    while got < count and time.monotonic() < deadline:
        try:
            msgs = consumer.batch_receive()
        except Exception:  # noqa: BLE001 (a timeout: look at the deadline)
            continue
        got += len(msgs)
        consumer.acknowledge_cumulative(msgs[-1]) if len(msgs) else None
    consumer.close()
    client.close()
    out.append(got)


def run_threads(targets):
    threads = [threading.Thread(target=t, args=a, daemon=True) for t, a in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE + 30)


def row(server, size, producers):
    """(produced msgs/s, p99 ms, consumed msgs/s, CPU µs per message) for one server."""
    kind, target, pid = server
    topic = f"bench-{uuid.uuid4().hex[:10]}"
    if kind == "kafka":
        create_topic(target, topic, producers)
        topics = [(topic, p) for p in range(producers)]
    else:
        topics = [(f"persistent://public/default/{topic}-{p}", None) for p in range(producers)]
    cpu0 = cpu_seconds(pid)
    results = []
    start = time.perf_counter()
    if kind == "kafka":
        run_threads([(kafka_produce, (target, t, p, size, MESSAGES, results)) for t, p in topics])
    else:
        run_threads([(pulsar_produce, (target, t, size, MESSAGES, results)) for t, _ in topics])
    produced_s = time.perf_counter() - start
    produced = sum(r[0] for r in results)
    lat = [x for r in results for x in r[1]]
    got = []
    start = time.perf_counter()
    if kind == "kafka":
        run_threads([(kafka_consume, (target, t, p, MESSAGES, got)) for t, p in topics])
    else:
        run_threads([(pulsar_consume, (target, t, MESSAGES, got)) for t, _ in topics])
    consumed_s = time.perf_counter() - start
    cpu = cpu_seconds(pid) - cpu0
    consumed = sum(got)
    if produced != producers * MESSAGES or consumed != producers * MESSAGES:
        print(f"  ! {kind}: produced {produced}, consumed {consumed} of {producers * MESSAGES}")
    return (
        produced / produced_s,
        p99(lat) * 1000,
        consumed / consumed_s if consumed_s > 0 else 0.0,
        cpu * 1e6 / max(1, produced),
    )


def fmt(f):
    return f"{f[0]:>9,.0f} {f[1]:>7.1f} {f[2]:>9,.0f} {f[3]:>6.1f}"


def main():
    rows = [(s, p) for s, p in ROWS if not ONLY or f"{s}x{p}" in ONLY]
    with tempfile.TemporaryDirectory(prefix="magnetar-kafka-bench-") as tmp:
        tmp = Path(tmp)
        (tmp / "gw").mkdir()
        gw = Gateway(tmp / "gw")
        tansu = None
        if shutil.which(TANSU) or Path(TANSU).exists():
            (tmp / "tansu").mkdir()
            try:
                tansu = Tansu(tmp / "tansu")
            except RuntimeError as e:
                print(f"Tansu did not start ({e}); its columns stay empty")
        try:
            servers = {
                "magnetar": ("kafka", gw.bootstrap, gw.proc.pid),
                "native": ("pulsar", gw.service_url, gw.proc.pid),
            }
            if tansu:
                servers["tansu"] = ("kafka", tansu.bootstrap, tansu.proc.pid)
            # Warm-up, unreported.
            global MESSAGES
            measured, MESSAGES = MESSAGES, 2000
            for server in servers.values():
                row(server, 100, 1)
            MESSAGES = measured
            print(f"load: {os.getloadavg()[0]:.1f}; {MESSAGES} messages per producer")
            print(
                "row        server     produce/s  p99 ms  consume/s µs/msg   vs native  vs tansu  cpu/native"
            )
            for size, producers in rows:
                figures = {}
                names = list(servers)
                # The order alternates from row to row.
                if (size + producers) % 2:
                    names.reverse()
                for name in names:
                    figures[name] = row(servers[name], size, producers)
                for name in servers:
                    f = figures[name]
                    vs_native = vs_tansu = cpu = ""
                    if name == "magnetar":
                        n = figures["native"]
                        vs_native = f"{f[0] / n[0]:.2f}x/{f[2] / n[2]:.2f}x"
                        cpu = f"{f[3] / n[3]:.1f}x"
                        if "tansu" in figures:
                            t = figures["tansu"]
                            vs_tansu = f"{f[0] / t[0]:.2f}x/{f[2] / t[2]:.2f}x"
                    print(f"{size:>4} B x{producers}  {name:<9} {fmt(f)}   {vs_native:>10} {vs_tansu:>9} {cpu:>10}")
                sys.stdout.flush()
        finally:
            stop(gw.proc)
            if tansu:
                stop(tansu.proc)


if __name__ == "__main__":
    main()
