//! Queue caps as RabbitMQ 3.x classic queues apply them (`x-max-length`,
//! `x-max-length-bytes`, `x-overflow`; `rabbit_amqqueue_process`: `will_overflow`,
//! `maybe_drop_head`), counted and enforced by the host (ABI 0.2.5 `caps`): a queue's length
//! is its ready messages, and its bytes the sum of their bodies.
//!
//! - Every opening of a queue's route gives the host the queue's cap
//!   (`channel::queue_route_action`), so that the route's stored record always has it.
//! - A client's publish goes through `publish-capped`: the queues that refuse it (a full
//!   `reject-publish` or `reject-publish-dlx` queue) are known at once. In confirm mode its
//!   confirm is then `basic.nack` (RabbitMQ nacks a message that any of its queues
//!   rejected; the other queues keep it), and each `reject-publish-dlx` queue dead-letters
//!   it (reason `maxlen`) to its own dead-letter exchange, read from the queue's record.
//!   Dead-lettered copies are published capped too, but what a full queue refuses of them
//!   is dropped there (not dead-lettered again: no cycle).
//! - `drop-head`: a delivery the host marks as dropped from the head is dead-lettered
//!   (reason `maxlen`) or dropped instead of handed to the client (`channel::expire`).

use std::collections::HashSet;

use magnetar_sdk::{Message, OutboundMessage, Refusal};

use super::channel::{message_fields, Delivered};
use super::*;
use crate::queue_policy::{QueuePolicy, Reason};
use crate::topology::{self, Queue};

/// The property of a delivery that the host dropped from its queue's head (`caps`).
pub(super) const DROPPED_PROPERTY: &str = "__magnetar.dropped";

/// Publishes (their tokens) that a full queue refused: their confirm is a nack.
pub(super) type Refused = HashSet<u64>;

/// Whether the host dropped `m` from its queue's head (`drop-head`).
pub(super) fn dropped_by_cap(m: &Message) -> bool {
    m.properties.iter().any(|p| p.key == DROPPED_PROPERTY)
}

impl AmqpConnection {
    /// Queues refused the message of the publish `token`.
    pub(super) fn on_publish_refused(
        &mut self,
        token: u64,
        refusals: Vec<Refusal>,
        msg: OutboundMessage,
    ) {
        if !matches!(
            self.ops.get(token),
            Some(Op::Publish { .. } | Op::TxPublish { .. })
        ) {
            return;
        }
        self.refused.insert(token);
        let (exchange, routing_key, properties) = message_fields(&msg.properties);
        for r in refusals.into_iter().filter(|r| r.dead_letter) {
            let Some(queue) = topology::queue_of_topic(&r.queue) else {
                continue;
            };
            let d = Delivered {
                exchange: exchange.clone(),
                routing_key: routing_key.clone(),
                properties: properties.clone(),
                payload: msg.payload.clone(),
            };
            let key = topology::queue_key(&queue);
            let token = self.ops.start(Op::RefusedDeadLetter {
                queue,
                d: Box::new(d),
            });
            self.out.push(Action::KvGet { token, key });
        }
    }

    /// Whether a full queue refused the publish `token` (forgotten once asked).
    pub(super) fn take_refused(&mut self, token: u64) -> bool {
        self.refused.remove(&token)
    }

    /// The record of a `reject-publish-dlx` queue that refused a message: the message is
    /// dead-lettered from it.
    pub(super) fn on_refused_record(
        &mut self,
        queue: String,
        d: Delivered,
        result: Result<Option<Vec<u8>>, OpError>,
    ) {
        let Some(q) = result.ok().flatten().and_then(|b| Queue::decode(&b)) else {
            return;
        };
        let policy = QueuePolicy::of(&queue, &q);
        self.publish_dead_letter(&policy, d, Reason::Maxlen);
    }
}
