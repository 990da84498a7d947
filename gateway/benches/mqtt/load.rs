//! Throughput and latency of one MQTT server: P publishers → S subscribers, with wildcards.
//!
//! Publisher `i` publishes to `bench/<tag>/<i>/data`; every subscriber subscribes to
//! `bench/<tag>/+/data`, so each receives every publisher's messages. Throughput is messages
//! received by all subscribers / (last receive − first publish); latency is publish →
//! receive, from a timestamp in the payload. Every run is bounded by [`RUN_DEADLINE`].

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

/// Longest one run may take; what arrived by then is counted.
const RUN_DEADLINE: Duration = Duration::from_secs(60);
/// A subscriber that receives nothing for this long is done.
const IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// One run's shape.
#[derive(Clone, Copy)]
pub struct Shape {
    pub qos: QoS,
    pub publishers: usize,
    pub subscribers: usize,
    pub payload: usize,
    /// Messages each subscriber should receive (all publishers together).
    pub messages: usize,
}

/// What one run measured.
pub struct Figures {
    pub rate: f64,
    pub p99: Duration,
    pub received: usize,
    pub expected: usize,
}

fn options(id: String, addr: SocketAddr) -> MqttOptions {
    let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(60));
    o.set_inflight(1000);
    o.set_max_packet_size(1 << 20, 1 << 20);
    o
}

pub async fn run(addr: SocketAddr, shape: Shape, tag: &str) -> Figures {
    let origin = Instant::now();
    let deadline = origin + RUN_DEADLINE;
    let mut subscribers = Vec::new();
    for s in 0..shape.subscribers {
        let (client, mut events) = AsyncClient::new(options(format!("{tag}-s{s}"), addr), 10_000);
        client
            .subscribe(format!("bench/{tag}/+/data"), shape.qos)
            .await
            .expect("subscribe");
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => break,
                Ok(_) => {}
                Err(e) => panic!("subscriber {s} of {tag}: {e}"),
            }
        }
        let expected = shape.messages;
        subscribers.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(expected);
            let mut last = origin;
            while latencies.len() < expected && Instant::now() < deadline {
                match tokio::time::timeout(IDLE_TIMEOUT, events.poll()).await {
                    Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                        let mut t = [0u8; 8];
                        t.copy_from_slice(&p.payload[..8]);
                        let sent = Duration::from_nanos(u64::from_le_bytes(t));
                        last = Instant::now();
                        latencies.push(last.duration_since(origin).saturating_sub(sent));
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(_)) | Err(_) => break,
                }
            }
            drop(client);
            (latencies, last)
        }));
    }
    let per_publisher = shape.messages / shape.publishers;
    let mut publishers = Vec::new();
    for p in 0..shape.publishers {
        let (client, mut events) = AsyncClient::new(options(format!("{tag}-p{p}"), addr), 10_000);
        tokio::spawn(async move { while events.poll().await.is_ok() {} });
        let topic = format!("bench/{tag}/{p}/data");
        let (qos, size) = (shape.qos, shape.payload);
        publishers.push(tokio::spawn(async move {
            for _ in 0..per_publisher {
                let mut payload = vec![0u8; size];
                let t = origin.elapsed().as_nanos() as u64;
                payload[..8].copy_from_slice(&t.to_le_bytes());
                if client
                    .publish(topic.clone(), qos, false, payload)
                    .await
                    .is_err()
                {
                    break;
                }
            }
            client
        }));
    }
    let start = Instant::now();
    let mut latencies = Vec::new();
    let mut last = start;
    for s in subscribers {
        if let Ok((l, t)) = s.await {
            latencies.extend(l);
            last = last.max(t);
        }
    }
    for p in publishers {
        if let Ok(client) = p.await {
            let _ = client.disconnect().await;
        }
    }
    let elapsed = last.duration_since(start).max(Duration::from_millis(1));
    latencies.sort();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    Figures {
        rate: latencies.len() as f64 / elapsed.as_secs_f64(),
        p99: pct(0.99),
        received: latencies.len(),
        expected: per_publisher * shape.publishers * shape.subscribers,
    }
}
