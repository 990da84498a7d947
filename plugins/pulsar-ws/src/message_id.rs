//! Pulsar message ids as the WebSocket API carries them: base64 of a serialized
//! `MessageIdData` (`PulsarApi.proto`), byte for byte what the official clients'
//! `MessageId.toByteArray()` / `serialize()` produce.
//!
//! The host hands the plugin ids already serialized (receipts, deliveries), so the plugin
//! mostly passes bytes through. It parses an id only where the client sends one back: to
//! refuse what is not an id (as `MessageIdImpl.fromByteArray` does), to match an ack with
//! its delivery whatever optional fields the client's encoding kept, and to recognise
//! Pulsar's `earliest` / `latest` sentinels in a reader's start position.
//!
//! The protobuf subset is written here (varints, four fields) rather than pulled in: a
//! protobuf runtime would be most of the component for 30 lines of work.

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine;

/// `java.util.Base64.getDecoder()` semantics: standard alphabet, `=` padding optional (but
/// checked when present), unused trailing bits ignored. Encoding is padded, as Java's.
pub const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

/// The fields of a `MessageIdData` that name a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId {
    pub ledger: u64,
    pub entry: u64,
    /// -1: not a partition of a partitioned topic (the field is then absent).
    pub partition: i32,
    /// -1: not in a batch.
    pub batch_index: i32,
}

/// Why bytes are not a `MessageIdData`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("message id is not valid base64: {0}")]
    Base64(String),
    #[error("message id is not a serialized MessageIdData: {0}")]
    Protobuf(&'static str),
}

impl MessageId {
    /// `MessageId.earliest` of the Java client: `(-1, -1, -1)`.
    pub const EARLIEST: MessageId = MessageId {
        ledger: u64::MAX,
        entry: u64::MAX,
        partition: -1,
        batch_index: -1,
    };
    /// `MessageId.latest` of the Java client: `(Long.MAX_VALUE, Long.MAX_VALUE, -1)`.
    pub const LATEST: MessageId = MessageId {
        ledger: i64::MAX as u64,
        entry: i64::MAX as u64,
        partition: -1,
        batch_index: -1,
    };

    /// Parses a serialized `MessageIdData`; unknown fields are skipped, the two required
    /// ones must be there (LightProto's `checkRequiredFields`).
    pub fn parse(bytes: &[u8]) -> Result<MessageId, IdError> {
        let mut r = Reader { bytes, pos: 0 };
        let (mut ledger, mut entry) = (None, None);
        let mut id = MessageId {
            ledger: 0,
            entry: 0,
            partition: -1,
            batch_index: -1,
        };
        while !r.done() {
            let key = r.varint()?;
            let (field, wire) = (key >> 3, key & 7);
            match (field, wire) {
                (1, 0) => ledger = Some(r.varint()?),
                (2, 0) => entry = Some(r.varint()?),
                // int32 fields are sign-extended varints: truncation is the protobuf rule.
                (3, 0) => id.partition = r.varint()? as i32,
                (4, 0) => id.batch_index = r.varint()? as i32,
                (_, 0) => {
                    r.varint()?;
                }
                (_, 1) => r.skip(8)?,
                (_, 2) => {
                    let len = usize::try_from(r.varint()?)
                        .map_err(|_| IdError::Protobuf("length out of range"))?;
                    r.skip(len)?;
                }
                (_, 5) => r.skip(4)?,
                _ => return Err(IdError::Protobuf("unsupported wire type")),
            }
        }
        id.ledger = ledger.ok_or(IdError::Protobuf("ledgerId missing"))?;
        id.entry = entry.ok_or(IdError::Protobuf("entryId missing"))?;
        Ok(id)
    }

    /// Decodes the base64 form a client sends.
    pub fn from_base64(text: &str) -> Result<MessageId, IdError> {
        let bytes = BASE64
            .decode(text)
            .map_err(|e| IdError::Base64(e.to_string()))?;
        MessageId::parse(&bytes)
    }

    /// Serializes as `MessageIdImpl.toByteArray()` does: the partition only when it is one,
    /// the batch index only in a batch, and `batch_size` always (0 outside a batch).
    pub fn to_bytes(&self, batch_size: i32) -> Vec<u8> {
        let mut out = Vec::with_capacity(24);
        put_field(&mut out, 1, self.ledger);
        put_field(&mut out, 2, self.entry);
        if self.partition >= 0 {
            put_field(&mut out, 3, self.partition as u64);
        }
        if self.batch_index != -1 {
            put_field(&mut out, 4, i64::from(self.batch_index) as u64);
        }
        if batch_size > -1 {
            put_field(&mut out, 6, batch_size as u64);
        }
        out
    }

    /// Whether the id names a position at or after `other` in its topic (same partition):
    /// ledgers, then entries, then batch indexes.
    pub fn at_or_after(&self, other: &MessageId) -> bool {
        (self.ledger, self.entry, self.batch_index)
            >= (other.ledger, other.entry, other.batch_index)
    }
}

/// Base64 of an id as the host serialized it.
pub fn encode(bytes: &[u8]) -> String {
    BASE64.encode(bytes)
}

fn put_field(out: &mut Vec<u8>, field: u64, value: u64) {
    put_varint(out, field << 3);
    put_varint(out, value);
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn done(&self) -> bool {
        self.pos >= self.bytes.len()
    }

    fn varint(&mut self) -> Result<u64, IdError> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = *self
                .bytes
                .get(self.pos)
                .ok_or(IdError::Protobuf("truncated varint"))?;
            self.pos += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(IdError::Protobuf("varint longer than 10 bytes"))
    }

    fn skip(&mut self, n: usize) -> Result<(), IdError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|end| *end <= self.bytes.len())
            .ok_or(IdError::Protobuf("truncated field"))?;
        self.pos = end;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(ledger: u64, entry: u64, partition: i32, batch_index: i32) -> MessageId {
        MessageId {
            ledger,
            entry,
            partition,
            batch_index,
        }
    }

    #[test]
    fn encodes_as_the_java_client_does() {
        // The examples of docs/pulsar-websocket-api.md §8.
        assert_eq!(encode(&id(7, 0, -1, -1).to_bytes(0)), "CAcQADAA");
        assert_eq!(encode(&id(7, 3, 2, 1).to_bytes(5)), "CAcQAxgCIAEwBQ==");
        assert_eq!(
            encode(&MessageId::EARLIEST.to_bytes(0)),
            "CP///////////wEQ////////////ATAA"
        );
        assert_eq!(
            encode(&MessageId::LATEST.to_bytes(0)),
            "CP//////////fxD//////////38wAA=="
        );
    }

    #[test]
    fn parses_what_it_encodes_and_the_sentinels() {
        for m in [
            id(0, 0, -1, -1),
            id(7, 3, 2, 1),
            id(u64::MAX, 1 << 40, 0, 0),
            MessageId::EARLIEST,
            MessageId::LATEST,
        ] {
            assert_eq!(MessageId::parse(&m.to_bytes(0)), Ok(m));
            assert_eq!(MessageId::parse(&m.to_bytes(-1)), Ok(m));
        }
        assert_eq!(
            MessageId::from_base64("CP///////////wEQ////////////ATAA"),
            Ok(MessageId::EARLIEST)
        );
        // Unpadded, as Java's decoder accepts.
        assert_eq!(MessageId::from_base64("CAcQAxgCIAEwBQ"), Ok(id(7, 3, 2, 1)));
    }

    #[test]
    fn skips_unknown_fields_and_an_explicit_default_partition() {
        // ack_set (5, packed as length-delimited), first_chunk_message_id (7), a fixed64 (9)
        // and partition = -1 written out (a 10-byte varint).
        let mut b = id(1, 2, -1, -1).to_bytes(0);
        b.extend([0x2a, 0x02, 0x01, 0x02]);
        b.extend([0x3a, 0x04, 0x08, 0x01, 0x10, 0x01]);
        b.extend([0x49, 1, 2, 3, 4, 5, 6, 7, 8]);
        b.push(0x18);
        b.extend([0xff; 9]);
        b.push(0x01);
        assert_eq!(MessageId::parse(&b), Ok(id(1, 2, -1, -1)));
    }

    #[test]
    fn refuses_what_is_not_an_id() {
        assert!(MessageId::parse(b"").is_err(), "required fields");
        assert!(MessageId::parse(&[0x08, 0x01]).is_err(), "no entryId");
        assert!(MessageId::parse(&[0x08]).is_err(), "truncated");
        assert!(MessageId::parse(&[0x08, 0x01, 0x10, 0x01, 0x1a, 0x05]).is_err());
        assert!(MessageId::parse(&[0x0b]).is_err(), "wire type 3");
        assert!(MessageId::parse(&[
            0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01
        ])
        .is_err());
        assert!(matches!(
            MessageId::from_base64("not base64!"),
            Err(IdError::Base64(_))
        ));
    }

    #[test]
    fn any_bytes_never_panic() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for len in 0..200 {
            let bytes: Vec<u8> = (0..len % 23)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            let _ = MessageId::parse(&bytes);
        }
    }

    #[test]
    fn orders_positions_by_ledger_entry_and_batch() {
        assert!(id(2, 0, -1, -1).at_or_after(&id(1, 9, -1, -1)));
        assert!(id(1, 9, -1, -1).at_or_after(&id(1, 9, -1, -1)));
        assert!(!id(1, 8, -1, -1).at_or_after(&id(1, 9, -1, -1)));
        assert!(id(1, 9, -1, 3).at_or_after(&id(1, 9, -1, 2)));
    }
}
