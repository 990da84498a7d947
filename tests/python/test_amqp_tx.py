"""Transactions (the tx class) as RabbitMQ runs them, and the gateway the same
(`amqp_server`: RabbitMQ, then Magnetar): publishes and acknowledgements wait for
tx.commit; tx.rollback drops the publishes and gives acknowledged deliveries back."""
import time

import pika
import pika.exceptions
import pytest

from amqp_servers import unique
from test_amqp_messaging import conn  # noqa: F401 (fixture)


def get(ch, queue, timeout=10.0, auto_ack=True):
    """The next message of `queue` (method, properties, body), waiting up to `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        method, props, body = ch.basic_get(queue, auto_ack=auto_ack)
        if method is not None or time.monotonic() > deadline:
            return method, props, body
        time.sleep(0.05)


def test_commit_publishes_and_rollback_drops(conn):
    q = unique("tx")
    tx, other = conn.channel(), conn.channel()
    other.queue_declare(q)
    tx.tx_select()
    tx.basic_publish("", q, b"one")
    tx.basic_publish("", q, b"two")
    # Not before the commit (a second is plenty for a published message to arrive).
    assert get(other, q, timeout=1.0)[0] is None
    tx.tx_commit()
    assert [get(other, q)[2], get(other, q)[2]] == [b"one", b"two"]
    tx.basic_publish("", q, b"rolled back")
    tx.tx_rollback()
    tx.basic_publish("", q, b"three")
    tx.tx_commit()
    assert get(other, q)[2] == b"three"
    assert get(other, q, timeout=1.0)[0] is None


def test_acks_wait_for_the_commit_and_rollback_gives_them_back(conn):
    q = unique("tx-ack")
    ch = conn.channel()
    ch.queue_declare(q)
    ch.confirm_delivery()
    ch.basic_publish("", q, b"job")
    tx = conn.channel()
    tx.tx_select()
    method, _, body = get(tx, q, auto_ack=False)
    assert body == b"job" and not method.redelivered
    tx.basic_ack(method.delivery_tag)
    tx.tx_rollback()
    # Unacknowledged again: closing the channel gives it back to the queue.
    tx.close()
    tx = conn.channel()
    tx.tx_select()
    method, _, body = get(tx, q, auto_ack=False)
    assert body == b"job" and method.redelivered
    tx.basic_ack(method.delivery_tag)
    tx.tx_commit()
    tx.close()
    assert get(conn.channel(), q, timeout=1.0)[0] is None


def test_tx_and_confirms_exclude_each_other_and_commit_needs_select(conn):
    ch = conn.channel()
    ch.tx_select()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
        ch.confirm_delivery()
    assert e.value.reply_code == 406
    ch = conn.channel()
    ch.confirm_delivery()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
        ch.tx_select()
    assert e.value.reply_code == 406
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
        conn.channel().tx_commit()
    assert e.value.reply_code == 406
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
        conn.channel().tx_rollback()
    assert e.value.reply_code == 406
    assert conn.is_open
