use std::sync::Arc;

use futures::channel::{mpsc, oneshot};

use crate::{
    connection::Connection,
    message::{proto::MessageIdData, Message as RawMessage},
    Error, Executor, Payload,
};

/// (magnetar patch) a message's id, its payload and the broker's redelivery count of it
pub type ReceivedMessage = (MessageIdData, Payload, u32);

pub type MessageIdDataReceiver = mpsc::Receiver<Result<ReceivedMessage, Error>>;

pub enum EngineEvent<Exe: Executor> {
    /// (magnetar patch) boxed: a `RawMessage` is 4.8 KB, and every ack passed through this
    /// enum's channel at that size
    Message(Option<Box<RawMessage>>),
    EngineMessage(Option<EngineMessage<Exe>>),
}

pub enum EngineMessage<Exe: Executor> {
    Ack(MessageIdData, bool),
    /// magnetar patch: several individual acks in one `CommandAck`.
    AckMany(Vec<MessageIdData>),
    Nack(MessageIdData),
    /// magnetar patch: flow permits granted by the application (`ConsumerOptions::manual_flow`).
    Flow(u32),
    UnackedRedelivery,
    GetConnection(oneshot::Sender<Arc<Connection<Exe>>>),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct MessageData {
    pub id: MessageIdData,
    pub batch_size: Option<i32>,
    /// (magnetar patch) how many times the broker delivered the message before
    pub redelivery_count: u32,
}

#[derive(Debug, Clone)]
pub struct DeadLetterPolicy {
    /// Maximum number of times that a message will be redelivered before being sent to the dead
    /// letter queue.
    pub max_redeliver_count: usize,
    /// Name of the dead topic where the failing messages will be sent.
    pub dead_letter_topic: String,
}
