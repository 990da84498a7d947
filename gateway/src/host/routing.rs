//! Host calls of routing (ABI 0.2.1): `open-route`, `bind`, `unbind`. Acks, deliveries and
//! `unsubscribe` are those of `pubsub`: a route is a subscription whose messages the host
//! picked by filter — a live route's from the router's reader (`router`), a durable route's
//! from its queue, which the source's feeder fills (`feeder`).
//!
//! Also the calls of `caps` (ABI 0.2.5): `open-capped-route` (a durable route whose queue
//! has a cap) and `publish-capped` (a publish judged by the caps of the queues it reaches;
//! see `caps`); and of `durable` (ABI 0.2.6): `store-route`, a durable route stored and fed
//! with no reader of its queue.

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use tokio::sync::mpsc;

use super::caps::{Cap, Overflow, REFUSED_PROPERTY};
use super::context::{op_error, HostState};
use super::event::Event;
use super::feeder::{encode, Feeder, Feeders, Named, RouteRecord};
use super::ops_task::{Op, RouteStored};
use super::router::{RouteOpen, Router, Source};
use super::services::Services;
use super::subscription_task::{
    backlog, recover, run_subscription, subscribe_failed, Shape, SubCmd, SubTask, SubscriptionCount,
};
use crate::abi::types::{self, ErrorKind, OpError};
use crate::abi::v0_2::magnetar::plugin::routing::{self, Filter as AbiFilter};
use crate::abi::v0_2::magnetar::plugin::{caps, durable};
use crate::backend::SubscribeOptions;
use crate::config::ActionName;
use crate::quota::Gauge;
use crate::routing::Filter;

/// The subscription through which a durable route reads its queue (and the consumers of
/// the queue read it).
pub(super) const QUEUE_SUBSCRIPTION: &str = "magnetar-queue";

/// A route of a connection.
pub(super) enum RouteRef {
    /// A live route: its source and its id there.
    Live { source: Arc<Source>, route: u64 },
    /// A durable route: its feeder, its queue (full topic) and its filters.
    Durable {
        feeder: Arc<Feeder>,
        queue: String,
        filters: Vec<Filter>,
        /// Its copies are stored one message per entry (`max-unacked` 1, see `feeder`).
        one_per_entry: bool,
        /// Its queue's cap.
        cap: Option<Cap>,
    },
}

/// A cap given with `open-capped-route`: `None` keeps the queue's (`open-route`).
type CapChange = Option<Option<Cap>>;

/// A queue topic's name in its namespace.
fn short(topic: &str) -> &str {
    topic.rsplit('/').next().unwrap_or(topic)
}

impl HostState {
    /// Stores a durable route (`None`: deletes it), in order with the connection's other
    /// backend operations.
    pub(super) fn store_route(
        &mut self,
        conn: u64,
        feeder: &Feeder,
        queue: &str,
        route: Option<&RouteRecord>,
    ) {
        let op = Op::RouteWrite {
            topic: feeder.kv_topic().to_string(),
            key: feeder.key(queue),
            value: route.map(encode),
            stored: None,
        };
        self.queue_op(conn, op);
    }

    /// A durable route's record (its filters, how its copies are stored, its queue's cap),
    /// given to the source's feeder (which copies into the queue from then on) and to the
    /// caps; not stored yet. Its feeder and its queue (full topic).
    fn durable_record(
        &mut self,
        conn: u64,
        source: Named<'_>,
        queue: &str,
        filters: Vec<Filter>,
        one_per_entry: bool,
        cap: CapChange,
    ) -> Result<(Arc<Feeder>, String, RouteRecord), OpError> {
        let queue = self.authorized_topic(conn, queue, ActionName::Consume)?;
        let kv_topic = self.kv_topic(conn)?;
        let feeder = Feeders::get(&self.services, &self.runtime, &source, &kv_topic);
        let cap = cap.unwrap_or_else(|| feeder.cap(&queue));
        match cap {
            Some(cap) => {
                self.services.caps.counted(&queue, cap);
            }
            None => self.services.caps.remove(&queue),
        }
        let record = RouteRecord {
            filters,
            one_per_entry,
            cap,
        };
        feeder.set_local(&queue, record.clone());
        Ok((feeder, queue, record))
    }

    /// `durable.store-route`: a durable route stored and fed, with no reader of its queue.
    /// Completes as a kv write (in order with the connection's operations) once it is
    /// stored, its queue's subscription exists and the feeder reads the source
    /// (`ops_task`).
    pub(super) fn store_durable(
        &mut self,
        conn: u64,
        token: u64,
        spec: routing::RouteSpec,
        cap: Option<Cap>,
    ) {
        let fail = |s: &Self, e: OpError| {
            s.complete(Event::KvResult {
                conn,
                token,
                outcome: Err(e),
            })
        };
        let Some(queue) = spec.queue.as_deref() else {
            return fail(
                self,
                invalid("a stored route is a durable route (with a queue)"),
            );
        };
        let (topic, filters) = match self.route_source(conn, &spec) {
            Ok(checked) => checked,
            Err(e) => return fail(self, e),
        };
        let source = Named {
            topic,
            short: &spec.source,
            key_property: spec.key_property.as_deref(),
        };
        let one_per_entry = spec.max_unacked <= 1;
        match self.durable_record(conn, source, queue, filters, one_per_entry, Some(cap)) {
            Ok((feeder, queue, record)) => {
                let op = Op::RouteWrite {
                    topic: feeder.kv_topic().to_string(),
                    key: feeder.key(&queue),
                    value: Some(encode(&record)),
                    stored: Some(RouteStored {
                        token,
                        feeder,
                        queue,
                    }),
                };
                self.queue_op(conn, op);
            }
            Err(e) => fail(self, e),
        }
    }

    /// Opens a durable route: stores its filters, gives them to the source's feeder, and
    /// reads its queue once the feeder reads the source.
    #[allow(clippy::too_many_arguments)]
    fn open_durable(
        &mut self,
        conn: u64,
        token: u64,
        source: Named<'_>,
        queue: &str,
        filters: Vec<Filter>,
        max_unacked: usize,
        cap: CapChange,
    ) -> Result<(), OpError> {
        let one_per_entry = max_unacked == 1;
        let (feeder, queue, record) =
            self.durable_record(conn, source, queue, filters.clone(), one_per_entry, cap)?;
        let cap = record.cap;
        self.store_route(conn, &feeder, &queue, Some(&record));
        if !self.conns.contains_key(&conn) {
            return Ok(());
        }
        let meters = self.admit_subscription(conn)?;
        let Some(slot) = self.conns.get(&conn) else {
            return Ok(());
        };
        let sub = self.next_sub;
        self.next_sub += 1;
        let (cmd_tx, cmd_rx) = mpsc::channel(max_unacked + 16);
        let task = SubTask {
            conn,
            sub,
            token,
            max_unacked,
            events: self.events.clone(),
            shared: slot.shared.clone(),
            backend: self.services.backend.clone(),
            services: self.services.clone(),
            meters: meters.clone(),
            shape: Shape::Deliveries,
            held: None,
        };
        let opts = SubscribeOptions {
            topic: queue.clone(),
            subscription: QUEUE_SUBSCRIPTION.to_string(),
            sub_type: pulsar::SubType::Exclusive,
            durable: true,
            // The queue holds only this route's copies: all of them.
            earliest: true,
            receiver_queue: max_unacked as u32,
            start_message_id: None,
            dead_letter: None,
            consumer_name: None,
        };
        if let Some(slot) = self.conns.get_mut(&conn) {
            slot.subs.insert(sub, cmd_tx);
            let route = RouteRef::Durable {
                feeder: feeder.clone(),
                queue,
                filters,
                one_per_entry,
                cap,
            };
            slot.routes.insert(sub, route);
        }
        let events = self.events.clone();
        self.runtime.spawn(async move {
            match feeder.ready().await {
                Ok(()) => run_subscription(task, opts, cmd_rx).await,
                Err(e) => {
                    // The subscription counted against the quotas ends here.
                    drop(SubscriptionCount(meters));
                    subscribe_failed(&events, conn, token, e).await;
                }
            }
        });
        Ok(())
    }

    /// A route's filters changed: a durable route's are given to its feeder and stored.
    fn route_changed(&mut self, conn: u64, route: u64) {
        let Some(RouteRef::Durable {
            feeder,
            queue,
            filters,
            one_per_entry,
            cap,
        }) = self.conns.get(&conn).and_then(|s| s.routes.get(&route))
        else {
            return;
        };
        let (feeder, queue) = (feeder.clone(), queue.clone());
        let record = RouteRecord {
            filters: filters.clone(),
            one_per_entry: *one_per_entry,
            cap: *cap,
        };
        feeder.set_local(&queue, record.clone());
        self.store_route(conn, &feeder, &queue, Some(&record));
    }

    /// `caps.open-capped-route`: `open-route` for a durable route whose queue keeps at most
    /// `cap` (`None`: no cap any more).
    pub(super) fn open_capped_route(
        &mut self,
        conn: u64,
        token: u64,
        spec: routing::RouteSpec,
        cap: Option<Cap>,
    ) {
        if spec.queue.is_none() {
            return self.complete(Event::SubscribeResult {
                conn,
                token,
                outcome: Err(invalid("a cap is for a durable route (with a queue)")),
            });
        }
        self.open_route_with(conn, token, spec, Some(cap));
    }

    /// `caps.publish-capped`: `publish`, judged first by the caps of the queues the message
    /// reaches through this gateway's durable routes on its topic. Returns the queues that
    /// refused it (short topic names) and whether each dead-letters what it refuses
    /// (`reject-publish-dlx`); the message is stored all the same and copied into the
    /// other queues only.
    pub(super) fn publish_capped(
        &mut self,
        conn: u64,
        token: u64,
        msg: types::OutboundMessage,
    ) -> Vec<(String, bool)> {
        let topic = self.authorized_topic(conn, &msg.topic, ActionName::Produce);
        let mut out = super::pubsub::backend_message(msg);
        let mut refused: Vec<(String, bool)> = Vec::new();
        if let Ok(t) = &topic {
            let size = out.payload.len() as u64;
            for feeder in self.services.feeders.of_source(t) {
                for (queue, cap) in feeder.capped_targets(out.key.as_deref(), &out.properties) {
                    if !self.services.caps.counted(&queue, cap).admit(size) {
                        let dlx = cap.overflow == Overflow::RejectPublishDlx;
                        refused.push((short(&queue).to_string(), dlx));
                    }
                }
            }
            if !refused.is_empty() {
                let names: Vec<&str> = refused.iter().map(|(q, _)| q.as_str()).collect();
                out.properties
                    .insert(REFUSED_PROPERTY.to_string(), names.join(" "));
            }
        }
        self.queue_publish(conn, token, topic, out, false);
        refused
    }

    /// A route's source topic, authorized for consumption, and its filters, validated.
    fn route_source(
        &self,
        conn: u64,
        spec: &routing::RouteSpec,
    ) -> Result<(String, Vec<Filter>), OpError> {
        let topic = self.authorized_topic(conn, &spec.source, ActionName::Consume)?;
        let filters: Vec<Filter> = spec.filters.iter().cloned().map(filter).collect();
        if let Some(e) = filters.iter().find_map(|f| f.validate().err()) {
            return Err(invalid(e));
        }
        Ok((topic, filters))
    }

    /// `open-route`, with a change of the queue's cap for a durable route.
    fn open_route_with(&mut self, conn: u64, token: u64, spec: routing::RouteSpec, cap: CapChange) {
        let fail = |s: &Self, e: OpError| {
            s.complete(Event::SubscribeResult {
                conn,
                token,
                outcome: Err(e),
            })
        };
        let (topic, filters) = match self.route_source(conn, &spec) {
            Ok(checked) => checked,
            Err(e) => return fail(self, e),
        };
        let max_unacked = spec.max_unacked.clamp(1, 10_000) as usize;
        let max_queued = spec.max_queued.clamp(1, 1_000_000) as usize;
        if let Some(queue) = &spec.queue {
            let source = Named {
                topic,
                short: &spec.source,
                key_property: spec.key_property.as_deref(),
            };
            if let Err(e) = self.open_durable(conn, token, source, queue, filters, max_unacked, cap)
            {
                fail(self, e);
            }
            return;
        }
        self.open_live(
            conn,
            token,
            topic,
            spec.key_property,
            filters,
            max_unacked,
            max_queued,
        );
    }

    /// A live route: registered with the router.
    #[allow(clippy::too_many_arguments)]
    fn open_live(
        &mut self,
        conn: u64,
        token: u64,
        topic: String,
        key_property: Option<String>,
        filters: Vec<Filter>,
        max_unacked: usize,
        max_queued: usize,
    ) {
        let fail = |s: &Self, e: OpError| {
            s.complete(Event::SubscribeResult {
                conn,
                token,
                outcome: Err(e),
            })
        };
        let sub = self.next_sub;
        self.next_sub += 1;
        if !self.conns.contains_key(&conn) {
            return;
        }
        let meters = match self.admit_subscription(conn) {
            Ok(m) => m,
            Err(e) => return fail(self, e),
        };
        let Some(slot) = self.conns.get(&conn) else {
            return;
        };
        let (cmd_tx, cmd_rx) = mpsc::channel(max_unacked + 16);
        let open = RouteOpen {
            conn,
            sub,
            token,
            topic,
            key_property,
            filters,
            max_unacked,
            max_queued,
            events: self.events.clone(),
            shared: slot.shared.clone(),
            meters,
        };
        match Router::open(&self.services, &self.runtime, open, cmd_rx) {
            Ok((source, route)) => {
                if let Some(slot) = self.conns.get_mut(&conn) {
                    slot.subs.insert(sub, cmd_tx);
                    slot.routes.insert(sub, RouteRef::Live { source, route });
                }
            }
            // Validated above; the route task never started, so the quota is released here.
            Err(e) => {
                if let Some(m) = self.conns.get(&conn).and_then(|s| s.meters.as_ref()) {
                    m.release(Gauge::Subscriptions);
                }
                fail(self, invalid(e))
            }
        }
    }
}

/// A stored route (`durable.store-route`) once written: its source's feeder reads, and its
/// queue is ready for consumers that need no reader of the route (`prepare_queue`).
pub(super) async fn route_stored(
    services: &Services,
    stored: &RouteStored,
) -> Result<Option<Vec<u8>>, OpError> {
    stored
        .feeder
        .ready()
        .await
        .map_err(|e| op_error(ErrorKind::Backend, e))?;
    prepare_queue(services, &stored.queue).await;
    Ok(None)
}

/// Readies a stored route's queue for consumers that need no reader of the route: its
/// subscription exists (from the queue's start, so the copies the feeder stores before the
/// first consumer wait for it), and a capped queue whose count this process has not
/// recovered yet gets it from the subscription's backlog, through an Exclusive consumer
/// (then the subscription's only one, so its whole backlog is ready). Refused (others hold
/// the subscription): the subscription exists, and the count is recovered by the next route
/// or store that finds the queue free.
async fn prepare_queue(services: &Services, queue: &str) {
    let recovering = services.caps.get(queue).filter(|c| c.needs_recovery());
    let exclusive = recovering.is_some();
    match permitless_consumer(services, queue, exclusive).await {
        Ok(mut consumer) => {
            if let Some(count) = recovering {
                recover(&mut consumer, &count, queue).await;
            }
            let _ = consumer.close().await;
        }
        Err(e) => tracing::debug!(queue, error = %e, "a stored route's queue is held"),
    }
}

/// How long a count waits for the feeders to copy what their sources held: past the
/// backend's Failover takeover delay (1 s, a feeder that just started or reconnected after a
/// failed copy copies nothing before it) and a loaded machine's slow writes; it only bounds
/// a feeder that is not running (one that fails hands its waiters to its next consumer).
const CATCH_UP_BOUND: Duration = Duration::from_secs(5);

/// A queue's messages not acknowledged yet, as the backend counts them, once the copies of
/// every message its sources held when asked are stored (so a message confirmed before the
/// question counts; bounded by [`CATCH_UP_BOUND`]); `None` if the backend cannot say (an
/// Exclusive reader holds the subscription).
async fn queue_backlog(
    services: &Services,
    queue: &str,
    reader: Option<mpsc::Sender<SubCmd>>,
) -> Option<u64> {
    let feeders = services.feeders.of_queue(queue);
    let caught_up = join_all(feeders.iter().map(|f| f.caught_up()));
    if tokio::time::timeout(CATCH_UP_BOUND, caught_up)
        .await
        .is_err()
    {
        tracing::debug!(queue, "counted before its feeder caught up");
    }
    // Through the connection's own consumer of the queue, if it has one (AMQP's getter or
    // consumer): no consumer opened and closed for the count.
    if let Some(reader) = reader {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if reader.send(SubCmd::Backlog(tx)).await.is_ok() {
            if let Ok(Some(n)) = rx.await {
                return Some(n);
            }
        }
    }
    let read = || async {
        let mut consumer = permitless_consumer(services, queue, false)
            .await
            .map_err(|e| e.to_string())?;
        let count = backlog(&mut consumer).await.map_err(|e| e.to_string());
        let _ = consumer.close().await;
        count
    };
    for attempt in 1..=COUNT_ATTEMPTS {
        match read().await {
            Ok(n) => return Some(n),
            Err(e) if attempt == COUNT_ATTEMPTS => {
                tracing::debug!(queue, error = %e, "a queue's backlog not read");
            }
            // An Exclusive reader (a route probing the queue, a plugin's sweep of it) holds
            // the subscription for a moment.
            Err(_) => tokio::time::sleep(COUNT_RETRY).await,
        }
    }
    None
}

/// Tries at reading a queue's backlog while an Exclusive reader holds its subscription,
/// and the wait between two: past a probe's round trip and an AMQP sweep's wait for a
/// message (100 ms).
const COUNT_ATTEMPTS: u32 = 4;
const COUNT_RETRY: Duration = Duration::from_millis(60);

/// A consumer of `queue`'s subscription (created from the queue's start if new) that
/// grants the backend no flow permit, so it is handed nothing and no message it holds is
/// ever redelivered: Shared, beside the queue's consumers, or Exclusive.
async fn permitless_consumer(
    services: &Services,
    queue: &str,
    exclusive: bool,
) -> Result<pulsar::Consumer<Vec<u8>, pulsar::TokioExecutor>, crate::backend::BackendError> {
    let opts = SubscribeOptions {
        topic: queue.to_string(),
        subscription: QUEUE_SUBSCRIPTION.to_string(),
        sub_type: if exclusive {
            pulsar::SubType::Exclusive
        } else {
            pulsar::SubType::Shared
        },
        durable: true,
        earliest: true,
        receiver_queue: 1,
        start_message_id: None,
        dead_letter: None,
        consumer_name: None,
    };
    services.backend.subscribe_windowed(&opts).await
}

fn filter(f: AbiFilter) -> Filter {
    match f {
        AbiFilter::Mqtt(f) => Filter::Mqtt(f),
        AbiFilter::AmqpTopic(f) => Filter::AmqpTopic(f),
        AbiFilter::Exact(k) => Filter::Exact(k),
        AbiFilter::All => Filter::All,
        AbiFilter::Headers(h) => Filter::Headers {
            match_all: h.match_all,
            args: h.args.into_iter().map(|p| (p.key, p.value)).collect(),
        },
    }
}

fn invalid(e: impl ToString) -> OpError {
    op_error(ErrorKind::InvalidName, e.to_string())
}

impl routing::Host for HostState {
    /// `open-route`: registers the route with the router; completes with
    /// `on-subscribe-result` once its source is being read.
    fn open_route(&mut self, conn: u64, token: u64, spec: routing::RouteSpec) {
        self.open_route_with(conn, token, spec, None);
    }

    /// `bind`: adds a filter to an open route.
    fn bind(&mut self, conn: u64, route: u64, f: AbiFilter) -> Result<(), OpError> {
        let f = filter(f);
        f.validate().map_err(invalid)?;
        match self
            .conns
            .get_mut(&conn)
            .and_then(|s| s.routes.get_mut(&route))
        {
            None => return Err(op_error(ErrorKind::NotFound, "no such route")),
            Some(RouteRef::Live { source, route }) => {
                source.bind(*route, &f).map_err(invalid)?;
                return Ok(());
            }
            Some(RouteRef::Durable { filters, .. }) => {
                if filters.contains(&f) {
                    return Ok(());
                }
                filters.push(f);
            }
        }
        self.route_changed(conn, route);
        Ok(())
    }

    /// `unbind`: removes a filter from an open route.
    fn unbind(&mut self, conn: u64, route: u64, f: AbiFilter) {
        let f = filter(f);
        match self
            .conns
            .get_mut(&conn)
            .and_then(|s| s.routes.get_mut(&route))
        {
            None => {}
            Some(RouteRef::Live { source, route }) => {
                source.unbind(*route, &f);
            }
            Some(RouteRef::Durable { filters, .. }) => {
                let before = filters.len();
                filters.retain(|x| *x != f);
                if filters.len() != before {
                    self.route_changed(conn, route);
                }
            }
        }
    }
}

impl durable::Host for HostState {
    /// `store-route`: a durable route stored and fed, with no reader of its queue.
    fn store_route(
        &mut self,
        conn: u64,
        token: u64,
        spec: routing::RouteSpec,
        cap: Option<caps::Cap>,
    ) {
        HostState::store_durable(self, conn, token, spec, cap.map(abi_cap));
    }

    /// `queue-backlog`: the messages a queue holds, read without taking any.
    fn queue_backlog(&mut self, conn: u64, token: u64, queue: String) {
        let topic = self.authorized_topic(conn, &queue, ActionName::Consume);
        let reader = match (&topic, self.conns.get(&conn)) {
            (Ok(t), Some(slot)) => slot
                .held
                .iter()
                .find(|(_, h)| h.topic() == t)
                .and_then(|(sub, _)| slot.subs.get(sub).cloned()),
            _ => None,
        };
        let services = self.services.clone();
        self.complete_kv_later(conn, token, async move {
            let t = topic?;
            Ok(queue_backlog(&services, &t, reader)
                .await
                .map(|n| n.to_be_bytes().to_vec()))
        });
    }
}

/// A cap as the ABI gives it.
fn abi_cap(c: caps::Cap) -> Cap {
    Cap {
        max_length: c.max_length,
        max_bytes: c.max_length_bytes,
        overflow: match c.overflow {
            caps::Overflow::DropHead => Overflow::DropHead,
            caps::Overflow::RejectPublish => Overflow::RejectPublish,
            caps::Overflow::RejectPublishDlx => Overflow::RejectPublishDlx,
        },
    }
}

impl caps::Host for HostState {
    /// `open-capped-route`: `open-route` with the queue's cap.
    fn open_capped_route(
        &mut self,
        conn: u64,
        token: u64,
        spec: routing::RouteSpec,
        cap: Option<caps::Cap>,
    ) {
        HostState::open_capped_route(self, conn, token, spec, cap.map(abi_cap));
    }

    /// `publish-capped`: `publish`, judged by the caps of the queues it reaches.
    fn publish_capped(
        &mut self,
        conn: u64,
        token: u64,
        msg: types::OutboundMessage,
    ) -> Vec<caps::Refusal> {
        HostState::publish_capped(self, conn, token, msg)
            .into_iter()
            .map(|(queue, dead_letter)| caps::Refusal { queue, dead_letter })
            .collect()
    }
}
