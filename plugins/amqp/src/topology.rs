//! Exchanges, queues and bindings, and how they map onto the gateway's routing layer.
//!
//! - Every exchange of a vhost publishes into **one** source topic, [`SOURCE`], of the
//!   namespace. A message carries its routing key as `<exchange>.<routing key>` in the
//!   property [`KEY_PROPERTY`] (the exchange name escaped into one word, [`exchange_word`]),
//!   its exchange and routing key as they were ([`EXCHANGE_PROPERTY`],
//!   [`ROUTING_KEY_PROPERTY`]), its content header's property bytes as the client sent them
//!   ([`PROPERTIES_PROPERTY`], hex) and, for a headers exchange, each header as a property
//!   [`header_property`].
//! - A queue is a durable route of the host on that source: its queue topic is
//!   [`queue_topic`], its filters are its bindings ([`Binding::filter`]: direct → `exact`,
//!   fanout → `amqp-topic` `<exchange>.#`, topic → `amqp-topic`, headers → `headers` on the
//!   exchange's header properties), plus the default exchange's implicit binding. The host
//!   stores the filters and copies each matching message into the queue topic once.
//! - Exchange and queue declarations live in the namespace's kv ([`exchange_key`],
//!   [`queue_key`]) as field tables (the codec's own encoding), so they survive a restart
//!   and every gateway on the backend sees them.

use magnetar_sdk::{Filter, HeadersFilter, Property};

use crate::codec::wire::{Put, Reader};
use crate::codec::{FieldTable, FieldValue};

/// The topic every exchange of the namespace publishes into.
pub const SOURCE: &str = "amqp";
/// The property the host routes by: `<exchange word>.<routing key>`.
pub const KEY_PROPERTY: &str = "amqp.key";
pub const EXCHANGE_PROPERTY: &str = "amqp.exchange";
pub const ROUTING_KEY_PROPERTY: &str = "amqp.routing-key";
/// The content header's property flags and values, hex.
pub const PROPERTIES_PROPERTY: &str = "amqp.properties";
/// The subscription of a queue topic that the queue's consumers share (the host's durable
/// routes read their queue under the same name).
pub const QUEUE_SUBSCRIPTION: &str = "magnetar-queue";

/// An exchange type (§3.1.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeType {
    Direct,
    Fanout,
    Topic,
    Headers,
}

impl ExchangeType {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "direct" => ExchangeType::Direct,
            "fanout" => ExchangeType::Fanout,
            "topic" => ExchangeType::Topic,
            "headers" => ExchangeType::Headers,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            ExchangeType::Direct => "direct",
            ExchangeType::Fanout => "fanout",
            ExchangeType::Topic => "topic",
            ExchangeType::Headers => "headers",
        }
    }
}

/// A declared exchange.
#[derive(Debug, Clone, PartialEq)]
pub struct Exchange {
    pub kind: ExchangeType,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
    /// The exchanges bound to this one (`exchange.bind` with this one as destination).
    pub sources: Vec<crate::exchange_graph::Edge>,
}

/// The exchanges every vhost has (§3.1.3.1, RabbitMQ's `amq.match`).
pub fn predeclared(name: &str) -> Option<Exchange> {
    let kind = match name {
        "" | "amq.direct" => ExchangeType::Direct,
        "amq.fanout" => ExchangeType::Fanout,
        "amq.topic" => ExchangeType::Topic,
        "amq.headers" | "amq.match" => ExchangeType::Headers,
        _ => return None,
    };
    Some(Exchange {
        kind,
        durable: true,
        auto_delete: false,
        internal: false,
        sources: Vec::new(),
    })
}

pub fn exchange_key(name: &str) -> String {
    format!("amqp/x/{name}")
}

pub fn queue_key(name: &str) -> String {
    format!("amqp/q/{name}")
}

/// The lease of a connection that owns exclusive queues: the time (ms since the Unix
/// epoch, 8 bytes big-endian) until which it is alive unless it renews it. A connection that
/// ends cleanly deletes its exclusive queues and its lease; one whose gateway crashed or
/// whose socket went away leaves them, and the first other connection that uses such a
/// queue after the lease ran out deletes it (RabbitMQ deletes it when the owner goes).
pub fn lease_key(owner: &str) -> String {
    format!("amqp/c/{owner}")
}

/// The topic into which the host publishes, for a connection that ends without
/// `connection.close` while it owns exclusive queues, a message naming it (its will, which
/// also deletes its lease: [`lease_key`]). Nothing reads it.
pub const ENDED_TOPIC: &str = "amqp-ended";

/// When a queue with `x-expires` expires unless used before (8 bytes, as a lease): its
/// connections move it on while they consume it, and at each declaration and `basic.get`.
pub fn expiry_key(queue: &str) -> String {
    format!("amqp/e/{queue}")
}

/// A lease record's expiry time.
pub fn lease_until(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

/// A queue binding: the exchange's type is kept with it, so that the queue's filters are
/// rebuilt without reading the exchange again.
#[derive(Debug, Clone, PartialEq)]
pub struct Binding {
    pub exchange: String,
    pub kind: ExchangeType,
    pub routing_key: String,
    pub arguments: FieldTable,
    /// Empty for the queue's own bindings; for one that follows exchange-to-exchange
    /// bindings, their ids ([`crate::exchange_graph::Edge::id`]) from the queue's side.
    pub via: Vec<String>,
}

/// A declared queue.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Queue {
    pub durable: bool,
    pub exclusive: bool,
    pub auto_delete: bool,
    pub arguments: FieldTable,
    pub bindings: Vec<Binding>,
    /// An exclusive queue's owner: the id of the connection that declared it
    /// ([`lease_key`] says whether that connection still lives).
    pub owner: Option<String>,
    /// An auto-delete queue that has had a consumer: once none is left it is gone (RabbitMQ
    /// deletes it then), also when its last consumer's connection ended without a word.
    pub consumed: bool,
    /// This incarnation of the queue (its declaring connection's id and a number): a queue
    /// deleted and declared again under its name is another queue for its old consumers.
    /// `None` in records written before it existed.
    pub id: Option<String>,
}

fn flag(t: &FieldTable, name: &str) -> bool {
    matches!(t.get(name), Some(FieldValue::Bool(true)))
}

pub(crate) fn text(t: &FieldTable, name: &str) -> Option<String> {
    t.get(name).and_then(|v| v.as_str()).map(str::to_string)
}

pub(crate) fn long(s: &str) -> FieldValue {
    FieldValue::LongStr(s.as_bytes().to_vec())
}

fn encode_table(t: &FieldTable) -> Vec<u8> {
    let mut out = Vec::new();
    t.write(&mut Put::new(&mut out));
    out
}

fn decode_table(bytes: &[u8]) -> Option<FieldTable> {
    FieldTable::read(&mut Reader::new(bytes)).ok()
}

impl Exchange {
    pub fn encode(&self) -> Vec<u8> {
        let mut t = FieldTable::default();
        t.insert("type", long(self.kind.name()))
            .insert("durable", FieldValue::Bool(self.durable))
            .insert("auto_delete", FieldValue::Bool(self.auto_delete))
            .insert("internal", FieldValue::Bool(self.internal));
        if !self.sources.is_empty() {
            let sources = self
                .sources
                .iter()
                .map(|e| FieldValue::Table(e.encode()))
                .collect();
            t.insert("sources", FieldValue::Array(sources));
        }
        encode_table(&t)
    }

    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let t = decode_table(bytes)?;
        Some(Exchange {
            kind: ExchangeType::parse(&text(&t, "type")?)?,
            durable: flag(&t, "durable"),
            auto_delete: flag(&t, "auto_delete"),
            internal: flag(&t, "internal"),
            sources: match t.get("sources") {
                Some(FieldValue::Array(items)) => items
                    .iter()
                    .map(|i| match i {
                        FieldValue::Table(e) => crate::exchange_graph::Edge::decode(e),
                        _ => None,
                    })
                    .collect::<Option<Vec<_>>>()?,
                _ => Vec::new(),
            },
        })
    }
}

impl Queue {
    pub fn encode(&self) -> Vec<u8> {
        let bindings = self
            .bindings
            .iter()
            .map(|b| {
                let mut t = FieldTable::default();
                t.insert("exchange", long(&b.exchange))
                    .insert("type", long(b.kind.name()))
                    .insert("routing_key", long(&b.routing_key))
                    .insert("arguments", FieldValue::Table(b.arguments.clone()));
                if !b.via.is_empty() {
                    let via = b.via.iter().map(|v| long(v)).collect();
                    t.insert("via", FieldValue::Array(via));
                }
                FieldValue::Table(t)
            })
            .collect();
        let mut t = FieldTable::default();
        t.insert("durable", FieldValue::Bool(self.durable))
            .insert("exclusive", FieldValue::Bool(self.exclusive))
            .insert("auto_delete", FieldValue::Bool(self.auto_delete))
            .insert("arguments", FieldValue::Table(self.arguments.clone()))
            .insert("bindings", FieldValue::Array(bindings));
        if let Some(owner) = &self.owner {
            t.insert("owner", long(owner));
        }
        if let Some(id) = &self.id {
            t.insert("id", long(id));
        }
        if self.consumed {
            t.insert("consumed", FieldValue::Bool(true));
        }
        encode_table(&t)
    }

    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let t = decode_table(bytes)?;
        let mut bindings = Vec::new();
        if let Some(FieldValue::Array(items)) = t.get("bindings") {
            for item in items {
                let FieldValue::Table(b) = item else {
                    return None;
                };
                bindings.push(Binding {
                    exchange: text(b, "exchange")?,
                    kind: ExchangeType::parse(&text(b, "type")?)?,
                    routing_key: text(b, "routing_key")?,
                    arguments: match b.get("arguments") {
                        Some(FieldValue::Table(a)) => a.clone(),
                        _ => FieldTable::default(),
                    },
                    via: match b.get("via") {
                        Some(FieldValue::Array(v)) => v
                            .iter()
                            .map(|v| v.as_str().map(str::to_string))
                            .collect::<Option<Vec<_>>>()?,
                        _ => Vec::new(),
                    },
                });
            }
        }
        Some(Queue {
            durable: flag(&t, "durable"),
            exclusive: flag(&t, "exclusive"),
            auto_delete: flag(&t, "auto_delete"),
            arguments: match t.get("arguments") {
                Some(FieldValue::Table(a)) => a.clone(),
                _ => FieldTable::default(),
            },
            bindings,
            owner: text(&t, "owner"),
            id: text(&t, "id"),
            consumed: flag(&t, "consumed"),
        })
    }

    /// The queue's route filters: the default exchange's binding and one per binding.
    pub fn filters(&self, name: &str) -> Vec<Filter> {
        let mut filters = vec![Filter::Exact(route_key("", name))];
        for b in &self.bindings {
            if let Some(f) = b.filter() {
                if !filters.contains(&f) {
                    filters.push(f);
                }
            }
        }
        filters
    }
}

/// Escapes a name into characters that are safe in one word of a routing key and in a
/// topic name: ASCII letters, digits, `_` and `-` stay, every other byte is `%XX`; the empty
/// name (the default exchange) is `%`.
fn escape(name: &str, keep_dot: bool) -> String {
    if name.is_empty() {
        return "%".into();
    }
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || (keep_dot && b == b'.') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The exchange's name as one routing-key word.
pub fn exchange_word(exchange: &str) -> String {
    escape(exchange, false)
}

/// The value of [`KEY_PROPERTY`] for a message published to `exchange` with `routing_key`.
pub fn route_key(exchange: &str, routing_key: &str) -> String {
    format!("{}.{routing_key}", exchange_word(exchange))
}

/// A queue's topic, a short topic name of the namespace.
pub fn queue_topic(queue: &str) -> String {
    format!("amqp-q-{}", escape(queue, true))
}

/// The queue whose topic is `topic` ([`queue_topic`] undone); `None` for another topic.
pub fn queue_of_topic(topic: &str) -> Option<String> {
    let escaped = topic.strip_prefix("amqp-q-")?;
    if escaped == "%" {
        return Some(String::new());
    }
    let mut bytes = Vec::with_capacity(escaped.len());
    let mut rest = escaped.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        if b == b'%' {
            let hex = std::str::from_utf8(tail.get(..2)?).ok()?;
            bytes.push(u8::from_str_radix(hex, 16).ok()?);
            rest = tail.get(2..)?;
        } else {
            bytes.push(b);
            rest = tail;
        }
    }
    String::from_utf8(bytes).ok()
}

/// The property that carries header `name` of a message published to headers exchange
/// `exchange`.
pub fn header_property(exchange: &str, name: &str) -> String {
    format!("amqp.h.{}.{name}", exchange_word(exchange))
}

/// A header value as the text a headers filter compares; `None` for values that have no
/// text form here (tables, arrays, byte arrays), which then never match.
pub fn header_value(v: &FieldValue) -> Option<String> {
    Some(match v {
        FieldValue::LongStr(b) => format!("S{}", String::from_utf8_lossy(b)),
        FieldValue::Bool(b) => format!("t{b}"),
        FieldValue::I8(n) => format!("n{n}"),
        FieldValue::U8(n) => format!("n{n}"),
        FieldValue::I16(n) => format!("n{n}"),
        FieldValue::U16(n) => format!("n{n}"),
        FieldValue::I32(n) => format!("n{n}"),
        FieldValue::U32(n) => format!("n{n}"),
        FieldValue::I64(n) => format!("n{n}"),
        FieldValue::Timestamp(n) => format!("T{n}"),
        FieldValue::Void => "V".into(),
        _ => return None,
    })
}

/// The properties of a message published to a headers exchange: one per header.
pub fn header_properties(exchange: &str, headers: &FieldTable) -> Vec<Property> {
    headers
        .0
        .iter()
        .filter_map(|(k, v)| {
            Some(Property {
                key: header_property(exchange, k),
                value: header_value(v)?,
            })
        })
        .collect()
}

impl Binding {
    /// The route filter of this binding (`None`: a headers binding with nothing to match,
    /// which RabbitMQ matches... never here; see docs/amqp.md).
    pub fn filter(&self) -> Option<Filter> {
        Some(match self.kind {
            ExchangeType::Direct => Filter::Exact(route_key(&self.exchange, &self.routing_key)),
            ExchangeType::Fanout => {
                Filter::AmqpTopic(format!("{}.#", exchange_word(&self.exchange)))
            }
            ExchangeType::Topic => Filter::AmqpTopic(route_key(&self.exchange, &self.routing_key)),
            ExchangeType::Headers => {
                let match_all = !matches!(
                    self.arguments.get("x-match").and_then(|v| v.as_str()),
                    Some("any")
                );
                let args: Vec<Property> = self
                    .arguments
                    .0
                    .iter()
                    .filter(|(k, _)| !k.starts_with("x-"))
                    .filter_map(|(k, v)| {
                        Some(Property {
                            key: header_property(&self.exchange, k),
                            value: header_value(v)?,
                        })
                    })
                    .collect();
                if args.is_empty() {
                    return None;
                }
                Filter::Headers(HeadersFilter { match_all, args })
            }
        })
    }
}

/// Whether a route filter takes a message with routing key `key` and `properties`: what the
/// host's index decides, for the plugin's own view (`mandatory`). Topic keys are matched in
/// O(words of the filter × words of the key), whatever the wildcards.
pub fn filter_matches(filter: &Filter, key: &str, properties: &[Property]) -> bool {
    match filter {
        Filter::Exact(k) => k == key,
        Filter::All => true,
        Filter::AmqpTopic(f) => topic_matches(f, key),
        Filter::Headers(h) => {
            let hit = |a: &Property| {
                properties
                    .iter()
                    .any(|p| p.key == a.key && (a.value.is_empty() || p.value == a.value))
            };
            if h.match_all {
                h.args.iter().all(hit)
            } else {
                h.args.iter().any(hit)
            }
        }
        Filter::Mqtt(_) => false,
    }
}

/// AMQP topic matching: words split by `.`, `*` one word, `#` any number of words.
pub(crate) fn topic_matches(filter: &str, key: &str) -> bool {
    let f: Vec<&str> = filter.split('.').collect();
    let k: Vec<&str> = key.split('.').collect();
    // reach[j]: the filter's first i words match the key's first j words.
    let mut reach = vec![false; k.len() + 1];
    reach[0] = true;
    for word in &f {
        let mut next = vec![false; k.len() + 1];
        for j in 0..=k.len() {
            if *word == "#" {
                // Zero words, or one more word than a shorter match.
                next[j] = reach[j] || (j > 0 && next[j - 1]);
            } else if j > 0 && reach[j - 1] && (*word == "*" || *word == k[j - 1]) {
                next[j] = true;
            }
        }
        reach = next;
    }
    reach[k.len()]
}

/// Lower-case hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// The bytes of [`hex`]'s text.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    let s = s.as_bytes();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    s.chunks(2)
        .map(|pair| {
            let d = |c: u8| char::from(c).to_digit(16);
            Some((d(pair[0])? * 16 + d(pair[1])?) as u8)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use magnetar_sdk::testing::route_matches;

    fn binding(exchange: &str, kind: ExchangeType, key: &str) -> Binding {
        Binding {
            exchange: exchange.into(),
            kind,
            routing_key: key.into(),
            arguments: FieldTable::default(),
            via: Vec::new(),
        }
    }

    #[test]
    fn a_queue_is_found_from_its_topic() {
        for name in ["jobs", "", "a.b c/d%é", "amq.gen-Xy_z"] {
            assert_eq!(queue_of_topic(&queue_topic(name)).as_deref(), Some(name));
        }
        assert_eq!(queue_of_topic("other"), None);
        assert_eq!(queue_of_topic("amqp-q-%4"), None);
        assert_eq!(queue_of_topic("amqp-q-%ZZ"), None);
    }

    #[test]
    fn bindings_match_as_rabbitmq_routes() {
        let m = |b: &Binding, ex: &str, key: &str| {
            route_matches(&b.filter().unwrap(), &route_key(ex, key), &[])
        };
        let direct = binding("d", ExchangeType::Direct, "k");
        assert!(m(&direct, "d", "k") && !m(&direct, "d", "k2") && !m(&direct, "e", "k"));
        let fanout = binding("amq.fanout", ExchangeType::Fanout, "ignored");
        assert!(m(&fanout, "amq.fanout", "") && m(&fanout, "amq.fanout", "a.b"));
        assert!(
            !m(&fanout, "amq", "fanout.x"),
            "exchange names are one word"
        );
        let topic = binding("t", ExchangeType::Topic, "a.*.c.#");
        assert!(m(&topic, "t", "a.b.c") && m(&topic, "t", "a.b.c.d.e"));
        assert!(!m(&topic, "t", "a.c") && !m(&topic, "u", "a.b.c"));
        let hash = binding("t", ExchangeType::Topic, "#");
        assert!(m(&hash, "t", "") && m(&hash, "t", "x.y"));
        // The default exchange routes by queue name.
        let q = Queue::default();
        assert!(route_matches(
            &q.filters("jobs")[0],
            &route_key("", "jobs"),
            &[]
        ));
        assert!(!route_matches(
            &q.filters("jobs")[0],
            &route_key("amq.direct", "jobs"),
            &[]
        ));
    }

    #[test]
    fn headers_bindings_match_typed_values_of_their_exchange_only() {
        let mut args = FieldTable::default();
        args.insert("x-match", FieldValue::LongStr(b"any".to_vec()))
            .insert("format", FieldValue::LongStr(b"pdf".to_vec()))
            .insert("size", FieldValue::I32(5));
        let b = Binding {
            arguments: args,
            ..binding("h", ExchangeType::Headers, "")
        };
        let f = b.filter().unwrap();
        let mut headers = FieldTable::default();
        headers.insert("size", FieldValue::I64(5));
        assert!(route_matches(&f, "h.", &header_properties("h", &headers)));
        assert!(!route_matches(
            &f,
            "h2.",
            &header_properties("h2", &headers)
        ));
        let mut other = FieldTable::default();
        other.insert("size", FieldValue::LongStr(b"5".to_vec()));
        assert!(!route_matches(&f, "h.", &header_properties("h", &other)));
    }

    #[test]
    fn the_plugins_matcher_agrees_with_the_reference() {
        let cases = [
            ("a.*.c.#", "a.b.c"),
            ("a.*.c.#", "a.b.c.d.e"),
            ("a.*.c.#", "a.c"),
            ("#", ""),
            ("#.#", "x"),
            ("a.#.z", "a.z"),
            ("a.#.z", "a.b.c.z"),
            ("a.#.z", "a.b.c"),
            ("*", ""),
            ("*.*", "a"),
            ("", ""),
        ];
        for (f, k) in cases {
            let filter = Filter::AmqpTopic(f.into());
            assert_eq!(
                filter_matches(&filter, k, &[]),
                route_matches(&filter, k, &[]),
                "{f} / {k}"
            );
        }
        // Many `#` against a long key: answered at once.
        let filter = Filter::AmqpTopic(["#"; 40].join(".") + ".z");
        let key = ["a"; 200].join(".");
        assert!(!filter_matches(&filter, &key, &[]));
    }

    #[test]
    fn records_round_trip() {
        let q = Queue {
            durable: true,
            bindings: vec![binding("amq.topic", ExchangeType::Topic, "a.#")],
            ..Default::default()
        };
        assert_eq!(Queue::decode(&q.encode()), Some(q.clone()));
        let owned = Queue {
            exclusive: true,
            owner: Some("c0ffee-1".into()),
            id: Some("c0ffee-1-7".into()),
            consumed: true,
            bindings: vec![Binding {
                via: vec!["s>d:k".into()],
                ..binding("s", ExchangeType::Direct, "k")
            }],
            ..q
        };
        assert_eq!(Queue::decode(&owned.encode()), Some(owned));
        assert_eq!(lease_until(&42u64.to_be_bytes()), Some(42));
        assert_eq!(lease_until(b"short"), None);
        let x = predeclared("amq.fanout").unwrap();
        assert_eq!(Exchange::decode(&x.encode()), Some(x.clone()));
        let with_source = Exchange {
            sources: vec![crate::exchange_graph::Edge {
                source: "s".into(),
                kind: ExchangeType::Topic,
                routing_key: "a.#".into(),
                arguments: FieldTable::default(),
            }],
            ..x
        };
        assert_eq!(Exchange::decode(&with_source.encode()), Some(with_source));
        assert_eq!(unhex(&hex(&[0, 1, 254, 255])), Some(vec![0, 1, 254, 255]));
        assert_eq!(queue_topic("a b.c"), "amqp-q-a%20b.c");
        assert_eq!(route_key("amq.topic", "x.y"), "amq%2Etopic.x.y");
    }
}
