//! A session's subscriptions (§3.8) and shared subscriptions (MQTT 5.0 §4.8.2).
//!
//! A Topic Filter `$share/{ShareName}/{filter}` is a shared subscription: every session that
//! subscribes with the same ShareName and filter is one member of a group, and each matching
//! message goes to one member only. The group is a durable Pulsar **Shared** subscription
//! on the namespace's `mqtt` topic, named from the ShareName and filter
//! ([`shared_subscription_name`]), so the backend balances messages across the members'
//! consumers (on any gateway) and redelivers a member's unacknowledged messages to the others
//! when it goes away. It is durable so that messages published while the group has no member
//! wait for the next one (as HiveMQ does; Mosquitto drops them). The same works for 3.1.1
//! clients, which Mosquitto also allows.
//!
//! Retained messages are not sent for a new shared subscription (§3.3.1.3, "non-shared"), and
//! No Local on one is a Protocol Error (§3.8.3.1).

use crate::codec::SubscriptionOptions;
use crate::session_store::escape_client_id;
use crate::topic;

/// One Topic Filter of a session, with what was granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subscription {
    /// The granted (maximum) QoS.
    pub qos: u8,
    pub options: SubscriptionOptions,
    /// MQTT 5.0 Subscription Identifier, sent with every message this filter matches.
    pub id: Option<u32>,
}

impl Subscription {
    /// A 3.1.1-style subscription: QoS only.
    pub fn qos(qos: u8) -> Self {
        Subscription {
            qos,
            options: SubscriptionOptions::default(),
            id: None,
        }
    }
}

/// Prefix of a shared subscription's Topic Filter.
pub const SHARE_PREFIX: &str = "$share/";

/// `Some((ShareName, filter))` for a `$share/...` Topic Filter, `Some(Err)` for one that
/// breaks §4.8.2 (empty or wildcard ShareName, no or invalid filter), `None` for a
/// non-shared filter.
pub fn parse_shared(filter: &str) -> Option<Result<(&str, &str), ()>> {
    let rest = filter.strip_prefix(SHARE_PREFIX)?;
    let Some((group, inner)) = rest.split_once('/') else {
        return Some(Err(()));
    };
    if group.is_empty() || group.contains(['+', '#']) || !topic::is_valid_filter(inner) {
        return Some(Err(()));
    }
    Some(Ok((group, inner)))
}

/// Whether a filter is a valid Topic Filter, shared or not.
pub fn is_valid(filter: &str) -> bool {
    match parse_shared(filter) {
        Some(r) => r.is_ok(),
        None => topic::is_valid_filter(filter),
    }
}

/// The durable Shared Pulsar subscription of a share group: `mqtt-share-<group>-<filter>`,
/// both escaped as Client Identifiers are; when that would be long, the filter is replaced by
/// a 64-bit FNV-1a hash of it (`h<hex>`), so names stay short and stable.
pub fn shared_subscription_name(group: &str, filter: &str) -> String {
    let name = format!(
        "mqtt-share-{}-{}",
        escape_client_id(group),
        escape_client_id(filter)
    );
    if name.len() <= 160 {
        return name;
    }
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in group.bytes().chain([0]).chain(filter.bytes()) {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    let group: String = escape_client_id(group).chars().take(64).collect();
    format!("mqtt-share-{group}-h{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_filters_are_parsed_per_4_8_2() {
        assert_eq!(parse_shared("a/b"), None);
        assert_eq!(parse_shared("$share/g/a/+"), Some(Ok(("g", "a/+"))));
        assert_eq!(parse_shared("$share/g/#"), Some(Ok(("g", "#"))));
        assert_eq!(parse_shared("$share/g"), Some(Err(())));
        assert_eq!(parse_shared("$share//a"), Some(Err(())));
        assert_eq!(parse_shared("$share/g+/a"), Some(Err(())));
        assert_eq!(parse_shared("$share/g/a#"), Some(Err(())));
        assert!(is_valid("$share/g/a"));
        assert!(!is_valid("$share/g/"));
    }

    #[test]
    fn share_names_are_stable_distinct_and_short() {
        let a = shared_subscription_name("g", "a/+");
        assert_eq!(a, "mqtt-share-g-a%2F%2B");
        assert_ne!(a, shared_subscription_name("g", "a/#"));
        assert_ne!(a, shared_subscription_name("h", "a/+"));
        let long = "x/".repeat(200);
        let n = shared_subscription_name("g", &long);
        assert!(n.len() < 100, "{n}");
        assert_eq!(n, shared_subscription_name("g", &long));
        assert_ne!(n, shared_subscription_name("g", &"y/".repeat(200)));
    }
}
