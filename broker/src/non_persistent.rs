//! Non-persistent topics (`non-persistent://tenant/ns/topic`), as Apache Pulsar has them
//! (`NonPersistentTopic`, `NonPersistentSubscription`, the `NonPersistentDispatcher*`
//! classes): a message is never stored; it goes to the consumers connected when it is
//! published, and a subscription with no consumer able to take it drops it.
//!
//! The actor takes the same [`TopicCommand`]s as a persistent topic, so a connection drives
//! both alike. Per subscription type, as Pulsar's dispatchers:
//! - Exclusive: the one consumer; Failover: the active one (the same choice as a persistent
//!   subscription's, [`subscription::failover_active`], and the same
//!   `CommandActiveConsumerChange` notices); Shared: round-robin over the consumers with
//!   permits; Key_Shared: the consumer that owns the message's key (Sticky hash ranges, else
//!   rendezvous hashing, as persistent Key_Shared subscriptions route).
//! - The chosen consumer must have permits (> 0) and room in its connection's queue (Pulsar's
//!   `isWritable`); otherwise the message is dropped for that subscription and counted
//!   ([`Counters`], the admin API's stats). A batch costs its message count in permits.
//!
//! Message ids are Pulsar's for non-persistent topics: ledger 0, entry 0 in send receipts and
//! in deliveries (the client adds the batch index). Acks, negative acks and redelivery
//! requests are accepted and ignored (nothing is kept to redeliver); a seek is refused; the
//! last message id is "none". Subscriptions live while they have consumers (Pulsar removes
//! a non-persistent subscription with its last consumer). Schemas are kept in memory for the
//! topic's life. Producer access modes other than Shared are a simplification of Pulsar's:
//! an exclusive producer is refused while another producer is attached (no fencing, no
//! waiting queue).
//!
//! A topic with no producer and no consumer stops after [`IDLE_STOP`]; the next client opens
//! it again, empty (there is nothing to lose).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use pulsar::message::proto::{
    base_command::Type, command_subscribe::SubType, CommandActiveConsumerChange, CommandMessage,
    KeySharedMode, MessageIdData, Schema, ServerError,
};
use tokio::sync::{mpsc, oneshot};
use tokio_util::task::TaskTracker;

use crate::entry::StoredEntry;
use crate::naming::{self, TopicName};
use crate::protocol::{self, Frame, LEDGER_ID};
use crate::registry::{RegistryError, MAX_TOPICS};
use crate::schema::{self, MAX_VERSIONS};
use crate::subscription::{self, ConsumerKey, ConsumerStats, FailoverSlot};
use crate::topic::{
    AccessMode, Attached, LastMessageId, RequestError, SubscribeRequest, SubscriptionStats,
    TopicCommand, TopicHandle, TopicStats, COMMAND_QUEUE,
};

/// How long a topic without producers and consumers stays open.
pub const IDLE_STOP: Duration = Duration::from_secs(60);

/// The entry id of every non-persistent message id (and the ledger id is [`LEDGER_ID`], 0),
/// as Apache Pulsar's `NonPersistentTopic` answers.
pub const ENTRY_ID: u64 = 0;

/// The non-persistent topics of a broker.
#[derive(Default)]
pub struct Topics {
    open: StdMutex<HashMap<TopicName, Open>>,
    tasks: TaskTracker,
}

#[derive(Clone)]
struct Open {
    handle: TopicHandle,
    counters: Arc<Counters>,
}

/// A topic's message counters since it was opened, read by the admin API without a round
/// trip to the actor.
#[derive(Default)]
pub struct Counters {
    pub msg_in: AtomicU64,
    pub bytes_in: AtomicU64,
    pub msg_out: AtomicU64,
    /// Messages a subscription dropped (no consumer could take them), over all subscriptions.
    pub msg_dropped: AtomicU64,
    /// The same per subscription (only those that dropped something).
    pub dropped_by_subscription: StdMutex<HashMap<String, u64>>,
}

impl Topics {
    /// The running non-persistent topic `name` (its persistent spelling), opening it if
    /// needed.
    pub fn get(&self, name: &TopicName) -> Result<TopicHandle, RegistryError> {
        let mut open = self
            .open
            .lock()
            .map_err(|_| RegistryError::Storage("non-persistent topics unavailable".into()))?;
        if let Some(o) = open.get(name) {
            if !o.handle.tx.is_closed() {
                return Ok(o.handle.clone());
            }
        }
        if open.len() >= MAX_TOPICS {
            open.retain(|_, o| !o.handle.tx.is_closed());
            if open.len() >= MAX_TOPICS {
                return Err(RegistryError::TooManyTopics);
            }
        }
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        let counters = Arc::new(Counters::default());
        let topic = Topic::new(name.clone(), counters.clone());
        self.tasks.spawn(topic.run(rx));
        let handle = TopicHandle { tx };
        open.insert(
            name.clone(),
            Open {
                handle: handle.clone(),
                counters,
            },
        );
        Ok(handle)
    }

    fn running(&self, name: &TopicName) -> Option<Open> {
        let open = self.open.lock().ok()?;
        open.get(name).filter(|o| !o.handle.tx.is_closed()).cloned()
    }

    /// The open non-persistent topics of `namespace` (`tenant/ns`), in their
    /// `non-persistent://` spelling.
    pub fn topics_of_namespace(&self, namespace: &str) -> Vec<String> {
        let Ok(open) = self.open.lock() else {
            return Vec::new();
        };
        let mut names: Vec<String> = open
            .iter()
            .filter(|(n, o)| n.namespace() == namespace && !o.handle.tx.is_closed())
            .map(|(n, _)| n.non_persistent_name())
            .collect();
        names.sort();
        names
    }

    /// Statistics of open topic `name` and its counters.
    pub async fn stats(
        &self,
        name: &TopicName,
    ) -> Result<(TopicStats, Arc<Counters>), RegistryError> {
        let not_found = || RegistryError::NotFound(format!("topic {}", name.non_persistent_name()));
        let open = self.running(name).ok_or_else(not_found)?;
        let (reply, done) = oneshot::channel();
        open.handle
            .tx
            .send(TopicCommand::Stats { reply })
            .await
            .map_err(|_| not_found())?;
        let stats = done.await.map_err(|_| not_found())?;
        Ok((stats, open.counters))
    }

    /// Stops every topic (their consumers' and producers' connections are closing too).
    pub async fn shutdown(&self) {
        let handles: Vec<TopicHandle> = match self.open.lock() {
            Ok(mut open) => open.drain().map(|(_, o)| o.handle).collect(),
            Err(_) => Vec::new(),
        };
        for h in handles {
            let (reply, done) = oneshot::channel();
            if h.tx.send(TopicCommand::Shutdown { reply }).await.is_ok() {
                let _ = done.await;
            }
        }
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// One non-persistent topic's actor.
struct Topic {
    name: TopicName,
    counters: Arc<Counters>,
    producers: HashMap<Arc<str>, AccessMode>,
    subscriptions: HashMap<String, Subscription>,
    /// The subscription of each attached consumer.
    consumers: HashMap<ConsumerKey, String>,
    failover_slot: FailoverSlot,
    schemas: Vec<Schema>,
}

struct Subscription {
    name: String,
    sub_type: SubType,
    durable: bool,
    consumers: Vec<Consumer>,
    /// Shared: where the next round-robin turn starts.
    next: usize,
    /// Failover: the active consumer's index.
    active: Option<usize>,
}

struct Consumer {
    key: ConsumerKey,
    tx: mpsc::Sender<Frame>,
    permits: i64,
    epoch: Option<u64>,
    name: String,
    priority: i32,
    /// Key_Shared Sticky: the inclusive hash ranges the consumer chose.
    hash_ranges: Vec<(u32, u32)>,
}

impl Topic {
    fn new(name: TopicName, counters: Arc<Counters>) -> Topic {
        let failover_slot = FailoverSlot::of(&name);
        Topic {
            name,
            counters,
            producers: HashMap::new(),
            subscriptions: HashMap::new(),
            consumers: HashMap::new(),
            failover_slot,
            schemas: Vec::new(),
        }
    }

    async fn run(mut self, mut rx: mpsc::Receiver<TopicCommand>) {
        loop {
            let idle = self.producers.is_empty() && self.consumers.is_empty();
            let cmd = if idle {
                match tokio::time::timeout(IDLE_STOP, rx.recv()).await {
                    Ok(Some(cmd)) => cmd,
                    Ok(None) | Err(_) => break,
                }
            } else {
                match rx.recv().await {
                    Some(cmd) => cmd,
                    None => break,
                }
            };
            if !self.handle(cmd) {
                break;
            }
        }
        // Commands that raced with the stop are dropped: their replies say "topic stopped",
        // and the clients open the topic again.
        rx.close();
        tracing::debug!(topic = %self.name.non_persistent_name(), "non-persistent topic stopped");
    }

    /// Handles one command; `false` when the topic stops.
    fn handle(&mut self, cmd: TopicCommand) -> bool {
        match cmd {
            TopicCommand::Publish { entry, reply, .. } => {
                self.publish(&entry.into_unstored());
                reply.send(Ok(Some(ENTRY_ID)));
            }
            TopicCommand::AddProducer {
                name,
                mode,
                again,
                reply,
                ..
            } => {
                let _ = reply.send(self.add_producer(name, mode, again));
            }
            TopicCommand::RemoveProducer { name } => {
                self.producers.remove(&name);
            }
            TopicCommand::Subscribe { request, reply } => {
                let _ = reply.send(self.subscribe(request));
            }
            TopicCommand::Flow { key, permits } => {
                if let Some(c) = self.consumer_mut(key) {
                    c.permits = c.permits.saturating_add(i64::from(permits));
                }
            }
            // Nothing is kept, so there is nothing to acknowledge or deliver again.
            TopicCommand::Ack { .. } | TopicCommand::Redeliver { .. } => {}
            TopicCommand::GetSchema { version, reply } => {
                let found = match version.as_deref().map(schema::parse_version) {
                    Some(Some(v)) => usize::try_from(v)
                        .ok()
                        .and_then(|i| self.schemas.get(i))
                        .map(|s| (v, s)),
                    Some(None) => None,
                    None => self
                        .schemas
                        .last()
                        .map(|s| (self.schemas.len() as u64 - 1, s)),
                };
                let _ = reply.send(
                    found
                        .map(|(v, s)| (schema::version_bytes(v), s.clone()))
                        .ok_or((ServerError::TopicNotFound, "no such schema".to_string())),
                );
            }
            TopicCommand::GetOrCreateSchema { schema, reply } => {
                let _ = reply.send(self.schema_version(schema));
            }
            TopicCommand::Seek { reply, .. } => {
                let _ = reply.send(Err((
                    ServerError::NotAllowedError,
                    "seek is not supported on non-persistent topics".to_string(),
                )));
            }
            TopicCommand::CloseConsumer { key } => self.remove_consumer(key),
            TopicCommand::Unsubscribe { key, reply } => {
                let _ = reply.send(self.unsubscribe(key));
            }
            TopicCommand::GetLastMessageId { reply, .. } => {
                let _ = reply.send(LastMessageId {
                    last: None,
                    mark_delete: None,
                });
            }
            TopicCommand::ConsumerStats { key, reply } => {
                let stats = self.subscription_of(key).and_then(|sub| {
                    let c = sub.consumers.iter().find(|c| c.key == key)?;
                    Some((
                        ConsumerStats {
                            name: c.name.clone(),
                            available_permits: u64::try_from(c.permits).unwrap_or(0),
                            unacked: 0,
                            sub_type: format!("{:?}", sub.sub_type),
                        },
                        0,
                    ))
                });
                let _ = reply.send(stats);
            }
            TopicCommand::Stats { reply } => {
                let _ = reply.send(self.stats());
            }
            TopicCommand::Shutdown { reply } | TopicCommand::Unload { reply } => {
                let _ = reply.send(());
                return false;
            }
        }
        true
    }

    /// Hands a published entry to each subscription's consumer, or drops it there.
    fn publish(&mut self, entry: &StoredEntry) {
        let messages = entry.num_messages();
        self.counters.msg_in.fetch_add(messages, Ordering::Relaxed);
        self.counters
            .bytes_in
            .fetch_add(entry.tail.len() as u64, Ordering::Relaxed);
        for sub in self.subscriptions.values_mut() {
            if sub.dispatch(entry, messages) {
                self.counters.msg_out.fetch_add(messages, Ordering::Relaxed);
            } else {
                self.counters
                    .msg_dropped
                    .fetch_add(messages, Ordering::Relaxed);
                if let Ok(mut by_sub) = self.counters.dropped_by_subscription.lock() {
                    *by_sub.entry(sub.name.clone()).or_insert(0) += messages;
                }
            }
        }
    }

    fn add_producer(
        &mut self,
        name: Arc<str>,
        mode: AccessMode,
        again: bool,
    ) -> Result<Attached, RequestError> {
        if self.producers.contains_key(&name) {
            return if again {
                Ok(Attached::Ready(-1))
            } else {
                Err((
                    ServerError::ProducerBusy,
                    format!(
                        "producer {name} is already connected to {}",
                        self.name.non_persistent_name()
                    ),
                ))
            };
        }
        let exclusive = |m: &AccessMode| *m != AccessMode::Shared;
        if !self.producers.is_empty()
            && (exclusive(&mode) || self.producers.values().any(exclusive))
        {
            return Err((
                ServerError::ProducerBusy,
                format!(
                    "{} has another producer and one of them is exclusive",
                    self.name.non_persistent_name()
                ),
            ));
        }
        self.producers.insert(name, mode);
        Ok(Attached::Ready(-1))
    }

    fn subscribe(&mut self, req: SubscribeRequest) -> Result<(), RequestError> {
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
        let mut hash_ranges = Vec::new();
        if let Some(meta) = &req.key_shared {
            if meta.key_shared_mode == KeySharedMode::Sticky as i32 {
                let bound = |v: i32| u32::try_from(v).unwrap_or(u32::MAX);
                hash_ranges = meta
                    .hash_ranges
                    .iter()
                    .map(|r| (bound(r.start), bound(r.end)))
                    .collect();
                if hash_ranges.is_empty() {
                    return Err((
                        ServerError::ConsumerAssignError,
                        "a Sticky Key_Shared consumer needs hash ranges".to_string(),
                    ));
                }
            }
        }
        let sub = self
            .subscriptions
            .entry(req.subscription.clone())
            .or_insert_with(|| Subscription {
                name: req.subscription.clone(),
                sub_type: req.sub_type,
                durable: req.durable,
                consumers: Vec::new(),
                next: 0,
                active: None,
            });
        if !sub.consumers.is_empty() {
            if sub.sub_type != req.sub_type {
                return Err((
                    ServerError::ConsumerBusy,
                    format!(
                        "subscription {} is {:?}, not {:?}",
                        sub.name, sub.sub_type, req.sub_type
                    ),
                ));
            }
            if sub.sub_type == SubType::Exclusive {
                return Err((
                    ServerError::ConsumerBusy,
                    format!("exclusive consumer already connected to {}", sub.name),
                ));
            }
            let overlaps = |a: &(u32, u32), b: &(u32, u32)| a.0 <= b.1 && b.0 <= a.1;
            if sub.sub_type == SubType::KeyShared
                && sub.consumers.iter().any(|c| {
                    c.hash_ranges.is_empty() != hash_ranges.is_empty()
                        || c.hash_ranges
                            .iter()
                            .any(|a| hash_ranges.iter().any(|b| overlaps(a, b)))
                })
            {
                return Err((
                    ServerError::ConsumerAssignError,
                    "hash ranges overlap another consumer's, or the Key_Shared mode differs"
                        .to_string(),
                ));
            }
        }
        sub.sub_type = req.sub_type;
        sub.consumers.push(Consumer {
            key: req.key,
            tx: req.tx,
            permits: 0,
            epoch: req.epoch,
            name: req.consumer_name,
            priority: req.priority,
            hash_ranges,
        });
        sub.elect(self.failover_slot);
        self.consumers.insert(req.key, req.subscription);
        Ok(())
    }

    fn remove_consumer(&mut self, key: ConsumerKey) {
        let Some(name) = self.consumers.remove(&key) else {
            return;
        };
        let Some(sub) = self.subscriptions.get_mut(&name) else {
            return;
        };
        sub.consumers.retain(|c| c.key != key);
        if sub.consumers.is_empty() {
            self.subscriptions.remove(&name);
        } else {
            sub.next = 0;
            sub.elect(self.failover_slot);
        }
    }

    fn unsubscribe(&mut self, key: ConsumerKey) -> Result<(), RequestError> {
        let sub = self.subscription_of(key).ok_or((
            ServerError::ConsumerNotFound,
            "no such consumer".to_string(),
        ))?;
        if sub.consumers.len() > 1 {
            return Err((
                ServerError::ConsumerBusy,
                format!("subscription {} has other consumers", sub.name),
            ));
        }
        self.remove_consumer(key);
        Ok(())
    }

    fn subscription_of(&self, key: ConsumerKey) -> Option<&Subscription> {
        self.subscriptions.get(self.consumers.get(&key)?)
    }

    fn consumer_mut(&mut self, key: ConsumerKey) -> Option<&mut Consumer> {
        let sub = self.subscriptions.get_mut(self.consumers.get(&key)?)?;
        sub.consumers.iter_mut().find(|c| c.key == key)
    }

    fn schema_version(&mut self, schema: Schema) -> Result<Vec<u8>, RequestError> {
        let same = |s: &Schema| {
            s.r#type == schema.r#type
                && s.schema_data == schema.schema_data
                && s.properties == schema.properties
        };
        if let Some(i) = self.schemas.iter().position(same) {
            return Ok(schema::version_bytes(i as u64));
        }
        if self.schemas.len() >= MAX_VERSIONS {
            return Err((
                ServerError::IncompatibleSchema,
                format!("too many schema versions (limit {MAX_VERSIONS})"),
            ));
        }
        self.schemas.push(schema);
        Ok(schema::version_bytes(self.schemas.len() as u64 - 1))
    }

    fn stats(&self) -> TopicStats {
        let mut producers: Vec<String> = self.producers.keys().map(|n| n.to_string()).collect();
        producers.sort();
        let mut subscriptions: Vec<SubscriptionStats> = self
            .subscriptions
            .values()
            .map(|s| SubscriptionStats {
                name: s.name.clone(),
                sub_type: format!("{:?}", s.sub_type),
                durable: s.durable,
                backlog: 0,
                consumers: s.consumers.iter().map(|c| c.name.clone()).collect(),
            })
            .collect();
        subscriptions.sort_by(|a, b| a.name.cmp(&b.name));
        TopicStats {
            entries: 0,
            messages: self.counters.msg_in.load(Ordering::Relaxed),
            storage_bytes: 0,
            producers,
            subscriptions,
        }
    }
}

impl Subscription {
    /// Failover: picks the active consumer and tells every consumer whether it is it.
    fn elect(&mut self, slot: FailoverSlot) {
        if self.sub_type != SubType::Failover {
            return;
        }
        let candidates: Vec<(i32, &str)> = self
            .consumers
            .iter()
            .map(|c| (c.priority, c.name.as_str()))
            .collect();
        let active = subscription::failover_active(slot, &candidates);
        let changed = active != self.active;
        self.active = active;
        if changed {
            for (i, c) in self.consumers.iter().enumerate() {
                let frame = protocol::command(Type::ActiveConsumerChange, |r| {
                    r.active_consumer_change = Some(CommandActiveConsumerChange {
                        consumer_id: c.key.consumer_id,
                        is_active: Some(Some(i) == active),
                    })
                });
                // Advisory only: a full queue just misses the notice.
                let _ = c.tx.try_send(frame.into());
            }
        }
    }

    /// Sends `entry` to the consumer that should have it; `false` if it was dropped.
    fn dispatch(&mut self, entry: &StoredEntry, messages: u64) -> bool {
        let n = self.consumers.len();
        let chosen = match self.sub_type {
            SubType::Exclusive => Some(0),
            SubType::Failover => self.active,
            SubType::Shared => {
                let start = self.next;
                let found = (0..n)
                    .map(|i| (start + i) % n.max(1))
                    .find(|&i| self.consumers.get(i).is_some_and(|c| c.permits > 0));
                if let Some(i) = found {
                    self.next = i + 1;
                }
                found
            }
            SubType::KeyShared => {
                let hash = subscription::key_hash(entry);
                if self.consumers.iter().any(|c| !c.hash_ranges.is_empty()) {
                    self.consumers.iter().position(|c| {
                        c.hash_ranges
                            .iter()
                            .any(|&(lo, hi)| (lo..=hi).contains(&hash.sticky))
                    })
                } else {
                    (0..n).max_by_key(|&i| {
                        self.consumers
                            .get(i)
                            .map_or(0, |c| subscription::rendezvous(hash.route, c.key))
                    })
                }
            }
        };
        let Some(consumer) = chosen.and_then(|i| self.consumers.get_mut(i)) else {
            return false;
        };
        if consumer.permits <= 0 {
            return false;
        }
        let command = protocol::command(Type::Message, |c| {
            c.message = Some(CommandMessage {
                consumer_id: consumer.key.consumer_id,
                message_id: MessageIdData {
                    ledger_id: LEDGER_ID,
                    entry_id: ENTRY_ID,
                    ..Default::default()
                },
                redelivery_count: Some(0),
                ack_set: Vec::new(),
                consumer_epoch: consumer.epoch,
            })
        })
        .command;
        let frame = Frame::Raw(protocol::message_frame(
            &command,
            None,
            &entry.tail,
            entry.tail_crc,
        ));
        // A full connection queue is Pulsar's "not writable": dropped, never waited for.
        if consumer.tx.try_send(frame).is_err() {
            return false;
        }
        consumer.permits -= i64::try_from(messages).unwrap_or(i64::MAX);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::NewEntry;
    use pulsar::message::proto::command_subscribe::InitialPosition;
    use pulsar::message::proto::MessageMetadata;

    fn request(
        consumer_id: u64,
        sub: &str,
        sub_type: SubType,
        tx: mpsc::Sender<Frame>,
    ) -> SubscribeRequest {
        SubscribeRequest {
            key: ConsumerKey {
                connection: 1,
                consumer_id,
            },
            subscription: sub.to_string(),
            sub_type,
            durable: true,
            initial_position: InitialPosition::Latest,
            start_message_id: None,
            tx,
            epoch: None,
            entry_metadata: false,
            consumer_name: format!("c{consumer_id}"),
            priority: 0,
            key_shared: None,
        }
    }

    fn entry(batch: i32) -> StoredEntry {
        let metadata = MessageMetadata {
            num_messages_in_batch: Some(batch),
            ..Default::default()
        };
        NewEntry::new(metadata, b"x").into_unstored()
    }

    fn topic() -> Topic {
        Topic::new(
            TopicName::parse("public/default/np").unwrap(),
            Arc::new(Counters::default()),
        )
    }

    fn key(consumer_id: u64) -> ConsumerKey {
        ConsumerKey {
            connection: 1,
            consumer_id,
        }
    }

    #[test]
    fn a_message_goes_to_consumers_with_permits_and_is_dropped_otherwise() {
        let mut t = topic();
        let (tx, mut rx) = mpsc::channel(16);
        t.subscribe(request(1, "s", SubType::Exclusive, tx))
            .unwrap();
        t.publish(&entry(1));
        assert!(rx.try_recv().is_err(), "no permits yet: dropped");
        t.consumer_mut(key(1)).unwrap().permits = 3;
        t.publish(&entry(2));
        t.publish(&entry(2)); // permits at 1: still > 0, so it goes (a batch may overdraw)
        t.publish(&entry(1)); // permits at -1: dropped
        assert!(matches!(rx.try_recv(), Ok(Frame::Raw(_))));
        assert!(matches!(rx.try_recv(), Ok(Frame::Raw(_))));
        assert!(rx.try_recv().is_err());
        assert_eq!(t.counters.msg_in.load(Ordering::Relaxed), 6);
        assert_eq!(t.counters.msg_out.load(Ordering::Relaxed), 4);
        assert_eq!(t.counters.msg_dropped.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn shared_consumers_take_turns_and_a_second_exclusive_is_refused() {
        let mut t = topic();
        let (tx1, mut rx1) = mpsc::channel(16);
        let (tx2, mut rx2) = mpsc::channel(16);
        t.subscribe(request(1, "s", SubType::Shared, tx1.clone()))
            .unwrap();
        t.subscribe(request(2, "s", SubType::Shared, tx2)).unwrap();
        t.consumer_mut(key(1)).unwrap().permits = 10;
        t.consumer_mut(key(2)).unwrap().permits = 10;
        for _ in 0..4 {
            t.publish(&entry(1));
        }
        let count =
            |rx: &mut mpsc::Receiver<Frame>| std::iter::from_fn(|| rx.try_recv().ok()).count();
        assert_eq!((count(&mut rx1), count(&mut rx2)), (2, 2));
        t.subscribe(request(3, "x", SubType::Exclusive, tx1.clone()))
            .unwrap();
        let refused = t.subscribe(request(4, "x", SubType::Exclusive, tx1));
        assert_eq!(refused.unwrap_err().0, ServerError::ConsumerBusy);
    }

    #[test]
    fn a_subscription_ends_with_its_last_consumer() {
        let mut t = topic();
        let (tx, _rx) = mpsc::channel(16);
        t.subscribe(request(1, "s", SubType::Failover, tx)).unwrap();
        assert_eq!(t.stats().subscriptions.len(), 1);
        t.remove_consumer(key(1));
        assert!(t.stats().subscriptions.is_empty());
        assert!(t.consumers.is_empty());
    }
}
