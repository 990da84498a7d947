//! Channels (§1.5) and the methods that run on them: exchanges (§1.6), queues (§1.7), basic
//! (§1.8) and confirms (RabbitMQ's extension), mapped as `crate::topology` says.
//!
//! A method that needs the host before its reply (a declaration reads and writes the kv; a
//! binding reopens the queue's route) is a [`Task`]: while it runs, the connection decodes
//! no further frame, so methods complete in the order the client sent them, as AMQP
//! requires (§2.3.5: synchronous methods on a channel are answered in order). Publishing
//! and acknowledging never wait: a publish to a known exchange goes straight to the host.

use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hash, Hasher};

use magnetar_sdk::{
    decode_backlog, ConsumerSpec, ErrorKind, Message, OpError, OutboundMessage, Position, Property,
    RouteSpec, SubId, SubMode, TopicRef,
};

use super::*;
use crate::codec::properties::ContentHeader;
use crate::codec::BasicProperties;
use crate::queue_policy::{QueuePolicy, Reason};
use crate::topology::{self, Binding, Exchange, ExchangeType, Queue};

pub(super) mod purge;
mod tx;

/// Most unacknowledged deliveries a consumer without a prefetch limit holds.
const UNLIMITED_PREFETCH: u32 = 1000;
/// Most times a consumer is opened again while the queue's route still holds its
/// subscription (the route opened by a declaration closes asynchronously).
const CONSUME_ATTEMPTS: u32 = 50;
/// The wait between two of those tries.
const RETRY_MS: u64 = 20;

/// The state of one open channel.
#[derive(Debug, Default)]
pub(super) struct ChannelState {
    /// The server sent `channel.close`: frames are ignored until `close-ok`.
    closing: bool,
    /// `confirm.select` was received; the number of the last publish.
    confirm: bool,
    publish_seq: u64,
    /// `basic.qos` prefetch-count (0: none) of the consumers started from now on.
    prefetch: u16,
    /// `basic.qos` prefetch-count with `global` (0: none): RabbitMQ's limit of the
    /// unacknowledged deliveries of all the channel's consumers together.
    global_prefetch: u16,
    /// Messages the host handed the channel's consumers beyond that limit: delivered as
    /// acknowledgements open it again.
    pub(super) held: std::collections::VecDeque<Message>,
    /// A publish whose content is arriving.
    content: Option<Content>,
    /// Consumers by tag: their subscription.
    pub(super) consumers: BTreeMap<String, SubId>,
    /// The last delivery tag given.
    delivery_tag: u64,
    /// Delivered, not yet acknowledged, by delivery tag.
    unacked: BTreeMap<u64, Unacked>,
    /// `basic.get`'s consumers, by queue: messages wait here for the next `basic.get`.
    getters: BTreeMap<String, Getter>,
    /// After `tx.select`: the publishes and acknowledgements waiting for the commit.
    tx: Option<Box<tx::Tx>>,
}

impl ChannelState {
    /// Whether deliveries of `sub` wait for the client's ack on this channel.
    pub(super) fn holds(&self, sub: SubId) -> bool {
        self.unacked.values().any(|u| u.sub == sub)
    }
}

/// A delivery the client has not settled yet.
#[derive(Debug)]
struct Unacked {
    sub: SubId,
    delivery_id: u64,
    /// What dead-lettering takes, kept only for a queue with a dead-letter exchange.
    dead_letter: Option<Box<Delivered>>,
}

/// A delivered message as it would be dead-lettered.
#[derive(Debug, Clone)]
pub(super) struct Delivered {
    pub(super) exchange: String,
    pub(super) routing_key: String,
    pub(super) properties: Vec<u8>,
    pub(super) payload: Vec<u8>,
}

/// The consumers through which `basic.get` takes a queue's messages, one at a time (each
/// one's window is 1: its next message comes once the last one is settled): the first,
/// kept while the channel lives, and one more for each message the channel's gets hold
/// unacknowledged (RabbitMQ hands the next message meanwhile), each closed once the client
/// settled what it got through it.
#[derive(Debug, Default)]
struct Getter {
    sub: Option<SubId>,
    extra: Vec<SubId>,
    /// A consumer is being opened.
    opening: bool,
    ready: std::collections::VecDeque<Message>,
    policy: QueuePolicy,
    /// The queue's record as a get last read it, and when (`now_ms`): gets within
    /// [`GET_RECORD_FRESH_MS`] of that read use it instead of reading it again.
    record: Option<(Queue, u64)>,
}

impl Getter {
    fn subs(&self) -> impl Iterator<Item = SubId> + '_ {
        self.sub.iter().chain(&self.extra).copied()
    }
}

/// A `declare-ok` waiting for the queue's counts, both asked at once: its messages and its
/// consumers (`None` until each came).
#[derive(Debug)]
pub(crate) struct CountedReply {
    channel: u16,
    reply: Box<Method>,
    messages: Option<u32>,
    consumers: Option<u32>,
}

/// A `basic.get` waiting for a message or for its deadline (then `get-empty`).
#[derive(Debug, Clone)]
pub(crate) struct PendingGet {
    channel: u16,
    queue: String,
    no_ack: bool,
    timer: u64,
    /// The queue's count once it came (`Some(None)`: the host could not say); `get-ok`
    /// reports the messages left from it. A message waits for the count.
    count: Option<Option<u64>>,
}

/// A publish and its content so far (§4.2.6).
#[derive(Debug)]
struct Content {
    publish: BasicPublish,
    header: Option<ContentHeader>,
    body: Vec<u8>,
}

/// A consumer being opened.
#[derive(Debug, Clone)]
pub(crate) struct PendingConsume {
    channel: u16,
    tag: String,
    queue: String,
    no_ack: bool,
    no_wait: bool,
    prefetch: u32,
    attempts: u32,
    /// The queue's arguments, once read.
    policy: QueuePolicy,
    /// The queue, if it is auto-delete (deleted when its last consumer goes).
    auto_delete: Option<Queue>,
    /// The queue's `x-expires`.
    expires: Option<u64>,
    /// The queue's incarnation (`Queue::id`), watched while the consumer lasts.
    queue_id: Option<String>,
}

/// A `queue.purge` whose consumer is being opened (the queue's topic is purged by moving
/// its shared subscription to the end).
#[derive(Debug, Clone)]
pub(crate) struct PendingPurge {
    channel: u16,
    queue: String,
    no_wait: bool,
    attempts: u32,
    /// The queue's messages before the purge (`purge-ok`'s message_count).
    count: u64,
    /// Consumers hold the queue: its ready messages are taken and acknowledged one by one
    /// (`purge`), not skipped by a seek.
    drain: bool,
}

/// A channel method waiting for the host, with what it does next.
#[derive(Debug, Clone)]
pub(crate) enum Task {
    /// Read the exchange, then compare or store it.
    ExchangeDeclare {
        channel: u16,
        m: ExchangeDeclare,
    },
    /// The exchange's record was written.
    Reply {
        channel: u16,
        reply: Option<Box<Method>>,
    },
    /// Read the queue, then compare or store it.
    QueueDeclare {
        channel: u16,
        m: QueueDeclare,
        name: String,
    },
    /// Read the queue of a binding change.
    BindQueue {
        channel: u16,
        change: BindChange,
    },
    /// Read the exchange of a binding.
    BindExchange {
        channel: u16,
        change: BindChange,
        queue: Queue,
    },
    /// The queue's record was written: open its route with its filters.
    StoreRoute {
        channel: u16,
        name: String,
        queue: Queue,
        reply: Option<Box<Method>>,
    },
    /// The route is stored (`durable.store-route`): count the queue's messages, reply.
    RouteStored {
        channel: u16,
        name: String,
        reply: Option<Box<Method>>,
    },
    /// One of a `declare-ok`'s two counts ([`CountedReply`] `id`) came: the queue's
    /// consumers (`queues.consumer-count`) or its messages (`durable.queue-backlog`).
    Counted {
        id: u64,
        consumers: bool,
    },
    /// The queue's messages counted for the pending `basic.get` whose deadline is `timer`:
    /// none (the host counts once every copy of what was published before is in),
    /// `get-empty` at once (also when the channel's gets hold all it counts); some, the get
    /// waits for one of them (`GET_COUNTED_WAIT_MS`); unknown, as long as it did before
    /// counts.
    GetCount {
        timer: u64,
        /// The channel's first get of the queue (its consumer just opened).
        first: bool,
    },
    /// The queue of a `queue.delete` with `if-unused` or `if-empty` counted.
    ConditionCount(Box<super::delete::PendingDelete>),
    /// The queue's messages counted before its purge: open the purge's consumer.
    PurgeCount {
        purge: PendingPurge,
    },
    /// The queue's messages counted before it is deleted (`delete-ok`'s message_count).
    DeleteCount {
        channel: u16,
        m: QueueDelete,
        queue: Queue,
    },
    /// Read the queue to delete.
    QueueDelete {
        channel: u16,
        m: QueueDelete,
    },
    /// The deleted queue's record is gone: open its route to delete it with its backlog
    /// (tried again while consumers let go of it).
    DeleteRoute {
        channel: u16,
        name: String,
        queue: Queue,
        reply: Option<Box<Method>>,
        attempts: u32,
    },
    /// The record of a queue whose route this connection holds is gone: delete the route.
    DeleteHeld {
        channel: u16,
        sub: SubId,
        reply: Option<Box<Method>>,
    },
    /// `exchange.bind` / `unbind`: its source, then its destination, read.
    XBind(Box<super::exchange_bind::XBind>),
    /// Queue bindings derived again through exchange-to-exchange bindings.
    Propagate(Box<super::exchange_bind::Propagation>),
    /// Read the exchange of a publish.
    PublishExchange {
        channel: u16,
        content: ContentDone,
    },
    /// Read the queue of a consumer.
    ConsumeQueue {
        consume: PendingConsume,
    },
    /// An auto-delete queue's first consumer marked it `consumed`: go on with the consumer.
    ConsumeMarked {
        consume: PendingConsume,
        queue: Queue,
    },
    /// An auto-delete queue that had consumers, used by a connection that has none of them:
    /// its route opened (none left: it goes) or refused (it stays), then `task`.
    AutoDeleteProbe {
        task: Box<Task>,
        name: String,
        record: Vec<u8>,
    },
    /// The probed queue's record is deleted: its route goes with its backlog, then `task`.
    AutoDeleted {
        task: Box<Task>,
        sub: SubId,
    },
    /// The queue's route was stored again (so that this gateway feeds the queue, e.g. after
    /// a restart): open the consumer.
    ConsumeRoute {
        consume: PendingConsume,
    },
    /// Read the queue of a `basic.get`.
    GetQueue {
        channel: u16,
        m: BasicGet,
    },
    /// Read the queue to purge.
    PurgeQueue {
        channel: u16,
        m: QueuePurge,
    },
    /// Read the lease of the owner of an exclusive queue that `task` uses.
    OwnerLease {
        task: Box<Task>,
        name: String,
        queue: Queue,
    },
    /// The owner is gone: its queue's record was deleted; next its route, then `task`.
    Reaped {
        task: Box<Task>,
        name: String,
        queue: Queue,
    },
    ReapedRoute {
        task: Box<Task>,
    },
    /// Read when a queue with `x-expires` was last used, then go on with `task`.
    ExpiryCheck {
        task: Box<Task>,
        name: String,
        queue: Queue,
        record: Vec<u8>,
    },
    /// This connection's lease was written: store the exclusive queue it declares.
    PutQueue {
        channel: u16,
        name: String,
        queue: Queue,
        reply: Option<Box<Method>>,
    },
    /// Read the queues, for a `mandatory` publish: does one take it?
    Mandatory {
        channel: u16,
        content: ContentDone,
        kind: ExchangeType,
        routable: bool,
    },
}

/// How long `basic.get` waits for a message, once its queue is counted, before it answers
/// `get-empty`: for one the queue counts (stored, so it comes unless other consumers hold
/// every counted message: long enough for a loaded machine), for the first get of a queue
/// on a channel (its consumer just opened) that could not count it, and for a later get
/// that could not.
const GET_COUNTED_WAIT_MS: u64 = 2_000;
pub(super) const GET_FIRST_WAIT_MS: u64 = 500;
const GET_WAIT_MS: u64 = 100;
/// How long a channel's gets of a queue trust the queue's record they last read: as long as
/// the consumers of a queue another connection deleted take to learn it
/// ([`super::lifetime::WATCH_MS`]).
pub(super) const GET_RECORD_FRESH_MS: u64 = super::lifetime::WATCH_MS;
/// How long `basic.get` waits for the queue's count (the host's waits up to 5 s for the
/// feeders' copies).
const GET_COUNT_WAIT_MS: u64 = 10_000;
/// A queue's count from `durable.queue-backlog`'s outcome; `None` if the host could not say.
/// What the name of every `basic.consume` consumer starts with (then its consumer tag), so
/// that a queue's consumer count (`queues.consumer-count`) leaves out the plugin's other
/// readers of the queue (`basic.get`'s, sweeps, purges, probes) and the host's.
pub(super) const CONSUMER_NAME_PREFIX: &str = "amqp-consumer:";

fn count_of(r: Result<Option<Vec<u8>>, OpError>) -> Option<u64> {
    r.ok().and_then(|v| decode_backlog(v.as_deref()))
}

/// Queue records read per kv scan.
const SCAN_LIMIT: u32 = 1000;

/// A binding being added (`bind`) or removed.
#[derive(Debug, Clone)]
pub(crate) struct BindChange {
    queue: String,
    exchange: String,
    routing_key: String,
    arguments: FieldTable,
    bind: bool,
    no_wait: bool,
}

/// A whole message, ready to publish.
#[derive(Debug, Clone)]
pub(crate) struct ContentDone {
    publish: BasicPublish,
    header: ContentHeader,
    body: Vec<u8>,
}

/// What a host operation answered.
pub(crate) enum Outcome {
    Kv(Result<Option<Vec<u8>>, OpError>),
    Sub(Result<SubId, OpError>),
    Scan(Result<Vec<magnetar_sdk::KvEntry>, OpError>),
}

impl Task {
    /// For a task that reads a queue's record before it uses the queue: its channel, the
    /// queue, and the method that uses it.
    fn queue_access(&self) -> Option<(u16, &str, Method)> {
        Some(match self {
            Task::QueueDeclare { channel, m, name } => {
                (*channel, name.as_str(), Method::QueueDeclare(m.clone()))
            }
            Task::BindQueue { channel, change } => (
                *channel,
                change.queue.as_str(),
                if change.bind {
                    Method::QueueBind(QueueBind::default())
                } else {
                    Method::QueueUnbind(QueueUnbind::default())
                },
            ),
            Task::QueueDelete { channel, m } => {
                (*channel, m.queue.as_str(), Method::QueueDelete(m.clone()))
            }
            Task::ConsumeQueue { consume } => (
                consume.channel,
                consume.queue.as_str(),
                Method::BasicConsume(BasicConsume::default()),
            ),
            Task::PurgeQueue { channel, m } => {
                (*channel, m.queue.as_str(), Method::QueuePurge(m.clone()))
            }
            Task::GetQueue { channel, m } => {
                (*channel, m.queue.as_str(), Method::BasicGet(m.clone()))
            }
            _ => return None,
        })
    }
}

/// A channel error's text in RabbitMQ's words for a vhost.
fn vhost_text(what: &str) -> String {
    format!("{what} in vhost '/'")
}

impl AmqpConnection {
    pub(super) fn on_channel_frame(&mut self, frame: Frame) {
        let channel = match &frame {
            Frame::Method(c, _) | Frame::Header(c, _) | Frame::Body(c, _) => *c,
            Frame::Heartbeat => return,
        };
        let Some(state) = self.channels.get_mut(&channel) else {
            return match frame {
                Frame::Method(_, Method::ChannelOpen(_)) => self.open_channel(channel),
                Frame::Method(_, m) => {
                    let e = ConnError::new(
                        CHANNEL_ERROR,
                        format!("expected 'channel.open' on channel {channel}"),
                    );
                    self.close_connection(e.caused_by(&m));
                }
                _ => self.close_connection(ConnError::new(
                    CHANNEL_ERROR,
                    format!("expected 'channel.open' on channel {channel}"),
                )),
            };
        };
        if state.closing {
            match frame {
                Frame::Method(_, Method::ChannelCloseOk(_)) => {
                    self.channels.remove(&channel);
                }
                Frame::Method(_, Method::ChannelClose(_)) => {
                    self.send_method(channel, Method::ChannelCloseOk(ChannelCloseOk {}));
                }
                _ => {}
            }
            return;
        }
        match frame {
            Frame::Method(_, m) => {
                if state.content.is_some() {
                    let e = ConnError::new(
                        UNEXPECTED_FRAME,
                        format!(
                            "expected content header for class 60, got non content header frame instead ({})",
                            m.name()
                        ),
                    );
                    return self.close_connection(e.caused_by(&m));
                }
                self.on_channel_method(channel, m)
            }
            Frame::Header(_, h) => self.on_content_header(channel, h),
            Frame::Body(_, b) => self.on_content_body(channel, b),
            Frame::Heartbeat => {}
        }
    }

    fn open_channel(&mut self, channel: u16) {
        if channel > self.channel_max {
            let e = ConnError::new(
                NOT_ALLOWED,
                format!(
                    "number of channels opened ({channel}) has reached the negotiated channel_max ({})",
                    self.channel_max
                ),
            );
            return self.close_connection(e);
        }
        self.channels.insert(channel, ChannelState::default());
        self.send_method(
            channel,
            Method::ChannelOpenOk(ChannelOpenOk {
                reserved_1: Vec::new(),
            }),
        );
    }

    /// Sends `channel.close` (a channel error, §1.5.2.5): the channel ignores frames until
    /// `channel.close-ok`; the connection and its other channels go on.
    pub(super) fn close_channel(&mut self, channel: u16, e: ConnError) {
        self.drop_consumers(channel);
        self.send_method(
            channel,
            Method::ChannelClose(ChannelClose {
                reply_code: e.code,
                reply_text: e.text,
                class_id: e.cause.0,
                method_id: e.cause.1,
            }),
        );
        if let Some(state) = self.channels.get_mut(&channel) {
            *state = ChannelState {
                closing: true,
                ..Default::default()
            };
        }
    }

    /// Ends the channel's consumers: their unacknowledged messages go back to the queue.
    pub(super) fn drop_consumers(&mut self, channel: u16) {
        let Some(state) = self.channels.get_mut(&channel) else {
            return;
        };
        let consumers: Vec<SubId> = state.consumers.values().copied().collect();
        let getters: Vec<SubId> = state.getters.values().flat_map(Getter::subs).collect();
        state.consumers.clear();
        state.getters.clear();
        state.unacked.clear();
        state.held.clear();
        for sub in consumers {
            self.end_consumer(sub, false);
        }
        let draining: Vec<SubId> = self
            .draining
            .iter()
            .filter(|(_, c)| **c == channel)
            .map(|(s, _)| *s)
            .collect();
        for sub in draining {
            self.end_draining(sub);
        }
        for sub in getters {
            self.getters.remove(&sub);
            self.policies.remove(&sub);
            self.out.push(Action::Unsubscribe { sub, delete: false });
        }
    }

    pub(super) fn reply(&mut self, channel: u16, reply: Option<Box<Method>>) {
        if let Some(m) = reply {
            self.send_method(channel, *m);
        }
    }

    /// [`Self::reply`] with the queue `name`'s messages counted first (`declare-ok`'s
    /// message_count: those not acknowledged yet, as the backend counts them).
    pub(super) fn reply_counted(&mut self, channel: u16, reply: Option<Box<Method>>, name: &str) {
        let Some(reply) = reply else {
            return;
        };
        let id = self.ops.token();
        self.counted_replies.insert(
            id,
            CountedReply {
                channel,
                reply,
                messages: None,
                consumers: None,
            },
        );
        self.wait_count(
            name,
            Task::Counted {
                id,
                consumers: false,
            },
        );
        let token = self.ops.start(Op::Task(Task::Counted {
            id,
            consumers: true,
        }));
        self.out.push(Action::ConsumerCount {
            token,
            queue: topology::queue_topic(name),
            prefix: CONSUMER_NAME_PREFIX.into(),
        });
    }

    /// Counts the queue `name` (`durable.queue-backlog`); `task` goes on with the count.
    pub(super) fn wait_count(&mut self, name: &str, task: Task) {
        let token = self.ops.start(Op::Task(task));
        self.out.push(Action::QueueBacklog {
            token,
            queue: topology::queue_topic(name),
        });
        self.busy = true;
    }

    /// Starts a host operation that the channel method waits for.
    pub(super) fn wait_kv_get(&mut self, key: String, task: Task) {
        let token = self.ops.start(Op::Task(task));
        self.out.push(Action::KvGet { token, key });
        self.busy = true;
    }

    pub(super) fn wait_kv_put(&mut self, key: String, value: Option<Vec<u8>>, task: Task) {
        let token = self.ops.start(Op::Task(task));
        self.out.push(Action::KvPut { token, key, value });
        self.busy = true;
    }

    /// Stores the queue's durable route with its filters and cap, with no reader of the
    /// queue (`durable.store-route`): the host feeds the queue from then on, and nothing of
    /// it is read (so no message is redelivered, and the queue's consumers may hold its
    /// subscription meanwhile). Completes as a kv write (`Outcome::Kv`).
    pub(super) fn store_route(&mut self, name: &str, queue: &Queue, task: Task) {
        let token = self.ops.start(Op::Task(task));
        self.out.push(Action::StoreRoute {
            token,
            spec: queue_route(name, queue),
            cap: crate::queue_policy::cap(queue),
        });
        self.busy = true;
    }

    /// Opens the queue's durable route (a reader of the queue, refused while consumers
    /// hold its subscription): to delete the queue with it. Completes with `Outcome::Sub`.
    pub(super) fn open_queue_route(&mut self, name: &str, queue: &Queue, task: Task) {
        let token = self.ops.start(Op::Task(task));
        self.out.push(queue_route_action(token, name, queue));
        self.busy = true;
    }

    fn on_channel_method(&mut self, channel: u16, m: Method) {
        match m {
            Method::ChannelOpen(_) => {
                let e = ConnError::new(CHANNEL_ERROR, "second 'channel.open' seen");
                self.close_connection(e.caused_by(&m));
            }
            Method::ChannelClose(_) => {
                self.drop_consumers(channel);
                self.channels.remove(&channel);
                self.send_method(channel, Method::ChannelCloseOk(ChannelCloseOk {}));
            }
            Method::ChannelCloseOk(_) => {}
            // RabbitMQ does not stop deliveries by flow control: 540, a connection error.
            Method::ChannelFlow(ChannelFlow { active: false }) => {
                let e = ConnError::new(NOT_IMPLEMENTED, "active=false");
                self.close_connection(e.caused_by(&m));
            }
            Method::ChannelFlow(f) => {
                self.send_method(
                    channel,
                    Method::ChannelFlowOk(ChannelFlowOk { active: f.active }),
                );
            }
            Method::ConfirmSelect(_)
                if self.channels.get(&channel).is_some_and(|s| s.tx.is_some()) =>
            {
                let e =
                    ConnError::new(PRECONDITION_FAILED, "cannot switch from tx to confirm mode");
                self.close_channel(channel, e.caused_by(&m));
            }
            Method::TxSelect(_) | Method::TxCommit(_) | Method::TxRollback(_) => {
                self.tx_method(channel, m)
            }
            Method::ConfirmSelect(c) => {
                if let Some(state) = self.channels.get_mut(&channel) {
                    state.confirm = true;
                }
                if !c.no_wait {
                    self.send_method(channel, Method::ConfirmSelectOk(ConfirmSelectOk {}));
                }
            }
            Method::BasicQos(q) => {
                // RabbitMQ (`per_consumer_qos`): without `global`, prefetch_count applies to
                // each consumer started afterwards on the channel (the default in every
                // client); with `global`, to the channel's consumers together, at once.
                if let Some(state) = self.channels.get_mut(&channel) {
                    if q.global {
                        state.global_prefetch = q.prefetch_count;
                    } else {
                        state.prefetch = q.prefetch_count;
                    }
                }
                self.send_method(channel, Method::BasicQosOk(BasicQosOk {}));
                self.deliver_held(channel);
            }
            Method::ExchangeDeclare(d) => self.exchange_declare(channel, d),
            Method::ExchangeDelete(d) => {
                if topology::predeclared(&d.exchange).is_some() || d.exchange.starts_with("amq.") {
                    let e = ConnError::new(
                        ACCESS_REFUSED,
                        format!(
                            "operation not permitted on the default exchange or {}",
                            vhost_text(&format!("exchange '{}'", d.exchange))
                        ),
                    );
                    return self.close_channel(channel, e.caused_by(&Method::ExchangeDelete(d)));
                }
                self.exchange_delete(channel, d.exchange, d.if_unused, d.no_wait);
            }
            Method::QueueDeclare(d) => self.queue_declare(channel, d),
            Method::ExchangeBind(_) | Method::ExchangeUnbind(_) => self.exchange_bind(channel, m),
            Method::QueueBind(b) => {
                let change = BindChange {
                    queue: b.queue,
                    exchange: b.exchange,
                    routing_key: b.routing_key,
                    arguments: b.arguments,
                    bind: true,
                    no_wait: b.no_wait,
                };
                self.bind_change(channel, change);
            }
            Method::QueueUnbind(b) => {
                let change = BindChange {
                    queue: b.queue,
                    exchange: b.exchange,
                    routing_key: b.routing_key,
                    arguments: b.arguments,
                    bind: false,
                    no_wait: false,
                };
                self.bind_change(channel, change);
            }
            Method::QueueDelete(d) => {
                let key = topology::queue_key(&d.queue);
                self.wait_kv_get(key, Task::QueueDelete { channel, m: d });
            }
            Method::QueuePurge(p) => {
                let key = topology::queue_key(&p.queue);
                self.wait_kv_get(key, Task::PurgeQueue { channel, m: p });
            }
            Method::BasicPublish(p) => {
                if let Some(state) = self.channels.get_mut(&channel) {
                    state.content = Some(Content {
                        publish: p,
                        header: None,
                        body: Vec::new(),
                    });
                }
            }
            Method::BasicConsume(c) => self.basic_consume(channel, c),
            Method::BasicGet(g) => {
                if let Some(queue) = self.fresh_get_record(channel, &g.queue) {
                    self.queue_used(&g.queue, &queue);
                    let policy = QueuePolicy::of(&g.queue, &queue);
                    return self.basic_get(channel, g.queue, g.no_ack, policy);
                }
                let key = topology::queue_key(&g.queue);
                self.wait_kv_get(key, Task::GetQueue { channel, m: g });
            }
            Method::BasicCancel(c) => {
                let sub = self
                    .channels
                    .get_mut(&channel)
                    .and_then(|s| s.consumers.remove(&c.consumer_tag));
                if let Some(sub) = sub {
                    self.cancel_consumer(channel, sub);
                }
                if !c.no_wait {
                    self.send_method(
                        channel,
                        Method::BasicCancelOk(BasicCancelOk {
                            consumer_tag: c.consumer_tag,
                        }),
                    );
                }
            }
            // The answer to the server's `basic.cancel` (a deleted queue's consumer).
            Method::BasicCancelOk(_) => {}
            Method::BasicAck(ref a) => {
                let (tag, multiple) = (a.delivery_tag, a.multiple);
                self.settle(channel, tag, multiple, None, &m)
            }
            Method::BasicNack(ref n) => {
                let (tag, multiple, requeue) = (n.delivery_tag, n.multiple, n.requeue);
                self.settle(channel, tag, multiple, Some(requeue), &m)
            }
            Method::BasicReject(ref r) => {
                let (tag, requeue) = (r.delivery_tag, r.requeue);
                self.settle(channel, tag, false, Some(requeue), &m)
            }
            // RabbitMQ redelivers every unacknowledged message of the channel, and does not
            // implement recovering without requeue (540, a connection error).
            Method::BasicRecover(BasicRecover { requeue: false })
            | Method::BasicRecoverAsync(BasicRecoverAsync { requeue: false }) => {
                let e = ConnError::new(NOT_IMPLEMENTED, "requeue=false");
                self.close_connection(e.caused_by(&m));
            }
            Method::BasicRecover(_) | Method::BasicRecoverAsync(_) => {
                if let Some(state) = self.channels.get_mut(&channel) {
                    let unacked = std::mem::take(&mut state.unacked);
                    self.apply_settle(unacked.into_values(), Some(true));
                }
                self.deliver_held(channel);
                if matches!(m, Method::BasicRecover(_)) {
                    self.send_method(channel, Method::BasicRecoverOk(BasicRecoverOk {}));
                }
            }
            other => {
                let e = ConnError::new(
                    NOT_IMPLEMENTED,
                    format!("{} is not supported by this gateway yet", other.name()),
                );
                self.close_connection(e.caused_by(&other));
            }
        }
    }

    fn exchange_declare(&mut self, channel: u16, d: ExchangeDeclare) {
        let cause = Method::ExchangeDeclare(d.clone());
        let Some(kind) = ExchangeType::parse(&d.kind) else {
            // RabbitMQ: an unknown type is a connection error.
            let e = ConnError::new(
                COMMAND_INVALID,
                format!("invalid exchange type '{}'", d.kind),
            );
            return self.close_connection(e.caused_by(&cause));
        };
        if let Some(x) = topology::predeclared(&d.exchange) {
            return self.exchange_declared(channel, d, Some(x), kind);
        }
        if d.exchange.starts_with("amq.") && !d.passive {
            let e = ConnError::new(
                ACCESS_REFUSED,
                format!(
                    "exchange name '{}' contains reserved prefix 'amq.*'",
                    d.exchange
                ),
            );
            return self.close_channel(channel, e.caused_by(&cause));
        }
        let key = topology::exchange_key(&d.exchange);
        self.wait_kv_get(key, Task::ExchangeDeclare { channel, m: d });
    }

    /// An exchange declaration, with the exchange as it exists (if it does).
    fn exchange_declared(
        &mut self,
        channel: u16,
        d: ExchangeDeclare,
        existing: Option<Exchange>,
        kind: ExchangeType,
    ) {
        let cause = Method::ExchangeDeclare(d.clone());
        let reply = (!d.no_wait).then(|| Box::new(Method::ExchangeDeclareOk(ExchangeDeclareOk {})));
        match existing {
            None if d.passive => {
                let e = ConnError::new(
                    NOT_FOUND,
                    format!("no exchange '{}' in vhost '/'", d.exchange),
                );
                self.close_channel(channel, e.caused_by(&cause));
            }
            None => {
                let x = Exchange {
                    kind,
                    durable: d.durable,
                    auto_delete: d.auto_delete,
                    internal: d.internal,
                    sources: Vec::new(),
                };
                self.wait_kv_put(
                    topology::exchange_key(&d.exchange),
                    Some(x.encode()),
                    Task::Reply { channel, reply },
                );
            }
            Some(_) if d.passive => self.reply(channel, reply),
            Some(x) => {
                let what = format!("exchange '{}'", d.exchange);
                let mismatch = if x.kind != kind {
                    Some(("type", kind.name().to_string(), x.kind.name().to_string()))
                } else if x.durable != d.durable {
                    Some(("durable", d.durable.to_string(), x.durable.to_string()))
                } else if x.auto_delete != d.auto_delete {
                    Some((
                        "auto_delete",
                        d.auto_delete.to_string(),
                        x.auto_delete.to_string(),
                    ))
                } else {
                    None
                };
                match mismatch {
                    Some((arg, received, current)) => {
                        let e = ConnError::new(
                            PRECONDITION_FAILED,
                            format!(
                                "inequivalent arg '{arg}' for {}: received '{received}' but current is '{current}'",
                                vhost_text(&what)
                            ),
                        );
                        self.close_channel(channel, e.caused_by(&cause));
                    }
                    None => self.reply(channel, reply),
                }
            }
        }
    }

    fn queue_declare(&mut self, channel: u16, d: QueueDeclare) {
        let name = if d.queue.is_empty() {
            self.server_named_queue()
        } else {
            d.queue.clone()
        };
        if name.starts_with("amq.") && !d.passive && !d.queue.is_empty() {
            let e = ConnError::new(
                ACCESS_REFUSED,
                format!("queue name '{name}' contains reserved prefix 'amq.*'"),
            );
            return self.close_channel(channel, e.caused_by(&Method::QueueDeclare(d)));
        }
        if let Some((arg, why)) = crate::queue_policy::invalid_argument(&d.arguments) {
            let e = ConnError::new(
                PRECONDITION_FAILED,
                format!(
                    "invalid arg '{arg}' for {}: {why}",
                    vhost_text(&format!("queue '{name}'"))
                ),
            );
            return self.close_channel(channel, e.caused_by(&Method::QueueDeclare(d)));
        }
        let key = topology::queue_key(&name);
        self.wait_kv_get(
            key,
            Task::QueueDeclare {
                channel,
                m: d,
                name,
            },
        );
    }

    /// `amq.gen-` and 22 characters, as RabbitMQ names them.
    fn server_named_queue(&mut self) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        self.names_given += 1;
        let mut out = String::from("amq.gen-");
        let mut n = 0u64;
        for i in 0..22u64 {
            if i % 8 == 0 {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                (self.name_seed, self.names_given, i, self.now_ms).hash(&mut h);
                n = h.finish();
            }
            out.push(char::from(ALPHABET[(n % 64) as usize]));
            n /= 64;
        }
        out
    }

    fn bind_change(&mut self, channel: u16, change: BindChange) {
        let key = topology::queue_key(&change.queue);
        self.wait_kv_get(key, Task::BindQueue { channel, change });
    }

    fn basic_consume(&mut self, channel: u16, c: BasicConsume) {
        let Some(state) = self.channels.get_mut(&channel) else {
            return;
        };
        let tag = if c.consumer_tag.is_empty() {
            format!(
                "amq.ctag-{}-{}",
                self.name_seed % 1_000_000,
                state.consumers.len() + 1
            )
        } else {
            c.consumer_tag.clone()
        };
        if state.consumers.contains_key(&tag) {
            let e = ConnError::new(
                NOT_ALLOWED,
                format!("attempt to reuse consumer tag '{tag}'"),
            );
            return self.close_connection(e.caused_by(&Method::BasicConsume(c)));
        }
        let prefetch = match state.prefetch {
            0 => UNLIMITED_PREFETCH,
            n => u32::from(n),
        };
        // The host hands one consumer no more than the channel may hold.
        let prefetch = match state.global_prefetch {
            0 => prefetch,
            n => prefetch.min(u32::from(n)),
        };
        let consume = PendingConsume {
            channel,
            tag,
            queue: c.queue.clone(),
            no_ack: c.no_ack,
            no_wait: c.no_wait,
            prefetch,
            attempts: 0,
            policy: QueuePolicy::default(),
            auto_delete: None,
            expires: None,
            queue_id: None,
        };
        let key = topology::queue_key(&c.queue);
        self.wait_kv_get(key, Task::ConsumeQueue { consume });
    }

    fn open_consumer(&mut self, consume: PendingConsume) {
        let token = self.ops.start(Op::Consume(consume.clone()));
        self.out.push(Action::OpenConsumer {
            token,
            spec: queue_consumer(
                topology::queue_topic(&consume.queue),
                consume.prefetch,
                Some(format!("{CONSUMER_NAME_PREFIX}{}", consume.tag)),
            ),
        });
        self.busy = true;
    }

    pub(super) fn on_consume_result(
        &mut self,
        mut c: PendingConsume,
        result: Result<SubId, OpError>,
    ) {
        match result {
            Ok(sub) => {
                self.busy = false;
                let Some(state) = self.channels.get_mut(&c.channel).filter(|s| !s.closing) else {
                    self.out.push(Action::Unsubscribe { sub, delete: false });
                    return;
                };
                state.consumers.insert(c.tag.clone(), sub);
                self.consumers
                    .insert(sub, (c.channel, c.tag.clone(), c.no_ack, c.queue.clone()));
                self.policies.insert(sub, c.policy.clone());
                if let Some(q) = c.auto_delete.take() {
                    self.auto_delete.insert(c.queue.clone(), q);
                }
                if let Some(expires) = c.expires {
                    self.consuming_expiring(&c.queue, expires);
                }
                self.watch_queue(&c.queue, c.queue_id.take());
                if !c.no_wait {
                    self.send_method(
                        c.channel,
                        Method::BasicConsumeOk(BasicConsumeOk {
                            consumer_tag: c.tag,
                        }),
                    );
                }
            }
            // The route a declaration opened may still hold the queue's subscription.
            Err(e) if e.kind == ErrorKind::Backend && c.attempts < CONSUME_ATTEMPTS => {
                c.attempts += 1;
                self.open_again_soon(Op::Consume(c));
            }
            Err(e) => {
                self.busy = false;
                let ch = c.channel;
                let err = ConnError::new(INTERNAL_ERROR, format!("consumer: {}", e.message));
                self.close_channel(ch, err);
            }
        }
    }

    /// A short wait ([`RETRY_MS`]), then the consumer of `op` (a consume, a get, a purge)
    /// is opened again (`on_retry`).
    pub(super) fn open_again_soon(&mut self, op: Op) {
        let token = self.ops.start(op);
        self.out.push(Action::SetTimer {
            token,
            delay_ms: RETRY_MS,
        });
    }

    /// A consumer's retry timer fired.
    pub(super) fn on_retry(&mut self, token: u64) -> bool {
        match self.ops.get(token) {
            Some(Op::Consume(_)) => {
                if let Some(Op::Consume(c)) = self.ops.complete(token) {
                    self.open_consumer(c);
                }
                true
            }
            Some(Op::Purge(_)) => {
                if let Some(Op::Purge(p)) = self.ops.complete(token) {
                    self.open_purge_consumer(p);
                }
                true
            }
            Some(Op::Getter { .. }) => {
                if let Some(Op::Getter {
                    channel,
                    queue,
                    attempts,
                }) = self.ops.complete(token)
                {
                    self.open_getter(channel, queue, attempts);
                }
                true
            }
            _ => false,
        }
    }

    /// The next step of a task, with what the host answered.
    pub(super) fn step(&mut self, task: Task, outcome: Outcome) {
        self.busy = false;
        if let (Some((_, name, _)), Outcome::Kv(Ok(Some(bytes)))) = (task.queue_access(), &outcome)
        {
            if let Some(q) = Queue::decode(bytes) {
                let name = name.to_string();
                // Another connection's exclusive queue: is its owner alive?
                if let Some(owner) = self.owned_by_other(&q) {
                    let task = Box::new(task);
                    let key = topology::lease_key(&owner);
                    return self.wait_kv_get(
                        key,
                        Task::OwnerLease {
                            task,
                            name,
                            queue: q,
                        },
                    );
                }
                // An auto-delete queue whose consumers may all be gone without a word.
                if q.auto_delete && q.consumed && !self.consumes(&name) {
                    let record = bytes.clone();
                    let route = |token| queue_route_action(token, &name, &q);
                    let task = Box::new(task);
                    let token = self.ops.start(Op::Task(Task::AutoDeleteProbe {
                        task,
                        name: name.clone(),
                        record,
                    }));
                    self.out.push(route(token));
                    self.busy = true;
                    return;
                }
                // A queue with `x-expires`: has it been unused for that long?
                if crate::queue_policy::expires(&q).is_some() {
                    let record = bytes.clone();
                    let key = topology::expiry_key(&name);
                    let task = Box::new(task);
                    return self.wait_kv_get(
                        key,
                        Task::ExpiryCheck {
                            task,
                            name,
                            queue: q,
                            record,
                        },
                    );
                }
            }
        }
        self.step_checked(task, outcome);
    }

    /// [`Self::step`] once the queue the task uses is known to be there for it.
    pub(super) fn step_checked(&mut self, task: Task, outcome: Outcome) {
        let failed = |s: &mut Self, channel: u16, e: &OpError| {
            let err = ConnError::new(INTERNAL_ERROR, e.message.clone());
            s.close_channel(channel, err);
        };
        match (task, outcome) {
            (
                Task::ExpiryCheck {
                    task,
                    name,
                    queue,
                    record,
                },
                Outcome::Kv(r),
            ) => {
                let until = match r {
                    Ok(v) => v.as_deref().and_then(topology::lease_until),
                    Err(e) => {
                        let channel = task.queue_access().map_or(0, |a| a.0);
                        return failed(self, channel, &e);
                    }
                };
                if until.is_some_and(|t| t <= self.now_ms) {
                    // Unused for its `x-expires`: gone, as RabbitMQ would have deleted it.
                    self.put_expiry(&name, None);
                    return self.wait_kv_put(
                        topology::queue_key(&name),
                        None,
                        Task::Reaped { task, name, queue },
                    );
                }
                self.step_checked(*task, Outcome::Kv(Ok(Some(record))));
            }
            (Task::OwnerLease { task, name, queue }, Outcome::Kv(r)) => {
                let Some((channel, _, cause)) = task.queue_access() else {
                    return;
                };
                let alive = match r {
                    Ok(v) => v
                        .as_deref()
                        .and_then(topology::lease_until)
                        .is_some_and(|until| until > self.now_ms),
                    Err(e) => return failed(self, channel, &e),
                };
                if alive {
                    let e = ConnError::new(RESOURCE_LOCKED, lifetime::locked_text(&name));
                    return self.close_channel(channel, e.caused_by(&cause));
                }
                // Its connection is gone, so is the queue (as in RabbitMQ): deleted, then
                // the method goes on without it.
                self.wait_kv_put(
                    topology::queue_key(&name),
                    None,
                    Task::Reaped { task, name, queue },
                );
            }
            (Task::Reaped { task, name, queue }, Outcome::Kv(_)) => {
                self.open_queue_route(&name, &queue, Task::ReapedRoute { task });
            }
            (task, outcome @ Outcome::Sub(_)) if matches!(task, Task::AutoDeleteProbe { .. }) => {
                self.on_auto_delete_probe(task, outcome)
            }
            (Task::AutoDeleted { task, sub }, Outcome::Kv(_)) => {
                self.out.push(Action::Unsubscribe { sub, delete: true });
                self.step(*task, Outcome::Kv(Ok(None)));
            }
            (Task::ConsumeMarked { consume, queue }, Outcome::Kv(r)) => match r {
                Ok(_) => {
                    let name = consume.queue.clone();
                    self.store_route(&name, &queue, Task::ConsumeRoute { consume });
                }
                Err(e) => failed(self, consume.channel, &e),
            },
            (Task::ReapedRoute { task }, Outcome::Sub(r)) => {
                if let Ok(sub) = r {
                    self.out.push(Action::Unsubscribe { sub, delete: true });
                }
                self.step(*task, Outcome::Kv(Ok(None)));
            }
            (
                Task::PutQueue {
                    channel,
                    name,
                    queue,
                    reply,
                },
                Outcome::Kv(r),
            ) => match r {
                Ok(_) => {
                    self.lease_started();
                    let value = queue.encode();
                    self.wait_kv_put(
                        topology::queue_key(&name),
                        Some(value),
                        Task::StoreRoute {
                            channel,
                            name,
                            queue,
                            reply,
                        },
                    );
                }
                Err(e) => failed(self, channel, &e),
            },
            (Task::ExchangeDeclare { channel, m }, Outcome::Kv(r)) => match r {
                Ok(v) => {
                    let existing = v.as_deref().and_then(Exchange::decode);
                    let kind = ExchangeType::parse(&m.kind).unwrap_or(ExchangeType::Direct);
                    self.exchange_declared(channel, m, existing, kind);
                }
                Err(e) => failed(self, channel, &e),
            },
            (Task::Reply { channel, reply }, Outcome::Kv(r)) => match r {
                Ok(_) => self.reply(channel, reply),
                Err(e) => failed(self, channel, &e),
            },
            (Task::QueueDeclare { channel, m, name }, Outcome::Kv(r)) => {
                let existing = match r {
                    Ok(v) => v.as_deref().and_then(Queue::decode),
                    Err(e) => return failed(self, channel, &e),
                };
                let cause = Method::QueueDeclare(m.clone());
                let reply = (!m.no_wait).then(|| {
                    Box::new(Method::QueueDeclareOk(QueueDeclareOk {
                        queue: name.clone(),
                        message_count: 0,
                        consumer_count: 0,
                    }))
                });
                match existing {
                    None if m.passive => {
                        let e =
                            ConnError::new(NOT_FOUND, vhost_text(&format!("no queue '{name}'")));
                        self.close_channel(channel, e.caused_by(&cause));
                    }
                    None => {
                        let incarnation = self.ops.token();
                        let queue = Queue {
                            durable: m.durable,
                            exclusive: m.exclusive,
                            auto_delete: m.auto_delete,
                            arguments: m.arguments.clone(),
                            bindings: Vec::new(),
                            owner: m.exclusive.then(|| self.conn_id().to_string()),
                            id: Some(format!("{}-{incarnation}", self.conn_id())),
                            consumed: false,
                        };
                        self.queue_used(&name, &queue);
                        if m.exclusive {
                            self.owned.insert(name.clone(), queue.clone());
                            if self.lease_timer.is_none() {
                                // The lease first: nobody may see the queue without it.
                                return self.wait_kv_put(
                                    topology::lease_key(self.conn_id()),
                                    Some(self.lease_value()),
                                    Task::PutQueue {
                                        channel,
                                        name,
                                        queue,
                                        reply,
                                    },
                                );
                            }
                        }
                        let value = queue.encode();
                        self.wait_kv_put(
                            topology::queue_key(&name),
                            Some(value),
                            Task::StoreRoute {
                                channel,
                                name,
                                queue,
                                reply,
                            },
                        );
                    }
                    // A passive declaration is a use too (RabbitMQ's `stat` resets the
                    // queue's expiry timer).
                    Some(q) if m.passive => {
                        self.queue_used(&name, &q);
                        self.reply_counted(channel, reply, &name)
                    }
                    // RabbitMQ's strict check: `exclusive` must be what the queue has.
                    Some(q) if q.exclusive != m.exclusive => {
                        let e = ConnError::new(RESOURCE_LOCKED, lifetime::locked_text(&name));
                        self.close_channel(channel, e.caused_by(&cause));
                    }
                    Some(q) => {
                        let mismatch = if q.durable != m.durable {
                            Some(("durable", m.durable, q.durable))
                        } else if q.auto_delete != m.auto_delete {
                            Some(("auto_delete", m.auto_delete, q.auto_delete))
                        } else {
                            None
                        };
                        match mismatch {
                            Some((arg, received, current)) => {
                                let e = ConnError::new(
                                    PRECONDITION_FAILED,
                                    format!(
                                        "inequivalent arg '{arg}' for {}: received '{received}' but current is '{current}'",
                                        vhost_text(&format!("queue '{name}'"))
                                    ),
                                );
                                self.close_channel(channel, e.caused_by(&cause));
                            }
                            // Declared again: its route is opened again, which also
                            // starts feeding the queue on a gateway that just started.
                            None => {
                                self.queue_used(&name, &q);
                                let task = Task::RouteStored {
                                    channel,
                                    name: name.clone(),
                                    reply,
                                };
                                self.store_route(&name, &q, task)
                            }
                        }
                    }
                }
            }
            (
                Task::StoreRoute {
                    channel,
                    name,
                    queue,
                    reply,
                },
                Outcome::Kv(r),
            ) => match r {
                // A new queue: nothing to count (`name` empty).
                Ok(_) => {
                    let task = Task::RouteStored {
                        channel,
                        name: String::new(),
                        reply,
                    };
                    self.store_route(&name, &queue, task)
                }
                Err(e) => failed(self, channel, &e),
            },
            (
                Task::RouteStored {
                    channel,
                    name,
                    reply,
                },
                Outcome::Kv(r),
            ) => match r {
                Ok(_) if name.is_empty() => self.reply(channel, reply),
                Ok(_) => self.reply_counted(channel, reply, &name),
                Err(e) => failed(self, channel, &e),
            },
            (Task::Counted { id, consumers }, Outcome::Kv(r)) => {
                // Unknown (the backend, or no admin API, could not say): 0, as before
                // counts were read.
                let count = u32::try_from(count_of(r).unwrap_or(0)).unwrap_or(u32::MAX);
                let Some(c) = self.counted_replies.get_mut(&id) else {
                    return;
                };
                if consumers {
                    c.consumers = Some(count);
                } else {
                    c.messages = Some(count);
                }
                let (Some(messages), Some(consumers)) = (c.messages, c.consumers) else {
                    // The other count is still on its way: the channel goes on waiting.
                    self.busy = true;
                    return;
                };
                if let Some(mut c) = self.counted_replies.remove(&id) {
                    if let Method::QueueDeclareOk(ok) = c.reply.as_mut() {
                        ok.message_count = messages;
                        ok.consumer_count = consumers;
                    }
                    self.send_method(c.channel, *c.reply);
                }
            }
            (Task::GetCount { timer, first }, Outcome::Kv(r)) => {
                self.on_get_count(timer, first, count_of(r));
            }
            (Task::ConditionCount(p), Outcome::Kv(r)) => {
                self.on_condition_count(*p, count_of(r));
            }
            (Task::DeleteCount { channel, m, queue }, Outcome::Kv(r)) => {
                self.delete_counted(channel, m, Some(queue), count_of(r).unwrap_or(0));
            }
            (Task::PurgeCount { mut purge }, Outcome::Kv(r)) => {
                purge.count = count_of(r).unwrap_or(0);
                self.open_purge_consumer(purge);
            }
            (Task::BindQueue { channel, change }, Outcome::Kv(r)) => {
                let queue = match r {
                    Ok(v) => v.as_deref().and_then(Queue::decode),
                    Err(e) => return failed(self, channel, &e),
                };
                let cause = self.bind_cause(&change);
                let Some(queue) = queue else {
                    let e = ConnError::new(
                        NOT_FOUND,
                        vhost_text(&format!("no queue '{}'", change.queue)),
                    );
                    return self.close_channel(channel, e.caused_by(&cause));
                };
                // The default exchange has no record; `amq.*` ones may (their sources).
                if change.exchange.is_empty() {
                    let x = topology::predeclared("");
                    return self.bind_with(channel, change, queue, x);
                }
                let key = topology::exchange_key(&change.exchange);
                self.wait_kv_get(
                    key,
                    Task::BindExchange {
                        channel,
                        change,
                        queue,
                    },
                );
            }
            (
                Task::BindExchange {
                    channel,
                    change,
                    queue,
                },
                Outcome::Kv(r),
            ) => match r {
                Ok(v) => {
                    let x = v
                        .as_deref()
                        .and_then(Exchange::decode)
                        .or_else(|| topology::predeclared(&change.exchange));
                    self.bind_with(channel, change, queue, x);
                }
                Err(e) => failed(self, channel, &e),
            },
            (Task::QueueDelete { channel, m }, Outcome::Kv(r)) => {
                let queue = match r {
                    Ok(v) => v.as_deref().and_then(Queue::decode),
                    Err(e) => return failed(self, channel, &e),
                };
                match queue {
                    Some(q) if m.if_unused || m.if_empty => self.delete_if(channel, m, q),
                    queue => self.delete_queue(channel, m, queue),
                }
            }
            (
                Task::DeleteRoute {
                    channel,
                    name,
                    queue,
                    reply,
                    attempts,
                },
                Outcome::Kv(r),
            ) => match r {
                Ok(_) => self.open_queue_route(
                    &name.clone(),
                    &queue.clone(),
                    Task::DeleteRoute {
                        channel,
                        name,
                        queue,
                        reply,
                        attempts,
                    },
                ),
                Err(e) => failed(self, channel, &e),
            },
            (task @ Task::DeleteRoute { .. }, Outcome::Sub(r)) => self.on_delete_route(task, r),
            (Task::XBind(x), outcome) => self.on_xbind(*x, outcome),
            (Task::Propagate(p), outcome) => self.on_propagation(*p, outcome),
            (
                Task::DeleteHeld {
                    channel,
                    sub,
                    reply,
                },
                Outcome::Kv(r),
            ) => {
                self.out.push(Action::Unsubscribe {
                    sub,
                    delete: r.is_ok(),
                });
                match r {
                    Ok(_) => self.reply(channel, reply),
                    Err(e) => failed(self, channel, &e),
                }
            }
            (Task::PublishExchange { channel, content }, Outcome::Kv(r)) => match r {
                Ok(v) => match v.as_deref().and_then(Exchange::decode) {
                    Some(x) => self.route(channel, content, x.kind),
                    None => {
                        let e = ConnError::new(
                            NOT_FOUND,
                            vhost_text(&format!("no exchange '{}'", content.publish.exchange)),
                        );
                        let cause = Method::BasicPublish(content.publish);
                        self.close_channel(channel, e.caused_by(&cause));
                    }
                },
                Err(e) => failed(self, channel, &e),
            },
            (Task::ConsumeQueue { mut consume }, Outcome::Kv(r)) => match r {
                Ok(Some(bytes)) => match Queue::decode(&bytes) {
                    Some(q) => {
                        let name = consume.queue.clone();
                        consume.policy = QueuePolicy::of(&name, &q);
                        consume.auto_delete = q.auto_delete.then(|| q.clone());
                        consume.expires = crate::queue_policy::expires(&q);
                        consume.queue_id = q.id.clone();
                        if q.auto_delete && !q.consumed {
                            // Marked before its first consumer: from then on, no consumer
                            // left means the queue is gone.
                            let queue = Queue {
                                consumed: true,
                                ..q
                            };
                            return self.wait_kv_put(
                                topology::queue_key(&name),
                                Some(queue.encode()),
                                Task::ConsumeMarked { consume, queue },
                            );
                        }
                        self.store_route(&name, &q, Task::ConsumeRoute { consume });
                    }
                    None => self.open_consumer(consume),
                },
                Ok(None) => {
                    let e = ConnError::new(
                        NOT_FOUND,
                        vhost_text(&format!("no queue '{}'", consume.queue)),
                    );
                    let cause = Method::BasicConsume(BasicConsume::default());
                    self.close_channel(consume.channel, e.caused_by(&cause));
                }
                Err(e) => failed(self, consume.channel, &e),
            },
            (Task::PurgeQueue { channel, m }, Outcome::Kv(r)) => match r {
                Ok(Some(_)) => {
                    let purge = PendingPurge {
                        channel,
                        queue: m.queue,
                        no_wait: m.no_wait,
                        attempts: 0,
                        count: 0,
                        drain: false,
                    };
                    if purge.no_wait {
                        return self.open_purge_consumer(purge);
                    }
                    let name = purge.queue.clone();
                    self.wait_count(&name, Task::PurgeCount { purge });
                }
                Ok(None) => {
                    let e =
                        ConnError::new(NOT_FOUND, vhost_text(&format!("no queue '{}'", m.queue)));
                    self.close_channel(channel, e.caused_by(&Method::QueuePurge(m)));
                }
                Err(e) => failed(self, channel, &e),
            },
            (Task::GetQueue { channel, m }, Outcome::Kv(r)) => match r {
                Ok(Some(bytes)) => {
                    let queue = Queue::decode(&bytes);
                    if let Some(q) = &queue {
                        self.queue_used(&m.queue, q);
                    }
                    let policy = queue
                        .as_ref()
                        .map(|q| QueuePolicy::of(&m.queue, q))
                        .unwrap_or_default();
                    let name = m.queue.clone();
                    self.basic_get(channel, m.queue, m.no_ack, policy);
                    let now = self.now_ms;
                    if let Some(g) = self
                        .channels
                        .get_mut(&channel)
                        .and_then(|s| s.getters.get_mut(&name))
                    {
                        g.record = queue.map(|q| (q, now));
                    }
                }
                Ok(None) => {
                    let e =
                        ConnError::new(NOT_FOUND, vhost_text(&format!("no queue '{}'", m.queue)));
                    self.close_channel(channel, e.caused_by(&Method::BasicGet(m)));
                }
                Err(e) => failed(self, channel, &e),
            },
            (
                Task::Mandatory {
                    channel,
                    content,
                    kind,
                    mut routable,
                },
                Outcome::Scan(r),
            ) => {
                let entries = match r {
                    Ok(entries) => entries,
                    Err(e) => return failed(self, channel, &e),
                };
                let key =
                    topology::route_key(&content.publish.exchange, &content.publish.routing_key);
                let properties = message_properties(&content, kind);
                let full = entries.len() >= SCAN_LIMIT as usize;
                let last = entries.last().map(|e| e.key.clone());
                for entry in &entries {
                    let Some(name) = entry.key.strip_prefix("amqp/q/") else {
                        continue;
                    };
                    if let Some(q) = Queue::decode(&entry.value) {
                        if q.filters(name)
                            .iter()
                            .any(|f| topology::filter_matches(f, &key, &properties))
                        {
                            routable = true;
                            break;
                        }
                    }
                }
                if !routable && full {
                    return self.scan_queues(
                        last,
                        Task::Mandatory {
                            channel,
                            content,
                            kind,
                            routable,
                        },
                    );
                }
                if routable {
                    self.publish(channel, content, kind);
                } else {
                    self.return_unroutable(channel, content);
                }
            }
            (Task::ConsumeRoute { consume }, Outcome::Kv(r)) => match r {
                Ok(_) => self.open_consumer(consume),
                Err(e) => failed(self, consume.channel, &e),
            },
            (task, _) => self.log(LogLevel::Warn, format!("unexpected outcome for {task:?}")),
        }
    }

    fn bind_cause(&self, change: &BindChange) -> Method {
        if change.bind {
            Method::QueueBind(QueueBind::default())
        } else {
            Method::QueueUnbind(QueueUnbind::default())
        }
    }

    fn bind_with(
        &mut self,
        channel: u16,
        change: BindChange,
        mut queue: Queue,
        exchange: Option<Exchange>,
    ) {
        let cause = self.bind_cause(&change);
        let Some(x) = exchange else {
            let e = ConnError::new(
                NOT_FOUND,
                vhost_text(&format!("no exchange '{}'", change.exchange)),
            );
            return self.close_channel(channel, e.caused_by(&cause));
        };
        if change.exchange.is_empty() {
            let e = ConnError::new(
                ACCESS_REFUSED,
                "operation not permitted on the default exchange",
            );
            return self.close_channel(channel, e.caused_by(&cause));
        }
        let binding = Binding {
            exchange: change.exchange.clone(),
            kind: x.kind,
            routing_key: change.routing_key.clone(),
            arguments: change.arguments.clone(),
            via: Vec::new(),
        };
        let same = |b: &Binding| {
            b.via.is_empty()
                && b.exchange == binding.exchange
                && b.routing_key == binding.routing_key
                && b.arguments == binding.arguments
        };
        if change.bind {
            if !queue.bindings.iter().any(same) {
                queue.bindings.push(binding);
            }
        } else {
            queue.bindings.retain(|b| !same(b));
        }
        let reply = match (change.bind, change.no_wait) {
            (true, true) => None,
            (true, false) => Some(Box::new(Method::QueueBindOk(QueueBindOk {}))),
            (false, _) => Some(Box::new(Method::QueueUnbindOk(QueueUnbindOk {}))),
        };
        // Through exchange-to-exchange bindings, the queue's bindings are derived again.
        if !x.sources.is_empty() || queue.bindings.iter().any(|b| !b.via.is_empty()) {
            return self.rebind_queue(channel, change.queue, queue, reply);
        }
        let value = queue.encode();
        self.wait_kv_put(
            topology::queue_key(&change.queue),
            Some(value),
            Task::StoreRoute {
                channel,
                name: change.queue,
                queue,
                reply,
            },
        );
    }

    fn on_content_header(&mut self, channel: u16, h: ContentHeader) {
        let Some(state) = self.channels.get_mut(&channel) else {
            return;
        };
        match &mut state.content {
            Some(c) if c.header.is_none() => {
                if h.class_id != 60 {
                    let e = ConnError::new(
                        FRAME_ERROR,
                        format!("content header of class {} for basic.publish", h.class_id),
                    );
                    return self.close_connection(e);
                }
                let size = h.body_size;
                c.header = Some(h);
                if size == 0 {
                    self.content_complete(channel);
                }
            }
            _ => self.close_connection(ConnError::new(
                UNEXPECTED_FRAME,
                format!("content header on channel {channel} without basic.publish"),
            )),
        }
    }

    fn on_content_body(&mut self, channel: u16, b: Vec<u8>) {
        let Some(state) = self.channels.get_mut(&channel) else {
            return;
        };
        match &mut state.content {
            Some(Content {
                header: Some(h),
                body,
                ..
            }) => {
                body.extend_from_slice(&b);
                let (got, size) = (body.len() as u64, h.body_size);
                if got > size {
                    return self.close_connection(ConnError::new(
                        FRAME_ERROR,
                        format!("content body of {got} bytes exceeds the header's {size}"),
                    ));
                }
                if got == size {
                    self.content_complete(channel);
                }
            }
            _ => self.close_connection(ConnError::new(
                UNEXPECTED_FRAME,
                format!("content body on channel {channel} without a content header"),
            )),
        }
    }

    fn content_complete(&mut self, channel: u16) {
        let Some(Content {
            publish,
            header: Some(header),
            body,
        }) = self
            .channels
            .get_mut(&channel)
            .and_then(|s| s.content.take())
        else {
            return;
        };
        let expiration = BasicProperties::read(&header.properties)
            .ok()
            .and_then(|p| p.expiration);
        if let Some(e) = expiration
            .as_deref()
            .filter(|e| !crate::queue_policy::valid_expiration(e))
        {
            let err = ConnError::new(PRECONDITION_FAILED, format!("invalid expiration '{e}'"));
            return self.close_channel(channel, err.caused_by(&Method::BasicPublish(publish)));
        }
        if publish.exchange.is_empty() {
            let own = expiration.and_then(|e| e.parse::<u64>().ok());
            self.sweep_published(&publish.routing_key, own);
        }
        let content = ContentDone {
            publish,
            header,
            body,
        };
        if let Some(x) = topology::predeclared(&content.publish.exchange) {
            return self.route(channel, content, x.kind);
        }
        let key = topology::exchange_key(&content.publish.exchange);
        self.wait_kv_get(key, Task::PublishExchange { channel, content });
    }

    /// A message for an existing exchange: published, unless it is `mandatory` and no queue
    /// takes it (then returned, §1.8.3.9 basic.return, as RabbitMQ: before its confirm).
    fn route(&mut self, channel: u16, content: ContentDone, kind: ExchangeType) {
        if !content.publish.mandatory {
            return self.publish(channel, content, kind);
        }
        let task = Task::Mandatory {
            channel,
            content,
            kind,
            routable: false,
        };
        self.scan_queues(None, task);
    }

    fn scan_queues(&mut self, start_after: Option<String>, task: Task) {
        let token = self.ops.start(Op::Task(task));
        self.out.push(Action::KvScan {
            token,
            prefix: "amqp/q/".into(),
            start_after,
            limit: SCAN_LIMIT,
        });
        self.busy = true;
    }

    fn return_unroutable(&mut self, channel: u16, content: ContentDone) {
        let ContentDone {
            publish,
            header,
            body,
        } = content;
        let mut bytes = Vec::new();
        write_method(
            &mut bytes,
            channel,
            Method::BasicReturn(BasicReturn {
                reply_code: NO_ROUTE,
                reply_text: "NO_ROUTE".into(),
                exchange: publish.exchange,
                routing_key: publish.routing_key,
            }),
        );
        Frame::Header(channel, header).write(&mut bytes);
        self.write_body(&mut bytes, channel, &body);
        self.out.send(bytes);
        // An unroutable message is confirmed at once (nothing to store).
        let seq = self.channels.get_mut(&channel).and_then(|s| {
            s.confirm.then(|| {
                s.publish_seq += 1;
                s.publish_seq
            })
        });
        if let Some(seq) = seq {
            self.send_method(
                channel,
                Method::BasicAck(BasicAck {
                    delivery_tag: seq,
                    multiple: false,
                }),
            );
        }
    }

    fn write_body(&self, bytes: &mut Vec<u8>, channel: u16, body: &[u8]) {
        let chunk = (self.frame_max as usize).saturating_sub(8).max(1);
        for part in body.chunks(chunk) {
            Frame::Body(channel, part.to_vec()).write(bytes);
        }
    }

    /// Opens a `basic.get` consumer of `queue` (try `attempts + 1`).
    fn open_getter(&mut self, channel: u16, queue: String, attempts: u32) {
        let spec = queue_consumer(topology::queue_topic(&queue), 1, None);
        let token = self.ops.start(Op::Getter {
            channel,
            queue,
            attempts,
        });
        self.out.push(Action::OpenConsumer { token, spec });
    }

    /// The record of `queue` this channel's gets read less than [`GET_RECORD_FRESH_MS`]
    /// ago, while its getter's consumer is open: a polling loop reads it once a second,
    /// not once per get.
    fn fresh_get_record(&self, channel: u16, queue: &str) -> Option<Queue> {
        let g = self.channels.get(&channel)?.getters.get(queue)?;
        let (record, read_ms) = g.record.as_ref().filter(|_| g.sub.is_some())?;
        (self.now_ms.saturating_sub(*read_ms) < GET_RECORD_FRESH_MS).then(|| record.clone())
    }

    /// The queue is gone: the next get of it reads its record (and finds it gone).
    pub(super) fn forget_get_records(&mut self, queue: &str) {
        for state in self.channels.values_mut() {
            if let Some(g) = state.getters.get_mut(queue) {
                g.record = None;
            }
        }
    }

    fn basic_get(&mut self, channel: u16, queue: String, no_ack: bool, policy: QueuePolicy) {
        let Some(state) = self.channels.get_mut(&channel) else {
            return;
        };
        let getter = state.getters.entry(queue.clone()).or_default();
        getter.policy = policy;
        let subs = getter.subs().count() as u64;
        let opening = getter.opening;
        // Every consumer holds its message unacknowledged: one more.
        let first = !opening && self.held_by_getter(channel, &queue) >= subs;
        if first {
            if let Some(g) = self
                .channels
                .get_mut(&channel)
                .and_then(|s| s.getters.get_mut(&queue))
            {
                g.opening = true;
            }
            self.open_getter(channel, queue.clone(), 0);
        }
        // The queue is counted first (the host counts once the copies of what was confirmed
        // before are in): an empty queue answers at once, as RabbitMQ's does; the wait for
        // a message starts with the count, and `get-ok` says how many are left (also for a
        // message its consumer already holds). This deadline only bounds a count that never
        // comes.
        let timer = self.ops.token();
        self.out.push(Action::SetTimer {
            token: timer,
            delay_ms: GET_COUNT_WAIT_MS,
        });
        self.wait_count(&queue, Task::GetCount { timer, first });
        self.pending_get = Some(PendingGet {
            channel,
            queue,
            no_ack,
            timer,
            count: None,
        });
        self.busy = true;
    }

    /// The channel's next delivery tag for `m`, which is settled at once (no-ack: §1.8.3.3)
    /// or kept as unacked under that tag; `None` if the channel is gone.
    fn next_delivery(
        &mut self,
        channel: u16,
        m: &Message,
        no_ack: bool,
        dead_letter: Option<Box<Delivered>>,
    ) -> Option<u64> {
        let state = self.channels.get_mut(&channel)?;
        state.delivery_tag += 1;
        let delivery_tag = state.delivery_tag;
        if no_ack {
            self.out.ack(m.subscription, m.delivery_id);
        } else {
            let u = Unacked {
                sub: m.subscription,
                delivery_id: m.delivery_id,
                dead_letter,
            };
            state.unacked.insert(delivery_tag, u);
        }
        Some(delivery_tag)
    }

    /// The messages a `basic.get` of `queue` leaves, from the queue's `count` (before
    /// the get): RabbitMQ's ready ones, so not the one handed now nor those the channel's
    /// gets hold unacknowledged (the backend counts them). Messages other consumers hold
    /// are counted too (more than RabbitMQ says); 0 if unknown.
    fn left_after_get(&self, channel: u16, queue: &str, count: Option<u64>) -> u32 {
        let Some(n) = count else {
            return 0;
        };
        let held = self.held_by_getter(channel, queue);
        u32::try_from(n.saturating_sub(held + 1)).unwrap_or(u32::MAX)
    }

    /// The messages the channel's gets of `queue` hold unacknowledged.
    fn held_by_getter(&self, channel: u16, queue: &str) -> u64 {
        let Some(state) = self.channels.get(&channel) else {
            return 0;
        };
        let Some(getter) = state.getters.get(queue) else {
            return 0;
        };
        let subs: Vec<SubId> = getter.subs().collect();
        state
            .unacked
            .values()
            .filter(|u| subs.contains(&u.sub))
            .count() as u64
    }

    /// Closes the extra getter consumers among `subs` that hold nothing any more.
    pub(super) fn retire_getters(&mut self, subs: &[SubId]) {
        for sub in subs {
            let Some((channel, queue)) = self.getters.get(sub).cloned() else {
                continue;
            };
            let Some(state) = self.channels.get_mut(&channel) else {
                continue;
            };
            let held = state.unacked.values().any(|u| u.sub == *sub);
            let Some(g) = state.getters.get_mut(&queue) else {
                continue;
            };
            if held || !g.extra.contains(sub) || g.ready.iter().any(|m| m.subscription == *sub) {
                continue;
            }
            g.extra.retain(|s| s != sub);
            self.getters.remove(sub);
            self.policies.remove(sub);
            self.out.push(Action::Unsubscribe {
                sub: *sub,
                delete: false,
            });
        }
    }

    fn get_ok(&mut self, channel: u16, m: Message, no_ack: bool, message_count: u32) {
        let (exchange, routing_key, properties) = delivery_fields(&m);
        let dead_letter = self.keep_for_dead_letter(&m, &exchange, &routing_key, &properties);
        let Some(delivery_tag) = self.next_delivery(channel, &m, no_ack, dead_letter) else {
            return;
        };
        let mut bytes = Vec::new();
        write_method(
            &mut bytes,
            channel,
            Method::BasicGetOk(BasicGetOk {
                delivery_tag,
                redelivered: m.redelivery_count > 0,
                exchange,
                routing_key,
                message_count,
            }),
        );
        Frame::Header(
            channel,
            ContentHeader {
                class_id: 60,
                body_size: m.payload.len() as u64,
                properties,
            },
        )
        .write(&mut bytes);
        self.write_body(&mut bytes, channel, &m.payload);
        self.out.send(bytes);
    }

    /// The getter's consumer opened (or could not).
    pub(super) fn on_getter_result(
        &mut self,
        channel: u16,
        queue: String,
        attempts: u32,
        result: Result<SubId, OpError>,
    ) {
        match result {
            Ok(sub) => {
                match self
                    .channels
                    .get_mut(&channel)
                    .filter(|s| !s.closing)
                    .and_then(|s| s.getters.get_mut(&queue))
                {
                    Some(g) => {
                        g.opening = false;
                        match g.sub {
                            None => g.sub = Some(sub),
                            Some(_) => g.extra.push(sub),
                        }
                        self.policies.insert(sub, g.policy.clone());
                        self.getters.insert(sub, (channel, queue));
                    }
                    None => self.out.push(Action::Unsubscribe { sub, delete: false }),
                }
            }
            // A route or a sweep (an Exclusive reader) holds the queue for a moment.
            Err(e) if e.kind == ErrorKind::Backend && attempts < CONSUME_ATTEMPTS => {
                self.open_again_soon(Op::Getter {
                    channel,
                    queue,
                    attempts: attempts + 1,
                });
            }
            Err(e) => {
                if let Some(state) = self.channels.get_mut(&channel) {
                    match state.getters.get_mut(&queue) {
                        Some(g) if g.sub.is_some() => g.opening = false,
                        _ => {
                            state.getters.remove(&queue);
                        }
                    }
                }
                self.log(LogLevel::Warn, format!("basic.get consumer: {}", e.message));
            }
        }
    }

    /// The pending `basic.get` whose deadline is `timer` waits `delay_ms` more for a
    /// message: one the queue counts (ready, or held by a consumer that may give it back),
    /// or one it could not count.
    fn extend_get(&mut self, timer: u64, delay_ms: u64) {
        let Some(g) = self.pending_get.as_mut().filter(|g| g.timer == timer) else {
            return;
        };
        let token = self.ops.token();
        g.timer = token;
        self.out.push(Action::SetTimer { token, delay_ms });
    }

    /// The pending `basic.get`'s queue was counted: a message its consumer holds answers
    /// it; none counted, `get-empty`; else it waits for one.
    fn on_get_count(&mut self, timer: u64, first: bool, count: Option<u64>) {
        let Some(g) = self.pending_get.as_mut().filter(|g| g.timer == timer) else {
            return;
        };
        g.count = Some(count);
        let (channel, queue) = (g.channel, g.queue.clone());
        if self.answer_get_from_ready() {
            return;
        }
        // What the channel's gets hold is counted, not left.
        let held = self.held_by_getter(channel, &queue);
        match count {
            Some(n) if n <= held => {
                self.on_get_timer(timer);
            }
            Some(_) => self.extend_get(timer, GET_COUNTED_WAIT_MS),
            // Unknown: the get waits for a message as it did before counts.
            None if first => self.extend_get(timer, GET_FIRST_WAIT_MS),
            None => self.extend_get(timer, GET_WAIT_MS),
        }
    }

    /// Answers the pending `basic.get` with the first unexpired message its queue's
    /// consumer holds, if any: whether it did.
    fn answer_get_from_ready(&mut self) -> bool {
        let Some(g) = self.pending_get.clone() else {
            return false;
        };
        loop {
            let Some(m) = self
                .channels
                .get_mut(&g.channel)
                .and_then(|s| s.getters.get_mut(&g.queue))
                .and_then(|getter| getter.ready.pop_front())
            else {
                return false;
            };
            if self.expire(&m) {
                self.retire_getters(&[m.subscription]);
                continue;
            }
            self.pending_get = None;
            self.busy = false;
            let left = self.left_after_get(g.channel, &g.queue, g.count.flatten());
            self.get_ok(g.channel, m, g.no_ack, left);
            return true;
        }
    }

    /// A pending `basic.get`'s deadline: a message that came meanwhile, or `get-empty`.
    pub(super) fn on_get_timer(&mut self, token: u64) -> bool {
        if self.pending_get.as_ref().is_none_or(|g| g.timer != token) {
            return false;
        }
        if self.answer_get_from_ready() {
            return true;
        }
        if let Some(g) = self.pending_get.take() {
            self.busy = false;
            self.send_method(
                g.channel,
                Method::BasicGetEmpty(BasicGetEmpty {
                    reserved_1: String::new(),
                }),
            );
        }
        true
    }

    /// A message of a getter's consumer: the pending `basic.get` takes it, or it waits.
    fn on_getter_message(&mut self, channel: u16, queue: String, m: Message) {
        if self.expire(&m) || self.purge_takes_got(&queue, &m) {
            self.retire_getters(&[m.subscription]);
            return;
        }
        match self.pending_get.take() {
            Some(g) if g.channel == channel && g.queue == queue && g.count.is_some() => {
                self.busy = false;
                let left = self.left_after_get(channel, &queue, g.count.flatten());
                self.get_ok(channel, m, g.no_ack, left);
            }
            other => {
                self.pending_get = other;
                if let Some(getter) = self
                    .channels
                    .get_mut(&channel)
                    .and_then(|s| s.getters.get_mut(&queue))
                {
                    getter.ready.push_back(m);
                }
            }
        }
    }

    fn publish(&mut self, channel: u16, content: ContentDone, kind: ExchangeType) {
        let Some((content, kind)) = self.tx_holds_publish(channel, content, kind) else {
            return;
        };
        let ContentDone {
            publish,
            header,
            body,
        } = content;
        let properties = message_properties_of(&publish, &header, kind);
        let seq = self.channels.get_mut(&channel).and_then(|s| {
            s.confirm.then(|| {
                s.publish_seq += 1;
                s.publish_seq
            })
        });
        let token = self.ops.start(Op::Publish { channel, seq });
        self.publish_issued();
        self.out.push(Action::PublishCapped {
            token,
            msg: OutboundMessage {
                topic: topology::SOURCE.into(),
                key: None,
                payload: body,
                properties,
            },
        });
    }

    /// A publish completed: in confirm mode `basic.ack` once stored, `basic.nack` if it
    /// failed or a full queue `refused` it (RabbitMQ's `reject-publish`).
    pub(super) fn on_published(
        &mut self,
        channel: u16,
        seq: Option<u64>,
        result: Result<(), OpError>,
        refused: bool,
    ) {
        self.publish_completed();
        let Some(seq) = seq else {
            if let Err(e) = result {
                self.log(LogLevel::Warn, format!("publish failed: {}", e.message));
            }
            return;
        };
        if self.channels.get(&channel).is_none_or(|s| s.closing) {
            return;
        }
        let m = match result {
            Ok(()) if !refused => Method::BasicAck(BasicAck {
                delivery_tag: seq,
                multiple: false,
            }),
            _ => Method::BasicNack(BasicNack {
                delivery_tag: seq,
                multiple: false,
                requeue: false,
            }),
        };
        self.send_method(channel, m);
    }

    pub(super) fn on_message(&mut self, m: Message) {
        if self.on_delete_check_message(m.subscription)
            || self.drained_consumer_message(&m)
            || self.on_sweep_message(&m)
            || self.on_purge_drain_message(&m)
        {
            return;
        }
        if let Some((channel, queue)) = self.getters.get(&m.subscription).cloned() {
            return self.on_getter_message(channel, queue, m);
        }
        let Some((channel, no_ack)) = self
            .consumers
            .get(&m.subscription)
            .map(|(channel, _, no_ack, _)| (*channel, *no_ack))
        else {
            return;
        };
        if let Some(state) = self.channels.get_mut(&channel) {
            let limit = usize::from(state.global_prefetch);
            if !no_ack && limit > 0 && (state.unacked.len() >= limit || !state.held.is_empty()) {
                state.held.push_back(m);
                return;
            }
        }
        self.deliver(m);
    }

    /// Delivers the messages held back by the channel's `global` prefetch limit while it
    /// allows (§1.8.3.1 basic.qos, RabbitMQ's meaning of `global`).
    pub(super) fn deliver_held(&mut self, channel: u16) {
        loop {
            let Some(state) = self.channels.get_mut(&channel) else {
                return;
            };
            let limit = usize::from(state.global_prefetch);
            if limit > 0 && state.unacked.len() >= limit {
                return;
            }
            let Some(m) = state.held.pop_front() else {
                return;
            };
            self.deliver(m);
        }
    }

    /// `basic.deliver` of a consumer's message, unless it expired.
    fn deliver(&mut self, m: Message) {
        let Some((channel, tag, no_ack)) = self
            .consumers
            .get(&m.subscription)
            .map(|(channel, tag, no_ack, _)| (*channel, tag.clone(), *no_ack))
        else {
            return;
        };
        if self.expire(&m) {
            return;
        }
        let (exchange, routing_key, properties) = delivery_fields(&m);
        let dead_letter = self.keep_for_dead_letter(&m, &exchange, &routing_key, &properties);
        let Some(delivery_tag) = self.next_delivery(channel, &m, no_ack, dead_letter) else {
            return;
        };
        let mut bytes = Vec::new();
        write_method(
            &mut bytes,
            channel,
            Method::BasicDeliver(BasicDeliver {
                consumer_tag: tag,
                delivery_tag,
                redelivered: m.redelivery_count > 0,
                exchange,
                routing_key,
            }),
        );
        Frame::Header(
            channel,
            ContentHeader {
                class_id: 60,
                body_size: m.payload.len() as u64,
                properties,
            },
        )
        .write(&mut bytes);
        self.write_body(&mut bytes, channel, &m.payload);
        self.out.send(bytes);
    }

    /// basic.ack / nack / reject: `requeue` is `None` for an ack.
    fn settle(
        &mut self,
        channel: u16,
        tag: u64,
        multiple: bool,
        requeue: Option<bool>,
        cause: &Method,
    ) {
        let Some(state) = self.channels.get_mut(&channel) else {
            return;
        };
        let tags: Vec<u64> = if multiple {
            let upto = if tag == 0 { u64::MAX } else { tag };
            state.unacked.range(..=upto).map(|(t, _)| *t).collect()
        } else if state.unacked.contains_key(&tag) {
            vec![tag]
        } else {
            let e = ConnError::new(PRECONDITION_FAILED, format!("unknown delivery tag {tag}"));
            return self.close_channel(channel, e.caused_by(cause));
        };
        let settled: Vec<(u64, Unacked)> = tags
            .iter()
            .filter_map(|t| state.unacked.remove(t).map(|u| (*t, u)))
            .collect();
        if let Some(settled) = self.tx_holds_settle(channel, settled, requeue) {
            self.apply_settle(settled.into_iter().map(|(_, u)| u), requeue);
        }
        self.deliver_held(channel);
    }

    /// Acknowledges (`requeue` `None`), requeues or rejects settled deliveries.
    fn apply_settle(&mut self, settled: impl Iterator<Item = Unacked>, requeue: Option<bool>) {
        let mut subs = Vec::new();
        for u in settled {
            if !subs.contains(&u.sub) {
                subs.push(u.sub);
            }
            let (sub, delivery_id) = (u.sub, u.delivery_id);
            match (requeue, u.dead_letter) {
                (Some(true), _) => self.out.push(Action::Nack { sub, delivery_id }),
                (Some(false), Some(d)) => self.dead_letter(sub, delivery_id, *d, Reason::Rejected),
                _ => self.out.ack(sub, delivery_id),
            }
        }
        self.retire_getters(&subs);
        self.drained(subs);
    }

    /// What dead-lettering `m` would take, if its queue dead-letters.
    fn keep_for_dead_letter(
        &self,
        m: &Message,
        exchange: &str,
        routing_key: &str,
        properties: &[u8],
    ) -> Option<Box<Delivered>> {
        let policy = self.policies.get(&m.subscription)?;
        policy.dead_letters().then(|| {
            Box::new(Delivered {
                exchange: exchange.to_string(),
                routing_key: routing_key.to_string(),
                properties: properties.to_vec(),
                payload: m.payload.clone(),
            })
        })
    }

    /// Settles `m` instead of delivering it if its queue's `x-max-length` dropped it or its
    /// TTL passed (dead-lettered, or dropped): whether it did.
    pub(super) fn expire(&mut self, m: &Message) -> bool {
        // Dropped from the head by its queue's cap before its TTL could count.
        if overflow::dropped_by_cap(m) {
            let (exchange, routing_key, properties) = delivery_fields(m);
            let d = Delivered {
                exchange,
                routing_key,
                properties,
                payload: m.payload.clone(),
            };
            self.dead_letter(m.subscription, m.delivery_id, d, Reason::Maxlen);
            return true;
        }
        let Some(policy) = self.policies.get(&m.subscription) else {
            return false;
        };
        let (exchange, routing_key, properties) = delivery_fields(m);
        // The expiration property's flag (§4.2.6.1: bit 8 of the first flag word).
        let own_ttl = properties.first().is_some_and(|b| b & 1 != 0);
        if policy.message_ttl.is_none() && !own_ttl {
            return false;
        }
        let props = BasicProperties::read(&properties).unwrap_or_default();
        if !policy.expired(&props, m.publish_time_ms, self.now_ms) {
            return false;
        }
        let d = Delivered {
            exchange,
            routing_key,
            properties,
            payload: m.payload.clone(),
        };
        self.dead_letter(m.subscription, m.delivery_id, d, Reason::Expired);
        true
    }

    /// Dead-letters a message of the consumer `sub` (RabbitMQ's dead-letter exchanges):
    /// republished to its queue's dead-letter exchange with an `x-death` header and settled
    /// in its queue at once; dropped if the queue has none. At most once, as RabbitMQ's
    /// classic queues dead-letter: a crash between the two loses the message (settling once
    /// the copy is stored would need the consumer kept open past `basic.cancel` until then).
    fn dead_letter(&mut self, sub: SubId, delivery_id: u64, d: Delivered, reason: Reason) {
        self.out.ack(sub, delivery_id);
        if let Some(policy) = self.policies.get(&sub).cloned() {
            self.publish_dead_letter(&policy, d, reason);
        }
    }

    /// Publishes a dead-lettered message to `policy`'s dead-letter exchange, with its
    /// `x-death` header; nothing if the queue has none.
    pub(super) fn publish_dead_letter(
        &mut self,
        policy: &QueuePolicy,
        d: Delivered,
        reason: Reason,
    ) {
        let Some((exchange, routing_key)) = policy.dead_letter_route(&d.routing_key) else {
            return;
        };
        let props = BasicProperties::read(&d.properties).unwrap_or_default();
        if policy.closes_automatic_cycle(&props, reason) {
            let text = format!(
                "a message dead-lettered from queue '{}' ({}) went round a dead-letter cycle with no rejection in it: dropped",
                policy.queue,
                reason.name()
            );
            return self.log(LogLevel::Warn, text);
        }
        let props = policy.dead_lettered(
            &props,
            reason,
            &d.exchange,
            &d.routing_key,
            self.now_ms / 1000,
        );
        let mut properties = Vec::new();
        props.write(&mut properties);
        let publish = BasicPublish {
            exchange,
            routing_key,
            ..Default::default()
        };
        let header = ContentHeader {
            class_id: 60,
            body_size: d.payload.len() as u64,
            properties,
        };
        // As published to a headers exchange: the header properties route it if the
        // dead-letter exchange is one (other exchanges' filters ignore them).
        let properties = message_properties_of(&publish, &header, ExchangeType::Headers);
        let token = self.ops.start(Op::DeadLetter);
        self.out.push(Action::PublishCapped {
            token,
            msg: OutboundMessage {
                topic: topology::SOURCE.into(),
                key: None,
                payload: d.payload,
                properties,
            },
        });
    }

    /// A dead-lettered message's copy is stored, or lost.
    pub(super) fn on_dead_lettered(&mut self, result: Result<(), OpError>) {
        if let Err(e) = result {
            self.log(
                LogLevel::Warn,
                format!("dead-lettering failed: {}", e.message),
            );
        }
    }
}

/// The properties a message is published with (see `crate::topology`).
fn message_properties_of(
    publish: &BasicPublish,
    header: &ContentHeader,
    kind: ExchangeType,
) -> Vec<Property> {
    let mut properties = vec![
        Property {
            key: topology::KEY_PROPERTY.into(),
            value: topology::route_key(&publish.exchange, &publish.routing_key),
        },
        Property {
            key: topology::EXCHANGE_PROPERTY.into(),
            value: publish.exchange.clone(),
        },
        Property {
            key: topology::ROUTING_KEY_PROPERTY.into(),
            value: publish.routing_key.clone(),
        },
        Property {
            key: topology::PROPERTIES_PROPERTY.into(),
            value: topology::hex(&header.properties),
        },
    ];
    if kind == ExchangeType::Headers {
        if let Ok(BasicProperties {
            headers: Some(headers),
            ..
        }) = BasicProperties::read(&header.properties)
        {
            properties.extend(topology::header_properties(&publish.exchange, &headers));
        }
    }
    properties
}

fn message_properties(content: &ContentDone, kind: ExchangeType) -> Vec<Property> {
    message_properties_of(&content.publish, &content.header, kind)
}

/// A delivered message's exchange, routing key and content-header property bytes (none for
/// a message another protocol published).
fn delivery_fields(m: &Message) -> (String, String, Vec<u8>) {
    message_fields(&m.properties)
}

/// The exchange, routing key and content-header property bytes a message's properties
/// carry.
pub(super) fn message_fields(properties: &[Property]) -> (String, String, Vec<u8>) {
    let prop = |k: &str| {
        properties
            .iter()
            .find(|p| p.key == k)
            .map(|p| p.value.as_str())
    };
    let exchange = prop(topology::EXCHANGE_PROPERTY)
        .unwrap_or_default()
        .to_string();
    let routing_key = prop(topology::ROUTING_KEY_PROPERTY)
        .unwrap_or_default()
        .to_string();
    let properties = prop(topology::PROPERTIES_PROPERTY)
        .and_then(topology::unhex)
        .unwrap_or_else(|| vec![0, 0]);
    (exchange, routing_key, properties)
}

/// A seed for the names of a connection's server-named queues.
pub fn name_seed(conn: u64) -> u64 {
    std::collections::hash_map::RandomState::new().hash_one(conn)
}

/// The queue's durable route on the `amqp` source, with its bindings' filters: opened to
/// store them, to look at the queue (refused while consumers hold its subscription) or to
/// delete it.
pub(super) fn queue_route(name: &str, queue: &Queue) -> RouteSpec {
    RouteSpec {
        source: topology::SOURCE.into(),
        filters: queue.filters(name),
        max_unacked: 1,
        max_queued: 1,
        queue: Some(topology::queue_topic(name)),
        key_property: Some(topology::KEY_PROPERTY.into()),
    }
}

/// Opens the queue's durable route (`queue_route`) with its cap, as its arguments say
/// (`x-max-length`, `x-max-length-bytes`, `x-overflow`; none: no cap), so that every
/// opening stores the queue's cap with its filters.
pub(super) fn queue_route_action(token: u64, name: &str, queue: &Queue) -> Action {
    Action::OpenCappedRoute {
        token,
        spec: queue_route(name, queue),
        cap: crate::queue_policy::cap(queue),
    }
}

/// A consumer on a queue's topic: the queue's shared subscription, from its start, with
/// `max_unacked` deliveries in flight.
pub(super) fn queue_consumer(
    topic: String,
    max_unacked: u32,
    consumer_name: Option<String>,
) -> ConsumerSpec {
    ConsumerSpec {
        topic: TopicRef {
            name: topic,
            persistent: true,
        },
        subscription: Some(topology::QUEUE_SUBSCRIPTION.into()),
        mode: SubMode::Shared,
        start: Position::Earliest,
        max_unacked,
        nack_delay_ms: 0,
        max_redeliveries: 0,
        dead_letter_topic: None,
        consumer_name,
    }
}
