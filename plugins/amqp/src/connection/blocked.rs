//! `connection.blocked` / `connection.unblocked` (RabbitMQ's extension, capability
//! `connection.blocked`): the server tells a client that its publishing is held back.
//!
//! RabbitMQ blocks publishers on a resource alarm (memory, disk). The gateway's pushback
//! comes from the host: a publish-rate quota holds publishes back until their time, and a
//! slow backend completes them late; either way the connection's publishes stay in flight.
//! So a connection whose oldest publish has been in flight for [`BLOCK_AFTER_MS`] is told
//! `connection.blocked`, and `connection.unblocked` once none has been for that long (the
//! host's own pushback, reading the socket no more while too many operations are in
//! flight, goes on regardless). Only clients that announced the capability are told, as
//! RabbitMQ does.

use std::collections::VecDeque;

use super::*;

/// How long a publish stays in flight before the connection counts as held back.
pub const BLOCK_AFTER_MS: u64 = 1_000;

/// The connection's publishes in flight and whether the client was told it is blocked.
#[derive(Debug, Default)]
pub(super) struct Pushback {
    /// When each publish in flight was issued, oldest first (the host completes a
    /// connection's operations in the order they were issued).
    in_flight: VecDeque<u64>,
    blocked: bool,
    timer: Option<u64>,
}

impl AmqpConnection {
    /// A publish of the client was handed to the host.
    pub(super) fn publish_issued(&mut self) {
        self.pushback.in_flight.push_back(self.now_ms);
        if self.pushback.timer.is_none() {
            self.arm_block_timer(BLOCK_AFTER_MS);
        }
    }

    /// A publish of the client completed.
    pub(super) fn publish_completed(&mut self) {
        self.pushback.in_flight.pop_front();
        self.check_pushback();
    }

    fn arm_block_timer(&mut self, delay_ms: u64) {
        let token = self.ops.token();
        self.pushback.timer = Some(token);
        self.out.push(Action::SetTimer { token, delay_ms });
    }

    pub(super) fn on_block_timer(&mut self, token: u64) -> bool {
        if self.pushback.timer != Some(token) {
            return false;
        }
        self.pushback.timer = None;
        self.check_pushback();
        if let Some(oldest) = self.pushback.in_flight.front() {
            let due = (oldest + BLOCK_AFTER_MS).saturating_sub(self.now_ms);
            self.arm_block_timer(due.clamp(10, BLOCK_AFTER_MS));
        }
        true
    }

    /// Tells the client when its state changed.
    fn check_pushback(&mut self) {
        let held = self
            .pushback
            .in_flight
            .front()
            .is_some_and(|t| self.now_ms.saturating_sub(*t) >= BLOCK_AFTER_MS);
        if held == self.pushback.blocked || self.phase != Phase::Running {
            return;
        }
        self.pushback.blocked = held;
        if !self.blocked_notify {
            return;
        }
        let m = if held {
            Method::ConnectionBlocked(ConnectionBlocked {
                reason: "publishing held back by a quota or the backend".into(),
            })
        } else {
            Method::ConnectionUnblocked(ConnectionUnblocked {})
        };
        self.send_method(0, m);
    }
}
