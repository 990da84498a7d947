//! Topics, Produce, Fetch and ListOffsets against the SDK's simulated host (ABI 0.2.3
//! `indexed` and `topics`), with `kafka-protocol`'s client side encoding the requests and
//! decoding the responses, as a Kafka client would.

use bytes::{Bytes, BytesMut};
use indexmap::IndexMap;
use kafka_protocol::messages::create_partitions_request::CreatePartitionsTopic;
use kafka_protocol::messages::create_topics_request::CreatableTopic;
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, StrBytes};
use kafka_protocol::records::{
    Compression, Record as KRecord, RecordBatchDecoder, RecordBatchEncoder, RecordEncodeOptions,
    TimestampType,
};
use magnetar_sdk::testing::SimHost;
use magnetar_sdk::{Property, RecordOut};

use super::{error, KafkaConnection};
use crate::codec::compression::{self, Codec};
use crate::config::Config;
use crate::test_wire::{self, call};

fn host() -> SimHost<KafkaConnection> {
    SimHost::new(1_000, KafkaConnection::new(Config::default()))
}

fn name(s: &str) -> TopicName {
    TopicName(StrBytes::from_string(s.to_string()))
}

fn send<Q: Encodable + HeaderVersion>(
    host: &mut SimHost<KafkaConnection>,
    key: ApiKey,
    version: i16,
    correlation_id: i32,
    body: &Q,
) {
    host.data(&test_wire::request(
        key,
        version,
        correlation_id,
        "test",
        body,
    ));
}

/// The one response sent since the last call, if any.
fn receive<R: Decodable + HeaderVersion>(
    host: &mut SimHost<KafkaConnection>,
    version: i16,
    correlation_id: i32,
) -> Option<R> {
    test_wire::response(&host.take_sent(), version, correlation_id)
}

fn create(host: &mut SimHost<KafkaConnection>, topic: &str, partitions: i32) -> i16 {
    let r: CreateTopicsResponse = call(
        host,
        ApiKey::CreateTopics,
        5,
        &CreateTopicsRequest::default().with_topics(vec![CreatableTopic::default()
            .with_name(name(topic))
            .with_num_partitions(partitions)
            .with_replication_factor(1)]),
    );
    r.topics[0].error_code
}

fn krecord(i: i64) -> KRecord {
    krecord_at(i, 1_700_000_000_000 + i)
}

fn krecord_at(i: i64, timestamp: i64) -> KRecord {
    let mut headers = IndexMap::new();
    headers.insert(
        StrBytes::from_static_str("h"),
        Some(Bytes::from(format!("v{i}"))),
    );
    KRecord {
        transactional: false,
        control: false,
        delete_horizon: false,
        partition_leader_epoch: 0,
        producer_id: -1,
        producer_epoch: -1,
        timestamp_type: TimestampType::Creation,
        offset: i,
        // kafka-protocol's encoder keeps records in one batch while offset - sequence is
        // the same.
        sequence: i as i32,
        timestamp,
        key: Some(Bytes::from(format!("k{i}"))),
        value: Some(Bytes::from(format!("value {i}"))),
        headers,
    }
}

/// A producer's batch of `n` records (offsets 0..n), compressed with `codec`.
fn batch(n: i64, codec: Codec) -> Bytes {
    encode((0..n).map(krecord).collect(), codec)
}

fn encode(records: Vec<KRecord>, codec: Codec) -> Bytes {
    let compression = match codec {
        Codec::None => Compression::None,
        Codec::Gzip => Compression::Gzip,
        Codec::Snappy => Compression::Snappy,
        Codec::Lz4 => Compression::Lz4,
        Codec::Zstd => Compression::Zstd,
    };
    let mut buf = BytesMut::new();
    RecordBatchEncoder::encode_with_custom_compression(
        &mut buf,
        &records,
        &RecordEncodeOptions {
            version: 2,
            compression,
        },
        Some(|body: &mut BytesMut, out: &mut BytesMut, _| {
            out.extend_from_slice(&compression::compress(codec, body).unwrap());
            Ok(())
        }),
    )
    .unwrap();
    buf.freeze()
}

fn produce_request(topic: &str, partition: i32, records: Bytes, acks: i16) -> ProduceRequest {
    ProduceRequest::default()
        .with_acks(acks)
        .with_timeout_ms(5_000)
        .with_topic_data(vec![TopicProduceData::default()
            .with_name(name(topic))
            .with_partition_data(vec![PartitionProduceData::default()
                .with_index(partition)
                .with_records(Some(records))])])
}

/// (error code, base offset) of a one-partition Produce v8.
fn produce(host: &mut SimHost<KafkaConnection>, topic: &str, p: i32, records: Bytes) -> (i16, i64) {
    let r: ProduceResponse = call(
        host,
        ApiKey::Produce,
        8,
        &produce_request(topic, p, records, -1),
    );
    let part = &r.responses[0].partition_responses[0];
    (part.error_code, part.base_offset)
}

fn fetch_request(topic: &str, p: i32, offset: i64, max_wait_ms: i32) -> FetchRequest {
    FetchRequest::default()
        .with_max_wait_ms(max_wait_ms)
        .with_min_bytes(1)
        .with_max_bytes(1 << 20)
        .with_topics(vec![FetchTopic::default()
            .with_topic(name(topic))
            .with_partitions(vec![FetchPartition::default()
                .with_partition(p)
                .with_fetch_offset(offset)
                .with_partition_max_bytes(1 << 20)])])
}

/// The partition of a one-partition Fetch response: (error, high watermark, records as
/// (offset, key, value, headers)).
type Fetched = (i16, i64, Vec<(i64, Option<Bytes>, Option<Bytes>, usize)>);

fn fetched(r: &FetchResponse) -> Fetched {
    let part = &r.responses[0].partitions[0];
    let mut records = Vec::new();
    let mut bytes = part.records.clone().unwrap_or_default();
    while !bytes.is_empty() {
        let set = RecordBatchDecoder::decode(&mut bytes).unwrap();
        for r in set.records {
            records.push((r.offset, r.key, r.value, r.headers.len()));
        }
    }
    (part.error_code, part.high_watermark, records)
}

/// A Fetch as clients send it (waiting up to 100 ms for data).
fn fetch(host: &mut SimHost<KafkaConnection>, topic: &str, p: i32, offset: i64) -> Fetched {
    send(
        host,
        ApiKey::Fetch,
        11,
        5,
        &fetch_request(topic, p, offset, 100),
    );
    host.run();
    let r = match receive(host, 11, 5) {
        Some(r) => r,
        None => {
            host.advance(100);
            host.run();
            receive(host, 11, 5).expect("a response at max_wait")
        }
    };
    fetched(&r)
}

fn list_offsets(
    host: &mut SimHost<KafkaConnection>,
    topic: &str,
    p: i32,
    ts: i64,
) -> (i16, i64, i64) {
    let r: ListOffsetsResponse = call(
        host,
        ApiKey::ListOffsets,
        5,
        &ListOffsetsRequest::default()
            .with_replica_id(BrokerId(-1))
            .with_topics(vec![ListOffsetsTopic::default()
                .with_name(name(topic))
                .with_partitions(vec![ListOffsetsPartition::default()
                    .with_partition_index(p)
                    .with_timestamp(ts)])]),
    );
    let part = &r.topics[0].partitions[0];
    (part.error_code, part.timestamp, part.offset)
}

#[test]
fn metadata_names_this_gateway_and_auto_creates_topics() {
    let mut host = host();
    assert_eq!(create(&mut host, "orders", 3), 0);
    let r: MetadataResponse = call(
        &mut host,
        ApiKey::Metadata,
        9,
        &MetadataRequest::default()
            .with_allow_auto_topic_creation(true)
            .with_topics(Some(
                ["orders", "fresh", "bad name"]
                    .iter()
                    .map(|t| MetadataRequestTopic::default().with_name(Some(name(t))))
                    .collect(),
            )),
    );
    assert_eq!(r.brokers.len(), 1);
    assert_eq!(
        (
            r.brokers[0].node_id.0,
            r.brokers[0].host.as_str(),
            r.brokers[0].port
        ),
        (1, "127.0.0.1", 9092)
    );
    assert_eq!(r.controller_id.0, 1);
    let t = &r.topics;
    assert_eq!((t[0].error_code, t[0].partitions.len()), (0, 3));
    assert_eq!(t[0].partitions[2].leader_id.0, 1);
    assert_eq!(t[0].partitions[2].isr_nodes, vec![BrokerId(1)]);
    // Auto-created with the default partition count (Kafka's num.partitions = 1).
    assert_eq!((t[1].error_code, t[1].partitions.len()), (0, 1));
    assert_eq!(host.topics().get("fresh"), Some(&1));
    assert_eq!(t[2].error_code, error::INVALID_TOPIC_EXCEPTION);

    // Every topic (v1+: null), and no creation when the client does not allow it.
    let r: MetadataResponse = call(
        &mut host,
        ApiKey::Metadata,
        9,
        &MetadataRequest::default()
            .with_allow_auto_topic_creation(false)
            .with_topics(Some(vec![
                MetadataRequestTopic::default().with_name(Some(name("other")))
            ])),
    );
    assert_eq!(r.topics[0].error_code, error::UNKNOWN_TOPIC_OR_PARTITION);
    let r: MetadataResponse = call(
        &mut host,
        ApiKey::Metadata,
        1,
        &MetadataRequest::default().with_topics(None),
    );
    let mut names: Vec<_> = r
        .topics
        .iter()
        .map(|t| t.name.as_ref().unwrap().0.to_string())
        .collect();
    names.sort();
    assert_eq!(names, ["fresh", "orders"]);
}

#[test]
fn produced_batches_get_contiguous_offsets_and_fetch_back() {
    let mut host = host();
    assert_eq!(create(&mut host, "t", 2), 0);
    let codecs = [
        Codec::None,
        Codec::Gzip,
        Codec::Snappy,
        Codec::Lz4,
        Codec::Zstd,
    ];
    let mut base = 0;
    for (i, codec) in codecs.into_iter().enumerate() {
        let n = i as i64 + 1;
        assert_eq!(
            produce(&mut host, "t", 1, batch(n, codec)),
            (0, base),
            "{codec:?}"
        );
        base += n;
    }
    // One entry per batch, on the partition's own topic.
    let entries = host.entries("t-partition-1");
    assert_eq!(entries.len(), 5);
    assert_eq!(entries[4].0, 10);
    let m = &entries[0].1[0];
    assert_eq!(m.key.as_deref(), Some(&b"k0"[..]));
    assert_eq!(m.value.as_deref(), Some(&b"value 0"[..]));
    assert_eq!(m.event_time_ms, Some(1_700_000_000_000));
    assert_eq!(m.properties[0].key, "h");

    // As a consumer does: fetch from where the last records ended.
    let mut records = Vec::new();
    while records.len() < 15 {
        let (code, hw, got) = fetch(&mut host, "t", 1, records.len() as i64);
        assert_eq!((code, hw), (0, 15));
        assert!(!got.is_empty());
        records.extend(got);
    }
    let offsets: Vec<_> = records.iter().map(|r| r.0).collect();
    assert_eq!(offsets, (0..15).collect::<Vec<_>>());
    assert_eq!(records[1].1.as_deref(), Some(&b"k0"[..]));
    assert_eq!(records[1].3, 1, "the header came back");

    // Continuing where the reader stands, at the tail: an empty answer after max_wait.
    send(
        &mut host,
        ApiKey::Fetch,
        11,
        8,
        &fetch_request("t", 1, 15, 500),
    );
    host.run();
    assert!(
        receive::<FetchResponse>(&mut host, 11, 8).is_none(),
        "long poll"
    );
    // A record from another producer wakes it up.
    host.append(
        "t-partition-1",
        vec![RecordOut {
            key: None,
            value: Some(b"native".to_vec()),
            properties: vec![Property {
                key: "p".into(),
                value: "q".into(),
            }],
            event_time_ms: None,
        }],
    );
    host.run();
    let r: FetchResponse = receive(&mut host, 11, 8).expect("woken by the entry");
    let (_, hw, records) = fetched(&r);
    assert_eq!(hw, 16);
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].0, 15);
    assert_eq!(records[0].2.as_deref(), Some(&b"native"[..]));

    send(
        &mut host,
        ApiKey::Fetch,
        11,
        9,
        &fetch_request("t", 1, 16, 500),
    );
    host.run();
    assert!(receive::<FetchResponse>(&mut host, 11, 9).is_none());
    host.advance(500);
    host.run();
    let r: FetchResponse = receive(&mut host, 11, 9).expect("answered at max_wait");
    assert_eq!(fetched(&r), (0, 16, vec![]));

    // Partition 0 is untouched; a fetch in the middle of partition 1 seeks there.
    assert_eq!(fetch(&mut host, "t", 0, 0), (0, 0, vec![]));
    let (_, _, records) = fetch(&mut host, "t", 1, 7);
    assert_eq!(
        records.first().map(|r| r.0),
        Some(6),
        "the batch holding 7, whole"
    );
    assert_eq!(records.last().map(|r| r.0), Some(15));
}

#[test]
fn fetch_outside_the_log_is_offset_out_of_range() {
    let mut host = host();
    create(&mut host, "t", 1);
    produce(&mut host, "t", 0, batch(3, Codec::None));
    assert_eq!(fetch(&mut host, "t", 0, 4).0, error::OFFSET_OUT_OF_RANGE);
    assert_eq!(fetch(&mut host, "t", 0, -1).0, error::OFFSET_OUT_OF_RANGE);
    assert_eq!(
        fetch(&mut host, "t", 1, 0).0,
        error::UNKNOWN_TOPIC_OR_PARTITION
    );
    assert_eq!(
        fetch(&mut host, "nope", 0, 0).0,
        error::UNKNOWN_TOPIC_OR_PARTITION
    );
    assert_eq!(fetch(&mut host, "t", 0, 3), (0, 3, vec![]));
}

#[test]
fn list_offsets_earliest_latest_and_by_time() {
    let mut host = host();
    create(&mut host, "t", 1);
    assert_eq!(list_offsets(&mut host, "t", 0, -2), (0, -1, 0));
    assert_eq!(list_offsets(&mut host, "t", 0, -1), (0, -1, 0));
    assert_eq!(list_offsets(&mut host, "t", 0, 0), (0, -1, -1), "empty");
    // Producer timestamps near the (simulated) broker clock, which starts at 1000.
    let at = |t0: i64, n: i64| encode((0..n).map(|i| krecord_at(i, t0 + i)).collect(), Codec::None);
    produce(&mut host, "t", 0, at(1_000, 4));
    host.advance(10_000);
    produce(&mut host, "t", 0, at(11_000, 2));
    assert_eq!(list_offsets(&mut host, "t", 0, -2), (0, -1, 0));
    assert_eq!(list_offsets(&mut host, "t", 0, -1), (0, -1, 6));
    assert_eq!(list_offsets(&mut host, "t", 0, 1_002), (0, 1_002, 2));
    assert_eq!(list_offsets(&mut host, "t", 0, 5_000), (0, 11_000, 4));
    assert_eq!(list_offsets(&mut host, "t", 0, 11_001), (0, 11_001, 5));
    // Nothing at or after: -1, once the search gave up.
    send(
        &mut host,
        ApiKey::ListOffsets,
        5,
        6,
        &ListOffsetsRequest::default().with_topics(vec![ListOffsetsTopic::default()
            .with_name(name("t"))
            .with_partitions(vec![ListOffsetsPartition::default().with_timestamp(20_000)])]),
    );
    host.run();
    assert!(host.take_sent().is_empty());
    host.advance(super::list_offsets::BY_TIME_WAIT_MS);
    host.run();
    let r: ListOffsetsResponse = receive(&mut host, 5, 6).unwrap();
    assert_eq!(r.topics[0].partitions[0].offset, -1);
    assert!(host.readers().is_empty(), "the search's reader is closed");
    assert_eq!(
        list_offsets(&mut host, "t", 9, -1).0,
        error::UNKNOWN_TOPIC_OR_PARTITION
    );
}

#[test]
fn acks_zero_is_not_answered_and_bad_batches_get_kafka_codes() {
    let mut host = host();
    create(&mut host, "t", 1);
    send(
        &mut host,
        ApiKey::Produce,
        8,
        3,
        &produce_request("t", 0, batch(2, Codec::Lz4), 0),
    );
    host.run();
    assert!(host.take_sent().is_empty());
    assert_eq!(host.entries("t-partition-0").len(), 1);
    // The next request is served after it.
    assert_eq!(produce(&mut host, "t", 0, batch(1, Codec::None)), (0, 2));

    let mut corrupt = batch(2, Codec::None).to_vec();
    *corrupt.last_mut().unwrap() ^= 1;
    assert_eq!(
        produce(&mut host, "t", 0, Bytes::from(corrupt)).0,
        error::CORRUPT_MESSAGE
    );
    let mut two = batch(1, Codec::None).to_vec();
    two.extend_from_slice(&batch(1, Codec::None));
    assert_eq!(
        produce(&mut host, "t", 0, Bytes::from(two)).0,
        error::INVALID_RECORD
    );
    assert_eq!(
        produce(&mut host, "t", 5, batch(1, Codec::None)).0,
        error::UNKNOWN_TOPIC_OR_PARTITION
    );
    let r: ProduceResponse = call(
        &mut host,
        ApiKey::Produce,
        8,
        &produce_request("t", 0, batch(1, Codec::None), 2),
    );
    assert_eq!(
        r.responses[0].partition_responses[0].error_code,
        error::INVALID_REQUIRED_ACKS
    );
    assert_eq!(
        host.entries("t-partition-0").len(),
        2,
        "nothing refused was stored"
    );
}

#[test]
fn topics_are_created_grown_and_deleted() {
    let mut host = host();
    assert_eq!(create(&mut host, "t", 2), 0);
    assert_eq!(create(&mut host, "t", 2), error::TOPIC_ALREADY_EXISTS);
    assert_eq!(create(&mut host, "t.x", 0), error::INVALID_PARTITIONS);
    assert_eq!(create(&mut host, "a/b", 1), error::INVALID_TOPIC_EXCEPTION);

    let grow = |host: &mut SimHost<KafkaConnection>, t: &str, count: i32| -> i16 {
        let r: CreatePartitionsResponse = call(
            host,
            ApiKey::CreatePartitions,
            2,
            &CreatePartitionsRequest::default().with_topics(vec![CreatePartitionsTopic::default()
                .with_name(name(t))
                .with_count(count)]),
        );
        r.results[0].error_code
    };
    assert_eq!(grow(&mut host, "t", 4), 0);
    assert_eq!(host.topics().get("t"), Some(&4));
    assert_eq!(grow(&mut host, "t", 3), error::INVALID_PARTITIONS);
    // More than max_partitions (1,000 by default) is refused before the backend is asked:
    // a Metadata answer lists every partition, so 2^31 of them would exhaust memory.
    assert_eq!(
        create(&mut host, "huge", i32::MAX),
        error::INVALID_PARTITIONS
    );
    assert_eq!(create(&mut host, "huge", 1_001), error::INVALID_PARTITIONS);
    assert_eq!(host.topics().get("huge"), None);
    assert_eq!(grow(&mut host, "t", i32::MAX), error::INVALID_PARTITIONS);
    assert_eq!(host.topics().get("t"), Some(&4));
    assert_eq!(create(&mut host, "big", 1_000), 0);
    assert_eq!(
        grow(&mut host, "nope", 3),
        error::UNKNOWN_TOPIC_OR_PARTITION
    );
    assert_eq!(produce(&mut host, "t", 3, batch(1, Codec::None)).0, 0);

    let delete = |host: &mut SimHost<KafkaConnection>, t: &str| -> i16 {
        let r: DeleteTopicsResponse = call(
            host,
            ApiKey::DeleteTopics,
            4,
            &DeleteTopicsRequest::default().with_topic_names(vec![name(t)]),
        );
        r.responses[0].error_code
    };
    assert_eq!(delete(&mut host, "t"), 0);
    assert_eq!(host.topics().get("t"), None);
    assert_eq!(delete(&mut host, "t"), error::UNKNOWN_TOPIC_OR_PARTITION);
}

/// Every served version of every API is decoded and answered (kafka-protocol refuses to
/// encode a field a version lacks when it is set, so this catches a response built for
/// the wrong version).
#[test]
fn every_served_version_is_answered() {
    let mut host = host();
    for v in 2..=7 {
        let r: CreateTopicsResponse = call(
            &mut host,
            ApiKey::CreateTopics,
            v,
            &CreateTopicsRequest::default().with_topics(vec![CreatableTopic::default()
                .with_name(name(&format!("t{v}")))
                .with_num_partitions(1)
                .with_replication_factor(1)]),
        );
        assert_eq!(r.topics[0].error_code, 0, "CreateTopics v{v}");
    }
    for v in 0..=12 {
        let topics =
            (v > 0).then(|| vec![MetadataRequestTopic::default().with_name(Some(name("t2")))]);
        let r: MetadataResponse = call(
            &mut host,
            ApiKey::Metadata,
            v,
            &MetadataRequest::default().with_topics(topics.or(Some(Vec::new()))),
        );
        assert!(!r.topics.is_empty(), "Metadata v{v}");
    }
    for v in 3..=9 {
        let r: ProduceResponse = call(
            &mut host,
            ApiKey::Produce,
            v,
            &produce_request("t2", 0, batch(1, Codec::None), 1),
        );
        let p = &r.responses[0].partition_responses[0];
        assert_eq!(
            (p.error_code, p.base_offset),
            (0, i64::from(v) - 3),
            "Produce v{v}"
        );
    }
    for v in 4..=12 {
        let r: FetchResponse = call(&mut host, ApiKey::Fetch, v, &fetch_request("t2", 0, 0, 0));
        assert_eq!(r.responses[0].partitions[0].error_code, 0, "Fetch v{v}");
    }
    for v in 1..=6 {
        let r: ListOffsetsResponse = call(
            &mut host,
            ApiKey::ListOffsets,
            v,
            &ListOffsetsRequest::default()
                .with_replica_id(BrokerId(-1))
                .with_topics(vec![ListOffsetsTopic::default()
                    .with_name(name("t2"))
                    .with_partitions(vec![
                        ListOffsetsPartition::default().with_timestamp(-1)
                    ])]),
        );
        assert_eq!(r.topics[0].partitions[0].offset, 7, "ListOffsets v{v}");
    }
    for v in 0..=3 {
        let r: CreatePartitionsResponse = call(
            &mut host,
            ApiKey::CreatePartitions,
            v,
            &CreatePartitionsRequest::default().with_topics(vec![CreatePartitionsTopic::default()
                .with_name(name(&format!("t{}", v + 2)))
                .with_count(2)]),
        );
        assert_eq!(r.results[0].error_code, 0, "CreatePartitions v{v}");
    }
    for v in 1..=5 {
        let r: DeleteTopicsResponse = call(
            &mut host,
            ApiKey::DeleteTopics,
            v,
            &DeleteTopicsRequest::default().with_topic_names(vec![name(&format!("t{}", v + 2))]),
        );
        assert_eq!(r.responses[0].error_code, 0, "DeleteTopics v{v}");
    }
    assert_eq!(host.closed(), None);
}

/// Hold-backs the quotas report, one per call (then 0).
struct Reported(std::cell::RefCell<std::collections::VecDeque<u32>>);

impl super::throttle::Quota for Reported {
    fn held_back_ms(&self) -> u32 {
        self.0.borrow_mut().pop_front().unwrap_or(0)
    }
}

#[test]
fn the_quota_hold_back_is_the_produce_throttle_time() {
    let quota = std::rc::Rc::new(Reported(std::cell::RefCell::new(
        [250, 40, 7_000].into_iter().collect(),
    )));
    let mut host = SimHost::new(
        1_000,
        KafkaConnection::new(Config::default()).with_quota(quota.clone()),
    );
    create(&mut host, "t", 1);
    let throttle = |host: &mut SimHost<KafkaConnection>, version: i16| {
        let r: ProduceResponse = call(
            host,
            ApiKey::Produce,
            version,
            &produce_request("t", 0, batch(1, Codec::None), -1),
        );
        assert_eq!(r.responses[0].partition_responses[0].error_code, 0);
        r.throttle_time_ms
    };
    assert_eq!(throttle(&mut host, 8), 250);
    // An unanswered request (acks 0) takes its own hold-back with it.
    send(
        &mut host,
        ApiKey::Produce,
        8,
        3,
        &produce_request("t", 0, batch(1, Codec::None), 0),
    );
    host.run();
    assert!(host.take_sent().is_empty());
    assert_eq!(throttle(&mut host, 3), 7_000);
    assert_eq!(throttle(&mut host, 9), 0, "nothing held back");
}
