//! The content header (AMQP 0-9-1 §4.2.6.1) and the basic class's properties (§1.8): the
//! header frame that carries a message's size and its 14 optional properties, each present
//! when its flag bit is set.
//!
//! The gateway keeps a message's properties as the client sent them: [`ContentHeader`] holds
//! the property bytes (flags and values) raw, so a consumer gets them byte for byte, and
//! [`BasicProperties::read`] decodes them only where the plugin needs a value (headers,
//! expiration). [`BasicProperties::write`] encodes the properties the gateway sets itself.

use super::table::FieldTable;
use super::wire::{Put, Reader};
use super::CodecError;

/// A content header frame's payload.
#[derive(Debug, Clone, PartialEq)]
pub struct ContentHeader {
    pub class_id: u16,
    pub body_size: u64,
    /// Property flags and property values, as on the wire.
    pub properties: Vec<u8>,
}

impl ContentHeader {
    pub fn read(payload: &[u8]) -> Result<Self, CodecError> {
        let mut r = Reader::new(payload);
        let class_id = r.u16()?;
        let _weight = r.u16()?;
        let body_size = r.u64()?;
        let properties = r.rest().to_vec();
        // Checked now, so that a malformed header is refused when it arrives.
        BasicProperties::read(&properties)?;
        Ok(ContentHeader {
            class_id,
            body_size,
            properties,
        })
    }

    pub fn write(&self, out: &mut Vec<u8>) {
        Put::new(out)
            .u16(self.class_id)
            .u16(0)
            .u64(self.body_size)
            .raw(&self.properties);
    }
}

/// The basic class's properties (§1.8), in flag order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BasicProperties {
    pub content_type: Option<String>,
    pub content_encoding: Option<String>,
    pub headers: Option<FieldTable>,
    pub delivery_mode: Option<u8>,
    pub priority: Option<u8>,
    pub correlation_id: Option<String>,
    pub reply_to: Option<String>,
    pub expiration: Option<String>,
    pub message_id: Option<String>,
    pub timestamp: Option<u64>,
    pub kind: Option<String>,
    pub user_id: Option<String>,
    pub app_id: Option<String>,
    pub cluster_id: Option<String>,
}

/// Flag words after the first (a continuation bit set on each): more is hostile.
const MAX_FLAG_WORDS: usize = 4;

impl BasicProperties {
    /// Decodes property flags and values.
    pub fn read(bytes: &[u8]) -> Result<Self, CodecError> {
        let mut r = Reader::new(bytes);
        let flags = r.u16()?;
        let mut more = flags & 1 != 0;
        let mut words = 0;
        while more {
            words += 1;
            if words > MAX_FLAG_WORDS {
                return Err(CodecError::Truncated);
            }
            more = r.u16()? & 1 != 0;
        }
        let has = |bit: u16| flags & (1 << bit) != 0;
        let mut p = BasicProperties::default();
        if has(15) {
            p.content_type = Some(r.shortstr()?);
        }
        if has(14) {
            p.content_encoding = Some(r.shortstr()?);
        }
        if has(13) {
            p.headers = Some(FieldTable::read(&mut r)?);
        }
        if has(12) {
            p.delivery_mode = Some(r.u8()?);
        }
        if has(11) {
            p.priority = Some(r.u8()?);
        }
        if has(10) {
            p.correlation_id = Some(r.shortstr()?);
        }
        if has(9) {
            p.reply_to = Some(r.shortstr()?);
        }
        if has(8) {
            p.expiration = Some(r.shortstr()?);
        }
        if has(7) {
            p.message_id = Some(r.shortstr()?);
        }
        if has(6) {
            p.timestamp = Some(r.u64()?);
        }
        if has(5) {
            p.kind = Some(r.shortstr()?);
        }
        if has(4) {
            p.user_id = Some(r.shortstr()?);
        }
        if has(3) {
            p.app_id = Some(r.shortstr()?);
        }
        if has(2) {
            p.cluster_id = Some(r.shortstr()?);
        }
        Ok(p)
    }

    /// Encodes flags and values.
    pub fn write(&self, out: &mut Vec<u8>) {
        let mut flags = 0u16;
        let mut set = |bit: u16, present: bool| {
            if present {
                flags |= 1 << bit;
            }
        };
        set(15, self.content_type.is_some());
        set(14, self.content_encoding.is_some());
        set(13, self.headers.is_some());
        set(12, self.delivery_mode.is_some());
        set(11, self.priority.is_some());
        set(10, self.correlation_id.is_some());
        set(9, self.reply_to.is_some());
        set(8, self.expiration.is_some());
        set(7, self.message_id.is_some());
        set(6, self.timestamp.is_some());
        set(5, self.kind.is_some());
        set(4, self.user_id.is_some());
        set(3, self.app_id.is_some());
        set(2, self.cluster_id.is_some());
        let p = &mut Put::new(out);
        p.u16(flags);
        let s = |p: &mut Put<'_>, v: &Option<String>| {
            if let Some(v) = v {
                p.shortstr(v);
            }
        };
        s(p, &self.content_type);
        s(p, &self.content_encoding);
        if let Some(h) = &self.headers {
            h.write(p);
        }
        if let Some(v) = self.delivery_mode {
            p.u8(v);
        }
        if let Some(v) = self.priority {
            p.u8(v);
        }
        s(p, &self.correlation_id);
        s(p, &self.reply_to);
        s(p, &self.expiration);
        s(p, &self.message_id);
        if let Some(v) = self.timestamp {
            p.u64(v);
        }
        s(p, &self.kind);
        s(p, &self.user_id);
        s(p, &self.app_id);
        s(p, &self.cluster_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::table::FieldValue;

    #[test]
    fn every_property_round_trips_byte_exact() {
        let mut headers = FieldTable::default();
        headers.insert("x", FieldValue::I32(7));
        let p = BasicProperties {
            content_type: Some("text/plain".into()),
            content_encoding: Some("gzip".into()),
            headers: Some(headers),
            delivery_mode: Some(2),
            priority: Some(9),
            correlation_id: Some("c".into()),
            reply_to: Some("r".into()),
            expiration: Some("60000".into()),
            message_id: Some("m".into()),
            timestamp: Some(1_700_000_000),
            kind: Some("t".into()),
            user_id: Some("guest".into()),
            app_id: Some("a".into()),
            cluster_id: Some("cl".into()),
        };
        let mut bytes = Vec::new();
        p.write(&mut bytes);
        assert_eq!(&bytes[..2], &[0xff, 0xfc]);
        assert_eq!(BasicProperties::read(&bytes).unwrap(), p);
        let header = ContentHeader {
            class_id: 60,
            body_size: 5,
            properties: bytes.clone(),
        };
        let mut frame = Vec::new();
        header.write(&mut frame);
        assert_eq!(ContentHeader::read(&frame).unwrap(), header);
    }
}
