//! The machine contract: a protocol connection as a value fed events that answers with
//! actions, and the [`Driver`] that runs one against the host.
//!
//! This is the quinn-proto / rustls shape. A plugin's connection is a [`Machine`]: it never
//! calls the host; it is handed [`Event`]s (bytes, completions of host operations,
//! deliveries, timers), each with the current time, and queues [`Action`]s (bytes to send,
//! host calls to make), in order. Because it is a plain value, the whole protocol runs in a
//! native `cargo test` (see [`crate::testing`]) and under a fuzzer, with no gateway and no
//! Wasm. The [`Driver`] is the one thin piece of glue: it stamps each SDK callback with the
//! host's clock, feeds it to the machine, and carries the actions out as host calls, so a
//! plugin's adapter is a [`Plugin`](crate::Plugin) impl that builds its machine:
//!
//! ```no_run
//! use magnetar_sdk::machine::{Action, Driver, Event, Machine};
//! use magnetar_sdk::outbox::Outbox;
//! use magnetar_sdk::{Conn, ConnInfo, Plugin};
//!
//! /// Echoes bytes back.
//! #[derive(Default)]
//! struct Echo {
//!     out: Outbox,
//! }
//!
//! impl Machine for Echo {
//!     fn apply(&mut self, _now_ms: u64, event: Event) {
//!         if let Event::Data(bytes) = event {
//!             self.out.send(bytes);
//!         }
//!     }
//!     fn take_actions(&mut self) -> Vec<Action> {
//!         self.out.take()
//!     }
//! }
//!
//! struct EchoPlugin;
//!
//! impl Plugin for EchoPlugin {
//!     type Connection = Driver<Echo>;
//!     fn new(_config: &str) -> Result<Self, String> {
//!         Ok(EchoPlugin)
//!     }
//!     fn open(&mut self, conn: Conn, _info: ConnInfo) -> Driver<Echo> {
//!         Driver::new(conn, Echo::default())
//!     }
//! }
//!
//! magnetar_sdk::export_plugin!(EchoPlugin);
//! ```
//!
//! What it does not do: decide anything about a protocol. The [`Action`]s map one to one
//! onto host calls; the order of the actions is the order of the calls.

use crate::{
    AppendResult, Appended, Bounds, Cap, Conn, Connection, ConsumerSpec, Credentials, DedupSpec,
    Delivery, Entry, Filter, HomePost, KvEntry, LogLevel, Message, MessageOut, OpError,
    OutboundMessage, Position, Principal, PublishResult, ReaderSpec, Receipt, RecordOut, Refusal,
    RouteSpec, SaslOutcome, SubId, SubscriptionSpec, TopicInfo, Will,
};

/// Something that happened to a connection: one SDK callback, as a value.
#[derive(Debug, Clone)]
pub enum Event {
    /// Bytes from the client. A stream: a frame may be split across events.
    Data(Vec<u8>),
    /// Outcome of [`Action::Authenticate`].
    AuthResult {
        token: u64,
        result: Result<Principal, OpError>,
    },
    /// Outcome of [`Action::AuthenticateSasl`]: a challenge, or success.
    SaslResult {
        token: u64,
        result: Result<SaslOutcome, OpError>,
    },
    /// Outcome of [`Action::Publish`]: `Ok` once the backend stored the message.
    PublishResult {
        token: u64,
        result: Result<(), OpError>,
    },
    /// The queues that refused a message of [`Action::PublishCapped`] (fed at once, before
    /// its [`Event::PublishResult`]; never empty), and the message, given back (e.g. to
    /// dead-letter it).
    PublishRefused {
        token: u64,
        refusals: Vec<Refusal>,
        msg: OutboundMessage,
    },
    /// Outcome of [`Action::Subscribe`]: the subscription's handle.
    SubscribeResult {
        token: u64,
        result: Result<SubId, OpError>,
    },
    /// A message on one of the connection's subscriptions; ack it with [`Action::Ack`].
    Delivery(Delivery),
    /// A timer set with [`Action::SetTimer`] fired.
    Timer { token: u64 },
    /// Outcome of [`Action::KvGet`] (the value, if any) or [`Action::KvPut`] (`Ok(None)`).
    KvResult {
        token: u64,
        result: Result<Option<Vec<u8>>, OpError>,
    },
    /// Outcome of [`Action::KvScan`]: entries in key order.
    KvScanResult {
        token: u64,
        result: Result<Vec<KvEntry>, OpError>,
    },
    /// Outcome of [`Action::Claim`]: `Ok` once the key is this connection's.
    ClaimResult {
        token: u64,
        result: Result<(), OpError>,
    },
    /// Another connection claimed `key`, which this one held (session takeover).
    ClaimLost { key: String },
    /// Outcome of [`Action::SendMessage`]: the stored message's id.
    Receipt {
        token: u64,
        result: Result<Vec<u8>, OpError>,
    },
    /// A message of a consumer opened with [`Action::OpenConsumer`]; ack it with
    /// [`Action::Ack`], or give it back with [`Action::Nack`].
    Message(Message),
    /// Outcome of [`Action::Seek`] (`None`) or [`Action::LastMessageId`].
    Position {
        token: u64,
        result: Result<Option<Vec<u8>>, OpError>,
    },
    /// The credentials of [`Action::Authenticate`] could not be checked now (a login storm):
    /// answer "server busy". Comes instead of an [`Event::AuthResult`] error.
    AuthBusy { token: u64 },
    /// Outcome of [`Action::Append`]: the entry's id and first index once stored.
    Appended {
        token: u64,
        result: Result<Appended, OpError>,
    },
    /// An entry of a reader opened with [`Action::OpenReader`]; ack it with
    /// [`Action::Ack`] (its `delivery_id`) to open the reader's window again.
    Entry(Entry),
    /// Outcome of [`Action::Bounds`].
    Bounds {
        token: u64,
        result: Result<Bounds, OpError>,
    },
    /// Outcome of [`Action::CreateTopic`], [`Action::DeleteTopic`],
    /// [`Action::SetPartitions`] or [`Action::DescribeTopics`].
    TopicsResult {
        token: u64,
        result: Result<Vec<TopicInfo>, OpError>,
    },
    /// A post for this home ([`Plugin::open_home`](crate::Plugin::open_home)); answer with
    /// [`Action::ReplyHome`].
    HomePost(HomePost),
    /// Outcome of [`Action::PostHome`]: the home's answer.
    HomeReply {
        token: u64,
        result: Result<Vec<u8>, OpError>,
    },
    /// The socket is gone. The machine's actions after this are dropped: no host call is
    /// valid any more.
    Closed,
}

/// Something the host must do for a connection: one host call, as a value. Actions are
/// carried out in the order the machine queued them.
#[derive(Debug, Clone)]
pub enum Action {
    /// [`Conn::send`].
    Send(Vec<u8>),
    /// [`Conn::close`], with the reason for the log.
    Close(String),
    /// [`Conn::set_reading`]: backpressure (see [`crate::input`]).
    SetReading(bool),
    /// [`Conn::authenticate`]; completes with [`Event::AuthResult`].
    Authenticate { token: u64, creds: Credentials },
    /// [`Conn::authenticate_sasl`]; completes with [`Event::SaslResult`].
    AuthenticateSasl {
        token: u64,
        mechanism: String,
        response: Vec<u8>,
    },
    /// [`Conn::publish`]; completes with [`Event::PublishResult`].
    Publish { token: u64, msg: OutboundMessage },
    /// [`Conn::subscribe`]; completes with [`Event::SubscribeResult`].
    Subscribe { token: u64, spec: SubscriptionSpec },
    /// [`Conn::open_route`]; completes with [`Event::SubscribeResult`].
    OpenRoute { token: u64, spec: RouteSpec },
    /// [`Conn::open_capped_route`]; completes with [`Event::SubscribeResult`].
    OpenCappedRoute {
        token: u64,
        spec: RouteSpec,
        cap: Option<Cap>,
    },
    /// [`Conn::store_route`]; completes with [`Event::KvResult`].
    StoreRoute {
        token: u64,
        spec: RouteSpec,
        cap: Option<Cap>,
    },
    /// [`Conn::queue_backlog`]; completes with [`Event::KvResult`] (decode with
    /// [`crate::decode_backlog`]).
    QueueBacklog { token: u64, queue: String },
    /// [`Conn::consumer_count`]; completes with [`Event::KvResult`] (decode with
    /// [`crate::decode_backlog`]).
    ConsumerCount {
        token: u64,
        queue: String,
        prefix: String,
    },
    /// [`Conn::publish_capped`]: [`Event::PublishRefused`] at once if a queue refused the
    /// message, then [`Event::PublishResult`].
    PublishCapped { token: u64, msg: OutboundMessage },
    /// [`Conn::bind`]; a refused filter is logged.
    Bind { route: SubId, filter: Filter },
    /// [`Conn::unbind`].
    Unbind { route: SubId, filter: Filter },
    /// [`Conn::unsubscribe`] (also closes a route).
    Unsubscribe { sub: SubId, delete: bool },
    /// [`Conn::ack`].
    Ack { sub: SubId, delivery_id: u64 },
    /// [`Conn::ack_many`]: several deliveries of one subscription (the
    /// [`Outbox`](crate::outbox::Outbox) gathers them).
    AckMany { sub: SubId, delivery_ids: Vec<u64> },
    /// [`Conn::set_timer`]; fires [`Event::Timer`].
    SetTimer { token: u64, delay_ms: u64 },
    /// [`Conn::kv_get`]; completes with [`Event::KvResult`].
    KvGet { token: u64, key: String },
    /// [`Conn::kv_put`]; completes with [`Event::KvResult`].
    KvPut {
        token: u64,
        key: String,
        value: Option<Vec<u8>>,
    },
    /// [`Conn::kv_scan`]; completes with [`Event::KvScanResult`].
    KvScan {
        token: u64,
        prefix: String,
        start_after: Option<String>,
        limit: u32,
    },
    /// [`Conn::set_will`].
    SetWill(Option<Will>),
    /// [`Conn::claim`]; completes with [`Event::ClaimResult`].
    Claim { token: u64, key: String },
    /// [`Conn::send_message`]; completes with [`Event::Receipt`].
    SendMessage { token: u64, msg: MessageOut },
    /// [`Conn::open_consumer`]; completes with [`Event::SubscribeResult`], then
    /// [`Event::Message`]s.
    OpenConsumer { token: u64, spec: ConsumerSpec },
    /// [`Conn::nack`].
    Nack { sub: SubId, delivery_id: u64 },
    /// [`Conn::drain`].
    Drain { sub: SubId },
    /// [`Conn::seek`]; completes with [`Event::Position`].
    Seek {
        token: u64,
        sub: SubId,
        position: Position,
    },
    /// [`Conn::last_message_id`]; completes with [`Event::Position`].
    LastMessageId { token: u64, sub: SubId },
    /// [`Conn::append`]; completes with [`Event::Appended`].
    Append {
        token: u64,
        topic: String,
        records: Vec<RecordOut>,
        dedup: Option<DedupSpec>,
    },
    /// [`Conn::open_reader`]; completes with [`Event::SubscribeResult`], then
    /// [`Event::Entry`]s.
    OpenReader { token: u64, spec: ReaderSpec },
    /// [`Conn::locate`]; completes with [`Event::Position`].
    Locate {
        token: u64,
        topic: String,
        index: u64,
    },
    /// [`Conn::bounds`]; completes with [`Event::Bounds`].
    Bounds { token: u64, topic: String },
    /// [`Conn::create_topic`]; completes with [`Event::TopicsResult`].
    CreateTopic {
        token: u64,
        topic: String,
        partitions: u32,
    },
    /// [`Conn::delete_topic`]; completes with [`Event::TopicsResult`].
    DeleteTopic { token: u64, topic: String },
    /// [`Conn::set_partitions`]; completes with [`Event::TopicsResult`].
    SetPartitions {
        token: u64,
        topic: String,
        partitions: u32,
    },
    /// [`Conn::describe_topics`]; completes with [`Event::TopicsResult`].
    DescribeTopics { token: u64, names: Vec<String> },
    /// [`Conn::post_home`]; completes with [`Event::HomeReply`].
    PostHome {
        token: u64,
        domain: String,
        shard: u32,
        payload: Vec<u8>,
    },
    /// [`Conn::reply_home`], on a home's connection.
    ReplyHome { post_id: u64, payload: Vec<u8> },
    /// [`crate::log`].
    Log { level: LogLevel, message: String },
}

impl Action {
    /// Carries the action out on `conn`: the one host call it stands for. The answer of a
    /// call that answers at once, as an event for the machine (a [`Action::PublishCapped`]
    /// that a queue refused).
    pub fn call(self, conn: Conn) -> Option<Event> {
        if let Action::PublishCapped { token, msg } = self {
            let refusals = conn.publish_capped(token, &msg);
            return (!refusals.is_empty()).then_some(Event::PublishRefused {
                token,
                refusals,
                msg,
            });
        }
        match self {
            Action::Send(bytes) => conn.send(&bytes),
            Action::Close(reason) => conn.close(&reason),
            Action::SetReading(reading) => conn.set_reading(reading),
            Action::Authenticate { token, creds } => conn.authenticate(token, &creds),
            Action::AuthenticateSasl {
                token,
                mechanism,
                response,
            } => conn.authenticate_sasl(token, &mechanism, &response),
            Action::Publish { token, msg } => conn.publish(token, &msg),
            Action::Subscribe { token, spec } => conn.subscribe(token, &spec),
            Action::OpenRoute { token, spec } => conn.open_route(token, &spec),
            Action::OpenCappedRoute { token, spec, cap } => {
                conn.open_capped_route(token, &spec, cap)
            }
            Action::StoreRoute { token, spec, cap } => conn.store_route(token, &spec, cap),
            Action::QueueBacklog { token, queue } => conn.queue_backlog(token, &queue),
            Action::ConsumerCount {
                token,
                queue,
                prefix,
            } => conn.consumer_count(token, &queue, &prefix),
            // Answered above.
            Action::PublishCapped { .. } => {}
            Action::Bind { route, filter } => {
                if let Err(e) = conn.bind(route, &filter) {
                    crate::log(
                        LogLevel::Warn,
                        &format!("filter {filter:?} refused: {}", e.message),
                    );
                }
            }
            Action::Unbind { route, filter } => conn.unbind(route, &filter),
            Action::Unsubscribe { sub, delete } => conn.unsubscribe(sub, delete),
            Action::Ack { sub, delivery_id } => conn.ack(sub, delivery_id),
            Action::AckMany { sub, delivery_ids } => conn.ack_many(sub, &delivery_ids),
            Action::SetTimer { token, delay_ms } => conn.set_timer(token, delay_ms),
            Action::KvGet { token, key } => conn.kv_get(token, &key),
            Action::KvPut { token, key, value } => conn.kv_put(token, &key, value.as_deref()),
            Action::KvScan {
                token,
                prefix,
                start_after,
                limit,
            } => conn.kv_scan(token, &prefix, start_after.as_deref(), limit),
            Action::SetWill(will) => conn.set_will(will.as_ref()),
            Action::Claim { token, key } => conn.claim(token, &key),
            Action::SendMessage { token, msg } => conn.send_message(token, &msg),
            Action::OpenConsumer { token, spec } => conn.open_consumer(token, &spec),
            Action::Nack { sub, delivery_id } => conn.nack(sub, delivery_id),
            Action::Drain { sub } => conn.drain(sub),
            Action::Seek {
                token,
                sub,
                position,
            } => conn.seek(token, sub, &position),
            Action::LastMessageId { token, sub } => conn.last_message_id(token, sub),
            Action::Append {
                token,
                topic,
                records,
                dedup,
            } => conn.append(token, &topic, &records, dedup.as_ref()),
            Action::OpenReader { token, spec } => conn.open_reader(token, &spec),
            Action::Locate {
                token,
                topic,
                index,
            } => conn.locate(token, &topic, index),
            Action::Bounds { token, topic } => conn.bounds(token, &topic),
            Action::CreateTopic {
                token,
                topic,
                partitions,
            } => conn.create_topic(token, &topic, partitions),
            Action::DeleteTopic { token, topic } => conn.delete_topic(token, &topic),
            Action::SetPartitions {
                token,
                topic,
                partitions,
            } => conn.set_partitions(token, &topic, partitions),
            Action::DescribeTopics { token, names } => conn.describe_topics(token, &names),
            Action::PostHome {
                token,
                domain,
                shard,
                payload,
            } => conn.post_home(token, &domain, shard, &payload),
            Action::ReplyHome { post_id, payload } => conn.reply_home(post_id, &payload),
            Action::Log { level, message } => crate::log(level, &message),
        }
        None
    }
}

/// A protocol connection as a sans-IO state machine.
///
/// The machine queues the actions an event causes (usually in an
/// [`Outbox`](crate::outbox::Outbox)) and hands them over in [`Machine::take_actions`].
/// [`Machine::handle`] and [`Machine::handle_all`] are the two ways to drive it; events
/// handled together have their actions taken together, so that an outbox joins the packets
/// of a batch of deliveries into one send.
///
/// ```
/// use magnetar_sdk::machine::{Action, Event, Machine};
///
/// /// Counts the bytes it was sent and says how many, once per event.
/// #[derive(Default)]
/// struct Counter {
///     seen: usize,
///     actions: Vec<Action>,
/// }
///
/// impl Machine for Counter {
///     fn apply(&mut self, _now_ms: u64, event: Event) {
///         if let Event::Data(bytes) = event {
///             self.seen += bytes.len();
///             self.actions.push(Action::Send(self.seen.to_string().into_bytes()));
///         }
///     }
///     fn take_actions(&mut self) -> Vec<Action> {
///         std::mem::take(&mut self.actions)
///     }
/// }
///
/// let mut m = Counter::default();
/// let actions = m.handle(0, Event::Data(b"abc".to_vec()));
/// assert!(matches!(actions.as_slice(), [Action::Send(b)] if b == b"3"));
/// let actions = m.handle_all(0, [Event::Data(b"d".to_vec()), Event::Data(b"e".to_vec())]);
/// assert_eq!(actions.len(), 2);
/// ```
pub trait Machine: 'static {
    /// Applies one event at `now_ms` (milliseconds since the Unix epoch, from the host),
    /// queuing the actions it causes.
    fn apply(&mut self, now_ms: u64, event: Event);

    /// The actions queued so far, oldest first.
    fn take_actions(&mut self) -> Vec<Action>;

    /// Feeds one event at `now_ms`; returns the actions it caused.
    fn handle(&mut self, now_ms: u64, event: Event) -> Vec<Action> {
        self.apply(now_ms, event);
        self.take_actions()
    }

    /// Feeds events that arrived together (e.g. a batch of deliveries), in order; returns
    /// the actions they caused, together.
    fn handle_all(&mut self, now_ms: u64, events: impl IntoIterator<Item = Event>) -> Vec<Action>
    where
        Self: Sized,
    {
        for event in events {
            self.apply(now_ms, event);
        }
        self.take_actions()
    }
}

/// Runs a [`Machine`] as an SDK [`Connection`]: every callback becomes an [`Event`] stamped
/// with the host's clock ([`crate::now_ms`]), and every resulting [`Action`] one host call,
/// in order. Batched callbacks (`on_deliveries`, `on_publish_results`) are fed with
/// [`Machine::handle_all`], so their answers leave together.
///
/// The machine is boxed: the SDK keeps connections in a hash table, whose spare slots would
/// otherwise each be a whole machine.
///
/// ```no_run
/// # use magnetar_sdk::machine::{Action, Driver, Event, Machine};
/// # struct Idle;
/// # impl Machine for Idle {
/// #     fn apply(&mut self, _: u64, _: Event) {}
/// #     fn take_actions(&mut self) -> Vec<Action> { Vec::new() }
/// # }
/// let driver = Driver::new(magnetar_sdk::Conn::from_raw(1), Idle);
/// let _machine: &Idle = driver.machine();
/// ```
pub struct Driver<M> {
    machine: Box<M>,
}

impl<M: Machine> Driver<M> {
    /// Drives `machine` on `conn`, first carrying out the actions it queued when it was
    /// built (e.g. a handshake timer).
    pub fn new(conn: Conn, mut machine: M) -> Self {
        let actions = machine.take_actions();
        let mut driver = Driver {
            machine: Box::new(machine),
        };
        driver.execute(conn, actions);
        driver
    }

    /// The machine.
    pub fn machine(&self) -> &M {
        &self.machine
    }

    fn feed(&mut self, conn: Conn, event: Event) {
        let actions = self.machine.handle(crate::now_ms(), event);
        self.execute(conn, actions);
    }

    fn feed_all(&mut self, conn: Conn, events: impl Iterator<Item = Event>) {
        let actions = self.machine.handle_all(crate::now_ms(), events);
        self.execute(conn, actions);
    }

    /// Carries out actions in order; the answers of calls that answer at once are fed to
    /// the machine once its actions are out, and so are the actions they cause.
    fn execute(&mut self, conn: Conn, actions: Vec<Action>) {
        let answers = execute(conn, actions);
        if !answers.is_empty() {
            let actions = self.machine.handle_all(crate::now_ms(), answers);
            self.execute(conn, actions);
        }
    }
}

/// Carries out actions in order; the answers of calls that answer at once.
fn execute(conn: Conn, actions: Vec<Action>) -> Vec<Event> {
    actions
        .into_iter()
        .filter_map(|action| action.call(conn))
        .collect()
}

impl<M: Machine> Connection for Driver<M> {
    fn on_data(&mut self, conn: Conn, data: Vec<u8>) {
        self.feed(conn, Event::Data(data));
    }

    fn on_closed(&mut self, _conn: Conn) {
        // No host call is valid now: whatever the machine answers is dropped.
        let _ = self.machine.handle(crate::now_ms(), Event::Closed);
    }

    fn on_auth_result(&mut self, conn: Conn, token: u64, result: Result<Principal, OpError>) {
        self.feed(conn, Event::AuthResult { token, result });
    }

    fn on_publish_result(&mut self, conn: Conn, token: u64, result: Result<(), OpError>) {
        self.feed(conn, Event::PublishResult { token, result });
    }

    fn on_subscribe_result(&mut self, conn: Conn, token: u64, result: Result<SubId, OpError>) {
        self.feed(conn, Event::SubscribeResult { token, result });
    }

    fn on_delivery(&mut self, conn: Conn, delivery: Delivery) {
        self.feed(conn, Event::Delivery(delivery));
    }

    fn on_deliveries(&mut self, conn: Conn, deliveries: Vec<Delivery>) {
        self.feed_all(conn, deliveries.into_iter().map(Event::Delivery));
    }

    fn on_publish_results(&mut self, conn: Conn, results: Vec<PublishResult>) {
        let events = results.into_iter().map(|r| Event::PublishResult {
            token: r.token,
            result: r.outcome,
        });
        self.feed_all(conn, events);
    }

    fn on_timer(&mut self, conn: Conn, token: u64) {
        self.feed(conn, Event::Timer { token });
    }

    fn on_kv_result(&mut self, conn: Conn, token: u64, result: Result<Option<Vec<u8>>, OpError>) {
        self.feed(conn, Event::KvResult { token, result });
    }

    fn on_kv_scan_result(&mut self, conn: Conn, token: u64, result: Result<Vec<KvEntry>, OpError>) {
        self.feed(conn, Event::KvScanResult { token, result });
    }

    fn on_claim_result(&mut self, conn: Conn, token: u64, result: Result<(), OpError>) {
        self.feed(conn, Event::ClaimResult { token, result });
    }

    fn on_claim_lost(&mut self, conn: Conn, key: String) {
        self.feed(conn, Event::ClaimLost { key });
    }

    fn on_sasl_result(&mut self, conn: Conn, token: u64, result: Result<SaslOutcome, OpError>) {
        self.feed(conn, Event::SaslResult { token, result });
    }

    fn on_receipts(&mut self, conn: Conn, receipts: Vec<Receipt>) {
        let events = receipts.into_iter().map(|r| Event::Receipt {
            token: r.token,
            result: r.outcome,
        });
        self.feed_all(conn, events);
    }

    fn on_messages(&mut self, conn: Conn, messages: Vec<Message>) {
        self.feed_all(conn, messages.into_iter().map(Event::Message));
    }

    fn on_position(&mut self, conn: Conn, token: u64, result: Result<Option<Vec<u8>>, OpError>) {
        self.feed(conn, Event::Position { token, result });
    }

    fn on_auth_busy(&mut self, conn: Conn, token: u64) {
        self.feed(conn, Event::AuthBusy { token });
    }

    fn on_appended(&mut self, conn: Conn, results: Vec<AppendResult>) {
        let events = results.into_iter().map(|r| Event::Appended {
            token: r.token,
            result: r.outcome,
        });
        self.feed_all(conn, events);
    }

    fn on_entries(&mut self, conn: Conn, entries: Vec<Entry>) {
        self.feed_all(conn, entries.into_iter().map(Event::Entry));
    }

    fn on_bounds(&mut self, conn: Conn, token: u64, result: Result<Bounds, OpError>) {
        self.feed(conn, Event::Bounds { token, result });
    }

    fn on_topics_result(
        &mut self,
        conn: Conn,
        token: u64,
        result: Result<Vec<TopicInfo>, OpError>,
    ) {
        self.feed(conn, Event::TopicsResult { token, result });
    }

    fn on_home_post(&mut self, home: Conn, post: HomePost) {
        self.feed(home, Event::HomePost(post));
    }

    fn on_home_reply(&mut self, conn: Conn, token: u64, result: Result<Vec<u8>, OpError>) {
        self.feed(conn, Event::HomeReply { token, result });
    }
}
