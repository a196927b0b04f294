//! Views of [`Core`] for the outside: the Admin API's status rows
//! (protobuf) and the per-agent and per-repository gauges read at scrape
//! time. They read the core and change nothing.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::gauge::ConstGauge;

use super::core::Core;
use super::types::{Generation, RepoId, RepoSlot, now_ms};
use crate::config::RepoKind;
use crate::pb;

/// One row per (agent, repository).
pub(super) fn agent_statuses(core: &Core) -> Vec<pb::AgentStatus> {
    let now = now_ms();
    let currents: Vec<(RepoId, &RepoSlot, Arc<Generation>)> = core
        .repos()
        .map(|(r, repo)| (r, repo, repo.current()))
        .collect();
    let agents = core.fleet.agents.snapshot();
    let mut rows = Vec::with_capacity(agents.slots() * core.repos.len());
    for (_, agent) in agents.iter() {
        let st = agent.lock();
        for (r, repo, current) in &currents {
            let held = st.held[*r];
            rows.push(pb::AgentStatus {
                name: agent.name.clone(),
                region: agent.region.clone(),
                endpoint: agent.endpoint.clone(),
                repository: repo.name.clone(),
                acked_generation: held.generation,
                digest_match: held.generation == current.number
                    && held.digest == Some(current.digest)
                    && !held.drift,
                lag: current.number.saturating_sub(held.generation),
                last_ack_age_ms: if held.unix_ms == 0 {
                    -1
                } else {
                    (now - held.unix_ms).max(0)
                },
                last_error: st.last_error.clone().unwrap_or_default(),
                connected: st.connected,
                quarantined_since_unix_ms: st.quarantined.map(|q| q.since_ms).unwrap_or(0),
                evicted: st.quarantined.is_some_and(|q| q.evicted_ms.is_some()),
            });
        }
    }
    rows
}

/// What `fernetd admin status` shows (without `[ha]`'s part).
pub(super) fn status(core: &Core) -> pb::StatusResponse {
    let repositories = core
        .repos()
        .map(|(r, repo)| {
            let current = repo.current();
            let blocked = repo.blocked();
            pb::RepositoryStatus {
                name: repo.name.clone(),
                generation: current.number,
                digest: current.digest.0.to_vec(),
                indices: current.keys.indices(),
                blocked_reason: blocked
                    .as_ref()
                    .map(|b| b.reason.clone())
                    .unwrap_or_default(),
                blocking_regions: blocked.map(|b| b.regions).unwrap_or_default(),
                next_rotation_unix_ms: repo.next_rotation_ms.load(Ordering::Acquire),
                purge_safe_unix_ms: core.purge_safe_ms(r),
                credential: core
                    .credential
                    .as_ref()
                    .filter(|_| repo.kind == RepoKind::Credential)
                    .map(|gate| gate.status(&current)),
                pinned: repo
                    .quarantine()
                    .pins
                    .iter()
                    .map(|p| pb::PinnedKey {
                        index: p.index,
                        agent: p.agent.clone(),
                        until_unix_ms: p.until_ms.unwrap_or(0),
                    })
                    .collect(),
            }
        })
        .collect();
    pb::StatusResponse {
        repositories,
        agents: agent_statuses(core),
        version: crate::VERSION.to_owned(),
        ha: None,
    }
}

/// Per-agent lag and acknowledgement age, read from [`Core`] on every scrape.
#[derive(Debug)]
pub(super) struct AgentCollector {
    pub(super) core: Weak<Core>,
}

impl Collector for AgentCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(core) = self.core.upgrade() else {
            return Ok(());
        };
        let rows = agent_statuses(&core);
        type PerAgent = (
            &'static str,
            &'static str,
            fn(&pb::AgentStatus) -> Option<f64>,
        );
        let gauges: [PerAgent; 5] = [
            (
                "agent_lag",
                "Generations the agent is behind the rotator",
                |a| Some(a.lag as f64),
            ),
            (
                "agent_last_ack_age_seconds",
                "Seconds since the agent last confirmed what it holds",
                |a| (a.last_ack_age_ms >= 0).then(|| a.last_ack_age_ms as f64 / 1000.0),
            ),
            (
                // The rotator's view of drift: at the current generation but
                // not with its digest, or reporting drift.
                "agent_digest_match",
                "1 when the agent holds the current generation with its digest and no drift",
                |a| Some(if a.digest_match { 1.0 } else { 0.0 }),
            ),
            (
                "agent_connected",
                "1 when the last call to the agent succeeded",
                |a| Some(if a.connected { 1.0 } else { 0.0 }),
            ),
            (
                "agent_quarantined",
                "1 while the agent is quarantined: it no longer blocks rotations, and the keys it may sign with are pinned (unless evicted)",
                |a| {
                    Some(if a.quarantined_since_unix_ms > 0 {
                        1.0
                    } else {
                        0.0
                    })
                },
            ),
        ];
        for (name, help, value) in gauges {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for row in &rows {
                let Some(v) = value(row) else { continue };
                let labels = [
                    ("agent", row.name.as_str()),
                    ("region", row.region.as_str()),
                    ("repository", row.repository.as_str()),
                ];
                ConstGauge::new(v).encode(family.encode_family(&labels)?)?;
            }
        }
        encode_repo_times(&core, &mut encoder)
    }
}

/// Per repository, from [`Core`] at scrape time: when the next rotation is
/// scheduled, and from when it purges no key a valid token may still need
/// (0 when that is already so), so an alert can compare the two.
fn encode_repo_times(core: &Core, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
    type PerRepo = (
        &'static str,
        &'static str,
        fn(&Core, RepoId, &RepoSlot) -> i64,
    );
    let gauges: [PerRepo; 2] = [
        (
            "next_rotation_timestamp_seconds",
            "Unix time of the next scheduled rotation (0 before the schedule is computed)",
            |_, _, slot| slot.next_rotation_ms.load(Ordering::Acquire),
        ),
        (
            "purge_safe_timestamp_seconds",
            "Unix time from which the next rotation purges no key a valid token may need (0 = now)",
            |core, r, _| core.purge_safe_ms(r),
        ),
    ];
    for (name, help, value_ms) in gauges {
        let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (r, slot) in core.repos() {
            // Whole seconds: Prometheus compares these with time().
            let seconds = value_ms(core, r, slot).div_euclid(1000);
            ConstGauge::new(seconds as f64)
                .encode(family.encode_family(&[("repository", slot.name.as_str())])?)?;
        }
    }
    Ok(())
}
