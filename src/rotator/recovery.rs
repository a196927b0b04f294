//! Recovery of a rotator whose state directory was lost. Agents rightly refuse
//! a lower generation, so a rotator that starts afresh at generation 1 while
//! they hold generation G can never push again. Two things prevent that: an
//! imported repository that carries an agent's stamp continues at the stamp's
//! generation and digest (agents holding it see no change, and accept G+1), and
//! a rotator without state asks its agents what they hold before it commits a
//! fresh generation 1, refusing (unless told `--fresh-start`) when any holds
//! one, with the way to import in its message.

use std::path::Path;

use super::RotatorError;
use super::fleet::AgentSlot;
use super::ledger::Ledger;
use crate::config::{FanoutConfig, RepositoryConfig};
use crate::repository::{self, KeySet};

/// A repository read for adoption on a first start.
#[derive(Debug, Clone)]
pub(super) struct Imported {
    pub(super) keys: KeySet,
    /// The generation to continue at: the stamp's, or 1 without a stamp.
    pub(super) generation: u64,
    /// Key index → Unix seconds it became primary, from the stamp.
    pub(super) promoted: std::collections::BTreeMap<u32, i64>,
}

impl Imported {
    /// The ledger of an adopted set: keys not primary are taken as demoted
    /// now (their tokens' age is unknown: the safe choice), and the stamp's
    /// promotion times are kept so the next stamps still carry them.
    pub(super) fn ledger(&self, now_ms: i64) -> Ledger {
        let mut ledger = Ledger::default();
        ledger.adopt_unknown(&self.keys, now_ms);
        for (index, times) in ledger.keys.iter_mut() {
            if let Some(unix) = self.promoted.get(index) {
                times.promoted_ms = Some(unix.saturating_mul(1000));
            }
        }
        ledger
    }
}

/// Reads and checks the existing Keystone repository `repo` adopts on its
/// first start: generation 1, or its stamp's generation when it carries one
/// that matches its keys.
pub(super) fn import_keys(repo: &RepositoryConfig, path: &Path) -> Result<Imported, RotatorError> {
    let keys = repository::load(path).map_err(|source| RotatorError::Import {
        repository: repo.name.clone(),
        path: path.to_path_buf(),
        source,
    })?;
    if keys.staged().is_none() || keys.len() < 2 {
        return Err(RotatorError::ImportIncomplete {
            repository: repo.name.clone(),
            path: path.to_path_buf(),
        });
    }
    let stamp = repository::read_stamp(path).map_err(|source| RotatorError::ImportStamp {
        repository: repo.name.clone(),
        source,
    })?;
    match stamp {
        None => Ok(Imported {
            keys,
            generation: 1,
            promoted: Default::default(),
        }),
        Some(stamp) if stamp.digest == keys.digest() && stamp.generation > 0 => Ok(Imported {
            keys,
            generation: stamp.generation,
            promoted: stamp.promoted,
        }),
        Some(stamp) => Err(RotatorError::ImportStampMismatch {
            repository: repo.name.clone(),
            path: path.to_path_buf(),
            generation: stamp.generation,
        }),
    }
}

/// What agents answered about repositories the rotator has no state for.
#[derive(Debug, Default)]
pub(super) struct Probe {
    /// (repository, agent label, generation) for every agent holding one.
    pub(super) held: Vec<(String, String, u64)>,
    /// Agents that did not answer, with why.
    pub(super) silent: Vec<(String, String)>,
}

/// Asks every agent what it holds of `fresh` (repositories without state and
/// without `import`), as the fan-out calls: `concurrency` at a time, each
/// within `call_timeout`. 10,000 handshakes and answers in flight at once
/// would time out on a small host and leave their buffers' peak in the heap.
pub(super) async fn probe(agents: &[AgentSlot], fresh: &[String], fanout: &FanoutConfig) -> Probe {
    let timeout = fanout.call_timeout;
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(fanout.concurrency.max(1)));
    let mut calls = tokio::task::JoinSet::new();
    for agent in agents {
        let label = agent.label();
        let mut client =
            crate::pb::distribution_client::DistributionClient::new(agent.channel.clone());
        let permits = permits.clone();
        calls.spawn(async move {
            let _permit = permits.acquire_owned().await;
            let mut request = tonic::Request::new(crate::pb::GetStateRequest::default());
            request.set_timeout(timeout);
            let answer = tokio::time::timeout(timeout, client.get_state(request)).await;
            let answer = match answer {
                Ok(Ok(response)) => Ok(response.into_inner()),
                Ok(Err(status)) => Err(crate::describe_status(&status)),
                Err(_) => Err(format!("no answer within {}ms", timeout.as_millis())),
            };
            (label, answer)
        });
    }
    let mut probe = Probe::default();
    while let Some(joined) = calls.join_next().await {
        let Ok((label, answer)) = joined else {
            continue;
        };
        match answer {
            Ok(state) => {
                for rs in state.repositories {
                    if rs.generation > 0 && fresh.contains(&rs.name) {
                        probe.held.push((rs.name, label.clone(), rs.generation));
                    }
                }
            }
            Err(why) => probe.silent.push((label, why)),
        }
    }
    probe.held.sort();
    probe.silent.sort();
    probe
}

/// Refuses a fresh start when an agent holds a generation of a repository
/// without state; warns when agents could not be asked.
pub(super) fn refuse_fresh_start(probe: &Probe, state_dir: &Path) -> Result<(), RotatorError> {
    for (agent, why) in &probe.silent {
        tracing::warn!(agent = %agent, error = %why, "cannot ask this agent what it holds before a fresh start; if it holds a generation it will refuse the rotator's as a rollback");
    }
    let Some((repository, _, _)) = probe.held.first() else {
        return Ok(());
    };
    let held = probe
        .held
        .iter()
        .filter(|(r, _, _)| r == repository)
        .map(|(_, agent, generation)| format!("{agent} at generation {generation}"))
        .collect::<Vec<_>>()
        .join(", ");
    Err(RotatorError::FreshStartRefused {
        repository: repository.clone(),
        state_dir: state_dir.to_path_buf(),
        held,
    })
}

/// The repositories of `repos` a start would create fresh: no state, no import.
pub(super) fn fresh_repositories(
    repos: &[RepositoryConfig],
    state_dir: &Path,
) -> Result<Vec<String>, RotatorError> {
    let mut fresh = Vec::new();
    for repo in repos {
        if repo.import.is_none() && super::state::is_fresh(state_dir, &repo.name)? {
            fresh.push(repo.name.clone());
        }
    }
    Ok(fresh)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo() -> RepositoryConfig {
        RepositoryConfig {
            name: "tokens".into(),
            max_active_keys: 4,
            import: None,
            schedule: None,
        }
    }

    fn stamped(dir: &Path, keys: &KeySet, generation: u64, digest: crate::repository::Digest) {
        for (index, key) in keys.iter() {
            std::fs::write(dir.join(index.to_string()), key.to_base64().as_bytes()).expect("key");
        }
        let stamp = crate::repository::Stamp {
            generation,
            digest,
            promoted: [(keys.primary_index().expect("primary"), 1_700_000_000)].into(),
            agent: true,
        };
        std::fs::write(dir.join(crate::repository::STAMP_FILE), stamp.encode()).expect("stamp");
    }

    #[test]
    fn a_stamped_repository_continues_at_its_generation_and_a_changed_one_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let keys = repository::init(4).expect("init");
        stamped(dir.path(), &keys, 9, keys.digest());
        let imported = import_keys(&repo(), dir.path()).expect("import");
        assert_eq!(imported.generation, 9);
        assert_eq!(imported.keys, keys);
        let primary = keys.primary_index().expect("primary");
        let ledger = imported.ledger(5);
        assert_eq!(ledger.promoted_unix().get(&primary), Some(&1_700_000_000));
        // Another digest: the keys changed since the stamp, so continuing at
        // its generation would be a fork.
        stamped(
            dir.path(),
            &keys,
            9,
            repository::init(4).expect("init").digest(),
        );
        let e = import_keys(&repo(), dir.path()).expect_err("mismatch");
        assert!(
            matches!(e, RotatorError::ImportStampMismatch { generation: 9, .. }),
            "{e}"
        );
        assert!(e.is_config());
        std::fs::remove_file(dir.path().join(crate::repository::STAMP_FILE)).expect("rm");
        assert_eq!(
            import_keys(&repo(), dir.path()).expect("import").generation,
            1
        );
    }

    #[test]
    fn a_fresh_start_is_refused_while_an_agent_holds_a_generation_and_says_how_to_import() {
        let state = Path::new("/var/lib/fernetd");
        let mut probe = Probe {
            held: vec![],
            silent: vec![("RegionThree".into(), "connect: refused".into())],
        };
        refuse_fresh_start(&probe, state).expect("no agent holds anything");
        probe.held = vec![
            ("tokens".into(), "RegionOne".into(), 7),
            ("tokens".into(), "RegionTwo".into(), 7),
        ];
        let e = refuse_fresh_start(&probe, state).expect_err("agents hold generation 7");
        let text = e.to_string();
        for needle in [
            "RegionOne at generation 7",
            "RegionTwo at generation 7",
            "import",
            "--fresh-start",
            "`tokens`",
        ] {
            assert!(text.contains(needle), "{needle}: {text}");
        }
        assert!(e.is_config());
    }
}
