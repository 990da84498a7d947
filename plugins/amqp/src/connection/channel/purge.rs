//! `queue.purge` (§1.7.2.7) as RabbitMQ 3.x does it: the queue's ready messages go, those
//! delivered and not yet acknowledged stay with their consumers (acknowledged, or back in
//! the queue if rejected or their channel closes); `purge-ok` says how many went.
//!
//! Two ways, chosen by who holds the queue:
//!
//! - Nobody: an Exclusive consumer of the queue's subscription opens (the backend refuses
//!   it beside any other consumer), and its seek to the end of the queue's topic drops every
//!   message at once, however many. `purge-ok` reports the count taken before.
//! - Consumers (of this connection, or refused Exclusive: of others, on any gateway): a
//!   seek would drop what they hold too (the backend counts everything before the end as
//!   acknowledged, and the consumers reconnect), so a Shared consumer with a window of
//!   [`DRAIN_WINDOW`] takes the ready messages instead, acknowledging each, until the count
//!   taken before is reached or none came for [`DRAIN_IDLE_MS`]; messages this connection's
//!   `basic.get` consumers hold for the client (ready, in RabbitMQ's eyes) go too, and so
//!   does what they are handed while the purge drains.
//!   `purge-ok` reports what it took. Consumers with room in their prefetch keep taking
//!   messages meanwhile (RabbitMQ would have pushed them those already).

use super::*;

/// Messages a purge's consumer is handed before it acknowledges some.
const DRAIN_WINDOW: u32 = 256;
/// How long a purge's consumer waits for a message before the queue counts as drained.
const DRAIN_IDLE_MS: u64 = 100;

/// A purge taking a queue's ready messages one by one.
#[derive(Debug)]
pub(crate) struct PurgeDrain {
    channel: u16,
    queue: String,
    sub: SubId,
    no_wait: bool,
    /// Messages taken and acknowledged.
    purged: u64,
    /// The queue's count before the purge: no more can be ready (`u64::MAX`: unknown).
    limit: u64,
    /// The timer of the wait for the next message.
    timer: u64,
}

impl AmqpConnection {
    /// Opens the purge's consumer: Exclusive, to seek, unless this connection's own
    /// consumers or gets hold the queue (or the backend refused it: others do).
    pub(in crate::connection) fn open_purge_consumer(&mut self, mut p: PendingPurge) {
        let held_here = self.consumes(&p.queue)
            || self.channels.values().any(|s| {
                s.getters
                    .get(&p.queue)
                    .is_some_and(|g| g.subs().count() > 0)
            });
        p.drain |= held_here;
        let topic = topology::queue_topic(&p.queue);
        let mut spec = queue_consumer(topic, if p.drain { DRAIN_WINDOW } else { 1 }, None);
        if !p.drain {
            spec.mode = SubMode::Exclusive;
        }
        let token = self.ops.start(Op::Purge(p));
        self.out.push(Action::OpenConsumer { token, spec });
        self.busy = true;
    }

    /// The purge's consumer opened: seek it to the end, or take the ready messages.
    pub(in crate::connection) fn on_purge_consumer(
        &mut self,
        mut p: PendingPurge,
        result: Result<SubId, OpError>,
    ) {
        match result {
            Ok(sub) if p.drain => self.start_purge_drain(p, sub),
            Ok(sub) => {
                let token = self.ops.start(Op::PurgeSeek {
                    channel: p.channel,
                    sub,
                    no_wait: p.no_wait,
                    count: p.count,
                });
                self.out.push(Action::Seek {
                    token,
                    sub,
                    position: Position::Latest,
                });
            }
            // Consumers hold the queue: their messages stay, the ready ones are taken.
            Err(e) if e.kind == ErrorKind::Backend && !p.drain => {
                p.drain = true;
                self.open_purge_consumer(p);
            }
            // A route or a sweep (an Exclusive reader) holds the subscription for a moment.
            Err(e) if e.kind == ErrorKind::Backend && p.attempts < CONSUME_ATTEMPTS => {
                p.attempts += 1;
                self.open_again_soon(Op::Purge(p));
            }
            Err(e) => {
                self.busy = false;
                let err = ConnError::new(INTERNAL_ERROR, format!("purge: {}", e.message));
                self.close_channel(p.channel, err);
            }
        }
    }

    /// The purge's seek is done: close its consumer and answer.
    pub(in crate::connection) fn on_purged(
        &mut self,
        channel: u16,
        sub: SubId,
        (no_wait, count): (bool, u64),
        result: Result<(), OpError>,
    ) {
        self.busy = false;
        self.out.push(Action::Unsubscribe { sub, delete: false });
        let message_count = u32::try_from(count).unwrap_or(u32::MAX);
        match result {
            Ok(()) if !no_wait => self.send_method(
                channel,
                Method::QueuePurgeOk(QueuePurgeOk { message_count }),
            ),
            Ok(()) => {}
            Err(e) => {
                let err = ConnError::new(INTERNAL_ERROR, format!("purge: {}", e.message));
                self.close_channel(channel, err);
            }
        }
    }

    fn start_purge_drain(&mut self, p: PendingPurge, sub: SubId) {
        // What this connection's gets hold for their clients is ready: it goes.
        let mut purged = 0;
        for state in self.channels.values_mut() {
            if let Some(g) = state.getters.get_mut(&p.queue) {
                for m in g.ready.drain(..) {
                    self.out.ack(m.subscription, m.delivery_id);
                    purged += 1;
                }
            }
        }
        let limit = if p.count > 0 { p.count } else { u64::MAX };
        self.purge_drain = Some(PurgeDrain {
            channel: p.channel,
            queue: p.queue.clone(),
            sub,
            no_wait: p.no_wait,
            purged,
            limit,
            timer: 0,
        });
        self.purge_drain_goes_on();
    }

    /// Waits for the next message, or ends once the count is reached.
    fn purge_drain_goes_on(&mut self) {
        let timer = self.ops.token();
        let Some(d) = self.purge_drain.as_mut() else {
            return;
        };
        if d.purged >= d.limit {
            return self.end_purge_drain();
        }
        d.timer = timer;
        self.out.push(Action::SetTimer {
            token: timer,
            delay_ms: DRAIN_IDLE_MS,
        });
    }

    /// A message reached the purge's consumer: acknowledged, gone. Whether it was one.
    pub(in crate::connection) fn on_purge_drain_message(&mut self, m: &Message) -> bool {
        let sub = m.subscription;
        self.purge_drain_takes(m, |d| d.sub == sub)
    }

    /// A message reached a `basic.get` consumer of `queue`: while a purge drains that
    /// queue, it goes with the others (it is ready for the client). Whether it went.
    pub(in crate::connection) fn purge_takes_got(&mut self, queue: &str, m: &Message) -> bool {
        self.purge_drain_takes(m, |d| d.queue == queue)
    }

    /// `m` acknowledged and counted by the running purge, if `applies` to it.
    fn purge_drain_takes(&mut self, m: &Message, applies: impl Fn(&PurgeDrain) -> bool) -> bool {
        let Some(d) = self.purge_drain.as_mut().filter(|d| applies(d)) else {
            return false;
        };
        d.purged += 1;
        self.out.ack(m.subscription, m.delivery_id);
        self.purge_drain_goes_on();
        true
    }

    /// No message came for a while: the queue's ready messages are gone. Whether `token`
    /// was that wait.
    pub(in crate::connection) fn on_purge_drain_timer(&mut self, token: u64) -> bool {
        if self.purge_drain.as_ref().is_none_or(|d| d.timer != token) {
            return false;
        }
        self.end_purge_drain();
        true
    }

    fn end_purge_drain(&mut self) {
        let Some(d) = self.purge_drain.take() else {
            return;
        };
        self.busy = false;
        self.out.push(Action::Unsubscribe {
            sub: d.sub,
            delete: false,
        });
        if !d.no_wait {
            let message_count = u32::try_from(d.purged).unwrap_or(u32::MAX);
            self.send_method(
                d.channel,
                Method::QueuePurgeOk(QueuePurgeOk { message_count }),
            );
        }
    }
}
