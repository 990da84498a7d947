"""Durable topology and persistent messages across a restart of the server, as RabbitMQ
keeps them, and the gateway the same (`restartable_amqp_server`: RabbitMQ, then Magnetar)."""
import asyncio
import time

import aio_pika
import pika
import pika.exceptions

from amqp_servers import PASSWORD, USER
from test_amqp_connection import params
from test_amqp_messaging import receive


def test_durable_exchange_queue_binding_and_messages_survive_a_restart(restartable_amqp_server):
    server = restartable_amqp_server
    conn = pika.BlockingConnection(params(server))
    ch = conn.channel()
    ch.confirm_delivery()
    ch.exchange_declare("orders", "topic", durable=True)
    ch.queue_declare("eu-orders", durable=True)
    ch.queue_bind("eu-orders", "orders", routing_key="eu.#")
    persistent = pika.BasicProperties(delivery_mode=2)
    ch.basic_publish("orders", "eu.fr.new", b"before restart", persistent)
    conn.close()

    server.stop()
    server.start()

    conn = pika.BlockingConnection(params(server))
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        # Passive declarations find both: they were stored.
        ch.exchange_declare("orders", passive=True)
        assert ch.queue_declare("eu-orders", passive=True).method.queue == "eu-orders"
        # The binding routes what is published now; the message confirmed before is there.
        ch.basic_publish("orders", "eu.de.new", b"after restart", persistent)
        ch.basic_publish("orders", "us.ny.new", b"not bound", persistent)
        got = receive(ch, "eu-orders", 3, timeout=10.0, auto_ack=True)
        assert sorted(body for _, _, body in got) == [b"after restart", b"before restart"]
    finally:
        conn.close()


def test_every_confirmed_message_survives_kill9_mid_stream(restartable_amqp_server):
    """A publisher with confirms and many messages in flight; the server is killed with
    SIGKILL while it publishes, then started again on the same data: every message whose
    confirm (basic.ack) the publisher got is in the queue."""
    server = restartable_amqp_server
    queue = "kill9-orders"
    confirmed: set[int] = set()
    window = 64

    async def publish_until_killed():
        conn = await aio_pika.connect(
            f"amqp://{USER}:{PASSWORD}@127.0.0.1:{server.amqp_port}/", timeout=10
        )
        ch = await conn.channel()  # publisher confirms on
        await ch.declare_queue(queue, durable=True)
        # The test is about messages: the declaration must outlive the kill on both.
        server.persist_topology()
        n = 0
        killed = False

        async def one(i: int):
            msg = aio_pika.Message(
                str(i).encode(), delivery_mode=aio_pika.DeliveryMode.PERSISTENT
            )
            await ch.default_exchange.publish(msg, routing_key=queue)
            confirmed.add(i)

        try:
            while True:
                batch = [one(n + k) for k in range(window)]
                n += window
                if not killed and len(confirmed) >= 500:
                    # Killed while this window is in flight.
                    tasks = [asyncio.ensure_future(b) for b in batch]
                    await asyncio.sleep(0)
                    server.kill9()
                    killed = True
                    await asyncio.gather(*tasks, return_exceptions=True)
                    return n
                await asyncio.gather(*batch)
        finally:
            try:
                await asyncio.wait_for(conn.close(), 2)
            except Exception:  # noqa: BLE001 (the server is gone)
                pass

    sent = asyncio.run(asyncio.wait_for(publish_until_killed(), 60))
    assert len(confirmed) >= 500, (sent, len(confirmed))
    server.start()

    conn = pika.BlockingConnection(params(server))
    try:
        ch = conn.channel()
        ch.queue_declare(queue, durable=True)
        got: set[int] = set()
        deadline = time.monotonic() + 30
        while not confirmed <= got and time.monotonic() < deadline:
            for _, _, body in receive(ch, queue, 10_000, timeout=2.0, auto_ack=True):
                got.add(int(body))
        missing = sorted(confirmed - got)
        assert not missing, f"{len(missing)} confirmed messages lost, e.g. {missing[:10]}"
    finally:
        conn.close()
