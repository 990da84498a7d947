//! The web port: one HTTP/1.1 listener (`web = true`) serving what Apache Pulsar's web port
//! serves — WebSocket endpoints, the admin REST API — and a demo page.
//!
//! The host reads each connection's request head itself, bounded (`MAX_HEAD` bytes,
//! `HEAD_DEADLINE`), and routes on it:
//! - a WebSocket upgrade (`GET`, `Upgrade: websocket`) under `/ws/` becomes a connection
//!   of the listener's plugin in *message mode* ([`crate::message_mode`]): the plugin hears
//!   the request first and decides the answer. What the host checks before the plugin hears
//!   of it: the handshake (RFC 6455 §4.2.1: HTTP/1.1, `Sec-WebSocket-Version: 13`, a key of
//!   16 bytes, nothing sent after the head) and the `Origin` against the listener's
//!   `allowed_origins` (empty: any; a request without `Origin`, from a non-browser client,
//!   passes: the check protects browsers' users from other sites' pages, not the service);
//! - everything else is served by hyper on the same connection, the head replayed:
//!   `/admin/v2/...` is Pulsar's admin REST API under the gateway's tenancy
//!   ([`crate::web_admin`]), `/metrics` the gateway's metrics (scoped to the caller's tenant),
//!   `/demo` the page of `demo.html`, `/ws/...` without an upgrade a
//!   426, anything else a 404. Keep-alive works; an upgrade is only taken as the first
//!   request of a connection (browsers open a fresh connection for each WebSocket).
//!
//! A web listener whose plugin is not loaded still serves the admin API and the page; its
//! upgrades get a 503.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::Router;
use base64::Engine;
use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tower::ServiceExt;

use crate::config::ListenerConfig;
use crate::connection::Transport;
use crate::message_mode::{http_answer, MessageTransport};
use crate::web_admin::{PeerAddr, PulsarAdmin};

/// Time a client has to send its request head (and, on keep-alive, each next one).
pub const HEAD_DEADLINE: Duration = Duration::from_secs(10);
/// Largest request head: a JWT in the query and the usual browser headers fit many times.
pub const MAX_HEAD: usize = 16 * 1024;
/// Most header lines in a request head.
const MAX_HEADERS: usize = 64;
/// The demo page: one file, no build step, nothing fetched from elsewhere.
const DEMO_PAGE: &str = include_str!("demo.html");

/// The web settings of one listener.
#[derive(Debug, Clone)]
pub struct WebOptions {
    /// Origins a browser page may open WebSockets from (`scheme://host[:port]`); empty: any.
    pub allowed_origins: Vec<String>,
    /// Largest incoming WebSocket message, in bytes (1009 above).
    pub max_message_size: usize,
    /// How long a WebSocket may go without a frame either way (`None`: forever).
    pub idle_timeout: Option<std::time::Duration>,
}

impl WebOptions {
    /// The listener's web settings, or `None` if it is not a web port.
    pub fn from_listener(l: &ListenerConfig) -> Option<WebOptions> {
        l.web.then(|| WebOptions {
            allowed_origins: l.allowed_origins.clone(),
            max_message_size: l.websocket_max_message_size,
            idle_timeout: (l.websocket_idle_timeout_ms > 0)
                .then(|| std::time::Duration::from_millis(l.websocket_idle_timeout_ms)),
        })
    }

    fn origin_allowed(&self, origin: Option<&str>) -> bool {
        match origin {
            None => true,
            Some(o) => {
                self.allowed_origins.is_empty()
                    || self
                        .allowed_origins
                        .iter()
                        .any(|a| a.trim_end_matches('/').eq_ignore_ascii_case(o))
            }
        }
    }
}

/// What one web listener serves; shared by its connections.
pub struct WebPort {
    options: WebOptions,
    http: Router,
}

impl WebPort {
    pub fn new(options: WebOptions, admin: Arc<PulsarAdmin>) -> WebPort {
        let http = Router::new()
            .route("/demo", get(demo))
            .route("/admin/v2/{*rest}", any(crate::web_admin::handle))
            .route("/metrics", get(crate::web_admin::metrics))
            .route("/ws/{*rest}", any(upgrade_required))
            .fallback(not_found)
            .with_state(admin);
        WebPort { options, http }
    }
}

/// Why a web connection ended before it reached a plugin or an HTTP handler.
#[derive(Debug, thiserror::Error)]
pub enum WebError {
    #[error("refused ({status}): {reason}")]
    Refused { status: u16, reason: String },
}

/// Where a connection went.
// Returned once per connection and taken apart at once: boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
pub enum Routed<S> {
    /// A WebSocket for the plugin: start its connection with `request` (the REQUEST
    /// frame) as its first input.
    Plugin {
        transport: MessageTransport<S>,
        request: Bytes,
    },
    /// Served here as HTTP, now finished.
    Served,
}

/// A request head as the host read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub method: String,
    /// The path, percent-encoded as sent, without the query.
    pub path: String,
    /// The raw query, without `?`.
    pub query: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    /// Names in lower case, in request order.
    pub headers: Vec<(String, String)>,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether a comma-separated header holds `token` (any case).
    fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    fn is_websocket_upgrade(&self) -> bool {
        self.has_token("upgrade", "websocket") && self.has_token("connection", "upgrade")
    }

    /// The REQUEST frame of the envelope (`sdk/src/web.rs`).
    pub fn request_frame(&self, peer: SocketAddr) -> Bytes {
        let json = serde_json::json!({
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "headers": self.headers,
            "peer": peer.to_string(),
        });
        let payload = serde_json::to_vec(&json).unwrap_or_default();
        let mut frame = Vec::with_capacity(crate::message_mode::HEADER_LEN + payload.len());
        frame.push(crate::message_mode::KIND_HTTP);
        frame.extend_from_slice(&u32::try_from(payload.len()).unwrap_or(0).to_be_bytes());
        frame.extend_from_slice(&payload);
        Bytes::from(frame)
    }
}

/// Why a head could not be read.
#[derive(Debug, PartialEq, Eq)]
pub enum HeadError {
    /// Not HTTP/1.x (400).
    Malformed(String),
    /// Over [`MAX_HEAD`] bytes or 64 header lines (431).
    TooLarge,
}

/// Parses a request head from the front of `buf`: `Ok(None)` while incomplete, else the head
/// and its length in bytes.
pub fn parse_head(buf: &[u8]) -> Result<Option<(Head, usize)>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => return Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(e) => return Err(HeadError::Malformed(e.to_string())),
    };
    if len > MAX_HEAD {
        return Err(HeadError::TooLarge);
    }
    let target = req.path.unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let head = Head {
        method: req.method.unwrap_or("").to_string(),
        path: path.to_string(),
        query: query.to_string(),
        version: req.version.unwrap_or(1),
        headers: req
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_ascii_lowercase(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect(),
    };
    Ok(Some((head, len)))
}

/// Reads the head of the first request; the bytes read stay in `buf`.
async fn read_head<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
) -> Result<Option<(Head, usize)>, HeadError> {
    loop {
        if let Some(found) = parse_head(buf)? {
            return Ok(Some(found));
        }
        let room = MAX_HEAD - buf.len();
        let mut chunk = (&mut *stream).take(room as u64);
        match chunk.read_buf(buf).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(_) => {}
        }
    }
}

/// Serves one accepted connection of a web listener: reads the head and routes it (see the
/// module docs). `plugin`: whether the listener's plugin is loaded.
pub async fn accept<S: Transport>(
    mut stream: S,
    peer: SocketAddr,
    port: &WebPort,
    plugin: bool,
) -> Result<Routed<S>, WebError> {
    let mut buf = BytesMut::with_capacity(1024);
    let head = match tokio::time::timeout(HEAD_DEADLINE, read_head(&mut stream, &mut buf)).await {
        // Browsers open connections ahead of need and may leave them unused.
        Err(_) => {
            tracing::debug!(%peer, "web connection closed: no request within {HEAD_DEADLINE:?}");
            return Ok(Routed::Served);
        }
        Ok(Ok(Some(head))) => head,
        Ok(Ok(None)) => return Ok(Routed::Served),
        Ok(Err(HeadError::TooLarge)) => {
            return refuse(stream, 431, &[], "request head too large").await
        }
        Ok(Err(HeadError::Malformed(e))) => {
            return refuse(stream, 400, &[], &format!("malformed request: {e}")).await
        }
    };
    let (head, len) = head;
    if !(head.path.starts_with("/ws/") && head.is_websocket_upgrade()) {
        serve_http(stream, buf.freeze(), port, peer).await;
        return Ok(Routed::Served);
    }
    if head.method != "GET" || head.version < 1 {
        return refuse(stream, 400, &[], "a WebSocket upgrade is an HTTP/1.1 GET").await;
    }
    if head.header("sec-websocket-version") != Some("13") {
        let version = [("Sec-WebSocket-Version".to_string(), "13".to_string())];
        return refuse(stream, 426, &version, "Sec-WebSocket-Version must be 13").await;
    }
    let key = head.header("sec-websocket-key").unwrap_or("").trim();
    let key_ok = base64::engine::general_purpose::STANDARD
        .decode(key)
        .is_ok_and(|k| k.len() == 16);
    if !key_ok {
        return refuse(
            stream,
            400,
            &[],
            "Sec-WebSocket-Key must be 16 bytes in base64",
        )
        .await;
    }
    if buf.len() > len {
        return refuse(
            stream,
            400,
            &[],
            "data before the handshake's answer (RFC 6455 §4.1)",
        )
        .await;
    }
    if !port.options.origin_allowed(head.header("origin")) {
        return refuse(stream, 403, &[], "this Origin may not open WebSockets here").await;
    }
    if !plugin {
        return refuse(stream, 503, &[], "no WebSocket endpoints on this port").await;
    }
    let key = key.to_string();
    let offered = head
        .headers
        .iter()
        .filter(|(n, _)| n == "sec-websocket-protocol")
        .flat_map(|(_, v)| v.split(','))
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect();
    let transport = MessageTransport::new(
        stream,
        &key,
        offered,
        port.options.max_message_size,
        port.options.idle_timeout,
    )
    .await;
    Ok(Routed::Plugin {
        transport,
        request: head.request_frame(peer),
    })
}

/// Answers with an HTTP error and closes; the error says why, for the log.
async fn refuse<S: Transport>(
    mut stream: S,
    status: u16,
    headers: &[(String, String)],
    reason: &str,
) -> Result<Routed<S>, WebError> {
    let answer = http_answer(status, headers, &format!("{reason}\n"), None);
    let _ = tokio::time::timeout(HEAD_DEADLINE, async {
        stream.write_all(&answer).await?;
        stream.shutdown().await
    })
    .await;
    Err(WebError::Refused {
        status,
        reason: reason.to_string(),
    })
}

/// Serves HTTP requests on the connection (keep-alive), the first one's bytes replayed.
async fn serve_http<S: Transport>(stream: S, read: Bytes, port: &WebPort, peer: SocketAddr) {
    let router = port.http.clone();
    let service =
        hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(PeerAddr(peer));
            let router = router.clone();
            async move {
                let response = router.oneshot(req.map(Body::new)).await;
                Ok::<_, Infallible>(response.unwrap_or_else(|e| match e {}))
            }
        });
    let io = hyper_util::rt::TokioIo::new(Replay { read, stream });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEAD_DEADLINE)
        .max_buf_size(MAX_HEAD.max(8192))
        .serve_connection(io, service)
        .await;
    // An idle keep-alive connection timing out or a client leaving mid-request is an
    // ordinary end of an HTTP connection, not a refusal.
    if let Err(e) = served {
        tracing::debug!(%peer, error = %e, "web connection ended");
    }
}

/// A stream whose first bytes were read already: they are read again first.
struct Replay<S> {
    read: Bytes,
    stream: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Replay<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.read.is_empty() {
            return Pin::new(&mut self.stream).poll_read(cx, buf);
        }
        let n = self.read.len().min(buf.remaining());
        buf.put_slice(&self.read[..n]);
        self.read.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Replay<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

async fn demo() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        DEMO_PAGE,
    )
        .into_response()
}

async fn upgrade_required(_req: Request) -> Response {
    (
        StatusCode::UPGRADE_REQUIRED,
        [(header::UPGRADE, "websocket")],
        "WebSocket endpoints need a WebSocket upgrade (GET with Upgrade: websocket) on a new connection\n",
    )
        .into_response()
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        "not found: this port serves /ws/ (WebSocket), /admin/v2/, /metrics and /demo\n",
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_is_parsed_with_lower_case_names_in_order() {
        let raw = b"GET /ws/v2/consumer/persistent/t/ns/a/s?token=x%2By&subscriptionType=Shared HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nX-A: 1\r\n\r\nrest";
        let (head, len) = parse_head(raw).unwrap().unwrap();
        assert_eq!(len, raw.len() - 4);
        assert_eq!(head.path, "/ws/v2/consumer/persistent/t/ns/a/s");
        assert_eq!(head.query, "token=x%2By&subscriptionType=Shared");
        assert_eq!(head.headers[0], ("host".into(), "h".into()));
        assert_eq!(head.headers[3], ("x-a".into(), "1".into()));
        assert!(head.is_websocket_upgrade());
        assert_eq!(parse_head(&raw[..20]), Ok(None));
        assert!(matches!(
            parse_head(b"\x16\x03\x01 not http\r\n\r\n"),
            Err(HeadError::Malformed(_))
        ));
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(parse_head(big.as_bytes()), Err(HeadError::TooLarge));
    }

    #[test]
    fn the_request_frame_is_the_envelopes() {
        let (head, _) = parse_head(b"GET /ws/x?a=1 HTTP/1.1\r\nOrigin: http://o\r\n\r\n")
            .unwrap()
            .unwrap();
        let frame = head.request_frame("127.0.0.1:5555".parse().unwrap());
        assert_eq!(frame[0], 0x01);
        let len = u32::from_be_bytes([frame[1], frame[2], frame[3], frame[4]]) as usize;
        assert_eq!(len, frame.len() - 5);
        let json: serde_json::Value = serde_json::from_slice(&frame[5..]).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"method": "GET", "path": "/ws/x", "query": "a=1",
                "headers": [["origin", "http://o"]], "peer": "127.0.0.1:5555"})
        );
    }

    #[test]
    fn origins() {
        let mut o = WebOptions {
            allowed_origins: vec![],
            max_message_size: 1024,
            idle_timeout: None,
        };
        assert!(o.origin_allowed(Some("http://evil.example")));
        o.allowed_origins = vec!["http://127.0.0.1:8080/".into()];
        assert!(o.origin_allowed(Some("http://127.0.0.1:8080")));
        assert!(!o.origin_allowed(Some("http://evil.example")));
        assert!(o.origin_allowed(None), "non-browser clients send none");
    }
}
