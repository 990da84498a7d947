//! The router: routes (`routing.open-route`) of every instance, by source topic.
//!
//! Each source topic that has routes is read once per gateway process, by one non-durable
//! backend subscription (its reader task): every message is unsealed once, matched once
//! against the source's [`Index`] of every route's filters, and handed to the inboxes of the
//! routes it reaches. A route's own task hands its inbox to the plugin within the route's
//! window (`max-unacked`) and only while its connection's output is not congested, like a
//! subscription's delivery task; a slow route never holds the reader back: its inbox keeps
//! at most `max-queued` messages (and [`MAX_QUEUED_BYTES`]) and drops what comes beyond
//! (counted).
//!
//! A source's reader starts with its first route and stops when its last route is gone. A
//! route opened while its source's reader is starting completes once the reader is ready, so
//! every message stored after a route's `on-subscribe-result` reaches it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use futures::{FutureExt, StreamExt};
use tokio::sync::{mpsc, watch, Notify};

use super::context::op_error;
use super::event::Event;
use super::services::Services;
use super::subscription_task::{SubCmd, SubscriptionCount};
use crate::abi::types::{self, ErrorKind};
use crate::backend::SubscribeOptions;
use crate::conn_shared::ConnShared;
use crate::quota::Meters;
use crate::routing::{Filter, FilterError, Index};

/// A message as the reader read it, shared by the inboxes of the routes it reaches.
struct Routed {
    key: Option<String>,
    properties: Vec<types::Property>,
    payload: Vec<u8>,
    publish_time_ms: u64,
}

/// Most payload bytes one route's inbox holds, whatever its `max-queued`: a stalled client
/// costs the gateway at most this much memory.
const MAX_QUEUED_BYTES: usize = 64 << 20;

/// Messages waiting for one route, and their payload bytes.
struct Inbox {
    queue: Mutex<(VecDeque<Arc<Routed>>, usize)>,
    ready: Notify,
    limit: usize,
}

impl Inbox {
    /// Queues a message; `false` if the inbox is full (the message is dropped).
    fn push(&self, msg: Arc<Routed>) -> bool {
        let mut queue = lock(&self.queue);
        let (messages, bytes) = &mut *queue;
        if messages.len() >= self.limit || *bytes + msg.payload.len() > MAX_QUEUED_BYTES {
            return false;
        }
        *bytes += msg.payload.len();
        messages.push_back(msg);
        true
    }

    fn take(&self, most: usize) -> Vec<Arc<Routed>> {
        let mut queue = lock(&self.queue);
        let (messages, bytes) = &mut *queue;
        let n = most.min(messages.len());
        let taken: Vec<Arc<Routed>> = messages.drain(..n).collect();
        *bytes -= taken.iter().map(|m| m.payload.len()).sum::<usize>();
        taken
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Whether a source's reader is ready: `None` while it starts.
type Readiness = Option<Result<(), String>>;

/// One source topic's routes and their filters.
pub(super) struct Source {
    topic: String,
    /// The property that holds the routing key (else the message key).
    key_property: Option<String>,
    state: Mutex<SourceState>,
    ready: watch::Receiver<Readiness>,
    /// Wakes the reader when its last route is gone.
    stop: Notify,
}

#[derive(Default)]
struct SourceState {
    index: Index<u64>,
    inboxes: HashMap<u64, Arc<Inbox>>,
    /// Each route's bound filters, to unbind them all when it closes.
    filters: HashMap<u64, Vec<Filter>>,
    /// No route left: the source is being dropped (a new route makes a new one).
    closed: bool,
}

impl Source {
    /// Binds a filter to a route of this source.
    pub(super) fn bind(&self, route: u64, filter: &Filter) -> Result<bool, FilterError> {
        let mut state = lock(&self.state);
        if !state.inboxes.contains_key(&route) {
            return Ok(false);
        }
        let added = state.index.insert(filter, route)?;
        if added {
            state.filters.entry(route).or_default().push(filter.clone());
        }
        Ok(added)
    }

    /// Unbinds a filter from a route of this source.
    pub(super) fn unbind(&self, route: u64, filter: &Filter) -> bool {
        let mut state = lock(&self.state);
        let removed = state.index.remove(filter, route);
        if removed {
            if let Some(filters) = state.filters.get_mut(&route) {
                filters.retain(|f| f != filter);
            }
        }
        removed
    }
}

/// Every source with routes, and the counters `/metrics` shows.
#[derive(Default)]
pub struct Router {
    sources: Mutex<HashMap<String, Arc<Source>>>,
    next_route: AtomicU64,
    /// Messages matched to a route (one per route reached).
    routed: AtomicU64,
    /// Messages dropped because a route's inbox was full.
    dropped: AtomicU64,
}

/// What `/metrics` shows of the router.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouterStats {
    pub sources: usize,
    pub routes: usize,
    pub routed: u64,
    pub dropped: u64,
}

/// A new route, as the host call made it.
pub(super) struct RouteOpen {
    pub(super) conn: u64,
    pub(super) sub: u64,
    pub(super) token: u64,
    pub(super) topic: String,
    pub(super) key_property: Option<String>,
    pub(super) filters: Vec<Filter>,
    pub(super) max_unacked: usize,
    pub(super) max_queued: usize,
    pub(super) events: mpsc::Sender<Event>,
    pub(super) shared: Arc<ConnShared>,
    pub(super) meters: Option<Meters>,
}

impl Router {
    pub fn stats(&self) -> RouterStats {
        let sources = lock(&self.sources);
        RouterStats {
            sources: sources.len(),
            routes: sources.values().map(|s| lock(&s.state).inboxes.len()).sum(),
            routed: self.routed.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
        }
    }

    /// Opens a route: registers its filters in its source's index (starting the source's
    /// reader if it has none) and spawns the route's task, which completes the plugin's
    /// `open-route` once the reader is ready. Returns the route's source and id, for `bind`.
    pub(super) fn open(
        services: &Arc<Services>,
        runtime: &tokio::runtime::Handle,
        open: RouteOpen,
        cmds: mpsc::Receiver<SubCmd>,
    ) -> Result<(Arc<Source>, u64), FilterError> {
        for f in &open.filters {
            f.validate()?;
        }
        let router = &services.router;
        let route = router.next_route.fetch_add(1, Ordering::Relaxed) + 1;
        let inbox = Arc::new(Inbox {
            queue: Mutex::new((VecDeque::new(), 0)),
            ready: Notify::new(),
            limit: open.max_queued.max(1),
        });
        // Routes that take their key from different places read the source apart.
        let name = source_name(&open.topic, open.key_property.as_deref());
        let source = {
            let mut sources = lock(&router.sources);
            let existing = sources
                .get(&name)
                .filter(|s| !lock(&s.state).closed)
                .cloned();
            let source = match existing {
                Some(s) => s,
                None => {
                    let (tx, rx) = watch::channel(None);
                    let source = Arc::new(Source {
                        topic: open.topic.clone(),
                        key_property: open.key_property.clone(),
                        state: Mutex::new(SourceState::default()),
                        ready: rx,
                        stop: Notify::new(),
                    });
                    sources.insert(name, source.clone());
                    runtime.spawn(read_source(services.clone(), source.clone(), tx));
                    source
                }
            };
            let mut state = lock(&source.state);
            state.inboxes.insert(route, inbox.clone());
            let mut bound = Vec::with_capacity(open.filters.len());
            for f in &open.filters {
                // Validated above.
                if state.index.insert(f, route).unwrap_or(false) {
                    bound.push(f.clone());
                }
            }
            state.filters.insert(route, bound);
            drop(state);
            source
        };
        runtime.spawn(run_route(
            services.clone(),
            source.clone(),
            route,
            inbox,
            open,
            cmds,
        ));
        Ok((source, route))
    }

    /// Drops a route from its source; the source's reader stops with its last route.
    fn close(&self, source: &Arc<Source>, route: u64) {
        let mut sources = lock(&self.sources);
        let mut state = lock(&source.state);
        state.inboxes.remove(&route);
        for f in state.filters.remove(&route).unwrap_or_default() {
            state.index.remove(&f, route);
        }
        if state.inboxes.is_empty() && !state.closed {
            state.closed = true;
            let name = source_name(&source.topic, source.key_property.as_deref());
            if sources.get(&name).is_some_and(|s| Arc::ptr_eq(s, source)) {
                sources.remove(&name);
            }
            source.stop.notify_one();
        }
    }
}

/// Most messages the reader takes from the backend before routing them.
const READ_BATCH: usize = 512;
/// Flow permits of a source's reader.
const READER_QUEUE: u32 = 1000;

/// A source's reader: one non-durable backend subscription, from the latest message on.
async fn read_source(
    services: Arc<Services>,
    source: Arc<Source>,
    ready: watch::Sender<Readiness>,
) {
    let opts = SubscribeOptions {
        topic: source.topic.clone(),
        subscription: format!("magnetar-router-{:016x}", rand::random::<u64>()),
        sub_type: pulsar::SubType::Exclusive,
        durable: false,
        earliest: false,
        receiver_queue: READER_QUEUE,
        start_message_id: None,
        dead_letter: None,
        consumer_name: None,
    };
    let mut consumer = match services.backend.subscribe(&opts).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(topic = %source.topic, error = %e, "cannot read a routed source");
            // Its routes fail; a later route tries again with a new source.
            {
                let mut sources = lock(&services.router.sources);
                lock(&source.state).closed = true;
                let name = source_name(&source.topic, source.key_property.as_deref());
                if sources.get(&name).is_some_and(|s| Arc::ptr_eq(s, &source)) {
                    sources.remove(&name);
                }
            }
            let _ = ready.send(Some(Err(e.to_string())));
            return;
        }
    };
    let _ = ready.send(Some(Ok(())));
    let router = &services.router;
    let mut matched = Vec::new();
    let mut woken: HashSet<u64> = HashSet::new();
    loop {
        let first = tokio::select! {
            biased;
            _ = source.stop.notified() => break,
            m = consumer.next() => m,
        };
        let (batch, ended) = take_batch(&source.topic, &mut consumer, first, READ_BATCH);
        let last = batch
            .last()
            .map(|m| (m.topic.clone(), m.message_id.id.clone()));
        let mut inboxes: Vec<Arc<Inbox>> = Vec::new();
        for mut msg in batch {
            let mut properties: Vec<types::Property> =
                std::mem::take(&mut msg.payload.metadata.properties)
                    .into_iter()
                    .map(|kv| types::Property {
                        key: kv.key,
                        value: kv.value,
                    })
                    .collect();
            let key = msg.payload.metadata.partition_key.take();
            let meta = &msg.payload.metadata;
            let e2e = Some((
                meta.encryption_keys.as_slice(),
                meta.encryption_param.as_deref().unwrap_or_default(),
            ));
            let publish_time_ms = meta.publish_time;
            let payload = match services.unseal(
                &source.topic,
                &mut properties,
                e2e,
                std::mem::take(&mut msg.payload.data),
            ) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(topic = %source.topic, error = %e, "dropping a message that does not decrypt");
                    continue;
                }
            };
            {
                let state = lock(&source.state);
                let props: Vec<(&str, &str)> = if state.index.has_headers() {
                    properties
                        .iter()
                        .map(|p| (p.key.as_str(), p.value.as_str()))
                        .collect()
                } else {
                    Vec::new()
                };
                let routing_key =
                    routing_key(source.key_property.as_deref(), &properties, key.as_deref());
                state.index.matches(routing_key, &props, &mut matched);
                if matched.is_empty() {
                    continue;
                }
                inboxes.clear();
                inboxes.extend(matched.iter().filter_map(|r| state.inboxes.get(r).cloned()));
            }
            let routed = Arc::new(Routed {
                key,
                properties,
                payload,
                publish_time_ms,
            });
            for (route, inbox) in matched.iter().zip(&inboxes) {
                if inbox.push(routed.clone()) {
                    woken.insert(*route);
                } else {
                    router.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
            router
                .routed
                .fetch_add(inboxes.len() as u64, Ordering::Relaxed);
        }
        if !woken.is_empty() {
            let state = lock(&source.state);
            for route in woken.drain() {
                if let Some(inbox) = state.inboxes.get(&route) {
                    inbox.ready.notify_one();
                }
            }
        }
        if let Some((topic, id)) = last {
            // Non-durable: the ack only lets the broker forget what it handed out.
            let _ = consumer.cumulative_ack_with_id(&topic, id).await;
        }
        if ended {
            break;
        }
    }
    let _ = consumer.close().await;
}

/// The router's name of a source: its topic, and the property keys come from.
fn source_name(topic: &str, key_property: Option<&str>) -> String {
    match key_property {
        Some(p) => format!("{topic}@{p}"),
        None => topic.to_string(),
    }
}

/// A message's routing key: the value of `key_property` if it has the property, else its
/// key, else empty.
pub(super) fn routing_key<'a>(
    key_property: Option<&str>,
    properties: &'a [types::Property],
    key: Option<&'a str>,
) -> &'a str {
    key_property
        .and_then(|name| properties.iter().find(|p| p.key == name))
        .map(|p| p.value.as_str())
        .or(key)
        .unwrap_or_default()
}

/// A message the backend delivered.
type Received = pulsar::consumer::Message<Vec<u8>>;

/// `first`, then every message the consumer already holds, up to `most`; `true` with it if
/// the consumer ended (or failed, which is logged).
pub(super) fn take_batch(
    topic: &str,
    consumer: &mut pulsar::Consumer<Vec<u8>, pulsar::TokioExecutor>,
    first: Option<Result<Received, pulsar::Error>>,
    most: usize,
) -> (Vec<Received>, bool) {
    let mut batch = Vec::new();
    let mut next = Some(first);
    while let Some(m) = next.take() {
        match m {
            Some(Ok(m)) => batch.push(m),
            Some(Err(e)) => {
                tracing::warn!(topic, error = %e, "routed source failed");
                return (batch, true);
            }
            None => return (batch, true),
        }
        if batch.len() < most {
            next = consumer.next().now_or_never();
        }
    }
    (batch, false)
}

/// Drops the route from its source when its task ends, however it ends.
struct RouteGuard {
    services: Arc<Services>,
    source: Arc<Source>,
    route: u64,
}

impl Drop for RouteGuard {
    fn drop(&mut self) {
        self.services.router.close(&self.source, self.route);
    }
}

/// Most deliveries handed to the worker in one event.
const MAX_DELIVERY_BATCH: usize = 256;

/// A route's task: completes `open-route`, then hands its inbox to the plugin within the
/// route's window until the route or its connection closes.
async fn run_route(
    services: Arc<Services>,
    source: Arc<Source>,
    route: u64,
    inbox: Arc<Inbox>,
    open: RouteOpen,
    mut cmds: mpsc::Receiver<SubCmd>,
) {
    let RouteOpen {
        conn,
        sub,
        token,
        max_unacked,
        events,
        shared,
        meters,
        ..
    } = open;
    let _counted = SubscriptionCount(meters.clone());
    let mut stop = false;
    let _guard = RouteGuard {
        services: services.clone(),
        source: source.clone(),
        route,
    };
    let mut ready = source.ready.clone();
    let outcome = loop {
        if let Some(r) = ready.borrow_and_update().clone() {
            break r;
        }
        if ready.changed().await.is_err() {
            break Err("the routed source's reader ended".to_string());
        }
    };
    let outcome = outcome
        .map(|_| sub)
        .map_err(|e| op_error(ErrorKind::Backend, e));
    let failed = outcome.is_err();
    if events
        .send(Event::SubscribeResult {
            conn,
            token,
            outcome,
        })
        .await
        .is_err()
        || failed
    {
        return;
    }
    let mut unacked: HashSet<u64> = HashSet::new();
    let mut next_id: u64 = 1;
    loop {
        // Acks and a close first: they may open the window, or end the route.
        while let Ok(c) = cmds.try_recv() {
            on_command(c, &mut unacked, &mut stop);
        }
        if stop || shared.is_closing() {
            return;
        }
        let room = max_unacked.saturating_sub(unacked.len());
        if room > 0 {
            let batch = inbox.take(room.min(MAX_DELIVERY_BATCH));
            if !batch.is_empty() {
                shared.output_relieved().await;
                let mut deliveries = Vec::with_capacity(batch.len());
                for msg in batch {
                    let msg = Arc::try_unwrap(msg).unwrap_or_else(|shared| Routed {
                        key: shared.key.clone(),
                        properties: shared.properties.clone(),
                        payload: shared.payload.clone(),
                        publish_time_ms: shared.publish_time_ms,
                    });
                    if let Some(m) = &meters {
                        m.delivered(msg.payload.len());
                    }
                    let delivery_id = next_id;
                    next_id += 1;
                    unacked.insert(delivery_id);
                    deliveries.push(types::Delivery {
                        subscription: sub,
                        delivery_id,
                        key: msg.key,
                        payload: msg.payload,
                        properties: msg.properties,
                        publish_time_ms: msg.publish_time_ms,
                        redelivery_count: 0,
                    });
                }
                if events
                    .send(Event::Deliveries { conn, deliveries })
                    .await
                    .is_err()
                {
                    return;
                }
                continue;
            }
        }
        tokio::select! {
            biased;
            cmd = cmds.recv() => match cmd {
                Some(c) => on_command(c, &mut unacked, &mut stop),
                None => return,
            },
            _ = shared.closed() => return,
            _ = inbox.ready.notified(), if room > 0 => {}
        }
    }
}

/// One command of the plugin to a route: acks open its window, a close ends it.
fn on_command(cmd: SubCmd, unacked: &mut HashSet<u64>, stop: &mut bool) {
    match cmd {
        SubCmd::Ack(id) => {
            unacked.remove(&id);
        }
        SubCmd::AckMany(ids) => {
            for id in ids {
                unacked.remove(&id);
            }
        }
        SubCmd::Close { .. } => *stop = true,
        // A live route keeps nothing to give back or move: a nack frees its window slot, as
        // an ack does (the message is gone, as a QoS 0 one), and seeks are not for routes.
        SubCmd::Nack(id) => {
            unacked.remove(&id);
        }
        SubCmd::Seek { .. } | SubCmd::LastId { .. } | SubCmd::Drain | SubCmd::Backlog(_) => {
            tracing::debug!("a seek, last-id query, drain or count on a live route ignored")
        }
    }
}
