//! The key ledger: for every key of a repository, when it was created (staged),
//! promoted to primary and demoted to secondary, kept in the rotator's durable
//! state. A token can be encrypted by a key only while the key is primary
//! somewhere, and a key counts as primary until every agent has acknowledged a
//! generation in which it no longer is (which matters after `--force`). So the
//! last token a key signed expires, at the latest, at `demoted + lifetime`, where
//! the lifetime is Keystone's token expiration plus `allow_expired_window` plus
//! the token cache time: the key's *purge-safe time*. Every path that rotates asks
//! [`Ledger::check_purge`] before committing anything.
//!
//! Times are Unix milliseconds passed in by the caller, so the rule is a pure
//! function of the ledger and the clock, tested over simulated months.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::repository::KeySet;

/// What the ledger knows of one key. `None` is unknown (never happened, or
/// happened before the ledger existed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyTimes {
    /// When the key was generated as the staged key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_ms: Option<i64>,
    /// When the generation that made it primary was committed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promoted_ms: Option<i64>,
    /// When every agent first held a generation in which it was no longer
    /// primary: the latest moment a token can have been encrypted with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub demoted_ms: Option<i64>,
}

/// The times of every key of one repository, by index (the staged key apart,
/// since index 0 changes hands at every rotation).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    /// When the current staged key (index 0) was generated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staged_created_ms: Option<i64>,
    #[serde(default)]
    pub keys: BTreeMap<u32, KeyTimes>,
}

/// Why a rotation may not purge a key yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unsafe {
    /// The key is still primary in some region: the generation that demoted it
    /// is not acknowledged everywhere, so it may still be signing tokens.
    StillPrimary { index: u32 },
    /// Tokens the key signed may still be valid until `safe_ms`.
    TooYoung {
        index: u32,
        demoted_ms: i64,
        safe_ms: i64,
    },
}

impl Unsafe {
    pub fn index(&self) -> u32 {
        match self {
            Unsafe::StillPrimary { index } | Unsafe::TooYoung { index, .. } => *index,
        }
    }

    /// The earliest time the purge becomes safe, when it can be known now.
    pub fn safe_ms(&self) -> Option<i64> {
        match self {
            Unsafe::StillPrimary { .. } => None,
            Unsafe::TooYoung { safe_ms, .. } => Some(*safe_ms),
        }
    }
}

/// A key a rotation would purge, and since when its tokens can be no younger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Purge {
    pub index: u32,
    /// When it stopped being primary everywhere; `None` while it still is.
    pub demoted_ms: Option<i64>,
    /// `demoted + lifetime`; `None` while it is still primary.
    pub safe_ms: Option<i64>,
}

fn add(ms: i64, d: Duration) -> i64 {
    ms.saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl Ledger {
    /// A ledger for keys created here and now (a fresh repository): the primary
    /// is promoted now, the staged key created now.
    pub fn fresh(keys: &KeySet, now_ms: i64) -> Self {
        let mut ledger = Ledger {
            staged_created_ms: Some(now_ms),
            keys: BTreeMap::new(),
        };
        if let Some(primary) = keys.primary_index() {
            ledger.keys.insert(
                primary,
                KeyTimes {
                    created_ms: Some(now_ms),
                    promoted_ms: Some(now_ms),
                    demoted_ms: None,
                },
            );
        }
        ledger.adopt_unknown(keys, now_ms);
        ledger
    }

    /// Makes the ledger cover exactly `keys`: entries of keys no longer in the
    /// set are dropped, and a key it does not know (an imported repository, state
    /// from before the ledger) is taken as demoted `now_ms` unless it is the
    /// primary: the safe choice, since its tokens can then be no younger than
    /// now. Returns the indices it had to adopt.
    pub fn adopt_unknown(&mut self, keys: &KeySet, now_ms: i64) -> Vec<u32> {
        let primary = keys.primary_index();
        self.keys.retain(|index, _| keys.get(*index).is_some());
        let mut adopted = Vec::new();
        for index in keys.indices() {
            if index == 0 || self.keys.contains_key(&index) {
                continue;
            }
            let demoted_ms = (Some(index) != primary).then_some(now_ms);
            self.keys.insert(
                index,
                KeyTimes {
                    created_ms: None,
                    promoted_ms: None,
                    demoted_ms,
                },
            );
            adopted.push(index);
        }
        if keys.staged().is_some() && self.staged_created_ms.is_none() {
            self.staged_created_ms = Some(now_ms);
        }
        adopted
    }

    /// The keys that going from `current` to `next` purges, with their
    /// purge-safe times under `lifetime`, and the first that is not safe at
    /// `now_ms`. A rotation that purges nothing is always allowed.
    pub fn check_purge(
        &self,
        current: &KeySet,
        next: &KeySet,
        lifetime: Duration,
        now_ms: i64,
    ) -> (Vec<Purge>, Option<Unsafe>) {
        let mut purges = Vec::new();
        let mut first_unsafe = None;
        for index in current.indices() {
            if index == 0 || next.get(index).is_some() {
                continue;
            }
            let times = self.keys.get(&index).copied().unwrap_or_default();
            let still_primary = current.primary_index() == Some(index);
            let demoted_ms = times.demoted_ms.filter(|_| !still_primary);
            let safe_ms = demoted_ms.map(|d| add(d, lifetime));
            purges.push(Purge {
                index,
                demoted_ms,
                safe_ms,
            });
            let verdict = match (demoted_ms, safe_ms) {
                (Some(demoted_ms), Some(safe_ms)) if now_ms < safe_ms => Some(Unsafe::TooYoung {
                    index,
                    demoted_ms,
                    safe_ms,
                }),
                (Some(_), Some(_)) => None,
                _ => Some(Unsafe::StillPrimary { index }),
            };
            // The latest safe time decides when the whole rotation is safe.
            first_unsafe = match (first_unsafe, verdict) {
                (None, v) => v,
                (Some(a), None) => Some(a),
                (Some(a), Some(b)) => Some(match (a.safe_ms(), b.safe_ms()) {
                    (None, _) => a,
                    (_, None) => b,
                    (Some(x), Some(y)) if y > x => b,
                    _ => a,
                }),
            };
        }
        (purges, first_unsafe)
    }

    /// Records the commit of `next` (made from `current`) at `now_ms`: the
    /// promoted staged key gets its new index, a new staged key is created, and
    /// purged keys leave the ledger.
    pub fn record_commit(&mut self, current: &KeySet, next: &KeySet, now_ms: i64) {
        let new_primary = next.primary_index();
        if new_primary != current.primary_index()
            && let Some(index) = new_primary
            && current.get(index).is_none()
        {
            // The staged key was promoted under a new index.
            self.keys.insert(
                index,
                KeyTimes {
                    created_ms: self.staged_created_ms,
                    promoted_ms: Some(now_ms),
                    demoted_ms: None,
                },
            );
            self.staged_created_ms = Some(now_ms);
        } else if next.staged().map(|k| k.as_bytes()) != current.staged().map(|k| k.as_bytes()) {
            self.staged_created_ms = Some(now_ms);
        }
        self.keys.retain(|index, _| next.get(*index).is_some());
    }

    /// Every agent holds a generation whose primary is `primary`: every other
    /// key that was primary once is demoted now, if it was not already. Returns
    /// whether anything changed.
    pub fn record_all_hold(&mut self, primary: Option<u32>, now_ms: i64) -> bool {
        let mut changed = false;
        for (index, times) in &mut self.keys {
            if Some(*index) != primary && times.demoted_ms.is_none() {
                times.demoted_ms = Some(now_ms);
                changed = true;
            }
        }
        changed
    }

    /// Promotion times in Unix seconds, for the stamp written with each install.
    pub fn promoted_unix(&self) -> BTreeMap<u32, i64> {
        self.keys
            .iter()
            .filter_map(|(index, t)| t.promoted_ms.map(|ms| (*index, ms.div_euclid(1000))))
            .collect()
    }
}

/// The store record kind of a repository's quarantine (`[fanout]
/// quarantine_after`): which agents are quarantined and which keys are pinned.
pub const QUARANTINE: &str = "quarantine";

/// An agent in quarantine: it no longer blocks rotations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quarantined {
    /// Since when it had not acknowledged the current generation (Unix ms).
    pub since_ms: i64,
    /// When an operator evicted it (its keys are no longer pinned).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evicted_ms: Option<i64>,
}

/// A key kept in every generation, outside Keystone's purge order, because a
/// quarantined agent may still sign tokens with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pin {
    pub agent: String,
    pub index: u32,
    /// The first 16 hex digits of SHA-256 over the key's index and bytes (the
    /// set digest of that one key): says which key was pinned, reveals nothing.
    pub fingerprint: String,
    /// Kept until then (Unix ms): the agent came back, and the last tokens
    /// the key can have signed expire then. `None` while it is quarantined.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until_ms: Option<i64>,
}

/// One repository's quarantine record, durable in the store: it survives a
/// restart and a failover, and is written before any commit relies on it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantineRecord {
    #[serde(default)]
    pub agents: BTreeMap<String, Quarantined>,
    #[serde(default)]
    pub pins: Vec<Pin>,
}

impl QuarantineRecord {
    pub fn is_empty(&self) -> bool {
        self.agents.is_empty() && self.pins.is_empty()
    }

    /// The indices a rotation at `now_ms` must keep.
    pub fn pinned(&self, now_ms: i64) -> std::collections::BTreeSet<u32> {
        self.pins
            .iter()
            .filter(|p| p.until_ms.is_none_or(|until| until > now_ms))
            .map(|p| p.index)
            .collect()
    }

    /// Pins key `index` of `keys` for `agent` (while it is quarantined);
    /// whether anything changed. A key released earlier is pinned again.
    pub fn pin(&mut self, agent: &str, index: u32, keys: &KeySet) -> bool {
        let Some(key) = keys.get(index) else {
            return false;
        };
        let fingerprint =
            KeySet::from_keys([(index, key.clone())]).digest().to_hex()[..16].to_owned();
        if let Some(pin) = self
            .pins
            .iter_mut()
            .find(|p| p.agent == agent && p.index == index && p.fingerprint == fingerprint)
        {
            return pin.until_ms.take().is_some();
        }
        self.pins.push(Pin {
            agent: agent.to_owned(),
            index,
            fingerprint,
            until_ms: None,
        });
        true
    }

    /// `agent` acknowledged the current generation at `now_ms`: it leaves
    /// quarantine, and its pins are kept until `now_ms + lifetime` (the keys
    /// stopped signing there no later than now). Returns the released indices.
    pub fn release(&mut self, agent: &str, now_ms: i64, lifetime: Duration) -> Vec<u32> {
        self.agents.remove(agent);
        let mut released = Vec::new();
        for pin in self.pins.iter_mut().filter(|p| p.agent == agent) {
            if pin.until_ms.is_none() {
                pin.until_ms = Some(add(now_ms, lifetime));
                released.push(pin.index);
            }
        }
        released
    }

    /// An operator gave up on `agent`: its pins go at once, and it stays in
    /// quarantine (not blocking, nothing pinned) until it acknowledges.
    /// Returns the indices no longer pinned for it.
    pub fn evict(&mut self, agent: &str, now_ms: i64) -> Vec<u32> {
        if let Some(q) = self.agents.get_mut(agent) {
            q.evicted_ms.get_or_insert(now_ms);
        }
        let mut dropped = Vec::new();
        self.pins.retain(|p| {
            let mine = p.agent == agent;
            if mine {
                dropped.push(p.index);
            }
            !mine
        });
        dropped
    }

    /// Forgets agents (and their pins) not in `enrolled`; whether any was.
    pub fn forget_except(&mut self, enrolled: &std::collections::BTreeSet<&str>) -> bool {
        let before = (self.agents.len(), self.pins.len());
        self.agents
            .retain(|name, _| enrolled.contains(name.as_str()));
        self.pins.retain(|p| enrolled.contains(p.agent.as_str()));
        before != (self.agents.len(), self.pins.len())
    }

    /// Drops pins whose time has passed; whether any was dropped.
    pub fn expire(&mut self, now_ms: i64) -> bool {
        let before = self.pins.len();
        self.pins
            .retain(|p| p.until_ms.is_none_or(|until| until > now_ms));
        self.pins.len() != before
    }
}

/// The keys of `current` (generation `current_gen`) that an agent holding
/// generation `held_gen` may sign with: the primary of what it holds and of
/// every later generation it may have been sent. A generation raises the
/// primary's index by at most one (a rotation by one, a purge by one or
/// none), so every index from `primary - (current_gen - held_gen)` up to the
/// primary covers them (a superset when a purge did not move the primary).
/// None for an agent that never held a generation of this rotator.
pub fn possible_signing_keys(current: &KeySet, current_gen: u64, held_gen: u64) -> Vec<u32> {
    let Some(primary) = current.primary_index() else {
        return Vec::new();
    };
    if held_gen == 0 {
        return Vec::new();
    }
    let behind = u32::try_from(current_gen.saturating_sub(held_gen)).unwrap_or(u32::MAX);
    let lowest = primary.saturating_sub(behind).max(1);
    current
        .indices()
        .into_iter()
        .filter(|i| *i >= lowest && *i <= primary)
        .collect()
}

impl Ledger {
    /// A quarantined agent came back at `now_ms`: a key it may have signed
    /// with counts as demoted no earlier than then.
    pub fn demote_no_earlier(&mut self, index: u32, primary: Option<u32>, now_ms: i64) -> bool {
        if Some(index) == primary {
            return false;
        }
        match self.keys.get_mut(&index) {
            Some(t) if t.demoted_ms.is_none_or(|d| d < now_ms) => {
                t.demoted_ms = Some(now_ms);
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repository;
    use proptest::prelude::*;

    #[test]
    fn quarantine_pins_until_released_then_for_a_token_lifetime() {
        let keys = KeySet::from_keys([
            (0, repository::Key::generate()),
            (3, repository::Key::generate()),
            (4, repository::Key::generate()),
            (5, repository::Key::generate()),
        ]);
        // Holds generation 9 while 10 is current (primary 5): 4 and 5.
        assert_eq!(possible_signing_keys(&keys, 10, 9), vec![4, 5]);
        assert_eq!(possible_signing_keys(&keys, 10, 10), vec![5]);
        assert_eq!(possible_signing_keys(&keys, 10, 0), Vec::<u32>::new());
        assert_eq!(possible_signing_keys(&keys, 10, 2), vec![3, 4, 5]);
        let mut q = QuarantineRecord::default();
        q.agents.insert(
            "r5".into(),
            Quarantined {
                since_ms: 1,
                evicted_ms: None,
            },
        );
        assert!(q.pin("r5", 4, &keys));
        assert!(!q.pin("r5", 4, &keys), "pinned once");
        assert!(!q.pin("r5", 7, &keys), "not in the set");
        assert_eq!(q.pinned(100), [4].into());
        let lifetime = Duration::from_millis(1000);
        assert_eq!(q.release("r5", 100, lifetime), vec![4]);
        assert!(q.agents.is_empty());
        assert_eq!(q.pinned(1099), [4].into(), "kept for the tokens' lifetime");
        assert!(q.pinned(1100).is_empty());
        assert!(!q.expire(1099));
        assert!(q.expire(1100));
        assert!(q.is_empty());
        // Evicted: its pins go at once.
        q.agents.insert(
            "r5".into(),
            Quarantined {
                since_ms: 1,
                evicted_ms: None,
            },
        );
        q.pin("r5", 5, &keys);
        q.pin("r4", 4, &keys);
        assert_eq!(q.evict("r5", 50), vec![5]);
        assert_eq!(q.pinned(60), [4].into());
        assert_eq!(q.agents["r5"].evicted_ms, Some(50));
        // A removed agent is forgotten with its pins.
        assert!(!q.forget_except(&["r4", "r5"].into()));
        assert!(q.forget_except(&["r5"].into()));
        assert!(q.pinned(60).is_empty());
        q.pin("r4", 4, &keys);
        // Survives the store's encoding.
        let json = serde_json::to_string(&q).unwrap();
        assert_eq!(serde_json::from_str::<QuarantineRecord>(&json).unwrap(), q);
    }

    const HOUR: i64 = 3_600_000;
    const DAY: i64 = 24 * HOUR;

    #[test]
    fn four_immediate_rotations_never_purge_a_young_key() {
        // The demo's policy: tokens of 10 s, no window, 4 keys.
        let lifetime = Duration::from_secs(10);
        let mut keys = repository::init(4).expect("init");
        let mut ledger = Ledger::fresh(&keys, 0);
        let mut now = 0;
        let mut rotations = 0;
        for _ in 0..4 {
            // Every agent acknowledges at once.
            ledger.record_all_hold(keys.primary_index(), now);
            let next = repository::rotate(&keys, 4).expect("rotate");
            let (purges, unsafe_) = ledger.check_purge(&keys, &next, lifetime, now);
            if let Some(u) = unsafe_ {
                let safe = u.safe_ms().expect("demoted keys have a safe time");
                assert!(safe > now && !purges.is_empty());
                continue;
            }
            ledger.record_commit(&keys, &next, now);
            keys = next;
            rotations += 1;
            now += 1;
        }
        assert_eq!(
            rotations, 2,
            "two rotations fill the repository, the third would purge"
        );
    }

    #[test]
    fn a_key_still_primary_somewhere_is_never_purge_safe() {
        let lifetime = Duration::from_secs(1);
        let keys = repository::init(3).expect("init");
        let mut ledger = Ledger::fresh(&keys, 0);
        let g2 = repository::rotate(&keys, 3).expect("rotate");
        ledger.record_commit(&keys, &g2, 10);
        // Forced on without every agent: nothing demoted.
        let g3 = repository::rotate(&g2, 3).expect("rotate");
        let (purges, unsafe_) = ledger.check_purge(&g2, &g3, lifetime, 10 * DAY);
        assert_eq!(purges.len(), 1);
        assert!(matches!(unsafe_, Some(Unsafe::StillPrimary { .. })));
        ledger.record_all_hold(g2.primary_index(), 20);
        let (_, unsafe_) = ledger.check_purge(&g2, &g3, lifetime, 20 + 999);
        assert_eq!(unsafe_.and_then(|u| u.safe_ms()), Some(20 + 1000));
        let (_, unsafe_) = ledger.check_purge(&g2, &g3, lifetime, 20 + 1000);
        assert_eq!(unsafe_, None);
    }

    #[test]
    fn adopted_keys_count_as_demoted_at_adoption() {
        let mut keys = repository::init(5).expect("init");
        for _ in 0..3 {
            keys = repository::rotate(&keys, 5).expect("rotate");
        }
        let mut ledger = Ledger::default();
        let adopted = ledger.adopt_unknown(&keys, 7 * DAY);
        assert_eq!(adopted.len(), keys.len() - 1);
        let primary = keys.primary_index().expect("primary");
        assert_eq!(ledger.keys[&primary].demoted_ms, None);
        for (index, t) in &ledger.keys {
            if *index != primary {
                assert_eq!(t.demoted_ms, Some(7 * DAY));
            }
        }
    }

    #[test]
    fn the_ledger_round_trips_through_json() {
        let keys = repository::init(3).expect("init");
        let mut ledger = Ledger::fresh(&keys, 5);
        let next = repository::rotate(&keys, 3).expect("rotate");
        ledger.record_commit(&keys, &next, 9);
        let text = serde_json::to_string(&ledger).expect("serialize");
        assert_eq!(
            serde_json::from_str::<Ledger>(&text).expect("parse"),
            ledger
        );
        assert!(ledger.promoted_unix().values().all(|s| *s == 0));
    }

    /// What one simulated month does to the rotator.
    #[derive(Debug, Clone)]
    enum Step {
        /// Time passes (minutes).
        Wait(u32),
        /// The daily cron tick or an `admin rotate`, forced or not.
        Rotate { forced: bool },
        /// An agent stops acknowledging, or comes back.
        Outage(bool),
        /// The rotator restarts: the ledger is reloaded from its JSON.
        Restart,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (1u32..24 * 60).prop_map(Step::Wait),
            3 => Just(Step::Rotate { forced: false }),
            1 => Just(Step::Rotate { forced: true }),
            1 => any::<bool>().prop_map(Step::Outage),
            1 => Just(Step::Restart),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// The README's production policy (daily rotation, tokens of 1 h, a 2-day
        /// window, 5 keys) over 30 days of random manual rotations, outages and
        /// restarts: no key is ever purged before its purge-safe time, measured
        /// from the last moment any region could still encrypt with it.
        #[test]
        fn no_purge_before_the_purge_safe_time(steps in proptest::collection::vec(step(), 1..400)) {
            let lifetime = Duration::from_secs(3600 + 2 * 86_400);
            let lifetime_ms = 3_600_000 + 2 * DAY;
            let max_keys = 5;
            let mut keys = repository::init(max_keys).expect("init");
            let mut ledger = Ledger::fresh(&keys, 0);
            let mut now: i64 = 0;
            let mut down = false;
            // Truth, independent of the ledger: the last time each key could
            // encrypt a token in some region.
            let mut last_signing: BTreeMap<u32, i64> =
                keys.primary_index().map(|p| (p, 0)).into_iter().collect();
            // The primary each region holds: the up-to-date ones and the lagging one.
            let mut lagging_primary = keys.primary_index();
            for s in steps {
                if now > 30 * DAY {
                    break;
                }
                match s {
                    Step::Wait(minutes) => now += i64::from(minutes) * 60_000,
                    Step::Outage(d) => down = d,
                    Step::Restart => {
                        let text = serde_json::to_string(&ledger).expect("serialize");
                        ledger = serde_json::from_str(&text).expect("parse");
                    }
                    Step::Rotate { forced } => {
                        if down && !forced {
                            continue;
                        }
                        let next = repository::rotate(&keys, max_keys).expect("rotate");
                        let (_, unsafe_) = ledger.check_purge(&keys, &next, lifetime, now);
                        if unsafe_.is_some() {
                            continue;
                        }
                        for index in keys.indices() {
                            if index != 0 && next.get(index).is_none() {
                                let signed_until = last_signing[&index];
                                let still_signing = Some(index) == keys.primary_index()
                                    || Some(index) == lagging_primary;
                                prop_assert!(!still_signing, "purged key {} while a region signs with it", index);
                                prop_assert!(
                                    now >= signed_until + lifetime_ms,
                                    "purged key {} at {} though it signed until {}", index, now, signed_until
                                );
                            }
                        }
                        ledger.record_commit(&keys, &next, now);
                        keys = next;
                    }
                }
                // Regions sign with their primary at every instant up to now.
                if let Some(p) = keys.primary_index() {
                    last_signing.insert(p, now);
                }
                if down {
                    if let Some(p) = lagging_primary {
                        last_signing.insert(p, now);
                    }
                } else {
                    lagging_primary = keys.primary_index();
                    ledger.record_all_hold(keys.primary_index(), now);
                }
            }
        }
    }
}
