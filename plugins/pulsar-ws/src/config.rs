//! Plugin configuration: the `[plugins.config.pulsar-ws]` table of the gateway config, handed to
//! the plugin as TOML text. Flat `key = integer` lines only; unknown keys are refused so a
//! typo does not fall back to a default in silence.
//!
//! ```toml
//! max_message_size = 1048576  # largest WebSocket message taken from a client (Pulsar's webSocketMaxTextFrameSize)
//! max_pending_sends = 1000    # producer messages awaiting the backend; beyond it the socket is not read
//! ```

/// Limits of every connection of the plugin instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Largest message a client may send: a larger one closes the session with 1009.
    pub max_message_size: usize,
    /// Publishes sent to the host and not yet stored: past this the plugin stops reading
    /// the connection until receipts come back (Pulsar's producer queue, without its
    /// errors: the client waits instead of getting `send-error`).
    pub max_pending_sends: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_message_size: 1024 * 1024,
            max_pending_sends: 1000,
        }
    }
}

impl Config {
    /// Parses the TOML text; empty text gives the defaults.
    pub fn parse(text: &str) -> Result<Config, String> {
        let mut config = Config::default();
        for s in magnetar_sdk::config::settings("pulsar-ws", text)? {
            let in_range = |lo, hi| s.within(lo, hi).map(|v| v as usize);
            match s.key {
                "max_message_size" => config.max_message_size = in_range(1024, 64 << 20)?,
                "max_pending_sends" => config.max_pending_sends = in_range(1, 100_000)?,
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
    fn parses_defaults_values_and_refuses_typos() {
        assert_eq!(Config::parse(""), Ok(Config::default()));
        let c =
            Config::parse("max_message_size = 2_097_152 # 2 MiB\nmax_pending_sends=10\n").unwrap();
        assert_eq!((c.max_message_size, c.max_pending_sends), (2 << 20, 10));
        assert!(Config::parse("max_message_sise = 1").is_err());
        assert!(Config::parse("max_pending_sends = 0").is_err());
        assert!(Config::parse("max_pending_sends").is_err());
    }
}
