//! Drives [`AmqpConnection`] on the SDK's simulated host: frames in, frames and host calls out.

use super::*;
use crate::codec::{BasicProperties, ContentHeader};
use magnetar_sdk::testing::SimHost;
use magnetar_sdk::{ErrorKind, OutboundMessage, RouteSpec, SubMode};

const T0: u64 = 1_000_000;

fn host() -> SimHost<AmqpConnection> {
    SimHost::new(T0, AmqpConnection::new(Config::default(), T0))
}

fn frame(channel: u16, m: Method) -> Vec<u8> {
    let mut out = Vec::new();
    write_method(&mut out, channel, m);
    out
}

/// Every frame sent since the last call.
fn sent(h: &mut SimHost<AmqpConnection>) -> Vec<Frame> {
    let bytes = h.take_sent();
    let mut rest = &bytes[..];
    let mut frames = Vec::new();
    while let Some((f, used)) = Frame::check(rest, 0).expect("the server sends valid frames") {
        frames.push(f);
        rest = &rest[used..];
    }
    assert!(rest.is_empty(), "a partial frame was sent: {rest:?}");
    frames
}

fn start_ok(mechanism: &str, response: &[u8], failure_close: bool) -> Vec<u8> {
    let mut caps = FieldTable::default();
    caps.insert(
        "authentication_failure_close",
        FieldValue::Bool(failure_close),
    );
    let mut props = FieldTable::default();
    props.insert("capabilities", FieldValue::Table(caps));
    frame(
        0,
        Method::ConnectionStartOk(ConnectionStartOk {
            client_properties: props,
            mechanism: mechanism.into(),
            response: response.to_vec(),
            locale: "en_US".into(),
        }),
    )
}

fn close_code(frames: &[Frame]) -> Option<(u16, u16, String)> {
    frames.iter().find_map(|f| match f {
        Frame::Method(c, Method::ConnectionClose(m)) => {
            Some((*c, m.reply_code, m.reply_text.clone()))
        }
        _ => None,
    })
}

/// Header, start-ok, tune-ok (heartbeat `heartbeat` s), open of `/`: a running connection.
fn open(h: &mut SimHost<AmqpConnection>, heartbeat: u16) {
    h.data(&PROTOCOL_HEADER);
    let start = sent(h);
    assert!(
        matches!(&start[..], [Frame::Method(0, Method::ConnectionStart(s))]
        if s.version_major == 0 && s.version_minor == 9 && s.mechanisms == b"PLAIN AMQPLAIN")
    );
    h.data(&start_ok("PLAIN", b"\0guest\0guest", true));
    h.run();
    let tune = sent(h);
    assert!(
        matches!(&tune[..], [Frame::Method(0, Method::ConnectionTune(t))]
        if t.channel_max == 2047 && t.frame_max == 131_072 && t.heartbeat == 60)
    );
    h.data(&frame(
        0,
        Method::ConnectionTuneOk(ConnectionTuneOk {
            channel_max: 2047,
            frame_max: 131_072,
            heartbeat,
        }),
    ));
    h.data(&frame(
        0,
        Method::ConnectionOpen(ConnectionOpen {
            virtual_host: "/".into(),
            ..Default::default()
        }),
    ));
    assert!(matches!(
        &sent(h)[..],
        [Frame::Method(0, Method::ConnectionOpenOk(_))]
    ));
}

#[test]
fn handshake_authenticates_through_the_host_and_opens_channels() {
    let mut h = host();
    open(&mut h, 0);
    let creds = h.take_actions().into_iter().find_map(|a| match a {
        Action::Authenticate { creds, .. } => Some(creds),
        _ => None,
    });
    assert!(
        matches!(creds, Some(Credentials::Password(p)) if p.user == "guest" && p.password == b"guest")
    );
    h.data(&frame(1, Method::ChannelOpen(ChannelOpen::default())));
    h.data(&frame(2, Method::ChannelOpen(ChannelOpen::default())));
    assert_eq!(sent(&mut h).len(), 2);
    h.data(&frame(1, Method::ChannelClose(ChannelClose::default())));
    assert!(matches!(
        &sent(&mut h)[..],
        [Frame::Method(1, Method::ChannelCloseOk(_))]
    ));
    h.data(&frame(
        0,
        Method::ConnectionClose(ConnectionClose::default()),
    ));
    assert!(matches!(
        &sent(&mut h)[..],
        [Frame::Method(0, Method::ConnectionCloseOk(_))]
    ));
    assert!(h.closed().is_some());
}

#[test]
fn a_frame_split_anywhere_is_waited_for() {
    let mut h = host();
    open(&mut h, 0);
    let bytes = frame(1, Method::ChannelOpen(ChannelOpen::default()));
    for b in &bytes {
        h.data(&[*b]);
    }
    assert!(matches!(
        &sent(&mut h)[..],
        [Frame::Method(1, Method::ChannelOpenOk(_))]
    ));
}

#[test]
fn amqplain_credentials_are_read() {
    let mut entries = Vec::new();
    let mut t = FieldTable::default();
    t.insert("LOGIN", FieldValue::LongStr(b"guest".to_vec()))
        .insert("PASSWORD", FieldValue::LongStr(b"pw".to_vec()));
    t.write(&mut crate::codec::wire::Put::new(&mut entries));
    let creds = amqplain_credentials(&entries[4..]).unwrap();
    assert_eq!(
        (creds.user.as_str(), creds.password.as_slice()),
        ("guest", &b"pw"[..])
    );
    assert!(plain_credentials(b"nonul").is_none());
}

#[test]
fn garbage_instead_of_the_header_gets_the_header_and_a_close() {
    let mut h = host();
    h.data(b"GET / HT");
    assert_eq!(h.take_sent(), PROTOCOL_HEADER);
    assert!(h.closed().is_some());
}

#[test]
fn refused_credentials_close_with_403_or_hang_up() {
    let refused = || {
        host().with_auth(Err(OpError {
            kind: ErrorKind::NotAuthorized,
            message: "bad password".into(),
        }))
    };
    let mut h = refused();
    h.data(&PROTOCOL_HEADER);
    sent(&mut h);
    h.data(&start_ok("PLAIN", b"\0guest\0wrong", true));
    h.run();
    let (channel, code, text) = close_code(&sent(&mut h)).unwrap();
    assert_eq!((channel, code), (0, 403));
    assert!(
        text.starts_with("ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN")
    );
    // Without the capability, RabbitMQ just closes the socket.
    let mut h = refused();
    h.data(&PROTOCOL_HEADER);
    sent(&mut h);
    h.data(&start_ok("PLAIN", b"\0guest\0wrong", false));
    h.run();
    assert!(sent(&mut h).is_empty());
    assert!(h.closed().is_some());
}

#[test]
fn unknown_vhost_is_refused_with_530() {
    let mut h = host();
    h.data(&PROTOCOL_HEADER);
    h.data(&start_ok("PLAIN", b"\0guest\0guest", true));
    h.run();
    h.data(&frame(
        0,
        Method::ConnectionTuneOk(ConnectionTuneOk::default()),
    ));
    sent(&mut h);
    h.data(&frame(
        0,
        Method::ConnectionOpen(ConnectionOpen {
            virtual_host: "other".into(),
            ..Default::default()
        }),
    ));
    let (_, code, text) = close_code(&sent(&mut h)).unwrap();
    assert_eq!(
        (code, text.as_str()),
        (530, "NOT_ALLOWED - vhost other not found")
    );
    h.data(&frame(0, Method::ConnectionCloseOk(ConnectionCloseOk {})));
    assert!(h.closed().is_some());
}

#[test]
fn the_namespace_name_is_a_vhost_too() {
    let mut h = host();
    h.data(&PROTOCOL_HEADER);
    h.data(&start_ok("PLAIN", b"\0guest\0guest", true));
    h.run();
    h.data(&frame(
        0,
        Method::ConnectionTuneOk(ConnectionTuneOk::default()),
    ));
    sent(&mut h);
    h.data(&frame(
        0,
        Method::ConnectionOpen(ConnectionOpen {
            virtual_host: "ns".into(),
            ..Default::default()
        }),
    ));
    assert!(matches!(
        &sent(&mut h)[..],
        [Frame::Method(0, Method::ConnectionOpenOk(_))]
    ));
}

#[test]
fn hostile_frames_close_the_connection_with_rabbitmqs_codes() {
    // Bad frame end: 501.
    let mut h = host();
    open(&mut h, 0);
    let mut bad = frame(1, Method::ChannelOpen(ChannelOpen::default()));
    let last = bad.len() - 1;
    bad[last] = 0;
    h.data(&bad);
    assert_eq!(close_code(&sent(&mut h)).map(|c| c.1), Some(501));
    h.data(&frame(0, Method::ConnectionCloseOk(ConnectionCloseOk {})));
    assert!(h.closed().is_some());
    // A method on a channel never opened: 504.
    let mut h = host();
    open(&mut h, 0);
    h.data(&frame(3, Method::BasicQos(BasicQos::default())));
    assert_eq!(close_code(&sent(&mut h)).map(|c| c.1), Some(504));
    // A frame larger than frame-max: 501, and frames after the close are ignored.
    let mut h = host();
    open(&mut h, 0);
    h.data(b"\x01\x00\x01\xff\xff\xff\xff");
    assert_eq!(close_code(&sent(&mut h)).map(|c| c.1), Some(501));
    h.data(&frame(1, Method::ChannelOpen(ChannelOpen::default())));
    assert!(sent(&mut h).is_empty());
    // Nobody answers the close: the socket closes after the timeout.
    h.advance(CLOSE_TIMEOUT_MS);
    assert!(h.closed().is_some());
    // A second channel.open: 504; content without a method: 505.
    let mut h = host();
    open(&mut h, 0);
    h.data(&frame(1, Method::ChannelOpen(ChannelOpen::default())));
    h.data(&frame(1, Method::ChannelOpen(ChannelOpen::default())));
    assert_eq!(close_code(&sent(&mut h)).map(|c| c.1), Some(504));
    let mut h = host();
    open(&mut h, 0);
    h.data(&frame(1, Method::ChannelOpen(ChannelOpen::default())));
    let mut body = Vec::new();
    Frame::Body(1, b"x".to_vec()).write(&mut body);
    h.data(&body);
    assert_eq!(close_code(&sent(&mut h)).map(|c| c.1), Some(505));
}

#[test]
fn heartbeats_are_sent_and_a_silent_client_is_dropped() {
    let mut h = host();
    open(&mut h, 2);
    h.advance(1000);
    assert_eq!(sent(&mut h), vec![Frame::Heartbeat]);
    // The client's own heartbeats keep it alive.
    for _ in 0..6 {
        let mut hb = Vec::new();
        Frame::Heartbeat.write(&mut hb);
        h.data(&hb);
        h.advance(1000);
    }
    assert!(h.closed().is_none());
    h.advance(5000);
    assert!(h.closed().unwrap().contains("heartbeat"));
}

#[test]
fn the_handshake_has_a_deadline() {
    let mut h = host();
    h.data(b"AMQ");
    h.advance(Config::default().handshake_timeout_ms);
    assert!(h.closed().is_some());
}

// ---- exchanges, queues, messages ---------------------------------------------------------

fn running() -> SimHost<AmqpConnection> {
    let mut h = host();
    open(&mut h, 0);
    h.data(&frame(1, Method::ChannelOpen(ChannelOpen::default())));
    sent(&mut h);
    h.take_actions();
    h
}

/// Consumes queue `q` on channel 1 as `c`; what that sent and asked of the host is cleared.
fn consume_q(h: &mut SimHost<AmqpConnection>) {
    h.data(&frame(
        1,
        Method::BasicConsume(BasicConsume {
            queue: "q".into(),
            consumer_tag: "c".into(),
            ..Default::default()
        }),
    ));
    h.run();
    sent(h);
    h.take_actions();
}

/// Cancels the consumer `c` of channel 1; what that sent is cleared.
fn cancel_c(h: &mut SimHost<AmqpConnection>) {
    h.data(&frame(
        1,
        Method::BasicCancel(BasicCancel {
            consumer_tag: "c".into(),
            no_wait: false,
        }),
    ));
    h.run();
    sent(h);
}

/// A running connection consuming queue `q` (channel 1), whose record has `argument` and the
/// dead-letter exchange `dlx`: the host and the consumer's subscription.
fn consuming_with_dead_letters(
    argument: &str,
    value: FieldValue,
) -> (SimHost<AmqpConnection>, u64) {
    let mut h = running();
    let mut queue = crate::topology::Queue::default();
    queue.arguments.insert(argument, value).insert(
        "x-dead-letter-exchange",
        FieldValue::LongStr(b"dlx".to_vec()),
    );
    h.kv_mut().insert("amqp/q/q".into(), queue.encode());
    consume_q(&mut h);
    let sub = *h.machine().consumers.keys().next().unwrap();
    (h, sub)
}

fn channel_close_code(frames: &[Frame]) -> Option<(u16, String)> {
    frames.iter().find_map(|f| match f {
        Frame::Method(1, Method::ChannelClose(m)) => Some((m.reply_code, m.reply_text.clone())),
        _ => None,
    })
}

#[test]
fn a_queue_is_a_durable_route_whose_filters_are_its_bindings() {
    let mut h = running();
    h.data(&frame(
        1,
        Method::QueueDeclare(QueueDeclare {
            queue: "jobs".into(),
            durable: true,
            ..Default::default()
        }),
    ));
    h.run();
    assert!(
        matches!(&sent(&mut h)[..], [Frame::Method(1, Method::QueueDeclareOk(ok))] if ok.queue == "jobs")
    );
    let stored = h.kv().get("amqp/q/jobs").cloned().unwrap();
    assert!(crate::topology::Queue::decode(&stored).unwrap().durable);
    h.data(&frame(
        1,
        Method::QueueBind(QueueBind {
            queue: "jobs".into(),
            exchange: "amq.topic".into(),
            routing_key: "a.*".into(),
            ..Default::default()
        }),
    ));
    h.run();
    assert!(matches!(
        &sent(&mut h)[..],
        [Frame::Method(1, Method::QueueBindOk(_))]
    ));
    let actions = h.take_actions();
    // Stored without a reader of the queue (which could take, and so redeliver, a message).
    assert!(!actions
        .iter()
        .any(|a| matches!(a, Action::OpenCappedRoute { .. } | Action::OpenRoute { .. })));
    let routes: Vec<RouteSpec> = actions
        .into_iter()
        .filter_map(|a| match a {
            Action::StoreRoute { spec, .. } => Some(spec),
            _ => None,
        })
        .collect();
    let last = routes.last().unwrap();
    assert_eq!(last.source, "amqp");
    assert_eq!(last.queue.as_deref(), Some("amqp-q-jobs"));
    assert_eq!(last.key_property.as_deref(), Some("amqp.key"));
    assert_eq!(
        last.filters,
        [
            magnetar_sdk::Filter::Exact("%.jobs".into()),
            magnetar_sdk::Filter::AmqpTopic("amq%2Etopic.a.*".into())
        ]
    );
    // Declared again with another durability: 406 on the channel only.
    h.data(&frame(
        1,
        Method::QueueDeclare(QueueDeclare {
            queue: "jobs".into(),
            ..Default::default()
        }),
    ));
    h.run();
    let (code, text) = channel_close_code(&sent(&mut h)).unwrap();
    assert_eq!(code, 406);
    assert!(text.contains("inequivalent arg 'durable'"), "{text}");
    assert!(h.closed().is_none());
}

#[test]
fn frames_wait_while_a_declaration_waits_for_the_host() {
    let mut h = running();
    let mut bytes = frame(
        1,
        Method::QueueDeclare(QueueDeclare {
            queue: "q".into(),
            passive: true,
            ..Default::default()
        }),
    );
    bytes.extend(frame(2, Method::ChannelOpen(ChannelOpen::default())));
    h.data(&bytes);
    // The kv read is pending: channel 2 is not opened before the 404 of channel 1.
    assert!(sent(&mut h).is_empty());
    h.run();
    let frames = sent(&mut h);
    assert_eq!(channel_close_code(&frames).map(|c| c.0), Some(404));
    assert!(matches!(
        frames.last(),
        Some(Frame::Method(2, Method::ChannelOpenOk(_)))
    ));
}

#[test]
fn a_publish_carries_its_key_and_properties_and_confirms_once_stored() {
    let mut h = running();
    h.data(&frame(1, Method::ConfirmSelect(ConfirmSelect::default())));
    sent(&mut h);
    let props = BasicProperties {
        content_type: Some("text/plain".into()),
        delivery_mode: Some(2),
        ..Default::default()
    };
    let mut raw = Vec::new();
    props.write(&mut raw);
    let mut bytes = frame(
        1,
        Method::BasicPublish(BasicPublish {
            exchange: "amq.direct".into(),
            routing_key: "k".into(),
            ..Default::default()
        }),
    );
    Frame::Header(
        1,
        ContentHeader {
            class_id: 60,
            body_size: 5,
            properties: raw.clone(),
        },
    )
    .write(&mut bytes);
    Frame::Body(1, b"he".to_vec()).write(&mut bytes);
    Frame::Body(1, b"llo".to_vec()).write(&mut bytes);
    h.data(&bytes);
    assert!(
        sent(&mut h).is_empty(),
        "no confirm before the backend stored it"
    );
    h.run();
    assert!(
        matches!(&sent(&mut h)[..], [Frame::Method(1, Method::BasicAck(a))] if a.delivery_tag == 1)
    );
    let msg = &h.published()[0];
    assert_eq!(
        (msg.topic.as_str(), msg.payload.as_slice()),
        ("amqp", &b"hello"[..])
    );
    let prop = |k: &str| {
        msg.properties
            .iter()
            .find(|p| p.key == k)
            .map(|p| p.value.clone())
    };
    assert_eq!(prop("amqp.key").as_deref(), Some("amq%2Edirect.k"));
    assert_eq!(prop("amqp.properties"), Some(crate::topology::hex(&raw)));
}

#[test]
fn deliveries_carry_the_original_properties_and_acks_settle_them() {
    let mut h = running();
    h.kv_mut().insert(
        "amqp/q/q".into(),
        crate::topology::Queue::default().encode(),
    );
    h.data(&frame(
        1,
        Method::BasicConsume(BasicConsume {
            queue: "q".into(),
            consumer_tag: "c1".into(),
            ..Default::default()
        }),
    ));
    h.run();
    assert!(
        matches!(&sent(&mut h)[..], [Frame::Method(1, Method::BasicConsumeOk(c))] if c.consumer_tag == "c1")
    );
    let sub = *h.machine().consumers.keys().next().unwrap();
    let raw = vec![0x80, 0x00, 4, b't', b'e', b'x', b't'];
    let message = |id: u64, redelivery_count: u32| magnetar_sdk::Message {
        subscription: sub,
        delivery_id: id,
        message_id: vec![],
        key: None,
        payload: b"body".to_vec(),
        properties: vec![
            magnetar_sdk::Property {
                key: "amqp.exchange".into(),
                value: "amq.direct".into(),
            },
            magnetar_sdk::Property {
                key: "amqp.routing-key".into(),
                value: "k".into(),
            },
            magnetar_sdk::Property {
                key: "amqp.properties".into(),
                value: crate::topology::hex(&raw),
            },
        ],
        publish_time_ms: 0,
        event_time_ms: None,
        redelivery_count,
    };
    h.feed(Event::Message(message(7, 0)));
    h.feed(Event::Message(message(8, 1)));
    let frames = sent(&mut h);
    assert!(
        matches!(&frames[0], Frame::Method(1, Method::BasicDeliver(d))
        if d.delivery_tag == 1 && !d.redelivered && d.exchange == "amq.direct" && d.consumer_tag == "c1")
    );
    assert!(
        matches!(&frames[1], Frame::Header(1, hdr) if hdr.properties == raw && hdr.body_size == 4)
    );
    assert!(matches!(&frames[2], Frame::Body(1, b) if b == b"body"));
    assert!(
        matches!(&frames[3], Frame::Method(1, Method::BasicDeliver(d)) if d.delivery_tag == 2 && d.redelivered)
    );
    h.take_actions();
    h.data(&frame(
        1,
        Method::BasicNack(BasicNack {
            delivery_tag: 2,
            multiple: true,
            requeue: true,
        }),
    ));
    let actions = h.take_actions();
    assert!(actions
        .iter()
        .any(|a| matches!(a, Action::Nack { delivery_id: 7, .. })));
    assert!(actions
        .iter()
        .any(|a| matches!(a, Action::Nack { delivery_id: 8, .. })));
    // Settled already: an unknown tag, 406 on the channel.
    h.data(&frame(
        1,
        Method::BasicAck(BasicAck {
            delivery_tag: 1,
            multiple: false,
        }),
    ));
    assert_eq!(channel_close_code(&sent(&mut h)).map(|c| c.0), Some(406));
}

#[test]
fn an_unroutable_mandatory_message_is_returned_then_confirmed() {
    let mut h = running();
    h.data(&frame(1, Method::ConfirmSelect(ConfirmSelect::default())));
    sent(&mut h);
    // A queue bound to amq.direct with key "a" only.
    let queue = crate::topology::Queue {
        bindings: vec![crate::topology::Binding {
            exchange: "amq.direct".into(),
            kind: crate::topology::ExchangeType::Direct,
            routing_key: "a".into(),
            arguments: FieldTable::default(),
            via: Vec::new(),
        }],
        ..Default::default()
    };
    h.kv_mut().insert("amqp/q/q".into(), queue.encode());
    let publish = |key: &str| {
        let mut bytes = frame(
            1,
            Method::BasicPublish(BasicPublish {
                exchange: "amq.direct".into(),
                routing_key: key.into(),
                mandatory: true,
                ..Default::default()
            }),
        );
        Frame::Header(
            1,
            ContentHeader {
                class_id: 60,
                body_size: 1,
                properties: vec![0, 0],
            },
        )
        .write(&mut bytes);
        Frame::Body(1, b"x".to_vec()).write(&mut bytes);
        bytes
    };
    h.data(&publish("b"));
    h.run();
    let frames = sent(&mut h);
    assert!(
        matches!(&frames[0], Frame::Method(1, Method::BasicReturn(r)) if r.reply_code == 312 && r.routing_key == "b")
    );
    assert!(matches!(&frames[1], Frame::Header(1, _)));
    assert!(matches!(&frames[2], Frame::Body(1, b) if b == b"x"));
    assert!(matches!(&frames[3], Frame::Method(1, Method::BasicAck(a)) if a.delivery_tag == 1));
    assert!(h.published().is_empty());
    h.data(&publish("a"));
    h.run();
    assert!(
        matches!(&sent(&mut h)[..], [Frame::Method(1, Method::BasicAck(a))] if a.delivery_tag == 2)
    );
    assert_eq!(h.published().len(), 1);
}

/// A running connection whose namespace has the queue `q`.
fn with_queue_q() -> SimHost<AmqpConnection> {
    let mut h = running();
    h.kv_mut().insert(
        "amqp/q/q".into(),
        crate::topology::Queue::default().encode(),
    );
    h
}

/// Completes the host's operations in order until one that `pick` names is pending, then
/// fails that one as the backend would, with `message`.
fn fail_when_pending(
    h: &mut SimHost<AmqpConnection>,
    pick: impl Fn(&Action) -> Option<u64>,
    message: &str,
) {
    let token = loop {
        if let Some(token) = h.pending().iter().find_map(&pick) {
            break token;
        }
        assert!(h.complete_next(), "never asked for: {message}");
    };
    let error = OpError {
        kind: ErrorKind::Backend,
        message: message.into(),
    };
    assert!(h.fail(token, error));
}

/// The routing keys (`amqp.key`) of the dead-lettered messages among `actions`.
fn dead_letter_keys(actions: &[Action]) -> Vec<String> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::PublishCapped { msg, .. } => msg
                .properties
                .iter()
                .find(|p| p.key == "amqp.key")
                .map(|p| p.value.clone()),
            _ => None,
        })
        .collect()
}

/// The mode and window of each consumer `actions` open.
fn opened_consumers(actions: &[Action]) -> Vec<(SubMode, u32)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::OpenConsumer { spec, .. } => Some((spec.mode, spec.max_unacked)),
            _ => None,
        })
        .collect()
}

/// A queue's message `m` for the consumer `sub`.
fn queued(sub: SubId, delivery_id: u64) -> Event {
    Event::Message(magnetar_sdk::Message {
        subscription: sub,
        delivery_id,
        message_id: vec![],
        key: None,
        payload: b"m".to_vec(),
        properties: vec![],
        publish_time_ms: 0,
        event_time_ms: None,
        redelivery_count: 0,
    })
}

/// `basic.get` of the queue `q` on channel 1.
fn get() -> Vec<u8> {
    frame(
        1,
        Method::BasicGet(BasicGet {
            queue: "q".into(),
            ..Default::default()
        }),
    )
}

#[test]
fn basic_get_answers_a_waiting_message_or_get_empty_at_once_or_after_its_wait() {
    let mut h = with_queue_q();
    // The queue counts no message: get-empty at once.
    h.data(&get());
    h.run();
    assert!(matches!(
        &sent(&mut h)[..],
        [Frame::Method(1, Method::BasicGetEmpty(_))]
    ));
    // The backend cannot count it: the get waits for a message, then says get-empty.
    h.data(&get());
    fail_when_pending(
        &mut h,
        |a| match a {
            Action::QueueBacklog { token, .. } => Some(*token),
            _ => None,
        },
        "held",
    );
    h.run();
    assert!(sent(&mut h).is_empty(), "waiting for a message");
    h.advance(channel::GET_FIRST_WAIT_MS);
    assert!(matches!(
        &sent(&mut h)[..],
        [Frame::Method(1, Method::BasicGetEmpty(_))]
    ));
    // A message arrives for the getter's consumer while nobody asks: the next get takes it.
    let sub = *h.machine().getters.keys().next().unwrap();
    h.feed(queued(sub, 3));
    h.data(&get());
    h.run();
    let frames = sent(&mut h);
    assert!(matches!(&frames[0], Frame::Method(1, Method::BasicGetOk(ok)) if ok.delivery_tag == 1));
    assert!(matches!(&frames[2], Frame::Body(1, b) if b == b"m"));
    h.data(&frame(
        1,
        Method::BasicAck(BasicAck {
            delivery_tag: 1,
            multiple: false,
        }),
    ));
    h.run();
    assert!(h.take_actions().iter().any(
        |a| matches!(a, Action::AckMany { delivery_ids, .. } if delivery_ids == &[3])
            || matches!(a, Action::Ack { delivery_id: 3, .. })
    ));
}

/// A `basic.get` of `q` closes channel 1 with 404 NOT_FOUND.
fn assert_get_is_404(h: &mut SimHost<AmqpConnection>) {
    h.data(&get());
    h.run();
    assert!(matches!(
        &sent(h)[..],
        [Frame::Method(1, Method::ChannelClose(c))] if c.reply_code == 404
    ));
}

#[test]
fn a_polling_channel_reads_its_queues_record_once_a_second_and_again_once_deleted() {
    let mut h = with_queue_q();
    let records_read = |h: &mut SimHost<AmqpConnection>| {
        h.take_actions()
            .iter()
            .filter(|a| matches!(a, Action::KvGet { key, .. } if key == "amqp/q/q"))
            .count()
    };
    let empty = |h: &mut SimHost<AmqpConnection>| {
        matches!(&sent(h)[..], [Frame::Method(1, Method::BasicGetEmpty(_))])
    };
    // The first get reads the record; the next ones within a second do not.
    for _ in 0..3 {
        h.data(&get());
        h.run();
        assert!(empty(&mut h));
    }
    assert_eq!(records_read(&mut h), 1);
    // Another connection deletes the queue: gets learn it once their record is a second old.
    h.kv_mut().remove("amqp/q/q");
    h.advance(channel::GET_RECORD_FRESH_MS);
    h.take_actions();
    assert_get_is_404(&mut h);
    assert_eq!(records_read(&mut h), 1);
}

#[test]
fn a_queue_this_connection_deletes_is_404_to_its_next_get_at_once() {
    let mut h = with_queue_q();
    h.data(&get());
    h.run();
    sent(&mut h);
    h.data(&frame(
        1,
        Method::QueueDelete(QueueDelete {
            queue: "q".into(),
            ..Default::default()
        }),
    ));
    h.run();
    sent(&mut h);
    assert_get_is_404(&mut h);
}

#[test]
fn gets_that_hold_their_messages_open_one_more_getter_closed_once_settled() {
    let mut h = with_queue_q();
    let got = |h: &mut SimHost<AmqpConnection>| match &sent(h)[..] {
        [Frame::Method(1, Method::BasicGetOk(ok)), ..] => Some(ok.delivery_tag),
        [Frame::Method(1, Method::BasicGetEmpty(_))] => None,
        other => panic!("{other:?}"),
    };
    // The first get opens the getter's consumer.
    h.data(&get());
    h.run();
    assert_eq!(got(&mut h), None);
    let first = *h.machine().getters.keys().next().unwrap();
    // Its message is got and held unacknowledged: the next get opens one more consumer.
    h.feed(queued(first, 1));
    h.data(&get());
    h.run();
    assert_eq!(got(&mut h), Some(1));
    h.data(&get());
    h.run();
    assert_eq!(
        got(&mut h),
        None,
        "nothing came for the second consumer yet"
    );
    assert_eq!(h.machine().getters.len(), 2);
    let second = *h.machine().getters.keys().find(|s| **s != first).unwrap();
    h.feed(queued(second, 2));
    h.data(&get());
    h.run();
    assert_eq!(got(&mut h), Some(2));
    // Settled, the second consumer closes; the first stays.
    h.take_actions();
    h.data(&frame(
        1,
        Method::BasicAck(BasicAck {
            delivery_tag: 2,
            multiple: false,
        }),
    ));
    h.run();
    assert!(h
        .take_actions()
        .iter()
        .any(|a| matches!(a, Action::Unsubscribe { sub, .. } if *sub == second)));
    assert_eq!(h.machine().getters.keys().collect::<Vec<_>>(), [&first]);
}

#[test]
fn heartbeats_count_while_a_method_waits_for_the_host() {
    let mut h = host();
    open(&mut h, 2);
    h.data(&frame(1, Method::ChannelOpen(ChannelOpen::default())));
    // A declaration whose kv read never completes: frames behind it wait undecoded.
    h.data(&frame(
        1,
        Method::QueueDeclare(QueueDeclare {
            queue: "q".into(),
            ..Default::default()
        }),
    ));
    for _ in 0..8 {
        let mut hb = Vec::new();
        Frame::Heartbeat.write(&mut hb);
        h.data(&hb);
        h.advance(1000);
    }
    assert!(h.closed().is_none(), "the client's heartbeats arrived");
}

#[test]
fn expired_and_rejected_messages_go_to_the_dead_letter_exchange_and_recover_requeues() {
    let (mut h, sub) = consuming_with_dead_letters("x-message-ttl", FieldValue::I32(1000));
    let message = |id: u64, publish_time_ms: u64| magnetar_sdk::Message {
        subscription: sub,
        delivery_id: id,
        message_id: vec![],
        key: None,
        payload: b"body".to_vec(),
        properties: vec![magnetar_sdk::Property {
            key: "amqp.routing-key".into(),
            value: "q".into(),
        }],
        publish_time_ms,
        event_time_ms: None,
        redelivery_count: 0,
    };
    // Older than the queue's TTL: not delivered, dead-lettered with its own routing key.
    h.feed(Event::Message(message(7, T0 - 5000)));
    assert!(sent(&mut h).is_empty());
    assert_eq!(dead_letter_keys(&h.take_actions()), ["dlx.q"]);
    // Fresh: delivered; rejected without requeue: dead-lettered.
    h.feed(Event::Message(message(8, T0)));
    h.feed(Event::Message(message(9, T0)));
    assert_eq!(sent(&mut h).len(), 6);
    h.take_actions();
    h.data(&frame(
        1,
        Method::BasicReject(BasicReject {
            delivery_tag: 1,
            requeue: false,
        }),
    ));
    assert_eq!(dead_letter_keys(&h.take_actions()), ["dlx.q"]);
    // Recover: the one left is given back.
    h.data(&frame(
        1,
        Method::BasicRecover(BasicRecover { requeue: true }),
    ));
    assert!(matches!(
        &sent(&mut h)[..],
        [Frame::Method(1, Method::BasicRecoverOk(_))]
    ));
    let nacked: Vec<u64> = h
        .take_actions()
        .iter()
        .filter_map(|a| match a {
            Action::Nack { delivery_id, .. } => Some(*delivery_id),
            _ => None,
        })
        .collect();
    assert_eq!(nacked, [9]);
}

#[test]
fn another_connections_exclusive_queue_is_locked_while_its_lease_lasts_then_gone() {
    let mut h = running();
    let queue = crate::topology::Queue {
        exclusive: true,
        owner: Some("someone-else".into()),
        ..Default::default()
    };
    h.kv_mut().insert("amqp/q/q".into(), queue.encode());
    let lease = |until: u64| until.to_be_bytes().to_vec();
    h.kv_mut()
        .insert("amqp/c/someone-else".into(), lease(T0 + 10_000));
    let passive = |channel| {
        frame(
            channel,
            Method::QueueDeclare(QueueDeclare {
                queue: "q".into(),
                passive: true,
                ..Default::default()
            }),
        )
    };
    h.data(&passive(1));
    h.run();
    assert!(matches!(
        &sent(&mut h)[..],
        [Frame::Method(1, Method::ChannelClose(c))] if c.reply_code == RESOURCE_LOCKED
    ));
    // The owner did not renew its lease: the queue went with it.
    h.kv_mut()
        .insert("amqp/c/someone-else".into(), lease(T0 - 1));
    h.data(&frame(2, Method::ChannelOpen(ChannelOpen::default())));
    sent(&mut h);
    h.data(&passive(2));
    h.run();
    assert!(matches!(
        &sent(&mut h)[..],
        [Frame::Method(2, Method::ChannelClose(c))] if c.reply_code == NOT_FOUND
    ));
    assert!(!h.kv().contains_key("amqp/q/q"));
}

#[test]
fn an_exclusive_queue_is_owned_under_a_lease_and_deleted_at_close() {
    let mut h = running();
    h.data(&frame(
        1,
        Method::QueueDeclare(QueueDeclare {
            queue: "mine".into(),
            exclusive: true,
            ..Default::default()
        }),
    ));
    h.run();
    assert!(matches!(
        &sent(&mut h)[..],
        [Frame::Method(1, Method::QueueDeclareOk(_))]
    ));
    let stored = crate::topology::Queue::decode(&h.kv()["amqp/q/mine"]).unwrap();
    let owner = stored.owner.expect("an exclusive queue has its owner");
    let until = crate::topology::lease_until(&h.kv()[&format!("amqp/c/{owner}")]).unwrap();
    assert_eq!(until, T0 + Config::default().exclusive_lease_ms);
    // Renewed before it runs out.
    h.advance(Config::default().exclusive_lease_ms / 3 + 1);
    h.run();
    let until = crate::topology::lease_until(&h.kv()[&format!("amqp/c/{owner}")]).unwrap();
    assert!(until > T0 + Config::default().exclusive_lease_ms);
    h.data(&frame(
        0,
        Method::ConnectionClose(ConnectionClose::default()),
    ));
    h.run();
    assert!(matches!(
        &sent(&mut h)[..],
        [Frame::Method(0, Method::ConnectionCloseOk(_))]
    ));
    assert!(!h.kv().contains_key("amqp/q/mine"));
    assert!(!h.kv().contains_key(&format!("amqp/c/{owner}")));
}

#[test]
fn guest_logs_in_from_loopback_only_and_falls_back_to_anonymous() {
    // From elsewhere: refused before any password is checked (RabbitMQ's loopback_users).
    let mut h = host();
    h.machine_mut().set_loopback(false);
    h.data(&PROTOCOL_HEADER);
    sent(&mut h);
    h.data(&start_ok("PLAIN", b"\0guest\0guest", true));
    h.run();
    assert!(matches!(close_code(&sent(&mut h)), Some((0, 403, _))));
    assert!(!h
        .take_actions()
        .iter()
        .any(|a| matches!(a, Action::Authenticate { .. })));
    // From loopback, a host that does not know `guest`: tried as anonymous.
    let refused = Err(OpError {
        kind: ErrorKind::NotAuthorized,
        message: "unknown user".into(),
    });
    let mut h = host().with_auth(refused);
    h.data(&PROTOCOL_HEADER);
    sent(&mut h);
    h.data(&start_ok("PLAIN", b"\0guest\0guest", true));
    h.run();
    let creds: Vec<Credentials> = h
        .take_actions()
        .into_iter()
        .filter_map(|a| match a {
            Action::Authenticate { creds, .. } => Some(creds),
            _ => None,
        })
        .collect();
    assert!(matches!(
        &creds[..],
        [Credentials::Password(p), Credentials::Anonymous] if p.user == "guest"
    ));
}

#[test]
fn delete_if_unused_or_if_empty_refuses_a_used_or_full_queue_with_406() {
    let mut h = running();
    let declare = |channel| {
        frame(
            channel,
            Method::QueueDeclare(QueueDeclare {
                queue: "q".into(),
                ..Default::default()
            }),
        )
    };
    let delete = |channel, if_unused, if_empty| {
        frame(
            channel,
            Method::QueueDelete(QueueDelete {
                queue: "q".into(),
                if_unused,
                if_empty,
                ..Default::default()
            }),
        )
    };
    h.data(&declare(1));
    h.run();
    sent(&mut h);
    // A consumer of this connection: in use.
    h.data(&frame(
        1,
        Method::BasicConsume(BasicConsume {
            queue: "q".into(),
            consumer_tag: "c".into(),
            ..Default::default()
        }),
    ));
    h.run();
    sent(&mut h);
    h.data(&frame(2, Method::ChannelOpen(ChannelOpen::default())));
    h.data(&delete(2, true, false));
    h.run();
    assert!(matches!(
        &sent(&mut h)[..],
        [Frame::Method(2, Method::ChannelOpenOk(_)), Frame::Method(2, Method::ChannelClose(c))]
        if c.reply_code == PRECONDITION_FAILED && c.reply_text == "PRECONDITION_FAILED - queue 'q' in vhost '/' in use"
    ));
    h.data(&frame(2, Method::ChannelCloseOk(ChannelCloseOk {})));
    cancel_c(&mut h);
    // A message waits in the queue: the route that checks it is handed it.
    h.produce(magnetar_sdk::OutboundMessage {
        topic: "amqp".into(),
        key: None,
        payload: b"waiting".to_vec(),
        properties: vec![magnetar_sdk::Property {
            key: "amqp.key".into(),
            value: "%.q".into(),
        }],
    });
    h.data(&frame(3, Method::ChannelOpen(ChannelOpen::default())));
    h.data(&delete(3, true, true));
    h.run();
    let frames = sent(&mut h);
    assert!(
        matches!(&frames[..], [Frame::Method(3, Method::ChannelOpenOk(_)), Frame::Method(3, Method::ChannelClose(c))]
        if c.reply_text.ends_with("not empty")),
        "{frames:?}"
    );
    assert!(h.kv().contains_key("amqp/q/q"));
    // Without conditions it goes.
    h.data(&delete(1, false, false));
    h.run();
    assert!(matches!(
        &sent(&mut h)[..],
        [Frame::Method(1, Method::QueueDeleteOk(_))]
    ));
    assert!(!h.kv().contains_key("amqp/q/q"));
}

#[test]
fn delete_if_empty_of_a_queue_that_counts_nothing_answers_without_a_wait() {
    let mut h = running();
    for (name, if_unused) in [("a", false), ("b", true)] {
        h.data(&frame(
            1,
            Method::QueueDeclare(QueueDeclare {
                queue: name.into(),
                ..Default::default()
            }),
        ));
        h.run();
        sent(&mut h);
        h.take_actions();
        h.data(&frame(
            1,
            Method::QueueDelete(QueueDelete {
                queue: name.into(),
                if_unused,
                if_empty: true,
                ..Default::default()
            }),
        ));
        h.run();
        // No timer ran: the count said empty.
        assert!(
            matches!(
                &sent(&mut h)[..],
                [Frame::Method(1, Method::QueueDeleteOk(_))]
            ),
            "{name}"
        );
        assert!(!h.kv().contains_key(&format!("amqp/q/{name}")));
        // Without if-unused nothing looked at the queue.
        let looked = h
            .take_actions()
            .iter()
            .any(|a| matches!(a, Action::OpenConsumer { .. }));
        assert!(!looked || if_unused, "{name}");
    }
}

#[test]
fn consumers_of_a_queue_deleted_elsewhere_end_and_its_route_goes() {
    let mut h = running();
    h.data(&frame(
        1,
        Method::QueueDeclare(QueueDeclare {
            queue: "q".into(),
            ..Default::default()
        }),
    ));
    consume_q(&mut h);
    // Still there: nothing happens.
    h.advance(super::lifetime::WATCH_MS);
    h.run();
    assert!(!h
        .take_actions()
        .iter()
        .any(|a| matches!(a, Action::Unsubscribe { .. })));
    // Another connection deletes it.
    h.kv_mut().remove("amqp/q/q");
    h.advance(super::lifetime::WATCH_MS);
    h.run();
    let actions = h.take_actions();
    let unsubscribed: Vec<bool> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Unsubscribe { delete, .. } => Some(*delete),
            _ => None,
        })
        .collect();
    // The consumer closes, then the queue's route goes with its backlog.
    assert_eq!(unsubscribed, [false, true], "{actions:?}");
    // Its tag is free again on the channel: the consumer is gone.
    h.data(&frame(
        1,
        Method::BasicCancel(BasicCancel {
            consumer_tag: "c".into(),
            no_wait: false,
        }),
    ));
    h.run();
    assert!(matches!(
        &sent(&mut h)[..],
        [Frame::Method(1, Method::BasicCancelOk(_))]
    ));
}

#[test]
fn the_will_gives_up_the_lease_and_an_unconsumed_auto_delete_queue_goes() {
    let mut h = running();
    h.data(&frame(
        1,
        Method::QueueDeclare(QueueDeclare {
            queue: "mine".into(),
            exclusive: true,
            ..Default::default()
        }),
    ));
    h.run();
    sent(&mut h);
    let will = h.will().cloned().expect("a will with the lease");
    let lease = will.kv.expect("the lease's deletion");
    assert!(lease.key.starts_with("amqp/c/") && lease.value.is_none());
    assert!(h.kv().contains_key(&lease.key));
    assert_eq!(will.msg.topic, crate::topology::ENDED_TOPIC);
    // An auto-delete queue that had a consumer, none now (its connection went): the
    // backend lets this connection open its route, so the queue is gone.
    let queue = crate::topology::Queue {
        auto_delete: true,
        consumed: true,
        ..Default::default()
    };
    h.kv_mut().insert("amqp/q/auto".into(), queue.encode());
    h.data(&frame(
        1,
        Method::QueueDeclare(QueueDeclare {
            queue: "auto".into(),
            passive: true,
            ..Default::default()
        }),
    ));
    h.run();
    assert_eq!(
        channel_close_code(&sent(&mut h)).map(|c| c.0),
        Some(NOT_FOUND)
    );
    assert!(!h.kv().contains_key("amqp/q/auto"));
    // A clean close deletes the lease itself: no will left.
    h.data(&frame(
        0,
        Method::ConnectionClose(ConnectionClose::default()),
    ));
    h.run();
    assert!(h.will().is_none());
    assert!(!h.kv().contains_key(&lease.key));
}

/// A running connection whose namespace has the queue `q`, channel 1 with prefetch 1
/// (`global`: the channel's limit).
fn queue_q_with_prefetch_1(global: bool) -> SimHost<AmqpConnection> {
    let mut h = running();
    h.kv_mut().insert(
        "amqp/q/q".into(),
        crate::topology::Queue::default().encode(),
    );
    h.data(&frame(
        1,
        Method::BasicQos(BasicQos {
            prefetch_count: 1,
            global,
            ..Default::default()
        }),
    ));
    h
}

#[test]
fn a_global_prefetch_holds_deliveries_until_acks_open_the_channel() {
    let mut h = queue_q_with_prefetch_1(true);
    h.data(&frame(
        1,
        Method::BasicConsume(BasicConsume {
            queue: "q".into(),
            consumer_tag: "c".into(),
            ..Default::default()
        }),
    ));
    h.run();
    sent(&mut h);
    let sub = *h.machine().consumers.keys().next().unwrap();
    let message = |id: u64| body_message(sub, id);
    h.feed(Event::Message(message(7)));
    h.feed(Event::Message(message(8)));
    let delivered = |frames: &[Frame]| {
        frames
            .iter()
            .filter_map(|f| match f {
                Frame::Method(1, Method::BasicDeliver(d)) => Some(d.delivery_tag),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(delivered(&sent(&mut h)), [1]);
    h.data(&frame(
        1,
        Method::BasicAck(BasicAck {
            delivery_tag: 1,
            multiple: false,
        }),
    ));
    assert_eq!(delivered(&sent(&mut h)), [2]);
}

/// A message of `sub` with the body `body`, as the host hands it over.
fn body_message(sub: u64, id: u64) -> magnetar_sdk::Message {
    magnetar_sdk::Message {
        subscription: sub,
        delivery_id: id,
        message_id: vec![],
        key: None,
        payload: b"body".to_vec(),
        properties: vec![],
        publish_time_ms: 0,
        event_time_ms: None,
        redelivery_count: 0,
    }
}

/// What the machine asked of the host since the last call, but the bytes it sent.
fn host_calls(h: &mut SimHost<AmqpConnection>) -> Vec<Action> {
    h.take_actions()
        .into_iter()
        .filter(|a| !matches!(a, Action::Send(_)))
        .collect()
}

#[test]
fn a_cancelled_consumer_holding_a_delivery_is_drained_and_gives_back_what_comes_after() {
    let mut h = queue_q_with_prefetch_1(false);
    consume_q(&mut h);
    let sub = *h.machine().consumers.keys().next().unwrap();
    let message = |id: u64| body_message(sub, id);
    h.feed(Event::Message(message(7)));
    assert!(matches!(
        &sent(&mut h)[..],
        [Frame::Method(1, Method::BasicDeliver(d)), Frame::Header(..), Frame::Body(..)]
        if d.delivery_tag == 1
    ));
    h.data(&frame(
        1,
        Method::BasicCancel(BasicCancel {
            consumer_tag: "c".into(),
            no_wait: false,
        }),
    ));
    h.run();
    assert!(matches!(
        &sent(&mut h)[..],
        [Frame::Method(1, Method::BasicCancelOk(_))]
    ));
    // It keeps delivery 1 open, and takes nothing more from the queue (RabbitMQ's cancelled
    // consumer): the host asks the backend for nothing more.
    let actions = host_calls(&mut h);
    assert!(
        matches!(&actions[..], [Action::Drain { sub: s }] if *s == sub),
        "{actions:?}"
    );
    assert!(h.drained(sub));
    // What the host handed it before the drain goes back at once, unseen.
    h.feed(Event::Message(message(8)));
    assert!(sent(&mut h).is_empty());
    let actions = host_calls(&mut h);
    assert!(
        matches!(&actions[..], [Action::Nack { delivery_id: 8, .. }]),
        "{actions:?}"
    );
    // Delivery 1 requeued: given back, then the consumer closes.
    h.data(&frame(
        1,
        Method::BasicNack(BasicNack {
            delivery_tag: 1,
            multiple: false,
            requeue: true,
        }),
    ));
    let actions = host_calls(&mut h);
    assert!(
        matches!(&actions[..], [Action::Nack { delivery_id: 7, .. }, Action::Unsubscribe { sub: s, delete: false }] if *s == sub),
        "{actions:?}"
    );
}

#[test]
fn a_cancelled_consumer_gives_back_what_the_global_prefetch_held_for_it() {
    let mut h = queue_q_with_prefetch_1(true);
    consume_q(&mut h);
    let sub = *h.machine().consumers.keys().next().unwrap();
    for id in [7, 8] {
        h.feed(Event::Message(body_message(sub, id)));
    }
    sent(&mut h);
    h.data(&frame(
        1,
        Method::BasicCancel(BasicCancel {
            consumer_tag: "c".into(),
            no_wait: true,
        }),
    ));
    // Delivery 8 waited for the channel's limit: the client never sees it.
    let actions = host_calls(&mut h);
    assert!(
        matches!(
            &actions[..],
            [Action::Drain { .. }, Action::Nack { delivery_id: 8, .. }]
        ),
        "{actions:?}"
    );
    h.data(&frame(
        1,
        Method::BasicAck(BasicAck {
            delivery_tag: 1,
            multiple: false,
        }),
    ));
    assert!(sent(&mut h).is_empty(), "nothing more is delivered");
}

/// A publish of `body` to the default exchange with routing key `q`, on channel 1.
fn publish_to_q(body: &[u8]) -> Vec<u8> {
    let mut bytes = frame(
        1,
        Method::BasicPublish(BasicPublish {
            routing_key: "q".into(),
            ..Default::default()
        }),
    );
    Frame::Header(
        1,
        ContentHeader {
            class_id: 60,
            body_size: body.len() as u64,
            properties: vec![0, 0],
        },
    )
    .write(&mut bytes);
    Frame::Body(1, body.to_vec()).write(&mut bytes);
    bytes
}

/// The `x-death` reasons of the dead-lettered copies among `actions`, with their routing
/// keys.
fn dead_lettered(actions: &[Action]) -> Vec<(String, String)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::PublishCapped { msg, .. } => {
                let prop = |k: &str| {
                    msg.properties
                        .iter()
                        .find(|p| p.key == k)
                        .map(|p| p.value.clone())
                };
                let raw = crate::topology::unhex(&prop("amqp.properties")?)?;
                let props = BasicProperties::read(&raw).ok()?;
                let death = match props.headers?.get("x-death")? {
                    FieldValue::Array(a) => a.first().cloned()?,
                    _ => return None,
                };
                let FieldValue::Table(death) = death else {
                    return None;
                };
                let reason = death.get("reason")?.as_str()?.to_string();
                Some((reason, prop("amqp.key")?))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn every_route_of_a_queue_carries_its_cap() {
    let mut h = running();
    let mut args = FieldTable::default();
    args.insert("x-max-length", FieldValue::I32(2))
        .insert("x-max-length-bytes", FieldValue::I64(100))
        .insert(
            "x-overflow",
            FieldValue::LongStr(b"reject-publish-dlx".to_vec()),
        );
    h.data(&frame(
        1,
        Method::QueueDeclare(QueueDeclare {
            queue: "capped".into(),
            arguments: args,
            ..Default::default()
        }),
    ));
    h.data(&frame(
        1,
        Method::QueueDeclare(QueueDeclare {
            queue: "plain".into(),
            ..Default::default()
        }),
    ));
    h.run();
    let cap = |q: &str| h.caps().get(q).cloned();
    assert_eq!(
        cap("amqp-q-capped"),
        Some(Some(magnetar_sdk::Cap {
            max_length: Some(2),
            max_length_bytes: Some(100),
            overflow: magnetar_sdk::Overflow::RejectPublishDlx,
        }))
    );
    assert_eq!(cap("amqp-q-plain"), Some(None), "no cap, said so");
    assert!(h
        .take_actions()
        .iter()
        .all(|a| !matches!(a, Action::OpenRoute { .. })));
}

#[test]
fn a_publish_a_full_queue_refused_is_nacked_and_dead_lettered_by_a_dlx_queue() {
    let mut h = running();
    let mut queue = crate::topology::Queue::default();
    queue
        .arguments
        .insert("x-max-length", FieldValue::I32(1))
        .insert(
            "x-overflow",
            FieldValue::LongStr(b"reject-publish-dlx".to_vec()),
        )
        .insert(
            "x-dead-letter-exchange",
            FieldValue::LongStr(b"dlx".to_vec()),
        );
    h.kv_mut().insert("amqp/q/q".into(), queue.encode());
    h.data(&frame(1, Method::ConfirmSelect(ConfirmSelect::default())));
    sent(&mut h);
    // Taken: acked.
    h.data(&publish_to_q(b"one"));
    h.run();
    assert!(
        matches!(&sent(&mut h)[..], [Frame::Method(1, Method::BasicAck(a))] if a.delivery_tag == 1)
    );
    h.take_actions();
    // Refused by the full queue: stored all the same (other queues may take it), nacked,
    // and dead-lettered from the queue with reason `maxlen`.
    h.refuse_publishes(vec![magnetar_sdk::Refusal {
        queue: "amqp-q-q".into(),
        dead_letter: true,
    }]);
    h.data(&publish_to_q(b"two"));
    h.run();
    assert!(
        matches!(&sent(&mut h)[..], [Frame::Method(1, Method::BasicNack(n))] if n.delivery_tag == 2 && !n.multiple)
    );
    assert_eq!(
        dead_lettered(&h.take_actions()),
        [("maxlen".to_string(), "dlx.q".to_string())]
    );
    assert_eq!(
        h.published().len(),
        3,
        "two publishes and the dead-lettered copy"
    );
    // A plain `reject-publish` refusal: nacked, not dead-lettered.
    h.refuse_publishes(vec![magnetar_sdk::Refusal {
        queue: "amqp-q-q".into(),
        dead_letter: false,
    }]);
    h.data(&publish_to_q(b"three"));
    h.run();
    assert!(
        matches!(&sent(&mut h)[..], [Frame::Method(1, Method::BasicNack(n))] if n.delivery_tag == 3)
    );
    assert!(dead_lettered(&h.take_actions()).is_empty());
}

#[test]
fn a_delivery_the_cap_dropped_is_dead_lettered_instead_of_delivered() {
    let (mut h, sub) = consuming_with_dead_letters("x-max-length", FieldValue::I32(1));
    let message = |id: u64, dropped: bool| magnetar_sdk::Message {
        subscription: sub,
        delivery_id: id,
        message_id: vec![],
        key: None,
        payload: vec![id as u8],
        properties: [("amqp.routing-key", "q"), ("amqp.exchange", "")]
            .into_iter()
            .chain(dropped.then_some(("__magnetar.dropped", "maxlen")))
            .map(|(k, v)| magnetar_sdk::Property {
                key: k.into(),
                value: v.into(),
            })
            .collect(),
        publish_time_ms: T0,
        event_time_ms: None,
        redelivery_count: 0,
    };
    h.feed(Event::Message(message(1, true)));
    assert!(sent(&mut h).is_empty(), "not delivered");
    let actions = h.take_actions();
    assert_eq!(
        dead_lettered(&actions),
        [("maxlen".to_string(), "dlx.q".to_string())]
    );
    assert!(actions.iter().any(
        |a| matches!(a, Action::AckMany { delivery_ids, .. } if delivery_ids == &[1])
            || matches!(a, Action::Ack { delivery_id: 1, .. })
    ));
    h.feed(Event::Message(message(2, false)));
    assert!(matches!(
        &sent(&mut h)[..],
        [Frame::Method(1, Method::BasicDeliver(_)), ..]
    ));
}

#[test]
fn exchange_bind_stores_the_edge_and_gives_queues_its_bindings() {
    let mut h = running();
    let declare = |name: &str, kind: &str| {
        frame(
            1,
            Method::ExchangeDeclare(ExchangeDeclare {
                exchange: name.into(),
                kind: kind.into(),
                ..Default::default()
            }),
        )
    };
    h.data(&declare("src", "topic"));
    h.data(&declare("dst", "direct"));
    h.data(&frame(
        1,
        Method::QueueDeclare(QueueDeclare {
            queue: "q".into(),
            ..Default::default()
        }),
    ));
    h.data(&frame(
        1,
        Method::QueueBind(QueueBind {
            queue: "q".into(),
            exchange: "dst".into(),
            routing_key: "a.b".into(),
            ..Default::default()
        }),
    ));
    h.run();
    sent(&mut h);
    h.data(&frame(
        1,
        Method::ExchangeBind(ExchangeBind {
            destination: "dst".into(),
            source: "src".into(),
            routing_key: "a.*".into(),
            ..Default::default()
        }),
    ));
    h.run();
    assert!(matches!(
        &sent(&mut h)[..],
        [Frame::Method(1, Method::ExchangeBindOk(_))]
    ));
    let q = crate::topology::Queue::decode(&h.kv()["amqp/q/q"]).unwrap();
    assert_eq!(
        q.filters("q"),
        [
            magnetar_sdk::Filter::Exact("%.q".into()),
            magnetar_sdk::Filter::Exact("dst.a.b".into()),
            magnetar_sdk::Filter::Exact("src.a.b".into()),
        ]
    );
    // The route was stored with them.
    let last_route = h
        .take_actions()
        .into_iter()
        .filter_map(|a| match a {
            Action::StoreRoute { spec, .. } => Some(spec.filters),
            _ => None,
        })
        .next_back();
    assert_eq!(last_route.as_deref(), Some(&q.filters("q")[..]));
    // Unbound: the derived binding goes.
    h.data(&frame(
        1,
        Method::ExchangeUnbind(ExchangeUnbind {
            destination: "dst".into(),
            source: "src".into(),
            routing_key: "a.*".into(),
            ..Default::default()
        }),
    ));
    h.run();
    assert!(matches!(
        &sent(&mut h)[..],
        [Frame::Method(1, Method::ExchangeUnbindOk(_))]
    ));
    let q = crate::topology::Queue::decode(&h.kv()["amqp/q/q"]).unwrap();
    assert_eq!(q.filters("q").len(), 2);
}

#[test]
fn declare_ok_counts_the_queues_consumers_but_not_its_gets() {
    let mut h = with_queue_q();
    let consumers = |h: &mut SimHost<AmqpConnection>| {
        h.data(&frame(
            1,
            Method::QueueDeclare(QueueDeclare {
                queue: "q".into(),
                passive: true,
                ..Default::default()
            }),
        ));
        h.run();
        match &sent(h)[..] {
            [Frame::Method(1, Method::QueueDeclareOk(ok))] => ok.consumer_count,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(consumers(&mut h), 0);
    consume_q(&mut h);
    // A get's consumer of the queue is not a consumer of it.
    h.data(&get());
    h.run();
    sent(&mut h);
    assert_eq!(consumers(&mut h), 1);
    assert!(h.take_actions().iter().any(|a| matches!(
        a,
        Action::ConsumerCount { queue, prefix, .. }
            if queue == "amqp-q-q" && prefix == channel::CONSUMER_NAME_PREFIX
    )));
    cancel_c(&mut h);
    assert_eq!(consumers(&mut h), 0);
}

#[test]
fn declare_ok_and_purge_ok_count_the_queues_messages() {
    let mut h = running();
    let declare = |passive: bool| {
        frame(
            1,
            Method::QueueDeclare(QueueDeclare {
                queue: "jobs".into(),
                passive,
                ..Default::default()
            }),
        )
    };
    h.data(&declare(false));
    h.run();
    sent(&mut h);
    for _ in 0..3 {
        h.produce(magnetar_sdk::OutboundMessage {
            topic: "amqp-q-jobs".into(),
            key: None,
            payload: b"job".to_vec(),
            properties: Vec::new(),
        });
    }
    // Passive, and declared again: both count what the queue holds.
    for passive in [true, false] {
        h.data(&declare(passive));
        h.run();
        assert!(
            matches!(
                &sent(&mut h)[..],
                [Frame::Method(1, Method::QueueDeclareOk(ok))] if ok.message_count == 3
            ),
            "passive: {passive}"
        );
    }
    assert!(h
        .take_actions()
        .iter()
        .any(|a| matches!(a, Action::QueueBacklog { queue, .. } if queue == "amqp-q-jobs")));
    let ask = |h: &mut SimHost<AmqpConnection>, m: Method| {
        h.data(&frame(1, m));
        h.run();
        sent(h)
    };
    let purge = QueuePurge {
        queue: "jobs".into(),
        ..Default::default()
    };
    assert!(matches!(
        &ask(&mut h, Method::QueuePurge(purge))[..],
        [Frame::Method(1, Method::QueuePurgeOk(ok))] if ok.message_count == 3
    ));
    // delete-ok counts what goes with the queue.
    h.produce(magnetar_sdk::OutboundMessage {
        topic: "amqp-q-jobs".into(),
        key: None,
        payload: b"late".to_vec(),
        properties: Vec::new(),
    });
    let delete = QueueDelete {
        queue: "jobs".into(),
        ..Default::default()
    };
    assert!(matches!(
        &ask(&mut h, Method::QueueDelete(delete))[..],
        [Frame::Method(1, Method::QueueDeleteOk(ok))] if ok.message_count > 0
    ));
}

#[test]
fn a_dead_lettering_queue_nobody_consumes_is_swept_at_its_heads_expiry() {
    let mut h = running();
    let mut arguments = FieldTable::default();
    arguments
        .insert("x-message-ttl", FieldValue::I32(1000))
        .insert("x-dead-letter-exchange", FieldValue::LongStr(Vec::new()))
        .insert(
            "x-dead-letter-routing-key",
            FieldValue::LongStr(b"work".to_vec()),
        );
    h.data(&frame(
        1,
        Method::QueueDeclare(QueueDeclare {
            queue: "wait".into(),
            arguments,
            ..Default::default()
        }),
    ));
    h.run();
    sent(&mut h);
    h.take_actions();
    h.produce(OutboundMessage {
        topic: "amqp-q-wait".into(),
        key: None,
        payload: b"retry me".to_vec(),
        properties: vec![magnetar_sdk::Property {
            key: "amqp.routing-key".into(),
            value: "wait".into(),
        }],
    });
    let closed = |actions: &[Action]| {
        actions
            .iter()
            .filter(|a| matches!(a, Action::Unsubscribe { delete: false, .. }))
            .count()
    };
    // The first sweep, a second after the declaration: the message is not due yet, so it
    // goes back and the next sweep comes at its expiry.
    h.advance(1000);
    h.run();
    let actions = h.take_actions();
    assert_eq!(opened_consumers(&actions), [(SubMode::Exclusive, 1)]);
    assert!(dead_letter_keys(&actions).is_empty());
    assert_eq!(closed(&actions), 1);
    assert!(sent(&mut h).is_empty(), "a sweep sends the client nothing");
    // At its expiry (the sweeps' least gap later): dead-lettered to the default exchange
    // with the dead-letter routing key, acknowledged in its queue.
    h.advance(100);
    h.run();
    let actions = h.take_actions();
    assert_eq!(opened_consumers(&actions).len(), 1);
    assert_eq!(dead_letter_keys(&actions), ["%.work"]);
    assert!(actions.iter().any(|a| matches!(a, Action::Ack { .. })));
    // Nothing more within the wait: the sweep ends, the next a TTL later.
    h.advance(200);
    h.run();
    assert_eq!(closed(&h.take_actions()), 1);
    // A consumer of this connection expires what it reaches itself: no sweep meanwhile.
    h.data(&frame(
        1,
        Method::BasicConsume(BasicConsume {
            queue: "wait".into(),
            consumer_tag: "c".into(),
            ..Default::default()
        }),
    ));
    h.run();
    sent(&mut h);
    h.take_actions();
    h.advance(1000);
    h.run();
    assert!(opened_consumers(&h.take_actions()).is_empty());
    h.data(&frame(
        1,
        Method::BasicCancel(BasicCancel {
            consumer_tag: "c".into(),
            ..Default::default()
        }),
    ));
    h.run();
    // The queue deleted (elsewhere): the sweeps end at the next one.
    h.kv_mut().remove("amqp/q/wait");
    h.advance(1000);
    h.run();
    assert!(opened_consumers(&h.take_actions()).is_empty());
    assert!(h.machine().sweeps.is_empty());
    // No timer left behind but heartbeats'.
    h.advance(10_000);
    h.run();
    assert!(opened_consumers(&h.take_actions()).is_empty());
}

#[test]
fn a_get_whose_consumer_the_backend_refuses_for_a_moment_opens_it_again() {
    let mut h = with_queue_q();
    h.data(&get());
    // The queue's record read, then the getter's consumer asked for: refused once (a
    // route or a sweep holds the queue), as the backend refuses a Shared consumer beside
    // an Exclusive one.
    fail_when_pending(
        &mut h,
        |a| match a {
            Action::OpenConsumer { token, .. } => Some(*token),
            _ => None,
        },
        "Exclusive consumer is already connected",
    );
    assert!(h.machine().getters.is_empty());
    // A moment later it is opened again, and the get is answered through it.
    h.advance(20);
    h.produce(OutboundMessage {
        topic: "amqp-q-q".into(),
        key: None,
        payload: b"m".to_vec(),
        properties: vec![],
    });
    h.run();
    assert_eq!(h.machine().getters.len(), 1);
    assert!(sent(&mut h)
        .iter()
        .any(|f| matches!(f, Frame::Method(1, Method::BasicGetOk(_)))));
}

/// `queue.purge` of `q` on channel 1, run.
fn purge_q(h: &mut SimHost<AmqpConnection>) {
    h.data(&frame(
        1,
        Method::QueuePurge(QueuePurge {
            queue: "q".into(),
            ..Default::default()
        }),
    ));
    h.run();
}

/// The message count of the `purge-ok` among `frames`, if one is there.
fn purge_ok_count(frames: &[Frame]) -> Option<u32> {
    frames.iter().find_map(|f| match f {
        Frame::Method(1, Method::QueuePurgeOk(ok)) => Some(ok.message_count),
        _ => None,
    })
}

#[test]
fn a_purge_beside_a_consumer_takes_the_ready_messages_one_by_one() {
    let mut h = with_queue_q();
    h.data(&frame(
        1,
        Method::BasicQos(BasicQos {
            prefetch_count: 1,
            ..Default::default()
        }),
    ));
    h.run();
    sent(&mut h);
    consume_q(&mut h);
    let consumer = *h.machine().consumers.keys().next().unwrap();
    for _ in 0..3 {
        h.produce(OutboundMessage {
            topic: "amqp-q-q".into(),
            key: None,
            payload: b"m".to_vec(),
            properties: vec![],
        });
    }
    h.run();
    assert_eq!(
        h.unacked(consumer),
        1,
        "the consumer holds one (prefetch 1)"
    );
    sent(&mut h);
    h.take_actions();
    purge_q(&mut h);
    let actions = h.take_actions();
    // No seek (it would drop what the consumer holds): a Shared consumer took the rest.
    assert!(!actions.iter().any(|a| matches!(a, Action::Seek { .. })));
    assert_eq!(opened_consumers(&actions), [(SubMode::Shared, 256)]);
    // Each message it is handed is acknowledged; none for a while ends the purge.
    h.advance(100);
    h.run();
    let purged = purge_ok_count(&sent(&mut h));
    let acked = actions
        .iter()
        .chain(&h.take_actions())
        .filter(|a| matches!(a, Action::Ack { sub, .. } if *sub != consumer))
        .count();
    // (The simulated host gives a second consumer of the subscription its whole backlog;
    // the backend hands it the ready messages only.)
    assert!(acked >= 2);
    assert_eq!(purged, Some(acked as u32));
    assert_eq!(h.unacked(consumer), 1, "what the consumer holds stays");
}

#[test]
fn what_a_get_consumer_is_handed_while_a_purge_drains_goes_with_the_purge() {
    let mut h = with_queue_q();
    // A get opens the channel's get consumer; a message comes for it and waits (ready).
    h.data(&get());
    h.run();
    sent(&mut h);
    let getter = *h.machine().getters.keys().next().unwrap();
    h.feed(queued(getter, 1));
    h.take_actions();
    // The get consumer holds the queue here: the purge drains it, and takes the waiting one.
    purge_q(&mut h);
    // The get consumer's window opened: the backend hands it the next message meanwhile.
    h.feed(queued(getter, 2));
    h.advance(100);
    h.run();
    let purged = purge_ok_count(&sent(&mut h));
    assert_eq!(purged, Some(2));
    let acked: Vec<u64> = h
        .take_actions()
        .iter()
        .flat_map(|a| match a {
            Action::Ack { sub, delivery_id } if *sub == getter => vec![*delivery_id],
            Action::AckMany { sub, delivery_ids } if *sub == getter => delivery_ids.clone(),
            _ => vec![],
        })
        .collect();
    assert_eq!(acked, [1, 2]);
    // Nothing waits for the next get.
    h.data(&get());
    h.run();
    assert!(matches!(
        &sent(&mut h)[..],
        [Frame::Method(1, Method::BasicGetEmpty(_))]
    ));
}

#[test]
fn sweeps_of_a_queue_others_hold_come_less_and_less_often() {
    let mut h = running();
    let mut arguments = FieldTable::default();
    arguments.insert("x-message-ttl", FieldValue::I32(1000));
    h.data(&frame(
        1,
        Method::QueueDeclare(QueueDeclare {
            queue: "held".into(),
            arguments,
            ..Default::default()
        }),
    ));
    h.run();
    sent(&mut h);
    h.take_actions();
    // The first sweep, a second after the declaration; then each waits for the last one's
    // timer.
    let mut wait = 1000;
    let mut waits = Vec::new();
    for _ in 0..4 {
        h.advance(wait);
        // Consumers elsewhere hold it: the backend refuses the sweep's Exclusive consumer.
        fail_when_pending(
            &mut h,
            |a| match a {
                Action::OpenConsumer { token, .. } => Some(*token),
                _ => None,
            },
            "Exclusive consumer is already connected",
        );
        h.run();
        wait = h
            .take_actions()
            .iter()
            .filter_map(|a| match a {
                Action::SetTimer { delay_ms, .. } => Some(*delay_ms),
                _ => None,
            })
            .max()
            .unwrap();
        waits.push(wait);
    }
    assert_eq!(waits, [1000, 2000, 4000, 8000]);
}
