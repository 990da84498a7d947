//! Where the group coordinators are: the host's directory of home shards (ABI 0.2.4
//! `homes.owner` and `homes.holders`), in the terms FindCoordinator and Metadata answer in.
//!
//! A group's coordinator is the gateway holding the group's shard
//! ([`super::shard_of`]); the host decides it through the backend (docs/kafka.md 2.2). The
//! connection asks through [`Directory`], so that its tests run natively with [`Alone`].

use magnetar_sdk::{Conn, Holder};

use super::DOMAIN;

/// A Kafka broker as clients see it: a gateway's node id and its address on the listener
/// the client came in on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broker {
    pub node_id: i32,
    pub host: String,
    pub port: i32,
    /// This gateway.
    pub local: bool,
}

/// The coordinators of the connection's namespace.
pub trait Directory {
    /// The broker holding `shard`; `None`: not known yet (`COORDINATOR_NOT_AVAILABLE`).
    fn owner(&self, shard: u32) -> Option<Broker>;
    /// Every gateway known to hold shards, and this one, by node id.
    fn brokers(&self) -> Vec<Broker>;
}

/// One gateway alone (no directory): it is node 1 and holds every shard.
pub struct Alone {
    pub host: String,
    pub port: i32,
}

impl Alone {
    fn me(&self) -> Broker {
        Broker {
            node_id: 1,
            host: self.host.clone(),
            port: self.port,
            local: true,
        }
    }
}

impl Directory for Alone {
    fn owner(&self, _shard: u32) -> Option<Broker> {
        Some(self.me())
    }

    fn brokers(&self) -> Vec<Broker> {
        vec![self.me()]
    }
}

/// The host's directory, seen from one client connection: this gateway's address is the
/// plugin's own (`advertised_port`), another gateway's is its endpoint on the listener of
/// the same name as this connection's (so TLS clients go to TLS listeners).
pub struct HostDirectory {
    pub conn: Conn,
    pub listener: String,
    /// This gateway's address as Metadata names it.
    pub local: (String, i32),
}

impl HostDirectory {
    fn broker(&self, h: Holder) -> Option<Broker> {
        let (host, port) = if h.local {
            self.local.clone()
        } else {
            let e = h
                .endpoints
                .iter()
                .find(|e| e.listener == self.listener)
                .or_else(|| h.endpoints.first())?;
            (e.host.clone(), i32::from(e.port))
        };
        Some(Broker {
            node_id: h.node_id,
            host,
            port,
            local: h.local,
        })
    }
}

impl Directory for HostDirectory {
    fn owner(&self, shard: u32) -> Option<Broker> {
        self.conn
            .home_owner(DOMAIN, shard)
            .and_then(|h| self.broker(h))
    }

    fn brokers(&self) -> Vec<Broker> {
        let all: Vec<Broker> = self
            .conn
            .home_holders(DOMAIN)
            .into_iter()
            .filter_map(|h| self.broker(h))
            .collect();
        if all.iter().any(|b| b.local) {
            all
        } else {
            // A host without a directory: this gateway alone, as node 1.
            vec![Broker {
                node_id: 1,
                host: self.local.0.clone(),
                port: self.local.1,
                local: true,
            }]
        }
    }
}
