//! The Magnetar plugin SDK.
//!
//! A Magnetar plugin is a sans-IO protocol state machine compiled to a WebAssembly component
//! (`wasm32-wasip2`). The gateway owns the sockets, TLS, authentication, keys and the Pulsar
//! backend; a plugin turns the bytes of one protocol into host calls (`send`, `publish`,
//! `subscribe`, ...) and reacts to events (`on_data`, `on_delivery`, ...). The ABI itself is
//! the WIT package `magnetar:plugin@0.2.0` in `sdk/wit/` ([`ABI_VERSION`]); this crate hides
//! the generated glue behind two traits, in the manner of proxy-wasm's root and stream contexts:
//!
//! - [`Plugin`]: one value per plugin instance, built from the plugin's config; it opens a
//!   [`Connection`] for each new client connection.
//! - [`Connection`]: the per-connection state machine. Every callback has a default that
//!   ignores the event, so a plugin overrides only what it needs.
//!
//! Long operations complete later through an event carrying the token the plugin chose, so a
//! connection can have many in flight. Host errors reach the plugin as [`OpError`] values,
//! never as traps.
//!
//! # The plugin kit
//!
//! A protocol plugin is best written as a sans-IO [`Machine`]: a value fed [`Event`]s with
//! the current time that answers with [`Action`]s, run against the host by a [`Driver`]
//! (then the plugin's adapter is a [`Plugin`] impl that builds the machine) and natively, in
//! `cargo test`, by the simulated host of [`testing`]. The parts every protocol needs come
//! with it: [`ops`] (operation tokens), [`input`] (a framed, bounded input buffer that steers
//! the host's reading), [`outbox`] (coalesced sends, gathered acks).
//!
//! ```no_run
//! use magnetar_sdk::{Conn, ConnInfo, Connection, Plugin};
//!
//! /// Echoes every byte back to its sender.
//! struct Echo;
//! struct EchoConn;
//!
//! impl Plugin for Echo {
//!     type Connection = EchoConn;
//!     fn new(_config: &str) -> Result<Self, String> {
//!         Ok(Echo)
//!     }
//!     fn open(&mut self, _conn: Conn, _info: ConnInfo) -> EchoConn {
//!         EchoConn
//!     }
//! }
//!
//! impl Connection for EchoConn {
//!     fn on_data(&mut self, conn: Conn, data: Vec<u8>) {
//!         conn.send(&data);
//!     }
//! }
//!
//! magnetar_sdk::export_plugin!(Echo);
//! ```
// `deny`, not `forbid`: the generated bindings need `unsafe` for the canonical ABI; nothing else may.
#![deny(unsafe_code)]

/// A plugin's config text: `key = integer` settings.
pub mod config;
mod dispatch;
/// Framed input: a byte stream cut into frames, bounded, with backpressure.
pub mod input;
/// The machine contract: events in with the time, actions out; the [`Driver`].
pub mod machine;
/// Operation tokens: allocate, look up, complete.
pub mod ops;
/// Where a machine queues its actions: coalesced sends, gathered acks.
pub mod outbox;
/// A simulated host to run a machine natively in `cargo test`.
pub mod testing;
/// The message envelope of the web port: HTTP upgrade request and response, WebSocket
/// messages, as frames over a plugin connection's byte stream.
pub mod web;

pub use machine::{Action, Driver, Event, Machine};

/// Bindings generated from `sdk/wit/plugin.wit`. Plugin authors normally need none of it.
#[doc(hidden)]
#[allow(unsafe_code, missing_docs, clippy::all)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "wit",
        world: "plugin",
        pub_export_macro: true,
        export_macro_name: "__export_plugin_world",
        default_bindings_module: "magnetar_sdk::bindings",
        additional_derives: [PartialEq, Eq],
    });
}

pub use bindings::exports::magnetar::plugin::events::{Message, Receipt};
pub use bindings::exports::magnetar::plugin::events2::{
    AppendResult, Appended, Bounds, Entry, EntryAt, EntryMessage, TopicInfo,
};
pub use bindings::magnetar::plugin::caps::{Cap, Overflow, Refusal};
pub use bindings::magnetar::plugin::homes::{Endpoint, Holder};
pub use bindings::magnetar::plugin::indexed::{DedupSpec, ReaderSpec, RecordOut};
pub use bindings::magnetar::plugin::messaging::{
    ConsumerSpec, MessageIdAt, MessageOut, Position, TopicRef,
};
pub use bindings::magnetar::plugin::routing::{Filter, HeadersFilter, RouteSpec};
use bindings::magnetar::plugin::{
    auth, caps, conn, durable, flow, homes, indexed, kv, messaging, pubsub, queues, quota, routing,
    session, timers, topics,
};

/// The count a [`Conn::queue_backlog`] completion carries: `None` where the backend could
/// not say (no value, or not the 8 bytes of a big-endian u64).
pub fn decode_backlog(value: Option<&[u8]>) -> Option<u64> {
    value
        .and_then(|v| <[u8; 8]>::try_from(v).ok())
        .map(u64::from_be_bytes)
}

/// The version of the plugin ABI (the WIT package `magnetar:plugin`) this SDK builds
/// plugins against; a gateway refuses a plugin whose ABI it does not support.
pub const ABI_VERSION: &str = "0.2.7";
pub use bindings::magnetar::plugin::types::{
    ConnInfo, Credentials, Delivery, ErrorKind, InitialPosition, KvEntry, KvWrite, LogLevel,
    OpError, OutboundMessage, Principal, Property, PublishResult, SaslOutcome, SaslSuccess,
    SubMode, SubscriptionSpec, UserPassword, Will,
};

#[doc(hidden)]
pub mod __private {
    pub use crate::bindings::exports::magnetar::plugin::events::Guest as EventsGuest;
    pub use crate::bindings::exports::magnetar::plugin::events2::Guest as Events2Guest;
    pub use crate::bindings::exports::magnetar::plugin::events3::Guest as Events3Guest;
    pub use crate::bindings::exports::magnetar::plugin::handler::Guest;
    pub use crate::dispatch::Dispatcher;
}

/// A subscription handle, from [`Connection::on_subscribe_result`].
pub type SubId = u64;

/// One plugin instance: built once from the plugin's config, it opens a [`Connection`] for
/// every client connection the host hands it. An instance serves many connections.
pub trait Plugin: Sized + 'static {
    /// The per-connection state machine.
    type Connection: Connection;

    /// Builds the instance from the `[plugins.<name>]` config of the gateway (TOML text,
    /// empty when there is none). An error refuses to load the plugin.
    fn new(config: &str) -> Result<Self, String>;

    /// A client connected. Nothing has been read yet.
    fn open(&mut self, conn: Conn, info: ConnInfo) -> Self::Connection;

    /// The first post ([`Conn::post_home`]) reached the home of (`domain`, `shard`) on this
    /// instance: the state machine that serves the home, on its virtual connection `home`
    /// (timers and [`Conn::reply_home`] work on it; it has no socket). `None` (the default):
    /// this plugin keeps no homes, and every post to it is answered with an empty payload.
    fn open_home(&mut self, home: Conn, domain: &str, shard: u32) -> Option<Self::Connection> {
        let _ = (home, domain, shard);
        None
    }
}

/// The state machine of one client connection. Defaults ignore the event.
#[allow(unused_variables)]
pub trait Connection: 'static {
    /// Bytes arrived from the client. They are a stream: a frame may be split across calls.
    fn on_data(&mut self, conn: Conn, data: Vec<u8>);

    /// The socket is gone. The connection is dropped after this returns.
    fn on_closed(&mut self, conn: Conn) {}

    /// Outcome of [`Conn::authenticate`].
    fn on_auth_result(&mut self, conn: Conn, token: u64, result: Result<Principal, OpError>) {}

    /// Outcome of [`Conn::publish`]: `Ok` once the backend stored the message.
    fn on_publish_result(&mut self, conn: Conn, token: u64, result: Result<(), OpError>) {}

    /// Outcome of [`Conn::subscribe`].
    fn on_subscribe_result(&mut self, conn: Conn, token: u64, result: Result<SubId, OpError>) {}

    /// A message on one of this connection's subscriptions. Ack it with [`Conn::ack`].
    fn on_delivery(&mut self, conn: Conn, delivery: Delivery) {}

    /// Several messages that arrived together, in order. The default hands each to
    /// [`Connection::on_delivery`]; a plugin that answers them together (e.g. one
    /// [`Conn::send`] for all) overrides it.
    fn on_deliveries(&mut self, conn: Conn, deliveries: Vec<Delivery>) {
        for delivery in deliveries {
            self.on_delivery(conn, delivery);
        }
    }

    /// Several outcomes of [`Conn::publish`] that arrived together, in order. The default
    /// hands each to [`Connection::on_publish_result`].
    fn on_publish_results(&mut self, conn: Conn, results: Vec<PublishResult>) {
        for r in results {
            self.on_publish_result(conn, r.token, r.outcome);
        }
    }

    /// A timer set with [`Conn::set_timer`] fired.
    fn on_timer(&mut self, conn: Conn, token: u64) {}

    /// Outcome of [`Conn::kv_get`] (the value, if any) or [`Conn::kv_put`] (`Ok(None)`).
    fn on_kv_result(&mut self, conn: Conn, token: u64, result: Result<Option<Vec<u8>>, OpError>) {}

    /// Outcome of [`Conn::kv_scan`]: entries in key order.
    fn on_kv_scan_result(&mut self, conn: Conn, token: u64, result: Result<Vec<KvEntry>, OpError>) {
    }

    /// Outcome of [`Conn::claim`]: `Ok` once the key is this connection's.
    fn on_claim_result(&mut self, conn: Conn, token: u64, result: Result<(), OpError>) {}

    /// Another connection claimed `key`, which this connection held (session takeover). Say
    /// goodbye in the protocol and [`Conn::close`]; the host closes the connection 5 s later
    /// anyway.
    fn on_claim_lost(&mut self, conn: Conn, key: String) {}

    /// Outcome of [`Conn::authenticate_sasl`]: a challenge for the client, or success.
    fn on_sasl_result(&mut self, conn: Conn, token: u64, result: Result<SaslOutcome, OpError>) {}

    /// Outcomes of [`Conn::send_message`], in order: the stored messages' ids.
    fn on_receipts(&mut self, conn: Conn, receipts: Vec<Receipt>) {}

    /// Messages of the consumers opened with [`Conn::open_consumer`], in order per consumer.
    fn on_messages(&mut self, conn: Conn, messages: Vec<Message>) {}

    /// Outcome of [`Conn::seek`] (`None`) or [`Conn::last_message_id`].
    fn on_position(&mut self, conn: Conn, token: u64, result: Result<Option<Vec<u8>>, OpError>) {}

    /// The credentials of [`Conn::authenticate`] could not be checked now (a login storm):
    /// answer with the protocol's "server busy" and close. Sent instead of an
    /// [`Connection::on_auth_result`] error.
    fn on_auth_busy(&mut self, conn: Conn, token: u64) {}

    /// Outcomes of [`Conn::append`], in the order the entries were stored.
    fn on_appended(&mut self, conn: Conn, results: Vec<AppendResult>) {}

    /// Entries of the readers opened with [`Conn::open_reader`], in order per reader.
    fn on_entries(&mut self, conn: Conn, entries: Vec<Entry>) {}

    /// Outcome of [`Conn::bounds`].
    fn on_bounds(&mut self, conn: Conn, token: u64, result: Result<Bounds, OpError>) {}

    /// Outcome of [`Conn::create_topic`], [`Conn::delete_topic`], [`Conn::set_partitions`]
    /// or [`Conn::describe_topics`].
    fn on_topics_result(
        &mut self,
        conn: Conn,
        token: u64,
        result: Result<Vec<TopicInfo>, OpError>,
    ) {
    }

    /// A post for this home (a connection opened by [`Plugin::open_home`]): answer it with
    /// [`Conn::reply_home`] and `post_id`, now or later. `namespace` is the poster's
    /// (`tenant/namespace`, from its principal).
    fn on_home_post(&mut self, home: Conn, post: HomePost) {}

    /// Outcome of [`Conn::post_home`]: the home's answer.
    fn on_home_reply(&mut self, conn: Conn, token: u64, result: Result<Vec<u8>, OpError>) {}
}

/// A request posted to a home ([`Conn::post_home`]), as the home receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HomePost {
    /// The home's domain and shard (as posted).
    pub domain: String,
    pub shard: u32,
    /// Answer with [`Conn::reply_home`] and this id.
    pub post_id: u64,
    /// The poster's `tenant/namespace`, set by the host from its principal.
    pub namespace: String,
    pub payload: Vec<u8>,
}

/// A handle on one client connection: every host call that concerns a connection goes
/// through it. It is a plain id, cheap to copy; calls on a closed connection are ignored by
/// the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Conn(u64);

impl Conn {
    /// Wraps a raw connection id (as the host numbers them).
    pub fn from_raw(id: u64) -> Self {
        Conn(id)
    }

    /// The raw connection id.
    pub fn id(self) -> u64 {
        self.0
    }

    /// Queues bytes for the client. Order is kept.
    pub fn send(self, data: &[u8]) {
        conn::send(self.0, data);
    }

    /// Flushes queued bytes, then closes the connection; `reason` goes to the gateway log.
    pub fn close(self, reason: &str) {
        conn::close(self.0, reason);
    }

    /// Checks credentials; completes with [`Connection::on_auth_result`]. Until it succeeds,
    /// every backend call of this connection fails with [`ErrorKind::NotAuthorized`].
    pub fn authenticate(self, token: u64, creds: &Credentials) {
        auth::authenticate(self.0, token, creds);
    }

    /// One step of a SASL exchange the host runs (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512);
    /// completes with [`Connection::on_sasl_result`].
    pub fn authenticate_sasl(self, token: u64, mechanism: &str, response: &[u8]) {
        auth::authenticate_sasl(self.0, token, mechanism, response);
    }

    /// Stores a message in the connection's namespace; completes with
    /// [`Connection::on_publish_result`] once the backend has it durably.
    pub fn publish(self, token: u64, msg: &OutboundMessage) {
        pubsub::publish(self.0, token, msg);
    }

    /// Opens a subscription; completes with [`Connection::on_subscribe_result`], then
    /// deliveries arrive through [`Connection::on_delivery`].
    pub fn subscribe(self, token: u64, spec: &SubscriptionSpec) {
        pubsub::subscribe(self.0, token, spec);
    }

    /// Opens a route: a subscription to `spec.source` whose messages the host picks by
    /// filter (see the WIT's `routing`); completes with [`Connection::on_subscribe_result`],
    /// then deliveries arrive as for [`Conn::subscribe`].
    pub fn open_route(self, token: u64, spec: &RouteSpec) {
        routing::open_route(self.0, token, spec);
    }

    /// Adds a filter to an open route; messages read from now on are matched against it.
    pub fn bind(self, route: SubId, filter: &Filter) -> Result<(), OpError> {
        routing::bind(self.0, route, filter)
    }

    /// Removes a filter from an open route.
    pub fn unbind(self, route: SubId, filter: &Filter) {
        routing::unbind(self.0, route, filter);
    }

    /// Closes a subscription; with `delete`, a durable one is removed with its backlog.
    pub fn unsubscribe(self, sub: SubId, delete: bool) {
        pubsub::unsubscribe(self.0, sub, delete);
    }

    /// Acknowledges a delivery.
    pub fn ack(self, sub: SubId, delivery_id: u64) {
        pubsub::ack(self.0, sub, delivery_id);
    }

    /// Acknowledges several deliveries of one subscription in one host call.
    pub fn ack_many(self, sub: SubId, delivery_ids: &[u64]) {
        pubsub::ack_many(self.0, sub, delivery_ids);
    }

    /// Asks the host to stop (`false`) or resume (`true`) reading the connection's socket:
    /// backpressure from the plugin's own protocol window to the client's TCP connection.
    pub fn set_reading(self, reading: bool) {
        conn::set_reading(self.0, reading);
    }

    /// Fires [`Connection::on_timer`] with `token` after `delay_ms`.
    pub fn set_timer(self, token: u64, delay_ms: u64) {
        timers::set_timer(self.0, token, delay_ms);
    }

    /// Reads a key of the namespace's kv; completes with [`Connection::on_kv_result`].
    pub fn kv_get(self, token: u64, key: &str) {
        kv::kv_get(self.0, token, key);
    }

    /// Writes (`Some`) or deletes (`None`) a key; completes with [`Connection::on_kv_result`].
    pub fn kv_put(self, token: u64, key: &str, value: Option<&[u8]>) {
        kv::kv_put(self.0, token, key, value);
    }

    /// Lists up to `limit` (at most 1000) entries whose keys start with `prefix`, in key
    /// order, after `start_after`; completes with [`Connection::on_kv_scan_result`]. A page
    /// shorter than `limit` is the last one.
    pub fn kv_scan(self, token: u64, prefix: &str, start_after: Option<&str>, limit: u32) {
        kv::kv_scan(self.0, token, prefix, start_after, limit);
    }

    /// Registers (`Some`) or clears (`None`) the connection's last will: the host publishes it
    /// when the connection ends unless it was cleared first (see the WIT docs of `set-will`).
    pub fn set_will(self, will: Option<&Will>) {
        session::set_will(self.0, will);
    }

    /// Claims `key` (e.g. a client identifier) in the plugin's namespace; an earlier holder
    /// gets [`Connection::on_claim_lost`]. Completes with [`Connection::on_claim_result`]
    /// once the earlier holder is gone.
    pub fn claim(self, token: u64, key: &str) {
        session::claim(self.0, token, key);
    }

    /// Publishes with Pulsar's message model; completes with [`Connection::on_receipts`].
    pub fn send_message(self, token: u64, msg: &MessageOut) {
        messaging::send_message(self.0, token, msg);
    }

    /// Opens a consumer or reader; completes with [`Connection::on_subscribe_result`], then
    /// [`Connection::on_messages`].
    pub fn open_consumer(self, token: u64, spec: &ConsumerSpec) {
        messaging::open_consumer(self.0, token, spec);
    }

    /// Negative ack: the message comes back after the consumer's nack delay.
    pub fn nack(self, sub: SubId, delivery_id: u64) {
        messaging::nack(self.0, sub, delivery_id);
    }

    /// The consumer takes no more messages but stays open for what it delivered, which is
    /// still acked or nacked; closed with [`Conn::unsubscribe`] as usual. ABI 0.2.6.
    pub fn drain(self, sub: SubId) {
        flow::drain(self.0, sub);
    }

    /// Moves a consumer; completes with [`Connection::on_position`].
    pub fn seek(self, token: u64, sub: SubId, position: &Position) {
        messaging::seek(self.0, token, sub, position);
    }

    /// The id of the consumer's topic's last message; completes with
    /// [`Connection::on_position`].
    pub fn last_message_id(self, token: u64, sub: SubId) {
        messaging::last_message_id(self.0, token, sub);
    }

    /// Stores `records` as one entry of an indexed topic (consecutive indexes); completes
    /// with [`Connection::on_appended`] once stored, with the first record's index.
    pub fn append(self, token: u64, topic: &str, records: &[RecordOut], dedup: Option<&DedupSpec>) {
        indexed::append(self.0, token, topic, records, dedup);
    }

    /// Opens a reader of whole entries; completes with [`Connection::on_subscribe_result`],
    /// then [`Connection::on_entries`]. Ack, seek and unsubscribe it as a consumer.
    pub fn open_reader(self, token: u64, spec: &ReaderSpec) {
        indexed::open_reader(self.0, token, spec);
    }

    /// The id of the entry holding message `index`, if the host finds it cheaply;
    /// completes with [`Connection::on_position`].
    pub fn locate(self, token: u64, topic: &str, index: u64) {
        indexed::locate(self.0, token, topic, index);
    }

    /// The first and last stored entries of a topic; completes with
    /// [`Connection::on_bounds`].
    pub fn bounds(self, token: u64, topic: &str) {
        indexed::bounds(self.0, token, topic);
    }

    /// Creates a topic with `partitions` partitions (0: non-partitioned); completes with
    /// [`Connection::on_topics_result`].
    pub fn create_topic(self, token: u64, topic: &str, partitions: u32) {
        topics::create(self.0, token, topic, partitions);
    }

    /// Deletes a topic with its partitions; completes with [`Connection::on_topics_result`].
    pub fn delete_topic(self, token: u64, topic: &str) {
        topics::delete(self.0, token, topic);
    }

    /// Raises a topic's partition count; completes with [`Connection::on_topics_result`].
    pub fn set_partitions(self, token: u64, topic: &str, partitions: u32) {
        topics::set_partitions(self.0, token, topic, partitions);
    }

    /// Sends `payload` to the home of (`domain`, `shard`) (one fixed instance of this plugin
    /// in the gateway); completes with [`Connection::on_home_reply`] carrying its answer.
    pub fn post_home(self, token: u64, domain: &str, shard: u32, payload: &[u8]) {
        homes::post(self.0, token, domain, shard, payload);
    }

    /// Answers a post on this home's connection ([`Connection::on_home_post`]).
    pub fn reply_home(self, post_id: u64, payload: &[u8]) {
        homes::reply(self.0, post_id, payload);
    }

    /// Who holds (`domain`, `shard`) of this connection's namespace across the gateways of
    /// the backend (`local`: this gateway); `None` before authentication.
    pub fn home_owner(self, domain: &str, shard: u32) -> Option<Holder> {
        homes::owner(self.0, domain, shard)
    }

    /// Every gateway known to hold a shard of `domain` in this connection's namespace, and
    /// this one.
    pub fn home_holders(self, domain: &str) -> Vec<Holder> {
        homes::holders(self.0, domain)
    }

    /// The longest time, in milliseconds, that one of this connection's publishes or
    /// appends issued since the previous call is held back by the publish-rate quotas of its
    /// tenant and user (0: none was); each call starts a new count. ABI 0.2.5.
    pub fn held_back_ms(self) -> u32 {
        quota::held_back_ms(self.0)
    }

    /// [`Conn::open_route`] for a durable route whose queue keeps at most `cap` (`None`: no
    /// cap); completes with [`Connection::on_subscribe_result`].
    pub fn open_capped_route(self, token: u64, spec: &RouteSpec, cap: Option<Cap>) {
        caps::open_capped_route(self.0, token, spec, cap);
    }

    /// Stores a durable route (its filters and its queue's `cap`; the source's feeder copies
    /// into the queue from then on) without reading its queue: no reader takes the queue's
    /// subscription or its messages. Completes with [`Connection::on_kv_result`] (`None`).
    /// ABI 0.2.6.
    pub fn store_route(self, token: u64, spec: &RouteSpec, cap: Option<Cap>) {
        durable::store_route(self.0, token, spec, cap);
    }

    /// How many messages a durable route's queue holds (not acknowledged yet, delivered
    /// ones too), read without taking any. Completes with [`Connection::on_kv_result`]:
    /// [`decode_backlog`] reads it. ABI 0.2.6.
    pub fn queue_backlog(self, token: u64, queue: &str) {
        durable::queue_backlog(self.0, token, queue);
    }

    /// How many consumers whose name starts with `prefix` read a durable route's queue, on
    /// every gateway. Completes with [`Connection::on_kv_result`]: [`decode_backlog`] reads
    /// it (the same 8 bytes). ABI 0.2.7.
    pub fn consumer_count(self, token: u64, queue: &str, prefix: &str) {
        queues::consumer_count(self.0, token, queue, prefix);
    }

    /// [`Conn::publish`], judged first by the caps of the queues the message reaches: the
    /// queues that refused it (it is stored all the same, and completes as a publish does).
    pub fn publish_capped(self, token: u64, msg: &OutboundMessage) -> Vec<Refusal> {
        caps::publish_capped(self.0, token, msg)
    }

    /// The namespace's topics (all, or those of `names`) with their partition counts;
    /// completes with [`Connection::on_topics_result`].
    pub fn describe_topics(self, token: u64, names: &[String]) {
        topics::describe(self.0, token, names);
    }
}

/// Writes a line to the gateway's log, tagged with the plugin's name.
pub fn log(level: LogLevel, message: &str) {
    bindings::magnetar::plugin::log::log(level, message);
}

/// Milliseconds since the Unix epoch, from the host's clock.
pub fn now_ms() -> u64 {
    timers::now_ms()
}

/// The SASL mechanisms [`Conn::authenticate_sasl`] offers, best first.
pub fn sasl_mechanisms() -> Vec<String> {
    auth::sasl_mechanisms()
}

/// Exports a [`Plugin`] type as the component's `magnetar:plugin/handler`.
///
/// Use it once, at the top level of the plugin crate: `magnetar_sdk::export_plugin!(MyPlugin);`
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        // Only a Wasm build exports the component interface; a native build of a plugin
        // crate (for its unit tests) links without it.
        #[cfg(target_arch = "wasm32")]
        #[doc(hidden)]
        struct __MagnetarGuest;

        #[cfg(target_arch = "wasm32")]
        ::std::thread_local! {
            static __MAGNETAR_DISPATCHER: ::std::cell::RefCell<$crate::__private::Dispatcher<$plugin>> =
                ::std::cell::RefCell::new($crate::__private::Dispatcher::new());
        }

        #[cfg(target_arch = "wasm32")]
        impl $crate::__private::Guest for __MagnetarGuest {
            fn init(config: ::std::string::String) -> ::std::result::Result<(), ::std::string::String> {
                __MAGNETAR_DISPATCHER.with_borrow_mut(|d| d.init(&config))
            }
            fn on_open(conn: u64, info: $crate::ConnInfo) {
                __MAGNETAR_DISPATCHER.with_borrow_mut(|d| d.on_open(conn, info))
            }
            fn on_data(conn: u64, data: ::std::vec::Vec<u8>) {
                __MAGNETAR_DISPATCHER.with_borrow_mut(|d| d.with_conn(conn, |c, h| $crate::Connection::on_data(c, h, data)))
            }
            fn on_closed(conn: u64) {
                __MAGNETAR_DISPATCHER.with_borrow_mut(|d| d.on_closed(conn))
            }
            fn on_auth_result(conn: u64, token: u64, result: ::std::result::Result<$crate::Principal, $crate::OpError>) {
                __MAGNETAR_DISPATCHER.with_borrow_mut(|d| d.with_conn(conn, |c, h| $crate::Connection::on_auth_result(c, h, token, result)))
            }
            fn on_publish_result(conn: u64, token: u64, result: ::std::result::Result<(), $crate::OpError>) {
                __MAGNETAR_DISPATCHER.with_borrow_mut(|d| d.with_conn(conn, |c, h| $crate::Connection::on_publish_result(c, h, token, result)))
            }
            fn on_subscribe_result(conn: u64, token: u64, result: ::std::result::Result<u64, $crate::OpError>) {
                __MAGNETAR_DISPATCHER.with_borrow_mut(|d| d.with_conn(conn, |c, h| $crate::Connection::on_subscribe_result(c, h, token, result)))
            }
            fn on_delivery(conn: u64, delivery: $crate::Delivery) {
                __MAGNETAR_DISPATCHER.with_borrow_mut(|d| d.with_conn(conn, |c, h| $crate::Connection::on_delivery(c, h, delivery)))
            }
            fn on_deliveries(conn: u64, deliveries: ::std::vec::Vec<$crate::Delivery>) {
                __MAGNETAR_DISPATCHER.with_borrow_mut(|d| d.with_conn(conn, |c, h| $crate::Connection::on_deliveries(c, h, deliveries)))
            }
            fn on_publish_results(conn: u64, results: ::std::vec::Vec<$crate::PublishResult>) {
                __MAGNETAR_DISPATCHER.with_borrow_mut(|d| d.with_conn(conn, |c, h| $crate::Connection::on_publish_results(c, h, results)))
            }
            fn on_timer(conn: u64, token: u64) {
                __MAGNETAR_DISPATCHER.with_borrow_mut(|d| d.with_conn(conn, |c, h| $crate::Connection::on_timer(c, h, token)))
            }
            fn on_kv_result(conn: u64, token: u64, result: ::std::result::Result<::std::option::Option<::std::vec::Vec<u8>>, $crate::OpError>) {
                __MAGNETAR_DISPATCHER.with_borrow_mut(|d| d.with_conn(conn, |c, h| $crate::Connection::on_kv_result(c, h, token, result)))
            }
            fn on_kv_scan_result(conn: u64, token: u64, result: ::std::result::Result<::std::vec::Vec<$crate::KvEntry>, $crate::OpError>) {
                __MAGNETAR_DISPATCHER.with_borrow_mut(|d| d.with_conn(conn, |c, h| $crate::Connection::on_kv_scan_result(c, h, token, result)))
            }
            fn on_claim_result(conn: u64, token: u64, result: ::std::result::Result<(), $crate::OpError>) {
                __MAGNETAR_DISPATCHER.with_borrow_mut(|d| d.with_conn(conn, |c, h| $crate::Connection::on_claim_result(c, h, token, result)))
            }
            fn on_claim_lost(conn: u64, key: ::std::string::String) {
                __MAGNETAR_DISPATCHER.with_borrow_mut(|d| d.with_conn(conn, |c, h| $crate::Connection::on_claim_lost(c, h, key)))
            }
            fn on_sasl_result(conn: u64, token: u64, result: ::std::result::Result<$crate::SaslOutcome, $crate::OpError>) {
                __MAGNETAR_DISPATCHER.with_borrow_mut(|d| d.with_conn(conn, |c, h| $crate::Connection::on_sasl_result(c, h, token, result)))
            }
        }

        #[cfg(target_arch = "wasm32")]
        impl $crate::__private::EventsGuest for __MagnetarGuest {
            fn on_receipts(conn: u64, receipts: ::std::vec::Vec<$crate::Receipt>) {
                __MAGNETAR_DISPATCHER.with_borrow_mut(|d| d.with_conn(conn, |c, h| $crate::Connection::on_receipts(c, h, receipts)))
            }
            fn on_messages(conn: u64, messages: ::std::vec::Vec<$crate::Message>) {
                __MAGNETAR_DISPATCHER.with_borrow_mut(|d| d.with_conn(conn, |c, h| $crate::Connection::on_messages(c, h, messages)))
            }
            fn on_position(conn: u64, token: u64, result: ::std::result::Result<::std::option::Option<::std::vec::Vec<u8>>, $crate::OpError>) {
                __MAGNETAR_DISPATCHER.with_borrow_mut(|d| d.with_conn(conn, |c, h| $crate::Connection::on_position(c, h, token, result)))
            }
            fn on_auth_busy(conn: u64, token: u64) {
                __MAGNETAR_DISPATCHER.with_borrow_mut(|d| d.with_conn(conn, |c, h| $crate::Connection::on_auth_busy(c, h, token)))
            }
        }

        #[cfg(target_arch = "wasm32")]
        impl $crate::__private::Events2Guest for __MagnetarGuest {
            fn on_appended(conn: u64, results: ::std::vec::Vec<$crate::AppendResult>) {
                __MAGNETAR_DISPATCHER.with_borrow_mut(|d| d.with_conn(conn, |c, h| $crate::Connection::on_appended(c, h, results)))
            }
            fn on_entries(conn: u64, entries: ::std::vec::Vec<$crate::Entry>) {
                __MAGNETAR_DISPATCHER.with_borrow_mut(|d| d.with_conn(conn, |c, h| $crate::Connection::on_entries(c, h, entries)))
            }
            fn on_bounds(conn: u64, token: u64, result: ::std::result::Result<$crate::Bounds, $crate::OpError>) {
                __MAGNETAR_DISPATCHER.with_borrow_mut(|d| d.with_conn(conn, |c, h| $crate::Connection::on_bounds(c, h, token, result)))
            }
            fn on_topics_result(conn: u64, token: u64, result: ::std::result::Result<::std::vec::Vec<$crate::TopicInfo>, $crate::OpError>) {
                __MAGNETAR_DISPATCHER.with_borrow_mut(|d| d.with_conn(conn, |c, h| $crate::Connection::on_topics_result(c, h, token, result)))
            }
        }

        #[cfg(target_arch = "wasm32")]
        impl $crate::__private::Events3Guest for __MagnetarGuest {
            fn on_home_post(home: u64, domain: ::std::string::String, shard: u32, post_id: u64, namespace: ::std::string::String, payload: ::std::vec::Vec<u8>) {
                __MAGNETAR_DISPATCHER.with_borrow_mut(|d| d.on_home_post(home, $crate::HomePost { domain, shard, post_id, namespace, payload }))
            }
            fn on_home_reply(conn: u64, token: u64, result: ::std::result::Result<::std::vec::Vec<u8>, $crate::OpError>) {
                __MAGNETAR_DISPATCHER.with_borrow_mut(|d| d.with_conn(conn, |c, h| $crate::Connection::on_home_reply(c, h, token, result)))
            }
        }

        #[cfg(target_arch = "wasm32")]
        $crate::bindings::__export_plugin_world!(__MagnetarGuest with_types_in $crate::bindings);
    };
}
