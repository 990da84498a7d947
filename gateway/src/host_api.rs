//! The host calls of the plugin ABI (`magnetar:plugin/host`), carried out for one instance.
//!
//! Host calls run on the instance's worker thread and never block it: `send` queues bytes on
//! the connection; long operations (authenticate, publish, subscribe, kv) are handed to
//! tasks on the async runtime, whose completions come back to the worker as events carrying
//! the plugin's token. A connection's publishes and kv operations go through one ordered
//! task per connection, so they reach Pulsar in the order the plugin issued them, while many
//! are in flight. Deliveries come from one task per subscription, which never hands the
//! plugin more than `max-unacked` unacknowledged messages and waits while the connection's
//! output is congested: backpressure from the client's socket reaches the broker's flow
//! permits.
//!
//! Nothing before a successful `authenticate` reaches the backend, and every name the plugin
//! uses is placed in the principal's namespace (see `tenancy`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::FuturesOrdered;
use futures::{FutureExt, StreamExt};
use tokio::sync::mpsc;
use wasmtime::component::ResourceTable;
use wasmtime::StoreLimits;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::backend::{Backend, OutMessage, SubscribeOptions};
use crate::config::ActionName;
use crate::connection::ConnShared;
use crate::crypto::KeyRing;
use crate::kv::{Kv, KV_TOPIC};
use crate::plugin_host::bindings::magnetar::plugin::{host, types};
use crate::plugin_host::Event;
use crate::quota::{Gauge, Meters, Quotas};
use crate::tenancy::{self, Credentials, Principal, Tenancy};

use types::{ErrorKind, OpError};

/// Operations queued per connection before `publish` fails fast with `quota-exceeded`.
const OPS_QUEUE: usize = 4096;
/// How long a connection's operations task outlives its last operation: an idle connection
/// holds no task and no queue memory.
const OPS_LINGER: std::time::Duration = std::time::Duration::from_secs(2);

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What every instance shares: the backend and the tenancy.
pub struct Services {
    pub backend: Arc<Backend>,
    pub tenancy: Arc<Tenancy>,
    pub kv: Arc<Kv>,
    /// Keys claimed by connections (`claim`) and delayed wills, across all instances.
    pub claims: Claims,
    /// Tenants' data keys: payloads of encrypting tenants are sealed at rest.
    pub keys: Arc<KeyRing>,
    /// Rate limits, connection and subscription limits, usage.
    pub quotas: Arc<Quotas>,
    /// Tenants' key pairs for Pulsar's end-to-end encryption format, loaded on first use.
    pub pulsar_e2e: crate::crypto::E2eKeys,
}

impl Services {
    /// Seals a message's payload if the tenant of `topic` (a full URL) encrypts at rest.
    pub fn seal(&self, topic: &str, msg: &mut OutMessage) -> Result<(), OpError> {
        let Some(tenant) = tenancy::tenant_of(topic) else {
            return Ok(());
        };
        if !self.tenancy.encrypts(tenant) {
            return Ok(());
        }
        if let Some(cfg) = self.tenancy.pulsar_encryption(tenant) {
            let sealed = self
                .pulsar_e2e
                .get(tenant, &cfg)
                .and_then(|k| k.seal(&msg.payload))
                .map_err(|e| {
                    tracing::error!(tenant, error = %e, "cannot seal a payload (Pulsar format)");
                    op_error(ErrorKind::Internal, "encryption at rest failed")
                })?;
            msg.payload = sealed.payload;
            msg.encryption = Some((sealed.encryption_keys, sealed.encryption_param));
            return Ok(());
        }
        let (sealed, key) = self.keys.seal(tenant, &msg.payload).map_err(|e| {
            tracing::error!(tenant, error = %e, "cannot seal a payload");
            op_error(ErrorKind::Internal, "encryption at rest failed")
        })?;
        msg.payload = sealed;
        msg.properties
            .insert(crate::crypto::KEY_PROPERTY.to_string(), key);
        Ok(())
    }

    /// Opens a delivered payload that was sealed at rest (its properties name the key); the
    /// key property is removed. Plaintext payloads pass through.
    pub fn unseal(
        &self,
        topic: &str,
        properties: &mut Vec<types::Property>,
        pulsar_encryption: Option<(&[pulsar::proto::EncryptionKeys], &[u8])>,
        payload: Vec<u8>,
    ) -> Result<Vec<u8>, crate::crypto::CryptoError> {
        if let Some((keys, iv)) = pulsar_encryption.filter(|(k, _)| !k.is_empty()) {
            let tenant = tenancy::tenant_of(topic).unwrap_or_default();
            let cfg = self.tenancy.pulsar_encryption(tenant).ok_or_else(|| {
                crate::crypto::CryptoError::NoKey {
                    tenant: tenant.to_string(),
                    key_id: "(no Pulsar encryption key pair configured)".into(),
                }
            })?;
            return self.pulsar_e2e.get(tenant, &cfg)?.open(keys, iv, &payload);
        }
        let Some(i) = properties
            .iter()
            .position(|p| p.key == crate::crypto::KEY_PROPERTY)
        else {
            return Ok(payload);
        };
        let key = properties.remove(i).value;
        let tenant = tenancy::tenant_of(topic).unwrap_or_default();
        self.keys.open(tenant, &key, &payload)
    }
}

/// A backend operation of one connection, run in issue order.
enum Op {
    Publish {
        token: u64,
        topic: String,
        msg: OutMessage,
        /// Held back until then by a publish-rate quota.
        not_before: Option<std::time::Instant>,
    },
    KvGet {
        token: u64,
        topic: String,
        key: String,
    },
    KvPut {
        token: u64,
        topic: String,
        key: String,
        value: Option<Vec<u8>>,
    },
    KvScan {
        token: u64,
        topic: String,
        /// The host's per-plugin key prefix, stripped from the keys found.
        plugin_prefix: String,
        prefix: String,
        start_after: Option<String>,
        limit: usize,
    },
}

/// A connection's backend operations waiting to run, in issue order.
#[derive(Default)]
struct OpsQueue {
    state: std::sync::Mutex<OpsState>,
    /// Wakes the running task when an operation is queued.
    added: tokio::sync::Notify,
}

#[derive(Default)]
struct OpsState {
    ops: std::collections::VecDeque<Op>,
    /// A task is running the operations (there is never more than one).
    running: bool,
}

impl OpsQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, OpsState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A command to a subscription's delivery task.
enum SubCmd {
    Ack(u64),
    AckMany(Vec<u64>),
    Close { delete: bool },
}

/// What the host keeps per connection of an instance.
struct ConnSlot {
    shared: Arc<ConnShared>,
    principal: Option<Principal>,
    /// The client's address, for rate-limiting failed authentication.
    peer: Option<std::net::IpAddr>,
    /// The operations queue, made by the first operation (`queue_op`); its task runs only
    /// while there is work.
    ops: Option<Arc<OpsQueue>>,
    subs: HashMap<u64, mpsc::Sender<SubCmd>>,
    /// The last will to publish when the connection ends (`set-will`).
    will: Option<PendingWill>,
    /// Keys this connection claimed (`claim`), in `Claims` form.
    claims: Vec<String>,
    /// Its tenant's and user's quotas, once authenticated (holding one connection).
    meters: Option<Meters>,
    /// A SCRAM exchange waiting for the client's final message.
    sasl: Option<crate::sasl::ScramPending>,
    /// Common name of the client certificate verified at the TLS handshake.
    client_cert: Option<String>,
}

/// The store data of one instance.
pub struct HostState {
    plugin: Arc<str>,
    wasi: WasiCtx,
    table: ResourceTable,
    limits: StoreLimits,
    services: Arc<Services>,
    events: mpsc::Sender<Event>,
    runtime: tokio::runtime::Handle,
    conns: HashMap<u64, ConnSlot>,
    next_sub: u64,
    /// The instance's timer task, started by the first `set-timer`.
    timers: Option<mpsc::UnboundedSender<Timer>>,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

fn op_error(kind: ErrorKind, message: impl Into<String>) -> OpError {
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
                sasl: None,
                client_cert,
                peer,
                ops: None,
                subs: HashMap::new(),
                will: None,
                claims: Vec::new(),
            },
        );
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
            self.ended(conn, slot);
        }
    }

    /// A connection is gone: its claims are released and its will, if any, is published.
    fn ended(&self, conn: u64, slot: ConnSlot) {
        if let Some(m) = &slot.meters {
            m.release(Gauge::Connections);
        }
        let services = &self.services;
        let mut claims = services.claims.lock();
        // Taken over: another connection holds one of this one's keys, so its session lives on.
        let mut resumed = false;
        for key in &slot.claims {
            match claims.holders.get(key) {
                Some(h) if h.conn == conn => {
                    claims.holders.remove(key);
                }
                Some(_) => resumed = true,
                None => {}
            }
        }
        let Some(will) = slot.will else { return };
        if will.delay_ms == 0 {
            self.runtime
                .spawn(publish_will(services.clone(), will, None));
        } else if !resumed {
            claims.next_will += 1;
            let serial = claims.next_will;
            let keys = slot.claims.clone();
            let task = self.runtime.spawn(publish_will(
                services.clone(),
                will,
                Some((serial, keys.clone())),
            ));
            for key in keys {
                claims
                    .delayed_wills
                    .insert(key, (serial, task.abort_handle()));
            }
        }
    }

    /// Records the principal of a successful authentication; `None` if the connection is gone.
    pub fn auth_completed(
        &mut self,
        conn: u64,
        outcome: Result<Principal, OpError>,
    ) -> Option<Result<types::Principal, OpError>> {
        let slot = self.conns.get_mut(&conn)?;
        let services = &self.services;
        let outcome = outcome.and_then(|p| {
            let tenant = services
                .tenancy
                .tenant(&p.tenant)
                .ok_or_else(|| op_error(ErrorKind::NotAuthorized, "the tenant does not exist"))?;
            let meters = services.quotas.meters(
                &p.tenant,
                tenant.limits,
                &p.user,
                services.tenancy.user_limits(&p.user),
            );
            if !meters.admit(Gauge::Connections) {
                tracing::info!(conn, tenant = %p.tenant, user = %p.user, "connection limit reached");
                return Err(op_error(
                    ErrorKind::QuotaExceeded,
                    "too many connections for this tenant or user",
                ));
            }
            if let Some(old) = slot.meters.replace(meters) {
                old.release(Gauge::Connections);
            }
            Ok(p)
        });
        Some(outcome.map(|p| {
            let wire = types::Principal {
                user: p.user.clone(),
                tenant: p.tenant.clone(),
                namespace: p.namespace.clone(),
            };
            slot.principal = Some(p);
            wire
        }))
    }

    /// The connection's principal, or the error a plugin gets before authentication.
    fn principal(&self, conn: u64) -> Result<&Principal, OpError> {
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
    fn authorized_topic(
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
        tenancy::validate_name(name)
            .map_err(|e| op_error(ErrorKind::InvalidName, e.to_string()))?;
        Ok(tenancy::topic_url(principal, name))
    }

    /// Sends a completion event from the runtime (never blocks the worker).
    fn complete(&self, event: Event) {
        let events = self.events.clone();
        self.runtime.spawn(async move {
            let _ = events.send(event).await;
        });
    }

    fn queue_op(&mut self, conn: u64, op: Op) {
        let Some(slot) = self.conns.get_mut(&conn) else {
            return;
        };
        let queue = slot.ops.get_or_insert_with(Default::default);
        // Counted before the task can see (and finish) it.
        slot.shared.op_started();
        let start = {
            let mut state = queue.lock();
            if state.ops.len() >= OPS_QUEUE {
                drop(state);
                slot.shared.op_finished();
                return self.refuse_op(conn, op);
            }
            state.ops.push_back(op);
            !std::mem::replace(&mut state.running, true)
        };
        if start {
            let task = run_ops(
                conn,
                queue.clone(),
                self.services.clone(),
                self.events.clone(),
                slot.shared.clone(),
            );
            self.runtime.spawn(task);
        } else {
            queue.added.notify_one();
        }
    }

    /// Fails an operation the connection's full queue refused.
    fn refuse_op(&self, conn: u64, refused: Op) {
        let message = "too many operations in flight on this connection";
        let event = match refused {
            Op::Publish { token, .. } => Event::PublishResult {
                conn,
                token,
                outcome: Err(op_error(ErrorKind::QuotaExceeded, message)),
            },
            Op::KvGet { token, .. } | Op::KvPut { token, .. } => Event::KvResult {
                conn,
                token,
                outcome: Err(op_error(ErrorKind::QuotaExceeded, message)),
            },
            Op::KvScan { token, .. } => Event::KvScanResult {
                conn,
                token,
                outcome: Err(op_error(ErrorKind::QuotaExceeded, message)),
            },
        };
        self.complete(event);
    }
}

impl types::Host for HostState {}

impl host::Host for HostState {
    fn send(&mut self, conn: u64, data: Vec<u8>) {
        if let Some(slot) = self.conns.get(&conn) {
            slot.shared.send(Bytes::from(data));
        }
    }

    fn set_reading(&mut self, conn: u64, reading: bool) {
        if let Some(slot) = self.conns.get(&conn) {
            slot.shared.set_reading(reading);
        }
    }

    fn close(&mut self, conn: u64, reason: String) {
        if let Some(slot) = self.conns.get(&conn) {
            tracing::info!(plugin = %self.plugin, conn, %reason, "plugin closed the connection");
            slot.shared.close();
        }
    }

    fn authenticate(&mut self, conn: u64, token: u64, creds: types::Credentials) {
        if !self.knows(conn) {
            return;
        }
        let client_cert = self.conns.get(&conn).and_then(|s| s.client_cert.clone());
        let creds = match creds {
            // A client that proved who it is with a certificate needs no other credentials.
            types::Credentials::Anonymous => match client_cert {
                Some(cn) => Credentials::Certificate(cn),
                None => Credentials::Anonymous,
            },
            types::Credentials::Password(up) => Credentials::Password {
                user: up.user,
                password: up.password,
            },
            types::Credentials::Token(t) => Credentials::Token(t),
        };
        let peer = self.conns.get(&conn).and_then(|s| s.peer);
        let tenancy = self.services.tenancy.clone();
        let events = self.events.clone();
        let plugin = self.plugin.clone();
        self.runtime.spawn(async move {
            let outcome = tenancy.authenticate(creds, peer).await.map_err(|e| {
                tracing::info!(%plugin, conn, ?peer, error = %e, "authentication failed");
                op_error(ErrorKind::NotAuthorized, "not authorized")
            });
            let _ = events
                .send(Event::AuthResult {
                    conn,
                    token,
                    outcome,
                })
                .await;
        });
    }

    fn publish(&mut self, conn: u64, token: u64, msg: types::OutboundMessage) {
        let topic = self.authorized_topic(conn, &msg.topic, ActionName::Produce);
        let bytes = msg.payload.len();
        let mut out = OutMessage {
            key: msg.key,
            payload: msg.payload,
            properties: msg
                .properties
                .into_iter()
                .filter(|p| p.key != crate::crypto::KEY_PROPERTY)
                .map(|p| (p.key, p.value))
                .collect(),
            encryption: None,
        };
        let storage_full = self
            .conns
            .get(&conn)
            .and_then(|s| s.meters.as_ref())
            .is_some_and(|m| m.tenant.storage_full());
        let topic = topic.and_then(|t| {
            if storage_full {
                return Err(op_error(
                    ErrorKind::QuotaExceeded,
                    "the tenant's storage quota is used up",
                ));
            }
            Ok(t)
        });
        match topic.and_then(|t| self.services.seal(&t, &mut out).map(|_| t)) {
            Ok(topic) => {
                let not_before = self
                    .conns
                    .get(&conn)
                    .and_then(|s| s.meters.as_ref())
                    .and_then(|m| m.publish_at(bytes));
                self.queue_op(
                    conn,
                    Op::Publish {
                        token,
                        topic,
                        msg: out,
                        not_before,
                    },
                );
            }
            Err(e) => self.complete(Event::PublishResult {
                conn,
                token,
                outcome: Err(e),
            }),
        }
    }

    fn subscribe(&mut self, conn: u64, token: u64, spec: types::SubscriptionSpec) {
        let topic = match self
            .authorized_topic(conn, &spec.topic, ActionName::Consume)
            .and_then(|t| {
                tenancy::validate_name(&spec.name)
                    .map(|_| t)
                    .map_err(|e| op_error(ErrorKind::InvalidName, e.to_string()))
            }) {
            Ok(t) => t,
            Err(e) => {
                return self.complete(Event::SubscribeResult {
                    conn,
                    token,
                    outcome: Err(e),
                })
            }
        };
        let sub = self.next_sub;
        self.next_sub += 1;
        let max_unacked = spec.max_unacked.clamp(1, 10_000);
        let (cmd_tx, cmd_rx) = mpsc::channel(max_unacked as usize + 16);
        let Some(slot) = self.conns.get_mut(&conn) else {
            return;
        };
        let meters = slot.meters.clone();
        if meters
            .as_ref()
            .is_some_and(|m| !m.admit(Gauge::Subscriptions))
        {
            return self.complete(Event::SubscribeResult {
                conn,
                token,
                outcome: Err(op_error(
                    ErrorKind::QuotaExceeded,
                    "too many subscriptions for this tenant or user",
                )),
            });
        }
        slot.subs.insert(sub, cmd_tx);
        let opts = SubscribeOptions {
            topic,
            subscription: spec.name,
            sub_type: match spec.mode {
                types::SubMode::Exclusive => pulsar::SubType::Exclusive,
                types::SubMode::Shared => pulsar::SubType::Shared,
                types::SubMode::Failover => pulsar::SubType::Failover,
                types::SubMode::KeyShared => pulsar::SubType::KeyShared,
            },
            durable: spec.durable,
            earliest: matches!(spec.initial_position, types::InitialPosition::Earliest),
            receiver_queue: max_unacked,
        };
        let task = run_subscription(
            SubTask {
                conn,
                sub,
                token,
                max_unacked: max_unacked as usize,
                events: self.events.clone(),
                shared: slot.shared.clone(),
                backend: self.services.backend.clone(),
                services: self.services.clone(),
                meters,
            },
            opts,
            cmd_rx,
        );
        self.runtime.spawn(task);
    }

    fn unsubscribe(&mut self, conn: u64, sub: u64, delete: bool) {
        if let Some(tx) = self.conns.get_mut(&conn).and_then(|s| s.subs.remove(&sub)) {
            let _ = tx.try_send(SubCmd::Close { delete });
        }
    }

    fn ack(&mut self, conn: u64, sub: u64, delivery_id: u64) {
        if let Some(tx) = self.conns.get(&conn).and_then(|s| s.subs.get(&sub)) {
            if tx.try_send(SubCmd::Ack(delivery_id)).is_err() {
                tracing::warn!(plugin = %self.plugin, conn, sub, "ack dropped: more acks than deliveries");
            }
        }
    }

    fn ack_many(&mut self, conn: u64, sub: u64, delivery_ids: Vec<u64>) {
        if let Some(tx) = self.conns.get(&conn).and_then(|s| s.subs.get(&sub)) {
            if tx.try_send(SubCmd::AckMany(delivery_ids)).is_err() {
                tracing::warn!(plugin = %self.plugin, conn, sub, "acks dropped: more acks than deliveries");
            }
        }
    }

    fn set_timer(&mut self, conn: u64, token: u64, delay_ms: u64) {
        let Some(slot) = self.conns.get(&conn) else {
            return;
        };
        let timer = Timer {
            at: tokio::time::Instant::now() + std::time::Duration::from_millis(delay_ms),
            seq: 0,
            conn,
            token,
            shared: slot.shared.clone(),
        };
        let timers = self.timers.get_or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            self.runtime.spawn(run_timers(rx, self.events.clone()));
            tx
        });
        let _ = timers.send(timer);
    }

    fn kv_get(&mut self, conn: u64, token: u64, key: String) {
        match self.kv_topic(conn) {
            Ok(topic) => {
                // Keys are per plugin: one plugin cannot read another's state.
                let key = format!("{}/{}", self.plugin, key);
                self.queue_op(conn, Op::KvGet { token, topic, key })
            }
            Err(e) => self.complete(Event::KvResult {
                conn,
                token,
                outcome: Err(e),
            }),
        }
    }

    fn kv_put(&mut self, conn: u64, token: u64, key: String, value: Option<Vec<u8>>) {
        match self.kv_topic(conn) {
            Ok(topic) => {
                let key = format!("{}/{}", self.plugin, key);
                self.queue_op(
                    conn,
                    Op::KvPut {
                        token,
                        topic,
                        key,
                        value,
                    },
                )
            }
            Err(e) => self.complete(Event::KvResult {
                conn,
                token,
                outcome: Err(e),
            }),
        }
    }

    fn log(&mut self, level: types::LogLevel, message: String) {
        let plugin = &*self.plugin;
        match level {
            types::LogLevel::Trace => tracing::trace!(plugin, "{message}"),
            types::LogLevel::Debug => tracing::debug!(plugin, "{message}"),
            types::LogLevel::Info => tracing::info!(plugin, "{message}"),
            types::LogLevel::Warn => tracing::warn!(plugin, "{message}"),
            types::LogLevel::Error => tracing::error!(plugin, "{message}"),
        }
    }

    fn now_ms(&mut self) -> u64 {
        now_ms()
    }

    fn kv_scan(
        &mut self,
        conn: u64,
        token: u64,
        prefix: String,
        start_after: Option<String>,
        limit: u32,
    ) {
        match self.kv_topic(conn) {
            Ok(topic) => {
                let plugin_prefix = format!("{}/", self.plugin);
                let op = Op::KvScan {
                    token,
                    topic,
                    prefix: format!("{plugin_prefix}{prefix}"),
                    start_after: start_after.map(|a| format!("{plugin_prefix}{a}")),
                    plugin_prefix,
                    limit: limit.clamp(1, KV_SCAN_MAX) as usize,
                };
                self.queue_op(conn, op)
            }
            Err(e) => self.complete(Event::KvScanResult {
                conn,
                token,
                outcome: Err(e),
            }),
        }
    }

    fn set_will(&mut self, conn: u64, will: Option<types::Will>) {
        let will = match will {
            None => None,
            Some(w) => match self.pending_will(conn, w) {
                Ok(w) => Some(w),
                Err(e) => {
                    tracing::warn!(plugin = %self.plugin, conn, error = %e.message, "will refused");
                    None
                }
            },
        };
        if let Some(slot) = self.conns.get_mut(&conn) {
            slot.will = will;
        }
    }

    fn sasl_mechanisms(&mut self) -> Vec<String> {
        crate::sasl::MECHANISMS
            .iter()
            .map(|m| m.to_string())
            .collect()
    }

    fn authenticate_sasl(&mut self, conn: u64, token: u64, mechanism: String, response: Vec<u8>) {
        use crate::plugin_host::SaslStep;
        use crate::sasl::{self, ScramHash};
        let Some(slot) = self.conns.get_mut(&conn) else {
            return;
        };
        let peer = slot.peer;
        let pending = slot.sasl.take();
        let tenancy = self.services.tenancy.clone();
        let events = self.events.clone();
        let plugin = self.plugin.clone();
        let mech = mechanism.clone();
        let refused = move |why: String| {
            tracing::info!(%plugin, conn, ?peer, mechanism = %mech, error = %why, "SASL authentication failed");
            op_error(ErrorKind::NotAuthorized, "not authorized")
        };
        let send = move |outcome: Result<SaslStep, OpError>| async move {
            let _ = events
                .send(Event::SaslResult {
                    conn,
                    token,
                    outcome,
                })
                .await;
        };
        if mechanism == "PLAIN" {
            let parsed = sasl::parse_plain(&response);
            self.runtime.spawn(async move {
                let outcome = match parsed {
                    Ok((user, password)) => tenancy
                        .authenticate(Credentials::Password { user, password }, peer)
                        .await
                        .map(|p| SaslStep::Success(p, Vec::new()))
                        .map_err(|e| refused(e.to_string())),
                    Err(e) => Err(refused(e.to_string())),
                };
                send(outcome).await;
            });
            return;
        }
        let Some(hash) = ScramHash::from_mechanism(&mechanism) else {
            let e = refused(sasl::SaslError::Mechanism(mechanism.clone()).to_string());
            self.runtime.spawn(send(Err(e)));
            return;
        };
        match pending {
            // The client's first message: answer with the server-first challenge.
            None => {
                match sasl::scram_first(hash, &response, |u| tenancy.scram_credential(u, hash)) {
                    Ok((challenge, state)) => {
                        slot.sasl = Some(state);
                        self.runtime.spawn(send(Ok(SaslStep::Challenge(challenge))));
                    }
                    Err(e) => {
                        let e = refused(e.to_string());
                        self.runtime.spawn(send(Err(e)));
                    }
                }
            }
            // The client's final message: check the proof.
            Some(state) => {
                let checked = sasl::scram_final(&state, &response);
                self.runtime.spawn(async move {
                    tenancy.note_attempt(peer, checked.is_ok()).await;
                    let outcome = match checked {
                        Ok(final_data) => match tenancy.principal_of(state.user()) {
                            Some(p) => Ok(SaslStep::Success(p, final_data)),
                            None => Err(refused("the user was deleted".into())),
                        },
                        Err(e) => Err(refused(e.to_string())),
                    };
                    send(outcome).await;
                });
            }
        }
    }

    fn claim(&mut self, conn: u64, token: u64, key: String) {
        let full = match self.principal(conn) {
            Ok(p) => format!("{}\0{}/{}\0{key}", self.plugin, p.tenant, p.namespace),
            Err(e) => {
                return self.complete(Event::ClaimResult {
                    conn,
                    token,
                    outcome: Err(e),
                })
            }
        };
        let Some(slot) = self.conns.get_mut(&conn) else {
            return;
        };
        if !slot.claims.contains(&full) {
            slot.claims.push(full.clone());
        }
        let holder = ClaimHolder {
            conn,
            events: self.events.clone(),
            shared: slot.shared.clone(),
        };
        let previous = {
            let mut claims = self.services.claims.lock();
            if let Some((_, delayed)) = claims.delayed_wills.remove(&full) {
                delayed.abort();
            }
            claims.holders.insert(full, holder)
        };
        match previous {
            Some(prev) if prev.conn != conn && !prev.shared.is_closing() => {
                let events = self.events.clone();
                self.runtime.spawn(async move {
                    let _ = prev
                        .events
                        .send(Event::ClaimLost {
                            conn: prev.conn,
                            key,
                        })
                        .await;
                    if tokio::time::timeout(CLAIM_GRACE, prev.shared.closed())
                        .await
                        .is_err()
                    {
                        prev.shared.close();
                    }
                    let outcome = Ok(());
                    let _ = events
                        .send(Event::ClaimResult {
                            conn,
                            token,
                            outcome,
                        })
                        .await;
                });
            }
            _ => self.complete(Event::ClaimResult {
                conn,
                token,
                outcome: Ok(()),
            }),
        }
    }
}

impl HostState {
    fn kv_topic(&self, conn: u64) -> Result<String, OpError> {
        let principal = self.principal(conn)?;
        Ok(tenancy::topic_url(principal, KV_TOPIC))
    }

    /// A will resolved against the connection's principal, names checked.
    fn pending_will(&self, conn: u64, w: types::Will) -> Result<PendingWill, OpError> {
        // Checked and sealed now, like a `publish`: the same rules whenever it goes out.
        let topic = self.authorized_topic(conn, &w.msg.topic, ActionName::Produce)?;
        let kv = match w.kv {
            Some(write) => Some((
                self.kv_topic(conn)?,
                format!("{}/{}", self.plugin, write.key),
                write.value,
            )),
            None => None,
        };
        let mut msg = OutMessage {
            key: w.msg.key,
            payload: w.msg.payload,
            properties: w
                .msg
                .properties
                .into_iter()
                .filter(|p| p.key != crate::crypto::KEY_PROPERTY)
                .map(|p| (p.key, p.value))
                .collect(),
            encryption: None,
        };
        self.services.seal(&topic, &mut msg)?;
        Ok(PendingWill {
            topic,
            msg,
            kv,
            delay_ms: w.delay_ms,
        })
    }
}

/// Most entries one `kv-scan` returns.
const KV_SCAN_MAX: u32 = 1000;
/// How long an earlier holder of a claimed key has to close before the host closes it.
const CLAIM_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// A will, resolved: full topic URLs and the host's kv key.
struct PendingWill {
    topic: String,
    msg: OutMessage,
    /// (kv topic, kv key, value) written before the publish.
    kv: Option<(String, String, Option<Vec<u8>>)>,
    delay_ms: u64,
}

/// Who holds a claimed key.
struct ClaimHolder {
    conn: u64,
    events: mpsc::Sender<Event>,
    shared: Arc<ConnShared>,
}

/// The keys connections of this process claimed (`claim`), and the delayed wills a new claim
/// cancels. Keys are `<plugin>\0<tenant>/<namespace>\0<key>`. One lock, never held across an
/// `.await`.
#[derive(Default)]
pub struct Claims {
    inner: std::sync::Mutex<ClaimsInner>,
}

#[derive(Default)]
struct ClaimsInner {
    holders: HashMap<String, ClaimHolder>,
    /// Delayed wills of ended connections by claim key: (serial, task).
    delayed_wills: HashMap<String, (u64, tokio::task::AbortHandle)>,
    next_will: u64,
}

impl Claims {
    fn lock(&self) -> std::sync::MutexGuard<'_, ClaimsInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Publishes a will (after its delay): the kv write first, then the message. `delayed`
/// names the entries to remove from `Claims::delayed_wills` once it ran.
async fn publish_will(
    services: Arc<Services>,
    will: PendingWill,
    delayed: Option<(u64, Vec<String>)>,
) {
    if will.delay_ms > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(will.delay_ms)).await;
    }
    if let Some((serial, keys)) = delayed {
        let mut claims = services.claims.lock();
        for key in keys {
            if claims
                .delayed_wills
                .get(&key)
                .is_some_and(|(s, _)| *s == serial)
            {
                claims.delayed_wills.remove(&key);
            }
        }
    }
    if let Some((topic, key, value)) = will.kv {
        if let Err(e) = services.kv.put(&topic, &key, value).await {
            tracing::warn!(error = %e, "will: kv write failed");
        }
    }
    // Sealed already, when it was set (`set_will`).
    let stored = match services.backend.enqueue(&will.topic, will.msg).await {
        Ok(receipt) => receipt.await.map(|_| ()).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    match stored {
        Ok(()) => tracing::debug!(topic = %will.topic, "will published"),
        Err(e) => tracing::warn!(topic = %will.topic, error = %e, "will not published"),
    }
}

/// Runs a connection's backend operations in issue order, many in flight. Ends after
/// [`OPS_LINGER`] with nothing queued and nothing in flight (the connection may be gone by
/// then: what it queued still ran); the next operation starts a new task.
async fn run_ops(
    conn: u64,
    queue: Arc<OpsQueue>,
    services: Arc<Services>,
    events: mpsc::Sender<Event>,
    shared: Arc<ConnShared>,
) {
    // The kv's futures are large: boxed while they run, so that the task (which lives as long
    // as the connection is busy) stays small. A publish's is small (`Backend::enqueue`) and
    // runs in place: one allocation less per message.
    let mut receipts = FuturesOrdered::new();
    let idle = tokio::time::sleep(OPS_LINGER);
    tokio::pin!(idle);
    loop {
        // Receipts already in: their events are due before more work starts.
        receipts_done(conn, None, &mut receipts, &shared, &events).await;
        let next = queue.lock().ops.pop_front();
        let Some(op) = next else {
            tokio::select! {
                // A permit is kept when nobody waits: an operation queued since the check
                // above wakes this at once.
                () = queue.added.notified() => {}
                Some(first) = receipts.next(), if !receipts.is_empty() => {
                    receipts_done(conn, Some(first), &mut receipts, &shared, &events).await;
                }
                () = &mut idle, if receipts.is_empty() => {
                    let mut state = queue.lock();
                    if state.ops.is_empty() {
                        state.running = false;
                        state.ops = Default::default();
                        return;
                    }
                }
            }
            continue;
        };
        idle.as_mut()
            .reset(tokio::time::Instant::now() + OPS_LINGER);
        match op {
            Op::Publish {
                token,
                topic,
                msg,
                not_before,
            } => {
                if let Some(at) = not_before {
                    tokio::time::sleep_until(at.into()).await;
                }
                let sent = services.backend.enqueue(&topic, msg).await;
                receipts.push_back(async move {
                    let outcome = match sent {
                        Ok(receipt) => receipt.await.map(|_| ()).map_err(|e| {
                            op_error(ErrorKind::Backend, format!("storing on {topic}: {e}"))
                        }),
                        Err(e) => Err(op_error(ErrorKind::Backend, e.to_string())),
                    };
                    types::PublishResult { token, outcome }
                });
            }
            Op::KvGet { token, topic, key } => {
                let outcome = Box::pin(services.kv.get(&topic, &key))
                    .await
                    .map_err(|e| op_error(ErrorKind::Backend, e.to_string()));
                op_done(
                    &shared,
                    &events,
                    Event::KvResult {
                        conn,
                        token,
                        outcome,
                    },
                )
                .await;
            }
            Op::KvScan {
                token,
                topic,
                plugin_prefix,
                prefix,
                start_after,
                limit,
            } => {
                let outcome = Box::pin(services.kv.scan(
                    &topic,
                    &prefix,
                    start_after.as_deref(),
                    limit,
                ))
                .await
                .map(|found| {
                    found
                        .into_iter()
                        .map(|(key, value)| types::KvEntry {
                            key: key.strip_prefix(&plugin_prefix).unwrap_or(&key).to_string(),
                            value,
                        })
                        .collect()
                })
                .map_err(|e| op_error(ErrorKind::Backend, e.to_string()));
                op_done(
                    &shared,
                    &events,
                    Event::KvScanResult {
                        conn,
                        token,
                        outcome,
                    },
                )
                .await;
            }
            Op::KvPut {
                token,
                topic,
                key,
                value,
            } => {
                let outcome = Box::pin(services.kv.put(&topic, &key, value))
                    .await
                    .map(|_| None)
                    .map_err(|e| op_error(ErrorKind::Backend, e.to_string()));
                op_done(
                    &shared,
                    &events,
                    Event::KvResult {
                        conn,
                        token,
                        outcome,
                    },
                )
                .await;
            }
        }
    }
}

/// Hands the plugin `first` and every other receipt already in, as one event: a batch of
/// the backend's receipts arrives together.
async fn receipts_done<F>(
    conn: u64,
    first: Option<types::PublishResult>,
    receipts: &mut FuturesOrdered<F>,
    shared: &ConnShared,
    events: &mpsc::Sender<Event>,
) where
    F: std::future::Future<Output = types::PublishResult>,
{
    let mut results: Vec<_> = first.into_iter().collect();
    while let Some(Some(r)) = receipts.next().now_or_never() {
        results.push(r);
    }
    if results.is_empty() {
        return;
    }
    for _ in &results {
        shared.op_finished();
    }
    let event = match <[_; 1]>::try_from(results) {
        Ok([r]) => Event::PublishResult {
            conn,
            token: r.token,
            outcome: r.outcome,
        },
        Err(results) => Event::PublishResults { conn, results },
    };
    let _ = events.send(event).await;
}

/// A plugin timer (`set-timer`), due at `at`.
struct Timer {
    at: tokio::time::Instant,
    /// Order of arming, among timers due at the same instant.
    seq: u64,
    conn: u64,
    token: u64,
    shared: Arc<ConnShared>,
}

impl Timer {
    fn key(&self) -> (tokio::time::Instant, u64) {
        (self.at, self.seq)
    }
}

impl PartialEq for Timer {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for Timer {}

impl PartialOrd for Timer {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Timer {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key().cmp(&other.key())
    }
}

/// Fires the timers of one instance: one task and a heap of deadlines rather than a task per
/// timer (every MQTT connection keeps a keep-alive timer). A timer of a closing connection is
/// dropped. Ends with the instance.
async fn run_timers(mut rx: mpsc::UnboundedReceiver<Timer>, events: mpsc::Sender<Event>) {
    let mut due = std::collections::BinaryHeap::new();
    let mut seq = 0;
    loop {
        let next = due.peek().map(|t: &std::cmp::Reverse<Timer>| t.0.at);
        tokio::select! {
            timer = rx.recv() => {
                let Some(mut timer) = timer else { return };
                seq += 1;
                timer.seq = seq;
                due.push(std::cmp::Reverse(timer));
            }
            () = tokio::time::sleep_until(next.unwrap_or_else(tokio::time::Instant::now)), if next.is_some() => {
                let now = tokio::time::Instant::now();
                while due.peek().is_some_and(|t| t.0.at <= now) {
                    let Some(std::cmp::Reverse(t)) = due.pop() else { break };
                    if !t.shared.is_closing() {
                        let _ = events.send(Event::Timer { conn: t.conn, token: t.token }).await;
                    }
                }
            }
        }
    }
}

/// Reports a finished kv operation of a connection and releases its in-flight slot.
async fn op_done(shared: &ConnShared, events: &mpsc::Sender<Event>, event: Event) {
    shared.op_finished();
    let _ = events.send(event).await;
}

/// What a subscription's delivery task needs.
struct SubTask {
    conn: u64,
    sub: u64,
    token: u64,
    max_unacked: usize,
    events: mpsc::Sender<Event>,
    shared: Arc<ConnShared>,
    backend: Arc<Backend>,
    services: Arc<Services>,
    /// Quotas the subscription counts against (released when it ends).
    meters: Option<Meters>,
}

/// Holds one subscription of a quota until the subscription's task ends.
struct SubscriptionCount(Option<Meters>);

impl Drop for SubscriptionCount {
    fn drop(&mut self) {
        if let Some(m) = &self.0 {
            m.release(Gauge::Subscriptions);
        }
    }
}

/// Opens a consumer, reports the outcome, then delivers until the subscription or its
/// connection closes.
async fn run_subscription(t: SubTask, opts: SubscribeOptions, mut cmds: mpsc::Receiver<SubCmd>) {
    let SubTask {
        conn,
        sub,
        token,
        max_unacked,
        events,
        shared,
        backend,
        services,
        meters,
    } = t;
    let _counted = SubscriptionCount(meters.clone());
    let mut consumer = match backend.subscribe(&opts).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(conn, error = %e, "subscribe failed");
            let outcome = Err(op_error(ErrorKind::Backend, e.to_string()));
            let _ = events
                .send(Event::SubscribeResult {
                    conn,
                    token,
                    outcome,
                })
                .await;
            return;
        }
    };
    if events
        .send(Event::SubscribeResult {
            conn,
            token,
            outcome: Ok(sub),
        })
        .await
        .is_err()
    {
        return;
    }
    // Unacknowledged deliveries by delivery id (= arrival order).
    let mut outstanding: BTreeMap<u64, (String, pulsar::proto::MessageIdData)> = BTreeMap::new();
    // Exclusive and Failover subscriptions have one active consumer reading in order, so a
    // run of acknowledged messages below every unacknowledged one is one cumulative ack.
    let cumulative = matches!(
        opts.sub_type,
        pulsar::SubType::Exclusive | pulsar::SubType::Failover
    );
    let mut next_delivery: u64 = 1;
    let mut delete = false;
    let mut acked = Vec::new();
    let mut batches = PartialBatches::default();
    // Whether every entry so far arrived after the ones before it (see `ack_batch`).
    let mut in_order = true;
    let mut last_entry: Option<(u64, u64)> = None;
    loop {
        let room = max_unacked.saturating_sub(outstanding.len());
        tokio::select! {
            biased;
            cmd = cmds.recv() => {
                // Take every command already queued: the plugin's acks arrive one host call
                // at a time and leave in one batch.
                let mut stop = cmd.is_none();
                let mut next = cmd;
                while let Some(c) = next.take() {
                    match c {
                        SubCmd::Ack(id) => acked.extend(outstanding.remove(&id)),
                        SubCmd::AckMany(ids) => {
                            acked.extend(ids.iter().filter_map(|id| outstanding.remove(id)))
                        }
                        SubCmd::Close { delete: d } => {
                            delete = d;
                            stop = true;
                            break;
                        }
                    }
                    next = cmds.try_recv().ok();
                }
                if let Err(e) = ack_batch(&mut consumer, &mut acked, &mut batches, &outstanding, cumulative, in_order).await {
                    tracing::warn!(conn, error = %e, "ack failed");
                }
                if stop {
                    break;
                }
            },
            _ = shared.closed() => break,
            msg = consumer.next(), if room > 0 => {
                // The first message, then every one the consumer already holds, up to the
                // room left: one event to the worker for the lot.
                let mut batch = Vec::new();
                let mut next = Some(msg);
                let mut ended = false;
                while let Some(msg) = next.take() {
                    match msg {
                        Some(Ok(m)) => batch.push(m),
                        Some(Err(e)) => { tracing::warn!(conn, error = %e, "consumer failed"); ended = true; break; }
                        None => { ended = true; break; }
                    }
                    if batch.len() < room.min(MAX_DELIVERY_BATCH) {
                        next = consumer.next().now_or_never();
                    }
                }
                shared.output_relieved().await;
                let mut deliveries = Vec::with_capacity(batch.len());
                for mut msg in batch {
                    // Moved out of the message, not cloned: eight strings or so per delivery.
                    let mut properties: Vec<types::Property> = std::mem::take(&mut msg.payload.metadata.properties).into_iter().map(|kv| types::Property { key: kv.key, value: kv.value }).collect();
                    let key = msg.payload.metadata.partition_key.take();
                    let meta = &msg.payload.metadata;
                    let e2e = Some((meta.encryption_keys.as_slice(), meta.encryption_param.as_deref().unwrap_or_default()));
                    let payload = match services.unseal(&opts.topic, &mut properties, e2e, std::mem::take(&mut msg.payload.data)) {
                        Ok(p) => p,
                        Err(e) => {
                            // Shredded or damaged: nobody can ever read it; it must not block the rest.
                            tracing::warn!(conn, topic = %opts.topic, error = %e, "dropping a message that does not decrypt");
                            let _ = consumer.ack(&msg).await;
                            continue;
                        }
                    };
                    if let Some(m) = &meters {
                        m.delivered(payload.len());
                    }
                    let id = next_delivery;
                    next_delivery += 1;
                    deliveries.push(types::Delivery {
                        subscription: sub,
                        delivery_id: id,
                        key,
                        properties,
                        publish_time_ms: meta.publish_time,
                        redelivery_count: 0,
                        payload,
                    });
                    let entry = (msg.message_id.id.ledger_id, msg.message_id.id.entry_id);
                    in_order &= last_entry.is_none_or(|last| last <= entry);
                    last_entry = Some(entry);
                    outstanding.insert(id, (msg.topic, msg.message_id.id));
                }
                if !deliveries.is_empty()
                    && events.send(Event::Deliveries { conn, deliveries }).await.is_err()
                {
                    break;
                }
                if ended {
                    break;
                }
            }
        }
    }
    if delete {
        if let Err(e) = consumer.unsubscribe().await {
            tracing::warn!(conn, error = %e, "unsubscribe failed");
        }
    }
    let _ = consumer.close().await;
}

/// Most deliveries handed to the worker in one event.
const MAX_DELIVERY_BATCH: usize = 256;

/// An entry of a topic: where a batch's messages are acknowledged together.
type EntryKey = (String, u64, u64, i32);

fn entry_key(topic: &str, id: &pulsar::proto::MessageIdData) -> EntryKey {
    (
        topic.to_string(),
        id.ledger_id,
        id.entry_id,
        id.partition.unwrap_or(-1),
    )
}

/// The id of a whole entry (no batch index): acknowledging it acknowledges all its messages.
fn entry_id(id: &pulsar::proto::MessageIdData) -> pulsar::proto::MessageIdData {
    pulsar::proto::MessageIdData {
        ledger_id: id.ledger_id,
        entry_id: id.entry_id,
        partition: id.partition,
        ..Default::default()
    }
}

/// Batch entries some but not all of whose messages are acknowledged: (size, acked so far).
/// An entry is acknowledged to the backend once all its messages are; until then it is held
/// here, so that a connection that ends part-way gets the rest again (never fewer).
#[derive(Default)]
struct PartialBatches(HashMap<EntryKey, (i32, i32)>);

/// Acknowledges `acked` (emptied) to the backend, entry by entry: a message of a batch entry
/// counts towards its entry, which is acknowledged when complete. With `cumulative`, the
/// complete entries below every entry still (partly) unacknowledged go as one cumulative ack
/// at the highest of them; the others go as one individual ack command per topic.
async fn ack_batch(
    consumer: &mut pulsar::Consumer<Vec<u8>, pulsar::TokioExecutor>,
    acked: &mut Vec<(String, pulsar::proto::MessageIdData)>,
    batches: &mut PartialBatches,
    outstanding: &BTreeMap<u64, (String, pulsar::proto::MessageIdData)>,
    cumulative: bool,
    in_order: bool,
) -> Result<(), pulsar::error::ConsumerError> {
    let mut complete: Vec<(String, pulsar::proto::MessageIdData)> = Vec::new();
    for (topic, id) in acked.drain(..) {
        match (id.batch_index, id.batch_size) {
            (Some(_), Some(size)) if size > 1 => {
                let key = entry_key(&topic, &id);
                let done = {
                    let counted = batches.0.entry(key.clone()).or_insert((size, 0));
                    counted.1 += 1;
                    counted.1 >= counted.0
                };
                if done {
                    batches.0.remove(&key);
                    complete.push((topic, entry_id(&id)));
                }
            }
            _ => complete.push((topic, entry_id(&id))),
        }
    }
    let mut result = Ok(());
    if cumulative {
        // The oldest unacknowledged entry is the floor for the cumulative ack (a partly
        // acknowledged batch still has its other messages among the outstanding). While
        // entries arrived in log order, that is the first delivery (the map is in delivery
        // order); after a redelivery out of order, all of them are looked at.
        let entry = |id: &pulsar::proto::MessageIdData| (id.ledger_id, id.entry_id);
        let floor = if in_order {
            outstanding.values().next().map(|(_, id)| entry(id))
        } else {
            outstanding.values().map(|(_, id)| entry(id)).min()
        };
        let order = |id: &pulsar::proto::MessageIdData| (id.ledger_id, id.entry_id);
        let mut upto: Option<(String, pulsar::proto::MessageIdData)> = None;
        let mut rest = Vec::new();
        for (topic, id) in complete.drain(..) {
            if floor.is_none_or(|f| order(&id) < f) {
                if upto.as_ref().is_none_or(|(_, u)| order(u) < order(&id)) {
                    upto = Some((topic, id));
                }
            } else {
                rest.push((topic, id));
            }
        }
        complete = rest;
        if let Some((topic, id)) = upto {
            result = consumer.cumulative_ack_with_id(&topic, id).await;
        }
    }
    let mut by_topic: HashMap<String, Vec<pulsar::proto::MessageIdData>> = HashMap::new();
    for (topic, id) in complete {
        by_topic.entry(topic).or_default().push(id);
    }
    for (topic, ids) in by_topic {
        if let Err(e) = consumer.ack_many_with_id(&topic, ids).await {
            result = Err(e);
        }
    }
    result
}
