//! A full and a read-only data disk: the broker refuses sends (a `SendError`, no receipt),
//! keeps everything it receipted, and takes messages again by itself once the disk allows
//! writes (no restart). The disk is a 1 MiB tmpfs remounted bigger, read-only and writable
//! again (read-only across a restart: see the test): that needs root with CAP_SYS_ADMIN, as CI runs; elsewhere the test says so and
//! passes without checking anything. The mount is always removed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use magnetar_broker::{command as cmd, Broker, BrokerConfig, BrokerHandle};
use pulsar::message::proto::{self, base_command::Type, BaseCommand, MessageMetadata, ServerError};
use pulsar::message::{Codec, Payload};
use pulsar::{Pulsar, TokioExecutor};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

const TOPIC: &str = "persistent://public/default/disk";
const PAYLOAD: usize = 4000;

/// A tmpfs mount, unmounted on drop.
struct SmallDisk {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount() -> Option<SmallDisk> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        std::fs::create_dir(&path).unwrap();
        mount(&["-t", "tmpfs", "-o", "size=1m", "tmpfs"], &path)
            .then_some(SmallDisk { path, _dir: dir })
    }

    fn remount(&self, options: &str) {
        assert!(
            mount(&["-o", &format!("remount,{options}")], &self.path),
            "remount {options}"
        );
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.path)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

fn mount(args: &[&str], path: &Path) -> bool {
    Command::new("mount")
        .args(args)
        .arg(path)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn payload(i: u32) -> Vec<u8> {
    let mut p = format!("disk-{i}-").into_bytes();
    p.resize(PAYLOAD, b'z');
    p
}

/// A raw protocol producer: its sends are answered by exactly one `SendReceipt` or
/// `SendError` (official clients retry a `SendError` on a new connection by themselves,
/// which would hide the broker's answer).
struct RawProducer {
    framed: Framed<TcpStream, Codec>,
    sequence_id: u64,
}

impl RawProducer {
    async fn open(broker: &BrokerHandle) -> Result<RawProducer, BaseCommand> {
        let s = TcpStream::connect(broker.local_addr()).await.unwrap();
        let mut framed = Framed::new(s, Codec);
        framed
            .send(cmd(Type::Connect, |c| {
                c.connect = Some(proto::CommandConnect {
                    client_version: "raw".into(),
                    protocol_version: Some(19),
                    ..Default::default()
                })
            }))
            .await
            .unwrap();
        framed
            .send(cmd(Type::Producer, |c| {
                c.producer = Some(proto::CommandProducer {
                    topic: TOPIC.into(),
                    producer_id: 1,
                    request_id: 1,
                    ..Default::default()
                })
            }))
            .await
            .unwrap();
        let mut p = RawProducer {
            framed,
            sequence_id: 0,
        };
        assert!(p.next().await.connected.is_some());
        let answer = p.next().await;
        match answer.producer_success {
            Some(_) => Ok(p),
            None => Err(answer),
        }
    }

    async fn next(&mut self) -> BaseCommand {
        tokio::time::timeout(Duration::from_secs(10), self.framed.next())
            .await
            .expect("an answer in time")
            .unwrap()
            .unwrap()
            .command
    }

    /// Sends message `i`: `Ok` on a receipt, `Err(error code)` on a `SendError`.
    async fn send(&mut self, i: u32) -> Result<(), i32> {
        self.sequence_id += 1;
        let mut m = cmd(Type::Send, |c| {
            c.send = Some(proto::CommandSend {
                producer_id: 1,
                sequence_id: self.sequence_id,
                ..Default::default()
            })
        });
        m.payload = Some(Payload {
            metadata: MessageMetadata {
                producer_name: "raw".into(),
                sequence_id: self.sequence_id,
                publish_time: 1,
                ..Default::default()
            },
            data: payload(i),
            broker_entry: None,
        });
        self.framed.send(m).await.unwrap();
        let answer = self.next().await;
        match (answer.send_receipt.clone(), answer.send_error.clone()) {
            (Some(r), _) => {
                assert_eq!(r.sequence_id, self.sequence_id);
                Ok(())
            }
            (_, Some(e)) => {
                assert_eq!(e.sequence_id, self.sequence_id);
                Err(e.error)
            }
            _ => panic!("neither receipt nor error: {answer:?}"),
        }
    }
}

/// Sends `range` one by one until one is refused; returns the receipted ones and whether
/// one was refused (with `PersistenceError`).
async fn send_until_refused(p: &mut RawProducer, range: std::ops::Range<u32>) -> (Vec<u32>, bool) {
    let mut receipted = Vec::new();
    for i in range {
        match p.send(i).await {
            Ok(()) => receipted.push(i),
            Err(code) => {
                assert_eq!(code, ServerError::PersistenceError as i32);
                return (receipted, true);
            }
        }
    }
    (receipted, false)
}

/// Sends `i` until the broker takes it: it must recover by itself.
async fn send_eventually(p: &mut RawProducer, i: u32) {
    for _ in 0..50 {
        if p.send(i).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("the broker did not take messages again within ~10 s");
}

/// Every message stored in the topic, read from the start.
async fn stored(broker: &BrokerHandle) -> Vec<u32> {
    let pulsar: Pulsar<TokioExecutor> = Pulsar::builder(broker.service_url(), TokioExecutor)
        .build()
        .await
        .unwrap();
    let mut reader = pulsar
        .reader()
        .with_topic(TOPIC)
        .with_consumer_name("check")
        .with_options(
            pulsar::ConsumerOptions::default()
                .with_initial_position(pulsar::consumer::InitialPosition::Earliest),
        )
        .into_reader::<Vec<u8>>()
        .await
        .unwrap();
    let mut out = Vec::new();
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_secs(2), reader.next()).await {
        let data = msg.unwrap().payload.data;
        assert_eq!(data.len(), PAYLOAD, "intact");
        let text = String::from_utf8_lossy(&data);
        let i = text
            .split('-')
            .nth(1)
            .and_then(|n| n.parse().ok())
            .expect("a message of ours");
        assert_eq!(data, payload(i), "intact");
        out.push(i);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_or_read_only_disk_refuses_sends_keeps_receipted_and_recovers() {
    let Some(disk) = SmallDisk::mount() else {
        eprintln!("SKIPPED: cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN)");
        return;
    };
    let config = BrokerConfig::new("127.0.0.1:0".parse().unwrap(), disk.path.clone());
    let broker = Broker::start(config.clone()).await.unwrap();
    let mut p = RawProducer::open(&broker).await.unwrap();

    // Fill the disk: receipts until it is full, then a SendError.
    let (mut receipted, refused) = send_until_refused(&mut p, 0..1000).await;
    assert!(refused, "a 1 MiB disk refuses some of 4 MB");
    assert!(
        receipted.len() > 20,
        "{} receipted before full",
        receipted.len()
    );
    let (none, refused) = send_until_refused(&mut p, 1000..1001).await;
    assert!(refused && none.is_empty(), "still full, still refused");
    assert_eq!(
        stored(&broker).await,
        receipted,
        "what was receipted is there, nothing more"
    );

    // Space returns: the broker takes messages again, without a restart.
    disk.remount("size=64m");
    send_eventually(&mut p, 10_000).await;
    receipted.push(10_000);
    let (more, refused) = send_until_refused(&mut p, 10_001..10_021).await;
    assert!(!refused && more.len() == 20);
    receipted.extend(more);

    // Read-only (a file system cannot be remounted read-only under files open for
    // writing, so the broker restarts onto it): producers are refused with an error,
    // nothing is lost; once writable again the same broker process takes messages.
    drop(p);
    broker.shutdown().await;
    disk.remount("ro");
    let broker = Broker::start(config.clone()).await.unwrap();
    let refused = RawProducer::open(&broker)
        .await
        .err()
        .expect("no producer on a read-only disk");
    let e = refused.error.expect("CommandError");
    assert_eq!(e.error, ServerError::ServiceNotReady as i32, "{e:?}");
    assert!(e.message.contains("Read-only"), "{e:?}");
    disk.remount("rw");
    let mut p = RawProducer::open(&broker)
        .await
        .expect("the broker recovers by itself");
    assert_eq!(stored(&broker).await, receipted);
    send_eventually(&mut p, 30_000).await;
    receipted.push(30_000);

    // And after a restart everything receipted is still there, in order and intact.
    drop(p);
    broker.shutdown().await;
    let broker = Broker::start(config).await.unwrap();
    assert_eq!(stored(&broker).await, receipted);
    broker.shutdown().await;
    drop(disk);
}
