//! MQTT benchmark of the gateway, side by side with Mosquitto (Debian `mosquitto`, when
//! installed) and `rumqttd` (the Rust broker crate, run by this bench in a child process of
//! its own), in one run. Each server is a real process on loopback; the clients are `rumqttc`
//! (throughput) and a minimal TLS MQTT client (idle connections).
//!
//! Run: `cargo bench -p magnetar --bench mqtt` — env `BENCH_MESSAGES` (per run and
//! subscriber, default 10000; 0 skips the throughput table), `BENCH_IDLE` (idle TLS
//! connections, default 10000; 0 skips), `BENCH_MAGNETAR_LOG` (a file for the gateway's log),
//! `BENCH_MAGNETAR_ENV` (`K=V K=V`: environment of the gateway process only), `BENCH_ONLY`
//! (`QoS/publishers/payload` rows, comma-separated, e.g. `0/1/1024,1/4/64`),
//! `BENCH_NO_RUMQTTD` (set: skip rumqttd), `BENCH_MAGNETAR_BIN` (another gateway binary, for
//! A/B runs of two builds).
//! `BENCH_STORM` (fleet sizes of the connect-storm part, comma-separated, default
//! `1000,10000`; `0` skips it), `BENCH_FLEET` (device counts of the fleet part: devices
//! with command and telemetry topics and one application, comma-separated, default
//! `1000,3000,10000`; `0` skips it), `BENCH_FLEET_MESSAGES` (commands and telemetry messages
//! per device and phase, default 10), `BENCH_FLEET_SESSIONS` (`clean`, `persistent`, or
//! both, the default).
//! `-- --stages` instead measures the gateway's delivery path stage by stage.
//!
//! It prints a markdown table: for QoS 0 and 1, 1→1 and 4→4 (wildcard subscriptions),
//! 64 B and 1 KiB payloads, each server's msgs/s and p99 latency and Magnetar's ratio to
//! Mosquitto; then the resident memory per idle TLS connection. Magnetar's QoS 1 is stored
//! and fsync'd by the broker before the PUBACK; Mosquitto's and rumqttd's are in memory.

use std::net::SocketAddr;
use std::process::{Command, Stdio};

use rumqttc::QoS;

#[path = "mqtt/client.rs"]
mod client;
#[path = "mqtt/fleet.rs"]
mod fleet;
#[path = "mqtt/idle.rs"]
mod idle;
#[path = "mqtt/load.rs"]
mod load;
#[path = "support/server.rs"]
mod server;
#[path = "mqtt/stages.rs"]
mod stages;
#[path = "mqtt/storm.rs"]
mod storm;

use server::{cpu_seconds, env_usize, free_ports, wait_listening, Proc};

/// A server under test: plain MQTT address, and TLS MQTT address when it has one.
struct Server {
    name: &'static str,
    proc: Proc,
    mqtt: SocketAddr,
    tls: Option<SocketAddr>,
}

struct Tls {
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    der: Vec<u8>,
}

fn start_magnetar(dir: &std::path::Path, tls: &Tls, extra: &str) -> (Server, SocketAddr) {
    let [broker, mqtt, mqtts] = free_ports();
    let config = dir.join("magnetar.toml");
    std::fs::write(
        &config,
        format!(
            "[broker]\nlisten = \"{broker}\"\n\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n\n\
             [[listeners]]\nname = \"mqtt\"\nbind = \"{mqtt}\"\nplugin = \"mqtt\"\n\n\
             [[listeners]]\nname = \"mqtts\"\nbind = \"{mqtts}\"\nplugin = \"mqtt\"\ntls = true\n{extra}",
            tls.cert.display(),
            tls.key.display()
        ),
    )
    .expect("config");
    let proc = server::spawn_magnetar(&config, &dir.join("data"));
    wait_listening(mqtt);
    wait_listening(mqtts);
    let server = Server {
        name: "magnetar",
        proc,
        mqtt,
        tls: Some(mqtts),
    };
    (server, broker)
}

/// Mosquitto (Debian's, if installed) with the config file `config` written with `text`,
/// once every address of `listening` accepts connections.
fn spawn_mosquitto(config: &std::path::Path, text: &str, listening: &[SocketAddr]) -> Option<Proc> {
    let bin = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())?;
    std::fs::write(config, text).ok()?;
    let child = Command::new(bin)
        .arg("-c")
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let proc = Proc(child);
    for addr in listening {
        wait_listening(*addr);
    }
    Some(proc)
}

fn start_mosquitto(dir: &std::path::Path, tls: &Tls) -> Option<Server> {
    let [mqtt, mqtts] = free_ports();
    let text = format!(
        "user root\nallow_anonymous true\nmax_queued_messages 100000\n\
         listener {} 127.0.0.1\n\
         listener {} 127.0.0.1\ncertfile {}\nkeyfile {}\n",
        mqtt.port(),
        mqtts.port(),
        tls.cert.display(),
        tls.key.display()
    );
    let proc = spawn_mosquitto(&dir.join("mosquitto.conf"), &text, &[mqtt, mqtts])?;
    Some(Server {
        name: "mosquitto",
        proc,
        mqtt,
        tls: Some(mqtts),
    })
}

/// `rumqttd` in a child process: this bench binary again, with `--serve-rumqttd ADDR`.
fn start_rumqttd() -> Option<Server> {
    let [mqtt] = free_ports();
    let child = Command::new(std::env::current_exe().ok()?)
        .arg("--serve-rumqttd")
        .arg(mqtt.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let proc = Proc(child);
    wait_listening(mqtt);
    Some(Server {
        name: "rumqttd",
        proc,
        mqtt,
        tls: None,
    })
}

/// The child process side of [`start_rumqttd`]: a plain MQTT 3.1.1 listener on `addr`.
fn serve_rumqttd(addr: SocketAddr) {
    let connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 60_000,
        max_payload_size: 1 << 20,
        max_inflight_count: 1000,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server = rumqttd::ServerSettings {
        name: "v4-1".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 0,
        connections,
    };
    let config = rumqttd::Config {
        router: rumqttd::RouterConfig {
            max_connections: 20_000,
            max_outgoing_packet_count: 1000,
            max_segment_size: 100 << 20,
            max_segment_count: 10,
            ..Default::default()
        },
        v4: Some([("v4-1".to_string(), server)].into_iter().collect()),
        ..Default::default()
    };
    let mut broker = rumqttd::Broker::new(config);
    if let Err(e) = broker.start() {
        eprintln!("rumqttd: {e}");
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        println!("mqtt: bench");
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "--serve-rumqttd") {
        let addr = args
            .get(i + 1)
            .and_then(|a| a.parse().ok())
            .expect("--serve-rumqttd ADDR");
        return serve_rumqttd(addr);
    }
    let n = env_usize("BENCH_MESSAGES", 10_000);
    let idle_n = env_usize("BENCH_IDLE", 10_000);
    let nofile = idle::raise_nofile();
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key, der) = idle::certificate(dir.path());
    let tls = Tls { cert, key, der };
    let rt = tokio::runtime::Runtime::new().expect("runtime");

    // `BENCH_MAGNETAR_EXTRA`: more gateway configuration (TOML, `\n` for newlines).
    let extra = std::env::var("BENCH_MAGNETAR_EXTRA")
        .unwrap_or_default()
        .replace("\\n", "\n");
    if args.iter().any(|a| a == "--stages") {
        let (magnetar, broker) = start_magnetar(dir.path(), &tls, &extra);
        for batch in [64, 1000] {
            let (p, c) = rt.block_on(stages::pulsar_backlog(broker, n, batch));
            println!("pulsar producer alone: {p:.0} msgs/s; a consumer of that backlog (batch {batch}): {c:.0} msgs/s");
            let r = rt.block_on(stages::pulsar_alone(broker, n, batch));
            println!("pulsar producer -> pulsar consumer (batch {batch}): {r:.0} msgs/s");
        }
        let r = rt.block_on(stages::pulsar_to_mqtt(broker, magnetar.mqtt, n));
        println!("pulsar producer -> gateway -> MQTT QoS 0 subscriber: {r:.0} msgs/s");
        return;
    }

    let (magnetar, _) = start_magnetar(dir.path(), &tls, &extra);
    let mut servers = vec![magnetar];
    servers.extend(start_mosquitto(dir.path(), &tls));
    // `BENCH_NO_RUMQTTD=1`: magnetar and Mosquitto only (quicker).
    if std::env::var_os("BENCH_NO_RUMQTTD").is_none() {
        servers.extend(start_rumqttd());
    }
    let names: Vec<&str> = servers.iter().map(|s| s.name).collect();

    if n > 0 {
        throughput(&rt, &servers, &names, n);
    }
    if idle_n > 0 {
        idle_table(&rt, &servers, &tls, idle_n, nofile);
    }
    drop(servers);
    let sizes = env_sizes("BENCH_STORM", "1000,10000");
    if !sizes.is_empty() {
        storm::table(&rt, dir.path(), &tls, &sizes, nofile);
    }
    let sizes = env_sizes("BENCH_FLEET", "1000,3000,10000");
    if !sizes.is_empty() {
        let per_device = env_usize("BENCH_FLEET_MESSAGES", 10).max(1);
        fleet::table(&rt, dir.path(), &tls, &extra, &sizes, per_device, nofile);
    }
}

/// A comma-separated list of sizes from env `name` (else `default`); `0` entries dropped.
fn env_sizes(name: &str, default: &str) -> Vec<usize> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .filter(|&n| n > 0)
        .collect()
}

/// The throughput table: every shape on every server.
fn throughput(rt: &tokio::runtime::Runtime, servers: &[Server], names: &[&str], n: usize) {
    println!("MQTT on loopback, {n} messages per subscriber per run; servers: {names:?}\n");
    let mut header = "| QoS | pubs→subs | payload |".to_string();
    let mut rule = "|---|---|---|".to_string();
    for s in servers {
        header += &format!(
            " {} msgs/s | {} p99 | {} CPU µs/msg |",
            s.name, s.name, s.name
        );
        rule += "---|---|---|";
    }
    header += " magnetar / mosquitto | CPU per msg, magnetar / mosquitto |";
    rule += "---|---|";
    println!("{header}\n{rule}");
    let mut run = 0;
    // `BENCH_ONLY=0/1/1024,1/4/64`: only these rows (QoS/publishers/payload).
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce] {
        for (publishers, subscribers) in [(1, 1), (4, 4)] {
            for payload in [64, 1024] {
                let tag = format!("{}/{publishers}/{payload}", qos as u8);
                if !only.is_empty() && !only.split(',').any(|o| o.trim() == tag) {
                    continue;
                }
                let shape = load::Shape {
                    qos,
                    publishers,
                    subscribers,
                    payload,
                    messages: n,
                };
                let mut row = format!(
                    "| {} | {publishers}→{subscribers} | {payload} B |",
                    qos as u8
                );
                let mut rates = Vec::new();
                let mut cpus = Vec::new();
                for s in servers {
                    run += 1;
                    let before = cpu_seconds(s.proc.0.id());
                    let f = rt.block_on(load::run(s.mqtt, shape, &format!("r{run}")));
                    let used = cpu_seconds(s.proc.0.id()) - before;
                    let short = if f.received < f.expected {
                        format!(" ({}/{})", f.received, f.expected)
                    } else {
                        String::new()
                    };
                    // The server's own CPU time (user + system) per message received: unlike
                    // msgs/s, barely moved by other load on the machine.
                    let per_msg = used * 1e6 / f.received.max(1) as f64;
                    row += &format!(" {:.0}{short} | {:.1?} | {per_msg:.1} |", f.rate, f.p99);
                    rates.push(f.rate);
                    cpus.push(per_msg);
                }
                match (rates.get(1), cpus.get(1)) {
                    (Some(m), Some(c)) if names.get(1) == Some(&"mosquitto") => {
                        row += &format!(" {:.2}x | {:.2}x |", rates[0] / m, cpus[0] / c)
                    }
                    _ => row += " – | – |",
                }
                println!("{row}");
            }
        }
    }
}

/// Memory per idle TLS connection of every server with a TLS port.
fn idle_table(
    rt: &tokio::runtime::Runtime,
    servers: &[Server],
    tls: &Tls,
    idle_n: usize,
    nofile: u64,
) {
    {
        // Each side holds one descriptor per connection, plus some to spare.
        let cap = (nofile as usize).saturating_sub(512);
        let count = idle_n.min(cap);
        if count < idle_n {
            println!("\n(idle: {idle_n} connections asked, RLIMIT_NOFILE {nofile} allows {count})");
        }
        println!("\n| server | idle TLS connections | RSS before | RSS after | per connection | connect time |");
        println!("|---|---|---|---|---|---|");
        for s in servers {
            let Some(addr) = s.tls else { continue };
            let f = rt.block_on(idle::measure(addr, s.proc.0.id(), count, &tls.der, s.name));
            println!(
                "| {} | {} | {:.1} MiB | {:.1} MiB | {:.1} KiB | {:.1} s |",
                s.name,
                f.connections,
                f.rss_before as f64 / 1048576.0,
                f.rss_after as f64 / 1048576.0,
                f.per_connection() / 1024.0,
                f.seconds
            );
        }
    }
}
