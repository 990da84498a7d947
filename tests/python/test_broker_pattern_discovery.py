"""Regex (pattern) consumers of the official Python `pulsar-client` find topics created after
they subscribed (issue 24).

The client polls `CommandGetTopicsOfNamespace` every `pattern_auto_discovery_period` seconds
and subscribes to the new matching topics with the consumer's own initial position, as the
Java client does: Latest (the default) skips what was written before the topic was found.

`pulsar-client` 3.13 checks the `pattern_auto_discovery_period` argument of `subscribe` but
never passes it on (apache/pulsar-client-python#171), so the period stays at 60 s whatever
the caller asks. `discovery_period` below applies it to the consumer configuration instead;
with a client that honours the argument it changes nothing.

Fixtures: test_broker_pulsar_client.py (MAGNETAR_BROKER_BIN selects the binary).
"""

import re
import time
import uuid

import pulsar
import pytest

from test_broker_pulsar_client import _admin, _client  # noqa: F401
from test_broker_pulsar_client import broker, broker_binary  # noqa: F401 (fixtures)

PERIOD_S = 1


@pytest.fixture
def discovery_period(monkeypatch):
    """Makes every consumer configuration the wrapper creates use PERIOD_S."""

    class Configuration(pulsar._pulsar.ConsumerConfiguration):
        def __init__(self):
            super().__init__()
            self.pattern_auto_discovery_period(PERIOD_S)

    monkeypatch.setattr(pulsar._pulsar, "ConsumerConfiguration", Configuration)
    return PERIOD_S


def _wait_for(condition, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout_s} s: {what}")


def _receive(consumer, n, timeout_s):
    """Receives and acks `n` messages within `timeout_s`; returns their payloads as text."""
    got = []
    deadline = time.monotonic() + timeout_s
    while len(got) < n and time.monotonic() < deadline:
        try:
            msg = consumer.receive(timeout_millis=100)
        except pulsar.Timeout:
            continue
        got.append(msg.data().decode())
        consumer.acknowledge(msg)
    return got


def _has_consumer(broker, topic, subscription):
    local = topic.removeprefix("persistent://")
    status, stats = _admin(broker, "GET", f"/persistent/{local}/stats")
    sub = (stats or {}).get("subscriptions", {}).get(subscription) if status == 200 else None
    return bool(sub and sub["consumers"])


def _send(client, topic, payload):
    producer = client.create_producer(topic, batching_enabled=False)
    producer.send(payload.encode())
    producer.close()


def test_pattern_consumer_receives_topics_created_after_it_subscribed(broker, discovery_period):
    client = _client(broker)
    prefix = f"persistent://public/default/pat-{uuid.uuid4().hex[:8]}"
    consumer = client.subscribe(
        re.compile(f"{prefix}-.*"),
        "sub",
        pattern_auto_discovery_period=discovery_period,
        initial_position=pulsar.InitialPosition.Earliest,
    )
    started = time.monotonic()
    for name in ("a", "b", "c"):
        _send(client, f"{prefix}-{name}", f"m-{name}")
    # One period to find the topics, one more in case the poll just missed them.
    got = _receive(consumer, 3, 2 * discovery_period + 2)
    assert sorted(got) == ["m-a", "m-b", "m-c"], f"after {time.monotonic() - started:.1f} s"
    client.close()


def test_pattern_consumer_at_latest_gets_what_is_sent_once_the_topic_is_found(
    broker, discovery_period
):
    client = _client(broker)
    prefix = f"persistent://public/default/pat-{uuid.uuid4().hex[:8]}"
    consumer = client.subscribe(
        re.compile(f"{prefix}-.*"), "sub", pattern_auto_discovery_period=discovery_period
    )
    topic = f"{prefix}-a"
    _send(client, topic, "before")
    _wait_for(
        lambda: _has_consumer(broker, topic, "sub"),
        2 * discovery_period + 2,
        f"the pattern consumer on {topic}",
    )
    _send(client, topic, "after")
    # Latest, as the reference clients: the subscription starts where the topic was found.
    assert _receive(consumer, 1, 10) == ["after"]
    client.close()


def test_non_persistent_pattern_consumer_is_given_no_persistent_topics(broker, discovery_period):
    client = _client(broker)
    prefix = f"public/default/np-{uuid.uuid4().hex[:8]}"
    _send(client, f"persistent://{prefix}-a", "persistent")
    consumer = client.subscribe(
        re.compile(f"non-persistent://{prefix}-.*"),
        "sub",
        pattern_auto_discovery_period=discovery_period,
        initial_position=pulsar.InitialPosition.Earliest,
        regex_subscription_mode=pulsar.RegexSubscriptionMode.NonPersistentOnly,
    )
    # Two discovery rounds: a persistent topic offered by either would be received here.
    assert _receive(consumer, 1, 2 * discovery_period + 1) == []
    assert not _has_consumer(broker, f"persistent://{prefix}-a", "sub")
    client.close()
