"""The host's SASL service (what Kafka, AMQP and MQTT 5 plugins authenticate with), driven
by the third-party `scramp` SCRAM client through the example echo plugin, which passes each
client message to `authenticate-sasl` and prints the host's answer."""

import shutil
import socket
import uuid
from pathlib import Path

import pytest
from scramp import ScramClient

from conftest import ROOT, Gateway, free_port

WASM_DIR = Path(
    __import__("os").environ.get("MAGNETAR_WASM_DIR", ROOT / "target" / "wasm" / "wasm32-wasip2" / "release")
)
EXAMPLE = ROOT / "examples" / "two-tenants.toml"


@pytest.fixture
def echo_gateway(tmp_path):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    shutil.copy(WASM_DIR / "echo_plugin.wasm", plugins / "echo_plugin.wasm")
    echo_port = free_port()
    extra = (
        f'\n[plugins]\ndir = "{plugins}"\n\n'
        f'[[listeners]]\nname = "echo"\nbind = "127.0.0.1:{echo_port}"\nplugin = "echo_plugin"\n\n'
        + EXAMPLE.read_text()
    )
    gw = Gateway(tmp_path, extra).start()
    gw.echo_port = echo_port
    try:
        yield gw
    finally:
        gw.stop()


class Line:
    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.buf = b""

    def ask(self, line: str) -> str:
        self.sock.sendall(line.encode() + b"\n")
        while b"\n" not in self.buf:
            chunk = self.sock.recv(4096)
            assert chunk, "connection closed"
            self.buf += chunk
        out, self.buf = self.buf.split(b"\n", 1)
        return out.decode()


def scram(line: Line, mechanism: str, user: str, password: str):
    """Runs a SCRAM exchange; returns (host's last answer, client)."""
    client = ScramClient([mechanism], user, password)
    answer = line.ask(f"sasl {mechanism} {client.get_client_first().encode().hex()}")
    if not answer.startswith("challenge "):
        return answer, client
    client.set_server_first(bytes.fromhex(answer.split()[1]).decode())
    answer = line.ask(f"sasl {mechanism} {client.get_client_final().encode().hex()}")
    return answer, client


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_scram_with_a_real_client(echo_gateway, mechanism):
    line = Line(echo_gateway.echo_port)
    assert line.ask("mechanisms").split() == ["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"]
    answer, client = scram(line, mechanism, "alice", "alice-secret")
    assert answer.startswith("ok alice acme "), answer
    # The client checks the server's signature: the host knew the password too.
    client.set_server_final(bytes.fromhex(answer.split()[3]).decode())

    other = Line(echo_gateway.echo_port)
    answer, _ = scram(other, mechanism, "alice", "wrong-password")
    assert answer == "fail"
    answer, _ = scram(other, mechanism, f"ghost-{uuid.uuid4().hex[:6]}", "x")
    assert answer == "fail"
    # After failures the exchange starts over cleanly.
    answer, _ = scram(other, mechanism, "bob", "bob-secret")
    assert answer.startswith("ok bob globex "), answer


def test_plain_and_garbage(echo_gateway):
    line = Line(echo_gateway.echo_port)
    assert line.ask("sasl PLAIN " + b"\0bob\0bob-secret".hex()).startswith("ok bob globex")
    assert line.ask("sasl PLAIN " + b"\0bob\0nope".hex()) == "fail"
    assert line.ask("sasl PLAIN " + b"alice\0bob\0bob-secret".hex()) == "fail"
    assert line.ask("sasl GSSAPI 00") == "fail"
    assert line.ask("sasl SCRAM-SHA-256 " + b"\xff\xfe".hex()) == "fail"
    assert line.ask("sasl SCRAM-SHA-256 " + b"p=tls-unique,,n=bob,r=x".hex()) == "fail"
