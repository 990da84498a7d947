//! The plugin instance and the component export: each connection is a [`KafkaConnection`]
//! run by the SDK's [`Driver`]. No protocol decision is made here.

use magnetar_sdk::{Conn, ConnInfo, Driver, Plugin};

use crate::config::Config;
use crate::connection::KafkaConnection;

/// The plugin instance: the parsed config, shared by its connections.
pub struct KafkaPlugin {
    config: Config,
}

impl Plugin for KafkaPlugin {
    type Connection = Driver<KafkaConnection>;

    fn new(config: &str) -> Result<Self, String> {
        Ok(KafkaPlugin {
            config: Config::parse(config)?,
        })
    }

    fn open(&mut self, conn: Conn, _info: ConnInfo) -> Driver<KafkaConnection> {
        Driver::new(conn, KafkaConnection::new(self.config))
    }
}

// The macro exports only on Wasm: native builds of this crate exist for the unit tests.
magnetar_sdk::export_plugin!(KafkaPlugin);
