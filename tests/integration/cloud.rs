//! The cloud fernetd is for, run for real and hurt on purpose: the reference
//! cloud of `keystone/eval-cloud.sh` (3 Galera nodes, 3 regions with
//! RegionOne's two controllers behind its VIP, a memcached and a
//! keystonemiddleware-protected service per region, the global identity VIP,
//! fernetd's rotator and one agent per controller), brought up by the very
//! script an operator runs (its `--control` mode), rotating every 15 s.
//!
//! A client issues project-scoped tokens through the global VIP and calls every
//! region's service with them from start to end while the test kills and
//! restarts one RegionOne Keystone, stops an agent so that a generation is
//! committed without its acknowledgement and kills it there, kills the active
//! Galera node, restarts a region's memcached, stops every RegionOne Keystone for
//! a while, and revokes a token in RegionOne. It asserts that no valid token is
//! ever refused, that 5xx happen only while a killed process is being replaced
//! (and how many), that the revocation reaches every region within the bound the
//! bundle documents, that every region converges on every generation, and that
//! each region's service validates against its own region's Keystone only.
//!
//! `FERNETD_CLOUD_FAULT` injects a cause each assertion must catch:
//! `agent-never-installs` (the stopped agent never comes back),
//! `miswired-service` (RegionThree's service validates against RegionTwo's
//! Keystone), `purge-live-key` (an emergency purge of the key signing live tokens).
//! `FERNETD_CLOUD_EVAL_ARGS` passes more flags to `eval-cloud.sh` (the database
//! failover's before/after comparison uses `--db-standby backup --db-options defaults`).

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::common::keystone::{self, Client, http};

/// Rotation period (s); Keystone's formula then wants ceil((120 + 5) / 15) + 2 = 11 keys.
const ROTATE_EVERY: u64 = 15;
/// Cache times (s): auth_token's token_cache_time, Keystone's [token] and [revoke] cache_time.
const MIDDLEWARE_CACHE: u64 = 10;
const KEYSTONE_CACHE: u64 = 5;
const REVOKE_CACHE: u64 = 5;
/// A token is used for this long after its issue (far from its 120 s expiry).
const TOKEN_USE: Duration = Duration::from_secs(30);
/// A new token every this often: about 5 live tokens, each validated by each
/// region's Keystone every MIDDLEWARE_CACHE seconds (~330 ms of CPU each).
const ISSUE_EVERY: Duration = Duration::from_secs(6);
const REGIONS: [&str; 3] = ["RegionOne", "RegionTwo", "RegionThree"];

/// The cloud, driven through `eval-cloud.sh --control`: one command per line.
struct Cloud {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    info: serde_json::Value,
    log: PathBuf,
}

impl Cloud {
    fn start(dir: &Path, extra: &[String]) -> Cloud {
        let log = dir.join("eval-cloud.log");
        let err = std::fs::File::create(&log).expect("eval-cloud log");
        let mut child = Command::new("bash")
            .arg(keystone::bundle().join("eval-cloud.sh"))
            .arg("--control")
            .arg("--dir")
            .arg(dir.join("cloud"))
            .arg("--fernetd")
            .arg(crate::common::fernetd_bin())
            .args(["--rotate-every", &ROTATE_EVERY.to_string()])
            .args(["--middleware-cache-time", &MIDDLEWARE_CACHE.to_string()])
            .args(["--keystone-cache-time", &KEYSTONE_CACHE.to_string()])
            .args(["--revoke-cache-time", &REVOKE_CACHE.to_string()])
            .args(["--admin-password", keystone::ADMIN.1])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .expect("start keystone/eval-cloud.sh");
        let stdin = child.stdin.take().expect("stdin");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        let n = stdout.read_line(&mut line).expect("read eval-cloud");
        let Some(json) = line.strip_prefix("READY ") else {
            let _ = child.wait();
            panic!(
                "eval-cloud did not come up ({n} bytes: {line:?}):\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        };
        let info = serde_json::from_str(json).expect("READY json");
        Cloud {
            child,
            stdin,
            stdout,
            info,
            log,
        }
    }

    /// Sends one command (`kill NAME`, `start NAME`, `wait NAME`...) and
    /// panics unless the cloud answers `ok`.
    fn cmd(&mut self, command: &str) {
        writeln!(self.stdin, "{command}").expect("write to eval-cloud");
        self.stdin.flush().expect("flush");
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("read eval-cloud");
        assert!(
            line.starts_with("ok "),
            "eval-cloud: {command} -> {line:?}\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    fn str(&self, pointer: &str) -> String {
        self.info
            .pointer(pointer)
            .and_then(|v| v.as_str())
            .unwrap_or_else(|| panic!("no {pointer} in {}", self.info))
            .to_owned()
    }

    fn region(&self, region: &str, key: &str) -> String {
        self.str(&format!("/regions/{region}/{key}"))
    }

    fn controllers(&self) -> Vec<(String, String, PathBuf, PathBuf)> {
        REGIONS
            .iter()
            .flat_map(|r| {
                self.info["regions"][r]["controllers"]
                    .as_array()
                    .expect("controllers")
                    .iter()
                    .map(|c| {
                        (
                            r.to_string(),
                            c["name"].as_str().expect("name").to_owned(),
                            PathBuf::from(c["repository"].as_str().expect("repository")),
                            PathBuf::from(c["keystone_log"].as_str().expect("log")),
                        )
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

impl Drop for Cloud {
    fn drop(&mut self) {
        // End of input tears the cloud down; give it time to stop Galera cleanly.
        let _ = writeln!(self.stdin, "quit");
        let _ = self.stdin.flush();
        let deadline = Instant::now() + Duration::from_secs(90);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn socket(addr: &str) -> std::net::SocketAddr {
    addr.parse()
        .unwrap_or_else(|e| panic!("address {addr:?}: {e}"))
}

fn generation(repo: &Path) -> u64 {
    fernetd::repository::read_stamp(repo)
        .ok()
        .flatten()
        .map_or(0, |s| s.generation)
}

/// One service call as the client saw it.
#[derive(Debug, Clone)]
struct Call {
    region: usize,
    at: Instant,
    status: u16,
    miss: bool,
    latency: Duration,
}

/// A fault's window: from the kill until the replacement serves again (plus
/// a grace for caches and health checks to notice).
#[derive(Debug, Clone)]
struct Window {
    what: &'static str,
    from: Instant,
    to: Instant,
}

const GRACE: Duration = Duration::from_secs(5);

impl Window {
    fn holds(&self, at: Instant) -> bool {
        at >= self.from && at <= self.to + GRACE
    }

    /// Whether a call was in flight at some moment of the window (a query in
    /// flight on a database node that dies fails although it began before).
    fn overlaps(&self, c: &Call) -> bool {
        c.at <= self.to + GRACE && c.at + c.latency >= self.from
    }
}

#[derive(Default)]
struct Traffic {
    tokens: Vec<(String, Instant)>,
    issued: u64,
    issue_failures: Vec<(Instant, String)>,
    calls: Vec<Call>,
    bodies: Vec<String>,
}

fn issue_loop(vip: Client, traffic: Arc<Mutex<Traffic>>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        match vip.issue(Some("admin")) {
            Ok(token) => {
                let mut t = traffic.lock().expect("traffic");
                t.issued += 1;
                t.tokens.push((token, Instant::now()));
                t.tokens.retain(|(_, at)| at.elapsed() < TOKEN_USE);
            }
            Err(e) => traffic
                .lock()
                .expect("traffic")
                .issue_failures
                .push((Instant::now(), e)),
        }
        let rest = ISSUE_EVERY.saturating_sub(started.elapsed());
        std::thread::sleep(if rest.is_zero() {
            Duration::from_millis(200)
        } else {
            rest
        });
    }
}

fn call_loop(
    region: usize,
    service: std::net::SocketAddr,
    traffic: Arc<Mutex<Traffic>>,
    stop: Arc<AtomicBool>,
) {
    let mut i = region;
    while !stop.load(Ordering::Relaxed) {
        let token = {
            let t = traffic.lock().expect("traffic");
            let live: Vec<_> = t
                .tokens
                .iter()
                .filter(|(_, at)| at.elapsed() < TOKEN_USE)
                .collect();
            (!live.is_empty()).then(|| live[i % live.len()].0.clone())
        };
        i += 1;
        let Some(token) = token else {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        };
        let started = Instant::now();
        let r = http(service, "GET", "/", &[("X-Auth-Token", &token)], None);
        let latency = started.elapsed();
        let (status, miss, body) = match r {
            Ok(r) => (
                r.status,
                r.header("x-eval-validation") == Some("miss"),
                r.body,
            ),
            Err(e) => (0, false, e.to_string()),
        };
        let mut t = traffic.lock().expect("traffic");
        if status != 200 && t.bodies.len() < 20 {
            t.bodies
                .push(format!("{} {status}: {}", REGIONS[region], body.trim()));
        }
        t.calls.push(Call {
            region,
            at: started,
            status,
            miss,
            latency,
        });
        drop(t);
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Watches every controller's repository: when each generation first
/// appeared anywhere and when every controller held it.
fn watch_generations(
    repos: Vec<PathBuf>,
    stop: Arc<AtomicBool>,
) -> JoinHandle<BTreeMap<u64, (Instant, Option<Instant>)>> {
    std::thread::spawn(move || {
        let mut seen: BTreeMap<u64, (Instant, Option<Instant>)> = BTreeMap::new();
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            let gens: Vec<u64> = repos.iter().map(|r| generation(r)).collect();
            let (lo, hi) = (
                *gens.iter().min().expect("repos"),
                *gens.iter().max().expect("repos"),
            );
            for g in 1..=hi {
                let e = seen.entry(g).or_insert((now, None));
                if g <= lo && e.1.is_none() {
                    e.1 = Some(now);
                }
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        seen
    })
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// Validations (`GET /v3/auth/tokens`) in a Keystone's gunicorn access log.
fn validations(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("\"GET /v3/auth/tokens"))
        .count()
}

/// Revokes `token` through RegionOne's VIP, then calls every region's service
/// with it until each refuses it: seconds until each region refused, and how
/// many of these calls each region's service validated at its Keystone.
fn revoke_and_time(
    cloud: &Cloud,
    admin: &str,
    token: &str,
    bound: Duration,
) -> (Vec<f64>, Vec<usize>) {
    let services: Vec<_> = REGIONS
        .iter()
        .map(|r| socket(&cloud.region(r, "service")))
        .collect();
    let mut misses = vec![0; REGIONS.len()];
    let mut call = |i: usize| {
        let r = http(services[i], "GET", "/", &[("X-Auth-Token", token)], None);
        if let Ok(r) = &r
            && r.header("x-eval-validation") == Some("miss")
        {
            misses[i] += 1;
        }
        r.map(|r| r.status)
    };
    // Cached everywhere first: the slow path to measure is the cached one.
    for (i, r) in REGIONS.iter().enumerate() {
        let got = call(i);
        assert!(
            matches!(got, Ok(200)),
            "{r}'s service refused the token to revoke: {got:?}"
        );
    }
    let region_one = socket(&cloud.region("RegionOne", "identity"));
    let r = http(
        region_one,
        "DELETE",
        "/v3/auth/tokens",
        &[("X-Auth-Token", admin), ("X-Subject-Token", token)],
        None,
    )
    .expect("DELETE /v3/auth/tokens");
    assert_eq!(r.status, 204, "revocation at RegionOne: {}", r.body);
    let revoked = Instant::now();
    let mut refused: Vec<Option<f64>> = vec![None; REGIONS.len()];
    let limit = bound + Duration::from_secs(10);
    while refused.iter().any(Option::is_none) && revoked.elapsed() < limit {
        for (i, refused) in refused.iter_mut().enumerate() {
            if refused.is_none() && matches!(call(i), Ok(401)) {
                *refused = Some(revoked.elapsed().as_secs_f64());
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let refused = refused
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            r.unwrap_or_else(|| {
                panic!(
                    "{}'s service still accepted the revoked token {:?} after revocation",
                    REGIONS[i], limit
                )
            })
        })
        .collect();
    (refused, misses)
}

#[test]
fn the_reference_cloud_keeps_every_valid_token_working_through_rotations_and_faults() {
    let _heavy = keystone::exclusive();
    let begun = Instant::now();
    let fault = std::env::var("FERNETD_CLOUD_FAULT").unwrap_or_default();
    assert!(
        [
            "",
            "agent-never-installs",
            "miswired-service",
            "purge-live-key"
        ]
        .contains(&fault.as_str()),
        "unknown FERNETD_CLOUD_FAULT {fault:?}"
    );
    // Galera's rsync transfer runs as mysql: the directory must be reachable.
    let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let kept = tempfile::Builder::new()
        .prefix("cloud-")
        .tempdir_in(base)
        .expect("tempdir")
        .keep();
    let dir = kept.as_path();
    set_mode(base, 0o755);
    set_mode(dir, 0o755);
    let mut extra: Vec<String> = if fault == "miswired-service" {
        vec!["--miswire".into(), "RegionThree=RegionTwo".into()]
    } else {
        Vec::new()
    };
    // Comparisons (`--db-standby backup --db-options defaults`): the same run
    // with another configuration of the cloud.
    if let Ok(more) = std::env::var("FERNETD_CLOUD_EVAL_ARGS") {
        extra.extend(more.split_whitespace().map(str::to_owned));
    }
    let mut cloud = Cloud::start(dir, &extra);
    let up = begun.elapsed();
    let controllers = cloud.controllers();
    let repos: Vec<PathBuf> = controllers.iter().map(|c| c.2.clone()).collect();
    let vip = Client::new(socket(&cloud.str("/global_vip")));
    let admin = vip.issue(Some("admin")).expect("admin token");

    let stop = Arc::new(AtomicBool::new(false));
    let traffic = Arc::new(Mutex::new(Traffic::default()));
    let watcher = watch_generations(repos.clone(), stop.clone());
    let mut threads = vec![{
        let (t, s) = (traffic.clone(), stop.clone());
        std::thread::spawn(move || issue_loop(vip, t, s))
    }];
    for (i, r) in REGIONS.iter().enumerate() {
        let (t, s) = (traffic.clone(), stop.clone());
        let service = socket(&cloud.region(r, "service"));
        threads.push(std::thread::spawn(move || call_loop(i, service, t, s)));
    }
    let traffic_from = Instant::now();
    let mut windows: Vec<Window> = Vec::new();
    let mut injected: Vec<&str> = Vec::new();
    let pause = |s: u64| std::thread::sleep(Duration::from_secs(s));
    pause(10);

    // 1. One of RegionOne's two Keystones dies and comes back: its VIP serves.
    let from = Instant::now();
    cloud.cmd("kill keystone.ctl1.regionone");
    pause(5);
    cloud.cmd("start keystone.ctl1.regionone");
    cloud.cmd("wait keystone.ctl1.regionone");
    windows.push(Window {
        what: "one RegionOne Keystone replaced",
        from,
        to: Instant::now(),
    });
    injected.push("keystone-kill");

    // 2. An agent is stopped before a rotation, the rotator commits the next
    // generation (the others install it) without its acknowledgement, and it
    // is killed in that window, then restarted.
    let victim = "ctl1.regiontwo";
    let vi = controllers
        .iter()
        .position(|c| c.1 == victim)
        .expect("victim");
    cloud.cmd(&format!("stop agent.{victim}"));
    let held = generation(&repos[vi]);
    keystone::wait_for(
        Duration::from_secs(ROTATE_EVERY * 3),
        "a generation committed past the stopped agent",
        || repos.iter().any(|r| generation(r) > held).then_some(()),
    );
    assert_eq!(
        generation(&repos[vi]),
        held,
        "the stopped agent acknowledged"
    );
    cloud.cmd(&format!("kill agent.{victim}"));
    injected.push("agent-kill-before-ack");
    pause(3);
    if fault != "agent-never-installs" {
        cloud.cmd(&format!("start agent.{victim}"));
        cloud.cmd(&format!("wait agent.{victim}"));
    }

    // 3. The active Galera node dies and rejoins.
    let from = Instant::now();
    cloud.cmd("kill galera.node1");
    pause(5);
    cloud.cmd("start galera.node1");
    cloud.cmd("wait galera.node1");
    windows.push(Window {
        what: "Galera node1 failover and rejoin",
        from,
        to: Instant::now(),
    });
    injected.push("galera-kill");

    // 4. RegionTwo's memcached restarts (empty).
    let from = Instant::now();
    cloud.cmd("kill memcached.regiontwo");
    pause(2);
    cloud.cmd("start memcached.regiontwo");
    cloud.cmd("wait memcached.regiontwo");
    windows.push(Window {
        what: "RegionTwo memcached restart",
        from,
        to: Instant::now(),
    });
    injected.push("memcached-restart");

    // 5. A token revoked in RegionOne is refused by every region in time.
    let bound = Duration::from_secs(MIDDLEWARE_CACHE + KEYSTONE_CACHE + REVOKE_CACHE);
    let doomed = vip.issue(Some("admin")).expect("token to revoke");
    let (refused, revocation_misses) = revoke_and_time(&cloud, &admin, &doomed, bound);
    injected.push("revocation");

    // 6. Every RegionOne Keystone down for a while: tokens still come from the
    // global VIP (the other regions' Keystones); RegionOne's service answers
    // 503 for tokens not in its cache, counted apart.
    let from = Instant::now();
    cloud.cmd("kill keystone.ctl1.regionone");
    cloud.cmd("kill keystone.ctl2.regionone");
    let issued_before = traffic.lock().expect("traffic").issued;
    pause(20);
    let issued_while_down = traffic.lock().expect("traffic").issued - issued_before;
    cloud.cmd("start keystone.ctl1.regionone");
    cloud.cmd("start keystone.ctl2.regionone");
    cloud.cmd("wait keystone.ctl1.regionone");
    cloud.cmd("wait keystone.ctl2.regionone");
    let region_one_down = Window {
        what: "every RegionOne Keystone down",
        from,
        to: Instant::now(),
    };
    injected.push("regionone-down");

    if fault == "purge-live-key" {
        let primary = fernetd::repository::load(&repos[0])
            .expect("repository")
            .primary_index()
            .expect("a primary key");
        let out = Command::new(crate::common::fernetd_bin())
            .args(["admin", "--config"])
            .arg(cloud.str("/fernetd/admin_config"))
            .args(["purge-key", "--repository", "tokens", "--yes"])
            .args(["--index", &primary.to_string()])
            .output()
            .expect("fernetd admin purge-key");
        println!(
            "cloud: purged key {primary}: {}",
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }

    // Rotations go on with traffic until at least 8 generations were seen.
    let first = generation(&repos[0]);
    keystone::wait_for(
        Duration::from_secs(ROTATE_EVERY * 6),
        "more rotations under traffic",
        || {
            (generation(&repos[0]) >= first + 2
                && traffic_from.elapsed() > Duration::from_secs(150))
            .then_some(())
        },
    );
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("traffic thread");
    }
    // Every controller ends on the same generation.
    let converged = (|| {
        let deadline = Instant::now() + Duration::from_secs(ROTATE_EVERY * 2);
        while Instant::now() < deadline {
            let g: Vec<u64> = repos.iter().map(|r| generation(r)).collect();
            if g.windows(2).all(|w| w[0] == w[1]) {
                return Ok(g[0]);
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        Err(repos.iter().map(|r| generation(r)).collect::<Vec<_>>())
    })();
    let generations = watcher.join().expect("watcher");
    let traffic = Arc::try_unwrap(traffic)
        .ok()
        .expect("traffic threads joined")
        .into_inner()
        .expect("traffic");

    // ---- Figures.
    let in_window = |c: &Call| windows.iter().find(|w| w.overlaps(c));
    let mut unauthorized = 0;
    let mut errors_outside = Vec::new();
    let mut errors_in: BTreeMap<&str, usize> = BTreeMap::new();
    let mut region_one_down_errors = 0;
    for c in &traffic.calls {
        if c.status == 401 {
            unauthorized += 1;
        } else if c.status != 200 {
            if c.region == 0 && region_one_down.overlaps(c) {
                region_one_down_errors += 1;
            } else if let Some(w) = in_window(c) {
                *errors_in.entry(w.what).or_default() += 1;
            } else {
                errors_outside.push(c.clone());
            }
        }
    }
    let ok: Vec<&Call> = traffic.calls.iter().filter(|c| c.status == 200).collect();
    let mut hit: Vec<Duration> = ok.iter().filter(|c| !c.miss).map(|c| c.latency).collect();
    let mut miss: Vec<Duration> = ok.iter().filter(|c| c.miss).map(|c| c.latency).collect();
    hit.sort();
    miss.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mut per_region = Vec::new();
    for (i, r) in REGIONS.iter().enumerate() {
        let served: usize = controllers
            .iter()
            .filter(|c| c.0 == *r)
            .map(|c| validations(&c.3))
            .sum();
        let calls = traffic.calls.iter().filter(|c| c.region == i);
        // The revocation's own calls validated there too (200, then 401).
        let (mut misses_ok, mut misses) = (revocation_misses[i], revocation_misses[i]);
        let (mut hits, mut answered) = (0, 0);
        for c in calls {
            if c.status == 200 {
                answered += 1;
                hits += usize::from(!c.miss);
            }
            if c.miss {
                misses += 1;
                if c.status == 200 || c.status == 401 {
                    misses_ok += 1;
                }
            }
        }
        per_region.push((*r, served, misses_ok, misses, hits, answered));
    }
    let issue_failures_outside: Vec<_> = traffic
        .issue_failures
        .iter()
        .filter(|(at, _)| !windows.iter().any(|w| w.holds(*at)) && !region_one_down.holds(*at))
        .collect();
    let elapsed = begun.elapsed();
    println!(
        "cloud: up in {:.0} s; {:.0} s of traffic; {} tokens issued through the global VIP ({} while every \
         RegionOne Keystone was down, {} issue failures); {} service calls, cache hit rate {:.1}% \
         ({} hits, {} misses); service call p50/p99: hit {:.1}/{:.1} ms, miss {:.0}/{:.0} ms",
        up.as_secs_f64(),
        traffic_from.elapsed().as_secs_f64(),
        traffic.issued,
        issued_while_down,
        traffic.issue_failures.len(),
        traffic.calls.len(),
        100.0 * hit.len() as f64 / ok.len().max(1) as f64,
        hit.len(),
        miss.len(),
        ms(percentile(&hit, 0.5)),
        ms(percentile(&hit, 0.99)),
        ms(percentile(&miss, 0.5)),
        ms(percentile(&miss, 0.99)),
    );
    for (r, served, misses_ok, misses, hits, answered) in &per_region {
        println!(
            "cloud: {r}: its Keystones served {served} validations; its service had {misses_ok} answered \
             cache misses ({misses} in all), cache hit rate {:.1}% of {answered} calls answered 200",
            100.0 * *hits as f64 / (*answered).max(1) as f64
        );
    }
    let t0 = traffic_from;
    let rel = |at: Instant| (at.saturating_duration_since(t0).as_secs_f64() * 10.0).round() / 10.0;
    println!(
        "cloud: fault windows (s from traffic start): {:?}, {:?}; token issue failures at {:?}",
        windows
            .iter()
            .map(|w| (w.what, rel(w.from), rel(w.to)))
            .collect::<Vec<_>>(),
        (
            region_one_down.what,
            rel(region_one_down.from),
            rel(region_one_down.to)
        ),
        traffic
            .issue_failures
            .iter()
            .map(|(at, e)| (rel(*at), e.chars().take(120).collect::<String>()))
            .collect::<Vec<_>>()
    );
    println!(
        "cloud: 401 for valid tokens: {unauthorized}; 5xx/failed calls outside fault windows: {}; in windows: \
         {errors_in:?}; RegionOne's service while its Keystones were down: {region_one_down_errors}",
        errors_outside.len()
    );
    println!(
        "cloud: revoked in RegionOne, refused after {:?} s (RegionOne, RegionTwo, RegionThree); bound {} s",
        refused
            .iter()
            .map(|s| (s * 10.0).round() / 10.0)
            .collect::<Vec<_>>(),
        bound.as_secs()
    );
    let lags: Vec<(u64, Option<f64>)> = generations
        .iter()
        .map(|(g, (seen, all))| (*g, all.map(|a| (a - *seen).as_secs_f64())))
        .collect();
    println!(
        "cloud: generations (generation, seconds until every controller held it): {:?}; faults injected: {injected:?}; \
         test took {:.0} s",
        lags.iter()
            .map(|(g, l)| (*g, l.map(|l| (l * 10.0).round() / 10.0)))
            .collect::<Vec<_>>(),
        elapsed.as_secs_f64()
    );
    for body in &traffic.bodies {
        println!("cloud: failed call: {}", body.replace('\n', " "));
    }

    // ---- Assertions.
    assert_eq!(
        injected,
        [
            "keystone-kill",
            "agent-kill-before-ack",
            "galera-kill",
            "memcached-restart",
            "revocation",
            "regionone-down"
        ],
        "a fault was not injected"
    );
    assert_eq!(unauthorized, 0, "valid tokens refused with 401");
    assert!(
        errors_outside.is_empty(),
        "{} failed calls outside fault windows: {:?}",
        errors_outside.len(),
        errors_outside
            .iter()
            .take(5)
            .map(|c| (REGIONS[c.region], rel(c.at), c.status, c.latency))
            .collect::<Vec<_>>()
    );
    for (what, n) in &errors_in {
        assert!(*n <= 10, "{n} failed calls while {what}: more than 10");
    }
    assert!(
        issue_failures_outside.is_empty(),
        "token issue failed outside fault windows: {issue_failures_outside:?}"
    );
    assert!(
        issued_while_down >= 2,
        "the global VIP issued {issued_while_down} tokens while RegionOne's Keystones were down"
    );
    for (r, s) in REGIONS.iter().zip(&refused) {
        assert!(
            *s <= bound.as_secs_f64() + 1.0,
            "{r} refused the revoked token after {s:.1} s, over the {} s bound",
            bound.as_secs()
        );
    }
    for (r, served, misses_ok, misses, _, _) in &per_region {
        assert!(
            misses_ok > &0 && served >= misses_ok && served <= misses,
            "{r}'s service does not validate against its own region's Keystone only: \
             {served} validations at its Keystones, {misses_ok}..{misses} cache misses"
        );
    }
    let converged =
        converged.unwrap_or_else(|g| panic!("the controllers did not converge: generations {g:?}"));
    assert!(
        converged >= first + 2,
        "fewer rotations than expected under traffic"
    );
    for (g, lag) in &lags {
        // The slowest is the one committed while an agent was stopped: it
        // arrives when the agent is back, a few seconds later.
        assert!(
            lag.is_some_and(|l| l <= ROTATE_EVERY as f64),
            "generation {g} reached every controller after {lag:?} s (limit {ROTATE_EVERY} s)"
        );
    }
    drop(cloud);
    // Passed: the logs are not needed.
    let _ = std::fs::remove_dir_all(dir);
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}
