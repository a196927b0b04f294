//! The audit log: one JSON line per event that changes keys or their
//! distribution (a rotation committed, forced, blocked or held, a key purged, an
//! install, a refused push, drift and its restore, an agent seen for the first
//! time), with the time, the actor, the repository, generation, digest, key
//! indices and the outcome. Never a key: entries carry indices and digests only.
//!
//! Each line is appended with one `write` on a file opened `O_APPEND` and then
//! fsynced before the caller acknowledges the action, so a crash (SIGKILL
//! included) leaves whole lines only, and an action that was answered is on
//! disk. `reopen` (on SIGHUP) lets logrotate move the file away.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Serialize;

/// Why the audit log cannot be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot open the audit log {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot append to the audit log {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One audited event.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Entry {
    /// RFC 3339, UTC, milliseconds; filled in by [`AuditLog::record`].
    pub time: String,
    /// `rotator` or `agent`; filled in by the log.
    pub role: &'static str,
    /// Who caused it: an admin's certificate identity, `schedule`, the rotator's
    /// identity for pushes, `agent` for what an agent does by itself.
    pub actor: String,
    /// `rotation`, `purge`, `install`, `refusal`, `drift`, `enrolment`, ...
    pub event: &'static str,
    pub repository: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub agent: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub region: String,
    pub generation: u64,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub digest: String,
    /// Key indices of the set (never key material).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<u32>,
    /// `committed`, `forced`, `blocked`, `held`, `installed`, `refused`, ...
    pub outcome: &'static str,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// An append-only, fsynced JSON-lines file.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    role: &'static str,
    file: Mutex<File>,
}

fn open(path: &Path) -> Result<File, AuditError> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .open(path)
        .map_err(|source| AuditError::Open {
            path: path.to_path_buf(),
            source,
        })
}

impl AuditLog {
    /// Opens (creating, mode 0640) the log at `path` for `role`.
    pub fn open(path: &Path, role: &'static str) -> Result<Arc<AuditLog>, AuditError> {
        Ok(Arc::new(AuditLog {
            path: path.to_path_buf(),
            role,
            file: Mutex::new(open(path)?),
        }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `entry` as one line and fsyncs it. Blocking: async callers use
    /// [`AuditLog::append`].
    pub fn record(&self, mut entry: Entry) -> Result<(), AuditError> {
        entry.role = self.role;
        entry.time = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        // Strings and numbers only: serializing cannot fail.
        let mut line = serde_json::to_vec(&entry).unwrap_or_default();
        line.push(b'\n');
        let file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let write = |source| AuditError::Write {
            path: self.path.clone(),
            source,
        };
        // One write of the whole line: O_APPEND places it whole at the end.
        (&*file).write_all(&line).map_err(write)?;
        file.sync_data().map_err(write)
    }

    /// [`AuditLog::record`] off the async runtime; done when it is on disk.
    pub async fn append(self: &Arc<Self>, entry: Entry) -> Result<(), AuditError> {
        let log = self.clone();
        match tokio::task::spawn_blocking(move || log.record(entry)).await {
            Ok(result) => result,
            Err(e) => Err(AuditError::Write {
                path: self.path.clone(),
                source: std::io::Error::other(e.to_string()),
            }),
        }
    }

    /// Reopens the file at its path (after logrotate moved it).
    pub fn reopen(&self) -> Result<(), AuditError> {
        let fresh = open(&self.path)?;
        *self.file.lock().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(())
    }
}

/// Reopens `log` on every SIGHUP (`systemctl reload`, logrotate's
/// postrotate) until `stop` is cancelled.
pub async fn reopen_on_sighup(log: Arc<AuditLog>, stop: tokio_util::sync::CancellationToken) {
    reload_on_sighup(Some(log), stop).await
}

/// [`reopen_on_sighup`] for a daemon that may have no audit log: without one
/// the signal is only logged (never fatal: the command line keeps SIGHUP from
/// ending a daemon).
pub async fn reload_on_sighup(
    log: Option<Arc<AuditLog>>,
    stop: tokio_util::sync::CancellationToken,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP: the audit log is not reopened on reload");
        return;
    };
    loop {
        tokio::select! {
            _ = hup.recv() => match &log {
                Some(log) => match log.reopen() {
                    Ok(()) => tracing::info!(path = %log.path().display(), "SIGHUP: audit log reopened"),
                    Err(e) => tracing::error!(error = %crate::error_chain(&e), "SIGHUP: cannot reopen the audit log"),
                },
                None => tracing::info!("SIGHUP: no audit log to reopen; certificates follow their files"),
            },
            _ = stop.cancelled() => return,
        }
    }
}

/// Appends when a log is configured; a failure is logged, never fatal: the
/// action already happened and the process's own log says so too.
pub async fn maybe_append(log: Option<&Arc<AuditLog>>, entry: Entry) {
    if let Some(log) = log
        && let Err(e) = log.append(entry).await
    {
        tracing::error!(error = %crate::error_chain(&e), "audit log not written");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_whole_json_and_survive_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path, "rotator").expect("open");
        log.record(Entry {
            actor: "schedule".into(),
            event: "rotation",
            repository: "tokens".into(),
            generation: 2,
            keys: vec![0, 1, 2],
            outcome: "committed",
            ..Default::default()
        })
        .expect("record");
        std::fs::rename(&path, dir.path().join("audit.log.1")).expect("rotate");
        log.reopen().expect("reopen");
        log.record(Entry {
            actor: "admin.example".into(),
            event: "purge",
            repository: "tokens".into(),
            generation: 3,
            outcome: "committed",
            ..Default::default()
        })
        .expect("record");
        let old = std::fs::read_to_string(dir.path().join("audit.log.1")).expect("old");
        let new = std::fs::read_to_string(&path).expect("new");
        let v: serde_json::Value = serde_json::from_str(old.trim()).expect("json");
        assert_eq!(v["event"], "rotation");
        assert_eq!(v["role"], "rotator");
        assert_eq!(v["keys"], serde_json::json!([0, 1, 2]));
        let v: serde_json::Value = serde_json::from_str(new.trim()).expect("json");
        assert_eq!(v["actor"], "admin.example");
    }
}
