//! The native side of a run: the `pulsar` crate on the gateway's broker port, the same load
//! as the WebSocket side. Each producer and each consumer has a client (a TCP connection)
//! of its own, as each WebSocket session is a connection of its own. Producers keep at most
//! `window` receipts outstanding and batch as the gateway's own producers do (its
//! `backend::BATCH_*`), unless asked not to; consumers have a receive queue of 1000 (the
//! WebSocket API's `receiverQueueSize`) and ack every message.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Instant;

use futures::StreamExt;
use pulsar::{Pulsar, TokioExecutor};

use crate::{join_by, latency, stamp, Received, Shape, IDLE_TIMEOUT, RUN_DEADLINE};

async fn client(broker: SocketAddr) -> Pulsar<TokioExecutor> {
    let build = Pulsar::builder(format!("pulsar://{broker}"), TokioExecutor).build();
    tokio::time::timeout(IDLE_TIMEOUT, build)
        .await
        .expect("pulsar client: no answer")
        .expect("pulsar client")
}

/// One run: consumers subscribed first, then producers; returns what each consumer saw and
/// when the producers started.
pub async fn run(
    broker: SocketAddr,
    shape: Shape,
    tag: &str,
    batch: bool,
) -> (Vec<Received>, Instant) {
    let origin = Instant::now();
    let deadline = tokio::time::Instant::from_std(origin + RUN_DEADLINE);
    let topic = |i: usize| {
        format!(
            "persistent://public/default/native-{tag}-{i}-{}",
            std::process::id()
        )
    };
    let mut consumers = Vec::new();
    for i in 0..shape.pairs {
        let pulsar = client(broker).await;
        let build = pulsar
            .consumer()
            .with_topic(topic(i))
            .with_subscription("bench")
            .with_subscription_type(pulsar::SubType::Exclusive)
            .with_batch_size(1000)
            .build::<Vec<u8>>();
        let consumer = tokio::time::timeout(IDLE_TIMEOUT, build)
            .await
            .expect("subscribe: no answer")
            .expect("subscribe");
        consumers.push(tokio::spawn(consume(
            pulsar,
            consumer,
            shape.per_producer,
            origin,
            deadline,
        )));
    }
    let mut producers = Vec::new();
    for i in 0..shape.pairs {
        let pulsar = client(broker).await;
        let build = pulsar
            .producer()
            .with_topic(topic(i))
            .with_options(pulsar::ProducerOptions {
                block_queue_if_full: true,
                batch_size: batch.then_some(magnetar::backend::BATCH_MESSAGES),
                batch_byte_size: batch.then_some(magnetar::backend::BATCH_BYTES),
                batch_timeout: batch.then_some(magnetar::backend::BATCH_DELAY),
                ..Default::default()
            })
            .build();
        let producer = tokio::time::timeout(IDLE_TIMEOUT, build)
            .await
            .expect("producer: no answer")
            .expect("producer");
        producers.push((pulsar, producer));
    }
    let start = Instant::now();
    let producers: Vec<_> = producers
        .into_iter()
        .map(|(pulsar, producer)| tokio::spawn(produce(pulsar, producer, shape, origin, deadline)))
        .collect();
    let until = deadline + IDLE_TIMEOUT;
    for p in producers {
        let errors = join_by(p, until).await.unwrap_or(0);
        if errors > 0 {
            println!("  ({errors} failed sends)");
        }
    }
    let mut results = Vec::new();
    for c in consumers {
        results.extend(join_by(c, until).await);
    }
    (results, start)
}

/// Sends `shape.per_producer` messages with at most `shape.window` receipts outstanding;
/// returns the sends that failed.
async fn produce(
    _pulsar: Pulsar<TokioExecutor>,
    mut producer: pulsar::Producer<TokioExecutor>,
    shape: Shape,
    origin: Instant,
    deadline: tokio::time::Instant,
) -> usize {
    let mut receipts = VecDeque::with_capacity(shape.window);
    let mut errors = 0;
    let mut payload = vec![0x5a_u8; shape.payload];
    for _ in 0..shape.per_producer {
        if tokio::time::Instant::now() >= deadline {
            break;
        }
        while receipts.len() >= shape.window {
            let Some(receipt) = receipts.pop_front() else {
                break;
            };
            if !matches!(tokio::time::timeout(IDLE_TIMEOUT, receipt).await, Ok(Ok(_))) {
                errors += 1;
            }
        }
        stamp(&mut payload, origin);
        let msg = pulsar::producer::Message {
            payload: payload.clone(),
            ..Default::default()
        };
        match tokio::time::timeout(IDLE_TIMEOUT, producer.send_non_blocking(msg)).await {
            Ok(Ok(receipt)) => receipts.push_back(receipt),
            _ => errors += 1,
        }
    }
    for receipt in receipts {
        if !matches!(tokio::time::timeout(IDLE_TIMEOUT, receipt).await, Ok(Ok(_))) {
            errors += 1;
        }
    }
    let _ = tokio::time::timeout(IDLE_TIMEOUT, producer.close()).await;
    errors
}

/// Receives `expected` messages (or until the deadline or [`IDLE_TIMEOUT`] of silence),
/// acking each.
async fn consume(
    _pulsar: Pulsar<TokioExecutor>,
    mut consumer: pulsar::Consumer<Vec<u8>, TokioExecutor>,
    expected: usize,
    origin: Instant,
    deadline: tokio::time::Instant,
) -> Received {
    let mut latencies = Vec::with_capacity(expected);
    let mut last = Instant::now();
    while latencies.len() < expected {
        let until = deadline.min(tokio::time::Instant::now() + IDLE_TIMEOUT);
        let m = match tokio::time::timeout_at(until, consumer.next()).await {
            Ok(Some(Ok(m))) => m,
            _ => break,
        };
        if let Some(l) = latency(&m.payload.data, origin) {
            last = Instant::now();
            latencies.push(l);
        }
        if !matches!(
            tokio::time::timeout(IDLE_TIMEOUT, consumer.ack(&m)).await,
            Ok(Ok(()))
        ) {
            break;
        }
    }
    let _ = tokio::time::timeout(IDLE_TIMEOUT, consumer.close()).await;
    Received { latencies, last }
}
