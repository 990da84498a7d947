//! WebSocket as a listener transport: any plugin served over WebSocket (RFC 6455), as browsers'
//! MQTT clients (MQTT.js, paho's `transport="websockets"`) need it.
//!
//! A listener with `websocket = true` runs the HTTP/1.1 Upgrade handshake after the TCP (or
//! TLS) accept and before the plugin hears of the connection; the plugin then sees the same
//! byte stream it would see over TCP. [`WsTransport`] is that stream: the payloads of binary
//! messages concatenated in order — MQTT packets may span or share WebSocket frames (MQTT 5.0
//! §6.0, [MQTT-6.0.0-2]) — and each write of the connection task one binary message out. It
//! implements [`Transport`], so the connection task (readiness waits on the TCP socket,
//! output queue, reader pause while congested) is exactly the one TCP and TLS use: a
//! congested connection stops reading the WebSocket, and a full socket holds its writes.
//!
//! The host handles what the plugin must not see: pings are answered, a close frame is
//! answered and ends the connection like a TCP end of stream, and a text frame (MQTT travels
//! only in binary frames, [MQTT-6.0.0-1]) closes the connection with close code 1003 and a log
//! line. Framing, masking and the handshake come from `tungstenite`; what RFC 6455 asks of a
//! server around it (answers, close codes of breaches) is `WsSide`, which the web port's
//! message mode ([`crate::message_mode`]) shares.
//!
//! The handshake follows Mosquitto where the specification leaves room: the client must offer
//! one of the listener's subprotocols (`mqtt`, or the legacy `mqttv3.1` of MQTT 3.1 clients),
//! which is echoed in the 101 response [MQTT-6.0.0-3/4]; any request path is accepted unless
//! the listener names one. Unlike Mosquitto, which drops such requests silently, a refused
//! request gets an HTTP error (400, or 404 for another path) before the close, so that a
//! misconfigured client's log says why. The handshake has a deadline, like TLS's.
//!
//! Limits: an incoming message is held whole before its bytes reach the plugin (that is how
//! `tungstenite` assembles fragments), so its size is capped by the listener's
//! `websocket_max_message_size` (default 1 MiB, the MQTT plugin's default `max_packet_size`);
//! a bigger one closes the connection with code 1009. Outgoing messages carry at most
//! [`MAX_OUT_MESSAGE`] bytes each. An idle WebSocket connection costs about 5 KiB more than a
//! TCP one, mostly tungstenite's read buffer (`READ_BUFFER`; measured 2026-11-26 with 2,000
//! idle MQTT connections each: 15.9 KiB per WebSocket one, 11.1 KiB per TCP one, gateway RSS).
//! Not done: `permessage-deflate`, `Origin` checks, `X-Forwarded-For`.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{header, HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use crate::config::ListenerConfig;
use crate::connection::Transport;

/// Time a client has to finish the HTTP Upgrade handshake.
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);
/// Most bytes one outgoing binary message carries; a longer write is split over several.
pub const MAX_OUT_MESSAGE: usize = 64 * 1024;
/// Size of one socket read of the WebSocket layer (small: its buffer lives as long as the
/// connection).
const READ_BUFFER: usize = 4 * 1024;

/// The WebSocket settings of one listener.
#[derive(Debug, Clone)]
pub struct WebSocketOptions {
    /// The only request path served; `None` serves every path.
    pub path: Option<String>,
    /// Subprotocols a client may pick (one must be offered); empty: none is required.
    pub subprotocols: Vec<String>,
    /// Largest incoming message, in bytes.
    pub max_message_size: usize,
}

impl WebSocketOptions {
    /// The listener's WebSocket settings, or `None` if it does not speak WebSocket.
    pub fn from_listener(l: &ListenerConfig) -> Option<WebSocketOptions> {
        l.websocket.then(|| WebSocketOptions {
            path: l.websocket_path.clone(),
            subprotocols: l.websocket_subprotocols.clone(),
            max_message_size: l.websocket_max_message_size,
        })
    }

    fn config(&self) -> WebSocketConfig {
        WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER)
            .write_buffer_size(MAX_OUT_MESSAGE)
            .max_message_size(Some(self.max_message_size))
            .max_frame_size(Some(self.max_message_size))
    }

    /// Checks an upgrade request and picks the subprotocol (the first the client offers that
    /// the listener serves), or says why not.
    // The signature is tungstenite's handshake `Callback`, large error type included.
    #[allow(clippy::result_large_err)]
    fn check(&self, request: &Request, mut response: Response) -> Result<Response, ErrorResponse> {
        if let Some(path) = &self.path {
            if request.uri().path() != path {
                return Err(refusal(
                    StatusCode::NOT_FOUND,
                    format!("no WebSocket endpoint at this path; use {path}"),
                ));
            }
        }
        if self.subprotocols.is_empty() {
            return Ok(response);
        }
        let chosen = request
            .headers()
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .find(|offered| self.subprotocols.iter().any(|s| s == offered))
            .and_then(|p| HeaderValue::from_str(p).ok());
        match chosen {
            Some(p) => {
                response
                    .headers_mut()
                    .insert(header::SEC_WEBSOCKET_PROTOCOL, p);
                Ok(response)
            }
            None => Err(refusal(
                StatusCode::BAD_REQUEST,
                format!(
                    "Sec-WebSocket-Protocol must offer one of: {}",
                    self.subprotocols.join(", ")
                ),
            )),
        }
    }
}

/// Why a WebSocket handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("WebSocket handshake timed out")]
    TimedOut,
    #[error("WebSocket upgrade refused ({status}): {reason}")]
    Refused { status: u16, reason: String },
    #[error("not a WebSocket upgrade request: {0}")]
    BadRequest(WsError),
    #[error("WebSocket handshake failed: {0}")]
    Io(#[source] io::Error),
}

/// Runs the server side of the Upgrade handshake on an accepted stream, within
/// [`HANDSHAKE_DEADLINE`]. A request that is not a WebSocket upgrade gets a 400 response.
// The handshake callback's error type is tungstenite's (an HTTP response).
#[allow(clippy::result_large_err)]
pub async fn accept<S: Transport>(
    mut stream: S,
    options: &WebSocketOptions,
) -> Result<WsTransport<S>, HandshakeError> {
    let config = options.config();
    let handshake = tokio_tungstenite::accept_hdr_async_with_config(
        &mut stream,
        |req: &Request, resp: Response| options.check(req, resp),
        Some(config),
    );
    match tokio::time::timeout(HANDSHAKE_DEADLINE, handshake).await {
        Err(_) => return Err(HandshakeError::TimedOut),
        // The handshake ran on a borrowed stream so that a refusal can still be answered; a
        // server handshake leaves no bytes behind (tungstenite refuses data sent before the
        // 101 response), so nothing is lost in taking the stream back.
        Ok(Ok(ws)) => drop(ws.into_inner()),
        Ok(Err(WsError::Http(response))) => {
            let reason = response
                .body()
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default()
                .into_owned();
            let _ = tokio::time::timeout(HANDSHAKE_DEADLINE, stream.shutdown()).await;
            return Err(HandshakeError::Refused {
                status: response.status().as_u16(),
                reason,
            });
        }
        Ok(Err(WsError::Io(e))) => return Err(HandshakeError::Io(e)),
        Ok(Err(e)) => {
            let body = format!("{e}\n");
            let answer = format!(
                "HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Type: text/plain\r\n\
                 Content-Length: {}\r\n\r\n{body}",
                body.len()
            );
            let _ = tokio::time::timeout(HANDSHAKE_DEADLINE, async {
                stream.write_all(answer.as_bytes()).await?;
                stream.shutdown().await
            })
            .await;
            return Err(HandshakeError::BadRequest(e));
        }
    }
    let ws = WebSocketStream::from_raw_socket(stream, Role::Server, Some(config)).await;
    Ok(WsTransport {
        side: WsSide::new(ws),
        unread: Bytes::new(),
    })
}

fn refusal(status: StatusCode, reason: String) -> ErrorResponse {
    let mut response = ErrorResponse::new(Some(format!("{reason}\n")));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// When a WebSocket last carried a frame either way, for an idle timeout kept by another task
/// (the web port's watchdog): every frame counts, pings, pongs and closes included, as in
/// Jetty, whose idle timeout Apache Pulsar's WebSocket API uses.
#[derive(Debug)]
pub struct Activity {
    start: tokio::time::Instant,
    /// Milliseconds from `start` to the last frame.
    last_ms: std::sync::atomic::AtomicU64,
    /// The idle timeout ended the connection: it closes with 1001 `Idle Timeout`.
    expired: std::sync::atomic::AtomicBool,
}

impl Activity {
    pub(crate) fn new() -> Activity {
        Activity {
            start: tokio::time::Instant::now(),
            last_ms: 0.into(),
            expired: false.into(),
        }
    }

    pub(crate) fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// When the WebSocket will have been idle for `timeout`, as things stand.
    pub(crate) fn idle_at(&self, timeout: Duration) -> tokio::time::Instant {
        let last = self.last_ms.load(std::sync::atomic::Ordering::Relaxed);
        self.start + Duration::from_millis(last) + timeout
    }

    pub(crate) fn expire(&self) {
        self.expired
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub(crate) fn expired(&self) -> bool {
        self.expired.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// The RFC 6455 side of a WebSocket transport, shared by MQTT over WebSocket
/// ([`WsTransport`]) and the web port's message mode ([`crate::message_mode`]):
/// tungstenite's stream and what a transport must remember around it. Pings and the peer's
/// close are answered at the next flush (tungstenite queues the answer; the close echoes the
/// peer's code); a breach of the protocol ends the stream with its close code: invalid UTF-8
/// in a text message 1007, a message over the limit 1009, anything else (unmasked client
/// frame, bad opcode, fragmented control frame...) 1002.
pub(crate) struct WsSide<S> {
    pub(crate) ws: WebSocketStream<S>,
    /// A ping or close was read: tungstenite holds its answer until the next flush.
    pub(crate) answer_queued: bool,
    /// The peer closed the WebSocket (or broke it, or left): reads return end of stream.
    pub(crate) ended: bool,
    /// The close code to send on shutdown; `None` once a close was sent or answered.
    pub(crate) close: Option<CloseCode>,
    /// The reason sent with `close`.
    pub(crate) close_reason: &'static str,
    /// Told of every frame read, if someone keeps an idle timeout.
    pub(crate) activity: Option<std::sync::Arc<Activity>>,
}

impl<S: Transport> WsSide<S> {
    pub(crate) fn new(ws: WebSocketStream<S>) -> WsSide<S> {
        WsSide {
            ws,
            answer_queued: false,
            ended: false,
            close: Some(CloseCode::Normal),
            close_reason: "",
            activity: None,
        }
    }

    /// The next text or binary message; `Ok(None)` at the end of the stream.
    pub(crate) fn poll_message(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<Option<Message>>> {
        loop {
            if self.ended {
                return Poll::Ready(Ok(None));
            }
            let next = ready!(Pin::new(&mut self.ws).poll_next(cx));
            if let (Some(Ok(_)), Some(activity)) = (&next, &self.activity) {
                activity.touch();
            }
            match next {
                Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => {
                    return Poll::Ready(Ok(Some(m)))
                }
                Some(Ok(Message::Ping(_))) => self.answer_queued = true,
                Some(Ok(Message::Pong(_) | Message::Frame(_))) => {}
                // A peer that drops TCP without a close frame (Paho does) ends the stream too.
                Some(Ok(Message::Close(_)))
                | None
                | Some(Err(WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake))) => {
                    // Its answer is queued; the connection ends like a TCP end of stream.
                    self.answer_queued = true;
                    self.ended = true;
                    self.close = None;
                }
                Some(Err(WsError::Utf8(e))) => {
                    return Poll::Ready(Err(
                        self.breach(CloseCode::Invalid, format!("text message: {e}"))
                    ))
                }
                Some(Err(WsError::Capacity(e))) => {
                    return Poll::Ready(Err(
                        self.breach(CloseCode::Size, format!("WebSocket message: {e}"))
                    ))
                }
                Some(Err(WsError::Protocol(e))) => {
                    return Poll::Ready(Err(
                        self.breach(CloseCode::Protocol, format!("WebSocket protocol: {e}"))
                    ))
                }
                Some(Err(e)) => {
                    self.ended = true;
                    self.close = None;
                    return Poll::Ready(Err(ws_to_io(e)));
                }
            }
        }
    }

    /// The peer broke the protocol: the stream ends, and shutdown closes with `code`.
    pub(crate) fn breach(&mut self, code: CloseCode, error: String) -> io::Error {
        self.ended = true;
        self.close = Some(code);
        let peer = self
            .tcp()
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        tracing::info!(%peer, %error, "closing WebSocket connection");
        io::Error::new(io::ErrorKind::InvalidData, error)
    }

    pub(crate) fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(Pin::new(&mut self.ws).poll_flush(cx)).map_err(ws_to_io)?;
        self.answer_queued = false;
        Poll::Ready(Ok(()))
    }

    /// Sends the close frame still owed (1000, or the code of the breach that ends the
    /// connection; none if a close was sent or answered), then shuts the stream below down.
    pub(crate) fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(code) = self.close {
            // A failure here means the WebSocket is already closed or broken: go on to shut
            // the stream below down.
            if ready!(Pin::new(&mut self.ws).poll_ready(cx)).is_ok() {
                let frame = CloseFrame {
                    code,
                    reason: self.close_reason.into(),
                };
                let _ = Pin::new(&mut self.ws).start_send(Message::Close(Some(frame)));
            }
            self.close = None;
        }
        let _ = ready!(Pin::new(&mut self.ws).poll_close(cx));
        Pin::new(self.ws.get_mut()).poll_shutdown(cx)
    }

    pub(crate) fn tcp(&self) -> &TcpStream {
        self.ws.get_ref().tcp()
    }

    pub(crate) fn wants_write(&self) -> bool {
        self.answer_queued || self.ws.get_ref().wants_write()
    }
}

pub(crate) fn ws_to_io(e: WsError) -> io::Error {
    match e {
        WsError::Io(e) => e,
        WsError::ConnectionClosed | WsError::AlreadyClosed => io::ErrorKind::BrokenPipe.into(),
        e => io::Error::other(e),
    }
}

/// A WebSocket connection seen as a byte stream: binary messages' payloads in, one binary
/// message per write out.
pub struct WsTransport<S> {
    side: WsSide<S>,
    /// What is left of the last binary message after the reads so far.
    unread: Bytes,
}

impl<S: Transport> AsyncRead for WsTransport<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            if !this.unread.is_empty() {
                let n = this.unread.len().min(buf.remaining());
                buf.put_slice(&this.unread[..n]);
                this.unread.advance(n);
                return Poll::Ready(Ok(()));
            }
            match ready!(this.side.poll_message(cx))? {
                None => return Poll::Ready(Ok(())),
                Some(Message::Binary(data)) => this.unread = data,
                Some(_) => {
                    let e = this.side.breach(
                        CloseCode::Unsupported,
                        "text frame received; MQTT travels in binary frames [MQTT-6.0.0-1]".into(),
                    );
                    return Poll::Ready(Err(e));
                }
            }
        }
    }
}

impl<S: Transport> WsTransport<S> {
    /// Sends `slices` (at most [`MAX_OUT_MESSAGE`] bytes of them) as one binary message.
    fn poll_send(
        &mut self,
        cx: &mut Context<'_>,
        slices: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let total: usize = slices.iter().map(|s| s.len()).sum();
        if total == 0 {
            return Poll::Ready(Ok(0));
        }
        ready!(Pin::new(&mut self.side.ws).poll_ready(cx)).map_err(ws_to_io)?;
        let mut message = BytesMut::with_capacity(total.min(MAX_OUT_MESSAGE));
        for s in slices {
            let room = MAX_OUT_MESSAGE - message.len();
            message.extend_from_slice(&s[..s.len().min(room)]);
            if message.len() == MAX_OUT_MESSAGE {
                break;
            }
        }
        let n = message.len();
        Pin::new(&mut self.side.ws)
            .start_send(Message::Binary(message.freeze()))
            .map_err(ws_to_io)?;
        Poll::Ready(Ok(n))
    }
}

impl<S: Transport> AsyncWrite for WsTransport<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_send(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.poll_send(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.side.poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.side.poll_shutdown(cx)
    }
}

impl<S: Transport> Transport for WsTransport<S> {
    fn tcp(&self) -> &TcpStream {
        self.side.tcp()
    }

    fn wants_write(&self) -> bool {
        self.side.wants_write()
    }
}
