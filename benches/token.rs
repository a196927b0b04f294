//! Token validations per CPU-second on one core, against Keystone 30.0.0's own
//! `TokenFormatter.validate_token` over the same project-scoped tokens, both
//! pinned to one CPU (0, or `FERNETD_BENCH_CPU`). First the library's
//! `Keyring::validate` (decrypt, decode, expiry check) for repositories of 3 and
//! 7 keys and tokens encrypted by the primary key (tried first) and by the staged
//! key (tried last). Then the batch through the real binary, `fernetd token
//! validate --repository DIR - < tokens > /dev/null`, over files of tokens that
//! Keystone's `create_token` made with the keys of a 6-key repository, each at a
//! time its key was primary: one with every key's tokens mixed, one with the
//! primary's only; from the repository with its stamp (promotion times) and
//! from the same keys without one (as `keystone-manage` leaves them). Both sides
//! count CPU time (the scheduler's for this thread, the kernel's for the
//! binary, `time.process_time()` in Python), not wall-clock time, so other work
//! on a shared machine does not skew the ratio, and report the median of five
//! rounds.
//!
//! `cargo bench --bench token` (needs `taskset`; makes the Keystone virtualenv
//! with keystone/setup-venv.sh on first use). `FERNETD_BENCH_SECONDS` sets the
//! time per measurement (default 3); `FERNETD_BENCH_NO_KEYSTONE=1` measures
//! fernetd alone (for profiling; the batch section needs Keystone to mint).

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fernetd::repository::{Key, KeySet, Stamp};
use fernetd::token::{self, AuditIds, Id, Keyring, Payload, PayloadConfig};

const PINNED: &str = "FERNETD_BENCH_PINNED";

fn main() {
    // Pin this process (and so the Keystone and fernetd children) to one CPU by
    // re-executing under taskset: one core for both sides.
    if std::env::var_os(PINNED).is_none() {
        let exe = std::env::current_exe().expect("own path");
        let cpu = std::env::var("FERNETD_BENCH_CPU").unwrap_or_else(|_| "0".into());
        let status = Command::new("taskset")
            .arg("-c")
            .arg(cpu)
            .arg(exe)
            .args(std::env::args_os().skip(1))
            .env(PINNED, "1")
            .status()
            .expect("run taskset (util-linux) to pin the benchmark to one CPU");
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
    let cpu = std::env::var("FERNETD_BENCH_CPU").unwrap_or_else(|_| "0".into());
    println!(
        "fernetd token validation, one core (CPU {cpu}), {seconds} s per measurement, rates per CPU-second"
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
                keystone_rates(&python, root, &repo, n, &t, seconds)
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
    if with_keystone {
        batch(root, &python, &tmp, seconds);
    }
    let _ = std::fs::remove_dir_all(&tmp);
}

/// Keys of the batch repository, oldest first: four secondaries and the primary
/// (7), each promoted an hour after the one before; 0 is staged.
const BATCH_KEYS: [u32; 6] = [3, 4, 5, 6, 7, 0];
/// Tokens per key in the mixed file (and primary tokens in the other file).
const PER_KEY: usize = 1000;

/// The batch through the real binary, against Keystone on the same tokens.
fn batch(root: &Path, python: &Path, tmp: &Path, seconds: f64) {
    let set = KeySet::from_keys(BATCH_KEYS.map(|i| (i, Key::generate())));
    let now = token::now();
    let hour = 3600;
    // Key 3 became primary five hours ago, 7 an hour ago; tokens of the staged
    // key come from a region that promoted it in the last ten minutes.
    let promoted: std::collections::BTreeMap<u32, i64> = (3..=7u32)
        .map(|i| (i, now - i64::from(8 - i) * hour))
        .collect();
    let issued = |index: u32, n: usize| -> i64 {
        let (from, len) = match index {
            0 => (now - 600, 600),
            i => (promoted[&i], hour),
        };
        from + (n as i64 * 7919) % len
    };
    let stamped = tmp.join("batch-stamped");
    let stamp = Stamp {
        generation: 5,
        digest: set.digest(),
        promoted: promoted.clone(),
        agent: true,
    };
    fernetd::install::install(&stamped, &set, Some(&stamp), None).expect("install");
    let plain = tmp.join("batch-unstamped");
    write_repository(&plain, &set);

    // Every key's tokens, interleaved in a fixed shuffled order.
    let mut mixed: Vec<(u32, i64)> = BATCH_KEYS
        .iter()
        .flat_map(|&i| (0..PER_KEY).map(move |n| (i, n)))
        .map(|(i, n)| (i, issued(i, n)))
        .collect();
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    for i in (1..mixed.len()).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        mixed.swap(i, (state % (i as u64 + 1)) as usize);
    }
    let primary: Vec<(u32, i64)> = (0..PER_KEY).map(|n| (7, issued(7, n))).collect();

    println!();
    println!(
        "batch through the binary: `fernetd token validate --repository DIR - < FILE > /dev/null`;"
    );
    println!(
        "FILE: project-scoped tokens made by Keystone's create_token over a 6-key repository (keys {BATCH_KEYS:?}, 7 primary, 0 staged)"
    );
    println!();
    println!(
        "| tokens | repository | fernetd batch tokens/s | Keystone validate_token/s | ratio | Keystone, keys cached/s | ratio |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|");
    for (label, specs) in [
        ("mixed, 1/6 per key", &mixed),
        ("primary key only", &primary),
    ] {
        let file = tmp.join("tokens");
        mint_with_keystone(python, root, tmp, &set, specs, now + 24 * hour, &file);
        let (shipped, cached) = keystone_rates(
            python,
            root,
            &stamped,
            6,
            &format!("@{}", file.display()),
            seconds,
        );
        for (repo_label, repo) in [("stamped", &stamped), ("no stamp", &plain)] {
            let ours = binary_rate(&file, repo, specs, seconds);
            println!(
                "| {label} | {repo_label} | {ours:.0} | {shipped:.0} | {:.0}x | {cached:.0} | {:.0}x |",
                ours / shipped,
                ours / cached
            );
        }
    }
}

/// Has Keystone mint one token per `(key index, issue time)` into `file`.
fn mint_with_keystone(
    python: &Path,
    root: &Path,
    tmp: &Path,
    set: &KeySet,
    specs: &[(u32, i64)],
    expires_at: i64,
    file: &Path,
) {
    let tokens: Vec<serde_json::Value> = specs
        .iter()
        .map(|&(index, at)| {
            serde_json::json!({
                "key": set.get(index).expect("key").to_base64().as_str(),
                "issued_at": at,
            })
        })
        .collect();
    let request = tmp.join("mint.json");
    let expires = token::iso_time(expires_at).expect("expiry");
    std::fs::write(
        &request,
        serde_json::to_vec(&serde_json::json!({ "expires_at": expires, "tokens": tokens }))
            .expect("JSON"),
    )
    .expect("write the mint request");
    let out = Command::new(python)
        .arg(root.join("benches/keystone_mint.py"))
        .arg(&request)
        .env("PYTHONWARNINGS", "ignore")
        .output()
        .expect("run the Keystone mint script");
    assert!(
        out.status.success(),
        "Keystone minting failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(file, &out.stdout).expect("write the tokens");
}

/// Tokens per CPU-second of `fernetd token validate -` over `file` repeated
/// until a round lasts about `seconds / ROUNDS` (at least a second: the
/// kernel counts a child's time in hundredths) at a million per second: the
/// median of five rounds, each one run of the binary.
fn binary_rate(file: &Path, repo: &Path, specs: &[(u32, i64)], seconds: f64) -> f64 {
    let bin = Path::new(env!("CARGO_BIN_EXE_fernetd"));
    let one = std::fs::read(file).expect("read the tokens");
    let round = (seconds / ROUNDS as f64).max(1.0);
    let copies = ((round * 1e6) as usize / specs.len()).max(1);
    let big = file.with_extension("repeated");
    std::fs::write(&big, one.repeat(copies)).expect("write the repeated tokens");
    let run = |stdout: Stdio| {
        let before = children_cpu();
        let out = Command::new(bin)
            .args(["token", "validate", "--repository"])
            .arg(repo)
            .arg("-")
            .stdin(std::fs::File::open(&big).expect("open the tokens"))
            .stdout(stdout)
            .stderr(Stdio::inherit())
            .output()
            .expect("run fernetd");
        assert!(out.status.success(), "fernetd refused some token");
        (children_cpu() - before, out.stdout)
    };
    // Once with the output kept: every token valid, and by the key that made it.
    let (_, out) = run(Stdio::piped());
    let lines: Vec<&[u8]> = out
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(lines.len(), specs.len() * copies);
    for (line, (index, _)) in lines.iter().zip(specs.iter().cycle()) {
        let want = format!("valid key={index}(");
        assert!(
            line.starts_with(want.as_bytes()),
            "{}",
            String::from_utf8_lossy(line)
        );
    }
    let mut rates: Vec<f64> = (0..ROUNDS)
        .map(|_| {
            let (cpu, _) = run(Stdio::null());
            (specs.len() * copies) as f64 / cpu.as_secs_f64()
        })
        .collect();
    rates.sort_by(f64::total_cmp);
    rates[ROUNDS / 2]
}

/// CPU time (user and system) of this process's children that were waited for,
/// from the kernel's accounting in clock ticks of 1/100 s (USER_HZ).
fn children_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("read /proc/self/stat");
    // Fields after the command name, which ends with the last ')': cutime and
    // cstime are the 16th and 17th fields of the line.
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let fields: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(4)
        .map(|f| f.parse().expect("stat field"))
        .collect();
    Duration::from_millis((fields[2] + fields[3]) * 10)
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

/// Validations per CPU-second of one token: the median of five rounds, in
/// batches so the clock is read rarely.
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
    let budget = Duration::from_secs_f64(seconds / ROUNDS as f64);
    let mut rates: Vec<f64> = (0..ROUNDS)
        .map(|_| {
            let start = Instant::now();
            let cpu = thread_cpu();
            let mut n = 0u64;
            while start.elapsed() < budget {
                run(10_000);
                n += 10_000;
            }
            n as f64 / (thread_cpu() - cpu).as_secs_f64()
        })
        .collect();
    rates.sort_by(f64::total_cmp);
    rates[ROUNDS / 2]
}

/// Rounds per measurement, on both sides; the median is reported.
const ROUNDS: usize = 5;

fn keystone_rates(
    python: &Path,
    root: &Path,
    repo: &Path,
    keys: u32,
    t: &str,
    seconds: f64,
) -> (f64, f64) {
    let out = Command::new(python)
        .arg(root.join("benches/keystone_validate.py"))
        .arg((seconds / ROUNDS as f64).to_string())
        .arg(ROUNDS.to_string())
        .arg(repo)
        .arg(keys.to_string())
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

/// A repository as Keystone expects it (directory 0700, keys 0600): Keystone logs
/// a warning on every token when the directory is world-readable, which would
/// slow its side of the comparison.
fn write_repository(dir: &Path, set: &KeySet) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(dir).expect("create repository");
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .expect("chmod repository");
    for (index, key) in set.iter() {
        let path = dir.join(index.to_string());
        std::fs::write(&path, key.to_base64().as_bytes()).expect("write key");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod key");
    }
}
