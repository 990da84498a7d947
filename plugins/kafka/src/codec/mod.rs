//! The Kafka wire as the plugin reads and writes it: size-delimited frames, the fixed part of
//! the request header, and responses.
//!
//! Every request and response is `[int32 size][size bytes]` (Kafka protocol guide, "Common
//! Request and Response Structure"). A request starts with `request_api_key int16,
//! request_api_version int16, correlation_id int32` whatever its header version (v0, v1 with
//! `client_id`, v2 flexible with tagged fields, KIP-482): [`RequestHead`] reads those 8 bytes
//! alone, so that a request of a version the plugin cannot decode can still be answered
//! (KIP-511). The rest of the header and the body are decoded by `kafka-protocol` once the
//! API and version are known to be served.
//!
//! The versions Kafka 4.0 removed, converted at the edge ([`legacy`]).
//!
//! The records inside requests and responses: record batches v2 ([`records`]), the old
//! message sets v0/v1 ([`message_set`]) and their codecs ([`compression`]).

pub mod compression;
pub mod legacy;
pub mod message_set;
pub mod records;

use bytes::Bytes;
use kafka_protocol::messages::ResponseHeader;
use kafka_protocol::protocol::Encodable;

/// Why the bytes from a client cannot be Kafka requests; each closes the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The size field is negative.
    #[error("negative request size {0}")]
    NegativeSize(i32),
    /// The size field exceeds `max_request_bytes`.
    #[error("request of {size} bytes exceeds the limit of {limit}")]
    TooLarge { size: usize, limit: usize },
    /// Fewer bytes than the fixed request header.
    #[error("request of {0} bytes is shorter than a request header")]
    ShortHeader(usize),
}

/// The fixed first 8 bytes of every request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHead {
    pub api_key: i16,
    pub api_version: i16,
    pub correlation_id: i32,
}

/// One request: its fixed header and all of its bytes (header included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub head: RequestHead,
    pub bytes: Bytes,
}

/// Length of the size field.
const SIZE_BYTES: usize = 4;
/// Length of the fixed part of a request header.
const HEAD_BYTES: usize = 8;

/// Cuts one request out of `buf`: `Ok(None)` while it is incomplete (nothing is allocated
/// for it until it is whole), else the request and the bytes it used. The size is checked
/// against `limit` as soon as the 4 size bytes are there.
pub fn frame(buf: &[u8], limit: usize) -> Result<Option<(Request, usize)>, FrameError> {
    let Some(size) = buf.get(..SIZE_BYTES) else {
        return Ok(None);
    };
    let size = i32::from_be_bytes([size[0], size[1], size[2], size[3]]);
    let size = usize::try_from(size).map_err(|_| FrameError::NegativeSize(size))?;
    if size > limit {
        return Err(FrameError::TooLarge { size, limit });
    }
    if size < HEAD_BYTES {
        return Err(FrameError::ShortHeader(size));
    }
    let Some(body) = buf.get(SIZE_BYTES..SIZE_BYTES + size) else {
        return Ok(None);
    };
    let Some(head) = frame_head(body) else {
        return Err(FrameError::ShortHeader(size));
    };
    Ok(Some((
        Request {
            head,
            bytes: Bytes::copy_from_slice(body),
        },
        SIZE_BYTES + size,
    )))
}

/// The fixed part of a request header (`request_api_key`, `request_api_version`,
/// `correlation_id`) at the start of `request` (the bytes after the size); `None` if it is
/// shorter.
pub fn frame_head(request: &[u8]) -> Option<RequestHead> {
    let b = request.get(..HEAD_BYTES)?;
    Some(RequestHead {
        api_key: i16::from_be_bytes([b[0], b[1]]),
        api_version: i16::from_be_bytes([b[2], b[3]]),
        correlation_id: i32::from_be_bytes([b[4], b[5], b[6], b[7]]),
    })
}

/// Why a response could not be encoded (a bug of ours, never the client's input): the
/// connection is closed with it.
#[derive(Debug)]
pub struct EncodeError(pub String);

/// Appends one response to `out`: `[int32 size][response header of header_version][body
/// encoded at version]`.
pub fn write_response<B: Encodable>(
    out: &mut Vec<u8>,
    correlation_id: i32,
    header_version: i16,
    body: &B,
    version: i16,
) -> Result<(), EncodeError> {
    let header = ResponseHeader::default().with_correlation_id(correlation_id);
    let err = |e: anyhow::Error| EncodeError(e.to_string());
    let size = header.compute_size(header_version).map_err(err)?
        + body.compute_size(version).map_err(err)?;
    let size = i32::try_from(size).map_err(|_| EncodeError(format!("response of {size} bytes")))?;
    out.extend_from_slice(&size.to_be_bytes());
    header.encode(out, header_version).map_err(err)?;
    body.encode(out, version).map_err(err)?;
    Ok(())
}
