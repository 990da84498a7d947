//! DescribeConfigs (KIP-133; v1 synonyms KIP-226, v3 types and documentation KIP-569) and
//! DescribeCluster (KIP-700): what this gateway says about its topics and about itself.
//!
//! - **Topic configs** are what the gateway really does, the same for every topic, and read
//!   only (AlterConfigs is not served): `cleanup.policy=delete` (no compaction),
//!   `retention.ms=-1` and `retention.bytes=-1` (the gateway deletes nothing; the backend's
//!   retention policy does, docs/kafka.md section 7), `compression.type=uncompressed`
//!   (records are stored as messages and fetched as uncompressed batches),
//!   `max.message.bytes` (a batch's records once decompressed, `max_uncompressed_bytes`),
//!   `message.timestamp.type=CreateTime` (the producer's timestamp is the event time). An
//!   unknown topic is `UNKNOWN_TOPIC_OR_PARTITION`, an invalid name
//!   `INVALID_TOPIC_EXCEPTION`.
//! - **Broker configs** (resource name empty or this gateway's node id): the plugin's
//!   options under Kafka's names (`broker.id`, `advertised.listeners`,
//!   `auto.create.topics.enable`, `num.partitions`, `message.max.bytes`,
//!   `socket.request.max.bytes`, `group.*`). Another broker id or another resource type
//!   (broker loggers, client metrics) is `INVALID_REQUEST`.
//! - `configuration_keys` keeps only the keys named (unknown ones are left out, as Kafka
//!   does); synonyms and documentation only when asked.
//! - **DescribeCluster** v0-v1: this gateway as the one broker and controller, with
//!   Metadata's cluster id; endpoint type 1 (brokers) only, else
//!   `UNSUPPORTED_ENDPOINT_TYPE`; authorized operations are not computed (`i32::MIN`,
//!   Kafka's "not requested").

use kafka_protocol::messages::describe_cluster_response::DescribeClusterBroker;
use kafka_protocol::messages::describe_configs_response::{
    DescribeConfigsResourceResult, DescribeConfigsResult, DescribeConfigsSynonym,
};
use kafka_protocol::messages::{
    BrokerId, DescribeClusterRequest, DescribeClusterResponse, DescribeConfigsRequest,
    DescribeConfigsResponse, RequestHeader,
};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::ResponseError;

use super::topics::{valid_name, CLUSTER_ID, NODE_ID};
use super::{error, op_error_code, Job, JobEvent, KafkaConnection};

/// Kafka's `ConfigResource.Type`.
const TOPIC: i8 = 2;
const BROKER: i8 = 4;

/// Kafka's `ConfigSource` (DescribeConfigs v1+).
const STATIC_BROKER_CONFIG: i8 = 4;
const DEFAULT_CONFIG: i8 = 5;

/// Kafka's `ConfigDef.Type` (DescribeConfigs v3+).
const BOOLEAN: i8 = 1;
const STRING: i8 = 2;
const INT: i8 = 3;
const LONG: i8 = 5;
const LIST: i8 = 7;

/// One config entry: name, value, source, type, documentation.
struct Entry {
    name: &'static str,
    value: String,
    source: i8,
    kind: i8,
    doc: &'static str,
}

fn entry(
    name: &'static str,
    value: impl ToString,
    source: i8,
    kind: i8,
    doc: &'static str,
) -> Entry {
    Entry {
        name,
        value: value.to_string(),
        source,
        kind,
        doc,
    }
}

/// A DescribeConfigs request being served.
pub struct DescribeConfigsJob {
    req: DescribeConfigsRequest,
    /// The describe of unknown topics failed with this code.
    describe_error: Option<i16>,
    started: bool,
}

impl KafkaConnection {
    pub(super) fn start_describe_configs(&mut self, req: DescribeConfigsRequest) -> Job {
        Job::DescribeConfigs(DescribeConfigsJob {
            req,
            describe_error: None,
            started: false,
        })
    }

    pub(super) fn step_describe_configs(
        &mut self,
        header: &RequestHeader,
        j: &mut DescribeConfigsJob,
        inbox: Vec<JobEvent>,
    ) -> Result<bool, String> {
        let mut described = false;
        for e in inbox {
            if let JobEvent::Described(result) = e {
                described = true;
                if let Err(e) = result {
                    j.describe_error = Some(op_error_code(&e));
                }
            }
        }
        if !j.started {
            j.started = true;
            let topics = j
                .req
                .resources
                .iter()
                .filter(|r| r.resource_type == TOPIC)
                .map(|r| r.resource_name.as_str());
            if !self.described(topics) {
                return Ok(false);
            }
        } else if !described {
            return Ok(false);
        }
        let version = header.request_api_version;
        let results = j
            .req
            .resources
            .iter()
            .map(|r| {
                let configs = match r.resource_type {
                    TOPIC => self.topic_configs(&r.resource_name, j.describe_error),
                    BROKER => self.broker_configs(&r.resource_name),
                    other => Err((
                        error::INVALID_REQUEST,
                        format!("resource type {other} is not served"),
                    )),
                };
                let result = DescribeConfigsResult::default()
                    .with_resource_type(r.resource_type)
                    .with_resource_name(r.resource_name.clone());
                match configs {
                    Err((code, message)) => result
                        .with_error_code(code)
                        .with_error_message(Some(StrBytes::from_string(message))),
                    Ok(entries) => result.with_configs(
                        entries
                            .into_iter()
                            .filter(|e| {
                                r.configuration_keys
                                    .as_ref()
                                    .is_none_or(|keys| keys.iter().any(|k| k.as_str() == e.name))
                            })
                            .map(|e| {
                                let value = Some(StrBytes::from_string(e.value));
                                let mut c = DescribeConfigsResourceResult::default()
                                    .with_name(StrBytes::from_static_str(e.name))
                                    .with_value(value.clone())
                                    .with_read_only(true)
                                    .with_config_source(e.source);
                                if version >= 1 && j.req.include_synonyms {
                                    c = c.with_synonyms(vec![DescribeConfigsSynonym::default()
                                        .with_name(StrBytes::from_static_str(e.name))
                                        .with_value(value)
                                        .with_source(e.source)]);
                                }
                                if version >= 3 {
                                    c = c.with_config_type(e.kind);
                                    if j.req.include_documentation {
                                        c = c.with_documentation(Some(StrBytes::from_static_str(
                                            e.doc,
                                        )));
                                    }
                                }
                                c
                            })
                            .collect(),
                    ),
                }
            })
            .collect();
        self.respond(
            header,
            &DescribeConfigsResponse::default().with_results(results),
        )?;
        Ok(true)
    }

    fn topic_configs(
        &self,
        name: &str,
        describe_error: Option<i16>,
    ) -> Result<Vec<Entry>, (i16, String)> {
        if !valid_name(name) {
            return Err((
                error::INVALID_TOPIC_EXCEPTION,
                format!("invalid topic name {name:?}"),
            ));
        }
        if self.topics.get(self.now_ms, name).is_none() {
            let code = describe_error.unwrap_or(error::UNKNOWN_TOPIC_OR_PARTITION);
            return Err((code, format!("topic {name} does not exist")));
        }
        Ok(vec![
            entry(
                "cleanup.policy",
                "delete",
                DEFAULT_CONFIG,
                LIST,
                "Deleted, never compacted.",
            ),
            entry(
                "compression.type",
                "uncompressed",
                DEFAULT_CONFIG,
                STRING,
                "Stored as messages, fetched uncompressed.",
            ),
            entry(
                "max.message.bytes",
                self.config.max_uncompressed_bytes,
                STATIC_BROKER_CONFIG,
                INT,
                "Largest batch once decompressed.",
            ),
            entry(
                "message.timestamp.type",
                "CreateTime",
                DEFAULT_CONFIG,
                STRING,
                "The producer's timestamp (event time).",
            ),
            entry(
                "retention.bytes",
                -1,
                DEFAULT_CONFIG,
                LONG,
                "None here: the backend's retention.",
            ),
            entry(
                "retention.ms",
                -1,
                DEFAULT_CONFIG,
                LONG,
                "None here: the backend's retention.",
            ),
        ])
    }

    fn broker_configs(&self, name: &str) -> Result<Vec<Entry>, (i16, String)> {
        if !(name.is_empty() || name == NODE_ID.to_string()) {
            return Err((
                error::INVALID_REQUEST,
                format!("broker {name} is not this gateway (node {NODE_ID})"),
            ));
        }
        let c = &self.config;
        let listener = format!("PLAINTEXT://{}:{}", c.advertised_host(), c.advertised_port);
        Ok(vec![
            entry(
                "advertised.listeners",
                listener,
                STATIC_BROKER_CONFIG,
                LIST,
                "Where clients reach this gateway.",
            ),
            entry(
                "auto.create.topics.enable",
                c.auto_create_topics,
                STATIC_BROKER_CONFIG,
                BOOLEAN,
                "Metadata creates unknown topics.",
            ),
            entry(
                "broker.id",
                NODE_ID,
                STATIC_BROKER_CONFIG,
                INT,
                "This gateway's node id.",
            ),
            entry(
                "group.initial.rebalance.delay.ms",
                c.groups.initial_rebalance_delay_ms,
                STATIC_BROKER_CONFIG,
                INT,
                "How long a new group waits for more members.",
            ),
            entry(
                "group.max.session.timeout.ms",
                c.groups.max_session_timeout_ms,
                STATIC_BROKER_CONFIG,
                INT,
                "Largest session timeout a member may ask.",
            ),
            entry(
                "group.min.session.timeout.ms",
                c.groups.min_session_timeout_ms,
                STATIC_BROKER_CONFIG,
                INT,
                "Smallest session timeout a member may ask.",
            ),
            entry(
                "message.max.bytes",
                c.max_uncompressed_bytes,
                STATIC_BROKER_CONFIG,
                INT,
                "Largest record batch once decompressed.",
            ),
            entry(
                "num.partitions",
                c.default_partitions,
                STATIC_BROKER_CONFIG,
                INT,
                "Partitions of an auto-created topic.",
            ),
            entry(
                "socket.request.max.bytes",
                c.max_request_bytes,
                STATIC_BROKER_CONFIG,
                INT,
                "Largest request accepted.",
            ),
        ])
    }

    /// DescribeCluster, answered at once.
    pub(super) fn describe_cluster(
        &mut self,
        header: &RequestHeader,
        req: DescribeClusterRequest,
    ) -> Result<(), String> {
        let body = DescribeClusterResponse::default().with_cluster_authorized_operations(i32::MIN);
        let body = if req.endpoint_type != 1 {
            body.with_error_code(ResponseError::UnsupportedEndpointType.code())
                .with_endpoint_type(req.endpoint_type)
        } else {
            body.with_cluster_id(StrBytes::from_static_str(CLUSTER_ID))
                .with_controller_id(BrokerId(NODE_ID))
                .with_brokers(vec![DescribeClusterBroker::default()
                    .with_broker_id(BrokerId(NODE_ID))
                    .with_host(StrBytes::from_string(self.config.advertised_host()))
                    .with_port(i32::from(self.config.advertised_port))])
        };
        self.respond(header, &body)
    }
}

#[cfg(test)]
mod tests {
    use kafka_protocol::messages::describe_configs_request::DescribeConfigsResource;
    use kafka_protocol::messages::{ApiKey, DescribeClusterRequest};
    use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion};
    use magnetar_sdk::testing::SimHost;

    use super::*;
    use crate::config::Config;
    use crate::test_wire;

    fn host() -> SimHost<KafkaConnection> {
        let mut host = SimHost::new(1_000, KafkaConnection::new(Config::default()));
        host.topics_mut().insert("t".into(), 2);
        host
    }

    fn call<Q: Encodable + HeaderVersion, R: Decodable + HeaderVersion>(
        host: &mut SimHost<KafkaConnection>,
        key: ApiKey,
        version: i16,
        body: &Q,
    ) -> R {
        host.data(&test_wire::request(key, version, 3, "test", body));
        host.run();
        assert_eq!(host.closed(), None, "{key:?} v{version}");
        test_wire::response(&host.take_sent(), version, 3).expect("a response")
    }

    fn resource(kind: i8, name: &str, keys: Option<&[&str]>) -> DescribeConfigsResource {
        DescribeConfigsResource::default()
            .with_resource_type(kind)
            .with_resource_name(StrBytes::from_string(name.into()))
            .with_configuration_keys(keys.map(|ks| {
                ks.iter()
                    .map(|k| StrBytes::from_string(k.to_string()))
                    .collect()
            }))
    }

    fn values(r: &DescribeConfigsResult) -> Vec<(String, String)> {
        r.configs
            .iter()
            .map(|c| {
                (
                    c.name.to_string(),
                    c.value.as_deref().unwrap_or("").to_string(),
                )
            })
            .collect()
    }

    /// Every served version: a topic's configs as the gateway behaves, an unknown topic,
    /// an invalid name, the broker by "" and by id, another broker and another resource
    /// type, a key filter; synonyms (v1+), types and documentation (v3+) when asked.
    #[test]
    fn describe_configs_of_topics_and_the_broker() {
        let mut host = host();
        for v in 1..=4 {
            let req = DescribeConfigsRequest::default()
                .with_resources(vec![
                    resource(TOPIC, "t", None),
                    resource(TOPIC, "nope", None),
                    resource(TOPIC, "a b", None),
                    resource(BROKER, "", None),
                    resource(BROKER, "1", Some(&["broker.id", "no.such.key"])),
                    resource(BROKER, "2", None),
                    resource(8, "root", None),
                    resource(TOPIC, "t", Some(&["retention.ms"])),
                ])
                .with_include_synonyms(true)
                .with_include_documentation(v >= 3);
            let r: DescribeConfigsResponse = call(&mut host, ApiKey::DescribeConfigs, v, &req);
            let codes: Vec<_> = r.results.iter().map(|r| r.error_code).collect();
            assert_eq!(codes, [0, 3, 17, 0, 0, 42, 42, 0], "v{v}");
            let topic = values(&r.results[0]);
            for want in [
                ("cleanup.policy", "delete"),
                ("compression.type", "uncompressed"),
                ("max.message.bytes", "8388608"),
                ("retention.ms", "-1"),
            ] {
                assert!(
                    topic.contains(&(want.0.into(), want.1.into())),
                    "v{v} {want:?}"
                );
            }
            assert!(r.results[0].configs.iter().all(|c| c.read_only));
            assert!(values(&r.results[3]).contains(&("broker.id".into(), "1".into())));
            assert_eq!(
                values(&r.results[4]),
                [("broker.id".to_string(), "1".to_string())]
            );
            assert_eq!(
                values(&r.results[7]),
                [("retention.ms".to_string(), "-1".to_string())]
            );
            let c = &r.results[7].configs[0];
            assert_eq!(c.config_source, DEFAULT_CONFIG);
            assert_eq!(c.synonyms.len(), 1, "v{v}");
            if v >= 3 {
                assert_eq!(c.config_type, LONG);
                assert!(c.documentation.is_some());
            }
        }
    }

    /// v0 (0.15.1's client side: the bytes of KIP-133's first version) says `is_default`.
    #[test]
    fn describe_configs_v0() {
        use kafka_protocol_v3::messages::describe_configs_request::DescribeConfigsResource as R0;
        use kafka_protocol_v3::messages::{
            DescribeConfigsRequest as Req0, DescribeConfigsResponse as Resp0, RequestHeader as H0,
            ResponseHeader as RH0,
        };
        use kafka_protocol_v3::protocol::{Decodable as _, Encodable as _, StrBytes as S0};
        let mut host = host();
        let req = Req0::default().with_resources(vec![R0::default()
            .with_resource_type(TOPIC)
            .with_resource_name(S0::from_static_str("t"))
            .with_configuration_keys(None)]);
        let mut frame = bytes::BytesMut::new();
        H0::default()
            .with_request_api_key(ApiKey::DescribeConfigs as i16)
            .with_request_api_version(0)
            .with_correlation_id(5)
            .encode(&mut frame, 1)
            .unwrap();
        req.encode(&mut frame, 0).unwrap();
        let mut bytes = (frame.len() as i32).to_be_bytes().to_vec();
        bytes.extend_from_slice(&frame);
        host.data(&bytes);
        host.run();
        let sent = host.take_sent();
        let mut body = bytes::Bytes::copy_from_slice(&sent[4..]);
        assert_eq!(RH0::decode(&mut body, 0).unwrap().correlation_id, 5);
        let r = Resp0::decode(&mut body, 0).unwrap();
        assert!(body.is_empty());
        let get = |n: &str| {
            r.results[0]
                .configs
                .iter()
                .find(|c| c.name.as_str() == n)
                .map(|c| (c.value.as_deref().map(str::to_string), c.is_default))
        };
        assert_eq!(get("cleanup.policy"), Some((Some("delete".into()), true)));
        assert_eq!(
            get("max.message.bytes"),
            Some((Some("8388608".into()), false))
        );
    }

    /// v0 and v1: this gateway, Metadata's cluster id; v1's other endpoint type refused.
    #[test]
    fn describe_cluster_names_this_gateway() {
        let mut host = host();
        for v in 0..=1 {
            let r: DescribeClusterResponse = call(
                &mut host,
                ApiKey::DescribeCluster,
                v,
                &DescribeClusterRequest::default(),
            );
            assert_eq!(r.error_code, 0);
            assert_eq!(r.cluster_id.as_str(), CLUSTER_ID);
            assert_eq!(r.controller_id, BrokerId(NODE_ID));
            let b: Vec<_> = r
                .brokers
                .iter()
                .map(|b| (b.broker_id, b.host.to_string(), b.port))
                .collect();
            assert_eq!(b, [(BrokerId(1), "127.0.0.1".to_string(), 9092)]);
        }
        let r: DescribeClusterResponse = call(
            &mut host,
            ApiKey::DescribeCluster,
            1,
            &DescribeClusterRequest::default().with_endpoint_type(2),
        );
        assert_eq!(r.error_code, ResponseError::UnsupportedEndpointType.code());
    }
}
