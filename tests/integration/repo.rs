//! Integration tests for the key repository engine, the atomic installer and
//! `fernetd repo`: parity with real `keystone-manage` and Keystone's own loader,
//! crash consistency under SIGKILL, concurrent readers, and bad input (malformed
//! keys, wrong targets, no permission, a full disk) that must leave every
//! repository byte-for-byte as it was.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use fernetd::install::{self, InstallError};
use fernetd::repository::Stamp;
use fernetd::repository::{self, Key, KeySet};
use sha2::{Digest as _, Sha256};

use super::common;

/// Runs `fernetd repo ARGS...`.
fn fernetd_repo(args: &[&str]) -> Output {
    Command::new(common::fernetd_bin())
        .arg("repo")
        .args(args)
        .env("FERNETD_LOG", "warn")
        .output()
        .expect("run fernetd")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Every entry of a directory: name -> (mode, uid, gid, content); directories
/// recurse one level as "name/child". What "byte-for-byte unchanged" compares.
fn snapshot(dir: &Path) -> BTreeMap<String, (u32, u32, u32, Vec<u8>)> {
    let mut out = BTreeMap::new();
    let m = std::fs::symlink_metadata(dir).expect("stat");
    out.insert(".".into(), (m.mode(), m.uid(), m.gid(), Vec::new()));
    for entry in std::fs::read_dir(dir).expect("list") {
        let entry = entry.expect("entry");
        let name = entry.file_name().to_string_lossy().into_owned();
        let m = std::fs::symlink_metadata(entry.path()).expect("stat");
        let content = if m.is_file() {
            std::fs::read(entry.path()).expect("read")
        } else {
            Vec::new()
        };
        out.insert(name, (m.mode(), m.uid(), m.gid(), content));
    }
    out
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// A short fingerprint of a key, so key material stays out of test output.
fn fingerprint(key: &Key) -> String {
    hex::encode(&Sha256::digest(key.as_bytes())[..8])
}

/// The keys of a repository read by fernetd, in Keystone's order, as fingerprints.
fn fernetd_order(dir: &Path) -> Vec<String> {
    let set = repository::load(dir)
        .unwrap_or_else(|e| panic!("fernetd cannot read {}: {e}", dir.display()));
    set.keystone_order().map(|(_, k)| fingerprint(k)).collect()
}

/// Copies the files of `from` (modes kept) into a new 0700 directory `to`.
fn copy_repo(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    for entry in std::fs::read_dir(from).expect("list") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
    }
}

/// The file names Keystone treats as keys (fernetd's stamp excluded).
fn key_names(dir: &Path) -> Vec<String> {
    names(dir)
        .into_iter()
        .filter(|n| n != fernetd::repository::STAMP_FILE)
        .collect()
}

// Runs keystone-manage's own entry point (`keystone.cmd.cli.main`, what the
// `keystone-manage` script calls) for every rotation in one Python process, then
// has Keystone's `FernetUtils.load_keys` read every snapshot of both sides.
const KEYSTONE_ROTATIONS: &str = r#"
import base64, hashlib, json, os, shutil, sys
from keystone.cmd import cli
from keystone.common import fernet_utils
import keystone.conf
CONF = keystone.conf.CONF
conf, repo, ks_snap, fd_snap, steps, max_keys = sys.argv[1:7]
steps, max_keys = int(steps), int(max_keys)
shutil.copytree(repo, os.path.join(ks_snap, '0'))
for step in range(1, steps + 1):
    CONF.clear()
    cli.main(argv=['keystone-manage', '--config-file', conf, 'token_rotate',
                   '--keystone-user', 'root', '--keystone-group', 'root'])
    shutil.copytree(repo, os.path.join(ks_snap, str(step)))
def order(d):
    keys = fernet_utils.FernetUtils(d, max_keys, 'fernet_tokens').load_keys()
    return [hashlib.sha256(base64.urlsafe_b64decode(k)).hexdigest()[:16] for k in keys]
print(json.dumps({
    'ks': [order(os.path.join(ks_snap, str(s))) for s in range(steps + 1)],
    'fd': [order(os.path.join(fd_snap, str(s))) for s in range(steps + 1)],
}))
"#;

fn keystone_parity(max_keys: usize) {
    const ROTATIONS: usize = 12;
    let tmp = tempfile::tempdir().expect("tempdir");
    let t = tmp.path();
    let max = max_keys.to_string();

    // fernetd: init, then 12 rotations, a snapshot after each step.
    let fd_repo = t.join("fd/keys");
    std::fs::create_dir_all(t.join("fd")).expect("mkdir");
    for step in 0..=ROTATIONS {
        let cmd = if step == 0 { "init" } else { "rotate" };
        let out = fernetd_repo(&[
            cmd,
            "--repository",
            fd_repo.to_str().expect("utf-8"),
            "--max-active-keys",
            &max,
            "--owner",
            "0:0",
        ]);
        assert!(
            out.status.success(),
            "fernetd repo {cmd}: {}",
            text(&out.stderr)
        );
        copy_repo(&fd_repo, &t.join(format!("fd-snap/{step}")));
    }

    // Keystone: the real keystone-manage binary sets up, its code rotates.
    let ks_repo = t.join("ks/keys");
    let conf = t.join("keystone.conf");
    std::fs::write(
        &conf,
        format!(
            "[database]\nconnection = sqlite:///{db}\n[token]\nprovider = fernet\n\
             [fernet_tokens]\nkey_repository = {repo}\nmax_active_keys = {max}\n\
             [fernet_receipts]\nkey_repository = {repo}\n[cache]\nenabled = false\n",
            db = t.join("keystone.db").display(),
            repo = ks_repo.display(),
        ),
    )
    .expect("write keystone.conf");
    let setup = Command::new(common::keystone::keystone_manage())
        .args([
            "--config-file",
            conf.to_str().expect("utf-8"),
            "token_setup",
            "--keystone-user",
            "root",
            "--keystone-group",
            "root",
        ])
        .env("PYTHONWARNINGS", "ignore")
        .output()
        .expect("run keystone-manage");
    assert!(
        setup.status.success(),
        "keystone-manage token_setup: {}",
        text(&setup.stderr)
    );
    let snap = |side: &str| t.join(format!("{side}-snap"));
    let out = common::keystone::run_python(
        KEYSTONE_ROTATIONS,
        &[
            conf.to_str().expect("utf-8"),
            ks_repo.to_str().expect("utf-8"),
            snap("ks").to_str().expect("utf-8"),
            snap("fd").to_str().expect("utf-8"),
            &ROTATIONS.to_string(),
            &max,
        ],
    );
    // keystone-manage logs to standard output; the JSON is the last line.
    let stdout = text(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    let keystone: serde_json::Value = serde_json::from_str(last).expect("python's JSON");

    let mut previous: Option<(Vec<String>, Vec<String>)> = None;
    for step in 0..=ROTATIONS {
        let fd = snap("fd").join(step.to_string());
        let ks = snap("ks").join(step.to_string());
        assert_eq!(
            key_names(&fd),
            key_names(&ks),
            "max_active_keys {max_keys}, step {step}: file names differ"
        );
        for dir in [&fd, &ks] {
            assert_eq!(
                std::fs::metadata(dir).expect("stat").mode() & 0o777,
                0o700,
                "{}",
                dir.display()
            );
            for name in key_names(dir) {
                assert_eq!(
                    std::fs::metadata(dir.join(&name)).expect("stat").mode() & 0o777,
                    0o600,
                    "{name}"
                );
            }
        }
        let fd_order = fernetd_order(&fd);
        let ks_order = fernetd_order(&ks);
        assert_eq!(
            keystone["fd"][step],
            serde_json::json!(fd_order),
            "Keystone reads fernetd's step {step} differently"
        );
        assert_eq!(
            keystone["ks"][step],
            serde_json::json!(ks_order),
            "fernetd reads Keystone's step {step} differently"
        );
        // On both sides the staged key of one step is the primary of the next.
        if let Some((fd_prev, ks_prev)) = &previous {
            assert_eq!(
                fd_order.first(),
                fd_prev.last(),
                "fernetd step {step}: new primary is not the old staged key"
            );
            assert_eq!(
                ks_order.first(),
                ks_prev.last(),
                "Keystone step {step}: new primary is not the old staged key"
            );
        }
        previous = Some((fd_order, ks_order));
    }
    let last = snap("fd").join(ROTATIONS.to_string());
    assert_eq!(key_names(&last).len(), max_keys, "{:?}", key_names(&last));
}

#[test]
fn keystone_manage_parity_max_active_keys_3() {
    keystone_parity(3);
}

#[test]
fn keystone_manage_parity_max_active_keys_5() {
    keystone_parity(5);
}

#[test]
fn keystone_manage_parity_max_active_keys_7() {
    keystone_parity(7);
}

// Keystone's loader and `Fernet(key)` on odd repositories and key files: prints
// the fingerprints `load_keys` returns for the repository, then for each key file
// content whether `Fernet` accepts it.
const KEYSTONE_ODD_INPUT: &str = r#"
import base64, hashlib, json, sys
from cryptography import fernet
from keystone.common import fernet_utils
import keystone.conf
keystone.conf.configure()
keystone.conf.CONF(args=[], project='keystone', default_config_files=[])
repo, contents = sys.argv[1], sys.argv[2]
keys = fernet_utils.FernetUtils(repo, 3, 'fernet_tokens').load_keys()
order = [hashlib.sha256(base64.urlsafe_b64decode(k)).hexdigest()[:16] for k in keys]
accepted = []
for c in json.load(open(contents)):
    try:
        fernet.Fernet(bytes(c).decode('utf-8'))
        accepted.append(True)
    except Exception:
        accepted.append(False)
print(json.dumps({'order': order, 'accepted': accepted}))
"#;

/// fernetd reads odd repositories and key files exactly as Keystone does: file
/// names Python's `int()` accepts (`01`, ` 2`, `+3`, `1_0`), duplicates (`1` and
/// `01`: the later listed wins), empty files, directories, temporary
/// names; key files with newlines, spaces, the standard alphabet, data after the
/// padding, and the malformed ones.
#[test]
fn loader_matches_keystone_on_odd_input() {
    use base64::Engine as _;
    let tmp = tempfile::tempdir().expect("tempdir");
    let repo = tmp.path().join("keys");
    std::fs::create_dir(&repo).expect("mkdir");
    std::fs::set_permissions(&repo, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let key = |n: u8| Key::from_bytes([n; 32]).to_base64().to_string();
    let files: &[(&str, String)] = &[
        ("0", key(1)),
        ("-0", key(2)),
        ("1", key(3)),
        ("01", format!("{}\n", key(4))),
        (" 2", format!(" {}\r\n", key(5))),
        ("+3", key(6)),
        ("1_0", format!("{}trailing", key(7))),
        ("4", String::new()),
        ("0.tmp", "junk".into()),
        (".fernetd-stamp", "{}".into()),
    ];
    for (name, content) in files {
        std::fs::write(repo.join(name), content).expect("write");
    }
    std::fs::create_dir(repo.join("8")).expect("mkdir");

    let std_b64 = base64::engine::general_purpose::STANDARD.encode([0xfb; 32]);
    let url = |n: usize| base64::engine::general_purpose::URL_SAFE.encode(vec![0xfb; n]);
    let contents: Vec<Vec<u8>> = vec![
        url(32).into_bytes(),
        format!("{}\n", url(32)).into_bytes(),
        std_b64.into_bytes(),
        format!("{}=", url(32)).into_bytes(),
        format!("{}AAAA", url(32)).into_bytes(),
        url(32).trim_end_matches('=').as_bytes().to_vec(),
        format!("  {}  ", url(32)).into_bytes(),
        format!("{}!", &url(32)[..20]).into_bytes(),
        url(31).into_bytes(),
        url(33).into_bytes(),
        b"not a key at all".to_vec(),
        format!("{}\u{e9}", &url(32)[..43]).into_bytes(),
        "\n".into(),
        b"=".repeat(44),
    ];
    let contents_file = tmp.path().join("contents.json");
    std::fs::write(&contents_file, serde_json::to_vec(&contents).expect("json")).expect("write");
    let out = common::keystone::run_python(
        KEYSTONE_ODD_INPUT,
        &[
            repo.to_str().expect("utf-8"),
            contents_file.to_str().expect("utf-8"),
        ],
    );
    let stdout = text(&out.stdout);
    let keystone: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or_default()).expect("json");
    assert_eq!(
        keystone["order"],
        serde_json::json!(fernetd_order(&repo)),
        "load order differs"
    );
    let ours: Vec<bool> = contents
        .iter()
        .map(|c| repository::parse_key(c).is_ok())
        .collect();
    assert_eq!(
        keystone["accepted"],
        serde_json::json!(ours),
        "key file acceptance differs"
    );
    let loaded = repository::load(&repo).expect("load");
    assert_eq!(loaded.indices(), vec![0, 1, 2, 3, 10]);

    // Where Keystone would follow a link, fernetd refuses to (issue 11).
    for target in ["+3", "missing", "/etc/shadow"] {
        std::os::unix::fs::symlink(target, repo.join("6")).expect("symlink");
        let refused = repository::load(&repo).expect_err("a link under a key's name");
        assert!(refused.to_string().contains("/6"), "{refused}");
        std::fs::remove_file(repo.join("6")).expect("unlink");
    }
}

/// Two fixed key sets, one rotation apart, and their stamps.
fn set_a() -> KeySet {
    KeySet::from_keys([
        (0, Key::from_bytes([10; 32])),
        (1, Key::from_bytes([11; 32])),
        (2, Key::from_bytes([12; 32])),
    ])
}

fn set_b() -> KeySet {
    KeySet::from_keys([
        (0, Key::from_bytes([20; 32])),
        (2, Key::from_bytes([12; 32])),
        (3, Key::from_bytes([10; 32])),
    ])
}

fn stamp_for(set: &KeySet) -> Stamp {
    Stamp {
        generation: if *set == set_a() { 1 } else { 2 },
        digest: set.digest(),
        promoted: Default::default(),
        agent: false,
    }
}

/// A temporary directory with a repository `keys` holding set A.
fn repo_holding_a() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let target = tmp.path().join("keys");
    install::install(&target, &set_a(), Some(&stamp_for(&set_a())), None).expect("first install");
    (tmp, target)
}

const LOOP_TARGET_ENV: &str = "FERNETD_TEST_INSTALL_LOOP_TARGET";

/// Not a test: the process `crash_consistency_under_sigkill` starts and kills.
/// It installs set A and set B in turn, forever.
#[test]
#[ignore = "helper process for crash_consistency_under_sigkill"]
fn install_loop_child() {
    let target = PathBuf::from(
        std::env::var_os(LOOP_TARGET_ENV).expect("run by crash_consistency_under_sigkill"),
    );
    let (a, b) = (set_a(), set_b());
    loop {
        let next = if repository::load(&target).ok().as_ref() == Some(&a) {
            &b
        } else {
            &a
        };
        install::install(&target, next, Some(&stamp_for(next)), None).expect("install");
    }
}

#[test]
fn crash_consistency_under_sigkill() {
    const KILLS: usize = 220;
    let (tmp, target) = repo_holding_a();
    let (a, b) = (set_a(), set_b());
    let exe = std::env::current_exe().expect("test binary");
    let (mut seen_a, mut seen_b, mut interrupted) = (0, 0, 0);
    let started = Instant::now();
    for kill in 0..KILLS {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "repo::install_loop_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(LOOP_TARGET_ENV, &target)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the install loop");
        std::thread::sleep(Duration::from_micros(rand::random_range(2_000..40_000)));
        assert!(
            child.try_wait().expect("poll child").is_none(),
            "the install loop died on its own (kill {kill})"
        );
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");

        let on_disk = repository::load(&target)
            .unwrap_or_else(|e| panic!("kill {kill}: repository unreadable: {e}"));
        if on_disk == a {
            seen_a += 1;
        } else if on_disk == b {
            seen_b += 1;
        } else {
            panic!("kill {kill}: neither the old nor the new set: {on_disk:?}");
        }
        assert_eq!(
            fernetd::repository::read_stamp(&target).expect("stamp"),
            Some(stamp_for(&on_disk)),
            "kill {kill}: keys and stamp disagree"
        );
        assert_eq!(
            std::fs::metadata(&target).expect("stat").mode() & 0o777,
            0o700
        );
        let removed = install::clean_leftovers(&target).expect("clean");
        interrupted += usize::from(removed > 0);
        assert_eq!(
            names(tmp.path()),
            vec!["keys"],
            "kill {kill}: leftovers after cleaning"
        );
    }
    eprintln!(
        "{KILLS} SIGKILLs in {:.1} s: old/new set A {seen_a} times, B {seen_b} times; {interrupted} kills left an install half-done",
        started.elapsed().as_secs_f64()
    );
    assert!(
        seen_a > 0 && seen_b > 0,
        "the loop never completed installs both ways"
    );
    assert!(
        interrupted > KILLS / 10,
        "too few kills landed inside an install ({interrupted})"
    );
    let check = common::keystone::run_python(
        "import sys\nfrom keystone.common import fernet_utils\nprint(len(fernet_utils.FernetUtils(sys.argv[1], 3, 'fernet_tokens').load_keys()))",
        &[target.to_str().expect("utf-8")],
    );
    assert_eq!(
        text(&check.stdout).trim(),
        "3",
        "Keystone reads the final repository"
    );
}

/// How a concurrent reader saw the repository.
#[derive(Debug, Default)]
struct Seen {
    a: u64,
    b: u64,
    other: Vec<String>,
}

#[test]
fn concurrent_reader_never_sees_a_mixed_set() {
    const INSTALLS: usize = 400;
    let (_tmp, target) = repo_holding_a();
    let (a, b) = (set_a(), set_b());
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let (target, done, a, b) = (target.clone(), done.clone(), a.clone(), b.clone());
        std::thread::spawn(move || {
            let mut seen = Seen::default();
            while !done.load(Ordering::Relaxed) {
                match repository::load(&target) {
                    Ok(s) if s == a => seen.a += 1,
                    Ok(s) if s == b => seen.b += 1,
                    Ok(s) => seen.other.push(format!("{:?}", s.indices())),
                    Err(e) => seen.other.push(e.to_string()),
                }
            }
            seen
        })
    };
    for i in 0..INSTALLS {
        let next = if i % 2 == 0 { &b } else { &a };
        install::install(&target, next, Some(&stamp_for(next)), None).expect("install");
    }
    done.store(true, Ordering::Relaxed);
    let seen = reader.join().expect("reader");
    eprintln!(
        "reader: {} reads of A, {} of B, {} others",
        seen.a,
        seen.b,
        seen.other.len()
    );
    assert!(seen.a > 0 && seen.b > 0, "{seen:?}");
    assert!(
        seen.other.is_empty(),
        "{} mixed or failed reads, e.g. {:?}",
        seen.other.len(),
        &seen.other[..seen.other.len().min(5)]
    );
}

// Keystone's own loader in a tight loop until a stop file appears; it reports how
// often it saw each ordered list of key fingerprints.
const KEYSTONE_READER: &str = r#"
import base64, collections, hashlib, json, os, sys
from keystone.common import fernet_utils
import keystone.conf
keystone.conf.configure()
keystone.conf.CONF(args=[], project='keystone', default_config_files=[])
target, stop = sys.argv[1], sys.argv[2]
futils = fernet_utils.FernetUtils(target, 3, 'fernet_tokens')
seen = collections.Counter()
print('ready', flush=True)
while not os.path.exists(stop):
    try:
        keys = futils.load_keys()
        seen[json.dumps([hashlib.sha256(base64.urlsafe_b64decode(k)).hexdigest()[:16] for k in keys])] += 1
    except Exception as e:
        seen['error: ' + type(e).__name__] += 1
print(json.dumps(seen))
"#;

/// Keystone lists the repository by path and then opens each file by path, so a
/// swap that falls between the two can show it the new files under the old
/// listing, or a file that vanished between listing and open. No writer can
/// prevent that for a reader built this way (`keystone-manage` rotating in place
/// has the same windows, and more). An empty listing (the old copy removed
/// between its `opendir` and `readdir`) the installer does prevent, by removing
/// the old copy only after `install::RETIRE_GRACE`. This measures how often each
/// happens to a reader in a tight loop and checks what it never sees: an empty
/// listing, a torn key, a key of neither set, or an anomaly outside a read that
/// raced a swap.
#[test]
fn keystone_loader_during_installs_sees_only_whole_keys() {
    use std::io::BufRead as _;
    const INSTALLS: usize = 150;
    let (tmp, target) = repo_holding_a();
    let stop = tmp.path().join("stop");
    let (a, b) = (set_a(), set_b());
    let mut reader = Command::new(common::keystone::python())
        .args(["-c", KEYSTONE_READER])
        .args([&target, &stop])
        .env("PYTHONWARNINGS", "ignore")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start python");
    let mut stdout = std::io::BufReader::new(reader.stdout.take().expect("stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("read");
    assert_eq!(line.trim(), "ready");
    for i in 0..INSTALLS {
        let next = if i % 2 == 0 { &b } else { &a };
        install::install(&target, next, Some(&stamp_for(next)), None).expect("install");
    }
    std::fs::write(&stop, b"").expect("stop");
    line.clear();
    stdout.read_line(&mut line).expect("read");
    assert!(reader.wait().expect("wait").success());
    let seen: BTreeMap<String, u64> = serde_json::from_str(&line).expect("json");
    let order = |s: &KeySet| {
        s.keystone_order()
            .map(|(_, k)| fingerprint(k))
            .collect::<Vec<_>>()
    };
    let whole: std::collections::HashSet<String> = a
        .iter()
        .chain(b.iter())
        .map(|(_, k)| fingerprint(k))
        .collect();
    let (mut exact, mut mixed, mut vanished, mut empty) = (0, 0, 0, 0);
    let (mut saw_a, mut saw_b) = (false, false);
    for (view, count) in &seen {
        let Ok(keys) = serde_json::from_str::<Vec<String>>(view) else {
            assert_eq!(
                view, "error: FileNotFoundError",
                "Keystone failed otherwise"
            );
            vanished += count;
            continue;
        };
        if keys == order(&a) || keys == order(&b) {
            saw_a |= keys == order(&a);
            saw_b |= keys == order(&b);
            exact += count;
        } else if keys.is_empty() {
            empty += count;
        } else {
            assert!(
                keys.iter().all(|k| whole.contains(k)),
                "Keystone saw a key of neither set: {view}"
            );
            mixed += count;
        }
    }
    eprintln!(
        "Keystone's loader during {INSTALLS} installs: {exact} whole sets, {mixed} old listings with new files, \
         {vanished} files gone between listing and open, {empty} empty listings"
    );
    // One reader has at most one read in flight at each swap.
    assert!(mixed + vanished <= INSTALLS as u64, "{seen:?}");
    assert_eq!(empty, 0, "Keystone listed an empty repository: {seen:?}");
    assert!(saw_a && saw_b, "{seen:?}");
}

/// A repository made by `fernetd repo init` and one rotation.
fn made_repo(parent: &Path) -> PathBuf {
    let dir = parent.join("keys");
    let d = dir.to_str().expect("utf-8");
    assert!(fernetd_repo(&["init", "--repository", d]).status.success());
    assert!(
        fernetd_repo(&["rotate", "--repository", d])
            .status
            .success()
    );
    dir
}

#[test]
fn malformed_keys_are_refused_and_nothing_changes() {
    use base64::Engine as _;
    let b64 = |n: usize| base64::engine::general_purpose::URL_SAFE.encode(vec![7u8; n]);
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = made_repo(tmp.path());
    let d = dir.to_str().expect("utf-8");
    let cases: [(&str, Vec<u8>, &str); 4] = [
        (
            "non-base64",
            b"this is not a fernet key!!!!!!!!!!!!!!!!!!!".to_vec(),
            "not url-safe base64",
        ),
        (
            "31 bytes",
            b64(31).into_bytes(),
            "does not decode to 32 bytes",
        ),
        (
            "33 bytes",
            b64(33).into_bytes(),
            "does not decode to 32 bytes",
        ),
        (
            "truncated",
            b64(32).as_bytes()[..30].to_vec(),
            "not url-safe base64",
        ),
    ];
    for (what, content, reason) in cases {
        std::fs::write(dir.join("1"), &content).expect("write the bad key");
        let before = snapshot(&dir);
        let out = fernetd_repo(&["rotate", "--repository", d]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{what}: {stderr}");
        assert!(
            stderr.contains(&format!("{d}/1")) && stderr.contains(reason),
            "{what}: {stderr}"
        );
        assert_eq!(snapshot(&dir), before, "{what}: repository changed");
        assert_eq!(names(tmp.path()), vec!["keys"], "{what}: leftovers");
        let verify = fernetd_repo(&["verify", "--repository", d]);
        let stdout = text(&verify.stdout);
        assert_eq!(verify.status.code(), Some(1), "{what}: {stdout}");
        assert!(
            stdout.contains("1: not a valid Fernet key") && stdout.contains(reason),
            "{what}: {stdout}"
        );
        std::fs::remove_file(dir.join("1")).expect("remove");
    }
}

#[test]
fn a_set_without_staged_key_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = made_repo(tmp.path());
    let d = dir.to_str().expect("utf-8");
    let before = snapshot(&dir);
    let no_staged = KeySet::from_keys([(1, Key::generate()), (2, Key::generate())]);
    match install::install(&dir, &no_staged, None, None) {
        Err(e @ InstallError::Refused { .. }) => assert!(
            e.to_string().contains("staged key 0") || format!("{:?}", e).contains("NoStagedKey")
        ),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(matches!(
        install::install(&dir, &KeySet::new(), None, None),
        Err(InstallError::Refused { .. })
    ));
    assert_eq!(snapshot(&dir), before);
    assert_eq!(names(tmp.path()), vec!["keys"]);

    std::fs::remove_file(dir.join("0")).expect("remove the staged key");
    let before = snapshot(&dir);
    let out = fernetd_repo(&["rotate", "--repository", d]);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        text(&out.stderr).contains("no staged key 0"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(snapshot(&dir), before);
    let verify = fernetd_repo(&["verify", "--repository", d, "--json"]);
    assert_eq!(verify.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&verify.stdout).expect("json");
    assert!(
        report["problems"]
            .as_array()
            .expect("problems")
            .iter()
            .any(|p| p["code"] == "missing_staged_key"),
        "{report}"
    );
}

#[test]
fn a_target_that_is_a_file_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = tmp.path().join("keys");
    std::fs::write(&file, b"operator notes").expect("write");
    let f = file.to_str().expect("utf-8");
    for cmd in ["init", "rotate"] {
        let out = fernetd_repo(&[cmd, "--repository", f]);
        assert_eq!(out.status.code(), Some(3), "{cmd}");
        assert!(
            text(&out.stderr).contains(f),
            "{cmd}: {}",
            text(&out.stderr)
        );
    }
    match install::install(&file, &set_a(), None, None) {
        Err(e @ InstallError::NotADirectory { .. }) => {
            assert!(e.to_string().contains("not a directory"))
        }
        other => panic!("expected NotADirectory, got {other:?}"),
    }
    assert_eq!(std::fs::read(&file).expect("read"), b"operator notes");
    assert_eq!(names(tmp.path()), vec!["keys"]);
}

#[test]
fn a_directory_without_write_permission_is_left_alone() {
    // Root ignores permissions, so the command runs as nobody: it may read the
    // repository (its owner) but not write next to it.
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let dir = made_repo(tmp.path());
    let d = dir.to_str().expect("utf-8");
    let chown = Command::new("chown")
        .args(["-R", "65534:65534", d])
        .status()
        .expect("chown");
    assert!(chown.success());
    let before = snapshot(&dir);
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(common::fernetd_bin())
        .args(["repo", "rotate", "--repository", d])
        .output()
        .expect("run setpriv");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("Permission denied") && stderr.contains(&tmp.path().display().to_string()),
        "{stderr}"
    );
    assert_eq!(snapshot(&dir), before);
    assert_eq!(names(tmp.path()), vec!["keys"]);
}

/// A mount made for a test, unmounted on drop.
struct Mount(PathBuf);

impl Mount {
    fn run(args: &[&str], at: &Path) -> Mount {
        let mounted = Command::new("mount")
            .args(args)
            .arg(at)
            .status()
            .expect("run mount");
        assert!(mounted.success(), "mount {args:?} needs root");
        Mount(at.to_path_buf())
    }

    /// A tmpfs of `size` (mount's syntax) on the existing directory `at`.
    fn tmpfs(at: &Path, size: &str) -> Mount {
        Mount::run(
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "fernetd-test",
            ],
            at,
        )
    }

    /// `at` bind-mounted on itself: the same filesystem, but a mount point.
    fn bind_onto_itself(at: &Path) -> Mount {
        Mount::run(&["--bind", at.to_str().expect("utf-8")], at)
    }

    fn remount(&self, options: &str) {
        let ok = Command::new("mount")
            .args(["-o", options])
            .arg(&self.0)
            .status()
            .expect("run mount");
        assert!(ok.success(), "remount {options}");
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A repository that is a mount point (a container volume) under a read-only
/// parent cannot be swapped; it is updated in place, with a warning.
#[test]
fn a_mounted_repository_under_a_read_only_parent_is_updated_in_place() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let parent = tmp.path().join("etc");
    std::fs::create_dir(&parent).expect("mkdir");
    let parent_fs = Mount::tmpfs(&parent, "64k");
    let repo = parent.join("keys");
    std::fs::create_dir(&repo).expect("mkdir");
    let repo_fs = Mount::tmpfs(&repo, "64k");
    parent_fs.remount("remount,ro");
    let d = repo.to_str().expect("utf-8");
    let mut sets = Vec::new();
    for cmd in ["init", "rotate", "rotate", "rotate"] {
        let out = Command::new(common::fernetd_bin())
            .args(["repo", cmd, "--repository", d, "--json"])
            .output()
            .expect("run fernetd");
        assert!(out.status.success(), "{cmd}: {}", text(&out.stderr));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        assert_eq!(report["method"], "in_place", "{report}");
        assert!(
            text(&out.stderr).contains("updating the repository in place"),
            "{}",
            text(&out.stderr)
        );
        let on_disk = repository::load(&repo).expect("load");
        assert_eq!(report["digest"], on_disk.digest().to_hex());
        sets.push(on_disk);
    }
    assert_eq!(key_names(&repo), vec!["0", "3", "4"]);
    assert_eq!(
        std::fs::metadata(&repo).expect("stat").mode() & 0o777,
        0o700
    );
    assert_eq!(
        fernetd::repository::read_stamp(&repo)
            .expect("stamp")
            .map(|s| s.generation),
        Some(4)
    );
    // The staged key of each step became the primary of the next.
    for pair in sets.windows(2) {
        assert_eq!(pair[1].primary(), pair[0].staged());
    }
    drop(repo_fs);
    drop(parent_fs);
}

/// A bind mount is on the same filesystem as its parent, so the installer tries
/// the exchange; the kernel refuses to move a mount point and it falls back.
#[test]
fn a_bind_mounted_repository_falls_back_in_place() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let repo = made_repo(tmp.path());
    let before = repository::load(&repo).expect("load");
    let bind = Mount::bind_onto_itself(&repo);
    let out = fernetd_repo(&[
        "rotate",
        "--repository",
        repo.to_str().expect("utf-8"),
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(report["method"], "in_place", "{report}");
    let after = repository::load(&repo).expect("load");
    assert_eq!(after.primary(), before.staged());
    assert_eq!(key_names(&repo), vec!["0", "2", "3"]);
    assert_eq!(
        names(tmp.path()),
        vec!["keys"],
        "leftovers next to the repository"
    );
    drop(bind);
}

#[test]
fn a_full_disk_is_a_clear_error_and_nothing_changes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).expect("mkdir");
    let fs = Mount::tmpfs(&mnt, "64k");
    let dir = made_repo(&fs.0);
    let d = dir.to_str().expect("utf-8");
    // Fill the filesystem to the last page.
    {
        use std::io::Write as _;
        let mut filler = std::fs::File::create(mnt.join("filler")).expect("filler");
        while filler.write_all(&[0u8; 4096]).is_ok() {}
    }
    let before = snapshot(&dir);
    let out = fernetd_repo(&["rotate", "--repository", d]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("No space left on device"), "{stderr}");
    assert_eq!(snapshot(&dir), before);
    assert_eq!(names(&mnt), vec!["filler", "keys"]);
    // With room again, the same command works.
    std::fs::remove_file(mnt.join("filler")).expect("remove filler");
    assert!(
        fernetd_repo(&["rotate", "--repository", d])
            .status
            .success()
    );
    assert_eq!(key_names(&dir), vec!["0", "2", "3"]);
    drop(fs);
}

#[test]
fn show_names_roles_and_never_prints_keys() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = made_repo(tmp.path());
    let d = dir.to_str().expect("utf-8");
    let set = repository::load(&dir).expect("load");
    let out = fernetd_repo(&["show", "--repository", d, "--json"]);
    assert!(out.status.success());
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(shown["digest"], set.digest().to_hex());
    assert_eq!(shown["generation"], 2);
    assert_eq!(
        shown["keys"],
        serde_json::json!([{"index": 2, "role": "primary"}, {"index": 1, "role": "secondary"}, {"index": 0, "role": "staged"}])
    );
    let plain = fernetd_repo(&["show", "--repository", d]);
    for (_, key) in set.iter() {
        let b64 = key.to_base64();
        for output in [&out.stdout, &plain.stdout, &plain.stderr] {
            assert!(!text(output).contains(b64.as_str()), "a key was printed");
        }
    }
    let verify = fernetd_repo(&["verify", "--repository", d]);
    assert_eq!(verify.status.code(), Some(0), "{}", text(&verify.stdout));
    // The files are root's: verifying against another owner names every one.
    let verify = fernetd_repo(&[
        "verify",
        "--repository",
        d,
        "--owner",
        "65534:65534",
        "--json",
    ]);
    assert_eq!(verify.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&verify.stdout).expect("json");
    let owners: Vec<String> = report["problems"]
        .as_array()
        .expect("problems")
        .iter()
        .filter(|p| p["code"] == "owner")
        .map(|p| p["message"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(owners.len(), 4, "the directory and three keys: {owners:?}");
    assert!(
        owners
            .iter()
            .all(|m| m.contains("owned by 0:0, want 65534:65534")),
        "{owners:?}"
    );
}
