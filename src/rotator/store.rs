//! The rotator's durable state behind one [`Store`], chosen once at start-up
//! ([`open`]): the state directory of a single rotator (`Files`), etcd under
//! `[ha]` (`Etcd`), or memory for tests. It owns every durable operation the
//! rotator makes: a repository's committed generation and key ledger (loaded
//! and committed together), the agents' acknowledgements, named records (the
//! credential migrate's), and the first start (`first.rs`: an import, a fresh
//! set, or a single rotator's files moved into etcd). [`slot`] is the one
//! conversion of a committed set and its ledger into a repository slot.
//!
//! A commit writes the ledger and the set together before anything is sent:
//! with files the ledger, then the set (each atomically); with etcd one fenced
//! transaction (`ha.rs`), so a deposed leader commits nothing.

mod first;

use std::sync::Arc;

use super::RotatorError;
use super::ha::{EtcdState, HaError};
use super::ledger::Ledger;
use super::state::{Acks, Committed, StateError, StateStore};
use super::types::{Generation, RepoSlot, now_ms};
use crate::config::RepositoryConfig;

pub(super) use first::{StartOptions, open, prepare_imports};

/// The record kind of the credential repository's last migrate.
pub(super) const CREDENTIAL_MIGRATE: &str = "migrate";

/// Where the rotator's durable state lives; cheap to clone.
#[derive(Clone)]
pub(super) enum Store {
    /// A single rotator's state directory.
    Files(StateStore),
    /// `[ha]`: every write one fenced etcd transaction.
    Etcd(Arc<EtcdState>),
    /// Tests: the same contract, kept in memory.
    #[cfg(test)]
    Memory(Arc<std::sync::Mutex<Memory>>),
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Store::Files(_) => "Store::Files",
            Store::Etcd(_) => "Store::Etcd",
            #[cfg(test)]
            Store::Memory(_) => "Store::Memory",
        })
    }
}

/// What a durable operation can fail with.
#[derive(Debug, thiserror::Error)]
pub(super) enum StoreError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Ha(#[from] HaError),
    #[error("the state writer failed: {0}")]
    Task(String),
}

impl StoreError {
    /// Whether the store holds the generation being committed with other keys.
    pub(super) fn is_fork(&self) -> bool {
        matches!(self, StoreError::Ha(HaError::Fork { .. }))
    }
}

impl From<StoreError> for RotatorError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::State(e) => RotatorError::State(e),
            StoreError::Ha(e) => RotatorError::Ha(e),
            StoreError::Task(e) => RotatorError::Task(e),
        }
    }
}

/// The state of a [`Store::Memory`].
#[cfg(test)]
#[derive(Debug, Default)]
pub(super) struct Memory {
    repos: std::collections::BTreeMap<String, (Committed, Option<Ledger>)>,
    acks: Acks,
    records: std::collections::BTreeMap<(String, String), serde_json::Value>,
}

/// Runs blocking file work off the runtime.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, StateError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
        .map_err(StoreError::from)
}

impl Store {
    /// An empty memory store (tests).
    #[cfg(test)]
    pub(super) fn memory() -> Store {
        Store::Memory(Default::default())
    }

    /// Sets what a memory store holds for `name` (tests).
    #[cfg(test)]
    pub(super) fn put_committed(&self, name: &str, committed: Committed, ledger: Ledger) {
        if let Store::Memory(m) = self {
            Self::mem(m)
                .repos
                .insert(name.to_owned(), (committed, Some(ledger)));
        }
    }

    #[cfg(test)]
    fn mem(m: &std::sync::Mutex<Memory>) -> std::sync::MutexGuard<'_, Memory> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The leadership this store is fenced by, under `[ha]`.
    pub(super) fn leadership(&self) -> Option<Arc<EtcdState>> {
        match self {
            Store::Etcd(etcd) => Some(etcd.clone()),
            _ => None,
        }
    }

    /// The committed generation of `name` and its ledger, if any.
    pub(super) async fn load(
        &self,
        name: &str,
    ) -> Result<Option<(Committed, Option<Ledger>)>, StoreError> {
        match self {
            Store::Files(files) => {
                let (files, name) = (files.clone(), name.to_owned());
                blocking(move || {
                    let Some(committed) = files.load(&name)? else {
                        return Ok(None);
                    };
                    let ledger = files.load_ledger(&name, committed.generation)?;
                    Ok(Some((committed, ledger)))
                })
                .await
            }
            Store::Etcd(etcd) => Ok(etcd.load(name).await?),
            #[cfg(test)]
            Store::Memory(m) => Ok(Self::mem(m).repos.get(name).cloned()),
        }
    }

    /// The committed generation of `name`, without its ledger (tests).
    #[cfg(test)]
    pub(super) async fn committed(&self, name: &str) -> Result<Option<Committed>, StoreError> {
        Ok(self.load(name).await?.map(|(committed, _)| committed))
    }

    /// Durably commits a generation with its ledger: nothing of it may be sent
    /// before this returns.
    pub(super) async fn commit(
        &self,
        name: &str,
        ledger: &Ledger,
        committed: &Committed,
    ) -> Result<(), StoreError> {
        match self {
            Store::Files(files) => {
                let (files, name) = (files.clone(), name.to_owned());
                let (ledger, committed) = (ledger.clone(), committed.clone());
                blocking(move || {
                    files.save_ledger(&name, committed.generation, &ledger)?;
                    files.save(&name, &committed)
                })
                .await
            }
            Store::Etcd(etcd) => Ok(etcd.commit(name, ledger, committed).await?),
            // Off the runtime like a file write, so a cancelled caller races it
            // as it would race the disk.
            #[cfg(test)]
            Store::Memory(m) => {
                let (m, name) = (m.clone(), name.to_owned());
                let saved = (committed.clone(), Some(ledger.clone()));
                blocking(move || {
                    Self::mem(&m).repos.insert(name, saved);
                    Ok(())
                })
                .await
            }
        }
    }

    /// Records the ledger of `name` (times only) between commits; it belongs
    /// to the committed `generation` (and is sealed bound to it).
    pub(super) async fn save_ledger(
        &self,
        name: &str,
        generation: u64,
        ledger: &Ledger,
    ) -> Result<(), StoreError> {
        match self {
            Store::Files(files) => {
                let (files, name, ledger) = (files.clone(), name.to_owned(), ledger.clone());
                blocking(move || files.save_ledger(&name, generation, &ledger)).await
            }
            Store::Etcd(etcd) => Ok(etcd.save_ledger(name, generation, ledger).await?),
            #[cfg(test)]
            Store::Memory(m) => {
                if let Some((_, saved)) = Self::mem(m).repos.get_mut(name) {
                    *saved = Some(ledger.clone());
                }
                Ok(())
            }
        }
    }

    /// The acknowledgements recorded last; empty when none.
    pub(super) async fn load_acks(&self) -> Result<Acks, StoreError> {
        match self {
            Store::Files(files) => {
                let files = files.clone();
                blocking(move || files.load_acks()).await
            }
            Store::Etcd(etcd) => Ok(etcd.load_acks().await?),
            #[cfg(test)]
            Store::Memory(m) => Ok(Self::mem(m).acks.clone()),
        }
    }

    /// Records the acknowledgements (a hint for the next start or leader).
    pub(super) async fn save_acks(&self, acks: Acks) -> Result<(), StoreError> {
        match self {
            Store::Files(files) => {
                let files = files.clone();
                blocking(move || files.save_acks(&acks)).await
            }
            Store::Etcd(etcd) => Ok(etcd.save_acks(&acks).await?),
            #[cfg(test)]
            Store::Memory(m) => {
                Self::mem(m).acks = acks;
                Ok(())
            }
        }
    }

    /// Refuses to start from a generation below one the agents acknowledged
    /// (the acknowledgements this store recorded): a rolled-back or replayed
    /// state, whichever engine holds it.
    pub(super) async fn check_acknowledged(&self, repos: &[RepoSlot]) -> Result<(), StoreError> {
        let acks = self.load_acks().await?;
        for repo in repos {
            super::state::check_acknowledged(&repo.name, repo.current().number, &acks)?;
        }
        Ok(())
    }

    /// The record `kind` of repository `name` (JSON, no key material).
    pub(super) async fn load_record<T: serde::de::DeserializeOwned + Send + 'static>(
        &self,
        name: &str,
        kind: &str,
    ) -> Result<Option<T>, StoreError> {
        match self {
            Store::Files(files) => {
                let (files, name, kind) = (files.clone(), name.to_owned(), kind.to_owned());
                blocking(move || files.load_record(&name, &kind)).await
            }
            Store::Etcd(etcd) => Ok(etcd.load_record(name, kind).await?),
            #[cfg(test)]
            Store::Memory(m) => Ok(Self::mem(m)
                .records
                .get(&(name.to_owned(), kind.to_owned()))
                .and_then(|v| serde_json::from_value(v.clone()).ok())),
        }
    }

    /// Durably records `record` as the record `kind` of repository `name`.
    pub(super) async fn save_record<T: serde::Serialize + Send + Sync + Clone + 'static>(
        &self,
        name: &str,
        kind: &str,
        record: &T,
    ) -> Result<(), StoreError> {
        match self {
            Store::Files(files) => {
                let (files, name, kind) = (files.clone(), name.to_owned(), kind.to_owned());
                let record = record.clone();
                blocking(move || files.save_record(&name, &kind, &record)).await
            }
            Store::Etcd(etcd) => Ok(etcd.save_record(name, kind, record).await?),
            #[cfg(test)]
            Store::Memory(m) => {
                let value = serde_json::to_value(record)
                    .map_err(|e| StoreError::Task(format!("cannot encode the record: {e}")))?;
                Self::mem(m)
                    .records
                    .insert((name.to_owned(), kind.to_owned()), value);
                Ok(())
            }
        }
    }
}

/// The record kind of `admin purge-key`'s mark.
pub(super) const EMERGENCY_PURGE: &str = "purge";

/// The generation of a repository that `admin purge-key` committed: its
/// pushes are marked an emergency purge (agents accept it without the
/// previous primary), after a restart or a failover too. Recorded before the
/// commit; a mark naming a generation that never got committed marks at worst
/// a later rotation, which keeps the primary anyway.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub(super) struct EmergencyPurge {
    pub(super) generation: u64,
}

impl EmergencyPurge {
    /// Whether `mark` (as loaded) marks `generation`; an unreadable mark marks
    /// nothing, said in the log.
    pub(super) fn marks<E: std::error::Error>(
        mark: Result<Option<EmergencyPurge>, E>,
        name: &str,
        generation: u64,
    ) -> bool {
        match mark {
            Ok(mark) => mark.is_some_and(|m| m.generation == generation),
            Err(error) => {
                tracing::warn!(repository = name, error = %crate::error_chain(&error), "cannot read the emergency purge record: the current generation is not marked");
                false
            }
        }
    }
}

impl Store {
    /// Whether generation `generation` of `name` is an emergency purge.
    pub(super) async fn marked_emergency(&self, name: &str, generation: u64) -> bool {
        EmergencyPurge::marks(
            self.load_record(name, EMERGENCY_PURGE).await,
            name,
            generation,
        )
    }
}

/// A committed set and its ledger as the rotator holds them: keys the ledger
/// does not know (no ledger yet, or one older than the set) are taken as
/// demoted now, the safe choice. Returns the generation, its ledger, and the
/// indices so adopted.
pub(super) fn generation_of(
    name: &str,
    committed: Committed,
    ledger: Option<Ledger>,
    emergency_purge: bool,
) -> Result<(Generation, Ledger, Vec<u32>), RotatorError> {
    let mut ledger = ledger.unwrap_or_default();
    let adopted = ledger.adopt_unknown(&committed.keys, now_ms());
    let generation = Generation::build_with(
        name,
        committed.generation,
        committed.keys,
        ledger.promoted_unix(),
        emergency_purge,
    )?;
    Ok((generation, ledger, adopted))
}

/// The slot of repository `repo` holding a committed set and its ledger.
pub(super) fn slot(
    repo: &RepositoryConfig,
    committed: Committed,
    ledger: Option<Ledger>,
    emergency_purge: bool,
) -> Result<RepoSlot, RotatorError> {
    let (generation, ledger, _) = generation_of(&repo.name, committed, ledger, emergency_purge)?;
    Ok(RepoSlot::new(
        repo.name.clone(),
        repo.max_active_keys,
        generation,
        ledger,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_memory_store_keeps_what_was_committed_with_its_ledger_and_records() {
        let store = Store::memory();
        assert!(store.load("tokens").await.expect("load").is_none());
        let keys = crate::repository::init(3).expect("init");
        let ledger = Ledger::fresh(&keys, now_ms());
        let committed = Committed {
            generation: 1,
            keys: keys.clone(),
        };
        store
            .commit("tokens", &ledger, &committed)
            .await
            .expect("commit");
        let (loaded, saved) = store.load("tokens").await.expect("load").expect("state");
        assert_eq!(loaded.generation, 1);
        assert_eq!(loaded.keys.digest(), keys.digest());
        assert_eq!(saved, Some(ledger));
        store
            .save_record("credential", "migrate", &vec![1u32, 2])
            .await
            .expect("record");
        let back: Option<Vec<u32>> = store
            .load_record("credential", "migrate")
            .await
            .expect("load record");
        assert_eq!(back, Some(vec![1, 2]));
        let slot = slot(
            &crate::config::RepositoryConfig {
                name: "tokens".into(),
                max_active_keys: 3,
                import: None,
                schedule: None,
            },
            loaded,
            None,
            false,
        )
        .expect("slot");
        assert_eq!(slot.current().number, 1);
        // Without a ledger, the keys' times are unknown: adopted, not lost.
        assert!(!slot.ledger().keys.is_empty());
    }

    /// Whatever the engine, a start refuses a generation below one the
    /// agents acknowledged, naming both.
    #[tokio::test]
    async fn a_generation_below_the_acknowledged_one_is_refused() {
        let store = Store::memory();
        let keys = crate::repository::init(3).expect("init");
        let committed = Committed {
            generation: 3,
            keys: keys.clone(),
        };
        let repo = crate::config::RepositoryConfig {
            name: "tokens".into(),
            max_active_keys: 3,
            import: None,
            schedule: None,
        };
        let slots = vec![slot(&repo, committed, None, false).expect("slot")];
        store.check_acknowledged(&slots).await.expect("no acks yet");
        let mut acks = Acks::new();
        acks.entry("tokens".into()).or_default().insert(
            "RegionTwo".into(),
            super::super::state::AckRecord {
                generation: 7,
                digest: "ab".into(),
                unix_ms: 1,
            },
        );
        store.save_acks(acks).await.expect("acks");
        let e = store
            .check_acknowledged(&slots)
            .await
            .expect_err("behind the agents");
        let shown = e.to_string();
        assert!(
            shown.contains("generation 3")
                && shown.contains("generation 7")
                && shown.contains("RegionTwo"),
            "{shown}"
        );
    }
}
