"""The demo page (`/demo` on the web port) in a real browser: Debian's headless Chromium,
driven by playwright-core (tests/browser/demo_page.mjs; both installed by scripts/setup).

A person's view of issue 24's demo: the page connects with alice's token to
`acme/default/mqtt`, publishes a message and sees it in its list, then sees what an MQTT
device (paho; MQTT publishes land on the namespace's Pulsar topic `mqtt`, docs/mqtt.md)
and a native Pulsar producer (the official `pulsar-client`) send. The page's screenshot is
saved under tests/python/artifacts/ (path printed), pass or fail.
"""

import json
import os
import shutil
import subprocess
import threading
import uuid

import paho.mqtt.client as mqtt
import pulsar
import pytest

from conftest import ROOT
from test_pulsar_ws import web  # noqa: F401  (the fixture: gateway, web port, alice's token)

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


def driver_failure(driver: subprocess.Popen, log) -> str:
    """The driver's own account of a failure (it prints the page's status, list and log)."""
    if driver.poll() is None:
        driver.kill()
        driver.wait(timeout=10)
    return f"the demo page driver says:\n{log.read_text()}"
