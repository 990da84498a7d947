//! Topics: the names Kafka clients may use, how a Kafka partition is named in the backend,
//! the connection's cache of partition counts, and the requests about topics: Metadata,
//! CreateTopics, DeleteTopics and CreatePartitions (docs/kafka.md sections 1.1 and 2.3).
//!
//! A Kafka topic `t` with *P* partitions is the partitioned topic `t` of the principal's
//! namespace; partition *p* is `t-partition-p`. A non-partitioned topic shows as one
//! partition (0), named `t`. One gateway alone leads every partition: Metadata names it
//! (node [`NODE_ID`], the advertised port of the config) as leader, replica and ISR.

use std::collections::HashMap;

use kafka_protocol::messages::create_partitions_response::CreatePartitionsTopicResult;
use kafka_protocol::messages::create_topics_response::CreatableTopicResult;
use kafka_protocol::messages::delete_topics_response::DeletableTopicResult;
use kafka_protocol::messages::metadata_response::{
    MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
};
use kafka_protocol::messages::{
    BrokerId, CreatePartitionsRequest, CreatePartitionsResponse, CreateTopicsRequest,
    CreateTopicsResponse, DeleteTopicsRequest, DeleteTopicsResponse, MetadataRequest,
    MetadataResponse, RequestHeader, TopicName,
};
use kafka_protocol::protocol::StrBytes;
use magnetar_sdk::{Action, ErrorKind, OpError, TopicInfo};

use super::{error, op_error_code, Job, JobEvent, KafkaConnection, Op};

/// The node id of this gateway in Metadata (one gateway: it leads everything).
pub const NODE_ID: i32 = 1;
/// What Metadata answers as `cluster_id` (v2+).
pub const CLUSTER_ID: &str = "magnetar";
/// How long a described partition count is trusted before Produce, Fetch or ListOffsets
/// describe the topic again.
const CACHE_TTL_MS: u64 = 5_000;
/// Most topics remembered per connection (names come from the client).
const CACHE_MAX: usize = 4_096;

/// Whether `name` is a Kafka topic name (Kafka's `Topic.validate`: 1 to 249 of
/// `[a-zA-Z0-9._-]`, not `.` or `..`) that also names nothing of the backend's own: no
/// `__` prefix (the host's topics) and no `-partition-` (a partition's name).
pub fn valid_name(name: &str) -> bool {
    (1..=249).contains(&name.len())
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
        && !name.starts_with("__")
        && !name.contains("-partition-")
}

/// The backend topic of Kafka partition `p` of a topic with `partitions` partitions (0:
/// non-partitioned), if there is such a partition.
pub fn partition_topic(name: &str, partitions: u32, p: i32) -> Option<String> {
    let p = u32::try_from(p).ok()?;
    if partitions == 0 {
        (p == 0).then(|| name.to_string())
    } else {
        (p < partitions).then(|| format!("{name}-partition-{p}"))
    }
}

/// The refusal of a partition count above the configured limit.
fn too_many(count: i32, config: &crate::config::Config) -> String {
    format!(
        "{count} partitions asked for; at most {} per topic (max_partitions)",
        config.max_partitions
    )
}

/// Kafka's partition count of a topic with `partitions` backend partitions.
pub fn kafka_partitions(partitions: u32) -> i32 {
    i32::try_from(partitions.max(1)).unwrap_or(i32::MAX)
}

/// Partition counts this connection learnt, each with when.
#[derive(Debug, Default)]
pub struct TopicCache {
    known: HashMap<String, (u32, u64)>,
}

impl TopicCache {
    /// The partition count of `name`, if described in the last [`CACHE_TTL_MS`].
    pub fn get(&self, now_ms: u64, name: &str) -> Option<u32> {
        self.known
            .get(name)
            .filter(|(_, at)| now_ms.saturating_sub(*at) < CACHE_TTL_MS)
            .map(|(p, _)| *p)
    }

    /// Remembers the topics of a `topics` result.
    pub fn update(&mut self, now_ms: u64, result: &Result<Vec<TopicInfo>, OpError>) {
        let Ok(infos) = result else {
            return;
        };
        if self.known.len() + infos.len() > CACHE_MAX {
            self.known.clear();
        }
        for t in infos {
            self.known.insert(t.name.clone(), (t.partitions, now_ms));
        }
    }

    pub fn forget(&mut self, name: &str) {
        self.known.remove(name);
    }

    /// Those of `names` (valid ones) not known now, without repeats.
    pub fn missing<'a>(
        &self,
        now_ms: u64,
        names: impl IntoIterator<Item = &'a str>,
    ) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for n in names {
            if valid_name(n) && self.get(now_ms, n).is_none() && !out.iter().any(|o| o == n) {
                out.push(n.to_string());
            }
        }
        out
    }
}

/// A Metadata request being served.
pub struct MetadataJob {
    /// `None`: every topic.
    names: Option<Vec<String>>,
    auto_create: bool,
    stage: MetadataStage,
    /// Topics found, with their backend partition counts.
    found: Vec<(String, u32)>,
    /// Topics being created, by position in `names`.
    creating: usize,
    errors: HashMap<String, i16>,
}

enum MetadataStage {
    Start,
    Describing,
    Creating,
}

impl KafkaConnection {
    /// Starts a `topics.describe` of `names` for the current request.
    pub(super) fn describe(&mut self, names: Vec<String>) {
        let token = self.ops.start(Op::Describe);
        self.out.push(Action::DescribeTopics { token, names });
    }

    /// Whether a job's topics are all known (described recently); if not, asks the host to
    /// describe the missing ones, and the job goes on at `JobEvent::Described`.
    pub(super) fn described<'a>(&mut self, topics: impl IntoIterator<Item = &'a str>) -> bool {
        let missing = self.topics.missing(self.now_ms, topics);
        if missing.is_empty() {
            return true;
        }
        self.describe(missing);
        false
    }

    pub(super) fn start_metadata(&mut self, version: i16, r: MetadataRequest) -> Job {
        let names = r.topics.and_then(|ts| {
            // v0: an empty list is every topic.
            if version == 0 && ts.is_empty() {
                return None;
            }
            Some(
                ts.into_iter()
                    .filter_map(|t| t.name.map(|n| n.0.to_string()))
                    .collect(),
            )
        });
        // v0-v3 always allowed auto-creation (KIP-204 made it a field in v4).
        let allowed = version < 4 || r.allow_auto_topic_creation;
        Job::Metadata(MetadataJob {
            names,
            auto_create: allowed && self.config.auto_create_topics,
            stage: MetadataStage::Start,
            found: Vec::new(),
            creating: 0,
            errors: HashMap::new(),
        })
    }

    pub(super) fn step_metadata(
        &mut self,
        header: &RequestHeader,
        j: &mut MetadataJob,
        inbox: Vec<JobEvent>,
    ) -> Result<bool, String> {
        for e in inbox {
            match e {
                JobEvent::Described(result) => {
                    match result {
                        Ok(infos) => {
                            j.found = infos.into_iter().map(|t| (t.name, t.partitions)).collect()
                        }
                        Err(e) => {
                            for n in j.names.iter().flatten() {
                                j.errors.insert(n.clone(), op_error_code(&e));
                            }
                        }
                    }
                    j.stage = MetadataStage::Creating;
                    let absent: Vec<(usize, String)> = j
                        .names
                        .iter()
                        .flatten()
                        .enumerate()
                        .filter(|(_, n)| {
                            !j.found.iter().any(|(f, _)| f == *n) && !j.errors.contains_key(*n)
                        })
                        .map(|(i, n)| (i, n.clone()))
                        .collect();
                    for (i, name) in absent {
                        if !valid_name(&name) {
                            j.errors.insert(name, error::INVALID_TOPIC_EXCEPTION);
                        } else if j.auto_create {
                            let token = self.ops.start(Op::Create(i));
                            let partitions = self.config.default_partitions;
                            self.out.push(Action::CreateTopic {
                                token,
                                topic: name,
                                partitions,
                            });
                            j.creating += 1;
                        } else {
                            j.errors.insert(name, error::UNKNOWN_TOPIC_OR_PARTITION);
                        }
                    }
                }
                JobEvent::Admin(i, result) => {
                    j.creating = j.creating.saturating_sub(1);
                    let Some(name) = j.names.as_ref().and_then(|n| n.get(i)).cloned() else {
                        continue;
                    };
                    match result {
                        Ok(()) => {
                            let p = self
                                .topics
                                .get(self.now_ms, &name)
                                .unwrap_or(self.config.default_partitions);
                            j.found.push((name, p));
                        }
                        // Created meanwhile by someone else: the client asks again.
                        Err(e) if e.kind == ErrorKind::InvalidName => {
                            j.errors.insert(name, error::LEADER_NOT_AVAILABLE);
                        }
                        Err(e) => {
                            j.errors.insert(name, op_error_code(&e));
                        }
                    }
                }
                _ => {}
            }
        }
        match j.stage {
            MetadataStage::Start => {
                if j.names.as_ref().is_some_and(|n| n.is_empty()) {
                    j.stage = MetadataStage::Creating;
                } else {
                    let names = j
                        .names
                        .iter()
                        .flatten()
                        .filter(|n| valid_name(n))
                        .cloned()
                        .collect::<Vec<_>>();
                    // Only invalid names: nothing to ask.
                    if j.names.is_none() || !names.is_empty() {
                        j.stage = MetadataStage::Describing;
                        self.describe(names);
                        return Ok(false);
                    }
                    j.stage = MetadataStage::Creating;
                    for n in j.names.iter().flatten() {
                        j.errors.insert(n.clone(), error::INVALID_TOPIC_EXCEPTION);
                    }
                }
            }
            MetadataStage::Describing => return Ok(false),
            MetadataStage::Creating if j.creating > 0 => return Ok(false),
            MetadataStage::Creating => {}
        }
        let order: Vec<String> = match &j.names {
            Some(names) => names.clone(),
            None => j.found.iter().map(|(n, _)| n.clone()).collect(),
        };
        // Every gateway known to hold group shards is a broker; this one leads what it
        // serves (any gateway serves any partition: docs/kafka.md 2.1).
        let brokers = self.directory.brokers();
        let me = brokers
            .iter()
            .find(|b| b.local)
            .map_or(NODE_ID, |b| b.node_id);
        let mut topics = Vec::new();
        for name in order {
            let topic = MetadataResponseTopic::default()
                .with_name(Some(TopicName(StrBytes::from_string(name.clone()))));
            let topic = match j.found.iter().find(|(n, _)| *n == name) {
                Some(&(_, p)) => topic.with_partitions(
                    (0..kafka_partitions(p))
                        .map(|i| {
                            MetadataResponsePartition::default()
                                .with_partition_index(i)
                                .with_leader_id(BrokerId(me))
                                .with_leader_epoch(0)
                                .with_replica_nodes(vec![BrokerId(me)])
                                .with_isr_nodes(vec![BrokerId(me)])
                        })
                        .collect(),
                ),
                None => topic.with_error_code(
                    j.errors
                        .get(&name)
                        .copied()
                        .unwrap_or(error::UNKNOWN_TOPIC_OR_PARTITION),
                ),
            };
            topics.push(topic);
        }
        let body = MetadataResponse::default()
            .with_brokers(
                brokers
                    .into_iter()
                    .map(|b| {
                        MetadataResponseBroker::default()
                            .with_node_id(BrokerId(b.node_id))
                            .with_host(StrBytes::from_string(b.host))
                            .with_port(b.port)
                    })
                    .collect(),
            )
            .with_cluster_id(Some(StrBytes::from_static_str(CLUSTER_ID)))
            .with_controller_id(BrokerId(me))
            .with_topics(topics);
        self.respond(header, &body)?;
        Ok(true)
    }
}

/// A topic's outcome in an admin request: error code and message, once known.
type Verdict = Option<(i16, Option<String>)>;

/// A CreateTopics request being served.
pub struct CreateTopicsJob {
    /// Per topic: name, Kafka partition count, and the result once known.
    topics: Vec<(String, i32, Verdict)>,
    started: bool,
}

impl KafkaConnection {
    pub(super) fn start_create_topics(&mut self, _version: i16, r: CreateTopicsRequest) -> Job {
        let default = i32::try_from(self.config.default_partitions).unwrap_or(1);
        let topics = r
            .topics
            .into_iter()
            .map(|t| {
                let name = t.name.0.to_string();
                let count = if t.num_partitions == -1 {
                    default
                } else {
                    t.num_partitions
                };
                let verdict = if !valid_name(&name) {
                    Some((error::INVALID_TOPIC_EXCEPTION, None))
                } else if count < 1 {
                    Some((
                        error::INVALID_PARTITIONS,
                        Some("the number of partitions must be at least 1".to_string()),
                    ))
                } else if i64::from(count) > i64::from(self.config.max_partitions) {
                    Some((
                        error::INVALID_PARTITIONS,
                        Some(too_many(count, &self.config)),
                    ))
                } else if !t.assignments.is_empty() {
                    Some((
                        error::INVALID_REQUEST,
                        Some("replica assignments are not supported".to_string()),
                    ))
                } else if t.replication_factor != -1 && t.replication_factor < 1 {
                    Some((error::INVALID_REPLICATION_FACTOR, None))
                } else if r.validate_only {
                    Some((error::NONE, None))
                } else {
                    None
                };
                (name, count, verdict)
            })
            .collect();
        Job::CreateTopics(CreateTopicsJob {
            topics,
            started: false,
        })
    }

    pub(super) fn step_create_topics(
        &mut self,
        header: &RequestHeader,
        j: &mut CreateTopicsJob,
        inbox: Vec<JobEvent>,
    ) -> Result<bool, String> {
        for e in inbox {
            if let JobEvent::Admin(i, result) = e {
                if let Some(t) = j.topics.get_mut(i) {
                    t.2 = Some(match result {
                        Ok(()) => (error::NONE, None),
                        Err(e) if e.kind == ErrorKind::InvalidName => {
                            (error::TOPIC_ALREADY_EXISTS, Some(e.message))
                        }
                        Err(e) => (op_error_code(&e), Some(e.message)),
                    });
                }
            }
        }
        if !j.started {
            j.started = true;
            for (i, (name, count, verdict)) in j.topics.iter().enumerate() {
                if verdict.is_none() {
                    let token = self.ops.start(Op::Create(i));
                    self.topics.forget(name);
                    self.out.push(Action::CreateTopic {
                        token,
                        topic: name.clone(),
                        partitions: u32::try_from(*count).unwrap_or(1),
                    });
                }
            }
        }
        if j.topics.iter().any(|t| t.2.is_none()) {
            return Ok(false);
        }
        let topics = j
            .topics
            .iter()
            .map(|(name, count, verdict)| {
                let (code, message) = verdict.clone().unwrap_or((error::NONE, None));
                let r = CreatableTopicResult::default()
                    .with_name(TopicName(StrBytes::from_string(name.clone())))
                    .with_error_code(code)
                    .with_error_message(message.map(StrBytes::from_string));
                if code == error::NONE {
                    r.with_num_partitions(*count)
                        .with_replication_factor(1)
                        .with_configs(Some(Vec::new()))
                } else {
                    r.with_num_partitions(-1).with_replication_factor(-1)
                }
            })
            .collect();
        self.respond(header, &CreateTopicsResponse::default().with_topics(topics))?;
        Ok(true)
    }
}

/// A DeleteTopics request being served.
pub struct DeleteTopicsJob {
    topics: Vec<(String, Option<i16>)>,
    started: bool,
}

impl KafkaConnection {
    pub(super) fn start_delete_topics(&mut self, version: i16, r: DeleteTopicsRequest) -> Job {
        // v0-v5 name topics in `topic_names`, v6 in `topics` (by name or id).
        let names: Vec<String> = if version >= 6 {
            r.topics
                .into_iter()
                .map(|t| t.name.map(|n| n.0.to_string()).unwrap_or_default())
                .collect()
        } else {
            r.topic_names.into_iter().map(|n| n.0.to_string()).collect()
        };
        let topics = names
            .into_iter()
            .map(|n| {
                let verdict = (!valid_name(&n)).then_some(error::UNKNOWN_TOPIC_OR_PARTITION);
                (n, verdict)
            })
            .collect();
        Job::DeleteTopics(DeleteTopicsJob {
            topics,
            started: false,
        })
    }

    pub(super) fn step_delete_topics(
        &mut self,
        header: &RequestHeader,
        j: &mut DeleteTopicsJob,
        inbox: Vec<JobEvent>,
    ) -> Result<bool, String> {
        for e in inbox {
            if let JobEvent::Admin(i, result) = e {
                if let Some(t) = j.topics.get_mut(i) {
                    t.1 = Some(result.map_or_else(|e| op_error_code(&e), |()| error::NONE));
                }
            }
        }
        if !j.started {
            j.started = true;
            for (i, (name, verdict)) in j.topics.iter().enumerate() {
                if verdict.is_none() {
                    let token = self.ops.start(Op::Delete(i));
                    self.topics.forget(name);
                    self.readers.forget_topic(name, &mut self.out);
                    self.out.push(Action::DeleteTopic {
                        token,
                        topic: name.clone(),
                    });
                }
            }
        }
        if j.topics.iter().any(|t| t.1.is_none()) {
            return Ok(false);
        }
        let responses = j
            .topics
            .iter()
            .map(|(name, code)| {
                DeletableTopicResult::default()
                    .with_name(Some(TopicName(StrBytes::from_string(name.clone()))))
                    .with_error_code(code.unwrap_or(error::NONE))
            })
            .collect();
        self.respond(
            header,
            &DeleteTopicsResponse::default().with_responses(responses),
        )?;
        Ok(true)
    }
}

/// A CreatePartitions request being served: describe the topics (a count may only grow),
/// then raise each.
pub struct CreatePartitionsJob {
    topics: Vec<(String, i32, Verdict)>,
    validate_only: bool,
    stage: u8,
}

impl KafkaConnection {
    pub(super) fn start_create_partitions(
        &mut self,
        _version: i16,
        r: CreatePartitionsRequest,
    ) -> Job {
        let topics = r
            .topics
            .into_iter()
            .map(|t| {
                let name = t.name.0.to_string();
                let verdict = if !valid_name(&name) {
                    Some((error::UNKNOWN_TOPIC_OR_PARTITION, None))
                } else if t.assignments.as_ref().is_some_and(|a| !a.is_empty()) {
                    Some((
                        error::INVALID_REQUEST,
                        Some("replica assignments are not supported".to_string()),
                    ))
                } else {
                    None
                };
                (name, t.count, verdict)
            })
            .collect();
        Job::CreatePartitions(CreatePartitionsJob {
            topics,
            validate_only: r.validate_only,
            stage: 0,
        })
    }

    pub(super) fn step_create_partitions(
        &mut self,
        header: &RequestHeader,
        j: &mut CreatePartitionsJob,
        inbox: Vec<JobEvent>,
    ) -> Result<bool, String> {
        for e in inbox {
            match e {
                JobEvent::Described(result) => {
                    j.stage = 2;
                    for (i, (name, count, verdict)) in j.topics.iter_mut().enumerate() {
                        if verdict.is_some() {
                            continue;
                        }
                        let now = match &result {
                            Err(e) => {
                                *verdict = Some((op_error_code(e), Some(e.message.clone())));
                                continue;
                            }
                            Ok(infos) => {
                                infos.iter().find(|t| t.name == *name).map(|t| t.partitions)
                            }
                        };
                        let refuse = |m: String| Some((error::INVALID_PARTITIONS, Some(m)));
                        *verdict = match now {
                            None => Some((error::UNKNOWN_TOPIC_OR_PARTITION, None)),
                            Some(0) => refuse(format!("{name} is not partitioned")),
                            Some(p) if i64::from(*count) <= i64::from(p) => {
                                refuse(format!("{name} has {p} partitions already"))
                            }
                            Some(_)
                                if i64::from(*count) > i64::from(self.config.max_partitions) =>
                            {
                                refuse(too_many(*count, &self.config))
                            }
                            Some(_) if j.validate_only => Some((error::NONE, None)),
                            Some(_) => {
                                let token = self.ops.start(Op::SetPartitions(i));
                                self.out.push(Action::SetPartitions {
                                    token,
                                    topic: name.clone(),
                                    partitions: u32::try_from(*count).unwrap_or(0),
                                });
                                None
                            }
                        };
                    }
                }
                JobEvent::Admin(i, result) => {
                    if let Some(t) = j.topics.get_mut(i) {
                        self.topics.forget(&t.0);
                        t.2 = Some(match result {
                            Ok(()) => (error::NONE, None),
                            Err(e) => (op_error_code(&e), Some(e.message)),
                        });
                    }
                }
                _ => {}
            }
        }
        if j.stage == 0 {
            j.stage = 1;
            let names: Vec<String> = j
                .topics
                .iter()
                .filter(|t| t.2.is_none())
                .map(|t| t.0.clone())
                .collect();
            if !names.is_empty() {
                self.describe(names);
                return Ok(false);
            }
        }
        if j.stage == 1 && j.topics.iter().any(|t| t.2.is_none()) {
            return Ok(false);
        }
        if j.topics.iter().any(|t| t.2.is_none()) {
            return Ok(false);
        }
        let results = j
            .topics
            .iter()
            .map(|(name, _, verdict)| {
                let (code, message) = verdict.clone().unwrap_or((error::NONE, None));
                CreatePartitionsTopicResult::default()
                    .with_name(TopicName(StrBytes::from_string(name.clone())))
                    .with_error_code(code)
                    .with_error_message(message.map(StrBytes::from_string))
            })
            .collect();
        self.respond(
            header,
            &CreatePartitionsResponse::default().with_results(results),
        )?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_partitions() {
        assert!(valid_name("orders.v1_x-2"));
        for bad in [
            "",
            ".",
            "..",
            "a b",
            "a/b",
            "__consumer_offsets",
            "t-partition-0",
        ] {
            assert!(!valid_name(bad), "{bad}");
        }
        assert!(!valid_name(&"x".repeat(250)));
        assert_eq!(partition_topic("t", 0, 0).as_deref(), Some("t"));
        assert_eq!(partition_topic("t", 0, 1), None);
        assert_eq!(partition_topic("t", 3, 2).as_deref(), Some("t-partition-2"));
        assert_eq!(partition_topic("t", 3, 3), None);
        assert_eq!(partition_topic("t", 3, -1), None);
        assert_eq!(kafka_partitions(0), 1);
    }
}
