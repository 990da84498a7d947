//! One client connection: its socket task, its output queue, and its backpressure.
//!
//! The host owns the socket; the plugin only sees bytes. One task serves a connection and owns
//! its stream, plain TCP or TLS over TCP ([`Transport`]):
//! - reads are readiness-based: the task waits for the TCP socket to become readable while
//!   holding no buffer, then reads into a fresh buffer that leaves with the bytes as an event
//!   (a `Bytes`, no copy). An idle connection therefore holds no read buffer — what keeps
//!   10,000 idle TLS connections at a few KiB each. While the connection is congested — its
//!   output queue over [`HIGH_WATER`](crate::conn_shared::HIGH_WATER) bytes (a slow reader on the other end) or its plugin
//!   busy with backend operations (see [`crate::conn_shared`]) — it does not read, so one
//!   slow client holds back only itself;
//! - writes drain the output queue: the chunks the plugin passed to `send` (each already an
//!   owned host buffer) go out together in one vectored write — over TLS, one record for many
//!   small packets — and a full socket is waited on by readiness, never by blocking reads.
//!
//! [`ConnShared`] (in `conn_shared`) is what the worker thread and the task share.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use futures::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest, Ready};
use tokio::net::TcpStream;

use crate::abi::types::ConnInfo;
use crate::conn_shared::ConnShared;
use crate::host::Event;
use crate::plugin_host::WorkerHandle;

/// Size of one socket read (the buffer exists only while bytes are being read, and then
/// until the plugin has taken them; its pages become resident only as bytes arrive).
///
/// Each read is one event to the plugin, and the connection reads again only once the plugin
/// has taken it ([`ConnShared::input_consumed`]). With 32 KiB a client streaming 1 KiB
/// messages cost a plugin hand-off (two thread wake-ups) per 32 messages; 256 KiB raised
/// QoS 0 1 KiB throughput by 10% (three alternating rounds). 1 MiB was slower again, and a
/// buffer that grew from 32 KiB while reads filled it gained only half as much.
const READ_CHUNK: usize = 256 * 1024;
/// Most output chunks given to one vectored write.
const MAX_IOV: usize = 64;
/// Time the gateway gives a closing connection to flush what the plugin queued.
const FLUSH_ON_CLOSE: std::time::Duration = std::time::Duration::from_secs(5);

/// A stream a connection task can wait on by readiness: plain TCP, or TLS over TCP.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// The TCP socket underneath.
    fn tcp(&self) -> &TcpStream;

    /// Whether the stream holds bytes of its own to write (TLS: an answer to a record read,
    /// such as a key update), to be flushed even when the plugin sends nothing.
    fn wants_write(&self) -> bool {
        false
    }
}

impl Transport for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
}

impl Transport for tokio_rustls::server::TlsStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }

    fn wants_write(&self) -> bool {
        self.get_ref().1.wants_write()
    }
}

/// What woke the connection task.
enum Wake {
    Closing,
    Output,
    Socket(std::io::Result<Ready>),
    ReadAgain,
    Relieved,
}

/// Size of the read of the first bytes (a CONNECT is small; a read that fills it is
/// followed at once by the usual [`READ_CHUNK`] reads).
const FIRST_READ: usize = 4096;

/// A connection about to be opened in its plugin.
pub struct Opening {
    pub conn: u64,
    pub info: ConnInfo,
    /// Common name of the client certificate the TLS handshake verified (mTLS).
    pub client_cert: Option<String>,
    pub shared: Arc<ConnShared>,
    /// Bytes the host produced itself, for the plugin before any from the socket (a web
    /// port's request).
    pub first: Option<Bytes>,
}

/// Opens the connection in its plugin, with its first bytes in the same event when they
/// are in already, then serves it until either side ends it and tells the worker.
pub async fn open_and_run<S: Transport>(mut stream: S, opening: Opening, worker: WorkerHandle) {
    let Opening {
        conn,
        info,
        client_cert,
        shared,
        first,
    } = opening;
    let first = match first {
        Some(f) => Some(f),
        None => first_bytes(&mut stream).await,
    };
    if let Some(f) = &first {
        shared.input_read(f.len());
    }
    let open = Event::Open {
        conn,
        info,
        client_cert,
        shared: shared.clone(),
        first,
    };
    if worker.send(open).await.is_err() {
        return;
    }
    run(stream, conn, shared, worker).await
}

/// The client's first bytes if the stream has them at once: a TLS stream often does (a
/// client sends its first packet with its handshake's last message, and the handshake's
/// read took both). Nothing is waited for: a wait of 2 ms for a plain socket's first bytes
/// saved thread switches but no measurable CPU in a storm, and would delay a protocol where
/// the server speaks first (docs/performance-log.md, 2026-12-06 16:38-17:44).
async fn first_bytes<S: Transport>(stream: &mut S) -> Option<Bytes> {
    let mut buf = BytesMut::with_capacity(FIRST_READ);
    match stream.read_buf(&mut buf).now_or_never() {
        Some(Ok(n)) if n > 0 => Some(buf.freeze()),
        // Nothing yet, the end, or an error: the connection's own reads find out.
        _ => None,
    }
}

/// Serves one opened connection until either side ends it, then tells the worker.
async fn run<S: Transport>(
    mut stream: S,
    conn: u64,
    shared: std::sync::Arc<ConnShared>,
    worker: WorkerHandle,
) {
    // Output taken from the shared queue and not yet accepted by the socket.
    let mut pending: VecDeque<Bytes> = VecDeque::new();
    let mut flushed = true;
    // Bytes may be buffered in the stream without the socket becoming readable again: after
    // a read that filled its buffer, and at the start, when the handshake (TLS, WebSocket)
    // read the client's first bytes along with its last handshake message. A TLS 1.3 client
    // sends its Finished and its first packet (an MQTT CONNECT) back to back; a server slow
    // to read (a reconnect storm) gets both in one read, and waiting for readiness then
    // waited for bytes the client had sent, until the plugin's CONNECT timeout closed it.
    let mut read_again = true;
    let reason = 'conn: loop {
        let relieved = shared.relieved();
        tokio::pin!(relieved);
        relieved.as_mut().enable();
        let reading = !shared.congested();
        let mut interest = None;
        if reading && !read_again {
            interest = Some(Interest::READABLE);
        }
        if !flushed {
            interest = Some(interest.map_or(Interest::WRITABLE, |i| i | Interest::WRITABLE));
        }
        let wake = tokio::select! {
            biased;
            _ = shared.closed() => Wake::Closing,
            _ = shared.output_ready() => Wake::Output,
            ready = ready(stream.tcp(), interest) => Wake::Socket(ready),
            _ = std::future::ready(()), if reading && read_again => Wake::ReadAgain,
            _ = relieved, if !reading => Wake::Relieved,
        };
        let readable = match wake {
            Wake::Closing => break "closed by the gateway".to_string(),
            Wake::Output | Wake::Relieved => false,
            Wake::ReadAgain => true,
            Wake::Socket(Err(e)) => break format!("socket error: {e}"),
            Wake::Socket(Ok(r)) => r.is_readable() || r.is_read_closed(),
        };
        match write_ready(&mut stream, &mut pending, &shared) {
            Ok(done) => flushed = done,
            Err(e) => break format!("write error: {e}"),
        }
        if !(readable && reading) {
            continue;
        }
        // Read until the stream would block or the buffer is full: a TLS stream hands out one
        // decrypted record per read, and records it already holds never make the socket
        // readable again.
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        let mut eof = false;
        read_again = false;
        while buf.len() < READ_CHUNK {
            match stream.read_buf(&mut buf).now_or_never() {
                // Not readable after all (or TLS wants more of a record): wait for readiness.
                None => break,
                Some(Ok(0)) => {
                    eof = true;
                    break;
                }
                Some(Ok(_)) => read_again = buf.len() >= READ_CHUNK,
                Some(Err(e)) if buf.is_empty() => break 'conn format!("read error: {e}"),
                // Deliver what came before the error; the next read reports it, as soon as
                // the plugin had these bytes (not when the socket is next readable: the bad
                // bytes are already read, and a peer that broke the protocol, e.g. a
                // WebSocket frame with reserved bits, may send nothing more while it waits
                // for the close RFC 6455 owes it).
                Some(Err(_)) => {
                    read_again = true;
                    break;
                }
            }
        }
        if !buf.is_empty() {
            let n = buf.len();
            // No more reading until the plugin had these (and started what they ask).
            shared.input_read(n);
            let event = Event::Data {
                conn,
                data: buf.freeze(),
                shared: shared.clone(),
            };
            if worker.send(event).await.is_err() {
                break "plugin worker stopped".to_string();
            }
        } else if eof {
            break "closed by the peer".to_string();
        }
        // Reading may have queued TLS records of the stream's own (never a spin: with the
        // socket full, the write clears its readiness and the task waits to be writable).
        if stream.wants_write() {
            flushed = false;
        }
    };
    shared.close();
    // Flush what the plugin queued (e.g. a final error packet), within bounds.
    let _ = tokio::time::timeout(
        FLUSH_ON_CLOSE,
        flush_and_shutdown(&mut stream, &mut pending, &shared),
    )
    .await;
    tracing::debug!(conn, %reason, "connection ended");
    let _ = worker.send(Event::Closed { conn }).await;
}

/// Waits until the socket is ready for `interest`; never, without one.
async fn ready(tcp: &TcpStream, interest: Option<Interest>) -> std::io::Result<Ready> {
    match interest {
        Some(i) => tcp.ready(i).await,
        None => std::future::pending().await,
    }
}

/// Writes queued output until it is all written and flushed (`Ok(true)`) or the socket
/// would block (`Ok(false)`; the caller waits for it to be writable).
fn write_ready<S: Transport>(
    stream: &mut S,
    pending: &mut VecDeque<Bytes>,
    shared: &ConnShared,
) -> std::io::Result<bool> {
    loop {
        if pending.is_empty() {
            shared.take_output(pending);
        }
        if pending.is_empty() {
            return match stream.flush().now_or_never() {
                None => Ok(false),
                Some(r) => r.map(|()| true),
            };
        }
        let mut slices = [IoSlice::new(&[]); MAX_IOV];
        let count = pending.len().min(MAX_IOV);
        for (slot, chunk) in slices.iter_mut().zip(pending.iter()) {
            *slot = IoSlice::new(chunk);
        }
        let written = match stream.write_vectored(&slices[..count]).now_or_never() {
            None => return Ok(false),
            Some(Ok(0)) => return Err(std::io::ErrorKind::WriteZero.into()),
            Some(r) => r?,
        };
        shared.wrote(written);
        let mut left = written;
        while left > 0 {
            let Some(front) = pending.front_mut() else {
                break;
            };
            if front.len() <= left {
                left -= front.len();
                pending.pop_front();
            } else {
                front.advance(left);
                left = 0;
            }
        }
    }
}

async fn flush_and_shutdown<S: Transport>(
    stream: &mut S,
    pending: &mut VecDeque<Bytes>,
    shared: &ConnShared,
) -> std::io::Result<()> {
    loop {
        if pending.is_empty() {
            shared.take_output(pending);
        }
        let Some(chunk) = pending.pop_front() else {
            break;
        };
        stream.write_all(&chunk).await?;
        shared.wrote(chunk.len());
    }
    stream.flush().await?;
    stream.shutdown().await
}
