//! Sequence-id de-duplication per producer name, as Pulsar's `MessageDeduplication`.
//!
//! Per producer name: the highest sequence id accepted ("pushed") and the highest made
//! durable ("persisted"). A send whose first sequence id is not above the pushed one is a
//! duplicate: answered with the -1:-1 receipt if its original is durable, with a
//! `PersistenceError` (the client resends) if the original is still in flight. The state is
//! rebuilt when a topic opens from the producer names and sequence ids stored in its entries,
//! so it survives a crash exactly as the log does.
//!
//! Snapshots, as Pulsar's (`brokerDeduplicationEntriesInterval`): every
//! [`SNAPSHOT_ENTRIES`] entries or so the topic saves the durable state with the entry id it
//! covers ([`Snapshot`], `dedup.snapshot` in the topic's directory), and opening reads only
//! the entries after it instead of the whole topic. A snapshot keeps the state of producers
//! whose entries retention deleted since. A snapshot that is unreadable, or that covers
//! more entries than the log holds (a log cut back after corruption), is ignored and the
//! whole log is read: it is never trusted past what the log shows.
//!
//! Bounded: at most [`MAX_PRODUCERS`] names are tracked; sends of further producers are
//! stored without de-duplication.

use std::collections::HashMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::entry::StoredEntry;
use crate::log::{append_checksum, checked_contents};

/// Most producer names whose sequence ids a topic tracks.
pub const MAX_PRODUCERS: usize = 100_000;
/// Entries between two snapshots (Pulsar's default `brokerDeduplicationEntriesInterval`).
pub const SNAPSHOT_ENTRIES: u64 = 1000;

const SNAPSHOT_FILE: &str = "dedup.snapshot";
const SNAPSHOT_MAGIC: &[u8; 8] = b"MGDEDUP1";

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
    /// Rebuilds the state from a snapshot, if any, and the topic's stored entries after it.
    pub fn recover(
        snapshot: Option<Snapshot>,
        entries: impl Iterator<Item = StoredEntry>,
    ) -> Dedup {
        let mut dedup = Dedup::default();
        for (name, highest) in snapshot.map(|s| s.persisted).unwrap_or_default() {
            dedup.persisted.insert(name, highest);
        }
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

    /// The durable state, as set by the entries before `end` (which must all be durable and
    /// taken in with [`Dedup::persisted`]).
    pub fn snapshot(&self, end: u64) -> Snapshot {
        Snapshot {
            end,
            persisted: self
                .persisted
                .iter()
                .map(|(name, highest)| (name.clone(), *highest))
                .collect(),
        }
    }
}

/// The durable de-duplication state of a topic's entries before `end`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The first entry id the snapshot does not cover.
    pub end: u64,
    persisted: Vec<(Arc<str>, i64)>,
}

impl Snapshot {
    fn path(topic_dir: &Path) -> PathBuf {
        topic_dir.join(SNAPSHOT_FILE)
    }

    /// `[magic][end u64][count u64]([name length u32][name][highest i64])*[crc32c]`.
    fn encode(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(28 + self.persisted.len() * 24);
        buf.extend_from_slice(SNAPSHOT_MAGIC);
        buf.extend_from_slice(&self.end.to_be_bytes());
        buf.extend_from_slice(&(self.persisted.len() as u64).to_be_bytes());
        for (name, highest) in &self.persisted {
            // A name comes from one frame, far below 4 GiB.
            buf.extend_from_slice(&(name.len() as u32).to_be_bytes());
            buf.extend_from_slice(name.as_bytes());
            buf.extend_from_slice(&highest.to_be_bytes());
        }
        append_checksum(&mut buf);
        buf
    }

    fn decode(bytes: &[u8]) -> Option<Snapshot> {
        let mut rest = checked_contents(bytes)?.strip_prefix(SNAPSHOT_MAGIC)?;
        let mut take = |n: usize| -> Option<&[u8]> {
            let (head, tail) = rest.split_at_checked(n)?;
            rest = tail;
            Some(head)
        };
        let end = u64::from_be_bytes(take(8)?.try_into().ok()?);
        let count = u64::from_be_bytes(take(8)?.try_into().ok()?);
        let mut persisted = Vec::new();
        for _ in 0..count {
            let len = u32::from_be_bytes(take(4)?.try_into().ok()?);
            let name = std::str::from_utf8(take(usize::try_from(len).ok()?)?).ok()?;
            let highest = i64::from_be_bytes(take(8)?.try_into().ok()?);
            persisted.push((Arc::from(name), highest));
        }
        rest.is_empty().then_some(Snapshot { end, persisted })
    }

    /// Replaces the topic's snapshot. Not synced: after a crash the old one, or none, is
    /// read instead (a torn file fails its checksum), which costs reading more entries.
    pub fn save(&self, topic_dir: &Path) -> io::Result<()> {
        let path = Self::path(topic_dir);
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&self.encode())?;
        drop(f);
        std::fs::rename(&tmp, &path)
    }

    /// The topic's snapshot, if there is a readable one.
    pub fn load(topic_dir: &Path) -> Option<Snapshot> {
        let path = Self::path(topic_dir);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "de-duplication snapshot unreadable; reading every entry");
                return None;
            }
        };
        let snapshot = Self::decode(&bytes);
        if snapshot.is_none() {
            tracing::warn!(path = %path.display(), "de-duplication snapshot corrupt; reading every entry");
        }
        snapshot
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

    #[test]
    fn a_snapshot_is_read_back_and_entries_after_it_are_taken_in() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Snapshot::load(dir.path()), None);
        let mut d = Dedup::default();
        d.persisted("p".into(), 7);
        d.persisted("q".into(), 3);
        let snapshot = d.snapshot(12);
        snapshot.save(dir.path()).unwrap();
        let loaded = Snapshot::load(dir.path()).unwrap();
        assert_eq!(loaded, snapshot);
        // A later entry of q's moves it on; p stays as the snapshot has it.
        let later = StoredEntry {
            metadata: pulsar::message::proto::MessageMetadata {
                producer_name: "q".into(),
                sequence_id: 9,
                ..Default::default()
            },
            tail: bytes::Bytes::new(),
            tail_crc: 0,
            broker: None,
        };
        let mut d = Dedup::recover(Some(loaded), [later].into_iter());
        assert_eq!(d.last_persisted("p"), 7);
        assert_eq!(d.last_persisted("q"), 9);
        assert_eq!(d.check("p".into(), 7, 7), Verdict::Duplicate);
    }

    #[test]
    fn a_damaged_snapshot_is_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = Dedup::default();
        d.persisted("producer".into(), 41);
        d.snapshot(5).save(dir.path()).unwrap();
        let path = dir.path().join(SNAPSHOT_FILE);
        let good = std::fs::read(&path).unwrap();
        for cut in [0, 3, good.len() / 2, good.len() - 1] {
            std::fs::write(&path, &good[..cut]).unwrap();
            assert_eq!(Snapshot::load(dir.path()), None, "cut at {cut}");
        }
        let mut flipped = good.clone();
        flipped[20] ^= 1;
        std::fs::write(&path, &flipped).unwrap();
        assert_eq!(Snapshot::load(dir.path()), None);
    }
}
