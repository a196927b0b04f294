//! The first start of a [`Store`]: which store, and each repository's
//! committed generation. A single rotator resumes from its state directory,
//! or adopts `import`, or creates a fresh set, asking its agents first so a
//! lost state directory never silently becomes generation 1. Under `[ha]` the
//! generations come from etcd; the first leader of an empty prefix writes what
//! a single rotator would resume from (its file state, moving to HA, so no
//! agent re-installs anything), and a standby waits until a leader wrote them.

use std::sync::Arc;

use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use super::{Store, slot};
use crate::config::RotatorConfig;
use crate::rotator::RotatorError;
use crate::rotator::fleet::AgentSlot;
use crate::rotator::ha::{EtcdState, HaError};
use crate::rotator::ledger::Ledger;
use crate::rotator::recovery;
use crate::rotator::state::{self, Committed, StateStore};
use crate::rotator::types::{Generation, RepoSlot, now_ms};

/// How a start treats what it finds: `--fresh-start`, `--adopt-clear-state`.
#[derive(Debug, Clone, Copy, Default)]
pub(in crate::rotator) struct StartOptions {
    /// Start at generation 1 (or below what agents acknowledged) on purpose.
    pub fresh_start: bool,
    /// Seal clear state files found with a seal key instead of refusing them.
    pub adopt_clear_state: bool,
}

/// Opens the store `config` names (its state directory, or etcd under
/// `[ha]`) and loads every repository's committed generation, making the
/// first one where there is none. Refuses a generation below one the agents
/// acknowledged, unless `--fresh-start` says the operator starts anew.
pub(in crate::rotator) async fn open(
    config: &RotatorConfig,
    seal: Option<Arc<crate::seal::SealKey>>,
    agents: &[AgentSlot],
    options: StartOptions,
    registry: &mut Registry,
    stop: &CancellationToken,
) -> Result<(Store, Vec<RepoSlot>), RotatorError> {
    let (store, repos) = match &config.ha {
        None => open_files(config, seal, agents, options).await?,
        Some(h) => {
            // Under `[ha]` the file state is only what a first leader imports;
            // it is sealed with `seal_key`, or else `[ha] seal_key`.
            let seal = match seal {
                Some(seal) => seal,
                None => Arc::new(crate::seal::SealKey::load(&h.seal_key)?),
            };
            let dir = config.state_dir.clone();
            let files = tokio::task::spawn_blocking(move || StateStore::open(&dir))
                .await
                .map_err(|e| RotatorError::Task(e.to_string()))??
                .with_seal(seal)
                .adopt_clear_state(options.adopt_clear_state);
            let etcd = Arc::new(EtcdState::connect(config, h, registry).await?);
            let repos =
                prepare_etcd(&etcd, config, &files, agents, options.fresh_start, stop).await?;
            (Store::Etcd(etcd), repos)
        }
    };
    if options.fresh_start {
        tracing::warn!("--fresh-start: the acknowledged generations are not checked");
    } else {
        store.check_acknowledged(&repos).await?;
    }
    Ok((store, repos))
}

/// A single rotator: its state directory, after the fresh-start question.
async fn open_files(
    config: &RotatorConfig,
    seal: Option<Arc<crate::seal::SealKey>>,
    agents: &[AgentSlot],
    options: StartOptions,
) -> Result<(Store, Vec<RepoSlot>), RotatorError> {
    let fresh_start = options.fresh_start;
    // A lost state directory must not silently become generation 1.
    let fresh = recovery::fresh_repositories(&config.repositories, &config.state_dir)?;
    if !fresh.is_empty() && !agents.is_empty() {
        let probe = recovery::probe(agents, &fresh, &config.fanout).await;
        if fresh_start {
            tracing::warn!(held = ?probe.held, "--fresh-start: starting at generation 1 although agents may hold generations; they refuse it until restored");
        } else {
            recovery::refuse_fresh_start(&probe, &config.state_dir)?;
        }
    }
    let config = config.clone();
    tokio::task::spawn_blocking(move || {
        // Read before the state is opened: a bad `import` leaves no state behind.
        let imports = prepare_imports(&config)?;
        let mut files =
            StateStore::open(&config.state_dir)?.adopt_clear_state(options.adopt_clear_state);
        if let Some(seal) = seal {
            files = files.with_seal(seal);
        }
        let repos = load_generations(&config, &files, imports)?;
        Ok::<_, RotatorError>((Store::Files(files), repos))
    })
    .await
    .map_err(|e| RotatorError::Task(e.to_string()))?
}

/// The imports a first start will adopt, by repository position, read before
/// the state is opened so that a bad `import` leaves no state behind. A
/// repository that already has state ignores `import`, so it is not read.
pub(in crate::rotator) fn prepare_imports(
    config: &RotatorConfig,
) -> Result<Vec<Option<recovery::Imported>>, RotatorError> {
    let mut imports = Vec::with_capacity(config.repositories.len());
    for repo in &config.repositories {
        let import = match &repo.import {
            Some(path) if state::is_fresh(&config.state_dir, &repo.name)? => {
                Some(recovery::import_keys(repo, path)?)
            }
            _ => None,
        };
        imports.push(import);
    }
    Ok(imports)
}

/// Loads each repository's committed generation from the state directory,
/// adopting an existing Keystone repository (`imports`, from
/// [`prepare_imports`]) or creating a fresh set on first start, and committing it.
fn load_generations(
    config: &RotatorConfig,
    store: &StateStore,
    imports: Vec<Option<recovery::Imported>>,
) -> Result<Vec<RepoSlot>, RotatorError> {
    let mut slots = Vec::with_capacity(config.repositories.len());
    for (repo, import) in config.repositories.iter().zip(imports) {
        let now = now_ms();
        if let Some(committed) = store.load(&repo.name)? {
            if repo.import.is_some() {
                tracing::info!(repository = %repo.name, "state exists; `import` is only used on first start");
            }
            tracing::info!(repository = %repo.name, generation = committed.generation, digest = %committed.keys.digest(), "resumed from state");
            let recorded = store.load_ledger(&repo.name, committed.generation)?;
            let known = recorded.is_some();
            let number = committed.generation;
            let emergency = super::EmergencyPurge::marks(
                store.load_record(&repo.name, super::EMERGENCY_PURGE),
                &repo.name,
                committed.generation,
            );
            let (generation, ledger, adopted) =
                super::generation_of(&repo.name, committed, recorded, emergency)?;
            if !adopted.is_empty() {
                tracing::warn!(repository = %repo.name, keys = ?adopted, ledger = known, "the key ledger does not know these keys' times: each is taken as demoted now, the safe choice (its purge waits a full token lifetime)");
                store.save_ledger(&repo.name, number, &ledger)?;
            }
            slots.push(RepoSlot::new(
                repo.name.clone(),
                repo.max_active_keys,
                generation,
                ledger,
            ));
            continue;
        }
        let import = match (import, &repo.import) {
            (Some(imported), _) => Some(imported),
            // The state vanished since `prepare_imports` looked.
            (None, Some(path)) => Some(recovery::import_keys(repo, path)?),
            (None, None) => None,
        };
        let (number, keys, ledger) = match import {
            Some(imported) => {
                let ledger = imported.ledger(now);
                if let Some(path) = &repo.import {
                    tracing::info!(repository = %repo.name, path = %path.display(), indices = ?imported.keys.indices(), generation = imported.generation, "adopting existing Keystone repository at the generation of its stamp (1 without one); its keys' times are unknown, so each is taken as demoted now, the safe choice");
                }
                (imported.generation, imported.keys, ledger)
            }
            None => {
                let keys = crate::repository::init(repo.max_active_keys)?;
                let ledger = Ledger::fresh(&keys, now);
                (1, keys, ledger)
            }
        };
        store.save_ledger(&repo.name, number, &ledger)?;
        store.save(
            &repo.name,
            &Committed {
                generation: number,
                keys: keys.clone(),
            },
        )?;
        tracing::info!(repository = %repo.name, generation = number, digest = %keys.digest(), "committed the first generation");
        let generation = Generation::build(&repo.name, number, keys, ledger.promoted_unix())?;
        slots.push(RepoSlot::new(
            repo.name.clone(),
            repo.max_active_keys,
            generation,
            ledger,
        ));
    }
    Ok(slots)
}

/// The repositories at start under `[ha]`: from etcd, or, for the first leader
/// of an empty prefix, from the file state (imported), `import`, or a fresh
/// set, written to etcd. A standby waits until a leader wrote them.
async fn prepare_etcd(
    etcd: &EtcdState,
    config: &RotatorConfig,
    files: &StateStore,
    agents: &[AgentSlot],
    fresh_start: bool,
    stop: &CancellationToken,
) -> Result<Vec<RepoSlot>, RotatorError> {
    loop {
        let mut found = Vec::new();
        let mut all = true;
        for repo in &config.repositories {
            match etcd.load(&repo.name).await {
                Ok(Some(loaded)) => found.push(Some(loaded)),
                Ok(None) => {
                    all = false;
                    found.push(None);
                }
                Err(
                    e @ (HaError::Seal { .. } | HaError::Corrupt { .. } | HaError::Rollback { .. }),
                ) => return Err(e.into()),
                Err(e) => {
                    tracing::warn!(error = %crate::error_chain(&e), "etcd unreachable at start; retrying");
                    all = false;
                    found.clear();
                    break;
                }
            }
        }
        if all && found.len() == config.repositories.len() {
            return slots_from(etcd, config, found.into_iter().flatten().collect()).await;
        }
        if found.len() == config.repositories.len() && etcd.campaign().await.unwrap_or(false) {
            return initialise(etcd, config, files, agents, fresh_start, found).await;
        }
        tokio::select! {
            _ = tokio::time::sleep(etcd.ttl / 3) => {}
            _ = stop.cancelled() => return Err(RotatorError::Task("stopped before start".into())),
        }
    }
}

async fn slots_from(
    etcd: &EtcdState,
    config: &RotatorConfig,
    loaded: Vec<(Committed, Option<Ledger>)>,
) -> Result<Vec<RepoSlot>, RotatorError> {
    let mut slots = Vec::with_capacity(loaded.len());
    for (repo, (committed, ledger)) in config.repositories.iter().zip(loaded) {
        let emergency = super::EmergencyPurge::marks(
            etcd.load_record(&repo.name, super::EMERGENCY_PURGE).await,
            &repo.name,
            committed.generation,
        );
        slots.push(slot(repo, committed, ledger, emergency)?);
    }
    Ok(slots)
}

/// The first leader of an empty prefix writes what a single rotator would
/// resume from: its file state when it has one (moving to HA), else `import`
/// or a fresh set (after asking the agents, as a single rotator does).
async fn initialise(
    etcd: &EtcdState,
    config: &RotatorConfig,
    files: &StateStore,
    agents: &[AgentSlot],
    fresh_start: bool,
    found: Vec<Option<(Committed, Option<Ledger>)>>,
) -> Result<Vec<RepoSlot>, RotatorError> {
    let fresh = recovery::fresh_repositories(&config.repositories, &config.state_dir)?;
    let fresh: Vec<String> = fresh
        .into_iter()
        .filter(|name| {
            config
                .repositories
                .iter()
                .zip(&found)
                .any(|(r, f)| &r.name == name && f.is_none())
        })
        .collect();
    if !fresh.is_empty() && !agents.is_empty() && !fresh_start {
        let probe = recovery::probe(agents, &fresh, &config.fanout).await;
        recovery::refuse_fresh_start(&probe, &config.state_dir)?;
    }
    let (blocking_config, blocking_files) = (config.clone(), files.clone());
    let imports = tokio::task::spawn_blocking(move || {
        let imports = prepare_imports(&blocking_config)?;
        load_generations(&blocking_config, &blocking_files, imports)?;
        Ok::<_, RotatorError>(())
    });
    imports
        .await
        .map_err(|e| RotatorError::Task(e.to_string()))??;
    let mut loaded = Vec::with_capacity(found.len());
    for (repo, existing) in config.repositories.iter().zip(found) {
        if let Some(existing) = existing {
            loaded.push(existing);
            continue;
        }
        let committed = files
            .load(&repo.name)?
            .ok_or_else(|| RotatorError::Incomplete(repo.name.clone()))?;
        let ledger = files
            .load_ledger(&repo.name, committed.generation)?
            .unwrap_or_default();
        etcd.commit(&repo.name, &ledger, &committed).await?;
        tracing::info!(repository = %repo.name, generation = committed.generation, digest = %committed.keys.digest(), "imported the file state into etcd");
        loaded.push((committed, Some(ledger)));
    }
    if let Ok(acks) = files.load_acks()
        && !acks.is_empty()
    {
        let _ = etcd.save_acks(&acks).await;
    }
    // The last credential migrate moves too, so the first credential rotation
    // under `[ha]` needs no new check when one passed.
    let kind = super::CREDENTIAL_MIGRATE;
    if let Ok(Some(record)) =
        files.load_record::<serde_json::Value>(crate::config::CREDENTIAL_REPOSITORY, kind)
    {
        etcd.save_record(crate::config::CREDENTIAL_REPOSITORY, kind, &record)
            .await?;
    }
    // So does the mark of an emergency purge, so its re-pushes stay marked.
    for repo in &config.repositories {
        if let Ok(Some(mark)) =
            files.load_record::<super::EmergencyPurge>(&repo.name, super::EMERGENCY_PURGE)
        {
            etcd.save_record(&repo.name, super::EMERGENCY_PURGE, &mark)
                .await?;
        }
    }
    slots_from(etcd, config, loaded).await
}
