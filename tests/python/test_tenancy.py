"""Tenancy as official clients see it, on the contract of examples/two-tenants.toml:
tokens from `magnetar token` work with pulsar-client's AuthenticationToken on the embedded
broker's port and as MQTT passwords (paho); no tenant reaches another's topics."""

import json
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pulsar
import pytest

from conftest import ADMIN_TOKEN, MAGNETAR, Gateway

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "two-tenants.toml"


@pytest.fixture
def two_tenants(tmp_path):
    gw = Gateway(tmp_path, "\n" + EXAMPLE.read_text()).start()
    try:
        yield gw
    finally:
        gw.stop()


def token(gw: Gateway, user: str, expires_in: str | None = None) -> str:
    cmd = [MAGNETAR, "token", "--config", str(gw.config), "--data-dir", str(gw.data_dir), "--user", user]
    if expires_in:
        cmd += ["--expires-in", expires_in]
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=30).stdout.strip()


def can_produce(gw: Gateway, auth, topic: str) -> bool:
    kwargs = {"operation_timeout_seconds": 5}
    if auth is not None:
        kwargs["authentication"] = auth
    client = pulsar.Client(gw.service_url, **kwargs)
    try:
        producer = client.create_producer(topic)
        producer.send(b"probe")
        return True
    except Exception:
        return False
    finally:
        client.close()


def test_tokens_on_the_broker_port(two_tenants):
    gw = two_tenants
    alice = pulsar.AuthenticationToken(token(gw, "alice", "1h"))
    assert can_produce(gw, alice, "persistent://acme/default/orders")
    assert not can_produce(gw, alice, "persistent://globex/default/orders")
    assert not can_produce(gw, None, "persistent://acme/default/orders")
    assert not can_produce(gw, pulsar.AuthenticationToken("not.a.token"), "persistent://acme/default/orders")
    expired = token(gw, "bob", "1s")
    time.sleep(1.5)
    assert not can_produce(gw, pulsar.AuthenticationToken(expired), "persistent://globex/default/orders")

    # A consumer of alice's tenant reads what alice produced; bob cannot subscribe there.
    client = pulsar.Client(gw.service_url, authentication=alice)
    try:
        consumer = client.subscribe(
            "persistent://acme/default/orders",
            "audit",
            initial_position=pulsar.InitialPosition.Earliest,
        )
        assert consumer.receive(timeout_millis=10000).data() == b"probe"
    finally:
        client.close()
    bob = pulsar.Client(gw.service_url, authentication=pulsar.AuthenticationToken(token(gw, "bob")),
                        operation_timeout_seconds=5)
    try:
        with pytest.raises(Exception):
            bob.subscribe("persistent://acme/default/orders", "spy")
    finally:
        bob.close()


def test_mqtt_tenants_with_passwords_and_tokens(two_tenants):
    gw = two_tenants
    received = {"alice": [], "bob": []}

    def client(user, password, sink=None):
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{user}-{uuid.uuid4().hex[:6]}")
        c.username_pw_set(user, password)
        result = {}
        c.on_connect = lambda c_, u, f, rc, p=None: result.setdefault("rc", rc)
        if sink is not None:
            c.on_message = lambda c_, u, m: sink.append((m.topic, m.payload))
        c.connect("127.0.0.1", gw.mqtt_port)
        c.loop_start()
        deadline = time.time() + 10
        while "rc" not in result and time.time() < deadline:
            time.sleep(0.02)
        return c, result.get("rc")

    bad, rc = client("alice", "wrong")
    assert rc is not None and rc.is_failure
    bad.loop_stop()
    a_sub, rc = client("alice", token(gw, "alice"), received["alice"])
    assert not rc.is_failure
    b_sub, rc = client("bob", "bob-secret", received["bob"])
    assert not rc.is_failure
    for c in (a_sub, b_sub):
        c.subscribe("#", qos=1)
    time.sleep(0.5)
    a_pub, _ = client("alice", "alice-secret")
    b_pub, _ = client("bob", "bob-secret")
    a_pub.publish("shared/name", b"from-acme", qos=1).wait_for_publish(10)
    b_pub.publish("shared/name", b"from-globex", qos=1).wait_for_publish(10)
    deadline = time.time() + 10
    while (not received["alice"] or not received["bob"]) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    for c in (a_sub, b_sub, a_pub, b_pub):
        c.loop_stop()
        c.disconnect()
    assert received["alice"] == [("shared/name", b"from-acme")]
    assert received["bob"] == [("shared/name", b"from-globex")]


def test_pulsar_end_to_end_encryption_format_with_the_official_client(two_tenants, tmp_path):
    """A tenant with `pulsar_encryption` gets Pulsar's own end-to-end format: its native
    consumer decrypts with a CryptoKeyReader, and what its native producer encrypted reaches
    MQTT subscribers in plaintext."""
    gw = two_tenants
    priv, pub = tmp_path / "acme_priv.pem", tmp_path / "acme_pub.pem"
    # As Pulsar's encryption cookbook makes them.
    subprocess.run(["openssl", "genrsa", "-out", str(priv), "2048"], check=True, capture_output=True)
    subprocess.run(["openssl", "rsa", "-in", str(priv), "-pubout", "-out", str(pub)],
                   check=True, capture_output=True)
    body = json.dumps({"encryption": True, "pulsar_encryption": {
        "key_name": "acme-key", "public_key": str(pub), "private_key": str(priv)}})
    req = urllib.request.Request(f"http://127.0.0.1:{gw.admin_port}/admin/v1/tenants/acme", data=body.encode(),
                                 method="PUT", headers={"Authorization": f"Bearer {ADMIN_TOKEN}",
                                                        "Content-Type": "application/json"})
    assert urllib.request.urlopen(req, timeout=10).status == 200

    received = []
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="e2e-sub")
    sub.username_pw_set("alice", "alice-secret")
    sub.on_message = lambda c, u, m: received.append((m.topic, m.payload))
    sub.connect("127.0.0.1", gw.mqtt_port)
    sub.loop_start()
    sub.subscribe("vault/#", qos=1)
    time.sleep(0.5)
    pub_c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="e2e-pub")
    pub_c.username_pw_set("alice", "alice-secret")
    pub_c.connect("127.0.0.1", gw.mqtt_port)
    pub_c.loop_start()
    pub_c.publish("vault/mqtt", b"sealed-by-the-gateway", qos=1).wait_for_publish(10)

    alice = pulsar.AuthenticationToken(token(gw, "alice"))
    client = pulsar.Client(gw.service_url, authentication=alice, operation_timeout_seconds=10)
    try:
        reader = pulsar.CryptoKeyReader(str(pub), str(priv))
        consumer = client.subscribe("persistent://acme/default/mqtt", "native-e2e",
                                    initial_position=pulsar.InitialPosition.Earliest,
                                    crypto_key_reader=reader)
        msg = consumer.receive(timeout_millis=10000)
        assert msg.data() == b"sealed-by-the-gateway"
        assert msg.properties().get("mqtt.topic") == "vault/mqtt"
        # Without the key: ciphertext only.
        blind = client.subscribe("persistent://acme/default/mqtt", "native-blind",
                                 initial_position=pulsar.InitialPosition.Earliest,
                                 crypto_failure_action=pulsar.ConsumerCryptoFailureAction.CONSUME)
        raw = blind.receive(timeout_millis=10000).data()
        assert b"sealed-by-the-gateway" not in raw and len(raw) == len(b"sealed-by-the-gateway") + 16
        # The other way: the tenant's own producer encrypts; MQTT subscribers get plaintext.
        producer = client.create_producer("persistent://acme/default/mqtt", encryption_key="acme-key",
                                          crypto_key_reader=reader)
        producer.send(b"sealed-by-the-client", properties={"mqtt.topic": "vault/native", "mqtt.qos": "1"})
        deadline = time.time() + 10
        while len(received) < 2 and time.time() < deadline:
            time.sleep(0.05)
    finally:
        client.close()
        for c in (sub, pub_c):
            c.loop_stop()
            c.disconnect()
    assert received == [("vault/mqtt", b"sealed-by-the-gateway"), ("vault/native", b"sealed-by-the-client")]
