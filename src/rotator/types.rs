//! The rotator's vocabulary: ids of agents and repositories, a committed
//! [`Generation`] with its Install request encoded once, a repository's slot,
//! what an agent holds, and what kind of repository one is. Every other
//! rotator module builds on these; they import none of them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use zeroize::{Zeroize as _, Zeroizing};

use super::RotatorError;
use super::ledger::{Ledger, QuarantineRecord};
use super::state::Committed;
use crate::config::RepoKind;
use crate::pb;
use crate::repository::{Digest, KeySet};

/// An `InstallRequest` encoded once, with its gRPC prefix, shared by every
/// push of its generation (as the owner of a `Bytes`). It holds key material:
/// wiped when the last push and the generation are gone.
pub(super) struct EncodedInstall(pub(super) Zeroizing<Vec<u8>>);

impl AsRef<[u8]> for EncodedInstall {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// One committed generation of a repository, with its Install request encoded
/// once for every push.
pub(super) struct Generation {
    pub(super) number: u64,
    pub(super) keys: KeySet,
    pub(super) digest: Digest,
    /// Framed for gRPC; clones share the bytes.
    encoded: bytes::Bytes,
}

impl std::fmt::Debug for Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generation")
            .field("number", &self.number)
            .field("digest", &self.digest)
            .field("indices", &self.keys.indices())
            .finish()
    }
}

impl Generation {
    /// Encodes the Install request for `keys` as generation `number`, with
    /// canary tokens made with the primary and the staged key.
    pub(super) fn build(
        repository: &str,
        number: u64,
        keys: KeySet,
        promoted_unix: BTreeMap<u32, i64>,
    ) -> Result<Self, RotatorError> {
        Self::build_with(repository, number, keys, promoted_unix, false)
    }

    /// [`Generation::build`], marked an emergency purge when `emergency_purge`:
    /// agents then accept it without the previous generation's primary.
    pub(super) fn build_with(
        repository: &str,
        number: u64,
        keys: KeySet,
        promoted_unix: BTreeMap<u32, i64>,
        emergency_purge: bool,
    ) -> Result<Self, RotatorError> {
        let (Some(primary_index), Some(primary), Some(staged)) =
            (keys.primary_index(), keys.primary(), keys.staged())
        else {
            return Err(RotatorError::Incomplete(repository.to_owned()));
        };
        let digest = keys.digest();
        let mut request = pb::InstallRequest {
            repository: repository.to_owned(),
            generation: number,
            keys: keys
                .iter()
                .map(|(index, key)| pb::Key {
                    index,
                    material: key.as_bytes().to_vec(),
                })
                .collect(),
            digest: digest.0.to_vec(),
            canaries: vec![
                pb::Canary {
                    token: crate::token::canary(primary),
                    key_index: primary_index,
                },
                pb::Canary {
                    token: crate::token::canary(staged),
                    key_index: 0,
                },
            ],
            restore: false,
            promoted_unix: promoted_unix.into_iter().collect(),
            emergency_purge,
        };
        let encoded = Zeroizing::new(crate::tls::grpc_frame(&Zeroizing::new(
            prost::Message::encode_to_vec(&request),
        )));
        for key in &mut request.keys {
            key.material.zeroize();
        }
        Ok(Generation {
            number,
            keys,
            digest,
            encoded: bytes::Bytes::from_owner(EncodedInstall(encoded)),
        })
    }

    pub(super) fn encoded(&self) -> bytes::Bytes {
        self.encoded.clone()
    }

    pub(super) fn committed(&self) -> Committed {
        Committed {
            generation: self.number,
            keys: self.keys.clone(),
        }
    }
}

/// Why a repository's next rotation is held back.
#[derive(Debug, Clone)]
pub(super) struct Blocked {
    pub(super) reason: String,
    pub(super) regions: Vec<String>,
    /// Held by the key-lifetime rule until then (Unix ms; `Some(0)` = until the
    /// purged key is demoted everywhere); `None` for the safety rule.
    pub(super) until_ms: Option<i64>,
}

/// One managed repository.
pub(super) struct RepoSlot {
    pub(super) name: String,
    /// What it holds, which decides how it rotates.
    pub(super) kind: RepoKind,
    pub(super) max_active_keys: usize,
    current: RwLock<Arc<Generation>>,
    blocked: Mutex<Option<Blocked>>,
    /// A scheduled rotation was blocked and is owed once the agents catch up.
    pub(super) overdue: AtomicBool,
    pub(super) next_rotation_ms: AtomicI64,
    /// When an owed scheduled rotation was performed late (Unix ms, 0 = never):
    /// the next cron tick within one interval of it is skipped.
    pub(super) late_rotation_ms: AtomicI64,
    /// The owed rotation is a cron tick deferred after a late one: performing
    /// it does not count as late again (the schedule returns to its grid).
    pub(super) deferred: AtomicBool,
    /// When each key was created, promoted and demoted; durable in the state.
    pub(super) ledger: Mutex<Ledger>,
    pub(super) ledger_dirty: AtomicBool,
    /// Where `Core::all_hold_current` resumes.
    pub(super) demotion_cursor: AtomicUsize,
    /// Quarantined agents and the keys pinned for them, as last stored.
    quarantine: Mutex<QuarantineRecord>,
}

impl RepoSlot {
    pub(super) fn new(
        name: String,
        max_active_keys: usize,
        generation: Generation,
        ledger: Ledger,
    ) -> Self {
        RepoSlot {
            kind: RepoKind::of(&name),
            name,
            max_active_keys,
            current: RwLock::new(Arc::new(generation)),
            blocked: Mutex::new(None),
            overdue: AtomicBool::new(false),
            next_rotation_ms: AtomicI64::new(0),
            late_rotation_ms: AtomicI64::new(0),
            deferred: AtomicBool::new(false),
            ledger: Mutex::new(ledger),
            ledger_dirty: AtomicBool::new(false),
            demotion_cursor: AtomicUsize::new(0),
            quarantine: Mutex::new(QuarantineRecord::default()),
        }
    }

    pub(super) fn ledger(&self) -> MutexGuard<'_, Ledger> {
        lock(&self.ledger)
    }

    /// The quarantine record as last stored (change it only after storing).
    pub(super) fn quarantine(&self) -> MutexGuard<'_, QuarantineRecord> {
        lock(&self.quarantine)
    }

    pub(super) fn current(&self) -> Arc<Generation> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(super) fn set_current(&self, generation: Generation) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(generation);
    }

    pub(super) fn blocked(&self) -> Option<Blocked> {
        lock(&self.blocked).clone()
    }

    /// The agent table changed: `Core::all_hold_current` starts over.
    pub(super) fn reset_demotion_cursor(&self) {
        self.demotion_cursor.store(0, Ordering::Release);
    }

    pub(super) fn set_blocked(&self, blocked: Option<Blocked>) {
        *lock(&self.blocked) = blocked;
    }
}

/// What an agent was last seen holding for one repository.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Held {
    pub(super) generation: u64,
    pub(super) digest: Option<Digest>,
    /// Unix time (ms) it was last confirmed; 0 = never.
    pub(super) unix_ms: i64,
    /// The agent reported that its on-disk repository differs from what it installed.
    pub(super) drift: bool,
    /// Read from the rotator's disk at start, not yet confirmed by the agent:
    /// shown in status, never counted by the safety rule.
    pub(super) restored: bool,
}

/// An enrolled agent: its slot in `Core`'s agent table, never reused in the
/// process (a reload retires slots and appends new ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) struct AgentId(pub(super) usize);

/// A managed repository: its position in `Core`'s repositories and in every
/// agent's [`Held`] row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) struct RepoId(pub(super) usize);

impl std::ops::Index<RepoId> for Vec<RepoSlot> {
    type Output = RepoSlot;
    fn index(&self, id: RepoId) -> &RepoSlot {
        &self[id.0]
    }
}

impl std::ops::Index<RepoId> for Vec<Held> {
    type Output = Held;
    fn index(&self, id: RepoId) -> &Held {
        &self[id.0]
    }
}

impl std::ops::IndexMut<RepoId> for Vec<Held> {
    fn index_mut(&mut self, id: RepoId) -> &mut Held {
        &mut self[id.0]
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(super) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A Unix time in ms as RFC 3339 (UTC, seconds).
pub(super) fn rfc3339(ms: i64) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| ms.to_string())
}

/// What a rotation is asked (`admin rotate`, the schedule).
#[derive(Debug, Clone, Default)]
pub(super) struct RotateOrder {
    /// All but the credential repository when empty.
    pub(super) repositories: Vec<String>,
    /// Skip the safety rule (never the key-lifetime rule).
    pub(super) force: bool,
    pub(super) dry_run: bool,
    /// Answer once committed, without waiting for acknowledgements.
    pub(super) no_wait: bool,
    /// How long to wait for acknowledgements (0 = `fanout.ack_wait`).
    pub(super) wait_ms: u64,
}

/// What an emergency purge of one key is asked (`admin purge-key`).
#[derive(Debug, Clone, Default)]
pub(super) struct PurgeOrder {
    pub(super) repository: String,
    pub(super) index: u32,
    pub(super) force: bool,
    pub(super) wait_ms: u64,
}

/// A key a rotation purges, with when its last tokens were issued and when
/// that is safe (Unix ms, 0 = unknown).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Purged {
    pub(super) index: u32,
    pub(super) demoted_unix_ms: i64,
    pub(super) safe_unix_ms: i64,
}

/// What one repository's rotation (or purge) did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Outcome {
    pub(super) repository: String,
    pub(super) rotated: bool,
    pub(super) generation: u64,
    pub(super) digest: Vec<u8>,
    pub(super) indices: Vec<u32>,
    /// Regions (agent labels) that do not hold the generation yet.
    pub(super) pending_regions: Vec<String>,
    /// Regions that will reject tokens of the new primary (`--force`).
    pub(super) rejecting_regions: Vec<String>,
    pub(super) message: String,
    pub(super) promoted_index: u32,
    pub(super) purged: Vec<Purged>,
    pub(super) safe_unix_ms: i64,
    pub(super) held_for_lifetime: bool,
}

/// Something that happened, for `Watch` clients.
#[derive(Debug, Clone, Default)]
pub(super) struct Event {
    pub(super) unix_ms: i64,
    pub(super) kind: String,
    pub(super) repository: String,
    pub(super) region: String,
    pub(super) generation: u64,
    pub(super) message: String,
    pub(super) agent: String,
}

/// What an agent says it holds (its `GetState` answer).
#[derive(Debug, Clone, Default)]
pub(super) struct Report {
    pub(super) region: String,
    pub(super) repositories: Vec<RepoReport>,
}

/// One repository of a [`Report`].
#[derive(Debug, Clone, Default)]
pub(super) struct RepoReport {
    pub(super) name: String,
    pub(super) generation: u64,
    pub(super) digest: Vec<u8>,
    pub(super) drift: bool,
    pub(super) drift_detail: String,
}

/// An agent's answer to a push (its `Install` answer).
#[derive(Debug, Clone, Default)]
pub(super) struct Answer {
    pub(super) generation: u64,
    pub(super) digest: Vec<u8>,
    pub(super) canaries_valid: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_encoded_install_request_carries_the_set_and_canaries_for_primary_and_staged() {
        let keys = crate::repository::init(3).expect("init");
        let g = Generation::build("tokens", 4, keys.clone(), BTreeMap::new()).expect("build");
        let framed = g.encoded();
        // One uncompressed gRPC frame: flag 0, then the message's length.
        assert_eq!(framed[0], 0);
        assert_eq!(
            u32::from_be_bytes([framed[1], framed[2], framed[3], framed[4]]) as usize,
            framed.len() - 5
        );
        let decoded: pb::InstallRequest = prost::Message::decode(&framed[5..]).expect("decodes");
        assert_eq!(decoded.generation, 4);
        assert_eq!(decoded.digest, keys.digest().0.to_vec());
        assert_eq!(decoded.keys.len(), keys.len());
        let ring = crate::token::Keyring::new(&keys);
        let indices: Vec<u32> = decoded.canaries.iter().map(|c| c.key_index).collect();
        assert_eq!(indices, vec![keys.primary_index().expect("primary"), 0]);
        for c in &decoded.canaries {
            assert_eq!(
                ring.decrypt(&c.token).expect("decrypts").key_index,
                c.key_index
            );
        }
        assert!(!format!("{g:?}").contains(keys.staged().expect("staged").to_base64().as_str()));
    }
}
