//! [`AckTracker`]: what a subscription has delivered and not yet had acknowledged, and which
//! acknowledgements to send the backend for the plugin's acks — apart from the task that
//! talks to the backend (`subscription_task`).
//!
//! Guarantees: a message is acknowledged to the backend only once the plugin acked it, and a
//! batch entry only once the plugin acked all its messages (until then it is held, so that a
//! connection that ends part-way gets the rest again: never fewer). On an Exclusive or
//! Failover subscription (one active consumer reading in order) the complete entries below
//! every entry still unacknowledged go as one cumulative ack; the others as individual acks,
//! grouped per topic.

use std::collections::{BTreeMap, HashMap};

use pulsar::proto::MessageIdData;

/// An entry of a topic: where a batch's messages are acknowledged together.
type EntryKey = (String, u64, u64, i32);

fn entry_key(topic: &str, id: &MessageIdData) -> EntryKey {
    (
        topic.to_string(),
        id.ledger_id,
        id.entry_id,
        id.partition.unwrap_or(-1),
    )
}

/// The id of a whole entry (no batch index): acknowledging it acknowledges all its messages.
fn entry_id(id: &MessageIdData) -> MessageIdData {
    MessageIdData {
        ledger_id: id.ledger_id,
        entry_id: id.entry_id,
        partition: id.partition,
        ..Default::default()
    }
}

/// Where an entry sits in its topic's log.
fn position(id: &MessageIdData) -> (u64, u64) {
    (id.ledger_id, id.entry_id)
}

/// The acknowledgements to send the backend for a run of the plugin's acks.
#[derive(Debug, Default, PartialEq)]
pub(super) struct AckPlan {
    /// One cumulative ack, at the highest complete entry below every unacknowledged one.
    pub(super) cumulative: Option<(String, MessageIdData)>,
    /// Individual acks of whole entries, per topic.
    pub(super) individual: BTreeMap<String, Vec<MessageIdData>>,
}

#[cfg(test)]
impl AckPlan {
    fn is_empty(&self) -> bool {
        self.cumulative.is_none() && self.individual.is_empty()
    }
}

/// The deliveries of one subscription and their acknowledgement.
pub(super) struct AckTracker {
    /// Unacknowledged deliveries by delivery id (= arrival order).
    outstanding: BTreeMap<u64, (String, MessageIdData)>,
    /// Acknowledged by the plugin, not yet planned.
    acked: Vec<(String, MessageIdData)>,
    /// Batch entries some but not all of whose messages are acknowledged: (size, acked).
    partial: HashMap<EntryKey, (i32, i32)>,
    /// Acknowledge cumulatively where possible (Exclusive and Failover subscriptions).
    cumulative: bool,
    /// Whether every entry so far arrived after the ones before it: then the oldest
    /// unacknowledged entry is the first outstanding delivery.
    in_order: bool,
    last_entry: Option<(u64, u64)>,
    next_delivery: u64,
}

impl AckTracker {
    pub(super) fn new(cumulative: bool) -> AckTracker {
        AckTracker {
            outstanding: BTreeMap::new(),
            acked: Vec::new(),
            partial: HashMap::new(),
            cumulative,
            in_order: true,
            last_entry: None,
            next_delivery: 1,
        }
    }

    /// Deliveries the plugin has not acknowledged.
    pub(super) fn unacked(&self) -> usize {
        self.outstanding.len()
    }

    /// Records a message handed to the plugin; returns its delivery id.
    pub(super) fn delivered(&mut self, topic: String, id: MessageIdData) -> u64 {
        let delivery = self.next_delivery;
        self.next_delivery += 1;
        let entry = position(&id);
        self.in_order &= self.last_entry.is_none_or(|last| last <= entry);
        self.last_entry = Some(entry);
        self.outstanding.insert(delivery, (topic, id));
        delivery
    }

    /// The plugin acknowledged a delivery (an unknown or repeated id is ignored).
    pub(super) fn ack(&mut self, delivery: u64) {
        self.acked.extend(self.outstanding.remove(&delivery));
    }

    /// The plugin gave a delivery back (a negative ack): it is no longer outstanding, and
    /// its entry, which the backend redelivers whole, counts its batch's acks from zero
    /// again. Returns the entry to redeliver (`None`: an unknown or repeated id).
    pub(super) fn nack(&mut self, delivery: u64) -> Option<(String, MessageIdData)> {
        let (topic, id) = self.outstanding.remove(&delivery)?;
        self.partial.remove(&entry_key(&topic, &id));
        Some((topic, entry_id(&id)))
    }

    /// Forgets every delivery (the consumer was moved: a seek). Acks of them are ignored
    /// from now on; delivery ids go on from where they were, so none is used twice.
    pub(super) fn reset(&mut self) {
        self.outstanding.clear();
        self.acked.clear();
        self.partial.clear();
        self.in_order = true;
        self.last_entry = None;
    }

    /// The backend acknowledgements the acks so far call for; they are forgotten here.
    pub(super) fn plan(&mut self) -> AckPlan {
        let mut complete: Vec<(String, MessageIdData)> = Vec::new();
        for (topic, id) in self.acked.drain(..) {
            match (id.batch_index, id.batch_size) {
                (Some(_), Some(size)) if size > 1 => {
                    let key = entry_key(&topic, &id);
                    let done = {
                        let counted = self.partial.entry(key.clone()).or_insert((size, 0));
                        counted.1 += 1;
                        counted.1 >= counted.0
                    };
                    if done {
                        self.partial.remove(&key);
                        complete.push((topic, entry_id(&id)));
                    }
                }
                _ => complete.push((topic, entry_id(&id))),
            }
        }
        let mut plan = AckPlan::default();
        if self.cumulative {
            // The oldest unacknowledged entry is the floor for the cumulative ack (a partly
            // acknowledged batch still has its other messages among the outstanding). While
            // entries arrived in log order, that is the first delivery (the map is in
            // delivery order); after a redelivery out of order, all of them are looked at.
            let floor = if self.in_order {
                self.outstanding.values().next().map(|(_, id)| position(id))
            } else {
                self.outstanding.values().map(|(_, id)| position(id)).min()
            };
            let mut rest = Vec::new();
            for (topic, id) in complete.drain(..) {
                if floor.is_none_or(|f| position(&id) < f) {
                    let higher = plan
                        .cumulative
                        .as_ref()
                        .is_none_or(|(_, u)| position(u) < position(&id));
                    if higher {
                        plan.cumulative = Some((topic, id));
                    }
                } else {
                    rest.push((topic, id));
                }
            }
            complete = rest;
        }
        for (topic, id) in complete {
            plan.individual.entry(topic).or_default().push(id);
        }
        plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(entry: u64) -> MessageIdData {
        MessageIdData {
            ledger_id: 7,
            entry_id: entry,
            ..Default::default()
        }
    }

    fn batched(entry: u64, index: i32, size: i32) -> MessageIdData {
        MessageIdData {
            batch_index: Some(index),
            batch_size: Some(size),
            ..id(entry)
        }
    }

    fn individual(entries: &[(&str, u64)]) -> BTreeMap<String, Vec<MessageIdData>> {
        let mut map: BTreeMap<String, Vec<MessageIdData>> = BTreeMap::new();
        for (topic, e) in entries {
            map.entry(topic.to_string()).or_default().push(id(*e));
        }
        map
    }

    #[test]
    fn a_nack_frees_the_window_and_restarts_its_batch_count() {
        let mut t = AckTracker::new(false);
        let a = t.delivered("t".into(), batched(5, 0, 2));
        let b = t.delivered("t".into(), batched(5, 1, 2));
        t.ack(a);
        assert!(t.plan().is_empty());
        assert_eq!(t.nack(b), Some(("t".to_string(), id(5))));
        assert_eq!(t.nack(b), None);
        assert_eq!(t.unacked(), 0);
        // The entry comes back whole: both its messages must be acked again.
        let a2 = t.delivered("t".into(), batched(5, 0, 2));
        let b2 = t.delivered("t".into(), batched(5, 1, 2));
        t.ack(a2);
        assert!(t.plan().is_empty());
        t.ack(b2);
        assert_eq!(t.plan().individual, individual(&[("t", 5)]));
        t.reset();
        let c = t.delivered("t".into(), id(6));
        assert!(c > b2, "delivery ids are never reused");
    }

    #[test]
    fn shared_subscriptions_ack_each_entry_per_topic() {
        let mut t = AckTracker::new(false);
        let a = t.delivered("t1".into(), id(1));
        let _b = t.delivered("t1".into(), id(2));
        let c = t.delivered("t2".into(), id(3));
        assert_eq!(t.unacked(), 3);
        t.ack(a);
        t.ack(c);
        assert_eq!(t.unacked(), 1);
        let plan = t.plan();
        assert_eq!(plan.cumulative, None);
        assert_eq!(plan.individual, individual(&[("t1", 1), ("t2", 3)]));
        assert!(t.plan().is_empty(), "acks are planned once");
    }

    #[test]
    fn unknown_and_repeated_acks_are_ignored() {
        let mut t = AckTracker::new(false);
        let a = t.delivered("t".into(), id(1));
        t.ack(a);
        t.ack(a);
        t.ack(99);
        assert_eq!(t.plan().individual, individual(&[("t", 1)]));
    }

    #[test]
    fn a_batch_entry_is_acked_once_all_its_messages_are() {
        let mut t = AckTracker::new(false);
        let ids: Vec<u64> = (0..3)
            .map(|i| t.delivered("t".into(), batched(4, i, 3)))
            .collect();
        t.ack(ids[0]);
        t.ack(ids[2]);
        assert!(t.plan().is_empty(), "a partly acknowledged batch was acked");
        t.ack(ids[1]);
        // The whole entry, without its batch index.
        assert_eq!(t.plan().individual, individual(&[("t", 4)]));
    }

    #[test]
    fn in_order_acks_below_the_oldest_unacked_go_as_one_cumulative_ack() {
        let mut t = AckTracker::new(true);
        let d: Vec<u64> = (1..=4).map(|e| t.delivered("t".into(), id(e))).collect();
        t.ack(d[0]);
        t.ack(d[1]);
        t.ack(d[3]);
        let plan = t.plan();
        assert_eq!(plan.cumulative, Some(("t".into(), id(2))));
        // Entry 4 is above the unacknowledged entry 3: acked on its own.
        assert_eq!(plan.individual, individual(&[("t", 4)]));
        t.ack(d[2]);
        let plan = t.plan();
        assert_eq!(plan.cumulative, Some(("t".into(), id(3))));
        assert!(plan.individual.is_empty());
    }

    #[test]
    fn a_partly_acked_batch_holds_the_cumulative_floor() {
        let mut t = AckTracker::new(true);
        let first = t.delivered("t".into(), id(1));
        let b0 = t.delivered("t".into(), batched(2, 0, 2));
        let _b1 = t.delivered("t".into(), batched(2, 1, 2));
        let last = t.delivered("t".into(), id(3));
        t.ack(first);
        t.ack(b0);
        t.ack(last);
        let plan = t.plan();
        assert_eq!(plan.cumulative, Some(("t".into(), id(1))));
        assert_eq!(plan.individual, individual(&[("t", 3)]));
    }

    #[test]
    fn after_a_redelivery_out_of_order_the_floor_is_the_oldest_entry() {
        let mut t = AckTracker::new(true);
        let five = t.delivered("t".into(), id(5));
        let _three = t.delivered("t".into(), id(3));
        let six = t.delivered("t".into(), id(6));
        t.ack(five);
        t.ack(six);
        // Entry 3 is still unacknowledged: nothing above it may be acked cumulatively.
        let plan = t.plan();
        assert_eq!(plan.cumulative, None);
        assert_eq!(plan.individual, individual(&[("t", 5), ("t", 6)]));
    }
}
