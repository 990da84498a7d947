//! Tenants, users, credentials, and the names a principal may use.
//!
//! Every connection acts as one [`Principal`] once authenticated, and everything it names —
//! topics, subscriptions, kv keys — is placed inside that principal's tenant and namespace by
//! the host, never by the plugin or the client. A plugin passes short names (`mqtt`), which
//! [`crate::names::validate_name`] keeps free of anything that could reach another namespace (`/`, `://`,
//! `..`, `%`-escapes); the host alone builds the `persistent://tenant/ns/name` URL.
//!
//! Mechanisms, all behind [`Tenancy::authenticate`]:
//! - passwords, stored only as hashes ([`crate::password`]: argon2id, which a plain password in
//!   the config is hashed to when it is loaded, or a `password_hash` imported from Mosquitto's
//!   `mosquitto_passwd`); verification runs on the blocking pool, never on a socket task;
//! - JWT tokens as Pulsar issues them (`sub` = user name, optional `exp`), HS256 or RS256,
//!   checked by [`magnetar_broker::auth::verify`] — the same code the embedded broker uses;
//! - anonymous access, where the config allows it.
//!
//! A verified password is remembered for a while ([`crate::login_cache`]): a device that
//! reconnects with it within `login_cache_ttl_secs` skips argon2, so a fleet coming back at
//! once costs microseconds per device, not 20 ms. Argon2 verifications that must run are
//! admitted a CPU at a time; when more wait than `max_waiting_logins`, a login is refused
//! with [`AuthError::Busy`] (the protocol's "server busy") instead of timing out.
//!
//! A failed authentication costs time: after `failures_before_delay` failures from one
//! address, each further attempt from it waits (doubling, up to [`MAX_PENALTY`]) before it is
//! checked, so guessing from one address is slow while other clients are not slowed at all.
//!
//! Tenants and users change at run time (the admin API): the directory sits behind a lock
//! that is only held to copy out what one check needs.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHasher, SaltString};
use argon2::Argon2;

use crate::login_cache::LoginCache;
use magnetar_broker::auth::{self as jwt, Action, Authorizer, SignKey, VerifyKey};

use crate::config::{
    ActionName, AuthSection, Config, LimitsConfig, PermissionConfig, TenantConfig, UserConfig,
};
use crate::names::validate_segment;
use crate::sasl::{ScramCredential, ScramHash};
use crate::secret::write_private;

/// Longest wait a failing address is made to sit out before its next attempt.
pub const MAX_PENALTY: Duration = Duration::from_secs(5);
/// How long failures from an address are remembered.
const FAILURE_MEMORY: Duration = Duration::from_secs(60);

/// Who a connection is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub user: String,
    pub tenant: String,
    pub namespace: String,
}

/// Credentials as the host checks them, whatever the protocol.
#[derive(Debug, Clone)]
pub enum Credentials {
    Anonymous,
    Password {
        user: String,
        password: Vec<u8>,
    },
    Token(String),
    /// The common name of a client certificate the TLS handshake verified.
    Certificate(String),
}

/// Why authentication failed. The message goes to the log, not to the client.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("anonymous access is not allowed")]
    AnonymousNotAllowed,
    #[error("unknown user or wrong password")]
    BadPassword,
    #[error("token refused: {0}")]
    BadToken(String),
    #[error("token names user {0:?}, who does not exist")]
    UnknownTokenUser(String),
    #[error("no user has client certificate {0:?}")]
    UnknownCertificate(String),
    #[error("too many logins waiting for verification; try again")]
    Busy,
}

/// Why the tenancy could not be built from the config.
#[derive(Debug, thiserror::Error)]
pub enum TenancyError {
    #[error("user {user}: {message}")]
    User { user: String, message: String },
    #[error("token key {path}: {source}")]
    KeyFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("token key: {0}")]
    Key(String),
    #[error("tenant {0:?} does not exist")]
    NoTenant(String),
    #[error("user {0:?} does not exist")]
    NoUser(String),
}

/// A user as the directory keeps it.
#[derive(Debug, Clone)]
struct User {
    /// Stored hash ([`crate::password`]), empty for a token-only user.
    hash: String,
    principal: Principal,
    permissions: Vec<PermissionConfig>,
    limits: LimitsConfig,
    scram_sha256: Option<ScramCredential>,
    scram_sha512: Option<ScramCredential>,
    certificate_cn: Option<String>,
}

/// A SCRAM credential in its stored text form: `iterations:salt:stored_key:server_key`.
fn scram_to_text(c: &ScramCredential) -> String {
    use base64::Engine;
    let b = base64::engine::general_purpose::STANDARD;
    format!(
        "{}:{}:{}:{}",
        c.iterations,
        b.encode(&c.salt),
        b.encode(&c.stored_key),
        b.encode(&c.server_key)
    )
}

fn scram_from_text(s: &str) -> Option<ScramCredential> {
    use base64::Engine;
    let b = base64::engine::general_purpose::STANDARD;
    let mut parts = s.split(':');
    let iterations = parts.next()?.parse().ok()?;
    let salt = b.decode(parts.next()?).ok()?;
    let stored_key = b.decode(parts.next()?).ok()?;
    let server_key = b.decode(parts.next()?).ok()?;
    Some(ScramCredential {
        salt,
        iterations,
        stored_key,
        server_key,
    })
}

/// A user as the admin API shows it (never with its hash).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct UserView {
    pub name: String,
    pub tenant: String,
    pub namespace: String,
    #[serde(default)]
    pub permissions: Vec<PermissionConfig>,
    #[serde(default)]
    pub limits: LimitsConfig,
}

#[derive(Debug, Default)]
struct Directory {
    tenants: HashMap<String, TenantConfig>,
    users: HashMap<String, User>,
    /// Users whose stored hash is Mosquitto's PBKDF2 (the others: argon2, or none).
    mosquitto_hashes: usize,
}

impl Directory {
    /// Adds or replaces a user.
    fn put(&mut self, name: String, user: User) {
        self.mosquitto_hashes += usize::from(is_mosquitto(&user.hash));
        if let Some(old) = self.users.insert(name, user) {
            self.mosquitto_hashes -= usize::from(is_mosquitto(&old.hash));
        }
    }

    /// Removes a user; whether there was one.
    fn remove(&mut self, name: &str) -> bool {
        let old = self.users.remove(name);
        if let Some(old) = &old {
            self.mosquitto_hashes -= usize::from(is_mosquitto(&old.hash));
        }
        old.is_some()
    }

    /// The hash an unknown user's password is checked against, so that a refusal takes as
    /// long as most known users' would: of the kind most users have.
    fn dummy_hash(&self) -> &'static str {
        if self.mosquitto_hashes * 2 > self.users.len() {
            DUMMY_MOSQUITTO_HASH
        } else {
            dummy_argon2_hash()
        }
    }
}

fn is_mosquitto(hash: &str) -> bool {
    hash.starts_with("$7$")
}

/// Keys that check (and possibly sign) tokens.
#[derive(Debug, Clone)]
pub struct TokenKeys {
    pub verify: VerifyKey,
    pub sign: Option<SignKey>,
}

impl TokenKeys {
    /// The token key the config names, or the one generated in `data_dir/auth`.
    pub fn load(auth: &AuthSection, data_dir: &Path) -> Result<TokenKeys, TenancyError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| TenancyError::KeyFile {
                path: path.to_path_buf(),
                source,
            })
        };
        if let Some(b64) = &auth.token_secret {
            use base64::Engine;
            let secret = base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .map_err(|e| TenancyError::Key(format!("auth.token_secret is not base64: {e}")))?;
            return Ok(TokenKeys::hs256(secret));
        }
        if let Some(path) = &auth.token_secret_file {
            return Ok(TokenKeys::hs256(read(path)?));
        }
        if auth.token_public_key_file.is_some() || auth.token_private_key_file.is_some() {
            let public = auth
                .token_public_key_file
                .as_deref()
                .ok_or_else(|| TenancyError::Key("auth.token_public_key_file is not set".into()))?;
            let sign = match &auth.token_private_key_file {
                Some(p) => Some(SignKey::Rs256(read(p)?)),
                None => None,
            };
            return Ok(TokenKeys {
                verify: VerifyKey::Rs256(read(public)?),
                sign,
            });
        }
        let path = data_dir.join("auth").join("token-secret.key");
        match std::fs::read(&path) {
            Ok(secret) => Ok(TokenKeys::hs256(secret)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut secret = vec![0u8; 32];
                rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut secret);
                write_private(&path, &secret).map_err(|source| TenancyError::KeyFile {
                    path: path.clone(),
                    source,
                })?;
                tracing::info!(path = %path.display(), "generated a token secret key");
                Ok(TokenKeys::hs256(secret))
            }
            Err(source) => Err(TenancyError::KeyFile { path, source }),
        }
    }

    fn hs256(secret: Vec<u8>) -> TokenKeys {
        TokenKeys {
            verify: VerifyKey::Hs256(secret.clone()),
            sign: Some(SignKey::Hs256(secret)),
        }
    }
}

/// Hashes a password with argon2id and a random salt (PHC string).
pub fn hash_password(password: &[u8]) -> Result<String, String> {
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    Argon2::default()
        .hash_password(password, &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// Tenants, users, token keys and what anonymous clients may do.
pub struct Tenancy {
    dir: RwLock<Directory>,
    allow_anonymous: bool,
    anonymous: Principal,
    keys: TokenKeys,
    superuser_role: String,
    failures_before_delay: u32,
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
    login_cache: LoginCache,
    /// Where the login cache is saved, if it is.
    login_cache_path: Option<std::path::PathBuf>,
    /// One permit per core: argon2 verifications running at once.
    verify_slots: tokio::sync::Semaphore,
    /// Verifications running or waiting for a permit.
    verifying: AtomicUsize,
    max_verifying: usize,
    /// Per user, a gate held while one of its passwords is verified: when a fleet sharing a
    /// user reconnects at once, the first login verifies and the others, once through the
    /// gate, find it in the cache (instead of a thousand identical argon2 runs).
    verify_gates: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Password logins served by the login cache, and those that ran argon2.
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
}

impl std::fmt::Debug for Tenancy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tenancy")
            .field("allow_anonymous", &self.allow_anonymous)
            .finish_non_exhaustive()
    }
}

impl Tenancy {
    /// Builds the directory from the config: hashes plain passwords, loads token keys.
    pub fn from_config(config: &Config) -> Result<Tenancy, TenancyError> {
        let keys = TokenKeys::load(&config.auth, &config.data_dir)?;
        let auth = &config.auth;
        let key_path = auth
            .login_cache_key_file
            .clone()
            .unwrap_or_else(|| config.data_dir.join("auth").join("login-cache.key"));
        let cache_key = crate::login_cache::load_or_create_key(&key_path).map_err(|source| {
            TenancyError::KeyFile {
                path: key_path.clone(),
                source,
            }
        })?;
        let login_cache = LoginCache::new(
            cache_key,
            Duration::from_secs(auth.login_cache_ttl_secs),
            auth.login_cache_capacity,
        );
        let login_cache_path = auth
            .login_cache_persist
            .then(|| config.data_dir.join("auth").join("login-cache"));
        if let Some(path) = &login_cache_path {
            match login_cache.load(path) {
                Ok(0) => {}
                Ok(n) => tracing::info!(entries = n, "loaded the login cache"),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "login cache not loaded")
                }
            }
        }
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        let tenancy = Tenancy {
            dir: RwLock::new(Directory::default()),
            allow_anonymous: config.auth.allow_anonymous,
            anonymous: Principal {
                user: "anonymous".into(),
                tenant: config.auth.anonymous_tenant.clone(),
                namespace: config.auth.anonymous_namespace.clone(),
            },
            keys,
            superuser_role: config.auth.superuser_role.clone(),
            failures_before_delay: config.auth.failures_before_delay,
            failures: Mutex::new(HashMap::new()),
            login_cache,
            login_cache_path,
            verify_slots: tokio::sync::Semaphore::new(cores),
            verifying: AtomicUsize::new(0),
            max_verifying: match auth.max_waiting_logins {
                0 => cores * 200,
                n => n,
            },
            verify_gates: Mutex::new(HashMap::new()),
            cache_hits: AtomicU64::new(0),
            cache_misses: AtomicU64::new(0),
        };
        for t in &config.tenants {
            tenancy.put_tenant(t.clone());
        }
        for u in &config.auth.users {
            tenancy.put_user_config(u)?;
        }
        Ok(tenancy)
    }

    /// Saves the login cache where the config says (no-op when it is not persisted).
    pub fn save_login_cache(&self) {
        if let Some(path) = &self.login_cache_path {
            if let Err(e) = self.login_cache.save(path) {
                tracing::warn!(path = %path.display(), error = %e, "login cache not saved");
            }
        }
    }

    /// Password logins served by the login cache so far, and those that ran argon2.
    pub fn login_cache_stats(&self) -> (u64, u64) {
        (
            self.cache_hits.load(Ordering::Relaxed),
            self.cache_misses.load(Ordering::Relaxed),
        )
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Directory> {
        self.dir.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Directory> {
        self.dir.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The role the gateway itself uses on the backend.
    pub fn superuser_role(&self) -> &str {
        &self.superuser_role
    }

    pub fn token_keys(&self) -> &TokenKeys {
        &self.keys
    }

    pub fn allows_anonymous(&self) -> bool {
        self.allow_anonymous
    }

    /// Signs a token for `role`, valid for `ttl` if given.
    pub fn sign_token(&self, role: &str, ttl: Option<Duration>) -> Result<String, TenancyError> {
        let key = self.keys.sign.as_ref().ok_or_else(|| {
            TenancyError::Key("no signing key (set auth.token_private_key_file)".into())
        })?;
        let exp = ttl.map(|d| crate::clock::now_ms() / 1000 + d.as_secs());
        jwt::sign(key, role, exp).map_err(|e| TenancyError::Key(e.to_string()))
    }

    /// Whether the tenant's payloads (and kv values) are encrypted at rest.
    pub fn encrypts(&self, tenant: &str) -> bool {
        self.read()
            .tenants
            .get(tenant)
            .is_some_and(|t| t.encryption || t.pulsar_encryption.is_some())
    }

    /// The tenant's key pair for Pulsar's end-to-end format, if it uses it.
    pub fn pulsar_encryption(&self, tenant: &str) -> Option<crate::config::PulsarEncryptionConfig> {
        self.read()
            .tenants
            .get(tenant)
            .and_then(|t| t.pulsar_encryption.clone())
    }

    /// Adds or replaces a tenant.
    pub fn put_tenant(&self, tenant: TenantConfig) {
        self.write().tenants.insert(tenant.name.clone(), tenant);
    }

    /// Removes a tenant and its users; returns whether it existed.
    pub fn delete_tenant(&self, name: &str) -> bool {
        let mut dir = self.write();
        dir.users.retain(|_, u| u.principal.tenant != name);
        dir.tenants.remove(name).is_some()
    }

    /// A tenant's settings; a tenant only named by users gets the defaults.
    pub fn tenant(&self, name: &str) -> Option<TenantConfig> {
        let dir = self.read();
        dir.tenants.get(name).cloned().or_else(|| {
            let named = dir.users.values().any(|u| u.principal.tenant == name)
                || (self.allow_anonymous && self.anonymous.tenant == name);
            named.then(|| TenantConfig {
                name: name.to_string(),
                namespaces: vec![],
                encryption: false,
                pulsar_encryption: None,
                limits: LimitsConfig::default(),
            })
        })
    }

    pub fn tenants(&self) -> Vec<TenantConfig> {
        let mut v: Vec<_> = self.read().tenants.values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Adds or replaces a user from its config form (hashing a plain password and deriving
    /// its SCRAM credentials); returns the stored form, which never holds the password.
    pub fn put_user_config(&self, u: &UserConfig) -> Result<UserConfig, TenancyError> {
        let err = |message: String| TenancyError::User {
            user: u.name.clone(),
            message,
        };
        let hash = match (&u.password, &u.password_hash) {
            (Some(p), None) => hash_password(p.as_bytes()).map_err(err)?,
            (None, Some(h)) => {
                crate::password::check(h).map_err(|e| err(format!("password_hash: {e}")))?;
                h.clone()
            }
            // Token-only user: no password can match.
            (None, None) => String::new(),
            (Some(_), Some(_)) => return Err(err("set password or password_hash".into())),
        };
        validate_segment(&u.tenant).map_err(|e| err(e.to_string()))?;
        validate_segment(&u.namespace).map_err(|e| err(e.to_string()))?;
        let scram = |hash: ScramHash, stored: &Option<String>| match (&u.password, stored) {
            (Some(p), _) => Ok(Some(ScramCredential::derive(hash, p.as_bytes()))),
            (None, Some(text)) => scram_from_text(text)
                .map(Some)
                .ok_or_else(|| err(format!("{hash:?} credential is malformed"))),
            (None, None) => Ok(None),
        };
        let scram_sha256 = scram(ScramHash::Sha256, &u.scram_sha256)?;
        let scram_sha512 = scram(ScramHash::Sha512, &u.scram_sha512)?;
        let stored = UserConfig {
            password: None,
            password_hash: (!hash.is_empty()).then(|| hash.clone()),
            scram_sha256: scram_sha256.as_ref().map(scram_to_text),
            scram_sha512: scram_sha512.as_ref().map(scram_to_text),
            ..u.clone()
        };
        self.login_cache
            .rebind(&u.name, &hash, u.password.as_deref().map(str::as_bytes));
        self.write().put(
            u.name.clone(),
            User {
                hash,
                principal: Principal {
                    user: u.name.clone(),
                    tenant: u.tenant.clone(),
                    namespace: u.namespace.clone(),
                },
                permissions: u.permissions.clone(),
                limits: u.limits.clone(),
                scram_sha256,
                scram_sha512,
                certificate_cn: u.certificate_cn.clone(),
            },
        );
        Ok(stored)
    }

    /// A user's SCRAM credential for `hash`, if one was derived.
    pub fn scram_credential(&self, user: &str, hash: ScramHash) -> Option<ScramCredential> {
        let dir = self.read();
        let u = dir.users.get(user)?;
        match hash {
            ScramHash::Sha256 => u.scram_sha256.clone(),
            ScramHash::Sha512 => u.scram_sha512.clone(),
        }
    }

    /// The principal a user acts as.
    pub fn principal_of(&self, user: &str) -> Option<Principal> {
        self.read().users.get(user).map(|u| u.principal.clone())
    }

    /// Counts an authentication outcome from `peer` made outside [`authenticate`]
    /// (SCRAM), and waits out the address's penalty first.
    pub async fn note_attempt(&self, peer: Option<IpAddr>, ok: bool) {
        if let Some(ip) = peer {
            let wait = self.penalty(ip);
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            self.record(ip, ok);
        }
    }

    pub fn delete_user(&self, name: &str) -> bool {
        self.login_cache.forget(name);
        self.write().remove(name)
    }

    pub fn users(&self) -> Vec<UserView> {
        let mut v: Vec<_> = self
            .read()
            .users
            .values()
            .map(|u| UserView {
                name: u.principal.user.clone(),
                tenant: u.principal.tenant.clone(),
                namespace: u.principal.namespace.clone(),
                permissions: u.permissions.clone(),
                limits: u.limits.clone(),
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// A user's own limits.
    pub fn user_limits(&self, name: &str) -> LimitsConfig {
        self.read()
            .users
            .get(name)
            .map(|u| u.limits.clone())
            .unwrap_or_default()
    }

    /// Checks credentials and says who they belong to. Failures from `peer` are counted
    /// and make its later attempts wait.
    pub async fn authenticate(
        &self,
        creds: Credentials,
        peer: Option<IpAddr>,
    ) -> Result<Principal, AuthError> {
        if let Some(ip) = peer {
            let wait = self.penalty(ip);
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
        }
        let outcome = self.check(creds).await;
        // "Busy" checked nothing, so it tells a guesser nothing and is no failure: a fleet
        // behind one address, told to come back, is not slowed down for it.
        if let Some(ip) = peer.filter(|_| !matches!(outcome, Err(AuthError::Busy))) {
            self.record(ip, outcome.is_ok());
        }
        outcome
    }

    /// [`Tenancy::authenticate`] when it needs no waiting: an anonymous login, a client
    /// certificate, or a password the login cache vouches for, from an address without a
    /// penalty. `None`: the caller goes the async way (an argon2 verification, a token, a
    /// penalty to wait out), which decides exactly as before. What it returns, and what it
    /// records for `peer`, is what `authenticate` would have.
    pub fn authenticate_now(
        &self,
        creds: &Credentials,
        peer: Option<IpAddr>,
    ) -> Option<Result<Principal, AuthError>> {
        if peer.is_some_and(|ip| !self.penalty(ip).is_zero()) {
            return None;
        }
        let outcome = self.check_now(creds)?;
        if let Some(ip) = peer {
            self.record(ip, outcome.is_ok());
        }
        Some(outcome)
    }

    /// The part of [`Tenancy::check`] decided without waiting (see [`Tenancy::authenticate_now`]).
    fn check_now(&self, creds: &Credentials) -> Option<Result<Principal, AuthError>> {
        match creds {
            Credentials::Anonymous if self.allow_anonymous => Some(Ok(self.anonymous.clone())),
            Credentials::Anonymous => Some(Err(AuthError::AnonymousNotAllowed)),
            Credentials::Certificate(cn) => Some(
                self.read()
                    .users
                    .values()
                    .find(|u| u.certificate_cn.as_deref() == Some(cn.as_str()))
                    .map(|u| u.principal.clone())
                    .ok_or_else(|| AuthError::UnknownCertificate(cn.clone())),
            ),
            // A token standing in for the password is checked the async way.
            Credentials::Password { user, password }
                if std::str::from_utf8(password).map_or(true, |t| t.split('.').count() != 3) =>
            {
                let dir = self.read();
                let u = dir.users.get(user)?;
                if u.hash.is_empty() || !self.login_cache.check(user, &u.hash, password) {
                    return None;
                }
                self.cache_hits.fetch_add(1, Ordering::Relaxed);
                Some(Ok(u.principal.clone()))
            }
            Credentials::Password { .. } | Credentials::Token(_) => None,
        }
    }

    fn record(&self, ip: IpAddr, ok: bool) {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if ok {
            failures.remove(&ip);
            return;
        }
        let now = Instant::now();
        let entry = failures.entry(ip).or_insert((0, now));
        if now.duration_since(entry.1) > FAILURE_MEMORY {
            *entry = (0, now);
        }
        entry.0 += 1;
        entry.1 = now;
        if failures.len() > 100_000 {
            failures.retain(|_, (_, at)| now.duration_since(*at) < FAILURE_MEMORY);
        }
    }

    /// How long an attempt from `ip` waits, given its recent failures.
    fn penalty(&self, ip: IpAddr) -> Duration {
        let failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        match failures.get(&ip) {
            Some((n, at)) if *n >= self.failures_before_delay && at.elapsed() < FAILURE_MEMORY => {
                let doublings = (n - self.failures_before_delay).min(6);
                (Duration::from_millis(100) * (1 << doublings)).min(MAX_PENALTY)
            }
            _ => Duration::ZERO,
        }
    }

    async fn check(&self, creds: Credentials) -> Result<Principal, AuthError> {
        match creds {
            Credentials::Anonymous | Credentials::Certificate(_) => self
                .check_now(&creds)
                .unwrap_or(Err(AuthError::AnonymousNotAllowed)),
            Credentials::Password { user, password } => {
                // A token may stand in for the password (MQTT clients pass it that way); it
                // must speak for the same user.
                if let Some(claims) = std::str::from_utf8(&password)
                    .ok()
                    .filter(|t| t.split('.').count() == 3)
                    .and_then(|t| jwt::verify(&self.keys.verify, t).ok())
                {
                    let found = self.read().users.get(&user).map(|u| u.principal.clone());
                    return match found {
                        Some(p) if claims.sub == user => Ok(p),
                        _ => Err(AuthError::BadToken("the token is another user's".into())),
                    };
                }
                let (found, dummy) = {
                    let dir = self.read();
                    let found = dir
                        .users
                        .get(&user)
                        .map(|u| (u.hash.clone(), u.principal.clone()));
                    (found, dir.dummy_hash())
                };
                // Unknown users cost the same hash as known ones.
                let (hash, principal) = match found {
                    Some((h, p)) if !h.is_empty() => {
                        if self.login_cache.check(&user, &h, &password) {
                            self.cache_hits.fetch_add(1, Ordering::Relaxed);
                            return Ok(p);
                        }
                        (h, Some(p))
                    }
                    _ => (dummy.to_string(), None),
                };
                let gate = self.verify_gate(&user);
                let _turn = gate.lock().await;
                if principal.is_some() && self.login_cache.check(&user, &hash, &password) {
                    // Verified by the login ahead of this one in the gate.
                    self.cache_hits.fetch_add(1, Ordering::Relaxed);
                    return principal.ok_or(AuthError::BadPassword);
                }
                self.cache_misses.fetch_add(1, Ordering::Relaxed);
                let ok = self.verify(&hash, &password).await;
                drop(_turn);
                self.release_verify_gate(&user, gate);
                let ok = ok?;
                match principal {
                    Some(p) if ok => {
                        self.login_cache.insert(&user, &hash, &password);
                        Ok(p)
                    }
                    _ => Err(AuthError::BadPassword),
                }
            }
            Credentials::Token(token) => {
                let claims = jwt::verify(&self.keys.verify, &token)
                    .map_err(|e| AuthError::BadToken(e.to_string()))?;
                self.read()
                    .users
                    .get(&claims.sub)
                    .map(|u| u.principal.clone())
                    .ok_or(AuthError::UnknownTokenUser(claims.sub))
            }
        }
    }

    /// The gate of `user`'s verifications (see `verify_gates`).
    fn verify_gate(&self, user: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut gates = self.verify_gates.lock().unwrap_or_else(|p| p.into_inner());
        gates.entry(user.to_string()).or_default().clone()
    }

    /// Drops `user`'s gate once nobody else holds or waits for it, so the map holds only
    /// users with a verification in progress.
    fn release_verify_gate(&self, user: &str, gate: Arc<tokio::sync::Mutex<()>>) {
        let mut gates = self.verify_gates.lock().unwrap_or_else(|p| p.into_inner());
        drop(gate);
        if gates.get(user).is_some_and(|g| Arc::strong_count(g) == 1) {
            gates.remove(user);
        }
    }

    /// Verifies a password against its argon2 hash on the blocking pool, at most one
    /// verification per core at a time; [`AuthError::Busy`] when too many already wait.
    async fn verify(&self, hash: &str, password: &[u8]) -> Result<bool, AuthError> {
        /// Counts a verification as waiting or running until dropped.
        struct Verifying<'a>(&'a AtomicUsize);
        impl Drop for Verifying<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        if self.verifying.fetch_add(1, Ordering::Relaxed) >= self.max_verifying {
            self.verifying.fetch_sub(1, Ordering::Relaxed);
            return Err(AuthError::Busy);
        }
        let _counted = Verifying(&self.verifying);
        let _slot = self
            .verify_slots
            .acquire()
            .await
            .map_err(|_| AuthError::Busy)?;
        let (hash, password) = (hash.to_string(), password.to_vec());
        Ok(
            tokio::task::spawn_blocking(move || crate::password::verify(&hash, &password))
                .await
                .unwrap_or(false),
        )
    }

    /// Whether `principal` may do `action` on its topic `name` (a short name).
    pub fn authorize(&self, principal: &Principal, name: &str, action: ActionName) -> bool {
        let dir = self.read();
        let Some(user) = dir.users.get(&principal.user) else {
            return self.allow_anonymous
                && principal == &self.anonymous
                && action != ActionName::Manage;
        };
        if user.permissions.is_empty() {
            return action != ActionName::Manage;
        }
        user.permissions
            .iter()
            .any(|p| p.actions.contains(&action) && glob_match(&p.topics, name))
    }
}

/// A fixed argon2 hash, checked for unknown users so that their answer takes as long.
fn dummy_argon2_hash() -> &'static str {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HASH.get_or_init(|| hash_password(b"magnetar-unknown-user").unwrap_or_default())
}

/// A fixed hash in Mosquitto's default form (101 iterations), checked for unknown users
/// where most users' hashes came from `mosquitto_passwd`.
const DUMMY_MOSQUITTO_HASH: &str =
    "$7$101$bWFnbmV0YXItZHVt$8JtxAdV6cBaE3RKxvAdp38mSVXV/Yr1RXd07nL2F8/V4YYhJt18B8Gt7OwJvvUnb64uRw+5wtJ4ZBYRHB05wHQ==";

/// `*` matches any run of characters; everything else matches itself.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let mut rest = name;
    for (i, part) in parts.iter().enumerate() {
        if i == 0 {
            let Some(r) = rest.strip_prefix(part) else {
                return false;
            };
            rest = r;
        } else if i == parts.len() - 1 {
            return rest.ends_with(part);
        } else if let Some(pos) = rest.find(part) {
            rest = &rest[pos + part.len()..];
        } else {
            return false;
        }
    }
    true
}

/// The embedded broker asks the same directory: a user's token reaches only its tenant.
impl Authorizer for Tenancy {
    fn authorize(&self, role: &str, tenant: &str, namespace: &str, _action: Action) -> bool {
        if role == self.superuser_role {
            return true;
        }
        if let Some(u) = self.read().users.get(role) {
            return u.principal.tenant == tenant && u.principal.namespace == namespace;
        }
        self.allow_anonymous
            && role.is_empty()
            && tenant == self.anonymous.tenant
            && namespace == self.anonymous.namespace
    }
}

/// The Pulsar topic of a short name in the principal's namespace.
pub fn topic_url(principal: &Principal, name: &str) -> String {
    format!(
        "persistent://{}/{}/{}",
        principal.tenant, principal.namespace, name
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("*", "anything"));
        assert!(glob_match("sensors-*", "sensors-1"));
        assert!(!glob_match("sensors-*", "mqtt"));
        assert!(glob_match("a*c*e", "abcde"));
        assert!(!glob_match("a*c*e", "abcdf"));
        assert!(glob_match("mqtt", "mqtt"));
    }

    fn two_users(dir: &Path) -> Tenancy {
        let config = Config::parse(
            r#"
            [auth]
            allow_anonymous = false
            [[auth.users]]
            name = "alice"
            password = "s3cret"
            tenant = "acme"
            [[auth.users]]
            name = "reader"
            password = "r"
            tenant = "acme"
            permissions = [{ topics = "public-*", actions = ["consume"] }]
            "#,
        )
        .unwrap();
        let mut config = config;
        config.data_dir = dir.to_path_buf();
        Tenancy::from_config(&config).unwrap()
    }

    #[tokio::test]
    async fn passwords_tokens_and_anonymous() {
        let dir = tempfile::tempdir().unwrap();
        let t = two_users(dir.path());
        assert_eq!(
            t.authenticate(Credentials::Anonymous, None).await,
            Err(AuthError::AnonymousNotAllowed)
        );
        let ok = t
            .authenticate(
                Credentials::Password {
                    user: "alice".into(),
                    password: b"s3cret".to_vec(),
                },
                None,
            )
            .await;
        assert_eq!(ok.map(|p| p.tenant), Ok("acme".to_string()));
        let bad = t
            .authenticate(
                Credentials::Password {
                    user: "alice".into(),
                    password: b"s3cre".to_vec(),
                },
                None,
            )
            .await;
        assert_eq!(bad, Err(AuthError::BadPassword));
        let token = t
            .sign_token("alice", Some(Duration::from_secs(60)))
            .unwrap();
        let p = t
            .authenticate(Credentials::Token(token), None)
            .await
            .unwrap();
        assert_eq!(p.user, "alice");
        let ghost = t.sign_token("ghost", None).unwrap();
        assert!(t
            .authenticate(Credentials::Token(ghost), None)
            .await
            .is_err());
        // The generated key survives a restart: the same token still works.
        let t2 = two_users(dir.path());
        let token = t.sign_token("alice", None).unwrap();
        assert!(t2
            .authenticate(Credentials::Token(token), None)
            .await
            .is_ok());
    }

    /// `mosquitto_passwd -b passwd dev-1 s3cret` (Mosquitto 2.0).
    const DEV_1: &str = "$7$101$iaEkTP/5Y7MypDX8$m3ZQg+NFzGdXAIK6j67Lq2vO8jpsLwfFlL4Qexh/rHMl3DcTZcDEo3bnrolFHwp6gSHYYRKfrgd86wCxtwvYnA==";

    #[tokio::test]
    async fn a_hash_from_mosquitto_passwd_logs_its_user_in() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::parse(&format!(
            "[auth]\nallow_anonymous = false\n[[auth.users]]\nname = \"dev-1\"\npassword_hash = {DEV_1:?}\ntenant = \"acme\"\n"
        ))
        .unwrap();
        config.data_dir = dir.path().to_path_buf();
        let t = Tenancy::from_config(&config).unwrap();
        let login = |password: &[u8]| {
            t.authenticate(
                Credentials::Password {
                    user: "dev-1".into(),
                    password: password.to_vec(),
                },
                None,
            )
        };
        assert_eq!(login(b"s3cret").await.map(|p| p.tenant), Ok("acme".into()));
        // Served by the login cache now; one byte off is checked against the hash, refused.
        assert!(login(b"s3cret").await.is_ok());
        assert_eq!(login(b"s3creT").await, Err(AuthError::BadPassword));
        assert_eq!(t.login_cache_stats(), (1, 2));
        // Where most users' hashes came from Mosquitto, an unknown user is checked against
        // a hash of that kind, so its refusal takes as long as theirs.
        assert_eq!(t.read().dummy_hash(), DUMMY_MOSQUITTO_HASH);
        t.put_user_config(&UserConfig {
            name: "alice".into(),
            password: Some("a".into()),
            password_hash: None,
            ..config.auth.users[0].clone()
        })
        .unwrap();
        assert_ne!(t.read().dummy_hash(), DUMMY_MOSQUITTO_HASH);
        assert!(t.delete_user("alice"));
        assert_eq!(t.read().dummy_hash(), DUMMY_MOSQUITTO_HASH);
        // $6$ (one round of SHA-512) is refused with the reason.
        let weak = UserConfig {
            password_hash: Some("$6$c2FsdA==$aGFzaA==".into()),
            ..config.auth.users[0].clone()
        };
        let err = t.put_user_config(&weak).unwrap_err().to_string();
        assert!(err.contains("too weak"), "{err}");
    }

    #[tokio::test]
    async fn rs256_tokens_from_a_key_pair() {
        use rsa::pkcs1::EncodeRsaPrivateKey;
        use rsa::pkcs8::{EncodePublicKey, LineEnding};
        let dir = tempfile::tempdir().unwrap();
        let private = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).unwrap();
        let (priv_path, pub_path) = (dir.path().join("k.pem"), dir.path().join("k.pub"));
        std::fs::write(
            &priv_path,
            private.to_pkcs1_pem(LineEnding::LF).unwrap().as_bytes(),
        )
        .unwrap();
        let public = private
            .to_public_key()
            .to_public_key_pem(LineEnding::LF)
            .unwrap();
        std::fs::write(&pub_path, public).unwrap();
        let mut config = Config::parse(&format!(
            "[auth]\nallow_anonymous = false\ntoken_public_key_file = {pub_path:?}\ntoken_private_key_file = {priv_path:?}\n[[auth.users]]\nname = \"alice\"\ntenant = \"acme\"\n"
        ))
        .unwrap();
        config.data_dir = dir.path().to_path_buf();
        let t = Tenancy::from_config(&config).unwrap();
        let token = t
            .sign_token("alice", Some(Duration::from_secs(60)))
            .unwrap();
        let p = t
            .authenticate(Credentials::Token(token.clone()), None)
            .await
            .unwrap();
        assert_eq!(p.tenant, "acme");
        // An HS256 token made with the public key as its secret (the classic confusion) fails.
        let forged = jwt::sign(
            &SignKey::Hs256(std::fs::read(&pub_path).unwrap()),
            "alice",
            None,
        )
        .unwrap();
        assert!(t
            .authenticate(Credentials::Token(forged), None)
            .await
            .is_err());
        // A verify-only gateway (no private key) still checks tokens but cannot make them.
        let mut verify_only = config.clone();
        verify_only.auth.token_private_key_file = None;
        let v = Tenancy::from_config(&verify_only).unwrap();
        assert!(v
            .authenticate(Credentials::Token(token), None)
            .await
            .is_ok());
        assert!(v.sign_token("alice", None).is_err());
    }

    #[tokio::test]
    async fn failures_from_one_address_slow_it_down() {
        let dir = tempfile::tempdir().unwrap();
        let t = two_users(dir.path());
        let ip: IpAddr = "127.0.0.9".parse().unwrap();
        let wrong = || Credentials::Password {
            user: "alice".into(),
            password: b"guess".to_vec(),
        };
        for _ in 0..3 {
            assert!(t.authenticate(wrong(), Some(ip)).await.is_err());
        }
        assert_eq!(t.penalty(ip), Duration::from_millis(100));
        assert!(t.authenticate(wrong(), Some(ip)).await.is_err());
        assert_eq!(t.penalty(ip), Duration::from_millis(200));
        let other: IpAddr = "127.0.0.10".parse().unwrap();
        assert_eq!(t.penalty(other), Duration::ZERO);
    }

    #[tokio::test]
    async fn logins_decided_at_once_are_those_authenticate_would_decide() {
        let dir = tempfile::tempdir().unwrap();
        let t = two_users(dir.path());
        let ip: IpAddr = "127.0.0.11".parse().unwrap();
        let alice = |password: &[u8]| Credentials::Password {
            user: "alice".into(),
            password: password.to_vec(),
        };
        // Not cached yet: argon2, the async way.
        assert_eq!(t.authenticate_now(&alice(b"s3cret"), Some(ip)), None);
        assert!(t.authenticate(alice(b"s3cret"), Some(ip)).await.is_ok());
        // Cached: decided now; one byte off goes to argon2 (and is refused there).
        let now = t.authenticate_now(&alice(b"s3cret"), Some(ip));
        assert_eq!(now.map(|r| r.map(|p| p.user)), Some(Ok("alice".into())));
        assert_eq!(t.authenticate_now(&alice(b"s3creT"), Some(ip)), None);
        assert_eq!(t.authenticate_now(&alice(b"s3cre"), Some(ip)), None);
        assert_eq!(
            t.authenticate(alice(b"s3creT"), Some(ip)).await,
            Err(AuthError::BadPassword)
        );
        // Anonymous refused at once, and counted: an address serving a delay waits it out
        // the async way, even with a cached password.
        for _ in 0..2 {
            assert_eq!(
                t.authenticate_now(&Credentials::Anonymous, Some(ip)),
                Some(Err(AuthError::AnonymousNotAllowed))
            );
        }
        assert!(!t.penalty(ip).is_zero());
        assert_eq!(t.authenticate_now(&alice(b"s3cret"), Some(ip)), None);
        // A deleted user is refused at once, although its login was cached.
        assert!(t.delete_user("alice"));
        let other: IpAddr = "127.0.0.12".parse().unwrap();
        assert_eq!(t.authenticate_now(&alice(b"s3cret"), Some(other)), None);
        assert_eq!(
            t.authenticate(alice(b"s3cret"), Some(other)).await,
            Err(AuthError::BadPassword)
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn server_busy_is_not_a_failure_of_the_address() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = two_users(dir.path());
        t.max_verifying = 0;
        let ip: IpAddr = "127.0.0.13".parse().unwrap();
        for _ in 0..5 {
            let creds = Credentials::Password {
                user: "alice".into(),
                password: b"s3cret".to_vec(),
            };
            assert_eq!(t.authenticate(creds, Some(ip)).await, Err(AuthError::Busy));
        }
        assert_eq!(t.penalty(ip), Duration::ZERO);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_herd_of_one_user_verifies_once_and_a_queue_past_the_limit_is_busy() {
        let dir = tempfile::tempdir().unwrap();
        let t = std::sync::Arc::new(two_users(dir.path()));
        let login = |user: &str, password: &[u8]| {
            let (t, creds) = (
                t.clone(),
                Credentials::Password {
                    user: user.into(),
                    password: password.to_vec(),
                },
            );
            tokio::spawn(async move { t.check(creds).await })
        };
        // 50 devices of alice at once: one argon2 run, 49 served by the cache.
        let herd: Vec<_> = (0..50).map(|_| login("alice", b"s3cret")).collect();
        for h in herd {
            assert_eq!(h.await.unwrap().unwrap().user, "alice");
        }
        assert_eq!(t.login_cache_stats(), (49, 1));
        // One byte off the cached password: refused, through argon2.
        assert_eq!(
            login("alice", b"s3creT").await.unwrap(),
            Err(AuthError::BadPassword)
        );
        // More distinct logins waiting than `max_waiting_logins` (here 2 per core): the
        // ones past it are refused as busy at once, the others verified.
        let mut limited = two_users(dir.path());
        limited.max_verifying = 2;
        let limited = std::sync::Arc::new(limited);
        let storm: Vec<_> = (0..20)
            .map(|i| {
                let t = limited.clone();
                tokio::spawn(async move {
                    t.check(Credentials::Password {
                        user: format!("nobody-{i}"),
                        password: b"x".to_vec(),
                    })
                    .await
                })
            })
            .collect();
        let mut busy = 0;
        for h in storm {
            match h.await.unwrap() {
                Err(AuthError::Busy) => busy += 1,
                Err(AuthError::BadPassword) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(busy > 0, "no login was told busy");
        assert_eq!(limited.verifying.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn permissions_and_broker_roles() {
        let dir = tempfile::tempdir().unwrap();
        let t = two_users(dir.path());
        let alice = Principal {
            user: "alice".into(),
            tenant: "acme".into(),
            namespace: "default".into(),
        };
        let reader = Principal {
            user: "reader".into(),
            ..alice.clone()
        };
        assert!(t.authorize(&alice, "anything", ActionName::Produce));
        assert!(!t.authorize(&alice, "anything", ActionName::Manage));
        assert!(t.authorize(&reader, "public-news", ActionName::Consume));
        assert!(!t.authorize(&reader, "public-news", ActionName::Produce));
        assert!(!t.authorize(&reader, "secret", ActionName::Consume));
        assert!(Authorizer::authorize(
            &t,
            "alice",
            "acme",
            "default",
            Action::Produce
        ));
        assert!(!Authorizer::authorize(
            &t,
            "alice",
            "globex",
            "default",
            Action::Produce
        ));
        assert!(Authorizer::authorize(
            &t,
            "magnetar-gateway",
            "globex",
            "x",
            Action::Manage
        ));
        assert!(!Authorizer::authorize(
            &t,
            "",
            "public",
            "default",
            Action::Consume
        ));
    }
}
