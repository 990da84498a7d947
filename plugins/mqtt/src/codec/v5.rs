//! MQTT 5.0 wire format ([OASIS MQTT 5.0] §2, §3): the Control Packets a client sends,
//! decoded from one complete frame, and the ones a server sends, encoded.
//!
//! Why this is written here rather than taken from `mqtt-codec-kit`'s `v5` module (checked
//! against 1.0.5): its PUBLISH refuses an empty Topic Name, which a client sends with a Topic
//! Alias (§3.3.2.3.4), and cannot be given one either (only `unsafe new_unchecked`, which our
//! `#![forbid(unsafe_code)]` rules out); it holds a single Subscription Identifier where the
//! server must send one per matching subscription (§3.3.4); its `dup()` reads bit 7 instead of
//! bit 3; and its property decoders neither refuse a duplicate property nor check which
//! properties a packet may carry (both Protocol Errors, §2.2.2.2). The crate stays a test
//! oracle: the unit tests decode what the crate's v5 encoder writes and the reverse.
//!
//! Every read is bounded by the frame (a [`Reader`] over the body), lengths are checked
//! before anything is allocated, and nothing here panics on input. A violation of the
//! packet's format is [`DecodeError::Malformed`] (reason code 0x81), a violation of a rule
//! on values (a property twice, a property the packet may not carry, a zero Subscription
//! Identifier) is [`DecodeError::Protocol`] (0x82).
//!
//! [OASIS MQTT 5.0]: https://docs.oasis-open.org/mqtt/mqtt/v5.0/os/mqtt-v5.0-os.html

use super::{
    malformed, nonzero_id, protocol, Connect, DecodeError, Inbound, Publish, PublishFlags,
    SubscribeEntry, SubscriptionOptions, Will,
};

/// Protocol Level of MQTT 5.0 (§3.1.2.2).
pub const PROTOCOL_LEVEL_5: u8 = 5;

/// Property identifiers (§2.2.2.2).
pub mod id {
    pub const PAYLOAD_FORMAT_INDICATOR: u8 = 0x01;
    pub const MESSAGE_EXPIRY_INTERVAL: u8 = 0x02;
    pub const CONTENT_TYPE: u8 = 0x03;
    pub const RESPONSE_TOPIC: u8 = 0x08;
    pub const CORRELATION_DATA: u8 = 0x09;
    pub const SUBSCRIPTION_IDENTIFIER: u8 = 0x0b;
    pub const SESSION_EXPIRY_INTERVAL: u8 = 0x11;
    pub const ASSIGNED_CLIENT_IDENTIFIER: u8 = 0x12;
    pub const SERVER_KEEP_ALIVE: u8 = 0x13;
    pub const AUTHENTICATION_METHOD: u8 = 0x15;
    pub const AUTHENTICATION_DATA: u8 = 0x16;
    pub const REQUEST_PROBLEM_INFORMATION: u8 = 0x17;
    pub const WILL_DELAY_INTERVAL: u8 = 0x18;
    pub const REQUEST_RESPONSE_INFORMATION: u8 = 0x19;
    pub const RESPONSE_INFORMATION: u8 = 0x1a;
    pub const SERVER_REFERENCE: u8 = 0x1c;
    pub const REASON_STRING: u8 = 0x1f;
    pub const RECEIVE_MAXIMUM: u8 = 0x21;
    pub const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
    pub const TOPIC_ALIAS: u8 = 0x23;
    pub const MAXIMUM_QOS: u8 = 0x24;
    pub const RETAIN_AVAILABLE: u8 = 0x25;
    pub const USER_PROPERTY: u8 = 0x26;
    pub const MAXIMUM_PACKET_SIZE: u8 = 0x27;
    pub const WILDCARD_SUBSCRIPTION_AVAILABLE: u8 = 0x28;
    pub const SUBSCRIPTION_IDENTIFIER_AVAILABLE: u8 = 0x29;
    pub const SHARED_SUBSCRIPTION_AVAILABLE: u8 = 0x2a;
}

/// Reason Codes (§2.4) the server sends or reads.
pub mod reason {
    pub const SUCCESS: u8 = 0x00;
    pub const GRANTED_QOS_1: u8 = 0x01;
    pub const DISCONNECT_WITH_WILL: u8 = 0x04;
    pub const NO_SUBSCRIPTION_EXISTED: u8 = 0x11;
    pub const CONTINUE_AUTHENTICATION: u8 = 0x18;
    pub const RE_AUTHENTICATE: u8 = 0x19;
    pub const UNSPECIFIED_ERROR: u8 = 0x80;
    pub const MALFORMED_PACKET: u8 = 0x81;
    pub const PROTOCOL_ERROR: u8 = 0x82;
    pub const IMPLEMENTATION_SPECIFIC_ERROR: u8 = 0x83;
    pub const UNSUPPORTED_PROTOCOL_VERSION: u8 = 0x84;
    pub const CLIENT_IDENTIFIER_NOT_VALID: u8 = 0x85;
    pub const NOT_AUTHORIZED: u8 = 0x87;
    pub const SERVER_UNAVAILABLE: u8 = 0x88;
    pub const SERVER_BUSY: u8 = 0x89;
    pub const BAD_AUTHENTICATION_METHOD: u8 = 0x8c;
    pub const KEEP_ALIVE_TIMEOUT: u8 = 0x8d;
    pub const SESSION_TAKEN_OVER: u8 = 0x8e;
    pub const TOPIC_FILTER_INVALID: u8 = 0x8f;
    pub const TOPIC_NAME_INVALID: u8 = 0x90;
    pub const RECEIVE_MAXIMUM_EXCEEDED: u8 = 0x93;
    pub const TOPIC_ALIAS_INVALID: u8 = 0x94;
    pub const PACKET_TOO_LARGE: u8 = 0x95;
    pub const QUOTA_EXCEEDED: u8 = 0x97;
    pub const PAYLOAD_FORMAT_INVALID: u8 = 0x99;
    pub const SHARED_SUBSCRIPTIONS_NOT_SUPPORTED: u8 = 0x9e;
}

/// The Properties of a packet (§2.2.2), decoded or to encode. One struct for every packet:
/// which of them a packet may carry is checked on decode ([`allowed`]) and is the encoder's
/// business on the way out. `None` / empty means absent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Properties {
    pub payload_format_indicator: Option<u8>,
    pub message_expiry_interval: Option<u32>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Vec<u8>>,
    /// Several only in a PUBLISH from the server (§3.3.2.3.8).
    pub subscription_identifiers: Vec<u32>,
    pub session_expiry_interval: Option<u32>,
    pub assigned_client_identifier: Option<String>,
    pub server_keep_alive: Option<u16>,
    pub authentication_method: Option<String>,
    pub authentication_data: Option<Vec<u8>>,
    pub request_problem_information: Option<u8>,
    pub will_delay_interval: Option<u32>,
    pub request_response_information: Option<u8>,
    pub response_information: Option<String>,
    pub server_reference: Option<String>,
    pub reason_string: Option<String>,
    pub receive_maximum: Option<u16>,
    pub topic_alias_maximum: Option<u16>,
    pub topic_alias: Option<u16>,
    pub maximum_qos: Option<u8>,
    pub retain_available: Option<u8>,
    pub user_properties: Vec<(String, String)>,
    pub maximum_packet_size: Option<u32>,
    pub wildcard_subscription_available: Option<u8>,
    pub subscription_identifier_available: Option<u8>,
    pub shared_subscription_available: Option<u8>,
}

/// The properties each client packet may carry (§3.x.2.2 of each packet).
pub mod allowed {
    use super::id::*;
    pub const CONNECT: &[u8] = &[
        SESSION_EXPIRY_INTERVAL,
        RECEIVE_MAXIMUM,
        MAXIMUM_PACKET_SIZE,
        TOPIC_ALIAS_MAXIMUM,
        REQUEST_RESPONSE_INFORMATION,
        REQUEST_PROBLEM_INFORMATION,
        USER_PROPERTY,
        AUTHENTICATION_METHOD,
        AUTHENTICATION_DATA,
    ];
    pub const WILL: &[u8] = &[
        WILL_DELAY_INTERVAL,
        PAYLOAD_FORMAT_INDICATOR,
        MESSAGE_EXPIRY_INTERVAL,
        CONTENT_TYPE,
        RESPONSE_TOPIC,
        CORRELATION_DATA,
        USER_PROPERTY,
    ];
    /// A client may not send a Subscription Identifier in a PUBLISH (§3.3.4).
    pub const PUBLISH: &[u8] = &[
        PAYLOAD_FORMAT_INDICATOR,
        MESSAGE_EXPIRY_INTERVAL,
        TOPIC_ALIAS,
        RESPONSE_TOPIC,
        CORRELATION_DATA,
        USER_PROPERTY,
        CONTENT_TYPE,
    ];
    pub const ACK: &[u8] = &[REASON_STRING, USER_PROPERTY];
    pub const SUBSCRIBE: &[u8] = &[SUBSCRIPTION_IDENTIFIER, USER_PROPERTY];
    pub const UNSUBSCRIBE: &[u8] = &[USER_PROPERTY];
    pub const DISCONNECT: &[u8] = &[
        SESSION_EXPIRY_INTERVAL,
        REASON_STRING,
        USER_PROPERTY,
        SERVER_REFERENCE,
    ];
    pub const AUTH: &[u8] = &[
        AUTHENTICATION_METHOD,
        AUTHENTICATION_DATA,
        REASON_STRING,
        USER_PROPERTY,
    ];
}

/// A bounded reader over one packet body: every read checks the remaining length first.
struct Reader<'a> {
    buf: &'a [u8],
    packet: &'static str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.buf.len() {
            return Err(malformed(
                self.packet,
                "a field runs past the end of the packet",
            ));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        match self.take(1)? {
            [b] => Ok(*b),
            _ => Err(malformed(self.packet, "truncated byte")),
        }
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        match self.take(2)? {
            [a, b] => Ok(u16::from_be_bytes([*a, *b])),
            _ => Err(malformed(self.packet, "truncated Two Byte Integer")),
        }
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        match self.take(4)? {
            [a, b, c, d] => Ok(u32::from_be_bytes([*a, *b, *c, *d])),
            _ => Err(malformed(self.packet, "truncated Four Byte Integer")),
        }
    }

    /// Variable Byte Integer (§1.5.5): at most four bytes.
    fn varint(&mut self) -> Result<u32, DecodeError> {
        let mut value: u32 = 0;
        for i in 0..4 {
            let b = self.u8()?;
            value |= u32::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(malformed(
            self.packet,
            "Variable Byte Integer longer than 4 bytes",
        ))
    }

    /// Binary Data (§1.5.6).
    fn binary(&mut self) -> Result<Vec<u8>, DecodeError> {
        let n = usize::from(self.u16()?);
        Ok(self.take(n)?.to_vec())
    }

    /// UTF-8 Encoded String (§1.5.4): valid UTF-8 without U+0000.
    fn string(&mut self) -> Result<String, DecodeError> {
        let n = usize::from(self.u16()?);
        let raw = self.take(n)?;
        let s = std::str::from_utf8(raw)
            .map_err(|_| malformed(self.packet, "a string is not valid UTF-8 (§1.5.4)"))?;
        if s.contains('\0') {
            return Err(malformed(self.packet, "a string contains U+0000 (§1.5.4)"));
        }
        Ok(s.to_owned())
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    /// The Property Length and the properties that follow (§2.2.2), checked against the
    /// identifiers `allowed` for this packet.
    fn properties(&mut self, allowed: &[u8]) -> Result<Properties, DecodeError> {
        let packet = self.packet;
        let len = self.varint()? as usize;
        let mut r = Reader {
            buf: self.take(len)?,
            packet,
        };
        let mut p = Properties::default();
        while !r.is_empty() {
            let raw = r.varint()?;
            let Some(pid) = u8::try_from(raw).ok().filter(|i| allowed.contains(i)) else {
                return Err(protocol(
                    packet,
                    format!("property {raw:#04x} is not allowed here (§2.2.2.2)"),
                ));
            };
            let flag = |r: &mut Reader| -> Result<u8, DecodeError> {
                match r.u8()? {
                    b @ (0 | 1) => Ok(b),
                    b => Err(protocol(packet, format!("property {pid:#04x} value {b}"))),
                }
            };
            match pid {
                id::PAYLOAD_FORMAT_INDICATOR => {
                    let v = flag(&mut r)?;
                    once(&mut p.payload_format_indicator, v, packet, pid)?
                }
                id::MESSAGE_EXPIRY_INTERVAL => {
                    let v = r.u32()?;
                    once(&mut p.message_expiry_interval, v, packet, pid)?
                }
                id::CONTENT_TYPE => {
                    let v = r.string()?;
                    once(&mut p.content_type, v, packet, pid)?
                }
                id::RESPONSE_TOPIC => {
                    let v = r.string()?;
                    once(&mut p.response_topic, v, packet, pid)?
                }
                id::CORRELATION_DATA => {
                    let v = r.binary()?;
                    once(&mut p.correlation_data, v, packet, pid)?
                }
                id::SUBSCRIPTION_IDENTIFIER => {
                    let v = r.varint()?;
                    if v == 0 {
                        return Err(protocol(packet, "Subscription Identifier 0 (§3.8.2.1.2)"));
                    }
                    if !p.subscription_identifiers.is_empty() {
                        return Err(protocol(packet, "Subscription Identifier twice"));
                    }
                    p.subscription_identifiers.push(v);
                }
                id::SESSION_EXPIRY_INTERVAL => {
                    let v = r.u32()?;
                    once(&mut p.session_expiry_interval, v, packet, pid)?
                }
                id::AUTHENTICATION_METHOD => {
                    let v = r.string()?;
                    once(&mut p.authentication_method, v, packet, pid)?
                }
                id::AUTHENTICATION_DATA => {
                    let v = r.binary()?;
                    once(&mut p.authentication_data, v, packet, pid)?
                }
                id::REQUEST_PROBLEM_INFORMATION => {
                    let v = flag(&mut r)?;
                    once(&mut p.request_problem_information, v, packet, pid)?
                }
                id::WILL_DELAY_INTERVAL => {
                    let v = r.u32()?;
                    once(&mut p.will_delay_interval, v, packet, pid)?
                }
                id::REQUEST_RESPONSE_INFORMATION => {
                    let v = flag(&mut r)?;
                    once(&mut p.request_response_information, v, packet, pid)?
                }
                id::SERVER_REFERENCE => {
                    let v = r.string()?;
                    once(&mut p.server_reference, v, packet, pid)?
                }
                id::REASON_STRING => {
                    let v = r.string()?;
                    once(&mut p.reason_string, v, packet, pid)?
                }
                id::RECEIVE_MAXIMUM => {
                    let v = r.u16()?;
                    if v == 0 {
                        return Err(protocol(packet, "Receive Maximum 0 (§3.1.2.11.3)"));
                    }
                    once(&mut p.receive_maximum, v, packet, pid)?
                }
                id::TOPIC_ALIAS_MAXIMUM => {
                    let v = r.u16()?;
                    once(&mut p.topic_alias_maximum, v, packet, pid)?
                }
                id::TOPIC_ALIAS => {
                    let v = r.u16()?;
                    once(&mut p.topic_alias, v, packet, pid)?
                }
                id::USER_PROPERTY => {
                    let k = r.string()?;
                    let v = r.string()?;
                    p.user_properties.push((k, v));
                }
                id::MAXIMUM_PACKET_SIZE => {
                    let v = r.u32()?;
                    if v == 0 {
                        return Err(protocol(packet, "Maximum Packet Size 0 (§3.1.2.11.4)"));
                    }
                    once(&mut p.maximum_packet_size, v, packet, pid)?
                }
                // Server-only properties: read only where a caller allows them (tests,
                // stored forms), never from a client packet.
                id::ASSIGNED_CLIENT_IDENTIFIER => {
                    let v = r.string()?;
                    once(&mut p.assigned_client_identifier, v, packet, pid)?
                }
                id::SERVER_KEEP_ALIVE => {
                    let v = r.u16()?;
                    once(&mut p.server_keep_alive, v, packet, pid)?
                }
                id::RESPONSE_INFORMATION => {
                    let v = r.string()?;
                    once(&mut p.response_information, v, packet, pid)?
                }
                id::MAXIMUM_QOS => {
                    let v = flag(&mut r)?;
                    once(&mut p.maximum_qos, v, packet, pid)?
                }
                id::RETAIN_AVAILABLE => {
                    let v = flag(&mut r)?;
                    once(&mut p.retain_available, v, packet, pid)?
                }
                id::WILDCARD_SUBSCRIPTION_AVAILABLE => {
                    let v = flag(&mut r)?;
                    once(&mut p.wildcard_subscription_available, v, packet, pid)?
                }
                id::SUBSCRIPTION_IDENTIFIER_AVAILABLE => {
                    let v = flag(&mut r)?;
                    once(&mut p.subscription_identifier_available, v, packet, pid)?
                }
                id::SHARED_SUBSCRIPTION_AVAILABLE => {
                    let v = flag(&mut r)?;
                    once(&mut p.shared_subscription_available, v, packet, pid)?
                }
                _ => {
                    return Err(protocol(
                        packet,
                        format!("property {pid:#04x} is not allowed here"),
                    ))
                }
            }
        }
        Ok(p)
    }
}

fn once<T>(
    slot: &mut Option<T>,
    value: T,
    packet: &'static str,
    pid: u8,
) -> Result<(), DecodeError> {
    if slot.is_some() {
        return Err(protocol(
            packet,
            format!("property {pid:#04x} included twice (§2.2.2.2)"),
        ));
    }
    *slot = Some(value);
    Ok(())
}

/// Decodes the body of one MQTT 5.0 Control Packet from a client. `first` is the fixed
/// header's first byte; CONNECT is decoded by [`connect`].
pub fn decode(first: u8, body: &[u8]) -> Result<Inbound, DecodeError> {
    let flags = first & 0x0f;
    let kind = first >> 4;
    let name = name(kind);
    let expect_flags = |want: u8| {
        if flags == want {
            Ok(())
        } else {
            Err(malformed(
                name,
                format!("fixed header flags {flags:#06b} (§2.1.3)"),
            ))
        }
    };
    let mut r = Reader {
        buf: body,
        packet: name,
    };
    let packet = match kind {
        1 => {
            expect_flags(0)?;
            return connect(body).map(|c| Inbound::Connect(Box::new(c)));
        }
        2 => Inbound::ServerOnly("CONNACK"),
        3 => Inbound::Publish(decode_publish(flags, &mut r, true)?),
        4..=7 => {
            expect_flags(if kind == 6 { 0b0010 } else { 0 })?;
            let packet_id = nonzero_id(name, r.u16()?)?;
            let reason = if r.is_empty() {
                reason::SUCCESS
            } else {
                r.u8()?
            };
            if !r.is_empty() {
                r.properties(allowed::ACK)?;
            }
            match kind {
                4 => Inbound::Puback(packet_id),
                5 => Inbound::Pubrec(packet_id, reason),
                6 => Inbound::Pubrel(packet_id),
                _ => Inbound::Pubcomp(packet_id),
            }
        }
        8 => {
            expect_flags(0b0010)?;
            decode_subscribe(&mut r)?
        }
        9 => Inbound::ServerOnly("SUBACK"),
        10 => {
            expect_flags(0b0010)?;
            let packet_id = nonzero_id(name, r.u16()?)?;
            r.properties(allowed::UNSUBSCRIBE)?;
            let mut filters = Vec::new();
            while !r.is_empty() {
                filters.push(r.string()?);
            }
            if filters.is_empty() {
                return Err(protocol(name, "no Topic Filter (§3.10.3)"));
            }
            Inbound::Unsubscribe { packet_id, filters }
        }
        11 => Inbound::ServerOnly("UNSUBACK"),
        12 => {
            expect_flags(0)?;
            Inbound::Pingreq
        }
        13 => Inbound::ServerOnly("PINGRESP"),
        14 => {
            expect_flags(0)?;
            let reason = if r.is_empty() {
                reason::SUCCESS
            } else {
                r.u8()?
            };
            let properties = if r.is_empty() {
                Properties::default()
            } else {
                r.properties(allowed::DISCONNECT)?
            };
            Inbound::Disconnect {
                reason,
                session_expiry: properties.session_expiry_interval,
            }
        }
        15 => {
            expect_flags(0)?;
            let reason = if r.is_empty() {
                reason::SUCCESS
            } else {
                r.u8()?
            };
            let properties = if r.is_empty() {
                Properties::default()
            } else {
                r.properties(allowed::AUTH)?
            };
            Inbound::Auth { reason, properties }
        }
        _ => return Err(DecodeError::ReservedType(kind)),
    };
    if !r.is_empty() {
        return Err(malformed(name, "bytes after the last field"));
    }
    Ok(packet)
}

fn name(kind: u8) -> &'static str {
    match kind {
        1 => "CONNECT",
        3 => "PUBLISH",
        4 => "PUBACK",
        5 => "PUBREC",
        6 => "PUBREL",
        7 => "PUBCOMP",
        8 => "SUBSCRIBE",
        10 => "UNSUBSCRIBE",
        12 => "PINGREQ",
        14 => "DISCONNECT",
        15 => "AUTH",
        _ => "packet",
    }
}

/// CONNECT (§3.1) of protocol level 5.
pub fn connect(body: &[u8]) -> Result<Connect, DecodeError> {
    const P: &str = "CONNECT";
    let mut r = Reader {
        buf: body,
        packet: P,
    };
    if r.string()? != "MQTT" {
        return Err(malformed(P, "Protocol Name is not MQTT"));
    }
    let level = r.u8()?;
    if level != PROTOCOL_LEVEL_5 {
        return Err(DecodeError::UnsupportedProtocolLevel(level));
    }
    let flags = r.u8()?;
    if flags & 0x01 != 0 {
        return Err(malformed(P, "reserved Connect Flag set (§3.1.2.3)"));
    }
    let will_flag = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0x03;
    let will_retain = flags & 0x20 != 0;
    if will_qos == 3 || (!will_flag && (will_qos != 0 || will_retain)) {
        return Err(malformed(P, "Will QoS / Will Retain flags (§3.1.2.6)"));
    }
    let keep_alive = r.u16()?;
    let properties = r.properties(allowed::CONNECT)?;
    if properties.authentication_data.is_some() && properties.authentication_method.is_none() {
        return Err(protocol(
            P,
            "Authentication Data without a Method (§3.1.2.11.10)",
        ));
    }
    let client_id = r.string()?;
    let will = if will_flag {
        let properties = r.properties(allowed::WILL)?;
        let topic = r.string()?;
        let payload = r.binary()?;
        Some(Will {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
            properties,
        })
    } else {
        None
    };
    let username = if flags & 0x80 != 0 {
        Some(r.string()?)
    } else {
        None
    };
    let password = if flags & 0x40 != 0 {
        Some(r.binary()?)
    } else {
        None
    };
    if !r.is_empty() {
        return Err(malformed(P, "bytes after the payload"));
    }
    Ok(Connect {
        protocol: PROTOCOL_LEVEL_5,
        client_id,
        clean_session: flags & 0x02 != 0,
        keep_alive,
        username,
        password,
        will,
        properties,
    })
}

/// PUBLISH from an MQTT 3.1.1 client (§3.3 of 3.1.1): the 5.0 layout without the
/// properties, and a Topic Name that may not be empty (3.1.1 has no Topic Aliases) nor hold
/// a wildcard (§4.7.3; the 5.0 decoder leaves those to the connection, which also checks
/// aliases). Decoded here rather than by `mqtt-codec-kit` because this is the hot path: the
/// crate reads the payload with `read_to_end` into a growing vector and hands out owned
/// copies, three copies of every payload in all.
pub fn decode_publish_3_1_1(flags: u8, body: &[u8]) -> Result<Publish, DecodeError> {
    let mut r = Reader {
        buf: body,
        packet: "PUBLISH",
    };
    let publish = decode_publish(flags, &mut r, false)?;
    crate::topic::validate_name(&publish.topic).map_err(|e| malformed("PUBLISH", e.to_string()))?;
    Ok(publish)
}

fn decode_publish(flags: u8, r: &mut Reader, v5: bool) -> Result<Publish, DecodeError> {
    const P: &str = "PUBLISH";
    let qos = (flags >> 1) & 0x03;
    if qos == 3 {
        return Err(malformed(P, "QoS 3 (§3.3.1.2)"));
    }
    let topic = r.string()?;
    let packet_id = if qos > 0 {
        Some(nonzero_id(P, r.u16()?)?)
    } else {
        None
    };
    let properties = match v5 {
        true => r.properties(allowed::PUBLISH)?,
        false => Properties::default(),
    };
    Ok(Publish {
        topic,
        qos,
        packet_id,
        retain: flags & 0x01 != 0,
        dup: flags & 0x08 != 0,
        payload: r.rest().to_vec(),
        properties,
    })
}

fn decode_subscribe(r: &mut Reader) -> Result<Inbound, DecodeError> {
    const P: &str = "SUBSCRIBE";
    let packet_id = nonzero_id(P, r.u16()?)?;
    let properties = r.properties(allowed::SUBSCRIBE)?;
    let mut entries = Vec::new();
    while !r.is_empty() {
        let filter = r.string()?;
        let options = r.u8()?;
        if options & 0xc0 != 0 {
            return Err(malformed(
                P,
                "reserved Subscription Options bits (§3.8.3.1)",
            ));
        }
        let qos = options & 0x03;
        let retain_handling = (options >> 4) & 0x03;
        if qos == 3 || retain_handling == 3 {
            return Err(malformed(P, format!("Subscription Options {options:#04x}")));
        }
        entries.push(SubscribeEntry {
            filter,
            qos,
            options: SubscriptionOptions {
                no_local: options & 0x04 != 0,
                retain_as_published: options & 0x08 != 0,
                retain_handling,
            },
        });
    }
    if entries.is_empty() {
        return Err(protocol(P, "no Topic Filter (§3.8.3)"));
    }
    Ok(Inbound::Subscribe {
        packet_id,
        entries,
        subscription_id: properties.subscription_identifiers.first().copied(),
    })
}

// ---- encoding ------------------------------------------------------------------------------

fn put_varint(out: &mut Vec<u8>, mut v: u32) {
    loop {
        let mut b = (v % 128) as u8;
        v /= 128;
        if v > 0 {
            b |= 0x80;
        }
        out.push(b);
        if v == 0 {
            break;
        }
    }
}

/// Writes a string or binary field; callers keep them under 65,536 bytes (topics and
/// properties come from packets that had the same limit, reason strings are ours), and a
/// longer one is cut rather than encoded with a wrong length.
fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    let b = b
        .get(..b.len().min(usize::from(u16::MAX)))
        .unwrap_or_default();
    out.extend_from_slice(&(b.len() as u16).to_be_bytes());
    out.extend_from_slice(b);
}

/// Writes the Property Length and the properties (§2.2.2), in identifier order.
pub fn put_properties(out: &mut Vec<u8>, p: &Properties) {
    let mut b = Vec::new();
    let byte = |b: &mut Vec<u8>, pid: u8, v: Option<u8>| {
        if let Some(v) = v {
            b.extend_from_slice(&[pid, v]);
        }
    };
    let two = |b: &mut Vec<u8>, pid: u8, v: Option<u16>| {
        if let Some(v) = v {
            b.push(pid);
            b.extend_from_slice(&v.to_be_bytes());
        }
    };
    let four = |b: &mut Vec<u8>, pid: u8, v: Option<u32>| {
        if let Some(v) = v {
            b.push(pid);
            b.extend_from_slice(&v.to_be_bytes());
        }
    };
    let bytes = |b: &mut Vec<u8>, pid: u8, v: Option<&[u8]>| {
        if let Some(v) = v {
            b.push(pid);
            put_bytes(b, v);
        }
    };
    byte(
        &mut b,
        id::PAYLOAD_FORMAT_INDICATOR,
        p.payload_format_indicator,
    );
    four(
        &mut b,
        id::MESSAGE_EXPIRY_INTERVAL,
        p.message_expiry_interval,
    );
    bytes(
        &mut b,
        id::CONTENT_TYPE,
        p.content_type.as_deref().map(str::as_bytes),
    );
    bytes(
        &mut b,
        id::RESPONSE_TOPIC,
        p.response_topic.as_deref().map(str::as_bytes),
    );
    bytes(&mut b, id::CORRELATION_DATA, p.correlation_data.as_deref());
    for sid in &p.subscription_identifiers {
        b.push(id::SUBSCRIPTION_IDENTIFIER);
        put_varint(&mut b, *sid);
    }
    four(
        &mut b,
        id::SESSION_EXPIRY_INTERVAL,
        p.session_expiry_interval,
    );
    let assigned = p.assigned_client_identifier.as_deref().map(str::as_bytes);
    bytes(&mut b, id::ASSIGNED_CLIENT_IDENTIFIER, assigned);
    two(&mut b, id::SERVER_KEEP_ALIVE, p.server_keep_alive);
    let method = p.authentication_method.as_deref().map(str::as_bytes);
    bytes(&mut b, id::AUTHENTICATION_METHOD, method);
    bytes(
        &mut b,
        id::AUTHENTICATION_DATA,
        p.authentication_data.as_deref(),
    );
    byte(
        &mut b,
        id::REQUEST_PROBLEM_INFORMATION,
        p.request_problem_information,
    );
    four(&mut b, id::WILL_DELAY_INTERVAL, p.will_delay_interval);
    byte(
        &mut b,
        id::REQUEST_RESPONSE_INFORMATION,
        p.request_response_information,
    );
    let info = p.response_information.as_deref().map(str::as_bytes);
    bytes(&mut b, id::RESPONSE_INFORMATION, info);
    let reference = p.server_reference.as_deref().map(str::as_bytes);
    bytes(&mut b, id::SERVER_REFERENCE, reference);
    bytes(
        &mut b,
        id::REASON_STRING,
        p.reason_string.as_deref().map(str::as_bytes),
    );
    two(&mut b, id::RECEIVE_MAXIMUM, p.receive_maximum);
    two(&mut b, id::TOPIC_ALIAS_MAXIMUM, p.topic_alias_maximum);
    two(&mut b, id::TOPIC_ALIAS, p.topic_alias);
    byte(&mut b, id::MAXIMUM_QOS, p.maximum_qos);
    byte(&mut b, id::RETAIN_AVAILABLE, p.retain_available);
    for (k, v) in &p.user_properties {
        b.push(id::USER_PROPERTY);
        put_bytes(&mut b, k.as_bytes());
        put_bytes(&mut b, v.as_bytes());
    }
    four(&mut b, id::MAXIMUM_PACKET_SIZE, p.maximum_packet_size);
    let wildcard = p.wildcard_subscription_available;
    byte(&mut b, id::WILDCARD_SUBSCRIPTION_AVAILABLE, wildcard);
    let sid = p.subscription_identifier_available;
    byte(&mut b, id::SUBSCRIPTION_IDENTIFIER_AVAILABLE, sid);
    let shared = p.shared_subscription_available;
    byte(&mut b, id::SHARED_SUBSCRIPTION_AVAILABLE, shared);
    put_varint(out, b.len() as u32);
    out.extend_from_slice(&b);
}

/// A packet: the first byte, the Remaining Length and the body.
fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(first);
    put_varint(&mut out, body.len() as u32);
    out.extend_from_slice(body);
    out
}

/// CONNACK (§3.2).
pub fn connack(session_present: bool, reason_code: u8, p: &Properties) -> Vec<u8> {
    let mut body = vec![u8::from(session_present), reason_code];
    put_properties(&mut body, p);
    frame(0x20, &body)
}

/// PUBACK, PUBREC, PUBREL or PUBCOMP (§3.4–§3.7) by its first byte (`0x40`, `0x50`, `0x62`,
/// `0x70`); the Reason Code and properties are left out when they are 0 and empty (§3.4.2.1).
pub fn ack(first: u8, packet_id: u16, reason_code: u8, p: &Properties) -> Vec<u8> {
    let mut body = packet_id.to_be_bytes().to_vec();
    if reason_code != reason::SUCCESS || *p != Properties::default() {
        body.push(reason_code);
        if *p != Properties::default() {
            put_properties(&mut body, p);
        }
    }
    frame(first, &body)
}

/// SUBACK (§3.9) or UNSUBACK (§3.11): one Reason Code per Topic Filter.
pub fn suback(first: u8, packet_id: u16, codes: &[u8], p: &Properties) -> Vec<u8> {
    let mut body = packet_id.to_be_bytes().to_vec();
    put_properties(&mut body, p);
    body.extend_from_slice(codes);
    frame(first, &body)
}

/// DISCONNECT from the server (§3.14).
pub fn disconnect(reason_code: u8, p: &Properties) -> Vec<u8> {
    let mut body = vec![reason_code];
    put_properties(&mut body, p);
    frame(0xe0, &body)
}

/// AUTH (§3.15).
pub fn auth(reason_code: u8, p: &Properties) -> Vec<u8> {
    let mut body = vec![reason_code];
    put_properties(&mut body, p);
    frame(0xf0, &body)
}

/// PUBLISH to a client (§3.3). `topic` is empty when a Topic Alias stands for it.
pub fn publish(topic: &str, flags: PublishFlags, p: &Properties, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    publish_into(&mut out, topic, flags, Some(p), payload);
    out
}

/// Appends a PUBLISH to `out`: with properties (`Some`, MQTT 5.0) or without (3.1.1, whose
/// PUBLISH is the 5.0 layout without them). The payload is copied once, straight to its
/// place: deliveries are the hot path.
pub fn publish_into(
    out: &mut Vec<u8>,
    topic: &str,
    flags: PublishFlags,
    p: Option<&Properties>,
    payload: &[u8],
) {
    let mut props = Vec::new();
    if let Some(p) = p {
        put_properties(&mut props, p);
    }
    let topic = topic
        .as_bytes()
        .get(..topic.len().min(usize::from(u16::MAX)))
        .unwrap_or_default();
    let id_len = if flags.qos > 0 { 2 } else { 0 };
    let body_len = 2 + topic.len() + id_len + props.len() + payload.len();
    out.reserve(body_len + 5);
    out.push(
        0x30 | (u8::from(flags.dup && flags.qos > 0) << 3)
            | (flags.qos.min(2) << 1)
            | u8::from(flags.retain),
    );
    // A body over the Remaining Length's 268,435,455 bytes is refused by the caller's
    // Maximum Packet Size check (the gateway's limit is far lower).
    put_varint(out, u32::try_from(body_len).unwrap_or(u32::MAX));
    put_bytes(out, topic);
    if flags.qos > 0 {
        out.extend_from_slice(&flags.packet_id.to_be_bytes());
    }
    out.extend_from_slice(&props);
    out.extend_from_slice(payload);
}

/// Reads a Property Length and the properties at the start of `bytes` (a stored form, not a
/// packet): the properties and the bytes after them.
pub fn split_properties<'a>(
    bytes: &'a [u8],
    allowed: &[u8],
) -> Result<(Properties, &'a [u8]), DecodeError> {
    let mut r = Reader {
        buf: bytes,
        packet: "stored properties",
    };
    let p = r.properties(allowed)?;
    Ok((p, r.rest()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::decode as decode_frame;
    use mqtt_codec_kit::common::qos::QoSWithPacketIdentifier;
    use mqtt_codec_kit::common::{Decodable, Encodable, TopicName};
    use mqtt_codec_kit::v5::control::{ConnectReasonCode, PublishProperties};
    use mqtt_codec_kit::v5::packet::{PublishPacket, VariablePacket};
    use proptest::prelude::*;
    use std::io::Cursor;

    const MAX: usize = 1 << 20;

    fn crate_decode(bytes: &[u8]) -> VariablePacket {
        VariablePacket::decode(&mut Cursor::new(bytes)).expect("the crate decodes our packet")
    }

    #[test]
    fn publish_encoded_by_the_crate_decodes_with_its_properties() {
        let mut packet = PublishPacket::new(
            TopicName::new("a/b").unwrap(),
            QoSWithPacketIdentifier::Level1(9),
            b"payload".to_vec(),
        );
        let mut props = PublishProperties::default();
        props.set_payload_format_indicator(Some(1));
        props.set_message_expiry_interval(Some(30));
        props.set_content_type(Some("text/plain".into()));
        props.set_response_topic(Some("re/ply".into()));
        props.set_correlation_data(Some(vec![1, 2]));
        props.add_user_property("k", "v");
        props.set_topic_alias(Some(3));
        packet.set_properties(props);
        packet.set_retain(true);
        let mut bytes = Vec::new();
        packet.encode(&mut bytes).unwrap();
        let (inbound, n) = decode_frame(&bytes, MAX, true).unwrap().unwrap();
        assert_eq!(n, bytes.len());
        let Inbound::Publish(p) = inbound else {
            panic!("{inbound:?}")
        };
        assert_eq!(
            (p.topic.as_str(), p.qos, p.packet_id, p.retain),
            ("a/b", 1, Some(9), true)
        );
        assert_eq!(p.payload, b"payload");
        assert_eq!(p.properties.payload_format_indicator, Some(1));
        assert_eq!(p.properties.message_expiry_interval, Some(30));
        assert_eq!(p.properties.content_type.as_deref(), Some("text/plain"));
        assert_eq!(p.properties.response_topic.as_deref(), Some("re/ply"));
        assert_eq!(p.properties.correlation_data, Some(vec![1, 2]));
        assert_eq!(p.properties.user_properties, vec![("k".into(), "v".into())]);
        assert_eq!(p.properties.topic_alias, Some(3));
    }

    #[test]
    fn server_packets_decode_with_the_crate() {
        let props = Properties {
            assigned_client_identifier: Some("auto-1".into()),
            receive_maximum: Some(64),
            topic_alias_maximum: Some(32),
            maximum_packet_size: Some(1 << 20),
            reason_string: Some("ok".into()),
            ..Properties::default()
        };
        let VariablePacket::ConnackPacket(c) = crate_decode(&connack(true, 0, &props)) else {
            panic!()
        };
        assert_eq!(c.connect_reason_code(), ConnectReasonCode::Success);
        assert_eq!(c.properties().receive_maximum(), Some(64));
        assert_eq!(
            c.properties().assigned_client_identifier().as_deref(),
            Some("auto-1")
        );
        let VariablePacket::ConnackPacket(c) = crate_decode(&connack(
            false,
            reason::QUOTA_EXCEEDED,
            &Properties::default(),
        )) else {
            panic!()
        };
        assert_eq!(c.connect_reason_code(), ConnectReasonCode::QuotaExceeded);
        let bytes = ack(0x40, 7, reason::NOT_AUTHORIZED, &Properties::default());
        assert_eq!(bytes, vec![0x40, 0x03, 0x00, 0x07, 0x87]);
        assert!(matches!(
            crate_decode(&bytes),
            VariablePacket::PubackPacket(_)
        ));
        assert_eq!(
            ack(0x50, 7, 0, &Properties::default()),
            vec![0x50, 0x02, 0x00, 0x07]
        );
        let bytes = suback(0x90, 5, &[0x01, 0x8f], &Properties::default());
        assert_eq!(bytes, vec![0x90, 0x05, 0x00, 0x05, 0x00, 0x01, 0x8f]);
        assert!(matches!(
            crate_decode(&bytes),
            VariablePacket::SubackPacket(_)
        ));
        let bytes = disconnect(reason::SESSION_TAKEN_OVER, &Properties::default());
        assert_eq!(bytes, vec![0xe0, 0x02, 0x8e, 0x00]);
        assert!(matches!(
            crate_decode(&bytes),
            VariablePacket::DisconnectPacket(_)
        ));
    }

    #[test]
    fn publish_round_trips_with_alias_and_several_subscription_identifiers() {
        let props = Properties {
            topic_alias: Some(2),
            subscription_identifiers: vec![1, 268_435_455],
            user_properties: vec![("a".into(), "b".into())],
            ..Properties::default()
        };
        let flags = PublishFlags {
            qos: 2,
            packet_id: 3,
            retain: false,
            dup: true,
        };
        let bytes = publish("", flags, &props, b"x");
        assert_eq!(bytes.first(), Some(&0x3c));
        // Our decoder refuses a client's Subscription Identifier in PUBLISH (§3.3.4).
        let err = decode(0x3c, bytes.get(2..).unwrap());
        assert!(matches!(err, Err(DecodeError::Protocol { .. })), "{err:?}");
        let props = Properties {
            topic_alias: Some(2),
            ..Properties::default()
        };
        let bytes = publish("", flags, &props, b"x");
        let Ok(Inbound::Publish(p)) = decode(0x3c, bytes.get(2..).unwrap()) else {
            panic!()
        };
        assert_eq!(
            (p.topic.as_str(), p.dup, p.properties.topic_alias),
            ("", true, Some(2))
        );
    }

    #[test]
    fn property_rules_are_protocol_errors() {
        // PUBLISH QoS 0 "t" with Content Type twice.
        let mut body = vec![0, 1, b't'];
        let mut props = vec![id::CONTENT_TYPE, 0, 1, b'a', id::CONTENT_TYPE, 0, 1, b'b'];
        body.push(props.len() as u8);
        body.append(&mut props);
        assert!(matches!(
            decode(0x30, &body),
            Err(DecodeError::Protocol { .. })
        ));
        // A Session Expiry Interval is not a PUBLISH property.
        let body = [0, 1, b't', 5, id::SESSION_EXPIRY_INTERVAL, 0, 0, 0, 1];
        assert!(matches!(
            decode(0x30, &body),
            Err(DecodeError::Protocol { .. })
        ));
        // Property Length past the end.
        let body = [0, 1, b't', 9, 1, 1];
        assert!(matches!(
            decode(0x30, &body),
            Err(DecodeError::Malformed { .. })
        ));
        // SUBSCRIBE with Subscription Identifier 0, and with reserved option bits.
        let body = [0, 1, 2, id::SUBSCRIPTION_IDENTIFIER, 0, 0, 1, b'a', 0];
        assert!(matches!(
            decode(0x82, &body),
            Err(DecodeError::Protocol { .. })
        ));
        let body = [0, 1, 0, 0, 1, b'a', 0xc0];
        assert!(matches!(
            decode(0x82, &body),
            Err(DecodeError::Malformed { .. })
        ));
        let body = [
            0,
            1,
            2,
            id::SUBSCRIPTION_IDENTIFIER,
            7,
            0,
            1,
            b'a',
            0b0010_1101,
        ];
        let Ok(Inbound::Subscribe {
            entries,
            subscription_id,
            ..
        }) = decode(0x82, &body)
        else {
            panic!()
        };
        assert_eq!(subscription_id, Some(7));
        let e = entries.first().unwrap();
        assert_eq!(e.qos, 1);
        assert!(e.options.no_local && e.options.retain_as_published);
        assert_eq!(e.options.retain_handling, 2);
    }

    proptest! {
        /// The decoder over any body of any packet type: an error or a packet, never a panic
        /// (a quick check in the unit tests; `plugins/mqtt/fuzz` has the libFuzzer targets).
        #[test]
        fn arbitrary_bodies_never_panic(first in any::<u8>(), body in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode(first, &body);
            let _ = connect(&body);
            let _ = split_properties(&body, allowed::WILL);
        }

        /// Every property a server sends survives encode → decode.
        #[test]
        fn properties_round_trip(
            pfi in proptest::option::of(0u8..=1),
            expiry in proptest::option::of(any::<u32>()),
            ct in proptest::option::of("[a-z/]{0,20}"),
            corr in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
            users in proptest::collection::vec(("[a-z]{0,8}", "[ -~]{0,8}"), 0..4),
        ) {
            let p = Properties {
                payload_format_indicator: pfi,
                message_expiry_interval: expiry,
                content_type: ct,
                correlation_data: corr,
                user_properties: users,
                ..Properties::default()
            };
            let mut bytes = Vec::new();
            put_properties(&mut bytes, &p);
            let (back, rest) = split_properties(&bytes, allowed::WILL).unwrap();
            prop_assert_eq!(back, p);
            prop_assert!(rest.is_empty());
        }
    }
}
