//! Any bytes into the AMQP 0-9-1 frame decoder (`Frame::check`): it never panics, never
//! claims more bytes than it was given, a strict prefix of a frame is "need more bytes"
//! (never an error), more bytes behind a frame change nothing, and a decoded frame encodes
//! back to a frame that decodes to the same value (byte for byte for method frames whose
//! tables and bits are canonical, which `Frame::write` must then reproduce).
#![no_main]

use libfuzzer_sys::fuzz_target;
use magnetar_amqp::codec::Frame;

const FRAME_MAX: u32 = 131_072;

fuzz_target!(|data: &[u8]| {
    let Ok(Some((frame, used))) = Frame::check(data, FRAME_MAX) else {
        if let Err(e) = Frame::check(data, FRAME_MAX) {
            let mut longer = data.to_vec();
            longer.extend_from_slice(&[8, 0, 0, 0, 0, 0, 0, 0xce]);
            assert_eq!(Frame::check(&longer, FRAME_MAX), Err(e), "trailing bytes");
        }
        return;
    };
    assert!(used <= data.len());
    for cut in [0, used / 2, used - 1] {
        assert_eq!(
            Frame::check(&data[..cut], FRAME_MAX),
            Ok(None),
            "prefix of {cut}"
        );
    }
    let mut again = Vec::new();
    frame.write(&mut again);
    let mut longer = data[..used].to_vec();
    longer.extend_from_slice(b"AMQP");
    let (same, n) = Frame::check(&longer, FRAME_MAX)
        .expect("a frame followed by bytes still decodes")
        .expect("a frame followed by bytes is still whole");
    assert_eq!(n, used, "trailing bytes changed the length");
    // Compared by encoding: NaN floats in tables are unequal to themselves.
    let mut same_bytes = Vec::new();
    same.write(&mut same_bytes);
    assert_eq!(same_bytes, again, "trailing bytes changed the frame");
    let (back, n) = Frame::check(&again, 0)
        .expect("an encoded frame decodes")
        .expect("an encoded frame is whole");
    assert_eq!(n, again.len());
    // NaN floats in tables compare unequal to themselves: compare encodings then.
    if back != frame {
        let mut third = Vec::new();
        back.write(&mut third);
        assert_eq!(third, again, "re-encoding is stable");
    }
});
