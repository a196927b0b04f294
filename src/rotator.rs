//! The rotator: owns the canonical repositories and their durable generation
//! state, rotates on a cron schedule, pushes every generation to all agents, and
//! never commits generation G+1 while an enrolled agent has not acknowledged G.
//!
//! [`check`] runs every start-up check once; [`run`] takes the checked
//! configuration, its listeners and a shutdown future, so tests, `fernetd demo`
//! and the `fernetd rotator` command run the same code in-process. The Admin
//! API it serves lives in [`admin`], its metrics in `metrics`.

pub mod admin;
mod calls;
mod core;
mod credential;
mod duties;
mod enrol;
mod fanout;
mod fleet;
mod ha;
mod leader;
pub mod ledger;
mod metrics;
mod recovery;
pub mod schedule;
pub mod state;
mod store;
mod types;
mod validate;
mod views;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use self::core::Core;
use self::fleet::AgentSlot;
use self::metrics::Metrics;
use self::schedule::{Schedule, ScheduleError};
use self::state::StateError;
use self::views::AgentCollector;
use crate::config::{RepoKind, RotatorConfig, duration};

/// What stops the rotator from starting or running.
#[derive(Debug, thiserror::Error)]
pub enum RotatorError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    #[error(
        "repository `{repository}`: max_active_keys = {configured} is too small for this schedule and policy; \
         Keystone's formula ceil((token_expiration + allow_expired_window) / rotation_interval) + 2 \
         = ceil(({expiration} + {window}) / {interval}) + 2 requires at least {minimum}"
    )]
    Policy {
        repository: String,
        configured: usize,
        minimum: usize,
        expiration: String,
        window: String,
        interval: String,
    },
    #[error("Keystone's token policy")]
    Keystone(#[from] crate::policy::PolicyError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("cannot import the existing repository {path} for `{repository}`")]
    Import {
        repository: String,
        path: std::path::PathBuf,
        #[source]
        source: crate::repository::RepositoryError,
    },
    #[error(
        "the repository to import for `{repository}` at {path} has no staged key 0 or fewer than two keys"
    )]
    ImportIncomplete {
        repository: String,
        path: std::path::PathBuf,
    },
    #[error("cannot read the stamp of the repository to import for `{repository}`")]
    ImportStamp {
        repository: String,
        #[source]
        source: crate::repository::StampError,
    },
    #[error(
        "the repository to import for `{repository}` at {path} does not hold the keys its stamp records for generation {generation} \
         (changed since an agent installed it): import an agent's repository as it is, or remove its .fernetd-stamp to adopt it as generation 1"
    )]
    ImportStampMismatch {
        repository: String,
        path: std::path::PathBuf,
        generation: u64,
    },
    #[error(
        "no state for repository `{repository}` in {state_dir}, but agents hold it ({held}): a fresh generation 1 \
         would be refused by every agent as a rollback. Recover by importing a region's repository, which continues \
         at the generation in its stamp: copy one region's key repository (its .fernetd-stamp included) to this host \
         and set `import = \"PATH\"` in its [[repositories]]; or, to begin anew on purpose, start once with --fresh-start"
    )]
    FreshStartRefused {
        repository: String,
        state_dir: std::path::PathBuf,
        held: String,
    },
    #[error(transparent)]
    Seal(#[from] crate::seal::SealError),
    #[error(transparent)]
    Ha(#[from] ha::HaError),
    #[error("repository `{0}` lacks a staged or primary key")]
    Incomplete(String),
    #[error("cannot rotate")]
    Rotate(#[from] crate::repository::RotateError),
    #[error("no repository named `{0}`")]
    UnknownRepository(String),
    #[error("repository `{repository}` has no key {index} (its keys: {indices:?})")]
    UnknownKey {
        repository: String,
        index: u32,
        indices: Vec<u32>,
    },
    #[error("no enrolled agent named `{0}`")]
    UnknownAgent(String),
    #[error(
        "agent `{0}` is not quarantined: only a quarantined agent can be evicted (see `fernetd admin agents`)"
    )]
    NotQuarantined(String),
    #[error("TLS set-up failed")]
    Tls(#[source] crate::tls::TlsError),
    #[error("agent `{region}`: bad endpoint `{endpoint}`: {reason}")]
    Endpoint {
        region: String,
        endpoint: String,
        reason: String,
    },
    #[error("cannot serve the Admin API")]
    Serve(#[source] tonic::transport::Error),
    #[error("internal task failed: {0}")]
    Task(String),
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
}

impl RotatorError {
    /// Whether this is the operator's configuration to fix (exit 2).
    pub fn is_config(&self) -> bool {
        if let RotatorError::Tls(e) = self {
            return e.is_config();
        }
        if let RotatorError::Seal(e) = self {
            return e.is_config();
        }
        matches!(
            self,
            RotatorError::Config(_)
                | RotatorError::Schedule(_)
                | RotatorError::Policy { .. }
                | RotatorError::Keystone(_)
                | RotatorError::Import { .. }
                | RotatorError::ImportIncomplete { .. }
                | RotatorError::ImportStamp { .. }
                | RotatorError::ImportStampMismatch { .. }
                | RotatorError::FreshStartRefused { .. }
                | RotatorError::Endpoint { .. }
                | RotatorError::State(
                    StateError::BadName(_)
                        | StateError::Corrupt { .. }
                        | StateError::ClearWhileSealed { .. }
                        | StateError::StaleLedger { .. }
                        | StateError::Behind { .. }
                )
                | RotatorError::Ha(ha::HaError::Rollback { .. } | ha::HaError::StaleLedger { .. })
        )
    }
}

/// A configuration that passed every start-up check that needs neither the
/// network nor the state; only [`check`] makes one, so [`run`] never checks twice.
#[derive(Debug, Clone)]
pub struct Checked {
    config: RotatorConfig,
    schedule: Schedule,
    key_lifetime: std::time::Duration,
    source: Option<std::path::PathBuf>,
    /// `seal_key`, read once by [`check`].
    seal: Option<Arc<crate::seal::SealKey>>,
    /// Start at generation 1 even where agents hold generations (`--fresh-start`).
    fresh_start: bool,
    /// Seal clear state found with a seal key (`--adopt-clear-state`).
    adopt_clear_state: bool,
}

impl Checked {
    pub fn config(&self) -> &RotatorConfig {
        &self.config
    }

    /// The file the configuration was read from: [`run`] re-reads it on
    /// SIGHUP and applies its `[[agents]]` without a restart. Without one
    /// (the demo, tests in-process) there is no reload.
    pub fn reloaded_from(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.source = Some(path.into());
        self
    }

    /// Allows a first start without state while agents hold generations
    /// (`--fresh-start`): they will refuse it until restored.
    pub fn fresh_start(mut self, allow: bool) -> Self {
        self.fresh_start = allow;
        self
    }

    /// Adopts (and seals at once) a clear state found while `seal_key` is
    /// configured (`--adopt-clear-state`), which is otherwise refused: the
    /// one way to move a clear state to sealing, or into `[ha]`.
    pub fn adopt_clear_state(mut self, adopt: bool) -> Self {
        self.adopt_clear_state = adopt;
        self
    }

    /// How long after its last token a key must stay everywhere: token
    /// expiration + `allow_expired_window` + keystone.conf's token cache time.
    pub fn key_lifetime(&self) -> std::time::Duration {
        self.key_lifetime
    }
}

/// Checks what can be checked without touching the network or the state:
/// names, the cron expression, Keystone's `max_active_keys` formula and, when
/// configured, keystone.conf's agreement (its warnings are logged here, once).
pub fn check(config: RotatorConfig) -> Result<Checked, RotatorError> {
    let (schedule, cache) = validate::validate(&config)?;
    let key_lifetime = config.policy.token_expiration + config.policy.allow_expired_window + cache;
    let seal = config
        .seal_key
        .as_deref()
        .map(crate::seal::SealKey::load)
        .transpose()?
        .map(Arc::new);
    Ok(Checked {
        config,
        schedule,
        key_lifetime,
        source: None,
        seal,
        fresh_start: false,
        adopt_clear_state: false,
    })
}

/// Every check the rotator runs before it opens its state, in the same order,
/// each one described through `note` once it passed: the configuration's values
/// and Keystone's formula ([`check`]), the TLS files, every agent's endpoint and
/// identity, and what a first start would import. Writes nothing; the first
/// failure is returned as the daemon would refuse it.
pub fn preflight(
    config: RotatorConfig,
    mut note: impl FnMut(String),
) -> Result<Checked, RotatorError> {
    let checked = check(config)?;
    let config = checked.config();
    note(format!(
        "schedule `{}` (UTC), next at {}",
        config.schedule.cron,
        checked
            .schedule
            .delay_from(chrono::Utc::now())
            .map(|(next, _)| next.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            .unwrap_or_else(|| "never".into())
    ));
    let interval = checked.schedule.rotation_interval(chrono::Utc::now());
    for repo in &config.repositories {
        if repo.kind() == RepoKind::Credential {
            note(format!(
                "repository `{}`: 3 keys, rotated only as a credential migrate ({})",
                repo.name,
                repo.schedule.as_deref().map_or_else(
                    || "on `admin rotate --repository credential`".to_owned(),
                    |c| format!("schedule `{c}` (UTC)")
                )
            ));
            continue;
        }
        note(format!(
            "repository `{}`: max_active_keys {} (Keystone's formula needs at least {} for tokens of {}, a window of {} and rotations every {})",
            repo.name,
            repo.max_active_keys,
            crate::policy::min_active_keys(
                config.policy.token_expiration,
                config.policy.allow_expired_window,
                interval
            ),
            duration::format(&config.policy.token_expiration),
            duration::format(&config.policy.allow_expired_window),
            duration::format(&interval),
        ));
    }
    note(format!(
        "key lifetime {} (token expiration + allow_expired_window + token cache time)",
        duration::format(&checked.key_lifetime)
    ));
    if let Some(path) = &config.keystone_conf {
        note(format!(
            "{} agrees with [policy] and the repositories",
            path.display()
        ));
    }
    note(format!(
        "admin identities: {}",
        config.admin_identities.join(", ")
    ));
    let client_tls = crate::tls::ClientTls::load(&config.tls).map_err(RotatorError::Tls)?;
    crate::tls::ServerTls::load(&config.tls).map_err(RotatorError::Tls)?;
    note(format!(
        "TLS: certificate {}, key {}, CA {} load",
        config.tls.cert.display(),
        config.tls.key.display(),
        config.tls.ca.display()
    ));
    agent_slots(config, &client_tls)?;
    for a in &config.agents {
        note(format!(
            "agent `{}` of region `{}`: {} as {}",
            a.name(),
            a.region,
            a.endpoint,
            a.identity
        ));
    }
    let imports = store::prepare_imports(config)?;
    for (repo, import) in config.repositories.iter().zip(imports) {
        if let (Some(imported), Some(path)) = (import, &repo.import) {
            note(format!(
                "repository `{}`: a first start adopts {} (keys {:?}) as generation {}",
                repo.name,
                path.display(),
                imported.keys.indices(),
                imported.generation
            ));
        }
    }
    if let Some(path) = &config.seal_key {
        note(format!(
            "seal key {} loads: state files are sealed",
            path.display()
        ));
    }
    if let Some(h) = &config.ha {
        crate::seal::SealKey::load(&h.seal_key)?;
        note(format!(
            "[ha]: etcd {}, prefix {}, lease {}; seal key {} loads (etcd is reached at start)",
            h.endpoints.join(", "),
            h.prefix,
            duration::format(&h.lease_ttl),
            h.seal_key.display()
        ));
    }
    note(match std::fs::metadata(&config.state_dir) {
        Ok(meta) if meta.is_dir() => {
            format!("state directory {} exists", config.state_dir.display())
        }
        Ok(_) => format!(
            "state directory {} is not a directory: the rotator cannot start (exit 3)",
            config.state_dir.display()
        ),
        Err(_) => format!(
            "state directory {} is created (mode 0700) on the first start",
            config.state_dir.display()
        ),
    });
    Ok(checked)
}

/// One lazy mTLS channel per agent: a bad endpoint or identity is refused
/// here, before any state exists, and nothing connects yet.
fn agent_slots(
    config: &RotatorConfig,
    client_tls: &crate::tls::ClientTls,
) -> Result<Vec<AgentSlot>, RotatorError> {
    config
        .agents
        .iter()
        .map(|a| agent_slot(a, client_tls, config.repositories.len()))
        .collect()
}

fn agent_slot(
    a: &crate::config::AgentEndpoint,
    client_tls: &crate::tls::ClientTls,
    repositories: usize,
) -> Result<AgentSlot, RotatorError> {
    let endpoint_error = |e: crate::tls::TlsError| RotatorError::Endpoint {
        region: a.name().to_owned(),
        endpoint: a.endpoint.clone(),
        reason: crate::error_chain(&e),
    };
    // The dispatcher has at most one call in flight per agent, so a bare
    // HTTP/2 connection (no request buffer, no task of its own) keeps 10,000
    // idle agents cheap.
    let channel = client_tls
        .connection(&a.endpoint, &a.identity)
        .map_err(endpoint_error)?;
    Ok(AgentSlot::new(a, channel, repositories))
}

/// The core over `store` and the repositories it loaded: audit log, the
/// credential gate with its last migrate, and the acknowledgements the store
/// remembers (a hint until each agent is read back).
async fn open_core(
    config: &RotatorConfig,
    (store, repos): (store::Store, Vec<types::RepoSlot>),
    agents: Vec<AgentSlot>,
    metrics: Metrics,
    key_lifetime: std::time::Duration,
    registry: &mut prometheus_client::registry::Registry,
    stop: &CancellationToken,
) -> Result<Arc<Core>, RotatorError> {
    let mut core = Core::new(
        repos,
        agents,
        store.clone(),
        config.fanout.clone(),
        metrics,
        key_lifetime,
    );
    core.audit = config
        .audit_log
        .as_deref()
        .map(|path| crate::audit::AuditLog::open(path, "rotator"))
        .transpose()?;
    if let Some(log) = core.audit.clone() {
        tokio::spawn(crate::audit::reopen_on_sighup(log, stop.clone()));
    }
    core.credential = credential::Gate::open(config, &store, registry).await?;
    core.resume_credential_hold();
    let acks = store.load_acks().await.unwrap_or_else(|e| {
        tracing::warn!(
            "ignoring recorded acknowledgements: {}",
            crate::error_chain(&e)
        );
        Default::default()
    });
    core.restore_acks(&acks);
    // Who is quarantined and what is pinned must be known before the first
    // rotation: a pin forgotten at restart would let its key be purged.
    core.load_quarantine().await?;
    Ok(Arc::new(core))
}

/// Runs the rotator until `shutdown` resolves: the Admin API on `listener`,
/// metrics on `metrics_listener`, the scheduler, the fan-out and the reconcile.
pub async fn run(
    checked: Checked,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RotatorError> {
    // Every configuration check came before the state is opened (`check`): a
    // refused configuration creates no directory, lock or generation.
    let Checked {
        config,
        schedule,
        key_lifetime,
        source,
        seal,
        fresh_start,
        adopt_clear_state,
    } = checked;
    let client_tls = crate::tls::ClientTls::load(&config.tls).map_err(RotatorError::Tls)?;
    let server_tls = crate::tls::ServerTls::load(&config.tls).map_err(RotatorError::Tls)?;
    let agents = agent_slots(&config, &client_tls)?;

    let stop = CancellationToken::new();
    let trigger = stop.clone();
    tokio::spawn(async move {
        shutdown.await;
        trigger.cancel();
    });

    // Unprefixed root: the certificate expiry has the same name in every daemon.
    let mut root = prometheus_client::registry::Registry::default();
    crate::certs::register_expiry(&mut root, &config.tls.cert);
    let registry = root.sub_registry_with_prefix("fernetd_rotator");
    // The one place the state's home is chosen: files, or etcd under `[ha]`.
    let metrics = Metrics::new(registry);
    let options = store::StartOptions {
        fresh_start,
        adopt_clear_state,
    };
    let (store, repos) = store::open(&config, seal, &agents, options, registry, &stop).await?;
    let core = open_core(
        &config,
        (store.clone(), repos),
        agents,
        metrics,
        key_lifetime,
        registry,
        &stop,
    )
    .await?;
    if let Some(source) = source {
        let repositories = config.repositories.len();
        let connect =
            move |a: &crate::config::AgentEndpoint| agent_slot(a, &client_tls, repositories);
        tokio::spawn(enrol::reload_on_sighup(
            core.clone(),
            source,
            config.clone(),
            connect,
            stop.clone(),
        ));
    }
    registry.register_collector(Box::new(AgentCollector {
        core: Arc::downgrade(&core),
    }));

    tracing::info!(
        listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        agents = config.agents.len(),
        repositories = config.repositories.len(),
        schedule = schedule.expr(),
        "rotator started"
    );

    let mut tasks = tokio::task::JoinSet::new();
    let leadership = store.leadership();
    match &leadership {
        // Under `[ha]` the leader's duties run only in a term of leadership.
        Some(etcd) => {
            tasks.spawn(leader::terms(
                core.clone(),
                etcd.clone(),
                schedule,
                stop.clone(),
            ));
        }
        None => duties::spawn(&core, schedule, &stop, &mut tasks),
    }
    if let Some(metrics_listener) = metrics_listener {
        let registry = Arc::new(root);
        tasks.spawn(crate::metrics::serve(
            metrics_listener,
            registry,
            stop.clone().cancelled_owned(),
        ));
    }

    let served = admin::serve(
        core.clone(),
        &config,
        leadership.clone(),
        &server_tls,
        listener,
        &stop,
    )
    .await;

    // Drain: stop the background tasks and record the last acknowledgements.
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    core.flush_acks().await;
    if let Some(etcd) = &leadership {
        // A standby takes over at once rather than after the lease's TTL.
        etcd.resign().await;
    }
    tracing::info!("rotator stopped");
    served.map_err(RotatorError::Serve)
}
