//! Frames (AMQP 0-9-1 §4.2.3): type octet, channel, 32-bit size, payload, frame-end octet
//! `0xCE`; and the protocol header a client opens with (§4.2.2).
//!
//! [`Frame::check`] takes the bytes received so far: an incomplete frame is `Ok(None)` (wait
//! for more), a frame that can never be right (a size above the negotiated `frame-max`, an
//! unknown type, a wrong frame-end) is an error, which the connection answers with
//! `connection.close` 501 FRAME_ERROR, as RabbitMQ does.

use super::method::Method;
use super::properties::ContentHeader;
use super::CodecError;

/// What a client sends first: `AMQP` 0 0 9 1.
pub const PROTOCOL_HEADER: [u8; 8] = *b"AMQP\x00\x00\x09\x01";
/// The octet that ends every frame.
pub const FRAME_END: u8 = 0xCE;
/// Type octet, channel and size.
pub const FRAME_HEADER_SIZE: usize = 7;
/// Header and frame end: what a frame costs beyond its payload.
pub const FRAME_OVERHEAD: usize = FRAME_HEADER_SIZE + 1;

const METHOD: u8 = 1;
const HEADER: u8 = 2;
const BODY: u8 = 3;
const HEARTBEAT: u8 = 8;

/// One frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Method(u16, Method),
    Header(u16, ContentHeader),
    Body(u16, Vec<u8>),
    Heartbeat,
}

impl Frame {
    /// Cuts the first frame out of `buf` (`frame_max`: largest frame, header and end
    /// included, 0 for no limit beyond 2^32): the frame and the bytes it used, or `None`
    /// while incomplete.
    pub fn check(buf: &[u8], frame_max: u32) -> Result<Option<(Frame, usize)>, CodecError> {
        let Some(head) = buf.get(..FRAME_HEADER_SIZE) else {
            return Ok(None);
        };
        let kind = head[0];
        let channel = u16::from_be_bytes([head[1], head[2]]);
        let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]);
        if !matches!(kind, METHOD | HEADER | BODY | HEARTBEAT) {
            return Err(CodecError::FrameType(kind));
        }
        let total = u64::from(size) + FRAME_OVERHEAD as u64;
        if frame_max != 0 && total > u64::from(frame_max) {
            return Err(CodecError::FrameTooLarge {
                size: total,
                max: frame_max,
            });
        }
        let Ok(total) = usize::try_from(total) else {
            return Err(CodecError::FrameTooLarge {
                size: total,
                max: frame_max,
            });
        };
        let Some(frame) = buf.get(..total) else {
            return Ok(None);
        };
        let end = frame[total - 1];
        if end != FRAME_END {
            return Err(CodecError::FrameEnd(end));
        }
        let payload = &frame[FRAME_HEADER_SIZE..total - 1];
        let frame = match kind {
            METHOD => Frame::Method(channel, Method::read(payload)?),
            HEADER => Frame::Header(channel, ContentHeader::read(payload)?),
            BODY => Frame::Body(channel, payload.to_vec()),
            _ => {
                if channel != 0 {
                    return Err(CodecError::HeartbeatChannel(channel));
                }
                Frame::Heartbeat
            }
        };
        Ok(Some((frame, total)))
    }

    /// Appends the frame.
    pub fn write(&self, out: &mut Vec<u8>) {
        let (kind, channel) = match self {
            Frame::Method(c, _) => (METHOD, *c),
            Frame::Header(c, _) => (HEADER, *c),
            Frame::Body(c, _) => (BODY, *c),
            Frame::Heartbeat => (HEARTBEAT, 0),
        };
        out.push(kind);
        out.extend_from_slice(&channel.to_be_bytes());
        let at = out.len();
        out.extend_from_slice(&[0; 4]);
        match self {
            Frame::Method(_, m) => m.write(out),
            Frame::Header(_, h) => h.write(out),
            Frame::Body(_, b) => out.extend_from_slice(b),
            Frame::Heartbeat => {}
        }
        let size = u32::try_from(out.len() - at - 4).unwrap_or(u32::MAX);
        if let Some(slot) = out.get_mut(at..at + 4) {
            slot.copy_from_slice(&size.to_be_bytes());
        }
        out.push(FRAME_END);
    }
}

/// Appends a method frame.
pub fn write_method(out: &mut Vec<u8>, channel: u16, method: Method) {
    Frame::Method(channel, method).write(out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::method::*;
    use proptest::prelude::*;

    #[test]
    fn frames_round_trip_and_wait_when_incomplete() {
        let mut out = Vec::new();
        let m = Method::BasicPublish(BasicPublish {
            exchange: "amq.topic".into(),
            routing_key: "a.b".into(),
            mandatory: true,
            ..Default::default()
        });
        write_method(&mut out, 3, m.clone());
        Frame::Body(3, b"hello".to_vec()).write(&mut out);
        Frame::Heartbeat.write(&mut out);
        let (f, used) = Frame::check(&out, 131072).unwrap().unwrap();
        assert_eq!(f, Frame::Method(3, m));
        for cut in 0..used {
            assert_eq!(Frame::check(&out[..cut], 131072), Ok(None));
        }
        let (f, used2) = Frame::check(&out[used..], 131072).unwrap().unwrap();
        assert_eq!(f, Frame::Body(3, b"hello".to_vec()));
        let (f, _) = Frame::check(&out[used + used2..], 131072).unwrap().unwrap();
        assert_eq!(f, Frame::Heartbeat);
    }

    #[test]
    fn bits_pack_into_one_octet() {
        // queue.declare: passive, durable, exclusive, auto-delete, no-wait share an octet.
        let mut out = Vec::new();
        Method::QueueDeclare(QueueDeclare {
            queue: "q".into(),
            durable: true,
            auto_delete: true,
            ..Default::default()
        })
        .write(&mut out);
        assert_eq!(out, [0, 50, 0, 10, 0, 0, 1, b'q', 0b0000_1010, 0, 0, 0, 0]);
        assert!(
            matches!(Method::read(&out), Ok(Method::QueueDeclare(q)) if q.durable && q.auto_delete && !q.passive)
        );
    }

    #[test]
    fn hostile_frames_are_errors() {
        let mut out = Vec::new();
        write_method(&mut out, 1, Method::ChannelOpen(ChannelOpen::default()));
        let last = out.len() - 1;
        out[last] = 0;
        assert_eq!(Frame::check(&out, 0), Err(CodecError::FrameEnd(0)));
        assert!(matches!(
            Frame::check(b"\x01\x00\x00\xff\xff\xff\xff", 131072),
            Err(CodecError::FrameTooLarge { .. })
        ));
        assert_eq!(
            Frame::check(b"\x07\0\0\0\0\0\0\xce", 0),
            Err(CodecError::FrameType(7))
        );
        assert_eq!(
            Frame::check(b"\x01\0\0\0\0\0\x04\0\x63\0\x01\xce", 0),
            Err(CodecError::UnknownMethod(99, 1))
        );
        assert_eq!(
            Frame::check(b"\x01\0\0\0\0\0\x01\0\xce", 0),
            Err(CodecError::Truncated)
        );
    }

    proptest! {
        #[test]
        fn any_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Frame::check(&bytes, 0);
            let _ = Frame::check(&bytes, 4096);
        }

        #[test]
        fn any_method_payload_never_panics(class in prop::sample::select(vec![10u16, 20, 40, 50, 60, 85, 90]), id in 0u16..130, rest in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut payload = Vec::new();
            payload.extend_from_slice(&class.to_be_bytes());
            payload.extend_from_slice(&id.to_be_bytes());
            payload.extend_from_slice(&rest);
            if let Ok(m) = Method::read(&payload) {
                let mut again = Vec::new();
                m.write(&mut again);
                prop_assert_eq!(Method::read(&again), Ok(m));
            }
        }
    }
}
