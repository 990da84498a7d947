//! Host calls of messaging (ABI 0.2.2): `send-message`, `open-consumer`, `nack`, `seek`,
//! `last-message-id` — Pulsar's own message model for plugins that expose it; and of `flow`
//! (ABI 0.2.6): `drain`, a consumer that takes nothing more but keeps what it holds.
//!
//! The same paths as pubsub's, with more said: a publish goes through the connection's
//! ordered operations (checked, sealed, metered) and completes with the stored message's id;
//! a consumer is a subscription task (`subscription_task`) whose messages carry their ids,
//! event times and redelivery counts, which nacks, seeks and last-id queries reach through
//! its command channel. Ids cross the boundary serialized as the official clients do
//! (`crate::message_id`).

use std::time::Duration;

use super::context::{op_error, HostState};
use super::event::Event;
use super::pubsub::{backend_message, sub_type, MAX_UNACKED};
use super::subscription_task::{SeekTarget, Shape, SubCmd};
use crate::abi::types::{self, ErrorKind, OpError};
use crate::abi::v0_2::magnetar::plugin::flow;
use crate::abi::v0_2::magnetar::plugin::messaging::{
    self, ConsumerSpec, MessageOut, Position, TopicRef,
};
use crate::backend::SubscribeOptions;
use crate::config::ActionName;
use crate::message_id;

/// Longest nack delay a plugin may ask for.
const MAX_NACK_DELAY: Duration = Duration::from_secs(3600);

impl HostState {
    /// The backend topic of a `topic-ref`, checked and authorized.
    fn messaging_topic(
        &self,
        conn: u64,
        topic: &TopicRef,
        action: ActionName,
    ) -> Result<String, OpError> {
        let url = self.authorized_topic(conn, &topic.name, action)?;
        Ok(if topic.persistent {
            url
        } else {
            format!("non-{url}")
        })
    }

    /// Sends a command to a consumer's task, or completes `token` with "no such consumer".
    fn consumer_cmd(&mut self, conn: u64, sub: u64, token: Option<u64>, cmd: SubCmd) {
        let sent = self
            .conns
            .get(&conn)
            .and_then(|s| s.subs.get(&sub))
            .map(|tx| tx.try_send(cmd).is_ok());
        match (sent, token) {
            (Some(true), _) => {}
            (None, Some(token)) => self.complete(Event::Position {
                conn,
                token,
                outcome: Err(op_error(ErrorKind::NotFound, "no such consumer")),
            }),
            (Some(false), Some(token)) => self.complete(Event::Position {
                conn,
                token,
                outcome: Err(op_error(
                    ErrorKind::QuotaExceeded,
                    "too many commands queued for this consumer",
                )),
            }),
            (_, None) => {
                tracing::warn!(plugin = %self.plugin, conn, sub, "negative ack or drain dropped: no such consumer or too many queued")
            }
        }
    }
}

/// A position as a seek target (earliest and latest are Pulsar's own sentinel ids).
fn seek_target(position: Position) -> Result<SeekTarget, OpError> {
    Ok(match position {
        Position::Earliest => SeekTarget::MessageId(message_id::earliest(), true),
        Position::Latest => SeekTarget::MessageId(message_id::latest(), true),
        Position::MessageId(at) => SeekTarget::MessageId(
            message_id::decode(&at.id)
                .map_err(|e| op_error(ErrorKind::InvalidName, e.to_string()))?,
            at.inclusive,
        ),
        Position::PublishTime(t) => SeekTarget::PublishTime(t),
    })
}

impl messaging::Host for HostState {
    /// `send-message`: stores a message; completes with `events.on-receipts`.
    fn send_message(&mut self, conn: u64, token: u64, msg: MessageOut) {
        let topic = self.messaging_topic(conn, &msg.topic, ActionName::Produce);
        let mut out = backend_message(types::OutboundMessage {
            topic: msg.topic.name,
            key: msg.key,
            payload: msg.payload,
            properties: msg.properties,
        });
        out.event_time = msg.event_time_ms;
        self.queue_publish(conn, token, topic, out, true);
    }

    /// `open-consumer`: a subscription or a reader; completes with `on-subscribe-result`.
    fn open_consumer(&mut self, conn: u64, token: u64, spec: ConsumerSpec) {
        let opts = (|| {
            let topic = self.messaging_topic(conn, &spec.topic, ActionName::Consume)?;
            let (subscription, durable) = match &spec.subscription {
                Some(name) => {
                    crate::names::validate_name(name)
                        .map_err(|e| op_error(ErrorKind::InvalidName, e.to_string()))?;
                    (name.clone(), true)
                }
                // A reader: a non-durable subscription of its own.
                None => (format!("reader-{conn}-{}", self.next_sub), false),
            };
            let dead_letter = match (&spec.dead_letter_topic, spec.max_redeliveries) {
                (Some(name), n) if n > 0 => Some(pulsar::consumer::DeadLetterPolicy {
                    max_redeliver_count: n as usize,
                    dead_letter_topic: self.authorized_topic(conn, name, ActionName::Produce)?,
                }),
                _ => None,
            };
            let (earliest, start_message_id, skip) = match seek_target(spec.start.clone())? {
                SeekTarget::MessageId(id, _) if message_id::is_sentinel(&id) => {
                    (id == message_id::earliest(), None, None)
                }
                // A durable subscription starts at its initial position; a reader anywhere.
                SeekTarget::MessageId(id, inclusive) if !durable => {
                    (false, Some(id.clone()), Some((id, inclusive)))
                }
                SeekTarget::MessageId(..) | SeekTarget::PublishTime(_) => {
                    return Err(op_error(
                        ErrorKind::InvalidName,
                        "a subscription starts at the earliest or the latest message; seek it to go elsewhere",
                    ))
                }
            };
            Ok(SubscribeOptions {
                topic,
                subscription,
                sub_type: sub_type(spec.mode),
                durable,
                earliest,
                receiver_queue: spec.max_unacked.clamp(1, MAX_UNACKED),
                start_message_id,
                dead_letter,
                consumer_name: spec.consumer_name.clone(),
            })
            .map(|o| (o, skip))
        })();
        let nack_delay = Duration::from_millis(spec.nack_delay_ms).min(MAX_NACK_DELAY);
        let (opts, skip) = match opts {
            Ok((o, skip)) => (Ok(o), skip),
            Err(e) => (Err(e), None),
        };
        self.start_subscription(conn, token, opts, Shape::Messages { nack_delay, skip });
    }

    /// `nack`: the message comes back after the consumer's nack delay.
    fn nack(&mut self, conn: u64, sub: u64, delivery_id: u64) {
        // A capped queue counts it again now, before the connection's next publish.
        if let Some(h) = self.conns.get(&conn).and_then(|s| s.held.get(&sub)) {
            h.given_back(&self.services.caps, delivery_id);
        }
        self.consumer_cmd(conn, sub, None, SubCmd::Nack(delivery_id));
    }

    /// `seek`: moves a consumer; completes with `events.on-position`.
    fn seek(&mut self, conn: u64, token: u64, sub: u64, position: Position) {
        match seek_target(position) {
            Ok(target) => self.consumer_cmd(conn, sub, Some(token), SubCmd::Seek { token, target }),
            Err(e) => self.complete(Event::Position {
                conn,
                token,
                outcome: Err(e),
            }),
        }
    }

    /// `last-message-id`: the topic's last message; completes with `events.on-position`.
    fn last_message_id(&mut self, conn: u64, token: u64, sub: u64) {
        self.consumer_cmd(conn, sub, Some(token), SubCmd::LastId { token });
    }
}

impl flow::Host for HostState {
    /// `drain`: the consumer takes no more messages; acks and nacks of what it delivered
    /// still reach it.
    fn drain(&mut self, conn: u64, sub: u64) {
        self.consumer_cmd(conn, sub, None, SubCmd::Drain);
    }
}
