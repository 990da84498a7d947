//! The wall clock, in the unit the plugin ABI and the backend speak: milliseconds since the
//! Unix epoch. (Deadlines and timers use `tokio::time` instead, which tests can pause.)

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
