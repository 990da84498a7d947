//! The JSON messages of Pulsar's WebSocket API, both ways (docs/pulsar-websocket-api.md §5, §6):
//! `ProducerMessage` in, `ProducerAck` out; `ConsumerMessage` out, `ConsumerCommand` in;
//! `EndOfTopicResponse` out.
//!
//! Pulsar reads them with Jackson configured to ignore unknown keys and to coerce scalars
//! (`"5"` for a number, `5` for a string); the readers here do the same on a
//! `serde_json::Value`, so a frame Pulsar takes is taken, and one it refuses is refused
//! with the same `send-error` code. Writers keep Jackson's field order and its
//! `NON_NULL` rule (primitives are always written).

use std::collections::BTreeMap;

use base64::Engine;
use serde::Serialize;
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

/// Reads a producer's text frame (`ProducerHandler.onWebSocketText`).
pub fn parse_producer_message(text: &str) -> Result<ProducerMessage, Refused> {
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
    let encoding = |message: String| Refused {
        error: WsError::PayloadEncodingError,
        message,
        context: context.clone(),
    };
    let payload = payload.ok_or_else(|| encoding("payload is missing".into()))?;
    let payload = BASE64.decode(&payload).map_err(|e| {
        encoding(format!(
            "Invalid Base64 message-payload error={}",
            java_base64_error(&e)
        ))
    })?;
    let event_time_ms = match event_time {
        None => None,
        Some(t) => {
            let ms = time::parse(&t).map_err(|e| encoding(e.to_string()))?;
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
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProducerAck<'a> {
    result: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_msg: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    context: Option<&'a str>,
    error_code: i32,
    schema_version: i64,
}

impl<'a> ProducerAck<'a> {
    /// `result: "ok"` with the stored message's id.
    pub fn ok(message_id: &[u8], context: Option<&'a str>) -> Self {
        ProducerAck {
            result: "ok".into(),
            error_msg: None,
            message_id: Some(crate::message_id::encode(message_id)),
            context,
            error_code: 0,
            schema_version: 0,
        }
    }

    /// `result: "send-error:<code>"`.
    pub fn error(error: WsError, message: &'a str, context: Option<&'a str>) -> Self {
        ProducerAck {
            result: format!("send-error:{}", error as i32),
            error_msg: Some(message),
            message_id: None,
            context,
            error_code: 0,
            schema_version: 0,
        }
    }

    pub fn to_json(&self) -> String {
        // A struct of strings and integers always serializes.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// One message to a consumer or reader (`ConsumerMessage`).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConsumerMessage<'a> {
    pub message_id: String,
    pub payload: String,
    pub properties: BTreeMap<&'a str, &'a str>,
    pub publish_time: String,
    pub redelivery_count: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_time: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<&'a str>,
}

impl<'a> ConsumerMessage<'a> {
    /// Builds the message; an event time of 0 is "none", as Pulsar's `getEventTime() != 0`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        message_id: &[u8],
        payload: &[u8],
        properties: impl IntoIterator<Item = (&'a str, &'a str)>,
        publish_time_ms: u64,
        redelivery_count: u32,
        event_time_ms: Option<u64>,
        key: Option<&'a str>,
    ) -> Self {
        ConsumerMessage {
            message_id: crate::message_id::encode(message_id),
            payload: BASE64.encode(payload),
            // A map, later keys winning, as `Message.getProperties()` builds it.
            properties: properties.into_iter().collect(),
            publish_time: time::format(publish_time_ms),
            redelivery_count,
            event_time: event_time_ms.filter(|t| *t != 0).map(time::format),
            key,
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
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
