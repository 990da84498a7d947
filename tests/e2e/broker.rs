//! The embedded broker (`magnetar_broker`) driven by the `pulsar` crate, unmodified.
//!
//! Each test starts a broker on 127.0.0.1:0 with its own temporary data directory.

use std::collections::BTreeSet;
use std::time::Duration;

use futures::StreamExt;
use magnetar_broker::{Broker, BrokerConfig, BrokerHandle};
use pulsar::consumer::InitialPosition;
use pulsar::{Consumer, ConsumerOptions, Pulsar, SubType, TokioExecutor};

const TIMEOUT: Duration = Duration::from_secs(30);

async fn start(dir: &std::path::Path) -> BrokerHandle {
    Broker::start(BrokerConfig {
        listen: "127.0.0.1:0".parse().expect("address"),
        data_dir: dir.to_path_buf(),
    })
    .await
    .expect("broker starts")
}

async fn client(broker: &BrokerHandle) -> Pulsar<TokioExecutor> {
    Pulsar::builder(broker.service_url(), TokioExecutor)
        .build()
        .await
        .expect("client connects")
}

async fn consumer(
    pulsar: &Pulsar<TokioExecutor>,
    topic: &str,
    subscription: &str,
    sub_type: SubType,
) -> Consumer<Vec<u8>, TokioExecutor> {
    pulsar
        .consumer()
        .with_topic(topic)
        .with_subscription(subscription)
        .with_subscription_type(sub_type)
        .with_options(ConsumerOptions::default().with_initial_position(InitialPosition::Earliest))
        .build()
        .await
        .expect("consumer subscribes")
}

async fn produce(pulsar: &Pulsar<TokioExecutor>, topic: &str, range: std::ops::Range<u32>) {
    let mut producer = pulsar
        .producer()
        .with_topic(topic)
        .build()
        .await
        .expect("producer created");
    // Keep a bounded window of sends in flight (the client refuses too many at once).
    let mut receipts = Vec::new();
    for i in range {
        let receipt = producer
            .send_non_blocking(format!("msg-{i}").into_bytes())
            .await
            .expect("send queued");
        receipts.push(receipt);
        if receipts.len() == 50 {
            for r in receipts.drain(..) {
                r.await.expect("send receipt");
            }
        }
    }
    for r in receipts {
        r.await.expect("send receipt");
    }
    producer.close().await.expect("producer closes");
}

/// Receives `n` messages (acking them if `ack`), returning their payloads as strings.
async fn receive(
    consumer: &mut Consumer<Vec<u8>, TokioExecutor>,
    n: usize,
    ack: bool,
) -> Vec<String> {
    let mut out = Vec::new();
    while out.len() < n {
        let msg = tokio::time::timeout(TIMEOUT, consumer.next())
            .await
            .expect("message within timeout")
            .expect("stream open")
            .expect("message ok");
        if ack {
            consumer.ack(&msg).await.expect("ack");
        }
        out.push(String::from_utf8(msg.payload.data.clone()).expect("utf8"));
    }
    out
}

fn expected(range: std::ops::Range<u32>) -> Vec<String> {
    range.map(|i| format!("msg-{i}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_produce_then_consume_in_order_with_acks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = start(dir.path()).await;
    let pulsar = client(&broker).await;
    let topic = "persistent://public/default/in-order";
    let mut c = consumer(&pulsar, topic, "s", SubType::Exclusive).await;
    produce(&pulsar, topic, 0..200).await;
    assert_eq!(receive(&mut c, 200, true).await, expected(0..200));
    c.close().await.expect("close");
    drop(pulsar);
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_shared_subscription_splits_and_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = start(dir.path()).await;
    let pulsar = client(&broker).await;
    let topic = "shared-topic";
    let mut a = consumer(&pulsar, topic, "shared", SubType::Shared).await;
    let mut b = consumer(&pulsar, topic, "shared", SubType::Shared).await;
    produce(&pulsar, topic, 0..100).await;
    let mut got_a = Vec::new();
    let mut got_b = Vec::new();
    while got_a.len() + got_b.len() < 100 {
        tokio::select! {
            m = a.next() => {
                let m = m.expect("open").expect("ok");
                a.ack(&m).await.expect("ack");
                got_a.push(String::from_utf8(m.payload.data.clone()).expect("utf8"));
            }
            m = b.next() => {
                let m = m.expect("open").expect("ok");
                b.ack(&m).await.expect("ack");
                got_b.push(String::from_utf8(m.payload.data.clone()).expect("utf8"));
            }
            () = tokio::time::sleep(TIMEOUT) => panic!("timed out with {} + {}", got_a.len(), got_b.len()),
        }
    }
    assert!(
        !got_a.is_empty() && !got_b.is_empty(),
        "both consumers get messages"
    );
    let all: BTreeSet<String> = got_a.iter().chain(&got_b).cloned().collect();
    assert_eq!(all, expected(0..100).into_iter().collect::<BTreeSet<_>>());
    assert_eq!(got_a.len() + got_b.len(), 100, "no duplicates");
    drop(pulsar);
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_durable_backlog_survives_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let topic = "public/default/restart";
    {
        let broker = start(dir.path()).await;
        let pulsar = client(&broker).await;
        let mut c = consumer(&pulsar, topic, "durable", SubType::Exclusive).await;
        produce(&pulsar, topic, 0..10).await;
        assert_eq!(receive(&mut c, 5, true).await, expected(0..5));
        // Give the acks time to reach the broker before stopping it.
        tokio::time::sleep(Duration::from_millis(300)).await;
        c.close().await.expect("close");
        produce(&pulsar, topic, 10..30).await;
        drop(pulsar);
        broker.shutdown().await;
    }
    let broker = start(dir.path()).await;
    let pulsar = client(&broker).await;
    let mut c = consumer(&pulsar, topic, "durable", SubType::Exclusive).await;
    assert_eq!(receive(&mut c, 25, true).await, expected(5..30));
    drop(pulsar);
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_unacked_messages_redelivered_after_consumer_close() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = start(dir.path()).await;
    let pulsar = client(&broker).await;
    let topic = "redeliver";
    let mut first = consumer(&pulsar, topic, "work", SubType::Shared).await;
    produce(&pulsar, topic, 0..20).await;
    assert_eq!(receive(&mut first, 20, false).await, expected(0..20));
    first.close().await.expect("close");
    let mut second = consumer(&pulsar, topic, "work", SubType::Shared).await;
    assert_eq!(receive(&mut second, 20, true).await, expected(0..20));
    drop(pulsar);
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_second_exclusive_consumer_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = start(dir.path()).await;
    // ConsumerBusy is retried by the client; allow one retry so the refusal surfaces.
    let pulsar = Pulsar::builder(broker.service_url(), TokioExecutor)
        .with_operation_retry_options(pulsar::OperationRetryOptions {
            max_retries: Some(1),
            retry_delay: Duration::from_millis(50),
            ..Default::default()
        })
        .build()
        .await
        .expect("client connects");
    let _first = consumer(&pulsar, "excl", "only", SubType::Exclusive).await;
    let second = pulsar
        .consumer()
        .with_topic("excl")
        .with_subscription("only")
        .with_subscription_type(SubType::Exclusive)
        .build::<Vec<u8>>()
        .await;
    assert!(second.is_err(), "second exclusive consumer must fail");
    drop(pulsar);
    broker.shutdown().await;
}
