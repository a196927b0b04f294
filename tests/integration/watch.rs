//! Integration tests: how many inotify instances the real processes hold. The
//! kernel allows 128 per user by default, so a hundred agents on one host (or in
//! containers sharing a user) only start if each daemon holds at most one, and a
//! one-shot `fernetd admin` none. Counted in /proc/PID/fd rather than by lowering
//! the global limit, which would disturb every other test on the machine.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::daemon::{Daemon, poll_until};

/// The inotify instances `pid` holds: its descriptors that link to
/// `anon_inode:inotify`.
fn inotify_instances(pid: u32) -> usize {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return 0;
    };
    fds.filter_map(Result::ok)
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter(|target| target.as_os_str() == "anon_inode:inotify")
        .count()
}

/// Writes the demo's configuration for `regions` regions under `dir`.
fn demo_config(dir: &Path, regions: usize) {
    let out = Command::new(crate::common::fernetd_bin())
        .args(["demo", "--config-only", "--regions", &regions.to_string()])
        .arg("--dir")
        .arg(dir)
        .output()
        .expect("run fernetd demo --config-only");
    assert!(
        out.status.success(),
        "demo --config-only failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts an agent per configuration in `configs` and the demo's rotator, and
/// waits until every region holds the rotator's generation.
async fn start_fleet(dir: &Path, configs: &[PathBuf], name: &str, within: Duration) -> Vec<Daemon> {
    let mut daemons: Vec<Daemon> = configs
        .iter()
        .enumerate()
        .map(|(i, config)| {
            assert!(config.exists(), "{} missing", config.display());
            Daemon::spawn(
                &format!("{name}-agent-{i}"),
                [
                    OsStr::new("agent"),
                    OsStr::new("--config"),
                    config.as_os_str(),
                ],
            )
        })
        .collect();
    let rotator_config = dir.join("rotator.toml");
    daemons.push(Daemon::spawn(
        &format!("{name}-rotator"),
        [
            OsStr::new("rotator"),
            OsStr::new("--config"),
            rotator_config.as_os_str(),
        ],
    ));
    let admin_config = dir.join("admin.toml");
    poll_until(within, "every region to converge", || async {
        (admin_status(&admin_config) == 0).then_some(())
    })
    .await;
    daemons
}

/// Asserts `daemon` still runs and holds at most one inotify instance;
/// returns how many it holds.
fn running_with_one_watch(daemon: &mut Daemon) -> usize {
    assert!(
        daemon.try_exit().is_none(),
        "{} exited:\n{}",
        daemon.name(),
        daemon.log()
    );
    let held = inotify_instances(daemon.pid());
    assert!(
        held <= 1,
        "{} holds {held} inotify instances; log:\n{}",
        daemon.name(),
        daemon.log()
    );
    held
}

fn admin_status(config: &Path) -> i32 {
    Command::new(crate::common::fernetd_bin())
        .arg("admin")
        .arg("--config")
        .arg(config)
        .arg("status")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run fernetd admin")
        .code()
        .unwrap_or(-1)
}

/// How many times files in `dir` are opened during `window`, as inotify
/// reports it to a watcher of this test's own.
async fn opens_in(dir: &Path, window: Duration) -> usize {
    use notify::event::{AccessKind, EventKind};
    use notify::{RecursiveMode, Watcher};
    let opens = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = opens.clone();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event
            && matches!(event.kind, EventKind::Access(AccessKind::Open(_)))
        {
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    })
    .expect("an inotify watcher for the test");
    watcher
        .watch(dir, RecursiveMode::NonRecursive)
        .expect("watch the certificate directory");
    tokio::time::sleep(window).await;
    drop(watcher);
    opens.load(std::sync::atomic::Ordering::Relaxed)
}

/// A rotator and its agents, each a real process with TLS, the drift watch and
/// the fan-out running, hold one inotify instance between them all per
/// process; no daemon says it could not watch; and, idle, none keeps reading
/// its certificate files (each once re-read them five times a second, its
/// own reads waking its watcher again).
#[tokio::test]
async fn every_daemon_holds_at_most_one_inotify_instance() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    demo_config(dir, 3);
    let configs: Vec<PathBuf> = ["RegionOne", "RegionTwo", "RegionThree"]
        .iter()
        .map(|region| dir.join("agents").join(format!("{region}.toml")))
        .collect();
    // Every agent at the rotator's generation: TLS loaded on both sides, every
    // connection open and every drift watch in place.
    let mut daemons = start_fleet(dir, &configs, "watch", Duration::from_secs(60)).await;

    for daemon in &mut daemons {
        running_with_one_watch(daemon);
        assert!(
            !daemon.log().contains("cannot watch"),
            "{} could not watch; log:\n{}",
            daemon.name(),
            daemon.log()
        );
    }
    // Four daemons share the demo's `ca/`: re-reading it five times a second
    // they opened its files some 200 times in 3 s. The 30-second safety check
    // of each TLS configuration may open a few.
    let opens = opens_in(&dir.join("ca"), Duration::from_secs(3)).await;
    assert!(
        opens < 30,
        "the idle daemons opened their certificate files {opens} times in 3 s"
    );
    for daemon in &mut daemons {
        daemon.stop().await;
    }
}

/// `fernetd admin` holds no inotify instance while it runs. It is caught
/// mid-command: its rotator endpoint is a listener that accepts the connection
/// and never answers the TLS handshake, so the certificates are loaded and the
/// command is waiting when its descriptors are read.
#[tokio::test]
async fn a_one_shot_admin_command_watches_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    demo_config(dir, 1);
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = silent.local_addr().expect("local address");
    let config = std::fs::read_to_string(dir.join("admin.toml")).expect("read admin.toml");
    let config: String = config
        .lines()
        .map(|line| {
            if line.starts_with("rotator = ") {
                format!("rotator = \"https://{addr}\"\n")
            } else {
                format!("{line}\n")
            }
        })
        .collect();
    assert!(
        config.contains(&addr.to_string()),
        "no rotator endpoint in admin.toml:\n{config}"
    );
    let silent_config = dir.join("admin-silent.toml");
    std::fs::write(&silent_config, config).expect("write admin-silent.toml");

    let mut admin = Daemon::spawn(
        "watch-admin",
        [
            OsStr::new("admin"),
            OsStr::new("--config"),
            silent_config.as_os_str(),
            OsStr::new("status"),
        ],
    );
    let (_held_open, _) = tokio::time::timeout(Duration::from_secs(30), silent.accept())
        .await
        .expect("admin connects within 30 s")
        .expect("accept");
    assert!(admin.try_exit().is_none(), "admin exited:\n{}", admin.log());
    assert_eq!(
        inotify_instances(admin.pid()),
        0,
        "fernetd admin holds an inotify instance"
    );
    admin.kill();
}

/// The scenario: `fernetd demo --config-only --regions 100`, each agent
/// and the rotator its own process on this host, under the kernel's default
/// limit of 128 inotify instances per user. Every agent starts and stays up,
/// every region converges, and `fernetd admin status` works beside them.
#[tokio::test]
async fn a_hundred_agents_and_their_rotator_start_on_one_host() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    demo_config(dir, 100);
    let mut configs: Vec<PathBuf> = std::fs::read_dir(dir.join("agents"))
        .expect("read the agents' configurations")
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|e| e == "toml"))
        .collect();
    configs.sort();
    assert_eq!(
        configs.len(),
        100,
        "demo wrote {} agent configurations",
        configs.len()
    );
    let mut daemons = start_fleet(dir, &configs, "hundred", Duration::from_secs(120)).await;
    let mut total = 0;
    for daemon in &mut daemons {
        total += running_with_one_watch(daemon);
        assert!(
            !daemon.log().contains("Too many open files"),
            "{}:\n{}",
            daemon.name(),
            daemon.log()
        );
    }
    assert!(total <= 101, "the fleet holds {total} inotify instances");
    for daemon in &mut daemons {
        daemon.kill();
    }
}
