//! The WebSocket side of a run: Pulsar WebSocket API producers and consumers on the web port,
//! as a Pulsar WebSocket application drives them (docs/pulsar-websocket-api.md §5-§6).
//!
//! A producer keeps at most `window` sends unacknowledged: it writes frames until the window
//! is full, then takes every ack already in before writing again, so the socket sees
//! batches of frames when acks come in batches. A consumer acks every message and flushes
//! its acks once per burst of messages read. Consumers are subscribed (their upgrade
//! answered 101) before any producer sends.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::time::Instant;

use base64::Engine;
use futures::{FutureExt, SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::{join_by, latency, stamp, Received, Shape, IDLE_TIMEOUT, RUN_DEADLINE};

type Ws = WebSocketStream<TcpStream>;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// A message frame from the consumer endpoint: only what the bench reads.
#[derive(serde::Deserialize)]
struct Delivery<'a> {
    #[serde(rename = "messageId", borrow)]
    message_id: Cow<'a, str>,
    #[serde(borrow)]
    payload: Cow<'a, str>,
}

/// A producer ack: `result` is `ok` or `send-error:<code>`.
#[derive(serde::Deserialize)]
struct Ack<'a> {
    #[serde(borrow)]
    result: Cow<'a, str>,
}

/// Opens `ws://addr/ws/v2/<path>` (bounded by [`IDLE_TIMEOUT`]).
async fn open(addr: SocketAddr, path: &str) -> Ws {
    let url = format!("ws://{addr}/ws/v2/{path}");
    let connect = async {
        let tcp = TcpStream::connect(addr)
            .await
            .expect("connecting to the web port");
        let _ = tcp.set_nodelay(true);
        tokio_tungstenite::client_async(url.as_str(), tcp).await
    };
    match tokio::time::timeout(IDLE_TIMEOUT, connect).await {
        Ok(Ok((ws, _))) => ws,
        Ok(Err(e)) => panic!("upgrade of {url}: {e}"),
        Err(_) => panic!("upgrade of {url}: no answer in {IDLE_TIMEOUT:?}"),
    }
}

/// One run: consumers subscribed first, then producers; returns what each consumer saw and
/// when the producers started.
pub async fn run(web: SocketAddr, shape: Shape, tag: &str) -> (Vec<Received>, Instant) {
    let origin = Instant::now();
    let deadline = tokio::time::Instant::from_std(origin + RUN_DEADLINE);
    let topic = |i: usize| {
        format!(
            "persistent/public/default/ws-{tag}-{i}-{}",
            std::process::id()
        )
    };
    let mut consumers = Vec::new();
    for i in 0..shape.pairs {
        let ws = open(
            web,
            &format!("consumer/{}/bench?receiverQueueSize=1000", topic(i)),
        )
        .await;
        consumers.push(tokio::spawn(consume(
            ws,
            shape.per_producer,
            origin,
            deadline,
        )));
    }
    let mut producers = Vec::new();
    for i in 0..shape.pairs {
        producers.push(open(web, &format!("producer/{}", topic(i))).await);
    }
    let start = Instant::now();
    let producers: Vec<_> = producers
        .into_iter()
        .map(|ws| tokio::spawn(produce(ws, shape, origin, deadline)))
        .collect();
    let until = deadline + IDLE_TIMEOUT;
    for p in producers {
        if let Some((ws, errors)) = join_by(p, until).await {
            if errors > 0 {
                println!("  ({errors} send-error acks)");
            }
            drop(ws);
        }
    }
    let mut results = Vec::new();
    for c in consumers {
        results.extend(join_by(c, until).await);
    }
    (results, start)
}

/// Sends `shape.per_producer` messages with at most `shape.window` unacknowledged; returns
/// the socket (closed by the caller after the consumers are done) and the `send-error` acks.
async fn produce(
    mut ws: Ws,
    shape: Shape,
    origin: Instant,
    deadline: tokio::time::Instant,
) -> (Ws, usize) {
    let mut payload = vec![0x5a_u8; shape.payload];
    let (mut sent, mut acked, mut errors) = (0, 0, 0);
    while acked < shape.per_producer && tokio::time::Instant::now() < deadline {
        if sent < shape.per_producer && sent - acked < shape.window {
            while sent < shape.per_producer && sent - acked < shape.window {
                stamp(&mut payload, origin);
                let frame = format!(
                    "{{\"payload\":\"{}\",\"context\":\"{sent}\"}}",
                    B64.encode(&payload)
                );
                if ws.feed(Message::text(frame)).await.is_err() {
                    return (ws, errors);
                }
                sent += 1;
            }
            if ws.flush().await.is_err() {
                return (ws, errors);
            }
        }
        // Wait for one ack, then take the others already in.
        let mut next = match tokio::time::timeout(IDLE_TIMEOUT, ws.next()).await {
            Ok(Some(Ok(m))) => Some(m),
            _ => return (ws, errors),
        };
        while let Some(m) = next {
            if let Message::Text(text) = m {
                match serde_json::from_str::<Ack>(text.as_str()) {
                    Ok(a) if a.result == "ok" => acked += 1,
                    _ => {
                        acked += 1;
                        errors += 1;
                    }
                }
            }
            next = match ws.next().now_or_never() {
                Some(Some(Ok(m))) => Some(m),
                _ => None,
            };
        }
    }
    (ws, errors)
}

/// Receives `expected` messages (or until the deadline or [`IDLE_TIMEOUT`] of silence),
/// acking each.
async fn consume(
    mut ws: Ws,
    expected: usize,
    origin: Instant,
    deadline: tokio::time::Instant,
) -> Received {
    let mut latencies = Vec::with_capacity(expected);
    let mut last = Instant::now();
    'run: while latencies.len() < expected {
        let first = match tokio::time::timeout_at(
            deadline.min(tokio::time::Instant::now() + IDLE_TIMEOUT),
            ws.next(),
        )
        .await
        {
            Ok(Some(Ok(m))) => m,
            _ => break,
        };
        let mut next = Some(first);
        while let Some(m) = next {
            if let Message::Text(text) = m {
                let Ok(d) = serde_json::from_str::<Delivery>(text.as_str()) else {
                    println!("  (consumer: not a message frame: {})", text.as_str());
                    break 'run;
                };
                let payload = B64.decode(d.payload.as_bytes()).unwrap_or_default();
                if let Some(l) = latency(&payload, origin) {
                    last = Instant::now();
                    latencies.push(l);
                }
                let ack = format!("{{\"messageId\":\"{}\"}}", d.message_id);
                if ws.feed(Message::text(ack)).await.is_err() {
                    break 'run;
                }
            }
            next = match ws.next().now_or_never() {
                Some(Some(Ok(m))) => Some(m),
                _ => None,
            };
        }
        if ws.flush().await.is_err() {
            break;
        }
    }
    let _ = tokio::time::timeout(IDLE_TIMEOUT, ws.close(None)).await;
    Received { latencies, last }
}
