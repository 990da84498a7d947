//! Message sets, magic 0 and 1 (Kafka protocol guide, "Message sets"; KIP-31, KIP-32): what
//! clients from the 0.10 era produce (Produce v0-2) and fetch (Fetch v0-3). Hand-written,
//! as docs/kafka.md section 5.1 decides: `kafka-protocol` 0.18 has none, and 0.15.1's
//! decoder neither decompresses wrappers nor makes magic-1 inner offsets absolute.
//!
//! ```text
//! offset int64, message_size int32, then the message:
//!   crc int32 (CRC-32 IEEE of magic..end), magic int8, attributes int8
//!   (codec in bits 0-2; magic 1: timestamp type in bit 3), [timestamp int64, magic 1],
//!   key int32-length bytes (-1: null), value int32-length bytes (-1: null)
//! ```
//!
//! A compressed message is a *wrapper* whose value is a compressed inner message set, one
//! level deep (Kafka allows no more). Magic-1 inner offsets are relative (`0..n`) and the
//! wrapper's offset is the last inner message's absolute offset (KIP-31); magic-0 inner
//! offsets are whatever the producer wrote (the broker assigns offsets anyway). A magic-1
//! wrapper with `LogAppendTime` gives its timestamp to every inner message (KIP-32).
//! Magic-0 lz4 values carry KAFKA-3160's wrong frame checksum
//! ([`compression::decompress_lz4_magic0`]).
//!
//! Encoding (Fetch v0-3 down-conversion) writes one uncompressed message per record:
//! allowed, and no broken lz4 to reproduce; headers are dropped, as Kafka drops them.

use bytes::Bytes;

use super::compression::{self, Codec};
use super::records::{Limits, Record, RecordsError};

/// Bytes of a message from `crc` up to the key, by magic.
fn fixed_bytes(magic: i8) -> usize {
    if magic == 0 {
        4 + 1 + 1
    } else {
        4 + 1 + 1 + 8
    }
}

/// Bytes of an entry before its message: offset and size.
const LOG_OVERHEAD: usize = 12;

/// Decodes a whole message set of magic 0 or 1 into records in order, wrappers expanded.
pub fn decode(data: &[u8], limits: Limits) -> Result<Vec<Record>, RecordsError> {
    let mut records = Vec::new();
    let mut budget = limits.max_uncompressed_bytes;
    decode_into(data, &mut budget, 0, &mut records)?;
    Ok(records)
}

/// One level of messages; `depth` 1 is inside a wrapper. `budget` is what decompression may
/// still produce, over the whole set.
fn decode_into(
    mut data: &[u8],
    budget: &mut usize,
    depth: u8,
    out: &mut Vec<Record>,
) -> Result<(), RecordsError> {
    let start = out.len();
    while !data.is_empty() {
        let head = data
            .get(..LOG_OVERHEAD)
            .ok_or(RecordsError::Truncated("message header"))?;
        let offset = i64::from_be_bytes(head[..8].try_into().unwrap_or_default());
        let size = i32::from_be_bytes(head[8..12].try_into().unwrap_or_default());
        let size = usize::try_from(size)
            .map_err(|_| RecordsError::Invalid(format!("message size {size}")))?;
        let message = data
            .get(LOG_OVERHEAD..LOG_OVERHEAD + size)
            .ok_or(RecordsError::Truncated("message"))?;
        data = &data[LOG_OVERHEAD + size..];

        let magic = *message.get(4).ok_or(RecordsError::Truncated("magic"))? as i8;
        if magic != 0 && magic != 1 {
            return Err(RecordsError::Magic(magic));
        }
        if message.len() < fixed_bytes(magic) + 8 {
            return Err(RecordsError::Truncated("message fields"));
        }
        let stored = u32::from_be_bytes(message[..4].try_into().unwrap_or_default());
        let computed = crc32fast::hash(&message[4..]);
        if stored != computed {
            return Err(RecordsError::Crc { stored, computed });
        }
        let attributes = message[5] as i8;
        let codec = Codec::from_attributes(i16::from(attributes))
            .ok_or(RecordsError::Codec(i16::from(attributes & 7)))?;
        let log_append_time = magic == 1 && attributes & (1 << 3) != 0;
        let timestamp = if magic == 1 {
            i64::from_be_bytes(message[6..14].try_into().unwrap_or_default())
        } else {
            -1
        };
        let mut rest = &message[fixed_bytes(magic)..];
        let key = bytes_field(&mut rest, "key")?;
        let value = bytes_field(&mut rest, "value")?;
        if !rest.is_empty() {
            return Err(RecordsError::Invalid(
                "bytes after a message's value".into(),
            ));
        }

        if codec == Codec::None {
            out.push(Record {
                offset,
                timestamp,
                key: key.map(Bytes::copy_from_slice),
                value: value.map(Bytes::copy_from_slice),
                headers: Vec::new(),
            });
            continue;
        }
        if depth > 0 {
            return Err(RecordsError::Invalid(
                "a compressed message inside a wrapper".into(),
            ));
        }
        let compressed =
            value.ok_or_else(|| RecordsError::Invalid("a wrapper without value".into()))?;
        let inner = if codec == Codec::Lz4 && magic == 0 {
            compression::decompress_lz4_magic0(compressed, *budget)?
        } else {
            compression::decompress(codec, compressed, *budget)?
        };
        *budget -= inner.len();
        let first = out.len();
        decode_into(&inner, budget, 1, out)?;
        let inner_records = &mut out[first..];
        if inner_records.is_empty() {
            return Err(RecordsError::Invalid("an empty wrapper".into()));
        }
        if magic == 1 {
            // KIP-31: relative inner offsets, the wrapper holding the last one's.
            let last = inner_records.len() as i64 - 1;
            let base = offset.wrapping_sub(last);
            for (i, r) in inner_records.iter_mut().enumerate() {
                // By position: some old producers wrote absolute inner offsets.
                r.offset = base.wrapping_add(i as i64);
                if log_append_time {
                    r.timestamp = timestamp;
                }
            }
        }
    }
    if depth > 0 && out.len() == start {
        return Err(RecordsError::Invalid("an empty wrapper".into()));
    }
    Ok(())
}

/// An int32-length nullable byte field.
fn bytes_field<'a>(
    rest: &mut &'a [u8],
    what: &'static str,
) -> Result<Option<&'a [u8]>, RecordsError> {
    let len = rest.get(..4).ok_or(RecordsError::Truncated(what))?;
    let len = i32::from_be_bytes(len.try_into().unwrap_or_default());
    *rest = &rest[4..];
    if len == -1 {
        return Ok(None);
    }
    let len =
        usize::try_from(len).map_err(|_| RecordsError::Invalid(format!("{what} length {len}")))?;
    let b = rest.get(..len).ok_or(RecordsError::Truncated(what))?;
    *rest = &rest[len..];
    Ok(Some(b))
}

/// Appends one message (offset, size, then the message) to `out`.
fn put_message(
    out: &mut Vec<u8>,
    magic: i8,
    offset: i64,
    attributes: i8,
    timestamp: i64,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
) -> Result<(), RecordsError> {
    let len = |b: Option<&[u8]>| b.map_or(Ok(0), |b| i32::try_from(b.len()).map(|_| b.len()));
    let size = fixed_bytes(magic)
        + 8
        + len(key).map_err(|_| RecordsError::TooLarge)?
        + len(value).map_err(|_| RecordsError::TooLarge)?;
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(
        &i32::try_from(size)
            .map_err(|_| RecordsError::TooLarge)?
            .to_be_bytes(),
    );
    let crc_at = out.len();
    out.extend_from_slice(&[0; 4]);
    out.push(magic as u8);
    out.push(attributes as u8);
    if magic == 1 {
        out.extend_from_slice(&timestamp.to_be_bytes());
    }
    for field in [key, value] {
        match field {
            None => out.extend_from_slice(&(-1i32).to_be_bytes()),
            Some(b) => {
                out.extend_from_slice(&(b.len() as i32).to_be_bytes());
                out.extend_from_slice(b);
            }
        }
    }
    let crc = crc32fast::hash(&out[crc_at + 4..]);
    out[crc_at..crc_at + 4].copy_from_slice(&crc.to_be_bytes());
    Ok(())
}

/// Appends `records` as uncompressed messages of `magic` (0 or 1) with their own offsets;
/// headers are dropped (these formats have none).
pub fn encode(magic: i8, records: &[Record], out: &mut Vec<u8>) -> Result<(), RecordsError> {
    if magic != 0 && magic != 1 {
        return Err(RecordsError::Magic(magic));
    }
    for r in records {
        put_message(
            out,
            magic,
            r.offset,
            0,
            r.timestamp,
            r.key.as_deref(),
            r.value.as_deref(),
        )?;
    }
    Ok(())
}

/// Appends `records` as one wrapper message of `magic` compressed with `codec`, as an old
/// producer sends them (inner offsets relative for magic 1, KIP-31). For tests and tools:
/// the gateway itself sends uncompressed message sets.
pub fn encode_wrapped(
    magic: i8,
    codec: Codec,
    records: &[Record],
    out: &mut Vec<u8>,
) -> Result<(), RecordsError> {
    let Some(last) = records.last() else {
        return Err(RecordsError::Invalid("an empty wrapper".into()));
    };
    let mut inner = Vec::new();
    for (i, r) in records.iter().enumerate() {
        let offset = if magic == 1 { i as i64 } else { r.offset };
        put_message(
            &mut inner,
            magic,
            offset,
            0,
            r.timestamp,
            r.key.as_deref(),
            r.value.as_deref(),
        )?;
    }
    let compressed = compression::compress(codec, &inner)?;
    put_message(
        out,
        magic,
        last.offset,
        codec.attribute_bits() as i8,
        records.iter().map(|r| r.timestamp).max().unwrap_or(-1),
        None,
        Some(&compressed),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LIMITS: Limits = Limits {
        max_uncompressed_bytes: 1 << 20,
    };

    fn records(base: i64, magic: i8) -> Vec<Record> {
        (0..4)
            .map(|i| Record {
                offset: base + i,
                timestamp: if magic == 0 { -1 } else { 1_000 + i },
                key: (i % 2 == 1).then(|| Bytes::from(format!("k{i}"))),
                value: (i != 2).then(|| Bytes::from(vec![b'a' + i as u8; 50])),
                headers: Vec::new(),
            })
            .collect()
    }

    #[test]
    fn plain_sets_round_trip() {
        for magic in [0, 1] {
            let rs = records(10, magic);
            let mut out = Vec::new();
            encode(magic, &rs, &mut out).unwrap();
            assert_eq!(decode(&out, LIMITS).unwrap(), rs, "magic {magic}");
        }
    }

    /// Wrappers of every codec, in both magics, as 0.10-era producers send them; two wrappers
    /// back to back, the second's offsets following the first's.
    #[test]
    fn compressed_wrappers_expand_with_absolute_offsets() {
        for magic in [0i8, 1] {
            for codec in [Codec::Gzip, Codec::Snappy, Codec::Lz4, Codec::Zstd] {
                let mut want = records(0, magic);
                want.extend(records(4, magic));
                let mut out = Vec::new();
                encode_wrapped(magic, codec, &want[..4], &mut out).unwrap();
                encode_wrapped(magic, codec, &want[4..], &mut out).unwrap();
                assert_eq!(
                    decode(&out, LIMITS).unwrap(),
                    want,
                    "magic {magic} {codec:?}"
                );
            }
        }
    }

    #[test]
    fn magic0_lz4_with_kafka_3160_checksum() {
        let rs = records(0, 0);
        let mut inner = Vec::new();
        encode(0, &rs, &mut inner).unwrap();
        let mut lz4 = compression::compress(Codec::Lz4, &inner).unwrap();
        lz4[6] = (twox_hash::XxHash32::oneshot(0, &lz4[0..6]) >> 8) as u8;
        let mut out = Vec::new();
        put_message(&mut out, 0, 3, 3, -1, None, Some(&lz4)).unwrap();
        assert_eq!(decode(&out, LIMITS).unwrap(), rs);
    }

    #[test]
    fn log_append_time_wrappers_give_their_timestamp() {
        let rs = records(0, 1);
        let mut inner = Vec::new();
        encode(1, &rs, &mut inner).unwrap();
        let mut out = Vec::new();
        let gz = compression::compress(Codec::Gzip, &inner).unwrap();
        put_message(&mut out, 1, 3, 1 | (1 << 3), 77, None, Some(&gz)).unwrap();
        let got = decode(&out, LIMITS).unwrap();
        assert!(got.iter().all(|r| r.timestamp == 77));
    }

    #[test]
    fn bad_sets_are_refused() {
        let mut good = Vec::new();
        encode(1, &records(0, 1), &mut good).unwrap();
        let mut crc = good.clone();
        crc[20] ^= 1;
        assert!(matches!(
            decode(&crc, LIMITS),
            Err(RecordsError::Crc { .. })
        ));
        assert!(decode(&good[..good.len() - 1], LIMITS).is_err());

        // Nested wrappers.
        let mut inner = Vec::new();
        encode_wrapped(1, Codec::Gzip, &records(0, 1), &mut inner).unwrap();
        let gz = compression::compress(Codec::Gzip, &inner).unwrap();
        let mut nested = Vec::new();
        put_message(&mut nested, 1, 0, 1, 0, None, Some(&gz)).unwrap();
        assert!(matches!(
            decode(&nested, LIMITS),
            Err(RecordsError::Invalid(_))
        ));

        // A bomb: 1 MiB of zeros in a few hundred bytes, over a 64 KiB limit.
        let zeros = compression::compress(Codec::Gzip, &[0u8; 1 << 20]).unwrap();
        let mut bomb = Vec::new();
        put_message(&mut bomb, 1, 0, 1, 0, None, Some(&zeros)).unwrap();
        let small = Limits {
            max_uncompressed_bytes: 64 << 10,
        };
        assert_eq!(decode(&bomb, small).unwrap_err().kafka_error(), 18);
    }

    proptest! {
        #[test]
        fn any_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&data, LIMITS);
        }

        #[test]
        fn any_mutation_never_panics(at in 0usize..300, byte in any::<u8>(), codec in 0i16..5) {
            let mut out = Vec::new();
            let codec = Codec::from_attributes(codec).unwrap();
            if codec == Codec::None {
                encode(1, &records(0, 1), &mut out).unwrap();
            } else {
                encode_wrapped(1, codec, &records(0, 1), &mut out).unwrap();
            }
            let at = at % out.len();
            out[at] = byte;
            // Keep the outer CRC right so that the mutation reaches the fields behind it.
            let crc = crc32fast::hash(&out[16..]);
            out[12..16].copy_from_slice(&crc.to_be_bytes());
            let _ = decode(&out, LIMITS);
        }
    }
}
