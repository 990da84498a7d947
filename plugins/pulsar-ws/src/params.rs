//! The query parameters of each endpoint, validated as Pulsar's handlers and the Java
//! client's builders validate them (docs/pulsar-websocket-api.md §4), with the same messages.
//!
//! Parameters that change nothing at the host (batching, compression, routing, send timeout,
//! priority, crypto failure action) are still parsed, so that a value Pulsar refuses is
//! refused here too.

use std::collections::BTreeMap;

use magnetar_sdk::SubMode;

use crate::message_id::{MessageId, BASE64};
use crate::request::Refusal;
use base64::Engine;

/// Query parameters by name.
pub type Query = BTreeMap<String, String>;

/// Pulsar's cap on `receiverQueueSize` in the WebSocket handlers (`Math.min(v, 1000)`).
pub const MAX_RECEIVER_QUEUE: i32 = 1000;

/// `Integer.parseInt`, with Java's `NumberFormatException` message.
fn int(q: &Query, key: &str) -> Result<Option<i32>, String> {
    q.get(key)
        .map(|v| {
            v.parse::<i32>()
                .map_err(|_| format!("For input string: \"{v}\""))
        })
        .transpose()
}

/// `Long.parseLong`.
fn long(q: &Query, key: &str) -> Result<Option<i64>, String> {
    q.get(key)
        .map(|v| {
            v.parse::<i64>()
                .map_err(|_| format!("For input string: \"{v}\""))
        })
        .transpose()
}

/// `Boolean.parseBoolean`: only `true`, in any case, is true.
fn boolean(q: &Query, key: &str) -> bool {
    q.get(key).is_some_and(|v| v.eq_ignore_ascii_case("true"))
}

/// A case-sensitive enum constant (`Enums.getIfPresent`), or Pulsar's message.
fn one_of<'a>(q: &'a Query, key: &str, allowed: &[&str]) -> Result<Option<&'a str>, String> {
    match q.get(key) {
        Some(v) if allowed.contains(&v.as_str()) => Ok(Some(v.as_str())),
        Some(v) => Err(format!("Invalid {key} {v}")),
        None => Ok(None),
    }
}

fn not_blank(q: &Query, key: &str, what: &str) -> Result<Option<String>, String> {
    match q.get(key) {
        Some(v) if v.trim().is_empty() => Err(format!("{what} cannot be blank")),
        other => Ok(other.cloned()),
    }
}

/// A producer's parameters (`ProducerHandler.getProducerBuilder`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProducerParams {
    pub producer_name: Option<String>,
}

impl ProducerParams {
    pub fn parse(q: &Query) -> Result<ProducerParams, Refusal> {
        Self::check(q).map_err(|e| match e {
            Failure::BadParam(m) => Refusal::bad_param(m),
            Failure::Server(m) => Refusal::new(500, format!("Failed to create producer: {m}")),
        })
    }

    fn check(q: &Query) -> Result<ProducerParams, Failure> {
        let producer_name = not_blank(q, "producerName", "producerName")?;
        long(q, "initialSequenceId")?;
        if let Some(v) = q.get("hashingScheme") {
            if !matches!(v.as_str(), "JavaStringHash" | "Murmur3_32Hash") {
                return Err(Failure::BadParam(format!(
                    "No enum constant org.apache.pulsar.client.api.HashingScheme.{v}"
                )));
            }
        }
        if int(q, "sendTimeoutMillis")?.is_some_and(|t| t < 0) {
            return Err(Failure::BadParam("sendTimeout needs to be >= 0".into()));
        }
        one_of(
            q,
            "messageRoutingMode",
            &["SinglePartition", "RoundRobinPartition", "CustomPartition"],
        )?;
        if let Some(keys) = q.get("encryptionKeys") {
            if encryption_key_map(keys) {
                return Err(Failure::BadParam(
                    "client-side encryption (encryptionKeys as a key map) is not supported: \
                     the gateway encrypts at rest"
                        .into(),
                ));
            }
            // A list of key names needs a crypto key reader, which a default Pulsar lacks.
            return Err(Failure::Server(
                "Can't add encryption key without configuring cryptoKeyReaderFactoryClassName"
                    .into(),
            ));
        }
        // Only read when batching is on (`popularProducerBuilderForServerSideEncrypt`).
        if boolean(q, "batchingEnabled") {
            int(q, "batchingMaxMessages")?;
            if int(q, "maxPendingMessages")?.is_some_and(|m| m < 0) {
                return Err(Failure::BadParam(
                    "maxPendingMessages needs to be >= 0".into(),
                ));
            }
            if int(q, "batchingMaxPublishDelay")?.is_some_and(|d| d < 1) {
                return Err(Failure::BadParam(
                    "configured value for batch delay must be at least 1ms".into(),
                ));
            }
        }
        one_of(
            q,
            "compressionType",
            &["NONE", "LZ4", "ZLIB", "ZSTD", "SNAPPY"],
        )?;
        Ok(ProducerParams { producer_name })
    }
}

/// Whether `encryptionKeys` is the base64 JSON key map of client-side encryption
/// (`ProducerHandler.tryToExtractJsonEncryptionKeys`) rather than a list of key names.
fn encryption_key_map(value: &str) -> bool {
    BASE64
        .decode(value.trim())
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&b).ok())
        .is_some_and(|m| {
            m.values()
                .next()
                .is_some_and(|v| v.get("keyValue").is_some_and(|k| !k.is_null()))
        })
}

enum Failure {
    BadParam(String),
    Server(String),
}

impl From<String> for Failure {
    fn from(m: String) -> Self {
        Failure::BadParam(m)
    }
}

/// A consumer's parameters (`ConsumerHandler.getConsumerConfiguration`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerParams {
    pub mode: SubMode,
    /// `subscriptionMode=Durable` (the default).
    pub durable: bool,
    /// `min(receiverQueueSize, 1000)`, at least 0.
    pub receiver_queue_size: u32,
    pub consumer_name: Option<String>,
    /// 0: off.
    pub ack_timeout_ms: u64,
    pub nack_delay_ms: u64,
    /// With a dead-letter topic: deliveries before a message goes there (0: no DLQ).
    pub max_redeliver_count: u32,
    /// As given; `None` with `max_redeliver_count > 0` means Pulsar's default name.
    pub dead_letter_topic: Option<String>,
    pub pull_mode: bool,
}

/// Pulsar's `negativeAckRedeliveryDelay` default: one minute.
pub const DEFAULT_NACK_DELAY_MS: u64 = 60_000;

impl ConsumerParams {
    pub fn parse(q: &Query) -> Result<ConsumerParams, Refusal> {
        Self::check(q).map_err(Refusal::bad_param)
    }

    fn check(q: &Query) -> Result<ConsumerParams, String> {
        let ack_timeout_ms = match int(q, "ackTimeoutMillis")? {
            Some(t) if t != 0 && t < 1000 => {
                return Err("Ack timeout should be greater than 1000 ms".into())
            }
            Some(t) => t as u64,
            None => 0,
        };
        let mode = match one_of(
            q,
            "subscriptionType",
            &["Exclusive", "Shared", "Failover", "Key_Shared"],
        )? {
            Some("Shared") => SubMode::Shared,
            Some("Failover") => SubMode::Failover,
            Some("Key_Shared") => SubMode::KeyShared,
            _ => SubMode::Exclusive,
        };
        let durable =
            one_of(q, "subscriptionMode", &["Durable", "NonDurable"])? != Some("NonDurable");
        let receiver_queue_size = match int(q, "receiverQueueSize")? {
            Some(n) => {
                let n = n.min(MAX_RECEIVER_QUEUE);
                u32::try_from(n).map_err(|_| "receiverQueueSize needs to be >= 0".to_string())?
            }
            None => MAX_RECEIVER_QUEUE as u32,
        };
        let consumer_name = not_blank(q, "consumerName", "consumerName")?;
        if int(q, "priorityLevel")?.is_some_and(|p| p < 0) {
            return Err("priorityLevel needs to be >= 0".into());
        }
        let nack_delay_ms = match int(q, "negativeAckRedeliveryDelay")? {
            Some(d) => {
                u64::try_from(d).map_err(|_| "redeliveryDelay needs to be >= 0".to_string())?
            }
            None => DEFAULT_NACK_DELAY_MS,
        };
        let (mut max_redeliver_count, mut dead_letter_topic) = (0, None);
        if q.contains_key("maxRedeliverCount") || q.contains_key("deadLetterTopic") {
            let count = int(q, "maxRedeliverCount")?.unwrap_or(0);
            if count <= 0 {
                return Err("MaxRedeliverCount must be > 0.".into());
            }
            max_redeliver_count = count as u32;
            dead_letter_topic = q.get("deadLetterTopic").cloned();
        }
        Ok(ConsumerParams {
            mode,
            durable,
            receiver_queue_size,
            consumer_name,
            ack_timeout_ms,
            nack_delay_ms,
            max_redeliver_count,
            dead_letter_topic,
            pull_mode: boolean(q, "pullMode"),
        })
    }

    /// The window of deliveries in flight: Pulsar counts a queue size of 0 as 1.
    pub fn window(&self) -> u32 {
        self.receiver_queue_size.max(1)
    }
}

/// Where a reader starts (`ReaderHandler.getMessageId`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    Earliest,
    Latest,
    /// A serialized `MessageIdData`, as the client gave it.
    Id(Vec<u8>),
}

/// A reader's parameters. Every failure is a 500, as `ReaderHandler` answers them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReaderParams {
    pub receiver_queue_size: u32,
    pub start: Start,
    pub reader_name: Option<String>,
}

impl ReaderParams {
    /// The part Pulsar reads before authentication (outside the handler's `try`).
    pub fn check_early(q: &Query) -> Result<(), Refusal> {
        int(q, "receiverQueueSize")
            .map(|_| ())
            .map_err(Refusal::server_error)
    }

    pub fn parse(q: &Query) -> Result<ReaderParams, Refusal> {
        let fail = |m: String| Refusal::server_error(format!("Failed to create reader: {m}"));
        let receiver_queue_size = match int(q, "receiverQueueSize").map_err(fail)? {
            Some(n) => u32::try_from(n.min(MAX_RECEIVER_QUEUE))
                .map_err(|_| fail("receiverQueueSize needs to be >= 0".into()))?,
            None => MAX_RECEIVER_QUEUE as u32,
        };
        let start = match q.get("messageId").map(String::as_str) {
            None => Start::Latest,
            Some(v) if v.trim().is_empty() || v == "latest" => Start::Latest,
            Some("earliest") => Start::Earliest,
            Some(v) => {
                let bytes = BASE64.decode(v).map_err(|e| fail(e.to_string()))?;
                match MessageId::parse(&bytes).map_err(|e| fail(e.to_string()))? {
                    MessageId::EARLIEST => Start::Earliest,
                    MessageId::LATEST => Start::Latest,
                    _ => Start::Id(bytes),
                }
            }
        };
        Ok(ReaderParams {
            receiver_queue_size,
            start,
            reader_name: q.get("readerName").cloned(),
        })
    }

    pub fn window(&self) -> u32 {
        self.receiver_queue_size.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::parse_query;

    fn q(s: &str) -> Query {
        parse_query(s).unwrap()
    }

    fn producer_err(s: &str) -> Refusal {
        ProducerParams::parse(&q(s)).unwrap_err()
    }

    fn consumer_err(s: &str) -> String {
        ConsumerParams::parse(&q(s)).unwrap_err().message
    }

    #[test]
    fn producer_parameters_pass_and_fail_as_in_pulsar() {
        let ok = ProducerParams::parse(&q("producerName=p1&initialSequenceId=5&hashingScheme=Murmur3_32Hash&sendTimeoutMillis=0&messageRoutingMode=CustomPartition&compressionType=LZ4&batchingEnabled=true&batchingMaxMessages=10&maxPendingMessages=0&batchingMaxPublishDelay=1&token=x")).unwrap();
        assert_eq!(ok.producer_name.as_deref(), Some("p1"));
        // Batching sizes are not read when batching is off.
        assert!(ProducerParams::parse(&q("batchingMaxMessages=abc")).is_ok());
        let e = producer_err("sendTimeoutMillis=abc");
        assert_eq!(
            (e.status, e.message.as_str()),
            (400, "Invalid query params: For input string: \"abc\"")
        );
        assert_eq!(
            producer_err("messageRoutingMode=roundrobin").message,
            "Invalid query params: Invalid messageRoutingMode roundrobin"
        );
        assert_eq!(
            producer_err("compressionType=lz4").message,
            "Invalid query params: Invalid compressionType lz4"
        );
        assert_eq!(
            producer_err("producerName=%20").message,
            "Invalid query params: producerName cannot be blank"
        );
        assert_eq!(producer_err("sendTimeoutMillis=-1").status, 400);
        assert_eq!(producer_err("initialSequenceId=x").status, 400);
        assert_eq!(producer_err("hashingScheme=Foo").status, 400);
        assert_eq!(
            producer_err("batchingEnabled=TRUE&batchingMaxPublishDelay=0").status,
            400
        );
        assert_eq!(producer_err("encryptionKeys=k1,k2").status, 500);
        // {"k":{"keyValue":"AAE="}} in base64: client-side encryption.
        let map = BASE64.encode(br#"{"k":{"keyValue":"AAE="}}"#);
        assert_eq!(producer_err(&format!("encryptionKeys={map}")).status, 400);
    }

    #[test]
    fn consumer_defaults_are_pulsars() {
        let c = ConsumerParams::parse(&q("")).unwrap();
        assert_eq!(
            c,
            ConsumerParams {
                mode: SubMode::Exclusive,
                durable: true,
                receiver_queue_size: 1000,
                consumer_name: None,
                ack_timeout_ms: 0,
                nack_delay_ms: 60_000,
                max_redeliver_count: 0,
                dead_letter_topic: None,
                pull_mode: false,
            }
        );
    }

    #[test]
    fn consumer_parameters_pass_and_fail_as_in_pulsar() {
        let c = ConsumerParams::parse(&q("subscriptionType=Key_Shared&subscriptionMode=NonDurable&receiverQueueSize=5000&consumerName=c1&priorityLevel=1&ackTimeoutMillis=1000&negativeAckRedeliveryDelay=0&maxRedeliverCount=3&pullMode=True")).unwrap();
        assert_eq!(c.mode, SubMode::KeyShared);
        assert!(!c.durable);
        assert_eq!(c.receiver_queue_size, 1000, "capped");
        assert_eq!(c.ack_timeout_ms, 1000);
        assert_eq!(c.nack_delay_ms, 0);
        assert_eq!((c.max_redeliver_count, c.dead_letter_topic), (3, None));
        assert!(c.pull_mode);
        let c = ConsumerParams::parse(&q(
            "receiverQueueSize=0&maxRedeliverCount=2&deadLetterTopic=dlq",
        ))
        .unwrap();
        assert_eq!((c.receiver_queue_size, c.window()), (0, 1));
        assert_eq!(c.dead_letter_topic.as_deref(), Some("dlq"));

        assert_eq!(
            consumer_err("subscriptionType=shared"),
            "Invalid query params: Invalid subscriptionType shared"
        );
        assert_eq!(
            consumer_err("subscriptionMode=durable"),
            "Invalid query params: Invalid subscriptionMode durable"
        );
        assert_eq!(
            consumer_err("receiverQueueSize=-1"),
            "Invalid query params: receiverQueueSize needs to be >= 0"
        );
        assert_eq!(
            consumer_err("ackTimeoutMillis=999"),
            "Invalid query params: Ack timeout should be greater than 1000 ms"
        );
        assert_eq!(
            consumer_err("deadLetterTopic=dlq"),
            "Invalid query params: MaxRedeliverCount must be > 0."
        );
        assert_eq!(
            consumer_err("negativeAckRedeliveryDelay=-5"),
            "Invalid query params: redeliveryDelay needs to be >= 0"
        );
        assert_eq!(
            consumer_err("consumerName="),
            "Invalid query params: consumerName cannot be blank"
        );
        assert_eq!(
            consumer_err("priorityLevel=-1"),
            "Invalid query params: priorityLevel needs to be >= 0"
        );
        assert_eq!(
            consumer_err("receiverQueueSize=1e3"),
            "Invalid query params: For input string: \"1e3\""
        );
    }

    #[test]
    fn reader_start_positions() {
        let r = |s: &str| ReaderParams::parse(&q(s));
        assert_eq!(r("").unwrap().start, Start::Latest);
        assert_eq!(r("messageId=").unwrap().start, Start::Latest);
        assert_eq!(r("messageId=earliest").unwrap().start, Start::Earliest);
        assert_eq!(r("messageId=latest").unwrap().start, Start::Latest);
        assert_eq!(
            r("messageId=CAcQADAA").unwrap().start,
            Start::Id(vec![8, 7, 16, 0, 48, 0])
        );
        assert_eq!(
            r("messageId=CP%2F%2F%2F%2F%2F%2F%2F%2F%2F%2F%2FwEQ%2F%2F%2F%2F%2F%2F%2F%2F%2F%2F%2F%2FATAA")
                .unwrap()
                .start,
            Start::Earliest
        );
        assert_eq!(r("messageId=%25%25").unwrap_err().status, 500);
        assert_eq!(
            r("messageId=AAAA").unwrap_err().status,
            500,
            "not a MessageIdData"
        );
        assert_eq!(r("receiverQueueSize=-3").unwrap_err().status, 500);
        assert_eq!(r("receiverQueueSize=0").unwrap().window(), 1);
        assert!(ReaderParams::check_early(&q("receiverQueueSize=x")).is_err());
    }
}
