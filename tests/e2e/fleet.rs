//! MQTT fan-out routing at fleet scale, and the routing rules it must keep.
//!
//! A fleet of devices, each subscribed to its own `dev/<id>/cmd` and publishing telemetry to
//! its own `dev/<id>/tele`, and one application subscribed to `dev/+/tele` that commands
//! every device: each device must get exactly its own commands and the application every
//! device's telemetry, with clean sessions, and with persistent sessions whose commands wait
//! through a kill -9 of the gateway. Even-numbered devices use QoS 0, odd ones QoS 1. Then
//! the rules, with a few clients: overlapping filters of one session deliver one copy
//! (MQTT 3.1.1 §3.3.5), `$` topics stay out of leading wildcards (§4.7.2), a share group
//! splits the messages (MQTT 5.0 §4.8.2), and two gateways on one backend share sessions and
//! messages.
//!
//! The fleet has `E2E_FLEET` devices (default 2,000). Every phase waits for its condition and
//! fails after a bound that grows with the fleet; the fleet tests run one at a time, as each
//! keeps both cores busy.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS};

use crate::harness::{Gateway, Options, ADMIN_TOKEN};
use crate::mqtt::{assert_quiet, connect, drive, options, publish_all, receive, receive_full};
use crate::storm::{login_session, runtime};
use crate::tenancy::{http, token};

/// Commands the application sends each device, and telemetry messages each device sends.
const PER_DEVICE: usize = 2;
/// Logins in flight at once, as in the storm tests.
const IN_FLIGHT: usize = 250;
/// Absence (no stray message) can only be observed over a window: this one, once, after
/// everything expected has arrived.
const SETTLE: Duration = Duration::from_secs(1);

/// Held by each fleet test for its whole run.
static ONE_FLEET_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_fleet_at_a_time() -> MutexGuard<'static, ()> {
    // A failed fleet test poisons the lock; the next one still runs.
    ONE_FLEET_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn fleet_size() -> usize {
    std::env::var("E2E_FLEET").map_or(2_000, |v| {
        v.parse().expect("E2E_FLEET: a number of devices")
    })
}

/// How long one phase may take. While every subscriber's backend subscription reads the whole
/// namespace, a phase's work grows with the square of the fleet.
fn phase_bound(fleet: usize) -> Duration {
    let n = fleet as u64;
    Duration::from_secs(60) + Duration::from_micros(n * n * 50)
}

/// Device `i`'s QoS: its subscription's, its telemetry's and the application's commands to it.
fn qos_of(i: usize) -> QoS {
    if i.is_multiple_of(2) {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    }
}

fn cmd_topic(i: usize) -> String {
    format!("dev/{i}/cmd")
}

fn tele_topic(i: usize) -> String {
    format!("dev/{i}/tele")
}

/// (topic, payload, QoS) of the `k`th command to device `i`.
fn command(i: usize, k: usize) -> Received {
    (
        cmd_topic(i),
        format!("cmd {k} to {i}").into_bytes(),
        qos_of(i) as u8,
    )
}

/// (topic, payload, QoS) of the `k`th telemetry message of device `i`.
fn telemetry(i: usize, k: usize) -> Received {
    (
        tele_topic(i),
        format!("tele {k} of {i}").into_bytes(),
        qos_of(i) as u8,
    )
}

/// A PUBLISH as a client received it: topic, payload, QoS.
type Received = (String, Vec<u8>, u8);

/// What one client received, and how many of its QoS 1 publishes were acknowledged.
#[derive(Default)]
struct Inbox {
    got: Mutex<Vec<Received>>,
    acked: AtomicUsize,
}

impl Inbox {
    fn take(&self) -> Vec<Received> {
        std::mem::take(&mut *self.got.lock().expect("inbox"))
    }

    /// Distinct messages received so far (QoS 1 may deliver one twice).
    fn distinct(&self) -> usize {
        let got = self.got.lock().expect("inbox");
        got.iter().collect::<BTreeSet<_>>().len()
    }
}

/// The first error of any client's connection: a fleet test fails on it at once.
#[derive(Default)]
struct Failure(Mutex<Option<String>>);

impl Failure {
    fn set(&self, who: &str, e: impl std::fmt::Display) {
        self.0
            .lock()
            .expect("failure")
            .get_or_insert_with(|| format!("{who}: {e}"));
    }

    fn check(&self) {
        if let Some(e) = self.0.lock().expect("failure").as_ref() {
            panic!("a connection failed: {e}");
        }
    }
}

/// A connected client whose event loop runs in its own task, filling its inbox until the
/// client disconnects or the connection fails.
struct Peer {
    client: AsyncClient,
    inbox: Arc<Inbox>,
    driver: tokio::task::JoinHandle<()>,
}

impl Peer {
    /// Logs in, subscribes to `filters` (each SUBACK awaited), and starts the event loop's
    /// task. Also returns the CONNACK's Session Present.
    async fn connect(
        opts: MqttOptions,
        filters: &[(String, QoS)],
        failure: &Arc<Failure>,
    ) -> (Peer, bool) {
        let who = opts.client_id();
        let (client, mut events, present) = login_session(opts)
            .await
            .unwrap_or_else(|e| panic!("{who} could not log in: {e}"));
        let inbox = Arc::new(Inbox::default());
        for (filter, qos) in filters {
            client
                .subscribe(filter, *qos)
                .await
                .expect("queueing a SUBSCRIBE");
            loop {
                match tokio::time::timeout(Duration::from_secs(60), events.poll()).await {
                    Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => break,
                    Ok(Ok(e)) => record(&inbox, e),
                    Ok(Err(e)) => panic!("{who}: connection failed before its SUBACK: {e}"),
                    Err(_) => panic!("{who}: no SUBACK for {filter} in 60 s"),
                }
            }
        }
        let driver = tokio::spawn(run(events, inbox.clone(), failure.clone(), who));
        (
            Peer {
                client,
                inbox,
                driver,
            },
            present,
        )
    }

    /// Sends DISCONNECT (a persistent session stays on the gateway) and waits until it went.
    async fn disconnect(self) {
        self.client.disconnect().await.expect("queueing DISCONNECT");
        self.driver.await.expect("event loop task");
    }
}

/// Polls the event loop until DISCONNECT went out or the connection failed.
async fn run(mut events: EventLoop, inbox: Arc<Inbox>, failure: Arc<Failure>, who: String) {
    loop {
        match events.poll().await {
            Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
            Ok(e) => record(&inbox, e),
            Err(e) => return failure.set(&who, e),
        }
    }
}

fn record(inbox: &Inbox, event: Event) {
    match event {
        Event::Incoming(Packet::Publish(p)) => {
            let got = (p.topic, p.payload.to_vec(), p.qos as u8);
            inbox.got.lock().expect("inbox").push(got);
        }
        Event::Incoming(Packet::PubAck(_)) => {
            inbox.acked.fetch_add(1, Ordering::Relaxed);
        }
        _ => {}
    }
}

/// A device's or application's options: a long keep-alive, as a gateway busy with fan-out
/// may answer a PINGREQ late, and that is not what these tests are about.
fn fleet_options(gw: &Gateway, id: &str, clean: bool) -> MqttOptions {
    let mut o = MqttOptions::new(id, gw.mqtt.ip().to_string(), gw.mqtt.port());
    o.set_keep_alive(Duration::from_secs(300));
    o.set_clean_session(clean);
    o.set_inflight(1_000);
    o
}

/// Logs devices `0..n` in, `IN_FLIGHT` at a time, each subscribed to its own command topic
/// at `subscribe(i)`, or not at all with `None` (a persistent session that has it already).
async fn connect_fleet(
    gw: &Gateway,
    n: usize,
    clean: bool,
    subscribe: Option<fn(usize) -> QoS>,
    failure: &Arc<Failure>,
) -> Vec<(Peer, bool)> {
    let gate = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let opts = fleet_options(gw, &format!("dev-{i}"), clean);
        let filters: Vec<_> = subscribe
            .map(|qos| (cmd_topic(i), qos(i)))
            .into_iter()
            .collect();
        let (gate, failure) = (gate.clone(), failure.clone());
        tasks.push(tokio::spawn(async move {
            let _turn = gate.acquire_owned().await.expect("semaphore");
            Peer::connect(opts, &filters, &failure).await
        }));
    }
    let mut fleet = Vec::with_capacity(n);
    for t in tasks {
        fleet.push(t.await.expect("device login task"));
    }
    fleet
}

/// Waits until `progress` returns (have, want) with have >= want; fails on a connection's
/// failure or after `bound`, saying how far it got.
async fn wait_for(
    what: &str,
    bound: Duration,
    failure: &Failure,
    progress: impl FnMut() -> (usize, usize),
) {
    wait_or_explain(what, bound, failure, progress, String::new).await;
}

/// `wait_for`, with `explain()` added to the failure's message.
async fn wait_or_explain(
    what: &str,
    bound: Duration,
    failure: &Failure,
    mut progress: impl FnMut() -> (usize, usize),
    explain: impl FnOnce() -> String,
) {
    let deadline = Instant::now() + bound;
    loop {
        failure.check();
        let (have, want) = progress();
        if have >= want {
            return;
        }
        if Instant::now() >= deadline {
            panic!("{what}: {have} of {want} after {bound:?}{}", explain());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until every device has received its `PER_DEVICE` distinct commands; on failure
/// names the first devices still waiting, with the backend's view of their session queues.
async fn wait_for_commands(
    gw: &Gateway,
    devices: &[(Peer, bool)],
    bound: Duration,
    failure: &Failure,
) {
    let waiting = || {
        devices
            .iter()
            .enumerate()
            .filter(|(_, (d, _))| d.inbox.distinct() < PER_DEVICE)
            .map(|(i, _)| i)
    };
    let explain = || {
        let Some(web) = gw.web else {
            return String::new();
        };
        let stats = |topic: &str| {
            let path = format!("/admin/v2/persistent/public/default/{topic}/stats");
            let (status, body) = http(web, "GET", &path, Some(ADMIN_TOKEN), "");
            format!("{status} {body}")
        };
        let mut out = String::new();
        for i in waiting().take(3) {
            let got = devices[i].0.inbox.distinct();
            let queue = stats(&format!("mqtt-session-dev-{i}"));
            out.push_str(&format!("\n  dev-{i} has {got}; its queue: {queue}"));
        }
        out.push_str(&format!("\n  the source: {}", stats("mqtt")));
        out
    };
    let progress = || (devices.len() - waiting().count(), devices.len());
    wait_or_explain(
        "devices with all their commands",
        bound,
        failure,
        progress,
        explain,
    )
    .await;
}

/// Compares each device's inbox with its own commands, delivered at `qos(i)`: adds what is
/// wrong to `problems`, returns the QoS 1 duplicates.
fn check_commands(
    devices: &[(Peer, bool)],
    qos: impl Fn(usize) -> u8,
    problems: &mut Vec<String>,
) -> usize {
    let mut duplicates = 0;
    for (i, (d, _)) in devices.iter().enumerate() {
        let want = (0..PER_DEVICE)
            .map(|k| {
                let (topic, payload, _) = command(i, k);
                (topic, payload, qos(i))
            })
            .collect();
        match compare(&format!("dev-{i}"), d.inbox.take(), want) {
            Ok(dups) => duplicates += dups,
            Err(e) => problems.push(e),
        }
    }
    duplicates
}

/// Compares what a client received with what it should have: at QoS 0 each message exactly
/// once, at QoS 1 at least once. Returns the QoS 1 duplicates, or what is wrong.
fn compare(who: &str, mut got: Vec<Received>, mut want: Vec<Received>) -> Result<usize, String> {
    got.sort();
    want.sort();
    let mut counts: BTreeMap<&Received, usize> = BTreeMap::new();
    for g in &got {
        *counts.entry(g).or_default() += 1;
    }
    let distinct: BTreeSet<&Received> = counts.keys().copied().collect();
    let wanted: BTreeSet<&Received> = want.iter().collect();
    if distinct != wanted {
        let missing: Vec<_> = wanted.difference(&distinct).map(|m| show(m)).collect();
        let stray: Vec<_> = distinct.difference(&wanted).map(|m| show(m)).collect();
        return Err(format!("{who}: missing {missing:?}, not for it {stray:?}"));
    }
    let mut duplicates = 0;
    for (m, count) in counts {
        if count > 1 && m.2 == 0 {
            return Err(format!("{who}: QoS 0 {} delivered {count} times", show(m)));
        }
        duplicates += count - 1;
    }
    Ok(duplicates)
}

fn show(m: &Received) -> String {
    format!("{} {:?} QoS {}", m.0, String::from_utf8_lossy(&m.1), m.2)
}

/// Fails with the first few problems of a fleet, and their count.
fn assert_no_problems(what: &str, problems: &[String]) {
    assert!(
        problems.is_empty(),
        "{what}: {} problems, the first: {:#?}",
        problems.len(),
        &problems[..problems.len().min(10)]
    );
}

#[test]
fn fleet_devices_get_only_their_own_commands_and_the_application_all_telemetry() {
    let _one = one_fleet_at_a_time();
    let n = fleet_size();
    let bound = phase_bound(n);
    let gw = Gateway::start(Options::default());
    let rt = runtime();
    rt.block_on(async {
        let failure = Arc::new(Failure::default());
        let started = Instant::now();
        let devices = connect_fleet(&gw, n, true, Some(qos_of), &failure).await;
        let (app, _) = Peer::connect(
            fleet_options(&gw, "fleet-app", true),
            &[("dev/+/tele".into(), QoS::AtLeastOnce)],
            &failure,
        )
        .await;
        let connected = started.elapsed();

        // Commands: QoS 0 to even devices, QoS 1 to odd ones.
        let started = Instant::now();
        for k in 0..PER_DEVICE {
            for i in 0..n {
                let (topic, payload, _) = command(i, k);
                app.client
                    .publish(topic, qos_of(i), false, payload)
                    .await
                    .expect("queueing a command");
            }
        }
        let acks_due = PER_DEVICE * (n / 2);
        wait_for("commands acknowledged", bound, &failure, || {
            (app.inbox.acked.load(Ordering::Relaxed), acks_due)
        })
        .await;
        wait_for_commands(&gw, &devices, bound, &failure).await;
        let commands = started.elapsed();

        // Telemetry: each device at its own QoS.
        let started = Instant::now();
        for k in 0..PER_DEVICE {
            for (i, (d, _)) in devices.iter().enumerate() {
                let (topic, payload, _) = telemetry(i, k);
                d.client
                    .publish(topic, qos_of(i), false, payload)
                    .await
                    .expect("queueing telemetry");
            }
        }
        wait_for("telemetry acknowledged", bound, &failure, || {
            let acked = devices
                .iter()
                .map(|(d, _)| d.inbox.acked.load(Ordering::Relaxed))
                .sum();
            (acked, acks_due)
        })
        .await;
        wait_for("telemetry at the application", bound, &failure, || {
            (app.inbox.distinct(), PER_DEVICE * n)
        })
        .await;
        let telemetry_took = started.elapsed();

        tokio::time::sleep(SETTLE).await;
        failure.check();
        let mut problems = Vec::new();
        let mut duplicates = check_commands(&devices, |i| qos_of(i) as u8, &mut problems);
        let want = (0..n)
            .flat_map(|i| (0..PER_DEVICE).map(move |k| telemetry(i, k)))
            .collect();
        match compare("the application", app.inbox.take(), want) {
            Ok(dups) => duplicates += dups,
            Err(e) => problems.push(e),
        }
        eprintln!(
            "fleet of {n}, clean sessions: connected in {connected:?}, {} commands delivered in \
             {commands:?}, {} telemetry messages in {telemetry_took:?}; {duplicates} QoS 1 duplicates",
            PER_DEVICE * n,
            PER_DEVICE * n,
        );
        assert_no_problems("clean sessions", &problems);
    });
}

#[test]
fn fleet_persistent_sessions_get_their_queued_commands_after_gateway_kill9() {
    let _one = one_fleet_at_a_time();
    let n = fleet_size();
    let bound = phase_bound(n);
    let mut gw = Gateway::start(Options {
        web: true,
        ..Options::default()
    });
    let rt = runtime();
    let failure = Arc::new(Failure::default());
    let started = Instant::now();
    rt.block_on(async {
        let devices = connect_fleet(&gw, n, false, Some(|_| QoS::AtLeastOnce), &failure).await;
        let present = devices.iter().filter(|(_, present)| *present).count();
        assert_eq!(present, 0, "new sessions are not present");
        for (d, _) in devices {
            d.disconnect().await;
        }
    });
    let connected = started.elapsed();

    // Every device away: the commands wait in their sessions.
    let started = Instant::now();
    rt.block_on(async {
        let (app, _) = Peer::connect(fleet_options(&gw, "fleet-app", true), &[], &failure).await;
        for k in 0..PER_DEVICE {
            for i in 0..n {
                let (topic, payload, _) = command(i, k);
                app.client
                    .publish(topic, QoS::AtLeastOnce, false, payload)
                    .await
                    .expect("queueing a command");
            }
        }
        wait_for("commands acknowledged", bound, &failure, || {
            (app.inbox.acked.load(Ordering::Relaxed), PER_DEVICE * n)
        })
        .await;
        app.disconnect().await;
    });
    let queued = started.elapsed();

    // Every command above was PUBACKed: a crash may lose none of them.
    let started = Instant::now();
    gw.kill9();
    gw.spawn();
    let restarted = started.elapsed();

    let started = Instant::now();
    rt.block_on(async {
        let devices = connect_fleet(&gw, n, false, None, &failure).await;
        let absent: Vec<usize> = (0..n).filter(|i| !devices[*i].1).collect();
        assert!(
            absent.is_empty(),
            "{} sessions not present after the restart, e.g. dev-{:?}",
            absent.len(),
            &absent[..absent.len().min(10)]
        );
        wait_for_commands(&gw, &devices, bound, &failure).await;
        let delivered = started.elapsed();

        tokio::time::sleep(SETTLE).await;
        failure.check();
        // Published at QoS 1 to a QoS 1 subscription.
        let mut problems = Vec::new();
        let duplicates = check_commands(&devices, |_| 1, &mut problems);
        eprintln!(
            "fleet of {n}, persistent sessions: connected and away in {connected:?}, {} \
             commands queued in {queued:?}, restart in {restarted:?}, reconnected and \
             delivered in {delivered:?}; {duplicates} QoS 1 duplicates",
            PER_DEVICE * n,
        );
        assert_no_problems("persistent sessions", &problems);
    });
}

/// MQTT 3.1.1 §3.3.5 requires one delivery at the highest QoS of the matching subscriptions
/// and allows a copy per further subscription; Magnetar sends one (one PUBLISH per message
/// and session), and this holds it to that.
#[test]
fn fleet_overlapping_filters_deliver_one_copy_at_the_highest_granted_qos() {
    let gw = Gateway::start(Options::default());
    let (sub, mut sub_conn, _) = connect(options("overlap", gw.mqtt));
    for (filter, qos) in [
        ("a/+/c", QoS::AtMostOnce),
        ("a/#", QoS::AtLeastOnce),
        ("a/b/c", QoS::ExactlyOnce),
    ] {
        crate::mqtt::subscribe(&sub, &mut sub_conn, filter, qos);
    }
    let (publ, mut pub_conn, _) = connect(options("overlap-pub", gw.mqtt));
    publish_all(
        &publ,
        &mut pub_conn,
        &[
            ("a/b/c", QoS::ExactlyOnce, b"all three".to_vec()),
            ("a/x/c", QoS::ExactlyOnce, b"a/+/c and a/#".to_vec()),
            ("a/b/c", QoS::AtLeastOnce, b"all three at 1".to_vec()),
            ("a/b/c/d", QoS::AtMostOnce, b"a/# only".to_vec()),
            ("a", QoS::AtLeastOnce, b"a/# matches its parent".to_vec()),
        ],
    );
    let got: Vec<_> = receive_full(&mut sub_conn, 5)
        .into_iter()
        .map(|(topic, payload, qos, _)| (topic, String::from_utf8(payload).expect("utf-8"), qos))
        .collect();
    let got_set: BTreeSet<_> = got.iter().cloned().collect();
    let want: BTreeSet<_> = [
        ("a/b/c", "all three", 2),
        ("a/x/c", "a/+/c and a/#", 1),
        ("a/b/c", "all three at 1", 1),
        ("a/b/c/d", "a/# only", 0),
        ("a", "a/# matches its parent", 1),
    ]
    .into_iter()
    .map(|(t, p, q)| (t.to_string(), p.to_string(), q))
    .collect();
    assert_eq!(got_set, want, "one copy each, at the highest QoS: {got:?}");
    assert_quiet(&mut sub_conn);
}

/// MQTT 3.1.1 §4.7.2: `#` and `+/...` do not match topics that start with `$`; a filter that
/// starts with the same `$` level does. (Clients may not publish to `$SYS`, so the test uses
/// another `$` topic.)
#[test]
fn fleet_dollar_topics_are_not_matched_by_leading_wildcards() {
    let gw = Gateway::start(Options::default());
    let (wild, mut wild_conn, _) = connect(options("dollar-wild", gw.mqtt));
    crate::mqtt::subscribe(&wild, &mut wild_conn, "#", QoS::AtLeastOnce);
    crate::mqtt::subscribe(&wild, &mut wild_conn, "+/status", QoS::AtLeastOnce);
    crate::mqtt::subscribe(&wild, &mut wild_conn, "+/+/status", QoS::AtLeastOnce);
    let (exact, mut exact_conn, _) = connect(options("dollar-exact", gw.mqtt));
    crate::mqtt::subscribe(&exact, &mut exact_conn, "$fleet/#", QoS::AtLeastOnce);
    crate::mqtt::subscribe(&exact, &mut exact_conn, "$fleet/+", QoS::AtLeastOnce);

    let (publ, mut pub_conn, _) = connect(options("dollar-pub", gw.mqtt));
    publish_all(
        &publ,
        &mut pub_conn,
        &[
            ("$fleet/status", QoS::AtLeastOnce, b"one level".to_vec()),
            ("$fleet/gw/status", QoS::AtLeastOnce, b"two levels".to_vec()),
            ("dev/status", QoS::AtLeastOnce, b"no dollar".to_vec()),
        ],
    );
    assert_eq!(
        receive(&mut wild_conn, 1),
        vec![("dev/status".to_string(), b"no dollar".to_vec())],
        "# and +/... match only the topic without $"
    );
    let got: BTreeSet<_> = receive(&mut exact_conn, 2).into_iter().collect();
    let want: BTreeSet<_> = [
        ("$fleet/status".to_string(), b"one level".to_vec()),
        ("$fleet/gw/status".to_string(), b"two levels".to_vec()),
    ]
    .into_iter()
    .collect();
    assert_eq!(got, want, "$fleet/# matches both, once each");
    assert_quiet(&mut wild_conn);
    assert_quiet(&mut exact_conn);
}

/// MQTT 5.0 §4.8.2 (which Magnetar allows 3.1.1 clients too): the two members of
/// `$share/g/dev/+/tele` get every message once between them, while a plain subscriber to the
/// same filter gets them all.
#[test]
fn fleet_share_group_members_split_telemetry_without_loss_or_duplicates() {
    const M: usize = 200;
    let gw = Gateway::start(Options::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut collectors = Vec::new();
    let mut inboxes = Vec::new();
    for (id, filter) in [
        ("member-0", "$share/g/dev/+/tele"),
        ("member-1", "$share/g/dev/+/tele"),
        ("plain", "dev/+/tele"),
    ] {
        let (client, mut conn, _) = connect(options(id, gw.mqtt));
        crate::mqtt::subscribe(&client, &mut conn, filter, QoS::AtLeastOnce);
        let inbox: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let (sink, stop) = (inbox.clone(), stop.clone());
        collectors.push(std::thread::spawn(move || {
            let _client = client;
            while !stop.load(Ordering::Relaxed) {
                match conn.recv_timeout(Duration::from_millis(50)) {
                    Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                        sink.lock().expect("inbox").push(p.payload.to_vec());
                    }
                    Ok(Err(e)) => panic!("{id}: connection failed: {e}"),
                    _ => {}
                }
            }
        }));
        inboxes.push(inbox);
    }

    let (publ, mut pub_conn, _) = connect(options("share-pub", gw.mqtt));
    let msgs: Vec<(String, Vec<u8>)> = (0..M)
        .map(|i| (tele_topic(i % 50), format!("tele {i}").into_bytes()))
        .collect();
    let batch: Vec<(&str, QoS, Vec<u8>)> = msgs
        .iter()
        .map(|(t, p)| (t.as_str(), QoS::AtLeastOnce, p.clone()))
        .collect();
    // In chunks: the client's request channel holds 100.
    for chunk in batch.chunks(50) {
        publish_all(&publ, &mut pub_conn, chunk);
    }

    let count = |i: usize| inboxes[i].lock().expect("inbox").len();
    let deadline = Instant::now() + Duration::from_secs(30);
    while (count(0) + count(1) < M || count(2) < M) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(SETTLE);
    stop.store(true, Ordering::Relaxed);
    for c in collectors {
        c.join().expect("collector");
    }
    let got: Vec<Vec<Vec<u8>>> = inboxes
        .iter()
        .map(|i| std::mem::take(&mut *i.lock().expect("inbox")))
        .collect();
    let all: BTreeSet<Vec<u8>> = msgs.into_iter().map(|(_, p)| p).collect();
    let split: BTreeSet<Vec<u8>> = got[0].iter().chain(&got[1]).cloned().collect();
    assert_eq!(split, all, "the group got every message");
    assert_eq!(
        got[0].len() + got[1].len(),
        M,
        "no message went to both members or twice to one"
    );
    assert!(
        !got[0].is_empty() && !got[1].is_empty(),
        "both members got some: {} and {}",
        got[0].len(),
        got[1].len()
    );
    assert_eq!(got[2].len(), M, "the plain subscriber got each once");
    assert_eq!(got[2].iter().cloned().collect::<BTreeSet<_>>(), all);
}

/// Two gateways on one backend (the second with `[backend] service_url` at the first's
/// embedded broker): a persistent session made on one is resumed, with its backlog, on the
/// other, and a publish on one reaches a subscriber on the other.
#[test]
fn fleet_two_gateways_on_one_backend_share_sessions_and_messages() {
    let gw1 = Gateway::start(Options::default());
    let gw2 = Gateway::start(Options {
        backend: Some((gw1.broker, token(&gw1, "magnetar-gateway", None))),
        ..Default::default()
    });

    let (watch, mut watch_conn, _) = connect(options("tele-watch", gw2.mqtt));
    crate::mqtt::subscribe(&watch, &mut watch_conn, "dev/+/tele", QoS::AtLeastOnce);

    let mut roamer = options("roamer", gw1.mqtt);
    roamer.set_clean_session(false);
    let (device, mut device_conn, present) = connect(roamer);
    assert!(!present, "a new session is not present");
    crate::mqtt::subscribe(
        &device,
        &mut device_conn,
        "dev/roamer/cmd",
        QoS::AtLeastOnce,
    );
    device.disconnect().expect("disconnect");
    drive(&mut device_conn, |ev| {
        matches!(ev, Event::Outgoing(Outgoing::Disconnect))
    });
    drop(device_conn);

    // While the device is away: commands through both gateways, telemetry through the first.
    let cmd = |i: usize| format!("cmd {i}").into_bytes();
    let tele = |i: usize| format!("tele {i}").into_bytes();
    let (p1, mut p1_conn, _) = connect(options("pub-1", gw1.mqtt));
    let mut batch: Vec<(&str, QoS, Vec<u8>)> = (0..5)
        .map(|i| ("dev/roamer/cmd", QoS::AtLeastOnce, cmd(i)))
        .collect();
    batch.extend((0..5).map(|i| ("dev/other/tele", QoS::AtLeastOnce, tele(i))));
    publish_all(&p1, &mut p1_conn, &batch);
    let (p2, mut p2_conn, _) = connect(options("pub-2", gw2.mqtt));
    let batch: Vec<(&str, QoS, Vec<u8>)> = (5..10)
        .map(|i| ("dev/roamer/cmd", QoS::AtLeastOnce, cmd(i)))
        .collect();
    publish_all(&p2, &mut p2_conn, &batch);

    let got: BTreeSet<_> = receive(&mut watch_conn, 5).into_iter().collect();
    let want: BTreeSet<_> = (0..5)
        .map(|i| ("dev/other/tele".to_string(), tele(i)))
        .collect();
    assert_eq!(
        got, want,
        "gateway 1's publishes reach gateway 2's subscriber"
    );
    assert_quiet(&mut watch_conn);

    let mut roamer = options("roamer", gw2.mqtt);
    roamer.set_clean_session(false);
    let (_device, mut device_conn, present) = connect(roamer);
    assert!(present, "gateway 2 resumes the session made on gateway 1");
    let got: BTreeSet<_> = receive(&mut device_conn, 10).into_iter().collect();
    let want: BTreeSet<_> = (0..10)
        .map(|i| ("dev/roamer/cmd".to_string(), cmd(i)))
        .collect();
    assert_eq!(got, want, "the backlog from both gateways, once each");
    assert_quiet(&mut device_conn);
}

/// The fleet tests' checker itself: it must catch what they are there to catch.
#[test]
fn fleet_checker_catches_loss_strays_and_qos0_duplicates() {
    let want = || vec![command(0, 0), command(0, 1)];
    assert_eq!(compare("ok", want(), want()), Ok(0));
    let mut twice = want();
    twice.push(command(0, 1));
    assert!(compare("qos 0 twice", twice, want()).is_err());
    let want1 = || vec![command(1, 0), command(1, 1)];
    let mut twice = want1();
    twice.push(command(1, 0));
    assert_eq!(compare("qos 1 twice", twice, want1()), Ok(1));
    assert!(compare("lost", vec![command(0, 0)], want()).is_err());
    let mut stray = want();
    stray.push(command(2, 0));
    assert!(compare("stray", stray, want()).is_err());
    let mut wrong_qos = want1();
    wrong_qos[0].2 = 0;
    assert!(compare("wrong QoS", wrong_qos, want1()).is_err());
}
