//! The rotator's durable state. Per repository one file `<name>.state` (mode
//! 0600) holding the committed generation, its digest and its keys; one file
//! `agents.json` holding what each agent last acknowledged. Every write is a
//! temporary file, fsync, rename over the old one, fsync of the directory, so a
//! crash leaves the old or the new state, never a torn one. A generation is
//! written here before it is sent to any agent: what an agent may hold is always
//! on disk, so after a crash the rotator resumes from it and a generation number
//! can never come back with other keys. Beside each state file, `<name>.ledger.json`
//! holds the key ledger (when each key was created, promoted and demoted).
//! With a seal key ([`StateStore::with_seal`]) the state file holds its
//! content sealed (`crate::seal`): `fernetd-rotator-state 1 sealed`, then one
//! sealed blob bound to the repository's name. A clear state file found with a
//! seal key configured is read and sealed at once.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::ledger::Ledger;
use crate::repository::{self, KeySet};

const MAGIC: &str = "fernetd-rotator-state 1";
/// The first line of a sealed state file.
const MAGIC_SEALED: &str = "fernetd-rotator-state 1 sealed";
const ACKS_FILE: &str = "agents.json";

/// What went wrong reading or writing the state directory. Never carries keys.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot access state {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state file {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("invalid repository name `{0}`: use 1 to 64 letters, digits, `-` and `_`")]
    BadName(String),
    #[error("another rotator is using the state directory {0} (it holds its lock)")]
    Locked(PathBuf),
    #[error("state file {path} is sealed, but no `seal_key` is configured")]
    SealedWithoutKey { path: PathBuf },
    #[error("state file {path} cannot be unsealed or sealed")]
    Seal {
        path: PathBuf,
        #[source]
        source: crate::seal::SealError,
    },
}

/// One committed generation of a repository.
#[derive(Debug, Clone)]
pub struct Committed {
    pub generation: u64,
    pub keys: KeySet,
}

/// What an agent last acknowledged for one repository.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckRecord {
    pub generation: u64,
    /// Hex digest of the acknowledged set.
    pub digest: String,
    /// Unix time (ms) of the acknowledgement.
    pub unix_ms: i64,
}

/// Acknowledgements by repository, then by region.
pub type Acks = BTreeMap<String, BTreeMap<String, AckRecord>>;

/// Refuses a repository name that could not be a file name in the state
/// directory (or could escape it).
pub fn check_name(name: &str) -> Result<(), StateError> {
    if crate::config::is_repository_name(name) {
        Ok(())
    } else {
        Err(StateError::BadName(name.to_owned()))
    }
}

fn state_path(dir: &Path, name: &str) -> Result<PathBuf, StateError> {
    check_name(name)?;
    Ok(dir.join(format!("{name}.state")))
}

/// Whether `dir` certainly holds no committed generation of `name`, found
/// without creating or locking anything: the rotator checks what a first start
/// will import before it opens (and so creates) its state. When the answer is
/// unknown (an unreadable directory) this says `false`, and opening the state
/// reports the real problem.
pub fn is_fresh(dir: &Path, name: &str) -> Result<bool, StateError> {
    Ok(matches!(state_path(dir, name)?.try_exists(), Ok(false)))
}

/// The state directory, locked (flock) for as long as a copy of this value
/// lives: two rotators on one state would fork generations.
#[derive(Debug, Clone)]
pub struct StateStore {
    dir: PathBuf,
    _lock: std::sync::Arc<File>,
    seal: Option<std::sync::Arc<crate::seal::SealKey>>,
}

impl StateStore {
    /// Opens (creating with mode 0700 when missing) the state directory.
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        let io = |source| StateError::Io {
            path: dir.to_path_buf(),
            source,
        };
        if !dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io)?;
        }
        let meta = fs::metadata(dir).map_err(io)?;
        if !meta.is_dir() {
            return Err(io(std::io::Error::other("not a directory")));
        }
        let lock_path = dir.join("lock");
        let lock = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|source| StateError::Io {
                path: lock_path,
                source,
            })?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive)
            .map_err(|_| StateError::Locked(dir.to_path_buf()))?;
        clean_temporaries(dir)?;
        Ok(StateStore {
            dir: dir.to_path_buf(),
            _lock: std::sync::Arc::new(lock),
            seal: None,
        })
    }

    /// Seals every state file written from now on with `key`, and opens sealed
    /// ones with it.
    pub fn with_seal(mut self, key: std::sync::Arc<crate::seal::SealKey>) -> Self {
        self.seal = Some(key);
        self
    }

    /// What a sealed state blob of `name` is bound to.
    fn seal_context(name: &str) -> String {
        format!("fernetd state file: {name}")
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn repository_path(&self, name: &str) -> Result<PathBuf, StateError> {
        state_path(&self.dir, name)
    }

    fn ledger_path(&self, name: &str) -> Result<PathBuf, StateError> {
        check_name(name)?;
        Ok(self.dir.join(format!("{name}.ledger.json")))
    }

    /// The key ledger of `name`, or `None` when none was recorded yet (a first
    /// start, or state written before the ledger existed).
    pub fn load_ledger(&self, name: &str) -> Result<Option<Ledger>, StateError> {
        let path = self.ledger_path(name)?;
        let content = match fs::read(&path) {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StateError::Io { path, source }),
        };
        serde_json::from_slice(&content)
            .map(Some)
            .map_err(|e| StateError::Corrupt {
                path,
                reason: e.to_string(),
            })
    }

    /// Durably records the key ledger of `name` (times only, no key).
    pub fn save_ledger(&self, name: &str, ledger: &Ledger) -> Result<(), StateError> {
        let path = self.ledger_path(name)?;
        // Plain numbers and maps always serialize.
        let text = serde_json::to_vec_pretty(ledger).unwrap_or_default();
        write_atomic(&self.dir, &path, &text)
    }

    /// The JSON record `<name>.<kind>.json` (a credential migrate's outcome),
    /// or `None` when none was written yet.
    pub fn load_record<T: serde::de::DeserializeOwned>(
        &self,
        name: &str,
        kind: &str,
    ) -> Result<Option<T>, StateError> {
        check_name(name)?;
        let path = self.dir.join(format!("{name}.{kind}.json"));
        match fs::read(&path) {
            Ok(c) => serde_json::from_slice(&c)
                .map(Some)
                .map_err(|e| StateError::Corrupt {
                    path,
                    reason: e.to_string(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StateError::Io { path, source }),
        }
    }

    /// Durably writes the JSON record `<name>.<kind>.json` (no key material).
    pub fn save_record<T: Serialize>(
        &self,
        name: &str,
        kind: &str,
        record: &T,
    ) -> Result<(), StateError> {
        check_name(name)?;
        let path = self.dir.join(format!("{name}.{kind}.json"));
        let json = serde_json::to_vec_pretty(record).map_err(|e| StateError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        write_atomic(&self.dir, &path, &json)
    }

    /// The committed generation of `name`, or `None` before the first commit.
    pub fn load(&self, name: &str) -> Result<Option<Committed>, StateError> {
        let path = self.repository_path(name)?;
        let content = match fs::read(&path) {
            Ok(c) => Zeroizing::new(c),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StateError::Io { path, source }),
        };
        let sealed_prefix = format!("{MAGIC_SEALED}\n");
        if let Some(blob) = content.strip_prefix(sealed_prefix.as_bytes()) {
            let Some(key) = &self.seal else {
                return Err(StateError::SealedWithoutKey { path });
            };
            let blob = std::str::from_utf8(blob).map_err(|_| StateError::Corrupt {
                path: path.clone(),
                reason: "sealed content is not UTF-8".into(),
            })?;
            let clear = key
                .open(&Self::seal_context(name), blob)
                .map_err(|source| StateError::Seal {
                    path: path.clone(),
                    source,
                })?;
            return parse_state(&clear, name)
                .map(Some)
                .map_err(|reason| StateError::Corrupt { path, reason });
        }
        let committed =
            parse_state(&content, name).map_err(|reason| StateError::Corrupt { path, reason })?;
        if self.seal.is_some() {
            // A seal key was configured since this was written: no key stays
            // in the clear a moment longer than this start.
            self.save(name, &committed)?;
            tracing::info!(repository = %name, "sealed the state file with the configured seal key");
        }
        Ok(Some(committed))
    }

    /// Durably records `committed` as the current generation of `name`.
    pub fn save(&self, name: &str, committed: &Committed) -> Result<(), StateError> {
        let path = self.repository_path(name)?;
        let text = encode_state(name, committed);
        match &self.seal {
            None => write_atomic(&self.dir, &path, text.as_bytes()),
            Some(key) => {
                let blob = key
                    .seal(&Self::seal_context(name), text.as_bytes())
                    .map_err(|source| StateError::Seal {
                        path: path.clone(),
                        source,
                    })?;
                let sealed = format!("{MAGIC_SEALED}\n{blob}\n");
                write_atomic(&self.dir, &path, sealed.as_bytes())
            }
        }
    }

    /// The acknowledgements recorded by [`StateStore::save_acks`]; empty when none.
    pub fn load_acks(&self) -> Result<Acks, StateError> {
        let path = self.dir.join(ACKS_FILE);
        match fs::read(&path) {
            Ok(c) => serde_json::from_slice(&c).map_err(|e| StateError::Corrupt {
                path,
                reason: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Acks::new()),
            Err(source) => Err(StateError::Io { path, source }),
        }
    }

    /// Records acknowledgements. They only speed up a restart (the rotator reads
    /// every agent's state back anyway), so they are written lazily.
    pub fn save_acks(&self, acks: &Acks) -> Result<(), StateError> {
        let path = self.dir.join(ACKS_FILE);
        let json = serde_json::to_vec_pretty(acks).map_err(|e| StateError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        write_atomic(&self.dir, &path, &json)
    }
}

/// The clear text of a state file (the content that is sealed, when sealing).
pub(crate) fn encode_state(name: &str, committed: &Committed) -> Zeroizing<String> {
    let mut text = Zeroizing::new(String::with_capacity(128 + 60 * committed.keys.len()));
    text.push_str(MAGIC);
    text.push('\n');
    text.push_str(&format!("repository {name}\n"));
    text.push_str(&format!("generation {}\n", committed.generation));
    text.push_str(&format!("digest {}\n", committed.keys.digest()));
    for (index, key) in committed.keys.iter() {
        text.push_str("key ");
        text.push_str(&index.to_string());
        text.push(' ');
        text.push_str(&key.to_base64());
        text.push('\n');
    }
    text
}

/// Reads the clear text [`encode_state`] writes.
pub(crate) fn parse_state(content: &[u8], name: &str) -> Result<Committed, String> {
    let text = std::str::from_utf8(content).map_err(|_| "not UTF-8".to_owned())?;
    let mut lines = text.lines();
    if lines.next() != Some(MAGIC) {
        return Err(format!("does not start with `{MAGIC}`"));
    }
    let mut generation = None;
    let mut digest = None;
    let mut keys = KeySet::new();
    for (n, line) in lines.enumerate() {
        let lineno = n + 2;
        let mut fields = line.splitn(3, ' ');
        match (fields.next(), fields.next(), fields.next()) {
            (Some("repository"), Some(r), None) if r == name => {}
            (Some("repository"), Some(r), None) => {
                return Err(format!(
                    "line {lineno}: holds repository `{r}`, expected `{name}`"
                ));
            }
            (Some("generation"), Some(g), None) => {
                generation = Some(
                    g.parse::<u64>()
                        .map_err(|_| format!("line {lineno}: bad generation"))?,
                );
            }
            (Some("digest"), Some(d), None) => digest = Some(d.to_owned()),
            (Some("key"), Some(i), Some(k)) => {
                let index = i
                    .parse::<u32>()
                    .map_err(|_| format!("line {lineno}: bad key index"))?;
                // The reason names the defect, never the content.
                let key = repository::parse_key(k.as_bytes())
                    .map_err(|r| format!("line {lineno}: key {index} {r}"))?;
                if keys.insert(index, key).is_some() {
                    return Err(format!("line {lineno}: key {index} appears twice"));
                }
            }
            _ => return Err(format!("line {lineno}: unrecognised")),
        }
    }
    let generation = generation.ok_or("no generation")?;
    let digest = digest.ok_or("no digest")?;
    if keys.staged().is_none() || keys.len() < 2 {
        return Err("fewer than two keys, or no staged key 0".into());
    }
    let actual = keys.digest();
    if actual.to_hex() != digest {
        return Err(format!("keys hash to {actual}, the file says {digest}"));
    }
    Ok(Committed { generation, keys })
}

/// Marks the temporary files of [`write_atomic`]: `.<name>.tmp-<unique>`.
const TMP_MARK: &str = ".tmp-";

/// Removes temporary files a crash left behind. Called with the directory lock
/// held, so no writer of ours is running.
fn clean_temporaries(dir: &Path) -> Result<(), StateError> {
    let io = |source| StateError::Io {
        path: dir.to_path_buf(),
        source,
    };
    for entry in fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') && name.contains(TMP_MARK) {
            match fs::remove_file(entry.path()) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(StateError::Io {
                        path: entry.path(),
                        source,
                    });
                }
            }
        }
    }
    Ok(())
}

/// Temporary file (0600, exclusive, a name no other writer uses), write,
/// fsync, rename, fsync directory. Two writers of one file each rename their
/// own complete copy; the last rename wins, never a partial file.
fn write_atomic(dir: &Path, path: &Path, content: &[u8]) -> Result<(), StateError> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQUENCE: AtomicU64 = AtomicU64::new(0);
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StateError::Io { path, source }
    };
    let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("state");
    let tmp = dir.join(format!(
        ".{file_name}{TMP_MARK}{}-{}-{:016x}",
        std::process::id(),
        SEQUENCE.fetch_add(1, Ordering::Relaxed),
        rand::random::<u64>()
    ));
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    // An umask or an inherited ACL must not widen it.
    file.set_permissions(fs::Permissions::from_mode(0o600))
        .map_err(io(&tmp))?;
    let written = file
        .write_all(content)
        .and_then(|()| file.sync_all())
        .map_err(io(&tmp));
    drop(file);
    if let Err(e) = written.and_then(|()| fs::rename(&tmp, path).map_err(io(path))) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repository::Digest;
    use crate::repository::Key;

    fn set(n: u32) -> KeySet {
        KeySet::from_keys((0..n).map(|i| (i, Key::generate())))
    }

    #[test]
    fn a_saved_generation_loads_back_identically_with_mode_0600() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = StateStore::open(&dir.path().join("state")).expect("open");
        assert!(store.load("tokens").expect("load").is_none());
        let keys = set(3);
        store
            .save(
                "tokens",
                &Committed {
                    generation: 7,
                    keys: keys.clone(),
                },
            )
            .expect("save");
        let back = store.load("tokens").expect("load").expect("present");
        assert_eq!(back.generation, 7);
        assert_eq!(back.keys, keys);
        let mode = fs::metadata(dir.path().join("state/tokens.state"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let dir_mode = fs::metadata(dir.path().join("state"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o777, 0o700);
    }

    /// A cancelled Admin call's save still running beside the next one: each
    /// writer renames its own complete file, none fails or publishes another's
    /// partial file.
    #[test]
    fn concurrent_saves_never_share_a_temporary_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = StateStore::open(dir.path()).expect("open");
        let writers: Vec<_> = (0..4u64)
            .map(|w| {
                let store = store.clone();
                std::thread::spawn(move || {
                    for n in 0..40u64 {
                        let committed = Committed {
                            generation: w * 1000 + n,
                            keys: set(3),
                        };
                        store.save("tokens", &committed).expect("save");
                        store.save_acks(&Acks::new()).expect("save acks");
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.join().expect("every save succeeded");
        }
        store
            .load("tokens")
            .expect("a whole file")
            .expect("present");
        let left: Vec<_> = fs::read_dir(dir.path())
            .expect("list")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(TMP_MARK))
            .collect();
        assert!(left.is_empty(), "temporary files left: {left:?}");
    }

    #[test]
    fn with_a_seal_key_no_key_is_in_the_clear_and_a_clear_state_is_sealed_at_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        let seal = std::sync::Arc::new(crate::seal::SealKey::from_bytes([3; 32]));
        let keys = set(3);
        let committed = Committed {
            generation: 4,
            keys: keys.clone(),
        };
        let clear = StateStore::open(dir.path()).expect("open");
        clear.save("tokens", &committed).expect("save in the clear");
        drop(clear);
        let store = StateStore::open(dir.path())
            .expect("open")
            .with_seal(seal.clone());
        let back = store
            .load("tokens")
            .expect("clear state reads")
            .expect("present");
        assert_eq!((back.generation, &back.keys), (4, &keys));
        let on_disk = fs::read_to_string(dir.path().join("tokens.state")).expect("read");
        assert!(on_disk.starts_with(MAGIC_SEALED), "{on_disk}");
        for (_, key) in keys.iter() {
            assert!(
                !on_disk.contains(key.to_base64().as_str()),
                "a key in the clear"
            );
        }
        let back = store
            .load("tokens")
            .expect("sealed state reads")
            .expect("present");
        assert_eq!(back.keys, keys);
        drop(store);
        let unsealed = StateStore::open(dir.path()).expect("open");
        assert!(matches!(
            unsealed.load("tokens"),
            Err(StateError::SealedWithoutKey { .. })
        ));
        drop(unsealed);
        let wrong = StateStore::open(dir.path())
            .expect("open")
            .with_seal(std::sync::Arc::new(crate::seal::SealKey::from_bytes(
                [4; 32],
            )));
        assert!(matches!(wrong.load("tokens"), Err(StateError::Seal { .. })));
        // A blob of one repository does not open as another's.
        fs::copy(
            dir.path().join("tokens.state"),
            dir.path().join("receipts.state"),
        )
        .expect("copy");
        drop(wrong);
        let store = StateStore::open(dir.path()).expect("open").with_seal(seal);
        assert!(matches!(
            store.load("receipts"),
            Err(StateError::Seal { .. })
        ));
    }

    #[test]
    fn leftover_temporaries_are_removed_at_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let leftover = dir.path().join(format!(".tokens.state{TMP_MARK}1-0-00"));
        fs::write(&leftover, b"partial").expect("write");
        drop(StateStore::open(dir.path()).expect("open"));
        assert!(!leftover.exists());
    }

    #[test]
    fn a_corrupt_state_is_refused_without_showing_its_content() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = StateStore::open(dir.path()).expect("open");
        let keys = set(3);
        store
            .save(
                "tokens",
                &Committed {
                    generation: 2,
                    keys,
                },
            )
            .expect("save");
        let path = dir.path().join("tokens.state");
        let text = fs::read_to_string(&path).expect("read");
        let secret = text
            .lines()
            .last()
            .expect("a key line")
            .rsplit(' ')
            .next()
            .expect("key")
            .to_owned();
        // Another key under the same digest: the digest check catches it.
        let tampered = text.replace(&secret, &Key::generate().to_base64());
        fs::write(&path, tampered).expect("write");
        let e = store.load("tokens").expect_err("tampered");
        let shown = format!("{e} {e:?}");
        assert!(shown.contains("hash to"), "{shown}");
        assert!(!shown.contains(&secret));
        fs::write(&path, "fernetd-rotator-state 1\ngeneration 1\n").expect("write");
        assert!(store.load("tokens").is_err());
    }

    #[test]
    fn a_second_rotator_cannot_open_the_same_state() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = StateStore::open(dir.path()).expect("open");
        let second = StateStore::open(dir.path()).expect_err("locked");
        assert!(matches!(second, StateError::Locked(_)), "{second}");
        drop(first);
        StateStore::open(dir.path()).expect("free again");
    }

    #[test]
    fn names_cannot_escape_the_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = StateStore::open(dir.path()).expect("open");
        assert!(matches!(store.load("../x"), Err(StateError::BadName(_))));
        assert!(matches!(check_name("../x"), Err(StateError::BadName(_))));
        assert!(matches!(
            is_fresh(dir.path(), "a/b"),
            Err(StateError::BadName(_))
        ));
    }

    #[test]
    fn freshness_is_read_without_creating_anything() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        assert!(is_fresh(&state, "tokens").expect("fresh"));
        assert!(!state.exists(), "looking created the directory");
        let store = StateStore::open(&state).expect("open");
        assert!(is_fresh(&state, "tokens").expect("still fresh"));
        store
            .save(
                "tokens",
                &Committed {
                    generation: 1,
                    keys: set(3),
                },
            )
            .expect("save");
        assert!(!is_fresh(&state, "tokens").expect("committed"));
        assert!(is_fresh(&state, "receipts").expect("other repository"));
    }

    #[test]
    fn acks_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = StateStore::open(dir.path()).expect("open");
        assert!(store.load_acks().expect("empty").is_empty());
        let mut acks = Acks::new();
        acks.entry("tokens".into()).or_default().insert(
            "RegionOne".into(),
            AckRecord {
                generation: 3,
                digest: "ab".into(),
                unix_ms: 5,
            },
        );
        store.save_acks(&acks).expect("save");
        assert_eq!(store.load_acks().expect("load"), acks);
    }

    #[test]
    fn hex_digests_parse() {
        let d = set(2).digest();
        assert_eq!(Digest::from_hex(&d.to_hex()), Some(d));
        assert_eq!(Digest::from_hex("zz"), None);
    }
}
