//! AMQP 0-9-1 through the gateway's `amqp` plugin, side by side with RabbitMQ on the same
//! machine in one run (issue 23: at least 2.0x RabbitMQ on every row).
//!
//! Two servers, both started by the bench and stopped when it ends: the gateway (the real
//! binary, standalone: embedded broker, an `amqp` listener, RabbitMQ's default user
//! `guest`/`guest`) and a private RabbitMQ node (Debian's `rabbitmq-server`, as the AMQP
//! tests start it: its own node name, ports, epmd and directories, no plugins). Every row is
//! measured against both, the order alternating from row to row, with `lapin` as the client:
//! - producers publish persistent messages (`delivery-mode` 2) with publisher confirms, at
//!   most `BENCH_WINDOW` unconfirmed each (the next publish waits for the oldest confirm);
//! - consumers (`basic.consume`, manual acks, `basic.qos` prefetch `BENCH_WINDOW`) ack every
//!   message.
//!
//! Rows: P producers → P consumers on P durable queues through the default exchange (1 → 1,
//! 4 → 4), 64 B and 1 KiB; and a fan-out row: one producer publishing to one topic exchange
//! with 1,000 durable queues bound to it (`dev.<i>`), each message routed by its key to one of
//! them, 1,000 consumers (4 connections of 250 channels). Figures: messages/s end to end
//! (messages received by all consumers / last receive − first publish), p99 of publish →
//! receive (a timestamp in the payload), the server's CPU time per message received from the
//! first publish on (the gateway process; RabbitMQ's whole process group), in parentheses the
//! bench process's own (its clients), and Magnetar / RabbitMQ.
//!
//! Then two polling rows (tag `get`): one client's `basic.get`s, one at a time, on a queue
//! that stays empty (an application that polls instead of consuming), and on a queue of
//! messages published (persistent, confirmed) before, each acknowledged, until `get-ok` says
//! none is left (an application draining a queue): gets/s of each server and the ratio.
//!
//! Run: `cargo bench -p magnetar --bench amqp` — env `BENCH_MESSAGES` (per run, default
//! 20000), `BENCH_ONLY` (rows by tag, comma-separated: `1/64`, `4/1024`, `fanout`, `get`),
//! `BENCH_WINDOW` (default 100), `RABBITMQ_SERVER` (default
//! `/usr/lib/rabbitmq/bin/rabbitmq-server`; without it the RabbitMQ columns stay empty),
//! and the gateway knobs of `support/server.rs`. Every wait is bounded: a run stops after
//! [`RUN_DEADLINE`] or [`IDLE_TIMEOUT`] without a message, and counts what arrived.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};

#[path = "support/figures.rs"]
mod figures;
#[path = "support/rabbitmq.rs"]
mod rabbitmq;
#[path = "support/server.rs"]
mod server;

use figures::{cell, figures, latency, ratio, stamp, Figures, Received};
use rabbitmq::RabbitMq;
use server::{cpu_seconds, env_usize, free_ports, wait_listening, Proc};

/// Longest one run may take; what arrived by then is counted.
const RUN_DEADLINE: Duration = Duration::from_secs(120);
/// A consumer that receives nothing for this long is done; also bounds connects.
const IDLE_TIMEOUT: Duration = Duration::from_secs(15);
/// Messages of the unreported warm-up run against each server.
const WARM_UP: usize = 1000;
/// Queues (and consumers) of the fan-out row.
const FANOUT_QUEUES: usize = 1000;
/// Connections the fan-out row's consumers share.
const FANOUT_CONNECTIONS: usize = 4;

/// One server under test.
struct Server {
    name: &'static str,
    amqp: SocketAddr,
    /// The processes whose CPU time counts: one pid, or a process group.
    cpu: Cpu,
    /// The server's process (stopped when dropped): the gateway's or RabbitMQ's.
    _gateway: Option<Proc>,
    _rabbitmq: Option<RabbitMq>,
}

enum Cpu {
    Pid(u32),
    Group(i32),
}

impl Cpu {
    fn seconds(&self) -> f64 {
        match *self {
            Cpu::Pid(pid) => cpu_seconds(pid),
            Cpu::Group(pgid) => group_cpu_seconds(pgid),
        }
    }
}

/// CPU time of every process in process group `pgid` (RabbitMQ: the Erlang VM and its
/// helpers), in seconds.
fn group_cpu_seconds(pgid: i32) -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    let (_, rest) = s.rsplit_once(')')?;
                    rest.split_whitespace().nth(2)?.parse::<i32>().ok()
                })
                == Some(pgid)
        })
        .map(cpu_seconds)
        .sum()
}

fn start_gateway(dir: &Path) -> Server {
    let [broker, admin, amqp] = free_ports();
    let config = dir.join("magnetar.toml");
    // A/B runs of the plugin alone: a directory whose `amqp.wasm` replaces the built-in one.
    let plugins = std::env::var("BENCH_PLUGIN_DIR")
        .map(|d| format!("\n[plugins]\ndir = \"{d}\"\n"))
        .unwrap_or_default();
    std::fs::write(
        &config,
        format!(
            "[broker]\nlisten = \"{broker}\"\n\n[admin]\nlisten = \"{admin}\"\n\n\
             [[listeners]]\nname = \"amqp\"\nbind = \"{amqp}\"\nplugin = \"amqp\"\n\n\
             [[auth.users]]\nname = \"guest\"\npassword = \"guest\"\n{plugins}"
        ),
    )
    .expect("writing the gateway config");
    let proc = server::spawn_magnetar(&config, &dir.join("data"));
    wait_listening(amqp);
    Server {
        name: "magnetar",
        amqp,
        cpu: Cpu::Pid(proc.0.id()),
        _gateway: Some(proc),
        _rabbitmq: None,
    }
}

/// A private RabbitMQ node in `dir` (`support/rabbitmq.rs`), or `None` when
/// `rabbitmq-server` is not installed.
fn start_rabbitmq(dir: &Path) -> Option<Server> {
    let Some(node) = RabbitMq::start(dir) else {
        println!(
            "({} not installed: no RabbitMQ column; scripts/setup installs it)",
            rabbitmq::rabbitmq_server()
        );
        return None;
    };
    Some(Server {
        name: "rabbitmq",
        amqp: node.amqp,
        cpu: Cpu::Group(node.pgid()),
        _gateway: None,
        _rabbitmq: Some(node),
    })
}

/// One run's shape.
#[derive(Clone, Copy)]
struct Shape {
    /// Producers (and, without `fanout`, consumers and queues).
    pairs: usize,
    payload: usize,
    /// Messages each producer sends.
    per_producer: usize,
    window: usize,
    fanout: bool,
}

async fn connect(addr: SocketAddr) -> Connection {
    let uri = format!("amqp://guest:guest@{addr}/%2f");
    tokio::time::timeout(
        IDLE_TIMEOUT,
        Connection::connect(&uri, ConnectionProperties::default()),
    )
    .await
    .expect("connect in time")
    .expect("connect")
}

/// Consumes `expected` messages from `queue` on a channel of `conn`, acking each.
async fn consume(
    conn: &Connection,
    queue: String,
    expected: usize,
    window: usize,
    origin: Instant,
    until: tokio::time::Instant,
) -> tokio::task::JoinHandle<Received> {
    let ch = conn.create_channel().await.expect("channel");
    ch.basic_qos(window as u16, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    tokio::spawn(async move {
        let _ch = ch;
        let mut got = Received {
            latencies: Vec::with_capacity(expected),
            last: Instant::now(),
        };
        while got.latencies.len() < expected {
            let deadline = until.min(tokio::time::Instant::now() + IDLE_TIMEOUT);
            let Ok(Some(Ok(delivery))) = tokio::time::timeout_at(deadline, consumer.next()).await
            else {
                break;
            };
            if let Some(l) = latency(&delivery.data, origin) {
                got.latencies.push(l);
            }
            got.last = Instant::now();
            if delivery
                .acker
                .ack(BasicAckOptions::default())
                .await
                .is_err()
            {
                break;
            }
        }
        got
    })
}

/// Declares the row's topology on `server` and runs it once: consumers first, then the
/// producers. Returns the consumers' results and when the producers began.
/// `cpu`: the server's and the bench's CPU seconds when the producers began (the topology's
/// set-up, 1,000 queues in the fan-out row, is not the messages' cost).
async fn run_once(
    server: &Server,
    shape: Shape,
    tag: &str,
    cpu: &mut (f64, f64),
) -> (Vec<Received>, Instant) {
    let server_cpu = &server.cpu;
    let server = server.amqp;
    let origin = Instant::now();
    let until = tokio::time::Instant::now() + RUN_DEADLINE;
    let setup = connect(server).await;
    let ch = setup.create_channel().await.expect("channel");
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let exchange = if shape.fanout {
        let name = format!("bench-x-{tag}");
        ch.exchange_declare(
            name.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("exchange.declare");
        name
    } else {
        String::new()
    };
    let queues = if shape.fanout {
        FANOUT_QUEUES
    } else {
        shape.pairs
    };
    let total = shape.pairs * shape.per_producer;
    let mut names = Vec::with_capacity(queues);
    for i in 0..queues {
        let q = format!("bench-q-{tag}-{i}");
        ch.queue_declare(q.as_str().into(), durable, FieldTable::default())
            .await
            .expect("queue.declare");
        if shape.fanout {
            ch.queue_bind(
                q.as_str().into(),
                exchange.as_str().into(),
                format!("dev.{i}").as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("queue.bind");
        }
        names.push(q);
    }
    // Consumers: one connection each, or the fan-out row's few shared ones.
    let conns = if shape.fanout {
        FANOUT_CONNECTIONS
    } else {
        queues
    };
    let mut consumer_conns = Vec::with_capacity(conns);
    for _ in 0..conns {
        consumer_conns.push(connect(server).await);
    }
    let mut consumers = Vec::with_capacity(queues);
    for (i, q) in names.iter().enumerate() {
        let expected = if shape.fanout {
            total / FANOUT_QUEUES + usize::from(i < total % FANOUT_QUEUES)
        } else {
            shape.per_producer
        };
        let conn = &consumer_conns[i % conns];
        consumers.push(consume(conn, q.clone(), expected, shape.window, origin, until).await);
    }
    let mut producer_conns = Vec::with_capacity(shape.pairs);
    for _ in 0..shape.pairs {
        producer_conns.push(connect(server).await);
    }
    *cpu = (server_cpu.seconds(), cpu_seconds(std::process::id()));
    let start = Instant::now();
    let mut producers = Vec::with_capacity(shape.pairs);
    for (p, conn) in producer_conns.into_iter().enumerate() {
        let exchange = exchange.clone();
        // Producer `p` → queue `p` through the default exchange; fan-out: by key.
        let key = names.get(p).filter(|_| !shape.fanout).cloned();
        producers.push(tokio::spawn(async move {
            let ch = conn.create_channel().await.expect("channel");
            ch.confirm_select(ConfirmSelectOptions::default())
                .await
                .expect("confirm.select");
            let props = BasicProperties::default().with_delivery_mode(2);
            let mut payload = vec![0x5a_u8; shape.payload];
            let mut in_flight = VecDeque::with_capacity(shape.window);
            for n in 0..shape.per_producer {
                if in_flight.len() >= shape.window {
                    let confirm: lapin::PublisherConfirm =
                        in_flight.pop_front().expect("in flight");
                    if confirm.await.is_err() {
                        return;
                    }
                }
                stamp(&mut payload, origin);
                let routing = match &key {
                    Some(q) => q.clone(),
                    None => format!("dev.{}", (n * shape.pairs + p) % FANOUT_QUEUES),
                };
                match ch
                    .basic_publish(
                        exchange.as_str().into(),
                        routing.as_str().into(),
                        BasicPublishOptions::default(),
                        &payload,
                        props.clone(),
                    )
                    .await
                {
                    Ok(confirm) => in_flight.push_back(confirm),
                    Err(_) => return,
                }
            }
            for confirm in in_flight {
                if confirm.await.is_err() {
                    return;
                }
            }
            drop(conn);
        }));
    }
    for p in producers {
        let _ = tokio::time::timeout_at(until, p).await;
    }
    let mut results = Vec::with_capacity(consumers.len());
    for c in consumers {
        match tokio::time::timeout_at(until + IDLE_TIMEOUT, c).await {
            Ok(Ok(r)) => results.push(r),
            _ => println!("  (a consumer did not finish in time)"),
        }
    }
    (results, start)
}

/// `basic.get`s of the polling row.
const POLLS: usize = 500;

/// A connection to `server` and a channel on which the queue `q` is declared.
async fn declared(server: &Server, q: &str) -> (Connection, lapin::Channel) {
    let conn = connect(server.amqp).await;
    let ch = conn.create_channel().await.expect("channel");
    ch.queue_declare(
        q.into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("queue.declare");
    (conn, ch)
}

/// One client's `basic.get`s on a queue that stays empty, one at a time: gets per second.
async fn poll_empty(server: &Server) -> f64 {
    let q = "bench-get-empty";
    let (_conn, ch) = declared(server, q).await;
    let get = || async {
        let got = ch
            .basic_get(q.into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic.get");
        assert!(got.is_none(), "the queue stays empty");
    };
    // The first get of a queue on a channel opens the server's reader of it.
    get().await;
    let start = Instant::now();
    for _ in 0..POLLS {
        get().await;
    }
    POLLS as f64 / start.elapsed().as_secs_f64()
}

/// One client's `basic.get`s of [`POLLS`] messages, each acknowledged before the next get,
/// until `get-ok` says none is left: gets per second.
async fn poll_drain(server: &Server) -> f64 {
    let q = "bench-get-drain";
    let (_conn, ch) = declared(server, q).await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm.select");
    let props = BasicProperties::default().with_delivery_mode(2);
    let mut confirms = Vec::with_capacity(POLLS);
    for _ in 0..POLLS {
        let confirm = ch
            .basic_publish(
                "".into(),
                q.into(),
                BasicPublishOptions::default(),
                &[0x5a_u8; 64],
                props.clone(),
            )
            .await
            .expect("basic.publish");
        confirms.push(confirm);
    }
    for confirm in confirms {
        confirm.await.expect("confirm");
    }
    let start = Instant::now();
    let mut got = 0;
    loop {
        let Some(m) = ch
            .basic_get(q.into(), BasicGetOptions { no_ack: false })
            .await
            .expect("basic.get")
        else {
            panic!("get-empty after {got} of {POLLS} messages");
        };
        m.delivery
            .ack(BasicAckOptions::default())
            .await
            .expect("basic.ack");
        got += 1;
        if m.message_count == 0 {
            break;
        }
    }
    assert_eq!(got, POLLS, "get-ok said none was left");
    got as f64 / start.elapsed().as_secs_f64()
}

fn run(rt: &tokio::runtime::Runtime, server: &Server, shape: Shape, tag: &str) -> Figures {
    let mut before = (0.0, 0.0);
    let (results, start) = rt.block_on(run_once(server, shape, tag, &mut before));
    let cpu = (
        server.cpu.seconds() - before.0,
        cpu_seconds(std::process::id()) - before.1,
    );
    figures(results, start, shape.pairs * shape.per_producer, cpu)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("amqp: bench");
        return;
    }
    let n = env_usize("BENCH_MESSAGES", 20_000).max(1);
    let window = env_usize("BENCH_WINDOW", 100).clamp(1, 65535);
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let wanted = |tag: &str| only.is_empty() || only.split(',').any(|o| o.trim() == tag);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let gw_dir = tempfile::tempdir().expect("tempdir");
    let rabbit_dir = tempfile::tempdir().expect("tempdir");
    let gateway = start_gateway(gw_dir.path());
    let rabbit = start_rabbitmq(rabbit_dir.path());
    let servers: Vec<&Server> = std::iter::once(&gateway).chain(rabbit.as_ref()).collect();
    println!(
        "AMQP 0-9-1: Magnetar ({}) beside RabbitMQ ({}); {n} persistent messages per run, \
         publisher confirms and manual acks, window {window}\n",
        gateway.amqp,
        rabbit
            .as_ref()
            .map_or("not run".to_string(), |r| r.amqp.to_string()),
    );
    for s in &servers {
        let warm = Shape {
            pairs: 1,
            payload: 64,
            per_producer: WARM_UP,
            window,
            fanout: false,
        };
        let f = run(&rt, s, warm, "warm");
        if f.received < f.expected {
            println!(
                "({} warm-up: {}/{} received)",
                s.name, f.received, f.expected
            );
        }
    }
    println!(
        "| row | payload | Magnetar msgs/s | Magnetar p99 | Magnetar CPU µs/msg server (client) \
         | RabbitMQ msgs/s | RabbitMQ p99 | RabbitMQ CPU µs/msg server (client) \
         | Magnetar / RabbitMQ msgs/s | p99 | CPU/msg |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let mut rows: Vec<(String, Shape)> = Vec::new();
    for pairs in [1, 4] {
        for payload in [64, 1024] {
            rows.push((
                format!("{pairs}/{payload}"),
                Shape {
                    pairs,
                    payload,
                    per_producer: (n / pairs).max(1),
                    window,
                    fanout: false,
                },
            ));
        }
    }
    rows.push((
        "fanout".into(),
        Shape {
            pairs: 1,
            payload: 64,
            per_producer: n,
            window,
            fanout: true,
        },
    ));
    for (row, (tag, shape)) in rows.into_iter().enumerate() {
        if !wanted(&tag) {
            continue;
        }
        let mut order: Vec<&Server> = servers.clone();
        if row % 2 == 1 {
            order.reverse();
        }
        let mut ours = None;
        let mut theirs = None;
        for s in order {
            let f = run(&rt, s, shape, &format!("r{row}"));
            if s.name == "magnetar" {
                ours = Some(f);
            } else {
                theirs = Some(f);
            }
        }
        let label = if shape.fanout {
            format!("1 → topic exchange → {FANOUT_QUEUES} queues")
        } else {
            format!("{0}→{0}", shape.pairs)
        };
        println!(
            "| {label} | {} B |{}{} {} | {} | {} |",
            shape.payload,
            cell(ours.as_ref()),
            cell(theirs.as_ref()),
            ratio(
                ours.as_ref().map(|f| f.rate),
                theirs.as_ref().map(|f| f.rate)
            ),
            ratio(
                ours.as_ref().map(|f| f.p99.as_secs_f64()),
                theirs.as_ref().map(|f| f.p99.as_secs_f64())
            ),
            ratio(
                ours.as_ref().map(|f| f.cpu_per_msg_us),
                theirs.as_ref().map(|f| f.cpu_per_msg_us)
            ),
        );
    }
    if wanted("get") {
        println!(
            "\n| polling row | Magnetar gets/s | RabbitMQ gets/s | Magnetar / RabbitMQ |\n|---|---|---|---|"
        );
        for drain in [false, true] {
            let rates: Vec<(&str, f64)> = servers
                .iter()
                .map(|s| {
                    let rate = match drain {
                        false => rt.block_on(poll_empty(s)),
                        true => rt.block_on(poll_drain(s)),
                    };
                    (s.name, rate)
                })
                .collect();
            let of = |name: &str| rates.iter().find(|(n, _)| *n == name).map(|(_, r)| *r);
            let what = match drain {
                false => "basic.get on an empty queue",
                true => "basic.get + ack of a queue's messages (64 B), until none is left",
            };
            println!(
                "| {POLLS} {what}, one client | {} | {} | {} |",
                of("magnetar").map_or("–".into(), |r| format!("{r:.0}")),
                of("rabbitmq").map_or("–".into(), |r| format!("{r:.0}")),
                ratio(of("magnetar"), of("rabbitmq")),
            );
        }
    }
}
