//! The readiness gate: a controller's Keystone must not serve before its
//! repositories hold the rotator's current generation. The agent reports
//! ready (systemd's `READY=1`, the readiness record, `GetState`, a metric)
//! only once the rotator's identity told it, since this process started, that
//! every repository is current: an install, a re-push, or the confirmation a
//! reconcile's `GetState` carries when what it names is what is on disk. A
//! restored or rebuilt controller therefore waits for the rotator; one cut off
//! from it reports ready after `[readiness] max_wait` with the set it holds,
//! and says so. The gate opens once per process: a later rotation's short
//! window between commit and install is the fan-out's business, not Keystone's.
//!
//! The record is one JSON object rewritten atomically on every change of state
//! (three times at most per process); [`check_record`] is what
//! `fernetd agent --ready` runs, so a container probe needs neither a
//! certificate nor the agent's port.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::managed::Managed;
use super::metrics::AgentMetrics;
use crate::config::{AgentConfig, ReadinessConfig};
use crate::notify::{Notifier, status_text};
use crate::repository::Digest;

/// Where the gate is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Not ready: waiting for the rotator.
    Waiting,
    /// Ready: the rotator's identity confirmed every repository.
    Current,
    /// Ready: `max_wait` ran out first; the agent serves what it holds.
    Timeout,
}

impl Reason {
    pub const ALL: [Reason; 3] = [Reason::Waiting, Reason::Current, Reason::Timeout];

    /// The word used in metrics, `GetState` and the record.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Waiting => "waiting",
            Reason::Current => "current",
            Reason::Timeout => "timeout",
        }
    }
}

/// One repository as the gate sees it.
struct Gate {
    repo: Arc<Managed>,
    /// The generation and digest the rotator installed or confirmed.
    confirmed: Option<(u64, Digest)>,
    /// The current generation the rotator last named when it did not match.
    rotator_named: Option<u64>,
    /// The rotator's reconcile named its repositories, and not this one: it
    /// will never confirm it (a repository configured here only).
    unknown_to_rotator: bool,
}

struct Inner {
    reason: Reason,
    since_unix_ms: i64,
    gates: Vec<Gate>,
}

/// The agent's readiness gate; shared by the service and the timer.
pub struct Readiness {
    inner: Mutex<Inner>,
    notifier: Option<Notifier>,
    record: Option<PathBuf>,
    metrics: AgentMetrics,
    max_wait: Duration,
}

/// Why the readiness record could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("readiness record {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The readiness record (`[readiness] record`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Record {
    pub ready: bool,
    /// `waiting`, `current` or `timeout`.
    pub reason: String,
    pub detail: String,
    pub since_unix_ms: i64,
    pub pid: u32,
    /// What each repository held when the gate opened (or holds, waiting).
    pub repositories: Vec<RecordRepository>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RecordRepository {
    pub name: String,
    pub generation: u64,
    /// Hex SHA-256 of the set; empty when the repository holds none.
    pub digest: String,
    pub confirmed: bool,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl Readiness {
    /// A closed gate over `repos`. Nothing is announced before [`Self::start`].
    pub fn new(
        repos: Vec<Arc<Managed>>,
        config: &ReadinessConfig,
        notifier: Option<Notifier>,
        metrics: AgentMetrics,
    ) -> Self {
        Readiness {
            inner: Mutex::new(Inner {
                reason: Reason::Waiting,
                since_unix_ms: now_ms(),
                gates: repos
                    .into_iter()
                    .map(|repo| Gate {
                        repo,
                        confirmed: None,
                        rotator_named: None,
                        unknown_to_rotator: false,
                    })
                    .collect(),
            }),
            notifier,
            record: config.record.clone(),
            metrics,
            max_wait: config.max_wait,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Announces the closed gate: the record says `waiting` (a record left by
    /// an earlier run must not pass a probe), the supervisor's start timeout
    /// is extended past the wait, and the log says what is awaited.
    pub fn start(&self) -> Result<(), RecordError> {
        let inner = self.lock();
        self.metrics.set_ready(Reason::Waiting);
        tracing::info!(
            max_wait = %crate::config::duration::format(&self.max_wait),
            detail = %waiting_detail(&inner.gates),
            "readiness: waiting for the rotator to confirm every repository"
        );
        // systemd allows this much more than TimeoutStartSec when needed, so a
        // max_wait longer than the unit's timeout does not get the agent killed.
        let extend = (self.max_wait + Duration::from_secs(60)).as_micros();
        self.notify(&format!("EXTEND_TIMEOUT_USEC={extend}"));
        self.notify_waiting(&inner);
        self.write_record(&inner)
    }

    /// The rotator's identity installed (or re-pushed) this set, or confirmed
    /// that it is its current one: this repository is current.
    pub fn confirmed(&self, name: &str, generation: u64, digest: Digest, how: &'static str) {
        let mut inner = self.lock();
        let Some(gate) = inner.gates.iter_mut().find(|g| g.repo.name == name) else {
            return;
        };
        let first = gate.confirmed.is_none();
        gate.confirmed = Some((generation, digest));
        gate.rotator_named = None;
        if first && inner.reason != Reason::Current {
            tracing::info!(repository = %name, generation, by = how, "readiness: the rotator confirmed this repository is current");
        }
        if inner.reason == Reason::Current || inner.gates.iter().any(|g| g.confirmed.is_none()) {
            if first {
                self.notify_waiting(&inner);
            }
            return;
        }
        let detail = inner
            .gates
            .iter()
            .map(|g| {
                let generation = g.confirmed.map_or(0, |(n, _)| n);
                format!("{} generation {generation}", g.repo.name)
            })
            .collect::<Vec<_>>()
            .join(", ");
        let was = inner.reason;
        self.open(&mut inner, Reason::Current);
        if was == Reason::Timeout {
            tracing::info!(%detail, "ready: the rotator is back and confirmed every repository current");
        } else {
            tracing::info!(%detail, "ready: every repository holds the rotator's current generation");
        }
        self.notify_opened(was, &format!("Ready: current ({detail})"));
    }

    /// The rotator named a current generation this agent does not hold (it
    /// will push it): kept for the waiting status.
    pub fn rotator_named(&self, name: &str, generation: u64) {
        let mut inner = self.lock();
        if let Some(gate) = inner.gates.iter_mut().find(|g| g.repo.name == name)
            && gate.confirmed.is_none()
            && gate.rotator_named != Some(generation)
        {
            gate.rotator_named = Some(generation);
            self.notify_waiting(&inner);
        }
    }

    /// The rotator's reconcile named its current generations and `name` was
    /// not among them: said once, since only the wait can open the gate then.
    pub fn rotator_lacks(&self, name: &str) {
        let mut inner = self.lock();
        if let Some(gate) = inner.gates.iter_mut().find(|g| g.repo.name == name)
            && gate.confirmed.is_none()
            && !gate.unknown_to_rotator
        {
            gate.unknown_to_rotator = true;
            tracing::warn!(repository = %name, "readiness: the rotator does not rotate this repository, so it cannot confirm it; the agent reports ready only when max_wait runs out (remove it from agent.toml or add it to rotator.toml)");
            self.notify_waiting(&inner);
        }
    }

    /// `max_wait` ran out: ready with what is on disk, unless already ready.
    pub fn timed_out(&self) {
        let mut inner = self.lock();
        if inner.reason != Reason::Waiting {
            return;
        }
        let detail = waiting_detail(&inner.gates);
        self.open(&mut inner, Reason::Timeout);
        tracing::warn!(
            max_wait = %crate::config::duration::format(&self.max_wait),
            %detail,
            "ready WITHOUT the rotator's confirmation: max_wait ran out (the rotator is unreachable or has not called); Keystone serves the set this agent holds, which may be behind the other regions"
        );
        self.notify_opened(
            Reason::Waiting,
            &format!(
                "Ready after {} without the rotator's confirmation: {detail}",
                crate::config::duration::format(&self.max_wait)
            ),
        );
    }

    /// Where the gate is.
    pub fn reason(&self) -> Reason {
        self.lock().reason
    }

    /// Whether the rotator confirmed `name` since the agent started.
    pub fn is_confirmed(&self, name: &str) -> bool {
        self.lock()
            .gates
            .iter()
            .any(|g| g.repo.name == name && g.confirmed.is_some())
    }

    /// Tells the supervisor the service is stopping.
    pub fn stopping(&self) {
        self.notify("STOPPING=1");
    }

    fn open(&self, inner: &mut Inner, reason: Reason) {
        inner.reason = reason;
        inner.since_unix_ms = now_ms();
        self.metrics.set_ready(reason);
        if let Err(e) = self.write_record(inner) {
            tracing::warn!(error = %crate::error_chain(&e), "readiness record not written");
        }
    }

    /// While the gate is closed: what it waits for, as systemd's status.
    fn notify_waiting(&self, inner: &Inner) {
        if inner.reason == Reason::Waiting {
            let detail = waiting_detail(&inner.gates);
            self.notify(&format!(
                "STATUS={}",
                status_text(&format!("Waiting for the rotator: {detail}"))
            ));
        }
    }

    fn notify_opened(&self, was: Reason, status: &str) {
        // READY=1 once: systemd takes the first; later changes are status.
        let ready = if was == Reason::Waiting {
            "READY=1\n"
        } else {
            ""
        };
        self.notify(&format!("{ready}STATUS={}", status_text(status)));
    }

    fn notify(&self, state: &str) {
        if let Some(n) = &self.notifier
            && let Err(e) = n.send(state)
        {
            tracing::warn!(error = %crate::error_chain(&e), "systemd notification not sent");
        }
    }

    fn write_record(&self, inner: &Inner) -> Result<(), RecordError> {
        let Some(path) = &self.record else {
            return Ok(());
        };
        let record = Record {
            ready: inner.reason != Reason::Waiting,
            reason: inner.reason.as_str().to_owned(),
            detail: match inner.reason {
                Reason::Waiting => {
                    format!("waiting for the rotator: {}", waiting_detail(&inner.gates))
                }
                Reason::Current => "every repository holds the rotator's current generation".into(),
                Reason::Timeout => format!(
                    "max_wait ({}) ran out without the rotator's confirmation: serving the set held",
                    crate::config::duration::format(&self.max_wait)
                ),
            },
            since_unix_ms: inner.since_unix_ms,
            pid: std::process::id(),
            repositories: inner
                .gates
                .iter()
                .map(|g| {
                    let (generation, digest) = match (inner.reason, g.confirmed) {
                        (Reason::Current, Some((n, d))) => (n, Some(d)),
                        _ => {
                            let view = g.repo.view();
                            (view.generation, view.digest)
                        }
                    };
                    RecordRepository {
                        name: g.repo.name.clone(),
                        generation,
                        digest: digest.map(|d| d.to_hex()).unwrap_or_default(),
                        confirmed: g.confirmed.is_some(),
                    }
                })
                .collect(),
        };
        let mut text = serde_json::to_vec(&record).unwrap_or_default();
        text.push(b'\n');
        // A few writes per process, of a few hundred bytes: done in place
        // rather than handed to a blocking thread, so they stay in order.
        write_atomic(path, &text)
    }
}

/// "tokens holds generation 7 (the rotator's current: 10), receipts ..."
fn waiting_detail(gates: &[Gate]) -> String {
    gates
        .iter()
        .map(|g| {
            let view = g.repo.view();
            let mut text = format!("{} holds generation {}", g.repo.name, view.generation);
            match (g.confirmed, g.rotator_named) {
                (Some(_), _) => text.push_str(" (confirmed)"),
                (None, _) if g.unknown_to_rotator => {
                    text.push_str(" (the rotator does not rotate it)")
                }
                (None, Some(n)) => text.push_str(&format!(" (the rotator's current: {n})")),
                (None, None) => text.push_str(" (not confirmed yet)"),
            }
            text
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Temporary file beside it, written, fsynced, renamed over; mode 0644 (it
/// holds no secret, and a probe may run as another user).
fn write_atomic(path: &Path, content: &[u8]) -> Result<(), RecordError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let io = |source| RecordError::Io {
        path: path.to_path_buf(),
        source,
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(
        ".{name}.tmp-{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)?;
        file.write_all(content)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(io)
}

/// Why `fernetd agent --ready` answers no.
#[derive(Debug, thiserror::Error)]
pub enum NotReady {
    #[error(
        "agent.toml has no [readiness] record: set one for the agent to write and this check to read"
    )]
    NoRecord,
    #[error("no readiness record at {0}: the agent has not started (or writes another record)")]
    Missing(PathBuf),
    #[error(transparent)]
    Read(#[from] RecordError),
    #[error("readiness record {path} is not one the agent writes: {reason}")]
    Malformed { path: PathBuf, reason: String },
    #[error("{0}")]
    Waiting(String),
    #[error(
        "ready only because max_wait ran out without the rotator's confirmation ({0}); --require-current asks for the rotator's"
    )]
    NotCurrent(String),
    #[error("repository {name:?}: {problem}")]
    Repository { name: String, problem: String },
}

impl NotReady {
    /// The configuration's fault (exit 2) rather than a negative answer (exit 1).
    pub fn is_config(&self) -> bool {
        matches!(self, NotReady::NoRecord)
    }
}

/// Exits-0 logic of `fernetd agent --ready`: the record says ready (current,
/// or timeout unless `require_current`), names every configured repository,
/// and each repository on disk still holds what the gate opened with or a
/// later generation (a repository restored behind the agent's back fails).
/// Returns the answer's text.
pub fn check_record(config: &AgentConfig, require_current: bool) -> Result<String, NotReady> {
    let path = config.readiness.record.as_ref().ok_or(NotReady::NoRecord)?;
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(NotReady::Missing(path.clone()));
        }
        Err(source) => {
            return Err(RecordError::Io {
                path: path.clone(),
                source,
            }
            .into());
        }
    };
    let record: Record = serde_json::from_slice(&bytes).map_err(|e| NotReady::Malformed {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    if !record.ready {
        return Err(NotReady::Waiting(record.detail));
    }
    if record.reason == Reason::Timeout.as_str() && require_current {
        return Err(NotReady::NotCurrent(record.detail));
    }
    let mut held = Vec::new();
    for repo in &config.repositories {
        let problem = |problem: String| NotReady::Repository {
            name: repo.name.clone(),
            problem,
        };
        let Some(opened) = record.repositories.iter().find(|r| r.name == repo.name) else {
            return Err(problem(
                "not in the readiness record (the agent runs another configuration)".into(),
            ));
        };
        let stamp = crate::repository::read_stamp(&repo.path)
            .map_err(|e| problem(crate::error_chain(&e)))?;
        let (generation, digest) =
            stamp.map_or((0, String::new()), |s| (s.generation, s.digest.to_hex()));
        if generation < opened.generation
            || (generation == opened.generation && digest != opened.digest)
        {
            return Err(problem(format!(
                "{} holds generation {generation}, not the generation {} the agent reported ready with (changed behind the agent's back?)",
                repo.path.display(),
                opened.generation
            )));
        }
        held.push(format!("{} generation {generation}", repo.name));
    }
    Ok(format!(
        "ready ({}): {}; {}",
        record.reason,
        held.join(", "),
        record.detail
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, record: Option<PathBuf>) -> AgentConfig {
        let mut config: AgentConfig = toml::from_str(
            r#"
            region = "RegionOne"
            listen = "127.0.0.1:7443"
            rotator_identity = "rotator.example.net"
            [tls]
            ca = "/ca.pem"
            cert = "/agent.pem"
            key = "/agent.key"
            "#,
        )
        .expect("parse");
        config.repositories[0].path = dir.join("tokens");
        config.readiness.record = record;
        config
    }

    fn stamp(dir: &Path, generation: u64, digest: Digest) {
        let repo = dir.join("tokens");
        std::fs::create_dir_all(&repo).expect("repository");
        let stamp = crate::repository::Stamp {
            generation,
            digest,
            promoted: Default::default(),
            agent: true,
        };
        std::fs::write(repo.join(crate::repository::STAMP_FILE), stamp.encode()).expect("stamp");
    }

    fn record(path: &Path, reason: Reason, generation: u64, digest: Digest) {
        let record = Record {
            ready: reason != Reason::Waiting,
            reason: reason.as_str().into(),
            detail: format!("{} detail", reason.as_str()),
            since_unix_ms: 1,
            pid: 1,
            repositories: vec![RecordRepository {
                name: "tokens".into(),
                generation,
                digest: digest.to_hex(),
                confirmed: reason == Reason::Current,
            }],
        };
        write_atomic(path, &serde_json::to_vec(&record).expect("json")).expect("record");
    }

    #[test]
    fn the_probe_answers_from_the_record_and_the_stamps_on_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ready.json");
        let (d5, d6) = (Digest([5; 32]), Digest([6; 32]));
        let no_record = check_record(&config(dir.path(), None), false).expect_err("no record");
        assert!(no_record.is_config(), "{no_record}");
        let config = config(dir.path(), Some(path.clone()));
        assert!(matches!(
            check_record(&config, false),
            Err(NotReady::Missing(_))
        ));
        stamp(dir.path(), 5, d5);

        record(&path, Reason::Waiting, 5, d5);
        assert!(matches!(
            check_record(&config, false),
            Err(NotReady::Waiting(_))
        ));

        record(&path, Reason::Current, 5, d5);
        let answer = check_record(&config, true).expect("ready");
        assert!(
            answer.starts_with("ready (current): tokens generation 5"),
            "{answer}"
        );

        // A later install is fine; a set restored behind the agent's back, or
        // another set under the same number, is not.
        stamp(dir.path(), 6, d6);
        check_record(&config, true).expect("ahead of the record");
        stamp(dir.path(), 4, d5);
        assert!(matches!(
            check_record(&config, false),
            Err(NotReady::Repository { .. })
        ));
        stamp(dir.path(), 5, d6);
        assert!(matches!(
            check_record(&config, false),
            Err(NotReady::Repository { .. })
        ));

        stamp(dir.path(), 5, d5);
        record(&path, Reason::Timeout, 5, d5);
        check_record(&config, false).expect("ready by timeout");
        assert!(matches!(
            check_record(&config, true),
            Err(NotReady::NotCurrent(_))
        ));
        std::fs::write(&path, "{").expect("garbage");
        assert!(matches!(
            check_record(&config, false),
            Err(NotReady::Malformed { .. })
        ));
    }
}
