"""What RabbitMQ does with a queue's waiting, unacknowledged, expired and rejected messages,
and the gateway the same: `queue.purge`, `basic.recover`, per-message `expiration` and
`x-message-ttl`, dead-letter exchanges with the `x-death` header, `queue.delete`'s
`if-unused` and `if-empty`, `x-max-length` (drop-head). Each test runs against a private RabbitMQ and against Magnetar
(`amqp_server`), with pika."""
import datetime
import time

import pika
import pika.exceptions
import pytest

from amqp_servers import unique
from test_amqp_connection import params
from test_amqp_messaging import bodies, conn, receive  # noqa: F401 (fixture)


def dead_letter_target(ch) -> tuple:
    """A fresh fanout dead-letter exchange and the queue bound to it: (exchange, queue)."""
    dlx, dlq = unique("dlx"), unique("dlq")
    ch.exchange_declare(dlx, "fanout")
    ch.queue_declare(dlq)
    ch.queue_bind(dlq, dlx)
    return dlx, dlq


def capped_beside_witness(ch, arguments: dict) -> tuple:
    """A queue declared with `arguments` and an uncapped witness queue, both bound to a fresh
    fanout exchange, so that once the witness holds what was published, so has the queue:
    (queue, witness, exchange)."""
    q, witness, fan = unique("capped"), unique("witness"), unique("fan")
    ch.queue_declare(q, arguments=arguments)
    ch.queue_declare(witness)
    ch.exchange_declare(fan, "fanout")
    ch.queue_bind(q, fan)
    ch.queue_bind(witness, fan)
    return q, witness, fan


def assert_dead_lettered_as_maxlen(ch, dlq: str, q: str, expected: list) -> None:
    """The dead-letter queue holds `expected` (bodies, in order), each died in `q` for
    `maxlen`."""
    dead = receive(ch, dlq, len(expected) + 1, timeout=3.0, auto_ack=True)
    assert bodies(dead) == expected
    for _, props, _ in dead:
        [death] = props.headers["x-death"]
        assert (death["reason"], death["queue"]) == ("maxlen", q)
    ch.cancel()


def test_purge_drops_the_waiting_messages(conn):
    q = unique("purge")
    ch1 = conn.channel()
    ch1.queue_declare(q)
    for i in range(5):
        ch1.basic_publish("", q, f"p-{i}".encode())
    # All five are in the queue once a consumer has had them; closing its channel puts them
    # back (unacknowledged).
    assert len(receive(ch1, q, 5)) == 5
    ch1.close()
    ch2 = conn.channel()
    assert ch2.queue_purge(q).method.NAME == "Queue.PurgeOk"
    assert receive(ch2, q, 1, timeout=1.5) == []
    ch2.basic_publish("", q, b"after")
    assert bodies(receive(ch2, q, 2, timeout=3.0)) == [b"after"]


@pytest.mark.parametrize("holder_on", ["same connection", "other connection"])
def test_purge_keeps_what_consumers_hold_unacknowledged(amqp_server, holder_on):
    """Only the ready messages go: those a consumer holds unacknowledged stay with it, and
    come back to the queue when it rejects them."""
    conn = pika.BlockingConnection(params(amqp_server))
    other = pika.BlockingConnection(params(amqp_server)) if holder_on == "other connection" else conn
    try:
        q = unique("purge-held")
        ch = conn.channel()
        ch.queue_declare(q)
        ch.confirm_delivery()
        for i in range(5):
            ch.basic_publish("", q, f"p-{i}".encode())
        holder = other.channel()
        holder.basic_qos(prefetch_count=2)
        held = receive(holder, q, 2)
        assert [body for _, _, body in held] == [b"p-0", b"p-1"]
        assert ch.queue_purge(q).method.message_count == 3
        holder.cancel()
        holder.basic_nack(held[-1][0].delivery_tag, multiple=True, requeue=True)
        back = receive(ch, q, 3, timeout=2.0)
        assert [(body, m.redelivered) for m, _, body in back] == [(b"p-0", True), (b"p-1", True)]
        ch.basic_ack(back[-1][0].delivery_tag, multiple=True)
        ch.cancel()
        assert ch.queue_declare(q, passive=True).method.message_count == 0
    finally:
        for c in {id(conn): conn, id(other): other}.values():
            c.close()


def test_purge_of_a_missing_queue_closes_the_channel_with_404(conn):
    ch = conn.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
        ch.queue_purge(unique("missing"))
    assert e.value.reply_code == 404


def delete_refused(conn, queue, **conditions) -> tuple[int, str]:
    """The reply code and text of the channel error of `queue.delete` with `conditions`."""
    ch = conn.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
        ch.queue_delete(queue, **conditions)
    return e.value.reply_code, e.value.reply_text


def test_delete_if_unused_and_if_empty_refuse_a_used_or_full_queue_with_406(amqp_server):
    a = pika.BlockingConnection(params(amqp_server))
    b = pika.BlockingConnection(params(amqp_server))
    try:
        q = unique("cond")
        ach = a.channel()
        ach.queue_declare(q)
        in_use = (406, f"PRECONDITION_FAILED - queue '{q}' in vhost '/' in use")
        # A consumer on another connection, then one on the same connection: in use.
        bch = b.channel()
        btag = bch.basic_consume(q, lambda *args: None)
        assert delete_refused(a, q, if_unused=True) == in_use
        bch.basic_cancel(btag)
        atag = ach.basic_consume(q, lambda *args: None)
        assert delete_refused(a, q, if_unused=True) == in_use
        ach.basic_cancel(atag)
        # A ready message (delivered once, given back unacknowledged): not empty.
        ach.basic_publish("", q, b"waiting")
        assert bodies(receive(ach, q, 1)) == [b"waiting"]
        ach.close()
        not_empty = (406, f"PRECONDITION_FAILED - queue '{q}' in vhost '/' not empty")
        assert delete_refused(a, q, if_empty=True) == not_empty
        assert delete_refused(a, q, if_unused=True, if_empty=True) == not_empty
        # The queue is as it was: its message is still there.
        ch = a.channel()
        assert bodies(receive(ch, q, 1, auto_ack=True)) == [b"waiting"]
        ch.cancel()
        # Unused and empty now: deleted.
        ok = a.channel().queue_delete(q, if_unused=True, if_empty=True)
        assert ok.method.NAME == "Queue.DeleteOk"
        ch = a.channel()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
            ch.queue_declare(q, passive=True)
        assert e.value.reply_code == 404
        # `if-unused` alone on a queue of messages: `delete-ok` counts them.
        full = unique("cond-full")
        ch = a.channel()
        ch.confirm_delivery()
        ch.queue_declare(full)
        for body in (b"one", b"two"):
            ch.basic_publish("", full, body)
        ok = ch.queue_delete(full, if_unused=True)
        assert ok.method.message_count == 2
    finally:
        for c in (a, b):
            if c.is_open:
                c.close()


def test_recover_redelivers_every_unacknowledged_message(conn):
    ch = conn.channel()
    q = unique("recover")
    ch.queue_declare(q)
    for i in range(3):
        ch.basic_publish("", q, f"r-{i}".encode())
    first = receive(ch, q, 3)
    assert bodies(first) == [b"r-0", b"r-1", b"r-2"]
    assert not any(m.redelivered for m, _, _ in first)
    ch.basic_recover(requeue=True)
    again = receive(ch, q, 3)
    assert bodies(again) == [b"r-0", b"r-1", b"r-2"]
    assert all(m.redelivered for m, _, _ in again)
    # The first delivery tags are void: acking the new ones empties the queue.
    ch.basic_ack(again[-1][0].delivery_tag, multiple=True)
    ch.cancel()
    assert receive(ch, q, 1, timeout=1.0) == []


def test_recover_without_requeue_is_not_implemented(conn):
    ch = conn.channel()
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as e:
        ch.basic_recover(requeue=False)
    assert e.value.reply_code == 540


def test_message_expiration_and_queue_ttl_drop_messages_that_waited_longer(conn):
    ch = conn.channel()
    q = unique("ttl")
    ch.queue_declare(q, arguments={"x-message-ttl": 1500})
    ch.basic_publish("", q, b"queue-ttl")
    ch.basic_publish("", q, b"own-ttl", pika.BasicProperties(expiration="300"))
    ch.basic_publish("", q, b"own-ttl-longer", pika.BasicProperties(expiration="60000"))
    # Both TTLs must pass while the messages wait: time itself is the condition.
    time.sleep(1.8)
    ch.basic_publish("", q, b"fresh")
    ch.basic_publish("", q, b"fresh-own", pika.BasicProperties(expiration="60000"))
    got = receive(ch, q, 2, timeout=5.0, auto_ack=True)
    assert bodies(got) == [b"fresh", b"fresh-own"]
    ch.cancel()
    assert receive(ch, q, 1, timeout=1.0) == []


def test_invalid_ttls_close_the_channel_with_406(conn):
    ch = conn.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
        ch.queue_declare(unique("ttl-bad"), arguments={"x-message-ttl": -1})
    assert e.value.reply_code == 406
    ch = conn.channel()
    q = unique("expiration-bad")
    ch.queue_declare(q)
    ch.basic_publish("", q, b"x", pika.BasicProperties(expiration="soon"))
    # The channel error arrives asynchronously; the next synchronous method sees it.
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
        ch.queue_declare(q, passive=True)
    assert e.value.reply_code == 406


def test_message_expiration_applies_to_basic_get(conn):
    ch = conn.channel()
    q = unique("ttl-get")
    ch.queue_declare(q)
    ch.basic_publish("", q, b"short", pika.BasicProperties(expiration="200"))
    ch.basic_publish("", q, b"long", pika.BasicProperties(expiration="60000"))
    time.sleep(0.6)
    deadline = time.monotonic() + 5
    got = []
    while time.monotonic() < deadline and len(got) < 2:
        method, _, body = ch.basic_get(q, auto_ack=True)
        if method is None:
            if got:
                break
            continue
        got.append(body)
    assert got == [b"long"]


def dead_letter_setup(ch, **queue_args):
    """A direct dead-letter exchange, a queue bound to it with `dead`, and a queue whose
    rejected messages go there."""
    dlx, dlq, q = unique("dlx"), unique("dlq"), unique("work")
    ch.exchange_declare(dlx, "direct")
    ch.queue_declare(dlq)
    ch.queue_bind(dlq, dlx, "dead")
    ch.queue_declare(q, arguments={"x-dead-letter-exchange": dlx, **queue_args})
    return dlx, dlq, q


def test_rejected_message_is_dead_lettered_with_x_death(conn):
    ch = conn.channel()
    dlx, dlq, q = dead_letter_setup(ch, **{"x-dead-letter-routing-key": "dead"})
    props = pika.BasicProperties(
        headers={"app": "kept"}, expiration="60000", message_id="m-1", delivery_mode=2
    )
    ch.basic_publish("", q, b"bad job", props)
    [(m, _, _)] = receive(ch, q, 1)
    ch.basic_reject(m.delivery_tag, requeue=False)
    ch.cancel()
    [(dm, dprops, body)] = receive(ch, dlq, 1, auto_ack=True)
    assert body == b"bad job"
    assert (dm.exchange, dm.routing_key, dm.redelivered) == (dlx, "dead", False)
    assert dprops.expiration is None
    assert (dprops.message_id, dprops.delivery_mode) == ("m-1", 2)
    h = dprops.headers
    assert h["app"] == "kept"
    assert h["x-first-death-reason"] == "rejected"
    assert h["x-first-death-queue"] == q
    assert h["x-first-death-exchange"] == ""
    [death] = h["x-death"]
    assert isinstance(death.pop("time"), datetime.datetime)
    assert death == {
        "count": 1,
        "reason": "rejected",
        "queue": q,
        "exchange": "",
        "routing-keys": [q],
        "original-expiration": "60000",
    }
    # Gone from its queue.
    ch.cancel()
    assert receive(ch, q, 1, timeout=1.0) == []


def test_nacked_messages_keep_their_routing_key_and_count_their_deaths(conn):
    ch = conn.channel()
    dlx, dlq, q = dead_letter_setup(ch)
    # Without a dead-letter routing key the message keeps its own: bind the work queue's
    # name too, and send the dead letters back to the work queue once.
    ch.queue_bind(q, dlx, q)
    ch.basic_publish("", q, b"twice")
    [(m, _, _)] = receive(ch, q, 1)
    ch.basic_nack(m.delivery_tag, multiple=True, requeue=False)
    [(m2, props2, body)] = receive(ch, q, 1)
    assert body == b"twice" and (m2.exchange, m2.routing_key) == (dlx, q)
    [death] = props2.headers["x-death"]
    assert (death["count"], death["reason"], death["exchange"]) == (1, "rejected", "")
    ch.basic_reject(m2.delivery_tag, requeue=False)
    [(m3, props3, _)] = receive(ch, q, 1)
    [death] = props3.headers["x-death"]
    assert (death["count"], death["queue"], death["routing-keys"]) == (2, q, [q])
    # The first death's exchange stays the first one.
    assert props3.headers["x-first-death-exchange"] == ""
    ch.basic_ack(m3.delivery_tag)
    ch.cancel()


def test_expired_message_is_dead_lettered_with_reason_expired(conn):
    ch = conn.channel()
    dlx, dlq, q = dead_letter_setup(ch, **{"x-dead-letter-routing-key": "dead"})
    ch.basic_publish("", q, b"late", pika.BasicProperties(expiration="200"))
    time.sleep(0.5)
    # Dead-lettered on its own (the gateway: swept by the connection that declared the
    # queue), so a consumer finds nothing.
    assert receive(ch, q, 1, timeout=1.0) == []
    ch.cancel()
    [(dm, dprops, body)] = receive(ch, dlq, 1, auto_ack=True)
    assert body == b"late" and dm.routing_key == "dead"
    [death] = dprops.headers["x-death"]
    assert (death["reason"], death["queue"], death["original-expiration"]) == (
        "expired",
        q,
        "200",
    )
    assert dprops.headers["x-first-death-reason"] == "expired"


def assert_expired_from(messages: list, queue: str, routing_key: str) -> None:
    """Each of `messages` was dead-lettered once from `queue`, expired, through the default
    exchange with `routing_key`."""
    for m, props, _ in messages:
        assert (m.exchange, m.routing_key, m.redelivered) == ("", routing_key, False)
        [death] = props.headers["x-death"]
        assert (death["reason"], death["queue"], death["count"]) == ("expired", queue, 1)


def test_a_wait_queue_nobody_consumes_dead_letters_each_message_once_its_ttl_passed(conn):
    """Delayed retries: messages wait in a queue with a TTL that nobody consumes, and its
    dead-letter exchange hands each to the work queue once the TTL passed."""
    ch = conn.channel()
    work, wait = unique("work"), unique("wait")
    ch.queue_declare(work)
    args = {"x-message-ttl": 600, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": work}
    ch.queue_declare(wait, arguments=args)
    ch.confirm_delivery()
    started = time.monotonic()
    for i in range(3):
        ch.basic_publish("", wait, f"retry-{i}".encode())
    got = receive(ch, work, 3, timeout=8.0, auto_ack=True)
    waited = time.monotonic() - started
    assert [body for _, _, body in got] == [b"retry-0", b"retry-1", b"retry-2"]
    assert_expired_from(got, wait, work)
    # Not before the TTL, and (the first) not long after it.
    assert waited >= 0.55, waited
    ch.cancel()
    assert ch.queue_declare(wait, passive=True).method.message_count == 0
    # A message published after the queue was swept empty waits its TTL too.
    started = time.monotonic()
    ch.basic_publish("", wait, b"later")
    [later] = receive(ch, work, 1, timeout=8.0, auto_ack=True)
    assert later[2] == b"later" and time.monotonic() - started >= 0.55
    assert_expired_from([later], wait, work)
    ch.cancel()


def test_a_ttl_queue_nobody_consumes_empties_once_its_messages_expired(conn):
    """Without a dead-letter exchange expired messages just go: a queue of stale readings
    nobody reads stays as long as its TTL allows."""
    ch = conn.channel()
    q = unique("stale")
    ch.queue_declare(q, arguments={"x-message-ttl": 1500})
    ch.confirm_delivery()
    for i in range(5):
        ch.basic_publish("", q, f"reading-{i}".encode())
    assert ch.queue_declare(q, passive=True).method.message_count == 5
    deadline = time.monotonic() + 8
    while ch.queue_declare(q, passive=True).method.message_count and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ch.queue_declare(q, passive=True).method.message_count == 0
    assert receive(ch, q, 1, timeout=0.5) == []
    ch.cancel()


def test_a_delay_queue_dead_letters_each_message_once_its_own_expiration_passed(conn):
    """Delays per message: a queue without a TTL that nobody consumes, messages published to
    it with an `expiration`; the head expires first (RabbitMQ expires at the head only)."""
    ch = conn.channel()
    work, delay = unique("work"), unique("delay")
    ch.queue_declare(work)
    ch.queue_declare(
        delay, arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": work}
    )
    ch.confirm_delivery()
    started = time.monotonic()
    ch.basic_publish("", delay, b"short", pika.BasicProperties(expiration="300"))
    ch.basic_publish("", delay, b"shorter", pika.BasicProperties(expiration="100"))
    got = receive(ch, work, 2, timeout=8.0, auto_ack=True)
    assert [body for _, _, body in got] == [b"short", b"shorter"]
    assert time.monotonic() - started >= 0.3
    assert_expired_from(got, delay, work)
    assert got[0][1].headers["x-death"][0]["original-expiration"] == "300"
    ch.cancel()


def test_a_dead_letter_cycle_without_a_rejection_is_broken(conn):
    """Two TTL queues that dead-letter into each other (and into a witness each), nobody
    consuming them: RabbitMQ drops the message where it would go round again without a
    client having rejected it, so each witness sees it once and the cycle stops."""
    ch = conn.channel()
    a, b, fan_a, fan_b = unique("cycle-a"), unique("cycle-b"), unique("fan-a"), unique("fan-b")
    witness_a, witness_b = unique("witness-a"), unique("witness-b")
    for fan, to, witness in ((fan_a, b, witness_a), (fan_b, a, witness_b)):
        ch.exchange_declare(fan, "fanout")
        ch.queue_declare(witness)
        ch.queue_bind(witness, fan)
    for q, fan in ((a, fan_a), (b, fan_b)):
        ch.queue_declare(q, arguments={"x-message-ttl": 100, "x-dead-letter-exchange": fan})
    ch.queue_bind(b, fan_a)
    ch.queue_bind(a, fan_b)
    ch.confirm_delivery()
    ch.basic_publish("", a, b"round")
    [(_, props_a, _)] = receive(ch, witness_a, 1, timeout=8.0, auto_ack=True)
    ch.cancel()
    [(_, props_b, _)] = receive(ch, witness_b, 1, timeout=8.0, auto_ack=True)
    ch.cancel()
    reasons = lambda props: [(d["queue"], d["reason"]) for d in props.headers["x-death"]]
    assert reasons(props_a) == [(a, "expired")]
    assert reasons(props_b) == [(b, "expired"), (a, "expired")]
    # Round once more would take a few TTLs (and sweeps): nothing comes.
    assert receive(ch, witness_a, 1, timeout=3.0) == []
    ch.cancel()
    for q in (a, b, witness_a, witness_b):
        assert ch.queue_declare(q, passive=True).method.message_count == 0, q


def test_max_length_keeps_the_newest_and_dead_letters_the_rest_as_maxlen(conn):
    ch = conn.channel()
    ch.confirm_delivery()
    dlx, dlq = dead_letter_target(ch)
    q, witness, fan = capped_beside_witness(ch, {"x-max-length": 2, "x-dead-letter-exchange": dlx})
    for i in range(5):
        ch.basic_publish(fan, "", f"m-{i}".encode())
    # Both queues take every message together: once the witness has all five, so has q.
    assert len(receive(ch, witness, 5, auto_ack=True)) == 5
    ch.cancel()
    survivors = receive(ch, q, 5, timeout=3.0, auto_ack=True)
    assert [body for _, _, body in survivors] == [b"m-3", b"m-4"]
    ch.cancel()
    assert_dead_lettered_as_maxlen(ch, dlq, q, [b"m-0", b"m-1", b"m-2"])
    # An overflow RabbitMQ does not know: 406.
    bad = conn.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
        bad.queue_declare(unique("bad"), arguments={"x-overflow": "drop-tail"})
    assert e.value.reply_code == 406
