//! `queue.delete` (§1.7.2.9) with its conditions, as RabbitMQ 3.x checks them
//! (`rabbit_amqqueue:delete`): `if-unused` refuses a queue that has consumers, `if-empty` one
//! that has ready messages, both with `channel.close` 406 PRECONDITION_FAILED
//! ("queue 'q' in vhost '/' in use" / "... not empty"), the queue left as it was.
//!
//! What the gateway knows and how it asks:
//!
//! - Consumers: this connection's own are in its table; other connections' (on any gateway)
//!   hold the queue's subscription in the backend, which then refuses the queue's route (an
//!   Exclusive reader of the same subscription). So `if-unused` opens the route: refused
//!   (after a few tries, while a route that a declaration opened closes) means in use.
//! - Ready messages: `if-empty` counts the queue first (`durable.queue-backlog`, which counts
//!   once the copies of everything published before are in). None: empty, at once. Some:
//!   they may all be held by consumers (delivered, not acknowledged), which RabbitMQ does not
//!   count, so it looks: the route (with `if-unused`) or a consumer of the queue's shared
//!   subscription (without) is handed the queue's first ready message, if there is one,
//!   within [`EMPTY_WAIT_MS`]. None by then means empty. A message seen this way goes back
//!   to the queue when the route or consumer closes, counted by the backend as a redelivery
//!   (its `redelivered` flag is then set, where RabbitMQ's is not).
//!
//! Once the conditions hold, the queue is deleted through the route or consumer that
//! checked them ([`AmqpConnection::delete_queue`]). `delete-ok` reports the messages
//! deleted: with `if-empty` none were ready (RabbitMQ's count, 0); with `if-unused` alone,
//! the queue's count taken before its route was opened.

use magnetar_sdk::{ErrorKind, OpError, SubId};

use super::channel::Task;
use super::*;
use crate::topology::{self, Queue};

/// How long `if-empty` waits for the queue's first message before it takes the queue as
/// empty (as `basic.get` waits for its first message).
pub(super) const EMPTY_WAIT_MS: u64 = 500;
/// Tries at opening the queue's route for `if-unused`, and the wait between two: a route
/// that a declaration opened may still hold the subscription for a moment.
const ROUTE_ATTEMPTS: u32 = 10;
const ROUTE_RETRY_MS: u64 = 50;

/// A `queue.delete` whose conditions are being checked.
#[derive(Debug, Clone)]
pub(crate) struct PendingDelete {
    channel: u16,
    m: QueueDelete,
    queue: Queue,
    attempts: u32,
    /// What looks at the queue: its route (`if-unused`) or a consumer (`if-empty` alone).
    sub: Option<SubId>,
    /// The end of the wait for a first message.
    timer: u64,
    /// The queue counted no message: `if-empty` holds without a look.
    counted_empty: bool,
    /// The queue's messages, counted before the route of an `if-unused` delete (without
    /// `if-empty`) holds it: `delete-ok` reports them.
    count: u64,
}

impl PendingDelete {
    fn by_route(&self) -> bool {
        self.m.if_unused
    }
}

impl AmqpConnection {
    /// `queue.delete` of an existing queue with `if-unused` or `if-empty`.
    pub(super) fn delete_if(&mut self, channel: u16, m: QueueDelete, queue: Queue) {
        if m.if_unused && self.consumers.values().any(|c| c.3 == m.queue) {
            return self.delete_refused(channel, m, "in use");
        }
        let p = PendingDelete {
            channel,
            m,
            queue,
            attempts: 0,
            sub: None,
            timer: 0,
            counted_empty: false,
            count: 0,
        };
        let name = p.m.queue.clone();
        self.wait_count(&name, Task::ConditionCount(Box::new(p)));
    }

    /// The queue of a conditional delete counted. `if-unused` alone: kept for `delete-ok`,
    /// then the route checks. `if-empty`: none, the condition holds (with `if-unused` still
    /// to check, through the route); some or unknown, it looks for a ready one.
    pub(super) fn on_condition_count(&mut self, mut p: PendingDelete, count: Option<u64>) {
        if !p.m.if_empty {
            p.count = count.unwrap_or(0);
            return self.open_delete_check(p);
        }
        p.counted_empty = count == Some(0);
        if p.counted_empty && !p.by_route() {
            self.busy = false;
            let PendingDelete {
                channel, m, queue, ..
            } = p;
            return self.delete_queue(channel, m, Some(queue));
        }
        self.open_delete_check(p);
    }

    fn open_delete_check(&mut self, p: PendingDelete) {
        let name = p.m.queue.clone();
        let action = if p.by_route() {
            let queue = p.queue.clone();
            let token = self.ops.start(Op::DeleteCheck(p));
            channel::queue_route_action(token, &name, &queue)
        } else {
            let spec = channel::queue_consumer(topology::queue_topic(&name), 1, None);
            let token = self.ops.start(Op::DeleteCheck(p));
            Action::OpenConsumer { token, spec }
        };
        self.out.push(action);
        self.busy = true;
    }

    fn delete_refused(&mut self, channel: u16, m: QueueDelete, why: &str) {
        self.busy = false;
        let e = ConnError::new(
            PRECONDITION_FAILED,
            format!("queue '{}' in vhost '/' {why}", m.queue),
        );
        self.close_channel(channel, e.caused_by(&Method::QueueDelete(m)));
    }

    /// The route or consumer that checks the queue opened, or could not.
    pub(super) fn on_delete_check(&mut self, mut p: PendingDelete, result: Result<SubId, OpError>) {
        match result {
            Ok(sub) => {
                p.sub = Some(sub);
                if !p.m.if_empty || p.counted_empty {
                    // Unused (the route is this connection's alone): delete it.
                    return self.delete_checked(p);
                }
                p.timer = self.ops.token();
                self.out.push(Action::SetTimer {
                    token: p.timer,
                    delay_ms: EMPTY_WAIT_MS,
                });
                self.deleting = Some(p);
            }
            Err(e) if e.kind == ErrorKind::Backend && p.attempts < ROUTE_ATTEMPTS => {
                p.attempts += 1;
                let token = self.ops.start(Op::DeleteCheck(p));
                self.out.push(Action::SetTimer {
                    token,
                    delay_ms: ROUTE_RETRY_MS,
                });
            }
            // Consumers hold the queue's subscription.
            Err(e) if e.kind == ErrorKind::Backend && p.by_route() => {
                self.delete_refused(p.channel, p.m, "in use")
            }
            Err(e) => {
                self.busy = false;
                let err = ConnError::new(INTERNAL_ERROR, format!("queue.delete: {}", e.message));
                self.close_channel(p.channel, err);
            }
        }
    }

    /// The retry timer of a check, or the end of its wait for a message (then the queue is
    /// empty).
    pub(super) fn on_delete_timer(&mut self, token: u64) -> bool {
        if matches!(self.ops.get(token), Some(Op::DeleteCheck(_))) {
            if let Some(Op::DeleteCheck(p)) = self.ops.complete(token) {
                self.open_delete_check(p);
            }
            return true;
        }
        if self.deleting.as_ref().is_none_or(|p| p.timer != token) {
            return false;
        }
        if let Some(p) = self.deleting.take() {
            self.delete_checked(p);
        }
        true
    }

    /// A message reached the route or consumer that checks `sub`'s queue: not empty. It
    /// goes back to the queue as that closes. Whether `sub` was such a check.
    pub(super) fn on_delete_check_message(&mut self, sub: SubId) -> bool {
        if self.deleting.as_ref().is_none_or(|p| p.sub != Some(sub)) {
            return false;
        }
        if let Some(p) = self.deleting.take() {
            self.out.push(Action::Unsubscribe { sub, delete: false });
            self.delete_refused(p.channel, p.m, "not empty");
        }
        true
    }

    /// The conditions hold: the queue goes. Through the route that checked them, which
    /// this connection holds (the record, then the route with its backlog); after a
    /// consumer's check, as a `queue.delete` without conditions.
    fn delete_checked(&mut self, p: PendingDelete) {
        self.busy = false;
        let Some(sub) = p.sub else {
            return;
        };
        if !p.by_route() {
            self.out.push(Action::Unsubscribe { sub, delete: false });
            let PendingDelete {
                channel, m, queue, ..
            } = p;
            return self.delete_queue(channel, m, Some(queue));
        }
        self.cancel_consumers_of(&p.m.queue);
        self.owned.remove(&p.m.queue);
        // With `if-empty` the queue held no ready message, RabbitMQ's count.
        let message_count = u32::try_from(p.count).unwrap_or(u32::MAX);
        let reply = (!p.m.no_wait)
            .then(|| Box::new(Method::QueueDeleteOk(QueueDeleteOk { message_count })));
        self.wait_kv_put(
            topology::queue_key(&p.m.queue),
            None,
            Task::DeleteHeld {
                channel: p.channel,
                sub,
                reply,
            },
        );
    }

    /// `queue.delete`, its conditions met (or none): this connection's consumers of the
    /// queue end first (with `basic.cancel`), so that the route that deletes it can take its
    /// subscription; then its record, then its route with its backlog.
    /// `delete-ok` says how many messages went with the queue: counted first
    /// (`durable.queue-backlog`).
    pub(super) fn delete_queue(&mut self, channel: u16, m: QueueDelete, queue: Option<Queue>) {
        match queue {
            Some(queue) if !m.no_wait => {
                let name = m.queue.clone();
                self.wait_count(&name, Task::DeleteCount { channel, m, queue });
            }
            queue => self.delete_counted(channel, m, queue, 0),
        }
    }

    /// [`Self::delete_queue`] once the queue's messages (`count`) are known.
    pub(super) fn delete_counted(
        &mut self,
        channel: u16,
        m: QueueDelete,
        queue: Option<Queue>,
        count: u64,
    ) {
        let message_count = u32::try_from(count).unwrap_or(u32::MAX);
        let reply =
            (!m.no_wait).then(|| Box::new(Method::QueueDeleteOk(QueueDeleteOk { message_count })));
        self.cancel_consumers_of(&m.queue);
        self.owned.remove(&m.queue);
        match queue {
            // RabbitMQ 3.x: deleting a queue that does not exist succeeds.
            None => self.reply(channel, reply),
            Some(queue) => self.wait_kv_put(
                topology::queue_key(&m.queue),
                None,
                Task::DeleteRoute {
                    channel,
                    name: m.queue,
                    queue,
                    reply,
                    attempts: 0,
                },
            ),
        }
    }

    /// The deleted queue's route opened (then it goes with its backlog), or was refused:
    /// tried again while this connection's consumers let go of it, then left to the
    /// consumers of other connections that hold it.
    pub(super) fn on_delete_route(&mut self, task: Task, result: Result<SubId, OpError>) {
        let Task::DeleteRoute {
            channel,
            name,
            queue,
            reply,
            attempts,
        } = task
        else {
            return;
        };
        match result {
            Ok(sub) => {
                self.out.push(Action::Unsubscribe { sub, delete: true });
                self.reply(channel, reply);
            }
            Err(e) if e.kind == ErrorKind::Backend && attempts < ROUTE_ATTEMPTS => {
                let task = Task::DeleteRoute {
                    channel,
                    name,
                    queue,
                    reply,
                    attempts: attempts + 1,
                };
                let token = self.ops.start(Op::Task(task));
                self.out.push(Action::SetTimer {
                    token,
                    delay_ms: ROUTE_RETRY_MS,
                });
                self.busy = true;
            }
            Err(e) if e.kind == ErrorKind::Backend => self.reply(channel, reply),
            Err(e) => {
                let err = ConnError::new(INTERNAL_ERROR, format!("queue.delete: {}", e.message));
                self.close_channel(channel, err);
            }
        }
    }

    /// The retry timer of a deleted queue's route.
    pub(super) fn on_delete_route_timer(&mut self, token: u64) -> bool {
        if !matches!(
            self.ops.get(token),
            Some(Op::Task(Task::DeleteRoute { .. }))
        ) {
            return false;
        }
        if let Some(Op::Task(task @ Task::DeleteRoute { .. })) = self.ops.complete(token) {
            if let Task::DeleteRoute { name, queue, .. } = &task {
                let (name, queue) = (name.clone(), queue.clone());
                self.open_queue_route(&name, &queue, task);
            }
        }
        true
    }
}
