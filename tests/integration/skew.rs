//! Clock skew: the rotator and the agents run with clocks hours apart
//! (libfaketime preloaded into each real process, installed with apt-get when
//! missing). Rotations, acknowledgements, canaries and the key-lifetime ledger
//! must behave as with one clock: the rotator's clock alone decides when a key
//! is promoted and when it may be purged, and no agent judges a canary by its
//! own clock.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fernetd::pb;
use fernetd::pb::distribution_client::DistributionClient;
use fernetd::repository;

use crate::common::pki::client_tls;
use crate::rotator::{Cluster, agent_identity};

const HOUR: i64 = 3600;

/// Debian's libfaketime, installed when missing; panics when it cannot be.
fn libfaketime() -> PathBuf {
    let find = || {
        let out = std::process::Command::new("dpkg")
            .args(["-L", "libfaketime"])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.ends_with("/libfaketimeMT.so.1"))
            .map(PathBuf::from)
            .filter(|p| p.exists())
    };
    crate::common::debian::ensure("faketime", || find().is_some());
    find().expect("libfaketime is still missing after apt-get install faketime")
}

/// The environment that runs a process `offset` seconds off the real clock.
/// The monotonic clock is left alone: only wall-clock time is skewed.
fn skewed(lib: &std::path::Path, offset: i64) -> Vec<(String, String)> {
    vec![
        ("LD_PRELOAD".into(), lib.display().to_string()),
        ("FAKETIME".into(), format!("{offset:+}s")),
        ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
        ("FAKETIME_NO_CACHE".into(), "1".into()),
    ]
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Asserts `seen` (Unix seconds, from a skewed process) is `offset` off now.
fn assert_offset(what: &str, seen: i64, offset: i64) {
    let off = seen - unix_now();
    assert!(
        (off - offset).abs() < 10 * 60,
        "{what}: {off} s off the real clock, expected about {offset} s: is the offset applied?"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clocks_hours_apart_change_nothing() {
    const ROTATIONS: usize = 10;
    let lib = libfaketime();
    let offsets = [3 * HOUR, -5 * HOUR, 0];
    let rotator_offset = HOUR;
    let mut cluster = Cluster::configure(
        &["RegionOne", "RegionTwo", "RegionThree"],
        agent_identity,
        None,
    );
    for (agent, offset) in cluster.agents.iter_mut().zip(offsets) {
        agent.env = skewed(&lib, offset);
    }
    cluster.rotator_env = skewed(&lib, rotator_offset);
    let cluster = cluster.launch().await;
    cluster.converged("initial distribution").await;

    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut keys = std::collections::BTreeSet::new();
    for _ in 0..ROTATIONS {
        let one = Instant::now();
        // Held while a purged key's tokens may be valid (1 s tokens, by the
        // rotator's clock): that wait must stay seconds, not hours.
        let (_, digest) = cluster.rotate_ok();
        slowest = slowest.max(one.elapsed());
        cluster.all_hold(&digest, "a rotation under skew", &mut keys);
    }
    let elapsed = started.elapsed();
    println!(
        "skew: rotator {rotator_offset:+} s, agents {offsets:?} s: {ROTATIONS} rotations in \
         {elapsed:.1?}, slowest {slowest:.1?}"
    );
    assert!(
        slowest < Duration::from_secs(10),
        "a rotation waited {slowest:?}: the ledger mixed clocks"
    );

    // Acknowledgements are aged by the rotator's clock only.
    let (code, status) = cluster.status();
    assert_eq!(code, 0, "{status:#}");
    for row in status["agents"].as_array().expect("agents") {
        assert_eq!(row["digest_match"], true, "{status:#}");
        let age = row["last_ack_age_ms"].as_i64().expect("ack age");
        assert!((0..60_000).contains(&age), "ack age {age} ms: {status:#}");
    }

    // Promotion times come from the rotator, identical in every region
    // whatever the region's own clock says.
    let stamps: Vec<repository::Stamp> = cluster
        .agents
        .iter()
        .map(|a| {
            repository::read_stamp(&a.repo)
                .expect("stamp")
                .expect("a stamp")
        })
        .collect();
    for s in &stamps[1..] {
        assert_eq!(s.promoted, stamps[0].promoted, "promotion times differ");
    }
    let latest = stamps[0]
        .promoted
        .values()
        .max()
        .copied()
        .expect("a promotion");
    assert_offset("the rotator's promotion time", latest, rotator_offset);

    // Each agent did run on its own clock: its last install is stamped by it.
    for (i, offset) in offsets.into_iter().enumerate() {
        let agent = &cluster.agents[i];
        let tls = client_tls(
            cluster.ca.cert_pem(),
            Some(&cluster.admin_leaf),
            &agent_identity(&agent.name),
        );
        let channel = crate::common::daemon::connect(agent.addr, tls)
            .await
            .expect("connect as a monitor");
        let state = DistributionClient::new(channel)
            .get_state(pb::GetStateRequest::default())
            .await
            .expect("GetState")
            .into_inner();
        let at = state.repositories[0].last_install_unix_ms / 1000;
        assert_offset(&format!("{}'s last install", agent.region), at, offset);
    }
}
