//! Keystone Fernet key repositories: the in-memory key set, its digest, and
//! reading a repository from disk exactly the way Keystone 30.0.0's
//! `FernetUtils.load_keys` does (integer file names, empty files skipped, a
//! trailing newline tolerated, highest index = primary, 0 = staged).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE;
use sha2::{Digest as _, Sha256};
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Length of a Fernet key: 16 bytes signing key, 16 bytes encryption key.
pub const KEY_LEN: usize = 32;

/// One Fernet key. Its bytes never reach `Debug`, logs or errors, and are wiped
/// when dropped.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct Key([u8; KEY_LEN]);

impl Key {
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Key(bytes)
    }

    /// A fresh key from the operating system's CSPRNG.
    pub fn generate() -> Self {
        let mut bytes = [0u8; KEY_LEN];
        // The OS generator, as Keystone's os.urandom; it only fails on a broken kernel.
        rand::RngCore::fill_bytes(
            &mut rand::TryRngCore::unwrap_err(rand::rngs::OsRng),
            &mut bytes,
        );
        Key(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// The first half signs (HMAC-SHA256).
    pub fn signing_key(&self) -> &[u8] {
        &self.0[..16]
    }

    /// The second half encrypts (AES-128-CBC).
    pub fn encryption_key(&self) -> &[u8] {
        &self.0[16..]
    }

    /// The file content Keystone expects: url-safe base64, 44 characters, no newline.
    pub fn to_base64(&self) -> zeroize::Zeroizing<String> {
        zeroize::Zeroizing::new(URL_SAFE.encode(self.0))
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

/// The role Keystone gives a key by its index within a repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Index 0: the next primary; decrypts but never encrypts.
    Staged,
    /// The highest index: encrypts new tokens.
    Primary,
    /// Every other index: decrypts tokens made by earlier primaries.
    Secondary,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Staged => "staged",
            Role::Primary => "primary",
            Role::Secondary => "secondary",
        })
    }
}

/// SHA-256 identifying a key set; see [`KeySet::digest`].
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        <[u8; 32]>::try_from(bytes).ok().map(Digest)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.to_hex())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// A complete set of keys by index, as one state of a repository.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct KeySet {
    keys: BTreeMap<u32, Key>,
}

impl fmt::Debug for KeySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeySet")
            .field("indices", &self.indices())
            .field("digest", &self.digest())
            .finish()
    }
}

impl KeySet {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn from_keys(keys: impl IntoIterator<Item = (u32, Key)>) -> Self {
        KeySet {
            keys: keys.into_iter().collect(),
        }
    }

    pub fn insert(&mut self, index: u32, key: Key) -> Option<Key> {
        self.keys.insert(index, key)
    }

    pub fn remove(&mut self, index: u32) -> Option<Key> {
        self.keys.remove(&index)
    }

    pub fn get(&self, index: u32) -> Option<&Key> {
        self.keys.get(&index)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Indices in ascending order.
    pub fn indices(&self) -> Vec<u32> {
        self.keys.keys().copied().collect()
    }

    /// Keys in ascending index order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (u32, &Key)> + ExactSizeIterator {
        self.keys.iter().map(|(i, k)| (*i, k))
    }

    /// Keys in the order Keystone tries them: primary first, then descending.
    pub fn keystone_order(&self) -> impl Iterator<Item = (u32, &Key)> {
        self.iter().rev()
    }

    pub fn primary_index(&self) -> Option<u32> {
        self.keys.keys().next_back().copied()
    }

    pub fn primary(&self) -> Option<&Key> {
        self.keys.values().next_back()
    }

    pub fn staged(&self) -> Option<&Key> {
        self.keys.get(&0)
    }

    /// Keystone's role for `index`, or `None` when the set has no such key.
    pub fn role(&self, index: u32) -> Option<Role> {
        if !self.keys.contains_key(&index) {
            None
        } else if index == 0 {
            Some(Role::Staged)
        } else if Some(index) == self.primary_index() {
            Some(Role::Primary)
        } else {
            Some(Role::Secondary)
        }
    }

    /// SHA-256 over the (index, key) pairs in ascending index order, each pair
    /// encoded as the index in 8 big-endian bytes followed by the 32 raw key bytes.
    pub fn digest(&self) -> Digest {
        let mut h = Sha256::new();
        for (index, key) in self.iter() {
            h.update(u64::from(index).to_be_bytes());
            h.update(key.as_bytes());
        }
        Digest(h.finalize().into())
    }
}

/// What went wrong reading a repository.
#[derive(Debug, thiserror::Error)]
pub enum RepositoryError {
    #[error("cannot read key repository {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("key file {path} is not a valid Fernet key: {reason} (Keystone answers HTTP 500)")]
    MalformedKey { path: PathBuf, reason: &'static str },
}

/// Decodes a key file's content the way Keystone's `Fernet(key)` does, after
/// Keystone tolerated a trailing newline.
pub fn parse_key(content: &[u8]) -> Result<Key, &'static str> {
    let trimmed = content.strip_suffix(b"\n").unwrap_or(content);
    let mut decoded = zeroize::Zeroizing::new(
        URL_SAFE
            .decode(trimmed)
            .map_err(|_| "not url-safe base64")?,
    );
    if decoded.len() != KEY_LEN {
        return Err("does not decode to 32 bytes");
    }
    let mut bytes = [0u8; KEY_LEN];
    bytes.copy_from_slice(&decoded);
    decoded.zeroize();
    Ok(Key(bytes))
}

/// Reads a repository the way Keystone does: regular files with integer names,
/// empty ones skipped, everything else ignored.
pub fn load(dir: &Path) -> Result<KeySet, RepositoryError> {
    let io = |source| RepositoryError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut set = KeySet::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let Some(index) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let path = entry.path();
        if !path.is_file() {
            continue;
        }
        let content = zeroize::Zeroizing::new(std::fs::read(&path).map_err(io)?);
        if content.is_empty() {
            continue;
        }
        let key =
            parse_key(&content).map_err(|reason| RepositoryError::MalformedKey { path, reason })?;
        set.insert(index, key);
    }
    Ok(set)
}
