//! Produce v0-2's records: a message set of magic 0 or 1 (`codec::message_set`, wrappers
//! expanded), which becomes the same messages as a v3+ record batch, in one append.
//!
//! Errors are those a 0.10 broker answered, which these clients know: bytes that do not
//! decode, a nested or empty wrapper and an empty set are `CORRUPT_MESSAGE` (0.10's
//! `InvalidMessageException`; `INVALID_RECORD` came with KIP-98), too much data once
//! decompressed `RECORD_LIST_TOO_LARGE`, an unknown codec `UNSUPPORTED_COMPRESSION_TYPE`,
//! and so is zstd, which only record batches v2 may carry (KIP-110).

use bytes::Bytes;
use magnetar_sdk::RecordOut;

use super::error;
use crate::codec::message_set;
use crate::codec::records::{Limits, RecordsError};
use crate::message;

/// The messages of a partition's message set, or the Kafka error code that refuses it.
pub(super) fn message_set_records(bytes: &Bytes, limits: Limits) -> Result<Vec<RecordOut>, i16> {
    if wrapper_codecs(bytes).any(|codec| codec == ZSTD) {
        return Err(error::UNSUPPORTED_COMPRESSION_TYPE);
    }
    let records = message_set::decode(bytes, limits).map_err(|e| match e {
        RecordsError::Invalid(_) => error::CORRUPT_MESSAGE,
        e => e.kafka_error(),
    })?;
    if records.is_empty() {
        return Err(error::CORRUPT_MESSAGE);
    }
    Ok(records.iter().map(message::record_out).collect())
}

/// The codec bits of a message's attributes for zstd.
const ZSTD: u8 = 4;

/// The codec of each outer message of a set (offset and size, crc, magic, then attributes),
/// as far as the bytes go; `message_set::decode` checks the rest.
fn wrapper_codecs(mut set: &[u8]) -> impl Iterator<Item = u8> + '_ {
    std::iter::from_fn(move || {
        let size = set.get(8..12)?;
        let size =
            usize::try_from(i32::from_be_bytes([size[0], size[1], size[2], size[3]])).ok()?;
        let attributes = *set.get(17)?;
        set = set.get(12usize.checked_add(size)?..)?;
        Some(attributes & 7)
    })
}
