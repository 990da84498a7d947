//! The JSON messages of Pulsar's WebSocket API, both ways (docs/pulsar-websocket-api.md §5, §6):
//! `ProducerMessage` in, `ProducerAck` out; `ConsumerMessage` out, `ConsumerCommand` in;
//! `EndOfTopicResponse` out.
//!
//! Pulsar reads them with Jackson configured to ignore unknown keys and to coerce scalars
//! (`"5"` for a number, `5` for a string); the readers here do the same on a
//! `serde_json::Value`, so a frame Pulsar takes is taken, and one it refuses is refused
//! with the same `send-error` code. The usual frame (strings where strings belong, numbers
//! where numbers do, no duplicate keys) is read first into a typed struct borrowing from the
//! text, which is several times cheaper; anything that struct does not take goes the `Value`
//! way, so results and error texts are the same either way.
//!
//! Writers keep Jackson's field order and its `NON_NULL` rule (primitives are always
//! written). They write by hand into one buffer sized up front: message ids and payloads are
//! base64, which never needs JSON escaping, so only the client's own strings (keys,
//! properties, contexts, error texts) are checked for characters to escape.

use std::borrow::Cow;
use std::collections::BTreeMap;

use base64::Engine;
use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::Value;

use crate::message_id::BASE64;
use crate::time;

/// `WebSocketError`: the codes of `send-error:<code>` and their meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WsError {
    FailedToDeserializeFromJson = 3,
    PayloadEncodingError = 7,
    UnknownError = 8,
}

impl WsError {
    /// The description Pulsar uses as a close reason.
    pub fn description(self) -> &'static str {
        match self {
            WsError::FailedToDeserializeFromJson => "Failed to de-serialize from JSON",
            WsError::PayloadEncodingError => "Invalid payload encoding",
            WsError::UnknownError => "Unknown error",
        }
    }
}

/// A publish request (`ProducerMessage`), the fields the gateway acts on.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProducerMessage {
    pub payload: Vec<u8>,
    /// In key order, each key once.
    pub properties: Vec<(String, String)>,
    pub context: Option<String>,
    pub key: Option<String>,
    pub event_time_ms: Option<u64>,
}

/// A publish frame refused before it reached the backend: answered with `send-error`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub error: WsError,
    pub message: String,
    /// Echoed, except when the frame was not JSON at all (Pulsar has no context then).
    pub context: Option<String>,
}

impl Refused {
    /// The ack that answers it.
    pub fn ack(&self) -> String {
        ProducerAck::error(self.error, &self.message, self.context.as_deref()).to_json()
    }
}

/// A JSON value as a Java `String` field: scalars are coerced, `null` is absent.
fn string_field(obj: &serde_json::Map<String, Value>, key: &str) -> Result<Option<String>, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v @ (Value::Number(_) | Value::Bool(_))) => Ok(Some(v.to_string())),
        Some(_) => Err(format!(
            "Cannot deserialize value of type `java.lang.String` from {} (field \"{key}\")",
            kind(obj.get(key))
        )),
    }
}

/// A JSON value as a Java `long` / `Integer` field.
fn number_field(obj: &serde_json::Map<String, Value>, key: &str) -> Result<Option<i64>, String> {
    let bad = || {
        format!(
            "Cannot deserialize value of type `long` from {} (field \"{key}\")",
            kind(obj.get(key))
        )
    };
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_i64()
            .or_else(|| n.as_f64().map(|f| f as i64))
            .map(Some)
            .ok_or_else(bad),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => s.trim().parse().map(Some).map_err(|_| bad()),
        Some(_) => Err(bad()),
    }
}

fn kind(v: Option<&Value>) -> &'static str {
    match v {
        Some(Value::Object(_)) => "Object value",
        Some(Value::Array(_)) => "Array value",
        Some(Value::Bool(_)) => "Boolean value",
        Some(Value::Number(_)) => "Number value",
        Some(Value::String(_)) => "String value",
        Some(Value::Null) | None => "null",
    }
}

/// The usual producer frame, borrowed from its text: every field of the type Pulsar's
/// `ProducerMessage` declares (no coercion), unknown keys ignored, a duplicate key refused
/// (then the `Value` path decides, as Jackson: the last one wins).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TypedProducerMessage<'a> {
    #[serde(borrow)]
    payload: Option<Cow<'a, str>>,
    #[serde(borrow)]
    properties: Option<BTreeMap<Cow<'a, str>, Cow<'a, str>>>,
    #[serde(borrow)]
    context: Option<Cow<'a, str>>,
    #[serde(borrow)]
    key: Option<Cow<'a, str>>,
    #[serde(borrow)]
    event_time: Option<Cow<'a, str>>,
    #[serde(borrow)]
    encryption_param: Option<Cow<'a, str>>,
    #[serde(borrow)]
    key_schema: Option<Cow<'a, str>>,
    #[serde(borrow)]
    value_schema: Option<Cow<'a, str>>,
    sequence_id: Option<i64>,
    deliver_at: Option<i64>,
    deliver_after_ms: Option<i64>,
    schema_version: Option<i64>,
    uncompressed_message_size: Option<i64>,
    replication_clusters: Option<Vec<IgnoredAny>>,
}

/// Reads a producer's text frame (`ProducerHandler.onWebSocketText`).
pub fn parse_producer_message(text: &str) -> Result<ProducerMessage, Refused> {
    match serde_json::from_str::<TypedProducerMessage>(text) {
        Ok(m) => {
            // Read only to be type-checked, as Jackson does.
            let _ = (&m.encryption_param, &m.key_schema, &m.value_schema);
            let _ = (m.sequence_id, m.deliver_at, m.deliver_after_ms);
            let _ = (m.schema_version, m.uncompressed_message_size);
            let _ = &m.replication_clusters;
            let properties = m
                .properties
                .map(|p| {
                    p.into_iter()
                        .map(|(k, v)| (k.into_owned(), v.into_owned()))
                        .collect()
                })
                .unwrap_or_default();
            finish_producer_message(
                m.payload.as_deref(),
                m.event_time.as_deref(),
                properties,
                m.context.map(Cow::into_owned),
                m.key.map(Cow::into_owned),
            )
        }
        Err(_) => parse_producer_value(text),
    }
}

/// [`parse_producer_message`] the general way, through a `Value`, with Jackson's coercions.
fn parse_producer_value(text: &str) -> Result<ProducerMessage, Refused> {
    let deserialize = |message: String| Refused {
        error: WsError::FailedToDeserializeFromJson,
        message,
        context: None,
    };
    let value: Value = serde_json::from_str(text).map_err(|e| deserialize(e.to_string()))?;
    let obj = match value {
        Value::Object(obj) => obj,
        // Jackson reads `null` as a null request, which fails on its first use.
        Value::Null => {
            return Err(Refused {
                error: WsError::PayloadEncodingError,
                message: "the message is null".into(),
                context: None,
            })
        }
        other => {
            return Err(deserialize(format!(
                "Cannot deserialize value of type `ProducerMessage` from {}",
                kind(Some(&other))
            )))
        }
    };
    let context = string_field(&obj, "context").map_err(deserialize)?;
    let key = string_field(&obj, "key").map_err(deserialize)?;
    let payload = string_field(&obj, "payload").map_err(deserialize)?;
    let event_time = string_field(&obj, "eventTime").map_err(deserialize)?;
    for k in ["encryptionParam", "keySchema", "valueSchema"] {
        string_field(&obj, k).map_err(deserialize)?;
    }
    for k in [
        "sequenceId",
        "deliverAt",
        "deliverAfterMs",
        "schemaVersion",
        "uncompressedMessageSize",
    ] {
        number_field(&obj, k).map_err(deserialize)?;
    }
    let properties = match obj.get("properties") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Object(map)) => {
            let mut props = BTreeMap::new();
            for (k, v) in map {
                match v {
                    Value::Null => {}
                    Value::String(s) => {
                        props.insert(k.clone(), s.clone());
                    }
                    Value::Number(_) | Value::Bool(_) => {
                        props.insert(k.clone(), v.to_string());
                    }
                    _ => {
                        return Err(deserialize(format!(
                            "Cannot deserialize value of type `java.lang.String` from {} (property \"{k}\")",
                            kind(Some(v))
                        )))
                    }
                }
            }
            props.into_iter().collect()
        }
        Some(other) => {
            return Err(deserialize(format!(
                "Cannot deserialize value of type `java.util.Map` from {}",
                kind(Some(other))
            )))
        }
    };
    match obj.get("replicationClusters") {
        None | Some(Value::Null) | Some(Value::Array(_)) => {}
        Some(other) => {
            return Err(deserialize(format!(
                "Cannot deserialize value of type `java.util.List` from {}",
                kind(Some(other))
            )))
        }
    }
    finish_producer_message(
        payload.as_deref(),
        event_time.as_deref(),
        properties,
        context,
        key,
    )
}

/// The checks after the JSON is read: the payload's base64 and the event time.
fn finish_producer_message(
    payload: Option<&str>,
    event_time: Option<&str>,
    properties: Vec<(String, String)>,
    context: Option<String>,
    key: Option<String>,
) -> Result<ProducerMessage, Refused> {
    let encoding = |message: String| Refused {
        error: WsError::PayloadEncodingError,
        message,
        context: context.clone(),
    };
    let payload = payload.ok_or_else(|| encoding("payload is missing".into()))?;
    let payload = BASE64.decode(payload).map_err(|e| {
        encoding(format!(
            "Invalid Base64 message-payload error={}",
            java_base64_error(&e)
        ))
    })?;
    let event_time_ms = match event_time {
        None => None,
        Some(t) => {
            let ms = time::parse(t).map_err(|e| encoding(e.to_string()))?;
            Some(
                u64::try_from(ms)
                    .ok()
                    .filter(|ms| *ms > 0)
                    .ok_or_else(|| encoding(format!("Invalid event time {ms}")))?,
            )
        }
    };
    Ok(ProducerMessage {
        payload,
        properties,
        context,
        key,
        event_time_ms,
    })
}

/// `java.util.Base64.Decoder`'s words for what the base64 crate found.
fn java_base64_error(e: &base64::DecodeError) -> String {
    match e {
        base64::DecodeError::InvalidByte(_, b) if *b == b'=' => {
            "Input byte array has incorrect ending byte".into()
        }
        base64::DecodeError::InvalidByte(_, b) => format!("Illegal base64 character {b:x}"),
        base64::DecodeError::InvalidLength(_) | base64::DecodeError::InvalidLastSymbol(..) => {
            "Last unit does not have enough valid bits".into()
        }
        base64::DecodeError::InvalidPadding => {
            "Input byte array has wrong 4-byte ending unit".into()
        }
    }
}

/// `ProducerAck`, written field by field in Pulsar's order.
#[derive(Debug)]
pub struct ProducerAck<'a> {
    result: Result<&'a [u8], (WsError, &'a str)>,
    context: Option<&'a str>,
}

impl<'a> ProducerAck<'a> {
    /// `result: "ok"` with the stored message's id.
    pub fn ok(message_id: &'a [u8], context: Option<&'a str>) -> Self {
        ProducerAck {
            result: Ok(message_id),
            context,
        }
    }

    /// `result: "send-error:<code>"`.
    pub fn error(error: WsError, message: &'a str, context: Option<&'a str>) -> Self {
        ProducerAck {
            result: Err((error, message)),
            context,
        }
    }

    pub fn to_json(&self) -> String {
        let mut out = Vec::new();
        self.write_json(&mut out);
        // Written from `&str`s and ASCII only.
        String::from_utf8(out).unwrap_or_default()
    }

    /// Appends the JSON text to `out` (the outgoing frame's buffer).
    pub fn write_json(&self, out: &mut Vec<u8>) {
        let context_len = self.context.map_or(0, |c| c.len() + 16);
        out.reserve(96 + context_len);
        match self.result {
            Ok(id) => {
                out.extend_from_slice(br#"{"result":"ok","messageId":""#);
                push_base64(out, id);
                out.push(b'"');
            }
            Err((error, message)) => {
                out.extend_from_slice(br#"{"result":"send-error:"#);
                out.extend_from_slice((error as i32).to_string().as_bytes());
                out.extend_from_slice(br#"","errorMsg":"#);
                push_json_str(out, message);
            }
        }
        if let Some(context) = self.context {
            out.extend_from_slice(br#","context":"#);
            push_json_str(out, context);
        }
        out.extend_from_slice(br#","errorCode":0,"schemaVersion":0}"#);
    }
}

/// One message to a consumer or reader (`ConsumerMessage`).
#[derive(Debug)]
pub struct ConsumerMessage<'a> {
    message_id: &'a [u8],
    payload: &'a [u8],
    /// Sorted by key, each key once.
    properties: Vec<(&'a str, &'a str)>,
    publish_time_ms: u64,
    redelivery_count: u32,
    event_time_ms: Option<u64>,
    key: Option<&'a str>,
}

impl<'a> ConsumerMessage<'a> {
    /// Builds the message; an event time of 0 is "none", as Pulsar's `getEventTime() != 0`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        message_id: &'a [u8],
        payload: &'a [u8],
        properties: impl IntoIterator<Item = (&'a str, &'a str)>,
        publish_time_ms: u64,
        redelivery_count: u32,
        event_time_ms: Option<u64>,
        key: Option<&'a str>,
    ) -> Self {
        let mut properties: Vec<(&str, &str)> = properties.into_iter().collect();
        // A map, later keys winning, as `Message.getProperties()` builds it: a stable sort
        // keeps equal keys in arrival order, and the last of each run is kept.
        properties.sort_by(|a, b| a.0.cmp(b.0));
        let mut deduped: Vec<(&str, &str)> = Vec::with_capacity(properties.len());
        for p in properties {
            match deduped.last_mut() {
                Some(last) if last.0 == p.0 => *last = p,
                _ => deduped.push(p),
            }
        }
        ConsumerMessage {
            message_id,
            payload,
            properties: deduped,
            publish_time_ms,
            redelivery_count,
            event_time_ms: event_time_ms.filter(|t| *t != 0),
            key,
        }
    }

    pub fn to_json(&self) -> String {
        let mut out = Vec::new();
        self.write_json(&mut out);
        // Written from `&str`s and ASCII only.
        String::from_utf8(out).unwrap_or_default()
    }

    /// Appends the JSON text to `out` (the outgoing frame's buffer), sized once up front.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        let b64 = |n: usize| n.div_ceil(3) * 4;
        let props: usize = self
            .properties
            .iter()
            .map(|(k, v)| k.len() + v.len() + 6)
            .sum();
        let key = self.key.map_or(0, |k| k.len() + 10);
        out.reserve(150 + b64(self.message_id.len()) + b64(self.payload.len()) + props + key);
        out.extend_from_slice(br#"{"messageId":""#);
        push_base64(out, self.message_id);
        out.extend_from_slice(br#"","payload":""#);
        push_base64(out, self.payload);
        out.extend_from_slice(br#"","properties":{"#);
        for (i, (k, v)) in self.properties.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            push_json_str(out, k);
            out.push(b':');
            push_json_str(out, v);
        }
        out.extend_from_slice(br#"},"publishTime":""#);
        out.extend_from_slice(time::format(self.publish_time_ms).as_bytes());
        out.extend_from_slice(br#"","redeliveryCount":"#);
        out.extend_from_slice(self.redelivery_count.to_string().as_bytes());
        if let Some(t) = self.event_time_ms {
            out.extend_from_slice(br#","eventTime":""#);
            out.extend_from_slice(time::format(t).as_bytes());
            out.push(b'"');
        }
        if let Some(k) = self.key {
            out.extend_from_slice(br#","key":"#);
            push_json_str(out, k);
        }
        out.push(b'}');
    }
}

/// Appends `bytes` in padded base64, encoded in place.
fn push_base64(out: &mut Vec<u8>, bytes: &[u8]) {
    let at = out.len();
    out.resize(at + bytes.len().div_ceil(3) * 4, 0);
    // The space is exactly the padded encoding's length.
    let written = BASE64.encode_slice(bytes, &mut out[at..]).unwrap_or(0);
    out.truncate(at + written);
}

/// Appends `s` as a JSON string, escaped as serde_json escapes (only `"`, `\` and control
/// characters; the rest of UTF-8 as is).
fn push_json_str(out: &mut Vec<u8>, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        // Serializing a string into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, s);
    }
}

/// `{"endOfTopic": ...}`.
pub fn end_of_topic(reached: bool) -> String {
    format!("{{\"endOfTopic\":{reached}}}")
}

/// A consumer's or reader's command (`ConsumerCommand`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConsumerCommand {
    /// `None`, `ack` or any unknown type means an acknowledgement.
    pub kind: Option<String>,
    pub message_id: Option<String>,
    pub permit_messages: Option<i64>,
}

/// What a command asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Ack(Option<String>),
    NegativeAcknowledge(Option<String>),
    Permit(Option<i64>),
    Unsubscribe,
    IsEndOfTopic,
}

impl ConsumerCommand {
    /// Reads a command frame; an error is Pulsar's `FailedToDeserializeFromJSON`.
    pub fn parse(text: &str) -> Result<ConsumerCommand, String> {
        /// The usual command, borrowed (see [`TypedProducerMessage`]).
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Typed<'a> {
            #[serde(borrow, rename = "type")]
            kind: Option<Cow<'a, str>>,
            #[serde(borrow)]
            message_id: Option<Cow<'a, str>>,
            permit_messages: Option<i64>,
        }
        if let Ok(c) = serde_json::from_str::<Typed>(text) {
            return Ok(ConsumerCommand {
                kind: c.kind.map(Cow::into_owned),
                message_id: c.message_id.map(Cow::into_owned),
                permit_messages: c.permit_messages,
            });
        }
        let value: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let Value::Object(obj) = value else {
            return Err(format!(
                "Cannot deserialize value of type `ConsumerCommand` from {}",
                kind(Some(&value))
            ));
        };
        Ok(ConsumerCommand {
            kind: string_field(&obj, "type")?,
            message_id: string_field(&obj, "messageId")?,
            permit_messages: number_field(&obj, "permitMessages")?,
        })
    }

    /// The dispatch of `ConsumerHandler.onWebSocketText`.
    pub fn command(self) -> Command {
        match self.kind.as_deref() {
            Some("permit") => Command::Permit(self.permit_messages),
            Some("unsubscribe") => Command::Unsubscribe,
            Some("negativeAcknowledge") => Command::NegativeAcknowledge(self.message_id),
            Some("isEndOfTopic") => Command::IsEndOfTopic,
            _ => Command::Ack(self.message_id),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(text: &str) -> Refused {
        parse_producer_message(text).unwrap_err()
    }

    #[test]
    fn reads_a_full_producer_message() {
        let m = parse_producer_message(
            r#"{"payload":"aGVsbG8=","properties":{"b":"2","a":1,"n":null},"context":"c1","key":"k",
               "eventTime":"1970-01-01T00:00:01Z","replicationClusters":["x"],"sequenceId":"7",
               "deliverAt":0,"deliverAfterMs":10,"unknown":{"x":1}}"#,
        )
        .unwrap();
        assert_eq!(
            m,
            ProducerMessage {
                payload: b"hello".to_vec(),
                properties: vec![("a".into(), "1".into()), ("b".into(), "2".into())],
                context: Some("c1".into()),
                key: Some("k".into()),
                event_time_ms: Some(1000),
            }
        );
        // Coerced scalars, unpadded base64.
        let m = parse_producer_message(r#"{"payload":"aGk","context":5}"#).unwrap();
        assert_eq!((m.payload, m.context), (b"hi".to_vec(), Some("5".into())));
    }

    #[test]
    fn refuses_bad_frames_with_pulsars_codes() {
        let r = refused("not json");
        assert_eq!(
            (r.error, r.context),
            (WsError::FailedToDeserializeFromJson, None)
        );
        assert_eq!(refused("[1]").error, WsError::FailedToDeserializeFromJson);
        assert_eq!(
            refused(r#"{"payload":"aGk=","context":"c","properties":[1]}"#).context,
            None,
            "a deserialization error has no context"
        );
        let r = refused(r#"{"payload":"not-base64","context":"c"}"#);
        assert_eq!(r.error, WsError::PayloadEncodingError);
        assert_eq!(r.context.as_deref(), Some("c"));
        assert_eq!(
            r.message,
            "Invalid Base64 message-payload error=Illegal base64 character 2d"
        );
        let r = refused(r#"{"context":"c"}"#);
        assert_eq!(
            (r.error, r.context.as_deref()),
            (WsError::PayloadEncodingError, Some("c"))
        );
        let r = refused(r#"{"payload":"aGk=","context":"c","eventTime":"yesterday"}"#);
        assert_eq!(r.error, WsError::PayloadEncodingError);
        assert_eq!(r.message, "Text 'yesterday' could not be parsed at index 0");
        assert_eq!(refused("null").error, WsError::PayloadEncodingError);
        assert_eq!(
            refused(r#"{"payload":"aGk=","sequenceId":"x"}"#).error,
            WsError::FailedToDeserializeFromJson
        );
    }

    #[test]
    fn the_typed_and_the_general_reader_agree() {
        for text in [
            r#"{"payload":"aGk=","context":"c","key":"k","properties":{"b":"1","a":"2"}}"#,
            r#"{"payload":"aGk=","properties":{"a":"1","a":"2"},"eventTime":"1970-01-01T00:00:01Z"}"#,
            r#"{"payload":"aGk=","context":"c\"q\u00e9","sequenceId":3,"replicationClusters":[]}"#,
            r#"{"payload":"not-base64","context":"c"}"#,
            r#"{"payload":"aGk=","context":"c","eventTime":"yesterday"}"#,
            r#"{"context":"c"}"#,
            r#"{"payload":"aGk=","payload":"aGVsbG8="}"#,
            r#"{"payload":"aGk=","deliverAt":1.5}"#,
        ] {
            assert_eq!(
                parse_producer_message(text),
                parse_producer_value(text),
                "{text}"
            );
        }
        // Duplicate keys: the last one wins, as in Jackson.
        assert_eq!(
            parse_producer_message(r#"{"payload":"aGk=","payload":"aGVsbG8="}"#)
                .unwrap()
                .payload,
            b"hello"
        );
    }

    #[test]
    fn writes_escaped_strings_as_serde_json_does() {
        for s in [
            "plain",
            "q\"uote",
            "back\\slash",
            "nl\n",
            "\u{1}",
            "é ü 😀",
            "\u{7f}",
        ] {
            let mut out = Vec::new();
            push_json_str(&mut out, s);
            assert_eq!(out, serde_json::to_vec(s).unwrap());
        }
    }

    #[test]
    fn writes_acks_as_pulsar_does() {
        assert_eq!(
            ProducerAck::ok(&[8, 7, 16, 0, 48, 0], Some("1")).to_json(),
            r#"{"result":"ok","messageId":"CAcQADAA","context":"1","errorCode":0,"schemaVersion":0}"#
        );
        assert_eq!(
            ProducerAck::ok(&[8, 7, 16, 0, 48, 0], None).to_json(),
            r#"{"result":"ok","messageId":"CAcQADAA","errorCode":0,"schemaVersion":0}"#
        );
        assert_eq!(
            refused(r#"{"payload":"*","context":"x"}"#).ack(),
            r#"{"result":"send-error:7","errorMsg":"Invalid Base64 message-payload error=Illegal base64 character 2a","context":"x","errorCode":0,"schemaVersion":0}"#
        );
    }

    #[test]
    fn writes_consumer_messages_as_pulsar_does() {
        let m = ConsumerMessage::new(
            &[8, 7, 16, 0, 48, 0],
            b"hello",
            [("b", "2"), ("a", "1"), ("b", "3")],
            1_500,
            2,
            Some(0),
            None,
        );
        assert_eq!(
            m.to_json(),
            r#"{"messageId":"CAcQADAA","payload":"aGVsbG8=","properties":{"a":"1","b":"3"},"publishTime":"1970-01-01T00:00:01.5Z","redeliveryCount":2}"#
        );
        let m = ConsumerMessage::new(&[8, 1, 16, 1], b"", [], 0, 0, Some(1), Some("k"));
        assert_eq!(
            m.to_json(),
            r#"{"messageId":"CAEQAQ==","payload":"","properties":{},"publishTime":"1970-01-01T00:00:00Z","redeliveryCount":0,"eventTime":"1970-01-01T00:00:00.001Z","key":"k"}"#
        );
        assert_eq!(end_of_topic(true), r#"{"endOfTopic":true}"#);
    }

    #[test]
    fn dispatches_commands_as_the_consumer_handler() {
        let c = |t: &str| ConsumerCommand::parse(t).map(ConsumerCommand::command);
        assert_eq!(
            c(r#"{"messageId":"CAcQADAA"}"#),
            Ok(Command::Ack(Some("CAcQADAA".into())))
        );
        assert_eq!(
            c(r#"{"type":"ack","messageId":"x"}"#),
            Ok(Command::Ack(Some("x".into())))
        );
        assert_eq!(c(r#"{"type":"whatever"}"#), Ok(Command::Ack(None)));
        assert_eq!(
            c(r#"{"type":"negativeAcknowledge","messageId":"x"}"#),
            Ok(Command::NegativeAcknowledge(Some("x".into())))
        );
        assert_eq!(
            c(r#"{"type":"permit","permitMessages":"3"}"#),
            Ok(Command::Permit(Some(3)))
        );
        assert_eq!(c(r#"{"type":"permit"}"#), Ok(Command::Permit(None)));
        assert_eq!(c(r#"{"type":"unsubscribe"}"#), Ok(Command::Unsubscribe));
        assert_eq!(c(r#"{"type":"isEndOfTopic"}"#), Ok(Command::IsEndOfTopic));
        assert!(c("nope").is_err());
        assert!(c(r#"{"type":"permit","permitMessages":[1]}"#).is_err());
    }
}
