//! MQTT 3.1.1 through the gateway, driven by `rumqttc` over plaintext and TLS.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use rumqttc::{Client, Connection, Event, MqttOptions, Outgoing, Packet, QoS, Transport};

use crate::harness::{Gateway, Options};

const WAIT: Duration = Duration::from_secs(20);

fn options(id: &str, addr: SocketAddr) -> MqttOptions {
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
fn drive(conn: &mut Connection, mut done: impl FnMut(&Event) -> bool) {
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

fn connect(opts: MqttOptions) -> (Client, Connection, bool) {
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

fn subscribe(client: &Client, conn: &mut Connection, filter: &str, qos: QoS) {
    client.subscribe(filter, qos).expect("subscribe");
    drive(conn, |ev| matches!(ev, Event::Incoming(Packet::SubAck(_))));
}

/// Publishes and waits for the PUBACK of every QoS 1 message.
fn publish_all(client: &Client, conn: &mut Connection, msgs: &[(&str, QoS, Vec<u8>)]) {
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
fn receive(conn: &mut Connection, n: usize) -> Vec<(String, Vec<u8>)> {
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
fn assert_quiet(conn: &mut Connection) {
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
