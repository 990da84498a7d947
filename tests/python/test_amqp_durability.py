"""Durable topology and persistent messages across a restart of the server, as RabbitMQ
keeps them, and the gateway the same (`restartable_amqp_server`: RabbitMQ, then Magnetar)."""
import pika
import pika.exceptions

from amqp_servers import restartable_amqp_server  # noqa: F401 (fixture)
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
