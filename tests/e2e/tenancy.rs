//! Tenancy, tokens, encryption at rest and quotas, on the contract of
//! `examples/two-tenants.toml`: tenants `acme` (alice / alice-secret) and `globex`
//! (bob / bob-secret), both encrypted at rest, anonymous access off. Driven by rumqttc over
//! MQTT and by the `pulsar` crate on the embedded broker's port, with tokens printed by
//! `magnetar token`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use futures::StreamExt;
use pulsar::{Authentication, Consumer, Pulsar, SubType, TokioExecutor};
use rumqttc::{Client, ConnectReturnCode, Connection, Event, MqttOptions, Packet, QoS};

use crate::harness::{Gateway, Options, ADMIN_TOKEN};

const WAIT: Duration = Duration::from_secs(20);

fn two_tenants(extra: &str) -> Gateway {
    let example = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/two-tenants.toml"),
    )
    .expect("examples/two-tenants.toml");
    Gateway::start(Options {
        extra: format!("\n{example}\n{extra}"),
        ..Default::default()
    })
}

/// A token from `magnetar token`, as an operator would make one.
pub fn token(gw: &Gateway, user: &str, expires_in: Option<&str>) -> String {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_magnetar"));
    cmd.arg("token")
        .arg("--config")
        .arg(&gw.config_path)
        .arg("--data-dir")
        .arg(gw.data_dir())
        .arg("--user")
        .arg(user);
    if let Some(d) = expires_in {
        cmd.arg("--expires-in").arg(d);
    }
    let out = cmd.output().expect("running magnetar token");
    assert!(
        out.status.success(),
        "magnetar token failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_string()
}

fn mqtt_options(id: &str, addr: SocketAddr, user: &str, password: &str) -> MqttOptions {
    let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    o.set_credentials(user, password);
    o
}

/// Connects; `Ok` with the client, or `Err` with the CONNACK code or error text.
fn try_connect(opts: MqttOptions) -> Result<(Client, Connection), String> {
    let (client, mut conn) = Client::new(opts, 1000);
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        match conn.recv_timeout(Duration::from_millis(200)) {
            Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) => {
                return if ack.code == ConnectReturnCode::Success {
                    Ok((client, conn))
                } else {
                    Err(format!("{:?}", ack.code))
                };
            }
            Ok(Ok(_)) | Err(_) => {}
            Ok(Err(e)) => return Err(e.to_string()),
        }
    }
    Err("no CONNACK".into())
}

fn connect(opts: MqttOptions) -> (Client, Connection) {
    try_connect(opts).expect("MQTT connect")
}

/// Drives a connection until `done`, or panics after `WAIT`.
fn drive(conn: &mut Connection, mut done: impl FnMut(&Event) -> bool) {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        match conn.recv_timeout(Duration::from_millis(100)) {
            Ok(Ok(ev)) if done(&ev) => return,
            Ok(Err(e)) => panic!("mqtt connection error: {e}"),
            _ => {}
        }
    }
    panic!("timed out driving the MQTT connection");
}

fn subscribe(client: &Client, conn: &mut Connection, filter: &str) {
    client
        .subscribe(filter, QoS::AtLeastOnce)
        .expect("subscribe");
    drive(conn, |ev| matches!(ev, Event::Incoming(Packet::SubAck(_))));
}

fn publish_acked(client: &Client, conn: &mut Connection, topic: &str, payloads: &[Vec<u8>]) {
    for p in payloads {
        client
            .publish(topic, QoS::AtLeastOnce, false, p.clone())
            .expect("publish");
    }
    let mut due = payloads.len();
    if due > 0 {
        drive(conn, |ev| {
            if matches!(ev, Event::Incoming(Packet::PubAck(_))) {
                due -= 1;
            }
            due == 0
        });
    }
}

/// Collects publishes for `quiet` after the last one (at most `WAIT`).
fn collect(conn: &mut Connection, want: usize, quiet: Duration) -> Vec<(String, Vec<u8>)> {
    let mut got = Vec::new();
    let deadline = Instant::now() + WAIT;
    let mut last = Instant::now();
    while Instant::now() < deadline {
        if got.len() >= want && last.elapsed() > quiet {
            break;
        }
        match conn.recv_timeout(Duration::from_millis(50)) {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                got.push((p.topic.clone(), p.payload.to_vec()));
                last = Instant::now();
            }
            Ok(Err(e)) => panic!("mqtt connection error: {e}"),
            _ => {}
        }
    }
    got
}

async fn pulsar_client(
    gw: &Gateway,
    token: Option<&str>,
) -> Result<Pulsar<TokioExecutor>, pulsar::Error> {
    let mut b = Pulsar::builder(format!("pulsar://{}", gw.broker), TokioExecutor);
    if let Some(t) = token {
        b = b.with_auth(Authentication {
            name: "token".into(),
            data: t.as_bytes().to_vec(),
        });
    }
    b.build().await
}

/// Whether a client with `token` can produce one message to `topic` on the broker.
async fn can_produce(gw: &Gateway, token: Option<&str>, topic: &str) -> bool {
    let Ok(client) = pulsar_client(gw, token).await else {
        return false;
    };
    let producer = tokio::time::timeout(Duration::from_secs(10), async {
        let mut p = client.producer().with_topic(topic).build().await?;
        p.send_non_blocking(b"probe".to_vec()).await?.await?;
        Ok::<_, pulsar::Error>(())
    })
    .await;
    matches!(producer, Ok(Ok(())))
}

/// A raw HTTP/1.1 call to the admin API: (status, body).
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("admin API");
    s.set_read_timeout(Some(WAIT)).expect("timeout");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("response");
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    (status, body)
}

/// acme's usage from the admin API, parsed and as text (for assertion messages).
fn acme_usage(gw: &Gateway) -> (serde_json::Value, String) {
    let (s, body) = http(
        gw.admin,
        "GET",
        "/admin/v1/tenants/acme/usage",
        Some(ADMIN_TOKEN),
        "",
    );
    assert_eq!(s, 200, "{body}");
    (serde_json::from_str(&body).expect("usage json"), body)
}

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// What the isolation suite needs of a protocol, written once against the host's tenancy:
/// each protocol plugin (MQTT now; AMQP, Kafka, WebSocket later) implements it and runs
/// [`isolation_suite`] on the two-tenants gateway.
pub trait TenantClient: Sized {
    /// Logs in; `Err` with the protocol's refusal.
    fn login(gw: &Gateway, user: &str, secret: &str) -> Result<Self, String>;
    /// Subscribes to every topic the protocol lets a client name.
    fn subscribe_all(&mut self);
    /// Publishes and waits until the gateway confirms it (or refuses it).
    fn publish(&mut self, topic: &str, payload: &[u8]);
    /// What arrived, waiting for at least `want` messages (or a timeout).
    fn received(&mut self, want: usize) -> Vec<(String, Vec<u8>)>;
    /// Topic names a client of this protocol could craft to try to reach tenant `other`.
    fn crafted_topics(other: &str) -> Vec<String>;
}

/// Two tenants use the same topic names; nothing crosses, whatever the topic string says.
pub fn isolation_suite<C: TenantClient>(gw: &Gateway) {
    assert!(C::login(gw, "", "").is_err(), "anonymous login accepted");
    assert!(
        C::login(gw, "alice", "bob-secret").is_err(),
        "wrong password accepted"
    );
    assert!(
        C::login(gw, "bob", "alice-secret").is_err(),
        "wrong password accepted"
    );
    let mut alice_sub = C::login(gw, "alice", "alice-secret").expect("alice logs in");
    let mut bob_sub = C::login(gw, "bob", "bob-secret").expect("bob logs in");
    alice_sub.subscribe_all();
    bob_sub.subscribe_all();
    // alice also logs in with a token from `magnetar token` instead of her password.
    let mut alice = C::login(gw, "alice", &token(gw, "alice", Some("1h"))).expect("token login");
    let mut bob = C::login(gw, "bob", "bob-secret").expect("bob logs in");
    alice.publish("sensors.t", b"acme-1");
    bob.publish("sensors.t", b"globex-1");
    let crafted = C::crafted_topics("globex");
    for topic in &crafted {
        alice.publish(topic, b"acme-crafted");
    }
    let seen_by_alice = alice_sub.received(1);
    let seen_by_bob = bob_sub.received(1);
    assert!(
        seen_by_alice.iter().all(|(_, p)| p.starts_with(b"acme-")),
        "alice saw {seen_by_alice:?}"
    );
    assert!(
        seen_by_alice.iter().any(|(_, p)| p == b"acme-1"),
        "alice missed her own message: {seen_by_alice:?}"
    );
    assert_eq!(
        seen_by_bob,
        vec![("sensors.t".to_string(), b"globex-1".to_vec())],
        "bob saw another tenant's messages"
    );
}

/// MQTT through the gateway's MQTT listener.
struct MqttTenantClient {
    client: Client,
    conn: Connection,
}

impl TenantClient for MqttTenantClient {
    fn login(gw: &Gateway, user: &str, secret: &str) -> Result<Self, String> {
        let mut o = MqttOptions::new(
            format!("iso-{user}-{}", rand_suffix()),
            gw.mqtt.ip().to_string(),
            gw.mqtt.port(),
        );
        o.set_keep_alive(Duration::from_secs(30));
        if !user.is_empty() {
            o.set_credentials(user, secret);
        }
        try_connect(o).map(|(client, conn)| MqttTenantClient { client, conn })
    }

    fn subscribe_all(&mut self) {
        subscribe(&self.client, &mut self.conn, "#");
    }

    fn publish(&mut self, topic: &str, payload: &[u8]) {
        publish_acked(&self.client, &mut self.conn, topic, &[payload.to_vec()]);
    }

    fn received(&mut self, want: usize) -> Vec<(String, Vec<u8>)> {
        collect(&mut self.conn, want, Duration::from_millis(500))
    }

    fn crafted_topics(other: &str) -> Vec<String> {
        vec![
            format!("persistent://{other}/default/mqtt"),
            format!("../{other}/default/mqtt"),
            format!("%2F..%2F{other}"),
            format!("/{other}/"),
            format!("{other}/default/mqtt/"),
        ]
    }
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(Instant::now())
}

#[test]
fn tenants_never_see_each_other_and_tokens_are_checked_everywhere() {
    let gw = two_tenants("");
    isolation_suite::<MqttTenantClient>(&gw);
    let alice_token = token(&gw, "alice", Some("1h"));

    // The same tokens on the embedded broker's port, with the official-protocol client.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let acme = "persistent://acme/default/native";
        let globex = "persistent://globex/default/native";
        assert!(
            can_produce(&gw, Some(&alice_token), acme).await,
            "alice's token refused in acme"
        );
        assert!(
            !can_produce(&gw, Some(&alice_token), globex).await,
            "alice's token reached globex"
        );
        assert!(
            !can_produce(&gw, None, acme).await,
            "no token accepted with anonymous off"
        );
        let expired = token(&gw, "alice", Some("1s"));
        tokio::time::sleep(Duration::from_millis(2100)).await;
        assert!(
            !can_produce(&gw, Some(&expired), acme).await,
            "expired token accepted"
        );
        // Signed with another key.
        let forged = magnetar_broker::auth::sign(
            &magnetar_broker::auth::SignKey::Hs256(b"not the gateway's key".to_vec()),
            "alice",
            None,
        )
        .expect("sign");
        assert!(
            !can_produce(&gw, Some(&forged), acme).await,
            "forged token accepted"
        );
        // alg=none with alice as subject.
        let none = format!(
            "{}.{}.",
            b64url(br#"{"alg":"none","typ":"JWT"}"#),
            b64url(br#"{"sub":"alice"}"#)
        );
        assert!(
            !can_produce(&gw, Some(&none), acme).await,
            "alg=none accepted"
        );
        // Regex / namespace listing of the other tenant is refused too.
        let client = pulsar_client(&gw, Some(&alice_token))
            .await
            .expect("client");
        let listed = client
            .get_topics_of_namespace(
                "globex/default".into(),
                pulsar::proto::command_get_topics_of_namespace::Mode::All,
            )
            .await;
        assert!(listed.is_err(), "alice listed globex's topics: {listed:?}");
    });
    // The same forged and expired tokens on the MQTT listener.
    let expired = token(&gw, "alice", Some("1s"));
    std::thread::sleep(Duration::from_millis(1100));
    assert!(try_connect(mqtt_options("exp", gw.mqtt, "alice", &expired)).is_err());
    let bob_token = token(&gw, "bob", None);
    let (_c, _conn) = connect(mqtt_options("b-tok", gw.mqtt, "bob", &bob_token));
    // A token is bound to its user: bob's token is not alice's password.
    assert!(try_connect(mqtt_options("cross", gw.mqtt, "alice", &bob_token)).is_err());
}

fn b64url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[test]
fn payloads_are_encrypted_at_rest_and_keys_rotate_and_shred() {
    let gw = two_tenants("");
    let known = b"KNOWN-PLAINTEXT-d2c1b0a9-acme-at-rest";
    // A persistent session keeps a backlog across rotation and shredding.
    let mut o = mqtt_options("keeper", gw.mqtt, "alice", "alice-secret");
    o.set_clean_session(false);
    let (keeper, mut keeper_conn) = connect(o.clone());
    subscribe(&keeper, &mut keeper_conn, "vault/#");
    let (alice, mut alice_conn) = connect(mqtt_options("writer", gw.mqtt, "alice", "alice-secret"));
    publish_acked(&alice, &mut alice_conn, "vault/a", &[known.to_vec()]);
    let got = collect(&mut keeper_conn, 1, Duration::from_millis(200));
    assert_eq!(
        got,
        vec![("vault/a".to_string(), known.to_vec())],
        "the gateway decrypts"
    );

    // A native consumer on the backend (the gateway's superuser role) sees ciphertext.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let superuser = {
        // The gateway's own role; its token is signed with the same key as users' tokens.
        let config = std::fs::read_to_string(&gw.config_path).expect("config");
        let secret = config
            .lines()
            .find_map(|l| l.strip_prefix("token_secret = "))
            .expect("token_secret in the example")
            .trim_matches('"')
            .to_string();
        use base64::Engine;
        let key = base64::engine::general_purpose::STANDARD
            .decode(secret)
            .expect("base64");
        magnetar_broker::auth::sign(
            &magnetar_broker::auth::SignKey::Hs256(key),
            "magnetar-gateway",
            None,
        )
        .expect("sign")
    };
    rt.block_on(async {
        let client = pulsar_client(&gw, Some(&superuser)).await.expect("client");
        let mut consumer: Consumer<Vec<u8>, TokioExecutor> = client
            .consumer()
            .with_topic("persistent://acme/default/mqtt")
            .with_subscription("native-reader")
            .with_subscription_type(SubType::Exclusive)
            .with_options(
                pulsar::ConsumerOptions::default()
                    .with_initial_position(pulsar::consumer::InitialPosition::Earliest),
            )
            .build()
            .await
            .expect("consumer");
        let msg = tokio::time::timeout(WAIT, consumer.next())
            .await
            .expect("a message")
            .expect("stream")
            .expect("message");
        let data = &msg.payload.data;
        assert!(
            !data.windows(known.len()).any(|w| w == known),
            "plaintext on the backend"
        );
        assert!(
            msg.payload
                .metadata
                .properties
                .iter()
                .any(|p| p.key == "magnetar.enc"),
            "no key id property"
        );
    });
    // No file under the data directory holds the plaintext (broker log, kv, cursors...).
    std::thread::sleep(Duration::from_millis(300));
    for f in files(&gw.data_dir()) {
        let bytes = std::fs::read(&f).unwrap_or_default();
        assert!(
            !bytes.windows(known.len()).any(|w| w == known),
            "{} holds the plaintext",
            f.display()
        );
    }

    // Rotation: messages sealed before and after both open.
    let (s, body) = http(
        gw.admin,
        "POST",
        "/admin/v1/tenants/acme/keys/rotate",
        Some(ADMIN_TOKEN),
        "",
    );
    assert_eq!(s, 200, "{body}");
    drop(keeper);
    drop(keeper_conn);
    std::thread::sleep(Duration::from_millis(300));
    publish_acked(
        &alice,
        &mut alice_conn,
        "vault/b",
        &[b"after-rotation".to_vec()],
    );
    let (keeper, mut keeper_conn) = connect(o.clone());
    let got = collect(&mut keeper_conn, 1, Duration::from_millis(300));
    assert_eq!(
        got,
        vec![("vault/b".to_string(), b"after-rotation".to_vec())]
    );
    let (s, body) = http(
        gw.admin,
        "GET",
        "/admin/v1/tenants/acme/keys",
        Some(ADMIN_TOKEN),
        "",
    );
    assert_eq!(s, 200);
    let keys: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(keys["keys"].as_array().map(|a| a.len()), Some(2), "{body}");

    // Shredding: a backlog sealed with the old keys can never be read; new data can.
    drop(keeper);
    drop(keeper_conn);
    std::thread::sleep(Duration::from_millis(300));
    publish_acked(
        &alice,
        &mut alice_conn,
        "vault/c",
        &[b"before-shred".to_vec()],
    );
    let (s, _) = http(
        gw.admin,
        "DELETE",
        "/admin/v1/tenants/acme/keys",
        Some(ADMIN_TOKEN),
        "",
    );
    assert_eq!(s, 204);
    let (_keeper, mut keeper_conn) = connect(o);
    publish_acked(
        &alice,
        &mut alice_conn,
        "vault/d",
        &[b"after-shred".to_vec()],
    );
    let got = collect(&mut keeper_conn, 1, Duration::from_millis(500));
    assert_eq!(got, vec![("vault/d".to_string(), b"after-shred".to_vec())]);
    // Admin calls need the admin token.
    let (s, _) = http(
        gw.admin,
        "DELETE",
        "/admin/v1/tenants/globex/keys",
        None,
        "",
    );
    assert_eq!(s, 401);
    let (s, _) = http(
        gw.admin,
        "DELETE",
        "/admin/v1/tenants/globex/keys",
        Some(&token(&gw, "alice", None)),
        "",
    );
    assert_eq!(s, 403);
}

#[test]
fn quotas_slow_one_tenant_and_spare_the_other() {
    const RATE: f64 = 200.0;
    const N: usize = 600;
    let gw = two_tenants("");
    // Limits change live through the admin API.
    let (s, body) = http(
        gw.admin,
        "PUT",
        "/admin/v1/tenants/acme",
        Some(ADMIN_TOKEN),
        &format!(
            r#"{{"encryption": true, "limits": {{"publish_msgs_per_sec": {RATE}, "max_connections": 3}}}}"#
        ),
    );
    assert_eq!(s, 200, "{body}");
    let payloads: Vec<Vec<u8>> = (0..N).map(|i| format!("m{i}").into_bytes()).collect();
    let run = |user: &'static str, password: &'static str| {
        let addr = gw.mqtt;
        let payloads = payloads.clone();
        std::thread::spawn(move || {
            let (c, mut conn) =
                connect(mqtt_options(&format!("{user}-rate"), addr, user, password));
            let t0 = Instant::now();
            publish_acked(&c, &mut conn, "load", &payloads);
            t0.elapsed()
        })
    };
    let alice = run("alice", "alice-secret");
    let bob = run("bob", "bob-secret");
    let alice = alice.join().expect("alice thread");
    let bob = bob.join().expect("bob thread");
    let alice_rate = N as f64 / alice.as_secs_f64();
    let bob_rate = N as f64 / bob.as_secs_f64();
    // The first tenth of a second's worth goes as a burst.
    let expected = (N as f64 - RATE * 0.1) / alice.as_secs_f64();
    assert!(
        (alice_rate - RATE).abs() / RATE < 0.10 || (expected - RATE).abs() / RATE < 0.10,
        "acme published at {alice_rate:.0} msgs/s, limit {RATE}"
    );
    assert!(
        bob_rate > 2.0 * RATE,
        "globex was slowed too: {bob_rate:.0} msgs/s"
    );

    // Connection flood over the limit: refused cleanly, the others keep working.
    let mut held = Vec::new();
    for i in 0..3 {
        held.push(connect(mqtt_options(
            &format!("hold{i}"),
            gw.mqtt,
            "alice",
            "alice-secret",
        )));
    }
    for i in 0..5 {
        assert!(
            try_connect(mqtt_options(
                &format!("flood{i}"),
                gw.mqtt,
                "alice",
                "alice-secret"
            ))
            .is_err(),
            "connection over the limit accepted"
        );
    }
    let (c, conn) = &mut held[0];
    publish_acked(c, conn, "still", &[b"works".to_vec()]);
    let (_b, _bc) = connect(mqtt_options("bob-ok", gw.mqtt, "bob", "bob-secret"));
    let (usage, body) = acme_usage(&gw);
    assert!(usage["published_msgs"].as_u64() >= Some(N as u64), "{body}");
    assert!(usage["refused"].as_u64() >= Some(5), "{body}");
    assert!(usage["throttled_msgs"].as_u64() > Some(0), "{body}");
}

/// A test PKI: a CA, and certificates it signs.
pub struct Pki {
    dir: tempfile::TempDir,
    ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "test CA");
        let ca = params.self_signed(&ca_key).expect("CA");
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).expect("ca.pem");
        Pki { dir, ca, ca_key }
    }

    pub fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    /// Writes NAME.pem and NAME.key for a certificate with this CN and these DNS names.
    pub fn issue(&self, name: &str, cn: &str, dns: &[&str]) -> (Vec<u8>, Vec<u8>) {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params =
            rcgen::CertificateParams::new(dns.iter().map(|d| d.to_string()).collect::<Vec<_>>())
                .expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let cert = params
            .signed_by(&key, &self.ca, &self.ca_key)
            .expect("sign");
        let (pem, key) = (cert.pem().into_bytes(), key.serialize_pem().into_bytes());
        std::fs::write(self.path(&format!("{name}.pem")), &pem).expect("cert");
        std::fs::write(self.path(&format!("{name}.key")), &key).expect("key");
        (pem, key)
    }
}

#[test]
fn client_certificates_map_to_users_and_sni_picks_the_tenant_certificate() {
    let pki = Pki::new();
    let device = pki.issue("device", "sensor-17", &[]);
    let stranger = pki.issue("stranger", "nobody-knows-me", &[]);
    pki.issue("acme-server", "acme", &["acme.example"]);
    let gw = two_tenants(&format!(
        r#"
[tls]
client_ca = {ca:?}

[[tls.certificates]]
server_name = "acme.example"
cert = {cert:?}
key = {key:?}

[[auth.users]]
name = "sensor-17"
certificate_cn = "sensor-17"
tenant = "acme"
"#,
        ca = pki.path("ca.pem"),
        cert = pki.path("acme-server.pem"),
        key = pki.path("acme-server.key"),
    ));
    let tls = |id: &str, client: Option<(Vec<u8>, Vec<u8>)>| {
        let mut o = MqttOptions::new(id, "localhost", gw.mqtts.port());
        o.set_keep_alive(Duration::from_secs(30));
        o.set_transport(rumqttc::Transport::tls(gw.ca_pem(), client, None));
        o
    };
    // alice (password) watches acme; the device publishes with only its certificate.
    let (watch, mut watch_conn) = connect(mqtt_options("watch", gw.mqtt, "alice", "alice-secret"));
    subscribe(&watch, &mut watch_conn, "devices/#");
    let (dev, mut dev_conn) = connect(tls("sensor", Some(device)));
    publish_acked(&dev, &mut dev_conn, "devices/17", &[b"21.5C".to_vec()]);
    let got = collect(&mut watch_conn, 1, Duration::from_millis(300));
    assert_eq!(got, vec![("devices/17".to_string(), b"21.5C".to_vec())]);
    // A certificate the CA signed but no user claims, and no certificate at all, are refused
    // (anonymous access is off); a password over TLS still works.
    assert!(try_connect(tls("stranger", Some(stranger))).is_err());
    assert!(try_connect(tls("nocert", None)).is_err());
    let mut o = tls("bob-tls", None);
    o.set_credentials("bob", "bob-secret");
    assert!(try_connect(o).is_ok());

    // SNI: asking for acme.example gets the certificate the test CA signed for it.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mut roots = rustls::RootCertStore::empty();
        let ca_pem = std::fs::read(pki.path("ca.pem")).expect("ca");
        for c in rustls_pemfile::certs(&mut ca_pem.as_slice()) {
            roots.add(c.expect("ca cert")).expect("root");
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
        let handshake = |name: &'static str| {
            let connector = connector.clone();
            let addr = gw.mqtts;
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await.expect("tcp");
                let name = rustls::pki_types::ServerName::try_from(name).expect("name");
                connector.connect(name, tcp).await
            }
        };
        assert!(
            handshake("acme.example").await.is_ok(),
            "SNI certificate not served"
        );
        // Any other name gets the default certificate, which this CA did not sign.
        assert!(handshake("localhost").await.is_err());

        // A reconnecting device resumes its TLS session (a session ticket): no full
        // handshake, and the resumed session still says who it is.
        let (cert_pem, key_pem) = std::fs::read(pki.path("device.pem"))
            .and_then(|c| Ok((c, std::fs::read(pki.path("device.key"))?)))
            .expect("device credentials");
        let chain: Vec<_> = rustls_pemfile::certs(&mut cert_pem.as_slice())
            .map(|c| c.expect("cert"))
            .collect();
        let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
            .expect("key")
            .expect("a key");
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pemfile::certs(&mut gw.ca_pem().as_slice()) {
            roots.add(c.expect("ca cert")).expect("root");
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .expect("client auth");
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
        let mut kinds = Vec::new();
        for _ in 0..2 {
            let tcp = tokio::net::TcpStream::connect(gw.mqtts).await.expect("tcp");
            let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
            let mut tls = connector.connect(name, tcp).await.expect("handshake");
            kinds.push(tls.get_ref().1.handshake_kind());
            // MQTT 3.1.1 CONNECT, clean session, no credentials: the certificate logs in.
            let id = b"resumer";
            let mut connect = vec![0x10, 12 + id.len() as u8, 0, 4];
            connect.extend_from_slice(b"MQTT");
            connect.extend_from_slice(&[4, 0x02, 0, 30, 0, id.len() as u8]);
            connect.extend_from_slice(id);
            tokio::io::AsyncWriteExt::write_all(&mut tls, &connect)
                .await
                .expect("connect");
            let mut connack = [0u8; 4];
            tokio::io::AsyncReadExt::read_exact(&mut tls, &mut connack)
                .await
                .expect("connack");
            assert_eq!(connack, [0x20, 2, 0, 0], "the certificate's user logs in");
        }
        assert_eq!(
            kinds,
            vec![
                Some(rustls::HandshakeKind::Full),
                Some(rustls::HandshakeKind::Resumed)
            ]
        );
    });
}

#[test]
fn admin_api_changes_apply_live_and_survive_a_restart() {
    let mut gw = two_tenants("");
    let admin = |gw: &Gateway, method: &str, path: &str, body: &str| {
        http(gw.admin, method, path, Some(ADMIN_TOKEN), body)
    };
    assert_eq!(http(gw.admin, "GET", "/admin/v1/tenants", None, "").0, 401);
    let (s, body) = admin(
        &gw,
        "PUT",
        "/admin/v1/tenants/initech",
        r#"{"encryption": false}"#,
    );
    assert_eq!(s, 200, "{body}");
    let (s, body) = admin(
        &gw,
        "PUT",
        "/admin/v1/users/peter",
        r#"{"tenant": "initech", "password": "tps-report"}"#,
    );
    assert_eq!(s, 200, "{body}");
    assert!(
        !body.contains("tps-report"),
        "the API echoed a password: {body}"
    );
    // Bad input gets a clear 400, not a crash.
    let (s, body) = admin(&gw, "PUT", "/admin/v1/users/x", r#"{"tenant": "nope"}"#);
    assert_eq!(s, 400, "{body}");
    let (s, _) = admin(&gw, "PUT", "/admin/v1/tenants/..%2Fetc", "{}");
    assert_eq!(s, 400);
    let (s, _) = admin(&gw, "PUT", "/admin/v1/users/y", "not json");
    assert_eq!(s, 400);

    // Live: peter logs in at once, in his own tenant.
    let mut peter = MqttTenantClient::login(&gw, "peter", "tps-report").expect("peter logs in");
    peter.publish("memo", b"initech-1");
    // The saved change holds no plain password.
    let saved = std::fs::read_to_string(gw.data_dir().join("admin/changes.json")).expect("saved");
    assert!(!saved.contains("tps-report"));
    drop(peter);

    // A restart keeps API changes; deleting the user locks it out.
    gw.kill9();
    gw.spawn();
    assert!(MqttTenantClient::login(&gw, "peter", "tps-report").is_ok());
    let (s, _) = admin(&gw, "DELETE", "/admin/v1/users/peter", "");
    assert_eq!(s, 204);
    assert!(MqttTenantClient::login(&gw, "peter", "tps-report").is_err());
    let (s, body) = admin(&gw, "GET", "/admin/v1/users", "");
    assert_eq!(s, 200);
    let users: serde_json::Value = serde_json::from_str(&body).expect("json");
    let names: Vec<&str> = users
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|u| u["name"].as_str())
        .collect();
    assert_eq!(names, vec!["alice", "bob"]);
    let (s, metrics) = http(gw.admin, "GET", "/metrics", None, "");
    assert_eq!(s, 200);
    assert!(
        metrics.contains("magnetar_tenant_published_messages_total{tenant=\"initech\"}"),
        "{metrics}"
    );
}

#[test]
fn storage_quota_refuses_publishes_once_the_tenant_is_full() {
    let gw = two_tenants("");
    let (s, body) = http(
        gw.admin,
        "PUT",
        "/admin/v1/tenants/acme",
        Some(ADMIN_TOKEN),
        r#"{"encryption": true, "limits": {"max_stored_bytes": 20000}}"#,
    );
    assert_eq!(s, 200, "{body}");
    let (alice, mut conn) = connect(mqtt_options("filler", gw.mqtt, "alice", "alice-secret"));
    // 1 KiB at a time, each waited for, until the gateway refuses (MQTT 3.1.1 has no
    // negative PUBACK: the connection is closed) or 15 s pass.
    let mut stored = 0;
    let deadline = Instant::now() + Duration::from_secs(15);
    let refused = 'fill: loop {
        assert!(
            Instant::now() < deadline,
            "never refused after {stored} KiB"
        );
        if alice
            .publish("fill", QoS::AtLeastOnce, false, vec![7u8; 1024])
            .is_err()
        {
            break 'fill true;
        }
        let acked = Instant::now() + Duration::from_secs(5);
        loop {
            match conn.recv_timeout(Duration::from_millis(100)) {
                Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => {
                    stored += 1;
                    break;
                }
                Ok(Err(_)) => break 'fill true,
                _ if Instant::now() > acked => break 'fill true,
                _ => {}
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(refused);
    assert!(stored >= 19, "refused after only {stored} KiB");
    // The other tenant is not affected, and usage shows the stored bytes.
    let (bob, mut bob_conn) = connect(mqtt_options("bob-free", gw.mqtt, "bob", "bob-secret"));
    publish_acked(&bob, &mut bob_conn, "fill", &[vec![1u8; 1024]]);
    let (usage, body) = acme_usage(&gw);
    assert!(usage["stored_bytes"].as_u64() >= Some(20000), "{body}");
}
