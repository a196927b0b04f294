//! The regional agent: serves the Distribution API over mTLS, validates and
//! atomically installs key sets (no rollback, no fork), proves the installed
//! repository by decrypting canaries, and reports drift it did not cause.
//!
//! [`check`] runs every start-up check once; [`run`] takes the checked
//! configuration, its listeners and a shutdown future from the caller, so tests,
//! `fernetd demo` and the `fernetd agent` command run the same code on ports they
//! chose.

pub mod check;
mod credential;
mod drift;
mod managed;
mod metrics;
pub mod readiness;
mod service;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{AgentConfig, AgentConfigError, DriftPolicy};
use crate::install::{InstallError, Owner};
use crate::pb::distribution_server::DistributionServer;

pub use managed::{CanaryError, ProofError, Refusal};

/// Why the agent could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("invalid agent configuration")]
    Config(#[from] AgentConfigError),
    #[error("repository {name:?}: invalid owner {owner:?}")]
    Owner {
        name: String,
        owner: String,
        #[source]
        source: InstallError,
    },
    #[error("repository {name:?}: {path}: {reason}")]
    Parent {
        name: String,
        path: std::path::PathBuf,
        reason: &'static str,
    },
    #[error("repository {name:?}: cannot take charge of {path}")]
    Open {
        name: String,
        path: std::path::PathBuf,
        #[source]
        source: InstallError,
    },
    #[error("TLS set-up failed")]
    Tls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
    #[error(transparent)]
    Drift(#[from] drift::DriftError),
    #[error("this region's Keystone configuration")]
    Keystone(#[from] crate::policy::PolicyError),
    #[error("[readiness] record {path}: {reason}")]
    RecordParent {
        path: std::path::PathBuf,
        reason: &'static str,
    },
    #[error(transparent)]
    Readiness(#[from] readiness::RecordError),
    #[error("gRPC server failed")]
    Serve(#[source] tonic::transport::Error),
    #[error("start-up task failed: {0}")]
    Join(String),
}

impl AgentError {
    /// Whether the operator must fix the configuration (exit 2) rather than
    /// the environment (exit 3).
    pub fn is_config(&self) -> bool {
        match self {
            AgentError::Config(_)
            | AgentError::Owner { .. }
            | AgentError::Parent { .. }
            | AgentError::RecordParent { .. }
            | AgentError::Keystone(_) => true,
            AgentError::Tls(e) => e.is_config(),
            _ => false,
        }
    }
}

/// A configuration that passed every start-up check: its values, Keystone's
/// agreement, each repository's parent directory and owner. Only [`check`]
/// makes one, so [`run`] never checks twice.
#[derive(Debug, Clone)]
pub struct Checked {
    config: AgentConfig,
    owners: Vec<Option<Owner>>,
}

impl Checked {
    pub fn config(&self) -> &AgentConfig {
        &self.config
    }
}

/// Every check that can be made before anything is opened or bound: a refused
/// configuration changes nothing on disk. Keystone's warnings are logged here.
pub fn check(config: AgentConfig) -> Result<Checked, AgentError> {
    config.validate()?;
    if let Some(path) = &config.keystone_conf {
        let repos: Vec<(&str, &Path)> = config
            .repositories
            .iter()
            .map(|r| (r.name.as_str(), r.path.as_path()))
            .collect();
        for warning in crate::policy::KeystoneConf::load(path)?.check_agent(&repos)? {
            tracing::warn!(keystone_conf = %path.display(), "{warning}");
        }
    }
    if let Some(record) = &config.readiness.record {
        let parent = record.parent().unwrap_or(Path::new("/"));
        if !parent.is_dir() {
            return Err(AgentError::RecordParent {
                path: record.clone(),
                reason: "its directory does not exist",
            });
        }
    }
    // Every repository is checked before any is opened: opening removes
    // leftovers, and a refused configuration must change nothing.
    let mut owners = Vec::with_capacity(config.repositories.len());
    for repo in &config.repositories {
        check_parent(repo)?;
        owners.push(match &repo.owner {
            None => None,
            Some(text) => Some(Owner::parse(text).map_err(|source| AgentError::Owner {
                name: repo.name.clone(),
                owner: text.clone(),
                source,
            })?),
        });
    }
    Ok(Checked { config, owners })
}

/// Every check the agent runs before it opens a repository, each described
/// through `note` once it passed: the configuration's values, keystone.conf's
/// agreement, each repository's parent and owner ([`check`]), and the TLS
/// files. Writes nothing; the first failure is returned as the daemon would
/// refuse it.
pub fn preflight(config: AgentConfig, mut note: impl FnMut(String)) -> Result<Checked, AgentError> {
    let checked = check(config)?;
    let config = checked.config();
    note(format!(
        "region `{}`, only `{}` may install keys",
        config.region, config.rotator_identity
    ));
    if let Some(path) = &config.keystone_conf {
        note(format!("{} reads the repositories below", path.display()));
    }
    for (repo, owner) in config.repositories.iter().zip(&checked.owners) {
        note(format!(
            "repository `{}` at {} (its parent exists){}",
            repo.name,
            repo.path.display(),
            owner.map_or_else(String::new, |o| format!(
                ", files owned by {}:{}",
                o.uid, o.gid
            ))
        ));
    }
    crate::tls::ServerTls::load(&config.tls)?;
    note(format!(
        "TLS: certificate {}, key {}, CA {} load",
        config.tls.cert.display(),
        config.tls.key.display(),
        config.tls.ca.display()
    ));
    Ok(checked)
}

/// Runs an agent on `listener` (and the metrics endpoint on `metrics_listener`)
/// until `shutdown` resolves; in-flight installs complete and the drift watch is
/// stopped (no check runs, no file is watched) before it returns.
pub async fn run(
    checked: Checked,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let Checked { config, owners } = checked;
    let tls = crate::tls::ServerTls::load(&config.tls)?;
    let audit = config
        .audit_log
        .as_deref()
        .map(|path| crate::audit::AuditLog::open(path, "agent"))
        .transpose()?;
    let stop = CancellationToken::new();
    // SIGHUP is a reload in every configuration (the command line also keeps
    // it from ending the process): the audit log, when there is one, is
    // reopened; certificates follow their files without it.
    tokio::spawn(crate::audit::reload_on_sighup(audit.clone(), stop.clone()));
    let mut registry = prometheus_client::registry::Registry::default();
    let agent_metrics = metrics::AgentMetrics::register(&mut registry);
    crate::certs::register_expiry(&mut registry, &config.tls.cert);

    let mut repositories = BTreeMap::new();
    for (repo, owner) in config.repositories.iter().zip(owners) {
        let (name, path, m) = (repo.name.clone(), repo.path.clone(), agent_metrics.clone());
        let managed = tokio::task::spawn_blocking(move || {
            managed::Managed::open(name.clone(), path.clone(), owner, m)
                .map_err(|source| AgentError::Open { name, path, source })
        })
        .await
        .map_err(|e| AgentError::Join(e.to_string()))??;
        repositories.insert(repo.name.clone(), Arc::new(managed));
    }

    // The gate closes before anything is served: a record an earlier run
    // left says `waiting` from here on.
    let notifier = crate::notify::Notifier::from_env().unwrap_or_else(|e| {
        tracing::warn!(error = %crate::error_chain(&e), "no systemd notifications");
        None
    });
    let readiness = Arc::new(readiness::Readiness::new(
        repositories.values().cloned().collect(),
        &config.readiness,
        notifier,
        agent_metrics.clone(),
    ));
    readiness.start()?;
    {
        let (gate, stop, wait) = (readiness.clone(), stop.clone(), config.readiness.max_wait);
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(wait) => gate.timed_out(),
                _ = stop.cancelled() => {}
            }
        });
    }

    let drift = drift::spawn(
        crate::fswatch::FileWatch::shared(),
        repositories.values().cloned().collect(),
        config.drift == DriftPolicy::Restore,
        config.drift_check,
        stop.clone(),
        audit.clone(),
    )?;

    let metrics_task = metrics_listener.map(|listener| {
        let registry = Arc::new(registry);
        tokio::spawn(crate::metrics::serve(
            listener,
            registry,
            stop.clone().cancelled_owned(),
        ))
    });

    let (health, health_service) = tonic_health::server::health_reporter();
    let quiesce: Vec<Arc<managed::Managed>> = repositories.values().cloned().collect();
    let mut readers = vec![config.rotator_identity.clone()];
    readers.extend(config.monitor_identities.iter().cloned());
    let refusals = agent_metrics.clone();
    let authorization = crate::tls::Authorization::default()
        .allow(
            "/fernetd.v1.Distribution/Install",
            "rotator",
            std::slice::from_ref(&config.rotator_identity),
        )
        .allow(
            "/fernetd.v1.Distribution/MigrateCredentials",
            "rotator",
            std::slice::from_ref(&config.rotator_identity),
        )
        .allow("/fernetd.v1.Distribution/GetState", "reader", &readers)
        .allow("/grpc.health.v1.Health/", "reader", &readers)
        // The repository is not known before the body is read: no label.
        .on_refusal(move |_| refusals.refused("", "permission"));
    let migrator = config
        .credential
        .as_ref()
        .zip(config.keystone_conf.as_deref())
        .map(|(c, conf)| {
            credential::Migrator::new(&c.keystone_manage, conf).with_run_timeout(c.run_timeout)
        });
    // An install must answer within `request_timeout`; a credential migrate
    // within its own bound (its three tool runs), which may be far longer.
    let mut deadlines = crate::tls::Deadlines::new(config.request_timeout);
    if let Some(m) = &migrator {
        deadlines = deadlines.allow(
            "/fernetd.v1.Distribution/MigrateCredentials",
            m.migrate_timeout() + std::time::Duration::from_secs(30),
        );
    }
    let distribution = service::Distribution {
        region: config.region.clone(),
        rotator_identity: config.rotator_identity.clone(),
        readers,
        repositories,
        metrics: agent_metrics,
        audit: audit.clone(),
        migrator,
        migrating: tokio::sync::Mutex::new(()),
        readiness: readiness.clone(),
    };
    health
        .set_serving::<DistributionServer<service::Distribution>>()
        .await;
    let server =
        DistributionServer::new(distribution).max_decoding_message_size(config.max_message_bytes);

    let addr = listener.local_addr().ok();
    tracing::info!(
        region = %config.region,
        listen = ?addr,
        rotator = %config.rotator_identity,
        drift = ?config.drift,
        "agent serving"
    );
    let drain = async {
        shutdown.await;
        readiness.stopping();
        health
            .set_not_serving::<DistributionServer<service::Distribution>>()
            .await;
        // Drift tasks stop now; the gRPC server finishes in-flight installs.
        stop.cancel();
    };
    let limits = crate::tls::Limits {
        request_timeout: deadlines.longest(),
        first_request_timeout: config.first_request_timeout,
        ..crate::tls::Limits::default()
    };
    // The rotator keeps connection slots of its own: strangers of the CA
    // holding every other one cannot cut a region off.
    let incoming = tls.incoming_reserving(
        listener,
        limits,
        std::slice::from_ref(&config.rotator_identity),
    );
    let serve = limits
        .server()
        .layer(deadlines)
        .layer(authorization)
        .add_service(health_service)
        .add_service(server)
        .serve_with_incoming_shutdown(incoming, drain);
    let served = limits.drained(serve, &stop).await;
    // Also when the server failed on its own: nothing else may keep running.
    stop.cancel();
    // Installs run to completion even when their connection was cut: taking
    // each repository's install lock waits for the one in flight.
    for repo in &quiesce {
        repo.quiesce().await;
    }
    // No drift check may outlive `run`: a caller may remove the repository as
    // soon as it returns (tests, the demo's temporary directory).
    drift.stop().await;
    if let Some(task) = metrics_task {
        task.await.map_err(|e| AgentError::Join(e.to_string()))?;
    }
    served.map_err(AgentError::Serve)?;
    tracing::info!("agent stopped");
    Ok(())
}

/// The first install creates the repository itself, but never its parent: a
/// parent that is missing or no directory is a wrong `path` (exit 2), found
/// before anything is opened. Any other failure to look (permissions) is left
/// to opening the repository, which reports it as the environment's (exit 3).
fn check_parent(repo: &crate::config::AgentRepository) -> Result<(), AgentError> {
    let refused = |reason| AgentError::Parent {
        name: repo.name.clone(),
        path: repo.path.clone(),
        reason,
    };
    let Some(parent) = repo.path.parent() else {
        return Err(refused("the file system root cannot be a repository"));
    };
    match std::fs::metadata(parent) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(refused("its parent is not a directory")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(refused("its parent directory does not exist"))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {
            Err(refused("its parent is not a directory"))
        }
        Err(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const MINIMAL: &str = r#"
        region = "region-one"
        listen = "127.0.0.1:7443"
        rotator_identity = "rotator.example.net"
        [tls]
        ca = "/etc/fernetd/ca.pem"
        cert = "/etc/fernetd/agent.pem"
        key = "/etc/fernetd/agent.key"
    "#;

    #[test]
    fn minimal_config_gets_safe_defaults_and_round_trips() {
        let config: AgentConfig = toml::from_str(MINIMAL).expect("parse");
        assert_eq!(config.drift, DriftPolicy::Report);
        assert_eq!(
            config.readiness.max_wait,
            crate::config::DEFAULT_READINESS_MAX_WAIT
        );
        assert_eq!(config.readiness.record, None);
        assert_eq!(
            config.max_message_bytes,
            crate::config::DEFAULT_MAX_MESSAGE_BYTES
        );
        assert_eq!(config.repositories.len(), 1);
        assert_eq!(config.repositories[0].name, "tokens");
        assert_eq!(config.metrics, None);
        let with_metrics = MINIMAL.replace(
            "rotator_identity",
            "metrics_listen = \"127.0.0.1:9443\"\nrotator_identity",
        );
        let parsed: AgentConfig = toml::from_str(&with_metrics).expect("parse metrics_listen");
        assert_eq!(
            parsed.metrics,
            Some("127.0.0.1:9443".parse().expect("addr"))
        );
        config.validate().expect("valid");
        let again: AgentConfig =
            toml::from_str(&toml::to_string(&config).expect("serialize")).expect("reparse");
        assert_eq!(again, config);
    }

    #[test]
    fn drift_check_is_a_duration_with_the_old_key_as_alias() {
        let parse = |line: &str| {
            toml::from_str::<AgentConfig>(
                &MINIMAL.replace("rotator_identity", &format!("{line}\nrotator_identity")),
            )
        };
        let default: AgentConfig = toml::from_str(MINIMAL).expect("parse");
        assert_eq!(default.drift_check, Duration::from_secs(60));
        let text = toml::to_string(&default).expect("serialize");
        assert!(text.contains("drift_check = \"60s\""), "{text}");
        for (line, expected) in [
            ("drift_check = \"30s\"", Duration::from_secs(30)),
            ("drift_check = \"5m\"", Duration::from_secs(300)),
            ("drift_check_seconds = 45", Duration::from_secs(45)),
        ] {
            assert_eq!(parse(line).expect(line).drift_check, expected, "{line}");
        }
        assert!(parse("drift_check = \"soon\"").is_err());
        for line in ["drift_check = \"0s\"", "drift_check = \"500ms\""] {
            let config = parse(line).expect(line);
            assert_eq!(
                config.validate(),
                Err(AgentConfigError::DriftInterval),
                "{line}"
            );
        }
    }

    #[test]
    fn unknown_fields_and_policies_are_refused() {
        assert!(toml::from_str::<AgentConfig>(&format!("surprise = 1\n{MINIMAL}")).is_err());
        let policy = MINIMAL.replace("rotator_identity", "drift = \"ignore\"\nrotator_identity");
        assert!(toml::from_str::<AgentConfig>(&policy).is_err());
    }

    #[test]
    fn validation_names_the_problem() {
        let base: AgentConfig = toml::from_str(MINIMAL).expect("parse");
        let repo = |name: &str, path: &str| crate::config::AgentRepository {
            name: name.into(),
            path: path.into(),
            owner: None,
        };
        let cases = [
            (vec![], AgentConfigError::NoRepository),
            (
                vec![repo("to kens", "/k")],
                AgentConfigError::BadName("to kens".into()),
            ),
            (
                vec![repo("tokens", "/k"), repo("tokens", "/r")],
                AgentConfigError::DuplicateName("tokens".into()),
            ),
            (
                vec![repo("tokens", "keys")],
                AgentConfigError::RelativePath {
                    name: "tokens".into(),
                    path: "keys".into(),
                },
            ),
            (
                vec![repo("tokens", "/k"), repo("receipts", "/k/r")],
                AgentConfigError::Overlap {
                    a: "tokens".into(),
                    b: "receipts".into(),
                    path: "/k/r".into(),
                },
            ),
        ];
        for (repositories, expected) in cases {
            let config = AgentConfig {
                repositories,
                ..base.clone()
            };
            assert_eq!(config.validate(), Err(expected));
        }
        let tiny = AgentConfig {
            max_message_bytes: 10,
            ..base.clone()
        };
        assert_eq!(tiny.validate(), Err(AgentConfigError::MessageSize(10)));

        // [readiness]: a bounded wait, a record outside every repository.
        let readiness = |max_wait: u64, record: Option<&str>| AgentConfig {
            readiness: crate::config::ReadinessConfig {
                max_wait: Duration::from_secs(max_wait),
                record: record.map(Into::into),
            },
            repositories: vec![repo("tokens", "/etc/keystone/fernetd/tokens")],
            ..base.clone()
        };
        assert_eq!(readiness(0, None).validate(), Ok(()));
        assert_eq!(
            readiness(3600, Some("/run/fernetd-agent/ready.json")).validate(),
            Ok(())
        );
        assert_eq!(
            readiness(3601, None).validate(),
            Err(AgentConfigError::ReadinessWait)
        );
        for record in ["ready.json", "/etc/keystone/fernetd/tokens/ready.json"] {
            assert_eq!(
                readiness(60, Some(record)).validate(),
                Err(AgentConfigError::ReadinessRecord(record.into())),
                "{record}"
            );
        }
    }
}
