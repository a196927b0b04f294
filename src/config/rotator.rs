//! The rotator's `rotator.toml` and the admin client's `admin.toml`: what each
//! field means is documented on the field (and in docs/configuration.md, the configuration
//! reference). Durations are written as `"90s"`, `"15m"`, `"1h"`, `"2d"`,
//! `"250ms"` (humantime) or a bare number of seconds.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{TlsConfig, duration};

/// `rotator.toml`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RotatorConfig {
    /// Address of the Admin gRPC service (mTLS).
    pub listen: SocketAddr,
    /// Address of the Prometheus endpoint (plain HTTP); none when absent.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// The rotator's certificate, key and the CA that signs agents and admins.
    pub tls: TlsConfig,
    /// Certificate identities (SAN DNS names or URIs) allowed to call the Admin API.
    pub admin_identities: Vec<String>,
    /// Where the durable generation state lives (mode 0700, created if missing).
    pub state_dir: PathBuf,
    /// The managed key repositories; default: one named `tokens`.
    #[serde(default = "default_repositories")]
    pub repositories: Vec<RepositoryConfig>,
    pub schedule: ScheduleConfig,
    pub policy: PolicyConfig,
    /// Enrolled agents: the safety rule waits for every one of them.
    #[serde(default)]
    pub agents: Vec<AgentEndpoint>,
    #[serde(default)]
    pub fanout: FanoutConfig,
    /// A keystone.conf with the regions' token policy: when set, start-up refuses
    /// `[policy]` lifetimes that differ from Keystone's and warns about its
    /// `max_active_keys` and token cache (`fernetd::policy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keystone_conf: Option<PathBuf>,
    /// Append-only JSON-lines audit log of rotations, refusals, purges and
    /// enrolments (fsynced before each answer; reopened on SIGHUP); none when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_log: Option<PathBuf>,
}

/// One managed repository (`[[repositories]]`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RepositoryConfig {
    /// The name agents know it by (`tokens`, `receipts`, `credential`).
    pub name: String,
    /// Keystone's `max_active_keys`: keys kept, the staged key included.
    pub max_active_keys: usize,
    /// An existing Keystone repository adopted as generation 1 on first start, so
    /// that moving a deployment to fernetd invalidates no token. Ignored once the
    /// rotator has state for this repository.
    #[serde(default)]
    pub import: Option<PathBuf>,
}

fn default_repositories() -> Vec<RepositoryConfig> {
    vec![RepositoryConfig {
        name: "tokens".into(),
        max_active_keys: 3,
        import: None,
    }]
}

/// `[schedule]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    /// A cron expression evaluated in UTC: five fields, or six with seconds first.
    pub cron: String,
}

/// `[policy]`: Keystone's token lifetime, checked against the schedule and
/// `max_active_keys` at start.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Keystone's `[token] expiration`.
    #[serde(with = "duration")]
    pub token_expiration: Duration,
    /// Keystone's `[token] allow_expired_window`.
    #[serde(with = "duration", default)]
    pub allow_expired_window: Duration,
}

/// One enrolled agent (`[[agents]]`): one per controller, several per region
/// when a region runs several controllers behind a VIP.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AgentEndpoint {
    /// The agent's own name (its host or controller), unique among the agents;
    /// defaults to the region, for one agent per region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The region it serves (shared by the controllers of one region), shown in
    /// status and logs; the agent must answer as this region.
    pub region: String,
    /// `https://host:port` of the agent's Distribution service.
    pub endpoint: String,
    /// The identity (SAN) the agent's certificate must carry; verified on connect.
    pub identity: String,
}

/// `[fanout]`: how pushes to agents are paced.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FanoutConfig {
    /// At most this many calls to agents in flight at once.
    pub concurrency: usize,
    /// Deadline of one call to an agent.
    #[serde(with = "duration")]
    pub call_timeout: Duration,
    /// First retry delay after a failed push; doubles per failure, with jitter.
    #[serde(with = "duration")]
    pub backoff_base: Duration,
    /// Upper bound of the retry delay.
    #[serde(with = "duration")]
    pub backoff_max: Duration,
    /// How often every agent's state is read back and differences re-pushed.
    #[serde(with = "duration")]
    pub reconcile_interval: Duration,
    /// How long `admin rotate` and `admin sync` wait for acknowledgements by default.
    #[serde(with = "duration")]
    pub ack_wait: Duration,
}

impl AgentEndpoint {
    /// The agent's name: `name`, or the region when there is one agent per region.
    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.region)
    }
}

impl Default for FanoutConfig {
    fn default() -> Self {
        FanoutConfig {
            concurrency: 256,
            call_timeout: Duration::from_secs(10),
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(60),
            reconcile_interval: Duration::from_secs(30),
            ack_wait: Duration::from_secs(60),
        }
    }
}

/// `admin.toml`: how `fernetd admin` reaches the rotator.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// `https://host:port` of the rotator's Admin service.
    pub rotator: String,
    /// The identity (SAN) the rotator's certificate must carry.
    pub rotator_identity: String,
    /// The admin's certificate and key, and the CA that signed the rotator's.
    pub tls: TlsConfig,
}
