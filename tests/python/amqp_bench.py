"""A first side-by-side measure of the AMQP plugin against RabbitMQ, in one run on one
machine (not the issue's benchmark: one pika client, so it measures round trips more than
the servers' throughput).

    MAGNETAR_BIN=$PWD/target/release/magnetar .venv/bin/python tests/python/amqp_bench.py [N]

For each server: N persistent 64-byte messages published to a durable queue with publisher
confirms (pika's blocking channel waits for each confirm: publish-to-confirm latency), then
consumed with manual acks (prefetch 100). Prints msgs/s and the p50/p99 confirm latency, and
the ratios Magnetar / RabbitMQ.
"""
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pika  # noqa: E402

from amqp_servers import PASSWORD, USER, AmqpGateway, RabbitMQ  # noqa: E402


def measure(port: int, n: int) -> dict:
    conn = pika.BlockingConnection(
        pika.ConnectionParameters(
            host="127.0.0.1", port=port, credentials=pika.PlainCredentials(USER, PASSWORD)
        )
    )
    ch = conn.channel()
    ch.confirm_delivery()
    q = f"bench-{uuid.uuid4().hex[:8]}"
    ch.queue_declare(q, durable=True)
    props = pika.BasicProperties(delivery_mode=2)
    body = b"x" * 64
    latencies = []
    start = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        ch.basic_publish("", q, body, props)
        latencies.append(time.perf_counter() - t)
    publish_s = time.perf_counter() - start
    ch.basic_qos(prefetch_count=100)
    got = 0
    start = time.perf_counter()
    for method, _, _ in ch.consume(q, inactivity_timeout=10):
        if method is None:
            break
        ch.basic_ack(method.delivery_tag)
        got += 1
        if got == n:
            break
    consume_s = time.perf_counter() - start
    ch.cancel()
    conn.close()
    latencies.sort()
    return {
        "publish_msgs_s": n / publish_s,
        "confirm_p50_ms": latencies[len(latencies) // 2] * 1000,
        "confirm_p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
        "consume_msgs_s": got / consume_s,
        "consumed": got,
    }


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    results = {}
    for name, cls in (("rabbitmq", RabbitMQ), ("magnetar", AmqpGateway)):
        tmp = Path(tempfile.mkdtemp(prefix=f"amqp-bench-{name}-"))
        server = cls(tmp)
        try:
            server.start()
            measure(server.amqp_port, 100)  # warm-up
            results[name] = measure(server.amqp_port, n)
        finally:
            server.stop()
            shutil.rmtree(tmp, ignore_errors=True)
    for name, r in results.items():
        print(name, {k: round(v, 2) for k, v in r.items()})
    m, r = results["magnetar"], results["rabbitmq"]
    for key in ("publish_msgs_s", "consume_msgs_s"):
        print(f"{key}: magnetar/rabbitmq = {m[key] / r[key]:.2f}x")
    for key in ("confirm_p50_ms", "confirm_p99_ms"):
        print(f"{key}: magnetar/rabbitmq = {m[key] / r[key]:.2f}x (lower is better)")


if __name__ == "__main__":
    main()
