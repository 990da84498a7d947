//! A durable subscription's cursor: what has been acknowledged, persisted to disk.
//!
//! The state follows Pulsar's managed cursor: a mark-delete position (here `ack_floor`, the
//! first entry id *not* known to be acknowledged; everything below it is acknowledged) plus
//! the set of entries acknowledged individually above it, plus, for batch entries acknowledged
//! message by message (batch-index acks), the messages still unacknowledged (Pulsar's
//! `batchDeletedIndexes`), so that after a restart a batch comes back with only those.
//!
//! Durability: [`CursorStore::save`] writes a temp file, fsyncs it, renames it over the old
//! one and fsyncs the directory, so a crash leaves either the old or the new state, never a
//! mix. Saving may lag behind acknowledgements (callers coalesce), which after a crash means
//! an acknowledged message can be delivered again, never that an unacknowledged one is lost.
//! A file that fails its checksum is treated as "nothing acknowledged" for the same reason.
//!
//! What a crash (`kill -9`, power loss after the fsyncs) can and cannot do, precisely:
//! - the saved cursor only moves forward: its ack floor never decreases, and an entry it
//!   holds as acknowledged stays so in every later save (only an explicit seek or
//!   unsubscribe by a client moves it back);
//! - an entry whose acknowledgement reached a completed save is never delivered to that
//!   subscription again after a restart;
//! - acknowledgements newer than the last save (the topic saves at most
//!   `CURSOR_SAVE_INTERVAL`, 50 ms, after an ack, and on clean shutdown) are lost, so those
//!   entries are delivered again: at least once, never lost.
//!
//! Asserted across repeated `kill -9` under load by
//! `tests/python/test_broker_robustness.py::test_kill9_loop_under_load_loses_no_receipt_and_cursor_never_goes_back`,
//! which reads these files while the broker is dead.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::log::{append_checksum, checked_contents, sync_dir};
use crate::naming;

/// Floor and individual acks.
const MAGIC: &[u8; 4] = b"MGC1";
/// The same, followed by the batch-index acks (written only when there are some, so a file
/// without any stays readable by a broker that predates them).
const MAGIC_WITH_BATCHES: &[u8; 4] = b"MGC2";
const FILE_SUFFIX: &str = ".cursor";
/// Most individually-acknowledged entries kept above the floor; beyond it, acks of the
/// highest entries are forgotten (they will be redelivered), keeping the file bounded.
pub const MAX_INDIVIDUAL_ACKS: usize = 1_000_000;
/// Most batch entries with batch-index acks kept; beyond, further entries' batch-index acks
/// are ignored until they are acknowledged whole (their messages are redelivered).
pub const MAX_PARTIAL_BATCHES: usize = 100_000;

/// Acknowledgement state of one subscription.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cursor {
    ack_floor: u64,
    acked: BTreeSet<u64>,
    /// Batch entries partly acknowledged: entry id → bit set of its messages still
    /// unacknowledged (`CommandAck`'s `ack_set` layout: bit `i % 64` of word `i / 64`).
    partial: BTreeMap<u64, Vec<i64>>,
}

impl Cursor {
    /// A cursor with everything below `floor` acknowledged.
    pub fn at(floor: u64) -> Cursor {
        Cursor {
            ack_floor: floor,
            acked: BTreeSet::new(),
            partial: BTreeMap::new(),
        }
    }

    /// First entry id not known to be acknowledged.
    pub fn ack_floor(&self) -> u64 {
        self.ack_floor
    }

    /// How many entries below `end` are not acknowledged (the backlog).
    pub fn unacked_below(&self, end: u64) -> u64 {
        if end <= self.ack_floor {
            return 0;
        }
        let above = self.acked.range(self.ack_floor..end).count() as u64;
        end.saturating_sub(self.ack_floor).saturating_sub(above)
    }

    /// Whether entry `id` is acknowledged.
    pub fn is_acked(&self, id: u64) -> bool {
        id < self.ack_floor || self.acked.contains(&id)
    }

    /// The messages of batch entry `id` still unacknowledged, if some were acknowledged by
    /// batch index (the `ack_set` a redelivery carries).
    pub fn unacked_in_batch(&self, id: u64) -> Option<&[i64]> {
        self.partial.get(&id).map(Vec::as_slice)
    }

    /// A batch-index ack of entry `id`: `unacked` holds the bits of its messages the client
    /// still has not acknowledged. The entry counts as acknowledged once no bit is left.
    /// Returns whether anything changed.
    pub fn ack_batch_indexes(&mut self, id: u64, unacked: &[i64]) -> bool {
        if self.is_acked(id) {
            return false;
        }
        let full = self.partial.len() >= MAX_PARTIAL_BATCHES;
        let changed = match self.partial.get_mut(&id) {
            Some(left) => {
                let mut changed = false;
                for (word, other) in left.iter_mut().zip(unacked) {
                    changed |= *word & *other != *word;
                    *word &= *other;
                }
                changed
            }
            None if full => false,
            None => {
                self.partial.insert(id, unacked.to_vec());
                true
            }
        };
        if self
            .partial
            .get(&id)
            .is_some_and(|left| left.iter().all(|w| *w == 0))
        {
            return self.ack(id);
        }
        changed
    }

    /// Acknowledges one entry. Returns whether anything changed.
    pub fn ack(&mut self, id: u64) -> bool {
        if self.is_acked(id) {
            return false;
        }
        self.partial.remove(&id);
        if id == self.ack_floor {
            self.ack_floor += 1;
            while self.acked.remove(&self.ack_floor) {
                self.ack_floor += 1;
            }
        } else {
            if self.acked.len() >= MAX_INDIVIDUAL_ACKS {
                return false;
            }
            self.acked.insert(id);
        }
        true
    }

    /// Acknowledges every entry up to and including `id`.
    pub fn ack_cumulative(&mut self, id: u64) -> bool {
        if id < self.ack_floor {
            return false;
        }
        self.ack_floor = id + 1;
        self.acked = self.acked.split_off(&self.ack_floor);
        while self.acked.remove(&self.ack_floor) {
            self.ack_floor += 1;
        }
        self.partial = self.partial.split_off(&self.ack_floor);
        true
    }

    /// `[MGC1][floor][count][ids]([count][id][words][word]*)?[crc32c]`, all big-endian u64s;
    /// the part in parentheses only under `MGC2`.
    fn encode(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(20 + self.acked.len() * 8);
        buf.extend_from_slice(match self.partial.is_empty() {
            true => MAGIC,
            false => MAGIC_WITH_BATCHES,
        });
        buf.extend_from_slice(&self.ack_floor.to_be_bytes());
        buf.extend_from_slice(&(self.acked.len() as u64).to_be_bytes());
        for id in &self.acked {
            buf.extend_from_slice(&id.to_be_bytes());
        }
        if !self.partial.is_empty() {
            buf.extend_from_slice(&(self.partial.len() as u64).to_be_bytes());
            for (id, words) in &self.partial {
                buf.extend_from_slice(&id.to_be_bytes());
                buf.extend_from_slice(&(words.len() as u64).to_be_bytes());
                for word in words {
                    buf.extend_from_slice(&word.to_be_bytes());
                }
            }
        }
        append_checksum(&mut buf);
        buf
    }

    fn decode(bytes: &[u8]) -> Option<Cursor> {
        let body = checked_contents(bytes)?;
        let (rest, with_batches) = match body.strip_prefix(MAGIC) {
            Some(rest) => (rest, false),
            None => (body.strip_prefix(MAGIC_WITH_BATCHES)?, true),
        };
        if rest.len() % 8 != 0 {
            return None;
        }
        let mut words = rest.chunks_exact(8).map(|c| {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            u64::from_be_bytes(w)
        });
        let ack_floor = words.next()?;
        let count = words.next()?;
        let acked: BTreeSet<u64> = words.by_ref().take(usize::try_from(count).ok()?).collect();
        if acked.len() as u64 != count {
            return None;
        }
        let mut partial = BTreeMap::new();
        if with_batches {
            for _ in 0..words.next()? {
                let id = words.next()?;
                let len = usize::try_from(words.next()?).ok()?;
                let set: Vec<i64> = words.by_ref().take(len).map(|w| w as i64).collect();
                if set.len() != len {
                    return None;
                }
                partial.insert(id, set);
            }
        }
        if words.next().is_some() {
            return None;
        }
        Some(Cursor {
            ack_floor,
            acked,
            partial,
        })
    }
}

/// Where a topic's cursors live: `<topic dir>/cursors/<escaped subscription>.cursor`.
pub struct CursorStore {
    dir: PathBuf,
}

impl CursorStore {
    /// Cursor store under a topic's directory.
    pub fn new(topic_dir: &Path) -> CursorStore {
        CursorStore {
            dir: topic_dir.join("cursors"),
        }
    }

    fn path(&self, subscription: &str) -> PathBuf {
        self.dir
            .join(format!("{}{FILE_SUFFIX}", naming::escape(subscription)))
    }

    /// Loads every persisted cursor (subscription name, cursor).
    pub fn load_all(&self) -> io::Result<Vec<(String, Cursor)>> {
        let mut out = Vec::new();
        let items = match fs::read_dir(&self.dir) {
            Ok(items) => items,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e),
        };
        for item in items {
            let item = item?;
            let file_name = item.file_name();
            let Some(stem) = file_name.to_str().and_then(|n| n.strip_suffix(FILE_SUFFIX)) else {
                continue;
            };
            let Some(name) = naming::unescape(stem) else {
                continue;
            };
            let bytes = fs::read(item.path())?;
            let cursor = Cursor::decode(&bytes).unwrap_or_else(|| {
                tracing::warn!(subscription = %name, "cursor file corrupt; redelivering from the start");
                Cursor::default()
            });
            out.push((name, cursor));
        }
        Ok(out)
    }

    /// Durably replaces the saved state of `subscription`.
    pub fn save(&self, subscription: &str, cursor: &Cursor) -> io::Result<()> {
        fs::create_dir_all(&self.dir)?;
        let path = self.path(subscription);
        let tmp = path.with_extension("tmp");
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&cursor.encode())?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, &path)?;
        sync_dir(&self.dir)
    }

    /// Durably forgets `subscription`.
    pub fn delete(&self, subscription: &str) -> io::Result<()> {
        match fs::remove_file(self.path(subscription)) {
            Ok(()) => sync_dir(&self.dir),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn individual_acks_advance_the_floor_when_contiguous() {
        let mut c = Cursor::at(0);
        assert!(c.ack(1));
        assert!(c.ack(2));
        assert_eq!(c.ack_floor(), 0);
        assert!(c.ack(0));
        assert_eq!(c.ack_floor(), 3);
        assert!(!c.ack(1));
        assert!(c.ack_cumulative(5));
        assert_eq!(c.ack_floor(), 6);
        c.ack(8);
        c.ack_cumulative(6);
        assert_eq!(c.ack_floor(), 7);
        assert!(c.is_acked(8) && !c.is_acked(7));
    }

    #[test]
    fn cursor_survives_save_and_load() {
        let dir = tempfile::tempdir().unwrap();
        let store = CursorStore::new(dir.path());
        let mut c = Cursor::at(3);
        c.ack(7);
        c.ack(9);
        store.save("sub/with:odd chars", &c).unwrap();
        store.save("other", &Cursor::at(0)).unwrap();
        let mut all = store.load_all().unwrap();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(all.len(), 2);
        assert_eq!(all[1], ("sub/with:odd chars".to_string(), c));
        store.delete("other").unwrap();
        assert_eq!(store.load_all().unwrap().len(), 1);
    }

    #[test]
    fn corrupt_cursor_file_means_nothing_acked() {
        let dir = tempfile::tempdir().unwrap();
        let store = CursorStore::new(dir.path());
        store.save("s", &Cursor::at(10)).unwrap();
        let path = store.path("s");
        let mut bytes = fs::read(&path).unwrap();
        bytes[6] ^= 0xff;
        fs::write(&path, bytes).unwrap();
        let all = store.load_all().unwrap();
        assert_eq!(all, vec![("s".to_string(), Cursor::default())]);
    }

    #[test]
    fn batch_index_acks_are_kept_until_the_whole_entry_is_acked() {
        let mut c = Cursor::at(0);
        // Entry 2 is a batch of 4: messages 0 and 2 acked (bits 1 and 3 still unacked).
        assert!(c.ack_batch_indexes(2, &[0b1010]));
        assert_eq!(c.unacked_in_batch(2), Some(&[0b1010i64][..]));
        assert!(!c.ack_batch_indexes(2, &[0b1010]), "nothing new");
        assert!(c.ack_batch_indexes(2, &[0b1000]));
        assert!(!c.is_acked(2));
        assert!(c.ack_batch_indexes(2, &[0]));
        assert!(c.is_acked(2) && c.unacked_in_batch(2).is_none());
        c.ack_batch_indexes(5, &[0b1]);
        c.ack_batch_indexes(9, &[0b1]);
        c.ack_cumulative(6);
        assert_eq!(c.unacked_in_batch(5), None);
        assert_eq!(c.unacked_in_batch(9), Some(&[0b1i64][..]));
        c.ack(9);
        assert_eq!(c.unacked_in_batch(9), None);
    }

    #[test]
    fn batch_index_acks_survive_save_and_load() {
        let dir = tempfile::tempdir().unwrap();
        let store = CursorStore::new(dir.path());
        let mut c = Cursor::at(3);
        c.ack(7);
        c.ack_batch_indexes(4, &[0b110, -1]);
        c.ack_batch_indexes(8, &[i64::MIN]);
        store.save("s", &c).unwrap();
        assert_eq!(&fs::read(store.path("s")).unwrap()[..4], MAGIC_WITH_BATCHES);
        assert_eq!(
            store.load_all().unwrap(),
            vec![("s".to_string(), c.clone())]
        );
        // Once no batch is partly acked, the file is in the older format again.
        c.ack_cumulative(8);
        store.save("s", &c).unwrap();
        assert_eq!(&fs::read(store.path("s")).unwrap()[..4], MAGIC);
        assert_eq!(store.load_all().unwrap(), vec![("s".to_string(), c)]);
    }
}
