//! `fernetd demo`: a throwaway CA, a rotator and N agents on loopback, rotating on
//! a short schedule; or, with `--config-only`, the same files written to disk with
//! the commands that start each process. Everything it runs is the real code path:
//! the same `rotator::run` and `agent::run` as the daemons, mTLS on every
//! connection, and the admin client to watch it.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::cli::{Answer, CliError, DemoArgs};
use crate::config::{
    AdminConfig, AgentConfig, AgentEndpoint, AgentRepository, FanoutConfig, PolicyConfig,
    RepositoryConfig, RotatorConfig, ScheduleConfig, TlsConfig,
};
use crate::pb;
use crate::tls::Authority;

/// The identities the demo's certificates carry.
const ROTATOR_IDENTITY: &str = "rotator.fernetd.demo";
const ADMIN_IDENTITY: &str = "admin.fernetd.demo";
/// Every 5 seconds: the demo is meant to be watched.
const DEMO_CRON: &str = "*/5 * * * * *";
const DEMO_MAX_ACTIVE_KEYS: usize = 4;

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
    #[error("cannot reach the rotator")]
    Admin(#[from] crate::admin::AdminError),
    #[error("the rotator did not answer: {0}")]
    Call(String),
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
    listeners: Vec<(std::net::TcpListener, std::net::TcpListener)>,
    rotator_listeners: (std::net::TcpListener, std::net::TcpListener),
}

/// Writes DIR/ca/, DIR/rotator.toml, DIR/admin.toml, DIR/agents/<region>.toml
/// and DIR/regions/<region>/fernet-keys (empty), all on loopback ports free now.
pub fn prepare(dir: &Path, regions: usize) -> Result<Layout, DemoError> {
    let dir = std::path::absolute(dir).map_err(io(dir))?;
    let ca_dir = dir.join("ca");
    for d in [&dir, &ca_dir, &dir.join("agents"), &dir.join("regions")] {
        mkdir(d)?;
    }
    let ca = Authority::new("fernetd demo CA").map_err(Box::new)?;
    let rotator_tls = write_identity(&ca, &ca_dir, "rotator", ROTATOR_IDENTITY)?;
    let admin_tls = write_identity(&ca, &ca_dir, "admin", ADMIN_IDENTITY)?;

    let rotator_listeners = (reserve()?, reserve()?);
    let mut listeners = Vec::with_capacity(regions);
    let mut agents = Vec::with_capacity(regions);
    let mut endpoints = Vec::with_capacity(regions);
    for i in 0..regions {
        let region = region_name(i);
        let identity = format!("{}.agents.fernetd.demo", region.to_lowercase());
        let tls = write_identity(&ca, &ca_dir, &region.to_lowercase(), &identity)?;
        let (grpc, metrics) = (reserve()?, reserve()?);
        let repo = dir.join("regions").join(&region).join("fernet-keys");
        mkdir(&repo)?;
        let agent = AgentConfig {
            region: region.clone(),
            listen: addr(&grpc)?,
            metrics: Some(addr(&metrics)?),
            rotator_identity: ROTATOR_IDENTITY.into(),
            drift: Default::default(),
            drift_check: Duration::from_secs(60),
            max_message_bytes: crate::config::DEFAULT_MAX_MESSAGE_BYTES,
            log_format: None,
            tls,
            repositories: vec![AgentRepository {
                name: "tokens".into(),
                path: repo,
                owner: None,
            }],
            keystone_conf: None,
        };
        let path = dir.join("agents").join(format!("{region}.toml"));
        write_file(
            &path,
            toml::to_string_pretty(&agent).map_err(Box::new)?.as_bytes(),
            0o644,
        )?;
        endpoints.push(AgentEndpoint {
            region,
            endpoint: format!("https://{}", agent.listen),
            identity,
        });
        agents.push(agent);
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
        rotator: format!("https://{}", rotator.listen),
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
        for a in &self.agents {
            let _ = writeln!(s, "{exe} agent --config {d}/agents/{}.toml", a.region);
        }
        let _ = writeln!(s, "# the rotator:");
        let _ = writeln!(s, "{exe} rotator --config {d}/rotator.toml");
        let _ = writeln!(s, "# then, from anywhere:");
        let _ = writeln!(s, "{exe} admin --config {d}/admin.toml status");
        let _ = writeln!(s, "{exe} admin --config {d}/admin.toml rotate");
        s
    }
}

/// `fernetd demo ...`.
pub async fn main(args: &DemoArgs) -> Result<Answer, CliError> {
    if args.regions == 0 || args.regions > 100 {
        return Err(CliError::usage(anyhow::anyhow!(
            "--regions must be between 1 and 100"
        )));
    }
    let (dir, temporary) = match &args.dir {
        Some(d) => (d.clone(), false),
        None if args.config_only => {
            return Err(CliError::usage(anyhow::anyhow!(
                "--config-only needs --dir DIR"
            )));
        }
        None => (
            std::env::temp_dir().join(format!("fernetd-demo-{}", std::process::id())),
            true,
        ),
    };
    let layout = prepare(&dir, args.regions).map_err(CliError::runtime)?;
    if args.config_only {
        println!(
            "Wrote the demo CA, certificates and configuration to {}.",
            layout.dir.display()
        );
        println!("Start each process (the ports were free a moment ago):\n");
        print!("{}", layout.commands());
        return Ok(Answer::Yes);
    }
    let result = run(layout, args.rotations).await;
    if temporary {
        // Safe at once: `agent::run` returns only after its file watches are gone.
        let _ = std::fs::remove_dir_all(&dir);
    }
    result.map_err(CliError::runtime)
}

/// Runs the layout in this process until `rotations` rotations have reached
/// every region, or Ctrl-C.
pub async fn run(layout: Layout, rotations: u64) -> Result<Answer, DemoError> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let stop = |rx: watch::Receiver<bool>| async move {
        let mut rx = rx;
        let _ = rx.wait_for(|s| *s).await;
    };
    let mut tasks = tokio::task::JoinSet::new();
    let Layout {
        dir,
        rotator,
        admin,
        agents,
        listeners,
        rotator_listeners,
    } = layout;
    let tokio_listener =
        |l: std::net::TcpListener| TcpListener::from_std(l).map_err(DemoError::Port);
    for (agent, (grpc, metrics)) in agents.iter().cloned().zip(listeners) {
        let (grpc, metrics) = (tokio_listener(grpc)?, tokio_listener(metrics)?);
        let region = agent.region.clone();
        let shutdown = stop(stop_rx.clone());
        tasks.spawn(async move {
            crate::agent::run(agent, grpc, Some(metrics), shutdown)
                .await
                .map_err(|source| DemoError::Agent {
                    region,
                    source: Box::new(source),
                })
        });
    }
    let (grpc, metrics) = (
        tokio_listener(rotator_listeners.0)?,
        tokio_listener(rotator_listeners.1)?,
    );
    let shutdown = stop(stop_rx.clone());
    let rotator_config = rotator.clone();
    tasks.spawn(async move {
        crate::rotator::run(rotator_config, grpc, Some(metrics), shutdown)
            .await
            .map_err(|e| DemoError::Rotator(Box::new(e)))
    });

    println!(
        "fernetd demo: a rotator and {} agents on loopback, mutual TLS everywhere",
        agents.len()
    );
    println!("  files:    {}", dir.display());
    println!(
        "  schedule: `{}` (UTC), max_active_keys {}",
        rotator.schedule.cron, DEMO_MAX_ACTIVE_KEYS
    );
    if let Some(m) = rotator.metrics_listen {
        println!("  metrics:  http://{m}/metrics");
    }
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "fernetd".into());
    println!(
        "  try:      {exe} admin --config {}/admin.toml status\n",
        dir.display()
    );

    let watched = tokio::select! {
        r = watch_rotations(&admin, &agents, rotations) => r,
        _ = tokio::signal::ctrl_c() => {
            println!("\ninterrupted");
            Ok(Answer::Yes)
        }
        Some(Ok(Err(e))) = tasks.join_next() => Err(e),
    };
    let _ = stop_tx.send(true);
    while let Some(joined) = tasks.join_next().await {
        if let Ok(Err(e)) = joined {
            tracing::warn!("while stopping: {}", crate::error_chain(&e));
        }
    }
    watched
}

/// Follows the rotator's events, printing each rotation and, once every region
/// holds it, the status table and a cross-region token check.
async fn watch_rotations(
    admin: &AdminConfig,
    agents: &[AgentConfig],
    rotations: u64,
) -> Result<Answer, DemoError> {
    let mut client = crate::admin::connect(admin)?;
    let call = |s: tonic::Status| DemoError::Call(crate::admin::describe(&s));
    // The rotator is starting: poll its status until it answers.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        match client.status(pb::StatusRequest {}).await {
            Ok(r) => break r.into_inner(),
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(call(e)),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let mut events = client
        .watch(pb::WatchRequest {})
        .await
        .map_err(call)?
        .into_inner();
    let synced = client
        .sync(pb::SyncRequest { wait_ms: 10_000 })
        .await
        .map_err(call)?
        .into_inner();
    println!(
        "initial distribution (generation {}):",
        status.repositories.first().map_or(0, |r| r.generation)
    );
    let mut out = String::new();
    crate::admin::render_agents(&mut out, &synced.agents);
    println!("{out}");

    let mut tokens: Vec<(u64, String)> = Vec::new();
    let mut seen = 0;
    // The generation being distributed and the regions that acknowledged it.
    let mut target = 0;
    let mut acked: Vec<String> = Vec::new();
    while seen < rotations {
        let event = match events.message().await.map_err(call)? {
            Some(e) => e,
            None => return Err(DemoError::Call("the event stream ended".into())),
        };
        let time = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(event.unix_ms)
            .map(|t| t.format("%H:%M:%S%.3f").to_string())
            .unwrap_or_default();
        match event.kind.as_str() {
            "rotated" => {
                println!("{time}  rotated to generation {}", event.generation);
                target = event.generation;
                acked.clear();
            }
            "acknowledged" if event.generation == target => {
                println!(
                    "{time}    {} installed it and decrypted the canaries",
                    event.region
                );
                acked.push(event.region);
            }
            // Acknowledgements of the initial distribution, already shown above.
            "acknowledged" => {}
            _ => {
                let msg = if event.message.is_empty() {
                    String::new()
                } else {
                    format!(": {}", event.message)
                };
                println!(
                    "{time}  {} {} generation {}{msg}",
                    event.kind, event.region, event.generation
                );
            }
        }
        if target == 0 || acked.len() < agents.len() {
            continue;
        }
        seen += 1;
        let status = client
            .status(pb::StatusRequest {})
            .await
            .map_err(call)?
            .into_inner();
        let mut out = String::new();
        crate::admin::render_status(&mut out, &status);
        println!("\n{out}");
        cross_region_check(agents, target, &mut tokens)?;
        println!();
        target = 0;
    }
    let plural = if rotations == 1 { "" } else { "s" };
    println!("{rotations} rotation{plural} reached every region; stopping.");
    Ok(Answer::Yes)
}

/// Issues a token with the first region's primary key, as its Keystone would,
/// and decrypts it and every earlier demo token with each region's repository
/// as read from disk.
fn cross_region_check(
    agents: &[AgentConfig],
    generation: u64,
    tokens: &mut Vec<(u64, String)>,
) -> Result<(), DemoError> {
    let mut keyrings = Vec::with_capacity(agents.len());
    for a in agents {
        let Some(repo) = a.repositories.first() else {
            continue;
        };
        let set = crate::repository::load(&repo.path)
            .map_err(|e| DemoError::Regions(crate::error_chain(&e)))?;
        keyrings.push((a.region.as_str(), crate::token::Keyring::new(&set), set));
    }
    let Some((first, _, first_set)) = keyrings.first() else {
        return Ok(());
    };
    let Some(primary) = first_set.primary() else {
        return Err(DemoError::Regions(format!("{first} has no primary key")));
    };
    tokens.push((generation, crate::token::canary(primary)));
    println!(
        "tokens issued in {first} (by generation), accepted by every region's repository on disk:"
    );
    for (g, token) in tokens.iter() {
        let accepted: Vec<&str> = keyrings
            .iter()
            .filter(|(_, ring, _)| ring.decrypt(token).is_ok())
            .map(|(r, _, _)| *r)
            .collect();
        let verdict = if accepted.len() == keyrings.len() {
            "accepted everywhere".to_owned()
        } else if accepted.is_empty() {
            format!(
                "rejected everywhere: its key was purged (max_active_keys {DEMO_MAX_ACTIVE_KEYS})"
            )
        } else {
            format!("accepted only by {}", accepted.join(", "))
        };
        println!("  generation {g:>3}: {verdict}");
    }
    Ok(())
}
