//! Recovery without HA, and sealing of the rotator's state: a rotator whose
//! state directory was lost refuses to start afresh while its agents hold
//! generations, and says how to import; importing a region's repository
//! continues at the generation of its stamp, so no agent re-installs anything,
//! every agent accepts the next rotation and no token is invalidated. With
//! `seal_key`, the state directory holds no key in the clear.

use std::collections::BTreeSet;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use base64::Engine as _;

use crate::rotator::{Cluster, agent_identity, assert_no_keys_in_logs, key_forms};

/// Copies a repository, stamp included, as an operator would with `cp -a`.
fn copy_repository(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("copy directory");
    for entry in std::fs::read_dir(from).expect("read repository") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy file");
    }
}

fn stamp_of(repo: &Path) -> fernetd::repository::Stamp {
    fernetd::repository::read_stamp(repo)
        .expect("stamp readable")
        .expect("a stamp")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_state_directory_is_recovered_by_importing_a_region_at_its_generation() {
    let mut cluster =
        Cluster::start(&["RegionOne", "RegionTwo", "RegionThree"], agent_identity).await;
    cluster.converged("initial distribution").await;
    let mut keys = BTreeSet::new();
    for _ in 0..3 {
        cluster.rotate_ok();
    }
    let (code, status) = cluster.status();
    assert_eq!(code, 0, "{status:#}");
    let generation = status["repositories"][0]["generation"]
        .as_u64()
        .expect("generation");
    let digest = status["repositories"][0]["digest"]
        .as_str()
        .expect("digest")
        .to_owned();
    assert_eq!(generation, 4);
    let sets = cluster.all_hold(&digest, "before the loss", &mut keys);
    // Tokens signed with the primary and with the previous primary before the
    // loss: both are still in every set after one more rotation.
    let indices = sets[0].indices();
    let tokens = [
        fernetd::token::canary(sets[0].primary().expect("primary")),
        fernetd::token::canary(
            sets[0]
                .get(indices[indices.len() - 2])
                .expect("previous primary"),
        ),
    ];
    let installed: Vec<(u64, u64)> = (0..cluster.agents.len())
        .map(|i| {
            let meta = std::fs::metadata(&cluster.agents[i].repo).expect("repository");
            (meta.ino(), meta.mtime_nsec() as u64)
        })
        .collect();

    // The host is lost: the rotator dies and its state directory goes.
    cluster.rotator().kill();
    let config = cluster.rotator_config();
    std::fs::remove_dir_all(&config.state_dir).expect("remove the state directory");

    // A fresh start is refused while the agents hold generation 4.
    let stderr = cluster.refused_start();
    for needle in [
        "RegionOne at generation 4",
        "RegionThree at generation 4",
        "import",
        "--fresh-start",
    ] {
        assert!(stderr.contains(needle), "{needle}: {stderr}");
    }
    assert!(
        !config.state_dir.exists(),
        "the refused start wrote no state"
    );

    // Recovery: a copy of RegionTwo's repository, stamp included.
    let copy = cluster.dir.path().join("regiontwo-copy");
    copy_repository(&cluster.agents[1].repo, &copy);
    let mut recovered = config.clone();
    recovered.repositories[0].import = Some(copy.clone());
    cluster.write_rotator_config(&recovered);
    cluster.start_rotator().await;
    let status = cluster
        .converged("the imported generation everywhere")
        .await;
    let repo = &status["repositories"][0];
    assert_eq!(repo["generation"].as_u64(), Some(generation), "{status:#}");
    assert_eq!(repo["digest"].as_str(), Some(digest.as_str()), "{status:#}");
    // No agent re-installed anything: each repository is the same directory,
    // untouched, with the same stamp.
    for (i, before) in installed.iter().enumerate() {
        let meta = std::fs::metadata(&cluster.agents[i].repo).expect("repository");
        assert_eq!(
            (meta.ino(), meta.mtime_nsec() as u64),
            *before,
            "{} re-installed",
            cluster.agents[i].region
        );
        assert_eq!(stamp_of(&cluster.agents[i].repo).generation, generation);
    }

    // Every agent accepts the next rotation, and the old tokens stay valid.
    let (next, next_digest) = cluster.rotate_ok();
    assert_eq!(next, generation + 1);
    for set in cluster.all_hold(&next_digest, "after recovery", &mut keys) {
        let ring = fernetd::token::Keyring::new(&set);
        for token in &tokens {
            assert!(ring.decrypt(token).is_ok(), "a token was invalidated");
        }
    }
    for i in 0..cluster.agents.len() {
        assert_eq!(stamp_of(&cluster.agents[i].repo).generation, next);
    }
    assert_no_keys_in_logs(&cluster.logs, &keys);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_start_is_allowed_only_when_asked_for() {
    let mut cluster = Cluster::start(&["RegionOne"], agent_identity).await;
    cluster.converged("initial distribution").await;
    cluster.rotate_ok();
    cluster.rotator().kill();
    let config = cluster.rotator_config();
    std::fs::remove_dir_all(&config.state_dir).expect("remove the state directory");
    assert!(
        cluster
            .refused_start()
            .contains("RegionOne at generation 2")
    );
    // Told explicitly, it starts at generation 1, and the agent refuses it as
    // a rollback: the second line of defence holds, visibly.
    let mut daemon = crate::common::daemon::Daemon::spawn(
        "recovery-fresh-rotator",
        [
            "rotator",
            "--fresh-start",
            "--config",
            cluster.rotator_config.to_str().expect("utf-8"),
        ],
    );
    cluster.logs.push(daemon.log_path().to_path_buf());
    let tls = crate::common::pki::client_tls(
        cluster.ca.cert_pem(),
        Some(&cluster.admin_leaf),
        crate::rotator::ROTATOR_ID,
    );
    daemon
        .wait_healthy(cluster.rotator_addr, tls, "fernetd.v1.Admin")
        .await;
    // Status answers 1 (not every region holds the generation) and shows it.
    let (_, status) = cluster.status();
    assert_eq!(
        status["repositories"][0]["generation"].as_u64(),
        Some(1),
        "{status:#}"
    );
    assert_eq!(status["agents"][0]["digest_match"], false, "{status:#}");
    assert_eq!(stamp_of(&cluster.agents[0].repo).generation, 2);
    let mut keys = BTreeSet::new();
    key_forms(&cluster.repo_state(0), &mut keys);
    daemon.stop().await;
    assert_no_keys_in_logs(&cluster.logs, &keys);
}

fn write_seal_key(dir: &Path, mode: u32) -> (PathBuf, String) {
    let text = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>());
    let path = dir.join("seal.key");
    std::fs::write(&path, format!("{text}\n")).expect("write seal key");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    (path, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_seal_key_the_state_directory_holds_no_key_in_the_clear() {
    let cluster = Cluster::configure(&["RegionOne", "RegionTwo"], agent_identity, None);
    let mut config = cluster.rotator_config();
    // Readable by others: refused before anything is written.
    let (path, _) = write_seal_key(cluster.dir.path(), 0o644);
    config.seal_key = Some(path.clone());
    cluster.write_rotator_config(&config);
    let stderr = cluster.refused_start();
    assert!(stderr.contains("mode 0600"), "{stderr}");
    assert!(!config.state_dir.exists());
    let (_, seal_text) = write_seal_key(cluster.dir.path(), 0o600);
    let mut cluster = cluster.launch().await;
    cluster.converged("initial distribution").await;
    let state = config.state_dir.join("tokens.state");
    let first = std::fs::read(&state).expect("state file");
    let mut keys = BTreeSet::new();
    let (g, digest) = cluster.rotate_ok();
    cluster.all_hold(&digest, "sealed", &mut keys);
    let on_disk = std::fs::read_to_string(&state).expect("state file");
    assert!(
        on_disk.starts_with(&format!(
            "fernetd-rotator-state 2 sealed\ngeneration {g}\ndigest {digest}\n"
        )),
        "{on_disk}"
    );
    for entry in std::fs::read_dir(&config.state_dir).expect("state directory") {
        let text = std::fs::read(entry.expect("entry").path()).expect("read");
        let text = String::from_utf8_lossy(&text);
        for key in &keys {
            assert!(
                !text.contains(key.as_str()),
                "a key in the clear in the state"
            );
        }
    }
    // A restart reads the sealed state back.
    cluster.rotator().stop().await;
    cluster.start_rotator().await;
    let status = cluster.converged("after the restart").await;
    assert_eq!(status["repositories"][0]["generation"].as_u64(), Some(g));
    cluster.rotator().stop().await;
    let sealed = std::fs::read(&state).expect("state file");
    // The probe of issue 31: a clear state edited to generation 1000, with
    // keys an attacker knows, dropped into the sealed rotator's state_dir.
    let held = cluster.repo_state(0);
    let mut clear = format!(
        "fernetd-rotator-state 1\nrepository tokens\ngeneration 1000\ndigest {}\n",
        held.digest()
    );
    for (index, key) in held.iter() {
        clear.push_str(&format!("key {index} {}\n", key.to_base64().as_str()));
    }
    std::fs::write(&state, &clear).expect("drop a clear state");
    let stderr = cluster.refused_start();
    assert!(
        stderr.contains("is in the clear") && stderr.contains("--adopt-clear-state"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(&state).expect("state file"),
        clear,
        "a refused state was rewritten"
    );
    // An older sealed state (generation 1, valid on its own) replayed: below
    // what the agents acknowledged.
    std::fs::write(&state, &first).expect("replay an older sealed state");
    let stderr = cluster.refused_start();
    assert!(
        stderr.contains("holds generation 1,") && stderr.contains(&format!("below generation {g}")),
        "{stderr}"
    );
    std::fs::write(&state, &sealed).expect("put the real state back");
    cluster.start_rotator().await;
    let status = cluster.converged("the real state back").await;
    assert_eq!(status["repositories"][0]["generation"].as_u64(), Some(g));
    keys.insert(seal_text);
    assert_no_keys_in_logs(&cluster.logs, &keys);
}
