//! The calls and events of ABI 0.2.2 that this plugin uses (`messaging`, `events`), in the
//! shapes the SDK will give them (notes/contract.md §2), until the SDK has them. Only this
//! module and the two `pending` helpers of the connection change when it does.

use magnetar_sdk::{OpError, Property, SubId, SubMode};

/// A topic of the connection's namespace: a short name, persistent or not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicRef {
    pub name: String,
    pub persistent: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageOut {
    pub topic: TopicRef,
    pub key: Option<String>,
    pub payload: Vec<u8>,
    pub properties: Vec<Property>,
    pub event_time_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageIdAt {
    pub id: Vec<u8>,
    pub inclusive: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Position {
    Earliest,
    Latest,
    MessageId(MessageIdAt),
    PublishTime(u64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerSpec {
    pub topic: TopicRef,
    pub subscription: Option<String>,
    pub mode: SubMode,
    pub start: Position,
    pub max_unacked: u32,
    pub nack_delay_ms: u64,
    pub max_redeliveries: u32,
    pub dead_letter_topic: Option<String>,
    pub consumer_name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    pub token: u64,
    pub outcome: Result<Vec<u8>, OpError>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub subscription: SubId,
    pub delivery_id: u64,
    pub message_id: Vec<u8>,
    pub key: Option<String>,
    pub payload: Vec<u8>,
    pub properties: Vec<Property>,
    pub publish_time_ms: u64,
    pub event_time_ms: Option<u64>,
    pub redelivery_count: u32,
}

/// A host call of ABI 0.2.2 (the SDK's `Action::{SendMessage, OpenConsumer, Nack,
/// LastMessageId}` to be).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    SendMessage { token: u64, msg: MessageOut },
    OpenConsumer { token: u64, spec: ConsumerSpec },
    Nack { sub: SubId, delivery_id: u64 },
    LastMessageId { token: u64, sub: SubId },
}
