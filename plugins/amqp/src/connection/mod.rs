//! One AMQP 0-9-1 connection as a sans-IO state machine: events in (bytes, host completions,
//! timers), actions out (bytes to send, host calls).
//!
//! What it does, in the order of a connection's life (section numbers of the AMQP 0-9-1
//! specification; "RabbitMQ" where the reference server's behaviour is what clients rely on):
//!
//! - Protocol header (§4.2.2): anything but `AMQP 0 0 9 1` is answered with that header and
//!   the socket closes, as RabbitMQ does.
//! - `connection.start` (§1.4.2.1) with RabbitMQ's server properties and `capabilities`
//!   (publisher_confirms, exchange_exchange_bindings, basic.nack, consumer_cancel_notify,
//!   connection.blocked, consumer_priorities, authentication_failure_close, per_consumer_qos,
//!   direct_reply_to); mechanisms `PLAIN AMQPLAIN`, checked by the host's `authenticate`.
//!   Refused credentials: `connection.close` 403 ACCESS_REFUSED when the client announced
//!   `authentication_failure_close`, else the socket just closes (RabbitMQ's two behaviours).
//!   RabbitMQ's default user: `guest` logs in from loopback only (`loopback_users`), and
//!   `guest`/`guest` that the host does not know is tried as an anonymous login (a
//!   standalone gateway has no users and allows anonymous clients).
//! - `connection.tune` / `tune-ok` (§1.4.2.5): channel-max, frame-max and heartbeat, the
//!   client's smaller values win; then `connection.open`: the virtual host `/` or the name of
//!   the principal's namespace is the principal's namespace, any other is refused with
//!   `connection.close` 530 NOT_ALLOWED, as RabbitMQ refuses a vhost it does not have.
//! - Heartbeats (§4.2.7): sent every half interval; a client silent for two intervals is
//!   disconnected (RabbitMQ's "missed heartbeats from client").
//! - Channels (§1.5): open, close (both directions), flow. A frame on a channel that is not
//!   open is 504 CHANNEL_ERROR on the connection.
//! - Errors: a frame that does not decode is `connection.close` 501 FRAME_ERROR, an unknown
//!   method 540, content frames out of place 505 UNEXPECTED_FRAME; after the server's
//!   `connection.close` only `close-ok` is awaited (for at most [`CLOSE_TIMEOUT_MS`]).
//!
//! Exchanges, queues and messages are `channel`'s; how long queues live (exclusive,
//! auto-delete, cancel notifications) is `lifetime`'s. A method not built yet is answered
//! with `connection.close` 540 NOT_IMPLEMENTED naming it (docs/amqp.md lists them).

use std::collections::HashMap;

use magnetar_sdk::input::Input;
use magnetar_sdk::machine::{Action, Event, Machine};
use magnetar_sdk::ops::Ops;
use magnetar_sdk::outbox::Outbox;
use magnetar_sdk::{Credentials, LogLevel, OpError, Principal, SubId, UserPassword};

use crate::codec::frame::write_method;
use crate::codec::method::*;
use crate::codec::reply::*;
use crate::codec::{CodecError, FieldTable, FieldValue, Frame, PROTOCOL_HEADER};
use crate::config::Config;

mod blocked;
mod channel;
mod delete;
mod exchange_bind;
mod lifetime;
mod overflow;
mod sweep;
pub use channel::name_seed;
#[cfg(test)]
mod tests;

/// RabbitMQ's default user and password.
const GUEST: &str = "guest";

/// How long the server waits for `connection.close-ok` after its `connection.close`.
pub const CLOSE_TIMEOUT_MS: u64 = 3_000;
/// Undecoded bytes held beyond one frame (one socket read).
const INPUT_SLACK: usize = 256 * 1024;

/// Where the connection is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// Waiting for the 8-byte protocol header.
    Header,
    /// `connection.start` sent.
    StartOk,
    /// The host checks the credentials.
    Authenticating { mechanism: String },
    /// `connection.tune` sent.
    TuneOk,
    /// `connection.tune-ok` received.
    Open,
    /// `connection.open-ok` sent: channels may be used.
    Running,
    /// The server sent `connection.close` and waits for `close-ok`.
    Closing,
    /// The socket is closing or gone.
    Done,
}

/// A long operation in flight.
#[derive(Debug, Clone)]
enum Op {
    Auth,
    /// RabbitMQ's default `guest`/`guest`, which the host did not know: tried as anonymous.
    AuthGuest,
    /// A step of a channel method that holds the connection's input until it is done.
    Task(channel::Task),
    /// A published message: its channel and, in confirm mode, its sequence number.
    Publish {
        channel: u16,
        seq: Option<u64>,
    },
    /// A message dead-lettered from a queue, published to its dead-letter exchange.
    DeadLetter,
    /// A message of a `tx.commit` on this channel.
    TxPublish {
        channel: u16,
    },
    /// A consumer being opened.
    Consume(channel::PendingConsume),
    /// `queue.purge`'s consumer being opened, then its seek to the queue's end.
    Purge(channel::PendingPurge),
    PurgeSeek {
        channel: u16,
        sub: SubId,
        no_wait: bool,
        count: u64,
    },
    /// The lease of this connection's exclusive queues, or a queue's expiry, written.
    Lease,
    /// The record of a queue this connection consumes, read to see whether it still exists.
    Watch {
        queue: String,
    },
    /// A queue being deleted in the background.
    Reap(lifetime::Reap),
    /// The route or consumer that checks `queue.delete`'s `if-unused` / `if-empty`.
    DeleteCheck(delete::PendingDelete),
    /// The record of a `reject-publish-dlx` queue that refused a message, read to
    /// dead-letter it (`overflow`).
    RefusedDeadLetter {
        queue: String,
        d: Box<channel::Delivered>,
    },
    /// `basic.get`'s consumer of a queue being opened (or its retry timer): the try.
    Getter {
        channel: u16,
        queue: String,
        attempts: u32,
    },
    /// The record of a queue about to be swept (`sweep`), read.
    SweepRecord {
        queue: String,
    },
    /// A sweep's consumer being opened.
    Sweep {
        queue: String,
        policy: crate::queue_policy::QueuePolicy,
    },
}

/// An error that ends the connection: `connection.close` with this code.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ConnError {
    code: u16,
    text: String,
    /// The method that caused it (class id, method id), 0/0 for none.
    cause: (u16, u16),
}

impl ConnError {
    fn new(code: u16, text: impl Into<String>) -> Self {
        ConnError {
            code,
            text: format!("{} - {}", reply_name(code), text.into()),
            cause: (0, 0),
        }
    }

    fn caused_by(mut self, method: &Method) -> Self {
        self.cause = method.ids();
        self
    }
}

/// RabbitMQ's name of a reply code, which starts its reply texts.
fn reply_name(code: u16) -> &'static str {
    match code {
        REPLY_SUCCESS => "OK",
        CONNECTION_FORCED => "CONNECTION_FORCED",
        ACCESS_REFUSED => "ACCESS_REFUSED",
        NOT_FOUND => "NOT_FOUND",
        RESOURCE_LOCKED => "RESOURCE_LOCKED",
        PRECONDITION_FAILED => "PRECONDITION_FAILED",
        FRAME_ERROR => "FRAME_ERROR",
        SYNTAX_ERROR => "SYNTAX_ERROR",
        COMMAND_INVALID => "COMMAND_INVALID",
        CHANNEL_ERROR => "CHANNEL_ERROR",
        UNEXPECTED_FRAME => "UNEXPECTED_FRAME",
        RESOURCE_ERROR => "RESOURCE_ERROR",
        NOT_ALLOWED => "NOT_ALLOWED",
        NOT_IMPLEMENTED => "NOT_IMPLEMENTED",
        _ => "INTERNAL_ERROR",
    }
}

/// One AMQP connection: see the module docs.
pub struct AmqpConnection {
    config: Config,
    phase: Phase,
    input: Input,
    out: Outbox,
    ops: Ops<Op>,
    /// The client announced `authentication_failure_close` in its capabilities.
    auth_failure_close: bool,
    /// The client logs in with `guest`/`guest`.
    guest_default: bool,
    principal: Option<Principal>,
    /// Negotiated limits (`connection.tune-ok`).
    frame_max: u32,
    channel_max: u16,
    heartbeat_ms: u64,
    /// When a frame last arrived.
    last_recv_ms: u64,
    /// The timer of the handshake deadline, then of heartbeats, then of the close deadline.
    timer: u64,
    channels: HashMap<u16, channel::ChannelState>,
    /// A channel method waits for the host: frames stay undecoded until it is done.
    busy: bool,
    /// Consumers by subscription: channel, consumer tag, no-ack, queue.
    consumers: HashMap<SubId, (u16, String, bool, String)>,
    /// `basic.get` consumers by subscription: channel and queue.
    getters: HashMap<SubId, (u16, String)>,
    /// `declare-ok`s waiting for their counts, by id.
    counted_replies: HashMap<u64, channel::CountedReply>,
    /// The queue arguments that act on the messages of each consumer and `basic.get`
    /// consumer (expiry, dead-lettering).
    policies: HashMap<SubId, crate::queue_policy::QueuePolicy>,
    /// Publishes a full queue refused (`overflow`).
    refused: overflow::Refused,
    /// A `basic.get` waiting for a message.
    pending_get: Option<channel::PendingGet>,
    /// A `queue.delete` with `if-empty` waiting to see whether the queue has a message.
    deleting: Option<delete::PendingDelete>,
    /// A `queue.purge` taking the ready messages of a queue that consumers hold.
    purge_drain: Option<channel::purge::PurgeDrain>,
    /// Names this connection gives server-named queues.
    name_seed: u64,
    names_given: u64,
    now_ms: u64,
    /// The client announced `consumer_cancel_notify`.
    cancel_notify: bool,
    /// The client announced `connection.blocked`.
    blocked_notify: bool,
    /// The client connects from a loopback address (RabbitMQ's `guest` may log in only
    /// from there).
    loopback: bool,
    /// Its publishes in flight, for `connection.blocked`.
    pushback: blocked::Pushback,
    /// This connection's id, the owner of its exclusive queues (`lifetime`).
    conn_id: String,
    /// The exclusive queues it declared, by name.
    owned: std::collections::BTreeMap<String, crate::topology::Queue>,
    /// The auto-delete queues it consumes, by name.
    auto_delete: HashMap<String, crate::topology::Queue>,
    /// Cancelled consumers whose deliveries the client has not all settled yet, and their
    /// channel (`lifetime::cancel_consumer`).
    draining: HashMap<SubId, u16>,
    /// The queues with `x-expires` it consumes, and their `x-expires`.
    expiring: HashMap<String, u64>,
    /// The timer that moves their expiry on.
    expiry_timer: Option<u64>,
    /// The timer that renews its lease, while it has one.
    lease_timer: Option<u64>,
    /// The queues it consumes, with the incarnation its consumers started on
    /// (`lifetime::watch_queue`).
    watched: HashMap<String, Option<String>>,
    /// The timer that reads their records again, while there are some.
    watch_timer: Option<u64>,
    /// Queues being deleted in the background.
    reaps: usize,
    /// The queues it declared, swept for expired messages (`sweep`).
    sweeps: HashMap<String, sweep::Sweep>,
    /// The connection ends once they are: `Some(true)` with `close-ok`.
    ending: Option<bool>,
}

impl AmqpConnection {
    /// A connection accepted at `now_ms`: it waits for the protocol header until the
    /// handshake deadline.
    pub fn new(config: Config, now_ms: u64) -> Self {
        Self::with_seed(config, now_ms, 0)
    }

    /// As [`AmqpConnection::new`], with the seed of the names of server-named queues
    /// (random per connection in the adapter).
    pub fn with_seed(config: Config, now_ms: u64, seed: u64) -> Self {
        let mut c = AmqpConnection {
            config,
            phase: Phase::Header,
            input: Input::new(config.frame_max as usize + INPUT_SLACK),
            out: Outbox::new(),
            ops: Ops::new(),
            auth_failure_close: false,
            guest_default: false,
            principal: None,
            frame_max: config.frame_max,
            channel_max: config.channel_max,
            heartbeat_ms: 0,
            last_recv_ms: now_ms,
            timer: 0,
            channels: HashMap::new(),
            busy: false,
            consumers: HashMap::new(),
            getters: HashMap::new(),
            counted_replies: HashMap::new(),
            policies: HashMap::new(),
            refused: Default::default(),
            pending_get: None,
            deleting: None,
            purge_drain: None,
            name_seed: 0,
            names_given: 0,
            now_ms,
            cancel_notify: false,
            blocked_notify: false,
            loopback: true,
            pushback: Default::default(),
            conn_id: format!("{seed:016x}-{now_ms:x}"),
            owned: Default::default(),
            auto_delete: HashMap::new(),
            expiring: HashMap::new(),
            draining: HashMap::new(),
            expiry_timer: None,
            lease_timer: None,
            watched: HashMap::new(),
            watch_timer: None,
            reaps: 0,
            sweeps: HashMap::new(),
            ending: None,
        };
        c.name_seed = seed;
        c.set_timer(config.handshake_timeout_ms);
        c
    }

    /// Where the client connects from: whether it is a loopback address.
    pub fn set_loopback(&mut self, loopback: bool) {
        self.loopback = loopback;
    }

    /// The principal, once authenticated.
    pub fn principal(&self) -> Option<&Principal> {
        self.principal.as_ref()
    }

    fn set_timer(&mut self, delay_ms: u64) {
        self.timer = self.ops.token();
        self.out.push(Action::SetTimer {
            token: self.timer,
            delay_ms,
        });
    }

    fn send_method(&mut self, channel: u16, method: Method) {
        let mut bytes = Vec::new();
        write_method(&mut bytes, channel, method);
        self.out.send(bytes);
    }

    fn log(&mut self, level: LogLevel, message: String) {
        self.out.push(Action::Log { level, message });
    }

    /// Ends the socket now (after what was sent).
    fn hang_up(&mut self, reason: &str) {
        if self.phase != Phase::Done {
            self.phase = Phase::Done;
            self.input.clear();
            self.out.push(Action::Close(reason.to_string()));
        }
    }

    /// Sends `connection.close` and waits for `close-ok`.
    fn close_connection(&mut self, e: ConnError) {
        if matches!(self.phase, Phase::Closing | Phase::Done) {
            return;
        }
        self.log(LogLevel::Debug, format!("closing: {} {}", e.code, e.text));
        self.send_method(
            0,
            Method::ConnectionClose(ConnectionClose {
                reply_code: e.code,
                reply_text: e.text,
                class_id: e.cause.0,
                method_id: e.cause.1,
            }),
        );
        self.phase = Phase::Closing;
        self.set_timer(CLOSE_TIMEOUT_MS);
    }

    fn on_data(&mut self, now_ms: u64, bytes: Vec<u8>) {
        if self.phase == Phase::Done {
            return;
        }
        // Any bytes are a sign of life (§4.2.7), also while frames wait undecoded behind a
        // method that waits for the host.
        self.last_recv_ms = now_ms;
        self.input.push(bytes);
        if self.phase == Phase::Header {
            let pending = self.input.pending();
            if pending.len() < PROTOCOL_HEADER.len() {
                return;
            }
            if pending[..PROTOCOL_HEADER.len()] != PROTOCOL_HEADER {
                // §4.2.2: answer with the protocol header the server speaks, then close.
                self.out.send(PROTOCOL_HEADER.to_vec());
                self.hang_up("not an AMQP 0-9-1 protocol header");
                return;
            }
            self.input
                .next_frame(|_| Ok::<_, ()>(Some(((), PROTOCOL_HEADER.len()))))
                .ok();
            self.send_start();
        }
        self.pump(now_ms);
    }

    /// Decodes and handles frames while no channel method waits for the host.
    fn pump(&mut self, now_ms: u64) {
        // Before tune-ok the limit is the server's own frame-max.
        while !self.busy && !matches!(self.phase, Phase::Done | Phase::Header) {
            let frame_max = self.frame_max;
            match self.input.next_frame(|b| Frame::check(b, frame_max)) {
                Ok(Some(frame)) => {
                    self.last_recv_ms = now_ms;
                    self.on_frame(frame);
                }
                Ok(None) => break,
                Err(e) => {
                    self.on_codec_error(e);
                    break;
                }
            }
        }
    }

    fn on_codec_error(&mut self, e: CodecError) {
        self.input.clear();
        if self.phase == Phase::Closing {
            self.hang_up("undecodable frame while closing");
        } else {
            self.close_connection(ConnError::new(e.reply_code(), e.to_string()));
        }
    }

    fn send_start(&mut self) {
        let mut caps = FieldTable::default();
        for cap in [
            "publisher_confirms",
            "exchange_exchange_bindings",
            "basic.nack",
            "consumer_cancel_notify",
            "connection.blocked",
            "consumer_priorities",
            "authentication_failure_close",
            "per_consumer_qos",
            "direct_reply_to",
        ] {
            caps.insert(cap, FieldValue::Bool(true));
        }
        let text = |s: &str| FieldValue::LongStr(s.as_bytes().to_vec());
        let mut props = FieldTable::default();
        props
            .insert("capabilities", FieldValue::Table(caps))
            .insert("cluster_name", text("magnetar"))
            .insert("copyright", text("The Magnetar authors"))
            .insert(
                "information",
                text("Magnetar: AMQP 0-9-1 on Apache Pulsar, Apache-2.0"),
            )
            .insert("platform", text("Magnetar AMQP plugin (WebAssembly)"))
            .insert("product", text("Magnetar"))
            .insert("version", text(env!("CARGO_PKG_VERSION")));
        self.send_method(
            0,
            Method::ConnectionStart(ConnectionStart {
                version_major: 0,
                version_minor: 9,
                server_properties: props,
                mechanisms: b"PLAIN AMQPLAIN".to_vec(),
                locales: b"en_US".to_vec(),
            }),
        );
        self.phase = Phase::StartOk;
    }

    fn on_frame(&mut self, frame: Frame) {
        match (&self.phase, frame) {
            (_, Frame::Heartbeat) => {}
            (Phase::Closing, Frame::Method(0, Method::ConnectionCloseOk(_))) => {
                if self.ending.is_none() {
                    self.reap_owned(false);
                }
            }
            (Phase::Closing, Frame::Method(0, Method::ConnectionClose(_))) => {
                self.send_method(0, Method::ConnectionCloseOk(ConnectionCloseOk {}));
                self.hang_up("connection closed");
            }
            // §1.4.2.5.1: after connection.close, everything else is discarded.
            (Phase::Closing | Phase::Done, _) => {}
            (_, Frame::Method(0, Method::ConnectionClose(c))) => {
                self.log(
                    LogLevel::Debug,
                    format!("client closes: {} {}", c.reply_code, c.reply_text),
                );
                self.client_closes();
            }
            (Phase::StartOk, Frame::Method(0, Method::ConnectionStartOk(m))) => self.on_start_ok(m),
            (Phase::TuneOk, Frame::Method(0, Method::ConnectionTuneOk(m))) => self.on_tune_ok(m),
            (Phase::Open, Frame::Method(0, Method::ConnectionOpen(m))) => self.on_open(m),
            (Phase::Running, Frame::Method(0, Method::ConnectionBlocked(_)))
            | (Phase::Running, Frame::Method(0, Method::ConnectionUnblocked(_))) => {}
            (Phase::Running, Frame::Method(0, m)) => {
                let e = ConnError::new(
                    COMMAND_INVALID,
                    format!("{} is not a method of channel 0", m.name()),
                );
                self.close_connection(e.caused_by(&m));
            }
            (Phase::Running, frame) => self.on_channel_frame(frame),
            (_, Frame::Method(_, m)) => {
                let e = ConnError::new(
                    COMMAND_INVALID,
                    format!("{} is not expected during the handshake", m.name()),
                );
                self.close_connection(e.caused_by(&m));
            }
            (_, _) => self.close_connection(ConnError::new(
                UNEXPECTED_FRAME,
                "content frame during the handshake",
            )),
        }
    }

    fn on_start_ok(&mut self, m: ConnectionStartOk) {
        if let Some(FieldValue::Table(caps)) = m.client_properties.get("capabilities") {
            let cap = |name: &str| matches!(caps.get(name), Some(FieldValue::Bool(true)));
            self.auth_failure_close = cap("authentication_failure_close");
            self.cancel_notify = cap("consumer_cancel_notify");
            self.blocked_notify = cap("connection.blocked");
        }
        let creds = match m.mechanism.as_str() {
            "PLAIN" => plain_credentials(&m.response),
            "AMQPLAIN" => amqplain_credentials(&m.response),
            other => {
                let e = ConnError::new(
                    COMMAND_INVALID,
                    format!("unknown authentication mechanism '{other}'"),
                );
                let e = e.caused_by(&Method::ConnectionStartOk(ConnectionStartOk::default()));
                return self.close_connection(e);
            }
        };
        let Some(creds) = creds else {
            return self.refuse_login(&m.mechanism);
        };
        // RabbitMQ's `loopback_users`: its default user logs in from loopback only.
        if creds.user == GUEST && !self.loopback {
            self.log(
                LogLevel::Info,
                "user 'guest' can only connect via localhost".into(),
            );
            return self.refuse_login(&m.mechanism);
        }
        self.guest_default = creds.user == GUEST && creds.password == GUEST.as_bytes();
        let token = self.ops.start(Op::Auth);
        self.out.push(Action::Authenticate {
            token,
            creds: Credentials::Password(creds),
        });
        self.phase = Phase::Authenticating {
            mechanism: m.mechanism,
        };
    }

    fn refuse_login(&mut self, mechanism: &str) {
        self.log(LogLevel::Info, format!("login refused ({mechanism})"));
        if self.auth_failure_close {
            self.close_connection(ConnError::new(
                ACCESS_REFUSED,
                format!(
                    "Login was refused using authentication mechanism {mechanism}. For details see the broker logfile."
                ),
            ));
        } else {
            self.hang_up("login refused");
        }
    }

    fn on_auth_result(&mut self, token: u64, result: Result<Principal, OpError>) {
        let guest_try = match self.ops.complete(token) {
            Some(Op::Auth) => false,
            Some(Op::AuthGuest) => true,
            _ => return,
        };
        // `guest`/`guest` that the gateway does not know (standalone, no users configured):
        // RabbitMQ's default login, accepted where anonymous access is.
        if result.is_err() && !guest_try && std::mem::take(&mut self.guest_default) {
            let token = self.ops.start(Op::AuthGuest);
            return self.out.push(Action::Authenticate {
                token,
                creds: Credentials::Anonymous,
            });
        }
        let Phase::Authenticating { mechanism } = self.phase.clone() else {
            return;
        };
        match result {
            Ok(principal) => {
                self.principal = Some(principal);
                self.send_method(
                    0,
                    Method::ConnectionTune(ConnectionTune {
                        channel_max: self.config.channel_max,
                        frame_max: self.config.frame_max,
                        heartbeat: self.config.heartbeat_s,
                    }),
                );
                self.phase = Phase::TuneOk;
            }
            Err(e) => {
                self.log(LogLevel::Debug, format!("authentication: {}", e.message));
                self.refuse_login(&mechanism);
            }
        }
    }

    fn on_tune_ok(&mut self, m: ConnectionTuneOk) {
        // §1.4.2.6.1: 0 means "no limit" from the client; the server's own limits stay.
        if m.channel_max != 0 {
            self.channel_max = m.channel_max.min(self.config.channel_max);
        }
        if m.frame_max != 0 {
            if (m.frame_max as usize) < 4096 {
                return self.close_connection(ConnError::new(
                    NOT_ALLOWED,
                    format!("frame_max={} < 4096 min size", m.frame_max),
                ));
            }
            self.frame_max = m.frame_max.min(self.config.frame_max);
        }
        self.heartbeat_ms = u64::from(m.heartbeat) * 1000;
        self.phase = Phase::Open;
    }

    fn on_open(&mut self, m: ConnectionOpen) {
        let namespace = self.principal.as_ref().map(|p| p.namespace.as_str());
        if m.virtual_host != "/" && Some(m.virtual_host.as_str()) != namespace {
            let e = ConnError::new(NOT_ALLOWED, format!("vhost {} not found", m.virtual_host));
            return self.close_connection(e.caused_by(&Method::ConnectionOpen(m)));
        }
        self.send_method(
            0,
            Method::ConnectionOpenOk(ConnectionOpenOk {
                reserved_1: String::new(),
            }),
        );
        self.phase = Phase::Running;
        // The handshake deadline is over; heartbeats take the timer.
        self.timer = 0;
        if self.heartbeat_ms > 0 {
            self.set_timer(self.heartbeat_ms / 2);
        }
    }

    fn on_timer(&mut self, now_ms: u64, token: u64) {
        if self.on_retry(token)
            || self.on_get_timer(token)
            || self.on_delete_timer(token)
            || self.on_delete_route_timer(token)
            || self.on_reap_timer(token)
            || self.on_lease_timer(token)
            || self.on_block_timer(token)
            || self.on_expiry_timer(token)
            || self.on_watch_timer(token)
            || self.on_sweep_timer(token)
            || self.on_purge_drain_timer(token)
        {
            return;
        }
        if token != self.timer || self.phase == Phase::Done {
            return;
        }
        match self.phase {
            Phase::Running if self.heartbeat_ms > 0 => {
                if now_ms.saturating_sub(self.last_recv_ms) > 2 * self.heartbeat_ms {
                    self.log(LogLevel::Info, "missed heartbeats from client".into());
                    return self.hang_up("missed heartbeats from client, timeout");
                }
                let mut bytes = Vec::new();
                Frame::Heartbeat.write(&mut bytes);
                self.out.send(bytes);
                self.set_timer(self.heartbeat_ms / 2);
            }
            Phase::Closing => self.hang_up("no connection.close-ok in time"),
            Phase::Running => {}
            _ => self.hang_up("handshake timeout"),
        }
    }
}

/// PLAIN (RFC 4616): `authzid NUL authcid NUL passwd`.
fn plain_credentials(response: &[u8]) -> Option<UserPassword> {
    let mut parts = response.splitn(3, |b| *b == 0);
    let _authzid = parts.next()?;
    let user = String::from_utf8(parts.next()?.to_vec()).ok()?;
    let password = parts.next()?.to_vec();
    Some(UserPassword { user, password })
}

/// AMQPLAIN: a field table's entries (no length prefix) with `LOGIN` and `PASSWORD`.
fn amqplain_credentials(response: &[u8]) -> Option<UserPassword> {
    let table = FieldTable::read_entries(response, 0).ok()?;
    let user = table.get("LOGIN")?.as_str()?.to_string();
    let password = match table.get("PASSWORD")? {
        FieldValue::LongStr(b) => b.clone(),
        _ => return None,
    };
    Some(UserPassword { user, password })
}

impl Machine for AmqpConnection {
    fn apply(&mut self, now_ms: u64, event: Event) {
        self.now_ms = now_ms;
        let was_busy = self.busy;
        match event {
            Event::Data(bytes) => self.on_data(now_ms, bytes),
            Event::AuthResult { token, result } => self.on_auth_result(token, result),
            Event::AuthBusy { token } if self.ops.complete(token).is_some() => {
                self.close_connection(ConnError::new(
                    CONNECTION_FORCED,
                    "too many logins at once, retry later",
                ));
            }
            Event::Timer { token } => self.on_timer(now_ms, token),
            Event::KvResult { token, result } => match self.ops.complete(token) {
                Some(Op::Task(task)) => self.step(task, channel::Outcome::Kv(result)),
                Some(Op::Reap(r)) => self.on_reap_record(r, result),
                Some(Op::Watch { queue }) => self.on_watched(queue, result),
                Some(Op::SweepRecord { queue }) => self.on_sweep_record(queue, result),
                Some(Op::RefusedDeadLetter { queue, d }) => {
                    self.on_refused_record(queue, *d, result)
                }
                Some(Op::Lease) => {
                    if let Err(e) = result {
                        self.log(LogLevel::Warn, format!("lease: {}", e.message));
                    }
                }
                Some(other) => self.log(LogLevel::Warn, format!("kv result for {other:?}")),
                None => {}
            },
            Event::SubscribeResult { token, result } => match self.ops.complete(token) {
                Some(Op::Task(task)) => self.step(task, channel::Outcome::Sub(result)),
                Some(Op::Consume(c)) => self.on_consume_result(c, result),
                Some(Op::Purge(p)) => self.on_purge_consumer(p, result),
                Some(Op::Getter {
                    channel,
                    queue,
                    attempts,
                }) => self.on_getter_result(channel, queue, attempts, result),
                Some(Op::Reap(r)) => self.on_reap_route(r, result),
                Some(Op::DeleteCheck(p)) => self.on_delete_check(p, result),
                Some(Op::Sweep { queue, policy }) => self.on_sweep_opened(queue, policy, result),
                _ => {
                    // A route opened only to store its filters, answered after the
                    // connection moved on: close it.
                    if let Ok(sub) = result {
                        self.out.push(Action::Unsubscribe { sub, delete: false });
                    }
                }
            },
            Event::KvScanResult { token, result } => {
                if let Some(Op::Task(task)) = self.ops.complete(token) {
                    self.step(task, channel::Outcome::Scan(result));
                }
            }
            Event::PublishRefused {
                token,
                refusals,
                msg,
            } => self.on_publish_refused(token, refusals, msg),
            Event::PublishResult { token, result } => match self.ops.complete(token) {
                Some(Op::Publish { channel, seq }) => {
                    let refused = self.take_refused(token);
                    self.on_published(channel, seq, result, refused)
                }
                Some(Op::DeadLetter) => self.on_dead_lettered(result),
                Some(Op::TxPublish { channel }) => {
                    self.take_refused(token);
                    self.on_tx_published(channel, result)
                }
                _ => {}
            },
            Event::Position { token, result } => {
                if let Some(Op::PurgeSeek {
                    channel,
                    sub,
                    no_wait,
                    count,
                }) = self.ops.complete(token)
                {
                    self.on_purged(channel, sub, (no_wait, count), result.map(|_| ()))
                }
            }
            Event::Message(m) => self.on_message(m),
            // A queue's message, seen by the route that checks `queue.delete`'s `if-empty`;
            // other deliveries of routes opened to store a queue's filters are not ours to
            // take.
            Event::Delivery(d) => {
                self.on_delete_check_message(d.subscription);
            }
            Event::Closed => {
                self.phase = Phase::Done;
                self.input.clear();
            }
            _ => {}
        }
        if was_busy && !self.busy {
            self.pump(now_ms);
        }
        if self.phase != Phase::Done {
            if let Err(e) = self.input.settle(self.busy, &mut self.out) {
                self.close_connection(ConnError::new(FRAME_ERROR, e.to_string()));
                self.input.clear();
            }
        }
    }

    fn take_actions(&mut self) -> Vec<Action> {
        self.out.take()
    }
}
