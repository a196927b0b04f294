//! Enrolment by reload: the rotator re-reads its `[[agents]]` on SIGHUP while
//! rotations run. An added region converges, a removed one stops counting and
//! its connection closes, every other connection stays the same TCP
//! connection (no new handshake), and a reload with an invalid configuration
//! changes nothing. Real `fernetd` processes.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use rustix::process::Signal;
use serde_json::Value;

use crate::common::daemon::poll_until;
use crate::rotator::{Cluster, agent_identity, assert_no_keys_in_logs};

/// The local ports of the established TCP connections to `addr` on this host:
/// the rotator's connections to an agent (nothing else here dials agents).
fn connections_to(addr: SocketAddr) -> BTreeSet<u16> {
    let SocketAddr::V4(v4) = addr else {
        panic!("agents listen on IPv4 loopback");
    };
    let want = format!(
        "{:08X}:{:04X}",
        u32::from_le_bytes(v4.ip().octets()),
        v4.port()
    );
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // local, remote, state (01 = ESTABLISHED)
            (fields.len() > 3 && fields[2] == want && fields[3] == "01")
                .then(|| u16::from_str_radix(fields[1].rsplit(':').next()?, 16).ok())
                .flatten()
        })
        .collect()
}

/// Names of the agents `status` lists.
fn enrolled(status: &Value) -> BTreeSet<String> {
    status["agents"]
        .as_array()
        .expect("agents")
        .iter()
        .map(|a| a["name"].as_str().expect("name").to_owned())
        .collect()
}

/// Rotates through `fernetd admin` until `stop`, as an operator's cron would;
/// returns each answer's (exit code, outcome).
fn rotate_until(
    admin_config: PathBuf,
    stop: Arc<AtomicBool>,
    rotated: Arc<AtomicUsize>,
) -> std::thread::JoinHandle<Vec<Value>> {
    std::thread::spawn(move || {
        let mut outcomes = Vec::new();
        while !stop.load(Ordering::Acquire) {
            let out = std::process::Command::new(crate::common::fernetd_bin())
                .arg("admin")
                .arg("--config")
                .arg(&admin_config)
                .args(["--json", "rotate", "--wait", "5"])
                .output()
                .expect("run fernetd admin rotate");
            let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
            if v[0]["rotated"] == true {
                rotated.fetch_add(1, Ordering::AcqRel);
            }
            outcomes.push(v[0].clone());
            std::thread::sleep(Duration::from_millis(200));
        }
        outcomes
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_added_and_removed_by_sighup_while_rotations_run_keep_the_others_connected() {
    let cluster = Cluster::configure(
        &["RegionOne", "RegionTwo", "RegionThree", "RegionFour"],
        agent_identity,
        None,
    );
    // RegionFour's agent runs from the start, but the rotator does not know it yet.
    let mut config = cluster.rotator_config();
    let four = config.agents.pop().expect("RegionFour");
    let audit = cluster.dir.path().join("rotator-audit.log");
    config.audit_log = Some(audit.clone());
    cluster.write_rotator_config(&config);
    let mut cluster = cluster.launch().await;
    let status = cluster.converged("three regions at generation 1").await;
    assert_eq!(
        enrolled(&status),
        BTreeSet::from(["RegionOne".into(), "RegionTwo".into(), "RegionThree".into()])
    );
    let addr = |cluster: &Cluster, i: usize| cluster.agents[i].addr;
    let kept: Vec<(SocketAddr, BTreeSet<u16>)> = [0, 1]
        .iter()
        .map(|&i| (addr(&cluster, i), connections_to(addr(&cluster, i))))
        .collect();
    for (a, ports) in &kept {
        assert_eq!(ports.len(), 1, "one connection to {a}: {ports:?}");
    }
    assert!(
        connections_to(addr(&cluster, 3)).is_empty(),
        "nothing dials RegionFour before it is enrolled"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let rotated = Arc::new(AtomicUsize::new(0));
    let rotations = rotate_until(cluster.admin_config.clone(), stop.clone(), rotated.clone());
    // The reloads below must fall among rotations, not before the first one (a
    // loaded machine starts an admin command slowly).
    poll_until(
        Duration::from_secs(30),
        "a rotation before the reloads",
        || async { (rotated.load(Ordering::Acquire) >= 1).then_some(()) },
    )
    .await;

    // An invalid file (RegionTwo listed twice): refused, nothing changes.
    let mut invalid = config.clone();
    invalid.agents.push(invalid.agents[1].clone());
    cluster.write_rotator_config(&invalid);
    cluster.rotator().signal(Signal::HUP);
    poll_until(Duration::from_secs(10), "the refused reload", || async {
        cluster
            .rotator
            .as_ref()
            .expect("rotator")
            .log()
            .contains("reload refused, nothing changed")
            .then_some(())
    })
    .await;
    assert!(
        cluster
            .metrics()
            .contains("fernetd_rotator_config_last_reload_successful 0"),
        "the refused reload shows in the metrics"
    );
    let (_, status) = cluster.status();
    assert_eq!(enrolled(&status).len(), 3, "{status:#}");
    assert!(
        cluster.rotator().try_exit().is_none(),
        "the rotator runs on"
    );

    // RegionThree removed, RegionFour added, in one reload.
    let mut next = config.clone();
    let three = next.agents.pop().expect("RegionThree");
    next.agents.push(four);
    cluster.write_rotator_config(&next);
    cluster.rotator().signal(Signal::HUP);
    let status = poll_until(
        Duration::from_secs(30),
        "RegionFour enrolled and in step",
        || async {
            let (code, status) = cluster.status();
            let names = enrolled(&status);
            (code == 0 && names.contains("RegionFour") && !names.contains(&three.region))
                .then_some(status)
        },
    )
    .await;
    assert!(
        cluster
            .metrics()
            .contains("fernetd_rotator_config_last_reload_successful 1"),
        "the applied reload shows in the metrics"
    );
    poll_until(
        Duration::from_secs(10),
        "RegionThree's connection closed",
        || async { connections_to(addr(&cluster, 2)).is_empty().then_some(()) },
    )
    .await;

    // The removed region no longer counts: stopped, it blocks nothing.
    cluster.agent(2).signal(Signal::STOP);
    let generation = status["repositories"][0]["generation"]
        .as_u64()
        .expect("generation");
    poll_until(
        Duration::from_secs(40),
        "two more rotations after the reload",
        || async {
            let (code, status) = cluster.status();
            let now = status["repositories"][0]["generation"]
                .as_u64()
                .unwrap_or(0);
            (code == 0 && now >= generation + 2).then_some(())
        },
    )
    .await;
    stop.store(true, Ordering::Release);
    let outcomes = rotations.join().expect("rotation thread");
    assert!(
        outcomes.iter().filter(|o| o["rotated"] == true).count() >= 3,
        "rotations ran throughout: {outcomes:#?}"
    );
    cluster.agent(2).signal(Signal::CONT);

    // The same TCP connections to the regions the reloads left alone.
    for (a, ports) in &kept {
        assert_eq!(&connections_to(*a), ports, "the connection to {a} was kept");
    }
    let status = cluster.converged("every enrolled region in step").await;
    let current = status["repositories"][0]["digest"]
        .as_str()
        .expect("digest")
        .to_owned();
    let mut keys = BTreeSet::new();
    cluster.hold([0, 1, 3], &current, "every enrolled region", &mut keys);

    let lines: Vec<Value> = std::fs::read_to_string(&audit)
        .expect("audit log")
        .lines()
        .map(|l| serde_json::from_str(l).expect("whole JSON lines"))
        .collect();
    let by_reload = |outcome: &str| {
        lines
            .iter()
            .filter(|l| {
                l["event"] == "enrolment" && l["actor"] == "reload" && l["outcome"] == outcome
            })
            .map(|l| l["agent"].as_str().unwrap_or_default().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(by_reload("added"), ["RegionFour"], "{lines:#?}");
    assert_eq!(by_reload("removed"), ["RegionThree"], "{lines:#?}");
    assert!(
        lines
            .iter()
            .any(|l| l["event"] == "reload" && l["outcome"] == "refused"),
        "{lines:#?}"
    );
    assert_no_keys_in_logs(&cluster.logs, &keys);
}
