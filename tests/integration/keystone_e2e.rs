//! The multi-region proof against real Keystone 30.0.0: regional Keystones under
//! gunicorn (the `keystone/` bundle) sharing one identity database, each reading
//! its own key repository; tokens issued in one region validated in the others.
//! The contrast shows what the test catches: a repository copied naively two
//! rotations ahead makes Keystone answer 404 "Could not recognize Fernet token".

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use fernetd::policy::{KeystoneConf, PolicyError};

use crate::common::fernetd_bin;
use crate::common::keystone::{self, Regions, Response, TestPolicy};

const NOT_RECOGNIZED: &str = "Could not recognize Fernet token";

/// Runs `fernetd repo ARGS... --repository DIR`, panicking on failure.
fn fernetd_repo(dir: &Path, args: &[&str]) {
    let out = Command::new(fernetd_bin())
        .arg("repo")
        .args(args)
        .arg("--repository")
        .arg(dir)
        .output()
        .expect("run fernetd repo");
    assert!(
        out.status.success(),
        "fernetd repo {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What today's tools do: copy every key file over the target in place and
/// delete the ones the source lacks (`rsync --delete`), with no generation check.
fn copy_naively(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    let names = |dir: &Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.parse::<u32>().is_ok())
            .collect()
    };
    let wanted = names(from);
    for name in &wanted {
        std::fs::copy(from.join(name), to.join(name)).unwrap();
    }
    for name in names(to) {
        if !wanted.contains(&name) {
            std::fs::remove_file(to.join(name)).unwrap();
        }
    }
}

/// A token issued at region `from`, validated at every other region, each with a
/// caller token of its own (as a service's auth middleware would): the answers.
fn cross_check(regions: &Regions, from: usize) -> Vec<(usize, Response)> {
    let token = regions.keystones[from]
        .issue(Some("admin"))
        .expect("issue a token");
    (0..regions.keystones.len())
        .filter(|&at| at != from)
        .map(|at| {
            let ks = &regions.keystones[at];
            let caller = ks.issue(None).expect("issue a caller token");
            (at, ks.validate(&caller, &token).expect("validate request"))
        })
        .collect()
}

#[test]
fn naive_copy_two_rotations_ahead_is_rejected_by_keystone() {
    let tmp = tempfile::tempdir().unwrap();
    let canonical = tmp.path().join("canonical");
    fernetd_repo(&canonical, &["init", "--max-active-keys", "3"]);
    let repos: Vec<PathBuf> = (0..3)
        .map(|i| tmp.path().join(format!("region-{i}")))
        .collect();
    for repo in &repos {
        copy_naively(&canonical, repo);
    }
    let policy = TestPolicy {
        expiration: 600,
        allow_expired_window: 0,
        max_active_keys: 3,
    };
    let regions = Regions::start(tmp.path(), &repos, policy, 1);

    for from in 0..3 {
        for (at, r) in cross_check(&regions, from) {
            assert_eq!(
                r.status, 200,
                "same keys: region {from} -> {at}: {}",
                r.body
            );
        }
    }
    // One rotation ahead: its new primary is the staged key the others hold.
    fernetd_repo(&canonical, &["rotate", "--max-active-keys", "3"]);
    copy_naively(&canonical, &repos[0]);
    for (at, r) in cross_check(&regions, 0) {
        assert_eq!(
            r.status, 200,
            "one rotation ahead: region 0 -> {at}: {}",
            r.body
        );
    }
    // Two rotations ahead: region 0 encrypts with a key no other region has seen.
    fernetd_repo(&canonical, &["rotate", "--max-active-keys", "3"]);
    copy_naively(&canonical, &repos[0]);
    let answers = cross_check(&regions, 0);
    for (at, r) in &answers {
        assert_eq!(
            r.status, 404,
            "two rotations ahead: region 0 -> {at}: {}",
            r.body
        );
        assert!(r.body.contains(NOT_RECOGNIZED), "region {at}: {}", r.body);
    }
    println!(
        "contrast: a repository copied two rotations ahead to region 0: {} of {} validations elsewhere answered 404 {NOT_RECOGNIZED:?}",
        answers.len(),
        answers.len()
    );
}

/// The template as shipped renders to a keystone.conf whose policy fernetd reads
/// and accepts for the schedule it documents (daily), and rejects for hourly.
#[test]
fn template_defaults_satisfy_the_documented_policy() {
    let tmp = tempfile::tempdir().unwrap();
    let conf = tmp.path().join("keystone.conf");
    keystone::render_conf(
        &conf,
        &[(
            "DATABASE_CONNECTION",
            "mysql+pymysql://keystone:secret@db/keystone",
        )],
        "",
    );
    let kc = KeystoneConf::load(&conf).unwrap();
    assert_eq!(kc.token_provider, "fernet");
    assert_eq!(kc.policy.max_active_keys, 5);
    assert_eq!(kc.token_cache_ttl, Some(Duration::from_secs(300)));
    assert_eq!(kc.token_key_repository, kc.receipt_key_repository);
    let day = Duration::from_secs(86_400);
    kc.policy.check(day).unwrap();
    kc.check_cache(kc.policy.max_active_keys, day).unwrap();
    let hourly = kc.policy.check(Duration::from_secs(3600)).unwrap_err();
    assert!(
        matches!(hourly, PolicyError::TooFewKeys { minimum: 51, .. }),
        "{hourly}"
    );
}
