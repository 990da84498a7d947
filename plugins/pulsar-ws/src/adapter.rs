//! The plugin instance and the component export: each connection is a
//! [`PulsarWsConnection`] run by the SDK's [`Driver`]. No protocol decision is made here.

use magnetar_sdk::{Conn, ConnInfo, Driver, Plugin};

use crate::config::Config;
use crate::connection::PulsarWsConnection;

/// The plugin instance: the parsed config, shared by all its connections.
pub struct PulsarWsPlugin {
    config: Config,
}

impl Plugin for PulsarWsPlugin {
    type Connection = Driver<PulsarWsConnection>;

    fn new(config: &str) -> Result<Self, String> {
        Ok(PulsarWsPlugin {
            config: Config::parse(config)?,
        })
    }

    fn open(&mut self, conn: Conn, _info: ConnInfo) -> Driver<PulsarWsConnection> {
        let machine = PulsarWsConnection::new(conn.id(), self.config, magnetar_sdk::now_ms());
        Driver::new(conn, machine)
    }
}

// The macro exports only on Wasm: native builds of this crate exist for the unit tests.
magnetar_sdk::export_plugin!(PulsarWsPlugin);
