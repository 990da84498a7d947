//! Plugin configuration: the `[plugins.mqtt]` table of the gateway config, handed to the
//! plugin as TOML text.
//!
//! Only flat `key = integer` lines are used, so a small parser is enough (no TOML crate in
//! the component). Unknown keys are refused, so that a typo does not silently fall back to a
//! default.
//!
//! ```toml
//! max_packet_size = 1048576   # largest MQTT packet accepted, bytes (§2.2.3; 5.0 CONNACK Maximum Packet Size)
//! max_inflight = 64           # QoS 1 deliveries awaiting PUBACK; QoS 1/2 publishes the client may have unacknowledged (5.0 Receive Maximum)
//! max_pending_publishes = 1024 # publishes of any QoS read from the client and not yet stored by the backend
//! delivery_window = 1024      # messages the backend may hand a subscription before they are acknowledged
//! max_queued = 100000         # messages the host keeps for a clean session beyond that window (at most 64 MiB); newer ones are dropped
//! max_subscriptions = 1000    # Topic Filters per session
//! connect_timeout_ms = 10000  # time from TCP accept to CONNECT
//! ```

/// Limits of every connection of the plugin instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Largest packet (fixed header included) accepted from a client.
    pub max_packet_size: usize,
    /// QoS 1 messages sent to a client and not yet PUBACKed (also the backend subscription's
    /// `max-unacked`; an MQTT 5.0 client's smaller Receive Maximum wins), and client
    /// publishes not yet stored by the backend (the CONNACK Receive Maximum of 5.0).
    pub max_inflight: usize,
    /// Publishes of any QoS read from a client and not yet stored by the backend: beyond
    /// this the connection is not read (backpressure). QoS 0 publishes wait for nothing
    /// else, so this window, not `max_inflight`, bounds a QoS 0 publisher's rate.
    pub max_pending_publishes: usize,
    /// Messages a backend subscription may hand the connection before they are
    /// acknowledged (QoS 0: once written; QoS 1/2: once the client acknowledged them). At
    /// least `max_inflight`; a QoS 1/2 message beyond the client's window waits in the plugin.
    pub delivery_window: usize,
    /// Messages the host keeps for a clean session's route beyond `delivery_window` while
    /// its client is slow; past it, newer messages for it are dropped (as Mosquitto's
    /// `max_queued_messages`). Persistent sessions' backlogs are in the backend, unbounded.
    pub max_queued: usize,
    /// Topic Filters one session may hold.
    pub max_subscriptions: usize,
    /// Milliseconds a new connection has to send CONNECT.
    pub connect_timeout_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_packet_size: 1024 * 1024,
            max_inflight: 64,
            max_pending_publishes: 1024,
            delivery_window: 1024,
            max_queued: 100_000,
            max_subscriptions: 1000,
            connect_timeout_ms: 10_000,
        }
    }
}

impl Config {
    /// Parses the TOML text; empty text gives the defaults.
    pub fn parse(text: &str) -> Result<Config, String> {
        let mut config = Config::default();
        for s in magnetar_sdk::config::settings("mqtt", text)? {
            let range = |lo, hi| s.within(lo, hi);
            match s.key {
                // Remaining Length tops out at 268,435,455 (§2.2.3), plus 5 header bytes.
                "max_packet_size" => config.max_packet_size = range(16, 268_435_460)? as usize,
                // Packet Identifiers are 16-bit and non-zero (§2.3.1).
                "max_inflight" => config.max_inflight = range(1, 65_535)? as usize,
                "max_pending_publishes" => config.max_pending_publishes = range(1, 4096)? as usize,
                "delivery_window" => config.delivery_window = range(1, 10_000)? as usize,
                "max_queued" => config.max_queued = range(1, 1_000_000)? as usize,
                "max_subscriptions" => config.max_subscriptions = range(1, 1_000_000)? as usize,
                "connect_timeout_ms" => config.connect_timeout_ms = range(100, 3_600_000)?,
                _ => return Err(s.unknown()),
            }
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_is_the_default() {
        assert_eq!(Config::parse(""), Ok(Config::default()));
        assert_eq!(Config::parse("# nothing\n\n"), Ok(Config::default()));
    }

    #[test]
    fn keys_are_parsed_and_checked() {
        let c = Config::parse("max_packet_size = 2_048 # small\nmax_inflight=8\n").unwrap();
        assert_eq!(c.max_packet_size, 2048);
        assert_eq!(c.max_inflight, 8);
        assert!(Config::parse("max_inflight = 0").is_err());
        assert!(Config::parse("max_inflight = 70000").is_err());
        assert!(Config::parse("max_packet_sise = 10").is_err());
        assert!(Config::parse("max_packet_size = big").is_err());
        assert!(Config::parse("max_packet_size").is_err());
    }
}
