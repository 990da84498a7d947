//! The message envelope of the gateway's web port: how a plugin serving WebSocket endpoints
//! (Pulsar's WebSocket API, say) talks to the host, which owns HTTP and RFC 6455.
//!
//! A listener with `web = true` reads the HTTP request itself; an upgrade under `/ws/`
//! becomes a plugin connection in *message mode*: its byte stream (`on_data` in,
//! [`Conn::send`](crate::Conn::send) out) is a sequence of [`Frame`]s instead of raw socket
//! bytes. Each frame is
//!
//! ```text
//! kind: u8 | length: u32 big-endian | payload: `length` bytes
//! ```
//!
//! Host to plugin: [`Frame::Request`] first, always (the upgrade request, before any answer
//! went to the client), then [`Frame::Text`] (UTF-8, checked by the host) and
//! [`Frame::Binary`] messages, whole (the host reassembles fragments).
//!
//! Plugin to host: [`Frame::Response`] exactly once, before any message. Status 101 completes
//! the upgrade (the host adds `Upgrade`, `Connection`, `Sec-WebSocket-Accept`, and the
//! subprotocol if the response names one as `sec-websocket-protocol`); any other status is
//! sent as a plain HTTP response with its body and the connection ends. Then
//! [`Frame::Text`] / [`Frame::Binary`] (one WebSocket message each) and at most one
//! [`Frame::Close`] (the host sends the close frame and ends the connection).
//!
//! Chunks split and join frames arbitrarily on both sides, so both sides decode
//! incrementally: [`decode`] is a framing function (it fits
//! [`Input::next_frame`](crate::input::Input::next_frame)), [`Decoder`] a small buffer
//! around it. Lengths are checked against the decoder's limit before anything is buffered
//! for them, so a hostile or broken peer cannot make the other side allocate.
//!
//! ```
//! use magnetar_sdk::web::{decode, Direction, Frame, Response};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // The plugin accepts the upgrade, then says hello.
//! let mut out = Frame::Response(Response::switching_protocols()).encode();
//! out.extend(Frame::Text("hello".into()).encode());
//! // The host reads what the plugin sent, however the chunks fell.
//! let (first, used) = decode(Direction::ToHost, &out, 1 << 20)?.ok_or("half a frame")?;
//! assert_eq!(first, Frame::Response(Response::switching_protocols()));
//! let (second, _) = decode(Direction::ToHost, &out[used..], 1 << 20)?.ok_or("half a frame")?;
//! assert_eq!(second, Frame::Text("hello".into()));
//! // Half a frame is not an error: wait for the rest.
//! assert_eq!(decode(Direction::ToHost, &out[..3], 1 << 20), Ok(None));
//! # Ok(())
//! # }
//! ```

use std::fmt;

use serde::{Deserialize, Serialize};

/// Bytes before a frame's payload: the kind and the length.
pub const HEADER_LEN: usize = 5;

/// Kind byte of [`Frame::Request`] (host to plugin) and [`Frame::Response`] (plugin to host).
pub const KIND_HTTP: u8 = 0x01;
/// Kind byte of [`Frame::Text`].
pub const KIND_TEXT: u8 = 0x02;
/// Kind byte of [`Frame::Binary`].
pub const KIND_BINARY: u8 = 0x03;
/// Kind byte of [`Frame::Close`] (plugin to host only).
pub const KIND_CLOSE: u8 = 0x04;

/// Who reads the frames: kind `0x01` is a request towards the plugin and a response towards
/// the host, and only the plugin may close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Frames the host sends and the plugin decodes.
    ToPlugin,
    /// Frames the plugin sends and the host decodes.
    ToHost,
}

/// One unit of the envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// The HTTP upgrade request (host to plugin, first frame).
    Request(Request),
    /// The answer to the upgrade request (plugin to host, first frame).
    Response(Response),
    /// A text message, valid UTF-8.
    Text(String),
    /// A binary message.
    Binary(Vec<u8>),
    /// The plugin ends the WebSocket with this close code (RFC 6455 §7.4) and reason.
    Close {
        /// Close code, e.g. 1000 (normal) or 1008 (policy violation).
        code: u16,
        /// Why, in UTF-8; the host truncates it to fit a close frame (123 bytes).
        reason: String,
    },
}

/// The HTTP request that asked for the upgrade, as the host read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// `GET` for an upgrade.
    pub method: String,
    /// The path, still percent-encoded, without the query.
    pub path: String,
    /// The query, raw (percent-encoded), without the `?`; empty when there is none.
    #[serde(default)]
    pub query: String,
    /// The headers in request order, names in lower case.
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    /// The client's address (`ip:port`).
    #[serde(default)]
    pub peer: String,
}

impl Request {
    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The first value of query parameter `name`, percent-decoded (`+` is a space, as HTML
    /// forms and Java's `URLEncoder` encode it); `None` if absent or not UTF-8 once decoded.
    ///
    /// ```
    /// let r = magnetar_sdk::web::Request {
    ///     method: "GET".into(),
    ///     path: "/ws/v2/producer/persistent/t/ns/a".into(),
    ///     query: "sendTimeoutMillis=30&token=ab%2Bc%3D&name=x+y".into(),
    ///     headers: vec![],
    ///     peer: "127.0.0.1:5000".into(),
    /// };
    /// assert_eq!(r.query_param("token").as_deref(), Some("ab+c="));
    /// assert_eq!(r.query_param("name").as_deref(), Some("x y"));
    /// assert_eq!(r.query_param("missing"), None);
    /// ```
    pub fn query_param(&self, name: &str) -> Option<String> {
        self.query_params().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    /// Every query parameter in order, percent-decoded; pairs that do not decode to UTF-8
    /// are skipped.
    pub fn query_params(&self) -> impl Iterator<Item = (String, String)> + '_ {
        self.query
            .split('&')
            .filter(|p| !p.is_empty())
            .filter_map(|pair| {
                let (n, v) = pair.split_once('=').unwrap_or((pair, ""));
                Some((percent_decode(n)?, percent_decode(v)?))
            })
    }
}

/// Decodes `%XX` escapes and `+`; `None` for a broken escape or bytes that are not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// The plugin's answer to the upgrade request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// 101 upgrades; anything else is sent as an HTTP response and ends the connection.
    pub status: u16,
    /// Extra headers, e.g. `sec-websocket-protocol` to pick a subprotocol.
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    /// The body of a refusal (ignored with 101).
    #[serde(default)]
    pub body: String,
}

impl Response {
    /// Accepts the upgrade.
    pub fn switching_protocols() -> Response {
        Response {
            status: 101,
            headers: Vec::new(),
            body: String::new(),
        }
    }

    /// Refuses the upgrade with `status` (400, 401, 403, 404, 409, 500...) and a text body.
    pub fn refuse(status: u16, body: impl Into<String>) -> Response {
        Response {
            status,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    /// Adds a header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Response {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// Why bytes are not a valid frame. The connection that sent them is broken: neither side
/// can find the next frame boundary with certainty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// A kind byte this direction does not know.
    UnknownKind(u8),
    /// A payload longer than the decoder accepts.
    TooLong {
        /// The announced payload length.
        len: u64,
        /// The decoder's limit.
        limit: usize,
    },
    /// A request or response that is not the JSON it must be.
    BadJson(String),
    /// A text frame or close reason that is not UTF-8.
    NotUtf8,
    /// A close payload of one byte (a code needs two).
    BadClose,
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::UnknownKind(k) => write!(f, "unknown frame kind 0x{k:02x}"),
            FrameError::TooLong { len, limit } => {
                write!(f, "frame of {len} bytes exceeds the limit of {limit}")
            }
            FrameError::BadJson(e) => write!(f, "malformed request or response: {e}"),
            FrameError::NotUtf8 => f.write_str("text is not valid UTF-8"),
            FrameError::BadClose => f.write_str("close payload of one byte"),
        }
    }
}

impl std::error::Error for FrameError {}

/// Reads one frame from the front of `buf`: `Ok(None)` while `buf` holds no whole frame,
/// else the frame and the bytes it used. A payload longer than `max_len` is an error as soon
/// as its header is seen.
pub fn decode(
    direction: Direction,
    buf: &[u8],
    max_len: usize,
) -> Result<Option<(Frame, usize)>, FrameError> {
    let Some((&kind, rest)) = buf.split_first() else {
        return Ok(None);
    };
    let known = match direction {
        Direction::ToPlugin => matches!(kind, KIND_HTTP | KIND_TEXT | KIND_BINARY),
        Direction::ToHost => matches!(kind, KIND_HTTP | KIND_TEXT | KIND_BINARY | KIND_CLOSE),
    };
    if !known {
        return Err(FrameError::UnknownKind(kind));
    }
    let Some(len) = rest.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]);
    let len_usize = usize::try_from(len).unwrap_or(usize::MAX);
    if len_usize > max_len {
        return Err(FrameError::TooLong {
            len: u64::from(len),
            limit: max_len,
        });
    }
    let too_long = || FrameError::TooLong {
        len: u64::from(len),
        limit: max_len,
    };
    let end = HEADER_LEN.checked_add(len_usize).ok_or_else(too_long)?;
    let Some(payload) = buf.get(HEADER_LEN..end) else {
        return Ok(None);
    };
    let frame = match (kind, direction) {
        (KIND_HTTP, Direction::ToPlugin) => Frame::Request(
            serde_json::from_slice(payload).map_err(|e| FrameError::BadJson(e.to_string()))?,
        ),
        (KIND_HTTP, Direction::ToHost) => Frame::Response(
            serde_json::from_slice(payload).map_err(|e| FrameError::BadJson(e.to_string()))?,
        ),
        (KIND_TEXT, _) => Frame::Text(
            std::str::from_utf8(payload)
                .map_err(|_| FrameError::NotUtf8)?
                .to_string(),
        ),
        (KIND_BINARY, _) => Frame::Binary(payload.to_vec()),
        _ => match payload {
            [] => Frame::Close {
                code: 1000,
                reason: String::new(),
            },
            [_] => return Err(FrameError::BadClose),
            [hi, lo, reason @ ..] => Frame::Close {
                code: u16::from_be_bytes([*hi, *lo]),
                reason: std::str::from_utf8(reason)
                    .map_err(|_| FrameError::NotUtf8)?
                    .to_string(),
            },
        },
    };
    Ok(Some((frame, end)))
}

impl Frame {
    /// The frame's bytes, header included.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }

    /// Appends the frame's bytes to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        match self {
            // Serializing these plain structs cannot fail; an empty object is the fallback
            // the type system asks for.
            Frame::Request(r) => {
                encode_payload(out, KIND_HTTP, &serde_json::to_vec(r).unwrap_or_default())
            }
            Frame::Response(r) => {
                encode_payload(out, KIND_HTTP, &serde_json::to_vec(r).unwrap_or_default())
            }
            Frame::Text(t) => encode_payload(out, KIND_TEXT, t.as_bytes()),
            Frame::Binary(b) => encode_payload(out, KIND_BINARY, b),
            Frame::Close { code, reason } => {
                let mut payload = Vec::with_capacity(2 + reason.len());
                payload.extend_from_slice(&code.to_be_bytes());
                payload.extend_from_slice(reason.as_bytes());
                encode_payload(out, KIND_CLOSE, &payload);
            }
        }
    }
}

/// Appends a frame of `kind` around `payload` (a payload is never near 4 GiB: the host's
/// limits are megabytes).
pub fn encode_payload(out: &mut Vec<u8>, kind: u8, payload: &[u8]) {
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    out.reserve(HEADER_LEN + payload.len());
    out.push(kind);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(payload);
}

/// An incremental decoder: push chunks as they come, take whole frames out.
///
/// ```
/// use magnetar_sdk::web::{Decoder, Direction, Frame};
///
/// let bytes = Frame::Binary(vec![1, 2, 3]).encode();
/// let mut d = Decoder::new(Direction::ToPlugin, 1024);
/// d.push(&bytes[..4]);
/// assert_eq!(d.next_frame(), Ok(None));
/// d.push(&bytes[4..]);
/// assert_eq!(d.next_frame(), Ok(Some(Frame::Binary(vec![1, 2, 3]))));
/// assert_eq!(d.buffered(), 0);
/// ```
#[derive(Debug, Clone)]
pub struct Decoder {
    direction: Direction,
    max_len: usize,
    buf: Vec<u8>,
    /// Bytes at the front of `buf` already decoded.
    pos: usize,
}

impl Decoder {
    /// A decoder of frames going `direction`, refusing payloads over `max_len` bytes.
    pub fn new(direction: Direction, max_len: usize) -> Decoder {
        Decoder {
            direction,
            max_len,
            buf: Vec::new(),
            pos: 0,
        }
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        // Decoded bytes leave once they are half the buffer: a chunk of many small frames
        // is not shifted once per frame.
        if self.pos > 0 && self.pos * 2 >= self.buf.len() {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole frame, `Ok(None)` until one is buffered. After an error the decoder
    /// is stuck on it: the stream has no trustworthy boundary any more.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        let pending = self.buf.get(self.pos..).unwrap_or_default();
        match decode(self.direction, pending, self.max_len)? {
            Some((frame, used)) => {
                self.pos += used;
                if self.pos == self.buf.len() {
                    self.buf.clear();
                    self.pos = 0;
                }
                Ok(Some(frame))
            }
            None => Ok(None),
        }
    }

    /// Bytes received and not decoded yet.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> Request {
        Request {
            method: "GET".into(),
            path: "/ws/v2/consumer/persistent/t/ns/topic/sub".into(),
            query: "subscriptionType=Shared&token=a.b.c".into(),
            headers: vec![
                ("authorization".into(), "Bearer x".into()),
                ("origin".into(), "http://127.0.0.1:8080".into()),
            ],
            peer: "127.0.0.1:5555".into(),
        }
    }

    fn all_frames() -> Vec<(Direction, Frame)> {
        vec![
            (Direction::ToPlugin, Frame::Request(request())),
            (
                Direction::ToHost,
                Frame::Response(Response::refuse(404, "no such topic")),
            ),
            (
                Direction::ToHost,
                Frame::Response(
                    Response::switching_protocols().with_header("sec-websocket-protocol", "p"),
                ),
            ),
            (Direction::ToPlugin, Frame::Text("héllo".into())),
            (Direction::ToHost, Frame::Text(String::new())),
            (Direction::ToPlugin, Frame::Binary(vec![0, 1, 255])),
            (
                Direction::ToHost,
                Frame::Close {
                    code: 1008,
                    reason: "policy".into(),
                },
            ),
        ]
    }

    #[test]
    fn every_frame_round_trips() {
        for (dir, frame) in all_frames() {
            let bytes = frame.encode();
            assert_eq!(
                decode(dir, &bytes, 1 << 16),
                Ok(Some((frame.clone(), bytes.len())))
            );
        }
    }

    #[test]
    fn the_request_json_is_the_contracts() {
        let bytes = Frame::Request(request()).encode();
        let json: serde_json::Value = serde_json::from_slice(&bytes[HEADER_LEN..]).unwrap();
        assert_eq!(json["method"], "GET");
        assert_eq!(json["query"], "subscriptionType=Shared&token=a.b.c");
        assert_eq!(json["headers"][0][0], "authorization");
        assert_eq!(json["headers"][1][1], "http://127.0.0.1:8080");
        assert_eq!(json["peer"], "127.0.0.1:5555");
        // A response with only a status is enough.
        let mut out = Vec::new();
        encode_payload(&mut out, KIND_HTTP, br#"{"status":101}"#);
        assert_eq!(
            decode(Direction::ToHost, &out, 100),
            Ok(Some((
                Frame::Response(Response::switching_protocols()),
                out.len()
            )))
        );
    }

    #[test]
    fn frames_split_anywhere_decode_alike() {
        let mut stream = Vec::new();
        let frames: Vec<Frame> = all_frames()
            .into_iter()
            .filter(|(d, _)| *d == Direction::ToHost)
            .map(|(_, f)| f)
            .collect();
        for f in &frames {
            f.encode_into(&mut stream);
        }
        for chunk in 1..stream.len() {
            let mut d = Decoder::new(Direction::ToHost, 1 << 16);
            let mut got = Vec::new();
            for piece in stream.chunks(chunk) {
                d.push(piece);
                while let Some(f) = d.next_frame().unwrap() {
                    got.push(f);
                }
            }
            assert_eq!(got, frames, "chunks of {chunk}");
            assert_eq!(d.buffered(), 0);
        }
    }

    #[test]
    fn absurd_lengths_are_refused_from_the_header() {
        let header = [KIND_BINARY, 0xff, 0xff, 0xff, 0xff];
        assert_eq!(
            decode(Direction::ToPlugin, &header, 1024),
            Err(FrameError::TooLong {
                len: u64::from(u32::MAX),
                limit: 1024
            })
        );
        let mut d = Decoder::new(Direction::ToHost, 10);
        d.push(&[KIND_TEXT, 0, 0, 0, 11]);
        assert!(matches!(d.next_frame(), Err(FrameError::TooLong { .. })));
    }

    #[test]
    fn malformed_frames_are_errors_not_panics() {
        assert_eq!(
            decode(Direction::ToPlugin, &[KIND_CLOSE, 0, 0, 0, 0], 10),
            Err(FrameError::UnknownKind(KIND_CLOSE)),
            "only the plugin closes"
        );
        assert_eq!(
            decode(Direction::ToHost, &[0x09], 10),
            Err(FrameError::UnknownKind(9))
        );
        assert_eq!(
            decode(Direction::ToHost, &[KIND_TEXT, 0, 0, 0, 1, 0xff], 10),
            Err(FrameError::NotUtf8)
        );
        assert_eq!(
            decode(Direction::ToHost, &[KIND_CLOSE, 0, 0, 0, 1, 3], 10),
            Err(FrameError::BadClose)
        );
        assert!(matches!(
            decode(Direction::ToHost, &[KIND_HTTP, 0, 0, 0, 2, b'{', b'}'], 10),
            Err(FrameError::BadJson(_))
        ));
        assert_eq!(
            decode(Direction::ToHost, &[KIND_CLOSE, 0, 0, 0, 0], 10),
            Ok(Some((
                Frame::Close {
                    code: 1000,
                    reason: String::new()
                },
                5
            )))
        );
        // Any bytes: an error or a frame or "wait", never a panic.
        let mut seed = 0x2545_f491_u32;
        for _ in 0..20_000 {
            let len = (seed % 12) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 17;
                    seed ^= seed << 5;
                    (seed % 7) as u8
                })
                .collect();
            let _ = decode(Direction::ToHost, &bytes, 8);
            let _ = decode(Direction::ToPlugin, &bytes, 8);
        }
    }

    #[test]
    fn request_headers_and_query() {
        let r = request();
        assert_eq!(r.header("Authorization"), Some("Bearer x"));
        assert_eq!(r.header("x-missing"), None);
        assert_eq!(r.query_param("subscriptionType").as_deref(), Some("Shared"));
        let broken = Request {
            query: "a=%zz&b=%e2%82%ac&c".into(),
            ..request()
        };
        assert_eq!(broken.query_param("a"), None);
        assert_eq!(broken.query_param("b").as_deref(), Some("€"));
        assert_eq!(broken.query_param("c").as_deref(), Some(""));
    }
}
