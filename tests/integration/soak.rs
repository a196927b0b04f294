//! Soak: many rotations to many agents, real processes, with every process's
//! descriptors, threads and memory read from /proc before and after. A leak
//! shows as growth past the stated bounds.
//!
//! `cargo test --test integration soak` runs 50 rotations to 5 agents;
//! `FERNETD_LONG=1` runs 1,000 rotations to 20 agents (docs/guarantees.md).

use std::time::{Duration, Instant};

use crate::rotator::{Cluster, agent_identity};

/// What one process holds at one moment.
#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    fds: i64,
    threads: i64,
    rss_kib: i64,
}

fn usage(pid: u32) -> Usage {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| -> i64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Usage {
        fds: std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as i64),
        threads: field("Threads:"),
        rss_kib: field("VmRSS:"),
    }
}

/// Growth allowed from the warmed-up sample to the end, per process. Threads:
/// tokio's blocking pool (fsync, canary checks) starts and retires threads on
/// its own; descriptors: a reconnection in flight holds a socket or two;
/// memory: allocator fragmentation, not a per-rotation cost.
const BOUND: Usage = Usage {
    fds: 16,
    threads: 16,
    rss_kib: 32 * 1024,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_soak_of_rotations_grows_no_process() {
    let long = std::env::var_os("FERNETD_LONG").is_some();
    let (agents, rotations) = if long { (20, 1000) } else { (5, 50) };
    let names: Vec<String> = (1..=agents).map(|i| format!("Region{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let cluster = Cluster::configure(&names, agent_identity, None);
    // Enough keys that the key-lifetime rule (tokens of 1 s) rarely holds a
    // rotation: a held rotation only makes the soak slower.
    let mut config = cluster.rotator_config();
    config.repositories[0].max_active_keys = 24;
    config.fanout.concurrency = 16;
    cluster.write_rotator_config(&config);
    let mut cluster = cluster.launch().await;
    cluster.converged("initial distribution").await;
    let mut pids = vec![("rotator".to_owned(), cluster.rotator().pid())];
    for i in 0..agents {
        pids.push((cluster.agents[i].name.clone(), cluster.agent(i).pid()));
    }
    let sample = || -> Vec<Usage> { pids.iter().map(|(_, p)| usage(*p)).collect() };

    // Warm-up: connections open, caches and pools at their working size.
    let warm_up = rotations / 10;
    let started = Instant::now();
    let mut baseline = Vec::new();
    let mut peak = vec![Usage::default(); pids.len()];
    for round in 0..rotations {
        if round == warm_up {
            baseline = sample();
        }
        cluster.rotate_ok();
        for (p, now) in peak.iter_mut().zip(sample()) {
            p.fds = p.fds.max(now.fds);
            p.threads = p.threads.max(now.threads);
            p.rss_kib = p.rss_kib.max(now.rss_kib);
        }
    }
    let elapsed = started.elapsed();
    let end = sample();
    println!(
        "soak: {rotations} rotations to {agents} agents in {elapsed:.1?} ({:.0?} each); \
         growth from rotation {warm_up} to the end (bound {BOUND:?}):",
        elapsed / rotations as u32
    );
    let mut over = Vec::new();
    for (((name, _), (b, e)), p) in pids.iter().zip(baseline.iter().zip(&end)).zip(&peak) {
        let growth = Usage {
            fds: e.fds - b.fds,
            threads: e.threads - b.threads,
            rss_kib: e.rss_kib - b.rss_kib,
        };
        println!(
            "  {name:>9}: fds {} -> {} (peak {}), threads {} -> {} (peak {}), rss {} -> {} KiB (peak {})",
            b.fds, e.fds, p.fds, b.threads, e.threads, p.threads, b.rss_kib, e.rss_kib, p.rss_kib
        );
        if growth.fds > BOUND.fds
            || growth.threads > BOUND.threads
            || growth.rss_kib > BOUND.rss_kib
        {
            over.push(format!("{name}: {growth:?}"));
        }
    }
    assert!(over.is_empty(), "growth past {BOUND:?}: {over:?}");
    // Every rotation reached every region: nothing was skipped to go fast.
    let (code, status) = cluster.status();
    assert_eq!(code, 0, "{status:#}");
    assert!(elapsed < Duration::from_secs(if long { 3600 } else { 120 }));
}
