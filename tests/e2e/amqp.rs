//! AMQP 0-9-1 with `lapin`, the Rust client, against the gateway's `amqp` plugin and against
//! RabbitMQ (a private node, `gateway/benches/support/rabbitmq.rs`): the same scenario runs
//! against both, so what it expects is RabbitMQ's behaviour. The Python suite
//! (`tests/python/test_amqp_*.py`, pika and aio-pika) covers the rest of the protocol the same
//! way.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection, ConnectionProperties, ErrorKind};

use crate::harness::{Gateway, Options};

#[path = "../../gateway/benches/support/rabbitmq.rs"]
mod rabbitmq;

const TIMEOUT: Duration = Duration::from_secs(20);

fn gateway_with_amqp() -> (Gateway, SocketAddr) {
    let amqp = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port");
    let gw = Gateway::start(Options {
        extra: format!(
            "\n[[listeners]]\nname = \"amqp\"\nbind = \"{amqp}\"\nplugin = \"amqp\"\n\n\
             [[auth.users]]\nname = \"guest\"\npassword = \"guest\"\n"
        ),
        ..Options::default()
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(amqp).is_err() {
        assert!(Instant::now() < deadline, "no amqp listener:\n{}", gw.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    (gw, amqp)
}

/// Every property a publisher can set, with a field table of several types.
fn properties() -> BasicProperties {
    let mut nested = FieldTable::default();
    nested.insert("depth".into(), AMQPValue::LongInt(2));
    let mut headers = FieldTable::default();
    headers.insert(
        "text".into(),
        AMQPValue::LongString(LongString::from("héllo")),
    );
    headers.insert("int".into(), AMQPValue::LongLongInt(-42));
    headers.insert("flag".into(), AMQPValue::Boolean(true));
    headers.insert("ratio".into(), AMQPValue::Double(0.25));
    headers.insert("nested".into(), AMQPValue::FieldTable(nested));
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("identity".into())
        .with_headers(headers)
        .with_delivery_mode(2)
        .with_priority(5)
        .with_correlation_id("corr-1".into())
        .with_reply_to("replies".into())
        .with_message_id("msg-1".into())
        .with_timestamp(1_700_000_000)
        .with_type("order.created".into())
        .with_user_id("guest".into())
        .with_app_id("e2e".into())
}

/// Publishes with confirms, gets a mandatory message returned, consumes with manual acks
/// (a nack with requeue comes back redelivered), and gets 404 on a passive declare.
async fn scenario(server: &str, addr: SocketAddr) {
    let uri = format!("amqp://guest:guest@{addr}/%2f");
    let conn = tokio::time::timeout(
        TIMEOUT,
        Connection::connect(&uri, ConnectionProperties::default()),
    )
    .await
    .expect("connect in time")
    .unwrap_or_else(|e| panic!("{server}: connect: {e}"));
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm.select");
    let queue = format!("lapin-{}", std::process::id());
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("queue.declare");

    let props = properties();
    let confirm = ch
        .basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions::default(),
            b"payload \x00\xff",
            props.clone(),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(confirm.is_ack(), "{server}: {confirm:?}");
    assert!(confirm.take_message().is_none(), "{server}: routed");

    // Mandatory and unroutable: returned (312 NO_ROUTE) before its confirm.
    let confirm = ch
        .basic_publish(
            "".into(),
            "no-such-queue-anywhere".into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            b"lost",
            BasicProperties::default(),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(confirm.is_ack(), "{server}: {confirm:?}");
    let returned = confirm.take_message().expect("returned");
    assert_eq!(returned.reply_code, 312, "{server}");
    assert_eq!(returned.delivery.data, b"lost", "{server}");

    let consuming = conn.create_channel().await.expect("channel");
    consuming
        .basic_qos(10, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = consuming
        .basic_consume(
            queue.as_str().into(),
            "e2e".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let first = tokio::time::timeout(TIMEOUT, consumer.next())
        .await
        .expect("a delivery in time")
        .expect("a delivery")
        .expect("delivery");
    assert_eq!(first.data, b"payload \x00\xff", "{server}");
    assert_eq!(first.properties, props, "{server}: properties end to end");
    assert!(!first.redelivered, "{server}");
    first
        .acker
        .nack(BasicNackOptions {
            requeue: true,
            ..BasicNackOptions::default()
        })
        .await
        .expect("nack");
    let again = tokio::time::timeout(TIMEOUT, consumer.next())
        .await
        .expect("the redelivery in time")
        .expect("a delivery")
        .expect("delivery");
    assert_eq!(again.data, b"payload \x00\xff", "{server}");
    assert!(again.redelivered, "{server}: requeued means redelivered");
    again
        .acker
        .ack(BasicAckOptions::default())
        .await
        .expect("ack");

    // A passive declare of a queue that does not exist: 404, and the channel is closed.
    let missing = ch
        .queue_declare(
            "lapin-no-such-queue".into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect_err("a passive declare of a missing queue fails");
    match missing.kind() {
        ErrorKind::ProtocolError(e) => assert_eq!(e.get_id(), 404, "{server}: {e:?}"),
        other => panic!("{server}: {other:?}"),
    }
    // The connection and its other channels go on.
    assert!(consuming.status().connected(), "{server}");
    let _ = conn.close(200, "bye".into()).await;
}

#[test]
fn lapin_sees_the_gateway_behave_as_rabbitmq_does() {
    let rabbit_dir = tempfile::tempdir().expect("tempdir");
    let rabbit = rabbitmq::RabbitMq::start(rabbit_dir.path());
    if rabbit.is_none() {
        eprintln!(
            "{} not installed (scripts/setup installs it): the gateway only",
            rabbitmq::rabbitmq_server()
        );
    }
    let (gw, amqp) = gateway_with_amqp();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    if let Some(r) = &rabbit {
        rt.block_on(scenario("rabbitmq", r.amqp));
    }
    rt.block_on(scenario("magnetar", amqp));
    drop(gw);
}
