//! Persistent sessions (MQTT 3.1.1 §3.1.2.4 Clean Session 0, MQTT 5.0 §3.1.2.11.2 Session
//! Expiry Interval > 0): names and stored form.
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
//! Stored form (UTF-8 text, version line first), format 2:
//! ```text
//! magnetar-mqtt-session 2
//! expiry 3600 1767225600000
//! sub mqtt-session-dev1-5f3a
//! f 1 0 - sport/tennis/#
//! f 2 5 17 $share/g/a/%25b
//! ```
//! `expiry <Session Expiry Interval> <ms when the connection ended, or ->`, the durable
//! subscription's name if it is not the default, then per filter `f <granted qos> <options:
//! no local 1, retain as published 2, retain handling × 4> <Subscription Identifier or -> <filter>`,
//! the filter (and name) with `%`, CR and LF escaped as `%XX` (filters may contain them).
//! Format 1 (`magnetar-mqtt-session 1`, lines `<qos> <filter>`) is still read.

use std::collections::{BTreeMap, BTreeSet};

const HEADER: &str = "magnetar-mqtt-session 1";
const HEADER_2: &str = "magnetar-mqtt-session 2";

use crate::codec::SubscriptionOptions;
use crate::subscription::Subscription;

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

/// A persistent session as stored: its subscriptions and how long it outlives its
/// connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSession {
    pub filters: BTreeMap<String, Subscription>,
    /// Session Expiry Interval in seconds (MQTT 5.0 §3.1.2.11.2); `u32::MAX` never expires
    /// (3.1.1 Clean Session 0).
    pub expiry: u32,
    /// When the connection that held the session ended, if the plugin saw it end (a
    /// DISCONNECT, a keep-alive timeout); `None` while connected or when the connection
    /// vanished (the session then does not expire until it is next used). With `expiry` 0:
    /// when a connection with Session Expiry Interval 0 resumed it, so that it is expired
    /// for every later CONNECT even if the plugin never sees that connection end.
    pub ended_ms: Option<u64>,
    /// The durable Pulsar subscription queueing its messages; `None`: [`durable_subscription`].
    pub backend_name: Option<String>,
}

impl StoredSession {
    /// Whether the session has expired at `now_ms`.
    pub fn expired(&self, now_ms: u64) -> bool {
        match self.ended_ms {
            Some(ended) if self.expiry != u32::MAX => {
                now_ms >= ended.saturating_add(u64::from(self.expiry) * 1000)
            }
            _ => false,
        }
    }
}

/// Serialises a session (format 2).
pub fn encode(s: &StoredSession) -> Vec<u8> {
    let mut out = format!("{HEADER_2}\n");
    let ended = s.ended_ms.map_or("-".to_string(), |e| e.to_string());
    out.push_str(&format!("expiry {} {ended}\n", s.expiry));
    if let Some(name) = &s.backend_name {
        out.push_str(&format!("sub {}\n", escape_filter(name)));
    }
    for (filter, sub) in &s.filters {
        let o = sub.options;
        let flags =
            u8::from(o.no_local) | u8::from(o.retain_as_published) << 1 | o.retain_handling << 2;
        let id = sub.id.map_or("-".to_string(), |i| i.to_string());
        out.push_str(&format!(
            "f {} {flags} {id} {}\n",
            sub.qos,
            escape_filter(filter)
        ));
    }
    out.into_bytes()
}

fn qos_of(word: &str, line: &str) -> Result<u8, String> {
    match word {
        "0" => Ok(0),
        "1" => Ok(1),
        "2" => Ok(2),
        _ => Err(format!("bad QoS in session line {line:?}")),
    }
}

/// Parses what [`encode`] wrote, and format 1 (filters and QoS only, never expires).
pub fn decode(bytes: &[u8]) -> Result<StoredSession, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "session is not UTF-8".to_string())?;
    let mut lines = text.lines();
    let mut session = StoredSession {
        filters: BTreeMap::new(),
        expiry: u32::MAX,
        ended_ms: None,
        backend_name: None,
    };
    match lines.next() {
        Some(HEADER) => {
            for line in lines.filter(|l| !l.is_empty()) {
                let (qos, filter) = line
                    .split_once(' ')
                    .ok_or_else(|| format!("bad session line {line:?}"))?;
                let qos = qos_of(qos, line)?;
                session
                    .filters
                    .insert(unescape_filter(filter), Subscription::qos(qos));
            }
        }
        Some(HEADER_2) => {
            for line in lines.filter(|l| !l.is_empty()) {
                let bad = || format!("bad session line {line:?}");
                let (kind, rest) = line.split_once(' ').ok_or_else(bad)?;
                match kind {
                    "expiry" => {
                        let (expiry, ended) = rest.split_once(' ').ok_or_else(bad)?;
                        session.expiry = expiry.parse().map_err(|_| bad())?;
                        session.ended_ms = match ended {
                            "-" => None,
                            e => Some(e.parse().map_err(|_| bad())?),
                        };
                    }
                    "sub" => session.backend_name = Some(unescape_filter(rest)),
                    "f" => {
                        let mut words = rest.splitn(4, ' ');
                        let (Some(qos), Some(flags), Some(id), Some(filter)) =
                            (words.next(), words.next(), words.next(), words.next())
                        else {
                            return Err(bad());
                        };
                        let qos = qos_of(qos, line)?;
                        let flags: u8 = flags.parse().map_err(|_| bad())?;
                        let id = match id {
                            "-" => None,
                            i => Some(i.parse().map_err(|_| bad())?),
                        };
                        let options = SubscriptionOptions {
                            no_local: flags & 1 != 0,
                            retain_as_published: flags & 2 != 0,
                            retain_handling: (flags >> 2) & 3,
                        };
                        let sub = Subscription { qos, options, id };
                        session.filters.insert(unescape_filter(filter), sub);
                    }
                    _ => return Err(bad()),
                }
            }
        }
        _ => return Err("unknown session format".into()),
    }
    Ok(session)
}

/// The kv key of a client's QoS 2 state ([`Qos2State`]).
pub fn qos2_key(client_id: &str) -> String {
    format!("mqtt/qos2/{}", escape_client_id(client_id))
}

const QOS2_HEADER: &str = "magnetar-mqtt-qos2 1";

/// The QoS 2 state of a persistent session (§4.3.3, §4.4), which must outlive the connection
/// and the gateway process so that a resent PUBLISH is not stored twice and a PUBREL is
/// resent after a reconnect.
///
/// Stored form (UTF-8 text): `magnetar-mqtt-qos2 1`, then a line `in <id> <id> ...` and a
/// line `rel <id> ...`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Qos2State {
    /// Packet Identifiers of client PUBLISHes the backend stored, waiting for their PUBREL.
    pub inbound: BTreeSet<u16>,
    /// Packet Identifiers of deliveries the client PUBRECed, waiting for their PUBCOMP.
    pub released: BTreeSet<u16>,
}

impl Qos2State {
    pub fn is_empty(&self) -> bool {
        self.inbound.is_empty() && self.released.is_empty()
    }

    pub fn encode(&self) -> Vec<u8> {
        let line = |name: &str, ids: &BTreeSet<u16>| {
            let mut l = name.to_string();
            for id in ids {
                l.push_str(&format!(" {id}"));
            }
            l
        };
        format!(
            "{QOS2_HEADER}\n{}\n{}\n",
            line("in", &self.inbound),
            line("rel", &self.released)
        )
        .into_bytes()
    }

    pub fn decode(bytes: &[u8]) -> Result<Qos2State, String> {
        let text =
            std::str::from_utf8(bytes).map_err(|_| "QoS 2 state is not UTF-8".to_string())?;
        let mut lines = text.lines();
        if lines.next() != Some(QOS2_HEADER) {
            return Err("unknown QoS 2 state format".into());
        }
        let mut state = Qos2State::default();
        for line in lines.filter(|l| !l.is_empty()) {
            let mut words = line.split(' ');
            let set = match words.next() {
                Some("in") => &mut state.inbound,
                Some("rel") => &mut state.released,
                _ => return Err(format!("bad QoS 2 state line {line:?}")),
            };
            for w in words {
                let id: u16 = w
                    .parse()
                    .map_err(|_| format!("bad Packet Identifier {w:?}"))?;
                set.insert(id);
            }
        }
        Ok(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qos2_state_round_trips() {
        let s = Qos2State {
            inbound: BTreeSet::from([1, 65535]),
            released: BTreeSet::from([7]),
        };
        assert_eq!(Qos2State::decode(&s.encode()), Ok(s));
        assert_eq!(
            Qos2State::decode(&Qos2State::default().encode()),
            Ok(Qos2State::default())
        );
        assert!(Qos2State::decode(b"magnetar-mqtt-qos2 1\nin x\n").is_err());
        assert_eq!(qos2_key("a b"), "mqtt/qos2/a%20b");
    }

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
    fn sessions_round_trip_and_format_1_still_reads() {
        let mut filters = BTreeMap::new();
        filters.insert("sport/tennis/#".to_string(), Subscription::qos(1));
        filters.insert("a/%0A\nb\r% x".to_string(), Subscription::qos(0));
        let options = SubscriptionOptions {
            no_local: true,
            retain_as_published: true,
            retain_handling: 2,
        };
        let sub = Subscription {
            qos: 2,
            options,
            id: Some(268_435_455),
        };
        filters.insert("$share/g/+".to_string(), sub);
        let s = StoredSession {
            filters,
            expiry: 30,
            ended_ms: Some(1234),
            backend_name: Some("mqtt-session-x-1f".into()),
        };
        assert_eq!(decode(&encode(&s)), Ok(s.clone()));
        assert!(!s.expired(31_233));
        assert!(s.expired(31_234));
        let v1 = decode(b"magnetar-mqtt-session 1\n1 a/b\n0 c\n").unwrap();
        assert_eq!(v1.expiry, u32::MAX);
        assert_eq!(v1.filters.get("a/b"), Some(&Subscription::qos(1)));
        assert!(!v1.expired(u64::MAX));
        assert!(decode(b"garbage").is_err());
        assert!(decode(b"magnetar-mqtt-session 1\n7 a\n").is_err());
        assert!(decode(b"magnetar-mqtt-session 2\nf 1 0 x\n").is_err());
    }
}
