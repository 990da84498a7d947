"""How long queues live, as RabbitMQ decides it, and the gateway the same (`amqp_server`:
RabbitMQ, then Magnetar): exclusive queues belong to their connection (405 RESOURCE_LOCKED
for the others) and go with it, auto-delete queues go with their last consumer, and a
consumer whose queue is deleted is told with basic.cancel."""
import socket
import struct
import subprocess
import sys
import time

import pika
import pika.exceptions
import pytest

from amqp_servers import EXCLUSIVE_LEASE_MS, unique, wait_until
from pamqp import commands, frame as pframe
from test_amqp_connection import Raw, params


def exists(conn, queue) -> bool:
    """A passive declaration on a channel of its own: True (also when another connection's
    exclusive queue, 405), or False on 404."""
    ch = conn.channel()
    try:
        ch.queue_declare(queue, passive=True)
    except pika.exceptions.ChannelClosedByBroker as e:
        assert e.reply_code in (404, 405), e
        return e.reply_code == 405
    ch.close()
    return True


def refused(conn, use) -> int:
    """The reply code of the channel error that `use(channel)` causes."""
    ch = conn.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
        use(ch)
        ch.basic_qos(prefetch_count=0)  # a synchronous method: the close arrives first
    return e.value.reply_code


def test_exclusive_queue_is_locked_to_its_connection_and_goes_with_it(amqp_server):
    owner = pika.BlockingConnection(params(amqp_server))
    other = pika.BlockingConnection(params(amqp_server))
    try:
        q = unique("excl")
        och = owner.channel()
        och.queue_declare(q, exclusive=True)
        uses = {
            "declare": lambda ch: ch.queue_declare(q, exclusive=True),
            "passive declare": lambda ch: ch.queue_declare(q, passive=True),
            "consume": lambda ch: ch.basic_consume(q, lambda *a: None),
            "get": lambda ch: ch.basic_get(q),
            "bind": lambda ch: ch.queue_bind(q, "amq.direct", routing_key="k"),
            "purge": lambda ch: ch.queue_purge(q),
            "delete": lambda ch: ch.queue_delete(q),
        }
        for what, use in uses.items():
            assert refused(other, use) == 405, what
        assert other.is_open
        # Publishing into it is anybody's right; the owner gets the message.
        pch = other.channel()
        pch.confirm_delivery()
        pch.basic_publish("", q, b"for the owner")
        got = wait_until(lambda: och.basic_get(q, auto_ack=True)[2], what="the message")
        assert got == b"for the owner"
        assert exists(owner, q)
        owner.close()
        wait_until(lambda: not exists(other, q), what="the queue to go with its connection")
    finally:
        for c in (owner, other):
            if c.is_open:
                c.close()


def test_exclusive_must_match_the_queue_on_redeclaration(amqp_server):
    conn = pika.BlockingConnection(params(amqp_server))
    try:
        shared, own = unique("shared"), unique("own")
        ch = conn.channel()
        ch.queue_declare(shared)
        ch.queue_declare(own, exclusive=True)
        assert refused(conn, lambda c: c.queue_declare(shared, exclusive=True)) == 405
        assert refused(conn, lambda c: c.queue_declare(own)) == 405
        # The owner declares its queue again as it is.
        assert conn.channel().queue_declare(own, exclusive=True).method.queue == own
        conn.channel().queue_delete(shared)
    finally:
        conn.close()


OWNER_SCRIPT = """
import sys, time, pika
conn = pika.BlockingConnection(pika.ConnectionParameters(
    host="127.0.0.1", port=int(sys.argv[1]),
    credentials=pika.PlainCredentials("guest", "guest")))
conn.channel().queue_declare(sys.argv[2], exclusive=True)
print("declared", flush=True)
time.sleep(60)
"""


def test_exclusive_queue_goes_when_its_connection_drops_without_close(amqp_server):
    """The owner's process is killed: no connection.close. RabbitMQ deletes the queue at
    once; the gateway too (the connection's will gives its lease up), well before the lease
    (EXCLUSIVE_LEASE_MS) would have run out."""
    q = unique("dropped")
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER_SCRIPT, str(amqp_server.amqp_port), q],
        stdout=subprocess.PIPE,
        text=True,
    )
    conn = pika.BlockingConnection(params(amqp_server))
    try:
        assert owner.stdout.readline().strip() == "declared"
        assert refused(conn, lambda c: c.queue_declare(q, passive=True)) == 405
        owner.kill()
        owner.wait(timeout=10)
        wait_until(lambda: not exists(conn, q), timeout=10, what="the dropped owner's queue to go")
        assert EXCLUSIVE_LEASE_MS >= 30_000
        # Its name is free again.
        assert conn.channel().queue_declare(q, exclusive=True).method.queue == q
    finally:
        owner.kill()
        owner.wait(timeout=10)
        conn.close()


def test_an_abruptly_closed_socket_takes_its_exclusive_queue_and_auto_delete_consumer(amqp_server):
    """A client's socket is reset (no connection.close): its exclusive queue is gone and
    so is the auto-delete queue it alone consumed, as soon as the server sees the socket go
    (the gateway: the connection's will gives its lease up; the auto-delete queue is found
    unused by the next connection that uses it), well before the lease would run out."""
    excl, auto = unique("excl-reset"), unique("auto-reset")
    raw = Raw(amqp_server)
    conn = pika.BlockingConnection(params(amqp_server))
    try:
        raw.handshake()
        raw.send(pframe.marshal(commands.Channel.Open(), 1))
        assert isinstance(raw.method()[1], commands.Channel.OpenOk)
        raw.send(pframe.marshal(commands.Queue.Declare(queue=excl, exclusive=True), 1))
        assert isinstance(raw.method()[1], commands.Queue.DeclareOk)
        raw.send(pframe.marshal(commands.Queue.Declare(queue=auto, auto_delete=True), 1))
        assert isinstance(raw.method()[1], commands.Queue.DeclareOk)
        raw.send(pframe.marshal(commands.Basic.Consume(queue=auto, consumer_tag="t"), 1))
        assert isinstance(raw.method()[1], commands.Basic.ConsumeOk)
        assert refused(conn, lambda c: c.queue_declare(excl, passive=True)) == 405
        assert exists(conn, auto)
        # A reset, not a close: SO_LINGER with a zero timeout.
        raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        raw.sock.close()
        wait_until(
            lambda: not exists(conn, excl) and not exists(conn, auto),
            timeout=10,
            what="the reset connection's queues to go",
        )
        assert EXCLUSIVE_LEASE_MS >= 30_000
    finally:
        raw.close()
        conn.close()


def test_auto_delete_queue_goes_with_its_last_consumer(amqp_server):
    a = pika.BlockingConnection(params(amqp_server))
    b = pika.BlockingConnection(params(amqp_server))
    try:
        q, idle = unique("auto"), unique("auto-idle")
        ach, bch = a.channel(), b.channel()
        ach.queue_declare(q, auto_delete=True)
        ach.queue_declare(idle, auto_delete=True)
        ta = ach.basic_consume(q, lambda *args: None)
        tb = bch.basic_consume(q, lambda *args: None)
        ach.basic_cancel(ta)
        # b still consumes it: it stays (RabbitMQ decides at once; a second is plenty).
        time.sleep(1.0)
        assert exists(a, q)
        bch.basic_cancel(tb)
        wait_until(lambda: not exists(a, q), what="the queue to go with its last consumer")
        # A queue that never had a consumer stays.
        assert exists(a, idle)
        a.channel().queue_delete(idle)
    finally:
        a.close()
        b.close()


def test_consumer_is_told_when_its_queue_is_deleted(amqp_server):
    conn = pika.BlockingConnection(params(amqp_server))
    try:
        q = unique("doomed")
        cch = conn.channel()
        cch.queue_declare(q)
        cancelled = []
        cch.add_on_cancel_callback(lambda frame: cancelled.append(frame.method.consumer_tag))
        tag = cch.basic_consume(q, lambda *args: None)
        conn.channel().queue_delete(q)
        deadline = time.monotonic() + 10
        while not cancelled and time.monotonic() < deadline:
            conn.process_data_events(time_limit=0.1)
        assert cancelled == [tag]
        # The channel goes on.
        assert cch.is_open
        cch.queue_declare(unique("after"), auto_delete=True)
    finally:
        conn.close()


def test_consumers_on_other_connections_are_told_when_their_queue_is_deleted(amqp_server):
    """RabbitMQ cancels every consumer of a deleted queue, on whatever connection; the
    gateway's consumers on other connections learn it from the queue's record (within a
    second). A queue deleted and declared again at once cancels them too."""
    consumer = pika.BlockingConnection(params(amqp_server))
    deleter = pika.BlockingConnection(params(amqp_server))
    try:
        q, again = unique("doomed-elsewhere"), unique("redeclared")
        cch = consumer.channel()
        cancelled = []
        cch.add_on_cancel_callback(lambda frame: cancelled.append(frame.method.consumer_tag))
        dch = deleter.channel()
        dch.queue_declare(q)
        dch.queue_declare(again)
        tag = cch.basic_consume(q, lambda *args: None)
        tag_again = cch.basic_consume(again, lambda *args: None)
        dch.queue_delete(q)
        dch.queue_delete(again)
        dch.queue_declare(again)
        deadline = time.monotonic() + 10
        while len(cancelled) < 2 and time.monotonic() < deadline:
            consumer.process_data_events(time_limit=0.1)
        assert sorted(cancelled) == sorted([tag, tag_again])
        # The consumer's connection and channel go on; the deleted queue is gone for it too.
        assert cch.is_open
        assert not exists(consumer, q)
        # The queue declared again is a queue: a message published into it arrives.
        dch.confirm_delivery()
        dch.basic_publish("", again, b"new incarnation")
        got = wait_until(lambda: cch.basic_get(again, auto_ack=True)[2], what="the message")
        assert got == b"new incarnation"
        dch.queue_delete(again)
    finally:
        for c in (consumer, deleter):
            if c.is_open:
                c.close()


def test_a_polling_get_learns_that_another_connection_deleted_its_queue(amqp_server):
    """A channel polling a queue with basic.get gets 404 once another connection deleted
    it: at once from RabbitMQ; from the gateway, whose polling channel reads the queue's
    record once a second rather than once per get, within about a second (meanwhile a get
    may say get-empty). The messages it polled before are its own to settle."""
    poller = pika.BlockingConnection(params(amqp_server))
    deleter = pika.BlockingConnection(params(amqp_server))
    try:
        q = unique("polled")
        dch = deleter.channel()
        dch.queue_declare(q)
        dch.confirm_delivery()
        dch.basic_publish("", q, b"one")
        pch = poller.channel()
        got = wait_until(lambda: pch.basic_get(q)[0], what="the message")
        assert pch.basic_get(q) == (None, None, None)
        dch.queue_delete(q)
        started = time.monotonic()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
            while time.monotonic() - started < 5:
                assert pch.basic_get(q) == (None, None, None)
                time.sleep(0.05)
        assert e.value.reply_code == 404
        assert time.monotonic() - started < 3
        assert got.delivery_tag == 1
        assert poller.is_open
    finally:
        for c in (poller, deleter):
            if c.is_open:
                c.close()


def test_queue_with_x_expires_goes_once_unused_for_that_long(amqp_server):
    """`x-expires` 1000 ms: a queue nobody uses goes after a second; one with a consumer
    stays, and goes a second after its consumer is cancelled. A passive declaration counts
    as a use (RabbitMQ resets the expiry on it), so the test looks 1.5 s apart."""
    a = pika.BlockingConnection(params(amqp_server))
    b = pika.BlockingConnection(params(amqp_server))

    def after(seconds: float):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            a.process_data_events(time_limit=0.05)
            b.process_data_events(time_limit=0.05)

    try:
        idle, consumed = unique("expires-idle"), unique("expires-consumed")
        ach = a.channel()
        ach.queue_declare(idle, arguments={"x-expires": 1000})
        ach.queue_declare(consumed, arguments={"x-expires": 1000})
        tag = ach.basic_consume(consumed, lambda *args: None)
        after(1.5)
        assert not exists(b, idle)
        # Consumed: kept past its x-expires.
        assert exists(b, consumed)
        after(1.5)
        assert exists(b, consumed)
        ach.basic_cancel(tag)
        after(1.5)
        assert not exists(b, consumed)
        # A zero x-expires is refused, as RabbitMQ refuses it.
        ch = b.channel()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
            ch.queue_declare(unique("expires-zero"), arguments={"x-expires": 0})
        assert e.value.reply_code == 406
    finally:
        a.close()
        b.close()


def test_deliveries_can_be_acked_after_their_consumer_is_cancelled(amqp_server):
    """RabbitMQ keeps a cancelled consumer's unacknowledged deliveries on the channel: they
    are acked afterwards (a worker that stops taking jobs finishes the ones it has) and not
    delivered again."""
    conn = pika.BlockingConnection(params(amqp_server))
    try:
        q = unique("cancel-then-ack")
        ch = conn.channel()
        ch.queue_declare(q)
        ch.confirm_delivery()
        for i in range(3):
            ch.basic_publish("", q, str(i).encode())
        ch.basic_qos(prefetch_count=3)
        got = []
        tag = ch.basic_consume(q, lambda c, m, p, body: got.append((m.delivery_tag, body)))
        deadline = time.monotonic() + 10
        while len(got) < 3 and time.monotonic() < deadline:
            conn.process_data_events(time_limit=0.1)
        assert sorted(body for _, body in got) == [b"0", b"1", b"2"]
        ch.basic_cancel(tag)
        for delivery_tag, _ in got:
            ch.basic_ack(delivery_tag)
        ch.basic_qos(prefetch_count=0)  # a round trip: an error would have closed the channel
        assert ch.is_open
        # Acked, so nothing comes again.
        other = conn.channel()
        assert other.basic_get(q, auto_ack=True)[0] is None
        time.sleep(0.6)  # the gateway's first basic.get waits up to 500 ms
        assert other.basic_get(q, auto_ack=True)[0] is None
    finally:
        conn.close()
