//! The sans-IO state machine of one Pulsar WebSocket session (docs/pulsar-websocket-api.md).
//!
//! Lifecycle: `AwaitRequest` → the upgrade REQUEST (path, query, token) → `Authenticating`
//! (the host checks the token) → a producer is `Producing` at once; a consumer or reader is
//! `Opening` until the host opened it → RESPONSE 101 → `Producing` / `Consuming` → `Closed`.
//! Any refusal before the 101 is an HTTP answer with Pulsar's status (§3), and the end.
//!
//! The checks run in Pulsar's order, so that a request with two faults gets Pulsar's
//! answer: path; for a consumer its subscription and parameters; the token; tenancy; a
//! producer's or reader's parameters.
//!
//! Guarantees:
//! - nothing is sent before the RESPONSE, and nothing after a CLOSE;
//! - a bad publish frame is answered with `send-error` and the session goes on (§5);
//! - bounded per connection: one message of at most `max_message_size` plus one read
//!   pending; at most `max_pending_sends` publishes in flight (then the socket is not read);
//!   at most the consumer's window of deliveries outstanding (the host's `max-unacked`).

mod consumer;
mod producer;
#[cfg(test)]
mod sim_tests;
#[cfg(test)]
mod tests;

use crate::config::Config;
use crate::params::{ConsumerParams, ProducerParams, Query, ReaderParams, Start};
use crate::request::{self, Endpoint, Refusal, Target};
use magnetar_sdk::input::Input;
use magnetar_sdk::outbox::Outbox;
use magnetar_sdk::web::{self, Direction, Frame, Response};
pub use magnetar_sdk::{Action, Event, Machine};
use magnetar_sdk::{
    ConsumerSpec, Credentials, ErrorKind, LogLevel, Message, MessageIdAt, OpError, Position,
    Principal, SubId, SubMode, TopicRef,
};

use consumer::Consumer;
use producer::Producer;

/// The token of the one authentication of a connection.
const AUTH_TOKEN: u64 = 1;
/// The token of the one `open-consumer` of a connection.
const OPEN_TOKEN: u64 = 2;

/// Close codes (RFC 6455 §7.4.1).
pub mod close_code {
    /// The client's frame could not be used (Pulsar asks Jetty for code 3 here, which is
    /// not a valid close code).
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// A message larger than the plugin takes.
    pub const TOO_BIG: u16 = 1009;
    /// The gateway failed.
    pub const INTERNAL_ERROR: u16 = 1011;
}

#[derive(Debug)]
enum Phase {
    AwaitRequest,
    Authenticating(Box<Pending>),
    Opening(Box<Pending>),
    Producing(Producer),
    Consuming(Consumer),
    Closed,
}

/// A request on its way to being served.
#[derive(Debug)]
struct Pending {
    target: Target,
    query: Query,
    /// Checked before authentication, as Pulsar's consumer does.
    consumer: Option<ConsumerParams>,
}

/// One WebSocket session of Pulsar's API: see the module docs.
#[derive(Debug)]
pub struct PulsarWsConnection {
    config: Config,
    conn_id: u64,
    input: Input,
    out: Outbox,
    phase: Phase,
    /// The RESPONSE went out: from now on errors are close frames, not HTTP answers.
    upgraded: bool,
    /// Deliveries that overtook the completion of `open-consumer` (at most its window).
    early: Vec<Message>,
    now_ms: u64,
}

impl PulsarWsConnection {
    pub fn new(conn_id: u64, config: Config, now_ms: u64) -> Self {
        PulsarWsConnection {
            config,
            conn_id,
            // One whole message plus one read of the host (256 KiB) beyond it.
            input: Input::new(config.max_message_size + web::HEADER_LEN + 256 * 1024),
            out: Outbox::new(),
            phase: Phase::AwaitRequest,
            upgraded: false,
            early: Vec::new(),
            now_ms,
        }
    }

    /// Whether the session ended.
    pub fn is_closed(&self) -> bool {
        matches!(self.phase, Phase::Closed)
    }

    fn log(&mut self, level: LogLevel, message: String) {
        self.out.push(Action::Log {
            level,
            message: format!("pulsar-ws conn {}: {message}", self.conn_id),
        });
    }

    fn send_frame(&mut self, frame: &Frame) {
        self.out.send_with(usize::MAX, |buf| frame.encode_into(buf));
    }

    /// Sends one text message.
    fn send_text(&mut self, text: &str) {
        self.out.send_with(usize::MAX, |buf| {
            web::encode_payload(buf, web::KIND_TEXT, text.as_bytes())
        });
    }

    /// Sends a text frame that `write` appends straight into the outgoing buffer (no
    /// intermediate string; the envelope's length is filled in after).
    fn send_text_with(&mut self, write: impl FnOnce(&mut Vec<u8>)) {
        self.out.send_with(usize::MAX, |buf| {
            let start = buf.len();
            buf.push(web::KIND_TEXT);
            buf.extend_from_slice(&[0; 4]);
            write(buf);
            let len = u32::try_from(buf.len() - start - web::HEADER_LEN).unwrap_or(u32::MAX);
            if let Some(field) = buf.get_mut(start + 1..start + web::HEADER_LEN) {
                field.copy_from_slice(&len.to_be_bytes());
            }
        });
    }

    /// Refuses the upgrade with an HTTP answer and ends the connection.
    fn refuse(&mut self, refusal: Refusal) {
        self.log(
            LogLevel::Debug,
            format!("upgrade refused: {} {}", refusal.status, refusal.message),
        );
        self.send_frame(&Frame::Response(Response::refuse(
            refusal.status,
            refusal.message.clone(),
        )));
        self.end(format!("upgrade refused with {}", refusal.status));
    }

    /// Ends the session with a close frame, or with an HTTP answer before the upgrade.
    fn fail(&mut self, code: u16, reason: &str) {
        if !self.upgraded {
            let status = if code == close_code::INTERNAL_ERROR {
                500
            } else {
                400
            };
            return self.refuse(Refusal::new(status, reason));
        }
        self.log(LogLevel::Debug, format!("closing with {code}: {reason}"));
        self.send_frame(&Frame::Close {
            code,
            reason: reason.to_string(),
        });
        self.end(format!("closed with {code}: {reason}"));
    }

    fn end(&mut self, reason: String) {
        self.out.push(Action::Close(reason));
        self.phase = Phase::Closed;
        self.input.clear();
    }

    /// Takes the frames the current phase can handle.
    fn read_frames(&mut self) {
        loop {
            // The host sends messages only after the 101, which comes once the session is
            // open; anything else waits in the input.
            let open = matches!(
                self.phase,
                Phase::AwaitRequest | Phase::Producing(_) | Phase::Consuming(_)
            );
            if !open || self.producer_full() {
                return;
            }
            let limit = self.config.max_message_size;
            let frame = match self
                .input
                .next_frame(|b| web::decode(Direction::ToPlugin, b, limit))
            {
                Ok(Some(frame)) => frame,
                Ok(None) => return,
                Err(web::FrameError::TooLong { len, limit }) => {
                    let reason = format!("message of {len} bytes exceeds the limit of {limit}");
                    return self.fail(close_code::TOO_BIG, &reason);
                }
                Err(e) => {
                    let reason = format!("broken envelope from the host: {e}");
                    return self.fail(close_code::INTERNAL_ERROR, &reason);
                }
            };
            match frame {
                Frame::Request(req) => self.on_request(req),
                Frame::Text(text) => self.on_text(text),
                // Pulsar's handlers have no binary handler: Jetty drops them.
                Frame::Binary(_) => {}
                Frame::Response(_) | Frame::Close { .. } => {}
            }
        }
    }

    fn producer_full(&self) -> bool {
        matches!(&self.phase, Phase::Producing(p) if p.in_flight() >= self.config.max_pending_sends)
    }

    fn on_request(&mut self, req: web::Request) {
        if !matches!(self.phase, Phase::AwaitRequest) {
            return self.fail(close_code::INTERNAL_ERROR, "a second upgrade request");
        }
        match self.check_request(&req) {
            Ok((pending, creds)) => {
                self.out.push(Action::Authenticate {
                    token: AUTH_TOKEN,
                    creds,
                });
                self.phase = Phase::Authenticating(Box::new(pending));
            }
            Err(refusal) => self.refuse(refusal),
        }
    }

    /// What Pulsar checks before authentication.
    fn check_request(&self, req: &web::Request) -> Result<(Pending, Credentials), Refusal> {
        let target = request::parse_path(&req.path)?;
        let query = request::parse_query(&req.query)?;
        let consumer = match target.endpoint {
            Endpoint::Consumer => Some(ConsumerParams::parse(&query)?),
            Endpoint::Reader => {
                ReaderParams::check_early(&query)?;
                None
            }
            Endpoint::Producer => None,
        };
        let creds = match request::token(&req.headers, &query) {
            Some(token) => Credentials::Token(token),
            None => Credentials::Anonymous,
        };
        Ok((
            Pending {
                target,
                query,
                consumer,
            },
            creds,
        ))
    }

    fn on_auth_result(&mut self, token: u64, result: Result<Principal, OpError>) {
        if token != AUTH_TOKEN {
            return;
        }
        let Phase::Authenticating(pending) = std::mem::replace(&mut self.phase, Phase::Closed)
        else {
            return;
        };
        let principal = match result {
            Ok(p) => p,
            Err(e) => return self.refuse(auth_refusal(&e)),
        };
        match serve(*pending, &principal) {
            Ok(Serve::Produce(p)) => {
                self.accept();
                self.phase = Phase::Producing(p);
            }
            Ok(Serve::Open(pending, spec)) => {
                self.out.push(Action::OpenConsumer {
                    token: OPEN_TOKEN,
                    spec,
                });
                self.phase = Phase::Opening(pending);
            }
            Err(refusal) => self.refuse(refusal),
        }
    }

    /// `on-auth-busy`: the host could not check credentials now.
    fn on_auth_busy(&mut self, token: u64) {
        if token == AUTH_TOKEN && matches!(self.phase, Phase::Authenticating(_)) {
            self.refuse(Refusal::new(503, "Server busy, try again"));
        }
    }

    fn on_subscribe_result(&mut self, token: u64, result: Result<SubId, OpError>) {
        if token != OPEN_TOKEN {
            return;
        }
        let Phase::Opening(pending) = std::mem::replace(&mut self.phase, Phase::Closed) else {
            // Opened after the connection ended: the host closes it with the connection.
            return;
        };
        match result {
            Ok(sub) => {
                self.accept();
                self.phase = Phase::Consuming(Consumer::new(sub, &pending, self.now_ms));
                for m in std::mem::take(&mut self.early) {
                    self.on_message(m);
                }
            }
            Err(e) => {
                let refusal = match pending.target.endpoint {
                    Endpoint::Reader => {
                        Refusal::server_error(format!("Failed to create reader: {}", e.message))
                    }
                    _ => open_refusal(&e),
                };
                self.refuse(refusal)
            }
        }
    }

    fn accept(&mut self) {
        self.upgraded = true;
        self.send_frame(&Frame::Response(Response::switching_protocols()));
    }

    fn on_text(&mut self, text: String) {
        match &mut self.phase {
            Phase::Producing(_) => self.on_publish(text),
            Phase::Consuming(_) => self.on_command(text),
            _ => {}
        }
    }

    /// Settles the input after an event: backpressure and the bound.
    fn settle(&mut self) {
        if self.is_closed() {
            return;
        }
        let paused = !matches!(
            self.phase,
            Phase::AwaitRequest | Phase::Producing(_) | Phase::Consuming(_)
        ) || self.producer_full();
        if let Err(e) = self.input.settle(paused, &mut self.out) {
            self.fail(close_code::TOO_BIG, &e.to_string());
        }
    }
}

impl Machine for PulsarWsConnection {
    fn apply(&mut self, now_ms: u64, event: Event) {
        if self.is_closed() {
            return;
        }
        self.now_ms = now_ms;
        match event {
            Event::Data(bytes) => self.input.push(bytes),
            Event::AuthResult { token, result } => self.on_auth_result(token, result),
            Event::AuthBusy { token } => self.on_auth_busy(token),
            Event::SubscribeResult { token, result } => self.on_subscribe_result(token, result),
            // Receipts free room for publishes that waited in the input: read on below.
            Event::Receipt { token, result } => self.on_receipt(token, result),
            Event::Message(m) => {
                if matches!(self.phase, Phase::Opening(_)) {
                    self.early.push(m);
                } else {
                    self.on_message(m);
                }
                // Nothing new to read.
                return;
            }
            Event::Position { token, result } => self.on_position_result(token, result),
            Event::Timer { token } => self.on_timer(token),
            Event::Closed => {
                self.phase = Phase::Closed;
                self.input.clear();
                return;
            }
            _ => {}
        }
        self.read_frames();
        self.settle();
    }

    fn take_actions(&mut self) -> Vec<Action> {
        self.out.take()
    }
}

enum Serve {
    Produce(Producer),
    Open(Box<Pending>, ConsumerSpec),
}

/// After authentication: tenancy, then the endpoint's own checks.
fn serve(pending: Pending, principal: &Principal) -> Result<Serve, Refusal> {
    let t = &pending.target;
    if t.tenant != principal.tenant || t.namespace != principal.namespace {
        return Err(Refusal::new(403, "Not authorized"));
    }
    check_topic_name(&t.topic)?;
    let topic = TopicRef {
        name: t.topic.clone(),
        persistent: t.persistent,
    };
    match t.endpoint {
        Endpoint::Producer => {
            let params = ProducerParams::parse(&pending.query)?;
            Ok(Serve::Produce(Producer::new(topic, params)))
        }
        Endpoint::Consumer => {
            let Some(params) = pending.consumer.clone() else {
                return Err(Refusal::server_error("consumer parameters were not read"));
            };
            let subscription = t.subscription.clone().unwrap_or_default();
            let dead_letter_topic = match (&params.dead_letter_topic, params.max_redeliver_count) {
                (_, 0) => None,
                (Some(given), _) => Some(dead_letter_name(given, principal)?),
                (None, _) => Some(format!("{}-{subscription}-DLQ", t.topic)),
            };
            let spec = ConsumerSpec {
                topic,
                subscription: params.durable.then_some(subscription),
                mode: params.mode,
                // Pulsar's default initial position (a NonDurable cursor starts there too).
                start: Position::Latest,
                max_unacked: params.window(),
                nack_delay_ms: params.nack_delay_ms,
                max_redeliveries: params.max_redeliver_count,
                dead_letter_topic,
                consumer_name: params.consumer_name.clone(),
            };
            Ok(Serve::Open(Box::new(pending), spec))
        }
        Endpoint::Reader => {
            let params = ReaderParams::parse(&pending.query)?;
            let max_unacked = params.window();
            let start = match params.start {
                Start::Earliest => Position::Earliest,
                Start::Latest => Position::Latest,
                // A reader starts after its id (`startMessageIdInclusive` is never set).
                Start::Id(id) => Position::MessageId(MessageIdAt {
                    id,
                    inclusive: false,
                }),
            };
            let spec = ConsumerSpec {
                topic,
                subscription: None,
                mode: SubMode::Exclusive,
                start,
                max_unacked,
                nack_delay_ms: 0,
                max_redeliveries: 0,
                dead_letter_topic: None,
                consumer_name: params.reader_name,
            };
            Ok(Serve::Open(Box::new(pending), spec))
        }
    }
}

/// The host's rule for a short topic name (`gateway/src/names.rs`), checked before the
/// upgrade so that a producer whose topic the host would refuse gets a 400, as Pulsar's
/// producer creation would, rather than a `send-error` on every message. Pulsar would read
/// a `/` as a legacy tenant/cluster/namespace name.
fn check_topic_name(name: &str) -> Result<(), Refusal> {
    let bad = |why: &str| {
        Err(Refusal::bad_param(format!(
            "Invalid topic name: {name} ({why})"
        )))
    };
    if name.len() > 200 {
        return bad("longer than 200 bytes");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '%'))
    {
        return bad("a topic name of the gateway has only A-Z a-z 0-9 . _ - %");
    }
    if name.starts_with("__") || name == "." || name == ".." {
        return bad("reserved for the gateway");
    }
    Ok(())
}

/// A `deadLetterTopic` as the host names topics: a short name of the principal's namespace.
/// Pulsar takes full names and `tenant/namespace/topic`; a name of another namespace is
/// not the connection's to write.
fn dead_letter_name(given: &str, principal: &Principal) -> Result<String, Refusal> {
    let rest = match given.split_once("://") {
        Some(("persistent", rest)) => rest,
        Some(_) => {
            return Err(Refusal::bad_param(format!(
                "Invalid dead letter topic {given}: only persistent topics"
            )))
        }
        None => given,
    };
    let parts: Vec<&str> = rest.split('/').collect();
    match parts.as_slice() {
        [name] if !name.is_empty() => Ok((*name).to_string()),
        [tenant, namespace, name] if !name.is_empty() => {
            if *tenant == principal.tenant && *namespace == principal.namespace {
                Ok((*name).to_string())
            } else {
                Err(Refusal::new(403, "Not authorized"))
            }
        }
        _ => Err(Refusal::bad_param(format!("Invalid topic name: {given}"))),
    }
}

/// Authentication refused (§2): 401 as Pulsar's `AuthenticationException`; a full tenant
/// or a busy host are not the client's fault.
fn auth_refusal(e: &OpError) -> Refusal {
    match e.kind {
        ErrorKind::NotAuthorized | ErrorKind::NotFound | ErrorKind::InvalidName => {
            Refusal::new(401, "Failed to authenticate")
        }
        ErrorKind::QuotaExceeded => Refusal::new(429, format!("Too many requests: {}", e.message)),
        ErrorKind::Backend if mentions(&e.message, &["busy"]) => {
            Refusal::new(503, "Server busy, try again")
        }
        _ => Refusal::server_error(format!("Server error: {}", e.message)),
    }
}

/// A consumer the host could not open, with Pulsar's status for the same failure (§3).
fn open_refusal(e: &OpError) -> Refusal {
    let failed = |status| {
        Refusal::new(
            status,
            format!("Failed to create producer/consumer: {}", e.message),
        )
    };
    match e.kind {
        ErrorKind::NotAuthorized => Refusal::new(403, "Not authorized"),
        ErrorKind::InvalidName => Refusal::bad_param(&e.message),
        ErrorKind::NotFound => failed(404),
        ErrorKind::QuotaExceeded => failed(429),
        ErrorKind::Backend if mentions(&e.message, &["busy", "exclusive", "fenced", "already"]) => {
            failed(409)
        }
        ErrorKind::Backend | ErrorKind::Internal => failed(500),
    }
}

fn mentions(message: &str, words: &[&str]) -> bool {
    let m = message.to_ascii_lowercase();
    words.iter().any(|w| m.contains(w))
}
