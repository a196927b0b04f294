//! Faults one agent meets on its own disk and on its port, through the rotator
//! tests' cluster (real processes): the install fails with a clear error in
//! `admin status`, the repository Keystone reads stays whole, and the agent
//! recovers by itself once the fault is removed; bad gRPC input from the
//! network or from the rotator's own identity leaves it serving the rotator.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use fernetd::pb;
use fernetd::pb::distribution_client::DistributionClient;
use fernetd::repository::{self, KeySet};
use serde_json::Value;
use tonic::transport::Channel;

use crate::common::daemon::poll_until;
use crate::common::pki::{Leaf, client_tls};
use crate::rotator::{Cluster, agent_identity};

/// A tmpfs mounted for one test, unmounted when dropped.
struct Tmpfs {
    at: PathBuf,
}

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).expect("mount point");
        run(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ],
            at,
        );
        Tmpfs {
            at: at.to_path_buf(),
        }
    }
}

fn remount(at: &Path, mode: &str) {
    run("mount", &["-o", &format!("remount,{mode}")], at);
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.at).status();
    }
}

/// Runs a system command on `path` and fails loudly: these tests need root.
fn run(cmd: &str, args: &[&str], path: &Path) {
    let out = Command::new(cmd)
        .args(args)
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} {} (the disk-fault tests need root): {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The agent's row in `admin status`.
fn row(status: &Value, region: &str) -> Value {
    status["agents"]
        .as_array()
        .expect("agents")
        .iter()
        .find(|a| a["region"] == region)
        .cloned()
        .unwrap_or(Value::Null)
}

impl Cluster {
    /// Starts a rotation the faulty region cannot take; waits until `admin
    /// status` shows that region's install error saying one of `says`, and
    /// returns it. Where the fault took the repository itself, the agent may
    /// report it as drift first: then the safety rule blocks the rotation,
    /// naming the region, and the rotator pushes the current generation again.
    async fn failed_install(&self, region: &str, says: &[&str]) -> String {
        let (_, v) = self.rotate_with(&["--wait", "3"]);
        if v[0]["rotated"] == true {
            assert_eq!(
                v[0]["pending_regions"],
                serde_json::json!([region]),
                "{v:#}"
            );
        } else {
            let message = v[0]["message"].as_str().unwrap_or_default();
            assert!(message.contains(region), "{v:#}");
        }
        poll_until(Duration::from_secs(20), "the install error", || async {
            let (_, status) = self.status();
            let error = row(&status, region)["last_error"].as_str()?.to_owned();
            says.iter().any(|s| error.contains(s)).then_some(error)
        })
        .await
    }

    /// The rotator's certificate, to talk to an agent as the rotator does.
    fn rotator_leaf(&self) -> Leaf {
        let pki = self.dir.path().join("pki");
        let read = |name: &str| std::fs::read_to_string(pki.join(name)).expect("rotator PEM");
        Leaf {
            cert_pem: read("rotator.pem"),
            key_pem: read("rotator.key"),
        }
    }

    async fn as_rotator(&self, i: usize) -> Channel {
        let tls = client_tls(
            self.ca.cert_pem(),
            Some(&self.rotator_leaf()),
            &agent_identity(&self.agents[i].name),
        );
        crate::common::daemon::connect(self.agents[i].addr, tls)
            .await
            .expect("connect as the rotator")
    }
}

/// What Keystone would read, as long as it is a complete repository.
fn whole(repo: &Path) -> KeySet {
    let set = repository::load(repo).expect("the repository Keystone reads");
    assert!(
        set.staged().is_some() && set.len() >= 2,
        "incomplete: {:?}",
        set.indices()
    );
    set
}

/// Fills the file system under `dir` to the last byte.
fn fill(dir: &Path) {
    use std::io::Write as _;
    let mut ballast = std::fs::File::create(dir.join("ballast")).expect("ballast");
    let block = vec![0u8; 4096];
    while ballast.write_all(&block).is_ok() {}
    let _ = ballast.sync_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_faults_fail_clearly_keep_keystones_repository_whole_and_heal_by_themselves() {
    let cluster = Cluster::configure(&["RegionOne", "RegionTwo"], agent_identity, None);
    // RegionOne's repository lives on a small file system of its own.
    let parent = cluster.agents[0]
        .repo
        .parent()
        .expect("parent")
        .to_path_buf();
    let tmpfs = Tmpfs::mount(&parent, "256k");
    std::fs::create_dir_all(&cluster.agents[0].repo).expect("repository on the tmpfs");
    let mut cluster = cluster.launch().await;
    cluster.converged("initial distribution").await;
    let repo = cluster.agents[0].repo.clone();

    // (fault name, inject, remove, what the error must say)
    type Step = Box<dyn Fn()>;
    let away = parent.with_file_name("RegionTwo.away");
    let two = cluster.agents[1]
        .repo
        .parent()
        .expect("parent")
        .to_path_buf();
    let faults: Vec<(&str, usize, Step, Step, &[&str])> = vec![
        (
            "full file system",
            0,
            Box::new({
                let p = parent.clone();
                move || fill(&p)
            }),
            Box::new({
                let p = parent.clone();
                move || std::fs::remove_file(p.join("ballast")).expect("remove ballast")
            }),
            &["No space left on device"],
        ),
        (
            "read-only file system",
            0,
            Box::new({
                let p = parent.clone();
                move || remount(&p, "ro")
            }),
            Box::new({
                let p = parent.clone();
                move || remount(&p, "rw")
            }),
            &["Read-only file system"],
        ),
        (
            "repository replaced by a file",
            0,
            Box::new({
                let (r, a) = (repo.clone(), parent.join("keys.away"));
                move || {
                    std::fs::rename(&r, &a).expect("move the repository away");
                    std::fs::write(&r, b"not a directory\n").expect("a file in its place");
                }
            }),
            Box::new({
                let (r, a) = (repo.clone(), parent.join("keys.away"));
                move || {
                    std::fs::remove_file(&r).expect("remove the file");
                    std::fs::rename(&a, &r).expect("put the repository back");
                }
            }),
            &["not a directory"],
        ),
        (
            "parent directory removed",
            1,
            Box::new({
                let (t, a) = (two.clone(), away.clone());
                move || std::fs::rename(&t, &a).expect("remove the parent")
            }),
            Box::new({
                let (t, a) = (two.clone(), away.clone());
                move || std::fs::rename(&a, &t).expect("restore the parent")
            }),
            &["No such file or directory"],
        ),
    ];
    for (name, i, inject, remove, says) in &faults {
        let region = cluster.agents[*i].region.clone();
        let target = cluster.agents[*i].repo.clone();
        let before = whole(&target);
        inject();
        let error = cluster.failed_install(&region, says).await;
        println!("{name}: {region} reports: {error}");
        // Keystone's repository is untouched: still the previous set, whole
        // (or, where the fault took the directory itself, not recreated).
        if target.is_dir() {
            assert_eq!(whole(&target), before, "{name}: the repository changed");
        } else if !target.parent().is_some_and(Path::exists) {
            assert!(!target.exists(), "{name}: the agent recreated the parent");
        } else if target.exists() {
            assert_eq!(
                std::fs::read(&target).expect("the file"),
                b"not a directory\n",
                "{name}: the file in the repository's place was touched"
            );
        }
        remove();
        let started = Instant::now();
        let status = cluster.converged(&format!("recovery from {name}")).await;
        let digest = status["repositories"][0]["digest"]
            .as_str()
            .expect("digest")
            .to_owned();
        assert_eq!(whole(&target).digest().to_hex(), digest, "{name}");
        println!("{name}: recovered in {:.1?}", started.elapsed());
    }
    // The daemons stop before the file system goes, and it goes before the
    // temporary directory holding its mount point is removed.
    cluster.rotator().kill();
    for i in 0..cluster.agents.len() {
        cluster.agent(i).kill();
    }
    drop(tmpfs);
    drop(cluster);
}

/// One `Install` call with `body` as the raw HTTP/2 request body (gRPC's
/// 5-byte frame header and whatever follows), from the rotator's identity:
/// the gRPC status code the agent answers, `None` if it answered none.
async fn raw_install(channel: Channel, body: Vec<u8>) -> Option<i32> {
    use http_body_util::BodyExt as _;
    use tower::ServiceExt as _;
    let request = http::Request::builder()
        .method("POST")
        .uri("https://agent/fernetd.v1.Distribution/Install")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(tonic::body::Body::new(http_body_util::Full::new(
            tonic::codegen::Bytes::from(body),
        )))
        .expect("request");
    let response = tokio::time::timeout(Duration::from_secs(10), channel.oneshot(request))
        .await
        .ok()?
        .ok()?;
    let code =
        |h: &http::HeaderMap| -> Option<i32> { h.get("grpc-status")?.to_str().ok()?.parse().ok() };
    if let Some(c) = code(response.headers()) {
        return Some(c);
    }
    let body = tokio::time::timeout(Duration::from_secs(10), response.into_body().collect())
        .await
        .ok()?
        .ok()?;
    code(body.trailers()?)
}

/// A gRPC frame: uncompressed, with `len` as the length it claims.
fn frame(len: usize, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0];
    out.extend_from_slice(&u32::try_from(len).expect("length").to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// A well-formed push of `set` as `generation`, canaries included.
fn install_request(set: &KeySet, generation: u64) -> pb::InstallRequest {
    let canaries = [set.primary_index(), Some(0)]
        .into_iter()
        .flatten()
        .map(|i| pb::Canary {
            token: fernetd::token::canary(set.get(i).expect("key")),
            key_index: i,
        })
        .collect();
    pb::InstallRequest {
        repository: "tokens".into(),
        generation,
        keys: fernetd::agent::check::to_wire(set),
        digest: set.digest().0.to_vec(),
        canaries,
        ..Default::default()
    }
}

/// The agent answers the rotator's `GetState` promptly, and holds `digest`.
async fn responsive(channel: &Channel, digest: &str, after: &str) {
    let started = Instant::now();
    let state = tokio::time::timeout(
        Duration::from_secs(5),
        DistributionClient::new(channel.clone()).get_state(pb::GetStateRequest::default()),
    )
    .await
    .unwrap_or_else(|_| panic!("GetState hung after {after}"))
    .unwrap_or_else(|e| panic!("GetState failed after {after}: {e}"))
    .into_inner();
    assert_eq!(
        hex::encode(&state.repositories[0].digest),
        digest,
        "after {after}"
    );
    println!(
        "after {after}: GetState answered in {:.1?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_grpc_input_leaves_the_agent_serving_its_rotator() {
    use prost::Message as _;
    const FLOOD: usize = 2000;
    let mut cluster = Cluster::start(&["RegionOne"], agent_identity).await;
    let status = cluster.converged("initial distribution").await;
    let stale_generation = status["repositories"][0]["generation"]
        .as_u64()
        .expect("generation");
    let stale = whole(&cluster.agents[0].repo);
    let (_, digest) = cluster.rotate_ok();
    let channel = cluster.as_rotator(0).await;
    let max = fernetd::config::DEFAULT_MAX_MESSAGE_BYTES;
    let valid = install_request(&stale, stale_generation).encode_to_vec();
    let garbage: Vec<u8> = (0..4096).map(|_| rand::random::<u8>()).collect();

    // Each is refused with the gRPC status saying why, and changes nothing.
    use tonic::Code::{Internal, OutOfRange};
    let cases: Vec<(&str, Vec<u8>, tonic::Code)> = vec![
        ("a truncated frame header", vec![0, 0, 0], Internal),
        (
            "a frame shorter than it claims",
            frame(valid.len(), &valid[..valid.len() / 2]),
            Internal,
        ),
        (
            "a truncated message in a whole frame",
            frame(valid.len() / 2, &valid[..valid.len() / 2]),
            Internal,
        ),
        (
            "garbage as the message",
            frame(garbage.len(), &garbage),
            Internal,
        ),
        (
            "a compressed flag nobody negotiated",
            {
                let mut f = frame(valid.len(), &valid);
                f[0] = 1;
                f
            },
            Internal,
        ),
        (
            "a message over the size limit",
            frame(max + 1, &vec![0x0a; max + 1]),
            OutOfRange,
        ),
        (
            "a frame claiming 4 GiB",
            frame(u32::MAX as usize, &garbage),
            OutOfRange,
        ),
    ];
    for (name, body, expected) in cases {
        let code = raw_install(channel.clone(), body).await;
        println!("{name}: grpc-status {code:?}");
        assert_eq!(code, Some(expected as i32), "{name}");
        responsive(&channel, &digest, name).await;
    }

    // Garbage on the port, before any TLS.
    let addr = cluster.agents[0].addr;
    let mut junk = tokio::task::JoinSet::new();
    for _ in 0..100 {
        let garbage = garbage.clone();
        junk.spawn(async move {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            let Ok(mut tcp) = tokio::net::TcpStream::connect(addr).await else {
                return;
            };
            let _ = tcp.write_all(&garbage).await;
            let mut buf = [0u8; 256];
            let _ = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf)).await;
        });
    }
    while junk.join_next().await.is_some() {}
    responsive(&channel, &digest, "garbage on the port").await;

    // A flood of stale pushes from the rotator's own identity, while the
    // rotator rotates through the same agent.
    let refused = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut flood = tokio::task::JoinSet::new();
    for worker in 0..32 {
        let (channel, refused) = (channel.clone(), refused.clone());
        let request = install_request(&stale, stale_generation);
        flood.spawn(async move {
            let mut client = DistributionClient::new(channel);
            for _ in (worker..FLOOD).step_by(32) {
                match client.install(request.clone()).await {
                    Ok(r) => panic!("a stale generation was accepted: {:?}", r.into_inner()),
                    Err(status) => {
                        assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status}");
                        refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
        });
    }
    poll_until(Duration::from_secs(20), "the flood under way", || async {
        (refused.load(std::sync::atomic::Ordering::Relaxed) >= 100).then_some(())
    })
    .await;
    let started = Instant::now();
    let (_, digest) = tokio::task::block_in_place(|| cluster.rotate_ok());
    let during = started.elapsed();
    let by_then = refused.load(std::sync::atomic::Ordering::Relaxed);
    while let Some(done) = flood.join_next().await {
        done.expect("a flood worker");
    }
    let refused = refused.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "flood: {refused} stale pushes refused ({by_then} when a rotation under it ended, \
         after {during:.1?})"
    );
    assert_eq!(refused, FLOOD);
    assert!(
        during < Duration::from_secs(10),
        "a rotation took {during:?} under the flood"
    );
    responsive(&channel, &digest, "the flood").await;
    assert!(cluster.agent(0).try_exit().is_none(), "the agent exited");
    assert_eq!(whole(&cluster.agents[0].repo).digest().to_hex(), digest);
}
