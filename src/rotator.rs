//! The rotator: owns the canonical repositories and their durable generation
//! state, rotates on a cron schedule, pushes every generation to all agents, and
//! never commits generation G+1 while an enrolled agent has not acknowledged G.
//!
//! [`check`] runs every start-up check once; [`run`] takes the checked
//! configuration, its listeners and a shutdown future, so tests, `fernetd demo`
//! and the `fernetd rotator` command run the same code in-process. The Admin
//! API it serves lives in [`admin`], its metrics in `metrics`.

pub mod admin;
mod core;
mod credential;
mod enrol;
mod fanout;
mod ha;
pub mod ledger;
mod metrics;
mod recovery;
pub mod schedule;
pub mod state;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use self::core::{AgentSlot, Core, Generation, RepoSlot};
use self::ledger::Ledger;
use self::metrics::{AgentCollector, Metrics};
use self::schedule::{Schedule, ScheduleError};
use self::state::{StateError, StateStore};
use crate::config::{RotatorConfig, duration};

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
                | RotatorError::State(StateError::BadName(_) | StateError::Corrupt { .. })
        )
    }
}

/// The least time an Admin call gets before the server's request timeout.
const ADMIN_REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

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
    let (schedule, cache) = validate(&config)?;
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
    })
}

/// The schedule, and the token cache time keystone.conf gives (zero without).
fn validate(config: &RotatorConfig) -> Result<(Schedule, std::time::Duration), RotatorError> {
    let schedule = Schedule::parse(&config.schedule.cron)?;
    credential::validate(config)?;
    if let Some(h) = &config.ha {
        ha::check(h)?;
    }
    if config.repositories.is_empty() {
        return Err(RotatorError::Config("no repositories configured".into()));
    }
    if config.admin_identities.is_empty() {
        return Err(RotatorError::Config(
            "admin_identities is empty: nobody could call the Admin API".into(),
        ));
    }
    let mut names = std::collections::BTreeSet::new();
    for repo in &config.repositories {
        state::check_name(&repo.name)?;
        if !names.insert(&repo.name) {
            return Err(RotatorError::Config(format!(
                "repository `{}` is listed twice",
                repo.name
            )));
        }
    }
    let mut names = std::collections::BTreeSet::new();
    for agent in &config.agents {
        if agent.name().trim().is_empty() || agent.region.trim().is_empty() {
            return Err(RotatorError::Config(
                "an agent's name and region must not be empty".into(),
            ));
        }
        if !names.insert(agent.name()) {
            return Err(RotatorError::Config(if agent.name.is_none() {
                format!(
                    "agent region `{}` is listed twice (several controllers of one region each need their own `name`)",
                    agent.region
                )
            } else {
                format!("agent name `{}` is listed twice", agent.name())
            }));
        }
    }
    if config.fanout.concurrency == 0 {
        return Err(RotatorError::Config(
            "fanout.concurrency must be at least 1".into(),
        ));
    }
    let fanout = &config.fanout;
    for (key, value) in [
        ("fanout.call_timeout", fanout.call_timeout),
        ("fanout.backoff_base", fanout.backoff_base),
        ("fanout.backoff_max", fanout.backoff_max),
        ("fanout.reconcile_interval", fanout.reconcile_interval),
    ] {
        if value.is_zero() {
            return Err(RotatorError::Config(format!("{key} must be more than 0s")));
        }
    }
    if fanout.backoff_max < fanout.backoff_base {
        return Err(RotatorError::Config(
            "fanout.backoff_max must not be shorter than fanout.backoff_base".into(),
        ));
    }
    // The tightest spacing the schedule produces is what ages keys fastest.
    let interval = schedule.rotation_interval(chrono::Utc::now());
    // Credential keys sign no token: Keystone's token formula is not theirs.
    for repo in config.repositories.iter().filter(|r| !r.is_credential()) {
        let minimum = crate::policy::min_active_keys(
            config.policy.token_expiration,
            config.policy.allow_expired_window,
            interval,
        );
        if repo.max_active_keys < minimum {
            return Err(RotatorError::Policy {
                repository: repo.name.clone(),
                configured: repo.max_active_keys,
                minimum,
                expiration: duration::format(&config.policy.token_expiration),
                window: duration::format(&config.policy.allow_expired_window),
                interval: duration::format(&interval),
            });
        }
    }
    let mut cache = std::time::Duration::ZERO;
    if let Some(path) = &config.keystone_conf {
        let repos: Vec<(&str, usize)> = config
            .repositories
            .iter()
            .filter(|r| !r.is_credential())
            .map(|r| (r.name.as_str(), r.max_active_keys))
            .collect();
        let keystone = crate::policy::KeystoneConf::load(path)?;
        let warnings = keystone.check_rotator(
            config.policy.token_expiration,
            config.policy.allow_expired_window,
            &repos,
            interval,
        )?;
        for warning in warnings {
            tracing::warn!(keystone_conf = %path.display(), "{warning}");
        }
        // A cached "valid" outlives the token by the cache time: keys wait for it too.
        cache = keystone.token_cache_ttl.unwrap_or_default();
    }
    Ok((schedule, cache))
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
        if repo.is_credential() {
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
    let imports = prepare_imports(config)?;
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

/// The imports a first start will adopt, by repository position, read before
/// the state is opened so that a bad `import` leaves no state behind. A
/// repository that already has state ignores `import`, so it is not read.
fn prepare_imports(
    config: &RotatorConfig,
) -> Result<Vec<Option<recovery::Imported>>, RotatorError> {
    let mut imports = Vec::with_capacity(config.repositories.len());
    for repo in &config.repositories {
        let import = match &repo.import {
            Some(path) if state::is_fresh(&config.state_dir, &repo.name)? => {
                Some(recovery::import_keys(repo, path)?)
            }
            _ => None,
        };
        imports.push(import);
    }
    Ok(imports)
}

/// Loads each repository's committed generation, adopting an existing Keystone
/// repository (`imports`, from [`prepare_imports`]) or creating a fresh set on
/// first start, and committing it.
fn load_generations(
    config: &RotatorConfig,
    store: &StateStore,
    imports: Vec<Option<recovery::Imported>>,
) -> Result<Vec<RepoSlot>, RotatorError> {
    let mut slots = Vec::with_capacity(config.repositories.len());
    for (repo, import) in config.repositories.iter().zip(imports) {
        let now = core::now_ms();
        let (number, keys, ledger) = match store.load(&repo.name)? {
            Some(committed) => {
                if repo.import.is_some() {
                    tracing::info!(repository = %repo.name, "state exists; `import` is only used on first start");
                }
                tracing::info!(repository = %repo.name, generation = committed.generation, digest = %committed.keys.digest(), "resumed from state");
                let recorded = store.load_ledger(&repo.name)?;
                let known = recorded.is_some();
                let mut ledger = recorded.unwrap_or_default();
                let adopted = ledger.adopt_unknown(&committed.keys, now);
                if !adopted.is_empty() {
                    tracing::warn!(repository = %repo.name, keys = ?adopted, ledger = known, "the key ledger does not know these keys' times: each is taken as demoted now, the safe choice (its purge waits a full token lifetime)");
                    store.save_ledger(&repo.name, &ledger)?;
                }
                (committed.generation, committed.keys, ledger)
            }
            None => {
                let import = match (import, &repo.import) {
                    (Some(imported), _) => Some(imported),
                    // The state vanished since `prepare_imports` looked.
                    (None, Some(path)) => Some(recovery::import_keys(repo, path)?),
                    (None, None) => None,
                };
                let (number, keys, ledger) = match import {
                    Some(imported) => {
                        let ledger = imported.ledger(now);
                        if let Some(path) = &repo.import {
                            tracing::info!(repository = %repo.name, path = %path.display(), indices = ?imported.keys.indices(), generation = imported.generation, "adopting existing Keystone repository at the generation of its stamp (1 without one); its keys' times are unknown, so each is taken as demoted now, the safe choice");
                        }
                        (imported.generation, imported.keys, ledger)
                    }
                    None => {
                        let keys = crate::repository::init(repo.max_active_keys)?;
                        let ledger = Ledger::fresh(&keys, now);
                        (1, keys, ledger)
                    }
                };
                store.save_ledger(&repo.name, &ledger)?;
                store.save(
                    &repo.name,
                    &state::Committed {
                        generation: number,
                        keys: keys.clone(),
                    },
                )?;
                tracing::info!(repository = %repo.name, generation = number, digest = %keys.digest(), "committed the first generation");
                (number, keys, ledger)
            }
        };
        let emergency = EmergencyPurge::load(store, &repo.name)
            .is_some_and(|marked| marked.generation == number);
        let generation =
            Generation::build_with(&repo.name, number, keys, ledger.promoted_unix(), emergency)?;
        slots.push(RepoSlot::new(
            repo.name.clone(),
            repo.max_active_keys,
            generation,
            ledger,
        ));
    }
    Ok(slots)
}

/// The generation of a repository that `admin purge-key` committed, in
/// `state_dir/<repository>.purge.json`: its pushes are marked an emergency
/// purge (agents accept it without the previous primary), after a restart too.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub(crate) struct EmergencyPurge {
    pub(crate) generation: u64,
}

impl EmergencyPurge {
    const KIND: &'static str = "purge";

    fn load(store: &state::StateStore, repository: &str) -> Option<Self> {
        match store.load_record(repository, Self::KIND) {
            Ok(marked) => marked,
            Err(error) => {
                tracing::warn!(repository, error = %crate::error_chain(&error), "cannot read the emergency purge record: the current generation is not marked");
                None
            }
        }
    }

    fn save(&self, store: &state::StateStore, repository: &str) -> Result<(), RotatorError> {
        store
            .save_record(repository, Self::KIND, self)
            .map_err(Into::into)
    }
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
    } = checked;
    let client_tls = crate::tls::ClientTls::load(&config.tls).map_err(RotatorError::Tls)?;
    let server_tls = crate::tls::ServerTls::load(&config.tls).map_err(RotatorError::Tls)?;
    let agents = agent_slots(&config, &client_tls)?;
    // A lost state directory must not silently become generation 1. Under
    // `[ha]` the state is in etcd: the first leader of an empty prefix asks.
    let fresh = match &config.ha {
        None => recovery::fresh_repositories(&config.repositories, &config.state_dir)?,
        Some(_) => Vec::new(),
    };
    if !fresh.is_empty() && !agents.is_empty() {
        let probe = recovery::probe(&agents, &fresh, &config.fanout).await;
        if fresh_start {
            tracing::warn!(held = ?probe.held, "--fresh-start: starting at generation 1 although agents may hold generations; they refuse it until restored");
        } else {
            recovery::refuse_fresh_start(&probe, &config.state_dir)?;
        }
    }
    // Under `[ha]` the file state is only what a first leader imports; it is
    // sealed with `seal_key`, or else `[ha] seal_key`.
    let seal = match (&seal, &config.ha) {
        (None, Some(h)) => Some(Arc::new(crate::seal::SealKey::load(&h.seal_key)?)),
        _ => seal,
    };
    let blocking_config = config.clone();
    let ha_mode = config.ha.is_some();
    let (store, repos) = tokio::task::spawn_blocking(move || {
        // Read before the state is opened: a bad `import` leaves no state behind.
        let imports = if ha_mode {
            Vec::new()
        } else {
            prepare_imports(&blocking_config)?
        };
        let mut store = StateStore::open(&blocking_config.state_dir)?;
        if let Some(seal) = seal {
            store = store.with_seal(seal);
        }
        if ha_mode {
            return Ok::<_, RotatorError>((store, Vec::new()));
        }
        let repos = load_generations(&blocking_config, &store, imports)?;
        Ok::<_, RotatorError>((store, repos))
    })
    .await
    .map_err(|e| RotatorError::Task(e.to_string()))??;

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
    let metrics = Metrics::new(registry);
    let (ha, repos) = match &config.ha {
        Some(h) => {
            let etcd = Arc::new(ha::EtcdState::connect(&config, h, registry).await?);
            let repos = ha::prepare(&etcd, &config, &store, &agents, fresh_start, &stop).await?;
            (Some(etcd), repos)
        }
        None => (None, repos),
    };
    let mut core = Core::new(
        repos,
        agents,
        store.clone(),
        config.fanout.clone(),
        metrics,
        key_lifetime,
    );
    core.ha = ha.clone();
    core.audit = config
        .audit_log
        .as_deref()
        .map(|path| crate::audit::AuditLog::open(path, "rotator"))
        .transpose()?;
    if let Some(log) = core.audit.clone() {
        tokio::spawn(crate::audit::reopen_on_sighup(log, stop.clone()));
    }
    core.credential = credential::Gate::open(&config, &store, registry)?;
    core.resume_credential_hold();
    let core = Arc::new(core);
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
    let acks = match &ha {
        Some(etcd) => etcd.load_acks().await.map_err(RotatorError::from),
        None => store.load_acks().map_err(RotatorError::from),
    };
    let acks = acks.unwrap_or_else(|e| {
        tracing::warn!(
            "ignoring recorded acknowledgements: {}",
            crate::error_chain(&e)
        );
        Default::default()
    });
    core.restore_acks(&acks);

    tracing::info!(
        listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        agents = config.agents.len(),
        repositories = config.repositories.len(),
        schedule = schedule.expr(),
        "rotator started"
    );

    let mut tasks = tokio::task::JoinSet::new();
    if let Some(etcd) = &ha {
        // Under `[ha]` the fan-out, reconcile and schedule run only in a term
        // of leadership.
        tasks.spawn(ha::terms(
            core.clone(),
            etcd.clone(),
            schedule,
            stop.clone(),
        ));
    } else {
        tasks.spawn(core.clone().dispatch(stop.clone()));
        // Read every agent back at start: acknowledgements on disk are only a hint.
        core.reconcile_all(true);
        tasks.spawn(reconcile_loop(core.clone(), stop.clone()));
        tasks.spawn(schedule_loop(core.clone(), schedule, stop.clone()));
        tasks.spawn(core.clone().credential_schedule(stop.clone()));
    }
    if let Some(metrics_listener) = metrics_listener {
        let registry = Arc::new(root);
        tasks.spawn(crate::metrics::serve(
            metrics_listener,
            registry,
            stop.clone().cancelled_owned(),
        ));
    }

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<crate::pb::admin_server::AdminServer<admin::AdminService>>()
        .await;
    let admin =
        admin::AdminService::new(core.clone(), config.admin_identities.clone(), stop.clone())
            .with_ha(ha.clone());
    // Admin calls may wait for acknowledgements (`rotate --wait`, `sync`):
    // the request timeout leaves them that time, beyond the default wait.
    let limits = crate::tls::Limits {
        request_timeout: config.fanout.ack_wait.max(ADMIN_REQUEST_TIMEOUT)
            + std::time::Duration::from_secs(60),
        ..crate::tls::Limits::default()
    };
    let authorization = crate::tls::Authorization::default()
        .allow("/fernetd.v1.Admin/", "admin", &config.admin_identities)
        .allow("/grpc.health.v1.Health/", "admin", &config.admin_identities);
    let serve = limits
        .server()
        .layer(authorization)
        .add_service(health_service)
        .add_service(crate::pb::admin_server::AdminServer::new(admin))
        .serve_with_incoming_shutdown(
            // Admins keep connection slots of their own (tls::Limits).
            server_tls.incoming_reserving(listener, limits, &config.admin_identities),
            stop.clone().cancelled_owned(),
        );
    let served = limits.drained(serve, &stop).await;

    // Drain: stop the background tasks and record the last acknowledgements.
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    core.flush_acks().await;
    if let Some(etcd) = &ha {
        // A standby takes over at once rather than after the lease's TTL.
        etcd.resign().await;
    }
    tracing::info!("rotator stopped");
    served.map_err(RotatorError::Serve)
}

/// Periodic read-back of every agent, and lazy recording of acknowledgements.
async fn reconcile_loop(core: Arc<Core>, stop: CancellationToken) {
    let mut reconcile = tokio::time::interval(core.fanout.reconcile_interval);
    reconcile.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    reconcile.tick().await;
    let mut flush = tokio::time::interval(std::time::Duration::from_secs(1));
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = reconcile.tick() => core.reconcile_all(false),
            _ = flush.tick() => {
                core.flush_acks().await;
                core.flush_ledgers().await;
            }
            _ = stop.cancelled() => return,
        }
    }
}

/// Rotates at each cron occurrence. A scheduled rotation that is blocked (an
/// agent behind) or held (it would purge a key a valid token may need) is owed,
/// and performed once: as soon as every agent caught up, or at the purge-safe
/// time. A cron tick less than one interval after such a late rotation is
/// deferred to one interval after it, so no key lives an interval less than
/// the schedule promises.
async fn schedule_loop(core: Arc<Core>, schedule: Schedule, stop: CancellationToken) {
    let mut progress = core.progress();
    loop {
        let now = chrono::Utc::now();
        let Some((next, delay)) = schedule.delay_from(now) else {
            tracing::warn!(
                schedule = schedule.expr(),
                "the schedule has no further occurrence"
            );
            return;
        };
        let interval = schedule.rotation_interval(now);
        for repo in core
            .repos
            .iter()
            .filter(|r| !credential::is_credential(&r.name))
        {
            repo.next_rotation_ms.store(
                next.timestamp_millis(),
                std::sync::atomic::Ordering::Release,
            );
        }
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            let held = until(core.held_until_ms());
            tokio::select! {
                _ = &mut sleep => {
                    core.scheduled_tick(interval, stop.clone()).await;
                    break;
                }
                _ = held => {
                    tracing::info!("purge-safe time reached: performing the rotation that was held");
                    core.scheduled_rotation(true, stop.clone()).await;
                }
                changed = progress.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    // Demotions are recorded as soon as every agent holds a
                    // generation: the key-lifetime rule counts from then.
                    for (r, _) in core.repos() {
                        core.note_demotions(r);
                    }
                    core.refresh_blocked();
                    if core.owed_now() {
                        tracing::info!("every agent caught up: performing the rotation that was blocked");
                        core.scheduled_rotation(true, stop.clone()).await;
                    }
                }
                _ = stop.cancelled() => return,
            }
        }
    }
}

/// Sleeps until the Unix time `at_ms`; pending forever when there is none.
async fn until(at_ms: Option<i64>) {
    let Some(at_ms) = at_ms else {
        return std::future::pending().await;
    };
    let wait = u64::try_from(at_ms.saturating_sub(core::now_ms())).unwrap_or(0);
    // A little after, so the purge-safe comparison has certainly passed.
    tokio::time::sleep(std::time::Duration::from_millis(wait + 5)).await;
}
