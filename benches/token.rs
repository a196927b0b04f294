//! Token validations per CPU-second on one core: fernetd's `Keyring::validate`
//! (decrypt, decode, expiry check) against Keystone 30.0.0's own
//! `TokenFormatter.validate_token` over the same project-scoped tokens, both
//! pinned to CPU 0, for repositories of 3 and 7 keys and tokens encrypted by the
//! primary key (tried first) and by the staged key (tried last). Both sides count
//! CPU time (the scheduler's for this thread, `time.process_time()` in Python),
//! not wall-clock time, so other work on a shared machine does not skew the ratio.
//!
//! `cargo bench --bench token` (needs `taskset`; makes the Keystone virtualenv
//! with keystone/setup-venv.sh on first use). `FERNETD_BENCH_SECONDS` sets the
//! time per measurement (default 3); `FERNETD_BENCH_NO_KEYSTONE=1` measures
//! fernetd alone (for profiling).

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use fernetd::repository::{Key, KeySet};
use fernetd::token::{self, AuditIds, Id, Keyring, Payload, PayloadConfig};

const PINNED: &str = "FERNETD_BENCH_PINNED";

fn main() {
    // Pin this process (and so the Keystone children) to CPU 0 by re-executing
    // under taskset: one core for both sides.
    if std::env::var_os(PINNED).is_none() {
        let exe = std::env::current_exe().expect("own path");
        let status = Command::new("taskset")
            .arg("-c")
            .arg("0")
            .arg(exe)
            .args(std::env::args_os().skip(1))
            .env(PINNED, "1")
            .status()
            .expect("run taskset (util-linux) to pin the benchmark to CPU 0");
        std::process::exit(status.code().unwrap_or(1));
    }
    // `cargo bench` passes `--bench`; nothing else to parse.
    let seconds: f64 = std::env::var("FERNETD_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);

    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let with_keystone = std::env::var_os("FERNETD_BENCH_NO_KEYSTONE").is_none();
    let python = if with_keystone {
        keystone_python(root)
    } else {
        PathBuf::new()
    };
    let tmp = std::env::temp_dir().join(format!("fernetd-bench-{}", std::process::id()));

    let payload = project_scoped();
    println!(
        "fernetd token validation, one core (CPU 0), {seconds} s per measurement, rates per CPU-second"
    );
    println!("token: project-scoped (version 2), UUID user and project, one audit id");
    println!();
    println!(
        "| keys | encrypted by | fernetd validations/s | Keystone validate_token/s | ratio | Keystone, keys cached/s | ratio |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|");
    for n in [3u32, 7] {
        let set = KeySet::from_keys((0..n).map(|i| (i, Key::generate())));
        let repo = tmp.join(format!("keys{n}"));
        write_repository(&repo, &set);
        let ring = Keyring::new(&set);
        // Keystone tries the primary first and the staged key 0 last.
        for (label, index) in [("primary (tried first)", n - 1), ("staged (tried last)", 0)] {
            let t = token::mint(set.get(index).expect("key"), &payload).expect("mint");
            assert_eq!(
                t.len(),
                183,
                "a project-scoped token as Keystone makes them"
            );
            let ours = fernetd_rate(&ring, &t, seconds);
            let (shipped, cached) = if with_keystone {
                keystone_rates(&python, root, &repo, &t, seconds)
            } else {
                (f64::NAN, f64::NAN)
            };
            println!(
                "| {n} | {label} | {ours:.0} | {shipped:.0} | {:.0}x | {cached:.0} | {:.0}x |",
                ours / shipped,
                ours / cached
            );
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
}

fn project_scoped() -> Payload {
    let mut audit = AuditIds::default();
    audit.push(&rand::random::<[u8; 16]>());
    Payload {
        version: 2,
        user_id: Some(Id::Uuid(rand::random())),
        project_id: Some(Id::Uuid(rand::random())),
        methods: 2,
        audit_ids: audit,
        expires_at: token::now() + 3600,
        ..Payload::default()
    }
}

/// CPU time this thread has run, from the scheduler's own accounting: the
/// machine is shared, so wall-clock time would count other processes' turns.
fn thread_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat")
        .expect("read /proc/thread-self/schedstat");
    let ns: u64 = stat
        .split_whitespace()
        .next()
        .and_then(|f| f.parse().ok())
        .expect("schedstat run time");
    Duration::from_nanos(ns)
}

/// Validations per CPU-second of one token, in batches so the clock is read rarely.
fn fernetd_rate(ring: &Keyring, t: &str, seconds: f64) -> f64 {
    let config = PayloadConfig::default();
    let now = token::now();
    let run = |n: u32| {
        for _ in 0..n {
            let r = ring.validate(black_box(t), &config, now);
            assert!(black_box(r).is_ok());
        }
    };
    run(10_000); // warm up
    let budget = Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let cpu = thread_cpu();
    let mut n = 0u64;
    while start.elapsed() < budget {
        run(10_000);
        n += 10_000;
    }
    n as f64 / (thread_cpu() - cpu).as_secs_f64()
}

fn keystone_rates(python: &Path, root: &Path, repo: &Path, t: &str, seconds: f64) -> (f64, f64) {
    let out = Command::new(python)
        .arg(root.join("benches/keystone_validate.py"))
        .arg(seconds.to_string())
        .arg(repo)
        .arg(t)
        .env("PYTHONWARNINGS", "ignore")
        .output()
        .expect("run the Keystone benchmark script");
    assert!(
        out.status.success(),
        "Keystone benchmark failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("JSON from the Keystone script");
    (
        v["as_shipped"].as_f64().expect("rate"),
        v["keys_cached"].as_f64().expect("rate"),
    )
}

fn keystone_python(root: &Path) -> PathBuf {
    let out = Command::new("bash")
        .arg(root.join("keystone/setup-venv.sh"))
        .output()
        .expect("run keystone/setup-venv.sh");
    assert!(
        out.status.success(),
        "venv set-up failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("bin/python")
}

fn write_repository(dir: &Path, set: &KeySet) {
    std::fs::create_dir_all(dir).expect("create repository");
    for (index, key) in set.iter() {
        std::fs::write(dir.join(index.to_string()), key.to_base64().as_bytes()).expect("write key");
    }
}
