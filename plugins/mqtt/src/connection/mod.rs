//! The sans-IO state machine of one MQTT connection, 3.1.1 or 5.0 (the CONNECT decides).
//!
//! [`MqttConnection`] is fed [`Event`]s (bytes, completions of host operations, deliveries,
//! timers), each with the current time, and answers with [`Action`]s for the host to carry
//! out. It never calls the host itself, so tests drive it directly (quinn-proto style), on
//! the SDK's simulated host too; it is a `magnetar_sdk::Machine`, which the SDK's `Driver`
//! runs against the real host (`adapter.rs`). The SDK's kit holds the protocol-neutral parts:
//! the op tokens, the framed input with its backpressure, and the outbox that joins packets
//! and gathers acks.
//!
//! Lifecycle (§3.1, §3.2): `AwaitConnect` → CONNECT → (`Authenticating`: MQTT 5.0 enhanced
//! authentication, AUTH packets, §4.12) → `Connecting` (authenticate, claim the Client
//! Identifier, read a persistent session from the kv) → CONNACK → `Connected` → `Closed`.
//! While `Connecting`, later packets wait unparsed in the input buffer: §3.1.4 forbids
//! processing them before the CONNECT is accepted.
//!
//! Guarantees:
//! - QoS 1 from the client (§4.3.2): PUBACK only after the backend stored the message, and
//!   PUBACKs leave in the order the PUBLISHes came (§4.6). A failed QoS 1 publish closes a
//!   3.1.1 connection (no negative PUBACK), so the client resends; a 5.0 client gets the
//!   PUBACK with a failure Reason Code (0x80, 0x87, 0x97).
//! - QoS 1 to the client: a delivery is acked to the backend only when the client's PUBACK
//!   arrives, so unacknowledged messages are redelivered after a reconnect or restart.
//! - Flow control (MQTT 5.0 §4.9): never more QoS 1/2 PUBLISHes awaiting acknowledgement
//!   than the client's Receive Maximum (and the configured `max_inflight`).
//! - Bounded memory per connection: one packet of at most `max_packet_size` plus pipelined
//!   input up to twice that; at most `max_pending_publishes` publishes and
//!   `delivery_window` deliveries in flight per
//!   backend subscription; at most `max_subscriptions` filters; at most [`TOPIC_ALIAS_MAX`]
//!   Topic Aliases each way.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::rc::Rc;

use magnetar_sdk::input::Input;
use magnetar_sdk::ops::Ops;
use magnetar_sdk::outbox::Outbox;
pub use magnetar_sdk::{Action, Event, Machine};
use magnetar_sdk::{
    Credentials, Delivery, ErrorKind, Filter, InitialPosition, KvEntry, KvWrite, LogLevel, OpError,
    Principal, RouteSpec, SaslOutcome, SubId, SubMode, SubscriptionSpec, UserPassword, Will,
};

use crate::codec::v5::{self, reason};
use crate::codec::{
    self, Connect, DecodeError, Inbound, Properties, Publish, PublishFlags, SubscribeEntry,
};
use crate::config::Config;
use crate::message::{self, application_properties, remaining_expiry};
pub use crate::message::{PROP_QOS, PROP_RETAIN, PROP_SENDER, PROP_TOPIC, PULSAR_TOPIC};
use crate::retained;
use crate::session_store::{self, Qos2State, StoredSession};
use crate::subscription::{self, parse_shared, Subscription};
use crate::topic;

/// Connect Return Codes (§3.2.2.3).
mod return_code {
    pub const ACCEPTED: u8 = 0x00;
    pub const UNACCEPTABLE_PROTOCOL_VERSION: u8 = 0x01;
    pub const IDENTIFIER_REJECTED: u8 = 0x02;
    pub const SERVER_UNAVAILABLE: u8 = 0x03;
    pub const NOT_AUTHORIZED: u8 = 0x05;
}

/// SUBACK return code for a refused filter (3.1.1 §3.9.3).
const SUBACK_FAILURE: u8 = 0x80;

/// Topic Aliases the server accepts from a client (CONNACK Topic Alias Maximum), and at most
/// this many it assigns to a client that allows them (MQTT 5.0 §3.3.2.3.4).
pub const TOPIC_ALIAS_MAX: u16 = 32;

/// Packets queued one after another share one `Send` action up to this many bytes.
const SEND_COALESCE: usize = 64 * 1024;

/// Undecoded bytes a connection may hold at least: the host reads up to 256 KiB at a time,
/// and one more read may arrive before it sees `SetReading(false)`.
const MIN_INPUT_LIMIT: usize = 512 * 1024;

/// Attempts to open a durable subscription that is still held by a connection that is going
/// away (session takeover), and the pause between them.
const BACKEND_RETRIES: u32 = 25;
const BACKEND_RETRY_MS: u64 = 200;

/// Longest reason string we send (they are ours; the client's Maximum Packet Size still
/// applies to the whole packet).
const REASON_STRING_MAX: usize = 200;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitConnect,
    /// MQTT 5.0 enhanced authentication: only AUTH packets until it succeeds (§4.12).
    Authenticating,
    Connecting,
    Connected,
    Closed,
}

/// A long host operation in flight, by token.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Auth,
    /// A step of enhanced authentication (SASL through the host).
    Sasl,
    /// Claiming the Client Identifier (session takeover, §3.1.4).
    Claim,
    /// `kv_get` of a persistent session's filters at CONNECT.
    LoadSession,
    /// `kv_get` of a persistent session's QoS 2 state at CONNECT.
    LoadQos2,
    /// `kv_get` at a clean CONNECT: was there an earlier session to drop?
    ProbeOldSession,
    /// `kv_put(None)` of the earlier session, or a write whose result does not matter.
    DropOldSession,
    /// Opening the earlier session's durable subscription, only to delete it.
    OpenOldSubscription,
    /// Opening this connection's main backend subscription; `restore` when re-opening a
    /// session.
    OpenBackend {
        restore: bool,
    },
    /// Opening the Shared backend subscription of a `$share/...` filter.
    OpenShared {
        filter: String,
        restore: bool,
    },
    /// `kv_put` of the filter set as of `generation`.
    SaveSession {
        generation: u64,
    },
    /// `kv_put` of the QoS 2 state as of `generation`.
    SaveQos2 {
        generation: u64,
    },
    Publish,
    /// `kv_put` of a retained message (or its removal).
    StoreRetained,
    /// `kv_scan` of the retained messages a new subscription may match.
    ScanRetained(ScanJob),
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

/// The acknowledgement a client packet gets once its conditions hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AckReply {
    None,
    Puback(u16),
    Pubrec(u16),
    Pubcomp(u16),
}

/// A client PUBLISH or PUBREL waiting for the backend and/or the QoS 2 state to be saved.
/// These leave in arrival order (§4.6).
#[derive(Debug)]
struct PendingAck {
    /// Backend operations (the publish, a retained write) still running.
    tokens: Vec<u64>,
    qos: u8,
    reply: AckReply,
    /// MQTT 5.0 Reason Code of the reply (0 success).
    reason: u8,
    /// QoS 2: the Packet Identifier to record as stored once `tokens` are done.
    qos2_id: Option<u16>,
    /// The QoS 2 state generation that must be saved before the reply (0: none).
    waits_qos2: u64,
}

impl PendingAck {
    fn reply(qos: u8, reply: AckReply, reason: u8) -> Self {
        PendingAck {
            tokens: Vec::new(),
            qos,
            reply,
            reason,
            qos2_id: None,
            waits_qos2: 0,
        }
    }
}

/// A SUBACK or UNSUBACK waiting for backend subscriptions and/or the session save.
#[derive(Debug)]
struct PendingReply {
    kind: Reply,
    /// Backend subscriptions that must be open first: `None` the main one, `Some(filter)`
    /// the Shared one of a `$share/...` filter.
    waits: Vec<Option<String>>,
    waits_generation: u64,
}

#[derive(Debug)]
enum Reply {
    Suback {
        packet_id: u16,
        codes: Vec<u8>,
        added: Vec<Added>,
    },
    Unsuback {
        packet_id: u16,
        codes: Vec<u8>,
    },
}

/// A filter a SUBSCRIBE added: its place among the Reason Codes, and whether retained
/// messages follow the SUBACK (Retain Handling, non-shared only).
#[derive(Debug)]
struct Added {
    filter: String,
    index: usize,
    scan: bool,
}

/// A page of retained messages to read for a new subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ScanJob {
    filter: String,
    granted: u8,
    sub_id: Option<u32>,
    start_after: Option<String>,
}

/// A message for the client, waiting for a free Packet Identifier (QoS > 0).
#[derive(Debug)]
struct Outgoing {
    topic: String,
    payload: Vec<u8>,
    qos: u8,
    retain: bool,
    /// MQTT 5.0 application properties, Message Expiry Interval as published.
    properties: Properties,
    /// When the message was published (ms), the base of its expiry; 0 unknown.
    published_ms: u64,
    sub_ids: Vec<u32>,
    /// The backend delivery to ack once the client has it; `None` for a retained message.
    backend: Option<(SubId, u64)>,
}

/// A QoS 1 or 2 PUBLISH sent to the client and not yet fully acknowledged.
#[derive(Debug)]
struct Inflight {
    qos: u8,
    backend: Option<(SubId, u64)>,
    /// QoS 2: PUBREC received, PUBREL sent, PUBCOMP awaited.
    released: bool,
}

/// What a persistent session's CONNECT has read from the kv so far.
#[derive(Debug, Default)]
struct Loading {
    filters: Option<Option<Vec<u8>>>,
    qos2: Option<Option<Vec<u8>>>,
}

/// What the client told us about itself in an MQTT 5.0 CONNECT (§3.1.2.11).
#[derive(Debug, Clone)]
struct ClientLimits {
    /// Receive Maximum: QoS 1/2 PUBLISHes it accepts unacknowledged.
    receive_maximum: usize,
    /// Maximum Packet Size it accepts.
    maximum_packet_size: usize,
    /// Topic Aliases we may assign (capped at [`TOPIC_ALIAS_MAX`]).
    topic_alias_maximum: u16,
    /// Request Problem Information: reason strings on acks are allowed.
    problem_information: bool,
}

impl Default for ClientLimits {
    fn default() -> Self {
        ClientLimits {
            receive_maximum: usize::from(u16::MAX),
            maximum_packet_size: usize::MAX,
            topic_alias_maximum: 0,
            problem_information: true,
        }
    }
}

/// The protocol state of one MQTT connection. See the module docs.
#[derive(Debug)]
pub struct MqttConnection {
    conn_id: u64,
    nonce: u64,
    config: Config,
    sasl_mechanisms: Rc<[String]>,
    phase: Phase,
    out: Outbox,
    /// Bytes from the client, framed by `codec::decode`; it tells the host when to read.
    input: Input,
    ops: Ops<Op>,
    now_ms: u64,

    timer: Option<(u64, TimerKind)>,
    keep_alive_ms: u64,
    last_activity_ms: u64,

    /// Protocol Level 5.
    v5: bool,
    client_id: String,
    /// The Client Identifier was assigned by us (empty in the CONNECT).
    assigned_id: bool,
    /// Clean Session (3.1.1) / Clean Start (5.0).
    clean_start: bool,
    /// Session Expiry Interval, seconds: 0 ends with the connection, `u32::MAX` never
    /// (3.1.1 Clean Session 0).
    session_expiry: u32,
    /// This connection resumed a stored session with Session Expiry Interval 0 (MQTT 5.0
    /// Clean Start 0, §3.1.2.4): the session's durable subscription serves it, and the
    /// session ends with it (§3.1.2.11.2). The stored record is marked ended at the resume,
    /// so a connection that vanishes without the plugin seeing it still ends the session.
    ends_with_connection: bool,
    limits: ClientLimits,
    /// Enhanced authentication: the method, a host step in flight, a re-authentication.
    auth_method: Option<String>,
    sasl_pending: bool,
    reauth: bool,
    /// Properties of the coming CONNACK (Assigned Client Identifier, authentication); boxed,
    /// like the will, because they live only until the CONNACK and would otherwise add ~400
    /// bytes to every idle connection.
    connack_props: Option<Box<Properties>>,
    principal: Option<Principal>,
    will: Option<Box<codec::Will>>,
    loading: Loading,

    filters: BTreeMap<String, Subscription>,
    /// The durable subscription's name when it is not the default one.
    session_name: Option<String>,
    /// The main backend subscription: a durable subscription for a persistent session, a
    /// route (the host matches the filters) for a clean one.
    backend: Backend,
    /// The filters bound to the route of a clean session, as the host has them.
    routed: BTreeSet<String>,
    /// Shared backend subscriptions, by `$share/...` filter.
    shared: BTreeMap<String, Backend>,
    backend_retries: u32,
    /// Token and `restore` of the timer that retries opening the durable subscription.
    retry_timer: Option<(u64, bool)>,
    generation: u64,
    saved_generation: u64,
    save_in_flight: bool,
    replies: VecDeque<PendingReply>,

    acks: VecDeque<PendingAck>,
    /// QoS 2 from the client: stored, waiting for PUBREL (§4.3.3).
    qos2_in: BTreeSet<u16>,
    /// QoS 2 to the client: PUBREC received, waiting for PUBCOMP.
    qos2_released: BTreeSet<u16>,
    qos2_generation: u64,
    qos2_saved: u64,
    qos2_save_in_flight: bool,

    /// Topic Aliases the client set (§3.3.2.3.4).
    aliases_in: HashMap<u16, String>,
    /// Topic Aliases we set for the client.
    aliases_out: HashMap<String, u16>,

    inflight_out: HashMap<u16, Inflight>,
    waiting_out: VecDeque<Outgoing>,
    next_packet_id: u16,
    scans: VecDeque<ScanJob>,
    scan_in_flight: bool,
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
            sasl_mechanisms: Rc::from(Vec::new()),
            phase: Phase::AwaitConnect,
            out: Outbox::with_coalesce_limit(SEND_COALESCE),
            input: Input::new(
                config
                    .max_packet_size
                    .saturating_mul(2)
                    .max(MIN_INPUT_LIMIT),
            ),
            ops: Ops::new(),
            now_ms,
            timer: None,
            keep_alive_ms: 0,
            last_activity_ms: now_ms,
            v5: false,
            client_id: String::new(),
            assigned_id: false,
            clean_start: true,
            session_expiry: 0,
            ends_with_connection: false,
            limits: ClientLimits::default(),
            auth_method: None,
            sasl_pending: false,
            reauth: false,
            connack_props: None,
            principal: None,
            will: None,
            loading: Loading::default(),
            filters: BTreeMap::new(),
            session_name: None,
            backend: Backend::Closed,
            routed: BTreeSet::new(),
            shared: BTreeMap::new(),
            backend_retries: 0,
            retry_timer: None,
            generation: 0,
            saved_generation: 0,
            save_in_flight: false,
            replies: VecDeque::new(),
            acks: VecDeque::new(),
            qos2_in: BTreeSet::new(),
            qos2_released: BTreeSet::new(),
            qos2_generation: 0,
            qos2_saved: 0,
            qos2_save_in_flight: false,
            aliases_in: HashMap::new(),
            aliases_out: HashMap::new(),
            inflight_out: HashMap::new(),
            waiting_out: VecDeque::new(),
            next_packet_id: 1,
            scans: VecDeque::new(),
            scan_in_flight: false,
        };
        let delay = c.config.connect_timeout_ms;
        c.arm_timer(TimerKind::Connect, delay);
        c
    }

    /// The SASL mechanisms the host offers (`sasl-mechanisms`), for MQTT 5.0 enhanced
    /// authentication; without them a CONNECT with an Authentication Method gets 0x8C.
    pub fn with_sasl_mechanisms(mut self, mechanisms: Rc<[String]>) -> Self {
        self.sasl_mechanisms = mechanisms;
        self
    }

    /// Whether the connection is closed (by either side); later events are ignored.
    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    /// The Topic Filters of the session and what was granted.
    pub fn filters(&self) -> &BTreeMap<String, Subscription> {
        &self.filters
    }
}

/// Events in with the time, actions out: the SDK's `Driver` runs it against the host.
impl Machine for MqttConnection {
    fn apply(&mut self, now_ms: u64, event: Event) {
        if self.phase != Phase::Closed {
            self.now_ms = now_ms;
            match event {
                Event::Data(bytes) => self.input.push(bytes),
                Event::AuthResult { token, result } => self.on_auth_result(token, result),
                Event::AuthBusy { token } => self.on_auth_busy(token),
                Event::SaslResult { token, result } => self.on_sasl_result(token, result),
                Event::PublishResult { token, result } => self.on_publish_result(token, result),
                Event::SubscribeResult { token, result } => self.on_subscribe_result(token, result),
                Event::Delivery(d) => self.on_delivery(d),
                Event::Timer { token } => self.on_timer(now_ms, token),
                Event::KvResult { token, result } => self.on_kv_result(token, result),
                Event::KvScanResult { token, result } => self.on_scan_result(token, result),
                Event::ClaimResult { token, result } => self.on_claim_result(token, result),
                Event::ClaimLost { .. } => {
                    // The will stays registered: the host publishes it as for any other end
                    // of the network connection (as Mosquitto does on a takeover).
                    // A session that ends with this connection is left to the new owner of
                    // the Client Identifier, which finds it marked ended and deletes it:
                    // deleting it here could race with that connection's CONNECT.
                    self.ends_with_connection = false;
                    self.disconnect(
                        reason::SESSION_TAKEN_OVER,
                        "session taken over by a new connection with the same Client Identifier (§3.1.4)",
                    )
                }
                Event::Closed => {
                    self.phase = Phase::Closed;
                    self.input.clear();
                }
                // Never asked for: MQTT uses routes and subscriptions, not `messaging`,
                // `indexed`, `topics` or `homes`.
                Event::Receipt { .. }
                | Event::Message(_)
                | Event::Position { .. }
                | Event::Appended { .. }
                | Event::Entry(_)
                | Event::Bounds { .. }
                | Event::TopicsResult { .. }
                | Event::HomePost(_)
                | Event::HomeReply { .. }
                | Event::PublishRefused { .. } => {}
            }
            // New bytes, or an event that lifted a pause (CONNACK sent, a publish stored).
            self.process_input(now_ms);
            self.release_idle_capacity();
        }
    }

    /// The actions produced so far, oldest first, packets joined and acks gathered.
    fn take_actions(&mut self) -> Vec<Action> {
        self.out.take()
    }
}

impl MqttConnection {
    /// Frees the allocations of collections that are empty again, so that an idle connection
    /// holds only its live state (10,000 idle connections are the norm for an IoT fleet).
    /// Cheap: an emptied collection is rare on a busy connection, and refilling it costs one
    /// small allocation.
    fn release_idle_capacity(&mut self) {
        self.ops.release_idle_capacity();
        if self.inflight_out.is_empty() && self.inflight_out.capacity() > 0 {
            self.inflight_out = HashMap::new();
        }
        if self.acks.is_empty() {
            self.acks = VecDeque::new();
        }
        if self.replies.is_empty() {
            self.replies = VecDeque::new();
        }
        if self.waiting_out.is_empty() {
            self.waiting_out = VecDeque::new();
        }
        if self.scans.is_empty() {
            self.scans = VecDeque::new();
        }
    }

    /// The properties of the coming CONNACK, allocated when the first one is set.
    fn connack_props(&mut self) -> &mut Properties {
        self.connack_props.get_or_insert_with(Box::default)
    }

    // ---- plumbing -------------------------------------------------------------------------

    /// Queues a packet; an MQTT 5.0 client's Maximum Packet Size is never exceeded
    /// (§3.1.2.11.4: the packet is dropped instead).
    fn send(&mut self, bytes: Vec<u8>) {
        let n = bytes.len();
        if !self.queue_packet(|out| out.extend_from_slice(&bytes)) {
            self.log(
                LogLevel::Debug,
                format!("dropping a {n}-byte packet over the client's Maximum Packet Size"),
            );
        }
    }

    /// Appends the packet `encode` writes to the bytes queued for the client, unless it is
    /// over the client's Maximum Packet Size (`false`: nothing queued). Consecutive packets
    /// share one `Send` up to [`SEND_COALESCE`] bytes, acks in between included (the outbox
    /// gathers those), so a batch of deliveries is encoded straight into one buffer and
    /// leaves in one host call.
    fn queue_packet(&mut self, encode: impl FnOnce(&mut Vec<u8>)) -> bool {
        self.out.send_with(self.limits.maximum_packet_size, encode)
    }

    fn log(&mut self, level: LogLevel, message: impl std::fmt::Display) {
        let message = format!("mqtt conn {} ({}): {message}", self.conn_id, self.client_id);
        self.out.push(Action::Log { level, message });
    }

    /// Closes the connection once; everything after is ignored. A session that ends with
    /// the connection loses its backlog now, while the plugin still can act.
    fn close(&mut self, reason: impl Into<String>) {
        if self.phase != Phase::Closed {
            self.end_resumed_session();
            self.phase = Phase::Closed;
            self.input.clear();
            self.out.push(Action::Close(reason.into()));
        }
    }

    /// Ends the connection for a protocol reason. An MQTT 5.0 client first gets the reason
    /// code: in a DISCONNECT once connected (§3.14.2.1), in the CONNACK before.
    fn disconnect(&mut self, code: u8, reason: impl Into<String>) {
        let reason = reason.into();
        if self.v5 {
            let props = Properties {
                reason_string: Some(reason_string(&reason)),
                ..Properties::default()
            };
            match self.phase {
                Phase::Connected => self.send(v5::disconnect(code, &props)),
                Phase::Authenticating | Phase::Connecting => {
                    self.send(v5::connack(false, code, &props))
                }
                Phase::AwaitConnect | Phase::Closed => {}
            }
        }
        self.close(reason);
    }

    /// Refuses the CONNECT: CONNACK with the 3.1.1 return code or the 5.0 reason code
    /// (`None`: a 3.1.1 client just sees the close), then close.
    fn refuse(&mut self, v3_code: Option<u8>, v5_code: u8, reason: impl Into<String>) {
        let reason = reason.into();
        if self.v5 {
            let props = Properties {
                reason_string: Some(reason_string(&reason)),
                ..Properties::default()
            };
            self.send(v5::connack(false, v5_code, &props));
        } else if let Some(code) = v3_code {
            self.send(codec::connack(false, code));
        }
        self.close(reason);
    }

    fn arm_timer(&mut self, kind: TimerKind, delay_ms: u64) {
        let token = self.ops.token();
        self.timer = Some((token, kind));
        self.out.push(Action::SetTimer { token, delay_ms });
    }

    /// Whether the session outlives the connection (3.1.1 Clean Session 0, 5.0 Session
    /// Expiry Interval > 0), so its filters and QoS 2 state are kept in the kv.
    fn persistent(&self) -> bool {
        self.session_expiry > 0
    }

    /// Whether the main backend subscription is the session's durable one: the session is
    /// persistent, or this connection resumed one that ends with it.
    fn durable_backend(&self) -> bool {
        self.persistent() || self.ends_with_connection
    }

    /// QoS 1/2 PUBLISHes the client may have unacknowledged (§4.9).
    fn send_quota(&self) -> usize {
        self.config.max_inflight.min(self.limits.receive_maximum)
    }

    // ---- input ----------------------------------------------------------------------------

    /// Decodes and handles buffered packets while the state allows it; then the input tells
    /// the host whether to read (backpressure: while decoding is paused with bytes left over,
    /// the client is slowed by TCP instead of filling the buffer) and checks its bound.
    fn process_input(&mut self, now_ms: u64) {
        while !self.input_paused() {
            if self.phase == Phase::AwaitConnect {
                if let Some(reason) = not_a_connect(self.input.pending()) {
                    self.close(reason);
                    return;
                }
            }
            let (max, v5) = (self.config.max_packet_size, self.v5);
            match self.input.next_frame(|buf| codec::decode(buf, max, v5)) {
                Ok(None) => break,
                Ok(Some(packet)) => {
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
                    let code = match e {
                        DecodeError::TooLarge { .. } => reason::PACKET_TOO_LARGE,
                        DecodeError::Protocol { .. } => reason::PROTOCOL_ERROR,
                        _ => reason::MALFORMED_PACKET,
                    };
                    self.disconnect(code, e.to_string());
                    return;
                }
            }
        }
        if self.phase == Phase::Closed {
            return;
        }
        let paused = self.input_paused();
        if let Err(e) = self.input.settle(paused, &mut self.out) {
            self.disconnect(reason::RECEIVE_MAXIMUM_EXCEEDED, e.to_string());
        }
    }

    /// Whether decoding waits: for the CONNECT's outcome, or for room in the window of
    /// publishes awaiting the backend.
    fn input_paused(&self) -> bool {
        match self.phase {
            Phase::Closed | Phase::Connecting => true,
            Phase::Connected => self.acks.len() >= self.config.max_pending_publishes,
            Phase::AwaitConnect | Phase::Authenticating => false,
        }
    }

    fn on_packet(&mut self, packet: Inbound) {
        const PROTOCOL: u8 = reason::PROTOCOL_ERROR;
        match (self.phase, packet) {
            (Phase::AwaitConnect, Inbound::Connect(c)) => self.on_connect(*c),
            (_, Inbound::Connect(_)) => self.disconnect(PROTOCOL, "second CONNECT (§3.1)"),
            (Phase::AwaitConnect, _) => self.close("first packet must be CONNECT (§3.1)"),
            (_, Inbound::Auth { reason, properties }) => self.on_auth_packet(reason, properties),
            (Phase::Authenticating, _) => {
                self.disconnect(PROTOCOL, "only AUTH before the CONNACK (§4.12)")
            }
            (_, Inbound::Publish(p)) => self.on_publish(p),
            (_, Inbound::Puback(id)) => self.on_puback(id),
            (_, Inbound::Pubrec(id, code)) => self.on_pubrec(id, code),
            (_, Inbound::Pubrel(id)) => self.on_pubrel(id),
            (_, Inbound::Pubcomp(id)) => self.on_pubcomp(id),
            (
                _,
                Inbound::Subscribe {
                    packet_id,
                    entries,
                    subscription_id,
                },
            ) => self.on_subscribe(packet_id, entries, subscription_id),
            (_, Inbound::Unsubscribe { packet_id, filters }) => {
                self.on_unsubscribe(packet_id, filters)
            }
            (_, Inbound::Pingreq) => self.send(codec::pingresp()),
            (
                _,
                Inbound::Disconnect {
                    reason,
                    session_expiry,
                },
            ) => self.on_disconnect(reason, session_expiry),
            (_, Inbound::ServerOnly(name)) => self.disconnect(
                PROTOCOL,
                format!("client sent {name}, which only a server sends"),
            ),
        }
    }

    /// DISCONNECT from the client (§3.14): the will is dropped unless the Reason Code is
    /// 0x04 (MQTT 5.0 §3.14.2.1); a new Session Expiry Interval applies from now.
    fn on_disconnect(&mut self, code: u8, session_expiry: Option<u32>) {
        let was_persistent = self.persistent();
        if let Some(expiry) = session_expiry {
            if self.session_expiry == 0 && expiry > 0 {
                // The interval stays 0: a resumed session ends with this connection (`close`).
                self.disconnect(
                    reason::PROTOCOL_ERROR,
                    "Session Expiry Interval set on DISCONNECT after 0 on CONNECT (§3.14.2.2.2)",
                );
                return;
            }
            self.session_expiry = expiry;
        }
        if code != reason::DISCONNECT_WITH_WILL {
            self.out.push(Action::SetWill(None));
        }
        if (was_persistent && !self.persistent()) || self.ends_with_connection {
            self.drop_session();
        } else {
            self.record_session_end();
        }
        self.close(format!("client sent DISCONNECT ({code:#04x})"));
    }

    // ---- timers (§3.1.2.10 Keep Alive) ------------------------------------------------------

    fn on_timer(&mut self, now_ms: u64, token: u64) {
        if let Some((retry, restore)) = self.retry_timer {
            if retry == token {
                self.retry_timer = None;
                if self.backend == Backend::Opening {
                    self.open_backend(restore);
                }
                return;
            }
        }
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
                    self.record_session_end();
                    self.disconnect(reason::KEEP_ALIVE_TIMEOUT, "keep-alive timeout");
                } else {
                    self.arm_timer(TimerKind::KeepAlive, self.keep_alive_ms - idle);
                }
            }
        }
    }
}

/// The reason string of a failed PUBACK / PUBREC.
fn ack_reason_string(code: u8) -> &'static str {
    match code {
        reason::NOT_AUTHORIZED => "not authorized to publish to this topic",
        reason::QUOTA_EXCEEDED => "publish quota exceeded",
        reason::TOPIC_NAME_INVALID => "invalid Topic Name",
        reason::PAYLOAD_FORMAT_INVALID => {
            "payload is not UTF-8 as its Payload Format Indicator says"
        }
        _ => "the message could not be stored",
    }
}

/// A reason string of ours, cut to [`REASON_STRING_MAX`] bytes on a character boundary.
fn reason_string(text: &str) -> String {
    let mut end = text.len().min(REASON_STRING_MAX);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.get(..end).unwrap_or_default().to_string()
}

/// The credentials of a CONNECT (§3.1.3.4, §3.1.3.5).
///
/// - no User Name: `Anonymous` (an MQTT 5.0 Password without User Name is ignored);
/// - User Name empty or `token`, and a Password shaped like a JWT (three base64url parts,
///   the first starting `eyJ`): `Token(password)`, as Pulsar token authentication expects;
/// - otherwise `Password { user, password }` (an absent Password is empty).
pub fn credentials(username: Option<String>, password: Option<Vec<u8>>) -> Credentials {
    match (username, password) {
        (None, _) => Credentials::Anonymous,
        (Some(user), Some(password))
            if (user.is_empty() || user == "token")
                && std::str::from_utf8(&password).is_ok_and(looks_like_jwt) =>
        {
            Credentials::Token(String::from_utf8_lossy(&password).into_owned())
        }
        (Some(user), password) => Credentials::Password(UserPassword {
            user,
            password: password.unwrap_or_default(),
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

/// CONNECT / CONNACK, enhanced authentication, opening and ending the session.
mod connect;
/// Messages to the client and their acknowledgements.
mod deliver;
/// PUBLISH / PUBREL from the client and their acknowledgements.
mod publish;
/// SUBSCRIBE / UNSUBSCRIBE, backend subscriptions, retained messages for new ones.
mod subscribe;

#[cfg(test)]
mod tests;
