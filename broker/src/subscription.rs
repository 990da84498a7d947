//! One subscription of a topic: its cursor, its consumers, and the dispatcher that hands
//! entries to them (Pulsar `CommandSubscribe` / `CommandFlow` / `CommandAck` /
//! `CommandRedeliverUnacknowledgedMessages` semantics).
//!
//! Guarantees:
//! - Order: redeliveries first (lowest entry id first), then new entries in log order.
//! - Flow control: an entry goes to a consumer only while it has permits > 0; a batch entry
//!   costs its `num_messages_in_batch` permits (as in Pulsar, permits may go negative on a
//!   batch, otherwise a batch larger than the receiver queue would never be delivered).
//! - Nothing is lost: an entry handed to a consumer stays in that consumer's unacked set
//!   until acknowledged; when the consumer closes, disconnects or asks for redelivery, it goes
//!   back to the subscription with `redelivery_count + 1`.
//! - Exclusive admits one consumer (a second gets `ConsumerBusy`); Shared round-robins over
//!   consumers with permits.
//! - Failover: one active consumer, chosen as Pulsar chooses among the consumers of the
//!   highest priority sorted by name: on a partition, the one at the partition's index modulo
//!   their number; on another topic, the one next on a hash ring of their names after the
//!   topic's hash ([`FailoverSlot`]). Every consumer is told with
//!   `CommandActiveConsumerChange`. When the active one changes, what the previous one had
//!   not acknowledged is delivered again to the new one (Pulsar rewinds the same way). A
//!   change waits a delay (1 s by default, Pulsar's `activeConsumerFailoverDelayTimeMillis`)
//!   unless the previous active consumer left: the first consumer too, so that consumers
//!   starting together all join before one gets anything, and a consumer taking over from
//!   one still attached, so that the old one acknowledges what it has first.
//! - Key_Shared: each entry goes to the consumer that wins rendezvous hashing of its key
//!   (ordering key, else partition key; keyless entries share one slot), so a key sticks to
//!   one consumer while it stays, and only the keys of a leaving consumer move. Entries are
//!   handed out in log order per key: an entry whose consumer cannot take it now (no
//!   permits) is passed over, and so is every later entry of its key in that pass, while the
//!   other keys' entries go on (at most `MAX_SKIPPED` passed over; beyond, reading waits).
//!   Passed-over entries are tried first, in order, in the next passes.
//!   A consumer that joins while entries handed out before are unacknowledged is "recently
//!   joined", as in Pulsar (`recentlyJoinedConsumers`, the default without
//!   `allowOutOfOrderDelivery`): it gets only entries from before its join until everything
//!   before it is acknowledged, so a key that moves to it is not delivered there while its
//!   earlier messages may still be in the old owner's hands (its newer entries are passed
//!   over meanwhile; `allowOutOfOrderDelivery` skips the hold-back).
//!   Consumers in Sticky mode (`KeySharedMeta`) choose their hash ranges instead: an entry
//!   goes to the consumer whose ranges hold its key's hash (Murmur3-32 of the key, as
//!   Pulsar's, modulo 65,536; keyless entries hash `NONE_KEY`), and waits while no consumer
//!   holds it. Overlapping ranges, and a consumer whose mode differs from the subscription's
//!   consumers', are refused with `ConsumerAssignError`.
//! - Negative acks (`CommandRedeliverUnacknowledgedMessages` with ids) and redeliver-all
//!   requeue entries with `redelivery_count + 1`; frames carry the consumer's epoch from the
//!   last redeliver-all, so a client drops frames that were in flight before it.
//! - Seek ([`Subscription::reset`]) moves the cursor and detaches every consumer; the
//!   clients resubscribe (Pulsar does the same) and start from the new position.
//! - Batch-index acks: an entry acknowledged in part keeps the bit set of its messages still
//!   unacknowledged; a redelivery carries that set (`CommandMessage.ack_set`) so the client
//!   skips what was acknowledged, and the entry counts as acknowledged once no bit is left.
//!   The sets are part of the cursor ([`Cursor`]), so they are saved with it and a batch
//!   comes back after a restart with only what was not acknowledged.
//! - Delayed delivery (`deliver_at_time`), on Shared and Key_Shared subscriptions as in
//!   Pulsar: an entry due later is set aside (in memory, bounded; after a restart it is read
//!   and set aside again) and handed out like a redelivery once due. Other subscription
//!   types deliver it at once, as Pulsar does.
//! - Hand-off to a connection uses `try_send` on its bounded queue: a slow connection makes
//!   the dispatcher pause (the caller retries), it never blocks the topic.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use std::hash::{Hash, Hasher};
use std::io::Write as _;

use pulsar::message::proto::{
    base_command::Type, command_subscribe::SubType, CommandActiveConsumerChange, CommandMessage,
    ServerError,
};
use tokio::sync::mpsc;

use crate::cursor::Cursor;
pub use crate::entry::StoredEntry;
use crate::naming::TopicName;
use crate::protocol::{self, message_id, Frame};

/// Most entries a subscription keeps queued for redelivery with their counts (bounded by the
/// log anyway; this bounds the count map).
const MAX_TRACKED_REDELIVERIES: usize = 1_000_000;
/// Most Key_Shared entries a subscription passes over for consumers that cannot take them
/// (Pulsar's look-ahead limit); beyond, reading pauses until they can.
const MAX_SKIPPED: usize = 10_000;
/// Most delayed entries a subscription sets aside; beyond, reading pauses until some are due.
const MAX_DELAYED: usize = 1_000_000;

/// One consumer's counters, as `CommandConsumerStatsResponse` carries them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerStats {
    pub name: String,
    /// Messages it may still be sent (its flow permits).
    pub available_permits: u64,
    /// Entries sent to it and not yet acknowledged.
    pub unacked: u64,
    /// The subscription's type, as Pulsar names it (`Exclusive`, `Shared`...).
    pub sub_type: String,
}

/// Identifies a consumer across connections: `consumer_id` is only unique per connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConsumerKey {
    pub connection: u64,
    pub consumer_id: u64,
}

/// A consumer attached to a subscription.
pub struct Consumer {
    pub key: ConsumerKey,
    /// The connection's outbound frame queue.
    pub tx: mpsc::Sender<Frame>,
    permits: i64,
    unacked: BTreeSet<u64>,
    /// Epoch from the client's last redeliver-all (`consumer_epoch`), echoed in messages.
    epoch: Option<u64>,
    /// Send broker-entry metadata with each message.
    entry_metadata: bool,
    /// `CommandSubscribe.consumer_name` and `priority_level` (Failover picks by them).
    pub name: String,
    pub priority: i32,
    /// Key_Shared: the read position when this consumer joined, while entries before it
    /// are unacknowledged (it gets none from there on until they are).
    joined_at: Option<u64>,
    /// Key_Shared: the hash ranges (inclusive) a Sticky consumer chose; empty in AutoSplit.
    pub hash_ranges: Vec<(u32, u32)>,
    /// Key_Shared: `allowOutOfOrderDelivery` (no hold-back when it joins).
    pub out_of_order: bool,
}

impl Consumer {
    pub fn new(
        key: ConsumerKey,
        tx: mpsc::Sender<Frame>,
        epoch: Option<u64>,
        entry_metadata: bool,
    ) -> Consumer {
        Consumer {
            key,
            tx,
            permits: 0,
            unacked: BTreeSet::new(),
            epoch,
            entry_metadata,
            name: String::new(),
            priority: 0,
            joined_at: None,
            hash_ranges: Vec::new(),
            out_of_order: false,
        }
    }
}

/// What a dispatch pass ended on.
#[derive(Debug, PartialEq, Eq)]
pub enum DispatchOutcome {
    /// Nothing more can be sent until permits, entries or acks arrive.
    Idle,
    /// A connection queue was full; try again shortly.
    Blocked,
}

/// A subscription and its dispatcher.
pub struct Subscription {
    pub name: String,
    pub durable: bool,
    pub sub_type: SubType,
    pub cursor: Cursor,
    /// Cursor changed since last persisted.
    pub dirty: bool,
    /// Next entry id never dispatched.
    read_position: u64,
    redeliver: BTreeSet<u64>,
    /// Key_Shared entries passed over because their consumer could not take them (they are
    /// in `redeliver` too), with their keys' hashes.
    skipped: HashMap<u64, KeyHash>,
    /// Key_Shared: the keys passed over by the last pass, if it read every entry and nothing
    /// that could let a passed-over entry go has happened since (permits for a consumer
    /// that had none, a consumer joining or leaving, a redelivery, an ack that ends a
    /// hold-back). The next pass then reads only new entries, instead of judging every
    /// passed-over entry again.
    settled_keys: Option<HashSet<u64>>,
    /// Entries set aside until their delivery time: (ms since the epoch, entry id).
    delayed: BTreeSet<(u64, u64)>,
    redelivery_counts: HashMap<u64, u32>,
    consumers: Vec<Consumer>,
    next_consumer: usize,
    /// Failover: the active consumer.
    active: Option<ConsumerKey>,
    /// Failover: how long a new active consumer waits before entries go to it, unless the
    /// previous one left (Pulsar's `activeConsumerFailoverDelayTimeMillis`; see `Takeover`).
    failover_delay_ms: u64,
    /// Failover: what picks the active consumer (see [`FailoverSlot`]).
    failover_slot: FailoverSlot,
    /// Failover: a takeover waiting for its delay.
    takeover: Option<Takeover>,
}

/// What picks a Failover subscription's active consumer among those of the highest priority
/// (lowest level) sorted by name, as Pulsar picks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailoverSlot {
    /// A partition of a partitioned topic: the consumer at the partition's index modulo their
    /// number, so the partitions spread over the consumers.
    Partition(u32),
    /// Any other topic: the consumer next on a hash ring of their names (100 points each)
    /// after this hash of the topic's name, so the topics of a multi-topic consumer spread.
    TopicHash(u32),
}

impl FailoverSlot {
    /// The slot of topic `name`.
    pub fn of(name: &TopicName) -> FailoverSlot {
        match name.partition_index() {
            Some(index) => FailoverSlot::Partition(index),
            None => FailoverSlot::TopicHash(murmur3_31(name.as_str().as_bytes())),
        }
    }
}

/// Points each consumer has on the Failover hash ring (Pulsar's
/// `CONSUMER_CONSISTENT_HASH_REPLICAS`).
const RING_POINTS: u32 = 100;

/// Murmur3-32 (seed 0) with its sign bit cleared, Pulsar's `makeHash`.
fn murmur3_31(bytes: &[u8]) -> u32 {
    // Reading a slice cannot fail.
    murmur3::murmur3_32(&mut &bytes[..], 0).unwrap_or(0) & 0x7fff_ffff
}

/// Which of `consumers` (priority level, name; in the order they joined) is a Failover
/// subscription's active one: among those of the highest priority (lowest level) sorted by
/// name, the one `slot` picks (see [`FailoverSlot`]). Shared with non-persistent topics.
pub(crate) fn failover_active(slot: FailoverSlot, consumers: &[(i32, &str)]) -> Option<usize> {
    let top = consumers.iter().map(|c| c.0).min()?;
    let mut first: Vec<(usize, &str)> = consumers
        .iter()
        .enumerate()
        .filter(|(_, c)| c.0 == top)
        .map(|(i, c)| (i, c.1))
        .collect();
    // Stable: equal names stay in the order they joined.
    first.sort_by(|a, b| a.1.cmp(b.1));
    let index = match slot {
        FailoverSlot::Partition(p) => p as usize % first.len().max(1),
        FailoverSlot::TopicHash(topic) => {
            // The first point at or after the topic's, else the first point; a point two
            // consumers share goes to the later one.
            let mut next: Option<(u32, usize)> = None;
            let mut lowest: Option<(u32, usize)> = None;
            let mut point_key = Vec::new();
            for (i, (_, name)) in first.iter().enumerate() {
                for point in 0..RING_POINTS {
                    // The consumer's name followed by the point's number.
                    point_key.clear();
                    point_key.extend_from_slice(name.as_bytes());
                    // Writing to a `Vec` cannot fail.
                    let _ = write!(point_key, "{point}");
                    let h = murmur3_31(&point_key);
                    if h >= topic && next.is_none_or(|(n, _)| h <= n) {
                        next = Some((h, i));
                    }
                    if lowest.is_none_or(|(l, _)| h <= l) {
                        lowest = Some((h, i));
                    }
                }
            }
            next.or(lowest).map_or(0, |(_, i)| i)
        }
    };
    first.get(index).map(|(i, _)| *i)
}

/// A Failover change of active consumer, waiting: nothing is dispatched until `due_ms`; then
/// what `from` (the previous active one, if still attached) has not acknowledged by then goes
/// to the new one. The wait lets `from` finish and acknowledge what it holds, and lets
/// consumers that start together all join before one is chosen, so that little is delivered
/// twice (Pulsar waits the same way).
#[derive(Debug, Clone, Copy)]
struct Takeover {
    from: Option<ConsumerKey>,
    /// Milliseconds since the Unix epoch.
    due_ms: u64,
}

impl Subscription {
    pub fn new(name: String, durable: bool, sub_type: SubType, cursor: Cursor) -> Subscription {
        let read_position = cursor.ack_floor();
        Subscription {
            name,
            durable,
            sub_type,
            cursor,
            dirty: false,
            read_position,
            redeliver: BTreeSet::new(),
            delayed: BTreeSet::new(),
            redelivery_counts: HashMap::new(),
            skipped: HashMap::new(),
            settled_keys: None,
            consumers: Vec::new(),
            next_consumer: 0,
            active: None,
            failover_delay_ms: 0,
            failover_slot: FailoverSlot::TopicHash(0),
            takeover: None,
        }
    }

    /// Failover settings: the delay before a new active consumer gets entries, and what
    /// picks it.
    pub fn with_failover(mut self, delay_ms: u64, slot: FailoverSlot) -> Subscription {
        self.failover_delay_ms = delay_ms;
        self.failover_slot = slot;
        self
    }

    pub fn has_consumers(&self) -> bool {
        !self.consumers.is_empty()
    }

    /// Its consumers' names, in the order they joined.
    pub fn consumer_names(&self) -> Vec<String> {
        self.consumers.iter().map(|c| c.name.clone()).collect()
    }

    /// What `CommandConsumerStats` reports of the consumer `key`, if it is attached here.
    pub fn consumer_stats(&self, key: ConsumerKey) -> Option<ConsumerStats> {
        let c = self.consumers.iter().find(|c| c.key == key)?;
        Some(ConsumerStats {
            name: c.name.clone(),
            available_permits: c.permits.max(0) as u64,
            unacked: c.unacked.len() as u64,
            sub_type: format!("{:?}", self.sub_type),
        })
    }

    /// Attaches a consumer, enforcing the subscription type. `now_ms` (since the Unix epoch)
    /// starts the delay of a Failover change of active consumer.
    pub fn add_consumer(
        &mut self,
        sub_type: SubType,
        consumer: Consumer,
        now_ms: u64,
    ) -> Result<(), (ServerError, String)> {
        if !self.consumers.is_empty() {
            if sub_type != self.sub_type {
                return Err((
                    ServerError::ConsumerBusy,
                    format!(
                        "subscription {} is {:?}, not {:?}",
                        self.name, self.sub_type, sub_type
                    ),
                ));
            }
            if sub_type == SubType::Exclusive {
                return Err((
                    ServerError::ConsumerBusy,
                    format!("exclusive consumer already connected to {}", self.name),
                ));
            }
        }
        if sub_type == SubType::KeyShared {
            self.check_hash_ranges(&consumer)?;
        }
        self.sub_type = sub_type;
        let before = self.active;
        let mut consumer = consumer;
        if sub_type == SubType::KeyShared
            && !consumer.out_of_order
            && !self.consumers.is_empty()
            && self.cursor.ack_floor() < self.read_position
        {
            consumer.joined_at = Some(self.read_position);
        }
        self.consumers.push(consumer);
        self.failover_changed(before, now_ms);
        if self.sub_type == SubType::Failover && self.takeover.is_none() && self.active == before {
            // The active consumer stays: the new one hears that it is not it.
            if let Some(c) = self.consumers.last() {
                notify_active(c, self.active);
            }
        }
        Ok(())
    }

    /// A Key_Shared consumer's mode must be its subscription's, and a Sticky consumer's
    /// ranges must be well-formed and overlap nobody's.
    fn check_hash_ranges(&self, consumer: &Consumer) -> Result<(), (ServerError, String)> {
        let refuse = |why: String| Err((ServerError::ConsumerAssignError, why));
        let sticky = !consumer.hash_ranges.is_empty();
        if let Some(other) = self.consumers.first() {
            if other.hash_ranges.is_empty() == sticky {
                let mode = |s: bool| if s { "Sticky" } else { "AutoSplit" };
                return refuse(format!(
                    "subscription {} is Key_Shared {}, not {}",
                    self.name,
                    mode(!sticky),
                    mode(sticky)
                ));
            }
        }
        let mut taken: Vec<(u32, u32)> = self
            .consumers
            .iter()
            .flat_map(|c| c.hash_ranges.iter().copied())
            .collect();
        for &(start, end) in &consumer.hash_ranges {
            if start > end || end >= HASH_RANGE {
                return refuse(format!(
                    "hash range [{start}, {end}] is not within [0, {}]",
                    HASH_RANGE - 1
                ));
            }
            if let Some((s, e)) = taken.iter().find(|(s, e)| start <= *e && *s <= end) {
                return refuse(format!(
                    "hash range [{start}, {end}] overlaps [{s}, {e}] of subscription {}",
                    self.name
                ));
            }
            taken.push((start, end));
        }
        Ok(())
    }

    /// Detaches a consumer; its unacknowledged entries return for redelivery.
    pub fn remove_consumer(&mut self, key: ConsumerKey, now_ms: u64) -> bool {
        let Some(pos) = self.consumers.iter().position(|c| c.key == key) else {
            return false;
        };
        let before = self.active;
        let consumer = self.consumers.remove(pos);
        for id in consumer.unacked {
            self.requeue(id);
        }
        self.failover_changed(before, now_ms);
        true
    }

    /// The active consumer of a Failover subscription (see [`FailoverSlot`]).
    fn active_key(&self) -> Option<ConsumerKey> {
        if self.sub_type != SubType::Failover {
            return None;
        }
        let candidates: Vec<(i32, &str)> = self
            .consumers
            .iter()
            .map(|c| (c.priority, c.name.as_str()))
            .collect();
        let index = failover_active(self.failover_slot, &candidates)?;
        self.consumers.get(index).map(|c| c.key)
    }

    /// After a consumer joined or left: on Failover, if the active one changed, the previous
    /// one's unacknowledged entries go to the new one and everyone hears who is active. At
    /// once if the previous one left; otherwise (it is still attached, or there was none)
    /// after the delay.
    fn failover_changed(&mut self, before: Option<ConsumerKey>, now_ms: u64) {
        // Called whenever a consumer joins or leaves: Key_Shared routes change too.
        self.settled_keys = None;
        self.active = self.active_key();
        if let Some(takeover) = self.takeover {
            match takeover.from {
                // The consumer it was from is active again: it never stopped.
                Some(from) if self.active == Some(from) => self.takeover = None,
                // It left: what it held came back when it did, nothing to wait for.
                Some(from) if !self.consumers.iter().any(|c| c.key == from) => {
                    self.finish_takeover()
                }
                None if self.active.is_none() => self.takeover = None,
                _ => {}
            }
            return;
        }
        if self.active == before || self.active.is_none() {
            return;
        }
        let from = before.filter(|k| self.consumers.iter().any(|c| c.key == *k));
        if self.failover_delay_ms > 0 && (from.is_some() || before.is_none()) {
            self.takeover = Some(Takeover {
                from,
                due_ms: now_ms.saturating_add(self.failover_delay_ms),
            });
        } else {
            self.hand_over(from);
        }
    }

    /// Ends a waiting takeover: entries go to the active consumer from now on.
    fn finish_takeover(&mut self) {
        if let Some(takeover) = self.takeover.take() {
            self.hand_over(takeover.from);
        }
    }

    /// The active consumer changed from `from`: what `from` has not acknowledged is delivered
    /// again (to the active one), and every consumer hears who is active.
    fn hand_over(&mut self, from: Option<ConsumerKey>) {
        if let Some(old) = from.and_then(|k| self.consumers.iter_mut().find(|c| c.key == k)) {
            let back = std::mem::take(&mut old.unacked);
            for id in back {
                if !self.cursor.is_acked(id) {
                    self.redeliver.insert(id);
                }
            }
        }
        for c in &self.consumers {
            notify_active(c, self.active);
        }
    }

    fn requeue(&mut self, id: u64) {
        if self.cursor.is_acked(id) {
            return;
        }
        if self.redelivery_counts.len() < MAX_TRACKED_REDELIVERIES {
            *self.redelivery_counts.entry(id).or_insert(0) += 1;
        }
        self.redeliver.insert(id);
        self.settled_keys = None;
    }

    /// `CommandFlow`: adds permits.
    pub fn flow(&mut self, key: ConsumerKey, permits: u32) {
        if let Some(c) = self.consumers.iter_mut().find(|c| c.key == key) {
            if c.permits <= 0 {
                self.settled_keys = None;
            }
            c.permits = c.permits.saturating_add(i64::from(permits));
        }
    }

    /// `CommandAck`. Returns whether the cursor changed.
    pub fn ack(&mut self, ids: &[u64], cumulative: bool) -> bool {
        let mut changed = false;
        for &id in ids {
            if cumulative {
                changed |= self.cursor.ack_cumulative(id);
                for c in &mut self.consumers {
                    c.unacked = c.unacked.split_off(&(id.saturating_add(1)));
                }
                self.redeliver = self.redeliver.split_off(&(id.saturating_add(1)));
                self.skipped.retain(|k, _| *k > id);
                self.redelivery_counts.retain(|k, _| *k > id);
            } else {
                changed |= self.cursor.ack(id);
                for c in &mut self.consumers {
                    c.unacked.remove(&id);
                }
                self.redeliver.remove(&id);
                self.skipped.remove(&id);
                self.redelivery_counts.remove(&id);
            }
        }
        self.dirty |= changed && self.durable;
        self.unsettle_if_hold_back_ends();
        changed
    }

    /// After an ack: a recently joined consumer whose hold-back ends can take entries it was
    /// passed over for.
    fn unsettle_if_hold_back_ends(&mut self) {
        let floor = self.cursor.ack_floor();
        if self
            .consumers
            .iter()
            .any(|c| c.joined_at.is_some_and(|joined_at| floor >= joined_at))
        {
            self.settled_keys = None;
        }
    }

    /// A batch-index ack of entry `id`: `set` holds the bits of its messages still
    /// unacknowledged (kept in the cursor, so persisted). Once none is left the entry is
    /// acknowledged whole. Returns whether the cursor changed.
    pub fn ack_batch_indexes(&mut self, id: u64, set: &[i64]) -> bool {
        if !self.cursor.ack_batch_indexes(id, set) {
            return false;
        }
        if self.cursor.is_acked(id) {
            for c in &mut self.consumers {
                c.unacked.remove(&id);
            }
            self.redeliver.remove(&id);
            self.skipped.remove(&id);
            self.redelivery_counts.remove(&id);
            self.unsettle_if_hold_back_ends();
        }
        self.dirty |= self.durable;
        true
    }

    /// `CommandRedeliverUnacknowledgedMessages`: all of the consumer's unacked entries, or
    /// just `ids` (negative acks); `epoch` is the client's new consumer epoch, if it sent one.
    pub fn redeliver(&mut self, key: ConsumerKey, ids: Option<&[u64]>, epoch: Option<u64>) {
        let Some(c) = self.consumers.iter_mut().find(|c| c.key == key) else {
            return;
        };
        if epoch.is_some() {
            c.epoch = epoch;
        }
        let back: Vec<u64> = match ids {
            None => std::mem::take(&mut c.unacked).into_iter().collect(),
            Some(ids) => ids
                .iter()
                .filter(|id| c.unacked.remove(id))
                .copied()
                .collect(),
        };
        for id in back {
            self.requeue(id);
        }
    }

    /// Detaches every consumer (the topic is being unloaded: its cursor is saved and the
    /// unacknowledged entries come back when the topic is opened again).
    pub fn take_consumers(&mut self) -> Vec<Consumer> {
        self.detach_all()
    }

    fn detach_all(&mut self) -> Vec<Consumer> {
        self.active = None;
        self.takeover = None;
        std::mem::take(&mut self.consumers)
    }

    /// Seek: everything before `position` counts as acknowledged, everything from it on as
    /// not (individual acks above it are forgotten, as Pulsar's cursor reset does). Returns
    /// the detached consumers, whom the caller tells to reconnect.
    pub fn reset(&mut self, position: u64) -> Vec<Consumer> {
        self.cursor = Cursor::at(position);
        self.read_position = position;
        self.redeliver.clear();
        self.skipped.clear();
        self.settled_keys = None;
        self.delayed.clear();
        self.redelivery_counts.clear();
        self.dirty |= self.durable;
        self.detach_all()
    }

    /// Sends as many entries as permits allow. `end` is the log's next entry id; `read`
    /// fetches an entry (`None` if it cannot be read, which pauses this subscription).
    pub fn dispatch(
        &mut self,
        end: u64,
        now_ms: u64,
        read: &mut dyn FnMut(u64) -> Option<Arc<StoredEntry>>,
    ) -> DispatchOutcome {
        match self.takeover {
            Some(takeover) if takeover.due_ms > now_ms => return DispatchOutcome::Idle,
            Some(_) => self.finish_takeover(),
            None => {}
        }
        while let Some(&(at, id)) = self.delayed.first() {
            if at > now_ms {
                break;
            }
            self.delayed.pop_first();
            self.redeliver.insert(id);
            self.settled_keys = None;
        }
        let delays = matches!(self.sub_type, SubType::Shared | SubType::KeyShared);
        let key_shared = self.sub_type == SubType::KeyShared;
        let floor = self.cursor.ack_floor();
        for c in &mut self.consumers {
            if c.joined_at.is_some_and(|joined_at| floor >= joined_at) {
                c.joined_at = None;
            }
        }
        // Key_Shared: redeliveries below `pass_from` were passed over in this pass, and so
        // were the keys in `passed_keys` (a later entry of such a key waits too). A settled
        // subscription starts past them all, with the keys the last pass passed over.
        let (mut pass_from, mut passed_keys) = match self.settled_keys.take() {
            Some(keys) if key_shared => (u64::MAX, keys),
            _ => (0, HashSet::new()),
        };
        loop {
            // Next entry: redeliveries first, then the unread tail; skip acknowledged ones.
            let (id, from_redeliver) = if let Some(&id) = self.redeliver.range(pass_from..).next() {
                (id, true)
            } else if self.read_position < end {
                (self.read_position, false)
            } else {
                if key_shared {
                    self.settled_keys = Some(passed_keys);
                }
                return DispatchOutcome::Idle;
            };
            if self.cursor.is_acked(id) {
                self.advance(id, from_redeliver);
                continue;
            }
            if !self.consumers.iter().any(|c| c.permits > 0) {
                return DispatchOutcome::Idle;
            }
            // An entry passed over before: judged again without reading it.
            if let Some(hash) = self.skipped.get(&id).copied() {
                if self.passes_over(id, hash, &passed_keys) {
                    passed_keys.insert(hash.route);
                    pass_from = id + 1;
                    continue;
                }
            }
            let Some(entry) = read(id) else {
                return DispatchOutcome::Idle;
            };
            let due = entry.metadata.deliver_at_time.unwrap_or(0);
            if delays && !from_redeliver && due > 0 && due as u64 > now_ms {
                if self.delayed.len() >= MAX_DELAYED {
                    return DispatchOutcome::Idle;
                }
                self.delayed.insert((due as u64, id));
                self.advance(id, false);
                continue;
            }
            if key_shared {
                let hash = key_hash(&entry);
                if self.passes_over(id, hash, &passed_keys) {
                    // Its consumer cannot take it now: the entries of other keys go on.
                    if !from_redeliver {
                        if self.skipped.len() >= MAX_SKIPPED {
                            // Every passed-over entry was judged: settled until it changes.
                            self.settled_keys = Some(passed_keys);
                            return DispatchOutcome::Idle;
                        }
                        self.redeliver.insert(id);
                        self.read_position = id + 1;
                    }
                    self.skipped.insert(id, hash);
                    passed_keys.insert(hash.route);
                    pass_from = id + 1;
                    continue;
                }
            }
            let Some(index) = self.pick_consumer(&entry) else {
                return DispatchOutcome::Idle;
            };
            let Some(consumer) = self.consumers.get_mut(index) else {
                return DispatchOutcome::Idle;
            };
            let redelivery_count = self.redelivery_counts.get(&id).copied().unwrap_or(0);
            let ack_set = self
                .cursor
                .unacked_in_batch(id)
                .map(<[i64]>::to_vec)
                .unwrap_or_default();
            let frame = message_frame(consumer, id, redelivery_count, ack_set, &entry);
            match consumer.tx.try_send(frame) {
                Ok(()) => {
                    consumer.permits = consumer
                        .permits
                        .saturating_sub(i64::try_from(entry.num_messages()).unwrap_or(i64::MAX));
                    consumer.unacked.insert(id);
                    self.advance(id, from_redeliver);
                    self.next_consumer = index + 1;
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    if key_shared && !from_redeliver {
                        // Reading the tail: every passed-over entry was judged in this pass.
                        self.settled_keys = Some(passed_keys);
                    }
                    return DispatchOutcome::Blocked;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    let key = consumer.key;
                    self.remove_consumer(key, now_ms);
                }
            }
        }
    }

    /// Key_Shared: whether entry `id` (key hashes `hash`) waits in this pass: an earlier
    /// entry of its key waits, its consumer has no permits, or its consumer joined recently
    /// and the entry is from after the join.
    fn passes_over(&self, id: u64, hash: KeyHash, passed_keys: &HashSet<u64>) -> bool {
        if passed_keys.contains(&hash.route) {
            return true;
        }
        match self.target(hash).and_then(|i| self.consumers.get(i)) {
            Some(c) => c.permits <= 0 || c.joined_at.is_some_and(|joined_at| id >= joined_at),
            None => true,
        }
    }

    /// Key_Shared: the consumer whose key range holds `hash` (Sticky), or that wins
    /// rendezvous hashing of the key (AutoSplit), with or without permits.
    fn target(&self, hash: KeyHash) -> Option<usize> {
        if self.consumers.iter().any(|c| !c.hash_ranges.is_empty()) {
            self.consumers.iter().position(|c| {
                c.hash_ranges
                    .iter()
                    .any(|(start, end)| (*start..=*end).contains(&hash.sticky))
            })
        } else {
            self.consumers
                .iter()
                .enumerate()
                .max_by_key(|(_, c)| rendezvous(hash.route, c.key))
                .map(|(i, _)| i)
        }
    }

    /// When the next delayed entry or a waiting Failover takeover is due (ms since the
    /// epoch).
    pub fn next_due(&self) -> Option<u64> {
        let delayed = self.delayed.first().map(|(at, _)| *at);
        let takeover = self.takeover.map(|t| t.due_ms);
        match (delayed, takeover) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn advance(&mut self, id: u64, from_redeliver: bool) {
        if from_redeliver {
            self.redeliver.remove(&id);
            self.skipped.remove(&id);
        } else {
            self.read_position = id + 1;
        }
    }

    /// The consumer `entry` goes to now, if it has permits.
    fn pick_consumer(&self, entry: &StoredEntry) -> Option<usize> {
        let chosen = match self.sub_type {
            SubType::Shared => {
                let n = self.consumers.len();
                return (0..n)
                    .map(|i| (self.next_consumer + i) % n)
                    .find(|&i| self.consumers.get(i).is_some_and(|c| c.permits > 0));
            }
            SubType::KeyShared => self.target(key_hash(entry)),
            SubType::Failover => self
                .consumers
                .iter()
                .position(|c| Some(c.key) == self.active),
            SubType::Exclusive => self.consumers.first().map(|_| 0),
        };
        chosen.filter(|&i| self.consumers.get(i).is_some_and(|c| c.permits > 0))
    }

    /// Entries dispatched but not yet acknowledged, over all consumers.
    #[cfg(test)]
    fn unacked_count(&self) -> usize {
        self.consumers.iter().map(|c| c.unacked.len()).sum()
    }
}

/// Tells a Failover consumer whether it is the active one (`CommandActiveConsumerChange`).
fn notify_active(consumer: &Consumer, active: Option<ConsumerKey>) {
    let frame = protocol::command(Type::ActiveConsumerChange, |r| {
        r.active_consumer_change = Some(CommandActiveConsumerChange {
            consumer_id: consumer.key.consumer_id,
            is_active: Some(Some(consumer.key) == active),
        })
    });
    // Advisory only: a full queue just misses the notice.
    let _ = consumer.tx.try_send(frame.into());
}

/// The key Key_Shared routes by: the ordering key, else the partition key, else none.
fn sticky_key(entry: &StoredEntry) -> &[u8] {
    let m = &entry.metadata;
    match (&m.ordering_key, &m.partition_key) {
        (Some(k), _) => k,
        (None, Some(k)) => k.as_bytes(),
        (None, None) => &[],
    }
}

/// Size of Key_Shared's hash space (Pulsar's `DEFAULT_RANGE_SIZE`).
pub const HASH_RANGE: u32 = 1 << 16;

/// A key's hash for Sticky ranges, as Pulsar computes it (Murmur3-32 with seed 0, its sign
/// bit cleared, modulo [`HASH_RANGE`]; 0, which Pulsar 4 keeps for "not set", becomes 1); a
/// keyless entry hashes Pulsar's `NONE_KEY`.
fn sticky_hash(key: &[u8]) -> u32 {
    let key = if key.is_empty() { b"NONE_KEY" } else { key };
    // Reading a slice cannot fail.
    (murmur3_31(key) % HASH_RANGE).max(1)
}

/// The hashes Key_Shared routes an entry's key by.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KeyHash {
    /// For rendezvous hashing (AutoSplit), and to tell keys apart within a dispatch pass.
    pub route: u64,
    /// For Sticky ranges.
    pub sticky: u32,
}

pub(crate) fn key_hash(entry: &StoredEntry) -> KeyHash {
    let key = sticky_key(entry);
    // DefaultHasher::new() has fixed keys: the same key always hashes the same.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    KeyHash {
        route: h.finish(),
        sticky: sticky_hash(key),
    }
}

/// Rendezvous (highest random weight) score of a key (its route hash) for a consumer.
pub(crate) fn rendezvous(key: u64, consumer: ConsumerKey) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    consumer.hash(&mut h);
    h.finish()
}

/// `CommandMessage` carrying a stored entry (metadata and payload unchanged).
fn message_frame(
    consumer: &Consumer,
    id: u64,
    redelivery_count: u32,
    ack_set: Vec<i64>,
    entry: &StoredEntry,
) -> Frame {
    let command = protocol::command(Type::Message, |c| {
        c.message = Some(CommandMessage {
            consumer_id: consumer.key.consumer_id,
            message_id: message_id(id),
            redelivery_count: Some(redelivery_count),
            ack_set,
            consumer_epoch: consumer.epoch,
        })
    })
    .command;
    let broker = entry.broker.as_ref().filter(|_| consumer.entry_metadata);
    Frame::Raw(protocol::message_frame(
        &command,
        broker,
        &entry.tail,
        entry.tail_crc,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(batch: i32) -> Arc<StoredEntry> {
        let metadata = pulsar::message::proto::MessageMetadata {
            num_messages_in_batch: Some(batch),
            ..Default::default()
        };
        Arc::new(crate::entry::NewEntry::new(metadata, b"x").seal(0, 0).1)
    }

    fn consumer(id: u64, tx: mpsc::Sender<Frame>) -> Consumer {
        Consumer::new(key(id), tx, None, false)
    }

    fn key(id: u64) -> ConsumerKey {
        ConsumerKey {
            connection: 1,
            consumer_id: id,
        }
    }

    fn ids(rx: &mut mpsc::Receiver<Frame>) -> Vec<(u64, u32)> {
        use tokio_util::codec::Decoder as _;
        let mut out = Vec::new();
        while let Ok(frame) = rx.try_recv() {
            // Commands (active consumer changes) are not messages.
            let Frame::Raw(bytes) = frame else { continue };
            let mut buf = bytes::BytesMut::from(&bytes[..]);
            let m = protocol::FrameCodec
                .decode(&mut buf)
                .unwrap()
                .unwrap()
                .into_message()
                .unwrap();
            let msg = m.command.message.unwrap();
            out.push((msg.message_id.entry_id, msg.redelivery_count.unwrap()));
        }
        out
    }

    #[test]
    fn consumer_stats_count_permits_left_and_entries_unacknowledged() {
        let mut sub = Subscription::new("s".into(), true, SubType::Shared, Cursor::at(0));
        let (tx, _rx) = mpsc::channel(100);
        sub.add_consumer(SubType::Shared, consumer(1, tx), 0)
            .unwrap();
        let mut read = |_| Some(entry(1));
        sub.flow(key(1), 5);
        sub.dispatch(3, 0, &mut read);
        sub.ack(&[1], false);
        let stats = sub.consumer_stats(key(1)).unwrap();
        assert_eq!(stats.available_permits, 2);
        assert_eq!(stats.unacked, 2);
        assert_eq!(stats.sub_type, "Shared");
        assert_eq!(sub.consumer_stats(key(2)), None);
    }

    #[test]
    fn permits_are_respected_and_order_kept() {
        let mut sub = Subscription::new("s".into(), true, SubType::Exclusive, Cursor::at(0));
        let (tx, mut rx) = mpsc::channel(100);
        sub.add_consumer(SubType::Exclusive, consumer(1, tx), 0)
            .unwrap();
        let mut read = |_| Some(entry(1));
        assert_eq!(sub.dispatch(10, 0, &mut read), DispatchOutcome::Idle);
        assert!(ids(&mut rx).is_empty());
        sub.flow(key(1), 3);
        sub.dispatch(10, 0, &mut read);
        assert_eq!(ids(&mut rx), vec![(0, 0), (1, 0), (2, 0)]);
        let (tx2, _rx2) = mpsc::channel(1);
        assert!(sub
            .add_consumer(SubType::Exclusive, consumer(2, tx2), 0)
            .is_err());
    }

    #[test]
    fn shared_round_robin_and_close_requeues_with_count() {
        let mut sub = Subscription::new("s".into(), true, SubType::Shared, Cursor::at(0));
        let (tx1, mut rx1) = mpsc::channel(100);
        let (tx2, mut rx2) = mpsc::channel(100);
        sub.add_consumer(SubType::Shared, consumer(1, tx1), 0)
            .unwrap();
        sub.add_consumer(SubType::Shared, consumer(2, tx2), 0)
            .unwrap();
        sub.flow(key(1), 10);
        sub.flow(key(2), 10);
        let mut read = |_| Some(entry(1));
        sub.dispatch(4, 0, &mut read);
        let a = ids(&mut rx1);
        let b = ids(&mut rx2);
        assert_eq!(a.len(), 2);
        assert_eq!(b.len(), 2);
        sub.ack(&[a[0].0], false);
        sub.remove_consumer(key(1), 0);
        assert_eq!(sub.unacked_count(), 2);
        sub.dispatch(4, 0, &mut read);
        assert_eq!(ids(&mut rx2), vec![(a[1].0, 1)]);
    }

    fn keyed(key: &str) -> Arc<StoredEntry> {
        let metadata = pulsar::message::proto::MessageMetadata {
            partition_key: Some(key.to_string()),
            ..Default::default()
        };
        Arc::new(crate::entry::NewEntry::new(metadata, b"x").seal(0, 0).1)
    }

    #[test]
    fn key_shared_keeps_each_key_on_one_consumer() {
        let mut sub = Subscription::new("s".into(), true, SubType::KeyShared, Cursor::at(0));
        let mut rxs = Vec::new();
        for i in 0..3 {
            let (tx, rx) = mpsc::channel(1000);
            sub.add_consumer(SubType::KeyShared, consumer(i, tx), 0)
                .unwrap();
            sub.flow(key(i), 1000);
            rxs.push(rx);
        }
        let keys: Vec<String> = (0..200).map(|i| format!("k{}", i % 20)).collect();
        let mut read = |id: u64| Some(keyed(&keys[id as usize]));
        sub.dispatch(200, 0, &mut read);
        let mut owner = HashMap::new();
        let mut used = 0;
        for (c, rx) in rxs.iter_mut().enumerate() {
            let got = ids(rx);
            used += usize::from(!got.is_empty());
            let mut last = None;
            for (id, _) in got {
                assert!(last < Some(id), "log order per consumer");
                last = Some(id);
                assert_eq!(*owner.entry(keys[id as usize].clone()).or_insert(c), c);
            }
        }
        assert_eq!(owner.len(), 20);
        assert!(used > 1, "keys spread over consumers");
    }

    /// Drains a consumer's queue: the entry ids of its messages, and what its
    /// `CommandActiveConsumerChange` notices said (is it active), in order.
    fn failover_frames(rx: &mut mpsc::Receiver<Frame>) -> (Vec<u64>, Vec<bool>) {
        use tokio_util::codec::Decoder as _;
        let (mut entries, mut notices) = (Vec::new(), Vec::new());
        while let Ok(frame) = rx.try_recv() {
            match frame {
                Frame::Command(m) => {
                    let change = m.command.active_consumer_change.unwrap();
                    notices.push(change.is_active.unwrap());
                }
                Frame::Raw(bytes) => {
                    let mut buf = bytes::BytesMut::from(&bytes[..]);
                    let m = protocol::FrameCodec.decode(&mut buf).unwrap().unwrap();
                    let m = m.into_message().unwrap();
                    entries.push(m.command.message.unwrap().message_id.entry_id);
                }
            }
        }
        (entries, notices)
    }

    fn failover_consumer(id: u64, name: &str) -> (Consumer, mpsc::Receiver<Frame>) {
        let (tx, rx) = mpsc::channel(100);
        let mut c = consumer(id, tx);
        c.name = name.into();
        (c, rx)
    }

    /// A Failover subscription on partition 0 (its active consumer is the first by name)
    /// with a 1 s delay.
    fn failover_sub() -> Subscription {
        Subscription::new("s".into(), true, SubType::Failover, Cursor::at(0))
            .with_failover(1000, FailoverSlot::Partition(0))
    }

    #[test]
    fn failover_active_is_first_by_name_and_takeover_redelivers() {
        let mut sub = Subscription::new("s".into(), true, SubType::Failover, Cursor::at(0))
            .with_failover(0, FailoverSlot::Partition(0));
        let (b, mut rx_b) = failover_consumer(2, "b");
        let (a, mut rx_a) = failover_consumer(1, "a");
        sub.add_consumer(SubType::Failover, b, 0).unwrap();
        sub.add_consumer(SubType::Failover, a, 0).unwrap();
        sub.flow(key(1), 10);
        sub.flow(key(2), 10);
        let mut read = |_| Some(entry(1));
        sub.dispatch(3, 0, &mut read);
        assert_eq!(failover_frames(&mut rx_a).0, vec![0, 1, 2]);
        assert!(failover_frames(&mut rx_b).0.is_empty());
        sub.ack(&[0], false);
        sub.remove_consumer(key(1), 0);
        sub.dispatch(4, 0, &mut read);
        assert_eq!(failover_frames(&mut rx_b).0, vec![1, 2, 3]);
    }

    #[test]
    fn failover_waits_its_delay_before_a_new_active_consumer_gets_entries() {
        let mut sub = failover_sub();
        let mut read = |_| Some(entry(1));
        let (b, mut rx_b) = failover_consumer(2, "b");
        sub.add_consumer(SubType::Failover, b, 0).unwrap();
        sub.flow(key(2), 10);
        // The first consumer waits too: others starting with it join before one is chosen.
        assert_eq!(sub.next_due(), Some(1000));
        sub.dispatch(4, 999, &mut read);
        assert_eq!(failover_frames(&mut rx_b), (vec![], vec![]));
        sub.dispatch(4, 1000, &mut read);
        assert_eq!(failover_frames(&mut rx_b), (vec![0, 1, 2, 3], vec![true]));
        assert_eq!(sub.next_due(), None);

        // "a" sorts first and takes over from "b", which is still attached: after the delay.
        let (a, mut rx_a) = failover_consumer(1, "a");
        sub.add_consumer(SubType::Failover, a, 5_000).unwrap();
        sub.flow(key(1), 10);
        assert_eq!(sub.next_due(), Some(6_000));
        sub.dispatch(6, 5_999, &mut read);
        assert_eq!(failover_frames(&mut rx_a), (vec![], vec![]));
        assert_eq!(failover_frames(&mut rx_b), (vec![], vec![]));
        // Meanwhile "b" acknowledges what it finished: that is not delivered again.
        sub.ack(&[0, 1], false);
        sub.dispatch(6, 6_000, &mut read);
        assert_eq!(failover_frames(&mut rx_a), (vec![2, 3, 4, 5], vec![true]));
        assert_eq!(failover_frames(&mut rx_b), (vec![], vec![false]));

        // A consumer that does not change who is active hears at once that it is a standby.
        let (c, mut rx_c) = failover_consumer(3, "c");
        sub.add_consumer(SubType::Failover, c, 7_000).unwrap();
        assert_eq!(sub.next_due(), None);
        assert_eq!(failover_frames(&mut rx_c), (vec![], vec![false]));
    }

    #[test]
    fn failover_takeover_ends_early_when_either_side_leaves() {
        let mut read = |_| Some(entry(1));
        for leaving in [1, 2] {
            let mut sub = failover_sub();
            let (b, mut rx_b) = failover_consumer(2, "b");
            let (a, mut rx_a) = failover_consumer(1, "a");
            sub.add_consumer(SubType::Failover, b, 0).unwrap();
            sub.flow(key(2), 10);
            sub.dispatch(2, 1000, &mut read);
            sub.add_consumer(SubType::Failover, a, 1000).unwrap();
            sub.flow(key(1), 10);
            sub.remove_consumer(key(leaving), 1500);
            sub.dispatch(3, 1500, &mut read);
            let (to_a, _) = failover_frames(&mut rx_a);
            let (to_b, _) = failover_frames(&mut rx_b);
            if leaving == 1 {
                // The newcomer left: "b" never stopped being active.
                assert_eq!((to_a, to_b), (vec![], vec![0, 1, 2]));
            } else {
                // The previous one left: what it held goes to "a" at once.
                assert_eq!((to_a, to_b), (vec![0, 1, 2], vec![0, 1]));
            }
        }
    }

    #[test]
    fn failover_partitions_spread_over_consumers() {
        let mut read = |_| Some(entry(1));
        let mut active = Vec::new();
        for partition in 0..4 {
            let mut sub = Subscription::new("s".into(), true, SubType::Failover, Cursor::at(0))
                .with_failover(1000, FailoverSlot::Partition(partition));
            let (b, mut rx_b) = failover_consumer(2, "b");
            let (a, mut rx_a) = failover_consumer(1, "a");
            sub.add_consumer(SubType::Failover, b, 0).unwrap();
            sub.add_consumer(SubType::Failover, a, 10).unwrap();
            sub.flow(key(1), 10);
            sub.flow(key(2), 10);
            // Both joined within the first one's delay: one choice, one notice each.
            sub.dispatch(1, 1000, &mut read);
            let (to_a, heard_a) = failover_frames(&mut rx_a);
            let (to_b, heard_b) = failover_frames(&mut rx_b);
            assert_eq!(heard_a, vec![to_b.is_empty()]);
            assert_eq!(heard_b, vec![to_a.is_empty()]);
            active.push(if to_a.is_empty() { "b" } else { "a" });
        }
        assert_eq!(active, ["a", "b", "a", "b"]);
    }

    #[test]
    fn failover_topics_spread_over_consumers_whatever_the_join_order() {
        let active = |topic: &str, names: &[&str]| {
            let slot = FailoverSlot::of(&TopicName::parse(topic).unwrap());
            let mut sub = Subscription::new("s".into(), true, SubType::Failover, Cursor::at(0))
                .with_failover(0, slot);
            for (i, name) in names.iter().enumerate() {
                let (c, _rx) = failover_consumer(i as u64, name);
                sub.add_consumer(SubType::Failover, c, 0).unwrap();
            }
            let key = sub.active.unwrap();
            names[key.consumer_id as usize].to_string()
        };
        let mut chosen = HashSet::new();
        for t in 0..20 {
            let topic = format!("persistent://public/default/t{t}");
            let one = active(&topic, &["x", "y", "z"]);
            assert_eq!(one, active(&topic, &["z", "x", "y"]));
            chosen.insert(one);
        }
        assert_eq!(chosen.len(), 3, "20 topics spread over 3 consumers");
    }

    #[test]
    fn delayed_entries_wait_for_their_time_on_shared_only() {
        let delayed = |at: i64| {
            let metadata = pulsar::message::proto::MessageMetadata {
                deliver_at_time: Some(at),
                ..Default::default()
            };
            Arc::new(crate::entry::NewEntry::new(metadata, b"x").seal(0, 0).1)
        };
        for (kind, waits) in [(SubType::Shared, true), (SubType::Exclusive, false)] {
            let mut sub = Subscription::new("s".into(), true, kind, Cursor::at(0));
            let (tx, mut rx) = mpsc::channel(100);
            sub.add_consumer(kind, consumer(1, tx), 0).unwrap();
            sub.flow(key(1), 10);
            // Entry 0 is due at t=1000, entry 1 at once.
            let mut read = |id: u64| Some(if id == 0 { delayed(1000) } else { entry(1) });
            sub.dispatch(2, 500, &mut read);
            let first: Vec<u64> = ids(&mut rx).into_iter().map(|(id, _)| id).collect();
            if waits {
                assert_eq!(first, vec![1]);
                assert_eq!(sub.next_due(), Some(1000));
                sub.dispatch(2, 999, &mut read);
                assert!(ids(&mut rx).is_empty());
                sub.dispatch(2, 1000, &mut read);
                assert_eq!(ids(&mut rx), vec![(0, 0)]);
            } else {
                assert_eq!(first, vec![0, 1]);
            }
        }
    }

    #[test]
    fn batch_costs_its_size_and_full_queue_blocks() {
        let mut sub = Subscription::new("s".into(), true, SubType::Exclusive, Cursor::at(0));
        let (tx, mut rx) = mpsc::channel(1);
        sub.add_consumer(SubType::Exclusive, consumer(1, tx), 0)
            .unwrap();
        sub.flow(key(1), 5);
        let mut read = |_| Some(entry(10));
        assert_eq!(sub.dispatch(3, 0, &mut read), DispatchOutcome::Idle);
        assert_eq!(ids(&mut rx).len(), 1);
        sub.flow(key(1), 100);
        let mut read = |_| Some(entry(1));
        assert_eq!(sub.dispatch(3, 0, &mut read), DispatchOutcome::Blocked);
    }

    #[test]
    fn key_shared_holds_back_a_recently_joined_consumer_until_earlier_entries_are_acked() {
        let mut sub = Subscription::new("s".into(), true, SubType::KeyShared, Cursor::at(0));
        let (tx1, mut rx1) = mpsc::channel(1000);
        sub.add_consumer(SubType::KeyShared, consumer(1, tx1), 0)
            .unwrap();
        sub.flow(key(1), 1000);
        let keys: Vec<String> = (0..100).map(|i| format!("k{}", i % 10)).collect();
        let mut read = |id: u64| Some(keyed(&keys[id as usize]));
        sub.dispatch(10, 0, &mut read);
        assert_eq!(ids(&mut rx1).len(), 10, "every key on the only consumer");
        // Consumer 2 joins with entries 0..10 unacknowledged: the keys it takes over get no
        // newer entry there until those are acknowledged.
        let (tx2, mut rx2) = mpsc::channel(1000);
        sub.add_consumer(SubType::KeyShared, consumer(2, tx2), 0)
            .unwrap();
        sub.flow(key(2), 1000);
        sub.dispatch(100, 0, &mut read);
        let first: Vec<u64> = ids(&mut rx1).into_iter().map(|(id, _)| id).collect();
        assert!(ids(&mut rx2).is_empty(), "held back");
        assert!(
            first.iter().all(|id| *id >= 10),
            "only consumer 1's newer entries"
        );
        let mut acked: Vec<u64> = (0..10).collect();
        acked.extend(&first);
        sub.ack(&acked, false);
        sub.dispatch(100, 0, &mut read);
        let (a, b): (Vec<_>, Vec<_>) = (ids(&mut rx1), ids(&mut rx2));
        assert!(
            !b.is_empty(),
            "consumer 2 gets its keys once the earlier entries are acked"
        );
        let total = first.len() + a.len() + b.len();
        assert_eq!(total, 90, "every later entry delivered once");
    }

    fn sticky(id: u64, tx: mpsc::Sender<Frame>, ranges: &[(u32, u32)]) -> Consumer {
        let mut c = consumer(id, tx);
        c.hash_ranges = ranges.to_vec();
        c
    }

    #[test]
    fn sticky_hash_is_pulsars_murmur3() {
        // Murmur3-32 (seed 0) of "hello" is 0x248bfa47.
        assert_eq!(sticky_hash(b"hello"), 0xfa47);
        assert_eq!(sticky_hash(b""), sticky_hash(b"NONE_KEY"));
    }

    #[test]
    fn key_shared_sticky_ranges_route_by_hash_and_must_not_overlap() {
        let mut sub = Subscription::new("s".into(), true, SubType::KeyShared, Cursor::at(0));
        let (tx1, mut rx1) = mpsc::channel(1000);
        let (tx2, mut rx2) = mpsc::channel(1000);
        sub.add_consumer(SubType::KeyShared, sticky(1, tx1, &[(0, 32767)]), 0)
            .unwrap();
        let (tx, _rx) = mpsc::channel(1);
        let overlap = sub.add_consumer(
            SubType::KeyShared,
            sticky(9, tx.clone(), &[(30000, 40000)]),
            0,
        );
        assert_eq!(overlap.unwrap_err().0, ServerError::ConsumerAssignError);
        let auto = sub.add_consumer(SubType::KeyShared, consumer(9, tx.clone()), 0);
        assert_eq!(auto.unwrap_err().0, ServerError::ConsumerAssignError);
        let outside = sub.add_consumer(SubType::KeyShared, sticky(9, tx, &[(40000, 70000)]), 0);
        assert_eq!(outside.unwrap_err().0, ServerError::ConsumerAssignError);
        sub.add_consumer(SubType::KeyShared, sticky(2, tx2, &[(32768, 65535)]), 0)
            .unwrap();
        sub.flow(key(1), 1000);
        sub.flow(key(2), 1000);
        let keys: Vec<String> = (0..200).map(|i| format!("k{}", i % 40)).collect();
        let mut read = |id: u64| Some(keyed(&keys[id as usize]));
        sub.dispatch(200, 0, &mut read);
        let (a, b) = (ids(&mut rx1), ids(&mut rx2));
        assert_eq!(a.len() + b.len(), 200);
        assert!(!a.is_empty() && !b.is_empty());
        for (id, _) in a {
            assert!(sticky_hash(keys[id as usize].as_bytes()) < 32768);
        }
        for (id, _) in b {
            assert!(sticky_hash(keys[id as usize].as_bytes()) >= 32768);
        }
    }

    /// A Key_Shared subscription with consumers 1 and 2 (no permits yet), and their queues.
    fn key_shared_pair() -> (Subscription, mpsc::Receiver<Frame>, mpsc::Receiver<Frame>) {
        let mut sub = Subscription::new("s".into(), true, SubType::KeyShared, Cursor::at(0));
        let (tx1, rx1) = mpsc::channel(1000);
        let (tx2, rx2) = mpsc::channel(1000);
        sub.add_consumer(SubType::KeyShared, consumer(1, tx1), 0)
            .unwrap();
        sub.add_consumer(SubType::KeyShared, consumer(2, tx2), 0)
            .unwrap();
        (sub, rx1, rx2)
    }

    #[test]
    fn key_shared_consumer_without_permits_does_not_stall_the_other_keys() {
        let (mut sub, mut rx1, mut rx2) = key_shared_pair();
        sub.flow(key(1), 3);
        sub.flow(key(2), 1000);
        let keys: Vec<String> = (0..100).map(|i| format!("k{}", i % 10)).collect();
        let mut read = |id: u64| Some(keyed(&keys[id as usize]));
        sub.dispatch(100, 0, &mut read);
        let owner = |id: u64, sub: &Subscription| {
            let hash = key_hash(&keyed(&keys[id as usize]));
            sub.target(hash).map(|i| sub.consumers[i].key)
        };
        let slow: Vec<u64> = (0..100)
            .filter(|id| owner(*id, &sub) == Some(key(1)))
            .collect();
        let fast = 100 - slow.len();
        assert!(!slow.is_empty() && fast > 0);
        let got2: Vec<u64> = ids(&mut rx2).into_iter().map(|(id, _)| id).collect();
        assert_eq!(got2.len(), fast, "every entry of the other consumer's keys");
        let mut got1: Vec<u64> = ids(&mut rx1).into_iter().map(|(id, _)| id).collect();
        assert_eq!(got1, slow[..3].to_vec(), "the slow consumer's first three");
        // More permits: the rest follows, in log order.
        sub.flow(key(1), 1000);
        sub.dispatch(100, 0, &mut read);
        got1.extend(ids(&mut rx1).into_iter().map(|(id, _)| id));
        assert_eq!(got1, slow);
    }

    #[test]
    fn key_shared_reads_passed_over_entries_once_and_sends_them_in_order_later() {
        let (mut sub, mut rx1, mut rx2) = key_shared_pair();
        sub.flow(key(2), 1000);
        let keys: Vec<String> = (0..200).map(|i| format!("k{}", i % 10)).collect();
        let reads = std::cell::Cell::new(0);
        let mut read = |id: u64| {
            reads.set(reads.get() + 1);
            Some(keyed(&keys[id as usize]))
        };
        sub.dispatch(100, 0, &mut read);
        assert_eq!(reads.get(), 100);
        let fast = ids(&mut rx2).len();
        // New entries: only they are read (passed-over ones are judged by their key hash).
        sub.dispatch(110, 0, &mut read);
        assert_eq!(reads.get(), 110);
        let fast = fast + ids(&mut rx2).len();
        assert!(ids(&mut rx1).is_empty());
        // Permits for the consumer that had none: its entries go, in order.
        sub.flow(key(1), 1000);
        sub.dispatch(110, 0, &mut read);
        let slow: Vec<u64> = ids(&mut rx1).into_iter().map(|(id, _)| id).collect();
        assert_eq!(slow.len() + fast, 110);
        assert!(slow.windows(2).all(|w| w[0] < w[1]));
    }
}
