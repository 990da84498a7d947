//! Idempotent producers (KIP-98, without transactions): InitProducerId hands out producer
//! ids, and Produce passes each batch's producer id, epoch and base sequence to the host as
//! a de-duplicated append (docs/kafka.md 1.4).
//!
//! - **InitProducerId** without a `transactional_id`: a random 62-bit producer id, epoch 0
//!   (no allocator to own: among a million live producers a collision has a chance of about
//!   1e-7). v3+ with the producer's current id and epoch (KIP-360, after an
//!   `OUT_OF_ORDER_SEQUENCE_NUMBER` or an expired batch) keeps the id and bumps the epoch;
//!   past the last epoch a new id starts at 0. A `transactional_id` is refused with
//!   `TRANSACTIONAL_ID_AUTHORIZATION_FAILED`: ApiVersions lists no transaction API.
//! - **Produce**: a batch with a producer id is appended as producer `kafka-<id>-<epoch>`
//!   from its base sequence. The host answers a repeated batch (one of the producer's last
//!   five) with the original offsets, which the response carries as Kafka's broker does,
//!   and refuses a batch that starts anywhere but at the next sequence:
//!   `OUT_OF_ORDER_SEQUENCE_NUMBER`.

use std::hash::BuildHasher;

use kafka_protocol::messages::{
    InitProducerIdRequest, InitProducerIdResponse, ProducerId, RequestHeader,
};
use magnetar_sdk::{DedupSpec, ErrorKind, OpError};

use super::{error, KafkaConnection};
use crate::codec::records::Batch;

/// The host's message for a batch that is not the producer's next (see `indexed.append`).
const OUT_OF_ORDER: &str = "out-of-order sequence";

/// A new producer id: 62 random bits.
fn new_producer_id() -> i64 {
    let random = std::collections::hash_map::RandomState::new().hash_one(0u8);
    (random >> 2) as i64
}

/// The host append's de-duplication for `batch`: none for a batch without a producer id.
pub(super) fn dedup_of(batch: &Batch) -> Option<DedupSpec> {
    let sequence = u64::try_from(batch.base_sequence).ok()?;
    (batch.producer_id >= 0).then(|| DedupSpec {
        name: format!("kafka-{}-{}", batch.producer_id, batch.producer_epoch),
        first_sequence: sequence,
    })
}

/// The Kafka error code of a failed append, the sequence check's included.
pub(super) fn append_error_code(e: &OpError) -> i16 {
    if e.kind == ErrorKind::InvalidName && e.message.starts_with(OUT_OF_ORDER) {
        error::OUT_OF_ORDER_SEQUENCE_NUMBER
    } else {
        super::op_error_code(e)
    }
}

impl KafkaConnection {
    /// InitProducerId, answered at once (nothing to ask the host).
    pub(super) fn init_producer_id(
        &mut self,
        header: &RequestHeader,
        r: InitProducerIdRequest,
    ) -> Result<(), String> {
        let response = InitProducerIdResponse::default();
        let response = if r.transactional_id.is_some() {
            response
                .with_error_code(error::TRANSACTIONAL_ID_AUTHORIZATION_FAILED)
                .with_producer_id(ProducerId(-1))
                .with_producer_epoch(-1)
        } else {
            let (id, epoch) = match (r.producer_id.0, r.producer_epoch) {
                (id, epoch) if id >= 0 && (0..i16::MAX - 1).contains(&epoch) => (id, epoch + 1),
                _ => (new_producer_id(), 0),
            };
            response
                .with_error_code(error::NONE)
                .with_producer_id(ProducerId(id))
                .with_producer_epoch(epoch)
        };
        self.respond(header, &response)
    }
}
