//! The readiness gate, with real processes: a controller restored from an old
//! repository keeps a Keystone stand-in waiting until its agent holds the
//! rotator's current generation; with the rotator down the stand-in starts
//! after the configured wait and the log says why; a confirmation from any
//! certificate but the rotator's opens nothing. The tests own the notify
//! socket and start the stand-in (`fernetd token validate` on the controller's
//! repository, a token of the current primary) only after `READY=1`, as
//! systemd starts a unit ordered `After=` a `Type=notify` one.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use fernetd::config::AgentConfig;
use fernetd::pb;
use fernetd::repository::{self, KeySet};

// The Keystone stand-in: `fernetd token validate` on the repository, exit 0
// when the token validates.
use crate::common::daemon::{connect, free_addr, poll_until};
use crate::common::pki::{Leaf, client_tls};
use crate::lifetimes::validate as stand_in;
use crate::rotator::{Cluster, ROTATOR_ID, agent_identity};

/// A socket the test owns, standing in for systemd's `$NOTIFY_SOCKET`; a
/// thread passes every datagram on.
struct NotifySocket {
    name: String,
    messages: mpsc::Receiver<String>,
    _dir: Option<tempfile::TempDir>,
}

impl NotifySocket {
    /// In the abstract namespace (`@...`), as systemd may pass it.
    fn abstract_name() -> NotifySocket {
        use std::os::linux::net::SocketAddrExt;
        let name = format!(
            "fernetd-test-notify-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        );
        let addr =
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("name");
        let socket = UnixDatagram::bind_addr(&addr).expect("bind the abstract notify socket");
        NotifySocket::listen(format!("@{name}"), socket, None)
    }

    /// A file-system socket, as `/run/systemd/notify`.
    fn path() -> NotifySocket {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        NotifySocket::listen(path.display().to_string(), socket, Some(dir))
    }

    fn listen(name: String, socket: UnixDatagram, dir: Option<tempfile::TempDir>) -> Self {
        let (tx, messages) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = socket.recv(&mut buf) {
                if tx
                    .send(String::from_utf8_lossy(&buf[..n]).into_owned())
                    .is_err()
                {
                    break;
                }
            }
        });
        NotifySocket {
            name,
            messages,
            _dir: dir,
        }
    }

    fn env(&self) -> Vec<(String, String)> {
        vec![("NOTIFY_SOCKET".into(), self.name.clone())]
    }

    /// Every datagram up to and including the first `READY=1`.
    fn until_ready(&self, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.messages.recv_timeout(left) {
                Ok(m) => {
                    let ready = m.lines().any(|l| l == "READY=1");
                    seen.push(m);
                    if ready {
                        return seen;
                    }
                }
                Err(_) => panic!("no READY=1 within {timeout:?}; received {seen:#?}"),
            }
        }
    }

    /// Whatever arrives within `wait`.
    fn drain(&self, wait: Duration) -> Vec<String> {
        let deadline = Instant::now() + wait;
        let mut seen = Vec::new();
        while let Ok(m) = self
            .messages
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            seen.push(m);
        }
        seen
    }
}

fn is_ready(message: &str) -> bool {
    message.lines().any(|l| l == "READY=1")
}

/// `fernetd agent --config CONFIG --ready [--require-current]`: (exit code, stdout).
fn probe(config: &Path, require_current: bool) -> (i32, String) {
    let mut cmd = Command::new(crate::common::fernetd_bin());
    cmd.args(["agent", "--config"]).arg(config).arg("--ready");
    if require_current {
        cmd.arg("--require-current");
    }
    let out = cmd.output().expect("run fernetd agent --ready");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Copies a repository whole (keys and stamp).
fn copy_repository(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("copy dir");
    for entry in std::fs::read_dir(from).expect("read repository") {
        let entry = entry.expect("entry");
        if entry.file_type().expect("type").is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
        }
    }
}

/// Puts the old copy in place of the repository, as a restore from backup.
fn restore(old: &Path, repo: &Path) {
    std::fs::remove_dir_all(repo).expect("remove the repository");
    copy_repository(old, repo);
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(repo, std::fs::Permissions::from_mode(0o700)).expect("chmod");
}

fn stamp_generation(repo: &Path) -> u64 {
    repository::read_stamp(repo)
        .expect("stamp readable")
        .expect("stamped")
        .generation
}

/// Rewrites agent `i`'s configuration with a readiness gate of `max_wait`, a
/// record and a metrics endpoint; returns the record's path.
fn gate(cluster: &Cluster, i: usize, max_wait: &str) -> PathBuf {
    let path = &cluster.agents[i].config;
    let mut config: AgentConfig = fernetd::config::load(path).expect("agent.toml");
    let record = cluster
        .dir
        .path()
        .join(format!("{}-ready.json", cluster.agents[i].name));
    config.readiness.max_wait = fernetd::config::duration::parse(max_wait).expect("duration");
    config.readiness.record = Some(record.clone());
    config.metrics = Some(free_addr());
    std::fs::write(path, toml::to_string(&config).expect("toml")).expect("write agent.toml");
    record
}

fn agent_metrics(cluster: &Cluster, i: usize) -> String {
    let config: AgentConfig = fernetd::config::load(&cluster.agents[i].config).expect("agent.toml");
    crate::rotator::get_metrics(config.metrics.expect("metrics address"))
}

/// Agent `i`'s `GetState` as `leaf` sees it, naming `current` as the
/// rotator's reconcile does.
async fn get_state(
    cluster: &Cluster,
    i: usize,
    leaf: &Leaf,
    current: Vec<pb::RepositoryGeneration>,
) -> Result<pb::GetStateResponse, tonic::Status> {
    let agent = &cluster.agents[i];
    let tls = client_tls(
        cluster.ca.cert_pem(),
        Some(leaf),
        &agent_identity(&agent.name),
    );
    let channel = connect(agent.addr, tls)
        .await
        .expect("connect to the agent");
    pb::distribution_client::DistributionClient::new(channel)
        .get_state(pb::GetStateRequest { current })
        .await
        .map(tonic::Response::into_inner)
}

/// Stops agent `i`, if running.
async fn stop_agent(cluster: &mut Cluster, i: usize) {
    if let Some(mut daemon) = cluster.agents[i].daemon.take() {
        daemon.stop().await;
    }
}

/// A two-region cluster rotated to some generation G, RegionOne's repository
/// copied at G-3 on the way: (the copy, G, a token of G's primary, a token of
/// the copy's primary).
async fn rotated_with_old_copy(cluster: &Cluster) -> (PathBuf, u64, String, String) {
    cluster.converged("the first generation everywhere").await;
    cluster.rotate_ok();
    let old = cluster.dir.path().join("regionone-backup");
    copy_repository(&cluster.agents[0].repo, &old);
    let mut g = 0;
    for _ in 0..3 {
        g = cluster.rotate_ok().0;
    }
    assert_eq!(stamp_generation(&old) + 3, g, "the copy is G-3");
    let primary = |set: &KeySet| fernetd::token::canary(set.primary().expect("a primary"));
    let current = primary(&repository::load(&cluster.agents[0].repo).expect("current set"));
    let previous = primary(&repository::load(&old).expect("old set"));
    (old, g, current, previous)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_controller_keeps_keystone_waiting_until_it_holds_the_current_generation() {
    let mut cluster = Cluster::start(&["RegionOne", "RegionTwo"], agent_identity).await;
    let (old, g, token, _) = rotated_with_old_copy(&cluster).await;
    let repo = cluster.agents[0].repo.clone();

    // The controller is rebuilt from a backup taken three rotations ago.
    stop_agent(&mut cluster, 0).await;
    restore(&old, &repo);
    assert_eq!(stamp_generation(&repo), g - 3);
    assert_eq!(
        stand_in(&repo, &token),
        1,
        "the restored set must not validate G's tokens, or this test shows nothing"
    );
    gate(&cluster, 0, "60s");
    let notify = NotifySocket::abstract_name();
    cluster.agents[0].env = notify.env();
    cluster.start_agent(0).await;

    let messages = notify.until_ready(Duration::from_secs(30));
    // The stand-in starts now, as systemd would start Keystone.
    let held_at_ready = stamp_generation(&repo);
    let validated = stand_in(&repo, &token);
    assert_eq!(
        held_at_ready, g,
        "READY=1 came while the controller held generation {held_at_ready}, not G={g}: {messages:#?}"
    );
    assert_eq!(
        validated, 0,
        "the stand-in under the gate rejects a token of G's primary"
    );
    assert!(
        messages[..messages.len() - 1]
            .iter()
            .any(|m| m.contains("STATUS=Waiting for the rotator")),
        "no waiting status before READY=1: {messages:#?}"
    );
    assert!(
        messages
            .last()
            .is_some_and(|m| m.contains("STATUS=Ready: current")),
        "{messages:#?}"
    );
    let config = cluster.agents[0].config.clone();
    let (code, out) = probe(&config, true);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ready (current)"), "{out}");
    let metrics = agent_metrics(&cluster, 0);
    assert!(
        metrics.contains("fernetd_agent_ready{reason=\"current\"} 1"),
        "{metrics}"
    );
    let log = cluster.agent(0).log();
    assert!(
        log.contains("ready: every repository holds the rotator's current generation"),
        "{log}"
    );

    // Restarted while it holds G: nothing to push, and the reconcile's
    // confirmation (the rotator's GetState naming G) opens the gate.
    stop_agent(&mut cluster, 0).await;
    let notify = NotifySocket::path();
    cluster.agents[0].env = notify.env();
    cluster.start_agent(0).await;
    notify.until_ready(Duration::from_secs(20));
    let log = cluster.agent(0).log();
    let line = log
        .lines()
        .find(|l| l.contains("the rotator confirmed this repository is current"))
        .unwrap_or_else(|| panic!("no confirmation logged: {log}"));
    assert!(line.contains("confirmation"), "{line}");
    assert!(
        !log.contains("re-push") && !line.contains("install"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_rotator_down_a_restored_controller_starts_keystone_after_the_wait_and_says_why() {
    let mut cluster = Cluster::start(&["RegionOne", "RegionTwo"], agent_identity).await;
    let (old, g, token, old_token) = rotated_with_old_copy(&cluster).await;
    let repo = cluster.agents[0].repo.clone();
    if let Some(mut rotator) = cluster.rotator.take() {
        rotator.stop().await;
    }
    stop_agent(&mut cluster, 0).await;
    restore(&old, &repo);
    let wait = Duration::from_secs(6);
    gate(&cluster, 0, "6s");
    let config = cluster.agents[0].config.clone();
    let notify = NotifySocket::path();
    cluster.agents[0].env = notify.env();
    let started = Instant::now();
    cluster.start_agent(0).await;

    let (code, out) = probe(&config, false);
    assert!(started.elapsed() < wait, "too slow to see the closed gate");
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("waiting for the rotator"), "{out}");
    let messages = notify.until_ready(Duration::from_secs(30));
    let waited = started.elapsed();
    assert!(waited >= wait, "READY=1 after {waited:?}, before max_wait");
    // The stand-in starts with the set the region holds.
    assert_eq!(
        stand_in(&repo, &old_token),
        0,
        "the stand-in rejects its own region's token"
    );
    assert_eq!(stand_in(&repo, &token), 1);
    assert!(
        messages
            .last()
            .is_some_and(|m| m.contains("without the rotator's confirmation")),
        "{messages:#?}"
    );
    let log = cluster.agent(0).log();
    assert!(
        log.contains("ready WITHOUT the rotator's confirmation: max_wait ran out"),
        "{log}"
    );
    assert!(
        log.contains(&format!("tokens holds generation {}", g - 3)),
        "{log}"
    );
    let (code, out) = probe(&config, false);
    assert_eq!((code, out.contains("ready (timeout)")), (0, true), "{out}");
    let (code, out) = probe(&config, true);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("max_wait ran out"), "{out}");
    let metrics = agent_metrics(&cluster, 0);
    assert!(
        metrics.contains("fernetd_agent_ready{reason=\"timeout\"} 1"),
        "{metrics}"
    );
    let state = get_state(&cluster, 0, &cluster.admin_leaf, Vec::new())
        .await
        .expect("GetState as a monitor");
    let tokens = &state.repositories[0];
    assert_eq!(
        (tokens.readiness.as_str(), tokens.confirmed),
        ("timeout", false)
    );

    // The rotator comes back: G is pushed, the gate says current, no second READY=1.
    cluster.start_rotator().await;
    poll_until(
        Duration::from_secs(30),
        "the gate to say current",
        || async { (probe(&config, true).0 == 0).then_some(()) },
    )
    .await;
    assert_eq!(stamp_generation(&repo), g);
    assert!(agent_metrics(&cluster, 0).contains("fernetd_agent_ready{reason=\"current\"} 1"));
    assert!(
        cluster
            .agent(0)
            .log()
            .contains("ready: the rotator is back and confirmed every repository current")
    );
    let later = notify.drain(Duration::from_millis(300));
    assert!(!later.iter().any(|m| is_ready(m)), "{later:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirmation_from_any_certificate_but_the_rotators_does_not_mark_a_controller_ready() {
    let mut cluster = Cluster::start(&["RegionOne"], agent_identity).await;
    cluster.converged("the first generation").await;
    let (g, digest) = cluster.rotate_ok();
    // No rotator: only the test's calls can confirm anything.
    if let Some(mut rotator) = cluster.rotator.take() {
        rotator.stop().await;
    }
    stop_agent(&mut cluster, 0).await;
    gate(&cluster, 0, "5m");
    let config = cluster.agents[0].config.clone();
    let notify = NotifySocket::path();
    cluster.agents[0].env = notify.env();
    cluster.start_agent(0).await;
    let current = |digest: &str| {
        vec![pb::RepositoryGeneration {
            name: "tokens".into(),
            generation: g,
            digest: hex::decode(digest).expect("hex"),
        }]
    };

    // A monitor may read the state, and names exactly what is on disk.
    let state = get_state(&cluster, 0, &cluster.admin_leaf, current(&digest))
        .await
        .expect("GetState as a monitor");
    assert_eq!(state.repositories[0].generation, g);
    assert_eq!(
        (
            state.repositories[0].readiness.as_str(),
            state.repositories[0].confirmed
        ),
        ("waiting", false)
    );
    // A certificate of the same CA with no role is refused outright.
    let stranger = cluster.ca.issue(&["stranger.fernetd.test"]);
    let refused = get_state(&cluster, 0, &stranger, current(&digest))
        .await
        .expect_err("a stranger's GetState");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused}");
    // The rotator's identity naming only another repository: said, not confirmed.
    let rotator = cluster.ca.issue(&[ROTATOR_ID]);
    let mut receipts = current(&digest);
    receipts[0].name = "receipts".into();
    let state = get_state(&cluster, 0, &rotator, receipts)
        .await
        .expect("GetState as the rotator");
    assert_eq!(state.repositories[0].readiness, "waiting");
    assert!(
        cluster
            .agent(0)
            .log()
            .contains("the rotator does not rotate this repository")
    );
    // The rotator's identity naming another digest confirms nothing either.
    let other = hex::encode([7u8; 32]);
    let state = get_state(&cluster, 0, &rotator, current(&other))
        .await
        .expect("GetState as the rotator");
    assert_eq!(state.repositories[0].readiness, "waiting");
    let seen = notify.drain(Duration::from_secs(1));
    assert!(!seen.iter().any(|m| is_ready(m)), "{seen:#?}");
    let (code, out) = probe(&config, false);
    assert_eq!(code, 1, "{out}");
    assert!(
        cluster
            .agent(0)
            .log()
            .contains("does not come from the rotator: not a confirmation")
    );

    // The rotator's identity naming what is on disk: ready.
    let state = get_state(&cluster, 0, &rotator, current(&digest))
        .await
        .expect("GetState as the rotator");
    assert_eq!(
        (
            state.repositories[0].readiness.as_str(),
            state.repositories[0].confirmed
        ),
        ("current", true)
    );
    notify.until_ready(Duration::from_secs(5));
    let (code, out) = probe(&config, true);
    assert_eq!(code, 0, "{out}");
}
