//! What the gateway's side-by-side benches (`websocket.rs`, `amqp.rs`, each through
//! `#[path]`) measure and print per run: payloads stamped with their send time, each
//! consumer's latencies, and one row cell of messages/s, p99 and CPU per message.

use std::time::{Duration, Instant};

/// What one consumer saw: publish → receive latencies, and when its last message came.
pub struct Received {
    pub latencies: Vec<Duration>,
    pub last: Instant,
}

/// The timestamp a payload carries: nanoseconds since `origin` in its first 8 bytes.
pub fn stamp(payload: &mut [u8], origin: Instant) {
    let t = origin.elapsed().as_nanos() as u64;
    if let Some(head) = payload.get_mut(..8) {
        head.copy_from_slice(&t.to_le_bytes());
    }
}

/// Publish → now of a payload stamped by [`stamp`]; `None` if it is too short.
pub fn latency(payload: &[u8], origin: Instant) -> Option<Duration> {
    let head: [u8; 8] = payload.get(..8)?.try_into().ok()?;
    let sent = Duration::from_nanos(u64::from_le_bytes(head));
    Some(origin.elapsed().saturating_sub(sent))
}

/// What one run measured.
pub struct Figures {
    pub rate: f64,
    pub p99: Duration,
    pub received: usize,
    pub expected: usize,
    /// The server's CPU time per message received.
    pub cpu_per_msg_us: f64,
    /// The bench process's own CPU time per message: the clients' share of the 2 cores.
    pub client_per_msg_us: f64,
}

/// Consumers' results → figures; `start` is when the producers began, `cpu` the server's and
/// the bench's CPU seconds over the run.
pub fn figures(
    results: Vec<Received>,
    start: Instant,
    expected: usize,
    cpu: (f64, f64),
) -> Figures {
    let mut latencies: Vec<Duration> = Vec::with_capacity(expected);
    let mut last = start;
    for r in results {
        last = last.max(r.last);
        latencies.extend(r.latencies);
    }
    latencies.sort_unstable();
    let p99 = latencies
        .get((latencies.len() * 99 / 100).min(latencies.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default();
    let elapsed = last.duration_since(start).max(Duration::from_millis(1));
    let n = latencies.len().max(1) as f64;
    Figures {
        rate: latencies.len() as f64 / elapsed.as_secs_f64(),
        p99,
        received: latencies.len(),
        expected,
        cpu_per_msg_us: cpu.0 * 1e6 / n,
        client_per_msg_us: cpu.1 * 1e6 / n,
    }
}

/// One run's cells of a Markdown row: msgs/s (received/expected when short), p99, CPU µs per
/// message (the clients' in parentheses); dashes for a run that did not happen.
pub fn cell(f: Option<&Figures>) -> String {
    let Some(f) = f else {
        return " – | – | – |".into();
    };
    let short = if f.received < f.expected {
        format!(" ({}/{})", f.received, f.expected)
    } else {
        String::new()
    };
    format!(
        " {:.0}{short} | {:.1?} | {:.1} ({:.1}) |",
        f.rate, f.p99, f.cpu_per_msg_us, f.client_per_msg_us
    )
}

/// `a / b` as `1.23x`, or a dash.
pub fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "–".into(),
    }
}
