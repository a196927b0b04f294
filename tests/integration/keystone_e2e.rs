//! The multi-region proof against real Keystone 30.0.0: regional Keystones under
//! gunicorn (the `keystone/` bundle) sharing one identity database, each reading
//! its own key repository; tokens issued in one region validated in the others.
//! The contrast shows what the test catches: a repository copied naively two
//! rotations ahead makes Keystone answer 404 "Could not recognize Fernet token".

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use fernetd::policy::{KeystoneConf, PolicyError};

use std::ffi::OsStr;

use rustix::process::Signal;

use crate::common::daemon::Daemon;
use crate::common::fernetd_bin;
use crate::common::keystone::{self, Regions, Response, TestPolicy, wait_for};

const NOT_RECOGNIZED: &str = "Could not recognize Fernet token";

/// Runs `fernetd repo ARGS... --repository DIR`, panicking on failure.
fn fernetd_repo(dir: &Path, args: &[&str]) {
    keystone::run_ok(
        Command::new(fernetd_bin())
            .arg("repo")
            .args(args)
            .arg("--repository")
            .arg(dir),
    );
}

/// What today's tools do: copy every key file over the target in place and
/// delete the ones the source lacks (`rsync --delete`), with no generation check.
fn copy_naively(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    let names = |dir: &Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.parse::<u32>().is_ok())
            .collect()
    };
    let wanted = names(from);
    for name in &wanted {
        std::fs::copy(from.join(name), to.join(name)).unwrap();
    }
    for name in names(to) {
        if !wanted.contains(&name) {
            std::fs::remove_file(to.join(name)).unwrap();
        }
    }
}

/// A token issued at region `from`, validated at every other region, each with a
/// caller token of its own (as a service's auth middleware would): the answers.
fn cross_check(regions: &Regions, from: usize) -> Vec<(usize, Response)> {
    let token = regions.keystones[from]
        .client()
        .issue(Some("admin"))
        .expect("issue a token");
    (0..regions.keystones.len())
        .filter(|&at| at != from)
        .map(|at| {
            let ks = regions.keystones[at].client();
            let caller = ks.issue(None).expect("issue a caller token");
            (at, ks.validate(&caller, &token).expect("validate request"))
        })
        .collect()
}

#[test]
fn naive_copy_two_rotations_ahead_is_rejected_by_keystone() {
    let _heavy = keystone::exclusive();
    let tmp = tempfile::tempdir().unwrap();
    let canonical = tmp.path().join("canonical");
    fernetd_repo(&canonical, &["init", "--max-active-keys", "3"]);
    let repos: Vec<PathBuf> = (0..3)
        .map(|i| tmp.path().join(format!("region-{i}")))
        .collect();
    for repo in &repos {
        copy_naively(&canonical, repo);
    }
    let policy = TestPolicy {
        expiration: 600,
        allow_expired_window: 0,
        max_active_keys: 3,
    };
    let regions = Regions::start(tmp.path(), &repos, policy, 1);

    for from in 0..3 {
        for (at, r) in cross_check(&regions, from) {
            assert_eq!(
                r.status, 200,
                "same keys: region {from} -> {at}: {}",
                r.body
            );
        }
    }
    // One rotation ahead: its new primary is the staged key the others hold.
    fernetd_repo(&canonical, &["rotate", "--max-active-keys", "3"]);
    copy_naively(&canonical, &repos[0]);
    for (at, r) in cross_check(&regions, 0) {
        assert_eq!(
            r.status, 200,
            "one rotation ahead: region 0 -> {at}: {}",
            r.body
        );
    }
    // Two rotations ahead: region 0 encrypts with a key no other region has seen.
    fernetd_repo(&canonical, &["rotate", "--max-active-keys", "3"]);
    copy_naively(&canonical, &repos[0]);
    let answers = cross_check(&regions, 0);
    for (at, r) in &answers {
        assert_eq!(
            r.status, 404,
            "two rotations ahead: region 0 -> {at}: {}",
            r.body
        );
        assert!(r.body.contains(NOT_RECOGNIZED), "region {at}: {}", r.body);
    }
    println!(
        "contrast: a repository copied two rotations ahead to region 0: {} of {} validations elsewhere answered 404 {NOT_RECOGNIZED:?}",
        answers.len(),
        answers.len()
    );
}

/// The template as shipped renders to a keystone.conf whose policy fernetd reads
/// and accepts for the schedule it documents (daily), and rejects for hourly.
#[test]
fn template_defaults_satisfy_the_documented_policy() {
    let tmp = tempfile::tempdir().unwrap();
    let conf = tmp.path().join("keystone.conf");
    keystone::render_conf(
        &conf,
        &[(
            "DATABASE_CONNECTION",
            "mysql+pymysql://keystone:secret@db/keystone",
        )],
        "",
    );
    let kc = KeystoneConf::load(&conf).unwrap();
    assert_eq!(kc.token_provider, "fernet");
    assert_eq!(kc.policy.max_active_keys, 5);
    assert_eq!(kc.token_cache_ttl, Some(Duration::from_secs(300)));
    assert_eq!(kc.token_key_repository, kc.receipt_key_repository);
    let day = Duration::from_secs(86_400);
    kc.policy.check(day).unwrap();
    kc.check_cache(kc.policy.max_active_keys, day).unwrap();
    let hourly = kc.policy.check(Duration::from_secs(3600)).unwrap_err();
    assert!(
        matches!(hourly, PolicyError::TooFewKeys { minimum: 51, .. }),
        "{hourly}"
    );
}

/// What the client saw: tokens issued, validations made, and every failure.
#[derive(Debug, Default)]
struct Tally {
    issued: u64,
    checked: u64,
    /// Re-validations of tokens aged close to their expiry, each at one region.
    rechecked: u64,
    /// Re-validations skipped because the token was about to expire.
    too_old: u64,
    failures: Vec<String>,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        self.issued += other.issued;
        self.checked += other.checked;
        self.rechecked += other.rechecked;
        self.too_old += other.too_old;
        self.failures.extend(other.failures);
    }
}

/// One client per region: issues a token there (every fifth project-scoped, the
/// rest unscoped: same keys, a twentieth of Keystone's CPU), validates it at every
/// other region at once, and again at one region (in turn) when it is six seconds from
/// expiry, by which time its key is among the oldest kept.
struct Traffic {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<Tally>>,
}

impl Traffic {
    fn start(addrs: &[std::net::SocketAddr], expiration: Duration) -> Traffic {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let threads = (0..addrs.len())
            .map(|from| {
                let addrs = addrs.to_vec();
                let stop = stop.clone();
                std::thread::spawn(move || client(from, &addrs, expiration, &stop))
            })
            .collect();
        Traffic { stop, threads }
    }

    fn finish(self) -> Tally {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut total = Tally::default();
        for t in self.threads {
            total.add(t.join().expect("client thread"));
        }
        total
    }
}

/// One region's client: its own Keystone clients, caller tokens and tally.
struct Client {
    from: usize,
    regions: Vec<keystone::Client>,
    expiration: Duration,
    /// A caller token per region, as a service there holds one, renewed well
    /// before it expires.
    callers: Vec<Option<(String, std::time::Instant)>>,
    rechecks_made: usize,
    tally: Tally,
}

impl Client {
    fn caller(&mut self, at: usize) -> Option<String> {
        if let Some((token, since)) = &self.callers[at] {
            if since.elapsed() < self.expiration / 3 {
                return Some(token.clone());
            }
        }
        let since = std::time::Instant::now();
        match self.regions[at].issue(None) {
            Ok(token) => {
                self.callers[at] = Some((token.clone(), since));
                Some(token)
            }
            Err(e) => {
                self.tally
                    .failures
                    .push(format!("caller token at region {at}: {e}"));
                None
            }
        }
    }

    fn validate(&mut self, at: usize, token: &str, issued: std::time::Instant, what: &str) {
        let Some(auth) = self.caller(at) else { return };
        let from = self.from;
        match self.regions[at].validate(&auth, token) {
            Ok(r) if r.status == 200 => {}
            Ok(r) => self.tally.failures.push(format!(
                "{what} ({:.1} s old): region {from} -> {at}: {} {}",
                issued.elapsed().as_secs_f64(),
                r.status,
                r.body.trim()
            )),
            Err(e) => self
                .tally
                .failures
                .push(format!("{what}: region {from} -> {at}: {e}")),
        }
    }

    /// Re-validates the tokens now close to expiry, each at one region in turn
    /// (the issuer's included): by then their key is among the oldest the
    /// repositories keep. One region per token keeps the client ahead of its
    /// backlog on two busy cores.
    fn recheck_due(
        &mut self,
        aging: &mut std::collections::VecDeque<(String, std::time::Instant)>,
    ) {
        // As close to expiry as queueing allows.
        let due = self.expiration.saturating_sub(Duration::from_secs(6));
        let margin = Duration::from_secs(3);
        while aging.front().is_some_and(|(_, t)| t.elapsed() >= due) {
            let Some((token, issued)) = aging.pop_front() else {
                break;
            };
            // The client's clock started before Keystone's, so this errs old.
            if issued.elapsed() + margin >= self.expiration {
                self.tally.too_old += 1;
                continue;
            }
            self.rechecks_made += 1;
            let at = (self.from + self.rechecks_made) % self.regions.len();
            self.validate(at, &token, issued, "aged token");
            self.tally.rechecked += 1;
        }
    }
}

fn client(
    from: usize,
    addrs: &[std::net::SocketAddr],
    expiration: Duration,
    stop: &std::sync::atomic::AtomicBool,
) -> Tally {
    let mut c = Client {
        from,
        regions: addrs.iter().map(|&a| keystone::Client::new(a)).collect(),
        expiration,
        callers: vec![None; addrs.len()],
        rechecks_made: 0,
        tally: Tally::default(),
    };
    let mut aging = std::collections::VecDeque::new();
    let mut n = 0u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        c.recheck_due(&mut aging);
        n += 1;
        let issued = std::time::Instant::now();
        let token = match c.regions[from].issue((n % 5 == 0).then_some("admin")) {
            Ok(token) => token,
            Err(e) => {
                c.tally
                    .failures
                    .push(format!("issue at region {from}: {e}"));
                continue;
            }
        };
        c.tally.issued += 1;
        for at in (0..addrs.len()).filter(|&at| at != from) {
            c.validate(at, &token, issued, "fresh token");
            c.tally.checked += 1;
        }
        aging.push_back((token, issued));
    }
    c.tally
}

/// The e2e policy: tokens live 24 s, keys rotate every 2 s, so Keystone's
/// formula asks for ceil(24 / 2) + 2 = 14 keys; over the run keys are purged
/// every rotation once 14 exist, exactly when the formula allows.
const E2E_EXPIRATION: u64 = 24;
const E2E_KEYS: usize = 14;
const E2E_CRON: &str = "*/2 * * * * *";
const PERIOD: Duration = Duration::from_secs(2);

/// The generation recorded in a repository by its agent (0 = none yet).
fn installed_generation(repo: &Path) -> u64 {
    fernetd::repository::read_stamp(repo)
        .ok()
        .flatten()
        .map_or(0, |s| s.generation)
}

/// `fernetd admin status --json`: the `tokens` repository's generation and the
/// regions blocking its next rotation.
fn rotator_status(admin_toml: &Path) -> Option<(u64, Vec<String>)> {
    let out = Command::new(fernetd_bin())
        .args(["admin", "--config"])
        .arg(admin_toml)
        .args(["status", "--json"])
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let repo = v["repositories"]
        .as_array()?
        .iter()
        .find(|r| r["name"] == "tokens")?;
    let blocking = repo["blocking_regions"]
        .as_array()?
        .iter()
        .filter_map(|r| r.as_str().map(str::to_owned))
        .collect();
    Some((repo["generation"].as_u64()?, blocking))
}

#[test]
fn three_regions_validate_every_token_through_rotations_and_a_cut_off_agent() {
    let _heavy = keystone::exclusive();
    // Kept when the test fails (Keystone and daemon logs), removed when it passes.
    let kept = tempfile::Builder::new()
        .prefix("keystone-e2e-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap()
        .keep();
    let dir = kept.as_path();
    // CA, certificates and loopback configuration for a rotator and three agents.
    let layout = fernetd::demo::prepare(dir, 3).expect("prepare the demo layout");
    let (mut rotator, admin, mut agents) = (
        layout.rotator.clone(),
        layout.admin.clone(),
        layout.agents.clone(),
    );
    drop(layout); // releases the reserved ports for the daemons
    let repos: Vec<PathBuf> = agents
        .iter()
        .map(|a| a.repositories[0].path.clone())
        .collect();
    let regions: Vec<String> = agents.iter().map(|a| a.region.clone()).collect();
    let policy = TestPolicy {
        expiration: E2E_EXPIRATION,
        allow_expired_window: 0,
        max_active_keys: E2E_KEYS,
    };
    let confs = Regions::configure(dir, &repos, policy);

    // Both daemons take the policy from the regions' keystone.conf and check it.
    rotator.schedule.cron = E2E_CRON.into();
    rotator.policy.token_expiration = Duration::from_secs(E2E_EXPIRATION);
    rotator.policy.allow_expired_window = Duration::ZERO;
    rotator.repositories[0].max_active_keys = E2E_KEYS;
    rotator.keystone_conf = Some(confs[0].clone());
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let rotator_toml = write("rotator-e2e.toml", toml::to_string(&rotator).unwrap());
    let admin_toml = write("admin-e2e.toml", toml::to_string(&admin).unwrap());
    let mut daemons: Vec<Daemon> = agents
        .iter_mut()
        .zip(&confs)
        .map(|(agent, conf)| {
            agent.keystone_conf = Some(conf.clone());
            let path = write(
                &format!("agent-{}.toml", agent.region),
                toml::to_string(&agent).unwrap(),
            );
            Daemon::spawn(
                &format!("e2e-agent-{}", agent.region),
                [OsStr::new("agent"), "--config".as_ref(), path.as_os_str()],
            )
        })
        .collect();
    let mut rotator_daemon = Daemon::spawn(
        "e2e-rotator",
        [
            OsStr::new("rotator"),
            "--config".as_ref(),
            rotator_toml.as_os_str(),
        ],
    );
    let logs = |daemons: &[Daemon]| -> String {
        let daemons = daemons
            .iter()
            .chain([&rotator_daemon])
            .map(|d| d.log_path().display().to_string());
        let keystones = (0..3).map(|i| dir.join(format!("keystone-{i}.log")).display().to_string());
        format!(
            "logs: {}",
            daemons.chain(keystones).collect::<Vec<_>>().join(" ")
        )
    };
    wait_for(
        Duration::from_secs(60),
        "generation 1 at every agent",
        || {
            repos
                .iter()
                .all(|r| installed_generation(r) >= 1)
                .then_some(())
        },
    );

    let keystones = Regions::launch(dir, confs, 2);
    let first = installed_generation(&repos[0]);
    let traffic = Traffic::start(&keystones.addrs(), Duration::from_secs(E2E_EXPIRATION));

    // 1. Ten rotations under traffic.
    wait_for(PERIOD * 40, "ten rotations", || {
        (installed_generation(&repos[0]) >= first + 10).then_some(())
    });

    // 2. Cut one region's agent off: the rotator must stop at one generation ahead of it.
    let cut = regions.len() - 1;
    daemons[cut].signal(Signal::STOP);
    let cut_at = std::time::Instant::now();
    let held = installed_generation(&repos[cut]);
    let (blocked_at, _) = wait_for(
        PERIOD * 15,
        "the rotator to report the cut-off region as blocking",
        || rotator_status(&admin_toml).filter(|(_, blocking)| blocking.contains(&regions[cut])),
    );
    assert!(
        blocked_at <= held + 1,
        "the rotator committed generation {blocked_at} while {} holds {held}",
        regions[cut]
    );
    // Several rotation periods pass without a rotation.
    let hold = std::time::Instant::now();
    while hold.elapsed() < PERIOD * 5 {
        let (generation, blocking) = rotator_status(&admin_toml).expect("admin status");
        assert_eq!(
            generation, blocked_at,
            "rotated past a region that has not acknowledged"
        );
        assert!(blocking.contains(&regions[cut]), "{blocking:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
    let blocked_for = cut_at.elapsed();

    // 3. Reconnect: the region catches up and rotations resume.
    daemons[cut].signal(Signal::CONT);
    let resumed = std::time::Instant::now();
    wait_for(PERIOD * 15, "the cut-off region to catch up", || {
        (installed_generation(&repos[cut]) >= blocked_at).then_some(())
    });
    let caught_up = resumed.elapsed();
    wait_for(PERIOD * 15, "rotations to resume", || {
        repos
            .iter()
            .all(|r| installed_generation(r) >= blocked_at + 2)
            .then_some(())
    });

    let tally = traffic.finish();
    let last = installed_generation(&repos[0]);
    println!(
        "keystone e2e: {} rotations (generation {first} -> {last}) across {} regions; {} tokens issued, \
         {} validated at every other region, {} re-validated near expiry ({} skipped as too old); \
         {} failures; {} cut off {:.1} s with rotation blocked at generation {blocked_at}, caught up {:.1} s after reconnecting",
        last - first,
        regions.len(),
        tally.issued,
        tally.checked,
        tally.rechecked,
        tally.too_old,
        tally.failures.len(),
        regions[cut],
        blocked_for.as_secs_f64(),
        caught_up.as_secs_f64(),
    );
    assert!(
        tally.failures.is_empty(),
        "{} failures:\n{}\n{}",
        tally.failures.len(),
        tally.failures.join("\n"),
        logs(&daemons)
    );
    assert!(last - first >= 10, "only {} rotations", last - first);
    assert!(
        tally.issued >= 3 && tally.checked >= 6 && tally.rechecked >= 3,
        "too little traffic: {tally:?}"
    );
    drop(keystones);
    // SIGTERM: every daemon exits cleanly.
    for d in daemons.iter_mut().chain([&mut rotator_daemon]) {
        d.signal(Signal::TERM);
        let status = wait_for(
            Duration::from_secs(30),
            "a clean exit after SIGTERM",
            || d.try_exit(),
        );
        assert!(
            status.success(),
            "{} exited with {status}:\n{}",
            d.name(),
            d.log()
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// `keystone_conf` in agent.toml and rotator.toml: a daemon whose configuration
/// contradicts its Keystone's refuses to start with exit 2 and says why.
#[test]
fn daemons_refuse_a_keystone_conf_they_contradict() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let layout = fernetd::demo::prepare(dir, 1).expect("prepare the demo layout");
    let (mut rotator, mut agent) = (layout.rotator.clone(), layout.agents[0].clone());
    drop(layout);
    let conf = dir.join("keystone.conf");
    keystone::render_conf(
        &conf,
        &[
            ("DATABASE_CONNECTION", "sqlite:////nonexistent/keystone.db"),
            ("KEY_REPOSITORY", "/var/lib/keystone/other-keys"),
        ],
        "",
    );
    let refused = |role: &str, toml: String| -> String {
        let path = dir.join(format!("{role}.toml"));
        std::fs::write(&path, toml).unwrap();
        let mut d = Daemon::spawn(
            &format!("keystone-conf-{role}"),
            [OsStr::new(role), "--config".as_ref(), path.as_os_str()],
        );
        let status = wait_for(Duration::from_secs(30), "the daemon to refuse", || {
            d.try_exit()
        });
        assert_eq!(status.code(), Some(2), "{role}: {status}\n{}", d.log());
        d.log()
    };

    agent.keystone_conf = Some(conf.clone());
    let log = refused("agent", toml::to_string(&agent).unwrap());
    assert!(log.contains("/var/lib/keystone/other-keys"), "{log}");
    assert!(log.contains("Keystone would never see the keys"), "{log}");

    // The demo's 10 s tokens against Keystone's rendered default of 3600 s.
    rotator.keystone_conf = Some(conf);
    let log = refused("rotator", toml::to_string(&rotator).unwrap());
    assert!(log.contains("[token] expiration = 3600 s"), "{log}");
    assert!(log.contains("10 s"), "{log}");
}
