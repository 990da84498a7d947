//! Durable routes: the feeder of a source topic copies each message into the queues of the
//! durable routes whose filters match it, so that a route's backlog waits in the backend
//! while nobody reads it (an MQTT persistent session, an AMQP durable queue).
//!
//! - A durable route's filters live in the namespace's kv, under
//!   `__routing/<source>[@<key property>]/<queue>` (written on the connection's ordered operations, so before
//!   anything the plugin does afterwards, e.g. before an MQTT SUBACK), so that they outlive
//!   the connection and every gateway on the backend sees them.
//! - One gateway at a time feeds a source: the one whose consumer is active on the source's
//!   durable Failover subscription `magnetar-router[-<key property>]` (the backend picks it; when it dies,
//!   another gateway's consumer takes over from the last acknowledged message). A message is
//!   acknowledged only once its copies are stored, so a crash copies some messages twice
//!   and loses none.
//! - A gateway's feeder starts with the first durable route opened on the source there and
//!   runs until the process ends: while it is not running, the Failover subscription keeps
//!   what arrives. It loads the filters of every queue from the kv, takes the changes of its
//!   own connections at once, and those of other gateways' every [`REFRESH`].
//! - A copy is the stored message as it is: its key, properties and (sealed) payload, plus
//!   the original's publish time ([`PUBLISHED_PROPERTY`]), which deliveries report.
//! - Copies are stored in batches (one entry for several messages), except into the queue of
//!   a route whose `max-unacked` is 1: one message per entry there. The backend hands out an
//!   entry whole, so the readers of a queue that take one message at a time (AMQP consumers
//!   with prefetch 1, competing on a Shared subscription) would otherwise see a batch go to
//!   one of them while the others wait.
//! - A caller that must see every message stored in the source before it asked reflected in
//!   the queues (a queue's count, AMQP's `basic.get` on an empty queue) waits for
//!   [`Feeder::caught_up`]: the feeder takes the source's last message id and answers once it
//!   acknowledged that message (at once if everything was acknowledged already, or if another
//!   gateway's feeder is the active one, whose progress this one cannot see).
//! - A queue may be capped (`caps`): its route's record holds the cap, and a message that a
//!   full queue refused as it was published names that queue in
//!   [`REFUSED_PROPERTY`](super::caps::REFUSED_PROPERTY); it is not copied there.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::future::join_all;
use futures::StreamExt;
use tokio::sync::{oneshot, watch, Notify};

use super::caps::{Cap, REFUSED_PROPERTY};
use super::services::Services;
use crate::backend::{OutMessage, SubscribeOptions};
use crate::routing::{Filter, Index};

/// How often a feeder reads the filters other gateways stored.
const REFRESH: Duration = Duration::from_secs(2);
/// How long a queue changed by this gateway's connections keeps its local filters over the
/// kv's (whose write may not be visible yet).
const LOCAL_WINS: Duration = Duration::from_secs(10);
/// Most messages fed in one round.
const FEED_BATCH: usize = 512;
/// The durable Failover subscription through which one gateway at a time feeds a source.
pub const FEEDER_SUBSCRIPTION: &str = "magnetar-router";

/// A source as a durable route names it.
pub(super) struct Named<'a> {
    /// Full topic name.
    pub(super) topic: String,
    /// Its name in the namespace.
    pub(super) short: &'a str,
    /// The property that holds the routing key (else the message key).
    pub(super) key_property: Option<&'a str>,
}

impl Named<'_> {
    /// The name of the source's feeder: routes that take their key from different places
    /// are fed apart (their own kv prefix and Failover subscription).
    fn feeder_name(&self) -> String {
        match self.key_property {
            Some(p) => format!("{}@{p}", self.short),
            None => self.short.to_string(),
        }
    }
}

/// The property of a copy that holds the original's publish time (ms): a client sees the
/// time the message was published, not copied (MQTT 5.0 Message Expiry counts from it).
pub const PUBLISHED_PROPERTY: &str = "__magnetar.published";

/// Removes [`PUBLISHED_PROPERTY`] from a delivery's properties, with its value.
pub(super) fn take_published(properties: &mut Vec<crate::abi::types::Property>) -> Option<u64> {
    let i = properties
        .iter()
        .position(|p| p.key == PUBLISHED_PROPERTY)?;
    properties.remove(i).value.parse().ok()
}

/// A durable route as the kv keeps it: its filters (a JSON list, as before there was
/// anything else to say), or its filters, whether its copies go one per entry, and its
/// queue's cap.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
enum Stored {
    Filters(Vec<Filter>),
    Queue {
        filters: Vec<Filter>,
        one_per_entry: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cap: Option<Cap>,
    },
}

/// What the kv keeps of a durable route.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct RouteRecord {
    pub(super) filters: Vec<Filter>,
    /// Its copies are stored one message per entry.
    pub(super) one_per_entry: bool,
    pub(super) cap: Option<Cap>,
}

/// A durable route as the kv keeps it.
pub(super) fn encode(route: &RouteRecord) -> Vec<u8> {
    let stored = if route.one_per_entry || route.cap.is_some() {
        Stored::Queue {
            filters: route.filters.clone(),
            one_per_entry: route.one_per_entry,
            cap: route.cap,
        }
    } else {
        Stored::Filters(route.filters.clone())
    };
    serde_json::to_vec(&stored).unwrap_or_default()
}

fn decode(bytes: &[u8]) -> Option<RouteRecord> {
    match serde_json::from_slice(bytes).ok()? {
        Stored::Filters(filters) => Some(RouteRecord {
            filters,
            one_per_entry: false,
            cap: None,
        }),
        Stored::Queue {
            filters,
            one_per_entry,
            cap,
        } => Some(RouteRecord {
            filters,
            one_per_entry,
            cap,
        }),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One source's durable routes, by queue.
#[derive(Default)]
struct Queues {
    index: Index<u64>,
    /// Queue id → its full topic and filters.
    queues: HashMap<u64, (String, Vec<Filter>)>,
    ids: HashMap<String, u64>,
    /// Queues whose copies are stored one message per entry.
    one_per_entry: std::collections::HashSet<u64>,
    /// Capped queues' caps.
    caps: HashMap<u64, Cap>,
    next: u64,
    /// Queues this gateway's connections changed, and when.
    local: HashMap<u64, Instant>,
}

impl Queues {
    fn id(&mut self, queue: &str) -> u64 {
        if let Some(id) = self.ids.get(queue) {
            return *id;
        }
        self.next += 1;
        self.ids.insert(queue.to_string(), self.next);
        self.queues
            .insert(self.next, (queue.to_string(), Vec::new()));
        self.next
    }

    /// Replaces a queue's route; the queue's id.
    fn set(&mut self, queue: &str, route: RouteRecord) -> u64 {
        let RouteRecord {
            filters,
            one_per_entry,
            cap,
        } = route;
        let id = self.id(queue);
        if one_per_entry {
            self.one_per_entry.insert(id);
        } else {
            self.one_per_entry.remove(&id);
        }
        match cap {
            Some(cap) => self.caps.insert(id, cap),
            None => self.caps.remove(&id),
        };
        let old = self
            .queues
            .get_mut(&id)
            .map(|(_, f)| std::mem::take(f))
            .unwrap_or_default();
        for f in &old {
            self.index.remove(f, id);
        }
        let kept: Vec<Filter> = filters
            .into_iter()
            .filter(|f| self.index.insert(f, id).is_ok())
            .collect();
        if let Some((_, f)) = self.queues.get_mut(&id) {
            *f = kept;
        }
        id
    }

    fn remove(&mut self, queue: &str) {
        if let Some(id) = self.ids.remove(queue) {
            if let Some((_, filters)) = self.queues.remove(&id) {
                for f in &filters {
                    self.index.remove(f, id);
                }
            }
            self.local.remove(&id);
            self.one_per_entry.remove(&id);
            self.caps.remove(&id);
        }
    }
}

/// A source's feeder in this gateway.
pub(super) struct Feeder {
    /// The source topic (full name).
    topic: String,
    /// The feeder's name in the namespace (`Named::feeder_name`).
    name: String,
    key_property: Option<String>,
    /// The namespace's kv topic.
    kv_topic: String,
    queues: Mutex<Queues>,
    ready: watch::Receiver<Option<Result<(), String>>>,
    /// Callers of [`Feeder::caught_up`] the feeding task has not taken yet, and its wake-up.
    barriers: Mutex<Vec<oneshot::Sender<()>>>,
    barrier_asked: Notify,
    /// The last source message acknowledged (all copies stored), by any of its consumers.
    copied: Mutex<Option<Position>>,
}

/// (ledger, entry, batch index): a message's place in its topic.
type Position = (u64, u64, i32);

fn position(id: &pulsar::proto::MessageIdData) -> Position {
    (id.ledger_id, id.entry_id, id.batch_index.unwrap_or(-1))
}

/// Whether the source's message at `target` is acknowledged once `copied` is.
fn reached(copied: Position, target: Position) -> bool {
    let (c, t) = ((copied.0, copied.1), (target.0, target.1));
    c > t || (c == t && (target.2 < 0 || copied.2 >= target.2))
}

impl Feeder {
    /// Returns once every message the source held when called has its copies stored, or
    /// this gateway's feeder knows it is not the one feeding, or its consumer failed (to be
    /// bounded by the caller: a feeder that never started never answers).
    pub(super) async fn caught_up(&self) {
        let (tx, rx) = oneshot::channel::<()>();
        lock(&self.barriers).push(tx);
        self.barrier_asked.notify_one();
        // Answered by dropping the sender.
        let _ = rx.await;
    }

    /// Whether this feeder holds `queue` (full topic).
    pub(super) fn feeds(&self, queue: &str) -> bool {
        lock(&self.queues).ids.contains_key(queue)
    }

    /// Sets a queue's route, as this gateway's connection has it.
    pub(super) fn set_local(&self, queue: &str, route: RouteRecord) {
        let mut q = lock(&self.queues);
        let id = q.set(queue, route);
        q.local.insert(id, Instant::now());
    }

    /// The cap of `queue`, if it has one.
    pub(super) fn cap(&self, queue: &str) -> Option<Cap> {
        let q = lock(&self.queues);
        q.ids.get(queue).and_then(|id| q.caps.get(id)).copied()
    }

    /// The capped queues (full topics) a message with `key` and `properties` reaches.
    pub(super) fn capped_targets(
        &self,
        key: Option<&str>,
        properties: &HashMap<String, String>,
    ) -> Vec<(String, Cap)> {
        let q = lock(&self.queues);
        if q.caps.is_empty() {
            return Vec::new();
        }
        let by_property = self
            .key_property
            .as_ref()
            .and_then(|name| properties.get(name))
            .map(String::as_str);
        let key = by_property.or(key).unwrap_or_default();
        let props: Vec<(&str, &str)> = if q.index.has_headers() {
            properties
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect()
        } else {
            Vec::new()
        };
        let mut matched = Vec::new();
        q.index.matches(key, &props, &mut matched);
        matched
            .iter()
            .filter_map(|id| {
                let cap = q.caps.get(id)?;
                q.queues.get(id).map(|(t, _)| (t.clone(), *cap))
            })
            .collect()
    }

    /// Forgets a deleted queue.
    pub(super) fn remove(&self, queue: &str) {
        lock(&self.queues).remove(queue);
    }

    /// The kv key of one of this source's queues.
    pub(super) fn key(&self, queue_topic: &str) -> String {
        let short = queue_topic.rsplit('/').next().unwrap_or(queue_topic);
        format!("{}{short}", self.registry_prefix())
    }

    /// Where the kv keeps this feeder's queues.
    fn registry_prefix(&self) -> String {
        format!("__routing/{}/", self.name)
    }

    pub(super) fn kv_topic(&self) -> &str {
        &self.kv_topic
    }

    /// Waits until the feeder reads its source (or failed to).
    pub(super) async fn ready(&self) -> Result<(), String> {
        let mut ready = self.ready.clone();
        loop {
            if let Some(r) = ready.borrow_and_update().clone() {
                return r;
            }
            if ready.changed().await.is_err() {
                return Err("the feeder ended".into());
            }
        }
    }
}

/// This gateway's feeders, by source topic.
#[derive(Default)]
pub struct Feeders {
    /// By `<source topic>@<key property>`: a source's feeders are one range.
    feeders: Mutex<std::collections::BTreeMap<String, Arc<Feeder>>>,
}

impl Feeders {
    /// This gateway's feeders that hold the queue `queue` (full topic).
    pub(super) fn of_queue(&self, queue: &str) -> Vec<Arc<Feeder>> {
        lock(&self.feeders)
            .values()
            .filter(|f| f.feeds(queue))
            .cloned()
            .collect()
    }

    /// This gateway's feeders of the source `topic` (full name), whatever their key
    /// property.
    pub(super) fn of_source(&self, topic: &str) -> Vec<Arc<Feeder>> {
        let prefix = format!("{topic}@");
        lock(&self.feeders)
            .range(prefix.clone()..)
            .take_while(|(id, _)| id.starts_with(&prefix))
            .map(|(_, f)| f.clone())
            .collect()
    }

    /// The feeder of `source`, started if this gateway has none (or its last one failed to
    /// start).
    pub(super) fn get(
        services: &Arc<Services>,
        runtime: &tokio::runtime::Handle,
        source: &Named<'_>,
        kv_topic: &str,
    ) -> Arc<Feeder> {
        let id = format!(
            "{}@{}",
            source.topic,
            source.key_property.unwrap_or_default()
        );
        let mut feeders = lock(&services.feeders.feeders);
        if let Some(f) = feeders.get(&id) {
            if !matches!(&*f.ready.borrow(), Some(Err(_))) {
                return f.clone();
            }
        }
        let (tx, rx) = watch::channel(None);
        let feeder = Arc::new(Feeder {
            topic: source.topic.clone(),
            name: source.feeder_name(),
            key_property: source.key_property.map(str::to_string),
            kv_topic: kv_topic.to_string(),
            queues: Mutex::new(Queues::default()),
            ready: rx,
            barriers: Mutex::new(Vec::new()),
            barrier_asked: Notify::new(),
            copied: Mutex::new(None),
        });
        feeders.insert(id, feeder.clone());
        runtime.spawn(feed(services.clone(), feeder.clone(), tx));
        feeder
    }
}

/// Loads every queue's filters from the kv; queues changed here lately keep theirs.
async fn refresh(services: &Services, feeder: &Feeder) -> Result<(), String> {
    let prefix = feeder.registry_prefix();
    let mut found: Vec<(String, RouteRecord)> = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = services
            .kv
            .scan(&feeder.kv_topic, &prefix, after.as_deref(), 1000)
            .await
            .map_err(|e| e.to_string())?;
        let full = page.len() >= 1000;
        after = page.last().map(|(k, _)| k.clone());
        for (key, value) in page {
            let Some(queue) = key.strip_prefix(&prefix) else {
                continue;
            };
            if let Some(route) = decode(&value) {
                found.push((namespace_topic(&feeder.topic, queue), route));
            }
        }
        if !full {
            break;
        }
    }
    let mut q = lock(&feeder.queues);
    let now = Instant::now();
    q.local.retain(|_, at| now.duration_since(*at) < LOCAL_WINS);
    let listed: std::collections::HashSet<String> = found.iter().map(|(t, _)| t.clone()).collect();
    let gone: Vec<String> = q
        .ids
        .iter()
        .filter(|(t, id)| !listed.contains(*t) && !q.local.contains_key(id))
        .map(|(t, _)| t.clone())
        .collect();
    for t in gone {
        q.remove(&t);
    }
    for (topic, route) in found {
        let local = q.ids.get(&topic).is_some_and(|id| q.local.contains_key(id));
        if !local {
            if let Some(cap) = route.cap {
                // Counted from now on, by this gateway's consumers too.
                services.caps.counted(&topic, cap);
            }
            q.set(&topic, route);
        }
    }
    Ok(())
}

/// The full name of `short` in the namespace of the full topic `of`.
fn namespace_topic(of: &str, short: &str) -> String {
    match of.rsplit_once('/') {
        Some((ns, _)) => format!("{ns}/{short}"),
        None => short.to_string(),
    }
}

/// The feeder's task: loads the queues, opens the Failover subscription, then copies; if
/// copying fails, it lets the unacknowledged messages go back to the backend and starts over.
async fn feed(
    services: Arc<Services>,
    feeder: Arc<Feeder>,
    ready: watch::Sender<Option<Result<(), String>>>,
) {
    if let Err(e) = refresh(&services, &feeder).await {
        tracing::warn!(topic = %feeder.topic, error = %e, "cannot load durable routes");
        let _ = ready.send(Some(Err(e)));
        return;
    }
    let opts = SubscribeOptions {
        topic: feeder.topic.clone(),
        subscription: match &feeder.key_property {
            Some(p) => format!("{FEEDER_SUBSCRIPTION}-{p}"),
            None => FEEDER_SUBSCRIPTION.to_string(),
        },
        sub_type: pulsar::SubType::Failover,
        durable: true,
        earliest: false,
        receiver_queue: 1000,
        start_message_id: None,
        dead_letter: None,
        consumer_name: None,
    };
    let mut first = true;
    loop {
        let consumer = match services.backend.subscribe(&opts).await {
            Ok(c) => c,
            Err(e) if first => {
                tracing::warn!(topic = %feeder.topic, error = %e, "cannot feed durable routes");
                let _ = ready.send(Some(Err(e.to_string())));
                return;
            }
            Err(e) => {
                tracing::warn!(topic = %feeder.topic, error = %e, "cannot reopen the feeder");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if std::mem::take(&mut first) {
            let _ = ready.send(Some(Ok(())));
        }
        // Callers still waiting for copies wait for the next consumer's (bounded by them):
        // answered now, they would count a queue whose copies are held up by the failure.
        let waiting = copy_until_failure(&services, &feeder, consumer).await;
        if !waiting.is_empty() {
            lock(&feeder.barriers).extend(waiting);
            feeder.barrier_asked.notify_one();
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Where the callers of `caught_up` that asked now must wait for the feeder to be: the
/// source's last message; `None` (they are answered, by dropping them) if there is nothing
/// to wait for: everything acknowledged, the source empty, another gateway feeding, or the
/// backend cannot say.
async fn barrier_target(
    feeder: &Feeder,
    consumer: &mut pulsar::Consumer<Vec<u8>, pulsar::TokioExecutor>,
) -> Option<Position> {
    if consumer.is_active() == Some(false) {
        return None;
    }
    let last = consumer.get_last_message_id().await.ok()?;
    let target = position(last.first()?);
    if target.0 == u64::MAX || target.1 == u64::MAX {
        return None;
    }
    if lock(&feeder.copied).is_some_and(|c| reached(c, target)) {
        return None;
    }
    // A consumer that has not acknowledged anything yet (a gateway that just started):
    // nothing left in the subscription means nothing left to copy.
    if super::subscription_task::backlog(consumer).await.ok()? == 0 {
        return None;
    }
    Some(target)
}

/// Copies what the source delivers into the matching queues, acknowledging each batch once
/// its copies are stored; returns (closing the consumer) when a copy or the source fails,
/// with the `caught_up` callers it had not answered yet.
async fn copy_until_failure(
    services: &Services,
    feeder: &Feeder,
    mut consumer: pulsar::Consumer<Vec<u8>, pulsar::TokioExecutor>,
) -> Vec<oneshot::Sender<()>> {
    let mut tick = tokio::time::interval(REFRESH);
    let mut matched = Vec::new();
    // `caught_up` callers waiting for the source's message at their position.
    let mut waiting: Vec<(Position, oneshot::Sender<()>)> = Vec::new();
    'feed: loop {
        let first = tokio::select! {
            _ = tick.tick() => {
                if let Err(e) = refresh(services, feeder).await {
                    tracing::warn!(topic = %feeder.topic, error = %e, "cannot reload durable routes");
                }
                continue;
            }
            () = feeder.barrier_asked.notified() => {
                let asked = std::mem::take(&mut *lock(&feeder.barriers));
                if let Some(target) = barrier_target(feeder, &mut consumer).await {
                    waiting.extend(asked.into_iter().map(|tx| (target, tx)));
                }
                continue;
            }
            m = consumer.next() => m,
        };
        let (batch, ended) =
            super::router::take_batch(&feeder.topic, &mut consumer, first, FEED_BATCH);
        let Some(last) = batch
            .last()
            .map(|m| (m.topic.clone(), m.message_id.id.clone()))
        else {
            break;
        };
        // Every copy of the batch, then one ack for the lot.
        let mut receipts = Vec::new();
        for msg in &batch {
            let meta = &msg.payload.metadata;
            let by_property = feeder.key_property.as_ref().and_then(|name| {
                let found = meta.properties.iter().find(|p| p.key == *name);
                found.map(|p| p.value.as_str())
            });
            let key = by_property
                .or(meta.partition_key.as_deref())
                .unwrap_or_default();
            let refused: Vec<&str> = meta
                .properties
                .iter()
                .find(|p| p.key == REFUSED_PROPERTY)
                .map(|p| p.value.split(' ').collect())
                .unwrap_or_default();
            let targets: Vec<(String, bool)> = {
                let q = lock(&feeder.queues);
                let props: Vec<(&str, &str)> = if q.index.has_headers() {
                    meta.properties
                        .iter()
                        .map(|p| (p.key.as_str(), p.value.as_str()))
                        .collect()
                } else {
                    Vec::new()
                };
                q.index.matches(key, &props, &mut matched);
                matched
                    .iter()
                    .filter_map(|id| {
                        let one = q.one_per_entry.contains(id);
                        q.queues.get(id).map(|(t, _)| (t.clone(), one))
                    })
                    .filter(|(t, _)| {
                        let short = t.rsplit('/').next().unwrap_or(t);
                        !refused.contains(&short)
                    })
                    .collect()
            };
            for (target, one_per_entry) in targets {
                let copy = OutMessage {
                    key: meta.partition_key.clone(),
                    event_time: meta.event_time,
                    payload: msg.payload.data.clone(),
                    properties: meta
                        .properties
                        .iter()
                        .filter(|p| p.key != REFUSED_PROPERTY)
                        .map(|p| (p.key.clone(), p.value.clone()))
                        .chain([(
                            PUBLISHED_PROPERTY.to_string(),
                            meta.publish_time.to_string(),
                        )])
                        .collect(),
                    encryption: (!meta.encryption_keys.is_empty()).then(|| {
                        (
                            meta.encryption_keys.clone(),
                            meta.encryption_param.clone().unwrap_or_default(),
                        )
                    }),
                };
                match services
                    .backend
                    .enqueue_batched(&target, copy, !one_per_entry)
                    .await
                {
                    Ok(receipt) => receipts.push(receipt),
                    Err(e) => {
                        tracing::warn!(queue = %target, error = %e, "cannot copy into a queue");
                        break 'feed;
                    }
                }
            }
        }
        if let Some(e) = join_all(receipts).await.into_iter().find_map(Result::err) {
            // Not acked: the backend hands the batch out again once the consumer is gone.
            tracing::warn!(topic = %feeder.topic, error = %e, "a queue did not store a copy; feeding again");
            break;
        }
        let at = position(&last.1);
        match consumer.cumulative_ack_with_id(&last.0, last.1).await {
            Ok(()) => {
                *lock(&feeder.copied) = Some(at);
                waiting.retain(|(target, _)| !reached(at, *target));
            }
            Err(e) => tracing::warn!(topic = %feeder.topic, error = %e, "feeder's ack failed"),
        }
        if ended {
            break;
        }
    }
    let _ = consumer.close().await;
    waiting.into_iter().map(|(_, tx)| tx).collect()
}
