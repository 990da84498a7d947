//! MQTT wire format: framing (§2.2 Fixed header), decoding of the Control Packets a client
//! sends and encoding of the ones a server sends. This module holds the framing, the decoded
//! packet types both protocol versions share, and MQTT 3.1.1; [`v5`] holds MQTT 5.0.
//!
//! Framing is ours: we read the fixed header and its Remaining Length (§2.2.3) and refuse a
//! packet larger than the configured maximum *before* any of its body is kept, so a client
//! cannot make us buffer more than `max_packet_size` per packet. A complete frame is then
//! decoded by `mqtt-codec-kit` (v4), which only ever sees a slice that holds exactly one
//! packet. That matters: the crate subtracts lengths without checks, which is sound only when
//! its reader cannot run past the frame.
//!
//! Three packets are parsed partly or wholly by hand, because the crate's behaviour does not
//! fit a server:
//! - CONNECT (§3.1.2.1, §3.1.2.2): we read the Protocol Name and Level first, so that an
//!   unsupported level gets CONNACK 0x01 (the crate would fail the whole packet).
//! - SUBSCRIBE (§3.8): parsed entirely here, so that one invalid Topic Filter yields return
//!   code 0x80 for that filter in the SUBACK instead of failing the whole packet.
//! - PUBLISH (§3.3), both ways: the hot path. The crate copies a payload three times on the
//!   way in and once more on the way out; ours copies it once each way ([`v5::publish_into`]).
//!
//! CONNECT picks the version: Protocol Level 4 is decoded as 3.1.1, level 5 by [`v5`], and
//! every later packet of the connection by the same version's decoder.
//!
//! Nothing in this module panics on input.

pub mod v5;

use std::io::Cursor;

use mqtt_codec_kit::common::packet::EncodablePacket;
use mqtt_codec_kit::common::{Decodable, Encodable};
use mqtt_codec_kit::v4::control::ConnectReturnCode;
use mqtt_codec_kit::v4::packet::{
    ConnackPacket, PingrespPacket, PubackPacket, PubcompPacket, PubrecPacket, PubrelPacket,
    SubackPacket, UnsubackPacket, VariablePacket,
};

pub use v5::Properties;

/// Protocol Level of MQTT 3.1.1 (§3.1.2.2).
pub const PROTOCOL_LEVEL_3_1_1: u8 = 4;

/// Why bytes from a client could not be turned into a packet. Every variant closes the
/// connection; the text is the close reason.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// §2.2.3: at most four bytes of Remaining Length.
    #[error("malformed packet: Remaining Length longer than 4 bytes")]
    MalformedRemainingLength,
    /// The packet is larger than `max_packet_size`.
    #[error("packet of {size} bytes exceeds the maximum packet size of {max} bytes")]
    TooLarge { size: u64, max: usize },
    /// §2.2.1: packet types 0 and 15 are reserved.
    #[error("malformed packet: reserved packet type {0}")]
    ReservedType(u8),
    /// §3.1.2.1: the Protocol Name is not `MQTT` (MQTT 3.1's `MQIsdp` included).
    #[error("unsupported protocol name {0:?}")]
    UnsupportedProtocolName(String),
    /// §3.1.2.2: a Protocol Level other than 4 and 5; the server answers CONNACK 0x01.
    #[error(
        "unsupported protocol level {0} (MQTT 3.1.1, level 4, and 5.0, level 5, are supported)"
    )]
    UnsupportedProtocolLevel(u8),
    /// Any other violation of the packet's format (MQTT 5.0 reason code 0x81).
    #[error("malformed {packet}: {reason}")]
    Malformed {
        packet: &'static str,
        reason: String,
    },
    /// A well-formed packet that breaks a rule on values (MQTT 5.0 reason code 0x82).
    #[error("protocol error in {packet}: {reason}")]
    Protocol {
        packet: &'static str,
        reason: String,
    },
}

fn protocol(packet: &'static str, reason: impl Into<String>) -> DecodeError {
    DecodeError::Protocol {
        packet,
        reason: reason.into(),
    }
}

fn malformed(packet: &'static str, reason: impl Into<String>) -> DecodeError {
    DecodeError::Malformed {
        packet,
        reason: reason.into(),
    }
}

/// CONNECT (§3.1), the parts the server uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// Protocol Level: 4 (3.1.1) or 5 (5.0).
    pub protocol: u8,
    pub client_id: String,
    /// Clean Session (3.1.1) or Clean Start (5.0).
    pub clean_session: bool,
    /// Keep Alive in seconds (§3.1.2.10); 0 turns the mechanism off.
    pub keep_alive: u16,
    pub username: Option<String>,
    pub password: Option<Vec<u8>>,
    /// The Will Message (§3.1.2.5, §3.1.3.2, §3.1.3.3), if the Will Flag is set.
    pub will: Option<Will>,
    /// MQTT 5.0 CONNECT properties (§3.1.2.11); empty for 3.1.1.
    pub properties: Properties,
}

/// A Will Message of a CONNECT (§3.1.2.5–§3.1.2.7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
    /// MQTT 5.0 Will Properties (§3.1.3.2); empty for 3.1.1.
    pub properties: Properties,
}

/// PUBLISH (§3.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub topic: String,
    pub qos: u8,
    /// Present exactly when `qos > 0` (§2.3.1).
    pub packet_id: Option<u16>,
    pub retain: bool,
    pub dup: bool,
    pub payload: Vec<u8>,
    /// MQTT 5.0 PUBLISH properties (§3.3.2.3); empty for 3.1.1.
    pub properties: Properties,
}

/// One Topic Filter of a SUBSCRIBE with its requested QoS (§3.8.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeEntry {
    pub filter: String,
    pub qos: u8,
    /// MQTT 5.0 Subscription Options; all off for 3.1.1.
    pub options: SubscriptionOptions,
}

/// MQTT 5.0 Subscription Options besides the QoS (§3.8.3.1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SubscriptionOptions {
    /// Messages this connection's Client Identifier published are not sent back.
    pub no_local: bool,
    /// Forwarded messages keep the RETAIN flag they were published with.
    pub retain_as_published: bool,
    /// 0: send retained messages on subscribe; 1: only if the subscription is new; 2: never.
    pub retain_handling: u8,
}

/// A Control Packet a client may send, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// CONNECT (§3.1), boxed: it is by far the largest packet.
    Connect(Box<Connect>),
    Publish(Publish),
    /// PUBACK (§3.4).
    Puback(u16),
    /// PUBREC (§3.5) with its Reason Code (0 in 3.1.1), PUBREL (§3.6), PUBCOMP (§3.7): the
    /// QoS 2 flow.
    Pubrec(u16, u8),
    Pubrel(u16),
    Pubcomp(u16),
    /// SUBSCRIBE (§3.8).
    Subscribe {
        packet_id: u16,
        entries: Vec<SubscribeEntry>,
        /// MQTT 5.0 Subscription Identifier (§3.8.2.1.2).
        subscription_id: Option<u32>,
    },
    /// UNSUBSCRIBE (§3.10).
    Unsubscribe {
        packet_id: u16,
        filters: Vec<String>,
    },
    /// PINGREQ (§3.12).
    Pingreq,
    /// DISCONNECT (§3.14), with the MQTT 5.0 Reason Code (0 in 3.1.1) and a new Session
    /// Expiry Interval, if the client sent one.
    Disconnect {
        reason: u8,
        session_expiry: Option<u32>,
    },
    /// AUTH (MQTT 5.0 §3.15).
    Auth {
        reason: u8,
        properties: Properties,
    },
    /// A packet only a server may send (CONNACK, SUBACK, UNSUBACK, PINGRESP), named.
    ServerOnly(&'static str),
}

/// Reads the fixed header (§2.2) at the start of `buf`: `(first byte, Remaining Length,
/// header length)`, or `None` while it is incomplete.
pub(crate) fn fixed_header(buf: &[u8]) -> Result<Option<(u8, u32, usize)>, DecodeError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let mut remaining: u32 = 0;
    for i in 0..4usize {
        let Some(&byte) = buf.get(1 + i) else {
            return Ok(None);
        };
        remaining |= u32::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((first, remaining, 2 + i)));
        }
    }
    Err(DecodeError::MalformedRemainingLength)
}

/// The type of the packet whose first byte is `first` (§2.2.1), checked before its body is
/// buffered, so that garbage is refused on its first byte.
pub fn packet_type(first: u8) -> u8 {
    first >> 4
}

/// Decodes the first packet of `buf`, as MQTT 5.0 when `v5` (the connection's CONNECT said
/// so), else as 3.1.1; a CONNECT is decoded by the version it names. `Ok(None)`: more bytes
/// are needed. `Ok(Some((packet, n)))`: `n` bytes were one packet. The size limit is checked
/// on the fixed header alone.
pub fn decode(
    buf: &[u8],
    max_packet_size: usize,
    v5: bool,
) -> Result<Option<(Inbound, usize)>, DecodeError> {
    let Some((first, remaining, header_len)) = fixed_header(buf)? else {
        return Ok(None);
    };
    let size = header_len as u64 + u64::from(remaining);
    if size > max_packet_size as u64 {
        return Err(DecodeError::TooLarge {
            size,
            max: max_packet_size,
        });
    }
    // `size` <= max_packet_size, a usize, so the cast is exact.
    let Some(frame) = buf.get(..size as usize) else {
        return Ok(None);
    };
    let body = frame.get(header_len..).unwrap_or_default();
    let flags = first & 0x0f;
    if v5 {
        return Ok(Some((v5::decode(first, body)?, frame.len())));
    }
    let packet = match packet_type(first) {
        0 | 15 => return Err(DecodeError::ReservedType(packet_type(first))),
        1 => {
            if check_connect_header(body)? == v5::PROTOCOL_LEVEL_5 {
                if flags != 0 {
                    return Err(malformed("CONNECT", "fixed header flags (§2.1.3)"));
                }
                return Ok(Some((
                    Inbound::Connect(Box::new(v5::connect(body)?)),
                    frame.len(),
                )));
            }
            from_codec(frame, header_len)?
        }
        2 => Inbound::ServerOnly("CONNACK"),
        3 => Inbound::Publish(v5::decode_publish_3_1_1(flags, body)?),
        8 => decode_subscribe(flags, body)?,
        9 => Inbound::ServerOnly("SUBACK"),
        11 => Inbound::ServerOnly("UNSUBACK"),
        13 => Inbound::ServerOnly("PINGRESP"),
        _ => from_codec(frame, header_len)?,
    };
    Ok(Some((packet, frame.len())))
}

/// §3.1.2.1 and §3.1.2.2: Protocol Name `MQTT`, Protocol Level 4 or 5, which it returns.
fn check_connect_header(body: &[u8]) -> Result<u8, DecodeError> {
    let name_len = match body.get(..2) {
        Some(&[hi, lo]) => usize::from(u16::from_be_bytes([hi, lo])),
        _ => return Err(malformed("CONNECT", "no Protocol Name")),
    };
    let name = body
        .get(2..2 + name_len)
        .ok_or_else(|| malformed("CONNECT", "truncated Protocol Name"))?;
    if name != b"MQTT" {
        return Err(DecodeError::UnsupportedProtocolName(
            String::from_utf8_lossy(name).into_owned(),
        ));
    }
    let level = *body
        .get(2 + name_len)
        .ok_or_else(|| malformed("CONNECT", "no Protocol Level"))?;
    if level != PROTOCOL_LEVEL_3_1_1 && level != v5::PROTOCOL_LEVEL_5 {
        return Err(DecodeError::UnsupportedProtocolLevel(level));
    }
    Ok(level)
}

fn nonzero_id(packet: &'static str, id: u16) -> Result<u16, DecodeError> {
    if id == 0 {
        Err(malformed(packet, "Packet Identifier 0 (§2.3.1)"))
    } else {
        Ok(id)
    }
}

/// Decodes one complete frame with `mqtt-codec-kit`.
fn from_codec(frame: &[u8], header_len: usize) -> Result<Inbound, DecodeError> {
    let packet = VariablePacket::decode(&mut Cursor::new(frame))
        .map_err(|e| malformed(name_of(frame), e.to_string()))?;
    check_exact(frame, header_len, &packet)?;
    Ok(match packet {
        VariablePacket::ConnectPacket(p) => {
            if p.password().is_some() && p.username().is_none() {
                return Err(malformed(
                    "CONNECT",
                    "Password without User Name (§3.1.2.9)",
                ));
            }
            Inbound::Connect(Box::new(Connect {
                protocol: PROTOCOL_LEVEL_3_1_1,
                client_id: p.client_identifier().to_owned(),
                clean_session: p.clean_session(),
                keep_alive: p.keep_alive(),
                username: p.username().map(str::to_owned),
                password: p.password().map(|p| p.as_bytes().to_vec()),
                will: p.will().map(|w| Will {
                    topic: w.topic().to_string(),
                    payload: w.message().0.clone(),
                    qos: w.qos() as u8,
                    retain: w.retain(),
                    properties: Properties::default(),
                }),
                properties: Properties::default(),
            }))
        }
        // `decode` hands PUBLISH to the hand decoder before the crate sees it.
        VariablePacket::PublishPacket(_) => Inbound::Publish(v5::decode_publish_3_1_1(
            frame.first().map_or(0, |b| b & 0x0f),
            frame.get(header_len..).unwrap_or_default(),
        )?),
        VariablePacket::PubackPacket(p) => Inbound::Puback(p.packet_identifier()),
        VariablePacket::PubrecPacket(p) => Inbound::Pubrec(p.packet_identifier(), 0),
        VariablePacket::PubrelPacket(p) => Inbound::Pubrel(p.packet_identifier()),
        VariablePacket::PubcompPacket(p) => Inbound::Pubcomp(p.packet_identifier()),
        VariablePacket::UnsubscribePacket(p) => {
            if p.topic_filters().is_empty() {
                return Err(malformed("UNSUBSCRIBE", "no Topic Filter (§3.10.3)"));
            }
            Inbound::Unsubscribe {
                packet_id: nonzero_id("UNSUBSCRIBE", p.packet_identifier())?,
                filters: p.topic_filters().iter().map(|f| f.to_string()).collect(),
            }
        }
        VariablePacket::PingreqPacket(_) => Inbound::Pingreq,
        VariablePacket::DisconnectPacket(_) => Inbound::Disconnect {
            reason: 0,
            session_expiry: None,
        },
        VariablePacket::ConnackPacket(_) => Inbound::ServerOnly("CONNACK"),
        VariablePacket::SubscribePacket(_) => {
            return Err(malformed(
                "SUBSCRIBE",
                "internal: decoded by the codec crate",
            ))
        }
        VariablePacket::SubackPacket(_) => Inbound::ServerOnly("SUBACK"),
        VariablePacket::UnsubackPacket(_) => Inbound::ServerOnly("UNSUBACK"),
        VariablePacket::PingrespPacket(_) => Inbound::ServerOnly("PINGRESP"),
    })
}

/// The crate reads a string that is shorter than its length prefix says without complaint,
/// and ignores trailing bytes. Every packet it decodes is small (PUBLISH is decoded by hand),
/// so it is re-encoded and compared with the frame.
fn check_exact(
    frame: &[u8],
    header_len: usize,
    packet: &VariablePacket,
) -> Result<(), DecodeError> {
    let body = frame.get(header_len..).unwrap_or_default();
    let exact = match packet {
        VariablePacket::PublishPacket(_) => true,
        _ => {
            let mut again = Vec::with_capacity(body.len());
            packet.encode_packet(&mut again).is_ok() && again == body
        }
    };
    if exact {
        Ok(())
    } else {
        Err(malformed(
            name_of(frame),
            "field lengths do not add up to the Remaining Length",
        ))
    }
}

/// The spec's name of the packet in `frame`, for error messages.
fn name_of(frame: &[u8]) -> &'static str {
    match frame.first().map(|b| packet_type(*b)) {
        Some(1) => "CONNECT",
        Some(3) => "PUBLISH",
        Some(4) => "PUBACK",
        Some(5) => "PUBREC",
        Some(6) => "PUBREL",
        Some(7) => "PUBCOMP",
        Some(10) => "UNSUBSCRIBE",
        Some(12) => "PINGREQ",
        Some(14) => "DISCONNECT",
        _ => "packet",
    }
}

/// SUBSCRIBE (§3.8): fixed-header flags 0b0010, a Packet Identifier, then at least one
/// (Topic Filter, Requested QoS) pair. Filter *syntax* is checked later, per filter.
fn decode_subscribe(flags: u8, body: &[u8]) -> Result<Inbound, DecodeError> {
    const P: &str = "SUBSCRIBE";
    if flags != 0b0010 {
        return Err(malformed(P, "fixed header flags must be 0010 (§3.8.1)"));
    }
    let packet_id = match body.get(..2) {
        Some(&[hi, lo]) => nonzero_id(P, u16::from_be_bytes([hi, lo]))?,
        _ => return Err(malformed(P, "no Packet Identifier")),
    };
    let mut rest = body.get(2..).unwrap_or_default();
    let mut entries = Vec::new();
    while !rest.is_empty() {
        let len = match rest.get(..2) {
            Some(&[hi, lo]) => usize::from(u16::from_be_bytes([hi, lo])),
            _ => return Err(malformed(P, "truncated Topic Filter length")),
        };
        let raw = rest
            .get(2..2 + len)
            .ok_or_else(|| malformed(P, "truncated Topic Filter"))?;
        let filter = std::str::from_utf8(raw)
            .map_err(|_| malformed(P, "Topic Filter is not UTF-8 (§1.5.3)"))?
            .to_owned();
        let qos = *rest
            .get(2 + len)
            .ok_or_else(|| malformed(P, "no Requested QoS"))?;
        if qos > 2 {
            return Err(malformed(
                P,
                format!("Requested QoS byte {qos:#04x} (§3.8.3.1)"),
            ));
        }
        entries.push(SubscribeEntry {
            filter,
            qos,
            options: SubscriptionOptions::default(),
        });
        rest = rest.get(3 + len..).unwrap_or_default();
    }
    if entries.is_empty() {
        return Err(malformed(P, "no Topic Filter (§3.8.3)"));
    }
    Ok(Inbound::Subscribe {
        packet_id,
        entries,
        subscription_id: None,
    })
}

fn encode(packet: &impl Encodable) -> Vec<u8> {
    let mut out = Vec::with_capacity(packet.encoded_length() as usize);
    // Writing into a Vec cannot fail; the crate's only other failure is an over-long string,
    // which callers rule out before encoding.
    let _ = packet.encode(&mut out);
    out
}

/// CONNACK (§3.2) with a Connect Return Code (§3.2.2.3).
pub fn connack(session_present: bool, return_code: u8) -> Vec<u8> {
    encode(&ConnackPacket::new(
        session_present,
        ConnectReturnCode::from(return_code),
    ))
}

/// The header flags and Packet Identifier of a PUBLISH to a client (§3.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishFlags {
    /// 0, 1 or 2; a Packet Identifier goes with 1 and 2.
    pub qos: u8,
    pub packet_id: u16,
    pub retain: bool,
    pub dup: bool,
}

impl PublishFlags {
    /// QoS 0, no flags.
    pub const QOS0: PublishFlags = PublishFlags {
        qos: 0,
        packet_id: 0,
        retain: false,
        dup: false,
    };
}

/// PUBLISH (§3.3) to a client; `None` when `topic` is not a valid Topic Name (it came from
/// a message property, so it is not trusted either).
pub fn publish(topic: &str, flags: PublishFlags, payload: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    publish_into(&mut out, topic, flags, payload).then_some(out)
}

/// [`publish`], appended to `out`; `false` (and nothing appended) for an invalid Topic Name.
pub fn publish_into(out: &mut Vec<u8>, topic: &str, flags: PublishFlags, payload: &[u8]) -> bool {
    if crate::topic::validate_name(topic).is_err() {
        return false;
    }
    v5::publish_into(out, topic, flags, None, payload);
    true
}

/// PUBREC (§3.5).
pub fn pubrec(packet_id: u16) -> Vec<u8> {
    encode(&PubrecPacket::new(packet_id))
}

/// PUBREL (§3.6).
pub fn pubrel(packet_id: u16) -> Vec<u8> {
    encode(&PubrelPacket::new(packet_id))
}

/// PUBCOMP (§3.7).
pub fn pubcomp(packet_id: u16) -> Vec<u8> {
    encode(&PubcompPacket::new(packet_id))
}

/// PUBACK (§3.4).
pub fn puback(packet_id: u16) -> Vec<u8> {
    encode(&PubackPacket::new(packet_id))
}

/// SUBACK (§3.9); each return code is 0x00, 0x01, 0x02 or 0x80.
pub fn suback(packet_id: u16, return_codes: &[u8]) -> Vec<u8> {
    use mqtt_codec_kit::v4::packet::suback::SubscribeReturnCode as C;
    let codes = return_codes
        .iter()
        .map(|c| match c {
            0 => C::MaximumQoSLevel0,
            1 => C::MaximumQoSLevel1,
            2 => C::MaximumQoSLevel2,
            _ => C::Failure,
        })
        .collect();
    encode(&SubackPacket::new(packet_id, codes))
}

/// UNSUBACK (§3.11).
pub fn unsuback(packet_id: u16) -> Vec<u8> {
    encode(&UnsubackPacket::new(packet_id))
}

/// PINGRESP (§3.13).
pub fn pingresp() -> Vec<u8> {
    encode(&PingrespPacket::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 1 << 20;

    #[test]
    fn incomplete_header_and_body_need_more_bytes() {
        assert_eq!(decode(&[], MAX, false), Ok(None));
        assert_eq!(decode(&[0x30], MAX, false), Ok(None));
        assert_eq!(decode(&[0x30, 0x80], MAX, false), Ok(None));
        assert_eq!(decode(&[0x30, 0x05, 0x00], MAX, false), Ok(None));
    }

    #[test]
    fn five_byte_remaining_length_is_malformed() {
        assert_eq!(
            decode(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01], MAX, false),
            Err(DecodeError::MalformedRemainingLength)
        );
    }

    #[test]
    fn oversized_packet_is_refused_from_its_header() {
        // 268,435,455 bytes announced; only the header is present.
        let err = decode(&[0x30, 0xff, 0xff, 0xff, 0x7f], MAX, false);
        assert!(matches!(err, Err(DecodeError::TooLarge { .. })), "{err:?}");
    }

    #[test]
    fn pingreq_and_disconnect() {
        assert_eq!(
            decode(&[0xc0, 0x00], MAX, false),
            Ok(Some((Inbound::Pingreq, 2)))
        );
        assert_eq!(
            decode(&[0xe0, 0x00], MAX, false),
            Ok(Some((
                Inbound::Disconnect {
                    reason: 0,
                    session_expiry: None
                },
                2
            )))
        );
        assert!(
            decode(&[0xc0, 0x01, 0x00], MAX, false).is_err(),
            "trailing byte"
        );
    }

    #[test]
    fn string_overrunning_its_frame_is_malformed() {
        // PUBLISH, Remaining Length 3, Topic Name length 9.
        let err = decode(&[0x30, 0x03, 0x00, 0x09, b'a'], MAX, false);
        assert!(
            matches!(
                err,
                Err(DecodeError::Malformed {
                    packet: "PUBLISH",
                    ..
                })
            ),
            "{err:?}"
        );
    }

    #[test]
    fn publish_3_1_1_decodes_by_hand_and_refuses_what_the_spec_refuses() {
        // QoS 1, DUP, RETAIN, "a/b", Packet Identifier 7, payload "hi".
        let bytes = [
            0x3b, 0x09, 0x00, 0x03, b'a', b'/', b'b', 0x00, 0x07, b'h', b'i',
        ];
        assert_eq!(
            decode(&bytes, MAX, false),
            Ok(Some((
                Inbound::Publish(Publish {
                    topic: "a/b".into(),
                    qos: 1,
                    packet_id: Some(7),
                    retain: true,
                    dup: true,
                    payload: b"hi".to_vec(),
                    properties: Properties::default(),
                }),
                bytes.len()
            )))
        );
        let refused: [&[u8]; 5] = [
            &[0x30, 0x02, 0x00, 0x00],             // empty Topic Name (§4.7.3)
            &[0x30, 0x03, 0x00, 0x01, b'#'],       // wildcard in a Topic Name (§4.7.3)
            &[0x36, 0x03, 0x00, 0x01, b't'],       // QoS 3 (§3.3.1.2)
            &[0x32, 0x05, 0x00, 0x01, b't', 0, 0], // Packet Identifier 0 (§2.3.1)
            &[0x32, 0x04, 0x00, 0x01, b't', 0],    // Packet Identifier cut short
        ];
        for bytes in refused {
            let err = decode(bytes, MAX, false);
            assert!(
                matches!(
                    err,
                    Err(DecodeError::Malformed {
                        packet: "PUBLISH",
                        ..
                    })
                ),
                "{bytes:?}: {err:?}"
            );
        }
        // Not UTF-8 (§1.5.3).
        assert!(decode(&[0x30, 0x03, 0x00, 0x01, 0xff], MAX, false).is_err());
    }

    #[test]
    fn subscribe_keeps_invalid_filters_for_the_suback() {
        let mut p = vec![0x82, 0, 0x00, 0x07];
        for (f, q) in [("a/#", 1u8), ("a#", 0)] {
            p.extend_from_slice(&(f.len() as u16).to_be_bytes());
            p.extend_from_slice(f.as_bytes());
            p.push(q);
        }
        p[1] = (p.len() - 2) as u8;
        let (packet, n) = decode(&p, MAX, false).unwrap().unwrap();
        assert_eq!(n, p.len());
        assert_eq!(
            packet,
            Inbound::Subscribe {
                packet_id: 7,
                entries: vec![
                    SubscribeEntry {
                        filter: "a/#".into(),
                        qos: 1,
                        options: SubscriptionOptions::default(),
                    },
                    SubscribeEntry {
                        filter: "a#".into(),
                        qos: 0,
                        options: SubscriptionOptions::default(),
                    },
                ],
                subscription_id: None,
            }
        );
    }

    #[test]
    fn encoders_produce_spec_bytes() {
        assert_eq!(connack(true, 0), vec![0x20, 0x02, 0x01, 0x00]);
        assert_eq!(connack(false, 5), vec![0x20, 0x02, 0x00, 0x05]);
        assert_eq!(puback(0x0102), vec![0x40, 0x02, 0x01, 0x02]);
        assert_eq!(
            suback(9, &[1, 0x80]),
            vec![0x90, 0x04, 0x00, 0x09, 0x01, 0x80]
        );
        assert_eq!(unsuback(3), vec![0xb0, 0x02, 0x00, 0x03]);
        assert_eq!(pingresp(), vec![0xd0, 0x00]);
        let qos1 = PublishFlags {
            qos: 1,
            packet_id: 1,
            ..PublishFlags::QOS0
        };
        assert_eq!(
            publish("a/b", qos1, b"x"),
            Some(vec![
                0x32, 0x08, 0x00, 0x03, b'a', b'/', b'b', 0x00, 0x01, b'x'
            ])
        );
        let qos2_dup_retain = PublishFlags {
            qos: 2,
            packet_id: 5,
            retain: true,
            dup: true,
        };
        assert_eq!(
            publish("t", qos2_dup_retain, b"y"),
            Some(vec![0x3d, 0x06, 0x00, 0x01, b't', 0x00, 0x05, b'y'])
        );
        assert_eq!(
            publish("t", PublishFlags::QOS0, &[]),
            Some(vec![0x30, 0x03, 0x00, 0x01, b't'])
        );
        assert_eq!(publish("a/+", PublishFlags::QOS0, b"x"), None);
        assert_eq!(pubrec(7), vec![0x50, 0x02, 0x00, 0x07]);
        assert_eq!(pubrel(7), vec![0x62, 0x02, 0x00, 0x07]);
        assert_eq!(pubcomp(7), vec![0x70, 0x02, 0x00, 0x07]);
    }
}
