//! Enrolment: the table of enrolled agents, and its change by a configuration
//! reload (SIGHUP, `systemctl reload`). The table is append-only: a removed
//! agent's slot is retired (its channel dropped, so its connection closes) and
//! a changed one is retired and appended anew, so an [`AgentId`] held by a
//! queue or an in-flight call never names another agent. Agents the reload
//! leaves alone keep their slot, their state and their open connection.
//!
//! A reload applies `[[agents]]` only. The whole file is checked as at start-up
//! first, and every new channel is built, before anything changes: a refused
//! reload changes nothing and says why. A changed `admin_identities` or `[tls]`
//! refuses the reload (a revoked admin must not stay authorised behind a
//! reload that looked applied); other changed settings are named in the log as
//! waiting for a restart.

use std::path::PathBuf;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::RotatorError;
use super::core::Core;
use super::fleet::{AgentSlot, Enrolment};
use crate::config::{AgentEndpoint, RotatorConfig};

/// Audits and announces what a reload changed.
async fn report(core: &Core, change: &Enrolment) {
    for (outcome, labels) in [
        ("added", &change.added),
        ("removed", &change.removed),
        ("changed", &change.changed),
    ] {
        for agent in labels {
            tracing::info!(agent = %agent.name, region = %agent.region, endpoint = %agent.endpoint, "reload: agent {outcome}");
            core.emit_enrolment(agent, outcome);
            let entry = crate::audit::Entry {
                actor: "reload".into(),
                event: "enrolment",
                agent: agent.name.clone(),
                region: agent.region.clone(),
                outcome,
                ..Default::default()
            };
            crate::audit::maybe_append(core.audit.as_ref(), entry).await;
        }
    }
}

/// Re-reads `source` on every SIGHUP until `stop` is cancelled, and applies
/// its `[[agents]]` (see the module's documentation).
pub(super) async fn reload_on_sighup(
    core: Arc<Core>,
    source: PathBuf,
    running: RotatorConfig,
    connect: impl Fn(&AgentEndpoint) -> Result<AgentSlot, RotatorError> + Send + Sync,
    stop: CancellationToken,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(hup) => hup,
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGHUP: the configuration is not reloaded");
            return;
        }
    };
    let mut running = running;
    loop {
        tokio::select! {
            _ = hup.recv() => {}
            _ = stop.cancelled() => return,
        }
        match reload(&core, &source, &running, &connect).await {
            Ok(Reloaded {
                config,
                change,
                restart,
            }) => {
                core.metrics.set_reload(true);
                if !restart.is_empty() {
                    tracing::warn!(path = %source.display(), settings = %restart.join(", "), "reload: these changed settings take effect at the next restart");
                }
                tracing::info!(
                    path = %source.display(),
                    added = change.added.len(),
                    removed = change.removed.len(),
                    changed = change.changed.len(),
                    agents = core.fleet.agents.len(),
                    "configuration reloaded"
                );
                report(&core, &change).await;
                running = config;
            }
            Err(error) => {
                core.metrics.set_reload(false);
                tracing::error!(path = %source.display(), error = %crate::error_chain(&error), "reload refused, nothing changed");
                let entry = crate::audit::Entry {
                    actor: "reload".into(),
                    event: "reload",
                    outcome: "refused",
                    detail: crate::error_chain(&error),
                    ..Default::default()
                };
                crate::audit::maybe_append(core.audit.as_ref(), entry).await;
            }
        }
    }
}

struct Reloaded {
    config: RotatorConfig,
    change: Enrolment,
    /// Top-level settings that differ from the running ones, other than `agents`.
    restart: Vec<String>,
}

async fn reload(
    core: &Core,
    source: &std::path::Path,
    running: &RotatorConfig,
    connect: &(impl Fn(&AgentEndpoint) -> Result<AgentSlot, RotatorError> + Send + Sync),
) -> Result<Reloaded, RotatorError> {
    let config: RotatorConfig =
        crate::config::load(source).map_err(|e| RotatorError::Config(crate::error_chain(&e)))?;
    let checked = super::check(config)?;
    let config = checked.config().clone();
    let restart = settings_needing_restart(running, &config);
    refuse_security_changes(&restart)?;
    let change = core.enrol(&config.agents, connect).await?;
    Ok(Reloaded {
        config,
        change,
        restart,
    })
}

/// Settings whose change a reload must not leave waiting for a restart: an
/// operator who removes a revoked admin, or replaces the TLS files with new
/// paths, and reloads would otherwise believe it done while the old ones stay
/// in force. Such a reload is refused as a whole (the metric and its alert, the
/// audit log and the journal say a restart is needed), nothing applied.
const SECURITY_SETTINGS: &[&str] = &["admin_identities", "tls"];

fn refuse_security_changes(restart: &[String]) -> Result<(), RotatorError> {
    let changed: Vec<&str> = restart
        .iter()
        .map(String::as_str)
        .filter(|k| SECURITY_SETTINGS.contains(k))
        .collect();
    if changed.is_empty() {
        return Ok(());
    }
    Err(RotatorError::Config(format!(
        "{} changed: a reload does not apply {}, and would leave the previous in force; \
         restart the rotator (systemctl restart fernetd-rotator) to apply the file",
        changed.join(" and "),
        if changed.len() > 1 { "them" } else { "it" }
    )))
}

/// The top-level keys of `next` that differ from `running`, `agents` aside.
fn settings_needing_restart(running: &RotatorConfig, next: &RotatorConfig) -> Vec<String> {
    let table = |c: &RotatorConfig| match toml::Value::try_from(c) {
        Ok(toml::Value::Table(mut t)) => {
            t.remove("agents");
            t
        }
        _ => toml::Table::new(),
    };
    let (old, new) = (table(running), table(next));
    let mut keys: Vec<String> = old
        .keys()
        .chain(new.keys())
        .filter(|k| old.get(*k) != new.get(*k))
        .cloned()
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rotator::core::tests::{ack, core};
    use crate::rotator::types::AgentId;

    fn endpoint(name: &str, port: u16) -> AgentEndpoint {
        AgentEndpoint {
            name: None,
            region: name.into(),
            endpoint: format!("https://127.0.0.1:{port}"),
            identity: format!("{name}.agent"),
        }
    }

    fn lazy(a: &AgentEndpoint) -> Result<AgentSlot, RotatorError> {
        let channel = crate::tls::Connection::never_dialled();
        Ok(AgentSlot::new(a, channel, 1))
    }

    fn tokens(core: &Core) -> crate::rotator::types::RepoId {
        core.repos().next().expect("one repository").0
    }

    fn names(slots: &[Arc<AgentSlot>]) -> Vec<&str> {
        slots.iter().map(|a| a.name.as_str()).collect()
    }

    #[tokio::test]
    async fn a_reload_adds_removes_and_reconnects_and_the_safety_rule_follows() {
        let core = core(&["One", "Two"]);
        let ids: Vec<AgentId> = core.fleet.agents.ids().collect();
        ack(&core, ids[0]);
        assert!(!core.may_rotate(tokens(&core)), "Two has not acknowledged");

        // Two removed, Three added: Three must acknowledge before a rotation.
        let change = core
            .enrol(&[endpoint("One", 9), endpoint("Three", 9)], lazy)
            .await
            .expect("enrol");
        assert_eq!(
            (
                names(&change.added),
                names(&change.removed),
                names(&change.changed)
            ),
            (vec!["Three"], vec!["Two"], vec![])
        );
        assert!(core.agent(ids[1]).is_none(), "Two's slot is retired");
        let now: Vec<AgentId> = core.fleet.agents.ids().collect();
        assert_eq!(now.len(), 2);
        assert_eq!(now[0], ids[0], "One keeps its slot");
        assert!(
            !core.may_rotate(tokens(&core)),
            "Three has not acknowledged"
        );
        ack(&core, now[1]);
        assert!(core.may_rotate(tokens(&core)));

        // One's endpoint changes: a new slot that counts once it acknowledges.
        let change = core
            .enrol(&[endpoint("One", 10), endpoint("Three", 9)], lazy)
            .await
            .expect("enrol");
        assert_eq!(names(&change.changed), vec!["One"]);
        let one = core
            .fleet
            .agents
            .ids()
            .find(|&i| core.agent(i).is_some_and(|a| a.name == "One"))
            .expect("One enrolled");
        assert_ne!(one, ids[0], "a changed agent gets a fresh slot");
        assert!(!core.may_rotate(tokens(&core)));
        ack(&core, one);
        assert!(core.may_rotate(tokens(&core)));

        // Nothing changed: nothing happens.
        let change = core
            .enrol(&[endpoint("One", 10), endpoint("Three", 9)], lazy)
            .await
            .expect("enrol");
        assert!(change.is_empty());
    }

    #[tokio::test]
    async fn a_reload_that_cannot_connect_one_agent_changes_nothing() {
        let core = core(&["One", "Two"]);
        let before: Vec<AgentId> = core.fleet.agents.ids().collect();
        let refuse = |a: &AgentEndpoint| {
            if a.region == "Four" {
                Err(RotatorError::Config("bad endpoint".into()))
            } else {
                lazy(a)
            }
        };
        let wanted = [
            endpoint("One", 9),
            endpoint("Three", 9),
            endpoint("Four", 9),
        ];
        assert!(core.enrol(&wanted, refuse).await.is_err());
        assert_eq!(core.fleet.agents.ids().collect::<Vec<_>>(), before);
    }

    #[test]
    fn settings_other_than_agents_are_named_for_a_restart() {
        let text = r#"
            listen = "127.0.0.1:7000"
            admin_identities = ["admin"]
            state_dir = "/var/lib/fernetd"
            [tls]
            ca = "ca.pem"
            cert = "cert.pem"
            key = "key.pem"
            [schedule]
            cron = "0 * * * *"
            [policy]
            token_expiration = "1h"
            [[repositories]]
            name = "tokens"
            max_active_keys = 5
            [[agents]]
            region = "One"
            endpoint = "https://127.0.0.1:9"
            identity = "one"
        "#;
        let running: RotatorConfig = toml::from_str(text).expect("config");
        let mut next = running.clone();
        next.agents.clear();
        assert!(settings_needing_restart(&running, &next).is_empty());
        next.schedule.cron = "0 0 * * *".into();
        next.admin_identities.push("other".into());
        assert_eq!(
            settings_needing_restart(&running, &next),
            ["admin_identities", "schedule"]
        );
    }

    /// A revoked admin removed from the file, or new TLS paths, and a reload:
    /// the reload said "takes effect at the next restart" and left them in force.
    #[test]
    fn a_reload_changing_admins_or_tls_paths_is_refused_as_needing_a_restart() {
        assert!(refuse_security_changes(&["schedule".into()]).is_ok());
        for changed in [
            vec!["admin_identities".to_owned()],
            vec!["fanout".to_owned(), "tls".to_owned()],
        ] {
            let refused = refuse_security_changes(&changed).expect_err("refused");
            let text = crate::error_chain(&refused);
            assert!(text.contains("restart the rotator"), "{text}");
            assert!(refused.is_config(), "{text}");
        }
    }
}
