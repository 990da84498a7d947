"""A queue's length cap as RabbitMQ 3.x classic queues apply it, and the gateway the same:
`x-max-length` and `x-max-length-bytes` with `x-overflow` `reject-publish` (a publisher in
confirm mode gets `basic.nack` for a message that would take the queue over a limit, which
the queue does not keep), `reject-publish-dlx` (the same, and the message is dead-lettered
with reason `maxlen`) and `drop-head` (the oldest ready messages go). What counts is the
queue's ready messages and their body bytes, not those delivered and unacknowledged. Each
test runs against a private RabbitMQ and against Magnetar (`amqp_server`), with pika."""
import datetime

import pika
import pika.exceptions
import pytest

from amqp_servers import unique
from test_amqp_connection import params
from test_amqp_messaging import bodies, conn, receive  # noqa: F401 (fixture)
from test_amqp_queues import assert_dead_lettered_as_maxlen, capped_beside_witness, dead_letter_target


def publish_all(ch, exchange, key, payloads, props=None) -> list[bool]:
    """Publishes each payload with confirms: whether each was acked (else nacked)."""
    acked = []
    for body in payloads:
        try:
            ch.basic_publish(exchange, key, body, props)
            acked.append(True)
        except pika.exceptions.NackError:
            acked.append(False)
    return acked


def test_reject_publish_nacks_the_message_a_full_queue_refuses(conn):
    ch = conn.channel()
    ch.confirm_delivery()
    fan, q, witness = unique("fan"), unique("capped"), unique("witness")
    ch.queue_declare(q, arguments={"x-max-length": 2, "x-overflow": "reject-publish"})
    ch.queue_declare(witness)
    ch.exchange_declare(fan, "fanout")
    ch.queue_bind(q, fan)
    ch.queue_bind(witness, fan)
    # The third would make three: nacked, though the witness queue took it.
    assert publish_all(ch, fan, "", [b"m-0", b"m-1", b"m-2"]) == [True, True, False]
    assert bodies(receive(ch, witness, 3, auto_ack=True)) == [b"m-0", b"m-1", b"m-2"]
    ch.cancel()
    # The capped queue holds exactly its two: a consumer reads them, in order, and nothing
    # more; its prefetch (2) is full then, so it takes nothing else.
    reader = conn.channel()
    reader.basic_qos(prefetch_count=2)
    held = receive(reader, q, 3, timeout=2.0)
    assert [body for _, _, body in held] == [b"m-0", b"m-1"]
    # Delivered and unacknowledged, they are not ready: the queue takes two more (RabbitMQ
    # counts ready messages only), then refuses.
    assert publish_all(ch, "", q, [b"m-3", b"m-4", b"m-5"]) == [True, True, False]
    for method, _, _ in held:
        reader.basic_ack(method.delivery_tag)
    rest = receive(reader, q, 3, timeout=2.0)
    assert [body for _, _, body in rest] == [b"m-3", b"m-4"]
    for method, _, _ in rest:
        reader.basic_ack(method.delivery_tag)
    reader.cancel()
    # Empty again: it takes messages again.
    assert publish_all(ch, "", q, [b"m-6"]) == [True]
    assert [body for _, _, body in receive(ch, q, 1, auto_ack=True)] == [b"m-6"]
    ch.cancel()


def test_a_requeued_message_counts_again(conn):
    ch = conn.channel()
    ch.confirm_delivery()
    ch.basic_qos(prefetch_count=1)
    q = unique("capped")
    ch.queue_declare(q, arguments={"x-max-length": 2, "x-overflow": "reject-publish"})
    assert publish_all(ch, "", q, [b"a"]) == [True]
    [(m, _, _)] = receive(ch, q, 1)
    ch.cancel()
    # `a` is delivered and unacknowledged: one more is ready, then `a` comes back and the
    # queue is full (requeued, it counts again), so the next publish is refused.
    assert publish_all(ch, "", q, [b"b"]) == [True]
    ch.basic_nack(m.delivery_tag, requeue=True)
    assert publish_all(ch, "", q, [b"c"]) == [False]
    got = receive(ch, q, 3, timeout=2.0, auto_ack=True)
    assert bodies(got) == [b"a", b"b"]
    assert [m.redelivered for m, _, body in got if body == b"a"] == [True]
    ch.cancel()


def test_reject_publish_dlx_dead_letters_the_refused_message_as_maxlen(conn):
    ch = conn.channel()
    ch.confirm_delivery()
    (dlx, dlq), q = dead_letter_target(ch), unique("capped")
    ch.queue_declare(
        q,
        arguments={
            "x-max-length": 1,
            "x-overflow": "reject-publish-dlx",
            "x-dead-letter-exchange": dlx,
        },
    )
    props = pika.BasicProperties(headers={"app": "kept"}, message_id="m-1")
    ch.basic_publish("", q, b"first")
    with pytest.raises(pika.exceptions.NackError):
        ch.basic_publish("", q, b"second", props)
    [(dm, dprops, body)] = receive(ch, dlq, 1, auto_ack=True)
    ch.cancel()
    assert body == b"second"
    assert (dm.exchange, dm.routing_key) == (dlx, q)
    assert dprops.message_id == "m-1"
    h = dprops.headers
    assert h["app"] == "kept"
    assert (h["x-first-death-reason"], h["x-first-death-queue"]) == ("maxlen", q)
    [death] = h["x-death"]
    assert isinstance(death.pop("time"), datetime.datetime)
    assert death == {
        "count": 1,
        "reason": "maxlen",
        "queue": q,
        "exchange": "",
        "routing-keys": [q],
    }
    # The queue kept the first only.
    assert [body for _, _, body in receive(ch, q, 2, timeout=2.0, auto_ack=True)] == [b"first"]
    ch.cancel()


def test_max_length_bytes_with_drop_head_keeps_the_newest_bytes(conn):
    ch = conn.channel()
    ch.confirm_delivery()
    dlx, dlq = dead_letter_target(ch)
    q, witness, fan = capped_beside_witness(ch, {"x-max-length-bytes": 10, "x-dead-letter-exchange": dlx})
    # Five bodies of 4 bytes: the newest two (8 bytes) fit in 10, three would not.
    sent = [f"m-0{i}".encode() for i in range(5)]
    assert publish_all(ch, fan, "", sent) == [True] * 5
    assert len(receive(ch, witness, 5, auto_ack=True)) == 5
    ch.cancel()
    survivors = receive(ch, q, 5, timeout=3.0, auto_ack=True)
    assert [body for _, _, body in survivors] == [b"m-03", b"m-04"]
    ch.cancel()
    assert_dead_lettered_as_maxlen(ch, dlq, q, [b"m-00", b"m-01", b"m-02"])


def test_max_length_bytes_with_reject_publish_refuses_what_would_not_fit(conn):
    ch = conn.channel()
    ch.confirm_delivery()
    q = unique("capped")
    ch.queue_declare(
        q, arguments={"x-max-length-bytes": 10, "x-overflow": "reject-publish"}
    )
    # 6 bytes fit; 5 more would be 11; 4 more are exactly 10; an empty body still fits.
    payloads = [b"aaaaaa", b"bbbbb", b"cccc", b"", b"d"]
    assert publish_all(ch, "", q, payloads) == [True, False, True, True, False]
    got = receive(ch, q, 4, timeout=2.0, auto_ack=True)
    assert [body for _, _, body in got] == [b"aaaaaa", b"cccc", b""]
    ch.cancel()


def test_a_full_queue_still_refuses_after_a_restart(restartable_amqp_server):
    """The gateway counts a queue's ready messages in memory: after a restart it starts
    again from the queue's backlog in the backend (once the queue is declared again)."""
    server = restartable_amqp_server
    q = "capped-across-restart"
    args = {"x-max-length": 2, "x-overflow": "reject-publish"}
    persistent = pika.BasicProperties(delivery_mode=2)
    conn = pika.BlockingConnection(params(server))
    ch = conn.channel()
    ch.confirm_delivery()
    ch.queue_declare(q, durable=True, arguments=args)
    assert publish_all(ch, "", q, [b"a", b"b"], persistent) == [True, True]
    # Both are in the queue (seen by a consumer, and given back as it goes).
    assert len(receive(ch, q, 2)) == 2
    conn.close()

    server.stop()
    server.start()

    conn = pika.BlockingConnection(params(server))
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        ch.queue_declare(q, durable=True, arguments=args)
        with pytest.raises(pika.exceptions.NackError):
            ch.basic_publish("", q, b"c", persistent)
        got = receive(ch, q, 3, timeout=2.0, auto_ack=True)
        assert [body for _, _, body in got] == [b"a", b"b"]
        ch.cancel()
        assert publish_all(ch, "", q, [b"d"], persistent) == [True]
    finally:
        conn.close()
