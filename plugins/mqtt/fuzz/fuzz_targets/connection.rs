//! A connected `MqttConnection`, 3.1.1 or 5.0, driven by a fake host: client bytes,
//! deliveries from the backend (their Pulsar properties are client-controlled too: any
//! producer can set `mqtt.*`), timers firing, and host operations failing. The host grants
//! every other operation (auth, claim, publish, subscribe, kv), so that SUBACKs, retained
//! scans and QoS 1/2 flows both ways are reached. Asserts: no panic; every `Send` is whole MQTT
//! packets, one or more; once the connection closed it emits nothing more.
//!
//! Input: byte 0 picks the version (bit 0: 5.0) and Clean Session (bit 1: a persistent
//! session, which loads and stores kv state); then records `kind, length, body`:
//! - kind 0: `body` is client bytes (one read; a packet may span records);
//! - kind 1: a delivery on the last backend subscription opened: body byte 0 is `mqtt.qos`,
//!   byte 1 bit 0 `mqtt.retain`; the rest, split at NUL bytes, is the topic, then
//!   property key/value pairs, then the payload;
//! - kind 2: every timer set so far fires;
//! - kind 3: the host's next answer is an error (kind chosen by body byte 0).
#![no_main]

use std::collections::VecDeque;

use libfuzzer_sys::fuzz_target;
use magnetar_mqtt::codec::{v5, Properties};
use magnetar_mqtt::config::Config;
use magnetar_mqtt::connection::{
    Action, Event, Machine, MqttConnection, PROP_QOS, PROP_RETAIN, PROP_TOPIC,
};
use magnetar_mqtt_fuzz::{announced_size, frame};
use magnetar_sdk::{Delivery, ErrorKind, OpError, Principal, Property};

/// Rounds of host answers per input event, bounded so that a loop in the state machine (an
/// answer causing another request forever) ends the run instead of hanging the harness.
const MAX_ROUNDS: usize = 64;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, mut rest)) = data.split_first() else {
        return;
    };
    let mut h = Host::connect(mode & 1 != 0, mode & 2 == 0);
    while let [kind, len, tail @ ..] = rest {
        let (body, after) = tail.split_at(usize::from(*len).min(tail.len()));
        rest = after;
        match kind % 4 {
            0 => h.feed(Event::Data(body.to_vec())),
            1 => {
                if let Some(d) = h.delivery(body) {
                    h.feed(Event::Delivery(d));
                }
            }
            2 => {
                for (token, delay) in std::mem::take(&mut h.timers) {
                    h.now += delay;
                    h.feed(Event::Timer { token });
                }
            }
            _ => {
                let kinds = [
                    ErrorKind::NotAuthorized,
                    ErrorKind::InvalidName,
                    ErrorKind::Backend,
                    ErrorKind::QuotaExceeded,
                    ErrorKind::NotFound,
                    ErrorKind::Internal,
                ];
                let kind = kinds[usize::from(body.first().copied().unwrap_or(0)) % kinds.len()];
                h.fail_next = Some(kind);
            }
        }
    }
});

/// The connection and the fake host driving it.
struct Host {
    c: MqttConnection,
    now: u64,
    /// The backend subscriptions opened, newest last.
    subs: Vec<u64>,
    next_delivery: u64,
    /// Timers set and not fired yet: (token, delay).
    timers: Vec<(u64, u64)>,
    /// The next operation answered fails with this.
    fail_next: Option<ErrorKind>,
    closed: bool,
}

impl Host {
    /// A connection that sent CONNECT (Client Identifier `fuzz`, Keep Alive 0, user `u`)
    /// and got its CONNACK.
    fn connect(v5: bool, clean: bool) -> Host {
        let mut c = MqttConnection::new(1, Config::default(), 0x5eed, 1_000);
        c.take_actions();
        let mut h = Host {
            c,
            now: 1_000,
            subs: Vec::new(),
            next_delivery: 1,
            timers: Vec::new(),
            fail_next: None,
            closed: false,
        };
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', if v5 { 5 } else { 4 }];
        body.push(0xc0 | u8::from(clean) << 1);
        body.extend_from_slice(&0u16.to_be_bytes());
        if v5 {
            let p = Properties {
                // A persistent 5.0 session needs a Session Expiry Interval (§3.1.2.11.2).
                session_expiry_interval: (!clean).then_some(60),
                topic_alias_maximum: Some(4),
                ..Properties::default()
            };
            v5::put_properties(&mut body, &p);
        }
        for s in ["fuzz", "u", "p"] {
            body.extend_from_slice(&(s.len() as u16).to_be_bytes());
            body.extend_from_slice(s.as_bytes());
        }
        h.feed(Event::Data(frame(0x10, &body)));
        assert!(!h.closed, "the harness's own CONNECT was refused");
        h
    }

    /// A backend message on the newest subscription, as described in the module docs.
    fn delivery(&mut self, body: &[u8]) -> Option<Delivery> {
        let subscription = *self.subs.last()?;
        let (head, rest) = body.split_at(body.len().min(2));
        let mut fields: VecDeque<&[u8]> = rest.split(|b| *b == 0).collect();
        let topic = String::from_utf8_lossy(fields.pop_front().unwrap_or_default()).into_owned();
        let payload = fields.pop_back().unwrap_or_default().to_vec();
        let mut properties = vec![
            property(PROP_TOPIC.as_bytes(), topic.as_bytes()),
            property(
                PROP_QOS.as_bytes(),
                &[b'0' + head.first().map_or(0, |q| q % 3)],
            ),
        ];
        if head.get(1).is_some_and(|f| f & 1 != 0) {
            properties.push(property(PROP_RETAIN.as_bytes(), b"1"));
        }
        while let (Some(k), Some(v)) = (fields.pop_front(), fields.pop_front()) {
            properties.push(property(k, v));
        }
        self.next_delivery += 1;
        Some(Delivery {
            subscription,
            delivery_id: self.next_delivery,
            key: Some(topic),
            payload,
            properties,
            publish_time_ms: self.now,
            redelivery_count: 0,
        })
    }

    /// Feeds one event, then answers every host request it causes, and those the answers
    /// cause, round by round, for at most [`MAX_ROUNDS`] rounds.
    fn feed(&mut self, event: Event) {
        let mut pending = vec![event];
        for _ in 0..MAX_ROUNDS {
            if pending.is_empty() {
                return;
            }
            let mut answers = Vec::new();
            for event in pending {
                self.now += 1;
                let actions = self.c.handle(self.now, event);
                assert!(
                    !self.closed || actions.is_empty(),
                    "actions after Close: {actions:?}"
                );
                answers.extend(actions.into_iter().filter_map(|a| self.check_and_answer(a)));
            }
            pending = answers;
        }
    }

    /// Checks one action; the host's answer to it, if it wants one.
    fn check_and_answer(&mut self, a: Action) -> Option<Event> {
        let fail = |kind: Option<ErrorKind>| {
            kind.map(|kind| OpError {
                kind,
                message: "failed by the fuzz input".into(),
            })
        };
        Some(match a {
            Action::Send(bytes) => {
                // Consecutive packets share a Send; it never ends inside one.
                let mut rest = bytes.as_slice();
                while !rest.is_empty() {
                    let size = announced_size(rest).filter(|n| *n <= rest.len());
                    let Some(size) = size else {
                        panic!("a Send that is not whole MQTT packets: {bytes:02x?}");
                    };
                    rest = &rest[size..];
                }
                return None;
            }
            Action::Close(_) => {
                self.closed = true;
                assert!(self.c.is_closed());
                return None;
            }
            Action::SetTimer { token, delay_ms } => {
                self.timers.push((token, delay_ms));
                return None;
            }
            Action::Unsubscribe { .. }
            | Action::Ack { .. }
            | Action::AckMany { .. }
            | Action::Bind { .. }
            | Action::Unbind { .. } => return None,
            Action::SetWill(_) | Action::Log { .. } | Action::SetReading(_) => return None,
            // SASL is not offered (no mechanisms), so this is never asked; refuse it anyway.
            Action::AuthenticateSasl { token, .. } => Event::SaslResult {
                token,
                result: Err(fail(Some(ErrorKind::NotAuthorized))?),
            },
            // A login storm: the host's "server busy" instead of an internal failure.
            Action::Authenticate { token, .. } if self.fail_next == Some(ErrorKind::Internal) => {
                self.fail_next = None;
                Event::AuthBusy { token }
            }
            Action::Authenticate { token, .. } => Event::AuthResult {
                token,
                result: match fail(self.fail_next.take()) {
                    Some(e) => Err(e),
                    None => Ok(Principal {
                        user: "u".into(),
                        tenant: "t".into(),
                        namespace: "ns".into(),
                    }),
                },
            },
            // MQTT keeps to pubsub and routing: Pulsar's own message model is never asked for.
            Action::SendMessage { .. }
            | Action::OpenConsumer { .. }
            | Action::Nack { .. }
            | Action::Seek { .. }
            | Action::LastMessageId { .. } => panic!("the MQTT plugin used messaging: {a:?}"),
            // Nor indexed topics and topic administration (ABI 0.2.3, Kafka's).
            Action::Append { .. }
            | Action::OpenReader { .. }
            | Action::Locate { .. }
            | Action::Bounds { .. }
            | Action::CreateTopic { .. }
            | Action::DeleteTopic { .. }
            | Action::SetPartitions { .. }
            | Action::DescribeTopics { .. } => panic!("the MQTT plugin used indexed/topics: {a:?}"),
            // Nor homes (ABI 0.2.4, Kafka's group coordinator).
            Action::PostHome { .. } | Action::ReplyHome { .. } => {
                panic!("the MQTT plugin used homes: {a:?}")
            }
            // Nor queue caps (ABI 0.2.5, AMQP's x-max-length).
            Action::OpenCappedRoute { .. } | Action::PublishCapped { .. } => {
                panic!("the MQTT plugin used caps: {a:?}")
            }
            // Nor consumer flow (ABI 0.2.6, AMQP's basic.cancel with deliveries held).
            Action::Drain { .. } => panic!("the MQTT plugin used flow: {a:?}"),
            // Nor routes stored without a reader (ABI 0.2.6, AMQP's declarations).
            Action::StoreRoute { .. } | Action::QueueBacklog { .. } => {
                panic!("the MQTT plugin used durable: {a:?}")
            }
            // Nor queue consumer counts (ABI 0.2.7, AMQP's declare-ok).
            Action::ConsumerCount { .. } => panic!("the MQTT plugin used queues: {a:?}"),
            Action::Publish { token, .. } => Event::PublishResult {
                token,
                result: fail(self.fail_next.take()).map_or(Ok(()), Err),
            },
            Action::Subscribe { token, .. } | Action::OpenRoute { token, .. } => {
                Event::SubscribeResult {
                    token,
                    result: match fail(self.fail_next.take()) {
                        Some(e) => Err(e),
                        None => {
                            let id = self.subs.len() as u64 + 100;
                            self.subs.push(id);
                            Ok(id)
                        }
                    },
                }
            }
            Action::KvGet { token, .. } | Action::KvPut { token, .. } => Event::KvResult {
                token,
                result: fail(self.fail_next.take()).map_or(Ok(None), Err),
            },
            Action::KvScan { token, .. } => Event::KvScanResult {
                token,
                result: fail(self.fail_next.take()).map_or(Ok(Vec::new()), Err),
            },
            Action::Claim { token, .. } => Event::ClaimResult {
                token,
                result: fail(self.fail_next.take()).map_or(Ok(()), Err),
            },
        })
    }
}

fn property(key: &[u8], value: &[u8]) -> Property {
    Property {
        key: String::from_utf8_lossy(key).into_owned(),
        value: String::from_utf8_lossy(value).into_owned(),
    }
}
