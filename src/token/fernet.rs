//! The Fernet layer of Keystone tokens, tuned for validating millions of tokens
//! per second: keys are expanded once into a [`Keyring`] (HMAC-SHA256 inner and
//! outer states, AES-128 decryption key schedules), base64 is decoded into a
//! stack buffer with exactly the leniency of Python's `base64.urlsafe_b64decode`
//! that Keystone relies on, and each key costs one HMAC over the token body; only
//! the key whose HMAC matches runs one CBC decryption. Keys are tried in
//! Keystone's order unless a guess (see [`super::order`]) names the likely key
//! first; a guess only saves HMACs and never changes the verdict.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use aes::cipher::block_padding::Pkcs7;
use aes::cipher::inout::InOutBuf;
use aes::cipher::{BlockDecrypt, BlockEncryptMut, KeyInit, KeyIvInit};
use aes::{Aes128, Aes128Dec};
use base64::Engine as _;
use sha2::digest::generic_array::GenericArray;
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::repository::{Key, KeySet, Role};

use super::TokenError;
use super::order::{Learned, Promotions};

/// The version byte every Fernet token starts with.
const VERSION: u8 = 0x80;
/// Version byte, 64-bit timestamp, 128-bit IV.
const HEADER_LEN: usize = 1 + 8 + 16;
const MAC_LEN: usize = 32;
const BLOCK: usize = 16;
/// Tokens up to about 680 base64 characters (far above Keystone's own
/// 255-character limit) are decoded and decrypted without touching the heap.
const STACK_BUF: usize = 1024;

/// The SHA-256 chaining states of HMAC's inner and outer hashes after their one
/// key block: HMAC of a token body then costs only the body's own blocks plus one
/// outer block.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
struct MacKey {
    inner: [u32; 8],
    outer: [u32; 8],
}

const SHA256_IV: [u32; 8] = [
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
];

fn compress(state: &mut [u32; 8], block: &[u8; 64]) {
    sha2::compress256(state, &[*GenericArray::from_slice(block)]);
}

impl MacKey {
    fn new(signing_key: &[u8]) -> Self {
        // Fernet signing keys are 16 bytes, below SHA-256's block: no pre-hash.
        let mut ipad = [0x36u8; 64];
        let mut opad = [0x5cu8; 64];
        for (i, b) in signing_key.iter().enumerate().take(64) {
            ipad[i] ^= b;
            opad[i] ^= b;
        }
        let mut inner = SHA256_IV;
        let mut outer = SHA256_IV;
        compress(&mut inner, &ipad);
        compress(&mut outer, &opad);
        ipad.zeroize();
        opad.zeroize();
        MacKey { inner, outer }
    }

    /// HMAC-SHA256 of `msg` under this key.
    fn mac(&self, msg: &[u8]) -> [u8; 32] {
        let mut state = self.inner;
        let mut blocks = msg.chunks_exact(64);
        for block in &mut blocks {
            sha2::compress256(&mut state, &[*GenericArray::from_slice(block)]);
        }
        let rest = blocks.remainder();
        // 64 bytes of key block precede the message.
        let bits = ((64 + msg.len()) as u64) * 8;
        let mut tail = [0u8; 128];
        tail[..rest.len()].copy_from_slice(rest);
        tail[rest.len()] = 0x80;
        let tail_len = if rest.len() < 56 { 64 } else { 128 };
        tail[tail_len - 8..tail_len].copy_from_slice(&bits.to_be_bytes());
        for block in tail[..tail_len].chunks_exact(64) {
            sha2::compress256(&mut state, &[*GenericArray::from_slice(block)]);
        }

        let mut outer_block = [0u8; 64];
        for (i, word) in state.iter().enumerate() {
            outer_block[i * 4..i * 4 + 4].copy_from_slice(&word.to_be_bytes());
        }
        outer_block[32] = 0x80;
        outer_block[56..].copy_from_slice(&((64u64 + 32) * 8).to_be_bytes());
        let mut outer = self.outer;
        compress(&mut outer, &outer_block);
        let mut out = [0u8; 32];
        for (i, word) in outer.iter().enumerate() {
            out[i * 4..i * 4 + 4].copy_from_slice(&word.to_be_bytes());
        }
        out
    }
}

/// One key of a repository, expanded for validation.
struct RingKey {
    index: u32,
    role: Role,
    mac: MacKey,
    // Zeroized on drop by the `aes` crate's `zeroize` feature.
    cipher: Aes128Dec,
    /// The position, in Keystone's order, of the first key with this key's
    /// signing key (usually its own). A guess starts there: every key before it
    /// has another signing key, so it could only authenticate the token by an
    /// HMAC collision, and the key Keystone reports stays the one we report.
    canonical: usize,
}

/// A repository's keys, parsed once, in the order Keystone tries them (primary
/// first, then descending index). Holds derived key material: no `Debug` beyond
/// indices, wiped when dropped.
pub struct Keyring {
    keys: Vec<RingKey>,
    /// When each key became primary, from the repository's stamp.
    promotions: Promotions,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field(
                "indices",
                &self.keys.iter().map(|k| k.index).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// A token the keyring authenticated and decrypted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decrypted {
    /// The repository index of the first key (in Keystone's order) that decrypted it.
    pub key_index: u32,
    pub role: Role,
    /// The Fernet timestamp: when the token was issued, in seconds since the epoch.
    pub issued_at: u64,
    /// The msgpack payload.
    pub plaintext: Vec<u8>,
}

/// Which key opened a token, and when the token says it was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    pub key_index: u32,
    pub role: Role,
    pub issued_at: u64,
}

impl Keyring {
    /// Expands every key of `set`. An empty set gives a keyring that recognizes
    /// nothing (Keystone answers HTTP 500 for an empty repository).
    pub fn new(set: &KeySet) -> Self {
        Self::with_promotions(set, &BTreeMap::new())
    }

    /// [`Keyring::new`], knowing when each key became primary (a stamp's
    /// `promoted`, key index to Unix seconds): a token is first tried with the
    /// key that was primary when it was issued. Wrong or unknown times cost
    /// HMACs, never a different answer.
    pub fn with_promotions(set: &KeySet, promoted: &BTreeMap<u32, i64>) -> Self {
        let ordered: Vec<(u32, &Key)> = set.keystone_order().collect();
        let keys = ordered
            .iter()
            .map(|&(index, key)| RingKey {
                index,
                role: set.role(index).unwrap_or(Role::Secondary),
                mac: MacKey::new(key.signing_key()),
                cipher: Aes128Dec::new(GenericArray::from_slice(key.encryption_key())),
                canonical: ordered
                    .iter()
                    .position(|(_, other)| other.signing_key() == key.signing_key())
                    .unwrap_or(0),
            })
            .collect();
        Keyring {
            keys,
            promotions: Promotions::new(promoted),
        }
    }

    /// Where a guess for the key with repository index `index` starts, if the
    /// ring holds that key.
    fn guess_position(&self, index: u32) -> Option<usize> {
        self.keys
            .iter()
            .find(|k| k.index == index)
            .map(|k| k.canonical)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Authenticates and decrypts `token` as Keystone's `MultiFernet.decrypt`
    /// (no TTL) does, returning the plaintext.
    pub fn decrypt(&self, token: &str) -> Result<Decrypted, TokenError> {
        self.open(token, |opened, plaintext| Decrypted {
            key_index: opened.key_index,
            role: opened.role,
            issued_at: opened.issued_at,
            plaintext: plaintext.to_vec(),
        })
    }

    /// Authenticates and decrypts `token`, handing the plaintext to `f` while it
    /// still lives in a stack buffer: the allocation-free path for validation.
    pub fn open<R>(
        &self,
        token: &str,
        f: impl FnOnce(Opened, &[u8]) -> R,
    ) -> Result<R, TokenError> {
        self.open_learning(token, None, f)
    }

    /// [`Keyring::open`], guessing the key from the stamp's promotion times and
    /// from the keys that opened earlier tokens (`learned`, which this token
    /// then teaches). The answer is the same as without guesses.
    pub fn open_learning<R>(
        &self,
        token: &str,
        learned: Option<&mut Learned>,
        f: impl FnOnce(Opened, &[u8]) -> R,
    ) -> Result<R, TokenError> {
        if self.keys.is_empty() {
            return Err(TokenError::NoKeys);
        }
        // The decoded token and the plaintext side by side.
        let need = 2 * decoded_capacity(token.len());
        if need <= STACK_BUF {
            let mut buf = [0u8; STACK_BUF];
            self.open_in(token, &mut buf, learned, f)
        } else {
            let mut buf = vec![0u8; need];
            self.open_in(token, &mut buf, learned, f)
        }
    }

    fn open_in<R>(
        &self,
        token: &str,
        buf: &mut [u8],
        learned: Option<&mut Learned>,
        f: impl FnOnce(Opened, &[u8]) -> R,
    ) -> Result<R, TokenError> {
        let len = decode_keystone_base64(token, buf)?;
        let (data, scratch) = buf.split_at_mut(len);
        let data = &*data;
        if data.first() != Some(&VERSION) {
            return Err(TokenError::Malformed(
                "does not start with the Fernet version byte 0x80",
            ));
        }
        if data.len() < HEADER_LEN + BLOCK + MAC_LEN
            || (data.len() - HEADER_LEN - MAC_LEN) % BLOCK != 0
        {
            // cryptography gets here only after some HMAC failed, with the same answer.
            return Err(TokenError::Malformed("wrong length for a Fernet token"));
        }
        let (body, tag) = data.split_at(data.len() - MAC_LEN);
        let mut issued = [0u8; 8];
        issued.copy_from_slice(&body[1..9]);
        let issued_at = u64::from_be_bytes(issued);
        let iv = &body[9..HEADER_LEN];
        let ciphertext = &body[HEADER_LEN..];
        let plain = &mut scratch[..ciphertext.len()];
        let opens = |key: &RingKey, plain: &mut [u8]| {
            // cryptography rejects bad padding after a good HMAC as InvalidToken,
            // and MultiFernet then tries the next key.
            if tags_equal(&key.mac.mac(body), tag) {
                cbc_decrypt(&key.cipher, iv, ciphertext, plain)
            } else {
                None
            }
        };
        // At most two guesses: the key primary at the issue time by the stamp,
        // then the key that opened tokens of about that time. A guess that fails
        // is a key Keystone's order would also have failed on, so it is skipped
        // below; the verdict is the one of Keystone's order.
        let by_stamp = self.promotions.primary_at(issued_at);
        let by_batch = learned.as_deref().and_then(|l| l.guess(issued_at));
        let mut tried = [usize::MAX; 2];
        let found = [by_stamp, by_batch]
            .into_iter()
            .enumerate()
            .find_map(|(i, guess)| {
                let at = self.guess_position(guess?)?;
                if tried.contains(&at) {
                    return None;
                }
                tried[i] = at;
                opens(&self.keys[at], plain).map(|n| (at, n))
            })
            .or_else(|| {
                self.keys
                    .iter()
                    .enumerate()
                    .filter(|(at, _)| !tried.contains(at))
                    .find_map(|(at, key)| opens(key, plain).map(|n| (at, n)))
            });
        let Some((at, n)) = found else {
            return Err(TokenError::Unrecognized);
        };
        let key = &self.keys[at];
        if let Some(l) = learned {
            l.record(key.index, issued_at);
        }
        let opened = Opened {
            key_index: key.index,
            role: key.role,
            issued_at,
        };
        Ok(f(opened, &plain[..n]))
    }
}

/// Compares HMAC tags in constant time: the differences are OR-ed together
/// without branching, and only the total goes through `subtle`'s optimisation
/// barrier (once, rather than once per byte).
fn tags_equal(mac: &[u8; MAC_LEN], tag: &[u8]) -> bool {
    let mut diff = 0u8;
    for (a, b) in mac.iter().zip(tag) {
        diff |= a ^ b;
    }
    tag.len() == MAC_LEN && bool::from(diff.ct_eq(&0))
}

/// AES-128-CBC decryption with PKCS#7 unpadding; `None` on bad padding.
fn cbc_decrypt(cipher: &Aes128Dec, iv: &[u8], ciphertext: &[u8], out: &mut [u8]) -> Option<usize> {
    let buf = InOutBuf::new(ciphertext, out).ok()?;
    let (blocks, _) = buf.into_chunks::<aes::cipher::consts::U16>();
    cipher.decrypt_blocks_inout(blocks);
    // Each block is XORed with the ciphertext block before it (the IV first),
    // written as two straight loops the compiler vectorises.
    let (first, rest) = out.split_at_mut(BLOCK.min(out.len()));
    for (b, v) in first.iter_mut().zip(iv) {
        *b ^= v;
    }
    for (b, c) in rest.iter_mut().zip(ciphertext) {
        *b ^= c;
    }
    let pad = *out.last()? as usize;
    if pad == 0 || pad > BLOCK || pad > out.len() {
        return None;
    }
    if out[out.len() - pad..].iter().any(|&b| b as usize != pad) {
        return None;
    }
    Some(out.len() - pad)
}

/// The largest number of bytes `decode_keystone_base64` can write for a token of
/// `len` characters.
fn decoded_capacity(len: usize) -> usize {
    len / 4 * 3 + 3
}

/// Base64 alphabet value of each byte, both alphabets at once (Python translates
/// `-_` to `+/` and leaves `+/` alone); `PAD` for `=`, `SKIP` for everything else.
const PAD: u8 = 0xfe;
const SKIP: u8 = 0xff;
static DECODE: [u8; 256] = {
    let mut t = [SKIP; 256];
    let mut i = 0;
    while i < 26 {
        t[b'A' as usize + i] = i as u8;
        t[b'a' as usize + i] = 26 + i as u8;
        i += 1;
    }
    let mut d = 0;
    while d < 10 {
        t[b'0' as usize + d] = 52 + d as u8;
        d += 1;
    }
    t[b'+' as usize] = 62;
    t[b'-' as usize] = 62;
    t[b'/' as usize] = 63;
    t[b'_' as usize] = 63;
    t[b'=' as usize] = PAD;
    t
};

/// Decodes a token exactly as Keystone does: `restore_padding` (append `=` up to
/// a multiple of 4 characters), then Python's `urlsafe_b64decode`.
/// Returns the number of bytes written to `out`.
pub(crate) fn decode_keystone_base64(token: &str, out: &mut [u8]) -> Result<usize, TokenError> {
    let input = token.as_bytes();
    // Fast path: the base64 crate's decoder, configured to accept exactly what
    // Python accepts for strings of url-safe characters with canonical or no
    // padding (Keystone's own form). Anything it refuses gets the faithful
    // emulation below, which gives the same bytes or Python's error.
    if let Ok(n) = KEYSTONE_FORM.decode_slice(input, out) {
        return Ok(n);
    }
    // Keystone counts characters, not bytes, when restoring padding.
    let chars = if input.is_ascii() {
        input.len()
    } else {
        token.chars().count()
    };
    a2b_base64(input, (4 - chars % 4) % 4, out)
}

/// Url-safe base64, padding optional, unused trailing bits ignored (Python never
/// checks them).
const KEYSTONE_FORM: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

/// Python's non-strict `base64.urlsafe_b64decode` of `s` into `out` (which needs
/// `s.len() / 4 * 3 + 3` bytes), returning the decoded length.
pub fn urlsafe_b64decode(s: &[u8], out: &mut [u8]) -> Result<usize, TokenError> {
    a2b_base64(s, 0, out)
}

/// CPython's `binascii.a2b_base64` with strict_mode=0 over `input` followed by
/// `extra_pads` `=` characters: characters outside the alphabet are skipped,
/// decoding stops at the first complete pad sequence, stray `=` are ignored and
/// the unused trailing bits are never checked.
fn a2b_base64(input: &[u8], extra_pads: usize, out: &mut [u8]) -> Result<usize, TokenError> {
    let mut n = 0;
    let mut i = 0;
    // Fast path: whole quads of alphabet characters.
    while i + 4 <= input.len() && n + 3 <= out.len() {
        let a = DECODE[input[i] as usize];
        let b = DECODE[input[i + 1] as usize];
        let c = DECODE[input[i + 2] as usize];
        let d = DECODE[input[i + 3] as usize];
        if (a | b | c | d) >= 64 {
            break;
        }
        out[n] = (a << 2) | (b >> 4);
        out[n + 1] = (b << 4) | (c >> 2);
        out[n + 2] = (c << 6) | d;
        n += 3;
        i += 4;
    }

    let mut quad_pos = 0u8;
    let mut pads = 0u8;
    let mut left = 0u8;
    let rest = input[i..]
        .iter()
        .copied()
        .chain(std::iter::repeat_n(b'=', extra_pads));
    for ch in rest {
        let v = DECODE[ch as usize];
        if v == PAD {
            if quad_pos >= 2 {
                pads += 1;
                if quad_pos + pads >= 4 {
                    return Ok(n);
                }
            }
            continue;
        }
        if v == SKIP {
            continue;
        }
        pads = 0;
        let byte = match quad_pos {
            0 => {
                left = v;
                quad_pos = 1;
                continue;
            }
            1 => {
                let b = (left << 2) | (v >> 4);
                left = v & 0x0f;
                quad_pos = 2;
                b
            }
            2 => {
                let b = (left << 4) | (v >> 2);
                left = v & 0x03;
                quad_pos = 3;
                b
            }
            _ => {
                quad_pos = 0;
                (left << 6) | v
            }
        };
        *out.get_mut(n).ok_or(TokenError::Malformed("too long"))? = byte;
        n += 1;
    }
    match quad_pos {
        0 => Ok(n),
        1 => Err(TokenError::Malformed(
            "base64 length is 1 more than a multiple of 4",
        )),
        _ => Err(TokenError::Malformed("incorrect base64 padding")),
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Encrypts `plaintext` into a Fernet token in Keystone's form (url-safe base64
/// with the `=` padding stripped), timestamped now, with a random IV.
pub fn encrypt(key: &Key, plaintext: &[u8]) -> String {
    let mut iv = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut iv);
    encrypt_with(key, plaintext, now_secs(), iv)
}

/// [`encrypt`] with a chosen timestamp and IV, for reproducible tests.
pub fn encrypt_with(key: &Key, plaintext: &[u8], timestamp: u64, iv: [u8; 16]) -> String {
    let padded = (plaintext.len() / BLOCK + 1) * BLOCK;
    let mut data = Vec::with_capacity(HEADER_LEN + padded + MAC_LEN);
    data.push(VERSION);
    data.extend_from_slice(&timestamp.to_be_bytes());
    data.extend_from_slice(&iv);
    let start = data.len();
    data.extend_from_slice(plaintext);
    data.resize(start + padded, 0);
    let enc = cbc::Encryptor::<Aes128>::new(
        GenericArray::from_slice(key.encryption_key()),
        GenericArray::from_slice(&iv),
    );
    // The buffer was sized for PKCS#7 above, so padding always fits.
    let written = enc
        .encrypt_padded_mut::<Pkcs7>(&mut data[start..], plaintext.len())
        .map(|c| c.len())
        .unwrap_or(0);
    debug_assert_eq!(written, padded);
    let tag = MacKey::new(key.signing_key()).mac(&data);
    data.extend_from_slice(&tag);
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hmac::Mac as _;

    fn key(seed: u8) -> Key {
        let mut b = [0u8; 32];
        for (i, x) in b.iter_mut().enumerate() {
            *x = seed.wrapping_mul(31).wrapping_add(i as u8);
        }
        Key::from_bytes(b)
    }

    #[test]
    fn mac_matches_hmac_crate() {
        let k = key(7);
        let mk = MacKey::new(k.signing_key());
        for len in 0..300 {
            let msg: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let mut h =
                <hmac::Hmac<sha2::Sha256> as hmac::Mac>::new_from_slice(k.signing_key()).unwrap();
            h.update(&msg);
            assert_eq!(mk.mac(&msg)[..], h.finalize().into_bytes()[..], "len {len}");
        }
    }

    #[test]
    fn fernet_crate_reads_ours_and_we_read_its() {
        let k = key(3);
        let fkey = fernet::Fernet::new(&k.to_base64()).unwrap();
        let ring = Keyring::new(&KeySet::from_keys([
            (0, key(9)),
            (1, k.clone()),
            (2, key(4)),
        ]));
        for len in [0usize, 1, 15, 16, 17, 100, 255] {
            let msg: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let ours = encrypt(&k, &msg);
            assert!(!ours.contains('='));
            assert_eq!(fkey.decrypt(&ours).unwrap(), msg);
            let theirs = fkey.encrypt(&msg);
            let d = ring.decrypt(&theirs).unwrap();
            assert_eq!(d.plaintext, msg);
            assert_eq!((d.key_index, d.role), (1, Role::Secondary));
            let d = ring.decrypt(theirs.trim_end_matches('=')).unwrap();
            assert_eq!(d.plaintext, msg);
        }
    }

    #[test]
    fn unknown_key_is_unrecognized() {
        let ring = Keyring::new(&KeySet::from_keys([(0, key(1)), (1, key(2))]));
        let t = encrypt(&key(5), b"x");
        assert_eq!(ring.decrypt(&t), Err(TokenError::Unrecognized));
        assert_eq!(
            Keyring::new(&KeySet::new()).decrypt(&t),
            Err(TokenError::NoKeys)
        );
    }

    #[test]
    fn base64_follows_python() {
        let mut out = [0u8; 64];
        let mut dec = |s: &str| decode_keystone_base64(s, &mut out).map(|n| out[..n].to_vec());
        assert_eq!(dec("AAEC").unwrap(), vec![0, 1, 2]);
        assert_eq!(dec("AAE").unwrap(), vec![0, 1]);
        assert_eq!(dec("AAE=").unwrap(), vec![0, 1]);
        assert_eq!(dec("AA").unwrap(), vec![0]);
        assert!(dec("AAECA").is_err());
        assert_eq!(dec("-_-_").unwrap(), dec("+/+/").unwrap());
        assert_eq!(dec("A A\nEC").unwrap(), vec![0, 1, 2]);
        // Stops at the first complete pad sequence.
        assert_eq!(dec("AA==AAEC").unwrap(), vec![0]);
        assert_eq!(dec("").unwrap(), Vec::<u8>::new());
    }

    proptest::proptest! {
        /// The crate fast path gives what the emulation of Python gives.
        #[test]
        fn fast_path_agrees_with_emulation_on_any_input(s in "[A-Za-z0-9_=+/ -]{0,40}") {
            let mut a = [0u8; 64];
            let mut b = [0u8; 64];
            let chars = s.chars().count();
            let fast = decode_keystone_base64(&s, &mut a).map(|n| a[..n].to_vec());
            let slow = a2b_base64(s.as_bytes(), (4 - chars % 4) % 4, &mut b).map(|n| b[..n].to_vec());
            proptest::prop_assert_eq!(fast, slow);
        }
    }

    #[test]
    fn fast_path_agrees_with_emulation() {
        let samples = [
            "",
            "A",
            "AA",
            "AAA",
            "AAAA",
            "AAE=",
            "AA==",
            "AB==",
            "AAB",
            "-_8",
            "gAAAAABrDCGz",
            "ab=c",
            "abc==",
        ];
        for s in samples
            .iter()
            .map(|s| s.to_string())
            .chain((0..200u32).map(|i| {
                let chars = b"AZaz09-_=+/ ";
                (0..(i % 13))
                    .map(|j| chars[((i * 7 + j * 13) % chars.len() as u32) as usize] as char)
                    .collect()
            }))
        {
            let mut a = [0u8; 64];
            let mut b = [0u8; 64];
            let chars = s.chars().count();
            let fast = decode_keystone_base64(&s, &mut a).map(|n| a[..n].to_vec());
            let slow =
                a2b_base64(s.as_bytes(), (4 - chars % 4) % 4, &mut b).map(|n| b[..n].to_vec());
            assert_eq!(fast.is_ok(), slow.is_ok(), "{s:?}");
            if let (Ok(f), Ok(s2)) = (&fast, &slow) {
                assert_eq!(f, s2, "{s:?}");
            }
        }
    }
}
