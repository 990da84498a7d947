//! Encryption at rest: every payload of an encrypting tenant is sealed by the host before it
//! reaches the backend, and opened on delivery. Plugins never see a key; Pulsar, its disks
//! and its operators see only ciphertext.
//!
//! Envelope encryption:
//! - a *master key* (32 bytes, from an environment variable or a file, or generated once in
//!   `data_dir/keys/master.key`) wraps
//! - each tenant's *data keys* (AES-256-GCM, random), kept wrapped in
//!   `data_dir/keys/tenants/<tenant>.json` with the id of the active one.
//!
//! A sealed payload is `nonce (12 bytes) ‖ ciphertext ‖ tag`, with the tenant name as
//! associated data (a payload copied into another tenant's topic does not open), and the
//! message carries property [`KEY_PROPERTY`] = `aes256gcm:<key id>`. Rotation makes a new key
//! active and keeps the old ones, so old messages still open. Shredding deletes every key of
//! the tenant: what was sealed with them can never be opened again, wherever copies went.
//!
//! A tenant with `pulsar_encryption` (an RSA key pair) gets Pulsar's own end-to-end format
//! instead ([`PulsarE2e`]): `MessageMetadata.encryption_keys` / `encryption_param`, which the
//! official clients decrypt with a `CryptoKeyReader` holding the tenant's private key. The
//! `pulsar` crate cannot set those fields through its public API; the vendored copy in
//! `third_party/pulsar` adds them to `producer::Message` (see its README).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use base64::Engine;
use rand::RngCore;

use crate::config::EncryptionSection;

/// The message property naming the algorithm and data key of a sealed payload.
pub const KEY_PROPERTY: &str = "magnetar.enc";
const ALGORITHM: &str = "aes256gcm";
const NONCE_LEN: usize = 12;

/// What can go wrong with keys or sealed data.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("master key: {0}")]
    MasterKey(String),
    #[error("key store {path}: {source}")]
    Store {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("key store {path} is damaged: {message}")]
    Damaged { path: PathBuf, message: String },
    #[error("tenant {tenant} has no data key {key_id} (rotated away or shredded)")]
    NoKey { tenant: String, key_id: String },
    #[error("payload does not open: wrong key, wrong tenant or damaged")]
    Open,
    #[error("unknown encryption {0:?}")]
    Unknown(String),
}

/// On-disk form of a tenant's keys.
#[derive(serde::Serialize, serde::Deserialize, Default)]
struct StoredKeys {
    active: String,
    /// key id → base64(nonce ‖ data key sealed by the master key).
    keys: HashMap<String, String>,
}

/// A tenant's unwrapped data keys.
#[derive(Clone)]
struct TenantKeys {
    active: String,
    keys: HashMap<String, Arc<Aes256Gcm>>,
}

/// The master key and every tenant's data keys.
pub struct KeyRing {
    master: Aes256Gcm,
    dir: PathBuf,
    tenants: RwLock<HashMap<String, TenantKeys>>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRing")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn parse_key(bytes: &[u8]) -> Option<[u8; 32]> {
    if let Ok(k) = <[u8; 32]>::try_from(bytes) {
        return Some(k);
    }
    let text = std::str::from_utf8(bytes).ok()?.trim();
    if text.len() != 64 {
        return None;
    }
    let mut k = [0u8; 32];
    for (i, b) in k.iter_mut().enumerate() {
        *b = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(k)
}

fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b
}

impl KeyRing {
    /// Loads the master key (env, file, or generated in `data_dir/keys`) and opens the store.
    pub fn load(section: &EncryptionSection, data_dir: &Path) -> Result<KeyRing, CryptoError> {
        let dir = data_dir.join("keys");
        let master = if let Some(var) = &section.master_key_env {
            let value = std::env::var(var).map_err(|_| {
                CryptoError::MasterKey(format!("environment variable {var} is not set"))
            })?;
            parse_key(value.as_bytes())
                .ok_or_else(|| CryptoError::MasterKey(format!("{var} must hold 64 hex digits")))?
        } else {
            let (path, generate) = match &section.master_key_file {
                Some(p) => (p.clone(), false),
                None => (dir.join("master.key"), true),
            };
            match std::fs::read(&path) {
                Ok(bytes) => parse_key(&bytes).ok_or_else(|| {
                    CryptoError::MasterKey(format!(
                        "{} must hold 32 bytes or 64 hex digits",
                        path.display()
                    ))
                })?,
                Err(e) if generate && e.kind() == std::io::ErrorKind::NotFound => {
                    let key = random::<32>();
                    crate::secret::write_private(&path, &key).map_err(|source| {
                        CryptoError::Store {
                            path: path.clone(),
                            source,
                        }
                    })?;
                    tracing::warn!(path = %path.display(), "generated a master key; keep it apart from the data in production (encryption.master_key_file or master_key_env)");
                    key
                }
                Err(source) => return Err(CryptoError::Store { path, source }),
            }
        };
        Ok(KeyRing {
            master: Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&master)),
            dir,
            tenants: RwLock::new(HashMap::new()),
        })
    }

    fn store_path(&self, tenant: &str) -> PathBuf {
        self.dir.join("tenants").join(format!("{tenant}.json"))
    }

    fn read_store(&self, tenant: &str) -> Result<Option<StoredKeys>, CryptoError> {
        let path = self.store_path(tenant);
        match std::fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| CryptoError::Damaged {
                        path,
                        message: e.to_string(),
                    })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(CryptoError::Store { path, source }),
        }
    }

    fn write_store(&self, tenant: &str, stored: &StoredKeys) -> Result<(), CryptoError> {
        let path = self.store_path(tenant);
        let json = serde_json::to_vec_pretty(stored).map_err(|e| CryptoError::Damaged {
            path: path.clone(),
            message: e.to_string(),
        })?;
        crate::secret::write_private(&path, &json)
            .map_err(|source| CryptoError::Store { path, source })
    }

    fn unwrap_key(&self, tenant: &str, id: &str, wrapped: &str) -> Result<Aes256Gcm, CryptoError> {
        let damaged = |message: &str| CryptoError::Damaged {
            path: self.store_path(tenant),
            message: format!("key {id}: {message}"),
        };
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(wrapped)
            .map_err(|_| damaged("not base64"))?;
        if bytes.len() < NONCE_LEN {
            return Err(damaged("too short"));
        }
        let (nonce, sealed) = bytes.split_at(NONCE_LEN);
        let aad = format!("{tenant}/{id}");
        let key = self
            .master
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| damaged("does not open with this master key"))?;
        Aes256Gcm::new_from_slice(&key).map_err(|_| damaged("wrong length"))
    }

    fn wrap_key(&self, tenant: &str, id: &str, key: &[u8; 32]) -> Result<String, CryptoError> {
        let nonce = random::<NONCE_LEN>();
        let aad = format!("{tenant}/{id}");
        let sealed = self
            .master
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: key,
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| CryptoError::MasterKey("sealing a data key failed".into()))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        Ok(base64::engine::general_purpose::STANDARD.encode(out))
    }

    /// The tenant's keys, loaded from the store (and created there if `create`).
    fn keys(&self, tenant: &str, create: bool) -> Result<Option<TenantKeys>, CryptoError> {
        if let Some(k) = self
            .tenants
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(tenant)
        {
            return Ok(Some(k.clone()));
        }
        let mut tenants = self.tenants.write().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = tenants.get(tenant) {
            return Ok(Some(k.clone()));
        }
        let stored = match self.read_store(tenant)? {
            Some(s) => s,
            None if create => {
                let stored = self.new_key(tenant, StoredKeys::default())?;
                self.write_store(tenant, &stored)?;
                stored
            }
            None => return Ok(None),
        };
        let mut keys = HashMap::new();
        for (id, wrapped) in &stored.keys {
            keys.insert(id.clone(), Arc::new(self.unwrap_key(tenant, id, wrapped)?));
        }
        let loaded = TenantKeys {
            active: stored.active,
            keys,
        };
        tenants.insert(tenant.to_string(), loaded.clone());
        Ok(Some(loaded))
    }

    fn new_key(&self, tenant: &str, mut stored: StoredKeys) -> Result<StoredKeys, CryptoError> {
        let id: String = random::<8>().iter().map(|b| format!("{b:02x}")).collect();
        let wrapped = self.wrap_key(tenant, &id, &random::<32>())?;
        stored.keys.insert(id.clone(), wrapped);
        stored.active = id;
        Ok(stored)
    }

    /// Seals a payload with the tenant's active key; returns it and the property value.
    pub fn seal(&self, tenant: &str, payload: &[u8]) -> Result<(Vec<u8>, String), CryptoError> {
        let keys = self.keys(tenant, true)?.ok_or_else(|| CryptoError::NoKey {
            tenant: tenant.into(),
            key_id: "(active)".into(),
        })?;
        let cipher = keys
            .keys
            .get(&keys.active)
            .ok_or_else(|| CryptoError::NoKey {
                tenant: tenant.into(),
                key_id: keys.active.clone(),
            })?;
        let nonce = random::<NONCE_LEN>();
        let sealed = cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: payload,
                    aad: tenant.as_bytes(),
                },
            )
            .map_err(|_| CryptoError::Open)?;
        let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok((out, format!("{ALGORITHM}:{}", keys.active)))
    }

    /// Opens a payload sealed by [`seal`](Self::seal); `property` is its [`KEY_PROPERTY`].
    pub fn open(
        &self,
        tenant: &str,
        property: &str,
        sealed: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        let key_id = property
            .strip_prefix(ALGORITHM)
            .and_then(|r| r.strip_prefix(':'))
            .ok_or_else(|| CryptoError::Unknown(property.to_string()))?;
        let no_key = || CryptoError::NoKey {
            tenant: tenant.into(),
            key_id: key_id.into(),
        };
        let keys = self.keys(tenant, false)?.ok_or_else(no_key)?;
        let cipher = keys.keys.get(key_id).ok_or_else(no_key)?;
        if sealed.len() < NONCE_LEN {
            return Err(CryptoError::Open);
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: body,
                    aad: tenant.as_bytes(),
                },
            )
            .map_err(|_| CryptoError::Open)
    }

    /// Makes a new data key active; older keys still open older messages. Returns its id.
    pub fn rotate(&self, tenant: &str) -> Result<String, CryptoError> {
        let mut tenants = self.tenants.write().unwrap_or_else(|p| p.into_inner());
        let stored = self.read_store(tenant)?.unwrap_or_default();
        let stored = self.new_key(tenant, stored)?;
        self.write_store(tenant, &stored)?;
        tenants.remove(tenant);
        Ok(stored.active)
    }

    /// Deletes every data key of the tenant: its sealed data can never be opened again.
    pub fn shred(&self, tenant: &str) -> Result<(), CryptoError> {
        let mut tenants = self.tenants.write().unwrap_or_else(|p| p.into_inner());
        tenants.remove(tenant);
        let path = self.store_path(tenant);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(CryptoError::Store { path, source }),
        }?;
        tenants.remove(tenant);
        // A shredded tenant that publishes again gets a fresh random key, never the old one.
        Ok(())
    }

    /// Ids of the tenant's keys and the active one.
    pub fn key_ids(&self, tenant: &str) -> Result<(Option<String>, Vec<String>), CryptoError> {
        let stored = self.read_store(tenant)?;
        Ok(match stored {
            Some(s) => {
                let mut ids: Vec<_> = s.keys.keys().cloned().collect();
                ids.sort();
                (Some(s.active), ids)
            }
            None => (None, Vec::new()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(dir: &Path) -> KeyRing {
        KeyRing::load(&EncryptionSection::default(), dir).unwrap()
    }

    #[test]
    fn seal_open_rotate_shred() {
        let dir = tempfile::tempdir().unwrap();
        let r = ring(dir.path());
        let (a, prop_a) = r.seal("acme", b"known plaintext").unwrap();
        assert!(!a.windows(5).any(|w| w == b"known"));
        assert_eq!(r.open("acme", &prop_a, &a).unwrap(), b"known plaintext");
        // Another tenant's key or name does not open it.
        assert!(r.open("globex", &prop_a, &a).is_err());
        let mut tampered = a.clone();
        tampered[20] ^= 1;
        assert!(r.open("acme", &prop_a, &tampered).is_err());

        let new_id = r.rotate("acme").unwrap();
        let (b, prop_b) = r.seal("acme", b"after rotation").unwrap();
        assert!(prop_b.ends_with(&new_id));
        assert_ne!(prop_a, prop_b);
        // A restarted gateway (same master key, same store) opens both.
        let r2 = ring(dir.path());
        assert_eq!(r2.open("acme", &prop_a, &a).unwrap(), b"known plaintext");
        assert_eq!(r2.open("acme", &prop_b, &b).unwrap(), b"after rotation");

        r2.shred("acme").unwrap();
        assert!(matches!(
            r2.open("acme", &prop_a, &a),
            Err(CryptoError::NoKey { .. })
        ));
        let r3 = ring(dir.path());
        assert!(r3.open("acme", &prop_b, &b).is_err());
    }

    #[test]
    fn wrong_master_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let r = ring(dir.path());
        let (a, prop) = r.seal("acme", b"x").unwrap();
        std::fs::write(dir.path().join("keys/master.key"), [7u8; 32]).unwrap();
        let r2 = ring(dir.path());
        assert!(r2.open("acme", &prop, &a).is_err());
    }
}

/// Pulsar's end-to-end encryption format, as the official clients write and read it
/// (`MessageCrypto` of the C++ client): a 32-byte AES-256-GCM data key, encrypted for each
/// key name with RSA-OAEP (SHA-1, MGF1-SHA-1) into `MessageMetadata.encryption_keys`; a
/// 12-byte IV in `encryption_param`; the payload is `ciphertext ‖ 16-byte tag`, without
/// associated data. Like the official producer, a data key serves many messages and is
/// replaced every [`E2E_KEY_LIFETIME`]; like the official consumer, decrypted data keys are
/// cached by their encrypted form, so the RSA private-key operation runs once per data key.
pub struct PulsarE2e {
    key_name: String,
    public: rsa::RsaPublicKey,
    private: rsa::RsaPrivateKey,
    /// The current data key, its encrypted form, and when it was made.
    current: std::sync::Mutex<Option<DataKey>>,
    /// Encrypted data key → data key.
    opened: std::sync::Mutex<HashMap<Vec<u8>, [u8; 32]>>,
}

/// A Pulsar-format data key in use, with its RSA-encrypted form.
struct DataKey {
    made: std::time::Instant,
    key: [u8; 32],
    wrapped: Vec<u8>,
}

/// How long one Pulsar-format data key is used (the official clients use 4 hours).
pub const E2E_KEY_LIFETIME: std::time::Duration = std::time::Duration::from_secs(4 * 3600);

impl std::fmt::Debug for PulsarE2e {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PulsarE2e")
            .field("key_name", &self.key_name)
            .finish_non_exhaustive()
    }
}

/// A payload sealed in Pulsar's format: what goes into the message and its metadata.
#[derive(Debug, Clone, Default)]
pub struct PulsarSealed {
    pub payload: Vec<u8>,
    pub encryption_keys: Vec<pulsar::proto::EncryptionKeys>,
    pub encryption_param: Vec<u8>,
}

impl PulsarE2e {
    /// Loads the tenant's key pair.
    pub fn load(cfg: &crate::config::PulsarEncryptionConfig) -> Result<PulsarE2e, CryptoError> {
        use rsa::pkcs1::DecodeRsaPrivateKey;
        use rsa::pkcs8::{DecodePrivateKey, DecodePublicKey};
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|source| CryptoError::Store {
                path: p.to_path_buf(),
                source,
            })
        };
        let bad = |p: &Path, e: String| CryptoError::Damaged {
            path: p.to_path_buf(),
            message: e,
        };
        let public_pem = read(&cfg.public_key)?;
        let public = rsa::RsaPublicKey::from_public_key_pem(&public_pem)
            .or_else(|_| {
                use rsa::pkcs1::DecodeRsaPublicKey;
                rsa::RsaPublicKey::from_pkcs1_pem(&public_pem)
            })
            .map_err(|e| bad(&cfg.public_key, e.to_string()))?;
        let private_pem = read(&cfg.private_key)?;
        let private = rsa::RsaPrivateKey::from_pkcs1_pem(&private_pem)
            .or_else(|_| rsa::RsaPrivateKey::from_pkcs8_pem(&private_pem))
            .map_err(|e| bad(&cfg.private_key, e.to_string()))?;
        Ok(PulsarE2e {
            key_name: cfg.key_name.clone(),
            public,
            private,
            current: std::sync::Mutex::new(None),
            opened: std::sync::Mutex::new(HashMap::new()),
        })
    }

    fn data_key(&self) -> Result<([u8; 32], Vec<u8>), CryptoError> {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(d) = current.as_ref() {
            if d.made.elapsed() < E2E_KEY_LIFETIME {
                return Ok((d.key, d.wrapped.clone()));
            }
        }
        let key = random::<32>();
        let wrapped = self
            .public
            .encrypt(&mut rand::rngs::OsRng, rsa::Oaep::new::<sha1::Sha1>(), &key)
            .map_err(|e| CryptoError::MasterKey(format!("RSA-OAEP: {e}")))?;
        *current = Some(DataKey {
            made: std::time::Instant::now(),
            key,
            wrapped: wrapped.clone(),
        });
        Ok((key, wrapped))
    }

    /// Seals a payload in Pulsar's format.
    pub fn seal(&self, payload: &[u8]) -> Result<PulsarSealed, CryptoError> {
        let (key, wrapped) = self.data_key()?;
        let iv = random::<NONCE_LEN>();
        let sealed = Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&key))
            .encrypt(Nonce::from_slice(&iv), payload)
            .map_err(|_| CryptoError::Open)?;
        Ok(PulsarSealed {
            payload: sealed,
            encryption_keys: vec![pulsar::proto::EncryptionKeys {
                key: self.key_name.clone(),
                value: wrapped,
                metadata: Vec::new(),
            }],
            encryption_param: iv.to_vec(),
        })
    }

    /// Opens a payload in Pulsar's format (from the gateway or any official producer that
    /// encrypted for this key name).
    pub fn open(
        &self,
        keys: &[pulsar::proto::EncryptionKeys],
        iv: &[u8],
        payload: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        let ours = keys
            .iter()
            .find(|k| k.key == self.key_name)
            .ok_or_else(|| CryptoError::NoKey {
                tenant: "(pulsar e2e)".into(),
                key_id: keys
                    .iter()
                    .map(|k| k.key.clone())
                    .collect::<Vec<_>>()
                    .join(","),
            })?;
        let cached = self
            .opened
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&ours.value)
            .copied();
        let key = match cached {
            Some(k) => k,
            None => {
                let k = self
                    .private
                    .decrypt(rsa::Oaep::new::<sha1::Sha1>(), &ours.value)
                    .map_err(|_| CryptoError::Open)?;
                let k: [u8; 32] = k.try_into().map_err(|_| CryptoError::Open)?;
                let mut opened = self.opened.lock().unwrap_or_else(|p| p.into_inner());
                if opened.len() > 1024 {
                    opened.clear();
                }
                opened.insert(ours.value.clone(), k);
                k
            }
        };
        if iv.len() != NONCE_LEN {
            return Err(CryptoError::Open);
        }
        Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&key))
            .decrypt(Nonce::from_slice(iv), payload)
            .map_err(|_| CryptoError::Open)
    }
}

#[cfg(test)]
mod e2e_tests {
    use super::*;

    #[test]
    fn pulsar_format_round_trip_and_key_reuse() {
        use rsa::pkcs1::EncodeRsaPrivateKey;
        use rsa::pkcs8::{EncodePublicKey, LineEnding};
        let dir = tempfile::tempdir().unwrap();
        let private = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).unwrap();
        let public = private.to_public_key();
        std::fs::write(
            dir.path().join("priv.pem"),
            private.to_pkcs1_pem(LineEnding::LF).unwrap().as_bytes(),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("pub.pem"),
            public.to_public_key_pem(LineEnding::LF).unwrap(),
        )
        .unwrap();
        let e2e = PulsarE2e::load(&crate::config::PulsarEncryptionConfig {
            key_name: "acme-key".into(),
            public_key: dir.path().join("pub.pem"),
            private_key: dir.path().join("priv.pem"),
        })
        .unwrap();
        let a = e2e.seal(b"hello pulsar").unwrap();
        let b = e2e.seal(b"second").unwrap();
        assert_eq!(
            a.encryption_keys[0].value, b.encryption_keys[0].value,
            "one data key"
        );
        assert_ne!(
            a.encryption_param, b.encryption_param,
            "fresh IV per message"
        );
        assert_eq!(a.payload.len(), b"hello pulsar".len() + 16);
        assert_eq!(
            e2e.open(&a.encryption_keys, &a.encryption_param, &a.payload)
                .unwrap(),
            b"hello pulsar"
        );
        let mut other = a.encryption_keys.clone();
        other[0].key = "someone-else".into();
        assert!(e2e.open(&other, &a.encryption_param, &a.payload).is_err());
    }
}

/// Tenants' [`PulsarE2e`] key pairs, loaded on first use and reloaded when the tenant's
/// configuration changes.
#[derive(Debug, Default)]
pub struct E2eKeys {
    loaded: RwLock<HashMap<String, (crate::config::PulsarEncryptionConfig, Arc<PulsarE2e>)>>,
}

impl E2eKeys {
    pub fn get(
        &self,
        tenant: &str,
        cfg: &crate::config::PulsarEncryptionConfig,
    ) -> Result<Arc<PulsarE2e>, CryptoError> {
        if let Some((c, k)) = self
            .loaded
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(tenant)
        {
            if c == cfg {
                return Ok(k.clone());
            }
        }
        let keys = Arc::new(PulsarE2e::load(cfg)?);
        self.loaded
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(tenant.to_string(), (cfg.clone(), keys.clone()));
        Ok(keys)
    }
}
