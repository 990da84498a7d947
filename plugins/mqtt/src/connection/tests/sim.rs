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
