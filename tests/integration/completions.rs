//! `fernetd completions SHELL` and `fernetd man --dir DIR` from the real
//! binary: the scripts know the subcommands, and the man pages are roff pages
//! for the command and every subcommand.

use std::process::Command;

use crate::common::fernetd_bin;

fn fernetd(args: &[&str]) -> String {
    let out = Command::new(fernetd_bin())
        .args(args)
        .output()
        .expect("run fernetd");
    assert!(
        out.status.success(),
        "fernetd {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

#[test]
fn bash_completion_offers_the_subcommands() {
    let script = fernetd(&["completions", "bash"]);
    assert!(script.contains("complete -F"), "{script}");
    for word in ["rotator", "agent", "admin", "purge-key", "--config"] {
        assert!(script.contains(word), "bash completion lacks {word}");
    }
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        assert!(
            fernetd(&["completions", shell]).contains("rotator"),
            "{shell}"
        );
    }
    let refused = Command::new(fernetd_bin())
        .args(["completions", "tcsh"])
        .output()
        .expect("run fernetd");
    assert_eq!(
        refused.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
}

#[test]
fn man_pages_render_for_the_command_and_every_subcommand() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("man");
    fernetd(&["man", "--dir", out.to_str().expect("utf-8")]);
    let page = |name: &str| {
        std::fs::read_to_string(out.join(name))
            .unwrap_or_else(|e| panic!("{name} was not written: {e}"))
    };
    let main = page("fernetd.1");
    assert!(main.contains(".TH fernetd 1"), "{main}");
    assert!(main.contains("fernetd\\-rotator(1)"), "{main}");
    for (file, text) in [
        ("fernetd-rotator.1", "Run the primary rotator"),
        ("fernetd-agent.1", "Run a regional agent"),
        ("fernetd-admin.1", "Admin API"),
        ("fernetd-admin-rotate.1", "\\-\\-force"),
        ("fernetd-completions.1", "shell completion"),
    ] {
        let p = page(file);
        assert!(p.contains(".TH") && p.contains(text), "{file}:\n{p}");
    }
}
