//! Quarantine (`[fanout] quarantine_after`) with real processes: five regions
//! on a 3-second schedule, one of them away (SIGSTOPped, or cut off by the
//! fault proxy) for more rotations than `max_active_keys`. With quarantine on,
//! the others keep rotating; a token of any reachable region validates in every
//! reachable region throughout, and a token the away region signed with its
//! last primary before the outage validates everywhere; on return it converges
//! and leaves quarantine; `admin evict` lets its pinned key be purged. With
//! quarantine off, the strict rule holds every rotation. Tokens are made with
//! the keys on disk by the project's token code.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use rustix::process::Signal;
use serde_json::Value;

use crate::common::daemon::poll_until;
use crate::common::proxy::{Fault, Proxy};
use crate::rotator::{Cluster, MAX_ACTIVE_KEYS, agent_identity, assert_no_keys_in_logs, key_forms};
use fernetd::repository::KeySet;
use fernetd::token::Keyring;

use crate::chaos::REGIONS;

/// The region that goes away (RegionFive).
const AWAY: usize = 4;
const INTERVAL: Duration = Duration::from_secs(3);
const QUARANTINE_AFTER: Duration = Duration::from_secs(4);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Cut {
    /// SIGSTOP: the agent's kernel still accepts connections.
    Stop,
    /// A partition that loses packets (the proxy holds every byte).
    Proxy,
}

struct Scene {
    cluster: Cluster,
    proxy: Option<Proxy>,
    cut: Cut,
    audit: std::path::PathBuf,
    keys: BTreeSet<String>,
}

impl Scene {
    async fn start(quarantine: bool, cut: Cut) -> Scene {
        let cluster = Cluster::configure(&REGIONS, agent_identity, None);
        let proxy = match cut {
            Cut::Proxy => Some(Proxy::start(cluster.agents[AWAY].addr).await),
            Cut::Stop => None,
        };
        let mut config = cluster.rotator_config();
        config.schedule.cron = "*/3 * * * * *".into();
        config.policy.token_expiration = Duration::from_secs(2);
        config.fanout.quarantine_after = quarantine.then_some(QUARANTINE_AFTER);
        let audit = cluster.dir.path().join("rotator-audit.log");
        config.audit_log = Some(audit.clone());
        if let Some(proxy) = &proxy {
            config.agents[AWAY].endpoint = format!("https://{}", proxy.addr());
        }
        cluster.write_rotator_config(&config);
        Scene {
            cluster: cluster.launch().await,
            proxy,
            cut,
            audit,
            keys: BTreeSet::new(),
        }
    }

    fn cut(&mut self) {
        match self.cut {
            Cut::Stop => self.cluster.agent(AWAY).signal(Signal::STOP),
            Cut::Proxy => self.proxy.as_ref().expect("proxy").set(Fault::Stall),
        }
    }

    fn restore(&mut self) {
        match self.cut {
            Cut::Stop => self.cluster.agent(AWAY).signal(Signal::CONT),
            Cut::Proxy => self.proxy.as_ref().expect("proxy").set(Fault::Pass),
        }
    }

    fn generation(&self) -> u64 {
        self.cluster.status().1["repositories"][0]["generation"]
            .as_u64()
            .unwrap_or(0)
    }

    /// Every reachable region's primary signs a token that every reachable
    /// region validates; `kept` (a token of the away region) validates in
    /// every region, the away one included.
    fn check_tokens(&mut self, reachable: &[usize], kept: &str, context: &str) {
        let sets: Vec<(usize, KeySet)> = reachable
            .iter()
            .map(|&i| (i, self.cluster.repo_state(i)))
            .collect();
        for (i, set) in &sets {
            key_forms(set, &mut self.keys);
            let token = fernetd::token::canary(set.primary().expect("primary"));
            for (j, _) in &sets {
                // Read again: the region may have installed since.
                let other = self.cluster.repo_state(*j);
                assert!(
                    Keyring::new(&other).decrypt(&token).is_ok(),
                    "{context}: a token of {} (primary {:?}) is rejected by {} (keys {:?})",
                    REGIONS[*i],
                    set.primary_index(),
                    REGIONS[*j],
                    other.indices()
                );
            }
        }
        for (i, region) in REGIONS.iter().enumerate() {
            let set = self.cluster.repo_state(i);
            assert!(
                Keyring::new(&set).decrypt(kept).is_ok(),
                "{context}: the away region's token is rejected by {region} (keys {:?})",
                set.indices()
            );
        }
    }

    fn away_row(&self) -> Value {
        let (_, status) = self.cluster.status();
        status["agents"]
            .as_array()
            .and_then(|rows| rows.iter().find(|r| r["name"] == REGIONS[AWAY]).cloned())
            .unwrap_or_else(|| panic!("no row for {}: {status:#}", REGIONS[AWAY]))
    }

    /// The indices pinned for the away region while it is quarantined.
    fn pinned_now(&self) -> Vec<u64> {
        let (_, status) = self.cluster.status();
        status["repositories"][0]["pinned"]
            .as_array()
            .map(|pins| {
                pins.iter()
                    .filter(|p| p["agent"] == REGIONS[AWAY] && p["until"].is_null())
                    .filter_map(|p| p["index"].as_u64())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Back: it converges, leaves quarantine, and its new tokens validate
    /// everywhere (the pre-outage token's lifetime is long over by now).
    async fn back_and_out_of_quarantine(&mut self) {
        self.restore();
        self.cluster.converged("the away region converges").await;
        poll_until(Duration::from_secs(20), "it leaves quarantine", || async {
            self.away_row()["quarantined_since"].is_null().then_some(())
        })
        .await;
        let all: Vec<usize> = (0..REGIONS.len()).collect();
        let set = self.cluster.repo_state(AWAY);
        let fresh = fernetd::token::canary(set.primary().expect("primary"));
        self.check_tokens(&all, &fresh, "after the return");
    }
}

/// Polls every 300 ms for `budget`, checking tokens each time, until
/// `generation >= target`; returns the last generation seen.
async fn through_the_outage(scene: &mut Scene, kept: &str, target: u64, budget: Duration) -> u64 {
    let reachable: Vec<usize> = (0..REGIONS.len()).filter(|i| *i != AWAY).collect();
    let started = Instant::now();
    loop {
        scene.check_tokens(&reachable, kept, "during the outage");
        let generation = scene.generation();
        if generation >= target || started.elapsed() > budget {
            return generation;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn quarantined_region_does_not_hold_the_others_back(cut: Cut) {
    let mut scene = Scene::start(true, cut).await;
    scene.cluster.converged("initial distribution").await;
    let before = scene.cluster.repo_state(AWAY);
    let away_primary = before.primary_index().expect("primary");
    let kept = fernetd::token::canary(before.primary().expect("primary"));
    let from = scene.generation();
    scene.cut();
    // More rotations than max_active_keys: without a pin the away region's
    // last primary would be purged by the fourth.
    let target = from + MAX_ACTIVE_KEYS as u64 + 2;
    let budget =
        QUARANTINE_AFTER + INTERVAL * (MAX_ACTIVE_KEYS as u32 + 3) + Duration::from_secs(10);
    let reached = through_the_outage(&mut scene, &kept, target, budget).await;
    assert!(
        reached >= target,
        "rotation did not go on without the quarantined region: generation {reached}, wanted {target} within {budget:?}"
    );

    // What an operator sees.
    let row = scene.away_row();
    assert!(row["quarantined_since"].is_string(), "{row:#}");
    assert!(scene.pinned_now().contains(&u64::from(away_primary)));
    let (_, text, _) = scene.cluster.admin(&["status"]);
    assert!(
        text.contains(&format!("QUARANTINED: {}", REGIONS[AWAY])),
        "{text}"
    );
    assert!(
        text.contains(&format!("pinned: key {away_primary} for {}", REGIONS[AWAY])),
        "{text}"
    );
    let (_, agents, _) = scene.cluster.admin(&["agents"]);
    assert!(
        agents
            .lines()
            .any(|l| l.starts_with(REGIONS[AWAY]) && l.contains("QUARANTINED")),
        "{agents}"
    );
    let metrics = scene.cluster.metrics();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("fernetd_rotator_agent_quarantined{")
                && l.contains(&format!("agent=\"{}\"", REGIONS[AWAY]))
                && (l.ends_with(" 1") || l.ends_with(" 1.0"))),
        "{metrics}"
    );
    let audit = std::fs::read_to_string(&scene.audit).expect("audit log");
    assert!(
        audit.lines().any(|l| l.contains("\"event\":\"quarantine\"")
            && l.contains("\"outcome\":\"quarantined\"")
            && l.contains(REGIONS[AWAY])),
        "{audit}"
    );

    scene.back_and_out_of_quarantine().await;
    let audit = std::fs::read_to_string(&scene.audit).expect("audit log");
    assert!(audit.contains("\"outcome\":\"left\""), "{audit}");

    if cut == Cut::Stop {
        evict(&mut scene).await;
    }
    assert_no_keys_in_logs(&scene.cluster.logs, &scene.keys);
}

/// Away again, quarantined, then evicted: its pinned keys go with the
/// following rotations; back, it converges and leaves quarantine.
async fn evict(scene: &mut Scene) {
    let before = scene.cluster.repo_state(AWAY);
    let kept = fernetd::token::canary(before.primary().expect("primary"));
    scene.cut();
    let pinned = poll_until(
        QUARANTINE_AFTER + Duration::from_secs(20),
        "quarantined again",
        || async {
            let pinned = scene.pinned_now();
            (!pinned.is_empty()).then_some(pinned)
        },
    )
    .await;
    let (code, out, err) = scene.cluster.admin(&["evict", REGIONS[AWAY]]);
    assert_eq!(code, 2, "evict without confirmation: {out}{err}");
    assert!(err.contains("--yes"), "{err}");
    let (code, out, err) = scene.cluster.admin(&["evict", REGIONS[0], "--yes"]);
    assert_ne!(code, 0, "{out}");
    assert!(err.contains("not quarantined"), "{err}");
    let (code, v) = scene.cluster.admin_json(&["evict", REGIONS[AWAY], "--yes"]);
    assert_eq!(code, 0, "{v:#}");
    let released: Vec<String> = pinned.iter().map(|i| format!("tokens:{i}")).collect();
    assert_eq!(v["released"], serde_json::json!(released), "{v:#}");
    assert!(scene.pinned_now().is_empty());
    poll_until(
        INTERVAL * (MAX_ACTIVE_KEYS as u32 + 3),
        "the evicted region's keys purged by the usual rule",
        || async {
            let set = scene.cluster.repo_state(0);
            pinned
                .iter()
                .all(|i| set.get(*i as u32).is_none())
                .then_some(())
        },
    )
    .await;
    let audit = std::fs::read_to_string(&scene.audit).expect("audit log");
    assert!(
        audit.lines().any(|l| l.contains("\"event\":\"evict\"")
            && l.contains(REGIONS[AWAY])
            && l.contains(crate::rotator::ADMIN_ID)),
        "{audit}"
    );
    // Back: brought to the current generation, out of quarantine. Its old
    // token is gone with its key: that is what eviction means.
    scene.restore();
    scene
        .cluster
        .converged("the evicted region converges")
        .await;
    poll_until(Duration::from_secs(20), "it leaves quarantine", || async {
        scene.away_row()["quarantined_since"]
            .is_null()
            .then_some(())
    })
    .await;
    assert!(
        Keyring::new(&scene.cluster.repo_state(AWAY))
            .decrypt(&kept)
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_region_is_quarantined_the_others_rotate_and_its_tokens_stay_valid() {
    quarantined_region_does_not_hold_the_others_back(Cut::Stop).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_region_is_quarantined_the_others_rotate_and_its_tokens_stay_valid() {
    quarantined_region_does_not_hold_the_others_back(Cut::Proxy).await;
}

/// Quarantine off (the default): the strict rule holds every rotation while
/// the region is away, and tokens validate everywhere as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_quarantine_a_stopped_region_holds_every_rotation() {
    let mut scene = Scene::start(false, Cut::Stop).await;
    scene.cluster.converged("initial distribution").await;
    let before = scene.cluster.repo_state(AWAY);
    let kept = fernetd::token::canary(before.primary().expect("primary"));
    let from = scene.generation();
    scene.cut();
    let budget = QUARANTINE_AFTER + INTERVAL * 4;
    let reached = through_the_outage(&mut scene, &kept, u64::MAX, budget).await;
    // The tick after the stop may commit one generation; none after it.
    assert!(
        reached <= from + 1,
        "rotated from {from} to {reached} past an unacknowledged generation"
    );
    let (_, status) = scene.cluster.status();
    assert_eq!(
        status["repositories"][0]["blocking_regions"],
        serde_json::json!([REGIONS[AWAY]]),
        "{status:#}"
    );
    assert!(scene.away_row()["quarantined_since"].is_null());
    scene.restore();
    scene.cluster.converged("the away region converges").await;
    assert_no_keys_in_logs(&scene.cluster.logs, &scene.keys);
}

/// Real Keystone 30.0.0 (`FernetUtils.load_keys`, `TokenFormatter.validate_token`,
/// `[fernet_tokens] max_active_keys = 3`) loads a set that keeps a pinned older
/// key below newer ones, beyond `max_active_keys`, and validates a token of
/// every key in it; a token of a key the set purged is refused (the control).
#[test]
fn keystone_validates_every_key_of_a_set_with_a_pinned_older_key() {
    const SCRIPT: &str = r#"
import sys, json, warnings
warnings.simplefilter("ignore")
import keystone.conf
from keystone.common import fernet_utils
from keystone.token import token_formatters as tf
CONF = keystone.conf.CONF
keystone.conf.configure(CONF)
CONF([], project="keystone", default_config_files=[])
CONF.set_override("max_active_keys", 3, group="fernet_tokens")
CONF.set_override("key_repository", sys.argv[1], group="fernet_tokens")
loaded = fernet_utils.FernetUtils(sys.argv[1], 3, "fernet_tokens").load_keys()
formatter = tf.TokenFormatter()
out = {"loaded": len(loaded), "results": []}
for token in sys.argv[2:]:
    try:
        formatter.validate_token(token)
        out["results"].append("ok")
    except Exception as e:
        out["results"].append(type(e).__name__)
print(json.dumps(out))
"#;
    let mut set = fernetd::repository::init(3).expect("init");
    let pinned_index = set.primary_index().expect("primary");
    let pins = BTreeSet::from([pinned_index]);
    let mut purged = None;
    for _ in 0..4 {
        let next = fernetd::repository::rotate_keeping(&set, 3, &pins).expect("rotate");
        if let Some(gone) = set
            .iter()
            .find(|(i, _)| *i != 0 && next.get(*i).is_none())
            .map(|(_, k)| k.clone())
        {
            purged = Some(gone);
        }
        set = next;
    }
    // The pinned key sits below newer keys, and the set is beyond max_active_keys.
    assert_eq!(
        set.indices(),
        vec![0, pinned_index, 4, 5],
        "{:?}",
        set.indices()
    );
    let dir = tempfile::tempdir().expect("tempdir");
    for (index, key) in set.iter() {
        std::fs::write(
            dir.path().join(index.to_string()),
            key.to_base64().as_bytes(),
        )
        .expect("write key");
    }
    let mut tokens: Vec<String> = set
        .iter()
        .map(|(_, key)| fernetd::token::canary(key))
        .collect();
    tokens.push(fernetd::token::canary(
        &purged.expect("a rotation purged a key"),
    ));
    let mut args = vec![dir.path().to_str().expect("utf-8").to_owned()];
    args.extend(tokens);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = crate::common::keystone::run_python(SCRIPT, &args);
    let v: Value = serde_json::from_slice(&out.stdout).expect("the script prints JSON");
    assert_eq!(v["loaded"], 4, "{v}");
    assert_eq!(
        v["results"],
        serde_json::json!(["ok", "ok", "ok", "ok", "ValidationError"]),
        "one token per key in index order (0, the pinned key, 4, 5), then the purged key's: {v}"
    );
}
