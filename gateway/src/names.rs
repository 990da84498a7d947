//! The names plugins and operators use, checked before they reach Pulsar.
//!
//! A tenant or namespace name ([`validate_segment`]) and a plugin's short topic or
//! subscription name ([`validate_name`]) never hold anything that could nest or escape
//! (`/`, `://`, `..`, `%`-escapes of a `/`), and names starting with `__` are the gateway's
//! own (its kv topic). Only the host builds a full `persistent://tenant/namespace/name` URL
//! (see `tenancy::topic_url`); [`tenant_of`] reads the tenant back out of one.

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

/// Checks a tenant or namespace name: what Pulsar allows, minus anything that could nest.
pub fn validate_segment(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > 64 {
        return Err(NameError::TooLong);
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        || name.starts_with('.')
    {
        return Err(NameError::BadCharacter(name.to_string()));
    }
    if name.starts_with("__") {
        return Err(NameError::Reserved(name.to_string()));
    }
    Ok(())
}

/// Checks a short topic or subscription name from a plugin.
pub fn validate_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong);
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '%'))
    {
        return Err(NameError::BadCharacter(name.to_string()));
    }
    if name.starts_with("__") || name == "." || name == ".." {
        return Err(NameError::Reserved(name.to_string()));
    }
    Ok(())
}

/// The tenant of a `persistent://tenant/namespace/topic` URL.
pub fn tenant_of(topic_url: &str) -> Option<&str> {
    let rest = topic_url
        .strip_prefix("persistent://")
        .or_else(|| topic_url.strip_prefix("non-persistent://"))?;
    rest.split('/').next().filter(|t| !t.is_empty())
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
        for bad in ["", "a/b", "..", ".x", "__x", "a%2Fb", "a:b"] {
            assert!(validate_segment(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn tenant_of_a_topic_url() {
        assert_eq!(tenant_of("persistent://acme/ns/t"), Some("acme"));
        assert_eq!(tenant_of("non-persistent://acme/ns/t"), Some("acme"));
        assert_eq!(tenant_of("persistent:///ns/t"), None);
        assert_eq!(tenant_of("acme/ns/t"), None);
    }
}
