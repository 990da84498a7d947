//! The request and response versions of the 0.10 era that Kafka 4.0 removed (KIP-896) and
//! `kafka-protocol` 0.18 no longer has: Produce v0-2, Fetch v0-3, ListOffsets v0,
//! OffsetCommit v0-1, OffsetFetch v0, CreateTopics v0-1, DeleteTopics v0, DescribeConfigs v0
//! (Kafka protocol guide, each API's "Requests" and "Responses" grammar).
//!
//! Converted at the edge: a request is decoded into `kafka-protocol` 0.18's request type (the
//! one the connection serves for every version), and the response, built as 0.18's type, is
//! written in the old version's layout. Where an old version's bytes are those of a newer one
//! (OffsetFetch v0 is v1, OffsetCommit v0-1's response is v2's, DeleteTopics v0's request is
//! v1's, CreateTopics v1's request is v2's), 0.18's own codec does it at that version. By
//! hand, not with `kafka-protocol` 0.15.1 under another name as docs/kafka.md section 5.1
//! first planned: these few structs cost far less Wasm than a second copy of the generated
//! code (the plugin was already 1.27 MB), and 0.15.1 reserves arrays as long as the client
//! claims (the OOM `third_party/kafka-protocol` patches out of 0.18).
//!
//! Bounds: every array's element count is checked against the bytes left before anything is
//! reserved; trailing bytes after a request are an error, as Kafka's parser has them.
//! What the old versions meant differently is served as the new ones do: OffsetCommit and
//! OffsetFetch v0 (ZooKeeper-stored in Kafka) use the group's stored offsets; ListOffsets
//! v0 answers at most one offset (Kafka's segment list for `max_num_offsets` > 1 has no
//! equivalent here); DescribeConfigs v0's `is_default` is `config_source` = default.

use std::any::Any;

use bytes::{BufMut, Bytes};
use kafka_protocol::messages::create_topics_request::{
    CreatableReplicaAssignment, CreatableTopic, CreatableTopicConfig,
};
use kafka_protocol::messages::describe_configs_request::DescribeConfigsResource;
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::offset_commit_request::{
    OffsetCommitRequestPartition, OffsetCommitRequestTopic,
};
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{
    ApiKey, BrokerId, CreateTopicsRequest, CreateTopicsResponse, DeleteTopicsRequest,
    DeleteTopicsResponse, DescribeConfigsRequest, DescribeConfigsResponse, FetchRequest,
    FetchResponse, GroupId, ListOffsetsRequest, ListOffsetsResponse, OffsetCommitRequest,
    OffsetCommitResponse, OffsetFetchRequest, OffsetFetchResponse, ProduceRequest, ProduceResponse,
    RequestHeader, TopicName,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};

/// Why an old version's request or response could not be handled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LegacyError {
    /// The request does not follow its version's grammar; the connection closes.
    #[error("malformed {api:?} v{version} request: {reason}")]
    Malformed {
        api: ApiKey,
        version: i16,
        reason: String,
    },
    /// The response could not be written (a bug of ours, never the client's input).
    #[error("encoding {api:?} v{version} response: {reason}")]
    Encode {
        api: ApiKey,
        version: i16,
        reason: String,
    },
}

/// The oldest version of each API that `kafka-protocol` 0.18 decodes (its `VERSIONS`): below
/// it, this module serves.
pub fn first_modern(api: ApiKey) -> i16 {
    match api {
        ApiKey::Produce => 3,
        ApiKey::Fetch => 4,
        ApiKey::ListOffsets => 1,
        ApiKey::OffsetCommit => 2,
        ApiKey::OffsetFetch => 1,
        ApiKey::CreateTopics => 2,
        ApiKey::DeleteTopics => 1,
        ApiKey::DescribeConfigs => 1,
        _ => 0,
    }
}

/// A request of an old version: its header and the 0.18 request it stands for.
pub type Decoded<R> = Result<(RequestHeader, R), LegacyError>;

/// Reads the fixed grammar of an old request; errors are plain text until
/// [`LegacyError::Malformed`] names the API.
struct Reader {
    buf: Bytes,
}

type Read<T> = Result<T, String>;

impl Reader {
    fn take(&mut self, n: usize, what: &str) -> Read<Bytes> {
        if self.buf.len() < n {
            return Err(format!("truncated {what}"));
        }
        Ok(self.buf.split_to(n))
    }

    fn fixed<const N: usize>(&mut self, what: &str) -> Read<[u8; N]> {
        let b = self.take(N, what)?;
        let mut a = [0; N];
        a.copy_from_slice(&b);
        Ok(a)
    }

    fn i8(&mut self, what: &str) -> Read<i8> {
        Ok(i8::from_be_bytes(self.fixed(what)?))
    }

    fn i16(&mut self, what: &str) -> Read<i16> {
        Ok(i16::from_be_bytes(self.fixed(what)?))
    }

    fn i32(&mut self, what: &str) -> Read<i32> {
        Ok(i32::from_be_bytes(self.fixed(what)?))
    }

    fn i64(&mut self, what: &str) -> Read<i64> {
        Ok(i64::from_be_bytes(self.fixed(what)?))
    }

    fn nullable_string(&mut self, what: &str) -> Read<Option<StrBytes>> {
        let len = self.i16(what)?;
        if len == -1 {
            return Ok(None);
        }
        let len = usize::try_from(len).map_err(|_| format!("{what} of length {len}"))?;
        let b = self.take(len, what)?;
        StrBytes::try_from(b)
            .map(Some)
            .map_err(|_| format!("{what} is not UTF-8"))
    }

    fn string(&mut self, what: &str) -> Read<StrBytes> {
        self.nullable_string(what)?
            .ok_or_else(|| format!("null {what}"))
    }

    fn nullable_bytes(&mut self, what: &str) -> Read<Option<Bytes>> {
        let len = self.i32(what)?;
        if len == -1 {
            return Ok(None);
        }
        let len = usize::try_from(len).map_err(|_| format!("{what} of length {len}"))?;
        self.take(len, what).map(Some)
    }

    /// An array (`int32` count, -1 null) of elements at least `min` bytes each: a count the
    /// bytes left cannot hold is refused before anything is reserved.
    fn nullable_array<T>(
        &mut self,
        what: &str,
        min: usize,
        mut element: impl FnMut(&mut Self) -> Read<T>,
    ) -> Read<Option<Vec<T>>> {
        let count = self.i32(what)?;
        if count == -1 {
            return Ok(None);
        }
        let count = usize::try_from(count).map_err(|_| format!("{what} of {count} elements"))?;
        if count.saturating_mul(min.max(1)) > self.buf.len() {
            return Err(format!(
                "{what} of {count} elements in {} bytes",
                self.buf.len()
            ));
        }
        let mut out = Vec::with_capacity(count);
        for _ in 0..count {
            out.push(element(self)?);
        }
        Ok(Some(out))
    }

    fn array<T>(
        &mut self,
        what: &str,
        min: usize,
        element: impl FnMut(&mut Self) -> Read<T>,
    ) -> Read<Vec<T>> {
        self.nullable_array(what, min, element)?
            .ok_or_else(|| format!("null {what}"))
    }

    fn end(&self) -> Read<()> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(format!("{} bytes after the request", self.buf.len()))
        }
    }
}

/// Decodes the header (v1: every old version has it) and the body with `body`.
fn decode_with<R>(
    bytes: &Bytes,
    api: ApiKey,
    version: i16,
    body: impl FnOnce(&mut Reader) -> Read<R>,
) -> Decoded<R> {
    let malformed = |reason: String| LegacyError::Malformed {
        api,
        version,
        reason,
    };
    let mut buf = bytes.clone();
    let header = RequestHeader::decode(&mut buf, 1)
        .map_err(|e| malformed(format!("request header: {e}")))?;
    let mut r = Reader { buf };
    let request = body(&mut r).map_err(malformed)?;
    r.end().map_err(malformed)?;
    Ok((header, request))
}

/// Decodes with `kafka-protocol` 0.18 at `as_version`, whose bytes are the old version's.
fn decode_as<R: Decodable>(
    bytes: &Bytes,
    api: ApiKey,
    version: i16,
    as_version: i16,
) -> Decoded<R> {
    decode_with(bytes, api, version, |r| {
        let request = R::decode(&mut r.buf, as_version).map_err(|e| e.to_string())?;
        Ok(request)
    })
}

fn topic_name(s: StrBytes) -> TopicName {
    TopicName(s)
}

/// Produce v0-2: `acks, timeout_ms, [topic [partition records]]` (v3 adds
/// `transactional_id` first).
pub fn produce_request(bytes: &Bytes, version: i16) -> Option<Decoded<ProduceRequest>> {
    (version < first_modern(ApiKey::Produce)).then(|| {
        decode_with(bytes, ApiKey::Produce, version, |r| {
            let acks = r.i16("acks")?;
            let timeout_ms = r.i32("timeout_ms")?;
            let topics = r.array("topics", 6, |r| {
                let name = r.string("topic name")?;
                let partitions = r.array("partitions", 8, |r| {
                    Ok(PartitionProduceData::default()
                        .with_index(r.i32("partition")?)
                        .with_records(r.nullable_bytes("records")?))
                })?;
                Ok(TopicProduceData::default()
                    .with_name(topic_name(name))
                    .with_partition_data(partitions))
            })?;
            Ok(ProduceRequest::default()
                .with_acks(acks)
                .with_timeout_ms(timeout_ms)
                .with_topic_data(topics))
        })
    })
}

/// Fetch v0-3: `replica_id, max_wait_ms, min_bytes, [max_bytes v3], [topic [partition
/// fetch_offset partition_max_bytes]]`. v0-2 have no response limit (Kafka's is
/// `Int.MaxValue` for them) and read uncommitted.
pub fn fetch_request(bytes: &Bytes, version: i16) -> Option<Decoded<FetchRequest>> {
    (version < first_modern(ApiKey::Fetch)).then(|| {
        decode_with(bytes, ApiKey::Fetch, version, |r| {
            let replica_id = r.i32("replica_id")?;
            let max_wait_ms = r.i32("max_wait_ms")?;
            let min_bytes = r.i32("min_bytes")?;
            let max_bytes = if version >= 3 {
                r.i32("max_bytes")?
            } else {
                i32::MAX
            };
            let topics = r.array("topics", 6, |r| {
                let name = r.string("topic name")?;
                let partitions = r.array("partitions", 16, |r| {
                    Ok(FetchPartition::default()
                        .with_partition(r.i32("partition")?)
                        .with_fetch_offset(r.i64("fetch_offset")?)
                        .with_partition_max_bytes(r.i32("partition_max_bytes")?))
                })?;
                Ok(FetchTopic::default()
                    .with_topic(topic_name(name))
                    .with_partitions(partitions))
            })?;
            Ok(FetchRequest::default()
                .with_replica_id(BrokerId(replica_id))
                .with_max_wait_ms(max_wait_ms)
                .with_min_bytes(min_bytes)
                .with_max_bytes(max_bytes)
                .with_topics(topics))
        })
    })
}

/// ListOffsets v0: `replica_id, [topic [partition timestamp max_num_offsets]]`; the
/// timestamp is -1 (latest), -2 (earliest) or a time, as in v1.
pub fn list_offsets_request(bytes: &Bytes, version: i16) -> Option<Decoded<ListOffsetsRequest>> {
    (version < first_modern(ApiKey::ListOffsets)).then(|| {
        decode_with(bytes, ApiKey::ListOffsets, version, |r| {
            let replica_id = r.i32("replica_id")?;
            let topics = r.array("topics", 6, |r| {
                let name = r.string("topic name")?;
                let partitions = r.array("partitions", 16, |r| {
                    let p = ListOffsetsPartition::default()
                        .with_partition_index(r.i32("partition")?)
                        .with_timestamp(r.i64("timestamp")?);
                    r.i32("max_num_offsets")?;
                    Ok(p)
                })?;
                Ok(ListOffsetsTopic::default()
                    .with_name(topic_name(name))
                    .with_partitions(partitions))
            })?;
            Ok(ListOffsetsRequest::default()
                .with_replica_id(BrokerId(replica_id))
                .with_topics(topics))
        })
    })
}

/// OffsetCommit v0: `group_id, [topic [partition offset metadata]]`; v1: `group_id,
/// generation_id, member_id, [topic [partition offset timestamp metadata]]` (the per-offset
/// timestamp was a retention hint; retention here is the group's). v0 commits outside group
/// management, as v2+ does with generation -1.
pub fn offset_commit_request(bytes: &Bytes, version: i16) -> Option<Decoded<OffsetCommitRequest>> {
    (version < first_modern(ApiKey::OffsetCommit)).then(|| {
        decode_with(bytes, ApiKey::OffsetCommit, version, |r| {
            let group_id = r.string("group_id")?;
            let (generation, member_id) = if version >= 1 {
                (r.i32("generation_id")?, r.string("member_id")?)
            } else {
                (-1, StrBytes::default())
            };
            let topics = r.array("topics", 6, |r| {
                let name = r.string("topic name")?;
                let min = if version >= 1 { 22 } else { 14 };
                let partitions = r.array("partitions", min, |r| {
                    let partition = r.i32("partition")?;
                    let offset = r.i64("offset")?;
                    if version >= 1 {
                        r.i64("timestamp")?;
                    }
                    Ok(OffsetCommitRequestPartition::default()
                        .with_partition_index(partition)
                        .with_committed_offset(offset)
                        .with_committed_leader_epoch(-1)
                        .with_committed_metadata(r.nullable_string("metadata")?))
                })?;
                Ok(OffsetCommitRequestTopic::default()
                    .with_name(topic_name(name))
                    .with_partitions(partitions))
            })?;
            Ok(OffsetCommitRequest::default()
                .with_group_id(GroupId(group_id))
                .with_generation_id_or_member_epoch(generation)
                .with_member_id(member_id)
                .with_retention_time_ms(-1)
                .with_topics(topics))
        })
    })
}

/// OffsetFetch v0: the bytes of v1.
pub fn offset_fetch_request(bytes: &Bytes, version: i16) -> Option<Decoded<OffsetFetchRequest>> {
    (version < first_modern(ApiKey::OffsetFetch))
        .then(|| decode_as(bytes, ApiKey::OffsetFetch, version, 1))
}

/// CreateTopics v0: `[topic num_partitions replication_factor [assignment] [config]]
/// timeout_ms`; v1 adds `validate_only` and is v2's bytes.
pub fn create_topics_request(bytes: &Bytes, version: i16) -> Option<Decoded<CreateTopicsRequest>> {
    if version >= first_modern(ApiKey::CreateTopics) {
        return None;
    }
    if version == 1 {
        return Some(decode_as(bytes, ApiKey::CreateTopics, version, 2));
    }
    Some(decode_with(bytes, ApiKey::CreateTopics, version, |r| {
        let topics = r.array("topics", 16, |r| {
            let name = r.string("topic name")?;
            let num_partitions = r.i32("num_partitions")?;
            let replication_factor = r.i16("replication_factor")?;
            let assignments = r.array("assignments", 8, |r| {
                Ok(CreatableReplicaAssignment::default()
                    .with_partition_index(r.i32("partition")?)
                    .with_broker_ids(
                        r.array("broker_ids", 4, |r| Ok(BrokerId(r.i32("broker_id")?)))?,
                    ))
            })?;
            let configs = r.array("configs", 4, |r| {
                Ok(CreatableTopicConfig::default()
                    .with_name(r.string("config name")?)
                    .with_value(r.nullable_string("config value")?))
            })?;
            Ok(CreatableTopic::default()
                .with_name(topic_name(name))
                .with_num_partitions(num_partitions)
                .with_replication_factor(replication_factor)
                .with_assignments(assignments)
                .with_configs(configs))
        })?;
        Ok(CreateTopicsRequest::default()
            .with_topics(topics)
            .with_timeout_ms(r.i32("timeout_ms")?))
    }))
}

/// DeleteTopics v0: the bytes of v1.
pub fn delete_topics_request(bytes: &Bytes, version: i16) -> Option<Decoded<DeleteTopicsRequest>> {
    (version < first_modern(ApiKey::DeleteTopics))
        .then(|| decode_as(bytes, ApiKey::DeleteTopics, version, 1))
}

/// DescribeConfigs v0: `[resource_type resource_name [configuration_keys]]` (v1 adds
/// `include_synonyms`).
pub fn describe_configs_request(
    bytes: &Bytes,
    version: i16,
) -> Option<Decoded<DescribeConfigsRequest>> {
    (version < first_modern(ApiKey::DescribeConfigs)).then(|| {
        decode_with(bytes, ApiKey::DescribeConfigs, version, |r| {
            let resources = r.array("resources", 7, |r| {
                Ok(DescribeConfigsResource::default()
                    .with_resource_type(r.i8("resource_type")?)
                    .with_resource_name(r.string("resource_name")?)
                    .with_configuration_keys(r.nullable_array("configuration_keys", 2, |r| {
                        r.string("configuration key")
                    })?))
            })?;
            Ok(DescribeConfigsRequest::default().with_resources(resources))
        })
    })
}

/// Writes the fields of an old response.
struct Writer(Vec<u8>);

impl Writer {
    fn i8(&mut self, v: i8) {
        self.0.put_i8(v);
    }
    fn i16(&mut self, v: i16) {
        self.0.put_i16(v);
    }
    fn i32(&mut self, v: i32) {
        self.0.put_i32(v);
    }
    fn i64(&mut self, v: i64) {
        self.0.put_i64(v);
    }
    fn bool(&mut self, v: bool) {
        self.0.put_i8(i8::from(v));
    }
    fn nullable_string(&mut self, s: Option<&str>) -> Result<(), String> {
        match s {
            None => self.i16(-1),
            Some(s) => {
                let len = i16::try_from(s.len()).map_err(|_| format!("string of {}", s.len()))?;
                self.i16(len);
                self.0.extend_from_slice(s.as_bytes());
            }
        }
        Ok(())
    }
    fn string(&mut self, s: &str) -> Result<(), String> {
        self.nullable_string(Some(s))
    }
    fn count(&mut self, n: usize) -> Result<(), String> {
        self.i32(i32::try_from(n).map_err(|_| format!("array of {n}"))?);
        Ok(())
    }
    fn bytes(&mut self, b: &[u8]) -> Result<(), String> {
        self.count(b.len())?;
        self.0.extend_from_slice(b);
        Ok(())
    }
}

/// The response to an old version's request, if `header` is one and `body` its response:
/// `[int32 size][correlation_id][body]` (response header v0).
pub fn encode_response(
    header: &RequestHeader,
    body: &dyn Any,
) -> Option<Result<Vec<u8>, LegacyError>> {
    let api = ApiKey::try_from(header.request_api_key).ok()?;
    let version = header.request_api_version;
    if version >= first_modern(api) {
        return None;
    }
    let mut w = Writer(Vec::with_capacity(256));
    w.i32(0);
    w.i32(header.correlation_id);
    let written = match api {
        ApiKey::Produce => produce_response(&mut w, body.downcast_ref()?, version),
        ApiKey::Fetch => fetch_response(&mut w, body.downcast_ref()?, version),
        ApiKey::ListOffsets => list_offsets_response(&mut w, body.downcast_ref()?),
        ApiKey::OffsetCommit => as_version::<OffsetCommitResponse>(&mut w, body, 2)?,
        ApiKey::OffsetFetch => as_version::<OffsetFetchResponse>(&mut w, body, 1)?,
        ApiKey::CreateTopics => create_topics_response(&mut w, body.downcast_ref()?, version),
        ApiKey::DeleteTopics => delete_topics_response(&mut w, body.downcast_ref()?),
        ApiKey::DescribeConfigs => describe_configs_response(&mut w, body.downcast_ref()?),
        _ => return None,
    };
    Some(
        written
            .and_then(|()| {
                let size = i32::try_from(w.0.len() - 4)
                    .map_err(|_| format!("response of {} bytes", w.0.len()))?;
                w.0[..4].copy_from_slice(&size.to_be_bytes());
                Ok(w.0)
            })
            .map_err(|reason| LegacyError::Encode {
                api,
                version,
                reason,
            }),
    )
}

/// A response whose old bytes are those of 0.18's `version`.
fn as_version<B: Encodable + 'static>(
    w: &mut Writer,
    body: &dyn Any,
    version: i16,
) -> Option<Result<(), String>> {
    let body: &B = body.downcast_ref()?;
    Some(body.encode(&mut w.0, version).map_err(|e| e.to_string()))
}

/// Produce v0: `[topic [partition error_code base_offset]]`; v1 adds `throttle_time_ms` at
/// the end, v2 `log_append_time_ms` per partition.
fn produce_response(w: &mut Writer, r: &ProduceResponse, version: i16) -> Result<(), String> {
    w.count(r.responses.len())?;
    for t in &r.responses {
        w.string(&t.name)?;
        w.count(t.partition_responses.len())?;
        for p in &t.partition_responses {
            w.i32(p.index);
            w.i16(p.error_code);
            w.i64(p.base_offset);
            if version >= 2 {
                w.i64(p.log_append_time_ms);
            }
        }
    }
    if version >= 1 {
        w.i32(r.throttle_time_ms);
    }
    Ok(())
}

/// Fetch v0: `[topic [partition error_code high_watermark records]]`; v1+ start with
/// `throttle_time_ms`. The records are message sets already (fetch.rs down-converts them).
fn fetch_response(w: &mut Writer, r: &FetchResponse, version: i16) -> Result<(), String> {
    if version >= 1 {
        w.i32(r.throttle_time_ms);
    }
    w.count(r.responses.len())?;
    for t in &r.responses {
        w.string(&t.topic)?;
        w.count(t.partitions.len())?;
        for p in &t.partitions {
            w.i32(p.partition_index);
            w.i16(p.error_code);
            w.i64(p.high_watermark);
            w.bytes(p.records.as_deref().unwrap_or_default())?;
        }
    }
    Ok(())
}

/// ListOffsets v0: `[topic [partition error_code [offset]]]`: the one offset found, none on
/// an error or when there is none (-1).
fn list_offsets_response(w: &mut Writer, r: &ListOffsetsResponse) -> Result<(), String> {
    w.count(r.topics.len())?;
    for t in &r.topics {
        w.string(&t.name)?;
        w.count(t.partitions.len())?;
        for p in &t.partitions {
            w.i32(p.partition_index);
            w.i16(p.error_code);
            if p.error_code == 0 && p.offset >= 0 {
                w.count(1)?;
                w.i64(p.offset);
            } else {
                w.count(0)?;
            }
        }
    }
    Ok(())
}

/// CreateTopics v0: `[name error_code]`; v1 adds `error_message`.
fn create_topics_response(
    w: &mut Writer,
    r: &CreateTopicsResponse,
    version: i16,
) -> Result<(), String> {
    w.count(r.topics.len())?;
    for t in &r.topics {
        w.string(&t.name)?;
        w.i16(t.error_code);
        if version >= 1 {
            w.nullable_string(t.error_message.as_deref())?;
        }
    }
    Ok(())
}

/// DeleteTopics v0: `[name error_code]`.
fn delete_topics_response(w: &mut Writer, r: &DeleteTopicsResponse) -> Result<(), String> {
    w.count(r.responses.len())?;
    for t in &r.responses {
        w.string(t.name.as_ref().map_or("", |n| n.as_str()))?;
        w.i16(t.error_code);
    }
    Ok(())
}

/// Kafka's `ConfigSource.DEFAULT_CONFIG`.
const DEFAULT_CONFIG: i8 = 5;

/// DescribeConfigs v0: `throttle_time_ms, [error_code error_message resource_type
/// resource_name [name value read_only is_default is_sensitive]]`.
fn describe_configs_response(w: &mut Writer, r: &DescribeConfigsResponse) -> Result<(), String> {
    w.i32(r.throttle_time_ms);
    w.count(r.results.len())?;
    for res in &r.results {
        w.i16(res.error_code);
        w.nullable_string(res.error_message.as_deref())?;
        w.i8(res.resource_type);
        w.string(&res.resource_name)?;
        w.count(res.configs.len())?;
        for c in &res.configs {
            w.string(&c.name)?;
            w.nullable_string(c.value.as_deref())?;
            w.bool(c.read_only);
            w.bool(c.config_source == DEFAULT_CONFIG);
            w.bool(c.is_sensitive);
        }
    }
    Ok(())
}
