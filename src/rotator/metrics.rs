//! The rotator's Prometheus metrics: its own counters and gauges, updated as
//! it rotates and pushes, and per-agent gauges (lag, acknowledgement age,
//! connection) computed from [`Core`] at scrape time, so 10,000 agents cost no
//! series bookkeeping between scrapes.

use std::sync::Weak;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use std::sync::atomic::Ordering;

use super::core::Core;
use super::types::{RepoId, RepoSlot};
use crate::metrics::RepoLabel;
use crate::pb;

/// The rotator's own metrics; per-agent figures are computed at scrape time by
/// [`AgentCollector`].
pub(super) struct Metrics {
    generation: Family<RepoLabel, Gauge>,
    blocked: Family<RepoLabel, Gauge>,
    rotations: Family<RepoLabel, Counter>,
    pub(super) push_seconds: Histogram,
    pub(super) push_failures: Counter,
    reload_ok: Gauge,
}

impl Metrics {
    pub(super) fn new(registry: &mut Registry) -> Self {
        let m = Metrics {
            generation: Family::default(),
            blocked: Family::default(),
            rotations: Family::default(),
            push_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            push_failures: Counter::default(),
            reload_ok: Gauge::default(),
        };
        m.reload_ok.set(1);
        // Per repository: where the rotation stands.
        #[rustfmt::skip]
        crate::metrics::register!(registry,
            m.generation => "generation", "Current committed generation";
            m.blocked => "rotation_blocked", "1 while the next rotation waits for agents to acknowledge the current generation, or for a key to be purge-safe";
            m.rotations => "rotations", "Generations committed by this process";
        );
        // The fan-out, all agents together; per-agent gauges come from `AgentCollector`.
        #[rustfmt::skip]
        crate::metrics::register!(registry,
            m.push_seconds => "push_duration_seconds", "Time for an agent to install a generation and acknowledge it";
            m.push_failures => "push_failures", "Failed calls to agents";
        );
        #[rustfmt::skip]
        crate::metrics::register!(registry,
            m.reload_ok => "config_last_reload_successful", "0 when the last configuration reload (SIGHUP) was refused; 1 after a successful one, and at start";
        );
        m
    }

    pub(super) fn set_generation(&self, repository: &str, generation: u64) {
        self.generation
            .get_or_create(&RepoLabel::new(repository))
            .set(i64::try_from(generation).unwrap_or(i64::MAX));
    }

    pub(super) fn set_blocked(&self, repository: &str, blocked: bool) {
        self.blocked
            .get_or_create(&RepoLabel::new(repository))
            .set(i64::from(blocked));
    }

    pub(super) fn set_reload(&self, ok: bool) {
        self.reload_ok.set(i64::from(ok));
    }

    pub(super) fn count_rotation(&self, repository: &str) {
        self.rotations
            .get_or_create(&RepoLabel::new(repository))
            .inc();
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
        let rows = core.agent_statuses();
        type PerAgent = (
            &'static str,
            &'static str,
            fn(&pb::AgentStatus) -> Option<f64>,
        );
        let gauges: [PerAgent; 4] = [
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
