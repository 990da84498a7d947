//! Expiry with nobody consuming. RabbitMQ drops expired messages at the head of a queue on
//! its own (`rabbit_amqqueue_process:drop_expired_msgs`, at the head's expiry): a queue
//! with a TTL that nobody consumes stays as long as its TTL allows, and one with a
//! dead-letter exchange too, the "wait queue" of delayed retries, hands each message to
//! that exchange once its TTL passed. Here a consumer or `basic.get` expires what it
//! reaches (`channel::expire`); a queue nobody consumes is swept by the connections that
//! declared it:
//!
//! - When: a queue with `x-message-ttl`, within [`FIRST_SWEEP_MS`] of its declaration (what
//!   waited in it meanwhile may have expired), then at the expiry of the message a sweep
//!   stopped at, or a TTL (at least [`IDLE_GAP_MS`]) after a sweep that took nothing: that
//!   wait doubles after each sweep in a row that found the queue held by consumers, or
//!   empty for a queue without a dead-letter exchange, up to [`MAX_IDLE_GAP_MS`]; and any
//!   queue at the expiry of each message this connection publishes to it through the
//!   default exchange (for a queue without `x-message-ttl`, a message with an
//!   `expiration`: the per-message delay pattern). Never closer than [`MIN_GAP_MS`] to the
//!   last sweep.
//! - How: the queue's record is read (gone, or declared anew by someone else: the sweeps
//!   end), then an Exclusive consumer of its subscription with a window of one message is
//!   opened. The backend refuses it while consumers hold the queue: they expire what they
//!   reach themselves. Expired messages are dead-lettered (or dropped, without a
//!   dead-letter exchange) as a consumer settles them, one after the other, until the first
//!   unexpired message (its expiry is the next sweep) or [`EMPTY_WAIT_MS`] without a
//!   message; then the consumer closes.
//!
//! What it costs, besides a kv read and a consumer per sweep: the unexpired message a sweep
//! stopped at goes back to the queue as a redelivery (the backend counts it), so a consumer
//! that takes it before it expires sees `redelivered` set where RabbitMQ's is not; while a
//! sweep holds the queue (a round trip, at most [`EMPTY_WAIT_MS`]), consumers opened on it
//! elsewhere retry, and so does the host's count of it.

use magnetar_sdk::{Message, OpError, SubId, SubMode};

use super::channel::queue_consumer;
use super::*;
use crate::codec::BasicProperties;
use crate::queue_policy::{lower, QueuePolicy};
use crate::topology::{self, Queue};

/// The first sweep of a queue with `x-message-ttl` comes at most this long after its
/// declaration.
const FIRST_SWEEP_MS: u64 = 1000;
/// Least time between two sweeps of a queue (a busy wait queue is swept in batches).
const MIN_GAP_MS: u64 = 100;
/// How long a sweep waits for a message before it takes the queue as empty.
const EMPTY_WAIT_MS: u64 = 100;
/// Least time from a sweep that found the queue empty or held to the next (unless this
/// connection publishes to it meanwhile).
const IDLE_GAP_MS: u64 = 1000;
/// Most time between two sweeps of a queue while they find it held or quiet.
const MAX_IDLE_GAP_MS: u64 = 60_000;

/// A queue this connection declared, and its sweeps.
#[derive(Debug, Default)]
pub(crate) struct Sweep {
    /// The queue's incarnation when declared (`Queue::id`).
    id: Option<String>,
    /// Its `x-message-ttl`.
    ttl: Option<u64>,
    /// The next sweep: its timer and when it is due.
    next: Option<(u64, u64)>,
    /// A sweep under way (record read, consumer opening or open).
    running: bool,
    /// Its consumer, once open, and the timer of its wait for a message.
    sub: Option<SubId>,
    wait: u64,
    /// A sweep asked for while one ran: when.
    again: Option<u64>,
    /// When the last sweep started.
    last_ms: u64,
    /// The queue has a dead-letter exchange (a late expiry is seen, not only counted).
    dead_letters: bool,
    /// Sweeps in a row that found the queue held (or, without a dead-letter exchange,
    /// empty): each doubles the wait before the next, up to [`MAX_IDLE_GAP_MS`].
    quiet: u32,
}

/// Why a sweep took nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Idle {
    /// The queue had no message.
    Empty,
    /// Consumers (or another connection's sweep) hold it, or its record could not be read.
    Held,
}

impl AmqpConnection {
    /// `name` was declared with `queue`'s arguments: it is swept, the first time soon if it
    /// has a TTL.
    pub(super) fn sweep_declared(&mut self, name: &str, queue: &Queue) {
        let policy = QueuePolicy::of(name, queue);
        let s = self.sweeps.entry(name.to_string()).or_default();
        s.id = queue.id.clone();
        s.ttl = policy.message_ttl;
        s.dead_letters = policy.dead_letters();
        s.quiet = 0;
        if let Some(ttl) = s.ttl {
            let due = self.now_ms + ttl.min(FIRST_SWEEP_MS);
            self.schedule_sweep(name, due);
        }
    }

    /// A message (with an `expiration` of `own` ms, if any) was published to `queue`
    /// through the default exchange: a swept queue is swept at its expiry.
    pub(super) fn sweep_published(&mut self, queue: &str, own: Option<u64>) {
        let Some(s) = self.sweeps.get_mut(queue) else {
            return;
        };
        s.quiet = 0;
        let Some(ttl) = lower(s.ttl, own) else {
            return;
        };
        let due = self.now_ms.saturating_add(ttl).saturating_add(1);
        self.schedule_sweep(queue, due);
    }

    /// When to sweep again after a sweep that took nothing: a TTL later (what comes
    /// meanwhile expires no sooner), at least [`IDLE_GAP_MS`], doubled for each such sweep
    /// in a row that found the queue held, or empty without a dead-letter exchange (many
    /// quiet queues, or many connections sweeping one, cost little), up to
    /// [`MAX_IDLE_GAP_MS`]. `None` for a queue without a TTL (a publish with an
    /// `expiration` asks again).
    fn idle_next(&mut self, name: &str, why: Idle) -> Option<u64> {
        let now = self.now_ms;
        let s = self.sweeps.get_mut(name)?;
        let gap = s.ttl?.max(IDLE_GAP_MS);
        let backed_off = gap.saturating_mul(1 << s.quiet.min(6)).min(MAX_IDLE_GAP_MS);
        if why == Idle::Held || !s.dead_letters {
            s.quiet += 1;
        }
        Some(now + gap.max(backed_off))
    }

    /// Sweeps `name` at `due` (or sooner, if a sweep is due sooner already).
    fn schedule_sweep(&mut self, name: &str, due: u64) {
        let now = self.now_ms;
        let Some(s) = self.sweeps.get_mut(name) else {
            return;
        };
        let due = due.max(s.last_ms + MIN_GAP_MS);
        if s.running {
            s.again = lower(s.again, Some(due));
            return;
        }
        if s.next.is_some_and(|(_, at)| at <= due) {
            return;
        }
        let token = self.ops.token();
        s.next = Some((token, due));
        self.out.push(Action::SetTimer {
            token,
            delay_ms: due.saturating_sub(now).max(1),
        });
    }

    /// A sweep's timer: a sweep starts, or one's wait for a message ended (the queue is
    /// empty). Whether `token` was one.
    pub(super) fn on_sweep_timer(&mut self, token: u64) -> bool {
        let Some((name, waited)) = self.sweeps.iter().find_map(|(n, s)| {
            if s.next.is_some_and(|(t, _)| t == token) {
                Some((n.clone(), false))
            } else if s.sub.is_some() && s.wait == token {
                Some((n.clone(), true))
            } else {
                None
            }
        }) else {
            return false;
        };
        if waited {
            let next = self.idle_next(&name, Idle::Empty);
            self.end_sweep(&name, next);
        } else {
            self.start_sweep(&name);
        }
        true
    }

    fn start_sweep(&mut self, name: &str) {
        let now = self.now_ms;
        let running = self.phase == Phase::Running;
        let consumed = self.consumes(name) || self.getters.values().any(|(_, q)| q == name);
        let Some(s) = self.sweeps.get_mut(name) else {
            return;
        };
        s.next = None;
        if !running {
            return;
        }
        if consumed {
            // This connection's consumers expire what they reach.
            if let Some(next) = self.idle_next(name, Idle::Held) {
                self.schedule_sweep(name, next);
            }
            return;
        }
        s.running = true;
        s.last_ms = now;
        let token = self.ops.start(Op::SweepRecord {
            queue: name.to_string(),
        });
        self.out.push(Action::KvGet {
            token,
            key: topology::queue_key(name),
        });
    }

    /// The record of a queue about to be swept: still the queue declared here, its
    /// consumer opens.
    pub(super) fn on_sweep_record(
        &mut self,
        queue: String,
        result: Result<Option<Vec<u8>>, OpError>,
    ) {
        let Some(s) = self.sweeps.get(&queue) else {
            return;
        };
        let record = match result {
            Ok(v) => v.as_deref().and_then(Queue::decode),
            Err(_) => {
                let next = self.idle_next(&queue, Idle::Held);
                return self.end_sweep(&queue, next);
            }
        };
        let record = record.filter(|q| s.id.is_none() || q.id == s.id);
        let Some(record) = record else {
            // Deleted, or declared anew elsewhere: not this connection's to sweep.
            self.sweeps.remove(&queue);
            return;
        };
        let policy = QueuePolicy::of(&queue, &record);
        let mut spec = queue_consumer(topology::queue_topic(&queue), 1, None);
        spec.mode = SubMode::Exclusive;
        let token = self.ops.start(Op::Sweep { queue, policy });
        self.out.push(Action::OpenConsumer { token, spec });
    }

    /// A sweep's consumer opened, or the backend refused it (consumers hold the queue).
    pub(super) fn on_sweep_opened(
        &mut self,
        queue: String,
        policy: QueuePolicy,
        result: Result<SubId, OpError>,
    ) {
        match (self.sweeps.get_mut(&queue), result) {
            (Some(s), Ok(sub)) if self.phase == Phase::Running => {
                let wait = self.ops.token();
                s.sub = Some(sub);
                s.wait = wait;
                self.policies.insert(sub, policy);
                self.out.push(Action::SetTimer {
                    token: wait,
                    delay_ms: EMPTY_WAIT_MS,
                });
            }
            (_, Ok(sub)) => self.out.push(Action::Unsubscribe { sub, delete: false }),
            (Some(_), Err(_)) => {
                let next = self.idle_next(&queue, Idle::Held);
                self.end_sweep(&queue, next);
            }
            (None, Err(_)) => {}
        }
    }

    /// A message reached a sweep's consumer: expired, it is dead-lettered and the sweep
    /// goes on; else the sweep ends, the next one at its expiry. Whether `m` was a sweep's.
    pub(super) fn on_sweep_message(&mut self, m: &Message) -> bool {
        let Some(name) = self
            .sweeps
            .iter()
            .find(|(_, s)| s.sub == Some(m.subscription))
            .map(|(n, _)| n.clone())
        else {
            return false;
        };
        if let Some(s) = self.sweeps.get_mut(&name) {
            s.quiet = 0;
        }
        if self.expire(m) {
            let wait = self.ops.token();
            if let Some(s) = self.sweeps.get_mut(&name) {
                s.wait = wait;
            }
            self.out.push(Action::SetTimer {
                token: wait,
                delay_ms: EMPTY_WAIT_MS,
            });
            return true;
        }
        let (_, _, properties) = super::channel::message_fields(&m.properties);
        let props = BasicProperties::read(&properties).unwrap_or_default();
        let due = self
            .policies
            .get(&m.subscription)
            .and_then(|p| p.expires_at(&props, m.publish_time_ms));
        self.end_sweep(&name, due);
        true
    }

    /// A sweep ends: its consumer closes (an unexpired message it holds goes back to the
    /// queue); the next one is due at `next`, if any.
    fn end_sweep(&mut self, name: &str, next: Option<u64>) {
        let Some(s) = self.sweeps.get_mut(name) else {
            return;
        };
        s.running = false;
        let again = s.again.take();
        if let Some(sub) = s.sub.take() {
            self.policies.remove(&sub);
            self.out.push(Action::Unsubscribe { sub, delete: false });
        }
        if let Some(due) = lower(next, again) {
            self.schedule_sweep(name, due);
        }
    }
}
