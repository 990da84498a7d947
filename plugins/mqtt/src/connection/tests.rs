//! Drives [`MqttConnection`] with packets and host completions; no host calls.

use super::*;
use magnetar_sdk::{OutboundMessage, Property};
use proptest::prelude::*;
use std::collections::BTreeSet;

/// A stored 3.1.1 session with these filters and granted QoS.
fn stored_session(filters: &[(&str, u8)]) -> Vec<u8> {
    session_store::encode(&StoredSession {
        filters: filters
            .iter()
            .map(|(f, q)| (f.to_string(), Subscription::qos(*q)))
            .collect(),
        expiry: u32::MAX,
        ended_ms: None,
        backend_name: None,
    })
}

fn stored_filters(bytes: &[u8]) -> BTreeMap<String, u8> {
    session_store::decode(bytes)
        .unwrap()
        .filters
        .into_iter()
        .map(|(f, s)| (f, s.qos))
        .collect()
}

const CONN: u64 = 7;
const SUB: SubId = 42;

fn principal() -> Principal {
    Principal {
        user: "u".into(),
        tenant: "t".into(),
        namespace: "ns".into(),
    }
}

fn err(kind: ErrorKind) -> OpError {
    OpError {
        kind,
        message: "nope".into(),
    }
}

fn mqtt_string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

/// A packet with a correct Remaining Length.
fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    let mut len = body.len();
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

fn connect_packet(
    client_id: &str,
    clean: bool,
    keep_alive: u16,
    user: Option<(&str, &str)>,
) -> Vec<u8> {
    let mut body = Vec::new();
    mqtt_string(&mut body, b"MQTT");
    body.push(4);
    let mut flags = if clean { 0x02 } else { 0 };
    if user.is_some() {
        flags |= 0xc0;
    }
    body.push(flags);
    body.extend_from_slice(&keep_alive.to_be_bytes());
    mqtt_string(&mut body, client_id.as_bytes());
    if let Some((u, p)) = user {
        mqtt_string(&mut body, u.as_bytes());
        mqtt_string(&mut body, p.as_bytes());
    }
    packet(0x10, &body)
}

fn publish_packet(topic: &str, qos: u8, packet_id: u16, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    mqtt_string(&mut body, topic.as_bytes());
    if qos > 0 {
        body.extend_from_slice(&packet_id.to_be_bytes());
    }
    body.extend_from_slice(payload);
    packet(0x30 | (qos << 1), &body)
}

fn subscribe_packet(packet_id: u16, filters: &[(&str, u8)]) -> Vec<u8> {
    let mut body = packet_id.to_be_bytes().to_vec();
    for (f, q) in filters {
        mqtt_string(&mut body, f.as_bytes());
        body.push(*q);
    }
    packet(0x82, &body)
}

fn unsubscribe_packet(packet_id: u16, filters: &[&str]) -> Vec<u8> {
    let mut body = packet_id.to_be_bytes().to_vec();
    for f in filters {
        mqtt_string(&mut body, f.as_bytes());
    }
    packet(0xa2, &body)
}

fn delivery(id: u64, topic: &str, qos: u8, payload: &[u8]) -> Delivery {
    Delivery {
        subscription: SUB,
        delivery_id: id,
        key: Some(topic.into()),
        payload: payload.to_vec(),
        properties: vec![
            Property {
                key: PROP_TOPIC.into(),
                value: topic.into(),
            },
            Property {
                key: PROP_QOS.into(),
                value: qos.to_string(),
            },
        ],
        publish_time_ms: 0,
        redelivery_count: 0,
    }
}

/// A connection under test, with helpers that pick tokens out of actions.
struct Harness {
    c: MqttConnection,
    now: u64,
}

impl Harness {
    fn new() -> (Harness, Vec<Action>) {
        Self::with_config(Config::default())
    }

    fn with_config(config: Config) -> (Harness, Vec<Action>) {
        let mut c = MqttConnection::new(CONN, config, 0xabc, 1_000);
        let a = c.take_actions();
        (Harness { c, now: 1_000 }, a)
    }

    fn data(&mut self, bytes: &[u8]) -> Vec<Action> {
        self.c.handle(self.now, Event::Data(bytes.to_vec()))
    }

    /// Feeds an event; a Client Identifier claim it causes is granted at once (takeover
    /// tests drive `c.handle` themselves).
    fn event(&mut self, e: Event) -> Vec<Action> {
        let mut a = self.c.handle(self.now, e);
        if let Some(token) = claim_token(&a) {
            let more = self.c.handle(
                self.now,
                Event::ClaimResult {
                    token,
                    result: Ok(()),
                },
            );
            a.extend(more);
        }
        a
    }

    /// CONNECT with Clean Session 1, authenticated; returns the actions after the auth.
    fn connected(keep_alive: u16) -> Harness {
        let (mut h, _) = Harness::new();
        let a = h.data(&connect_packet(
            "dev1",
            true,
            keep_alive,
            Some(("alice", "secret")),
        ));
        let token = auth_token(&a);
        let a = h.event(Event::AuthResult {
            token,
            result: Ok(principal()),
        });
        assert_eq!(sent(&a), vec![codec::connack(false, 0)]);
        h
    }

    /// Connected, subscribed to `filters`, backend subscription open as [`SUB`].
    fn subscribed(filters: &[(&str, u8)]) -> Harness {
        let mut h = Harness::connected(0);
        let a = h.data(&subscribe_packet(1, filters));
        let token = subscribe_token(&a);
        let a = h.event(Event::SubscribeResult {
            token,
            result: Ok(SUB),
        });
        assert_eq!(sent(&a).len(), 1);
        h
    }
}

/// The bytes of a PUBLISH the server sends.
fn out_publish(topic: &str, qos: u8, packet_id: u16, retain: bool, payload: &[u8]) -> Vec<u8> {
    let flags = codec::PublishFlags {
        qos,
        packet_id,
        retain,
        dup: false,
    };
    codec::publish(topic, flags, payload).unwrap()
}

/// The packets sent, one per element, whether or not the machine joined them in one `Send`.
fn sent(actions: &[Action]) -> Vec<Vec<u8>> {
    let mut packets = Vec::new();
    for a in actions {
        if let Action::Send(mut rest) = a.clone() {
            while !rest.is_empty() {
                let (_, remaining, header_len) =
                    codec::fixed_header(&rest).unwrap().expect("a whole packet");
                let tail = rest.split_off(header_len + remaining as usize);
                packets.push(std::mem::replace(&mut rest, tail));
            }
        }
    }
    packets
}

fn closed(actions: &[Action]) -> Option<String> {
    actions.iter().find_map(|a| match a {
        Action::Close(r) => Some(r.clone()),
        _ => None,
    })
}

fn auth_token(actions: &[Action]) -> u64 {
    actions
        .iter()
        .find_map(|a| match a {
            Action::Authenticate { token, .. } => Some(*token),
            _ => None,
        })
        .expect("an Authenticate action")
}

fn claim_token(actions: &[Action]) -> Option<u64> {
    actions.iter().find_map(|a| match a {
        Action::Claim { token, .. } => Some(*token),
        _ => None,
    })
}

/// The token of the main backend subscription's opening: a route (clean session) or a
/// durable subscription (persistent session).
fn subscribe_token(actions: &[Action]) -> u64 {
    actions
        .iter()
        .find_map(|a| match a {
            Action::Subscribe { token, .. } | Action::OpenRoute { token, .. } => Some(*token),
            _ => None,
        })
        .expect("a Subscribe or OpenRoute action")
}

fn route_action(actions: &[Action]) -> (u64, RouteSpec) {
    actions
        .iter()
        .find_map(|a| match a {
            Action::OpenRoute { token, spec } => Some((*token, spec.clone())),
            _ => None,
        })
        .expect("an OpenRoute action")
}

fn binds(actions: &[Action]) -> Vec<String> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Bind {
                filter: Filter::Mqtt(f),
                ..
            } => Some(format!("+{f}")),
            Action::Unbind {
                filter: Filter::Mqtt(f),
                ..
            } => Some(format!("-{f}")),
            _ => None,
        })
        .collect()
}

/// A durable backend subscription's opening: a `Subscribe` (share groups), or a durable
/// route (persistent sessions), seen as the subscription it reads (its queue by name).
fn subscribe_action(actions: &[Action]) -> (u64, SubscriptionSpec) {
    actions
        .iter()
        .find_map(|a| match a {
            Action::Subscribe { token, spec } => Some((*token, spec.clone())),
            Action::OpenRoute { token, spec } => spec.queue.as_ref().map(|queue| {
                let sub = SubscriptionSpec {
                    topic: spec.source.clone(),
                    name: queue.clone(),
                    mode: SubMode::Exclusive,
                    durable: true,
                    initial_position: InitialPosition::Latest,
                    max_unacked: spec.max_unacked,
                };
                (*token, sub)
            }),
            _ => None,
        })
        .expect("a Subscribe action or a durable OpenRoute")
}

fn publishes(actions: &[Action]) -> Vec<(u64, OutboundMessage)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Publish { token, msg } => Some((*token, msg.clone())),
            _ => None,
        })
        .collect()
}

/// The deliveries acked, whether one by one or gathered by the outbox.
fn acks(actions: &[Action]) -> Vec<u64> {
    actions
        .iter()
        .flat_map(|a| match a {
            Action::Ack { delivery_id, .. } => vec![*delivery_id],
            Action::AckMany { delivery_ids, .. } => delivery_ids.clone(),
            _ => Vec::new(),
        })
        .collect()
}

/// A kv operation: token, key, and for a put the value written.
type KvOp = (u64, String, Option<Option<Vec<u8>>>);

fn kv_ops(actions: &[Action]) -> Vec<KvOp> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::KvGet { token, key } => Some((*token, key.clone(), None)),
            Action::KvPut { token, key, value } => Some((*token, key.clone(), Some(value.clone()))),
            _ => None,
        })
        .collect()
}

fn timers(actions: &[Action]) -> Vec<(u64, u64)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::SetTimer { token, delay_ms } => Some((*token, *delay_ms)),
            _ => None,
        })
        .collect()
}

// ---- CONNECT / CONNACK ----------------------------------------------------------------------

#[test]
fn credentials_mapping() {
    assert!(matches!(credentials(None, None), Credentials::Anonymous));
    let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhIn0.c2lnbmF0dXJl".to_string();
    assert!(matches!(
        credentials(Some("token".into()), Some(jwt.clone().into_bytes())),
        Credentials::Token(t) if t == jwt
    ));
    assert!(matches!(
        credentials(Some(String::new()), Some(jwt.clone().into_bytes())),
        Credentials::Token(_)
    ));
    assert!(matches!(
        credentials(Some("bob".into()), Some(jwt.into_bytes())),
        Credentials::Password(_)
    ));
    assert!(matches!(
        credentials(Some("token".into()), Some(b"plain".to_vec())),
        Credentials::Password(_)
    ));
}

#[test]
fn backend_failure_during_auth_gets_connack_3() {
    let (mut h, _) = Harness::new();
    let a = h.data(&connect_packet("dev1", true, 0, None));
    let token = auth_token(&a);
    let a = h.event(Event::AuthResult {
        token,
        result: Err(err(ErrorKind::Backend)),
    });
    assert_eq!(sent(&a), vec![codec::connack(false, 3)]);
    assert!(closed(&a).is_some());
}

#[test]
fn unsupported_protocol_level_gets_connack_1() {
    let (mut h, _) = Harness::new();
    let mut p = connect_packet("dev1", true, 0, None);
    p[8] = 6; // Protocol Level 6: no such MQTT
    let a = h.data(&p);
    assert_eq!(sent(&a), vec![codec::connack(false, 1)]);
    assert!(closed(&a).unwrap().contains("protocol level 6"));
}

#[test]
fn empty_client_id_with_persistent_session_gets_connack_2() {
    let (mut h, _) = Harness::new();
    let a = h.data(&connect_packet("", false, 0, None));
    assert_eq!(sent(&a), vec![codec::connack(false, 2)]);
    assert!(closed(&a).is_some());
}

#[test]
fn empty_client_id_with_clean_session_is_assigned_one() {
    let (mut h, _) = Harness::new();
    let a = h.data(&connect_packet("", true, 0, None));
    let token = auth_token(&a);
    let a = h.event(Event::AuthResult {
        token,
        result: Ok(principal()),
    });
    assert_eq!(sent(&a), vec![codec::connack(false, 0)]);
    assert!(kv_ops(&a).is_empty(), "no earlier session can exist");
}

#[test]
fn second_connect_closes() {
    let mut h = Harness::connected(0);
    let a = h.data(&connect_packet("dev1", true, 0, None));
    assert!(closed(&a).unwrap().contains("second CONNECT"));
}

#[test]
fn packets_after_connect_wait_for_the_connack() {
    let (mut h, _) = Harness::new();
    let mut bytes = connect_packet("dev1", true, 0, None);
    bytes.extend_from_slice(&[0xc0, 0x00]); // PINGREQ, pipelined
    let a = h.data(&bytes);
    assert!(sent(&a).is_empty());
    let token = auth_token(&a);
    let a = h.event(Event::AuthResult {
        token,
        result: Ok(principal()),
    });
    assert_eq!(sent(&a), vec![codec::connack(false, 0), codec::pingresp()]);
}

#[test]
fn connect_split_across_reads() {
    let (mut h, _) = Harness::new();
    let p = connect_packet("dev1", true, 0, None);
    for (i, b) in p[..p.len() - 1].iter().enumerate() {
        let a = h.data(&[*b]);
        // The first input only tells the host that the plugin steers reading.
        match i {
            0 => assert!(matches!(a.as_slice(), [Action::SetReading(true)]), "{a:?}"),
            _ => assert!(a.is_empty(), "{a:?}"),
        }
    }
    let a = h.data(&p[p.len() - 1..]);
    auth_token(&a);
}

// ---- malformed input ------------------------------------------------------------------------

#[test]
fn first_packet_not_connect_closes() {
    let (mut h, _) = Harness::new();
    let a = h.data(&[0xc0, 0x00]);
    assert!(closed(&a).unwrap().contains("first packet must be CONNECT"));
}

#[test]
fn http_request_is_named_in_the_close_reason() {
    let (mut h, _) = Harness::new();
    let a = h.data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(
        closed(&a).unwrap(),
        "not MQTT: the client sent an HTTP request"
    );
}

#[test]
fn kafka_request_is_named_in_the_close_reason() {
    let (mut h, _) = Harness::new();
    // ApiVersions v3: a 4-byte big-endian length first.
    let a = h.data(&[0, 0, 0, 0x1e, 0, 0x12, 0, 3, 0, 0, 0, 1]);
    assert!(closed(&a).unwrap().contains("Kafka"));
}

#[test]
fn tls_client_hello_is_named_in_the_close_reason() {
    let (mut h, _) = Harness::new();
    let a = h.data(&[0x16, 0x03, 0x01, 0x00, 0x05]);
    assert!(closed(&a).unwrap().contains("TLS"));
}

#[test]
fn oversized_remaining_length_closes_before_buffering() {
    let config = Config {
        max_packet_size: 1024,
        ..Config::default()
    };
    let (mut h, _) = Harness::with_config(config);
    let a = h.data(&[0x10, 0xff, 0xff, 0x7f]); // CONNECT announcing ~2 MiB
    assert!(closed(&a)
        .unwrap()
        .contains("exceeds the maximum packet size"));
    let mut h = Harness::connected(0);
    let a = h.data(&[0x30, 0xff, 0xff, 0xff, 0x7f]);
    assert!(closed(&a)
        .unwrap()
        .contains("exceeds the maximum packet size"));
}

#[test]
fn truncated_frame_waits_then_malformed_body_closes() {
    let mut h = Harness::connected(0);
    // PUBLISH announcing 10 bytes, only 3 given: wait.
    assert!(h.data(&[0x30, 0x0a, 0x00, 0x05, b'a']).is_empty());
    // A complete frame whose Topic Name length (9) overruns the frame: malformed.
    let mut h = Harness::connected(0);
    let a = h.data(&[0x30, 0x03, 0x00, 0x09, b'a']);
    assert!(closed(&a).unwrap().contains("malformed PUBLISH"));
}

#[test]
fn reserved_packet_type_closes() {
    let mut h = Harness::connected(0);
    let a = h.data(&[0xf0, 0x00]);
    assert!(closed(&a).unwrap().contains("reserved packet type"));
}

#[test]
fn server_only_packet_from_client_closes() {
    let mut h = Harness::connected(0);
    let a = h.data(&codec::connack(false, 0));
    assert!(closed(&a).unwrap().contains("CONNACK"));
}

#[test]
fn pipelined_input_beyond_the_limit_closes() {
    let config = Config {
        max_packet_size: 1024,
        ..Config::default()
    };
    let (mut h, _) = Harness::with_config(config);
    let mut bytes = connect_packet("dev1", true, 0, None);
    // Paused while authenticating: everything else is buffered, up to a bound (twice the
    // largest packet, and at least two of the host's largest reads, 512 KiB).
    for _ in 0..600 {
        bytes.extend_from_slice(&publish_packet("a", 0, 0, &[0; 1000]));
    }
    let a = h.data(&bytes);
    assert!(closed(&a).unwrap().contains("exceed the limit"));
}

#[test]
fn a_full_read_of_pipelined_publishes_is_decoded_as_room_frees_up() {
    let config = Config {
        max_packet_size: 2048,
        max_pending_publishes: 16,
        ..Config::default()
    };
    let (mut h, _) = Harness::with_config(config);
    let a = h.data(&connect_packet("dev1", true, 0, Some(("alice", "secret"))));
    let token = auth_token(&a);
    h.event(Event::AuthResult {
        token,
        result: Ok(principal()),
    });
    // One 256 KiB read of 250 QoS 0 publishes: 16 at a time reach the backend, and every
    // outcome lets the next ones through, all of them in order.
    let mut bytes = Vec::new();
    for i in 0..250u32 {
        bytes.extend_from_slice(&publish_packet("a", 0, 0, &i.to_be_bytes().repeat(256)));
    }
    let mut actions = h.data(&bytes);
    assert!(closed(&actions).is_none(), "{actions:?}");
    let mut seen = Vec::new();
    while seen.len() < 250 {
        let published: Vec<(u64, u32)> = actions
            .iter()
            .filter_map(|a| match a {
                Action::Publish { token, msg } => {
                    let first = msg.payload.get(..4)?.try_into().ok()?;
                    Some((*token, u32::from_be_bytes(first)))
                }
                _ => None,
            })
            .collect();
        assert!(
            !published.is_empty(),
            "stalled after {} publishes",
            seen.len()
        );
        assert!(published.len() <= 16, "the window holds");
        seen.extend(published.iter().map(|(_, i)| *i));
        actions = Vec::new();
        for (token, _) in published {
            actions.extend(h.event(Event::PublishResult {
                token,
                result: Ok(()),
            }));
        }
    }
    assert_eq!(seen, (0..250).collect::<Vec<_>>());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic(chunks in proptest::collection::vec(
        proptest::collection::vec(any::<u8>(), 0..64), 0..8)) {
        let (mut h, _) = Harness::new();
        for c in &chunks {
            h.data(c);
        }
    }

    #[test]
    fn arbitrary_bytes_after_connack_never_panic(chunks in proptest::collection::vec(
        proptest::collection::vec(any::<u8>(), 0..64), 0..8)) {
        let mut h = Harness::connected(10);
        for c in &chunks {
            h.data(c);
        }
    }

    #[test]
    fn arbitrary_bytes_behind_a_valid_header_never_panic(
        first in any::<u8>(), body in proptest::collection::vec(any::<u8>(), 0..200)) {
        let mut h = Harness::connected(10);
        h.data(&packet(first, &body));
        let (mut h, _) = Harness::new();
        h.data(&packet(0x10, &body));
    }
}

// ---- PUBLISH from the client ----------------------------------------------------------------

#[test]
fn qos0_publish_maps_to_the_mqtt_topic_without_ack() {
    let mut h = Harness::connected(0);
    let a = h.data(&publish_packet("home/kitchen/temp", 0, 0, b"21.5"));
    let p = publishes(&a);
    assert_eq!(p.len(), 1);
    let msg = &p[0].1;
    assert_eq!(msg.topic, "mqtt");
    assert_eq!(msg.key.as_deref(), Some("home/kitchen/temp"));
    assert_eq!(msg.payload, b"21.5");
    let props: Vec<(&str, &str)> = msg
        .properties
        .iter()
        .map(|p| (p.key.as_str(), p.value.as_str()))
        .collect();
    assert_eq!(
        props,
        vec![("mqtt.topic", "home/kitchen/temp")],
        "QoS 0 is the default, and no No Local subscription needs the sender"
    );
    let a = h.event(Event::PublishResult {
        token: p[0].0,
        result: Ok(()),
    });
    assert!(sent(&a).is_empty());
}

#[test]
fn qos1_puback_only_after_the_backend_stored_it_and_in_order() {
    let mut h = Harness::connected(0);
    let mut bytes = publish_packet("a", 1, 10, b"1");
    bytes.extend_from_slice(&publish_packet("b", 1, 11, b"2"));
    let a = h.data(&bytes);
    assert!(sent(&a).is_empty());
    let p = publishes(&a);
    assert_eq!(p[1].1.properties[1].value, "1");
    // The second is stored first: its PUBACK waits for the first (§4.6).
    let a = h.event(Event::PublishResult {
        token: p[1].0,
        result: Ok(()),
    });
    assert!(sent(&a).is_empty());
    let a = h.event(Event::PublishResult {
        token: p[0].0,
        result: Ok(()),
    });
    assert_eq!(sent(&a), vec![codec::puback(10), codec::puback(11)]);
}

#[test]
fn qos1_publish_failure_closes() {
    let mut h = Harness::connected(0);
    let a = h.data(&publish_packet("a", 1, 10, b"1"));
    let p = publishes(&a);
    let a = h.event(Event::PublishResult {
        token: p[0].0,
        result: Err(err(ErrorKind::QuotaExceeded)),
    });
    assert!(sent(&a).is_empty());
    assert!(closed(&a).unwrap().contains("QoS 1 publish failed"));
}

/// A PUBREL (§3.6: fixed-header flags 0010).
fn pubrel_packet(id: u16) -> Vec<u8> {
    packet(0x62, &id.to_be_bytes())
}

fn pubrec_packet(id: u16) -> Vec<u8> {
    packet(0x50, &id.to_be_bytes())
}

fn pubcomp_packet(id: u16) -> Vec<u8> {
    packet(0x70, &id.to_be_bytes())
}

#[test]
fn qos2_pubrec_after_the_backend_stored_it_and_a_resend_is_not_stored_twice() {
    let mut h = Harness::connected(0);
    let a = h.data(&publish_packet("a", 2, 10, b"once"));
    let p = publishes(&a);
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].1.properties[1].value, "2");
    assert!(sent(&a).is_empty(), "PUBREC waits for the backend");
    // A resend (DUP) while the first is being stored is absorbed.
    let mut dup = publish_packet("a", 2, 10, b"once");
    dup[0] |= 0x08;
    let a = h.data(&dup);
    assert!(publishes(&a).is_empty() && sent(&a).is_empty());
    let a = h.event(Event::PublishResult {
        token: p[0].0,
        result: Ok(()),
    });
    assert_eq!(sent(&a), vec![codec::pubrec(10)]);
    // A resend after the PUBREC: PUBREC again, nothing stored.
    let a = h.data(&dup);
    assert!(publishes(&a).is_empty());
    assert_eq!(sent(&a), vec![codec::pubrec(10)]);
    let a = h.data(&pubrel_packet(10));
    assert_eq!(sent(&a), vec![codec::pubcomp(10)]);
    // The identifier is free again: a new message with it is stored.
    let a = h.data(&publish_packet("a", 2, 10, b"twice"));
    assert_eq!(publishes(&a).len(), 1);
    // PUBREL of an unknown identifier still gets its PUBCOMP.
    let a = h.data(&pubrel_packet(99));
    assert!(sent(&a).is_empty(), "behind the pending PUBREC, in order");
}

#[test]
fn qos2_publish_failure_closes() {
    let mut h = Harness::connected(0);
    let a = h.data(&publish_packet("a", 2, 10, b"1"));
    let p = publishes(&a);
    let a = h.event(Event::PublishResult {
        token: p[0].0,
        result: Err(err(ErrorKind::Backend)),
    });
    assert!(sent(&a).is_empty());
    assert!(closed(&a).unwrap().contains("QoS 2 publish failed"));
}

/// A persistent session "dev/1" with no stored filters, and `qos2` as its stored QoS 2 state.
fn persistent_with_qos2(qos2: Option<Qos2State>) -> (Harness, Vec<Action>) {
    let (mut h, _) = Harness::new();
    let a = h.data(&connect_packet("dev/1", false, 0, None));
    let token = auth_token(&a);
    let a = h.event(Event::AuthResult {
        token,
        result: Ok(principal()),
    });
    let ops = kv_ops(&a);
    h.event(Event::KvResult {
        token: ops[0].0,
        result: Ok(None),
    });
    let a = h.event(Event::KvResult {
        token: ops[1].0,
        result: Ok(qos2.map(|q| q.encode())),
    });
    (h, a)
}

#[test]
fn qos2_state_is_saved_before_pubrec_and_pubcomp_and_survives_a_reconnect() {
    let (mut h, a) = persistent_with_qos2(None);
    assert_eq!(sent(&a), vec![codec::connack(false, 0)]);
    let a = h.data(&publish_packet("a", 2, 5, b"x"));
    let p = publishes(&a);
    let a = h.event(Event::PublishResult {
        token: p[0].0,
        result: Ok(()),
    });
    assert!(sent(&a).is_empty(), "PUBREC waits for the saved state");
    let put = kv_ops(&a);
    assert_eq!(put[0].1, "mqtt/qos2/dev%2F1");
    let state = Qos2State::decode(put[0].2.as_ref().unwrap().as_ref().unwrap()).unwrap();
    assert_eq!(state.inbound, BTreeSet::from([5]));
    let a = h.event(Event::KvResult {
        token: put[0].0,
        result: Ok(None),
    });
    assert_eq!(sent(&a), vec![codec::pubrec(5)]);

    // The gateway restarts; the client reconnects and resends the PUBLISH (§4.4).
    let stored = Qos2State {
        inbound: BTreeSet::from([5]),
        released: BTreeSet::new(),
    };
    let (mut h, a) = persistent_with_qos2(Some(stored));
    assert_eq!(sent(&a), vec![codec::connack(true, 0)]);
    let mut dup = publish_packet("a", 2, 5, b"x");
    dup[0] |= 0x08;
    let a = h.data(&dup);
    assert!(publishes(&a).is_empty(), "stored before: not again");
    assert_eq!(sent(&a), vec![codec::pubrec(5)]);
    let a = h.data(&pubrel_packet(5));
    assert!(sent(&a).is_empty(), "PUBCOMP waits for the saved state");
    let put = kv_ops(&a);
    let state = Qos2State::decode(put[0].2.as_ref().unwrap().as_ref().unwrap()).unwrap();
    assert!(state.is_empty());
    let a = h.event(Event::KvResult {
        token: put[0].0,
        result: Ok(None),
    });
    assert_eq!(sent(&a), vec![codec::pubcomp(5)]);
}

#[test]
fn qos2_delivery_is_acked_to_the_backend_on_pubrec_and_completed_by_pubcomp() {
    let mut h = Harness::subscribed(&[("a/#", 2)]);
    let a = h.event(Event::Delivery(delivery(3, "a/b", 2, b"hi")));
    assert_eq!(sent(&a), vec![out_publish("a/b", 2, 1, false, b"hi")]);
    assert!(acks(&a).is_empty());
    let a = h.data(&pubrec_packet(1));
    assert_eq!(acks(&a), vec![3]);
    assert_eq!(sent(&a), vec![codec::pubrel(1)]);
    // A repeated PUBREC gets the PUBREL again, no second ack.
    let a = h.data(&pubrec_packet(1));
    assert!(acks(&a).is_empty());
    assert_eq!(sent(&a), vec![codec::pubrel(1)]);
    let a = h.data(&pubcomp_packet(1));
    assert!(sent(&a).is_empty() && closed(&a).is_none());
    // A QoS 2 message through a QoS 1 subscription goes out as QoS 1 (§3.8.4).
    let mut h = Harness::subscribed(&[("a/#", 1)]);
    let a = h.event(Event::Delivery(delivery(4, "a/b", 2, b"hi")));
    assert_eq!(sent(&a), vec![out_publish("a/b", 1, 1, false, b"hi")]);
}

#[test]
fn owed_pubrel_is_saved_and_resent_after_a_reconnect() {
    let (mut h, _) = persistent_with_qos2(None);
    let a = h.data(&subscribe_packet(1, &[("a", 2)]));
    let (token, _) = subscribe_action(&a);
    let save = kv_ops(&a)[0].0;
    h.event(Event::SubscribeResult {
        token,
        result: Ok(SUB),
    });
    h.event(Event::KvResult {
        token: save,
        result: Ok(None),
    });
    h.event(Event::Delivery(delivery(3, "a", 2, b"m")));
    let a = h.data(&pubrec_packet(1));
    let put = kv_ops(&a);
    let state = Qos2State::decode(put[0].2.as_ref().unwrap().as_ref().unwrap()).unwrap();
    assert_eq!(state.released, BTreeSet::from([1]));

    let stored = Qos2State {
        inbound: BTreeSet::new(),
        released: BTreeSet::from([1]),
    };
    let (mut h, a) = persistent_with_qos2(Some(stored));
    assert_eq!(
        sent(&a),
        vec![codec::connack(true, 0), codec::pubrel(1)],
        "§4.4: PUBREL resent with its Packet Identifier"
    );
    let a = h.data(&pubcomp_packet(1));
    let put = kv_ops(&a);
    let state = Qos2State::decode(put[0].2.as_ref().unwrap().as_ref().unwrap()).unwrap();
    assert!(state.is_empty());
}

// ---- retained messages ----------------------------------------------------------------------

fn retained_publish(topic: &str, qos: u8, id: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = publish_packet(topic, qos, id, payload);
    p[0] |= 0x01;
    p
}

#[test]
fn retained_publish_is_stored_in_the_kv_and_puback_waits_for_both() {
    let mut h = Harness::connected(0);
    let a = h.data(&retained_publish("s/1", 1, 4, b"on"));
    let kv = kv_ops(&a);
    assert_eq!(kv[0].1, "mqtt/retained/s/1");
    assert_eq!(
        kv[0].2,
        Some(Some(retained::encode(
            1,
            h.now,
            &Properties::default(),
            b"on"
        )))
    );
    let p = publishes(&a);
    assert!(p[0]
        .1
        .properties
        .iter()
        .any(|p| p.key == PROP_RETAIN && p.value == "1"));
    let a = h.event(Event::PublishResult {
        token: p[0].0,
        result: Ok(()),
    });
    assert!(sent(&a).is_empty(), "the retained write is still running");
    let a = h.event(Event::KvResult {
        token: kv[0].0,
        result: Ok(None),
    });
    assert_eq!(sent(&a), vec![codec::puback(4)]);
    // An empty retained message removes it (§3.3.1.3).
    let a = h.data(&retained_publish("s/1", 0, 0, b""));
    assert_eq!(kv_ops(&a)[0].2, Some(None));
}

fn scans(actions: &[Action]) -> Vec<(u64, String, Option<String>)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::KvScan {
                token,
                prefix,
                start_after,
                ..
            } => Some((*token, prefix.clone(), start_after.clone())),
            _ => None,
        })
        .collect()
}

fn entry(topic: &str, qos: u8, payload: &[u8]) -> KvEntry {
    KvEntry {
        key: retained::key(topic),
        value: retained::encode(qos, 0, &Properties::default(), payload),
    }
}

#[test]
fn retained_messages_follow_the_suback_with_retain_set_and_page_on() {
    let mut h = Harness::connected(0);
    let a = h.data(&subscribe_packet(1, &[("s/+/t", 1)]));
    assert!(scans(&a).is_empty(), "not before the SUBACK");
    let token = subscribe_token(&a);
    let a = h.event(Event::SubscribeResult {
        token,
        result: Ok(SUB),
    });
    assert_eq!(sent(&a), vec![codec::suback(1, &[1])]);
    let s = scans(&a);
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].1, "mqtt/retained/s/");
    assert_eq!(s[0].2, None);
    // A full page: the matching ones are sent (QoS capped by the grant), then the next page.
    let mut page: Vec<KvEntry> = (0..retained::PAGE)
        .map(|i| entry(&format!("s/{i:03}/x"), 0, b"no"))
        .collect();
    page[0] = entry("s/a/t", 2, b"two");
    page[1] = entry("s/b/t", 0, b"zero");
    let last = page.last().unwrap().key.clone();
    let a = h.event(Event::KvScanResult {
        token: s[0].0,
        result: Ok(page),
    });
    assert_eq!(
        sent(&a),
        vec![
            out_publish("s/a/t", 1, 1, true, b"two"),
            out_publish("s/b/t", 0, 0, true, b"zero"),
        ]
    );
    let s = scans(&a);
    assert_eq!(s[0].2, Some(last));
    let a = h.event(Event::KvScanResult {
        token: s[0].0,
        result: Ok(vec![entry("s/c/t", 1, b"c")]),
    });
    assert_eq!(sent(&a), vec![out_publish("s/c/t", 1, 2, true, b"c")]);
    assert!(scans(&a).is_empty(), "a short page ends the scan");
    // The retained QoS 1 messages need no backend ack.
    let a = h.data(&{
        let mut b = packet(0x40, &1u16.to_be_bytes());
        b.extend_from_slice(&packet(0x40, &2u16.to_be_bytes()));
        b
    });
    assert!(acks(&a).is_empty() && closed(&a).is_none());
}

#[test]
fn live_messages_of_a_retained_publish_go_out_with_retain_0() {
    let mut h = Harness::subscribed(&[("s", 0)]);
    let mut d = delivery(1, "s", 0, b"v");
    d.properties.push(Property {
        key: PROP_RETAIN.into(),
        value: "1".into(),
    });
    let a = h.event(Event::Delivery(d));
    assert_eq!(sent(&a), vec![out_publish("s", 0, 0, false, b"v")]);
}

// ---- will messages and session takeover -----------------------------------------------------

fn connect_with_will(
    client_id: &str,
    topic: &str,
    payload: &[u8],
    qos: u8,
    retain: bool,
) -> Vec<u8> {
    let mut body = Vec::new();
    mqtt_string(&mut body, b"MQTT");
    body.push(4);
    body.push(0x02 | 0x04 | (qos << 3) | if retain { 0x20 } else { 0 });
    body.extend_from_slice(&0u16.to_be_bytes());
    mqtt_string(&mut body, client_id.as_bytes());
    mqtt_string(&mut body, topic.as_bytes());
    mqtt_string(&mut body, payload);
    packet(0x10, &body)
}

fn wills(actions: &[Action]) -> Vec<Option<Will>> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::SetWill(w) => Some(w.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn will_is_registered_after_connack_and_cleared_by_disconnect() {
    let (mut h, _) = Harness::new();
    let a = h.data(&connect_with_will("w1", "dev/w1/status", b"gone", 1, true));
    assert!(wills(&a).is_empty());
    let token = auth_token(&a);
    let a = h.event(Event::AuthResult {
        token,
        result: Ok(principal()),
    });
    assert_eq!(sent(&a), vec![codec::connack(false, 0)]);
    let w = wills(&a);
    let will = w[0].as_ref().unwrap();
    assert_eq!(will.msg.topic, "mqtt");
    assert_eq!(will.msg.payload, b"gone");
    assert_eq!(will.msg.key.as_deref(), Some("dev/w1/status"));
    assert_eq!(will.delay_ms, 0);
    let kv = will.kv.as_ref().unwrap();
    assert_eq!(kv.key, "mqtt/retained/dev/w1/status");
    assert_eq!(
        kv.value,
        Some(retained::encode(1, 0, &Properties::default(), b"gone"))
    );
    // DISCONNECT clears it before the close (§3.14.4).
    let a = h.data(&[0xe0, 0x00]);
    assert!(matches!(
        a.as_slice(),
        [Action::SetWill(None), Action::Close(_)]
    ));
}

#[test]
fn keep_alive_timeout_keeps_the_will_for_the_host() {
    let (mut h, _) = Harness::new();
    let mut c = connect_with_will("w2", "dev/w2", b"lost", 0, false);
    c[10] = 0;
    c[11] = 1; // Keep Alive 1 s
    let a = h.data(&c);
    let (t, delay) = timers(&a)[0];
    assert_eq!(delay, 1_500);
    let token = auth_token(&a);
    let a = h.event(Event::AuthResult {
        token,
        result: Ok(principal()),
    });
    assert!(wills(&a)[0].as_ref().unwrap().kv.is_none());
    h.now += 2_000;
    let a = h.event(Event::Timer { token: t });
    assert!(closed(&a).is_some());
    assert!(wills(&a).is_empty(), "not cleared: the host publishes it");
}

#[test]
fn will_topic_with_a_wildcard_closes() {
    let (mut h, _) = Harness::new();
    let a = h.data(&connect_with_will("w3", "a/+", b"x", 0, false));
    assert!(closed(&a).is_some());
}

#[test]
fn connack_waits_for_the_claim_and_a_lost_claim_closes() {
    let (mut h, _) = Harness::new();
    let a = h.data(&connect_packet("twin", true, 0, None));
    let token = auth_token(&a);
    let a = h.c.handle(
        h.now,
        Event::AuthResult {
            token,
            result: Ok(principal()),
        },
    );
    assert!(sent(&a).is_empty(), "CONNACK waits for the claim");
    let claim = a
        .iter()
        .find_map(|a| match a {
            Action::Claim { token, key } => Some((*token, key.clone())),
            _ => None,
        })
        .unwrap();
    assert_eq!(claim.1, "twin");
    let a = h.c.handle(
        h.now,
        Event::ClaimResult {
            token: claim.0,
            result: Ok(()),
        },
    );
    assert_eq!(sent(&a), vec![codec::connack(false, 0)]);
    let a = h.c.handle(h.now, Event::ClaimLost { key: "dev1".into() });
    assert!(closed(&a).unwrap().contains("taken over"));

    let (mut h, _) = Harness::new();
    let a = h.data(&connect_packet("twin", true, 0, None));
    let token = auth_token(&a);
    let a = h.c.handle(
        h.now,
        Event::AuthResult {
            token,
            result: Ok(principal()),
        },
    );
    let token = claim_token(&a).unwrap();
    let a = h.c.handle(
        h.now,
        Event::ClaimResult {
            token,
            result: Err(err(ErrorKind::Internal)),
        },
    );
    assert_eq!(sent(&a), vec![codec::connack(false, 3)]);
    assert!(closed(&a).is_some());
}

#[test]
fn busy_durable_subscription_is_retried_after_a_takeover() {
    let (mut h, _) = Harness::new();
    let get = persistent_connect(&mut h);
    let stored = stored_session(&[("a", 1)]);
    let a = h.event(Event::KvResult {
        token: get,
        result: Ok(Some(stored)),
    });
    let token = subscribe_token(&a);
    let a = h.event(Event::SubscribeResult {
        token,
        result: Err(err(ErrorKind::Backend)),
    });
    assert!(closed(&a).is_none());
    let (timer, delay) = timers(&a)[0];
    assert_eq!(delay, BACKEND_RETRY_MS);
    let a = h.event(Event::Timer { token: timer });
    let (_, spec) = subscribe_action(&a);
    assert_eq!(spec.name, "mqtt-session-dev%2F1");
}

#[test]
fn wildcard_in_publish_topic_closes() {
    let mut h = Harness::connected(0);
    let a = h.data(&publish_packet("a/+/b", 0, 0, b"1"));
    assert!(closed(&a).is_some());
    let mut h = Harness::connected(0);
    let a = h.data(&publish_packet("a/#", 0, 0, b"1"));
    assert!(closed(&a).is_some());
    let mut h = Harness::connected(0);
    let a = h.data(&publish_packet("a\0b", 0, 0, b"1"));
    assert!(closed(&a).unwrap().contains("U+0000"));
}

#[test]
fn publishes_beyond_the_pending_window_wait_for_results() {
    let config = Config {
        max_pending_publishes: 2,
        ..Config::default()
    };
    let (mut h, _) = Harness::with_config(config);
    let a = h.data(&connect_packet("d", true, 0, None));
    let token = auth_token(&a);
    h.event(Event::AuthResult {
        token,
        result: Ok(principal()),
    });
    let mut bytes = Vec::new();
    for i in 1..=3u16 {
        bytes.extend_from_slice(&publish_packet("a", 1, i, b"x"));
    }
    let a = h.data(&bytes);
    let p = publishes(&a);
    assert_eq!(p.len(), 2, "the third waits");
    assert!(
        a.iter().any(|x| matches!(x, Action::SetReading(false))),
        "the host stops reading while undecoded bytes wait: {a:?}"
    );
    let a = h.event(Event::PublishResult {
        token: p[0].0,
        result: Ok(()),
    });
    assert_eq!(sent(&a), vec![codec::puback(1)]);
    assert_eq!(
        publishes(&a).len(),
        1,
        "the third goes out once there is room"
    );
    assert!(
        a.iter().any(|x| matches!(x, Action::SetReading(true))),
        "reading resumes once the buffer drained: {a:?}"
    );
}

// ---- SUBSCRIBE / deliveries -----------------------------------------------------------------

#[test]
fn a_clean_session_opens_one_route_binds_its_filters_and_subacks_after_it() {
    let mut h = Harness::connected(0);
    let a = h.data(&subscribe_packet(5, &[("a/+", 1), ("b/#", 2), ("c#", 0)]));
    assert!(sent(&a).is_empty(), "SUBACK waits for the route");
    let (token, spec) = route_action(&a);
    assert_eq!(spec.source, "mqtt");
    assert_eq!(
        spec.filters,
        vec![Filter::Mqtt("a/+".into())],
        "the route opens with the first filter; the others are bound once it is open"
    );
    assert_eq!(spec.max_unacked, 1024, "the delivery window");
    assert_eq!(spec.max_queued, 100_000);
    // Subscribed and unsubscribed while the route opens: synced when it is open.
    let a = h.data(&subscribe_packet(6, &[("d", 0)]));
    assert!(sent(&a).is_empty() && binds(&a).is_empty());
    let a = h.data(&unsubscribe_packet(7, &["a/+"]));
    assert!(
        sent(&a).is_empty() && binds(&a).is_empty(),
        "in packet order"
    );
    let a = h.event(Event::SubscribeResult {
        token,
        result: Ok(SUB),
    });
    assert_eq!(binds(&a), vec!["-a/+", "+b/#", "+d"]);
    assert_eq!(
        sent(&a),
        vec![
            codec::suback(5, &[1, 2, 0x80]),
            codec::suback(6, &[0]),
            codec::unsuback(7)
        ]
    );
    // Later SUBSCRIBEs bind on the same route before their SUBACK: nothing else opens.
    let a = h.data(&subscribe_packet(8, &[("e/#", 1), ("d", 1)]));
    assert!(a
        .iter()
        .all(|a| !matches!(a, Action::Subscribe { .. } | Action::OpenRoute { .. })));
    assert_eq!(
        binds(&a),
        vec!["+e/#"],
        "a filter already bound is not bound again"
    );
    let bind_at = a.iter().position(|x| matches!(x, Action::Bind { .. }));
    let suback_at = a.iter().position(|x| matches!(x, Action::Send(_)));
    assert!(bind_at < suback_at, "bound before the SUBACK: {a:?}");
    assert_eq!(sent(&a), vec![codec::suback(8, &[1, 1])]);
    let a = h.data(&unsubscribe_packet(9, &["b/#", "nope"]));
    assert_eq!(binds(&a), vec!["-b/#"]);
    assert_eq!(h.c.filters().len(), 2);
}

#[test]
fn subscribe_failure_gives_0x80_and_allows_a_retry() {
    let mut h = Harness::connected(0);
    let a = h.data(&subscribe_packet(5, &[("a", 1)]));
    let token = subscribe_token(&a);
    let a = h.event(Event::SubscribeResult {
        token,
        result: Err(err(ErrorKind::Backend)),
    });
    assert_eq!(sent(&a), vec![codec::suback(5, &[0x80])]);
    assert!(h.c.filters().is_empty());
    let a = h.data(&subscribe_packet(6, &[("a", 1)]));
    subscribe_token(&a);
}

#[test]
fn subscription_limit_gives_0x80() {
    let config = Config {
        max_subscriptions: 1,
        ..Config::default()
    };
    let (mut h, _) = Harness::with_config(config);
    let a = h.data(&connect_packet("d", true, 0, None));
    let token = auth_token(&a);
    h.event(Event::AuthResult {
        token,
        result: Ok(principal()),
    });
    let a = h.data(&subscribe_packet(1, &[("a", 0), ("b", 0), ("a", 1)]));
    let token = subscribe_token(&a);
    let a = h.event(Event::SubscribeResult {
        token,
        result: Ok(SUB),
    });
    assert_eq!(sent(&a), vec![codec::suback(1, &[0, 0x80, 1])]);
}

#[test]
fn delivery_qos0_is_sent_and_acked_at_once() {
    let mut h = Harness::subscribed(&[("a/+", 0)]);
    let a = h.event(Event::Delivery(delivery(100, "a/b", 1, b"hi")));
    assert_eq!(sent(&a), vec![out_publish("a/b", 0, 0, false, b"hi")]);
    assert_eq!(acks(&a), vec![100]);
}

#[test]
fn a_batch_of_deliveries_leaves_as_one_send_in_order() {
    let mut h = Harness::subscribed(&[("a/+", 0)]);
    let batch = (0..3).map(|i| Event::Delivery(delivery(100 + i, "a/b", 0, &[b'0' + i as u8])));
    let a = h.c.handle_all(h.now, batch);
    let sends = a.iter().filter(|a| matches!(a, Action::Send(_))).count();
    assert_eq!(sends, 1, "{a:?}");
    assert_eq!(
        sent(&a),
        vec![
            out_publish("a/b", 0, 0, false, b"0"),
            out_publish("a/b", 0, 0, false, b"1"),
            out_publish("a/b", 0, 0, false, b"2"),
        ]
    );
    assert_eq!(acks(&a), vec![100, 101, 102]);
}

#[test]
fn delivery_without_a_matching_filter_is_acked_and_dropped() {
    let mut h = Harness::subscribed(&[("a/+", 1)]);
    let a = h.event(Event::Delivery(delivery(100, "a/b/c", 1, b"hi")));
    assert!(sent(&a).is_empty());
    assert_eq!(acks(&a), vec![100]);
    let mut d = delivery(101, "a/b", 1, b"hi");
    d.properties.clear();
    let a = h.event(Event::Delivery(d));
    assert!(sent(&a).is_empty());
    assert_eq!(acks(&a), vec![101]);
}

#[test]
fn delivery_qos1_is_acked_on_puback() {
    let mut h = Harness::subscribed(&[("a/#", 1), ("a/b", 0)]);
    let a = h.event(Event::Delivery(delivery(100, "a/b", 1, b"hi")));
    // Highest matching grant is 1, message QoS 1: QoS 1 with Packet Identifier 1.
    assert_eq!(sent(&a), vec![out_publish("a/b", 1, 1, false, b"hi")]);
    assert!(acks(&a).is_empty());
    let a = h.data(&[0x40, 0x02, 0x00, 0x01]);
    assert_eq!(acks(&a), vec![100]);
    // A message published at QoS 0 goes out at QoS 0.
    let a = h.event(Event::Delivery(delivery(101, "a/b", 0, b"x")));
    assert_eq!(sent(&a), vec![out_publish("a/b", 0, 0, false, b"x")]);
    assert_eq!(acks(&a), vec![101]);
}

#[test]
fn deliveries_beyond_max_inflight_wait_for_pubacks() {
    let mut h = Harness::subscribed(&[("#", 1)]);
    for i in 0..64 {
        let a = h.event(Event::Delivery(delivery(i, "t", 1, b"")));
        assert_eq!(sent(&a).len(), 1);
    }
    let a = h.event(Event::Delivery(delivery(64, "t", 1, b"")));
    assert!(sent(&a).is_empty());
    let a = h.data(&[0x40, 0x02, 0x00, 0x05]);
    assert_eq!(acks(&a), vec![4]);
    assert_eq!(sent(&a), vec![out_publish("t", 1, 65, false, b"")]);
}

#[test]
fn unsubscribe_removes_filters_and_unsubacks() {
    let mut h = Harness::subscribed(&[("a", 1), ("b", 1)]);
    let a = h.data(&unsubscribe_packet(9, &["a", "zzz"]));
    assert_eq!(sent(&a), vec![codec::unsuback(9)]);
    let a = h.event(Event::Delivery(delivery(1, "a", 1, b"")));
    assert!(sent(&a).is_empty());
    assert_eq!(acks(&a), vec![1]);
}

#[test]
fn pingreq_gets_pingresp_and_disconnect_closes() {
    let mut h = Harness::connected(0);
    assert_eq!(sent(&h.data(&[0xc0, 0x00])), vec![vec![0xd0, 0x00]]);
    let a = h.data(&[0xe0, 0x00]);
    assert!(closed(&a).unwrap().starts_with("client sent DISCONNECT"));
}

#[test]
fn nothing_happens_after_the_socket_closed() {
    let mut h = Harness::subscribed(&[("#", 1)]);
    assert!(h.event(Event::Closed).is_empty());
    assert!(h
        .event(Event::Delivery(delivery(1, "a", 1, b"")))
        .is_empty());
}

// ---- Keep Alive -----------------------------------------------------------------------------

#[test]
fn connect_timeout_closes_a_silent_connection() {
    let (mut h, a) = Harness::new();
    let (token, _) = timers(&a)[0];
    h.now += 10_000;
    let a = h.event(Event::Timer { token });
    assert!(closed(&a).unwrap().contains("no CONNECT"));
}

#[test]
fn stale_connect_timer_is_ignored_after_connect() {
    let (mut h, a) = Harness::new();
    let (connect_timer, _) = timers(&a)[0];
    let a = h.data(&connect_packet("d", true, 0, None));
    let token = auth_token(&a);
    h.event(Event::AuthResult {
        token,
        result: Ok(principal()),
    });
    assert!(closed(&h.event(Event::Timer {
        token: connect_timer
    }))
    .is_none());
}

// ---- persistent sessions --------------------------------------------------------------------

/// CONNECT with Clean Session 0 for "dev/1", authenticated; returns the kv_get token.
fn persistent_connect(h: &mut Harness) -> u64 {
    let a = h.data(&connect_packet("dev/1", false, 0, None));
    let token = auth_token(&a);
    let a = h.event(Event::AuthResult {
        token,
        result: Ok(principal()),
    });
    assert!(sent(&a).is_empty(), "CONNACK waits for the session");
    let ops = kv_ops(&a);
    assert_eq!(ops[0].1, "mqtt/session/dev%2F1");
    assert_eq!(ops[0].2, None, "a kv_get");
    assert_eq!(ops[1].1, "mqtt/qos2/dev%2F1");
    assert_eq!(ops[1].2, None, "a kv_get");
    let a = h.event(Event::KvResult {
        token: ops[1].0,
        result: Ok(None),
    });
    assert!(sent(&a).is_empty(), "CONNACK waits for both halves");
    ops[0].0
}

#[test]
fn new_persistent_session_subscribes_durably_and_stores_filters_before_suback() {
    let (mut h, _) = Harness::new();
    let get = persistent_connect(&mut h);
    let a = h.event(Event::KvResult {
        token: get,
        result: Ok(None),
    });
    assert_eq!(sent(&a), vec![codec::connack(false, 0)]);

    let a = h.data(&subscribe_packet(3, &[("a/#", 1)]));
    let (sub_token, spec) = subscribe_action(&a);
    assert_eq!(spec.name, "mqtt-session-dev%2F1");
    assert!(spec.durable);
    assert_eq!(spec.mode, SubMode::Exclusive);
    let put = kv_ops(&a);
    assert_eq!(put.len(), 1);
    assert_eq!(put[0].1, "mqtt/session/dev%2F1");
    let stored = put[0].2.clone().unwrap().unwrap();
    assert_eq!(
        stored_filters(&stored),
        BTreeMap::from([("a/#".to_string(), 1)])
    );
    // Backend first: still waiting for the kv.
    let a = h.event(Event::SubscribeResult {
        token: sub_token,
        result: Ok(SUB),
    });
    assert!(sent(&a).is_empty());
    let a = h.event(Event::KvResult {
        token: put[0].0,
        result: Ok(None),
    });
    assert_eq!(sent(&a), vec![codec::suback(3, &[1])]);

    // UNSUBSCRIBE saves too, UNSUBACK after the save.
    let a = h.data(&unsubscribe_packet(4, &["a/#"]));
    assert!(sent(&a).is_empty());
    let put = kv_ops(&a);
    let stored = put[0].2.clone().unwrap().unwrap();
    assert!(stored_filters(&stored).is_empty());
    let a = h.event(Event::KvResult {
        token: put[0].0,
        result: Ok(None),
    });
    assert_eq!(sent(&a), vec![codec::unsuback(4)]);
}

#[test]
fn session_saves_are_serialised() {
    let (mut h, _) = Harness::new();
    let get = persistent_connect(&mut h);
    h.event(Event::KvResult {
        token: get,
        result: Ok(None),
    });
    let mut bytes = subscribe_packet(1, &[("a", 1)]);
    bytes.extend_from_slice(&subscribe_packet(2, &[("b", 1)]));
    let a = h.data(&bytes);
    let sub_token = subscribe_token(&a);
    let puts = kv_ops(&a);
    assert_eq!(puts.len(), 1, "one save in flight");
    h.event(Event::SubscribeResult {
        token: sub_token,
        result: Ok(SUB),
    });
    let a = h.event(Event::KvResult {
        token: puts[0].0,
        result: Ok(None),
    });
    assert_eq!(sent(&a), vec![codec::suback(1, &[1])]);
    let puts = kv_ops(&a);
    assert_eq!(puts.len(), 1, "the second save follows");
    let a = h.event(Event::KvResult {
        token: puts[0].0,
        result: Ok(None),
    });
    assert_eq!(sent(&a), vec![codec::suback(2, &[1])]);
}

#[test]
fn session_store_failure_at_connect_gets_connack_3() {
    let (mut h, _) = Harness::new();
    let get = persistent_connect(&mut h);
    let a = h.event(Event::KvResult {
        token: get,
        result: Err(err(ErrorKind::Internal)),
    });
    assert_eq!(sent(&a), vec![codec::connack(false, 3)]);
    assert!(closed(&a).is_some());
}

#[test]
fn clean_session_discards_an_earlier_persistent_session() {
    let (mut h, _) = Harness::new();
    let a = h.data(&connect_packet("dev/1", true, 0, None));
    let token = auth_token(&a);
    let a = h.event(Event::AuthResult {
        token,
        result: Ok(principal()),
    });
    let probe = kv_ops(&a)[0].0;
    let a = h.event(Event::KvResult {
        token: probe,
        result: Ok(Some(stored_session(&[]))),
    });
    let ops = kv_ops(&a);
    assert_eq!(ops[0].1, "mqtt/session/dev%2F1");
    assert_eq!(ops[0].2, Some(None), "kv_put(None) deletes the session");
    let (token, spec) = subscribe_action(&a);
    assert_eq!(spec.name, "mqtt-session-dev%2F1");
    let a = h.event(Event::SubscribeResult {
        token,
        result: Ok(77),
    });
    assert!(a.iter().any(|a| matches!(
        a,
        Action::Unsubscribe {
            sub: 77,
            delete: true
        }
    )));
}

mod sim;
mod v5;
