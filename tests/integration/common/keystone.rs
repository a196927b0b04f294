//! Real Keystone 30.0.0 for tests: the project's virtualenv, made on first use by
//! `keystone/setup-venv.sh`. A test that needs Keystone fails loudly when it cannot
//! be set up; it never skips.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The virtualenv directory, set up once per test process.
pub fn venv() -> &'static Path {
    static VENV: OnceLock<PathBuf> = OnceLock::new();
    VENV.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let out = Command::new("bash")
            .arg(root.join("keystone/setup-venv.sh"))
            .output()
            .expect("run keystone/setup-venv.sh");
        assert!(
            out.status.success(),
            "Keystone virtualenv set-up failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8(out.stdout).expect("utf-8 path").trim())
    })
}

/// The virtualenv's Python interpreter.
pub fn python() -> PathBuf {
    venv().join("bin/python")
}

/// `keystone-manage` from the virtualenv.
pub fn keystone_manage() -> PathBuf {
    venv().join("bin/keystone-manage")
}

/// Runs `python -c SCRIPT ARGS...` in the virtualenv and returns its output,
/// panicking with stderr when it fails.
pub fn run_python(script: &str, args: &[&str]) -> Output {
    let out = Command::new(python())
        .arg("-c")
        .arg(script)
        .args(args)
        .env("PYTHONWARNINGS", "ignore")
        .output()
        .expect("start the virtualenv's python");
    assert!(
        out.status.success(),
        "python failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
