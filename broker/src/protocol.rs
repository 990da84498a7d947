//! Pulsar binary protocol framing and the broker's replies, built from the `pulsar` crate's
//! own protobuf types (`PulsarApi.proto`), so no protobuf is written by hand.
//!
//! [`FrameCodec`] wraps `pulsar::message::Codec` with the limit that codec lacks: a frame
//! whose declared size exceeds [`MAX_FRAME_BYTES`] is an error before anything is buffered,
//! so a client cannot make us allocate more than that per connection. The inner codec checks
//! the CRC32C of payload frames.

use bytes::BytesMut;
use pulsar::message::proto::{self, base_command::Type, BaseCommand, MessageIdData, ServerError};
use pulsar::message::{Codec, Message};
use tokio_util::codec::{Decoder, Encoder};

/// Largest message payload a client may send (advertised in `CommandConnected`).
pub const MAX_MESSAGE_SIZE: usize = 5 * 1024 * 1024;
/// Largest frame accepted: a maximal message plus room for command and metadata.
pub const MAX_FRAME_BYTES: usize = MAX_MESSAGE_SIZE + 64 * 1024;
/// Newest protocol version we speak (`ProtocolVersion.v19`).
pub const MAX_PROTOCOL_VERSION: i32 = 19;
/// Ledger id of every message id: a topic is one continuous log, so the entry id alone is
/// the position (and equals the topic's entry index).
pub const LEDGER_ID: u64 = 0;

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

impl Decoder for FrameCodec {
    type Item = Message;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Message>, FrameError> {
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
        Codec
            .decode(src)
            .map_err(|e| FrameError::Malformed(e.to_string()))
    }
}

impl Encoder<Message> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, item: Message, dst: &mut BytesMut) -> Result<(), FrameError> {
        Codec
            .encode(item, dst)
            .map_err(|e| FrameError::Malformed(e.to_string()))
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
    fn round_trip_and_garbage_never_panics() {
        let mut buf = BytesMut::new();
        FrameCodec.encode(success(7), &mut buf).unwrap();
        let msg = FrameCodec.decode(&mut buf).unwrap().unwrap();
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
