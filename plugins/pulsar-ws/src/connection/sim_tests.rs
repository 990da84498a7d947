//! The session machine against the SDK's simulated host: whole exchanges, with the host's
//! flow control, receipts, redeliveries and positions (its message ids are opaque bytes,
//! not `MessageIdData`, so the plugin's fallback by bytes is exercised too).

use base64::Engine;
use magnetar_sdk::testing::{message_id, SimHost};
use magnetar_sdk::web::{self, Direction, Frame, Request};
use magnetar_sdk::{OutboundMessage, Principal, Property};
use serde_json::{json, Value};

use super::PulsarWsConnection;
use crate::config::Config;
use crate::message_id::BASE64;

const T0: u64 = 1_796_553_000_000;

fn new_host() -> SimHost<PulsarWsConnection> {
    SimHost::new(T0, PulsarWsConnection::new(1, Config::default(), T0)).with_auth(Ok(Principal {
        user: "alice".into(),
        tenant: "acme".into(),
        namespace: "iot".into(),
    }))
}

/// Sends the upgrade request, expects the 101 and returns the messages that followed it.
fn upgrade(h: &mut SimHost<PulsarWsConnection>, path: &str, query: &str) -> Vec<Value> {
    h.data(
        &Frame::Request(Request {
            method: "GET".into(),
            path: path.into(),
            query: query.into(),
            headers: vec![],
            peer: "127.0.0.1:1".into(),
        })
        .encode(),
    );
    h.run();
    let mut frames = frames(h).into_iter();
    let first = frames.next();
    assert!(
        matches!(&first, Some(Frame::Response(r)) if r.status == 101),
        "{first:?}"
    );
    frames
        .filter_map(|f| match f {
            Frame::Text(t) => serde_json::from_str(&t).ok(),
            _ => None,
        })
        .collect()
}

fn host(path: &str, query: &str) -> SimHost<PulsarWsConnection> {
    let mut h = new_host();
    assert!(upgrade(&mut h, path, query).is_empty());
    h
}

fn frames(h: &mut SimHost<PulsarWsConnection>) -> Vec<Frame> {
    let sent = h.take_sent();
    let mut out = Vec::new();
    let mut pos = 0;
    while let Ok(Some((f, used))) = web::decode(Direction::ToHost, &sent[pos..], usize::MAX) {
        out.push(f);
        pos += used;
    }
    assert_eq!(pos, sent.len());
    out
}

fn texts(h: &mut SimHost<PulsarWsConnection>) -> Vec<Value> {
    frames(h)
        .into_iter()
        .filter_map(|f| match f {
            Frame::Text(t) => serde_json::from_str(&t).ok(),
            _ => None,
        })
        .collect()
}

fn send(h: &mut SimHost<PulsarWsConnection>, v: Value) {
    h.data(&Frame::Text(v.to_string()).encode());
    h.run();
}

fn produce(h: &mut SimHost<PulsarWsConnection>, payload: &[u8]) {
    h.produce(OutboundMessage {
        topic: "temps".into(),
        key: None,
        payload: payload.to_vec(),
        properties: vec![Property {
            key: "p".into(),
            value: "v".into(),
        }],
    });
    h.run();
}

fn b64(b: &[u8]) -> String {
    BASE64.encode(b)
}

#[test]
fn a_producer_stores_and_acks_with_the_hosts_id() {
    let mut h = host("/ws/v2/producer/persistent/acme/iot/temps", "");
    for (i, ctx) in ["a", "b"].iter().enumerate() {
        send(
            &mut h,
            json!({"payload": b64(b"hello"), "context": ctx, "key": "k", "properties": {"x": "1"}}),
        );
        let acks = texts(&mut h);
        assert_eq!(
            acks,
            [
                json!({"result": "ok", "messageId": b64(&message_id(i as u64)), "context": ctx,
                    "errorCode": 0, "schemaVersion": 0})
            ]
        );
    }
    let stored = &h.published()[0];
    assert_eq!(
        (
            stored.topic.as_str(),
            stored.payload.as_slice(),
            stored.key.as_deref()
        ),
        ("temps", &b"hello"[..], Some("k"))
    );
}

#[test]
fn a_consumer_gets_messages_within_its_window_and_acks_free_it() {
    let mut h = host(
        "/ws/v2/consumer/persistent/acme/iot/temps/sub",
        "receiverQueueSize=2",
    );
    for i in 0..3u8 {
        produce(&mut h, &[b'0' + i]);
    }
    let got = texts(&mut h);
    assert_eq!(got.len(), 2, "the window");
    assert_eq!(got[0]["payload"], b64(b"0"));
    assert_eq!(got[0]["properties"], json!({"p": "v"}));
    assert_eq!(got[0]["messageId"], b64(&message_id(0)));
    send(&mut h, json!({"messageId": got[0]["messageId"]}));
    let more = texts(&mut h);
    assert_eq!(more.len(), 1);
    assert_eq!(more[0]["payload"], b64(b"2"));
    let (sub, _) = h.subscriptions()[0];
    assert_eq!(h.acked(sub), [1]);
}

#[test]
fn a_negative_ack_comes_back_with_a_redelivery_count() {
    let mut h = host("/ws/v2/consumer/persistent/acme/iot/temps/sub", "");
    produce(&mut h, b"again");
    let first = texts(&mut h);
    send(
        &mut h,
        json!({"type": "negativeAcknowledge", "messageId": first[0]["messageId"]}),
    );
    let second = texts(&mut h);
    assert_eq!(second[0]["messageId"], first[0]["messageId"]);
    assert_eq!(second[0]["redeliveryCount"], 1);
}

#[test]
fn a_reader_from_earliest_reads_the_backlog_and_learns_the_end() {
    let mut h = new_host();
    // Stored before the reader exists.
    produce(&mut h, b"a");
    produce(&mut h, b"b");
    let got = upgrade(
        &mut h,
        "/ws/v2/reader/persistent/acme/iot/temps",
        "messageId=earliest",
    );
    let payloads: Vec<_> = got.iter().map(|m| m["payload"].clone()).collect();
    assert_eq!(payloads, [json!(b64(b"a")), json!(b64(b"b"))]);
    send(&mut h, json!({"type": "isEndOfTopic"}));
    assert_eq!(texts(&mut h), [json!({"endOfTopic": true})]);
    produce(&mut h, b"c");
    // The window (1000) is open: "c" comes at once; until then the end was not reached.
    assert_eq!(texts(&mut h)[0]["payload"], b64(b"c"));
    // Reader acks free the host's window.
    send(&mut h, json!({"messageId": got[0]["messageId"]}));
    send(&mut h, json!({}));
    let (sub, _) = h.subscriptions()[0];
    assert_eq!(h.acked(sub).len(), 2);
}

#[test]
fn a_reader_start_that_is_not_a_message_id_is_a_500() {
    // The simulated host's ids are not `MessageIdData`: as a start position Pulsar refuses
    // them (the real host's ids are `MessageIdData`).
    let start = b64(&message_id(0)).replace('+', "%2B").replace('/', "%2F");
    let mut h = new_host();
    h.data(
        &Frame::Request(Request {
            method: "GET".into(),
            path: "/ws/v2/reader/persistent/acme/iot/temps".into(),
            query: format!("messageId={start}"),
            headers: vec![],
            peer: String::new(),
        })
        .encode(),
    );
    h.run();
    assert!(matches!(&frames(&mut h)[..], [Frame::Response(r)] if r.status == 500));
    assert!(h.closed().is_some());
}

#[test]
fn pull_mode_through_the_host() {
    let mut h = host(
        "/ws/v2/consumer/persistent/acme/iot/temps/sub",
        "pullMode=true&receiverQueueSize=10",
    );
    for p in [b"a", b"b", b"c"] {
        produce(&mut h, p);
    }
    assert!(texts(&mut h).is_empty());
    send(&mut h, json!({"type": "permit", "permitMessages": 1}));
    let got = texts(&mut h);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["payload"], b64(b"a"));
    send(&mut h, json!({"type": "permit", "permitMessages": 5}));
    assert_eq!(texts(&mut h).len(), 2);
}

#[test]
fn unsubscribe_through_the_host() {
    let mut h = host("/ws/v2/consumer/persistent/acme/iot/temps/sub", "");
    send(&mut h, json!({"type": "unsubscribe"}));
    assert!(h.subscriptions().is_empty());
    produce(&mut h, b"late");
    assert!(texts(&mut h).is_empty());
    assert!(h.closed().is_none());
}
