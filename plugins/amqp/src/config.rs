//! Plugin configuration: the `[plugins.amqp]` table of the gateway config (flat
//! `key = integer` lines; unknown keys are refused).
//!
//! ```toml
//! frame_max = 131072            # largest frame offered in connection.tune (RabbitMQ's default)
//! channel_max = 2047            # channels per connection offered in connection.tune (RabbitMQ's default)
//! heartbeat_s = 60              # heartbeat interval offered in connection.tune (RabbitMQ's default)
//! handshake_timeout_ms = 10000  # time from TCP accept to connection.open (RabbitMQ's handshake_timeout)
//! exclusive_lease_ms = 30000    # how long a connection's exclusive queues outlive it if it ends without connection.close
//! ```

/// Limits of every connection of the plugin instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    pub frame_max: u32,
    pub channel_max: u16,
    pub heartbeat_s: u16,
    pub handshake_timeout_ms: u64,
    pub exclusive_lease_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            frame_max: 131_072,
            channel_max: 2047,
            heartbeat_s: 60,
            handshake_timeout_ms: 10_000,
            exclusive_lease_ms: 30_000,
        }
    }
}

impl Config {
    /// Parses the TOML text; empty text gives the defaults.
    pub fn parse(text: &str) -> Result<Config, String> {
        let mut config = Config::default();
        for s in magnetar_sdk::config::settings("amqp", text)? {
            match s.key {
                // §4.2.3: frame-max is at least 4096 (frame-min-size).
                "frame_max" => config.frame_max = s.within(4096, 16 << 20)? as u32,
                "channel_max" => config.channel_max = s.within(1, 65535)? as u16,
                "heartbeat_s" => config.heartbeat_s = s.within(0, 65535)? as u16,
                "handshake_timeout_ms" => {
                    config.handshake_timeout_ms = s.within(100, 600_000)?;
                }
                "exclusive_lease_ms" => {
                    config.exclusive_lease_ms = s.within(1_000, 3_600_000)?;
                }
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
        let c = Config::parse("frame_max = 8192\nheartbeat_s = 0\n").unwrap();
        assert_eq!((c.frame_max, c.heartbeat_s), (8192, 0));
        assert!(Config::parse("frame_max = 100").is_err());
        assert!(Config::parse("frame_maxx = 8192").is_err());
    }
}
