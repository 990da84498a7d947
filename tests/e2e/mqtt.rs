//! MQTT 3.1.1 through the gateway, driven by `rumqttc` over plaintext and TLS.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use rumqttc::{Client, Connection, Event, MqttOptions, Outgoing, Packet, QoS, Transport};

use crate::harness::{Gateway, Options};

const WAIT: Duration = Duration::from_secs(20);

pub fn options(id: &str, addr: SocketAddr) -> MqttOptions {
    let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    o
}

fn tls_options(id: &str, gw: &Gateway) -> MqttOptions {
    let mut o = MqttOptions::new(id, "localhost", gw.mqtts.port());
    o.set_keep_alive(Duration::from_secs(30));
    o.set_transport(Transport::tls(gw.ca_pem(), None, None));
    o
}

/// Drives the connection until `done` says so, or panics after `WAIT`.
pub fn drive(conn: &mut Connection, mut done: impl FnMut(&Event) -> bool) {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        match conn.recv_timeout(Duration::from_millis(200)) {
            Ok(Ok(ev)) => {
                if done(&ev) {
                    return;
                }
            }
            Ok(Err(e)) => panic!("mqtt connection error: {e}"),
            Err(_) => {}
        }
    }
    panic!("timed out driving the MQTT connection");
}

pub fn connect(opts: MqttOptions) -> (Client, Connection, bool) {
    let (client, mut conn) = Client::new(opts, 100);
    let mut present = false;
    drive(&mut conn, |ev| match ev {
        Event::Incoming(Packet::ConnAck(ack)) => {
            present = ack.session_present;
            true
        }
        _ => false,
    });
    (client, conn, present)
}

pub fn subscribe(client: &Client, conn: &mut Connection, filter: &str, qos: QoS) {
    client.subscribe(filter, qos).expect("subscribe");
    drive(conn, |ev| matches!(ev, Event::Incoming(Packet::SubAck(_))));
}

/// Publishes and waits for the PUBACK of every QoS 1 message.
pub fn publish_all(client: &Client, conn: &mut Connection, msgs: &[(&str, QoS, Vec<u8>)]) {
    let mut acks_due = 0;
    let mut sent = 0;
    for (topic, qos, payload) in msgs {
        client
            .publish(*topic, *qos, false, payload.clone())
            .expect("publish");
        if *qos == QoS::AtLeastOnce {
            acks_due += 1;
        }
    }
    let total = msgs.len();
    drive(conn, |ev| {
        match ev {
            Event::Incoming(Packet::PubAck(_)) => acks_due -= 1,
            Event::Outgoing(Outgoing::Publish(_)) => sent += 1,
            _ => {}
        }
        acks_due == 0 && sent == total
    });
}

/// Collects `n` publishes as (topic, payload).
pub fn receive(conn: &mut Connection, n: usize) -> Vec<(String, Vec<u8>)> {
    let mut got = Vec::new();
    if n == 0 {
        return got;
    }
    drive(conn, |ev| {
        if let Event::Incoming(Packet::Publish(p)) = ev {
            got.push((p.topic.clone(), p.payload.to_vec()));
        }
        got.len() >= n
    });
    got
}

/// Asserts that nothing more arrives for a little while.
pub fn assert_quiet(conn: &mut Connection) {
    let until = Instant::now() + Duration::from_millis(700);
    while Instant::now() < until {
        if let Ok(Ok(Event::Incoming(Packet::Publish(p)))) =
            conn.recv_timeout(Duration::from_millis(100))
        {
            panic!("unexpected message on {}", p.topic);
        }
    }
}

#[test]
fn qos0_and_qos1_with_wildcards_over_plaintext_and_tls() {
    let gw = Gateway::start(Options::default());
    let (sub, mut sub_conn, _) = connect(tls_options("wild-sub", &gw));
    subscribe(&sub, &mut sub_conn, "sensors/+/temp", QoS::AtLeastOnce);
    subscribe(&sub, &mut sub_conn, "alerts/#", QoS::AtMostOnce);

    let (publ, mut pub_conn, _) = connect(options("wild-pub", gw.mqtt));
    publish_all(
        &publ,
        &mut pub_conn,
        &[
            ("sensors/a/temp", QoS::AtLeastOnce, b"21.5".to_vec()),
            ("sensors/b/humidity", QoS::AtLeastOnce, b"40".to_vec()),
            ("alerts/fire/floor2", QoS::AtMostOnce, b"hot".to_vec()),
            ("sensors/c/temp", QoS::AtMostOnce, b"19".to_vec()),
            (
                "alerts",
                QoS::AtLeastOnce,
                b"parent level matches #".to_vec(),
            ),
        ],
    );
    let got: BTreeSet<_> = receive(&mut sub_conn, 4).into_iter().collect();
    let want: BTreeSet<(String, Vec<u8>)> = [
        ("sensors/a/temp", &b"21.5"[..]),
        ("alerts/fire/floor2", b"hot"),
        ("sensors/c/temp", b"19"),
        ("alerts", b"parent level matches #"),
    ]
    .into_iter()
    .map(|(t, p)| (t.to_string(), p.to_vec()))
    .collect();
    assert_eq!(got, want);
    assert_quiet(&mut sub_conn);
}

#[test]
fn unsubscribe_stops_delivery() {
    let gw = Gateway::start(Options::default());
    let (sub, mut sub_conn, _) = connect(options("unsub-sub", gw.mqtt));
    subscribe(&sub, &mut sub_conn, "a/#", QoS::AtLeastOnce);
    subscribe(&sub, &mut sub_conn, "b/#", QoS::AtLeastOnce);
    sub.unsubscribe("a/#").expect("unsubscribe");
    drive(&mut sub_conn, |ev| {
        matches!(ev, Event::Incoming(Packet::UnsubAck(_)))
    });
    let (publ, mut pub_conn, _) = connect(options("unsub-pub", gw.mqtt));
    publish_all(
        &publ,
        &mut pub_conn,
        &[
            ("a/1", QoS::AtLeastOnce, b"x".to_vec()),
            ("b/1", QoS::AtLeastOnce, b"y".to_vec()),
        ],
    );
    assert_eq!(
        receive(&mut sub_conn, 1),
        vec![("b/1".to_string(), b"y".to_vec())]
    );
    assert_quiet(&mut sub_conn);
}

#[test]
fn persistent_session_gets_qos1_backlog_after_gateway_kill9() {
    let mut gw = Gateway::start(Options::default());
    let mut o = options("device-17", gw.mqtt);
    o.set_clean_session(false);
    let (sub, mut sub_conn, present) = connect(o.clone());
    assert!(!present, "a new session is not present");
    subscribe(&sub, &mut sub_conn, "fleet/+/cmd", QoS::AtLeastOnce);
    sub.disconnect().expect("disconnect");
    drop(sub_conn);

    let (publ, mut pub_conn, _) = connect(options("fleet-ctl", gw.mqtt));
    let msgs: Vec<(String, Vec<u8>)> = (0..30)
        .map(|i| {
            (
                format!("fleet/{}/cmd", i % 3),
                format!("cmd-{i}").into_bytes(),
            )
        })
        .collect();
    let batch: Vec<(&str, QoS, Vec<u8>)> = msgs
        .iter()
        .map(|(t, p)| (t.as_str(), QoS::AtLeastOnce, p.clone()))
        .collect();
    publish_all(&publ, &mut pub_conn, &batch);
    drop(pub_conn);

    // Every message above was PUBACKed; none of that may be lost by a crash.
    gw.kill9();
    gw.spawn();

    let (_sub, mut sub_conn, present) = connect(o);
    assert!(
        present,
        "the persistent session must still be there after a restart"
    );
    let got: BTreeSet<_> = receive(&mut sub_conn, msgs.len()).into_iter().collect();
    assert_eq!(got, msgs.into_iter().collect::<BTreeSet<_>>());
}

/// Sends raw bytes and reports whether the gateway closed the socket afterwards.
fn closed_after(addr: SocketAddr, bytes: &[u8], half_close: bool) -> bool {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    let _ = s.write_all(bytes);
    if half_close {
        let _ = s.shutdown(std::net::Shutdown::Write);
    }
    let mut buf = [0u8; 512];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue, // e.g. a CONNACK with an error code before the close
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

#[test]
fn bad_input_closes_only_that_connection() {
    let gw = Gateway::start(Options::default());
    let (sub, mut sub_conn, _) = connect(options("steady", gw.mqtt));
    subscribe(&sub, &mut sub_conn, "steady/#", QoS::AtLeastOnce);

    let mut random = vec![0u8; 4096];
    let mut x: u32 = 0x9e37_79b9;
    for b in random.iter_mut() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    let kafka_api_versions = [
        0, 0, 0, 0x13, 0, 0x12, 0, 3, 0, 0, 0, 1, 0, 9, b'k', b'a', b'f', b'k', b'a', b'-', b'c',
        b'l', b'i', 0, 0, 0,
    ];
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        ("random bytes", random, false),
        (
            "http request",
            b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec(),
            false,
        ),
        ("kafka request", kafka_api_versions.to_vec(), false),
        (
            "oversized frame (256 MB length)",
            vec![0x10, 0xff, 0xff, 0xff, 0x7f, 0, 4, b'M', b'Q'],
            false,
        ),
        (
            "truncated CONNECT",
            vec![0x10, 0x20, 0x00, 0x04, b'M', b'Q'],
            true,
        ),
        (
            "PUBLISH before CONNECT",
            vec![0x30, 0x05, 0x00, 0x01, b'a', b'h', b'i'],
            false,
        ),
    ];
    for (what, bytes, half_close) in &cases {
        assert!(
            closed_after(gw.mqtt, bytes, *half_close),
            "{what}: the gateway must close the connection"
        );
    }

    let (publ, mut pub_conn, _) = connect(options("steady-pub", gw.mqtt));
    publish_all(
        &publ,
        &mut pub_conn,
        &[("steady/ok", QoS::AtLeastOnce, b"still fine".to_vec())],
    );
    assert_eq!(
        receive(&mut sub_conn, 1),
        vec![("steady/ok".to_string(), b"still fine".to_vec())]
    );
    let log = gw.log();
    assert!(
        log.contains("plugin closed the connection"),
        "closes must be logged with a reason:\n{log}"
    );
}

// ---- QoS 2, retained messages, wills, session takeover -----------------------------------

/// Collects `n` publishes as (topic, payload, qos, retain).
pub fn receive_full(conn: &mut Connection, n: usize) -> Vec<(String, Vec<u8>, u8, bool)> {
    let mut got = Vec::new();
    drive(conn, |ev| {
        if let Event::Incoming(Packet::Publish(p)) = ev {
            got.push((p.topic.clone(), p.payload.to_vec(), p.qos as u8, p.retain));
        }
        got.len() >= n
    });
    got
}

/// A raw MQTT 3.1.1 client, for what a client library hides (resends, silent sockets).
struct Raw(TcpStream);

impl Raw {
    /// Connects, sends CONNECT, returns the client and the CONNACK's Session Present.
    fn connect(
        addr: SocketAddr,
        client_id: &str,
        clean: bool,
        keep_alive: u16,
        will: Option<(&str, &[u8])>,
    ) -> (Raw, bool) {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(WAIT)).expect("timeout");
        let mut raw = Raw(s);
        let mut body = Vec::new();
        put_str(&mut body, b"MQTT");
        body.push(4);
        let mut flags = if clean { 0x02 } else { 0 };
        if will.is_some() {
            flags |= 0x04 | 0x08; // Will Flag, Will QoS 1
        }
        body.push(flags);
        body.extend_from_slice(&keep_alive.to_be_bytes());
        put_str(&mut body, client_id.as_bytes());
        if let Some((topic, payload)) = will {
            put_str(&mut body, topic.as_bytes());
            put_str(&mut body, payload);
        }
        raw.send(0x10, &body);
        let connack = raw.read();
        assert_eq!(connack.len(), 4, "CONNACK {connack:?}");
        assert_eq!(connack[3], 0, "CONNACK return code");
        (raw, connack[2] & 1 == 1)
    }

    fn send(&mut self, first: u8, body: &[u8]) {
        let mut p = vec![first];
        let mut len = body.len();
        loop {
            let mut b = (len % 128) as u8;
            len /= 128;
            if len > 0 {
                b |= 0x80;
            }
            p.push(b);
            if len == 0 {
                break;
            }
        }
        p.extend_from_slice(body);
        self.0.write_all(&p).expect("write");
    }

    /// Reads one whole packet.
    fn read(&mut self) -> Vec<u8> {
        let mut first = [0u8; 1];
        self.0.read_exact(&mut first).expect("packet");
        let mut out = first.to_vec();
        let mut len = 0usize;
        for i in 0..4 {
            let mut b = [0u8; 1];
            self.0.read_exact(&mut b).expect("length");
            out.push(b[0]);
            len |= usize::from(b[0] & 0x7f) << (7 * i);
            if b[0] & 0x80 == 0 {
                break;
            }
        }
        let mut body = vec![0u8; len];
        self.0.read_exact(&mut body).expect("body");
        out.extend_from_slice(&body);
        out
    }

    fn publish_qos2(&mut self, topic: &str, id: u16, payload: &[u8], dup: bool) {
        let mut body = Vec::new();
        put_str(&mut body, topic.as_bytes());
        body.extend_from_slice(&id.to_be_bytes());
        body.extend_from_slice(payload);
        self.send(if dup { 0x3c } else { 0x34 }, &body);
    }
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

#[test]
fn qos2_exactly_once_both_ways_and_across_gateway_kill9() {
    let mut gw = Gateway::start(Options::default());
    let mut watch = options("q2-watch", gw.mqtt);
    watch.set_clean_session(false);
    let (sub, mut sub_conn, _) = connect(watch.clone());
    subscribe(&sub, &mut sub_conn, "q2/#", QoS::ExactlyOnce);

    // rumqttc publishes at QoS 2: PUBREC, PUBREL, PUBCOMP, each message delivered once.
    let (publ, mut pub_conn, _) = connect(options("q2-pub", gw.mqtt));
    for i in 0..20 {
        publ.publish(format!("q2/{i}"), QoS::ExactlyOnce, false, vec![i as u8])
            .expect("publish");
    }
    let mut completed = 0;
    drive(&mut pub_conn, |ev| {
        if matches!(ev, Event::Incoming(Packet::PubComp(_))) {
            completed += 1;
        }
        completed == 20
    });
    let got = receive_full(&mut sub_conn, 20);
    let topics: BTreeSet<String> = got.iter().map(|g| g.0.clone()).collect();
    assert_eq!(topics.len(), 20, "20 distinct messages: {got:?}");
    assert!(got.iter().all(|g| g.2 == 2 && !g.3));
    assert_quiet(&mut sub_conn);
    sub.disconnect().expect("disconnect");
    drop(sub_conn);
    drop(pub_conn);

    // A persistent client's PUBLISH is stored and PUBRECed; the gateway dies before PUBREL.
    let (mut raw, _) = Raw::connect(gw.mqtt, "q2-raw", false, 0, None);
    raw.publish_qos2("q2/crash", 7, b"exactly once", false);
    assert_eq!(raw.read(), vec![0x50, 0x02, 0x00, 0x07], "PUBREC");
    gw.kill9();
    gw.spawn();

    // §4.4: the client resends the PUBLISH (DUP) with the same identifier, then PUBREL.
    let (mut raw, present) = Raw::connect(gw.mqtt, "q2-raw", false, 0, None);
    assert!(present, "the QoS 2 state is part of the session");
    raw.publish_qos2("q2/crash", 7, b"exactly once", true);
    assert_eq!(raw.read(), vec![0x50, 0x02, 0x00, 0x07], "PUBREC again");
    raw.send(0x62, &7u16.to_be_bytes());
    assert_eq!(raw.read(), vec![0x70, 0x02, 0x00, 0x07], "PUBCOMP");

    let (_sub, mut sub_conn, present) = connect(watch);
    assert!(present);
    let got = receive_full(&mut sub_conn, 1);
    assert_eq!(got[0].0, "q2/crash");
    assert_eq!(got[0].1, b"exactly once");
    assert_quiet(&mut sub_conn);
}

#[test]
fn retained_messages_on_subscribe_cleared_by_empty_payload_and_kept_across_kill9() {
    let mut gw = Gateway::start(Options::default());
    let (publ, mut pub_conn, _) = connect(options("ret-pub", gw.mqtt));
    for (topic, payload) in [("ret/a", &b"A"[..]), ("ret/b", b"B"), ("other/c", b"C")] {
        publ.publish(topic, QoS::AtLeastOnce, true, payload.to_vec())
            .expect("publish");
    }
    let mut acked = 0;
    drive(&mut pub_conn, |ev| {
        if matches!(ev, Event::Incoming(Packet::PubAck(_))) {
            acked += 1;
        }
        acked == 3
    });

    let (sub, mut sub_conn, _) = connect(options("ret-sub", gw.mqtt));
    subscribe(&sub, &mut sub_conn, "ret/+", QoS::AtLeastOnce);
    let got: BTreeSet<_> = receive_full(&mut sub_conn, 2).into_iter().collect();
    let want: BTreeSet<_> = [
        ("ret/a".to_string(), b"A".to_vec(), 1, true),
        ("ret/b".to_string(), b"B".to_vec(), 1, true),
    ]
    .into_iter()
    .collect();
    assert_eq!(
        got, want,
        "retained messages follow the SUBACK with RETAIN 1"
    );
    assert_quiet(&mut sub_conn);

    // To an established subscription a retained publish goes out with RETAIN 0 (§3.3.1.3);
    // the empty one removes ret/a's retained message.
    publish_retained(&publ, &mut pub_conn, "ret/a", b"");
    let got = receive_full(&mut sub_conn, 1);
    assert_eq!(got[0], ("ret/a".to_string(), Vec::new(), 1, false));
    drop(pub_conn);
    drop(sub_conn);

    gw.kill9();
    gw.spawn();
    let (sub, mut sub_conn, _) = connect(options("ret-sub-2", gw.mqtt));
    subscribe(&sub, &mut sub_conn, "#", QoS::AtMostOnce);
    let got: BTreeSet<_> = receive_full(&mut sub_conn, 2).into_iter().collect();
    let want: BTreeSet<_> = [
        ("other/c".to_string(), b"C".to_vec(), 0, true),
        ("ret/b".to_string(), b"B".to_vec(), 0, true),
    ]
    .into_iter()
    .collect();
    assert_eq!(
        got, want,
        "retained messages survive a restart; ret/a was cleared"
    );
    assert_quiet(&mut sub_conn);
}

fn publish_retained(client: &Client, conn: &mut Connection, topic: &str, payload: &[u8]) {
    client
        .publish(topic, QoS::AtLeastOnce, true, payload.to_vec())
        .expect("publish");
    drive(conn, |ev| matches!(ev, Event::Incoming(Packet::PubAck(_))));
}

#[test]
fn will_published_on_lost_connection_and_keep_alive_timeout_not_on_disconnect() {
    let gw = Gateway::start(Options::default());
    let (watch, mut watch_conn, _) = connect(options("will-watch", gw.mqtt));
    subscribe(&watch, &mut watch_conn, "will/#", QoS::AtLeastOnce);

    // A clean DISCONNECT discards the will (§3.14.4).
    let mut o = options("will-polite", gw.mqtt);
    o.set_last_will(rumqttc::LastWill::new(
        "will/polite",
        "should not appear",
        QoS::AtLeastOnce,
        false,
    ));
    let (polite, mut polite_conn, _) = connect(o);
    polite.disconnect().expect("disconnect");
    drive(&mut polite_conn, |ev| {
        matches!(ev, Event::Outgoing(Outgoing::Disconnect))
    });
    drop(polite_conn);

    // The socket goes away without DISCONNECT: the will is published.
    let (raw, _) = Raw::connect(
        gw.mqtt,
        "will-crash",
        true,
        0,
        Some(("will/crash", b"lost")),
    );
    drop(raw);
    let got = receive_full(&mut watch_conn, 1);
    assert_eq!(got[0].0, "will/crash");
    assert_eq!(got[0].1, b"lost");

    // A silent client: the keep-alive timeout (1.5 × 1 s) ends it, and the will goes out.
    let started = Instant::now();
    let (_silent, _) = Raw::connect(
        gw.mqtt,
        "will-silent",
        true,
        1,
        Some(("will/silent", b"timeout")),
    );
    let got = receive_full(&mut watch_conn, 1);
    assert_eq!(got[0].0, "will/silent");
    assert!(started.elapsed() >= Duration::from_millis(1400));
    assert_quiet(&mut watch_conn);
}

#[test]
fn second_connection_with_the_same_client_id_takes_the_session_over() {
    let gw = Gateway::start(Options::default());
    let mut o = options("twin", gw.mqtt);
    o.set_clean_session(false);
    let (first, mut first_conn, _) = connect(o.clone());
    subscribe(&first, &mut first_conn, "twin/#", QoS::AtLeastOnce);

    let (_second, mut second_conn, present) = connect(o);
    assert!(present, "the new connection gets the session");
    // The first connection is closed by the server (§3.1.4).
    let deadline = Instant::now() + WAIT;
    let mut first_closed = false;
    while Instant::now() < deadline && !first_closed {
        if let Ok(Err(_)) = first_conn.recv_timeout(Duration::from_millis(200)) {
            first_closed = true;
        }
    }
    assert!(first_closed, "the first connection must be closed");
    drop(first_conn);

    let (publ, mut pub_conn, _) = connect(options("twin-pub", gw.mqtt));
    publish_all(
        &publ,
        &mut pub_conn,
        &[("twin/x", QoS::AtLeastOnce, b"to the new one".to_vec())],
    );
    assert_eq!(
        receive(&mut second_conn, 1),
        vec![("twin/x".to_string(), b"to the new one".to_vec())]
    );
}

/// QoS 0 is at most once, but a subscriber that keeps up on loopback must get everything: a
/// fast burst of 1 KiB publishes must be slowed down (the host stops reading the publisher's
/// socket), never cut off by the gateway closing the publisher.
#[test]
fn qos0_burst_of_1kib_messages_all_reach_a_subscriber_that_keeps_up() {
    const N: usize = 5_000;
    let gw = Gateway::start(Options::default());
    let (sub, mut sub_conn, _) = connect(options("burst-sub", gw.mqtt));
    subscribe(&sub, &mut sub_conn, "burst/+", QoS::AtMostOnce);
    let receiver = std::thread::spawn(move || {
        let mut got = Vec::with_capacity(N);
        let deadline = Instant::now() + Duration::from_secs(60);
        while got.len() < N && Instant::now() < deadline {
            match sub_conn.recv_timeout(Duration::from_millis(200)) {
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                    let mut n = [0u8; 8];
                    n.copy_from_slice(&p.payload[..8]);
                    got.push((p.payload.len(), u64::from_be_bytes(n)));
                }
                Ok(Ok(_)) | Err(_) => {}
                Ok(Err(e)) => panic!("subscriber connection error: {e}"),
            }
        }
        drop(sub);
        got
    });

    let (publ, mut pub_conn, _) = connect(options("burst-pub", gw.mqtt));
    let driver = std::thread::spawn(move || {
        let mut sent = 0;
        let deadline = Instant::now() + Duration::from_secs(60);
        while sent < N && Instant::now() < deadline {
            match pub_conn.recv_timeout(Duration::from_millis(200)) {
                Ok(Ok(Event::Outgoing(Outgoing::Publish(_)))) => sent += 1,
                Ok(Ok(_)) | Err(_) => {}
                Ok(Err(e)) => panic!("publisher connection error after {sent} publishes: {e}"),
            }
        }
        sent
    });
    for i in 0..N as u64 {
        let mut payload = vec![0x5a; 1024];
        payload[..8].copy_from_slice(&i.to_be_bytes());
        publ.publish("burst/a", QoS::AtMostOnce, false, payload)
            .expect("publish");
    }
    assert_eq!(driver.join().expect("publisher driver"), N);
    let got = receiver.join().expect("subscriber");
    let want: Vec<(usize, u64)> = (0..N as u64).map(|i| (1024, i)).collect();
    assert_eq!(got.len(), N, "messages received");
    assert_eq!(got, want, "every message once, in order");
}

// ---- MQTT 5.0 (rumqttc's v5 client) ------------------------------------------------------

/// MQTT 5.0 with `rumqttc::v5`: User Properties and Content Type travel end to end through
/// Pulsar, and the members of a shared subscription (`$share/group/filter`, a Pulsar Shared
/// subscription) split the messages between them, each message exactly once.
#[test]
fn v5_properties_and_shared_subscription_split_with_rumqttc() {
    use rumqttc::v5::mqttbytes::v5::{Packet as Packet5, PublishProperties};
    use rumqttc::v5::mqttbytes::QoS as QoS5;
    use rumqttc::v5::{Client as Client5, Connection as Connection5, Event as Event5};

    fn drive5(conn: &mut Connection5, mut done: impl FnMut(&Event5) -> bool) {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            match conn.recv_timeout(Duration::from_millis(200)) {
                Ok(Ok(ev)) if done(&ev) => return,
                Ok(Err(e)) => panic!("mqtt connection error: {e}"),
                _ => {}
            }
        }
        panic!("timed out driving the MQTT 5.0 connection");
    }

    fn connect5(id: &str, addr: SocketAddr) -> (Client5, Connection5) {
        let mut o = rumqttc::v5::MqttOptions::new(id, addr.ip().to_string(), addr.port());
        o.set_keep_alive(Duration::from_secs(30));
        let (client, mut conn) = Client5::new(o, 100);
        drive5(
            &mut conn,
            |ev| matches!(ev, Event5::Incoming(Packet5::ConnAck(a)) if a.code == rumqttc::v5::mqttbytes::v5::ConnectReturnCode::Success),
        );
        (client, conn)
    }

    let gw = Gateway::start(Options::default());
    let mut members: Vec<(Client5, Connection5)> = (0..2)
        .map(|i| connect5(&format!("share-{i}"), gw.mqtt))
        .collect();
    for (client, conn) in members.iter_mut() {
        client
            .subscribe("$share/e2e/sh/#", QoS5::AtLeastOnce)
            .expect("subscribe");
        drive5(conn, |ev| {
            matches!(ev, Event5::Incoming(Packet5::SubAck(_)))
        });
    }
    let (publ, mut pub_conn) = connect5("share-pub", gw.mqtt);
    let n = 30usize;
    for i in 0..n {
        let props = PublishProperties {
            user_properties: vec![("seq".into(), i.to_string())],
            content_type: Some("text/plain".into()),
            ..PublishProperties::default()
        };
        publ.publish_with_properties(
            format!("sh/{i}"),
            QoS5::AtLeastOnce,
            false,
            format!("m{i}"),
            props,
        )
        .expect("publish");
    }
    let mut acked = 0;
    drive5(&mut pub_conn, |ev| {
        acked += usize::from(matches!(ev, Event5::Incoming(Packet5::PubAck(_))));
        acked == n
    });

    let mut seen = BTreeSet::new();
    let mut per_member = vec![0usize; members.len()];
    let deadline = Instant::now() + WAIT;
    while seen.len() < n && Instant::now() < deadline {
        for (idx, (_, conn)) in members.iter_mut().enumerate() {
            if let Ok(Ok(Event5::Incoming(Packet5::Publish(p)))) =
                conn.recv_timeout(Duration::from_millis(50))
            {
                let props = p.properties.clone().unwrap_or_default();
                assert_eq!(props.content_type.as_deref(), Some("text/plain"));
                let seq = props
                    .user_properties
                    .iter()
                    .find(|(k, _)| k == "seq")
                    .map(|(_, v)| v.clone())
                    .expect("the User Property arrives");
                assert_eq!(p.payload.as_ref(), format!("m{seq}").as_bytes());
                assert!(seen.insert(seq), "a message went to two members");
                per_member[idx] += 1;
            }
        }
    }
    assert_eq!(seen.len(), n, "every message reached one member");
    assert!(per_member.iter().all(|c| *c > 0), "split: {per_member:?}");
}

#[test]
fn a_connect_sent_with_the_last_tls_handshake_message_is_answered() {
    // A TLS 1.3 client's Finished and its CONNECT in one TCP segment: the server's handshake
    // read takes both, and the CONNECT waits in the TLS layer, not in the socket.
    let gw = Gateway::start(Options::default());
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut gw.ca_pem().as_slice()) {
        roots.add(c.expect("ca cert")).expect("root");
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let mut tls = rustls::ClientConnection::new(std::sync::Arc::new(config), name).expect("client");
    // Written before the handshake: rustls sends it right behind its Finished, in one write.
    let id = b"eager";
    let mut connect = vec![0x10, 12 + id.len() as u8, 0, 4];
    connect.extend_from_slice(b"MQTT");
    connect.extend_from_slice(&[4, 0x02, 0, 30, 0, id.len() as u8]);
    connect.extend_from_slice(id);
    tls.writer().write_all(&connect).expect("buffered CONNECT");
    let mut tcp = TcpStream::connect(gw.mqtts).expect("tcp");
    tcp.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    while tls.is_handshaking() || tls.wants_write() {
        tls.complete_io(&mut tcp).expect("handshake");
    }
    let mut stream = rustls::Stream::new(&mut tls, &mut tcp);
    let mut connack = [0u8; 4];
    stream
        .read_exact(&mut connack)
        .expect("a CONNACK within 5 s (the plugin's CONNECT timeout is 10 s)");
    assert_eq!(connack, [0x20, 2, 0, 0]);
}
