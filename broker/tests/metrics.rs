//! `GET /metrics` on the admin port: the fsync and receipt histograms in the Prometheus text
//! format, counting the sends a `pulsar` crate producer makes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use magnetar_broker::{Broker, BrokerConfig};
use pulsar::{Pulsar, TokioExecutor};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TIMEOUT: Duration = Duration::from_secs(10);
const TOPIC: &str = "persistent://public/default/metrics";
const SENDS: u32 = 20;
const FSYNC: &str = "magnetar_broker_fsync_seconds";
const RECEIPT: &str = "magnetar_broker_receipt_seconds";

/// One histogram of a scrape.
#[derive(Debug)]
struct Histogram {
    /// `(le, cumulative count)` in the order served, `+Inf` last.
    buckets: Vec<(f64, f64)>,
    sum: f64,
    count: f64,
}

/// `GET /metrics`, checked to be a 200 in the Prometheus text format; returns the body.
async fn scrape(admin: SocketAddr) -> String {
    let mut s = TcpStream::connect(admin).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(TIMEOUT, s.read_to_end(&mut response))
        .await
        .expect("a response in time")
        .unwrap();
    let response = String::from_utf8(response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("headers end");
    let mut head = head.lines();
    let status = head.next().unwrap();
    assert_eq!(status.split_whitespace().nth(1), Some("200"), "{status}");
    let headers: Vec<String> = head.map(str::to_ascii_lowercase).collect();
    assert!(
        headers
            .iter()
            .any(|h| h.starts_with("content-type: text/plain; version=0.0.4")),
        "{headers:?}"
    );
    assert!(
        !headers.iter().any(|h| h.contains("chunked")),
        "{headers:?}"
    );
    body.to_string()
}

/// Parses the exposition format (every line a `# HELP`/`# TYPE` comment or `name{labels}
/// value`) and returns the histograms it declares, each checked to be well formed: buckets in
/// increasing `le`, cumulative counts never decreasing, `+Inf` last and equal to `_count`.
fn histograms(body: &str) -> HashMap<String, Histogram> {
    let mut declared = Vec::new();
    let mut samples: Vec<(String, Option<String>, f64)> = Vec::new();
    for line in body.lines() {
        if let Some(comment) = line.strip_prefix("# ") {
            let mut words = comment.splitn(3, ' ');
            let (kind, name, rest) = (words.next(), words.next(), words.next());
            match kind {
                Some("HELP") => assert!(rest.is_some_and(|h| !h.is_empty()), "{line}"),
                Some("TYPE") => {
                    assert_eq!(rest, Some("histogram"), "{line}");
                    declared.push(name.unwrap().to_string());
                }
                _ => panic!("unexpected comment {line:?}"),
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("name and value");
        let value: f64 = value.parse().expect("a number");
        let (name, le) = match series.split_once('{') {
            Some((name, labels)) => {
                let le = labels
                    .strip_prefix("le=\"")
                    .and_then(|l| l.strip_suffix("\"}"))
                    .expect("only an le label");
                (name, Some(le.to_string()))
            }
            None => (series, None),
        };
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "{line}"
        );
        samples.push((name.to_string(), le, value));
    }
    let mut found = HashMap::new();
    for name in declared {
        let of = |suffix: &str| {
            samples
                .iter()
                .filter(|(n, _, _)| *n == format!("{name}{suffix}"))
                .collect::<Vec<_>>()
        };
        let buckets: Vec<(f64, f64)> = of("_bucket")
            .into_iter()
            .map(|(_, le, v)| {
                let le = le.as_deref().expect("le");
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap()
                };
                (le, *v)
            })
            .collect();
        assert!(buckets.len() > 2, "{name} has buckets");
        assert!(
            buckets
                .windows(2)
                .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
            "{name}: {buckets:?}"
        );
        let (last_le, last_count) = *buckets.last().unwrap();
        let (sum, count) = match (of("_sum").as_slice(), of("_count").as_slice()) {
            ([(_, None, sum)], [(_, None, count)]) => (*sum, *count),
            other => panic!("{name}: one _sum and one _count, not {other:?}"),
        };
        assert_eq!((last_le, last_count), (f64::INFINITY, count), "{name}");
        assert!(sum >= 0.0 && sum.is_finite(), "{name}");
        found.insert(
            name,
            Histogram {
                buckets,
                sum,
                count,
            },
        );
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_every_fsync_and_receipt_of_a_producer() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = BrokerConfig::new("127.0.0.1:0".parse().unwrap(), dir.path().into());
    config.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    let broker = Broker::start(config).await.unwrap();
    let admin = broker.admin_addr().expect("admin API");

    let before = histograms(&scrape(admin).await);
    let pulsar: Pulsar<TokioExecutor> = Pulsar::builder(broker.service_url(), TokioExecutor)
        .build()
        .await
        .unwrap();
    let mut producer = pulsar.producer().with_topic(TOPIC).build().await.unwrap();
    // One at a time: each send is its own group commit, so its own fsync.
    for i in 0..SENDS {
        producer
            .send_non_blocking(format!("m{i}").into_bytes())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let after = histograms(&scrape(admin).await);

    for name in [FSYNC, RECEIPT] {
        let (b, a) = (&before[name], &after[name]);
        assert!(
            a.count >= b.count + f64::from(SENDS),
            "{name}: {b:?} then {a:?}"
        );
        assert!(a.sum > b.sum, "{name}: {b:?} then {a:?}");
        assert_eq!(a.buckets.len(), b.buckets.len(), "{name}: same buckets");
    }
    drop(producer);
    drop(pulsar);
    broker.shutdown().await;
}
