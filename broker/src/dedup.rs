//! Sequence-id de-duplication per producer name, as Pulsar's `MessageDeduplication`.
//!
//! Per producer name: the highest sequence id accepted ("pushed") and the highest made
//! durable ("persisted"). A send whose first sequence id is not above the pushed one is a
//! duplicate: answered with the -1:-1 receipt if its original is durable, with a
//! `PersistenceError` (the client resends) if the original is still in flight. The state is
//! rebuilt when a topic opens from the producer names and sequence ids stored in its entries,
//! so it survives a crash exactly as the log does (entries that retention deleted take their
//! producers' state with them).
//!
//! Bounded: at most [`MAX_PRODUCERS`] names are tracked; sends of further producers are
//! stored without de-duplication.

use std::collections::HashMap;
use std::sync::Arc;

use crate::entry::StoredEntry;

/// Most producer names whose sequence ids a topic tracks.
pub const MAX_PRODUCERS: usize = 100_000;

/// What to do with a send.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Store it; once durable, report `(producer, highest sequence id)` to
    /// [`Dedup::persisted`] (`None`: the producer is not tracked).
    Store(Option<(Arc<str>, i64)>),
    /// A duplicate of a durable message.
    Duplicate,
    /// A duplicate of a message not yet durable.
    InFlight,
}

/// De-duplication state of one topic.
#[derive(Debug, Default)]
pub struct Dedup {
    pushed: HashMap<Arc<str>, i64>,
    persisted: HashMap<Arc<str>, i64>,
}

impl Dedup {
    /// Rebuilds the state from a topic's stored entries.
    pub fn recover(entries: impl Iterator<Item = StoredEntry>) -> Dedup {
        let mut dedup = Dedup::default();
        for e in entries {
            let highest = e
                .metadata
                .highest_sequence_id
                .unwrap_or(e.metadata.sequence_id) as i64;
            let name: Arc<str> = e.metadata.producer_name.as_str().into();
            if dedup.persisted.len() < MAX_PRODUCERS || dedup.persisted.contains_key(&name) {
                let last = dedup.persisted.entry(name).or_insert(-1);
                *last = (*last).max(highest);
            }
        }
        dedup.pushed = dedup.persisted.clone();
        dedup
    }

    /// Judges a send of sequence ids `lowest..=highest` by `producer` (Java longs on the wire).
    pub fn check(&mut self, producer: Arc<str>, lowest: i64, highest: i64) -> Verdict {
        match self.pushed.get(&producer).copied() {
            Some(pushed) if lowest <= pushed => {
                if highest <= self.last_persisted(&producer) {
                    Verdict::Duplicate
                } else {
                    Verdict::InFlight
                }
            }
            Some(_) => {
                self.pushed.insert(producer.clone(), highest);
                Verdict::Store(Some((producer, highest)))
            }
            None if self.pushed.len() < MAX_PRODUCERS => {
                self.pushed.insert(producer.clone(), highest);
                Verdict::Store(Some((producer, highest)))
            }
            None => Verdict::Store(None),
        }
    }

    /// A stored send became durable.
    pub fn persisted(&mut self, producer: Arc<str>, highest: i64) {
        let last = self.persisted.entry(producer).or_insert(-1);
        *last = (*last).max(highest);
    }

    /// An append failed: what was accepted but not stored may be sent again.
    pub fn forget_in_flight(&mut self) {
        self.pushed = self.persisted.clone();
    }

    /// The highest durable sequence id of `producer` (-1: none), for
    /// `CommandProducerSuccess.last_sequence_id`.
    pub fn last_persisted(&self, producer: &str) -> i64 {
        self.persisted.get(producer).copied().unwrap_or(-1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resends_are_recognised_until_and_after_durability() {
        let mut d = Dedup::default();
        let p: Arc<str> = "p".into();
        assert_eq!(
            d.check(p.clone(), 0, 0),
            Verdict::Store(Some((p.clone(), 0)))
        );
        assert_eq!(d.check(p.clone(), 0, 0), Verdict::InFlight);
        d.persisted(p.clone(), 0);
        assert_eq!(d.check(p.clone(), 0, 0), Verdict::Duplicate);
        assert_eq!(
            d.check(p.clone(), 1, 4),
            Verdict::Store(Some((p.clone(), 4)))
        );
        d.forget_in_flight();
        assert_eq!(
            d.check(p.clone(), 1, 4),
            Verdict::Store(Some((p.clone(), 4)))
        );
        assert_eq!(d.last_persisted("p"), 0);
        assert_eq!(d.last_persisted("q"), -1);
    }
}
