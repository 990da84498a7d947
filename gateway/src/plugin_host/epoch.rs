//! The epoch ticker: the clock that plugin calls' CPU deadlines are counted in.
//!
//! wasmtime traps a call once the engine's epoch passes the store's deadline, so something
//! must advance the epoch while a call runs. A thread that ticked every [`EPOCH_TICK`] for the
//! gateway's whole life did, at 100 wake-ups a second even with no plugin call in sight (an
//! idle gateway, the gaps between a storm's events). This one ticks only while a call runs:
//! a worker marks each call with [`EpochTicker::call`], and the ticker parks when no call is
//! marked, to be unparked by the next one.
//!
//! Guarantee kept: a call that runs for its deadline's worth of ticks is trapped, as before
//! (the first tick comes at most one [`EPOCH_TICK`] after the call starts, as before: the
//! ticker was mid-sleep then too). Not a goal: ticking in step with anything else; nothing but
//! deadlines reads the epoch.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::Thread;
use std::time::Duration;

use anyhow::Context;
use wasmtime::Engine;

/// How often the epoch advances while a call runs; deadlines are counted in these ticks.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// What the ticker thread and the workers share.
#[derive(Default)]
struct Shared {
    /// Plugin calls running now, on all workers.
    calls: AtomicUsize,
    /// Set when the last handle is gone: the thread ends.
    stopped: AtomicBool,
    /// Ticks so far (tests look at it).
    ticks: AtomicU64,
}

/// The handle to the ticker thread; the thread ends when the handle is dropped.
pub struct EpochTicker {
    shared: Arc<Shared>,
    thread: Thread,
}

impl EpochTicker {
    /// Starts the ticker thread ("magnetar-epoch") for `engine`.
    pub fn start(engine: &Engine) -> anyhow::Result<EpochTicker> {
        let shared = Arc::new(Shared::default());
        let engine = engine.weak();
        let ticking = shared.clone();
        let handle = std::thread::Builder::new()
            .name("magnetar-epoch".into())
            .spawn(move || loop {
                if ticking.stopped.load(Ordering::Acquire) {
                    return;
                }
                // No call running: sleep until one starts (`call` unparks; a wake-up that
                // comes first leaves its token, so this park returns at once). Once woken,
                // tick at least once before looking again: a storm's calls are short, and
                // parking again at once cost a wake-up of this thread per call (3 more
                // futex calls per connect on a quiet machine, 07:08).
                if ticking.calls.load(Ordering::Acquire) == 0 {
                    std::thread::park();
                    if ticking.stopped.load(Ordering::Acquire) {
                        return;
                    }
                }
                std::thread::sleep(EPOCH_TICK);
                match engine.upgrade() {
                    Some(engine) => engine.increment_epoch(),
                    None => return,
                }
                ticking.ticks.fetch_add(1, Ordering::Relaxed);
            })
            .context("starting the epoch ticker")?;
        Ok(EpochTicker {
            shared,
            thread: handle.thread().clone(),
        })
    }

    /// Marks a plugin call as running until the guard is dropped; the ticker ticks while any
    /// call is marked.
    pub fn call(&self) -> CallGuard<'_> {
        if self.shared.calls.fetch_add(1, Ordering::AcqRel) == 0 {
            self.thread.unpark();
        }
        CallGuard(self)
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.shared.stopped.store(true, Ordering::Release);
        self.thread.unpark();
    }
}

/// A running plugin call (see [`EpochTicker::call`]).
pub struct CallGuard<'a>(&'a EpochTicker);

impl Drop for CallGuard<'_> {
    fn drop(&mut self) {
        self.0.shared.calls.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ticks(ticker: &EpochTicker) -> u64 {
        ticker.shared.ticks.load(Ordering::Relaxed)
    }

    #[test]
    fn ticks_only_while_a_call_runs() {
        let mut config = wasmtime::Config::new();
        config.epoch_interruption(true);
        let engine = Engine::new(&config).expect("engine");
        let ticker = EpochTicker::start(&engine).expect("ticker");
        std::thread::sleep(EPOCH_TICK * 5);
        assert_eq!(ticks(&ticker), 0, "ticked with no call running");
        {
            let _call = ticker.call();
            std::thread::sleep(EPOCH_TICK * 5);
            assert!(ticks(&ticker) >= 2, "too few ticks during a call");
        }
        // Parked again once the call is over (at most the tick it was sleeping for).
        std::thread::sleep(EPOCH_TICK * 2);
        let parked = ticks(&ticker);
        std::thread::sleep(EPOCH_TICK * 5);
        assert_eq!(ticks(&ticker), parked, "ticked after the call ended");
    }
}
