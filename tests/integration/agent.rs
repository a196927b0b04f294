//! Integration tests: the real `fernetd agent` over mTLS. Every refusal is
//! checked for its gRPC status and for the repository being byte-for-byte (and
//! inode-for-inode) untouched; installs are checked by reloading the repository
//! from disk; drift and certificate reload are observed from outside.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use fernetd::agent::check::to_wire;
use fernetd::config::{AgentConfig, AgentRepository, DriftPolicy};
use fernetd::pb;
use fernetd::pb::distribution_client::DistributionClient;
use fernetd::repository::{Key, KeySet};
use tonic::Code;
use tonic::transport::Channel;

use crate::common::daemon::{self, Daemon, free_addr, poll_until};
use crate::common::pki::{Ca, Leaf, TlsFiles, client_tls, write_file};

const ROTATOR: &str = "rotator.fernetd.test";
const AGENT: &str = "region-one.agent.fernetd.test";
/// A monitoring system's identity, configured as `monitor_identities`.
const MONITOR: &str = "monitor.fernetd.test";

/// The identities one test needs.
struct Pki {
    ca: Ca,
    agent: Leaf,
    rotator: Leaf,
    /// A second CA, trusted by nobody, issuing a certificate with the rotator's name.
    foreign: Leaf,
}

impl Pki {
    fn new() -> Pki {
        let ca = Ca::new("fernetd test CA");
        let other = Ca::new("another CA");
        Pki {
            agent: ca.issue(&[AGENT]),
            rotator: ca.issue(&[ROTATOR]),
            foreign: other.issue(&[ROTATOR]),
            ca,
        }
    }
}

/// A running agent with one repository, `tokens`, in its own temp dir.
struct Agent {
    dir: tempfile::TempDir,
    daemon: Daemon,
    addr: SocketAddr,
    metrics: SocketAddr,
    config_path: PathBuf,
    repo: PathBuf,
    ca_pem: String,
}

impl Agent {
    async fn start(pki: &Pki, drift: DriftPolicy) -> Agent {
        Agent::start_with(pki, |c| c.drift = drift).await
    }

    /// Starts an agent on a configuration made by [`config`] and then `edit`ed.
    async fn start_with(pki: &Pki, edit: impl FnOnce(&mut AgentConfig)) -> Agent {
        Agent::start_as(pki, edit, &[]).await
    }

    /// [`Agent::start_with`], the process started through `wrapper` (setpriv).
    async fn start_as(pki: &Pki, edit: impl FnOnce(&mut AgentConfig), wrapper: &[&str]) -> Agent {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = config(dir.path(), pki);
        edit(&mut config);
        let config_path = write_config(dir.path(), &config);
        let mut agent = Agent {
            daemon: Daemon::spawn_wrapped(
                "agent",
                wrapper,
                [
                    std::ffi::OsStr::new("agent"),
                    "--config".as_ref(),
                    config_path.as_os_str(),
                ],
                &[("FERNETD_TEST_SECRET".into(), "not for children".into())],
            ),
            addr: config.listen,
            metrics: config.metrics.expect("metrics address"),
            config_path,
            repo: config.repositories[0].path.clone(),
            ca_pem: pki.ca.cert_pem().to_string(),
            dir,
        };
        agent.wait_ready(&pki.rotator).await;
        agent
    }

    async fn wait_ready(&mut self, leaf: &Leaf) {
        let tls = client_tls(&self.ca_pem, Some(leaf), AGENT);
        self.daemon
            .wait_healthy(self.addr, tls, "fernetd.v1.Distribution")
            .await;
    }

    /// Restarts the process on the same configuration and repository.
    async fn restart(&mut self, pki: &Pki) {
        let status = self.daemon.stop().await;
        assert!(status.success(), "agent exited with {status} on SIGTERM");
        self.daemon = spawn_agent(&self.config_path);
        self.wait_ready(&pki.rotator).await;
    }

    async fn client(
        &self,
        leaf: Option<&Leaf>,
    ) -> Result<DistributionClient<Channel>, tonic::transport::Error> {
        let channel = daemon::connect(self.addr, client_tls(&self.ca_pem, leaf, AGENT)).await?;
        Ok(DistributionClient::new(channel))
    }

    async fn rotator(&self, pki: &Pki) -> DistributionClient<Channel> {
        self.client(Some(&pki.rotator))
            .await
            .expect("rotator connects")
    }

    /// One `Install` as the rotator.
    async fn install(&self, pki: &Pki, request: pb::InstallRequest) -> pb::InstallResponse {
        self.rotator(pki)
            .await
            .install(request)
            .await
            .expect("install")
            .into_inner()
    }

    async fn state(&self, pki: &Pki) -> pb::RepositoryState {
        let state = self
            .rotator(pki)
            .await
            .get_state(pb::GetStateRequest::default())
            .await
            .expect("GetState")
            .into_inner();
        assert_eq!(state.region, "region-one");
        assert_eq!(state.version, fernetd::VERSION);
        state
            .repositories
            .into_iter()
            .find(|r| r.name == "tokens")
            .expect("tokens state")
    }

    async fn metrics(&self) -> String {
        let mut stream = tokio::net::TcpStream::connect(self.metrics)
            .await
            .expect("connect metrics");
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .expect("request metrics");
        let mut body = String::new();
        stream
            .read_to_string(&mut body)
            .await
            .expect("read metrics");
        body
    }
}

/// A working configuration under `dir`: TLS files, an empty 0700 repository,
/// loopback ports free now.
fn config(dir: &Path, pki: &Pki) -> AgentConfig {
    let tls = TlsFiles::write(&dir.join("tls"), "agent", &pki.ca, &pki.agent);
    let repo = dir.join("keystone/fernet-keys");
    std::fs::create_dir_all(&repo).expect("create repository");
    std::fs::set_permissions(&repo, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    AgentConfig {
        region: "region-one".into(),
        listen: free_addr(),
        metrics: Some(free_addr()),
        rotator_identity: ROTATOR.into(),
        monitor_identities: vec![MONITOR.into()],
        drift: DriftPolicy::Report,
        drift_check: Duration::from_secs(60),
        max_message_bytes: fernetd::config::DEFAULT_MAX_MESSAGE_BYTES,
        request_timeout: fernetd::config::DEFAULT_REQUEST_TIMEOUT,
        first_request_timeout: fernetd::config::DEFAULT_FIRST_REQUEST_TIMEOUT,
        log_format: None,
        tls: tls.to_config(),
        repositories: vec![AgentRepository {
            name: "tokens".into(),
            path: repo,
            owner: None,
        }],
        keystone_conf: None,
        audit_log: None,
        credential: None,
        readiness: Default::default(),
    }
}

/// Writes `agent.toml` from the type, as `fernetd demo` does.
fn write_config(dir: &Path, config: &AgentConfig) -> PathBuf {
    let path = dir.join("agent.toml");
    write_file(
        &path,
        &toml::to_string(config).expect("serialize agent.toml"),
    );
    path
}

fn spawn_agent(config: &Path) -> Daemon {
    Daemon::spawn(
        "agent",
        [
            std::ffi::OsStr::new("agent"),
            "--config".as_ref(),
            config.as_os_str(),
        ],
    )
}

/// Every entry of the repository with its bytes and mode, and the directory's
/// inode: a refused install that swapped in an identical copy still shows.
fn snapshot(repo: &Path) -> (u64, BTreeMap<String, (u32, Vec<u8>)>) {
    let meta = std::fs::metadata(repo).expect("repository metadata");
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(repo).expect("read repository") {
        let entry = entry.expect("entry");
        let meta = entry.metadata().expect("metadata");
        files.insert(
            entry.file_name().to_string_lossy().into_owned(),
            (
                meta.mode(),
                std::fs::read(entry.path()).expect("read entry"),
            ),
        );
    }
    (meta.ino(), files)
}

fn new_set(indices: impl IntoIterator<Item = u32>) -> KeySet {
    KeySet::from_keys(indices.into_iter().map(|i| (i, Key::generate())))
}

/// Keystone's rotation of `set`, with the same rules as the rotator.
fn rotated(set: &KeySet, max_active: usize) -> KeySet {
    let mut next = set.clone();
    let primary = set.primary_index().expect("primary");
    let staged = next.remove(0).expect("staged");
    next.insert(primary + 1, staged);
    next.insert(0, Key::generate());
    while next.len() > max_active {
        let lowest = next
            .indices()
            .into_iter()
            .find(|i| *i != 0)
            .expect("secondary");
        next.remove(lowest);
    }
    next
}

/// Canaries minted with the set's primary and staged keys, as the rotator sends.
fn canaries(set: &KeySet) -> Vec<pb::Canary> {
    [set.primary_index().expect("primary"), 0]
        .into_iter()
        .map(|i| pb::Canary {
            token: fernetd::token::canary(set.get(i).expect("key")),
            key_index: i,
        })
        .collect()
}

fn request(set: &KeySet, generation: u64) -> pb::InstallRequest {
    pb::InstallRequest {
        repository: "tokens".into(),
        generation,
        keys: to_wire(set),
        digest: set.digest().0.to_vec(),
        canaries: canaries(set),
        restore: false,
        promoted_unix: Default::default(),
        emergency_purge: false,
    }
}

fn assert_on_disk(repo: &Path, set: &KeySet) {
    let loaded = fernetd::repository::load(repo).expect("reload repository");
    assert_eq!(
        loaded.digest(),
        set.digest(),
        "on-disk keys differ from the installed set"
    );
}

/// The log must not contain any key, in any encoding the agent could print.
fn assert_no_keys(log: &str, sets: &[&KeySet]) {
    for set in sets {
        for (index, key) in set.iter() {
            let b64 = key.to_base64();
            let hex = hex::encode(key.as_bytes());
            assert!(
                !log.contains(b64.as_str()),
                "key {index} appears (base64) in the log"
            );
            assert!(!log.contains(&hex), "key {index} appears (hex) in the log");
            assert!(
                !log.contains(&format!("{:?}", key.as_bytes())),
                "key {index} appears (bytes) in the log"
            );
        }
    }
}

fn code(result: Result<tonic::Response<pb::InstallResponse>, tonic::Status>) -> tonic::Status {
    match result {
        Ok(r) => panic!("install accepted: {:?}", r.into_inner()),
        Err(status) => status,
    }
}

#[tokio::test]
async fn install_proves_canaries_is_idempotent_and_survives_restart() {
    let pki = Pki::new();
    let mut agent = Agent::start(&pki, DriftPolicy::Report).await;
    let mut rotator = agent.rotator(&pki).await;

    let g1 = new_set([0, 1, 2]);
    let done = rotator
        .install(request(&g1, 1))
        .await
        .expect("install g1")
        .into_inner();
    assert_eq!(
        (done.generation, done.digest.as_slice()),
        (1, &g1.digest().0[..])
    );
    assert!(done.canaries_valid && !done.unchanged);
    assert_eq!(done.indices, vec![0, 1, 2]);
    assert_on_disk(&agent.repo, &g1);

    // The same push again, twice at once: cheap, acknowledged, nothing rewritten.
    let before = snapshot(&agent.repo);
    let (mut c1, mut c2) = (rotator.clone(), rotator.clone());
    let (a, b) = tokio::join!(c1.install(request(&g1, 1)), c2.install(request(&g1, 1)));
    for r in [a, b] {
        let r = r.expect("re-push").into_inner();
        assert!(r.unchanged && r.canaries_valid);
        assert_eq!(r.generation, 1);
    }
    assert_eq!(
        snapshot(&agent.repo),
        before,
        "an idempotent re-push rewrote the repository"
    );

    let g2 = rotated(&g1, 3);
    let done = rotator
        .install(request(&g2, 2))
        .await
        .expect("install g2")
        .into_inner();
    assert_eq!((done.generation, done.indices.clone()), (2, vec![0, 2, 3]));
    assert_on_disk(&agent.repo, &g2);

    let state = agent.state(&pki).await;
    assert_eq!(
        (state.generation, state.digest.as_slice()),
        (2, &g2.digest().0[..])
    );
    assert_eq!(state.indices, vec![0, 2, 3]);
    assert!(state.last_install_unix_ms > 0 && !state.drift && state.problem.is_empty());

    let metrics = agent.metrics().await;
    assert!(
        metrics.contains("fernetd_agent_generation{repository=\"tokens\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "fernetd_agent_installs_total{repository=\"tokens\",outcome=\"installed\"} 2"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "fernetd_agent_installs_total{repository=\"tokens\",outcome=\"unchanged\"} 2"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "fernetd_agent_canary_validations_total{repository=\"tokens\",outcome=\"ok\"}"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("fernetd_agent_install_duration_seconds_count{repository=\"tokens\"} 2"),
        "{metrics}"
    );

    // SIGTERM drains and exits 0; the restarted agent recovers generation and
    // digest from its stamp, so the rollback rule survives restarts.
    agent.restart(&pki).await;
    let state = agent.state(&pki).await;
    assert_eq!(
        (state.generation, state.digest.as_slice()),
        (2, &g2.digest().0[..])
    );
    let mut rotator = agent.rotator(&pki).await;
    let status = code(rotator.install(request(&g1, 1)).await);
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_on_disk(&agent.repo, &g2);
    // An explicit restore may roll back.
    let restore = pb::InstallRequest {
        restore: true,
        ..request(&g1, 1)
    };
    let done = rotator
        .install(restore)
        .await
        .expect("explicit restore")
        .into_inner();
    assert_eq!(done.generation, 1);
    assert_on_disk(&agent.repo, &g1);

    let status = agent.daemon.stop().await;
    assert!(status.success(), "agent exited with {status}");
    assert!(agent.daemon.log().contains("agent stopped"));
    assert_no_keys(&agent.daemon.log(), &[&g1, &g2]);
}

#[tokio::test]
async fn every_refusal_has_a_clear_status_and_leaves_the_repository_untouched() {
    let pki = Pki::new();
    let agent = Agent::start(&pki, DriftPolicy::Report).await;
    let mut rotator = agent.rotator(&pki).await;
    let g1 = new_set([0, 1, 2]);
    let g2 = rotated(&g1, 3);
    rotator.install(request(&g1, 1)).await.expect("install g1");
    rotator.install(request(&g2, 2)).await.expect("install g2");
    let installed = snapshot(&agent.repo);
    let g3 = rotated(&g2, 3);

    let mut cases: Vec<(&str, pb::InstallRequest, Code, &str)> = Vec::new();
    cases.push((
        "rollback",
        request(&g1, 1),
        Code::FailedPrecondition,
        "rollback refused",
    ));
    let fork = new_set([0, 2, 3]);
    cases.push((
        "fork",
        request(&fork, 2),
        Code::AlreadyExists,
        "fork refused",
    ));
    let mut short = request(&g3, 3);
    short.keys[1].material.truncate(16);
    cases.push(("short key", short, Code::InvalidArgument, "is 16 bytes"));
    let mut unstaged = request(&g3, 3);
    unstaged.keys.retain(|k| k.index != 0);
    let without_zero = KeySet::from_keys(
        g3.iter()
            .filter(|(i, _)| *i != 0)
            .map(|(i, k)| (i, k.clone())),
    );
    unstaged.digest = without_zero.digest().0.to_vec();
    unstaged.canaries.retain(|c| c.key_index != 0);
    cases.push((
        "missing staged key",
        unstaged,
        Code::InvalidArgument,
        "no staged key",
    ));
    let mut wrong_digest = request(&g3, 3);
    wrong_digest.digest = g2.digest().0.to_vec();
    cases.push((
        "wrong digest",
        wrong_digest,
        Code::InvalidArgument,
        "digest mismatch",
    ));
    let mut unknown = request(&g3, 3);
    unknown.repository = "receipts".into();
    cases.push(("unknown repository", unknown, Code::NotFound, "not managed"));
    let mut bad_canary = request(&g3, 3);
    bad_canary.canaries[0].token = fernetd::token::canary(&Key::generate());
    cases.push((
        "canary no key decrypts",
        bad_canary,
        Code::InvalidArgument,
        "does not decrypt",
    ));
    let mut misattributed = request(&g3, 3);
    misattributed.canaries[0].key_index = 3;
    cases.push((
        "canary decrypted by another key",
        misattributed,
        Code::InvalidArgument,
        "decrypted by key",
    ));
    let mut oversized = request(&g3, 3);
    oversized.canaries.push(pb::Canary {
        token: "g".repeat(80 * 1024),
        key_index: 0,
    });
    cases.push((
        "oversized message",
        oversized,
        Code::OutOfRange,
        "too large",
    ));

    for (what, req, expected, words) in cases {
        let status = code(rotator.install(req).await);
        assert_eq!(status.code(), expected, "{what}: {status:?}");
        assert!(
            status.message().contains(words),
            "{what}: {:?} lacks {words:?}",
            status.message()
        );
        assert_eq!(
            snapshot(&agent.repo),
            installed,
            "{what} changed the repository"
        );
    }

    // A valid certificate of this CA with the wrong identity: the agent's own.
    let mut impostor = agent
        .client(Some(&pki.agent))
        .await
        .expect("TLS accepts a valid certificate");
    let status = code(impostor.install(request(&g3, 3)).await);
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("not an allowed rotator identity"),
        "{}",
        status.message()
    );
    assert_eq!(
        snapshot(&agent.repo),
        installed,
        "wrong identity changed the repository"
    );

    // No client certificate, and a certificate from another CA: the handshake
    // itself fails, so no request ever reaches a handler.
    for (what, leaf) in [("no certificate", None), ("another CA", Some(&pki.foreign))] {
        let outcome = match agent.client(leaf).await {
            Err(e) => format!("connect refused: {e:?}"),
            Ok(mut client) => match client.install(request(&g3, 3)).await {
                Ok(_) => panic!("{what}: install accepted"),
                Err(status) => {
                    assert!(
                        matches!(
                            status.code(),
                            Code::Unavailable | Code::Unknown | Code::Cancelled
                        ),
                        "{what}: {status:?}"
                    );
                    format!("{status:?}")
                }
            },
        };
        assert!(!outcome.is_empty());
        assert_eq!(
            snapshot(&agent.repo),
            installed,
            "{what} changed the repository"
        );
    }

    // The agent says why it refused each handshake.
    for reason in ["peer sent no certificates", "UnknownIssuer"] {
        poll_until(Duration::from_secs(5), reason, || async {
            agent.daemon.log().contains(reason).then_some(())
        })
        .await;
    }

    let state = agent.state(&pki).await;
    assert_eq!(
        (state.generation, state.digest.as_slice()),
        (2, &g2.digest().0[..])
    );
    let metrics = agent.metrics().await;
    for reason in [
        "rollback",
        "fork",
        "malformed",
        "digest",
        "canary",
        "permission",
        "unknown_repository",
    ] {
        assert!(
            metrics.contains(&format!("outcome=\"{reason}\"")),
            "no {reason} refusal counted:\n{metrics}"
        );
    }
    // The agent is still fine: the next generation installs.
    rotator
        .install(request(&g3, 3))
        .await
        .expect("install g3 after the refusals");
    assert_on_disk(&agent.repo, &g3);
    assert_no_keys(&agent.daemon.log(), &[&g1, &g2, &g3, &fork]);
}

/// An agent with generation 1 installed.
async fn installed_agent(pki: &Pki, drift: DriftPolicy) -> (Agent, KeySet) {
    let agent = Agent::start(pki, drift).await;
    let g1 = new_set([0, 1, 2]);
    agent.install(pki, request(&g1, 1)).await;
    (agent, g1)
}

#[tokio::test]
async fn drift_is_reported_and_counted() {
    let pki = Pki::new();
    let (agent, g1) = installed_agent(&pki, DriftPolicy::Report).await;
    // Someone copies a key over by hand (the classic rsync of one node).
    write_file(&agent.repo.join("1"), Key::generate().to_base64().as_str());
    let state = poll_until(Duration::from_secs(10), "drift reported", || async {
        let s = agent.state(&pki).await;
        s.drift.then_some(s)
    })
    .await;
    assert!(
        state
            .drift_detail
            .contains("differs from installed generation 1"),
        "{}",
        state.drift_detail
    );
    assert_ne!(
        state.digest,
        g1.digest().0.to_vec(),
        "GetState must show the digest on disk"
    );
    let metrics = agent.metrics().await;
    assert!(
        metrics.contains("fernetd_agent_drift_events_total{repository=\"tokens\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("fernetd_agent_drift{repository=\"tokens\"} 1"),
        "{metrics}"
    );
    assert!(agent.daemon.log().contains("drift"), "drift not logged");
    // Policy "report" leaves the repository as the operator made it; the
    // rotator's re-push of the same generation repairs it.
    let done = agent.install(&pki, request(&g1, 1)).await;
    assert!(
        !done.unchanged,
        "a drifted repository must be re-installed, not called unchanged"
    );
    assert_on_disk(&agent.repo, &g1);
    assert!(!agent.state(&pki).await.drift);
}

#[tokio::test]
async fn drift_is_restored_under_the_restore_policy() {
    let pki = Pki::new();
    let (agent, g1) = installed_agent(&pki, DriftPolicy::Restore).await;
    std::fs::remove_file(agent.repo.join("2")).expect("delete the primary key");
    poll_until(Duration::from_secs(10), "repository restored", || async {
        let disk = fernetd::repository::load(&agent.repo).ok()?;
        (disk.digest() == g1.digest()).then_some(())
    })
    .await;
    poll_until(
        Duration::from_secs(10),
        "drift cleared in GetState",
        || async { (!agent.state(&pki).await.drift).then_some(()) },
    )
    .await;
    let metrics = agent.metrics().await;
    assert!(
        metrics.contains("fernetd_agent_drift_events_total{repository=\"tokens\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("outcome=\"restored\"} 1"), "{metrics}");
    assert!(agent.daemon.log().contains("drift restored"));
    assert_no_keys(&agent.daemon.log(), &[&g1]);
}

#[tokio::test]
async fn certificates_are_reloaded_without_restart() {
    let pki = Pki::new();
    let (agent, g1) = installed_agent(&pki, DriftPolicy::Report).await;
    let pid = agent.daemon.pid();

    // The operator moves the cloud to a new CA: new trust anchor, new agent
    // certificate, new rotator certificate, all files replaced in place.
    let ca2 = Ca::new("replacement CA");
    let agent2 = ca2.issue(&[AGENT]);
    let rotator2 = ca2.issue(&[ROTATOR]);
    let tls_dir = agent.dir.path().join("tls");
    TlsFiles::write(&tls_dir, "agent", &ca2, &agent2);

    let new_tls = || client_tls(ca2.cert_pem(), Some(&rotator2), AGENT);
    poll_until(Duration::from_secs(15), "the new CA accepted", || async {
        let channel = daemon::connect(agent.addr, new_tls()).await.ok()?;
        DistributionClient::new(channel)
            .get_state(pb::GetStateRequest::default())
            .await
            .ok()
    })
    .await;
    let g2 = rotated(&g1, 3);
    let channel = daemon::connect(agent.addr, new_tls())
        .await
        .expect("connect with the new CA");
    DistributionClient::new(channel)
        .install(request(&g2, 2))
        .await
        .expect("install through the reloaded certificates");
    assert_on_disk(&agent.repo, &g2);
    // The old rotator certificate is no longer trusted.
    let refused = match agent.client(Some(&pki.rotator)).await {
        Err(_) => true,
        Ok(mut c) => c.get_state(pb::GetStateRequest::default()).await.is_err(),
    };
    assert!(
        refused,
        "a certificate of the replaced CA is still accepted"
    );
    assert_eq!(agent.daemon.pid(), pid, "the agent restarted");
}

/// `systemctl reload` or logrotate's postrotate sends SIGHUP; an agent with no
/// `audit_log` has nothing to reopen, and must still live through it (it died
/// of it with exit 129, which `Restart=on-failure` leaves down).
#[tokio::test]
async fn sighup_is_a_reload_even_without_an_audit_log() {
    let pki = Pki::new();
    let (mut agent, g1) = installed_agent(&pki, DriftPolicy::Report).await;
    let pid = agent.daemon.pid();
    for _ in 0..3 {
        agent.daemon.signal(rustix::process::Signal::HUP);
    }
    poll_until(Duration::from_secs(10), "SIGHUP logged", || async {
        agent
            .daemon
            .log()
            .contains("SIGHUP: reload requested")
            .then_some(())
    })
    .await;
    assert_eq!(agent.daemon.try_exit(), None, "SIGHUP ended the agent");
    let g2 = rotated(&g1, 3);
    agent.install(&pki, request(&g2, 2)).await;
    assert_on_disk(&agent.repo, &g2);
    assert_eq!(agent.daemon.pid(), pid);
    let status = agent.daemon.stop().await;
    assert!(status.success(), "agent exited with {status} on SIGTERM");
}

fn mkfifo(path: &Path) {
    rustix::fs::mknodat(
        rustix::fs::CWD,
        path,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .expect("mkfifo");
}

/// The Keystone user owns the repository and can make any entry in it: a FIFO
/// at the stamp's name (it hung the agent at start, deaf to SIGTERM), a
/// malformed stamp or a directory named like our in-place temporaries (each
/// made it exit 3 at start). Each is drift now: the agent starts, reports it,
/// and the next install replaces it.
#[tokio::test]
async fn a_keystone_user_cannot_hang_or_stop_the_agent_at_start() {
    let pki = Pki::new();
    type Plant = fn(&Path);
    let plants: [(&str, Plant); 3] = [
        ("a FIFO stamp", |repo| mkfifo(&repo.join(".fernetd-stamp"))),
        ("a malformed stamp", |repo| {
            write_file(&repo.join(".fernetd-stamp"), "{\"generation\": \"many\"}")
        }),
        ("a directory named like a temporary", |repo| {
            std::fs::create_dir(repo.join(".fernetd-tmp-x")).expect("mkdir")
        }),
    ];
    for (what, plant) in plants {
        let mut agent = tokio::time::timeout(
            Duration::from_secs(60),
            Agent::start_with(&pki, |c| plant(&c.repositories[0].path)),
        )
        .await
        .unwrap_or_else(|_| panic!("the agent did not start with {what} in its repository"));
        if what.contains("stamp") {
            let state = agent.state(&pki).await;
            assert!(state.drift, "{what}: no drift reported");
            assert!(
                state.drift_detail.contains("stamp"),
                "{what}: {}",
                state.drift_detail
            );
        }
        let g1 = new_set([0, 1, 2]);
        let done = tokio::time::timeout(
            Duration::from_secs(20),
            agent.install(&pki, request(&g1, 1)),
        )
        .await
        .unwrap_or_else(|_| panic!("install hung with {what}"));
        assert_eq!(done.generation, 1, "{what}");
        assert_on_disk(&agent.repo, &g1);
        let status = agent.daemon.stop().await;
        assert!(status.success(), "{what}: exit {status} on SIGTERM");
    }
}

/// A FIFO swapped in at the stamp's name while the agent runs blocked the
/// drift check and, behind it, every install.
#[tokio::test]
async fn a_fifo_stamp_while_running_is_drift_and_blocks_nothing() {
    let pki = Pki::new();
    let (mut agent, g1) = installed_agent(&pki, DriftPolicy::Report).await;
    std::fs::remove_file(agent.repo.join(".fernetd-stamp")).expect("rm stamp");
    mkfifo(&agent.repo.join(".fernetd-stamp"));
    poll_until(Duration::from_secs(15), "drift reported", || async {
        let s = tokio::time::timeout(Duration::from_secs(5), agent.state(&pki))
            .await
            .ok()?;
        s.drift.then_some(())
    })
    .await;
    let g2 = rotated(&g1, 3);
    tokio::time::timeout(
        Duration::from_secs(20),
        agent.install(&pki, request(&g2, 2)),
    )
    .await
    .expect("install blocked by a FIFO stamp");
    assert_on_disk(&agent.repo, &g2);
    let status = agent.daemon.stop().await;
    assert!(status.success(), "exit {status} on SIGTERM");
}

/// A change to a working configuration.
type Edit = Box<dyn Fn(&mut AgentConfig)>;

#[tokio::test]
async fn configuration_errors_exit_2_before_touching_anything() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().expect("temp dir");
    let good = config(dir.path(), &pki);
    let not_a_key = dir.path().join("not-a-key.pem");
    write_file(&not_a_key, "this is no PEM\n");
    let missing = dir.path().join("tls/missing.pem");
    let orphan = dir.path().join("no-such-parent/fernet-keys");
    let under_a_file = not_a_key.join("fernet-keys");
    let cases: [(&str, Edit, &str); 7] = [
        (
            "missing certificate",
            Box::new(move |c| c.tls.cert = missing.clone()),
            "missing.pem",
        ),
        (
            "unparseable key",
            Box::new(move |c| c.tls.key = not_a_key.clone()),
            "not-a-key.pem",
        ),
        (
            "relative path",
            Box::new(|c| c.repositories[0].path = "keys".into()),
            "must be absolute",
        ),
        (
            "missing parent directory",
            Box::new(move |c| c.repositories[0].path = orphan.clone()),
            "no-such-parent/fernet-keys: its parent directory does not exist",
        ),
        (
            "parent is a file",
            Box::new(move |c| c.repositories[0].path = under_a_file.clone()),
            "not-a-key.pem/fernet-keys: its parent is not a directory",
        ),
        (
            "unknown owner",
            Box::new(|c| c.repositories[0].owner = Some("no-such-user-here:nogroup".into())),
            "no such user",
        ),
        (
            "no rotator identity",
            Box::new(|c| c.rotator_identity = " ".into()),
            "rotator_identity",
        ),
    ];
    for (what, edit, words) in cases {
        let mut config = good.clone();
        edit(&mut config);
        let mut daemon = spawn_agent(&write_config(dir.path(), &config));
        let status = daemon.wait_exit(daemon::STARTUP).await.expect("exits");
        assert_eq!(
            status.code(),
            Some(2),
            "{what}: {status}; log:\n{}",
            daemon.log()
        );
        assert!(
            daemon.log().contains(words),
            "{what}: log lacks {words:?}:\n{}",
            daemon.log()
        );
    }
    let path = write_config(dir.path(), &good);
    let text = std::fs::read_to_string(&path).expect("read config");
    write_file(&path, &format!("listen_on = \"x\"\n{text}"));
    let mut daemon = spawn_agent(&path);
    let status = daemon.wait_exit(daemon::STARTUP).await.expect("exits");
    assert_eq!(status.code(), Some(2), "unknown key: {status}");
    assert!(daemon.log().contains("listen_on"), "{}", daemon.log());
    assert!(
        !dir.path().join("no-such-parent").exists(),
        "a refused start created a missing parent"
    );
    let repo = &good.repositories[0].path;
    assert_eq!(
        std::fs::read_dir(repo).expect("repository").count(),
        0,
        "a refused start wrote into the repository"
    );
}

#[tokio::test]
async fn json_logs_when_the_configuration_asks() {
    let pki = Pki::new();
    let agent = Agent::start_with(&pki, |c| {
        c.log_format = Some(fernetd::config::LogFormat::Json)
    })
    .await;
    let g1 = new_set([0, 1, 2]);
    agent.install(&pki, request(&g1, 1)).await;
    let log = agent.daemon.log();
    let installed = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["fields"]["message"] == "installed")
        .unwrap_or_else(|| panic!("no JSON `installed` line in:\n{log}"));
    assert_eq!(installed["fields"]["generation"], 1);
    assert_eq!(installed["fields"]["repository"], "tokens");
    assert_no_keys(&log, &[&g1]);
}

#[tokio::test]
async fn repositories_are_managed_independently() {
    let pki = Pki::new();
    let agent = Agent::start_with(&pki, |c| {
        let receipts = c.repositories[0].path.with_file_name("fernet-receipts");
        c.repositories.push(AgentRepository {
            name: "receipts".into(),
            path: receipts,
            owner: None,
        });
    })
    .await;
    let receipts_path = agent.repo.with_file_name("fernet-receipts");
    let tokens = new_set([0, 1, 2]);
    let receipts = new_set([0, 7, 8]);
    agent.install(&pki, request(&tokens, 3)).await;
    let done = agent
        .install(
            &pki,
            pb::InstallRequest {
                repository: "receipts".into(),
                ..request(&receipts, 9)
            },
        )
        .await;
    assert_eq!((done.repository.as_str(), done.generation), ("receipts", 9));
    assert_on_disk(&agent.repo, &tokens);
    assert_on_disk(&receipts_path, &receipts);

    // Generation rules are per repository: generation 4 is new for tokens
    // even though receipts is at 9, and old for receipts.
    let next = rotated(&tokens, 3);
    agent.install(&pki, request(&next, 4)).await;
    let status = code(
        agent
            .rotator(&pki)
            .await
            .install(pb::InstallRequest {
                repository: "receipts".into(),
                ..request(&rotated(&receipts, 3), 4)
            })
            .await,
    );
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_on_disk(&receipts_path, &receipts);

    // Drift in one repository is not drift in the other.
    std::fs::remove_file(receipts_path.join("7")).expect("remove a receipts key");
    let states = poll_until(Duration::from_secs(10), "receipts drift", || async {
        let state = agent
            .rotator(&pki)
            .await
            .get_state(pb::GetStateRequest::default())
            .await
            .ok()?
            .into_inner();
        state
            .repositories
            .iter()
            .any(|r| r.name == "receipts" && r.drift)
            .then_some(state.repositories)
    })
    .await;
    let by_name: BTreeMap<_, _> = states.iter().map(|r| (r.name.as_str(), r)).collect();
    assert_eq!(by_name.len(), 2);
    assert!(!by_name["tokens"].drift);
    assert_eq!(by_name["tokens"].generation, 4);
    assert_eq!(by_name["receipts"].generation, 9);
    assert_no_keys(&agent.daemon.log(), &[&tokens, &next, &receipts]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_pushes_are_serialized_and_readers_never_see_a_mix() {
    let pki = Pki::new();
    let (agent, g1) = installed_agent(&pki, DriftPolicy::Report).await;
    // A chain of rotations, as the rotator makes them: each keeps the
    // previous primary (an agent refuses a next generation that does not).
    let sets: Vec<KeySet> = (0..10)
        .scan(g1.clone(), |previous, _| {
            *previous = rotated(previous, 4);
            Some(previous.clone())
        })
        .collect();
    let known: std::collections::HashSet<_> =
        sets.iter().chain([&g1]).map(|s| s.digest()).collect();

    // A reader doing what Keystone does on every request, for the whole storm.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (repo, stop, known) = (agent.repo.clone(), stop.clone(), known.clone());
        std::thread::spawn(move || {
            let mut reads = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let set =
                    fernetd::repository::load(&repo).expect("the repository is always readable");
                assert!(
                    known.contains(&set.digest()),
                    "a reader saw a set nobody pushed"
                );
                reads += 1;
            }
            reads
        })
    };
    // One connection per push, all connected before any is sent.
    let mut pushes = Vec::new();
    for (i, set) in sets.iter().enumerate() {
        let (mut client, req) = (agent.rotator(&pki).await, request(set, 2 + i as u64));
        pushes.push(async move { client.install(req).await });
    }
    let outcomes = futures_join_all(pushes).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let reads = reader.join().expect("reader");
    assert!(reads > 0);

    let mut installed = 0;
    for outcome in outcomes {
        match outcome {
            Ok(_) => installed += 1,
            Err(status) => assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}"),
        }
    }
    assert!(installed >= 1);
    // Whatever the order, the highest generation wins and nothing older follows it.
    assert_on_disk(&agent.repo, &sets[9]);
    assert_eq!(agent.state(&pki).await.generation, 11);
}

/// Awaits every future concurrently (tokio has no `join_all`).
async fn futures_join_all<F: std::future::Future + Send + 'static>(
    futures: Vec<F>,
) -> Vec<F::Output>
where
    F::Output: Send,
{
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for handle in handles {
        out.push(handle.await.expect("task"));
    }
    out
}

/// Log lines of the tracing events on this thread, for in-process runs.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Captured {
    fn text(&self) -> String {
        let bytes = self.0.lock().unwrap_or_else(|p| p.into_inner());
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut bytes = self.0.lock().unwrap_or_else(|p| p.into_inner());
        bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `agent::run` returns only once its drift watch is gone, so a repository
/// removed right after (as `fernetd demo` removes its temporary directory) is
/// never checked or reported, even by a check woken just before the stop.
/// In-process on a current-thread runtime, so the agent's tasks log to this
/// thread's subscriber.
#[tokio::test]
async fn no_drift_is_reported_after_run_returns() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = config(dir.path(), &pki);
    config.metrics = None;
    let repo = config.repositories[0].path.clone();
    let set = new_set([0, 1, 2]);
    let stamp = fernetd::repository::Stamp {
        generation: 1,
        digest: set.digest(),
        promoted: Default::default(),
        agent: true,
    };
    fernetd::install::install(&repo, &set, Some(&stamp), None).expect("install generation 1");
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .expect("bind");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let checked = fernetd::agent::check(config).expect("valid agent configuration");
    let agent = tokio::spawn(fernetd::agent::run(checked, listener, None, async {
        let _ = stopped.await;
    }));
    poll_until(Duration::from_secs(10), "agent serving", || async {
        logs.text().contains("agent serving").then_some(())
    })
    .await;
    // A change next to the repository wakes its check, which waits for the
    // burst to settle (100 ms): the stop arrives during that wait.
    write_file(&repo.with_file_name("unrelated"), "x");
    tokio::time::sleep(Duration::from_millis(30)).await;
    stop.send(()).expect("agent still running");
    agent.await.expect("join").expect("agent run");
    std::fs::remove_dir_all(&repo).expect("remove the repository");
    // Absence cannot be polled for: give a surviving check well over its
    // 100 ms settle delay to report.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let text = logs.text();
    assert!(text.contains("agent stopped"), "{text}");
    assert!(
        !text.contains(" WARN ") && !text.contains("drift:"),
        "drift reported after run returned:\n{text}"
    );
}

/// Only the rotator and the configured monitors may read the agent (GetState,
/// health Check and Watch); only the rotator may install; and a refused peer
/// is refused for who it is before its request body is decoded, whatever its size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_rotator_and_monitors_may_read_and_refusal_precedes_decoding() {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let pki = Pki::new();
    let agent = Agent::start(&pki, DriftPolicy::Report).await;
    let monitor = pki.ca.issue(&[MONITOR]);
    let stranger = pki.ca.issue(&["stranger.fernetd.test"]);
    let g1 = new_set([0, 1, 2]);

    let mut as_monitor = agent.client(Some(&monitor)).await.expect("connect");
    as_monitor
        .get_state(pb::GetStateRequest::default())
        .await
        .expect("a monitor reads the state");
    let status = code(as_monitor.install(request(&g1, 1)).await);
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    let mut as_stranger = agent.client(Some(&stranger)).await.expect("connect");
    let status = as_stranger
        .get_state(pb::GetStateRequest::default())
        .await
        .expect_err("a stranger reads nothing");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let channel = daemon::connect(
        agent.addr,
        client_tls(&agent.ca_pem, Some(&stranger), AGENT),
    )
    .await
    .expect("connect");
    let mut health = HealthClient::new(channel);
    let status = health
        .check(HealthCheckRequest::default())
        .await
        .expect_err("no health check for a stranger");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let status = health
        .watch(HealthCheckRequest::default())
        .await
        .expect_err("no health watch for a stranger");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    // Larger than the agent would decode: refused for its sender, not its size.
    let huge = pb::InstallRequest {
        canaries: vec![pb::Canary {
            token: "x".repeat(2 * fernetd::config::DEFAULT_MAX_MESSAGE_BYTES),
            key_index: 0,
        }],
        ..request(&g1, 1)
    };
    let status = code(as_stranger.install(huge).await);
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(
        agent.state(&pki).await.generation,
        0,
        "nothing was installed"
    );
}

/// A TLS connection to the agent as `leaf` that sends nothing at all.
async fn silent_connection(
    addr: SocketAddr,
    files: fernetd::config::TlsConfig,
) -> Option<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    use tower::Service as _;
    let mut connector = fernetd::tls::ClientTls::load_once(&files)
        .expect("client TLS")
        .connector(AGENT)
        .expect("connector");
    let uri: http::Uri = format!("http://{addr}").parse().expect("uri");
    connector.call(uri).await.ok().map(|io| io.into_inner())
}

/// Whether the server closed `conn` within `within` (EOF or an error).
async fn closed_within(
    conn: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    within: Duration,
) -> bool {
    use tokio::io::AsyncReadExt as _;
    let mut buf = [0u8; 256];
    tokio::time::timeout(within, async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                // HTTP/2 SETTINGS from the server: keep reading.
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// Any certificate of the CA completes a handshake; 256 connections that then
/// said nothing held every slot (the rotator locked out of the region) for as
/// long as the peer liked. Now a connection without an admitted request is
/// closed after `first_request_timeout`, and the rotator has slots of its own.
#[tokio::test]
async fn silent_peers_are_closed_and_never_lock_the_rotator_out() {
    const SILENT: usize = 300;
    let pki = Pki::new();
    let agent = Agent::start_with(&pki, |c| c.first_request_timeout = Duration::from_secs(6)).await;
    let stranger = pki.ca.issue(&["stranger.fernetd.test"]);
    let files = TlsFiles::write(
        &agent.dir.path().join("stranger"),
        "stranger",
        &pki.ca,
        &stranger,
    )
    .to_config();
    let mut silent = Vec::new();
    // In batches: the agent takes 64 handshakes at once.
    while silent.len() < SILENT {
        let batch = futures_join_all(
            (0..32)
                .map(|_| silent_connection(agent.addr, files.clone()))
                .collect::<Vec<_>>(),
        )
        .await;
        silent.extend(batch.into_iter().flatten());
    }
    // Every shared slot is taken (or refused beyond): the rotator still installs.
    let g1 = new_set([0, 1, 2]);
    let started = std::time::Instant::now();
    let done = tokio::time::timeout(
        Duration::from_secs(10),
        agent.install(&pki, request(&g1, 1)),
    )
    .await
    .expect("install as the rotator timed out");
    assert_eq!(done.generation, 1);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the rotator waited {:?} for a slot",
        started.elapsed()
    );
    // And every silent connection is closed by the agent soon after the bound.
    let closed = futures_join_all(
        silent
            .into_iter()
            .map(|mut conn| async move { closed_within(&mut conn, Duration::from_secs(10)).await })
            .collect(),
    )
    .await;
    let open = closed.iter().filter(|c| !**c).count();
    assert_eq!(open, 0, "{open} of {SILENT} silent connections still open");
    assert!(
        agent
            .daemon
            .log()
            .contains("no request within the first-request timeout")
    );
}

/// Stand-ins for Keystone's tools beside each other in `dir` (the agent runs
/// the `python3` beside `keystone-manage` for the row check): each records
/// its capabilities and environment in `dir/out`, checks what it can read and
/// write in the credential repository, and the migrate sleeps `sleep`.
fn stand_in_tools(dir: &Path, repository: &Path, sleep: Duration) -> PathBuf {
    let out = dir.join("out");
    std::fs::create_dir_all(&out).expect("mkdir out");
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o777)).expect("chmod out");
    let record = |tool: &str| {
        format!(
            "grep ^Cap /proc/$$/status > {out}/{tool}.caps\n\
             env > {out}/{tool}.env\n\
             if cat {repo}/0 > /dev/null 2>&1; then echo read > {out}/{tool}.read; fi\n\
             if touch {repo}/.probe 2> /dev/null; then echo wrote > {out}/{tool}.write; rm -f {repo}/.probe; fi\n",
            out = out.display(),
            repo = repository.display(),
        )
    };
    let manage = dir.join("keystone-manage");
    std::fs::write(
        &manage,
        format!(
            "#!/bin/sh\n{}sleep {}\nexit 0\n",
            record("migrate"),
            sleep.as_secs()
        ),
    )
    .expect("write keystone-manage");
    std::fs::write(
        dir.join("python3"),
        format!(
            "#!/bin/sh\n{}echo '{{\"total\": 2, \"primary\": 2, \"other\": 0, \"null\": 0, \"undecryptable\": 0}}'\n",
            record("check")
        ),
    )
    .expect("write python3");
    for tool in ["keystone-manage", "python3"] {
        std::fs::set_permissions(dir.join(tool), std::fs::Permissions::from_mode(0o755))
            .expect("chmod tool");
    }
    manage
}

/// An agent managing `tokens` and `credential`, with a keystone.conf naming
/// both and stand-in tools (see [`stand_in_tools`]); `wrapper` starts it.
async fn credential_agent(
    pki: &Pki,
    sleep: Duration,
    edit: impl FnOnce(&mut AgentConfig),
    wrapper: &[&str],
) -> (Agent, tempfile::TempDir, KeySet) {
    let tools = tempfile::tempdir().expect("tools dir");
    std::fs::set_permissions(tools.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let agent = Agent::start_as(
        pki,
        |c| {
            let base = c.repositories[0]
                .path
                .parent()
                .expect("parent")
                .to_path_buf();
            let credential = base.join("credential-keys");
            std::fs::create_dir_all(&credential).expect("mkdir credential");
            std::fs::set_permissions(&credential, std::fs::Permissions::from_mode(0o700))
                .expect("chmod credential");
            // Keystone's files, not the agent's (root stands in for keystone).
            c.repositories.push(AgentRepository {
                name: "credential".into(),
                path: credential.clone(),
                owner: Some("0:0".into()),
            });
            let conf = base.join("keystone.conf");
            write_file(
                &conf,
                &format!(
                    "[fernet_tokens]\nkey_repository = {}\n[credential]\nkey_repository = {}\n",
                    c.repositories[0].path.display(),
                    credential.display()
                ),
            );
            c.keystone_conf = Some(conf);
            c.credential = Some(fernetd::config::AgentCredentialConfig {
                keystone_manage: stand_in_tools(tools.path(), &credential, sleep),
                run_timeout: fernetd::config::DEFAULT_CREDENTIAL_RUN_TIMEOUT,
            });
            edit(c);
        },
        wrapper,
    )
    .await;
    let set = new_set([0, 1, 2]);
    let mut install = request(&set, 1);
    install.repository = "credential".into();
    agent.install(pki, install).await;
    (agent, tools, set)
}

async fn migrate(
    agent: &Agent,
    pki: &Pki,
    set: &KeySet,
) -> Result<pb::MigrateCredentialsResponse, tonic::Status> {
    agent
        .rotator(pki)
        .await
        .migrate_credentials(pb::MigrateCredentialsRequest {
            repository: "credential".into(),
            generation: 1,
            digest: set.digest().0.to_vec(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// A large credential table takes longer to migrate than an install may take:
/// the agent's request timeout killed the migrate (and its child) at 60 s.
/// Scaled down here: installs must answer within 2 s, the migrate takes 4 s
/// and completes under its own bound, `[credential] run_timeout`.
#[tokio::test]
async fn a_migrate_runs_to_its_own_bound_not_the_request_timeout() {
    let pki = Pki::new();
    let (agent, _tools, set) = credential_agent(
        &pki,
        Duration::from_secs(4),
        |c| {
            c.request_timeout = Duration::from_secs(2);
            if let Some(cred) = &mut c.credential {
                cred.run_timeout = Duration::from_secs(10);
            }
        },
        &[],
    )
    .await;
    let started = std::time::Instant::now();
    let answer = migrate(&agent, &pki, &set)
        .await
        .expect("the migrate was cut short");
    assert!(answer.passed, "{}", answer.reason);
    assert!(started.elapsed() >= Duration::from_secs(4));
    // Its own bound still holds: a run longer than run_timeout is stopped.
    drop(agent);
    let (agent, _tools, set) = credential_agent(
        &pki,
        Duration::from_secs(30),
        |c| {
            if let Some(cred) = &mut c.credential {
                cred.run_timeout = Duration::from_secs(2);
            }
        },
        &[],
    )
    .await;
    let answer = migrate(&agent, &pki, &set).await.expect("an answer");
    assert!(!answer.passed);
    assert!(
        answer.reason.contains("did not finish within 2s"),
        "{}",
        answer.reason
    );
}

/// Keystone's tools run as the agent's children: under the unit the agent
/// holds CAP_CHOWN, CAP_FOWNER, CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH as
/// ambient capabilities, which every child inherited. Run here as the unit
/// runs it (a non-root user with those ambient capabilities, through
/// setpriv): each child has only CAP_DAC_READ_SEARCH (it reads the
/// Keystone-owned key files, it cannot write them) and none of the agent's
/// environment.
#[tokio::test]
async fn credential_tools_run_with_only_dac_read_search_and_a_minimal_environment() {
    let caps = "+chown,+fowner,+dac_override,+dac_read_search";
    let inh = format!("--inh-caps={caps}");
    let amb = format!("--ambient-caps={caps}");
    let bounding = format!("--bounding-set=-all,{caps}");
    let wrapper = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        inh.as_str(),
        amb.as_str(),
        bounding.as_str(),
        "--",
    ];
    let pki = Pki::new();
    let (agent, tools, set) = credential_agent(&pki, Duration::ZERO, |_| {}, &wrapper).await;
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.daemon.pid()))
        .expect("agent status");
    assert!(status.contains("Uid:\t65534"), "{status}");
    assert!(status.contains("CapAmb:\t000000000000000f"), "{status}");
    let answer = migrate(&agent, &pki, &set).await.expect("migrate");
    assert!(answer.passed, "{}", answer.reason);
    let out = tools.path().join("out");
    for tool in ["check", "migrate"] {
        let caps = std::fs::read_to_string(out.join(format!("{tool}.caps"))).expect("caps");
        for set in ["CapEff", "CapPrm", "CapAmb", "CapInh"] {
            assert!(
                caps.contains(&format!("{set}:\t0000000000000004")),
                "{tool}: {set} is not CAP_DAC_READ_SEARCH alone:\n{caps}"
            );
        }
        assert!(
            out.join(format!("{tool}.read")).exists(),
            "{tool} could not read the keystone-owned key file"
        );
        assert!(
            !out.join(format!("{tool}.write")).exists(),
            "{tool} could write into the key repository"
        );
        let env = std::fs::read_to_string(out.join(format!("{tool}.env"))).expect("env");
        assert!(
            !env.contains("FERNETD"),
            "{tool} got the agent's environment:\n{env}"
        );
        assert!(env.contains("PYTHONWARNINGS=ignore"), "{env}");
    }
}

/// Continuity: an agent holding generation G accepted any G+1 from the
/// rotator's identity, even one sharing no key with G (a re-initialised or
/// impostor rotator would wipe every token of the region). G+1 must keep G's
/// primary unless it is marked an emergency purge; a set further ahead is a
/// catch-up install and is not blocked by this rule.
#[tokio::test]
async fn a_next_generation_must_keep_the_primary_unless_an_emergency_purge() {
    let pki = Pki::new();
    let (agent, g1) = installed_agent(&pki, DriftPolicy::Report).await;
    let before = snapshot(&agent.repo);

    // A G+1 that shares nothing with G: refused, nothing touched.
    let stranger = new_set([0, 1, 2]);
    let status = code(
        agent
            .rotator(&pki)
            .await
            .install(request(&stranger, 2))
            .await,
    );
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("continuity refused"),
        "{}",
        status.message()
    );
    assert!(status.message().contains("key 2"), "{}", status.message());
    assert_eq!(
        snapshot(&agent.repo),
        before,
        "a refused install touched the repository"
    );
    assert!(
        agent.metrics().await.contains("outcome=\"discontinuity\""),
        "the refusal is not counted"
    );

    // G+1 that drops only G's primary (what purge-key does to a compromised
    // primary), not marked: refused; marked an emergency purge: installed.
    let mut purged = g1.clone();
    let staged = purged.remove(0).expect("staged");
    purged.remove(2);
    purged.insert(3, staged);
    purged.insert(0, Key::generate());
    let status = code(agent.rotator(&pki).await.install(request(&purged, 2)).await);
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let emergency = pb::InstallRequest {
        emergency_purge: true,
        ..request(&purged, 2)
    };
    assert_eq!(agent.install(&pki, emergency).await.generation, 2);
    assert_on_disk(&agent.repo, &purged);

    // An ordinary rotation keeps the primary: installed.
    let g3 = rotated(&purged, 3);
    assert_eq!(agent.install(&pki, request(&g3, 3)).await.generation, 3);

    // Back from an outage: the rotator is at G+3 now, a set that shares no
    // key with what this agent holds. A catch-up, not blocked.
    let g6 = new_set([0, 7, 8]);
    assert_eq!(agent.install(&pki, request(&g6, 6)).await.generation, 6);
    assert_on_disk(&agent.repo, &g6);
    // And after a restart (the installed set read back from disk) the rule holds.
    let mut agent = agent;
    agent.restart(&pki).await;
    let status = code(
        agent
            .rotator(&pki)
            .await
            .install(request(&new_set([0, 1, 2]), 7))
            .await,
    );
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
}
