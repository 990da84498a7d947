//! The delivery task of a subscription: it opens the backend consumer, hands the plugin
//! what arrives (in batches, never more than `max-unacked` unacknowledged, and only while the
//! connection's output is not congested: backpressure from the client's socket reaches the
//! broker's flow permits), and turns the plugin's acks into the backend's (`acks`).
//!
//! A `messaging` consumer grants the broker its flow permits itself, as its window opens:
//! the broker never sends it more than `max-unacked` minus what it holds unacknowledged, so
//! on a Shared subscription a consumer whose window is full gets nothing more and the
//! others get the queue's messages (AMQP's prefetch). Other subscriptions let the client
//! ask for `max-unacked` at a time as messages arrive, which keeps more in flight.
//!
//! A drained `messaging` consumer (`flow.drain`, AMQP's `basic.cancel` of a consumer that
//! holds deliveries) grants no more permits and hands the plugin nothing more: what the
//! broker still sends it (permits granted before) goes back at once with a negative ack,
//! never counted by a capped queue. It keeps taking acks and nacks until it is closed.
//!
//! A `messaging` consumer of a capped queue's subscription moves the queue's count (`caps`):
//! what it hands the plugin leaves the ready messages, what it gives back (a nack, its end
//! with deliveries unacknowledged) returns, a seek to the end (a purge) empties them; a
//! delivery that `drop-head` dropped carries `caps::DROPPED_PROPERTY`. A durable route's
//! reader of a queue whose count this process has not recovered yet recovers it from the
//! subscription's backlog before the route is open.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use pulsar::proto::MessageIdData;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::acks::{AckPlan, AckTracker};
use super::caps::{Held, QueueCount, DROPPED_PROPERTY};
use super::context::op_error;
use super::event::Event;
use super::services::Services;
use crate::abi::types::{self, ErrorKind};
use crate::abi::v0_2::exports::magnetar::plugin::events;
use crate::backend::{Backend, SubscribeOptions};
use crate::conn_shared::ConnShared;
use crate::message_id;
use crate::quota::{Gauge, Meters};

/// A command to a subscription's delivery task.
pub(super) enum SubCmd {
    Ack(u64),
    AckMany(Vec<u64>),
    Close {
        delete: bool,
    },
    /// A negative ack (`messaging.nack`).
    Nack(u64),
    /// `flow.drain`: nothing more for the plugin; what it holds stays open.
    Drain,
    /// `messaging.seek`.
    Seek {
        token: u64,
        target: SeekTarget,
    },
    /// `messaging.last-message-id`.
    LastId {
        token: u64,
    },
    /// The subscription's backlog as the backend counts it (`durable.queue-backlog` of the
    /// queue this consumer reads): `None` if the backend cannot say.
    Backlog(tokio::sync::oneshot::Sender<Option<u64>>),
}

/// Where a seek moves a consumer.
pub(super) enum SeekTarget {
    /// A message id (or `earliest`/`latest`); `inclusive`: that message comes first.
    MessageId(MessageIdData, bool),
    PublishTime(u64),
}

/// How a subscription's messages reach the plugin.
pub(super) enum Shape {
    /// As `delivery` records (`handler.on-deliveries`): pubsub subscriptions and routes.
    Deliveries,
    /// As `message` records with their ids (`events.on-messages`): `messaging` consumers.
    Messages {
        nack_delay: Duration,
        /// Skip the messages before this one (and it, unless `inclusive`): the backend
        /// starts a reader or a seek at the id's whole entry.
        skip: Option<(MessageIdData, bool)>,
    },
}

/// What a subscription's delivery task needs.
pub(super) struct SubTask {
    pub(super) conn: u64,
    pub(super) sub: u64,
    pub(super) token: u64,
    pub(super) max_unacked: usize,
    pub(super) events: mpsc::Sender<Event>,
    pub(super) shared: Arc<ConnShared>,
    pub(super) backend: Arc<Backend>,
    pub(super) services: Arc<Services>,
    /// Quotas the subscription counts against (released when it ends).
    pub(super) meters: Option<Meters>,
    pub(super) shape: Shape,
    /// A `messaging` consumer of a queue's subscription: its deliveries not settled yet,
    /// shared with the host calls (`caps`).
    pub(super) held: Option<Arc<Held>>,
}

/// Holds one subscription of a quota until the subscription's task ends.
pub(super) struct SubscriptionCount(pub(super) Option<Meters>);

impl Drop for SubscriptionCount {
    fn drop(&mut self) {
        if let Some(m) = &self.0 {
            m.release(Gauge::Subscriptions);
        }
    }
}

/// Opens a consumer, reports the outcome, then delivers until the subscription or its
/// connection closes.
pub(super) async fn run_subscription(
    t: SubTask,
    opts: SubscribeOptions,
    mut cmds: mpsc::Receiver<SubCmd>,
) {
    let SubTask {
        conn,
        sub,
        token,
        max_unacked,
        events,
        shared,
        backend,
        services,
        meters,
        mut shape,
        held,
    } = t;
    let _counted = SubscriptionCount(meters.clone());
    let windowed = matches!(shape, Shape::Messages { .. });
    let opened = if windowed {
        backend.subscribe_windowed(&opts).await
    } else {
        backend.subscribe(&opts).await
    };
    let mut consumer = match opened {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(conn, error = %e, "subscribe failed");
            subscribe_failed(&events, conn, token, e.to_string()).await;
            return;
        }
    };
    let queue_of =
        (opts.subscription == super::routing::QUEUE_SUBSCRIPTION).then(|| opts.topic.clone());
    // A durable route's reader of a capped queue: the subscription's only consumer
    // (Exclusive), so its whole backlog is ready.
    let recovering = queue_of
        .as_ref()
        .and_then(|q| services.caps.get(q))
        .filter(|c| c.needs_recovery() && opts.sub_type == pulsar::SubType::Exclusive);
    if let Some(count) = recovering {
        recover(&mut consumer, &count, &opts.topic).await;
    }
    // A `messaging` consumer of a capped queue moves its count (a route's own deliveries do
    // not: its plugin hands them to nobody, e.g. AMQP's); looked up again for each batch (a
    // route may cap the queue later).
    let capped = |services: &Services| -> Option<Arc<QueueCount>> {
        held.as_ref().and_then(|h| services.caps.get(h.topic()))
    };
    if !subscribed(&events, conn, token, sub).await {
        return;
    }
    // Exclusive and Failover subscriptions have one active consumer reading in order, so a
    // run of acknowledged messages below every unacknowledged one is one cumulative ack.
    // Not where a message can be given back (a nack): a cumulative ack would cover it before
    // it came again.
    let cumulative = matches!(
        opts.sub_type,
        pulsar::SubType::Exclusive | pulsar::SubType::Failover
    ) && matches!(shape, Shape::Deliveries);
    let mut acks = AckTracker::new(cumulative);
    let mut delete = false;
    // Negative acks waiting out the consumer's delay (one delay: in order of their due time).
    let mut nacks: VecDeque<(Instant, String, MessageIdData)> = VecDeque::new();
    // A windowed consumer's permits granted and not yet taken (a batch entry can take more
    // than its permits: then below zero).
    let mut permits: i64 = 0;
    // Drained (`flow.drain`): no room, ever again.
    let mut draining = false;
    loop {
        let room = if draining {
            0
        } else {
            max_unacked.saturating_sub(acks.unacked())
        };
        if windowed {
            let free = room as i64 - permits;
            // At once when nothing is on the way, else half a window at a time: one flow
            // command per ack would double the commands of a consumer that acks each message.
            if free > 0 && (permits <= 0 || free >= max_unacked.div_ceil(2) as i64) {
                let grant = u32::try_from(free).unwrap_or(u32::MAX);
                match consumer.grant_permits(&opts.topic, grant).await {
                    Ok(()) => permits += i64::from(grant),
                    Err(e) => {
                        tracing::warn!(conn, error = %e, "cannot grant flow permits");
                        break;
                    }
                }
            }
        }
        let nack_due = nacks.front().map(|n| n.0);
        tokio::select! {
            biased;
            cmd = cmds.recv() => {
                // Take every command already queued: the plugin's acks arrive one host call
                // at a time and leave in one batch.
                let mut stop = cmd.is_none();
                let mut next = cmd;
                while let Some(c) = next.take() {
                    match c {
                        SubCmd::Ack(id) => {
                            if let Some(h) = &held {
                                h.settled(id);
                            }
                            acks.ack(id)
                        }
                        SubCmd::AckMany(ids) => ids.into_iter().for_each(|id| {
                            if let Some(h) = &held {
                                h.settled(id);
                            }
                            acks.ack(id)
                        }),
                        SubCmd::Close { delete: d } => {
                            delete = d;
                            stop = true;
                            break;
                        }
                        // Only a windowed consumer's permits stop (another's client grants
                        // them itself: what it took back would come again).
                        SubCmd::Drain => draining = windowed,
                        SubCmd::Nack(id) => {
                            // Given back at the host call already, unless it came another way.
                            if let Some(h) = &held {
                                h.given_back(&services.caps, id);
                            }
                            if let (Some((topic, entry)), Shape::Messages { nack_delay, .. }) = (acks.nack(id), &shape) {
                                nacks.push_back((Instant::now() + *nack_delay, topic, entry));
                            }
                        }
                        SubCmd::Seek { token, target } => {
                            let outcome = seek(&mut consumer, &backend, &target).await;
                            if outcome.is_ok() {
                                acks.reset();
                                nacks.clear();
                                if let Some(h) = &held {
                                    h.clear();
                                }
                                if let (Some(count), SeekTarget::MessageId(id, _)) = (capped(&services), &target) {
                                    if *id == message_id::latest() {
                                        count.purged();
                                    }
                                }
                                // A new consumer, granted nothing yet.
                                permits = 0;
                                if let (Shape::Messages { skip, .. }, SeekTarget::MessageId(id, inclusive)) = (&mut shape, target) {
                                    *skip = (!message_id::is_sentinel(&id)).then_some((id, inclusive));
                                }
                            }
                            let outcome = outcome.map(|()| None).map_err(|e| op_error(ErrorKind::Backend, format!("seek on {}: {e}", opts.topic)));
                            if events.send(Event::Position { conn, token, outcome }).await.is_err() {
                                stop = true;
                            }
                        }
                        SubCmd::Backlog(reply) => {
                            // The acks taken before the question count first.
                            if let Err(e) = send_acks(&mut consumer, acks.plan()).await {
                                tracing::warn!(conn, error = %e, "ack failed");
                            }
                            let _ = reply.send(backlog(&mut consumer).await.ok());
                        }
                        SubCmd::LastId { token } => {
                            let outcome = match consumer.get_last_message_id().await {
                                Ok(ids) => Ok(ids.first().filter(|id| id.entry_id != u64::MAX && id.ledger_id != u64::MAX).map(message_id::encode)),
                                Err(e) => Err(op_error(ErrorKind::Backend, format!("last message id of {}: {e}", opts.topic))),
                            };
                            if events.send(Event::Position { conn, token, outcome }).await.is_err() {
                                stop = true;
                            }
                        }
                    }
                    next = cmds.try_recv().ok();
                }
                if let Err(e) = send_acks(&mut consumer, acks.plan()).await {
                    tracing::warn!(conn, error = %e, "ack failed");
                }
                if stop {
                    break;
                }
            },
            _ = shared.closed() => break,
            () = sleep_until(nack_due), if nack_due.is_some() => {
                let now = Instant::now();
                while let Some((_, topic, entry)) = nacks.pop_front_if(|n| n.0 <= now) {
                    if let Err(e) = consumer.nack_with_id(&topic, entry).await {
                        tracing::warn!(conn, error = %e, "negative ack failed");
                    }
                }
            },
            msg = consumer.next(), if room > 0 || draining => {
                // The first message, then every one the consumer already holds, up to the
                // room left: one event to the worker for the lot.
                let mut batch = Vec::new();
                let mut next = Some(msg);
                let mut ended = false;
                while let Some(msg) = next.take() {
                    match msg {
                        Some(Ok(m)) => batch.push(m),
                        Some(Err(e)) => { tracing::warn!(conn, error = %e, "consumer failed"); ended = true; break; }
                        None => { ended = true; break; }
                    }
                    if batch.len() < room.min(MAX_DELIVERY_BATCH) {
                        next = consumer.next().now_or_never();
                    }
                }
                permits -= batch.len() as i64;
                if draining {
                    // Nobody takes it: back to the subscription, for another consumer.
                    for m in batch {
                        if let Err(e) = consumer.nack_with_id(&m.topic, m.message_id.id).await {
                            tracing::warn!(conn, error = %e, "negative ack failed");
                        }
                    }
                    if ended {
                        break;
                    }
                    continue;
                }
                shared.output_relieved().await;
                let count = capped(&services);
                let mut deliveries = Vec::with_capacity(batch.len());
                let mut messages = Vec::new();
                for mut msg in batch {
                    if let Shape::Messages { skip: skip @ Some(_), .. } = &mut shape {
                        if skip.as_ref().is_some_and(|(from, inclusive)| before_start(&msg.message_id.id, from, *inclusive)) {
                            let d = acks.delivered(msg.topic, msg.message_id.id);
                            acks.ack(d);
                            continue;
                        }
                        *skip = None;
                    }
                    // Moved out of the message, not cloned: eight strings or so per delivery.
                    let mut properties: Vec<types::Property> = std::mem::take(&mut msg.payload.metadata.properties).into_iter().map(|kv| types::Property { key: kv.key, value: kv.value }).collect();
                    let key = msg.payload.metadata.partition_key.take();
                    let meta = &msg.payload.metadata;
                    let e2e = Some((meta.encryption_keys.as_slice(), meta.encryption_param.as_deref().unwrap_or_default()));
                    let payload = match services.unseal(&opts.topic, &mut properties, e2e, std::mem::take(&mut msg.payload.data)) {
                        Ok(p) => p,
                        Err(e) => {
                            // Shredded or damaged: nobody can ever read it; it must not block the rest.
                            tracing::warn!(conn, topic = %opts.topic, error = %e, "dropping a message that does not decrypt");
                            let _ = consumer.ack(&msg).await;
                            continue;
                        }
                    };
                    if let Some(m) = &meters {
                        m.delivered(payload.len());
                    }
                    // A durable route's copy says when the original was published.
                    let publish_time_ms = super::feeder::take_published(&mut properties).unwrap_or(meta.publish_time);
                    let event_time_ms = meta.event_time;
                    let redelivery_count = msg.message_id.redelivery_count;
                    let message_id = match shape {
                        Shape::Messages { .. } => message_id::encode(&msg.message_id.id),
                        Shape::Deliveries => Vec::new(),
                    };
                    let delivery_id = acks.delivered(msg.topic, msg.message_id.id);
                    if let Some(count) = &count {
                        let dropped = count.delivered();
                        if dropped {
                            properties.push(types::Property { key: DROPPED_PROPERTY.to_string(), value: "maxlen".to_string() });
                        }
                        if let Some(h) = &held {
                            h.delivered(delivery_id, (!dropped).then_some(payload.len() as u64));
                        }
                    }
                    match shape {
                        Shape::Deliveries => deliveries.push(types::Delivery {
                            subscription: sub,
                            delivery_id,
                            key,
                            properties,
                            publish_time_ms,
                            redelivery_count,
                            payload,
                        }),
                        Shape::Messages { .. } => messages.push(events::Message {
                            subscription: sub,
                            delivery_id,
                            message_id,
                            key,
                            payload,
                            properties,
                            publish_time_ms,
                            event_time_ms,
                            redelivery_count,
                        }),
                    }
                }
                if !deliveries.is_empty()
                    && events.send(Event::Deliveries { conn, deliveries }).await.is_err()
                {
                    break;
                }
                if !messages.is_empty()
                    && events.send(Event::Messages { conn, messages }).await.is_err()
                {
                    break;
                }
                if ended {
                    break;
                }
            }
        }
    }
    // What the plugin had and did not settle goes back to the queue.
    if let (Some(h), false) = (&held, delete) {
        h.all_given_back(&services.caps);
    }
    if delete {
        if let Err(e) = consumer.unsubscribe().await {
            tracing::warn!(conn, error = %e, "unsubscribe failed");
        }
    }
    let _ = consumer.close().await;
}

/// The backlog of `consumer`'s subscription as the backend counts it: its messages not
/// acknowledged yet (delivered ones too).
pub(super) async fn backlog(
    consumer: &mut pulsar::Consumer<Vec<u8>, pulsar::TokioExecutor>,
) -> Result<u64, pulsar::Error> {
    let stats = consumer.get_stats().await?;
    Ok(stats.iter().filter_map(|s| s.msg_backlog).sum())
}

/// Recovers a capped queue's count from its subscription's backlog (0 if the backend
/// cannot say).
pub(super) async fn recover(
    consumer: &mut pulsar::Consumer<Vec<u8>, pulsar::TokioExecutor>,
    count: &QueueCount,
    topic: &str,
) {
    let backlog = match backlog(consumer).await {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(topic, error = %e, "cannot read a capped queue's backlog");
            0
        }
    };
    count.recovered(backlog);
}

/// Tells the plugin its subscription could not be opened (a backend failure).
pub(super) async fn subscribe_failed(
    events: &mpsc::Sender<Event>,
    conn: u64,
    token: u64,
    message: String,
) {
    let outcome = Err(op_error(ErrorKind::Backend, message));
    let _ = events
        .send(Event::SubscribeResult {
            conn,
            token,
            outcome,
        })
        .await;
}

/// Tells the plugin its subscription `sub` is open; `false` if the worker is gone (the task
/// then ends).
pub(super) async fn subscribed(
    events: &mpsc::Sender<Event>,
    conn: u64,
    token: u64,
    sub: u64,
) -> bool {
    let outcome = Ok(sub);
    events
        .send(Event::SubscribeResult {
            conn,
            token,
            outcome,
        })
        .await
        .is_ok()
}

/// Waits until `at`; never, without one.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Whether a message comes before a reader's or a seek's start (or is it, not inclusive).
fn before_start(id: &MessageIdData, start: &MessageIdData, inclusive: bool) -> bool {
    let (at, from) = (message_id::order_key(id), message_id::order_key(start));
    at < from || (at == from && !inclusive)
}

/// Moves a consumer (the backend recreates it at the new position).
async fn seek(
    consumer: &mut pulsar::Consumer<Vec<u8>, pulsar::TokioExecutor>,
    backend: &Backend,
    target: &SeekTarget,
) -> Result<(), pulsar::Error> {
    let client = backend.client().clone();
    match target {
        SeekTarget::MessageId(id, _) => consumer.seek(None, Some(id.clone()), None, client).await,
        SeekTarget::PublishTime(t) => consumer.seek(None, None, Some(*t), client).await,
    }
}

/// Most deliveries handed to the worker in one event.
const MAX_DELIVERY_BATCH: usize = 256;

/// Sends the backend the acknowledgements of `plan`: the cumulative one first, then one
/// individual ack command per topic. The last error, if any, is returned.
async fn send_acks(
    consumer: &mut pulsar::Consumer<Vec<u8>, pulsar::TokioExecutor>,
    plan: AckPlan,
) -> Result<(), pulsar::error::ConsumerError> {
    let mut result = Ok(());
    if let Some((topic, id)) = plan.cumulative {
        result = consumer.cumulative_ack_with_id(&topic, id).await;
    }
    for (topic, ids) in plan.individual {
        if let Err(e) = consumer.ack_many_with_id(&topic, ids).await {
            result = Err(e);
        }
    }
    result
}
