//! Plugin configuration: the `[plugins.kafka]` table of the gateway config, handed to the
//! plugin as TOML text.
//!
//! Only flat `key = integer` lines are used, so a small parser is enough (no TOML crate in
//! the component). Unknown keys are refused, so that a typo does not silently fall back to a
//! default.
//!
//! ```toml
//! max_request_bytes = 16777216   # largest request accepted, size field excluded (Kafka's socket.request.max.bytes)
//! max_uncompressed_bytes = 33554432   # largest record batch once decompressed
//! ```

/// Limits of every connection of the plugin instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Largest request (the bytes after the 4-byte size) accepted from a client; a larger
    /// size closes the connection before anything is allocated for it.
    pub max_request_bytes: usize,
    /// Largest records section of one batch (or old message set) once decompressed; more is
    /// `RECORD_LIST_TOO_LARGE`, so that a small compressed batch cannot exhaust memory.
    pub max_uncompressed_bytes: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            // Kafka's default is 100 MiB; 16 MiB covers a 1 MiB `message.max.bytes` batch
            // per partition of a produce request to many partitions.
            max_request_bytes: 16 << 20,
            max_uncompressed_bytes: 32 << 20,
        }
    }
}

impl Config {
    /// The limits record batches are decoded with.
    pub fn record_limits(&self) -> crate::codec::records::Limits {
        crate::codec::records::Limits {
            max_uncompressed_bytes: self.max_uncompressed_bytes,
        }
    }

    /// Parses the config text (empty: the defaults).
    pub fn parse(text: &str) -> Result<Config, String> {
        let mut config = Config::default();
        for s in magnetar_sdk::config::settings("kafka", text)? {
            match s.key {
                // A request holds at least the 8 fixed bytes of its header; the size field
                // is an int32.
                "max_request_bytes" => {
                    config.max_request_bytes = s.within(8, i32::MAX as u64)? as usize
                }
                "max_uncompressed_bytes" => {
                    config.max_uncompressed_bytes = s.within(1024, i32::MAX as u64)? as usize
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
    fn defaults_keys_and_refusals() {
        assert_eq!(Config::parse("").unwrap(), Config::default());
        let c = Config::parse("max_request_bytes = 1_048_576 # one MiB\n").unwrap();
        assert_eq!(c.max_request_bytes, 1 << 20);
        let c = Config::parse("max_uncompressed_bytes = 65536").unwrap();
        assert_eq!(c.record_limits().max_uncompressed_bytes, 1 << 16);
        assert!(Config::parse("max_uncompressed_bytes = 1").is_err());
        assert!(Config::parse("max_request_bytes = 7").is_err());
        assert!(Config::parse("max_request_bytes = -1").is_err());
        assert!(Config::parse("max_requests = 1").is_err());
        assert!(Config::parse("max_request_bytes").is_err());
    }
}
