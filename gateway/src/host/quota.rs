//! Host calls of quotas (ABI 0.2.5): `held-back-ms`, what the publish-rate quotas did to a
//! connection's publishes, for protocols that tell their clients (Kafka's
//! `throttle_time_ms`). The hold-back itself is the ops queue's and the appender's
//! `not_before` (see `crate::quota`); this only reports it.

use std::time::Instant;

use super::context::HostState;
use crate::abi::v0_2::magnetar::plugin::quota;

impl HostState {
    /// Takes `msgs` messages of `bytes` from the connection's quotas: the instant before
    /// which they must not reach the backend, remembered for `held-back-ms`.
    pub(super) fn hold_back(&mut self, conn: u64, msgs: usize, bytes: usize) -> Option<Instant> {
        let slot = self.conns.get_mut(&conn)?;
        let at = slot.meters.as_ref()?.publish_at(msgs, bytes)?;
        let ms = at
            .saturating_duration_since(Instant::now())
            .as_millis()
            .try_into()
            .unwrap_or(u32::MAX);
        slot.held_back_ms = slot.held_back_ms.max(ms);
        Some(at)
    }
}

impl quota::Host for HostState {
    /// `held-back-ms`: the longest hold-back since the previous call, and a new count.
    fn held_back_ms(&mut self, conn: u64) -> u32 {
        self.conns
            .get_mut(&conn)
            .map_or(0, |slot| std::mem::take(&mut slot.held_back_ms))
    }
}
