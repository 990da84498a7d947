//! [`HostState`]: the store data of one plugin instance, the one context type every family
//! of host calls works on, and what it keeps per connection ([`ConnSlot`]).

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::mpsc;
use wasmtime::component::ResourceTable;
use wasmtime::StoreLimits;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::event::Event;
use super::ops_task::OpsQueue;
use super::routing::RouteRef;
use super::services::Services;
use super::session::PendingWill;
use super::subscription_task::SubCmd;
use super::timer_task::Timer;
use crate::abi::types::{self, ErrorKind, OpError};
use crate::config::ActionName;
use crate::conn_shared::ConnShared;
use crate::kv::KV_TOPIC;
use crate::quota::Meters;
use crate::tenancy::{self, Principal};

/// What the host keeps per connection of an instance.
pub(super) struct ConnSlot {
    pub(super) shared: Arc<ConnShared>,
    pub(super) principal: Option<Principal>,
    /// The client's address, for rate-limiting failed authentication.
    pub(super) peer: Option<std::net::IpAddr>,
    /// The operations queue, made by the first operation (`queue_op`); its task runs only
    /// while there is work.
    pub(super) ops: Option<Arc<OpsQueue>>,
    pub(super) subs: HashMap<u64, mpsc::Sender<SubCmd>>,
    /// The deliveries not settled of its consumers of capped queues (`caps`), by sub.
    pub(super) held: HashMap<u64, Arc<super::caps::Held>>,
    /// Its routes (also in `subs`, which their acks and closing go through).
    pub(super) routes: HashMap<u64, RouteRef>,
    /// The last will to publish when the connection ends (`set-will`).
    pub(super) will: Option<PendingWill>,
    /// Keys this connection claimed (`claim`), in `Claims` form.
    pub(super) claims: Vec<String>,
    /// Its tenant's and user's quotas, once authenticated (holding one connection).
    pub(super) meters: Option<Meters>,
    /// The longest hold-back of its publishes since the plugin last asked (`quota`).
    pub(super) held_back_ms: u32,
    /// A SCRAM exchange waiting for the client's final message.
    pub(super) sasl: Option<crate::sasl::ScramPending>,
    /// Common name of the client certificate verified at the TLS handshake.
    pub(super) client_cert: Option<String>,
}

/// The store data of one instance.
pub struct HostState {
    pub(super) plugin: Arc<str>,
    wasi: WasiCtx,
    table: ResourceTable,
    limits: StoreLimits,
    pub(super) services: Arc<Services>,
    pub(super) events: mpsc::Sender<Event>,
    pub(super) runtime: tokio::runtime::Handle,
    pub(super) conns: HashMap<u64, ConnSlot>,
    pub(super) next_sub: u64,
    /// The instance's timer task, started by the first `set-timer`.
    pub(super) timers: Option<mpsc::UnboundedSender<Timer>>,
    /// Completions decided during a host call (a claim nobody else holds, an anonymous or
    /// cached login, a kv read of a loaded namespace): the worker delivers them right after
    /// the plugin's current call, with no trip through the runtime (see [`HostState::finish_now`]).
    ready: std::collections::VecDeque<Event>,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// An operation's failure, as the plugin gets it.
pub(super) fn op_error(kind: ErrorKind, message: impl Into<String>) -> OpError {
    OpError {
        kind,
        message: message.into(),
    }
}

impl HostState {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        plugin: Arc<str>,
        wasi: WasiCtx,
        table: ResourceTable,
        limits: StoreLimits,
        services: Arc<Services>,
        events: mpsc::Sender<Event>,
        runtime: tokio::runtime::Handle,
    ) -> HostState {
        HostState {
            plugin,
            wasi,
            table,
            limits,
            services,
            events,
            runtime,
            conns: HashMap::new(),
            next_sub: 1,
            timers: None,
            ready: std::collections::VecDeque::new(),
        }
    }

    pub fn limits_mut(&mut self) -> &mut StoreLimits {
        &mut self.limits
    }

    /// Registers a new connection (its operations task starts with its first operation).
    pub fn open(
        &mut self,
        conn: u64,
        shared: Arc<ConnShared>,
        peer: Option<std::net::IpAddr>,
        client_cert: Option<String>,
    ) {
        self.conns.insert(
            conn,
            ConnSlot {
                shared,
                principal: None,
                meters: None,
                held_back_ms: 0,
                sasl: None,
                client_cert,
                peer,
                ops: None,
                subs: HashMap::new(),
                held: HashMap::new(),
                routes: HashMap::new(),
                will: None,
                claims: Vec::new(),
            },
        );
    }

    /// Registers a home's virtual connection (no socket; timers work on it).
    pub fn open_home(&mut self, home: u64) {
        self.open(home, Arc::new(ConnShared::default()), None, None);
    }

    pub fn knows(&self, conn: u64) -> bool {
        self.conns.contains_key(&conn)
    }

    /// Drops a connection's state: its operations and subscriptions end with it.
    pub fn forget(&mut self, conn: u64) {
        if let Some(slot) = self.conns.remove(&conn) {
            self.ended(conn, slot);
        }
    }

    /// Closes every connection of this instance (it trapped).
    pub fn close_all(&mut self) {
        let conns: Vec<_> = self.conns.drain().collect();
        for (conn, slot) in conns {
            slot.shared.close();
            if super::homes::is_home(conn) {
                // Through the runtime: this instance's own queue of completions dies with it.
                for (to, event) in self.services.homes.home_ended(conn) {
                    self.runtime.spawn(async move {
                        let _ = to.send(event).await;
                    });
                }
            }
            self.ended(conn, slot);
        }
    }

    /// The connection's principal, or the error a plugin gets before authentication.
    pub(super) fn principal(&self, conn: u64) -> Result<&Principal, OpError> {
        match self.conns.get(&conn) {
            None => Err(op_error(ErrorKind::NotFound, "no such connection")),
            Some(ConnSlot {
                principal: None, ..
            }) => Err(op_error(
                ErrorKind::NotAuthorized,
                "the connection has not authenticated",
            )),
            Some(ConnSlot {
                principal: Some(p), ..
            }) => Ok(p),
        }
    }

    /// A full topic URL for a plugin's short name, checked, that the principal may use for
    /// `action`.
    pub(super) fn authorized_topic(
        &self,
        conn: u64,
        name: &str,
        action: ActionName,
    ) -> Result<String, OpError> {
        let url = self.topic(conn, name)?;
        let principal = self.principal(conn)?;
        if !self.services.tenancy.authorize(principal, name, action) {
            return Err(op_error(
                ErrorKind::NotAuthorized,
                format!("{} may not {action:?} on {name}", principal.user),
            ));
        }
        Ok(url)
    }

    /// A full topic URL for a plugin's short name, checked.
    fn topic(&self, conn: u64, name: &str) -> Result<String, OpError> {
        let principal = self.principal(conn)?;
        crate::names::validate_name(name)
            .map_err(|e| op_error(ErrorKind::InvalidName, e.to_string()))?;
        Ok(tenancy::topic_url(principal, name))
    }

    /// Counts one more subscription of the connection against its quotas: its meters (to
    /// release it with), or the error a plugin gets at the tenant's or user's limit.
    pub(super) fn admit_subscription(&self, conn: u64) -> Result<Option<Meters>, OpError> {
        let meters = self.conns.get(&conn).and_then(|s| s.meters.clone());
        if meters
            .as_ref()
            .is_some_and(|m| !m.admit(crate::quota::Gauge::Subscriptions))
        {
            return Err(op_error(
                ErrorKind::QuotaExceeded,
                "too many subscriptions for this tenant or user",
            ));
        }
        Ok(meters)
    }

    /// The connection's namespace kv topic.
    pub(super) fn kv_topic(&self, conn: u64) -> Result<String, OpError> {
        let principal = self.principal(conn)?;
        Ok(tenancy::topic_url(principal, KV_TOPIC))
    }

    /// A plugin's kv key as the host stores it: keys are per plugin, so that one plugin
    /// cannot read another's state.
    pub(super) fn kv_key(&self, key: &str) -> String {
        format!("{}/{}", self.plugin, key)
    }

    /// Completes an operation whose outcome is known now: the worker delivers it after the
    /// plugin's current call returns (`take_ready`), before waiting for more events. A
    /// connect used to cross between the worker and the runtime's threads for each of these
    /// (two thread wake-ups apiece); see docs/performance-log.md, "Connect storm profile".
    pub(super) fn finish_now(&mut self, event: Event) {
        self.ready.push_back(event);
    }

    /// The next completion [`HostState::finish_now`] queued, if any.
    pub fn take_ready(&mut self) -> Option<Event> {
        self.ready.pop_front()
    }

    /// Sends a completion event from the runtime (never blocks the worker).
    pub(super) fn complete(&self, event: Event) {
        let events = self.events.clone();
        self.runtime.spawn(async move {
            let _ = events.send(event).await;
        });
    }

    /// Runs `outcome` on the runtime and completes the operation `token` with it as a kv
    /// result (`on-kv-result`: the counts of `durable` and `queues` answer this way).
    pub(super) fn complete_kv_later(
        &self,
        conn: u64,
        token: u64,
        outcome: impl std::future::Future<Output = Result<Option<Vec<u8>>, OpError>> + Send + 'static,
    ) {
        let events = self.events.clone();
        self.runtime.spawn(async move {
            let outcome = outcome.await;
            let _ = events
                .send(Event::KvResult {
                    conn,
                    token,
                    outcome,
                })
                .await;
        });
    }
}

impl types::Host for HostState {}
