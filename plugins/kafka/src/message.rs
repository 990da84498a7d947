//! Kafka records as Pulsar messages and back (docs/kafka.md section 1.1): the shape of the
//! host's `indexed.record-out` (key bytes, value or null, properties, event time).
//!
//! - key → the message key (bytes; the host stores non-UTF-8 keys base64 with
//!   `partition_key_b64_encoded`, Pulsar's convention); a null key → no key.
//! - value → the payload; a null value → Pulsar's `null_value` (a tombstone).
//! - timestamp → `event_time` (Kafka's -1, "none", → none). Back: event time, else the
//!   broker's publish time.
//! - headers → properties (docs/kafka.md section 9): a header whose key appears once, and
//!   whose key and value are UTF-8, is a plain property, which native consumers read. If any
//!   header is not (a repeated key, a null or binary value, or the reserved key
//!   [`HEADERS_PROPERTY`]), the whole list also travels as the property [`HEADERS_PROPERTY`]:
//!   Kafka's own header encoding, base64. Back to Kafka, that property, when present and
//!   valid, is the exact list; otherwise every property is a header.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use bytes::Bytes;

use crate::codec::records::{self, Header, Record};

/// The property carrying the exact Kafka header list when plain properties cannot.
pub const HEADERS_PROPERTY: &str = "kafka.headers";

/// A message as the plugin appends it and reads it back (the host's `record-out` and
/// `entry-message`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Message {
    pub key: Option<Vec<u8>>,
    /// `None`: a null value.
    pub value: Option<Vec<u8>>,
    pub properties: Vec<(String, String)>,
    pub event_time_ms: Option<u64>,
}

/// The message a produced record becomes.
pub fn from_record(record: &Record) -> Message {
    let plain = |h: &Header| -> Option<(String, String)> {
        let key = std::str::from_utf8(&h.key).ok()?;
        let value = std::str::from_utf8(h.value.as_deref()?).ok()?;
        let once = record.headers.iter().filter(|o| o.key == h.key).count() == 1;
        (once && key != HEADERS_PROPERTY).then(|| (key.to_string(), value.to_string()))
    };
    let mut properties: Vec<(String, String)> = record.headers.iter().filter_map(plain).collect();
    if properties.len() != record.headers.len() {
        let mut encoded = Vec::new();
        // Encoding a list that was just decoded cannot overflow its lengths.
        if records::encode_headers(&record.headers, &mut encoded).is_ok() {
            properties.push((HEADERS_PROPERTY.to_string(), BASE64.encode(encoded)));
        }
    }
    Message {
        key: record.key.as_ref().map(|k| k.to_vec()),
        value: record.value.as_ref().map(|v| v.to_vec()),
        properties,
        event_time_ms: u64::try_from(record.timestamp).ok(),
    }
}

/// The host's `record-out` of a produced record.
pub fn record_out(record: &Record) -> magnetar_sdk::RecordOut {
    let m = from_record(record);
    magnetar_sdk::RecordOut {
        key: m.key,
        value: m.value,
        properties: m
            .properties
            .into_iter()
            .map(|(key, value)| magnetar_sdk::Property { key, value })
            .collect(),
        event_time_ms: m.event_time_ms,
    }
}

/// The record a stored message becomes at `offset`; `publish_time_ms` is its timestamp when
/// it has no event time.
pub fn to_record(message: Message, offset: i64, publish_time_ms: u64) -> Record {
    let exact = message
        .properties
        .iter()
        .find(|(k, _)| k == HEADERS_PROPERTY)
        .and_then(|(_, v)| BASE64.decode(v).ok())
        .and_then(|b| records::decode_headers(Bytes::from(b)).ok());
    let headers = exact.unwrap_or_else(|| {
        message
            .properties
            .into_iter()
            .map(|(k, v)| Header {
                key: Bytes::from(k),
                value: Some(Bytes::from(v)),
            })
            .collect()
    });
    let timestamp = message.event_time_ms.unwrap_or(publish_time_ms);
    Record {
        offset,
        timestamp: i64::try_from(timestamp).unwrap_or(i64::MAX),
        key: message.key.map(Bytes::from),
        value: message.value.map(Bytes::from),
        headers,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(k: &[u8], v: Option<&[u8]>) -> Header {
        Header {
            key: Bytes::copy_from_slice(k),
            value: v.map(Bytes::copy_from_slice),
        }
    }

    fn record(headers: Vec<Header>) -> Record {
        Record {
            offset: 9,
            timestamp: 1_700_000_000_123,
            key: Some(Bytes::from_static(&[0, 0xff, 7])),
            value: None,
            headers,
        }
    }

    #[test]
    fn plain_headers_become_plain_properties() {
        let r = record(vec![header(b"a", Some(b"1")), header(b"b", Some(b"2"))]);
        let m = from_record(&r);
        assert_eq!(
            m.properties,
            vec![("a".into(), "1".into()), ("b".into(), "2".into())]
        );
        assert_eq!(m.key, Some(vec![0, 0xff, 7]));
        assert_eq!(m.value, None);
        assert_eq!(m.event_time_ms, Some(1_700_000_000_123));
        assert_eq!(to_record(m, 9, 5), r);
    }

    #[test]
    fn other_headers_travel_exactly() {
        let r = record(vec![
            header(b"a", Some(b"1")),
            header(b"dup", Some(b"x")),
            header(b"dup", Some(b"y")),
            header(b"null", None),
            header(b"bin", Some(&[0xff, 0xfe])),
            header(HEADERS_PROPERTY.as_bytes(), Some(b"mine")),
        ]);
        let m = from_record(&r);
        // The plain ones stay readable by native consumers.
        assert_eq!(m.properties[0], ("a".into(), "1".into()));
        assert_eq!(m.properties.len(), 2);
        assert_eq!(m.properties[1].0, HEADERS_PROPERTY);
        assert_eq!(to_record(m, 9, 5), r);
    }

    #[test]
    fn native_messages_read_as_records() {
        let m = Message {
            key: Some(b"k".to_vec()),
            value: Some(b"v".to_vec()),
            properties: vec![("p".into(), "q".into())],
            event_time_ms: None,
        };
        let r = to_record(m, 3, 1234);
        assert_eq!(r.timestamp, 1234);
        assert_eq!(r.headers, vec![header(b"p", Some(b"q"))]);
        // A broken exact list falls back to the plain properties.
        let m = Message {
            properties: vec![(HEADERS_PROPERTY.into(), "!!".into())],
            ..Message::default()
        };
        assert_eq!(to_record(m, 0, 0).headers.len(), 1);
        // No timestamp (-1) is no event time.
        let mut r = record(Vec::new());
        r.timestamp = -1;
        assert_eq!(from_record(&r).event_time_ms, None);
    }
}
