//! The demo fleet: a throwaway CA, a rotator and N agents on loopback, rotating
//! on a short schedule ([`prepare`] writes the files, [`Fleet::start`] runs them
//! in this process). Everything it runs is the real code path: the same
//! `rotator::run` and `agent::run` as the daemons, with mTLS on every connection.
//! The command line (`fernetd demo`) narrates it through the Admin API.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{
    AdminConfig, AgentConfig, AgentEndpoint, AgentRepository, FanoutConfig, PolicyConfig,
    RepositoryConfig, RotatorConfig, ScheduleConfig, TlsConfig,
};
use crate::tls::Authority;

/// The identities the demo's certificates carry.
const ROTATOR_IDENTITY: &str = "rotator.fernetd.demo";
const ADMIN_IDENTITY: &str = "admin.fernetd.demo";
/// Every 5 seconds: the demo is meant to be watched.
const DEMO_CRON: &str = "*/5 * * * * *";
pub const DEMO_MAX_ACTIVE_KEYS: usize = 4;

/// What stops the demo.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot write {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot make the demo certificates")]
    Certificate(#[from] Box<rcgen::Error>),
    #[error("cannot write the demo configuration")]
    Toml(#[from] Box<toml::ser::Error>),
    #[error("cannot reserve a loopback port")]
    Port(#[source] std::io::Error),
    #[error("the rotator failed")]
    Rotator(#[source] Box<crate::rotator::RotatorError>),
    #[error("agent {region} failed")]
    Agent {
        region: String,
        #[source]
        source: Box<crate::agent::AgentError>,
    },
    #[error("the rotator's configuration")]
    Config(#[source] Box<crate::rotator::RotatorError>),
    #[error("{0}")]
    Regions(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DemoError + '_ {
    move |source| DemoError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `ca.pem` into `dir`, and `NAME.pem` / `NAME.key` (0600) for
/// `identity`; returns the three paths as a [`TlsConfig`].
fn write_identity(
    ca: &Authority,
    dir: &Path,
    name: &str,
    identity: &str,
) -> Result<TlsConfig, DemoError> {
    let issued = ca.issue(&[identity]).map_err(Box::new)?;
    let tls = TlsConfig {
        ca: dir.join("ca.pem"),
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}.key")),
    };
    write_file(&tls.ca, ca.cert_pem().as_bytes(), 0o644)?;
    write_file(&tls.cert, issued.cert_pem.as_bytes(), 0o644)?;
    write_file(&tls.key, issued.key_pem.as_bytes(), 0o600)?;
    Ok(tls)
}

fn write_file(path: &Path, content: &[u8], mode: u32) -> Result<(), DemoError> {
    use std::io::Write as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(io(path))?;
    f.write_all(content).map_err(io(path))
}

fn mkdir(path: &Path) -> Result<(), DemoError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(io(path))
}

/// Region names in Keystone's style: RegionOne, RegionTwo, ...
pub fn region_name(i: usize) -> String {
    const WORDS: [&str; 10] = [
        "One", "Two", "Three", "Four", "Five", "Six", "Seven", "Eight", "Nine", "Ten",
    ];
    match WORDS.get(i) {
        Some(w) => format!("Region{w}"),
        None => format!("Region{}", i + 1),
    }
}

/// One loopback listener, held so the port stays ours until used.
fn reserve() -> Result<std::net::TcpListener, DemoError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(DemoError::Port)?;
    l.set_nonblocking(true).map_err(DemoError::Port)?;
    Ok(l)
}

fn addr(l: &std::net::TcpListener) -> Result<SocketAddr, DemoError> {
    l.local_addr().map_err(DemoError::Port)
}

/// Everything the demo writes, with the listeners it reserved.
pub struct Layout {
    pub dir: PathBuf,
    pub rotator: RotatorConfig,
    pub admin: AdminConfig,
    pub agents: Vec<AgentConfig>,
    /// Each agent's name, in the order of `agents` (its region when alone).
    pub names: Vec<String>,
    listeners: Vec<(std::net::TcpListener, std::net::TcpListener)>,
    rotator_listeners: (std::net::TcpListener, std::net::TcpListener),
}

/// Writes DIR/ca/, DIR/rotator.toml, DIR/admin.toml, DIR/agents/<name>.toml
/// and DIR/regions/<region>/[ctlN/]fernet-keys (empty), all on loopback ports
/// free now.
pub fn prepare(dir: &Path, regions: usize) -> Result<Layout, DemoError> {
    prepare_with(dir, regions, 1)
}

/// [`prepare`] with `controllers` agents per region, each with its own name
/// (`ctl1.regionone`), identity, repository and ports, as a region behind a VIP
/// runs one Keystone and one agent per controller.
pub fn prepare_with(dir: &Path, regions: usize, controllers: usize) -> Result<Layout, DemoError> {
    let dir = std::path::absolute(dir).map_err(io(dir))?;
    let ca_dir = dir.join("ca");
    for d in [&dir, &ca_dir, &dir.join("agents"), &dir.join("regions")] {
        mkdir(d)?;
    }
    let ca = Authority::new("fernetd demo CA").map_err(Box::new)?;
    let rotator_tls = write_identity(&ca, &ca_dir, "rotator", ROTATOR_IDENTITY)?;
    let admin_tls = write_identity(&ca, &ca_dir, "admin", ADMIN_IDENTITY)?;

    let rotator_listeners = (reserve()?, reserve()?);
    let count = regions * controllers;
    let mut listeners = Vec::with_capacity(count);
    let mut agents = Vec::with_capacity(count);
    let mut names = Vec::with_capacity(count);
    let mut endpoints = Vec::with_capacity(count);
    for (i, c) in (0..regions).flat_map(|i| (1..=controllers).map(move |c| (i, c))) {
        let region = region_name(i);
        // One agent per region is named after it; controllers after themselves.
        let name = if controllers == 1 {
            region.clone()
        } else {
            format!("ctl{c}.{}", region.to_lowercase())
        };
        let identity = format!("{}.agents.fernetd.demo", name.to_lowercase());
        let tls = write_identity(&ca, &ca_dir, &name.to_lowercase(), &identity)?;
        let (grpc, metrics) = (reserve()?, reserve()?);
        let repo = if controllers == 1 {
            dir.join("regions").join(&region).join("fernet-keys")
        } else {
            dir.join("regions")
                .join(&region)
                .join(format!("ctl{c}"))
                .join("fernet-keys")
        };
        mkdir(&repo)?;
        let agent = AgentConfig {
            region: region.clone(),
            listen: addr(&grpc)?,
            metrics: Some(addr(&metrics)?),
            rotator_identity: ROTATOR_IDENTITY.into(),
            monitor_identities: Vec::new(),
            drift: Default::default(),
            drift_check: Duration::from_secs(60),
            max_message_bytes: crate::config::DEFAULT_MAX_MESSAGE_BYTES,
            request_timeout: crate::config::DEFAULT_REQUEST_TIMEOUT,
            first_request_timeout: crate::config::DEFAULT_FIRST_REQUEST_TIMEOUT,
            log_format: None,
            tls,
            repositories: vec![AgentRepository {
                name: "tokens".into(),
                path: repo,
                owner: None,
            }],
            keystone_conf: None,
            audit_log: None,
            credential: None,
            readiness: Default::default(),
        };
        let path = dir.join("agents").join(format!("{name}.toml"));
        write_file(
            &path,
            toml::to_string_pretty(&agent).map_err(Box::new)?.as_bytes(),
            0o644,
        )?;
        endpoints.push(AgentEndpoint {
            name: (controllers > 1).then(|| name.clone()),
            region,
            endpoint: format!("https://{}", agent.listen),
            identity,
        });
        agents.push(agent);
        names.push(name);
        listeners.push((grpc, metrics));
    }

    let rotator = RotatorConfig {
        listen: addr(&rotator_listeners.0)?,
        metrics_listen: Some(addr(&rotator_listeners.1)?),
        tls: rotator_tls,
        admin_identities: vec![ADMIN_IDENTITY.into()],
        state_dir: dir.join("rotator-state"),
        repositories: vec![RepositoryConfig {
            name: "tokens".into(),
            max_active_keys: DEMO_MAX_ACTIVE_KEYS,
            import: None,
            schedule: None,
        }],
        schedule: ScheduleConfig {
            cron: DEMO_CRON.into(),
        },
        // Short-lived tokens make a 5-second schedule safe: ceil(10/5) + 2 = 4 keys.
        policy: PolicyConfig {
            token_expiration: Duration::from_secs(10),
            allow_expired_window: Duration::ZERO,
        },
        agents: endpoints,
        fanout: FanoutConfig {
            call_timeout: Duration::from_secs(3),
            backoff_base: Duration::from_millis(200),
            backoff_max: Duration::from_secs(3),
            reconcile_interval: Duration::from_secs(5),
            ack_wait: Duration::from_secs(10),
            ..FanoutConfig::default()
        },
        keystone_conf: None,
        audit_log: None,
        seal_key: None,
        ha: None,
        credential: None,
    };
    let path = dir.join("rotator.toml");
    write_file(
        &path,
        toml::to_string_pretty(&rotator)
            .map_err(Box::new)?
            .as_bytes(),
        0o644,
    )?;
    let admin = AdminConfig {
        rotator: format!("https://{}", rotator.listen).into(),
        rotator_identity: ROTATOR_IDENTITY.into(),
        tls: admin_tls,
    };
    let path = dir.join("admin.toml");
    write_file(
        &path,
        toml::to_string_pretty(&admin).map_err(Box::new)?.as_bytes(),
        0o644,
    )?;
    Ok(Layout {
        dir,
        rotator,
        admin,
        agents,
        names,
        listeners,
        rotator_listeners,
    })
}

impl Layout {
    /// The shell commands that start each process of this layout.
    pub fn commands(&self) -> String {
        let exe = std::env::current_exe()
            .ok()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "fernetd".into());
        let d = self.dir.display();
        let mut s = String::new();
        let _ = writeln!(s, "# one shell per region:");
        for name in &self.names {
            let _ = writeln!(s, "{exe} agent --config {d}/agents/{name}.toml");
        }
        let _ = writeln!(s, "# the rotator:");
        let _ = writeln!(s, "{exe} rotator --config {d}/rotator.toml");
        let _ = writeln!(s, "# then, from anywhere:");
        let _ = writeln!(s, "{exe} admin --config {d}/admin.toml status");
        let _ = writeln!(s, "{exe} admin --config {d}/admin.toml rotate");
        s
    }
}

/// The rotator and agents of a [`Layout`], running as tasks of this process.
pub struct Fleet {
    stop: CancellationToken,
    tasks: tokio::task::JoinSet<Result<(), DemoError>>,
}

impl Fleet {
    /// Starts every agent and the rotator on the listeners the layout reserved.
    pub fn start(layout: Layout) -> Result<(Fleet, Running), DemoError> {
        let stop = CancellationToken::new();
        let mut tasks = tokio::task::JoinSet::new();
        let (agents, listeners) = (layout.agents, layout.listeners);
        let tokio_listener =
            |l: std::net::TcpListener| TcpListener::from_std(l).map_err(DemoError::Port);
        for (agent, (grpc, metrics)) in agents.iter().cloned().zip(listeners) {
            let (grpc, metrics) = (tokio_listener(grpc)?, tokio_listener(metrics)?);
            let region = agent.region.clone();
            let shutdown = stop.clone().cancelled_owned();
            let failed = move |source| DemoError::Agent {
                region,
                source: Box::new(source),
            };
            let checked = match crate::agent::check(agent) {
                Ok(checked) => checked,
                Err(e) => return Err(failed(e)),
            };
            tasks.spawn(async move {
                crate::agent::run(checked, grpc, Some(metrics), shutdown)
                    .await
                    .map_err(failed)
            });
        }
        let (grpc, metrics) = (
            tokio_listener(layout.rotator_listeners.0)?,
            tokio_listener(layout.rotator_listeners.1)?,
        );
        let checked = crate::rotator::check(layout.rotator.clone())
            .map_err(|e| DemoError::Config(Box::new(e)))?;
        let shutdown = stop.clone().cancelled_owned();
        tasks.spawn(async move {
            crate::rotator::run(checked, grpc, Some(metrics), shutdown)
                .await
                .map_err(|e| DemoError::Rotator(Box::new(e)))
        });
        let running = Running {
            dir: layout.dir,
            rotator: layout.rotator,
            admin: layout.admin,
            agents,
            names: layout.names,
        };
        Ok((Fleet { stop, tasks }, running))
    }

    /// Resolves with the error of the first task that fails; pending while all run.
    pub async fn failed(&mut self) -> DemoError {
        loop {
            match self.tasks.join_next().await {
                Some(Ok(Err(e))) => return e,
                Some(_) => continue,
                None => std::future::pending::<()>().await,
            }
        }
    }

    /// Stops every task and waits for them; errors while stopping are logged.
    pub async fn stop(mut self) {
        self.stop.cancel();
        while let Some(joined) = self.tasks.join_next().await {
            if let Ok(Err(e)) = joined {
                tracing::warn!("while stopping: {}", crate::error_chain(&e));
            }
        }
    }
}

/// What a started [`Fleet`] runs with.
pub struct Running {
    pub dir: PathBuf,
    pub rotator: RotatorConfig,
    pub admin: AdminConfig,
    pub agents: Vec<AgentConfig>,
    pub names: Vec<String>,
}

/// Whether each region's repository on disk accepts one token.
pub struct Verdict {
    pub generation: u64,
    /// The regions whose repository decrypts the token.
    pub accepted_by: Vec<String>,
}

/// Issues tokens with the first region's primary key, as its Keystone would, and
/// checks them with every region's repository as read from disk.
#[derive(Default)]
pub struct CrossRegion {
    tokens: Vec<(u64, String)>,
}

impl CrossRegion {
    /// Issues one token for `generation` in the first region, then checks it and
    /// every earlier one against each region. Returns the first region's name and
    /// a verdict per token.
    pub fn check(
        &mut self,
        agents: &[AgentConfig],
        names: &[String],
        generation: u64,
    ) -> Result<(String, Vec<Verdict>), DemoError> {
        let mut keyrings = Vec::with_capacity(agents.len());
        for (a, name) in agents.iter().zip(names) {
            let Some(repo) = a.repositories.first() else {
                continue;
            };
            let set = crate::repository::load(&repo.path)
                .map_err(|e| DemoError::Regions(crate::error_chain(&e)))?;
            keyrings.push((name.as_str(), crate::token::Keyring::new(&set), set));
        }
        let Some((first, _, first_set)) = keyrings.first() else {
            return Ok((String::new(), Vec::new()));
        };
        let Some(primary) = first_set.primary() else {
            return Err(DemoError::Regions(format!("{first} has no primary key")));
        };
        self.tokens
            .push((generation, crate::token::canary(primary)));
        let verdicts = self
            .tokens
            .iter()
            .map(|(g, token)| Verdict {
                generation: *g,
                accepted_by: keyrings
                    .iter()
                    .filter(|(_, ring, _)| ring.decrypt(token).is_ok())
                    .map(|(r, _, _)| (*r).to_owned())
                    .collect(),
            })
            .collect();
        Ok(((*first).to_owned(), verdicts))
    }
}
