//! One repository under the agent's care: the generation rules (no rollback, no
//! fork), the atomic install through `install::install`, the proof that the
//! repository on disk works (reloaded the way Keystone reads it, digest
//! recomputed, every canary decrypted by the key it names), and drift checks.
//!
//! Every write and every drift check of a repository holds its `desired` mutex,
//! so installs are serialized, a drift check never mistakes the agent's own
//! install for someone else's change, and the last installed set (kept for the
//! `restore` policy) always matches the stamp on disk.
//!
//! Once it holds that mutex, an install or a restore runs in a task of its own
//! that owns the guard: tonic drops a handler's future when its connection drops
//! or its deadline passes, and a write cut off there (the swap done, the desired
//! state not updated, the lock released) would let a second install run beside
//! it and "restore" an older generation over a newer one.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{Mutex, OwnedMutexGuard};

use super::check::{self, Malformed};
use super::metrics::AgentMetrics;
use crate::error_chain;
use crate::install::{self, InstallError, Owner};
use crate::pb;
use crate::repository::{self, Digest, KeySet, RepositoryError, Stamp, StampError};
use crate::token::{Keyring, TokenError};

/// Why a canary did not prove a key set.
#[derive(Debug, thiserror::Error)]
pub enum CanaryError {
    #[error("canary #{position} names key {key_index}, which the set does not contain")]
    NoSuchKey { position: usize, key_index: u32 },
    #[error("canary #{position} (key {key_index}) does not decrypt with any key")]
    Undecryptable {
        position: usize,
        key_index: u32,
        #[source]
        source: TokenError,
    },
    #[error("canary #{position} was decrypted by key {actual}, but it names key {key_index}")]
    WrongKey {
        position: usize,
        key_index: u32,
        actual: u32,
    },
}

/// Why the repository on disk does not prove the set just installed.
#[derive(Debug, thiserror::Error)]
pub enum ProofError {
    #[error("cannot reload the repository as Keystone would")]
    Load(#[source] RepositoryError),
    #[error("cannot read the generation stamp")]
    Stamp(#[source] StampError),
    #[error("on-disk digest {found} differs from the installed set's {expected}")]
    Digest { expected: Digest, found: Digest },
    #[error("on-disk stamp says generation {found:?}, expected {expected}")]
    StampMismatch { expected: u64, found: Option<u64> },
    #[error(transparent)]
    Canary(#[from] CanaryError),
}

/// Why an install was refused or failed. Messages name generations, digests,
/// indices and lengths; never key bytes.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("repository {0:?} is not managed by this agent")]
    UnknownRepository(String),
    #[error("malformed key set")]
    Malformed(#[from] Malformed),
    #[error("canary refused before installing; the repository was not touched")]
    Canary(#[source] CanaryError),
    #[error(
        "rollback refused: generation {offered} is older than the installed generation {installed} (only an explicit restore may roll back)"
    )]
    Rollback { offered: u64, installed: u64 },
    #[error(
        "fork refused: generation {generation} is installed with digest {installed}, the request carries digest {offered}"
    )]
    Fork {
        generation: u64,
        installed: Digest,
        offered: Digest,
    },
    #[error(
        "continuity refused: generation {offered} does not keep key {primary}, the primary of the installed generation {installed}, and is not marked an emergency purge: installing it would reject every token this region signed since its last rotation"
    )]
    Discontinuity {
        offered: u64,
        installed: u64,
        primary: u32,
    },
    #[error("install into {path} failed; the previous repository is still in place")]
    Install {
        path: PathBuf,
        #[source]
        source: InstallError,
    },
    #[error("the installed repository failed its proof ({restored})")]
    Unproven {
        restored: &'static str,
        #[source]
        source: ProofError,
    },
    #[error("internal error: {0}")]
    Internal(String),
}

impl Refusal {
    /// The fixed word used as the `outcome` label of the refusal metric.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::UnknownRepository(_) => "unknown_repository",
            Refusal::Malformed(Malformed::DigestMismatch { .. }) => "digest",
            Refusal::Malformed(_) => "malformed",
            Refusal::Canary(_) => "canary",
            Refusal::Rollback { .. } => "rollback",
            Refusal::Fork { .. } => "fork",
            Refusal::Discontinuity { .. } => "discontinuity",
            Refusal::Install { .. } => "install_failed",
            Refusal::Unproven { .. } => "unproven",
            Refusal::Internal(_) => "internal",
        }
    }

    /// The gRPC status a client sees, carrying the whole error chain.
    pub fn to_status(&self) -> tonic::Status {
        use tonic::Code;
        let code = match self {
            Refusal::UnknownRepository(_) => Code::NotFound,
            Refusal::Malformed(_) | Refusal::Canary(_) => Code::InvalidArgument,
            Refusal::Rollback { .. } | Refusal::Discontinuity { .. } => Code::FailedPrecondition,
            Refusal::Fork { .. } => Code::AlreadyExists,
            Refusal::Install { .. } | Refusal::Internal(_) => Code::Internal,
            Refusal::Unproven { .. } => Code::DataLoss,
        };
        tonic::Status::new(code, error_chain(self))
    }
}

/// Decrypts every canary with `keyring` and checks the key that did it.
pub fn check_canaries(
    keyring: &Keyring,
    set: &KeySet,
    canaries: &[pb::Canary],
) -> Result<(), CanaryError> {
    for (position, canary) in canaries.iter().enumerate() {
        let key_index = canary.key_index;
        if set.get(key_index).is_none() {
            return Err(CanaryError::NoSuchKey {
                position,
                key_index,
            });
        }
        let decrypted =
            keyring
                .decrypt(&canary.token)
                .map_err(|source| CanaryError::Undecryptable {
                    position,
                    key_index,
                    source,
                })?;
        if decrypted.key_index != key_index {
            return Err(CanaryError::WrongKey {
                position,
                key_index,
                actual: decrypted.key_index,
            });
        }
    }
    Ok(())
}

/// What the repository on disk holds, proven to work.
struct Proof {
    set: KeySet,
}

/// Reloads `path` as Keystone does and checks it against what was installed.
fn prove(path: &Path, stamp: &Stamp, canaries: &[pb::Canary]) -> Result<Proof, ProofError> {
    let set = repository::load(path).map_err(ProofError::Load)?;
    let found = set.digest();
    if found != stamp.digest {
        return Err(ProofError::Digest {
            expected: stamp.digest,
            found,
        });
    }
    let on_disk = repository::read_stamp(path).map_err(ProofError::Stamp)?;
    if on_disk.as_ref().map(|s| (s.generation, s.digest)) != Some((stamp.generation, stamp.digest))
    {
        return Err(ProofError::StampMismatch {
            expected: stamp.generation,
            found: on_disk.map(|s| s.generation),
        });
    }
    check_canaries(&Keyring::new(&set), &set, canaries)?;
    Ok(Proof { set })
}

/// What a drift check found worth recording: drift seen for the first time, or
/// a restore attempted.
#[derive(Debug, Clone)]
pub struct DriftSeen {
    pub generation: u64,
    pub digest: Digest,
    pub detail: String,
    /// `None`: reported only; otherwise whether the restore worked.
    pub restored: Option<Result<(), String>>,
}

/// What a push asks beyond its set: a rollback (`restore`), or dropping the
/// installed primary (`emergency_purge`).
#[derive(Debug, Clone, Copy)]
struct Offer {
    restore: bool,
    emergency_purge: bool,
}

/// The set the agent last installed (or found stamped at start), with its stamp.
struct Desired {
    generation: u64,
    digest: Option<Digest>,
    /// Kept for the `restore` drift policy; `Key` zeroizes itself when dropped.
    set: Option<Arc<KeySet>>,
}

/// What `GetState` reports; refreshed after every install and drift check.
#[derive(Debug, Clone, Default)]
pub struct View {
    pub generation: u64,
    /// Digest of what is on disk now (None when unreadable or missing).
    pub digest: Option<Digest>,
    pub indices: Vec<u32>,
    pub last_install_unix_ms: i64,
    pub drift: Option<String>,
    pub problem: Option<String>,
}

/// A successful install's answer.
#[derive(Debug)]
pub struct Installed {
    pub generation: u64,
    pub digest: Digest,
    pub indices: Vec<u32>,
    pub unchanged: bool,
    pub canaries_valid: bool,
    pub micros: u64,
}

/// A one-shot fault injected by unit tests.
#[cfg(test)]
type Fault = Box<dyn FnOnce(&Path) + Send>;

/// One repository named in the agent's configuration.
pub struct Managed {
    pub name: String,
    pub path: PathBuf,
    owner: Option<Owner>,
    desired: Arc<Mutex<Desired>>,
    view: StdMutex<View>,
    metrics: AgentMetrics,
    /// Fault injection for unit tests: runs once between the install and the
    /// proof, standing in for another writer or a file system that lost data.
    #[cfg(test)]
    after_install: StdMutex<Option<Fault>>,
}

fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Runs blocking file-system work off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Refusal> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Refusal::Internal(format!("blocking task failed: {e}")))
}

/// The repository as found on disk: the keys Keystone would use, and every
/// problem `repository::verify` sees (what Keystone would trip on, modes,
/// ownership, a stamp that does not match the keys).
struct Disk {
    keys: Option<KeySet>,
    problem: Option<String>,
}

impl Disk {
    fn read(path: &Path, owner: Option<Owner>) -> Disk {
        let report = repository::verify(path, owner.map(|o| (o.uid, o.gid)));
        let problem = (!report.problems.is_empty()).then(|| {
            report
                .problems
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        });
        Disk {
            // An empty directory holds no set: report no digest rather than
            // the digest of nothing.
            keys: report.keys.filter(|keys| !keys.is_empty()),
            problem,
        }
    }

    fn digest(&self) -> Option<Digest> {
        self.keys.as_ref().map(KeySet::digest)
    }
}

impl Managed {
    /// Takes charge of a repository at start: removes leftovers of an
    /// interrupted install, recovers generation and digest from the stamp and,
    /// when the disk still matches the stamp, keeps that set for restores.
    pub fn open(
        name: String,
        path: PathBuf,
        owner: Option<Owner>,
        metrics: AgentMetrics,
    ) -> Result<Self, InstallError> {
        if path.exists() {
            let removed = install::clean_leftovers(&path)?;
            if removed > 0 {
                tracing::warn!(repository = %name, removed, "removed leftovers of an interrupted install");
            }
        }
        // The Keystone user owns the repository and can put anything at the
        // stamp's name: an unreadable or malformed stamp is drift, reported
        // and repaired by the next install, never a reason not to start.
        let (stamp, unreadable) = match repository::read_stamp(&path) {
            Ok(stamp) => (stamp, None),
            Err(e) => (
                None,
                Some(format!(
                    "{}: ignored, the next install replaces it",
                    crate::error_chain(&e)
                )),
            ),
        };
        let disk = Disk::read(&path, owner);
        // A stamp the agent did not write (another owner: the Keystone user
        // replaced it) is tampering: reported, and its generation not obeyed,
        // or a forged 2^64-1 would refuse every later install as a rollback.
        let (stamp, tampered) = match (stamp, stamp_owner(&path)) {
            (Some(stamp), Some(uid)) if uid != rustix::process::geteuid().as_raw() => (
                None,
                Some(format!(
                    "the stamp claims generation {} but is owned by uid {uid}, not the agent: ignored as tampering",
                    stamp.generation
                )),
            ),
            (stamp, _) => (stamp, unreadable),
        };
        let mut desired = Desired {
            generation: 0,
            digest: None,
            set: None,
        };
        let mut view = View {
            digest: disk.digest(),
            indices: disk.keys.as_ref().map(KeySet::indices).unwrap_or_default(),
            problem: disk.problem,
            ..View::default()
        };
        if let Some(detail) = tampered {
            tracing::warn!(repository = %name, %detail, "stamp tampering");
            metrics.drift_event(&name);
            view.drift = Some(detail);
        }
        if let Some(stamp) = stamp {
            desired.generation = stamp.generation;
            desired.digest = Some(stamp.digest);
            view.generation = stamp.generation;
            match disk.keys {
                Some(set) if set.digest() == stamp.digest => desired.set = Some(Arc::new(set)),
                _ => {
                    let detail = drift_detail(&stamp, view.digest);
                    tracing::warn!(repository = %name, %detail, "repository changed while the agent was down");
                    metrics.drift_event(&name);
                    view.drift = Some(detail);
                }
            }
        }
        metrics.set_generation(&name, desired.generation);
        metrics.set_drifted(&name, view.drift.is_some());
        tracing::info!(
            repository = %name,
            path = %path.display(),
            generation = desired.generation,
            digest = %view.digest.map_or_else(|| "none".to_string(), |d| d.to_hex()),
            drift = view.drift.is_some(),
            "managing repository"
        );
        Ok(Managed {
            name,
            path,
            owner,
            desired: Arc::new(Mutex::new(desired)),
            view: StdMutex::new(view),
            metrics,
            #[cfg(test)]
            after_install: StdMutex::new(None),
        })
    }

    pub fn view(&self) -> View {
        self.view
            .lock()
            .map(|v| v.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    fn update_view(&self, f: impl FnOnce(&mut View)) {
        let mut guard = self.view.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard);
    }

    /// Validates, installs and proves one pushed key set. Cancelling the
    /// returned future before the install lock is taken changes nothing; after,
    /// the install runs to completion in its own task (see the module comment).
    pub async fn install(
        self: &Arc<Self>,
        mut request: pb::InstallRequest,
    ) -> Result<Installed, Refusal> {
        let started = Instant::now();
        let checked = check::key_set(request.generation, &mut request.keys, &request.digest)?;
        let canaries = request.canaries;
        let set = Arc::new(checked.set);
        let stamp = Stamp {
            generation: request.generation,
            digest: checked.digest,
            // When each key became primary, for tools reading the repository.
            promoted: request
                .promoted_unix
                .iter()
                .map(|(k, v)| (*k, *v))
                .collect(),
            agent: true,
        };
        // A canary the pushed set itself cannot decrypt is refused before the
        // repository is touched: Keystone never sees a set that was going to fail.
        let preflight = {
            let (set, canaries) = (set.clone(), canaries.clone());
            blocking(move || check_canaries(&Keyring::new(&set), &set, &canaries)).await?
        };
        if let Err(e) = preflight {
            self.metrics.canaries(&self.name, 0, 1);
            return Err(Refusal::Canary(e));
        }

        let desired = self.desired.clone().lock_owned().await;
        let this = Arc::clone(self);
        let offer = Offer {
            restore: request.restore,
            emergency_purge: request.emergency_purge,
        };
        tokio::spawn(async move {
            this.install_locked(desired, set, stamp, canaries, offer, started)
                .await
        })
        .await
        .map_err(|e| Refusal::Internal(format!("install task failed: {e}")))?
    }

    /// The part of [`Managed::install`] that runs under the install lock, in a
    /// task no caller can cancel.
    async fn install_locked(
        &self,
        mut desired: OwnedMutexGuard<Desired>,
        set: Arc<KeySet>,
        stamp: Stamp,
        canaries: Vec<pb::Canary>,
        offer: Offer,
        started: Instant,
    ) -> Result<Installed, Refusal> {
        let restore = offer.restore;
        let installed = desired.digest.map(|digest| (desired.generation, digest));
        if accept(installed, (stamp.generation, stamp.digest), restore)? == Accept::Again {
            // A re-push of what is installed: answer from the disk when it
            // still proves the set, re-install when it drifted.
            let (path, s, c) = (self.path.clone(), stamp.clone(), canaries.clone());
            if let Ok(proof) = blocking(move || prove(&path, &s, &c)).await? {
                self.metrics.canaries(&self.name, canaries.len() as u64, 0);
                self.metrics.installed(&self.name, "unchanged");
                return Ok(Installed {
                    generation: stamp.generation,
                    digest: stamp.digest,
                    indices: proof.set.indices(),
                    unchanged: true,
                    canaries_valid: !canaries.is_empty(),
                    micros: elapsed_micros(started),
                });
            }
        }

        // Continuity: the next generation keeps this one's primary (Keystone's
        // rotation always does), or every token this region signed since its
        // last rotation stops validating. Only the rotator's emergency purge
        // of a compromised primary may drop it. A set further ahead (this
        // agent missed generations: restored, back from an outage) is a
        // catch-up to the current set, which no longer holds the old primary
        // by design: not refused. Neither is a set whose predecessor is
        // unknown here (it changed while the agent was down).
        if let Some(previous) = &desired.set
            && desired.digest.is_some()
            && stamp.generation == desired.generation + 1
            && !offer.emergency_purge
            && !restore
            && let Some((primary, key)) = previous.primary_index().zip(previous.primary())
            && !set.iter().any(|(_, k)| k == key)
        {
            return Err(Refusal::Discontinuity {
                offered: stamp.generation,
                installed: desired.generation,
                primary,
            });
        }

        let previous = desired
            .set
            .clone()
            .zip(desired.digest)
            .map(|(set, digest)| {
                (
                    set,
                    Stamp {
                        generation: desired.generation,
                        digest,
                        promoted: Default::default(),
                        agent: true,
                    },
                )
            });
        let proof = self.write_and_prove(&set, &stamp, &canaries).await;
        let proof = match proof {
            Ok(proof) => proof,
            Err(Refusal::Unproven { source, .. }) => {
                self.metrics.canaries(
                    &self.name,
                    0,
                    u64::from(matches!(source, ProofError::Canary(_))),
                );
                let restored = match previous {
                    Some((set, prev)) => match self.write_and_prove(&set, &prev, &[]).await {
                        Ok(_) => "the previous generation was restored",
                        Err(e) => {
                            tracing::error!(repository = %self.name, error = %error_chain(&e), "restoring the previous generation failed");
                            "restoring the previous generation failed too"
                        }
                    },
                    None => "there was no previous generation to restore",
                };
                self.refresh_view().await;
                return Err(Refusal::Unproven { restored, source });
            }
            Err(e) => return Err(e),
        };
        self.metrics.canaries(&self.name, canaries.len() as u64, 0);
        desired.generation = stamp.generation;
        desired.digest = Some(stamp.digest);
        desired.set = Some(set);
        let micros = elapsed_micros(started);
        let indices = proof.set.indices();
        self.update_view(|v| {
            v.generation = stamp.generation;
            v.last_install_unix_ms = now_unix_ms();
            v.drift = None;
        });
        self.refresh_view().await;
        self.metrics.set_generation(&self.name, stamp.generation);
        self.metrics.set_drifted(&self.name, false);
        self.metrics.installed(&self.name, "installed");
        self.metrics
            .observe_install(&self.name, micros as f64 / 1e6);
        tracing::info!(
            repository = %self.name,
            generation = stamp.generation,
            digest = %stamp.digest,
            ?indices,
            canaries = canaries.len(),
            restore,
            micros,
            "installed"
        );
        Ok(Installed {
            generation: stamp.generation,
            digest: stamp.digest,
            indices,
            unchanged: false,
            canaries_valid: !canaries.is_empty(),
            micros,
        })
    }

    /// Installs `set` atomically with `stamp` and proves the result from disk.
    async fn write_and_prove(
        &self,
        set: &Arc<KeySet>,
        stamp: &Stamp,
        canaries: &[pb::Canary],
    ) -> Result<Proof, Refusal> {
        let (path, owner, set, s, c) = (
            self.path.clone(),
            self.owner,
            set.clone(),
            stamp.clone(),
            canaries.to_vec(),
        );
        #[cfg(test)]
        let fault = self
            .after_install
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        blocking(move || {
            install::install(&path, &set, Some(&s), owner).map_err(|source| Refusal::Install {
                path: path.clone(),
                source,
            })?;
            #[cfg(test)]
            if let Some(fault) = fault {
                fault(&path);
            }
            prove(&path, &s, &c).map_err(|source| Refusal::Unproven {
                restored: "",
                source,
            })
        })
        .await?
    }

    /// Waits until no install or drift check is running on this repository.
    pub async fn quiesce(&self) {
        drop(self.desired.lock().await);
    }

    /// Compares the disk with what the agent installed; reports a change it did
    /// not make and, with `restore`, puts its set back.
    pub async fn check_drift(self: &Arc<Self>, restore: bool) -> Option<DriftSeen> {
        let desired = self.desired.clone().lock_owned().await;
        let this = Arc::clone(self);
        // A restore cut off by the drift task's shutdown would leave the disk
        // and `desired` apart, like a cancelled install.
        tokio::spawn(async move { this.check_drift_locked(desired, restore).await })
            .await
            .ok()
            .flatten()
    }

    async fn check_drift_locked(
        &self,
        desired: OwnedMutexGuard<Desired>,
        restore: bool,
    ) -> Option<DriftSeen> {
        let on_disk = self.refresh_view().await?;
        let Some(expected) = desired.digest else {
            // Never installed and no stamp: nothing to drift from.
            return None;
        };
        let stamp = Stamp {
            generation: desired.generation,
            digest: expected,
            promoted: Default::default(),
            agent: true,
        };
        // The keys alone are not the whole set: a stamp swapped for something
        // else (a FIFO, another generation, garbage) would be obeyed, or
        // refused, at the next start. It is drift too.
        let stamp_problem = if on_disk == Some(expected) {
            let path = self.path.clone();
            let found = blocking(move || repository::read_stamp(&path)).await.ok()?;
            match found {
                Ok(Some(s)) if (s.generation, s.digest) == (desired.generation, expected) => None,
                Ok(Some(s)) => Some(format!(
                    "the stamp on disk says generation {} (digest {}), not installed generation {}",
                    s.generation, s.digest, desired.generation
                )),
                Ok(None) => Some(format!(
                    "the stamp of installed generation {} is gone",
                    desired.generation
                )),
                Err(e) => Some(format!(
                    "{} (installed generation {})",
                    error_chain(&e),
                    desired.generation
                )),
            }
        } else {
            None
        };
        if on_disk == Some(expected) && stamp_problem.is_none() {
            if self.view().drift.is_some() {
                tracing::info!(repository = %self.name, generation = desired.generation, "drift cleared: the repository matches the installed set again");
                self.update_view(|v| v.drift = None);
                self.metrics.set_drifted(&self.name, false);
            }
            return None;
        }
        let detail = stamp_problem.unwrap_or_else(|| drift_detail(&stamp, on_disk));
        let first = self.view().drift.is_none();
        self.update_view(|v| v.drift = Some(detail.clone()));
        if first {
            tracing::warn!(repository = %self.name, %detail, "drift: the repository was changed by someone else");
            self.metrics.drift_event(&self.name);
            self.metrics.set_drifted(&self.name, true);
        }
        let seen = |restored| {
            Some(DriftSeen {
                generation: stamp.generation,
                digest: stamp.digest,
                detail: detail.clone(),
                restored,
            })
        };
        if !restore {
            return if first { seen(None) } else { None };
        }
        let Some(set) = desired.set.clone() else {
            tracing::warn!(repository = %self.name, "cannot restore: the installed set is not known (it changed while the agent was down); waiting for the rotator to push it");
            return if first { seen(None) } else { None };
        };
        match self.write_and_prove(&set, &stamp, &[]).await {
            Ok(_) => {
                tracing::info!(repository = %self.name, generation = stamp.generation, digest = %stamp.digest, "drift restored: re-installed the last installed set");
                self.metrics.installed(&self.name, "restored");
                self.metrics.set_drifted(&self.name, false);
                self.update_view(|v| v.drift = None);
                self.refresh_view().await;
                seen(Some(Ok(())))
            }
            Err(e) => {
                tracing::error!(repository = %self.name, error = %error_chain(&e), "restoring after drift failed");
                seen(Some(Err(error_chain(&e))))
            }
        }
    }

    /// Re-reads the disk into the `GetState` view; returns the on-disk digest
    /// (inner `None`: no usable keys), or `None` when the read itself failed.
    async fn refresh_view(&self) -> Option<Option<Digest>> {
        let (path, owner) = (self.path.clone(), self.owner);
        let disk = blocking(move || Disk::read(&path, owner)).await.ok()?;
        let digest = disk.digest();
        self.update_view(|v| {
            v.digest = digest;
            v.indices = disk.keys.as_ref().map(KeySet::indices).unwrap_or_default();
            v.problem = disk.problem;
        });
        Some(digest)
    }
}

/// The owner of the repository's stamp, when it is there (not followed).
fn stamp_owner(path: &Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::symlink_metadata(path.join(repository::STAMP_FILE))
        .ok()
        .map(|m| m.uid())
}

fn drift_detail(stamp: &Stamp, on_disk: Option<Digest>) -> String {
    match on_disk {
        Some(found) => format!(
            "on-disk digest {found} differs from installed generation {} (digest {})",
            stamp.generation, stamp.digest
        ),
        None => format!(
            "the repository cannot be read; installed generation {} (digest {})",
            stamp.generation, stamp.digest
        ),
    }
}

fn elapsed_micros(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// What an offered generation is to what is installed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Accept {
    /// Newer (or a first install, or an explicit restore): install it.
    New,
    /// The installed generation again: prove it from disk, re-install if it drifted.
    Again,
}

/// The rollback and fork rule: `offered` (generation, digest) against what is
/// `installed`, if anything. An older generation is refused unless `restore`
/// says so explicitly; the installed generation with another digest always.
fn accept(
    installed: Option<(u64, Digest)>,
    offered: (u64, Digest),
    restore: bool,
) -> Result<Accept, Refusal> {
    let Some((generation, digest)) = installed else {
        return Ok(Accept::New);
    };
    if offered.0 < generation && !restore {
        return Err(Refusal::Rollback {
            offered: offered.0,
            installed: generation,
        });
    }
    if offered.0 == generation && offered.1 != digest {
        return Err(Refusal::Fork {
            generation,
            installed: digest,
            offered: offered.1,
        });
    }
    Ok(if offered.0 == generation {
        Accept::Again
    } else {
        Accept::New
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn rollback_is_refused_unless_restored_and_a_fork_always() {
        let (a, b) = (Digest([1; 32]), Digest([2; 32]));
        assert_eq!(accept(None, (1, a), false).ok(), Some(Accept::New));
        assert_eq!(accept(Some((3, a)), (4, b), false).ok(), Some(Accept::New));
        assert_eq!(
            accept(Some((3, a)), (3, a), false).ok(),
            Some(Accept::Again)
        );
        assert!(matches!(
            accept(Some((3, a)), (2, b), false),
            Err(Refusal::Rollback {
                offered: 2,
                installed: 3
            })
        ));
        assert_eq!(accept(Some((3, a)), (2, b), true).ok(), Some(Accept::New));
        for restore in [false, true] {
            assert!(matches!(
                accept(Some((3, a)), (3, b), restore),
                Err(Refusal::Fork { generation: 3, .. })
            ));
        }
    }

    use super::*;
    use crate::repository::Key;
    use std::time::Duration;

    fn sample() -> KeySet {
        KeySet::from_keys((0..3).map(|i| (i, Key::generate())))
    }

    fn canary(set: &KeySet, index: u32) -> pb::Canary {
        pb::Canary {
            token: crate::token::canary(set.get(index).expect("key")),
            key_index: index,
        }
    }

    fn installed(dir: &Path, set: &KeySet, generation: u64) -> Stamp {
        let stamp = Stamp {
            generation,
            digest: set.digest(),
            promoted: Default::default(),
            agent: true,
        };
        install::install(dir, set, Some(&stamp), None).expect("install");
        stamp
    }

    #[test]
    fn proof_reloads_the_disk_and_checks_digest_stamp_and_canaries() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let repo = tmp.path().join("keys");
        let set = sample();
        let stamp = installed(&repo, &set, 4);
        let canaries = [canary(&set, 2), canary(&set, 0)];
        prove(&repo, &stamp, &canaries).expect("the installed set proves itself");

        let later = Stamp {
            generation: 5,
            ..stamp.clone()
        };
        assert!(matches!(
            prove(&repo, &later, &canaries),
            Err(ProofError::StampMismatch {
                expected: 5,
                found: Some(4)
            })
        ));
        let wrong = [pb::Canary {
            key_index: 1,
            ..canary(&set, 2)
        }];
        assert!(matches!(
            prove(&repo, &stamp, &wrong),
            Err(ProofError::Canary(CanaryError::WrongKey {
                key_index: 1,
                actual: 2,
                ..
            }))
        ));
        std::fs::write(repo.join("1"), Key::generate().to_base64().as_bytes()).expect("tamper");
        assert!(matches!(
            prove(&repo, &stamp, &canaries),
            Err(ProofError::Digest { .. })
        ));
    }

    fn request(set: &KeySet, generation: u64) -> pb::InstallRequest {
        pb::InstallRequest {
            repository: "tokens".into(),
            generation,
            keys: check::to_wire(set),
            digest: set.digest().0.to_vec(),
            canaries: vec![
                canary(set, set.primary_index().expect("primary")),
                canary(set, 0),
            ],
            restore: false,
            promoted_unix: Default::default(),
            emergency_purge: false,
        }
    }

    #[tokio::test]
    async fn a_repository_that_fails_its_proof_is_put_back() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let repo = tmp.path().join("keys");
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = AgentMetrics::register(&mut registry);
        let managed =
            Arc::new(Managed::open("tokens".into(), repo.clone(), None, metrics).expect("open"));
        let g1 = sample();
        managed.install(request(&g1, 1)).await.expect("install g1");

        // Between the swap and the proof, someone truncates the new primary.
        let g2 = crate::repository::rotate(&g1, 3).expect("rotate");
        *managed.after_install.lock().expect("hook") = Some(Box::new(|path: &Path| {
            std::fs::write(path.join("3"), b"truncated").expect("tamper");
        }));
        let refusal = managed
            .install(request(&g2, 2))
            .await
            .expect_err("unproven");
        assert!(matches!(
            refusal,
            Refusal::Unproven {
                restored: "the previous generation was restored",
                source: ProofError::Load(_)
            }
        ));
        assert_eq!(refusal.to_status().code(), tonic::Code::DataLoss);
        assert_eq!(
            repository::load(&repo).expect("reload").digest(),
            g1.digest()
        );
        let stamp = repository::read_stamp(&repo)
            .expect("stamp")
            .expect("stamped");
        assert_eq!((stamp.generation, stamp.digest), (1, g1.digest()));
        assert_eq!(managed.view().generation, 1);

        // Nothing was lost: the same push succeeds once the disk behaves.
        let done = managed.install(request(&g2, 2)).await.expect("install g2");
        assert_eq!((done.generation, done.unchanged), (2, false));
    }

    #[test]
    fn a_repository_changed_while_down_is_drift_at_start() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let repo = tmp.path().join("keys");
        let set = sample();
        installed(&repo, &set, 9);
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = AgentMetrics::register(&mut registry);

        let clean =
            Managed::open("tokens".into(), repo.clone(), None, metrics.clone()).expect("open");
        let view = clean.view();
        assert_eq!(
            (view.generation, view.digest, view.drift),
            (9, Some(set.digest()), None)
        );

        std::fs::remove_file(repo.join("1")).expect("remove a key");
        let drifted = Managed::open("tokens".into(), repo, None, metrics).expect("open");
        let view = drifted.view();
        assert_eq!(view.generation, 9);
        assert!(
            view.drift
                .expect("drift")
                .contains("differs from installed generation 9")
        );
        assert_eq!(view.indices, vec![0, 2]);
    }
    fn open_managed(repo: &Path) -> Arc<Managed> {
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = AgentMetrics::register(&mut registry);
        Arc::new(Managed::open("tokens".into(), repo.to_path_buf(), None, metrics).expect("open"))
    }

    /// The call is cancelled while its swap is in progress (held there by the
    /// fault hook); the rotator's retry must wait for that install and find it
    /// done, not run a second install beside it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancelled_install_completes_before_the_next_one_starts() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let repo = tmp.path().join("keys");
        let managed = open_managed(&repo);
        let g1 = sample();
        managed.install(request(&g1, 1)).await.expect("install g1");
        let g2 = crate::repository::rotate(&g1, 3).expect("rotate");

        let (reached_tx, reached) = std::sync::mpsc::channel::<()>();
        let (release, release_rx) = std::sync::mpsc::channel::<()>();
        *managed.after_install.lock().expect("hook") = Some(Box::new(move |_: &Path| {
            let _ = reached_tx.send(());
            let _ = release_rx.recv();
        }));
        let call = tokio::spawn({
            let (managed, request) = (managed.clone(), request(&g2, 2));
            async move { managed.install(request).await }
        });
        tokio::task::spawn_blocking(move || reached.recv())
            .await
            .expect("join")
            .expect("the install reached its swap");
        // The rotator's deadline passes: tonic drops the handler.
        call.abort();
        assert!(call.await.expect_err("aborted").is_cancelled());
        let retry = tokio::spawn({
            let (managed, request) = (managed.clone(), request(&g2, 2));
            async move { managed.install(request).await }
        });
        release.send(()).expect("release the first install");
        let retry = retry.await.expect("join").expect("the retry succeeds");
        assert_eq!(
            (retry.generation, retry.unchanged),
            (2, true),
            "the retry found the cancelled install done, not running"
        );
        managed.check_drift(false).await;
        let view = managed.view();
        assert_eq!((view.generation, view.drift), (2, None));
    }

    /// Calls cancelled at random points, each followed by the rotator's retry,
    /// while a reader samples the stamp the way an operator's tools would: the
    /// generation on disk never goes down, every retry succeeds, and the agent's
    /// memory always agrees with the disk.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn installs_cancelled_at_random_points_never_go_back() {
        const ROUNDS: u64 = 60;
        let tmp = tempfile::tempdir().expect("tempdir");
        let repo = tmp.path().join("keys");
        let managed = open_managed(&repo);
        let mut set = sample();
        managed.install(request(&set, 1)).await.expect("install g1");

        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sampler = {
            let (repo, stop) = (repo.clone(), stop.clone());
            std::thread::spawn(move || {
                let (mut highest, mut samples) = (0u64, 0u64);
                while !stop.load(std::sync::atomic::Ordering::Acquire) {
                    if let Ok(Some(stamp)) = repository::read_stamp(&repo) {
                        assert!(
                            stamp.generation >= highest,
                            "the repository went back from generation {highest} to {}",
                            stamp.generation
                        );
                        highest = stamp.generation;
                        samples += 1;
                    }
                }
                samples
            })
        };
        for generation in 2..=ROUNDS + 1 {
            let next = crate::repository::rotate(&set, 3).expect("rotate");
            let call = tokio::spawn({
                let (managed, request) = (managed.clone(), request(&next, generation));
                async move { managed.install(request).await }
            });
            // An install takes a few milliseconds here; cancel anywhere in it.
            let point = rand::random_range(0..4000);
            tokio::time::sleep(Duration::from_micros(point)).await;
            call.abort();
            let _ = call.await;
            // Whatever the call's fate, once the repository is quiet its memory
            // and its disk agree, and keep agreeing: no install runs on orphaned.
            managed.quiesce().await;
            let window = std::time::Instant::now() + Duration::from_millis(30);
            while std::time::Instant::now() < window {
                let on_disk = repository::read_stamp(&repo)
                    .expect("stamp")
                    .map(|s| s.generation);
                assert_eq!(
                    on_disk,
                    Some(managed.view().generation),
                    "round {generation}: an install went on after its call was cancelled"
                );
                tokio::task::yield_now().await;
            }
            let retry = managed
                .install(request(&next, generation))
                .await
                .unwrap_or_else(|e| {
                    panic!("retry of generation {generation}: {}", error_chain(&e))
                });
            assert_eq!(retry.generation, generation);
            managed.check_drift(false).await;
            let view = managed.view();
            assert_eq!(
                (view.generation, view.digest, view.drift),
                (generation, Some(next.digest()), None),
                "round {generation}: memory and disk disagree"
            );
            set = next;
        }
        stop.store(true, std::sync::atomic::Ordering::Release);
        let samples = sampler.join().expect("the sampler saw no step back");
        assert!(samples > 0);
    }

    /// The Keystone user rewrites the stamp to generation 2^64-1: reported as
    /// tampering at start, and the rotator's next generation is still installed.
    #[tokio::test]
    async fn a_stamp_the_agent_did_not_write_is_tampering_not_obeyed() {
        use std::os::unix::fs::MetadataExt as _;
        let tmp = tempfile::tempdir().expect("tempdir");
        let repo = tmp.path().join("keys");
        let g1 = sample();
        let managed = open_managed(&repo);
        managed.install(request(&g1, 1)).await.expect("install g1");
        let stamp_path = repo.join(repository::STAMP_FILE);
        assert_eq!(
            std::fs::metadata(&stamp_path).expect("stamp").uid(),
            rustix::process::geteuid().as_raw(),
            "the stamp is the agent's"
        );
        drop(managed);

        let forged = Stamp {
            generation: u64::MAX,
            digest: g1.digest(),
            promoted: Default::default(),
            agent: true,
        };
        std::fs::remove_file(&stamp_path).expect("unlink");
        std::fs::write(&stamp_path, forged.encode()).expect("forge");
        let other = rustix::process::geteuid().as_raw() + 4242;
        std::os::unix::fs::chown(&stamp_path, Some(other), None)
            .expect("give the stamp away (the test runs as root)");

        let managed = open_managed(&repo);
        let view = managed.view();
        assert!(
            view.drift
                .as_deref()
                .is_some_and(|d| d.contains("tampering")),
            "{view:?}"
        );
        assert_eq!(view.generation, 0);
        let g2 = crate::repository::rotate(&g1, 3).expect("rotate");
        let done = managed
            .install(request(&g2, 2))
            .await
            .expect("the next generation is not refused as a rollback");
        assert_eq!(done.generation, 2);
    }
}
