//! The audit logs of a run: every rotation, purge, blocked rotation and refused
//! push with the right actor, whole JSON lines after a SIGKILL, and no key.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use fernetd::pb;
use fernetd::pb::distribution_client::DistributionClient;
use serde_json::Value;

use crate::common::daemon::connect;
use crate::common::pki::client_tls;
use crate::rotator::{
    ADMIN_ID, Cluster, ROTATOR_ID, agent_identity, assert_no_keys_in_logs, key_forms,
};

fn lines(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        text.is_empty() || text.ends_with('\n'),
        "a torn last line in {}",
        path.display()
    );
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: {e}: {l}", path.display())))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_logs_hold_every_change_with_its_actor_whole_lines_and_no_key() {
    use rustix::process::Signal;
    let cluster = Cluster::configure(&["RegionOne", "RegionTwo"], agent_identity, None);
    let rotator_log = cluster.dir.path().join("rotator-audit.log");
    let mut config = cluster.rotator_config();
    config.audit_log = Some(rotator_log.clone());
    cluster.write_rotator_config(&config);
    let mut agent_logs: Vec<PathBuf> = Vec::new();
    for agent in &cluster.agents {
        let mut c: fernetd::config::AgentConfig =
            fernetd::config::load(&agent.config).expect("agent.toml");
        let log = cluster.dir.path().join(format!("audit-{}.log", agent.name));
        c.audit_log = Some(log.clone());
        std::fs::write(&agent.config, toml::to_string(&c).expect("toml")).expect("write");
        agent_logs.push(log);
    }
    let mut cluster = cluster.launch().await;
    cluster.converged("initial distribution").await;
    cluster.rotate_ok();
    cluster.rotate_ok();
    let (code, v) = cluster.admin_json(&[
        "purge-key",
        "--repository",
        "tokens",
        "--index",
        "1",
        "--yes",
    ]);
    assert_eq!(code, 0, "{v:#}");
    cluster.converged("after the purge").await;

    // A push refused by an agent: a stale generation from the rotator's identity.
    let set = cluster.repo_state(0);
    let leaf = cluster.ca.issue(&[ROTATOR_ID]);
    let tls = client_tls(
        cluster.ca.cert_pem(),
        Some(&leaf),
        &agent_identity("RegionOne"),
    );
    let mut client = DistributionClient::new(
        connect(cluster.agents[0].addr, tls)
            .await
            .expect("connect to the agent"),
    );
    let stale = pb::InstallRequest {
        repository: "tokens".into(),
        generation: 1,
        keys: fernetd::agent::check::to_wire(&set),
        digest: set.digest().0.to_vec(),
        canaries: vec![pb::Canary {
            token: fernetd::token::canary(set.primary().expect("primary")),
            key_index: set.primary_index().expect("primary"),
        }],
        restore: false,
        promoted_unix: Default::default(),
        emergency_purge: false,
    };
    let refused = client
        .install(stale)
        .await
        .expect_err("a stale push is refused");
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );

    // A blocked rotation, then the rotator killed in the middle of a fan-out.
    cluster.agent(1).signal(Signal::STOP);
    let (code, _) = cluster.rotate_with(&["--no-wait"]);
    assert_eq!(code, 0);
    let (code, v) = cluster.admin_json(&["rotate", "--wait", "1"]);
    assert_eq!((code, &v[0]["rotated"]), (1, &Value::Bool(false)), "{v:#}");
    cluster.rotator().kill();
    cluster.agent(1).signal(Signal::CONT);
    cluster.start_rotator().await;
    cluster.converged("after the restart").await;

    let rotator = lines(&rotator_log);
    let by = |event: &str, outcome: &str| {
        rotator
            .iter()
            .filter(|e| e["event"] == event && e["outcome"] == outcome)
            .collect::<Vec<_>>()
    };
    let committed = by("rotation", "committed");
    assert!(committed.len() >= 3, "{rotator:#?}");
    assert!(
        committed
            .iter()
            .all(|e| e["actor"] == ADMIN_ID && e["role"] == "rotator")
    );
    let purges = by("purge", "committed");
    assert_eq!(purges.len(), 1, "{rotator:#?}");
    assert_eq!(purges[0]["actor"], ADMIN_ID);
    assert!(!by("rotation", "blocked").is_empty(), "{rotator:#?}");
    let enrolled: BTreeSet<&str> = rotator
        .iter()
        .filter(|e| e["event"] == "enrolment")
        .filter_map(|e| e["agent"].as_str())
        .collect();
    assert_eq!(
        enrolled,
        BTreeSet::from(["RegionOne", "RegionTwo"]),
        "{rotator:#?}"
    );

    let agent = lines(&agent_logs[0]);
    assert!(
        agent
            .iter()
            .any(|e| e["event"] == "install" && e["actor"] == ROTATOR_ID),
        "{agent:#?}"
    );
    assert!(
        agent.iter().any(|e| e["event"] == "refusal"
            && e["detail"]
                .as_str()
                .is_some_and(|d| d.starts_with("rollback"))),
        "{agent:#?}"
    );
    for log in &agent_logs {
        lines(log);
    }
    let mut keys = BTreeSet::new();
    key_forms(&set, &mut keys);
    key_forms(&cluster.repo_state(0), &mut keys);
    let mut all = vec![rotator_log];
    all.extend(agent_logs);
    assert_no_keys_in_logs(&all, &keys);
}
