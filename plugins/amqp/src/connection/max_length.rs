//! `x-max-length` with RabbitMQ's default overflow, `drop-head`: a queue keeps its newest
//! `x-max-length` messages; older ones are dropped, or dead-lettered with reason `maxlen`
//! (RabbitMQ 3.x, `rabbit_amqqueue_process:maybe_drop_head`).
//!
//! RabbitMQ drops the head as a message arrives. Here the host copies messages into a
//! queue's topic after their publisher's confirm, and nothing counts a queue's backlog, so
//! the plugin decides where a message leaves the queue, as it does for TTLs: a queue's
//! copies are one message per entry of its topic, so a message whose entry is `n` entries
//! before the topic's last has `n` messages behind it, and goes if `n >= x-max-length`.
//! The topic's last entry is read (`last-message-id`) when a consumer or `basic.get`
//! consumer of a capped queue opens (its messages wait for it), and again once a message
//! newer than the one known arrives. So the messages that survive a backlog are exactly
//! RabbitMQ's; a burst arriving while a consumer already reads the queue is judged against
//! the last entry as last read (a message may get through that RabbitMQ would have dropped
//! a moment before); messages acknowledged out of order (after a requeue) still count as
//! behind an older one, where RabbitMQ counts ready messages only.
//!
//! Not here: `reject-publish` and `reject-publish-dlx` (a publisher's nack needs the
//! queue's length when the message is routed, which only the host's feeder could know) and
//! `x-max-length-bytes`; such queues keep every message.

use std::collections::HashMap;

use magnetar_sdk::{Message, SubId};

use super::*;

/// What a consumer of a capped queue knows of its topic's end.
#[derive(Debug, Default)]
pub(super) struct Cap {
    /// The entry id of the topic's last message, once read.
    tail: Option<u64>,
    /// A read of it is in flight.
    reading: bool,
    /// Messages that arrived before the first read answered.
    waiting: Vec<Message>,
}

/// Consumers of capped queues, by subscription.
pub(super) type Caps = HashMap<SubId, Cap>;

/// The entry id of a serialized `MessageIdData` (field 2, `entryId`); `None` for bytes that
/// are not one.
pub(crate) fn entry_id(id: &[u8]) -> Option<u64> {
    let mut rest = id;
    let mut entry = None;
    while let Some((&tag, tail)) = rest.split_first() {
        rest = tail;
        match tag & 7 {
            // Varint.
            0 => {
                let mut value = 0u64;
                let mut shift = 0;
                loop {
                    let (&b, tail) = rest.split_first()?;
                    rest = tail;
                    if shift > 63 {
                        return None;
                    }
                    value |= u64::from(b & 0x7f) << shift;
                    shift += 7;
                    if b & 0x80 == 0 {
                        break;
                    }
                }
                if tag >> 3 == 2 {
                    entry = Some(value);
                }
            }
            // Length-delimited (e.g. the batch's ack set): skipped.
            2 => {
                let (&len, tail) = rest.split_first()?;
                if len & 0x80 != 0 {
                    return None;
                }
                rest = tail.get(usize::from(len)..)?;
            }
            _ => return None,
        }
    }
    entry
}

impl AmqpConnection {
    /// A consumer or `basic.get` consumer of a queue with `x-max-length` opened: its topic's
    /// end is read before its messages are judged.
    pub(super) fn cap_opened(&mut self, sub: SubId) {
        if self
            .policies
            .get(&sub)
            .is_some_and(|p| p.max_length.is_some())
        {
            self.caps.insert(sub, Cap::default());
            self.read_tail(sub);
        }
    }

    fn read_tail(&mut self, sub: SubId) {
        if let Some(cap) = self.caps.get_mut(&sub) {
            cap.reading = true;
            let token = self.ops.start(Op::Tail { sub });
            self.out.push(Action::LastMessageId { token, sub });
        }
    }

    /// A message of a capped queue's consumer waits while its topic's end is unknown:
    /// `None` then, else the message back.
    pub(super) fn cap_hold(&mut self, m: Message) -> Option<Message> {
        match self.caps.get_mut(&m.subscription) {
            Some(cap) if cap.tail.is_none() => {
                cap.waiting.push(m);
                None
            }
            _ => Some(m),
        }
    }

    /// The topic's last message id: the messages that waited for it go on.
    pub(super) fn on_tail(&mut self, sub: SubId, result: Result<Option<Vec<u8>>, OpError>) {
        let Some(cap) = self.caps.get_mut(&sub) else {
            return;
        };
        cap.reading = false;
        let tail = match result {
            Ok(Some(id)) => entry_id(&id),
            // An empty topic: whatever arrives next is its newest.
            Ok(None) => Some(0),
            Err(_) => None,
        };
        let waiting = std::mem::take(&mut cap.waiting);
        match tail {
            Some(t) => cap.tail = Some(cap.tail.map_or(t, |old| old.max(t))),
            // Ids this plugin cannot read: no cap rather than no messages.
            None => {
                self.caps.remove(&sub);
            }
        }
        for m in waiting {
            self.on_message(m);
        }
    }

    /// Whether `m` is beyond its queue's `x-max-length` (`x-max-length` newer messages
    /// behind it): then it is dead-lettered (reason `maxlen`) or dropped.
    pub(super) fn beyond_max_length(&mut self, m: &Message) -> bool {
        let Some(max) = self
            .policies
            .get(&m.subscription)
            .and_then(|p| p.max_length)
        else {
            return false;
        };
        let Some(entry) = entry_id(&m.message_id) else {
            return false;
        };
        let Some(cap) = self.caps.get_mut(&m.subscription) else {
            return false;
        };
        let Some(tail) = cap.tail else {
            return false;
        };
        if entry > tail {
            // Newer than the end as last read: read it again for the next ones.
            cap.tail = Some(entry);
            if !cap.reading {
                self.read_tail(m.subscription);
            }
            return false;
        }
        tail - entry >= max
    }
}

#[cfg(test)]
mod tests {
    use super::entry_id;

    #[test]
    fn entry_ids_are_read_from_message_id_data() {
        // ledgerId 7, entryId 300, partition -1 (10 bytes), batchIndex 2.
        let mut id = vec![0x08, 7, 0x10, 0xac, 0x02, 0x18];
        id.extend([0xff; 9]);
        id.push(0x01);
        id.extend([0x20, 2]);
        assert_eq!(entry_id(&id), Some(300));
        assert_eq!(entry_id(&[0x08, 7]), None);
        assert_eq!(entry_id(&[0x10]), None);
        assert_eq!(entry_id(&[0x10, 0x80]), None);
        assert_eq!(entry_id(&[0x13, 1]), None);
    }
}
