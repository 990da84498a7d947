//! A durable subscription's cursor: what has been acknowledged, persisted to disk.
//!
//! The state follows Pulsar's managed cursor: a mark-delete position (here `ack_floor`, the
//! first entry id *not* known to be acknowledged; everything below it is acknowledged) plus
//! the set of entries acknowledged individually above it, plus, for batch entries acknowledged
//! message by message (batch-index acks), the messages still unacknowledged (Pulsar's
//! `batchDeletedIndexes`), so that after a restart a batch comes back with only those.
//!
//! Durability: a topic's cursors are kept in one append-only journal. [`CursorStore::save_all`]
//! appends one checksummed record per subscription with its whole state and returns after one
//! `fdatasync`; the last whole record of a subscription is its saved state (a tombstone
//! record forgets it). A crash during a save leaves a torn tail, which the next load ignores
//! (the state before that save holds) and rewrites away. The journal is allocated ahead in
//! zeroed, synced steps (`GROW_BYTES`), so an append does not change the file's size and its
//! `fdatasync` writes the data alone; once mostly superseded records, it is compacted into a
//! new file renamed over it (a crash leaves the old or the new one, both complete).
//!
//! Why a journal: a file per subscription replaced by rename costs a create, an `fsync`, a
//! rename and a directory `fsync` per save; with many quiet subscriptions (a queue per
//! device) every ack paid that (performance-log, 2026-12-07). Files of that older format
//! (`<escaped subscription>.cursor`) are read at load, folded into the journal and removed.
//!
//! Saving may lag behind acknowledgements (callers coalesce), which after a crash means
//! an acknowledged message can be delivered again, never that an unacknowledged one is lost.
//! A state that fails its checksum is treated as "nothing acknowledged" for the same reason.
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
//! which reads the journal while the broker is dead.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

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

/// Where a topic's cursors live: one journal, `<topic dir>/cursors/journal`, that every
/// save appends to (see the module docs). Files `<escaped subscription>.cursor` are the
/// format before it (one file per subscription, replaced by rename): read at load, folded
/// into the journal, then removed.
pub struct CursorStore {
    dir: PathBuf,
    journal: Mutex<Option<Journal>>,
}

/// The open journal and what a compaction rewrites.
struct Journal {
    /// `None` until the first save creates the file.
    file: Option<fs::File>,
    /// End of the last record (the file is longer: zeros up to `allocated`).
    end: u64,
    allocated: u64,
    /// Every subscription's latest record, as written.
    live: HashMap<String, Vec<u8>>,
    live_bytes: u64,
    /// A write or sync failed: what follows `end` is unknown, so the next save rewrites the
    /// whole journal instead of appending.
    broken: bool,
}

/// Name of the journal in the cursors directory (no `.cursor` suffix: never a subscription's
/// file).
const JOURNAL: &str = "journal";
/// Record kinds.
const RECORD_STATE: u8 = 1;
const RECORD_DELETED: u8 = 2;
/// Record header: body length and CRC32C of the body, big-endian u32s.
const RECORD_HEADER: usize = 8;
/// Largest record accepted when reading: a cursor at its limits (`MAX_INDIVIDUAL_ACKS` ids,
/// `MAX_PARTIAL_BATCHES` batches of a few words) with its name. A longer length is a torn
/// tail.
const MAX_RECORD_BYTES: usize = 64 * 1024 * 1024;
/// The journal grows by this many zeroed bytes at a time, made durable once, so that an
/// append writes into allocated, initialised blocks of a file whose size does not change:
/// its `fdatasync` then flushes the data alone, without the inode.
const GROW_BYTES: u64 = 64 * 1024;
/// A journal past this size is rewritten with the live records only, once they are less
/// than half of it.
const COMPACT_BYTES: u64 = 256 * 1024;

impl CursorStore {
    /// Cursor store under a topic's directory.
    pub fn new(topic_dir: &Path) -> CursorStore {
        CursorStore {
            dir: topic_dir.join("cursors"),
            journal: Mutex::new(None),
        }
    }

    #[cfg(test)]
    fn legacy_path(&self, subscription: &str) -> PathBuf {
        self.dir
            .join(format!("{}{FILE_SUFFIX}", naming::escape(subscription)))
    }

    fn journal_path(&self) -> PathBuf {
        self.dir.join(JOURNAL)
    }

    /// Loads every persisted cursor (subscription name, cursor), from the journal and any
    /// file of the format before it (which are then folded into the journal). A torn tail
    /// (a crash during a save) ends the journal where it starts, and is rewritten away.
    pub fn load_all(&self) -> io::Result<Vec<(String, Cursor)>> {
        let mut guard = self.lock();
        let journal = self.read_journal()?;
        let out = journal
            .live
            .iter()
            .map(|(name, record)| {
                let cursor = parse_record(record)
                    .and_then(|(_, _, state)| Cursor::decode(state))
                    .unwrap_or_default();
                (name.clone(), cursor)
            })
            .collect();
        *guard = Some(journal);
        Ok(out)
    }

    /// Durably replaces the saved state of `subscription`.
    pub fn save(&self, subscription: &str, cursor: &Cursor) -> io::Result<()> {
        self.save_all(&[(subscription.to_string(), cursor.clone())])
    }

    /// Durably replaces the saved states of these subscriptions, with one write and one
    /// `fdatasync` for all of them.
    pub fn save_all(&self, cursors: &[(String, Cursor)]) -> io::Result<()> {
        let records = cursors
            .iter()
            .map(|(name, cursor)| encode_record(RECORD_STATE, name, &cursor.encode()))
            .collect();
        self.append(records)
    }

    /// Durably forgets `subscription`.
    pub fn delete(&self, subscription: &str) -> io::Result<()> {
        let known = {
            let mut guard = self.lock();
            self.loaded(&mut guard)?.live.contains_key(subscription)
        };
        match known {
            true => self.append(vec![encode_record(RECORD_DELETED, subscription, &[])]),
            false => Ok(()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Journal>> {
        // A panic while appending leaves at worst a torn record, which `broken` or the next
        // load deals with; the state itself stays consistent.
        self.journal.lock().unwrap_or_else(|poisoned| {
            self.journal.clear_poison();
            poisoned.into_inner()
        })
    }

    fn loaded<'a>(&self, guard: &'a mut Option<Journal>) -> io::Result<&'a mut Journal> {
        if guard.is_none() {
            *guard = Some(self.read_journal()?);
        }
        guard
            .as_mut()
            .ok_or_else(|| io::Error::other("cursor journal not loaded"))
    }

    /// Appends `records` (a deleted subscription's record is its tombstone, dropped from the
    /// live set) and syncs them; rewrites the journal instead when it is broken or mostly
    /// dead records.
    fn append(&self, records: Vec<Vec<u8>>) -> io::Result<()> {
        let mut guard = self.lock();
        let journal = self.loaded(&mut guard)?;
        let mut bytes = Vec::new();
        for record in records {
            bytes.extend_from_slice(&record);
            journal.apply(record);
        }
        let end = journal.end + bytes.len() as u64;
        if journal.broken
            || journal.file.is_none()
            || (end > COMPACT_BYTES && end > 2 * journal.live_bytes)
        {
            return self.rewrite(journal);
        }
        let result = (|| {
            let file = journal
                .file
                .as_ref()
                .ok_or_else(|| io::Error::other("cursor journal not open"))?;
            if end > journal.allocated {
                let allocated = end.div_ceil(GROW_BYTES) * GROW_BYTES;
                let zeros = vec![0u8; (allocated - journal.allocated) as usize];
                file.write_all_at(&zeros, journal.allocated)?;
                file.sync_all()?;
                journal.allocated = allocated;
            }
            file.write_all_at(&bytes, journal.end)?;
            file.sync_data()
        })();
        match result {
            Ok(()) => journal.end = end,
            Err(_) => journal.broken = true,
        }
        result
    }

    /// Writes the live records to a new journal and renames it over the old one (a crash
    /// leaves one or the other, both holding every acknowledged save).
    fn rewrite(&self, journal: &mut Journal) -> io::Result<()> {
        journal.broken = true;
        let created = !self.dir.exists();
        fs::create_dir_all(&self.dir)?;
        if created {
            if let Some(topic_dir) = self.dir.parent() {
                sync_dir(topic_dir)?;
            }
        }
        let mut bytes = Vec::with_capacity(journal.live_bytes as usize);
        for record in journal.live.values() {
            bytes.extend_from_slice(record);
        }
        let end = bytes.len() as u64;
        let allocated = (end + 1).div_ceil(GROW_BYTES) * GROW_BYTES;
        bytes.resize(allocated as usize, 0);
        let path = self.journal_path();
        let tmp = path.with_extension("tmp");
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, &path)?;
        sync_dir(&self.dir)?;
        journal.file = Some(fs::OpenOptions::new().read(true).write(true).open(&path)?);
        journal.end = end;
        journal.allocated = allocated;
        journal.broken = false;
        Ok(())
    }

    /// Reads the journal, after the files of the format before it; folds those into a
    /// rewritten journal, as it does a torn tail.
    fn read_journal(&self) -> io::Result<Journal> {
        let mut journal = Journal {
            file: None,
            end: 0,
            allocated: 0,
            live: HashMap::new(),
            live_bytes: 0,
            broken: false,
        };
        let items = match fs::read_dir(&self.dir) {
            Ok(items) => items,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(journal),
            Err(e) => return Err(e),
        };
        let mut legacy = Vec::new();
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
            journal.apply(encode_record(RECORD_STATE, &name, &cursor.encode()));
            legacy.push(item.path());
        }
        let path = self.journal_path();
        let mut torn = false;
        match fs::OpenOptions::new().read(true).write(true).open(&path) {
            Ok(file) => {
                let bytes = fs::read(&path)?;
                let mut pos = 0usize;
                while let Some((record, rest)) = next_record(bytes.get(pos..).unwrap_or(&[])) {
                    journal.apply(record.to_vec());
                    pos = bytes.len() - rest.len();
                }
                // Past the end: zeros up to the allocated size, unless a save was torn.
                torn = bytes.get(pos..).is_some_and(|r| r.iter().any(|b| *b != 0));
                if torn {
                    tracing::warn!(journal = %path.display(), valid_bytes = pos, "cursor journal has a torn tail; rewriting it");
                }
                journal.end = pos as u64;
                journal.allocated = bytes.len() as u64;
                journal.file = Some(file);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        if torn || !legacy.is_empty() {
            self.rewrite(&mut journal)?;
            for path in &legacy {
                fs::remove_file(path)?;
            }
            if !legacy.is_empty() {
                sync_dir(&self.dir)?;
            }
        }
        Ok(journal)
    }
}

impl Journal {
    /// Takes a whole record into the live set: a subscription's state replaces its previous
    /// one, a tombstone removes it.
    fn apply(&mut self, record: Vec<u8>) {
        let Some((kind, name, _)) = parse_record(&record) else {
            return;
        };
        let name = name.to_string();
        let old = if kind == RECORD_DELETED {
            self.live.remove(&name)
        } else {
            self.live_bytes += record.len() as u64;
            self.live.insert(name, record)
        };
        self.live_bytes -= old.map_or(0, |r| r.len() as u64);
    }
}

/// `[u32 length][u32 CRC32C][kind][u32 name length][name][state]`, the lengths and CRC
/// big-endian and over what follows the header.
fn encode_record(kind: u8, name: &str, state: &[u8]) -> Vec<u8> {
    let body_len = 1 + 4 + name.len() + state.len();
    let mut record = Vec::with_capacity(RECORD_HEADER + body_len);
    record.extend_from_slice(&(body_len as u32).to_be_bytes());
    record.extend_from_slice(&[0; 4]);
    record.push(kind);
    record.extend_from_slice(&(name.len() as u32).to_be_bytes());
    record.extend_from_slice(name.as_bytes());
    record.extend_from_slice(state);
    let crc = crc32c::crc32c(record.get(RECORD_HEADER..).unwrap_or(&[]));
    record[4..RECORD_HEADER].copy_from_slice(&crc.to_be_bytes());
    record
}

/// The first whole, checksummed record of `bytes` and what follows it; `None` at the end
/// (zeros: a body is never empty) or at a torn record.
fn next_record(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let header = bytes.get(..RECORD_HEADER)?;
    let len = u32::from_be_bytes(header.get(..4)?.try_into().ok()?) as usize;
    let crc = u32::from_be_bytes(header.get(4..)?.try_into().ok()?);
    if len == 0 || len > MAX_RECORD_BYTES {
        return None;
    }
    let body = bytes.get(RECORD_HEADER..RECORD_HEADER + len)?;
    if crc32c::crc32c(body) != crc {
        return None;
    }
    bytes.split_at_checked(RECORD_HEADER + len)
}

/// A whole record's kind, subscription name and state.
fn parse_record(record: &[u8]) -> Option<(u8, &str, &[u8])> {
    let body = record.get(RECORD_HEADER..)?;
    let (&kind, rest) = body.split_first()?;
    let (len, rest) = rest.split_at_checked(4)?;
    let len = u32::from_be_bytes(len.try_into().ok()?) as usize;
    let (name, state) = rest.split_at_checked(len)?;
    Some((kind, std::str::from_utf8(name).ok()?, state))
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

    /// Loads a fresh store from the same directory, as a restarted broker does.
    fn reload(dir: &Path) -> Vec<(String, Cursor)> {
        let mut all = CursorStore::new(dir).load_all().unwrap();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    #[test]
    fn files_of_the_format_before_the_journal_are_folded_into_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = CursorStore::new(dir.path());
        fs::create_dir_all(&store.dir).unwrap();
        let mut c = Cursor::at(3);
        c.ack(7);
        fs::write(store.legacy_path("old/sub"), c.encode()).unwrap();
        let mut bytes = Cursor::at(10).encode();
        bytes[6] ^= 0xff;
        fs::write(store.legacy_path("damaged"), bytes).unwrap();
        let mut all = store.load_all().unwrap();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        // A damaged file means nothing acknowledged (redelivery, never loss).
        assert_eq!(
            all,
            vec![
                ("damaged".to_string(), Cursor::default()),
                ("old/sub".to_string(), c.clone())
            ]
        );
        assert!(!store.legacy_path("old/sub").exists());
        assert!(!store.legacy_path("damaged").exists());
        store.save("damaged", &Cursor::at(11)).unwrap();
        assert_eq!(
            reload(dir.path()),
            vec![
                ("damaged".to_string(), Cursor::at(11)),
                ("old/sub".to_string(), c)
            ]
        );
    }

    #[test]
    fn a_torn_save_leaves_the_state_before_it_and_is_rewritten_away() {
        let dir = tempfile::tempdir().unwrap();
        let store = CursorStore::new(dir.path());
        store
            .save_all(&[
                ("a".to_string(), Cursor::at(5)),
                ("b".to_string(), Cursor::at(6)),
            ])
            .unwrap();
        let end = store.lock().as_ref().unwrap().end;
        // A crash in the middle of the next save: part of its record reached the disk.
        let next = encode_record(RECORD_STATE, "a", &Cursor::at(9).encode());
        let file = fs::OpenOptions::new()
            .write(true)
            .open(store.journal_path())
            .unwrap();
        file.write_all_at(&next[..next.len() - 3], end).unwrap();
        drop(file);
        let again = CursorStore::new(dir.path());
        let mut all = again.load_all().unwrap();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            all,
            vec![
                ("a".to_string(), Cursor::at(5)),
                ("b".to_string(), Cursor::at(6))
            ]
        );
        // Rewritten: what follows the records is zeros again, and saves append after them.
        let bytes = fs::read(again.journal_path()).unwrap();
        let end = again.lock().as_ref().unwrap().end as usize;
        assert!(bytes[end..].iter().all(|b| *b == 0));
        again.save("b", &Cursor::at(8)).unwrap();
        assert_eq!(
            reload(dir.path()),
            vec![
                ("a".to_string(), Cursor::at(5)),
                ("b".to_string(), Cursor::at(8))
            ]
        );
    }

    #[test]
    fn saves_append_within_the_allocated_size_and_the_journal_stays_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let store = CursorStore::new(dir.path());
        store.save("s", &Cursor::at(0)).unwrap();
        let size = || fs::metadata(store.journal_path()).unwrap().len();
        assert_eq!(size(), GROW_BYTES);
        store.save("s", &Cursor::at(1)).unwrap();
        store.save("t", &Cursor::at(1)).unwrap();
        assert_eq!(size(), GROW_BYTES, "an append does not change the size");
        let mut c = Cursor::at(0);
        for id in (2..3000).step_by(2) {
            c.ack(id);
        }
        for floor in 0..200 {
            c.ack(floor);
            store.save("s", &c).unwrap();
        }
        assert!(
            size() <= COMPACT_BYTES + GROW_BYTES,
            "compacted: {}",
            size()
        );
        assert_eq!(
            reload(dir.path()),
            vec![("s".to_string(), c), ("t".to_string(), Cursor::at(1))]
        );
        store.delete("s").unwrap();
        store.delete("never-saved").unwrap();
        assert_eq!(reload(dir.path()), vec![("t".to_string(), Cursor::at(1))]);
    }

    #[test]
    fn a_failed_append_is_followed_by_a_rewrite() {
        let dir = tempfile::tempdir().unwrap();
        let store = CursorStore::new(dir.path());
        store.save("s", &Cursor::at(1)).unwrap();
        store.lock().as_mut().unwrap().broken = true;
        store.save("t", &Cursor::at(2)).unwrap();
        assert!(!store.lock().as_ref().unwrap().broken);
        assert_eq!(
            reload(dir.path()),
            vec![
                ("s".to_string(), Cursor::at(1)),
                ("t".to_string(), Cursor::at(2))
            ]
        );
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
        assert_eq!(&c.encode()[..4], MAGIC_WITH_BATCHES);
        store.save("s", &c).unwrap();
        assert_eq!(reload(dir.path()), vec![("s".to_string(), c.clone())]);
        // Once no batch is partly acked, the state is in the older format again.
        c.ack_cumulative(8);
        assert_eq!(&c.encode()[..4], MAGIC);
        store.save("s", &c).unwrap();
        assert_eq!(reload(dir.path()), vec![("s".to_string(), c)]);
    }
}
