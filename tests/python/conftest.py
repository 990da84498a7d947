"""Fixtures that run the real `magnetar` binary on free loopback ports.

Every process a test starts is killed when the test ends, pass or fail, and is bounded in
time: a gateway that does not listen within 60 s fails the test.
"""
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

# The AMQP suite's servers (RabbitMQ and a gateway, session-scoped): defined once here, so
# that every test module shares them. A module that imported the fixtures instead got its
# own copy of each, started again per module.
pytest_plugins = ["amqp_servers"]

ROOT = Path(__file__).resolve().parents[2]
MAGNETAR = os.environ.get("MAGNETAR_BIN", str(ROOT / "target" / "release" / "magnetar"))


_next_port = 0


def hold_ports(n: int) -> list[socket.socket]:
    """`n` sockets bound to free loopback ports below the kernel's ephemeral range
    (12000-15999; the Rust tests and benches take 16000-31999): a port the kernel hands out
    for `:0` comes from the range of outgoing connections, which the machine's other tests
    may take before the server binds it (seen: "binding 127.0.0.1:33587: Address already in
    use", RabbitMQ's `dist_port_already_used`). The caller closes them just before the
    server binds."""
    global _next_port
    base = (os.getpid() % 400) * 10
    held = []
    for _ in range(4000):
        if len(held) == n:
            break
        port = 12_000 + (base + _next_port) % 4000
        _next_port += 1
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
            held.append(s)
        except OSError:
            s.close()
    assert len(held) == n, "no free ports between 12000 and 16000"
    return held


def free_ports(n: int) -> list[int]:
    """n distinct free ports (see `hold_ports`): all are held until all are chosen."""
    socks = hold_ports(n)
    try:
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def stop_process(proc) -> None:
    """SIGTERM, then SIGKILL if the process has not exited within 10 s."""
    if proc and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port} after {timeout}s:\n{log.read_text()}")


ADMIN_TOKEN = "test-admin-token"


class Gateway:
    """A gateway process with its ports, data directory and log."""

    def __init__(self, tmp: Path, extra_config: str = "", websocket: bool = False):
        self.tmp = tmp
        self.data_dir = tmp / "data"
        ports = free_ports(6 if websocket else 4)
        self.broker_port, self.mqtt_port, self.mqtts_port, self.admin_port = ports[:4]
        # With `websocket`: MQTT over WebSocket on `ws_port` (any path) and over TLS on
        # `wss_port` (path `/mqtt` only).
        self.ws_port, self.wss_port = ports[4:] if websocket else (None, None)
        if websocket:
            extra_config = (
                f'\n[[listeners]]\nname = "mqtt-ws"\nbind = "127.0.0.1:{self.ws_port}"\n'
                'plugin = "mqtt"\nwebsocket = true\n\n'
                f'[[listeners]]\nname = "mqtt-wss"\nbind = "127.0.0.1:{self.wss_port}"\n'
                'plugin = "mqtt"\ntls = true\nwebsocket = true\nwebsocket_path = "/mqtt"\n'
            ) + extra_config
        self.config = tmp / "magnetar.toml"
        self.config.write_text(
            f'[broker]\nlisten = "127.0.0.1:{self.broker_port}"\n\n'
            f'[admin]\nlisten = "127.0.0.1:{self.admin_port}"\ntoken = "{ADMIN_TOKEN}"\n\n'
            f'[[listeners]]\nname = "mqtt"\nbind = "127.0.0.1:{self.mqtt_port}"\nplugin = "mqtt"\n\n'
            f'[[listeners]]\nname = "mqtt-tls"\nbind = "127.0.0.1:{self.mqtts_port}"\nplugin = "mqtt"\ntls = true\n'
            + extra_config
        )
        self.log = tmp / "magnetar.log"
        self.proc = None

    @property
    def service_url(self) -> str:
        return f"pulsar://127.0.0.1:{self.broker_port}"

    @property
    def ca_file(self) -> str:
        return str(self.data_dir / "tls" / "ca.pem")

    def start(self) -> "Gateway":
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [MAGNETAR, "--config", str(self.config), "--data-dir", str(self.data_dir)],
            stdout=subprocess.DEVNULL,
            stderr=logf,
            env={**os.environ, "RUST_LOG": os.environ.get("MAGNETAR_TEST_LOG", "info")},
        )
        ports = (self.broker_port, self.mqtt_port, self.mqtts_port, self.admin_port)
        for port in ports + ((self.ws_port, self.wss_port) if self.ws_port else ()):
            wait_for_port(port, self.proc, self.log)
        return self

    def kill9(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        stop_process(self.proc)


@pytest.fixture
def gateway(tmp_path):
    gw = Gateway(tmp_path).start()
    try:
        yield gw
    finally:
        gw.stop()


MOSQUITTO = os.environ.get("MOSQUITTO_BIN", "/usr/sbin/mosquitto")


class Mosquitto:
    """Mosquitto 2.0 on a free loopback port, the peer a behaviour is compared with: anonymous,
    no persistence file, its log in `tmp`. Same `mqtt_port` attribute as `Gateway`."""

    def __init__(self, tmp: Path):
        self.mqtt_port = free_port()
        self.config = tmp / "mosquitto.conf"
        self.config.write_text(
            f"listener {self.mqtt_port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        )
        self.log = tmp / "mosquitto.log"
        self.proc = None

    def start(self) -> "Mosquitto":
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.config)], stdout=logf, stderr=subprocess.STDOUT
        )
        wait_for_port(self.mqtt_port, self.proc, self.log)
        return self

    def stop(self) -> None:
        stop_process(self.proc)


@pytest.fixture(params=["magnetar", "mosquitto"])
def mqtt_peer(request, tmp_path):
    """The gateway, then Mosquitto (skipped where it is not installed): a test using it runs
    its scenario against both, so a difference shows as one of the two failing."""
    if request.param == "mosquitto":
        if not os.access(MOSQUITTO, os.X_OK):
            pytest.skip(f"{MOSQUITTO} not installed")
        server = Mosquitto(tmp_path).start()
    else:
        server = Gateway(tmp_path).start()
    try:
        yield server
    finally:
        server.stop()
