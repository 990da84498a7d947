//! Token authentication as Apache Pulsar does it, and the authorization hook.
//!
//! Tokens are JWTs whose `sub` claim is the *role*, with an optional `exp` (seconds since
//! the Unix epoch), signed with HS256 (a shared secret key) or RS256 (an RSA key pair), the
//! same tokens `pulsar tokens create` issues. Verification pins the algorithm to the key's:
//! a token with `alg: none`, or signed with another algorithm, is refused.
//!
//! Who may touch which topic is not the broker's business alone: the gateway knows tenants
//! and users. The broker asks an [`Authorizer`] for each producer, consumer and lookup; the
//! default ([`TenantRoles`]) lets superusers do anything and any other role only touch its
//! own tenant's topics.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// Why a token was refused or could not be made.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("token refused: {0}")]
    Invalid(String),
    #[error("token expired")]
    Expired,
    #[error("key is not usable: {0}")]
    Key(String),
}

/// The claims Magnetar reads and writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
}

/// A key that verifies tokens.
#[derive(Clone)]
pub enum VerifyKey {
    /// HS256 with a shared secret (raw bytes, as in Pulsar's `tokenSecretKey`).
    Hs256(Vec<u8>),
    /// RS256 with an RSA public key (PEM).
    Rs256(Vec<u8>),
}

/// A key that signs tokens.
#[derive(Clone)]
pub enum SignKey {
    Hs256(Vec<u8>),
    /// RS256 with an RSA private key (PEM, PKCS#1 or PKCS#8).
    Rs256(Vec<u8>),
}

impl std::fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VerifyKey::Hs256(_) => f.write_str("VerifyKey::Hs256(..)"),
            VerifyKey::Rs256(_) => f.write_str("VerifyKey::Rs256(..)"),
        }
    }
}

impl std::fmt::Debug for SignKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SignKey::Hs256(_) => f.write_str("SignKey::Hs256(..)"),
            SignKey::Rs256(_) => f.write_str("SignKey::Rs256(..)"),
        }
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Makes a token for `role`, valid until `exp` (seconds since the epoch) if given.
pub fn sign(key: &SignKey, role: &str, exp: Option<u64>) -> Result<String, AuthError> {
    let claims = Claims {
        sub: role.to_string(),
        exp,
    };
    let (alg, enc) = match key {
        SignKey::Hs256(secret) => (Algorithm::HS256, EncodingKey::from_secret(secret)),
        SignKey::Rs256(pem) => (
            Algorithm::RS256,
            EncodingKey::from_rsa_pem(pem).map_err(|e| AuthError::Key(e.to_string()))?,
        ),
    };
    jsonwebtoken::encode(&Header::new(alg), &claims, &enc)
        .map_err(|e| AuthError::Key(e.to_string()))
}

/// Checks a token's signature, algorithm and expiry; returns its claims.
pub fn verify(key: &VerifyKey, token: &str) -> Result<Claims, AuthError> {
    let (alg, dec) = match key {
        VerifyKey::Hs256(secret) => (Algorithm::HS256, DecodingKey::from_secret(secret)),
        VerifyKey::Rs256(pem) => (
            Algorithm::RS256,
            DecodingKey::from_rsa_pem(pem).map_err(|e| AuthError::Key(e.to_string()))?,
        ),
    };
    let mut validation = Validation::new(alg);
    // Pulsar tokens need not expire; `exp` is checked below when present.
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.leeway = 0;
    let data = jsonwebtoken::decode::<Claims>(token.trim(), &dec, &validation)
        .map_err(|e| AuthError::Invalid(e.to_string()))?;
    if let Some(exp) = data.claims.exp {
        if exp <= now_secs() {
            return Err(AuthError::Expired);
        }
    }
    if data.claims.sub.is_empty() {
        return Err(AuthError::Invalid("empty subject".into()));
    }
    Ok(data.claims)
}

/// What a client wants to do with a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Produce,
    Consume,
    /// Lookups, metadata, topic listing and admin calls.
    Manage,
}

/// Decides whether a role may do `action` on the topic of `tenant`/`namespace`.
pub trait Authorizer: Send + Sync {
    fn authorize(&self, role: &str, tenant: &str, namespace: &str, action: Action) -> bool;
}

/// Superusers may do anything; another role may only use the tenants it is mapped to.
#[derive(Debug, Clone, Default)]
pub struct TenantRoles {
    pub superusers: Vec<String>,
    /// role → tenants it may use.
    pub tenants: HashMap<String, Vec<String>>,
}

impl Authorizer for TenantRoles {
    fn authorize(&self, role: &str, tenant: &str, _namespace: &str, _action: Action) -> bool {
        self.superusers.iter().any(|s| s == role)
            || self
                .tenants
                .get(role)
                .is_some_and(|ts| ts.iter().any(|t| t == tenant))
    }
}

/// The broker's authentication settings (`BrokerConfig::auth`).
#[derive(Clone)]
pub struct BrokerAuth {
    /// Verifies the tokens clients present in `CommandConnect`.
    pub verify_key: VerifyKey,
    /// Decides, per topic and action, what an authenticated role may do.
    pub authorizer: std::sync::Arc<dyn Authorizer>,
    /// Role given to clients that present no token (Pulsar's `anonymousUserRole`); `None`
    /// refuses them.
    pub anonymous_role: Option<String>,
}

impl std::fmt::Debug for BrokerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerAuth")
            .field("verify_key", &self.verify_key)
            .field("anonymous_role", &self.anonymous_role)
            .finish_non_exhaustive()
    }
}

impl BrokerAuth {
    /// The role of a client from `CommandConnect`'s `auth_method_name` and `auth_data`
    /// (Pulsar's token provider: method `"token"`, data the JWT). No credentials give the
    /// anonymous role, if there is one.
    pub fn authenticate(
        &self,
        method: Option<&str>,
        data: Option<&[u8]>,
    ) -> Result<String, AuthError> {
        match (method, data) {
            (Some("token"), Some(data)) => {
                let token = std::str::from_utf8(data)
                    .map_err(|_| AuthError::Invalid("token is not UTF-8".into()))?;
                Ok(verify(&self.verify_key, token)?.sub)
            }
            (Some("token"), None) => Err(AuthError::Invalid("empty token".into())),
            (Some(m), _) if !m.is_empty() && m != "none" => Err(AuthError::Invalid(format!(
                "authentication method {m:?} is not supported"
            ))),
            _ => self
                .anonymous_role
                .clone()
                .ok_or_else(|| AuthError::Invalid("authentication required".into())),
        }
    }
}

/// Reads a token-signing secret as Pulsar's `tokenSecretKey` file holds it: raw bytes, or
/// text `data:;base64,<base64>`.
pub fn secret_from_file_bytes(bytes: &[u8]) -> Result<Vec<u8>, AuthError> {
    use base64::Engine as _;
    const PREFIX: &[u8] = b"data:;base64,";
    match bytes.strip_prefix(PREFIX) {
        Some(b64) => base64::engine::general_purpose::STANDARD
            .decode(b64.trim_ascii())
            .map_err(|e| AuthError::Key(format!("bad base64 secret: {e}"))),
        None => Ok(bytes.to_vec()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hs256_round_trip_expiry_and_wrong_key() {
        let key = b"0123456789abcdef0123456789abcdef".to_vec();
        let t = sign(&SignKey::Hs256(key.clone()), "alice", None).unwrap();
        assert_eq!(
            verify(&VerifyKey::Hs256(key.clone()), &t).unwrap().sub,
            "alice"
        );
        let t = sign(&SignKey::Hs256(key.clone()), "alice", Some(now_secs() + 60)).unwrap();
        assert!(verify(&VerifyKey::Hs256(key.clone()), &t).is_ok());
        let t = sign(&SignKey::Hs256(key.clone()), "alice", Some(now_secs() - 1)).unwrap();
        assert!(matches!(
            verify(&VerifyKey::Hs256(key.clone()), &t),
            Err(AuthError::Expired)
        ));
        let t = sign(&SignKey::Hs256(b"another key".to_vec()), "alice", None).unwrap();
        assert!(verify(&VerifyKey::Hs256(key), &t).is_err());
    }

    #[test]
    fn alg_none_is_refused() {
        use base64_url as b64;
        let header = b64("{\"alg\":\"none\",\"typ\":\"JWT\"}");
        let body = b64("{\"sub\":\"admin\"}");
        let token = format!("{header}.{body}.");
        assert!(verify(&VerifyKey::Hs256(b"k".to_vec()), &token).is_err());
    }

    fn base64_url(s: &str) -> String {
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let b = s.as_bytes();
        let mut out = String::new();
        for chunk in b.chunks(3) {
            let n =
                chunk.iter().fold(0u32, |acc, &x| (acc << 8) | x as u32) << (8 * (3 - chunk.len()));
            for i in 0..=chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }

    #[test]
    fn connect_credentials_give_a_role() {
        let key = b"secret".to_vec();
        let auth = BrokerAuth {
            verify_key: VerifyKey::Hs256(key.clone()),
            authorizer: std::sync::Arc::new(TenantRoles::default()),
            anonymous_role: None,
        };
        let t = sign(&SignKey::Hs256(key), "bob", None).unwrap();
        assert_eq!(
            auth.authenticate(Some("token"), Some(t.as_bytes()))
                .unwrap(),
            "bob"
        );
        assert!(auth.authenticate(None, None).is_err());
        assert!(auth.authenticate(Some("basic"), Some(b"x")).is_err());
        let anon = BrokerAuth {
            anonymous_role: Some("guest".into()),
            ..auth
        };
        assert_eq!(anon.authenticate(None, None).unwrap(), "guest");
        assert!(anon.authenticate(Some("token"), Some(b"garbage")).is_err());
    }

    #[test]
    fn secret_files_raw_or_base64() {
        assert_eq!(secret_from_file_bytes(b"raw\n").unwrap(), b"raw\n");
        assert_eq!(
            secret_from_file_bytes(b"data:;base64,aGVsbG8=\n").unwrap(),
            b"hello"
        );
        assert!(secret_from_file_bytes(b"data:;base64,!!").is_err());
    }

    #[test]
    fn tenant_roles() {
        let mut r = TenantRoles {
            superusers: vec!["gateway".into()],
            ..Default::default()
        };
        r.tenants.insert("alice".into(), vec!["acme".into()]);
        assert!(r.authorize("gateway", "globex", "default", Action::Manage));
        assert!(r.authorize("alice", "acme", "default", Action::Produce));
        assert!(!r.authorize("alice", "globex", "default", Action::Consume));
        assert!(!r.authorize("mallory", "acme", "default", Action::Consume));
    }
}
