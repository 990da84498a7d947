//! Pulsar binary protocol framing and the broker's replies, built from the `pulsar` crate's
//! own protobuf types (`PulsarApi.proto`), so no protobuf is written by hand.
//!
//! [`FrameCodec`] wraps `pulsar::message::Codec` with the limit that codec lacks: a frame
//! whose declared size exceeds [`MAX_FRAME_BYTES`] is an error before anything is buffered,
//! so a client cannot make us allocate more than that per connection. Payload frames
//! (`Send`) it decodes itself: one hardware CRC32C pass and no copy ([`Received`] keeps the
//! checked part as a slice of the read buffer, which is what the log stores), where the inner
//! codec copies the checked part twice and checksums it in software (measured: the largest
//! broker-side cost per byte of a batched produce).
//!
//! Outgoing `CommandMessage` frames are written by [`message_frame`], not by the `pulsar`
//! codec: the stored entry already holds `[metadata size][metadata][payload]` exactly as the
//! wire's checksummed part, so a delivery copies it once instead of re-encoding it, and the
//! frame can carry broker-entry metadata (`0x0e02` + size + `BrokerEntryMetadata` before the
//! `0x0e01` checksum section, as Apache Pulsar with `exposingBrokerEntryMetadataToClientEnabled`),
//! which the `pulsar` codec cannot write.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message as _;
use pulsar::message::proto::{
    self, base_command::Type, BaseCommand, BrokerEntryMetadata, MessageIdData, ServerError,
};
use pulsar::message::{Codec, Message};
use tokio_util::codec::{Decoder, Encoder};

/// Largest message payload a client may send (advertised in `CommandConnected`).
pub const MAX_MESSAGE_SIZE: usize = 5 * 1024 * 1024;
/// Largest frame accepted: a maximal message plus room for command and metadata.
pub const MAX_FRAME_BYTES: usize = MAX_MESSAGE_SIZE + 64 * 1024;
/// Newest protocol version we speak (`ProtocolVersion.v19`).
pub const MAX_PROTOCOL_VERSION: i32 = 19;
/// Oldest protocol version a client must speak to get broker-entry metadata
/// (`ProtocolVersion.v18`: "Add client support for broker entry metadata").
pub const ENTRY_METADATA_PROTOCOL_VERSION: i32 = 18;
/// Ledger id of every message id: a topic is one continuous log, so the entry id alone is
/// the position (and equals the topic's entry index).
pub const LEDGER_ID: u64 = 0;

/// Magic number before a frame's checksum (`0x0e01`).
const MAGIC_CRC32C: u16 = 0x0e01;
/// Magic number before broker-entry metadata (`0x0e02`).
const MAGIC_BROKER_ENTRY_METADATA: u16 = 0x0e02;

/// One outgoing frame: a command built from protobuf types, or bytes already framed.
#[derive(Debug)]
pub enum Frame {
    Command(Box<Message>),
    Raw(Bytes),
}

impl From<Message> for Frame {
    fn from(m: Message) -> Frame {
        Frame::Command(Box::new(m))
    }
}

/// A `CommandMessage` frame: `command`, then broker-entry metadata if given, then the
/// checksummed `tail` (`[u32 metadata size][metadata][payload]`) whose CRC32C is `tail_crc`.
pub fn message_frame(
    command: &BaseCommand,
    entry_metadata: Option<&BrokerEntryMetadata>,
    tail: &[u8],
    tail_crc: u32,
) -> Bytes {
    let cmd_len = command.encoded_len();
    let bem_len = entry_metadata.map_or(0, |m| 6 + m.encoded_len());
    let total = 4 + cmd_len + bem_len + 6 + tail.len();
    let mut buf = BytesMut::with_capacity(4 + total);
    // Sizes are bounded by MAX_FRAME_BYTES (entries are checked on the way in).
    buf.put_u32(total as u32);
    buf.put_u32(cmd_len as u32);
    // Encoding into a buffer with enough capacity cannot fail.
    let _ = command.encode(&mut buf);
    if let Some(m) = entry_metadata {
        buf.put_u16(MAGIC_BROKER_ENTRY_METADATA);
        buf.put_u32(m.encoded_len() as u32);
        let _ = m.encode(&mut buf);
    }
    buf.put_u16(MAGIC_CRC32C);
    buf.put_u32(tail_crc);
    buf.put_slice(tail);
    buf.freeze()
}

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("socket error: {0}")]
    Io(#[from] std::io::Error),
}

/// Size-bounded Pulsar frame codec.
#[derive(Default)]
pub struct FrameCodec;

/// One decoded incoming frame.
#[derive(Debug)]
pub enum Inbound {
    Message(Box<Message>),
    /// A payload frame (`Send`), its checksum verified.
    Payload(Box<Received>),
    /// A well-framed command whose payload failed its CRC32C: the command is intact, so the
    /// connection answers it (`SendError` with `ChecksumError`, as Apache Pulsar's
    /// `ServerCnx`) and goes on; the frame is consumed.
    ChecksumMismatch(Box<BaseCommand>),
}

#[cfg(test)]
impl Inbound {
    /// The message, if the frame was intact.
    pub fn into_message(self) -> Option<Message> {
        match self {
            Inbound::Message(m) => Some(*m),
            Inbound::Payload(r) => Some(r.into_message()),
            Inbound::ChecksumMismatch(_) => None,
        }
    }
}

/// A payload frame as received: its command, its decoded metadata, and the part the frame's
/// CRC32C covers (`[u32 metadata size][metadata][payload]`), kept as a slice of the read
/// buffer: the log stores it as it is unless the broker must change the metadata.
#[derive(Debug)]
pub struct Received {
    pub command: BaseCommand,
    pub metadata: proto::MessageMetadata,
    /// The checked part, as received.
    pub tail: Bytes,
    /// CRC32C of `tail` (verified).
    pub tail_crc: u32,
    /// Where the payload starts in `tail`.
    payload_start: usize,
}

impl Received {
    /// The payload as sent (a batch or a single message, compressed or not).
    pub fn payload(&self) -> Bytes {
        self.tail.slice(self.payload_start.min(self.tail.len())..)
    }

    /// The same frame as the `pulsar` codec decodes it (copies the payload).
    pub fn into_message(self) -> Message {
        let data = self.payload().to_vec();
        Message {
            command: self.command,
            payload: Some(pulsar::message::Payload {
                metadata: self.metadata,
                data,
                broker_entry: None,
            }),
        }
    }
}

/// Where the parts of a payload frame are, within the frame after its size word.
struct Parsed {
    command: BaseCommand,
    metadata: proto::MessageMetadata,
    crc: u32,
    tail_start: usize,
    payload_start: usize,
}

/// A frame (after its size word) read as a payload frame.
enum PayloadFrame {
    /// Not a well-formed payload frame (a command-only frame, or one to leave to the inner
    /// codec, which reports what is wrong).
    NotOne,
    /// The payload section's checksum is wrong; the command is intact.
    BadChecksum(Box<BaseCommand>),
    Parsed(Box<Parsed>),
}

/// Decodes `[u32 command size][command][0x0e01][u32 CRC32C][u32 metadata size][metadata]
/// [payload]` (Pulsar protocol, "Payload commands"), checking the CRC32C of everything after
/// it in one pass.
fn payload_frame(frame: &[u8]) -> PayloadFrame {
    let parse = || -> Option<PayloadFrame> {
        let cmd_size = u32::from_be_bytes(frame.get(..4)?.try_into().ok()?) as usize;
        let cmd = frame.get(4..4usize.checked_add(cmd_size)?)?;
        let rest = frame.get(4 + cmd_size..)?;
        if rest.get(..2)? != MAGIC_CRC32C.to_be_bytes() {
            return None;
        }
        let crc = u32::from_be_bytes(rest.get(2..6)?.try_into().ok()?);
        let checked = rest.get(6..)?;
        let command = BaseCommand::decode(cmd).ok()?;
        if crc32c::crc32c(checked) != crc {
            return Some(PayloadFrame::BadChecksum(Box::new(command)));
        }
        let meta_size = u32::from_be_bytes(checked.get(..4)?.try_into().ok()?) as usize;
        let meta = checked.get(4..4usize.checked_add(meta_size)?)?;
        let metadata = proto::MessageMetadata::decode(meta).ok()?;
        Some(PayloadFrame::Parsed(Box::new(Parsed {
            command,
            metadata,
            crc,
            tail_start: 4 + cmd_size + 6,
            payload_start: 4 + meta_size,
        })))
    };
    parse().unwrap_or(PayloadFrame::NotOne)
}

impl Decoder for FrameCodec {
    type Item = Inbound;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Inbound>, FrameError> {
        let Some(size) = src.get(..4) else {
            return Ok(None);
        };
        let mut word = [0u8; 4];
        word.copy_from_slice(size);
        let size = u32::from_be_bytes(word) as usize;
        if size > MAX_FRAME_BYTES {
            return Err(FrameError::TooLarge(size));
        }
        if size < 4 {
            return Err(FrameError::Malformed(format!("frame size {size}")));
        }
        if src.len() < size + 4 {
            src.reserve(size + 4 - src.len());
            return Ok(None);
        }
        if let Some(frame) = src.get(4..4 + size) {
            match payload_frame(frame) {
                PayloadFrame::NotOne => {}
                PayloadFrame::BadChecksum(cmd) => {
                    src.advance(size + 4);
                    return Ok(Some(Inbound::ChecksumMismatch(cmd)));
                }
                PayloadFrame::Parsed(p) => {
                    let frame = src.split_to(size + 4).freeze();
                    let Parsed {
                        command,
                        metadata,
                        crc,
                        tail_start,
                        payload_start,
                    } = *p;
                    // In range: `payload_frame` read it at this offset (+ the size word).
                    let tail = frame.slice((4 + tail_start).min(frame.len())..);
                    return Ok(Some(Inbound::Payload(Box::new(Received {
                        command,
                        metadata,
                        tail,
                        tail_crc: crc,
                        payload_start,
                    }))));
                }
            }
        }
        Codec
            .decode(src)
            .map(|m| m.map(|m| Inbound::Message(Box::new(m))))
            .map_err(|e| FrameError::Malformed(e.to_string()))
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, item: Frame, dst: &mut BytesMut) -> Result<(), FrameError> {
        match item {
            Frame::Command(m) => Codec
                .encode(*m, dst)
                .map_err(|e| FrameError::Malformed(e.to_string())),
            Frame::Raw(bytes) => {
                dst.extend_from_slice(&bytes);
                Ok(())
            }
        }
    }
}

/// A command-only frame of `kind`, filled in by `fill`.
pub fn command(kind: Type, fill: impl FnOnce(&mut BaseCommand)) -> Message {
    let mut command = BaseCommand {
        r#type: kind as i32,
        ..Default::default()
    };
    fill(&mut command);
    Message {
        command,
        payload: None,
    }
}

/// Message id of entry `entry_id` (`u64::MAX`, i.e. -1, for "none").
pub fn message_id(entry_id: u64) -> MessageIdData {
    MessageIdData {
        ledger_id: LEDGER_ID,
        entry_id,
        ..Default::default()
    }
}

/// The "no message" id (-1:-1), e.g. the receipt of a de-duplicated send.
pub fn no_message_id() -> MessageIdData {
    MessageIdData {
        ledger_id: u64::MAX,
        entry_id: u64::MAX,
        ..Default::default()
    }
}

/// `CommandSuccess` for `request_id`.
pub fn success(request_id: u64) -> Message {
    command(Type::Success, |c| {
        c.success = Some(proto::CommandSuccess {
            request_id,
            schema: None,
        })
    })
}

/// `CommandError` for `request_id`.
pub fn error(request_id: u64, error: ServerError, message: impl Into<String>) -> Message {
    command(Type::Error, |c| {
        c.error = Some(proto::CommandError {
            request_id,
            error: error as i32,
            message: message.into(),
        })
    })
}

/// The `request_id` of a request we do not implement, so that we can answer it with an error
/// instead of leaving the client waiting.
pub fn request_id_of(c: &BaseCommand) -> Option<u64> {
    c.consumer_stats
        .as_ref()
        .map(|x| x.request_id)
        .or_else(|| c.seek.as_ref().map(|x| x.request_id))
        .or_else(|| c.get_or_create_schema.as_ref().map(|x| x.request_id))
        .or_else(|| c.new_txn.as_ref().map(|x| x.request_id))
        .or_else(|| c.add_partition_to_txn.as_ref().map(|x| x.request_id))
        .or_else(|| c.add_subscription_to_txn.as_ref().map(|x| x.request_id))
        .or_else(|| c.end_txn.as_ref().map(|x| x.request_id))
        .or_else(|| c.end_txn_on_partition.as_ref().map(|x| x.request_id))
        .or_else(|| c.end_txn_on_subscription.as_ref().map(|x| x.request_id))
        .or_else(|| c.tc_client_connect_request.as_ref().map(|x| x.request_id))
        .or_else(|| c.subscribe.as_ref().map(|x| x.request_id))
        .or_else(|| c.producer.as_ref().map(|x| x.request_id))
        .or_else(|| c.lookup_topic.as_ref().map(|x| x.request_id))
        .or_else(|| c.partition_metadata.as_ref().map(|x| x.request_id))
        .or_else(|| c.unsubscribe.as_ref().map(|x| x.request_id))
        .or_else(|| c.close_consumer.as_ref().map(|x| x.request_id))
        .or_else(|| c.close_producer.as_ref().map(|x| x.request_id))
        .or_else(|| c.get_last_message_id.as_ref().map(|x| x.request_id))
        .or_else(|| c.get_topics_of_namespace.as_ref().map(|x| x.request_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversized_frame_is_refused_before_buffering() {
        let mut buf = BytesMut::from(&((MAX_FRAME_BYTES as u32) + 1).to_be_bytes()[..]);
        assert!(matches!(
            FrameCodec.decode(&mut buf),
            Err(FrameError::TooLarge(_))
        ));
    }

    #[test]
    fn message_frame_is_what_the_pulsar_codec_reads() {
        let metadata = proto::MessageMetadata {
            producer_name: "p".into(),
            sequence_id: 4,
            publish_time: 9,
            ..Default::default()
        };
        let mut tail = Vec::new();
        tail.extend_from_slice(&(metadata.encoded_len() as u32).to_be_bytes());
        metadata.encode(&mut tail).unwrap();
        tail.extend_from_slice(b"payload");
        let cmd = command(Type::Message, |c| {
            c.message = Some(proto::CommandMessage {
                consumer_id: 3,
                message_id: message_id(5),
                ..Default::default()
            })
        })
        .command;
        let frame = message_frame(&cmd, None, &tail, crc32c::crc32c(&tail));
        let msg = decode_one(&mut BytesMut::from(&frame[..]));
        assert_eq!(msg.command.message.unwrap().message_id.entry_id, 5);
        let payload = msg.payload.unwrap();
        assert_eq!(payload.metadata, metadata);
        assert_eq!(payload.data, b"payload");
        // With broker-entry metadata: the section sits between command and checksum.
        let bem = BrokerEntryMetadata {
            broker_timestamp: Some(77),
            index: Some(41),
        };
        let frame = message_frame(&cmd, Some(&bem), &tail, crc32c::crc32c(&tail));
        let at = 8 + cmd.encoded_len();
        assert_eq!(&frame[at..at + 2], &[0x0e, 0x02]);
        let len = u32::from_be_bytes(frame[at + 2..at + 6].try_into().unwrap()) as usize;
        let decoded = BrokerEntryMetadata::decode(&frame[at + 6..at + 6 + len]).unwrap();
        assert_eq!(decoded, bem);
        assert_eq!(&frame[at + 6 + len..at + 8 + len], &[0x0e, 0x01]);
    }

    #[test]
    fn bad_payload_checksum_yields_the_command_and_consumes_the_frame() {
        let metadata = proto::MessageMetadata {
            producer_name: "p".into(),
            sequence_id: 4,
            ..Default::default()
        };
        let send = command(Type::Send, |c| {
            c.send = Some(proto::CommandSend {
                producer_id: 1,
                sequence_id: 4,
                ..Default::default()
            })
        })
        .command;
        let mut buf = BytesMut::new();
        Codec
            .encode(
                Message {
                    command: send,
                    payload: Some(pulsar::message::Payload {
                        metadata,
                        data: b"payload".to_vec(),
                        broker_entry: None,
                    }),
                },
                &mut buf,
            )
            .unwrap();
        let last = buf.len() - 1;
        buf[last] ^= 0x01;
        FrameCodec.encode(success(8).into(), &mut buf).unwrap();
        match FrameCodec.decode(&mut buf).unwrap().unwrap() {
            Inbound::ChecksumMismatch(cmd) => assert_eq!(cmd.send.unwrap().sequence_id, 4),
            other => panic!("expected a checksum mismatch, got {other:?}"),
        }
        let next = FrameCodec
            .decode(&mut buf)
            .unwrap()
            .unwrap()
            .into_message()
            .unwrap();
        assert_eq!(next.command.success.unwrap().request_id, 8);
    }

    #[test]
    fn payload_frame_decodes_as_the_pulsar_codec_does() {
        let message = || Message {
            command: command(Type::Send, |c| {
                c.send = Some(proto::CommandSend {
                    producer_id: 3,
                    sequence_id: 9,
                    num_messages: Some(2),
                    ..Default::default()
                })
            })
            .command,
            payload: Some(pulsar::message::Payload {
                metadata: proto::MessageMetadata {
                    producer_name: "p".into(),
                    sequence_id: 9,
                    num_messages_in_batch: Some(2),
                    ..Default::default()
                },
                data: b"two messages".to_vec(),
                broker_entry: None,
            }),
        };
        let mut ours = BytesMut::new();
        Codec.encode(message(), &mut ours).unwrap();
        let mut theirs = ours.clone();
        let ours = FrameCodec
            .decode(&mut ours)
            .unwrap()
            .unwrap()
            .into_message();
        let theirs = Codec.decode(&mut theirs).unwrap();
        assert_eq!(format!("{ours:?}"), format!("{theirs:?}"));
        let payload = ours.unwrap().payload.unwrap();
        assert_eq!(payload.data, b"two messages");
        assert_eq!(payload.metadata.num_messages_in_batch, Some(2));
    }

    /// One complete frame decoded as a message (the test fails otherwise).
    fn decode_one(buf: &mut BytesMut) -> Message {
        FrameCodec
            .decode(buf)
            .unwrap()
            .unwrap()
            .into_message()
            .unwrap()
    }

    #[test]
    fn round_trip_and_garbage_never_panics() {
        let mut buf = BytesMut::new();
        FrameCodec.encode(success(7).into(), &mut buf).unwrap();
        let msg = decode_one(&mut buf);
        assert_eq!(msg.command.success.unwrap().request_id, 7);
        // Arbitrary bytes: errors or waits, never panics.
        let mut seed = 12345u64;
        for len in 0..2000usize {
            let mut bytes = Vec::with_capacity(len);
            for _ in 0..len {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                bytes.push((seed >> 33) as u8);
            }
            if let Some(b) = bytes.get_mut(..4) {
                let n = (len.saturating_sub(4) as u32).to_be_bytes();
                b.copy_from_slice(&n);
            }
            let mut buf = BytesMut::from(&bytes[..]);
            let _ = FrameCodec.decode(&mut buf);
        }
    }
}
