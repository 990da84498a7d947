//! Principals, credentials, and the names a principal may use.
//!
//! Every connection acts as one [`Principal`] once authenticated, and everything it names —
//! topics, subscriptions, kv keys — is placed inside that principal's tenant and namespace by
//! the host, never by the plugin or the client. A plugin passes short names (`mqtt`), which
//! [`validate_name`] keeps free of anything that could reach another namespace (`/`, `://`,
//! `..`, `%`-escapes); the host alone builds the `persistent://tenant/ns/name` URL.
//!
//! This first cut knows users from the config file with plain passwords, and anonymous access;
//! hashed passwords, tokens, SASL and mTLS build on the same [`Tenancy::authenticate`].

use std::collections::HashMap;

use crate::config::AuthSection;

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
    Password { user: String, password: Vec<u8> },
    Token(String),
}

/// Why authentication failed. The message goes to the log, not to the client.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("anonymous access is not allowed")]
    AnonymousNotAllowed,
    #[error("unknown user or wrong password")]
    BadPassword,
    #[error("token authentication is not configured")]
    TokensNotConfigured,
}

/// A name a plugin used that the host refuses.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("name is empty")]
    Empty,
    #[error("name is longer than {MAX_NAME_LEN} bytes")]
    TooLong,
    #[error("name {0:?} has a character other than A-Z a-z 0-9 . _ - %")]
    BadCharacter(String),
    #[error("name {0:?} is reserved for the gateway")]
    Reserved(String),
}

/// Longest topic or subscription name a plugin may use.
pub const MAX_NAME_LEN: usize = 200;

/// Users and what anonymous clients may do.
#[derive(Debug)]
pub struct Tenancy {
    allow_anonymous: bool,
    users: HashMap<String, (Vec<u8>, Principal)>,
}

impl Tenancy {
    pub fn from_config(auth: &AuthSection) -> Tenancy {
        let users = auth
            .users
            .iter()
            .map(|u| {
                let principal = Principal {
                    user: u.name.clone(),
                    tenant: u.tenant.clone(),
                    namespace: u.namespace.clone(),
                };
                (u.name.clone(), (u.password.as_bytes().to_vec(), principal))
            })
            .collect();
        Tenancy {
            allow_anonymous: auth.allow_anonymous,
            users,
        }
    }

    /// Checks credentials and says who they belong to.
    pub fn authenticate(&self, creds: &Credentials) -> Result<Principal, AuthError> {
        match creds {
            Credentials::Anonymous if self.allow_anonymous => Ok(Principal {
                user: "anonymous".into(),
                tenant: "public".into(),
                namespace: "default".into(),
            }),
            Credentials::Anonymous => Err(AuthError::AnonymousNotAllowed),
            Credentials::Password { user, password } => match self.users.get(user) {
                Some((expected, principal)) if constant_time_eq(expected, password) => {
                    Ok(principal.clone())
                }
                _ => Err(AuthError::BadPassword),
            },
            Credentials::Token(_) => Err(AuthError::TokensNotConfigured),
        }
    }
}

/// Compares secrets without an early exit that would leak how much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Checks a short topic or subscription name from a plugin.
pub fn validate_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong);
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '%')))
    {
        let _ = c;
        return Err(NameError::BadCharacter(name.to_string()));
    }
    if name.starts_with("__") || name == "." || name == ".." {
        return Err(NameError::Reserved(name.to_string()));
    }
    Ok(())
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
    fn names_cannot_escape_the_namespace() {
        for bad in [
            "",
            "a/b",
            "persistent://x/y/z",
            "..",
            "%2F/x",
            "/a",
            "a/",
            "+",
            "#",
            "__magnetar_kv",
            "a b",
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["mqtt", "mqtt-session-abc%2Fdef", "a.b_c-d"] {
            assert_eq!(validate_name(good), Ok(()), "{good:?} refused");
        }
    }

    #[test]
    fn passwords_and_anonymous() {
        let auth = AuthSection {
            allow_anonymous: false,
            users: vec![crate::config::UserConfig {
                name: "alice".into(),
                password: "s3cret".into(),
                tenant: "acme".into(),
                namespace: "default".into(),
            }],
        };
        let t = Tenancy::from_config(&auth);
        assert_eq!(
            t.authenticate(&Credentials::Anonymous),
            Err(AuthError::AnonymousNotAllowed)
        );
        let ok = t.authenticate(&Credentials::Password {
            user: "alice".into(),
            password: b"s3cret".to_vec(),
        });
        assert_eq!(ok.map(|p| p.tenant), Ok("acme".to_string()));
        let bad = t.authenticate(&Credentials::Password {
            user: "alice".into(),
            password: b"s3cre".to_vec(),
        });
        assert_eq!(bad, Err(AuthError::BadPassword));
    }
}
