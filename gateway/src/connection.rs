//! One client connection: its socket tasks, its output queue, and its backpressure.
//!
//! The host owns the socket; the plugin only sees bytes. A connection is two halves:
//! - the reader reads into a fresh buffer, hands the bytes to the connection's plugin worker
//!   as an event (a `Bytes`, no copy), and waits before the next read while the connection is
//!   congested — its output queue over [`HIGH_WATER`] bytes (a slow reader on the other end)
//!   or too many backend operations in flight — so one slow client holds back only itself;
//! - the writer drains the output queue: chunks the plugin passed to `send`, each already an
//!   owned host buffer, written without another copy.
//!
//! [`ConnShared`] is what the worker thread and the tasks share; its locks are never held
//! across an `.await`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::plugin_host::{Event, WorkerHandle};

/// Output bytes queued above which the connection stops reading and its deliveries wait.
pub const HIGH_WATER: usize = 1 << 20;
/// Backend operations in flight above which the connection stops reading.
pub const MAX_INFLIGHT: usize = 1024;
/// Size of one socket read.
const READ_CHUNK: usize = 8 * 1024;

/// State shared by a connection's tasks and its plugin worker.
#[derive(Default)]
pub struct ConnShared {
    out: Mutex<VecDeque<Bytes>>,
    queued: AtomicUsize,
    inflight: AtomicUsize,
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
        self.inflight.fetch_add(1, Ordering::Relaxed);
    }

    /// A backend operation finished.
    pub fn op_finished(&self) {
        let before = self.inflight.fetch_sub(1, Ordering::Relaxed);
        if before == MAX_INFLIGHT + 1 || before <= 1 {
            self.relieved.notify_waiters();
        }
    }

    /// Whether the output queue is too full to add more deliveries.
    pub fn output_congested(&self) -> bool {
        self.queued.load(Ordering::Relaxed) > HIGH_WATER
    }

    fn congested(&self) -> bool {
        self.output_congested() || self.inflight.load(Ordering::Relaxed) > MAX_INFLIGHT
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

    fn take_output(&self) -> VecDeque<Bytes> {
        std::mem::take(&mut *self.out.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// Serves one accepted connection until either side ends it, then tells the worker.
pub async fn run<S>(stream: S, conn: u64, shared: std::sync::Arc<ConnShared>, worker: WorkerHandle)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut rd, wr) = tokio::io::split(stream);
    let writer = tokio::spawn(write_loop(wr, shared.clone()));
    let reason = loop {
        shared.wait_while(|s| s.congested()).await;
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        let read = tokio::select! {
            r = rd.read_buf(&mut buf) => r,
            _ = shared.closed() => break "closed by the gateway".to_string(),
        };
        match read {
            Ok(0) => break "closed by the peer".to_string(),
            Ok(_) => {
                if worker
                    .send(Event::Data {
                        conn,
                        data: buf.freeze(),
                    })
                    .await
                    .is_err()
                {
                    break "plugin worker stopped".to_string();
                }
            }
            Err(e) => break format!("read error: {e}"),
        }
    };
    shared.close();
    // The writer flushes what the plugin queued (e.g. a final error packet), within bounds.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), writer).await;
    tracing::debug!(conn, %reason, "connection ended");
    let _ = worker.send(Event::Closed { conn }).await;
}

async fn write_loop<W: AsyncWrite>(wr: W, shared: std::sync::Arc<ConnShared>) {
    tokio::pin!(wr);
    loop {
        let chunks = shared.take_output();
        if chunks.is_empty() {
            if shared.is_closing() {
                break;
            }
            shared.out_ready.notified().await;
            continue;
        }
        let mut written = 0;
        for chunk in chunks {
            written += chunk.len();
            if wr.write_all(&chunk).await.is_err() {
                shared.close();
                return;
            }
        }
        if wr.flush().await.is_err() {
            shared.close();
            return;
        }
        let before = shared.queued.fetch_sub(written, Ordering::Relaxed);
        if before > HIGH_WATER && before - written <= HIGH_WATER {
            shared.relieved.notify_waiters();
        }
    }
    let _ = wr.shutdown().await;
}
