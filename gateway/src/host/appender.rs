//! Appends of indexed topics (`indexed.append`): one task per topic partition that stores
//! each append as one Pulsar entry and learns the entry's index by reading it back.
//!
//! The send receipt has no index (Pulsar's `CommandSendReceipt`), so the task keeps a *tail
//! reader* on its topic: a non-durable consumer opened at `latest` before the first append,
//! on a connection that asked for broker-entry metadata. An append is one batch (the
//! records, then `send_batch`: one `CommandSend`), and completes once the receipt names its
//! entry and the tail reader has delivered that entry with its index (docs/kafka.md 1.3).
//! Entries of other producers that the tail passes on the way are skipped. Appends to one
//! topic run one after another, in the order the plugins made them: a Kafka producer's
//! batches to a partition are stored in order.
//!
//! De-duplicated appends (`dedup-spec`: a producer name and the sequence id of the first
//! record) are checked as Kafka's broker checks an idempotent producer's batches
//! (`ProducerStateManager`): per topic and producer name the gateway keeps the next sequence
//! id it expects and the last [`RECENT_BATCHES`] batches stored; a batch that repeats one of
//! them is answered with the original entry and offsets (`duplicate`), one that starts
//! anywhere else fails with `out-of-order sequence` (docs/kafka.md 1.4). The state lives in
//! this gateway's memory, outliving the topic's task: a producer new to it (or after a
//! restart) is taken at whatever sequence it sends.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use pulsar::{Consumer, Producer, TokioExecutor};
use tokio::sync::mpsc;

use super::context::op_error;
use super::event::Event;
use crate::abi::types::{ErrorKind, OpError};
use crate::abi::v0_2::exports::magnetar::plugin::events2::{AppendResult, Appended};
use crate::backend::{Backend, OutMessage, SubscribeOptions};
use crate::message_id;

/// Appends queued per topic before `append` fails fast with `quota-exceeded`.
const QUEUE: usize = 1024;
/// How long a topic's task (its producer and tail reader) outlives its last append.
const LINGER: Duration = Duration::from_secs(30);
/// Longest wait for the tail reader to deliver an entry just stored.
const READ_BACK: Duration = Duration::from_secs(10);
/// Most payload bytes of one append: one entry, below the broker's largest message.
pub(super) const MAX_APPEND_BYTES: usize = 4 * 1024 * 1024;
/// Most records of one append.
pub(super) const MAX_APPEND_RECORDS: usize = 100_000;

/// An append's records, each with whether its key is base64 of raw bytes.
pub(super) type Records = Vec<(OutMessage, bool)>;

/// Batches per producer and topic whose offsets a repeated batch is answered with (Kafka's
/// `NUM_BATCHES_TO_RETAIN`).
const RECENT_BATCHES: usize = 5;
/// Producer names tracked per topic; past it the least recently used is forgotten.
const MAX_PRODUCERS_PER_TOPIC: usize = 10_000;
/// Sequence ids are Kafka's: 32-bit signed, the next after `i32::MAX` is 0.
const SEQUENCE_WRAP: u64 = 1 << 31;

/// What a de-duplicating producer asks for an append: its name and first sequence id.
#[derive(Debug, Clone)]
pub(super) struct DedupKey {
    pub(super) name: String,
    pub(super) first_sequence: u64,
}

/// One stored batch of a producer.
#[derive(Debug, Clone)]
struct StoredBatch {
    first_sequence: u64,
    last_sequence: u64,
    appended: Appended,
}

/// One producer's sequence state on one topic.
#[derive(Debug)]
struct ProducerState {
    next_sequence: u64,
    recent: std::collections::VecDeque<StoredBatch>,
    last_use: u64,
}

/// The de-duplication state of one topic: producer name → state.
#[derive(Debug, Default)]
pub(super) struct TopicDedup {
    producers: HashMap<String, ProducerState>,
    clock: u64,
}

/// What to do with a de-duplicated append.
#[derive(Debug)]
enum Verdict {
    Store,
    /// A batch stored before: answered with its original entry.
    Duplicate(Appended),
    /// Neither the next batch nor a recent one.
    OutOfOrder {
        expected: u64,
    },
}

/// The last sequence id of a batch of `count` records from `first`.
fn last_sequence(first: u64, count: u64) -> u64 {
    (first + count.saturating_sub(1)) % SEQUENCE_WRAP
}

impl TopicDedup {
    fn check(&mut self, key: &DedupKey, count: u64) -> Verdict {
        self.clock += 1;
        let Some(p) = self.producers.get_mut(&key.name) else {
            return Verdict::Store;
        };
        p.last_use = self.clock;
        if key.first_sequence == p.next_sequence {
            return Verdict::Store;
        }
        let last = last_sequence(key.first_sequence, count);
        match p
            .recent
            .iter()
            .find(|b| b.first_sequence == key.first_sequence && b.last_sequence == last)
        {
            Some(b) => Verdict::Duplicate(Appended {
                duplicate: true,
                ..b.appended.clone()
            }),
            None => Verdict::OutOfOrder {
                expected: p.next_sequence,
            },
        }
    }

    fn stored(&mut self, key: &DedupKey, count: u64, appended: &Appended) {
        if !self.producers.contains_key(&key.name)
            && self.producers.len() >= MAX_PRODUCERS_PER_TOPIC
        {
            if let Some(oldest) = self
                .producers
                .iter()
                .min_by_key(|(_, p)| p.last_use)
                .map(|(name, _)| name.clone())
            {
                self.producers.remove(&oldest);
            }
        }
        let last = last_sequence(key.first_sequence, count);
        let p = self
            .producers
            .entry(key.name.clone())
            .or_insert_with(|| ProducerState {
                next_sequence: 0,
                recent: Default::default(),
                last_use: 0,
            });
        p.next_sequence = (last + 1) % SEQUENCE_WRAP;
        p.last_use = self.clock;
        if p.recent.len() == RECENT_BATCHES {
            p.recent.pop_front();
        }
        p.recent.push_back(StoredBatch {
            first_sequence: key.first_sequence,
            last_sequence: last,
            appended: appended.clone(),
        });
    }
}

/// One append, checked and sealed.
pub(super) struct Job {
    pub(super) conn: u64,
    pub(super) token: u64,
    pub(super) messages: Records,
    /// De-duplication by producer name and sequence id.
    pub(super) dedup: Option<DedupKey>,
    /// Held back until then by a publish-rate quota.
    pub(super) not_before: Option<Instant>,
    pub(super) events: mpsc::Sender<Event>,
    /// The topic's de-duplication state, set by [`Appenders::append`] for de-duplicated jobs.
    pub(super) state: Option<Arc<Mutex<TopicDedup>>>,
}

/// The append tasks, by backend topic.
#[derive(Default)]
pub struct Appenders {
    tasks: Mutex<HashMap<String, mpsc::Sender<Job>>>,
    /// Per topic, kept when its task ends.
    dedup: Mutex<HashMap<String, Arc<Mutex<TopicDedup>>>>,
}

impl Appenders {
    /// Queues an append on its topic's task (started if none runs); the refusal if the
    /// topic has too many appends queued (the job is dropped).
    pub(super) fn append(
        &self,
        runtime: &tokio::runtime::Handle,
        backend: &Arc<Backend>,
        topic: &str,
        job: Job,
    ) -> Result<(), OpError> {
        let dedup = job.dedup.is_some().then(|| {
            self.dedup
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(topic.to_string())
                .or_default()
                .clone()
        });
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        let mut job = job;
        job.state = dedup;
        // A task that ended (idle) is replaced: at most one retry.
        for _ in 0..2 {
            let tx = tasks
                .entry(topic.to_string())
                .or_insert_with(|| {
                    let (tx, rx) = mpsc::channel(QUEUE);
                    runtime.spawn(run(topic.to_string(), backend.clone(), rx));
                    tx
                })
                .clone();
            match tx.try_send(job) {
                Ok(()) => return Ok(()),
                Err(mpsc::error::TrySendError::Full(_)) => {
                    return Err(op_error(
                        ErrorKind::QuotaExceeded,
                        "too many appends queued on this topic",
                    ))
                }
                Err(mpsc::error::TrySendError::Closed(j)) => {
                    tasks.remove(topic);
                    job = j;
                }
            }
        }
        Err(op_error(
            ErrorKind::Internal,
            "the topic's append task is gone",
        ))
    }
}

/// What a topic's task keeps between appends.
struct Tail {
    producer: Producer<TokioExecutor>,
    reader: Consumer<Vec<u8>, TokioExecutor>,
}

/// Runs the appends of one topic in order until none came for [`LINGER`].
async fn run(topic: String, backend: Arc<Backend>, mut jobs: mpsc::Receiver<Job>) {
    let mut tail: Option<Tail> = None;
    loop {
        let job = match tokio::time::timeout(LINGER, jobs.recv()).await {
            Ok(Some(job)) => job,
            Ok(None) | Err(_) => break,
        };
        if let Some(at) = job.not_before {
            tokio::time::sleep_until(at.into()).await;
        }
        let outcome = match (&job.dedup, &job.state) {
            (Some(key), Some(state)) => {
                let count = job.messages.len() as u64;
                let verdict = lock(state).check(key, count);
                match verdict {
                    Verdict::Store => {
                        let outcome = append(&topic, &backend, &mut tail, job.messages).await;
                        if let Ok(a) = &outcome {
                            lock(state).stored(key, count, a);
                        }
                        outcome
                    }
                    Verdict::Duplicate(original) => Ok(original),
                    Verdict::OutOfOrder { expected } => Err(op_error(
                        ErrorKind::InvalidName,
                        format!(
                            "out-of-order sequence: {} expected {expected}, got {}",
                            key.name, key.first_sequence
                        ),
                    )),
                }
            }
            _ => append(&topic, &backend, &mut tail, job.messages).await,
        };
        if outcome.is_err() {
            // Rebuilt by the next append: a broken producer or reader must not linger.
            if let Some(mut t) = tail.take() {
                let _ = t.producer.close().await;
                let _ = t.reader.close().await;
            }
        }
        let _ = job
            .events
            .send(Event::Appended {
                conn: job.conn,
                results: vec![AppendResult {
                    token: job.token,
                    outcome,
                }],
            })
            .await;
    }
    // Appends queued after the timeout are failed, not dropped.
    jobs.close();
    while let Ok(job) = jobs.try_recv() {
        let _ = job
            .events
            .send(Event::Appended {
                conn: job.conn,
                results: vec![AppendResult {
                    token: job.token,
                    outcome: Err(op_error(
                        ErrorKind::Backend,
                        "the topic's append task stopped; append again",
                    )),
                }],
            })
            .await;
    }
    if let Some(mut t) = tail {
        let _ = t.producer.close().await;
        let _ = t.reader.close().await;
    }
}

fn lock(state: &Mutex<TopicDedup>) -> std::sync::MutexGuard<'_, TopicDedup> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

fn backend_error(topic: &str, what: &str, e: impl std::fmt::Display) -> OpError {
    op_error(ErrorKind::Backend, format!("{what} on {topic}: {e}"))
}

/// Opens the tail reader (first: it must read from before the first append) and the
/// producer of a topic.
async fn open(topic: &str, backend: &Backend) -> Result<Tail, OpError> {
    // Whole entries: one delivery per append, not one per record (the index of an entry's
    // last record is on the entry).
    let reader = backend
        .subscribe_entries(&SubscribeOptions {
            topic: topic.to_string(),
            subscription: format!("magnetar-tail-{:016x}", rand::random::<u64>()),
            sub_type: pulsar::SubType::Exclusive,
            durable: false,
            earliest: false,
            receiver_queue: 1000,
            start_message_id: None,
            dead_letter: None,
            consumer_name: None,
        })
        .await
        .map_err(|e| backend_error(topic, "opening the tail reader", e))?;
    let producer = backend
        .client()
        .producer()
        .with_topic(topic)
        .with_options(pulsar::ProducerOptions {
            block_queue_if_full: true,
            // One batch per append, sealed by `send_batch` alone: the limits are above any
            // append's (`MAX_APPEND_RECORDS`, `MAX_APPEND_BYTES`), and no timer.
            batch_size: Some(u32::MAX),
            batch_byte_size: Some(2 * MAX_APPEND_BYTES),
            batch_timeout: None,
            ..Default::default()
        })
        .build()
        .await
        .map_err(|e| backend_error(topic, "opening the producer", e))?;
    Ok(Tail { producer, reader })
}

/// Stores `messages` as one entry and reads its index back.
async fn append(
    topic: &str,
    backend: &Backend,
    tail: &mut Option<Tail>,
    messages: Records,
) -> Result<Appended, OpError> {
    if tail.is_none() {
        *tail = Some(open(topic, backend).await?);
    }
    let Some(t) = tail.as_mut() else {
        return Err(op_error(ErrorKind::Internal, "no producer"));
    };
    let count = messages.len() as u64;
    let mut receipts = Vec::with_capacity(messages.len());
    for (m, key_b64) in messages {
        let message = pulsar::producer::Message {
            payload: m.payload,
            properties: m.properties,
            partition_key: m.key,
            partition_key_b64_encoded: key_b64.then_some(true),
            event_time: m.event_time,
            ..Default::default()
        };
        receipts.push(
            t.producer
                .send_non_blocking(message)
                .await
                .map_err(|e| backend_error(topic, "sending", e))?,
        );
    }
    t.producer
        .send_batch()
        .await
        .map_err(|e| backend_error(topic, "sending", e))?;
    let mut entry = None;
    for r in receipts {
        let receipt = r.await.map_err(|e| backend_error(topic, "storing", e))?;
        entry = entry.or(receipt.message_id);
    }
    let entry = entry.ok_or_else(|| backend_error(topic, "storing", "a receipt without an id"))?;
    let want = (entry.ledger_id, entry.entry_id);
    let deadline = tokio::time::Instant::now() + READ_BACK;
    loop {
        let msg = match tokio::time::timeout_at(deadline, t.reader.next()).await {
            Ok(Some(Ok(m))) => m,
            Ok(Some(Err(e))) => return Err(backend_error(topic, "reading back", e)),
            Ok(None) => return Err(backend_error(topic, "reading back", "the reader ended")),
            Err(_) => {
                return Err(backend_error(
                    topic,
                    "reading back",
                    "the stored entry did not come back in time",
                ))
            }
        };
        let id = &msg.message_id.id;
        if (id.ledger_id, id.entry_id) != want {
            continue;
        }
        let Some(index) = msg.payload.broker_entry.as_ref().and_then(|b| b.index) else {
            return Err(op_error(
                ErrorKind::Backend,
                format!("{topic}: the backend stores no index (broker-entry metadata is off)"),
            ));
        };
        let broker_time_ms = msg
            .payload
            .broker_entry
            .as_ref()
            .and_then(|b| b.broker_timestamp)
            .unwrap_or(msg.payload.metadata.publish_time);
        let id = pulsar::proto::MessageIdData {
            ledger_id: entry.ledger_id,
            entry_id: entry.entry_id,
            partition: entry.partition,
            ..Default::default()
        };
        return Ok(Appended {
            id: message_id::encode(&id),
            first_index: (index + 1).saturating_sub(count),
            broker_time_ms,
            duplicate: false,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn appended(first_index: u64) -> Appended {
        Appended {
            id: vec![first_index as u8],
            first_index,
            broker_time_ms: 7,
            duplicate: false,
        }
    }

    fn key(name: &str, first_sequence: u64) -> DedupKey {
        DedupKey {
            name: name.into(),
            first_sequence,
        }
    }

    #[test]
    fn batches_are_checked_as_kafka_checks_an_idempotent_producer() {
        let mut d = TopicDedup::default();
        // A producer new to the gateway is taken at any sequence.
        assert!(matches!(d.check(&key("p", 5), 3), Verdict::Store));
        d.stored(&key("p", 5), 3, &appended(100));
        assert!(matches!(d.check(&key("p", 8), 2), Verdict::Store));
        d.stored(&key("p", 8), 2, &appended(103));
        // A retry of either batch is answered with its original offsets.
        match d.check(&key("p", 5), 3) {
            Verdict::Duplicate(a) => assert_eq!((a.first_index, a.duplicate), (100, true)),
            v => panic!("{v:?}"),
        }
        assert!(matches!(d.check(&key("p", 8), 2), Verdict::Duplicate(_)));
        // A gap, or a batch that overlaps a stored one differently, is out of order.
        assert!(matches!(
            d.check(&key("p", 11), 1),
            Verdict::OutOfOrder { expected: 10 }
        ));
        assert!(matches!(
            d.check(&key("p", 5), 2),
            Verdict::OutOfOrder { expected: 10 }
        ));
        // Another producer name is independent.
        assert!(matches!(d.check(&key("q", 0), 1), Verdict::Store));
    }

    #[test]
    fn only_the_last_five_batches_are_answered_and_sequences_wrap() {
        let mut d = TopicDedup::default();
        for i in 0..6 {
            d.stored(&key("p", i), 1, &appended(i));
        }
        assert!(matches!(
            d.check(&key("p", 0), 1),
            Verdict::OutOfOrder { .. }
        ));
        assert!(matches!(d.check(&key("p", 1), 1), Verdict::Duplicate(_)));
        let top = SEQUENCE_WRAP - 2;
        d.stored(&key("w", top), 2, &appended(50));
        assert!(matches!(d.check(&key("w", 0), 4), Verdict::Store));
    }

    #[test]
    fn the_least_recently_used_producer_is_forgotten_past_the_bound() {
        let mut d = TopicDedup::default();
        for i in 0..MAX_PRODUCERS_PER_TOPIC {
            let k = key(&format!("p{i}"), 0);
            let _ = d.check(&k, 1);
            d.stored(&k, 1, &appended(i as u64));
        }
        // p0 used again: p1 is now the least recently used.
        assert!(matches!(d.check(&key("p0", 0), 1), Verdict::Duplicate(_)));
        d.stored(&key("new", 0), 1, &appended(1));
        assert_eq!(d.producers.len(), MAX_PRODUCERS_PER_TOPIC);
        assert!(d.producers.contains_key("p0"));
        assert!(!d.producers.contains_key("p1"));
    }
}
