//! Retained messages (MQTT 3.1.1 / 5.0 §3.3.1.3): where they are kept and in what form.
//!
//! A retained message is one host kv entry per Topic Name, key `mqtt/retained/<topic>`
//! (the topic unescaped: kv keys are arbitrary strings, and keeping the topic as is makes a
//! filter's literal first levels a key prefix, so a SUBSCRIBE scans only the keys that can
//! match). The host kv lives in a Pulsar topic, so retained messages survive restarts and are
//! shared by every gateway of the cluster. Last writer wins, as in Mosquitto.
//!
//! Stored form 2: the format byte `2`, the QoS the message was published with, the time it
//! was stored (ms since the epoch, 8 bytes big-endian; 0 unknown), its MQTT 5.0 application
//! properties as on the wire (Property Length, then properties, §2.2.2), then the payload.
//! The Message Expiry Interval counts from the stored time; an expired message is no longer
//! sent (§3.3.2.3.3). Form 1 (`1`, QoS, payload) is still read.

/// Key prefix of every retained message.
pub const PREFIX: &str = "mqtt/retained/";

/// Retained messages are scanned in pages of this many entries.
pub const PAGE: u32 = 100;

const FORMAT: u8 = 1;
const FORMAT_2: u8 = 2;

use crate::codec::v5;
use crate::codec::Properties;

/// The kv key of the retained message of `topic`.
pub fn key(topic: &str) -> String {
    format!("{PREFIX}{topic}")
}

/// The Topic Name of a retained-message key, if it is one.
pub fn topic_of(key: &str) -> Option<&str> {
    key.strip_prefix(PREFIX)
}

/// The key prefix that holds every retained message a (valid) filter can match: its levels
/// up to the first wildcard. `a/b/+` → `mqtt/retained/a/b/`, `#` → `mqtt/retained/`.
pub fn scan_prefix(filter: &str) -> String {
    let literal = match filter.find(['+', '#']) {
        Some(i) => filter.get(..i).unwrap_or_default(),
        None => filter,
    };
    format!("{PREFIX}{literal}")
}

/// A retained message as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retained<'a> {
    pub qos: u8,
    pub stored_ms: u64,
    pub properties: Properties,
    pub payload: &'a [u8],
}

/// The stored form of a retained message.
pub fn encode(qos: u8, stored_ms: u64, properties: &Properties, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 16);
    out.push(FORMAT_2);
    out.push(qos);
    out.extend_from_slice(&stored_ms.to_be_bytes());
    v5::put_properties(&mut out, properties);
    out.extend_from_slice(payload);
    out
}

/// A stored retained message; `None` for an unknown or damaged form.
pub fn decode(bytes: &[u8]) -> Option<Retained<'_>> {
    match bytes {
        [FORMAT, qos @ 0..=2, payload @ ..] => Some(Retained {
            qos: *qos,
            stored_ms: 0,
            properties: Properties::default(),
            payload,
        }),
        [FORMAT_2, qos @ 0..=2, rest @ ..] => {
            let (time, rest) = rest.split_first_chunk::<8>()?;
            let (properties, payload) = v5::split_properties(rest, v5::allowed::WILL).ok()?;
            Some(Retained {
                qos: *qos,
                stored_ms: u64::from_be_bytes(*time),
                properties,
                payload,
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_prefix_stops_at_the_first_wildcard() {
        assert_eq!(scan_prefix("a/b/+/c"), "mqtt/retained/a/b/");
        assert_eq!(scan_prefix("a/b"), "mqtt/retained/a/b");
        assert_eq!(scan_prefix("#"), "mqtt/retained/");
        assert_eq!(scan_prefix("+/x"), "mqtt/retained/");
        assert_eq!(topic_of(&key("x/y")), Some("x/y"));
    }

    #[test]
    fn stored_form_round_trips() {
        let props = Properties {
            content_type: Some("a/b".into()),
            message_expiry_interval: Some(9),
            user_properties: vec![("k".into(), "v".into())],
            ..Properties::default()
        };
        let bytes = encode(2, 77, &props, b"hi");
        let r = decode(&bytes).unwrap();
        assert_eq!((r.qos, r.stored_ms, r.payload), (2, 77, &b"hi"[..]));
        assert_eq!(r.properties, props);
        let bytes = encode(0, 0, &Properties::default(), b"");
        let r = decode(&bytes).unwrap();
        assert_eq!((r.qos, r.payload), (0, &b""[..]));
        // Form 1, as 3.1.1-only versions wrote it.
        let r = decode(&[1, 1, b'x']).unwrap();
        assert_eq!((r.qos, r.payload), (1, &b"x"[..]));
        assert_eq!(decode(b""), None);
        assert_eq!(decode(&[1, 3]), None);
        assert_eq!(decode(&[2, 1, 0, 0]), None);
    }
}
