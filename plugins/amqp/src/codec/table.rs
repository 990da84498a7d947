//! Field tables and field values (AMQP 0-9-1 §4.2.5.5) in RabbitMQ's dialect: the type
//! letters RabbitMQ and its clients use (the errata of the 0-9-1 spec: `s` is a signed 16-bit
//! integer, `x` a byte array, `u` unsigned 16-bit, `i` unsigned 32-bit, `l` signed 64-bit),
//! so that every table a RabbitMQ client sends decodes, and encodes back byte for byte.
//!
//! A table keeps its entries in the order they arrived (a `Vec`, not a map): encoding a
//! decoded table gives the same bytes. Nesting (tables and arrays inside tables) is bounded
//! by [`MAX_DEPTH`], so a hostile frame cannot exhaust the stack.

use super::wire::{Put, Reader};
use super::CodecError;

/// Deepest nesting of tables and arrays accepted.
pub const MAX_DEPTH: usize = 32;

/// A field value: one case per type letter.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldValue {
    /// `t`
    Bool(bool),
    /// `b`
    I8(i8),
    /// `B`
    U8(u8),
    /// `s` (RabbitMQ; the 0-9-1 grammar's short string is not used in tables)
    I16(i16),
    /// `u`
    U16(u16),
    /// `I`
    I32(i32),
    /// `i`
    U32(u32),
    /// `l`
    I64(i64),
    /// `f`
    F32(f32),
    /// `d`
    F64(f64),
    /// `D`: scale (decimal places) and unscaled value.
    Decimal(u8, u32),
    /// `S`: bytes, usually UTF-8.
    LongStr(Vec<u8>),
    /// `A`
    Array(Vec<FieldValue>),
    /// `T`: seconds since the epoch.
    Timestamp(u64),
    /// `F`
    Table(FieldTable),
    /// `V`
    Void,
    /// `x`
    Bytes(Vec<u8>),
}

/// A field table: name-value pairs in their order on the wire.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FieldTable(pub Vec<(String, FieldValue)>);

impl FieldTable {
    pub fn get(&self, name: &str) -> Option<&FieldValue> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v)
    }

    pub fn insert(&mut self, name: &str, value: FieldValue) -> &mut Self {
        self.0.push((name.to_string(), value));
        self
    }

    /// Decodes a table with its 32-bit length prefix.
    pub fn read(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        Self::read_at(r, 0)
    }

    fn read_at(r: &mut Reader<'_>, depth: usize) -> Result<Self, CodecError> {
        if depth > MAX_DEPTH {
            return Err(CodecError::TooDeep);
        }
        let bytes = r.longstr()?;
        Self::read_entries(bytes, depth)
    }

    /// Decodes the entries of a table without its length prefix (as AMQPLAIN's response
    /// carries them).
    pub fn read_entries(bytes: &[u8], depth: usize) -> Result<Self, CodecError> {
        let mut inner = Reader::new(bytes);
        let mut entries = Vec::new();
        while !inner.is_empty() {
            let name = inner.shortstr()?;
            let value = FieldValue::read_at(&mut inner, depth)?;
            entries.push((name, value));
        }
        Ok(FieldTable(entries))
    }

    /// Encodes the table with its length prefix.
    pub fn write(&self, put: &mut Put<'_>) {
        let out = put.buf();
        let at = out.len();
        out.extend_from_slice(&[0; 4]);
        for (name, value) in &self.0 {
            Put::new(out).shortstr(name);
            value.write(&mut Put::new(out));
        }
        let len = u32::try_from(out.len() - at - 4).unwrap_or(u32::MAX);
        if let Some(slot) = out.get_mut(at..at + 4) {
            slot.copy_from_slice(&len.to_be_bytes());
        }
    }
}

impl FieldValue {
    fn read_at(r: &mut Reader<'_>, depth: usize) -> Result<Self, CodecError> {
        let kind = r.u8()?;
        Ok(match kind {
            b't' => FieldValue::Bool(r.u8()? != 0),
            b'b' => FieldValue::I8(r.u8()? as i8),
            b'B' => FieldValue::U8(r.u8()?),
            b's' => FieldValue::I16(r.u16()? as i16),
            b'u' => FieldValue::U16(r.u16()?),
            b'I' => FieldValue::I32(r.u32()? as i32),
            b'i' => FieldValue::U32(r.u32()?),
            b'l' => FieldValue::I64(r.u64()? as i64),
            b'f' => FieldValue::F32(f32::from_bits(r.u32()?)),
            b'd' => FieldValue::F64(f64::from_bits(r.u64()?)),
            b'D' => FieldValue::Decimal(r.u8()?, r.u32()?),
            b'S' => FieldValue::LongStr(r.longstr()?.to_vec()),
            b'x' => FieldValue::Bytes(r.longstr()?.to_vec()),
            b'A' => {
                if depth + 1 > MAX_DEPTH {
                    return Err(CodecError::TooDeep);
                }
                let bytes = r.longstr()?;
                let mut inner = Reader::new(bytes);
                let mut items = Vec::new();
                while !inner.is_empty() {
                    items.push(FieldValue::read_at(&mut inner, depth + 1)?);
                }
                FieldValue::Array(items)
            }
            b'T' => FieldValue::Timestamp(r.u64()?),
            b'F' => FieldValue::Table(FieldTable::read_at(r, depth + 1)?),
            b'V' => FieldValue::Void,
            other => return Err(CodecError::FieldType(other)),
        })
    }

    pub fn write(&self, put: &mut Put<'_>) {
        match self {
            FieldValue::Bool(v) => put.u8(b't').u8(u8::from(*v)),
            FieldValue::I8(v) => put.u8(b'b').u8(*v as u8),
            FieldValue::U8(v) => put.u8(b'B').u8(*v),
            FieldValue::I16(v) => put.u8(b's').u16(*v as u16),
            FieldValue::U16(v) => put.u8(b'u').u16(*v),
            FieldValue::I32(v) => put.u8(b'I').u32(*v as u32),
            FieldValue::U32(v) => put.u8(b'i').u32(*v),
            FieldValue::I64(v) => put.u8(b'l').u64(*v as u64),
            FieldValue::F32(v) => put.u8(b'f').u32(v.to_bits()),
            FieldValue::F64(v) => put.u8(b'd').u64(v.to_bits()),
            FieldValue::Decimal(scale, v) => put.u8(b'D').u8(*scale).u32(*v),
            FieldValue::LongStr(v) => put.u8(b'S').longstr(v),
            FieldValue::Bytes(v) => put.u8(b'x').longstr(v),
            FieldValue::Array(items) => {
                let out = put.u8(b'A').buf();
                let at = out.len();
                out.extend_from_slice(&[0; 4]);
                for item in items {
                    item.write(&mut Put::new(out));
                }
                let len = u32::try_from(out.len() - at - 4).unwrap_or(u32::MAX);
                if let Some(slot) = out.get_mut(at..at + 4) {
                    slot.copy_from_slice(&len.to_be_bytes());
                }
                put
            }
            FieldValue::Timestamp(v) => put.u8(b'T').u64(*v),
            FieldValue::Table(t) => {
                put.u8(b'F');
                t.write(put);
                put
            }
            FieldValue::Void => put.u8(b'V'),
        };
    }

    /// The value as text, for strings.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            FieldValue::LongStr(b) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn every_type() -> FieldTable {
        let mut t = FieldTable::default();
        t.insert("bool", FieldValue::Bool(true))
            .insert("i8", FieldValue::I8(-5))
            .insert("u8", FieldValue::U8(250))
            .insert("i16", FieldValue::I16(-300))
            .insert("u16", FieldValue::U16(65000))
            .insert("i32", FieldValue::I32(-70000))
            .insert("u32", FieldValue::U32(4_000_000_000))
            .insert("i64", FieldValue::I64(-1 << 40))
            .insert("f32", FieldValue::F32(1.5))
            .insert("f64", FieldValue::F64(-2.25))
            .insert("dec", FieldValue::Decimal(2, 12345))
            .insert("str", FieldValue::LongStr(b"h\xc3\xa9".to_vec()))
            .insert(
                "arr",
                FieldValue::Array(vec![FieldValue::Void, FieldValue::U8(1)]),
            )
            .insert("ts", FieldValue::Timestamp(1_700_000_000))
            .insert(
                "tbl",
                FieldValue::Table(FieldTable(vec![("x".into(), FieldValue::Void)])),
            )
            .insert("void", FieldValue::Void)
            .insert("bytes", FieldValue::Bytes(vec![0, 255]));
        t
    }

    #[test]
    fn every_type_round_trips_byte_exact() {
        let t = every_type();
        let mut out = Vec::new();
        t.write(&mut Put::new(&mut out));
        let back = FieldTable::read(&mut Reader::new(&out)).unwrap();
        assert_eq!(back, t);
        let mut again = Vec::new();
        back.write(&mut Put::new(&mut again));
        assert_eq!(again, out);
        // The `s` letter is RabbitMQ's signed short: 0xfed4 = -300.
        let at = out.windows(4).position(|w| w == b"i16s").unwrap();
        assert_eq!(&out[at + 4..at + 6], &[0xfe, 0xd4]);
    }

    #[test]
    fn hostile_tables_are_errors() {
        // An unknown type letter, a length past the end, and nesting beyond the bound.
        assert_eq!(
            FieldTable::read(&mut Reader::new(b"\0\0\0\x03\x01aZ")),
            Err(CodecError::FieldType(b'Z'))
        );
        assert_eq!(
            FieldTable::read(&mut Reader::new(b"\0\0\xff\xff")),
            Err(CodecError::Truncated)
        );
        let mut deep = FieldValue::Void;
        for _ in 0..(MAX_DEPTH + 2) {
            deep = FieldValue::Array(vec![deep]);
        }
        let mut out = Vec::new();
        FieldTable(vec![("d".into(), deep)]).write(&mut Put::new(&mut out));
        assert_eq!(
            FieldTable::read(&mut Reader::new(&out)),
            Err(CodecError::TooDeep)
        );
    }

    proptest! {
        #[test]
        fn any_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = FieldTable::read(&mut Reader::new(&bytes));
            let _ = FieldTable::read_entries(&bytes, 0);
        }
    }
}
