//! Several controllers per region: each controller runs its own agent under its
//! own name, the safety rule waits for every one, and status names both the
//! controller and its region. Real `fernetd` processes.

use std::time::Duration;

use crate::common::daemon::poll_until;
use crate::rotator::{Cluster, agent_identity, region_rows};

const FLEET: [&str; 4] = [
    "ctl1.regionone@RegionOne",
    "ctl2.regionone@RegionOne",
    "ctl1.regiontwo@RegionTwo",
    "ctl2.regiontwo@RegionTwo",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_regions_of_two_controllers_each_rotate_together_and_a_stopped_one_blocks() {
    use rustix::process::Signal;
    let mut cluster = Cluster::start(&FLEET, agent_identity).await;
    let status = cluster
        .converged("initial distribution to four controllers")
        .await;
    assert_eq!(
        status["agents"].as_array().map(Vec::len),
        Some(4),
        "{status:#}"
    );
    let regions = status["regions"].as_array().expect("regions");
    assert_eq!(regions.len(), 2, "{status:#}");
    for region in regions {
        assert_eq!(region["ok"], true, "{status:#}");
        assert_eq!(region["agents"].as_array().map(Vec::len), Some(2));
    }

    let (generation, digest) = cluster.rotate_ok();
    let mut keys = std::collections::BTreeSet::new();
    cluster.all_hold(&digest, "every controller", &mut keys);

    // One controller of RegionTwo stops: the next rotation commits and names it
    // with its region as pending, the one after is blocked by it.
    cluster.agent(3).signal(Signal::STOP);
    let (code, v) = cluster.rotate_with(&["--wait", "6"]);
    assert_eq!(code, 1, "{v:#}");
    assert_eq!(v[0]["rotated"], true, "{v:#}");
    assert_eq!(
        v[0]["pending_regions"],
        serde_json::json!(["ctl2.regiontwo (RegionTwo)"]),
        "{v:#}"
    );
    let (code, v) = cluster.rotate_with(&["--wait", "2"]);
    assert_eq!(
        (code, &v[0]["rotated"]),
        (1, &serde_json::json!(false)),
        "{v:#}"
    );
    let message = v[0]["message"].as_str().expect("message");
    assert!(message.contains("ctl2.regiontwo (RegionTwo)"), "{message}");
    let (code, status) = cluster.status();
    assert_eq!(code, 1, "{status:#}");
    assert_eq!(
        status["repositories"][0]["blocking_regions"],
        serde_json::json!(["ctl2.regiontwo (RegionTwo)"]),
        "{status:#}"
    );
    let two = status["regions"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["region"] == "RegionTwo"))
        .expect("RegionTwo's verdict");
    assert_eq!(two["ok"], false, "{status:#}");
    assert_eq!(
        two["behind"],
        serde_json::json!(["ctl2.regiontwo"]),
        "{status:#}"
    );
    let rows = region_rows(&status, "RegionTwo");
    assert_eq!(rows.len(), 2, "{status:#}");
    assert!(
        rows.iter()
            .any(|r| r["name"] == "ctl2.regiontwo" && r["digest_match"] == false),
        "{status:#}"
    );
    // The text form groups agents by region, one verdict line each.
    let (_, text, _) = cluster.admin(&["status"]);
    assert!(
        text.contains("region RegionOne: ok: 2 agents")
            && text.contains("region RegionTwo: BEHIND: 1 of 2 agents")
            && text.contains("ctl2.regiontwo"),
        "{text}"
    );
    // Metrics label every agent with its name and region.
    let metrics = cluster.metrics();
    assert!(
        metrics.contains(r#"agent="ctl2.regiontwo",region="RegionTwo""#),
        "{metrics}"
    );

    cluster.agent(3).signal(Signal::CONT);
    cluster
        .converged("the stopped controller catching up")
        .await;
    let (g, _) = cluster.rotate_ok();
    assert!(g > generation + 1);
    poll_until(
        Duration::from_secs(20),
        "every controller on the last generation",
        || async {
            let (code, _) = cluster.status();
            (code == 0).then_some(())
        },
    )
    .await;
}

/// Two controllers enrolled under one region without names is the mistake of
/// old configurations: refused, saying what to add.
#[test]
fn a_region_listed_twice_without_names_is_refused_naming_the_fix() {
    let cluster = Cluster::configure(&["RegionOne", "RegionTwo"], agent_identity, None);
    let mut config = cluster.rotator_config();
    config.agents[1].region = "RegionOne".into();
    cluster.write_rotator_config(&config);
    let stderr = cluster.refused_start();
    assert!(
        stderr.contains("agent region `RegionOne` is listed twice") && stderr.contains("`name`"),
        "{stderr}"
    );
}
