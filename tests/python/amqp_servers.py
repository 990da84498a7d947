"""The two AMQP 0-9-1 servers the AMQP tests run against: a private RabbitMQ (Debian's
`rabbitmq-server`, the reference) and the Magnetar gateway with its `amqp` listener.

Both are session-scoped (RabbitMQ takes about 6 s to start), listen on loopback only, on free
ports, are bounded in time (a server that does not listen within 60 s fails the session) and
are stopped when the session ends, pass or fail. Tests isolate themselves by naming their
exchanges and queues uniquely (`unique()`).

RabbitMQ runs from `/usr/lib/rabbitmq/bin/rabbitmq-server` directly (Debian's
`/usr/sbin/rabbitmq-server` wrapper would `su` to the `rabbitmq` user and use the system
node's directories), as the current user, with everything in a temporary directory: its own
node name, AMQP port, distribution port, an epmd of its own on a free loopback port (so a
system epmd on 4369 is neither used nor disturbed), no plugins, and `guest`/`guest` (which
RabbitMQ accepts from loopback only).
"""
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from conftest import Gateway, hold_ports, stop_process, wait_for_port

RABBITMQ_SERVER = os.environ.get("RABBITMQ_SERVER", "/usr/lib/rabbitmq/bin/rabbitmq-server")
RABBITMQCTL = str(Path(RABBITMQ_SERVER).with_name("rabbitmqctl"))
EPMD = shutil.which("epmd") or "/usr/bin/epmd"

# What both servers are configured with: RabbitMQ's defaults.
USER, PASSWORD = "guest", "guest"
# The gateway's user whose publishes a publish-rate quota holds back (msgs/s).
SLOW_USER, SLOW_RATE = "slow", 10
# The gateway's lease of a connection's exclusive queues, in the tests: its default. A
# connection that ends without connection.close gives its lease up at once (its will); the
# lease runs out only after a crash of its gateway, which no test here relies on.
EXCLUSIVE_LEASE_MS = 30000


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def make_tls_certificate(tmp: Path) -> tuple[Path, Path, Path]:
    """A test CA and a server certificate it signed for `localhost` and 127.0.0.1 (openssl):
    the CA's, the server's certificate and the server's key files."""
    ca_key, ca, key, csr, cert = (tmp / n for n in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem"))
    ext = tmp / "server.ext"
    ext.write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
    )
    run = lambda *args: subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)  # noqa: E731
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    run("req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(ca), "-days", "2", "-subj", "/CN=magnetar-test-ca",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("req", *ec, "-keyout", str(key), "-out", str(csr), "-subj", "/CN=localhost")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
        "-out", str(cert), "-days", "2", "-extfile", str(ext))
    return ca, cert, key


class RabbitMQ:
    """A private RabbitMQ node, with AMQP on `amqp_port` and over TLS on `amqps_port` (a
    certificate of a test CA, `ca_file`), as on `AmqpGateway`."""

    name = "rabbitmq"

    def __init__(self, tmp: Path):
        self.tmp = tmp
        held = hold_ports(4)
        self.amqp_port, self.amqps_port, self.dist_port, self.epmd_port = (
            s.getsockname()[1] for s in held
        )
        for s in held:
            s.close()
        self.log = tmp / "rabbitmq.log"
        self.proc = None
        self.ca_file = None

    def env(self) -> dict:
        (self.tmp / "enabled_plugins").write_text("[].\n")
        if self.ca_file is None:
            self.tls_files = make_tls_certificate(self.tmp)
            self.ca_file = str(self.tls_files[0])
        ca, cert, key = self.tls_files
        (self.tmp / "rabbitmq.conf").write_text(
            "loopback_users.guest = true\n"
            f"listeners.ssl.1 = 127.0.0.1:{self.amqps_port}\n"
            f"ssl_options.cacertfile = {ca}\nssl_options.certfile = {cert}\n"
            f"ssl_options.keyfile = {key}\nssl_options.verify = verify_none\n"
            "ssl_options.fail_if_no_peer_cert = false\n"
        )
        return {
            **os.environ,
            "HOME": str(self.tmp),  # the Erlang cookie
            "RABBITMQ_NODENAME": f"magnetar-test-{self.amqp_port}@localhost",
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_MNESIA_BASE": str(self.tmp / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.tmp / "log"),
            "RABBITMQ_LOGS": "-",
            "RABBITMQ_PID_FILE": str(self.tmp / "rabbitmq.pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.tmp / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.tmp / "rabbitmq.conf"),
        }

    # Who publishes under pushback (`push_back`): RabbitMQ's memory alarm holds every
    # publisher back.
    pressure_user = USER

    def ctl(self, *args: str) -> None:
        env = self.env()
        done = subprocess.run([RABBITMQCTL, "-n", env["RABBITMQ_NODENAME"], *args],
                              env=env, capture_output=True, timeout=60, text=True)
        assert done.returncode == 0, f"rabbitmqctl {args}: {done.stdout}{done.stderr}"

    def push_back(self, on: bool) -> None:
        """Raises (a memory high watermark of one byte) or clears RabbitMQ's memory alarm,
        which blocks publishing connections."""
        self.ctl("set_vm_memory_high_watermark", *(["absolute", "1"] if on else ["0.4"]))

    def persist_topology(self) -> None:
        """Writes the node's declarations to its tables on disk (`mnesia:dump_log/0`):
        RabbitMQ 3.x keeps them in Mnesia, whose transaction log a SIGKILL a moment after a
        `declare-ok` can lose (the queue, with every message confirmed into it, is gone
        after the restart: "Recovering 0 queues", seen once here)."""
        self.ctl("eval", "mnesia:dump_log().")

    def start(self) -> "RabbitMQ":
        if not os.access(RABBITMQ_SERVER, os.X_OK):
            pytest.skip(f"{RABBITMQ_SERVER} not installed (scripts/setup installs it)")
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [RABBITMQ_SERVER],
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=self.env(),
            cwd=self.tmp,
            start_new_session=True,
        )
        wait_for_port(self.amqp_port, self.proc, self.log, timeout=60.0)
        wait_for_port(self.amqps_port, self.proc, self.log, timeout=30.0)
        return self

    def kill9(self) -> None:
        """SIGKILL to the node and its port programs at once, as a crash would."""
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            # The whole session: the node and its port programs; epmd detached itself.
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        stop_process(self.proc)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, AttributeError):
            pass
        subprocess.run(
            [EPMD, "-port", str(self.epmd_port), "-kill"],
            env={**os.environ, "ERL_EPMD_PORT": str(self.epmd_port)},
            capture_output=True,
            timeout=10,
        )


class AmqpGateway(Gateway):
    """The gateway with an `amqp` listener, an `amqps` one (TLS, the gateway's generated
    certificate: `ca_file`) and RabbitMQ's default user `guest`/`guest`."""

    name = "magnetar"

    def __init__(self, tmp: Path):
        # Held while the gateway's other ports are chosen, so that none is the same.
        held = hold_ports(2)
        self.amqp_port, self.amqps_port = (s.getsockname()[1] for s in held)
        extra = (
            f'\n[[listeners]]\nname = "amqp"\nbind = "127.0.0.1:{self.amqp_port}"\nplugin = "amqp"\n'
            f'\n[[listeners]]\nname = "amqps"\nbind = "127.0.0.1:{self.amqps_port}"\nplugin = "amqp"\ntls = true\n'
            f'\n[[auth.users]]\nname = "{USER}"\npassword = "{PASSWORD}"\n'
            f'\n[[auth.users]]\nname = "{SLOW_USER}"\npassword = "{SLOW_USER}"\n'
            f"[auth.users.limits]\npublish_msgs_per_sec = {SLOW_RATE}\n"
        )
        # While the plugin is being worked on: a directory whose amqp.wasm replaces the
        # built-in plugin, so that a change needs no rebuild of the gateway.
        if os.environ.get("MAGNETAR_PLUGIN_DIR"):
            extra += f'\n[plugins]\ndir = "{os.environ["MAGNETAR_PLUGIN_DIR"]}"\n'
        # Explicit, so that the tests know it (EXCLUSIVE_LEASE_MS).
        extra += f"\n[plugins.config.amqp]\nexclusive_lease_ms = {EXCLUSIVE_LEASE_MS}\n"
        try:
            super().__init__(tmp, extra)
        finally:
            for s in held:
                s.close()

    # Who publishes under pushback: a user with a publish-rate quota, always on.
    pressure_user = SLOW_USER

    def push_back(self, on: bool) -> None:
        pass

    def persist_topology(self) -> None:
        """Nothing to do: `declare-ok` comes once the declaration is stored."""

    def start(self) -> "AmqpGateway":
        super().start()
        wait_for_port(self.amqp_port, self.proc, self.log)
        wait_for_port(self.amqps_port, self.proc, self.log)
        return self


@pytest.fixture(scope="session")
def rabbitmq_server():
    tmp = Path(tempfile.mkdtemp(prefix="magnetar-rabbitmq-"))
    server = RabbitMQ(tmp)
    try:
        yield server.start()
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def magnetar_amqp_server():
    tmp = Path(tempfile.mkdtemp(prefix="magnetar-amqp-"))
    server = AmqpGateway(tmp)
    try:
        yield server.start()
    finally:
        server.stop()
        if not os.environ.get("MAGNETAR_TEST_KEEP"):
            shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(params=["rabbitmq", "magnetar"])
def amqp_server(request):
    """RabbitMQ, then Magnetar: a test using it runs its scenario against both, so every
    expectation is RabbitMQ's real behaviour."""
    return request.getfixturevalue(f"{request.param}_amqp_server" if request.param == "magnetar" else "rabbitmq_server")


@pytest.fixture(params=["rabbitmq", "magnetar"])
def restartable_amqp_server(request, tmp_path):
    """A server of its own for one test, which the test may `stop()` and `start()` again on
    the same ports and data: RabbitMQ, then Magnetar."""
    server = RabbitMQ(tmp_path) if request.param == "rabbitmq" else AmqpGateway(tmp_path)
    try:
        yield server.start()
    finally:
        server.stop()


def wait_until(condition, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
