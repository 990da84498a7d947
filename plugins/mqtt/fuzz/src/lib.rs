//! What the MQTT plugin's fuzz targets (`fuzz_targets/`) assert, shared by them:
//! - [`check_decode`]: the framing promises of `codec::decode` hold for any bytes — a decoded
//!   packet never claims more bytes than it was given, bytes after the first packet change
//!   nothing, a strict prefix of a packet is "need more bytes" (never an error), and the size
//!   limit is exact;
//! - [`encode_client`]: a client-side encoder written here from the specification, apart from
//!   the plugin's decoder, so that decode → encode → decode must give the same packet for the
//!   packets the plugin itself never encodes (it only encodes what a server sends).
//!
//! Run them with `scripts/fuzz [seconds per target] [target ...]` from the repository root
//! (CI: 25 s each). A failed assertion is a libFuzzer crash; the script names the reproducer
//! (under `target/fuzz/artifacts/<target>/`) and the command that replays it.

use magnetar_mqtt::codec::{self, v5, DecodeError, Inbound, Properties};

/// The packet size limit of the decode calls (the plugin's default `max_packet_size`).
pub const MAX: usize = 1 << 20;

/// Decodes the first packet of `data` (as 5.0 when `v5`) and checks the framing promises;
/// the decoded packet and its size, if there was one.
pub fn check_decode(data: &[u8], v5: bool) -> Option<(Inbound, usize)> {
    let (packet, n) = match codec::decode(data, MAX, v5) {
        Ok(Some(decoded)) => decoded,
        Ok(None) => return None,
        Err(e) => {
            // The verdict rests on the first frame alone: more bytes behind it change nothing.
            let mut longer = data.to_vec();
            longer.extend_from_slice(&[0x30, 0x00]);
            assert_eq!(codec::decode(&longer, MAX, v5), Err(e), "trailing bytes");
            return None;
        }
    };
    assert!(
        (2..=data.len()).contains(&n),
        "a decoded packet claims {n} bytes of {}",
        data.len()
    );
    let frame = &data[..n];
    assert_eq!(
        codec::decode(frame, MAX, v5),
        Ok(Some((packet.clone(), n))),
        "the bytes after the packet changed it"
    );
    for k in [0, 1, n / 2, n - 1] {
        assert_eq!(
            codec::decode(&frame[..k], MAX, v5),
            Ok(None),
            "the first {k} bytes of a {n}-byte packet are not just incomplete"
        );
    }
    assert_eq!(codec::decode(frame, n, v5), Ok(Some((packet.clone(), n))));
    assert!(
        matches!(
            codec::decode(frame, n - 1, v5),
            Err(DecodeError::TooLarge { .. })
        ),
        "a {n}-byte packet passed a limit of {} bytes",
        n - 1
    );
    Some((packet, n))
}

/// Asserts that `bytes` decode (as 5.0 when `v5`) to exactly `expected`, using all of them.
pub fn assert_decodes_to(bytes: &[u8], v5: bool, expected: &Inbound) {
    assert_eq!(
        codec::decode(bytes, MAX, v5),
        Ok(Some((expected.clone(), bytes.len()))),
        "re-encoded as {bytes:02x?}"
    );
}

/// `packet` as a client sends it (MQTT 5.0 when `v5`); `None` for a packet only a server
/// sends. Fields the decoder drops (a 5.0 PUBACK's Reason Code, SUBSCRIBE User Properties)
/// are left out, which is what makes the round trip an equality.
pub fn encode_client(packet: &Inbound, v5: bool) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    let first = match packet {
        Inbound::Connect(c) => {
            let mut flags = u8::from(c.clean_session) << 1;
            if let Some(w) = &c.will {
                flags |= 0x04 | (w.qos << 3) | (u8::from(w.retain) << 5);
            }
            flags |= u8::from(c.password.is_some()) << 6 | u8::from(c.username.is_some()) << 7;
            put_str(&mut body, b"MQTT");
            body.extend_from_slice(&[c.protocol, flags]);
            body.extend_from_slice(&c.keep_alive.to_be_bytes());
            let c5 = c.protocol == v5::PROTOCOL_LEVEL_5;
            if c5 {
                v5::put_properties(&mut body, &c.properties);
            }
            put_str(&mut body, c.client_id.as_bytes());
            if let Some(w) = &c.will {
                if c5 {
                    v5::put_properties(&mut body, &w.properties);
                }
                put_str(&mut body, w.topic.as_bytes());
                put_str(&mut body, &w.payload);
            }
            let credentials = [
                c.username.as_deref().map(str::as_bytes),
                c.password.as_deref(),
            ];
            for f in credentials.into_iter().flatten() {
                put_str(&mut body, f);
            }
            0x10
        }
        Inbound::Publish(p) => {
            put_str(&mut body, p.topic.as_bytes());
            if let Some(id) = p.packet_id {
                body.extend_from_slice(&id.to_be_bytes());
            }
            if v5 {
                v5::put_properties(&mut body, &p.properties);
            }
            body.extend_from_slice(&p.payload);
            0x30 | u8::from(p.dup) << 3 | p.qos << 1 | u8::from(p.retain)
        }
        Inbound::Puback(id) => ack(&mut body, 0x40, *id, 0),
        Inbound::Pubrec(id, reason) => ack(&mut body, 0x50, *id, if v5 { *reason } else { 0 }),
        Inbound::Pubrel(id) => ack(&mut body, 0x62, *id, 0),
        Inbound::Pubcomp(id) => ack(&mut body, 0x70, *id, 0),
        Inbound::Subscribe {
            packet_id,
            entries,
            subscription_id,
        } => {
            body.extend_from_slice(&packet_id.to_be_bytes());
            if v5 {
                let p = Properties {
                    subscription_identifiers: subscription_id.iter().copied().collect(),
                    ..Properties::default()
                };
                v5::put_properties(&mut body, &p);
            }
            for e in entries {
                put_str(&mut body, e.filter.as_bytes());
                let o = e.options;
                body.push(
                    e.qos
                        | u8::from(o.no_local) << 2
                        | u8::from(o.retain_as_published) << 3
                        | o.retain_handling << 4,
                );
            }
            0x82
        }
        Inbound::Unsubscribe { packet_id, filters } => {
            body.extend_from_slice(&packet_id.to_be_bytes());
            if v5 {
                v5::put_properties(&mut body, &Properties::default());
            }
            for f in filters {
                put_str(&mut body, f.as_bytes());
            }
            0xa2
        }
        Inbound::Pingreq => 0xc0,
        Inbound::Disconnect {
            reason,
            session_expiry,
        } => {
            if v5 {
                body.push(*reason);
                let p = Properties {
                    session_expiry_interval: *session_expiry,
                    ..Properties::default()
                };
                v5::put_properties(&mut body, &p);
            }
            0xe0
        }
        Inbound::Auth { reason, properties } => {
            body.push(*reason);
            v5::put_properties(&mut body, properties);
            0xf0
        }
        Inbound::ServerOnly(_) => return None,
    };
    Some(frame(first, &body))
}

/// PUBACK, PUBREC, PUBREL or PUBCOMP: the Packet Identifier, and a 5.0 Reason Code unless it
/// is 0 (§3.4.2.1); returns `first`.
fn ack(body: &mut Vec<u8>, first: u8, packet_id: u16, reason: u8) -> u8 {
    body.extend_from_slice(&packet_id.to_be_bytes());
    if reason != 0 {
        body.push(reason);
    }
    first
}

/// A length-prefixed string or binary field (§1.5.4, §1.5.6); decoded fields fit in 16 bits.
fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

/// The flags a server would send a decoded PUBLISH back with.
pub fn publish_flags(p: &codec::Publish) -> codec::PublishFlags {
    codec::PublishFlags {
        qos: p.qos,
        packet_id: p.packet_id.unwrap_or(0),
        retain: p.retain,
        dup: p.dup,
    }
}

/// A packet with its fixed header (§2.2): first byte, Remaining Length, body.
pub fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    let mut len = body.len();
    loop {
        let byte = (len % 128) as u8;
        len /= 128;
        out.push(if len > 0 { byte | 0x80 } else { byte });
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

/// The size a packet's fixed header announces, or `None` when `bytes` do not start with a
/// complete fixed header.
pub fn announced_size(bytes: &[u8]) -> Option<usize> {
    let mut remaining = 0usize;
    for i in 0..4 {
        let byte = *bytes.get(1 + i)?;
        remaining |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some(2 + i + remaining);
        }
    }
    None
}
