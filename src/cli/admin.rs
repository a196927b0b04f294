//! `fernetd admin`: the operator's client of the rotator's Admin API, and the
//! rendering of its answers as tables or `--json` (the demo shares the tables).

use std::fmt::Write as _;

use anyhow::{Context as _, anyhow};
use serde::Serialize;
use tonic::Status;

use super::{AdminArgs, AdminCommand, Answer, CliError};
use crate::config::AdminConfig;
use crate::pb;
use crate::rotator::admin::connect_leader;

/// `fernetd admin ...`.
pub(super) async fn main(args: &AdminArgs) -> Result<Answer, CliError> {
    let config: AdminConfig = crate::config::load(&args.config).map_err(CliError::usage)?;
    let mut client = connect_leader(&config)
        .await
        .context("TLS set-up failed")
        .map_err(CliError::usage)?;
    let call = |s: Status| {
        CliError::runtime(anyhow!(
            "call to the rotator failed: {}",
            crate::describe_status(&s)
        ))
    };
    let mut out = String::new();
    let answer = match &args.command {
        AdminCommand::Status => {
            let status = client
                .status(pb::StatusRequest {})
                .await
                .map_err(call)?
                .into_inner();
            let healthy = status
                .repositories
                .iter()
                .all(|r| r.blocked_reason.is_empty())
                && status.agents.iter().all(|a| a.digest_match)
                && status.ha.as_ref().is_none_or(|ha| ha.detail.is_empty());
            if args.json {
                out = json(&StatusView::from(&status));
            } else {
                render_status(&mut out, &status);
            }
            healthy
        }
        AdminCommand::Rotate {
            force,
            yes,
            repositories,
            dry_run,
            no_wait,
            wait,
        } => {
            if *force && !*dry_run {
                let names = if repositories.is_empty() {
                    "all".to_owned()
                } else {
                    repositories.join(",")
                };
                confirm(
                    "a forced rotation makes lagging regions reject tokens of the new primary",
                    &names,
                    *yes,
                )?;
            }
            let request = pb::RotateRequest {
                force: *force,
                dry_run: *dry_run,
                no_wait: *no_wait,
                wait_ms: wait.saturating_mul(1000),
                repositories: repositories.clone(),
            };
            let response = client.rotate(request).await.map_err(call)?.into_inner();
            // Exit 1 when blocked or held, or when a region has not acknowledged in time.
            let ok = response.outcomes.iter().all(|o| {
                (o.rotated || *dry_run) && !o.held_for_lifetime && o.pending_regions.is_empty()
            });
            if args.json {
                out = json(
                    &response
                        .outcomes
                        .iter()
                        .map(OutcomeView::from)
                        .collect::<Vec<_>>(),
                );
            } else {
                render_outcomes(&mut out, &response.outcomes, *no_wait);
            }
            ok
        }
        AdminCommand::PurgeKey {
            repository,
            index,
            yes,
            force,
            wait,
        } => {
            confirm(
                &format!(
                    "purging key {index} of `{repository}` invalidates every token it signed, in every region"
                ),
                repository,
                *yes,
            )?;
            let request = pb::PurgeKeyRequest {
                repository: repository.clone(),
                index: *index,
                force: *force,
                wait_ms: wait.saturating_mul(1000),
            };
            let response = client.purge_key(request).await.map_err(call)?.into_inner();
            let ok = response
                .outcomes
                .iter()
                .all(|o| o.rotated && o.pending_regions.is_empty());
            if args.json {
                out = json(
                    &response
                        .outcomes
                        .iter()
                        .map(OutcomeView::from)
                        .collect::<Vec<_>>(),
                );
            } else {
                render_outcomes(&mut out, &response.outcomes, false);
            }
            ok
        }
        AdminCommand::Evict { agent, yes } => {
            confirm(
                &format!(
                    "evicting `{agent}` unpins the keys it may still sign with: its tokens stop validating once they are purged"
                ),
                agent,
                *yes,
            )?;
            let response = client
                .evict(pb::EvictRequest {
                    agent: agent.clone(),
                })
                .await
                .map_err(call)?
                .into_inner();
            if args.json {
                out = json(&serde_json::json!({
                    "agent": agent,
                    "released": response.released,
                    "message": response.message,
                }));
            } else {
                let _ = writeln!(out, "{}", response.message);
            }
            true
        }
        AdminCommand::Sync { wait } => {
            let request = pb::SyncRequest {
                wait_ms: wait.saturating_mul(1000),
            };
            let agents = client
                .sync(request)
                .await
                .map_err(call)?
                .into_inner()
                .agents;
            let ok = agents.iter().all(|a| a.digest_match);
            if args.json {
                out = json(&agents.iter().map(AgentView::from).collect::<Vec<_>>());
            } else {
                render_agents(&mut out, &agents);
            }
            ok
        }
        AdminCommand::Credentials => {
            let status = client
                .status(pb::StatusRequest {})
                .await
                .map_err(call)?
                .into_inner();
            let Some(view) = status
                .repositories
                .iter()
                .find_map(|r| r.credential.as_ref().map(CredentialView::from))
            else {
                return Err(CliError::usage(anyhow!(
                    "the rotator manages no `credential` repository"
                )));
            };
            if args.json {
                out = json(&view);
            } else {
                render_credentials(&mut out, &view);
            }
            // A failed migrate, or rows a purge would strand, is a negative answer.
            view.last_migrate.is_none() || view.last_migrate_passed
        }
        AdminCommand::Agents => {
            let agents = client
                .list_agents(pb::ListAgentsRequest {})
                .await
                .map_err(call)?
                .into_inner()
                .agents;
            if args.json {
                out = json(&agents.iter().map(AgentView::from).collect::<Vec<_>>());
            } else {
                render_agents(&mut out, &agents);
            }
            true
        }
    };
    print!("{out}");
    Ok(if answer { Answer::Yes } else { Answer::No })
}

/// A destructive command goes ahead only with `--yes`, or when the operator
/// types `expected` at the terminal.
fn confirm(what: &str, expected: &str, yes: bool) -> Result<(), CliError> {
    use std::io::{BufRead as _, IsTerminal as _, Write as _};
    if yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        return Err(CliError::usage(anyhow!(
            "{what}: confirm with --yes (standard input is not a terminal to ask on)"
        )));
    }
    eprint!("{what}.\nType `{expected}` to confirm: ");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(CliError::runtime)?;
    if line.trim() == expected {
        Ok(())
    } else {
        Err(CliError::usage(anyhow!(
            "not confirmed: nothing was changed"
        )))
    }
}

fn json<T: Serialize>(value: &T) -> String {
    // Serialising plain structs of strings and numbers cannot fail.
    let mut s = serde_json::to_string_pretty(value).unwrap_or_default();
    s.push('\n');
    s
}

fn unix_ms_to_rfc3339(ms: i64) -> Option<String> {
    (ms > 0)
        .then(|| chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms))
        .flatten()
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
}

/// `--json` view of one repository.
#[derive(Debug, Serialize)]
pub struct RepositoryView {
    pub name: String,
    pub generation: u64,
    pub digest: String,
    pub indices: Vec<u32>,
    pub blocked_reason: Option<String>,
    pub blocking_regions: Vec<String>,
    pub next_rotation: Option<String>,
    /// When the next rotation purges no key a valid token may need; none = now.
    pub purge_safe_at: Option<String>,
    /// The credential repository's migrate workflow.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential: Option<CredentialView>,
    /// Keys kept outside the purge order for quarantined agents.
    pub pinned: Vec<PinnedView>,
}

/// `--json` view of the credential repository's migrate workflow.
#[derive(Debug, Serialize)]
pub struct CredentialView {
    pub migrate_agent: String,
    /// When the last migrate ran; none = never.
    pub last_migrate: Option<String>,
    pub last_migrate_generation: u64,
    pub last_migrate_passed: bool,
    pub last_migrate_reason: Option<String>,
    /// Rows as the last migrate found them, then as it left them.
    pub rows_before: Option<RowsView>,
    pub rows: Option<RowsView>,
    /// From when the rotation purging the previous key may be committed; none =
    /// a migrate of the current generation comes first.
    pub next_safe_rotation: Option<String>,
    pub cache_time_seconds: u64,
    /// When the migrate in progress was asked for; none = none is running.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub migrate_running_since: Option<String>,
    /// How long it has been running, in seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub migrate_running_seconds: Option<u64>,
}

/// Rows of the credential table by the key that decrypts them.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct RowsView {
    pub total: u64,
    pub primary: u64,
    pub other: u64,
    /// Under Keystone's public all-zero key.
    pub null: u64,
    pub undecryptable: u64,
}

impl From<&pb::CredentialRows> for RowsView {
    fn from(r: &pb::CredentialRows) -> Self {
        RowsView {
            total: r.total,
            primary: r.primary,
            other: r.other,
            null: r.null_key,
            undecryptable: r.undecryptable,
        }
    }
}

impl From<&pb::CredentialStatus> for CredentialView {
    fn from(c: &pb::CredentialStatus) -> Self {
        CredentialView {
            migrate_agent: c.migrate_agent.clone(),
            last_migrate: unix_ms_to_rfc3339(c.last_migrate_unix_ms),
            last_migrate_generation: c.last_migrate_generation,
            last_migrate_passed: c.last_migrate_passed,
            last_migrate_reason: non_empty(&c.last_migrate_reason),
            rows_before: c.before.as_ref().map(RowsView::from),
            rows: c.after.as_ref().map(RowsView::from),
            next_safe_rotation: unix_ms_to_rfc3339(c.next_safe_rotation_unix_ms),
            cache_time_seconds: c.cache_time_ms / 1000,
            migrate_running_since: unix_ms_to_rfc3339(c.migrate_running_since_unix_ms),
            migrate_running_seconds: (c.migrate_running_since_unix_ms > 0).then(|| {
                let now = chrono::Utc::now().timestamp_millis();
                u64::try_from(now - c.migrate_running_since_unix_ms).unwrap_or(0) / 1000
            }),
        }
    }
}

fn render_rows(out: &mut String, what: &str, rows: Option<RowsView>) {
    if let Some(r) = rows {
        let _ = writeln!(
            out,
            "  {what}: {} rows: {} primary, {} other key, {} all-zero key, {} undecryptable",
            r.total, r.primary, r.other, r.null, r.undecryptable
        );
    }
}

/// `admin credentials` as text.
fn render_credentials(out: &mut String, c: &CredentialView) {
    let _ = writeln!(
        out,
        "credential repository: migrated by `{}`, cache time {}s",
        c.migrate_agent, c.cache_time_seconds
    );
    if let Some(since) = &c.migrate_running_since {
        let _ = writeln!(
            out,
            "  migrate RUNNING since {since} ({}s so far)",
            c.migrate_running_seconds.unwrap_or(0)
        );
    }
    match &c.last_migrate {
        None => {
            let _ = writeln!(out, "  last migrate: never");
        }
        Some(at) => {
            let verdict = if c.last_migrate_passed {
                "passed".to_owned()
            } else {
                format!(
                    "FAILED: {}",
                    c.last_migrate_reason.as_deref().unwrap_or("no reason")
                )
            };
            let _ = writeln!(
                out,
                "  last migrate: {at}, generation {}, {verdict}",
                c.last_migrate_generation
            );
        }
    }
    render_rows(out, "rows before it", c.rows_before);
    render_rows(out, "rows after it", c.rows);
    let _ = writeln!(
        out,
        "  next safe rotation: {}",
        c.next_safe_rotation.as_deref().unwrap_or(
            "after a migrate of the current generation (admin rotate --repository credential runs it)"
        )
    );
}

/// `--json` view of one agent and repository.
#[derive(Debug, Serialize)]
pub struct AgentView {
    /// The agent's own name (a controller); its region when it is the only one.
    pub name: String,
    pub region: String,
    pub endpoint: String,
    pub repository: String,
    pub generation: u64,
    pub digest_match: bool,
    pub lag: u64,
    pub last_ack_age_ms: Option<i64>,
    pub last_error: Option<String>,
    pub connected: bool,
    /// In quarantine since then: it no longer blocks rotations.
    pub quarantined_since: Option<String>,
    /// Evicted from quarantine: its keys are no longer pinned.
    pub evicted: bool,
}

/// `--json` view of a key pinned for a quarantined agent.
#[derive(Debug, Serialize)]
pub struct PinnedView {
    pub index: u32,
    pub agent: String,
    /// Kept until then; none while the agent is quarantined.
    pub until: Option<String>,
}

/// `--json` view of `admin status`.
#[derive(Debug, Serialize)]
pub struct StatusView {
    pub version: String,
    pub repositories: Vec<RepositoryView>,
    /// One verdict per region: its agents and those behind.
    pub regions: Vec<RegionView>,
    pub agents: Vec<AgentView>,
    /// Under `[ha]`: this rotator's role, the leader, and why it does not rotate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ha: Option<HaView>,
}

/// `--json` view of a rotator's role under `[ha]`.
#[derive(Debug, Serialize)]
pub struct HaView {
    pub role: String,
    pub leader: String,
    pub detail: Option<String>,
}

/// `--json` view of one region in `admin status`.
#[derive(Debug, Serialize)]
pub struct RegionView {
    pub region: String,
    pub agents: Vec<String>,
    /// Agents that do not hold the current generation of every repository.
    pub behind: Vec<String>,
    pub ok: bool,
}

/// `--json` view of one rotation outcome.
#[derive(Debug, Serialize)]
pub struct OutcomeView {
    pub repository: String,
    pub rotated: bool,
    pub generation: u64,
    pub digest: String,
    pub indices: Vec<u32>,
    pub pending_regions: Vec<String>,
    pub rejecting_regions: Vec<String>,
    pub message: String,
    pub promoted_index: u32,
    pub purged: Vec<PurgedView>,
    /// Refused by the key-lifetime rule.
    pub held: bool,
    /// When a held rotation becomes safe.
    pub safe_at: Option<String>,
}

/// `--json` view of a key a rotation purges.
#[derive(Debug, Serialize)]
pub struct PurgedView {
    pub index: u32,
    /// When every region stopped encrypting with it; none while one may still.
    pub demoted_at: Option<String>,
    pub purge_safe_at: Option<String>,
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

impl From<&pb::AgentStatus> for AgentView {
    fn from(a: &pb::AgentStatus) -> Self {
        AgentView {
            name: if a.name.is_empty() {
                a.region.clone()
            } else {
                a.name.clone()
            },
            region: a.region.clone(),
            endpoint: a.endpoint.clone(),
            repository: a.repository.clone(),
            generation: a.acked_generation,
            digest_match: a.digest_match,
            lag: a.lag,
            last_ack_age_ms: (a.last_ack_age_ms >= 0).then_some(a.last_ack_age_ms),
            last_error: non_empty(&a.last_error),
            connected: a.connected,
            quarantined_since: unix_ms_to_rfc3339(a.quarantined_since_unix_ms),
            evicted: a.evicted,
        }
    }
}

impl From<&pb::StatusResponse> for StatusView {
    fn from(s: &pb::StatusResponse) -> Self {
        StatusView {
            version: s.version.clone(),
            repositories: s
                .repositories
                .iter()
                .map(|r| RepositoryView {
                    name: r.name.clone(),
                    generation: r.generation,
                    digest: hex::encode(&r.digest),
                    indices: r.indices.clone(),
                    blocked_reason: non_empty(&r.blocked_reason),
                    blocking_regions: r.blocking_regions.clone(),
                    next_rotation: unix_ms_to_rfc3339(r.next_rotation_unix_ms),
                    purge_safe_at: unix_ms_to_rfc3339(r.purge_safe_unix_ms),
                    credential: r.credential.as_ref().map(CredentialView::from),
                    pinned: r
                        .pinned
                        .iter()
                        .map(|p| PinnedView {
                            index: p.index,
                            agent: p.agent.clone(),
                            until: unix_ms_to_rfc3339(p.until_unix_ms),
                        })
                        .collect(),
                })
                .collect(),
            regions: region_views(&s.agents),
            ha: s.ha.as_ref().map(|ha| HaView {
                role: ha.role.clone(),
                leader: ha.leader.clone(),
                detail: non_empty(&ha.detail),
            }),
            agents: s.agents.iter().map(AgentView::from).collect(),
        }
    }
}

impl From<&pb::RotateOutcome> for OutcomeView {
    fn from(o: &pb::RotateOutcome) -> Self {
        OutcomeView {
            repository: o.repository.clone(),
            rotated: o.rotated,
            generation: o.generation,
            digest: hex::encode(&o.digest),
            indices: o.indices.clone(),
            pending_regions: o.pending_regions.clone(),
            rejecting_regions: o.rejecting_regions.clone(),
            message: o.message.clone(),
            promoted_index: o.promoted_index,
            purged: o
                .purged
                .iter()
                .map(|p| PurgedView {
                    index: p.index,
                    demoted_at: unix_ms_to_rfc3339(p.demoted_unix_ms),
                    purge_safe_at: unix_ms_to_rfc3339(p.safe_unix_ms),
                })
                .collect(),
            held: o.held_for_lifetime,
            safe_at: unix_ms_to_rfc3339(o.safe_unix_ms),
        }
    }
}

fn age(ms: i64) -> String {
    match ms {
        ..0 => "never".into(),
        0..60_000 => format!("{:.1}s", ms as f64 / 1000.0),
        60_000..3_600_000 => format!("{}m{}s", ms / 60_000, ms % 60_000 / 1000),
        _ => format!("{}h{}m", ms / 3_600_000, ms % 3_600_000 / 60_000),
    }
}

/// Renders `admin status` as text.
pub fn render_status(out: &mut String, status: &pb::StatusResponse) {
    if let Some(ha) = &status.ha {
        let _ = writeln!(out, "ha: {} (leader: {})", ha.role, or_unknown(&ha.leader));
        if !ha.detail.is_empty() {
            let _ = writeln!(out, "  not rotating: {}", ha.detail);
        }
    }
    for r in &status.repositories {
        let digest = hex::encode(&r.digest);
        let _ = writeln!(
            out,
            "repository {}: generation {}, digest {}, keys {:?}",
            r.name,
            r.generation,
            digest.get(..16).unwrap_or(&digest),
            r.indices
        );
        if let Some(next) = unix_ms_to_rfc3339(r.next_rotation_unix_ms) {
            let _ = writeln!(out, "  next rotation: {next}");
        }
        if let Some(safe) = unix_ms_to_rfc3339(r.purge_safe_unix_ms) {
            let _ = writeln!(
                out,
                "  next rotation purge-safe at: {safe} (a rotation before then is held)"
            );
        }
        if !r.blocked_reason.is_empty() {
            let _ = writeln!(out, "  BLOCKED: {}", r.blocked_reason);
        }
        for p in &r.pinned {
            let until = unix_ms_to_rfc3339(p.until_unix_ms).map_or_else(
                || "while it is quarantined".to_owned(),
                |t| format!("until {t}"),
            );
            let _ = writeln!(out, "  pinned: key {} for {} ({until})", p.index, p.agent);
        }
        if let Some(c) = &r.credential {
            render_credentials(out, &CredentialView::from(c));
        }
    }
    render_quarantine(out, &status.agents);
    render_regions(out, &status.agents);
    render_agents(out, &status.agents);
}

/// One line per quarantined agent.
fn render_quarantine(out: &mut String, agents: &[pb::AgentStatus]) {
    let mut seen: Vec<&str> = Vec::new();
    for a in agents.iter().filter(|a| a.quarantined_since_unix_ms > 0) {
        if seen.contains(&agent_name(a)) {
            continue;
        }
        seen.push(agent_name(a));
        let _ = writeln!(
            out,
            "QUARANTINED: {} (region {}) since {}: does not block rotations; {}",
            agent_name(a),
            a.region,
            unix_ms_to_rfc3339(a.quarantined_since_unix_ms).unwrap_or_default(),
            if a.evicted {
                "evicted, its keys are no longer pinned"
            } else {
                "the keys it may sign with are pinned; tokens issued elsewhere since then do not validate there until it returns"
            }
        );
    }
}

/// One line per region: whether every one of its agents holds the current
/// generation, and which do not.
fn render_regions(out: &mut String, agents: &[pb::AgentStatus]) {
    for r in region_views(agents) {
        let agents_word = if r.agents.len() == 1 {
            "agent"
        } else {
            "agents"
        };
        let verdict = if r.ok {
            format!(
                "ok: {} {agents_word}, every one holds the current generation",
                r.agents.len()
            )
        } else {
            format!(
                "BEHIND: {} of {} {agents_word} do not hold the current generation: {}",
                r.behind.len(),
                r.agents.len(),
                r.behind.join(", ")
            )
        };
        let _ = writeln!(out, "region {}: {verdict}", r.region);
    }
}

/// Each region's agents and those behind, regions in enrolment order.
fn region_views(agents: &[pb::AgentStatus]) -> Vec<RegionView> {
    regions(agents)
        .into_iter()
        .map(|region| {
            let rows = agents.iter().filter(|a| a.region == region);
            let mut names: Vec<String> = rows.clone().map(|a| agent_name(a).to_owned()).collect();
            names.dedup();
            let mut behind: Vec<String> = rows
                .filter(|a| !a.digest_match)
                .map(|a| agent_name(a).to_owned())
                .collect();
            behind.dedup();
            RegionView {
                region: region.to_owned(),
                ok: behind.is_empty(),
                agents: names,
                behind,
            }
        })
        .collect()
}

fn agent_name(a: &pb::AgentStatus) -> &str {
    if a.name.is_empty() {
        &a.region
    } else {
        &a.name
    }
}

/// The regions, in the order their first agent is enrolled.
fn regions(agents: &[pb::AgentStatus]) -> Vec<&str> {
    let mut seen: Vec<&str> = Vec::new();
    for a in agents {
        if !seen.contains(&a.region.as_str()) {
            seen.push(&a.region);
        }
    }
    seen
}

/// Renders per-agent rows as an aligned table.
pub fn render_agents(out: &mut String, agents: &[pb::AgentStatus]) {
    // Regions with several controllers show each agent under its own name.
    let named = agents
        .iter()
        .any(|a| !a.name.is_empty() && a.name != a.region);
    let label = |a: &pb::AgentStatus| {
        if named {
            format!("{} {}", a.region, a.name)
        } else {
            a.region.clone()
        }
    };
    let width = agents
        .iter()
        .map(|a| label(a).len())
        .max()
        .unwrap_or(6)
        .max(6);
    let _ = writeln!(
        out,
        "{:<width$}  {:<10}  {:>6}  {:>4}  {:<8}  {:>9}  {:<5}  ERROR",
        if named { "REGION AGENT" } else { "REGION" },
        "REPOSITORY",
        "GEN",
        "LAG",
        "DIGEST",
        "LAST ACK",
        "LINK"
    );
    for a in agents {
        let _ = writeln!(
            out,
            "{:<width$}  {:<10}  {:>6}  {:>4}  {:<8}  {:>9}  {:<5}  {}",
            label(a),
            a.repository,
            a.acked_generation,
            a.lag,
            if a.digest_match { "match" } else { "DIFFERS" },
            age(a.last_ack_age_ms),
            if a.connected { "up" } else { "down" },
            match (a.quarantined_since_unix_ms > 0, a.evicted) {
                (true, true) => format!("QUARANTINED (evicted) {}", a.last_error),
                (true, false) => format!("QUARANTINED {}", a.last_error),
                _ => a.last_error.clone(),
            }
        );
    }
}

/// Renders rotation outcomes as text.
pub fn render_outcomes(out: &mut String, outcomes: &[pb::RotateOutcome], no_wait: bool) {
    for o in outcomes {
        let _ = writeln!(out, "{}: {}", o.repository, o.message);
        if !o.rejecting_regions.is_empty() {
            let _ = writeln!(
                out,
                "  regions that will reject new tokens: {}",
                o.rejecting_regions.join(", ")
            );
        }
        if o.rotated && !no_wait {
            if o.pending_regions.is_empty() {
                let _ = writeln!(
                    out,
                    "  every region acknowledged generation {}",
                    o.generation
                );
            } else {
                let _ = writeln!(
                    out,
                    "  not acknowledged in time by: {}",
                    o.pending_regions.join(", ")
                );
            }
        }
    }
}

fn or_unknown(s: &str) -> &str {
    if s.is_empty() { "unknown" } else { s }
}
