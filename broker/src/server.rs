//! Starting and stopping the broker: the listener, the accept loop and graceful shutdown.
//!
//! [`Broker::start`] binds, opens the data directory and spawns the accept loop on the
//! current tokio runtime. [`BrokerHandle::shutdown`] stops accepting, closes every
//! connection, then has every topic commit its pending messages and cursors before
//! returning, so a clean stop loses nothing and releases all files.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::BrokerAuth;
use crate::connection::{self, Shared};
use crate::registry::Registry;
use crate::topic::{Retention, TopicSettings};

/// Where the broker listens, keeps its data, and whom it lets in.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Token authentication and authorization; `None` lets every client do anything.
    pub auth: Option<BrokerAuth>,
    /// Sequence-id de-duplication per producer name (Pulsar's `brokerDeduplicationEnabled`,
    /// off by default as in Pulsar: a client that restarts a named producer at sequence id 0
    /// without reading `last_sequence_id` would otherwise see its messages dropped).
    pub deduplication: bool,
    /// Where the admin REST API listens (Pulsar's web port is 8080); `None`: no admin API.
    pub admin_listen: Option<SocketAddr>,
    /// How much acknowledged data topics keep (default: everything).
    pub retention: Retention,
    /// Size at which a topic's log starts a new segment (retention deletes whole segments).
    pub segment_bytes: u64,
    /// How long a Failover consumer that takes over from one still attached waits before
    /// messages go to it, so that the previous one can acknowledge what it holds (Pulsar's
    /// `activeConsumerFailoverDelayTimeMillis`, 1 s by default).
    pub failover_delay: Duration,
}

impl BrokerConfig {
    /// A broker on `listen` with data in `data_dir`, no authentication, no de-duplication.
    pub fn new(listen: SocketAddr, data_dir: PathBuf) -> BrokerConfig {
        BrokerConfig {
            listen,
            data_dir,
            auth: None,
            deduplication: false,
            admin_listen: None,
            retention: Retention::default(),
            segment_bytes: crate::log::SEGMENT_BYTES,
            failover_delay: Duration::from_secs(1),
        }
    }
}

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot serve the admin API on {addr}: {source}")]
    Admin {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot open data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The embedded broker.
pub struct Broker;

/// Reads the bytes each tenant's topics store; cheap to clone.
#[derive(Clone)]
pub struct StorageProbe(Arc<Registry>);

impl StorageProbe {
    /// Bytes stored by every topic of `tenant`.
    pub async fn tenant_storage_bytes(&self, tenant: &str) -> u64 {
        self.0.tenant_storage_bytes(tenant).await
    }
}

/// A running broker.
pub struct BrokerHandle {
    local_addr: SocketAddr,
    service_url: String,
    shutdown: CancellationToken,
    connections: TaskTracker,
    accept: tokio::task::JoinHandle<()>,
    admin: Option<(SocketAddr, tokio::task::JoinHandle<()>)>,
    registry: Arc<Registry>,
    in_process: InProcess,
    auth: Option<BrokerAuth>,
}

/// Opens connections to a running broker inside its process: a client speaks the Pulsar
/// protocol on such a stream exactly as on a TCP connection, without the kernel in between
/// (the gateway's own client uses it for the embedded broker). Each is served, and closed at
/// shutdown, like an accepted connection.
#[derive(Clone)]
pub struct InProcess {
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    connections: TaskTracker,
    next_id: Arc<AtomicU64>,
}

impl InProcess {
    /// A new connection; the broker serves the other end of the pipe.
    pub fn connect(&self) -> tokio::io::DuplexStream {
        let (client, server) = tokio::io::duplex(IN_PROCESS_BUFFER);
        let (rd, wr) = tokio::io::split(server);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.connections.spawn(connection::serve_stream(
            rd,
            wr,
            None,
            id,
            self.shared.clone(),
            self.shutdown.clone(),
        ));
        client
    }
}

/// A `pulsar` crate client built with this connector reaches the broker in-process.
impl pulsar::Connector for InProcess {
    fn connect(&self, _url: &url::Url) -> std::io::Result<Box<dyn pulsar::ConnectorStream>> {
        Ok(Box::new(InProcess::connect(self)))
    }
}

/// Bytes an in-process connection buffers each way before its writer waits for the reader
/// (what a loopback socket's buffers do for TCP clients).
const IN_PROCESS_BUFFER: usize = 1024 * 1024;

impl Broker {
    /// Binds the listener, opens/recovers storage, spawns the accept loop on the current
    /// tokio runtime.
    pub async fn start(config: BrokerConfig) -> Result<BrokerHandle, BrokerError> {
        let registry = Registry::new(
            &config.data_dir,
            TopicSettings {
                deduplication: config.deduplication,
                segment_bytes: config.segment_bytes,
                retention: config.retention,
                failover_delay_ms: u64::try_from(config.failover_delay.as_millis())
                    .unwrap_or(u64::MAX),
            },
        )
        .map_err(|source| BrokerError::DataDir {
            path: config.data_dir.clone(),
            source,
        })?;
        let listener = bind(config.listen)
            .await
            .map_err(|source| BrokerError::Bind {
                addr: config.listen,
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| BrokerError::Bind {
            addr: config.listen,
            source,
        })?;
        let advertised = if local_addr.ip().is_unspecified() {
            SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), local_addr.port())
        } else {
            local_addr
        };
        let service_url = format!("pulsar://{advertised}");
        let registry = Arc::new(registry);
        let shared = Arc::new(Shared {
            registry: registry.clone(),
            service_url: service_url.clone(),
            auth: config.auth.clone(),
            name_prefix: producer_name_prefix(),
        });
        let shutdown = CancellationToken::new();
        let admin = match config.admin_listen {
            Some(addr) => Some(
                crate::admin::serve(
                    addr,
                    registry.clone(),
                    config.auth.clone(),
                    shutdown.clone(),
                )
                .await
                .map_err(|source| BrokerError::Admin { addr, source })?,
            ),
            None => None,
        };
        let connections = TaskTracker::new();
        let in_process = InProcess {
            shared: shared.clone(),
            shutdown: shutdown.clone(),
            connections: connections.clone(),
            next_id: Arc::new(AtomicU64::new(1)),
        };
        let accept = tokio::spawn(accept_loop(
            listener,
            shared,
            shutdown.clone(),
            connections.clone(),
            in_process.next_id.clone(),
        ));
        tracing::info!(%local_addr, data_dir = %config.data_dir.display(), "broker started");
        Ok(BrokerHandle {
            local_addr,
            service_url,
            shutdown,
            connections,
            accept,
            admin,
            registry,
            in_process,
            auth: config.auth.clone(),
        })
    }
}

/// How long [`bind`] keeps retrying a port that is in use.
const BIND_RETRY: Duration = Duration::from_secs(5);

/// Binds the listener (`SO_REUSEADDR` is set by tokio, so connections of a killed
/// predecessor in `TIME_WAIT` do not block us). A fixed port that is still in use is retried
/// for [`BIND_RETRY`]: right after a restart it can briefly be held by a socket that is
/// not ours to wait for, e.g. a client that reconnected while nothing listened and whose
/// ephemeral port happened to be this one (a TCP self-connection).
pub(crate) async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let deadline = tokio::time::Instant::now() + BIND_RETRY;
    loop {
        match TcpListener::bind(addr).await {
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && addr.port() != 0
                    && tokio::time::Instant::now() < deadline =>
            {
                tracing::warn!(%addr, "address in use; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            result => return result,
        }
    }
}

/// Prefix of the producer names the broker makes up: unique per broker start, so that a
/// made-up name never meets de-duplication state persisted by an earlier run.
fn producer_name_prefix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("magnetar-{nanos:x}")
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    connections: TaskTracker,
    next_id: Arc<AtomicU64>,
) {
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((socket, _)) => {
                let id = next_id.fetch_add(1, Ordering::Relaxed);
                connections.spawn(connection::serve(
                    socket,
                    id,
                    shared.clone(),
                    shutdown.clone(),
                ));
            }
            Err(e) => {
                // E.g. out of file descriptors: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

impl BrokerHandle {
    /// The address the broker listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The admin REST API as a router, to serve in-process on another listener (the
    /// gateway's web port); it checks tokens as the broker's own port does.
    pub fn admin_router(&self) -> axum::Router {
        crate::admin::router_for(self.registry.clone(), self.auth.clone())
    }

    /// The address of the admin REST API, if it runs.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|(addr, _)| *addr)
    }

    /// A handle that reads how many bytes each tenant stores (for storage quotas).
    pub fn storage_probe(&self) -> StorageProbe {
        StorageProbe(self.registry.clone())
    }

    /// Opens connections to this broker inside the process (see [`InProcess`]).
    pub fn in_process(&self) -> InProcess {
        self.in_process.clone()
    }

    /// `pulsar://host:port` for clients.
    pub fn service_url(&self) -> String {
        self.service_url.clone()
    }

    /// Stops accepting, closes connections, and flushes storage.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        let _ = self.accept.await;
        if let Some((_, task)) = self.admin {
            let _ = task.await;
        }
        self.connections.close();
        self.connections.wait().await;
        self.registry.shutdown().await;
        tracing::info!(local_addr = %self.local_addr, "broker stopped");
    }
}
