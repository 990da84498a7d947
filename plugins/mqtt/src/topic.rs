//! Topic Names and Topic Filters (MQTT 3.1.1 / 5.0 §4.7): validation and wildcard matching.
//!
//! Matching is done here, in the plugin, because every MQTT topic of a namespace lives in one
//! Pulsar topic (see the crate docs): each delivery is matched against the connection's
//! filters by its `mqtt.topic` property.

/// Longest Topic Name or Filter: a UTF-8 string is at most 65,535 bytes (§1.5.3).
const MAX_LEN: usize = 65_535;

/// Why a Topic Name is refused (§4.7.3).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicNameError {
    #[error("empty Topic Name (§4.7.3)")]
    Empty,
    #[error("Topic Name longer than 65535 bytes")]
    TooLong,
    #[error("Topic Name contains U+0000 (§1.5.3)")]
    Nul,
    #[error("wildcard in the Topic Name of a PUBLISH (§3.3.2.1)")]
    Wildcard,
}

/// Checks a Topic Name a client publishes to (§3.3.2.1, §4.7.3).
pub fn validate_name(name: &str) -> Result<(), TopicNameError> {
    if name.is_empty() {
        Err(TopicNameError::Empty)
    } else if name.len() > MAX_LEN {
        Err(TopicNameError::TooLong)
    } else if !name.bytes().any(|b| matches!(b, 0 | b'+' | b'#')) {
        // One pass over the bytes (all three are ASCII, never inside a multi-byte character):
        // this runs on every message, in and out.
        Ok(())
    } else if name.contains('\0') {
        Err(TopicNameError::Nul)
    } else {
        Err(TopicNameError::Wildcard)
    }
}

/// Whether a client may not publish to `name`: `$SYS` and its subtopics are the server's
/// (§4.7.2). Mosquitto refuses them the same way; other `$` topics are open.
pub fn is_server_topic(name: &str) -> bool {
    name == "$SYS" || name.starts_with("$SYS/")
}

/// Whether `filter` is a valid Topic Filter (§4.7.1): non-empty, no NUL, `#` only as the
/// whole last level, `+` only as a whole level.
pub fn is_valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.len() > MAX_LEN || filter.contains('\0') {
        return false;
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        match level {
            "#" if levels.peek().is_some() => return false,
            "#" | "+" => {}
            _ if level.contains(['+', '#']) => return false,
            _ => {}
        }
    }
    true
}

/// Whether the Topic Name `topic` matches the (valid) Topic Filter `filter` (§4.7.1, §4.7.2).
///
/// `#` matches its parent level and any number of child levels (`a/#` matches `a`); `+`
/// matches exactly one level, which may be empty. A filter that starts with a wildcard does
/// not match a topic that starts with `$` (§4.7.2).
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(tl)) if fl == tl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_validation_follows_4_7_1() {
        for ok in [
            "#",
            "+",
            "a/#",
            "a/+/b",
            "+/+",
            "/",
            "a//b",
            "sport/tennis/#",
            "$SYS/#",
        ] {
            assert!(is_valid_filter(ok), "{ok}");
        }
        for bad in ["", "a#", "a/#/b", "a+", "a/b+/c", "#/a", "a\0b", "++", "##"] {
            assert!(!is_valid_filter(bad), "{bad:?}");
        }
    }

    #[test]
    fn name_validation_follows_4_7_3() {
        assert_eq!(validate_name("a/b"), Ok(()));
        assert_eq!(validate_name(""), Err(TopicNameError::Empty));
        assert_eq!(validate_name("a/+"), Err(TopicNameError::Wildcard));
        assert_eq!(validate_name("a/#"), Err(TopicNameError::Wildcard));
        assert_eq!(validate_name("a\0"), Err(TopicNameError::Nul));
    }

    #[test]
    fn sys_topics_are_the_servers() {
        assert!(is_server_topic("$SYS"));
        assert!(is_server_topic("$SYS/broker/load"));
        assert!(!is_server_topic("$SYSTEM/x"));
        assert!(!is_server_topic("$app/x"));
        assert!(!is_server_topic("a/$SYS"));
    }

    #[test]
    fn wildcard_matching_follows_the_spec_examples() {
        // §4.7.1.2
        assert!(matches("sport/tennis/player1/#", "sport/tennis/player1"));
        assert!(matches(
            "sport/tennis/player1/#",
            "sport/tennis/player1/ranking"
        ));
        assert!(matches(
            "sport/tennis/player1/#",
            "sport/tennis/player1/score/wimbledon"
        ));
        assert!(matches("sport/#", "sport"));
        assert!(matches("#", "a/b/c"));
        // §4.7.1.3
        assert!(matches("sport/tennis/+", "sport/tennis/player1"));
        assert!(!matches("sport/tennis/+", "sport/tennis/player1/ranking"));
        assert!(!matches("sport/+", "sport"));
        assert!(matches("sport/+", "sport/"));
        assert!(matches("+/+", "/finance"));
        assert!(matches("/+", "/finance"));
        assert!(!matches("+", "/finance"));
        // exact, and case sensitive
        assert!(matches("a/b", "a/b"));
        assert!(!matches("a/b", "a/B"));
        assert!(!matches("a/b", "a/b/c"));
        assert!(!matches("a/b/c", "a/b"));
        // §4.7.2: `$` topics
        assert!(!matches("#", "$SYS/monitor/Clients"));
        assert!(!matches("+/monitor/Clients", "$SYS/monitor/Clients"));
        assert!(matches("$SYS/#", "$SYS/monitor/Clients"));
        assert!(matches("$SYS/monitor/+", "$SYS/monitor/Clients"));
    }
}
