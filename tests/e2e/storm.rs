//! Reconnect storms: a fleet logging in at once, with passwords, tokens and client
//! certificates, on the contract of `examples/two-tenants.toml` (alice in acme, bob in
//! globex). Each device is driven by rumqttc, logs in, publishes one QoS 1 message to
//! `storm/<client id>` and stays connected; a watcher per tenant proves that every device got
//! its own principal (its message lands in its own tenant, none in the other). A publisher
//! connected before the storm keeps getting PUBACKs throughout.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, Packet, QoS,
    Transport,
};

use crate::harness::{Gateway, Options, ADMIN_TOKEN};
use crate::tenancy::{http, token, Pki};

/// Devices per storm (the issue's floor).
const FLEET: usize = 5_000;
/// Logins in flight at once (a fleet's devices do not all SYN in the same millisecond).
const IN_FLIGHT: usize = 250;
/// The same over TLS: fewer, as the test's own client-side handshakes (rumqttc builds its
/// TLS configuration per connection) share the two cores with the gateway.
const IN_FLIGHT_TLS: usize = 32;
const WAIT: Duration = Duration::from_secs(30);

/// The two-tenants example with more `[auth]` settings.
fn two_tenants_with(auth: &str, extra: &str) -> Gateway {
    let example = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/two-tenants.toml"),
    )
    .expect("examples/two-tenants.toml");
    let example = example.replacen("[auth]\n", &format!("[auth]\n{auth}\n"), 1);
    Gateway::start(Options {
        extra: format!("\n{example}\n{extra}"),
        ..Default::default()
    })
}

/// How a device logs in.
#[derive(Clone)]
enum Login {
    Password(&'static str, String),
    Certificate(Vec<u8>, (Vec<u8>, Vec<u8>)),
}

/// A device of the storm: its client id and who it should be.
struct Device {
    id: String,
    tenant: &'static str,
    login: Login,
}

fn options(gw: &Gateway, d: &Device) -> MqttOptions {
    let mut o = match &d.login {
        Login::Password(user, secret) => {
            let mut o = MqttOptions::new(&d.id, gw.mqtt.ip().to_string(), gw.mqtt.port());
            o.set_credentials(*user, secret);
            o
        }
        Login::Certificate(ca, client) => {
            let mut o = MqttOptions::new(&d.id, "localhost", gw.mqtts.port());
            o.set_transport(Transport::tls(ca.clone(), Some(client.clone()), None));
            o
        }
    };
    o.set_keep_alive(Duration::from_secs(60));
    o
}

/// Polls until the CONNACK: `Err` with the refusal.
async fn login(opts: MqttOptions) -> Result<(AsyncClient, EventLoop), String> {
    login_session(opts)
        .await
        .map(|(client, events, _)| (client, events))
}

/// [`login`], also returning the CONNACK's Session Present flag.
pub async fn login_session(opts: MqttOptions) -> Result<(AsyncClient, EventLoop, bool), String> {
    let (client, mut events) = AsyncClient::new(opts, 10);
    // TLS handshakes of a whole fleet share two cores with the gateway: more than
    // rumqttc's default 5 s may pass before one is served.
    let mut network = rumqttc::NetworkOptions::new();
    network.set_connection_timeout(WAIT.as_secs());
    events.set_network_options(network);
    let outcome = tokio::time::timeout(WAIT, async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(a))) => {
                    return match a.code {
                        ConnectReturnCode::Success => Ok(a.session_present),
                        code => Err(format!("refused: {code:?}")),
                    }
                }
                Ok(_) => {}
                Err(ConnectionError::ConnectionRefused(code)) => {
                    return Err(format!("refused: {code:?}"))
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await
    .map_err(|_| "no CONNACK in time".to_string())?;
    outcome.map(|present| (client, events, present))
}

/// Publishes one QoS 1 message and polls until its PUBACK.
async fn publish_acked(client: &AsyncClient, events: &mut EventLoop, topic: &str) {
    client
        .publish(topic, QoS::AtLeastOnce, false, topic.as_bytes().to_vec())
        .await
        .expect("queueing a publish");
    tokio::time::timeout(WAIT, async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => return,
                Ok(_) => {}
                Err(e) => panic!("device connection failed: {e}"),
            }
        }
    })
    .await
    .expect("no PUBACK in time");
}

/// Subscribes to `storm/#` and collects the topics that arrive, until stopped.
struct Watcher {
    seen: Arc<Mutex<BTreeSet<String>>>,
}

impl Watcher {
    async fn start(gw: &Gateway, user: &'static str, secret: &'static str) -> Watcher {
        let mut o = MqttOptions::new(
            format!("watch-{user}"),
            gw.mqtt.ip().to_string(),
            gw.mqtt.port(),
        );
        o.set_credentials(user, secret);
        o.set_keep_alive(Duration::from_secs(60));
        o.set_inflight(1000);
        let (client, mut events) = login(o).await.expect("watcher logs in");
        client
            .subscribe("storm/#", QoS::AtMostOnce)
            .await
            .expect("subscribe");
        loop {
            if let Event::Incoming(Packet::SubAck(_)) = events.poll().await.expect("suback") {
                break;
            }
        }
        let seen = Arc::new(Mutex::new(BTreeSet::new()));
        let sink = seen.clone();
        tokio::spawn(async move {
            let _client = client;
            while let Ok(e) = events.poll().await {
                if let Event::Incoming(Packet::Publish(p)) = e {
                    sink.lock().expect("lock").insert(p.topic);
                }
            }
        });
        Watcher { seen }
    }

    /// Waits until `want` topics arrived (or the time is up); returns what arrived.
    async fn wait_for(&self, want: usize) -> BTreeSet<String> {
        let deadline = Instant::now() + WAIT;
        while self.seen.lock().expect("lock").len() < want && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        std::mem::take(&mut *self.seen.lock().expect("lock"))
    }
}

/// A publisher connected before the storm: publishes QoS 1 back to back and records the
/// longest wait for a PUBACK.
struct Steady {
    stop: Arc<AtomicBool>,
    /// PUBACKs so far.
    acked: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<(usize, Duration)>,
}

impl Steady {
    async fn start(gw: &Gateway) -> Steady {
        let mut o = MqttOptions::new("steady", gw.mqtt.ip().to_string(), gw.mqtt.port());
        o.set_credentials("alice", "alice-secret");
        o.set_keep_alive(Duration::from_secs(60));
        let (client, mut events) = login(o).await.expect("steady publisher logs in");
        let stop = Arc::new(AtomicBool::new(false));
        let done = stop.clone();
        let acked = Arc::new(AtomicUsize::new(0));
        let count = acked.clone();
        let task = tokio::spawn(async move {
            let (mut acked, mut longest) = (0, Duration::ZERO);
            while !done.load(Ordering::Relaxed) {
                let sent = Instant::now();
                client
                    .publish("steady", QoS::AtLeastOnce, false, b"tick".to_vec())
                    .await
                    .expect("publish");
                loop {
                    match tokio::time::timeout(WAIT, events.poll()).await {
                        Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => break,
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => panic!("the steady publisher lost its connection: {e}"),
                        Err(_) => panic!("the steady publisher got no PUBACK for {WAIT:?}"),
                    }
                }
                acked += 1;
                count.store(acked, Ordering::Relaxed);
                longest = longest.max(sent.elapsed());
            }
            (acked, longest)
        });
        Steady { stop, acked, task }
    }

    /// PUBACKs so far.
    fn acked(&self) -> usize {
        self.acked.load(Ordering::Relaxed)
    }

    /// Waits until more than `n` PUBACKs came (fails the test after [`WAIT`]).
    async fn wait_acked(&self, n: usize) {
        let deadline = Instant::now() + WAIT;
        while self.acked() <= n {
            assert!(
                Instant::now() < deadline && !self.task.is_finished(),
                "the steady publisher got {} PUBACKs, waited for more than {n}",
                self.acked()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn finish(self) -> (usize, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("steady publisher")
    }
}

/// Logs the fleet in, `IN_FLIGHT` at a time; each publishes to `storm/<id>` and stays
/// connected until the storm is over. Returns the logins per second.
async fn storm(gw: &Gateway, fleet: Vec<Device>) -> f64 {
    let started = Instant::now();
    let tls = fleet
        .iter()
        .any(|d| matches!(d.login, Login::Certificate(..)));
    let gate = Arc::new(tokio::sync::Semaphore::new(if tls {
        IN_FLIGHT_TLS
    } else {
        IN_FLIGHT
    }));
    let mut tasks = Vec::with_capacity(fleet.len());
    for d in fleet {
        let opts = options(gw, &d);
        let gate = gate.clone();
        tasks.push(tokio::spawn(async move {
            let _turn = gate.acquire_owned().await.expect("semaphore");
            let (client, mut events) = login(opts)
                .await
                .unwrap_or_else(|e| panic!("device {} ({}) refused: {e}", d.id, d.tenant));
            publish_acked(&client, &mut events, &format!("storm/{}", d.id)).await;
            (client, events)
        }));
    }
    let mut connected = Vec::with_capacity(tasks.len());
    for t in tasks {
        connected.push(t.await.expect("device task"));
    }
    // Dropping them closes their sockets.
    connected.len() as f64 / started.elapsed().as_secs_f64()
}

/// Runs a storm of `fleet` and checks that each device's message reached its own tenant.
async fn storm_lands_in_the_right_tenants(gw: &Gateway, what: &str, fleet: Vec<Device>) {
    let expect = |tenant: &str| -> BTreeSet<String> {
        fleet
            .iter()
            .filter(|d| d.tenant == tenant)
            .map(|d| format!("storm/{}", d.id))
            .collect()
    };
    let (acme, globex) = (expect("acme"), expect("globex"));
    let alice = Watcher::start(gw, "alice", "alice-secret").await;
    let bob = Watcher::start(gw, "bob", "bob-secret").await;
    let steady = Steady::start(gw).await;
    let rate = storm(gw, fleet).await;
    let (acked, longest) = steady.finish().await;
    eprintln!(
        "{what}: {} logins at {rate:.0}/s; the steady publisher got {acked} PUBACKs, the longest after {longest:?}",
        acme.len() + globex.len()
    );
    assert!(
        acked > 0,
        "the steady publisher got no PUBACK during the storm"
    );
    assert_eq!(
        alice.wait_for(acme.len()).await,
        acme,
        "{what}: acme's devices"
    );
    assert_eq!(
        bob.wait_for(globex.len()).await,
        globex,
        "{what}: globex's devices"
    );
}

/// The login cache's counters from `/metrics`.
fn cache_counters(gw: &Gateway) -> (u64, u64) {
    let (status, body) = http(gw.admin, "GET", "/metrics", None, "");
    assert_eq!(status, 200);
    let value = |name: &str| {
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from /metrics"))
    };
    (
        value("magnetar_login_cache_hits_total"),
        value("magnetar_login_cache_misses_total"),
    )
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn a_fleet_of_5000_logs_in_at_once_with_passwords_tokens_and_certificates() {
    let pki = Pki::new();
    let certs: Vec<_> = (0..4)
        .map(|i| pki.issue(&format!("dev{i}"), &format!("cert-dev-{i}"), &[]))
        .collect();
    let mut extra = format!("[tls]\nclient_ca = {:?}\n", pki.path("ca.pem"));
    for i in 0..4usize {
        let tenant = if i.is_multiple_of(2) {
            "acme"
        } else {
            "globex"
        };
        extra.push_str(&format!(
            "\n[[auth.users]]\nname = \"cert-dev-{i}\"\ncertificate_cn = \"cert-dev-{i}\"\ntenant = \"{tenant}\"\n"
        ));
    }
    let gw = two_tenants_with("", &extra);
    let tokens = [
        token(&gw, "alice", Some("1h")),
        token(&gw, "bob", Some("1h")),
    ];
    let ca = gw.ca_pem();
    let device = |i: usize, kind: &str| {
        let tenant = if i.is_multiple_of(2) {
            "acme"
        } else {
            "globex"
        };
        let id = format!("{kind}-{i}");
        let login = match kind {
            "pw" if i.is_multiple_of(2) => Login::Password("alice", "alice-secret".into()),
            "pw" => Login::Password("bob", "bob-secret".into()),
            "tok" => Login::Password("token", tokens[i % 2].clone()),
            _ => Login::Certificate(ca.clone(), certs[i % 4].clone()),
        };
        Device { id, tenant, login }
    };
    let rt = runtime();
    rt.block_on(async {
        for kind in ["pw", "tok", "cert"] {
            let fleet = (0..FLEET).map(|i| device(i, kind)).collect();
            storm_lands_in_the_right_tenants(&gw, kind, fleet).await;
        }
        // The password storm was served from the cache: a handful of argon2 runs, not 5,000.
        let (hits, misses) = cache_counters(&gw);
        assert!(
            hits >= FLEET as u64 - 50,
            "cache hits {hits}, misses {misses}"
        );
        assert!(misses <= 50, "cache hits {hits}, misses {misses}");
        // Wrong passwords are refused, also one byte away from the cached one.
        for wrong in [
            "alice-secreT",
            "alice-secret\0",
            "alice-secre",
            "alice-secretx",
            "",
        ] {
            let d = Device {
                id: format!("wrong-{}", wrong.len()),
                tenant: "acme",
                login: Login::Password("alice", wrong.into()),
            };
            let outcome = login(options(&gw, &d)).await;
            assert!(outcome.is_err(), "wrong password {wrong:?} accepted");
        }
    });
}

#[test]
fn cached_logins_expire_and_follow_admin_changes_and_restarts() {
    let gw = two_tenants_with("login_cache_ttl_secs = 2", "");
    let rt = runtime();
    let alice = |secret: &str| Device {
        id: format!("alice-{secret}"),
        tenant: "acme",
        login: Login::Password("alice", secret.into()),
    };
    let logs_in = |gw: &Gateway, d: &Device| rt.block_on(login(options(gw, d))).is_ok();
    assert!(logs_in(&gw, &alice("alice-secret")));
    assert!(logs_in(&gw, &alice("alice-secret")));
    assert_eq!(
        cache_counters(&gw),
        (1, 1),
        "the second login hit the cache"
    );

    // Expired: the next login verifies again.
    std::thread::sleep(Duration::from_millis(2_100));
    assert!(logs_in(&gw, &alice("alice-secret")));
    assert_eq!(cache_counters(&gw), (1, 2), "an expired entry was used");

    // A password changed through the admin API: the old one is refused at once.
    let put = r#"{"tenant": "acme", "namespace": "default", "password": "new-secret"}"#;
    let (status, body) = http(
        gw.admin,
        "PUT",
        "/admin/v1/users/alice",
        Some(ADMIN_TOKEN),
        put,
    );
    assert_eq!(status, 200, "{body}");
    assert!(
        !logs_in(&gw, &alice("alice-secret")),
        "old password accepted"
    );
    assert!(logs_in(&gw, &alice("new-secret")));
    // A deleted user is refused at once, cached or not.
    let (status, _) = http(
        gw.admin,
        "DELETE",
        "/admin/v1/users/alice",
        Some(ADMIN_TOKEN),
        "",
    );
    assert_eq!(status, 204);
    assert!(!logs_in(&gw, &alice("new-secret")), "deleted user accepted");
}

#[test]
fn the_login_cache_serves_the_storm_after_a_restart() {
    let mut gw = two_tenants_with("", "");
    let rt = runtime();
    let bob = Device {
        id: "bob".into(),
        tenant: "globex",
        login: Login::Password("bob", "bob-secret".into()),
    };
    assert!(rt.block_on(login(options(&gw, &bob))).is_ok());
    assert_eq!(cache_counters(&gw), (0, 1));
    // A graceful stop saves the cache; the new process serves bob from it.
    gw.stop();
    gw.spawn();
    assert!(rt.block_on(login(options(&gw, &bob))).is_ok());
    assert_eq!(cache_counters(&gw), (1, 0), "bob's login after the restart");
}

/// An MQTT 3.1.1 (`level` 4) or 5.0 (`level` 5) CONNECT with a username and password, clean
/// start.
fn connect_with_password(level: u8, id: &str, user: &str, password: &str) -> Vec<u8> {
    let field = |s: &str| {
        let mut f = (s.len() as u16).to_be_bytes().to_vec();
        f.extend_from_slice(s.as_bytes());
        f
    };
    let mut body = field("MQTT");
    body.extend_from_slice(&[level, 0xC2, 0, 30]);
    if level == 5 {
        // No properties.
        body.push(0);
    }
    for s in [id, user, password] {
        body.extend(field(s));
    }
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend(body);
    packet
}

#[test]
fn logins_past_what_the_machine_can_verify_get_server_busy() {
    // One verification may wait at a time: a cold storm of 40 users (argon2 each) overflows.
    let mut extra = String::new();
    for i in 0..40 {
        extra.push_str(&format!(
            "\n[[auth.users]]\nname = \"cold-{i}\"\npassword = \"pw-{i}\"\ntenant = \"acme\"\n"
        ));
    }
    let gw = two_tenants_with("max_waiting_logins = 1", &extra);
    let rt = runtime();
    // Connected before the storm, its traffic must keep flowing through it.
    let steady = rt.block_on(Steady::start(&gw));
    let acked_before = steady.acked();
    let addr = gw.mqtt;
    // Even devices speak MQTT 3.1.1, odd ones 5.0.
    let level = |i: usize| if i.is_multiple_of(2) { 4 } else { 5 };
    let codes: Vec<u8> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..40)
            .map(|i| {
                s.spawn(move || {
                    use std::io::{Read, Write};
                    let mut tcp = std::net::TcpStream::connect(addr).expect("connect");
                    tcp.set_read_timeout(Some(WAIT)).expect("timeout");
                    let (id, user, pw) =
                        (format!("busy-{i}"), format!("cold-{i}"), format!("pw-{i}"));
                    tcp.write_all(&connect_with_password(level(i), &id, &user, &pw))
                        .expect("CONNECT");
                    // 3.1.1: 0x20, 2, flags, return code; 5.0: 0x20, length, flags, reason.
                    let mut head = [0u8; 4];
                    tcp.read_exact(&mut head).expect("CONNACK");
                    assert_eq!(head[0], 0x20, "a CONNACK");
                    head[3]
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("device"))
            .collect()
    });
    // MQTT 3.1.1 has no "busy": 3, Server unavailable (§3.2.2.3); 5.0: 0x89, Server busy.
    let (v4, v5): (Vec<_>, Vec<_>) = codes.iter().enumerate().partition(|(i, _)| level(*i) == 4);
    for (version, codes, busy_code) in [("3.1.1", v4, 3), ("5.0", v5, 0x89)] {
        let busy = codes.iter().filter(|(_, &c)| c == busy_code).count();
        let ok = codes.iter().filter(|(_, &c)| c == 0).count();
        assert_eq!(
            ok + busy,
            codes.len(),
            "{version}: only success or server busy: {codes:?}"
        );
        assert!(
            busy >= 1,
            "{version}: nobody was told to come back: {codes:?}"
        );
    }
    assert!(codes.contains(&0), "some were verified: {codes:?}");
    // The publisher connected before kept its connection and its PUBACKs.
    rt.block_on(steady.wait_acked(acked_before + 3));
    let (acked, longest) = rt.block_on(steady.finish());
    eprintln!("the steady publisher got {acked} PUBACKs, the longest after {longest:?}");
}
