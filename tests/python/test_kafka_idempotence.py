"""Idempotent Kafka producers (KIP-98) on a real gateway: a retry never duplicates.

The client reaches the gateway through a loopback proxy that forwards every byte, except
that it swallows the response to chosen Produce requests and then drops the connection, as a
network failure after the broker stored the batch would. The producer reconnects and sends
the batch again with the same producer id and sequence; the gateway must answer it with the
original offsets and store it once. librdkafka (confluent-kafka) and kafka-python, both with
idempotence on.
"""
import socket
import struct
import threading
import time
import uuid

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from conftest import Gateway, free_ports, wait_for_port
from test_kafka import TIMEOUT, create_topic

PRODUCE = 0


class ProduceDropper:
    """A proxy on `port` to `upstream` that swallows the response of the Produce requests
    numbered in `drop` (1 = the first Produce through the proxy), then closes that client
    connection. Bounded: every socket has a timeout, `stop` ends it."""

    def __init__(self, port: int, upstream: int, drop: set):
        self.upstream = upstream
        self.drop = set(drop)
        self.produces = 0
        self.dropped = 0
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", port))
        self.listener.settimeout(0.2)
        self.stopping = False
        self.conns = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while not self.stopping:
            try:
                client, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream), timeout=TIMEOUT)
            client.settimeout(TIMEOUT)
            with self.lock:
                self.conns += [client, server]
            doomed = {}  # correlation id -> whether its response is swallowed
            threading.Thread(target=self._requests, args=(client, server, doomed), daemon=True).start()
            threading.Thread(target=self._responses, args=(server, client, doomed), daemon=True).start()

    @staticmethod
    def _frame(sock):
        head = b""
        while len(head) < 4:
            chunk = sock.recv(4 - len(head))
            if not chunk:
                return None
            head += chunk
        (size,) = struct.unpack(">i", head)
        body = b""
        while len(body) < size:
            chunk = sock.recv(min(65536, size - len(body)))
            if not chunk:
                return None
            body += chunk
        return head + body

    def _requests(self, client, server, doomed):
        try:
            while (frame := self._frame(client)) is not None:
                api_key, _version, correlation = struct.unpack(">hhi", frame[4:12])
                if api_key == PRODUCE:
                    with self.lock:
                        self.produces += 1
                        doomed[correlation] = self.produces in self.drop
                server.sendall(frame)
        except OSError:
            pass
        finally:
            self._close(client, server)

    def _responses(self, server, client, doomed):
        try:
            while (frame := self._frame(server)) is not None:
                (correlation,) = struct.unpack(">i", frame[4:8])
                if doomed.get(correlation):
                    with self.lock:
                        self.dropped += 1
                    break  # the batch is stored; its answer never arrives
                client.sendall(frame)
        except OSError:
            pass
        finally:
            self._close(client, server)

    @staticmethod
    def _close(*socks):
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def stop(self):
        self.stopping = True
        self.listener.close()
        self.thread.join(timeout=5)
        with self.lock:
            self._close(*self.conns)


class ProxiedKafkaGateway(Gateway):
    """A gateway whose `kafka` listener is advertised at the proxy's port, so that the
    client's every connection (bootstrap and the partition leader's) goes through it."""

    def __init__(self, tmp):
        self.kafka_port, self.proxy_port = free_ports(2)
        super().__init__(
            tmp,
            extra_config=(
                f'\n[[listeners]]\nname = "kafka"\nbind = "127.0.0.1:{self.kafka_port}"\n'
                'plugin = "kafka"\n\n'
                f"[plugins.config.kafka]\nadvertised_port = {self.proxy_port}\n"
            ),
        )

    @property
    def bootstrap(self) -> str:
        """The proxy: the gateway names it as its address anyway."""
        return f"127.0.0.1:{self.proxy_port}"

    def start(self):
        super().start()
        wait_for_port(self.kafka_port, self.proc, self.log)
        return self


@pytest.fixture
def proxied(tmp_path):
    gw = ProxiedKafkaGateway(tmp_path).start()
    try:
        yield gw
    finally:
        gw.stop()


def with_proxy(gw, drop: set) -> ProduceDropper:
    return ProduceDropper(gw.proxy_port, gw.kafka_port, drop)


def read_all(gw, topic: str, count: int) -> list:
    """(offset, value) of the first `count` records of partition 0, then whatever else
    arrives within a second (a duplicate would)."""
    consumer = Consumer(
        {
            "bootstrap.servers": gw.bootstrap,
            "group.id": f"g-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
        }
    )
    try:
        consumer.assign([TopicPartition(topic, 0, 0)])
        got = []
        deadline = time.monotonic() + TIMEOUT
        while len(got) < count and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                got.append((msg.offset(), msg.value()))
        quiet = time.monotonic() + 1
        while time.monotonic() < quiet:
            msg = consumer.poll(0.2)
            if msg is not None and msg.error() is None:
                got.append((msg.offset(), msg.value()))
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=TIMEOUT)
        assert (low, high) == (0, count), "the log holds each record once"
        return got
    finally:
        consumer.close()


def test_librdkafka_retry_after_a_lost_response_is_not_stored_twice(proxied):
    topic = f"idem-{uuid.uuid4().hex[:12]}"
    proxy = with_proxy(proxied, drop={2, 5})
    try:
        create_topic(proxied, topic)
        producer = Producer(
            {
                "bootstrap.servers": proxied.bootstrap,
                "enable.idempotence": True,
                "linger.ms": 5,
                "retry.backoff.ms": 50,
                "message.timeout.ms": TIMEOUT * 1000,
            }
        )
        delivered, errors = [], []

        def on_delivery(err, msg):
            if err is not None:
                errors.append(err)
            else:
                delivered.append((msg.offset(), msg.value()))

        n = 0
        for _ in range(8):
            for _ in range(25):
                producer.produce(topic, value=f"v{n}".encode(), partition=0, on_delivery=on_delivery)
                n += 1
            assert producer.flush(TIMEOUT) == 0
        assert errors == []
        assert proxy.dropped == 2, "two responses were swallowed, so two batches were retried"
        expected = [(i, f"v{i}".encode()) for i in range(n)]
        assert sorted(delivered) == expected, "every delivery report names the record's one offset"
        assert read_all(proxied, topic, n) == expected
    finally:
        proxy.stop()


def test_kafka_python_idempotent_retry_is_not_stored_twice(proxied):
    from kafka import KafkaProducer

    topic = f"idem-{uuid.uuid4().hex[:12]}"
    proxy = with_proxy(proxied, drop={1})
    try:
        create_topic(proxied, topic)
        producer = KafkaProducer(
            bootstrap_servers=proxied.bootstrap,
            enable_idempotence=True,
            acks="all",
            retries=5,
            retry_backoff_ms=50,
            request_timeout_ms=TIMEOUT * 1000,
        )
        try:
            futures = []
            for i in range(30):
                futures.append(producer.send(topic, value=f"v{i}".encode(), partition=0))
                if i % 10 == 9:
                    producer.flush(timeout=TIMEOUT)
            offsets = [f.get(timeout=TIMEOUT).offset for f in futures]
        finally:
            producer.close(timeout=TIMEOUT)
        assert proxy.dropped == 1
        assert offsets == list(range(30))
        assert read_all(proxied, topic, 30) == [(i, f"v{i}".encode()) for i in range(30)]
    finally:
        proxy.stop()
