//! Fuzzes the token decoder at both layers: arbitrary input as token text
//! (base64, Fernet framing, HMAC), and arbitrary input as the plaintext of a
//! token the keys accept (msgpack and Keystone payload decoding).
#![no_main]

use fernetd::repository::{Key, KeySet};
use fernetd::token::{self, Keyring, PayloadConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let key = Key::from_bytes([7; 32]);
    let ring = Keyring::new(&KeySet::from_keys([(0, Key::from_bytes([1; 32])), (1, key.clone())]));
    let config = PayloadConfig::default();
    let _ = ring.inspect(&String::from_utf8_lossy(data), &config);
    let authenticated = token::encrypt_with(&key, data, 1_800_000_000, [0; 16]);
    let _ = ring.validate(&authenticated, &config, 1_800_000_000);
});
