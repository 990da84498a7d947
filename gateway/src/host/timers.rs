//! Host calls of time and logging: `set-timer`, `now-ms`, `log`.

use tokio::sync::mpsc;

use super::context::HostState;
use super::timer_task::{run_timers, Timer};
use crate::abi::types;
use crate::abi::v0_2::magnetar::plugin::{log, timers};

impl timers::Host for HostState {
    /// `set-timer`: `on-timer` with `token` after `delay_ms`.
    fn set_timer(&mut self, conn: u64, token: u64, delay_ms: u64) {
        let Some(slot) = self.conns.get(&conn) else {
            return;
        };
        let timer = Timer {
            at: tokio::time::Instant::now() + std::time::Duration::from_millis(delay_ms),
            conn,
            token,
            shared: slot.shared.clone(),
        };
        let timers = self.timers.get_or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            self.runtime.spawn(run_timers(rx, self.events.clone()));
            tx
        });
        let _ = timers.send(timer);
    }

    /// `now-ms`: the host's wall clock.
    fn now_ms(&mut self) -> u64 {
        crate::clock::now_ms()
    }
}

impl log::Host for HostState {
    /// `log`: a log line tagged with the plugin's name.
    fn log(&mut self, level: types::LogLevel, message: String) {
        let plugin = &*self.plugin;
        match level {
            types::LogLevel::Trace => tracing::trace!(plugin, "{message}"),
            types::LogLevel::Debug => tracing::debug!(plugin, "{message}"),
            types::LogLevel::Info => tracing::info!(plugin, "{message}"),
            types::LogLevel::Warn => tracing::warn!(plugin, "{message}"),
            types::LogLevel::Error => tracing::error!(plugin, "{message}"),
        }
    }
}
