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

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::FuturesOrdered;
use futures::StreamExt;
use tokio::sync::mpsc;
use wasmtime::component::ResourceTable;
use wasmtime::StoreLimits;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::backend::{Backend, OutMessage, SubscribeOptions};
use crate::connection::ConnShared;
use crate::kv::{Kv, KV_TOPIC};
use crate::plugin_host::bindings::magnetar::plugin::{host, types};
use crate::plugin_host::Event;
use crate::tenancy::{self, Credentials, Principal, Tenancy};

use types::{ErrorKind, OpError};

/// Operations queued per connection before `publish` fails fast with `quota-exceeded`.
const OPS_QUEUE: usize = 4096;

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
}

/// A backend operation of one connection, run in issue order.
enum Op {
    Publish {
        token: u64,
        topic: String,
        msg: OutMessage,
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
}

/// A command to a subscription's delivery task.
enum SubCmd {
    Ack(u64),
    Close { delete: bool },
}

/// What the host keeps per connection of an instance.
struct ConnSlot {
    shared: Arc<ConnShared>,
    principal: Option<Principal>,
    ops: mpsc::Sender<Op>,
    subs: HashMap<u64, mpsc::Sender<SubCmd>>,
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
        }
    }

    pub fn limits_mut(&mut self) -> &mut StoreLimits {
        &mut self.limits
    }

    /// Registers a new connection and starts its ordered operations task.
    pub fn open(&mut self, conn: u64, shared: Arc<ConnShared>) {
        let (ops, rx) = mpsc::channel(OPS_QUEUE);
        let task = run_ops(
            conn,
            rx,
            self.services.clone(),
            self.events.clone(),
            shared.clone(),
        );
        self.runtime.spawn(task);
        self.conns.insert(
            conn,
            ConnSlot {
                shared,
                principal: None,
                ops,
                subs: HashMap::new(),
            },
        );
    }

    pub fn knows(&self, conn: u64) -> bool {
        self.conns.contains_key(&conn)
    }

    /// Drops a connection's state: its operations and subscriptions end with it.
    pub fn forget(&mut self, conn: u64) {
        self.conns.remove(&conn);
    }

    /// Closes every connection of this instance (it trapped).
    pub fn close_all(&mut self) {
        for (_, slot) in self.conns.drain() {
            slot.shared.close();
        }
    }

    /// Records the principal of a successful authentication; `None` if the connection is gone.
    pub fn auth_completed(
        &mut self,
        conn: u64,
        outcome: Result<Principal, OpError>,
    ) -> Option<Result<types::Principal, OpError>> {
        let slot = self.conns.get_mut(&conn)?;
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
        let Some(slot) = self.conns.get(&conn) else {
            return;
        };
        slot.shared.op_started();
        if let Err(err) = slot.ops.try_send(op) {
            slot.shared.op_finished();
            let message = "too many operations in flight on this connection";
            let event = match err.into_inner() {
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
            };
            self.complete(event);
        }
    }
}

impl types::Host for HostState {}

impl host::Host for HostState {
    fn send(&mut self, conn: u64, data: Vec<u8>) {
        if let Some(slot) = self.conns.get(&conn) {
            slot.shared.send(Bytes::from(data));
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
        let creds = match creds {
            types::Credentials::Anonymous => Credentials::Anonymous,
            types::Credentials::Password(up) => Credentials::Password {
                user: up.user,
                password: up.password,
            },
            types::Credentials::Token(t) => Credentials::Token(t),
        };
        let outcome = self.services.tenancy.authenticate(&creds).map_err(|e| {
            tracing::info!(plugin = %self.plugin, conn, error = %e, "authentication failed");
            op_error(ErrorKind::NotAuthorized, "not authorized")
        });
        self.complete(Event::AuthResult {
            conn,
            token,
            outcome,
        });
    }

    fn publish(&mut self, conn: u64, token: u64, msg: types::OutboundMessage) {
        match self.topic(conn, &msg.topic) {
            Ok(topic) => {
                let out = OutMessage {
                    key: msg.key,
                    payload: msg.payload,
                    properties: msg
                        .properties
                        .into_iter()
                        .map(|p| (p.key, p.value))
                        .collect(),
                };
                self.queue_op(
                    conn,
                    Op::Publish {
                        token,
                        topic,
                        msg: out,
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
        let topic = match self.topic(conn, &spec.topic).and_then(|t| {
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

    fn set_timer(&mut self, conn: u64, token: u64, delay_ms: u64) {
        let Some(slot) = self.conns.get(&conn) else {
            return;
        };
        let events = self.events.clone();
        let shared = slot.shared.clone();
        self.runtime.spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(std::time::Duration::from_millis(delay_ms)) => {
                    let _ = events.send(Event::Timer { conn, token }).await;
                }
                _ = shared.closed() => {}
            }
        });
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
}

impl HostState {
    fn kv_topic(&self, conn: u64) -> Result<String, OpError> {
        let principal = self.principal(conn)?;
        Ok(tenancy::topic_url(principal, KV_TOPIC))
    }
}

/// Runs a connection's backend operations in issue order, many in flight.
async fn run_ops(
    conn: u64,
    mut rx: mpsc::Receiver<Op>,
    services: Arc<Services>,
    events: mpsc::Sender<Event>,
    shared: Arc<ConnShared>,
) {
    let mut receipts = FuturesOrdered::new();
    loop {
        tokio::select! {
            op = rx.recv() => {
                let Some(op) = op else { break };
                match op {
                    Op::Publish { token, topic, msg } => {
                        let sent = services.backend.enqueue(&topic, msg).await;
                        receipts.push_back(async move {
                            let outcome = match sent {
                                Ok(receipt) => receipt.await.map(|_| ()).map_err(|e| {
                                    op_error(ErrorKind::Backend, format!("storing on {topic}: {e}"))
                                }),
                                Err(e) => Err(op_error(ErrorKind::Backend, e.to_string())),
                            };
                            Event::PublishResult { conn, token, outcome }
                        });
                    }
                    Op::KvGet { token, topic, key } => {
                        let outcome = services.kv.get(&topic, &key).await.map_err(|e| op_error(ErrorKind::Backend, e.to_string()));
                        shared.op_finished();
                        let _ = events.send(Event::KvResult { conn, token, outcome }).await;
                    }
                    Op::KvPut { token, topic, key, value } => {
                        let outcome = services.kv.put(&topic, &key, value).await.map(|_| None).map_err(|e| op_error(ErrorKind::Backend, e.to_string()));
                        shared.op_finished();
                        let _ = events.send(Event::KvResult { conn, token, outcome }).await;
                    }
                }
            }
            Some(event) = receipts.next(), if !receipts.is_empty() => {
                shared.op_finished();
                let _ = events.send(event).await;
            }
        }
    }
    // The connection is gone; its in-flight publishes still complete at the backend.
    while let Some(_event) = receipts.next().await {}
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
    } = t;
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
    let mut outstanding: HashMap<u64, (String, pulsar::proto::MessageIdData)> = HashMap::new();
    let mut next_delivery: u64 = 1;
    let mut delete = false;
    loop {
        let can_deliver = outstanding.len() < max_unacked;
        tokio::select! {
            biased;
            cmd = cmds.recv() => match cmd {
                Some(SubCmd::Ack(id)) => {
                    if let Some((topic, msg_id)) = outstanding.remove(&id) {
                        if let Err(e) = consumer.ack_with_id(&topic, msg_id).await {
                            tracing::warn!(conn, error = %e, "ack failed");
                        }
                    }
                }
                Some(SubCmd::Close { delete: d }) => { delete = d; break; }
                None => break,
            },
            _ = shared.closed() => break,
            msg = consumer.next(), if can_deliver => {
                let mut msg = match msg {
                    Some(Ok(m)) => m,
                    Some(Err(e)) => { tracing::warn!(conn, error = %e, "consumer failed"); break; }
                    None => break,
                };
                shared.output_relieved().await;
                let id = next_delivery;
                next_delivery += 1;
                let meta = &msg.payload.metadata;
                let delivery = types::Delivery {
                    subscription: sub,
                    delivery_id: id,
                    key: meta.partition_key.clone(),
                    properties: meta.properties.iter().map(|kv| types::Property { key: kv.key.clone(), value: kv.value.clone() }).collect(),
                    publish_time_ms: meta.publish_time,
                    redelivery_count: 0,
                    payload: std::mem::take(&mut msg.payload.data),
                };
                outstanding.insert(id, (msg.topic.clone(), msg.message_id.id.clone()));
                if events.send(Event::Delivery { conn, delivery }).await.is_err() {
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
