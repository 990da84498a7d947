"""AMQP 0-9-1 exchanges, queues and messages as RabbitMQ routes and delivers them, and the
gateway the same: each test runs against a private RabbitMQ and against Magnetar
(`amqp_server`), with pika (and aio-pika for a second stack)."""
import asyncio
import decimal
import time

import aio_pika
import pika
import pika.exceptions
import pytest

from amqp_servers import PASSWORD, USER, unique, wait_until
from test_amqp_connection import params


@pytest.fixture
def conn(amqp_server):
    c = pika.BlockingConnection(params(amqp_server))
    try:
        yield c
    finally:
        if c.is_open:
            c.close()


def receive(ch, queue, n, timeout=10.0, auto_ack=False):
    """Up to `n` messages of `queue` within `timeout` s: (method, properties, body) each."""
    got = []
    deadline = time.monotonic() + timeout
    for method, props, body in ch.consume(queue, auto_ack=auto_ack, inactivity_timeout=0.2):
        if method is not None:
            got.append((method, props, body))
        if len(got) >= n or time.monotonic() > deadline:
            break
    return got


def bodies(messages):
    return sorted(body for _, _, body in messages)


def test_default_exchange_keeps_every_property_byte_exact(conn):
    ch = conn.channel()
    q = unique("props")
    assert ch.queue_declare(q).method.queue == q
    headers = {
        "str": "héllo",
        "int": 42,
        "neg": -7,
        "big": 2**40,
        "bool": True,
        "dec": decimal.Decimal("12.34"),
        "none": None,
        "list": [1, "two", [3]],
        "table": {"nested": "yes"},
        "bytes": b"\x00\xff",
    }
    props = pika.BasicProperties(
        content_type="application/json",
        content_encoding="utf-8",
        headers=headers,
        delivery_mode=2,
        priority=5,
        correlation_id="corr-1",
        reply_to="reply-q",
        expiration="600000",
        message_id="msg-1",
        timestamp=1_700_000_000,
        type="order.created",
        user_id=USER,
        app_id="tests",
    )
    ch.basic_publish("", q, b"\x00payload\xff", props)
    [(method, got, body)] = receive(ch, q, 1)
    assert body == b"\x00payload\xff"
    assert method.exchange == "" and method.routing_key == q and not method.redelivered
    for name in ("content_type", "content_encoding", "delivery_mode", "priority",
                 "correlation_id", "reply_to", "expiration", "message_id", "timestamp",
                 "type", "user_id", "app_id"):
        assert getattr(got, name) == getattr(props, name), name
    assert got.headers == headers
    ch.basic_ack(method.delivery_tag)
    ch.cancel()
    assert receive(ch, q, 1, timeout=1.0) == []


ROUTES = {
    # exchange type: (binding of q1, binding of q2, [(routing key, headers, queues reached)])
    "direct": (("a", None), ("b", None), [("a", None, {1}), ("b", None, {2}), ("c", None, set())]),
    "fanout": (("", None), ("x", None), [("anything", None, {1, 2})]),
    "topic": (
        ("stock.*.nyse", None),
        ("stock.#", None),
        [("stock.ibm.nyse", None, {1, 2}), ("stock.ibm.lse", None, {2}), ("bond.x.nyse", None, set())],
    ),
    "headers": (
        ("", {"x-match": "all", "format": "pdf", "type": "report"}),
        ("", {"x-match": "any", "format": "pdf", "type": "log"}),
        [
            ("", {"format": "pdf", "type": "report"}, {1, 2}),
            ("", {"format": "zip", "type": "log"}, {2}),
            ("", {"format": "zip"}, set()),
        ],
    ),
}


@pytest.mark.parametrize("kind", sorted(ROUTES))
def test_each_exchange_type_routes_as_rabbitmq(conn, kind):
    ch = conn.channel()
    ex = unique(kind)
    ch.exchange_declare(ex, kind)
    b1, b2, cases = ROUTES[kind]
    queues = {}
    for i, (key, args) in ((1, b1), (2, b2)):
        q = unique(f"{kind}-q{i}")
        ch.queue_declare(q)
        ch.queue_bind(q, ex, routing_key=key, arguments=args)
        queues[i] = q
    expected = {1: [], 2: []}
    ch.confirm_delivery()
    for n, (key, headers, reached) in enumerate(cases):
        body = f"{n}".encode()
        ch.basic_publish(ex, key, body, pika.BasicProperties(headers=headers))
        for i in reached:
            expected[i].append(body)
    for i, q in queues.items():
        # Counted once every confirmed message's copies are in: nothing more reached it.
        assert ch.queue_declare(q, passive=True).method.message_count == len(expected[i])
        got = receive(ch, q, len(expected[i]), timeout=3.0, auto_ack=True)
        assert bodies(got) == sorted(expected[i]), (kind, i)
        ch.cancel()


def test_prefetch_one_gives_work_to_the_consumer_that_is_free(amqp_server):
    a = pika.BlockingConnection(params(amqp_server))
    b = pika.BlockingConnection(params(amqp_server))
    try:
        q = unique("work")
        cha, chb = a.channel(), b.channel()
        cha.queue_declare(q)
        cha.basic_qos(prefetch_count=1)
        chb.basic_qos(prefetch_count=1)
        got_a, got_b = [], []
        cha.basic_consume(q, lambda c, m, p, body: got_a.append(body))  # never acks
        chb.basic_consume(
            q, lambda c, m, p, body: (got_b.append(body), c.basic_ack(m.delivery_tag))
        )
        pub = a.channel()
        for i in range(6):
            pub.basic_publish("", q, f"job-{i}".encode())
        deadline = time.monotonic() + 15
        while len(got_a) + len(got_b) < 6 and time.monotonic() < deadline:
            a.process_data_events(0.05)
            b.process_data_events(0.05)
        assert len(got_a) == 1, got_a
        assert len(got_b) == 5, got_b
    finally:
        a.close()
        b.close()


def test_global_qos_limits_the_channels_consumers_together(conn):
    """RabbitMQ's `global` prefetch: a limit for all the channel's consumers together,
    beside each consumer's own (`global` false)."""
    ch = conn.channel()
    queues = [unique(f"global-{i}") for i in range(3)]
    pub = conn.channel()
    pub.confirm_delivery()
    for q in queues:
        ch.queue_declare(q)
        for i in range(2):
            pub.basic_publish("", q, f"{q}/{i}".encode())
    ch.basic_qos(prefetch_count=1)
    ch.basic_qos(prefetch_count=2, global_qos=True)
    got = []
    for q in queues:
        ch.basic_consume(q, lambda c, m, p, body: got.append((m.delivery_tag, body)))

    def settle(n, quiet=1.0):
        """Waits for `n` deliveries in all, then `quiet` s in which no more may come."""
        wait_until(lambda: conn.process_data_events(0.05) or len(got) >= n, what=f"{n} deliveries")
        deadline = time.monotonic() + quiet
        while time.monotonic() < deadline:
            conn.process_data_events(0.05)
        assert len(got) == n, got

    # Two for the channel, each from another consumer (one each).
    settle(2)
    assert len({body.split(b"/")[0] for _, body in got}) == 2
    # An ack opens the channel's window by one.
    ch.basic_ack(got[0][0])
    settle(3)
    # Without the channel's limit, each consumer's own (1) is all that holds them.
    ch.basic_qos(prefetch_count=0, global_qos=True)
    settle(4)
    ch.basic_ack(0, multiple=True)
    settle(6, quiet=0.5)
    assert sorted(body for _, body in got) == sorted(f"{q}/{i}".encode() for q in queues for i in range(2))
    ch.basic_ack(0, multiple=True)


def test_exchange_to_exchange_binding_routes_through_both_exchanges(conn):
    ch = conn.channel()
    ch.confirm_delivery()
    src, dst = unique("src"), unique("dst")
    ch.exchange_declare(src, "topic")
    ch.exchange_declare(dst, "direct")
    q, other = unique("e2e"), unique("e2e-other")
    ch.queue_declare(q)
    ch.queue_declare(other)
    ch.queue_bind(q, dst, "a.b")
    ch.queue_bind(other, dst, "x.y")
    ch.exchange_bind(destination=dst, source=src, routing_key="a.*")
    ch.basic_publish(src, "a.b", b"through both", mandatory=True)
    ch.basic_publish(src, "x.y", b"stopped by src")
    ch.basic_publish(src, "a.c", b"stopped by dst")
    ch.basic_publish(dst, "x.y", b"straight to dst")
    assert bodies(receive(ch, q, 2, timeout=3.0, auto_ack=True)) == [b"through both"]
    ch.cancel()
    assert bodies(receive(ch, other, 2, timeout=3.0, auto_ack=True)) == [b"straight to dst"]
    ch.cancel()
    # A queue bound to the destination afterwards is reached through the binding too.
    late = unique("e2e-late")
    ch.queue_declare(late)
    ch.queue_bind(late, dst, "a.z")
    ch.basic_publish(src, "a.z", b"late")
    assert bodies(receive(ch, late, 1, auto_ack=True)) == [b"late"]
    ch.cancel()
    # Unbound: nothing goes through any more; the destination still routes its own.
    ch.exchange_unbind(destination=dst, source=src, routing_key="a.*")
    ch.basic_publish(src, "a.b", b"after unbind")
    ch.basic_publish(dst, "a.b", b"direct")
    assert bodies(receive(ch, q, 2, timeout=3.0, auto_ack=True)) == [b"direct"]
    ch.cancel()
    # A missing source: 404 on the channel.
    bad = conn.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
        bad.exchange_bind(destination=dst, source=unique("missing"), routing_key="k")
    assert e.value.reply_code == 404


def test_exchange_delete_if_unused_refuses_a_source_and_a_delete_takes_its_bindings(conn):
    ch = conn.channel()
    ch.confirm_delivery()
    src, mid, dst, sink = (unique(f"xdel-{n}") for n in ("src", "mid", "dst", "sink"))
    for x in (src, mid, dst, sink):
        ch.exchange_declare(x, "direct")
    q, kept = unique("xdel-q"), unique("xdel-kept")
    ch.queue_declare(q)
    ch.queue_declare(kept)
    ch.queue_bind(q, mid, "k")
    ch.queue_bind(kept, dst, "k")
    ch.exchange_bind(destination=mid, source=src, routing_key="k")
    ch.exchange_bind(destination=sink, source=src, routing_key="k")
    # `if-unused`: the source of a queue's binding or of an exchange's is in use (406, the
    # channel closes); one that is only a destination is not.
    for x in (mid, src):
        bad = conn.channel()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
            bad.exchange_delete(x, if_unused=True)
        assert (e.value.reply_code, e.value.reply_text) == (
            406,
            f"PRECONDITION_FAILED - exchange '{x}' in vhost '/' in use",
        )
    ch.exchange_delete(sink, if_unused=True)
    ch.basic_publish(src, "k", b"through src and mid", mandatory=True)
    assert bodies(receive(ch, q, 1, auto_ack=True)) == [b"through src and mid"]
    ch.cancel()
    # Deleted, an exchange takes its bindings along: declared again, it routes nothing, and
    # nothing reaches the queue through it; the others' bindings stay.
    ch.exchange_delete(mid)
    ch.exchange_declare(mid, "direct")
    with pytest.raises(pika.exceptions.UnroutableError):
        ch.basic_publish(mid, "k", b"no binding left", mandatory=True)
    with pytest.raises(pika.exceptions.UnroutableError):
        ch.basic_publish(src, "k", b"no edge left", mandatory=True)
    ch.basic_publish(dst, "k", b"kept", mandatory=True)
    assert bodies(receive(ch, kept, 1, auto_ack=True)) == [b"kept"]
    ch.cancel()
    assert receive(ch, q, 1, timeout=1.0, auto_ack=True) == []
    ch.cancel()
    # Deleting an exchange that does not exist is fine, with `if-unused` too.
    ch.exchange_delete(unique("xdel-none"))
    ch.exchange_delete(unique("xdel-none"), if_unused=True)
    assert conn.is_open


def test_nack_with_requeue_delivers_again_with_redelivered(conn):
    ch = conn.channel()
    q = unique("nack")
    ch.queue_declare(q)
    ch.basic_publish("", q, b"again")
    [(m1, _, body)] = receive(ch, q, 1)
    assert body == b"again" and not m1.redelivered
    ch.basic_nack(m1.delivery_tag, requeue=True)
    [(m2, _, body)] = receive(ch, q, 1)
    assert body == b"again" and m2.redelivered
    ch.basic_reject(m2.delivery_tag, requeue=False)
    ch.cancel()
    assert receive(ch, q, 1, timeout=1.0) == []


def test_declaring_and_binding_a_queue_again_hands_out_nothing(conn):
    # A queue that holds messages is declared and bound again and again before anyone
    # consumes it: none of that hands a message to anybody, so every first delivery comes
    # with `redelivered` unset. (The gateway once opened a reader of the queue for each
    # declaration and bind, which could take the first message and give it back counted.)
    ch = conn.channel()
    ch.confirm_delivery()
    q = unique("redeclare")
    ch.queue_declare(q)
    for i in range(5):
        ch.basic_publish("", q, f"{i}".encode())
    for i in range(10):
        ch.queue_declare(q)
        ch.queue_bind(q, "amq.direct", routing_key=f"k{i}")
    got = receive(ch, q, 5)
    assert bodies(got) == [f"{i}".encode() for i in range(5)]
    assert [m.redelivered for m, _, _ in got] == [False] * 5


def test_declare_ok_and_purge_ok_count_the_queues_messages(conn):
    ch = conn.channel()
    ch.confirm_delivery()
    q = unique("count")
    assert ch.queue_declare(q).method.message_count == 0
    for i in range(7):
        ch.basic_publish("", q, f"{i}".encode())
    # Confirmed, so counted at once (the gateway counts once its copies are in).
    assert ch.queue_declare(q, passive=True).method.message_count == 7
    again = ch.queue_declare(q).method
    assert (again.message_count, again.consumer_count) == (7, 0)
    assert ch.queue_purge(q).method.message_count == 7
    assert ch.queue_declare(q, passive=True).method.message_count == 0
    for i in range(3):
        ch.basic_publish("", q, f"{i}".encode())
    assert ch.queue_delete(q).method.message_count == 3


def test_declare_ok_counts_the_queues_consumers_on_every_connection(amqp_server, conn):
    """declare-ok's consumer_count: the queue's consumers, whatever connection or channel
    holds them; a basic.get is none; a cancelled consumer and a closed connection's
    consumers leave the count (RabbitMQ at once, the gateway as the backend lets them go)."""
    ch = conn.channel()
    q = unique("consumers")
    assert ch.queue_declare(q).method.consumer_count == 0
    other = pika.BlockingConnection(params(amqp_server))
    try:
        och = other.channel()
        och.basic_consume(q, lambda *args: None)
        tag = ch.basic_consume(q, lambda *args: None)
        ch.connection.channel().basic_consume(q, lambda *args: None)
        och.basic_get(q)
        counted = lambda: ch.queue_declare(q, passive=True).method.consumer_count  # noqa: E731
        assert counted() == 3
        ch.basic_cancel(tag)
        wait_until(lambda: counted() == 2, timeout=5, what="the cancelled consumer to go")
        other.close()
        wait_until(lambda: counted() == 1, timeout=5, what="the closed connection's consumer")
    finally:
        if other.is_open:
            other.close()
    ch.queue_delete(q)


def test_publisher_confirms_ack_each_stored_message(conn):
    ch = conn.channel()
    ch.confirm_delivery()
    q = unique("confirm")
    ch.queue_declare(q, durable=True)
    for i in range(20):
        # In confirm mode pika waits for the broker's basic.ack and raises on a nack.
        ch.basic_publish("", q, f"{i}".encode(), pika.BasicProperties(delivery_mode=2))
    got = receive(ch, q, 20, auto_ack=True)
    assert bodies(got) == sorted(f"{i}".encode() for i in range(20))


def test_declare_mismatch_closes_the_channel_with_406(conn):
    ch = conn.channel()
    q = unique("mismatch")
    ch.queue_declare(q, durable=True)
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
        ch.queue_declare(q, durable=False)
    assert e.value.reply_code == 406
    assert "inequivalent arg 'durable'" in e.value.reply_text
    ex = unique("xmismatch")
    ch2 = conn.channel()
    ch2.exchange_declare(ex, "direct")
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
        ch2.exchange_declare(ex, "fanout")
    assert e.value.reply_code == 406
    # Only the channel: the connection goes on.
    assert conn.is_open and conn.channel().is_open


def test_passive_declares_of_missing_things_close_the_channel_with_404(conn):
    ch = conn.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
        ch.queue_declare(unique("missing"), passive=True)
    assert e.value.reply_code == 404
    ch = conn.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
        ch.exchange_declare(unique("missing"), passive=True)
    assert e.value.reply_code == 404
    ch = conn.channel()
    q = unique("exists")
    ch.queue_declare(q)
    assert ch.queue_declare(q, passive=True).method.queue == q
    assert conn.is_open


def test_publish_to_a_missing_exchange_closes_the_channel_with_404(conn):
    ch = conn.channel()
    ch.basic_publish(unique("nowhere"), "k", b"lost")
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
        ch.queue_declare(unique("after"))  # the next synchronous method sees the close
    assert e.value.reply_code == 404
    assert conn.is_open


def test_server_named_queue(conn):
    ch = conn.channel()
    name = ch.queue_declare("", exclusive=True).method.queue
    assert name.startswith("amq.gen-") and len(name) == len("amq.gen-") + 22
    ch.basic_publish("", name, b"to me")
    [(_, _, body)] = receive(ch, name, 1, auto_ack=True)
    assert body == b"to me"


def test_aio_pika_topic_exchange_round_trip(amqp_server):
    async def main():
        conn = await aio_pika.connect(
            f"amqp://{USER}:{PASSWORD}@127.0.0.1:{amqp_server.amqp_port}/", timeout=10
        )
        async with conn:
            ch = await conn.channel()  # publisher confirms on, aio-pika's default
            ex = await ch.declare_exchange(unique("aio"), aio_pika.ExchangeType.TOPIC)
            q = await ch.declare_queue(unique("aio-q"))
            await q.bind(ex, "logs.#")
            await ex.publish(
                aio_pika.Message(b"kept", headers={"n": 1}, correlation_id="c"),
                routing_key="logs.app.error",
            )
            await ex.publish(aio_pika.Message(b"dropped"), routing_key="metrics.cpu")
            msg = None
            async with q.iterator() as it:
                async for message in it:
                    async with message.process():
                        msg = message
                    break
            assert msg.body == b"kept" and msg.headers == {"n": 1}
            assert msg.correlation_id == "c" and msg.routing_key == "logs.app.error"

    asyncio.run(asyncio.wait_for(main(), 30))


def test_basic_get_sees_every_confirmed_message_and_an_empty_queue_at_once(conn):
    ch = conn.channel()
    ch.confirm_delivery()
    q = unique("getconfirmed")
    ch.queue_declare(q)
    # Empty from the start, and after a message came and went.
    assert ch.basic_get(q) == (None, None, None)
    for i in range(3):
        ch.basic_publish("", q, f"m{i}".encode())
    got = []
    for _ in range(3):
        start = time.monotonic()
        method, _, body = ch.basic_get(q)
        took = time.monotonic() - start
        assert method is not None, f"a confirmed message is in the queue (got {got}; {took:.3f} s)"
        got.append(body)
        ch.basic_ack(method.delivery_tag)
    assert sorted(got) == [b"m0", b"m1", b"m2"]
    assert ch.basic_get(q) == (None, None, None)
    ch.basic_publish("", q, b"again")
    start = time.monotonic()
    method, _, body = ch.basic_get(q, auto_ack=True)
    took = time.monotonic() - start
    # The time tells a count that missed the message (at once) from a wait that ran out.
    assert body == b"again", f"get-empty after {took:.3f} s"
    assert ch.basic_get(q) == (None, None, None)


def test_get_ok_says_how_many_messages_are_left_so_a_drain_loop_takes_them_all(conn):
    ch = conn.channel()
    ch.confirm_delivery()
    q = unique("getleft")
    ch.queue_declare(q)
    for i in range(3):
        ch.basic_publish("", q, f"m{i}".encode())
    # Messages got and not acknowledged yet are not left; the next get takes the next one.
    left = []
    for auto_ack in (False, False, True):
        method, _, body = ch.basic_get(q, auto_ack=auto_ack)
        assert method is not None, f"get-empty after {left}"
        left.append((body, method.message_count))
    assert left == [(b"m0", 2), (b"m1", 1), (b"m2", 0)]
    ch.basic_ack(0, multiple=True)
    assert ch.basic_get(q) == (None, None, None)
    # The loop RabbitMQ applications write: get until the queue says none are left.
    sent = [f"d{i}".encode() for i in range(5)]
    for body in sent:
        ch.basic_publish("", q, body)
    got = []
    while True:
        method, _, body = ch.basic_get(q, auto_ack=True)
        assert method is not None, f"get-empty after {got}"
        got.append(body)
        if method.message_count == 0:
            break
    assert got == sent
    assert ch.basic_get(q) == (None, None, None)


def test_basic_get_takes_one_message_at_a_time_then_says_empty(conn):
    ch = conn.channel()
    q = unique("get")
    ch.queue_declare(q)
    for i in range(3):
        ch.basic_publish("", q, f"m{i}".encode())
    got = []
    deadline = time.monotonic() + 10
    while len(got) < 3 and time.monotonic() < deadline:
        method, props, body = ch.basic_get(q)
        if method is None:
            continue  # not routed into the queue yet
        got.append(body)
        ch.basic_ack(method.delivery_tag)
    assert sorted(got) == [b"m0", b"m1", b"m2"]
    assert ch.basic_get(q) == (None, None, None)
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
        ch.basic_get(unique("missing"))
    assert e.value.reply_code == 404


def test_mandatory_unroutable_message_is_returned_before_its_confirm(conn):
    ch = conn.channel()
    ch.confirm_delivery()
    ex = unique("mand")
    ch.exchange_declare(ex, "direct")
    q = unique("mand-q")
    ch.queue_declare(q)
    ch.queue_bind(q, ex, routing_key="routed")
    returned = []
    ch.add_on_return_callback(lambda c, m, p, body: returned.append((m.reply_code, m.routing_key, body)))
    # pika raises UnroutableError for a confirmed message that came back.
    with pytest.raises(pika.exceptions.UnroutableError):
        ch.basic_publish(ex, "nowhere", b"back to me", mandatory=True)
    ch.basic_publish(ex, "routed", b"kept", mandatory=True)
    conn.process_data_events(0.2)
    assert returned == [(312, "nowhere", b"back to me")]
    [(_, _, body)] = receive(ch, q, 1, auto_ack=True)
    assert body == b"kept"
