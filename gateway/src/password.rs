//! Stored password hashes: what a user's `password_hash` may be, and how a login is checked
//! against it.
//!
//! - **argon2id** PHC strings (`$argon2id$v=19$m=...`), what the gateway writes itself for a
//!   plain `password` (about 20 ms of CPU per check, on purpose: an attacker who steals the
//!   hashes pays as much per guess).
//! - **Mosquitto's `sha512-pbkdf2`** (`$7$<iterations>$<salt>$<hash>`, base64, what
//!   `mosquitto_passwd` writes by default since Mosquitto 2.0: PBKDF2-HMAC-SHA512, 64 bytes),
//!   accepted as they are, so that a fleet moving from Mosquitto keeps its password file (its
//!   devices' passwords never pass through anyone's hands again). Such a hash is exactly as
//!   strong as it was in Mosquitto: with its default 101 iterations a check costs about 50 µs,
//!   and so does a guess by whoever stole the file (docs/tenancy.md weighs it). The gateway
//!   never writes one.
//!
//! Mosquitto's older `$6$` (one round of salted SHA-512) is refused: it is too cheap to
//! attack to keep silently.

use argon2::password_hash::{PasswordHash, PasswordVerifier};
use argon2::Argon2;
use base64::Engine;
use pbkdf2::pbkdf2_hmac;
use sha2::Sha512;

/// Most PBKDF2 iterations accepted: a hash that costs more per check than argon2 is a
/// mistake, and a hostile config must not stall logins.
const MAX_ITERATIONS: u32 = 1_000_000;
/// Mosquitto's PBKDF2 output length (SHA-512's).
const PBKDF2_LEN: usize = 64;

/// Why a `password_hash` was not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HashError {
    #[error("not an argon2 PHC string: {0}")]
    Argon2(String),
    #[error("Mosquitto sha512-pbkdf2 hash ($7$iterations$salt$hash): {0}")]
    Pbkdf2(&'static str),
    #[error("Mosquitto's $6$ (salted SHA-512, one round) is too weak to accept: hash the password again with `mosquitto_passwd -H sha512-pbkdf2` or give it as `password`")]
    Sha512,
}

/// A stored password hash, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoredHash {
    /// An argon2 PHC string (checked when parsed).
    Argon2(String),
    /// Mosquitto's `sha512-pbkdf2`.
    Pbkdf2Sha512 {
        iterations: u32,
        salt: Vec<u8>,
        hash: [u8; PBKDF2_LEN],
    },
}

impl StoredHash {
    /// Parses a stored hash in one of the accepted forms.
    pub fn parse(text: &str) -> Result<StoredHash, HashError> {
        if let Some(rest) = text.strip_prefix("$7$") {
            return parse_pbkdf2(rest).map_err(HashError::Pbkdf2);
        }
        if text.starts_with("$6$") {
            return Err(HashError::Sha512);
        }
        PasswordHash::new(text).map_err(|e| HashError::Argon2(e.to_string()))?;
        Ok(StoredHash::Argon2(text.to_string()))
    }

    /// Whether `password` matches. CPU-bound (argon2: ~20 ms): call it off the runtime.
    pub fn verify(&self, password: &[u8]) -> bool {
        match self {
            StoredHash::Argon2(phc) => PasswordHash::new(phc)
                .map(|h| Argon2::default().verify_password(password, &h).is_ok())
                .unwrap_or(false),
            StoredHash::Pbkdf2Sha512 {
                iterations,
                salt,
                hash,
            } => {
                let mut derived = [0u8; PBKDF2_LEN];
                pbkdf2_hmac::<Sha512>(password, salt, *iterations, &mut derived);
                // Constant time: every byte is compared whatever the first difference.
                derived
                    .iter()
                    .zip(hash.iter())
                    .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                    == 0
            }
        }
    }
}

/// Whether `text` is an accepted stored hash.
pub fn check(text: &str) -> Result<(), HashError> {
    StoredHash::parse(text).map(|_| ())
}

/// Whether `password` matches the stored hash `text` (false for a malformed one).
pub fn verify(text: &str, password: &[u8]) -> bool {
    StoredHash::parse(text).is_ok_and(|h| h.verify(password))
}

/// The users of a Mosquitto password file, as config entries (`[[auth.users]]`).
#[derive(Debug, serde::Serialize)]
pub struct ImportedUsers {
    pub auth: ImportedAuth,
}

/// The `[auth]` table of [`ImportedUsers`].
#[derive(Debug, serde::Serialize)]
pub struct ImportedAuth {
    pub users: Vec<ImportedUser>,
}

/// One imported user.
#[derive(Debug, serde::Serialize, PartialEq, Eq)]
pub struct ImportedUser {
    pub name: String,
    pub password_hash: String,
    pub tenant: String,
    pub namespace: String,
}

/// Reads a Mosquitto password file (`user:hash` per line, `#` comments): its users with an
/// accepted hash, and the lines left out (1-based) with the reason.
pub fn import_mosquitto_passwd(
    text: &str,
    tenant: &str,
    namespace: &str,
) -> (ImportedUsers, Vec<(usize, String)>) {
    let mut users = Vec::new();
    let mut refused = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((name, hash)) = line.split_once(':') else {
            refused.push((i + 1, "no `user:hash`".to_string()));
            continue;
        };
        match check(hash) {
            Ok(()) if !name.is_empty() => users.push(ImportedUser {
                name: name.to_string(),
                password_hash: hash.to_string(),
                tenant: tenant.to_string(),
                namespace: namespace.to_string(),
            }),
            Ok(()) => refused.push((i + 1, "an empty user name".to_string())),
            Err(e) => refused.push((i + 1, format!("user {name:?}: {e}"))),
        }
    }
    (
        ImportedUsers {
            auth: ImportedAuth { users },
        },
        refused,
    )
}

fn parse_pbkdf2(rest: &str) -> Result<StoredHash, &'static str> {
    let mut parts = rest.split('$');
    let (Some(iterations), Some(salt), Some(hash), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("three fields after $7$ expected");
    };
    let iterations: u32 = iterations
        .parse()
        .map_err(|_| "the iteration count is not a number")?;
    if iterations == 0 || iterations > MAX_ITERATIONS {
        return Err("the iteration count is out of range (1 to 1,000,000)");
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let salt = b64.decode(salt).map_err(|_| "the salt is not base64")?;
    if salt.is_empty() {
        return Err("the salt is empty");
    }
    let hash = b64.decode(hash).map_err(|_| "the hash is not base64")?;
    let hash: [u8; PBKDF2_LEN] = hash
        .try_into()
        .map_err(|_| "the hash is not 64 bytes (PBKDF2-HMAC-SHA512)")?;
    Ok(StoredHash::Pbkdf2Sha512 {
        iterations,
        salt,
        hash,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Written by Mosquitto 2.0's `mosquitto_passwd -b passwd dev-1 s3cret`.
    const MOSQUITTO: &str = "$7$101$iaEkTP/5Y7MypDX8$m3ZQg+NFzGdXAIK6j67Lq2vO8jpsLwfFlL4Qexh/rHMl3DcTZcDEo3bnrolFHwp6gSHYYRKfrgd86wCxtwvYnA==";

    #[test]
    fn a_mosquitto_passwd_hash_checks_its_password_and_nothing_else() {
        assert!(verify(MOSQUITTO, b"s3cret"));
        assert!(!verify(MOSQUITTO, b"s3cre"));
        assert!(!verify(MOSQUITTO, b"s3creT"));
        assert!(!verify(MOSQUITTO, b""));
    }

    #[test]
    fn an_argon2_hash_still_checks() {
        let phc = crate::tenancy::hash_password(b"s3cret").unwrap();
        assert!(matches!(StoredHash::parse(&phc), Ok(StoredHash::Argon2(_))));
        assert!(verify(&phc, b"s3cret"));
        assert!(!verify(&phc, b"s3creu"));
    }

    #[test]
    fn a_password_file_imports_as_config_users() {
        let file = format!("# devices\ndev-1:{MOSQUITTO}\n\nold:$6$c2FsdA==$aGFzaA==\ngarbage\n");
        let (users, refused) = import_mosquitto_passwd(&file, "acme", "fleet");
        assert_eq!(
            users.auth.users,
            vec![ImportedUser {
                name: "dev-1".into(),
                password_hash: MOSQUITTO.into(),
                tenant: "acme".into(),
                namespace: "fleet".into(),
            }]
        );
        assert_eq!(refused.iter().map(|r| r.0).collect::<Vec<_>>(), vec![4, 5]);
        // What it prints loads as the gateway's config, and the user logs in with it.
        let toml = toml::to_string(&users).unwrap();
        let config = crate::config::Config::parse(&toml).unwrap();
        assert!(verify(
            config.auth.users[0].password_hash.as_deref().unwrap(),
            b"s3cret"
        ));
    }

    #[test]
    fn malformed_and_weak_hashes_are_refused_with_the_reason() {
        assert_eq!(check("$6$c2FsdA==$aGFzaA=="), Err(HashError::Sha512));
        let hash = MOSQUITTO.rsplit('$').next().unwrap();
        for (text, reason) in [
            ("$7$101$c2FsdA==".to_string(), "three fields"),
            (format!("$7$0$c2FsdA==${hash}"), "out of range"),
            (format!("$7$1000001$c2FsdA==${hash}"), "out of range"),
            (format!("$7$x$c2FsdA==${hash}"), "not a number"),
            (format!("$7$101$!!${hash}"), "salt is not base64"),
            (format!("$7$101$${hash}"), "salt is empty"),
            ("$7$101$c2FsdA==$aGFzaA==".to_string(), "not 64 bytes"),
            (format!("$7$101$c2FsdA==${hash}$x"), "three fields"),
        ] {
            let err = check(&text).unwrap_err().to_string();
            assert!(err.contains(reason), "{text}: {err}");
            assert!(!verify(&text, b"s3cret"));
        }
        assert!(matches!(check("plain"), Err(HashError::Argon2(_))));
    }
}
