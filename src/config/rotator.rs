//! The rotator's `rotator.toml` and the admin client's `admin.toml`: what each
//! field means is documented on the field (and in the README's configuration
//! reference). Durations are written as `"90s"`, `"15m"`, `"1h"`, `"2d"`,
//! `"250ms"` or a bare number of seconds.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::TlsConfig;

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

/// One enrolled agent (`[[agents]]`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AgentEndpoint {
    /// The region name shown in status and logs.
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

/// Serde for durations written as `"250ms"`, `"90s"`, `"15m"`, `"1h"`, `"2d"` or
/// a bare integer number of seconds.
pub mod duration {
    use super::*;

    pub fn parse(text: &str) -> Result<Duration, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let n: u64 = number
            .parse()
            .map_err(|_| format!("`{text}` is not a duration such as \"90s\", \"15m\", \"1h\""))?;
        let seconds = |factor: u64| {
            n.checked_mul(factor)
                .map(Duration::from_secs)
                .ok_or_else(|| format!("`{text}` is too long"))
        };
        match unit.trim() {
            "ms" => Ok(Duration::from_millis(n)),
            "" | "s" => seconds(1),
            "m" => seconds(60),
            "h" => seconds(3600),
            "d" => seconds(86_400),
            other => Err(format!(
                "unknown unit `{other}` in `{text}` (use ms, s, m, h or d)"
            )),
        }
    }

    pub fn format(d: &Duration) -> String {
        if d.subsec_millis() != 0 {
            format!("{}ms", d.as_millis())
        } else {
            format!("{}s", d.as_secs())
        }
    }

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Seconds(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Seconds(n) => Ok(Duration::from_secs(n)),
            Raw::Text(t) => parse(&t).map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_round_trip() {
        assert_eq!(duration::parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(duration::parse("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(duration::parse("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(duration::parse("2d"), Ok(Duration::from_secs(172_800)));
        assert_eq!(duration::parse("7"), Ok(Duration::from_secs(7)));
        assert!(duration::parse("1 week").is_err());
        assert!(duration::parse("h").is_err());
        for d in [Duration::from_millis(1500), Duration::from_secs(3600)] {
            assert_eq!(duration::parse(&duration::format(&d)), Ok(d));
        }
    }
}
