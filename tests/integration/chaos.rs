//! Chaos: one rotator and five agents, real processes, a schedule every three
//! seconds plus `admin rotate`, and for a fixed number of rounds random, mixed
//! faults (SIGKILL and restart of any process, SIGSTOP/SIGCONT, network cuts,
//! stalls, resets and delays through a proxy in front of each agent, agents
//! killed in the middle of an install). A sampler reads every repository the
//! way Keystone does throughout and checks the promises; after the faults stop,
//! every region must converge within a bound.
//!
//! `cargo test --test integration chaos` runs 100 rounds; `FERNETD_LONG=1`
//! runs 5,000, and `FERNETD_CHAOS_ROUNDS=N` any number (docs/guarantees.md).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fernetd::repository;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use rustix::process::Signal;
use serde_json::Value;

use crate::common::daemon::poll_until;
use crate::common::proxy::{Fault, Proxy};
use crate::rotator::{Cluster, agent_identity};

pub(crate) const REGIONS: [&str; 5] = [
    "RegionOne",
    "RegionTwo",
    "RegionThree",
    "RegionFour",
    "RegionFive",
];
/// Every region must hold the rotator's generation this long after the last
/// fault is lifted (backoff is capped at 1 s, reconciliation runs every second).
const CONVERGENCE_BOUND: Duration = Duration::from_secs(30);

/// What Keystone's `FernetUtils.load_keys` sees in `dir` at one moment: it
/// lists the directory, skips what `os.path.isfile` rejects, and opens each
/// remaining name by path, so a swap between listing and reading is visible
/// here just as it would be to Keystone.
fn keystone_read(dir: &Path) -> Result<repository::KeySet, String> {
    let names = std::fs::read_dir(dir).map_err(|e| format!("list: {e}"))?;
    let mut set = repository::KeySet::new();
    for entry in names {
        let name = entry.map_err(|e| format!("list: {e}"))?.file_name();
        let path = dir.join(&name);
        if !std::fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            continue;
        }
        let content = std::fs::read(&path).map_err(|e| format!("read {name:?}: {e}"))?;
        let Some(index) = name.to_str().and_then(repository::keystone_index) else {
            continue;
        };
        if content.is_empty() {
            continue;
        }
        let key = repository::parse_key(&content).map_err(|e| format!("key {index}: {e}"))?;
        set.insert(index, key);
    }
    Ok(set)
}

/// [`keystone_read`], and whether a swap fell inside it (the directory at the
/// path was another one after the read than before). Such a read is one
/// Keystone's loader can make too: the old listing with the new files, or a
/// purged file gone between `isfile` and `open`. No writer can make it whole:
/// it is counted as raced, and held to a weaker standard (never empty).
fn keystone_read_raced(dir: &Path) -> (Result<repository::KeySet, String>, bool) {
    use std::os::unix::fs::MetadataExt as _;
    let inode = || std::fs::metadata(dir).map(|m| (m.dev(), m.ino())).ok();
    let before = inode();
    let read = keystone_read(dir);
    (read, inode() != before)
}

/// The promises, checked on every sample; each breach is recorded, not
/// panicked on, so the run reports every one of them.
#[derive(Default)]
struct Invariants {
    /// Per region: highest primary index and stamp generation seen.
    primary: Vec<u32>,
    generation: Vec<u64>,
    /// The previous pass (primaries, generations), for the distance check.
    previous: Option<(Vec<u32>, Vec<u64>)>,
    /// Key index → SHA-256 of the key: an index never names two keys (a fork,
    /// or someone other than the rotator writing keys).
    keys: BTreeMap<u32, [u8; 32]>,
    passes: u64,
    /// Reads a swap fell inside, and what they lacked (see [`keystone_read_raced`]).
    raced: Raced,
    violations: Vec<String>,
}

/// Reads that raced a swap, as Keystone's own loader can.
#[derive(Debug, Default, Clone, Copy)]
struct Raced {
    reads: u64,
    /// A purged file listed, then gone when opened (Keystone raises).
    vanished: u64,
    /// The old listing read with the new files: the key being promoted (new
    /// name, and no longer under `0`) is missing.
    missed_promoted: u64,
    /// Fewer than two keys, or no key 0, but not empty: a read so slow that
    /// several swaps purged what it listed.
    incomplete: u64,
}

impl Raced {
    /// Whether a read a swap fell inside breaks the promise anyway: never
    /// empty (the installer keeps the old directory whole for
    /// `install::RETIRE_GRACE`); otherwise counted.
    fn judge(&mut self, set: &repository::KeySet) -> Option<String> {
        if set.is_empty() {
            return Some("an empty listing".into());
        }
        if set.staged().is_none() || set.len() < 2 {
            self.incomplete += 1;
        }
        None
    }
}

impl Invariants {
    fn new(regions: usize) -> Invariants {
        Invariants {
            primary: vec![0; regions],
            generation: vec![0; regions],
            ..Default::default()
        }
    }

    fn violation(&mut self, what: String) {
        // Enough to diagnose; a broken run must not fill memory.
        if self.violations.len() < 1000 {
            self.violations.push(what);
        }
    }

    /// One pass over every region.
    fn sample(&mut self, repos: &[PathBuf]) {
        use sha2::Digest as _;
        let n = repos.len();
        let mut primaries = vec![0; n];
        let mut generations = vec![0; n];
        // The primary key of each region read so far in this pass.
        let mut signing: Vec<Option<(u32, [u8; 32])>> = vec![None; n];
        // Every other pass reads the regions in reverse, so that each pair is
        // checked in both orders (the token check below needs one order).
        self.passes += 1;
        let mut order: Vec<usize> = (0..n).collect();
        if self.passes % 2 == 0 {
            order.reverse();
        }
        for (pos, &r) in order.iter().enumerate() {
            let repo = &repos[r];
            let generation = match repository::read_stamp(repo) {
                Ok(Some(s)) => s.generation,
                Ok(None) => 0,
                Err(e) => {
                    self.violation(format!("region {r}: stamp unreadable: {e}"));
                    0
                }
            };
            if let Some(v) = never_down(&mut self.generation[r], generation, r, "generation") {
                self.violation(v);
            }
            generations[r] = generation;
            let (read, raced) = keystone_read_raced(repo);
            self.raced.reads += u64::from(raced);
            let set = match read {
                Ok(set) => set,
                Err(e) if raced && e.contains("No such file") => {
                    self.raced.vanished += 1;
                    primaries[r] = self.primary[r];
                    continue;
                }
                Err(e) => {
                    self.violation(format!("region {r}: unreadable repository: {e}"));
                    primaries[r] = self.primary[r];
                    continue;
                }
            };
            if raced {
                if let Some(what) = self.raced.judge(&set) {
                    self.violation(format!("region {r}: {what} while a swap was under way"));
                }
            } else if set.staged().is_none() || set.len() < 2 {
                self.violation(format!(
                    "region {r}: incomplete repository, indices {:?}",
                    set.indices()
                ));
            }
            let primary = set.primary_index().unwrap_or(0);
            if let Some(v) = never_down(&mut self.primary[r], primary, r, "primary") {
                self.violation(v);
            }
            primaries[r] = primary;
            let mut held = std::collections::BTreeSet::new();
            for (index, key) in set.iter() {
                let hash: [u8; 32] = sha2::Sha256::digest(key.as_bytes()).into();
                held.insert(hash);
                if index == primary {
                    signing[r] = Some((index, hash));
                }
                if index > 0 && *self.keys.entry(index).or_insert(hash) != hash {
                    self.violation(format!("region {r}: key {index} changed (a fork)"));
                }
            }
            // A token a region read earlier in this pass signs (with its
            // primary) must be valid here: its key was staged everywhere
            // before it became primary, and the ledger keeps it for at least
            // a token lifetime (1 s, far longer than a pass) after.
            let missing: Vec<(usize, u32)> = order[..pos]
                .iter()
                .filter_map(|&a| signing[a].map(|(index, hash)| (a, index, hash)))
                .filter(|(_, _, hash)| !held.contains(hash))
                .map(|(a, index, _)| (a, index))
                .collect();
            if raced && !missing.is_empty() {
                self.raced.missed_promoted += 1;
            } else {
                for (a, index) in missing {
                    self.violation(format!(
                        "a token signed in region {a} (key {index}) is rejected in region {r}"
                    ));
                }
            }
        }
        // Every value of the previous pass was read before, and every value of
        // this one after, the moment between the passes; per region they only
        // grow, so at that moment region a held at least prev[a] and region b
        // at most now[b]. A difference of two is then certain, not a race of
        // the sampler with a rotation.
        if let Some((prev_p, prev_g)) = self.previous.take() {
            let (hi, lo) = (prev_p.iter().max(), primaries.iter().min());
            if let (Some(hi), Some(lo)) = (hi, lo)
                && hi.saturating_sub(*lo) >= 2
            {
                let what = format!("two regions two keys apart: {prev_p:?} then {primaries:?}");
                self.violation(what);
            }
            let (hi, lo) = (prev_g.iter().max(), generations.iter().min());
            if let (Some(hi), Some(lo)) = (hi, lo)
                && hi.saturating_sub(*lo) >= 2
            {
                let what =
                    format!("two regions two generations apart: {prev_g:?} then {generations:?}");
                self.violation(what);
            }
        }
        self.previous = Some((primaries, generations));
    }
}

/// Raises region `r`'s highest `what` to `now`; a `now` below it is the
/// violation returned.
fn never_down<T: Ord + Copy + std::fmt::Display>(
    highest: &mut T,
    now: T,
    r: usize,
    what: &str,
) -> Option<String> {
    let down =
        (now < *highest).then(|| format!("region {r}: {what} went down from {highest} to {now}"));
    *highest = (*highest).max(now);
    down
}

/// Samples every repository on its own thread until stopped; the passes it
/// made are `Invariants::passes`.
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Invariants>,
}

impl Sampler {
    fn start(repos: Vec<PathBuf>) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut inv = Invariants::new(repos.len());
                while !stop.load(Ordering::Relaxed) {
                    inv.sample(&repos);
                    // The machine is shared: leave the daemons most of a core.
                    std::thread::sleep(Duration::from_millis(2));
                }
                inv
            })
        };
        Sampler { stop, thread }
    }

    fn finish(self) -> Invariants {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("the sampler thread")
    }
}

/// `fernetd admin --json ARGS` without blocking the runtime the proxies run
/// on; `None` when the rotator could not answer in time (it may be stopped).
async fn admin(config: &Path, args: &[&str], timeout: Duration) -> Option<(i32, Value)> {
    let mut cmd = tokio::process::Command::new(crate::common::fernetd_bin());
    cmd.arg("admin")
        .arg("--config")
        .arg(config)
        .arg("--json")
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(timeout, cmd.output())
        .await
        .ok()?
        .ok()?;
    let value = serde_json::from_slice(&out.stdout).ok()?;
    Some((out.status.code().unwrap_or(-1), value))
}

/// A process's state under the faults.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Proc {
    Running,
    Stopped,
    Killed,
}

/// Which process: the rotator or agent `i`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Target {
    Rotator,
    Agent(usize),
}

/// A fault in force and the round it is lifted at.
struct Active {
    target: Option<Target>,
    proxies: Vec<usize>,
    until: usize,
}

struct Chaos {
    cluster: Cluster,
    proxies: Vec<Proxy>,
    procs: BTreeMap<usize, Proc>,
    rotator: Proc,
    active: Vec<Active>,
    injected: BTreeMap<&'static str, usize>,
    /// Highest generation any `admin rotate` reported committed.
    committed: u64,
    violations: Vec<String>,
}

impl Chaos {
    async fn start() -> Chaos {
        let mut cluster = Cluster::configure(&REGIONS, agent_identity, None);
        let mut proxies = Vec::new();
        for agent in &cluster.agents {
            proxies.push(Proxy::start(agent.addr).await);
        }
        let mut config = cluster.rotator_config();
        config.schedule.cron = "*/3 * * * * *".into();
        for (endpoint, proxy) in config.agents.iter_mut().zip(&proxies) {
            endpoint.endpoint = format!("https://{}", proxy.addr());
        }
        cluster.write_rotator_config(&config);
        cluster = cluster.launch().await;
        Chaos {
            procs: (0..cluster.agents.len())
                .map(|i| (i, Proc::Running))
                .collect(),
            cluster,
            proxies,
            rotator: Proc::Running,
            active: Vec::new(),
            injected: BTreeMap::new(),
            committed: 0,
            violations: Vec::new(),
        }
    }

    fn state(&self, t: Target) -> Proc {
        match t {
            Target::Rotator => self.rotator,
            Target::Agent(i) => self.procs[&i],
        }
    }

    fn set_state(&mut self, t: Target, p: Proc) {
        match t {
            Target::Rotator => self.rotator = p,
            Target::Agent(i) => {
                self.procs.insert(i, p);
            }
        }
    }

    fn daemon(&mut self, t: Target) -> &mut crate::common::daemon::Daemon {
        match t {
            Target::Rotator => self.cluster.rotator(),
            Target::Agent(i) => self.cluster.agent(i),
        }
    }

    async fn restart(&mut self, t: Target) {
        match t {
            Target::Rotator => self.cluster.start_rotator().await,
            Target::Agent(i) => self.cluster.start_agent(i).await,
        }
    }

    /// Lifts a fault: the process continues or is started again, the network
    /// heals.
    async fn heal(&mut self, fault: Active) {
        if let Some(t) = fault.target {
            match self.state(t) {
                Proc::Stopped => self.daemon(t).signal(Signal::CONT),
                Proc::Killed => self.restart(t).await,
                Proc::Running => {}
            }
            self.set_state(t, Proc::Running);
        }
        for p in fault.proxies {
            self.proxies[p].set(Fault::Pass);
        }
    }

    /// A process that died without being killed is a finding.
    fn check_alive(&mut self) {
        let targets: Vec<Target> = std::iter::once(Target::Rotator)
            .chain((0..self.cluster.agents.len()).map(Target::Agent))
            .filter(|t| self.state(*t) != Proc::Killed)
            .collect();
        for t in targets {
            if let Some(status) = self.daemon(t).try_exit() {
                let what = format!("{t:?} exited by itself ({status})");
                self.violations.push(what);
                self.set_state(t, Proc::Killed);
                // Restarted when a fault on it is lifted, or now.
                if !self.active.iter().any(|a| a.target == Some(t)) {
                    self.active.push(Active {
                        target: Some(t),
                        proxies: Vec::new(),
                        until: 0,
                    });
                }
            }
        }
    }

    /// `admin rotate --no-wait`, when the rotator can answer; checks that a
    /// committed generation is never lower than one committed before.
    async fn rotate(&mut self) {
        if self.rotator != Proc::Running {
            return;
        }
        let config = self.cluster.admin_config.clone();
        let Some((_, v)) = admin(&config, &["rotate", "--no-wait"], Duration::from_secs(10)).await
        else {
            return;
        };
        if v[0]["rotated"] == true {
            let g = v[0]["generation"].as_u64().unwrap_or(0);
            if g <= self.committed {
                self.violations.push(format!(
                    "the rotator committed generation {g} after {}",
                    self.committed
                ));
            }
            self.committed = self.committed.max(g);
            *self.injected.entry("rotations committed").or_default() += 1;
        }
    }

    /// Injects one random fault on something not already faulted.
    async fn inject(&mut self, rng: &mut StdRng, round: usize) {
        let n = self.cluster.agents.len();
        let until = round + rng.random_range(1..=3);
        let kind = rng.random_range(0..7);
        if kind < 2 {
            self.cut(rng, until);
            return;
        }
        let free_agents: Vec<usize> = (0..n)
            .filter(|i| {
                self.procs[i] == Proc::Running
                    && !self
                        .active
                        .iter()
                        .any(|a| a.target == Some(Target::Agent(*i)))
            })
            .collect();
        let rotator_free = self.rotator == Proc::Running
            && !self
                .active
                .iter()
                .any(|a| a.target == Some(Target::Rotator));
        let agent = (!free_agents.is_empty())
            .then(|| Target::Agent(free_agents[rng.random_range(0..free_agents.len())]));
        let rotator = rotator_free.then_some(Target::Rotator);
        let (name, target, state, until) = match (kind, agent, rotator) {
            (2, Some(t), _) => ("SIGKILL agent", t, Proc::Killed, until),
            (3, Some(t), _) => ("SIGSTOP agent", t, Proc::Stopped, until),
            (4, Some(t), _) => {
                // Killed in the middle of an install: a push under way, the
                // agent dies within the time an install takes, and comes back.
                self.rotate().await;
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..40))).await;
                ("SIGKILL agent mid-install", t, Proc::Killed, round)
            }
            (5, _, Some(t)) => ("SIGKILL rotator", t, Proc::Killed, until),
            (6, _, Some(t)) => ("SIGSTOP rotator", t, Proc::Stopped, until),
            _ => return,
        };
        match state {
            Proc::Killed => self.daemon(target).kill(),
            _ => self.daemon(target).signal(Signal::STOP),
        }
        self.set_state(target, state);
        *self.injected.entry(name).or_default() += 1;
        self.active.push(Active {
            target: Some(target),
            proxies: Vec::new(),
            until,
        });
    }

    /// A network fault between the rotator and one to three agents.
    fn cut(&mut self, rng: &mut StdRng, until: usize) {
        let mut chosen: Vec<usize> = (0..self.proxies.len())
            .filter(|p| self.proxies[*p].fault() == Fault::Pass)
            .collect();
        if chosen.is_empty() {
            return;
        }
        let count = rng.random_range(1..=3.min(chosen.len()));
        while chosen.len() > count {
            chosen.swap_remove(rng.random_range(0..chosen.len()));
        }
        let (name, fault) = match rng.random_range(0..4) {
            0 => ("network stall", Fault::Stall),
            1 => ("network drop", Fault::Drop),
            2 => ("network reset", Fault::Reset),
            _ => (
                "network delay",
                Fault::Delay(Duration::from_millis(rng.random_range(5..200))),
            ),
        };
        for p in &chosen {
            self.proxies[*p].set(fault);
        }
        *self.injected.entry(name).or_default() += 1;
        self.active.push(Active {
            target: None,
            proxies: chosen,
            until,
        });
    }

    /// Lifts every fault due by `round` (all of them when `round` is `None`).
    async fn heal_due(&mut self, round: Option<usize>) {
        let (due, keep): (Vec<Active>, Vec<Active>) = std::mem::take(&mut self.active)
            .into_iter()
            .partition(|a| round.is_none_or(|r| a.until <= r));
        self.active = keep;
        for fault in due {
            self.heal(fault).await;
        }
    }
}

fn rounds() -> usize {
    if let Some(n) = std::env::var("FERNETD_CHAOS_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return n;
    }
    if std::env::var_os("FERNETD_LONG").is_some() {
        5000
    } else {
        100
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_rounds_of_mixed_faults_break_no_promise() {
    let rounds = rounds();
    let seed = std::env::var("FERNETD_CHAOS_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut chaos = Chaos::start().await;
    let config = chaos.cluster.admin_config.clone();
    // The first generation reaches everyone before anything is checked: until
    // then the repositories are the empty directories the test created.
    poll_until(CONVERGENCE_BOUND, "the initial distribution", || async {
        let (code, _) = admin(&config, &["status"], Duration::from_secs(10)).await?;
        (code == 0).then_some(())
    })
    .await;
    let repos: Vec<PathBuf> = chaos
        .cluster
        .agents
        .iter()
        .map(|a| a.repo.clone())
        .collect();
    let sampler = Sampler::start(repos.clone());
    let started = Instant::now();

    for round in 0..rounds {
        chaos.heal_due(Some(round)).await;
        chaos.check_alive();
        // Up to two faults at once, and now and then a round without a new one.
        if chaos.active.len() < 2 && rng.random_bool(0.85) {
            chaos.inject(&mut rng, round).await;
        }
        if rng.random_bool(0.5) {
            chaos.rotate().await;
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(20..150))).await;
        if round % 500 == 499 {
            println!(
                "chaos: round {} of {rounds}, {:.0?}, {:?}",
                round + 1,
                started.elapsed(),
                chaos.injected
            );
        }
    }
    let chaos_time = started.elapsed();
    chaos.heal_due(None).await;
    chaos.check_alive();

    // After the faults stop, every region converges: the rotator's status says
    // every agent holds its generation, and the disks agree.
    let healed = Instant::now();
    let status = poll_until(
        CONVERGENCE_BOUND,
        "convergence after the faults stopped",
        || async {
            let (code, status) = admin(&config, &["status"], Duration::from_secs(10)).await?;
            (code == 0).then_some(status)
        },
    )
    .await;
    let converged_in = healed.elapsed();
    let inv = sampler.finish();
    let samples = inv.passes;
    let repo = &status["repositories"][0];
    let generation = repo["generation"].as_u64().expect("generation");
    let digest = repo["digest"].as_str().expect("digest").to_owned();
    let mut violations = chaos.violations.clone();
    violations.extend(inv.violations.iter().cloned());
    for (i, dir) in repos.iter().enumerate() {
        let on_disk = keystone_read(dir).map(|s| s.digest().to_hex());
        if on_disk.as_deref() != Ok(digest.as_str()) {
            violations.push(format!("region {i} holds {on_disk:?}, not {digest}"));
        }
        let stamp = repository::read_stamp(dir)
            .ok()
            .flatten()
            .map(|s| s.generation);
        if stamp != Some(generation) {
            violations.push(format!("region {i} stamp {stamp:?}, not {generation}"));
        }
    }
    if generation < chaos.committed {
        violations.push(format!(
            "the rotator is at {generation} after committing {}",
            chaos.committed
        ));
    }
    let faults: usize = chaos
        .injected
        .iter()
        .filter(|(k, _)| **k != "rotations committed")
        .map(|(_, n)| n)
        .sum();
    println!(
        "chaos: seed {seed}, {rounds} rounds in {chaos_time:.1?}, {faults} faults {:?}, \
         generation {generation}, {samples} samples, converged {converged_in:.1?} after the \
         last fault (bound {CONVERGENCE_BOUND:?}), reads that raced a swap {:?}, violations {}",
        chaos.injected,
        inv.raced,
        violations.len()
    );
    for v in violations.iter().take(20) {
        println!("violation: {v}");
    }
    assert!(
        samples > rounds as u64,
        "the sampler ran ({samples} samples)"
    );
    assert!(faults >= rounds / 2, "faults were injected ({faults})");
    assert!(
        violations.is_empty(),
        "{} violations (seed {seed}), first: {:?}",
        violations.len(),
        violations.first()
    );
    // The rotator still rotates, and every region acknowledges, once
    // everything is healthy (the key-lifetime rule may hold it a moment).
    poll_until(CONVERGENCE_BOUND, "a rotation after the chaos", || async {
        let (code, v) = admin(
            &config,
            &["rotate", "--wait", "20"],
            Duration::from_secs(40),
        )
        .await?;
        (code == 0 && v[0]["rotated"] == true).then_some(())
    })
    .await;
}

/// The sampler is the judge of the chaos run: it must see each kind of breach.
#[test]
fn the_sampler_sees_every_kind_of_breach() {
    fn write(dir: &Path, keys: &[(u32, &repository::Key)], generation: u64) {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).expect("mkdir");
        for (i, key) in keys {
            std::fs::write(dir.join(i.to_string()), key.to_base64().as_bytes()).expect("key");
        }
        let set = repository::KeySet::from_keys(keys.iter().map(|(i, k)| (*i, (*k).clone())));
        let stamp = repository::Stamp {
            generation,
            digest: set.digest(),
            promoted: BTreeMap::new(),
            agent: true,
        };
        std::fs::write(dir.join(repository::STAMP_FILE), stamp.encode()).expect("stamp");
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let repos: Vec<PathBuf> = (0..2).map(|i| tmp.path().join(i.to_string())).collect();
    let k: Vec<repository::Key> = (0..5).map(|_| repository::Key::generate()).collect();
    let mut inv = Invariants::new(2);
    write(&repos[0], &[(0, &k[0]), (1, &k[1])], 1);
    write(&repos[1], &[(0, &k[0]), (1, &k[1])], 1);
    inv.sample(&repos);
    inv.sample(&repos);
    assert_eq!(inv.violations, Vec::<String>::new());

    let breaches: [(&str, &dyn Fn()); 6] = [
        ("incomplete", &|| write(&repos[0], &[(1, &k[1])], 1)),
        ("changed", &|| {
            write(&repos[0], &[(0, &k[0]), (1, &k[2])], 1)
        }),
        ("apart", &|| {
            write(
                &repos[0],
                &[(0, &k[3]), (1, &k[1]), (2, &k[0]), (3, &k[4])],
                3,
            )
        }),
        ("went down", &|| {
            write(&repos[0], &[(0, &k[0]), (1, &k[1])], 1)
        }),
        ("unreadable", &|| {
            std::fs::write(repos[1].join("1"), b"not a key\n").expect("corrupt")
        }),
        ("rejected", &|| {
            write(&repos[1], &[(0, &k[0]), (2, &k[3])], 1)
        }),
    ];
    for (what, breach) in breaches {
        breach();
        // A distance is only certain over two passes (see `sample`).
        inv.sample(&repos);
        inv.sample(&repos);
        assert!(
            inv.violations.iter().any(|v| v.contains(what)),
            "{what}: {:?}",
            inv.violations
        );
    }
}

/// Keystone's loader (list by path, then open each name by path) in a tight
/// loop beside a sequence of rotations installed one after another: no listing
/// may ever come back empty or incomplete, and one that did not race a swap
/// holds the key being promoted (another region may already sign with it) and
/// no vanished file. Those a swap fell inside are counted.
#[test]
fn keystone_never_lists_an_empty_repository_during_installs() {
    use sha2::Digest as _;
    const INSTALLS: usize = 400;
    let hash = |k: &repository::Key| -> [u8; 32] { sha2::Sha256::digest(k.as_bytes()).into() };
    let tmp = tempfile::tempdir().expect("tempdir");
    let target = tmp.path().join("keys");
    let mut set = repository::init(4).expect("init");
    fernetd::install::install(&target, &set, None, None).expect("first install");
    // The key the next install promotes: set before that install starts, while
    // the repository holds it as its staged key.
    let promoted = Arc::new(Mutex::new(hash(set.staged().expect("staged"))));
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (stop, target, promoted) = (stop.clone(), target.clone(), promoted.clone());
        std::thread::spawn(move || {
            let (mut reads, mut raced, mut bad) = (0u64, Raced::default(), Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let must = *promoted.lock().expect("promoted");
                reads += 1;
                let (read, swapped) = keystone_read_raced(&target);
                raced.reads += u64::from(swapped);
                match read {
                    Ok(set) if swapped && raced.judge(&set).is_some() => {
                        bad.push("an empty listing".into())
                    }
                    Ok(set) if !swapped && (set.staged().is_none() || set.len() < 2) => {
                        bad.push(format!("indices {:?}", set.indices()))
                    }
                    Ok(set) if !set.iter().any(|(_, k)| hash(k) == must) => {
                        if swapped {
                            raced.missed_promoted += 1;
                        } else {
                            bad.push(format!("no promoted key in {:?}", set.indices()));
                        }
                    }
                    Ok(_) => {}
                    Err(e) if swapped && e.contains("No such file") => raced.vanished += 1,
                    Err(e) => bad.push(e),
                }
            }
            (reads, raced, bad)
        })
    };
    for _ in 0..INSTALLS {
        let next = repository::rotate(&set, 4).expect("rotate");
        *promoted.lock().expect("promoted") = hash(set.staged().expect("staged"));
        fernetd::install::install(&target, &next, None, None).expect("install");
        set = next;
    }
    stop.store(true, Ordering::Relaxed);
    let (reads, raced, bad) = reader.join().expect("reader");
    println!(
        "{INSTALLS} rotations installed, {reads} Keystone-style reads, raced a swap: {raced:?}, \
         bad: {bad:?}"
    );
    assert!(bad.is_empty(), "{bad:?}");
}
