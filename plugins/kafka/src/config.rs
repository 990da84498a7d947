//! Plugin configuration: the `[plugins.kafka]` table of the gateway config, handed to the
//! plugin as TOML text.
//!
//! Only flat `key = integer` lines are used, so a small parser is enough (no TOML crate in
//! the component). Unknown keys are refused, so that a typo does not silently fall back to a
//! default.
//!
//! ```toml
//! max_request_bytes = 16777216   # largest request accepted, size field excluded (Kafka's socket.request.max.bytes)
//! ```

/// Limits of every connection of the plugin instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Largest request (the bytes after the 4-byte size) accepted from a client; a larger
    /// size closes the connection before anything is allocated for it.
    pub max_request_bytes: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            // Kafka's default is 100 MiB; 16 MiB covers a 1 MiB `message.max.bytes` batch
            // per partition of a produce request to many partitions.
            max_request_bytes: 16 << 20,
        }
    }
}

impl Config {
    /// Parses the config text (empty: the defaults).
    pub fn parse(text: &str) -> Result<Config, String> {
        let mut config = Config::default();
        for (n, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or_default().trim();
            if line.is_empty() {
                continue;
            }
            let (key, value) = line
                .split_once('=')
                .ok_or_else(|| format!("kafka config line {}: expected `key = value`", n + 1))?;
            let key = key.trim();
            let value: u64 = value.trim().replace('_', "").parse().map_err(|_| {
                format!(
                    "kafka config line {}: `{key}` needs a non-negative integer",
                    n + 1
                )
            })?;
            match key {
                // A request holds at least the 8 fixed bytes of its header; the size field
                // is an int32.
                "max_request_bytes" => {
                    if !(8..=i32::MAX as u64).contains(&value) {
                        return Err(format!(
                            "kafka config: `max_request_bytes` must be in 8..={}",
                            i32::MAX
                        ));
                    }
                    config.max_request_bytes = value as usize;
                }
                other => return Err(format!("kafka config: unknown key `{other}`")),
            }
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_keys_and_refusals() {
        assert_eq!(Config::parse("").unwrap(), Config::default());
        let c = Config::parse("max_request_bytes = 1_048_576 # one MiB\n").unwrap();
        assert_eq!(c.max_request_bytes, 1 << 20);
        assert!(Config::parse("max_request_bytes = 7").is_err());
        assert!(Config::parse("max_request_bytes = -1").is_err());
        assert!(Config::parse("max_requests = 1").is_err());
        assert!(Config::parse("max_request_bytes").is_err());
    }
}
