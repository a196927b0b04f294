//! The agent's part of a credential rotation: on the rotator's request, run
//! Keystone's own `keystone-manage credential_migrate` against the shared
//! database, then count the rows of the `credential` table by the key that
//! decrypts them with Keystone's own code (`keystone/credential-check.py`, built
//! into the binary and run by the `python3` beside `keystone-manage`). The
//! counts before and after tell the rotator whether the purge of the previous
//! key would strand a row; this module only reports, the rotator decides.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::pb;

/// The row check, Keystone's own code: the same file ships in `keystone/`.
const CHECK_SCRIPT: &str = include_str!("../../keystone/credential-check.py");

/// How long one `keystone-manage` or check run may take by default
/// (`[credential] run_timeout`): a migrate updates one row at a time, so a
/// large table takes a while, but a hung database must not hold the rotation
/// forever.
const DEFAULT_RUN_TIMEOUT: Duration = crate::config::DEFAULT_CREDENTIAL_RUN_TIMEOUT;

/// How many tool runs one migrate makes: a count, the migrate, a count. The
/// agent lets a `MigrateCredentials` call run this many `run_timeout`s.
pub const RUNS_PER_MIGRATE: u32 = 3;

/// The whole environment of a tool run: Keystone's tools read their settings
/// from `--config-file`, and the agent's own environment (its unit's, an
/// operator's shell's) is passed on to nobody.
const CHILD_ENVIRONMENT: &[(&str, &str)] = &[
    ("PATH", "/usr/local/bin:/usr/bin:/bin"),
    ("LANG", "C.UTF-8"),
    ("PYTHONWARNINGS", "ignore"),
];

/// Why a migrate or a count did not complete.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("cannot run {program}")]
    Spawn {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} did not finish within {}", crate::config::duration::format(.timeout))]
    Timeout {
        what: &'static str,
        timeout: Duration,
    },
    #[error("lost track of {what}")]
    Wait {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} failed ({status}): {detail}")]
    Failed {
        what: &'static str,
        status: std::process::ExitStatus,
        detail: String,
    },
    #[error("the row check printed no counts: {0}")]
    BadCounts(String),
}

/// How this agent reaches Keystone's tools.
#[derive(Debug, Clone)]
pub struct Migrator {
    keystone_manage: PathBuf,
    python: PathBuf,
    keystone_conf: PathBuf,
    run_timeout: Duration,
}

/// What a migrate found and did.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub before: Option<pb::CredentialRows>,
    pub after: Option<pb::CredentialRows>,
    /// Why the table is not (known to be) all under the primary; None = passed.
    pub failure: Option<String>,
}

impl Migrator {
    pub fn new(keystone_manage: &Path, keystone_conf: &Path) -> Self {
        Migrator {
            keystone_manage: keystone_manage.to_path_buf(),
            python: keystone_manage.with_file_name("python3"),
            keystone_conf: keystone_conf.to_path_buf(),
            run_timeout: DEFAULT_RUN_TIMEOUT,
        }
    }

    /// Bounds each tool run by `timeout` instead of [`DEFAULT_RUN_TIMEOUT`].
    pub fn with_run_timeout(mut self, timeout: Duration) -> Self {
        self.run_timeout = timeout;
        self
    }

    /// The longest a whole migrate may take: every run at its bound.
    pub fn migrate_timeout(&self) -> Duration {
        self.run_timeout * RUNS_PER_MIGRATE
    }

    /// Counts, migrates, counts again. Never fails as a call: every failure is
    /// in the report, with the counts known so far.
    pub async fn migrate(&self) -> Report {
        let mut report = Report::default();
        let outcome = async {
            report.before = Some(self.count().await?);
            self.run(
                "keystone-manage credential_migrate",
                tokio::process::Command::new(&self.keystone_manage)
                    .arg("--config-file")
                    .arg(&self.keystone_conf)
                    .arg("credential_migrate")
                    // Required of root by keystone-manage's parser, unused by
                    // the migrate: the agent's own ids.
                    .arg("--keystone-user")
                    .arg(rustix::process::geteuid().as_raw().to_string())
                    .arg("--keystone-group")
                    .arg(rustix::process::getegid().as_raw().to_string()),
            )
            .await?;
            report.after = Some(self.count().await?);
            Ok::<_, MigrateError>(())
        }
        .await;
        report.failure = match (outcome, &report.after) {
            // The tools' own words may quote the database URL with its
            // password: redacted before the reason leaves this function.
            (Err(e), _) => Some(crate::redact::redact(&crate::error_chain(&e))),
            (Ok(()), Some(after)) if after.primary != after.total => Some(format!(
                "after credential_migrate, {} of {} rows are not under the primary key ({} under another key, {} under the all-zero key, {} undecryptable)",
                after.total - after.primary,
                after.total,
                after.other,
                after.null_key,
                after.undecryptable
            )),
            (Ok(()), _) => None,
        };
        report
    }

    /// The rows by key, from Keystone's own code.
    pub async fn count(&self) -> Result<pb::CredentialRows, MigrateError> {
        let out = self
            .run(
                "the credential row check",
                tokio::process::Command::new(&self.python)
                    .arg("-c")
                    .arg(CHECK_SCRIPT)
                    .arg(&self.keystone_conf),
            )
            .await?;
        parse_counts(&out)
    }

    async fn run(
        &self,
        what: &'static str,
        command: &mut tokio::process::Command,
    ) -> Result<String, MigrateError> {
        let program = PathBuf::from(command.as_std().get_program());
        // A minimal environment: the agent's own (its unit's, an operator's
        // shell's) is none of the tools' business.
        command
            .env_clear()
            .envs(CHILD_ENVIRONMENT.iter().copied())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let started = Instant::now();
        let child = spawn_confined(command)
            .await
            .map_err(|source| MigrateError::Spawn { program, source })?;
        let output = tokio::time::timeout(self.run_timeout, child.wait_with_output())
            .await
            .map_err(|_| MigrateError::Timeout {
                what,
                timeout: self.run_timeout,
            })?
            .map_err(|source| MigrateError::Wait { what, source })?;
        tracing::debug!(what, elapsed_ms = started.elapsed().as_millis() as u64, status = %output.status, "ran");
        if !output.status.success() {
            return Err(MigrateError::Failed {
                what,
                status: output.status,
                detail: last_line(&output.stderr),
            });
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

/// The capabilities a tool run keeps: reading the Keystone-owned key files
/// (0600 in 0700 directories) is all it needs of the agent's privileges.
const CHILD_CAPABILITY: rustix::thread::CapabilitySet =
    rustix::thread::CapabilitySet::DAC_READ_SEARCH;

/// Spawns `command` with no capability but `CAP_DAC_READ_SEARCH`, whatever
/// the agent holds (`CAP_CHOWN`, `CAP_FOWNER` and `CAP_DAC_OVERRIDE`, ambient
/// under its unit). Capabilities are per thread on Linux and a child gets
/// those of the thread that forks it: the spawn happens on a thread of its
/// own that first narrows its inheritable and ambient sets to
/// [`CHILD_CAPABILITY`] (and, when it may, as root, its bounding set, since a
/// root child would otherwise get every capability of the bounding set),
/// then ends. The agent's other threads keep theirs.
async fn spawn_confined(
    command: &mut tokio::process::Command,
) -> std::io::Result<tokio::process::Child> {
    let runtime = tokio::runtime::Handle::current();
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                confine_this_thread()?;
                let _runtime = runtime.enter();
                command.spawn()
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the spawning thread panicked")))
    })
}

/// Narrows the calling thread's capabilities to what a child may inherit.
fn confine_this_thread() -> std::io::Result<()> {
    use rustix::thread::{self as t, CapabilitySet};
    let confine = |what: &str, e: rustix::io::Errno| {
        std::io::Error::other(format!(
            "cannot confine the child's capabilities ({what}): {e}"
        ))
    };
    t::clear_ambient_capability_set().map_err(|e| confine("clear the ambient set", e))?;
    let mut sets = t::capabilities(None).map_err(|e| confine("read", e))?;
    if sets.effective.contains(CapabilitySet::SETPCAP) {
        for bit in 0..64u32 {
            let cap = CapabilitySet::from_bits_retain(1 << bit);
            if cap != CHILD_CAPABILITY && t::capability_is_in_bounding_set(cap).unwrap_or(false) {
                t::remove_capability_from_bounding_set(cap)
                    .map_err(|e| confine("drop from the bounding set", e))?;
            }
        }
    }
    sets.inheritable = sets.permitted & CHILD_CAPABILITY;
    t::set_capabilities(None, sets).map_err(|e| confine("set the inheritable set", e))?;
    if !sets.inheritable.is_empty() {
        t::configure_capability_in_ambient_set(CHILD_CAPABILITY, true)
            .map_err(|e| confine("raise the ambient set", e))?;
    }
    Ok(())
}

/// The last non-empty line of a tool's error output: Python's exception, or
/// Keystone's "Unhandled error" line, with secrets redacted (a SQLAlchemy error
/// can quote the database URL). Never key material: neither tool prints keys.
fn last_line(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let line = text
        .lines()
        .rev()
        .map(str::trim)
        // SQLAlchemy ends its errors with a link to its documentation.
        .find(|l| !l.is_empty() && !l.starts_with("(Background on this error"))
        .unwrap_or("no error output");
    // Redacted before it is cut, so a cut cannot leave half a password unmatched.
    crate::redact::redact(line).chars().take(400).collect()
}

/// Reads the check script's JSON line.
fn parse_counts(stdout: &str) -> Result<pb::CredentialRows, MigrateError> {
    let value: serde_json::Value = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .ok_or_else(|| MigrateError::BadCounts(stdout.chars().take(200).collect()))?;
    let field = |name: &str| {
        value[name]
            .as_u64()
            .ok_or_else(|| MigrateError::BadCounts(format!("no `{name}` count")))
    };
    Ok(pb::CredentialRows {
        total: field("total")?,
        primary: field("primary")?,
        other: field("other")?,
        null_key: field("null")?,
        undecryptable: field("undecryptable")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_read_from_the_last_json_line() {
        let out = "noise\n{\"by_key_hash\": {}, \"null\": 2, \"other\": 1, \"primary\": 4, \"primary_key_hash\": \"x\", \"total\": 8, \"undecryptable\": 1}\n";
        let rows = parse_counts(out).expect("counts");
        assert_eq!(
            (
                rows.total,
                rows.primary,
                rows.other,
                rows.null_key,
                rows.undecryptable
            ),
            (8, 4, 1, 2, 1)
        );
        assert!(parse_counts("Traceback\n").is_err());
        assert!(parse_counts("{\"total\": 1}").is_err());
    }

    #[tokio::test]
    async fn a_failing_tool_is_a_failed_report_with_its_last_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tool = dir.path().join("keystone-manage");
        std::fs::write(
            &tool,
            "#!/bin/sh\necho 'Unhandled error: boom' >&2\nexit 1\n",
        )
        .expect("write tool");
        std::fs::write(dir.path().join("python3"), "#!/bin/sh\nexit 3\n").expect("write python");
        for f in ["keystone-manage", "python3"] {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(dir.path().join(f), std::fs::Permissions::from_mode(0o755))
                .expect("chmod");
        }
        let report = Migrator::new(&tool, Path::new("/nonexistent.conf"))
            .migrate()
            .await;
        let failure = report.failure.expect("failed");
        assert!(failure.contains("row check failed"), "{failure}");
        assert!(report.before.is_none() && report.after.is_none());
    }

    /// SQLAlchemy quotes the connection URL in its errors: the password must
    /// not reach the report (stored, audited and shown by the rotator).
    #[tokio::test]
    async fn a_database_password_in_the_error_never_reaches_the_report() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("python3"),
            "#!/bin/sh\necho \"sqlalchemy.exc.OperationalError: (1045) cannot connect to mysql+pymysql://keystone:Hunter2pw@db/keystone password=Hunter2pw\" >&2\nexit 1\n",
        )
        .expect("write python");
        std::fs::write(dir.path().join("keystone-manage"), "#!/bin/sh\nexit 0\n")
            .expect("write tool");
        for f in ["keystone-manage", "python3"] {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(dir.path().join(f), std::fs::Permissions::from_mode(0o755))
                .expect("chmod");
        }
        let report = Migrator::new(
            &dir.path().join("keystone-manage"),
            Path::new("/nonexistent.conf"),
        )
        .migrate()
        .await;
        let failure = report.failure.expect("failed");
        assert!(!failure.contains("Hunter2pw"), "{failure}");
        assert!(
            failure.contains("mysql+pymysql://keystone:***@db/keystone"),
            "{failure}"
        );
    }
}
