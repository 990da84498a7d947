//! Caps on the queues of durable routes (ABI 0.2.5 `caps`): a queue keeps at most
//! `max-length` messages and `max-length-bytes` bytes of payload, as RabbitMQ 3.x classic
//! queues apply `x-max-length`, `x-max-length-bytes` and `x-overflow`
//! (`rabbit_amqqueue_process`: `will_overflow`, `maybe_drop_head`, `over_max_length`).
//!
//! - What counts: the queue's ready messages and the sum of their payload sizes, as
//!   RabbitMQ's `BQ:len` and `message_bytes_ready`. A message handed to a consumer of the
//!   queue's subscription leaves the count (before the plugin has it); one given back comes
//!   back at the head: a negative ack at its host call ([`Held`], so that the connection's
//!   next publish is judged with it), a consumer gone with it unacknowledged as it closes.
//! - `reject-publish` and `reject-publish-dlx`: a message that would take the queue over a
//!   limit is refused by it when it is published (`caps.publish-capped` names the queues
//!   that refused it, so that the plugin can nack its publisher, and dead-letter it for
//!   `-dlx`). The message is still stored in its source and copied into the other queues it
//!   reaches: the feeder skips the queues [`REFUSED_PROPERTY`] names.
//! - `drop-head`: the message is taken, and while the queue is over a limit its oldest ready
//!   messages are dropped: as many of the queue's next deliveries carry [`DROPPED_PROPERTY`]
//!   (the plugin settles them, dead-lettered with reason `maxlen` or dropped, instead of
//!   delivering them). The backend's queue stays in order, so the next deliveries are its
//!   oldest messages.
//!
//! Where the count lives: in this gateway's memory, one [`QueueCount`] per queue topic,
//! judged as the publish host call is made (before the message is stored, so that the
//! publisher's confirm can be the refusal) and moved by the queue's consumers in this
//! gateway. It is recovered from the backend: when a route opens a capped queue this process
//! does not count yet, the route's reader (then the subscription's only consumer, so every
//! message of its backlog is ready) asks for the subscription's backlog, and the count
//! starts from it; the sizes of those messages are unknown and count as 0 bytes.
//!
//! Not here: a count shared by several gateways (each counts what its own publishers and
//! consumers do).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

/// The property of a stored message that names the queues (short topic names, separated by
/// spaces) that refused it: the feeder copies it into the others only.
pub const REFUSED_PROPERTY: &str = "__magnetar.refused";

/// The property a delivery of a `drop-head` queue carries when the cap dropped it from the
/// head (value `maxlen`): the plugin settles it instead of delivering it.
pub const DROPPED_PROPERTY: &str = "__magnetar.dropped";

/// What a full queue does with a new message (RabbitMQ's `x-overflow`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Overflow {
    /// Take it and drop the oldest.
    DropHead,
    /// Refuse it.
    RejectPublish,
    /// Refuse it; the publisher's plugin dead-letters it.
    RejectPublishDlx,
}

/// A queue's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Cap {
    pub max_length: Option<u64>,
    pub max_bytes: Option<u64>,
    pub overflow: Overflow,
}

impl Cap {
    fn over(&self, len: u64, bytes: u64) -> bool {
        self.max_length.is_some_and(|m| len > m) || self.max_bytes.is_some_and(|m| bytes > m)
    }

    fn refuses(&self) -> bool {
        self.overflow != Overflow::DropHead
    }
}

/// The ready messages of one capped queue, oldest first: pure bookkeeping.
#[derive(Debug, Default)]
pub struct Ready {
    /// Messages at the head whose sizes are unknown (recovered from a backlog): 0 bytes.
    unknown: u64,
    /// The sizes of the others, oldest first.
    sizes: VecDeque<u64>,
    bytes: u64,
    /// Deliveries still to be dropped (`drop-head` took them off the head).
    drops: u64,
}

impl Ready {
    pub fn len(&self) -> u64 {
        self.unknown + self.sizes.len() as u64
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    fn pop_front(&mut self) -> bool {
        if self.unknown > 0 {
            self.unknown -= 1;
            return true;
        }
        match self.sizes.pop_front() {
            Some(s) => {
                self.bytes -= s;
                true
            }
            None => false,
        }
    }

    /// `drop-head`: the oldest go while the queue is over a limit.
    fn drop_head(&mut self, cap: &Cap) {
        if cap.refuses() {
            return;
        }
        while cap.over(self.len(), self.bytes) && self.pop_front() {
            self.drops += 1;
        }
    }

    /// A message of `size` bytes is published to the queue: whether the queue takes it.
    pub fn admit(&mut self, cap: &Cap, size: u64) -> bool {
        if cap.refuses() && cap.over(self.len() + 1, self.bytes + size) {
            return false;
        }
        self.sizes.push_back(size);
        self.bytes += size;
        self.drop_head(cap);
        true
    }

    /// A message leaves the head for a consumer: `true` if it is to be dropped instead.
    pub fn delivered(&mut self) -> bool {
        if self.drops > 0 {
            self.drops -= 1;
            return true;
        }
        self.pop_front();
        false
    }

    /// A delivered message of `size` bytes comes back to the head (as RabbitMQ requeues,
    /// after which `drop-head` applies again).
    pub fn given_back(&mut self, cap: &Cap, size: u64) {
        self.sizes.push_front(size);
        self.bytes += size;
        self.drop_head(cap);
    }

    /// A delivery that was to be dropped comes back undropped (its consumer went): the
    /// next one is dropped instead.
    pub fn dropped_again(&mut self) {
        self.drops += 1;
    }

    /// The queue was purged: nothing is ready.
    pub fn purged(&mut self) {
        *self = Ready::default();
    }

    /// The backend says `backlog` messages are ready: those not counted yet join the head,
    /// of unknown size.
    pub fn recovered(&mut self, cap: &Cap, backlog: u64) {
        self.unknown += backlog.saturating_sub(self.len());
        self.drop_head(cap);
    }
}

/// One capped queue's limits and count.
#[derive(Debug)]
pub struct QueueCount {
    state: Mutex<Counted>,
}

#[derive(Debug)]
struct Counted {
    cap: Cap,
    ready: Ready,
    /// The count was recovered from the backend (or needs no recovery).
    recovered: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl QueueCount {
    /// A message of `size` bytes is published to the queue: whether it takes it.
    pub fn admit(&self, size: u64) -> bool {
        let mut s = lock(&self.state);
        let cap = s.cap;
        s.ready.admit(&cap, size)
    }

    /// A message leaves the head for a consumer: `true` if it is to be dropped instead.
    pub fn delivered(&self) -> bool {
        lock(&self.state).ready.delivered()
    }

    /// A delivery comes back: ready again (`None`: one that was to be dropped, dropped
    /// again).
    pub fn give_back(&self, size: Option<u64>) {
        let mut s = lock(&self.state);
        let cap = s.cap;
        match size {
            Some(size) => s.ready.given_back(&cap, size),
            None => s.ready.dropped_again(),
        }
    }

    pub fn purged(&self) {
        lock(&self.state).ready.purged();
    }

    /// Whether the count still waits for the backend's backlog.
    pub fn needs_recovery(&self) -> bool {
        !lock(&self.state).recovered
    }

    pub fn recovered(&self, backlog: u64) {
        let mut s = lock(&self.state);
        let cap = s.cap;
        s.ready.recovered(&cap, backlog);
        s.recovered = true;
    }

    pub fn cap(&self) -> Cap {
        lock(&self.state).cap
    }

    /// Ready messages and their bytes.
    pub fn ready(&self) -> (u64, u64) {
        let s = lock(&self.state);
        (s.ready.len(), s.ready.bytes())
    }
}

/// The deliveries of one `messaging` consumer of a queue's subscription that are not
/// settled yet, with their sizes (`None`: dropped by `drop-head`), so that what comes back
/// counts again: given back at the `nack` host call itself (the count is right for the
/// connection's next publish), or when the consumer ends.
#[derive(Debug)]
pub struct Held {
    /// The queue (full topic).
    topic: String,
    sizes: Mutex<HashMap<u64, Option<u64>>>,
}

impl Held {
    pub fn new(topic: String) -> Arc<Self> {
        Arc::new(Held {
            topic,
            sizes: Mutex::new(HashMap::new()),
        })
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Delivery `id` of `size` bytes left the ready messages (`None`: it was dropped).
    pub fn delivered(&self, id: u64, size: Option<u64>) {
        lock(&self.sizes).insert(id, size);
    }

    /// Delivery `id` was acknowledged: it will not come back.
    pub fn settled(&self, id: u64) {
        lock(&self.sizes).remove(&id);
    }

    /// Delivery `id` comes back (a negative ack): ready again, if its queue is capped.
    pub fn given_back(&self, caps: &Caps, id: u64) {
        let Some(size) = lock(&self.sizes).remove(&id) else {
            return;
        };
        if let Some(count) = caps.get(&self.topic) {
            count.give_back(size);
        }
    }

    /// The consumer ended: every delivery not settled comes back.
    pub fn all_given_back(&self, caps: &Caps) {
        let sizes: Vec<Option<u64>> = lock(&self.sizes).drain().map(|(_, s)| s).collect();
        if let Some(count) = caps.get(&self.topic) {
            for size in sizes {
                count.give_back(size);
            }
        }
    }

    /// A seek moved the consumer: what it held is settled.
    pub fn clear(&self) {
        lock(&self.sizes).clear();
    }
}

/// The capped queues this gateway counts, by full topic.
#[derive(Default)]
pub struct Caps {
    queues: Mutex<HashMap<String, Arc<QueueCount>>>,
}

impl Caps {
    /// The count of `queue` under `cap`: a new one (to be recovered) if the queue was not
    /// counted; its limits replaced if they changed.
    pub fn counted(&self, queue: &str, cap: Cap) -> Arc<QueueCount> {
        let mut queues = lock(&self.queues);
        if let Some(q) = queues.get(queue) {
            let mut s = lock(&q.state);
            s.cap = cap;
            drop(s);
            return q.clone();
        }
        let q = Arc::new(QueueCount {
            state: Mutex::new(Counted {
                cap,
                ready: Ready::default(),
                recovered: false,
            }),
        });
        queues.insert(queue.to_string(), q.clone());
        q
    }

    /// The count of `queue`, if it is capped.
    pub fn get(&self, queue: &str) -> Option<Arc<QueueCount>> {
        lock(&self.queues).get(queue).cloned()
    }

    /// `queue` is no longer capped (or is deleted).
    pub fn remove(&self, queue: &str) {
        lock(&self.queues).remove(queue);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap(max_length: Option<u64>, max_bytes: Option<u64>, overflow: Overflow) -> Cap {
        Cap {
            max_length,
            max_bytes,
            overflow,
        }
    }

    #[test]
    fn reject_publish_refuses_what_would_go_over_either_limit() {
        let c = cap(Some(2), None, Overflow::RejectPublish);
        let mut r = Ready::default();
        assert!(r.admit(&c, 10));
        assert!(r.admit(&c, 10));
        assert!(!r.admit(&c, 1), "a third message");
        assert_eq!(r.len(), 2);
        // A consumer takes one: room for one more.
        assert!(!r.delivered());
        assert!(r.admit(&c, 1));
        assert!(!r.admit(&c, 1));
        // Given back, it counts again and may go over (RabbitMQ requeues past the limit).
        r.given_back(&c, 10);
        assert_eq!(r.len(), 3);

        let c = cap(None, Some(10), Overflow::RejectPublishDlx);
        let mut r = Ready::default();
        assert!(r.admit(&c, 6));
        assert!(!r.admit(&c, 5), "11 bytes");
        assert!(r.admit(&c, 4), "exactly 10 bytes");
        assert_eq!(r.bytes(), 10);
    }

    #[test]
    fn drop_head_drops_the_oldest_while_over_a_limit() {
        let c = cap(Some(2), None, Overflow::DropHead);
        let mut r = Ready::default();
        for _ in 0..5 {
            assert!(r.admit(&c, 1));
        }
        assert_eq!(r.len(), 2);
        // The three oldest are dropped as they come out, then the two newest delivered.
        assert_eq!(
            (0..5).map(|_| r.delivered()).collect::<Vec<_>>(),
            vec![true, true, true, false, false]
        );
        assert_eq!(r.len(), 0);

        let c = cap(None, Some(100), Overflow::DropHead);
        let mut r = Ready::default();
        assert!(r.admit(&c, 60));
        assert!(r.admit(&c, 30));
        assert!(r.admit(&c, 50), "160 bytes: the 60 goes");
        assert_eq!((r.len(), r.bytes()), (2, 80));
        assert!(
            r.admit(&c, 200),
            "bigger than the limit: everything goes, itself too"
        );
        assert_eq!((r.len(), r.bytes()), (0, 0));
        assert_eq!((0..4).filter(|_| r.delivered()).count(), 4);
    }

    #[test]
    fn a_consumers_deliveries_come_back_once_at_a_nack_or_at_its_end() {
        let caps = Caps::default();
        let count = caps.counted("q", cap(Some(2), None, Overflow::RejectPublish));
        assert!(count.admit(1) && count.admit(1));
        let held = Held::new("q".into());
        for id in [1, 2] {
            assert!(!count.delivered());
            held.delivered(id, Some(1));
        }
        assert_eq!(count.ready(), (0, 0));
        held.given_back(&caps, 1);
        held.given_back(&caps, 1);
        assert_eq!(count.ready(), (1, 1), "given back once");
        held.settled(2);
        held.all_given_back(&caps);
        assert_eq!(
            count.ready(),
            (1, 1),
            "an acked delivery does not come back"
        );
        held.delivered(3, Some(5));
        held.all_given_back(&caps);
        assert_eq!(count.ready(), (2, 6));
    }

    #[test]
    fn a_recovered_backlog_counts_without_sizes_and_a_purge_empties() {
        let c = cap(Some(3), Some(100), Overflow::RejectPublish);
        let mut r = Ready::default();
        assert!(r.admit(&c, 40));
        // The backend holds 3 ready messages: this one and two from before.
        r.recovered(&c, 3);
        assert_eq!((r.len(), r.bytes()), (3, 40));
        assert!(!r.admit(&c, 1));
        assert!(!r.delivered());
        assert_eq!((r.len(), r.bytes()), (2, 40), "an unknown one left first");
        r.purged();
        assert_eq!((r.len(), r.bytes()), (0, 0));
        assert!(r.admit(&c, 100));
    }
}
