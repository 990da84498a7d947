//! Persistent sessions (MQTT 3.1.1 §3.1.2.4, Clean Session = 0): names and stored form.
//!
//! A persistent session is two things that must outlive the connection and the gateway
//! process:
//! - its Topic Filters, stored in the host kv under [`kv_key`] (one value, rewritten on every
//!   SUBSCRIBE and UNSUBSCRIBE);
//! - its queued messages, which are the backlog of the durable Pulsar subscription
//!   [`durable_subscription`] on the namespace's `mqtt` topic.
//!
//! Client Identifiers are arbitrary UTF-8, so they are escaped before they become part of a
//! key or subscription name: bytes outside `[A-Za-z0-9_.-]` are written `%XX`. The escaping
//! is injective, so two clients never share a session.
//!
//! Stored form (UTF-8 text, one line per filter, version line first):
//! ```text
//! magnetar-mqtt-session 1
//! 1 sport/tennis/#
//! 0 a/%25b
//! ```
//! Each line is `<granted qos> <filter>`, the filter with `%`, CR and LF escaped as `%XX`
//! (filters may legally contain them).

use std::collections::BTreeMap;

const HEADER: &str = "magnetar-mqtt-session 1";

/// `%XX`-escapes every byte of `s` outside `[A-Za-z0-9_.-]`.
pub fn escape_client_id(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The kv key of a client's session.
pub fn kv_key(client_id: &str) -> String {
    format!("mqtt/session/{}", escape_client_id(client_id))
}

/// The durable subscription that queues a client's messages while it is away.
pub fn durable_subscription(client_id: &str) -> String {
    format!("mqtt-session-{}", escape_client_id(client_id))
}

fn escape_filter(f: &str) -> String {
    f.replace('%', "%25")
        .replace('\n', "%0A")
        .replace('\r', "%0D")
}

fn unescape_filter(f: &str) -> String {
    // `%25` last, so that an escaped `%0A` (`%250A`) comes back as the text `%0A`.
    f.replace("%0A", "\n")
        .replace("%0D", "\r")
        .replace("%25", "%")
}

/// Serialises a session's filters (filter → granted QoS).
pub fn encode(filters: &BTreeMap<String, u8>) -> Vec<u8> {
    let mut out = String::from(HEADER);
    out.push('\n');
    for (filter, qos) in filters {
        out.push_str(&format!("{qos} {}\n", escape_filter(filter)));
    }
    out.into_bytes()
}

/// Parses what [`encode`] wrote.
pub fn decode(bytes: &[u8]) -> Result<BTreeMap<String, u8>, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "session is not UTF-8".to_string())?;
    let mut lines = text.lines();
    if lines.next() != Some(HEADER) {
        return Err("unknown session format".into());
    }
    let mut filters = BTreeMap::new();
    for line in lines.filter(|l| !l.is_empty()) {
        let (qos, filter) = line
            .split_once(' ')
            .ok_or_else(|| format!("bad session line {line:?}"))?;
        let qos: u8 = match qos {
            "0" => 0,
            "1" => 1,
            "2" => 2,
            _ => return Err(format!("bad QoS in session line {line:?}")),
        };
        filters.insert(unescape_filter(filter), qos);
    }
    Ok(filters)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids_are_escaped_injectively() {
        assert_eq!(escape_client_id("dev-01_a.b"), "dev-01_a.b");
        assert_eq!(escape_client_id("a/b c%"), "a%2Fb%20c%25");
        assert_eq!(escape_client_id("é"), "%C3%A9");
        assert_ne!(escape_client_id("a%2F"), escape_client_id("a/"));
        assert_eq!(kv_key("x/y"), "mqtt/session/x%2Fy");
        assert_eq!(durable_subscription("x y"), "mqtt-session-x%20y");
    }

    #[test]
    fn filters_round_trip() {
        let mut f = BTreeMap::new();
        f.insert("sport/tennis/#".to_string(), 1);
        f.insert("a/%0A\nb\r%".to_string(), 0);
        f.insert("+".to_string(), 1);
        assert_eq!(decode(&encode(&f)), Ok(f));
        assert_eq!(decode(&encode(&BTreeMap::new())), Ok(BTreeMap::new()));
        assert!(decode(b"garbage").is_err());
        assert!(decode(b"magnetar-mqtt-session 1\n7 a\n").is_err());
    }
}
