"""connection.blocked / connection.unblocked (RabbitMQ's extension) when the server holds a
publisher back, and the gateway the same (`amqp_server`: RabbitMQ, then Magnetar). The
pushback is each server's own: RabbitMQ's memory alarm (raised with rabbitmqctl), the
gateway's publish-rate quota of the user (SLOW_RATE msgs/s). Every message published while
blocked arrives once the pushback ends."""
import time

import pika

from amqp_servers import unique
from test_amqp_messaging import receive


def test_publisher_is_told_blocked_then_unblocked(amqp_server):
    server = amqp_server
    user = server.pressure_user
    conn = pika.BlockingConnection(
        pika.ConnectionParameters(
            host="127.0.0.1",
            port=server.amqp_port,
            credentials=pika.PlainCredentials(user, "guest" if user == "guest" else user),
            connection_attempts=1,
            socket_timeout=10,
            blocked_connection_timeout=60,
        )
    )
    events = []
    conn.add_on_connection_blocked_callback(lambda _c, frame: events.append(frame.method.NAME))
    conn.add_on_connection_unblocked_callback(lambda _c, frame: events.append(frame.method.NAME))

    def wait_for(n: int, timeout: float):
        deadline = time.monotonic() + timeout
        while len(events) < n and time.monotonic() < deadline:
            conn.process_data_events(time_limit=0.1)

    q = unique("blocked")
    ch = conn.channel()
    ch.queue_declare(q)
    server.push_back(True)
    try:
        for i in range(30):
            ch.basic_publish("", q, str(i).encode())
        wait_for(1, 15)
        assert events == ["Connection.Blocked"]
    finally:
        server.push_back(False)
    wait_for(2, 20)
    assert events == ["Connection.Blocked", "Connection.Unblocked"]
    got = receive(ch, q, 30, timeout=15.0, auto_ack=True)
    assert sorted(int(body) for _, _, body in got) == list(range(30))
    conn.close()
