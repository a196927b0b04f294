//! The credential gate as `rotate` meets it: over a memory store, one agent
//! nobody answers (a migrate that runs fails), and a failover.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use super::Core;
use crate::config::{CREDENTIAL_REPOSITORY, CredentialConfig};
use crate::pb;
use crate::rotator::credential::{Gate, MigrateRecord, RECORD};
use crate::rotator::fleet::AgentSlot;
use crate::rotator::ledger::Ledger;
use crate::rotator::metrics::Metrics;
use crate::rotator::store::Store;
use crate::rotator::types::{Answer, Generation, RepoId, RotateOrder, now_ms};

/// A core with `tokens` and `credential` (3 keys each) over a memory
/// store, one agent behind a channel nobody answers, a key lifetime of a
/// day (the token ledger would hold any purge), and a credential gate with
/// a cache time of 60 s.
async fn core() -> Arc<Core> {
    let store = Store::memory();
    for name in ["tokens", CREDENTIAL_REPOSITORY] {
        let keys = crate::repository::init(3).expect("init");
        let ledger = Ledger::fresh(&keys, now_ms());
        let first = Generation::build(name, 1, keys, ledger.promoted_unix()).expect("build");
        store.put_committed(name, first.committed(), ledger);
    }
    core_on(store).await
}

/// A core over `store` as a rotator starting on it finds it (another
/// rotator's store after a failover): the generations it holds, and a
/// gate that has seen no migrate yet.
async fn core_on(store: Store) -> Arc<Core> {
    let mut repos = Vec::new();
    for name in ["tokens", CREDENTIAL_REPOSITORY] {
        let (committed, ledger) = store.load(name).await.expect("load").expect("state");
        let config = crate::config::RepositoryConfig {
            name: name.into(),
            max_active_keys: 3,
            import: None,
            schedule: None,
        };
        repos.push(crate::rotator::store::slot(&config, committed, ledger, false).expect("slot"));
    }
    let channel = crate::tls::Connection::never_dialled();
    let endpoint = crate::config::AgentEndpoint {
        name: None,
        region: "RegionOne".into(),
        endpoint: "https://127.0.0.1:9".into(),
        identity: "regionone.agent".into(),
    };
    let agents = vec![AgentSlot::new(&endpoint, channel, 2)];
    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    let mut core = Core::new(
        repos,
        agents,
        store,
        crate::config::FanoutConfig::default(),
        metrics,
        Duration::from_secs(86_400),
    );
    core.credential = Some(Gate::new(
        CredentialConfig {
            migrate_region: "RegionOne".into(),
            cache_time: Duration::from_secs(60),
        },
        &mut registry,
    ));
    Arc::new(core)
}

fn ids(core: &Core) -> (RepoId, RepoId) {
    let id = |n: &str| {
        core.repos()
            .find(|(_, r)| r.name == n)
            .map(|(r, _)| r)
            .expect("repo")
    };
    (id("tokens"), id(CREDENTIAL_REPOSITORY))
}

fn ack_all(core: &Core) {
    for (r, repo) in core.repos() {
        let current = repo.current();
        let response = Answer {
            generation: current.number,
            digest: current.digest.0.to_vec(),
            canaries_valid: true,
        };
        for i in core.fleet.agents.ids() {
            core.observe_install(i, r, &current, &response)
                .expect("acknowledged");
        }
    }
}

/// A passed migrate of the current credential generation, `age` ago.
fn passed(core: &Core, age: Duration) {
    let (_, c) = ids(core);
    let current = core.repos[c].current();
    let gate = core.credential.as_ref().expect("gate");
    gate.take(
        MigrateRecord {
            unix_ms: now_ms() - i64::try_from(age.as_millis()).expect("ms"),
            generation: current.number,
            digest: current.digest.to_hex(),
            agent: "RegionOne".into(),
            passed: true,
            ..Default::default()
        },
        false,
    );
}

/// The `credential` section of `status`.
fn credential_status(core: &Core, c: RepoId) -> Option<pb::CredentialStatus> {
    let gate = core.credential.as_ref()?;
    Some(gate.status(&core.repos[c].current()))
}

fn only(names: &[&str]) -> RotateOrder {
    RotateOrder {
        no_wait: true,
        repositories: names.iter().map(|n| (*n).to_owned()).collect(),
        ..Default::default()
    }
}

#[tokio::test]
async fn credential_keys_rotate_only_when_named_and_only_after_a_passed_migrate_and_the_cache_time()
{
    let core = core().await;
    let (t, c) = ids(&core);
    let stop = CancellationToken::new();
    ack_all(&core);

    // Neither "all" nor the token schedule touches the credential keys.
    let all = core
        .rotate(&only(&[]), "test", stop.clone())
        .await
        .expect("rotate");
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].repository, "tokens");
    ack_all(&core);
    core.scheduled_tick(Duration::from_secs(3600), stop.clone())
        .await;
    // The tick tried tokens (held by the ledger: its purge needs a day)...
    assert_eq!(core.repos[t].current().number, 2);
    assert!(
        core.repos[t]
            .blocked()
            .is_some_and(|b| b.until_ms.is_some())
    );
    // ...and never the credential repository: no migrate was even tried.
    assert_eq!(core.repos[c].current().number, 1);
    assert_eq!(
        credential_status(&core, c)
            .expect("status")
            .last_migrate_unix_ms,
        0
    );

    // The migrate agent does not answer: refused with the reason, nothing rotated.
    let r = core
        .rotate(&only(&[CREDENTIAL_REPOSITORY]), "test", stop.clone())
        .await
        .expect("rotate");
    let o = &r[0];
    assert!(!o.rotated && !o.held_for_lifetime, "{o:?}");
    assert!(
        o.message
            .contains("credential migrate at `RegionOne` failed"),
        "{}",
        o.message
    );
    assert_eq!(core.repos[c].current().number, 1);
    let status = credential_status(&core, c).expect("credential status");
    assert!(!status.last_migrate_passed && status.last_migrate_unix_ms > 0);
    let recorded: Option<MigrateRecord> = core
        .store
        .load_record(CREDENTIAL_REPOSITORY, RECORD)
        .await
        .expect("record");
    assert!(recorded.is_some_and(|r| !r.passed));

    // Passed just now: held for the cache time, owed to the scheduler.
    passed(&core, Duration::ZERO);
    let r = core
        .rotate(&only(&[CREDENTIAL_REPOSITORY]), "test", stop.clone())
        .await
        .expect("rotate");
    let o = &r[0];
    assert!(!o.rotated && o.held_for_lifetime, "{o:?}");
    assert!(o.safe_unix_ms > now_ms() + 50_000, "{o:?}");
    assert!(core.repos[c].overdue.load(Ordering::Acquire));
    assert_eq!(core.held_until_ms(), Some(o.safe_unix_ms));

    // Passed a cache time ago: committed, twice, the second purging the
    // previous key although the token ledger would hold it for a day.
    for generation in [2, 3] {
        passed(&core, Duration::from_secs(61));
        let r = core
            .rotate(&only(&[CREDENTIAL_REPOSITORY]), "test", stop.clone())
            .await
            .expect("rotate");
        assert!(r[0].rotated, "{:?}", r[0]);
        assert_eq!(core.repos[c].current().number, generation);
        assert_eq!(core.repos[c].current().keys.len(), 3);
        // The passed migrate was of the previous generation: the next needs its own.
        assert_eq!(
            credential_status(&core, c)
                .expect("status")
                .next_safe_rotation_unix_ms,
            0
        );
        ack_all(&core);
    }
    assert_eq!(core.repos[c].current().keys.indices(), vec![0, 2, 3]);
}

/// A failover: the old leader's passed migrate is in the store, so the
/// new leader's first credential rotation needs no new check (the migrate
/// agent answers nobody here: a new check would fail and refuse it).
#[tokio::test]
async fn a_credential_rotation_right_after_a_failover_needs_no_new_migrate_when_one_passed() {
    let old = core().await;
    let (_, c) = ids(&old);
    let current = old.repos[c].current();
    let record = MigrateRecord {
        unix_ms: now_ms() - 61_000,
        generation: current.number,
        digest: current.digest.to_hex(),
        agent: "RegionOne".into(),
        passed: true,
        ..Default::default()
    };
    old.record_migrate(old.credential.as_ref().expect("gate"), &record)
        .await;

    // The standby started before the migrate; a new term refreshes it.
    let new = core_on(old.store.clone()).await;
    assert_eq!(
        credential_status(&new, c)
            .expect("status")
            .last_migrate_unix_ms,
        0
    );
    new.refresh().await.expect("refresh");
    ack_all(&new);
    let r = new
        .rotate(
            &only(&[CREDENTIAL_REPOSITORY]),
            "test",
            CancellationToken::new(),
        )
        .await
        .expect("rotate");
    assert!(r[0].rotated, "{:?}", r[0]);
    assert_eq!(new.repos[c].current().number, 2);
    assert!(
        credential_status(&new, c)
            .expect("status")
            .last_migrate_passed
    );
}
