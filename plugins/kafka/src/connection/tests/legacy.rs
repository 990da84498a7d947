//! The versions KIP-896 removed (`codec::legacy`) against the SDK's simulated host, with
//! `kafka-protocol` 0.15.1's client side (which still has them) encoding the requests and
//! decoding the responses, as a 0.10-era client would.

use bytes::{Bytes, BytesMut};
use kafka_protocol_v3::messages::create_topics_request::CreatableTopic;
use kafka_protocol_v3::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol_v3::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol_v3::messages::offset_commit_request::{
    OffsetCommitRequestPartition, OffsetCommitRequestTopic,
};
use kafka_protocol_v3::messages::offset_fetch_request::OffsetFetchRequestTopic;
use kafka_protocol_v3::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol_v3::messages::*;
use kafka_protocol_v3::protocol::{Decodable, Encodable, HeaderVersion, StrBytes};
use kafka_protocol_v3::records::{
    Compression, Record as KRecord, RecordBatchDecoder, RecordBatchEncoder, RecordEncodeOptions,
    TimestampType,
};
use magnetar_sdk::testing::SimHost;
use magnetar_sdk::Event;

use super::{error, KafkaConnection};
use crate::codec::compression::{self, Codec};
use crate::codec::message_set;
use crate::codec::records::Record;
use crate::config::Config;
use crate::coordinator::group::Timing;
use crate::coordinator::GroupHome;

const RECORD_LIST_TOO_LARGE: i16 = 18;

fn host_with(config: Config) -> SimHost<KafkaConnection> {
    SimHost::new(1_000, KafkaConnection::new(config))
}

fn s(v: &str) -> StrBytes {
    StrBytes::from_string(v.to_string())
}

fn name(v: &str) -> TopicName {
    TopicName(s(v))
}

/// `[int32 size][request header v1][body]`, as 0.15.1 encodes `body` at `version`.
fn request<Q: Encodable + HeaderVersion>(key: ApiKey, version: i16, body: &Q) -> Vec<u8> {
    let header = RequestHeader::default()
        .with_request_api_key(key as i16)
        .with_request_api_version(version)
        .with_correlation_id(7)
        .with_client_id(Some(s("kafka-python")));
    let mut frame = BytesMut::new();
    header
        .encode(&mut frame, Q::header_version(version))
        .expect("header encodes");
    body.encode(&mut frame, version).expect("request encodes");
    let mut out = (frame.len() as i32).to_be_bytes().to_vec();
    out.extend_from_slice(&frame);
    out
}

/// The one response sent, decoded by 0.15.1 at `version`, with no byte left over.
fn response<R: Decodable + HeaderVersion>(sent: &[u8], version: i16) -> R {
    assert!(sent.len() >= 4, "no response");
    let size = i32::from_be_bytes([sent[0], sent[1], sent[2], sent[3]]) as usize;
    assert_eq!(sent.len(), 4 + size, "one response");
    let mut frame = Bytes::copy_from_slice(&sent[4..]);
    let header = ResponseHeader::decode(&mut frame, R::header_version(version)).unwrap();
    assert_eq!(header.correlation_id, 7);
    let body = R::decode(&mut frame, version).expect("response decodes");
    assert!(frame.is_empty(), "trailing bytes");
    body
}

fn call<Q, R>(host: &mut SimHost<KafkaConnection>, key: ApiKey, version: i16, body: &Q) -> R
where
    Q: Encodable + HeaderVersion,
    R: Decodable + HeaderVersion,
{
    host.data(&request(key, version, body));
    host.run();
    assert_eq!(host.closed(), None, "{key:?} v{version}");
    response(&host.take_sent(), version)
}

fn krecord(i: i64, magic: i8) -> KRecord {
    KRecord {
        transactional: false,
        control: false,
        partition_leader_epoch: -1,
        producer_id: -1,
        producer_epoch: -1,
        timestamp_type: TimestampType::Creation,
        offset: i,
        sequence: -1,
        timestamp: if magic == 0 {
            -1
        } else {
            1_700_000_000_000 + i
        },
        key: Some(Bytes::from(format!("k{i}"))),
        value: Some(Bytes::from(format!("value {i}"))),
        headers: Default::default(),
    }
}

/// A 0.10-era producer's message set of records `from..to`, by 0.15.1's legacy encoder (a
/// wrapper for a codec, compressed with ours).
fn message_set(from: i64, to: i64, magic: i8, codec: Codec) -> Bytes {
    let records: Vec<_> = (from..to).map(|i| krecord(i, magic)).collect();
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
            version: magic,
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

fn produce_request(topic: &str, records: Bytes) -> ProduceRequest {
    ProduceRequest::default()
        .with_acks(-1)
        .with_timeout_ms(5_000)
        .with_topic_data(vec![TopicProduceData::default()
            .with_name(name(topic))
            .with_partition_data(vec![PartitionProduceData::default()
                .with_index(0)
                .with_records(Some(records))])])
}

/// (error code, base offset) of a one-partition Produce of `version`.
fn produce(
    host: &mut SimHost<KafkaConnection>,
    version: i16,
    topic: &str,
    records: Bytes,
) -> (i16, i64) {
    let r: ProduceResponse = call(
        host,
        ApiKey::Produce,
        version,
        &produce_request(topic, records),
    );
    let p = &r.responses[0].partition_responses[0];
    (p.error_code, p.base_offset)
}

/// A Fetch of `version` from `offset`: error, high watermark, the set's magic bytes and its
/// records as 0.15.1 decodes them (offset, timestamp, key, value).
#[allow(clippy::type_complexity)]
fn fetch(
    host: &mut SimHost<KafkaConnection>,
    version: i16,
    topic: &str,
    offset: i64,
) -> (i16, i64, Vec<i8>, Vec<(i64, i64, String, String)>) {
    host.data(&request(
        ApiKey::Fetch,
        version,
        &FetchRequest::default()
            .with_replica_id(BrokerId(-1))
            .with_max_wait_ms(100)
            .with_min_bytes(1)
            .with_max_bytes(1 << 20)
            .with_topics(vec![FetchTopic::default()
                .with_topic(name(topic))
                .with_partitions(vec![FetchPartition::default()
                    .with_fetch_offset(offset)
                    .with_partition_max_bytes(1 << 20)])]),
    ));
    host.run();
    let mut sent = host.take_sent();
    if sent.is_empty() {
        host.advance(100);
        host.run();
        sent = host.take_sent();
    }
    let r: FetchResponse = response(&sent, version);
    let p = &r.responses[0].partitions[0];
    let mut bytes = p.records.clone().unwrap_or_default();
    // Each message's magic, read from the set as it is (offset, size, crc, then magic).
    let mut magics = Vec::new();
    let mut at = 0;
    while at + 17 <= bytes.len() {
        magics.push(bytes[at + 16] as i8);
        let size = i32::from_be_bytes(bytes[at + 8..at + 12].try_into().unwrap()) as usize;
        at += 12 + size;
    }
    let mut records = Vec::new();
    for set in RecordBatchDecoder::decode_all(&mut bytes).unwrap() {
        for r in set.records {
            let text = |b: Option<Bytes>| String::from_utf8(b.unwrap().to_vec()).unwrap();
            records.push((r.offset, r.timestamp, text(r.key), text(r.value)));
        }
    }
    (p.error_code, p.high_watermark, magics, records)
}

fn list_offsets(host: &mut SimHost<KafkaConnection>, topic: &str, timestamp: i64) -> Vec<i64> {
    let r: ListOffsetsResponse = call(
        host,
        ApiKey::ListOffsets,
        0,
        &ListOffsetsRequest::default()
            .with_replica_id(BrokerId(-1))
            .with_topics(vec![ListOffsetsTopic::default()
                .with_name(name(topic))
                .with_partitions(vec![ListOffsetsPartition::default()
                    .with_timestamp(timestamp)
                    .with_max_num_offsets(1)])]),
    );
    let p = &r.topics[0].partitions[0];
    assert_eq!(p.error_code, 0);
    p.old_style_offsets.clone()
}

/// Produce v0-2 with plain and wrapped message sets of both magics become contiguous
/// offsets; Fetch v0-1 reads them back as magic 0, v2-3 as magic 1 with their timestamps,
/// from the fetch offset on; ListOffsets v0 answers the log start and end; CreateTopics v0
/// and v1 and DeleteTopics v0 manage the topics.
#[test]
fn old_clients_produce_fetch_and_list_offsets() {
    let mut host = host_with(Config::default());
    for (version, topic) in [(0, "old"), (1, "old1")] {
        let r: CreateTopicsResponse = call(
            &mut host,
            ApiKey::CreateTopics,
            version,
            &CreateTopicsRequest::default()
                .with_timeout_ms(5_000)
                .with_topics(vec![CreatableTopic::default()
                    .with_name(name(topic))
                    .with_num_partitions(1)
                    .with_replication_factor(1)]),
        );
        assert_eq!(r.topics[0].error_code, 0, "CreateTopics v{version}");
    }
    assert_eq!(list_offsets(&mut host, "old", -1), vec![0]);

    // Produce v0 and v1 carry magic 0, v2 magic 1; every codec a 0.10 client has.
    let sends = [
        (0, 0, Codec::None),
        (0, 0, Codec::Gzip),
        (1, 0, Codec::Snappy),
        (2, 1, Codec::None),
        (2, 1, Codec::Gzip),
        (2, 1, Codec::Snappy),
        (2, 1, Codec::Lz4),
    ];
    let mut next = 0;
    for (version, magic, codec) in sends {
        let set = message_set(next, next + 3, magic, codec);
        assert_eq!(
            produce(&mut host, version, "old", set),
            (0, next),
            "Produce v{version} magic {magic} {codec:?}"
        );
        next += 3;
    }
    let stored = host.entries("old-partition-0");
    assert_eq!(stored.len(), sends.len(), "one entry per produced set");
    assert_eq!(stored[1].1[2].key.as_deref(), Some(&b"k5"[..]));

    for version in 0..=3 {
        let (code, hw, magics, records) = fetch(&mut host, version, "old", 0);
        assert_eq!((code, hw), (0, next), "Fetch v{version}");
        let magic = if version < 2 { 0 } else { 1 };
        assert!(magics.iter().all(|m| *m == magic), "Fetch v{version}");
        let want: Vec<_> = (0..next)
            .map(|i| (i, format!("k{i}"), format!("value {i}")))
            .collect();
        let got: Vec<_> = records
            .iter()
            .map(|r| (r.0, r.2.clone(), r.3.clone()))
            .collect();
        assert_eq!(got, want, "Fetch v{version}");
        for &(i, ts, _, _) in &records {
            // Magic 0 has no timestamp. Magic 1 carries the producer's, and for what was
            // produced as magic 0 (offsets 0..9) the entry's publish time.
            match (magic, i < 9) {
                (0, _) => assert_eq!(ts, -1),
                (_, false) => assert_eq!(ts, 1_700_000_000_000 + i),
                (_, true) => assert!(ts > 0, "publish time at {i}"),
            }
        }
    }
    // From an offset inside a stored entry: the records before it are left out.
    let (_, _, _, records) = fetch(&mut host, 3, "old", 10);
    assert_eq!(records.first().map(|r| r.0), Some(10));
    assert_eq!(records.len() as i64, next - 10);

    assert_eq!(list_offsets(&mut host, "old", -2), vec![0]);
    assert_eq!(list_offsets(&mut host, "old", -1), vec![next]);

    let r: DeleteTopicsResponse = call(
        &mut host,
        ApiKey::DeleteTopics,
        0,
        &DeleteTopicsRequest::default()
            .with_timeout_ms(5_000)
            .with_topic_names(vec![name("old1")]),
    );
    assert_eq!(r.responses[0].error_code, 0);
    assert_eq!(host.topics().get("old1"), None);
}

/// Bad message sets get the codes Kafka answers, and the connection stays up:
/// a wrong CRC, a wrapper inside a wrapper, a bomb past
/// `max_uncompressed_bytes`, zstd.
#[test]
fn bad_message_sets_are_refused_with_kafka_codes() {
    let mut host = host_with(Config {
        max_uncompressed_bytes: 64 << 10,
        ..Config::default()
    });
    host.topics_mut().insert("old".into(), 1);

    // A message set with Produce v3+ is refused, as Kafka refuses it (v3 is record batches
    // only).
    assert_eq!(
        produce(&mut host, 3, "old", message_set(0, 2, 1, Codec::None)).0,
        error::INVALID_RECORD
    );

    let mut crc = message_set(0, 2, 1, Codec::None).to_vec();
    *crc.last_mut().unwrap() ^= 1;
    assert_eq!(
        produce(&mut host, 2, "old", crc.into()).0,
        error::CORRUPT_MESSAGE
    );

    let rec = |i: i64| Record {
        offset: i,
        timestamp: 1,
        key: None,
        value: Some(Bytes::from_static(b"v")),
        headers: Vec::new(),
    };
    let mut inner = Vec::new();
    message_set::encode_wrapped(1, Codec::Gzip, &[rec(0), rec(1)], &mut inner).unwrap();
    // The outer wrapper's value is the inner wrapper, compressed.
    let outer = Record {
        value: Some(Bytes::from(
            compression::compress(Codec::Gzip, &inner).unwrap(),
        )),
        ..rec(0)
    };
    let mut nested = Vec::new();
    message_set::encode(1, &[outer], &mut nested).unwrap();
    // Mark the outer message compressed (attributes, after offset, size, crc and magic),
    // then fix its CRC.
    nested[17] = 1;
    let crc = crc32fast::hash(&nested[16..]);
    nested[12..16].copy_from_slice(&crc.to_be_bytes());
    assert_eq!(
        produce(&mut host, 2, "old", nested.into()).0,
        error::CORRUPT_MESSAGE
    );

    let zeros = [Record {
        value: Some(Bytes::from(vec![0u8; 1 << 20])),
        ..rec(0)
    }];
    let mut bomb = Vec::new();
    message_set::encode_wrapped(1, Codec::Gzip, &zeros, &mut bomb).unwrap();
    assert!(bomb.len() < 8 << 10, "a bomb is small: {}", bomb.len());
    assert_eq!(
        produce(&mut host, 2, "old", bomb.into()).0,
        RECORD_LIST_TOO_LARGE
    );

    // zstd only in record batches v2 (KIP-110).
    let mut zstd = Vec::new();
    message_set::encode_wrapped(1, Codec::Zstd, &[rec(0)], &mut zstd).unwrap();
    assert_eq!(
        produce(&mut host, 2, "old", zstd.into()).0,
        error::UNSUPPORTED_COMPRESSION_TYPE
    );

    assert!(host.entries("old-partition-0").is_empty());
    // Still serving.
    assert_eq!(
        produce(&mut host, 1, "old", message_set(0, 1, 0, Codec::Gzip)),
        (0, 0)
    );
}

/// A malformed old request closes its connection (after nothing was sent), as for any
/// served API: truncated, trailing bytes, an array longer than the request.
#[test]
fn malformed_old_requests_close_the_connection() {
    let good = request(
        ApiKey::Produce,
        2,
        &produce_request("old", message_set(0, 1, 1, Codec::None)),
    );
    let resize = |mut r: Vec<u8>| {
        let size = (r.len() - 4) as i32;
        r[..4].copy_from_slice(&size.to_be_bytes());
        r
    };
    let mut trailing = good.clone();
    trailing.push(0);
    let mut huge_array = request(
        ApiKey::Fetch,
        0,
        &FetchRequest::default().with_replica_id(BrokerId(-1)),
    );
    let at = huge_array.len() - 4;
    huge_array[at..].copy_from_slice(&i32::MAX.to_be_bytes());
    for (what, bytes) in [
        ("truncated", resize(good[..good.len() - 3].to_vec())),
        ("trailing", resize(trailing)),
        ("huge array", huge_array),
    ] {
        let mut host = host_with(Config::default());
        host.data(&bytes);
        host.run();
        assert!(host.closed().is_some(), "{what}");
        assert!(host.take_sent().is_empty(), "{what}");
    }
}

/// One connection and the group home, posts carried between them.
fn pump(client: &mut SimHost<KafkaConnection>, home: &mut SimHost<GroupHome>) {
    loop {
        client.run();
        let posts = client.take_posts();
        if posts.is_empty() {
            break;
        }
        let mut routes = Vec::new();
        for (token, domain, shard, payload) in posts {
            routes.push((home.post(&domain, shard, "public/default", payload), token));
        }
        home.run();
        for (id, payload) in home.take_replies() {
            if let Some(&(_, token)) = routes.iter().find(|(i, _)| *i == id) {
                client.feed(Event::HomeReply {
                    token,
                    result: Ok(payload),
                });
            }
        }
    }
}

/// OffsetCommit v0 (no generation) and v1 (generation -1, no member: outside group
/// management) store offsets that OffsetFetch v0 reads back, with their metadata.
#[test]
fn offset_commit_v0_v1_and_offset_fetch_v0() {
    let mut client = host_with(Config::default());
    let mut home = SimHost::new(1_000, GroupHome::new(Timing::default()));
    client.topics_mut().insert("old".into(), 2);
    for (version, partition, offset) in [(0, 0, 5), (1, 1, 9)] {
        let body = OffsetCommitRequest::default()
            .with_group_id(GroupId(s("g")))
            .with_generation_id_or_member_epoch(-1)
            .with_topics(vec![OffsetCommitRequestTopic::default()
                .with_name(name("old"))
                .with_partitions(vec![OffsetCommitRequestPartition::default()
                    .with_partition_index(partition)
                    .with_committed_offset(offset)
                    .with_commit_timestamp(-1)
                    .with_committed_metadata(Some(s("md")))])]);
        client.data(&request(ApiKey::OffsetCommit, version, &body));
        pump(&mut client, &mut home);
        let r: OffsetCommitResponse = response(&client.take_sent(), version);
        assert_eq!(
            r.topics[0].partitions[0].error_code, 0,
            "OffsetCommit v{version}"
        );
    }
    let body = OffsetFetchRequest::default()
        .with_group_id(GroupId(s("g")))
        .with_topics(Some(vec![OffsetFetchRequestTopic::default()
            .with_name(name("old"))
            .with_partition_indexes(vec![0, 1])]));
    client.data(&request(ApiKey::OffsetFetch, 0, &body));
    pump(&mut client, &mut home);
    let r: OffsetFetchResponse = response(&client.take_sent(), 0);
    let mut got: Vec<_> = r.topics[0]
        .partitions
        .iter()
        .map(|p| {
            (
                p.partition_index,
                p.committed_offset,
                p.metadata.as_deref().map(str::to_string),
                p.error_code,
            )
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![(0, 5, Some("md".into()), 0), (1, 9, Some("md".into()), 0)]
    );
}

/// The fuzz target's seed of old versions (kafka-python's encoders wrote it: CreateTopics
/// v0, Produce v0 and v2 with a gzip wrapper, Fetch v0 and v3, ListOffsets v0, OffsetCommit
/// v1, OffsetFetch v0, DeleteTopics v0, in the target's `length, body` records) is served
/// whole: nine responses, the connection open, so that fuzzing starts from these paths.
#[test]
fn the_fuzz_seed_of_old_versions_is_served() {
    let seed = include_bytes!("../../../fuzz/corpus/kafka_connection/old-versions");
    let mut client = host_with(Config::default());
    let mut home = SimHost::new(1_000, GroupHome::new(Timing::default()));
    let mut rest = &seed[..];
    let mut sent = Vec::new();
    while let [len, tail @ ..] = rest {
        let (body, after) = tail.split_at(usize::from(*len).min(tail.len()));
        rest = after;
        client.data(body);
        pump(&mut client, &mut home);
        client.advance(100);
        pump(&mut client, &mut home);
        sent.extend(client.take_sent());
    }
    assert_eq!(client.closed(), None);
    let mut ids = Vec::new();
    let mut at = 0;
    while at + 8 <= sent.len() {
        let size = i32::from_be_bytes(sent[at..at + 4].try_into().unwrap()) as usize;
        ids.push(i32::from_be_bytes(sent[at + 4..at + 8].try_into().unwrap()));
        at += 4 + size;
    }
    assert_eq!(at, sent.len());
    assert_eq!(ids, (1..=9).collect::<Vec<_>>());
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any body after a valid header of an old version never panics: it is answered
        /// or the connection closes.
        #[test]
        fn any_old_request_body_never_panics(
            pick in 0usize..12,
            body in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            let (key, version) = [
                (ApiKey::Produce, 0), (ApiKey::Produce, 2), (ApiKey::Fetch, 0),
                (ApiKey::Fetch, 3), (ApiKey::ListOffsets, 0), (ApiKey::OffsetCommit, 0),
                (ApiKey::OffsetCommit, 1), (ApiKey::OffsetFetch, 0),
                (ApiKey::CreateTopics, 0), (ApiKey::CreateTopics, 1),
                (ApiKey::DeleteTopics, 0), (ApiKey::DescribeConfigs, 0),
            ][pick];
            let mut r = request(key, version, &ApiVersionsRequest::default());
            r.truncate(r.len().min(4 + 8 + 2 + 12));
            r.extend_from_slice(&body);
            let size = (r.len() - 4) as i32;
            r[..4].copy_from_slice(&size.to_be_bytes());
            let mut host = host_with(Config::default());
            host.topics_mut().insert("old".into(), 1);
            host.data(&r);
            host.run();
        }
    }
}
