//! The bench's hand-written MQTT 3.1.1 client ([OASIS MQTT 3.1.1] §2, §3), for the parts
//! that hold thousands of connections (connect storms, the fleet, idle connections), where as
//! many `rumqttc` event loops would weigh more than the server under test. It has only what
//! those parts send and read: CONNECT/CONNACK, SUBSCRIBE/SUBACK, PUBLISH, PUBACK, and a frame
//! reader over a byte buffer; plus [`open_many`], which opens a fleet with a bounded number of
//! logins in flight.
//!
//! The bytes come from the servers under test, not from an attacker; still, a malformed or
//! oversized frame is an error for that connection, never a panic.
//!
//! [OASIS MQTT 3.1.1]: https://docs.oasis-open.org/mqtt/mqtt/v3.1.1/os/mqtt-v3.1.1-os.html

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest frame [`Frames`] accepts: the benches' payloads are far smaller.
const MAX_FRAME: usize = 1 << 20;

/// Appends the fixed header (§2.2): the packet type and flags byte, then the Remaining
/// Length as a variable byte integer (§2.2.3).
fn fixed_header(out: &mut Vec<u8>, first: u8, mut len: usize) {
    out.push(first);
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
}

/// Appends a UTF-8 string field: two length bytes, then the bytes (§1.5.3).
fn string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// A CONNECT (§3.1): Clean Session `clean`, Keep Alive `keep_alive` seconds (0: off),
/// optional User Name and Password.
pub fn connect_packet(
    id: &str,
    clean: bool,
    keep_alive: u16,
    login: Option<(&str, &str)>,
) -> Vec<u8> {
    let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04];
    let flags = if clean { 0x02 } else { 0x00 } | if login.is_some() { 0xC0 } else { 0x00 };
    body.push(flags);
    body.extend_from_slice(&keep_alive.to_be_bytes());
    string(&mut body, id);
    if let Some((user, password)) = login {
        string(&mut body, user);
        string(&mut body, password);
    }
    let mut packet = Vec::with_capacity(body.len() + 5);
    fixed_header(&mut packet, 0x10, body.len());
    packet.extend_from_slice(&body);
    packet
}

/// A SUBSCRIBE of one Topic Filter at `qos` (§3.8).
pub fn subscribe_packet(packet_id: u16, filter: &str, qos: u8) -> Vec<u8> {
    let mut packet = Vec::with_capacity(filter.len() + 8);
    fixed_header(&mut packet, 0x82, 2 + 2 + filter.len() + 1);
    packet.extend_from_slice(&packet_id.to_be_bytes());
    string(&mut packet, filter);
    packet.push(qos);
    packet
}

/// Appends a PUBLISH (§3.3); `packet_id` is sent only for QoS > 0.
pub fn publish(out: &mut Vec<u8>, topic: &str, qos: u8, packet_id: u16, payload: &[u8]) {
    let id_len = if qos > 0 { 2 } else { 0 };
    fixed_header(
        out,
        0x30 | (qos << 1),
        2 + topic.len() + id_len + payload.len(),
    );
    string(out, topic);
    if qos > 0 {
        out.extend_from_slice(&packet_id.to_be_bytes());
    }
    out.extend_from_slice(payload);
}

/// Appends a PUBACK (§3.4).
pub fn puback(out: &mut Vec<u8>, packet_id: u16) {
    out.extend_from_slice(&[0x40, 2]);
    out.extend_from_slice(&packet_id.to_be_bytes());
}

/// Sends the CONNECT and reads the CONNACK (§3.2): `Err` unless accepted.
pub async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    packet: &[u8],
) -> Result<(), String> {
    s.write_all(packet).await.map_err(|e| e.to_string())?;
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack)
        .await
        .map_err(|e| e.to_string())?;
    match connack {
        [0x20, 2, _, 0] => Ok(()),
        other => Err(format!("CONNACK {other:?}")),
    }
}

/// A packet read from the server, borrowing the reader's buffer.
pub enum Packet<'a> {
    Publish {
        topic: &'a [u8],
        qos: u8,
        packet_id: u16,
        payload: &'a [u8],
    },
    Puback,
    /// SUBACK (§3.9): the Packet Identifier and the first return code (0x80: refused).
    Suback(u16, u8),
    /// Any other packet type.
    Other,
}

/// Bytes read from one connection, cut into whole frames: an incomplete frame waits for more
/// bytes and is not an error.
#[derive(Default)]
pub struct Frames {
    buf: Vec<u8>,
    start: usize,
}

impl Frames {
    /// Reads more bytes from `r` (cancel-safe: usable in `select!`). End of stream is an
    /// error: the benches never expect the server to close.
    pub async fn fill<R: AsyncRead + Unpin>(&mut self, r: &mut R) -> Result<(), String> {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.reserve(4096);
        match r.read_buf(&mut self.buf).await {
            Ok(0) => Err("connection closed by the server".into()),
            Ok(_) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// The next whole packet, if the buffer holds one.
    pub fn next_packet(&mut self) -> Result<Option<Packet<'_>>, String> {
        let bytes = &self.buf[self.start..];
        let Some(&first) = bytes.first() else {
            return Ok(None);
        };
        // The Remaining Length: at most four bytes (§2.2.3).
        let mut len = 0usize;
        let mut header = 1;
        loop {
            let Some(&b) = bytes.get(header) else {
                return Ok(None);
            };
            len |= usize::from(b & 0x7F) << (7 * (header - 1));
            header += 1;
            if b & 0x80 == 0 {
                break;
            }
            if header > 4 {
                return Err("malformed Remaining Length".into());
            }
        }
        if len > MAX_FRAME {
            return Err(format!("a {len} B frame"));
        }
        let Some(body) = bytes.get(header..header + len) else {
            return Ok(None);
        };
        self.start += header + len;
        let short = || format!("short packet {first:#04x}");
        let u16_at = |i: usize| {
            body.get(i..i + 2)
                .map(|b| u16::from_be_bytes([b[0], b[1]]))
                .ok_or_else(short)
        };
        Ok(Some(match first >> 4 {
            3 => {
                let qos = (first >> 1) & 3;
                let topic_len = usize::from(u16_at(0)?);
                let topic = body.get(2..2 + topic_len).ok_or_else(short)?;
                let mut at = 2 + topic_len;
                let mut packet_id = 0;
                if qos > 0 {
                    packet_id = u16_at(at)?;
                    at += 2;
                }
                let payload = body.get(at..).ok_or_else(short)?;
                Packet::Publish {
                    topic,
                    qos,
                    packet_id,
                    payload,
                }
            }
            4 => Packet::Puback,
            9 => Packet::Suback(u16_at(0)?, *body.get(2).ok_or_else(short)?),
            _ => Packet::Other,
        }))
    }
}

/// Opens connections `0..n` with `open`, at most `in_flight` at once, each within `timeout`:
/// the opened ones with their index, and the failures' count and first error.
pub async fn open_many<T, F, Fut>(
    n: usize,
    in_flight: usize,
    timeout: Duration,
    open: F,
) -> (Vec<(usize, T)>, usize, Option<String>)
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<T, String>> + Send + 'static,
    T: Send + 'static,
{
    let gate = Arc::new(tokio::sync::Semaphore::new(in_flight));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let permit = gate.clone().acquire_owned().await.expect("semaphore");
        let opening = open(i);
        tasks.push(tokio::spawn(async move {
            let r = tokio::time::timeout(timeout, opening).await;
            drop(permit);
            r.unwrap_or_else(|_| Err(format!("not open within {timeout:?}")))
        }));
    }
    let mut opened = Vec::with_capacity(n);
    let mut failed = 0;
    let mut first_error = None;
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await {
            Ok(Ok(c)) => opened.push((i, c)),
            Ok(Err(e)) => {
                failed += 1;
                first_error.get_or_insert(e);
            }
            Err(e) => {
                failed += 1;
                first_error.get_or_insert(e.to_string());
            }
        }
    }
    (opened, failed, first_error)
}
