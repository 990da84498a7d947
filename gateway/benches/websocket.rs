//! Apache Pulsar's WebSocket API on the gateway's web port, side by side with the native
//! Pulsar protocol to the same gateway's embedded broker, in one run (issue 24: WebSocket at
//! least 0.5x native).
//!
//! One gateway process (the real binary, standalone: embedded broker, anonymous access in
//! `public/default`, a web listener serving the `pulsar-ws` plugin). Each row is measured both
//! ways against it, the order alternating from row to row:
//! - **ws**: producers send `{"payload": base64, "context": "n"}` text frames to
//!   `/ws/v2/producer/persistent/public/default/<topic>` with at most `BENCH_WINDOW` sends
//!   unacknowledged; consumers on `/ws/v2/consumer/...` ack each message with
//!   `{"messageId": ...}` (tokio-tungstenite, `pulsar_ws.rs`);
//! - **native**: the `pulsar` crate on the broker port, producers with the same window and
//!   the batching the gateway's own producers use, consumers with a receive queue of 1000
//!   (the WebSocket API's `receiverQueueSize`) acking each message (`native.rs`).
//!
//! Rows: P producers → P consumers on P distinct topics (1 → 1, 4 → 4), 64 B and 1 KiB
//! payloads. Figures: messages/s end to end (messages received by all consumers / last
//! receive − first send), p99 of publish → receive (a timestamp in the payload), the gateway
//! process's CPU time per message received (`/proc/<pid>/stat`; the bench process's own, its
//! clients, in parentheses), and WS / native.
//!
//! Run: `cargo bench -p magnetar --bench websocket` — env `BENCH_MESSAGES` (per run, all
//! producers together, default 400000), `BENCH_ONLY` (`producers/payload` rows,
//! comma-separated, e.g. `1/64,4/1024`), `BENCH_WINDOW` (sends in flight per producer,
//! default 1000: the plugin's `max_pending_sends`), `BENCH_NATIVE_BATCH` (`0`: unbatched
//! native producers), and the gateway knobs of `support/server.rs` (`BENCH_MAGNETAR_BIN`,
//! `BENCH_MAGNETAR_ENV`, `BENCH_MAGNETAR_LOG`). Every wait is bounded: a run stops after
//! [`RUN_DEADLINE`], or when a consumer has received nothing for [`IDLE_TIMEOUT`], and
//! counts what arrived.

use std::net::SocketAddr;
use std::time::Duration;

#[path = "support/figures.rs"]
mod figures;
#[path = "websocket/native.rs"]
mod native;
#[path = "websocket/pulsar_ws.rs"]
mod pulsar_ws;
#[path = "support/server.rs"]
mod server;

use figures::{cell, figures, ratio, Figures};
pub use figures::{latency, stamp, Received};
use server::{cpu_seconds, env_usize, free_ports, wait_listening, Proc};

/// Longest one run may take; what arrived by then is counted.
const RUN_DEADLINE: Duration = Duration::from_secs(60);
/// A consumer that receives nothing for this long is done; also bounds every connect,
/// subscribe and receipt.
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Messages of the unreported warm-up run of each way (plugin instances, client pools).
const WARM_UP: usize = 2000;

/// One run's shape.
#[derive(Clone, Copy)]
pub struct Shape {
    /// Producers, consumers and topics (producer `i` → topic `i` → consumer `i`).
    pub pairs: usize,
    pub payload: usize,
    /// Messages each producer sends.
    pub per_producer: usize,
    /// Sends a producer may have unacknowledged.
    pub window: usize,
}

/// Joins a run's task by `until`, past which it is aborted (`None`): the guard that keeps a
/// stuck write or ack from hanging the bench, on top of the bounded receives.
pub async fn join_by<T>(
    mut task: tokio::task::JoinHandle<T>,
    until: tokio::time::Instant,
) -> Option<T> {
    match tokio::time::timeout_at(until, &mut task).await {
        Ok(result) => Some(result.expect("bench task")),
        Err(_) => {
            task.abort();
            println!("  (a task still running {IDLE_TIMEOUT:?} after the run's deadline: aborted)");
            None
        }
    }
}

/// The gateway under test: its process and the two ports the bench uses.
struct Gateway {
    proc: Proc,
    /// The `[broker] listen` address: the native Pulsar protocol.
    broker: SocketAddr,
    /// The web listener: Pulsar's WebSocket API.
    web: SocketAddr,
}

fn start_gateway(dir: &std::path::Path) -> Gateway {
    let [broker, web, admin] = free_ports();
    let config = dir.join("magnetar.toml");
    std::fs::write(
        &config,
        format!(
            "[broker]\nlisten = \"{broker}\"\n\n[admin]\nlisten = \"{admin}\"\n\n\
             [[listeners]]\nname = \"web\"\nbind = \"{web}\"\nplugin = \"pulsar-ws\"\nweb = true\n"
        ),
    )
    .expect("writing the gateway config");
    let proc = server::spawn_magnetar(&config, &dir.join("data"));
    wait_listening(broker);
    wait_listening(web);
    Gateway { proc, broker, web }
}

/// The two ways a row is measured.
#[derive(Clone, Copy, PartialEq)]
enum Way {
    Ws,
    Native,
}

/// One run of `shape` one way, with the gateway's CPU time over it.
fn run(
    rt: &tokio::runtime::Runtime,
    gw: &Gateway,
    way: Way,
    shape: Shape,
    tag: &str,
    native_batch: bool,
) -> Figures {
    let pid = gw.proc.0.id();
    let before = (cpu_seconds(pid), cpu_seconds(std::process::id()));
    let (results, start) = match way {
        Way::Ws => rt.block_on(pulsar_ws::run(gw.web, shape, tag)),
        Way::Native => rt.block_on(native::run(gw.broker, shape, tag, native_batch)),
    };
    let cpu = (
        cpu_seconds(pid) - before.0,
        cpu_seconds(std::process::id()) - before.1,
    );
    figures(results, start, shape.pairs * shape.per_producer, cpu)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("websocket: bench");
        return;
    }
    let n = env_usize("BENCH_MESSAGES", 400_000).max(1);
    let window = env_usize("BENCH_WINDOW", 1000).max(1);
    let native_batch = env_usize("BENCH_NATIVE_BATCH", 1) != 0;
    // `BENCH_ONLY=1/64,4/1024`: only these rows (producers/payload).
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let gw = start_gateway(dir.path());
    println!(
        "Pulsar WebSocket API (web port {}) beside the native protocol (broker port {}), one \
         gateway (pid {}); {n} messages per run, window {window} per producer, native \
         producers {}\n",
        gw.web,
        gw.broker,
        gw.proc.0.id(),
        if native_batch {
            "batched as the gateway's"
        } else {
            "unbatched"
        }
    );
    for way in [Way::Ws, Way::Native] {
        let shape = Shape {
            pairs: 1,
            payload: 64,
            per_producer: WARM_UP,
            window,
        };
        let f = run(&rt, &gw, way, shape, "warm", native_batch);
        if f.received < f.expected {
            println!("(warm-up: {}/{} received)", f.received, f.expected);
        }
    }
    println!(
        "| pubs→subs | payload | WS msgs/s | WS p99 | WS CPU µs/msg gateway (client) | native msgs/s \
         | native p99 | native CPU µs/msg gateway (client) | WS / native msgs/s | WS / native p99 | WS / native CPU/msg |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let mut row = 0;
    for pairs in [1, 4] {
        for payload in [64, 1024] {
            let tag = format!("{pairs}/{payload}");
            if !only.is_empty() && !only.split(',').any(|o| o.trim() == tag) {
                continue;
            }
            row += 1;
            let shape = Shape {
                pairs,
                payload,
                per_producer: (n / pairs).max(1),
                window,
            };
            let order = if row % 2 == 1 {
                [Way::Ws, Way::Native]
            } else {
                [Way::Native, Way::Ws]
            };
            let mut ws = None;
            let mut nat = None;
            for way in order {
                let f = run(&rt, &gw, way, shape, &format!("r{row}"), native_batch);
                match way {
                    Way::Ws => ws = Some(f),
                    Way::Native => nat = Some(f),
                }
            }
            let (ws, nat) = (ws.expect("ws run"), nat.expect("native run"));
            println!(
                "| {pairs}→{pairs} | {payload} B |{}{} {} | {} | {} |",
                cell(Some(&ws)),
                cell(Some(&nat)),
                ratio(Some(ws.rate), Some(nat.rate)),
                ratio(Some(ws.p99.as_secs_f64()), Some(nat.p99.as_secs_f64())),
                ratio(Some(ws.cpu_per_msg_us), Some(nat.cpu_per_msg_us)),
            );
        }
    }
}
