//! Delivery-path probes: where the time of a delivery goes, one stage at a time.
//!
//! `cargo bench -p magnetar --bench mqtt -- --stages` runs, against the gateway's embedded
//! broker:
//! - a `pulsar` crate producer → a `pulsar` crate consumer (per-message ack), at two
//!   consumer batch sizes: the broker and the client library alone;
//! - a `pulsar` producer into the MQTT namespace topic → one MQTT QoS 0 subscriber through
//!   the gateway: the gateway's delivery path (consumer → plugin → socket).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures::StreamExt;
use pulsar::{Pulsar, TokioExecutor};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

async fn client(broker: SocketAddr) -> Pulsar<TokioExecutor> {
    let c = Pulsar::builder(format!("pulsar://{broker}"), TokioExecutor)
        .build()
        .await
        .expect("pulsar client");
    if std::env::var("PROBE_NODELAY").is_ok() {
        nodelay_all(broker);
    }
    c
}

/// DIAGNOSIS ONLY: sets TCP_NODELAY on every socket of this process connected to `peer`.
fn nodelay_all(peer: SocketAddr) {
    use std::os::fd::{FromRawFd, IntoRawFd};
    for e in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let Ok(fd) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let link = std::fs::read_link(e.path()).unwrap_or_default();
        if !link.to_string_lossy().starts_with("socket:") {
            continue;
        }
        let s = unsafe { std::net::TcpStream::from_raw_fd(fd) };
        if s.peer_addr().ok() == Some(peer) {
            println!("  nodelay on fd {fd}");
            let _ = s.set_nodelay(true);
        }
        let _ = s.into_raw_fd();
    }
}

/// Publishes `n` messages (64 B, or `BENCH_STAGE_PAYLOAD` bytes) as fast as the producer
/// takes them, batched as the gateway's producers batch; returns when all are stored.
async fn produce(
    client: &Pulsar<TokioExecutor>,
    topic: &str,
    n: usize,
    properties: HashMap<String, String>,
) {
    let mut producer = client
        .producer()
        .with_topic(topic)
        .with_options(pulsar::ProducerOptions {
            block_queue_if_full: true,
            batch_size: Some(magnetar::backend::BATCH_MESSAGES),
            batch_byte_size: Some(magnetar::backend::BATCH_BYTES),
            batch_timeout: Some(magnetar::backend::BATCH_DELAY),
            ..Default::default()
        })
        .build()
        .await
        .expect("producer");
    let size = std::env::var("BENCH_STAGE_PAYLOAD")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(64);
    let mut receipts = Vec::with_capacity(n);
    for _ in 0..n {
        let msg = pulsar::producer::Message {
            payload: vec![7u8; size],
            properties: properties.clone(),
            ..Default::default()
        };
        receipts.push(producer.send_non_blocking(msg).await.expect("send"));
    }
    for r in receipts {
        r.await.expect("receipt");
    }
}

/// Producer alone, then a consumer reading that backlog (ack each): producer msgs/s, consumer msgs/s.
pub async fn pulsar_backlog(broker: SocketAddr, n: usize, batch: u32) -> (f64, f64) {
    let client = client(broker).await;
    let topic = format!(
        "persistent://public/default/backlog-{batch}-{}",
        std::process::id()
    );
    let mut consumer: pulsar::Consumer<Vec<u8>, TokioExecutor> = client
        .consumer()
        .with_topic(&topic)
        .with_subscription("probe")
        .with_batch_size(batch)
        .with_options(
            pulsar::ConsumerOptions::default()
                .with_initial_position(pulsar::consumer::InitialPosition::Earliest),
        )
        .build()
        .await
        .expect("consumer");
    let start = Instant::now();
    produce(&client, &topic, n, HashMap::new()).await;
    let produced = n as f64 / start.elapsed().as_secs_f64();
    let start = Instant::now();
    let mut got = 0;
    while got < n {
        match tokio::time::timeout(Duration::from_secs(10), consumer.next()).await {
            Ok(Some(Ok(m))) => {
                got += 1;
                consumer.ack(&m).await.expect("ack");
            }
            _ => break,
        }
    }
    (produced, got as f64 / start.elapsed().as_secs_f64())
}

/// Pulsar producer → Pulsar consumer, acking each message.
pub async fn pulsar_alone(broker: SocketAddr, n: usize, batch: u32) -> f64 {
    let client = client(broker).await;
    let topic = format!(
        "persistent://public/default/probe-{batch}-{}",
        std::process::id()
    );
    let mut consumer: pulsar::Consumer<Vec<u8>, TokioExecutor> = client
        .consumer()
        .with_topic(&topic)
        .with_subscription("probe")
        .with_batch_size(batch)
        .build()
        .await
        .expect("consumer");
    let producer = {
        let client = client.clone();
        let topic = topic.clone();
        tokio::spawn(async move { produce(&client, &topic, n, HashMap::new()).await })
    };
    let mut first = None;
    let mut got = 0;
    while got < n {
        match tokio::time::timeout(Duration::from_secs(10), consumer.next()).await {
            Ok(Some(Ok(m))) => {
                first.get_or_insert_with(Instant::now);
                got += 1;
                consumer.ack(&m).await.expect("ack");
            }
            _ => break,
        }
    }
    let _ = producer.await;
    got as f64
        / first
            .map(|t| t.elapsed().as_secs_f64())
            .unwrap_or(f64::INFINITY)
}

/// Pulsar producer into the MQTT topic → one MQTT QoS 0 subscriber through the gateway.
pub async fn pulsar_to_mqtt(broker: SocketAddr, mqtt: SocketAddr, n: usize) -> f64 {
    let mut so = MqttOptions::new("probe-sub", mqtt.ip().to_string(), mqtt.port());
    so.set_keep_alive(Duration::from_secs(60));
    let (sub, mut events) = AsyncClient::new(so, 1000);
    sub.subscribe("probe/#", QoS::AtMostOnce)
        .await
        .expect("subscribe");
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = events.poll().await.expect("poll") {
            break;
        }
    }
    let client = client(broker).await;
    let props = HashMap::from([
        ("mqtt.topic".to_string(), "probe/data".to_string()),
        ("mqtt.qos".to_string(), "0".to_string()),
    ]);
    let producer = tokio::spawn(async move {
        produce(&client, "persistent://public/default/mqtt", n, props).await
    });
    let mut first = None;
    let mut got = 0;
    while got < n {
        match tokio::time::timeout(Duration::from_secs(10), events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(_)))) => {
                first.get_or_insert_with(Instant::now);
                got += 1;
            }
            Ok(Ok(_)) => {}
            _ => break,
        }
    }
    let _ = producer.await;
    if got < n {
        println!("  (received {got}/{n})");
    }
    got as f64
        / first
            .map(|t| t.elapsed().as_secs_f64())
            .unwrap_or(f64::INFINITY)
}
