//! Install latency: how long `install::install` takes to put a key set in place
//! (build, fsync, swap, fsync parent, remove the old copy), per filesystem and
//! per repository kind, plus the snapshot-consistent `repository::load`. Each
//! install carries a stamp, as an agent's does, so the keys a rotation keeps are
//! hard-linked from the live set as they are in service. Prints
//! median, 90th and 99th percentile and maximum over many runs.
//! Run: `cargo bench --bench install` (optionally `-- DIR...` to measure other
//! filesystems; defaults to the system temporary directory and /dev/shm).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fernetd::install;
use fernetd::repository::{self, KeySet, Stamp};

/// The stamp an agent writes with generation `generation` of `set`.
fn stamp(generation: u64, set: &KeySet) -> Stamp {
    Stamp {
        generation,
        digest: set.digest(),
        promoted: Default::default(),
        agent: true,
    }
}

fn figures(name: &str, mut samples: Vec<Duration>) {
    samples.sort_unstable();
    let at =
        |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e3;
    println!(
        "{name:<48} n={:<5} median {:>8.3} ms  p90 {:>8.3} ms  p99 {:>8.3} ms  max {:>8.3} ms",
        samples.len(),
        at(0.5),
        at(0.9),
        at(0.99),
        at(1.0)
    );
}

fn bench_dir(base: &Path, runs: usize) -> Result<(), Box<dyn std::error::Error>> {
    let tmp = tempfile::tempdir_in(base)?;
    for keys in [3usize, 7] {
        let mut set = repository::init(keys)?;
        while set.len() < keys {
            set = repository::rotate(&set, keys)?;
        }
        for symlink in [false, true] {
            let target = tmp.path().join(format!("keys-{keys}-{symlink}"));
            if symlink {
                let real = tmp.path().join(format!("real-{keys}"));
                install::install(&real, &set, None, None)?;
                std::os::unix::fs::symlink(&real, &target)?;
            }
            let mut generation = 1;
            install::install(&target, &set, Some(&stamp(generation, &set)), None)?;
            let mut samples = Vec::with_capacity(runs);
            for _ in 0..runs {
                set = repository::rotate(&set, keys)?;
                generation += 1;
                let stamp = stamp(generation, &set);
                let started = Instant::now();
                let outcome = install::install(&target, &set, Some(&stamp), None)?;
                samples.push(started.elapsed());
                std::hint::black_box(outcome);
            }
            let kind = if symlink { "symlink flip" } else { "exchange" };
            figures(&format!("install {keys} keys, {kind}"), samples);
            let mut samples = Vec::with_capacity(runs);
            for _ in 0..runs {
                let started = Instant::now();
                let loaded: KeySet = repository::load(&target)?;
                samples.push(started.elapsed());
                std::hint::black_box(loaded);
            }
            figures(&format!("load {keys} keys ({kind} target)"), samples);
        }
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<PathBuf> = std::env::args_os()
        .skip(1)
        .filter(|a| a != "--bench")
        .map(PathBuf::from)
        .collect();
    let dirs = if args.is_empty() {
        vec![std::env::temp_dir(), PathBuf::from("/dev/shm")]
    } else {
        args
    };
    let runs = 200;
    for dir in dirs {
        if !dir.is_dir() {
            println!("{}: not a directory, skipped", dir.display());
            continue;
        }
        let fs = std::process::Command::new("stat")
            .args(["-f", "-c", "%T"])
            .arg(&dir)
            .output()?;
        println!(
            "{} ({}):",
            dir.display(),
            String::from_utf8_lossy(&fs.stdout).trim()
        );
        bench_dir(&dir, runs)?;
    }
    Ok(())
}
