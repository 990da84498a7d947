//! A topic: one actor task owning the topic's log, subscriptions and cursors.
//!
//! Connections talk to it through a bounded channel of [`TopicCommand`]s (a full channel
//! pauses the sending connection: that is the producer backpressure). Each turn of the actor
//! drains what is queued, then does all disk work in one blocking step: appends every pending
//! message with a single fsync (group commit) and, at most every `CURSOR_SAVE_INTERVAL`,
//! saves changed cursors; only then are send receipts released and entries dispatched. So a receipt always means "on disk", and a
//! consumer never sees an entry that a crash could take back.
//!
//! Stored entry format (inside a log record): `[u32 BE metadata length][MessageMetadata
//! protobuf][payload as sent]`. Recent entries are kept in a small in-memory cache so that
//! consumers following the tail do not read the disk.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::Message as _;
use pulsar::message::proto::{
    command_subscribe::{InitialPosition, SubType},
    MessageIdData, MessageMetadata, ServerError,
};
use pulsar::message::Message;
use tokio::sync::{mpsc, oneshot};

use crate::cursor::{Cursor, CursorStore};
use crate::log::Log;
use crate::naming::{self, TopicName};
use crate::subscription::{Consumer, ConsumerKey, DispatchOutcome, StoredEntry, Subscription};

/// Capacity of a topic's command channel.
pub const COMMAND_QUEUE: usize = 1024;
/// Most bytes of messages gathered into one group commit.
const MAX_GROUP_COMMIT_BYTES: usize = 8 * 1024 * 1024;
/// Recent entries kept in memory for tailing consumers.
const CACHE_BYTES: usize = 32 * 1024 * 1024;
/// Most subscriptions per topic (subscription names come from clients).
const MAX_SUBSCRIPTIONS: usize = 10_000;
/// How long acks may wait before the cursors they moved are saved. Saving a cursor costs two
/// fsyncs; saving after every ack would cap a subscription at a few thousand acks per second.
/// A crash loses at most this much of ack progress, so a few acked messages may be delivered
/// again (as in Pulsar, whose mark-delete position is also persisted lazily); an unacked
/// message is never lost.
const CURSOR_SAVE_INTERVAL: Duration = Duration::from_millis(50);
/// How soon a dispatch that hit a full connection queue is retried.
const RETRY_BLOCKED: Duration = Duration::from_millis(2);

/// An error answered to a client request: the protocol's error code and a message.
pub type RequestError = (ServerError, String);

/// What a connection asks of a topic.
pub enum TopicCommand {
    /// Store a message; the reply carries its entry id once it is durable.
    Publish {
        entry: Arc<StoredEntry>,
        reply: oneshot::Sender<Result<u64, RequestError>>,
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
        cumulative: bool,
    },
    Redeliver {
        key: ConsumerKey,
        ids: Option<Vec<u64>>,
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
    /// Flush everything and stop.
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

/// Answer to `CommandGetLastMessageId`.
pub struct LastMessageId {
    /// Last entry id, `None` for an empty topic.
    pub last: Option<u64>,
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
    pub tx: mpsc::Sender<Message>,
}

/// Cheap handle to a running topic.
#[derive(Clone)]
pub struct TopicHandle {
    pub tx: mpsc::Sender<TopicCommand>,
}

/// Encodes a message as a log entry.
pub fn encode_entry(metadata: &MessageMetadata, data: &[u8]) -> Vec<u8> {
    let meta_len = metadata.encoded_len();
    let mut buf = Vec::with_capacity(4 + meta_len + data.len());
    buf.extend_from_slice(&(meta_len as u32).to_be_bytes());
    // Encoding into a Vec cannot run out of space.
    let _ = metadata.encode(&mut buf);
    buf.extend_from_slice(data);
    buf
}

/// Decodes a log entry written by [`encode_entry`].
pub fn decode_entry(bytes: &[u8]) -> Option<StoredEntry> {
    let (len, rest) = bytes.split_at_checked(4)?;
    let mut word = [0u8; 4];
    word.copy_from_slice(len);
    let (meta, data) = rest.split_at_checked(u32::from_be_bytes(word) as usize)?;
    Some(StoredEntry {
        metadata: MessageMetadata::decode(meta).ok()?,
        data: data.to_vec(),
    })
}

struct PendingPublish {
    bytes: Vec<u8>,
    entry: Arc<StoredEntry>,
    reply: oneshot::Sender<Result<u64, RequestError>>,
}

/// Recent entries, contiguous ids, bounded by bytes.
#[derive(Default)]
struct EntryCache {
    entries: VecDeque<(u64, Arc<StoredEntry>)>,
    bytes: usize,
}

impl EntryCache {
    fn push(&mut self, id: u64, entry: Arc<StoredEntry>) {
        self.bytes += entry.data.len();
        self.entries.push_back((id, entry));
        while self.bytes > CACHE_BYTES {
            match self.entries.pop_front() {
                Some((_, e)) => self.bytes -= e.data.len(),
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
    subscriptions: HashMap<String, Subscription>,
    consumers: HashMap<ConsumerKey, String>,
    cache: EntryCache,
    pending: Vec<PendingPublish>,
    pending_bytes: usize,
    last_cursor_save: tokio::time::Instant,
}

/// Opens a topic's storage (blocking: run it off the async threads).
pub fn open(name: TopicName, dir: PathBuf) -> Result<Topic, crate::log::LogError> {
    let log = Log::open(&dir)?;
    let cursors = CursorStore::new(&dir);
    let next_id = log.next_entry_id();
    let mut subscriptions = HashMap::new();
    for (sub, cursor) in cursors.load_all()? {
        subscriptions.insert(
            sub.clone(),
            Subscription::new(sub, true, SubType::Exclusive, cursor),
        );
    }
    Ok(Topic {
        name,
        log: Arc::new(Mutex::new(log)),
        cursors: Arc::new(cursors),
        next_id,
        subscriptions,
        consumers: HashMap::new(),
        cache: EntryCache::default(),
        pending: Vec::new(),
        pending_bytes: 0,
        last_cursor_save: tokio::time::Instant::now(),
    })
}

impl Topic {
    /// Runs the actor until [`TopicCommand::Shutdown`] or until every handle is dropped.
    pub async fn run(mut self, mut rx: mpsc::Receiver<TopicCommand>) {
        let mut blocked = false;
        loop {
            let first = tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(cmd) => Some(cmd),
                    None => break,
                },
                () = tokio::time::sleep(RETRY_BLOCKED), if blocked => None,
                () = tokio::time::sleep_until(self.last_cursor_save + CURSOR_SAVE_INTERVAL), if self.has_dirty_cursor() => None,
            };
            let mut shutdown = None;
            if let Some(cmd) = first {
                self.handle(cmd, &mut shutdown).await;
            }
            while shutdown.is_none() && self.pending_bytes < MAX_GROUP_COMMIT_BYTES {
                match rx.try_recv() {
                    Ok(cmd) => self.handle(cmd, &mut shutdown).await,
                    Err(_) => break,
                }
            }
            self.commit(shutdown.is_some()).await;
            blocked = self.dispatch();
            if let Some(reply) = shutdown {
                let _ = reply.send(());
                return;
            }
        }
        self.commit(true).await;
    }

    fn has_dirty_cursor(&self) -> bool {
        self.subscriptions.values().any(|s| s.dirty)
    }

    async fn handle(&mut self, cmd: TopicCommand, shutdown: &mut Option<oneshot::Sender<()>>) {
        match cmd {
            TopicCommand::Publish { entry, reply } => {
                let bytes = encode_entry(&entry.metadata, &entry.data);
                self.pending_bytes += bytes.len();
                self.pending.push(PendingPublish {
                    bytes,
                    entry,
                    reply,
                });
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
                cumulative,
            } => {
                let end = self.next_id;
                if let Some(sub) = self.subscription_of(key) {
                    let ids: Vec<u64> = ids.into_iter().filter(|id| *id < end).collect();
                    sub.ack(&ids, cumulative);
                }
            }
            TopicCommand::Redeliver { key, ids } => {
                if let Some(sub) = self.subscription_of(key) {
                    sub.redeliver(key, ids.as_deref());
                }
            }
            TopicCommand::CloseConsumer { key } => self.close_consumer(key),
            TopicCommand::Unsubscribe { key, reply } => {
                let result = self.unsubscribe(key).await;
                let _ = reply.send(result);
            }
            TopicCommand::GetLastMessageId { key, reply } => {
                let last = self.next_id.checked_sub(1);
                let mark_delete = self
                    .subscription_of(key)
                    .and_then(|s| s.cursor.ack_floor().checked_sub(1));
                let _ = reply.send(LastMessageId { last, mark_delete });
            }
            TopicCommand::Shutdown { reply } => *shutdown = Some(reply),
        }
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
                Subscription::new(req.subscription.clone(), req.durable, req.sub_type, cursor);
            self.subscriptions.insert(req.subscription.clone(), sub);
        }
        let sub = self.subscriptions.get_mut(&req.subscription).ok_or((
            ServerError::UnknownError,
            "subscription vanished".to_string(),
        ))?;
        sub.add_consumer(req.sub_type, Consumer::new(req.key, req.tx))?;
        self.consumers.insert(req.key, req.subscription);
        tracing::debug!(topic = %self.name, consumer = ?req.key, "consumer subscribed");
        Ok(())
    }

    /// Where a new subscription starts (its initial ack floor).
    fn start_position(&self, req: &SubscribeRequest) -> u64 {
        let latest = self.next_id;
        if let (Some(id), false) = (&req.start_message_id, req.durable) {
            // -1 (earliest) and i64::MAX (latest) are the clients' special ids.
            if id.ledger_id == u64::MAX || id.entry_id == u64::MAX {
                return 0;
            }
            if id.ledger_id >= i64::MAX as u64 || id.entry_id >= i64::MAX as u64 {
                return latest;
            }
            let inclusive = id.batch_index.is_some_and(|b| b >= 0);
            let start = if inclusive {
                id.entry_id
            } else {
                id.entry_id + 1
            };
            return start.min(latest);
        }
        match req.initial_position {
            InitialPosition::Earliest => 0,
            InitialPosition::Latest => latest,
        }
    }

    fn close_consumer(&mut self, key: ConsumerKey) {
        let Some(name) = self.consumers.remove(&key) else {
            return;
        };
        if let Some(sub) = self.subscriptions.get_mut(&name) {
            sub.remove_consumer(key);
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

    /// Group commit: appends all pending messages with one fsync, saves changed cursors,
    /// then answers the publishers.
    /// Appends pending messages (one fsync) and, when `force` or when the save interval has
    /// passed, saves the cursors that acks moved.
    async fn commit(&mut self, force: bool) {
        let pending = std::mem::take(&mut self.pending);
        self.pending_bytes = 0;
        let save_cursors = force || self.last_cursor_save.elapsed() >= CURSOR_SAVE_INTERVAL;
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
        if pending.is_empty() && dirty.is_empty() {
            return;
        }
        let (log, cursors) = (self.log.clone(), self.cursors.clone());
        let (pending, append, saved) = match tokio::task::spawn_blocking(move || {
            let append = if pending.is_empty() {
                Ok(0)
            } else {
                let records: Vec<&[u8]> = pending.iter().map(|p| p.bytes.as_slice()).collect();
                match log.lock() {
                    Ok(mut log) => log.append(&records).map_err(|e| e.to_string()),
                    Err(_) => Err("log lock poisoned".to_string()),
                }
            };
            let mut saved = Ok(());
            for (name, cursor) in &dirty {
                if let Err(e) = cursors.save(name, cursor) {
                    saved = Err((name.clone(), e));
                }
            }
            (pending, append, saved)
        })
        .await
        {
            Ok(result) => result,
            Err(e) => {
                tracing::error!(topic = %self.name, error = %e, "storage task failed");
                return;
            }
        };
        if let Err((sub, e)) = saved {
            tracing::error!(topic = %self.name, subscription = %sub, error = %e, "saving cursor failed");
            if let Some(s) = self.subscriptions.get_mut(&sub) {
                s.dirty = true;
            }
        }
        match append {
            Ok(first) => {
                for (i, p) in pending.into_iter().enumerate() {
                    let id = first + i as u64;
                    self.cache.push(id, p.entry);
                    let _ = p.reply.send(Ok(id));
                }
                self.next_id = self
                    .log
                    .lock()
                    .map(|l| l.next_entry_id())
                    .unwrap_or(self.next_id);
            }
            Err(e) => {
                tracing::error!(topic = %self.name, error = %e, "append failed");
                for p in pending {
                    let _ = p
                        .reply
                        .send(Err((ServerError::PersistenceError, e.clone())));
                }
            }
        }
    }

    /// Dispatches on every subscription; true if some connection queue was full.
    fn dispatch(&mut self) -> bool {
        let end = self.next_id;
        let (cache, log, name) = (&self.cache, &self.log, &self.name);
        let mut read = |id: u64| -> Option<Arc<StoredEntry>> {
            if let Some(e) = cache.get(id) {
                return Some(e);
            }
            let bytes = match log.lock() {
                Ok(log) => log.read(id),
                Err(_) => return None,
            };
            match bytes.map(|b| decode_entry(&b)) {
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
        };
        let mut blocked = false;
        for sub in self.subscriptions.values_mut() {
            if sub.has_consumers() {
                blocked |= sub.dispatch(end, &mut read) == DispatchOutcome::Blocked;
            }
        }
        blocked
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_round_trip_and_garbage() {
        let meta = MessageMetadata {
            producer_name: "p".into(),
            sequence_id: 3,
            num_messages_in_batch: Some(2),
            ..Default::default()
        };
        let bytes = encode_entry(&meta, b"payload");
        let e = decode_entry(&bytes).unwrap();
        assert_eq!(e.metadata, meta);
        assert_eq!(e.data, b"payload");
        assert!(decode_entry(&[0, 0, 0, 9, 1]).is_none());
        assert!(decode_entry(&[]).is_none());
    }
}
