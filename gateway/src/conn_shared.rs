//! What a connection's socket task and its plugin worker share: the output queue, the
//! counters that decide whether the socket is read (backpressure), and the closing signal.
//!
//! The socket task (`connection`) drains the output queue and reads only while the
//! connection is not congested; the worker's host calls (`host::conn`) queue output, count
//! backend operations and say whether the plugin wants more input. Its locks are never held
//! across an `.await`, and nothing here does I/O.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use bytes::Bytes;
use tokio::sync::futures::Notified;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Output bytes queued above which the connection stops reading and its deliveries wait.
pub const HIGH_WATER: usize = 1 << 20;
/// Backend operations in flight above which the connection stops reading.
pub const MAX_INFLIGHT: usize = 1024;
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

    /// `n` bytes were read from the socket and handed to the worker: no more reading until
    /// the plugin had them ([`ConnShared::input_consumed`]).
    pub fn input_read(&self, n: usize) {
        self.unconsumed.fetch_add(n, Ordering::Relaxed);
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
    pub fn congested(&self) -> bool {
        let inflight = self.inflight.load(Ordering::Relaxed);
        let plugin_busy = if self.reading_explicit.load(Ordering::Relaxed) {
            !self.reading.load(Ordering::Relaxed) || inflight > MAX_INFLIGHT
        } else {
            !input_open(inflight, self.inflight_peak.load(Ordering::Relaxed))
        };
        self.output_congested() || self.unconsumed.load(Ordering::Relaxed) > 0 || plugin_busy
    }

    /// Resolves when the connection may have become uncongested (enable it before checking
    /// [`ConnShared::congested`], so that no wake-up is lost in between).
    pub fn relieved(&self) -> Notified<'_> {
        self.relieved.notified()
    }

    /// Resolves when output was queued (or the connection is closing).
    pub fn output_ready(&self) -> Notified<'_> {
        self.out_ready.notified()
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
    pub fn take_output(&self, into: &mut VecDeque<Bytes>) {
        std::mem::swap(
            &mut *self.out.lock().unwrap_or_else(|p| p.into_inner()),
            into,
        );
    }

    /// `n` queued bytes reached the socket.
    pub fn wrote(&self, n: usize) {
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
