//! Whole flows of [`MqttConnection`] on the SDK's simulated host (`magnetar_sdk::testing`):
//! the host completes operations, keeps the kv, routes publishes to subscriptions and fires
//! timers, so these tests say what a client sees rather than which host call comes when.
//! The exact orderings of host calls stay in the tests beside this module.

use super::*;
use magnetar_sdk::testing::SimHost;

/// A fresh connection on a simulated host at t = 1 s.
fn host() -> SimHost<MqttConnection> {
    SimHost::new(1_000, machine())
}

fn machine() -> MqttConnection {
    MqttConnection::new(CONN, Config::default(), 0xabc, 1_000)
}

/// The packets the client received since the last look.
fn received(h: &mut SimHost<MqttConnection>) -> Vec<Vec<u8>> {
    sent(&[Action::Send(h.take_sent())])
}

/// Connected with Clean Session `clean` as `dev/1`, CONNACK read.
fn connected(clean: bool, keep_alive: u16) -> SimHost<MqttConnection> {
    let mut h = host();
    h.data(&connect_packet("dev/1", clean, keep_alive, None));
    h.run();
    assert_eq!(received(&mut h), [codec::connack(false, 0)]);
    h
}

/// Connected as [`connected`] does, then subscribed to `filter` (SUBACK read); the backend
/// subscription's handle and spec.
fn subscribed(
    clean: bool,
    filter: &str,
    qos: u8,
) -> (SimHost<MqttConnection>, SubId, SubscriptionSpec) {
    let mut h = connected(clean, 0);
    h.data(&subscribe_packet(1, &[(filter, qos)]));
    h.run();
    assert_eq!(received(&mut h), [codec::suback(1, &[qos])]);
    let (sub, spec) = match h.subscriptions().as_slice() {
        [(id, spec)] => (*id, (*spec).clone()),
        other => panic!("one subscription expected: {other:?}"),
    };
    (h, sub, spec)
}

#[test]
fn connect_authenticates_claims_the_client_id_then_connack_0() {
    let mut h = host();
    assert_eq!(h.timers(), [10_000], "CONNECT timeout armed");
    h.data(&connect_packet("dev1", true, 30, Some(("alice", "secret"))));
    match h.pending().front() {
        Some(Action::Authenticate {
            creds: Credentials::Password(up),
            ..
        }) => {
            assert_eq!(up.user, "alice");
            assert_eq!(up.password, b"secret");
        }
        other => panic!("authentication first: {other:?}"),
    }
    assert!(
        h.take_sent().is_empty(),
        "no CONNACK before the auth result"
    );
    h.run();
    assert_eq!(received(&mut h), [codec::connack(false, 0)]);
    assert!(h.claims().contains("dev1"));
    // The CONNECT timeout is superseded by the 45 s keep-alive timer.
    h.advance(44_999);
    assert_eq!(h.closed(), None);
}

#[test]
fn not_authorized_gets_connack_5_and_close() {
    let mut h = host().with_auth(Err(err(ErrorKind::NotAuthorized)));
    h.data(&connect_packet("dev1", true, 30, Some(("alice", "wrong"))));
    h.run();
    assert_eq!(received(&mut h), [codec::connack(false, 5)]);
    assert!(h
        .closed()
        .is_some_and(|r| r.contains("authentication failed")));
    // Nothing after the close.
    h.take_actions();
    h.data(&[0xc0, 0x00]);
    assert!(h.take_actions().is_empty());
}

#[test]
fn qos1_publish_is_pubacked_once_stored_and_reaches_a_subscriber() {
    let (mut h, sub, spec) = subscribed(true, "a/#", 1);
    assert_eq!(spec.topic, PULSAR_TOPIC);

    h.data(&publish_packet("a/b", 1, 10, b"hi"));
    assert!(
        h.take_sent().is_empty(),
        "no PUBACK before the backend has it"
    );
    assert_eq!(h.pending().len(), 1);
    h.run();
    assert_eq!(h.published().len(), 1);
    // The PUBACK, then the message back through the subscription, at QoS 1.
    assert_eq!(
        received(&mut h),
        [codec::puback(10), out_publish("a/b", 1, 1, false, b"hi")]
    );
    assert_eq!(
        h.unacked(sub),
        1,
        "acked to the backend only on the client's PUBACK"
    );
    h.data(&[0x40, 0x02, 0x00, 0x01]);
    assert_eq!(h.unacked(sub), 0);
    assert_eq!(h.acked(sub).len(), 1);
}

#[test]
fn qos0_deliveries_of_a_batch_leave_in_one_send_with_one_ack() {
    let (mut h, sub, _) = subscribed(true, "a/+", 0);
    for i in 0..3u8 {
        h.data(&publish_packet("a/b", 0, 0, &[b'0' + i]));
    }
    h.take_actions();
    h.run();
    let actions = h.take_actions();
    let sends = actions
        .iter()
        .filter(|a| matches!(a, Action::Send(_)))
        .count();
    let ack_calls = actions
        .iter()
        .filter(|a| matches!(a, Action::Ack { .. } | Action::AckMany { .. }))
        .count();
    assert_eq!((sends, ack_calls), (1, 1), "{actions:?}");
    assert_eq!(received(&mut h).len(), 3);
    assert_eq!(h.acked(sub).len(), 3);
}

#[test]
fn keep_alive_timeout_after_one_and_a_half_intervals_of_silence() {
    let mut h = connected(true, 10);
    // Activity at +5 s: the timer at +15 s re-arms for the remaining 5 s.
    h.advance(5_000);
    h.data(&[0xc0, 0x00]);
    assert_eq!(received(&mut h), [codec::pingresp()]);
    h.advance(14_999);
    assert_eq!(h.closed(), None);
    h.advance(1);
    assert_eq!(h.closed(), Some("keep-alive timeout"));
}

#[test]
fn persistent_session_keeps_filters_in_the_kv_and_messages_while_away() {
    let (mut h, _, spec) = subscribed(false, "a/+", 1);
    assert!(spec.durable);
    let stored = h
        .kv()
        .get("mqtt/session/dev%2F1")
        .cloned()
        .unwrap_or_default();
    assert_eq!(stored_filters(&stored), BTreeMap::from([("a/+".into(), 1)]));

    // The client goes away; a message arrives for it meanwhile.
    h.disconnect();
    h.produce(OutboundMessage {
        topic: PULSAR_TOPIC.into(),
        key: Some("a/b".into()),
        payload: b"queued".to_vec(),
        properties: vec![
            Property {
                key: PROP_TOPIC.into(),
                value: "a/b".into(),
            },
            Property {
                key: PROP_QOS.into(),
                value: "1".into(),
            },
        ],
    });

    // It comes back: Session Present, the filter restored, the message delivered.
    h.reconnect(machine());
    h.data(&connect_packet("dev/1", false, 0, None));
    h.run();
    assert_eq!(
        received(&mut h),
        [
            codec::connack(true, 0),
            out_publish("a/b", 1, 1, false, b"queued")
        ]
    );
    assert_eq!(h.machine().filters().len(), 1);
}

// ---- MQTT 5.0 Clean Start 0 without Session Expiry Interval (§3.1.2.4, §3.1.2.11.2) -----

/// A QoS 1 message for `topic` from another producer.
fn qos1_message(topic: &str, payload: &[u8]) -> OutboundMessage {
    OutboundMessage {
        topic: PULSAR_TOPIC.into(),
        key: Some(topic.into()),
        payload: payload.to_vec(),
        properties: vec![
            Property {
                key: PROP_TOPIC.into(),
                value: topic.into(),
            },
            Property {
                key: PROP_QOS.into(),
                value: "1".into(),
            },
        ],
    }
}

fn expiry(seconds: Option<u32>) -> Properties {
    Properties {
        session_expiry_interval: seconds,
        ..Properties::default()
    }
}

/// A 5.0 CONNECT of `dev5` on a new connection of `h`; the packets the client got.
fn connect5_again(
    h: &mut SimHost<MqttConnection>,
    clean_start: bool,
    props: &Properties,
) -> Vec<Vec<u8>> {
    h.reconnect(machine());
    h.data(&super::v5::connect5("dev5", clean_start, props, None, None));
    h.run();
    received(h)
}

/// Whether a 5.0 CONNACK says Session Present (§3.2.2.1.1).
fn session_present(connack: &[u8]) -> bool {
    assert_eq!(connack.first(), Some(&0x20), "CONNACK: {connack:?}");
    assert_eq!(connack.get(3), Some(&0x00), "CONNACK success: {connack:?}");
    connack.get(2) == Some(&1)
}

/// `dev5` held a session with Session Expiry 1 h subscribed to `a/+` at QoS 1, left with a
/// DISCONNECT, and two QoS 1 messages were queued for it meanwhile.
fn session_with_a_backlog() -> SimHost<MqttConnection> {
    let mut h = host();
    h.data(&super::v5::connect5(
        "dev5",
        true,
        &expiry(Some(3600)),
        None,
        None,
    ));
    h.run();
    h.data(&super::v5::subscribe5(1, &[("a/+", 1)], None));
    h.run();
    h.data(&[0xe0, 0x00]);
    h.run();
    received(&mut h);
    h.produce(qos1_message("a/b", b"q1"));
    h.produce(qos1_message("a/c", b"q2"));
    h
}

#[test]
fn v5_clean_start_0_without_session_expiry_resumes_the_session_until_it_disconnects() {
    let mut h = session_with_a_backlog();
    // [MQTT-3.1.2-5], [MQTT-3.2.2-3]: resumed, Session Present 1, the backlog delivered.
    let packets = connect5_again(&mut h, false, &expiry(None));
    assert!(session_present(&packets[0]));
    let publishes: Vec<_> = packets[1..].iter().filter(|p| p[0] >> 4 == 3).collect();
    assert_eq!(publishes.len(), 2, "{packets:?}");
    assert!(publishes[0].ends_with(b"q1") && publishes[1].ends_with(b"q2"));
    assert_eq!(h.machine().filters().len(), 1);
    let (sub, spec) = match h.subscriptions().as_slice() {
        [(id, spec)] => (*id, (*spec).clone()),
        other => panic!("the session's durable subscription only: {other:?}"),
    };
    assert!(
        spec.durable && spec.name.starts_with("mqtt-session-dev5-"),
        "{spec:?}"
    );
    // The record says the session ends with this connection.
    let rec = session_store::decode(&h.kv()["mqtt/session/dev5"]).unwrap();
    assert_eq!((rec.expiry, rec.ended_ms), (0, Some(h.now_ms())));
    // PUBACKs reach the backend; the subscription is live.
    h.data(&[0x40, 0x02, 0x00, 0x01, 0x40, 0x02, 0x00, 0x02]);
    assert_eq!(h.acked(sub).len(), 2);
    h.produce(qos1_message("a/d", b"live"));
    h.run();
    assert!(received(&mut h)[0].ends_with(b"live"));

    // §3.1.2.11.2: an absent interval ends the session when this connection closes.
    h.data(&[0x40, 0x02, 0x00, 0x03, 0xe0, 0x00]);
    h.run();
    assert!(h.subscriptions().is_empty());
    assert!(!h.kv().contains_key("mqtt/session/dev5"));
    assert!(!h.kv().contains_key("mqtt/qos2/dev5"));
    h.produce(qos1_message("a/e", b"after"));
    let packets = connect5_again(&mut h, false, &expiry(Some(3600)));
    assert!(!session_present(&packets[0]));
    assert_eq!(packets.len(), 1, "nothing delivered: {packets:?}");
    assert!(h.machine().filters().is_empty());
}

#[test]
fn v5_resumed_session_whose_connection_vanishes_is_gone_at_the_next_connect() {
    let mut h = session_with_a_backlog();
    let packets = connect5_again(&mut h, false, &expiry(Some(0)));
    assert!(session_present(&packets[0]));
    // The peer resets: the plugin sees nothing it could act on.
    h.disconnect();
    h.produce(qos1_message("a/b", b"after"));
    let packets = connect5_again(&mut h, false, &expiry(Some(3600)));
    assert!(!session_present(&packets[0]));
    assert_eq!(packets.len(), 1, "nothing delivered: {packets:?}");
    // The ended session's durable subscription is deleted with its backlog.
    assert!(h
        .take_actions()
        .iter()
        .any(|a| matches!(a, Action::Unsubscribe { delete: true, .. })));
    assert!(h.subscriptions().is_empty());
}

#[test]
fn v5_resumed_session_ends_when_disconnect_sets_an_expiry_after_0() {
    let mut h = session_with_a_backlog();
    let packets = connect5_again(&mut h, false, &expiry(None));
    assert!(session_present(&packets[0]));
    // §3.14.2.2.2: Protocol Error; the interval stays 0 and the session ends, as in Mosquitto.
    let mut body = vec![0x00];
    crate::codec::v5::put_properties(&mut body, &expiry(Some(60)));
    h.data(&packet(0xe0, &body));
    h.run();
    let disconnect = received(&mut h).remove(0);
    assert_eq!(
        (disconnect[0], disconnect[2]),
        (0xe0, reason::PROTOCOL_ERROR)
    );
    assert!(h.subscriptions().is_empty());
    assert!(!h.kv().contains_key("mqtt/session/dev5"));
    let packets = connect5_again(&mut h, false, &expiry(Some(3600)));
    assert!(!session_present(&packets[0]));
}

#[test]
fn v5_clean_start_0_without_session_expiry_and_no_session_starts_an_empty_one() {
    let mut h = host();
    h.data(&super::v5::connect5(
        "dev5",
        false,
        &expiry(None),
        None,
        None,
    ));
    h.run();
    assert!(!session_present(&received(&mut h)[0]));
    assert!(
        h.kv().is_empty(),
        "nothing stored for a session ending with the connection"
    );
    h.data(&super::v5::subscribe5(1, &[("a/+", 1)], None));
    h.run();
    assert!(h.subscriptions().iter().all(|(_, s)| !s.durable));
}

#[test]
fn v5_resumed_session_left_while_its_subscription_opens_stays_marked_for_the_next_connect() {
    let mut h = session_with_a_backlog();
    h.reconnect(machine());
    h.data(&super::v5::connect5(
        "dev5",
        false,
        &expiry(None),
        None,
        None,
    ));
    // The CONNACK is out; the durable subscription is still opening.
    while !matches!(
        h.pending().front(),
        Some(Action::Subscribe { .. } | Action::OpenRoute { .. }) | None
    ) {
        h.complete_next();
    }
    assert!(session_present(&received(&mut h)[0]));
    h.data(&[0xe0, 0x00]);
    let rec = session_store::decode(&h.kv()["mqtt/session/dev5"]).unwrap();
    assert_eq!(rec.expiry, 0, "still marked ended");
    let packets = connect5_again(&mut h, false, &expiry(Some(3600)));
    assert!(!session_present(&packets[0]));
}
