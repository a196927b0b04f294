//! Rotator fan-out at scale: the real `fernetd rotator` process pushing to N
//! agents over mutual TLS, N = 1,000 by default (`FERNETD_BENCH_AGENTS=10000`).
//!
//! The agents are stand-ins served by this process (one TLS listener; each agent
//! has its own loopback address 127.1.x.y, which is how the stand-in knows which
//! region is asked), answering `Install` at once without touching a disk, so what
//! is measured is the rotator: time from commit to every acknowledgement, its CPU
//! time per rotation, and its memory with N open HTTP/2 connections. The real
//! agent's own costs are measured by `benches/agent.rs`.
//!
//! Run: `FERNETD_BENCH_AGENTS=10000 cargo bench --bench fanout` (prints each
//! figure beside the scale goal of docs/scale.md, then the figures as one JSON
//! line; no assertion). `FERNETD_BENCH_ROTATIONS` sets the number of rotations
//! (default 20, the fewest the p99 goal is stated over). The rotator runs with
//! the `Environment=` settings of `systemd/fernetd-rotator.service`, as deployed
//! (glibc's `MALLOC_ARENA_MAX` among them); `FERNETD_BENCH_UNIT_ENV=0` runs it
//! without them, for comparison. `FERNETD_BENCH_BIN=path` runs another build
//! of `fernetd` as the rotator (an A/B of two commits with the same bench).
//!
//! `FERNETD_BENCH_UNREACHABLE=0.01` adds a second phase in the same run: that
//! fraction of the stand-ins (spread over the fleet) stops answering (a call
//! hangs, as to a stopped host), and the same number of rotations is measured
//! again, commit to every *reachable* agent's acknowledgement.
//! `FERNETD_BENCH_QUARANTINE` is the rotator's `[fanout] quarantine_after`
//! then (default `"30s"`; `"off"` shows the strict rule holding every rotation).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use fernetd::config::{
    AdminConfig, AgentEndpoint, FanoutConfig, PolicyConfig, RepositoryConfig, RotatorConfig,
    ScheduleConfig, TlsConfig,
};
use fernetd::pb;
use fernetd::pb::distribution_server::{Distribution, DistributionServer};
use tonic::{Request, Response, Status};

/// The scale goals at N = 10,000 (docs/scale.md); printed beside the figures.
const GOAL_RSS_MB: f64 = 200.0;
const GOAL_P99_MS: f64 = 500.0;
const GOAL_CPU_US_PER_AGENT: f64 = 25.0;
const GOAL_COLD_START_S: f64 = 6.0;

/// The `KEY=VALUE` assignments of the rotator unit's `Environment=` lines (the
/// unit writes one or more unquoted assignments a line), unless
/// `FERNETD_BENCH_UNIT_ENV=0`.
fn unit_environment() -> Vec<(String, String)> {
    if std::env::var("FERNETD_BENCH_UNIT_ENV").is_ok_and(|v| v == "0") {
        return Vec::new();
    }
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/fernetd-rotator.service");
    let text = std::fs::read_to_string(&unit).expect("read the rotator's unit");
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("Environment="))
        .flat_map(str::split_whitespace)
        .filter_map(|assignment| assignment.split_once('='))
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .collect()
}

/// The `q` quantile (0..=1) of sorted `values`, nearest rank.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "NOT met" }
}

/// Agent `i` listens (as far as the rotator knows) on 127.1.x.y.
fn agent_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(
        127,
        1 + (i / 62_500) as u8,
        ((i / 250) % 250) as u8,
        (i % 250 + 1) as u8,
    )
}

fn agent_index(ip: Ipv4Addr) -> usize {
    let [_, a, b, c] = ip.octets();
    (a as usize - 1) * 62_500 + b as usize * 250 + (c as usize - 1)
}

/// What each stand-in agent holds: (generation, digest), one slot per agent,
/// and whether it is away (its calls hang).
struct StandIns {
    held: Vec<Mutex<(u64, Vec<u8>)>>,
    away: Vec<AtomicBool>,
}

impl StandIns {
    async fn who<T>(&self, request: &Request<T>) -> Result<usize, Status> {
        let i = match request.local_addr().map(|a| a.ip()) {
            Some(IpAddr::V4(ip)) if agent_index(ip) < self.held.len() => agent_index(ip),
            _ => return Err(Status::invalid_argument("unknown agent address")),
        };
        if self.away[i].load(Ordering::Relaxed) {
            // A stopped host: the call never returns; the rotator's deadline ends it.
            std::future::pending::<()>().await;
        }
        Ok(i)
    }
}

#[tonic::async_trait]
impl Distribution for &'static StandIns {
    async fn install(
        &self,
        request: Request<pb::InstallRequest>,
    ) -> Result<Response<pb::InstallResponse>, Status> {
        let i = self.who(&request).await?;
        let r = request.into_inner();
        *self.held[i]
            .lock()
            .map_err(|_| Status::internal("poisoned"))? = (r.generation, r.digest.clone());
        Ok(Response::new(pb::InstallResponse {
            repository: r.repository,
            generation: r.generation,
            digest: r.digest,
            canaries_valid: !r.canaries.is_empty(),
            indices: r.keys.iter().map(|k| k.index).collect(),
            unchanged: false,
            install_micros: 0,
        }))
    }

    async fn get_state(
        &self,
        request: Request<pb::GetStateRequest>,
    ) -> Result<Response<pb::GetStateResponse>, Status> {
        let i = self.who(&request).await?;
        let (generation, digest) = self.held[i]
            .lock()
            .map_err(|_| Status::internal("poisoned"))?
            .clone();
        Ok(Response::new(pb::GetStateResponse {
            region: format!("r{i}"),
            repositories: vec![pb::RepositoryState {
                name: "tokens".into(),
                generation,
                digest,
                ..Default::default()
            }],
            version: String::new(),
        }))
    }

    async fn migrate_credentials(
        &self,
        _request: Request<pb::MigrateCredentialsRequest>,
    ) -> Result<Response<pb::MigrateCredentialsResponse>, Status> {
        // The fan-out bench distributes token keys only.
        Err(Status::unimplemented("no credential table here"))
    }
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write bench file");
}

/// (user + system CPU seconds, VmRSS KiB, VmHWM KiB) of process `pid`.
fn usage(pid: u32) -> (f64, u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // After the command name: state is field 0, utime 11, stime 12 (clock ticks, 100/s).
    let cpu = (ticks(11) + ticks(12)) / 100.0;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (cpu, kib("VmRSS:"), kib("VmHWM:"))
}

fn main() {
    let n: usize = std::env::var("FERNETD_BENCH_AGENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let rotations: usize = std::env::var("FERNETD_BENCH_ROTATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|r| *r > 0)
        .unwrap_or(20);
    let unreachable: f64 = std::env::var("FERNETD_BENCH_UNREACHABLE")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|f: &f64| *f > 0.0 && *f < 1.0)
        .unwrap_or(0.0);
    let quarantine = std::env::var("FERNETD_BENCH_QUARANTINE").unwrap_or_else(|_| "30s".into());
    let quarantine = (quarantine != "off")
        .then(|| fernetd::config::duration::parse(&quarantine).expect("FERNETD_BENCH_QUARANTINE"));
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(bench(n, rotations, unreachable, quarantine));
}

async fn bench(n: usize, rotations: usize, unreachable: f64, quarantine: Option<Duration>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let ca = fernetd::tls::Authority::new("bench CA").expect("CA");
    write(&d.join("ca.pem"), ca.cert_pem());
    let tls = |name: &str, identity: &str| {
        let issued = ca.issue(&[identity]).expect("certificate");
        write(&d.join(format!("{name}.pem")), &issued.cert_pem);
        write(&d.join(format!("{name}.key")), &issued.key_pem);
        TlsConfig {
            ca: d.join("ca.pem"),
            cert: d.join(format!("{name}.pem")),
            key: d.join(format!("{name}.key")),
        }
    };
    let rotator_tls = tls("rotator", "rotator.bench");
    let admin_tls = tls("admin", "admin.bench");
    let agent_tls = tls("agent", "agent.bench");

    // One TLS listener on every loopback address serves all stand-ins.
    let stand_ins: &'static StandIns = Box::leak(Box::new(StandIns {
        held: (0..n).map(|_| Mutex::new((0, Vec::new()))).collect(),
        away: (0..n).map(|_| AtomicBool::new(false)).collect(),
    }));
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let read = |p: &Path| std::fs::read_to_string(p).expect("read PEM");
    let server_tls = tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(
            read(&agent_tls.cert),
            read(&agent_tls.key),
        ))
        .client_ca_root(tonic::transport::Certificate::from_pem(read(&agent_tls.ca)));
    let server = tonic::transport::Server::builder()
        .tls_config(server_tls)
        .expect("server TLS")
        .add_service(DistributionServer::new(stand_ins))
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
    tokio::spawn(server);

    let rotator_addr = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind")
        .local_addr()
        .expect("addr");
    let config = RotatorConfig {
        listen: rotator_addr,
        metrics_listen: None,
        tls: rotator_tls,
        admin_identities: vec!["admin.bench".into()],
        state_dir: d.join("state"),
        repositories: vec![RepositoryConfig {
            name: "tokens".into(),
            max_active_keys: 5,
            import: None,
            schedule: None,
        }],
        schedule: ScheduleConfig {
            cron: "0 0 1 1 *".into(),
        },
        // Tokens of 1 s: the key-lifetime rule holds a rotation only until a
        // second after the purged key stopped being primary everywhere.
        policy: PolicyConfig {
            token_expiration: Duration::from_secs(1),
            allow_expired_window: Duration::ZERO,
        },
        agents: (0..n)
            .map(|i| AgentEndpoint {
                name: None,
                region: format!("r{i}"),
                endpoint: format!("https://{}", SocketAddr::new(IpAddr::V4(agent_ip(i)), port)),
                identity: "agent.bench".into(),
            })
            .collect(),
        fanout: if unreachable > 0.0 {
            // Agents away: calls give up sooner, and quarantine (no shorter
            // than a read-back interval) lets the others rotate.
            let q = quarantine.unwrap_or(Duration::from_secs(30));
            FanoutConfig {
                reconcile_interval: q,
                call_timeout: Duration::from_secs(5).min(q),
                quarantine_after: quarantine,
                ..FanoutConfig::default()
            }
        } else {
            FanoutConfig {
                reconcile_interval: Duration::from_secs(3600),
                ..FanoutConfig::default()
            }
        },
        keystone_conf: None,
        audit_log: None,
        seal_key: None,
        ha: None,
        credential: None,
    };
    let rotator_toml = d.join("rotator.toml");
    write(&rotator_toml, &toml::to_string(&config).expect("toml"));
    let admin = AdminConfig {
        rotator: format!("https://{rotator_addr}").into(),
        rotator_identity: "rotator.bench".into(),
        tls: admin_tls,
    };
    let log = std::fs::File::create(d.join("rotator.log")).expect("log");
    let environment = unit_environment();
    let started = Instant::now();
    // Another build of fernetd, for an A/B of two commits with one bench.
    let binary = std::env::var_os("FERNETD_BENCH_BIN").map_or_else(
        || env!("CARGO_BIN_EXE_fernetd").into(),
        std::path::PathBuf::from,
    );
    let mut child = std::process::Command::new(&binary)
        .args(["rotator", "--config"])
        .arg(&rotator_toml)
        .envs(environment.iter().map(|(k, v)| (k, v)))
        .env("FERNETD_LOG", "warn")
        .stderr(log)
        .spawn()
        .expect("spawn the rotator");
    let pid = child.id();
    let mut client = fernetd::rotator::admin::connect(&admin).expect("admin client");

    // Start-up: every agent read back and given generation 1.
    let converged = |s: &pb::StatusResponse| s.agents.iter().all(|a| a.digest_match);
    loop {
        if let Ok(s) = client.status(pb::StatusRequest {}).await
            && converged(&s.into_inner())
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "no convergence"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let startup = started.elapsed();
    let (cpu0, rss0, _) = usage(pid);
    println!(
        "fan-out bench: {n} agents (stand-ins in the bench process), one rotator process, {rotations} rotations"
    );
    println!("  rotator binary: {}", binary.display());
    let shown: Vec<String> = environment
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    println!(
        "  rotator environment from systemd/fernetd-rotator.service: {}",
        if shown.is_empty() {
            "none (FERNETD_BENCH_UNIT_ENV=0)".to_owned()
        } else {
            shown.join(" ")
        }
    );
    println!(
        "  cold start, every agent read back and at generation 1: {:.2} s ({cpu0:.2} s CPU), RSS {} MiB",
        startup.as_secs_f64(),
        rss0 / 1024
    );

    let (mut walls, mut cpus, _) = measure(&mut client, pid, stand_ins, rotations, n, false).await;
    let mut away_phase = None;
    if unreachable > 0.0 {
        away_phase = Some(
            away(
                &mut client,
                pid,
                stand_ins,
                rotations,
                n,
                unreachable,
                quarantine,
            )
            .await,
        );
    }
    let (_, rss, hwm) = usage(pid);
    walls.sort_by(f64::total_cmp);
    cpus.sort_by(f64::total_cmp);
    report(
        n,
        rotations,
        &walls,
        &cpus,
        (rss, hwm),
        (startup.as_secs_f64(), cpu0),
        &shown,
        away_phase,
    );
    let _ = child.kill();
    let _ = child.wait();
}

type Client = fernetd::pb::admin_client::AdminClient<tonic::transport::Channel>;

/// One rotation through the Admin API (waited for unless `no_wait`), tried
/// again at its purge-safe time while the key-lifetime rule holds it: the
/// rotator's CPU seconds before the try that was not held, its wall time and
/// its answer.
async fn rotate_past_holds(
    client: &mut Client,
    pid: u32,
    no_wait: bool,
) -> (f64, Duration, pb::RotateResponse) {
    loop {
        let (before, _, _) = usage(pid);
        let t = Instant::now();
        let response = client
            .rotate(pb::RotateRequest {
                wait_ms: 300_000,
                no_wait,
                ..Default::default()
            })
            .await
            .expect("rotate")
            .into_inner();
        let wall = t.elapsed();
        let outcome = &response.outcomes[0];
        if !outcome.held_for_lifetime {
            return (before, wall, response);
        }
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let wait = u64::try_from(outcome.safe_unix_ms - now_ms).unwrap_or(0) + 10;
        tokio::time::sleep(Duration::from_millis(wait)).await;
    }
}

/// `rotations` rotations through the Admin API, each waited for: the wall
/// times (ms) and rotator CPU seconds of those that committed, and how many
/// did. `tolerate_blocked`: a blocked rotation is counted, not a failure.
async fn measure(
    client: &mut Client,
    pid: u32,
    stand_ins: &StandIns,
    rotations: usize,
    reachable: usize,
    tolerate_blocked: bool,
) -> (Vec<f64>, Vec<f64>, usize) {
    let mut walls = Vec::new();
    let mut cpus = Vec::new();
    for _ in 0..rotations {
        // Only the rotation that commits is measured.
        let (before, wall, response) = rotate_past_holds(client, pid, false).await;
        let outcome = &response.outcomes[0];
        if tolerate_blocked && !outcome.rotated {
            continue;
        }
        assert!(
            outcome.rotated && outcome.pending_regions.is_empty(),
            "{outcome:?}"
        );
        let held = stand_ins
            .held
            .iter()
            .filter(|h| h.lock().is_ok_and(|h| h.0 == outcome.generation))
            .count();
        assert_eq!(
            held, reachable,
            "every reachable stand-in holds the new generation"
        );
        walls.push(wall.as_secs_f64() * 1000.0);
        cpus.push(usage(pid).0 - before);
    }
    let committed = walls.len();
    (walls, cpus, committed)
}

/// The second phase: a fraction of the stand-ins goes away; one rotation
/// lets the rotator notice (quarantine, or the strict rule's block), then
/// `rotations` more are measured. (agents away, committed, sorted walls).
async fn away(
    client: &mut Client,
    pid: u32,
    stand_ins: &StandIns,
    rotations: usize,
    n: usize,
    fraction: f64,
    quarantine: Option<Duration>,
) -> (usize, usize, Vec<f64>, Option<Duration>) {
    let step = (1.0 / fraction).round().max(1.0) as usize;
    let gone: Vec<usize> = (0..n).step_by(step).collect();
    for &i in &gone {
        stand_ins.away[i].store(true, Ordering::Relaxed);
    }
    // After the first phase's rotations this one may be held by the
    // key-lifetime rule: without a commit, no agent is behind and none is
    // quarantined.
    let (_, _, response) = rotate_past_holds(client, pid, true).await;
    assert!(response.outcomes[0].rotated, "{:?}", response.outcomes[0]);
    if let Some(q) = quarantine {
        let deadline = Instant::now() + q * 3 + Duration::from_secs(60);
        loop {
            let status = client
                .status(pb::StatusRequest {})
                .await
                .expect("status")
                .into_inner();
            let quarantined = status
                .agents
                .iter()
                .filter(|a| a.quarantined_since_unix_ms > 0)
                .count();
            if quarantined == gone.len()
                && status.agents.iter().filter(|a| a.digest_match).count() == n - gone.len()
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{quarantined} of {} agents quarantined",
                gone.len()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let (mut walls, _, committed) = measure(
        client,
        pid,
        stand_ins,
        rotations,
        n - gone.len(),
        quarantine.is_none(),
    )
    .await;
    walls.sort_by(f64::total_cmp);
    (gone.len(), committed, walls, quarantine)
}

/// Prints the figures beside the goals, then as one JSON line.
#[allow(clippy::too_many_arguments)]
fn report(
    n: usize,
    rotations: usize,
    walls: &[f64],
    cpus: &[f64],
    (rss, hwm): (u64, u64),
    (cold, cpu0): (f64, f64),
    shown: &[String],
    away_phase: Option<(usize, usize, Vec<f64>, Option<Duration>)>,
) {
    let (p50, p99, max) = (
        quantile(walls, 0.5),
        quantile(walls, 0.99),
        walls[walls.len() - 1],
    );
    // CPU time comes in 10 ms clock ticks: the mean over every rotation is the
    // honest per-rotation figure.
    let cpu_mean = cpus.iter().sum::<f64>() / cpus.len() as f64;
    let cpu_per_agent_us = cpu_mean * 1e6 / n as f64;
    let rss_mb = rss as f64 * 1024.0 / 1e6;
    let goal = |figure: f64, limit: f64| verdict(figure < limit);
    println!(
        "  rotation, commit to every acknowledgement: p50 {p50:.0} ms, p99 {p99:.0} ms, max {max:.0} ms   goal p99 < {GOAL_P99_MS} ms over >= 20 rotations: {}",
        verdict(p99 < GOAL_P99_MS && rotations >= 20)
    );
    println!(
        "  rotator CPU per rotation: mean {:.0} ms, {cpu_per_agent_us:.1} µs per agent   goal < {GOAL_CPU_US_PER_AGENT} µs: {}",
        cpu_mean * 1000.0,
        goal(cpu_per_agent_us, GOAL_CPU_US_PER_AGENT)
    );
    println!(
        "  rotator memory: RSS {rss_mb:.0} MB ({} MiB), peak {} MiB, {:.1} KiB per agent with its open connection   goal < {GOAL_RSS_MB} MB: {}",
        rss / 1024,
        hwm / 1024,
        rss as f64 / n as f64,
        goal(rss_mb, GOAL_RSS_MB)
    );
    println!(
        "  cold start: {cold:.2} s   goal < {GOAL_COLD_START_S} s: {}",
        goal(cold, GOAL_COLD_START_S)
    );
    if n != 10_000 {
        println!("  (the goals are stated for N = 10000; this run has N = {n})");
    }
    let mut away_json = serde_json::Value::Null;
    if let Some((gone, committed, away_walls, quarantine)) = away_phase {
        let setting = quarantine.map_or_else(
            || "off".to_owned(),
            |q| fernetd::config::duration::format(&q),
        );
        println!(
            "  with {gone} of {n} agents unreachable (quarantine_after {setting}): {committed} of {rotations} rotations committed"
        );
        if let (Some(first), Some(last)) = (away_walls.first(), away_walls.last()) {
            let (ap50, ap99) = (quantile(&away_walls, 0.5), quantile(&away_walls, 0.99));
            println!(
                "    commit to every reachable agent's acknowledgement: p50 {ap50:.0} ms, p99 {ap99:.0} ms (min {first:.0}, max {last:.0}); all reachable, same run: p50 {p50:.0} ms, p99 {p99:.0} ms"
            );
        }
        away_json = serde_json::json!({
            "unreachable": gone,
            "quarantine_after": setting,
            "committed": committed,
            "rotation_p50_ms": (!away_walls.is_empty()).then(|| quantile(&away_walls, 0.5)),
            "rotation_p99_ms": (!away_walls.is_empty()).then(|| quantile(&away_walls, 0.99)),
        });
    }
    println!(
        "{}",
        serde_json::json!({
            "unreachable_phase": away_json,
            "bench": "fanout",
            "agents": n,
            "rotations": rotations,
            "cold_start_s": cold,
            "cold_start_cpu_s": cpu0,
            "rotation_p50_ms": p50,
            "rotation_p99_ms": p99,
            "rotation_max_ms": max,
            "cpu_per_rotation_ms": cpu_mean * 1000.0,
            "cpu_per_agent_us": cpu_per_agent_us,
            "rotator_rss_mb": rss_mb,
            "rotator_peak_mib": hwm / 1024,
            "rotator_environment": shown,
        })
    );
}
