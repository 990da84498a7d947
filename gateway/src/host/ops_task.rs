//! The operations task of a connection: its publishes and kv operations run in the order the
//! plugin issued them (the order lives in `op_queue`), many in flight, and their outcomes go
//! back to the worker as events. A task runs only while the connection has work.

use std::sync::Arc;

use futures::stream::FuturesOrdered;
use futures::{FutureExt, StreamExt};
use tokio::sync::mpsc;

use super::context::{op_error, HostState};
use super::event::Event;
use super::feeder::Feeder;
use super::op_queue::{OpQueue, Queued};
use super::services::Services;
use crate::abi::types::{self, ErrorKind};
use crate::abi::v0_2::exports::magnetar::plugin::events::Receipt;
use crate::backend::OutMessage;
use crate::conn_shared::ConnShared;
use crate::message_id;

/// Operations queued per connection before `publish` fails fast with `quota-exceeded`.
const OPS_QUEUE: usize = 4096;
/// How long a connection's operations task outlives its last operation: an idle connection
/// holds no task and no queue memory.
const OPS_LINGER: std::time::Duration = std::time::Duration::from_secs(2);

/// A backend operation of one connection, run in issue order.
pub(super) enum Op {
    Publish {
        token: u64,
        topic: String,
        msg: OutMessage,
        /// Held back until then by a publish-rate quota.
        not_before: Option<std::time::Instant>,
        /// Completes with the stored message's id (`messaging.send-message`, an
        /// `events.on-receipts`) rather than `on-publish-result`.
        with_id: bool,
    },
    KvGet {
        token: u64,
        topic: String,
        key: String,
    },
    KvPut {
        token: u64,
        topic: String,
        key: String,
        value: Option<Vec<u8>>,
    },
    /// The host's own kv write (a durable route's filters): no event for the plugin, but in
    /// order with its operations, so that what the plugin does next (e.g. an MQTT SUBACK
    /// after its session is saved) comes after it.
    RouteWrite {
        topic: String,
        key: String,
        value: Option<Vec<u8>>,
        /// `durable.store-route`'s: completed for the plugin once stored and fed.
        stored: Option<RouteStored>,
    },
    KvScan {
        token: u64,
        topic: String,
        /// The host's per-plugin key prefix, stripped from the keys found.
        plugin_prefix: String,
        prefix: String,
        start_after: Option<String>,
        limit: usize,
    },
}

/// What `durable.store-route` waits for once its route is written: the source's feeder
/// reading, and the queue's subscription (`routing::route_stored`).
pub(super) struct RouteStored {
    pub(super) token: u64,
    pub(super) feeder: Arc<Feeder>,
    /// The queue (full topic).
    pub(super) queue: String,
}

/// A connection's backend operations waiting to run, shared by the worker (which queues)
/// and the operations task (which runs them).
#[derive(Default)]
pub(super) struct OpsQueue {
    state: std::sync::Mutex<OpQueue<Op>>,
    /// Wakes the running task when an operation is queued.
    added: tokio::sync::Notify,
}

impl OpsQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, OpQueue<Op>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl HostState {
    /// Queues a backend operation of the connection, starting its task if none runs.
    pub(super) fn queue_op(&mut self, conn: u64, op: Op) {
        let Some(slot) = self.conns.get_mut(&conn) else {
            return;
        };
        let queue = slot.ops.get_or_insert_with(Default::default);
        // Counted before the task can see (and finish) it.
        slot.shared.op_started();
        let queued = queue.lock().push(op, OPS_QUEUE);
        match queued {
            Queued::StartTask => {
                let task = run_ops(
                    conn,
                    queue.clone(),
                    self.services.clone(),
                    self.events.clone(),
                    slot.shared.clone(),
                );
                self.runtime.spawn(task);
            }
            Queued::WakeTask => queue.added.notify_one(),
            Queued::Refused(op) => {
                slot.shared.op_finished();
                self.refuse_op(conn, op);
            }
        }
    }

    /// Fails an operation the connection's full queue refused.
    fn refuse_op(&self, conn: u64, refused: Op) {
        let message = "too many operations in flight on this connection";
        let event = match refused {
            Op::Publish {
                token,
                with_id: true,
                ..
            } => Event::Receipts {
                conn,
                receipts: vec![Receipt {
                    token,
                    outcome: Err(op_error(ErrorKind::QuotaExceeded, message)),
                }],
            },
            Op::Publish { token, .. } => Event::PublishResult {
                conn,
                token,
                outcome: Err(op_error(ErrorKind::QuotaExceeded, message)),
            },
            Op::KvGet { token, .. } | Op::KvPut { token, .. } => Event::KvResult {
                conn,
                token,
                outcome: Err(op_error(ErrorKind::QuotaExceeded, message)),
            },
            Op::KvScan { token, .. } => Event::KvScanResult {
                conn,
                token,
                outcome: Err(op_error(ErrorKind::QuotaExceeded, message)),
            },
            Op::RouteWrite {
                stored: Some(stored),
                ..
            } => Event::KvResult {
                conn,
                token: stored.token,
                outcome: Err(op_error(ErrorKind::QuotaExceeded, message)),
            },
            Op::RouteWrite { key, .. } => {
                tracing::warn!(conn, key, "a durable route's filters not stored: {message}");
                return;
            }
        };
        self.complete(event);
    }
}

/// Runs a connection's backend operations in issue order, many in flight. Ends after
/// [`OPS_LINGER`] with nothing queued and nothing in flight (the connection may be gone by
/// then: what it queued still ran); the next operation starts a new task.
async fn run_ops(
    conn: u64,
    queue: Arc<OpsQueue>,
    services: Arc<Services>,
    events: mpsc::Sender<Event>,
    shared: Arc<ConnShared>,
) {
    // The kv's futures are large: boxed while they run, so that the task (which lives as long
    // as the connection is busy) stays small. A publish's is small (`Backend::enqueue`) and
    // runs in place: one allocation less per message.
    let mut receipts = FuturesOrdered::new();
    let idle = tokio::time::sleep(OPS_LINGER);
    tokio::pin!(idle);
    loop {
        // Receipts already in: their events are due before more work starts.
        receipts_done(conn, None, &mut receipts, &shared, &events).await;
        let next = queue.lock().pop();
        let Some(op) = next else {
            tokio::select! {
                // A permit is kept when nobody waits: an operation queued since the check
                // above wakes this at once.
                () = queue.added.notified() => {}
                Some(first) = receipts.next(), if !receipts.is_empty() => {
                    receipts_done(conn, Some(first), &mut receipts, &shared, &events).await;
                }
                () = &mut idle, if receipts.is_empty() => {
                    if queue.lock().stop_if_idle() {
                        return;
                    }
                }
            }
            continue;
        };
        idle.as_mut()
            .reset(tokio::time::Instant::now() + OPS_LINGER);
        match op {
            Op::Publish {
                token,
                topic,
                msg,
                not_before,
                with_id,
            } => {
                if let Some(at) = not_before {
                    tokio::time::sleep_until(at.into()).await;
                }
                let sent = services.backend.enqueue(&topic, msg).await;
                receipts.push_back(async move {
                    let outcome = match sent {
                        Ok(receipt) => receipt
                            .await
                            .map(|r| {
                                with_id
                                    .then(|| message_id::encode(&r.message_id.unwrap_or_default()))
                            })
                            .map_err(|e| {
                                op_error(ErrorKind::Backend, format!("storing on {topic}: {e}"))
                            }),
                        Err(e) => Err(op_error(ErrorKind::Backend, e.to_string())),
                    };
                    Stored {
                        token,
                        outcome,
                        with_id,
                    }
                });
            }
            Op::KvGet { token, topic, key } => {
                let outcome = Box::pin(services.kv.get(&topic, &key))
                    .await
                    .map_err(|e| op_error(ErrorKind::Backend, e.to_string()));
                op_done(
                    &shared,
                    &events,
                    Event::KvResult {
                        conn,
                        token,
                        outcome,
                    },
                )
                .await;
            }
            Op::KvScan {
                token,
                topic,
                plugin_prefix,
                prefix,
                start_after,
                limit,
            } => {
                let outcome = Box::pin(services.kv.scan(
                    &topic,
                    &prefix,
                    start_after.as_deref(),
                    limit,
                ))
                .await
                .map(|found| {
                    found
                        .into_iter()
                        .map(|(key, value)| types::KvEntry {
                            key: key.strip_prefix(&plugin_prefix).unwrap_or(&key).to_string(),
                            value,
                        })
                        .collect()
                })
                .map_err(|e| op_error(ErrorKind::Backend, e.to_string()));
                op_done(
                    &shared,
                    &events,
                    Event::KvScanResult {
                        conn,
                        token,
                        outcome,
                    },
                )
                .await;
            }
            Op::RouteWrite {
                topic,
                key,
                value,
                stored,
            } => {
                let written = Box::pin(services.kv.put(&topic, &key, value))
                    .await
                    .map_err(|e| op_error(ErrorKind::Backend, e.to_string()));
                if let Some(stored) = stored {
                    // The feeder and the queue's subscription are waited for beside the
                    // connection's next operations, which do not depend on them.
                    let (services, events, shared) =
                        (services.clone(), events.clone(), shared.clone());
                    tokio::spawn(async move {
                        let outcome = match written {
                            Ok(_) => super::routing::route_stored(&services, &stored).await,
                            Err(e) => Err(e),
                        };
                        let token = stored.token;
                        let event = Event::KvResult {
                            conn,
                            token,
                            outcome,
                        };
                        op_done(&shared, &events, event).await;
                    });
                } else {
                    if let Err(e) = written {
                        tracing::warn!(conn, key, error = %e.message, "cannot store a durable route");
                    }
                    shared.op_finished();
                }
            }
            Op::KvPut {
                token,
                topic,
                key,
                value,
            } => {
                let outcome = Box::pin(services.kv.put(&topic, &key, value))
                    .await
                    .map(|_| None)
                    .map_err(|e| op_error(ErrorKind::Backend, e.to_string()));
                op_done(
                    &shared,
                    &events,
                    Event::KvResult {
                        conn,
                        token,
                        outcome,
                    },
                )
                .await;
            }
        }
    }
}

/// The outcome of one publish: the message's id where the plugin asked for it.
struct Stored {
    token: u64,
    outcome: Result<Option<Vec<u8>>, types::OpError>,
    with_id: bool,
}

/// Hands the plugin `first` and every other receipt already in, as one event per run of
/// the same kind (`on-publish-results` or `on-receipts`, in issue order): a batch of the
/// backend's receipts arrives together.
async fn receipts_done<F>(
    conn: u64,
    first: Option<Stored>,
    receipts: &mut FuturesOrdered<F>,
    shared: &ConnShared,
    events: &mpsc::Sender<Event>,
) where
    F: std::future::Future<Output = Stored>,
{
    let mut done: Vec<_> = first.into_iter().collect();
    while let Some(Some(r)) = receipts.next().now_or_never() {
        done.push(r);
    }
    for _ in &done {
        shared.op_finished();
    }
    let mut done = done.into_iter().peekable();
    while let Some(head) = done.peek() {
        let event = if head.with_id {
            let mut receipts = Vec::new();
            while let Some(r) = done.next_if(|r| r.with_id) {
                receipts.push(Receipt {
                    token: r.token,
                    outcome: r.outcome.map(Option::unwrap_or_default),
                });
            }
            Event::Receipts { conn, receipts }
        } else {
            let mut results = Vec::new();
            while let Some(r) = done.next_if(|r| !r.with_id) {
                results.push(types::PublishResult {
                    token: r.token,
                    outcome: r.outcome.map(drop),
                });
            }
            match <[_; 1]>::try_from(results) {
                Ok([r]) => Event::PublishResult {
                    conn,
                    token: r.token,
                    outcome: r.outcome,
                },
                Err(results) => Event::PublishResults { conn, results },
            }
        };
        let _ = events.send(event).await;
    }
}

/// Reports a finished kv operation of a connection and releases its in-flight slot.
async fn op_done(shared: &ConnShared, events: &mpsc::Sender<Event>, event: Event) {
    shared.op_finished();
    let _ = events.send(event).await;
}
