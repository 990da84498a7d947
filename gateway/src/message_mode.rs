//! Message mode: a WebSocket connection of the web port seen by its plugin as a stream of
//! envelope frames (the contract is `sdk/src/web.rs`, guest side; this is the host side).
//!
//! The web port ([`crate::web`]) reads the upgrade request itself and hands the plugin a
//! REQUEST frame before anything goes back to the client: the plugin decides the answer
//! (Pulsar's WebSocket API refuses a bad topic or token with 400/401/403/404 *on the
//! upgrade*, so the answer cannot be the host's). [`MessageTransport`] then
//! - writes the plugin's RESPONSE: 101 completes the RFC 6455 handshake
//!   (`Sec-WebSocket-Accept` from tungstenite's helper) and the stream becomes a WebSocket;
//!   any other status is written as an HTTP response and the connection ends;
//! - turns each incoming message into one TEXT or BINARY frame (tungstenite reassembles
//!   fragments, checks masking and UTF-8, answers pings), and each TEXT/BINARY frame of the
//!   plugin into one message; CLOSE sends a close frame with the plugin's code.
//!
//! It implements [`Transport`], so the connection task is the one TCP, TLS and MQTT over
//! WebSocket use, with its backpressure: the plugin's writes are cut into frames however
//! they were split or joined, a whole frame leaves the buffer only once the socket takes its
//! message, the buffer holds at most one incomplete frame (of at most [`MAX_OUT_MESSAGE`]
//! bytes) besides, and a congested connection stops reading.
//!
//! What the connection task cannot do, [`watchdog`] does: it ends a connection whose plugin
//! does not answer the upgrade within [`ANSWER_DEADLINE`] (the client gets a 503), and one
//! whose client does not answer the plugin's close within [`CLOSE_GRACE`].
//!
//! Breaches, each closing only its connection: invalid UTF-8 in a text message → 1007, a
//! message over the listener's limit → 1009, any other RFC 6455 violation (unmasked client
//! frame, bad opcode, fragmented control frame...) → 1002; bytes from the client before the
//! answer (RFC 6455 §4.1 forbids them) → 400; a plugin breaking the envelope (a message
//! before its RESPONSE, an unknown kind, a second RESPONSE) → 500 before the upgrade, 1011
//! after, and a warning in the log. A peer's close code is echoed (tungstenite). The RFC 6455
//! side is `websocket::WsSide`, shared with MQTT over WebSocket. No `permessage-deflate`:
//! tokio-tungstenite 0.30 does not implement it, so it is never negotiated.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures::Sink;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

use crate::conn_shared::ConnShared;
use crate::connection::Transport;
use crate::websocket::{ws_to_io, Activity, WsSide};

/// Time the plugin has to answer the upgrade request.
pub const ANSWER_DEADLINE: Duration = Duration::from_secs(10);
/// Time a client has to answer the plugin's close frame before the socket is closed.
pub const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// Largest message (frame payload) a plugin may send: Pulsar's default maximum message
/// size (5 MiB) with room for base64 and JSON around it.
pub const MAX_OUT_MESSAGE: usize = 8 * 1024 * 1024;
/// Bytes before a frame's payload: kind (1) and big-endian length (4).
pub const HEADER_LEN: usize = 5;
/// Frame kinds (`sdk/src/web.rs`): REQUEST / RESPONSE share 0x01 (by direction).
pub const KIND_HTTP: u8 = 0x01;
pub const KIND_TEXT: u8 = 0x02;
pub const KIND_BINARY: u8 = 0x03;
pub const KIND_CLOSE: u8 = 0x04;
/// Size of one socket read of the WebSocket layer (it lives as long as the connection).
const READ_BUFFER: usize = 4 * 1024;
/// Longest close reason a close frame carries (RFC 6455 §5.5: 125 bytes of payload).
const MAX_CLOSE_REASON: usize = 123;

/// How far a connection got, for [`watchdog`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The plugin has not answered the upgrade request.
    Awaiting,
    /// The WebSocket is open.
    Open,
    /// The connection is ending: refused, or closed by the plugin.
    Ending,
}

/// Where the transport is in the envelope's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Awaiting,
    /// Writing the HTTP answer (`answer`); `upgrade`: it is a 101.
    Answering {
        upgrade: bool,
    },
    Open,
    /// The plugin's close frame is queued: its further frames are dropped.
    Closing,
    /// A refusal was written: the connection ends.
    Refused,
}

/// One WebSocket connection in message mode: see the module docs.
pub struct MessageTransport<S> {
    /// The WebSocket (before the upgrade, only its stream below is used).
    side: WsSide<S>,
    /// `Sec-WebSocket-Accept` for a 101.
    accept_key: String,
    /// The subprotocols the client offered: the only ones a 101 may name (a client fails
    /// the connection on any other, RFC 6455 §4.1).
    offered: Vec<String>,
    phase: Phase,
    stage: watch::Sender<Stage>,
    /// The answer written at shutdown if the plugin never gave one.
    unanswered: (u16, &'static str),
    /// Host → plugin: the header of the frame being read out (`header_at` bytes of it
    /// delivered), then its payload.
    header: [u8; HEADER_LEN],
    header_at: usize,
    unread: Bytes,
    /// Plugin → host: bytes not yet cut into frames.
    from_plugin: BytesMut,
    /// The HTTP answer, as far as it is not written yet.
    answer: Bytes,
    /// The plugin broke the envelope after the upgrade: the connection ends (1011).
    plugin_broke: bool,
    /// Frames either way, for the idle timeout [`watchdog`] keeps (if there is one).
    idle: Option<(Arc<Activity>, Duration)>,
}

fn aborted(why: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, why)
}

impl<S: Transport> MessageTransport<S> {
    /// Wraps a stream whose upgrade request (with key `sec_websocket_key`, offering the
    /// subprotocols `offered`) was read and checked; nothing has been answered yet. Incoming
    /// messages over `max_message_size` bytes close the connection with 1009; one without a
    /// frame either way for `idle_timeout` is closed by [`watchdog`] with 1001.
    pub async fn new(
        stream: S,
        sec_websocket_key: &str,
        offered: Vec<String>,
        max_message_size: usize,
        idle_timeout: Option<Duration>,
    ) -> MessageTransport<S> {
        let config = WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER)
            .max_message_size(Some(max_message_size))
            .max_frame_size(Some(max_message_size));
        // Nothing is read or written until the WebSocket is polled: the answer goes out
        // through `get_mut()` first.
        let ws = WebSocketStream::from_raw_socket(stream, Role::Server, Some(config)).await;
        let idle = idle_timeout.map(|t| (Arc::new(Activity::new()), t));
        let mut side = WsSide::new(ws);
        side.activity = idle.as_ref().map(|(a, _)| a.clone());
        MessageTransport {
            side,
            accept_key: derive_accept_key(sec_websocket_key.as_bytes()),
            offered,
            phase: Phase::Awaiting,
            stage: watch::Sender::new(Stage::Awaiting),
            unanswered: (503, "the WebSocket endpoint did not answer in time"),
            header: [0; HEADER_LEN],
            header_at: HEADER_LEN,
            unread: Bytes::new(),
            from_plugin: BytesMut::new(),
            answer: Bytes::new(),
            plugin_broke: false,
            idle,
        }
    }

    /// Follows the connection's stage (for [`watchdog`]).
    pub fn stage(&self) -> watch::Receiver<Stage> {
        self.stage.subscribe()
    }

    /// What [`watchdog`] needs to keep the idle timeout (`None`: no idle timeout).
    pub fn idle(&self) -> Option<(Arc<Activity>, Duration)> {
        self.idle.clone()
    }

    fn peer(&self) -> String {
        self.tcp()
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_default()
    }

    /// The plugin broke the envelope: refuse the upgrade (500) or close the WebSocket (1011).
    fn plugin_breach(&mut self, error: &str) {
        tracing::warn!(peer = %self.peer(), %error, "plugin broke the web envelope");
        self.from_plugin.clear();
        match self.phase {
            Phase::Awaiting => {
                self.answer = http_answer(500, &[], "the endpoint failed\n", None);
                self.phase = Phase::Answering { upgrade: false };
            }
            Phase::Open => {
                self.side.close = Some(CloseCode::Error);
                self.plugin_broke = true;
                self.phase = Phase::Closing;
                self.stage.send_replace(Stage::Ending);
            }
            _ => {}
        }
    }

    /// Hands the plugin one message as a frame.
    fn deliver(&mut self, kind: u8, payload: Bytes) {
        self.header[0] = kind;
        // Messages are at most `max_message_size`, far below 4 GiB.
        let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
        self.header[1..].copy_from_slice(&len.to_be_bytes());
        self.header_at = 0;
        self.unread = payload;
    }

    /// Carries out the plugin's complete frames: writes the answer, sends messages.
    /// `Pending` while the socket cannot take more; an error ends the connection.
    fn poll_frames(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            match self.phase {
                Phase::Answering { upgrade } => {
                    while !self.answer.is_empty() {
                        let n =
                            ready!(Pin::new(self.side.ws.get_mut()).poll_write(cx, &self.answer))?;
                        if n == 0 {
                            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                        }
                        self.answer.advance(n);
                    }
                    if upgrade {
                        self.phase = Phase::Open;
                        self.stage.send_replace(Stage::Open);
                        continue;
                    }
                    ready!(Pin::new(self.side.ws.get_mut()).poll_flush(cx))?;
                    self.phase = Phase::Refused;
                    self.stage.send_replace(Stage::Ending);
                }
                Phase::Refused => {
                    self.from_plugin.clear();
                    return Poll::Ready(Err(aborted("the upgrade was refused")));
                }
                Phase::Closing => {
                    self.from_plugin.clear();
                    if self.plugin_broke {
                        // Shutdown sends the 1011.
                        return Poll::Ready(Err(aborted("the plugin broke the web envelope")));
                    }
                    return Poll::Ready(Ok(()));
                }
                Phase::Awaiting | Phase::Open => {}
            }
            let (kind, len) = match self.peek_frame() {
                Ok(Some(frame)) => frame,
                Ok(None) => return Poll::Ready(Ok(())),
                Err(e) => {
                    self.plugin_breach(&e);
                    continue;
                }
            };
            if kind == KIND_HTTP {
                if self.phase == Phase::Open {
                    self.plugin_breach("a second RESPONSE frame");
                    continue;
                }
                let payload = self.take_frame(len);
                match serde_json::from_slice::<Response>(&payload) {
                    Ok(r) => self.answer(r),
                    Err(e) => self.plugin_breach(&format!("malformed RESPONSE: {e}")),
                }
                continue;
            }
            if self.phase == Phase::Awaiting {
                self.plugin_breach("a message before the RESPONSE frame");
                continue;
            }
            // The sink must have room before the frame leaves the buffer.
            ready!(Pin::new(&mut self.side.ws).poll_ready(cx)).map_err(ws_to_io)?;
            let payload = self.take_frame(len);
            let message = match kind {
                KIND_TEXT => match Utf8Bytes::try_from(payload) {
                    Ok(text) => Message::Text(text),
                    Err(_) => {
                        self.plugin_breach("a TEXT frame that is not UTF-8");
                        continue;
                    }
                },
                KIND_BINARY => Message::Binary(payload),
                _ => {
                    let frame = close_frame(&payload);
                    self.side.close = None;
                    self.phase = Phase::Closing;
                    self.stage.send_replace(Stage::Ending);
                    Message::Close(Some(frame))
                }
            };
            Pin::new(&mut self.side.ws)
                .start_send(message)
                .map_err(ws_to_io)?;
            if let Some((activity, _)) = &self.idle {
                activity.touch();
            }
        }
    }

    /// The kind and payload length of the first buffered frame if it is whole; an error for
    /// a frame that can never be valid.
    fn peek_frame(&self) -> Result<Option<(u8, usize)>, String> {
        let buf = &self.from_plugin;
        let Some(&kind) = buf.first() else {
            return Ok(None);
        };
        if !matches!(kind, KIND_HTTP | KIND_TEXT | KIND_BINARY | KIND_CLOSE) {
            return Err(format!("unknown frame kind 0x{kind:02x}"));
        }
        let Some(len) = buf.get(1..HEADER_LEN) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]);
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len > MAX_OUT_MESSAGE {
            return Err(format!("a frame of {len} bytes (limit {MAX_OUT_MESSAGE})"));
        }
        Ok((buf.len() >= HEADER_LEN + len).then_some((kind, len)))
    }

    fn take_frame(&mut self, len: usize) -> Bytes {
        self.from_plugin.advance(HEADER_LEN);
        self.from_plugin.split_to(len).freeze()
    }

    /// Turns the plugin's RESPONSE into the HTTP answer to write.
    fn answer(&mut self, mut r: Response) {
        let upgrade = r.status == 101;
        self.answer = if upgrade {
            let before = r.headers.len();
            r.headers.retain(|(name, value)| {
                !name.eq_ignore_ascii_case("sec-websocket-protocol")
                    || self.offered.iter().any(|o| o == value)
            });
            if r.headers.len() != before {
                tracing::warn!(peer = %self.peer(), "plugin picked a subprotocol the client did not offer; not sent");
            }
            http_answer(101, &r.headers, "", Some(&self.accept_key))
        } else {
            http_answer(r.status, &r.headers, &r.body, None)
        };
        self.phase = Phase::Answering { upgrade };
    }

    /// Accepts plugin bytes: as many as fit beside the frame being cut.
    fn poll_accept(
        &mut self,
        cx: &mut Context<'_>,
        slices: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_frames(cx))?;
        // After `poll_frames`, the buffer holds less than one whole frame of at most
        // MAX_OUT_MESSAGE bytes: there is room.
        let mut room = (HEADER_LEN + MAX_OUT_MESSAGE)
            .saturating_sub(self.from_plugin.len())
            .max(1);
        let mut taken = 0;
        for s in slices {
            let n = s.len().min(room);
            self.from_plugin.extend_from_slice(&s[..n]);
            taken += n;
            room -= n;
            if room == 0 {
                break;
            }
        }
        // Send what became whole now; what waits for the socket goes on the next write or
        // flush (the connection task flushes when its queue is empty).
        if let Poll::Ready(Err(e)) = self.poll_frames(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(taken))
    }
}

/// The plugin's RESPONSE frame (`sdk/src/web.rs`).
#[derive(Debug, serde::Deserialize)]
struct Response {
    status: u16,
    #[serde(default)]
    headers: Vec<(String, String)>,
    #[serde(default)]
    body: String,
}

/// A close frame from a CLOSE payload: code (u16 BE) then reason; a code that may not be
/// sent (RFC 6455 §7.4.1: 1005, 1006, 1015, unassigned) becomes 1011.
fn close_frame(payload: &[u8]) -> CloseFrame {
    let (code, reason) = match payload {
        [hi, lo, reason @ ..] => (u16::from_be_bytes([*hi, *lo]), reason),
        _ => (1000, &[][..]),
    };
    let mut code = CloseCode::from(code);
    if !code.is_allowed() {
        code = CloseCode::Error;
    }
    let reason = String::from_utf8_lossy(reason);
    let mut end = reason.len().min(MAX_CLOSE_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    CloseFrame {
        code,
        reason: Utf8Bytes::from(&reason[..end]),
    }
}

/// The bytes of an HTTP/1.1 answer: a 101 with `accept` (the host's upgrade headers first),
/// or a final response with `body` that closes the connection. Headers the host owns, and
/// any with a CR or LF, are dropped from the plugin's.
pub fn http_answer(
    status: u16,
    headers: &[(String, String)],
    body: &str,
    accept: Option<&str>,
) -> Bytes {
    use std::fmt::Write;
    let status = match StatusCode::from_u16(status) {
        Ok(s) if accept.is_some() || s.as_u16() >= 200 => s,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let mut out = format!(
        "HTTP/1.1 {} {}\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    let mut content_type = false;
    for (name, value) in headers {
        let owned = [
            "upgrade",
            "connection",
            "sec-websocket-accept",
            "content-length",
            "transfer-encoding",
        ];
        let bad = |s: &str| s.is_empty() || s.bytes().any(|b| b == b'\r' || b == b'\n');
        if owned.iter().any(|o| name.eq_ignore_ascii_case(o))
            || bad(name)
            || value.contains(['\r', '\n'])
        {
            continue;
        }
        content_type |= name.eq_ignore_ascii_case("content-type");
        let _ = write!(out, "{name}: {value}\r\n");
    }
    match accept {
        Some(key) => {
            let _ = write!(
                out,
                "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {key}\r\n\r\n"
            );
        }
        None => {
            if !content_type {
                out.push_str("Content-Type: text/plain; charset=utf-8\r\n");
            }
            let _ = write!(
                out,
                "Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    }
    Bytes::from(out)
}

impl<S: Transport> AsyncRead for MessageTransport<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let start = buf.filled().len();
        loop {
            if buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            if this.header_at < HEADER_LEN {
                let rest = &this.header[this.header_at..];
                let n = rest.len().min(buf.remaining());
                buf.put_slice(&rest[..n]);
                this.header_at += n;
                continue;
            }
            if !this.unread.is_empty() {
                let n = this.unread.len().min(buf.remaining());
                buf.put_slice(&this.unread[..n]);
                this.unread.advance(n);
                return Poll::Ready(Ok(()));
            }
            // What this call put in `buf` (the header of an empty message) must be returned
            // now: polling for the next message may be `Pending`, which would lose it.
            if this.side.ended || buf.filled().len() > start {
                return Poll::Ready(Ok(()));
            }
            match this.phase {
                Phase::Awaiting | Phase::Answering { .. } | Phase::Refused => {
                    // Read to learn of a client that leaves (and to clear the socket's
                    // readiness): before the answer it may send nothing (RFC 6455 §4.1).
                    let mut probe = [0u8; 16];
                    let mut probe = ReadBuf::new(&mut probe);
                    ready!(Pin::new(this.side.ws.get_mut()).poll_read(cx, &mut probe))?;
                    this.side.ended = true;
                    this.side.close = None;
                    if probe.filled().is_empty() {
                        return Poll::Ready(Ok(()));
                    }
                    this.unanswered = (400, "data before the handshake's answer (RFC 6455 §4.1)");
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "client sent data before the upgrade was answered",
                    )));
                }
                Phase::Open | Phase::Closing => {}
            }
            match ready!(this.side.poll_message(cx))? {
                None => return Poll::Ready(Ok(())),
                // After the plugin's close, what the client still sends is dropped.
                Some(_) if this.phase == Phase::Closing => {}
                Some(Message::Text(text)) => this.deliver(KIND_TEXT, Bytes::from(text)),
                Some(Message::Binary(data)) => this.deliver(KIND_BINARY, data),
                Some(_) => {}
            }
        }
    }
}

impl<S: Transport> AsyncWrite for MessageTransport<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_accept(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.poll_accept(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_frames(cx))?;
        match self.phase {
            Phase::Open | Phase::Closing => ready!(self.side.poll_flush(cx))?,
            _ => ready!(Pin::new(self.side.ws.get_mut()).poll_flush(cx))?,
        }
        Poll::Ready(Ok(()))
    }

    /// Ends the connection the way its phase asks: an unanswered upgrade gets its
    /// `unanswered` response, an open WebSocket a close frame (1000, or the code of the
    /// breach; none if a close was sent or answered already).
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.phase == Phase::Awaiting {
            let (status, body) = self.unanswered;
            self.answer = http_answer(status, &[], &format!("{body}\n"), None);
            self.phase = Phase::Answering { upgrade: false };
        }
        match self.phase {
            Phase::Answering { .. } | Phase::Refused | Phase::Awaiting => {
                // Written, or the socket failed: either way the stream is done.
                let _ = ready!(self.poll_frames(cx));
                Pin::new(self.side.ws.get_mut()).poll_shutdown(cx)
            }
            Phase::Open | Phase::Closing => {
                let idled = self.idle.as_ref().is_some_and(|(a, _)| a.expired());
                if idled && self.side.close.is_some() {
                    // Jetty's close for its idle timeout, which Pulsar's WebSocket API uses.
                    self.side.close = Some(CloseCode::Away);
                    self.side.close_reason = "Idle Timeout";
                }
                self.side.poll_shutdown(cx)
            }
        }
    }
}

impl<S: Transport> Transport for MessageTransport<S> {
    fn tcp(&self) -> &TcpStream {
        self.side.tcp()
    }

    fn wants_write(&self) -> bool {
        self.side.wants_write()
    }
}

/// Ends a connection the connection task would keep: one whose plugin does not answer the
/// upgrade within [`ANSWER_DEADLINE`], an open one without a frame either way for its idle
/// timeout (`idle`, [`MessageTransport::idle`]; closed with 1001), or one that still lingers
/// [`CLOSE_GRACE`] after it started ending. Returns when the transport is gone.
pub async fn watchdog(
    stage: watch::Receiver<Stage>,
    shared: Arc<ConnShared>,
    idle: Option<(Arc<Activity>, Duration)>,
) {
    watch_stages(stage, shared, idle, ANSWER_DEADLINE, CLOSE_GRACE).await
}

/// Returns once the WebSocket went `timeout` without a frame (never without a timeout),
/// having marked it expired.
async fn idle_expiry(idle: Option<(Arc<Activity>, Duration)>) {
    let Some((activity, timeout)) = idle else {
        return std::future::pending().await;
    };
    loop {
        let at = activity.idle_at(timeout);
        if at <= tokio::time::Instant::now() {
            activity.expire();
            return;
        }
        tokio::time::sleep_until(at).await;
    }
}

async fn watch_stages(
    mut stage: watch::Receiver<Stage>,
    shared: Arc<ConnShared>,
    idle: Option<(Arc<Activity>, Duration)>,
    answer_deadline: Duration,
    close_grace: Duration,
) {
    let answered = tokio::time::timeout(answer_deadline, async {
        stage.wait_for(|s| *s != Stage::Awaiting).await.map(|_| ())
    })
    .await;
    match answered {
        Err(_) => {
            shared.close();
            return;
        }
        Ok(Err(_)) => return,
        Ok(Ok(())) => {}
    }
    let ending = async { stage.wait_for(|s| *s == Stage::Ending).await.map(|_| ()) };
    tokio::select! {
        ended = ending => {
            if ended.is_err() {
                return;
            }
        }
        () = idle_expiry(idle) => {
            shared.close();
            return;
        }
    }
    // `changed` fails once the transport is dropped: the connection ended by itself.
    if tokio::time::timeout(close_grace, stage.changed())
        .await
        .is_ok()
    {
        return;
    }
    shared.close();
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    const LIMIT: usize = 1024;
    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    /// A connected pair: the client's raw socket, the server's transport (the head read and
    /// its REQUEST frame made, as the web port does).
    async fn pair(target: &str) -> (TcpStream, MessageTransport<TcpStream>, Bytes) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (mut server, peer) = listener.accept().await.unwrap();
        let head = format!(
            "GET {target} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\nOrigin: http://o\r\n\r\n"
        );
        client.write_all(head.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let head = loop {
            let mut chunk = [0u8; 512];
            let n = server.read(&mut chunk).await.unwrap();
            buf.extend_from_slice(&chunk[..n]);
            if let Some((head, _)) = crate::web::parse_head(&buf).unwrap() {
                break head;
            }
        };
        let request = head.request_frame(peer);
        (
            client,
            MessageTransport::new(server, KEY, vec![], LIMIT, None).await,
            request,
        )
    }

    fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![kind];
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// A client frame, masked unless `mask` is false (RFC 6455 §5.2).
    fn client_frame(fin: bool, opcode: u8, payload: &[u8], mask: bool) -> Vec<u8> {
        let mut out = vec![(u8::from(fin) << 7) | opcode];
        let m = if mask { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => out.push(m | n as u8),
            n if n <= 0xffff => {
                out.push(m | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(m | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        let key = [0x12, 0x34, 0x56, 0x78];
        if mask {
            out.extend_from_slice(&key);
        }
        out.extend(
            payload
                .iter()
                .enumerate()
                .map(|(i, b)| if mask { b ^ key[i % 4] } else { *b }),
        );
        out
    }

    /// Reads a server frame (unmasked): opcode and payload.
    async fn server_frame(client: &mut TcpStream) -> (u8, Vec<u8>) {
        let mut h = [0u8; 2];
        client.read_exact(&mut h).await.unwrap();
        let len = match h[1] & 0x7f {
            126 => {
                let mut l = [0u8; 2];
                client.read_exact(&mut l).await.unwrap();
                u16::from_be_bytes(l) as usize
            }
            127 => {
                let mut l = [0u8; 8];
                client.read_exact(&mut l).await.unwrap();
                u64::from_be_bytes(l) as usize
            }
            n => n as usize,
        };
        let mut payload = vec![0u8; len];
        client.read_exact(&mut payload).await.unwrap();
        (h[0] & 0x0f, payload)
    }

    /// Reads the HTTP answer head (and body of a refusal, up to the close).
    async fn answer_text(client: &mut TcpStream) -> String {
        let mut buf = Vec::new();
        loop {
            let mut b = [0u8; 1];
            client.read_exact(&mut b).await.unwrap();
            buf.push(b[0]);
            if buf.ends_with(b"\r\n\r\n") {
                return String::from_utf8(buf).unwrap();
            }
        }
    }

    /// The server side reads one whole frame from the transport.
    async fn plugin_reads(t: &mut MessageTransport<TcpStream>) -> (u8, Vec<u8>) {
        let mut h = [0u8; HEADER_LEN];
        t.read_exact(&mut h).await.unwrap();
        let mut payload = vec![0u8; u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize];
        t.read_exact(&mut payload).await.unwrap();
        (h[0], payload)
    }

    async fn upgrade(client: &mut TcpStream, t: &mut MessageTransport<TcpStream>) {
        t.write_all(&frame(KIND_HTTP, br#"{"status":101}"#))
            .await
            .unwrap();
        t.flush().await.unwrap();
        let answer = answer_text(client).await;
        assert!(
            answer.starts_with("HTTP/1.1 101 Switching Protocols\r\n"),
            "{answer}"
        );
    }

    async fn close_code(client: &mut TcpStream) -> u16 {
        let (opcode, payload) = server_frame(client).await;
        assert_eq!(opcode, 0x8, "a close frame");
        u16::from_be_bytes([payload[0], payload[1]])
    }

    #[tokio::test]
    async fn the_upgrade_waits_for_the_plugins_101_and_messages_flow_both_ways() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let url = format!("ws://{addr}/ws/v2/producer/persistent/t/ns/a?token=x");
        let client = tokio::spawn(async move {
            use tokio_tungstenite::tungstenite::client::IntoClientRequest;
            let tcp = TcpStream::connect(addr).await.unwrap();
            let mut request = url.into_client_request().unwrap();
            request
                .headers_mut()
                .insert("sec-websocket-protocol", "o, p".parse().unwrap());
            let (mut ws, response) = tokio_tungstenite::client_async(request, tcp).await.unwrap();
            assert_eq!(
                response.headers()["sec-websocket-protocol"],
                "p",
                "the plugin's subprotocol"
            );
            let first = futures::StreamExt::next(&mut ws).await.unwrap().unwrap();
            assert_eq!(first, Message::Text("hello".into()));
            futures::SinkExt::send(&mut ws, Message::Text("".into()))
                .await
                .unwrap();
            futures::SinkExt::send(&mut ws, Message::Text("hi".into()))
                .await
                .unwrap();
            futures::SinkExt::send(&mut ws, Message::Binary(vec![1, 2, 3].into()))
                .await
                .unwrap();
            let closed = futures::StreamExt::next(&mut ws).await.unwrap().unwrap();
            let Message::Close(Some(frame)) = closed else {
                panic!("{closed:?}")
            };
            (u16::from(frame.code), frame.reason.to_string())
        });
        let (mut server, peer) = listener.accept().await.unwrap();
        let mut buf = Vec::new();
        let head = loop {
            let mut chunk = [0u8; 512];
            let n = server.read(&mut chunk).await.unwrap();
            buf.extend_from_slice(&chunk[..n]);
            if let Some((head, _)) = crate::web::parse_head(&buf).unwrap() {
                break head;
            }
        };
        let key = head.header("sec-websocket-key").unwrap().to_string();
        let request = head.request_frame(peer);
        let json: serde_json::Value = serde_json::from_slice(&request[HEADER_LEN..]).unwrap();
        assert_eq!(json["path"], "/ws/v2/producer/persistent/t/ns/a");
        assert_eq!(json["query"], "token=x");
        let offered = vec!["o".to_string(), "p".to_string()];
        let mut t = MessageTransport::new(server, &key, offered, LIMIT, None).await;
        // Nothing is answered before the plugin's RESPONSE.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!client.is_finished());
        // The RESPONSE and a first message, split mid-header and joined.
        let mut out = frame(
            KIND_HTTP,
            br#"{"status":101,"headers":[["sec-websocket-protocol","p"]]}"#,
        );
        out.extend(frame(KIND_TEXT, b"hello"));
        let (a, b) = out.split_at(3);
        t.write_all(a).await.unwrap();
        t.write_all(b).await.unwrap();
        t.flush().await.unwrap();
        // An empty message is a frame too (it used to vanish: Autobahn cases 1.1.1, 6.1.1).
        assert_eq!(plugin_reads(&mut t).await, (KIND_TEXT, Vec::new()));
        assert_eq!(plugin_reads(&mut t).await, (KIND_TEXT, b"hi".to_vec()));
        assert_eq!(plugin_reads(&mut t).await, (KIND_BINARY, vec![1, 2, 3]));
        let mut close = vec![0x0f, 0xa0];
        close.extend_from_slice(b"bye");
        t.write_all(&frame(KIND_CLOSE, &close)).await.unwrap();
        t.flush().await.unwrap();
        assert_eq!(client.await.unwrap(), (4000, "bye".to_string()));
    }

    #[tokio::test]
    async fn a_refusal_is_an_http_response_then_the_end() {
        let (mut client, mut t, _) = pair("/ws/v2/consumer/persistent/t/ns/a/s").await;
        t.write_all(&frame(
            KIND_HTTP,
            br#"{"status":404,"body":"Topic does not exist"}"#,
        ))
        .await
        .unwrap();
        let flushed = t.flush().await;
        assert_eq!(
            flushed.unwrap_err().kind(),
            io::ErrorKind::ConnectionAborted,
            "the connection task ends the connection"
        );
        let head = answer_text(&mut client).await;
        assert!(head.starts_with("HTTP/1.1 404 Not Found\r\n"), "{head}");
        assert!(head.contains("Content-Length: 20\r\n"), "{head}");
        let mut body = String::new();
        drop(t);
        client.read_to_string(&mut body).await.unwrap();
        assert_eq!(body, "Topic does not exist");
    }

    #[tokio::test]
    async fn an_unanswered_upgrade_gets_a_503() {
        let (mut client, mut t, _) = pair("/ws/x").await;
        t.shutdown().await.unwrap();
        let head = answer_text(&mut client).await;
        assert!(head.starts_with("HTTP/1.1 503 "), "{head}");
    }

    #[tokio::test]
    async fn a_message_before_the_response_is_the_plugins_breach() {
        let (mut client, mut t, _) = pair("/ws/x").await;
        t.write_all(&frame(KIND_TEXT, b"early")).await.unwrap();
        assert!(t.flush().await.is_err());
        let head = answer_text(&mut client).await;
        assert!(head.starts_with("HTTP/1.1 500 "), "{head}");
    }

    #[tokio::test]
    async fn a_plugin_breaking_the_envelope_after_the_upgrade_closes_with_1011() {
        let (mut client, mut t, _) = pair("/ws/x").await;
        upgrade(&mut client, &mut t).await;
        let _ = t.write_all(&[0x09, 0, 0, 0, 0]).await;
        assert!(t.flush().await.is_err(), "the connection ends");
        t.shutdown().await.unwrap();
        assert_eq!(close_code(&mut client).await, 1011);
    }

    #[tokio::test]
    async fn invalid_utf8_closes_with_1007() {
        let (mut client, mut t, _) = pair("/ws/x").await;
        upgrade(&mut client, &mut t).await;
        client
            .write_all(&client_frame(true, 0x1, &[0x68, 0xff, 0xfe], true))
            .await
            .unwrap();
        let mut buf = [0u8; 16];
        let err = t.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        t.shutdown().await.unwrap();
        assert_eq!(close_code(&mut client).await, 1007);
    }

    #[tokio::test]
    async fn a_message_over_the_limit_closes_with_1009() {
        let (mut client, mut t, _) = pair("/ws/x").await;
        upgrade(&mut client, &mut t).await;
        client
            .write_all(&client_frame(true, 0x2, &vec![7; LIMIT + 1], true))
            .await
            .unwrap();
        let mut buf = [0u8; 16];
        assert!(t.read(&mut buf).await.is_err());
        t.shutdown().await.unwrap();
        assert_eq!(close_code(&mut client).await, 1009);
    }

    #[tokio::test]
    async fn an_unmasked_client_frame_closes_with_1002() {
        let (mut client, mut t, _) = pair("/ws/x").await;
        upgrade(&mut client, &mut t).await;
        client
            .write_all(&client_frame(true, 0x2, b"abc", false))
            .await
            .unwrap();
        let mut buf = [0u8; 16];
        assert!(t.read(&mut buf).await.is_err());
        t.shutdown().await.unwrap();
        assert_eq!(close_code(&mut client).await, 1002);
    }

    #[tokio::test]
    async fn fragments_are_reassembled_and_pings_answered_between_them() {
        let (mut client, mut t, _) = pair("/ws/x").await;
        upgrade(&mut client, &mut t).await;
        let mut bytes = client_frame(false, 0x1, "h\u{e9}".as_bytes(), true);
        bytes.extend(client_frame(true, 0x9, b"ping!", true));
        bytes.extend(client_frame(false, 0x0, b"ll", true));
        bytes.extend(client_frame(true, 0x0, b"o", true));
        client.write_all(&bytes).await.unwrap();
        assert_eq!(
            plugin_reads(&mut t).await,
            (KIND_TEXT, "h\u{e9}llo".as_bytes().to_vec())
        );
        assert!(t.wants_write(), "the pong waits for a flush");
        t.flush().await.unwrap();
        assert_eq!(server_frame(&mut client).await, (0xa, b"ping!".to_vec()));
    }

    #[tokio::test]
    async fn a_client_close_is_echoed_and_ends_the_stream() {
        let (mut client, mut t, _) = pair("/ws/x").await;
        upgrade(&mut client, &mut t).await;
        let mut close = 4001u16.to_be_bytes().to_vec();
        close.extend_from_slice(b"done");
        client
            .write_all(&client_frame(true, 0x8, &close, true))
            .await
            .unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(t.read(&mut buf).await.unwrap(), 0, "end of stream");
        t.flush().await.unwrap();
        assert_eq!(close_code(&mut client).await, 4001);
    }

    #[tokio::test]
    async fn data_before_the_answer_is_refused_with_400() {
        let (mut client, mut t, _) = pair("/ws/x").await;
        client
            .write_all(&client_frame(true, 0x1, b"too soon", true))
            .await
            .unwrap();
        let mut buf = [0u8; 16];
        assert!(t.read(&mut buf).await.is_err());
        t.shutdown().await.unwrap();
        let head = answer_text(&mut client).await;
        assert!(head.starts_with("HTTP/1.1 400 "), "{head}");
    }

    #[tokio::test]
    async fn the_watchdog_ends_unanswered_and_lingering_connections_only() {
        let short = Duration::from_millis(50);
        let run = |stage: watch::Receiver<Stage>| {
            let shared = Arc::new(ConnShared::default());
            let watched = tokio::spawn(watch_stages(stage, shared.clone(), None, short, short));
            (shared, watched)
        };
        // Never answered: closed at the deadline.
        let stage = watch::Sender::new(Stage::Awaiting);
        let (shared, watched) = run(stage.subscribe());
        watched.await.unwrap();
        assert!(shared.is_closing());
        // Answered and open: left alone.
        let stage = watch::Sender::new(Stage::Awaiting);
        let (shared, watched) = run(stage.subscribe());
        stage.send_replace(Stage::Open);
        tokio::time::sleep(short * 3).await;
        assert!(!shared.is_closing() && !watched.is_finished());
        // Ending, and the transport gone in time: nothing to do.
        stage.send_replace(Stage::Ending);
        drop(stage);
        watched.await.unwrap();
        assert!(!shared.is_closing());
        // Ending, and the client keeps the socket: closed after the grace.
        let stage = watch::Sender::new(Stage::Open);
        let (shared, watched) = run(stage.subscribe());
        stage.send_replace(Stage::Ending);
        watched.await.unwrap();
        assert!(shared.is_closing());
    }

    #[tokio::test]
    async fn the_watchdog_ends_an_open_websocket_idle_for_its_timeout() {
        let timeout = Duration::from_millis(1000);
        let activity = Arc::new(Activity::new());
        let stage = watch::Sender::new(Stage::Open);
        let shared = Arc::new(ConnShared::default());
        let watched = tokio::spawn(watch_stages(
            stage.subscribe(),
            shared.clone(),
            Some((activity.clone(), timeout)),
            Duration::from_secs(10),
            Duration::from_secs(5),
        ));
        // A frame every 100 ms keeps it open well past the timeout.
        for _ in 0..25 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            activity.touch();
        }
        assert!(!shared.is_closing() && !activity.expired());
        // Then nothing: closed, and not before a whole timeout since the last frame.
        let last = tokio::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(10), watched)
            .await
            .unwrap()
            .unwrap();
        assert!(last.elapsed() >= timeout - Duration::from_millis(5));
        assert!(shared.is_closing() && activity.expired());
    }

    #[tokio::test]
    async fn an_idle_websocket_is_closed_with_1001_and_pings_count_as_activity() {
        let (mut client, t, _) = pair("/ws/x").await;
        let mut t = MessageTransport {
            idle: Some((Arc::new(Activity::new()), Duration::ZERO)),
            ..t
        };
        t.side.activity = t.idle.as_ref().map(|(a, _)| a.clone());
        upgrade(&mut client, &mut t).await;
        let (activity, _) = t.idle().unwrap();
        let before = activity.idle_at(Duration::ZERO);
        tokio::time::sleep(Duration::from_millis(20)).await;
        client
            .write_all(&client_frame(true, 0x9, b"p", true))
            .await
            .unwrap();
        client
            .write_all(&client_frame(true, 0x1, b"m", true))
            .await
            .unwrap();
        assert_eq!(plugin_reads(&mut t).await, (KIND_TEXT, b"m".to_vec()));
        assert!(activity.idle_at(Duration::ZERO) > before);
        activity.expire();
        t.shutdown().await.unwrap();
        // The pong, then the close: 1001 "Idle Timeout".
        assert_eq!(server_frame(&mut client).await, (0xA, b"p".to_vec()));
        let (op, payload) = server_frame(&mut client).await;
        assert_eq!((op, &payload[..2]), (0x8, &1001u16.to_be_bytes()[..]));
        assert_eq!(&payload[2..], b"Idle Timeout");
    }

    #[test]
    fn answers_keep_the_hosts_headers_and_drop_injected_ones() {
        let headers = vec![
            ("sec-websocket-protocol".to_string(), "p".to_string()),
            ("connection".to_string(), "keep-alive".to_string()),
            ("x-evil".to_string(), "a\r\nSet-Cookie: x".to_string()),
        ];
        let a = http_answer(101, &headers, "", Some("acc"));
        let a = std::str::from_utf8(&a).unwrap();
        assert_eq!(
            a,
            "HTTP/1.1 101 Switching Protocols\r\nsec-websocket-protocol: p\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Accept: acc\r\n\r\n"
        );
        let r = http_answer(102, &[], "x", None);
        assert!(
            r.starts_with(b"HTTP/1.1 500 "),
            "no informational final answer"
        );
        let closes = [
            (close_frame(&[0x03, 0xed]), 1011),
            (close_frame(&[0x0f, 0xa0, b'o', b'k']), 4000),
            (close_frame(&[]), 1000),
        ];
        for (frame, code) in closes {
            assert_eq!(u16::from(frame.code), code);
        }
        let long = close_frame(&[&[0x03, 0xe8][..], "é".repeat(100).as_bytes()].concat());
        assert!(long.reason.len() <= MAX_CLOSE_REASON);
    }
}
