//! Credential keys against real Keystone 30.0.0: two regions over one shared
//! SQLite identity database, each Keystone reading the credential repository
//! its own fernetd agent installs. A cloud that started without credential keys
//! (rows under Keystone's public all-zero key) is adopted; five credential
//! rotations (a migrate at RegionOne, the cache time, the purge) keep every EC2
//! credential readable in both regions, one of them with a region's agent
//! stopped; a migrate against an unreachable database refuses the rotation and
//! leaves the keys alone; and the contrast: the same repository rotated three
//! times without a migrate makes Keystone answer 500.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use fernetd::config::{AgentCredentialConfig, AgentRepository, CredentialConfig, RepositoryConfig};
use rustix::process::Signal;

use crate::common::daemon::Daemon;
use crate::common::fernetd_bin;
use crate::common::keystone::{self, Client, Keystone, TestPolicy, wait_for};

/// The regions' credential cache time as the rotator knows it: short, so the
/// test waits little, and real (Keystone's cache is off in these regions).
const CACHE_TIME: Duration = Duration::from_secs(2);

/// `fernetd admin --config ADMIN ARGS...`: exit code and standard output.
fn admin(admin_toml: &Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(fernetd_bin())
        .arg("admin")
        .arg("--config")
        .arg(admin_toml)
        .args(args)
        .output()
        .expect("run fernetd admin");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn admin_json(admin_toml: &Path, args: &[&str]) -> serde_json::Value {
    let (_, out) = admin(admin_toml, args);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

/// The credential repository's generation at the rotator, and whether every
/// agent acknowledged it.
fn credential_generation(admin_toml: &Path) -> (u64, bool) {
    let v = admin_json(admin_toml, &["status", "--json"]);
    let generation = v["repositories"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["name"] == "credential"))
        .and_then(|r| r["generation"].as_u64())
        .unwrap_or(0);
    let all = v["agents"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|a| a["repository"] == "credential")
                .all(|a| a["generation"] == generation && a["digest_match"] == true)
        })
        .unwrap_or(false);
    (generation, all)
}

/// The generation an agent stamped into a repository (0 = none).
fn installed(repo: &Path) -> u64 {
    fernetd::repository::read_stamp(repo)
        .ok()
        .flatten()
        .map_or(0, |s| s.generation)
}

/// One region's Keystone API as the admin sees it: a project-scoped token
/// (renewed well before Keystone's 600 s expiry), its user and project.
struct Api {
    client: Client,
    token: String,
    since: Instant,
}

impl Api {
    fn new(keystone: &Keystone) -> Api {
        let client = keystone.client();
        let token = client.issue(Some("admin")).expect("admin token");
        Api {
            client,
            token,
            since: Instant::now(),
        }
    }

    fn token(&mut self) -> String {
        if self.since.elapsed() > Duration::from_secs(300) {
            self.token = self.client.issue(Some("admin")).expect("admin token");
            self.since = Instant::now();
        }
        self.token.clone()
    }

    fn call(&mut self, method: &str, path: &str, body: Option<&str>) -> keystone::Response {
        let token = self.token();
        keystone::http(
            self.client.addr,
            method,
            path,
            &[
                ("X-Auth-Token", &token),
                ("Content-Type", "application/json"),
            ],
            body,
        )
        .unwrap_or_else(|e| panic!("{method} {path} at {}: {e}", self.client.addr))
    }

    /// The admin's user and project ids, from its own token.
    fn ids(&mut self) -> (String, String) {
        let token = self.token();
        let r = self.client.validate(&token, &token).expect("validate");
        let v: serde_json::Value = serde_json::from_str(&r.body).expect("token body");
        (
            v["token"]["user"]["id"].as_str().expect("user").to_owned(),
            v["token"]["project"]["id"]
                .as_str()
                .expect("project")
                .to_owned(),
        )
    }
}

/// An EC2 credential and the `POST /v3/ec2tokens` body signed with its secret.
struct Ec2 {
    id: String,
    ec2tokens_body: String,
}

/// Signs a SignatureVersion 2 request with python-keystoneclient's Ec2Signer,
/// the code Keystone's ec2tokens handler checks signatures with.
fn signed_body(secret: &str, access: &str, host: &str) -> String {
    let script = r#"
import json, sys
from keystoneclient.contrib.ec2.utils import Ec2Signer
secret, access, host = sys.argv[1:4]
creds = {"access": access, "host": host, "verb": "GET", "path": "/",
         "params": {"SignatureVersion": "2", "SignatureMethod": "HmacSHA256",
                    "AWSAccessKeyId": access, "Action": "DescribeInstances"}}
creds["signature"] = Ec2Signer(secret).generate(creds)
print(json.dumps({"credentials": creds}))
"#;
    let out = keystone::run_python(script, &[secret, access, host]);
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_owned()
}

fn create_ec2(api: &mut Api, ids: &(String, String), n: usize) -> Ec2 {
    let access = format!("access-{n}-{}", std::process::id());
    let secret = format!("secret-{n}-{:x}", rand_u64());
    let blob = serde_json::json!({"access": access, "secret": secret}).to_string();
    let body = serde_json::json!({"credential": {
        "type": "ec2", "user_id": ids.0, "project_id": ids.1, "blob": blob}})
    .to_string();
    let r = api.call("POST", "/v3/credentials", Some(&body));
    assert_eq!(r.status, 201, "create credential {n}: {}", r.body);
    let v: serde_json::Value = serde_json::from_str(&r.body).expect("credential body");
    Ec2 {
        id: v["credential"]["id"].as_str().expect("id").to_owned(),
        ec2tokens_body: signed_body(&secret, &access, "ec2.example.net"),
    }
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.finish()
}

/// Every credential read back with GET in every region, and the newest few
/// used for an EC2 login there: the failures, as lines.
fn read_back(apis: &mut [Api], creds: &[Ec2], ec2_logins: usize) -> Vec<String> {
    let mut failures = Vec::new();
    for (region, api) in apis.iter_mut().enumerate() {
        for c in creds {
            let r = api.call("GET", &format!("/v3/credentials/{}", c.id), None);
            if r.status != 200 {
                failures.push(format!("region {region}: GET {}: {}", c.id, r.status));
            }
        }
        for c in creds.iter().rev().take(ec2_logins) {
            let r = api.call("POST", "/v3/ec2tokens", Some(&c.ec2tokens_body));
            if r.status != 200 {
                failures.push(format!(
                    "region {region}: POST /v3/ec2tokens for {}: {} {}",
                    c.id,
                    r.status,
                    r.body.chars().take(200).collect::<String>()
                ));
            }
        }
    }
    failures
}

/// Starts `fernetd ROLE --config TOML`, its log named `name`.
fn spawn(name: &str, role: &str, toml: &Path) -> Daemon {
    Daemon::spawn(
        name,
        [OsStr::new(role), "--config".as_ref(), toml.as_os_str()],
    )
}

#[test]
fn credential_rotations_migrate_the_shared_table_and_keep_every_credential_readable() {
    let _heavy = keystone::exclusive();
    let kept = tempfile::Builder::new()
        .prefix("credential-e2e-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap()
        .keep();
    let dir = kept.as_path();
    let layout = fernetd::demo::prepare(dir, 2).expect("prepare the layout");
    let (mut rotator, admin_config, mut agents) = (
        layout.rotator.clone(),
        layout.admin.clone(),
        layout.agents.clone(),
    );
    drop(layout);
    let tokens: Vec<PathBuf> = agents
        .iter()
        .map(|a| a.repositories[0].path.clone())
        .collect();
    let credentials: Vec<PathBuf> = tokens
        .iter()
        .map(|t| t.with_file_name("credential-keys"))
        .collect();
    let regions: Vec<String> = agents.iter().map(|a| a.region.clone()).collect();
    let policy = TestPolicy {
        expiration: 600,
        allow_expired_window: 0,
        max_active_keys: 3,
    };
    let confs: Vec<PathBuf> = (0..2)
        .map(|i| {
            let conf = dir.join(format!("keystone-{i}.conf"));
            let db = dir.join("keystone.db");
            keystone::region_conf(&conf, &db, &tokens[i], &credentials[i], policy);
            conf
        })
        .collect();
    // The agents' own copies of keystone.conf: the one at RegionOne is broken
    // on purpose later (an unreachable database) while Keystone keeps running.
    let agent_confs: Vec<PathBuf> = confs
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let copy = dir.join(format!("agent-keystone-{i}.conf"));
            std::fs::copy(c, &copy).unwrap();
            copy
        })
        .collect();
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    // Tokens rotate once a year here: the test drives the credential rotations.
    rotator.schedule.cron = "0 0 1 1 *".into();
    rotator.policy.token_expiration = Duration::from_secs(600);
    rotator.repositories[0].max_active_keys = 3;
    rotator.audit_log = Some(dir.join("rotator-audit.jsonl"));
    let admin_toml = write("admin.toml", toml::to_string(&admin_config).unwrap());
    let mut agent_tomls = Vec::new();
    for ((agent, credential), conf) in agents.iter_mut().zip(&credentials).zip(&agent_confs) {
        agent.repositories.push(AgentRepository {
            name: "credential".into(),
            path: credential.clone(),
            owner: None,
        });
        agent.keystone_conf = Some(conf.clone());
        agent.credential = Some(AgentCredentialConfig {
            keystone_manage: keystone::keystone_manage(),
            run_timeout: fernetd::config::DEFAULT_CREDENTIAL_RUN_TIMEOUT,
        });
        agent.audit_log = Some(dir.join(format!("agent-{}-audit.jsonl", agent.region)));
        agent_tomls.push(write(
            &format!("agent-{}.toml", agent.region),
            toml::to_string(&agent).unwrap(),
        ));
    }
    let spawn_agent = |i: usize| {
        spawn(
            &format!("credential-agent-{}", regions[i]),
            "agent",
            &agent_tomls[i],
        )
    };
    let mut agent_daemons: Vec<Daemon> = (0..2).map(spawn_agent).collect();
    let rotator_toml = write("rotator-tokens.toml", toml::to_string(&rotator).unwrap());
    let mut rotator_daemon = spawn("credential-rotator-tokens", "rotator", &rotator_toml);
    wait_for(
        Duration::from_secs(60),
        "tokens generation 1 everywhere",
        || tokens.iter().all(|t| installed(t) >= 1).then_some(()),
    );
    // The agents manage `credential` but were sent nothing: no directory, so
    // Keystone is not handed an empty repository.
    for c in &credentials {
        assert!(
            !c.exists(),
            "{} created before the rotator's set",
            c.display()
        );
    }

    // 1. A cloud started without credential keys: Keystone writes its rows
    //    under the public all-zero key.
    keystone::bootstrap(&confs[0]);
    let keystones: Vec<Keystone> = confs
        .iter()
        .enumerate()
        .map(|(i, c)| Keystone::start(c, &dir.join(format!("keystone-{i}.log")), 1))
        .collect();
    let mut apis: Vec<Api> = keystones.iter().map(Api::new).collect();
    let ids = apis[0].ids();
    let mut creds = Vec::new();
    for i in 0..4 {
        let n = creds.len();
        creds.push(create_ec2(&mut apis[i % 2], &ids, n));
    }
    let failures = read_back(&mut apis, &creds, 2);
    assert!(failures.is_empty(), "before fernetd: {failures:#?}");

    // 2. fernetd adopts it: the rotator now owns `credential`, migrated at RegionOne.
    rotator_daemon.kill();
    rotator.repositories.push(RepositoryConfig {
        name: "credential".into(),
        max_active_keys: 3,
        import: None,
        schedule: None,
    });
    rotator.credential = Some(CredentialConfig {
        migrate_region: regions[0].clone(),
        cache_time: CACHE_TIME,
    });
    let rotator_toml = write("rotator.toml", toml::to_string(&rotator).unwrap());
    rotator_daemon = spawn("credential-rotator", "rotator", &rotator_toml);
    wait_for(
        Duration::from_secs(60),
        "credential generation 1 everywhere",
        || credentials.iter().all(|c| installed(c) >= 1).then_some(()),
    );
    let failures = read_back(&mut apis, &creds, 2);
    assert!(
        failures.is_empty(),
        "keys installed, rows still under the all-zero key: {failures:#?}"
    );
    // `admin rotate` with no repository never touches credential keys.
    let (_, out) = admin(&admin_toml, &["rotate", "--wait", "30"]);
    assert!(!out.contains("credential"), "{out}");
    assert_eq!(credential_generation(&admin_toml).0, 1);

    // 3. Five credential rotations, credentials created between them, one of
    //    them with RegionTwo's agent stopped.
    let mut generation = 1;
    for round in 1..=5 {
        let stop_region_two = round == 3;
        let (code, out) = admin(&admin_toml, &["rotate", "--repository", "credential"]);
        assert_eq!(
            code, 1,
            "round {round}: the rotation is held, not committed at once:\n{out}"
        );
        assert!(
            out.contains("credential cache time"),
            "round {round}:\n{out}"
        );
        let status = admin_json(&admin_toml, &["credentials", "--json"]);
        assert_eq!(status["last_migrate_passed"], true, "{status}");
        assert_eq!(status["last_migrate_generation"], generation, "{status}");
        assert_eq!(
            status["rows"]["primary"], status["rows"]["total"],
            "{status}"
        );
        assert_eq!(status["rows"]["total"], creds.len() as u64, "{status}");
        if round == 1 {
            // The adopted rows were under the all-zero key; the migrate moved them.
            assert_eq!(status["rows_before"]["null"], 4, "{status}");
            assert_eq!(status["rows"]["null"], 0, "{status}");
            // And the rotator's metrics say so.
            let metrics_addr = rotator.metrics_listen.expect("metrics address");
            let metrics = keystone::http(metrics_addr, "GET", "/metrics", &[], None)
                .expect("scrape the rotator")
                .body;
            for line in [
                "fernetd_rotator_credential_rows{key=\"null\",when=\"before\"} 4".to_owned(),
                "fernetd_rotator_credential_rows{key=\"null\",when=\"after\"} 0".to_owned(),
                format!(
                    "fernetd_rotator_credential_rows{{key=\"primary\",when=\"after\"}} {}",
                    creds.len()
                ),
            ] {
                assert!(
                    metrics.lines().any(|l| l == line),
                    "no {line:?} in\n{metrics}"
                );
            }
        }
        if stop_region_two {
            agent_daemons[1].signal(Signal::STOP);
        }
        let next = wait_for(
            Duration::from_secs(60),
            "the held credential rotation to be committed",
            || {
                let (g, _) = credential_generation(&admin_toml);
                (g > generation).then_some(g)
            },
        );
        assert_eq!(next, generation + 1);
        generation = next;
        if stop_region_two {
            // Committed; RegionTwo still holds the previous generation, whose
            // staged key is the new primary: nothing fails anywhere.
            wait_for(Duration::from_secs(30), "RegionOne to install it", || {
                (installed(&credentials[0]) == generation).then_some(())
            });
            assert_eq!(installed(&credentials[1]), generation - 1);
            creds.push(create_ec2(&mut apis[0], &ids, creds.len()));
            let failures = read_back(&mut apis, &creds, 2);
            assert!(failures.is_empty(), "RegionTwo stopped: {failures:#?}");
            // The next rotation waits for it.
            let (code, out) = admin(
                &admin_toml,
                &["rotate", "--repository", "credential", "--wait", "1"],
            );
            assert_eq!(code, 1, "{out}");
            assert!(
                out.contains("blocked") && out.contains(&regions[1]),
                "{out}"
            );
            assert_eq!(credential_generation(&admin_toml).0, generation);
            agent_daemons[1].signal(Signal::CONT);
        }
        wait_for(
            Duration::from_secs(60),
            "every agent to acknowledge the credential generation",
            || {
                let (g, all) = credential_generation(&admin_toml);
                (g == generation && all).then_some(())
            },
        );
        for api in apis.iter_mut() {
            let n = creds.len();
            creds.push(create_ec2(api, &ids, n));
        }
        let failures = read_back(&mut apis, &creds, 3);
        assert!(
            failures.is_empty(),
            "after credential rotation {round} (generation {generation}): {failures:#?}"
        );
        println!(
            "credential rotation {round}: generation {generation}, {} credentials read back in both regions",
            creds.len()
        );
    }

    // 4. The migrate fails (RegionOne's agent cannot reach the database): the
    //    rotation is refused with the reason, no key changes anywhere.
    let good = std::fs::read_to_string(&agent_confs[0]).unwrap();
    let broken = good.replace(
        &format!("sqlite:///{}", dir.join("keystone.db").display()),
        "sqlite:////nonexistent-fernetd-test/keystone.db",
    );
    assert_ne!(good, broken);
    std::fs::write(&agent_confs[0], broken).unwrap();
    let before: Vec<_> = credentials
        .iter()
        .map(|c| fernetd::repository::load(c).unwrap().digest())
        .collect();
    let (code, out) = admin(&admin_toml, &["rotate", "--repository", "credential"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("credential migrate at") && out.contains("failed"),
        "{out}"
    );
    assert!(out.contains("unable to open database file"), "{out}");
    let status = admin_json(&admin_toml, &["credentials", "--json"]);
    assert_eq!(status["last_migrate_passed"], false, "{status}");
    let (code, _) = admin(&admin_toml, &["credentials"]);
    assert_eq!(code, 1, "a failed migrate is a negative answer");
    std::thread::sleep(CACHE_TIME + Duration::from_secs(1));
    assert_eq!(credential_generation(&admin_toml).0, generation);
    for (c, digest) in credentials.iter().zip(&before) {
        assert_eq!(fernetd::repository::load(c).unwrap().digest(), *digest);
    }
    let failures = read_back(&mut apis, &creds, 1);
    assert!(
        failures.is_empty(),
        "after the failed migrate: {failures:#?}"
    );
    std::fs::write(&agent_confs[0], good).unwrap();
    let audit = std::fs::read_to_string(dir.join("rotator-audit.jsonl")).unwrap();
    assert!(
        audit.contains("\"event\":\"credential_migrate\"")
            && audit.contains("\"outcome\":\"failed\""),
        "{audit}"
    );

    // 5. The contrast: RegionTwo's repository rotated three times in a row, as
    //    a token repository would be, with no migrate: Keystone answers 500.
    agent_daemons[1].kill();
    rotator_daemon.kill();
    for _ in 0..3 {
        keystone::run_ok(
            Command::new(fernetd_bin())
                .args(["repo", "rotate", "--max-active-keys", "3", "--force"])
                .arg("--repository")
                .arg(&credentials[1]),
        );
    }
    let lost = creds
        .iter()
        .filter(|c| {
            apis[1]
                .call("GET", &format!("/v3/credentials/{}", c.id), None)
                .status
                == 500
        })
        .count();
    println!(
        "contrast: three rotations without a migrate: {lost} of {} credentials answer 500 in {}",
        creds.len(),
        regions[1]
    );
    assert_eq!(lost, creds.len(), "every row was under the purged primary");
    drop(keystones);
    drop(agent_daemons);
    drop(rotator_daemon);
    std::fs::remove_dir_all(dir).unwrap();
}

/// The credential repository's configuration mistakes stop the daemons with
/// exit 2 and the reason, before anything is written.
#[test]
fn credential_configuration_mistakes_are_refused_with_exit_2() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let layout = fernetd::demo::prepare(dir, 1).expect("prepare the layout");
    let (mut rotator, mut agent) = (layout.rotator.clone(), layout.agents[0].clone());
    drop(layout);
    let refused = |role: &str, toml: String| -> String {
        let path = dir.join(format!("{role}.toml"));
        std::fs::write(&path, toml).unwrap();
        let out = Command::new(fernetd_bin())
            .args([role, "--config"])
            .arg(&path)
            .arg("--check")
            .output()
            .expect("run fernetd");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(2), "{role}: {stderr}");
        stderr
    };
    rotator.repositories.push(RepositoryConfig {
        name: "credential".into(),
        max_active_keys: 5,
        import: None,
        schedule: None,
    });
    rotator.credential = Some(CredentialConfig {
        migrate_region: agent.region.clone(),
        cache_time: CACHE_TIME,
    });
    let err = refused("rotator", toml::to_string(&rotator).unwrap());
    assert!(err.contains("exactly 3"), "{err}");
    rotator.repositories[1].max_active_keys = 3;
    rotator.credential = None;
    let err = refused("rotator", toml::to_string(&rotator).unwrap());
    assert!(
        err.contains("[credential] section with migrate_region"),
        "{err}"
    );
    rotator.repositories[0].schedule = Some("0 3 * * 0".into());
    rotator.credential = Some(CredentialConfig {
        migrate_region: agent.region.clone(),
        cache_time: CACHE_TIME,
    });
    let err = refused("rotator", toml::to_string(&rotator).unwrap());
    assert!(err.contains("only the `credential` repository"), "{err}");
    assert!(
        !rotator.state_dir.exists(),
        "a refused configuration wrote state"
    );

    agent.credential = Some(AgentCredentialConfig {
        keystone_manage: PathBuf::from("/usr/bin/keystone-manage"),
        run_timeout: fernetd::config::DEFAULT_CREDENTIAL_RUN_TIMEOUT,
    });
    let err = refused("agent", toml::to_string(&agent).unwrap());
    assert!(err.contains("needs keystone_conf"), "{err}");
}
