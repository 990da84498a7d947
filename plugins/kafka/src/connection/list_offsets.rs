//! ListOffsets v1+ (docs/kafka.md section 1.5), per partition:
//!
//! - **earliest** (`-2`, the log start offset): the first stored entry's first index
//!   (`indexed.bounds`); 0 for an empty partition.
//! - **latest** (`-1`, the high watermark): the last stored entry's last index + 1; 0 for an
//!   empty partition. `read_committed` gets the same (no transactions).
//! - **by timestamp** `T`: a reader opened at publish time `T - `[`SKEW_MS`] (the backend's
//!   seek by time) reads forward to the first record whose timestamp (its event time, else
//!   the entry's publish time) is `>= T`, and answers its offset and timestamp; none within
//!   [`BY_TIME_WAIT_MS`] (nothing stored at or after `T`) is offset and timestamp -1, as
//!   Kafka answers. The seek is over the broker's clock and the answer over the producer's
//!   (Kafka's CreateTime), hence the skew window: exact for producers whose clocks are
//!   within it of the broker's (section 1.5; the window is not a plugin option yet).
//! - Other negative timestamps (`-3` max timestamp, KIP-734, and later ones) come with v7+,
//!   which is not served.

use kafka_protocol::messages::list_offsets_response::{
    ListOffsetsPartitionResponse, ListOffsetsTopicResponse,
};
use kafka_protocol::messages::{ListOffsetsRequest, ListOffsetsResponse, RequestHeader, TopicName};
use kafka_protocol::protocol::StrBytes;
use magnetar_sdk::{Action, Entry, Position, ReaderSpec, SubId};

use super::topics::partition_topic;
use super::{error, op_error_code, Current, Job, JobEvent, KafkaConnection, Op};

/// How long a search by timestamp waits for an entry at or after the time.
pub const BY_TIME_WAIT_MS: u64 = 2_000;
/// How far before `T` (broker time) a search by timestamp starts.
pub const SKEW_MS: u64 = 60_000;

/// One partition of the request.
struct Part {
    partition: i32,
    timestamp: i64,
    /// (error code, timestamp, offset) once known.
    result: Option<(i16, i64, i64)>,
    /// The reader of a search by timestamp.
    reader: Option<SubId>,
}

/// A ListOffsets request being served.
pub struct ListOffsetsJob {
    topics: Vec<(String, Vec<Part>)>,
    stage: Stage,
    timer: Option<u64>,
}

#[derive(PartialEq, Eq)]
enum Stage {
    Start,
    Describing,
    Working,
}

impl KafkaConnection {
    pub(super) fn start_list_offsets(&mut self, _version: i16, r: ListOffsetsRequest) -> Job {
        let topics = r
            .topics
            .into_iter()
            .map(|t| {
                let parts = t
                    .partitions
                    .into_iter()
                    .map(|p| Part {
                        partition: p.partition_index,
                        timestamp: p.timestamp,
                        result: (p.timestamp < -2).then_some((error::INVALID_REQUEST, -1, -1)),
                        reader: None,
                    })
                    .collect();
                (t.name.0.to_string(), parts)
            })
            .collect();
        Job::ListOffsets(ListOffsetsJob {
            topics,
            stage: Stage::Start,
            timer: None,
        })
    }

    pub(super) fn step_list_offsets(
        &mut self,
        header: &RequestHeader,
        j: &mut ListOffsetsJob,
        inbox: Vec<JobEvent>,
    ) -> Result<bool, String> {
        for e in inbox {
            match e {
                JobEvent::Described(_) => {
                    j.stage = Stage::Working;
                    self.list_bounds(j);
                }
                JobEvent::Bounds(t, p, result) => {
                    let Some((name, part)) = j
                        .topics
                        .get_mut(t)
                        .and_then(|(n, ps)| Some((n.clone(), ps.get_mut(p)?)))
                    else {
                        continue;
                    };
                    let bounds = match result {
                        Ok(b) => b,
                        Err(e) => {
                            part.result = Some((op_error_code(&e), -1, -1));
                            continue;
                        }
                    };
                    let idx = |i: u64| i64::try_from(i).unwrap_or(i64::MAX);
                    match part.timestamp {
                        -2 => {
                            part.result =
                                Some((error::NONE, -1, bounds.first.map_or(0, |f| idx(f.index))))
                        }
                        -1 => {
                            part.result = Some((
                                error::NONE,
                                -1,
                                bounds.last.map_or(0, |l| idx(l.index).saturating_add(1)),
                            ))
                        }
                        ts => {
                            if bounds.last.is_none() {
                                part.result = Some((error::NONE, -1, -1));
                                continue;
                            }
                            let partitions = self.topics.get(self.now_ms, &name).unwrap_or(0);
                            let Some(topic) = partition_topic(&name, partitions, part.partition)
                            else {
                                part.result = Some((error::UNKNOWN_TOPIC_OR_PARTITION, -1, -1));
                                continue;
                            };
                            let token = self.ops.start(Op::ListReader(t, p));
                            self.out.push(Action::OpenReader {
                                token,
                                spec: ReaderSpec {
                                    topic,
                                    start: Position::PublishTime(
                                        u64::try_from(ts).unwrap_or(0).saturating_sub(SKEW_MS),
                                    ),
                                    max_unacked_entries: 1,
                                },
                            });
                            if j.timer.is_none() {
                                let token = self.ops.token();
                                j.timer = Some(token);
                                self.out.push(Action::SetTimer {
                                    token,
                                    delay_ms: BY_TIME_WAIT_MS,
                                });
                            }
                        }
                    }
                }
                JobEvent::ListReader(t, p, result) => {
                    let Some(part) = j.topics.get_mut(t).and_then(|t| t.1.get_mut(p)) else {
                        if let Ok(sub) = result {
                            self.out.push(Action::Unsubscribe { sub, delete: false });
                        }
                        continue;
                    };
                    match result {
                        Ok(sub) => part.reader = Some(sub),
                        Err(e) => part.result = Some((op_error_code(&e), -1, -1)),
                    }
                }
                JobEvent::ListEntry(entry) => {
                    let Some(part) = j
                        .topics
                        .iter_mut()
                        .flat_map(|t| t.1.iter_mut())
                        .find(|p| p.reader == Some(entry.reader))
                    else {
                        continue;
                    };
                    if part.result.is_some() {
                        continue;
                    }
                    match first_at_or_after(&entry, part.timestamp) {
                        Some((ts, offset)) => part.result = Some((error::NONE, ts, offset)),
                        None => self.out.ack(entry.reader, entry.delivery_id),
                    }
                }
                JobEvent::Timer(token) if j.timer == Some(token) => {
                    for part in j.topics.iter_mut().flat_map(|t| t.1.iter_mut()) {
                        if part.result.is_none() {
                            part.result = Some((error::NONE, -1, -1));
                        }
                    }
                }
                _ => {}
            }
        }
        if j.stage == Stage::Start {
            if self.described(j.topics.iter().map(|t| t.0.as_str())) {
                j.stage = Stage::Working;
                self.list_bounds(j);
            } else {
                j.stage = Stage::Describing;
            }
        }
        if j.topics
            .iter()
            .any(|t| t.1.iter().any(|p| p.result.is_none()))
        {
            return Ok(false);
        }
        for part in j.topics.iter_mut().flat_map(|t| t.1.iter_mut()) {
            if let Some(sub) = part.reader.take() {
                self.out.push(Action::Unsubscribe { sub, delete: false });
            }
        }
        let topics = j
            .topics
            .iter()
            .map(|(name, parts)| {
                ListOffsetsTopicResponse::default()
                    .with_name(TopicName(StrBytes::from_string(name.clone())))
                    .with_partitions(
                        parts
                            .iter()
                            .map(|p| {
                                let (code, ts, offset) = p.result.unwrap_or((error::NONE, -1, -1));
                                ListOffsetsPartitionResponse::default()
                                    .with_partition_index(p.partition)
                                    .with_error_code(code)
                                    .with_timestamp(ts)
                                    .with_offset(offset)
                                    // v4+ (KIP-320); the one leader's epoch is 0.
                                    .with_leader_epoch(if header.request_api_version >= 4 {
                                        0
                                    } else {
                                        -1
                                    })
                            })
                            .collect(),
                    )
            })
            .collect();
        self.respond(header, &ListOffsetsResponse::default().with_topics(topics))?;
        Ok(true)
    }

    /// Asks the bounds of every partition that has no result yet.
    fn list_bounds(&mut self, j: &mut ListOffsetsJob) {
        for (t, (name, parts)) in j.topics.iter_mut().enumerate() {
            let partitions = self.topics.get(self.now_ms, name);
            for (p, part) in parts.iter_mut().enumerate() {
                if part.result.is_some() {
                    continue;
                }
                match partitions.and_then(|n| partition_topic(name, n, part.partition)) {
                    Some(topic) => {
                        let token = self.ops.start(Op::ListBounds(t, p));
                        self.out.push(Action::Bounds { token, topic });
                    }
                    None => part.result = Some((error::UNKNOWN_TOPIC_OR_PARTITION, -1, -1)),
                }
            }
        }
    }

    /// Hands an entry of a search by timestamp to the current ListOffsets; `false` if it is
    /// not one of its readers'.
    pub(super) fn list_entry(&mut self, entry: &Entry) -> bool {
        let Some(Current {
            job: Job::ListOffsets(j),
            inbox,
            ..
        }) = self.job.as_mut()
        else {
            return false;
        };
        let ours = j
            .topics
            .iter()
            .flat_map(|t| t.1.iter())
            .any(|p| p.reader == Some(entry.reader));
        if ours {
            inbox.push(JobEvent::ListEntry(entry.clone()));
        }
        ours
    }
}

/// The timestamp and offset of the entry's first record at or after `ts`.
fn first_at_or_after(entry: &Entry, ts: i64) -> Option<(i64, i64)> {
    let base = i64::try_from(entry.first_index?).ok()?;
    entry.messages.iter().enumerate().find_map(|(i, m)| {
        let t = i64::try_from(m.event_time_ms.unwrap_or(entry.publish_time_ms)).ok()?;
        (t >= ts).then_some((t, base + i as i64))
    })
}
