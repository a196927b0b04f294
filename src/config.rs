//! TOML configuration for the rotator, agent and admin client: serde types with
//! defaults and one `load(path)` for all of them. Any error here exits with code 2.
//! Each role's section below is owned by that role's module.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// What is wrong with a configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid configuration file {path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Reads and parses one TOML configuration file. Unknown keys are refused by the
/// types themselves (`deny_unknown_fields`), so a typo is an error, not a default.
pub fn load<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| ConfigError::Parse {
        path: path.to_path_buf(),
        source,
    })
}

/// How a daemon writes its log lines on standard error.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Serde for durations written as `"250ms"`, `"90s"`, `"15m"`, `"1h"`, `"2d"`
/// (humantime's syntax, so `"1h 30m"` too) or a bare integer number of seconds.
pub mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Parses humantime text, or digits alone as seconds.
    pub fn parse(text: &str) -> Result<Duration, String> {
        let text = text.trim();
        if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
            return text
                .parse()
                .map(Duration::from_secs)
                .map_err(|_| format!("`{text}` is too long"));
        }
        humantime::parse_duration(text).map_err(|e| {
            format!("`{text}` is not a duration such as \"90s\", \"15m\", \"1h\": {e}")
        })
    }

    /// Whole seconds (`"90s"`), or milliseconds when there is a fraction
    /// (`"1500ms"`): one unit, so generated files and messages compare easily.
    pub fn format(d: &Duration) -> String {
        if d.subsec_millis() != 0 {
            format!("{}ms", d.as_millis())
        } else {
            format!("{}s", d.as_secs())
        }
    }

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(d))
    }

    /// A duration as written: a bare number of seconds, or text.
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Seconds(u64),
        Text(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        match Raw::deserialize(d)? {
            Raw::Seconds(n) => Ok(Duration::from_secs(n)),
            Raw::Text(t) => parse(&t).map_err(serde::de::Error::custom),
        }
    }

    /// The same for an optional setting: absent (or `"off"`) is `None`.
    pub mod option {
        use std::time::Duration;

        use serde::{Deserialize, Deserializer, Serializer};

        pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => s.serialize_str(&super::format(d)),
                None => s.serialize_str("off"),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            match super::Raw::deserialize(d)? {
                super::Raw::Text(t) if t.trim() == "off" => Ok(None),
                super::Raw::Seconds(n) => Ok(Some(Duration::from_secs(n))),
                super::Raw::Text(t) => super::parse(&t).map(Some).map_err(serde::de::Error::custom),
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn durations_parse_and_round_trip() {
            assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
            assert_eq!(parse("90s"), Ok(Duration::from_secs(90)));
            assert_eq!(parse("15m"), Ok(Duration::from_secs(900)));
            assert_eq!(parse("2d"), Ok(Duration::from_secs(172_800)));
            assert_eq!(parse("7"), Ok(Duration::from_secs(7)));
            assert_eq!(parse("1h 30m"), Ok(Duration::from_secs(5400)));
            assert!(parse("1 fortnight").is_err());
            assert!(parse("h").is_err());
            for d in [Duration::from_millis(1500), Duration::from_secs(3600)] {
                assert_eq!(parse(&format(&d)), Ok(d));
            }
        }
    }
}

/// The PEM files of one TLS identity and the CA that peers must chain to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// CA certificate(s) that peers' certificates must chain to.
    pub ca: PathBuf,
    /// This process's certificate chain.
    pub cert: PathBuf,
    /// This process's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

// ---------------------------------------------------------------- agent

/// `agent.toml`: one regional agent. Serializable so `fernetd demo` and tests
/// generate it from the type rather than from hand-written TOML.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The region this agent serves, reported in `GetState`.
    pub region: String,
    /// gRPC (mTLS) listen address.
    pub listen: std::net::SocketAddr,
    /// Prometheus endpoint (plain HTTP, `/metrics`); none when absent. The
    /// TOML key is `metrics_listen`, as in `rotator.toml`.
    #[serde(
        default,
        rename = "metrics_listen",
        alias = "metrics",
        skip_serializing_if = "Option::is_none"
    )]
    pub metrics: Option<std::net::SocketAddr>,
    /// The certificate SAN (DNS name or URI) the rotator presents; only it may
    /// `Install`.
    pub rotator_identity: String,
    /// Further identities that may read `GetState` and the health service (a
    /// monitoring system); the rotator always may. Nobody else may call at all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub monitor_identities: Vec<String>,
    /// What to do when a repository changes behind the agent's back.
    #[serde(default)]
    pub drift: DriftPolicy,
    /// Interval of the drift checks that back up file-system notifications,
    /// written like the rotator's durations (`"60s"`, `"5m"`). The key
    /// `drift_check_seconds` (a number of seconds) is accepted as an alias.
    #[serde(
        with = "duration",
        default = "default_drift_check",
        alias = "drift_check_seconds"
    )]
    pub drift_check: std::time::Duration,
    /// Largest gRPC message accepted; an `Install` of 1,000 keys is about 40 KiB.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// How long a call may take before it is answered `DEADLINE_EXCEEDED`
    /// (an install takes milliseconds). A credential migrate is bounded by
    /// `[credential] run_timeout` instead.
    #[serde(with = "duration", default = "default_request_timeout")]
    pub request_timeout: std::time::Duration,
    /// How long a connection may stay open without a request its peer may
    /// make (the first one; refused calls do not count) before it is closed,
    /// so peers that complete a handshake and then say nothing do not keep
    /// connection slots (a few are kept for the rotator anyway).
    #[serde(with = "duration", default = "default_first_request_timeout")]
    pub first_request_timeout: std::time::Duration,
    /// Log format; the `--log-format` flag applies when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_format: Option<LogFormat>,
    pub tls: TlsConfig,
    /// Managed repositories; default: `tokens` at `/etc/keystone/fernet-keys`.
    #[serde(default = "default_repositories")]
    pub repositories: Vec<AgentRepository>,
    /// This region's keystone.conf: when set, the agent refuses to start if a
    /// repository it manages is not the one Keystone reads (`fernetd::policy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keystone_conf: Option<PathBuf>,
    /// Append-only JSON-lines audit log of installs, refusals and drift
    /// (fsynced before each answer; reopened on SIGHUP); none when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_log: Option<PathBuf>,
    /// `[credential]`: how this agent migrates the credential table when the
    /// rotator asks it to (only the rotator's `migrate_region` is asked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<AgentCredentialConfig>,
    /// `[readiness]`: when the agent tells its supervisor (systemd's
    /// `READY=1`, the readiness record) that Keystone may serve.
    #[serde(default)]
    pub readiness: ReadinessConfig,
}

/// `[readiness]` in `agent.toml`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadinessConfig {
    /// How long the agent waits for the rotator to confirm every repository
    /// before it reports ready anyway with the set it holds (so a region cut
    /// off from the rotator still starts its Keystone). `"0s"`: at once.
    #[serde(with = "duration", default = "default_max_wait")]
    pub max_wait: std::time::Duration,
    /// A JSON file the agent rewrites (atomically) whenever its readiness
    /// changes; `fernetd agent --ready` reads it. None: no record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<PathBuf>,
}

impl Default for ReadinessConfig {
    fn default() -> Self {
        ReadinessConfig {
            max_wait: default_max_wait(),
            record: None,
        }
    }
}

/// The readiness gate's default wait for the rotator.
pub const DEFAULT_READINESS_MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(300);
/// The longest wait accepted: the shipped unit's start timeout is extended to
/// cover the configured one, but a start that waits a day helps no one.
pub const MAX_READINESS_WAIT: std::time::Duration = std::time::Duration::from_secs(3600);

fn default_max_wait() -> std::time::Duration {
    DEFAULT_READINESS_MAX_WAIT
}

/// `[credential]` in `agent.toml`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentCredentialConfig {
    /// Keystone's own `keystone-manage`, run with `--config-file keystone_conf
    /// credential_migrate`; the `python3` beside it runs the row check.
    pub keystone_manage: PathBuf,
    /// How long each of a migrate's three tool runs (count, migrate, count)
    /// may take; a migrate call is allowed three of them. A large table takes
    /// a while (one row at a time); a hung database must not hold a rotation.
    #[serde(with = "duration", default = "default_run_timeout")]
    pub run_timeout: std::time::Duration,
}

/// How long each credential tool run may take by default (`[credential] run_timeout`).
pub const DEFAULT_CREDENTIAL_RUN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);
/// The servers' default bound on one call.
pub const DEFAULT_REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// The servers' default bound on a connection's wait for its first request.
pub const DEFAULT_FIRST_REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

fn default_run_timeout() -> std::time::Duration {
    DEFAULT_CREDENTIAL_RUN_TIMEOUT
}

fn default_request_timeout() -> std::time::Duration {
    DEFAULT_REQUEST_TIMEOUT
}

fn default_first_request_timeout() -> std::time::Duration {
    DEFAULT_FIRST_REQUEST_TIMEOUT
}

/// One repository the agent manages.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentRepository {
    /// The name the rotator pushes to (`tokens`, `receipts`, `credential`).
    pub name: String,
    /// Keystone's `key_repository` directory (absolute).
    pub path: PathBuf,
    /// `user:group` (names or numeric ids) owning the key files; default: the agent's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

/// The agent's answer to a repository changed by someone else.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DriftPolicy {
    /// Log it, count it, show it in `GetState`; the rotator's reconcile re-pushes.
    #[default]
    Report,
    /// Also re-install the last set the agent installed, at once.
    Restore,
}

fn default_drift_check() -> std::time::Duration {
    std::time::Duration::from_secs(60)
}

/// 64 KiB: a thousand keys with canaries fit, a flood does not.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024;

fn default_max_message_bytes() -> usize {
    DEFAULT_MAX_MESSAGE_BYTES
}

fn default_repositories() -> Vec<AgentRepository> {
    vec![AgentRepository {
        name: "tokens".into(),
        path: PathBuf::from("/etc/keystone/fernet-keys"),
        owner: None,
    }]
}

/// An agent configuration that parses but cannot work.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AgentConfigError {
    #[error("no repository configured")]
    NoRepository,
    #[error("repository name {0:?} must be 1 to 64 ASCII letters, digits, '-' or '_'")]
    BadName(String),
    #[error("repository {0:?} is configured twice")]
    DuplicateName(String),
    #[error("repository {name:?}: path {path} must be absolute")]
    RelativePath { name: String, path: PathBuf },
    #[error("repositories {a:?} and {b:?} overlap ({path})")]
    Overlap { a: String, b: String, path: PathBuf },
    #[error("rotator_identity must not be empty")]
    NoRotatorIdentity,
    #[error("max_message_bytes {0} is outside 4 KiB .. 16 MiB")]
    MessageSize(usize),
    #[error("drift_check must be at least 1s")]
    DriftInterval,
    #[error("{0} must be at least 1s")]
    TooShort(&'static str),
    #[error(
        "[credential] keystone_manage needs keystone_conf: credential_migrate must run with this region's keystone.conf"
    )]
    CredentialWithoutKeystoneConf,
    #[error("[readiness] max_wait must be at most 1h")]
    ReadinessWait,
    #[error("[readiness] record {0} must be an absolute path outside every repository")]
    ReadinessRecord(PathBuf),
}

/// The longest repository name, on the rotator and on an agent alike.
pub const MAX_REPOSITORY_NAME: usize = 64;

/// Whether `name` may name a key repository: 1 to [`MAX_REPOSITORY_NAME`]
/// ASCII letters, digits, `-` or `_`. The rotator and every agent apply this
/// one rule, so a name one side accepts is never refused by the other; the
/// name becomes one path component (the rotator's state file, an etcd key).
pub fn is_repository_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_REPOSITORY_NAME
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

impl AgentConfig {
    /// Checks what serde cannot: names, absolute and disjoint paths, limits.
    pub fn validate(&self) -> Result<(), AgentConfigError> {
        if self.rotator_identity.trim().is_empty() {
            return Err(AgentConfigError::NoRotatorIdentity);
        }
        if !(4096..=16 << 20).contains(&self.max_message_bytes) {
            return Err(AgentConfigError::MessageSize(self.max_message_bytes));
        }
        if self.drift_check < std::time::Duration::from_secs(1) {
            return Err(AgentConfigError::DriftInterval);
        }
        let second = std::time::Duration::from_secs(1);
        for (name, bound) in [
            ("request_timeout", self.request_timeout),
            ("first_request_timeout", self.first_request_timeout),
            (
                "[credential] run_timeout",
                self.credential.as_ref().map_or(second, |c| c.run_timeout),
            ),
        ] {
            if bound < second {
                return Err(AgentConfigError::TooShort(name));
            }
        }
        if self.repositories.is_empty() {
            return Err(AgentConfigError::NoRepository);
        }
        if self.readiness.max_wait > MAX_READINESS_WAIT {
            return Err(AgentConfigError::ReadinessWait);
        }
        if let Some(record) = &self.readiness.record {
            // Inside a repository it would be drift, and swapped away.
            if !record.is_absolute()
                || self
                    .repositories
                    .iter()
                    .any(|r| record.starts_with(&r.path))
            {
                return Err(AgentConfigError::ReadinessRecord(record.clone()));
            }
        }
        if self.credential.is_some() && self.keystone_conf.is_none() {
            return Err(AgentConfigError::CredentialWithoutKeystoneConf);
        }
        for (i, repo) in self.repositories.iter().enumerate() {
            if !is_repository_name(&repo.name) {
                return Err(AgentConfigError::BadName(repo.name.clone()));
            }
            if !repo.path.is_absolute() {
                return Err(AgentConfigError::RelativePath {
                    name: repo.name.clone(),
                    path: repo.path.clone(),
                });
            }
            for other in &self.repositories[..i] {
                if other.name == repo.name {
                    return Err(AgentConfigError::DuplicateName(repo.name.clone()));
                }
                if other.path.starts_with(&repo.path) || repo.path.starts_with(&other.path) {
                    return Err(AgentConfigError::Overlap {
                        a: other.name.clone(),
                        b: repo.name.clone(),
                        path: repo.path.clone(),
                    });
                }
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------- rotator

mod rotator;
pub use self::rotator::{
    AdminConfig, AgentEndpoint, CREDENTIAL_REPOSITORY, CredentialConfig, FanoutConfig, HaConfig,
    PolicyConfig, RepoKind, RepositoryConfig, RotatorConfig, RotatorEndpoints, ScheduleConfig,
};

// ---------------------------------------------------------------- admin

#[cfg(test)]
mod tests {
    use super::*;

    /// The rotator and an agent refuse the same names: a name one accepts is
    /// never refused by the other (64 characters at most on both sides).
    #[test]
    fn the_repository_name_rule_takes_64_characters_on_both_sides() {
        let longest = "a".repeat(MAX_REPOSITORY_NAME);
        let longer = "a".repeat(MAX_REPOSITORY_NAME + 1);
        for (name, valid) in [
            (longest.as_str(), true),
            ("tokens-2_b", true),
            (longer.as_str(), false),
            ("", false),
            ("to kens", false),
            ("../x", false),
        ] {
            let agent: AgentConfig = toml::from_str(&format!(
                r#"
                region = "region-one"
                listen = "127.0.0.1:7443"
                rotator_identity = "rotator.example.net"
                [tls]
                ca = "/ca.pem"
                cert = "/agent.pem"
                key = "/agent.key"
                [[repositories]]
                name = "{name}"
                path = "/etc/keystone/fernet-keys"
                "#
            ))
            .expect("parse");
            assert_eq!(agent.validate().is_ok(), valid, "agent, {name:?}");
            assert_eq!(
                crate::rotator::state::check_name(name).is_ok(),
                valid,
                "rotator, {name:?}"
            );
        }
    }
}
