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
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};

use super::RotatorError;
use super::fleet::Snapshot;
use super::schedule::Schedule;
use super::types::{Generation, now_ms, rfc3339};
use crate::config::{CREDENTIAL_REPOSITORY, CredentialConfig, RepoKind, RotatorConfig};
use crate::pb;

/// The kind of the last migrate's record in the store.
pub(super) const RECORD: &str = super::store::CREDENTIAL_MIGRATE;

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
        since.store(now_ms(), std::sync::atomic::Ordering::Release);
        Running(since)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.store(0, std::sync::atomic::Ordering::Release);
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

impl Gate {
    /// The gate of `config`'s credential repository, with its last migrate
    /// read from the state; None when there is no credential repository.
    pub(super) async fn open(
        config: &RotatorConfig,
        store: &super::store::Store,
        registry: &mut Registry,
    ) -> Result<Option<Gate>, RotatorError> {
        let Some(repo) = config
            .repositories
            .iter()
            .find(|r| r.kind() == RepoKind::Credential)
        else {
            return Ok(None);
        };
        let Some(credential) = config.credential.clone() else {
            return Err(RotatorError::Config(
                "the credential repository needs a [credential] section".into(),
            ));
        };
        let record: Option<MigrateRecord> =
            store.load_record(CREDENTIAL_REPOSITORY, RECORD).await?;
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

    pub(super) fn record(&self) -> Option<MigrateRecord> {
        self.record
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// When a passed migrate of `current` makes the purge safe (Unix ms).
    pub(super) fn safe_ms(&self, current: &Generation) -> Option<i64> {
        let record = self.record()?;
        let cache = i64::try_from(self.config.cache_time.as_millis()).unwrap_or(i64::MAX);
        (record.passed
            && record.generation == current.number
            && record.digest == current.digest.to_hex())
        .then(|| record.unix_ms.saturating_add(cache))
    }
}

impl Gate {
    fn cache_ms(&self) -> i64 {
        i64::try_from(self.config.cache_time.as_millis()).unwrap_or(i64::MAX)
    }

    /// The credential repository's own cron, if it has one.
    pub(super) fn schedule(&self) -> Option<Schedule> {
        self.schedule.clone()
    }

    /// When a passed migrate `record` makes the purge safe (Unix ms): its end
    /// plus the cache time.
    pub(super) fn safe_after(&self, record: &MigrateRecord) -> i64 {
        record.unix_ms.saturating_add(self.cache_ms())
    }

    /// Takes `record` as the last migrate (one just made, or one another
    /// leader made) and shows it.
    pub(super) fn take(&self, record: MigrateRecord, fresh: bool) {
        self.metrics.show(&record);
        if fresh && !record.passed {
            self.metrics.failures.inc();
        }
        *self.record.lock().unwrap_or_else(|p| p.into_inner()) = Some(record);
    }

    /// Why a passed migrate of `current` holds the rotation until `safe`.
    pub(super) fn held_reason(&self, current: &Generation, safe: i64) -> String {
        format!(
            "every credential is under the primary key of generation {} (checked at {}); the rotation that purges the previous key waits the regions' credential cache time ({}), until {}, and is then committed by the rotator",
            current.number,
            rfc3339(safe - i64::try_from(self.config.cache_time.as_millis()).unwrap_or(0)),
            crate::config::duration::format(&self.config.cache_time),
            rfc3339(safe)
        )
    }

    /// What a dry run of a credential rotation without a passed migrate says.
    pub(super) fn dry_run_message(&self, current: &Generation) -> String {
        format!(
            "dry run: would first migrate the credential table at `{}` under generation {}, then hold the rotation for the credential cache time ({})",
            self.config.migrate_region,
            current.number,
            crate::config::duration::format(&self.config.cache_time)
        )
    }

    /// The `credential` section of `status`, `current` being the repository's
    /// current generation.
    pub(super) fn status(&self, current: &Generation) -> pb::CredentialStatus {
        let record = self.record().unwrap_or_default();
        pb::CredentialStatus {
            migrate_agent: self.config.migrate_region.clone(),
            last_migrate_unix_ms: record.unix_ms,
            last_migrate_generation: record.generation,
            last_migrate_passed: record.passed,
            last_migrate_reason: record.reason,
            before: record.before.map(Into::into),
            after: record.after.map(Into::into),
            next_safe_rotation_unix_ms: self.safe_ms(current).unwrap_or(0),
            cache_time_ms: u64::try_from(self.config.cache_time.as_millis()).unwrap_or(u64::MAX),
            migrate_running_since_unix_ms: self
                .running_since
                .load(std::sync::atomic::Ordering::Acquire),
        }
    }

    /// A gate over `config` that has seen no migrate (tests).
    #[cfg(test)]
    pub(super) fn new(config: CredentialConfig, registry: &mut Registry) -> Gate {
        Gate {
            config,
            schedule: None,
            record: Mutex::new(None),
            metrics: CredentialMetrics::new(registry),
            running_since: Default::default(),
        }
    }
}

impl MigrateRecord {
    /// Why a failed migrate refuses the rotation.
    pub(super) fn refusal(&self) -> String {
        format!(
            "credential migrate at `{}` failed: {}{}; nothing was rotated or purged",
            self.agent,
            self.reason,
            self.after
                .or(self.before)
                .map(|rows| format!(" ({rows})"))
                .unwrap_or_default()
        )
    }

    fn rows(r: Option<Rows>) -> String {
        r.map_or_else(|| "unknown".to_owned(), |r| r.to_string())
    }

    /// The audit log's entry for this migrate.
    pub(super) fn audit_entry(&self) -> crate::audit::Entry {
        crate::audit::Entry {
            actor: "rotator".into(),
            event: "credential_migrate",
            repository: CREDENTIAL_REPOSITORY.into(),
            agent: self.agent.clone(),
            generation: self.generation,
            digest: self.digest.clone(),
            outcome: if self.passed { "passed" } else { "failed" },
            detail: format!(
                "before: {}; after: {}{}",
                Self::rows(self.before),
                Self::rows(self.after),
                if self.reason.is_empty() {
                    String::new()
                } else {
                    format!("; {}", self.reason)
                }
            ),
            ..Default::default()
        }
    }

    /// The `credential_migrate` event's message.
    pub(super) fn event_message(&self) -> String {
        if self.passed {
            format!("passed: {}", Self::rows(self.after))
        } else {
            format!("failed: {}", self.reason)
        }
    }
}

/// Asks the migrate agent among `agents` to migrate `repository` and count its
/// rows under `current`: the outcome, passed or not, as a record.
pub(super) async fn migrate(
    gate: &Gate,
    agents: &Snapshot,
    repository: &str,
    current: &Generation,
    call_timeout: Duration,
) -> MigrateRecord {
    let name = &gate.config.migrate_region;
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
    let Some(agent) = agent else {
        record.reason = format!("no enrolled agent is named {name:?}");
        return record;
    };
    record.agent = agent.label();
    // A quick read-back first: the migrate itself may take minutes, and the
    // rotation lock is held meanwhile.
    if let Err(e) = super::calls::get_state(&agent, call_timeout, &[]).await {
        record.reason = format!("the agent does not answer: {e}");
        return record;
    }
    let mut client = pb::distribution_client::DistributionClient::new(agent.channel.clone());
    let request = pb::MigrateCredentialsRequest {
        repository: repository.to_owned(),
        generation: current.number,
        digest: current.digest.0.to_vec(),
    };
    tracing::info!(agent = %agent.name, generation = current.number, "migrating the credential table");
    let _running = Running::start(&gate.running_since);
    match tokio::time::timeout(MIGRATE_TIMEOUT, client.migrate_credentials(request)).await {
        Err(_) => {
            record.reason = format!(
                "no answer within {}",
                crate::config::duration::format(&MIGRATE_TIMEOUT)
            )
        }
        // Redacted again here: an older agent may not redact, and the reason
        // is stored, audited and shown from now on.
        Ok(Err(status)) => record.reason = crate::redact::redact(&crate::describe_status(&status)),
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
    record
}

/// A credential migrate updates one row at a time: a large table takes a
/// while. The agent bounds each of its three tool runs to 300 s itself.
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(960);
