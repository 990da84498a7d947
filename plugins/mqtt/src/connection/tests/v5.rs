//! MQTT 5.0 behaviour of [`MqttConnection`], driven with packets built here byte by byte.

use super::*;
use crate::codec::v5::{self, id, reason};
use magnetar_sdk::SaslSuccess;

/// A v5 CONNECT: clean start, keep alive, properties, optional will (topic, payload, will
/// properties) and user/password.
pub(super) fn connect5(
    client_id: &str,
    clean_start: bool,
    props: &Properties,
    will: Option<(&str, &[u8], &Properties)>,
    user: Option<(&str, &str)>,
) -> Vec<u8> {
    let mut body = Vec::new();
    mqtt_string(&mut body, b"MQTT");
    body.push(5);
    let mut flags = if clean_start { 0x02 } else { 0 };
    if will.is_some() {
        flags |= 0x04 | 0x08; // QoS 1
    }
    if user.is_some() {
        flags |= 0xc0;
    }
    body.push(flags);
    body.extend_from_slice(&0u16.to_be_bytes());
    v5::put_properties(&mut body, props);
    mqtt_string(&mut body, client_id.as_bytes());
    if let Some((topic, payload, wp)) = will {
        v5::put_properties(&mut body, wp);
        mqtt_string(&mut body, topic.as_bytes());
        mqtt_string(&mut body, payload);
    }
    if let Some((u, p)) = user {
        mqtt_string(&mut body, u.as_bytes());
        mqtt_string(&mut body, p.as_bytes());
    }
    packet(0x10, &body)
}

fn publish5(topic: &str, qos: u8, id: u16, props: &Properties, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    mqtt_string(&mut body, topic.as_bytes());
    if qos > 0 {
        body.extend_from_slice(&id.to_be_bytes());
    }
    v5::put_properties(&mut body, props);
    body.extend_from_slice(payload);
    packet(0x30 | (qos << 1), &body)
}

/// SUBSCRIBE with one (filter, options byte) per entry and an optional identifier.
pub(super) fn subscribe5(packet_id: u16, entries: &[(&str, u8)], sub_id: Option<u32>) -> Vec<u8> {
    let mut body = packet_id.to_be_bytes().to_vec();
    let props = Properties {
        subscription_identifiers: sub_id.into_iter().collect(),
        ..Properties::default()
    };
    v5::put_properties(&mut body, &props);
    for (f, o) in entries {
        mqtt_string(&mut body, f.as_bytes());
        body.push(*o);
    }
    packet(0x82, &body)
}

fn no_props() -> Properties {
    Properties::default()
}

/// The decoded PUBLISHes among sent packets (decoded by our own client-side reading of the
/// server packet: the same layout, so `v5::decode` reads it once the Subscription
/// Identifiers, which a client may not send, are cut out by hand).
fn out_publishes(actions: &[Action]) -> Vec<Vec<u8>> {
    sent(actions)
        .into_iter()
        .filter(|b| b.first().is_some_and(|f| f >> 4 == 3))
        .collect()
}

/// Connected as a v5 client with these CONNECT properties.
fn connected5(props: &Properties) -> Harness {
    let (mut h, _) = Harness::new();
    let a = h.data(&connect5("dev5", true, props, None, None));
    let token = auth_token(&a);
    let a = h.event(Event::AuthResult {
        token,
        result: Ok(principal()),
    });
    let s = sent(&a);
    assert_eq!(s.len(), 1);
    assert_eq!(
        s[0][..4],
        [0x20, s[0][1], 0x00, 0x00],
        "CONNACK success: {:?}",
        s[0]
    );
    h
}

fn subscribed5(props: &Properties, entries: &[(&str, u8)], sub_id: Option<u32>) -> Harness {
    let mut h = connected5(props);
    let a = h.data(&subscribe5(1, entries, sub_id));
    let token = subscribe_token(&a);
    let a = h.event(Event::SubscribeResult {
        token,
        result: Ok(SUB),
    });
    assert_eq!(sent(&a).len(), 1, "SUBACK");
    h
}

fn delivery5(id: u64, topic: &str, qos: u8, props: &Properties, sender: &str) -> Delivery {
    let msg = message::to_pulsar(topic.into(), qos, false, Some(sender), props, b"m".to_vec());
    Delivery {
        subscription: SUB,
        delivery_id: id,
        key: msg.key,
        payload: msg.payload,
        properties: msg.properties,
        publish_time_ms: 1_000,
        redelivery_count: 0,
    }
}

#[test]
fn connack_carries_limits_and_an_assigned_client_identifier() {
    let (mut h, _) = Harness::new();
    let a = h.data(&connect5("", true, &no_props(), None, None));
    let token = auth_token(&a);
    let a = h.event(Event::AuthResult {
        token,
        result: Ok(principal()),
    });
    let connack = sent(&a).remove(0);
    let (props, rest) = v5::split_properties(
        &connack[4..],
        &[
            id::ASSIGNED_CLIENT_IDENTIFIER,
            id::RECEIVE_MAXIMUM,
            id::MAXIMUM_PACKET_SIZE,
            id::TOPIC_ALIAS_MAXIMUM,
        ],
    )
    .unwrap();
    assert!(rest.is_empty());
    assert_eq!(connack[2..4], [0, 0]);
    assert!(props
        .assigned_client_identifier
        .unwrap()
        .starts_with("auto-"));
    assert_eq!(props.receive_maximum, Some(64));
    assert_eq!(props.maximum_packet_size, Some(1 << 20));
    assert_eq!(props.topic_alias_maximum, Some(TOPIC_ALIAS_MAX));
}

#[test]
fn authentication_failures_get_v5_reason_codes() {
    for (kind, code) in [
        (ErrorKind::NotAuthorized, reason::NOT_AUTHORIZED),
        (ErrorKind::QuotaExceeded, reason::QUOTA_EXCEEDED),
        (ErrorKind::Backend, reason::SERVER_UNAVAILABLE),
    ] {
        let (mut h, _) = Harness::new();
        let a = h.data(&connect5("d", true, &no_props(), None, Some(("u", "p"))));
        let token = auth_token(&a);
        let a = h.event(Event::AuthResult {
            token,
            result: Err(err(kind)),
        });
        let connack = sent(&a).remove(0);
        assert_eq!(connack[..4], [0x20, connack[1], 0x00, code]);
        assert!(closed(&a).is_some());
    }
}

#[test]
fn a_login_storm_gets_server_busy() {
    let (mut h, _) = Harness::new();
    let a = h.data(&connect5("d", true, &no_props(), None, Some(("u", "p"))));
    let token = auth_token(&a);
    let a = h.event(Event::AuthBusy { token });
    let connack = sent(&a).remove(0);
    assert_eq!(connack[..4], [0x20, connack[1], 0x00, reason::SERVER_BUSY]);
    assert!(closed(&a).unwrap().contains("busy"));

    // MQTT 3.1.1 has no "busy": 0x03, server unavailable (§3.2.2.3).
    let (mut h, _) = Harness::new();
    let a = h.data(&super::connect_packet("d", true, 0, None));
    let token = auth_token(&a);
    let a = h.event(Event::AuthBusy { token });
    assert_eq!(sent(&a), vec![codec::connack(false, 3)]);
}

#[test]
fn puback_carries_failure_reason_codes_instead_of_closing() {
    let mut h = connected5(&no_props());
    let a = h.data(&publish5("a/b", 1, 3, &no_props(), b"x"));
    let token = publishes(&a)[0].0;
    let a = h.event(Event::PublishResult {
        token,
        result: Err(err(ErrorKind::QuotaExceeded)),
    });
    let s = sent(&a);
    assert_eq!(
        s[0][..5],
        [0x40, s[0][1], 0x00, 0x03, reason::QUOTA_EXCEEDED]
    );
    assert!(closed(&a).is_none());
    // A wildcard Topic Name gets 0x90 on the PUBACK.
    let a = h.data(&publish5("a/+", 1, 4, &no_props(), b"x"));
    assert_eq!(
        sent(&a)[0][..5],
        [0x40, sent(&a)[0][1], 0, 4, reason::TOPIC_NAME_INVALID]
    );
    assert!(publishes(&a).is_empty());
}

#[test]
fn publishing_to_sys_is_refused_and_not_stored() {
    let mut h = connected5(&no_props());
    let a = h.data(&publish5("$SYS/broker/x", 1, 3, &no_props(), b"x"));
    assert!(publishes(&a).is_empty());
    assert_eq!(sent(&a)[0][2..5], [0x00, 0x03, reason::NOT_AUTHORIZED]);
    // Payload Format Indicator 1 with a payload that is not UTF-8: 0x99, dropped (Mosquitto).
    let utf8 = Properties {
        payload_format_indicator: Some(1),
        ..Properties::default()
    };
    let a = h.data(&publish5("a/b", 1, 4, &utf8, b"\xff\xfe"));
    assert!(publishes(&a).is_empty());
    assert_eq!(
        sent(&a)[0][2..5],
        [0x00, 0x04, reason::PAYLOAD_FORMAT_INVALID]
    );
    let a = h.data(&publish5("a/b", 1, 5, &utf8, "é".as_bytes()));
    assert_eq!(publishes(&a).len(), 1);
    // 3.1.1: a plain PUBACK, the message dropped too (Mosquitto's behaviour).
    let mut h = Harness::connected(0);
    let a = h.data(&publish_packet("$SYS/x", 1, 5, b"x"));
    assert!(publishes(&a).is_empty());
    assert_eq!(sent(&a), vec![codec::puback(5)]);
    // Other `$` topics are open.
    let a = h.data(&publish_packet("$app/x", 0, 0, b"x"));
    assert_eq!(publishes(&a).len(), 1);
}

#[test]
fn properties_travel_in_the_pulsar_message() {
    let mut h = connected5(&no_props());
    let props = Properties {
        content_type: Some("application/json".into()),
        response_topic: Some("r/1".into()),
        correlation_data: Some(vec![7]),
        user_properties: vec![("k".into(), "v".into())],
        message_expiry_interval: Some(60),
        payload_format_indicator: Some(1),
        ..Properties::default()
    };
    let a = h.data(&publish5("a/b", 0, 0, &props, b"{}"));
    let msg = &publishes(&a)[0].1;
    let mut d = Delivery {
        subscription: SUB,
        delivery_id: 1,
        key: msg.key.clone(),
        payload: msg.payload.clone(),
        properties: msg.properties.clone(),
        publish_time_ms: 0,
        redelivery_count: 0,
    };
    let m = message::from_delivery(&mut d).unwrap();
    assert_eq!(m.properties, props);
    // No No Local subscription in this session: no sender.
    assert_eq!(m.sender, None);
}

#[test]
fn inbound_topic_alias_is_set_then_used_and_bad_ones_disconnect() {
    let mut h = connected5(&no_props());
    let alias = |n| Properties {
        topic_alias: Some(n),
        ..Properties::default()
    };
    let a = h.data(&publish5("long/topic", 0, 0, &alias(1), b"1"));
    assert_eq!(publishes(&a)[0].1.key.as_deref(), Some("long/topic"));
    let a = h.data(&publish5("", 0, 0, &alias(1), b"2"));
    assert_eq!(publishes(&a)[0].1.key.as_deref(), Some("long/topic"));
    let a = h.data(&publish5("", 0, 0, &alias(2), b"3"));
    assert_eq!(
        sent(&a)[0][..3],
        [0xe0, sent(&a)[0][1], reason::PROTOCOL_ERROR]
    );
    assert!(closed(&a).is_some());
    let mut h = connected5(&no_props());
    let a = h.data(&publish5("t", 0, 0, &alias(TOPIC_ALIAS_MAX + 1), b"3"));
    assert_eq!(sent(&a)[0][2], reason::TOPIC_ALIAS_INVALID);
    assert!(closed(&a).is_some());
}

#[test]
fn outbound_topic_alias_replaces_a_repeated_topic() {
    let props = Properties {
        topic_alias_maximum: Some(4),
        ..Properties::default()
    };
    let mut h = subscribed5(&props, &[("a/#", 0)], None);
    let first =
        out_publishes(&h.event(Event::Delivery(delivery5(1, "a/long", 0, &no_props(), "x"))));
    let second =
        out_publishes(&h.event(Event::Delivery(delivery5(2, "a/long", 0, &no_props(), "x"))));
    // topic "a/long" + alias 1, then an empty topic + alias 1.
    assert_eq!(first[0][2..10], [0, 6, b'a', b'/', b'l', b'o', b'n', b'g']);
    assert_eq!(first[0][10..14], [3, id::TOPIC_ALIAS, 0, 1]);
    assert_eq!(second[0][2..8], [0, 0, 3, id::TOPIC_ALIAS, 0, 1]);
}

#[test]
fn receive_maximum_bounds_unacknowledged_deliveries() {
    let props = Properties {
        receive_maximum: Some(2),
        ..Properties::default()
    };
    let mut h = subscribed5(&props, &[("a/#", 1)], None);
    let mut out = 0;
    for i in 1..=5 {
        out += out_publishes(&h.event(Event::Delivery(delivery5(i, "a/x", 1, &no_props(), "x"))))
            .len();
    }
    assert_eq!(out, 2, "only Receive Maximum PUBLISHes in flight");
    // One PUBACK frees one slot.
    let a = h.data(&[0x40, 0x02, 0x00, 0x01]);
    assert_eq!(out_publishes(&a).len(), 1);
    assert_eq!(acks(&a), vec![1]);
}

#[test]
fn maximum_packet_size_drops_large_messages_as_if_delivered() {
    let props = Properties {
        maximum_packet_size: Some(64),
        ..Properties::default()
    };
    let mut h = subscribed5(&props, &[("a/#", 1)], None);
    let mut d = delivery5(1, "a/x", 1, &no_props(), "x");
    d.payload = vec![0; 100];
    let a = h.event(Event::Delivery(d));
    assert!(out_publishes(&a).is_empty());
    assert_eq!(acks(&a), vec![1]);
    let a = h.event(Event::Delivery(delivery5(2, "a/x", 1, &no_props(), "x")));
    assert_eq!(out_publishes(&a).len(), 1);
}

#[test]
fn no_local_skips_own_messages_and_subscription_identifiers_are_sent() {
    // Options: QoS 0, No Local.
    let mut h = subscribed5(&no_props(), &[("a/#", 0b0000_0100)], Some(9));
    let a = h.event(Event::Delivery(delivery5(1, "a/x", 0, &no_props(), "dev5")));
    assert!(out_publishes(&a).is_empty());
    assert_eq!(acks(&a), vec![1]);
    let a = h.event(Event::Delivery(delivery5(
        2,
        "a/x",
        0,
        &no_props(),
        "other",
    )));
    let p = out_publishes(&a);
    // PUBLISH "a/x", properties: Subscription Identifier 9.
    assert_eq!(p[0][2..7], [0, 3, b'a', b'/', b'x']);
    assert_eq!(p[0][7..10], [2, id::SUBSCRIPTION_IDENTIFIER, 9]);
}

#[test]
fn the_sender_travels_only_while_the_session_has_a_no_local_subscription() {
    let sender_of = |a: &[Action]| {
        let p = publishes(a);
        p[0].1
            .properties
            .iter()
            .find(|p| p.key == PROP_SENDER)
            .map(|p| p.value.clone())
    };
    // QoS 0, without and with No Local.
    let mut h = subscribed5(&no_props(), &[("a/#", 0)], None);
    let a = h.data(&publish5("a/x", 0, 0, &no_props(), b"m"));
    assert_eq!(sender_of(&a), None);
    let mut h = subscribed5(&no_props(), &[("a/#", 0b0000_0100)], None);
    let a = h.data(&publish5("a/x", 0, 0, &no_props(), b"m"));
    assert_eq!(sender_of(&a).as_deref(), Some("dev5"));
}

#[test]
fn message_expiry_drops_expired_and_sends_the_remaining_interval() {
    let mut h = subscribed5(&no_props(), &[("a/#", 0)], None);
    let props = Properties {
        message_expiry_interval: Some(10),
        ..Properties::default()
    };
    // Published at 1 s; now is 1 s + 4 s → 6 s left.
    h.now = 5_000;
    let a = h.event(Event::Delivery(delivery5(1, "a/x", 0, &props, "x")));
    let p = out_publishes(&a);
    assert_eq!(p[0][7..13], [5, id::MESSAGE_EXPIRY_INTERVAL, 0, 0, 0, 6]);
    h.now = 11_000;
    let a = h.event(Event::Delivery(delivery5(2, "a/x", 0, &props, "x")));
    assert!(out_publishes(&a).is_empty());
    assert_eq!(acks(&a), vec![2]);
}

#[test]
fn retain_handling_and_retain_as_published() {
    // Retain Handling 2: no scan after the SUBACK; Retain As Published keeps RETAIN.
    let mut h = connected5(&no_props());
    let a = h.data(&subscribe5(1, &[("r/#", 0b0010_1000)], None));
    let token = subscribe_token(&a);
    let a = h.event(Event::SubscribeResult {
        token,
        result: Ok(SUB),
    });
    assert!(scans(&a).is_empty());
    let mut d = delivery5(1, "r/x", 0, &no_props(), "x");
    d.properties.push(Property {
        key: PROP_RETAIN.into(),
        value: "1".into(),
    });
    let p = out_publishes(&h.event(Event::Delivery(d)));
    assert_eq!(p[0][0], 0x31, "RETAIN kept");
    // Retain Handling 1: scan only for a new subscription.
    let a = h.data(&subscribe5(2, &[("s/#", 0b0001_0000)], None));
    assert_eq!(scans(&a).len(), 1);
    let a = h.data(&subscribe5(3, &[("s/#", 0b0001_0000)], None));
    assert!(scans(&a).is_empty());
}

#[test]
fn shared_subscription_opens_a_shared_backend_subscription() {
    let mut h = connected5(&no_props());
    let a = h.data(&subscribe5(1, &[("$share/g1/s/+", 1)], None));
    let (token, spec) = subscribe_action(&a);
    assert_eq!(spec.mode, SubMode::Shared);
    assert!(spec.durable);
    assert_eq!(spec.name, "mqtt-share-g1-s%2F%2B");
    assert!(sent(&a).is_empty(), "SUBACK waits for the group");
    let a = h.event(Event::SubscribeResult {
        token,
        result: Ok(77),
    });
    assert_eq!(sent(&a), vec![v5::suback(0x90, 1, &[1], &no_props())]);
    assert!(
        scans(&a).is_empty(),
        "no retained messages for a shared subscription"
    );
    let mut d = delivery5(5, "s/1", 1, &no_props(), "x");
    d.subscription = 77;
    let a = h.event(Event::Delivery(d));
    assert_eq!(out_publishes(&a).len(), 1);
    let mut d = delivery5(6, "t/1", 1, &no_props(), "x");
    d.subscription = 77;
    let a = h.event(Event::Delivery(d));
    assert!(out_publishes(&a).is_empty());
    assert_eq!(
        acks(&a),
        vec![6],
        "not the group's filter: acked and dropped"
    );
    // No Local on a shared subscription is a Protocol Error.
    let a = h.data(&subscribe5(2, &[("$share/g/x", 0b0100)], None));
    assert_eq!(sent(&a)[0][2], reason::PROTOCOL_ERROR);
    // UNSUBSCRIBE leaves the group.
    let mut h2 = connected5(&no_props());
    let a = h2.data(&subscribe5(1, &[("$share/g1/s/+", 1)], None));
    let token = subscribe_token(&a);
    h2.event(Event::SubscribeResult {
        token,
        result: Ok(78),
    });
    let mut body = vec![0, 2, 0];
    mqtt_string(&mut body, b"$share/g1/s/+");
    mqtt_string(&mut body, b"nope");
    let a = h2.data(&packet(0xa2, &body));
    assert!(a.iter().any(|a| matches!(
        a,
        Action::Unsubscribe {
            sub: 78,
            delete: false
        }
    )));
    assert_eq!(
        sent(&a),
        vec![vec![
            0xb0,
            0x05,
            0,
            2,
            0,
            0x00,
            reason::NO_SUBSCRIPTION_EXISTED
        ]]
    );
}

#[test]
fn shared_subscriptions_work_for_3_1_1_too() {
    let mut h = Harness::connected(0);
    let a = h.data(&subscribe_packet(1, &[("$share/g/a", 1), ("$share/g", 0)]));
    let (token, spec) = subscribe_action(&a);
    assert_eq!(spec.mode, SubMode::Shared);
    let a = h.event(Event::SubscribeResult {
        token,
        result: Ok(5),
    });
    assert_eq!(sent(&a), vec![codec::suback(1, &[1, 0x80])]);
}

#[test]
fn invalid_filter_gets_0x8f() {
    let mut h = connected5(&no_props());
    let a = h.data(&subscribe5(1, &[("a/#/b", 0)], None));
    assert_eq!(
        sent(&a),
        vec![v5::suback(
            0x90,
            1,
            &[reason::TOPIC_FILTER_INVALID],
            &no_props()
        )]
    );
}

#[test]
fn server_disconnects_carry_reason_codes() {
    let mut h = connected5(&no_props());
    let a = h.event(Event::ClaimLost { key: "dev1".into() });
    assert_eq!(
        sent(&a)[0][..3],
        [0xe0, sent(&a)[0][1], reason::SESSION_TAKEN_OVER]
    );
    // Keep alive 1 s, silence for 1.5 s.
    let (mut h, _) = Harness::new();
    let mut p = connect5("k", true, &no_props(), None, None);
    p[11] = 1; // Keep Alive LSB
    let a = h.data(&p);
    let token = auth_token(&a);
    h.event(Event::AuthResult {
        token,
        result: Ok(principal()),
    });
    let (timer, delay) = *timers(&h.c.take_actions()).last().unwrap_or(&(0, 0));
    let _ = (timer, delay);
    h.now += 1_500;
    let keep_alive = h.c.timer.map(|t| t.0).unwrap();
    let a = h.event(Event::Timer { token: keep_alive });
    assert_eq!(
        sent(&a)[0][..3],
        [0xe0, sent(&a)[0][1], reason::KEEP_ALIVE_TIMEOUT]
    );
    // A packet too large.
    let mut h = connected5(&no_props());
    let a = h.data(&[0x30, 0xff, 0xff, 0xff, 0x7f]);
    assert_eq!(
        sent(&a)[0][..3],
        [0xe0, sent(&a)[0][1], reason::PACKET_TOO_LARGE]
    );
    // A malformed one.
    let mut h = connected5(&no_props());
    let a = h.data(&[0x30, 0x02, 0x00, 0x09]);
    assert_eq!(
        sent(&a)[0][..3],
        [0xe0, sent(&a)[0][1], reason::MALFORMED_PACKET]
    );
}

#[test]
fn will_delay_and_disconnect_with_will() {
    let (mut h, _) = Harness::new();
    let props = Properties {
        session_expiry_interval: Some(60),
        ..Properties::default()
    };
    let will_props = Properties {
        will_delay_interval: Some(5),
        content_type: Some("text/plain".into()),
        ..Properties::default()
    };
    let a = h.data(&connect5(
        "w",
        true,
        &props,
        Some(("w/t", b"bye", &will_props)),
        None,
    ));
    let token = auth_token(&a);
    let a = h.event(Event::AuthResult {
        token,
        result: Ok(principal()),
    });
    let w = wills(&a);
    let will = w[0].as_ref().unwrap();
    assert_eq!(will.delay_ms, 5_000);
    assert!(will
        .msg
        .properties
        .iter()
        .any(|p| p.key == message::PROP_CONTENT_TYPE && p.value == "text/plain"));
    // DISCONNECT 0x04: the will stays for the host to publish.
    let a = h.data(&[0xe0, 0x01, reason::DISCONNECT_WITH_WILL]);
    assert!(wills(&a).is_empty());
    assert!(closed(&a).is_some());
    // Will delay is capped by a Session Expiry Interval of 0.
    let (mut h, _) = Harness::new();
    let a = h.data(&connect5(
        "w2",
        true,
        &no_props(),
        Some(("w/t", b"bye", &will_props)),
        None,
    ));
    let token = auth_token(&a);
    let a = h.event(Event::AuthResult {
        token,
        result: Ok(principal()),
    });
    assert_eq!(wills(&a)[0].as_ref().unwrap().delay_ms, 0);
}

#[test]
fn session_expiry_persists_and_an_expired_session_is_not_resumed() {
    let props = Properties {
        session_expiry_interval: Some(10),
        ..Properties::default()
    };
    // Clean Start 0 with Session Expiry 10 s: the session is read.
    let (mut h, _) = Harness::new();
    let a = h.data(&connect5("s", false, &props, None, None));
    let token = auth_token(&a);
    let a = h.event(Event::AuthResult {
        token,
        result: Ok(principal()),
    });
    let gets = kv_ops(&a);
    assert_eq!(gets[0].1, "mqtt/session/s");
    // Stored: ended at 1 s with 10 s expiry; now 20 s: expired.
    let old = session_store::encode(&StoredSession {
        filters: BTreeMap::from([("a".to_string(), Subscription::qos(1))]),
        expiry: 10,
        ended_ms: Some(1_000),
        backend_name: None,
    });
    h.now = 20_000;
    h.event(Event::KvResult {
        token: gets[1].0,
        result: Ok(None),
    });
    let a = h.event(Event::KvResult {
        token: gets[0].0,
        result: Ok(Some(old)),
    });
    let connack = sent(&a).remove(0);
    assert_eq!(connack[2..4], [0, 0], "Session Present 0");
    // The old backlog is deleted, the new session gets its own durable subscription.
    let (_, spec) = subscribe_action(&a);
    assert_eq!(spec.name, "mqtt-session-s");
    assert!(h
        .c
        .session_name
        .as_deref()
        .unwrap()
        .starts_with("mqtt-session-s-"));
    // A DISCONNECT records when the session ended.
    let a = h.data(&[0xe0, 0x00]);
    let put = kv_ops(&a);
    let rec = session_store::decode(put[0].2.as_ref().unwrap().as_ref().unwrap()).unwrap();
    assert_eq!((rec.expiry, rec.ended_ms), (10, Some(20_000)));
}

#[test]
fn disconnect_with_session_expiry_0_drops_the_session() {
    let props = Properties {
        session_expiry_interval: Some(10),
        ..Properties::default()
    };
    let (mut h, _) = Harness::new();
    let a = h.data(&connect5("z", true, &props, None, None));
    let token = auth_token(&a);
    h.event(Event::AuthResult {
        token,
        result: Ok(principal()),
    });
    let a = h.data(&subscribe5(1, &[("a", 1)], None));
    let token = subscribe_token(&a);
    h.event(Event::SubscribeResult {
        token,
        result: Ok(SUB),
    });
    let mut body = vec![0x00];
    v5::put_properties(
        &mut body,
        &Properties {
            session_expiry_interval: Some(0),
            ..Properties::default()
        },
    );
    let a = h.data(&packet(0xe0, &body));
    let deletes: Vec<_> = kv_ops(&a)
        .into_iter()
        .filter(|k| k.2 == Some(None))
        .collect();
    assert_eq!(deletes.len(), 2);
    assert!(a
        .iter()
        .any(|a| matches!(a, Action::Unsubscribe { delete: true, .. })));
    // Session Expiry 0 at CONNECT, then > 0 at DISCONNECT: Protocol Error.
    let mut h = connected5(&no_props());
    let mut body = vec![0x00];
    v5::put_properties(
        &mut body,
        &Properties {
            session_expiry_interval: Some(5),
            ..Properties::default()
        },
    );
    let a = h.data(&packet(0xe0, &body));
    assert_eq!(sent(&a)[0][2], reason::PROTOCOL_ERROR);
}

#[test]
fn enhanced_authentication_runs_sasl_through_the_host() {
    let mechs: Rc<[String]> = Rc::from(vec!["SCRAM-SHA-256".to_string()]);
    let mut c = MqttConnection::new(CONN, Config::default(), 1, 1_000).with_sasl_mechanisms(mechs);
    c.take_actions();
    let mut h = Harness { c, now: 1_000 };
    let props = Properties {
        authentication_method: Some("SCRAM-SHA-256".into()),
        authentication_data: Some(b"n,,n=alice,r=abc".to_vec()),
        ..Properties::default()
    };
    let a = h.data(&connect5("e", true, &props, None, None));
    let (token, mech, resp) = a
        .iter()
        .find_map(|a| match a {
            Action::AuthenticateSasl {
                token,
                mechanism,
                response,
            } => Some((*token, mechanism.clone(), response.clone())),
            _ => None,
        })
        .unwrap();
    assert_eq!(
        (mech.as_str(), resp.as_slice()),
        ("SCRAM-SHA-256", &b"n,,n=alice,r=abc"[..])
    );
    let a = h.event(Event::SaslResult {
        token,
        result: Ok(SaslOutcome::Challenge(
            b"r=abcdef,s=c2FsdA==,i=4096".to_vec(),
        )),
    });
    let auth = sent(&a).remove(0);
    assert_eq!(auth[..3], [0xf0, auth[1], reason::CONTINUE_AUTHENTICATION]);
    // The client's response comes back in AUTH 0x18.
    let mut body = vec![reason::CONTINUE_AUTHENTICATION];
    v5::put_properties(
        &mut body,
        &Properties {
            authentication_method: Some("SCRAM-SHA-256".into()),
            authentication_data: Some(b"c=biws,r=abcdef,p=xx".to_vec()),
            ..Properties::default()
        },
    );
    let a = h.data(&packet(0xf0, &body));
    let token = a
        .iter()
        .find_map(|a| match a {
            Action::AuthenticateSasl {
                token, response, ..
            } => {
                assert_eq!(response, b"c=biws,r=abcdef,p=xx");
                Some(*token)
            }
            _ => None,
        })
        .unwrap();
    let a = h.event(Event::SaslResult {
        token,
        result: Ok(SaslOutcome::Success(SaslSuccess {
            principal: principal(),
            final_data: b"v=sig".to_vec(),
        })),
    });
    let connack = sent(&a).remove(0);
    assert_eq!(connack[2..4], [0, 0]);
    let (p, _) = v5::split_properties(
        &connack[4..],
        &[
            id::AUTHENTICATION_METHOD,
            id::AUTHENTICATION_DATA,
            id::RECEIVE_MAXIMUM,
            id::MAXIMUM_PACKET_SIZE,
            id::TOPIC_ALIAS_MAXIMUM,
        ],
    )
    .unwrap();
    assert_eq!(p.authentication_method.as_deref(), Some("SCRAM-SHA-256"));
    assert_eq!(p.authentication_data.as_deref(), Some(&b"v=sig"[..]));
    // An unknown method gets 0x8C.
    let (mut h, _) = Harness::new();
    let props = Properties {
        authentication_method: Some("KERBEROS".into()),
        ..Properties::default()
    };
    let a = h.data(&connect5("e", true, &props, None, None));
    assert_eq!(sent(&a)[0][3], reason::BAD_AUTHENTICATION_METHOD);
}

proptest! {
    /// The whole v5 state machine: a valid CONNECT then arbitrary bytes, with the auth
    /// granted, never panics (a quick check; `plugins/mqtt/fuzz` has the libFuzzer target).
    #[test]
    fn arbitrary_v5_traffic_never_panics(chunks in proptest::collection::vec(
        proptest::collection::vec(any::<u8>(), 0..64), 0..8)) {
        let mut h = connected5(&no_props());
        for c in chunks {
            let _ = h.data(&c);
        }
    }
}
