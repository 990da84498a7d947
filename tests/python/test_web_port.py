"""The gateway's web port (`web = true`) as HTTP and WebSocket clients see it.

First on the contract of examples/two-tenants.toml, with plugin `pulsar-ws` (built in) and a
second web port naming a plugin that does not exist (a web port serves its HTTP paths without
its plugin; upgrades then get a 503): Pulsar's admin REST v2 paths under the tenancy (alice's token reaches tenant acme
only, bob's globex only, the admin token everything), the demo page, and the upgrades the
host refuses before a plugin hears of them. Then message mode end to end, with the example
plugin examples/web-echo-plugin."""

import json
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect as ws_connect

from conftest import ADMIN_TOKEN, MAGNETAR, ROOT, Gateway, free_port, wait_for_port

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "two-tenants.toml"
ORIGIN = "http://allowed.example"


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    port, bare_port = free_port(), free_port()
    listener = (
        f'\n[[listeners]]\nname = "web"\nbind = "127.0.0.1:{port}"\nplugin = "pulsar-ws"\n'
        f'web = true\nallowed_origins = ["{ORIGIN}"]\n\n'
        f'[[listeners]]\nname = "web-bare"\nbind = "127.0.0.1:{bare_port}"\nplugin = "absent"\n'
        'web = true\n'
    )
    gw = Gateway(tmp_path_factory.mktemp("web"), "\n" + EXAMPLE.read_text() + listener).start()
    gw.web_port, gw.bare_port = port, bare_port
    try:
        wait_for_port(port, gw.proc, gw.log)
        wait_for_port(bare_port, gw.proc, gw.log)
        yield gw
    finally:
        gw.stop()


def token(gw: Gateway, user: str) -> str:
    cmd = [MAGNETAR, "token", "--config", str(gw.config), "--data-dir", str(gw.data_dir),
           "--user", user, "--expires-in", "1h"]
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=30).stdout.strip()


def call(gw, method, path, bearer=None, body=None):
    """(status, parsed JSON or text) of one request to the web port."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{gw.web_port}{path}",
        method=method,
        data=None if body is None else body.encode(),
        headers={"Content-Type": "application/json"} if body is not None else {},
    )
    if bearer:
        req.add_header("Authorization", f"Bearer {bearer}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            status, raw, ctype = r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        status, raw, ctype = e.code, e.read(), e.headers.get("Content-Type", "")
    if "json" in ctype and raw:
        return status, json.loads(raw)
    return status, raw.decode()


def test_admin_rest_under_the_tenancy(web):
    alice, bob = token(web, "alice"), token(web, "bob")

    assert call(web, "GET", "/admin/v2/tenants")[0] == 401
    assert call(web, "GET", "/admin/v2/tenants", bearer="not.a.token")[0] == 401

    # Alice manages topics of acme/default ...
    created = call(web, "PUT", "/admin/v2/persistent/acme/default/orders", alice)
    assert created[0] == 204, created
    assert call(web, "PUT", "/admin/v2/persistent/acme/default/parts/partitions", alice, "3")[0] == 204
    status, topics = call(web, "GET", "/admin/v2/persistent/acme/default", alice)
    assert status == 200 and "persistent://acme/default/orders" in topics
    status, meta = call(web, "GET", "/admin/v2/persistent/acme/default/parts/partitions", alice)
    assert (status, meta) == (200, {"partitions": 3})
    status, stats = call(web, "GET", "/admin/v2/persistent/acme/default/orders/stats", alice)
    assert status == 200 and "msgInCounter" in stats
    # ... and sees only its own tenant and namespace.
    assert call(web, "PUT", "/admin/v2/persistent/globex/default/spy", bob)[0] == 204
    assert call(web, "GET", "/admin/v2/tenants", alice) == (200, ["acme"])
    assert call(web, "GET", "/admin/v2/tenants/acme", alice)[0] == 200
    assert call(web, "GET", "/admin/v2/namespaces/acme", alice) == (200, ["acme/default"])
    for method, path in [
        ("GET", "/admin/v2/persistent/globex/default"),
        ("PUT", "/admin/v2/persistent/globex/default/intrusion"),
        ("DELETE", "/admin/v2/persistent/globex/default/spy"),
        ("GET", "/admin/v2/tenants/globex"),
        ("GET", "/admin/v2/namespaces/globex"),
        ("PUT", "/admin/v2/tenants/newco"),
        ("DELETE", "/admin/v2/tenants/acme"),
        ("GET", "/admin/v2/persistent/ac%6De/default"),
    ]:
        status, answer = call(web, method, path, alice)
        assert status == 403, (method, path, status, answer)
        assert "reason" in answer
    assert call(web, "GET", "/admin/v2/persistent/globex/default", bob)[0] == 200

    # The admin token sees every tenant.
    status, tenants = call(web, "GET", "/admin/v2/tenants", ADMIN_TOKEN)
    assert status == 200 and {"acme", "globex"} <= set(tenants)
    status, topics = call(web, "GET", "/admin/v2/persistent/globex/default", ADMIN_TOKEN)
    assert status == 200 and "persistent://globex/default/spy" in topics
    assert call(web, "DELETE", "/admin/v2/persistent/acme/default/orders", alice)[0] == 204


def test_metrics_on_the_web_port_are_scoped_to_the_callers_tenant(web):
    alice, bob = token(web, "alice"), token(web, "bob")
    # One message from each tenant, so each has usage to report.
    for user, tenant in ((alice, "acme"), (bob, "globex")):
        url = f"ws://127.0.0.1:{web.web_port}/ws/v2/producer/persistent/{tenant}/default/m?token={user}"
        with ws_connect(url, open_timeout=10) as ws:
            ws.send(json.dumps({"payload": "aGk=", "context": "1"}))
            assert json.loads(ws.recv(timeout=10))["result"] == "ok"

    def published(text):
        return {
            line.split('"')[1]: float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith("magnetar_tenant_published_messages_total{")
        }

    assert call(web, "GET", "/metrics")[0] == 401
    assert call(web, "GET", "/metrics", bearer="not.a.token")[0] == 401
    status, everything = call(web, "GET", "/metrics", ADMIN_TOKEN)
    assert status == 200
    seen = published(everything)
    assert seen["acme"] >= 1 and seen["globex"] >= 1, seen
    assert "magnetar_routes " in everything
    status, own = call(web, "GET", "/metrics", alice)
    assert status == 200
    assert published(own).keys() == {"acme"}, own
    assert "globex" not in own and "magnetar_routes" not in own


def test_demo_page_and_other_paths(web):
    with urllib.request.urlopen(f"http://127.0.0.1:{web.web_port}/demo", timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/html")
        page = r.read().decode()
    for element in ("token", "topic", "connect", "message", "send", "messages"):
        assert f'id="{element}"' in page
    assert "/ws/v2/" in page and "http://" not in page.split("<script>")[1]
    assert call(web, "GET", "/")[0] == 404
    assert call(web, "GET", "/admin/v1/tenants")[0] == 404
    assert call(web, "GET", "/ws/v2/producer/persistent/acme/default/t")[0] == 426


def upgrade(gw, path, origin=None, version="13", extra=b"", port=None):
    """The status line of the answer to a raw WebSocket upgrade request."""
    with socket.create_connection(("127.0.0.1", port or gw.web_port), timeout=10) as s:
        head = (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: {version}\r\n"
        )
        if origin:
            head += f"Origin: {origin}\r\n"
        s.sendall(head.encode() + b"\r\n" + extra)
        answer = b""
        while b"\r\n" not in answer:
            chunk = s.recv(4096)
            if not chunk:
                break
            answer += chunk
        return answer.split(b"\r\n")[0].decode()


def test_upgrades_the_host_refuses(web):
    path = "/ws/v2/consumer/persistent/acme/default/t/sub"
    assert upgrade(web, path, origin="http://evil.example") == "HTTP/1.1 403 Forbidden"
    assert upgrade(web, path, version="8") == "HTTP/1.1 426 Upgrade Required"
    assert upgrade(web, path, extra=b"\x81\x80junk") == "HTTP/1.1 400 Bad Request"
    # Past the host's checks, the plugin answers: no token, as Pulsar (401).
    assert upgrade(web, path, origin=ORIGIN) == "HTTP/1.1 401 Unauthorized"
    assert upgrade(web, path) == "HTTP/1.1 401 Unauthorized"
    # Without its plugin, the web port refuses every upgrade.
    assert upgrade(web, path, port=web.bare_port) == "HTTP/1.1 503 Service Unavailable"
    # A head that never ends is cut at 16 KiB.
    with socket.create_connection(("127.0.0.1", web.web_port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nX: " + b"a" * 20000)
        assert s.recv(4096).startswith(b"HTTP/1.1 431 ")


# Message mode end to end: the example plugin examples/web-echo-plugin (built into
# target/wasm by the gateway's build) behind a web port, driven by the `websockets` client
# and by raw frames where a well-behaved client cannot go.

WEB_ECHO = ROOT / "target" / "wasm" / "wasm32-wasip2" / "release" / "web_echo_plugin.wasm"
LIMIT = 65536
IDLE_MS = 600


@pytest.fixture(scope="module")
def echo(tmp_path_factory):
    if not WEB_ECHO.exists():
        pytest.skip(f"{WEB_ECHO} not built (cargo build --release builds it)")
    tmp = tmp_path_factory.mktemp("web-echo")
    plugins = tmp / "plugins"
    plugins.mkdir()
    shutil.copy(WEB_ECHO, plugins / "web_echo.wasm")
    port, tls_port, idle_port = free_port(), free_port(), free_port()
    extra = (
        f'\n[[listeners]]\nname = "web"\nbind = "127.0.0.1:{port}"\nplugin = "web_echo"\n'
        f"web = true\nwebsocket_max_message_size = {LIMIT}\n\n"
        f'[[listeners]]\nname = "web-idle"\nbind = "127.0.0.1:{idle_port}"\n'
        f'plugin = "web_echo"\nweb = true\nwebsocket_idle_timeout_ms = {IDLE_MS}\n\n'
        f'[[listeners]]\nname = "web-tls"\nbind = "127.0.0.1:{tls_port}"\nplugin = "web_echo"\n'
        "web = true\ntls = true\n\n"
        f'[plugins]\ndir = "{plugins}"\n'
    )
    gw = Gateway(tmp, extra).start()
    gw.web_port, gw.web_tls_port, gw.idle_port = port, tls_port, idle_port
    try:
        wait_for_port(port, gw.proc, gw.log)
        wait_for_port(tls_port, gw.proc, gw.log)
        wait_for_port(idle_port, gw.proc, gw.log)
        yield gw
    finally:
        gw.stop()


def test_messages_through_a_plugin_in_message_mode(echo):
    url = f"ws://127.0.0.1:{echo.web_port}/ws/echo"
    with ws_connect(url, subprotocols=["echo"], open_timeout=10) as ws:
        assert ws.subprotocol == "echo"
        ws.send("héllo")
        assert ws.recv(timeout=10) == "héllo"
        ws.send(b"\x00\x01\xff")
        assert ws.recv(timeout=10) == b"\x00\x01\xff"
        big = bytes(range(256)) * 200
        ws.send(big)
        assert ws.recv(timeout=10) == big
        # A fragmented message reaches the plugin whole.
        ws.send(["frag", "men", "ted"])
        assert ws.recv(timeout=10) == "fragmented"
        assert ws.ping(b"p").wait(timeout=10)
        # The plugin closes with its own code.
        ws.send("close")
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4000, "bye")
    # Without the subprotocol offered, none is named.
    with ws_connect(url, open_timeout=10) as ws:
        assert ws.subprotocol is None
        ws.send("again")
        assert ws.recv(timeout=10) == "again"


def test_an_idle_websocket_is_closed_with_1001_and_pings_keep_it_open(echo):
    """Pulsar's webSocketSessionIdleTimeoutMillis (Jetty's idle timeout): no frame either way
    for that long closes with 1001; any frame, a ping included, counts."""
    url = f"ws://127.0.0.1:{echo.idle_port}/ws/echo"
    with ws_connect(url, open_timeout=10, ping_interval=None) as idle, ws_connect(
        url, open_timeout=10, ping_interval=None
    ) as pinged:
        opened = time.monotonic()
        # Pings only, every IDLE_MS / 4, for three timeouts: still open.
        while time.monotonic() - opened < 3 * IDLE_MS / 1000:
            assert pinged.ping().wait(timeout=10)
            time.sleep(IDLE_MS / 4000)
        pinged.send("still open")
        assert pinged.recv(timeout=10) == "still open"
        with pytest.raises(ConnectionClosed) as closed:
            idle.recv(timeout=10)
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1001, "Idle Timeout")
        assert time.monotonic() - opened >= IDLE_MS / 1000


def test_wss_and_https_on_a_tls_web_port(echo):
    ctx = ssl.create_default_context(cafile=echo.ca_file)
    url = f"wss://localhost:{echo.web_tls_port}/ws/echo"
    with ws_connect(url, ssl=ctx, open_timeout=10) as ws:
        ws.send("over TLS")
        assert ws.recv(timeout=10) == "over TLS"
    page = f"https://localhost:{echo.web_tls_port}/demo"
    with urllib.request.urlopen(page, context=ctx, timeout=10) as r:
        assert r.status == 200 and b'id="messages"' in r.read()


def test_the_plugins_refusal_is_the_upgrades_answer(echo):
    with pytest.raises(InvalidStatus) as refused:
        ws_connect(f"ws://127.0.0.1:{echo.web_port}/ws/nothing?x=1", open_timeout=10)
    assert refused.value.response.status_code == 404
    assert refused.value.response.body == b"no endpoint at /ws/nothing"


def test_too_big_closes_with_1009_and_others_go_on(echo):
    url = f"ws://127.0.0.1:{echo.web_port}/ws/echo"
    with ws_connect(url, open_timeout=10) as bystander, ws_connect(url, open_timeout=10) as ws:
        ws.send(b"x" * (LIMIT + 1))
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
        assert closed.value.rcvd.code == 1009
        bystander.send("still here")
        assert bystander.recv(timeout=10) == "still here"


def raw_open(gw, path="/ws/echo"):
    """A raw socket past a 101 from the plugin."""
    s = socket.create_connection(("127.0.0.1", gw.web_port), timeout=10)
    s.sendall(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += s.recv(1)
    assert answer.startswith(b"HTTP/1.1 101 "), answer
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in answer
    return s


def masked(opcode, payload, mask=True, fin=True):
    head = bytes([(0x80 if fin else 0) | opcode, (0x80 if mask else 0) | len(payload)])
    if not mask:
        return head + payload
    key = b"\x01\x02\x03\x04"
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def close_code(s):
    """The code of the close frame the server sends next (skipping data frames)."""
    while True:
        head = s.recv(2, socket.MSG_WAITALL)
        payload = s.recv(head[1] & 0x7F, socket.MSG_WAITALL) if head[1] & 0x7F else b""
        if head[0] & 0x0F == 0x8:
            return int.from_bytes(payload[:2], "big")


def test_a_bad_frame_behind_a_good_message_fails_the_connection_at_once(echo):
    """RFC 6455 7.1.7 (Autobahn 3.2-3.4, 4.1.3-4.2.5, 5.15): the message before the bad
    frame is answered, then the server closes with 1002 without waiting for more bytes."""
    bad_frames = {
        "reserved bit": bytes([0x80 | 0x40 | 0x1]) + masked(0x1, b"x")[1:],
        "reserved opcode": masked(0x3, b"x"),
        "continuation without a start": masked(0x0, b"x"),
    }
    for what, bad in bad_frames.items():
        with raw_open(echo) as s:
            s.sendall(masked(0x1, b"before") + bad)
            head = s.recv(2, socket.MSG_WAITALL)
            assert (head[0] & 0x0F, s.recv(head[1] & 0x7F, socket.MSG_WAITALL)) == (
                0x1,
                b"before",
            ), what
            assert close_code(s) == 1002, what


def test_bad_frames_get_their_close_codes(echo):
    with raw_open(echo) as s:
        s.sendall(masked(0x1, b"\xff\xfe"))
        assert close_code(s) == 1007
    with raw_open(echo) as s:
        s.sendall(masked(0x2, b"abc", mask=False))
        assert close_code(s) == 1002
    with raw_open(echo) as s:
        # A ping between two fragments is answered; the message arrives whole.
        s.sendall(masked(0x1, b"ab", fin=False) + masked(0x9, b"!") + masked(0x0, b"c"))
        frames = []
        while len(frames) < 2:
            head = s.recv(2, socket.MSG_WAITALL)
            frames.append((head[0] & 0x0F, s.recv(head[1] & 0x7F, socket.MSG_WAITALL)))
        assert sorted(frames) == [(0x1, b"abc"), (0xA, b"!")]
        s.sendall(masked(0x8, (1000).to_bytes(2, "big")))
        assert close_code(s) == 1000
