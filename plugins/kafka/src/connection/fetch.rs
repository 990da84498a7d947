//! Fetch v4+ (docs/kafka.md section 1.2): per partition, a reader of whole entries kept by
//! the connection across Fetch requests, each entry one record batch whose offsets are the
//! entry's indexes (`first-index .. first-index + n`).
//!
//! - **Positioning.** A Fetch at the offset where the partition's reader stands continues
//!   it (the common case: no host call). Any other offset drops the reader and opens a new
//!   one: `indexed.bounds` gives the log start (first index) and the high watermark (last
//!   index + 1); an offset outside `[log start, high watermark]` is `OFFSET_OUT_OF_RANGE`;
//!   the high watermark starts after the last entry, the log start at the earliest,
//!   anything else at the entry `indexed.locate` finds, or at the earliest when it finds
//!   none (the entries below the offset are then read and skipped: the sparse index and
//!   the bisection by time of section 1.2 are not there yet).
//! - **Long polling.** The response goes out once the buffered batches reach `min_bytes`,
//!   or `max_wait_ms` after the request (a timer), or at once if a partition has an error.
//! - **Sizes.** Batches are added while they fit `partition_max_bytes` and `max_bytes`,
//!   except that the first batch of the response always goes (KIP-74), so a batch larger
//!   than the limits cannot stall a consumer.
//! - A batch that starts before the fetch offset is sent whole (Kafka does the same; clients
//!   skip records below their offset). Entries stored without an index (before the
//!   backend's index interceptor was on) have no offset and are skipped.
//! - `read_committed` reads as `read_uncommitted`: there are no transactions.
//! - **Fetch v0-3** (KIP-35's down-conversion, as Kafka does for clients that predate
//!   KIP-98): the batches go out as uncompressed message sets, magic 0 for v0-1 and magic 1
//!   (with timestamps) for v2-3, without the records below the fetch offset and without
//!   headers (these formats have none); `codec::legacy` writes the old response.
//! - The reader's window is [`WINDOW_ENTRIES`] entries: an entry is acked once sent (or
//!   skipped), so a consumer that stops fetching holds at most that many in memory.

use std::collections::{HashMap, VecDeque};

use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
use kafka_protocol::messages::{BrokerId, FetchRequest, FetchResponse, RequestHeader, TopicName};
use kafka_protocol::protocol::StrBytes;
use magnetar_sdk::outbox::Outbox;
use magnetar_sdk::{Action, Bounds, Entry, MessageIdAt, OpError, Position, ReaderSpec, SubId};

use super::topics::partition_topic;
use super::{error, op_error_code, Job, JobEvent, KafkaConnection, Op};
use crate::codec::message_set;
use crate::codec::records::{self, Batch};
use crate::message::{self, Message};

/// Entries a reader holds before some are acked.
pub const WINDOW_ENTRIES: u32 = 16;

/// A reader's identity in host operations: Kafka topic, partition, and the generation of
/// the reader (a reader replaced by another ignores the completions of the old one).
pub type Tag = (String, i32, u64);

/// One batch received and not sent yet.
struct Cached {
    /// One past the offset of its last record.
    next: i64,
    bytes: Vec<u8>,
    delivery_id: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Bounding,
    Locating,
    Opening,
    Open,
    Failed(i16),
}

/// One partition's reader.
struct Reader {
    generation: u64,
    /// The backend topic.
    topic: String,
    state: State,
    sub: Option<SubId>,
    /// The offset a Fetch continues this reader at.
    next_offset: i64,
    high_watermark: i64,
    log_start: i64,
    buffered: VecDeque<Cached>,
}

/// The connection's readers, by Kafka topic and partition.
#[derive(Default)]
pub struct Readers {
    map: HashMap<(String, i32), Reader>,
    by_sub: HashMap<SubId, (String, i32)>,
    generation: u64,
}

impl Readers {
    fn remove(&mut self, key: &(String, i32), out: &mut Outbox) {
        if let Some(r) = self.map.remove(key) {
            if let Some(sub) = r.sub {
                self.by_sub.remove(&sub);
                out.push(Action::Unsubscribe { sub, delete: false });
            }
        }
    }

    /// Closes the readers of a deleted topic.
    pub fn forget_topic(&mut self, topic: &str, out: &mut Outbox) {
        let keys: Vec<_> = self.map.keys().filter(|k| k.0 == topic).cloned().collect();
        for k in keys {
            self.remove(&k, out);
        }
    }

    /// The reader of `tag`, if it is still that generation.
    fn get(&mut self, tag: &Tag) -> Option<&mut Reader> {
        self.map
            .get_mut(&(tag.0.clone(), tag.1))
            .filter(|r| r.generation == tag.2)
    }
}

/// A partition of a Fetch: partition, fetch offset, partition max bytes, and an error
/// found before reading.
type FetchPart = (i32, i64, usize, Option<i16>);

/// A Fetch request being served.
pub struct FetchJob {
    max_wait_ms: u64,
    min_bytes: usize,
    max_bytes: usize,
    read_committed: bool,
    /// Per topic: name and partitions.
    topics: Vec<(String, Vec<FetchPart>)>,
    stage: Stage,
    timer: Option<u64>,
    /// `max_wait_ms` passed (or was 0).
    timed_out: bool,
    /// The message-set magic of Fetch v0-3's answer.
    down_convert: Option<i8>,
}

#[derive(PartialEq, Eq)]
enum Stage {
    Start,
    Describing,
    Waiting,
}

impl KafkaConnection {
    pub(super) fn start_fetch(&mut self, version: i16, r: FetchRequest) -> Job {
        let topics = r
            .topics
            .into_iter()
            .map(|t| {
                let parts = t
                    .partitions
                    .into_iter()
                    .map(|p| {
                        (
                            p.partition,
                            p.fetch_offset,
                            usize::try_from(p.partition_max_bytes).unwrap_or(0),
                            None,
                        )
                    })
                    .collect();
                (t.topic.0.to_string(), parts)
            })
            .collect();
        Job::Fetch(FetchJob {
            max_wait_ms: u64::try_from(r.max_wait_ms).unwrap_or(0),
            min_bytes: usize::try_from(r.min_bytes).unwrap_or(0),
            max_bytes: usize::try_from(r.max_bytes).unwrap_or(0),
            read_committed: r.isolation_level == 1,
            topics,
            stage: Stage::Start,
            timer: None,
            timed_out: false,
            down_convert: match version {
                0 | 1 => Some(0),
                2 | 3 => Some(1),
                _ => None,
            },
        })
    }

    pub(super) fn step_fetch(
        &mut self,
        header: &RequestHeader,
        j: &mut FetchJob,
        inbox: Vec<JobEvent>,
    ) -> Result<bool, String> {
        for e in inbox {
            match e {
                JobEvent::Described(_) => {
                    j.stage = Stage::Waiting;
                    self.position_all(j);
                }
                JobEvent::Timer(token) if j.timer == Some(token) => j.timed_out = true,
                _ => {}
            }
        }
        if j.stage == Stage::Start {
            if self.described(j.topics.iter().map(|t| t.0.as_str())) {
                j.stage = Stage::Waiting;
                self.position_all(j);
            } else {
                j.stage = Stage::Describing;
            }
            if j.max_wait_ms > 0 {
                let token = self.ops.token();
                j.timer = Some(token);
                self.out.push(Action::SetTimer {
                    token,
                    delay_ms: j.max_wait_ms,
                });
            } else {
                j.timed_out = true;
            }
        }
        if j.stage == Stage::Describing && !j.timed_out {
            return Ok(false);
        }
        // Ready: an error to report, enough bytes, or the wait is over (once every reader
        // that can be positioned is).
        let mut positioned = true;
        let mut failed = false;
        let mut available = 0usize;
        for (name, parts) in &j.topics {
            for &(p, offset, _, err) in parts {
                if err.is_some() {
                    failed = true;
                    continue;
                }
                match self.readers.map.get(&(name.clone(), p)) {
                    Some(r) => match r.state {
                        State::Failed(_) => failed = true,
                        State::Open => {
                            available += r
                                .buffered
                                .iter()
                                .filter(|c| c.next > offset)
                                .map(|c| c.bytes.len())
                                .sum::<usize>()
                        }
                        _ => positioned = false,
                    },
                    None => positioned = false,
                }
            }
        }
        let enough = available > 0 && available >= j.min_bytes;
        // Positioning is not waiting for data: a Fetch with no wait still waits for it,
        // unless a real `max_wait_ms` passed first (then the partitions not positioned
        // yet answer no records).
        let waited = j.timed_out && (positioned || j.timer.is_some());
        if !(failed || enough || waited || (j.min_bytes == 0 && positioned)) {
            return Ok(false);
        }
        let response = self.fetch_response(j);
        self.respond(header, &response)?;
        Ok(true)
    }

    /// Makes sure each partition of the request has a reader at its fetch offset.
    fn position_all(&mut self, j: &mut FetchJob) {
        for (name, parts) in j.topics.iter_mut() {
            let partitions = self.topics.get(self.now_ms, name);
            for (p, offset, _, err) in parts.iter_mut() {
                let Some(topic) = partitions.and_then(|n| partition_topic(name, n, *p)) else {
                    *err = Some(error::UNKNOWN_TOPIC_OR_PARTITION);
                    continue;
                };
                let key = (name.clone(), *p);
                let keep = self.readers.map.get(&key).is_some_and(|r| {
                    r.next_offset == *offset && !matches!(r.state, State::Failed(_))
                });
                if keep {
                    continue;
                }
                self.readers.remove(&key, &mut self.out);
                self.readers.generation += 1;
                let generation = self.readers.generation;
                self.readers.map.insert(
                    key.clone(),
                    Reader {
                        generation,
                        topic: topic.clone(),
                        state: State::Bounding,
                        sub: None,
                        next_offset: *offset,
                        high_watermark: -1,
                        log_start: -1,
                        buffered: VecDeque::new(),
                    },
                );
                let token = self.ops.start(Op::ReaderBounds((key.0, key.1, generation)));
                self.out.push(Action::Bounds { token, topic });
            }
        }
    }

    /// A reader's `bounds`: out of range, or where to open it.
    pub(super) fn reader_bounds(&mut self, tag: Tag, result: Result<Bounds, OpError>) {
        let Some(r) = self.readers.get(&tag) else {
            return;
        };
        let bounds = match result {
            Ok(b) => b,
            Err(e) => {
                r.state = State::Failed(op_error_code(&e));
                return;
            }
        };
        let to_i64 = |i: u64| i64::try_from(i).unwrap_or(i64::MAX);
        r.log_start = bounds.first.as_ref().map_or(0, |f| to_i64(f.index));
        r.high_watermark = bounds
            .last
            .as_ref()
            .map_or(0, |l| to_i64(l.index).saturating_add(1));
        let offset = r.next_offset;
        let start = if offset < r.log_start || offset > r.high_watermark {
            r.state = State::Failed(error::OFFSET_OUT_OF_RANGE);
            return;
        } else if offset == r.high_watermark {
            match bounds.last {
                Some(last) => Position::MessageId(MessageIdAt {
                    id: last.id,
                    inclusive: false,
                }),
                None => Position::Earliest,
            }
        } else if offset == r.log_start {
            Position::Earliest
        } else {
            r.state = State::Locating;
            let topic = r.topic.clone();
            let token = self.ops.start(Op::ReaderLocate(tag));
            self.out.push(Action::Locate {
                token,
                topic,
                index: u64::try_from(offset).unwrap_or(0),
            });
            return;
        };
        self.open_reader(tag, start);
    }

    /// A reader's `locate`: open at the entry found, else at the earliest.
    pub(super) fn reader_located(&mut self, tag: Tag, result: Result<Option<Vec<u8>>, OpError>) {
        if self.readers.get(&tag).is_none() {
            return;
        }
        let start = match result {
            Ok(Some(id)) => Position::MessageId(MessageIdAt {
                id,
                inclusive: true,
            }),
            _ => Position::Earliest,
        };
        self.open_reader(tag, start);
    }

    fn open_reader(&mut self, tag: Tag, start: Position) {
        let Some(r) = self.readers.get(&tag) else {
            return;
        };
        r.state = State::Opening;
        let spec = ReaderSpec {
            topic: r.topic.clone(),
            start,
            max_unacked_entries: WINDOW_ENTRIES,
        };
        let token = self.ops.start(Op::ReaderOpen(tag));
        self.out.push(Action::OpenReader { token, spec });
    }

    pub(super) fn reader_opened(&mut self, tag: Tag, result: Result<SubId, OpError>) {
        let key = (tag.0.clone(), tag.1);
        let Some(r) = self.readers.get(&tag) else {
            // Replaced meanwhile: the new reader is not this one.
            if let Ok(sub) = result {
                self.out.push(Action::Unsubscribe { sub, delete: false });
            }
            return;
        };
        match result {
            Ok(sub) => {
                r.state = State::Open;
                r.sub = Some(sub);
                self.readers.by_sub.insert(sub, key);
            }
            Err(e) => r.state = State::Failed(op_error_code(&e)),
        }
    }

    /// An entry of one of the readers: one batch, buffered until a Fetch takes it.
    pub(super) fn reader_entry(&mut self, entry: Entry) {
        let Some(key) = self.readers.by_sub.get(&entry.reader).cloned() else {
            return;
        };
        let Some(r) = self.readers.map.get_mut(&key) else {
            return;
        };
        let sub = entry.reader;
        let delivery_id = entry.delivery_id;
        let Some(encoded) = encode_entry(entry) else {
            // No index, or nothing in it: no offset to give it.
            self.out.ack(sub, delivery_id);
            return;
        };
        r.high_watermark = r.high_watermark.max(encoded.next);
        if encoded.next <= r.next_offset {
            // Below the fetch offset: read on the way to it.
            self.out.ack(sub, delivery_id);
            return;
        }
        r.buffered.push_back(Cached {
            delivery_id,
            ..encoded
        });
    }

    /// The response: batches from each partition's buffer, within the size limits.
    fn fetch_response(&mut self, j: &FetchJob) -> FetchResponse {
        let mut total = 0usize;
        let mut responses = Vec::new();
        for (name, parts) in &j.topics {
            let mut partitions = Vec::new();
            for &(p, fetch_offset, part_max, err) in parts {
                let mut data = PartitionData::default()
                    .with_partition_index(p)
                    .with_high_watermark(-1)
                    .with_last_stable_offset(-1)
                    .with_log_start_offset(-1)
                    .with_preferred_read_replica(BrokerId(-1))
                    .with_aborted_transactions(j.read_committed.then(Vec::new));
                let key = (name.clone(), p);
                if let Some(code) = err {
                    partitions.push(data.with_error_code(code));
                    continue;
                }
                let Some(r) = self.readers.map.get_mut(&key) else {
                    partitions.push(data);
                    continue;
                };
                data = data
                    .with_high_watermark(r.high_watermark)
                    .with_last_stable_offset(r.high_watermark)
                    .with_log_start_offset(r.log_start);
                if let State::Failed(code) = r.state {
                    partitions.push(data.with_error_code(code));
                    self.readers.remove(&key, &mut self.out);
                    continue;
                }
                let mut bytes = Vec::new();
                while let Some(c) = r.buffered.front() {
                    let first = total == 0 && bytes.is_empty();
                    let fits = bytes.len() + c.bytes.len() <= part_max
                        && total + c.bytes.len() <= j.max_bytes;
                    if !(first || fits) {
                        break;
                    }
                    let Some(c) = r.buffered.pop_front() else {
                        break;
                    };
                    total += c.bytes.len();
                    bytes.extend_from_slice(&c.bytes);
                    r.next_offset = r.next_offset.max(c.next);
                    if let Some(sub) = r.sub {
                        self.out.ack(sub, c.delivery_id);
                    }
                }
                if let Some(magic) = j.down_convert {
                    match down_convert(bytes, magic, fetch_offset, self.config.record_limits()) {
                        Ok(set) => bytes = set,
                        Err(_) => {
                            partitions.push(data.with_error_code(error::UNKNOWN_SERVER_ERROR));
                            continue;
                        }
                    }
                }
                partitions.push(data.with_records(Some(bytes.into())));
            }
            responses.push(
                FetchableTopicResponse::default()
                    .with_topic(TopicName(StrBytes::from_string(name.clone())))
                    .with_partitions(partitions),
            );
        }
        FetchResponse::default().with_responses(responses)
    }
}

/// Record batches (a reader's, so uncompressed) as one message set of `magic`, from the
/// record at `from` on.
fn down_convert(
    batches: Vec<u8>,
    magic: i8,
    from: i64,
    limits: records::Limits,
) -> Result<Vec<u8>, records::RecordsError> {
    let mut out = Vec::with_capacity(batches.len());
    for batch in records::decode_batches(batches.into(), limits)? {
        let from_offset = batch.records.iter().position(|r| r.offset >= from);
        if let Some(first) = from_offset {
            message_set::encode(magic, &batch.records[first..], &mut out)?;
        }
    }
    Ok(out)
}

/// An entry as one uncompressed record batch (`delivery_id` left 0), if it has an index
/// and messages.
fn encode_entry(entry: Entry) -> Option<Cached> {
    let base = i64::try_from(entry.first_index?).ok()?;
    let count = i64::try_from(entry.messages.len()).ok()?;
    if count == 0 {
        return None;
    }
    let publish = entry.publish_time_ms;
    let records = entry
        .messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            message::to_record(
                Message {
                    key: m.key,
                    value: m.value,
                    properties: m.properties.into_iter().map(|p| (p.key, p.value)).collect(),
                    event_time_ms: m.event_time_ms,
                },
                base + i as i64,
                publish,
            )
        })
        .collect();
    let mut bytes = Vec::new();
    records::encode_batch(&Batch::plain(base, records), &mut bytes).ok()?;
    Some(Cached {
        next: base + count,
        bytes,
        delivery_id: 0,
    })
}
