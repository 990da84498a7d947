//! One client connection: reads Pulsar commands, answers them, and forwards topic work to
//! topic actors (Pulsar binary protocol, `PulsarApi.proto`).
//!
//! The connection task owns its state (producers, consumers). Outgoing frames go through one
//! bounded queue to a writer task; topic actors push `CommandMessage`s into the same queue
//! with `try_send`. A topic answers each `Send` through a [`ReceiptSink`] that goes straight
//! to the writer task (no hop through the connection task: the receipt is on the socket as
//! soon as the fsync that covers the message returns). A topic answers its sends in the
//! order it received them, so each producer sees its receipts in sequence order. A full
//! topic queue or too many outstanding receipts pause reading from the socket (producer
//! backpressure).
//!
//! Bad input is answered, then handled per connection; nothing a client sends can panic the
//! broker or affect other connections (tests: `broker/tests/bad_input.rs`):
//! - a frame over the size limit or not decodable: `CommandError` (request id -1), close;
//! - a `Send` whose payload fails its CRC32C: `SendError` with `ChecksumError`, nothing is
//!   stored, the connection goes on (as Apache Pulsar); another command with a bad payload
//!   checksum: `CommandError`, close;
//! - a command before `Connect`: `CommandError` for its request, close;
//! - protocol misuse on a connected client (send before producer, ack receipt for an
//!   unknown consumer, a consumer id reused for another topic while in use): the
//!   protocol's error answer (`SendError`, `AckResponse` with `ConsumerNotFound`,
//!   `CommandError` with `ConsumerBusy`), and the connection goes on. Acks, flow permits
//!   and redelivery requests for unknown consumers or entries are ignored, as Pulsar does.
//!
//! On close, the connection's consumers are detached, so their unacknowledged messages are
//! redelivered to others.

use std::collections::HashMap;
use std::sync::Arc;

use futures::{SinkExt, StreamExt};
use pulsar::message::proto::{
    self,
    base_command::Type,
    command_ack::AckType,
    command_get_topics_of_namespace::Mode as TopicsMode,
    command_lookup_topic_response::LookupType,
    command_partitioned_topic_metadata_response::LookupType as MetadataLookupType,
    command_subscribe::{InitialPosition, SubType},
    ServerError,
};
use pulsar::message::Message;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;

use crate::auth::{Action, BrokerAuth};
use crate::entry::NewEntry;
use crate::naming::{self, Domain, TopicName};
use crate::protocol::{
    self, command, error, message_id, no_message_id, success, Frame, FrameCodec, Inbound, Received,
    ENTRY_METADATA_PROTOCOL_VERSION, LEDGER_ID, MAX_MESSAGE_SIZE, MAX_PROTOCOL_VERSION,
};
use crate::registry::Registry;
use crate::subscription::ConsumerKey;
use crate::topic::{
    AccessMode, Attached, RequestError, SeekTarget, SubscribeRequest, TopicCommand, TopicHandle,
};

/// Capacity of a connection's outbound frame queue.
const OUTBOUND_QUEUE: usize = 1024;
/// Most send receipts outstanding on one connection before we stop reading.
const MAX_PENDING_RECEIPTS: usize = 10_000;
/// Longest batch-index ack set accepted (64 bits a word: batches of up to 8192 messages).
const MAX_ACK_SET_WORDS: usize = 128;
/// Most producers and consumers one connection may register.
const MAX_HANDLES: usize = 10_000;

/// What every connection shares.
pub struct Shared {
    pub registry: Arc<Registry>,
    pub service_url: String,
    pub auth: Option<BrokerAuth>,
    /// Prefix of producer names the broker makes up (unique per broker start).
    pub name_prefix: String,
}

/// Why a connection ended abnormally.
#[derive(Debug, thiserror::Error)]
enum ConnectionError {
    #[error("client sent {0:?} before Connect")]
    NotConnected(Type),
    #[error("command type {0} without its body")]
    MissingBody(i32),
    #[error("client connection closed")]
    Closed,
    #[error("command type {0} with a payload that failed its checksum")]
    ChecksumMismatch(i32),
    #[error("authentication failed: {0}")]
    AuthenticationFailed(String),
}

/// A `Send`'s payload: as received (the usual path), or as the `pulsar` codec decoded it.
enum SendPayload {
    Received(Box<Received>),
    Decoded(Box<pulsar::message::Payload>),
}

impl SendPayload {
    /// Bytes of the payload.
    fn len(&self) -> usize {
        match self {
            SendPayload::Received(r) => r.payload().len(),
            SendPayload::Decoded(p) => p.data.len(),
        }
    }
}

/// A receipt on its way to the writer task, with the permit that bounds them.
type ReceiptFrame = (Message, OwnedSemaphorePermit);

/// Where a topic answers one `CommandSend` (`CommandSendReceipt` or `CommandSendError`):
/// straight into the connection's receipt queue, read by its writer task. Dropped unanswered
/// (the topic stopped), it answers `SendError` itself, so no send is left without an answer.
pub struct ReceiptSink {
    armed: Option<ArmedSink>,
}

struct ArmedSink {
    /// When the send was handed to its topic, for [`crate::stats::RECEIPT`] (the std clock:
    /// receipts are answered on blocking threads, and a paused test clock would read zero).
    handed_over: std::time::Instant,
    tx: mpsc::Sender<ReceiptFrame>,
    permit: OwnedSemaphorePermit,
    producer_id: u64,
    sequence_id: u64,
    highest_sequence_id: Option<u64>,
}

impl ReceiptSink {
    /// Answers the send: `Ok(Some(entry id))` stored, `Ok(None)` a duplicate of a stored
    /// message, `Err` refused.
    pub fn send(mut self, result: Result<Option<u64>, RequestError>) {
        if let Some(sink) = self.armed.take() {
            sink.answer(result);
        }
    }
}

#[cfg(test)]
impl ReceiptSink {
    /// A sink that answers nobody (tests of a topic on its own).
    pub(crate) fn detached() -> ReceiptSink {
        ReceiptSink { armed: None }
    }
}

impl Drop for ReceiptSink {
    fn drop(&mut self) {
        if let Some(sink) = self.armed.take() {
            sink.answer(Err((ServerError::PersistenceError, "topic stopped".into())));
        }
    }
}

impl ArmedSink {
    fn answer(self, result: Result<Option<u64>, RequestError>) {
        let ArmedSink {
            handed_over,
            tx,
            permit,
            producer_id,
            sequence_id,
            highest_sequence_id,
        } = self;
        let stored = matches!(result, Ok(Some(_)));
        let frame = match result {
            Ok(id) => command(Type::SendReceipt, |r| {
                r.send_receipt = Some(proto::CommandSendReceipt {
                    producer_id,
                    sequence_id,
                    message_id: Some(id.map_or_else(no_message_id, message_id)),
                    highest_sequence_id,
                })
            }),
            Err((code, text)) => send_error_frame(producer_id, sequence_id, code, text),
        };
        if stored {
            crate::stats::RECEIPT.record(handed_over.elapsed());
        }
        // Never full: the queue has a slot for every permit and this answer holds one. An
        // error means the writer is gone (the connection is closing): nobody to tell.
        let _ = tx.try_send((frame, permit));
    }
}

fn send_error_frame(
    producer_id: u64,
    sequence_id: u64,
    code: ServerError,
    text: String,
) -> Message {
    command(Type::SendError, |r| {
        r.send_error = Some(proto::CommandSendError {
            producer_id,
            sequence_id,
            error: code as i32,
            message: text,
        })
    })
}

struct Producer {
    topic: TopicHandle,
    name: Arc<str>,
}

struct Connection {
    id: u64,
    shared: Arc<Shared>,
    out: mpsc::Sender<Frame>,
    connected: bool,
    /// The authenticated role (`None` when the broker has no authentication).
    role: Option<String>,
    /// The client's `FeatureFlags.supports_broker_entry_metadata`, if its protocol version
    /// is 18 or later.
    wants_entry_metadata: bool,
    producers: HashMap<u64, Producer>,
    consumers: HashMap<u64, TopicHandle>,
    /// Receipts outstanding on this connection (at most `MAX_PENDING_RECEIPTS`).
    receipt_permits: Arc<Semaphore>,
    receipt_tx: mpsc::Sender<ReceiptFrame>,
}

/// Serves one TCP client until it disconnects, misbehaves, or `shutdown` fires.
pub async fn serve(socket: TcpStream, id: u64, shared: Arc<Shared>, shutdown: CancellationToken) {
    let peer = socket.peer_addr().ok();
    let _ = socket.set_nodelay(true);
    let (rd, wr) = socket.into_split();
    serve_stream(rd, wr, peer, id, shared, shutdown).await;
}

/// Serves one client on any byte stream (a TCP socket's halves, or an in-process pipe).
pub async fn serve_stream<R, W>(
    rd: R,
    wr: W,
    peer: Option<std::net::SocketAddr>,
    id: u64,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut reader = FramedRead::new(rd, FrameCodec);
    let (out, out_rx) = mpsc::channel(OUTBOUND_QUEUE);
    let (receipt_tx, receipt_rx) = mpsc::channel(MAX_PENDING_RECEIPTS);
    let stop_writer = CancellationToken::new();
    let writer = tokio::spawn(write_loop(
        FramedWrite::new(wr, FrameCodec),
        out_rx,
        receipt_rx,
        stop_writer.clone(),
    ));
    let mut conn = Connection {
        id,
        shared,
        out,
        connected: false,
        role: None,
        wants_entry_metadata: false,
        producers: HashMap::new(),
        consumers: HashMap::new(),
        receipt_permits: Arc::new(Semaphore::new(MAX_PENDING_RECEIPTS)),
        receipt_tx,
    };
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            frame = reader.next() => match frame {
                Some(Ok(Inbound::Message(msg))) => {
                    if let Err(e) = conn.handle(*msg).await {
                        tracing::info!(connection = id, ?peer, error = %e, "closing connection");
                        break;
                    }
                }
                Some(Ok(Inbound::Payload(received))) => {
                    if let Err(e) = conn.received(*received).await {
                        tracing::info!(connection = id, ?peer, error = %e, "closing connection");
                        break;
                    }
                }
                Some(Ok(Inbound::ChecksumMismatch(cmd))) => {
                    tracing::warn!(connection = id, ?peer, "payload checksum mismatch");
                    if conn.checksum_mismatch(*cmd).await.is_err() {
                        break;
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(connection = id, ?peer, error = %e, "bad frame; closing connection");
                    // The frame's request id is unknown: -1, as Apache Pulsar for errors
                    // that answer no request. The writer sends it before closing.
                    let _ = conn.out.try_send(
                        error(u64::MAX, ServerError::NotAllowedError, e.to_string()).into(),
                    );
                    break;
                }
                None => break,
            },
        }
    }
    conn.detach_all().await;
    stop_writer.cancel();
    let _ = writer.await;
}

/// Writes the connection's outgoing frames and its send receipts, as many as are queued per
/// write. A receipt's permit is released once its frame is in the socket buffer.
async fn write_loop<W: AsyncWrite + Unpin>(
    mut sink: FramedWrite<W, FrameCodec>,
    mut rx: mpsc::Receiver<Frame>,
    mut receipts: mpsc::Receiver<ReceiptFrame>,
    stop: CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            () = stop.cancelled() => break,
            Some((receipt, _permit)) = receipts.recv() => Frame::from(receipt),
            msg = rx.recv() => match msg { Some(m) => m, None => break },
        };
        if sink.feed(msg).await.is_err() {
            return;
        }
        while let Ok((receipt, _permit)) = receipts.try_recv() {
            if sink.feed(receipt.into()).await.is_err() {
                return;
            }
        }
        while let Ok(more) = rx.try_recv() {
            if sink.feed(more).await.is_err() {
                return;
            }
        }
        if sink.flush().await.is_err() {
            return;
        }
    }
    // Frames queued before the stop (e.g. the error that explains a close) still go out.
    while let Ok(more) = rx.try_recv() {
        if sink.feed(more).await.is_err() {
            return;
        }
    }
    let _ = sink.flush().await;
    let _ = sink.get_mut().shutdown().await;
}

use tokio::io::AsyncWriteExt as _;

/// Pulls a command's body out of its `Option`, or fails the connection.
macro_rules! body {
    ($cmd:expr, $field:ident) => {
        match $cmd.$field.take() {
            Some(b) => b,
            None => return Err(ConnectionError::MissingBody($cmd.r#type)),
        }
    };
}

impl Connection {
    async fn reply(&self, msg: Message) -> Result<(), ConnectionError> {
        self.out
            .send(msg.into())
            .await
            .map_err(|_| ConnectionError::Closed)
    }

    async fn detach_all(&mut self) {
        for (consumer_id, topic) in self.consumers.drain() {
            let key = ConsumerKey {
                connection: self.id,
                consumer_id,
            };
            let _ = topic.tx.send(TopicCommand::CloseConsumer { key }).await;
        }
        for (_, p) in self.producers.drain() {
            let _ = p
                .topic
                .tx
                .send(TopicCommand::RemoveProducer { name: p.name })
                .await;
        }
    }

    fn key(&self, consumer_id: u64) -> ConsumerKey {
        ConsumerKey {
            connection: self.id,
            consumer_id,
        }
    }

    /// A payload frame: a `Send` of a connected client goes straight to [`Connection::send`]
    /// with its bytes as received; anything else takes the general path.
    async fn received(&mut self, mut r: Received) -> Result<(), ConnectionError> {
        if !(self.connected && r.command.r#type == Type::Send as i32) {
            return self.handle(r.into_message()).await;
        }
        let c = body!(r.command, send);
        self.send(c, Some(SendPayload::Received(Box::new(r)))).await
    }

    async fn handle(&mut self, msg: Message) -> Result<(), ConnectionError> {
        let Message {
            command: mut cmd,
            payload,
        } = msg;
        let Ok(kind) = Type::try_from(cmd.r#type) else {
            tracing::debug!(
                connection = self.id,
                kind = cmd.r#type,
                "unknown command type"
            );
            return self.unsupported(&cmd).await;
        };
        if !self.connected && !matches!(kind, Type::Connect | Type::Ping | Type::Pong) {
            let request_id = protocol::request_id_of(&cmd).unwrap_or(u64::MAX);
            self.reply(error(
                request_id,
                ServerError::NotAllowedError,
                format!("{kind:?} before Connect"),
            ))
            .await?;
            return Err(ConnectionError::NotConnected(kind));
        }
        match kind {
            Type::Connect => {
                let c = body!(cmd, connect);
                let version = c
                    .protocol_version
                    .unwrap_or(0)
                    .clamp(0, MAX_PROTOCOL_VERSION);
                if let Some(auth) = &self.shared.auth {
                    match auth.authenticate(c.auth_method_name.as_deref(), c.auth_data.as_deref()) {
                        Ok(role) => self.role = Some(role),
                        Err(e) => {
                            // As Apache Pulsar: an error with request id -1, then close.
                            self.reply(error(
                                u64::MAX,
                                ServerError::AuthenticationError,
                                e.to_string(),
                            ))
                            .await?;
                            return Err(ConnectionError::AuthenticationFailed(e.to_string()));
                        }
                    }
                }
                // As Apache Pulsar (`Consumer.sendMessages`): only to a client that speaks
                // protocol version 18 or later *and* asks for it.
                self.wants_entry_metadata = version >= ENTRY_METADATA_PROTOCOL_VERSION
                    && c.feature_flags
                        .as_ref()
                        .and_then(|f| f.supports_broker_entry_metadata)
                        .unwrap_or(false);
                self.connected = true;
                tracing::debug!(connection = self.id, client = %c.client_version, version, "connected");
                self.reply(command(Type::Connected, |r| {
                    r.connected = Some(proto::CommandConnected {
                        server_version: concat!("magnetar-broker/", env!("CARGO_PKG_VERSION"))
                            .to_string(),
                        protocol_version: Some(version),
                        max_message_size: Some(MAX_MESSAGE_SIZE as i32),
                    })
                }))
                .await
            }
            Type::Ping => {
                self.reply(command(Type::Pong, |r| {
                    r.pong = Some(proto::CommandPong {})
                }))
                .await
            }
            Type::Pong => Ok(()),
            Type::PartitionedMetadata => {
                let c = body!(cmd, partition_metadata);
                let result = TopicName::parse_domain(&c.topic);
                // Non-persistent topics are never partitioned here.
                let partitions = match &result {
                    Ok((n, Domain::Persistent)) => self.shared.registry.partitions(n),
                    _ => 0,
                };
                let result = result.map(|(n, _)| n);
                if let Ok(name) = &result {
                    if !self.authorized(name, Action::Manage) {
                        let denied = self.denied(name);
                        return self
                            .reply(command(Type::PartitionedMetadataResponse, |r| {
                                r.partition_metadata_response =
                                    Some(proto::CommandPartitionedTopicMetadataResponse {
                                        request_id: c.request_id,
                                        response: Some(MetadataLookupType::Failed as i32),
                                        error: Some(ServerError::AuthorizationError as i32),
                                        message: Some(denied),
                                        ..Default::default()
                                    })
                            }))
                            .await;
                    }
                }
                self.reply(command(Type::PartitionedMetadataResponse, |r| {
                    r.partition_metadata_response =
                        Some(proto::CommandPartitionedTopicMetadataResponse {
                            request_id: c.request_id,
                            partitions: result.is_ok().then_some(partitions),
                            response: Some(if result.is_ok() {
                                MetadataLookupType::Success as i32
                            } else {
                                MetadataLookupType::Failed as i32
                            }),
                            error: result
                                .as_ref()
                                .err()
                                .map(|_| ServerError::InvalidTopicName as i32),
                            message: result.as_ref().err().map(|e| e.to_string()),
                        })
                }))
                .await
            }
            Type::Lookup => {
                let c = body!(cmd, lookup_topic);
                let result = TopicName::parse_domain(&c.topic).map(|(n, _)| n);
                if let Ok(name) = &result {
                    if !self.authorized(name, Action::Manage) {
                        let denied = self.denied(name);
                        return self
                            .reply(command(Type::LookupResponse, |r| {
                                r.lookup_topic_response = Some(proto::CommandLookupTopicResponse {
                                    request_id: c.request_id,
                                    response: Some(LookupType::Failed as i32),
                                    error: Some(ServerError::AuthorizationError as i32),
                                    message: Some(denied),
                                    ..Default::default()
                                })
                            }))
                            .await;
                    }
                }
                let url = self.shared.service_url.clone();
                self.reply(command(Type::LookupResponse, |r| {
                    r.lookup_topic_response = Some(match result {
                        Ok(_) => proto::CommandLookupTopicResponse {
                            request_id: c.request_id,
                            response: Some(LookupType::Connect as i32),
                            broker_service_url: Some(url),
                            authoritative: Some(true),
                            ..Default::default()
                        },
                        Err(e) => proto::CommandLookupTopicResponse {
                            request_id: c.request_id,
                            response: Some(LookupType::Failed as i32),
                            error: Some(ServerError::InvalidTopicName as i32),
                            message: Some(e.to_string()),
                            ..Default::default()
                        },
                    })
                }))
                .await
            }
            Type::Producer => {
                let c = body!(cmd, producer);
                self.create_producer(c).await
            }
            Type::Send => {
                let c = body!(cmd, send);
                self.send(c, payload.map(|p| SendPayload::Decoded(Box::new(p))))
                    .await
            }
            Type::Subscribe => {
                let c = body!(cmd, subscribe);
                self.subscribe(c).await
            }
            Type::Flow => {
                let c = body!(cmd, flow);
                let key = self.key(c.consumer_id);
                if let Some(topic) = self.consumers.get(&c.consumer_id) {
                    let permits = c.message_permits;
                    let _ = topic.tx.send(TopicCommand::Flow { key, permits }).await;
                }
                Ok(())
            }
            Type::Ack => {
                let c = body!(cmd, ack);
                self.ack(c).await
            }
            Type::RedeliverUnacknowledgedMessages => {
                let c = body!(cmd, redeliver_unacknowledged_messages);
                let key = self.key(c.consumer_id);
                if let Some(topic) = self.consumers.get(&c.consumer_id) {
                    let ids: Vec<u64> = c
                        .message_ids
                        .iter()
                        .filter(|m| m.ledger_id == LEDGER_ID)
                        .map(|m| m.entry_id)
                        .collect();
                    let ids = (!c.message_ids.is_empty()).then_some(ids);
                    let epoch = c.consumer_epoch;
                    let _ = topic
                        .tx
                        .send(TopicCommand::Redeliver { key, ids, epoch })
                        .await;
                }
                Ok(())
            }
            Type::CloseProducer => {
                let c = body!(cmd, close_producer);
                if let Some(p) = self.producers.remove(&c.producer_id) {
                    let _ = p
                        .topic
                        .tx
                        .send(TopicCommand::RemoveProducer { name: p.name })
                        .await;
                }
                self.reply(success(c.request_id)).await
            }
            Type::CloseConsumer => {
                let c = body!(cmd, close_consumer);
                let key = self.key(c.consumer_id);
                if let Some(topic) = self.consumers.remove(&c.consumer_id) {
                    let _ = topic.tx.send(TopicCommand::CloseConsumer { key }).await;
                }
                self.reply(success(c.request_id)).await
            }
            Type::Unsubscribe => {
                let c = body!(cmd, unsubscribe);
                self.unsubscribe(c).await
            }
            Type::Seek => {
                let c = body!(cmd, seek);
                self.seek(c).await
            }
            Type::GetLastMessageId => {
                let c = body!(cmd, get_last_message_id);
                self.get_last_message_id(c).await
            }
            Type::ConsumerStats => {
                let c = body!(cmd, consumer_stats);
                self.consumer_stats(c).await
            }
            Type::GetTopicsOfNamespace => {
                let c = body!(cmd, get_topics_of_namespace);
                let (tenant, ns) = naming::split_namespace(&c.namespace);
                if !self.role_may(tenant, ns, Action::Manage) {
                    return self
                        .reply(error(
                            c.request_id,
                            ServerError::AuthorizationError,
                            format!("not authorized for namespace {}", c.namespace),
                        ))
                        .await;
                }
                // Each mode lists only its domain's topics: the C++ client matches its
                // pattern with the domain removed and would otherwise subscribe to the other
                // domain's. Non-persistent topics are listed while they are open.
                let registry = &self.shared.registry;
                let topics = match c.mode() {
                    TopicsMode::NonPersistent => {
                        registry.non_persistent.topics_of_namespace(&c.namespace)
                    }
                    TopicsMode::Persistent => registry.topics_of_namespace(&c.namespace),
                    TopicsMode::All => {
                        let mut all = registry.topics_of_namespace(&c.namespace);
                        all.extend(registry.non_persistent.topics_of_namespace(&c.namespace));
                        all
                    }
                };
                // `topics_pattern` and `topics_hash` are not evaluated here: the whole list,
                // `filtered: false` and no hash leave the matching to the client (the C++
                // client ignores these fields and always matches itself).
                self.reply(command(Type::GetTopicsOfNamespaceResponse, |r| {
                    r.get_topics_of_namespace_response =
                        Some(proto::CommandGetTopicsOfNamespaceResponse {
                            request_id: c.request_id,
                            topics,
                            filtered: Some(false),
                            topics_hash: None,
                            changed: Some(true),
                        })
                }))
                .await
            }
            Type::GetSchema => {
                let c = body!(cmd, get_schema);
                self.get_schema(c).await
            }
            Type::GetOrCreateSchema => {
                let c = body!(cmd, get_or_create_schema);
                let Some(topic) = self.topic(&c.topic, c.request_id, Action::Produce).await? else {
                    return Ok(());
                };
                let result = Self::schema_version(&topic, c.schema).await;
                self.reply(command(Type::GetOrCreateSchemaResponse, |r| {
                    r.get_or_create_schema_response =
                        Some(proto::CommandGetOrCreateSchemaResponse {
                            request_id: c.request_id,
                            error_code: result.as_ref().err().map(|(code, _)| *code as i32),
                            error_message: result.as_ref().err().map(|(_, m)| m.clone()),
                            schema_version: result.as_ref().ok().cloned(),
                        })
                }))
                .await
            }
            _ => self.unsupported(&cmd).await,
        }
    }

    /// A frame whose payload failed its checksum: a `Send` is refused with `ChecksumError`
    /// (nothing is stored; the client may resend), anything else ends the connection.
    async fn checksum_mismatch(&mut self, cmd: proto::BaseCommand) -> Result<(), ConnectionError> {
        match cmd.send {
            Some(c) if self.connected => {
                self.reply(command(Type::SendError, |r| {
                    r.send_error = Some(proto::CommandSendError {
                        producer_id: c.producer_id,
                        sequence_id: c.sequence_id,
                        error: ServerError::ChecksumError as i32,
                        message: "payload checksum mismatch; message not stored".to_string(),
                    })
                }))
                .await
            }
            _ => {
                let request_id = protocol::request_id_of(&cmd).unwrap_or(u64::MAX);
                self.reply(error(
                    request_id,
                    ServerError::ChecksumError,
                    "payload checksum mismatch",
                ))
                .await?;
                Err(ConnectionError::ChecksumMismatch(cmd.r#type))
            }
        }
    }

    async fn unsupported(&self, cmd: &proto::BaseCommand) -> Result<(), ConnectionError> {
        match protocol::request_id_of(cmd) {
            Some(request_id) => {
                self.reply(error(
                    request_id,
                    ServerError::NotAllowedError,
                    format!("command type {} is not supported", cmd.r#type),
                ))
                .await
            }
            None => {
                tracing::debug!(
                    connection = self.id,
                    kind = cmd.r#type,
                    "ignoring unsupported command"
                );
                Ok(())
            }
        }
    }

    /// Whether this connection's role may do `action` in `tenant/ns`.
    fn role_may(&self, tenant: &str, ns: &str, action: Action) -> bool {
        match (&self.shared.auth, &self.role) {
            (None, _) => true,
            (Some(auth), Some(role)) => auth.authorizer.authorize(role, tenant, ns, action),
            (Some(_), None) => false,
        }
    }

    fn authorized(&self, topic: &TopicName, action: Action) -> bool {
        let (tenant, ns) = topic.tenant_and_namespace();
        self.role_may(tenant, ns, action)
    }

    fn denied(&self, topic: &TopicName) -> String {
        format!(
            "role {} is not authorized for {topic}",
            self.role.as_deref().unwrap_or("(anonymous)")
        )
    }

    /// Opens topic `name` for `action`, answering `request_id` with the error if it cannot.
    async fn topic(
        &self,
        name: &str,
        request_id: u64,
        action: Action,
    ) -> Result<Option<TopicHandle>, ConnectionError> {
        let (name, domain) = match TopicName::parse_domain(name) {
            Ok(n) => n,
            Err(e) => {
                self.reply(error(
                    request_id,
                    ServerError::InvalidTopicName,
                    e.to_string(),
                ))
                .await?;
                return Ok(None);
            }
        };
        if !self.authorized(&name, action) {
            self.reply(error(
                request_id,
                ServerError::AuthorizationError,
                self.denied(&name),
            ))
            .await?;
            return Ok(None);
        }
        let opened = match domain {
            Domain::Persistent => self.shared.registry.get(&name).await,
            Domain::NonPersistent => self.shared.registry.non_persistent.get(&name),
        };
        match opened {
            Ok(h) => Ok(Some(h)),
            Err(e) => {
                self.reply(error(
                    request_id,
                    ServerError::ServiceNotReady,
                    e.to_string(),
                ))
                .await?;
                Ok(None)
            }
        }
    }

    async fn create_producer(&mut self, c: proto::CommandProducer) -> Result<(), ConnectionError> {
        if self.producers.len() >= MAX_HANDLES && !self.producers.contains_key(&c.producer_id) {
            return self
                .reply(error(
                    c.request_id,
                    ServerError::ProducerBusy,
                    "too many producers",
                ))
                .await;
        }
        let Some(topic) = self.topic(&c.topic, c.request_id, Action::Produce).await? else {
            return Ok(());
        };
        // The same id again: a client retrying or reconnecting its producer (the topic
        // decides whether it is still attached); on another topic it would orphan the first.
        // A producer closed by an unload left its stopped topic's handle here: it is gone.
        if self
            .producers
            .get(&c.producer_id)
            .is_some_and(|old| old.topic.tx.is_closed())
        {
            self.producers.remove(&c.producer_id);
        }
        let again = match self.producers.get(&c.producer_id) {
            Some(old) if !old.topic.tx.same_channel(&topic.tx) => {
                return self
                    .reply(error(
                        c.request_id,
                        ServerError::ProducerBusy,
                        format!(
                            "producer id {} is already in use on this connection",
                            c.producer_id
                        ),
                    ))
                    .await;
            }
            Some(old) => Some(old.name.clone()),
            None => None,
        };
        let name: Arc<str> = match &again {
            Some(name) => name.clone(),
            None => c
                .producer_name
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| {
                    format!("{}-{}-{}", self.shared.name_prefix, self.id, c.producer_id)
                })
                .into(),
        };
        let producer_name = name.to_string();
        let schema_version = match c.schema {
            Some(schema) => match Self::schema_version(&topic, schema).await {
                Ok(v) => Some(v),
                Err((code, text)) => return self.reply(error(c.request_id, code, text)).await,
            },
            None => None,
        };
        let (reply, done) = oneshot::channel();
        let added = topic
            .tx
            .send(TopicCommand::AddProducer {
                name: name.clone(),
                mode: AccessMode::from_wire(c.producer_access_mode),
                again: again.is_some(),
                connection: (c.producer_id, self.out.clone()),
                reply,
            })
            .await;
        let attached = match (added, done.await) {
            (Ok(()), Ok(Ok(attached))) => attached,
            (Ok(()), Ok(Err((code, text)))) => {
                // A producer that is no longer attached (fenced) is gone from here too.
                self.producers.remove(&c.producer_id);
                return self.reply(error(c.request_id, code, text)).await;
            }
            _ => {
                return self
                    .reply(error(
                        c.request_id,
                        ServerError::ServiceNotReady,
                        "topic stopped",
                    ))
                    .await;
            }
        };
        self.producers
            .insert(c.producer_id, Producer { topic, name });
        let request_id = c.request_id;
        let success = move |last_sequence_id, ready| {
            command(Type::ProducerSuccess, |r| {
                r.producer_success = Some(proto::CommandProducerSuccess {
                    request_id,
                    producer_name: producer_name.clone(),
                    last_sequence_id: Some(last_sequence_id),
                    schema_version: schema_version.clone(),
                    producer_ready: Some(ready),
                    ..Default::default()
                })
            })
        };
        match attached {
            Attached::Ready(last) => self.reply(success(last, true)).await,
            Attached::Queued(ready) => {
                // WaitForExclusive: the client waits for a second answer, ready, which
                // comes when the topic admits the producer (never, if it goes first).
                let queued = success(-1, false);
                self.reply(queued).await?;
                let out = self.out.clone();
                tokio::spawn(async move {
                    if let Ok(last) = ready.await {
                        let _ = out.send(success(last, true).into()).await;
                    }
                });
                Ok(())
            }
        }
    }

    async fn send(
        &mut self,
        c: proto::CommandSend,
        payload: Option<SendPayload>,
    ) -> Result<(), ConnectionError> {
        let (producer_id, sequence_id) = (c.producer_id, c.sequence_id);
        let highest_sequence_id = c.highest_sequence_id;
        let send_error = move |code: ServerError, text: String| {
            send_error_frame(producer_id, sequence_id, code, text)
        };
        let Some(producer) = self.producers.get(&producer_id) else {
            return self
                .reply(send_error(
                    ServerError::NotAllowedError,
                    "unknown producer".into(),
                ))
                .await;
        };
        let Some(payload) = payload else {
            return self
                .reply(send_error(
                    ServerError::NotAllowedError,
                    "send without payload".into(),
                ))
                .await;
        };
        if payload.len() > MAX_MESSAGE_SIZE {
            return self
                .reply(send_error(
                    ServerError::NotAllowedError,
                    "message too large".into(),
                ))
                .await;
        }
        // The stored producer name and sequence ids are what de-duplication recovers from
        // (a batch's highest sequence id defaults to its sequence id there).
        let highest = highest_sequence_id.unwrap_or(sequence_id).max(sequence_id);
        let needs_highest = |m: &proto::MessageMetadata| {
            m.num_messages_in_batch.is_some()
                && m.highest_sequence_id.is_none()
                && m.sequence_id != highest
        };
        let entry = match payload {
            // The usual case: stored byte for byte as received.
            SendPayload::Received(r)
                if r.metadata.producer_name == *producer.name && !needs_highest(&r.metadata) =>
            {
                let r = *r;
                NewEntry::from_wire(r.metadata, r.tail, r.tail_crc)
            }
            payload => {
                let (mut metadata, data) = match payload {
                    SendPayload::Received(r) => (r.metadata.clone(), r.payload()),
                    SendPayload::Decoded(p) => {
                        let p = *p;
                        (p.metadata, p.data.into())
                    }
                };
                metadata.producer_name = producer.name.to_string();
                if needs_highest(&metadata) {
                    metadata.highest_sequence_id = Some(highest);
                }
                NewEntry::new(metadata, &data)
            }
        };
        // Waiting here for a permit pauses reading: the backpressure on a client that does
        // not read its receipts.
        let Ok(permit) = self.receipt_permits.clone().acquire_owned().await else {
            return Err(ConnectionError::Closed);
        };
        let reply = ReceiptSink {
            armed: Some(ArmedSink {
                handed_over: std::time::Instant::now(),
                tx: self.receipt_tx.clone(),
                permit,
                producer_id,
                sequence_id,
                highest_sequence_id,
            }),
        };
        // If the topic has stopped, the command comes back and dropping it answers the
        // send with an error (see `ReceiptSink`).
        let _ = producer
            .topic
            .tx
            .send(TopicCommand::Publish {
                producer: producer.name.clone(),
                sequence_ids: (sequence_id, highest),
                entry: Box::new(entry),
                reply,
            })
            .await;
        Ok(())
    }

    async fn subscribe(&mut self, c: proto::CommandSubscribe) -> Result<(), ConnectionError> {
        if self.consumers.len() >= MAX_HANDLES && !self.consumers.contains_key(&c.consumer_id) {
            return self
                .reply(error(
                    c.request_id,
                    ServerError::ConsumerBusy,
                    "too many consumers",
                ))
                .await;
        }
        let Ok(sub_type) = SubType::try_from(c.sub_type) else {
            return self
                .reply(error(
                    c.request_id,
                    ServerError::NotAllowedError,
                    "unknown subscription type",
                ))
                .await;
        };
        let initial_position = c
            .initial_position
            .and_then(|p| InitialPosition::try_from(p).ok())
            .unwrap_or(InitialPosition::Latest);
        let Some(topic) = self.topic(&c.topic, c.request_id, Action::Consume).await? else {
            return Ok(());
        };
        // A consumer closed by an unload left its stopped topic's handle here: it is gone.
        if self
            .consumers
            .get(&c.consumer_id)
            .is_some_and(|old| old.tx.is_closed())
        {
            self.consumers.remove(&c.consumer_id);
        }
        if let Some(existing) = self.consumers.get(&c.consumer_id) {
            // The same id again on the same topic is a retried subscribe (the topic decides);
            // on another topic it would orphan the first consumer.
            if !existing.tx.same_channel(&topic.tx) {
                return self
                    .reply(error(
                        c.request_id,
                        ServerError::ConsumerBusy,
                        format!(
                            "consumer id {} is already in use on this connection",
                            c.consumer_id
                        ),
                    ))
                    .await;
            }
        }
        let request = SubscribeRequest {
            key: self.key(c.consumer_id),
            subscription: c.subscription,
            sub_type,
            durable: c.durable.unwrap_or(true),
            initial_position,
            start_message_id: c.start_message_id,
            tx: self.out.clone(),
            epoch: c.consumer_epoch,
            entry_metadata: self.wants_entry_metadata,
            consumer_name: c.consumer_name.clone().unwrap_or_default(),
            priority: c.priority_level.unwrap_or(0),
            key_shared: c.key_shared_meta.clone(),
        };
        let (reply, done) = oneshot::channel();
        if topic
            .tx
            .send(TopicCommand::Subscribe { request, reply })
            .await
            .is_err()
        {
            return self
                .reply(error(
                    c.request_id,
                    ServerError::ServiceNotReady,
                    "topic stopped",
                ))
                .await;
        }
        match done.await {
            Ok(Ok(())) => {
                self.consumers.insert(c.consumer_id, topic);
                self.reply(success(c.request_id)).await
            }
            Ok(Err((code, text))) => self.reply(error(c.request_id, code, text)).await,
            Err(_) => {
                self.reply(error(
                    c.request_id,
                    ServerError::ServiceNotReady,
                    "topic stopped",
                ))
                .await
            }
        }
    }

    async fn ack(&mut self, c: proto::CommandAck) -> Result<(), ConnectionError> {
        let key = self.key(c.consumer_id);
        if let Some(topic) = self.consumers.get(&c.consumer_id) {
            // A batch-index ack carries `ack_set`, the bits of the batch's messages still
            // unacknowledged; an empty or all-zero set acknowledges the whole entry.
            let cumulative = c.ack_type == AckType::Cumulative as i32;
            let mut ids = Vec::new();
            let mut partial = Vec::new();
            for m in c.message_id.iter().filter(|m| m.ledger_id == LEDGER_ID) {
                if m.ack_set.iter().all(|w| *w == 0) {
                    ids.push(m.entry_id);
                } else if m.ack_set.len() <= MAX_ACK_SET_WORDS {
                    if cumulative {
                        ids.extend(m.entry_id.checked_sub(1));
                    }
                    partial.push((m.entry_id, m.ack_set.clone()));
                }
            }
            let _ = topic
                .tx
                .send(TopicCommand::Ack {
                    key,
                    ids,
                    partial,
                    cumulative,
                })
                .await;
        }
        if let Some(request_id) = c.request_id {
            // An ack receipt: an ack for a consumer this connection does not have fails.
            let known = self.consumers.contains_key(&c.consumer_id);
            self.reply(command(Type::AckResponse, |r| {
                r.ack_response = Some(proto::CommandAckResponse {
                    consumer_id: c.consumer_id,
                    request_id: Some(request_id),
                    error: (!known).then_some(ServerError::ConsumerNotFound as i32),
                    message: (!known).then(|| format!("no consumer {}", c.consumer_id)),
                    ..Default::default()
                })
            }))
            .await?;
        }
        Ok(())
    }

    async fn unsubscribe(&mut self, c: proto::CommandUnsubscribe) -> Result<(), ConnectionError> {
        let key = self.key(c.consumer_id);
        let Some(topic) = self.consumers.get(&c.consumer_id) else {
            return self.no_such_consumer(c.request_id).await;
        };
        let (reply, done) = oneshot::channel();
        let _ = topic
            .tx
            .send(TopicCommand::Unsubscribe { key, reply })
            .await;
        match done.await {
            Ok(Ok(())) => {
                self.consumers.remove(&c.consumer_id);
                self.reply(success(c.request_id)).await
            }
            Ok(Err((code, text))) => self.reply(error(c.request_id, code, text)).await,
            Err(_) => {
                self.reply(error(
                    c.request_id,
                    ServerError::ServiceNotReady,
                    "topic stopped",
                ))
                .await
            }
        }
    }

    /// The version of `schema` in `topic`'s registry, adding it if new.
    async fn schema_version(
        topic: &TopicHandle,
        schema: proto::Schema,
    ) -> Result<Vec<u8>, crate::topic::RequestError> {
        let (reply, done) = oneshot::channel();
        let stopped = || (ServerError::ServiceNotReady, "topic stopped".to_string());
        topic
            .tx
            .send(TopicCommand::GetOrCreateSchema { schema, reply })
            .await
            .map_err(|_| stopped())?;
        done.await.map_err(|_| stopped())?
    }

    async fn get_schema(&mut self, c: proto::CommandGetSchema) -> Result<(), ConnectionError> {
        let Some(topic) = self.topic(&c.topic, c.request_id, Action::Consume).await? else {
            return Ok(());
        };
        let (reply, done) = oneshot::channel();
        let _ = topic
            .tx
            .send(TopicCommand::GetSchema {
                version: c.schema_version,
                reply,
            })
            .await;
        let result = done
            .await
            .unwrap_or_else(|_| Err((ServerError::ServiceNotReady, "topic stopped".into())));
        self.reply(command(Type::GetSchemaResponse, |r| {
            r.get_schema_response = Some(match result {
                Ok((version, schema)) => proto::CommandGetSchemaResponse {
                    request_id: c.request_id,
                    schema: Some(schema),
                    schema_version: Some(version),
                    ..Default::default()
                },
                Err((code, text)) => proto::CommandGetSchemaResponse {
                    request_id: c.request_id,
                    error_code: Some(code as i32),
                    error_message: Some(text),
                    ..Default::default()
                },
            })
        }))
        .await
    }

    async fn seek(&mut self, c: proto::CommandSeek) -> Result<(), ConnectionError> {
        let key = self.key(c.consumer_id);
        let target = match (c.message_id, c.message_publish_time) {
            (_, Some(t)) => SeekTarget::PublishTime(t),
            (Some(id), None) => SeekTarget::MessageId(id),
            (None, None) => {
                return self
                    .reply(error(
                        c.request_id,
                        ServerError::NotAllowedError,
                        "seek needs a message id or a publish time",
                    ))
                    .await;
            }
        };
        let Some(topic) = self.consumers.get(&c.consumer_id) else {
            return self.no_such_consumer(c.request_id).await;
        };
        let (reply, done) = oneshot::channel();
        let _ = topic
            .tx
            .send(TopicCommand::Seek { key, target, reply })
            .await;
        match done.await {
            Ok(Ok(())) => self.reply(success(c.request_id)).await,
            Ok(Err((code, text))) => self.reply(error(c.request_id, code, text)).await,
            Err(_) => {
                self.reply(error(
                    c.request_id,
                    ServerError::ServiceNotReady,
                    "topic stopped",
                ))
                .await
            }
        }
    }

    /// `CommandConsumerStats` (the `pulsar` crate's `Consumer::get_stats`): the consumer's
    /// name, permits, unacknowledged entries, subscription type and backlog. Rates are not
    /// kept, so they are left out.
    async fn consumer_stats(
        &mut self,
        c: proto::CommandConsumerStats,
    ) -> Result<(), ConnectionError> {
        let key = self.key(c.consumer_id);
        let stats = match self.consumers.get(&c.consumer_id) {
            Some(topic) => {
                let (reply, done) = oneshot::channel();
                let _ = topic
                    .tx
                    .send(TopicCommand::ConsumerStats { key, reply })
                    .await;
                done.await.ok().flatten()
            }
            None => None,
        };
        let Some((stats, backlog)) = stats else {
            return self.no_such_consumer(c.request_id).await;
        };
        self.reply(command(Type::ConsumerStatsResponse, |r| {
            r.consumer_stats_response = Some(proto::CommandConsumerStatsResponse {
                request_id: c.request_id,
                consumer_name: Some(stats.name),
                available_permits: Some(stats.available_permits),
                unacked_messages: Some(stats.unacked),
                r#type: Some(stats.sub_type),
                msg_backlog: Some(backlog),
                ..Default::default()
            })
        }))
        .await
    }

    /// The answer to a request about a consumer this connection does not have.
    async fn no_such_consumer(&self, request_id: u64) -> Result<(), ConnectionError> {
        self.reply(error(
            request_id,
            ServerError::ConsumerNotFound,
            "no such consumer",
        ))
        .await
    }

    async fn get_last_message_id(
        &mut self,
        c: proto::CommandGetLastMessageId,
    ) -> Result<(), ConnectionError> {
        let key = self.key(c.consumer_id);
        let Some(topic) = self.consumers.get(&c.consumer_id) else {
            return self.no_such_consumer(c.request_id).await;
        };
        let (reply, done) = oneshot::channel();
        let _ = topic
            .tx
            .send(TopicCommand::GetLastMessageId { key, reply })
            .await;
        let Ok(last) = done.await else {
            return self
                .reply(error(
                    c.request_id,
                    ServerError::ServiceNotReady,
                    "topic stopped",
                ))
                .await;
        };
        let last_message_id = match last.last {
            Some((id, batch_index)) => proto::MessageIdData {
                batch_index,
                ..message_id(id)
            },
            None => no_message_id(),
        };
        self.reply(command(Type::GetLastMessageIdResponse, |r| {
            r.get_last_message_id_response = Some(proto::CommandGetLastMessageIdResponse {
                last_message_id,
                request_id: c.request_id,
                consumer_mark_delete_position: last.mark_delete.map(message_id),
            })
        }))
        .await
    }
}
