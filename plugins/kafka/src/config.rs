//! Plugin configuration: the `[plugins.kafka]` table of the gateway config, handed to the
//! plugin as TOML text.
//!
//! Only flat `key = integer` lines are used, so a small parser is enough (no TOML crate in
//! the component). Unknown keys are refused, so that a typo does not silently fall back to a
//! default.
//!
//! ```toml
//! max_request_bytes = 8388608    # largest request accepted, size field excluded (Kafka's socket.request.max.bytes)
//! max_uncompressed_bytes = 8388608    # largest record batch once decompressed
//! advertised_port = 9092         # the port Metadata names for this gateway (its listener's)
//! auto_create_topics = 1         # Metadata creates unknown topics (Kafka's auto.create.topics.enable)
//! default_partitions = 1         # partitions of an auto-created topic (Kafka's num.partitions)
//! max_partitions = 1000          # most partitions a topic may have (the embedded broker's limit)
//! initial_rebalance_delay_ms = 3000    # group.initial.rebalance.delay.ms
//! group_min_session_timeout_ms = 6000  # group.min.session.timeout.ms
//! group_max_session_timeout_ms = 1800000    # group.max.session.timeout.ms
//! coordinator_shards = 16        # group coordinator shards per namespace (Kafka's offsets.topic.num.partitions)
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
    /// The port Metadata names for this gateway: clients connect there for everything
    /// after bootstrapping, so it must be the listener's (host: [`Config::advertised_host`]).
    pub advertised_port: u16,
    /// Metadata of an unknown topic creates it, when the client allows it (Kafka's
    /// `auto.create.topics.enable`, default on).
    pub auto_create_topics: bool,
    /// Partitions of an auto-created topic, and of CreateTopics' `-1` (Kafka's
    /// `num.partitions`).
    pub default_partitions: u32,
    /// Most partitions CreateTopics and CreatePartitions may ask for; more is
    /// `INVALID_PARTITIONS` before the backend is asked (the embedded broker's own limit is
    /// 1,000; a Pulsar cluster has none by default, and each partition is a topic there).
    pub max_partitions: u32,
    /// The group coordinator's delays and limits (Kafka's `group.*` broker settings).
    pub groups: crate::coordinator::group::Timing,
    /// Shards of the group coordinator per namespace, each held by one gateway (Kafka's
    /// `offsets.topic.num.partitions`); every gateway of a backend must use the same.
    pub coordinator_shards: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            // Kafka's default is 100 MiB; 8 MiB covers a 1 MiB `message.max.bytes` batch
            // per partition of a produce request to several partitions. With the batch
            // limit below, a request's worst case (held, decoded, decompressed, handed to
            // the host) stays well inside an instance's default 64 MiB of memory.
            max_request_bytes: 8 << 20,
            max_uncompressed_bytes: 8 << 20,
            advertised_port: 9092,
            auto_create_topics: true,
            default_partitions: 1,
            max_partitions: 1_000,
            groups: crate::coordinator::group::Timing::default(),
            coordinator_shards: 16,
        }
    }
}

impl Config {
    /// The host Metadata names for this gateway. Loopback until the host tells plugins
    /// their listener's advertised address (docs/kafka.md section 2.2).
    pub fn advertised_host(&self) -> String {
        "127.0.0.1".to_string()
    }

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
                "advertised_port" => config.advertised_port = s.within(1, 65535)? as u16,
                "auto_create_topics" => config.auto_create_topics = s.within(0, 1)? == 1,
                "default_partitions" => config.default_partitions = s.within(1, 100_000)? as u32,
                "initial_rebalance_delay_ms" => {
                    config.groups.initial_rebalance_delay_ms = s.within(0, 300_000)?
                }
                "group_min_session_timeout_ms" => {
                    config.groups.min_session_timeout_ms = s.within(1, i32::MAX as u64)? as i32
                }
                "group_max_session_timeout_ms" => {
                    config.groups.max_session_timeout_ms = s.within(1, i32::MAX as u64)? as i32
                }
                "coordinator_shards" => config.coordinator_shards = s.within(1, 1024)? as u32,
                "max_partitions" => config.max_partitions = s.within(1, 100_000)? as u32,
                _ => return Err(s.unknown()),
            }
        }
        if config.default_partitions > config.max_partitions {
            return Err(format!(
                "kafka config: default_partitions ({}) is more than max_partitions ({})",
                config.default_partitions, config.max_partitions
            ));
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
        let c = Config::parse(
            "advertised_port = 19092\nauto_create_topics = 0\ndefault_partitions = 3",
        )
        .unwrap();
        assert_eq!(
            (
                c.advertised_port,
                c.auto_create_topics,
                c.default_partitions
            ),
            (19092, false, 3)
        );
        assert!(Config::parse("advertised_port = 0").is_err());
        assert_eq!(
            Config::parse("max_partitions = 5").unwrap().max_partitions,
            5
        );
        assert!(Config::parse("default_partitions = 6\nmax_partitions = 5").is_err());
        assert!(Config::parse("max_partitions = 0").is_err());
        let c =
            Config::parse("initial_rebalance_delay_ms = 0\ngroup_min_session_timeout_ms = 1000")
                .unwrap();
        assert_eq!(
            (
                c.groups.initial_rebalance_delay_ms,
                c.groups.min_session_timeout_ms
            ),
            (0, 1000)
        );
        assert!(Config::parse("max_request_bytes = 7").is_err());
        assert!(Config::parse("max_request_bytes = -1").is_err());
        assert!(Config::parse("max_requests = 1").is_err());
        assert!(Config::parse("max_request_bytes").is_err());
    }
}
