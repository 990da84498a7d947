//! Produce v3+ (record batches v2, KIP-98; the message sets of v0-2 come through
//! produce_v0.rs): each partition's batch becomes **one**
//! append (one backend entry, consecutive indexes), and the response carries the entry's
//! first index as `base_offset`: the real offset, never a count (docs/kafka.md section 1.3).
//!
//! - `acks` 0: appended, no response (Kafka sends none); 1 and -1 (all): answered once
//!   every append completed. One backend write is durable on the backend's own terms, so
//!   1 and all mean the same here. Any other value: `INVALID_REQUIRED_ACKS`.
//! - Per partition, Kafka's validation (`LogValidator`): exactly one batch of magic 2,
//!   `CORRUPT_MESSAGE` for bytes that do not decode (CRC, truncation),
//!   `INVALID_RECORD` for control or transactional batches (no transactions here),
//!   `RECORD_LIST_TOO_LARGE` past `max_uncompressed_bytes`,
//!   `UNSUPPORTED_COMPRESSION_TYPE` for an unknown codec, `UNKNOWN_TOPIC_OR_PARTITION` for
//!   a topic or partition that does not exist.
//! - Idempotent producers' batches (a producer id) are de-duplicated appends
//!   (idempotence.rs): a retry gets the original base offset, a gap
//!   `OUT_OF_ORDER_SEQUENCE_NUMBER`.
//! - `throttle_time_ms`: how long the tenant's publish-rate quota held the appends back
//!   (throttle.rs).
//! - A transactional producer (`transactional_id`) is refused
//!   (`TRANSACTIONAL_ID_AUTHORIZATION_FAILED`): ApiVersions does not list the transaction
//!   APIs.

use bytes::Bytes;
use kafka_protocol::messages::produce_response::{PartitionProduceResponse, TopicProduceResponse};
use kafka_protocol::messages::{ProduceRequest, ProduceResponse, RequestHeader, TopicName};
use kafka_protocol::protocol::StrBytes;
use magnetar_sdk::{Action, DedupSpec, RecordOut};

use super::topics::partition_topic;
use super::{error, idempotence, Job, JobEvent, KafkaConnection, Op};
use crate::codec::records;
use crate::message;

/// A Produce request being served.
pub struct ProduceJob {
    version: i16,
    acks: i16,
    topics: Vec<(String, Vec<Part>)>,
    stage: Stage,
}

struct Part {
    index: i32,
    records: Option<Bytes>,
    /// (error code, base offset), once known.
    result: Option<(i16, i64)>,
}

#[derive(PartialEq, Eq)]
enum Stage {
    Start,
    Describing,
    Appending,
}

impl KafkaConnection {
    pub(super) fn start_produce(&mut self, version: i16, r: ProduceRequest) -> Job {
        let refuse = if !matches!(r.acks, -1..=1) {
            Some(error::INVALID_REQUIRED_ACKS)
        } else if r.transactional_id.is_some() {
            Some(error::TRANSACTIONAL_ID_AUTHORIZATION_FAILED)
        } else {
            None
        };
        let topics = r
            .topic_data
            .into_iter()
            .map(|t| {
                let parts = t
                    .partition_data
                    .into_iter()
                    .map(|p| Part {
                        index: p.index,
                        result: refuse
                            .or(p.records.is_none().then_some(error::INVALID_RECORD))
                            .map(|code| (code, -1)),
                        records: p.records,
                    })
                    .collect();
                (t.name.0.to_string(), parts)
            })
            .collect();
        Job::Produce(ProduceJob {
            version,
            acks: r.acks,
            topics,
            stage: Stage::Start,
        })
    }

    pub(super) fn step_produce(
        &mut self,
        header: &RequestHeader,
        j: &mut ProduceJob,
        inbox: Vec<JobEvent>,
    ) -> Result<bool, String> {
        for e in inbox {
            match e {
                JobEvent::Described(_) => {
                    j.stage = Stage::Appending;
                    self.append_all(j);
                }
                JobEvent::Appended(t, p, result) => {
                    if let Some(part) = j.topics.get_mut(t).and_then(|t| t.1.get_mut(p)) {
                        part.result = Some(match result {
                            Ok(a) => (error::NONE, i64::try_from(a.first_index).unwrap_or(-1)),
                            Err(e) => (idempotence::append_error_code(&e), -1),
                        });
                    }
                }
                _ => {}
            }
        }
        if j.stage == Stage::Start {
            if !self.described(j.topics.iter().map(|t| t.0.as_str())) {
                j.stage = Stage::Describing;
                return Ok(false);
            }
            j.stage = Stage::Appending;
            self.append_all(j);
        }
        if j.topics
            .iter()
            .any(|t| t.1.iter().any(|p| p.result.is_none()))
        {
            return Ok(false);
        }
        // Taken for every request, answered or not (acks 0), so that the next response
        // carries its own request's hold-back only.
        let throttle_time_ms = super::throttle::throttle_time_ms(&*self.quota);
        if j.acks == 0 {
            return Ok(true);
        }
        let responses = j
            .topics
            .iter()
            .map(|(name, parts)| {
                TopicProduceResponse::default()
                    .with_name(TopicName(StrBytes::from_string(name.clone())))
                    .with_partition_responses(
                        parts
                            .iter()
                            .map(|p| {
                                let (code, base) =
                                    p.result.unwrap_or((error::UNKNOWN_SERVER_ERROR, -1));
                                PartitionProduceResponse::default()
                                    .with_index(p.index)
                                    .with_error_code(code)
                                    .with_base_offset(base)
                                    .with_log_append_time_ms(-1)
                                    .with_log_start_offset(-1)
                            })
                            .collect(),
                    )
            })
            .collect();
        self.respond(
            header,
            &ProduceResponse::default()
                .with_responses(responses)
                .with_throttle_time_ms(throttle_time_ms),
        )?;
        Ok(true)
    }

    /// Starts the append of every partition that has neither a result nor an append in
    /// flight (a part's records are taken when its append starts).
    fn append_all(&mut self, j: &mut ProduceJob) {
        let limits = self.config.record_limits();
        for (ti, (name, parts)) in j.topics.iter_mut().enumerate() {
            let partitions = self.topics.get(self.now_ms, name);
            for (pi, part) in parts.iter_mut().enumerate() {
                if part.result.is_some() {
                    continue;
                }
                let Some(bytes) = part.records.take() else {
                    continue; // started already
                };
                let Some(topic) = partitions.and_then(|n| partition_topic(name, n, part.index))
                else {
                    part.result = Some((error::UNKNOWN_TOPIC_OR_PARTITION, -1));
                    continue;
                };
                match batch_records(bytes, limits, j.version) {
                    Ok((records, dedup)) => {
                        let token = self.ops.start(Op::Append(ti, pi));
                        self.out.push(Action::Append {
                            token,
                            topic,
                            records,
                            dedup,
                        });
                    }
                    Err(code) => part.result = Some((code, -1)),
                }
            }
        }
    }
}

/// The messages of a partition's `records` (exactly one batch of magic 2 with user
/// records) and the batch's de-duplication, or the Kafka error code that refuses it.
fn batch_records(
    bytes: Bytes,
    limits: records::Limits,
    version: i16,
) -> Result<(Vec<RecordOut>, Option<DedupSpec>), i16> {
    // Kafka: Produce v3+ carries record batches (magic 2) only, v0-2 message sets only.
    let magic = records::magic(&bytes);
    if magic.is_some_and(|m| (m == 2) != (version >= 3)) {
        return Err(error::INVALID_RECORD);
    }
    if magic.is_some_and(|m| m != 2) {
        return super::produce_v0::message_set_records(&bytes, limits).map(|r| (r, None));
    }
    let mut batches = records::decode_batches(bytes, limits).map_err(|e| e.kafka_error())?;
    let batch = match (batches.pop(), batches.is_empty()) {
        (Some(b), true) => b,
        _ => return Err(error::INVALID_RECORD),
    };
    if batch.control || batch.transactional {
        return Err(error::INVALID_RECORD);
    }
    let dedup = idempotence::dedup_of(&batch);
    Ok((
        batch.records.iter().map(message::record_out).collect(),
        dedup,
    ))
}
