//! How long queues live, as RabbitMQ 3.x decides it (`rabbit_amqqueue`, `rabbit_channel`):
//!
//! - An **exclusive** queue belongs to the connection that declared it: any other connection
//!   that declares (also passively), binds, unbinds, consumes, gets, purges or deletes it gets
//!   `channel.close` 405 RESOURCE_LOCKED; declaring an existing queue with another value of
//!   `exclusive` is the same 405 (RabbitMQ's strict check). The queue is deleted when its
//!   connection ends.
//! - An **auto-delete** queue is deleted when its last consumer goes (cancelled, its channel
//!   or connection closed), never if it had none.
//! - When a queue is deleted, its consumers get `basic.cancel` from the server if the client
//!   announced `consumer_cancel_notify` (RabbitMQ's consumer cancel notifications), and are
//!   dropped silently otherwise: at once on the connection that deletes it, and within
//!   [`WATCH_MS`] on the others, which read the records of the queues they consume that
//!   often (the host tells a plugin of no topology change); a queue deleted and declared
//!   again meanwhile is another incarnation (`Queue::id`) and cancels them too.
//!
//! Across gateways there is no connection to ask whether it still lives, so ownership is a
//! lease in the kv ([`topology::lease_key`]): a connection that owns exclusive queues renews
//! it every third of [`Config::exclusive_lease_ms`]. A connection that ends cleanly
//! (`connection.close`) deletes its exclusive queues and its lease before `close-ok`. One
//! whose socket went away cannot act any more (the host takes no call from a closed
//! connection), but its last will does: registered with the lease, it deletes the lease as
//! the connection ends (and publishes a note to [`topology::ENDED_TOPIC`]). Without a lease
//! its queues are gone: the first other connection that uses one deletes it and goes on as
//! RabbitMQ would once the queue is gone (a declaration creates it again, a passive one is
//! 404). Only a crash of its gateway (which loses wills) leaves them to the lease's end.
//!
//! - An auto-delete queue whose last consumer's connection ended without a word is found by
//!   the next connection that uses it: a queue marked `consumed` whose route the backend
//!   lets this connection open has no consumer left, so it is deleted then, and the method
//!   goes on without it, as RabbitMQ would have deleted it when that consumer went.
//!
//! - A queue with **`x-expires`** is deleted once unused for that long (no consumer, no
//!   `basic.get`, not declared again). Its last use is a record in the kv
//!   ([`topology::expiry_key`]), moved on by each declaration and `basic.get`, and every
//!   half of its `x-expires` by each connection that consumes it; the first connection
//!   that uses the queue after that time deletes it and goes on without it (RabbitMQ
//!   deletes it at that time; until somebody uses it here, its route still copies messages
//!   into it, and a `mandatory` message routed only to it is not returned).
//!
//! Whether other consumers hold a queue is the backend's knowledge: opening the queue's
//! route fails while consumers hold its subscription. An auto-delete queue is deleted by
//! opening its route once this connection's last consumer of it is gone (a few tries, while
//! the backend lets that consumer go); if another consumer holds it, it stays.

use magnetar_sdk::{ErrorKind, KvWrite, Message, OpError, OutboundMessage, SubId, Will};

use super::channel::{queue_route_action, Outcome, Task};
use super::*;
use crate::topology::{self, Queue};

/// How often a connection reads the records of the queues it consumes, to end (with
/// `basic.cancel`) the consumers of a queue that another connection deleted.
pub(super) const WATCH_MS: u64 = 1000;

/// Tries at opening the route of a queue being deleted while consumers still hold its
/// subscription (this connection's own just closed), and the wait between two.
const REAP_ATTEMPTS: u32 = 10;
const REAP_RETRY_MS: u64 = 50;

/// A queue being deleted in the background (auto-delete, or exclusive at the owner's close).
#[derive(Debug, Clone)]
pub(crate) struct Reap {
    name: String,
    queue: Queue,
    attempts: u32,
    /// Delete the record even if the route stays held (an exclusive queue's owner is going).
    force: bool,
    /// The route, once open.
    sub: Option<SubId>,
    /// A queue whose record another connection deleted while this one's consumers held its
    /// route: only the route goes, with its backlog.
    orphan: bool,
}

/// RabbitMQ's 405 text.
pub(super) fn locked_text(name: &str) -> String {
    format!(
        "cannot obtain exclusive access to locked queue '{name}' in vhost '/'. It could be originally declared on another connection or the exclusive property value does not match that of the original declaration."
    )
}

impl AmqpConnection {
    /// Writes when the queue `name` expires (`None`: deletes the record), not waiting.
    pub(super) fn put_expiry(&mut self, name: &str, until: Option<u64>) {
        let token = self.ops.start(Op::Lease);
        self.out.push(Action::KvPut {
            token,
            key: topology::expiry_key(name),
            value: until.map(|t| t.to_be_bytes().to_vec()),
        });
    }

    /// The queue was used now (declared, or a `basic.get`): it expires `x-expires` from now
    /// (if it has one), and this connection sweeps it for expired messages (`sweep`).
    pub(super) fn queue_used(&mut self, name: &str, queue: &Queue) {
        if let Some(expires) = crate::queue_policy::expires(queue) {
            self.put_expiry(name, Some(self.now_ms + expires));
        }
        self.sweep_declared(name, queue);
    }

    /// A consumer of `name` started: while this connection consumes it, its expiry moves on.
    pub(super) fn consuming_expiring(&mut self, name: &str, expires: u64) {
        self.put_expiry(name, Some(self.now_ms + expires));
        self.expiring.insert(name.to_string(), expires);
        if self.expiry_timer.is_none() {
            self.arm_expiry_timer();
        }
    }

    fn arm_expiry_timer(&mut self) {
        let Some(shortest) = self.expiring.values().min().copied() else {
            return;
        };
        let token = self.ops.token();
        self.expiry_timer = Some(token);
        self.out.push(Action::SetTimer {
            token,
            delay_ms: (shortest / 2).max(100),
        });
    }

    pub(super) fn on_expiry_timer(&mut self, token: u64) -> bool {
        if self.expiry_timer != Some(token) {
            return false;
        }
        self.expiry_timer = None;
        if self.phase != Phase::Running {
            return true;
        }
        let renew: Vec<(String, u64)> =
            self.expiring.iter().map(|(n, e)| (n.clone(), *e)).collect();
        for (name, expires) in renew {
            self.put_expiry(&name, Some(self.now_ms + expires));
        }
        self.arm_expiry_timer();
        true
    }

    /// This connection's id as an owner of exclusive queues.
    pub(super) fn conn_id(&self) -> &str {
        &self.conn_id
    }

    /// Whether `queue`'s owner is another connection (whose lease must then be read).
    pub(super) fn owned_by_other(&self, queue: &Queue) -> Option<String> {
        queue.owner.clone().filter(|o| *o != self.conn_id)
    }

    /// Writes the lease now (a declaration waits for it: no other connection may see the
    /// queue before its owner's lease) and renews it from then on.
    pub(super) fn lease_value(&self) -> Vec<u8> {
        let until = self.now_ms + self.config.exclusive_lease_ms;
        until.to_be_bytes().to_vec()
    }

    pub(super) fn lease_started(&mut self) {
        if self.lease_timer.is_none() {
            self.arm_lease_timer();
            // Its will deletes the lease if the connection ends without a word.
            self.out.push(Action::SetWill(Some(Will {
                msg: OutboundMessage {
                    topic: topology::ENDED_TOPIC.into(),
                    key: None,
                    payload: self.conn_id.as_bytes().to_vec(),
                    properties: Vec::new(),
                },
                kv: Some(KvWrite {
                    key: topology::lease_key(&self.conn_id),
                    value: None,
                }),
                delay_ms: 0,
            })));
        }
    }

    fn arm_lease_timer(&mut self) {
        let token = self.ops.token();
        self.lease_timer = Some(token);
        self.out.push(Action::SetTimer {
            token,
            delay_ms: self.config.exclusive_lease_ms / 3,
        });
    }

    /// The lease timer: renewed while this connection owns exclusive queues.
    pub(super) fn on_lease_timer(&mut self, token: u64) -> bool {
        if self.lease_timer != Some(token) {
            return false;
        }
        self.lease_timer = None;
        if !matches!(self.phase, Phase::Running) {
            return true;
        }
        // Renewed while it owns queues, deleted once it owns none.
        let value = (!self.owned.is_empty()).then(|| self.lease_value());
        let renewed = value.is_some();
        let token = self.ops.start(Op::Lease);
        self.out.push(Action::KvPut {
            token,
            key: topology::lease_key(&self.conn_id),
            value,
        });
        if renewed {
            self.arm_lease_timer();
        } else {
            self.out.push(Action::SetWill(None));
        }
        true
    }

    /// Ends a consumer of this connection: its subscription closes; an auto-delete queue
    /// whose last consumer (here) it was is deleted. `notify`: the client is told with
    /// `basic.cancel` (its queue was deleted).
    pub(super) fn end_consumer(&mut self, sub: SubId, notify: bool) {
        let Some((channel, tag, _, queue)) = self.consumers.remove(&sub) else {
            return;
        };
        self.policies.remove(&sub);
        self.out.push(Action::Unsubscribe { sub, delete: false });
        self.drop_held(channel, sub);
        self.consumer_gone(channel, tag, queue, notify);
    }

    /// What the host handed a consumer that ends beyond its channel's `global` prefetch
    /// limit is never delivered: it goes back to the queue as the consumer closes.
    fn drop_held(&mut self, channel: u16, sub: SubId) {
        if let Some(state) = self.channels.get_mut(&channel) {
            state.held.retain(|m| m.subscription != sub);
        }
    }

    /// The client cancelled a consumer that holds unacknowledged deliveries: RabbitMQ keeps
    /// them on the channel for a later ack, nack or reject, so its subscription stays open
    /// until they are settled ([`Self::drained`]), but takes nothing more from the queue
    /// (`rabbit_queue_consumers`: a cancelled consumer gets no deliveries): it is drained
    /// (ABI 0.2.6 `flow.drain`, the host asks the backend for no more messages for it), and
    /// what it was handed and the client did not see goes back to the queue at once, ready
    /// again for a capped queue's count. Not for an auto-delete queue, which goes with its
    /// last consumer at once.
    pub(super) fn cancel_consumer(&mut self, channel: u16, sub: SubId) {
        let holds = self.channels.get(&channel).is_some_and(|s| s.holds(sub));
        let auto_delete = self
            .consumers
            .get(&sub)
            .is_some_and(|c| self.auto_delete.contains_key(&c.3));
        if !holds || auto_delete {
            return self.end_consumer(sub, false);
        }
        let Some((channel, tag, _, queue)) = self.consumers.remove(&sub) else {
            return;
        };
        self.draining.insert(sub, channel);
        // Drained before anything is given back: no permit follows the nacks.
        self.out.push(Action::Drain { sub });
        self.give_back_held(channel, sub);
        self.consumer_gone(channel, tag, queue, false);
    }

    /// What the channel's `global` prefetch limit held back for a cancelled consumer goes
    /// back to the queue now (the client never saw it).
    fn give_back_held(&mut self, channel: u16, sub: SubId) {
        let Some(state) = self.channels.get_mut(&channel) else {
            return;
        };
        let (gone, kept): (std::collections::VecDeque<Message>, _) =
            std::mem::take(&mut state.held)
                .into_iter()
                .partition(|m| m.subscription == sub);
        state.held = kept;
        for m in gone {
            self.out.push(Action::Nack {
                sub,
                delivery_id: m.delivery_id,
            });
        }
    }

    /// A message the host handed a cancelled consumer before it was drained: the client
    /// never sees it, it goes back to the queue at once. Whether it was one.
    pub(super) fn drained_consumer_message(&mut self, m: &Message) -> bool {
        if !self.draining.contains_key(&m.subscription) {
            return false;
        }
        self.out.push(Action::Nack {
            sub: m.subscription,
            delivery_id: m.delivery_id,
        });
        true
    }

    /// Deliveries of `subs` were settled: a cancelled consumer whose last one it was closes.
    pub(super) fn drained(&mut self, subs: impl IntoIterator<Item = SubId>) {
        for sub in subs {
            let Some(channel) = self.draining.get(&sub).copied() else {
                continue;
            };
            let holds = self.channels.get(&channel).is_some_and(|s| s.holds(sub));
            if !holds {
                self.end_draining(sub);
            }
        }
    }

    /// Closes a cancelled consumer's subscription.
    pub(super) fn end_draining(&mut self, sub: SubId) {
        if self.draining.remove(&sub).is_some() {
            self.policies.remove(&sub);
            self.out.push(Action::Unsubscribe { sub, delete: false });
        }
    }

    fn consumer_gone(&mut self, channel: u16, tag: String, queue: String, notify: bool) {
        if let Some(state) = self.channels.get_mut(&channel) {
            state.consumers.remove(&tag);
        }
        if notify && self.cancel_notify {
            self.send_method(
                channel,
                Method::BasicCancel(BasicCancel {
                    consumer_tag: tag,
                    no_wait: true,
                }),
            );
        }
        if self.consumers.values().any(|c| c.3 == queue) {
            return;
        }
        // Unused from now (as far as this connection goes).
        if let Some(expires) = self.expiring.remove(&queue) {
            self.put_expiry(&queue, Some(self.now_ms + expires));
        }
        if let Some(q) = self.auto_delete.remove(&queue) {
            if !self.owned.contains_key(&queue) {
                self.start_reap(queue, q, false);
            }
        }
    }

    /// Every consumer of `queue` on this connection, told with `basic.cancel`: the queue is
    /// being deleted.
    pub(super) fn cancel_consumers_of(&mut self, queue: &str) {
        self.auto_delete.remove(queue);
        self.forget_get_records(queue);
        let subs: Vec<SubId> = self
            .consumers
            .iter()
            .filter(|(_, c)| c.3 == queue)
            .map(|(s, _)| *s)
            .collect();
        for sub in subs {
            self.end_consumer(sub, true);
        }
    }

    /// Whether a consumer of this connection reads `queue`.
    pub(super) fn consumes(&self, queue: &str) -> bool {
        self.consumers.values().any(|c| c.3 == queue)
    }

    /// The probe of an auto-delete queue answered: refused (consumers hold it) → `task`
    /// goes on with the queue; opened → nobody consumes it any more, so it goes first.
    pub(super) fn on_auto_delete_probe(&mut self, task: Task, outcome: Outcome) {
        let (Task::AutoDeleteProbe { task, name, record }, Outcome::Sub(r)) = (task, outcome)
        else {
            return;
        };
        match r {
            Ok(sub) => {
                self.forget_get_records(&name);
                self.wait_kv_put(
                    topology::queue_key(&name),
                    None,
                    Task::AutoDeleted { task, sub },
                )
            }
            Err(_) => self.step_checked(*task, Outcome::Kv(Ok(Some(record)))),
        }
    }

    /// Starts reading the record of `queue` every [`WATCH_MS`] while this connection
    /// consumes it: `id` is the incarnation its consumers started on.
    pub(super) fn watch_queue(&mut self, queue: &str, id: Option<String>) {
        self.watched.insert(queue.to_string(), id);
        if self.watch_timer.is_none() {
            let token = self.ops.token();
            self.watch_timer = Some(token);
            self.out.push(Action::SetTimer {
                token,
                delay_ms: WATCH_MS,
            });
        }
    }

    /// The watch timer: the records of the queues still consumed are read.
    pub(super) fn on_watch_timer(&mut self, token: u64) -> bool {
        if self.watch_timer != Some(token) {
            return false;
        }
        self.watch_timer = None;
        if self.phase != Phase::Running {
            return true;
        }
        let consumed: std::collections::HashSet<&str> =
            self.consumers.values().map(|c| c.3.as_str()).collect();
        self.watched.retain(|q, _| consumed.contains(q.as_str()));
        let queues: Vec<String> = self.watched.keys().cloned().collect();
        for queue in queues {
            let key = topology::queue_key(&queue);
            let token = self.ops.start(Op::Watch { queue });
            self.out.push(Action::KvGet { token, key });
        }
        if !self.watched.is_empty() {
            let token = self.ops.token();
            self.watch_timer = Some(token);
            self.out.push(Action::SetTimer {
                token,
                delay_ms: WATCH_MS,
            });
        }
        true
    }

    /// A consumed queue's record: if the queue is gone (or is another incarnation), its
    /// consumers here end with `basic.cancel`, and its route, which they kept the deleting
    /// connection from taking, goes with its backlog (unless declared again).
    pub(super) fn on_watched(&mut self, queue: String, result: Result<Option<Vec<u8>>, OpError>) {
        // A failed read says nothing.
        let Ok(record) = result else {
            return;
        };
        let Some(id) = self.watched.get(&queue) else {
            return;
        };
        let gone = match &record {
            None => true,
            Some(bytes) => Queue::decode(bytes).is_some_and(|q| id.is_some() && q.id != *id),
        };
        if !gone {
            return;
        }
        self.watched.remove(&queue);
        self.cancel_consumers_of(&queue);
        if record.is_none() {
            self.reaps += 1;
            let queue_record = Queue::default();
            self.open_reap_route(Reap {
                name: queue,
                queue: queue_record,
                attempts: 0,
                force: false,
                sub: None,
                orphan: true,
            });
        }
    }

    /// Deletes `name` in the background: its route opened (refused while other consumers
    /// hold the queue), its record, then the route with its backlog.
    pub(super) fn start_reap(&mut self, name: String, queue: Queue, force: bool) {
        self.reaps += 1;
        self.open_reap_route(Reap {
            name,
            queue,
            attempts: 0,
            force,
            sub: None,
            orphan: false,
        });
    }

    fn open_reap_route(&mut self, reap: Reap) {
        let (name, queue) = (reap.name.clone(), reap.queue.clone());
        let token = self.ops.start(Op::Reap(reap));
        self.out.push(queue_route_action(token, &name, &queue));
    }

    pub(super) fn on_reap_route(&mut self, mut reap: Reap, result: Result<SubId, OpError>) {
        match result {
            // Held now: is the queue still gone (not declared again meanwhile)?
            Ok(sub) if reap.orphan => {
                let key = topology::queue_key(&reap.name);
                reap.sub = Some(sub);
                let token = self.ops.start(Op::Reap(reap));
                self.out.push(Action::KvGet { token, key });
                return;
            }
            Ok(sub) => reap.sub = Some(sub),
            Err(e) if e.kind == ErrorKind::Backend && reap.attempts < REAP_ATTEMPTS => {
                reap.attempts += 1;
                let token = self.ops.start(Op::Reap(reap));
                self.out.push(Action::SetTimer {
                    token,
                    delay_ms: REAP_RETRY_MS,
                });
                return;
            }
            // Other consumers hold it: an auto-delete queue stays.
            Err(_) if !reap.force => return self.reap_done(),
            Err(e) => self.log(
                LogLevel::Warn,
                format!("deleting queue {}: {}", reap.name, e.message),
            ),
        }
        let key = topology::queue_key(&reap.name);
        self.forget_get_records(&reap.name);
        let token = self.ops.start(Op::Reap(reap));
        self.out.push(Action::KvPut {
            token,
            key,
            value: None,
        });
    }

    /// A reap's retry timer fired.
    pub(super) fn on_reap_timer(&mut self, token: u64) -> bool {
        if !matches!(self.ops.get(token), Some(Op::Reap(_))) {
            return false;
        }
        if let Some(Op::Reap(r)) = self.ops.complete(token) {
            self.open_reap_route(r);
        }
        true
    }

    /// The record is deleted: the route goes with its backlog. For an orphan, the record
    /// was read again: still gone, the route goes; declared again meanwhile, the route
    /// stays and gets the new queue's filters back (opening it stored the old default's).
    pub(super) fn on_reap_record(&mut self, reap: Reap, result: Result<Option<Vec<u8>>, OpError>) {
        if reap.orphan {
            if let Some(sub) = reap.sub {
                let gone = matches!(result, Ok(None));
                self.out.push(Action::Unsubscribe { sub, delete: gone });
                if let Ok(Some(bytes)) = &result {
                    if let Some(q) = Queue::decode(bytes) {
                        // Answered by `apply`'s fallback, which closes the route.
                        let token = self.ops.token();
                        self.out.push(queue_route_action(token, &reap.name, &q));
                    }
                }
            }
            return self.reap_done();
        }
        if let Err(e) = result {
            self.log(
                LogLevel::Warn,
                format!("deleting queue {}: {}", reap.name, e.message),
            );
        }
        if let Some(sub) = reap.sub {
            self.out.push(Action::Unsubscribe { sub, delete: true });
        }
        self.reap_done();
    }

    fn reap_done(&mut self) {
        self.reaps = self.reaps.saturating_sub(1);
        self.finish_close();
    }

    /// The client's `connection.close`: consumers end, exclusive queues are deleted, then
    /// `close-ok` (at most [`CLOSE_TIMEOUT_MS`] later).
    pub(super) fn client_closes(&mut self) {
        let subs: Vec<SubId> = self.consumers.keys().copied().collect();
        for sub in subs {
            self.end_consumer(sub, false);
        }
        let channels: Vec<u16> = self.channels.keys().copied().collect();
        for channel in channels {
            self.drop_consumers(channel);
        }
        self.reap_owned(true);
    }

    /// Deletes the exclusive queues, then ends the connection (with `close-ok` if
    /// `close_ok`: the client closed it), within [`CLOSE_TIMEOUT_MS`].
    pub(super) fn reap_owned(&mut self, close_ok: bool) {
        for (name, q) in std::mem::take(&mut self.owned) {
            self.start_reap(name, q, true);
        }
        self.ending = Some(close_ok);
        self.phase = Phase::Closing;
        self.set_timer(CLOSE_TIMEOUT_MS);
        self.finish_close();
    }

    /// The end of the connection once the queues being deleted are.
    fn finish_close(&mut self) {
        if self.reaps > 0 {
            return;
        }
        let Some(close_ok) = self.ending.take() else {
            return;
        };
        if self.lease_timer.take().is_some() {
            self.out.push(Action::SetWill(None));
            let token = self.ops.start(Op::Lease);
            self.out.push(Action::KvPut {
                token,
                key: topology::lease_key(&self.conn_id),
                value: None,
            });
        }
        if close_ok {
            self.send_method(0, Method::ConnectionCloseOk(ConnectionCloseOk {}));
        }
        self.hang_up("connection closed");
    }
}
