//! The systemd units in `systemd/` as systemd itself reads them:
//! `systemd-analyze verify` must print nothing about them, their exposure score
//! must stay low, and the sysusers/tmpfiles snippets must make the user and the
//! repository directory the agent unit relies on.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::fernetd_bin;
use crate::common::keystone::{bundle, run_ok as run};

/// The installed paths the units name, and what stands in for them here:
/// `verify` refuses a unit whose ExecStart binary does not exist.
fn installed_paths() -> [(&'static str, PathBuf); 2] {
    [
        ("/usr/local/bin/fernetd", fernetd_bin()),
        (
            "/opt/fernetd/keystone/run-keystone.sh",
            bundle().join("run-keystone.sh"),
        ),
    ]
}

const UNITS: [&str; 3] = [
    "fernetd-rotator.service",
    "fernetd-agent.service",
    "keystone-regional.service",
];

fn systemd_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd")
}

/// `systemd-analyze` etc., installed with apt-get when absent (as root).
fn systemd_tool(name: &str) -> PathBuf {
    let find = || {
        ["/usr/bin", "/bin", "/usr/sbin", "/sbin"]
            .iter()
            .map(|d| Path::new(d).join(name))
            .find(|p| p.exists())
    };
    if let Some(path) = find() {
        return path;
    }
    crate::common::debian::ensure("systemd", || find().is_some());
    find().unwrap_or_else(|| panic!("{name} not found even after installing systemd"))
}

/// Copies the units into `dir` with the installed paths rewritten to this build.
fn staged_units(dir: &Path) -> Vec<PathBuf> {
    UNITS
        .iter()
        .map(|unit| {
            let mut text = std::fs::read_to_string(systemd_dir().join(unit)).unwrap();
            let exec = text
                .lines()
                .find(|l| l.starts_with("ExecStart="))
                .unwrap_or_else(|| panic!("{unit}: no ExecStart"));
            let (from, to) = installed_paths()
                .into_iter()
                .find(|(from, _)| exec.starts_with(&format!("ExecStart={from} ")))
                .unwrap_or_else(|| {
                    panic!("{unit}: ExecStart names no known installed path: {exec}")
                });
            // ExecStartPre and ExecReload run the same binary.
            text = text.replace(&format!("={from} "), &format!("={} ", to.display()));
            let path = dir.join(unit);
            std::fs::write(&path, text).unwrap();
            path
        })
        .collect()
}

/// Everything `verify` said about `units` (it exits 0 on mere warnings).
fn verify(units: &[PathBuf]) -> Vec<String> {
    let out = Command::new(systemd_tool("systemd-analyze"))
        .args(["verify", "--man=no"])
        .args(units)
        .output()
        .expect("run systemd-analyze verify");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut said: Vec<String> = text
        .lines()
        .filter(|l| {
            UNITS.iter().any(|u| l.contains(u))
                || units.iter().any(|u| l.contains(&*u.to_string_lossy()))
        })
        .map(str::to_owned)
        .collect();
    if !out.status.success() {
        said.push(format!(
            "systemd-analyze verify exited with {}: {text}",
            out.status
        ));
    }
    said
}

#[test]
fn units_pass_systemd_analyze_verify_without_a_warning() {
    let tmp = tempfile::tempdir().unwrap();
    let units = staged_units(tmp.path());
    let said = verify(&units);
    assert!(
        said.is_empty(),
        "systemd-analyze verify warned:\n{}",
        said.join("\n")
    );

    // The same check sees a mistake: a misspelt value and an unknown key.
    let broken = tmp.path().join("broken-agent.service");
    let text = std::fs::read_to_string(&units[1]).unwrap();
    std::fs::write(
        &broken,
        text.replace("ProtectSystem=strict", "ProtectSystem=strictest") + "Bogus=1\n",
    )
    .unwrap();
    let said = verify(&[broken]);
    assert!(said.len() >= 2, "a broken unit went unnoticed: {said:?}");
}

#[test]
fn units_carry_the_required_hardening() {
    for unit in UNITS {
        let text = std::fs::read_to_string(systemd_dir().join(unit)).unwrap();
        for line in [
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "ProtectHome=yes",
            "Restart=on-failure",
            "KillSignal=SIGTERM",
            "SystemCallFilter=@system-service",
        ] {
            assert!(text.lines().any(|l| l == line), "{unit} lacks {line}");
        }
    }
    let agent = std::fs::read_to_string(systemd_dir().join("fernetd-agent.service")).unwrap();
    assert!(agent.lines().any(|l| l == "User=fernetd-agent"));
    assert!(
        agent.lines().any(|l| l
            == "CapabilityBoundingSet=CAP_CHOWN CAP_FOWNER CAP_DAC_OVERRIDE CAP_DAC_READ_SEARCH")
    );
    assert!(
        agent
            .lines()
            .any(|l| l == "ReadWritePaths=/etc/keystone/fernetd")
    );
    let rotator = std::fs::read_to_string(systemd_dir().join("fernetd-rotator.service")).unwrap();
    // Two users: the agent can touch neither the rotator's state nor its user.
    assert!(rotator.lines().any(|l| l == "User=fernetd-rotator"));
    let directives = |text: &str, key: &str| -> Vec<String> {
        text.lines()
            .filter(|l| l.starts_with(&format!("{key}=")))
            .map(str::to_owned)
            .collect()
    };
    assert!(
        directives(&agent, "StateDirectory").is_empty(),
        "the agent unit must not own the rotator's state directory"
    );
    assert!(
        directives(&agent, "ReadWritePaths")
            .iter()
            .all(|l| !l.contains("/var/lib/fernetd")),
        "the agent unit can write the rotator's state"
    );
    assert!(
        rotator.lines().any(|l| l == "CapabilityBoundingSet="),
        "the rotator needs no capability"
    );
    assert_roles_cannot_read_each_others_configuration(&agent, &rotator);

    // The readiness gate: the agent tells systemd when Keystone may start, and
    // Keystone waits for it without depending on it afterwards.
    for line in ["Type=notify", "NotifyAccess=main"] {
        assert!(agent.lines().any(|l| l == line), "agent unit lacks {line}");
    }
    let start_timeout = directives(&agent, "TimeoutStartSec");
    let [start_timeout] = &start_timeout[..] else {
        panic!("the agent unit needs one TimeoutStartSec: {start_timeout:?}");
    };
    let start_timeout = fernetd::config::duration::parse(
        start_timeout
            .trim_start_matches("TimeoutStartSec=")
            .replace("min", "m")
            .as_str(),
    )
    .expect("TimeoutStartSec is a duration");
    assert!(
        start_timeout
            > fernetd::config::DEFAULT_READINESS_MAX_WAIT + std::time::Duration::from_secs(60),
        "TimeoutStartSec {start_timeout:?} does not exceed the default max_wait"
    );
    let keystone =
        std::fs::read_to_string(systemd_dir().join("keystone-regional.service")).unwrap();
    for key in ["After", "Wants"] {
        assert!(
            directives(&keystone, key)
                .iter()
                .any(|l| l.split(['=', ' ']).any(|u| u == "fernetd-agent.service")),
            "keystone-regional.service is not {key}= fernetd-agent.service"
        );
    }
    for key in ["Requires", "BindsTo", "Requisite", "PartOf"] {
        assert!(
            directives(&keystone, key)
                .iter()
                .all(|l| !l.contains("fernetd-agent")),
            "keystone-regional.service must outlive the agent: {key}="
        );
    }

    // systemd's own score (0 = locked down, 10 = exposed); "OK" ends at 4.9.
    let tmp = tempfile::tempdir().unwrap();
    for path in staged_units(tmp.path()) {
        let out = run(Command::new(systemd_tool("systemd-analyze"))
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(&path));
        let text = String::from_utf8_lossy(&out.stdout);
        let score: f64 = text
            .lines()
            .find_map(|l| l.split("Overall exposure level for ").nth(1))
            .and_then(|rest| rest.split(": ").nth(1))
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
        println!("{}: exposure {score}", path.display());
        assert!(
            score <= 2.5,
            "{} exposure {score} > 2.5:\n{text}",
            path.display()
        );
        // No worse than measured before the two users were split (issue 11).
        let before = match path.file_name().and_then(|n| n.to_str()) {
            Some("fernetd-rotator.service") => 1.2,
            Some("fernetd-agent.service") => 2.0,
            _ => 2.5,
        };
        assert!(
            score <= before,
            "{} exposure {score} is worse than {before}:\n{text}",
            path.display()
        );
    }
}

/// The paths a unit's `InaccessiblePaths=` lines hide (the `-` prefix only
/// says a missing path is fine).
fn hidden_paths(unit: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|l| l.strip_prefix("InaccessiblePaths="))
        .flat_map(str::split_whitespace)
        .map(|p| p.trim_start_matches('-').to_owned())
        .collect()
}

/// One host may run both roles: the agent holds CAP_DAC_OVERRIDE, so file
/// modes do not keep it from the rotator's TLS key, seal key or etcd client
/// key. Each role has its own configuration directory, and each unit hides
/// the other's (and the agent's hides the rotator's state); every secret the
/// example rotator configuration names lives where the agent cannot see it.
fn assert_roles_cannot_read_each_others_configuration(agent: &str, rotator: &str) {
    assert!(
        agent
            .lines()
            .any(|l| l == "ConfigurationDirectory=fernetd/agent")
    );
    assert!(
        rotator
            .lines()
            .any(|l| l == "ConfigurationDirectory=fernetd/rotator")
    );
    let (agent_hides, rotator_hides) = (hidden_paths(agent), hidden_paths(rotator));
    for path in ["/etc/fernetd/rotator", "/var/lib/fernetd"] {
        assert!(
            agent_hides.iter().any(|h| h == path),
            "the agent unit does not hide {path}: {agent_hides:?}"
        );
    }
    assert!(
        rotator_hides.iter().any(|h| h == "/etc/fernetd/agent"),
        "the rotator unit does not hide the agent's configuration: {rotator_hides:?}"
    );
    // Both units, and the Debian drop-ins that re-point them, read their
    // configuration from their own directory.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (text, role) in [
        (agent.to_owned(), "agent"),
        (rotator.to_owned(), "rotator"),
        (
            std::fs::read_to_string(root.join(format!(
                "deploy/debian/fernetd-{role}.service.d/package.conf",
                role = "agent"
            )))
            .unwrap(),
            "agent",
        ),
        (
            std::fs::read_to_string(root.join(format!(
                "deploy/debian/fernetd-{role}.service.d/package.conf",
                role = "rotator"
            )))
            .unwrap(),
            "rotator",
        ),
    ] {
        let configs: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("Exec") && l.contains("--config"))
            .filter_map(|l| l.split("--config ").nth(1))
            .filter_map(|rest| rest.split_whitespace().next())
            .collect();
        assert!(!configs.is_empty(), "{role}: no --config");
        for config in configs {
            assert_eq!(config, format!("/etc/fernetd/{role}/{role}.toml"), "{role}");
        }
    }
    // Every file the example rotator configuration names (certificates,
    // keys, seal key, etcd client key) is out of the agent's sight, and every
    // file of the example agent configuration out of the rotator's.
    let example =
        |name: &str| std::fs::read_to_string(root.join("deploy/examples").join(name)).unwrap();
    let rotator_config: fernetd::config::RotatorConfig =
        toml::from_str(&example("rotator.toml")).unwrap();
    let mut secrets = vec![
        rotator_config.tls.ca.clone(),
        rotator_config.tls.cert.clone(),
        rotator_config.tls.key.clone(),
        rotator_config.state_dir.clone(),
    ];
    secrets.extend(rotator_config.seal_key.clone());
    if let Some(ha) = &rotator_config.ha {
        secrets.extend(ha.key.clone());
        secrets.extend(ha.cert.clone());
        secrets.push(ha.seal_key.clone());
    }
    for path in &secrets {
        assert!(
            agent_hides.iter().any(|h| path.starts_with(h)),
            "{} (rotator) is visible to the agent",
            path.display()
        );
    }
    let agent_config: fernetd::config::AgentConfig =
        toml::from_str(&example("agent.toml")).unwrap();
    for path in [&agent_config.tls.key, &agent_config.tls.cert] {
        assert!(
            rotator_hides.iter().any(|h| path.starts_with(h)),
            "{} (agent) is visible to the rotator",
            path.display()
        );
    }
}

#[test]
fn sysusers_and_tmpfiles_make_the_user_and_the_repository_parent() {
    let root = tempfile::tempdir().unwrap();
    let etc = root.path().join("etc");
    std::fs::create_dir(&etc).unwrap();
    for f in ["passwd", "group", "shadow", "gshadow"] {
        std::fs::write(etc.join(f), "").unwrap();
    }
    // The Keystone package's group, which the tmpfiles line names.
    let keystone_group = root.path().join("keystone.sysusers");
    std::fs::write(&keystone_group, "g keystone -\n").unwrap();
    run(Command::new(systemd_tool("systemd-sysusers"))
        .arg(format!("--root={}", root.path().display()))
        .arg(systemd_dir().join("fernetd.sysusers"))
        .arg(&keystone_group));
    run(Command::new(systemd_tool("systemd-tmpfiles"))
        .arg(format!("--root={}", root.path().display()))
        .arg("--create")
        .arg(systemd_dir().join("fernetd.tmpfiles")));
    let id = |file: &str, name: &str, field: usize| -> u32 {
        let text = std::fs::read_to_string(etc.join(file)).unwrap();
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{name}:")))
            .unwrap_or_else(|| panic!("no {name} in {file}"));
        line.split(':').nth(field).unwrap().parse().unwrap()
    };
    let meta = std::fs::metadata(root.path().join("etc/keystone/fernetd")).unwrap();
    assert_eq!(meta.mode() & 0o7777, 0o750);
    assert_eq!(meta.uid(), id("passwd", "fernetd-agent", 2));
    assert_ne!(
        id("passwd", "fernetd-agent", 2),
        id("passwd", "fernetd-rotator", 2),
        "one user per role"
    );
    assert_eq!(meta.gid(), id("group", "keystone", 2));
}
