//! Idempotent producers on the SDK's simulated host, which checks sequences as the
//! gateway's host does: InitProducerId, a retried batch answered with its original offset
//! and stored once, a gap refused with `OUT_OF_ORDER_SEQUENCE_NUMBER`.

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::create_topics_request::CreatableTopic;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::records::{
    Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};
use magnetar_sdk::testing::SimHost;

use super::{error, KafkaConnection};
use crate::config::Config;
use crate::test_wire::call;

/// An InitProducerId request of an idempotent producer (no transactional id).
fn idempotent() -> InitProducerIdRequest {
    InitProducerIdRequest::default().with_transactional_id(None)
}

fn init(
    host: &mut SimHost<KafkaConnection>,
    version: i16,
    r: InitProducerIdRequest,
) -> (i16, i64, i16) {
    let r: InitProducerIdResponse = call(host, ApiKey::InitProducerId, version, &r);
    (r.error_code, r.producer_id.0, r.producer_epoch)
}

/// A batch of `n` records of producer `(id, epoch)` from sequence `first`.
fn batch(id: i64, epoch: i16, first: i32, n: i32) -> Bytes {
    let records: Vec<Record> = (0..n)
        .map(|i| Record {
            transactional: false,
            control: false,
            delete_horizon: false,
            partition_leader_epoch: 0,
            producer_id: id,
            producer_epoch: epoch,
            timestamp_type: TimestampType::Creation,
            offset: i64::from(i),
            sequence: first + i,
            timestamp: 1_700_000_000_000,
            key: None,
            value: Some(Bytes::from(format!("v{}", first + i))),
            headers: Default::default(),
        })
        .collect();
    let mut buf = BytesMut::new();
    RecordBatchEncoder::encode(
        &mut buf,
        &records,
        &RecordEncodeOptions {
            version: 2,
            compression: Compression::None,
        },
    )
    .unwrap();
    buf.freeze()
}

/// (error code, base offset) of a one-partition Produce v8 to `t` partition 0.
fn produce(host: &mut SimHost<KafkaConnection>, records: Bytes) -> (i16, i64) {
    let r: ProduceResponse = call(
        host,
        ApiKey::Produce,
        8,
        &ProduceRequest::default()
            .with_acks(-1)
            .with_timeout_ms(5_000)
            .with_topic_data(vec![TopicProduceData::default()
                .with_name(TopicName(StrBytes::from_static_str("t")))
                .with_partition_data(vec![PartitionProduceData::default()
                    .with_index(0)
                    .with_records(Some(records))])]),
    );
    let p = &r.responses[0].partition_responses[0];
    (p.error_code, p.base_offset)
}

#[test]
fn init_producer_id_hands_out_ids_bumps_epochs_and_refuses_transactions() {
    let mut host = SimHost::new(1_000, KafkaConnection::new(Config::default()));
    let (code, a, epoch) = init(&mut host, 1, idempotent());
    assert_eq!((code, epoch), (error::NONE, 0));
    let (_, b, _) = init(&mut host, 4, idempotent());
    assert!(a >= 0 && b >= 0 && a != b, "{a} {b}");
    // KIP-360: the same id with the next epoch.
    let bumped = idempotent()
        .with_producer_id(ProducerId(a))
        .with_producer_epoch(0);
    assert_eq!(init(&mut host, 3, bumped), (error::NONE, a, 1));
    let transactional = InitProducerIdRequest::default()
        .with_transactional_id(Some(TransactionalId(StrBytes::from_static_str("tx"))));
    assert_eq!(
        init(&mut host, 2, transactional).0,
        error::TRANSACTIONAL_ID_AUTHORIZATION_FAILED
    );
    assert_eq!(host.closed(), None);
}

#[test]
fn a_retried_batch_keeps_its_offset_and_a_gap_is_out_of_order() {
    let mut host = SimHost::new(1_000, KafkaConnection::new(Config::default()));
    let (_, id, epoch) = init(&mut host, 4, idempotent());
    let created: CreateTopicsResponse = call(
        &mut host,
        ApiKey::CreateTopics,
        5,
        &CreateTopicsRequest::default().with_topics(vec![CreatableTopic::default()
            .with_name(TopicName(StrBytes::from_static_str("t")))
            .with_num_partitions(1)
            .with_replication_factor(1)]),
    );
    assert_eq!(created.topics[0].error_code, error::NONE);
    // Another producer's record first, so that offsets and sequences differ.
    assert_eq!(produce(&mut host, batch(-1, -1, -1, 1)), (error::NONE, 0));
    assert_eq!(produce(&mut host, batch(id, epoch, 0, 3)), (error::NONE, 1));
    assert_eq!(produce(&mut host, batch(id, epoch, 3, 2)), (error::NONE, 4));
    // The response of the first batch was lost: its retry is answered, not stored again.
    assert_eq!(produce(&mut host, batch(id, epoch, 0, 3)), (error::NONE, 1));
    assert_eq!(produce(&mut host, batch(id, epoch, 3, 2)), (error::NONE, 4));
    assert_eq!(
        produce(&mut host, batch(id, epoch, 9, 1)).0,
        error::OUT_OF_ORDER_SEQUENCE_NUMBER
    );
    assert_eq!(produce(&mut host, batch(id, epoch, 5, 1)), (error::NONE, 6));
    let stored: usize = host
        .entries("t-partition-0")
        .iter()
        .map(|e| e.1.len())
        .sum();
    assert_eq!(stored, 7, "1 + 3 + 2 + 1 records, each once");
}
