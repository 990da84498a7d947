//! The per-topic append-only log: segmented files of checksummed entries.
//!
//! Layout: `<dir>/<first-entry-id, 20 digits>.seg`; each record is
//! `[u32 BE length][u32 BE CRC32C of data][data]`. Entry ids are continuous from 0 across
//! segments, so an entry id is also the topic's entry index.
//!
//! Guarantees:
//! - [`Log::append`] returns only after the records are written *and* `fsync`ed (one
//!   `sync_data` per call, however many entries: callers group-commit by passing a batch).
//!   New segment files are made durable by syncing the directory. [`Log::write`],
//!   [`Unsynced::sync`] and [`Log::finish`] are the same three steps taken apart, so that the
//!   `fdatasync` runs without the caller's lock on the log (readers are not held up by it),
//!   and the next group's write can overlap it. Records count as appended (readable, with an
//!   id) only after `finish` saw their sync succeed. Up to [`MAX_UNSYNCED_WRITES`] writes may
//!   await their sync; they are finished in the order written, and a failed one cuts the
//!   segment back to the last appended record, taking every later unfinished write with it
//!   (those then fail in `finish`).
//! - [`Log::open`] scans every segment, rebuilds the in-memory index entry id → (segment,
//!   offset) and truncates a torn or corrupt tail of the last segment; a corrupt record in an
//!   older segment is an error (that is bit rot, not a crash, and we will not skip it).
//! - [`Log::read`] re-checks the CRC, so a corrupt entry is never served. A record whose
//!   body comes with a known CRC32C (a `Send`'s verified frame checksum) gets a CRC derived
//!   from it, not from a second pass over the bytes: a body changed in memory after the
//!   client's checksum was checked is then caught on read instead of stored as valid.
//! - Appended records leave the page cache ([`Log::append`] does it; a caller of
//!   [`Log::finish`] calls [`CachedPages::drop_clean`]): readers of recent entries are
//!   served by the topic's entry cache, older ones read the disk. Only clean pages go, so
//!   durability is untouched.
//!
//! - [`Log::remove_segments_before`] deletes whole closed segments from the front (retention,
//!   decided by the topic); the first entry id then grows, ids never change. A crash during
//!   removal leaves a prefix of them removed, which `open` accepts.
//!
//! Not done here: read caching (see `topic`), async I/O (callers run these blocking calls
//! where blocking is acceptable).

use std::fs::{self, File, OpenOptions};
use std::io::{self, IoSlice, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Largest entry the log stores (a Pulsar message of 5 MiB plus its metadata).
pub const MAX_ENTRY_BYTES: usize = 5 * 1024 * 1024 + 64 * 1024;
/// A segment is closed and a new one started once it passes this size.
pub const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;

/// Writes that may await their [`Log::finish`] at once: one syncing, the next being written.
pub const MAX_UNSYNCED_WRITES: usize = 2;

const HEADER: usize = 8;
/// Records with a body this large are written from where they are (vectored write);
/// smaller ones are gathered into one buffer with the record headers.
const GATHER_BYTES: usize = 4096;

/// One record to append, in two parts (`head` may be empty), so that a caller need not
/// assemble it in memory first.
#[derive(Clone, Copy)]
pub struct RecordParts<'a> {
    pub head: &'a [u8],
    pub body: &'a [u8],
    /// CRC32C of `body` if the caller knows it (a `Send`'s verified frame checksum): the
    /// record's checksum is then derived from it instead of read from every byte again.
    pub body_crc: Option<u32>,
}

impl RecordParts<'_> {
    fn len(&self) -> usize {
        self.head.len() + self.body.len()
    }

    /// The record's CRC32C: from `body_crc` for bodies of [`GATHER_BYTES`] and more, else
    /// one hardware pass. Deriving it keeps the checksum end to end: a body changed in
    /// memory after the client's checksum was verified fails the log's check on read.
    fn crc(&self) -> u32 {
        match self.body_crc {
            Some(body_crc) if self.body.len() >= GATHER_BYTES => {
                crc32c_concat(crc32c::crc32c(self.head), body_crc, self.body.len())
            }
            _ => crc32c::crc32c_append(crc32c::crc32c(self.head), self.body),
        }
    }
}

/// CRC32C (reflected polynomial) of `a ++ b` from CRC32C(`a`), CRC32C(`b`) and `b`'s length:
/// CRC(`a`) times x^(8 `b_len`) modulo the polynomial, plus CRC(`b`) (zlib's
/// `crc32_combine`, with its table of x^(2^k)). The `crc32c` crate's `crc32c_combine` was
/// measured slower than a hardware pass over 100 KB: it squares 32x32 bit matrices.
fn crc32c_concat(crc_a: u32, crc_b: u32, b_len: usize) -> u32 {
    let mut power = 1u32 << 31; // x^0
    let mut n = b_len as u64;
    let mut k = 3; // a byte is x^(2^3)
    while n != 0 {
        if n & 1 == 1 {
            power = mul_mod(X2N[k % 32], power);
        }
        n >>= 1;
        k += 1;
    }
    mul_mod(power, crc_a) ^ crc_b
}

/// Castagnoli polynomial, reflected.
const CASTAGNOLI: u32 = 0x82f6_3b78;

/// `a` times `b` modulo [`CASTAGNOLI`], both reflected (bit 31 is x^0).
const fn mul_mod(a: u32, mut b: u32) -> u32 {
    let mut product = 0;
    let mut bit = 1u32 << 31;
    while bit != 0 {
        if a & bit != 0 {
            product ^= b;
        }
        bit >>= 1;
        b = if b & 1 != 0 {
            (b >> 1) ^ CASTAGNOLI
        } else {
            b >> 1
        };
    }
    product
}

/// x^(2^k) modulo [`CASTAGNOLI`] for k in 0..32.
const X2N: [u32; 32] = {
    let mut table = [0u32; 32];
    let mut p = 1u32 << 30; // x^1
    let mut k = 0;
    while k < 32 {
        table[k] = p;
        p = mul_mod(p, p);
        k += 1;
    }
    table
};

const SUFFIX: &str = ".seg";

/// What can go wrong with a log.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("log I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("entry of {0} bytes exceeds the {MAX_ENTRY_BYTES}-byte limit")]
    EntryTooLarge(usize),
    #[error("corrupt record in segment {segment} at offset {offset} (not the tail)")]
    Corrupt { segment: PathBuf, offset: u64 },
    #[error("entry {0} does not exist")]
    NoSuchEntry(u64),
    #[error("checksum mismatch reading entry {0}")]
    ChecksumMismatch(u64),
    #[error("an earlier write failed and its partial records cannot be removed yet")]
    Poisoned,
    #[error("{MAX_UNSYNCED_WRITES} writes are already awaiting their sync")]
    WriteInFlight,
    #[error("an earlier write failed: this one was cut back")]
    CutBack,
}

struct Segment {
    base: u64,
    /// Shared with an [`Unsynced`] write so that its sync needs no access to the log.
    file: Arc<File>,
    /// Byte offset of each record in this segment; entry `base + i` is at `offsets[i]`.
    offsets: Vec<u64>,
    len: u64,
}

/// An open log. Not shared: its owner serialises appends (see `topic`).
pub struct Log {
    dir: PathBuf,
    segments: Vec<Segment>,
    poisoned: bool,
    segment_bytes: u64,
    /// [`Log::write`]s of this epoch awaiting their [`Log::finish`] (a failure voids the
    /// others: their `finish` only reports [`LogError::CutBack`]).
    unsynced: usize,
    /// While `unsynced > 0`: where the next write goes in the last segment, and how many
    /// records the unsynced writes hold.
    written_end: u64,
    written_records: u64,
    /// Bumped by every failure: an [`Unsynced`] from before it was cut back.
    epoch: u64,
}

/// Records written to the last segment but not yet durable nor appended: sync them (no lock
/// on the log needed), then hand this back to [`Log::finish`].
#[must_use = "records are appended only by Log::finish"]
pub struct Unsynced {
    file: Arc<File>,
    epoch: u64,
    base: u64,
    first: u64,
    offsets: Vec<u64>,
    /// Byte range of the records in the segment.
    start: u64,
    end: u64,
}

impl Unsynced {
    /// `fdatasync` of the segment the records went to, timed into [`crate::stats::FSYNC`].
    pub fn sync(&self) -> io::Result<()> {
        let start = std::time::Instant::now();
        let synced = self.file.sync_data();
        crate::stats::FSYNC.record(start.elapsed());
        synced
    }

    /// The records' pages, to drop from the page cache once they are appended (and their
    /// receipts out: the drop is not on the way to them).
    pub fn cached(&self) -> CachedPages {
        CachedPages {
            file: self.file.clone(),
            start: self.start,
            end: self.end,
        }
    }
}

/// Pages of appended records still in the page cache (see [`CachedPages::drop_clean`]).
pub struct CachedPages {
    file: Arc<File>,
    start: u64,
    end: u64,
}

impl CachedPages {
    /// Evicts the whole pages of the records from the page cache (`POSIX_FADV_DONTNEED`).
    /// Call once they are durable, so clean: the kernel keeps any page that is dirty (the
    /// partial last one, which the next write shares, may be), so nothing unsynced is lost.
    ///
    /// Why: the records are read back from the topic's entry cache, rarely from the file;
    /// and on a virtual machine whose free memory goes back to the host, a page-cache page
    /// never used before costs a fault in the host at its first write. Appending 2 MiB
    /// writes into fresh pages was measured at 0.36-1.1 GB/s, into pages freed this way at
    /// 5 GB/s (`raw` bench, 100 B: 0.14-0.25 against 0.08 CPU µs/msg). Only advice: an
    /// error changes nothing.
    pub fn drop_clean(self) {
        let from = self.start / PAGE * PAGE;
        let to = self.end / PAGE * PAGE;
        if let Some(len) = std::num::NonZeroU64::new(to.saturating_sub(from)) {
            let _ = rustix::fs::fadvise(&*self.file, from, Some(len), rustix::fs::Advice::DontNeed);
        }
    }
}

/// Page size assumed by [`CachedPages::drop_clean`] (a larger real page only means fewer
/// pages dropped).
const PAGE: u64 = 4096;

impl Log {
    /// Opens (creating if needed) the log in `dir`, recovering from a crash as described in
    /// the module docs.
    pub fn open(dir: &Path) -> Result<Log, LogError> {
        Log::open_with(dir, SEGMENT_BYTES)
    }

    /// [`Log::open`], rolling to a new segment once one passes `segment_bytes`.
    pub fn open_with(dir: &Path, segment_bytes: u64) -> Result<Log, LogError> {
        fs::create_dir_all(dir)?;
        let mut bases = Vec::new();
        for item in fs::read_dir(dir)? {
            let item = item?;
            let name = item.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(num) = name.strip_suffix(SUFFIX) {
                if let Ok(base) = num.parse::<u64>() {
                    bases.push(base);
                }
            }
        }
        bases.sort_unstable();
        let mut log = Log {
            dir: dir.to_path_buf(),
            segments: Vec::new(),
            poisoned: false,
            segment_bytes: segment_bytes.max(1),
            unsynced: 0,
            written_end: 0,
            written_records: 0,
            epoch: 0,
        };
        let count = bases.len();
        for (i, base) in bases.into_iter().enumerate() {
            let is_last = i + 1 == count;
            let expected = log.next_entry_id();
            if !log.segments.is_empty() && base != expected {
                // A gap or overlap means a segment from a half-finished roll; only the last
                // can be such, and an empty one is harmless.
                return Err(LogError::Corrupt {
                    segment: segment_path(dir, base),
                    offset: 0,
                });
            }
            let seg = open_segment(dir, base, is_last)?;
            log.segments.push(seg);
        }
        if log.segments.is_empty() {
            log.segments.push(create_segment(dir, 0)?);
        }
        Ok(log)
    }

    /// Id the next appended entry will get (= number of entries ever appended).
    pub fn next_entry_id(&self) -> u64 {
        self.segments
            .last()
            .map(|s| s.base + s.offsets.len() as u64)
            .unwrap_or(0)
    }

    /// Appends `entries` in order and makes them durable with one fsync. Returns the id of
    /// the first one. On error (disk full, read-only file system, I/O error) none of them is
    /// acknowledged, and the last segment is cut back to its last durable record before
    /// anything else is appended: right away if the file allows it, else at the start of a
    /// later append (so the log resumes by itself once space returns or the file system is
    /// writable again). Until then appends fail. If the process dies before the cut, the
    /// unacknowledged records may survive (whole and checksummed, or as a torn tail that
    /// [`Log::open`] repairs): a failed append may be stored, an acknowledged one always is.
    pub fn append(&mut self, entries: &[&[u8]]) -> Result<u64, LogError> {
        let records: Vec<RecordParts> = entries
            .iter()
            .map(|e| RecordParts {
                head: &[],
                body: e,
                body_crc: None,
            })
            .collect();
        let unsynced = self.write(&records)?;
        let synced = unsynced.sync();
        let cached = unsynced.cached();
        let first = self.finish(unsynced, synced)?;
        cached.drop_clean();
        Ok(first)
    }

    /// First step of [`Log::append`]: writes the records after the last appended one (not
    /// yet durable, not yet readable). Errors as `append`.
    pub fn write(&mut self, entries: &[RecordParts]) -> Result<Unsynced, LogError> {
        if self.unsynced >= MAX_UNSYNCED_WRITES {
            return Err(LogError::WriteInFlight);
        }
        if self.poisoned {
            self.repair()?;
        }
        if let Some(e) = entries.iter().find(|e| e.len() > MAX_ENTRY_BYTES) {
            return Err(LogError::EntryTooLarge(e.len()));
        }
        let result = self.write_inner(entries);
        match result {
            Ok(_) => self.unsynced += 1,
            Err(_) => self.failed(),
        }
        result
    }

    /// Last step of [`Log::append`]: with the outcome of [`Unsynced::sync`] (the caller may
    /// pass an error of its own to drop the records), appends the records (returns the id of
    /// the first) or, on error, cuts them back as `append` does. Call in the order written.
    pub fn finish(&mut self, unsynced: Unsynced, synced: io::Result<()>) -> Result<u64, LogError> {
        if unsynced.epoch != self.epoch {
            // Already cut back by an earlier failure (and no longer counted); cutting again
            // could drop a later write.
            return Err(LogError::CutBack);
        }
        self.unsynced = self.unsynced.saturating_sub(1);
        if let Err(e) = synced {
            self.failed();
            return Err(e.into());
        }
        let Some(seg) = self.segments.last_mut().filter(|s| {
            s.base == unsynced.base && s.base + s.offsets.len() as u64 == unsynced.first
        }) else {
            // Finished out of order: not a sequence the log can vouch for.
            self.failed();
            return Err(LogError::Poisoned);
        };
        seg.len = unsynced.end;
        self.written_records = self
            .written_records
            .saturating_sub(unsynced.offsets.len() as u64);
        seg.offsets.extend(unsynced.offsets);
        Ok(unsynced.first)
    }

    /// A storage task ended between [`Log::write`] and [`Log::finish`] (it panicked): its
    /// records, and those of every other write in flight, are cut back as after a failed
    /// sync, and the log takes writes again. Without this, a write never finished would
    /// count against [`MAX_UNSYNCED_WRITES`] for good and the log would refuse every write.
    pub fn abandon_writes(&mut self) {
        self.failed();
    }

    /// After a failed write or sync: nothing past the last appended record may stay, and the
    /// writes in flight are void.
    fn failed(&mut self) {
        self.epoch += 1;
        self.unsynced = 0;
        self.written_records = 0;
        self.poisoned = true;
        if let Err(e) = self.repair() {
            tracing::warn!(log = %self.dir.display(), error = %e, "cannot cut back a failed append yet");
        }
    }

    /// Truncates the last segment to its last acknowledged record (dropping what a failed
    /// append left) and makes that durable; clears the poisoned state on success.
    fn repair(&mut self) -> Result<(), LogError> {
        let seg = self.segments.last().ok_or(LogError::Poisoned)?;
        seg.file.set_len(seg.len)?;
        seg.file.sync_all()?;
        self.poisoned = false;
        Ok(())
    }

    fn write_inner(&mut self, entries: &[RecordParts]) -> Result<Unsynced, LogError> {
        // A roll waits for the unsynced writes: they belong to the last segment.
        if self.unsynced == 0
            && self
                .segments
                .last()
                .is_some_and(|s| s.len >= self.segment_bytes)
        {
            let base = self.next_entry_id();
            if let Some(old) = self.segments.last() {
                old.file.sync_all()?;
            }
            self.segments.push(create_segment(&self.dir, base)?);
        }
        let seg = self.segments.last_mut().ok_or(LogError::Poisoned)?;
        let (start, before) = if self.written_records > 0 {
            (self.written_end, self.written_records)
        } else {
            (seg.len, 0)
        };
        // Headers and small records are gathered into `buf`; large bodies are written from
        // where they are, so a batch's bytes are copied once, by the kernel.
        let gathered: usize = entries
            .iter()
            .map(|e| {
                HEADER
                    + e.head.len()
                    + if e.body.len() < GATHER_BYTES {
                        e.body.len()
                    } else {
                        0
                    }
            })
            .sum();
        let mut buf = Vec::with_capacity(gathered);
        let mut pieces: Vec<(usize, usize, Option<&[u8]>)> = Vec::new();
        let mut offsets = Vec::with_capacity(entries.len());
        let mut pos = start;
        let mut run_start = 0;
        for e in entries {
            offsets.push(pos);
            // MAX_ENTRY_BYTES < u32::MAX, checked by the caller.
            buf.extend_from_slice(&(e.len() as u32).to_be_bytes());
            buf.extend_from_slice(&e.crc().to_be_bytes());
            buf.extend_from_slice(e.head);
            if e.body.len() < GATHER_BYTES {
                buf.extend_from_slice(e.body);
            } else {
                pieces.push((run_start, buf.len(), Some(e.body)));
                run_start = buf.len();
            }
            pos += (e.len() + HEADER) as u64;
        }
        pieces.push((run_start, buf.len(), None));
        let mut slices: Vec<IoSlice> = Vec::with_capacity(pieces.len() * 2);
        for (from, to, body) in pieces {
            if let Some(run) = buf.get(from..to).filter(|r| !r.is_empty()) {
                slices.push(IoSlice::new(run));
            }
            if let Some(body) = body {
                slices.push(IoSlice::new(body));
            }
        }
        write_all_vectored_at(&seg.file, &mut slices, start)?;
        self.written_end = pos;
        self.written_records = before + offsets.len() as u64;
        Ok(Unsynced {
            file: seg.file.clone(),
            epoch: self.epoch,
            base: seg.base,
            first: seg.base + seg.offsets.len() as u64 + before,
            offsets,
            start,
            end: pos,
        })
    }

    /// Reads entry `id`, verifying its checksum.
    pub fn read(&self, id: u64) -> Result<Vec<u8>, LogError> {
        let idx = self.segments.partition_point(|s| s.base <= id);
        let seg = idx
            .checked_sub(1)
            .and_then(|i| self.segments.get(i))
            .ok_or(LogError::NoSuchEntry(id))?;
        let offset = usize::try_from(id - seg.base)
            .ok()
            .and_then(|i| seg.offsets.get(i))
            .copied()
            .ok_or(LogError::NoSuchEntry(id))?;
        let mut header = [0u8; HEADER];
        seg.file.read_exact_at(&mut header, offset)?;
        let (len, crc) = split_header(header);
        if len > MAX_ENTRY_BYTES {
            return Err(LogError::ChecksumMismatch(id));
        }
        let mut data = vec![0u8; len];
        seg.file.read_exact_at(&mut data, offset + HEADER as u64)?;
        if crc32c::crc32c(&data) != crc {
            return Err(LogError::ChecksumMismatch(id));
        }
        Ok(data)
    }

    /// Id of the oldest entry still stored.
    pub fn first_entry_id(&self) -> u64 {
        self.segments.first().map_or(0, |s| s.base)
    }

    /// The closed segments (all but the one being written): first id, end id, bytes.
    pub fn closed_segments(&self) -> Vec<(u64, u64, u64)> {
        let n = self.segments.len().saturating_sub(1);
        self.segments
            .iter()
            .take(n)
            .map(|s| (s.base, s.base + s.offsets.len() as u64, s.len))
            .collect()
    }

    /// Deletes the closed segments that hold only entries below `end`, oldest first.
    /// Returns how many were deleted.
    pub fn remove_segments_before(&mut self, end: u64) -> Result<usize, LogError> {
        let mut removed = 0;
        while self.segments.len() > 1 {
            let Some(first) = self.segments.first() else {
                break;
            };
            if first.base + first.offsets.len() as u64 > end {
                break;
            }
            fs::remove_file(segment_path(&self.dir, first.base))?;
            self.segments.remove(0);
            removed += 1;
        }
        if removed > 0 {
            sync_dir(&self.dir)?;
        }
        Ok(removed)
    }

    /// Bytes the log's segments take on disk.
    pub fn size_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.len).sum()
    }

    /// Directory holding this log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Writes all of `slices` at `offset` (`pwritev` is not in std: seek, then `writev`; the
/// log's reads are positional, so the file cursor is this function's alone).
fn write_all_vectored_at(file: &File, mut slices: &mut [IoSlice], offset: u64) -> io::Result<()> {
    let mut file = file;
    file.seek(SeekFrom::Start(offset))?;
    while !slices.is_empty() {
        match file.write_vectored(slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn split_header(h: [u8; HEADER]) -> (usize, u32) {
    let [a, b, c, d, e, f, g, i] = h;
    (
        u32::from_be_bytes([a, b, c, d]) as usize,
        u32::from_be_bytes([e, f, g, i]),
    )
}

fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}{SUFFIX}"))
}

fn create_segment(dir: &Path, base: u64) -> Result<Segment, LogError> {
    let path = segment_path(dir, base);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)?;
    file.sync_all()?;
    sync_dir(dir)?;
    Ok(Segment {
        base,
        file: Arc::new(file),
        offsets: Vec::new(),
        len: 0,
    })
}

/// Opens one segment and indexes its records; a bad record in the last segment truncates
/// the file there (torn write), anywhere else it is an error.
fn open_segment(dir: &Path, base: u64, is_last: bool) -> Result<Segment, LogError> {
    let path = segment_path(dir, base);
    let mut file = OpenOptions::new().read(true).write(true).open(&path)?;
    let file_len = file.seek(SeekFrom::End(0))?;
    file.seek(SeekFrom::Start(0))?;
    let mut reader = io::BufReader::with_capacity(1 << 20, &mut file);
    let mut offsets = Vec::new();
    let mut pos = 0u64;
    let mut data = Vec::new();
    while pos < file_len {
        let mut header = [0u8; HEADER];
        if file_len - pos < HEADER as u64 || reader.read_exact(&mut header).is_err() {
            break;
        }
        let (len, crc) = split_header(header);
        if len > MAX_ENTRY_BYTES || file_len - pos - (HEADER as u64) < len as u64 {
            break;
        }
        data.resize(len, 0);
        if reader.read_exact(&mut data).is_err() || crc32c::crc32c(&data) != crc {
            break;
        }
        offsets.push(pos);
        pos += (HEADER + len) as u64;
    }
    drop(reader);
    if pos < file_len {
        if !is_last {
            return Err(LogError::Corrupt {
                segment: path,
                offset: pos,
            });
        }
        tracing::warn!(
            segment = %path.display(),
            valid_bytes = pos,
            dropped_bytes = file_len - pos,
            "truncating torn or corrupt log tail"
        );
        file.set_len(pos)?;
        file.sync_all()?;
    }
    let _ = file.flush();
    Ok(Segment {
        base,
        file: Arc::new(file),
        offsets,
        len: pos,
    })
}

/// Makes a directory's entries (new or renamed files) durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Ends a small state file (cursor, schemas, snapshot) with the CRC32C of what is in it.
pub(crate) fn append_checksum(buf: &mut Vec<u8>) {
    let crc = crc32c::crc32c(buf);
    buf.extend_from_slice(&crc.to_be_bytes());
}

/// A small state file's contents without their checksum, if it matches (not torn or damaged).
pub(crate) fn checked_contents(bytes: &[u8]) -> Option<&[u8]> {
    let (body, crc) = bytes.split_at_checked(bytes.len().checked_sub(4)?)?;
    (crc32c::crc32c(body).to_be_bytes() == crc).then_some(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records for `write`, half in the head and half in the body.
    fn parts<'a>(records: &[&'a [u8]]) -> Vec<RecordParts<'a>> {
        records
            .iter()
            .map(|r| {
                let (head, body) = r.split_at(r.len() / 2);
                RecordParts {
                    head,
                    body,
                    body_crc: Some(crc32c::crc32c(body)),
                }
            })
            .collect()
    }

    fn entries(log: &Log) -> Vec<Vec<u8>> {
        (0..log.next_entry_id())
            .map(|i| log.read(i).unwrap())
            .collect()
    }

    #[test]
    fn append_then_reopen_keeps_every_entry() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::open(dir.path()).unwrap();
        assert_eq!(log.append(&[b"a", b"bb"]).unwrap(), 0);
        assert_eq!(log.append(&[b"ccc"]).unwrap(), 2);
        drop(log);
        let log = Log::open(dir.path()).unwrap();
        assert_eq!(log.next_entry_id(), 3);
        assert_eq!(
            entries(&log),
            vec![b"a".to_vec(), b"bb".to_vec(), b"ccc".to_vec()]
        );
    }

    #[test]
    fn torn_tail_is_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::open(dir.path()).unwrap();
        log.append(&[b"one", b"two"]).unwrap();
        drop(log);
        let path = segment_path(dir.path(), 0);
        let good_len = fs::metadata(&path).unwrap().len();
        // A crash mid-write: a header promising 100 bytes followed by only 3.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&100u32.to_be_bytes()).unwrap();
        f.write_all(&0u32.to_be_bytes()).unwrap();
        f.write_all(b"abc").unwrap();
        drop(f);
        let mut log = Log::open(dir.path()).unwrap();
        assert_eq!(log.next_entry_id(), 2);
        assert_eq!(fs::metadata(&path).unwrap().len(), good_len);
        assert_eq!(log.append(&[b"three"]).unwrap(), 2);
        drop(log);
        let log = Log::open(dir.path()).unwrap();
        assert_eq!(entries(&log).len(), 3);
        assert_eq!(log.read(2).unwrap(), b"three");
    }

    #[test]
    fn crc_mismatch_in_tail_drops_the_bad_entry_and_read_detects_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::open(dir.path()).unwrap();
        log.append(&[b"first", b"second"]).unwrap();
        let path = segment_path(dir.path(), 0);
        // Flip a byte of the second entry's data.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        let off = (HEADER + 5 + HEADER) as u64;
        f.write_all_at(b"X", off).unwrap();
        drop(f);
        // The open log notices on read...
        assert!(matches!(log.read(1), Err(LogError::ChecksumMismatch(1))));
        assert_eq!(log.read(0).unwrap(), b"first");
        drop(log);
        // ...and a reopen truncates the corrupt tail.
        let log = Log::open(dir.path()).unwrap();
        assert_eq!(log.next_entry_id(), 1);
    }

    #[test]
    fn corruption_in_an_older_segment_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::open(dir.path()).unwrap();
        log.append(&[b"a"]).unwrap();
        // Force a second segment.
        log.segments.last_mut().unwrap().len = SEGMENT_BYTES;
        log.append(&[b"b"]).unwrap();
        drop(log);
        let f = OpenOptions::new()
            .write(true)
            .open(segment_path(dir.path(), 0))
            .unwrap();
        f.write_all_at(b"Z", HEADER as u64).unwrap();
        drop(f);
        assert!(matches!(
            Log::open(dir.path()),
            Err(LogError::Corrupt { .. })
        ));
    }

    #[test]
    fn front_segments_are_removed_and_reopen_keeps_ids() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::open_with(dir.path(), 10).unwrap();
        for i in 0..5u8 {
            log.append(&[&[i; 12]]).unwrap();
        }
        assert_eq!(log.closed_segments().len(), 4);
        assert_eq!(log.remove_segments_before(2).unwrap(), 2);
        assert_eq!(log.first_entry_id(), 2);
        assert!(matches!(log.read(1), Err(LogError::NoSuchEntry(1))));
        // The segment being written is never removed.
        assert_eq!(log.remove_segments_before(100).unwrap(), 2);
        assert_eq!(log.first_entry_id(), 4);
        drop(log);
        let mut log = Log::open_with(dir.path(), 10).unwrap();
        assert_eq!((log.first_entry_id(), log.next_entry_id()), (4, 5));
        assert_eq!(log.read(4).unwrap(), vec![4u8; 12]);
        assert_eq!(log.append(&[b"next"]).unwrap(), 5);
    }

    #[test]
    fn second_write_overlaps_the_first_sync_and_a_failure_cuts_both() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::open(dir.path()).unwrap();
        let a = log.write(&parts(&[b"a1", b"a2"])).unwrap();
        let b = log.write(&parts(&[b"b1"])).unwrap();
        assert!(matches!(
            log.write(&parts(&[b"c"])),
            Err(LogError::WriteInFlight)
        ));
        // Not appended (nor readable) before `finish`.
        assert_eq!(log.next_entry_id(), 0);
        let (sa, sb) = (a.sync(), b.sync());
        assert_eq!(log.finish(a, sa).unwrap(), 0);
        assert_eq!(log.finish(b, sb).unwrap(), 2);
        assert_eq!(
            entries(&log),
            vec![b"a1".to_vec(), b"a2".to_vec(), b"b1".to_vec()]
        );

        let c = log.write(&parts(&[b"c1"])).unwrap();
        let d = log.write(&parts(&[b"d1"])).unwrap();
        let failed = io::Error::other("sync failed");
        assert!(matches!(log.finish(c, Err(failed)), Err(LogError::Io(_))));
        // The later write went with it, and the log takes writes again at once.
        let e = log.write(&parts(&[b"e1"])).unwrap();
        let synced = d.sync();
        assert!(matches!(log.finish(d, synced), Err(LogError::CutBack)));
        let synced = e.sync();
        assert_eq!(log.finish(e, synced).unwrap(), 3);
        drop(log);
        let log = Log::open(dir.path()).unwrap();
        assert_eq!(log.next_entry_id(), 4);
        assert_eq!(log.read(3).unwrap(), b"e1");
    }

    #[test]
    fn writes_abandoned_by_a_dead_task_are_cut_back_and_the_log_takes_writes_again() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::open(dir.path()).unwrap();
        let a = log.write(&parts(&[b"a"])).unwrap();
        let synced = a.sync();
        assert_eq!(log.finish(a, synced).unwrap(), 0);
        // Two writes whose task dies before `finish` (their `Unsynced` dropped or late).
        let b = log.write(&parts(&[b"b"])).unwrap();
        let c = log.write(&parts(&[b"c"])).unwrap();
        assert!(matches!(
            log.write(&parts(&[b"d"])),
            Err(LogError::WriteInFlight)
        ));
        log.abandon_writes();
        let d = log.write(&parts(&[b"d"])).unwrap();
        let e = log.write(&parts(&[b"e"])).unwrap();
        drop(b);
        let synced = c.sync();
        assert!(matches!(log.finish(c, synced), Err(LogError::CutBack)));
        // A void write's late `finish` frees no slot: `d` and `e` still hold both.
        assert!(matches!(
            log.write(&parts(&[b"f"])),
            Err(LogError::WriteInFlight)
        ));
        let (sd, se) = (d.sync(), e.sync());
        assert_eq!(log.finish(d, sd).unwrap(), 1);
        assert_eq!(log.finish(e, se).unwrap(), 2);
        drop(log);
        let log = Log::open(dir.path()).unwrap();
        assert_eq!(
            entries(&log),
            vec![b"a".to_vec(), b"d".to_vec(), b"e".to_vec()]
        );
    }

    #[test]
    fn large_bodies_written_in_place_keep_their_checksums() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::open(dir.path()).unwrap();
        let big: Vec<u8> = (0..3 * GATHER_BYTES).map(|i| i as u8).collect();
        let other = vec![7u8; GATHER_BYTES];
        let small = b"small".to_vec();
        let records = [&big[..], &small[..], &other[..], &big[..]];
        let unsynced = log.write(&parts(&records)).unwrap();
        let synced = unsynced.sync();
        assert_eq!(log.finish(unsynced, synced).unwrap(), 0);
        drop(log);
        // Reopening checks every record's CRC32C.
        let log = Log::open(dir.path()).unwrap();
        assert_eq!(entries(&log), records.map(|r| r.to_vec()).to_vec());
    }

    #[test]
    fn derived_record_checksum_is_the_checksum_of_the_bytes() {
        let data: Vec<u8> = (0..300_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for (head_len, body_len) in [
            (0, 0),
            (18, 1),
            (18, GATHER_BYTES),
            (5, 104_017),
            (18, 299_982),
        ] {
            let (head, rest) = data.split_at(head_len);
            let body = &rest[..body_len];
            let whole = crc32c::crc32c(&data[..head_len + body_len]);
            assert_eq!(
                crc32c_concat(crc32c::crc32c(head), crc32c::crc32c(body), body_len),
                whole
            );
            let parts = RecordParts {
                head,
                body,
                body_crc: Some(crc32c::crc32c(body)),
            };
            assert_eq!(parts.crc(), whole);
        }
    }

    #[test]
    fn oversized_entry_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::open(dir.path()).unwrap();
        let big = vec![0u8; MAX_ENTRY_BYTES + 1];
        assert!(matches!(
            log.append(&[&big]),
            Err(LogError::EntryTooLarge(_))
        ));
        assert_eq!(log.append(&[b"ok"]).unwrap(), 0);
    }
}
