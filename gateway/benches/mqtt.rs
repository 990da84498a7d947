//! MQTT throughput and latency through the gateway, side by side with Mosquitto when it is
//! installed (Debian `mosquitto`), in one run: 1 publisher → 1 subscriber, 64-byte payloads,
//! QoS 0 and QoS 1. Each side is a real process on loopback; the clients are `rumqttc`.
//!
//! Run: `cargo bench -p magnetar --bench mqtt` (env `BENCH_MESSAGES`, default 20000).
//!
//! Throughput is messages received / (last receive − first publish); latency is publish →
//! receive, from a timestamp in the payload. Magnetar's QoS 1 is stored and fsync'd by the
//! broker before the PUBACK; Mosquitto's is in memory.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

const PAYLOAD: usize = 64;

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_listening(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {addr}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn start_magnetar(dir: &std::path::Path) -> (Proc, SocketAddr) {
    let (broker, mqtt) = (free_port(), free_port());
    let config = dir.join("magnetar.toml");
    std::fs::write(
        &config,
        format!("[broker]\nlisten = \"{broker}\"\n\n[[listeners]]\nname = \"mqtt\"\nbind = \"{mqtt}\"\nplugin = \"mqtt\"\n"),
    )
    .expect("config");
    let child = Command::new(env!("CARGO_BIN_EXE_magnetar"))
        .arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawning magnetar");
    wait_listening(mqtt);
    (Proc(child), mqtt)
}

fn start_mosquitto(dir: &std::path::Path) -> Option<(Proc, SocketAddr)> {
    let bin = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())?;
    let addr = free_port();
    let config = dir.join("mosquitto.conf");
    std::fs::write(
        &config,
        format!(
            "listener {} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 100000\n",
            addr.port()
        ),
    )
    .ok()?;
    let child = Command::new(bin)
        .arg("-c")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    wait_listening(addr);
    Some((Proc(child), addr))
}

struct Figures {
    rate: f64,
    p50: Duration,
    p99: Duration,
    received: usize,
}

async fn run_once(addr: SocketAddr, qos: QoS, n: usize, tag: &str) -> Figures {
    let mut so = MqttOptions::new(
        format!("bench-sub-{tag}"),
        addr.ip().to_string(),
        addr.port(),
    );
    so.set_keep_alive(Duration::from_secs(60));
    so.set_inflight(1000);
    let (sub, mut sub_loop) = AsyncClient::new(so, 10_000);
    let topic = format!("bench/{tag}/data");
    sub.subscribe(format!("bench/{tag}/#"), qos)
        .await
        .expect("subscribe");
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = sub_loop.poll().await.expect("sub poll") {
            break;
        }
    }
    let mut po = MqttOptions::new(
        format!("bench-pub-{tag}"),
        addr.ip().to_string(),
        addr.port(),
    );
    po.set_keep_alive(Duration::from_secs(60));
    po.set_inflight(1000);
    let (publ, mut pub_loop) = AsyncClient::new(po, 10_000);
    tokio::spawn(async move { while pub_loop.poll().await.is_ok() {} });

    let origin = Instant::now();
    let publisher = tokio::spawn(async move {
        for _ in 0..n {
            let mut payload = vec![0u8; PAYLOAD];
            let t = origin.elapsed().as_nanos() as u64;
            payload[..8].copy_from_slice(&t.to_le_bytes());
            publ.publish(topic.clone(), qos, false, payload)
                .await
                .expect("publish");
        }
        publ
    });
    let mut latencies = Vec::with_capacity(n);
    let deadline = origin + Duration::from_secs(120);
    while latencies.len() < n && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(5), sub_loop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                let mut t = [0u8; 8];
                t.copy_from_slice(&p.payload[..8]);
                let sent = Duration::from_nanos(u64::from_le_bytes(t));
                latencies.push(origin.elapsed().saturating_sub(sent));
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("subscriber: {e}"),
            Err(_) => break,
        }
    }
    let elapsed = origin.elapsed();
    let _ = publisher.await;
    latencies.sort();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    Figures {
        rate: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50: pct(0.50),
        p99: pct(0.99),
        received: latencies.len(),
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("mqtt: bench");
        return;
    }
    let n: usize = std::env::var("BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (_magnetar, magnetar_addr) = start_magnetar(dir.path());
    let mosquitto = start_mosquitto(dir.path());
    println!("MQTT 1→1, {PAYLOAD}-byte payloads, {n} messages per run");
    println!(
        "{:<10} {:<5} {:>12} {:>10} {:>10} {:>9}",
        "server", "qos", "msgs/s", "p50", "p99", "received"
    );
    for (qos, label) in [(QoS::AtMostOnce, "0"), (QoS::AtLeastOnce, "1")] {
        let ours = rt.block_on(run_once(magnetar_addr, qos, n, &format!("m{label}")));
        print_row("magnetar", label, &ours, n);
        if let Some((_, addr)) = &mosquitto {
            let theirs = rt.block_on(run_once(*addr, qos, n, &format!("q{label}")));
            print_row("mosquitto", label, &theirs, n);
            println!(
                "{:<10} {:<5} {:>11.2}x",
                "ratio",
                label,
                ours.rate / theirs.rate
            );
        }
    }
}

fn print_row(server: &str, qos: &str, f: &Figures, n: usize) {
    println!(
        "{:<10} {:<5} {:>12.0} {:>10.2?} {:>10.2?} {:>4}/{}",
        server, qos, f.rate, f.p50, f.p99, f.received, n
    );
}
