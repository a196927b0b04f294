//! Integration tests: the rotator with real agents, all real `fernetd`
//! processes on loopback over mTLS, driven through `fernetd admin`. Every test
//! ends by searching its daemons' logs for every key it saw written.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine as _;
use fernetd::config::{
    AdminConfig, AgentConfig, AgentEndpoint, AgentRepository, FanoutConfig, PolicyConfig,
    RepositoryConfig, RotatorConfig, ScheduleConfig, TlsConfig,
};
use fernetd::repository::{self, KeySet};
use serde_json::Value;

use crate::common::daemon::{Daemon, free_addr, poll_until};
use crate::common::keystone;
use crate::common::pki::{Ca, Leaf, client_tls};

pub(crate) const ROTATOR_ID: &str = "rotator.fernetd.test";
pub(crate) const ADMIN_ID: &str = "admin.fernetd.test";
pub(crate) const MAX_ACTIVE_KEYS: usize = 4;

pub(crate) fn agent_identity(region: &str) -> String {
    format!("{}.agents.fernetd.test", region.to_lowercase())
}

pub(crate) fn tls_files(dir: &Path, ca: &Ca, leaf: &Leaf, name: &str) -> TlsConfig {
    let ca_path = ca.write(&dir.join("ca.pem"));
    let (cert, key) = leaf.write(dir, name);
    TlsConfig {
        ca: ca_path,
        cert,
        key,
    }
}

pub(crate) struct Agent {
    /// The agent's own name: its region, or a controller's name.
    pub(crate) name: String,
    pub(crate) region: String,
    pub(crate) addr: SocketAddr,
    pub(crate) config: PathBuf,
    pub(crate) repo: PathBuf,
    pub(crate) daemon: Option<Daemon>,
    /// Extra environment for the process (the clock-skew tests' offsets).
    pub(crate) env: Vec<(String, String)>,
}

/// A rotator and its agents, each a real process, in one temporary directory.
pub(crate) struct Cluster {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) ca: Ca,
    pub(crate) admin_leaf: Leaf,
    pub(crate) rotator_addr: SocketAddr,
    pub(crate) rotator_config: PathBuf,
    pub(crate) rotator: Option<Daemon>,
    /// Extra environment for the rotator process.
    pub(crate) rotator_env: Vec<(String, String)>,
    pub(crate) admin_config: PathBuf,
    pub(crate) agents: Vec<Agent>,
    /// Every daemon log written for this cluster.
    pub(crate) logs: Vec<PathBuf>,
}

impl Cluster {
    /// `regions` agents; `enrolled_identity` may enrol an agent under another
    /// identity than its certificate carries.
    pub(crate) async fn start(
        regions: &[&str],
        enrolled_identity: impl Fn(&str) -> String,
    ) -> Cluster {
        let cluster = Cluster::configure(regions, enrolled_identity, None);
        cluster.launch().await
    }

    /// Writes every file; `import` is an existing repository the rotator adopts.
    pub(crate) fn configure(
        regions: &[&str],
        enrolled_identity: impl Fn(&str) -> String,
        import: Option<PathBuf>,
    ) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Ca::new("fernetd test CA");
        let admin_leaf = ca.issue(&[ADMIN_ID]);
        let rotator_leaf = ca.issue(&[ROTATOR_ID]);
        let pki = dir.path().join("pki");
        let mut agents = Vec::new();
        let mut endpoints = Vec::new();
        // `ctl1.regionone@RegionOne` is a controller of a region; a plain name
        // is a region with one agent.
        for spec in regions {
            let (name, region) = spec.split_once('@').unwrap_or((spec, spec));
            let leaf = ca.issue(&[&agent_identity(name)]);
            let addr = free_addr();
            let repo = dir.path().join("regions").join(name).join("fernet-keys");
            std::fs::create_dir_all(&repo).expect("repository directory");
            let config = AgentConfig {
                region: region.to_string(),
                listen: addr,
                metrics: None,
                rotator_identity: ROTATOR_ID.into(),
                // The tests check each agent's health as the administrator.
                monitor_identities: vec![ADMIN_ID.into()],
                drift: Default::default(),
                drift_check: Duration::from_secs(60),
                max_message_bytes: fernetd::config::DEFAULT_MAX_MESSAGE_BYTES,
                request_timeout: fernetd::config::DEFAULT_REQUEST_TIMEOUT,
                first_request_timeout: fernetd::config::DEFAULT_FIRST_REQUEST_TIMEOUT,
                log_format: None,
                tls: tls_files(&pki, &ca, &leaf, &name.to_lowercase()),
                repositories: vec![AgentRepository {
                    name: "tokens".into(),
                    path: repo.clone(),
                    owner: None,
                }],
                keystone_conf: None,
                audit_log: None,
                credential: None,
                readiness: Default::default(),
            };
            let path = dir.path().join(format!("{name}.toml"));
            std::fs::write(&path, toml::to_string(&config).expect("toml"))
                .expect("write agent.toml");
            endpoints.push(AgentEndpoint {
                name: (name != region).then(|| name.to_string()),
                region: region.to_string(),
                endpoint: format!("https://{addr}"),
                identity: enrolled_identity(name),
            });
            agents.push(Agent {
                name: name.to_string(),
                region: region.to_string(),
                addr,
                config: path,
                repo,
                daemon: None,
                env: Vec::new(),
            });
        }
        let rotator_addr = free_addr();
        let rotator = RotatorConfig {
            listen: rotator_addr,
            metrics_listen: Some(free_addr()),
            tls: tls_files(&pki, &ca, &rotator_leaf, "rotator"),
            admin_identities: vec![ADMIN_ID.into()],
            state_dir: dir.path().join("rotator-state"),
            repositories: vec![RepositoryConfig {
                name: "tokens".into(),
                max_active_keys: MAX_ACTIVE_KEYS,
                import,
                schedule: None,
            }],
            // Once a year: the tests rotate through `fernetd admin`.
            schedule: ScheduleConfig {
                cron: "0 0 1 1 *".into(),
            },
            // Tokens of 1 s: a key is purge-safe a second after every region
            // stopped encrypting with it, so tests rotate quickly and
            // `rotate_with` waits out the key-lifetime rule when it holds one.
            policy: PolicyConfig {
                token_expiration: Duration::from_secs(1),
                allow_expired_window: Duration::ZERO,
            },
            agents: endpoints,
            fanout: FanoutConfig {
                concurrency: 8,
                call_timeout: Duration::from_secs(2),
                backoff_base: Duration::from_millis(100),
                backoff_max: Duration::from_secs(1),
                reconcile_interval: Duration::from_secs(1),
                ack_wait: Duration::from_secs(20),
                quarantine_after: None,
            },
            keystone_conf: None,
            audit_log: None,
            seal_key: None,
            ha: None,
            credential: None,
        };
        let rotator_config = dir.path().join("rotator.toml");
        std::fs::write(&rotator_config, toml::to_string(&rotator).expect("toml"))
            .expect("write rotator.toml");
        let admin = AdminConfig {
            rotator: format!("https://{rotator_addr}").into(),
            rotator_identity: ROTATOR_ID.into(),
            tls: tls_files(&pki, &ca, &admin_leaf, "admin"),
        };
        let admin_config = dir.path().join("admin.toml");
        std::fs::write(&admin_config, toml::to_string(&admin).expect("toml"))
            .expect("write admin.toml");
        Cluster {
            dir,
            ca,
            admin_leaf,
            rotator_addr,
            rotator_config,
            rotator: None,
            rotator_env: Vec::new(),
            admin_config,
            agents,
            logs: Vec::new(),
        }
    }

    pub(crate) async fn launch(mut self) -> Cluster {
        for i in 0..self.agents.len() {
            self.start_agent(i).await;
        }
        self.start_rotator().await;
        self
    }

    pub(crate) fn rotator_config(&self) -> RotatorConfig {
        fernetd::config::load(&self.rotator_config).expect("rotator.toml")
    }

    /// Rewrites rotator.toml with another schedule and token lifetime.
    pub(crate) fn set_schedule(&self, cron: &str, token_expiration: Duration) -> RotatorConfig {
        let mut config = self.rotator_config();
        config.schedule.cron = cron.into();
        config.policy.token_expiration = token_expiration;
        self.write_rotator_config(&config);
        config
    }

    pub(crate) fn write_rotator_config(&self, config: &RotatorConfig) {
        std::fs::write(&self.rotator_config, toml::to_string(config).expect("toml"))
            .expect("write rotator.toml");
    }

    /// Starts the rotator on its configuration, expecting it to refuse with
    /// exit 2 (a configuration error); returns what it said.
    pub(crate) fn refused_start(&self) -> String {
        let out = Command::new(crate::common::fernetd_bin())
            .args(["rotator", "--config"])
            .arg(&self.rotator_config)
            .output()
            .expect("run the rotator");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        stderr
    }

    /// `GET /metrics` from the rotator.
    pub(crate) fn metrics(&self) -> String {
        get_metrics(
            self.rotator_config()
                .metrics_listen
                .expect("metrics address"),
        )
    }

    pub(crate) async fn start_agent(&mut self, i: usize) {
        let agent = &mut self.agents[i];
        let mut daemon = Daemon::spawn_with_env(
            &format!("rotator-test-agent-{}", agent.name),
            ["agent", "--config", agent.config.to_str().expect("utf-8")],
            &agent.env,
        );
        self.logs.push(daemon.log_path().to_path_buf());
        let tls = client_tls(
            self.ca.cert_pem(),
            Some(&self.admin_leaf),
            &agent_identity(&agent.name),
        );
        daemon.wait_healthy(agent.addr, tls, "").await;
        agent.daemon = Some(daemon);
    }

    pub(crate) async fn start_rotator(&mut self) {
        let mut daemon = Daemon::spawn_with_env(
            "rotator-test-rotator",
            [
                "rotator",
                "--config",
                self.rotator_config.to_str().expect("utf-8"),
            ],
            &self.rotator_env,
        );
        self.logs.push(daemon.log_path().to_path_buf());
        let tls = client_tls(self.ca.cert_pem(), Some(&self.admin_leaf), ROTATOR_ID);
        daemon
            .wait_healthy(self.rotator_addr, tls, "fernetd.v1.Admin")
            .await;
        self.rotator = Some(daemon);
    }

    pub(crate) fn rotator(&mut self) -> &mut Daemon {
        self.rotator.as_mut().expect("rotator running")
    }

    pub(crate) fn agent(&mut self, i: usize) -> &mut Daemon {
        self.agents[i].daemon.as_mut().expect("agent running")
    }

    /// `fernetd admin --config admin.toml ARGS...`: (exit code, stdout, stderr).
    pub(crate) fn admin_with(&self, config: &Path, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(crate::common::fernetd_bin())
            .arg("admin")
            .arg("--config")
            .arg(config)
            .args(args)
            .output()
            .expect("run fernetd admin");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub(crate) fn admin(&self, args: &[&str]) -> (i32, String, String) {
        self.admin_with(&self.admin_config, args)
    }

    pub(crate) fn admin_json(&self, args: &[&str]) -> (i32, Value) {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let (code, out, err) = self.admin(&all);
        let value = serde_json::from_str(&out).unwrap_or_else(|e| {
            panic!("admin {args:?} exit {code}: {e}\nstdout: {out}\nstderr: {err}")
        });
        (code, value)
    }

    pub(crate) fn status(&self) -> (i32, Value) {
        self.admin_json(&["status"])
    }

    /// Polls `admin status` until every agent holds the rotator's generation.
    pub(crate) async fn converged(&self, what: &str) -> Value {
        poll_until(Duration::from_secs(30), what, || async {
            let (code, status) = self.status();
            (code == 0).then_some(status)
        })
        .await
    }

    /// `fernetd admin --json rotate ARGS...`, again while the key-lifetime rule
    /// holds it (a purged key's tokens may still be valid), for up to 15 s.
    pub(crate) fn rotate_with(&self, args: &[&str]) -> (i32, Value) {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        let mut all = vec!["rotate"];
        all.extend_from_slice(args);
        loop {
            let (code, v) = self.admin_json(&all);
            if v[0]["held"] != true || std::time::Instant::now() > deadline {
                return (code, v);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Rotates and expects every region to acknowledge: (generation, digest).
    pub(crate) fn rotate_ok(&self) -> (u64, String) {
        let (code, v) = self.rotate_with(&["--wait", "20"]);
        assert_eq!(code, 0, "rotate: {v:#}");
        let o = &v[0];
        assert_eq!(o["rotated"], true, "{v:#}");
        assert_eq!(o["pending_regions"], serde_json::json!([]), "{v:#}");
        (
            o["generation"].as_u64().expect("generation"),
            o["digest"].as_str().expect("digest").to_owned(),
        )
    }

    /// Asserts every region's repository on disk has `digest`, collects its
    /// keys for the log search, and returns the sets.
    pub(crate) fn all_hold(
        &self,
        digest: &str,
        context: &str,
        keys: &mut BTreeSet<String>,
    ) -> Vec<KeySet> {
        self.hold(0..self.agents.len(), digest, context, keys)
    }

    /// [`Cluster::all_hold`] for the agents at `indices`.
    pub(crate) fn hold(
        &self,
        indices: impl IntoIterator<Item = usize>,
        digest: &str,
        context: &str,
        keys: &mut BTreeSet<String>,
    ) -> Vec<KeySet> {
        indices
            .into_iter()
            .map(|i| {
                let set = self.repo_state(i);
                assert_eq!(
                    set.digest().to_hex(),
                    digest,
                    "{context}: {}",
                    self.agents[i].region
                );
                key_forms(&set, keys);
                set
            })
            .collect()
    }

    pub(crate) fn repo_state(&self, i: usize) -> KeySet {
        repository::load(&self.agents[i].repo).expect("agent repository readable")
    }
}

/// `GET /metrics` from a daemon's metrics endpoint: the whole HTTP response.
pub(crate) fn get_metrics(addr: SocketAddr) -> String {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to the metrics endpoint");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: fernetd\r\nConnection: close\r\n\r\n")
        .expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    response
}

/// Every key in every form it could leak in: url-safe base64 (the file form),
/// standard base64 and hex of the raw bytes.
pub(crate) fn key_forms(set: &KeySet, into: &mut BTreeSet<String>) {
    for (_, key) in set.iter() {
        into.insert(key.to_base64().to_string());
        into.insert(base64::engine::general_purpose::STANDARD.encode(key.as_bytes()));
        into.insert(hex::encode(key.as_bytes()));
    }
}

/// No daemon log may contain any key that was written.
pub(crate) fn assert_no_keys_in_logs(logs: &[PathBuf], keys: &BTreeSet<String>) {
    assert!(!keys.is_empty(), "the test saw no keys to search for");
    for log in logs {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        assert!(
            !text.is_empty(),
            "{} is empty: is logging working?",
            log.display()
        );
        for key in keys {
            assert!(
                !text.contains(key.as_str()),
                "a key appears in {}",
                log.display()
            );
        }
    }
}

/// Keystone's own `FernetUtils.load_keys` over each directory: the SHA-256 of
/// the keys in the order Keystone uses them (primary first) and their count.
pub(crate) fn keystone_load(dirs: &[PathBuf]) -> Vec<(String, usize)> {
    const SCRIPT: &str = r#"
import sys, hashlib
import keystone.conf
from keystone.common import fernet_utils
keystone.conf.configure()
keystone.conf.CONF([], project='keystone', default_config_files=[])
for d in sys.argv[1:]:
    keys = fernet_utils.FernetUtils(d, 10, 'fernet_tokens').load_keys()
    print(hashlib.sha256(''.join(keys).encode()).hexdigest(), len(keys))
"#;
    let args: Vec<&str> = dirs.iter().map(|d| d.to_str().expect("utf-8")).collect();
    let out = keystone::run_python(SCRIPT, &args);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let (h, n) = l.split_once(' ').expect("hash and count");
            (h.to_owned(), n.parse().expect("count"))
        })
        .collect()
}

/// What [`keystone_load`] should print for `set`.
pub(crate) fn keystone_view(set: &KeySet) -> (String, usize) {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    for (_, key) in set.keystone_order() {
        h.update(key.to_base64().as_bytes());
    }
    (hex::encode(h.finalize()), set.len())
}

/// Copies a repository (key files only) so Keystone can read it later.
pub(crate) fn snapshot(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("snapshot dir");
    for entry in std::fs::read_dir(from).expect("read repository") {
        let entry = entry.expect("entry");
        let name = entry.file_name();
        if name.to_str().is_some_and(|n| n.parse::<u32>().is_ok()) {
            std::fs::copy(entry.path(), to.join(&name)).expect("copy key");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_rotations_reach_every_region_and_keystone_reads_them() {
    let mut cluster =
        Cluster::start(&["RegionOne", "RegionTwo", "RegionThree"], agent_identity).await;
    let status = cluster.converged("initial distribution").await;
    let mut generation = status["repositories"][0]["generation"]
        .as_u64()
        .expect("generation");
    let mut keys = BTreeSet::new();
    let mut snapshots = Vec::new();
    let mut expected = Vec::new();
    for round in 0..20 {
        let (g, digest) = cluster.rotate_ok();
        assert_eq!(
            g,
            generation + 1,
            "round {round}: generations advance by one"
        );
        generation = g;
        for (i, set) in cluster
            .all_hold(&digest, &format!("round {round}"), &mut keys)
            .into_iter()
            .enumerate()
        {
            assert!(set.len() <= MAX_ACTIVE_KEYS);
            let copy = cluster
                .dir
                .path()
                .join("snapshots")
                .join(format!("{round}-{i}"));
            snapshot(&cluster.agents[i].repo, &copy);
            snapshots.push(copy);
            expected.push(keystone_view(&set));
        }
    }
    assert_eq!(
        keystone_load(&snapshots),
        expected,
        "Keystone reads exactly the distributed keys"
    );
    let (code, status) = cluster.status();
    assert_eq!(code, 0, "{status:#}");
    for a in status["agents"].as_array().expect("agents") {
        assert_eq!(a["generation"].as_u64(), Some(generation));
        assert_eq!(a["lag"].as_u64(), Some(0));
    }
    let metrics = cluster.metrics();
    for line in [
        format!("fernetd_rotator_generation{{repository=\"tokens\"}} {generation}"),
        "fernetd_rotator_rotation_blocked{repository=\"tokens\"} 0".to_owned(),
        // Every per-agent series names the agent and its region.
        "fernetd_rotator_agent_lag{agent=\"RegionTwo\",region=\"RegionTwo\",repository=\"tokens\"} 0"
            .to_owned(),
        "fernetd_rotator_agent_connected{agent=\"RegionThree\",region=\"RegionThree\",repository=\"tokens\"} 1"
            .to_owned(),
    ] {
        assert!(
            metrics.lines().any(|l| l.starts_with(&line)),
            "no `{line}` in\n{metrics}"
        );
    }
    assert!(
        metrics.contains(
            "fernetd_rotator_agent_last_ack_age_seconds{agent=\"RegionOne\",region=\"RegionOne\""
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("fernetd_rotator_push_duration_seconds_count"),
        "{metrics}"
    );
    let mut keys_and_metrics = keys.clone();
    keys_and_metrics.retain(|k| metrics.contains(k.as_str()));
    assert!(keys_and_metrics.is_empty(), "a key appears in the metrics");
    // SIGTERM: a clean exit that leaves the acknowledgements recorded.
    let exit = cluster.rotator().stop().await;
    assert!(exit.success(), "{exit}");
    let state_dir = cluster.rotator_config().state_dir;
    let acks: Value = serde_json::from_str(
        &std::fs::read_to_string(state_dir.join("agents.json")).expect("acknowledgements recorded"),
    )
    .expect("json");
    for agent in &cluster.agents {
        assert_eq!(
            acks["tokens"][&agent.region]["generation"].as_u64(),
            Some(generation),
            "{acks:#}"
        );
    }
    assert_no_keys_in_logs(&cluster.logs, &keys);
}

/// Watches every region's repository on disk through the whole test: no two
/// regions may ever be two generations apart. Each rotation raises the primary
/// index by one, so the primary indices measure the distance.
pub(crate) struct Sampler {
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) samples: Arc<AtomicUsize>,
    pub(crate) thread: Option<std::thread::JoinHandle<(u32, BTreeSet<String>)>>,
}

impl Sampler {
    pub(crate) fn start(repos: Vec<PathBuf>) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(AtomicUsize::new(0));
        let (s, n) = (stop.clone(), samples.clone());
        let thread = std::thread::spawn(move || {
            let mut worst = 0;
            let mut keys = BTreeSet::new();
            while !s.load(Ordering::Relaxed) {
                let mut primaries = Vec::new();
                for repo in &repos {
                    // A swap between listing and reading: take the next sample.
                    if let Ok(set) = repository::load(repo)
                        && let Some(p) = set.primary_index()
                    {
                        key_forms(&set, &mut keys);
                        primaries.push(p);
                    }
                }
                if let (Some(lo), Some(hi)) = (primaries.iter().min(), primaries.iter().max()) {
                    worst = worst.max(hi - lo);
                    assert!(
                        hi - lo <= 1,
                        "two regions two generations apart: primaries {primaries:?}"
                    );
                }
                n.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
            (worst, keys)
        });
        Sampler {
            stop,
            samples,
            thread: Some(thread),
        }
    }

    pub(crate) fn finish(mut self) -> (u32, usize, BTreeSet<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let (worst, keys) = self
            .thread
            .take()
            .expect("thread")
            .join()
            .expect("sampler saw a violation");
        (worst, self.samples.load(Ordering::Relaxed), keys)
    }
}

pub(crate) fn region_rows<'a>(status: &'a Value, region: &str) -> Vec<&'a Value> {
    status["agents"]
        .as_array()
        .expect("agents")
        .iter()
        .filter(|a| a["region"] == region)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_or_killed_agent_blocks_the_next_rotation_and_catches_up_by_itself() {
    use rustix::process::Signal;
    let mut cluster =
        Cluster::start(&["RegionOne", "RegionTwo", "RegionThree"], agent_identity).await;
    cluster.converged("initial distribution").await;
    let sampler = Sampler::start(cluster.agents.iter().map(|a| a.repo.clone()).collect());
    cluster.rotate_ok();
    cluster.rotate_ok();

    for (victim, kill) in [(2usize, false), (1usize, true)] {
        let region = cluster.agents[victim].region.clone();
        if kill {
            cluster.agent(victim).kill();
        } else {
            cluster.agent(victim).signal(Signal::STOP);
        }
        // Every region held the current generation: this rotation commits, and
        // the victim is reported as not acknowledging it (the others have time
        // enough to acknowledge even on a loaded machine).
        let (code, v) = cluster.rotate_with(&["--wait", "8"]);
        assert_eq!(code, 1, "{v:#}");
        assert_eq!(v[0]["rotated"], true, "{v:#}");
        assert_eq!(
            v[0]["pending_regions"],
            serde_json::json!([region]),
            "{v:#}"
        );
        // The next one would put two generations between regions: blocked.
        let (code, v) = cluster.admin_json(&["rotate", "--wait", "3"]);
        assert_eq!(code, 1, "{v:#}");
        assert_eq!(v[0]["rotated"], false, "{v:#}");
        assert!(
            v[0]["message"].as_str().expect("message").contains(&region),
            "{v:#}"
        );
        let (code, status) = cluster.status();
        assert_eq!(code, 1, "{status:#}");
        let repo = &status["repositories"][0];
        assert!(
            repo["blocked_reason"]
                .as_str()
                .is_some_and(|r| r.contains(&region)),
            "{status:#}"
        );
        assert_eq!(
            repo["blocking_regions"],
            serde_json::json!([region]),
            "{status:#}"
        );
        let row = region_rows(&status, &region)[0];
        assert_eq!(row["lag"].as_u64(), Some(1), "{status:#}");
        assert_eq!(row["digest_match"], false, "{status:#}");
        // Dry run and no --force: still blocked, nothing changes.
        let (code, v) = cluster.admin_json(&["rotate", "--dry-run"]);
        assert_eq!((code, &v[0]["rotated"]), (1, &Value::Bool(false)), "{v:#}");

        if kill {
            cluster.start_agent(victim).await;
        } else {
            cluster.agent(victim).signal(Signal::CONT);
        }
        let status = cluster
            .converged(&format!("{region} catching up by itself"))
            .await;
        assert!(
            status["repositories"][0]["blocked_reason"].is_null(),
            "{status:#}"
        );
        cluster.rotate_ok();
    }
    let (worst, samples, keys) = sampler.finish();
    assert!(samples > 50, "the sampler ran ({samples} samples)");
    assert!(worst <= 1);
    assert_no_keys_in_logs(&cluster.logs, &keys);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rotator_killed_mid_fan_out_loses_no_generation_and_forks_none() {
    use rustix::process::Signal;
    let mut cluster =
        Cluster::start(&["RegionOne", "RegionTwo", "RegionThree"], agent_identity).await;
    cluster.converged("initial distribution").await;
    let mut digests: BTreeMap<u64, String> = BTreeMap::new();
    let mut keys = BTreeSet::new();
    for round in 0..4 {
        // RegionThree hangs, so the fan-out is certainly still running when the
        // rotator dies; in odd rounds the rotator dies right after committing.
        let hang = round % 2 == 0;
        if hang {
            cluster.agent(2).signal(Signal::STOP);
        }
        let (code, v) = cluster.rotate_with(&["--no-wait"]);
        assert_eq!(code, 0, "{v:#}");
        let g = v[0]["generation"].as_u64().expect("generation");
        let digest = v[0]["digest"].as_str().expect("digest").to_owned();
        assert!(
            digests.insert(g, digest.clone()).is_none(),
            "generation {g} committed twice"
        );
        cluster.rotator().kill();
        if hang {
            cluster.agent(2).signal(Signal::CONT);
        }
        cluster.start_rotator().await;
        let status = cluster
            .converged(&format!("round {round}: convergence after the restart"))
            .await;
        let repo = &status["repositories"][0];
        assert_eq!(
            repo["generation"].as_u64(),
            Some(g),
            "round {round}: no generation lost: {status:#}"
        );
        assert_eq!(
            repo["digest"].as_str(),
            Some(digest.as_str()),
            "round {round}: same digest after the restart"
        );
        cluster.all_hold(&digest, &format!("round {round}"), &mut keys);
    }
    // Generations are consecutive: none lost, none reused.
    let gens: Vec<u64> = digests.keys().copied().collect();
    assert!(gens.windows(2).all(|w| w[1] == w[0] + 1), "{gens:?}");
    let (g, _) = cluster.rotate_ok();
    assert_eq!(Some(g), gens.last().map(|l| l + 1));
    assert_no_keys_in_logs(&cluster.logs, &keys);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_admin_and_an_agent_with_the_wrong_identity_are_refused() {
    // RegionTwo is enrolled under an identity its certificate does not carry.
    let cluster = Cluster::start(&["RegionOne", "RegionTwo"], |region| {
        if region == "RegionTwo" {
            "impostor.agents.fernetd.test".into()
        } else {
            agent_identity(region)
        }
    })
    .await;
    // A valid certificate from the same CA, but not an admin identity.
    let intruder = cluster.ca.issue(&["intruder.fernetd.test"]);
    let pki = cluster.dir.path().join("intruder");
    let config = AdminConfig {
        rotator: format!("https://{}", cluster.rotator_addr).into(),
        rotator_identity: ROTATOR_ID.into(),
        tls: tls_files(&pki, &cluster.ca, &intruder, "intruder"),
    };
    let path = cluster.dir.path().join("intruder-admin.toml");
    std::fs::write(&path, toml::to_string(&config).expect("toml")).expect("write");
    for args in [
        &["status"][..],
        &["rotate", "--force", "--yes"],
        &["sync"],
        &["agents"],
    ] {
        let (code, out, err) = cluster.admin_with(&path, args);
        assert_eq!(code, 3, "{args:?}: {out}{err}");
        assert!(
            err.contains("PermissionDenied") && err.contains("intruder.fernetd.test"),
            "{args:?}: {err}"
        );
    }
    let before = cluster.status().1["repositories"][0]["generation"].clone();

    // The rotator never installs on the agent whose identity does not match.
    let status = poll_until(
        Duration::from_secs(20),
        "the identity mismatch reported",
        || async {
            let (_, status) = cluster.status();
            let row = region_rows(&status, "RegionTwo")[0].clone();
            let one = region_rows(&status, "RegionOne")[0].clone();
            (row["last_error"].as_str().is_some_and(|e| !e.is_empty())
                && one["digest_match"] == true)
                .then_some(status)
        },
    )
    .await;
    let row = region_rows(&status, "RegionTwo")[0];
    assert_eq!(row["digest_match"], false, "{status:#}");
    assert_eq!(row["connected"], false, "{status:#}");
    assert!(cluster.repo_state(1).is_empty(), "RegionTwo untouched");
    // And the safety rule holds for it like for any silent region.
    let (code, v) = cluster.admin_json(&["rotate", "--wait", "2"]);
    assert_eq!((code, &v[0]["rotated"]), (1, &Value::Bool(false)), "{v:#}");
    assert_eq!(cluster.status().1["repositories"][0]["generation"], before);
    let mut keys = BTreeSet::new();
    key_forms(&cluster.repo_state(0), &mut keys);
    assert_no_keys_in_logs(&cluster.logs, &keys);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adopting_an_existing_keystone_repository_invalidates_no_token() {
    let existing = tempfile::tempdir().expect("tempdir");
    let repo = existing.path().join("fernet-keys");
    // A repository as Keystone left it: set up, then rotated twice.
    for command in ["init", "rotate", "rotate"] {
        let out = Command::new(crate::common::fernetd_bin())
            .args(["repo", command, "--max-active-keys", "4", "--repository"])
            .arg(&repo)
            .output()
            .expect("fernetd repo");
        assert!(
            out.status.success(),
            "repo {command}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let before = repository::load(&repo).expect("existing repository");
    let token = fernetd::token::canary(before.primary().expect("primary"));
    let older = fernetd::token::canary(before.get(1).expect("a secondary"));
    let cluster = Cluster::configure(
        &["RegionOne", "RegionTwo"],
        agent_identity,
        Some(repo.clone()),
    );
    let cluster = cluster.launch().await;
    let status = cluster.converged("the adopted repository everywhere").await;
    // `fernetd repo` stamps what it writes: the import continues at the
    // stamp's generation (1 for a repository without one).
    let stamped = repository::read_stamp(&repo)
        .expect("stamp readable")
        .map_or(1, |s| s.generation);
    assert_eq!(stamped, 3, "init and two rotations");
    assert_eq!(
        status["repositories"][0]["generation"].as_u64(),
        Some(stamped),
        "{status:#}"
    );
    assert_eq!(
        status["repositories"][0]["digest"].as_str(),
        Some(before.digest().to_hex().as_str())
    );
    let mut keys = BTreeSet::new();
    for i in 0..cluster.agents.len() {
        let set = cluster.repo_state(i);
        assert_eq!(
            set, before,
            "{} holds the adopted keys",
            cluster.agents[i].region
        );
        key_forms(&set, &mut keys);
        let ring = fernetd::token::Keyring::new(&set);
        assert!(ring.decrypt(&token).is_ok() && ring.decrypt(&older).is_ok());
    }
    // The imported repository itself is left as it was.
    assert_eq!(repository::load(&repo).expect("still readable"), before);
    // The event stream of the Admin API narrates the first rotation.
    let admin: AdminConfig = fernetd::config::load(&cluster.admin_config).expect("admin.toml");
    let mut client = fernetd::rotator::admin::connect(&admin).expect("admin client");
    let mut events = client
        .watch(fernetd::pb::WatchRequest {})
        .await
        .expect("watch")
        .into_inner();
    // The first rotation keeps tokens of the imported primary valid everywhere.
    let (g, _) = cluster.rotate_ok();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let event = tokio::time::timeout(Duration::from_secs(10), events.message())
            .await
            .expect("an event in time")
            .expect("stream open")
            .expect("an event");
        if event.generation == g {
            seen.push((event.kind, event.region));
        }
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            ("acknowledged".to_owned(), "RegionOne".to_owned()),
            ("acknowledged".to_owned(), "RegionTwo".to_owned()),
            ("rotated".to_owned(), String::new()),
        ]
    );
    for i in 0..cluster.agents.len() {
        let set = cluster.repo_state(i);
        key_forms(&set, &mut keys);
        assert!(fernetd::token::Keyring::new(&set).decrypt(&token).is_ok());
    }
    assert_no_keys_in_logs(&cluster.logs, &keys);
}

#[test]
fn a_schedule_that_would_drop_keys_of_valid_tokens_is_refused_with_the_minimum() {
    let cluster = Cluster::configure(&["RegionOne"], agent_identity, None);
    // Hourly rotation, 24 h tokens: Keystone needs ceil(24 h / 1 h) + 2 = 26 keys.
    let config = cluster.set_schedule("0 * * * *", Duration::from_secs(86_400));
    let stderr = cluster.refused_start();
    assert!(
        stderr.contains("requires at least 26") && stderr.contains("max_active_keys = 4"),
        "{stderr}"
    );
    assert!(!config.state_dir.exists(), "nothing was written");
}

#[test]
fn a_bad_configuration_is_refused_before_any_state_is_written() {
    let cluster = Cluster::configure(&["RegionOne", "RegionTwo"], agent_identity, None);
    let good = cluster.rotator_config();
    let missing_import = cluster.dir.path().join("no-such-repository");
    type Breakage = Box<dyn Fn(&mut RotatorConfig)>;
    let cases: Vec<(&str, Breakage, Vec<String>)> = vec![
        (
            "a bad agent endpoint",
            Box::new(|c: &mut RotatorConfig| c.agents[1].endpoint = "ftp://region-two/".into()),
            vec!["RegionTwo".into(), "ftp://region-two/".into()],
        ),
        (
            "a bad agent identity",
            Box::new(|c: &mut RotatorConfig| c.agents[0].identity = "not a host name".into()),
            vec!["RegionOne".into(), "not a host name".into()],
        ),
        (
            "a duplicate region",
            Box::new(|c: &mut RotatorConfig| c.agents[1].region = c.agents[0].region.clone()),
            vec!["agent region `RegionOne` is listed twice".into()],
        ),
        (
            "an import that does not exist",
            Box::new({
                let missing = missing_import.clone();
                move |c: &mut RotatorConfig| c.repositories[0].import = Some(missing.clone())
            }),
            vec![missing_import.to_string_lossy().into_owned()],
        ),
        (
            "a repository name that cannot be a state file",
            Box::new(|c: &mut RotatorConfig| c.repositories[0].name = "../tokens".into()),
            vec!["`../tokens`".into()],
        ),
    ];
    for (what, breakage, expected) in cases {
        let mut config = good.clone();
        breakage(&mut config);
        cluster.write_rotator_config(&config);
        let stderr = cluster.refused_start();
        for needle in &expected {
            assert!(stderr.contains(needle.as_str()), "{what}: {stderr}");
        }
        assert!(
            !config.state_dir.exists(),
            "{what}: the state directory was created: {:?}",
            std::fs::read_dir(&config.state_dir)
                .map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
        );
    }
}

#[test]
fn an_unreadable_certificate_is_a_configuration_error() {
    let cluster = Cluster::configure(&["RegionOne"], agent_identity, None);
    let mut config = cluster.rotator_config();
    let missing = config.tls.cert.with_file_name("missing.pem");
    config.tls.cert = missing.clone();
    cluster.write_rotator_config(&config);
    let stderr = cluster.refused_start();
    assert!(stderr.contains(&*missing.to_string_lossy()), "{stderr}");
    assert!(!config.state_dir.exists(), "nothing was written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_schedule_rotates_by_itself_and_a_blocked_rotation_happens_once_the_region_is_back() {
    use rustix::process::Signal;
    let cluster = Cluster::configure(&["RegionOne", "RegionTwo"], agent_identity, None);
    // Every second; 1 s tokens keep Keystone's formula at ceil(1/1) + 2 = 3 keys.
    cluster.set_schedule("* * * * * *", Duration::from_secs(1));
    let mut cluster = cluster.launch().await;
    let generation = |c: &Cluster| {
        c.status().1["repositories"][0]["generation"]
            .as_u64()
            .unwrap_or(0)
    };
    let start = generation(&cluster);
    poll_until(
        Duration::from_secs(20),
        "three scheduled rotations",
        || async { (generation(&cluster) >= start + 3).then_some(()) },
    )
    .await;

    cluster.agent(1).signal(Signal::STOP);
    // At most one more generation is committed, then the schedule is blocked.
    let blocked = poll_until(
        Duration::from_secs(20),
        "the schedule blocked by RegionTwo",
        || async {
            let (_, status) = cluster.status();
            let repo = &status["repositories"][0];
            (repo["blocking_regions"] == serde_json::json!(["RegionTwo"]))
                .then(|| repo["generation"].as_u64().unwrap_or(0))
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        generation(&cluster),
        blocked,
        "no rotation while RegionTwo lags"
    );
    let held = cluster
        .repo_state(1)
        .primary_index()
        .expect("RegionTwo has keys");
    let ahead = cluster
        .repo_state(0)
        .primary_index()
        .expect("RegionOne has keys");
    assert!(ahead - held <= 1, "regions one generation apart at most");

    cluster.agent(1).signal(Signal::CONT);
    poll_until(
        Duration::from_secs(20),
        "the owed rotation after RegionTwo caught up",
        || async { (generation(&cluster) > blocked).then_some(()) },
    )
    .await;
    let status = cluster
        .converged("both regions on the schedule again")
        .await;
    assert!(
        status["repositories"][0]["next_rotation"].is_string(),
        "{status:#}"
    );
    let mut keys = BTreeSet::new();
    key_forms(&cluster.repo_state(0), &mut keys);
    assert_no_keys_in_logs(&cluster.logs, &keys);
}

/// What the load test saw of the agent process.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct ProcessPeak {
    pub(crate) rss_kib: u64,
    pub(crate) fds: usize,
}

pub(crate) fn process_now(pid: u32) -> ProcessPeak {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    ProcessPeak { rss_kib, fds }
}

/// One rotation through the admin CLI, timed.
pub(crate) fn timed_rotation(cluster: &Cluster) -> Duration {
    let started = std::time::Instant::now();
    tokio::task::block_in_place(|| cluster.rotate_ok());
    started.elapsed()
}

/// 2,000 concurrent connections without a client certificate (half idle TCP,
/// half TLS handshakes without a certificate) and 200 health `Watch` streams
/// from a certificate with the wrong identity, all against one agent and
/// reconnecting as soon as they are dropped: rotations keep completing in
/// their usual time, and the agent's memory and descriptors stay bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_strangers_does_not_take_the_agent_from_its_rotator() {
    const NO_CERT: usize = 2000;
    const WRONG_IDENTITY_STREAMS: usize = 200;
    const ROTATIONS: usize = 3;
    let mut cluster = Cluster::start(&["RegionOne"], agent_identity).await;
    cluster.converged("initial distribution").await;
    let agent_addr = cluster.agents[0].addr;
    let pid = cluster.agent(0).pid();
    let idle = process_now(pid);

    let usual: Vec<Duration> = (0..ROTATIONS).map(|_| timed_rotation(&cluster)).collect();
    let usual_max = usual.iter().max().copied().unwrap_or_default();

    let stop = Arc::new(AtomicBool::new(false));
    let opened = Arc::new(AtomicUsize::new(0));
    let watches_accepted = Arc::new(AtomicUsize::new(0));
    let watches_refused = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    let ca_pem = cluster.ca.cert_pem().to_string();
    let agent_name = agent_identity("RegionOne");
    for i in 0..NO_CERT {
        let (stop, opened) = (stop.clone(), opened.clone());
        let tls = client_tls(&ca_pem, None, &agent_name);
        tasks.spawn(async move {
            while !stop.load(Ordering::Acquire) {
                if i % 2 == 0 {
                    // Idle TCP: holds a handshake slot until it is dropped.
                    if let Ok(mut tcp) = tokio::net::TcpStream::connect(agent_addr).await {
                        opened.fetch_add(1, Ordering::Relaxed);
                        let mut buf = [0u8; 64];
                        let _ = tokio::time::timeout(
                            Duration::from_secs(10),
                            tokio::io::AsyncReadExt::read(&mut tcp, &mut buf),
                        )
                        .await;
                    }
                } else {
                    opened.fetch_add(1, Ordering::Relaxed);
                    let _ = crate::common::daemon::connect(agent_addr, tls.clone()).await;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
    }
    let stranger = cluster.ca.issue(&["stranger.fernetd.test"]);
    for _ in 0..WRONG_IDENTITY_STREAMS / 20 {
        let tls = client_tls(&ca_pem, Some(&stranger), &agent_name);
        let channel = loop {
            if let Ok(channel) = crate::common::daemon::connect(agent_addr, tls.clone()).await {
                break channel;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        for _ in 0..20 {
            let (stop, accepted, refused) = (
                stop.clone(),
                watches_accepted.clone(),
                watches_refused.clone(),
            );
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
            tasks.spawn(async move {
                let mut held = Vec::new();
                while !stop.load(Ordering::Acquire) {
                    match health
                        .watch(tonic_health::pb::HealthCheckRequest::default())
                        .await
                    {
                        Ok(stream) => {
                            accepted.fetch_add(1, Ordering::Relaxed);
                            held.push(stream);
                        }
                        Err(_) => {
                            refused.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            });
        }
    }
    let peak = Arc::new(std::sync::Mutex::new(idle));
    let sampler = {
        let (stop, peak) = (stop.clone(), peak.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Acquire) {
                let now = process_now(pid);
                {
                    let mut p = peak.lock().expect("peak");
                    p.rss_kib = p.rss_kib.max(now.rss_kib);
                    p.fds = p.fds.max(now.fds);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    // Let the flood build up before rotating under it.
    poll_until(Duration::from_secs(30), "the flood is under way", || {
        let opened = opened.clone();
        async move { (opened.load(Ordering::Relaxed) >= NO_CERT).then_some(()) }
    })
    .await;
    let flooded: Vec<Duration> = (0..ROTATIONS).map(|_| timed_rotation(&cluster)).collect();
    stop.store(true, Ordering::Release);
    let _ = tokio::time::timeout(Duration::from_secs(30), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();
    let _ = sampler.await;
    let peak = *peak.lock().expect("peak");
    let flooded_max = flooded.iter().max().copied().unwrap_or_default();
    let limits = fernetd::tls::Limits::default();
    let fd_bound = idle.fds + limits.handshakes + limits.connections;
    let rss_bound_kib = idle.rss_kib + 128 * 1024;
    println!(
        "load: usual rotations {usual:?}, under flood {flooded:?}; connections opened {}; \
         wrong-identity watches refused {} accepted {}; agent idle {idle:?}, peak {peak:?}; \
         bounds: fds {fd_bound}, rss {rss_bound_kib} KiB",
        opened.load(Ordering::Relaxed),
        watches_refused.load(Ordering::Relaxed),
        watches_accepted.load(Ordering::Relaxed),
    );
    assert_eq!(
        watches_accepted.load(Ordering::Relaxed),
        0,
        "a wrong identity opened a Watch stream"
    );
    assert!(watches_refused.load(Ordering::Relaxed) >= WRONG_IDENTITY_STREAMS);
    assert!(
        flooded_max <= usual_max * 4 + Duration::from_secs(2),
        "rotations slowed from {usual_max:?} to {flooded_max:?} under the flood"
    );
    assert!(
        peak.fds <= fd_bound,
        "descriptors {} > {fd_bound}",
        peak.fds
    );
    assert!(
        peak.rss_kib <= rss_bound_kib,
        "memory {} KiB > {rss_bound_kib} KiB",
        peak.rss_kib
    );
}

/// A corrupt state file is the operator's to fix: exit 2 (which systemd does
/// not restart forever) with the file named, not 3.
#[test]
fn a_corrupt_state_exits_2_naming_the_file() {
    let cluster = Cluster::configure(&["RegionOne"], agent_identity, None);
    let config = cluster.rotator_config();
    std::fs::create_dir_all(&config.state_dir).expect("state dir");
    let state = config
        .state_dir
        .join(format!("{}.state", config.repositories[0].name));
    std::fs::write(&state, "fernetd-rotator-state 1\ngeneration x\n").expect("corrupt state");
    let stderr = cluster.refused_start();
    assert!(stderr.contains(&*state.to_string_lossy()), "{stderr}");
}
