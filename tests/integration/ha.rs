//! HA (`[ha]`): two real rotators, real agents and a real three-member etcd
//! cluster on loopback. The leader killed mid fan-out, stopped past its lease,
//! etcd unreachable, and a single rotator's file state imported: no generation
//! ever has two digests (etcd's history and every agent's stamp), no region
//! two generations behind another, no key in the clear in etcd or any log.
//!
//! The kill test runs 5 rounds in the normal suite; `FERNETD_HA_ROUNDS=20`
//! runs the 20 of the issue.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::Engine as _;
use fernetd::config::{HaConfig, RotatorConfig};
use rustix::process::Signal;
use serde_json::Value;

use crate::common::daemon::{Daemon, free_addr, poll_until};
use crate::common::etcd::Etcd;
use crate::rotator::{Cluster, Sampler, agent_identity, assert_no_keys_in_logs, key_forms};

const LEASE_TTL: Duration = Duration::from_secs(2);
const PREFIX: &str = "/fernetd";

struct Rotator {
    addr: SocketAddr,
    metrics: SocketAddr,
    config: PathBuf,
    /// An admin.toml naming this rotator alone, to ask it its role.
    admin: PathBuf,
    daemon: Option<Daemon>,
}

struct Ha {
    cluster: Cluster,
    etcd: Etcd,
    rotators: Vec<Rotator>,
    seal_text: String,
}

fn ha_config(etcd: &Etcd, seal_key: PathBuf) -> HaConfig {
    HaConfig {
        endpoints: etcd.endpoints(),
        ca: None,
        cert: None,
        key: None,
        prefix: PREFIX.into(),
        lease_ttl: LEASE_TTL,
        seal_key,
        advertise: None,
    }
}

impl Ha {
    /// Agents running, etcd running, two rotator configurations written and
    /// admin.toml naming both; no rotator started.
    async fn configure(cluster: Cluster, state_dirs: [Option<PathBuf>; 2]) -> Ha {
        let etcd = Etcd::start(cluster.dir.path()).await;
        let seal_text =
            base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>());
        let seal = cluster.dir.path().join("seal.key");
        std::fs::write(&seal, format!("{seal_text}\n")).expect("seal key");
        std::fs::set_permissions(&seal, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let base = cluster.rotator_config();
        let mut admin: fernetd::config::AdminConfig =
            fernetd::config::load(&cluster.admin_config).expect("admin.toml");
        let mut rotators = Vec::new();
        let mut endpoints = Vec::new();
        for (k, state_dir) in state_dirs.into_iter().enumerate() {
            let addr = free_addr();
            let metrics = free_addr();
            let config = RotatorConfig {
                listen: addr,
                metrics_listen: Some(metrics),
                state_dir: state_dir
                    .unwrap_or_else(|| cluster.dir.path().join(format!("ha-state-{k}"))),
                ha: Some(ha_config(&etcd, seal.clone())),
                ..base.clone()
            };
            let path = cluster.dir.path().join(format!("rotator-{k}.toml"));
            std::fs::write(&path, toml::to_string(&config).expect("toml")).expect("write");
            endpoints.push(format!("https://{addr}"));
            admin.rotator = format!("https://{addr}").into();
            let admin_path = cluster.dir.path().join(format!("admin-{k}.toml"));
            std::fs::write(&admin_path, toml::to_string(&admin).expect("toml")).expect("write");
            rotators.push(Rotator {
                addr,
                metrics,
                config: path,
                admin: admin_path,
                daemon: None,
            });
        }
        admin.rotator = fernetd::config::RotatorEndpoints(endpoints);
        std::fs::write(
            &cluster.admin_config,
            toml::to_string(&admin).expect("toml"),
        )
        .expect("write admin.toml");
        Ha {
            cluster,
            etcd,
            rotators,
            seal_text,
        }
    }

    async fn start(regions: &[&str]) -> Ha {
        let mut cluster = Cluster::configure(regions, agent_identity, None);
        for i in 0..cluster.agents.len() {
            cluster.start_agent(i).await;
        }
        let mut ha = Ha::configure(cluster, [None, None]).await;
        ha.start_rotator(0).await;
        ha.start_rotator(1).await;
        ha
    }

    /// Two regions and two rotators, the leader found, and one rotation
    /// committed everywhere: (the cluster, the leader, its generation and digest).
    async fn rotated_once() -> (Ha, usize, (u64, String)) {
        let ha = Ha::start(&["RegionOne", "RegionTwo"]).await;
        let leader = ha.leader_among(&[0, 1], Duration::from_secs(20)).await;
        ha.cluster.converged("initial distribution").await;
        let rotated = ha.cluster.rotate_ok();
        (ha, leader, rotated)
    }

    /// Starts rotator `k` on a port free now: a restart does not reuse the
    /// old port, which an outgoing connection may have taken meanwhile.
    async fn start_rotator(&mut self, k: usize) {
        self.start_rotator_with(k, &[]).await;
    }

    /// [`Ha::start_rotator`] with more command-line flags.
    async fn start_rotator_with(&mut self, k: usize, flags: &[&str]) {
        self.move_rotator(k);
        let r = &mut self.rotators[k];
        let mut args = vec!["rotator", "--config", r.config.to_str().expect("utf-8")];
        args.extend_from_slice(flags);
        let mut daemon = Daemon::spawn(&format!("ha-rotator-{k}"), args);
        self.cluster.logs.push(daemon.log_path().to_path_buf());
        let tls = crate::common::pki::client_tls(
            self.cluster.ca.cert_pem(),
            Some(&self.cluster.admin_leaf),
            crate::rotator::ROTATOR_ID,
        );
        daemon.wait_healthy(r.addr, tls, "fernetd.v1.Admin").await;
        r.daemon = Some(daemon);
    }

    /// Gives rotator `k` a new listening address, in its rotator.toml, its
    /// own admin.toml and the admin.toml naming every rotator.
    fn move_rotator(&mut self, k: usize) {
        let addr = free_addr();
        self.rotators[k].addr = addr;
        let mut config: RotatorConfig =
            fernetd::config::load(&self.rotators[k].config).expect("rotator.toml");
        config.listen = addr;
        std::fs::write(
            &self.rotators[k].config,
            toml::to_string(&config).expect("toml"),
        )
        .expect("write rotator.toml");
        let mut admin: fernetd::config::AdminConfig =
            fernetd::config::load(&self.rotators[k].admin).expect("admin.toml");
        admin.rotator = format!("https://{addr}").into();
        std::fs::write(
            &self.rotators[k].admin,
            toml::to_string(&admin).expect("toml"),
        )
        .expect("write admin.toml");
        admin.rotator = fernetd::config::RotatorEndpoints(
            self.rotators
                .iter()
                .map(|r| format!("https://{}", r.addr))
                .collect(),
        );
        std::fs::write(
            &self.cluster.admin_config,
            toml::to_string(&admin).expect("toml"),
        )
        .expect("write admin.toml");
    }

    /// Starts rotator `k` and expects it to refuse to start: its exit code
    /// and log.
    async fn refused(&mut self, k: usize) -> (Option<i32>, String) {
        let r = &self.rotators[k];
        let mut daemon = Daemon::spawn(
            &format!("ha-rotator-{k}-refused"),
            ["rotator", "--config", r.config.to_str().expect("utf-8")],
        );
        self.cluster.logs.push(daemon.log_path().to_path_buf());
        let status = daemon
            .wait_exit(Duration::from_secs(30))
            .await
            .unwrap_or_else(|| panic!("the rotator started: {}", daemon.log()));
        (status.code(), daemon.log())
    }

    fn daemon(&mut self, k: usize) -> &mut Daemon {
        self.rotators[k].daemon.as_mut().expect("rotator running")
    }

    /// `admin --json status` of rotator `k` alone.
    fn status_of(&self, k: usize) -> Option<Value> {
        let (_, out, _) = self
            .cluster
            .admin_with(&self.rotators[k].admin, &["--json", "status"]);
        serde_json::from_str(&out).ok()
    }

    fn role(&self, k: usize) -> Option<String> {
        self.status_of(k)
            .and_then(|s| s["ha"]["role"].as_str().map(str::to_owned))
    }

    /// Polls until exactly one rotator among `candidates` says it leads.
    async fn leader_among(&self, candidates: &[usize], timeout: Duration) -> usize {
        poll_until(timeout, "a leader", || async {
            let leaders: Vec<usize> = candidates
                .iter()
                .copied()
                .filter(|&k| self.role(k).as_deref() == Some("leader"))
                .collect();
            (leaders.len() == 1).then(|| leaders[0])
        })
        .await
    }

    fn metrics(&self, k: usize) -> String {
        use std::io::{Read as _, Write as _};
        let Ok(mut stream) = std::net::TcpStream::connect(self.rotators[k].metrics) else {
            return String::new();
        };
        let _ = stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: r\r\nConnection: close\r\n\r\n");
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response);
        response
    }

    /// Every value under the prefix, and the generation → digest history in
    /// etcd: the create-only `gen/` keys, and every revision of `current`.
    async fn etcd_history(&self) -> (BTreeMap<u64, String>, Vec<Vec<u8>>) {
        let mut client = self.etcd.client().await;
        let all = client
            .get(PREFIX, Some(etcd_client::GetOptions::new().with_prefix()))
            .await
            .expect("read etcd");
        let mut history = BTreeMap::new();
        let mut values = Vec::new();
        for kv in all.kvs() {
            values.push(kv.value().to_vec());
            let key = kv.key_str().expect("utf-8 key");
            if key.contains("/gen/") {
                let v: Value = serde_json::from_slice(kv.value()).expect("json");
                let g = v["generation"].as_u64().expect("generation");
                let d = v["digest"].as_str().expect("digest").to_owned();
                assert!(history.insert(g, d).is_none(), "generation {g} twice");
            }
        }
        // Every revision `current` ever had, from etcd's own history.
        let current = format!("{PREFIX}/repos/tokens/current");
        let revision = all.header().expect("header").revision();
        let mut seen = 0;
        let mut rev = revision;
        while rev > 0 {
            let got = client
                .get(
                    current.clone(),
                    Some(etcd_client::GetOptions::new().with_revision(rev)),
                )
                .await
                .expect("read a past revision");
            let Some(kv) = got.kvs().first() else { break };
            values.push(kv.value().to_vec());
            let v: Value = serde_json::from_slice(kv.value()).expect("json");
            let g = v["generation"].as_u64().expect("generation");
            let d = v["digest"].as_str().expect("digest");
            assert_eq!(
                history.get(&g).map(String::as_str),
                Some(d),
                "generation {g} with two digests in etcd's history"
            );
            seen += 1;
            rev = kv.mod_revision() - 1;
        }
        assert!(
            seen >= history.len(),
            "etcd history of `current` has {seen} revisions for {} generations",
            history.len()
        );
        (history, values)
    }

    /// No generation with two digests: etcd's history, and every agent's stamp.
    async fn check_history(&self, keys: &BTreeSet<String>) -> BTreeMap<u64, String> {
        let (history, values) = self.etcd_history().await;
        for i in 0..self.cluster.agents.len() {
            let stamp = fernetd::repository::read_stamp(&self.cluster.agents[i].repo)
                .expect("stamp")
                .expect("a stamp");
            assert_eq!(
                history.get(&stamp.generation),
                Some(&stamp.digest.to_hex()),
                "{} holds a generation etcd does not know, or another digest",
                self.cluster.agents[i].region
            );
        }
        // No key in the clear in any value etcd holds or held.
        for value in &values {
            let text = String::from_utf8_lossy(value);
            for key in keys {
                assert!(!text.contains(key.as_str()), "a key in the clear in etcd");
            }
            assert!(!text.contains(&self.seal_text), "the seal key in etcd");
        }
        history
    }

    /// The next rotation is accepted at `g + 1`, and generation `g` still has
    /// `digest` in etcd's history (checked as [`Ha::check_history`] does):
    /// the new generation, every key the agents hold, and that history.
    async fn rotate_after(
        &self,
        g: u64,
        digest: &str,
    ) -> (u64, BTreeSet<String>, BTreeMap<u64, String>) {
        let (g2, _) = self.cluster.rotate_ok();
        assert_eq!(g2, g + 1);
        let mut keys = BTreeSet::new();
        self.all_keys(&mut keys);
        let history = self.check_history(&keys).await;
        assert_eq!(history.get(&g).map(String::as_str), Some(digest));
        (g2, keys, history)
    }

    fn all_keys(&self, keys: &mut BTreeSet<String>) {
        for i in 0..self.cluster.agents.len() {
            key_forms(&self.cluster.repo_state(i), keys);
        }
    }
}

fn rounds() -> usize {
    std::env::var("FERNETD_HA_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_the_leader_killed_mid_fan_out_is_replaced_within_the_lease_and_forks_nothing() {
    let regions = [
        "RegionOne",
        "RegionTwo",
        "RegionThree",
        "RegionFour",
        "RegionFive",
    ];
    let mut ha = Ha::start(&regions).await;
    let leader = ha.leader_among(&[0, 1], Duration::from_secs(20)).await;
    let standby = 1 - leader;
    ha.cluster.converged("initial distribution").await;
    let mut keys = BTreeSet::new();

    // A standby answers reads from etcd and refuses mutations, naming the leader.
    let status = ha.status_of(standby).expect("standby status");
    assert_eq!(status["ha"]["role"], "standby", "{status:#}");
    assert_eq!(
        status["ha"]["leader"].as_str(),
        Some(format!("https://{}", ha.rotators[leader].addr).as_str()),
        "{status:#}"
    );
    assert_eq!(status["repositories"][0]["generation"].as_u64(), Some(1));
    let (code, out, _) = ha
        .cluster
        .admin_with(&ha.rotators[standby].admin, &["--json", "agents"]);
    assert_eq!(code, 0, "{out}");
    let (code, _, err) = ha
        .cluster
        .admin_with(&ha.rotators[standby].admin, &["rotate"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("not the leader; the leader is https://"),
        "{err}"
    );
    // admin.toml with both endpoints finds the leader.
    let (g, _) = ha.cluster.rotate_ok();
    assert_eq!(g, 2);

    let repos = ha.cluster.agents.iter().map(|a| a.repo.clone()).collect();
    let sampler = Sampler::start(repos);
    let mut committed: BTreeMap<u64, String> = BTreeMap::new();
    let mut takeovers = Vec::new();
    for round in 0..rounds() {
        let leader = ha.leader_among(&[0, 1], Duration::from_secs(20)).await;
        let (code, v) = ha.cluster.rotate_with(&["--no-wait"]);
        assert_eq!(code, 0, "round {round}: {v:#}");
        let g = v[0]["generation"].as_u64().expect("generation");
        let digest = v[0]["digest"].as_str().expect("digest").to_owned();
        assert!(
            committed.insert(g, digest).is_none(),
            "generation {g} twice"
        );
        // Killed in the middle of the fan-out.
        ha.daemon(leader).kill();
        let killed = Instant::now();
        let next = ha
            .leader_among(&[1 - leader], LEASE_TTL + Duration::from_secs(10))
            .await;
        let took = killed.elapsed();
        takeovers.push(took);
        ha.start_rotator(leader).await;
        let status = ha
            .cluster
            .converged(&format!("round {round}: after the takeover"))
            .await;
        assert_eq!(
            status["repositories"][0]["generation"].as_u64(),
            Some(g),
            "round {round}: {status:#}"
        );
        assert_eq!(ha.role(next).as_deref(), Some("leader"));
    }
    // Rotations continue.
    let (g, _) = ha.cluster.rotate_ok();
    assert_eq!(g, 2 + rounds() as u64 + 1);
    let (worst, samples, seen) = sampler.finish();
    keys.extend(seen);
    ha.all_keys(&mut keys);
    let history = ha.check_history(&keys).await;
    for (g, d) in &committed {
        assert_eq!(history.get(g), Some(d), "generation {g}");
    }
    let slowest = takeovers.iter().max().copied().unwrap_or_default();
    // The lease's TTL plus one fan-out (and the standby's polling).
    assert!(
        slowest <= LEASE_TTL + Duration::from_secs(5),
        "takeovers {takeovers:?}"
    );
    eprintln!(
        "ha: {} rounds, takeovers {takeovers:?}, worst region gap {worst}, {samples} samples",
        rounds()
    );
    keys.insert(ha.seal_text.clone());
    assert_no_keys_in_logs(&ha.cluster.logs, &keys);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_a_leader_stopped_past_its_lease_commits_nothing_and_steps_down() {
    let (mut ha, old, _) = Ha::rotated_once().await;
    ha.daemon(old).signal(Signal::STOP);
    let new = ha
        .leader_among(&[1 - old], LEASE_TTL + Duration::from_secs(10))
        .await;
    let (g, digest) = ha.cluster.rotate_ok();
    ha.daemon(old).signal(Signal::CONT);
    // The old leader wakes up believing it leads: its renewal finds the lease
    // gone, any write fails the fence; it steps down.
    poll_until(
        Duration::from_secs(10),
        "the old leader to step down",
        || async { (ha.role(old).as_deref() == Some("standby")).then_some(()) },
    )
    .await;
    assert_eq!(ha.role(new).as_deref(), Some("leader"));
    let log = ha.rotators[old].daemon.as_ref().expect("old").log();
    assert!(
        log.contains("stepping down"),
        "the old leader's log says why"
    );
    let (g2, keys, history) = ha.rotate_after(g, &digest).await;
    assert_eq!(
        history.keys().max(),
        Some(&g2),
        "nothing else was committed"
    );
    assert_no_keys_in_logs(&ha.cluster.logs, &keys);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_etcd_unreachable_stops_rotation_visibly_and_it_resumes() {
    let (ha, leader, (g, _)) = Ha::rotated_once().await;
    let before: Vec<_> = (0..2).map(|i| ha.cluster.repo_state(i)).collect();
    ha.etcd.signal_all(Signal::STOP);
    let status = poll_until(
        Duration::from_secs(15),
        "status to say etcd is unreachable",
        || async {
            let s = ha.status_of(leader)?;
            let detail = s["ha"]["detail"].as_str()?.to_owned();
            (detail.contains("etcd unreachable") && s["ha"]["role"] == "standby").then_some(s)
        },
    )
    .await;
    assert!(
        ha.metrics(leader)
            .contains("fernetd_rotator_ha_etcd_reachable 0"),
        "{status:#}"
    );
    assert!(ha.metrics(leader).contains("fernetd_rotator_ha_leader 0"));
    // What the alert rules and the dashboard name for HA (`monitoring::HA_ONLY`).
    let scrape = ha.metrics(leader);
    for name in crate::monitoring::HA_ONLY {
        assert!(
            scrape.contains(&format!("\n{name} ")),
            "{name} in\n{scrape}"
        );
    }
    let (code, _, err) = ha
        .cluster
        .admin_with(&ha.rotators[leader].admin, &["rotate"]);
    assert_ne!(code, 0, "no rotation without etcd: {err}");
    for (i, set) in before.iter().enumerate() {
        assert_eq!(&ha.cluster.repo_state(i), set, "agents untouched");
    }
    ha.etcd.signal_all(Signal::CONT);
    ha.etcd.wait_answering().await;
    ha.leader_among(&[0, 1], Duration::from_secs(20)).await;
    let (g2, _) = ha.cluster.rotate_ok();
    assert_eq!(g2, g + 1, "rotation resumed");
    let mut keys = BTreeSet::new();
    ha.all_keys(&mut keys);
    ha.check_history(&keys).await;
    assert_no_keys_in_logs(&ha.cluster.logs, &keys);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_a_single_rotators_file_state_is_imported_and_no_agent_reinstalls() {
    let mut cluster = Cluster::start(&["RegionOne", "RegionTwo"], agent_identity).await;
    cluster.converged("initial distribution").await;
    cluster.rotate_ok();
    let (g, digest) = cluster.rotate_ok();
    cluster.rotator().stop().await;
    let state_dir = cluster.rotator_config().state_dir;
    let installed: Vec<(u64, i64)> = (0..2)
        .map(|i| {
            let meta = std::fs::metadata(&cluster.agents[i].repo).expect("repository");
            (meta.ino(), meta.mtime_nsec())
        })
        .collect();
    let mut ha = Ha::configure(cluster, [Some(state_dir.clone()), None]).await;
    // The file state is in the clear: moving it into etcd, sealed, is asked for.
    let (code, log) = ha.refused(0).await;
    assert_eq!(code, Some(2), "{log}");
    assert!(log.contains("--adopt-clear-state"), "{log}");
    ha.start_rotator_with(0, &["--adopt-clear-state"]).await;
    ha.start_rotator(1).await;
    let status = ha.cluster.converged("the imported generation").await;
    assert_eq!(status["repositories"][0]["generation"].as_u64(), Some(g));
    assert_eq!(
        status["repositories"][0]["digest"].as_str(),
        Some(digest.as_str())
    );
    for (i, before) in installed.iter().enumerate() {
        let meta = std::fs::metadata(&ha.cluster.agents[i].repo).expect("repository");
        assert_eq!(
            (meta.ino(), meta.mtime_nsec()),
            *before,
            "an agent re-installed"
        );
    }
    // The file state left behind is sealed now.
    let file = std::fs::read_to_string(state_dir.join("tokens.state")).expect("state");
    assert!(file.starts_with("fernetd-rotator-state 2 sealed"), "{file}");
    let (_, keys, _) = ha.rotate_after(g, &digest).await;
    assert_no_keys_in_logs(&ha.cluster.logs, &keys);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_a_leader_whose_key_was_taken_commits_nothing_its_write_is_fenced() {
    let (ha, leader, (g, digest)) = Ha::rotated_once().await;
    // Another leader's key, as after this leader's lease expired unseen: its
    // own lease still renews, so only the fence can stop it.
    let mut client = ha.etcd.client().await;
    let key = format!("{PREFIX}/leader");
    client
        .put(
            key.clone(),
            r#"{"advertise":"https://impostor.invalid:7443","token":"00"}"#,
            None,
        )
        .await
        .expect("put the leader key");
    let (code, _, err) = ha
        .cluster
        .admin_with(&ha.rotators[leader].admin, &["rotate"]);
    assert_ne!(code, 0, "a fenced leader committed: {err}");
    assert!(err.contains("not the leader"), "{err}");
    poll_until(
        Duration::from_secs(10),
        "the fenced leader to step down",
        || async { (ha.role(leader).as_deref() == Some("standby")).then_some(()) },
    )
    .await;
    let status = ha.status_of(leader).expect("status");
    assert_eq!(
        status["ha"]["leader"].as_str(),
        Some("https://impostor.invalid:7443"),
        "{status:#}"
    );
    let mut keys = BTreeSet::new();
    ha.all_keys(&mut keys);
    let history = ha.check_history(&keys).await;
    assert_eq!(history.keys().max(), Some(&g), "nothing committed");
    assert_eq!(history.get(&g), Some(&digest));
    // The impostor goes; a real leader is elected and rotations continue.
    client
        .delete(key, None)
        .await
        .expect("delete the leader key");
    ha.leader_among(&[0, 1], Duration::from_secs(20)).await;
    let (g2, _) = ha.cluster.rotate_ok();
    assert_eq!(g2, g + 1);
    ha.all_keys(&mut keys);
    assert_no_keys_in_logs(&ha.cluster.logs, &keys);
}

/// A commit that lands in etcd but whose answer is lost (answers held for
/// less than the lease, so the leader keeps leading) is read back: the
/// rotation counts, and the leader's next commits continue from it instead
/// of reporting a fork forever.
#[tokio::test(flavor = "multi_thread")]
async fn ha_a_commit_whose_answer_is_lost_is_read_back_and_forks_nothing() {
    use crate::common::proxy::{Fault, Proxy};
    let mut cluster = Cluster::configure(&["RegionOne"], agent_identity, None);
    cluster.start_agent(0).await;
    let mut ha = Ha::configure(cluster, [None, None]).await;
    // Rotator 0 reaches every etcd member through a proxy of its own.
    let mut proxies = Vec::new();
    let mut endpoints = Vec::new();
    for endpoint in ha.etcd.endpoints() {
        let upstream: SocketAddr = endpoint
            .trim_start_matches("http://")
            .parse()
            .expect("etcd address");
        let proxy = Proxy::start(upstream).await;
        endpoints.push(format!("http://{}", proxy.addr()));
        proxies.push(proxy);
    }
    let path = ha.rotators[0].config.clone();
    let mut config: RotatorConfig = fernetd::config::load(&path).expect("rotator.toml");
    config.ha.as_mut().expect("[ha]").endpoints = endpoints;
    std::fs::write(&path, toml::to_string(&config).expect("toml")).expect("write");
    ha.start_rotator(0).await;
    ha.leader_among(&[0], Duration::from_secs(20)).await;
    ha.cluster.converged("initial distribution").await;
    let (g, _) = ha.cluster.rotate_ok();

    // Answers held for half the lease: the commit's request lands, its
    // answer times out (a third of the lease), the lease itself holds.
    for proxy in &proxies {
        proxy.set(Fault::Deaf);
    }
    let attempts = std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(LEASE_TTL / 2);
            for proxy in &proxies {
                proxy.set(Fault::Pass);
            }
        });
        // Each attempt: (exit code, its outcome when it answered, stderr).
        let mut attempts = Vec::new();
        for _ in 0..3 {
            let (code, out, err) = ha.cluster.admin(&["--json", "rotate", "--wait", "20"]);
            let outcome: Option<Value> = serde_json::from_str(&out).ok();
            let rotated = code == 0 && outcome.as_ref().is_some_and(|v| v[0]["rotated"] == true);
            attempts.push((code, outcome, err));
            if rotated {
                break;
            }
        }
        attempts
    });
    let Some((0, Some(last), _)) = attempts.last() else {
        panic!("three rotations after a lost answer all failed: {attempts:#?}");
    };
    assert_eq!(last[0]["rotated"], true, "{attempts:#?}");
    let committed = last[0]["generation"].as_u64().expect("generation");
    assert!(committed == g + 1 || committed == g + 2, "{attempts:#?}");
    ha.cluster
        .converged("the agents hold what etcd holds")
        .await;
    let mut keys = BTreeSet::new();
    ha.all_keys(&mut keys);
    let history = ha.check_history(&keys).await;
    assert_eq!(history.keys().max(), Some(&committed), "{history:?}");
    let (g2, _) = ha.cluster.rotate_ok();
    assert_eq!(g2, committed + 1);
    ha.all_keys(&mut keys);
    assert_no_keys_in_logs(&ha.cluster.logs, &keys);
}

/// Issue 31's etcd probes: an older `gen/<G>` copied into `current`, and a
/// ledger replaced by clear JSON (a `demoted_ms` moved into the past), are
/// refused by the next rotator to start; put back, the cluster rotates on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_an_older_generation_copied_into_current_or_a_clear_ledger_is_refused() {
    let (mut ha, _, (g, digest)) = Ha::rotated_once().await;
    for k in 0..2 {
        ha.daemon(k).stop().await;
    }
    let mut client = ha.etcd.client().await;
    let key = |suffix: &str| format!("{PREFIX}/repos/tokens/{suffix}");
    let value =
        |got: etcd_client::GetResponse| got.kvs().first().expect("a value").value().to_vec();
    let current = value(client.get(key("current"), None).await.expect("read"));
    let older = value(
        client
            .get(key(&format!("gen/{:020}", g - 1)), None)
            .await
            .expect("read"),
    );
    let ledger = value(client.get(key("ledger"), None).await.expect("read"));
    assert!(
        !String::from_utf8_lossy(&ledger).contains("demoted_ms"),
        "the ledger is in the clear"
    );
    // An older generation, sealed and valid on its own, put back as `current`.
    client
        .put(key("current"), older, None)
        .await
        .expect("write");
    let (code, log) = ha.refused(0).await;
    assert_eq!(code, Some(2), "{log}");
    assert!(
        log.contains(&format!(
            "holds generation {}, but generation {g} was committed",
            g - 1
        )),
        "{log}"
    );
    client
        .put(key("current"), current, None)
        .await
        .expect("write");
    // A clear ledger whose keys were demoted long ago.
    let clear = serde_json::json!({
        "keys": {"1": {"created_ms": 1, "promoted_ms": 1, "demoted_ms": 1}}
    });
    client
        .put(
            key("ledger"),
            serde_json::to_vec(&clear).expect("json"),
            None,
        )
        .await
        .expect("write");
    let (code, log) = ha.refused(1).await;
    assert_ne!(code, Some(0), "{log}");
    assert!(log.contains("not sealed"), "{log}");
    client
        .put(key("ledger"), ledger, None)
        .await
        .expect("write");
    ha.start_rotator(0).await;
    ha.start_rotator(1).await;
    ha.cluster.converged("the real state back").await;
    let (_, keys, _) = ha.rotate_after(g, &digest).await;
    assert_no_keys_in_logs(&ha.cluster.logs, &keys);
}

/// etcd values of the first format (keys bound to the repository's name only,
/// ledger and acknowledgements in clear JSON), as an earlier fernetd wrote
/// them, are still read, and the next commit rewrites each in the new binding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_values_of_the_first_format_load_and_are_rewritten_bound() {
    let (mut ha, _, (g, digest)) = Ha::rotated_once().await;
    for k in 0..2 {
        ha.daemon(k).stop().await;
    }
    let held = ha.cluster.repo_state(0);
    assert_eq!(held.digest().to_hex(), digest);
    let mut text =
        format!("fernetd-rotator-state 1\nrepository tokens\ngeneration {g}\ndigest {digest}\n");
    for (index, key) in held.iter() {
        text.push_str(&format!("key {index} {}\n", key.to_base64().as_str()));
    }
    let seal = base64::engine::general_purpose::STANDARD
        .decode(&ha.seal_text)
        .expect("seal key");
    let seal = fernetd::seal::SealKey::from_bytes(seal.try_into().expect("32 bytes"));
    let first = serde_json::json!({
        "generation": g,
        "digest": digest,
        "sealed": seal.seal("fernetd etcd: tokens", text.as_bytes()).expect("seal"),
    });
    let mut client = ha.etcd.client().await;
    let key = |suffix: &str| format!("{PREFIX}/repos/tokens/{suffix}");
    client
        .put(
            key("current"),
            serde_json::to_vec(&first).expect("json"),
            None,
        )
        .await
        .expect("write");
    client
        .put(key("ledger"), b"{\"keys\":{}}".to_vec(), None)
        .await
        .expect("write");
    client
        .put(format!("{PREFIX}/acks"), b"{}".to_vec(), None)
        .await
        .expect("write");
    ha.start_rotator(0).await;
    let status = ha.cluster.converged("the first format read").await;
    assert_eq!(status["repositories"][0]["generation"].as_u64(), Some(g));
    let (g2, keys, _) = ha.rotate_after(g, &digest).await;
    let read = |got: etcd_client::GetResponse| -> Value {
        serde_json::from_slice(got.kvs().first().expect("a value").value()).expect("json")
    };
    let current = read(client.get(key("current"), None).await.expect("read"));
    assert_eq!(
        (current["version"].as_u64(), current["generation"].as_u64()),
        (Some(2), Some(g2))
    );
    for value in [
        read(client.get(key("ledger"), None).await.expect("read")),
        read(
            client
                .get(format!("{PREFIX}/acks"), None)
                .await
                .expect("read"),
        ),
    ] {
        assert_eq!(value["version"].as_u64(), Some(2), "{value}");
        assert!(value["sealed"].is_string(), "{value}");
    }
    assert_no_keys_in_logs(&ha.cluster.logs, &keys);
}
