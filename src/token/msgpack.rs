//! The subset of MessagePack that Keystone token payloads use (arrays, integers,
//! floats, booleans, nil, str and bin), read without allocating and written the
//! way Python's `msgpack.packb` (use_bin_type=True) writes it. Maps and
//! extension types never occur in Keystone payloads and are refused.

/// Why a document could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MsgpackError {
    #[error("msgpack document ends early")]
    Truncated,
    #[error("msgpack document has data after its value")]
    ExtraData,
    #[error("msgpack map or extension type (never in a Keystone payload)")]
    Unsupported,
}

/// One msgpack item; arrays give only their length, their elements follow.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Item<'a> {
    Nil,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(&'a [u8]),
    Bin(&'a [u8]),
    Array(usize),
}

/// What [`scan`] learned about a whole document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scan {
    /// A str item is not valid UTF-8: Python's `unpackb(raw=False)` raises
    /// `UnicodeDecodeError` and Keystone retries with `raw=True`.
    pub invalid_utf8: bool,
}

/// Checks that `buf` holds exactly one well-formed document, as `msgpack.unpackb`
/// does before Keystone looks at any field.
pub fn scan(buf: &[u8]) -> Result<Scan, MsgpackError> {
    let mut r = Reader::new(buf);
    let mut invalid_utf8 = false;
    // Items still to read, whatever their nesting: structure needs no stack.
    let mut pending = 1usize;
    while pending > 0 {
        pending -= 1;
        match r.item()? {
            Item::Str(s) => invalid_utf8 |= std::str::from_utf8(s).is_err(),
            Item::Array(n) => pending = pending.checked_add(n).ok_or(MsgpackError::Truncated)?,
            _ => {}
        }
    }
    if r.is_at_end() {
        Ok(Scan { invalid_utf8 })
    } else {
        Err(MsgpackError::ExtraData)
    }
}

/// Reads items in order from a document.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub fn is_at_end(&self) -> bool {
        self.pos == self.buf.len()
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], MsgpackError> {
        let end = self.pos.checked_add(n).ok_or(MsgpackError::Truncated)?;
        let s = self.buf.get(self.pos..end).ok_or(MsgpackError::Truncated)?;
        self.pos = end;
        Ok(s)
    }

    fn be<const N: usize>(&mut self) -> Result<[u8; N], MsgpackError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn len(&mut self, width: usize) -> Result<usize, MsgpackError> {
        Ok(match width {
            1 => self.be::<1>()?[0] as usize,
            2 => u16::from_be_bytes(self.be()?) as usize,
            _ => u32::from_be_bytes(self.be()?) as usize,
        })
    }

    /// The next item.
    pub fn item(&mut self) -> Result<Item<'a>, MsgpackError> {
        let tag = self.be::<1>()?[0];
        Ok(match tag {
            0x00..=0x7f => Item::Int(tag.into()),
            0x90..=0x9f => Item::Array((tag & 0x0f).into()),
            0xa0..=0xbf => Item::Str(self.take((tag & 0x1f).into())?),
            0xc0 => Item::Nil,
            0xc2 => Item::Bool(false),
            0xc3 => Item::Bool(true),
            0xc4..=0xc6 => {
                let n = self.len(1 << (tag - 0xc4))?;
                Item::Bin(self.take(n)?)
            }
            0xca => Item::Float(f32::from_be_bytes(self.be()?).into()),
            0xcb => Item::Float(f64::from_be_bytes(self.be()?)),
            0xcc => Item::Int(u8::from_be_bytes(self.be()?).into()),
            0xcd => Item::Int(u16::from_be_bytes(self.be()?).into()),
            0xce => Item::Int(u32::from_be_bytes(self.be()?).into()),
            0xcf => Item::Int(u64::from_be_bytes(self.be()?).into()),
            0xd0 => Item::Int(i8::from_be_bytes(self.be()?).into()),
            0xd1 => Item::Int(i16::from_be_bytes(self.be()?).into()),
            0xd2 => Item::Int(i32::from_be_bytes(self.be()?).into()),
            0xd3 => Item::Int(i64::from_be_bytes(self.be()?).into()),
            0xd9..=0xdb => {
                let n = self.len(1 << (tag - 0xd9))?;
                Item::Str(self.take(n)?)
            }
            0xdc => Item::Array(self.len(2)?),
            0xdd => Item::Array(self.len(4)?),
            0xe0..=0xff => Item::Int((tag as i8).into()),
            // 0xc1 is never used; maps and extensions are refused.
            _ => return Err(MsgpackError::Unsupported),
        })
    }
}

/// Builds a MessagePack document in the smallest encodings, as `msgpack.packb` does.
#[derive(Debug, Default)]
pub struct Writer {
    out: Vec<u8>,
}

impl Writer {
    pub fn new() -> Self {
        Writer {
            out: Vec::with_capacity(128),
        }
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.out
    }

    pub fn nil(&mut self) {
        self.out.push(0xc0);
    }

    pub fn bool(&mut self, v: bool) {
        self.out.push(if v { 0xc3 } else { 0xc2 });
    }

    pub fn uint(&mut self, v: u64) {
        if v < 0x80 {
            self.out.push(v as u8);
        } else if v <= u8::MAX.into() {
            self.out.extend_from_slice(&[0xcc, v as u8]);
        } else if v <= u16::MAX.into() {
            self.out.push(0xcd);
            self.out.extend_from_slice(&(v as u16).to_be_bytes());
        } else if v <= u32::MAX.into() {
            self.out.push(0xce);
            self.out.extend_from_slice(&(v as u32).to_be_bytes());
        } else {
            self.out.push(0xcf);
            self.out.extend_from_slice(&v.to_be_bytes());
        }
    }

    pub fn int(&mut self, v: i64) {
        if v >= 0 {
            self.uint(v as u64);
        } else if v >= -32 {
            self.out.push(v as i8 as u8);
        } else if v >= i8::MIN.into() {
            self.out.extend_from_slice(&[0xd0, v as i8 as u8]);
        } else if v >= i16::MIN.into() {
            self.out.push(0xd1);
            self.out.extend_from_slice(&(v as i16).to_be_bytes());
        } else if v >= i32::MIN.into() {
            self.out.push(0xd2);
            self.out.extend_from_slice(&(v as i32).to_be_bytes());
        } else {
            self.out.push(0xd3);
            self.out.extend_from_slice(&v.to_be_bytes());
        }
    }

    pub fn f64(&mut self, v: f64) {
        self.out.push(0xcb);
        self.out.extend_from_slice(&v.to_bits().to_be_bytes());
    }

    pub fn str(&mut self, s: &str) {
        let n = s.len();
        if n < 32 {
            self.out.push(0xa0 | n as u8);
        } else {
            self.len_header(n, 0xd9, 0xda, 0xdb);
        }
        self.out.extend_from_slice(s.as_bytes());
    }

    /// A msgpack<1.0 style raw string holding arbitrary bytes (use_bin_type=False).
    pub fn raw(&mut self, b: &[u8]) {
        let n = b.len();
        if n < 32 {
            self.out.push(0xa0 | n as u8);
        } else {
            self.len_header(n, 0xd9, 0xda, 0xdb);
        }
        self.out.extend_from_slice(b);
    }

    pub fn bin(&mut self, b: &[u8]) {
        self.len_header(b.len(), 0xc4, 0xc5, 0xc6);
        self.out.extend_from_slice(b);
    }

    pub fn array(&mut self, n: usize) {
        if n < 16 {
            self.out.push(0x90 | n as u8);
        } else if n <= u16::MAX.into() {
            self.out.push(0xdc);
            self.out.extend_from_slice(&(n as u16).to_be_bytes());
        } else {
            self.out.push(0xdd);
            self.out.extend_from_slice(&(n as u32).to_be_bytes());
        }
    }

    fn len_header(&mut self, n: usize, m8: u8, m16: u8, m32: u8) {
        if n <= u8::MAX.into() {
            self.out.extend_from_slice(&[m8, n as u8]);
        } else if n <= u16::MAX.into() {
            self.out.push(m16);
            self.out.extend_from_slice(&(n as u16).to_be_bytes());
        } else {
            self.out.push(m32);
            self.out.extend_from_slice(&(n as u32).to_be_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_width() {
        let mut w = Writer::new();
        let ints = [
            0i64,
            1,
            127,
            128,
            255,
            256,
            65535,
            65536,
            1 << 40,
            -1,
            -32,
            -33,
            -128,
            -129,
            -40000,
            -(1 << 40),
        ];
        w.array(ints.len() + 5);
        for i in ints {
            w.int(i);
        }
        w.uint(u64::MAX);
        w.f64(1.5);
        w.str(&"x".repeat(40));
        w.bin(&[7u8; 300]);
        w.nil();
        let doc = w.into_bytes();
        assert_eq!(
            scan(&doc),
            Ok(Scan {
                invalid_utf8: false
            })
        );
        let mut r = Reader::new(&doc);
        assert_eq!(r.item(), Ok(Item::Array(ints.len() + 5)));
        for i in ints {
            assert_eq!(r.item(), Ok(Item::Int(i.into())));
        }
        assert_eq!(r.item(), Ok(Item::Int(u64::MAX.into())));
        assert_eq!(r.item(), Ok(Item::Float(1.5)));
        assert_eq!(r.item(), Ok(Item::Str("x".repeat(40).as_bytes())));
        assert_eq!(r.item(), Ok(Item::Bin(&[7u8; 300][..])));
        assert_eq!(r.item(), Ok(Item::Nil));
        assert!(r.is_at_end());
    }

    #[test]
    fn scan_refuses_what_unpackb_refuses() {
        assert_eq!(scan(&[0x92, 0x01]), Err(MsgpackError::Truncated));
        assert_eq!(scan(&[0x01, 0x01]), Err(MsgpackError::ExtraData));
        assert_eq!(scan(&[0x80]), Err(MsgpackError::Unsupported));
        assert_eq!(scan(&[0x91; 20]), Err(MsgpackError::Truncated));
        assert_eq!(scan(&[0xa1, 0xff]), Ok(Scan { invalid_utf8: true }));
        assert_eq!(scan(&[]), Err(MsgpackError::Truncated));
    }
}
