//! The fleet: an IoT deployment as its user sees it, Magnetar beside Mosquitto in the same run.
//! N devices, device `i` with the client id `<row>-<i>`, subscribed to its command topic
//! `dev/<row>-<i>/cmd` and publishing telemetry to `dev/<row>-<i>/tele`; one application
//! connection subscribed to `dev/+/tele` and publishing commands to every device. Plain TCP,
//! MQTT 3.1.1, 48 B payloads, the hand-written client of [`crate::client`] (one task per
//! device), devices connected [`IN_FLIGHT`] at a time.
//!
//! Rows: QoS 0 and 1, clean and persistent sessions (Clean Session 0 with the row's fixed
//! client ids), at each fleet size. Each row runs on freshly started servers, so that the
//! sessions of one row, and the backlog a slow server still works through, do not reach the
//! next. Two phases per row and server, each bounded by [`PHASE_TIMEOUT`]:
//! - commands: the application publishes `BENCH_FLEET_MESSAGES` (default 10) commands per
//!   device, round-robin over the devices (QoS 1: at most [`WINDOW`] unacknowledged); the
//!   figure is commands delivered per second, until all arrived or the timeout;
//! - telemetry: every device publishes `BENCH_FLEET_MESSAGES` messages at once; the figure is
//!   messages the application received per second.
//!
//! Each command carries the index of its device: a device counts the commands that are its
//! own (topic and index), and any other is a misrouted command. After each phase the counts
//! per device are compared with what was sent; a misrouted, duplicated or missing message is
//! printed as an error line under the table, never a panic. The server's own CPU time
//! (user + system, `/proc`) is read before and after each phase and divided by the messages
//! delivered in it.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify, Semaphore};

use crate::client::{self, Frames, Packet};
use crate::{cpu_seconds, free_ports, Proc, Tls};

/// Device logins in flight at once.
const IN_FLIGHT: usize = 200;
/// The longest a phase may take on one server: a slow server shows a partial count.
const PHASE_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest one device may take to connect and subscribe.
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);
/// QoS 1 commands the application may have unacknowledged (`rumqttc`'s default inflight).
const WINDOW: usize = 100;
/// Payload bytes: the device index (4 bytes, big-endian), a sequence number (4), filler.
const PAYLOAD: usize = 48;
/// Keep Alive of every connection: longer than a row, so no PINGREQ is needed.
const KEEP_ALIVE: u16 = 600;

/// One row's shape.
#[derive(Clone, Copy)]
struct Shape {
    devices: usize,
    qos: u8,
    persistent: bool,
    /// Commands per device, and telemetry messages per device.
    per_device: usize,
}

/// Counts messages toward a target and wakes the waiter when it is reached.
#[derive(Default)]
struct Counter {
    count: AtomicUsize,
    target: AtomicUsize,
    reached: Notify,
}

impl Counter {
    fn add(&self) {
        let now = self.count.fetch_add(1, Ordering::Relaxed) + 1;
        if now == self.target.load(Ordering::Relaxed) {
            self.reached.notify_one();
        }
    }

    /// Waits until the count reaches `target` or `deadline`; returns the count.
    async fn wait(&self, target: usize, deadline: tokio::time::Instant) -> usize {
        self.target.store(target, Ordering::Relaxed);
        loop {
            let now = self.count.load(Ordering::Relaxed);
            if now >= target
                || tokio::time::timeout_at(deadline, self.reached.notified())
                    .await
                    .is_err()
            {
                return self.count.load(Ordering::Relaxed);
            }
        }
    }
}

/// What one fleet received, shared by its tasks.
struct Tally {
    /// Own commands each device received.
    commands: Vec<AtomicU32>,
    /// Commands a device received that were addressed to another (topic or payload).
    misrouted: AtomicUsize,
    delivered: Counter,
    /// Telemetry the application received, per device.
    telemetry: Vec<AtomicU32>,
    /// Telemetry on a topic or with a device index that no device of this fleet uses.
    foreign: AtomicUsize,
    received: Counter,
    /// Device connections that failed or were closed by the server during the row.
    lost: AtomicUsize,
}

impl Tally {
    fn new(devices: usize) -> Tally {
        Tally {
            commands: (0..devices).map(|_| AtomicU32::new(0)).collect(),
            misrouted: AtomicUsize::new(0),
            delivered: Counter::default(),
            telemetry: (0..devices).map(|_| AtomicU32::new(0)).collect(),
            foreign: AtomicUsize::new(0),
            received: Counter::default(),
            lost: AtomicUsize::new(0),
        }
    }
}

/// The payload of message `seq` of device `device`.
fn payload(device: usize, seq: usize) -> [u8; PAYLOAD] {
    let mut p = [b'x'; PAYLOAD];
    p[..4].copy_from_slice(&(device as u32).to_be_bytes());
    p[4..8].copy_from_slice(&(seq as u32).to_be_bytes());
    p
}

/// The device index a payload carries.
fn device_of(payload: &[u8]) -> Option<usize> {
    let b = payload.get(..4)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
}

/// The device index `i` of a telemetry topic `dev/<prefix>-<i>/tele`.
fn tele_index(topic: &[u8], prefix: &str) -> Option<usize> {
    let digits = topic
        .strip_prefix(b"dev/")?
        .strip_prefix(prefix.as_bytes())?
        .strip_prefix(b"-")?
        .strip_suffix(b"/tele")?;
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// A connected, subscribed client: its socket and the bytes already read after the SUBACK.
struct Open {
    stream: TcpStream,
    frames: Frames,
}

/// Connects as `id` and subscribes to `filter`; `Err` unless CONNACK and SUBACK accept.
async fn open(
    addr: SocketAddr,
    id: String,
    clean: bool,
    filter: String,
    qos: u8,
) -> Result<Open, String> {
    let mut stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    client::handshake(
        &mut stream,
        &client::connect_packet(&id, clean, KEEP_ALIVE, None),
    )
    .await?;
    stream
        .write_all(&client::subscribe_packet(1, &filter, qos))
        .await
        .map_err(|e| e.to_string())?;
    let mut frames = Frames::default();
    loop {
        frames.fill(&mut stream).await?;
        while let Some(p) = frames.next_packet()? {
            match p {
                Packet::Suback(1, code) if code < 0x80 => return Ok(Open { stream, frames }),
                Packet::Suback(_, code) => return Err(format!("SUBACK {code:#04x} for {filter}")),
                _ => {}
            }
        }
    }
}

/// One device: acknowledges and counts its commands; publishes its telemetry when `go` moves.
/// Returns when `go`'s sender is dropped; a failed connection is counted in `tally.lost`.
async fn device(
    index: usize,
    id: String,
    c: Open,
    shape: Shape,
    tally: Arc<Tally>,
    go: watch::Receiver<bool>,
) {
    if device_loop(index, id, c, shape, &tally, go).await.is_err() {
        tally.lost.fetch_add(1, Ordering::Relaxed);
    }
}

async fn device_loop(
    index: usize,
    id: String,
    mut c: Open,
    shape: Shape,
    tally: &Tally,
    mut go: watch::Receiver<bool>,
) -> Result<(), String> {
    let own = format!("dev/{id}/cmd");
    let tele = format!("dev/{id}/tele");
    let (mut rd, mut wr) = c.stream.split();
    let mut out = Vec::new();
    loop {
        tokio::select! {
            r = c.frames.fill(&mut rd) => {
                r?;
                loop {
                    match c.frames.next_packet()? {
                        Some(Packet::Publish { topic, qos, packet_id, payload }) => {
                            if topic == own.as_bytes() && device_of(payload) == Some(index) {
                                tally.commands[index].fetch_add(1, Ordering::Relaxed);
                                tally.delivered.add();
                            } else {
                                tally.misrouted.fetch_add(1, Ordering::Relaxed);
                            }
                            if qos == 1 {
                                client::puback(&mut out, packet_id);
                            }
                        }
                        Some(_) => {}
                        None => break,
                    }
                }
            }
            changed = go.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                for seq in 0..shape.per_device {
                    let packet_id = (seq % 65535) as u16 + 1;
                    client::publish(&mut out, &tele, shape.qos, packet_id, &payload(index, seq));
                }
            }
        }
        if !out.is_empty() {
            wr.write_all(&out).await.map_err(|e| e.to_string())?;
            out.clear();
        }
    }
}

/// The application's reader: counts telemetry per device, acknowledges it, and returns a
/// window permit for every PUBACK of a command. `Err` when the connection fails.
async fn application_reader(
    mut rd: tokio::net::tcp::OwnedReadHalf,
    mut frames: Frames,
    acks: Arc<tokio::sync::Mutex<tokio::net::tcp::OwnedWriteHalf>>,
    prefix: String,
    tally: Arc<Tally>,
    window: Arc<Semaphore>,
) -> Result<(), String> {
    let mut out = Vec::new();
    loop {
        while let Some(p) = frames.next_packet()? {
            match p {
                Packet::Publish {
                    topic,
                    qos,
                    packet_id,
                    payload,
                } => {
                    // `dev/<prefix>-<i>/tele`, with the same `i` in the payload.
                    let from = tele_index(topic, &prefix)
                        .filter(|&i| i < tally.telemetry.len() && device_of(payload) == Some(i));
                    match from {
                        Some(i) => {
                            tally.telemetry[i].fetch_add(1, Ordering::Relaxed);
                            tally.received.add();
                        }
                        None => {
                            tally.foreign.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    if qos == 1 {
                        client::puback(&mut out, packet_id);
                    }
                }
                Packet::Puback => window.add_permits(1),
                _ => {}
            }
        }
        if !out.is_empty() {
            acks.lock()
                .await
                .write_all(&out)
                .await
                .map_err(|e| e.to_string())?;
            out.clear();
        }
        frames.fill(&mut rd).await?;
    }
}

/// Publishes `total` commands round-robin over `devices` (indices into the fleet's
/// client ids `<prefix>-<i>`), in batches; QoS 1 waits for window permits.
async fn publish_commands(
    writer: Arc<tokio::sync::Mutex<tokio::net::tcp::OwnedWriteHalf>>,
    prefix: String,
    devices: Vec<usize>,
    total: usize,
    qos: u8,
    window: Arc<Semaphore>,
) -> Result<(), String> {
    const BATCH: usize = 32;
    let topics: Vec<String> = devices
        .iter()
        .map(|i| format!("dev/{prefix}-{i}/cmd"))
        .collect();
    let mut out = Vec::with_capacity(BATCH * (PAYLOAD + 32));
    let mut sent = 0;
    while sent < total {
        let batch = BATCH.min(total - sent);
        if qos == 1 {
            window
                .acquire_many(batch as u32)
                .await
                .map_err(|e| e.to_string())?
                .forget();
        }
        for k in sent..sent + batch {
            let slot = k % devices.len();
            let packet_id = (k % 65535) as u16 + 1;
            client::publish(
                &mut out,
                &topics[slot],
                qos,
                packet_id,
                &payload(devices[slot], k),
            );
        }
        writer
            .lock()
            .await
            .write_all(&out)
            .await
            .map_err(|e| e.to_string())?;
        out.clear();
        sent += batch;
    }
    Ok(())
}

/// One phase's figures.
struct Phase {
    expected: usize,
    got: usize,
    seconds: f64,
    cpu_us_per_msg: f64,
}

impl Phase {
    /// Reads the clock and the CPU time of process `pid`, starts the phase with `start`, and
    /// waits until `counter` reaches `expected` or [`PHASE_TIMEOUT`].
    async fn timed<T>(
        pid: u32,
        expected: usize,
        counter: &Counter,
        start: impl FnOnce() -> T,
    ) -> (Phase, T) {
        let cpu = cpu_seconds(pid);
        let since = Instant::now();
        let started = start();
        let got = counter
            .wait(expected, tokio::time::Instant::now() + PHASE_TIMEOUT)
            .await;
        let phase = Phase {
            expected,
            got,
            seconds: since.elapsed().as_secs_f64(),
            cpu_us_per_msg: (cpu_seconds(pid) - cpu) * 1e6 / got.max(1) as f64,
        };
        (phase, started)
    }

    fn rate(&self) -> f64 {
        self.got as f64 / self.seconds.max(1e-9)
    }

    /// The rate, with the count when incomplete.
    fn cell(&self) -> String {
        if self.got < self.expected {
            format!(
                "{:.0} ({}/{} in {:.0} s)",
                self.rate(),
                self.got,
                self.expected,
                self.seconds
            )
        } else {
            format!("{:.0}", self.rate())
        }
    }
}

/// One server's figures for a row, the errors found (misrouted, duplicated or missing
/// messages, failed connections), and notes on how far to trust the figures.
struct Figures {
    commands: Phase,
    telemetry: Phase,
    errors: Vec<String>,
    notes: Vec<String>,
}

/// Runs one row against the server of process `pid` listening on `addr`.
async fn run(pid: u32, addr: SocketAddr, shape: Shape, prefix: &str) -> Figures {
    let mut errors = Vec::new();
    let n = shape.devices;
    let clean = !shape.persistent;
    let (opened, failed, first_error) = client::open_many(n, IN_FLIGHT, OPEN_TIMEOUT, |i| {
        let id = format!("{prefix}-{i}");
        let filter = format!("dev/{id}/cmd");
        open(addr, id, clean, filter, shape.qos)
    })
    .await;
    if let Some(e) = first_error {
        errors.push(format!("{failed} of {n} devices did not connect, e.g. {e}"));
    }
    let tally = Arc::new(Tally::new(n));
    let (go, go_rx) = watch::channel(false);
    let mut devices = tokio::task::JoinSet::new();
    let connected: Vec<usize> = opened.iter().map(|(i, _)| *i).collect();
    for (i, c) in opened {
        devices.spawn(device(
            i,
            format!("{prefix}-{i}"),
            c,
            shape,
            tally.clone(),
            go_rx.clone(),
        ));
    }

    let app = match open(
        addr,
        format!("{prefix}-app"),
        clean,
        "dev/+/tele".into(),
        shape.qos,
    )
    .await
    {
        Ok(app) => app,
        Err(e) => {
            errors.push(format!("the application did not connect: {e}"));
            let none = || Phase {
                expected: 0,
                got: 0,
                seconds: 0.0,
                cpu_us_per_msg: 0.0,
            };
            return Figures {
                commands: none(),
                telemetry: none(),
                errors,
                notes: Vec::new(),
            };
        }
    };
    let (rd, wr) = app.stream.into_split();
    let writer = Arc::new(tokio::sync::Mutex::new(wr));
    let window = Arc::new(Semaphore::new(WINDOW));
    let reader = tokio::spawn(application_reader(
        rd,
        app.frames,
        writer.clone(),
        prefix.to_string(),
        tally.clone(),
        window.clone(),
    ));

    // Commands: the application publishes, the devices count.
    let total = shape.per_device * connected.len();
    let (commands, mut publisher) = Phase::timed(pid, total, &tally.delivered, || {
        tokio::spawn(publish_commands(
            writer.clone(),
            prefix.to_string(),
            connected.clone(),
            total,
            shape.qos,
            window,
        ))
    })
    .await;
    // An incomplete phase leaves the publisher running (aborting it mid-write would cut a
    // packet in two on the application's connection), and the server with a backlog.
    let backlog = commands.got < total;
    if publisher.is_finished() {
        if let Ok(Err(e)) = (&mut publisher).await {
            errors.push(format!("publishing commands: {e}"));
        }
    }
    check_counts(
        &tally.commands,
        &connected,
        total,
        commands.got,
        tally.misrouted.load(Ordering::Relaxed),
        "commands",
        &mut errors,
    );

    // Telemetry: every device publishes, the application counts.
    let (telemetry, _) = Phase::timed(pid, total, &tally.received, || go.send(true)).await;
    check_counts(
        &tally.telemetry,
        &connected,
        total,
        telemetry.got,
        tally.foreign.load(Ordering::Relaxed),
        "telemetry",
        &mut errors,
    );
    if reader.is_finished() {
        if let Ok(Err(e)) = reader.await {
            errors.push(format!("the application's connection: {e}"));
        }
    } else {
        reader.abort();
    }
    let lost = tally.lost.load(Ordering::Relaxed);
    if lost > 0 {
        errors.push(format!("{lost} device connections ended during the row"));
    }
    let mut notes = Vec::new();
    if backlog {
        notes.push(
            "the commands phase was incomplete: the telemetry phase shared the server with its \
             backlog"
                .into(),
        );
    }
    publisher.abort();
    drop(go);
    // Every device socket closed before the next server's fleet opens its own.
    devices.abort_all();
    while devices.join_next().await.is_some() {}
    Figures {
        commands,
        telemetry,
        errors,
        notes,
    }
}

/// Compares per-device counts with the `total / devices` each should have: messages that
/// reached the wrong party (`stray`) and duplicates are always errors; missing messages only
/// once the phase had them all (`got == total` cannot then hide a short device), else the
/// shortfall is the incomplete count in the table.
fn check_counts(
    counts: &[AtomicU32],
    devices: &[usize],
    total: usize,
    got: usize,
    stray: usize,
    what: &str,
    errors: &mut Vec<String>,
) {
    if stray > 0 {
        errors.push(format!(
            "{what}: {stray} messages reached a party they were not meant for"
        ));
    }
    let each = total / devices.len().max(1);
    let (mut over, mut under) = (0, 0);
    for &i in devices {
        let c = counts[i].load(Ordering::Relaxed) as usize;
        over += usize::from(c > each);
        under += usize::from(c < each);
    }
    if over > 0 {
        errors.push(format!("{what}: {over} devices got more than their {each}"));
    }
    if got >= total && under > 0 {
        errors.push(format!(
            "{what}: {under} devices got fewer than their {each}"
        ));
    }
}

/// Mosquitto with a plain listener, queues large enough that no QoS 1 message is dropped.
fn start_mosquitto(dir: &Path) -> Option<(Proc, SocketAddr)> {
    let [addr] = free_ports();
    let text = format!(
        "user root\nallow_anonymous true\nmax_queued_messages 10000000\n\
         listener {} 127.0.0.1\n",
        addr.port()
    );
    let proc = crate::spawn_mosquitto(&dir.join("fleet-mosquitto.conf"), &text, &[addr])?;
    Some((proc, addr))
}

/// The fleet table for each size in `sizes`, capped by the descriptor limit.
pub fn table(
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    tls: &Tls,
    extra: &str,
    sizes: &[usize],
    per_device: usize,
    nofile: u64,
) {
    // This process holds one socket per device, and so does the server (each process has
    // its own RLIMIT_NOFILE); the rest is headroom for the runtime, logs and the broker.
    let cap = (nofile as usize).saturating_sub(1024);
    println!(
        "\nFleet: N devices (own client id, subscribed to dev/<id>/cmd, publishing to dev/<id>/tele) \
         and one application (dev/+/tele); MQTT 3.1.1 over TCP, {PAYLOAD} B payloads, \
         {per_device} commands and {per_device} telemetry messages per device, \
         each phase at most {} s; a fresh server pair per row:\n",
        PHASE_TIMEOUT.as_secs()
    );
    for &asked in sizes.iter().filter(|&&n| n > cap) {
        println!(
            "(fleet {asked} reduced to {cap}: RLIMIT_NOFILE is {nofile}, and this process and \
             the server each hold one socket per device, plus headroom)"
        );
    }
    println!(
        "| devices | QoS | session | magnetar cmd/s | mosquitto cmd/s | magnetar / mosquitto \
         | magnetar tele/s | mosquitto tele/s | magnetar / mosquitto \
         | magnetar CPU µs/msg (cmd, tele) | mosquitto CPU µs/msg (cmd, tele) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let mut notes = Vec::new();
    let mut row_no = 0;
    // `BENCH_FLEET_SESSIONS`: `clean`, `persistent` or both (the default).
    let sessions = std::env::var("BENCH_FLEET_SESSIONS").unwrap_or_default();
    for &asked in sizes {
        let n = asked.min(cap);
        for qos in [0u8, 1] {
            for persistent in [false, true] {
                let kind = if persistent { "persistent" } else { "clean" };
                if !sessions.is_empty() && !sessions.split(',').any(|s| s.trim() == kind) {
                    continue;
                }
                row_no += 1;
                let shape = Shape {
                    devices: n,
                    qos,
                    persistent,
                    per_device,
                };
                let row_dir = dir.join(format!("fleet-{row_no}"));
                let _ = std::fs::create_dir_all(&row_dir);
                // Distinct client ids per row and server, though each row has fresh servers.
                let (magnetar, _) = crate::start_magnetar(&row_dir, tls, extra);
                let m = rt.block_on(run(
                    magnetar.proc.0.id(),
                    magnetar.mqtt,
                    shape,
                    &format!("f{row_no}m"),
                ));
                drop(magnetar);
                let q = start_mosquitto(&row_dir).map(|(proc, addr)| {
                    rt.block_on(run(proc.0.id(), addr, shape, &format!("f{row_no}q")))
                });
                let _ = std::fs::remove_dir_all(&row_dir);
                let session = if persistent { "persistent" } else { "clean" };
                let ratio = |a: &Phase, b: Option<&Phase>| match b {
                    Some(b) => format!("{:.2}x", a.rate() / b.rate().max(1e-9)),
                    None => "–".into(),
                };
                let cell = |p: Option<&Phase>| p.map_or("–".into(), Phase::cell);
                let cpu = |f: Option<&Figures>| {
                    f.map_or("–".into(), |f| {
                        format!(
                            "{:.1}, {:.1}",
                            f.commands.cpu_us_per_msg, f.telemetry.cpu_us_per_msg
                        )
                    })
                };
                println!(
                    "| {n} | {qos} | {session} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    m.commands.cell(),
                    cell(q.as_ref().map(|q| &q.commands)),
                    ratio(&m.commands, q.as_ref().map(|q| &q.commands)),
                    m.telemetry.cell(),
                    cell(q.as_ref().map(|q| &q.telemetry)),
                    ratio(&m.telemetry, q.as_ref().map(|q| &q.telemetry)),
                    cpu(Some(&m)),
                    cpu(q.as_ref()),
                );
                let label = format!("{n} devices, QoS {qos}, {session}");
                for (server, f) in [("magnetar", Some(&m)), ("mosquitto", q.as_ref())] {
                    let Some(f) = f else { continue };
                    for e in &f.errors {
                        notes.push(format!("ERROR {server}, {label}: {e}"));
                    }
                    for e in &f.notes {
                        notes.push(format!("{server}, {label}: {e}"));
                    }
                }
            }
        }
    }
    if !notes.is_empty() {
        println!();
        for note in notes {
            println!("- {note}");
        }
    }
}
