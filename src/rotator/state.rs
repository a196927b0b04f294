//! The rotator's durable state. Per repository one file `<name>.state` (mode
//! 0600) holding the committed generation, its digest and its keys; one file
//! `agents.json` holding what each agent last acknowledged. Every write is a
//! temporary file, fsync, rename over the old one, fsync of the directory, so a
//! crash leaves the old or the new state, never a torn one. A generation is
//! written here before it is sent to any agent: what an agent may hold is always
//! on disk, so after a crash the rotator resumes from it and a generation number
//! can never come back with other keys. Beside each state file, `<name>.ledger.json`
//! holds the key ledger (when each key was created, promoted and demoted).
//! With a seal key ([`StateStore::with_seal`]) all three are sealed
//! (`crate::seal`), each blob's authenticated data binding it to what it is
//! ([`Binding`]): the state file (`fernetd-rotator-state 2 sealed`) to its
//! repository, generation and digest, which stand in clear lines before the
//! blob; the ledger to its repository and the generation it belongs to (an
//! older ledger is refused); the acknowledgements to their purpose. With a seal
//! key a clear file is refused (one could have been dropped there) unless the
//! operator asked once to adopt it ([`StateStore::adopt_clear_state`],
//! `--adopt-clear-state`); a sealed state file of the first format (bound to
//! the name only) still loads and is rewritten, with its ledger and
//! acknowledgements, in the new binding.

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
/// The first line of a sealed state file of the first format, whose blob was
/// bound to the repository's name only.
const MAGIC_SEALED_V1: &str = "fernetd-rotator-state 1 sealed";
/// The first line of a sealed state file: then `generation G`, `digest D` and
/// the blob, bound to all three and the repository.
const MAGIC_SEALED: &str = "fernetd-rotator-state 2 sealed";
/// The first line of a sealed ledger: then `generation G` and the blob.
const LEDGER_SEALED: &str = "fernetd-rotator-ledger 2 sealed";
/// The first line of sealed acknowledgements: then the blob.
const ACKS_SEALED: &str = "fernetd-rotator-acks 2 sealed";
const ACKS_FILE: &str = "agents.json";

/// What a sealed blob is bound to (its AEAD's authenticated data): a blob
/// opens only where and as what it was written, so a sealed file copied from
/// another repository, generation or purpose (an older generation replayed, an
/// older ledger) is refused. One definition for both engines; `engine` keeps a
/// file's blob from opening as etcd's and back.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Binding<'a> {
    State {
        name: &'a str,
        generation: u64,
        digest: &'a str,
    },
    Ledger {
        name: &'a str,
        generation: u64,
    },
    Acks,
}

impl Binding<'_> {
    /// The authenticated data, versioned (`v2`; the first format bound
    /// `fernetd state file: NAME` / `fernetd etcd: NAME` only).
    pub(crate) fn context(&self, engine: &str) -> String {
        match self {
            Binding::State {
                name,
                generation,
                digest,
            } => format!(
                "fernetd {engine} v2 state\nrepository {name}\ngeneration {generation}\ndigest {digest}"
            ),
            Binding::Ledger { name, generation } => {
                format!("fernetd {engine} v2 ledger\nrepository {name}\ngeneration {generation}")
            }
            Binding::Acks => format!("fernetd {engine} v2 acknowledgements"),
        }
    }
}

/// Refuses a state `generation` of `name` below one the agents acknowledged:
/// a rolled-back or replayed state would be pushed to every agent.
pub(crate) fn check_acknowledged(
    name: &str,
    generation: u64,
    acks: &Acks,
) -> Result<(), StateError> {
    let acknowledged = acks
        .get(name)
        .and_then(|regions| regions.iter().max_by_key(|(_, a)| a.generation))
        .filter(|(_, a)| a.generation > generation);
    match acknowledged {
        Some((region, ack)) => Err(StateError::Behind {
            repository: name.to_owned(),
            generation,
            acknowledged: ack.generation,
            region: region.clone(),
        }),
        None => Ok(()),
    }
}

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
    #[error(
        "state file {path} is in the clear, but `seal_key` is configured: refusing it (a clear file could have been put there); to seal a clear state on purpose, start once with --adopt-clear-state"
    )]
    ClearWhileSealed { path: PathBuf },
    #[error(
        "the ledger {path} belongs to generation {ledger}, older than the committed generation {generation}: refusing a replayed ledger"
    )]
    StaleLedger {
        path: PathBuf,
        ledger: u64,
        generation: u64,
    },
    #[error(
        "the state of `{repository}` holds generation {generation}, below generation {acknowledged} that agent {region} acknowledged: refusing a rolled-back or replayed state (restore the newest state, or start anew on purpose with --fresh-start)"
    )]
    Behind {
        repository: String,
        generation: u64,
        acknowledged: u64,
        region: String,
    },
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
    /// `--adopt-clear-state`: a clear file found with a seal key is sealed
    /// (and logged) instead of refused.
    adopt_clear: bool,
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
            adopt_clear: false,
        })
    }

    /// Seals every state file written from now on with `key`, and opens sealed
    /// ones with it.
    pub fn with_seal(mut self, key: std::sync::Arc<crate::seal::SealKey>) -> Self {
        self.seal = Some(key);
        self
    }

    /// Accepts, this once, clear files where sealed ones are expected
    /// (`--adopt-clear-state`): they are sealed at once, and each is logged.
    pub fn adopt_clear_state(mut self, adopt: bool) -> Self {
        self.adopt_clear = adopt;
        self
    }

    /// What a sealed state blob of `name` was bound to in the first format.
    fn seal_context_v1(name: &str) -> String {
        format!("fernetd state file: {name}")
    }

    fn seal_error(path: &Path) -> impl FnOnce(crate::seal::SealError) -> StateError + '_ {
        move |source| StateError::Seal {
            path: path.to_path_buf(),
            source,
        }
    }

    /// Seals `clear` for `binding` behind `header` lines.
    fn seal_file(
        &self,
        key: &crate::seal::SealKey,
        path: &Path,
        header: &str,
        binding: Binding<'_>,
        clear: &[u8],
    ) -> Result<(), StateError> {
        let blob = key
            .seal(&binding.context(ENGINE), clear)
            .map_err(Self::seal_error(path))?;
        write_atomic(&self.dir, path, format!("{header}\n{blob}\n").as_bytes())
    }

    /// A clear file where a sealed one is expected: refused, or adopted once.
    fn clear_allowed(&self, path: &Path) -> Result<(), StateError> {
        if !self.adopt_clear {
            return Err(StateError::ClearWhileSealed {
                path: path.to_path_buf(),
            });
        }
        tracing::warn!(path = %path.display(), "--adopt-clear-state: adopting a clear file although `seal_key` is configured; it is sealed now");
        Ok(())
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

    /// The key ledger of `name` for its committed `generation`, or `None` when
    /// none was recorded yet (a first start, or state written before the
    /// ledger existed). Sealed, it must belong to `generation` or a later one
    /// (a commit writes the ledger first); an older one is refused.
    pub fn load_ledger(&self, name: &str, generation: u64) -> Result<Option<Ledger>, StateError> {
        self.read_ledger(name, generation, false)
    }

    fn read_ledger(
        &self,
        name: &str,
        generation: u64,
        migrating: bool,
    ) -> Result<Option<Ledger>, StateError> {
        let path = self.ledger_path(name)?;
        let content = match fs::read(&path) {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StateError::Io { path, source }),
        };
        let corrupt = |path: PathBuf, reason: String| StateError::Corrupt { path, reason };
        let json = match (
            content.strip_prefix(format!("{LEDGER_SEALED}\n").as_bytes()),
            &self.seal,
        ) {
            (Some(_), None) => return Err(StateError::SealedWithoutKey { path }),
            (Some(rest), Some(key)) => {
                let (fields, blob) =
                    sealed_fields(rest, 1).map_err(|reason| corrupt(path.clone(), reason))?;
                let ledger_generation: u64 = fields[0]
                    .strip_prefix("generation ")
                    .and_then(|g| g.parse().ok())
                    .ok_or_else(|| corrupt(path.clone(), "no generation line".into()))?;
                let binding = Binding::Ledger {
                    name,
                    generation: ledger_generation,
                };
                let clear = key
                    .open(&binding.context(ENGINE), blob)
                    .map_err(Self::seal_error(&path))?;
                if ledger_generation < generation {
                    return Err(StateError::StaleLedger {
                        path,
                        ledger: ledger_generation,
                        generation,
                    });
                }
                clear
            }
            (None, Some(_)) if !migrating => {
                self.clear_allowed(&path)?;
                Zeroizing::new(content)
            }
            (None, _) => Zeroizing::new(content),
        };
        serde_json::from_slice(&json)
            .map(Some)
            .map_err(|e| corrupt(path, e.to_string()))
    }

    /// Durably records the key ledger of `name` (times only, no key), which
    /// belongs to its `generation`.
    pub fn save_ledger(
        &self,
        name: &str,
        generation: u64,
        ledger: &Ledger,
    ) -> Result<(), StateError> {
        let path = self.ledger_path(name)?;
        // Plain numbers and maps always serialize.
        let text = serde_json::to_vec_pretty(ledger).unwrap_or_default();
        match &self.seal {
            None => write_atomic(&self.dir, &path, &text),
            Some(key) => self.seal_file(
                key,
                &path,
                &format!("{LEDGER_SEALED}\ngeneration {generation}"),
                Binding::Ledger { name, generation },
                &text,
            ),
        }
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
        let corrupt = |path: &Path, reason: String| StateError::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        let sealed = content.strip_prefix(format!("{MAGIC_SEALED}\n").as_bytes());
        let sealed_v1 = content.strip_prefix(format!("{MAGIC_SEALED_V1}\n").as_bytes());
        let key = match (&self.seal, sealed.is_some() || sealed_v1.is_some()) {
            (None, true) => return Err(StateError::SealedWithoutKey { path }),
            (key, _) => key,
        };
        if let (Some(rest), Some(key)) = (sealed, key) {
            let (fields, blob) = sealed_fields(rest, 2).map_err(|r| corrupt(&path, r))?;
            let (Some(generation), Some(digest)) = (
                fields[0]
                    .strip_prefix("generation ")
                    .and_then(|g| g.parse::<u64>().ok()),
                fields[1].strip_prefix("digest "),
            ) else {
                return Err(corrupt(&path, "no generation or digest line".into()));
            };
            let binding = Binding::State {
                name,
                generation,
                digest,
            };
            let clear = key
                .open(&binding.context(ENGINE), blob)
                .map_err(Self::seal_error(&path))?;
            let committed = parse_state(&clear, name).map_err(|r| corrupt(&path, r))?;
            if committed.generation != generation || committed.keys.digest().to_hex() != digest {
                return Err(corrupt(
                    &path,
                    "the sealed keys do not match the generation and digest lines".into(),
                ));
            }
            return Ok(Some(committed));
        }
        if let (Some(rest), Some(key)) = (sealed_v1, key) {
            let blob = std::str::from_utf8(rest)
                .map_err(|_| corrupt(&path, "sealed content is not UTF-8".into()))?;
            let clear = key
                .open(&Self::seal_context_v1(name), blob)
                .map_err(Self::seal_error(&path))?;
            let committed = parse_state(&clear, name).map_err(|r| corrupt(&path, r))?;
            self.migrate(name, &committed)?;
            tracing::info!(repository = %name, generation = committed.generation, "rewrote the sealed state, its ledger and the acknowledgements bound to repository, generation and digest");
            return Ok(Some(committed));
        }
        let committed = parse_state(&content, name).map_err(|r| corrupt(&path, r))?;
        if self.seal.is_some() {
            self.clear_allowed(&path)?;
            // No key stays in the clear a moment longer than this start.
            self.migrate(name, &committed)?;
            tracing::warn!(repository = %name, generation = committed.generation, digest = %committed.keys.digest(), "--adopt-clear-state: sealed a clear state file, its ledger and the acknowledgements");
        }
        Ok(Some(committed))
    }

    /// Rewrites the state of `name`, its ledger and the acknowledgements in
    /// the current sealed binding (from clear files, or the first format).
    fn migrate(&self, name: &str, committed: &Committed) -> Result<(), StateError> {
        if let Some(ledger) = self.read_ledger(name, committed.generation, true)? {
            self.save_ledger(name, committed.generation, &ledger)?;
        }
        if self.dir.join(ACKS_FILE).exists() {
            let acks = self.read_acks(true)?;
            self.save_acks(&acks)?;
        }
        self.save(name, committed)
    }

    /// Durably records `committed` as the current generation of `name`.
    pub fn save(&self, name: &str, committed: &Committed) -> Result<(), StateError> {
        let path = self.repository_path(name)?;
        let text = encode_state(name, committed);
        match &self.seal {
            None => write_atomic(&self.dir, &path, text.as_bytes()),
            Some(key) => {
                let digest = committed.keys.digest().to_hex();
                self.seal_file(
                    key,
                    &path,
                    &format!(
                        "{MAGIC_SEALED}\ngeneration {}\ndigest {digest}",
                        committed.generation
                    ),
                    Binding::State {
                        name,
                        generation: committed.generation,
                        digest: &digest,
                    },
                    text.as_bytes(),
                )
            }
        }
    }

    /// The acknowledgements recorded by [`StateStore::save_acks`]; empty when none.
    pub fn load_acks(&self) -> Result<Acks, StateError> {
        self.read_acks(false)
    }

    fn read_acks(&self, migrating: bool) -> Result<Acks, StateError> {
        let path = self.dir.join(ACKS_FILE);
        let content = match fs::read(&path) {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Acks::new()),
            Err(source) => return Err(StateError::Io { path, source }),
        };
        let json = match (
            content.strip_prefix(format!("{ACKS_SEALED}\n").as_bytes()),
            &self.seal,
        ) {
            (Some(_), None) => return Err(StateError::SealedWithoutKey { path }),
            (Some(rest), Some(key)) => {
                let blob = std::str::from_utf8(rest).map_err(|_| StateError::Corrupt {
                    path: path.clone(),
                    reason: "sealed content is not UTF-8".into(),
                })?;
                key.open(&Binding::Acks.context(ENGINE), blob)
                    .map_err(Self::seal_error(&path))?
            }
            (None, Some(_)) if !migrating => {
                self.clear_allowed(&path)?;
                Zeroizing::new(content)
            }
            (None, _) => Zeroizing::new(content),
        };
        serde_json::from_slice(&json).map_err(|e| StateError::Corrupt {
            path,
            reason: e.to_string(),
        })
    }

    /// Records acknowledgements. They speed up a restart (the rotator reads
    /// every agent's state back anyway) and bound it: a start never adopts a
    /// generation below one they hold ([`check_acknowledged`]).
    pub fn save_acks(&self, acks: &Acks) -> Result<(), StateError> {
        let path = self.dir.join(ACKS_FILE);
        let json = serde_json::to_vec_pretty(acks).map_err(|e| StateError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        match &self.seal {
            None => write_atomic(&self.dir, &path, &json),
            Some(key) => self.seal_file(key, &path, ACKS_SEALED, Binding::Acks, &json),
        }
    }
}

/// What the file engine's blobs are bound to beside their [`Binding`].
const ENGINE: &str = "state file";

/// The `count` clear lines after a sealed file's first line, and its blob.
fn sealed_fields(rest: &[u8], count: usize) -> Result<(Vec<&str>, &str), String> {
    let text = std::str::from_utf8(rest).map_err(|_| "sealed content is not UTF-8".to_owned())?;
    let mut lines = text.lines();
    let fields: Vec<&str> = lines.by_ref().take(count).collect();
    let blob = lines.next().unwrap_or_default();
    if fields.len() != count || blob.is_empty() || lines.any(|l| !l.trim().is_empty()) {
        return Err("malformed sealed file".into());
    }
    Ok((fields, blob))
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
    fn with_a_seal_key_a_clear_state_is_refused_unless_adopted_and_then_sealed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let seal = std::sync::Arc::new(crate::seal::SealKey::from_bytes([3; 32]));
        let keys = set(3);
        let committed = Committed {
            generation: 4,
            keys: keys.clone(),
        };
        let clear = StateStore::open(dir.path()).expect("open");
        clear.save("tokens", &committed).expect("save in the clear");
        let ledger = Ledger::fresh(&keys, 1_000);
        clear
            .save_ledger("tokens", 4, &ledger)
            .expect("clear ledger");
        clear.save_acks(&acks_at("tokens", 4)).expect("clear acks");
        drop(clear);
        // A clear file where sealed ones are expected: refused, untouched.
        let refused = StateStore::open(dir.path())
            .expect("open")
            .with_seal(seal.clone());
        let e = refused
            .load("tokens")
            .expect_err("a clear state is refused");
        assert!(matches!(e, StateError::ClearWhileSealed { .. }), "{e}");
        assert!(e.to_string().contains("--adopt-clear-state"), "{e}");
        assert!(
            fs::read_to_string(dir.path().join("tokens.state"))
                .expect("read")
                .starts_with(&format!("{MAGIC}\n")),
            "a refused file was rewritten"
        );
        drop(refused);
        let store = StateStore::open(dir.path())
            .expect("open")
            .with_seal(seal.clone())
            .adopt_clear_state(true);
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
        // Its ledger and acknowledgements were sealed with it.
        for file in ["tokens.ledger.json", ACKS_FILE] {
            let text = fs::read_to_string(dir.path().join(file)).expect("read");
            assert!(
                text.contains(" sealed\n"),
                "{file} left in the clear: {text}"
            );
        }
        drop(store);
        let store = StateStore::open(dir.path())
            .expect("open")
            .with_seal(seal.clone());
        let back = store
            .load("tokens")
            .expect("sealed state reads")
            .expect("present");
        assert_eq!(back.keys, keys);
        assert_eq!(
            store.load_ledger("tokens", 4).expect("ledger"),
            Some(ledger)
        );
        assert_eq!(store.load_acks().expect("acks"), acks_at("tokens", 4));
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

    fn acks_at(name: &str, generation: u64) -> Acks {
        let mut acks = Acks::new();
        acks.entry(name.into()).or_default().insert(
            "RegionOne".into(),
            AckRecord {
                generation,
                digest: "ab".into(),
                unix_ms: 5,
            },
        );
        acks
    }

    /// Replays and edits of sealed files: the clear lines are bound, an older
    /// ledger is refused, a clear ledger or acknowledgements dropped beside
    /// sealed state are refused, and an older sealed state (valid on its own)
    /// is caught by the acknowledgements.
    #[test]
    fn sealed_files_are_bound_to_generation_and_digest_and_older_ones_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let seal = std::sync::Arc::new(crate::seal::SealKey::from_bytes([5; 32]));
        let store = StateStore::open(dir.path())
            .expect("open")
            .with_seal(seal.clone());
        let state = dir.path().join("tokens.state");
        let ledger_path = dir.path().join("tokens.ledger.json");
        let old_keys = set(3);
        let old = Committed {
            generation: 3,
            keys: old_keys.clone(),
        };
        store
            .save_ledger("tokens", 3, &Ledger::fresh(&old_keys, 1))
            .expect("ledger 3");
        store.save("tokens", &old).expect("state 3");
        let (old_state, old_ledger) = (
            fs::read(&state).expect("read"),
            fs::read(&ledger_path).expect("read"),
        );
        let keys = set(3);
        store
            .save_ledger("tokens", 5, &Ledger::fresh(&keys, 2))
            .expect("ledger 5");
        store
            .save(
                "tokens",
                &Committed {
                    generation: 5,
                    keys: keys.clone(),
                },
            )
            .expect("state 5");
        store.save_acks(&acks_at("tokens", 5)).expect("acks");
        // The clear generation line edited: the blob no longer opens.
        let text = fs::read_to_string(&state).expect("read");
        fs::write(&state, text.replace("generation 5", "generation 1000")).expect("write");
        assert!(matches!(store.load("tokens"), Err(StateError::Seal { .. })));
        fs::write(&state, &text).expect("write");
        // An older sealed ledger: refused for the committed generation.
        fs::write(&ledger_path, &old_ledger).expect("write");
        let e = store.load_ledger("tokens", 5).expect_err("older ledger");
        assert!(
            matches!(
                e,
                StateError::StaleLedger {
                    ledger: 3,
                    generation: 5,
                    ..
                }
            ),
            "{e}"
        );
        // A clear ledger or acknowledgements beside sealed state: refused.
        fs::write(&ledger_path, b"{\"keys\":{}}").expect("write");
        assert!(matches!(
            store.load_ledger("tokens", 5),
            Err(StateError::ClearWhileSealed { .. })
        ));
        fs::write(dir.path().join(ACKS_FILE), b"{}").expect("write");
        assert!(matches!(
            store.load_acks(),
            Err(StateError::ClearWhileSealed { .. })
        ));
        store.save_acks(&acks_at("tokens", 5)).expect("acks");
        // An older sealed state opens, but is below what agents acknowledged.
        fs::write(&state, &old_state).expect("write");
        let back = store
            .load("tokens")
            .expect("valid on its own")
            .expect("present");
        let e = check_acknowledged("tokens", back.generation, &store.load_acks().expect("acks"))
            .expect_err("a replayed state");
        let shown = e.to_string();
        assert!(
            shown.contains("generation 3") && shown.contains("generation 5"),
            "{shown}"
        );
        check_acknowledged("tokens", 5, &acks_at("tokens", 5)).expect("not behind");
        check_acknowledged("receipts", 1, &acks_at("tokens", 5)).expect("another repository");
    }

    /// A state sealed in the first format (bound to the name only) with its
    /// clear ledger and acknowledgements still loads, and is rewritten bound.
    #[test]
    fn a_state_sealed_in_the_first_format_loads_and_is_rewritten_bound() {
        let dir = tempfile::tempdir().expect("tempdir");
        let seal = std::sync::Arc::new(crate::seal::SealKey::from_bytes([6; 32]));
        let keys = set(3);
        let committed = Committed {
            generation: 9,
            keys: keys.clone(),
        };
        let blob = seal
            .seal(
                "fernetd state file: tokens",
                encode_state("tokens", &committed).as_bytes(),
            )
            .expect("seal");
        fs::write(
            dir.path().join("tokens.state"),
            format!("{MAGIC_SEALED_V1}\n{blob}\n"),
        )
        .expect("write");
        let ledger = Ledger::fresh(&keys, 7);
        fs::write(
            dir.path().join("tokens.ledger.json"),
            serde_json::to_vec(&ledger).expect("json"),
        )
        .expect("write");
        fs::write(
            dir.path().join(ACKS_FILE),
            serde_json::to_vec(&acks_at("tokens", 9)).expect("json"),
        )
        .expect("write");
        let store = StateStore::open(dir.path()).expect("open").with_seal(seal);
        let back = store
            .load("tokens")
            .expect("first format")
            .expect("present");
        assert_eq!((back.generation, &back.keys), (9, &keys));
        let text = fs::read_to_string(dir.path().join("tokens.state")).expect("read");
        assert!(
            text.starts_with(&format!("{MAGIC_SEALED}\ngeneration 9\ndigest ")),
            "{text}"
        );
        assert_eq!(
            store.load_ledger("tokens", 9).expect("sealed ledger"),
            Some(ledger)
        );
        assert_eq!(
            store.load_acks().expect("sealed acks"),
            acks_at("tokens", 9)
        );
        assert_eq!(
            store
                .load("tokens")
                .expect("again")
                .expect("present")
                .generation,
            9
        );
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
