//! A region with two controllers behind a VIP, against real Keystone 30.0.0:
//! RegionOne runs two Keystones (each reading its own repository, kept by its
//! own fernetd agent) behind haproxy rendered from `keystone/haproxy.cfg.template`;
//! RegionTwo runs one. Tokens issued through either region's address validate
//! through the other's across rotations, and killing one RegionOne controller's
//! Keystone mid-run costs no validation through its VIP.

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::daemon::{Daemon, free_addr};
use crate::common::keystone::{self, Client, Regions, TestPolicy, wait_for};

/// Rotating every 2 s with 24 s tokens: Keystone's formula wants 14 keys.
const EXPIRATION: u64 = 24;
const KEYS: usize = 14;
const CRON: &str = "*/2 * * * * *";

/// haproxy from Debian's package, installed when missing.
fn haproxy() -> PathBuf {
    let found = || {
        ["/usr/sbin/haproxy", "/usr/bin/haproxy"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
    };
    crate::common::debian::ensure("haproxy", || found().is_some());
    found().expect("haproxy installed but not found")
}

/// haproxy in the foreground on `cfg`; killed on drop.
struct Haproxy(Child);

impl Haproxy {
    fn start(cfg: &Path, log: &Path) -> Haproxy {
        let out = std::fs::File::create(log).expect("haproxy log");
        let child = Command::new(haproxy())
            .args(["-db", "-f"])
            .arg(cfg)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("clone"))
            .stderr(out)
            .spawn()
            .expect("start haproxy");
        Haproxy(child)
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn render_vip(cfg: &Path, vip: SocketAddr, servers: &[(&str, SocketAddr)]) {
    let mut cmd = Command::new("bash");
    cmd.arg(keystone::bundle().join("render-haproxy.sh"))
        .arg(format!("VIP={vip}"));
    for (name, addr) in servers {
        cmd.arg(format!("SERVER={name}={addr}"));
    }
    let out = keystone::run_ok(&mut cmd);
    std::fs::write(cfg, &out.stdout).expect("write haproxy.cfg");
}

fn generation(repo: &Path) -> u64 {
    fernetd::repository::read_stamp(repo)
        .ok()
        .flatten()
        .map_or(0, |s| s.generation)
}

/// Issues an unscoped token through `from` and validates it through `at` with a
/// caller token issued there: `Ok` when Keystone answered 200.
fn cross(from: Client, at: Client) -> Result<(), String> {
    let token = from.issue(None)?;
    let caller = at.issue(None)?;
    let r = at
        .validate(&caller, &token)
        .map_err(|e| format!("validate at {}: {e}", at.addr))?;
    if r.status == 200 {
        Ok(())
    } else {
        Err(format!("validate at {}: {} {}", at.addr, r.status, r.body))
    }
}

#[test]
fn tokens_cross_between_a_vip_of_two_controllers_and_another_region_through_rotations_and_a_lost_controller()
 {
    let _heavy = keystone::exclusive();
    let haproxy_bin = haproxy();
    assert!(haproxy_bin.exists());
    let kept = tempfile::Builder::new()
        .prefix("keystone-vip-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("tempdir")
        .keep();
    let dir = kept.as_path();
    // Two regions of two controllers; RegionTwo's second controller is not used.
    let layout = fernetd::demo::prepare_with(dir, 2, 2).expect("prepare the layout");
    let (mut rotator, mut agents, names) = (
        layout.rotator.clone(),
        layout.agents.clone(),
        layout.names.clone(),
    );
    drop(layout);
    agents.truncate(3);
    rotator.agents.truncate(3);
    assert_eq!(
        names[..3],
        ["ctl1.regionone", "ctl2.regionone", "ctl1.regiontwo"]
    );
    let repos: Vec<PathBuf> = agents
        .iter()
        .map(|a| a.repositories[0].path.clone())
        .collect();
    let policy = TestPolicy {
        expiration: EXPIRATION,
        allow_expired_window: 0,
        max_active_keys: KEYS,
    };
    let confs = Regions::configure(dir, &repos, policy);
    rotator.schedule.cron = CRON.into();
    rotator.policy.token_expiration = Duration::from_secs(EXPIRATION);
    rotator.policy.allow_expired_window = Duration::ZERO;
    rotator.repositories[0].max_active_keys = KEYS;
    rotator.keystone_conf = Some(confs[0].clone());
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write");
        path
    };
    let rotator_toml = write("rotator.toml", toml::to_string(&rotator).expect("toml"));
    let mut daemons: Vec<Daemon> = agents
        .iter_mut()
        .zip(&confs)
        .zip(&names)
        .map(|((agent, conf), name)| {
            agent.keystone_conf = Some(conf.clone());
            let path = write(
                &format!("agent-{name}.toml"),
                toml::to_string(&agent).expect("toml"),
            );
            Daemon::spawn(
                &format!("vip-agent-{name}"),
                [OsStr::new("agent"), "--config".as_ref(), path.as_os_str()],
            )
        })
        .collect();
    daemons.push(Daemon::spawn(
        "vip-rotator",
        [
            OsStr::new("rotator"),
            "--config".as_ref(),
            rotator_toml.as_os_str(),
        ],
    ));
    wait_for(
        Duration::from_secs(60),
        "generation 1 at every controller",
        || repos.iter().all(|r| generation(r) >= 1).then_some(()),
    );

    let mut keystones = Regions::launch(dir, confs, 1);
    let vip = free_addr();
    let cfg = dir.join("haproxy-regionone.cfg");
    render_vip(
        &cfg,
        vip,
        &[
            ("ctl1.regionone", keystones.keystones[0].addr),
            ("ctl2.regionone", keystones.keystones[1].addr),
        ],
    );
    let _haproxy = Haproxy::start(&cfg, &dir.join("haproxy.log"));
    let region_one = Client::new(vip);
    let region_two = keystones.keystones[2].client();
    wait_for(Duration::from_secs(30), "the VIP serving", || {
        region_one.issue(None).ok()
    });

    // Tokens cross both ways, through the VIP, for at least four rotations.
    let first = generation(&repos[0]);
    let mut checks = 0;
    let mut failures = Vec::new();
    let round = |checks: &mut u32, failures: &mut Vec<String>| {
        for (from, at) in [(region_one, region_two), (region_two, region_one)] {
            *checks += 1;
            if let Err(e) = cross(from, at) {
                failures.push(e);
            }
        }
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    while generation(&repos[0]) < first + 4 {
        assert!(Instant::now() < deadline, "four rotations did not happen");
        round(&mut checks, &mut failures);
    }
    // One RegionOne controller's Keystone dies; its VIP keeps answering.
    let lost = keystones.keystones.remove(1);
    drop(lost);
    let after_loss = generation(&repos[0]);
    let deadline = Instant::now() + Duration::from_secs(90);
    while generation(&repos[0]) < after_loss + 3 {
        assert!(
            Instant::now() < deadline,
            "three rotations after the loss did not happen"
        );
        round(&mut checks, &mut failures);
    }
    let last = generation(&repos[0]);
    println!(
        "keystone vip: {} rotations (generation {first} -> {last}), {checks} cross-region validations through the VIP, \
         one controller's Keystone killed after generation {after_loss}, {} failures",
        last - first,
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} failures: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    // Every controller, the one whose Keystone died included, holds the same set.
    wait_for(
        Duration::from_secs(20),
        "every controller on one set",
        || {
            let now: Vec<_> = repos
                .iter()
                .map(|r| fernetd::repository::load(r).expect("repository").digest())
                .collect();
            now.windows(2).all(|w| w[0] == w[1]).then_some(())
        },
    );
    drop(daemons);
    // Passed: the logs are not needed.
    let _ = std::fs::remove_dir_all(dir);
}
