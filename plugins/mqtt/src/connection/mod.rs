//! The sans-IO state machine of one MQTT 3.1.1 connection.
//!
//! [`MqttConnection`] is fed [`Event`]s (bytes, completions of host operations, deliveries,
//! timers), each with the current time, and answers with [`Action`]s for the host to carry
//! out. It never calls the host itself, so tests drive it directly (quinn-proto style); the
//! thin adapter in `adapter.rs` turns actions into `magnetar_sdk::Conn` calls.
//!
//! Lifecycle (§3.1, §3.2): `AwaitConnect` → CONNECT → `Connecting` (authenticate, then for a
//! persistent session read it from the kv) → CONNACK → `Connected` → `Closed`. While
//! `Connecting`, later packets wait unparsed in the input buffer: §3.1.4 forbids processing
//! them before the CONNECT is accepted.
//!
//! Guarantees:
//! - QoS 1 from the client (§4.3.2): PUBACK only after the backend stored the message, and
//!   PUBACKs leave in the order the PUBLISHes came (§4.6). A failed QoS 1 publish closes the
//!   connection (3.1.1 has no negative PUBACK), so the client resends.
//! - QoS 1 to the client: a delivery is acked to the backend only when the client's PUBACK
//!   arrives, so unacknowledged messages are redelivered after a reconnect or restart.
//! - Bounded memory per connection: one packet of at most `max_packet_size` plus pipelined
//!   input up to twice that; at most `max_inflight` publishes and deliveries in flight; at
//!   most `max_subscriptions` filters.

use std::collections::{BTreeMap, HashMap, VecDeque};

use magnetar_sdk::{
    Credentials, Delivery, ErrorKind, InitialPosition, LogLevel, OpError, OutboundMessage,
    Principal, Property, SubId, SubMode, SubscriptionSpec, UserPassword,
};

use crate::codec::{self, Connect, DecodeError, Inbound, Publish, SubscribeEntry};
use crate::config::Config;
use crate::session_store;
use crate::topic;

/// The one Pulsar topic (short name) that carries every MQTT topic of a namespace.
pub const PULSAR_TOPIC: &str = "mqtt";
/// Message property holding the full MQTT Topic Name.
pub const PROP_TOPIC: &str = "mqtt.topic";
/// Message property holding the QoS the message was published with (`0` or `1`).
pub const PROP_QOS: &str = "mqtt.qos";

/// Connect Return Codes (§3.2.2.3).
mod return_code {
    pub const ACCEPTED: u8 = 0x00;
    pub const UNACCEPTABLE_PROTOCOL_VERSION: u8 = 0x01;
    pub const IDENTIFIER_REJECTED: u8 = 0x02;
    pub const SERVER_UNAVAILABLE: u8 = 0x03;
    pub const NOT_AUTHORIZED: u8 = 0x05;
}

/// SUBACK return code for a refused filter (§3.9.3).
const SUBACK_FAILURE: u8 = 0x80;

/// Something that happened to the connection.
#[derive(Debug, Clone)]
pub enum Event {
    /// Bytes from the client.
    Data(Vec<u8>),
    AuthResult {
        token: u64,
        result: Result<Principal, OpError>,
    },
    PublishResult {
        token: u64,
        result: Result<(), OpError>,
    },
    SubscribeResult {
        token: u64,
        result: Result<SubId, OpError>,
    },
    Delivery(Delivery),
    Timer {
        token: u64,
    },
    KvResult {
        token: u64,
        result: Result<Option<Vec<u8>>, OpError>,
    },
    /// The socket is gone; no action may follow.
    Closed,
}

/// Something the host must do for the connection, in order.
#[derive(Debug, Clone)]
pub enum Action {
    Send(Vec<u8>),
    Close(String),
    Authenticate {
        token: u64,
        creds: Credentials,
    },
    Publish {
        token: u64,
        msg: OutboundMessage,
    },
    Subscribe {
        token: u64,
        spec: SubscriptionSpec,
    },
    Unsubscribe {
        sub: SubId,
        delete: bool,
    },
    Ack {
        sub: SubId,
        delivery_id: u64,
    },
    SetTimer {
        token: u64,
        delay_ms: u64,
    },
    KvGet {
        token: u64,
        key: String,
    },
    KvPut {
        token: u64,
        key: String,
        value: Option<Vec<u8>>,
    },
    Log {
        level: LogLevel,
        message: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitConnect,
    Connecting,
    Connected,
    Closed,
}

/// A long host operation in flight, by token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Auth,
    /// `kv_get` of a persistent session at CONNECT.
    LoadSession,
    /// `kv_get` at a Clean Session CONNECT: was there an earlier persistent session to drop?
    ProbeOldSession,
    /// `kv_put(None)` of the earlier session.
    DropOldSession,
    /// Opening the earlier session's durable subscription, only to delete it.
    OpenOldSubscription,
    /// Opening this connection's backend subscription; `restore` when re-opening a session.
    OpenBackend {
        restore: bool,
    },
    /// `kv_put` of the filter set as of `generation`.
    SaveSession {
        generation: u64,
    },
    Publish,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TimerKind {
    Connect,
    KeepAlive,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Closed,
    Opening,
    Open(SubId),
}

/// A client PUBLISH waiting for the backend.
#[derive(Debug)]
struct InboundPublish {
    token: u64,
    /// QoS 1 only: the PUBACK to send once stored.
    packet_id: Option<u16>,
    stored: bool,
}

/// A SUBACK or UNSUBACK waiting for the backend subscription and/or the session save.
#[derive(Debug)]
struct PendingReply {
    kind: Reply,
    waits_backend: bool,
    waits_generation: u64,
}

#[derive(Debug)]
enum Reply {
    Suback {
        packet_id: u16,
        codes: Vec<u8>,
        added: Vec<String>,
    },
    Unsuback {
        packet_id: u16,
    },
}

/// A QoS 1 delivery waiting for a free Packet Identifier.
#[derive(Debug)]
struct WaitingDelivery {
    delivery: Delivery,
    topic: String,
}

/// The protocol state of one MQTT 3.1.1 connection. See the module docs.
#[derive(Debug)]
pub struct MqttConnection {
    conn_id: u64,
    nonce: u64,
    config: Config,
    phase: Phase,
    actions: Vec<Action>,
    inbuf: Vec<u8>,
    next_token: u64,
    ops: HashMap<u64, Op>,

    timer: Option<(u64, TimerKind)>,
    keep_alive_ms: u64,
    last_activity_ms: u64,

    client_id: String,
    clean_session: bool,
    principal: Option<Principal>,

    filters: BTreeMap<String, u8>,
    backend: Backend,
    generation: u64,
    saved_generation: u64,
    save_in_flight: bool,
    replies: VecDeque<PendingReply>,

    publishes: VecDeque<InboundPublish>,

    inflight_out: HashMap<u16, (SubId, u64)>,
    waiting_out: VecDeque<WaitingDelivery>,
    next_packet_id: u16,
}

impl MqttConnection {
    /// A new connection at `now_ms`. `nonce` is a random number that makes the names of
    /// non-durable subscriptions unique across gateway processes. Take the first actions
    /// (the CONNECT timer) with [`MqttConnection::take_actions`].
    pub fn new(conn_id: u64, config: Config, nonce: u64, now_ms: u64) -> Self {
        let mut c = MqttConnection {
            conn_id,
            nonce,
            config,
            phase: Phase::AwaitConnect,
            actions: Vec::new(),
            inbuf: Vec::new(),
            next_token: 1,
            ops: HashMap::new(),
            timer: None,
            keep_alive_ms: 0,
            last_activity_ms: now_ms,
            client_id: String::new(),
            clean_session: true,
            principal: None,
            filters: BTreeMap::new(),
            backend: Backend::Closed,
            generation: 0,
            saved_generation: 0,
            save_in_flight: false,
            replies: VecDeque::new(),
            publishes: VecDeque::new(),
            inflight_out: HashMap::new(),
            waiting_out: VecDeque::new(),
            next_packet_id: 1,
        };
        let delay = c.config.connect_timeout_ms;
        c.arm_timer(TimerKind::Connect, delay);
        c
    }

    /// The actions produced so far, oldest first.
    pub fn take_actions(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.actions)
    }

    /// Whether the connection is closed (by either side); later events are ignored.
    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    /// The Topic Filters of the session and their granted QoS.
    pub fn filters(&self) -> &BTreeMap<String, u8> {
        &self.filters
    }

    /// Feeds one event at `now_ms`; returns the actions it caused.
    pub fn handle(&mut self, now_ms: u64, event: Event) -> Vec<Action> {
        if self.phase != Phase::Closed {
            match event {
                Event::Data(bytes) => self.inbuf.extend_from_slice(&bytes),
                Event::AuthResult { token, result } => self.on_auth_result(token, result),
                Event::PublishResult { token, result } => self.on_publish_result(token, result),
                Event::SubscribeResult { token, result } => self.on_subscribe_result(token, result),
                Event::Delivery(d) => self.on_delivery(d),
                Event::Timer { token } => self.on_timer(now_ms, token),
                Event::KvResult { token, result } => self.on_kv_result(token, result),
                Event::Closed => {
                    self.phase = Phase::Closed;
                    self.inbuf = Vec::new();
                }
            }
            // New bytes, or an event that lifted a pause (CONNACK sent, a publish stored).
            self.process_input(now_ms);
        }
        self.take_actions()
    }

    // ---- plumbing -------------------------------------------------------------------------

    fn token(&mut self, op: Op) -> u64 {
        let t = self.next_token;
        self.next_token = self.next_token.wrapping_add(1);
        self.ops.insert(t, op);
        t
    }

    fn send(&mut self, bytes: Vec<u8>) {
        self.actions.push(Action::Send(bytes));
    }

    fn log(&mut self, level: LogLevel, message: impl std::fmt::Display) {
        let message = format!("mqtt conn {} ({}): {message}", self.conn_id, self.client_id);
        self.actions.push(Action::Log { level, message });
    }

    /// Closes the connection once; everything after is ignored.
    fn close(&mut self, reason: impl Into<String>) {
        if self.phase != Phase::Closed {
            self.phase = Phase::Closed;
            self.inbuf = Vec::new();
            self.actions.push(Action::Close(reason.into()));
        }
    }

    fn arm_timer(&mut self, kind: TimerKind, delay_ms: u64) {
        let token = self.next_token;
        self.next_token = self.next_token.wrapping_add(1);
        self.timer = Some((token, kind));
        self.actions.push(Action::SetTimer { token, delay_ms });
    }

    fn persistent(&self) -> bool {
        !self.clean_session
    }

    // ---- input ----------------------------------------------------------------------------

    /// Decodes and handles buffered packets while the state allows it.
    fn process_input(&mut self, now_ms: u64) {
        let mut pos = 0;
        loop {
            let paused = match self.phase {
                Phase::Closed | Phase::Connecting => true,
                Phase::Connected => self.publishes.len() >= self.config.max_inflight,
                Phase::AwaitConnect => false,
            };
            let Some(buf) = self.inbuf.get(pos..) else {
                break;
            };
            if paused || buf.is_empty() {
                break;
            }
            if self.phase == Phase::AwaitConnect {
                if let Some(reason) = not_a_connect(buf) {
                    self.close(reason);
                    return;
                }
            }
            match codec::decode(buf, self.config.max_packet_size) {
                Ok(None) => break,
                Ok(Some((packet, n))) => {
                    pos += n;
                    self.last_activity_ms = now_ms;
                    self.on_packet(packet);
                }
                Err(DecodeError::UnsupportedProtocolLevel(level))
                    if self.phase == Phase::AwaitConnect =>
                {
                    self.send(codec::connack(
                        false,
                        return_code::UNACCEPTABLE_PROTOCOL_VERSION,
                    ));
                    self.close(DecodeError::UnsupportedProtocolLevel(level).to_string());
                    return;
                }
                Err(e) => {
                    self.close(e.to_string());
                    return;
                }
            }
        }
        if self.phase == Phase::Closed {
            return;
        }
        self.inbuf.drain(..pos.min(self.inbuf.len()));
        let limit = self.config.max_packet_size.saturating_mul(2).max(64 * 1024);
        if self.inbuf.len() > limit {
            self.close(format!(
                "{} unprocessed bytes from the client exceed the limit of {limit}",
                self.inbuf.len()
            ));
        }
    }

    fn on_packet(&mut self, packet: Inbound) {
        match (self.phase, packet) {
            (Phase::AwaitConnect, Inbound::Connect(c)) => self.on_connect(c),
            (_, Inbound::Connect(_)) => self.close("second CONNECT on a connection (§3.1)"),
            (Phase::AwaitConnect, _) => self.close("first packet must be CONNECT (§3.1)"),
            (_, Inbound::Publish(p)) => self.on_publish(p),
            (_, Inbound::Puback(id)) => self.on_puback(id),
            (_, Inbound::Pubrec(_) | Inbound::Pubrel(_) | Inbound::Pubcomp(_)) => {
                self.close("QoS 2 flow (PUBREC/PUBREL/PUBCOMP) is not supported")
            }
            (_, Inbound::Subscribe { packet_id, entries }) => self.on_subscribe(packet_id, entries),
            (_, Inbound::Unsubscribe { packet_id, filters }) => {
                self.on_unsubscribe(packet_id, filters)
            }
            (_, Inbound::Pingreq) => self.send(codec::pingresp()),
            (_, Inbound::Disconnect) => self.close("client sent DISCONNECT"),
            (_, Inbound::ServerOnly(name)) => {
                self.close(format!("client sent {name}, which only a server sends"))
            }
        }
    }

    // ---- CONNECT / CONNACK (§3.1, §3.2) -----------------------------------------------------

    fn on_connect(&mut self, c: Connect) {
        self.phase = Phase::Connecting;
        self.clean_session = c.clean_session;
        if c.client_id.is_empty() {
            if !c.clean_session {
                self.send(codec::connack(false, return_code::IDENTIFIER_REJECTED));
                self.close("empty Client Identifier with Clean Session 0 (§3.1.3.1)");
                return;
            }
            self.client_id = format!("auto-{:x}-{:x}", self.conn_id, self.nonce);
        } else {
            self.client_id = c.client_id;
        }
        if c.has_will {
            self.log(LogLevel::Info, "Will Message ignored: not supported yet");
        }
        self.keep_alive_ms = u64::from(c.keep_alive) * 1500;
        if self.keep_alive_ms > 0 {
            self.arm_timer(TimerKind::KeepAlive, self.keep_alive_ms);
        } else {
            self.timer = None;
        }
        let creds = credentials(c.username, c.password);
        let token = self.token(Op::Auth);
        self.actions.push(Action::Authenticate { token, creds });
    }

    fn on_auth_result(&mut self, token: u64, result: Result<Principal, OpError>) {
        if self.ops.remove(&token) != Some(Op::Auth) {
            return;
        }
        match result {
            Ok(principal) => {
                self.principal = Some(principal);
                let key = session_store::kv_key(&self.client_id);
                if self.persistent() {
                    let token = self.token(Op::LoadSession);
                    self.actions.push(Action::KvGet { token, key });
                } else {
                    self.accept(false);
                    if !self.client_id.starts_with("auto-") {
                        let token = self.token(Op::ProbeOldSession);
                        self.actions.push(Action::KvGet { token, key });
                    }
                }
            }
            Err(e) => {
                let code = if e.kind == ErrorKind::NotAuthorized {
                    return_code::NOT_AUTHORIZED
                } else {
                    return_code::SERVER_UNAVAILABLE
                };
                self.send(codec::connack(false, code));
                self.close(format!("authentication failed: {}", e.message));
            }
        }
    }

    /// Sends CONNACK 0 and starts processing what the client sent after CONNECT.
    fn accept(&mut self, session_present: bool) {
        self.send(codec::connack(session_present, return_code::ACCEPTED));
        self.phase = Phase::Connected;
    }

    fn on_kv_result(&mut self, token: u64, result: Result<Option<Vec<u8>>, OpError>) {
        let Some(op) = self.ops.remove(&token) else {
            return;
        };
        match (op, result) {
            (Op::LoadSession, Ok(Some(bytes))) => match session_store::decode(&bytes) {
                Ok(filters) => {
                    self.filters = filters;
                    self.accept(true);
                    self.open_backend(true);
                }
                Err(e) => {
                    self.log(
                        LogLevel::Warn,
                        format!("stored session unreadable, starting a new one: {e}"),
                    );
                    self.accept(false);
                }
            },
            (Op::LoadSession, Ok(None)) => self.accept(false),
            (Op::LoadSession, Err(e)) => {
                self.send(codec::connack(false, return_code::SERVER_UNAVAILABLE));
                self.close(format!("session store unavailable: {}", e.message));
            }
            (Op::ProbeOldSession, Ok(Some(_))) => {
                // §3.1.2.4: Clean Session 1 discards any previous session.
                let key = session_store::kv_key(&self.client_id);
                let token = self.token(Op::DropOldSession);
                self.actions.push(Action::KvPut {
                    token,
                    key,
                    value: None,
                });
                let spec = self.durable_spec();
                let token = self.token(Op::OpenOldSubscription);
                self.actions.push(Action::Subscribe { token, spec });
            }
            (Op::ProbeOldSession, Ok(None)) | (Op::DropOldSession, Ok(_)) => {}
            (Op::ProbeOldSession | Op::DropOldSession, Err(e)) => {
                self.log(
                    LogLevel::Warn,
                    format!("could not discard the earlier session: {}", e.message),
                );
            }
            (Op::SaveSession { generation }, Ok(_)) => {
                self.save_in_flight = false;
                self.saved_generation = self.saved_generation.max(generation);
                self.save_session();
                self.flush_replies();
            }
            (Op::SaveSession { .. }, Err(e)) => {
                self.close(format!("could not store the session: {}", e.message));
            }
            _ => {}
        }
    }

    // ---- PUBLISH from the client (§3.3, §3.4) ------------------------------------------------

    fn on_publish(&mut self, p: Publish) {
        if let Err(e) = topic::validate_name(&p.topic) {
            self.close(format!("PUBLISH refused: {e}"));
            return;
        }
        if p.qos == 2 {
            self.log(LogLevel::Warn, "QoS 2 PUBLISH: not supported, closing");
            self.close("QoS 2 PUBLISH is not supported");
            return;
        }
        let msg = OutboundMessage {
            topic: PULSAR_TOPIC.to_string(),
            key: Some(p.topic.clone()),
            payload: p.payload,
            properties: vec![
                Property {
                    key: PROP_TOPIC.to_string(),
                    value: p.topic,
                },
                Property {
                    key: PROP_QOS.to_string(),
                    value: p.qos.to_string(),
                },
            ],
        };
        let token = self.token(Op::Publish);
        self.publishes.push_back(InboundPublish {
            token,
            packet_id: p.packet_id,
            stored: false,
        });
        self.actions.push(Action::Publish { token, msg });
    }

    fn on_publish_result(&mut self, token: u64, result: Result<(), OpError>) {
        if self.ops.remove(&token) != Some(Op::Publish) {
            return;
        }
        let Some(entry) = self.publishes.iter_mut().find(|p| p.token == token) else {
            return;
        };
        entry.stored = true;
        if let Err(e) = result {
            if entry.packet_id.is_some() {
                // 3.1.1 has no negative PUBACK: closing makes the client resend.
                self.close(format!("QoS 1 publish failed: {}", e.message));
                return;
            }
            self.log(
                LogLevel::Warn,
                format!("QoS 0 publish dropped: {}", e.message),
            );
        }
        // PUBACKs leave in PUBLISH order (§4.6).
        while self.publishes.front().is_some_and(|p| p.stored) {
            if let Some(InboundPublish {
                packet_id: Some(id),
                ..
            }) = self.publishes.pop_front()
            {
                self.send(codec::puback(id));
            }
        }
    }

    // ---- SUBSCRIBE / UNSUBSCRIBE (§3.8–§3.11) -------------------------------------------------

    fn on_subscribe(&mut self, packet_id: u16, entries: Vec<SubscribeEntry>) {
        let mut codes = Vec::with_capacity(entries.len());
        let mut added = Vec::new();
        for e in entries {
            let room = self.filters.contains_key(&e.filter)
                || self.filters.len() < self.config.max_subscriptions;
            if !topic::is_valid_filter(&e.filter) || !room {
                codes.push(SUBACK_FAILURE);
                continue;
            }
            // This cut grants at most QoS 1 (§3.9.3 allows a lower grant).
            let granted = e.qos.min(1);
            codes.push(granted);
            self.filters.insert(e.filter.clone(), granted);
            added.push(e.filter);
        }
        if !added.is_empty() {
            if self.backend == Backend::Closed {
                self.open_backend(false);
            }
            self.changed_filters();
        }
        let waits_backend = !added.is_empty() && !matches!(self.backend, Backend::Open(_));
        self.replies.push_back(PendingReply {
            kind: Reply::Suback {
                packet_id,
                codes,
                added,
            },
            waits_backend,
            waits_generation: self.generation,
        });
        self.flush_replies();
    }

    fn on_unsubscribe(&mut self, packet_id: u16, filters: Vec<String>) {
        let mut changed = false;
        for f in filters {
            changed |= self.filters.remove(&f).is_some();
        }
        if changed {
            self.changed_filters();
        }
        self.replies.push_back(PendingReply {
            kind: Reply::Unsuback { packet_id },
            waits_backend: false,
            waits_generation: self.generation,
        });
        self.flush_replies();
    }

    /// The filter set changed: a persistent session must be saved before the reply.
    fn changed_filters(&mut self) {
        if self.persistent() {
            self.generation += 1;
            self.save_session();
        }
    }

    /// Writes the filter set if it changed since the last save; one save in flight at a time,
    /// so saves cannot land out of order.
    fn save_session(&mut self) {
        if !self.persistent() || self.save_in_flight || self.saved_generation >= self.generation {
            return;
        }
        self.save_in_flight = true;
        let generation = self.generation;
        let key = session_store::kv_key(&self.client_id);
        let value = Some(session_store::encode(&self.filters));
        let token = self.token(Op::SaveSession { generation });
        self.actions.push(Action::KvPut { token, key, value });
    }

    /// Sends the SUBACKs/UNSUBACKs whose conditions hold, in packet order.
    fn flush_replies(&mut self) {
        let backend_open = matches!(self.backend, Backend::Open(_));
        while let Some(front) = self.replies.front() {
            if (front.waits_backend && !backend_open)
                || (self.persistent() && front.waits_generation > self.saved_generation)
            {
                break;
            }
            let Some(reply) = self.replies.pop_front() else {
                break;
            };
            match reply.kind {
                Reply::Suback {
                    packet_id, codes, ..
                } => self.send(codec::suback(packet_id, &codes)),
                Reply::Unsuback { packet_id } => self.send(codec::unsuback(packet_id)),
            }
        }
    }

    /// The spec of this connection's backend subscription (see the crate docs).
    fn backend_spec(&self) -> SubscriptionSpec {
        if self.persistent() {
            self.durable_spec()
        } else {
            SubscriptionSpec {
                topic: PULSAR_TOPIC.to_string(),
                name: format!("mqtt-tmp-{}-{:016x}", self.conn_id, self.nonce),
                mode: SubMode::Exclusive,
                durable: false,
                initial_position: InitialPosition::Latest,
                max_unacked: self.max_unacked(),
            }
        }
    }

    fn durable_spec(&self) -> SubscriptionSpec {
        SubscriptionSpec {
            topic: PULSAR_TOPIC.to_string(),
            name: session_store::durable_subscription(&self.client_id),
            mode: SubMode::Exclusive,
            durable: true,
            initial_position: InitialPosition::Latest,
            max_unacked: self.max_unacked(),
        }
    }

    fn max_unacked(&self) -> u32 {
        u32::try_from(self.config.max_inflight).unwrap_or(u32::MAX)
    }

    fn open_backend(&mut self, restore: bool) {
        self.backend = Backend::Opening;
        let spec = self.backend_spec();
        let token = self.token(Op::OpenBackend { restore });
        self.actions.push(Action::Subscribe { token, spec });
    }

    fn on_subscribe_result(&mut self, token: u64, result: Result<SubId, OpError>) {
        match (self.ops.remove(&token), result) {
            (Some(Op::OpenBackend { .. }), Ok(sub)) => {
                self.backend = Backend::Open(sub);
                self.flush_replies();
            }
            (Some(Op::OpenBackend { restore: true }), Err(e)) => {
                self.close(format!(
                    "could not reopen the session's subscription: {}",
                    e.message
                ));
            }
            (Some(Op::OpenBackend { restore: false }), Err(e)) => {
                self.log(
                    LogLevel::Warn,
                    format!("backend subscription failed: {}", e.message),
                );
                self.backend = Backend::Closed;
                let mut removed = Vec::new();
                for reply in self.replies.iter_mut().filter(|r| r.waits_backend) {
                    reply.waits_backend = false;
                    if let Reply::Suback { codes, added, .. } = &mut reply.kind {
                        codes.iter_mut().for_each(|c| *c = SUBACK_FAILURE);
                        removed.append(added);
                    }
                }
                for f in removed {
                    self.filters.remove(&f);
                }
                self.changed_filters();
                self.flush_replies();
            }
            (Some(Op::OpenOldSubscription), Ok(sub)) => {
                self.actions.push(Action::Unsubscribe { sub, delete: true });
            }
            (Some(Op::OpenOldSubscription), Err(e)) => {
                self.log(
                    LogLevel::Warn,
                    format!(
                        "could not delete the earlier session's subscription: {}",
                        e.message
                    ),
                );
            }
            _ => {}
        }
    }

    // ---- deliveries to the client (§3.3, §3.4, §4.3) -----------------------------------------

    fn on_delivery(&mut self, d: Delivery) {
        let Backend::Open(sub) = self.backend else {
            return;
        };
        if d.subscription != sub {
            // E.g. the earlier session's subscription, opened only to be deleted.
            return;
        }
        let property = |key: &str| {
            d.properties
                .iter()
                .find(|p| p.key == key)
                .map(|p| p.value.clone())
        };
        let message_qos: u8 = match property(PROP_QOS).as_deref() {
            Some("1") | Some("2") => 1,
            _ => 0,
        };
        let Some(topic) = property(PROP_TOPIC) else {
            self.actions.push(Action::Ack {
                sub,
                delivery_id: d.delivery_id,
            });
            return;
        };
        let granted = self
            .filters
            .iter()
            .filter(|(f, _)| topic::matches(f, &topic))
            .map(|(_, q)| *q)
            .max();
        let qos = match granted {
            None => {
                self.actions.push(Action::Ack {
                    sub,
                    delivery_id: d.delivery_id,
                });
                return;
            }
            Some(g) => g.min(message_qos),
        };
        if qos == 0 {
            if let Some(bytes) = codec::publish(&topic, None, &d.payload) {
                self.send(bytes);
            }
            self.actions.push(Action::Ack {
                sub,
                delivery_id: d.delivery_id,
            });
        } else if self.inflight_out.len() < self.config.max_inflight {
            self.send_qos1(sub, d, &topic);
        } else if self.waiting_out.len() < self.config.max_inflight {
            self.waiting_out
                .push_back(WaitingDelivery { delivery: d, topic });
        } else {
            self.close("backend delivered more messages than max-unacked allows");
        }
    }

    fn send_qos1(&mut self, sub: SubId, d: Delivery, topic: &str) {
        let Some(packet_id) = self.allocate_packet_id() else {
            self.close("no free Packet Identifier");
            return;
        };
        match codec::publish(topic, Some(packet_id), &d.payload) {
            Some(bytes) => {
                self.inflight_out.insert(packet_id, (sub, d.delivery_id));
                self.send(bytes);
            }
            None => {
                self.log(
                    LogLevel::Warn,
                    format!("dropping a message with invalid topic {topic:?}"),
                );
                self.actions.push(Action::Ack {
                    sub,
                    delivery_id: d.delivery_id,
                });
            }
        }
    }

    /// The next Packet Identifier not in use (§2.3.1: non-zero, unique among in-flight).
    fn allocate_packet_id(&mut self) -> Option<u16> {
        for _ in 0..u16::MAX {
            let id = self.next_packet_id;
            self.next_packet_id = self.next_packet_id.checked_add(1).unwrap_or(1);
            if !self.inflight_out.contains_key(&id) {
                return Some(id);
            }
        }
        None
    }

    fn on_puback(&mut self, packet_id: u16) {
        let Some((sub, delivery_id)) = self.inflight_out.remove(&packet_id) else {
            self.log(
                LogLevel::Debug,
                format!("PUBACK for unknown Packet Identifier {packet_id}"),
            );
            return;
        };
        self.actions.push(Action::Ack { sub, delivery_id });
        if let Some(w) = self.waiting_out.pop_front() {
            let sub = w.delivery.subscription;
            self.send_qos1(sub, w.delivery, &w.topic);
        }
    }

    // ---- timers (§3.1.2.10 Keep Alive) ------------------------------------------------------

    fn on_timer(&mut self, now_ms: u64, token: u64) {
        let Some((current, kind)) = self.timer else {
            return;
        };
        if current != token {
            return; // superseded
        }
        self.timer = None;
        match kind {
            TimerKind::Connect => {
                if self.phase == Phase::AwaitConnect {
                    self.close(format!(
                        "no CONNECT within {} ms",
                        self.config.connect_timeout_ms
                    ));
                }
            }
            TimerKind::KeepAlive => {
                let idle = now_ms.saturating_sub(self.last_activity_ms);
                if idle >= self.keep_alive_ms {
                    self.close("keep-alive timeout");
                } else {
                    self.arm_timer(TimerKind::KeepAlive, self.keep_alive_ms - idle);
                }
            }
        }
    }
}

/// The credentials of a CONNECT (§3.1.3.4, §3.1.3.5).
///
/// - no User Name: `Anonymous`;
/// - User Name empty or `token`, and a Password shaped like a JWT (three base64url parts,
///   the first starting `eyJ`): `Token(password)`, as Pulsar token authentication expects;
/// - otherwise `Password { user, password }` (an absent Password is empty).
pub fn credentials(username: Option<String>, password: Option<String>) -> Credentials {
    match (username, password) {
        (None, _) => Credentials::Anonymous,
        (Some(user), Some(password))
            if (user.is_empty() || user == "token") && looks_like_jwt(&password) =>
        {
            Credentials::Token(password)
        }
        (Some(user), password) => Credentials::Password(UserPassword {
            user,
            password: password.unwrap_or_default().into_bytes(),
        }),
    }
}

fn looks_like_jwt(s: &str) -> bool {
    let parts: Vec<&str> = s.split('.').collect();
    parts.len() == 3
        && s.starts_with("eyJ")
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'=')
        })
}

/// Why bytes that should start with CONNECT do not, or `None` if they may. Names the
/// protocols a client most often sends to the wrong port, so the close reason says what
/// happened.
fn not_a_connect(buf: &[u8]) -> Option<String> {
    let first = *buf.first()?;
    if first == 0x10 {
        return None;
    }
    const HTTP: [&[u8]; 9] = [
        b"GET ", b"POST", b"PUT ", b"HEAD", b"DELE", b"OPTI", b"PATC", b"PRI ", b"CONN",
    ];
    let prefix = buf.get(..4.min(buf.len())).unwrap_or_default();
    let reason = if prefix.len() == 4 && HTTP.contains(&prefix) {
        "not MQTT: the client sent an HTTP request".to_string()
    } else if first == 0x16 {
        "not MQTT: a TLS handshake on a plain-text listener".to_string()
    } else if prefix == b"AMQP" {
        "not MQTT: the client sent an AMQP protocol header".to_string()
    } else if first == 0x00 {
        "not MQTT: a length-prefixed request (Kafka?) instead of CONNECT".to_string()
    } else {
        format!(
            "first packet must be CONNECT (§3.1), got packet type {}",
            codec::packet_type(first)
        )
    };
    Some(reason)
}

#[cfg(test)]
mod tests;
