"""Pulsar's WebSocket API on the gateway's web port, driven by the `websockets` client as a
Pulsar WebSocket application would drive it, and checked against the official
`pulsar-client` on the broker port (same payloads, properties, keys and message ids).

The expected behaviour is Apache Pulsar's `pulsar-websocket` module: paths, query
parameters, JSON frames, upgrade statuses and `send-error` results (see the plugin's docs,
plugins/pulsar-ws/src/lib.rs, and the spec it cites).
"""

import base64
import json
import time
import uuid

import pulsar
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from conftest import Gateway, free_port, wait_for_port
from test_tenancy import EXAMPLE, token

# The tenants of examples/two-tenants.toml, without encryption at rest: the native client
# reads what the WebSocket producer sent (an encrypted tenant's messages reach native
# consumers as ciphertext, by design).
TENANTS = EXAMPLE.read_text().replace("encryption = true", "encryption = false")


@pytest.fixture
def web(tmp_path):
    """The gateway with a web port serving the `pulsar-ws` plugin, and alice's token."""
    port = free_port()
    extra = (
        f'\n[[listeners]]\nname = "web"\nbind = "127.0.0.1:{port}"\nplugin = "pulsar-ws"\nweb = true\n\n'
        + TENANTS
    )
    gw = Gateway(tmp_path, extra).start()
    try:
        wait_for_port(port, gw.proc, gw.log)
        gw.web_port = port
        gw.alice = token(gw, "alice", "1h")
        yield gw
    finally:
        gw.stop()


def url(gw, kind: str, rest: str, query: str = "", tok: str | None = None) -> str:
    params = [p for p in [query, f"token={tok or gw.alice}"] if p]
    return f"ws://127.0.0.1:{gw.web_port}/ws/v2/{kind}/persistent/acme/default/{rest}?{'&'.join(params)}"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def id_fields(encoded: str | bytes) -> tuple:
    """(ledger, entry, partition, batch index) of a serialized MessageIdData."""
    data = base64.b64decode(encoded) if isinstance(encoded, str) else encoded
    fields, pos = {}, 0

    def varint():
        nonlocal pos
        value, shift = 0, 0
        while True:
            b = data[pos]
            pos += 1
            value |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return value

    while pos < len(data):
        key = varint()
        assert key & 7 == 0, "only varint fields in a message id"
        fields[key >> 3] = varint()

    def int32(v):
        v &= 0xFFFFFFFF
        return v - (1 << 32) if v & 0x80000000 else v

    return fields[1], fields[2], int32(fields.get(3, -1)), int32(fields.get(4, -1))


def recv_json(ws, timeout=10):
    return json.loads(ws.recv(timeout=timeout))


def status_of(u: str, **kwargs) -> int:
    try:
        with connect(u, open_timeout=10, **kwargs):
            return 101
    except InvalidStatus as e:
        return e.response.status_code


def test_produce_and_consume_with_properties_key_context_and_event_time(web):
    topic = f"t-{uuid.uuid4().hex[:8]}"
    with connect(url(web, "consumer", f"{topic}/sub1", "subscriptionType=Shared")) as consumer, \
            connect(url(web, "producer", topic)) as producer:
        producer.send(json.dumps({
            "payload": b64(b"hello"),
            "properties": {"a": "1", "b": "2"},
            "context": "c1",
            "key": "dev-1",
            "eventTime": "2026-12-06T10:30:00.5Z",
        }))
        ack = recv_json(producer)
        assert ack["result"] == "ok"
        assert ack["context"] == "c1"
        msg = recv_json(consumer)
        assert msg["messageId"] == ack["messageId"]
        assert base64.b64decode(msg["payload"]) == b"hello"
        assert msg["properties"] == {"a": "1", "b": "2"}
        assert msg["key"] == "dev-1"
        assert msg["eventTime"] == "2026-12-06T10:30:00.5Z"
        assert msg["redeliveryCount"] == 0
        assert msg["publishTime"].endswith("Z")
        consumer.send(json.dumps({"messageId": msg["messageId"]}))


def test_bad_publish_frames_get_send_errors_and_the_session_goes_on(web):
    with connect(url(web, "producer", "errors")) as producer:
        producer.send("not json")
        ack = recv_json(producer)
        assert ack["result"] == "send-error:3"
        assert "context" not in ack
        producer.send(json.dumps({"payload": "not-base64", "context": "c2"}))
        ack = recv_json(producer)
        assert (ack["result"], ack["context"]) == ("send-error:7", "c2")
        assert ack["errorMsg"] == "Invalid Base64 message-payload error=Illegal base64 character 2d"
        producer.send(json.dumps({"payload": b64(b"x"), "eventTime": "yesterday", "context": "c3"}))
        assert recv_json(producer)["result"] == "send-error:7"
        producer.send(json.dumps({"payload": b64(b"ok"), "context": "c4"}))
        ack = recv_json(producer)
        assert (ack["result"], ack["context"]) == ("ok", "c4")


def test_upgrade_refusals_have_pulsars_statuses(web):
    base = f"ws://127.0.0.1:{web.web_port}"
    assert status_of(f"{base}/ws/v2/nothing/persistent/acme/default/t") == 404
    assert status_of(url(web, "consumer", "t/s", "subscriptionType=Bogus")) == 400
    assert status_of(f"{base}/ws/v2/consumer/persistent/acme/default/t/?token={web.alice}") == 400
    assert status_of(url(web, "producer", "t", tok="not.a.token")) == 401
    assert status_of(f"{base}/ws/v2/producer/persistent/acme/default/t") == 401, "anonymous is off"
    assert status_of(f"{base}/ws/v2/producer/persistent/globex/default/t?token={web.alice}") == 403
    assert status_of(f"{base}/ws/v2/producer/persistent/acme?token={web.alice}") == 500
    assert status_of(url(web, "producer", "t", "sendTimeoutMillis=x")) == 400
    # The token may also come as a header.
    assert status_of(
        f"{base}/ws/v2/producer/persistent/acme/default/t",
        additional_headers={"Authorization": f"Bearer {web.alice}"},
    ) == 101


def test_a_second_exclusive_consumer_is_a_conflict(web):
    exclusive = url(web, "consumer", "excl/sub", "subscriptionType=Exclusive")
    with connect(exclusive):
        started = time.monotonic()
        assert status_of(exclusive) == 409
        assert time.monotonic() - started < 5, "answered at once, not after a retry"
        # Another subscription type on a subscription in use is a conflict too.
        assert status_of(url(web, "consumer", "excl/sub", "subscriptionType=Shared")) == 409
    # Once the first consumer has left, the subscription is free again.
    deadline = time.monotonic() + 10
    while True:
        try:
            with connect(exclusive):
                break
        except InvalidStatus as e:
            assert e.response.status_code == 409 and time.monotonic() < deadline, e
            time.sleep(0.2)


def test_reader_from_earliest_and_from_a_message_id(web):
    topic = f"r-{uuid.uuid4().hex[:8]}"
    ids = []
    with connect(url(web, "producer", topic)) as producer:
        for i in range(3):
            producer.send(json.dumps({"payload": b64(f"m{i}".encode())}))
            ids.append(recv_json(producer)["messageId"])
    with connect(url(web, "reader", topic, "messageId=earliest")) as reader:
        got = [recv_json(reader) for _ in range(3)]
        assert [base64.b64decode(m["payload"]) for m in got] == [b"m0", b"m1", b"m2"]
        reader.send(json.dumps({"messageId": got[0]["messageId"]}))
    start = ids[0].replace("+", "%2B").replace("/", "%2F").replace("=", "%3D")
    with connect(url(web, "reader", topic, f"messageId={start}")) as reader:
        assert base64.b64decode(recv_json(reader)["payload"]) == b"m1", "a reader starts after its id"
        reader.send(json.dumps({"type": "isEndOfTopic"}))
        # m2 may come before the answer.
        answers = [recv_json(reader) for _ in range(2)]
        assert {"endOfTopic": False} in answers or {"endOfTopic": True} in answers


def test_pull_mode_sends_one_message_per_permit(web):
    topic = f"p-{uuid.uuid4().hex[:8]}"
    with connect(url(web, "consumer", f"{topic}/sub", "pullMode=true")) as consumer, \
            connect(url(web, "producer", topic)) as producer:
        for i in range(3):
            producer.send(json.dumps({"payload": b64(b"x")}))
            recv_json(producer)
        with pytest.raises(TimeoutError):
            consumer.recv(timeout=1)
        consumer.send(json.dumps({"type": "permit", "permitMessages": 2}))
        recv_json(consumer)
        recv_json(consumer)
        with pytest.raises(TimeoutError):
            consumer.recv(timeout=1)


def test_negative_ack_redelivers_with_a_count(web):
    topic = f"n-{uuid.uuid4().hex[:8]}"
    with connect(url(web, "consumer", f"{topic}/sub", "negativeAckRedeliveryDelay=100")) as consumer, \
            connect(url(web, "producer", topic)) as producer:
        producer.send(json.dumps({"payload": b64(b"again")}))
        recv_json(producer)
        first = recv_json(consumer)
        consumer.send(json.dumps({"type": "negativeAcknowledge", "messageId": first["messageId"]}))
        second = recv_json(consumer)
        assert id_fields(second["messageId"]) == id_fields(first["messageId"])
        assert second["redeliveryCount"] == 1


def test_message_ids_are_interchangeable_with_pulsar_client(web):
    topic = f"i-{uuid.uuid4().hex[:8]}"
    client = pulsar.Client(web.service_url, authentication=pulsar.AuthenticationToken(web.alice))
    try:
        consumer = client.subscribe(f"persistent://acme/default/{topic}", "native")
        with connect(url(web, "producer", topic)) as producer:
            producer.send(json.dumps({"payload": b64(b"from-ws"), "properties": {"p": "v"}, "key": "k"}))
            ack = recv_json(producer)
        msg = consumer.receive(timeout_millis=10000)
        assert msg.data() == b"from-ws"
        assert msg.properties() == {"p": "v"}
        assert msg.partition_key() == "k"
        assert id_fields(msg.message_id().serialize()) == id_fields(ack["messageId"])

        with connect(url(web, "consumer", f"{topic}/ws-sub")) as ws_consumer:
            producer = client.create_producer(f"persistent://acme/default/{topic}")
            sent = producer.send(b"from-native", properties={"q": "w"}, partition_key="k2")
            got = recv_json(ws_consumer)
            assert base64.b64decode(got["payload"]) == b"from-native"
            assert got["properties"] == {"q": "w"}
            assert got["key"] == "k2"
            assert id_fields(got["messageId"]) == id_fields(sent.serialize())
    finally:
        client.close()


def test_unsubscribe_deletes_the_subscription(web):
    topic = f"u-{uuid.uuid4().hex[:8]}"
    with connect(url(web, "consumer", f"{topic}/gone")) as consumer:
        consumer.send(json.dumps({"type": "unsubscribe"}))
        time.sleep(0.5)
    # A new consumer of that name starts at the end: nothing published before it arrives.
    with connect(url(web, "producer", topic)) as producer:
        producer.send(json.dumps({"payload": b64(b"before")}))
        recv_json(producer)
    with connect(url(web, "consumer", f"{topic}/gone")) as consumer:
        with pytest.raises(TimeoutError):
            consumer.recv(timeout=1)


def test_v1_paths_with_their_cluster_segment(web):
    topic = f"v1-{uuid.uuid4().hex[:8]}"
    base = f"ws://127.0.0.1:{web.web_port}"
    # The old path shape carries a cluster segment, which the gateway ignores.
    consumer_url = f"{base}/ws/consumer/persistent/acme/standalone/default/{topic}/s?token={web.alice}"
    producer_url = f"{base}/ws/producer/persistent/acme/standalone/default/{topic}?token={web.alice}"
    with connect(consumer_url) as consumer, connect(producer_url) as producer:
        producer.send(json.dumps({"payload": b64(b"old"), "context": "v1"}))
        assert recv_json(producer)["result"] == "ok"
        assert base64.b64decode(recv_json(consumer)["payload"]) == b"old"


@pytest.mark.parametrize("mode", ["Shared", "Failover", "Key_Shared"])
def test_subscription_types_deliver(web, mode):
    topic = f"m-{uuid.uuid4().hex[:8]}"
    with connect(url(web, "consumer", f"{topic}/s", f"subscriptionType={mode}")) as consumer, \
            connect(url(web, "producer", topic)) as producer:
        producer.send(json.dumps({"payload": b64(mode.encode()), "key": "k"}))
        recv_json(producer)
        assert base64.b64decode(recv_json(consumer)["payload"]) == mode.encode()


def np_url(gw, kind: str, rest: str, query: str = "") -> str:
    return url(gw, kind, rest, query).replace("/persistent/", "/non-persistent/", 1)


def non_persistent(encoded) -> bool:
    """A non-persistent message's id, as Apache Pulsar gives it: ledger 0, entry 0 (with a
    batch index when the gateway's producer batched it, as it batches persistent sends)."""
    ledger, entry, partition, _batch_index = id_fields(encoded)
    return (ledger, entry, partition) == (0, 0, -1)


def test_non_persistent_topics_deliver_to_connected_consumers_only(web):
    topic = f"np-{uuid.uuid4().hex[:8]}"
    with connect(np_url(web, "producer", topic)) as producer:
        producer.send(json.dumps({"payload": b64(b"nobody-listens"), "context": "0"}))
        ack = recv_json(producer)
        assert ack["result"] == "ok", ack
        assert non_persistent(ack["messageId"])
        with connect(np_url(web, "consumer", f"{topic}/sub", "subscriptionType=Shared")) as consumer:
            for i in range(3):
                producer.send(json.dumps({"payload": b64(f"m{i}".encode()), "key": "k", "context": str(i)}))
                ack = recv_json(producer)
                assert (ack["result"], ack["context"]) == ("ok", str(i))
                assert non_persistent(ack["messageId"])
            got = [recv_json(consumer) for _ in range(3)]
            assert [base64.b64decode(m["payload"]) for m in got] == [b"m0", b"m1", b"m2"]
            assert all(m["key"] == "k" and non_persistent(m["messageId"]) for m in got)
            consumer.send(json.dumps({"messageId": got[0]["messageId"]}))  # an ack: accepted
            with pytest.raises(TimeoutError):
                consumer.recv(timeout=1)  # "nobody-listens" was never kept


def test_non_persistent_reader_and_native_consumer_see_websocket_messages(web):
    topic = f"npr-{uuid.uuid4().hex[:8]}"
    client = pulsar.Client(web.service_url, authentication=pulsar.AuthenticationToken(web.alice))
    try:
        native = client.subscribe(f"non-persistent://acme/default/{topic}", "native")
        with connect(np_url(web, "reader", topic)) as reader, connect(np_url(web, "producer", topic)) as producer:
            producer.send(json.dumps({"payload": b64(b"live"), "properties": {"p": "v"}}))
            assert recv_json(producer)["result"] == "ok"
            got = recv_json(reader)
            assert base64.b64decode(got["payload"]) == b"live"
            assert non_persistent(got["messageId"])
            msg = native.receive(timeout_millis=10000)
            assert (msg.data(), msg.properties()) == (b"live", {"p": "v"})
            assert non_persistent(msg.message_id().serialize())
    finally:
        client.close()
