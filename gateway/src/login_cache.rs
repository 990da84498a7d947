//! A bounded cache of recently verified password logins, so that a fleet reconnecting at
//! once (a gateway restart, a site's network coming back) does not pay an argon2id
//! verification per device.
//!
//! Why: a password is stored as an argon2id hash that costs ~20 ms of CPU to check, on
//! purpose (an offline guess costs the attacker as much). 10,000 devices logging in at once
//! would need 200 s of one core. The cache remembers, per user, a *tag* of the last password
//! that verified, `HMAC-SHA256(key, user ‖ password)`, bound to the stored hash it verified
//! against (`HMAC-SHA256(key, hash)`). A login whose tag matches a fresh entry bound to the
//! user's current hash is accepted without argon2 (a microsecond); anything else goes the
//! slow way.
//!
//! Guarantees:
//! - The password is never kept, only the tag, and the tag is worthless without the key.
//! - An entry is bound to the stored argon2 hash, so a changed password (a new hash) misses
//!   the cache at once. When a user is stored again ([`LoginCache::rebind`]: the config loaded
//!   at a restart, where a plain password gets a new salt; an admin API change), the entry
//!   follows the new hash only if the new plain password is the cached one, or the hash is
//!   unchanged; otherwise it is dropped. The caller checks the directory before the cache, so
//!   a deleted user is refused whatever the cache holds.
//! - Entries expire `ttl` after the verification that made them (not after their last use:
//!   a device that keeps reconnecting still re-proves its password against argon2 once per
//!   `ttl`).
//! - At most `capacity` entries; when full, the oldest verification is dropped.
//! - Tags are compared in constant time.
//!
//! Persistence: [`LoginCache::save`] writes the entries (user, tag, time) to a file beside a
//! check value of the key, and [`LoginCache::load`] reads back the unexpired ones if the key is
//! the same, so the storm right after a restart is served from the cache too. The key is a
//! separate secret (`auth.login_cache_key_file`, or generated in `data_dir/auth`); what an
//! attacker holding the file, the key or the process memory can do is in `docs/tenancy.md`.
//! A gateway killed with `kill -9` loses the entries made since the last save: those devices
//! pay argon2 once more, nothing else.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};

use crate::secret::{constant_time_eq, write_private};
use sha2::Sha256;

/// The tag of a verified login.
type Tag = [u8; 32];

/// First line of the cache file: its format, then the key's check value.
const FILE_HEADER: &str = "magnetar-login-cache-v2";

/// A cached verification.
#[derive(Debug, Clone, Copy)]
struct Entry {
    tag: Tag,
    /// The stored hash the password verified against, as [`LoginCache::hash_id`].
    hash_id: Tag,
    /// When the password was verified against argon2, seconds since the Unix epoch.
    verified_at: u64,
}

/// Recently verified password logins. See the module docs.
pub struct LoginCache {
    key: [u8; 32],
    ttl: Duration,
    capacity: usize,
    entries: Mutex<HashMap<String, Entry>>,
}

impl std::fmt::Debug for LoginCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginCache")
            .field("ttl", &self.ttl)
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl LoginCache {
    /// An empty cache; `capacity` 0 or `ttl` zero turn it off (every login verifies).
    pub fn new(key: [u8; 32], ttl: Duration, capacity: usize) -> LoginCache {
        LoginCache {
            key,
            ttl,
            capacity,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn enabled(&self) -> bool {
        self.capacity > 0 && !self.ttl.is_zero()
    }

    fn mac(&self) -> Hmac<Sha256> {
        // An HMAC key of any length is accepted; this cannot fail.
        <Hmac<Sha256> as Mac>::new_from_slice(&self.key)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"))
    }

    /// The tag of `password` for `user`. Lengths are part of the input, so no two (user,
    /// password) pairs share their bytes; a domain byte keeps tags apart from hash ids.
    fn tag(&self, user: &str, password: &[u8]) -> Tag {
        let mut mac = self.mac();
        mac.update(b"t");
        for part in [user.as_bytes(), password] {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part);
        }
        mac.finalize().into_bytes().into()
    }

    /// What identifies a stored hash in an entry.
    fn hash_id(&self, stored_hash: &str) -> Tag {
        let mut mac = self.mac();
        mac.update(b"h");
        mac.update(stored_hash.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// A value that identifies the key without revealing it, written in the file so that a
    /// cache saved under another key is ignored.
    fn key_check(&self) -> String {
        let mut mac = self.mac();
        mac.update(b"magnetar login cache key check");
        hex(&mac.finalize().into_bytes())
    }

    fn fresh(&self, e: &Entry, now: u64) -> bool {
        now >= e.verified_at && now - e.verified_at < self.ttl.as_secs().max(1)
    }

    /// Whether `password` verified for `user` (with this stored hash) within the last `ttl`.
    pub fn check(&self, user: &str, stored_hash: &str, password: &[u8]) -> bool {
        self.check_at(user, stored_hash, password, unix_now())
    }

    fn check_at(&self, user: &str, stored_hash: &str, password: &[u8], now: u64) -> bool {
        if !self.enabled() {
            return false;
        }
        let tag = self.tag(user, password);
        let hash_id = self.hash_id(stored_hash);
        let mut entries = self.lock();
        match entries.get(user) {
            Some(e) if self.fresh(e, now) => e.hash_id == hash_id && constant_time_eq(&e.tag, &tag),
            Some(_) => {
                entries.remove(user);
                false
            }
            None => false,
        }
    }

    /// Records that `password` just verified against `stored_hash` for `user`.
    pub fn insert(&self, user: &str, stored_hash: &str, password: &[u8]) {
        self.insert_at(user, stored_hash, password, unix_now());
    }

    fn insert_at(&self, user: &str, stored_hash: &str, password: &[u8], now: u64) {
        if !self.enabled() {
            return;
        }
        let entry = Entry {
            tag: self.tag(user, password),
            hash_id: self.hash_id(stored_hash),
            verified_at: now,
        };
        let mut entries = self.lock();
        if entries.len() >= self.capacity && !entries.contains_key(user) {
            entries.retain(|_, e| self.fresh(e, now));
            if entries.len() >= self.capacity {
                let oldest = entries
                    .iter()
                    .min_by_key(|(_, e)| e.verified_at)
                    .map(|(u, _)| u.clone());
                if let Some(u) = oldest {
                    entries.remove(&u);
                }
            }
        }
        entries.insert(user.to_string(), entry);
    }

    /// `user` is stored again with `new_hash` (from `plain`, when the config or the admin
    /// API gave the password itself): the entry follows the new hash if `plain` is the cached
    /// password or the hash did not change, and is dropped otherwise.
    pub fn rebind(&self, user: &str, new_hash: &str, plain: Option<&[u8]>) {
        let new_id = self.hash_id(new_hash);
        let same_password = plain.map(|p| self.tag(user, p));
        let mut entries = self.lock();
        let Some(e) = entries.get_mut(user) else {
            return;
        };
        let keep = match same_password {
            Some(tag) => !new_hash.is_empty() && constant_time_eq(&e.tag, &tag),
            None => e.hash_id == new_id,
        };
        if keep {
            e.hash_id = new_id;
        } else {
            entries.remove(user);
        }
    }

    /// Drops what is cached for `user` (deleted through the admin API).
    pub fn forget(&self, user: &str) {
        self.lock().remove(user);
    }

    /// Drops everything.
    pub fn clear(&self) {
        self.lock().clear();
    }

    /// Entries held now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes the unexpired entries to `path` (atomically: a temporary file renamed over it,
    /// readable by the owner only).
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let now = unix_now();
        let mut text = format!("{FILE_HEADER} {}\n", self.key_check());
        for (user, e) in self.lock().iter().filter(|(_, e)| self.fresh(e, now)) {
            // User names are validated segments (no whitespace), so a space separates.
            text.push_str(&format!(
                "{} {} {} {user}\n",
                hex(&e.tag),
                hex(&e.hash_id),
                e.verified_at
            ));
        }
        let tmp = path.with_extension("tmp");
        write_private(&tmp, text.as_bytes())?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }

    /// Reads back what [`LoginCache::save`] wrote, if it was written under the same key;
    /// expired and malformed lines are skipped. Returns how many entries were loaded.
    pub fn load(&self, path: &Path) -> std::io::Result<usize> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        let mut lines = text.lines();
        let expected = format!("{FILE_HEADER} {}", self.key_check());
        if lines.next() != Some(expected.as_str()) || !self.enabled() {
            return Ok(0);
        }
        let now = unix_now();
        let mut entries = self.lock();
        let mut loaded = 0;
        for line in lines {
            let mut parts = line.splitn(4, ' ');
            let (Some(tag), Some(hash_id), Some(at), Some(user)) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let (Some(tag), Some(hash_id), Ok(verified_at)) =
                (unhex32(tag), unhex32(hash_id), at.parse::<u64>())
            else {
                continue;
            };
            let e = Entry {
                tag,
                hash_id,
                verified_at,
            };
            if self.fresh(&e, now) && entries.len() < self.capacity {
                entries.insert(user.to_string(), e);
                loaded += 1;
            }
        }
        Ok(loaded)
    }
}

/// Loads the cache key from `path`, generating it (owner-only) on first use.
pub fn load_or_create_key(path: &Path) -> std::io::Result<[u8; 32]> {
    match std::fs::read(path) {
        Ok(bytes) => bytes.as_slice().try_into().map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} must hold exactly 32 bytes", path.display()),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut key = [0u8; 32];
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut key);
            write_private(path, &key)?;
            Ok(key)
        }
        Err(e) => Err(e),
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn unhex32(s: &str) -> Option<Tag> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA";

    fn cache() -> LoginCache {
        LoginCache::new([7; 32], Duration::from_secs(60), 3)
    }

    #[test]
    fn only_the_verified_password_hits() {
        let c = cache();
        assert!(!c.check_at("alice", HASH, b"secret", 100));
        c.insert_at("alice", HASH, b"secret", 100);
        assert!(c.check_at("alice", HASH, b"secret", 101));
        assert!(!c.check_at("alice", HASH, b"secreT", 101));
        assert!(!c.check_at("alice", HASH, b"secret\0", 101));
        assert!(!c.check_at("alice", HASH, b"", 101));
        assert!(!c.check_at("bob", HASH, b"secret", 101));
    }

    #[test]
    fn a_new_stored_hash_misses() {
        let c = cache();
        c.insert_at("alice", HASH, b"secret", 100);
        let rehashed = "$argon2id$v=19$m=19456,t=2,p=1$b3RoZXI$aGFzaA";
        assert!(!c.check_at("alice", rehashed, b"secret", 101));
    }

    #[test]
    fn a_user_stored_again_keeps_its_entry_only_with_the_same_password_or_hash() {
        let c = cache();
        let rehashed = "$argon2id$v=19$m=19456,t=2,p=1$b3RoZXI$aGFzaA";
        // A restart re-hashes the config's plain password with a new salt: kept.
        c.insert_at("alice", HASH, b"secret", 100);
        c.rebind("alice", rehashed, Some(b"secret"));
        assert!(c.check_at("alice", rehashed, b"secret", 101));
        // Stored again with the same hash (no plain password): kept.
        c.rebind("alice", rehashed, None);
        assert!(c.check_at("alice", rehashed, b"secret", 101));
        // Another password: dropped.
        c.rebind("alice", HASH, Some(b"changed"));
        assert!(!c.check_at("alice", HASH, b"secret", 101));
        // Another hash without a plain password: dropped.
        c.insert_at("alice", HASH, b"secret", 100);
        c.rebind("alice", rehashed, None);
        assert!(!c.check_at("alice", rehashed, b"secret", 101));
        // Token-only now: dropped.
        c.insert_at("alice", HASH, b"secret", 100);
        c.rebind("alice", "", Some(b"secret"));
        assert!(!c.check_at("alice", HASH, b"secret", 101));
    }

    #[test]
    fn entries_expire_ttl_after_verification() {
        let c = cache();
        c.insert_at("alice", HASH, b"secret", 100);
        assert!(c.check_at("alice", HASH, b"secret", 159));
        assert!(!c.check_at("alice", HASH, b"secret", 160));
        assert!(c.is_empty(), "an expired entry is dropped when met");
        // A clock that went backwards does not make an entry valid for longer.
        c.insert_at("alice", HASH, b"secret", 100);
        assert!(!c.check_at("alice", HASH, b"secret", 99));
    }

    #[test]
    fn forget_and_capacity() {
        let c = cache();
        c.insert_at("alice", HASH, b"a", 100);
        c.forget("alice");
        assert!(!c.check_at("alice", HASH, b"a", 100));
        for (i, u) in ["u1", "u2", "u3", "u4"].iter().enumerate() {
            c.insert_at(u, HASH, b"p", 100 + i as u64);
        }
        assert_eq!(c.len(), 3);
        assert!(!c.check_at("u1", HASH, b"p", 104), "the oldest was dropped");
        assert!(c.check_at("u4", HASH, b"p", 104));
    }

    #[test]
    fn off_when_ttl_or_capacity_is_zero() {
        let c = LoginCache::new([7; 32], Duration::ZERO, 10);
        c.insert("alice", HASH, b"secret");
        assert!(!c.check("alice", HASH, b"secret"));
        let c = LoginCache::new([7; 32], Duration::from_secs(60), 0);
        c.insert("alice", HASH, b"secret");
        assert!(!c.check("alice", HASH, b"secret"));
    }

    #[test]
    fn saved_entries_come_back_under_the_same_key_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("login-cache");
        let c = cache();
        c.insert("alice", HASH, b"secret");
        c.save(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("secret"), "no password in the file");

        let same = cache();
        assert_eq!(same.load(&path).unwrap(), 1);
        assert!(same.check("alice", HASH, b"secret"));
        assert!(!same.check("alice", HASH, b"other"));

        let other = LoginCache::new([8; 32], Duration::from_secs(60), 3);
        assert_eq!(other.load(&path).unwrap(), 0);
        assert!(!other.check("alice", HASH, b"secret"));
    }

    #[test]
    fn a_damaged_file_loads_what_it_can() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("login-cache");
        let c = cache();
        c.insert("alice", HASH, b"secret");
        c.save(&path).unwrap();
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("zz 1 mallory\nnot a line\n");
        std::fs::write(&path, text).unwrap();
        let again = cache();
        assert_eq!(again.load(&path).unwrap(), 1);
        assert_eq!(cache().load(&dir.path().join("absent")).unwrap(), 0);
    }
}
