//! Host calls of publish/subscribe: `publish`, `subscribe`, `unsubscribe`, `ack`, `ack-many`.
//!
//! A publish is checked (name, permission, storage quota), sealed if the tenant encrypts at
//! rest, and queued on the connection's ordered operations (`ops_task`), held back by its
//! publish-rate quota. A subscription is a task of its own (`subscription_task`) that the
//! acks reach through a bounded channel.

use tokio::sync::mpsc;

use super::caps::Held;
use super::context::{op_error, HostState};
use super::event::Event;
use super::ops_task::Op;
use super::routing::RouteRef;
use super::subscription_task::{run_subscription, Shape, SubCmd, SubTask};
use crate::abi::types::{self, ErrorKind};
use crate::abi::v0_2::exports::magnetar::plugin::events::Receipt;
use crate::abi::v0_2::magnetar::plugin::pubsub;
use crate::backend::{OutMessage, SubscribeOptions};
use crate::config::ActionName;
use crate::crypto::KEY_PROPERTY;

/// A plugin's message as the backend takes it. The host's own key property is dropped: only
/// the host says which key sealed a payload (and which full queues refused it).
pub(super) fn backend_message(msg: types::OutboundMessage) -> OutMessage {
    OutMessage {
        key: msg.key,
        payload: msg.payload,
        properties: msg
            .properties
            .into_iter()
            .filter(|p| p.key != KEY_PROPERTY && p.key != super::caps::REFUSED_PROPERTY)
            .map(|p| (p.key, p.value))
            .collect(),
        encryption: None,
        event_time: None,
    }
}

/// Most unacked deliveries a subscription may ask for.
pub(super) const MAX_UNACKED: u32 = 10_000;

/// The backend's subscription type of a plugin's mode.
pub(super) fn sub_type(mode: types::SubMode) -> pulsar::SubType {
    match mode {
        types::SubMode::Exclusive => pulsar::SubType::Exclusive,
        types::SubMode::Shared => pulsar::SubType::Shared,
        types::SubMode::Failover => pulsar::SubType::Failover,
        types::SubMode::KeyShared => pulsar::SubType::KeyShared,
    }
}

impl HostState {
    /// Checks a publish against the tenant's storage quota, seals it, and queues it on the
    /// connection's ordered operations (held back by its publish-rate quota). A refusal
    /// completes at once, as the publish would have.
    pub(super) fn queue_publish(
        &mut self,
        conn: u64,
        token: u64,
        topic: Result<String, types::OpError>,
        mut out: OutMessage,
        with_id: bool,
    ) {
        let bytes = out.payload.len();
        let storage_full = self
            .conns
            .get(&conn)
            .and_then(|s| s.meters.as_ref())
            .is_some_and(|m| m.tenant.storage_full());
        let topic = topic.and_then(|t| {
            if storage_full {
                return Err(op_error(
                    ErrorKind::QuotaExceeded,
                    "the tenant's storage quota is used up",
                ));
            }
            Ok(t)
        });
        match topic.and_then(|t| self.services.seal(&t, &mut out).map(|_| t)) {
            Ok(topic) => {
                let not_before = self.hold_back(conn, 1, bytes);
                self.queue_op(
                    conn,
                    Op::Publish {
                        token,
                        topic,
                        msg: out,
                        not_before,
                        with_id,
                    },
                );
            }
            Err(e) if with_id => self.complete(Event::Receipts {
                conn,
                receipts: vec![Receipt {
                    token,
                    outcome: Err(e),
                }],
            }),
            Err(e) => self.complete(Event::PublishResult {
                conn,
                token,
                outcome: Err(e),
            }),
        }
    }

    /// Opens a subscription (checked: `opts` is the error otherwise) and its delivery task;
    /// completes with `on-subscribe-result`.
    pub(super) fn start_subscription(
        &mut self,
        conn: u64,
        token: u64,
        opts: Result<SubscribeOptions, types::OpError>,
        shape: Shape,
    ) {
        let opts = match opts {
            Ok(o) => o,
            Err(e) => {
                return self.complete(Event::SubscribeResult {
                    conn,
                    token,
                    outcome: Err(e),
                })
            }
        };
        if !self.conns.contains_key(&conn) {
            return;
        }
        let meters = match self.admit_subscription(conn) {
            Ok(m) => m,
            Err(e) => {
                return self.complete(Event::SubscribeResult {
                    conn,
                    token,
                    outcome: Err(e),
                })
            }
        };
        let sub = self.next_sub;
        self.next_sub += 1;
        let max_unacked = opts.receiver_queue.max(1);
        let (cmd_tx, cmd_rx) = mpsc::channel(max_unacked as usize + 16);
        // A `messaging` consumer of a queue: what it holds counts for the queue's cap.
        let held = (matches!(shape, Shape::Messages { .. })
            && opts.subscription == super::routing::QUEUE_SUBSCRIPTION)
            .then(|| Held::new(opts.topic.clone()));
        let Some(slot) = self.conns.get_mut(&conn) else {
            return;
        };
        slot.subs.insert(sub, cmd_tx);
        if let Some(h) = &held {
            slot.held.insert(sub, h.clone());
        }
        let task = run_subscription(
            SubTask {
                conn,
                sub,
                token,
                max_unacked: max_unacked as usize,
                events: self.events.clone(),
                shared: slot.shared.clone(),
                backend: self.services.backend.clone(),
                services: self.services.clone(),
                meters,
                shape,
                held,
            },
            opts,
            cmd_rx,
        );
        self.runtime.spawn(task);
    }
}

impl pubsub::Host for HostState {
    /// `publish`: stores a message durably; completes with `on-publish-result`.
    fn publish(&mut self, conn: u64, token: u64, msg: types::OutboundMessage) {
        let topic = self.authorized_topic(conn, &msg.topic, ActionName::Produce);
        self.queue_publish(conn, token, topic, backend_message(msg), false);
    }

    /// `subscribe`: opens a subscription and its delivery task; completes with
    /// `on-subscribe-result`.
    fn subscribe(&mut self, conn: u64, token: u64, spec: types::SubscriptionSpec) {
        let topic = self
            .authorized_topic(conn, &spec.topic, ActionName::Consume)
            .and_then(|t| {
                crate::names::validate_name(&spec.name)
                    .map(|_| t)
                    .map_err(|e| op_error(ErrorKind::InvalidName, e.to_string()))
            });
        let max_unacked = spec.max_unacked.clamp(1, MAX_UNACKED);
        let opts = topic.map(|topic| SubscribeOptions {
            topic,
            subscription: spec.name,
            sub_type: sub_type(spec.mode),
            durable: spec.durable,
            earliest: matches!(spec.initial_position, types::InitialPosition::Earliest),
            receiver_queue: max_unacked,
            start_message_id: None,
            dead_letter: None,
            consumer_name: None,
        });
        self.start_subscription(conn, token, opts, Shape::Deliveries);
    }

    /// `unsubscribe`: closes a subscription (with `delete`, removes it from the backend).
    fn unsubscribe(&mut self, conn: u64, sub: u64, delete: bool) {
        let route = self
            .conns
            .get_mut(&conn)
            .and_then(|s| s.routes.remove(&sub));
        if let (true, Some(RouteRef::Durable { feeder, queue, .. })) = (delete, route) {
            // The route goes with its queue (whose subscription the task deletes).
            feeder.remove(&queue);
            self.services.caps.remove(&queue);
            self.store_route(conn, &feeder, &queue, None);
        }
        if let Some(slot) = self.conns.get_mut(&conn) {
            slot.held.remove(&sub);
        }
        if let Some(tx) = self.conns.get_mut(&conn).and_then(|s| s.subs.remove(&sub)) {
            let _ = tx.try_send(SubCmd::Close { delete });
        }
    }

    /// `ack`: acknowledges one delivery.
    fn ack(&mut self, conn: u64, sub: u64, delivery_id: u64) {
        if let Some(tx) = self.conns.get(&conn).and_then(|s| s.subs.get(&sub)) {
            if tx.try_send(SubCmd::Ack(delivery_id)).is_err() {
                tracing::warn!(plugin = %self.plugin, conn, sub, "ack dropped: more acks than deliveries");
            }
        }
    }

    /// `ack-many`: acknowledges several deliveries of one subscription.
    fn ack_many(&mut self, conn: u64, sub: u64, delivery_ids: Vec<u64>) {
        if let Some(tx) = self.conns.get(&conn).and_then(|s| s.subs.get(&sub)) {
            if tx.try_send(SubCmd::AckMany(delivery_ids)).is_err() {
                tracing::warn!(plugin = %self.plugin, conn, sub, "acks dropped: more acks than deliveries");
            }
        }
    }
}
