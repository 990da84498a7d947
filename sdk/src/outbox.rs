//! The outbox: where a machine queues its actions, with sends coalesced and acks gathered.
//!
//! Crossing the Wasm boundary costs about a microsecond per host call, so a batch of
//! deliveries should leave as one `send` and one `ack-many`, not one of each per message.
//! [`Outbox`] does that without the machine thinking about it:
//!
//! - **Coalesced sends.** Bytes sent one after another join the last [`Action::Send`] while
//!   it is shorter than the outbox's coalescing limit; a packet is encoded straight into that
//!   buffer ([`Outbox::send_with`]), and one bigger than the peer's maximum packet size is
//!   dropped instead (the caller learns it and decides, e.g. MQTT 5.0 §3.1.2.11.4).
//! - **Gathered acks.** Acks wait, gathered per subscription in the order the subscriptions
//!   were first acked, until an action that is neither a send nor an ack is queued, or the
//!   actions are taken; then they become one [`Action::Ack`] (one delivery) or
//!   [`Action::AckMany`] per subscription. Sends and acks commute (an ack a moment after
//!   its send changes nothing a client can see), but an ack never moves past any other
//!   action: an ack queued before an unsubscribe reaches the host before it.
//!
//! Guarantees: the order of every action other than acks is the order they were queued in;
//! sends keep their byte order; no `Send` exceeds the limit by more than one packet.

use crate::machine::Action;
use crate::SubId;

/// Default coalescing limit of [`Outbox::new`]: 64 KiB per `Send`.
pub const DEFAULT_COALESCE: usize = 64 * 1024;

/// Actions queued by a machine: see the module docs.
///
/// ```
/// use magnetar_sdk::machine::Action;
/// use magnetar_sdk::outbox::Outbox;
///
/// let mut out = Outbox::new();
/// out.send(b"one".to_vec());
/// out.ack(9, 1);
/// out.send(b"two".to_vec());
/// out.ack(9, 2);
/// let actions = out.take();
/// assert!(matches!(&actions[..], [
///     Action::Send(bytes),
///     Action::AckMany { sub: 9, delivery_ids },
/// ] if bytes == b"onetwo" && delivery_ids == &[1, 2]));
/// ```
#[derive(Debug, Clone)]
pub struct Outbox {
    actions: Vec<Action>,
    /// Acks not yet placed among the actions, per subscription.
    acks: Vec<(SubId, Vec<u64>)>,
    coalesce: usize,
}

impl Default for Outbox {
    fn default() -> Self {
        Self::new()
    }
}

impl Outbox {
    /// An empty outbox that joins sends up to [`DEFAULT_COALESCE`] bytes.
    pub fn new() -> Self {
        Self::with_coalesce_limit(DEFAULT_COALESCE)
    }

    /// An empty outbox that starts a new `Send` once the last one holds `limit` bytes
    /// (0: every send is its own).
    ///
    /// ```
    /// let mut out = magnetar_sdk::outbox::Outbox::with_coalesce_limit(4);
    /// out.send(b"abc".to_vec());
    /// out.send(b"de".to_vec()); // joins: the last Send had 3 < 4 bytes
    /// out.send(b"f".to_vec()); // a new Send: the last one has 5 bytes
    /// assert_eq!(out.take().len(), 2);
    /// ```
    pub fn with_coalesce_limit(limit: usize) -> Self {
        Outbox {
            actions: Vec::new(),
            acks: Vec::new(),
            coalesce: limit,
        }
    }

    /// Queues any action; sends and acks are coalesced and gathered as
    /// [`Outbox::send`] and [`Outbox::ack`] do.
    ///
    /// ```
    /// use magnetar_sdk::machine::Action;
    /// let mut out = magnetar_sdk::outbox::Outbox::new();
    /// out.push(Action::Ack { sub: 1, delivery_id: 5 });
    /// out.push(Action::Unsubscribe { sub: 1, delete: false });
    /// assert!(matches!(&out.take()[..], [
    ///     Action::Ack { sub: 1, delivery_id: 5 },
    ///     Action::Unsubscribe { .. },
    /// ]));
    /// ```
    pub fn push(&mut self, action: Action) {
        match action {
            Action::Send(bytes) => self.send(bytes),
            Action::Ack { sub, delivery_id } => self.ack(sub, delivery_id),
            Action::AckMany { sub, delivery_ids } => {
                for id in delivery_ids {
                    self.ack(sub, id);
                }
            }
            other => {
                self.place_acks();
                self.actions.push(other);
            }
        }
    }

    /// Queues bytes for the client, joined to the last `Send` while it is under the limit.
    /// An empty send queues nothing.
    pub fn send(&mut self, bytes: Vec<u8>) {
        if bytes.is_empty() {
            return;
        }
        match self.open_send() {
            Some(out) => out.extend_from_slice(&bytes),
            None => self.actions.push(Action::Send(bytes)),
        }
    }

    /// Queues the packet `encode` writes, unless it is longer than `max` bytes: then nothing
    /// is queued and the answer is `false`. The packet is encoded straight into the last
    /// `Send` when it is under the limit, so a batch costs no copy.
    ///
    /// ```
    /// let mut out = magnetar_sdk::outbox::Outbox::new();
    /// assert!(out.send_with(4, |b| b.extend_from_slice(b"fits")));
    /// assert!(!out.send_with(4, |b| b.extend_from_slice(b"too long")));
    /// assert!(matches!(&out.take()[..], [magnetar_sdk::machine::Action::Send(b)] if b == b"fits"));
    /// ```
    pub fn send_with(&mut self, max: usize, encode: impl FnOnce(&mut Vec<u8>)) -> bool {
        if let Some(out) = self.open_send() {
            let start = out.len();
            encode(out);
            if out.len() - start > max {
                out.truncate(start);
                return false;
            }
            return true;
        }
        let mut out = Vec::new();
        encode(&mut out);
        if out.len() > max {
            return false;
        }
        if !out.is_empty() {
            self.actions.push(Action::Send(out));
        }
        true
    }

    /// Acknowledges a delivery; gathered with the other acks of `sub` (see the module docs).
    pub fn ack(&mut self, sub: SubId, delivery_id: u64) {
        match self.acks.iter_mut().find(|(s, _)| *s == sub) {
            Some((_, ids)) => ids.push(delivery_id),
            None => self.acks.push((sub, vec![delivery_id])),
        }
    }

    /// The actions queued so far, oldest first, acks placed; the outbox is empty after.
    pub fn take(&mut self) -> Vec<Action> {
        self.place_acks();
        std::mem::take(&mut self.actions)
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.actions.is_empty() && self.acks.is_empty()
    }

    /// The actions queued so far, without the acks still being gathered.
    pub fn actions(&self) -> &[Action] {
        &self.actions
    }

    /// The last `Send`, if bytes may still join it: it is the last action and under the
    /// limit. Gathered acks do not count, they are placed after it.
    fn open_send(&mut self) -> Option<&mut Vec<u8>> {
        match self.actions.last_mut() {
            Some(Action::Send(out)) if out.len() < self.coalesce => Some(out),
            _ => None,
        }
    }

    /// Turns the gathered acks into actions, one per subscription.
    fn place_acks(&mut self) {
        // Taken, not drained: an idle connection keeps no allocation for acks.
        for (sub, ids) in std::mem::take(&mut self.acks) {
            let action = match ids.as_slice() {
                [one] => Action::Ack {
                    sub,
                    delivery_id: *one,
                },
                _ => Action::AckMany {
                    sub,
                    delivery_ids: ids,
                },
            };
            self.actions.push(action);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A compact picture of actions: `S<bytes>`, `A<sub>:<ids>`, `U<sub>`, `T<token>`.
    fn picture(actions: &[Action]) -> Vec<String> {
        actions
            .iter()
            .map(|a| match a {
                Action::Send(b) => format!("S{}", String::from_utf8_lossy(b)),
                Action::Ack { sub, delivery_id } => format!("A{sub}:{delivery_id}"),
                Action::AckMany { sub, delivery_ids } => format!("A{sub}:{delivery_ids:?}"),
                Action::Unsubscribe { sub, .. } => format!("U{sub}"),
                Action::SetTimer { token, .. } => format!("T{token}"),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn sends_join_until_the_limit_then_start_anew() {
        let mut out = Outbox::with_coalesce_limit(4);
        out.send(b"ab".to_vec());
        out.send(b"cd".to_vec()); // 2 < 4: joins
        out.send(b"ef".to_vec()); // 4, not < 4: new
        out.send(b"g".to_vec());
        assert_eq!(picture(&out.take()), ["Sabcd", "Sefg"]);
        assert!(out.is_empty());
    }

    #[test]
    fn a_limit_of_zero_keeps_every_send_apart() {
        let mut out = Outbox::with_coalesce_limit(0);
        out.send(b"a".to_vec());
        out.send(b"b".to_vec());
        assert_eq!(picture(&out.take()), ["Sa", "Sb"]);
    }

    #[test]
    fn an_oversize_packet_is_dropped_and_reported() {
        let mut out = Outbox::new();
        assert!(out.send_with(3, |b| b.extend_from_slice(b"abc")));
        // Into the open Send: rolled back.
        assert!(!out.send_with(3, |b| b.extend_from_slice(b"defg")));
        assert!(out.send_with(3, |b| b.extend_from_slice(b"hij")));
        assert_eq!(picture(&out.take()), ["Sabchij"]);
        // Into a fresh Send: never queued.
        assert!(!out.send_with(3, |b| b.extend_from_slice(b"klmn")));
        assert!(out.take().is_empty());
    }

    #[test]
    fn a_packet_at_the_limit_may_overshoot_it_once() {
        let mut out = Outbox::with_coalesce_limit(4);
        assert!(out.send_with(usize::MAX, |b| b.extend_from_slice(b"abc")));
        assert!(out.send_with(usize::MAX, |b| b.extend_from_slice(b"defgh")));
        assert!(out.send_with(usize::MAX, |b| b.extend_from_slice(b"i")));
        assert_eq!(picture(&out.take()), ["Sabcdefgh", "Si"]);
    }

    #[test]
    fn acks_gather_per_subscription_and_sends_join_across_them() {
        let mut out = Outbox::new();
        out.send(b"p1".to_vec());
        out.ack(1, 10);
        out.send(b"p2".to_vec());
        out.ack(2, 20);
        out.ack(1, 11);
        out.send(b"p3".to_vec());
        assert_eq!(picture(&out.take()), ["Sp1p2p3", "A1:[10, 11]", "A2:20"]);
    }

    #[test]
    fn acks_never_cross_another_action() {
        let mut out = Outbox::new();
        out.ack(1, 1);
        out.send(b"x".to_vec());
        out.push(Action::Unsubscribe {
            sub: 1,
            delete: false,
        });
        out.ack(1, 2);
        out.push(Action::SetTimer {
            token: 5,
            delay_ms: 0,
        });
        out.ack(1, 3);
        out.ack(1, 4);
        assert_eq!(
            picture(&out.take()),
            ["Sx", "A1:1", "U1", "A1:2", "T5", "A1:[3, 4]"]
        );
    }

    #[test]
    fn a_send_after_another_action_does_not_join_the_one_before() {
        let mut out = Outbox::new();
        out.send(b"a".to_vec());
        out.push(Action::SetTimer {
            token: 1,
            delay_ms: 0,
        });
        out.send(b"b".to_vec());
        assert_eq!(picture(&out.take()), ["Sa", "T1", "Sb"]);
    }

    #[test]
    fn pushed_sends_and_acks_are_coalesced_too() {
        let mut out = Outbox::new();
        out.push(Action::Send(b"a".to_vec()));
        out.push(Action::AckMany {
            sub: 3,
            delivery_ids: vec![1, 2],
        });
        out.push(Action::Send(b"b".to_vec()));
        out.push(Action::Ack {
            sub: 3,
            delivery_id: 3,
        });
        assert_eq!(picture(&out.take()), ["Sab", "A3:[1, 2, 3]"]);
    }

    #[test]
    fn empty_sends_queue_nothing() {
        let mut out = Outbox::new();
        out.send(Vec::new());
        assert!(out.send_with(10, |_| {}));
        assert!(out.take().is_empty());
    }
}
