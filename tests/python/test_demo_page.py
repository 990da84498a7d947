"""The demo page (`/demo` on the web port) in a real browser: Debian's headless Chromium,
driven by playwright-core (tests/browser/demo_page.mjs; both installed by scripts/setup).

A person's view of issue 24's demo: the page connects with alice's token to
`acme/default/mqtt`, publishes a message and sees it in its list, then sees what an MQTT
device (paho; MQTT publishes land on the namespace's Pulsar topic `mqtt`, docs/mqtt.md)
and a native Pulsar producer (the official `pulsar-client`) send. On a standalone gateway
(anonymous access to public/default) the page, without a token, sees what an AMQP 0-9-1
client (pika) publishes to an exchange (every exchange of a vhost publishes into the topic
`amqp`, docs/amqp.md) and what a Kafka producer (confluent-kafka) writes (a Kafka partition
is a Pulsar partition, `<topic>-partition-<n>`, docs/kafka.md); with tenants, Kafka needs the
plugin's SASL first (issue 22). The page's screenshots are saved under
tests/python/artifacts/ (paths printed), pass or fail.
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
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

import pytest
from conftest import ROOT, Gateway, free_port, wait_for_port
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


def watch_page(tmp_path, web_port: int, token: str, topic: str, expected: list, screenshot: str, publish):
    """The page on `topic` (empty `token`: anonymous): it connects, publishes its own message
    and shows it ("ready"); then `publish()` runs, and every payload of `expected` must
    appear in the page's list, in order. Its screenshot is saved as
    tests/python/artifacts/`screenshot`, pass or fail."""
    node = shutil.which("node")
    assert node, "node not found: run ./scripts/setup"
    assert os.access(CHROMIUM, os.X_OK), f"{CHROMIUM} not found: run ./scripts/setup"
    assert (BROWSER_DIR / "node_modules" / "playwright-core").is_dir(), \
        "playwright-core not installed in tests/browser: run ./scripts/setup"
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / screenshot
    shot.unlink(missing_ok=True)
    args = {
        "url": f"http://127.0.0.1:{web_port}/demo",
        "token": token,
        "topic": topic,
        "pageMessage": f"from the page {uuid.uuid4().hex[:8]}",
        "expected": expected,
        "screenshot": str(shot),
        "timeoutMs": TIMEOUT_S * 1000,
    }
    log = tmp_path / f"{screenshot}.log"
    with open(log, "w") as err:
        driver = subprocess.Popen(
            [node, str(BROWSER_DIR / "demo_page.mjs"), json.dumps(args)],
            cwd=BROWSER_DIR, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
        )
    try:
        # Connected, and the page's own message is back in its list.
        assert read_line(driver, TIMEOUT_S + 10) == "ready", driver_failure(driver, log)
        publish()
        driver.stdin.write("go\n")
        driver.stdin.flush()
        seen = []
        while len(seen) < len(expected) + 1 and (line := read_line(driver, TIMEOUT_S + 10)):
            seen.append(line)
        assert seen == [f"seen {p}" for p in expected] + ["done"], driver_failure(driver, log)
        assert driver.wait(timeout=20) == 0, driver_failure(driver, log)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait(timeout=10)
        print(f"demo page screenshot: {shot}")
    assert shot.stat().st_size > 0


def test_the_demo_page_publishes_and_shows_mqtt_and_pulsar_messages(web, tmp_path):  # noqa: F811
    run = uuid.uuid4().hex[:8]
    from_mqtt, from_pulsar = f"from MQTT {run}", f"from Pulsar {run}"
    device = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"demo-device-{run}")
    clients = []

    def publish():
        device.username_pw_set("alice", "alice-secret")
        device.connect("127.0.0.1", web.mqtt_port)
        device.loop_start()
        device.publish("sensors/door", from_mqtt.encode(), qos=1).wait_for_publish(10)
        client = pulsar.Client(web.service_url, authentication=pulsar.AuthenticationToken(web.alice),
                               operation_timeout_seconds=10)
        clients.append(client)
        producer = client.create_producer("persistent://acme/default/mqtt")
        producer.send(from_pulsar.encode(), properties={"source": "pulsar-client"})

    try:
        watch_page(tmp_path, web.web_port, web.alice, "acme/default/mqtt", [from_mqtt, from_pulsar],
                   "demo-page.png", publish)
    finally:
        device.loop_stop()
        device.disconnect()
        for client in clients:
            client.close()


@pytest.fixture
def standalone(tmp_path):
    """A standalone gateway (anonymous access to public/default, RabbitMQ's `guest`) with a
    web port serving `pulsar-ws`, an `amqp` and a `kafka` listener."""
    port, amqp_port, kafka_port = free_port(), free_port(), free_port()
    extra = (
        f'\n[[listeners]]\nname = "web"\nbind = "127.0.0.1:{port}"\nplugin = "pulsar-ws"\nweb = true\n\n'
        f'[[listeners]]\nname = "amqp"\nbind = "127.0.0.1:{amqp_port}"\nplugin = "amqp"\n\n'
        f'[[listeners]]\nname = "kafka"\nbind = "127.0.0.1:{kafka_port}"\nplugin = "kafka"\n\n'
        f'[[auth.users]]\nname = "guest"\npassword = "guest"\n\n'
        f"[plugins.config.kafka]\nadvertised_port = {kafka_port}\n"
    )
    gw = Gateway(tmp_path, extra).start()
    try:
        for p in (port, amqp_port, kafka_port):
            wait_for_port(p, gw.proc, gw.log)
        gw.web_port, gw.amqp_port, gw.kafka_port = port, amqp_port, kafka_port
        yield gw
    finally:
        gw.stop()


def test_the_demo_page_shows_what_amqp_and_kafka_clients_publish(standalone, tmp_path):
    gw = standalone
    run = uuid.uuid4().hex[:8]
    from_amqp, from_kafka = f"from AMQP {run}", f"from Kafka {run}"

    def publish_amqp():
        conn = pika.BlockingConnection(pika.ConnectionParameters(
            host="127.0.0.1", port=gw.amqp_port, credentials=pika.PlainCredentials("guest", "guest"),
            socket_timeout=10))
        try:
            ch = conn.channel()
            ch.confirm_delivery()
            ch.basic_publish("amq.topic", "demo.page", from_amqp.encode())
        finally:
            conn.close()

    watch_page(tmp_path, gw.web_port, "", "public/default/amqp", [from_amqp], "demo-page-amqp.png",
               publish_amqp)

    topic = f"demo-{run}"
    bootstrap = f"127.0.0.1:{gw.kafka_port}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])[topic].result(timeout=20)

    def publish_kafka():
        producer = Producer({"bootstrap.servers": bootstrap})
        producer.produce(topic, key=b"door", value=from_kafka.encode(), partition=0)
        assert producer.flush(20) == 0

    watch_page(tmp_path, gw.web_port, "", f"public/default/{topic}-partition-0", [from_kafka],
               "demo-page-kafka.png", publish_kafka)


def driver_failure(driver: subprocess.Popen, log) -> str:
    """The driver's own account of a failure (it prints the page's status, list and log)."""
    if driver.poll() is None:
        driver.kill()
        driver.wait(timeout=10)
    return f"the demo page driver says:\n{log.read_text()}"
