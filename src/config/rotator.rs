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
    /// `[credential]`: how the `credential` repository's rotation migrates the
    /// shared credential table; required when that repository is configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<CredentialConfig>,
    /// A file (mode 0600) holding the base64 text of 32 random bytes: the state
    /// files are sealed with it (AES-256-GCM), so the state directory and its
    /// backups hold no key in the clear. Losing it loses the state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seal_key: Option<PathBuf>,
    /// `[ha]`: several rotators, one leader through an etcd lease, the state in
    /// etcd; none: the file state in `state_dir`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ha: Option<HaConfig>,
}

/// The name of Keystone's credential repository: rotated as a data migration.
pub const CREDENTIAL_REPOSITORY: &str = "credential";

/// `[credential]` in `rotator.toml`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialConfig {
    /// The agent (its name, or its region when it is the region's only one)
    /// that runs `keystone-manage credential_migrate` against the shared database.
    pub migrate_region: String,
    /// Keystone's `[credential] cache_time` (its default: `[cache]
    /// expiration_time`, 600 s): how long a region may serve a row it read
    /// before the migrate; the purge waits this long after the check.
    #[serde(with = "duration", default = "default_credential_cache_time")]
    pub cache_time: Duration,
}

fn default_credential_cache_time() -> Duration {
    Duration::from_secs(600)
}

/// `[ha]`: the etcd cluster that holds the state and elects the leader.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HaConfig {
    /// etcd client URLs: `https://host:2379`; `http://` only for loopback.
    pub endpoints: Vec<String>,
    /// The CA that signs the etcd servers' certificates (required for `https://`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// The client certificate presented to etcd (with `key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// The client certificate's private key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// The etcd key prefix under which this deployment's state lives.
    #[serde(default = "default_ha_prefix")]
    pub prefix: String,
    /// The leader's lease: a leader that cannot renew it within this time
    /// stops, and a standby takes over once it expired.
    #[serde(with = "duration", default = "default_lease_ttl")]
    pub lease_ttl: Duration,
    /// A file (mode 0600) holding the base64 text of 32 random bytes: keys are
    /// sealed with it before they reach etcd.
    pub seal_key: PathBuf,
    /// How admins reach this instance (`https://host:port`), told by standbys
    /// as "the leader is X"; default `https://` + `listen`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
}

fn default_ha_prefix() -> String {
    "/fernetd".into()
}

fn default_lease_ttl() -> Duration {
    Duration::from_secs(10)
}

/// One managed repository (`[[repositories]]`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RepositoryConfig {
    /// The name agents know it by (`tokens`, `receipts`, `credential`).
    pub name: String,
    /// Keystone's `max_active_keys`: keys kept, the staged key included.
    pub max_active_keys: usize,
    /// An existing Keystone repository adopted on first start, so that moving a
    /// deployment to fernetd invalidates no token: as generation 1, or, when it
    /// carries an agent's stamp (recovery from a lost state directory), at the
    /// stamp's generation and digest. Ignored once the rotator has state for
    /// this repository.
    #[serde(default)]
    pub import: Option<PathBuf>,
    /// A cron expression (UTC) of this repository's own: only for `credential`,
    /// which the `[schedule]` never rotates; none = on `admin rotate` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
}

impl RepositoryConfig {
    /// What this repository holds, which decides how it rotates.
    pub fn kind(&self) -> RepoKind {
        RepoKind::of(&self.name)
    }
}

/// What a Keystone key repository holds: Fernet token keys, receipt keys, or
/// the credential keys that encrypt rows of the shared `credential` table.
/// Token and receipt keys sign something that expires, so Keystone's
/// `max_active_keys` formula and the key ledger govern their purges; credential
/// keys sign nothing, and a migrate of the table makes their purge safe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepoKind {
    Tokens,
    Receipts,
    Credential,
}

impl RepoKind {
    /// The kind of the repository named `name`: the name is the one Keystone
    /// and the agents know it by (`credential`, `receipts`, else tokens).
    pub fn of(name: &str) -> RepoKind {
        match name {
            CREDENTIAL_REPOSITORY => RepoKind::Credential,
            "receipts" => RepoKind::Receipts,
            _ => RepoKind::Tokens,
        }
    }

    /// Whether its keys sign expiring tokens or receipts, so the token
    /// formula, the key ledger and `[schedule]` apply.
    pub fn signs_tokens(self) -> bool {
        self != RepoKind::Credential
    }
}

fn default_repositories() -> Vec<RepositoryConfig> {
    vec![RepositoryConfig {
        name: "tokens".into(),
        max_active_keys: 3,
        import: None,
        schedule: None,
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
    /// After how long without acknowledging the current generation an agent
    /// stops blocking rotations (quarantine, its possible signing keys pinned).
    /// `None` (the default, or `"off"`): the strict rule, every agent blocks.
    #[serde(with = "duration::option", skip_serializing_if = "Option::is_none")]
    pub quarantine_after: Option<Duration>,
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
            quarantine_after: None,
        }
    }
}

/// `admin.toml`: how `fernetd admin` reaches the rotator.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// `https://host:port` of the rotator's Admin service, or a list of them
    /// (the rotators of an `[ha]` deployment: the client finds the leader).
    pub rotator: RotatorEndpoints,
    /// The identity (SAN) the rotator's certificate must carry.
    pub rotator_identity: String,
    /// The admin's certificate and key, and the CA that signed the rotator's.
    pub tls: TlsConfig,
}

/// `admin.toml`'s `rotator`: one endpoint (a string) or several (a list).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotatorEndpoints(pub Vec<String>);

impl RotatorEndpoints {
    /// The first endpoint: the only one without HA.
    pub fn first(&self) -> &str {
        self.0.first().map(String::as_str).unwrap_or_default()
    }
}

impl From<String> for RotatorEndpoints {
    fn from(endpoint: String) -> Self {
        RotatorEndpoints(vec![endpoint])
    }
}

impl Serialize for RotatorEndpoints {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.0.as_slice() {
            [one] => serializer.serialize_str(one),
            many => many.serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for RotatorEndpoints {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RotatorEndpoints;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an endpoint URL or a list of them")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(RotatorEndpoints(vec![v.to_owned()]))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                let mut all = Vec::new();
                while let Some(e) = seq.next_element::<String>()? {
                    all.push(e);
                }
                if all.is_empty() {
                    return Err(serde::de::Error::custom(
                        "the list of rotator endpoints is empty",
                    ));
                }
                Ok(RotatorEndpoints(all))
            }
        }
        // TOML forwards `seq` to what the value holds, a string or a list.
        deserializer.deserialize_seq(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize, Serialize)]
    struct Holder {
        rotator: RotatorEndpoints,
    }

    #[test]
    fn rotator_endpoints_are_one_string_or_a_list() {
        let one: Holder = toml::from_str(r#"rotator = "https://a:7443""#).expect("one");
        assert_eq!(one.rotator.0, ["https://a:7443"]);
        assert_eq!(
            toml::to_string(&one).expect("toml").trim(),
            r#"rotator = "https://a:7443""#
        );
        let many: Holder =
            toml::from_str(r#"rotator = ["https://a:7443", "https://b:7443"]"#).expect("many");
        assert_eq!(many.rotator.0, ["https://a:7443", "https://b:7443"]);
        assert_eq!(many.rotator.first(), "https://a:7443");
        let back: Holder = toml::from_str(&toml::to_string(&many).expect("toml")).expect("again");
        assert_eq!(back.rotator, many.rotator);
        assert!(toml::from_str::<Holder>("rotator = []").is_err());
        assert!(toml::from_str::<Holder>("rotator = 3").is_err());
    }
}
