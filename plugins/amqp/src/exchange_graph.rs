//! Exchange-to-exchange bindings (RabbitMQ's `exchange.bind`, capability
//! `exchange_exchange_bindings`): a message published to the source exchange that matches
//! the binding is routed by the destination exchange too, with its own routing key and
//! headers.
//!
//! The host routes by each queue's filters on the one source topic, where a message carries
//! the exchange it was published to. So a queue's route holds, beside its own bindings, one
//! binding on every exchange upstream of them ([`derive`]): for a queue bound to `D` with
//! `b`, and an edge `S → D` with key `k`, a binding on `S` that matches what both `k` (by
//! `S`'s type) and `b` (by `D`'s) let through, following edges up from there. These derived
//! bindings are stored in the queue's record (with the edges they follow, `via`), so the
//! host's index and the plugin's `mandatory` check see them like any other.
//!
//! What two bindings let through together must be one filter: any with a fanout's
//! (everything), equal keys, a key and a topic pattern that matches it, two topic patterns
//! that are equal, or one of which is `#` or has no wildcard. Two topic patterns with
//! wildcards that differ (`a.*` and `*.b`), and a headers binding with any key-based
//! binding other than a fanout's, have no such filter here: that path is not followed
//! (docs/amqp.md). A headers match on the source side needs a headers source exchange
//! (only a message published to one carries its headers as properties).

use std::collections::HashMap;

use crate::codec::{FieldTable, FieldValue};
use crate::topology::{long, text, topic_matches, Binding, ExchangeType};

/// Most derived bindings one queue gets (a bound on graphs with many paths).
pub const MAX_DERIVED: usize = 256;

/// An exchange-to-exchange binding, kept in its destination's record.
#[derive(Debug, Clone, PartialEq)]
pub struct Edge {
    pub source: String,
    /// The source exchange's type: how it matches `routing_key` / `arguments`.
    pub kind: ExchangeType,
    pub routing_key: String,
    pub arguments: FieldTable,
}

impl Edge {
    /// The edge's id in a derived binding's `via`.
    pub fn id(&self, destination: &str) -> String {
        format!("{}>{destination}:{}", self.source, self.routing_key)
    }

    pub fn encode(&self) -> FieldTable {
        let mut t = FieldTable::default();
        t.insert("source", long(&self.source))
            .insert("type", long(self.kind.name()))
            .insert("routing_key", long(&self.routing_key))
            .insert("arguments", FieldValue::Table(self.arguments.clone()));
        t
    }

    pub fn decode(t: &FieldTable) -> Option<Self> {
        Some(Edge {
            source: text(t, "source")?,
            kind: ExchangeType::parse(&text(t, "type")?)?,
            routing_key: text(t, "routing_key")?,
            arguments: match t.get("arguments") {
                Some(FieldValue::Table(a)) => a.clone(),
                _ => FieldTable::default(),
            },
        })
    }

    /// The same binding (`exchange.unbind` removes it).
    pub fn same(&self, other: &Edge) -> bool {
        self.source == other.source
            && self.routing_key == other.routing_key
            && self.arguments == other.arguments
    }
}

/// What a binding lets through, on its exchange's routing key and headers.
#[derive(Debug, Clone, PartialEq)]
enum Match {
    All,
    Exact(String),
    Topic(String),
    Headers(FieldTable),
}

impl Match {
    fn of(kind: ExchangeType, key: &str, arguments: &FieldTable) -> Self {
        match kind {
            ExchangeType::Fanout => Match::All,
            ExchangeType::Direct => Match::Exact(key.to_string()),
            ExchangeType::Topic if key == "#" => Match::All,
            ExchangeType::Topic => Match::Topic(key.to_string()),
            ExchangeType::Headers => Match::Headers(arguments.clone()),
        }
    }

    /// What both let through, if one binding says it.
    fn and(self, other: Match) -> Option<Match> {
        let wild = |p: &str| p.split('.').any(|w| w == "*" || w == "#");
        Some(match (self, other) {
            (Match::All, m) | (m, Match::All) => m,
            (Match::Exact(a), Match::Exact(b)) => (a == b).then_some(Match::Exact(a))?,
            (Match::Exact(a), Match::Topic(p)) | (Match::Topic(p), Match::Exact(a)) => {
                topic_matches(&p, &a).then_some(Match::Exact(a))?
            }
            (Match::Topic(p), Match::Topic(q)) if p == q => Match::Topic(p),
            (Match::Topic(p), Match::Topic(q)) if !wild(&p) => {
                topic_matches(&q, &p).then_some(Match::Exact(p))?
            }
            (Match::Topic(p), Match::Topic(q)) if !wild(&q) => {
                topic_matches(&p, &q).then_some(Match::Exact(q))?
            }
            (Match::Headers(a), Match::Headers(b)) if a == b => Match::Headers(a),
            _ => return None,
        })
    }

    /// As a binding on `exchange` (of type `kind`), following `via`.
    fn binding(self, exchange: &str, kind: ExchangeType, via: Vec<String>) -> Option<Binding> {
        let (kind, routing_key, arguments) = match self {
            Match::All => (ExchangeType::Fanout, String::new(), FieldTable::default()),
            Match::Exact(k) => (ExchangeType::Direct, k, FieldTable::default()),
            Match::Topic(p) => (ExchangeType::Topic, p, FieldTable::default()),
            // Only a message published to a headers exchange carries its headers.
            Match::Headers(a) if kind == ExchangeType::Headers => {
                (ExchangeType::Headers, String::new(), a)
            }
            Match::Headers(_) => return None,
        };
        Some(Binding {
            exchange: exchange.to_string(),
            kind,
            routing_key,
            arguments,
            via,
        })
    }
}

/// A queue's bindings through exchange-to-exchange bindings: for each of its own bindings
/// (`direct`, whose `via` is empty), one on each exchange upstream that lets through what
/// reaches the queue that way. `graph`: each destination exchange's edges. A path through an
/// edge twice (a cycle) stops there; at most [`MAX_DERIVED`].
pub fn derive(direct: &[Binding], graph: &HashMap<String, Vec<Edge>>) -> Vec<Binding> {
    let mut out: Vec<Binding> = Vec::new();
    let mut frontier: Vec<Binding> = direct.to_vec();
    while let Some(b) = frontier.pop() {
        let Some(edges) = graph.get(&b.exchange) else {
            continue;
        };
        let reaching = Match::of(b.kind, &b.routing_key, &b.arguments);
        for edge in edges {
            let id = edge.id(&b.exchange);
            if b.via.contains(&id) || out.len() >= MAX_DERIVED {
                continue;
            }
            let through = Match::of(edge.kind, &edge.routing_key, &edge.arguments);
            let Some(m) = through.and(reaching.clone()) else {
                continue;
            };
            let mut via = b.via.clone();
            via.push(id);
            let Some(d) = m.binding(&edge.source, edge.kind, via) else {
                continue;
            };
            let known = |x: &Binding| {
                x.exchange == d.exchange
                    && x.kind == d.kind
                    && x.routing_key == d.routing_key
                    && x.arguments == d.arguments
            };
            if direct.iter().any(known) || out.iter().any(known) {
                continue;
            }
            out.push(d.clone());
            frontier.push(d);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edge(source: &str, kind: ExchangeType, key: &str) -> Edge {
        Edge {
            source: source.into(),
            kind,
            routing_key: key.into(),
            arguments: FieldTable::default(),
        }
    }

    fn bound(exchange: &str, kind: ExchangeType, key: &str) -> Binding {
        Binding {
            exchange: exchange.into(),
            kind,
            routing_key: key.into(),
            arguments: FieldTable::default(),
            via: Vec::new(),
        }
    }

    #[test]
    fn bindings_follow_edges_upstream_with_what_both_let_through() {
        use ExchangeType::*;
        // q ← d (topic "a.*") ← s (direct "a.b") ← t (fanout); d ← u (topic "x.#").
        let mut graph = HashMap::new();
        graph.insert(
            "d".to_string(),
            vec![edge("s", Direct, "a.b"), edge("u", Topic, "x.#")],
        );
        graph.insert("s".to_string(), vec![edge("t", Fanout, "")]);
        let got = derive(&[bound("d", Topic, "a.*")], &graph);
        let keys: Vec<(&str, ExchangeType, &str, usize)> = got
            .iter()
            .map(|b| {
                (
                    b.exchange.as_str(),
                    b.kind,
                    b.routing_key.as_str(),
                    b.via.len(),
                )
            })
            .collect();
        // `a.*` and `x.#` let nothing through together: no binding on u.
        assert_eq!(keys, [("s", Direct, "a.b", 1), ("t", Direct, "a.b", 2)]);
        assert_eq!(got[1].via, ["s>d:a.b", "t>s:"]);
        // A cycle stops.
        graph.insert("t".to_string(), vec![edge("d", Topic, "#")]);
        let looped = derive(&[bound("d", Topic, "a.*")], &graph);
        assert!(looped.len() <= 4, "{looped:?}");
    }

    #[test]
    fn matches_combine_as_one_filter_or_none() {
        use Match::*;
        let t = |s: &str| Topic(s.into());
        let e = |s: &str| Exact(s.into());
        assert_eq!(All.and(t("a.*")), Some(t("a.*")));
        assert_eq!(e("a.b").and(t("a.*")), Some(e("a.b")));
        assert_eq!(e("a.b").and(e("a.c")), None);
        assert_eq!(t("a.b").and(t("*.b")), Some(e("a.b")));
        assert_eq!(t("a.*").and(t("a.*")), Some(t("a.*")));
        assert_eq!(t("a.*").and(t("*.b")), None);
        assert_eq!(Headers(FieldTable::default()).and(e("k")), None);
    }
}
