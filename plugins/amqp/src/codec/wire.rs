//! The primitive types of AMQP 0-9-1 (§4.2.5): integers in network byte order, short strings
//! (a length octet, at most 255 bytes) and long strings (a 32-bit length), and the packing of
//! consecutive bit fields into octets.
//!
//! A [`Reader`] never panics and never allocates more than the bytes it was given: every
//! length is checked against what is left before anything is taken.

use super::CodecError;

/// Reads primitive values from a frame payload.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    /// Bits left of the octet the last `bit` read from, and that octet.
    bits: Option<(u8, u8)>,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, bits: None }
    }

    /// Bytes not read yet.
    pub fn rest(&self) -> &'a [u8] {
        self.buf
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn take(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        self.bits = None;
        if n > self.buf.len() {
            return Err(CodecError::Truncated);
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], CodecError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    pub fn u8(&mut self) -> Result<u8, CodecError> {
        Ok(self.array::<1>()?[0])
    }
    pub fn u16(&mut self) -> Result<u16, CodecError> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    pub fn u32(&mut self) -> Result<u32, CodecError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    pub fn u64(&mut self) -> Result<u64, CodecError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// A bit field: consecutive bits share an octet, least significant bit first (§4.2.5.2).
    pub fn bit(&mut self) -> Result<bool, CodecError> {
        let (octet, used) = match self.bits {
            Some((octet, used)) if used < 8 => (octet, used),
            _ => {
                let octet = self.u8()?;
                (octet, 0)
            }
        };
        self.bits = Some((octet, used + 1));
        Ok(octet & (1 << used) != 0)
    }

    /// A short string: UTF-8 is not checked here (names are checked where they are used).
    pub fn shortstr_bytes(&mut self) -> Result<&'a [u8], CodecError> {
        let n = self.u8()?;
        self.take(usize::from(n))
    }

    pub fn shortstr(&mut self) -> Result<String, CodecError> {
        let bytes = self.shortstr_bytes()?;
        String::from_utf8(bytes.to_vec()).map_err(|_| CodecError::NotUtf8)
    }

    pub fn longstr(&mut self) -> Result<&'a [u8], CodecError> {
        let n = self.u32()?;
        self.take(usize::try_from(n).map_err(|_| CodecError::Truncated)?)
    }
}

/// Appends primitive values to a buffer; bits are packed as [`Reader::bit`] reads them.
pub struct Put<'a> {
    out: &'a mut Vec<u8>,
    /// Index of the octet the last bits went into, and how many it holds.
    bits: Option<(usize, u8)>,
}

impl<'a> Put<'a> {
    pub fn new(out: &'a mut Vec<u8>) -> Self {
        Put { out, bits: None }
    }
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.bits = None;
        self.out.push(v);
        self
    }
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.bits = None;
        self.out.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.bits = None;
        self.out.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.bits = None;
        self.out.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn bit(&mut self, v: bool) -> &mut Self {
        let (at, used) = match self.bits {
            Some((at, used)) if used < 8 => (at, used),
            _ => {
                self.out.push(0);
                (self.out.len() - 1, 0)
            }
        };
        if v {
            if let Some(octet) = self.out.get_mut(at) {
                *octet |= 1 << used;
            }
        }
        self.bits = Some((at, used + 1));
        self
    }
    /// A short string; longer than 255 bytes is cut at 255 (callers keep names short).
    pub fn shortstr(&mut self, s: &str) -> &mut Self {
        self.shortstr_bytes(s.as_bytes())
    }
    pub fn shortstr_bytes(&mut self, s: &[u8]) -> &mut Self {
        let s = &s[..s.len().min(255)];
        self.u8(s.len() as u8);
        self.out.extend_from_slice(s);
        self
    }
    pub fn longstr(&mut self, s: &[u8]) -> &mut Self {
        self.u32(u32::try_from(s.len()).unwrap_or(u32::MAX));
        self.out.extend_from_slice(s);
        self
    }
    pub fn raw(&mut self, s: &[u8]) -> &mut Self {
        self.bits = None;
        self.out.extend_from_slice(s);
        self
    }
    pub fn buf(&mut self) -> &mut Vec<u8> {
        self.bits = None;
        self.out
    }
}
