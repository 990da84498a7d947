//! The plugin instance and the component export: each connection is an [`AmqpConnection`]
//! run by the SDK's [`Driver`]. No protocol decision is made here.

use magnetar_sdk::{Conn, ConnInfo, Driver, Plugin};

use crate::config::Config;
use crate::connection::AmqpConnection;

/// The plugin instance: the parsed config, shared by all its connections.
pub struct AmqpPlugin {
    config: Config,
}

impl Plugin for AmqpPlugin {
    type Connection = Driver<AmqpConnection>;

    fn new(config: &str) -> Result<Self, String> {
        Ok(AmqpPlugin {
            config: Config::parse(config)?,
        })
    }

    fn open(&mut self, conn: Conn, info: ConnInfo) -> Driver<AmqpConnection> {
        magnetar_sdk::log(
            magnetar_sdk::LogLevel::Debug,
            &format!("amqp conn {}: open from {}", conn.id(), info.peer_addr),
        );
        Driver::new(
            conn,
            AmqpConnection::new(self.config, magnetar_sdk::now_ms()),
        )
    }
}

// The macro exports only on Wasm: native builds of this crate exist for the unit tests.
magnetar_sdk::export_plugin!(AmqpPlugin);
