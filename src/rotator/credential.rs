//! Keystone's credential repository, rotated as the data migration it is. Its
//! keys encrypt rows of the shared `credential` table, so purging a key that
//! still encrypts a row loses that row in every region. A rotation of the
//! `credential` repository is therefore committed only when (1) every agent
//! holds the current generation, (2) the `[credential] migrate_region` agent ran
//! `keystone-manage credential_migrate` under that generation's primary and
//! counted every row under it, and (3) the regions' credential cache time has
//! passed since that check, so no region still serves a row it read before.
//! The token key ledger plays no part: the migrate check is what makes a purge
//! safe. A passed migrate with cache time still to run holds the rotation; the
//! scheduler's owed-rotation path commits it at the safe time.

use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::RotatorError;
use super::core::{Blocked, Core, Generation, RepoId, now_ms, rfc3339};
use super::schedule::Schedule;
use crate::config::{CREDENTIAL_REPOSITORY, CredentialConfig, RotatorConfig};
use crate::pb;

/// The file kind of the last migrate's record in the state directory.
const RECORD: &str = "migrate";

/// Whether a repository name is Keystone's credential repository.
pub(super) fn is_credential(name: &str) -> bool {
    name == CREDENTIAL_REPOSITORY
}

/// Rows by key, as recorded (the wire type without its protobuf baggage).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Rows {
    pub(super) total: u64,
    pub(super) primary: u64,
    pub(super) other: u64,
    pub(super) null_key: u64,
    pub(super) undecryptable: u64,
}

impl From<&pb::CredentialRows> for Rows {
    fn from(r: &pb::CredentialRows) -> Self {
        Rows {
            total: r.total,
            primary: r.primary,
            other: r.other,
            null_key: r.null_key,
            undecryptable: r.undecryptable,
        }
    }
}

impl From<Rows> for pb::CredentialRows {
    fn from(r: Rows) -> Self {
        pb::CredentialRows {
            total: r.total,
            primary: r.primary,
            other: r.other,
            null_key: r.null_key,
            undecryptable: r.undecryptable,
        }
    }
}

impl std::fmt::Display for Rows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} rows: {} under the primary, {} under another key, {} under the all-zero key, {} undecryptable",
            self.total, self.primary, self.other, self.null_key, self.undecryptable
        )
    }
}

/// The last migrate, durable in `state_dir/credential.migrate.json`: a
/// restarted rotator neither forgets a failure nor re-counts the cache time.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(super) struct MigrateRecord {
    pub(super) unix_ms: i64,
    pub(super) generation: u64,
    /// Hex digest of the generation it ran under.
    pub(super) digest: String,
    pub(super) agent: String,
    pub(super) passed: bool,
    pub(super) reason: String,
    pub(super) before: Option<Rows>,
    pub(super) after: Option<Rows>,
}

/// The credential repository's gate, one per rotator that manages one.
pub(super) struct Gate {
    config: CredentialConfig,
    schedule: Option<Schedule>,
    record: Mutex<Option<MigrateRecord>>,
    metrics: CredentialMetrics,
    /// When the migrate in progress was asked for (Unix ms; 0 = none), for status.
    running_since: std::sync::atomic::AtomicI64,
}

/// Marks a migrate in progress in [`Gate::running_since`] until dropped
/// (the call answered, timed out or was cancelled).
struct Running<'g>(&'g std::sync::atomic::AtomicI64);

impl<'g> Running<'g> {
    fn start(since: &'g std::sync::atomic::AtomicI64) -> Self {
        since.store(now_ms(), Ordering::Release);
        Running(since)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.store(0, Ordering::Release);
    }
}

/// `fernetd_rotator_credential_*`.
struct CredentialMetrics {
    rows: Family<KeyLabel, Gauge>,
    last_migrate: Gauge,
    failures: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct KeyLabel {
    key: &'static str,
    /// `before` the last migrate (what it found) or `after` it.
    when: &'static str,
}

impl CredentialMetrics {
    fn new(registry: &mut Registry) -> Self {
        let m = CredentialMetrics {
            rows: Family::default(),
            last_migrate: Gauge::default(),
            failures: Counter::default(),
        };
        #[rustfmt::skip]
        crate::metrics::register!(registry,
            m.rows => "credential_rows", "Rows of the shared credential table by the key that decrypts them (primary, other, null = the public all-zero key, undecryptable), as the last migrate found them (when=before) and left them (when=after)";
            m.last_migrate => "credential_last_migrate_timestamp_seconds", "Unix time of the last credential migrate (0 = never)";
            m.failures => "credential_migrate_failures", "Credential migrates that failed or left a row off the primary key";
        );
        m
    }

    fn show(&self, record: &MigrateRecord) {
        self.last_migrate.set(record.unix_ms.div_euclid(1000));
        // A migrate that failed early counted nothing after: its series go.
        self.rows.clear();
        for (when, rows) in [("before", record.before), ("after", record.after)] {
            let Some(rows) = rows else { continue };
            for (key, n) in [
                ("primary", rows.primary),
                ("other", rows.other),
                ("null", rows.null_key),
                ("undecryptable", rows.undecryptable),
            ] {
                self.rows
                    .get_or_create(&KeyLabel { key, when })
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
    }
}

/// Checks the credential repository's configuration: exactly 3 keys, a
/// `[credential]` section naming an enrolled agent, a schedule only of its own.
pub(super) fn validate(config: &RotatorConfig) -> Result<(), RotatorError> {
    for repo in &config.repositories {
        if !repo.is_credential() {
            if repo.schedule.is_some() {
                return Err(RotatorError::Config(format!(
                    "repository `{}`: only the `{CREDENTIAL_REPOSITORY}` repository has a schedule of its own; the others follow [schedule]",
                    repo.name
                )));
            }
            continue;
        }
        if repo.max_active_keys != 3 {
            return Err(RotatorError::Config(format!(
                "repository `{CREDENTIAL_REPOSITORY}`: max_active_keys = {} is refused: Keystone's credential keys are exactly 3 (its fixed MAX_ACTIVE_KEYS)",
                repo.max_active_keys
            )));
        }
        if let Some(cron) = &repo.schedule {
            Schedule::parse(cron)?;
        }
        let Some(credential) = &config.credential else {
            return Err(RotatorError::Config(format!(
                "repository `{CREDENTIAL_REPOSITORY}` needs a [credential] section with migrate_region: its rotation is a migration of the credential table"
            )));
        };
        let named = config.agents.iter().any(|a| {
            a.name() == credential.migrate_region || a.region == credential.migrate_region
        });
        if !named {
            return Err(RotatorError::Config(format!(
                "[credential] migrate_region = {:?} is no enrolled agent's name or region",
                credential.migrate_region
            )));
        }
    }
    Ok(())
}

impl Gate {
    /// The gate of `config`'s credential repository, with its last migrate
    /// read from the state; None when there is no credential repository.
    pub(super) fn open(
        config: &RotatorConfig,
        store: &super::state::StateStore,
        registry: &mut Registry,
    ) -> Result<Option<Gate>, RotatorError> {
        let Some(repo) = config.repositories.iter().find(|r| r.is_credential()) else {
            return Ok(None);
        };
        let Some(credential) = config.credential.clone() else {
            return Err(RotatorError::Config(
                "the credential repository needs a [credential] section".into(),
            ));
        };
        let record: Option<MigrateRecord> = store.load_record(CREDENTIAL_REPOSITORY, RECORD)?;
        let metrics = CredentialMetrics::new(registry);
        if let Some(record) = &record {
            metrics.show(record);
        }
        Ok(Some(Gate {
            config: credential,
            schedule: repo.schedule.as_deref().map(Schedule::parse).transpose()?,
            record: Mutex::new(record),
            metrics,
            running_since: Default::default(),
        }))
    }

    fn record(&self) -> Option<MigrateRecord> {
        self.record
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// When a passed migrate of `current` makes the purge safe (Unix ms).
    fn safe_ms(&self, current: &Generation) -> Option<i64> {
        let record = self.record()?;
        let cache = i64::try_from(self.config.cache_time.as_millis()).unwrap_or(i64::MAX);
        (record.passed
            && record.generation == current.number
            && record.digest == current.digest.to_hex())
        .then(|| record.unix_ms.saturating_add(cache))
    }
}

impl Core {
    /// The credential repository's id, when this rotator manages one.
    fn credential_repo(&self) -> Option<RepoId> {
        self.repos()
            .find(|(_, repo)| is_credential(&repo.name))
            .map(|(r, _)| r)
    }

    /// The hook in `rotate_one`, after the safety rule: `Some(outcome)` when
    /// the credential rotation may not be committed now (migrate needed and
    /// failed, or the cache time still running); `None` to go on and commit.
    pub(super) async fn credential_gate(
        &self,
        r: RepoId,
        current: &Generation,
        dry_run: bool,
        outcome: &pb::RotateOutcome,
    ) -> Result<Option<pb::RotateOutcome>, RotatorError> {
        let Some(gate) = self.credential.as_ref() else {
            return Ok(None);
        };
        let repo = &self.repos[r];
        if !is_credential(&repo.name) {
            return Ok(None);
        }
        let mut refused = outcome.clone();
        // `--force` skips the safety rule, never this: a region without the
        // current generation may hold rows under a key the purge removes.
        if !self.may_rotate(r) {
            refused.message = format!(
                "blocked: a credential rotation is never forced: every agent must hold generation {} first",
                current.number
            );
            return Ok(Some(refused));
        }
        let now = now_ms();
        let safe = match gate.safe_ms(current) {
            Some(safe) => safe,
            None if dry_run => {
                refused.message = format!(
                    "dry run: would first migrate the credential table at `{}` under generation {}, then hold the rotation for the credential cache time ({})",
                    gate.config.migrate_region,
                    current.number,
                    crate::config::duration::format(&gate.config.cache_time)
                );
                return Ok(Some(refused));
            }
            None => {
                let record = self.migrate(r, current).await?;
                if !record.passed {
                    let reason = format!(
                        "credential migrate at `{}` failed: {}{}; nothing was rotated or purged",
                        record.agent,
                        record.reason,
                        record
                            .after
                            .or(record.before)
                            .map(|rows| format!(" ({rows})"))
                            .unwrap_or_default()
                    );
                    tracing::warn!(repository = %repo.name, "credential rotation blocked: {reason}");
                    self.emit("blocked", &repo.name, None, current.number, reason.clone());
                    refused.message = format!("blocked: {reason}");
                    return Ok(Some(refused));
                }
                record.unix_ms.saturating_add(
                    i64::try_from(gate.config.cache_time.as_millis()).unwrap_or(i64::MAX),
                )
            }
        };
        if now >= safe {
            return Ok(None);
        }
        let reason = format!(
            "every credential is under the primary key of generation {} (checked at {}); the rotation that purges the previous key waits the regions' credential cache time ({}), until {}, and is then committed by the rotator",
            current.number,
            rfc3339(safe - i64::try_from(gate.config.cache_time.as_millis()).unwrap_or(0)),
            crate::config::duration::format(&gate.config.cache_time),
            rfc3339(safe)
        );
        refused.held_for_lifetime = true;
        refused.safe_unix_ms = safe;
        refused.message = if dry_run {
            format!("dry run: would be held: {reason}")
        } else {
            format!("held: {reason}")
        };
        if !dry_run {
            // Owed: the scheduler performs it at the safe time.
            repo.overdue.store(true, Ordering::Release);
            repo.set_blocked(Some(Blocked {
                reason: reason.clone(),
                regions: Vec::new(),
                until_ms: Some(safe),
            }));
            self.metrics.set_blocked(&repo.name, true);
            self.emit("held", &repo.name, None, current.number, reason);
            self.bump_progress();
        }
        Ok(Some(refused))
    }

    /// Asks the migrate agent to migrate and count under `current`, and
    /// records, audits and shows the outcome.
    async fn migrate(
        &self,
        r: RepoId,
        current: &Generation,
    ) -> Result<MigrateRecord, RotatorError> {
        let Some(gate) = self.credential.as_ref() else {
            return Err(RotatorError::Config("no [credential] section".into()));
        };
        let name = &gate.config.migrate_region;
        let agents = self.agents.snapshot();
        let agent = agents
            .iter()
            .find(|(_, a)| &a.name == name)
            .or_else(|| agents.iter().find(|(_, a)| &a.region == name))
            .map(|(_, a)| a.clone());
        let mut record = MigrateRecord {
            unix_ms: now_ms(),
            generation: current.number,
            digest: current.digest.to_hex(),
            agent: name.clone(),
            ..Default::default()
        };
        match agent {
            None => record.reason = format!("no enrolled agent is named {name:?}"),
            Some(agent) => {
                record.agent = agent.label();
                // A quick read-back first: the migrate itself may take minutes,
                // and the rotation lock is held meanwhile.
                if let Err(e) = self.get_state(&agent).await {
                    record.reason = format!("the agent does not answer: {e}");
                    self.record_migrate(gate, &record).await;
                    return Ok(record);
                }
                let mut client =
                    pb::distribution_client::DistributionClient::new(agent.channel.clone());
                let request = pb::MigrateCredentialsRequest {
                    repository: self.repos[r].name.clone(),
                    generation: current.number,
                    digest: current.digest.0.to_vec(),
                };
                tracing::info!(agent = %agent.name, generation = current.number, "migrating the credential table");
                let _running = Running::start(&gate.running_since);
                match tokio::time::timeout(MIGRATE_TIMEOUT, client.migrate_credentials(request))
                    .await
                {
                    Err(_) => {
                        record.reason = format!(
                            "no answer within {}",
                            crate::config::duration::format(&MIGRATE_TIMEOUT)
                        )
                    }
                    // Redacted again here: an older agent may not redact, and
                    // the reason is stored, audited and shown from now on.
                    Ok(Err(status)) => {
                        record.reason = crate::redact::redact(&crate::describe_status(&status))
                    }
                    Ok(Ok(answer)) => {
                        let answer = answer.into_inner();
                        record.passed = answer.passed;
                        record.reason = crate::redact::redact(&answer.reason);
                        record.before = answer.before.as_ref().map(Rows::from);
                        record.after = answer.after.as_ref().map(Rows::from);
                    }
                }
                // The check ends when the answer arrives: the cache time counts from here.
                record.unix_ms = now_ms();
            }
        }
        self.record_migrate(gate, &record).await;
        Ok(record)
    }

    async fn record_migrate(&self, gate: &Gate, record: &MigrateRecord) {
        let (store, saved) = (self.store.clone(), record.clone());
        let written = tokio::task::spawn_blocking(move || {
            store.save_record(CREDENTIAL_REPOSITORY, RECORD, &saved)
        })
        .await;
        if !matches!(written, Ok(Ok(()))) {
            tracing::warn!(
                "cannot record the credential migrate in the state directory; status shows it until a restart"
            );
        }
        *gate.record.lock().unwrap_or_else(|p| p.into_inner()) = Some(record.clone());
        gate.metrics.show(record);
        if !record.passed {
            gate.metrics.failures.inc();
        }
        let rows = |r: Option<Rows>| r.map_or_else(|| "unknown".to_owned(), |r| r.to_string());
        let entry = crate::audit::Entry {
            actor: "rotator".into(),
            event: "credential_migrate",
            repository: CREDENTIAL_REPOSITORY.into(),
            agent: record.agent.clone(),
            generation: record.generation,
            digest: record.digest.clone(),
            outcome: if record.passed { "passed" } else { "failed" },
            detail: format!(
                "before: {}; after: {}{}",
                rows(record.before),
                rows(record.after),
                if record.reason.is_empty() {
                    String::new()
                } else {
                    format!("; {}", record.reason)
                }
            ),
            ..Default::default()
        };
        crate::audit::maybe_append(self.audit.as_ref(), entry).await;
        self.emit(
            "credential_migrate",
            CREDENTIAL_REPOSITORY,
            None,
            record.generation,
            if record.passed {
                format!("passed: {}", rows(record.after))
            } else {
                format!("failed: {}", record.reason)
            },
        );
    }

    /// After a restart: a passed migrate of the current generation whose cache
    /// time has not run out yet is owed again, so the scheduler commits it.
    pub(super) fn resume_credential_hold(&self) {
        let (Some(gate), Some(r)) = (self.credential.as_ref(), self.credential_repo()) else {
            return;
        };
        let repo = &self.repos[r];
        if let Some(safe) = gate.safe_ms(&repo.current()) {
            repo.overdue.store(true, Ordering::Release);
            repo.set_blocked(Some(Blocked {
                reason: format!(
                    "credentials migrated; the rotation purging the previous key is committed at {}",
                    rfc3339(safe)
                ),
                regions: Vec::new(),
                until_ms: Some(safe),
            }));
            self.metrics.set_blocked(&repo.name, true);
        }
    }

    /// The `credential` section of `status` for repository `r`.
    pub(super) fn credential_status(&self, r: RepoId) -> Option<pb::CredentialStatus> {
        let gate = self.credential.as_ref()?;
        if !is_credential(&self.repos[r].name) {
            return None;
        }
        let record = gate.record().unwrap_or_default();
        let current = self.repos[r].current();
        Some(pb::CredentialStatus {
            migrate_agent: gate.config.migrate_region.clone(),
            last_migrate_unix_ms: record.unix_ms,
            last_migrate_generation: record.generation,
            last_migrate_passed: record.passed,
            last_migrate_reason: record.reason,
            before: record.before.map(Into::into),
            after: record.after.map(Into::into),
            next_safe_rotation_unix_ms: gate.safe_ms(&current).unwrap_or(0),
            cache_time_ms: u64::try_from(gate.config.cache_time.as_millis()).unwrap_or(u64::MAX),
            migrate_running_since_unix_ms: gate.running_since.load(Ordering::Acquire),
        })
    }

    /// Rotates the credential repository on its own cron, when it has one.
    /// Never on `[schedule]`: a tick there skips it.
    pub(super) async fn credential_schedule(self: std::sync::Arc<Self>, stop: CancellationToken) {
        let (Some(gate), Some(r)) = (self.credential.as_ref(), self.credential_repo()) else {
            return;
        };
        let Some(schedule) = gate.schedule.clone() else {
            return;
        };
        loop {
            let Some((next, delay)) = schedule.delay_from(chrono::Utc::now()) else {
                return;
            };
            self.repos[r]
                .next_rotation_ms
                .store(next.timestamp_millis(), Ordering::Release);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.cancelled() => return,
            }
            let request = pb::RotateRequest {
                no_wait: true,
                repositories: vec![CREDENTIAL_REPOSITORY.into()],
                ..Default::default()
            };
            if let Err(e) = self.rotate(&request, "schedule", stop.clone()).await {
                tracing::error!(error = %crate::error_chain(&e), "scheduled credential rotation failed");
            }
        }
    }
}

/// A credential migrate updates one row at a time: a large table takes a
/// while. The agent bounds each of its three tool runs to 300 s itself.
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(960);

#[cfg(test)]
mod tests {
    use super::super::core::{AgentSlot, RepoSlot};
    use super::super::ledger::Ledger;
    use super::super::metrics::Metrics;
    use super::super::state::StateStore;
    use super::*;
    use std::sync::Arc;

    /// A core with `tokens` and `credential` (3 keys each), one agent behind a
    /// channel nobody answers, a key lifetime of a day (the token ledger would
    /// hold any purge), and a credential gate with a cache time of 60 s.
    fn core(dir: &std::path::Path) -> Arc<Core> {
        let store = StateStore::open(dir).expect("state dir");
        let repos = ["tokens", CREDENTIAL_REPOSITORY]
            .into_iter()
            .map(|name| {
                let keys = crate::repository::init(3).expect("init");
                let ledger = Ledger::fresh(&keys, now_ms());
                let first =
                    Generation::build(name, 1, keys, ledger.promoted_unix()).expect("build");
                store.save(name, &first.committed()).expect("save");
                RepoSlot::new(name.into(), 3, first, ledger)
            })
            .collect();
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
        core.credential = Some(Gate {
            config: CredentialConfig {
                migrate_region: "RegionOne".into(),
                cache_time: Duration::from_secs(60),
            },
            schedule: None,
            record: Mutex::new(None),
            metrics: CredentialMetrics::new(&mut registry),
            running_since: Default::default(),
        });
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
            let response = pb::InstallResponse {
                repository: repo.name.clone(),
                generation: current.number,
                digest: current.digest.0.to_vec(),
                canaries_valid: true,
                ..Default::default()
            };
            for i in core.agent_ids() {
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
        *gate.record.lock().expect("lock") = Some(MigrateRecord {
            unix_ms: now_ms() - i64::try_from(age.as_millis()).expect("ms"),
            generation: current.number,
            digest: current.digest.to_hex(),
            agent: "RegionOne".into(),
            passed: true,
            ..Default::default()
        });
    }

    fn only(names: &[&str]) -> pb::RotateRequest {
        pb::RotateRequest {
            no_wait: true,
            repositories: names.iter().map(|n| (*n).to_owned()).collect(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn credential_keys_rotate_only_when_named_and_only_after_a_passed_migrate_and_the_cache_time()
     {
        let dir = tempfile::tempdir().expect("tempdir");
        let core = core(dir.path());
        let (t, c) = ids(&core);
        let stop = CancellationToken::new();
        ack_all(&core);

        // Neither "all" nor the token schedule touches the credential keys.
        let all = core
            .rotate(&only(&[]), "test", stop.clone())
            .await
            .expect("rotate");
        assert_eq!(all.outcomes.len(), 1);
        assert_eq!(all.outcomes[0].repository, "tokens");
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
            core.credential_status(c)
                .expect("status")
                .last_migrate_unix_ms,
            0
        );

        // The migrate agent does not answer: refused with the reason, nothing rotated.
        let r = core
            .rotate(&only(&[CREDENTIAL_REPOSITORY]), "test", stop.clone())
            .await
            .expect("rotate");
        let o = &r.outcomes[0];
        assert!(!o.rotated && !o.held_for_lifetime, "{o:?}");
        assert!(
            o.message
                .contains("credential migrate at `RegionOne` failed"),
            "{}",
            o.message
        );
        assert_eq!(core.repos[c].current().number, 1);
        let status = core.credential_status(c).expect("credential status");
        assert!(!status.last_migrate_passed && status.last_migrate_unix_ms > 0);
        let recorded: Option<MigrateRecord> = core
            .store
            .load_record(CREDENTIAL_REPOSITORY, RECORD)
            .expect("record");
        assert!(recorded.is_some_and(|r| !r.passed));

        // Passed just now: held for the cache time, owed to the scheduler.
        passed(&core, Duration::ZERO);
        let r = core
            .rotate(&only(&[CREDENTIAL_REPOSITORY]), "test", stop.clone())
            .await
            .expect("rotate");
        let o = &r.outcomes[0];
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
            assert!(r.outcomes[0].rotated, "{:?}", r.outcomes[0]);
            assert_eq!(core.repos[c].current().number, generation);
            assert_eq!(core.repos[c].current().keys.len(), 3);
            // The passed migrate was of the previous generation: the next needs its own.
            assert_eq!(
                core.credential_status(c)
                    .expect("status")
                    .next_safe_rotation_unix_ms,
                0
            );
            ack_all(&core);
        }
        assert_eq!(core.repos[c].current().keys.indices(), vec![0, 2, 3]);
    }

    fn config(extra: &str) -> RotatorConfig {
        toml::from_str(&format!(
            r#"
            listen = "127.0.0.1:7000"
            admin_identities = ["admin"]
            state_dir = "/tmp/x"
            [tls]
            ca = "/ca"
            cert = "/c"
            key = "/k"
            [schedule]
            cron = "0 0 * * *"
            [policy]
            token_expiration = "1h"
            [[agents]]
            region = "RegionOne"
            endpoint = "https://127.0.0.1:7001"
            identity = "agent.one"
            {extra}
            "#
        ))
        .expect("parse")
    }

    #[test]
    fn a_credential_repository_has_exactly_three_keys_and_a_migrate_region() {
        let repo = |keys: usize, schedule: &str| {
            format!(
                "[[repositories]]\nname = \"credential\"\nmax_active_keys = {keys}\n{schedule}\n"
            )
        };
        let section = "[credential]\nmigrate_region = \"RegionOne\"\ncache_time = \"2s\"\n";
        let ok = config(&format!("{}{section}", repo(3, "schedule = \"0 3 * * 0\"")));
        validate(&ok).expect("valid");
        assert_eq!(
            ok.credential.as_ref().map(|c| c.cache_time),
            Some(Duration::from_secs(2))
        );
        let err = validate(&config(&format!("{}{section}", repo(5, "")))).unwrap_err();
        assert!(err.to_string().contains("exactly 3"), "{err}");
        assert!(err.is_config());
        let err = validate(&config(&repo(3, ""))).unwrap_err();
        assert!(err.to_string().contains("[credential]"), "{err}");
        let elsewhere = section.replace("RegionOne", "RegionNine");
        let err = validate(&config(&format!("{}{elsewhere}", repo(3, "")))).unwrap_err();
        assert!(err.to_string().contains("RegionNine"), "{err}");
        let tokens =
            "[[repositories]]\nname = \"tokens\"\nmax_active_keys = 3\nschedule = \"0 3 * * 0\"\n";
        let err = validate(&config(tokens)).unwrap_err();
        assert!(err.to_string().contains("only the `credential`"), "{err}");
        let default: CredentialConfig =
            toml::from_str("migrate_region = \"RegionOne\"").expect("parse");
        assert_eq!(default.cache_time, Duration::from_secs(600));
    }
}
