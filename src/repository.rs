//! Keystone Fernet key repositories: the in-memory key set, its digest, and
//! reading a repository from disk exactly the way Keystone 30.0.0's
//! `FernetUtils.load_keys` does (integer file names, empty files skipped, a
//! trailing newline tolerated, highest index = primary, 0 = staged).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use std::os::fd::OwnedFd;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE;
use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use sha2::{Digest as _, Sha256};
use zeroize::{Zeroize, ZeroizeOnDrop};

mod stamp;
pub use stamp::{STAMP_FILE, Stamp, StampError, read_stamp};

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
        hex::encode(self.0)
    }

    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        <[u8; 32]>::try_from(bytes).ok().map(Digest)
    }

    /// Parses 64 hex digits (either case).
    pub fn from_hex(hex: &str) -> Option<Self> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(hex, &mut out).ok()?;
        Some(Digest(out))
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
    #[error(
        "{path}: Keystone reads this file as a key, but its name is not an index fernetd can hold \
         (a negative, huge or non-ASCII number); rename or remove it"
    )]
    UnsupportedName { path: PathBuf },
}

/// Why `rotate` or `init` cannot proceed (where `keystone-manage` would fail too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RotateError {
    #[error("the repository has no keys to rotate")]
    Empty,
    #[error("the repository has no staged key 0 to promote")]
    NoStagedKey,
    #[error("max_active_keys must be at least 1 (Keystone's minimum)")]
    MaxActiveKeys,
    #[error("the primary index cannot grow past {}", u32::MAX)]
    IndexOverflow,
}

/// Decodes a key file's content exactly as Keystone 30 does: the file is read as
/// text (so it must be ASCII to reach `Fernet(key)`), then Python's
/// `base64.urlsafe_b64decode`, which maps `-_` to `+/` and decodes non-strictly:
/// characters outside the alphabet (a trailing newline, spaces) are skipped and
/// input after complete padding is ignored, but missing padding is an error.
pub fn parse_key(content: &[u8]) -> Result<Key, &'static str> {
    if !content.is_ascii() {
        return Err("not ASCII text");
    }
    let mut out = zeroize::Zeroizing::new(Vec::with_capacity(content.len() / 4 * 3 + 3));
    let (mut quad_pos, mut leftchar, mut pads) = (0u8, 0u8, 0u8);
    let mut complete = false;
    for &c in content {
        if c == b'=' {
            if quad_pos >= 2 {
                pads += 1;
                if quad_pos + pads >= 4 {
                    complete = true;
                    break;
                }
            }
            continue;
        }
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => continue,
        };
        pads = 0;
        match quad_pos {
            0 => {
                leftchar = v;
                quad_pos = 1;
            }
            1 => {
                out.push((leftchar << 2) | (v >> 4));
                leftchar = v & 0x0f;
                quad_pos = 2;
            }
            2 => {
                out.push((leftchar << 4) | (v >> 2));
                leftchar = v & 0x03;
                quad_pos = 3;
            }
            _ => {
                out.push((leftchar << 6) | v);
                leftchar = 0;
                quad_pos = 0;
            }
        }
    }
    leftchar.zeroize();
    if !complete && quad_pos == 1 {
        return Err("not url-safe base64 (impossible length)");
    }
    if !complete && quad_pos != 0 {
        return Err("not url-safe base64 (incorrect padding)");
    }
    let bytes: [u8; KEY_LEN] = out
        .as_slice()
        .try_into()
        .map_err(|_| "does not decode to 32 bytes")?;
    Ok(Key(bytes))
}

/// How Keystone reads a file name: Python's `int(filename)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileName {
    /// Not an integer to Python: Keystone ignores the file.
    Ignored,
    /// An integer that fits an index (`"7"`, `"07"`, `" 7"`, `"+7"`, `"0_7"` all give 7).
    Index(u32),
    /// Keystone reads the file as a key, but under a negative or huge index, or a
    /// name with non-ASCII digits; fernetd refuses rather than guess.
    Unsupported,
}

/// Python's `int(name)` for a file name, as Keystone's `_get_key_files` applies it.
pub fn classify_name(name: &std::ffi::OsStr) -> FileName {
    // Python decodes undecodable bytes to surrogates, which int() rejects.
    let Some(name) = name.to_str() else {
        return FileName::Ignored;
    };
    // int() strips Unicode White_Space (measured: unlike str.isspace(), not U+001C..U+001F).
    let trimmed = name.trim_matches(char::is_whitespace);
    let (negative, digits) = match trimmed.as_bytes().first() {
        Some(b'-') => (true, &trimmed[1..]),
        Some(b'+') => (false, &trimmed[1..]),
        _ => (false, trimmed),
    };
    let mut value: u64 = 0;
    let mut overflow = false;
    let mut non_ascii_digit = false;
    let mut after_underscore = true;
    for c in digits.chars() {
        if c == '_' {
            if after_underscore {
                return FileName::Ignored;
            }
            after_underscore = true;
            continue;
        }
        after_underscore = false;
        if let Some(d) = c.to_digit(10).filter(|_| c.is_ascii()) {
            match value
                .checked_mul(10)
                .and_then(|v| v.checked_add(u64::from(d)))
            {
                Some(v) => value = v,
                None => overflow = true,
            }
        } else if !c.is_ascii() && c.is_numeric() {
            // Possibly a Unicode decimal digit, which Python accepts.
            non_ascii_digit = true;
        } else {
            return FileName::Ignored;
        }
    }
    if digits.is_empty() || after_underscore {
        return FileName::Ignored;
    }
    if non_ascii_digit || overflow || (negative && value != 0) {
        return FileName::Unsupported;
    }
    u32::try_from(value).map_or(FileName::Unsupported, FileName::Index)
}

/// The index Keystone gives `name`, when it reads the file as a key at all.
pub fn keystone_index(name: &str) -> Option<u32> {
    match classify_name(std::ffi::OsStr::new(name)) {
        FileName::Index(i) => Some(i),
        _ => None,
    }
}

/// One directory entry as Keystone's `_get_key_files` meets it.
struct Entry {
    path: PathBuf,
    name: String,
    class: FileName,
    /// The content, for regular files (at most [`MAX_KEY_FILE_BYTES`]); an
    /// error for a link under a key's name (never followed).
    content: Option<std::io::Result<zeroize::Zeroizing<Vec<u8>>>>,
}

/// The most a key file may hold: a key is 44 bytes, Keystone tolerates
/// surrounding whitespace; anything this large is no key, and reading a huge
/// file to its end would let whoever can write the repository exhaust memory.
pub const MAX_KEY_FILE_BYTES: u64 = 1024;

/// Reads at most `limit` bytes of `file`; a longer file is an error.
pub(crate) fn read_capped(
    file: std::fs::File,
    limit: u64,
) -> std::io::Result<zeroize::Zeroizing<Vec<u8>>> {
    use std::io::Read as _;
    let mut bytes = zeroize::Zeroizing::new(Vec::with_capacity(64));
    file.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {limit} bytes: not a key file"),
        ));
    }
    Ok(bytes)
}

/// How often a read is retried when the repository was swapped under it.
const SNAPSHOT_ATTEMPTS: usize = 100;

/// Lists `dir` in directory order (as `os.listdir`) and opens every regular file,
/// whatever its name, because Keystone does. The listing and every file are read
/// through one directory handle, and the read is retried when, by its end, the
/// handle no longer names the live repository: the installer swapped a new one in
/// (and may be deleting this one). The installer never changes a directory that
/// is live, so a read that starts and ends on the live directory is a snapshot.
fn scan(dir: &Path) -> std::io::Result<Vec<Entry>> {
    for _ in 0..SNAPSHOT_ATTEMPTS {
        let fd = rustix::fs::open(
            dir,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let entries = scan_fd(dir, &fd)?;
        let read = rustix::fs::fstat(&fd)?;
        let live = rustix::fs::stat(dir)?;
        if (read.st_dev, read.st_ino) == (live.st_dev, live.st_ino) {
            return Ok(entries);
        }
    }
    Err(std::io::Error::other(
        "the repository kept being replaced while it was read",
    ))
}

fn scan_fd(dir: &Path, fd: &OwnedFd) -> std::io::Result<Vec<Entry>> {
    use std::os::unix::ffi::OsStrExt as _;
    let mut entries = Vec::new();
    for entry in rustix::fs::Dir::read_from(fd)? {
        let entry = entry?;
        let raw = entry.file_name().to_bytes();
        if raw == b"." || raw == b".." {
            continue;
        }
        let os_name = std::ffi::OsStr::from_bytes(raw);
        let class = classify_name(os_name);
        // os.path.isfile: a regular file, any error meaning no. Keystone follows
        // links; we never do (the agent may read files Keystone's user cannot):
        // a link where Keystone would read a key is an error, never followed.
        let kind = rustix::fs::statat(fd, entry.file_name(), AtFlags::SYMLINK_NOFOLLOW)
            .map(|st| FileType::from_raw_mode(st.st_mode));
        let content = match kind {
            Ok(FileType::Symlink) if class != FileName::Ignored => Some(Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "a symbolic link where Keystone reads a key: fernetd does not follow links in a repository; replace it with the file",
            ))),
            Ok(FileType::RegularFile) => Some((|| {
                let file = rustix::fs::openat(
                    fd,
                    entry.file_name(),
                    OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW | OFlags::NONBLOCK,
                    Mode::empty(),
                )?;
                read_capped(std::fs::File::from(file), MAX_KEY_FILE_BYTES)
            })()),
            _ => None,
        };
        entries.push(Entry {
            path: dir.join(os_name),
            name: os_name.to_string_lossy().into_owned(),
            class,
            content,
        });
    }
    Ok(entries)
}

/// Reads a repository exactly as Keystone's `FernetUtils.load_keys` and the
/// `Fernet(key)` calls after it: regular files (a symbolic link where Keystone
/// would read a key is an error: Keystone follows it, fernetd does not) whose names
/// Python's `int()` accepts, empty ones skipped, and of two names for one index
/// (`1` and `01`) the later in directory order wins. Where Keystone would fail
/// (an unreadable file, a malformed key) this fails too; an empty repository
/// loads as an empty set, on which Keystone answers HTTP 500. Unlike Keystone,
/// which lists by path and then opens each file by path, the result is always
/// one installed set, never a mix of two (see `scan`).
pub fn load(dir: &Path) -> Result<KeySet, RepositoryError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| RepositoryError::Io { path, source }
    };
    let mut set = KeySet::new();
    for entry in scan(dir).map_err(io(dir))? {
        let Some(content) = entry.content else {
            continue;
        };
        let content = content.map_err(io(&entry.path))?;
        let index = match entry.class {
            FileName::Ignored => continue,
            _ if content.is_empty() => continue,
            FileName::Unsupported => {
                return Err(RepositoryError::UnsupportedName { path: entry.path });
            }
            FileName::Index(i) => i,
        };
        let key = parse_key(&content).map_err(|reason| RepositoryError::MalformedKey {
            path: entry.path.clone(),
            reason,
        })?;
        set.insert(index, key);
    }
    Ok(set)
}

/// `keystone-manage fernet_rotate` on a key set: key 0 becomes the new primary
/// (highest + 1), a fresh key becomes 0, and the lowest indices are purged while
/// more than `max_active_keys` keys remain (the staged key counts).
pub fn rotate(set: &KeySet, max_active_keys: usize) -> Result<KeySet, RotateError> {
    rotate_with(set, max_active_keys, Key::generate())
}

/// [`rotate`] with a given new staged key (Keystone's result for the same random key).
pub fn rotate_with(
    set: &KeySet,
    max_active_keys: usize,
    new_staged: Key,
) -> Result<KeySet, RotateError> {
    rotate_keeping_with(
        set,
        max_active_keys,
        &std::collections::BTreeSet::new(),
        new_staged,
    )
}

/// [`rotate`], except that the keys at `pinned` indices are neither purged nor
/// counted against `max_active_keys`: they are kept *in addition*, outside
/// Keystone's purge order (lowest index first), so a set may hold an old key
/// below newer ones that were purged. The result is still a repository
/// Keystone loads as usual (integer file names, staged 0, highest primary):
/// Keystone decrypts with every key it finds and never looks at the count.
/// A quarantined region's possible signing keys are kept so. With no pins it
/// is exactly [`rotate`].
pub fn rotate_keeping(
    set: &KeySet,
    max_active_keys: usize,
    pinned: &std::collections::BTreeSet<u32>,
) -> Result<KeySet, RotateError> {
    rotate_keeping_with(set, max_active_keys, pinned, Key::generate())
}

/// [`rotate_keeping`] with a given new staged key.
pub fn rotate_keeping_with(
    set: &KeySet,
    max_active_keys: usize,
    pinned: &std::collections::BTreeSet<u32>,
    new_staged: Key,
) -> Result<KeySet, RotateError> {
    if max_active_keys == 0 {
        return Err(RotateError::MaxActiveKeys);
    }
    let primary = set.primary_index().ok_or(RotateError::Empty)?;
    let staged = set.staged().ok_or(RotateError::NoStagedKey)?.clone();
    let new_primary = primary.checked_add(1).ok_or(RotateError::IndexOverflow)?;
    let mut next = set.clone();
    next.remove(0);
    next.insert(new_primary, staged);
    let unpinned = |next: &KeySet| {
        next.indices()
            .into_iter()
            .filter(|i| !pinned.contains(i))
            .collect::<Vec<_>>()
    };
    // Keystone counts the keys it had, not the fresh 0, against
    // max_active_keys - 1, and purges the lowest first; a pinned key is
    // skipped and not counted.
    loop {
        let candidates = unpinned(&next);
        if candidates.len() < max_active_keys {
            break;
        }
        let Some(lowest) = candidates.first().copied() else {
            break;
        };
        next.remove(lowest);
    }
    next.insert(0, new_staged);
    Ok(next)
}

/// `set` without key `index` (a compromised key), still a set Keystone can
/// use: a purged primary is replaced by the staged key (promoted above every
/// index the set held), a purged staged key, or the staged key so promoted,
/// by `new_staged`. `None` when `set` has no key `index`.
pub fn without_key(set: &KeySet, index: u32, new_staged: Key) -> Option<KeySet> {
    set.get(index)?;
    let mut next = set.clone();
    next.remove(index);
    let primary = set.primary_index();
    if index == 0 || Some(index) == primary {
        if Some(index) == primary
            && let Some(staged) = next.remove(0)
        {
            next.insert(index.max(next.primary_index().unwrap_or(0)) + 1, staged);
        }
        next.insert(0, new_staged);
    }
    Some(next)
}

/// `keystone-manage fernet_setup` on an empty repository: a first key is made as
/// 0 and rotated once, so the repository holds 0 (staged) and 1 (primary).
pub fn init(max_active_keys: usize) -> Result<KeySet, RotateError> {
    rotate(&KeySet::from_keys([(0, Key::generate())]), max_active_keys)
}

/// How much a problem matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Keystone fails (HTTP 500, tokens rejected) or the next rotation fails.
    Error,
    /// Keystone works, but the repository is unsafe or not as fernetd left it.
    Warning,
}

/// A problem [`verify`] found. Never contains key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("cannot read the repository: {0}")]
    Unreadable(String),
    #[error("not a directory")]
    NotADirectory,
    #[error("no keys: Keystone answers HTTP 500 to every token request")]
    Empty,
    #[error("{file}: not a valid Fernet key ({reason}): Keystone answers HTTP 500")]
    MalformedKey { file: String, reason: &'static str },
    #[error("{file}: cannot be read ({error}): Keystone fails on it")]
    UnreadableFile { file: String, error: String },
    #[error("{file}: empty key file (a truncated write?); Keystone skips it")]
    EmptyKeyFile { file: String },
    #[error(
        "no staged key 0: the next primary was not distributed in advance, and `keystone-manage fernet_rotate` fails"
    )]
    MissingStagedKey,
    #[error("files {files:?} are all key {index} to Keystone, which uses whichever it lists last")]
    DuplicateIndex { index: u32, files: Vec<String> },
    #[error(
        "{file}: Keystone reads it as a key, under an index fernetd cannot hold (negative, huge or non-ASCII digits)"
    )]
    UnsupportedName { file: String },
    #[error("directory mode {mode:04o} gives access to group or others (want 0700){}", if mode & 0o005 != 0 { "; Keystone warns that it is world readable" } else { "" })]
    DirectoryMode { mode: u32 },
    #[error("{file}: mode {mode:04o} (want 0600)")]
    FileMode { file: String, mode: u32 },
    #[error("{file}: owned by {uid}:{gid}, want {want_uid}:{want_gid}")]
    Owner {
        file: String,
        uid: u32,
        gid: u32,
        want_uid: u32,
        want_gid: u32,
    },
    #[error(
        "stamp says generation {generation} with digest {stamp}, but the keys on disk have digest {actual}: changed outside fernetd"
    )]
    StampMismatch {
        generation: u64,
        stamp: Digest,
        actual: Digest,
    },
    #[error("stamp file: {0}")]
    BadStamp(String),
}

impl Problem {
    pub fn severity(&self) -> Severity {
        match self {
            Problem::DirectoryMode { .. }
            | Problem::FileMode { .. }
            | Problem::Owner { .. }
            | Problem::StampMismatch { .. }
            | Problem::BadStamp(_)
            | Problem::EmptyKeyFile { .. }
            | Problem::DuplicateIndex { .. } => Severity::Warning,
            _ => Severity::Error,
        }
    }

    /// A stable identifier for machine-readable output.
    pub fn code(&self) -> &'static str {
        match self {
            Problem::Unreadable(_) => "unreadable",
            Problem::NotADirectory => "not_a_directory",
            Problem::Empty => "empty",
            Problem::MalformedKey { .. } => "malformed_key",
            Problem::UnreadableFile { .. } => "unreadable_file",
            Problem::EmptyKeyFile { .. } => "empty_key_file",
            Problem::MissingStagedKey => "missing_staged_key",
            Problem::DuplicateIndex { .. } => "duplicate_index",
            Problem::UnsupportedName { .. } => "unsupported_name",
            Problem::DirectoryMode { .. } => "directory_mode",
            Problem::FileMode { .. } => "file_mode",
            Problem::Owner { .. } => "owner",
            Problem::StampMismatch { .. } => "stamp_mismatch",
            Problem::BadStamp(_) => "bad_stamp",
        }
    }
}

/// What [`verify`] found: the keys Keystone would use (when it can use any) and
/// every problem.
#[derive(Debug, Default)]
pub struct Report {
    pub keys: Option<KeySet>,
    pub problems: Vec<Problem>,
}

impl Report {
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Checks a repository for everything Keystone would trip on, and for modes and
/// ownership other than `keystone-manage`'s (0700 directory, 0600 files, one owner:
/// `owner` when given, else the directory's).
pub fn verify(dir: &Path, owner: Option<(u32, u32)>) -> Report {
    use std::os::unix::fs::MetadataExt as _;
    let mut report = Report::default();
    let problems = &mut report.problems;
    let meta = match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => m,
        Ok(_) => {
            problems.push(Problem::NotADirectory);
            return report;
        }
        Err(e) => {
            problems.push(Problem::Unreadable(e.to_string()));
            return report;
        }
    };
    if meta.mode() & 0o077 != 0 {
        problems.push(Problem::DirectoryMode {
            mode: meta.mode() & 0o7777,
        });
    }
    let (want_uid, want_gid) = owner.unwrap_or((meta.uid(), meta.gid()));
    let check_owner = |file: String, m: &std::fs::Metadata, problems: &mut Vec<Problem>| {
        if (m.uid(), m.gid()) != (want_uid, want_gid) {
            problems.push(Problem::Owner {
                file,
                uid: m.uid(),
                gid: m.gid(),
                want_uid,
                want_gid,
            });
        }
    };
    check_owner(".".into(), &meta, problems);
    let entries = match scan(dir) {
        Ok(e) => e,
        Err(e) => {
            problems.push(Problem::Unreadable(e.to_string()));
            return report;
        }
    };
    let mut set = KeySet::new();
    let mut by_index: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    let mut usable = true;
    for entry in &entries {
        let Some(content) = &entry.content else {
            continue;
        };
        let content = match content {
            Ok(c) => c,
            Err(e) => {
                problems.push(Problem::UnreadableFile {
                    file: entry.name.clone(),
                    error: e.to_string(),
                });
                usable = false;
                continue;
            }
        };
        if entry.class == FileName::Ignored {
            continue;
        }
        if let Ok(m) = std::fs::metadata(&entry.path) {
            if m.mode() & 0o7777 != 0o600 {
                problems.push(Problem::FileMode {
                    file: entry.name.clone(),
                    mode: m.mode() & 0o7777,
                });
            }
            check_owner(entry.name.clone(), &m, problems);
        }
        if content.is_empty() {
            problems.push(Problem::EmptyKeyFile {
                file: entry.name.clone(),
            });
            continue;
        }
        let FileName::Index(index) = entry.class else {
            problems.push(Problem::UnsupportedName {
                file: entry.name.clone(),
            });
            usable = false;
            continue;
        };
        by_index.entry(index).or_default().push(entry.name.clone());
        match parse_key(content) {
            Ok(key) => {
                set.insert(index, key);
            }
            Err(reason) => {
                problems.push(Problem::MalformedKey {
                    file: entry.name.clone(),
                    reason,
                });
                usable = false;
            }
        }
    }
    for (index, files) in by_index {
        if files.len() > 1 {
            problems.push(Problem::DuplicateIndex { index, files });
        }
    }
    if usable && set.is_empty() {
        problems.push(Problem::Empty);
    }
    if !by_index_has_zero(&entries) {
        problems.push(Problem::MissingStagedKey);
    }
    match read_stamp(dir) {
        Ok(Some(stamp)) if usable && stamp.digest != set.digest() => {
            problems.push(Problem::StampMismatch {
                generation: stamp.generation,
                stamp: stamp.digest,
                actual: set.digest(),
            })
        }
        Ok(_) => {}
        Err(e) => problems.push(Problem::BadStamp(e.to_string())),
    }
    if usable {
        report.keys = Some(set);
    }
    report
}

/// Whether some non-empty file is key 0 to Keystone.
fn by_index_has_zero(entries: &[Entry]) -> bool {
    entries.iter().any(|e| {
        e.class == FileName::Index(0) && matches!(&e.content, Some(Ok(c)) if !c.is_empty())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> Key {
        Key::from_bytes([n; KEY_LEN])
    }

    #[test]
    fn python_int_file_names() {
        use std::ffi::OsStr;
        let cases: &[(&str, FileName)] = &[
            ("0", FileName::Index(0)),
            ("12", FileName::Index(12)),
            ("012", FileName::Index(12)),
            (" 3\n", FileName::Index(3)),
            ("+3", FileName::Index(3)),
            ("1_0", FileName::Index(10)),
            ("-0", FileName::Index(0)),
            ("\u{85}4\u{3000}", FileName::Index(4)),
            ("\u{1f}4", FileName::Ignored),
            ("-1", FileName::Unsupported),
            ("4294967296", FileName::Unsupported),
            ("\u{0663}", FileName::Unsupported),
            ("1__0", FileName::Ignored),
            ("_1", FileName::Ignored),
            ("1_", FileName::Ignored),
            ("0.tmp", FileName::Ignored),
            (".fernetd-stamp", FileName::Ignored),
            ("", FileName::Ignored),
            ("+", FileName::Ignored),
            ("- 1", FileName::Ignored),
            ("0x1", FileName::Ignored),
        ];
        for (name, want) in cases {
            assert_eq!(classify_name(OsStr::new(name)), *want, "{name:?}");
        }
    }

    #[test]
    fn keys_decode_as_python_urlsafe_b64decode() {
        let k = key(7);
        let b64 = k.to_base64();
        assert_eq!(parse_key(b64.as_bytes()).unwrap(), k);
        assert_eq!(parse_key(format!("{}\n", *b64).as_bytes()).unwrap(), k);
        assert_eq!(parse_key(format!(" {}\r\n", *b64).as_bytes()).unwrap(), k);
        // Data after complete padding is ignored; the standard alphabet is accepted.
        assert_eq!(parse_key(format!("{}garbage", *b64).as_bytes()).unwrap(), k);
        let std_alpha = base64::engine::general_purpose::STANDARD.encode(k.as_bytes());
        assert_eq!(parse_key(std_alpha.as_bytes()).unwrap(), k);
        assert!(parse_key(b64[..43].as_bytes()).is_err(), "missing padding");
        assert!(parse_key(b64[..40].as_bytes()).is_err(), "truncated");
        assert!(
            parse_key(format!("{}é", &b64[..43]).as_bytes()).is_err(),
            "non-ASCII"
        );
        let short = URL_SAFE.encode([1u8; 31]);
        let long = URL_SAFE.encode([1u8; 33]);
        assert_eq!(
            parse_key(short.as_bytes()).unwrap_err(),
            "does not decode to 32 bytes"
        );
        assert_eq!(
            parse_key(long.as_bytes()).unwrap_err(),
            "does not decode to 32 bytes"
        );
        assert!(parse_key(b"!!!!").is_err());
    }

    #[test]
    fn a_purged_key_leaves_a_set_keystone_can_use() {
        let key = |n: u8| Key::from_bytes([n; 32]);
        let set = KeySet::from_keys([(0, key(0)), (3, key(3)), (4, key(4)), (5, key(5))]);
        // A secondary: gone, nothing else moves.
        let next = without_key(&set, 3, key(9)).expect("has 3");
        assert_eq!(next.indices(), vec![0, 4, 5]);
        assert_eq!(next.get(5), set.get(5));
        // The primary: the staged key takes its place above it, a new staged key.
        let next = without_key(&set, 5, key(9)).expect("has 5");
        assert_eq!(next.indices(), vec![0, 3, 4, 6]);
        assert_eq!(next.get(6), set.get(0));
        assert_eq!(next.get(0), Some(&key(9)));
        assert_eq!(next.primary(), set.staged());
        // The staged key: replaced, the primary stays.
        let next = without_key(&set, 0, key(9)).expect("has 0");
        assert_eq!(next.indices(), vec![0, 3, 4, 5]);
        assert_eq!(next.get(0), Some(&key(9)));
        assert_eq!(next.primary(), set.primary());
        // No such key.
        assert!(without_key(&set, 7, key(9)).is_none());
    }

    #[test]
    fn rotation_matches_keystone_manage() {
        let set = KeySet::from_keys([(0, key(0)), (1, key(1))]);
        let r = rotate_with(&set, 3, key(9)).unwrap();
        assert_eq!(r.indices(), vec![0, 1, 2]);
        assert_eq!(r.get(2), Some(&key(0)));
        assert_eq!(r.get(0), Some(&key(9)));
        let r = rotate_with(&r, 3, key(10)).unwrap();
        assert_eq!(r.indices(), vec![0, 2, 3]);
        assert_eq!(r.get(3), Some(&key(9)));
        // max_active_keys 1 leaves only the fresh staged key, as keystone-manage does.
        assert_eq!(rotate_with(&r, 1, key(11)).unwrap().indices(), vec![0]);
        assert_eq!(rotate(&KeySet::new(), 3), Err(RotateError::Empty));
        assert_eq!(
            rotate(&KeySet::from_keys([(1, key(1))]), 3),
            Err(RotateError::NoStagedKey)
        );
        assert_eq!(init(5).unwrap().indices(), vec![0, 1]);
    }

    #[test]
    fn rotate_keeping_keeps_pinned_keys_outside_the_purge_order() {
        use std::collections::BTreeSet;
        let set = KeySet::from_keys([(0, key(0)), (1, key(1)), (2, key(2))]);
        // No pins: Keystone's rotation, byte for byte.
        assert_eq!(
            rotate_keeping_with(&set, 3, &BTreeSet::new(), key(9)).unwrap(),
            rotate_with(&set, 3, key(9)).unwrap()
        );
        // Key 1 pinned: kept through rotations that would purge it, and the
        // unpinned keys still number max_active_keys.
        let pins = BTreeSet::from([1]);
        let mut s = set.clone();
        for round in 0..5u8 {
            s = rotate_keeping_with(&s, 3, &pins, key(10 + round)).unwrap();
            assert!(s.get(1).is_some_and(|k| k == &key(1)), "round {round}");
            let unpinned = s.indices().into_iter().filter(|i| *i != 1).count();
            assert_eq!(unpinned, 3, "round {round}: {:?}", s.indices());
        }
        assert_eq!(s.indices(), vec![0, 1, 6, 7]);
        assert_eq!(s.primary_index(), Some(7));
        // Unpinned again, the next rotation purges it with the other old keys.
        let s = rotate_keeping_with(&s, 3, &BTreeSet::new(), key(20)).unwrap();
        assert_eq!(s.indices(), vec![0, 7, 8]);
        // A pinned primary is kept in addition too (it is not counted).
        let kept = rotate_keeping_with(&set, 3, &BTreeSet::from([2]), key(9)).unwrap();
        assert_eq!(kept.indices(), vec![0, 1, 2, 3]);
    }

    #[test]
    fn load_follows_keystone() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        std::fs::write(d.join("0"), key(0).to_base64().as_bytes()).unwrap();
        std::fs::write(d.join("2"), format!("{}\n", *key(2).to_base64())).unwrap();
        std::fs::write(d.join("3"), b"").unwrap();
        std::fs::write(d.join("0.tmp"), b"junk").unwrap();
        std::fs::create_dir(d.join("5")).unwrap();
        let set = load(d).unwrap();
        assert_eq!(set.indices(), vec![0, 2]);
        // Keystone would follow a link; fernetd refuses it instead.
        std::os::unix::fs::symlink("2", d.join("7")).unwrap();
        match load(d) {
            Err(RepositoryError::Io { path, source }) => {
                assert!(path.ends_with("7"));
                assert!(source.to_string().contains("symbolic link"), "{source}");
            }
            other => panic!("{other:?}"),
        }
        std::fs::remove_file(d.join("7")).unwrap();
        // A link under a name Keystone ignores is ignored too.
        std::os::unix::fs::symlink("2", d.join("7.tmp")).unwrap();
        assert_eq!(load(d).unwrap().indices(), vec![0, 2]);
        // A huge file is refused after the cap, not read to its end.
        std::fs::write(d.join("9"), vec![b'A'; 1 << 20]).unwrap();
        match load(d) {
            Err(RepositoryError::Io { path, source }) => {
                assert!(path.ends_with("9"));
                assert!(source.to_string().contains("larger than"), "{source}");
            }
            other => panic!("{other:?}"),
        }
        std::fs::remove_file(d.join("9")).unwrap();
        std::fs::write(d.join("4"), &key(4).to_base64()[..40]).unwrap();
        assert!(matches!(load(d), Err(RepositoryError::MalformedKey { .. })));
        std::fs::remove_file(d.join("4")).unwrap();
        std::fs::write(d.join("-1"), key(4).to_base64().as_bytes()).unwrap();
        assert!(matches!(
            load(d),
            Err(RepositoryError::UnsupportedName { .. })
        ));
    }

    #[test]
    fn verify_names_each_problem() {
        use std::os::unix::fs::PermissionsExt as _;
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("r");
        std::fs::create_dir(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
        let codes = |r: &Report| r.problems.iter().map(Problem::code).collect::<Vec<_>>();
        assert_eq!(
            codes(&verify(&d, None)),
            vec!["empty", "missing_staged_key"]
        );
        let write = |name: &str, content: &[u8]| {
            std::fs::write(d.join(name), content).unwrap();
            std::fs::set_permissions(d.join(name), std::fs::Permissions::from_mode(0o600)).unwrap();
        };
        write("0", key(0).to_base64().as_bytes());
        write("1", key(1).to_base64().as_bytes());
        let r = verify(&d, None);
        assert!(r.is_ok(), "{:?}", r.problems);
        assert_eq!(r.keys.unwrap().indices(), vec![0, 1]);
        write("01", key(1).to_base64().as_bytes());
        write("2", key(2).to_base64()[..43].as_bytes());
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        let r = verify(&d, None);
        let mut c = codes(&r);
        c.sort_unstable();
        assert_eq!(
            c,
            vec!["directory_mode", "duplicate_index", "malformed_key"]
        );
        assert!(r.keys.is_none());
    }
}
