//! Hostile and wrong input on raw sockets: each misbehaving client gets a clear answer
//! (`CommandError`, `SendError`, `AckResponse` with an error, or a close after an error)
//! while a well-behaved client of the `pulsar` crate on the same broker keeps producing and
//! consuming. Also: the in-process connection a client in the broker's own process uses.

use std::time::Duration;

use bytes::BytesMut;
use futures::{SinkExt, StreamExt};
use magnetar_broker::{command as cmd, Broker, BrokerConfig, BrokerHandle};
use pulsar::consumer::InitialPosition;
use pulsar::message::proto::{self, base_command::Type, MessageMetadata, ServerError};
use pulsar::message::{Codec, Message, Payload};
use pulsar::{Consumer, ConsumerOptions, Producer, Pulsar, TokioExecutor};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::{Encoder, Framed};

const TIMEOUT: Duration = Duration::from_secs(10);
const TOPIC: &str = "persistent://public/default/bystander";

fn connect() -> Message {
    cmd(Type::Connect, |c| {
        c.connect = Some(proto::CommandConnect {
            client_version: "raw-test".into(),
            protocol_version: Some(19),
            ..Default::default()
        })
    })
}

fn send(producer_id: u64, sequence_id: u64, data: &[u8]) -> Message {
    let mut m = cmd(Type::Send, |c| {
        c.send = Some(proto::CommandSend {
            producer_id,
            sequence_id,
            ..Default::default()
        })
    });
    m.payload = Some(Payload {
        metadata: MessageMetadata {
            producer_name: "raw".into(),
            sequence_id,
            publish_time: 1,
            ..Default::default()
        },
        data: data.to_vec(),
        broker_entry: None,
    });
    m
}

fn ping() -> Message {
    cmd(Type::Ping, |c| c.ping = Some(proto::CommandPing {}))
}

/// A raw protocol connection.
struct Raw(Framed<TcpStream, Codec>);

impl Raw {
    async fn open(broker: &BrokerHandle) -> Raw {
        let s = TcpStream::connect(broker.local_addr()).await.unwrap();
        Raw(Framed::new(s, Codec))
    }

    async fn connected(broker: &BrokerHandle) -> Raw {
        let mut raw = Raw::open(broker).await;
        raw.send(connect()).await;
        assert!(raw.next().await.command.connected.is_some());
        raw
    }

    async fn send(&mut self, m: Message) {
        self.0.send(m).await.unwrap();
    }

    async fn write_raw(&mut self, bytes: &[u8]) {
        self.0.get_mut().write_all(bytes).await.unwrap();
    }

    async fn next(&mut self) -> Message {
        tokio::time::timeout(TIMEOUT, self.0.next())
            .await
            .expect("a reply in time")
            .expect("connection open")
            .expect("a well-formed reply")
    }

    /// The connection is usable: a ping is answered.
    async fn alive(&mut self) {
        self.send(ping()).await;
        assert!(self.next().await.command.pong.is_some());
    }

    /// The broker closed the connection (after any replies still in flight).
    async fn closed(mut self) {
        let stream = self.0.get_mut();
        let mut rest = Vec::new();
        let read = tokio::time::timeout(TIMEOUT, stream.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "the broker closes the connection");
    }

    async fn error_then_close(mut self, request_id: u64, code: ServerError) -> String {
        let reply = self.next().await.command;
        let e = reply.error.expect("CommandError");
        assert_eq!((e.request_id, e.error), (request_id, code as i32), "{e:?}");
        self.closed().await;
        e.message
    }
}

/// The client that must not notice anything: sends one message and receives it.
async fn bystander_round_trip(
    producer: &mut Producer<TokioExecutor>,
    consumer: &mut Consumer<Vec<u8>, TokioExecutor>,
    text: &str,
) {
    producer
        .send_non_blocking(text.as_bytes().to_vec())
        .await
        .unwrap()
        .await
        .unwrap();
    let msg = tokio::time::timeout(TIMEOUT, consumer.next())
        .await
        .expect("bystander receives in time")
        .unwrap()
        .unwrap();
    consumer.ack(&msg).await.unwrap();
    assert_eq!(msg.payload.data, text.as_bytes());
}

/// A broker on a free loopback port with its data in `dir`.
async fn start(dir: &std::path::Path) -> BrokerHandle {
    Broker::start(BrokerConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        dir.into(),
    ))
    .await
    .unwrap()
}

/// A `pulsar` crate client of `broker` over TCP.
async fn client(broker: &BrokerHandle) -> Pulsar<TokioExecutor> {
    Pulsar::builder(broker.service_url(), TokioExecutor)
        .build()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_error_and_disturbs_no_other_client() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path()).await;
    let pulsar = client(&broker).await;
    let mut consumer: Consumer<Vec<u8>, TokioExecutor> = pulsar
        .consumer()
        .with_topic(TOPIC)
        .with_subscription("bystander")
        .with_options(ConsumerOptions::default().with_initial_position(InitialPosition::Earliest))
        .build()
        .await
        .unwrap();
    let mut producer = pulsar.producer().with_topic(TOPIC).build().await.unwrap();
    bystander_round_trip(&mut producer, &mut consumer, "before").await;

    // A command before Connect: an error for its request, then the close.
    let mut raw = Raw::open(&broker).await;
    raw.send(cmd(Type::Producer, |c| {
        c.producer = Some(proto::CommandProducer {
            topic: TOPIC.into(),
            producer_id: 1,
            request_id: 7,
            ..Default::default()
        })
    }))
    .await;
    let why = raw.error_then_close(7, ServerError::NotAllowedError).await;
    assert!(why.contains("before Connect"), "{why}");

    // Send before Producer: SendError, and the connection goes on.
    let mut raw = Raw::connected(&broker).await;
    raw.send(send(9, 1, b"nobody")).await;
    let e = raw.next().await.command.send_error.expect("SendError");
    assert_eq!(
        (e.producer_id, e.sequence_id, e.error),
        (9, 1, ServerError::NotAllowedError as i32)
    );
    raw.alive().await;

    // A payload with a wrong CRC32C: SendError(ChecksumError), nothing stored; a good send
    // on the same connection afterwards is stored and reaches the bystander's consumer.
    raw.send(cmd(Type::Producer, |c| {
        c.producer = Some(proto::CommandProducer {
            topic: TOPIC.into(),
            producer_id: 1,
            request_id: 8,
            ..Default::default()
        })
    }))
    .await;
    assert!(raw.next().await.command.producer_success.is_some());
    let mut corrupt = BytesMut::new();
    Codec
        .encode(send(1, 1, b"corrupted"), &mut corrupt)
        .unwrap();
    let last = corrupt.len() - 1;
    corrupt[last] ^= 0x20;
    raw.write_raw(&corrupt).await;
    let e = raw.next().await.command.send_error.expect("SendError");
    assert_eq!(
        (e.sequence_id, e.error),
        (1, ServerError::ChecksumError as i32)
    );
    raw.send(send(1, 2, b"intact")).await;
    assert!(raw.next().await.command.send_receipt.is_some());
    let msg = tokio::time::timeout(TIMEOUT, consumer.next())
        .await
        .expect("the intact message arrives")
        .unwrap()
        .unwrap();
    assert_eq!(
        msg.payload.data, b"intact",
        "the corrupted send was not stored"
    );
    consumer.ack(&msg).await.unwrap();

    // Acks for a consumer that does not exist: with a receipt request, an error; without,
    // ignored. The connection stays usable.
    let ack = |request_id: Option<u64>| {
        cmd(Type::Ack, |c| {
            c.ack = Some(proto::CommandAck {
                consumer_id: 42,
                ack_type: proto::command_ack::AckType::Individual as i32,
                message_id: vec![proto::MessageIdData {
                    ledger_id: 0,
                    entry_id: 123_456,
                    ..Default::default()
                }],
                request_id,
                ..Default::default()
            })
        })
    };
    raw.send(ack(None)).await;
    raw.send(ack(Some(11))).await;
    let r = raw.next().await.command.ack_response.expect("AckResponse");
    assert_eq!(
        (r.request_id, r.error),
        (Some(11), Some(ServerError::ConsumerNotFound as i32))
    );
    raw.alive().await;

    // Consumer ids: closed ones are inert and reusable; one in use elsewhere is refused.
    let subscribe = |topic: &str, request_id: u64| {
        let topic = topic.to_string();
        cmd(Type::Subscribe, move |c| {
            c.subscribe = Some(proto::CommandSubscribe {
                topic,
                subscription: "raw".into(),
                consumer_id: 1,
                request_id,
                ..Default::default()
            })
        })
    };
    raw.send(subscribe("persistent://public/default/raw-a", 20))
        .await;
    assert_eq!(raw.next().await.command.success.unwrap().request_id, 20);
    raw.send(cmd(Type::CloseConsumer, |c| {
        c.close_consumer = Some(proto::CommandCloseConsumer {
            consumer_id: 1,
            request_id: 21,
        })
    }))
    .await;
    assert_eq!(raw.next().await.command.success.unwrap().request_id, 21);
    raw.send(cmd(Type::Flow, |c| {
        c.flow = Some(proto::CommandFlow {
            consumer_id: 1,
            message_permits: 100,
        })
    }))
    .await;
    raw.send(ack(None)).await;
    raw.alive().await;
    raw.send(subscribe("persistent://public/default/raw-b", 22))
        .await;
    assert_eq!(raw.next().await.command.success.unwrap().request_id, 22);
    raw.send(subscribe("persistent://public/default/raw-c", 23))
        .await;
    let e = raw.next().await.command.error.expect("CommandError");
    assert_eq!(
        (e.request_id, e.error),
        (23, ServerError::ConsumerBusy as i32)
    );
    raw.alive().await;

    bystander_round_trip(&mut producer, &mut consumer, "during").await;

    // A frame claiming 2 GiB: refused before anything is buffered, error, close.
    let mut raw = Raw::connected(&broker).await;
    raw.write_raw(&0x7fff_fff0u32.to_be_bytes()).await;
    let why = raw
        .error_then_close(u64::MAX, ServerError::NotAllowedError)
        .await;
    assert!(why.contains("exceeds"), "{why}");

    // Malformed frames: a command size beyond the frame, and protobuf garbage.
    for garbage in [
        &[0, 0, 0, 8, 0, 0, 0, 200, 1, 2, 3, 4][..],
        &[0, 0, 0, 9, 0, 0, 0, 5, 0xff, 0xff, 0xff, 0xff, 0xff][..],
    ] {
        let mut raw = Raw::connected(&broker).await;
        raw.write_raw(garbage).await;
        raw.error_then_close(u64::MAX, ServerError::NotAllowedError)
            .await;
    }

    // A corrupt payload on a command that is not a Send: error and close.
    let mut raw = Raw::connected(&broker).await;
    let mut frame = BytesMut::new();
    let mut m = ping();
    m.payload = send(0, 0, b"x").payload;
    Codec.encode(m, &mut frame).unwrap();
    let last = frame.len() - 1;
    frame[last] ^= 1;
    raw.write_raw(&frame).await;
    raw.error_then_close(u64::MAX, ServerError::ChecksumError)
        .await;

    // Everything above left the bystander and the broker untouched.
    bystander_round_trip(&mut producer, &mut consumer, "after").await;
    let mut fresh = Raw::connected(&broker).await;
    fresh.alive().await;
    drop(pulsar);
    broker.shutdown().await;
}

/// A client on an in-process connection (what the gateway uses for its embedded broker) and
/// one on TCP see the same topics: each reads what the other wrote, in order; shutting the
/// broker down ends the in-process connections too instead of waiting for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_and_tcp_clients_share_topics_and_shutdown_ends_both() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path()).await;
    let topic = "persistent://public/default/in-process";
    let tcp = client(&broker).await;
    let local: Pulsar<TokioExecutor> = Pulsar::builder(broker.service_url(), TokioExecutor)
        .with_connector(std::sync::Arc::new(broker.in_process()))
        .build()
        .await
        .unwrap();
    let subscribe = |client: &Pulsar<TokioExecutor>, name: &str| {
        client
            .consumer()
            .with_topic(topic)
            .with_subscription(name)
            .with_options(
                ConsumerOptions::default().with_initial_position(InitialPosition::Earliest),
            )
            .build::<Vec<u8>>()
    };
    let mut tcp_reader = subscribe(&tcp, "tcp").await.unwrap();
    let mut local_reader = subscribe(&local, "local").await.unwrap();
    let mut local_writer = local.producer().with_topic(topic).build().await.unwrap();
    let mut tcp_writer = tcp.producer().with_topic(topic).build().await.unwrap();
    for (writer, name) in [(&mut local_writer, "local"), (&mut tcp_writer, "tcp")] {
        for i in 0..50 {
            let receipt = writer
                .send_non_blocking(format!("{name} {i}").into_bytes())
                .await
                .unwrap();
            receipt.await.unwrap();
        }
    }
    let expected: Vec<String> = (0..50)
        .map(|i| format!("local {i}"))
        .chain((0..50).map(|i| format!("tcp {i}")))
        .collect();
    for reader in [&mut tcp_reader, &mut local_reader] {
        let mut got = Vec::new();
        while got.len() < expected.len() {
            let msg = tokio::time::timeout(TIMEOUT, reader.next())
                .await
                .expect("message in time")
                .unwrap()
                .unwrap();
            reader.ack(&msg).await.unwrap();
            got.push(String::from_utf8(msg.payload.data).unwrap());
        }
        assert_eq!(got, expected);
    }
    tokio::time::timeout(TIMEOUT, broker.shutdown())
        .await
        .expect("shutdown does not wait for in-process clients");
}
