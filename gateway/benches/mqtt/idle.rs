//! Memory per idle TLS MQTT connection: open N connections (TLS handshake, CONNECT, CONNACK),
//! leave them idle, and read the server's resident set size before and after.
//!
//! Above ~25,000 connections the client sockets are bound to several loopback source
//! addresses (127.0.0.1, 127.0.0.2, ...) to get past the ephemeral port range. Each side
//! needs one file descriptor per connection: the bench raises its soft `RLIMIT_NOFILE` to the
//! hard limit (the servers it starts inherit it) and caps N below that limit, saying so.
//! `BENCH_IDLE_HOLD=<seconds>` keeps the connections open that long after measuring.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpSocket;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// Connections per loopback source address.
const PER_SOURCE: usize = 25_000;
/// TLS handshakes in flight at once.
const CONCURRENCY: usize = 64;

/// A self-signed certificate for `localhost`, as PEM files in `dir`: (cert, key).
pub fn certificate(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, Vec<u8>) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
    let (cert, key) = (dir.join("bench-cert.pem"), dir.join("bench-key.pem"));
    let pem = ck.cert.pem();
    std::fs::write(&cert, &pem).expect("write cert");
    std::fs::write(&key, ck.key_pair.serialize_pem()).expect("write key");
    (cert, key, ck.cert.der().to_vec())
}

/// Resident set size of a process, in bytes.
pub fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// Raises the soft file-descriptor limit to the hard one (the servers the bench starts
/// inherit it); returns the limit now in force.
pub fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed by reference.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
    lim.rlim_cur
}

async fn open_one(
    server: SocketAddr,
    source: Ipv4Addr,
    connector: TlsConnector,
    id: String,
) -> std::io::Result<TlsStream<tokio::net::TcpStream>> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(IpAddr::V4(source), 0))?;
    let tcp = socket.connect(server).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let mut tls = connector.connect(name, tcp).await?;
    crate::client::handshake(&mut tls, &crate::client::connect_packet(&id, true, 0, None))
        .await
        .map_err(std::io::Error::other)?;
    Ok(tls)
}

/// What one measurement found.
pub struct IdleFigures {
    pub connections: usize,
    pub rss_before: u64,
    pub rss_after: u64,
    pub seconds: f64,
}

impl IdleFigures {
    pub fn per_connection(&self) -> f64 {
        self.rss_after.saturating_sub(self.rss_before) as f64 / self.connections.max(1) as f64
    }
}

/// A TLS client that trusts the certificate `ca_der` (the bench's self-signed one).
pub fn connector(ca_der: &[u8]) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_der.to_vec().into()).expect("root");
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

/// Opens `n` idle TLS MQTT connections to `server` (process `pid`), measures, closes them.
pub async fn measure(
    server: SocketAddr,
    pid: u32,
    n: usize,
    ca_der: &[u8],
    tag: &str,
) -> IdleFigures {
    let connector = connector(ca_der);
    // One connection first, so that lazily built state (instances, caches) is in the baseline.
    let warm = open_one(
        server,
        Ipv4Addr::LOCALHOST,
        connector.clone(),
        format!("{tag}-warm"),
    )
    .await
    .expect("first idle connection");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = rss(pid);
    let start = Instant::now();
    let semaphore = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let permit = semaphore.clone().acquire_owned().await.expect("semaphore");
        let source = Ipv4Addr::new(127, 0, 0, 1 + (i / PER_SOURCE) as u8);
        let connector = connector.clone();
        let id = format!("{tag}-{i}");
        tasks.push(tokio::spawn(async move {
            let r = tokio::time::timeout(
                Duration::from_secs(30),
                open_one(server, source, connector, id),
            )
            .await;
            drop(permit);
            r
        }));
    }
    let mut streams = Vec::with_capacity(n);
    let mut failed = 0;
    for t in tasks {
        match t.await {
            Ok(Ok(Ok(s))) => streams.push(s),
            _ => failed += 1,
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    if failed > 0 {
        println!("  ({tag}: {failed} of {n} connections failed)");
    }
    // Let the server settle (handshake buffers freed, tasks parked).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = rss(pid);
    let connections = streams.len();
    // For a closer look (e.g. /proc/PID/smaps) while the connections are open.
    if let Some(secs) = std::env::var("BENCH_IDLE_HOLD")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        println!("  ({tag}: pid {pid} holds {connections} idle connections for {secs} s)");
        tokio::time::sleep(Duration::from_secs(secs)).await;
    }
    drop(streams);
    drop(warm);
    IdleFigures {
        connections,
        rss_before,
        rss_after,
        seconds,
    }
}
