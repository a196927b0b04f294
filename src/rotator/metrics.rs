//! The rotator's Prometheus metrics: its own counters and gauges, updated as
//! it rotates and pushes. The per-agent gauges (lag, acknowledgement age,
//! connection) are computed from the core at scrape time (`views.rs`), so
//! 10,000 agents cost no series bookkeeping between scrapes.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::metrics::RepoLabel;

/// The rotator's own metrics; per-agent figures are computed at scrape time by
/// `views::AgentCollector`.
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
