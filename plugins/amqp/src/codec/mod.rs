//! The AMQP 0-9-1 wire format, hand-written (see docs/amqp.md for why): primitive types
//! ([`wire`]), field tables in RabbitMQ's dialect ([`table`]), methods ([`method`]), the
//! content header and basic properties ([`properties`]), and frames ([`frame`]).
//!
//! Decoding never panics and never allocates beyond the bytes received; every error says
//! which reply code RabbitMQ closes the connection with ([`CodecError::reply_code`]).

pub mod frame;
pub mod method;
pub mod properties;
pub mod table;
pub mod wire;

pub use frame::{Frame, PROTOCOL_HEADER};
pub use method::Method;
pub use properties::{BasicProperties, ContentHeader};
pub use table::{FieldTable, FieldValue};

/// AMQP reply codes (§1.2, the constants of the specification) the plugin sends.
pub mod reply {
    pub const REPLY_SUCCESS: u16 = 200;
    pub const CONTENT_TOO_LARGE: u16 = 311;
    pub const NO_ROUTE: u16 = 312;
    pub const NO_CONSUMERS: u16 = 313;
    pub const CONNECTION_FORCED: u16 = 320;
    pub const INVALID_PATH: u16 = 402;
    pub const ACCESS_REFUSED: u16 = 403;
    pub const NOT_FOUND: u16 = 404;
    pub const RESOURCE_LOCKED: u16 = 405;
    pub const PRECONDITION_FAILED: u16 = 406;
    pub const FRAME_ERROR: u16 = 501;
    pub const SYNTAX_ERROR: u16 = 502;
    pub const COMMAND_INVALID: u16 = 503;
    pub const CHANNEL_ERROR: u16 = 504;
    pub const UNEXPECTED_FRAME: u16 = 505;
    pub const RESOURCE_ERROR: u16 = 506;
    pub const NOT_ALLOWED: u16 = 530;
    pub const NOT_IMPLEMENTED: u16 = 540;
    pub const INTERNAL_ERROR: u16 = 541;
}

/// Why bytes from a client are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("a field runs past the end of its frame")]
    Truncated,
    #[error("a short string is not UTF-8")]
    NotUtf8,
    #[error("unknown field table value type {0:#04x}")]
    FieldType(u8),
    #[error("field tables nested deeper than {}", table::MAX_DEPTH)]
    TooDeep,
    #[error("unknown method {0}/{1}")]
    UnknownMethod(u16, u16),
    #[error("unknown frame type {0}")]
    FrameType(u8),
    #[error("frame of {size} bytes exceeds the frame-max {max}")]
    FrameTooLarge { size: u64, max: u32 },
    #[error("frame end {0:#04x} is not 0xce")]
    FrameEnd(u8),
    #[error("heartbeat frame on channel {0}")]
    HeartbeatChannel(u16),
}

impl CodecError {
    /// The reply code of the `connection.close` RabbitMQ answers this error with: a frame it
    /// cannot decode is 501 FRAME_ERROR (including method arguments that do not parse), an
    /// unknown method 540 NOT_IMPLEMENTED.
    pub fn reply_code(&self) -> u16 {
        match self {
            CodecError::UnknownMethod(..) => reply::NOT_IMPLEMENTED,
            _ => reply::FRAME_ERROR,
        }
    }
}
