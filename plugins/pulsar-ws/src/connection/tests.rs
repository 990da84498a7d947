//! The session machine driven directly, event by event, as the host would drive it.

use magnetar_sdk::web::{self, Direction, Frame, Request};
use magnetar_sdk::{
    Action, ConsumerSpec, Credentials, ErrorKind, Event, Machine, Message, MessageIdAt, MessageOut,
    OpError, Position, Principal, Property, SubId, SubMode, TopicRef,
};

use super::{close_code, PulsarWsConnection};
use crate::config::Config;
use crate::message_id::MessageId;

const T0: u64 = 1_796_553_000_000;

/// The `messaging` calls among the actions, for exact comparisons.
#[derive(Debug, Clone, PartialEq)]
enum Call {
    SendMessage { token: u64, msg: MessageOut },
    OpenConsumer { token: u64, spec: ConsumerSpec },
    Nack { sub: SubId, delivery_id: u64 },
    LastMessageId { token: u64, sub: SubId },
}

/// A machine with what it sent so far, decoded.
struct Session {
    m: PulsarWsConnection,
    /// Bytes sent, not decoded yet.
    sent: Vec<u8>,
    actions: Vec<Action>,
    now: u64,
}

fn principal() -> Principal {
    Principal {
        user: "alice".into(),
        tenant: "acme".into(),
        namespace: "iot".into(),
    }
}

fn op_error(kind: ErrorKind, message: &str) -> OpError {
    OpError {
        kind,
        message: message.into(),
    }
}

fn id(ledger: u64, entry: u64) -> Vec<u8> {
    MessageId {
        ledger,
        entry,
        partition: -1,
        batch_index: -1,
    }
    .to_bytes(0)
}

fn b64(bytes: &[u8]) -> String {
    crate::message_id::encode(bytes)
}

impl Session {
    fn new(config: Config) -> Self {
        Session {
            m: PulsarWsConnection::new(7, config, T0),
            sent: Vec::new(),
            actions: Vec::new(),
            now: T0,
        }
    }

    fn feed(&mut self, event: Event) {
        let actions = self.m.handle(self.now, event);
        self.absorb(actions);
    }

    fn absorb(&mut self, actions: Vec<Action>) {
        for a in actions {
            if let Action::Send(bytes) = &a {
                self.sent.extend_from_slice(bytes);
            }
            self.actions.push(a);
        }
    }

    fn data(&mut self, frame: Frame) {
        self.feed(Event::Data(frame.encode()));
    }

    fn text(&mut self, text: &str) {
        self.data(Frame::Text(text.into()));
    }

    /// Sends the upgrade request.
    fn request(&mut self, path: &str, query: &str, headers: &[(&str, &str)]) {
        self.data(Frame::Request(Request {
            method: "GET".into(),
            path: path.into(),
            query: query.into(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            peer: "127.0.0.1:5555".into(),
        }));
    }

    fn auth_ok(&mut self) {
        self.feed(Event::AuthResult {
            token: 1,
            result: Ok(principal()),
        });
    }

    /// The frames sent since the last call.
    fn frames(&mut self) -> Vec<Frame> {
        let mut out = Vec::new();
        let mut pos = 0;
        while let Some((f, used)) =
            web::decode(Direction::ToHost, &self.sent[pos..], usize::MAX).unwrap()
        {
            out.push(f);
            pos += used;
        }
        assert_eq!(pos, self.sent.len(), "only whole frames are sent");
        self.sent.clear();
        out
    }

    fn texts(&mut self) -> Vec<serde_json::Value> {
        self.frames()
            .into_iter()
            .map(|f| match f {
                Frame::Text(t) => serde_json::from_str(&t).unwrap(),
                other => panic!("expected a text message, got {other:?}"),
            })
            .collect()
    }

    /// The HTTP status the session answered with.
    fn status(&mut self) -> u16 {
        match self.frames().first() {
            Some(Frame::Response(r)) => r.status,
            other => panic!("expected a response, got {other:?}"),
        }
    }

    fn take_actions(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.actions)
    }

    /// Takes the `messaging` calls made so far, leaving the other actions.
    fn calls(&mut self) -> Vec<Call> {
        let mut calls = Vec::new();
        self.actions.retain(|a| {
            let call = match a.clone() {
                Action::SendMessage { token, msg } => Call::SendMessage { token, msg },
                Action::OpenConsumer { token, spec } => Call::OpenConsumer { token, spec },
                Action::Nack { sub, delivery_id } => Call::Nack { sub, delivery_id },
                Action::LastMessageId { token, sub } => Call::LastMessageId { token, sub },
                _ => return true,
            };
            calls.push(call);
            false
        });
        calls
    }

    fn receipt(&mut self, token: u64, result: Result<Vec<u8>, OpError>) {
        self.feed(Event::Receipt { token, result });
    }

    fn closed_with(&mut self) -> Option<u16> {
        self.frames().into_iter().find_map(|f| match f {
            Frame::Close { code, .. } => Some(code),
            _ => None,
        })
    }

    /// An open producer on `acme/iot/temps`.
    fn producer(config: Config) -> Session {
        let mut s = Session::new(config);
        s.request(
            "/ws/v2/producer/persistent/acme/iot/temps",
            "token=tok",
            &[],
        );
        s.auth_ok();
        assert_eq!(s.status(), 101);
        s.take_actions();
        s
    }

    /// An open consumer on `acme/iot/temps`, subscription `sub`, sub id 9.
    fn consumer(query: &str) -> Session {
        let mut s = Session::new(Config::default());
        s.request("/ws/v2/consumer/persistent/acme/iot/temps/sub", query, &[]);
        s.auth_ok();
        assert!(matches!(s.calls()[..], [Call::OpenConsumer { .. }]));
        s.feed(Event::SubscribeResult {
            token: 2,
            result: Ok(9),
        });
        assert_eq!(s.status(), 101);
        s.take_actions();
        s
    }

    fn deliver(&mut self, delivery_id: u64, message_id: Vec<u8>, payload: &[u8]) {
        self.feed(Event::Message(Message {
            subscription: 9,
            delivery_id,
            message_id,
            key: None,
            payload: payload.to_vec(),
            properties: vec![],
            publish_time_ms: T0,
            event_time_ms: None,
            redelivery_count: 0,
        }));
    }

    fn acks(&mut self) -> Vec<(u64, u64)> {
        self.take_actions()
            .into_iter()
            .flat_map(|a| match a {
                Action::Ack { sub, delivery_id } => vec![(sub, delivery_id)],
                Action::AckMany { sub, delivery_ids } => {
                    delivery_ids.into_iter().map(|d| (sub, d)).collect()
                }
                _ => vec![],
            })
            .collect()
    }
}

#[test]
fn a_producer_publishes_and_acks_with_the_context_and_the_message_id() {
    let mut s = Session::new(Config::default());
    s.request(
        "/ws/v2/producer/persistent/acme/iot/temps",
        "producerName=p1",
        &[("authorization", "Bearer tok")],
    );
    assert!(s.frames().is_empty(), "no answer before authentication");
    assert!(s.take_actions().iter().any(|a| matches!(a,
        Action::Authenticate { token: 1, creds: Credentials::Token(t) } if t == "tok")));
    s.auth_ok();
    assert_eq!(s.status(), 101);
    s.text(
        r#"{"payload":"aGVsbG8=","properties":{"k":"v"},"context":"c1","key":"dev-1","eventTime":"2026-12-06T10:30:00Z"}"#,
    );
    let calls = s.calls();
    let [Call::SendMessage { token, msg }] = &calls[..] else {
        panic!("{calls:?}")
    };
    assert_eq!(
        msg.topic,
        TopicRef {
            name: "temps".into(),
            persistent: true
        }
    );
    assert_eq!(msg.payload, b"hello");
    assert_eq!(msg.key.as_deref(), Some("dev-1"));
    assert_eq!(
        msg.properties,
        vec![Property {
            key: "k".into(),
            value: "v".into()
        }]
    );
    assert_eq!(msg.event_time_ms, Some(T0));
    s.receipt(*token, Ok(id(7, 0)));
    assert_eq!(
        s.texts(),
        [
            serde_json::json!({"result":"ok","messageId":"CAcQADAA","context":"c1","errorCode":0,"schemaVersion":0})
        ]
    );
}

#[test]
fn a_failed_send_and_bad_frames_get_send_errors_and_the_session_goes_on() {
    let mut s = Session::producer(Config::default());
    s.text("not json");
    s.text(r#"{"payload":"@@","context":"c2"}"#);
    s.text(r#"{"payload":"aGk=","context":"c3"}"#);
    let results: Vec<_> = s
        .texts()
        .into_iter()
        .map(|v| (v["result"].clone(), v["context"].clone()))
        .collect();
    assert_eq!(
        results,
        [
            (serde_json::json!("send-error:3"), serde_json::Value::Null),
            (serde_json::json!("send-error:7"), serde_json::json!("c2")),
        ]
    );
    let calls = s.calls();
    let [Call::SendMessage { token, .. }] = &calls[..] else {
        panic!("{calls:?}")
    };
    s.receipt(*token, Err(op_error(ErrorKind::Backend, "topic fenced")));
    let acks = s.texts();
    assert_eq!(acks[0]["result"], "send-error:8");
    assert_eq!(acks[0]["errorMsg"], "topic fenced");
    assert_eq!(acks[0]["context"], "c3");
    assert!(!s.m.is_closed());
}

#[test]
fn a_frame_split_at_every_byte_is_one_publish() {
    let whole = Frame::Request(Request {
        method: "GET".into(),
        path: "/ws/v2/producer/persistent/acme/iot/t".into(),
        query: String::new(),
        headers: vec![],
        peer: String::new(),
    })
    .encode();
    let publish = Frame::Text(r#"{"payload":"aGk="}"#.into()).encode();
    for cut in 0..publish.len() {
        let mut s = Session::new(Config::default());
        s.feed(Event::Data(whole.clone()));
        s.auth_ok();
        s.feed(Event::Data(publish[..cut].to_vec()));
        s.feed(Event::Data(publish[cut..].to_vec()));
        assert_eq!(s.calls().len(), 1, "cut at {cut}");
    }
}

#[test]
fn publishes_beyond_the_window_wait_in_the_socket() {
    let mut s = Session::producer(Config {
        max_pending_sends: 2,
        ..Config::default()
    });
    let mut three = Vec::new();
    for _ in 0..3 {
        three.extend(Frame::Text(r#"{"payload":"aGk="}"#.into()).encode());
    }
    s.feed(Event::Data(three));
    let calls = s.calls();
    assert_eq!(calls.len(), 2);
    assert!(s
        .take_actions()
        .iter()
        .any(|a| matches!(a, Action::SetReading(false))));
    let Call::SendMessage { token, .. } = &calls[0] else {
        panic!()
    };
    s.receipt(*token, Ok(id(1, 1)));
    assert_eq!(s.calls().len(), 1, "the third goes once one is stored");
    assert!(s
        .take_actions()
        .iter()
        .any(|a| matches!(a, Action::SetReading(true))));
}

#[test]
fn the_upgrade_is_refused_with_pulsars_statuses() {
    let status = |path: &str, query: &str, auth: Option<Result<Principal, OpError>>| {
        let mut s = Session::new(Config::default());
        s.request(path, query, &[]);
        if let Some(result) = auth {
            s.feed(Event::AuthResult { token: 1, result });
        }
        let status = s.status();
        assert!(s.m.is_closed());
        status
    };
    let ok = || Some(Ok(principal()));
    assert_eq!(status("/ws/v2/nothing", "", None), 404);
    assert_eq!(status("/ws/v2/producer/persistent/acme", "", None), 500);
    // The consumer's parameters come before authentication.
    assert_eq!(
        status(
            "/ws/v2/consumer/persistent/acme/iot/t/s",
            "subscriptionType=Bogus",
            None
        ),
        400
    );
    let denied = Some(Err(op_error(ErrorKind::NotAuthorized, "bad token")));
    assert_eq!(
        status("/ws/v2/producer/persistent/acme/iot/t", "", denied.clone()),
        401
    );
    // Another tenant's or namespace's topic.
    assert_eq!(
        status("/ws/v2/producer/persistent/other/iot/t", "", ok()),
        403
    );
    assert_eq!(
        status("/ws/v2/reader/persistent/acme/logs/t", "", ok()),
        403
    );
    // The producer's parameters come after authentication.
    assert_eq!(
        status(
            "/ws/v2/producer/persistent/acme/iot/t",
            "sendTimeoutMillis=x",
            denied
        ),
        401
    );
    assert_eq!(
        status(
            "/ws/v2/producer/persistent/acme/iot/t",
            "sendTimeoutMillis=x",
            ok()
        ),
        400
    );
    assert_eq!(
        status(
            "/ws/v2/reader/persistent/acme/iot/t",
            "messageId=garbage",
            ok()
        ),
        500
    );
    assert_eq!(
        status("/ws/v2/producer/persistent/acme/iot/a/b", "", ok()),
        400
    );
    for bad in ["a%20b", "__kv", ".."] {
        let path = format!("/ws/v2/producer/persistent/acme/iot/{bad}");
        assert_eq!(status(&path, "", ok()), 400, "{bad}");
    }
    let busy = Some(Err(op_error(ErrorKind::Backend, "server busy")));
    assert_eq!(
        status("/ws/v2/producer/persistent/acme/iot/t", "", busy),
        503
    );
}

#[test]
fn no_token_is_anonymous_and_the_query_token_counts() {
    let creds = |query: &str| {
        let mut s = Session::new(Config::default());
        s.request("/ws/v2/producer/persistent/acme/iot/t", query, &[]);
        s.take_actions().into_iter().find_map(|a| match a {
            Action::Authenticate { creds, .. } => Some(creds),
            _ => None,
        })
    };
    assert_eq!(creds(""), Some(Credentials::Anonymous));
    assert_eq!(creds("token=abc"), Some(Credentials::Token("abc".into())));
}

#[test]
fn a_consumer_is_opened_with_its_parameters() {
    let mut s = Session::new(Config::default());
    s.request(
        "/ws/v2/consumer/persistent/acme/iot/temps/sub",
        "subscriptionType=Shared&receiverQueueSize=10&negativeAckRedeliveryDelay=500&maxRedeliverCount=3&consumerName=c1",
        &[],
    );
    s.auth_ok();
    let calls = s.calls();
    assert_eq!(
        calls,
        [Call::OpenConsumer {
            token: 2,
            spec: ConsumerSpec {
                topic: TopicRef {
                    name: "temps".into(),
                    persistent: true
                },
                subscription: Some("sub".into()),
                mode: SubMode::Shared,
                start: Position::Latest,
                max_unacked: 10,
                nack_delay_ms: 500,
                max_redeliveries: 3,
                dead_letter_topic: Some("temps-sub-DLQ".into()),
                consumer_name: Some("c1".into()),
            }
        }]
    );
    assert!(
        s.frames().is_empty(),
        "no answer until the consumer is open"
    );
    s.feed(Event::SubscribeResult {
        token: 2,
        result: Err(op_error(
            ErrorKind::Backend,
            "Exclusive consumer is already connected",
        )),
    });
    assert_eq!(s.status(), 409);
}

#[test]
fn the_hosts_busy_subscription_is_a_conflict() {
    // The host's wording for the broker's ConsumerBusy (gateway/src/backend.rs).
    let busy = op_error(
        ErrorKind::Backend,
        "subscription sub on persistent://acme/iot/t is busy: exclusive consumer already connected to sub",
    );
    assert_eq!(super::open_refusal(&busy).status, 409);
    let down = op_error(
        ErrorKind::Backend,
        "subscribing sub on persistent://acme/iot/t: Disconnected",
    );
    assert_eq!(super::open_refusal(&down).status, 500);
}

#[test]
fn a_dead_letter_topic_of_another_namespace_is_refused() {
    let mut s = Session::new(Config::default());
    s.request(
        "/ws/v2/consumer/persistent/acme/iot/temps/sub",
        "maxRedeliverCount=1&deadLetterTopic=persistent://other/ns/dlq",
        &[],
    );
    s.auth_ok();
    assert_eq!(s.status(), 403);
    let mut s = Session::new(Config::default());
    s.request(
        "/ws/v2/consumer/persistent/acme/iot/temps/sub",
        "maxRedeliverCount=1&deadLetterTopic=persistent://acme/iot/dlq",
        &[],
    );
    s.auth_ok();
    let calls = s.calls();
    assert!(
        matches!(&calls[..], [Call::OpenConsumer { spec, .. }] if spec.dead_letter_topic.as_deref() == Some("dlq"))
    );
}

#[test]
fn open_failures_map_to_pulsars_statuses() {
    for (kind, message, status) in [
        (ErrorKind::NotFound, "no such topic", 404),
        (ErrorKind::NotAuthorized, "no", 403),
        (ErrorKind::InvalidName, "bad name", 400),
        (ErrorKind::QuotaExceeded, "too many subscriptions", 429),
        (ErrorKind::Backend, "broker down", 500),
    ] {
        let mut s = Session::new(Config::default());
        s.request("/ws/v2/consumer/persistent/acme/iot/t/s", "", &[]);
        s.auth_ok();
        s.feed(Event::SubscribeResult {
            token: 2,
            result: Err(op_error(kind, message)),
        });
        assert_eq!(s.status(), status, "{message}");
    }
    // A reader answers 500 whatever the cause.
    let mut s = Session::new(Config::default());
    s.request("/ws/v2/reader/persistent/acme/iot/t", "", &[]);
    s.auth_ok();
    s.feed(Event::SubscribeResult {
        token: 2,
        result: Err(op_error(ErrorKind::NotFound, "no such topic")),
    });
    assert_eq!(s.status(), 500);
}

#[test]
fn deliveries_become_json_and_acks_find_their_delivery() {
    let mut s = Session::consumer("");
    s.feed(Event::Message(Message {
        subscription: 9,
        delivery_id: 100,
        message_id: id(7, 0),
        key: Some("k".into()),
        payload: b"hello".to_vec(),
        properties: vec![Property {
            key: "a".into(),
            value: "1".into(),
        }],
        publish_time_ms: T0 + 5,
        event_time_ms: Some(T0),
        redelivery_count: 1,
    }));
    assert_eq!(
        s.texts(),
        [serde_json::json!({
            "messageId": "CAcQADAA",
            "payload": "aGVsbG8=",
            "properties": {"a": "1"},
            "publishTime": "2026-12-06T10:30:00.005Z",
            "redeliveryCount": 1,
            "eventTime": "2026-12-06T10:30:00Z",
            "key": "k",
        })]
    );
    s.deliver(101, id(7, 1), b"two");
    s.deliver(102, id(7, 2), b"three");
    s.texts();
    s.take_actions();
    // The id as the client got it; the same id without the optional batch_size field.
    s.text(r#"{"messageId":"CAcQADAA"}"#);
    let reencoded = MessageId::parse(&id(7, 1)).unwrap().to_bytes(-1);
    s.text(&format!(
        r#"{{"type":"ack","messageId":"{}"}}"#,
        b64(&reencoded)
    ));
    assert_eq!(s.acks(), [(9, 100), (9, 101)]);
    s.text(&format!(
        r#"{{"type":"negativeAcknowledge","messageId":"{}"}}"#,
        b64(&id(7, 2))
    ));
    assert_eq!(
        s.calls(),
        [Call::Nack {
            sub: 9,
            delivery_id: 102
        }]
    );
    // Acked twice: nothing more.
    s.text(r#"{"messageId":"CAcQADAA"}"#);
    assert_eq!(s.acks(), []);
    assert!(!s.m.is_closed());
}

#[test]
fn an_unreadable_command_closes_the_session() {
    for bad in [
        "not json",
        r#"{"messageId":"@@"}"#,
        r#"{"messageId":"AAAA"}"#,
        r#"{"type":"ack"}"#,
        r#"{"type":"permit"}"#,
    ] {
        let mut s = Session::consumer("");
        s.text(bad);
        assert_eq!(s.closed_with(), Some(close_code::INVALID_PAYLOAD), "{bad}");
        assert!(s.m.is_closed());
    }
}

#[test]
fn pull_mode_sends_one_message_per_permit() {
    let mut s = Session::consumer("pullMode=true");
    for i in 0..3 {
        s.deliver(100 + i, id(1, i), b"m");
    }
    assert!(s.frames().is_empty(), "no permit yet");
    s.text(r#"{"type":"permit","permitMessages":2}"#);
    assert_eq!(s.texts().len(), 2);
    s.deliver(103, id(1, 3), b"m");
    assert!(s.frames().is_empty());
    s.text(r#"{"type":"permit","permitMessages":5}"#);
    assert_eq!(s.texts().len(), 2, "the held one and the new one");
    s.deliver(104, id(1, 4), b"m");
    assert_eq!(s.texts().len(), 1, "a permit left over");
}

#[test]
fn permits_do_nothing_in_push_mode() {
    let mut s = Session::consumer("");
    s.text(r#"{"type":"permit","permitMessages":2}"#);
    s.deliver(100, id(1, 0), b"m");
    assert_eq!(s.texts().len(), 1);
    assert!(!s.m.is_closed());
}

#[test]
fn unsubscribe_deletes_the_subscription_and_keeps_the_session() {
    let mut s = Session::consumer("");
    s.text(r#"{"type":"unsubscribe"}"#);
    assert!(s.take_actions().iter().any(|a| matches!(
        a,
        Action::Unsubscribe {
            sub: 9,
            delete: true
        }
    )));
    s.deliver(100, id(1, 0), b"late");
    assert!(s.frames().is_empty());
    assert!(!s.m.is_closed());
}

#[test]
fn end_of_topic_compares_the_last_message_sent_with_the_topics_last() {
    let mut s = Session::consumer("");
    let ask = |s: &mut Session, last: Option<Vec<u8>>| {
        s.text(r#"{"type":"isEndOfTopic"}"#);
        let calls = s.calls();
        let [Call::LastMessageId { token, sub: 9 }] = &calls[..] else {
            panic!("{calls:?}")
        };
        s.feed(Event::Position {
            token: *token,
            result: Ok(last),
        });
        s.texts()
    };
    assert_eq!(
        ask(&mut s, Some(id(3, 4))),
        [serde_json::json!({"endOfTopic": false})]
    );
    s.deliver(100, id(3, 4), b"last");
    s.texts();
    assert_eq!(
        ask(&mut s, Some(id(3, 4))),
        [serde_json::json!({"endOfTopic": true})]
    );
    assert_eq!(ask(&mut s, None), [serde_json::json!({"endOfTopic": true})]);
}

#[test]
fn a_reader_starts_where_asked_and_any_command_frees_one_slot() {
    let mut s = Session::new(Config::default());
    s.request(
        "/ws/v2/reader/persistent/acme/iot/temps",
        &format!(
            "messageId={}&receiverQueueSize=2",
            b64(&id(5, 6)).replace('+', "%2B")
        ),
        &[],
    );
    s.auth_ok();
    let calls = s.calls();
    let [Call::OpenConsumer { spec, .. }] = &calls[..] else {
        panic!("{calls:?}")
    };
    assert_eq!(spec.subscription, None);
    assert_eq!(spec.max_unacked, 2);
    assert_eq!(
        spec.start,
        Position::MessageId(MessageIdAt {
            id: id(5, 6),
            inclusive: false
        })
    );
    s.feed(Event::SubscribeResult {
        token: 2,
        result: Ok(9),
    });
    assert_eq!(s.status(), 101);
    s.deliver(100, id(5, 7), b"a");
    s.deliver(101, id(5, 8), b"b");
    s.texts();
    s.take_actions();
    s.text(r#"{"whatever":1}"#);
    s.text(&format!(r#"{{"messageId":"{}"}}"#, b64(&id(5, 8))));
    assert_eq!(s.acks(), [(9, 100), (9, 101)]);
    s.text(r#"{"type":"isEndOfTopic"}"#);
    assert!(matches!(s.calls()[..], [Call::LastMessageId { .. }]));
}

#[test]
fn reader_start_positions_earliest_and_latest() {
    for (query, start) in [
        ("", Position::Latest),
        ("messageId=earliest", Position::Earliest),
        ("messageId=latest", Position::Latest),
        (
            "messageId=CP%2F%2F%2F%2F%2F%2F%2F%2F%2F%2F%2FwEQ%2F%2F%2F%2F%2F%2F%2F%2F%2F%2F%2F%2FATAA",
            Position::Earliest,
        ),
    ] {
        let mut s = Session::new(Config::default());
        s.request("/ws/v2/reader/persistent/acme/iot/t", query, &[]);
        s.auth_ok();
        let calls = s.calls();
        assert!(
            matches!(&calls[..], [Call::OpenConsumer { spec, .. }] if spec.start == start),
            "{query}: {calls:?}"
        );
    }
}

#[test]
fn the_ack_timeout_nacks_what_stays_unacked() {
    let mut s = Session::consumer("ackTimeoutMillis=1000");
    s.deliver(100, id(1, 0), b"a");
    assert!(s.take_actions().iter().any(|a| matches!(
        a,
        Action::SetTimer {
            token: 1,
            delay_ms: 1000
        }
    )));
    s.now += 400;
    s.deliver(101, id(1, 1), b"b");
    s.text(&format!(r#"{{"messageId":"{}"}}"#, b64(&id(1, 1))));
    s.now += 600;
    s.feed(Event::Timer { token: 1 });
    assert_eq!(
        s.calls(),
        [Call::Nack {
            sub: 9,
            delivery_id: 100
        }]
    );
    assert!(
        !s.take_actions()
            .iter()
            .any(|a| matches!(a, Action::SetTimer { .. })),
        "nothing left to time"
    );
}

#[test]
fn a_message_over_the_limit_closes_with_1009() {
    let mut s = Session::producer(Config {
        max_message_size: 1024,
        ..Config::default()
    });
    s.text(&format!(r#"{{"payload":"{}"}}"#, "A".repeat(2000)));
    assert_eq!(s.closed_with(), Some(close_code::TOO_BIG));
}

#[test]
fn binary_messages_are_ignored() {
    let mut s = Session::producer(Config::default());
    s.data(Frame::Binary(vec![1, 2, 3]));
    assert!(s.frames().is_empty());
    assert!(s.calls().is_empty());
    assert!(!s.m.is_closed());
}

#[test]
fn nothing_is_sent_after_the_close() {
    let mut s = Session::consumer("");
    s.text("garbage");
    assert!(s.m.is_closed());
    s.frames();
    s.deliver(100, id(1, 0), b"late");
    s.text(r#"{"type":"isEndOfTopic"}"#);
    assert!(s.frames().is_empty());
    assert!(s.calls().is_empty());
}

#[test]
fn deliveries_that_overtake_the_open_are_sent_after_the_101() {
    let mut s = Session::new(Config::default());
    s.request("/ws/v2/consumer/persistent/acme/iot/temps/sub", "", &[]);
    s.auth_ok();
    s.calls();
    s.deliver(100, id(1, 0), b"early");
    assert!(s.frames().is_empty());
    s.feed(Event::SubscribeResult {
        token: 2,
        result: Ok(9),
    });
    let frames = s.frames();
    assert!(matches!(&frames[..], [Frame::Response(r), Frame::Text(_)] if r.status == 101));
}

/// A small xorshift generator: deterministic noise without a dependency.
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[(self.next() % items.len() as u64) as usize]
    }
}

#[test]
fn hostile_input_never_panics_and_nothing_follows_a_close() {
    let texts = [
        "",
        "null",
        "[]",
        "{}",
        "{\"payload\":\"aGk=\"}",
        "{\"payload\":5,\"eventTime\":\"x\"}",
        "{\"type\":\"permit\",\"permitMessages\":-99999999999}",
        "{\"type\":\"permit\",\"permitMessages\":9223372036854775807}",
        "{\"type\":\"isEndOfTopic\"}",
        "{\"type\":\"unsubscribe\"}",
        "{\"messageId\":\"CAcQADAA\"}",
        "{\"type\":\"negativeAcknowledge\",\"messageId\":\"CAcQAQ==\"}",
        "{\"messageId\":\"////\"}",
    ];
    let paths = [
        "/ws/v2/producer/persistent/acme/iot/t",
        "/ws/v2/consumer/persistent/acme/iot/t/s",
        "/ws/v2/reader/persistent/acme/iot/t",
        "/ws/v2/consumer/persistent/acme/iot/t/s",
    ];
    let queries = [
        "",
        "pullMode=true",
        "ackTimeoutMillis=1000",
        "receiverQueueSize=0",
    ];
    let mut noise = Noise(0x9e37_79b9_7f4a_7c15);
    for round in 0..300 {
        let mut s = Session::new(Config::default());
        s.request(noise.pick(&paths), noise.pick(&queries), &[]);
        s.auth_ok();
        s.feed(Event::SubscribeResult {
            token: 2,
            result: Ok(9),
        });
        for step in 0..40 {
            match noise.next() % 6 {
                0 => s.text(noise.pick(&texts)),
                1 => s.deliver(step, id(1, noise.next() % 8), b"m"),
                2 => {
                    for call in s.calls() {
                        if let Call::SendMessage { token, .. } = call {
                            s.receipt(token, Ok(id(2, token)));
                        }
                    }
                    s.feed(Event::Position {
                        token: noise.next() % 4,
                        result: Ok(Some(id(1, 3))),
                    });
                }
                3 => {
                    s.now += 700;
                    s.feed(Event::Timer { token: 1 });
                }
                4 => {
                    let len = (noise.next() % 12) as usize;
                    let junk: Vec<u8> = (0..len).map(|_| noise.next() as u8).collect();
                    s.feed(Event::Data(junk));
                }
                _ => s.data(Frame::Binary(vec![0; 3])),
            }
            let closed = s.m.is_closed();
            s.frames();
            if closed {
                s.text("{}");
                s.deliver(999, id(9, 9), b"after");
                assert!(s.frames().is_empty(), "round {round}: sent after the close");
                break;
            }
        }
    }
}
