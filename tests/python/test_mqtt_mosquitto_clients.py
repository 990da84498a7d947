"""MQTT through the gateway driven by Mosquitto's own command-line clients (Debian
`mosquitto-clients`): QoS 2, retained messages and wills as `mosquitto_pub`/`mosquitto_sub`
use them."""
import shutil
import signal
import subprocess
import time

import pytest

pytestmark = pytest.mark.skipif(shutil.which("mosquitto_sub") is None, reason="mosquitto-clients not installed")

TIMEOUT = 20


def sub_proc(port, *args):
    return subprocess.Popen(
        ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-W", str(TIMEOUT), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def pub(port, *args):
    subprocess.run(
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), *args],
        check=True,
        timeout=TIMEOUT,
    )


def wait_subscribed(proc):
    # mosquitto_sub prints nothing when it subscribed; give it a moment to get its SUBACK.
    time.sleep(0.5)
    assert proc.poll() is None, proc.stderr.read()


def test_qos2_publish_and_subscribe(gateway):
    sub = sub_proc(gateway.mqtt_port, "-q", "2", "-C", "3", "-v", "-t", "m/q2/#")
    try:
        wait_subscribed(sub)
        for i in range(3):
            pub(gateway.mqtt_port, "-q", "2", "-t", f"m/q2/{i}", "-m", f"v{i}")
        out, err = sub.communicate(timeout=TIMEOUT)
        assert sub.returncode == 0, err
        assert sorted(out.splitlines()) == ["m/q2/0 v0", "m/q2/1 v1", "m/q2/2 v2"]
    finally:
        sub.kill()


def test_retained_message_and_its_removal(gateway):
    pub(gateway.mqtt_port, "-q", "1", "-r", "-t", "m/ret/a", "-m", "kept")
    pub(gateway.mqtt_port, "-q", "1", "-r", "-t", "m/ret/b", "-m", "dropped")
    pub(gateway.mqtt_port, "-q", "1", "-r", "-t", "m/ret/b", "-n")  # empty: removes it
    # --retained-only: prints retained messages only, and stops at the first live one.
    out = subprocess.run(
        ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(gateway.mqtt_port), "-t", "m/ret/#",
         "-v", "-q", "1", "--retained-only", "-W", "2"],
        capture_output=True, text=True, timeout=TIMEOUT,
    )
    assert out.stdout.splitlines() == ["m/ret/a kept"], out


def test_will_of_a_killed_client(gateway):
    watch = sub_proc(gateway.mqtt_port, "-q", "1", "-C", "1", "-v", "-t", "m/will/#")
    victim = sub_proc(gateway.mqtt_port, "-t", "m/nothing", "-i", "victim",
                      "--will-topic", "m/will/victim", "--will-payload", "died", "--will-qos", "1")
    try:
        wait_subscribed(watch)
        wait_subscribed(victim)
        victim.send_signal(signal.SIGKILL)
        out, err = watch.communicate(timeout=TIMEOUT)
        assert out.splitlines() == ["m/will/victim died"], err
    finally:
        watch.kill()
        victim.kill()
