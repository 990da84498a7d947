//! A simulated host, in which a plugin's [`Machine`] runs natively under `cargo test`: no
//! gateway, no Wasm, no sockets, no clock but the test's.
//!
//! [`SimHost`] plays the gateway's part for one connection, after quinn-proto's test `Pair`:
//! it feeds the machine events stamped with a simulated time and carries out its actions
//! against an in-memory world:
//!
//! - **time**: [`SimHost::advance`] moves the clock and fires the timers that fall due, in
//!   order, each at its own time;
//! - **operations**: long host calls (authenticate, publish, subscribe, kv, claim) wait in
//!   [`SimHost::pending`] until the test completes them, one by one ([`SimHost::complete_next`],
//!   [`SimHost::fail`]) or all ([`SimHost::run`], which also hands out deliveries, until
//!   nothing moves);
//! - **backend**: published messages are stored ([`SimHost::published`]) and routed to every
//!   subscription on their topic; [`SimHost::produce`] publishes as another producer would.
//!   Publishes and kv writes a connection queued before it ended still run, as on the host.
//!   A subscription hands out at most its `max-unacked` deliveries before acks, keeps what
//!   was not acked, and a durable one outlives the connection ([`SimHost::reconnect`]);
//! - **indexed topics** (ABI 0.2.3): [`Action::Append`] stores its records as one entry whose
//!   messages take the next consecutive indexes of the topic (from 0), with de-duplication
//!   by producer name and sequence; readers ([`Action::OpenReader`]) hand out whole entries
//!   within their window, seek (by entry id or time: the first entry stored at or after it)
//!   and report the last entry id; [`Action::Locate`] and [`Action::Bounds`] answer from the
//!   log. A message stored by publish, send-message, [`SimHost::produce`] or a will is also
//!   a one-message entry of its topic, as on Pulsar (appended records are not seen by
//!   `pubsub` subscriptions). [`Action::CreateTopic`] and the other `topics` calls keep the
//!   namespace's topic list ([`SimHost::topics`]); appends do not need a created topic.
//! - **kv**: an ordered in-memory map with prefix scans, as the host's kv (kept across
//!   reconnects);
//! - **connection**: the bytes sent ([`SimHost::take_sent`]), the close reason, whether the
//!   host reads the socket, the will (published when the connection ends without clearing
//!   it), the claims held;
//! - **log**: every action carried out, for exact assertions ([`SimHost::take_actions`]).
//! - **caps** (ABI 0.2.5): [`Action::OpenCappedRoute`] opens the route as
//!   [`Action::OpenRoute`] does and keeps the cap given ([`SimHost::caps`]);
//!   [`Action::PublishCapped`] publishes as [`Action::Publish`] does, and is refused by the
//!   queues the test names ([`SimHost::refuse_publishes`]): the host's counting of ready
//!   messages is not simulated.
//! - **flow** (ABI 0.2.6): a consumer drained by [`Action::Drain`] is handed nothing more
//!   and still takes acks and nacks ([`SimHost::drained`]).
//! - **durable** (ABI 0.2.6): [`Action::StoreRoute`] keeps the route as one opened and
//!   closed at once would be (its queue's backlog kept; the filters of that queue's route
//!   changed if one is open) and its cap ([`SimHost::caps`]), and completes as a kv write;
//!   [`Action::QueueBacklog`] counts what the queue topic's durable subscriptions hold.
//! - **queues** (ABI 0.2.7): [`Action::ConsumerCount`] counts the open consumers of the
//!   queue topic whose `consumer-name` starts with the prefix.
//!
//! What it does not simulate: tenancy and authorization (every operation succeeds unless the
//! test fails it, authentication answers the configured principal), quotas, SASL (refused),
//! several connections at once, the will's delay.
//!
//! It is a plain module rather than a cargo feature: it needs nothing beyond `std`, and code
//! a plugin does not use is not in its component.
//!
//! ```
//! use magnetar_sdk::machine::{Action, Event, Machine};
//! use magnetar_sdk::outbox::Outbox;
//! use magnetar_sdk::testing::SimHost;
//! use magnetar_sdk::OutboundMessage;
//!
//! /// Publishes every chunk of bytes to topic `t`, and answers `ok` once it is stored.
//! #[derive(Default)]
//! struct Pub {
//!     out: Outbox,
//!     next: u64,
//! }
//!
//! impl Machine for Pub {
//!     fn apply(&mut self, _now_ms: u64, event: Event) {
//!         match event {
//!             Event::Data(payload) => {
//!                 self.next += 1;
//!                 let msg = OutboundMessage {
//!                     topic: "t".into(),
//!                     key: None,
//!                     payload,
//!                     properties: Vec::new(),
//!                 };
//!                 self.out.push(Action::Publish { token: self.next, msg });
//!             }
//!             Event::PublishResult { result: Ok(()), .. } => self.out.send(b"ok".to_vec()),
//!             _ => {}
//!         }
//!     }
//!     fn take_actions(&mut self) -> Vec<Action> {
//!         self.out.take()
//!     }
//! }
//!
//! let mut host = SimHost::new(1_000, Pub::default());
//! host.data(b"hello");
//! assert_eq!(host.pending().len(), 1, "the publish waits for the backend");
//! assert!(host.take_sent().is_empty());
//! host.run();
//! assert_eq!(host.take_sent(), b"ok");
//! assert_eq!(host.published()[0].payload, b"hello");
//! ```

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::machine::{Action, Event, Machine};
use crate::{
    Cap, ConsumerSpec, Delivery, EntryMessage, ErrorKind, Filter, InitialPosition, KvEntry,
    LogLevel, Message, OpError, OutboundMessage, Position, Principal, RecordOut, Refusal,
    RouteSpec, SubId, SubMode, SubscriptionSpec, Will,
};

mod indexed;

/// Most rounds of [`SimHost::run`]: a machine that keeps asking (an answer causing another
/// request forever) stops there instead of hanging the test.
pub const MAX_ROUNDS: usize = 10_000;

/// The most entries one kv scan returns, as the host caps it.
const SCAN_MAX: u32 = 1000;

/// A message stored in the simulated backend.
#[derive(Debug, Clone)]
struct Stored {
    msg: OutboundMessage,
    publish_time_ms: u64,
    /// Its place among every message stored: its id is [`message_id`] of it.
    seq: u64,
    event_time_ms: Option<u64>,
    /// Deliveries before this one (negative acks).
    redeliveries: u32,
}

/// The simulated host's message id of the `seq`-th message stored (from 0): its number,
/// 8 bytes big-endian. The real host's ids are serialized `MessageIdData`; plugins treat
/// both as opaque bytes.
pub fn message_id(seq: u64) -> Vec<u8> {
    seq.to_be_bytes().to_vec()
}

/// The number of a simulated message id, if it is one.
fn seq_of(id: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(id.try_into().ok()?))
}

/// A backend subscription of the simulated host.
#[derive(Debug)]
struct Sub {
    spec: SubscriptionSpec,
    /// Open by the current connection (a durable one stays while nobody is connected).
    attached: bool,
    /// Messages not handed out yet.
    backlog: VecDeque<Stored>,
    /// Handed out, not acked: delivery id → message (redelivered after a reconnect).
    unacked: BTreeMap<u64, Stored>,
    acked: Vec<u64>,
    /// A route's filters (`open-route`): only matching messages reach it.
    filters: Option<Vec<Filter>>,
    /// A route's `key-property`.
    key_property: Option<String>,
    /// A `messaging` consumer: its messages are `Event::Message`s.
    messages: bool,
    /// A `messaging` consumer's `consumer-name`.
    consumer_name: Option<String>,
    /// Drained ([`Action::Drain`]): hands out nothing more.
    drained: bool,
}

/// The gateway, simulated for one connection at a time: see the module docs.
pub struct SimHost<M> {
    machine: M,
    now_ms: u64,
    auth: Result<Principal, OpError>,
    pending: VecDeque<Action>,
    /// Timers not fired: (due time, order set, token).
    timers: Vec<(u64, u64, u64)>,
    timer_seq: u64,
    kv: BTreeMap<String, Vec<u8>>,
    subs: BTreeMap<SubId, Sub>,
    next_sub: SubId,
    next_delivery: u64,
    published: Vec<OutboundMessage>,
    /// When each of `published` was stored.
    published_at: Vec<u64>,
    sent: Vec<u8>,
    closed: Option<String>,
    reading: bool,
    will: Option<Will>,
    claims: BTreeSet<String>,
    logs: Vec<(LogLevel, String)>,
    actions: Vec<Action>,
    indexed: indexed::Indexed,
    /// Posts to homes not carried yet ([`SimHost::take_posts`]).
    posts: Vec<Action>,
    /// A home's answers not taken yet ([`SimHost::take_replies`]).
    replies: Vec<(u64, Vec<u8>)>,
    next_post: u64,
    /// The caps of capped routes' queues, by queue.
    caps: BTreeMap<String, Option<Cap>>,
    /// What every [`Action::PublishCapped`] is refused by.
    refusals: Vec<Refusal>,
}

impl<M: Machine> SimHost<M> {
    /// A host at `now_ms` running `machine`, whose first actions (e.g. a handshake timer)
    /// are carried out at once. Authentication succeeds as user `user` of tenant `tenant`,
    /// namespace `ns` (see [`SimHost::with_auth`]).
    pub fn new(now_ms: u64, machine: M) -> Self {
        let mut host = SimHost {
            machine,
            now_ms,
            auth: Ok(Principal {
                user: "user".into(),
                tenant: "tenant".into(),
                namespace: "ns".into(),
            }),
            pending: VecDeque::new(),
            timers: Vec::new(),
            timer_seq: 0,
            kv: BTreeMap::new(),
            subs: BTreeMap::new(),
            next_sub: 1,
            next_delivery: 1,
            published: Vec::new(),
            published_at: Vec::new(),
            sent: Vec::new(),
            closed: None,
            reading: true,
            will: None,
            claims: BTreeSet::new(),
            logs: Vec::new(),
            actions: Vec::new(),
            indexed: indexed::Indexed::default(),
            posts: Vec::new(),
            replies: Vec::new(),
            next_post: 0,
            caps: BTreeMap::new(),
            refusals: Vec::new(),
        };
        let actions = host.machine.take_actions();
        host.carry_out(actions);
        host
    }

    /// What authentication answers from now on.
    ///
    /// ```
    /// # use magnetar_sdk::machine::{Action, Event, Machine};
    /// # struct M;
    /// # impl Machine for M { fn apply(&mut self, _: u64, _: Event) {} fn take_actions(&mut self) -> Vec<Action> { Vec::new() } }
    /// use magnetar_sdk::{ErrorKind, OpError};
    /// let host = magnetar_sdk::testing::SimHost::new(0, M).with_auth(Err(OpError {
    ///     kind: ErrorKind::NotAuthorized,
    ///     message: "bad password".into(),
    /// }));
    /// # drop(host);
    /// ```
    pub fn with_auth(mut self, auth: Result<Principal, OpError>) -> Self {
        self.auth = auth;
        self
    }

    /// The machine under test.
    pub fn machine(&self) -> &M {
        &self.machine
    }

    /// The machine under test, to change.
    pub fn machine_mut(&mut self) -> &mut M {
        &mut self.machine
    }

    /// The simulated time, in milliseconds.
    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    // ---- events ------------------------------------------------------------------------

    /// Feeds one event at the current time and carries out the actions it caused.
    pub fn feed(&mut self, event: Event) {
        let actions = self.machine.handle(self.now_ms, event);
        self.carry_out(actions);
    }

    /// Feeds events that arrived together, as the host's batched callbacks do.
    pub fn feed_all(&mut self, events: impl IntoIterator<Item = Event>) {
        let actions = self.machine.handle_all(self.now_ms, events);
        self.carry_out(actions);
    }

    /// Bytes from the client.
    pub fn data(&mut self, bytes: &[u8]) {
        self.feed(Event::Data(bytes.to_vec()));
    }

    /// The socket goes away (the peer left): the machine is told, the will is published.
    pub fn disconnect(&mut self) {
        if self.closed.is_none() {
            self.closed = Some("peer closed".into());
        }
        // What the machine answers now is ignored, as the host ignores it.
        self.feed(Event::Closed);
        self.end_connection();
    }

    /// Another connection claims `key`, which this one holds (session takeover).
    pub fn lose_claim(&mut self, key: &str) {
        self.claims.remove(key);
        self.feed(Event::ClaimLost { key: key.into() });
    }

    /// Moves the clock `ms` forward, firing the timers that fall due on the way, each at its
    /// due time, in order.
    pub fn advance(&mut self, ms: u64) {
        let until = self.now_ms.saturating_add(ms);
        while let Some(i) = self.next_timer(until) {
            let (due, _, token) = self.timers.swap_remove(i);
            self.now_ms = self.now_ms.max(due);
            self.feed(Event::Timer { token });
        }
        self.now_ms = until;
    }

    /// The index of the earliest timer due by `until`.
    fn next_timer(&self, until: u64) -> Option<usize> {
        self.timers
            .iter()
            .enumerate()
            .filter(|(_, (due, _, _))| *due <= until)
            .min_by_key(|(_, (due, seq, _))| (*due, *seq))
            .map(|(i, _)| i)
    }

    /// The delay of each timer not fired yet, from now, in the order they were set.
    pub fn timers(&self) -> Vec<u64> {
        let mut timers = self.timers.clone();
        timers.sort_by_key(|(_, seq, _)| *seq);
        timers
            .iter()
            .map(|(due, _, _)| due.saturating_sub(self.now_ms))
            .collect()
    }

    // ---- operations --------------------------------------------------------------------

    // ---- homes ----------------------------------------------------------------------

    /// The posts to homes ([`Action::PostHome`]) the machine made since the last call, as
    /// (token, domain, shard, payload): a test carries them to a home's machine (its own
    /// `SimHost`, with [`SimHost::post`]) and its answers back as [`Event::HomeReply`].
    pub fn take_posts(&mut self) -> Vec<(u64, String, u32, Vec<u8>)> {
        std::mem::take(&mut self.posts)
            .into_iter()
            .filter_map(|a| match a {
                Action::PostHome {
                    token,
                    domain,
                    shard,
                    payload,
                } => Some((token, domain, shard, payload)),
                _ => None,
            })
            .collect()
    }

    /// Hands this (home) machine a post from a connection of `namespace`; the post's id,
    /// which its [`Action::ReplyHome`] names ([`SimHost::take_replies`]).
    pub fn post(&mut self, domain: &str, shard: u32, namespace: &str, payload: Vec<u8>) -> u64 {
        self.next_post += 1;
        let post_id = self.next_post;
        self.feed(Event::HomePost(crate::HomePost {
            domain: domain.to_string(),
            shard,
            post_id,
            namespace: namespace.to_string(),
            payload,
        }));
        post_id
    }

    /// The answers this (home) machine gave ([`Action::ReplyHome`]) since the last call, as
    /// (post id, payload).
    pub fn take_replies(&mut self) -> Vec<(u64, Vec<u8>)> {
        std::mem::take(&mut self.replies)
    }

    /// The long operations waiting for their outcome, oldest first.
    pub fn pending(&self) -> &VecDeque<Action> {
        &self.pending
    }

    /// Completes the oldest pending operation as the simulated host does; `false` if none
    /// was pending.
    pub fn complete_next(&mut self) -> bool {
        match self.pending.pop_front() {
            Some(op) => {
                let event = self.answer(op);
                self.feed(event);
                true
            }
            None => false,
        }
    }

    /// Completes the pending operation with `token` with an error; `false` if none has it.
    pub fn fail(&mut self, token: u64, error: OpError) -> bool {
        let Some(i) = self.pending.iter().position(|a| op_token(a) == Some(token)) else {
            return false;
        };
        let Some(op) = self.pending.remove(i) else {
            return false;
        };
        let event = match op {
            Action::Authenticate { .. } => Event::AuthResult {
                token,
                result: Err(error),
            },
            Action::AuthenticateSasl { .. } => Event::SaslResult {
                token,
                result: Err(error),
            },
            Action::Publish { .. } => Event::PublishResult {
                token,
                result: Err(error),
            },
            Action::Subscribe { .. } | Action::OpenRoute { .. } => Event::SubscribeResult {
                token,
                result: Err(error),
            },
            Action::KvScan { .. } => Event::KvScanResult {
                token,
                result: Err(error),
            },
            Action::Claim { .. } => Event::ClaimResult {
                token,
                result: Err(error),
            },
            Action::SendMessage { .. } => Event::Receipt {
                token,
                result: Err(error),
            },
            Action::OpenConsumer { .. } => Event::SubscribeResult {
                token,
                result: Err(error),
            },
            Action::Seek { .. } | Action::LastMessageId { .. } | Action::Locate { .. } => {
                Event::Position {
                    token,
                    result: Err(error),
                }
            }
            Action::Append { .. } => Event::Appended {
                token,
                result: Err(error),
            },
            Action::OpenReader { .. } => Event::SubscribeResult {
                token,
                result: Err(error),
            },
            Action::Bounds { .. } => Event::Bounds {
                token,
                result: Err(error),
            },
            Action::CreateTopic { .. }
            | Action::DeleteTopic { .. }
            | Action::SetPartitions { .. }
            | Action::DescribeTopics { .. } => Event::TopicsResult {
                token,
                result: Err(error),
            },
            _ => Event::KvResult {
                token,
                result: Err(error),
            },
        };
        self.feed(event);
        true
    }

    /// Completes every pending operation and hands out every delivery the subscriptions'
    /// windows allow, round after round, until nothing moves (at most [`MAX_ROUNDS`]).
    /// The number of events fed.
    pub fn run(&mut self) -> usize {
        let mut fed = 0;
        for _ in 0..MAX_ROUNDS {
            let mut moved = false;
            while self.complete_next() {
                fed += 1;
                moved = true;
            }
            let delivered = self.deliver();
            fed += delivered;
            if !moved && delivered == 0 {
                break;
            }
        }
        fed
    }

    /// The host's outcome of one long operation.
    fn answer(&mut self, op: Action) -> Event {
        match op {
            Action::Authenticate { token, .. } => Event::AuthResult {
                token,
                result: self.auth.clone(),
            },
            Action::AuthenticateSasl { token, .. } => Event::SaslResult {
                token,
                result: Err(OpError {
                    kind: ErrorKind::NotAuthorized,
                    message: "the simulated host runs no SASL".into(),
                }),
            },
            Action::Publish { token, msg } => {
                self.store(msg);
                Event::PublishResult {
                    token,
                    result: Ok(()),
                }
            }
            Action::Subscribe { token, spec } => Event::SubscribeResult {
                token,
                result: Ok(self.subscribe(spec)),
            },
            Action::OpenRoute { token, spec } => Event::SubscribeResult {
                token,
                result: Ok(self.open_route(spec)),
            },
            Action::StoreRoute { token, spec, cap } => Event::KvResult {
                token,
                result: self.store_route(spec, cap).map(|()| None),
            },
            Action::ConsumerCount {
                token,
                queue,
                prefix,
            } => {
                let count = self
                    .subs
                    .values()
                    .filter(|s| s.attached && s.spec.topic == queue)
                    .filter(|s| {
                        s.consumer_name
                            .as_deref()
                            .is_some_and(|n| n.starts_with(&prefix))
                    })
                    .count() as u64;
                Event::KvResult {
                    token,
                    result: Ok(Some(count.to_be_bytes().to_vec())),
                }
            }
            Action::QueueBacklog { token, queue } => Event::KvResult {
                token,
                result: Ok(Some(self.queue_backlog(&queue).to_be_bytes().to_vec())),
            },
            Action::KvGet { token, key } => Event::KvResult {
                token,
                result: Ok(self.kv.get(&key).cloned()),
            },
            Action::KvPut { token, key, value } => {
                self.kv_write(key, value);
                Event::KvResult {
                    token,
                    result: Ok(None),
                }
            }
            Action::KvScan {
                token,
                prefix,
                start_after,
                limit,
            } => Event::KvScanResult {
                token,
                result: Ok(self.kv_scan(&prefix, start_after.as_deref(), limit)),
            },
            Action::Claim { token, key } => {
                self.claims.insert(key);
                Event::ClaimResult {
                    token,
                    result: Ok(()),
                }
            }
            Action::SendMessage { token, msg } => {
                let seq = self.store_at(
                    OutboundMessage {
                        topic: msg.topic.name,
                        key: msg.key,
                        payload: msg.payload,
                        properties: msg.properties,
                    },
                    msg.event_time_ms,
                );
                Event::Receipt {
                    token,
                    result: Ok(message_id(seq)),
                }
            }
            Action::OpenConsumer { token, spec } => Event::SubscribeResult {
                token,
                result: Ok(self.open_consumer(spec)),
            },
            Action::Seek {
                token,
                sub,
                position,
            } => Event::Position {
                token,
                result: self.seek(sub, &position),
            },
            Action::LastMessageId { token, sub } => Event::Position {
                token,
                result: self.last_message_id(sub),
            },
            Action::Append {
                token,
                topic,
                records,
                dedup,
            } => Event::Appended {
                token,
                result: self.indexed.append(self.now_ms, &topic, records, dedup),
            },
            Action::OpenReader { token, spec } => {
                let id = self.next_sub;
                self.next_sub += 1;
                self.indexed.open_reader(id, spec);
                Event::SubscribeResult {
                    token,
                    result: Ok(id),
                }
            }
            Action::Locate {
                token,
                topic,
                index,
            } => Event::Position {
                token,
                result: Ok(self.indexed.locate(&topic, index)),
            },
            Action::Bounds { token, topic } => Event::Bounds {
                token,
                result: Ok(self.indexed.bounds(&topic)),
            },
            Action::CreateTopic {
                token,
                topic,
                partitions,
            } => Event::TopicsResult {
                token,
                result: self.indexed.create(topic, partitions),
            },
            Action::DeleteTopic { token, topic } => Event::TopicsResult {
                token,
                result: self.indexed.delete(&topic),
            },
            Action::SetPartitions {
                token,
                topic,
                partitions,
            } => Event::TopicsResult {
                token,
                result: self.indexed.set_partitions(topic, partitions),
            },
            Action::DescribeTopics { token, names } => Event::TopicsResult {
                token,
                result: Ok(self.indexed.describe(&names)),
            },
            // Only long operations are pending; anything else has no outcome.
            other => Event::KvResult {
                token: op_token(&other).unwrap_or_default(),
                result: Ok(None),
            },
        }
    }

    // ---- backend -----------------------------------------------------------------------

    /// Publishes `msg` as another producer would (not through the machine): it is stored and
    /// routed; [`SimHost::run`] delivers it.
    pub fn produce(&mut self, msg: OutboundMessage) {
        self.store(msg);
    }

    /// The messages stored, oldest first: the machine's publishes, wills, and
    /// [`SimHost::produce`]d ones.
    pub fn published(&self) -> &[OutboundMessage] {
        &self.published
    }

    /// The open subscriptions of the connection and their specs, by handle.
    pub fn subscriptions(&self) -> Vec<(SubId, &SubscriptionSpec)> {
        self.subs
            .iter()
            .filter(|(_, s)| s.attached)
            .map(|(id, s)| (*id, &s.spec))
            .collect()
    }

    /// The delivery ids acked on `sub` (a subscription or a reader), in ack order.
    pub fn acked(&self, sub: SubId) -> &[u64] {
        if let Some(r) = self.indexed.readers.get(&sub) {
            return &r.acked;
        }
        self.subs.get(&sub).map_or(&[], |s| s.acked.as_slice())
    }

    /// Appends an entry to an indexed topic as another producer would (a Kafka client of
    /// another connection, say); readers hand it out on [`SimHost::run`]. Its first index.
    pub fn append(&mut self, topic: &str, records: Vec<RecordOut>) -> u64 {
        let messages = records
            .into_iter()
            .map(|r| EntryMessage {
                key: r.key,
                value: r.value,
                properties: r.properties,
                event_time_ms: r.event_time_ms,
            })
            .collect();
        self.indexed
            .push(self.now_ms, topic, "other".into(), 0, messages)
            .first_index
    }

    /// The entries of an indexed topic, oldest first: each entry's first index and its
    /// messages.
    pub fn entries(&self, topic: &str) -> Vec<(u64, Vec<EntryMessage>)> {
        self.indexed
            .logs
            .get(topic)
            .map_or_else(Vec::new, |log| indexed::entries_of(log))
    }

    /// The namespace's topics made with `topics` calls, with their partition counts.
    pub fn topics(&self) -> &BTreeMap<String, u32> {
        &self.indexed.topics
    }

    /// The namespace's topics, to seed or change.
    pub fn topics_mut(&mut self) -> &mut BTreeMap<String, u32> {
        &mut self.indexed.topics
    }

    /// The open readers of the connection.
    pub fn readers(&self) -> Vec<SubId> {
        self.indexed.readers.keys().copied().collect()
    }

    /// Whether `sub` was drained ([`Action::Drain`]).
    pub fn drained(&self, sub: SubId) -> bool {
        self.subs.get(&sub).is_some_and(|s| s.drained)
    }

    /// Deliveries of `sub` handed out and not acked.
    pub fn unacked(&self, sub: SubId) -> usize {
        self.subs.get(&sub).map_or(0, |s| s.unacked.len())
    }

    /// Hands each open subscription the deliveries its window allows, as one batch per
    /// subscription; the number handed out.
    pub fn deliver(&mut self) -> usize {
        let mut total = 0;
        let ids: Vec<SubId> = self.subs.keys().copied().collect();
        for id in ids {
            let mut batch = Vec::new();
            if let Some(sub) = self.subs.get_mut(&id) {
                if !sub.attached || sub.drained || self.closed.is_some() {
                    continue;
                }
                let window = usize::try_from(sub.spec.max_unacked.max(1)).unwrap_or(usize::MAX);
                while sub.unacked.len() < window {
                    let Some(stored) = sub.backlog.pop_front() else {
                        break;
                    };
                    let delivery_id = self.next_delivery;
                    self.next_delivery += 1;
                    batch.push(if sub.messages {
                        Event::Message(message(id, delivery_id, &stored))
                    } else {
                        Event::Delivery(delivery(id, delivery_id, &stored))
                    });
                    sub.unacked.insert(delivery_id, stored);
                }
            }
            total += batch.len();
            if !batch.is_empty() {
                self.feed_all(batch);
            }
        }
        if self.closed.is_none() {
            for batch in self.indexed.deliver(&mut self.next_delivery) {
                total += batch.len();
                self.feed_all(batch.into_iter().map(Event::Entry));
            }
        }
        total
    }

    fn store(&mut self, msg: OutboundMessage) -> u64 {
        self.store_at(msg, None)
    }

    /// Stores a message with its event time; its sequence number.
    fn store_at(&mut self, msg: OutboundMessage, event_time_ms: Option<u64>) -> u64 {
        let seq = self.published.len() as u64;
        let stored = Stored {
            msg,
            publish_time_ms: self.now_ms,
            seq,
            event_time_ms,
            redeliveries: 0,
        };
        for sub in self.subs.values_mut() {
            let wanted = sub.filters.as_ref().is_none_or(|filters| {
                let by_property = sub.key_property.as_ref().and_then(|name| {
                    let props = &stored.msg.properties;
                    props
                        .iter()
                        .find(|p| p.key == *name)
                        .map(|p| p.value.as_str())
                });
                let key = by_property
                    .or(stored.msg.key.as_deref())
                    .unwrap_or_default();
                filters
                    .iter()
                    .any(|f| route_matches(f, key, &stored.msg.properties))
            });
            if sub.spec.topic == stored.msg.topic && (sub.attached || sub.spec.durable) && wanted {
                sub.backlog.push_back(stored.clone());
            }
        }
        let entry = EntryMessage {
            key: stored.msg.key.clone().map(String::into_bytes),
            value: Some(stored.msg.payload.clone()),
            properties: stored.msg.properties.clone(),
            event_time_ms,
        };
        self.indexed.push(
            self.now_ms,
            &stored.msg.topic,
            "sim".into(),
            seq,
            vec![entry],
        );
        self.published_at.push(stored.publish_time_ms);
        self.published.push(stored.msg);
        seq
    }

    /// The stored messages of `topic` from `position` on, as a consumer starting there gets them.
    fn stored_from(&self, topic: &str, position: &Position) -> VecDeque<Stored> {
        let first = match position {
            Position::Earliest => 0,
            Position::Latest => self.published.len() as u64,
            Position::MessageId(at) => {
                seq_of(&at.id).map_or(0, |seq| if at.inclusive { seq } else { seq + 1 })
            }
            Position::PublishTime(_) => 0,
        };
        self.published
            .iter()
            .enumerate()
            .skip(usize::try_from(first).unwrap_or(usize::MAX))
            .filter(|(_, m)| m.topic == topic)
            .map(|(seq, m)| Stored {
                msg: m.clone(),
                publish_time_ms: self.published_at.get(seq).copied().unwrap_or(self.now_ms),
                seq: seq as u64,
                event_time_ms: None,
                redeliveries: 0,
            })
            .collect()
    }

    /// Opens a `messaging` consumer or reader.
    fn open_consumer(&mut self, spec: ConsumerSpec) -> SubId {
        let durable = spec.subscription.is_some();
        let name = spec
            .subscription
            .clone()
            .unwrap_or_else(|| format!("reader-{}", self.next_sub));
        let resumes = durable
            && self
                .subs
                .values()
                .any(|s| !s.attached && s.spec.durable && s.spec.name == name);
        let id = self.subscribe(SubscriptionSpec {
            topic: spec.topic.name.clone(),
            name,
            mode: spec.mode,
            durable,
            initial_position: match spec.start {
                Position::Earliest => InitialPosition::Earliest,
                _ => InitialPosition::Latest,
            },
            max_unacked: spec.max_unacked,
        });
        let backlog = (!resumes).then(|| self.stored_from(&spec.topic.name, &spec.start));
        if let Some(s) = self.subs.get_mut(&id) {
            s.messages = true;
            s.consumer_name = spec.consumer_name.clone();
            if let Some(b) = backlog {
                s.backlog = b;
            }
        }
        id
    }

    /// A negative ack: the message goes back to the front of its consumer's backlog.
    fn nack(&mut self, sub: SubId, delivery_id: u64) {
        if let Some(s) = self.subs.get_mut(&sub) {
            if let Some(mut stored) = s.unacked.remove(&delivery_id) {
                stored.redeliveries += 1;
                s.backlog.push_front(stored);
            }
        }
    }

    /// Moves a consumer: what it had handed out is forgotten.
    fn seek(&mut self, sub: SubId, position: &Position) -> Result<Option<Vec<u8>>, OpError> {
        if self.indexed.seek(sub, position) {
            return Ok(None);
        }
        let topic = match self.subs.get(&sub) {
            Some(s) => s.spec.topic.clone(),
            None => return Err(not_found()),
        };
        let backlog = self.stored_from(&topic, position);
        if let Some(s) = self.subs.get_mut(&sub) {
            s.unacked.clear();
            s.backlog = backlog;
        }
        Ok(None)
    }

    /// The id of the last message of a consumer's topic.
    fn last_message_id(&self, sub: SubId) -> Result<Option<Vec<u8>>, OpError> {
        if let Some(last) = self.indexed.last_id(sub) {
            return Ok(last);
        }
        let topic = &self.subs.get(&sub).ok_or_else(not_found)?.spec.topic;
        Ok(self
            .published
            .iter()
            .rposition(|m| m.topic == *topic)
            .map(|seq| message_id(seq as u64)))
    }

    /// Opens a subscription; a durable one of the same name resumes, its unacked messages
    /// first.
    fn subscribe(&mut self, spec: SubscriptionSpec) -> SubId {
        let id = self.next_sub;
        self.next_sub += 1;
        let mut sub = Sub {
            spec,
            attached: true,
            backlog: VecDeque::new(),
            unacked: BTreeMap::new(),
            acked: Vec::new(),
            filters: None,
            key_property: None,
            messages: false,
            drained: false,
            consumer_name: None,
        };
        if sub.spec.durable {
            let earlier = self
                .subs
                .iter()
                .find(|(_, s)| !s.attached && s.spec.durable && s.spec.name == sub.spec.name)
                .map(|(id, _)| *id);
            if let Some(old) = earlier.and_then(|e| self.subs.remove(&e)) {
                sub.backlog = old.unacked.into_values().chain(old.backlog).collect();
            }
        }
        self.subs.insert(id, sub);
        id
    }

    /// Opens a route: a subscription of its source that takes matching messages only; with
    /// a queue, a durable one of that name (its backlog kept, and resumed by the next route
    /// of the same queue).
    fn open_route(&mut self, spec: RouteSpec) -> SubId {
        let durable = spec.queue.is_some();
        let name = spec
            .queue
            .unwrap_or_else(|| format!("route-{}", self.next_sub));
        let id = self.subscribe(SubscriptionSpec {
            topic: spec.source,
            name,
            mode: SubMode::Exclusive,
            durable,
            initial_position: InitialPosition::Latest,
            max_unacked: spec.max_unacked,
        });
        if let Some(s) = self.subs.get_mut(&id) {
            s.filters = Some(spec.filters);
            s.key_property = spec.key_property;
        }
        id
    }

    /// Stores a durable route without a reader of its queue ([`Action::StoreRoute`]).
    fn store_route(&mut self, spec: RouteSpec, cap: Option<Cap>) -> Result<(), OpError> {
        let Some(queue) = spec.queue.clone() else {
            return Err(OpError {
                kind: ErrorKind::InvalidName,
                message: "a stored route needs a queue".into(),
            });
        };
        self.caps.insert(queue.clone(), cap);
        let open = self
            .subs
            .values_mut()
            .find(|s| s.attached && s.spec.durable && s.filters.is_some() && s.spec.name == queue);
        if let Some(open) = open {
            open.filters = Some(spec.filters);
            open.key_property = spec.key_property;
            return Ok(());
        }
        let id = self.open_route(spec);
        if let Some(s) = self.subs.get_mut(&id) {
            s.attached = false;
        }
        Ok(())
    }

    /// What [`Action::QueueBacklog`] answers: the messages waiting or unacknowledged in the
    /// queue topic's durable subscriptions (the fullest; with none, every message stored on
    /// the topic), or in the durable route of that queue, which holds the queue's copies
    /// here, if it holds more.
    fn queue_backlog(&self, queue: &str) -> u64 {
        let held = |s: &&Sub| (s.backlog.len() + s.unacked.len()) as u64;
        let on_topic = self
            .subs
            .values()
            .filter(|s| s.spec.durable && s.spec.topic == queue)
            .map(|s| held(&s))
            .max()
            .unwrap_or_else(|| self.published.iter().filter(|m| m.topic == queue).count() as u64);
        let routed = self
            .subs
            .values()
            .filter(|s| s.spec.durable && s.filters.is_some() && s.spec.name == queue)
            .map(|s| held(&s))
            .max()
            .unwrap_or(0);
        on_topic.max(routed)
    }

    /// The filters bound to a route, in binding order.
    pub fn route_filters(&self, route: SubId) -> Option<&[Filter]> {
        self.subs.get(&route).and_then(|s| s.filters.as_deref())
    }

    fn ack(&mut self, sub: SubId, delivery_id: u64) {
        if self.indexed.ack(sub, delivery_id) {
            return;
        }
        if let Some(s) = self.subs.get_mut(&sub) {
            if s.unacked.remove(&delivery_id).is_some() {
                s.acked.push(delivery_id);
            }
        }
    }

    // ---- kv ----------------------------------------------------------------------------

    // ---- caps --------------------------------------------------------------------------

    /// Every [`Action::PublishCapped`] from now on is refused by `refusals` (none: taken).
    pub fn refuse_publishes(&mut self, refusals: Vec<Refusal>) {
        self.refusals = refusals;
    }

    /// The caps [`Action::OpenCappedRoute`] gave, by queue (the last one given).
    pub fn caps(&self) -> &BTreeMap<String, Option<Cap>> {
        &self.caps
    }

    /// The kv, in key order.
    pub fn kv(&self) -> &BTreeMap<String, Vec<u8>> {
        &self.kv
    }

    /// The kv, to seed or change.
    pub fn kv_mut(&mut self) -> &mut BTreeMap<String, Vec<u8>> {
        &mut self.kv
    }

    fn kv_write(&mut self, key: String, value: Option<Vec<u8>>) {
        match value {
            Some(v) => {
                self.kv.insert(key, v);
            }
            None => {
                self.kv.remove(&key);
            }
        }
    }

    fn kv_scan(&self, prefix: &str, start_after: Option<&str>, limit: u32) -> Vec<KvEntry> {
        let limit = usize::try_from(limit.min(SCAN_MAX)).unwrap_or(usize::MAX);
        self.kv
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .filter(|(k, _)| start_after.is_none_or(|after| k.as_str() > after))
            .take(limit)
            .map(|(key, value)| KvEntry {
                key: key.clone(),
                value: value.clone(),
            })
            .collect()
    }

    // ---- the connection ----------------------------------------------------------------

    /// The bytes sent to the client since the last call.
    pub fn take_sent(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.sent)
    }

    /// Every action carried out since the last call, in order (acks as the machine gathered
    /// them).
    pub fn take_actions(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.actions)
    }

    /// Why the connection was closed, once it was.
    pub fn closed(&self) -> Option<&str> {
        self.closed.as_deref()
    }

    /// Whether the host reads the socket (`SetReading`; `true` until told otherwise).
    pub fn is_reading(&self) -> bool {
        self.reading
    }

    /// The will registered now.
    pub fn will(&self) -> Option<&Will> {
        self.will.as_ref()
    }

    /// The keys the connection holds claims on.
    pub fn claims(&self) -> &BTreeSet<String> {
        &self.claims
    }

    /// The log lines written, oldest first.
    pub fn logs(&self) -> &[(LogLevel, String)] {
        &self.logs
    }

    /// A new connection of the same client, running `machine`, after the current one ended
    /// (it is told `Closed` first if it was still open). The backend and the kv stay: durable
    /// subscriptions keep their messages for the new connection; everything of the old
    /// connection (pending operations, timers, sent bytes, claims) is gone.
    pub fn reconnect(&mut self, machine: M) {
        if self.closed.is_none() {
            self.disconnect();
        }
        self.machine = machine;
        self.pending.clear();
        self.timers.clear();
        self.sent.clear();
        self.closed = None;
        self.reading = true;
        self.claims.clear();
        let actions = self.machine.take_actions();
        self.carry_out(actions);
    }

    /// The connection ended: the publishes and kv writes it queued still run, in order, as
    /// on the real host (their outcomes go nowhere); the will is published, subscriptions
    /// close (durable ones keep their messages), claims end.
    fn end_connection(&mut self) {
        for op in std::mem::take(&mut self.pending) {
            match op {
                Action::Publish { msg, .. } => {
                    self.store(msg);
                }
                Action::SendMessage { msg, .. } => {
                    self.store_at(
                        OutboundMessage {
                            topic: msg.topic.name,
                            key: msg.key,
                            payload: msg.payload,
                            properties: msg.properties,
                        },
                        msg.event_time_ms,
                    );
                }
                Action::KvPut { key, value, .. } => self.kv_write(key, value),
                Action::Append {
                    topic,
                    records,
                    dedup,
                    ..
                } => {
                    let _ = self.indexed.append(self.now_ms, &topic, records, dedup);
                }
                _ => {}
            }
        }
        if let Some(will) = self.will.take() {
            if let Some(write) = will.kv {
                self.kv_write(write.key, write.value);
            }
            self.store(will.msg);
        }
        self.subs.retain(|_, s| s.spec.durable);
        self.indexed.readers.clear();
        for sub in self.subs.values_mut() {
            sub.attached = false;
        }
        self.pending.clear();
        self.timers.clear();
        self.claims.clear();
    }

    /// Carries out actions in order; long operations wait in `pending`.
    fn carry_out(&mut self, actions: Vec<Action>) {
        let mut answers = Vec::new();
        for action in actions {
            self.actions.push(action.clone());
            if self.closed.is_some() {
                continue; // calls on a closed connection are ignored by the host
            }
            match action {
                Action::Send(bytes) => self.sent.extend_from_slice(&bytes),
                Action::Close(reason) => {
                    self.closed = Some(reason);
                    self.end_connection();
                }
                Action::SetReading(reading) => self.reading = reading,
                Action::Unsubscribe { sub, delete } => {
                    self.indexed.readers.remove(&sub);
                    if let Some(s) = self.subs.get_mut(&sub) {
                        if delete || !s.spec.durable {
                            self.subs.remove(&sub);
                        } else {
                            s.attached = false;
                        }
                    }
                }
                Action::Ack { sub, delivery_id } => self.ack(sub, delivery_id),
                Action::Nack { sub, delivery_id } => self.nack(sub, delivery_id),
                Action::Drain { sub } => {
                    if let Some(s) = self.subs.get_mut(&sub) {
                        s.drained = true;
                    }
                }
                Action::AckMany { sub, delivery_ids } => {
                    for id in delivery_ids {
                        self.ack(sub, id);
                    }
                }
                Action::SetTimer { token, delay_ms } => {
                    self.timer_seq += 1;
                    let due = self.now_ms.saturating_add(delay_ms);
                    self.timers.push((due, self.timer_seq, token));
                }
                Action::SetWill(will) => self.will = will,
                Action::Log { level, message } => self.logs.push((level, message)),
                Action::PostHome { .. } => self.posts.push(action),
                Action::ReplyHome { post_id, payload } => self.replies.push((post_id, payload)),
                Action::Bind { route, filter } => {
                    if let Some(filters) =
                        self.subs.get_mut(&route).and_then(|s| s.filters.as_mut())
                    {
                        if !filters.contains(&filter) {
                            filters.push(filter);
                        }
                    }
                }
                Action::Unbind { route, filter } => {
                    if let Some(filters) =
                        self.subs.get_mut(&route).and_then(|s| s.filters.as_mut())
                    {
                        filters.retain(|f| *f != filter);
                    }
                }
                Action::OpenCappedRoute { token, spec, cap } => {
                    if let Some(queue) = &spec.queue {
                        self.caps.insert(queue.clone(), cap);
                    }
                    self.pending.push_back(Action::OpenRoute { token, spec });
                }
                Action::PublishCapped { token, msg } => {
                    if !self.refusals.is_empty() {
                        answers.push(Event::PublishRefused {
                            token,
                            refusals: self.refusals.clone(),
                            msg: msg.clone(),
                        });
                    }
                    self.pending.push_back(Action::Publish { token, msg });
                }
                long => self.pending.push_back(long),
            }
        }
        if !answers.is_empty() {
            self.feed_all(answers);
        }
    }
}

/// The token of a long operation.
fn op_token(action: &Action) -> Option<u64> {
    match action {
        Action::Authenticate { token, .. }
        | Action::AuthenticateSasl { token, .. }
        | Action::Publish { token, .. }
        | Action::Subscribe { token, .. }
        | Action::OpenRoute { token, .. }
        | Action::StoreRoute { token, .. }
        | Action::QueueBacklog { token, .. }
        | Action::ConsumerCount { token, .. }
        | Action::KvGet { token, .. }
        | Action::KvPut { token, .. }
        | Action::KvScan { token, .. }
        | Action::Claim { token, .. }
        | Action::SendMessage { token, .. }
        | Action::OpenConsumer { token, .. }
        | Action::Seek { token, .. }
        | Action::LastMessageId { token, .. }
        | Action::Append { token, .. }
        | Action::OpenReader { token, .. }
        | Action::Locate { token, .. }
        | Action::Bounds { token, .. }
        | Action::CreateTopic { token, .. }
        | Action::DeleteTopic { token, .. }
        | Action::SetPartitions { token, .. }
        | Action::DescribeTopics { token, .. }
        | Action::SetTimer { token, .. } => Some(*token),
        _ => None,
    }
}

/// Whether a route's filter takes a message: the WIT's `routing.filter`, checked plainly
/// (the host's index is a trie; this is the reference it must agree with).
pub fn route_matches(filter: &Filter, key: &str, properties: &[crate::Property]) -> bool {
    fn levels(filter: &[&str], key: &[&str], one: &str, many: &str) -> bool {
        match (filter.split_first(), key.split_first()) {
            (None, None) => true,
            (Some((f, rest)), _) if *f == many => {
                (0..=key.len()).any(|skip| levels(rest, &key[skip..], one, many))
            }
            (Some((f, frest)), Some((k, krest))) => {
                (*f == one || f == k) && levels(frest, krest, one, many)
            }
            _ => false,
        }
    }
    match filter {
        Filter::Mqtt(f) => {
            let f: Vec<&str> = f.split('/').collect();
            let wild_first = matches!(f.first(), Some(&"+") | Some(&"#"));
            let k: Vec<&str> = key.split('/').collect();
            !(key.starts_with('$') && wild_first) && levels(&f, &k, "+", "#")
        }
        Filter::AmqpTopic(f) => {
            let f: Vec<&str> = f.split('.').collect();
            let k: Vec<&str> = key.split('.').collect();
            levels(&f, &k, "*", "#")
        }
        Filter::Exact(k) => k == key,
        Filter::All => true,
        Filter::Headers(h) => {
            let hit = |a: &crate::Property| {
                properties
                    .iter()
                    .any(|p| p.key == a.key && (a.value.is_empty() || p.value == a.value))
            };
            if h.match_all {
                h.args.iter().all(hit)
            } else {
                h.args.iter().any(hit)
            }
        }
    }
}

fn delivery(subscription: SubId, delivery_id: u64, stored: &Stored) -> Delivery {
    Delivery {
        subscription,
        delivery_id,
        key: stored.msg.key.clone(),
        payload: stored.msg.payload.clone(),
        properties: stored.msg.properties.clone(),
        publish_time_ms: stored.publish_time_ms,
        redelivery_count: stored.redeliveries,
    }
}

/// What a `messaging` consumer hands over for a stored message.
fn message(subscription: SubId, delivery_id: u64, stored: &Stored) -> Message {
    Message {
        subscription,
        delivery_id,
        message_id: message_id(stored.seq),
        key: stored.msg.key.clone(),
        payload: stored.msg.payload.clone(),
        properties: stored.msg.properties.clone(),
        publish_time_ms: stored.publish_time_ms,
        event_time_ms: stored.event_time_ms,
        redelivery_count: stored.redeliveries,
    }
}

/// The error of a command for a consumer the host does not know.
fn not_found() -> OpError {
    OpError {
        kind: ErrorKind::NotFound,
        message: "no such consumer".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::Outbox;

    /// A scripted machine: every event is recorded; `Data` is a command line.
    #[derive(Default)]
    struct Script {
        out: Outbox,
        events: Vec<(u64, Event)>,
        next: u64,
    }

    fn spec(topic: &str, durable: bool, max_unacked: u32) -> SubscriptionSpec {
        SubscriptionSpec {
            topic: topic.into(),
            name: format!("sub-{topic}"),
            mode: SubMode::Exclusive,
            durable,
            initial_position: InitialPosition::Latest,
            max_unacked,
        }
    }

    impl Machine for Script {
        fn apply(&mut self, now_ms: u64, event: Event) {
            self.next += 1;
            let token = self.next;
            match &event {
                Event::Data(cmd) => match cmd.as_slice() {
                    b"timer" => self.out.push(Action::SetTimer {
                        token,
                        delay_ms: 100,
                    }),
                    b"sub" => self.out.push(Action::Subscribe {
                        token,
                        spec: spec("t", false, 2),
                    }),
                    b"durable" => self.out.push(Action::Subscribe {
                        token,
                        spec: spec("t", true, 10),
                    }),
                    b"put" => self.out.push(Action::KvPut {
                        token,
                        key: "k/1".into(),
                        value: Some(b"v".to_vec()),
                    }),
                    b"scan" => self.out.push(Action::KvScan {
                        token,
                        prefix: "k/".into(),
                        start_after: None,
                        limit: 10,
                    }),
                    b"close" => self.out.push(Action::Close("asked".into())),
                    other => self.out.send(other.to_vec()),
                },
                Event::Delivery(d) if d.payload != b"keep" => {
                    self.out.ack(d.subscription, d.delivery_id);
                }
                _ => {}
            }
            self.events.push((now_ms, event));
        }
        fn take_actions(&mut self) -> Vec<Action> {
            self.out.take()
        }
    }

    fn msg(topic: &str, payload: &[u8]) -> OutboundMessage {
        OutboundMessage {
            topic: topic.into(),
            key: None,
            payload: payload.to_vec(),
            properties: Vec::new(),
        }
    }

    #[test]
    fn timers_fire_in_order_at_their_due_time() {
        let mut host = SimHost::new(1_000, Script::default());
        host.data(b"timer");
        host.advance(50);
        host.data(b"timer");
        assert_eq!(host.timers(), [50, 100]);
        host.advance(99);
        assert_eq!(host.timers(), [1]);
        host.advance(1);
        let fired: Vec<u64> = host
            .machine()
            .events
            .iter()
            .filter(|(_, e)| matches!(e, Event::Timer { .. }))
            .map(|(t, _)| *t)
            .collect();
        assert_eq!(fired, [1_100, 1_150]);
        assert_eq!(host.now_ms(), 1_150);
    }

    #[test]
    fn deliveries_respect_the_window_and_acks_open_it() {
        let mut host = SimHost::new(0, Script::default());
        host.data(b"sub");
        host.run();
        let [(sub, _)] = host.subscriptions()[..] else {
            panic!("one subscription");
        };
        for p in [b"keep", b"keep", b"ack!"] {
            host.produce(msg("t", p));
        }
        host.produce(msg("other", b"x"));
        host.run();
        assert_eq!(host.unacked(sub), 2, "a window of 2, never acked");
        assert_eq!(host.acked(sub), [] as [u64; 0]);
        let deliveries = host
            .machine()
            .events
            .iter()
            .filter(|(_, e)| matches!(e, Event::Delivery(_)))
            .count();
        assert_eq!(deliveries, 2);
    }

    #[test]
    fn a_durable_subscription_keeps_messages_across_a_reconnect() {
        let mut host = SimHost::new(0, Script::default());
        host.data(b"durable");
        host.run();
        host.produce(msg("t", b"keep"));
        host.run();
        host.disconnect();
        host.produce(msg("t", b"while away"));
        host.reconnect(Script::default());
        host.data(b"durable");
        host.run();
        let payloads: Vec<Vec<u8>> = host
            .machine()
            .events
            .iter()
            .filter_map(|(_, e)| match e {
                Event::Delivery(d) => Some(d.payload.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(payloads, [b"keep".to_vec(), b"while away".to_vec()]);
    }

    #[test]
    fn kv_puts_and_scans() {
        let mut host = SimHost::new(0, Script::default());
        host.kv_mut().insert("j".into(), b"not mine".to_vec());
        host.data(b"put");
        host.data(b"scan");
        assert_eq!(host.pending().len(), 2);
        host.run();
        let scanned = host.machine().events.iter().find_map(|(_, e)| match e {
            Event::KvScanResult { result: Ok(r), .. } => Some(r.len()),
            _ => None,
        });
        assert_eq!(scanned, Some(1));
        assert_eq!(host.kv().get("k/1").map(Vec::as_slice), Some(&b"v"[..]));
    }

    #[test]
    fn a_failed_operation_reaches_the_machine_as_an_error() {
        let mut host = SimHost::new(0, Script::default());
        host.data(b"put");
        let token = host.pending().front().and_then(op_token).unwrap_or(0);
        let e = OpError {
            kind: ErrorKind::Backend,
            message: "down".into(),
        };
        assert!(host.fail(token, e));
        assert!(!host.fail(
            token,
            OpError {
                kind: ErrorKind::Backend,
                message: String::new()
            }
        ));
        assert!(host.kv().is_empty());
        assert!(host
            .machine()
            .events
            .iter()
            .any(|(_, e)| matches!(e, Event::KvResult { result: Err(_), .. })));
    }

    #[test]
    fn close_ends_the_connection_and_later_calls_are_ignored() {
        let mut host = SimHost::new(0, Script::default());
        host.data(b"hi");
        host.data(b"close");
        host.data(b"ignored");
        assert_eq!(host.closed(), Some("asked"));
        assert_eq!(host.take_sent(), b"hi");
    }

    #[test]
    fn kv_writes_queued_before_the_close_still_run() {
        let mut host = SimHost::new(0, Script::default());
        host.data(b"put");
        host.data(b"close");
        assert_eq!(host.kv().get("k/1").map(Vec::as_slice), Some(&b"v"[..]));
        assert!(host.pending().is_empty());
        let results = host
            .machine()
            .events
            .iter()
            .filter(|(_, e)| matches!(e, Event::KvResult { .. }))
            .count();
        assert_eq!(results, 0, "the outcome goes nowhere");
    }
}

#[cfg(test)]
mod route_tests {
    use super::route_matches;
    use crate::{Filter, HeadersFilter, Property};

    #[test]
    fn filters_match_as_the_wit_says() {
        let m = |f: &str, k: &str| route_matches(&Filter::Mqtt(f.into()), k, &[]);
        assert!(m("a/+/c", "a/b/c") && m("a/#", "a") && m("#", "a/b") && m("+/", "x/"));
        assert!(!m("a/+", "a/b/c") && !m("#", "$SYS/x") && !m("+/x", "$SYS/x"));
        assert!(m("$SYS/#", "$SYS/x"));
        let a = |f: &str, k: &str| route_matches(&Filter::AmqpTopic(f.into()), k, &[]);
        assert!(a("*.orange.*", "q.orange.r") && a("a.#.z", "a.z") && a("#", "$x"));
        assert!(!a("*.orange.*", "orange.r"));
        let props = [Property {
            key: "format".into(),
            value: "pdf".into(),
        }];
        let headers = |match_all, k: &str, v: &str| {
            Filter::Headers(HeadersFilter {
                match_all,
                args: vec![Property {
                    key: k.into(),
                    value: v.into(),
                }],
            })
        };
        assert!(route_matches(&headers(true, "format", "pdf"), "", &props));
        assert!(route_matches(&headers(true, "format", ""), "", &props));
        assert!(!route_matches(&headers(false, "type", "log"), "", &props));
        assert!(route_matches(&Filter::Exact("k".into()), "k", &[]));
        assert!(route_matches(&Filter::All, "", &[]));
    }

    use crate::machine::{Action, Event, Machine};
    use crate::testing::{message_id, SimHost};
    use crate::SubMode;

    /// Records events; carries out the actions it is given.
    #[derive(Default)]
    struct Recorder {
        seen: Vec<Event>,
        out: Vec<Action>,
    }

    impl Machine for Recorder {
        fn apply(&mut self, _now_ms: u64, event: Event) {
            self.seen.push(event);
        }
        fn take_actions(&mut self) -> Vec<Action> {
            std::mem::take(&mut self.out)
        }
    }

    #[test]
    fn messaging_consumers_get_ids_and_can_nack_and_seek() {
        use crate::{ConsumerSpec, MessageIdAt, MessageOut, Position, TopicRef};
        let topic = TopicRef {
            name: "t".into(),
            persistent: true,
        };
        let mut host = SimHost::new(0, Recorder::default());
        for (token, body) in [(1, "a"), (2, "b"), (3, "c")] {
            host.machine_mut().out.push(Action::SendMessage {
                token,
                msg: MessageOut {
                    topic: topic.clone(),
                    key: None,
                    payload: body.into(),
                    properties: Vec::new(),
                    event_time_ms: Some(7),
                },
            });
        }
        host.feed(Event::Timer { token: 0 });
        host.run();
        let receipts: Vec<_> = host
            .machine()
            .seen
            .iter()
            .filter_map(|e| match e {
                Event::Receipt { result: Ok(id), .. } => Some(id.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(receipts, vec![message_id(0), message_id(1), message_id(2)]);

        // A reader from b (inclusive).
        host.machine_mut().out.push(Action::OpenConsumer {
            token: 9,
            spec: ConsumerSpec {
                topic,
                subscription: None,
                mode: SubMode::Exclusive,
                start: Position::MessageId(MessageIdAt {
                    id: message_id(1),
                    inclusive: true,
                }),
                max_unacked: 10,
                nack_delay_ms: 0,
                max_redeliveries: 0,
                dead_letter_topic: None,
                consumer_name: None,
            },
        });
        host.feed(Event::Timer { token: 0 });
        host.run();
        let got = |host: &SimHost<Recorder>| -> Vec<(Vec<u8>, u64, u32)> {
            host.machine()
                .seen
                .iter()
                .filter_map(|e| match e {
                    Event::Message(m) => {
                        Some((m.payload.clone(), m.delivery_id, m.redelivery_count))
                    }
                    _ => None,
                })
                .collect()
        };
        let first = got(&host);
        assert_eq!(
            first.iter().map(|m| m.0.clone()).collect::<Vec<_>>(),
            vec![b"b".to_vec(), b"c".to_vec()]
        );
        let sub = host.subscriptions()[0].0;
        host.machine_mut().out.push(Action::Nack {
            sub,
            delivery_id: first[0].1,
        });
        host.feed(Event::Timer { token: 0 });
        host.run();
        let again = got(&host);
        assert_eq!(
            again.last().map(|m| (m.0.clone(), m.2)),
            Some((b"b".to_vec(), 1))
        );

        host.machine_mut().out.push(Action::Seek {
            token: 10,
            sub,
            position: Position::Earliest,
        });
        host.machine_mut()
            .out
            .push(Action::LastMessageId { token: 11, sub });
        host.feed(Event::Timer { token: 0 });
        host.run();
        assert_eq!(
            got(&host).len(),
            again.len() + 3,
            "a, b, c again after the seek"
        );
        assert!(host.machine().seen.iter().any(|e| matches!(
            e,
            Event::Position { token: 11, result: Ok(Some(id)) } if *id == message_id(2)
        )));
    }
}

#[cfg(test)]
mod home_tests {
    use super::*;
    use crate::outbox::Outbox;

    /// Posts each read to home ("d", 3); as a home, answers each post with its namespace
    /// and payload; forwards a home's answer to its client.
    #[derive(Default)]
    struct Relay {
        out: Outbox,
        next: u64,
    }

    impl Machine for Relay {
        fn apply(&mut self, _now_ms: u64, event: Event) {
            match event {
                Event::Data(payload) => {
                    self.next += 1;
                    self.out.push(Action::PostHome {
                        token: self.next,
                        domain: "d".into(),
                        shard: 3,
                        payload,
                    });
                }
                Event::HomePost(post) => {
                    let mut answer = post.namespace.into_bytes();
                    answer.extend_from_slice(&post.payload);
                    self.out.push(Action::ReplyHome {
                        post_id: post.post_id,
                        payload: answer,
                    });
                }
                Event::HomeReply {
                    result: Ok(bytes), ..
                } => self.out.send(bytes),
                _ => {}
            }
        }
        fn take_actions(&mut self) -> Vec<Action> {
            self.out.take()
        }
    }

    #[test]
    fn posts_are_carried_to_a_home_and_answers_back() {
        let mut client = SimHost::new(0, Relay::default());
        let mut home = SimHost::new(0, Relay::default());
        client.data(b"ping");
        // A post is not answered by the simulated host itself: the test carries it.
        assert_eq!(client.run(), 0);
        let posts = client.take_posts();
        assert_eq!(posts, vec![(1, "d".to_string(), 3, b"ping".to_vec())]);
        let (token, domain, shard, payload) = posts[0].clone();
        let id = home.post(&domain, shard, "t/ns", payload);
        let replies = home.take_replies();
        assert_eq!(replies, vec![(id, b"t/nsping".to_vec())]);
        client.feed(Event::HomeReply {
            token,
            result: Ok(replies[0].1.clone()),
        });
        assert_eq!(client.take_sent(), b"t/nsping");
        assert!(client.take_posts().is_empty() && home.take_replies().is_empty());
    }
}
