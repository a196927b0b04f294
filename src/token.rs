//! Keystone Fernet tokens, compatible with Keystone 30.0.0 for every payload
//! version (0 to 10): a [`Keyring`] parsed once per repository state decrypts
//! tokens at millions per second per core, [`payload`] decodes and mints payloads
//! exactly as `keystone/token/token_formatters.py` does, and [`canary`] mints the
//! short-lived tokens the rotator sends to prove a repository works.

mod fernet;
pub mod msgpack;

use std::time::{SystemTime, UNIX_EPOCH};

pub use fernet::{Decrypted, Keyring, Opened, encrypt, encrypt_with};

use crate::repository::Key;

/// Why a token was refused. Keystone answers every variant but
/// [`TokenError::Expired`] with HTTP 404 (401 for the caller's own token).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a Fernet token at all; Keystone says "Could not recognize Fernet token".
    #[error("malformed token ({0}): Could not recognize Fernet token")]
    Malformed(&'static str),
    /// Well-formed, but no key of the repository authenticates it.
    #[error("Could not recognize Fernet token (no key in the repository decrypts it)")]
    Unrecognized,
    /// The repository holds no key (Keystone answers HTTP 500).
    #[error("the key repository holds no key")]
    NoKeys,
}

/// How long a canary stays valid: long enough to cross a slow fan-out, short
/// enough that a leaked canary is worthless.
pub const CANARY_LIFETIME_SECS: u64 = 300;

/// Mints a Keystone-valid unscoped (version 0) token with `key`: a random user
/// id, the `password` method, a random audit id and an expiry
/// [`CANARY_LIFETIME_SECS`] from now. `TokenFormatter.validate_token` accepts it
/// wherever `key` is in the repository.
pub fn canary(key: &Key) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut user = [0u8; 16];
    let mut audit = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut user);
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut audit);
    let mut w = msgpack::Writer::new();
    w.array(5);
    w.uint(0);
    w.array(2);
    w.bool(true);
    w.bin(&user);
    // `password` is bit 2 in Keystone's default `[auth] methods`.
    w.uint(2);
    w.f64((now + CANARY_LIFETIME_SECS) as f64);
    w.array(1);
    w.bin(&audit);
    encrypt(key, &w.into_bytes())
}
