//! The subset of MessagePack that Keystone token payloads use (arrays, integers,
//! floats, booleans, nil, str and bin), read without allocating and written the
//! way Python's `msgpack.packb` (use_bin_type=True) writes it.

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
