//! Key lifetimes on every path: no rotation, manual or scheduled, purges a key
//! that a valid token may still need; the emergency `purge-key`; `fernetd repo
//! rotate` on an agent's repository. Real `fernetd` processes, through the
//! rotator tests' cluster.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::daemon::poll_until;
use crate::rotator::{Cluster, agent_identity, assert_no_keys_in_logs, key_forms};
use fernetd::repository;

/// `fernetd token validate --repository REPO TOKEN`: the exit code.
pub(super) fn validate(repo: &std::path::Path, token: &str) -> i32 {
    Command::new(crate::common::fernetd_bin())
        .args(["token", "validate", "--repository"])
        .arg(repo)
        .arg(token)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run fernetd token validate")
        .code()
        .unwrap_or(-1)
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// An RFC 3339 time (whole seconds) as Unix ms.
fn parse_time(v: &Value) -> i64 {
    let text = v.as_str().unwrap_or_else(|| panic!("no time in {v}"));
    chrono::DateTime::parse_from_rfc3339(text)
        .unwrap_or_else(|e| panic!("{text}: {e}"))
        .timestamp_millis()
}

/// The operator's scenario: tokens of 10 s, no window, 4 keys, the schedule
/// moved to once a year, a token made with the primary key, then `admin rotate`
/// again and again at once. The token stays valid in every region; each refusal
/// says when the rotation becomes safe, and it is performed once that passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn immediate_rotations_never_purge_the_key_of_a_valid_token() {
    let cluster = Cluster::configure(&["RegionOne", "RegionTwo"], agent_identity, None);
    cluster.set_schedule("0 0 1 1 *", Duration::from_secs(10));
    let cluster = cluster.launch().await;
    cluster.converged("initial distribution").await;
    let set = cluster.repo_state(0);
    let token = fernetd::token::canary(set.primary().expect("primary key"));
    let signed_with = set.primary_index().expect("primary");

    let mut rotated = 0;
    let mut refusal = None;
    for attempt in 0..6 {
        let (code, v) = cluster.admin_json(&["rotate", "--wait", "20"]);
        let o = &v[0];
        if o["rotated"] == true {
            assert_eq!(code, 0, "{v:#}");
            rotated += 1;
        } else {
            assert_eq!(code, 1, "attempt {attempt}: a refusal exits 1: {v:#}");
            assert_eq!(o["held"], true, "{v:#}");
            let message = o["message"].as_str().expect("message");
            assert!(
                message.contains(&format!("would purge key {signed_with}"))
                    && message.contains("purge-safe"),
                "the refusal names the key and when it becomes safe: {message}"
            );
            refusal = Some(parse_time(&o["safe_at"]));
        }
        for agent in &cluster.agents {
            assert_eq!(
                validate(&agent.repo, &token),
                0,
                "attempt {attempt}: the token still validates in {}",
                agent.region
            );
            assert!(
                repository::load(&agent.repo)
                    .expect("repository")
                    .get(signed_with)
                    .is_some(),
                "attempt {attempt}: key {signed_with} still in {}",
                agent.region
            );
        }
    }
    assert_eq!(
        rotated, 2,
        "two rotations fill 4 keys; the third would purge"
    );
    let safe_at = refusal.expect("a refusal");

    // The dry run shows what would be promoted and purged, and when it is safe.
    let (code, v) = cluster.admin_json(&["rotate", "--dry-run"]);
    assert_eq!(code, 1, "{v:#}");
    assert_eq!(
        v[0]["purged"][0]["index"].as_u64(),
        Some(signed_with.into())
    );
    assert!(v[0]["purged"][0]["purge_safe_at"].is_string(), "{v:#}");
    assert!(
        v[0]["promoted_index"].as_u64().is_some_and(|p| p > 0),
        "{v:#}"
    );
    let (_, status) = cluster.status();
    assert!(
        status["repositories"][0]["purge_safe_at"].is_string(),
        "status says when the next rotation is safe: {status:#}"
    );

    // Performed once the purge-safe time has passed, and not before.
    let performed = poll_until(
        Duration::from_secs(40),
        "the rotation once safe",
        || async {
            let (code, v) = cluster.admin_json(&["rotate", "--wait", "20"]);
            (code == 0 && v[0]["rotated"] == true).then(unix_ms)
        },
    )
    .await;
    assert!(
        performed >= safe_at,
        "performed at {performed}, before its purge-safe time {safe_at}"
    );
    for agent in &cluster.agents {
        assert!(
            repository::load(&agent.repo)
                .expect("repository")
                .get(signed_with)
                .is_none(),
            "key {signed_with} purged from {} once safe",
            agent.region
        );
    }
    let mut keys = std::collections::BTreeSet::new();
    key_forms(&set, &mut keys);
    assert_no_keys_in_logs(&cluster.logs, &keys);
}

/// A scheduled rotation blocked by a stopped region is performed once it is
/// back, and the next cron tick does not rotate again within one interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_scheduled_rotation_is_not_followed_by_another_within_an_interval() {
    use rustix::process::Signal;
    const INTERVAL: Duration = Duration::from_secs(4);
    let cluster = Cluster::configure(&["RegionOne", "RegionTwo"], agent_identity, None);
    cluster.set_schedule("*/4 * * * * *", Duration::from_secs(1));
    let mut cluster = cluster.launch().await;
    let generation = |c: &Cluster| {
        c.status().1["repositories"][0]["generation"]
            .as_u64()
            .unwrap_or(0)
    };
    cluster.converged("initial distribution").await;
    cluster.agent(1).signal(Signal::STOP);
    // Blocked: the tick after the stop commits, the next waits for RegionTwo.
    let blocked = poll_until(Duration::from_secs(20), "the schedule blocked", || async {
        let (_, status) = cluster.status();
        let repo = &status["repositories"][0];
        (repo["blocking_regions"] == serde_json::json!(["RegionTwo"]))
            .then(|| repo["generation"].as_u64().unwrap_or(0))
    })
    .await;
    // Resume between two ticks, so the owed rotation is certainly late.
    let ms_in_interval = unix_ms().rem_euclid(INTERVAL.as_millis() as i64);
    let to_mid = (INTERVAL.as_millis() as i64 * 3 / 2 - ms_in_interval)
        .rem_euclid(INTERVAL.as_millis() as i64);
    tokio::time::sleep(Duration::from_millis(to_mid as u64)).await;
    cluster.agent(1).signal(Signal::CONT);
    let late = poll_until(Duration::from_secs(20), "the owed rotation", || async {
        (generation(&cluster) > blocked).then(Instant::now)
    })
    .await;
    let next = poll_until(Duration::from_secs(20), "the next rotation", || async {
        (generation(&cluster) > blocked + 1).then(Instant::now)
    })
    .await;
    let gap = next.duration_since(late);
    // Polling adds up to a few hundred milliseconds on either side.
    assert!(
        gap + Duration::from_millis(500) >= INTERVAL,
        "a second rotation {gap:?} after the late one, less than the {INTERVAL:?} interval"
    );
}

/// `admin purge-key`: refused without confirmation, then removes exactly that
/// key in every region with a new, acknowledged generation; a compromised
/// primary is replaced by the staged key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_key_removes_exactly_that_key_everywhere_and_needs_confirmation() {
    let cluster = Cluster::start(&["RegionOne", "RegionTwo"], agent_identity).await;
    cluster.converged("initial distribution").await;
    cluster.rotate_ok();
    let (generation, _) = cluster.rotate_ok();
    let before = cluster.repo_state(0);
    assert_eq!(before.indices(), vec![0, 1, 2, 3]);

    // No terminal and no --yes: refused, nothing changes.
    let (code, out, err) = cluster.admin(&["purge-key", "--repository", "tokens", "--index", "2"]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("--yes"), "{err}");
    assert_eq!(
        cluster.status().1["repositories"][0]["generation"].as_u64(),
        Some(generation)
    );
    // An index the repository does not hold.
    let (code, _, err) = cluster.admin(&[
        "purge-key",
        "--repository",
        "tokens",
        "--index",
        "9",
        "--yes",
    ]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("no key 9"), "{err}");

    let (code, v) = cluster.admin_json(&[
        "purge-key",
        "--repository",
        "tokens",
        "--index",
        "2",
        "--yes",
    ]);
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(v[0]["generation"].as_u64(), Some(generation + 1), "{v:#}");
    assert!(
        v[0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("stops validating")),
        "{v:#}"
    );
    for i in 0..cluster.agents.len() {
        let set = cluster.repo_state(i);
        assert_eq!(set.indices(), vec![0, 1, 3], "{}", cluster.agents[i].region);
        for index in [0, 1, 3] {
            assert_eq!(
                set.get(index).map(|k| *k.as_bytes()),
                before.get(index).map(|k| *k.as_bytes()),
                "key {index} untouched"
            );
        }
    }

    // The primary compromised: the staged key takes over, a new staged key.
    let (code, v) = cluster.admin_json(&[
        "purge-key",
        "--repository",
        "tokens",
        "--index",
        "3",
        "--yes",
    ]);
    assert_eq!(code, 0, "{v:#}");
    let after = cluster.repo_state(0);
    assert_eq!(after.indices(), vec![0, 1, 4]);
    assert_eq!(
        after.get(4).map(|k| *k.as_bytes()),
        before.get(0).map(|k| *k.as_bytes()),
        "the staged key became primary"
    );
    for i in 1..cluster.agents.len() {
        assert_eq!(cluster.repo_state(i).digest(), after.digest());
    }
    let mut keys = std::collections::BTreeSet::new();
    key_forms(&before, &mut keys);
    key_forms(&after, &mut keys);
    assert_no_keys_in_logs(&cluster.logs, &keys);
}

/// Agents refuse a next generation that drops the previous primary unless it
/// is marked an emergency purge; the rotator marks `purge-key`'s generation and
/// keeps the mark across a restart, so a region that was down during the purge
/// still gets it from the restarted rotator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purged_primary_reaches_a_region_that_missed_it_after_a_rotator_restart() {
    let mut cluster = Cluster::start(&["RegionOne", "RegionTwo"], agent_identity).await;
    cluster.converged("initial distribution").await;
    cluster.rotate_ok();
    let before = cluster.repo_state(1);
    let primary = before.primary_index().expect("primary");
    let status = cluster.agent(1).stop().await;
    assert!(status.success(), "{status}");
    let (code, v) = cluster.admin_json(&[
        "purge-key",
        "--repository",
        "tokens",
        "--index",
        &primary.to_string(),
        "--force",
        "--yes",
        "--wait",
        "1",
    ]);
    // RegionTwo is down: the wait for its acknowledgement runs out.
    let purged = v[0]["generation"]
        .as_u64()
        .unwrap_or_else(|| panic!("exit {code}: {v:#}"));
    // RegionOne took it at once: marked, it may drop the primary.
    poll_until(
        Duration::from_secs(30),
        "RegionOne holds the purge",
        || async { (cluster.repo_state(0).get(primary).is_none()).then_some(()) },
    )
    .await;
    let status = cluster.rotator().stop().await;
    assert!(status.success(), "{status}");
    cluster.start_rotator().await;
    cluster.start_agent(1).await;
    poll_until(
        Duration::from_secs(60),
        "RegionTwo holds the purge pushed by the restarted rotator",
        || async {
            let held = cluster.repo_state(1);
            (held.digest() == cluster.repo_state(0).digest()).then_some(())
        },
    )
    .await;
    assert!(cluster.repo_state(1).get(primary).is_none());
    let (_, status) = cluster.status();
    assert_eq!(
        status["repositories"][0]["generation"].as_u64(),
        Some(purged),
        "{status:#}"
    );
}

/// `fernetd repo rotate` leaves an agent's repository alone unless forced; a
/// keystone.conf gives `max_active_keys`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repo_rotate_refuses_an_agents_repository_unless_forced() {
    let cluster = Cluster::start(&["RegionOne"], agent_identity).await;
    cluster.converged("initial distribution").await;
    let repo = cluster.agents[0].repo.clone();
    let before = repository::load(&repo).expect("repository");
    let run = |args: &[&str]| {
        Command::new(crate::common::fernetd_bin())
            .args(["repo", "rotate", "--repository"])
            .arg(&repo)
            .args(args)
            .output()
            .expect("fernetd repo rotate")
    };
    let out = run(&[]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("managed by a fernetd agent"), "{err}");
    assert_eq!(
        repository::load(&repo).expect("repository").digest(),
        before.digest()
    );

    // keystone.conf's max_active_keys, and a flag that disagrees with it.
    let conf = cluster.dir.path().join("keystone.conf");
    std::fs::write(
        &conf,
        format!(
            "[fernet_tokens]\nkey_repository = {}\nmax_active_keys = 2\n",
            repo.display()
        ),
    )
    .expect("write keystone.conf");
    let conf = conf.to_str().expect("utf-8");
    let out = run(&["--force", "--keystone-conf", conf, "--max-active-keys", "5"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = run(&["--force", "--keystone-conf", conf]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let after = repository::load(&repo).expect("repository");
    assert_eq!(after.len(), 2, "max_active_keys = 2 from keystone.conf");
    assert!(
        repository::read_stamp(&repo).expect("stamp").is_none(),
        "a forced local rotation drops the agent's stamp"
    );
}
