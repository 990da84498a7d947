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
    start_with(BrokerConfig::new(
        "127.0.0.1:0".parse().expect("address"),
        dir.to_path_buf(),
    ))
    .await
}

async fn start_with(config: BrokerConfig) -> BrokerHandle {
    Broker::start(config).await.expect("broker starts")
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

/// A consumer that acks as fast as it reads: the client gathers the acks queued behind each
/// other into one command, and a nack between them keeps its place. Every acked message stays
/// acked (none comes back to a new consumer), every nacked one comes back once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_burst_of_acks_with_nacks_between_loses_no_ack() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = start(dir.path()).await;
    let pulsar = client(&broker).await;
    let topic = "ack-burst";
    let mut c = consumer(&pulsar, topic, "work", SubType::Shared).await;
    produce(&pulsar, topic, 0..3000).await;
    let mut first_pass = BTreeSet::new();
    let mut redelivered = Vec::new();
    while first_pass.len() + redelivered.len() < 3000 + 300 {
        let msg = tokio::time::timeout(TIMEOUT, c.next())
            .await
            .expect("message within timeout")
            .expect("stream open")
            .expect("message ok");
        let body = String::from_utf8(msg.payload.data.clone()).expect("utf8");
        let i: u32 = body["msg-".len()..].parse().expect("number");
        if first_pass.insert(i) {
            if i.is_multiple_of(10) {
                c.nack(&msg).await.expect("nack");
            } else {
                c.ack(&msg).await.expect("ack");
            }
        } else {
            assert!(
                i.is_multiple_of(10),
                "msg-{i} was acked, yet delivered again"
            );
            c.ack(&msg).await.expect("ack");
            redelivered.push(i);
        }
    }
    redelivered.sort_unstable();
    assert_eq!(redelivered, (0..3000).step_by(10).collect::<Vec<_>>());
    // Acks are sent as they are queued, not on a timer; the pause only lets the last few
    // reach the broker before the close, which does not wait for them.
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.close().await.expect("close");
    let mut next = consumer(&pulsar, topic, "work", SubType::Shared).await;
    produce(&pulsar, topic, 3000..3001).await;
    assert_eq!(
        receive(&mut next, 1, true).await,
        expected(3000..3001),
        "nothing acked is delivered again"
    );
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

// --- token authentication ------------------------------------------------------------------

mod auth {
    use super::*;
    use magnetar_broker::auth::{sign, BrokerAuth, SignKey, TenantRoles, VerifyKey};
    use pulsar::{Authentication, ConnectionRetryOptions, OperationRetryOptions};
    use std::sync::Arc;

    const SECRET: &[u8] = b"e2e-broker-secret-0123456789abcdef";

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs()
    }

    async fn client_with(
        broker: &BrokerHandle,
        token: Option<String>,
    ) -> Result<Pulsar<TokioExecutor>, pulsar::Error> {
        let mut builder = Pulsar::builder(broker.service_url(), TokioExecutor)
            .with_connection_retry_options(ConnectionRetryOptions {
                max_retries: 0,
                ..Default::default()
            })
            .with_operation_retry_options(OperationRetryOptions {
                max_retries: Some(0),
                ..Default::default()
            });
        if let Some(token) = token {
            builder = builder.with_auth(Authentication {
                name: "token".into(),
                data: token.into_bytes(),
            });
        }
        builder.build().await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn broker_token_auth_admits_valid_tokens_only_to_their_tenant() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut roles = TenantRoles::default();
        roles.tenants.insert("alice".into(), vec!["acme".into()]);
        let mut config = BrokerConfig::new("127.0.0.1:0".parse().expect("addr"), dir.path().into());
        config.auth = Some(BrokerAuth {
            verify_key: VerifyKey::Hs256(SECRET.to_vec()),
            authorizer: Arc::new(roles),
            anonymous_role: None,
        });
        let broker = start_with(config).await;
        let key = SignKey::Hs256(SECRET.to_vec());

        let alice = sign(&key, "alice", Some(now() + 600)).expect("sign");
        let pulsar = client_with(&broker, Some(alice))
            .await
            .expect("valid token connects");
        let topic = "persistent://acme/ns/auth";
        let mut c = consumer(&pulsar, topic, "s", SubType::Exclusive).await;
        produce(&pulsar, topic, 0..5).await;
        assert_eq!(receive(&mut c, 5, true).await, expected(0..5));
        let foreign = pulsar
            .producer()
            .with_topic("persistent://globex/ns/auth")
            .build()
            .await;
        assert!(foreign.is_err(), "alice must not produce to another tenant");
        drop(pulsar);

        let refused = [
            (
                "wrong key",
                Some(sign(&SignKey::Hs256(b"other".to_vec()), "alice", None).expect("sign")),
            ),
            (
                "expired",
                Some(sign(&key, "alice", Some(now() - 5)).expect("sign")),
            ),
            ("garbage", Some("not-a-jwt".to_string())),
            ("no token", None),
        ];
        for (why, token) in refused {
            let result = tokio::time::timeout(TIMEOUT, client_with(&broker, token))
                .await
                .expect("refusal within timeout");
            assert!(
                result.is_err(),
                "{why}: the broker must refuse the connection"
            );
        }
        broker.shutdown().await;
    }
}

// --- broker-entry metadata -------------------------------------------------------------

mod entry_metadata {
    use super::*;
    use bytes::{Buf, BytesMut};
    use pulsar::message::proto::{self, base_command::Type, BaseCommand};
    use pulsar::message::{Codec, Message};
    use pulsar::producer::ProducerOptions;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio_util::codec::{Decoder, Encoder};

    /// One delivered entry as a raw client sees it.
    #[derive(Debug)]
    struct Delivered {
        /// (broker_timestamp, index) from the broker-entry metadata section, if present.
        entry_metadata: Option<(u64, u64)>,
        messages: u64,
    }

    fn varints(mut b: &[u8]) -> Vec<(u64, u64)> {
        fn varint(b: &mut &[u8]) -> u64 {
            let mut v = 0u64;
            for shift in (0..64).step_by(7) {
                let byte = b.get_u8();
                v |= u64::from(byte & 0x7f) << shift;
                if byte & 0x80 == 0 {
                    break;
                }
            }
            v
        }
        let mut out = Vec::new();
        while b.has_remaining() {
            let key = varint(&mut b);
            out.push((key >> 3, varint(&mut b)));
        }
        out
    }

    async fn send(stream: &mut TcpStream, command: BaseCommand) {
        let mut buf = BytesMut::new();
        Codec
            .encode(
                Message {
                    command,
                    payload: None,
                },
                &mut buf,
            )
            .expect("encode");
        stream.write_all(&buf).await.expect("write");
    }

    /// Next frame; a broker-entry metadata section is cut out (and returned) so that the
    /// `pulsar` codec can decode the rest.
    async fn next(stream: &mut TcpStream, buf: &mut BytesMut) -> (Message, Option<(u64, u64)>) {
        loop {
            if buf.len() >= 4 {
                let total = u32::from_be_bytes(buf[..4].try_into().expect("4")) as usize;
                if buf.len() >= 4 + total {
                    let mut frame = buf.split_to(4 + total);
                    let cmd_len = u32::from_be_bytes(frame[4..8].try_into().expect("4")) as usize;
                    let at = 8 + cmd_len;
                    let mut bem = None;
                    if frame.len() > at + 2 && frame[at..at + 2] == [0x0e, 0x02] {
                        let len = u32::from_be_bytes(frame[at + 2..at + 6].try_into().expect("4"))
                            as usize;
                        let fields = varints(&frame[at + 6..at + 6 + len]);
                        let get = |f| fields.iter().find(|(k, _)| *k == f).map(|(_, v)| *v);
                        bem = Some((get(1).expect("timestamp"), get(2).expect("index")));
                        let rest = frame.split_off(at + 6 + len);
                        frame.truncate(at);
                        frame.extend_from_slice(&rest);
                        let new_total = (frame.len() - 4) as u32;
                        frame[..4].copy_from_slice(&new_total.to_be_bytes());
                    }
                    let msg = Codec
                        .decode(&mut frame)
                        .expect("frame")
                        .expect("whole frame");
                    return (msg, bem);
                }
            }
            let n = tokio::time::timeout(TIMEOUT, stream.read_buf(buf))
                .await
                .expect("frame within timeout")
                .expect("read");
            assert!(n > 0, "broker closed the connection");
        }
    }

    /// Reads entries of `topic` from the start with a raw client of protocol version 19
    /// until `messages` messages.
    async fn read_raw(
        broker: &BrokerHandle,
        topic: &str,
        ask: bool,
        messages: u64,
    ) -> Vec<Delivered> {
        read_raw_at(broker, topic, 19, ask, messages).await
    }

    /// [`read_raw`] by a client that announced protocol `version`.
    async fn read_raw_at(
        broker: &BrokerHandle,
        topic: &str,
        version: i32,
        ask: bool,
        messages: u64,
    ) -> Vec<Delivered> {
        let mut stream = TcpStream::connect(broker.local_addr())
            .await
            .expect("connect");
        let mut buf = BytesMut::new();
        send(
            &mut stream,
            BaseCommand {
                r#type: Type::Connect as i32,
                connect: Some(proto::CommandConnect {
                    client_version: "raw-e2e".into(),
                    protocol_version: Some(version),
                    feature_flags: Some(proto::FeatureFlags {
                        supports_broker_entry_metadata: Some(ask),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            },
        )
        .await;
        let (connected, _) = next(&mut stream, &mut buf).await;
        assert!(connected.command.connected.is_some());
        send(
            &mut stream,
            BaseCommand {
                r#type: Type::Subscribe as i32,
                subscribe: Some(proto::CommandSubscribe {
                    topic: topic.into(),
                    subscription: "raw".into(),
                    sub_type: proto::command_subscribe::SubType::Exclusive as i32,
                    consumer_id: 1,
                    request_id: 1,
                    durable: Some(false),
                    initial_position: Some(
                        proto::command_subscribe::InitialPosition::Earliest as i32,
                    ),
                    ..Default::default()
                }),
                ..Default::default()
            },
        )
        .await;
        let (ok, _) = next(&mut stream, &mut buf).await;
        assert!(ok.command.success.is_some(), "{:?}", ok.command);
        send(
            &mut stream,
            BaseCommand {
                r#type: Type::Flow as i32,
                flow: Some(proto::CommandFlow {
                    consumer_id: 1,
                    message_permits: 1000,
                }),
                ..Default::default()
            },
        )
        .await;
        let mut out = Vec::new();
        while out.iter().map(|d: &Delivered| d.messages).sum::<u64>() < messages {
            let (msg, bem) = next(&mut stream, &mut buf).await;
            let payload = msg.payload.expect("message payload");
            out.push(Delivered {
                entry_metadata: bem,
                messages: payload.metadata.num_messages_in_batch.unwrap_or(1) as u64,
            });
        }
        out
    }

    async fn produce_batched(
        pulsar: &Pulsar<TokioExecutor>,
        topic: &str,
        batches: usize,
        size: u32,
    ) {
        let mut producer = pulsar
            .producer()
            .with_topic(topic)
            .with_options(ProducerOptions {
                batch_size: Some(size),
                ..Default::default()
            })
            .build()
            .await
            .expect("producer");
        let mut receipts = Vec::new();
        for i in 0..(batches as u32 * size) {
            receipts.push(
                producer
                    .send_non_blocking(format!("b-{i}").into_bytes())
                    .await
                    .expect("queued"),
            );
        }
        for r in receipts {
            r.await.expect("receipt");
        }
        producer.close().await.expect("close");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn broker_entry_index_counts_messages_continuously_across_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let topic = "persistent://public/default/entry-index";
        {
            let broker = start(dir.path()).await;
            let pulsar = client(&broker).await;
            produce_batched(&pulsar, topic, 2, 4).await;
            produce(&pulsar, topic, 0..3).await;
            drop(pulsar);
            broker.shutdown().await;
        }
        let broker = start(dir.path()).await;
        let pulsar = client(&broker).await;
        produce(&pulsar, topic, 3..6).await;
        produce_batched(&pulsar, topic, 1, 3).await;

        let delivered = read_raw(&broker, topic, true, 17).await;
        let total: u64 = delivered.iter().map(|d| d.messages).sum();
        assert_eq!(total, 4 + 4 + 3 + 3 + 3, "{delivered:?}");
        assert!(
            delivered.iter().any(|d| d.messages > 1),
            "batches were stored: {delivered:?}"
        );
        let mut next_index = 0;
        let mut last_time = 0;
        for d in &delivered {
            let (time, index) = d
                .entry_metadata
                .expect("entry metadata for a client that asks");
            // Pulsar's index is that of the entry's last message.
            assert_eq!(index + 1 - d.messages, next_index, "{delivered:?}");
            assert!(time >= last_time && time > 0);
            next_index = index + 1;
            last_time = time;
        }
        // A client that does not ask gets plain frames.
        let plain = read_raw(&broker, topic, false, 17).await;
        assert!(plain.iter().all(|d| d.entry_metadata.is_none()));
        // So does one that asks below protocol version 18, as Apache Pulsar does.
        let old = read_raw_at(&broker, topic, 17, true, 17).await;
        assert!(old.iter().all(|d| d.entry_metadata.is_none()), "{old:?}");
        let v18 = read_raw_at(&broker, topic, 18, true, 17).await;
        assert!(v18.iter().all(|d| d.entry_metadata.is_some()), "{v18:?}");
        drop(pulsar);
        broker.shutdown().await;
    }

    /// The `pulsar` client (patched: protocol version 18 and the feature flag) hands each
    /// message its entry's broker-entry metadata, and a seek by time lands on the first
    /// entry stored at or after the time (the broker's timestamp), as Apache Pulsar's.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn broker_client_sees_entry_indexes_and_seeks_by_broker_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let topic = "persistent://public/default/entry-index-client";
        let broker = start(dir.path()).await;
        let pulsar = client(&broker).await;
        produce_batched(&pulsar, topic, 1, 3).await;
        produce(&pulsar, topic, 0..2).await;
        // A reader (non-durable), as the gateway's indexed readers are.
        let mut c: Consumer<Vec<u8>, TokioExecutor> = pulsar
            .consumer()
            .with_topic(topic)
            .with_subscription("idx")
            .with_subscription_type(SubType::Exclusive)
            .with_options(
                ConsumerOptions::default()
                    .durable(false)
                    .with_initial_position(InitialPosition::Earliest),
            )
            .build()
            .await
            .expect("reader");
        let mut seen = Vec::new();
        for _ in 0..5 {
            let m = tokio::time::timeout(TIMEOUT, c.next())
                .await
                .expect("in time")
                .expect("a message")
                .expect("ok");
            let bem = m.payload.broker_entry.expect("broker-entry metadata");
            seen.push((
                m.message_id.id.entry_id,
                bem.index.expect("index"),
                bem.broker_timestamp.expect("time"),
            ));
        }
        // The batch of three is one entry whose index is its last message's (2), then the
        // single messages 3 and 4.
        let indexes: Vec<u64> = seen.iter().map(|s| s.1).collect();
        assert_eq!(indexes, vec![2, 2, 2, 3, 4], "{seen:?}");

        // Seek to the time of the fourth entry exactly: it comes first (at or after).
        let t = seen[4].2;
        tokio::time::timeout(TIMEOUT, c.seek(None, None, Some(t), pulsar.clone()))
            .await
            .expect("seek answered in time")
            .expect("seek");
        let m = tokio::time::timeout(TIMEOUT, c.next())
            .await
            .expect("in time")
            .expect("a message")
            .expect("ok");
        let first = m.payload.broker_entry.and_then(|b| b.broker_timestamp);
        assert!(first.is_some_and(|f| f >= t), "{first:?} < {t}");
        let at_t = seen.iter().find(|s| s.2 >= t).map(|s| s.0);
        assert_eq!(Some(m.message_id.id.entry_id), at_t, "{seen:?}");
        drop(c);
        drop(pulsar);
        broker.shutdown().await;
    }
}

// --- retention ---------------------------------------------------------------------------

fn segment_files(dir: &std::path::Path, topic: &str) -> usize {
    let topic_dir = dir
        .join("topics")
        .join(magnetar_broker::naming::escape(topic));
    std::fs::read_dir(topic_dir)
        .expect("topic dir")
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".seg"))
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_retention_deletes_only_segments_every_subscription_acknowledged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = BrokerConfig::new("127.0.0.1:0".parse().expect("addr"), dir.path().into());
    config.segment_bytes = 4096;
    config.retention = magnetar_broker::Retention {
        max_bytes: Some(0),
        max_age: None,
    };
    let broker = start_with(config).await;
    let pulsar = client(&broker).await;
    let topic = "persistent://public/default/retained";
    let mut main = consumer(&pulsar, topic, "main", SubType::Exclusive).await;
    let mut laggard = consumer(&pulsar, topic, "laggard", SubType::Exclusive).await;
    produce(&pulsar, topic, 0..300).await;
    let before = segment_files(dir.path(), topic);
    assert!(before >= 3, "several segments written ({before})");
    assert_eq!(receive(&mut main, 300, true).await, expected(0..300));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        segment_files(dir.path(), topic),
        before,
        "unacknowledged (laggard) data is kept"
    );
    assert_eq!(receive(&mut laggard, 300, true).await, expected(0..300));
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while segment_files(dir.path(), topic) > 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "consumed segments deleted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The topic goes on; a new subscription from the earliest starts at the oldest kept entry.
    produce(&pulsar, topic, 300..310).await;
    let mut fresh = consumer(&pulsar, topic, "fresh", SubType::Exclusive).await;
    let mut got = Vec::new();
    while got.last().map(String::as_str) != Some("msg-309") {
        got.extend(receive(&mut fresh, 1, true).await);
    }
    let first: u32 = got[0]["msg-".len()..].parse().expect("number");
    assert!(first > 0, "the deleted messages are gone");
    assert_eq!(got, expected(first..310));
    drop(pulsar);
    broker.shutdown().await;
}
