//! The Debian package: its example configurations load, and `cargo deb`
//! (through `deploy/debian/build-deb.sh`, one release build) produces a package
//! that holds every expected path and passes lintian without an error.

use std::path::{Path, PathBuf};
use std::process::Command;

use fernetd::config::{AdminConfig, AgentConfig, RotatorConfig};

use crate::common::debian::ensure_tool;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn example_configurations_load_and_pass_the_start_up_checks() {
    let examples = root().join("deploy/examples");
    let rotator: RotatorConfig =
        fernetd::config::load(&examples.join("rotator.toml")).expect("rotator.toml loads");
    fernetd::rotator::check(rotator).expect("rotator.toml passes the rotator's checks");
    // `agent::check` also opens the repositories' parents and resolves the
    // keystone user, which only exist on a Keystone host; the rest is here.
    let agent: AgentConfig =
        fernetd::config::load(&examples.join("agent.toml")).expect("agent.toml loads");
    agent.validate().expect("agent.toml is valid");
    let _: AdminConfig =
        fernetd::config::load(&examples.join("admin.toml")).expect("admin.toml loads");
}

fn run(command: &mut Command) -> String {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{command:?} failed:\n{text}");
    text
}

/// `cargo deb` is a cargo subcommand, installed from crates.io when missing.
fn ensure_cargo_deb() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let present = Command::new(&cargo)
        .args(["deb", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !present {
        run(Command::new(&cargo).args(["install", "cargo-deb", "--locked"]));
    }
}

/// Builds the package into a fresh output directory and returns its path.
fn build_package(out: &Path) -> PathBuf {
    ensure_cargo_deb();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"));
    run(Command::new(root().join("deploy/debian/build-deb.sh"))
        .args(["--output"])
        .arg(out)
        .env("CARGO_TARGET_DIR", &target));
    let debs: Vec<PathBuf> = std::fs::read_dir(out)
        .expect("read the output directory")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .collect();
    assert_eq!(debs.len(), 1, "one package expected: {debs:?}");
    debs.into_iter().next().expect("package")
}

#[test]
fn the_debian_package_holds_everything_and_passes_lintian() {
    let out = tempfile::tempdir().expect("tempdir");
    let deb = build_package(out.path());

    let listing = run(Command::new("dpkg-deb").arg("-c").arg(&deb));
    let paths: Vec<&str> = listing
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .map(|p| p.trim_start_matches('.'))
        .collect();
    let expected = [
        "/usr/bin/fernetd",
        "/lib/systemd/system/fernetd-rotator.service",
        "/lib/systemd/system/fernetd-agent.service",
        "/lib/systemd/system/fernetd-rotator.service.d/package.conf",
        "/lib/systemd/system/fernetd-agent.service.d/package.conf",
        "/usr/lib/sysusers.d/fernetd.conf",
        "/usr/lib/tmpfiles.d/fernetd.conf",
        "/usr/share/doc/fernetd/examples/rotator.toml",
        "/usr/share/doc/fernetd/examples/agent.toml",
        "/usr/share/doc/fernetd/examples/admin.toml",
        "/usr/share/doc/fernetd/prometheus/fernetd-rules.yml",
        "/usr/share/doc/fernetd/grafana/fernetd.json",
        "/usr/share/doc/fernetd/copyright",
        "/usr/share/bash-completion/completions/fernetd",
        "/usr/share/zsh/vendor-completions/_fernetd",
        "/usr/share/fish/vendor_completions.d/fernetd.fish",
    ];
    let missing: Vec<_> = expected.iter().filter(|p| !paths.contains(p)).collect();
    assert!(
        missing.is_empty(),
        "missing from the package: {missing:?}\n{listing}"
    );
    for page in [
        "fernetd.1",
        "fernetd-rotator.1",
        "fernetd-agent.1",
        "fernetd-admin.1",
    ] {
        assert!(
            paths
                .iter()
                .any(|p| p.starts_with(&format!("/usr/share/man/man1/{page}"))),
            "man page {page} missing:\n{listing}"
        );
    }

    // The packaged binary is the stripped one: no symbol table left.
    let extracted = out.path().join("root");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&extracted));
    ensure_tool("file", "file");
    let file = run(Command::new("file").arg(extracted.join("usr/bin/fernetd")));
    assert!(
        file.contains("stripped") && !file.contains("not stripped"),
        "{file}"
    );

    // The maintainer script creates and starts nothing else.
    let control = out.path().join("control");
    run(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control));
    let postinst = std::fs::read_to_string(control.join("postinst")).expect("postinst");
    assert!(postinst.contains("systemd-sysusers"), "{postinst}");
    assert!(postinst.contains("systemd-tmpfiles"), "{postinst}");
    assert!(
        !postinst.contains("systemctl"),
        "postinst must start nothing:\n{postinst}"
    );

    ensure_tool("lintian", "lintian");
    let lintian = Command::new("lintian")
        .arg("--no-tag-display-limit")
        .arg(&deb)
        .output()
        .expect("run lintian");
    let report = String::from_utf8_lossy(&lintian.stdout).into_owned()
        + &String::from_utf8_lossy(&lintian.stderr);
    let errors: Vec<&str> = report.lines().filter(|l| l.starts_with("E:")).collect();
    assert!(
        errors.is_empty(),
        "lintian errors:\n{}\n\nfull report:\n{report}",
        errors.join("\n")
    );
}
