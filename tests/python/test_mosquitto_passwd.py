"""A fleet moving from Mosquitto keeps its password file: `mosquitto_passwd` writes it, Mosquitto
checks it, and `magnetar import-mosquitto-passwd` carries its hashes into the gateway's users.
The same devices, the same passwords, the same answers from both servers (paho, MQTT 3.1.1)."""

import os
import shutil
import subprocess

import paho.mqtt.client as mqtt
import pytest

from conftest import MAGNETAR, MOSQUITTO, Gateway, free_port, stop_process, wait_for_port

PASSWORDS = {"dev-1": "s3cret", "dev-2": "other-secret"}
# CONNACK 5 of MQTT 3.1.1, as paho 2 names it (MQTT 5.0's 0x87).
NOT_AUTHORIZED = 135


@pytest.fixture
def passwd(tmp_path):
    if not shutil.which("mosquitto_passwd"):
        pytest.skip("mosquitto_passwd not installed")
    path = tmp_path / "passwd"
    path.write_text("".join(f"{u}:{p}\n" for u, p in PASSWORDS.items()))
    subprocess.run(["mosquitto_passwd", "-U", str(path)], check=True, timeout=30)
    assert all(line.split(":", 1)[1].startswith("$7$") for line in path.read_text().splitlines())
    return path


@pytest.fixture(params=["magnetar", "mosquitto"])
def server(request, tmp_path, passwd):
    if request.param == "mosquitto":
        if not os.access(MOSQUITTO, os.X_OK):
            pytest.skip(f"{MOSQUITTO} not installed")
        port = free_port()
        conf = tmp_path / "mosquitto.conf"
        conf.write_text(
            # `user root`: as root, Mosquitto would drop to its own user, who cannot read
            # pytest's private temporary directory (ignored when not root).
            f"user root\nlistener {port} 127.0.0.1\nallow_anonymous false\n"
            f"password_file {passwd}\npersistence false\n"
        )
        log = tmp_path / "mosquitto.log"
        proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=open(log, "ab"),
                                stderr=subprocess.STDOUT)
        try:
            wait_for_port(port, proc, log)
            yield port
        finally:
            stop_process(proc)
        return
    imported = subprocess.run(
        [MAGNETAR, "import-mosquitto-passwd", str(passwd), "--tenant", "public"],
        check=True, capture_output=True, text=True, timeout=30,
    )
    assert "2 users imported" in imported.stderr
    gw = Gateway(tmp_path, "\n[auth]\nallow_anonymous = false\n" + imported.stdout).start()
    try:
        yield gw.mqtt_port
    finally:
        gw.stop()


def connack(port: int, user: str | None, password: str | None) -> int:
    """The CONNACK return code an MQTT 3.1.1 login gets, as paho 2 reports it (MQTT 5's
    reason codes: 3.1.1's 5 "not authorized" is 135)."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"pw-{user}-{password}",
                         protocol=mqtt.MQTTv311)
    if user is not None:
        client.username_pw_set(user, password)
    codes = []
    client.on_connect = lambda c, u, flags, rc, props=None: codes.append(rc.value)
    client.connect("127.0.0.1", port)
    try:
        for _ in range(100):
            client.loop(timeout=0.1)
            if codes:
                break
    finally:
        client.disconnect()
    assert codes, "no CONNACK"
    return codes[0]


def test_the_password_file_logs_the_same_devices_in_on_both(server):
    for user, password in PASSWORDS.items():
        assert connack(server, user, password) == 0, user
        # Again: the gateway answers from its login cache, the answer stays the same.
        assert connack(server, user, password) == 0, user
    # One byte off, another device's password, an unknown device, no credentials: refused
    # with 5 (not authorized), as Mosquitto answers.
    assert connack(server, "dev-1", "s3creT") == NOT_AUTHORIZED
    assert connack(server, "dev-1", PASSWORDS["dev-2"]) == NOT_AUTHORIZED
    assert connack(server, "dev-3", "s3cret") == NOT_AUTHORIZED
    assert connack(server, None, None) == NOT_AUTHORIZED
