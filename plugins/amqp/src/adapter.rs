//! The plugin instance and the component export: each connection is an [`AmqpConnection`]
//! run by the SDK's [`Driver`]. No protocol decision is made here.

use magnetar_sdk::{Conn, ConnInfo, Driver, Plugin};

use crate::config::Config;
use crate::connection::{name_seed, AmqpConnection};

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
        // Random per connection: the names of its server-named queues and its id as the
        // owner of exclusive queues differ from every other connection's.
        let seed = name_seed(conn.id());
        let mut machine = AmqpConnection::with_seed(self.config, magnetar_sdk::now_ms(), seed);
        let loopback = info
            .peer_addr
            .parse::<std::net::SocketAddr>()
            .is_ok_and(|a| a.ip().to_canonical().is_loopback());
        machine.set_loopback(loopback);
        Driver::new(conn, machine)
    }
}

// The macro exports only on Wasm: native builds of this crate exist for the unit tests.
magnetar_sdk::export_plugin!(AmqpPlugin);
