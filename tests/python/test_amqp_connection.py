"""AMQP 0-9-1 connections as RabbitMQ serves them, and the gateway the same: every test runs
against a private RabbitMQ and against Magnetar (`amqp_server`), with pika, aio-pika, and a
raw socket speaking frames built with pamqp (aio-pika's codec) for what a client library
never sends (garbage, broken frames)."""
import asyncio
import os
import socket
import ssl
import struct
import time

import aio_pika
import pika
import pika.exceptions
import pytest
from pamqp import commands, frame as pframe, header as pheader

from conftest import Gateway, hold_ports, wait_for_port

from amqp_servers import PASSWORD, USER

PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"


def params(server, user=USER, password=PASSWORD, vhost="/", heartbeat=None):
    return pika.ConnectionParameters(
        host="127.0.0.1",
        port=server.amqp_port,
        virtual_host=vhost,
        credentials=pika.PlainCredentials(user, password),
        heartbeat=heartbeat,
        connection_attempts=1,
        socket_timeout=10,
        blocked_connection_timeout=10,
    )


def test_pika_connects_and_opens_channels(amqp_server):
    conn = pika.BlockingConnection(params(amqp_server))
    try:
        caps = conn._impl.server_capabilities
        for cap in (
            "publisher_confirms",
            "basic.nack",
            "consumer_cancel_notify",
            "exchange_exchange_bindings",
            "authentication_failure_close",
            "per_consumer_qos",
            "connection.blocked",
        ):
            assert caps.get(cap) is True, cap
        ch1 = conn.channel()
        ch2 = conn.channel()
        assert ch1.is_open and ch2.is_open and ch1.channel_number != ch2.channel_number
        ch1.close()
        assert ch1.is_closed and ch2.is_open
    finally:
        conn.close()
    assert conn.is_closed


def tls_params(server, context):
    return pika.ConnectionParameters(
        host="127.0.0.1",
        port=server.amqps_port,
        credentials=pika.PlainCredentials(USER, PASSWORD),
        ssl_options=pika.SSLOptions(context, server_hostname="localhost"),
        connection_attempts=1,
        socket_timeout=10,
    )


def test_amqps_with_pika_ssl_options(amqp_server):
    """AMQP over TLS (`amqps`, RabbitMQ's 5671): the server's certificate checked against
    its CA, then messages as on the plain port; a client that does not trust the CA is
    refused in the handshake."""
    conn = pika.BlockingConnection(
        tls_params(amqp_server, ssl.create_default_context(cafile=amqp_server.ca_file))
    )
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        q = ch.queue_declare("", exclusive=True).method.queue
        ch.basic_publish("", q, b"over tls")
        deadline = time.monotonic() + 10
        body = None
        while body is None and time.monotonic() < deadline:
            body = ch.basic_get(q, auto_ack=True)[2]
        assert body == b"over tls"
    finally:
        conn.close()
    with pytest.raises(ssl.SSLCertVerificationError):
        pika.BlockingConnection(tls_params(amqp_server, ssl.create_default_context()))


def test_wrong_password_is_refused(amqp_server):
    with pytest.raises(pika.exceptions.ProbableAuthenticationError) as e:
        pika.BlockingConnection(params(amqp_server, password="not-the-password"))
    assert "ACCESS_REFUSED" in str(e.value)


def test_standalone_gateway_takes_rabbitmqs_default_guest_login(tmp_path):
    """A gateway with no users (standalone: anonymous access allowed) takes RabbitMQ's
    default `guest`/`guest` from loopback, as RabbitMQ does (every RabbitMQ test here logs
    in so); any other password is still refused."""
    held = hold_ports(1)
    port = held[0].getsockname()[1]
    extra = f'\n[[listeners]]\nname = "amqp"\nbind = "127.0.0.1:{port}"\nplugin = "amqp"\n'
    if os.environ.get("MAGNETAR_PLUGIN_DIR"):
        extra += f'\n[plugins]\ndir = "{os.environ["MAGNETAR_PLUGIN_DIR"]}"\n'
    try:
        gw = Gateway(tmp_path, extra)
    finally:
        held[0].close()
    gw.start()
    try:
        wait_for_port(port, gw.proc, gw.log)
        gw.amqp_port = port
        conn = pika.BlockingConnection(params(gw, user="guest", password="guest"))
        ch = conn.channel()
        ch.confirm_delivery()
        q = ch.queue_declare("", exclusive=True).method.queue
        ch.basic_publish("", q, b"standalone")
        deadline = time.monotonic() + 10
        body = None
        while body is None and time.monotonic() < deadline:
            body = ch.basic_get(q, auto_ack=True)[2]
        assert body == b"standalone"
        conn.close()
        with pytest.raises(pika.exceptions.ProbableAuthenticationError):
            pika.BlockingConnection(params(gw, user="guest", password="not-guest"))
    finally:
        gw.stop()


def test_unknown_vhost_is_refused_with_530(amqp_server):
    with pytest.raises(pika.exceptions.ProbableAccessDeniedError) as e:
        pika.BlockingConnection(params(amqp_server, vhost="no-such-vhost"))
    assert "(530) 'NOT_ALLOWED" in str(e.value)


def test_heartbeats_keep_an_idle_connection(amqp_server):
    conn = pika.BlockingConnection(params(amqp_server, heartbeat=1))
    try:
        # Three heartbeat intervals idle: a server that sends none, or drops a client that
        # sends its own, would have closed the connection.
        conn.sleep(3.5)
        assert conn.is_open
        ch = conn.channel()
        assert ch.is_open
    finally:
        conn.close()


def test_aio_pika_connects(amqp_server):
    async def main():
        conn = await aio_pika.connect(
            f"amqp://{USER}:{PASSWORD}@127.0.0.1:{amqp_server.amqp_port}/", timeout=10
        )
        async with conn:
            ch = await conn.channel()
            assert not ch.is_closed
            await ch.close()

    asyncio.run(asyncio.wait_for(main(), 30))


# --- hostile frames, on a raw socket --------------------------------------------------------


class Raw:
    """A socket speaking AMQP frames, for what no client library sends."""

    def __init__(self, server):
        self.sock = socket.create_connection(("127.0.0.1", server.amqp_port), timeout=10)
        self.buf = b""

    def send(self, data: bytes):
        self.sock.sendall(data)

    def recv_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"closed with {self.buf!r} read")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def frame(self):
        head = self.recv_exact(7)
        size = struct.unpack(">I", head[3:7])[0]
        body = self.recv_exact(size + 1)
        _, channel, value = pframe.unmarshal(head + body)
        return channel, value

    def method(self):
        """The next frame that is not a heartbeat."""
        while True:
            channel, value = self.frame()
            if not isinstance(value, pheader.ProtocolHeader) and value.name != "Heartbeat":
                return channel, value

    def closed_by_peer(self) -> bool:
        try:
            while self.sock.recv(65536):
                pass
            return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def handshake(self):
        self.send(PROTOCOL_HEADER)
        _, start = self.method()
        assert isinstance(start, commands.Connection.Start)
        self.send(
            pframe.marshal(
                commands.Connection.StartOk(
                    client_properties={"product": "raw"},
                    mechanism="PLAIN",
                    response=f"\0{USER}\0{PASSWORD}",
                ),
                0,
            )
        )
        _, tune = self.method()
        assert isinstance(tune, commands.Connection.Tune)
        self.send(pframe.marshal(commands.Connection.TuneOk(tune.channel_max, tune.frame_max, 0), 0))
        self.send(pframe.marshal(commands.Connection.Open("/"), 0))
        _, ok = self.method()
        assert isinstance(ok, commands.Connection.OpenOk)
        return tune

    def close(self):
        self.sock.close()


def test_garbage_instead_of_the_protocol_header_gets_the_header_and_a_close(amqp_server):
    raw = Raw(amqp_server)
    try:
        raw.send(b"GET / HTTP/1.1\r\n\r\n")
        assert raw.recv_exact(8) == PROTOCOL_HEADER
        assert raw.closed_by_peer()
    finally:
        raw.close()


def test_bad_frame_end_closes_the_connection_with_501(amqp_server):
    raw = Raw(amqp_server)
    try:
        raw.handshake()
        frame = bytearray(pframe.marshal(commands.Channel.Open(), 1))
        frame[-1] = 0x00  # not 0xCE
        raw.send(bytes(frame))
        channel, close = raw.method()
        assert channel == 0 and isinstance(close, commands.Connection.Close)
        assert close.reply_code == 501
        raw.send(pframe.marshal(commands.Connection.CloseOk(), 0))
        assert raw.closed_by_peer()
    finally:
        raw.close()


def test_frame_on_an_unopened_channel_closes_the_connection_with_504(amqp_server):
    raw = Raw(amqp_server)
    try:
        raw.handshake()
        raw.send(pframe.marshal(commands.Queue.Declare(queue="never-declared", passive=True), 3))
        channel, close = raw.method()
        assert channel == 0 and isinstance(close, commands.Connection.Close)
        assert close.reply_code == 504
        raw.send(pframe.marshal(commands.Connection.CloseOk(), 0))
        assert raw.closed_by_peer()
    finally:
        raw.close()


def test_a_hostile_connection_leaves_the_others_alone(amqp_server):
    good = pika.BlockingConnection(params(amqp_server))
    raw = Raw(amqp_server)
    try:
        raw.handshake()
        raw.send(b"\x01\x00\x00\xff\xff\xff\xff")  # a frame "4 GiB" long
        channel, close = raw.method()
        assert isinstance(close, commands.Connection.Close)
        assert close.reply_code in (501, 505)
        ch = good.channel()
        assert ch.is_open
    finally:
        raw.close()
        good.close()
