//! An MQTT Application Message as a Pulsar message, and back (see the crate docs for the
//! topic mapping).
//!
//! Message properties (all strings, as Pulsar properties are):
//! - `mqtt.topic`: the Topic Name (also the message key); `mqtt.qos`: `1` or `2` (absent,
//!   or `0`, for QoS 0); `mqtt.retain`: `1` when published with RETAIN;
//! - `mqtt.sender`: the publishing Client Identifier, for No Local (MQTT 5.0 §3.8.3.1). Only
//!   the publisher's own subscriptions compare against it, so it is set only while the
//!   publishing session has a No Local subscription (and on wills, which are rare).
//!
//! Each property costs about eight allocations on its way (plugin, host, Pulsar metadata,
//! consumer, plugin again), so the common message (QoS 0, no MQTT 5.0 properties, no
//! No Local) carries `mqtt.topic` alone.
//! - MQTT 5.0 PUBLISH properties (§3.3.2.3), carried end to end:
//!   `mqtt.payload-format` (`0`/`1`), `mqtt.message-expiry` (seconds, counted from the
//!   Pulsar publish time), `mqtt.content-type`, `mqtt.response-topic`,
//!   `mqtt.correlation-data` (lower-case hex), and `mqtt.user-properties`: every User Property
//!   in order, `key=value` pairs joined by `&`, with `%`, `&` and `=` written `%25`, `%26`,
//!   `%3D`. Pulsar properties are a map, so repeated keys and their order need that one
//!   property; each User Property whose key is not already taken and does not start with
//!   `mqtt.` is *also* a plain Pulsar property, for Pulsar consumers.
//! - A message a Pulsar producer sent without `mqtt.user-properties` gets its own properties
//!   (except `mqtt.*`) as User Properties when an MQTT 5.0 client receives it.

use magnetar_sdk::{Delivery, OutboundMessage, Property};

use crate::codec::Properties;

/// The one Pulsar topic (short name) that carries every MQTT topic of a namespace.
pub const PULSAR_TOPIC: &str = "mqtt";
/// Message property holding the full MQTT Topic Name.
pub const PROP_TOPIC: &str = "mqtt.topic";
/// Message property holding the QoS the message was published with (`0`, `1` or `2`).
pub const PROP_QOS: &str = "mqtt.qos";
/// Message property `1` on a message published with RETAIN (for MQTT 5.0 Retain As
/// Published; other subscriptions get RETAIN 0, §3.3.1.3).
pub const PROP_RETAIN: &str = "mqtt.retain";
/// The publisher's Client Identifier (No Local).
pub const PROP_SENDER: &str = "mqtt.sender";
pub const PROP_PAYLOAD_FORMAT: &str = "mqtt.payload-format";
pub const PROP_MESSAGE_EXPIRY: &str = "mqtt.message-expiry";
pub const PROP_CONTENT_TYPE: &str = "mqtt.content-type";
pub const PROP_RESPONSE_TOPIC: &str = "mqtt.response-topic";
pub const PROP_CORRELATION_DATA: &str = "mqtt.correlation-data";
pub const PROP_USER_PROPERTIES: &str = "mqtt.user-properties";

/// The application properties of a PUBLISH (§3.3.2.3) that travel with the message; every
/// other field of `p` is dropped.
pub fn application_properties(p: &Properties) -> Properties {
    Properties {
        payload_format_indicator: p.payload_format_indicator,
        message_expiry_interval: p.message_expiry_interval,
        content_type: p.content_type.clone(),
        response_topic: p.response_topic.clone(),
        correlation_data: p.correlation_data.clone(),
        user_properties: p.user_properties.clone(),
        ..Properties::default()
    }
}

/// A message from the backend, as the plugin forwards it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub topic: String,
    pub qos: u8,
    pub retain: bool,
    pub sender: Option<String>,
    /// Application properties; `message_expiry_interval` is the original interval.
    pub properties: Properties,
}

/// The Pulsar message of an MQTT PUBLISH (`topic` becomes the key, a copy the property).
pub fn to_pulsar(
    topic: String,
    qos: u8,
    retain: bool,
    sender: Option<&str>,
    props: &Properties,
    payload: Vec<u8>,
) -> OutboundMessage {
    let mut properties = Vec::with_capacity(4);
    let mut put = |key: &str, value: String| {
        properties.push(Property {
            key: key.to_string(),
            value,
        })
    };
    put(PROP_TOPIC, topic.clone());
    if qos > 0 {
        put(PROP_QOS, qos.to_string());
    }
    if retain {
        put(PROP_RETAIN, "1".to_string());
    }
    if let Some(sender) = sender {
        put(PROP_SENDER, sender.to_string());
    }
    if let Some(v) = props.payload_format_indicator {
        put(PROP_PAYLOAD_FORMAT, v.to_string());
    }
    if let Some(v) = props.message_expiry_interval {
        put(PROP_MESSAGE_EXPIRY, v.to_string());
    }
    if let Some(v) = &props.content_type {
        put(PROP_CONTENT_TYPE, v.clone());
    }
    if let Some(v) = &props.response_topic {
        put(PROP_RESPONSE_TOPIC, v.clone());
    }
    if let Some(v) = &props.correlation_data {
        put(PROP_CORRELATION_DATA, hex(v));
    }
    if !props.user_properties.is_empty() {
        put(
            PROP_USER_PROPERTIES,
            encode_user_properties(&props.user_properties),
        );
        for (k, v) in &props.user_properties {
            let taken = properties.iter().any(|p| &p.key == k);
            if !taken && !k.starts_with("mqtt.") {
                properties.push(Property {
                    key: k.clone(),
                    value: v.clone(),
                });
            }
        }
    }
    OutboundMessage {
        topic: PULSAR_TOPIC.to_string(),
        key: Some(topic),
        payload,
        properties,
    }
}

/// The message of a delivery; `None` without `mqtt.topic` (not an MQTT message). The topic
/// is taken out of the delivery's properties (an empty string is left there), not copied.
pub fn from_delivery(d: &mut Delivery) -> Option<Message> {
    let topic = std::mem::take(&mut d.properties.iter_mut().find(|p| p.key == PROP_TOPIC)?.value);
    let d = &*d;
    let get = |key: &str| {
        d.properties
            .iter()
            .find(|p| p.key == key)
            .map(|p| p.value.as_str())
    };
    let qos = match get(PROP_QOS) {
        Some("1") => 1,
        Some("2") => 2,
        _ => 0,
    };
    let user_properties = match get(PROP_USER_PROPERTIES) {
        Some(text) => decode_user_properties(text),
        None => d
            .properties
            .iter()
            .filter(|p| !p.key.starts_with("mqtt.") && !p.key.starts_with("magnetar."))
            .map(|p| (p.key.clone(), p.value.clone()))
            .collect(),
    };
    let properties = Properties {
        payload_format_indicator: get(PROP_PAYLOAD_FORMAT).and_then(|v| v.parse().ok()),
        message_expiry_interval: get(PROP_MESSAGE_EXPIRY).and_then(|v| v.parse().ok()),
        content_type: get(PROP_CONTENT_TYPE).map(str::to_string),
        response_topic: get(PROP_RESPONSE_TOPIC).map(str::to_string),
        correlation_data: get(PROP_CORRELATION_DATA).and_then(unhex),
        user_properties,
        ..Properties::default()
    };
    Some(Message {
        topic,
        qos,
        retain: get(PROP_RETAIN) == Some("1"),
        sender: get(PROP_SENDER).map(str::to_string),
        properties,
    })
}

/// What is left of a Message Expiry Interval of `interval` seconds for a message published
/// at `published_ms` (0: unknown, never expires) at `now_ms`: `Some(Some(rest))`, or
/// `Some(None)` without an interval, or `None` once it expired (§3.3.2.3.3).
pub fn remaining_expiry(
    interval: Option<u32>,
    published_ms: u64,
    now_ms: u64,
) -> Option<Option<u32>> {
    let Some(interval) = interval else {
        return Some(None);
    };
    if published_ms == 0 {
        return Some(Some(interval));
    }
    let elapsed = now_ms.saturating_sub(published_ms) / 1000;
    let rest = u64::from(interval)
        .checked_sub(elapsed)
        .filter(|r| *r > 0)?;
    Some(Some(u32::try_from(rest).unwrap_or(interval)))
}

fn escape(s: &str) -> String {
    s.replace('%', "%25")
        .replace('&', "%26")
        .replace('=', "%3D")
}

fn unescape(s: &str) -> String {
    s.replace("%3D", "=")
        .replace("%26", "&")
        .replace("%25", "%")
}

/// `k=v&k2=v2`, escaped (see the module docs).
pub fn encode_user_properties(props: &[(String, String)]) -> String {
    props
        .iter()
        .map(|(k, v)| format!("{}={}", escape(k), escape(v)))
        .collect::<Vec<_>>()
        .join("&")
}

pub fn decode_user_properties(text: &str) -> Vec<(String, String)> {
    if text.is_empty() {
        return Vec::new();
    }
    text.split('&')
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) => (unescape(k), unescape(v)),
            None => (unescape(pair), String::new()),
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_round_trip_through_pulsar_properties() {
        let props = Properties {
            payload_format_indicator: Some(1),
            message_expiry_interval: Some(60),
            content_type: Some("text/plain".into()),
            response_topic: Some("reply/here".into()),
            correlation_data: Some(vec![0, 1, 0xfe]),
            user_properties: vec![
                ("a".into(), "1".into()),
                ("a".into(), "2".into()),
                ("k=&%".into(), "v&=%".into()),
                ("mqtt.topic".into(), "spoof".into()),
            ],
            ..Properties::default()
        };
        let msg = to_pulsar("t/1".into(), 1, true, Some("dev"), &props, b"x".to_vec());
        // The first `a` and nothing reserved become plain Pulsar properties too.
        let plain: Vec<_> = msg
            .properties
            .iter()
            .filter(|p| !p.key.starts_with("mqtt."))
            .map(|p| (p.key.as_str(), p.value.as_str()))
            .collect();
        assert_eq!(plain, vec![("a", "1"), ("k=&%", "v&=%")]);
        let mut d = Delivery {
            subscription: 1,
            delivery_id: 1,
            key: msg.key.clone(),
            payload: msg.payload.clone(),
            properties: msg.properties.clone(),
            publish_time_ms: 5,
            redelivery_count: 0,
        };
        let m = from_delivery(&mut d).unwrap();
        assert_eq!(m.topic, "t/1");
        assert_eq!((m.qos, m.retain), (1, true));
        assert_eq!(m.sender.as_deref(), Some("dev"));
        assert_eq!(m.properties, props);
    }

    #[test]
    fn foreign_properties_become_user_properties() {
        let mut d = Delivery {
            subscription: 1,
            delivery_id: 1,
            key: None,
            payload: vec![],
            properties: vec![
                Property {
                    key: PROP_TOPIC.into(),
                    value: "x".into(),
                },
                Property {
                    key: "origin".into(),
                    value: "pulsar".into(),
                },
            ],
            publish_time_ms: 0,
            redelivery_count: 0,
        };
        let m = from_delivery(&mut d).unwrap();
        assert_eq!(
            m.properties.user_properties,
            vec![("origin".into(), "pulsar".into())]
        );
        assert_eq!(m.qos, 0);
    }

    #[test]
    fn expiry_counts_down_from_the_publish_time() {
        assert_eq!(remaining_expiry(None, 1000, 99_000), Some(None));
        assert_eq!(remaining_expiry(Some(10), 1000, 1000), Some(Some(10)));
        assert_eq!(remaining_expiry(Some(10), 1000, 4_500), Some(Some(7)));
        assert_eq!(remaining_expiry(Some(10), 1000, 11_000), None);
        assert_eq!(remaining_expiry(Some(10), 0, 11_000), Some(Some(10)));
        assert_eq!(remaining_expiry(Some(0), 1000, 1000), None);
    }
}
