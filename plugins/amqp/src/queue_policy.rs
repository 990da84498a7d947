//! What a queue's arguments ask of its messages, as RabbitMQ 3.x does it: expiry
//! (`x-message-ttl`, and a message's own `expiration`, the lower of the two counting) and
//! dead-lettering (`x-dead-letter-exchange`, `x-dead-letter-routing-key`) of messages
//! rejected without requeue or expired, with the `x-death` header RabbitMQ writes
//! (`rabbit_dead_letter`).
//!
//! Expiry is applied where a message leaves the queue: a consumer or `basic.get` that
//! receives an expired message settles it (dead-lettered, or dropped) instead of handing it
//! to the client. RabbitMQ drops expired messages at the head of the queue as well; here a
//! queue that nobody consumes is swept by the connections that declared it
//! (`connection::sweep`).

use magnetar_sdk::{Cap, Overflow};

use crate::codec::{BasicProperties, FieldTable, FieldValue};
use crate::topology::Queue;

/// The arguments of a queue that act on its messages.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueuePolicy {
    /// The queue's name (for `x-death`).
    pub queue: String,
    /// `x-message-ttl`, milliseconds.
    pub message_ttl: Option<u64>,
    /// `x-dead-letter-exchange`: where rejected and expired messages go.
    pub dead_letter_exchange: Option<String>,
    /// `x-dead-letter-routing-key`: their routing key there (else their own).
    pub dead_letter_routing_key: Option<String>,
}

/// Why a message is dead-lettered (the `reason` of `x-death`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// `basic.reject` or `basic.nack` with `requeue` false.
    Rejected,
    /// Its TTL passed.
    Expired,
    /// `x-max-length` dropped it from the head of its queue.
    Maxlen,
}

impl Reason {
    pub fn name(self) -> &'static str {
        match self {
            Reason::Rejected => "rejected",
            Reason::Expired => "expired",
            Reason::Maxlen => "maxlen",
        }
    }
}

/// An integer argument of any of the integer types clients send.
fn integer(v: &FieldValue) -> Option<i64> {
    Some(match *v {
        FieldValue::I8(n) => i64::from(n),
        FieldValue::U8(n) => i64::from(n),
        FieldValue::I16(n) => i64::from(n),
        FieldValue::U16(n) => i64::from(n),
        FieldValue::I32(n) => i64::from(n),
        FieldValue::U32(n) => i64::from(n),
        FieldValue::I64(n) => n,
        _ => return None,
    })
}

/// The values of `x-overflow` RabbitMQ 3.10 takes.
const OVERFLOWS: [&str; 3] = ["drop-head", "reject-publish", "reject-publish-dlx"];

/// A queue argument RabbitMQ refuses (406 PRECONDITION_FAILED), and why.
pub fn invalid_argument(args: &FieldTable) -> Option<(&'static str, String)> {
    if let Some(ttl) = args.get("x-message-ttl") {
        match integer(ttl) {
            None => return Some(("x-message-ttl", "not an integer".into())),
            Some(n) if n < 0 => return Some(("x-message-ttl", format!("{{value_negative,{n}}}"))),
            Some(_) => {}
        }
    }
    for arg in ["x-max-length", "x-max-length-bytes"] {
        if let Some(v) = args.get(arg) {
            match integer(v) {
                None => return Some((arg, "not an integer".into())),
                Some(n) if n < 0 => return Some((arg, format!("{{value_negative,{n}}}"))),
                Some(_) => {}
            }
        }
    }
    if let Some(v) = args.get("x-overflow") {
        let kind = v.as_str().unwrap_or_default();
        if !OVERFLOWS.contains(&kind) {
            return Some((
                "x-overflow",
                format!("{{unknown_overflow_type,<<\"{kind}\">>}}"),
            ));
        }
    }
    // RabbitMQ: a queue's expiry is a positive number of milliseconds.
    if let Some(expires) = args.get("x-expires") {
        match integer(expires) {
            None => return Some(("x-expires", "not an integer".into())),
            Some(0) => return Some(("x-expires", "{value_zero,0}".into())),
            Some(n) if n < 0 => return Some(("x-expires", format!("{{value_negative,{n}}}"))),
            Some(_) => {}
        }
    }
    None
}

/// A queue's `x-expires`: deleted once unused (no consumer, no `basic.get`, not declared
/// again) for that many milliseconds.
pub fn expires(queue: &Queue) -> Option<u64> {
    queue
        .arguments
        .get("x-expires")
        .and_then(integer)
        .and_then(|n| u64::try_from(n).ok())
        .filter(|n| *n > 0)
}

/// A queue's cap (`x-max-length`, `x-max-length-bytes`, `x-overflow`, RabbitMQ's default
/// overflow `drop-head`), which the host applies (`connection::overflow`); `None` without
/// either limit.
pub fn cap(queue: &Queue) -> Option<Cap> {
    let args = &queue.arguments;
    let limit = |k: &str| {
        args.get(k)
            .and_then(integer)
            .and_then(|n| u64::try_from(n).ok())
    };
    let (max_length, max_length_bytes) = (limit("x-max-length"), limit("x-max-length-bytes"));
    if max_length.is_none() && max_length_bytes.is_none() {
        return None;
    }
    let overflow = match args.get("x-overflow").and_then(|v| v.as_str()) {
        Some("reject-publish") => Overflow::RejectPublish,
        Some("reject-publish-dlx") => Overflow::RejectPublishDlx,
        _ => Overflow::DropHead,
    };
    Some(Cap {
        max_length,
        max_length_bytes,
        overflow,
    })
}

/// Whether a message's `expiration` is one RabbitMQ takes: a non-negative integer of
/// milliseconds, as text.
pub fn valid_expiration(expiration: &str) -> bool {
    !expiration.is_empty()
        && expiration.bytes().all(|b| b.is_ascii_digit())
        && expiration.parse::<u64>().is_ok()
}

impl QueuePolicy {
    /// The policy of the queue `name`, from its declared arguments.
    pub fn of(name: &str, queue: &Queue) -> Self {
        let args = &queue.arguments;
        let text = |k: &str| args.get(k).and_then(|v| v.as_str()).map(str::to_string);
        QueuePolicy {
            queue: name.to_string(),
            message_ttl: args
                .get("x-message-ttl")
                .and_then(integer)
                .and_then(|n| u64::try_from(n).ok()),
            dead_letter_exchange: text("x-dead-letter-exchange"),
            dead_letter_routing_key: text("x-dead-letter-routing-key"),
        }
    }

    /// Whether messages of this queue are dead-lettered (else dropped) when rejected or
    /// expired.
    pub fn dead_letters(&self) -> bool {
        self.dead_letter_exchange.is_some()
    }

    /// Whether a message published at `published_ms` with `properties` has expired at
    /// `now_ms`: its TTL (the queue's, or the message's own `expiration` if lower) passed.
    /// A message whose TTL is 0 expires unless delivered at once, in RabbitMQ; here, in the
    /// millisecond it was published.
    pub fn expired(&self, properties: &BasicProperties, published_ms: u64, now_ms: u64) -> bool {
        self.expires_at(properties, published_ms)
            .is_some_and(|at| now_ms >= at)
    }

    /// The first millisecond at which a message published at `published_ms` with
    /// `properties` has expired; `None` if it never expires.
    pub fn expires_at(&self, properties: &BasicProperties, published_ms: u64) -> Option<u64> {
        let own = properties
            .expiration
            .as_deref()
            .and_then(|e| e.parse::<u64>().ok());
        let ttl = lower(self.message_ttl, own)?;
        Some(published_ms.saturating_add(ttl).saturating_add(1))
    }

    /// Where a dead-lettered message goes: the exchange and routing keys, or `None` when the
    /// queue has no dead-letter exchange.
    pub fn dead_letter_route(&self, routing_key: &str) -> Option<(String, String)> {
        let exchange = self.dead_letter_exchange.clone()?;
        let key = self
            .dead_letter_routing_key
            .clone()
            .unwrap_or_else(|| routing_key.to_string());
        Some((exchange, key))
    }

    /// Whether dead-lettering a message with `properties` from this queue for `reason`
    /// would go round a dead-letter cycle with no rejection in it, which RabbitMQ breaks by
    /// dropping the message (`rabbit_dead_letter:detect_cycles`): the reason is automatic
    /// (expired, maxlen), the message died in this queue before, and every death since
    /// (that one too) was automatic. RabbitMQ checks the queues the dead-letter exchange
    /// routes to, before the message enters them; the gateway routes after the publish, so
    /// it checks the queue the message dies in now, and a cycle goes round once more here
    /// before it is broken.
    pub fn closes_automatic_cycle(&self, properties: &BasicProperties, reason: Reason) -> bool {
        if reason == Reason::Rejected {
            return false;
        }
        let deaths = match properties.headers.as_ref().and_then(|h| h.get("x-death")) {
            Some(FieldValue::Array(deaths)) => deaths,
            _ => return false,
        };
        for death in deaths {
            let FieldValue::Table(t) = death else {
                continue;
            };
            let field = |k: &str| t.get(k).and_then(FieldValue::as_str);
            if field("reason") == Some(Reason::Rejected.name()) {
                return false;
            }
            if field("queue") == Some(self.queue.as_str()) {
                return true;
            }
        }
        false
    }

    /// A message's properties once dead-lettered from this queue for `reason` at
    /// `now_s` (seconds since the epoch), as RabbitMQ 3.10 writes them
    /// (`rabbit_dead_letter:make_msg`): an `x-death` entry (count, reason, queue, time,
    /// exchange, routing keys, and the message's own expiration as `original-expiration`)
    /// added in front, or the matching entry's count raised; on the first death
    /// `x-first-death-reason`, `-queue` and `-exchange`; the headers sorted by name; the
    /// `expiration` removed (and `CC` with a dead-letter routing key).
    pub fn dead_lettered(
        &self,
        properties: &BasicProperties,
        reason: Reason,
        exchange: &str,
        routing_key: &str,
        now_s: u64,
    ) -> BasicProperties {
        let mut out = properties.clone();
        let mut headers = out.headers.take().unwrap_or_default();
        let long = |s: &str| FieldValue::LongStr(s.as_bytes().to_vec());
        let mut info = FieldTable::default();
        info.insert("reason", long(reason.name()))
            .insert("queue", long(&self.queue))
            .insert("time", FieldValue::Timestamp(now_s))
            .insert("exchange", long(exchange))
            .insert("routing-keys", FieldValue::Array(vec![long(routing_key)]));
        if let Some(e) = &properties.expiration {
            info.insert("original-expiration", long(e));
        }
        let deaths = match headers.get("x-death") {
            Some(FieldValue::Array(tables)) => Some(tables.clone()),
            _ => None,
        };
        match deaths {
            None => {
                set(&mut headers, "x-first-death-reason", long(reason.name()));
                set(&mut headers, "x-first-death-queue", long(&self.queue));
                set(&mut headers, "x-first-death-exchange", long(exchange));
                let mut first = FieldTable::default();
                first.insert("count", FieldValue::I64(1));
                first.0.extend(info.0);
                set(
                    &mut headers,
                    "x-death",
                    FieldValue::Array(vec![FieldValue::Table(first)]),
                );
            }
            Some(tables) => {
                let same = |t: &FieldValue| match t {
                    FieldValue::Table(t) => {
                        t.get("queue").and_then(FieldValue::as_str) == Some(self.queue.as_str())
                            && t.get("reason").and_then(FieldValue::as_str) == Some(reason.name())
                    }
                    _ => false,
                };
                let (matching, others): (Vec<FieldValue>, Vec<FieldValue>) =
                    tables.into_iter().partition(same);
                let mut entry = match matching.into_iter().next() {
                    // RabbitMQ raises the count and keeps the entry's other fields.
                    Some(FieldValue::Table(mut t)) => {
                        let count = t.get("count").and_then(integer).unwrap_or(0);
                        set(&mut t, "count", FieldValue::I64(count.saturating_add(1)));
                        t
                    }
                    _ => {
                        let mut t = info;
                        t.insert("count", FieldValue::I64(1));
                        t
                    }
                };
                sort(&mut entry);
                let mut all = vec![FieldValue::Table(entry)];
                all.extend(others);
                set(&mut headers, "x-death", FieldValue::Array(all));
            }
        }
        if self.dead_letter_routing_key.is_some() {
            headers.0.retain(|(k, _)| k != "CC");
        }
        out.headers = Some(headers);
        out.expiration = None;
        out
    }
}

/// The lower of two optional values (a queue's TTL and a message's own, two due times);
/// `None` if neither is set.
pub fn lower(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Sets `name` in a table, which ends sorted by name (RabbitMQ's `set_table_value`).
fn set(table: &mut FieldTable, name: &str, value: FieldValue) {
    match table.0.iter_mut().find(|(k, _)| k == name) {
        Some((_, v)) => *v = value,
        None => table.0.push((name.to_string(), value)),
    }
    sort(table);
}

fn sort(table: &mut FieldTable) {
    table.0.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(args: &[(&str, FieldValue)]) -> QueuePolicy {
        let mut queue = Queue::default();
        for (k, v) in args {
            queue.arguments.insert(k, v.clone());
        }
        QueuePolicy::of("work", &queue)
    }

    fn long(s: &str) -> FieldValue {
        FieldValue::LongStr(s.as_bytes().to_vec())
    }

    #[test]
    fn the_lower_of_the_queue_and_message_ttl_counts() {
        let p = policy(&[("x-message-ttl", FieldValue::I32(1000))]);
        let mut props = BasicProperties::default();
        assert!(!p.expired(&props, 10_000, 11_000));
        assert!(p.expired(&props, 10_000, 11_001));
        props.expiration = Some("100".into());
        assert!(p.expired(&props, 10_000, 10_101));
        assert_eq!(p.expires_at(&props, 10_000), Some(10_101));
        assert!(!policy(&[]).expired(&BasicProperties::default(), 0, u64::MAX));
        assert_eq!(policy(&[]).expires_at(&BasicProperties::default(), 0), None);
        props.expiration = Some("not a number".into());
        assert!(!policy(&[]).expired(&props, 0, u64::MAX));
    }

    #[test]
    fn an_automatic_dead_letter_cycle_is_broken_where_it_comes_round() {
        let dlx = ("x-dead-letter-exchange", long("dlx"));
        let (a, b) = (policy(&[dlx.clone()]), {
            let mut p = policy(&[dlx]);
            p.queue = "other".into();
            p
        });
        let fresh = BasicProperties::default();
        assert!(!a.closes_automatic_cycle(&fresh, Reason::Expired));
        // work -> other -> work, each time expired: the second death in work closes it.
        let once = a.dead_lettered(&fresh, Reason::Expired, "", "k", 1);
        assert!(!b.closes_automatic_cycle(&once, Reason::Expired));
        let twice = b.dead_lettered(&once, Reason::Expired, "dlx", "k", 2);
        assert!(a.closes_automatic_cycle(&twice, Reason::Expired));
        assert!(a.closes_automatic_cycle(&twice, Reason::Maxlen));
        // A rejection anywhere since breaks nothing: a client chose it.
        assert!(!a.closes_automatic_cycle(&twice, Reason::Rejected));
        let rejected = b.dead_lettered(&once, Reason::Rejected, "dlx", "k", 2);
        assert!(!a.closes_automatic_cycle(&rejected, Reason::Expired));
    }

    #[test]
    fn a_first_death_writes_x_death_and_the_first_death_headers() {
        let p = policy(&[
            ("x-dead-letter-exchange", long("dlx")),
            ("x-dead-letter-routing-key", long("dead")),
        ]);
        let mut headers = FieldTable::default();
        headers
            .insert("z", long("kept"))
            .insert("CC", long("other"));
        let props = BasicProperties {
            headers: Some(headers),
            expiration: Some("60000".into()),
            ..Default::default()
        };
        assert_eq!(
            p.dead_letter_route("job"),
            Some(("dlx".to_string(), "dead".to_string()))
        );
        let out = p.dead_lettered(&props, Reason::Rejected, "", "work", 1_700_000_000);
        assert_eq!(out.expiration, None);
        let h = out.headers.expect("headers");
        let names: Vec<&str> = h.0.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names,
            [
                "x-death",
                "x-first-death-exchange",
                "x-first-death-queue",
                "x-first-death-reason",
                "z"
            ]
        );
        let Some(FieldValue::Array(deaths)) = h.get("x-death") else {
            panic!("no x-death");
        };
        let [FieldValue::Table(d)] = deaths.as_slice() else {
            panic!("one entry expected");
        };
        assert_eq!(d.get("count"), Some(&FieldValue::I64(1)));
        assert_eq!(d.get("reason"), Some(&long("rejected")));
        assert_eq!(d.get("queue"), Some(&long("work")));
        assert_eq!(d.get("time"), Some(&FieldValue::Timestamp(1_700_000_000)));
        assert_eq!(d.get("exchange"), Some(&long("")));
        assert_eq!(
            d.get("routing-keys"),
            Some(&FieldValue::Array(vec![long("work")]))
        );
        assert_eq!(d.get("original-expiration"), Some(&long("60000")));
    }

    #[test]
    fn a_second_death_in_the_same_queue_for_the_same_reason_counts_up() {
        let p = policy(&[("x-dead-letter-exchange", long("dlx"))]);
        let once = p.dead_lettered(&BasicProperties::default(), Reason::Rejected, "", "q", 1);
        let twice = p.dead_lettered(&once, Reason::Rejected, "", "q", 2);
        let expired = p.dead_lettered(&twice, Reason::Expired, "", "q", 3);
        let h = expired.headers.expect("headers");
        let Some(FieldValue::Array(deaths)) = h.get("x-death") else {
            panic!("no x-death");
        };
        assert_eq!(deaths.len(), 2);
        let counts: Vec<(Option<&str>, Option<&FieldValue>)> = deaths
            .iter()
            .map(|d| match d {
                FieldValue::Table(t) => {
                    (t.get("reason").and_then(FieldValue::as_str), t.get("count"))
                }
                _ => (None, None),
            })
            .collect();
        assert_eq!(
            counts,
            [
                (Some("expired"), Some(&FieldValue::I64(1))),
                (Some("rejected"), Some(&FieldValue::I64(2)))
            ]
        );
        assert_eq!(h.get("x-first-death-reason"), Some(&long("rejected")));
    }

    #[test]
    fn x_expires_is_a_positive_integer() {
        let args = |v: FieldValue| {
            let mut t = FieldTable::default();
            t.insert("x-expires", v);
            t
        };
        assert_eq!(invalid_argument(&args(FieldValue::I32(1000))), None);
        assert_eq!(
            invalid_argument(&args(FieldValue::I32(0))),
            Some(("x-expires", "{value_zero,0}".into()))
        );
        assert!(invalid_argument(&args(FieldValue::I64(-5))).is_some());
        assert!(invalid_argument(&args(long("soon"))).is_some());
        let queue = Queue {
            arguments: args(FieldValue::U16(1500)),
            ..Default::default()
        };
        assert_eq!(expires(&queue), Some(1500));
        assert_eq!(expires(&Queue::default()), None);
    }
}
