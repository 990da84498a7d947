//! One client connection: its socket task, its output queue, and its backpressure.
//!
//! The host owns the socket; the plugin only sees bytes. One task serves a connection and owns
//! its stream, plain TCP or TLS over TCP ([`Transport`]):
//! - reads are readiness-based: the task waits for the TCP socket to become readable while
//!   holding no buffer, then reads into a fresh buffer that leaves with the bytes as an event
//!   (a `Bytes`, no copy). An idle connection therefore holds no read buffer — what keeps
//!   10,000 idle TLS connections at a few KiB each. While the connection is congested — its
//!   output queue over [`HIGH_WATER`] bytes (a slow reader on the other end) or its plugin
//!   busy with backend operations (see [`ConnShared::input_open`]) — it does not read, so one
//!   slow client holds back only itself;
//! - writes drain the output queue: the chunks the plugin passed to `send` (each already an
//!   owned host buffer) go out together in one vectored write — over TLS, one record for many
//!   small packets — and a full socket is waited on by readiness, never by blocking reads.
//!
//! [`ConnShared`] is what the worker thread and the task share; its locks are never held
//! across an `.await`.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use bytes::{Buf, Bytes, BytesMut};
use futures::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest, Ready};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::plugin_host::{Event, WorkerHandle};

/// Output bytes queued above which the connection stops reading and its deliveries wait.
pub const HIGH_WATER: usize = 1 << 20;
/// Backend operations in flight above which the connection stops reading.
pub const MAX_INFLIGHT: usize = 1024;
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

/// State shared by a connection's tasks and its plugin worker.
#[derive(Default)]
pub struct ConnShared {
    out: Mutex<VecDeque<Bytes>>,
    queued: AtomicUsize,
    inflight: AtomicUsize,
    /// The most backend operations this connection ever had in flight.
    inflight_peak: AtomicUsize,
    /// Bytes read and handed to the worker that the plugin has not been given yet.
    unconsumed: AtomicUsize,
    /// The plugin said whether to read (`set-reading`): then its word, not the guess of
    /// [`input_open`], decides.
    reading_explicit: AtomicBool,
    /// The plugin's last `set-reading`.
    reading: AtomicBool,
    /// Wakes the writer.
    out_ready: Notify,
    /// Wakes whoever waits for the connection to be uncongested.
    relieved: Notify,
    /// Cancelled when the connection is closing (by the plugin, the peer or the host).
    closing: CancellationToken,
}

impl ConnShared {
    /// Queues bytes for the socket; ignored once the connection is closing.
    pub fn send(&self, data: Bytes) {
        if self.closing.is_cancelled() || data.is_empty() {
            return;
        }
        self.queued.fetch_add(data.len(), Ordering::Relaxed);
        self.out
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(data);
        self.out_ready.notify_one();
    }

    /// Flushes what is queued, then closes.
    pub fn close(&self) {
        self.closing.cancel();
        self.out_ready.notify_one();
        self.relieved.notify_waiters();
    }

    pub fn is_closing(&self) -> bool {
        self.closing.is_cancelled()
    }

    /// Resolves once the connection is closing.
    pub async fn closed(&self) {
        self.closing.cancelled().await
    }

    /// A backend operation started.
    pub fn op_started(&self) {
        let now = self.inflight.fetch_add(1, Ordering::Relaxed) + 1;
        self.inflight_peak.fetch_max(now, Ordering::Relaxed);
    }

    /// A backend operation finished.
    pub fn op_finished(&self) {
        let before = self.inflight.fetch_sub(1, Ordering::Relaxed);
        let peak = self.inflight_peak.load(Ordering::Relaxed);
        let explicit = self.reading_explicit.load(Ordering::Relaxed);
        let reopened = if explicit {
            before == MAX_INFLIGHT + 1
        } else {
            !input_open(before, peak) && input_open(before.saturating_sub(1), peak)
        };
        if reopened {
            self.relieved.notify_waiters();
        }
    }

    /// The plugin's `set-reading`.
    pub fn set_reading(&self, reading: bool) {
        self.reading_explicit.store(true, Ordering::Relaxed);
        if !self.reading.swap(reading, Ordering::Relaxed) && reading {
            self.relieved.notify_waiters();
        }
    }

    /// The plugin was given `n` bytes read from the socket (and started what they asked for).
    pub fn input_consumed(&self, n: usize) {
        if self.unconsumed.fetch_sub(n, Ordering::Relaxed) == n {
            self.relieved.notify_waiters();
        }
    }

    /// Whether the output queue is too full to add more deliveries.
    pub fn output_congested(&self) -> bool {
        self.queued.load(Ordering::Relaxed) > HIGH_WATER
    }

    /// Whether the connection must not read now: its output is congested, its last bytes
    /// have not reached the plugin yet, or the plugin is busy (see [`input_open`]).
    fn congested(&self) -> bool {
        let inflight = self.inflight.load(Ordering::Relaxed);
        let plugin_busy = if self.reading_explicit.load(Ordering::Relaxed) {
            !self.reading.load(Ordering::Relaxed) || inflight > MAX_INFLIGHT
        } else {
            !input_open(inflight, self.inflight_peak.load(Ordering::Relaxed))
        };
        self.output_congested() || self.unconsumed.load(Ordering::Relaxed) > 0 || plugin_busy
    }

    /// Waits until the output queue has drained below the high-water mark.
    pub async fn output_relieved(&self) {
        self.wait_while(|s| s.output_congested()).await
    }

    async fn wait_while(&self, busy: impl Fn(&Self) -> bool) {
        loop {
            let notified = self.relieved.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !busy(self) || self.is_closing() {
                return;
            }
            notified.await;
        }
    }

    /// Moves the queued output to `into` (empty on entry), keeping the allocations apart.
    fn take_output(&self, into: &mut VecDeque<Bytes>) {
        std::mem::swap(
            &mut *self.out.lock().unwrap_or_else(|p| p.into_inner()),
            into,
        );
    }

    /// `n` queued bytes reached the socket.
    fn wrote(&self, n: usize) {
        let before = self.queued.fetch_sub(n, Ordering::Relaxed);
        if before > HIGH_WATER && before - n <= HIGH_WATER {
            self.relieved.notify_waiters();
        }
    }
}

/// Whether a connection with `inflight` backend operations in flight, and at most `peak` ever,
/// may read more input for its plugin.
///
/// A plugin stops decoding input while it has as many operations in flight as its protocol
/// allows (MQTT's `max_inflight`), and keeps what it was handed meanwhile in its own buffer,
/// which the host cannot see. It can see the operations, though: while that buffer holds
/// complete requests, the plugin starts one for every one that finishes, so the count stays at
/// the plugin's cap, which is at least `peak`. Reading only while fewer than half of `peak` are
/// in flight therefore hands new bytes to a plugin whose buffer has drained, and the backend's
/// pace reaches the client's socket instead of piling up inside the plugin (until it gives
/// up on the client). [`MAX_INFLIGHT`] bounds plugins without a cap of their own.
fn input_open(inflight: usize, peak: usize) -> bool {
    inflight == 0 || (inflight <= MAX_INFLIGHT && inflight * 2 < peak)
}

/// What woke the connection task.
enum Wake {
    Closing,
    Output,
    Socket(std::io::Result<Ready>),
    ReadAgain,
    Relieved,
}

/// Serves one accepted connection until either side ends it, then tells the worker.
pub async fn run<S: Transport>(
    mut stream: S,
    conn: u64,
    shared: std::sync::Arc<ConnShared>,
    worker: WorkerHandle,
) {
    // Output taken from the shared queue and not yet accepted by the socket.
    let mut pending: VecDeque<Bytes> = VecDeque::new();
    let mut flushed = true;
    // The last read filled its buffer: more may be buffered (by TLS) without the socket
    // becoming readable again.
    let mut read_again = false;
    let reason = 'conn: loop {
        let relieved = shared.relieved.notified();
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
            _ = shared.out_ready.notified() => Wake::Output,
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
                // Deliver what came before the error; the next read reports it.
                Some(Err(_)) => break,
            }
        }
        if !buf.is_empty() {
            let n = buf.len();
            // No more reading until the plugin had these (and started what they ask).
            shared.unconsumed.fetch_add(n, Ordering::Relaxed);
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
