//! A stored entry: one `CommandSend` (a single message or a batch) as it sits in the log and
//! as it goes to consumers.
//!
//! Log record format (the log adds its own length and CRC around it):
//!
//! ```text
//! [u16 0x0e02][u64 BE broker timestamp, ms][u64 BE index]   entry header (18 bytes)
//! [u32 BE metadata size][MessageMetadata][payload as sent]  the "tail"
//! ```
//!
//! The tail is byte for byte the part of a Pulsar payload frame that the frame's CRC32C
//! covers, so delivering an entry copies it without re-encoding. The header is Apache Pulsar's
//! broker-entry metadata (`AppendBrokerTimestampMetadataInterceptor` and
//! `AppendIndexMetadataInterceptor`) in a fixed-size form, so that the topic actor can fill it
//! in place: `index` is the index of the entry's *last* message in the topic, counting every
//! message of every batch from 0 and continuing across restarts (the Kafka offset of the
//! entry's first message is `index - messages + 1`). Records written before the header
//! existed (starting with a metadata size, never `0x0e02` as sizes are < 6 MiB) are read
//! without broker-entry metadata.

use bytes::Bytes;
use prost::Message as _;
use pulsar::message::proto::{BrokerEntryMetadata, MessageMetadata};

const HEADER_MAGIC: [u8; 2] = [0x0e, 0x02];
/// Size of the entry header.
pub const HEADER_BYTES: usize = 18;

/// An entry ready to be sent: decoded metadata, and the wire tail with its checksum.
#[derive(Debug, Clone)]
pub struct StoredEntry {
    pub metadata: MessageMetadata,
    /// `[u32 metadata size][metadata][payload]`.
    pub tail: Bytes,
    /// CRC32C of `tail`.
    pub tail_crc: u32,
    /// Broker timestamp and index; `None` for records from before the header existed.
    pub broker: Option<BrokerEntryMetadata>,
}

impl StoredEntry {
    /// Messages in this entry (a batch counts each message).
    pub fn num_messages(&self) -> u64 {
        u64::try_from(self.metadata.num_messages_in_batch.unwrap_or(1).max(1)).unwrap_or(1)
    }

    /// Bytes this entry holds in memory.
    pub fn size(&self) -> usize {
        self.tail.len()
    }

    /// The payload as the producer sent it (compressed or batched as it was).
    #[cfg(test)]
    pub fn payload(&self) -> &[u8] {
        let meta_len = self
            .tail
            .get(..4)
            .map_or(0, |w| u32::from_be_bytes([w[0], w[1], w[2], w[3]]) as usize);
        self.tail.get(4 + meta_len..).unwrap_or(&[])
    }
}

/// A new entry being published: its tail and metadata; the header is written by
/// [`NewEntry::seal`] in the topic actor, which alone knows the index.
pub struct NewEntry {
    tail: Bytes,
    pub metadata: MessageMetadata,
    tail_crc: u32,
}

/// A sealed entry's log record, in its two parts: the header, and the tail (shared with the
/// [`StoredEntry`], so the record is not assembled in memory before the log writes it).
pub struct Record {
    pub header: [u8; HEADER_BYTES],
    pub tail: Bytes,
    /// CRC32C of `tail` (the log derives the record's checksum from it).
    pub tail_crc: u32,
}

impl Record {
    /// Bytes in the log (before the log's own framing).
    pub fn size(&self) -> usize {
        HEADER_BYTES + self.tail.len()
    }

    /// The record in one piece.
    #[cfg(test)]
    pub fn to_bytes(&self) -> Bytes {
        [&self.header[..], &self.tail].concat().into()
    }
}

impl NewEntry {
    /// Encodes `metadata` and `payload` (done on the connection's task, not the topic's).
    pub fn new(metadata: MessageMetadata, payload: &[u8]) -> NewEntry {
        let meta_len = metadata.encoded_len();
        let mut tail = Vec::with_capacity(4 + meta_len + payload.len());
        // Metadata is bounded by the frame size limit, far below u32::MAX.
        tail.extend_from_slice(&(meta_len as u32).to_be_bytes());
        // Encoding into a Vec cannot run out of space.
        let _ = metadata.encode(&mut tail);
        tail.extend_from_slice(payload);
        let tail_crc = crc32c::crc32c(&tail);
        NewEntry {
            tail: tail.into(),
            metadata,
            tail_crc,
        }
    }

    /// An entry whose tail is the checked part of the client's payload frame as received,
    /// `metadata` decoded from it unchanged, and `tail_crc` the frame's verified checksum:
    /// no copy, no re-encoding, no second checksum pass.
    pub fn from_wire(metadata: MessageMetadata, tail: Bytes, tail_crc: u32) -> NewEntry {
        NewEntry {
            tail,
            metadata,
            tail_crc,
        }
    }

    /// Fills in the header; returns the log record and the entry to cache and deliver.
    pub fn seal(self, broker_timestamp: u64, index: u64) -> (Record, StoredEntry) {
        let mut header = [0u8; HEADER_BYTES];
        header[..2].copy_from_slice(&HEADER_MAGIC);
        header[2..10].copy_from_slice(&broker_timestamp.to_be_bytes());
        header[10..18].copy_from_slice(&index.to_be_bytes());
        let record = Record {
            header,
            tail: self.tail.clone(),
            tail_crc: self.tail_crc,
        };
        let entry = StoredEntry {
            metadata: self.metadata,
            tail: self.tail,
            tail_crc: self.tail_crc,
            broker: Some(BrokerEntryMetadata {
                broker_timestamp: Some(broker_timestamp),
                index: Some(index),
            }),
        };
        (record, entry)
    }
}

impl NewEntry {
    /// The entry as it goes to consumers without being stored (a non-persistent topic's
    /// message): no header, so no broker-entry metadata.
    pub fn into_unstored(self) -> StoredEntry {
        StoredEntry {
            metadata: self.metadata,
            tail: self.tail,
            tail_crc: self.tail_crc,
            broker: None,
        }
    }
}

/// Decodes a log record; `None` if it is not a well-formed entry.
pub fn decode(record: Bytes) -> Option<StoredEntry> {
    let (broker, tail) = if record.get(..2) == Some(&HEADER_MAGIC[..]) {
        let h = record.get(..HEADER_BYTES)?;
        let word = |r: std::ops::Range<usize>| -> Option<u64> {
            Some(u64::from_be_bytes(h.get(r)?.try_into().ok()?))
        };
        let meta = BrokerEntryMetadata {
            broker_timestamp: Some(word(2..10)?),
            index: Some(word(10..18)?),
        };
        (Some(meta), record.slice(HEADER_BYTES..))
    } else {
        (None, record)
    };
    let meta_len = u32::from_be_bytes(tail.get(..4)?.try_into().ok()?) as usize;
    let metadata = MessageMetadata::decode(tail.get(4..4usize.checked_add(meta_len)?)?).ok()?;
    Some(StoredEntry {
        metadata,
        tail_crc: crc32c::crc32c(&tail),
        tail,
        broker,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_legacy_records_and_garbage() {
        let meta = MessageMetadata {
            producer_name: "p".into(),
            sequence_id: 3,
            num_messages_in_batch: Some(2),
            ..Default::default()
        };
        let (record, sealed) = NewEntry::new(meta.clone(), b"payload").seal(1234, 41);
        let record = record.to_bytes();
        let e = decode(record.clone()).unwrap();
        assert_eq!(e.metadata, meta);
        assert_eq!(e.payload(), b"payload");
        assert_eq!(e.num_messages(), 2);
        assert_eq!(e.tail_crc, sealed.tail_crc);
        assert_eq!(e.broker.unwrap().index, Some(41));
        // A record without the header (the first format) still reads, without metadata.
        let legacy = decode(record.slice(HEADER_BYTES..)).unwrap();
        assert_eq!(legacy.metadata, meta);
        assert!(legacy.broker.is_none());
        assert!(decode(Bytes::from_static(&[0, 0, 0, 9, 1])).is_none());
        assert!(decode(Bytes::new()).is_none());
        assert!(decode(Bytes::from_static(&[0x0e, 0x02, 1])).is_none());
    }
}
