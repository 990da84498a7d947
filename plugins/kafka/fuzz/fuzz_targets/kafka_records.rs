//! Any bytes into the record decoders a Produce request reaches: record batches v2 and
//! message sets v0/v1 (compressed wrappers included). Asserts: no panic, no allocation past
//! the limit (libFuzzer's `-rss_limit_mb` catches one), and a decoded v2 batch survives
//! re-encoding: encode → decode gives the same batch.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use magnetar_kafka::codec::{message_set, records};

const LIMITS: records::Limits = records::Limits {
    max_uncompressed_bytes: 1 << 20,
};

fuzz_target!(|data: &[u8]| {
    let _ = message_set::decode(data, LIMITS);
    let Ok(batches) = records::decode_batches(Bytes::copy_from_slice(data), LIMITS) else {
        return;
    };
    let mut out = Vec::new();
    for batch in &batches {
        records::encode_batch(batch, &mut out).expect("a decoded batch encodes");
    }
    let again =
        records::decode_batches(Bytes::from(out), LIMITS).expect("re-encoded batches decode");
    assert_eq!(again, batches);
});
