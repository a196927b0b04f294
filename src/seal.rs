//! Sealing of key material at rest: AES-256-GCM (ring, the crypto provider
//! rustls already uses) under a 32-byte seal key read from a file holding its
//! base64 text. The rotator seals its state file with it when `seal_key` is
//! configured, so a copy of the state directory (a backup, a stolen disk) holds
//! no Fernet key in the clear. Each sealed blob is bound to what it holds (the
//! associated data names the purpose and the repository), so a blob moved to
//! another place fails to open instead of being taken for the right one.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use zeroize::Zeroizing;

/// How a sealed blob starts: the format and version, then base64 of nonce,
/// ciphertext and tag.
const PREFIX: &str = "fernetd-sealed-v1:";

/// Why a seal key cannot be loaded or a blob cannot be opened. Never carries
/// the key or the plaintext.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("cannot read the seal key {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the seal key {path} is readable by others (mode {mode:o}): make it mode 0600 (chmod 600)"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error(
        "the seal key {path} must hold the base64 text of 32 random bytes (head -c 32 /dev/urandom | base64)"
    )]
    Malformed { path: PathBuf },
    #[error("sealed data for {context} is malformed")]
    Corrupt { context: String },
    #[error(
        "sealed data for {context} does not open with this seal key (another key, or tampered data)"
    )]
    Open { context: String },
    #[error("no randomness for a nonce")]
    Random,
}

impl SealError {
    /// Whether the operator's configuration is at fault (the key file).
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            SealError::Read { .. } | SealError::Permissions { .. } | SealError::Malformed { .. }
        )
    }
}

/// The 32-byte seal key, zeroized when dropped; its `Debug` shows nothing.
pub struct SealKey {
    bytes: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealKey(..)")
    }
}

impl SealKey {
    /// Reads the key file: base64 of exactly 32 bytes, surrounding whitespace
    /// ignored, mode 0600 or stricter (a key others can read is refused).
    pub fn load(path: &Path) -> Result<SealKey, SealError> {
        use std::os::unix::fs::PermissionsExt as _;
        let read = |source| SealError::Read {
            path: path.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(read)?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(SealError::Permissions {
                path: path.to_path_buf(),
                mode,
            });
        }
        let text = Zeroizing::new(std::fs::read(path).map_err(read)?);
        let malformed = || SealError::Malformed {
            path: path.to_path_buf(),
        };
        let trimmed = text.trim_ascii();
        let decoded = Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(trimmed)
                .map_err(|_| malformed())?,
        );
        let mut bytes = Zeroizing::new([0u8; 32]);
        if decoded.len() != bytes.len() {
            return Err(malformed());
        }
        bytes.copy_from_slice(&decoded);
        Ok(SealKey { bytes })
    }

    /// A key from raw bytes (tests, and callers that derive one).
    pub fn from_bytes(bytes: [u8; 32]) -> SealKey {
        SealKey {
            bytes: Zeroizing::new(bytes),
        }
    }

    fn aead(&self) -> LessSafeKey {
        // 32 bytes is AES-256's key length: this cannot fail.
        let unbound = UnboundKey::new(&AES_256_GCM, self.bytes.as_slice())
            .unwrap_or_else(|_| unreachable!("AES-256 takes a 32-byte key"));
        LessSafeKey::new(unbound)
    }

    /// Seals `plaintext` for `context` (bound as associated data): a random
    /// 96-bit nonce per blob, which at one blob per rotation stays far below
    /// AES-GCM's limit for random nonces.
    pub fn seal(&self, context: &str, plaintext: &[u8]) -> Result<String, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom(&mut nonce)?;
        let mut buffer = Zeroizing::new(Vec::with_capacity(NONCE_LEN + plaintext.len() + 16));
        buffer.extend_from_slice(&nonce);
        buffer.extend_from_slice(plaintext);
        let mut body = buffer.split_off(NONCE_LEN);
        self.aead()
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(context.as_bytes()),
                &mut body,
            )
            .map_err(|_| SealError::Random)?;
        buffer.extend_from_slice(&body);
        let mut out = String::from(PREFIX);
        base64::engine::general_purpose::STANDARD.encode_string(buffer.as_slice(), &mut out);
        Ok(out)
    }

    /// Opens a blob made by [`SealKey::seal`] for the same `context`.
    pub fn open(&self, context: &str, sealed: &str) -> Result<Zeroizing<Vec<u8>>, SealError> {
        let malformed = || SealError::Corrupt {
            context: context.to_owned(),
        };
        let body = sealed.trim().strip_prefix(PREFIX).ok_or_else(malformed)?;
        let mut raw = Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(body)
                .map_err(|_| malformed())?,
        );
        if raw.len() < NONCE_LEN + AES_256_GCM.tag_len() {
            return Err(malformed());
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&raw[..NONCE_LEN]);
        let mut body = Zeroizing::new(raw.split_off(NONCE_LEN));
        let plain = self
            .aead()
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(context.as_bytes()),
                &mut body,
            )
            .map_err(|_| SealError::Open {
                context: context.to_owned(),
            })?;
        Ok(Zeroizing::new(plain.to_vec()))
    }
}

/// Whether `text` is a sealed blob (so a reader can tell sealed from clear).
pub fn is_sealed(text: &str) -> bool {
    text.trim_start().starts_with(PREFIX)
}

fn getrandom(out: &mut [u8]) -> Result<(), SealError> {
    use ring::rand::SecureRandom as _;
    ring::rand::SystemRandom::new()
        .fill(out)
        .map_err(|_| SealError::Random)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn key_file(dir: &Path, text: &str, mode: u32) -> PathBuf {
        let path = dir.join("seal.key");
        std::fs::write(&path, text).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        path
    }

    #[test]
    fn a_sealed_blob_opens_only_with_its_key_and_context() {
        let key = SealKey::from_bytes([7; 32]);
        let sealed = key.seal("state/tokens", b"secret keys").expect("seal");
        assert!(is_sealed(&sealed));
        assert!(!sealed.contains("secret"));
        assert_eq!(
            key.open("state/tokens", &sealed).expect("open").as_slice(),
            b"secret keys"
        );
        // A fresh nonce each time.
        assert_ne!(
            sealed,
            key.seal("state/tokens", b"secret keys").expect("seal")
        );
        assert!(matches!(
            key.open("state/receipts", &sealed),
            Err(SealError::Open { .. })
        ));
        let other = SealKey::from_bytes([8; 32]);
        assert!(matches!(
            other.open("state/tokens", &sealed),
            Err(SealError::Open { .. })
        ));
        let mut tampered = sealed.clone();
        tampered.pop();
        tampered.push(if sealed.ends_with('A') { 'B' } else { 'A' });
        assert!(key.open("state/tokens", &tampered).is_err());
        assert!(matches!(
            key.open("state/tokens", "no prefix"),
            Err(SealError::Corrupt { .. })
        ));
    }

    #[test]
    fn the_key_file_must_be_private_and_hold_32_bytes_and_is_never_shown() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = base64::engine::general_purpose::STANDARD.encode([9u8; 32]);
        let path = key_file(dir.path(), &format!("{text}\n"), 0o600);
        let key = SealKey::load(&path).expect("load");
        assert_eq!(format!("{key:?}"), "SealKey(..)");
        let path = key_file(dir.path(), &text, 0o644);
        let e = SealKey::load(&path).expect_err("readable by others");
        assert!(matches!(e, SealError::Permissions { mode: 0o644, .. }) && e.is_config());
        let short = base64::engine::general_purpose::STANDARD.encode([9u8; 16]);
        let path = key_file(dir.path(), &short, 0o600);
        let e = SealKey::load(&path).expect_err("16 bytes");
        assert!(matches!(e, SealError::Malformed { .. }));
        assert!(!format!("{e} {e:?}").contains(&short));
        let e = SealKey::load(&dir.path().join("missing")).expect_err("missing");
        assert!(matches!(e, SealError::Read { .. }));
    }
}
