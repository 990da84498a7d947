//! The plugin instance and the component export: each connection is an [`MqttConnection`]
//! run by the SDK's [`Driver`], which stamps every callback with the host's clock and turns
//! every action into a host call. No protocol decision is made here.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::rc::Rc;

use magnetar_sdk::{Conn, ConnInfo, Driver, Plugin};

use crate::config::Config;
use crate::connection::MqttConnection;

/// The plugin instance: the parsed config, shared by all its connections.
pub struct MqttPlugin {
    config: Config,
    /// The host's SASL mechanisms (MQTT 5.0 enhanced authentication), asked once.
    sasl_mechanisms: Option<Rc<[String]>>,
}

impl Plugin for MqttPlugin {
    type Connection = Driver<MqttConnection>;

    fn new(config: &str) -> Result<Self, String> {
        Ok(MqttPlugin {
            config: Config::parse(config)?,
            sasl_mechanisms: None,
        })
    }

    fn open(&mut self, conn: Conn, info: ConnInfo) -> Driver<MqttConnection> {
        // Random per process (std seeds it from WASI randomness): keeps the names of
        // non-durable subscriptions unique across gateway instances sharing one backend.
        let nonce = RandomState::new().hash_one(conn.id());
        let mechanisms = self
            .sasl_mechanisms
            .get_or_insert_with(|| Rc::from(magnetar_sdk::sasl_mechanisms()))
            .clone();
        let machine = MqttConnection::new(conn.id(), self.config, nonce, magnetar_sdk::now_ms())
            .with_sasl_mechanisms(mechanisms);
        magnetar_sdk::log(
            magnetar_sdk::LogLevel::Debug,
            &format!("mqtt conn {}: open from {}", conn.id(), info.peer_addr),
        );
        Driver::new(conn, machine)
    }
}

// The macro exports only on Wasm: native builds of this crate exist for the unit tests.
magnetar_sdk::export_plugin!(MqttPlugin);
