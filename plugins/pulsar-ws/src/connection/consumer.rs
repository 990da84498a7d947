//! The consumer and reader endpoints (docs/pulsar-websocket-api.md §6, §7): deliveries of the
//! host's consumer become `ConsumerMessage`s; the client's commands become acks, nacks,
//! permits, an unsubscribe or an end-of-topic question.
//!
//! Flow: the host hands out at most the window (`receiverQueueSize`) of unacked deliveries,
//! which is exactly Pulsar's push mode. In pull mode the plugin holds what arrives and sends
//! one message per permit. A reader's "ack" is any text frame and frees one slot: the plugin
//! acks the named delivery at the host, or the oldest one when the frame names none.
//!
//! Acks are matched to deliveries by the id's fields (ledger, entry, partition, batch
//! index), so a client that re-encodes an id (with or without the optional fields) is
//! understood; the raw bytes are the fallback key for ids the plugin cannot parse.

use std::collections::{HashMap, VecDeque};

use magnetar_sdk::ops::Ops;
use magnetar_sdk::{Action, LogLevel, Message, OpError, SubId};

use super::{close_code, Pending, Phase, PulsarWsConnection};
use crate::frames::{self, Command, ConsumerCommand, ConsumerMessage, WsError};
use crate::message_id::{MessageId, BASE64};
use crate::request::Endpoint;
use base64::Engine;

/// The timer of the ack timeout.
const ACK_TIMEOUT_TIMER: u64 = 1;

/// How a delivery is found again when the client names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum IdKey {
    Parsed(MessageId),
    Raw(Vec<u8>),
}

impl IdKey {
    fn of(bytes: &[u8]) -> IdKey {
        match MessageId::parse(bytes) {
            Ok(id) => IdKey::Parsed(id),
            Err(_) => IdKey::Raw(bytes.to_vec()),
        }
    }
}

#[derive(Debug)]
struct Outstanding {
    delivery_id: u64,
    sent_ms: u64,
}

/// A consumer or reader session.
#[derive(Debug)]
pub(super) struct Consumer {
    sub: SubId,
    reader: bool,
    pull: bool,
    /// Pull mode: messages the client may still be sent.
    permits: i64,
    /// Pull mode: deliveries that wait for permits (at most the host's window).
    held: VecDeque<Message>,
    /// Sent to the client, not acked or nacked.
    outstanding: HashMap<IdKey, Outstanding>,
    /// The order they were sent in, for a reader's anonymous acks and the ack timeout; kept
    /// only for those, and entries acked meanwhile are skipped when met.
    order: VecDeque<IdKey>,
    keep_order: bool,
    ack_timeout_ms: u64,
    timer_armed: bool,
    /// The furthest message sent, for `isEndOfTopic`.
    last_sent: Option<IdKey>,
    /// `isEndOfTopic` questions awaiting the host's last message id.
    eot: Ops<()>,
    unsubscribed: bool,
}

impl Consumer {
    pub(super) fn new(sub: SubId, pending: &Pending, _now_ms: u64) -> Self {
        let reader = pending.target.endpoint == Endpoint::Reader;
        let (pull, ack_timeout_ms) = pending
            .consumer
            .as_ref()
            .map(|p| (p.pull_mode, p.ack_timeout_ms))
            .unwrap_or((false, 0));
        Consumer {
            sub,
            reader,
            pull,
            permits: 0,
            held: VecDeque::new(),
            outstanding: HashMap::new(),
            order: VecDeque::new(),
            keep_order: reader || ack_timeout_ms > 0,
            ack_timeout_ms,
            timer_armed: false,
            last_sent: None,
            // Tokens of this table never meet the connection's own (auth, open): they go
            // to a different completion (`on-position`).
            eot: Ops::new(),
            unsubscribed: false,
        }
    }

    fn remember(&mut self, key: IdKey, delivery_id: u64, now_ms: u64) {
        if self.keep_order {
            self.order.push_back(key.clone());
        }
        self.outstanding.insert(
            key,
            Outstanding {
                delivery_id,
                sent_ms: now_ms,
            },
        );
    }

    fn forget(&mut self, key: &IdKey) -> Option<Outstanding> {
        let gone = self.outstanding.remove(key);
        // Acked out of order, entries pile up in `order`: drop them once they dominate.
        if self.order.len() > 2 * self.outstanding.len() + 64 {
            let outstanding = &self.outstanding;
            self.order.retain(|k| outstanding.contains_key(k));
        }
        gone
    }

    /// The oldest delivery still outstanding.
    fn oldest(&mut self) -> Option<(IdKey, u64)> {
        while let Some(key) = self.order.front() {
            if let Some(o) = self.outstanding.get(key) {
                return Some((key.clone(), o.delivery_id));
            }
            self.order.pop_front();
        }
        None
    }
}

impl PulsarWsConnection {
    pub(super) fn on_message(&mut self, m: Message) {
        let Phase::Consuming(c) = &mut self.phase else {
            return;
        };
        if m.subscription != c.sub || c.unsubscribed {
            return;
        }
        if c.pull && c.permits <= 0 {
            c.held.push_back(m);
            return;
        }
        if c.pull {
            c.permits -= 1;
        }
        self.deliver(m);
    }

    fn deliver(&mut self, m: Message) {
        let now = self.now_ms;
        let Phase::Consuming(c) = &mut self.phase else {
            return;
        };
        let key = IdKey::of(&m.message_id);
        let further = match (&key, &c.last_sent) {
            (IdKey::Parsed(id), Some(IdKey::Parsed(last))) => id.at_or_after(last),
            _ => true,
        };
        if further {
            c.last_sent = Some(key.clone());
        }
        c.remember(key, m.delivery_id, now);
        let arm = c.ack_timeout_ms > 0 && !c.timer_armed;
        let delay = c.ack_timeout_ms;
        if arm {
            c.timer_armed = true;
        }
        let message = ConsumerMessage::new(
            &m.message_id,
            &m.payload,
            m.properties
                .iter()
                .map(|p| (p.key.as_str(), p.value.as_str())),
            m.publish_time_ms,
            m.redelivery_count,
            m.event_time_ms,
            m.key.as_deref(),
        );
        self.send_text_with(|out| message.write_json(out));
        if arm {
            self.out.push(Action::SetTimer {
                token: ACK_TIMEOUT_TIMER,
                delay_ms: delay,
            });
        }
    }

    pub(super) fn on_command(&mut self, text: String) {
        let Phase::Consuming(c) = &mut self.phase else {
            return;
        };
        let reader = c.reader;
        let command = match ConsumerCommand::parse(&text) {
            Ok(command) => command.command(),
            Err(e) => {
                self.log(LogLevel::Debug, format!("unreadable command: {e}"));
                return self.fail(
                    close_code::INVALID_PAYLOAD,
                    WsError::FailedToDeserializeFromJson.description(),
                );
            }
        };
        match command {
            Command::IsEndOfTopic => self.ask_end_of_topic(),
            // A reader takes any other frame as an ack that is not sent to the broker.
            Command::Ack(id) | Command::NegativeAcknowledge(id) if reader => {
                self.reader_ack(id.as_deref())
            }
            Command::Permit(_) | Command::Unsubscribe if reader => self.reader_ack(None),
            Command::Ack(id) => self.ack(id.as_deref(), false),
            Command::NegativeAcknowledge(id) => self.ack(id.as_deref(), true),
            Command::Permit(n) => self.permit(n),
            Command::Unsubscribe => self.unsubscribe(),
        }
    }

    fn ack(&mut self, id: Option<&str>, negative: bool) {
        let Some(bytes) = id.and_then(|t| BASE64.decode(t).ok()) else {
            self.log(LogLevel::Debug, format!("bad ack: messageId {id:?}"));
            return self.fail(
                close_code::INVALID_PAYLOAD,
                WsError::FailedToDeserializeFromJson.description(),
            );
        };
        let Phase::Consuming(c) = &mut self.phase else {
            return;
        };
        let sub = c.sub;
        let parsed = MessageId::parse(&bytes);
        // By its fields first, so that any encoding of the id is understood; by its bytes
        // for ids the host made that are not `MessageIdData` (simulated hosts).
        let found = match &parsed {
            Ok(p) => c.forget(&IdKey::Parsed(*p)),
            Err(_) => None,
        }
        .or_else(|| c.forget(&IdKey::Raw(bytes)));
        let Some(o) = found else {
            if let Err(e) = parsed {
                // Pulsar: `MessageId.fromByteArray` throws, the session is closed.
                self.log(LogLevel::Debug, format!("bad ack: {e}"));
                return self.fail(
                    close_code::INVALID_PAYLOAD,
                    WsError::FailedToDeserializeFromJson.description(),
                );
            }
            let what = if negative { "nack" } else { "ack" };
            return self.log(
                LogLevel::Debug,
                format!(
                    "{what} of a message that is not outstanding: {}",
                    id.unwrap_or("")
                ),
            );
        };
        if negative {
            self.out.push(Action::Nack {
                sub,
                delivery_id: o.delivery_id,
            });
        } else {
            self.out.ack(sub, o.delivery_id);
        }
    }

    fn reader_ack(&mut self, id: Option<&str>) {
        let Phase::Consuming(c) = &mut self.phase else {
            return;
        };
        let named = id
            .and_then(|t| BASE64.decode(t).ok())
            .map(|b| IdKey::of(&b))
            .and_then(|k| c.forget(&k));
        let freed = named.map(|o| o.delivery_id).or_else(|| {
            let (key, delivery_id) = c.oldest()?;
            c.forget(&key);
            Some(delivery_id)
        });
        if let Some(delivery_id) = freed {
            self.out.ack(c.sub, delivery_id);
        }
    }

    fn permit(&mut self, n: Option<i64>) {
        let Some(n) = n else {
            self.log(
                LogLevel::Debug,
                "Missing required permitMessages field for 'permit' command".into(),
            );
            return self.fail(
                close_code::INVALID_PAYLOAD,
                WsError::FailedToDeserializeFromJson.description(),
            );
        };
        let Phase::Consuming(c) = &mut self.phase else {
            return;
        };
        // Push mode ignores permits (`ConsumerHandler.handlePermit`).
        if !c.pull {
            return;
        }
        c.permits = c.permits.saturating_add(n);
        loop {
            let Phase::Consuming(c) = &mut self.phase else {
                return;
            };
            if c.permits <= 0 {
                return;
            }
            let Some(m) = c.held.pop_front() else {
                return;
            };
            c.permits -= 1;
            self.deliver(m);
        }
    }

    fn unsubscribe(&mut self) {
        let Phase::Consuming(c) = &mut self.phase else {
            return;
        };
        if c.unsubscribed {
            return;
        }
        c.unsubscribed = true;
        c.held.clear();
        c.outstanding.clear();
        c.order.clear();
        let sub = c.sub;
        self.out.push(Action::Unsubscribe { sub, delete: true });
    }

    fn ask_end_of_topic(&mut self) {
        let Phase::Consuming(c) = &mut self.phase else {
            return;
        };
        if c.unsubscribed {
            // Pulsar's closed consumer has not reached the end of anything.
            return self.send_text(&frames::end_of_topic(false));
        }
        let token = c.eot.start(());
        let sub = c.sub;
        self.out.push(Action::LastMessageId { token, sub });
    }

    pub(super) fn on_position_result(
        &mut self,
        token: u64,
        result: Result<Option<Vec<u8>>, OpError>,
    ) {
        let Phase::Consuming(c) = &mut self.phase else {
            return;
        };
        if c.eot.complete(token).is_none() {
            return;
        }
        let reached = match result {
            Ok(None) => true,
            Ok(Some(last)) => match (IdKey::of(&last), &c.last_sent) {
                (IdKey::Parsed(last), Some(IdKey::Parsed(sent))) => sent.at_or_after(&last),
                (last, Some(sent)) => last == *sent,
                (_, None) => false,
            },
            Err(_) => false,
        };
        self.send_text(&frames::end_of_topic(reached));
    }

    /// The ack timeout (`ackTimeoutMillis`): deliveries unacked that long are nacked, so
    /// the host hands them out again.
    pub(super) fn on_timer(&mut self, token: u64) {
        let now = self.now_ms;
        let Phase::Consuming(c) = &mut self.phase else {
            return;
        };
        if token != ACK_TIMEOUT_TIMER {
            return;
        }
        c.timer_armed = false;
        let mut expired = Vec::new();
        let mut next_due = None;
        while let Some((key, delivery_id)) = c.oldest() {
            let sent = c.outstanding.get(&key).map_or(now, |o| o.sent_ms);
            if sent + c.ack_timeout_ms > now {
                next_due = Some(sent + c.ack_timeout_ms - now);
                break;
            }
            c.order.pop_front();
            c.outstanding.remove(&key);
            expired.push(delivery_id);
        }
        let sub = c.sub;
        if let Some(delay_ms) = next_due {
            c.timer_armed = true;
            self.out.push(Action::SetTimer {
                token: ACK_TIMEOUT_TIMER,
                delay_ms,
            });
        }
        for delivery_id in expired {
            self.out.push(Action::Nack { sub, delivery_id });
        }
    }
}
