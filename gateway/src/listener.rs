//! Listening sockets: accept, TLS handshake, and hand-off to a plugin worker.
//!
//! Each listener serves one plugin. A connection gets a process-wide id and a worker of its
//! plugin (round-robin); the TLS handshake runs in the connection's own task with a deadline,
//! so a client that stalls mid-handshake holds nothing but its socket. A web port
//! ([`crate::web`]) may run without its plugin: it then serves only its HTTP paths.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::abi::types::ConnInfo;
use crate::conn_shared::ConnShared;
use crate::connection::{self, Opening};
use crate::plugin_host::{PluginPool, WorkerHandle};
use crate::web::{Routed, WebPort};
use crate::websocket::WebSocketOptions;

/// Time a client has to finish the TLS handshake.
const TLS_HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

/// A bound listener, ready to serve.
pub struct Listener {
    pub name: String,
    tcp: TcpListener,
    tls: Option<TlsAcceptor>,
    /// `None` only on a web port whose plugin is not loaded.
    pool: Option<Arc<PluginPool>>,
    /// Set: connections speak WebSocket, upgraded before the plugin sees them.
    websocket: Option<Arc<WebSocketOptions>>,
    /// Set: a web port (HTTP routing; WebSockets under `/ws/` in message mode).
    web: Option<Arc<WebPort>>,
}

impl Listener {
    pub async fn bind(
        name: &str,
        addr: SocketAddr,
        tls: Option<Arc<rustls::ServerConfig>>,
        pool: Option<Arc<PluginPool>>,
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
            web: None,
        })
    }

    /// Serves the listener as a web port (see [`crate::web`]).
    pub fn with_web(mut self, port: Option<WebPort>) -> Listener {
        self.web = port.map(Arc::new);
        self
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
            let transport = Transport {
                websocket: self.websocket.clone(),
                web: self.web.clone(),
            };
            // Picked here, in accept order, so connections spread evenly over the workers.
            let worker = self.pool.as_ref().map(|p| p.pick());
            let name = name.clone();
            tokio::spawn(async move {
                if let Err(e) = accept(stream, peer, name.clone(), tls, transport, worker).await {
                    tracing::info!(listener = %name, %peer, error = format!("{e:#}"), "connection refused");
                }
            });
        }
    }
}

/// What runs between the accept (and TLS) and the plugin.
struct Transport {
    websocket: Option<Arc<WebSocketOptions>>,
    web: Option<Arc<WebPort>>,
}

async fn accept(
    stream: TcpStream,
    peer: SocketAddr,
    listener: Arc<str>,
    tls: Option<TlsAcceptor>,
    transport: Transport,
    worker: Option<WorkerHandle>,
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
            let opening = Opening {
                conn,
                info,
                client_cert,
                shared,
                first: None,
            };
            upgrade(stream, transport, opening, worker).await
        }
        None => {
            let opening = Opening {
                conn,
                info,
                client_cert: None,
                shared,
                first: None,
            };
            upgrade(stream, transport, opening, worker).await
        }
    }
}

/// Runs the WebSocket handshake first on a WebSocket listener, routes the request on a web
/// port, then starts the connection.
async fn upgrade<S>(
    stream: S,
    transport: Transport,
    opening: Opening,
    worker: Option<WorkerHandle>,
) -> anyhow::Result<()>
where
    S: connection::Transport,
{
    if let Some(port) = transport.web {
        let peer = stream.tcp().peer_addr()?;
        let (stream, request) =
            match crate::web::accept(stream, peer, &port, worker.is_some()).await? {
                Routed::Served => return Ok(()),
                Routed::Plugin { transport, request } => (transport, request),
            };
        let worker = worker.context("a web port without its plugin upgraded a WebSocket")?;
        let shared = opening.shared.clone();
        tokio::spawn(crate::message_mode::watchdog(
            stream.stage(),
            shared,
            stream.idle(),
        ));
        return start(stream, opening, worker, Some(request));
    }
    let worker = worker.context("a listener without its plugin")?;
    match transport.websocket {
        Some(options) => {
            let stream = crate::websocket::accept(stream, &options).await?;
            start(stream, opening, worker, None)
        }
        None => start(stream, opening, worker, None),
    }
}

/// Spawns the connection's task, which opens it in its plugin (with `first`, bytes the host
/// produced itself, before any from the socket) and serves it.
fn start<S>(
    stream: S,
    mut opening: Opening,
    worker: WorkerHandle,
    first: Option<bytes::Bytes>,
) -> anyhow::Result<()>
where
    S: connection::Transport,
{
    tracing::debug!(conn = opening.conn, peer = %opening.info.peer_addr, listener = %opening.info.listener, "connection opened");
    opening.first = first;
    // A task of its own: what the accept and the handshake needed is freed now, not kept for
    // the connection's lifetime inside one larger future.
    tokio::spawn(connection::open_and_run(stream, opening, worker));
    Ok(())
}
