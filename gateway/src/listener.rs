//! Listening sockets: accept, TLS handshake, and hand-off to a plugin worker.
//!
//! Each listener serves one plugin. A connection gets a process-wide id and a worker of its
//! plugin (round-robin); the TLS handshake runs in the connection's own task with a deadline,
//! so a client that stalls mid-handshake holds nothing but its socket.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::abi::types::ConnInfo;
use crate::conn_shared::ConnShared;
use crate::connection;
use crate::host::Event;
use crate::plugin_host::{PluginPool, WorkerHandle};
use crate::websocket::WebSocketOptions;

/// Time a client has to finish the TLS handshake.
const TLS_HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

/// A bound listener, ready to serve.
pub struct Listener {
    pub name: String,
    tcp: TcpListener,
    tls: Option<TlsAcceptor>,
    pool: Arc<PluginPool>,
    /// Set: connections speak WebSocket, upgraded before the plugin sees them.
    websocket: Option<Arc<WebSocketOptions>>,
}

impl Listener {
    pub async fn bind(
        name: &str,
        addr: SocketAddr,
        tls: Option<Arc<rustls::ServerConfig>>,
        pool: Arc<PluginPool>,
    ) -> anyhow::Result<Listener> {
        let tcp = TcpListener::bind(addr)
            .await
            .with_context(|| format!("listener {name}: binding {addr}"))?;
        Ok(Listener {
            name: name.to_string(),
            tcp,
            tls: tls.map(TlsAcceptor::from),
            pool,
            websocket: None,
        })
    }

    /// Serves the listener's connections over WebSocket (see [`crate::websocket`]).
    pub fn with_websocket(mut self, options: Option<WebSocketOptions>) -> Listener {
        self.websocket = options.map(Arc::new);
        self
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// Accepts connections until the task is dropped.
    pub async fn serve(self) {
        let name: Arc<str> = Arc::from(self.name.as_str());
        loop {
            let (stream, peer) = match self.tcp.accept().await {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(listener = %name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let tls = self.tls.clone();
            let ws = self.websocket.clone();
            // Picked here, in accept order, so connections spread evenly over the workers.
            let worker = self.pool.pick();
            let name = name.clone();
            tokio::spawn(async move {
                if let Err(e) = accept(stream, peer, name.clone(), tls, ws, worker).await {
                    tracing::info!(listener = %name, %peer, error = format!("{e:#}"), "connection refused");
                }
            });
        }
    }
}

async fn accept(
    stream: TcpStream,
    peer: SocketAddr,
    listener: Arc<str>,
    tls: Option<TlsAcceptor>,
    ws: Option<Arc<WebSocketOptions>>,
    worker: WorkerHandle,
) -> anyhow::Result<()> {
    let conn = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
    let shared = Arc::new(ConnShared::default());
    let mut info = ConnInfo {
        listener: listener.to_string(),
        peer_addr: peer.to_string(),
        tls: tls.is_some(),
        sni: None,
    };
    match tls {
        Some(acceptor) => {
            let stream = tokio::time::timeout(TLS_HANDSHAKE_DEADLINE, acceptor.accept(stream))
                .await
                .context("TLS handshake timed out")?
                .context("TLS handshake failed")?;
            info.sni = stream.get_ref().1.server_name().map(str::to_string);
            let client_cert = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|certs| certs.first())
                .and_then(crate::tls::client_common_name);
            upgrade(stream, ws, conn, info, client_cert, shared, worker).await
        }
        None => upgrade(stream, ws, conn, info, None, shared, worker).await,
    }
}

/// Runs the WebSocket handshake first on a WebSocket listener, then starts the connection.
async fn upgrade<S>(
    stream: S,
    ws: Option<Arc<WebSocketOptions>>,
    conn: u64,
    info: ConnInfo,
    client_cert: Option<String>,
    shared: Arc<ConnShared>,
    worker: WorkerHandle,
) -> anyhow::Result<()>
where
    S: connection::Transport,
{
    match ws {
        Some(options) => {
            let stream = crate::websocket::accept(stream, &options).await?;
            start(stream, conn, info, client_cert, shared, worker).await
        }
        None => start(stream, conn, info, client_cert, shared, worker).await,
    }
}

async fn start<S>(
    stream: S,
    conn: u64,
    info: ConnInfo,
    client_cert: Option<String>,
    shared: Arc<ConnShared>,
    worker: WorkerHandle,
) -> anyhow::Result<()>
where
    S: connection::Transport,
{
    tracing::debug!(conn, peer = %info.peer_addr, listener = %info.listener, "connection opened");
    worker
        .send(Event::Open {
            conn,
            info,
            client_cert,
            shared: shared.clone(),
        })
        .await?;
    // A task of its own: what the accept and the handshake needed is freed now, not kept for
    // the connection's lifetime inside one larger future.
    tokio::spawn(connection::run(stream, conn, shared, worker));
    Ok(())
}
