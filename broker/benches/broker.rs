//! Broker benchmark: produce and consume rates and send-receipt latency with the `pulsar`
//! crate against the embedded broker (persistent, fsync per group commit), beside the data
//! disk's own limits measured in the same run: sequential write + fsync throughput and the
//! p99 of one small write + fsync. Prints a Markdown table with the ratios to the targets
//! of issue 4 (batched 100-byte produce within 2x of the disk's sequential-write limit;
//! receipt p99 within 2x of one fsync's p99).
//!
//! `cargo bench -p magnetar-broker --bench broker` (about a minute). `MAGNETAR_BENCH_DIR`
//! picks the disk (default: the system temp dir); `MAGNETAR_BENCH_SECS` the seconds of
//! producing per scenario (default 3).

use std::collections::VecDeque;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use futures::StreamExt;
use magnetar_broker::{Broker, BrokerConfig};
use pulsar::consumer::InitialPosition;
use pulsar::producer::ProducerOptions;
use pulsar::{ConsumerOptions, Pulsar, TokioExecutor};

/// Sends in flight per producer (a tenth of it without batching).
const WINDOW: usize = 1000;
/// Messages consumed per scenario (from the start of its backlog).
const CONSUME_MAX: usize = 300_000;

struct Disk {
    write_mb_s: f64,
    fsync_p99: Duration,
}

/// Sequential 1 MiB writes each followed by `sync_data` (throughput), then 4 KiB writes
/// each followed by `sync_data` (latency): what the broker's group commit does.
fn measure_disk(dir: &Path) -> Disk {
    let path = dir.join("disk-probe");
    let mut f = std::fs::File::create(&path).expect("probe file");
    let chunk = vec![0x5au8; 1 << 20];
    let start = Instant::now();
    let mut written = 0usize;
    while start.elapsed() < Duration::from_secs(3) && written < (512 << 20) {
        f.write_all(&chunk).expect("write");
        f.sync_data().expect("fsync");
        written += chunk.len();
    }
    let write_mb_s = written as f64 / 1e6 / start.elapsed().as_secs_f64();
    let small = vec![0xa5u8; 4096];
    let mut lat = Vec::new();
    let start = Instant::now();
    while lat.len() < 2000 && start.elapsed() < Duration::from_secs(3) {
        let t = Instant::now();
        f.write_all(&small).expect("write");
        f.sync_data().expect("fsync");
        lat.push(t.elapsed());
    }
    drop(f);
    let _ = std::fs::remove_file(&path);
    Disk {
        write_mb_s,
        fsync_p99: percentile(&mut lat, 0.99),
    }
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort_unstable();
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
}

struct Run {
    produced: usize,
    produce_secs: f64,
    p50: Duration,
    p99: Duration,
    consume_rate: f64,
}

async fn scenario(
    pulsar: &Pulsar<TokioExecutor>,
    topic: &str,
    size: usize,
    batching: bool,
    producers: usize,
    secs: f64,
) -> Run {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..producers {
        let options = ProducerOptions {
            batch_size: batching.then_some(1000),
            batch_byte_size: batching.then_some(128 * 1024),
            batch_timeout: batching.then_some(Duration::from_millis(1)),
            ..Default::default()
        };
        let mut producer = pulsar
            .producer()
            .with_topic(topic)
            .with_options(options)
            .build()
            .await
            .expect("producer");
        tasks.push(tokio::spawn(async move {
            let payload = vec![b'm'; size];
            let mut inflight: VecDeque<(Instant, pulsar::producer::SendFuture)> = VecDeque::new();
            let mut lat = Vec::new();
            let window = if batching { WINDOW } else { WINDOW / 10 };
            while Instant::now() < deadline {
                let t = Instant::now();
                let receipt = match producer.send_non_blocking(payload.clone()).await {
                    Ok(r) => r,
                    Err(_) => {
                        // The client's own queue is full (SlowDown): wait for the oldest.
                        if let Some((t, r)) = inflight.pop_front() {
                            r.await.expect("receipt");
                            lat.push(t.elapsed());
                        }
                        continue;
                    }
                };
                inflight.push_back((t, receipt));
                if inflight.len() >= window {
                    if let Some((t, r)) = inflight.pop_front() {
                        r.await.expect("receipt");
                        lat.push(t.elapsed());
                    }
                }
            }
            for (t, r) in inflight {
                r.await.expect("receipt");
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.expect("producer task"));
    }
    let produce_secs = start.elapsed().as_secs_f64();
    let produced = lat.len();
    let p50 = percentile(&mut lat, 0.5);
    let p99 = percentile(&mut lat, 0.99);
    let mut consumer: pulsar::Consumer<Vec<u8>, _> = pulsar
        .consumer()
        .with_topic(topic)
        .with_subscription("bench")
        .with_options(ConsumerOptions::default().with_initial_position(InitialPosition::Earliest))
        .build()
        .await
        .expect("consumer");
    let start = Instant::now();
    let mut got = 0;
    while got < produced.min(CONSUME_MAX) {
        match tokio::time::timeout(Duration::from_secs(10), consumer.next()).await {
            Ok(Some(Ok(msg))) => {
                consumer.ack(&msg).await.expect("ack");
                got += 1;
            }
            _ => break,
        }
    }
    let consume_rate = got as f64 / start.elapsed().as_secs_f64();
    Run {
        produced,
        produce_secs,
        p50,
        p99,
        consume_rate,
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let base = std::env::var_os("MAGNETAR_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let secs: f64 = std::env::var("MAGNETAR_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let dir = tempfile::tempdir_in(&base).expect("bench dir");
    let disk = measure_disk(dir.path());
    let broker = Broker::start(BrokerConfig::new(
        "127.0.0.1:0".parse().expect("addr"),
        dir.path().join("broker"),
    ))
    .await
    .expect("broker");
    let pulsar: Pulsar<TokioExecutor> = Pulsar::builder(broker.service_url(), TokioExecutor)
        .build()
        .await
        .expect("client");
    println!(
        "disk ({}): sequential write+fsync {:.0} MB/s, 4 KiB write+fsync p99 {:.2} ms\n",
        base.display(),
        disk.write_mb_s,
        ms(disk.fsync_p99)
    );
    println!("| size | batching | producers | produce msgs/s | produce MB/s | vs disk MB/s | receipt p50 ms | receipt p99 ms | p99 / fsync p99 | consume msgs/s |");
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut n = 0;
    for size in [100usize, 1024] {
        for batching in [true, false] {
            for producers in [1usize, 4] {
                n += 1;
                let topic = format!("persistent://public/default/bench-{n}");
                let r = scenario(&pulsar, &topic, size, batching, producers, secs).await;
                let rate = r.produced as f64 / r.produce_secs;
                let mb = rate * size as f64 / 1e6;
                println!(
                    "| {size} B | {} | {producers} | {rate:.0} | {mb:.1} | {:.2} | {:.2} | {:.2} | {:.1} | {:.0} |",
                    if batching { "on" } else { "off" },
                    mb / disk.write_mb_s,
                    ms(r.p50),
                    ms(r.p99),
                    r.p99.as_secs_f64() / disk.fsync_p99.as_secs_f64().max(1e-9),
                    r.consume_rate
                );
            }
        }
    }
    drop(pulsar);
    broker.shutdown().await;
}
