//! Record batches, magic 2 (KIP-98; Kafka protocol guide, "Record Batch"): decode what
//! producers send, encode what fetchers read.
//!
//! ```text
//! baseOffset int64, batchLength int32, partitionLeaderEpoch int32, magic int8 (2),
//! crc uint32 (CRC-32C of attributes..end), attributes int16, lastOffsetDelta int32,
//! baseTimestamp int64, maxTimestamp int64, producerId int64, producerEpoch int16,
//! baseSequence int32, records: count int32 then, each (possibly compressed together):
//!   length varint, attributes int8, timestampDelta varlong, offsetDelta varint,
//!   key varint-length bytes, value varint-length bytes, headers count varint then each
//!   key varint-length string, value varint-length bytes
//! ```
//!
//! Hand-written rather than `kafka-protocol`'s `records` module, for three reasons: its
//! `Record::headers` is a map (Kafka headers are an ordered list that may repeat a key, and
//! the plugin keeps them exactly, section 9 of docs/kafka.md), it reserves memory for the
//! record and header counts the client announces, and it has no bound on decompressed size.
//! Here every count is checked against the bytes that could hold it before anything is
//! allocated, decompression stops at [`Limits::max_uncompressed_bytes`], and the offsets
//! must be those a producer writes (deltas `0..count`), as Kafka's `LogValidator` demands.

use bytes::Bytes;

use super::compression::{self, Codec, CompressionError};

/// Bounds on what a batch may make the plugin allocate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest records section after decompression.
    pub max_uncompressed_bytes: usize,
}

/// One header of a record: Kafka's key is a string, its value bytes or null.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// UTF-8 by Kafka's definition, but kept as bytes: validity is the mapping's business.
    pub key: Bytes,
    pub value: Option<Bytes>,
}

/// One record, with its absolute offset and timestamp.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub offset: i64,
    /// Milliseconds since the epoch; -1 for none (magic 0).
    pub timestamp: i64,
    pub key: Option<Bytes>,
    /// `None`: a null value (a tombstone).
    pub value: Option<Bytes>,
    pub headers: Vec<Header>,
}

/// A record batch, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub base_offset: i64,
    pub partition_leader_epoch: i32,
    pub codec: Codec,
    /// Attribute bit 3: the timestamps are the log's append time.
    pub log_append_time: bool,
    /// Attribute bit 4.
    pub transactional: bool,
    /// Attribute bit 5: a transaction marker, never a user record.
    pub control: bool,
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
    pub records: Vec<Record>,
}

impl Batch {
    /// A batch of `records` as the gateway sends it to fetchers: no producer, no epoch.
    pub fn plain(base_offset: i64, records: Vec<Record>) -> Batch {
        Batch {
            base_offset,
            partition_leader_epoch: -1,
            codec: Codec::None,
            log_append_time: false,
            transactional: false,
            control: false,
            producer_id: -1,
            producer_epoch: -1,
            base_sequence: -1,
            records,
        }
    }
}

/// Why bytes are not valid record batches. Produce answers [`RecordsError::kafka_error`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordsError {
    #[error("record batch truncated ({0})")]
    Truncated(&'static str),
    #[error("record batch CRC mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Crc { stored: u32, computed: u32 },
    #[error("unsupported record batch magic {0}")]
    Magic(i8),
    #[error("unknown compression codec {0}")]
    Codec(i16),
    #[error(transparent)]
    Compression(#[from] CompressionError),
    #[error("invalid record batch: {0}")]
    Invalid(String),
    #[error("record batch too large to encode")]
    TooLarge,
}

impl RecordsError {
    /// The Kafka error code Produce answers for this error: `CORRUPT_MESSAGE` (2) for bytes
    /// that do not decode, `UNSUPPORTED_COMPRESSION_TYPE` (76) for an unknown codec,
    /// `RECORD_LIST_TOO_LARGE` (18) for too much data, `INVALID_RECORD` (87) for a batch
    /// that decodes but breaks Kafka's rules.
    pub fn kafka_error(&self) -> i16 {
        match self {
            RecordsError::Truncated(_)
            | RecordsError::Crc { .. }
            | RecordsError::Magic(_)
            | RecordsError::Compression(CompressionError::Invalid { .. }) => 2,
            RecordsError::Codec(_) => 76,
            RecordsError::Compression(CompressionError::TooLarge { .. })
            | RecordsError::TooLarge => 18,
            RecordsError::Invalid(_) => 87,
        }
    }
}

/// Bytes of a batch from `partitionLeaderEpoch` (where `batchLength` starts counting) to
/// the first record.
const HEADER_AFTER_LENGTH: usize = 49;
/// Offset of the magic byte from the start of a batch (or message set entry).
pub const MAGIC_AT: usize = 16;
/// Smallest encoded record: length, attributes, timestamp delta, offset delta, key length,
/// value length and header count, one byte each.
const MIN_RECORD_BYTES: usize = 7;
/// Smallest encoded header: key length and value length.
const MIN_HEADER_BYTES: usize = 2;

/// A cursor over bytes that fails, never panics, at their end.
struct Reader {
    buf: Bytes,
}

impl Reader {
    fn take(&mut self, n: usize, what: &'static str) -> Result<Bytes, RecordsError> {
        if n > self.buf.len() {
            return Err(RecordsError::Truncated(what));
        }
        Ok(self.buf.split_to(n))
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], RecordsError> {
        let b = self.take(N, what)?;
        let mut a = [0; N];
        a.copy_from_slice(&b);
        Ok(a)
    }

    fn i8(&mut self, what: &'static str) -> Result<i8, RecordsError> {
        Ok(i8::from_be_bytes(self.array(what)?))
    }
    fn i16(&mut self, what: &'static str) -> Result<i16, RecordsError> {
        Ok(i16::from_be_bytes(self.array(what)?))
    }
    fn i32(&mut self, what: &'static str) -> Result<i32, RecordsError> {
        Ok(i32::from_be_bytes(self.array(what)?))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, RecordsError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }
    fn i64(&mut self, what: &'static str) -> Result<i64, RecordsError> {
        Ok(i64::from_be_bytes(self.array(what)?))
    }

    /// An unsigned LEB128 of at most `max_bytes` bytes.
    fn uvarint(&mut self, max_bytes: u32, what: &'static str) -> Result<u64, RecordsError> {
        let mut value = 0u64;
        for i in 0..max_bytes {
            let [b] = self.array::<1>(what)?;
            value |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(RecordsError::Invalid(format!("{what}: varint too long")))
    }

    /// A zigzag varint (Kafka's `varint`, protobuf's `sint32`).
    fn varint(&mut self, what: &'static str) -> Result<i32, RecordsError> {
        let u = self.uvarint(5, what)?;
        let u = u32::try_from(u)
            .map_err(|_| RecordsError::Invalid(format!("{what}: varint out of range")))?;
        Ok(((u >> 1) as i32) ^ -((u & 1) as i32))
    }

    /// A zigzag varlong (Kafka's `varlong`).
    fn varlong(&mut self, what: &'static str) -> Result<i64, RecordsError> {
        let u = self.uvarint(10, what)?;
        Ok(((u >> 1) as i64) ^ -((u & 1) as i64))
    }

    /// Varint-length bytes; -1 is null.
    fn nullable_bytes(&mut self, what: &'static str) -> Result<Option<Bytes>, RecordsError> {
        match self.varint(what)? {
            -1 => Ok(None),
            n if n < 0 => Err(RecordsError::Invalid(format!("{what}: length {n}"))),
            n => self.take(n as usize, what).map(Some),
        }
    }

    /// Varint count of items at least `min_bytes` long each, checked against what is left.
    fn count(&mut self, min_bytes: usize, what: &'static str) -> Result<usize, RecordsError> {
        let n = self.varint(what)?;
        let n = usize::try_from(n).map_err(|_| RecordsError::Invalid(format!("{what}: {n}")))?;
        if n.saturating_mul(min_bytes) > self.buf.len() {
            return Err(RecordsError::Truncated(what));
        }
        Ok(n)
    }
}

/// The magic byte of the batch or message set entry starting `data`, if there is one.
pub fn magic(data: &[u8]) -> Option<i8> {
    data.get(MAGIC_AT).map(|&b| b as i8)
}

/// Decodes every batch of `data` (a Produce partition's `records`), which must be whole.
pub fn decode_batches(data: Bytes, limits: Limits) -> Result<Vec<Batch>, RecordsError> {
    let mut reader = Reader { buf: data };
    let mut batches = Vec::new();
    while !reader.buf.is_empty() {
        batches.push(decode_one(&mut reader, limits)?);
    }
    Ok(batches)
}

fn decode_one(r: &mut Reader, limits: Limits) -> Result<Batch, RecordsError> {
    let base_offset = r.i64("base offset")?;
    let length = r.i32("batch length")?;
    let length = usize::try_from(length)
        .ok()
        .filter(|&l| l >= HEADER_AFTER_LENGTH)
        .ok_or_else(|| RecordsError::Invalid(format!("batch length {length}")))?;
    let mut r = Reader {
        buf: r.take(length, "batch")?,
    };
    let partition_leader_epoch = r.i32("partition leader epoch")?;
    let magic = r.i8("magic")?;
    if magic != 2 {
        return Err(RecordsError::Magic(magic));
    }
    let stored = r.u32("crc")?;
    let computed = crc32c::crc32c(&r.buf);
    if stored != computed {
        return Err(RecordsError::Crc { stored, computed });
    }
    let attributes = r.i16("attributes")?;
    let codec = Codec::from_attributes(attributes).ok_or(RecordsError::Codec(attributes & 7))?;
    let last_offset_delta = r.i32("last offset delta")?;
    let base_timestamp = r.i64("base timestamp")?;
    let _max_timestamp = r.i64("max timestamp")?;
    let producer_id = r.i64("producer id")?;
    let producer_epoch = r.i16("producer epoch")?;
    let base_sequence = r.i32("base sequence")?;
    let count = r.i32("record count")?;
    let count = usize::try_from(count)
        .ok()
        .filter(|&c| c >= 1 && last_offset_delta.checked_add(1) == i32::try_from(c).ok())
        .ok_or_else(|| {
            RecordsError::Invalid(format!(
                "{count} records with last offset delta {last_offset_delta}"
            ))
        })?;
    let body = if codec == Codec::None {
        if r.buf.len() > limits.max_uncompressed_bytes {
            return Err(RecordsError::Compression(CompressionError::TooLarge {
                codec,
                limit: limits.max_uncompressed_bytes,
            }));
        }
        r.buf.clone()
    } else {
        Bytes::from(compression::decompress(
            codec,
            &r.buf,
            limits.max_uncompressed_bytes,
        )?)
    };
    if count.saturating_mul(MIN_RECORD_BYTES) > body.len() {
        return Err(RecordsError::Truncated("records"));
    }
    let mut body = Reader { buf: body };
    let mut records = Vec::with_capacity(count);
    for expected_delta in 0..count {
        let record = decode_record(&mut body, base_offset, base_timestamp)?;
        if record.offset.wrapping_sub(base_offset) != expected_delta as i64 {
            return Err(RecordsError::Invalid(format!(
                "record {expected_delta} has offset delta {}",
                record.offset.wrapping_sub(base_offset)
            )));
        }
        records.push(record);
    }
    if !body.buf.is_empty() {
        return Err(RecordsError::Invalid(format!(
            "{} bytes after the last record",
            body.buf.len()
        )));
    }
    Ok(Batch {
        base_offset,
        partition_leader_epoch,
        codec,
        log_append_time: attributes & (1 << 3) != 0,
        transactional: attributes & (1 << 4) != 0,
        control: attributes & (1 << 5) != 0,
        producer_id,
        producer_epoch,
        base_sequence,
        records,
    })
}

fn decode_record(
    r: &mut Reader,
    base_offset: i64,
    base_timestamp: i64,
) -> Result<Record, RecordsError> {
    let length = r.varint("record length")?;
    let length = usize::try_from(length)
        .map_err(|_| RecordsError::Invalid(format!("record length {length}")))?;
    let mut r = Reader {
        buf: r.take(length, "record")?,
    };
    let _attributes = r.i8("record attributes")?;
    let timestamp_delta = r.varlong("timestamp delta")?;
    let offset_delta = r.varint("offset delta")?;
    let key = r.nullable_bytes("key")?;
    let value = r.nullable_bytes("value")?;
    let headers = read_headers(&mut r)?;
    if !r.buf.is_empty() {
        return Err(RecordsError::Invalid(
            "bytes after a record's headers".into(),
        ));
    }
    Ok(Record {
        offset: base_offset.wrapping_add(i64::from(offset_delta)),
        timestamp: base_timestamp.wrapping_add(timestamp_delta),
        key,
        value,
        headers,
    })
}

fn put_uvarint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_varint(out: &mut Vec<u8>, v: i32) {
    put_uvarint(out, u64::from(((v << 1) ^ (v >> 31)) as u32));
}

fn put_varlong(out: &mut Vec<u8>, v: i64) {
    put_uvarint(out, ((v << 1) ^ (v >> 63)) as u64);
}

fn put_nullable(out: &mut Vec<u8>, b: Option<&[u8]>) -> Result<(), RecordsError> {
    match b {
        None => put_varint(out, -1),
        Some(b) => {
            put_varint(
                out,
                i32::try_from(b.len()).map_err(|_| RecordsError::TooLarge)?,
            );
            out.extend_from_slice(b);
        }
    }
    Ok(())
}

/// Appends Kafka's encoding of a header list (as inside a record: a varint count, then each
/// key and value with varint lengths) to `out`.
pub fn encode_headers(headers: &[Header], out: &mut Vec<u8>) -> Result<(), RecordsError> {
    put_varint(
        out,
        i32::try_from(headers.len()).map_err(|_| RecordsError::TooLarge)?,
    );
    for h in headers {
        put_nullable(out, Some(&h.key))?;
        put_nullable(out, h.value.as_deref())?;
    }
    Ok(())
}

/// Decodes what [`encode_headers`] wrote, all of `data`.
pub fn decode_headers(data: Bytes) -> Result<Vec<Header>, RecordsError> {
    let mut r = Reader { buf: data };
    let headers = read_headers(&mut r)?;
    if !r.buf.is_empty() {
        return Err(RecordsError::Invalid("bytes after the headers".into()));
    }
    Ok(headers)
}

fn read_headers(r: &mut Reader) -> Result<Vec<Header>, RecordsError> {
    let n = r.count(MIN_HEADER_BYTES, "header count")?;
    let mut headers = Vec::with_capacity(n);
    for _ in 0..n {
        let key = r
            .nullable_bytes("header key")?
            .ok_or_else(|| RecordsError::Invalid("null header key".into()))?;
        let value = r.nullable_bytes("header value")?;
        headers.push(Header { key, value });
    }
    Ok(headers)
}

/// Appends `batch` to `out`, its records compressed with `batch.codec`. The records'
/// offsets must be `base_offset, base_offset + 1, ...` (at least one record).
pub fn encode_batch(batch: &Batch, out: &mut Vec<u8>) -> Result<(), RecordsError> {
    let (Some(first), Some(last)) = (batch.records.first(), batch.records.last()) else {
        return Err(RecordsError::Invalid("an empty batch".into()));
    };
    let base_timestamp = first.timestamp;
    let max_timestamp = batch
        .records
        .iter()
        .map(|r| r.timestamp)
        .max()
        .unwrap_or(base_timestamp);
    let mut body = Vec::new();
    let mut record = Vec::new();
    for r in &batch.records {
        record.clear();
        record.push(0); // attributes: unused
        put_varlong(&mut record, r.timestamp.wrapping_sub(base_timestamp));
        let delta = i32::try_from(r.offset.wrapping_sub(batch.base_offset))
            .map_err(|_| RecordsError::TooLarge)?;
        put_varint(&mut record, delta);
        put_nullable(&mut record, r.key.as_deref())?;
        put_nullable(&mut record, r.value.as_deref())?;
        encode_headers(&r.headers, &mut record)?;
        put_varint(
            &mut body,
            i32::try_from(record.len()).map_err(|_| RecordsError::TooLarge)?,
        );
        body.extend_from_slice(&record);
    }
    let body = compression::compress(batch.codec, &body)?;
    let last_offset_delta = i32::try_from(last.offset.wrapping_sub(batch.base_offset))
        .map_err(|_| RecordsError::TooLarge)?;
    let count = i32::try_from(batch.records.len()).map_err(|_| RecordsError::TooLarge)?;
    let length =
        i32::try_from(HEADER_AFTER_LENGTH + body.len()).map_err(|_| RecordsError::TooLarge)?;

    let mut attributes = batch.codec.attribute_bits();
    for (set, bit) in [
        (batch.log_append_time, 3),
        (batch.transactional, 4),
        (batch.control, 5),
    ] {
        if set {
            attributes |= 1 << bit;
        }
    }
    out.extend_from_slice(&batch.base_offset.to_be_bytes());
    out.extend_from_slice(&length.to_be_bytes());
    out.extend_from_slice(&batch.partition_leader_epoch.to_be_bytes());
    out.push(2);
    let crc_at = out.len();
    out.extend_from_slice(&[0; 4]);
    let crc_from = out.len();
    out.extend_from_slice(&attributes.to_be_bytes());
    out.extend_from_slice(&last_offset_delta.to_be_bytes());
    out.extend_from_slice(&base_timestamp.to_be_bytes());
    out.extend_from_slice(&max_timestamp.to_be_bytes());
    out.extend_from_slice(&batch.producer_id.to_be_bytes());
    out.extend_from_slice(&batch.producer_epoch.to_be_bytes());
    out.extend_from_slice(&batch.base_sequence.to_be_bytes());
    out.extend_from_slice(&count.to_be_bytes());
    out.extend_from_slice(&body);
    let crc = crc32c::crc32c(&out[crc_from..]);
    out[crc_at..crc_from].copy_from_slice(&crc.to_be_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use indexmap::IndexMap;
    use kafka_protocol::protocol::StrBytes;
    use kafka_protocol::records::{
        Compression, Record as KRecord, RecordBatchDecoder, RecordBatchEncoder,
        RecordEncodeOptions, TimestampType,
    };
    use proptest::prelude::*;

    const LIMITS: Limits = Limits {
        max_uncompressed_bytes: 1 << 20,
    };

    fn codec_of(c: Compression) -> Codec {
        match c {
            Compression::None => Codec::None,
            Compression::Gzip => Codec::Gzip,
            Compression::Snappy => Codec::Snappy,
            Compression::Lz4 => Codec::Lz4,
            Compression::Zstd => Codec::Zstd,
        }
    }

    fn compression_of(c: Codec) -> Compression {
        match c {
            Codec::None => Compression::None,
            Codec::Gzip => Compression::Gzip,
            Codec::Snappy => Compression::Snappy,
            Codec::Lz4 => Compression::Lz4,
            Codec::Zstd => Compression::Zstd,
        }
    }

    fn krecord(offset: i64, i: usize) -> KRecord {
        let mut headers = IndexMap::new();
        headers.insert(
            StrBytes::from_string(format!("h{i}")),
            Some(Bytes::from(vec![i as u8; i])),
        );
        KRecord {
            transactional: false,
            control: false,
            delete_horizon: false,
            partition_leader_epoch: 0,
            producer_id: 7,
            producer_epoch: 1,
            timestamp_type: TimestampType::Creation,
            offset,
            sequence: 3 + offset as i32,
            timestamp: 1_700_000_000_000 + (i as i64) * 1000,
            key: i.is_multiple_of(2).then(|| Bytes::from(format!("key-{i}"))),
            value: (i != 3).then(|| Bytes::from(vec![b'v'; 10 * i])),
            headers,
        }
    }

    /// kafka-protocol's encoder (the client side) writes what a producer sends; ours reads it.
    #[test]
    fn decodes_what_a_producer_encodes_with_every_codec() {
        for codec in [
            Codec::None,
            Codec::Gzip,
            Codec::Snappy,
            Codec::Lz4,
            Codec::Zstd,
        ] {
            let records: Vec<_> = (0..5).map(|i| krecord(i as i64, i)).collect();
            let mut buf = bytes::BytesMut::new();
            RecordBatchEncoder::encode_with_custom_compression(
                &mut buf,
                &records,
                &RecordEncodeOptions {
                    version: 2,
                    compression: compression_of(codec),
                },
                Some(|body: &mut bytes::BytesMut, out: &mut bytes::BytesMut, c| {
                    out.extend_from_slice(&compression::compress(codec_of(c), body).unwrap());
                    Ok(())
                }),
            )
            .unwrap();
            let batches = decode_batches(buf.freeze(), LIMITS).unwrap();
            assert_eq!(batches.len(), 1);
            let b = &batches[0];
            assert_eq!((b.codec, b.producer_id, b.producer_epoch), (codec, 7, 1));
            assert_eq!(b.base_sequence, 3);
            assert_eq!(b.records.len(), 5);
            for (got, want) in b.records.iter().zip(&records) {
                assert_eq!(got.offset, want.offset);
                assert_eq!(got.timestamp, want.timestamp);
                assert_eq!(got.key, want.key);
                assert_eq!(got.value, want.value);
                let (k, v) = want.headers.first().unwrap();
                assert_eq!(
                    got.headers,
                    vec![Header {
                        key: Bytes::copy_from_slice(k.as_bytes()),
                        value: v.clone()
                    }]
                );
            }
        }
    }

    fn sample_batch(codec: Codec) -> Batch {
        let mut b = Batch::plain(
            42,
            (0..4)
                .map(|i| Record {
                    offset: 42 + i,
                    timestamp: if i == 2 { 5 } else { 1_000 + i },
                    key: (i != 1).then(|| Bytes::from(vec![i as u8; 3])),
                    value: (i != 0).then(|| Bytes::from(vec![b'x'; 100 * i as usize])),
                    // Repeated keys and a null value: kept as they are.
                    headers: vec![
                        Header {
                            key: Bytes::from_static(b"k"),
                            value: Some(Bytes::from_static(b"1")),
                        },
                        Header {
                            key: Bytes::from_static(b"k"),
                            value: None,
                        },
                    ],
                })
                .collect(),
        );
        b.codec = codec;
        b
    }

    /// Ours encodes what kafka-protocol's client decodes, and decodes back to itself.
    #[test]
    fn encoded_batches_round_trip_and_read_as_kafka() {
        for codec in [
            Codec::None,
            Codec::Gzip,
            Codec::Snappy,
            Codec::Lz4,
            Codec::Zstd,
        ] {
            let batch = sample_batch(codec);
            let mut out = Vec::new();
            encode_batch(&batch, &mut out).unwrap();
            encode_batch(&batch, &mut out).unwrap();
            let got = decode_batches(Bytes::from(out.clone()), LIMITS).unwrap();
            assert_eq!(got, vec![batch.clone(), batch.clone()], "{codec:?}");

            let mut buf = Bytes::from(out);
            let set = RecordBatchDecoder::decode_with_custom_compression(
                &mut buf,
                Some(|b: &mut Bytes, c| {
                    Ok(Bytes::from(
                        compression::decompress(codec_of(c), b, 1 << 20).unwrap(),
                    ))
                }),
            )
            .unwrap();
            assert_eq!(set.records.len(), 4);
            assert_eq!(set.records[3].offset, 45);
            assert_eq!(set.records[2].timestamp, 5);
            assert_eq!(set.records[0].value, None);
        }
    }

    #[test]
    fn bad_batches_are_refused_with_kafka_codes() {
        let mut good = Vec::new();
        encode_batch(&sample_batch(Codec::None), &mut good).unwrap();

        let mut crc = good.clone();
        *crc.last_mut().unwrap() ^= 1;
        let e = decode_batches(Bytes::from(crc), LIMITS).unwrap_err();
        assert!(matches!(e, RecordsError::Crc { .. }));
        assert_eq!(e.kafka_error(), 2);

        let mut magic = good.clone();
        magic[MAGIC_AT] = 1;
        assert_eq!(
            decode_batches(Bytes::from(magic), LIMITS).unwrap_err(),
            RecordsError::Magic(1)
        );

        let truncated = Bytes::copy_from_slice(&good[..good.len() - 1]);
        assert_eq!(
            decode_batches(truncated, LIMITS).unwrap_err().kafka_error(),
            2
        );

        // An absurd record count, the CRC fixed up: refused before any allocation.
        let mut count = good.clone();
        count[57..61].copy_from_slice(&i32::MAX.to_be_bytes());
        count[23..27].copy_from_slice(&(i32::MAX - 1).to_be_bytes());
        let crc = crc32c::crc32c(&count[21..]);
        count[17..21].copy_from_slice(&crc.to_be_bytes());
        assert!(decode_batches(Bytes::from(count), LIMITS).is_err());

        let small = Limits {
            max_uncompressed_bytes: 100,
        };
        let e = decode_batches(Bytes::from(good.clone()), small).unwrap_err();
        assert_eq!(e.kafka_error(), 18);
        let mut zipped = Vec::new();
        encode_batch(&sample_batch(Codec::Gzip), &mut zipped).unwrap();
        assert_eq!(
            decode_batches(Bytes::from(zipped), small)
                .unwrap_err()
                .kafka_error(),
            18
        );
    }

    #[test]
    fn varints_match_kafka() {
        // Kafka's ByteUtils: zigzag, then 7 bits a byte.
        for (v, bytes) in [
            (0i32, vec![0u8]),
            (-1, vec![1]),
            (1, vec![2]),
            (63, vec![0x7e]),
            (-64, vec![0x7f]),
            (64, vec![0x80, 0x01]),
            (i32::MAX, vec![0xfe, 0xff, 0xff, 0xff, 0x0f]),
            (i32::MIN, vec![0xff, 0xff, 0xff, 0xff, 0x0f]),
        ] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            assert_eq!(out, bytes, "{v}");
            let mut r = Reader {
                buf: Bytes::from(bytes),
            };
            assert_eq!(r.varint("v").unwrap(), v);
        }
        for v in [0i64, -1, i64::MAX, i64::MIN, 1 << 40] {
            let mut out = Vec::new();
            put_varlong(&mut out, v);
            let mut r = Reader {
                buf: Bytes::from(out),
            };
            assert_eq!(r.varlong("v").unwrap(), v);
        }
        // Six bytes is not an int32.
        let mut r = Reader {
            buf: Bytes::from_static(&[0x80, 0x80, 0x80, 0x80, 0x80, 0x01]),
        };
        assert!(r.varint("v").is_err());
    }

    proptest! {
        #[test]
        fn any_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_batches(Bytes::from(data), LIMITS);
        }

        #[test]
        fn any_mutation_of_a_batch_never_panics(at in 0usize..400, byte in any::<u8>(), fix_crc in any::<bool>()) {
            let mut b = Vec::new();
            encode_batch(&sample_batch(Codec::None), &mut b).unwrap();
            let at = at % b.len();
            b[at] = byte;
            if fix_crc && b.len() > 21 {
                let crc = crc32c::crc32c(&b[21..]);
                b[17..21].copy_from_slice(&crc.to_be_bytes());
            }
            let _ = decode_batches(Bytes::from(b), LIMITS);
        }
    }
}
