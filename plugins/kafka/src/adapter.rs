//! The plugin instance and the component export: each client connection is a
//! [`KafkaConnection`], the group coordinator's home a [`GroupHome`], both run by the SDK's
//! [`Driver`]. No protocol decision is made here.

use std::rc::Rc;

use magnetar_sdk::{Action, Conn, ConnInfo, Driver, Event, Machine, Plugin};

use crate::config::Config;
use crate::connection::throttle::HostQuota;
use crate::connection::KafkaConnection;
use crate::coordinator::directory::HostDirectory;
use crate::coordinator::{GroupHome, DOMAIN};

/// The plugin instance: the parsed config, shared by its connections.
pub struct KafkaPlugin {
    config: Config,
    /// The host's SASL mechanisms, asked once.
    sasl_mechanisms: Option<Rc<[String]>>,
}

/// What one of the instance's connections is: a client's, or the coordinator's home.
pub enum KafkaMachine {
    Client(Box<KafkaConnection>),
    Home(Box<GroupHome>),
}

impl Machine for KafkaMachine {
    fn apply(&mut self, now_ms: u64, event: Event) {
        match self {
            KafkaMachine::Client(c) => c.apply(now_ms, event),
            KafkaMachine::Home(h) => h.apply(now_ms, event),
        }
    }

    fn take_actions(&mut self) -> Vec<Action> {
        match self {
            KafkaMachine::Client(c) => c.take_actions(),
            KafkaMachine::Home(h) => h.take_actions(),
        }
    }

    fn handle_all(&mut self, now_ms: u64, events: impl IntoIterator<Item = Event>) -> Vec<Action> {
        match self {
            KafkaMachine::Client(c) => c.handle_all(now_ms, events),
            KafkaMachine::Home(h) => h.handle_all(now_ms, events),
        }
    }
}

impl Plugin for KafkaPlugin {
    type Connection = Driver<KafkaMachine>;

    fn new(config: &str) -> Result<Self, String> {
        Ok(KafkaPlugin {
            config: Config::parse(config)?,
            sasl_mechanisms: None,
        })
    }

    fn open(&mut self, conn: Conn, info: ConnInfo) -> Driver<KafkaMachine> {
        let mechanisms = self
            .sasl_mechanisms
            .get_or_insert_with(|| Rc::from(magnetar_sdk::sasl_mechanisms()))
            .clone();
        let directory = Rc::new(HostDirectory {
            conn,
            listener: info.listener,
            local: (
                self.config.advertised_host(),
                i32::from(self.config.advertised_port),
            ),
        });
        let machine = KafkaConnection::new(self.config)
            .with_sasl_mechanisms(mechanisms)
            .with_directory(directory)
            .with_quota(Rc::new(HostQuota(conn)));
        Driver::new(conn, KafkaMachine::Client(Box::new(machine)))
    }

    fn open_home(&mut self, home: Conn, domain: &str, _shard: u32) -> Option<Driver<KafkaMachine>> {
        (domain == DOMAIN).then(|| {
            Driver::new(
                home,
                KafkaMachine::Home(Box::new(GroupHome::new(self.config.groups))),
            )
        })
    }
}

// The macro exports only on Wasm: native builds of this crate exist for the unit tests.
magnetar_sdk::export_plugin!(KafkaPlugin);
