//! The agent's Prometheus metrics: generation per repository, install latency,
//! installs and refusals by reason, canary validations and drift. Labels carry
//! repository names and fixed reason words only, never anything from a key.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::metrics::RepoLabel;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub repository: String,
    /// `installed`, `unchanged`, `restored` for installs; a refusal reason
    /// (`rollback`, `fork`, `malformed`, `canary`, ...) for refusals; `ok` or
    /// `failed` for canaries.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReadyLabels {
    /// `waiting`, `current` or `timeout` (see `readiness::Reason`).
    pub reason: String,
}

#[derive(Clone)]
struct LatencyBuckets;

impl MetricConstructor<Histogram> for LatencyBuckets {
    fn new_metric(&self) -> Histogram {
        // 100 µs to about 6.5 s: an install is a few fsyncs, a slow disk far more.
        Histogram::new(exponential_buckets(0.0001, 2.0, 16))
    }
}

/// Handles to every agent metric; cheap to clone.
#[derive(Clone)]
pub struct AgentMetrics {
    generation: Family<RepoLabel, Gauge>,
    drifted: Family<RepoLabel, Gauge>,
    install_seconds: Family<RepoLabel, Histogram, LatencyBuckets>,
    installs: Family<OutcomeLabels, Counter>,
    refusals: Family<OutcomeLabels, Counter>,
    canaries: Family<OutcomeLabels, Counter>,
    drift_events: Family<RepoLabel, Counter>,
    ready: Family<ReadyLabels, Gauge>,
}

impl AgentMetrics {
    /// Creates the metrics and registers them in `registry` under `fernetd_agent_`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = AgentMetrics {
            generation: Family::default(),
            drifted: Family::default(),
            install_seconds: Family::new_with_constructor(LatencyBuckets),
            installs: Family::default(),
            refusals: Family::default(),
            canaries: Family::default(),
            drift_events: Family::default(),
            ready: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("fernetd_agent");
        #[rustfmt::skip]
        crate::metrics::register!(r,
            m.generation => "generation", "Generation installed in each repository (0 = never installed)";
            m.drifted => "drift", "1 while the repository differs from what the agent installed";
            m.install_seconds => "install_duration_seconds", "Time to validate, install, reload and check canaries";
            m.installs => "installs", "Acknowledged installs by outcome";
            m.refusals => "refusals", "Refused installs by reason";
            m.canaries => "canary_validations", "Canary tokens checked against the installed repository";
            m.drift_events => "drift_events", "Changes to a repository the agent did not make";
            m.ready => "ready", "1 for the readiness gate's state: waiting, current (the rotator confirmed every repository) or timeout (ready after max_wait without it)";
        );
        m
    }

    fn outcome(name: &str, outcome: &str) -> OutcomeLabels {
        OutcomeLabels {
            repository: name.to_string(),
            outcome: outcome.to_string(),
        }
    }

    pub fn set_generation(&self, repository: &str, generation: u64) {
        self.generation
            .get_or_create(&RepoLabel::new(repository))
            .set(i64::try_from(generation).unwrap_or(i64::MAX));
    }

    pub fn set_drifted(&self, repository: &str, drifted: bool) {
        self.drifted
            .get_or_create(&RepoLabel::new(repository))
            .set(i64::from(drifted));
    }

    pub fn observe_install(&self, repository: &str, seconds: f64) {
        self.install_seconds
            .get_or_create(&RepoLabel::new(repository))
            .observe(seconds);
    }

    pub fn installed(&self, repository: &str, outcome: &str) {
        self.installs
            .get_or_create(&Self::outcome(repository, outcome))
            .inc();
    }

    pub fn refused(&self, repository: &str, reason: &str) {
        self.refusals
            .get_or_create(&Self::outcome(repository, reason))
            .inc();
    }

    pub fn canaries(&self, repository: &str, ok: u64, failed: u64) {
        if ok > 0 {
            self.canaries
                .get_or_create(&Self::outcome(repository, "ok"))
                .inc_by(ok);
        }
        if failed > 0 {
            self.canaries
                .get_or_create(&Self::outcome(repository, "failed"))
                .inc_by(failed);
        }
    }

    pub fn drift_event(&self, repository: &str) {
        self.drift_events
            .get_or_create(&RepoLabel::new(repository))
            .inc();
    }

    /// One of the three readiness states is 1, the others 0.
    pub fn set_ready(&self, now: super::readiness::Reason) {
        for reason in super::readiness::Reason::ALL {
            self.ready
                .get_or_create(&ReadyLabels {
                    reason: reason.as_str().to_owned(),
                })
                .set(i64::from(reason == now));
        }
    }
}
