//! Debian packages the tests need (promtool, lintian, etcd, haproxy, faketime,
//! systemd-analyze...), installed with apt-get when missing, so that CI on a
//! bare machine runs every test instead of skipping one. Tests run in parallel
//! and dpkg holds one lock: installs here go one at a time, wait for a lock
//! another apt process holds instead of failing at once, and fetch the package
//! lists once when an install fails (a fresh machine has none). A package that
//! cannot be installed panics: a test never passes without its tool.

use std::path::Path;
use std::process::Command;
use std::sync::Mutex;

static APT: Mutex<()> = Mutex::new(());

fn apt_get(args: &[&str]) -> bool {
    Command::new("apt-get")
        .args(["-o", "DPkg::Lock::Timeout=600"])
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .is_ok_and(|s| s.success())
}

/// Makes `present()` true by installing `package` when it is not yet.
pub fn ensure(package: &str, present: impl Fn() -> bool) {
    let _one = APT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if present() {
        return;
    }
    let install = || apt_get(&["install", "-y", "--no-install-recommends", package]);
    if !install() {
        assert!(
            apt_get(&["update"]),
            "apt-get update failed; Debian's {package} is required"
        );
        assert!(install(), "cannot install Debian's {package} with apt-get");
    }
    assert!(present(), "{package} is installed but still not usable");
}

/// Makes `command` available on PATH, from Debian's `package`.
pub fn ensure_tool(command: &str, package: &str) {
    ensure(package, || on_path(command));
}

/// Whether `command` is on PATH.
pub fn on_path(command: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| is_executable(&dir.join(command)))
    })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
