//! A topic: one actor task owning the topic's log, subscriptions and cursors.
//!
//! Connections talk to it through a bounded channel of [`TopicCommand`]s (a full channel
//! pauses the sending connection: that is the producer backpressure). Disk work runs as
//! group commits on blocking threads: each appends every pending message with a single
//! fsync, answers their senders right there (straight into each connection's writer), and,
//! at most every `CURSOR_SAVE_INTERVAL`, saves changed cursors. Entries are dispatched only
//! once their commit is back. So a receipt always means "on disk", and a consumer never sees
//! an entry that a crash could take back.
//!
//! Group commit does not wait to fill: an idle topic appends, syncs and answers a message
//! at once. While a commit runs, the actor goes on taking commands and starts the next group
//! with what arrived meanwhile: its write overlaps the running fsync, its own fsync follows
//! (see `log`'s `write`/`finish`), so a send waits for little more than one fsync. Two
//! commits at most are in flight (`MAX_UNSYNCED_WRITES`); past `MAX_GROUP_COMMIT_BYTES`
//! pending the actor stops reading its channel. A [`Baton`] passed from each commit to the
//! next keeps log order, receipt order and cursor saves in sequence; after a failed commit
//! the later one in flight fails too, and no new one starts until both are back.
//!
//! Entries are stored in the format of [`crate::entry`]; the actor assigns each its
//! broker timestamp and its continuous message index. Recent entries are kept in a small
//! in-memory cache so that consumers following the tail do not read the disk.
//!
//! De-duplication (when enabled) is [`crate::dedup`]; its state is rebuilt on open from its
//! latest snapshot (saved with cursors, every `dedup::SNAPSHOT_ENTRIES` entries or so) and
//! the entries after it.
//!
//! Retention (when configured): closed log segments whose entries every subscription has
//! acknowledged are deleted once the acknowledged data exceeds the size limit or is older
//! than the time limit (Pulsar's retention policy, applied per segment as Pulsar applies it
//! per ledger). Unacknowledged data is never deleted. Without limits, data is kept forever.
//!
//! Producer names are unique per topic while connected (`ProducerBusy` otherwise), so two
//! producers never interleave one sequence. Producer access modes (`CommandProducer.
//! producer_access_mode`, [`AccessMode`]), as Pulsar:
//! - Exclusive is refused while other producers are connected, and refuses every other
//!   producer while it is (`ProducerBusy`).
//! - WaitForExclusive gets the topic at once if nobody produces, else it queues (its
//!   `CommandProducerSuccess` says `producer_ready: false`) and gets the topic, first come
//!   first served, when the last producer leaves (a second `CommandProducerSuccess`, ready).
//! - ExclusiveWithFencing gets the topic at once: the producers connected are fenced (told
//!   with `CommandCloseProducer`; their sends and their reconnection fail with
//!   `ProducerFenced`).
//! A send from a producer that is not (or no longer) attached is refused.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use pulsar::message::proto::{
    base_command::Type,
    command_subscribe::{InitialPosition, SubType},
    CommandCloseConsumer, CommandCloseProducer, KeySharedMeta, KeySharedMode, MessageIdData,
    Schema, ServerError,
};
use tokio::sync::{mpsc, oneshot};
use tokio::task::{JoinError, JoinHandle};

use crate::connection::ReceiptSink;
use crate::cursor::{Cursor, CursorStore};
use crate::dedup::{self, Dedup, Verdict};
use crate::entry::{self, NewEntry};
use crate::log::{CachedPages, Log, RecordParts, MAX_UNSYNCED_WRITES};
use crate::naming::{self, TopicName};
use crate::protocol::{self, Frame};
use crate::schema::{self, SchemaStore};
use crate::subscription::{
    Consumer, ConsumerKey, ConsumerStats, DispatchOutcome, FailoverSlot, StoredEntry, Subscription,
};

/// Capacity of a topic's command channel.
pub const COMMAND_QUEUE: usize = 1024;
/// Most bytes of messages gathered into one group commit. Small enough that one group's
/// write and the previous group's fsync take about as long and overlap (8 MiB measured
/// slower: see README, "Broker").
const MAX_GROUP_COMMIT_BYTES: usize = 2 * 1024 * 1024;
/// Recent entries kept in memory for tailing consumers.
const CACHE_BYTES: usize = 32 * 1024 * 1024;
/// Most subscriptions per topic (subscription names come from clients).
const MAX_SUBSCRIPTIONS: usize = 10_000;
/// How long acks may wait before the cursors they moved are saved. Saving the topic's moved
/// cursors costs an fdatasync of its cursor journal; saving after every ack would cap a
/// subscription at a few thousand acks per second.
/// A crash loses at most this much of ack progress, so a few acked messages may be delivered
/// again (as in Pulsar, whose mark-delete position is also persisted lazily); an unacked
/// message is never lost.
const CURSOR_SAVE_INTERVAL: Duration = Duration::from_millis(50);
/// How often a topic with retention limits looks for segments to delete.
const RETENTION_INTERVAL: Duration = Duration::from_secs(1);
/// How soon a dispatch that hit a full connection queue is retried.
const RETRY_BLOCKED: Duration = Duration::from_millis(2);

/// How much acknowledged data a topic keeps (Pulsar's retention policy); no limit at all
/// keeps everything.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    /// Keep at most this many bytes of acknowledged data.
    pub max_bytes: Option<u64>,
    /// Keep acknowledged data at most this long.
    pub max_age: Option<Duration>,
}

impl Retention {
    fn is_limited(&self) -> bool {
        self.max_bytes.is_some() || self.max_age.is_some()
    }
}

/// How topics store and keep data (from `BrokerConfig`).
#[derive(Debug, Clone, Copy)]
pub struct TopicSettings {
    pub deduplication: bool,
    pub segment_bytes: u64,
    pub retention: Retention,
    /// Failover subscriptions: the takeover delay, in milliseconds.
    pub failover_delay_ms: u64,
}

/// An error answered to a client request: the protocol's error code and a message.
pub type RequestError = (ServerError, String);

/// Pulsar's `ProducerAccessMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessMode {
    Shared,
    Exclusive,
    WaitForExclusive,
    ExclusiveWithFencing,
}

impl AccessMode {
    /// From `CommandProducer.producer_access_mode` (absent: Shared; unknown: Exclusive, the
    /// strictest that needs no support from the client).
    pub fn from_wire(mode: Option<i32>) -> AccessMode {
        match mode.unwrap_or(0) {
            0 => AccessMode::Shared,
            2 => AccessMode::WaitForExclusive,
            3 => AccessMode::ExclusiveWithFencing,
            _ => AccessMode::Exclusive,
        }
    }
}

/// A producer's attachment: ready with its last persisted sequence id (-1 if none or
/// de-duplication is off), or queued for exclusive access (the id follows when it has it).
#[derive(Debug)]
pub enum Attached {
    Ready(i64),
    Queued(oneshot::Receiver<i64>),
}

/// An attached producer's id on its connection and that connection's frame queue.
pub type ProducerConnection = (u64, mpsc::Sender<Frame>);

/// What a connection asks of a topic.
pub enum TopicCommand {
    /// Store a message; the reply carries its entry id once it is durable (`None`: a
    /// duplicate whose original is durable).
    Publish {
        producer: Arc<str>,
        /// Sequence ids of the first and last message of the entry.
        sequence_ids: (u64, u64),
        entry: Box<NewEntry>,
        reply: ReceiptSink,
    },
    /// A producer named `name` attaches.
    AddProducer {
        name: Arc<str>,
        mode: AccessMode,
        /// The producer's id on its connection was seen before: a client retrying or
        /// reconnecting it (fine if still attached; `ProducerFenced` if it was fenced).
        again: bool,
        /// The producer's id and its connection's frame queue (fencing closes it there).
        connection: ProducerConnection,
        reply: oneshot::Sender<Result<Attached, RequestError>>,
    },
    RemoveProducer {
        name: Arc<str>,
    },
    Subscribe {
        request: SubscribeRequest,
        reply: oneshot::Sender<Result<(), RequestError>>,
    },
    Flow {
        key: ConsumerKey,
        permits: u32,
    },
    Ack {
        key: ConsumerKey,
        ids: Vec<u64>,
        /// Batch-index acks: entry and the bits of its messages still unacknowledged.
        partial: Vec<(u64, Vec<i64>)>,
        cumulative: bool,
    },
    Redeliver {
        key: ConsumerKey,
        ids: Option<Vec<u64>>,
        epoch: Option<u64>,
    },
    /// `CommandGetSchema`: the schema of a version (wire bytes), or the latest; the reply
    /// carries the version's wire bytes and the schema.
    GetSchema {
        version: Option<Vec<u8>>,
        reply: oneshot::Sender<Result<(Vec<u8>, Schema), RequestError>>,
    },
    /// `CommandGetOrCreateSchema` (and a producer's schema): the version's wire bytes.
    GetOrCreateSchema {
        schema: Schema,
        reply: oneshot::Sender<Result<Vec<u8>, RequestError>>,
    },
    /// `CommandSeek`: reset the consumer's subscription.
    Seek {
        key: ConsumerKey,
        target: SeekTarget,
        reply: oneshot::Sender<Result<(), RequestError>>,
    },
    CloseConsumer {
        key: ConsumerKey,
    },
    Unsubscribe {
        key: ConsumerKey,
        reply: oneshot::Sender<Result<(), RequestError>>,
    },
    GetLastMessageId {
        key: ConsumerKey,
        reply: oneshot::Sender<LastMessageId>,
    },
    /// A consumer's counters and its subscription's backlog (`None`: not attached here).
    ConsumerStats {
        key: ConsumerKey,
        reply: oneshot::Sender<Option<(ConsumerStats, u64)>>,
    },
    /// Counters for the admin API.
    Stats {
        reply: oneshot::Sender<TopicStats>,
    },
    /// Flush everything and stop.
    Shutdown {
        reply: oneshot::Sender<()>,
    },
    /// Close every producer and consumer (`CommandCloseProducer`, `CommandCloseConsumer`:
    /// their clients reconnect, to the topic opened again), then flush and stop (the admin
    /// API's unload).
    Unload {
        reply: oneshot::Sender<()>,
    },
}

/// A topic's statistics (admin API `.../stats`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct TopicStats {
    /// Entries in the log.
    pub entries: u64,
    /// Messages ever stored (batches count each message).
    pub messages: u64,
    pub storage_bytes: u64,
    pub producers: Vec<String>,
    pub subscriptions: Vec<SubscriptionStats>,
}

/// One subscription in [`TopicStats`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct SubscriptionStats {
    pub name: String,
    pub sub_type: String,
    pub durable: bool,
    /// Entries not yet acknowledged.
    pub backlog: u64,
    /// The names of its consumers (`CommandSubscribe.consumer_name`), in the order they joined.
    pub consumers: Vec<String>,
}

/// Where a seek goes.
pub enum SeekTarget {
    /// To this message id (its entry is the next delivered).
    MessageId(MessageIdData),
    /// To the first entry published after this time (ms since the epoch), as Pulsar.
    PublishTime(u64),
}

/// Answer to `CommandGetLastMessageId`.
pub struct LastMessageId {
    /// Last entry id and, for a batch, its last batch index; `None` for an empty topic.
    pub last: Option<(u64, Option<i32>)>,
    /// The consumer's subscription mark-delete position, if any.
    pub mark_delete: Option<u64>,
}

/// A `CommandSubscribe`, validated.
pub struct SubscribeRequest {
    pub key: ConsumerKey,
    pub subscription: String,
    pub sub_type: SubType,
    pub durable: bool,
    pub initial_position: InitialPosition,
    pub start_message_id: Option<MessageIdData>,
    pub tx: mpsc::Sender<Frame>,
    /// `CommandSubscribe.consumer_epoch`.
    pub epoch: Option<u64>,
    /// The client wants broker-entry metadata with each message.
    pub entry_metadata: bool,
    pub consumer_name: String,
    pub priority: i32,
    /// `CommandSubscribe.key_shared_meta` (Key_Shared mode, Sticky ranges, out-of-order).
    pub key_shared: Option<KeySharedMeta>,
}

/// Cheap handle to a running topic.
#[derive(Clone)]
pub struct TopicHandle {
    pub tx: mpsc::Sender<TopicCommand>,
}

/// A send waiting for the next group commit.
enum PendingPublish {
    /// A message to store.
    Store {
        record: entry::Record,
        entry: Arc<StoredEntry>,
        /// Producer name and highest sequence id, when de-duplicating.
        sequence: Option<(Arc<str>, i64)>,
        reply: ReceiptSink,
    },
    /// A send answered without storing (a duplicate), in turn with the sends before it, so
    /// that its producer's receipts stay in sequence order.
    Answer {
        result: Result<Option<u64>, RequestError>,
        reply: ReceiptSink,
    },
}

impl PendingPublish {
    /// Messages this send stores (a batch counts each).
    fn messages(&self) -> u64 {
        match self {
            PendingPublish::Store { entry, .. } => entry.num_messages(),
            PendingPublish::Answer { .. } => 0,
        }
    }
}

/// A stored message, back from the group commit for the cache and de-duplication.
struct Committed {
    entry: Arc<StoredEntry>,
    sequence: Option<(Arc<str>, i64)>,
}

/// A group commit's first entry id and stored messages, or the error every sender was told.
type Appended = Result<(u64, Vec<Committed>), String>;

/// What a group commit's blocking task returns.
struct CommitOutcome {
    append: Appended,
    /// The subscriptions whose cursors could not be saved, if the save failed.
    saved: Result<(), (Vec<String>, std::io::Error)>,
    /// Message index of the group's first message (freed again if the append failed).
    start_index: u64,
    /// The topic's failure count when the commit started (see `Topic::committed`).
    generation: u64,
}

/// How a group commit follows the one started before it: its records are written after
/// that one's (`written`), and it appends them, answers and saves cursors only after that
/// one has (`finished`: whether it succeeded; a closed channel counts as a failure).
struct Baton {
    written: std::sync::mpsc::Receiver<()>,
    finished: std::sync::mpsc::Receiver<bool>,
}

/// The sending ends of a commit's [`Baton`].
struct BatonTx {
    written: std::sync::mpsc::SyncSender<()>,
    finished: std::sync::mpsc::SyncSender<bool>,
}

fn baton() -> (BatonTx, Baton) {
    let (written_tx, written) = std::sync::mpsc::sync_channel(1);
    let (finished_tx, finished) = std::sync::mpsc::sync_channel(1);
    (
        BatonTx {
            written: written_tx,
            finished: finished_tx,
        },
        Baton { written, finished },
    )
}

/// Why the actor woke up.
enum Wake {
    Command(TopicCommand),
    /// Every handle is gone.
    Closed,
    Committed(Result<CommitOutcome, JoinError>),
    Timer,
}

/// Recent entries, contiguous ids, bounded by bytes.
#[derive(Default)]
struct EntryCache {
    entries: VecDeque<(u64, Arc<StoredEntry>)>,
    bytes: usize,
}

impl EntryCache {
    fn push(&mut self, id: u64, entry: Arc<StoredEntry>) {
        self.bytes += entry.size();
        self.entries.push_back((id, entry));
        while self.bytes > CACHE_BYTES {
            match self.entries.pop_front() {
                Some((_, e)) => self.bytes -= e.size(),
                None => break,
            }
        }
    }

    fn get(&self, id: u64) -> Option<Arc<StoredEntry>> {
        let (first, _) = self.entries.front()?;
        let index = usize::try_from(id.checked_sub(*first)?).ok()?;
        self.entries.get(index).map(|(_, e)| e.clone())
    }
}

/// The actor state.
pub struct Topic {
    name: TopicName,
    log: Arc<Mutex<Log>>,
    cursors: Arc<CursorStore>,
    next_id: u64,
    /// The entry after the last one whose receipt went out. The storage task answers producers
    /// before this actor takes the commit in (`committed`, which moves `next_id`), so a
    /// subscription created in between starts here, not at `next_id`: as in Pulsar, "latest"
    /// never includes a message whose send was already confirmed.
    answered_end: Arc<AtomicU64>,
    /// Messages stored so far (= index of the next message).
    next_index: u64,
    /// Broker timestamp of the last entry (kept monotonic).
    last_timestamp: u64,
    dedup: Option<Dedup>,
    /// The first entry id the latest de-duplication snapshot does not cover.
    dedup_snapshot_end: u64,
    /// Where the topic's files are.
    dir: PathBuf,
    /// The attached producers, by name.
    producers: HashMap<Arc<str>, ProducerConnection>,
    /// The attached producer with an exclusive access mode, if any.
    exclusive_producer: Option<Arc<str>>,
    /// WaitForExclusive producers queued for the topic, first come first served.
    waiting_producers: VecDeque<(Arc<str>, ProducerConnection, oneshot::Sender<i64>)>,
    schemas: SchemaStore,
    subscriptions: HashMap<String, Subscription>,
    consumers: HashMap<ConsumerKey, String>,
    cache: EntryCache,
    pending: Vec<PendingPublish>,
    pending_bytes: usize,
    /// The group commits in flight, oldest first (at most `MAX_UNSYNCED_WRITES`).
    storing: VecDeque<Storing>,
    /// The baton of the newest commit in `storing`, for the next one.
    baton: Option<Baton>,
    /// Commits that failed so far; a commit's outcome from an older count is already
    /// accounted for.
    generation: u64,
    /// A commit failed: start none until those in flight are back.
    draining: bool,
    last_cursor_save: tokio::time::Instant,
    /// When a delayed entry falls due (the actor wakes up to dispatch it).
    next_due: Option<tokio::time::Instant>,
    settings: TopicSettings,
    last_retention: tokio::time::Instant,
    /// Tests: the next group commit's task panics between its write and its fsync.
    #[cfg(test)]
    panic_next_commit: bool,
}

/// A group commit in flight: its task, and what the topic needs to roll its messages back
/// when the task dies without an outcome.
struct Storing {
    task: JoinHandle<CommitOutcome>,
    /// Message index of the group's first message.
    start_index: u64,
    /// The topic's failure count when the commit started.
    generation: u64,
}

/// Opens a topic's storage (blocking: run it off the async threads).
pub fn open(
    name: TopicName,
    dir: PathBuf,
    settings: TopicSettings,
) -> Result<Topic, crate::log::LogError> {
    let log = Log::open_with(&dir, settings.segment_bytes)?;
    let cursors = CursorStore::new(&dir);
    let schemas = SchemaStore::load(&dir);
    let next_id = log.next_entry_id();
    let read = |id: u64| {
        log.read(id)
            .ok()
            .and_then(|r| entry::decode(Bytes::from(r)))
    };
    // The index continues from the last entry's (a record from before the entry header
    // existed has none: count entries then).
    let (next_index, last_timestamp) = match next_id.checked_sub(1).map(|id| (id, read(id))) {
        None => (0, 0),
        Some((
            _,
            Some(StoredEntry {
                broker: Some(b), ..
            }),
        )) => (
            b.index.unwrap_or(0).saturating_add(1),
            b.broker_timestamp.unwrap_or(0),
        ),
        Some((id, e)) => {
            tracing::warn!(topic = %name, entry = id, readable = e.is_some(), "last entry has no index; continuing from the entry count");
            (next_id, 0)
        }
    };
    // Reads the entries after the snapshot (all of them without one), the cost of
    // de-duplication at open. A snapshot past the log's end is not trusted.
    let snapshot = settings
        .deduplication
        .then(|| dedup::Snapshot::load(&dir))
        .flatten()
        .filter(|s| s.end <= next_id);
    let dedup_snapshot_end = snapshot.as_ref().map_or(0, |s| s.end);
    let dedup = settings.deduplication.then(|| {
        let from = dedup_snapshot_end.max(log.first_entry_id());
        Dedup::recover(snapshot, (from..next_id).filter_map(read))
    });
    let mut subscriptions = HashMap::new();
    let slot = FailoverSlot::of(&name);
    for (sub, cursor) in cursors.load_all()? {
        subscriptions.insert(
            sub.clone(),
            Subscription::new(sub, true, SubType::Exclusive, cursor)
                .with_failover(settings.failover_delay_ms, slot),
        );
    }
    Ok(Topic {
        name,
        log: Arc::new(Mutex::new(log)),
        cursors: Arc::new(cursors),
        next_id,
        answered_end: Arc::new(AtomicU64::new(next_id)),
        next_index,
        last_timestamp,
        dedup,
        dedup_snapshot_end,
        dir,
        producers: HashMap::new(),
        exclusive_producer: None,
        waiting_producers: VecDeque::new(),
        schemas,
        subscriptions,
        consumers: HashMap::new(),
        cache: EntryCache::default(),
        pending: Vec::new(),
        pending_bytes: 0,
        storing: VecDeque::new(),
        baton: None,
        generation: 0,
        draining: false,
        last_cursor_save: tokio::time::Instant::now(),
        next_due: None,
        settings,
        last_retention: tokio::time::Instant::now(),
        #[cfg(test)]
        panic_next_commit: false,
    })
}

impl Topic {
    /// Runs the actor until [`TopicCommand::Shutdown`] or until every handle is dropped.
    pub async fn run(mut self, mut rx: mpsc::Receiver<TopicCommand>) {
        let mut blocked = false;
        let mut shutdown = None;
        let mut closed = false;
        loop {
            let stopping = closed || shutdown.is_some();
            let taking = !stopping && self.pending_bytes < MAX_GROUP_COMMIT_BYTES;
            let save_due = self.can_start_commit() && self.has_dirty_cursor();
            let wake = tokio::select! {
                cmd = rx.recv(), if taking => cmd.map_or(Wake::Closed, Wake::Command),
                done = join_front(&mut self.storing) => Wake::Committed(done),
                () = tokio::time::sleep(RETRY_BLOCKED), if blocked => Wake::Timer,
                () = sleep_until_opt(self.next_due), if self.next_due.is_some() => Wake::Timer,
                () = tokio::time::sleep_until(self.last_retention + RETENTION_INTERVAL), if self.settings.retention.is_limited() => Wake::Timer,
                () = tokio::time::sleep_until(self.last_cursor_save + CURSOR_SAVE_INTERVAL), if save_due => Wake::Timer,
            };
            match wake {
                Wake::Command(cmd) => {
                    self.handle(cmd, &mut shutdown).await;
                    while shutdown.is_none() && self.pending_bytes < MAX_GROUP_COMMIT_BYTES {
                        match rx.try_recv() {
                            Ok(cmd) => self.handle(cmd, &mut shutdown).await,
                            Err(_) => break,
                        }
                    }
                }
                Wake::Closed => closed = true,
                Wake::Committed(done) => {
                    if let Some(started) = self.storing.pop_front() {
                        self.committed(done, &started);
                    }
                }
                Wake::Timer => {}
            }
            let stopping = closed || shutdown.is_some();
            if self.storing.is_empty() {
                self.draining = false;
                self.baton = None;
            }
            if self.can_start_commit() {
                if let Some(task) = self.start_commit(stopping) {
                    self.storing.push_back(task);
                }
            }
            blocked = self.dispatch();
            if self.settings.retention.is_limited()
                && self.last_retention.elapsed() >= RETENTION_INTERVAL
            {
                self.last_retention = tokio::time::Instant::now();
                self.enforce_retention().await;
            }
            // Stopped once the last commit (with every cursor) is back.
            if stopping && self.storing.is_empty() {
                if let Some(reply) = shutdown {
                    let _ = reply.send(());
                }
                return;
            }
        }
    }

    /// `TopicCommand::AddProducer`, by access mode (see the module docs).
    fn add_producer(
        &mut self,
        name: Arc<str>,
        mode: AccessMode,
        again: bool,
        connection: ProducerConnection,
    ) -> Result<Attached, RequestError> {
        let last = |t: &Topic| t.dedup.as_ref().map_or(-1, |d| d.last_persisted(&name));
        if again && self.producers.contains_key(&name) {
            return Ok(Attached::Ready(last(self)));
        }
        let busy = |why: String| Err((ServerError::ProducerBusy, why));
        if self.producers.contains_key(&name)
            || self.waiting_producers.iter().any(|(n, ..)| *n == name)
        {
            return busy(format!(
                "producer {name} is already connected to {}",
                self.name
            ));
        }
        if let (true, Some(owner)) = (again, &self.exclusive_producer) {
            return Err((
                ServerError::ProducerFenced,
                format!("{} has the exclusive producer {owner}", self.name),
            ));
        }
        match mode {
            AccessMode::Shared | AccessMode::Exclusive => {
                if let Some(owner) = &self.exclusive_producer {
                    return busy(format!("{} has the exclusive producer {owner}", self.name));
                }
                if mode == AccessMode::Exclusive && !self.producers.is_empty() {
                    return busy(format!("{} has other producers", self.name));
                }
            }
            AccessMode::WaitForExclusive => {
                if !self.producers.is_empty() || !self.waiting_producers.is_empty() {
                    let (tx, rx) = oneshot::channel();
                    self.waiting_producers.push_back((name, connection, tx));
                    return Ok(Attached::Queued(rx));
                }
            }
            AccessMode::ExclusiveWithFencing => self.fence_producers(),
        }
        if mode != AccessMode::Shared {
            self.exclusive_producer = Some(name.clone());
        }
        self.producers.insert(name.clone(), connection);
        Ok(Attached::Ready(last(self)))
    }

    /// Detaches every producer and consumer and tells their clients (unload).
    fn close_all(&mut self) {
        tracing::info!(topic = %self.name, "unloading");
        self.fence_producers();
        self.waiting_producers.clear();
        for sub in self.subscriptions.values_mut() {
            for c in sub.take_consumers() {
                self.consumers.remove(&c.key);
                send_close_consumer(&c);
            }
        }
    }

    /// Detaches every producer and tells each client with `CommandCloseProducer`.
    fn fence_producers(&mut self) {
        for (name, (producer_id, tx)) in self.producers.drain() {
            tracing::info!(topic = %self.name, producer = %name, "producer fenced");
            let frame: Frame = protocol::command(Type::CloseProducer, |r| {
                r.close_producer = Some(CommandCloseProducer {
                    producer_id,
                    // -1: not an answer to any request of the client.
                    request_id: u64::MAX,
                })
            })
            .into();
            send_unasked(&tx, frame);
        }
        self.exclusive_producer = None;
    }

    /// Once no producer is attached, the first queued WaitForExclusive producer whose client
    /// still waits gets the topic.
    fn admit_waiting_producer(&mut self) {
        while self.producers.is_empty() {
            let Some((name, connection, ready)) = self.waiting_producers.pop_front() else {
                return;
            };
            let last = self.dedup.as_ref().map_or(-1, |d| d.last_persisted(&name));
            if ready.send(last).is_ok() {
                self.exclusive_producer = Some(name.clone());
                self.producers.insert(name, connection);
            }
        }
    }

    fn can_start_commit(&self) -> bool {
        self.storing.len() < MAX_UNSYNCED_WRITES && !self.draining
    }

    fn has_dirty_cursor(&self) -> bool {
        self.subscriptions.values().any(|s| s.dirty)
    }

    async fn handle(&mut self, cmd: TopicCommand, shutdown: &mut Option<oneshot::Sender<()>>) {
        match cmd {
            TopicCommand::Publish {
                producer,
                sequence_ids,
                entry,
                reply,
            } => self.publish(producer, sequence_ids, *entry, reply),
            TopicCommand::AddProducer {
                name,
                mode,
                again,
                connection,
                reply,
            } => {
                let result = self.add_producer(name, mode, again, connection);
                let _ = reply.send(result);
            }
            TopicCommand::RemoveProducer { name } => {
                self.producers.remove(&name);
                self.waiting_producers
                    .retain(|(waiting, ..)| *waiting != name);
                if self.exclusive_producer.as_ref() == Some(&name) {
                    self.exclusive_producer = None;
                }
                self.admit_waiting_producer();
            }
            TopicCommand::GetSchema { version, reply } => {
                let wanted = match version.as_deref().map(schema::parse_version) {
                    Some(None) => None,
                    Some(Some(v)) => Some(Some(v)),
                    None => Some(None),
                };
                let found = wanted
                    .and_then(|v| self.schemas.get(v))
                    .map(|(v, s)| (schema::version_bytes(v), s.clone()))
                    .ok_or((ServerError::TopicNotFound, "no such schema".to_string()));
                let _ = reply.send(found);
            }
            TopicCommand::GetOrCreateSchema { schema, reply } => {
                // Rare (once per new schema), so its small blocking write runs inline.
                let result = self
                    .schemas
                    .get_or_create(schema)
                    .map(schema::version_bytes)
                    .map_err(|e| (ServerError::IncompatibleSchema, e.to_string()));
                let _ = reply.send(result);
            }
            TopicCommand::Seek { key, target, reply } => {
                let _ = reply.send(self.seek(key, target));
            }
            TopicCommand::Subscribe { request, reply } => {
                let result = self.subscribe(request).await;
                let _ = reply.send(result);
            }
            TopicCommand::Flow { key, permits } => {
                if let Some(sub) = self.subscription_of(key) {
                    sub.flow(key, permits);
                }
            }
            TopicCommand::Ack {
                key,
                ids,
                partial,
                cumulative,
            } => {
                let end = self.next_id;
                if let Some(sub) = self.subscription_of(key) {
                    let ids: Vec<u64> = ids.into_iter().filter(|id| *id < end).collect();
                    sub.ack(&ids, cumulative);
                    for (id, set) in partial.iter().filter(|(id, _)| *id < end) {
                        sub.ack_batch_indexes(*id, set);
                    }
                }
            }
            TopicCommand::Redeliver { key, ids, epoch } => {
                if let Some(sub) = self.subscription_of(key) {
                    sub.redeliver(key, ids.as_deref(), epoch);
                }
            }
            TopicCommand::CloseConsumer { key } => self.close_consumer(key),
            TopicCommand::Unsubscribe { key, reply } => {
                let result = self.unsubscribe(key).await;
                let _ = reply.send(result);
            }
            TopicCommand::GetLastMessageId { key, reply } => {
                // As for "latest": a message whose receipt went out counts, even before its
                // commit is taken in here (a reader asking right after a send must find it;
                // the entry is in the log by then).
                let end = self.stored_end();
                let last = end.checked_sub(1).map(|id| {
                    // A batch's last message is the last message id (Pulsar returns its
                    // batch index, so that readers see the whole batch as available).
                    let batch = self
                        .read_entry(id)
                        .and_then(|e| e.metadata.num_messages_in_batch)
                        .map(|n| n.saturating_sub(1));
                    (id, batch)
                });
                let mark_delete = self
                    .subscription_of(key)
                    .and_then(|s| s.cursor.ack_floor().checked_sub(1));
                let _ = reply.send(LastMessageId { last, mark_delete });
            }
            TopicCommand::ConsumerStats { key, reply } => {
                // Counts what a producer was told is stored, also before its commit is taken
                // in here (a count right after a confirm must find the message).
                let end = self.stored_end();
                let stats = self.subscription_of(key).and_then(|s| {
                    let backlog = s.cursor.unacked_below(end);
                    s.consumer_stats(key).map(|c| (c, backlog))
                });
                let _ = reply.send(stats);
            }
            TopicCommand::Stats { reply } => {
                let _ = reply.send(self.stats());
            }
            TopicCommand::Shutdown { reply } => *shutdown = Some(reply),
            TopicCommand::Unload { reply } => {
                self.close_all();
                *shutdown = Some(reply);
            }
        }
    }

    fn stats(&self) -> TopicStats {
        let storage_bytes = self.log.lock().map(|l| l.size_bytes()).unwrap_or(0);
        let mut subscriptions: Vec<SubscriptionStats> = self
            .subscriptions
            .values()
            .map(|s| SubscriptionStats {
                name: s.name.clone(),
                sub_type: format!("{:?}", s.sub_type),
                durable: s.durable,
                backlog: s.cursor.unacked_below(self.stored_end()),
                consumers: s.consumer_names(),
            })
            .collect();
        subscriptions.sort_by(|a, b| a.name.cmp(&b.name));
        let mut producers: Vec<String> = self.producers.keys().map(|p| p.to_string()).collect();
        producers.sort();
        TopicStats {
            entries: self.next_id,
            messages: self.next_index,
            storage_bytes,
            producers,
            subscriptions,
        }
    }

    /// Accepts a message into the next group commit, unless it is a duplicate.
    fn publish(
        &mut self,
        producer: Arc<str>,
        (lowest, highest): (u64, u64),
        entry: NewEntry,
        reply: ReceiptSink,
    ) {
        if !self.producers.contains_key(&producer) {
            let why = format!("producer {producer} is not attached to {}", self.name);
            return reply.send(Err((ServerError::ProducerFenced, why)));
        }
        // Sequence ids are Java longs on the wire.
        let (lowest, highest) = (lowest as i64, (highest as i64).max(lowest as i64));
        let verdict = match &mut self.dedup {
            Some(dedup) => dedup.check(producer, lowest, highest),
            None => Verdict::Store(None),
        };
        let result = match verdict {
            Verdict::Store(sequence) => Ok(sequence),
            Verdict::Duplicate => Err(Ok(None)),
            Verdict::InFlight => Err(Err((
                ServerError::PersistenceError,
                "duplicate of a message not yet persisted".to_string(),
            ))),
        };
        let sequence = match result {
            Ok(sequence) => sequence,
            // Nothing of this producer's is awaiting a receipt: answer at once.
            Err(result) if self.pending.is_empty() && self.storing.is_empty() => {
                return reply.send(result)
            }
            Err(result) => {
                self.pending.push(PendingPublish::Answer { result, reply });
                return;
            }
        };
        let messages =
            u64::try_from(entry.metadata.num_messages_in_batch.unwrap_or(1).max(1)).unwrap_or(1);
        let index = self.next_index + messages - 1;
        self.next_index += messages;
        self.last_timestamp = self.last_timestamp.max(now_ms());
        let (record, entry) = entry.seal(self.last_timestamp, index);
        self.pending_bytes += record.size();
        self.pending.push(PendingPublish::Store {
            record,
            entry: Arc::new(entry),
            sequence,
            reply,
        });
    }

    /// `CommandSeek`: resets the consumer's subscription and detaches its consumers, who
    /// resubscribe (told by `CommandCloseConsumer`, as Pulsar does).
    fn seek(&mut self, key: ConsumerKey, target: SeekTarget) -> Result<(), RequestError> {
        let position = match target {
            SeekTarget::MessageId(id) => position_of(&id, true, self.next_id).max(self.first_id()),
            SeekTarget::PublishTime(t) => self.first_stored_at_or_after(t),
        };
        let name = self.consumers.get(&key).cloned().ok_or((
            ServerError::ConsumerNotFound,
            "no such consumer".to_string(),
        ))?;
        let sub = self.subscriptions.get_mut(&name).ok_or((
            ServerError::ConsumerNotFound,
            "no such subscription".to_string(),
        ))?;
        for c in sub.reset(position) {
            self.consumers.remove(&c.key);
            send_close_consumer(&c);
        }
        tracing::debug!(topic = %self.name, subscription = %name, position, "subscription reset");
        Ok(())
    }

    /// First entry whose timestamp is at or after `t`, as Apache Pulsar seeks by time
    /// (`PersistentMessageFinder`): the timestamp is the broker's (broker-entry metadata)
    /// when the entry has it, else the producer's publish time (`Commands.getEntryTimestamp`).
    /// A binary search: broker timestamps follow the log order (the topic actor stamps them).
    fn first_stored_at_or_after(&self, t: u64) -> u64 {
        let (mut lo, mut hi) = (self.first_id(), self.next_id);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.read_entry(mid) {
                Some(e) if entry_timestamp(&e) >= t => hi = mid,
                _ => lo = mid + 1,
            }
        }
        lo
    }

    /// Oldest entry still stored (retention deletes from the front).
    fn first_id(&self) -> u64 {
        self.log.lock().map(|l| l.first_entry_id()).unwrap_or(0)
    }

    /// Deletes the oldest closed segments that every subscription has acknowledged, while
    /// the acknowledged data exceeds the retention limits (see the module docs).
    async fn enforce_retention(&mut self) {
        let limits = self.settings.retention;
        let floor = self
            .subscriptions
            .values()
            .map(|s| s.cursor.ack_floor())
            .min()
            .unwrap_or(self.next_id);
        let closed = self
            .log
            .lock()
            .map(|l| l.closed_segments())
            .unwrap_or_default();
        let consumed: Vec<(u64, u64, u64)> = closed
            .into_iter()
            .filter(|(_, end, _)| *end <= floor)
            .collect();
        let mut remaining: u64 = consumed.iter().map(|(_, _, bytes)| bytes).sum();
        let now = now_ms();
        let mut cut = None;
        for &(_, end, bytes) in &consumed {
            let too_big = limits.max_bytes.is_some_and(|max| remaining > max);
            let too_old = || {
                let age = limits.max_age?;
                let newest = self.read_entry(end.checked_sub(1)?)?;
                let time = newest.broker.as_ref()?.broker_timestamp?;
                Some(now.saturating_sub(time) > age.as_millis() as u64)
            };
            if !(too_big || too_old().unwrap_or(false)) {
                break;
            }
            cut = Some(end);
            remaining -= bytes;
        }
        let Some(end) = cut else { return };
        let log = self.log.clone();
        let removed = tokio::task::spawn_blocking(move || match log.lock() {
            Ok(mut log) => log.remove_segments_before(end).map_err(|e| e.to_string()),
            Err(_) => Err("log lock poisoned".to_string()),
        })
        .await;
        match removed {
            Ok(Ok(n)) => {
                tracing::debug!(topic = %self.name, segments = n, before = end, "retention deleted segments")
            }
            Ok(Err(e)) => {
                tracing::warn!(topic = %self.name, error = %e, "retention could not delete segments")
            }
            Err(e) => tracing::warn!(topic = %self.name, error = %e, "retention task failed"),
        }
    }

    /// Entry `id` from the cache or the log (`None` if it cannot be read).
    fn read_entry(&self, id: u64) -> Option<Arc<StoredEntry>> {
        read_entry(&self.cache, &self.log, &self.name, id)
    }

    fn subscription_of(&mut self, key: ConsumerKey) -> Option<&mut Subscription> {
        let name = self.consumers.get(&key)?;
        self.subscriptions.get_mut(name)
    }

    async fn subscribe(&mut self, req: SubscribeRequest) -> Result<(), RequestError> {
        naming::validate_subscription(&req.subscription)
            .map_err(|e| (ServerError::InvalidTopicName, e.to_string()))?;
        if let Some(existing) = self.consumers.get(&req.key) {
            return if *existing == req.subscription {
                Ok(()) // a retried subscribe
            } else {
                Err((
                    ServerError::ConsumerBusy,
                    "consumer id already in use on this connection".to_string(),
                ))
            };
        }
        if !self.subscriptions.contains_key(&req.subscription) {
            if self.subscriptions.len() >= MAX_SUBSCRIPTIONS {
                return Err((
                    ServerError::ServiceNotReady,
                    "too many subscriptions on this topic".to_string(),
                ));
            }
            let floor = self.start_position(&req);
            let cursor = Cursor::at(floor);
            if req.durable {
                let store = self.cursors.clone();
                let (name, saved) = (req.subscription.clone(), cursor.clone());
                run_blocking(move || store.save(&name, &saved))
                    .await
                    .map_err(|e| (ServerError::PersistenceError, e))?;
            }
            let sub =
                Subscription::new(req.subscription.clone(), req.durable, req.sub_type, cursor)
                    .with_failover(
                        self.settings.failover_delay_ms,
                        FailoverSlot::of(&self.name),
                    );
            self.subscriptions.insert(req.subscription.clone(), sub);
        }
        let sub = self.subscriptions.get_mut(&req.subscription).ok_or((
            ServerError::UnknownError,
            "subscription vanished".to_string(),
        ))?;
        let mut consumer = Consumer::new(req.key, req.tx, req.epoch, req.entry_metadata);
        consumer.name = req.consumer_name;
        consumer.priority = req.priority;
        if let Some(meta) = req.key_shared {
            if meta.key_shared_mode == KeySharedMode::Sticky as i32 {
                // Negative bounds become out-of-range ones, which the subscription refuses.
                let bound = |v: i32| u32::try_from(v).unwrap_or(u32::MAX);
                consumer.hash_ranges = meta
                    .hash_ranges
                    .iter()
                    .map(|r| (bound(r.start), bound(r.end)))
                    .collect();
                if consumer.hash_ranges.is_empty() {
                    return Err((
                        ServerError::ConsumerAssignError,
                        "a Sticky Key_Shared consumer needs hash ranges".to_string(),
                    ));
                }
            }
            consumer.out_of_order = meta.allow_out_of_order_delivery.unwrap_or(false);
        }
        sub.add_consumer(req.sub_type, consumer, now_ms())?;
        self.consumers.insert(req.key, req.subscription);
        tracing::debug!(topic = %self.name, consumer = ?req.key, "consumer subscribed");
        Ok(())
    }

    /// The end of what is stored: past every message whose receipt went out, also one whose
    /// commit the actor has not taken in yet (`next_id` moves then).
    fn stored_end(&self) -> u64 {
        self.next_id.max(self.answered_end.load(Ordering::Acquire))
    }

    /// Where a new subscription starts (its initial ack floor).
    fn start_position(&self, req: &SubscribeRequest) -> u64 {
        let latest = self.stored_end();
        if let (Some(id), false) = (&req.start_message_id, req.durable) {
            // As Pulsar: delivery starts at the start id's entry; the client drops it (or
            // the part of its batch before the id) unless it asked for an inclusive start.
            return position_of(id, true, latest).max(self.first_id());
        }
        match req.initial_position {
            InitialPosition::Earliest => self.first_id(),
            InitialPosition::Latest => latest,
        }
    }

    fn close_consumer(&mut self, key: ConsumerKey) {
        let Some(name) = self.consumers.remove(&key) else {
            return;
        };
        if let Some(sub) = self.subscriptions.get_mut(&name) {
            sub.remove_consumer(key, now_ms());
            if !sub.durable && !sub.has_consumers() {
                self.subscriptions.remove(&name);
            }
        }
    }

    async fn unsubscribe(&mut self, key: ConsumerKey) -> Result<(), RequestError> {
        let name = self.consumers.get(&key).cloned().ok_or((
            ServerError::ConsumerNotFound,
            "no such consumer".to_string(),
        ))?;
        let others = self
            .consumers
            .iter()
            .any(|(k, sub)| *k != key && *sub == name);
        if others {
            return Err((
                ServerError::ConsumerBusy,
                "other consumers are connected to this subscription".to_string(),
            ));
        }
        self.consumers.remove(&key);
        if let Some(sub) = self.subscriptions.remove(&name) {
            if sub.durable {
                let store = self.cursors.clone();
                run_blocking(move || store.delete(&name))
                    .await
                    .map_err(|e| (ServerError::PersistenceError, e))?;
            }
        }
        Ok(())
    }

    /// Starts a group commit (see the module docs) of all pending messages and, when `force`
    /// or when the save interval has passed, of the cursors that acks moved; `None` if there
    /// is nothing to do.
    fn start_commit(&mut self, force: bool) -> Option<Storing> {
        let save_cursors = force || self.last_cursor_save.elapsed() >= CURSOR_SAVE_INTERVAL;
        if self.pending.is_empty() && !(save_cursors && self.has_dirty_cursor()) {
            return None;
        }
        let pending = std::mem::take(&mut self.pending);
        self.pending_bytes = 0;
        let messages: u64 = pending.iter().map(PendingPublish::messages).sum();
        // The pending sends are the newest indexes given out.
        let start_index = self.next_index - messages;
        if save_cursors {
            self.last_cursor_save = tokio::time::Instant::now();
        }
        let dirty: Vec<(String, Cursor)> = self
            .subscriptions
            .values_mut()
            .filter(|s| save_cursors && s.dirty)
            .map(|s| {
                s.dirty = false;
                (s.name.clone(), s.cursor.clone())
            })
            .collect();
        // Only with cursors, so at most every `CURSOR_SAVE_INTERVAL`.
        let snapshot = match &self.dedup {
            Some(dedup)
                if save_cursors
                    && self.next_id >= self.dedup_snapshot_end + dedup::SNAPSHOT_ENTRIES =>
            {
                self.dedup_snapshot_end = self.next_id;
                Some((dedup.snapshot(self.next_id), self.dir.clone()))
            }
            _ => None,
        };
        let (log, cursors) = (self.log.clone(), self.cursors.clone());
        let answered_end = self.answered_end.clone();
        let (next, mine) = baton();
        // With nothing in flight, the newest baton is from a commit already back.
        let previous = self
            .baton
            .replace(mine)
            .filter(|_| !self.storing.is_empty());
        let generation = self.generation;
        #[cfg(test)]
        let panic_after_write = std::mem::take(&mut self.panic_next_commit);
        #[cfg(not(test))]
        let panic_after_write = false;
        let task = tokio::task::spawn_blocking(move || {
            let (append, cached) = append_and_answer(
                &log,
                pending,
                previous,
                &next.written,
                panic_after_write,
                &answered_end,
            );
            // One write and one fdatasync for every cursor that moved.
            let saved = match dirty.is_empty() {
                true => Ok(()),
                false => cursors
                    .save_all(&dirty)
                    .map_err(|e| (dirty.into_iter().map(|(name, _)| name).collect(), e)),
            };
            if let Some((snapshot, dir)) = snapshot {
                // Without it, opening reads more entries; nothing else is lost.
                if let Err(e) = snapshot.save(&dir) {
                    tracing::warn!(dir = %dir.display(), error = %e, "saving the de-duplication snapshot failed");
                }
            }
            let _ = next.finished.send(append.is_ok());
            // Off the way of this commit's receipts and of the next commit's.
            if let Some(cached) = cached {
                cached.drop_clean();
            }
            CommitOutcome {
                append,
                saved,
                start_index,
                generation,
            }
        });
        Some(Storing {
            task,
            start_index,
            generation,
        })
    }

    /// Takes in a finished group commit (`started`): caches its entries for dispatch, or, if
    /// it failed, fails the sends gathered since too (their indexes follow the failed ones,
    /// which are handed out again).
    fn committed(&mut self, done: Result<CommitOutcome, JoinError>, started: &Storing) {
        let outcome = match done {
            Ok(outcome) => outcome,
            Err(e) => {
                // Only a panic gets here; its senders were answered by their dropped sinks.
                // Its write was never finished: the log cuts it back, with any commit in flight
                // after it (whose outcome then fails as an earlier failure's), and takes writes
                // again. Its indexes are handed out again, as after a failed append.
                tracing::error!(topic = %self.name, error = %e, "storage task failed");
                let mut log = self.log.lock().unwrap_or_else(|poisoned| {
                    self.log.clear_poison();
                    poisoned.into_inner()
                });
                log.abandon_writes();
                drop(log);
                if started.generation == self.generation {
                    self.roll_back(started.start_index, format!("storage task failed: {e}"));
                }
                return;
            }
        };
        if let Err((subs, e)) = outcome.saved {
            tracing::error!(topic = %self.name, subscriptions = ?subs, error = %e, "saving cursors failed");
            for sub in subs {
                if let Some(s) = self.subscriptions.get_mut(&sub) {
                    s.dirty = true;
                }
            }
        }
        match outcome.append {
            Ok((first, committed)) => {
                for (i, c) in committed.into_iter().enumerate() {
                    if let (Some(dedup), Some((producer, highest))) = (&mut self.dedup, c.sequence)
                    {
                        dedup.persisted(producer, highest);
                    }
                    let id = first + i as u64;
                    self.cache.push(id, c.entry);
                    // Not the log's end: a later commit may be appended already, but its
                    // entries are dispatched when its own outcome is here.
                    self.next_id = id + 1;
                }
            }
            Err(e) if outcome.generation != self.generation => {
                // After a failure the later commit in flight fails too: already rolled back.
                tracing::debug!(topic = %self.name, error = %e, "append after a failed one failed");
            }
            Err(e) => {
                tracing::error!(topic = %self.name, error = %e, "append failed");
                self.roll_back(outcome.start_index, e);
            }
        }
    }

    /// A commit whose first message had index `start_index` failed: no commit starts until
    /// those in flight are back (they fail too), the sends gathered since fail with `error`,
    /// and the indexes from `start_index` on are handed out again (the index stays
    /// continuous: no stored message has one of them).
    fn roll_back(&mut self, start_index: u64, error: String) {
        self.generation += 1;
        self.draining = true;
        self.pending_bytes = 0;
        for p in std::mem::take(&mut self.pending) {
            match p {
                PendingPublish::Store { reply, .. } => {
                    reply.send(Err((ServerError::PersistenceError, error.clone())))
                }
                PendingPublish::Answer { result, reply } => reply.send(result),
            }
        }
        self.next_index = start_index;
        if let Some(dedup) = &mut self.dedup {
            dedup.forget_in_flight();
        }
    }

    /// Dispatches on every subscription; true if some connection queue was full.
    /// Also sets `next_due` to when the first delayed entry falls due.
    fn dispatch(&mut self) -> bool {
        let end = self.next_id;
        let now = now_ms();
        let (cache, log, name) = (&self.cache, &self.log, &self.name);
        let mut read = |id: u64| read_entry(cache, log, name, id);
        let mut blocked = false;
        let mut next_due: Option<u64> = None;
        for sub in self.subscriptions.values_mut() {
            if sub.has_consumers() {
                blocked |= sub.dispatch(end, now, &mut read) == DispatchOutcome::Blocked;
            }
            if let Some(due) = sub.next_due() {
                next_due = Some(next_due.map_or(due, |d| d.min(due)));
            }
        }
        self.next_due = next_due.map(|due| {
            tokio::time::Instant::now() + Duration::from_millis(due.saturating_sub(now))
        });
        blocked
    }
}

/// Milliseconds since the Unix epoch (Pulsar's timestamps).
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Appends the pending messages with one fsync, then answers every pending send in order
/// (runs on a blocking thread, so a receipt leaves as soon as the fsync returns). Writes
/// after the `previous` commit wrote, signals `written`, and appends and answers only after
/// the previous commit finished (failing if it failed). Returns the first entry id and the
/// stored messages, or the error every sender was told; and the appended records' pages,
/// for the caller to drop from the page cache once nothing waits for it.
fn append_and_answer(
    log: &Mutex<Log>,
    pending: Vec<PendingPublish>,
    previous: Option<Baton>,
    written: &std::sync::mpsc::SyncSender<()>,
    panic_after_write: bool,
    answered_end: &AtomicU64,
) -> (Appended, Option<CachedPages>) {
    let records: Vec<RecordParts> = pending
        .iter()
        .filter_map(|p| match p {
            PendingPublish::Store { record, .. } => Some(RecordParts {
                head: &record.header,
                body: &record.tail,
                body_crc: Some(record.tail_crc),
            }),
            PendingPublish::Answer { .. } => None,
        })
        .collect();
    // The fsync runs without the lock, so that the actor's reads and the next commit's
    // write go on meanwhile.
    let locked = || log.lock().map_err(|_| "log lock poisoned".to_string());
    if let Some(previous) = &previous {
        // A closed channel also means the previous commit is past its write.
        let _ = previous.written.recv();
    }
    let unsynced = if records.is_empty() {
        Ok(None)
    } else {
        locked().and_then(|mut l| l.write(&records).map(Some).map_err(|e| e.to_string()))
    };
    let _ = written.send(());
    // Tests stand in this way for a bug that kills the task before its fsync.
    assert!(!panic_after_write, "storage task failure (test)");
    let synced = match &unsynced {
        Ok(Some(u)) => u.sync(),
        _ => Ok(()),
    };
    // Answers go out after the previous commit's (each producer's receipts stay in order).
    let previous_ok = previous.is_none_or(|p| p.finished.recv().unwrap_or(false));
    let earlier_failed = "an earlier group commit failed";
    let mut cached = None;
    let append = match unsynced {
        Ok(Some(unsynced)) => {
            cached = Some(unsynced.cached());
            let synced = synced.and_then(|()| match previous_ok {
                true => Ok(()),
                false => Err(std::io::Error::other(earlier_failed)),
            });
            locked().and_then(|mut l| l.finish(unsynced, synced).map_err(|e| e.to_string()))
        }
        Ok(None) if previous_ok => Ok(0),
        Ok(None) => Err(earlier_failed.to_string()),
        Err(e) => Err(e),
    };
    drop(records);
    if let Ok(first) = &append {
        let stored = pending
            .iter()
            .filter(|p| matches!(p, PendingPublish::Store { .. }))
            .count() as u64;
        // Before the first receipt: whoever learns of a receipt finds the entry covered.
        answered_end.fetch_max(first + stored, Ordering::Release);
    }
    let mut committed = Vec::with_capacity(pending.len());
    for p in pending {
        match (p, &append) {
            (
                PendingPublish::Store {
                    entry,
                    sequence,
                    reply,
                    ..
                },
                Ok(first),
            ) => {
                reply.send(Ok(Some(first + committed.len() as u64)));
                committed.push(Committed { entry, sequence });
            }
            (PendingPublish::Store { reply, .. }, Err(e)) => {
                reply.send(Err((ServerError::PersistenceError, e.clone())));
            }
            (PendingPublish::Answer { result, reply }, _) => reply.send(result),
        }
    }
    let cached = cached.filter(|_| append.is_ok());
    (append.map(|first| (first, committed)), cached)
}

/// The oldest running commit's outcome; never ready without one.
async fn join_front(tasks: &mut VecDeque<Storing>) -> Result<CommitOutcome, JoinError> {
    match tasks.front_mut() {
        Some(started) => (&mut started.task).await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Entry `id` from the cache, else from the log (a checksum or decoding failure is logged
/// and the entry is not served).
/// An entry's timestamp for seeks by time: the broker's, else the publish time.
fn entry_timestamp(entry: &StoredEntry) -> u64 {
    entry
        .broker
        .as_ref()
        .and_then(|b| b.broker_timestamp)
        .unwrap_or(entry.metadata.publish_time)
}

fn read_entry(
    cache: &EntryCache,
    log: &Mutex<Log>,
    name: &TopicName,
    id: u64,
) -> Option<Arc<StoredEntry>> {
    if let Some(e) = cache.get(id) {
        return Some(e);
    }
    let bytes = match log.lock() {
        Ok(log) => log.read(id),
        Err(_) => return None,
    };
    match bytes.map(|b| entry::decode(Bytes::from(b))) {
        Ok(Some(entry)) => Some(Arc::new(entry)),
        Ok(None) => {
            tracing::error!(topic = %name, entry = id, "undecodable entry; not served");
            None
        }
        Err(e) => {
            tracing::error!(topic = %name, entry = id, error = %e, "unreadable entry; not served");
            None
        }
    }
}

/// The entry position a client's message id names, given the log's end: -1:-1 (earliest)
/// is 0, an id at or past `i64::MAX` (latest) is the end; otherwise the id's entry if
/// `inclusive`, else the one after it.
fn position_of(id: &MessageIdData, inclusive: bool, end: u64) -> u64 {
    if id.ledger_id == u64::MAX || id.entry_id == u64::MAX {
        return 0;
    }
    if id.ledger_id >= i64::MAX as u64 || id.entry_id >= i64::MAX as u64 {
        return end;
    }
    let start = if inclusive {
        id.entry_id
    } else {
        id.entry_id.saturating_add(1)
    };
    start.min(end)
}

async fn run_blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, String> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// Tells a detached consumer's client with `CommandCloseConsumer` (it subscribes again).
fn send_close_consumer(c: &Consumer) {
    let frame: Frame = protocol::command(Type::CloseConsumer, |r| {
        r.close_consumer = Some(CommandCloseConsumer {
            consumer_id: c.key.consumer_id,
            // -1: not an answer to any request of the client.
            request_id: u64::MAX,
        })
    })
    .into();
    send_unasked(&c.tx, frame);
}

/// Sends a frame the client did not ask for (a close) without waiting: when the connection's
/// queue is full, a task waits for room.
fn send_unasked(tx: &mpsc::Sender<Frame>, frame: Frame) {
    if let Err(mpsc::error::TrySendError::Full(frame)) = tx.try_send(frame) {
        let tx = tx.clone();
        tokio::spawn(async move { tx.send(frame).await });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pulsar::message::proto::MessageMetadata;

    fn open_topic(dir: &std::path::Path) -> Topic {
        open_with_dedup(dir, false)
    }

    fn open_with_dedup(dir: &std::path::Path, deduplication: bool) -> Topic {
        let settings = TopicSettings {
            deduplication,
            segment_bytes: 1 << 20,
            retention: Retention::default(),
            failover_delay_ms: 0,
        };
        let mut topic = open(TopicName::parse("t").unwrap(), dir.to_path_buf(), settings).unwrap();
        let (tx, _) = mpsc::channel(1);
        let attached = topic.add_producer("p".into(), AccessMode::Shared, false, (0, tx));
        assert!(matches!(attached, Ok(Attached::Ready(_))));
        topic
    }

    /// A send of a batch of `messages` (answered to nobody).
    fn send(topic: &mut Topic, messages: i32) {
        send_from(topic, 0, messages);
    }

    /// A send by producer `p` of a batch of `messages`, the first with sequence id `first`.
    fn send_from(topic: &mut Topic, first: u64, messages: i32) {
        let last = first + messages as u64 - 1;
        let metadata = MessageMetadata {
            producer_name: "p".into(),
            sequence_id: first,
            highest_sequence_id: Some(last),
            publish_time: 1,
            num_messages_in_batch: Some(messages),
            ..Default::default()
        };
        let entry = NewEntry::new(metadata, b"x");
        topic.publish("p".into(), (first, last), entry, ReceiptSink::detached());
    }

    /// Starts a group commit of the pending sends, as the actor does (saving cursors: and
    /// so a de-duplication snapshot when one is due).
    fn start(topic: &mut Topic) {
        let started = topic.start_commit(true).unwrap();
        topic.storing.push_back(started);
    }

    /// Takes in the oldest commit's outcome, as the actor does.
    async fn finish_oldest(topic: &mut Topic) {
        let done = join_front(&mut topic.storing).await;
        let started = topic.storing.pop_front().unwrap();
        topic.committed(done, &started);
        if topic.storing.is_empty() {
            topic.draining = false;
            topic.baton = None;
        }
    }

    /// The broker-entry index of each stored entry (its last message's), in log order.
    fn stored_indexes(topic: &Topic) -> Vec<u64> {
        let end = topic.log.lock().unwrap().next_entry_id();
        (0..end)
            .map(|id| {
                let entry = topic.read_entry(id).unwrap();
                entry.broker.as_ref().and_then(|b| b.index).unwrap()
            })
            .collect()
    }

    /// A non-durable subscription at Latest, as a client asks for one.
    fn latest_request() -> SubscribeRequest {
        let (tx, _) = mpsc::channel(1);
        SubscribeRequest {
            key: ConsumerKey {
                connection: 1,
                consumer_id: 1,
            },
            subscription: "s".into(),
            sub_type: SubType::Exclusive,
            durable: false,
            initial_position: InitialPosition::Latest,
            start_message_id: None,
            tx,
            epoch: None,
            entry_metadata: false,
            consumer_name: "c".into(),
            priority: 0,
            key_shared: None,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn latest_never_includes_a_message_whose_receipt_went_out() {
        let dir = tempfile::tempdir().unwrap();
        let mut topic = open_topic(dir.path());
        send(&mut topic, 1);
        start(&mut topic);
        // The storage task has answered the producer, and the actor has not yet taken the
        // commit in (it moves `next_id` then): a subscription made now starts after it.
        while !topic.storing.front().is_some_and(|s| s.task.is_finished()) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(topic.next_id, 0);
        assert_eq!(topic.start_position(&latest_request()), 1);
        // Nor does the last message id leave it out (a reader made right after the receipt
        // must find it).
        assert_eq!(last_message_id(&mut topic).await, Some((0, Some(0))));
        finish_oldest(&mut topic).await;
        assert_eq!(topic.start_position(&latest_request()), 1);
        assert_eq!(last_message_id(&mut topic).await, Some((0, Some(0))));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_subscriptions_backlog_counts_a_message_whose_receipt_went_out() {
        let dir = tempfile::tempdir().unwrap();
        let mut topic = open_topic(dir.path());
        topic.subscribe(latest_request()).await.unwrap();
        send(&mut topic, 1);
        start(&mut topic);
        while !topic.storing.front().is_some_and(|s| s.task.is_finished()) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(topic.next_id, 0, "the commit is not taken in yet");
        // A count right after the producer's receipt (AMQP's declare-ok or get-ok after a
        // confirm) finds the message.
        assert_eq!(backlog(&mut topic).await, Some(1));
        finish_oldest(&mut topic).await;
        assert_eq!(backlog(&mut topic).await, Some(1));
    }

    /// `ConsumerStats`' backlog of `latest_request`'s subscription.
    async fn backlog(topic: &mut Topic) -> Option<u64> {
        let (reply, answer) = oneshot::channel();
        let key = latest_request().key;
        topic
            .handle(TopicCommand::ConsumerStats { key, reply }, &mut None)
            .await;
        answer.await.unwrap().map(|(_, backlog)| backlog)
    }

    /// `GetLastMessageId`'s answer, as a client gets it.
    async fn last_message_id(topic: &mut Topic) -> Option<(u64, Option<i32>)> {
        let (reply, answer) = oneshot::channel();
        let key = latest_request().key;
        topic
            .handle(TopicCommand::GetLastMessageId { key, reply }, &mut None)
            .await;
        answer.await.unwrap().last
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_storage_task_that_dies_leaves_no_gap_in_the_message_index() {
        let dir = tempfile::tempdir().unwrap();
        let mut topic = open_topic(dir.path());
        send(&mut topic, 3); // messages 0..=2
        start(&mut topic);
        finish_oldest(&mut topic).await;
        // A commit (messages 3..=4) whose task dies between its write and its fsync, and one
        // in flight after it (5..=8): neither is stored, and both senders were told so.
        send(&mut topic, 2);
        topic.panic_next_commit = true;
        start(&mut topic);
        send(&mut topic, 4);
        start(&mut topic);
        // Sent while they are in flight (9): failed with them, as after a failed append.
        send(&mut topic, 1);
        finish_oldest(&mut topic).await;
        assert!(topic.pending.is_empty());
        finish_oldest(&mut topic).await;
        // The next message gets index 3: the index has no gap.
        send(&mut topic, 2);
        start(&mut topic);
        finish_oldest(&mut topic).await;
        assert_eq!(stored_indexes(&topic), vec![2, 4]);
        drop(topic);
        let mut topic = open_topic(dir.path());
        assert_eq!(stored_indexes(&topic), vec![2, 4]);
        send(&mut topic, 1);
        start(&mut topic);
        finish_oldest(&mut topic).await;
        assert_eq!(stored_indexes(&topic), vec![2, 4, 5]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn de_duplication_state_is_opened_from_its_snapshot_and_the_entries_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut topic = open_with_dedup(dir.path(), true);
        for seq in 0..dedup::SNAPSHOT_ENTRIES {
            send_from(&mut topic, seq, 1);
        }
        start(&mut topic);
        finish_oldest(&mut topic).await;
        assert_eq!(dedup::Snapshot::load(dir.path()), None);
        // The next commit saves the state of the first 1000 entries.
        send_from(&mut topic, 1000, 1);
        start(&mut topic);
        finish_oldest(&mut topic).await;
        let snapshot = dedup::Snapshot::load(dir.path()).unwrap();
        assert_eq!(snapshot.end, 1000);
        drop(topic);
        let topic = open_with_dedup(dir.path(), true);
        let last = |t: &Topic, p: &str| t.dedup.as_ref().unwrap().last_persisted(p);
        assert_eq!(last(&topic, "p"), 1000);
        drop(topic);
        // Opening reads only the entries after the snapshot: one that knows only producer
        // q and covers every entry shows q's state and nothing of p's.
        let mut other = Dedup::default();
        other.persisted("q".into(), 42);
        other.snapshot(1001).save(dir.path()).unwrap();
        let topic = open_with_dedup(dir.path(), true);
        assert_eq!((last(&topic, "p"), last(&topic, "q")), (-1, 42));
        drop(topic);
        // One that claims more entries than the log holds is not trusted: every entry is read.
        other.snapshot(1002).save(dir.path()).unwrap();
        let topic = open_with_dedup(dir.path(), true);
        assert_eq!((last(&topic, "p"), last(&topic, "q")), (1000, -1));
    }
}
