//! Topic names and their on-disk spelling.
//!
//! Pulsar clients name a topic in three ways: `persistent://tenant/ns/name`, `tenant/ns/name`
//! and a bare `name` (which means `persistent://public/default/name`). [`TopicName::parse`]
//! accepts all three and yields the one canonical form, so that every client reaches the same
//! log. Names come from the network: they are length-checked and control characters are
//! refused. [`escape`] turns a name into a single, reversible file-name component, so a hostile
//! name can never walk out of the data directory.

use std::fmt;

/// Longest canonical topic name we accept (keeps escaped directory names under 255 bytes
/// for ordinary names; escaping at most triples a byte).
pub const MAX_TOPIC_NAME_LEN: usize = 80;
/// Longest subscription name we accept.
pub const MAX_SUBSCRIPTION_NAME_LEN: usize = 80;

const SCHEME: &str = "persistent://";

/// A validated, canonical persistent topic name (`persistent://tenant/namespace/local`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicName {
    canonical: String,
}

/// Why a topic name was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("topic name is empty")]
    Empty,
    #[error("topic name is longer than {MAX_TOPIC_NAME_LEN} bytes")]
    TooLong,
    #[error("only persistent:// topics are supported")]
    UnsupportedDomain,
    #[error("topic name must be `name`, `tenant/namespace/name` or `persistent://tenant/namespace/name`")]
    Malformed,
    #[error("name contains a control character")]
    ControlCharacter,
}

impl TopicName {
    /// Parses any of the three client spellings into the canonical name.
    pub fn parse(input: &str) -> Result<TopicName, NameError> {
        if input.is_empty() {
            return Err(NameError::Empty);
        }
        if input.chars().any(char::is_control) {
            return Err(NameError::ControlCharacter);
        }
        let rest = if let Some(rest) = input.strip_prefix(SCHEME) {
            rest.to_string()
        } else if input.contains("://") {
            return Err(NameError::UnsupportedDomain);
        } else if input.contains('/') {
            input.to_string()
        } else {
            format!("public/default/{input}")
        };
        let mut parts = rest.splitn(3, '/');
        let (tenant, ns, local) = match (parts.next(), parts.next(), parts.next()) {
            (Some(t), Some(n), Some(l)) => (t, n, l),
            _ => return Err(NameError::Malformed),
        };
        if tenant.is_empty() || ns.is_empty() || local.is_empty() || local.contains('/') {
            return Err(NameError::Malformed);
        }
        let canonical = format!("{SCHEME}{tenant}/{ns}/{local}");
        if canonical.len() > MAX_TOPIC_NAME_LEN + SCHEME.len() {
            return Err(NameError::TooLong);
        }
        Ok(TopicName { canonical })
    }

    /// The canonical `persistent://tenant/ns/name` string.
    pub fn as_str(&self) -> &str {
        &self.canonical
    }

    /// `tenant/namespace` of this topic.
    pub fn namespace(&self) -> &str {
        let rest = self
            .canonical
            .strip_prefix(SCHEME)
            .unwrap_or(&self.canonical);
        match rest.rfind('/') {
            Some(i) => rest.get(..i).unwrap_or(rest),
            None => rest,
        }
    }

    /// The directory name of this topic's log under `data_dir/topics/`.
    pub fn dir_name(&self) -> String {
        escape(&self.canonical)
    }

    /// Recovers a topic name from a directory name written by [`TopicName::dir_name`].
    pub fn from_dir_name(dir: &str) -> Option<TopicName> {
        TopicName::parse(&unescape(dir)?).ok()
    }
}

impl fmt::Display for TopicName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.canonical)
    }
}

/// Checks a subscription name from the network.
pub fn validate_subscription(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        Err(NameError::Empty)
    } else if name.len() > MAX_SUBSCRIPTION_NAME_LEN {
        Err(NameError::TooLong)
    } else if name.chars().any(char::is_control) {
        Err(NameError::ControlCharacter)
    } else {
        Ok(())
    }
}

/// Percent-escapes every byte outside `[A-Za-z0-9_.-]` (and a leading `.`), giving one safe,
/// reversible file-name component: never containing `/`, never `.` or `..`.
pub fn escape(name: &str) -> String {
    let mut out = String::with_capacity(name.len() * 3);
    for (i, b) in name.bytes().enumerate() {
        let plain = b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || (b == b'.' && i > 0);
        if plain {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Inverse of [`escape`]; `None` for anything [`escape`] cannot have produced.
pub fn unescape(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = *bytes.get(i)?;
        if b == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_spellings_reach_one_topic() {
        let a = TopicName::parse("foo").unwrap();
        let b = TopicName::parse("public/default/foo").unwrap();
        let c = TopicName::parse("persistent://public/default/foo").unwrap();
        assert_eq!(a, b);
        assert_eq!(b, c);
        assert_eq!(a.as_str(), "persistent://public/default/foo");
        assert_eq!(a.namespace(), "public/default");
    }

    #[test]
    fn bad_names_are_refused() {
        assert!(TopicName::parse("").is_err());
        assert!(TopicName::parse("a/b").is_err());
        assert!(TopicName::parse("non-persistent://a/b/c").is_err());
        assert!(TopicName::parse("a//c").is_err());
        assert!(TopicName::parse("x\u{0}y").is_err());
        assert!(TopicName::parse(&"x".repeat(500)).is_err());
    }

    #[test]
    fn escaping_round_trips_and_stays_one_component() {
        for name in ["persistent://public/default/a.b", "../..", ".hidden", "%41"] {
            let e = escape(name);
            assert!(!e.contains('/'));
            assert!(!e.starts_with('.'));
            assert_eq!(unescape(&e).as_deref(), Some(name));
        }
    }
}
