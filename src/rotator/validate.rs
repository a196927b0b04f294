//! The rotator's configuration, checked in one place before anything is
//! opened: names (the repository-name rule is `config::is_repository_name`,
//! shared with the agent), the cron expression, Keystone's `max_active_keys`
//! formula and keystone.conf's agreement, the credential repository's rules,
//! `[fanout]` and `[ha]`. Each rule is written once, here; `check` and
//! `preflight` (and a SIGHUP reload) call [`validate`].

use std::time::Duration;

use super::RotatorError;
use super::schedule::Schedule;
use super::state;
use crate::config::{CREDENTIAL_REPOSITORY, HaConfig, RepoKind, RotatorConfig, duration};

/// The schedule, and the token cache time keystone.conf gives (zero without).
pub(super) fn validate(
    config: &RotatorConfig,
) -> Result<(Schedule, std::time::Duration), RotatorError> {
    let schedule = Schedule::parse(&config.schedule.cron)?;
    credential(config)?;
    if let Some(h) = &config.ha {
        ha(h)?;
    }
    if config.repositories.is_empty() {
        return Err(RotatorError::Config("no repositories configured".into()));
    }
    if config.admin_identities.is_empty() {
        return Err(RotatorError::Config(
            "admin_identities is empty: nobody could call the Admin API".into(),
        ));
    }
    let mut names = std::collections::BTreeSet::new();
    for repo in &config.repositories {
        state::check_name(&repo.name)?;
        if !names.insert(&repo.name) {
            return Err(RotatorError::Config(format!(
                "repository `{}` is listed twice",
                repo.name
            )));
        }
    }
    let mut names = std::collections::BTreeSet::new();
    for agent in &config.agents {
        if agent.name().trim().is_empty() || agent.region.trim().is_empty() {
            return Err(RotatorError::Config(
                "an agent's name and region must not be empty".into(),
            ));
        }
        if !names.insert(agent.name()) {
            return Err(RotatorError::Config(if agent.name.is_none() {
                format!(
                    "agent region `{}` is listed twice (several controllers of one region each need their own `name`)",
                    agent.region
                )
            } else {
                format!("agent name `{}` is listed twice", agent.name())
            }));
        }
    }
    if config.fanout.concurrency == 0 {
        return Err(RotatorError::Config(
            "fanout.concurrency must be at least 1".into(),
        ));
    }
    let fanout = &config.fanout;
    for (key, value) in [
        ("fanout.call_timeout", fanout.call_timeout),
        ("fanout.backoff_base", fanout.backoff_base),
        ("fanout.backoff_max", fanout.backoff_max),
        ("fanout.reconcile_interval", fanout.reconcile_interval),
    ] {
        if value.is_zero() {
            return Err(RotatorError::Config(format!("{key} must be more than 0s")));
        }
    }
    if let Some(after) = fanout.quarantine_after {
        // Shorter than a read-back pass, an agent would be quarantined before
        // the rotator could even have looked at it once more.
        if after < fanout.reconcile_interval || after < fanout.call_timeout {
            return Err(RotatorError::Config(format!(
                "fanout.quarantine_after ({}) must be at least fanout.reconcile_interval ({}) and fanout.call_timeout ({}); leave it out for the strict rule",
                duration::format(&after),
                duration::format(&fanout.reconcile_interval),
                duration::format(&fanout.call_timeout)
            )));
        }
    }
    if fanout.backoff_max < fanout.backoff_base {
        return Err(RotatorError::Config(
            "fanout.backoff_max must not be shorter than fanout.backoff_base".into(),
        ));
    }
    // The tightest spacing the schedule produces is what ages keys fastest.
    let interval = schedule.rotation_interval(chrono::Utc::now());
    // Credential keys sign no token: Keystone's token formula is not theirs.
    for repo in config
        .repositories
        .iter()
        .filter(|r| r.kind().signs_tokens())
    {
        let minimum = crate::policy::min_active_keys(
            config.policy.token_expiration,
            config.policy.allow_expired_window,
            interval,
        );
        if repo.max_active_keys < minimum {
            return Err(RotatorError::Policy {
                repository: repo.name.clone(),
                configured: repo.max_active_keys,
                minimum,
                expiration: duration::format(&config.policy.token_expiration),
                window: duration::format(&config.policy.allow_expired_window),
                interval: duration::format(&interval),
            });
        }
    }
    let mut cache = std::time::Duration::ZERO;
    if let Some(path) = &config.keystone_conf {
        let repos: Vec<(&str, usize)> = config
            .repositories
            .iter()
            .filter(|r| r.kind().signs_tokens())
            .map(|r| (r.name.as_str(), r.max_active_keys))
            .collect();
        let keystone = crate::policy::KeystoneConf::load(path)?;
        let warnings = keystone.check_rotator(
            config.policy.token_expiration,
            config.policy.allow_expired_window,
            &repos,
            interval,
        )?;
        for warning in warnings {
            tracing::warn!(keystone_conf = %path.display(), "{warning}");
        }
        // A cached "valid" outlives the token by the cache time: keys wait for it too.
        cache = keystone.token_cache_ttl.unwrap_or_default();
    }
    Ok((schedule, cache))
}

/// Checks the credential repository's configuration: exactly 3 keys, a
/// `[credential]` section naming an enrolled agent, a schedule only of its own.
fn credential(config: &RotatorConfig) -> Result<(), RotatorError> {
    for repo in &config.repositories {
        if repo.kind() != RepoKind::Credential {
            if repo.schedule.is_some() {
                return Err(RotatorError::Config(format!(
                    "repository `{}`: only the `{CREDENTIAL_REPOSITORY}` repository has a schedule of its own; the others follow [schedule]",
                    repo.name
                )));
            }
            continue;
        }
        if repo.max_active_keys != 3 {
            return Err(RotatorError::Config(format!(
                "repository `{CREDENTIAL_REPOSITORY}`: max_active_keys = {} is refused: Keystone's credential keys are exactly 3 (its fixed MAX_ACTIVE_KEYS)",
                repo.max_active_keys
            )));
        }
        if let Some(cron) = &repo.schedule {
            Schedule::parse(cron)?;
        }
        let Some(credential) = &config.credential else {
            return Err(RotatorError::Config(format!(
                "repository `{CREDENTIAL_REPOSITORY}` needs a [credential] section with migrate_region: its rotation is a migration of the credential table"
            )));
        };
        let named = config.agents.iter().any(|a| {
            a.name() == credential.migrate_region || a.region == credential.migrate_region
        });
        if !named {
            return Err(RotatorError::Config(format!(
                "[credential] migrate_region = {:?} is no enrolled agent's name or region",
                credential.migrate_region
            )));
        }
    }
    Ok(())
}

/// Checks `[ha]` without the network: endpoints, TLS files named, the TTL.
fn ha(config: &HaConfig) -> Result<(), RotatorError> {
    let bad = |m: String| Err(RotatorError::Config(format!("[ha] {m}")));
    if config.endpoints.is_empty() {
        return bad("endpoints is empty".into());
    }
    for endpoint in &config.endpoints {
        let uri: http::Uri = match endpoint.parse() {
            Ok(u) => u,
            Err(_) => return bad(format!("endpoint `{endpoint}` is not a URL")),
        };
        match uri.scheme_str() {
            Some("https") => {
                if config.ca.is_none() {
                    return bad(format!(
                        "endpoint `{endpoint}` is https but `ca` is not set"
                    ));
                }
            }
            Some("http") if is_loopback(uri.host().unwrap_or_default()) => {}
            Some("http") => {
                return bad(format!(
                    "endpoint `{endpoint}`: plain http:// is accepted only on loopback (tests and demos); use https:// with `ca`, `cert` and `key`"
                ));
            }
            _ => {
                return bad(format!(
                    "endpoint `{endpoint}` must be https:// (or http:// on loopback)"
                ));
            }
        }
    }
    if config.cert.is_some() != config.key.is_some() {
        return bad("`cert` and `key` go together".into());
    }
    if config.lease_ttl < Duration::from_secs(1) {
        return bad("lease_ttl must be at least 1s".into());
    }
    if !config.prefix.starts_with('/') || config.prefix.ends_with('/') {
        return bad(format!(
            "prefix `{}` must start with `/` and not end with one",
            config.prefix
        ));
    }
    Ok(())
}

fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CredentialConfig;

    fn ha_config(endpoints: &[&str]) -> HaConfig {
        HaConfig {
            endpoints: endpoints.iter().map(|e| e.to_string()).collect(),
            ca: None,
            cert: None,
            key: None,
            prefix: "/fernetd".into(),
            lease_ttl: Duration::from_secs(2),
            seal_key: "/etc/fernetd/seal.key".into(),
            advertise: None,
        }
    }

    #[test]
    fn plain_http_is_accepted_only_on_loopback_and_https_needs_a_ca() {
        ha(&ha_config(&[
            "http://127.0.0.1:2379",
            "http://[::1]:2379",
            "http://localhost:2379",
        ]))
        .expect("loopback");
        let e = ha(&ha_config(&["http://10.0.0.5:2379"])).expect_err("plain http off loopback");
        assert!(
            e.to_string().contains("only on loopback") && e.is_config(),
            "{e}"
        );
        let e = ha(&ha_config(&["https://etcd1:2379"])).expect_err("no ca");
        assert!(e.to_string().contains("`ca`"), "{e}");
        let mut with_ca = ha_config(&["https://etcd1:2379"]);
        with_ca.ca = Some("/etc/fernetd/etcd-ca.pem".into());
        ha(&with_ca).expect("https with a ca");
        with_ca.cert = Some("/etc/fernetd/etcd.pem".into());
        assert!(ha(&with_ca).is_err(), "cert without key");
        assert!(ha(&ha_config(&[])).is_err(), "no endpoint");
        let mut short = ha_config(&["http://127.0.0.1:2379"]);
        short.lease_ttl = Duration::from_millis(500);
        assert!(ha(&short).is_err(), "lease under 1s");
        let mut prefix = ha_config(&["http://127.0.0.1:2379"]);
        prefix.prefix = "fernetd/".into();
        assert!(ha(&prefix).is_err(), "bad prefix");
    }

    fn config(extra: &str) -> RotatorConfig {
        toml::from_str(&format!(
            r#"
            listen = "127.0.0.1:7000"
            admin_identities = ["admin"]
            state_dir = "/tmp/x"
            [tls]
            ca = "/ca"
            cert = "/c"
            key = "/k"
            [schedule]
            cron = "0 0 * * *"
            [policy]
            token_expiration = "1h"
            [[agents]]
            region = "RegionOne"
            endpoint = "https://127.0.0.1:7001"
            identity = "agent.one"
            {extra}
            "#
        ))
        .expect("parse")
    }

    #[test]
    fn quarantine_is_off_by_default_and_not_shorter_than_a_read_back() {
        let repo = "[[repositories]]\nname = \"tokens\"\nmax_active_keys = 4\n";
        assert_eq!(config(repo).fanout.quarantine_after, None);
        validate(&config(repo)).expect("off by default");
        let on = config(&format!("{repo}[fanout]\nquarantine_after = \"6h\"\n"));
        assert_eq!(
            on.fanout.quarantine_after,
            Some(Duration::from_secs(6 * 3600))
        );
        validate(&on).expect("6h");
        let off = config(&format!("{repo}[fanout]\nquarantine_after = \"off\"\n"));
        assert_eq!(off.fanout.quarantine_after, None);
        let short = config(&format!("{repo}[fanout]\nquarantine_after = \"5s\"\n"));
        let err = validate(&short).unwrap_err();
        assert!(err.is_config(), "{err}");
        assert!(
            err.to_string().contains("fanout.quarantine_after (5s)"),
            "{err}"
        );
        assert!(
            toml::from_str::<RotatorConfig>(&toml::to_string(&on).expect("toml"))
                .is_ok_and(|c| c.fanout.quarantine_after == on.fanout.quarantine_after)
        );
    }

    #[test]
    fn a_credential_repository_has_exactly_three_keys_and_a_migrate_region() {
        let repo = |keys: usize, schedule: &str| {
            format!(
                "[[repositories]]\nname = \"credential\"\nmax_active_keys = {keys}\n{schedule}\n"
            )
        };
        let section = "[credential]\nmigrate_region = \"RegionOne\"\ncache_time = \"2s\"\n";
        let ok = config(&format!("{}{section}", repo(3, "schedule = \"0 3 * * 0\"")));
        credential(&ok).expect("valid");
        assert_eq!(
            ok.credential.as_ref().map(|c| c.cache_time),
            Some(Duration::from_secs(2))
        );
        let err = credential(&config(&format!("{}{section}", repo(5, "")))).unwrap_err();
        assert!(err.to_string().contains("exactly 3"), "{err}");
        assert!(err.is_config());
        let err = credential(&config(&repo(3, ""))).unwrap_err();
        assert!(err.to_string().contains("[credential]"), "{err}");
        let elsewhere = section.replace("RegionOne", "RegionNine");
        let err = credential(&config(&format!("{}{elsewhere}", repo(3, "")))).unwrap_err();
        assert!(err.to_string().contains("RegionNine"), "{err}");
        let tokens =
            "[[repositories]]\nname = \"tokens\"\nmax_active_keys = 3\nschedule = \"0 3 * * 0\"\n";
        let err = credential(&config(tokens)).unwrap_err();
        assert!(err.to_string().contains("only the `credential`"), "{err}");
        let default: CredentialConfig =
            toml::from_str("migrate_region = \"RegionOne\"").expect("parse");
        assert_eq!(default.cache_time, Duration::from_secs(600));
    }
}
