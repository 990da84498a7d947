"""DescribeConfigs and DescribeCluster against the real gateway: confluent-kafka's
AdminClient (librdkafka: DescribeConfigs v1+, DescribeCluster v0+) and kafka-python's
admin client pinned to 0.11 (DescribeConfigs v0, `codec::legacy`), 1.1 (v1) and 2.0
(v2).

The topic configs are what the gateway does (`plugins/kafka/src/connection/describe.rs`):
`cleanup.policy=delete`, `retention.ms=-1`, `compression.type=uncompressed`,
`max.message.bytes` = the plugin's `max_uncompressed_bytes` (8 MiB by default).
"""
import pytest
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType
from kafka import KafkaAdminClient
from kafka.admin import ConfigResource as PyConfigResource
from kafka.admin import ConfigResourceType

from test_kafka import TIMEOUT, create_topic, kafka, topic_name  # noqa: F401 (fixture)

TOPIC_CONFIGS = {
    "cleanup.policy": "delete",
    "compression.type": "uncompressed",
    "max.message.bytes": str(8 << 20),
    "message.timestamp.type": "CreateTime",
    "retention.bytes": "-1",
    "retention.ms": "-1",
}


def test_confluent_describe_configs_of_a_topic_and_the_broker(kafka):  # noqa: F811 (fixture)
    topic = topic_name()
    create_topic(kafka, topic)
    admin = AdminClient({"bootstrap.servers": kafka.bootstrap})
    futures = admin.describe_configs(
        [ConfigResource(ResourceType.TOPIC, topic), ConfigResource(ResourceType.BROKER, "1")]
    )
    by_type = {res.restype: f.result(timeout=TIMEOUT) for res, f in futures.items()}
    topic_configs = by_type[ResourceType.TOPIC]
    assert {name: e.value for name, e in topic_configs.items()} == TOPIC_CONFIGS
    assert all(e.is_read_only for e in topic_configs.values())
    broker = {name: e.value for name, e in by_type[ResourceType.BROKER].items()}
    assert broker["broker.id"] == "1"
    assert broker["advertised.listeners"] == f"PLAINTEXT://{kafka.bootstrap}"
    assert broker["num.partitions"] == "1"


def test_confluent_describe_configs_of_an_unknown_topic(kafka):  # noqa: F811
    admin = AdminClient({"bootstrap.servers": kafka.bootstrap})
    futures = admin.describe_configs([ConfigResource(ResourceType.TOPIC, topic_name())])
    with pytest.raises(KafkaException) as e:
        for f in futures.values():
            f.result(timeout=TIMEOUT)
    assert e.value.args[0].name() == "UNKNOWN_TOPIC_OR_PART"


def test_confluent_describe_cluster(kafka):  # noqa: F811
    admin = AdminClient({"bootstrap.servers": kafka.bootstrap})
    cluster = admin.describe_cluster(request_timeout=TIMEOUT).result(timeout=TIMEOUT)
    assert cluster.cluster_id == "magnetar"
    assert cluster.controller.id == 1
    assert [(n.id, n.host, n.port) for n in cluster.nodes] == [(1, "127.0.0.1", kafka.kafka_port)]
    # Metadata says the same.
    assert admin.list_topics(timeout=TIMEOUT).cluster_id == "magnetar"


@pytest.mark.parametrize("api_version,version", [((0, 11), 0), ((1, 1), 1), ((2, 0), 2)], ids=["0.11-v0", "1.1-v1", "2.0-v2"])
def test_kafka_python_describe_configs(kafka, api_version, version):  # noqa: F811
    """kafka-python decodes each layout: v0 (`is_default`), v1 (`config_source`,
    synonyms), v2."""
    topic = topic_name()
    create_topic(kafka, topic)
    admin = KafkaAdminClient(bootstrap_servers=kafka.bootstrap, api_version=api_version)
    try:
        (response,) = admin.describe_configs([PyConfigResource(ConfigResourceType.TOPIC, topic)])
        assert response.API_VERSION == version
        (resource,) = response.resources
        error_code, _, resource_type, name, entries = resource[:5]
        assert (error_code, resource_type, name) == (0, 2, topic)
        assert {e[0]: e[1] for e in entries} == TOPIC_CONFIGS
        (missing,) = admin.describe_configs([PyConfigResource(ConfigResourceType.TOPIC, topic_name())])
        assert missing.resources[0][0] == 3  # UNKNOWN_TOPIC_OR_PARTITION
    finally:
        admin.close()
