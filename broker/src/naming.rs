//! Topic names and their on-disk spelling.
//!
//! Pulsar clients name a topic in three ways: `persistent://tenant/ns/name`, `tenant/ns/name`
//! and a bare `name` (which means `persistent://public/default/name`). [`TopicName::parse`]
//! accepts all three and yields the one canonical form, so that every client reaches the same
//! log. Names come from the network: they are length-checked and control characters are
//! refused. [`escape`] turns a name into a single, reversible file-name component, so a hostile
//! name can never walk out of the data directory.

use std::fmt;

/// Longest topic name we accept (without the `persistent://` scheme).
pub const MAX_TOPIC_NAME_LEN: usize = 1024;
/// Longest directory name used as is; longer escaped names are shortened (see
/// [`TopicName::dir_name`]). File systems allow 255 bytes.
const MAX_DIR_NAME: usize = 200;
/// File in a shortened topic directory that holds the topic's full name.
pub const NAME_FILE: &str = "topic-name";
/// Longest subscription name we accept.
pub const MAX_SUBSCRIPTION_NAME_LEN: usize = 80;

const SCHEME: &str = "persistent://";
/// The scheme of non-persistent topics (`non_persistent`).
const NON_PERSISTENT_SCHEME: &str = "non-persistent://";
/// What joins a partitioned topic's name and a partition's index (`t-partition-0`).
const PARTITION_SUFFIX: &str = "-partition-";

/// A validated, canonical persistent topic name (`persistent://tenant/namespace/local`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicName {
    canonical: String,
}

/// A topic's domain: stored (`persistent://`) or only passed on to connected consumers
/// (`non-persistent://`, see the `non_persistent` module).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Domain {
    Persistent,
    NonPersistent,
}

/// Why a topic name was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("topic name is empty")]
    Empty,
    #[error("topic name is longer than {MAX_TOPIC_NAME_LEN} bytes")]
    TooLong,
    #[error("only persistent:// and non-persistent:// topics are supported")]
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

    /// Parses a name of either domain: the topic in its persistent spelling, and whether it
    /// was named `non-persistent://` (a non-persistent topic shares the tenant, namespace
    /// and local name rules, and the authorization, of its persistent namesake).
    pub fn parse_domain(input: &str) -> Result<(TopicName, Domain), NameError> {
        match input.strip_prefix(NON_PERSISTENT_SCHEME) {
            Some(rest) => Ok((
                TopicName::parse(&format!("{SCHEME}{rest}"))?,
                Domain::NonPersistent,
            )),
            None => Ok((TopicName::parse(input)?, Domain::Persistent)),
        }
    }

    /// This topic's name in the `non-persistent://` domain.
    pub fn non_persistent_name(&self) -> String {
        let rest = self
            .canonical
            .strip_prefix(SCHEME)
            .unwrap_or(&self.canonical);
        format!("{NON_PERSISTENT_SCHEME}{rest}")
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

    /// Partition `index` of this partitioned topic (`name-partition-N`).
    pub fn partition(&self, index: u32) -> Result<TopicName, NameError> {
        TopicName::parse(&format!("{}{PARTITION_SUFFIX}{index}", self.canonical))
    }

    /// The partition this topic is of a partitioned topic (`name-partition-N`), if any.
    pub fn partition_index(&self) -> Option<u32> {
        let (_, index) = self.canonical.rsplit_once(PARTITION_SUFFIX)?;
        if index.len() > 1 && index.starts_with('0') {
            return None;
        }
        index.parse().ok()
    }

    /// The tenant and the namespace's own name (`tenant`, `ns` of `tenant/ns`).
    pub fn tenant_and_namespace(&self) -> (&str, &str) {
        split_namespace(self.namespace())
    }

    /// The directory name of this topic's log under `data_dir/topics/`: the escaped name,
    /// or, when that is too long for a file name, a prefix of it, `~` and a 64-bit hash of
    /// the name (the full name then lives in the directory's [`NAME_FILE`]; `~` never
    /// appears in an escaped name, so the two forms cannot meet).
    pub fn dir_name(&self) -> String {
        let escaped = escape(&self.canonical);
        if escaped.len() <= MAX_DIR_NAME {
            return escaped;
        }
        let bytes = self.canonical.as_bytes();
        let hash = (u64::from(crc32c::crc32c(bytes)) << 32)
            | u64::from(crc32c::crc32c_append(0x9e37_79b9, bytes));
        // Escaped names are ASCII, so any byte index is a char boundary.
        let prefix = escaped.get(..MAX_DIR_NAME - 17).unwrap_or("");
        format!("{prefix}~{hash:016x}")
    }

    /// Whether [`TopicName::dir_name`] is shortened (the full name is in [`NAME_FILE`]).
    pub fn is_shortened_dir(dir: &str) -> bool {
        dir.contains('~')
    }

    /// Recovers a topic name from a directory name written by [`TopicName::dir_name`]
    /// (`None` for a shortened one: read its [`NAME_FILE`]).
    pub fn from_dir_name(dir: &str) -> Option<TopicName> {
        if TopicName::is_shortened_dir(dir) {
            return None;
        }
        TopicName::parse(&unescape(dir)?).ok()
    }
}

impl fmt::Display for TopicName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.canonical)
    }
}

/// Splits `tenant/ns` into its two parts (the whole string and "" if there is no `/`).
pub fn split_namespace(namespace: &str) -> (&str, &str) {
    namespace.split_once('/').unwrap_or((namespace, ""))
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
    fn a_partition_knows_its_index() {
        let index = |name: &str| TopicName::parse(name).unwrap().partition_index();
        assert_eq!(index("t-partition-0"), Some(0));
        assert_eq!(index("a/b/t-partition-12"), Some(12));
        assert_eq!(index("t-partition-x-partition-3"), Some(3));
        assert_eq!(index("t"), None);
        assert_eq!(index("t-partition-"), None);
        assert_eq!(index("t-partition-01"), None);
        assert_eq!(index("t-partition-3x"), None);
    }

    #[test]
    fn non_persistent_names_keep_their_domain() {
        let (name, domain) = TopicName::parse_domain("non-persistent://t/ns/x").unwrap();
        assert_eq!(domain, Domain::NonPersistent);
        assert_eq!(name.as_str(), "persistent://t/ns/x");
        assert_eq!(name.non_persistent_name(), "non-persistent://t/ns/x");
        let (name, domain) = TopicName::parse_domain("x").unwrap();
        assert_eq!(
            (name.as_str(), domain),
            ("persistent://public/default/x", Domain::Persistent)
        );
        assert!(TopicName::parse_domain("non-persistent://x").is_err());
        assert!(TopicName::parse_domain("non-persistent://a/b/c/d").is_err());
        assert!(TopicName::parse_domain("other://a/b/c").is_err());
    }

    #[test]
    fn bad_names_are_refused() {
        assert!(TopicName::parse("").is_err());
        assert!(TopicName::parse("a/b").is_err());
        assert!(TopicName::parse("non-persistent://a/b/c").is_err());
        assert!(TopicName::parse("a//c").is_err());
        assert!(TopicName::parse("x\u{0}y").is_err());
        assert!(TopicName::parse(&"x".repeat(1100)).is_err());
    }

    #[test]
    fn long_names_get_short_distinct_directories() {
        let a = TopicName::parse(&format!("t/ns/{}", "é".repeat(300))).unwrap();
        let b = TopicName::parse(&format!("t/ns/{}x", "é".repeat(300))).unwrap();
        assert!(a.dir_name().len() <= 200 && b.dir_name().len() <= 200);
        assert_ne!(a.dir_name(), b.dir_name());
        assert!(TopicName::is_shortened_dir(&a.dir_name()));
        assert!(TopicName::from_dir_name(&a.dir_name()).is_none());
        let short = TopicName::parse("t/ns/short").unwrap();
        assert_eq!(TopicName::from_dir_name(&short.dir_name()), Some(short));
        assert!(TopicName::parse(&"x".repeat(2000)).is_err());
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
