//! Routes the handler events of one instance to the [`Plugin`] and its connections.
//!
//! The instance is single-threaded (one Wasm instance), so the dispatcher lives in a
//! thread-local behind a `RefCell`; the host never calls back into the guest while a host
//! call is running, so the borrow is never taken twice.

use std::collections::HashMap;

use crate::{Conn, ConnInfo, Connection, HomePost, LogLevel, Plugin};

/// The plugin value and its live connections.
pub struct Dispatcher<P: Plugin> {
    plugin: Option<P>,
    conns: HashMap<u64, P::Connection>,
}

impl<P: Plugin> Default for Dispatcher<P> {
    fn default() -> Self {
        Self::new()
    }
}

impl<P: Plugin> Dispatcher<P> {
    /// A dispatcher waiting for `init`.
    pub fn new() -> Self {
        Dispatcher {
            plugin: None,
            conns: HashMap::new(),
        }
    }

    /// Builds the plugin from its config.
    pub fn init(&mut self, config: &str) -> Result<(), String> {
        self.plugin = Some(P::new(config)?);
        Ok(())
    }

    /// Opens the state machine of a new connection.
    pub fn on_open(&mut self, conn: u64, info: ConnInfo) {
        match self.plugin.as_mut() {
            Some(plugin) => {
                let c = plugin.open(Conn(conn), info);
                self.conns.insert(conn, c);
            }
            None => {
                crate::log(LogLevel::Error, "connection opened before init");
                Conn(conn).close("plugin not initialised");
            }
        }
    }

    /// Runs `f` on the connection's state machine; events for unknown connections (closed
    /// in the meantime) are dropped.
    pub fn with_conn(&mut self, conn: u64, f: impl FnOnce(&mut P::Connection, Conn)) {
        if let Some(c) = self.conns.get_mut(&conn) {
            f(c, Conn(conn));
        }
    }

    /// A post for a home: the first one opens it ([`Plugin::open_home`]); a plugin without
    /// homes answers it empty, so that the poster is not left waiting.
    pub fn on_home_post(&mut self, home: u64, post: HomePost) {
        if !self.conns.contains_key(&home) {
            let opened = self
                .plugin
                .as_mut()
                .and_then(|p| p.open_home(Conn(home), &post.domain, post.shard));
            match opened {
                Some(c) => {
                    self.conns.insert(home, c);
                }
                None => {
                    crate::log(
                        LogLevel::Warn,
                        "a post for a home this plugin does not keep",
                    );
                    Conn(home).reply_home(post.post_id, &[]);
                    return;
                }
            }
        }
        self.with_conn(home, |c, h| c.on_home_post(h, post));
    }

    /// Tells the connection it is gone, then forgets it.
    pub fn on_closed(&mut self, conn: u64) {
        if let Some(mut c) = self.conns.remove(&conn) {
            c.on_closed(Conn(conn));
        }
    }
}
