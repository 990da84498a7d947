//! Kafka's compression codecs, in pure Rust so that the component builds for wasm32-wasip2
//! without a C toolchain (docs/kafka.md section 5.2).
//!
//! | codec | attribute bits 0-2 | crate | format |
//! |---|---|---|---|
//! | gzip | 1 | `flate2` (miniz_oxide) | RFC 1952 |
//! | snappy | 2 | `snap` (raw blocks) | raw snappy (librdkafka) or xerial's framing (the Java client's `SnappyOutputStream`) |
//! | lz4 | 3 | `lz4_flex` (`frame`) | the LZ4 frame format; magic-0 messages have KAFKA-3160's wrong header checksum |
//! | zstd | 4 | `ruzstd` | RFC 8878 frames (KIP-110) |
//!
//! Every decompression is bounded: the output stops at `limit` bytes and a longer result is
//! an error ([`CompressionError::TooLarge`]), so a small compressed batch cannot make the
//! plugin allocate without bound (a "zip bomb"). Nothing here panics on input.

use std::io::{Read, Write};

/// A record batch's or message's compression codec (Kafka's attribute bits 0-2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    None,
    Gzip,
    Snappy,
    Lz4,
    Zstd,
}

impl Codec {
    /// The codec of attribute bits 0-2; `None` for the values Kafka does not define.
    pub fn from_attributes(attributes: i16) -> Option<Codec> {
        match attributes & 0x7 {
            0 => Some(Codec::None),
            1 => Some(Codec::Gzip),
            2 => Some(Codec::Snappy),
            3 => Some(Codec::Lz4),
            4 => Some(Codec::Zstd),
            _ => None,
        }
    }

    /// The attribute bits of this codec.
    pub fn attribute_bits(self) -> i16 {
        match self {
            Codec::None => 0,
            Codec::Gzip => 1,
            Codec::Snappy => 2,
            Codec::Lz4 => 3,
            Codec::Zstd => 4,
        }
    }
}

/// Why compressed bytes could not be decompressed (or, for a bug of ours, compressed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompressionError {
    /// The decompressed data exceeds the limit.
    #[error("{codec:?} data decompresses to more than {limit} bytes")]
    TooLarge { codec: Codec, limit: usize },
    /// The compressed data is not valid for its codec.
    #[error("invalid {codec:?} data: {reason}")]
    Invalid { codec: Codec, reason: String },
}

/// xerial snappy-java's stream header (`SnappyCodec.MAGIC_HEADER`), which Kafka's Java
/// client writes before its blocks: the magic, then version 1 and compatible version 1.
const XERIAL_MAGIC: &[u8; 8] = b"\x82SNAPPY\0";
const XERIAL_HEADER_BYTES: usize = 16;
/// The block size of xerial's `SnappyOutputStream` (32 KiB by default).
const XERIAL_BLOCK: usize = 32 << 10;

/// Decompresses `data` of `codec` into at most `limit` bytes.
pub fn decompress(codec: Codec, data: &[u8], limit: usize) -> Result<Vec<u8>, CompressionError> {
    let invalid = |reason: String| CompressionError::Invalid { codec, reason };
    match codec {
        Codec::None => {
            if data.len() > limit {
                return Err(CompressionError::TooLarge { codec, limit });
            }
            Ok(data.to_vec())
        }
        Codec::Gzip => read_bounded(codec, flate2::read::GzDecoder::new(data), limit),
        Codec::Snappy => {
            if data.starts_with(XERIAL_MAGIC) {
                unxerial(data, limit)
            } else {
                // Raw snappy, as librdkafka sends it.
                let mut out = Vec::new();
                snappy_block(data, limit, &mut out)?;
                Ok(out)
            }
        }
        Codec::Lz4 => read_bounded(codec, lz4_flex::frame::FrameDecoder::new(data), limit),
        Codec::Zstd => {
            let decoder = ruzstd::decoding::StreamingDecoder::new(data)
                .map_err(|e| invalid(e.to_string()))?;
            read_bounded(codec, decoder, limit)
        }
    }
}

/// Decompresses a magic-0 message's lz4 value: Kafka before 0.10 (KAFKA-3160) computed the
/// frame descriptor's checksum byte over the magic number too, which a correct decoder
/// refuses; the byte is recomputed over the descriptor alone, then decoded normally.
pub fn decompress_lz4_magic0(data: &[u8], limit: usize) -> Result<Vec<u8>, CompressionError> {
    let mut fixed = data.to_vec();
    // Magic (4), FLG, BD, [content size (8)], [dictionary id (4)], HC.
    if let (Some(&flg), true) = (fixed.get(4), fixed.len() > 6) {
        let mut hc_at = 6;
        if flg & 0x08 != 0 {
            hc_at += 8;
        }
        if flg & 0x01 != 0 {
            hc_at += 4;
        }
        if let Some(descriptor) = fixed.get(4..hc_at) {
            let hc = (twox_xxh32(descriptor) >> 8) as u8;
            if let Some(b) = fixed.get_mut(hc_at) {
                *b = hc;
            }
        }
    }
    decompress(Codec::Lz4, &fixed, limit)
}

/// xxHash32 with seed 0, for the lz4 frame descriptor's checksum.
fn twox_xxh32(data: &[u8]) -> u32 {
    twox_hash::XxHash32::oneshot(0, data)
}

/// Compresses `data` with `codec` in the form Kafka's Java and librdkafka consumers read.
pub fn compress(codec: Codec, data: &[u8]) -> Result<Vec<u8>, CompressionError> {
    let invalid = |reason: String| CompressionError::Invalid { codec, reason };
    match codec {
        Codec::None => Ok(data.to_vec()),
        Codec::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(data).map_err(|e| invalid(e.to_string()))?;
            e.finish().map_err(|e| invalid(e.to_string()))
        }
        Codec::Snappy => {
            // xerial's framing, which both the Java client and librdkafka read.
            let mut out = Vec::with_capacity(XERIAL_HEADER_BYTES + data.len() / 2);
            out.extend_from_slice(XERIAL_MAGIC);
            out.extend_from_slice(&1i32.to_be_bytes());
            out.extend_from_slice(&1i32.to_be_bytes());
            let mut encoder = snap::raw::Encoder::new();
            for block in data.chunks(XERIAL_BLOCK) {
                let compressed = encoder
                    .compress_vec(block)
                    .map_err(|e| invalid(e.to_string()))?;
                let len = i32::try_from(compressed.len()).map_err(|e| invalid(e.to_string()))?;
                out.extend_from_slice(&len.to_be_bytes());
                out.extend_from_slice(&compressed);
            }
            Ok(out)
        }
        Codec::Lz4 => {
            // Independent 64 KiB blocks: what Kafka's `KafkaLZ4BlockOutputStream` writes
            // and the only block layout its input stream reads.
            let info = lz4_flex::frame::FrameInfo::new()
                .block_size(lz4_flex::frame::BlockSize::Max64KB)
                .block_mode(lz4_flex::frame::BlockMode::Independent);
            let mut e = lz4_flex::frame::FrameEncoder::with_frame_info(info, Vec::new());
            e.write_all(data).map_err(|e| invalid(e.to_string()))?;
            e.finish().map_err(|e| invalid(e.to_string()))
        }
        Codec::Zstd => Ok(ruzstd::encoding::compress_to_vec(
            data,
            // The only level of ruzstd's encoder besides `Uncompressed`.
            ruzstd::encoding::CompressionLevel::Fastest,
        )),
    }
}

/// Reads `reader` to its end, failing once it yields more than `limit` bytes.
fn read_bounded(
    codec: Codec,
    reader: impl Read,
    limit: usize,
) -> Result<Vec<u8>, CompressionError> {
    let mut out = Vec::new();
    let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    reader
        .take(cap)
        .read_to_end(&mut out)
        .map_err(|e| CompressionError::Invalid {
            codec,
            reason: e.to_string(),
        })?;
    if out.len() > limit {
        return Err(CompressionError::TooLarge { codec, limit });
    }
    Ok(out)
}

/// Appends one raw snappy block to `out`, its announced length checked before anything is
/// allocated for it.
fn snappy_block(block: &[u8], limit: usize, out: &mut Vec<u8>) -> Result<(), CompressionError> {
    let codec = Codec::Snappy;
    let invalid = |e: snap::Error| CompressionError::Invalid {
        codec,
        reason: e.to_string(),
    };
    let len = snap::raw::decompress_len(block).map_err(invalid)?;
    if out.len().saturating_add(len) > limit {
        return Err(CompressionError::TooLarge { codec, limit });
    }
    let at = out.len();
    out.resize(at + len, 0);
    let written = snap::raw::Decoder::new()
        .decompress(block, &mut out[at..])
        .map_err(invalid)?;
    out.truncate(at + written);
    Ok(())
}

/// Decodes xerial's framing: the 16-byte header, then `[int32 length][raw snappy block]`s.
fn unxerial(data: &[u8], limit: usize) -> Result<Vec<u8>, CompressionError> {
    let invalid = |reason: &str| CompressionError::Invalid {
        codec: Codec::Snappy,
        reason: reason.to_string(),
    };
    let mut rest = data
        .get(XERIAL_HEADER_BYTES..)
        .ok_or_else(|| invalid("truncated xerial header"))?;
    let mut out = Vec::new();
    while !rest.is_empty() {
        let len = rest
            .get(..4)
            .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or_else(|| invalid("truncated xerial block length"))?;
        let len = usize::try_from(len).map_err(|_| invalid("negative xerial block length"))?;
        let block = rest
            .get(4..4 + len)
            .ok_or_else(|| invalid("truncated xerial block"))?;
        snappy_block(block, limit, &mut out)?;
        rest = &rest[4 + len..];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ALL: [Codec; 5] = [
        Codec::None,
        Codec::Gzip,
        Codec::Snappy,
        Codec::Lz4,
        Codec::Zstd,
    ];

    fn sample() -> Vec<u8> {
        (0..200_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect()
    }

    #[test]
    fn every_codec_round_trips() {
        let data = sample();
        for codec in ALL {
            let c = compress(codec, &data).unwrap();
            if codec != Codec::None {
                assert!(c.len() < data.len() / 2, "{codec:?} compresses");
            }
            assert_eq!(
                decompress(codec, &c, data.len()).unwrap(),
                data,
                "{codec:?}"
            );
            assert_eq!(Codec::from_attributes(codec.attribute_bits()), Some(codec));
        }
        assert_eq!(Codec::from_attributes(5), None);
    }

    #[test]
    fn decompression_stops_at_the_limit() {
        let data = vec![0u8; 1 << 20];
        for codec in ALL {
            let c = compress(codec, &data).unwrap();
            assert_eq!(
                decompress(codec, &c, (1 << 20) - 1),
                Err(CompressionError::TooLarge {
                    codec,
                    limit: (1 << 20) - 1
                }),
                "{codec:?}"
            );
        }
    }

    #[test]
    fn raw_snappy_as_librdkafka_sends_it() {
        let data = sample();
        let raw = snap::raw::Encoder::new().compress_vec(&data).unwrap();
        assert_eq!(decompress(Codec::Snappy, &raw, data.len()).unwrap(), data);
        // The announced length is checked before any allocation.
        assert!(matches!(
            decompress(Codec::Snappy, &raw, 10),
            Err(CompressionError::TooLarge { .. })
        ));
    }

    #[test]
    fn lz4_with_kafka_3160_checksum() {
        let data = sample();
        let mut c = compress(Codec::Lz4, &data).unwrap();
        // What Kafka 0.8/0.9 wrote: the checksum over magic + descriptor.
        c[6] = (twox_xxh32(&c[0..6]) >> 8) as u8;
        assert!(decompress(Codec::Lz4, &c, data.len()).is_err());
        assert_eq!(decompress_lz4_magic0(&c, data.len()).unwrap(), data);
    }

    proptest! {
        #[test]
        fn any_bytes_never_panic(codec in 0i16..5, data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let codec = Codec::from_attributes(codec).unwrap();
            let _ = decompress(codec, &data, 1 << 16);
            let _ = decompress_lz4_magic0(&data, 1 << 16);
            let mut framed = XERIAL_MAGIC.to_vec();
            framed.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 1]);
            framed.extend_from_slice(&data);
            let _ = decompress(Codec::Snappy, &framed, 1 << 16);
        }
    }
}
