//! The timer task of an instance: it sleeps until the soonest deadline of its [`TimerHeap`]
//! and hands the plugin `on-timer` events. Started by the instance's first `set-timer`, it
//! ends with the instance (when the sending side is dropped).

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::event::Event;
use super::timer_heap::TimerHeap;
use crate::conn_shared::ConnShared;

/// A plugin timer (`set-timer`), due at `at`.
pub(super) struct Timer {
    pub(super) at: Instant,
    pub(super) conn: u64,
    pub(super) token: u64,
    pub(super) shared: Arc<ConnShared>,
}

/// Fires the timers of one instance. A timer of a closing connection is dropped.
pub(super) async fn run_timers(
    mut rx: mpsc::UnboundedReceiver<Timer>,
    events: mpsc::Sender<Event>,
) {
    let mut heap = TimerHeap::default();
    loop {
        let next = heap.next_deadline();
        tokio::select! {
            timer = rx.recv() => {
                let Some(timer) = timer else { return };
                heap.arm(timer.at, timer);
            }
            () = tokio::time::sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {
                let now = Instant::now();
                while let Some(t) = heap.pop_due(now) {
                    if !t.shared.is_closing() {
                        let _ = events.send(Event::Timer { conn: t.conn, token: t.token }).await;
                    }
                }
            }
        }
    }
}
