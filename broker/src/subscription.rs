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
//!   consumers with permits; Failover and Key_Shared are served by a single active consumer
//!   (the first attached), which keeps their ordering promises without splitting keys.
//! - Hand-off to a connection uses `try_send` on its bounded queue: a slow connection makes
//!   the dispatcher pause (the caller retries), it never blocks the topic.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use pulsar::message::proto::{
    base_command::Type, command_subscribe::SubType, CommandMessage, MessageMetadata, ServerError,
};
use pulsar::message::{Message, Payload};
use tokio::sync::mpsc;

use crate::cursor::Cursor;
use crate::protocol::{self, message_id};

/// Most entries a subscription keeps queued for redelivery with their counts (bounded by the
/// log anyway; this bounds the count map).
const MAX_TRACKED_REDELIVERIES: usize = 1_000_000;

/// A stored entry ready to be sent: decoded metadata and the payload as the producer sent it.
#[derive(Debug)]
pub struct StoredEntry {
    pub metadata: MessageMetadata,
    pub data: Vec<u8>,
}

impl StoredEntry {
    /// Messages in this entry (a batch counts each message).
    pub fn num_messages(&self) -> i64 {
        i64::from(self.metadata.num_messages_in_batch.unwrap_or(1).max(1))
    }
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
    pub tx: mpsc::Sender<Message>,
    permits: i64,
    unacked: BTreeSet<u64>,
}

impl Consumer {
    pub fn new(key: ConsumerKey, tx: mpsc::Sender<Message>) -> Consumer {
        Consumer {
            key,
            tx,
            permits: 0,
            unacked: BTreeSet::new(),
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
    redelivery_counts: HashMap<u64, u32>,
    consumers: Vec<Consumer>,
    next_consumer: usize,
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
            redelivery_counts: HashMap::new(),
            consumers: Vec::new(),
            next_consumer: 0,
        }
    }

    pub fn has_consumers(&self) -> bool {
        !self.consumers.is_empty()
    }

    /// Attaches a consumer, enforcing the subscription type.
    pub fn add_consumer(
        &mut self,
        sub_type: SubType,
        consumer: Consumer,
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
        self.sub_type = sub_type;
        self.consumers.push(consumer);
        Ok(())
    }

    /// Detaches a consumer; its unacknowledged entries return for redelivery.
    pub fn remove_consumer(&mut self, key: ConsumerKey) -> bool {
        let Some(pos) = self.consumers.iter().position(|c| c.key == key) else {
            return false;
        };
        let consumer = self.consumers.remove(pos);
        for id in consumer.unacked {
            self.requeue(id);
        }
        true
    }

    fn requeue(&mut self, id: u64) {
        if self.cursor.is_acked(id) {
            return;
        }
        if self.redelivery_counts.len() < MAX_TRACKED_REDELIVERIES {
            *self.redelivery_counts.entry(id).or_insert(0) += 1;
        }
        self.redeliver.insert(id);
    }

    /// `CommandFlow`: adds permits.
    pub fn flow(&mut self, key: ConsumerKey, permits: u32) {
        if let Some(c) = self.consumers.iter_mut().find(|c| c.key == key) {
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
                self.redelivery_counts.retain(|k, _| *k > id);
            } else {
                changed |= self.cursor.ack(id);
                for c in &mut self.consumers {
                    c.unacked.remove(&id);
                }
                self.redeliver.remove(&id);
                self.redelivery_counts.remove(&id);
            }
        }
        self.dirty |= changed && self.durable;
        changed
    }

    /// `CommandRedeliverUnacknowledgedMessages`: all of the consumer's unacked entries, or
    /// just `ids`.
    pub fn redeliver(&mut self, key: ConsumerKey, ids: Option<&[u64]>) {
        let Some(c) = self.consumers.iter_mut().find(|c| c.key == key) else {
            return;
        };
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

    /// Sends as many entries as permits allow. `end` is the log's next entry id; `read`
    /// fetches an entry (`None` if it cannot be read, which pauses this subscription).
    pub fn dispatch(
        &mut self,
        end: u64,
        read: &mut dyn FnMut(u64) -> Option<Arc<StoredEntry>>,
    ) -> DispatchOutcome {
        loop {
            // Next entry: redeliveries first, then the unread tail; skip acknowledged ones.
            let (id, from_redeliver) = if let Some(&id) = self.redeliver.first() {
                (id, true)
            } else if self.read_position < end {
                (self.read_position, false)
            } else {
                return DispatchOutcome::Idle;
            };
            if self.cursor.is_acked(id) {
                self.advance(id, from_redeliver);
                continue;
            }
            let Some(index) = self.pick_consumer() else {
                return DispatchOutcome::Idle;
            };
            let Some(entry) = read(id) else {
                return DispatchOutcome::Idle;
            };
            let Some(consumer) = self.consumers.get_mut(index) else {
                return DispatchOutcome::Idle;
            };
            let redelivery_count = self.redelivery_counts.get(&id).copied().unwrap_or(0);
            let frame = message_frame(consumer.key.consumer_id, id, redelivery_count, &entry);
            match consumer.tx.try_send(frame) {
                Ok(()) => {
                    consumer.permits -= entry.num_messages();
                    consumer.unacked.insert(id);
                    self.advance(id, from_redeliver);
                    self.next_consumer = index + 1;
                }
                Err(mpsc::error::TrySendError::Full(_)) => return DispatchOutcome::Blocked,
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    let key = consumer.key;
                    self.remove_consumer(key);
                }
            }
        }
    }

    fn advance(&mut self, id: u64, from_redeliver: bool) {
        if from_redeliver {
            self.redeliver.remove(&id);
        } else {
            self.read_position = id + 1;
        }
    }

    fn pick_consumer(&self) -> Option<usize> {
        match self.sub_type {
            SubType::Shared => {
                let n = self.consumers.len();
                (0..n)
                    .map(|i| (self.next_consumer + i) % n)
                    .find(|&i| self.consumers.get(i).is_some_and(|c| c.permits > 0))
            }
            // Exclusive, Failover, Key_Shared: the first consumer is the active one.
            _ => self.consumers.first().filter(|c| c.permits > 0).map(|_| 0),
        }
    }

    /// Entries dispatched but not yet acknowledged, over all consumers.
    #[cfg(test)]
    fn unacked_count(&self) -> usize {
        self.consumers.iter().map(|c| c.unacked.len()).sum()
    }
}

/// `CommandMessage` carrying a stored entry (metadata and payload unchanged).
pub fn message_frame(
    consumer_id: u64,
    id: u64,
    redelivery_count: u32,
    entry: &StoredEntry,
) -> Message {
    let mut frame = protocol::command(Type::Message, |c| {
        c.message = Some(CommandMessage {
            consumer_id,
            message_id: message_id(id),
            redelivery_count: Some(redelivery_count),
            ack_set: Vec::new(),
            consumer_epoch: None,
        })
    });
    frame.payload = Some(Payload {
        metadata: entry.metadata.clone(),
        data: entry.data.clone(),
    });
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(batch: i32) -> Arc<StoredEntry> {
        Arc::new(StoredEntry {
            metadata: MessageMetadata {
                num_messages_in_batch: Some(batch),
                ..Default::default()
            },
            data: b"x".to_vec(),
        })
    }

    fn key(id: u64) -> ConsumerKey {
        ConsumerKey {
            connection: 1,
            consumer_id: id,
        }
    }

    fn ids(rx: &mut mpsc::Receiver<Message>) -> Vec<(u64, u32)> {
        let mut out = Vec::new();
        while let Ok(m) = rx.try_recv() {
            let msg = m.command.message.unwrap();
            out.push((msg.message_id.entry_id, msg.redelivery_count.unwrap()));
        }
        out
    }

    #[test]
    fn permits_are_respected_and_order_kept() {
        let mut sub = Subscription::new("s".into(), true, SubType::Exclusive, Cursor::at(0));
        let (tx, mut rx) = mpsc::channel(100);
        sub.add_consumer(SubType::Exclusive, Consumer::new(key(1), tx))
            .unwrap();
        let mut read = |_| Some(entry(1));
        assert_eq!(sub.dispatch(10, &mut read), DispatchOutcome::Idle);
        assert!(ids(&mut rx).is_empty());
        sub.flow(key(1), 3);
        sub.dispatch(10, &mut read);
        assert_eq!(ids(&mut rx), vec![(0, 0), (1, 0), (2, 0)]);
        let (tx2, _rx2) = mpsc::channel(1);
        assert!(sub
            .add_consumer(SubType::Exclusive, Consumer::new(key(2), tx2))
            .is_err());
    }

    #[test]
    fn shared_round_robin_and_close_requeues_with_count() {
        let mut sub = Subscription::new("s".into(), true, SubType::Shared, Cursor::at(0));
        let (tx1, mut rx1) = mpsc::channel(100);
        let (tx2, mut rx2) = mpsc::channel(100);
        sub.add_consumer(SubType::Shared, Consumer::new(key(1), tx1))
            .unwrap();
        sub.add_consumer(SubType::Shared, Consumer::new(key(2), tx2))
            .unwrap();
        sub.flow(key(1), 10);
        sub.flow(key(2), 10);
        let mut read = |_| Some(entry(1));
        sub.dispatch(4, &mut read);
        let a = ids(&mut rx1);
        let b = ids(&mut rx2);
        assert_eq!(a.len(), 2);
        assert_eq!(b.len(), 2);
        sub.ack(&[a[0].0], false);
        sub.remove_consumer(key(1));
        assert_eq!(sub.unacked_count(), 2);
        sub.dispatch(4, &mut read);
        assert_eq!(ids(&mut rx2), vec![(a[1].0, 1)]);
    }

    #[test]
    fn batch_costs_its_size_and_full_queue_blocks() {
        let mut sub = Subscription::new("s".into(), true, SubType::Exclusive, Cursor::at(0));
        let (tx, mut rx) = mpsc::channel(1);
        sub.add_consumer(SubType::Exclusive, Consumer::new(key(1), tx))
            .unwrap();
        sub.flow(key(1), 5);
        let mut read = |_| Some(entry(10));
        assert_eq!(sub.dispatch(3, &mut read), DispatchOutcome::Idle);
        assert_eq!(ids(&mut rx).len(), 1);
        sub.flow(key(1), 100);
        let mut read = |_| Some(entry(1));
        assert_eq!(sub.dispatch(3, &mut read), DispatchOutcome::Blocked);
    }
}
