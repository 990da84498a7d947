//! Pulsar message ids as plugins see them (ABI 0.2.2, `messaging`): the serialized
//! `MessageIdData`, byte for byte what the Java client's `MessageId.toByteArray()` and the
//! C++/Python client's `MessageId.serialize()` give, so that an id passes between Magnetar's
//! plugins (Pulsar's WebSocket API hands them out base64-encoded) and the official clients.
//!
//! Those clients write the ledger and entry always, and the optional fields only when they
//! carry something: the partition when it is one (`>= 0`), the batch index and size only for
//! a message of a batch. The broker and the `pulsar` crate leave `-1` or `None` where the
//! clients leave the field out, so ids are normalized before they are written: the same
//! message gives the same bytes whichever path it took. A leaf: nothing here knows the rest
//! of the gateway.

use prost::Message as _;
use pulsar::proto::MessageIdData;

/// Why bytes are not a message id.
#[derive(Debug, thiserror::Error)]
#[error("not a serialized Pulsar message id: {0}")]
pub struct BadMessageId(#[from] prost::DecodeError);

/// The id of a message as the official clients serialize it.
pub fn encode(id: &MessageIdData) -> Vec<u8> {
    normalized(id).encode_to_vec()
}

/// A message id the official clients (or [`encode`]) serialized.
pub fn decode(bytes: &[u8]) -> Result<MessageIdData, BadMessageId> {
    Ok(normalized(&MessageIdData::decode(bytes)?))
}

/// `id` with only the fields the official clients write.
fn normalized(id: &MessageIdData) -> MessageIdData {
    let batch_size = id.batch_size.filter(|&s| s > 0);
    MessageIdData {
        ledger_id: id.ledger_id,
        entry_id: id.entry_id,
        partition: id.partition.filter(|&p| p >= 0),
        batch_index: id.batch_index.filter(|&i| i >= 0 && batch_size.is_some()),
        batch_size,
        ..Default::default()
    }
}

/// Where a message sits in its topic: entry, then index in its batch (`-1`: not batched).
pub fn order_key(id: &MessageIdData) -> (u64, u64, i32) {
    (id.ledger_id, id.entry_id, id.batch_index.unwrap_or(-1))
}

/// Pulsar's `MessageId.earliest` (`-1:-1:-1`): a position before every message.
pub fn earliest() -> MessageIdData {
    MessageIdData {
        ledger_id: u64::MAX,
        entry_id: u64::MAX,
        ..Default::default()
    }
}

/// Pulsar's `MessageId.latest` (`Long.MAX_VALUE` ledger and entry): the end of the topic.
pub fn latest() -> MessageIdData {
    MessageIdData {
        ledger_id: i64::MAX as u64,
        entry_id: i64::MAX as u64,
        ..Default::default()
    }
}

/// Whether `id` is [`earliest`] or [`latest`] rather than a message's id.
pub fn is_sentinel(id: &MessageIdData) -> bool {
    id.ledger_id >= i64::MAX as u64 || id.entry_id >= i64::MAX as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_entry_is_ledger_and_entry_only() {
        let id = MessageIdData {
            ledger_id: 7,
            entry_id: 42,
            partition: Some(-1),
            batch_index: Some(-1),
            ..Default::default()
        };
        // Field 1 (ledgerId) = 7, field 2 (entryId) = 42: what the Java client writes.
        assert_eq!(encode(&id), vec![0x08, 7, 0x10, 42]);
        let back = decode(&encode(&id)).unwrap();
        assert_eq!(
            (back.ledger_id, back.entry_id, back.partition),
            (7, 42, None)
        );
    }

    #[test]
    fn a_batched_message_keeps_its_index_and_size_and_round_trips() {
        let id = MessageIdData {
            ledger_id: 3,
            entry_id: 9,
            partition: Some(2),
            batch_index: Some(4),
            batch_size: Some(10),
            ..Default::default()
        };
        let back = decode(&encode(&id)).unwrap();
        assert_eq!(back, normalized(&id));
        assert_eq!(order_key(&back), (3, 9, 4));
        assert!(decode(b"\xff\xff").is_err());
    }
}
