"""The demo page (`/demo` on the web port) in a real browser: Debian's headless Chromium,
driven by playwright-core (tests/browser/demo_page.mjs; both installed by scripts/setup).

A person's view of issue 24's demo: the page connects with alice's token to
`acme/default/mqtt`, publishes a message and sees it in its list, then sees what an MQTT
device (paho; MQTT publishes land on the namespace's Pulsar topic `mqtt`, docs/mqtt.md)
and a native Pulsar producer (the official `pulsar-client`) send; on `acme/default/amqp`
it sees what an AMQP 0-9-1 client (pika) publishes to an exchange (every exchange of a vhost
publishes into that topic, docs/amqp.md). The page's screenshots are saved under
tests/python/artifacts/ (paths printed), pass or fail.

Not shown yet: Kafka producers. Kafka connections are anonymous until the plugin's SASL
lands (issue 22), and this gateway, like any with tenants, refuses anonymous clients.
"""

import json
import os
import shutil
import subprocess
import threading
import uuid

import paho.mqtt.client as mqtt
import pika
import pulsar
import pytest

from conftest import ROOT, Gateway, free_port, wait_for_port
from test_pulsar_ws import TENANTS, web  # noqa: F401  (the fixture: gateway, web port, alice's token)
from test_tenancy import token

BROWSER_DIR = ROOT / "tests" / "browser"
ARTIFACTS = ROOT / "tests" / "python" / "artifacts"
CHROMIUM = os.environ.get("CHROMIUM_BIN", "/usr/bin/chromium")
# What the page has to show, each within this long.
TIMEOUT_S = 30


def read_line(proc: subprocess.Popen, timeout: float) -> str:
    """The driver's next line of output, or "" at its end or after `timeout` seconds."""
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return line[0].strip() if line else ""


def test_the_demo_page_publishes_and_shows_mqtt_and_pulsar_messages(web, tmp_path):  # noqa: F811
    node = shutil.which("node")
    assert node, "node not found: run ./scripts/setup"
    assert os.access(CHROMIUM, os.X_OK), f"{CHROMIUM} not found: run ./scripts/setup"
    assert (BROWSER_DIR / "node_modules" / "playwright-core").is_dir(), \
        "playwright-core not installed in tests/browser: run ./scripts/setup"

    run = uuid.uuid4().hex[:8]
    from_page, from_mqtt, from_pulsar = f"from the page {run}", f"from MQTT {run}", f"from Pulsar {run}"
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "demo-page.png"
    screenshot.unlink(missing_ok=True)
    args = {
        "url": f"http://127.0.0.1:{web.web_port}/demo",
        "token": web.alice,
        "topic": "acme/default/mqtt",
        "pageMessage": from_page,
        "expected": [from_mqtt, from_pulsar],
        "screenshot": str(screenshot),
        "timeoutMs": TIMEOUT_S * 1000,
    }
    log = tmp_path / "demo_page.log"
    with open(log, "w") as err:
        driver = subprocess.Popen(
            [node, str(BROWSER_DIR / "demo_page.mjs"), json.dumps(args)],
            cwd=BROWSER_DIR, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
        )
    device = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"demo-device-{run}")
    client = None
    try:
        # Connected, and the page's own message is back in its list.
        assert read_line(driver, TIMEOUT_S + 10) == "ready", driver_failure(driver, log)

        device.username_pw_set("alice", "alice-secret")
        device.connect("127.0.0.1", web.mqtt_port)
        device.loop_start()
        device.publish("sensors/door", from_mqtt.encode(), qos=1).wait_for_publish(10)

        client = pulsar.Client(web.service_url, authentication=pulsar.AuthenticationToken(web.alice),
                               operation_timeout_seconds=10)
        producer = client.create_producer("persistent://acme/default/mqtt")
        producer.send(from_pulsar.encode(), properties={"source": "pulsar-client"})

        driver.stdin.write("go\n")
        driver.stdin.flush()
        seen = []
        while len(seen) < 3 and (line := read_line(driver, TIMEOUT_S + 10)):
            seen.append(line)
        assert seen == [f"seen {from_mqtt}", f"seen {from_pulsar}", "done"], driver_failure(driver, log)
        assert driver.wait(timeout=20) == 0, driver_failure(driver, log)
    finally:
        device.loop_stop()
        device.disconnect()
        if client:
            client.close()
        if driver.poll() is None:
            driver.kill()
            driver.wait(timeout=10)
        print(f"demo page screenshot: {screenshot}")
    assert screenshot.stat().st_size > 0


@pytest.fixture
def web_amqp(tmp_path):
    """The gateway with a web port serving `pulsar-ws` and an `amqp` listener, two tenants."""
    port, amqp_port = free_port(), free_port()
    extra = (
        f'\n[[listeners]]\nname = "web"\nbind = "127.0.0.1:{port}"\nplugin = "pulsar-ws"\nweb = true\n\n'
        f'[[listeners]]\nname = "amqp"\nbind = "127.0.0.1:{amqp_port}"\nplugin = "amqp"\n\n'
        + TENANTS
    )
    gw = Gateway(tmp_path, extra).start()
    try:
        wait_for_port(port, gw.proc, gw.log)
        wait_for_port(amqp_port, gw.proc, gw.log)
        gw.web_port, gw.amqp_port = port, amqp_port
        gw.alice = token(gw, "alice", "1h")
        yield gw
    finally:
        gw.stop()


def test_the_demo_page_shows_what_an_amqp_client_publishes(web_amqp, tmp_path):
    node = shutil.which("node")
    assert node and os.access(CHROMIUM, os.X_OK), "node or chromium missing: run ./scripts/setup"
    run = uuid.uuid4().hex[:8]
    from_page, from_amqp = f"from the page {run}", f"from AMQP {run}"
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "demo-page-amqp.png"
    screenshot.unlink(missing_ok=True)
    args = {
        "url": f"http://127.0.0.1:{web_amqp.web_port}/demo",
        "token": web_amqp.alice,
        "topic": "acme/default/amqp",
        "pageMessage": from_page,
        "expected": [from_amqp],
        "screenshot": str(screenshot),
        "timeoutMs": TIMEOUT_S * 1000,
    }
    log = tmp_path / "demo_page.log"
    with open(log, "w") as err:
        driver = subprocess.Popen(
            [node, str(BROWSER_DIR / "demo_page.mjs"), json.dumps(args)],
            cwd=BROWSER_DIR, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
        )
    try:
        assert read_line(driver, TIMEOUT_S + 10) == "ready", driver_failure(driver, log)
        conn = pika.BlockingConnection(pika.ConnectionParameters(
            host="127.0.0.1", port=web_amqp.amqp_port,
            credentials=pika.PlainCredentials("alice", "alice-secret"), socket_timeout=10))
        try:
            ch = conn.channel()
            ch.confirm_delivery()
            ch.basic_publish("amq.topic", "demo.page", from_amqp.encode())
        finally:
            conn.close()
        driver.stdin.write("go\n")
        driver.stdin.flush()
        seen = []
        while len(seen) < 2 and (line := read_line(driver, TIMEOUT_S + 10)):
            seen.append(line)
        assert seen == [f"seen {from_amqp}", "done"], driver_failure(driver, log)
        assert driver.wait(timeout=20) == 0, driver_failure(driver, log)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait(timeout=10)
        print(f"demo page screenshot: {screenshot}")
    assert screenshot.stat().st_size > 0


def driver_failure(driver: subprocess.Popen, log) -> str:
    """The driver's own account of a failure (it prints the page's status, list and log)."""
    if driver.poll() is None:
        driver.kill()
        driver.wait(timeout=10)
    return f"the demo page driver says:\n{log.read_text()}"
