//! `fernetd rotator --check` and `fernetd agent --check`: every start-up check,
//! printed, nothing written, and each mistake refused with exactly the message
//! and exit code the daemon itself gives.

use std::path::Path;
use std::process::Command;

use fernetd::config::{AgentConfig, RotatorConfig};

use crate::rotator::{Cluster, agent_identity};

/// `fernetd ROLE --config FILE [--check]`: (exit code, stdout, the error line).
fn run(role: &str, config: &Path, check: bool) -> (i32, String, String) {
    let mut cmd = Command::new(crate::common::fernetd_bin());
    cmd.args([role, "--config"]).arg(config);
    if check {
        cmd.arg("--check");
    }
    // The daemon must not get far enough to run: only refusals are tried here.
    let out = cmd.output().expect("run fernetd");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let error = stderr
        .lines()
        .find(|l| l.starts_with("fernetd: error:"))
        .unwrap_or_default()
        .to_owned();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        error,
    )
}

fn tree(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = walk(dir);
    names.sort();
    names
}

fn walk(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .flat_map(|e| {
            let path = e.path();
            let mut v = vec![path.display().to_string()];
            if path.is_dir() {
                v.extend(walk(&path));
            }
            v
        })
        .collect()
}

#[test]
fn rotator_check_refuses_what_the_rotator_refuses_with_the_same_message_and_writes_nothing() {
    let cluster = Cluster::configure(&["RegionOne", "RegionTwo"], agent_identity, None);
    let good = cluster.rotator_config();
    let path = cluster.dir.path().join("rotator.toml");
    let before = tree(cluster.dir.path());
    let (code, out, err) = run("rotator", &path, true);
    assert_eq!(code, 0, "{out}{err}");
    for line in [
        "ok    schedule",
        "ok    TLS",
        "ok    agent `RegionTwo`",
        "every start-up check passed",
    ] {
        assert!(out.contains(line), "{line}: {out}");
    }
    type Breakage = Box<dyn Fn(&mut RotatorConfig)>;
    let cases: Vec<(&str, Breakage)> = vec![
        (
            "a bad endpoint",
            Box::new(|c| c.agents[1].endpoint = "ftp://x/".into()),
        ),
        (
            "a bad identity",
            Box::new(|c| c.agents[0].identity = "not a host".into()),
        ),
        (
            "a duplicate region",
            Box::new(|c| c.agents[1].region = c.agents[0].region.clone()),
        ),
        (
            "too few keys",
            Box::new(|c| {
                c.schedule.cron = "0 * * * *".into();
                c.policy.token_expiration = std::time::Duration::from_secs(86_400);
            }),
        ),
        (
            "a bad schedule",
            Box::new(|c| c.schedule.cron = "every day".into()),
        ),
        ("no admin", Box::new(|c| c.admin_identities.clear())),
        (
            "a zero reconcile interval",
            Box::new(|c| c.fanout.reconcile_interval = Default::default()),
        ),
        (
            "a missing certificate",
            Box::new(|c| c.tls.cert = "/nonexistent/cert.pem".into()),
        ),
        (
            "a missing import",
            Box::new(|c| c.repositories[0].import = Some("/nonexistent/keys".into())),
        ),
        (
            "a bad repository name",
            Box::new(|c| c.repositories[0].name = "../x".into()),
        ),
    ];
    for (what, breakage) in cases {
        let mut config = good.clone();
        breakage(&mut config);
        cluster.write_rotator_config(&config);
        let (daemon_code, _, daemon_error) = run("rotator", &path, false);
        let (code, out, error) = run("rotator", &path, true);
        assert_eq!(
            daemon_code, 2,
            "{what}: the daemon refuses it: {daemon_error}"
        );
        assert_eq!(code, 2, "{what}: --check refuses it too: {out}");
        assert_eq!(error, daemon_error, "{what}: the same message");
        assert!(out.contains("FAIL"), "{what}: {out}");
        assert_eq!(tree(cluster.dir.path()), before, "{what}: nothing written");
    }
    // An unknown key is refused before any check runs.
    std::fs::write(
        &path,
        format!("surprise = 1\n{}", toml::to_string(&good).expect("toml")),
    )
    .expect("write");
    let (daemon_code, _, daemon_error) = run("rotator", &path, false);
    let (code, _, error) = run("rotator", &path, true);
    assert_eq!((code, &error), (daemon_code, &daemon_error));
    assert_eq!(code, 2);
}

#[test]
fn agent_check_refuses_what_the_agent_refuses_with_the_same_message_and_writes_nothing() {
    let cluster = Cluster::configure(&["RegionOne"], agent_identity, None);
    let path = cluster.agents[0].config.clone();
    let good: AgentConfig = fernetd::config::load(&path).expect("agent.toml");
    let before = tree(cluster.dir.path());
    let (code, out, err) = run("agent", &path, true);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("ok    repository `tokens`") && out.contains("ok    TLS"),
        "{out}"
    );
    type Breakage = Box<dyn Fn(&mut AgentConfig)>;
    let cases: Vec<(&str, Breakage)> = vec![
        (
            "a relative path",
            Box::new(|c| c.repositories[0].path = "keys".into()),
        ),
        (
            "a missing parent",
            Box::new(|c| c.repositories[0].path = "/nonexistent/dir/keys".into()),
        ),
        (
            "a bad owner",
            Box::new(|c| c.repositories[0].owner = Some("no-such-user:x".into())),
        ),
        (
            "no rotator identity",
            Box::new(|c| c.rotator_identity = " ".into()),
        ),
        (
            "a missing key file",
            Box::new(|c| c.tls.key = "/nonexistent/key.pem".into()),
        ),
        (
            "a tiny message limit",
            Box::new(|c| c.max_message_bytes = 10),
        ),
    ];
    for (what, breakage) in cases {
        let mut config = good.clone();
        breakage(&mut config);
        std::fs::write(&path, toml::to_string(&config).expect("toml")).expect("write");
        let (daemon_code, _, daemon_error) = run("agent", &path, false);
        let (code, out, error) = run("agent", &path, true);
        assert_eq!(
            daemon_code, 2,
            "{what}: the daemon refuses it: {daemon_error}"
        );
        assert_eq!(code, 2, "{what}: --check refuses it too: {out}");
        assert_eq!(error, daemon_error, "{what}: the same message");
        assert_eq!(tree(cluster.dir.path()), before, "{what}: nothing written");
    }
}
