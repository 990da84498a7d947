//! Quota throttling as Kafka tells it: `throttle_time_ms` in the Produce response.
//!
//! The host holds back a publish over its tenant's or user's rate until the rate allows it
//! (docs/tenancy.md, "Quotas"); nothing is refused or dropped. The plugin only reports that
//! delay: a Produce response carries the longest hold-back of the request's appends (ABI
//! 0.2.5 `quota.held-back-ms`; a connection serves one request at a time, so the count since
//! the previous response is this request's). The response comes after the delay, as
//! Kafka's brokers answered before KIP-219 (and still answer clients of old versions);
//! docs/kafka.md 1.7 says what that means for clients that also wait on their side.

use magnetar_sdk::Conn;

/// What the quotas did to the connection's publishes.
pub trait Quota {
    /// The longest hold-back since the previous call, in milliseconds.
    fn held_back_ms(&self) -> u32;
}

/// No quotas (the unit tests' default).
pub struct Unlimited;

impl Quota for Unlimited {
    fn held_back_ms(&self) -> u32 {
        0
    }
}

/// The host's quotas for one connection.
pub struct HostQuota(pub Conn);

impl Quota for HostQuota {
    fn held_back_ms(&self) -> u32 {
        self.0.held_back_ms()
    }
}

/// `throttle_time_ms` for a response: the hold-back, within Kafka's `int32`.
pub fn throttle_time_ms(quota: &dyn Quota) -> i32 {
    i32::try_from(quota.held_back_ms()).unwrap_or(i32::MAX)
}
