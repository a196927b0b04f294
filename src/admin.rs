//! The rotator's Admin gRPC service and the `fernetd admin` client: status,
//! rotation (with `--force`, `--dry-run`, waiting for acknowledgements), sync,
//! agent listing and the event stream. Only the certificate identities listed in
//! `admin_identities` may call it.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{broadcast, mpsc, watch};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::cli::{AdminArgs, AdminCommand, Answer, CliError};
use crate::config::AdminConfig;
use crate::pb;
use crate::pb::admin_client::AdminClient;
use crate::rotator::core::Core;

/// The Admin service, served by the rotator next to the health service.
pub struct AdminService {
    core: Arc<Core>,
    admins: Vec<String>,
    shutdown: watch::Receiver<bool>,
}

impl AdminService {
    pub(crate) fn new(
        core: Arc<Core>,
        admins: Vec<String>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        AdminService {
            core,
            admins,
            shutdown,
        }
    }

    /// The caller's identity when it is a configured admin; PERMISSION_DENIED
    /// naming what was presented otherwise.
    fn authorize<T>(&self, request: &Request<T>, method: &str) -> Result<String, Status> {
        match crate::tls::authorize(request, &self.admins, "admin") {
            Ok(identity) => {
                tracing::debug!(admin = %identity, method, "admin call");
                Ok(identity.to_string())
            }
            Err(status) => {
                tracing::warn!(method, "admin call refused: {}", status.message());
                Err(status)
            }
        }
    }
}

fn status_of(e: crate::rotator::RotatorError) -> Status {
    use crate::rotator::RotatorError as E;
    match e {
        E::UnknownRepository(_) => Status::not_found(e.to_string()),
        other => Status::internal(crate::error_chain(&other)),
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        self.authorize(&request, "Status")?;
        Ok(Response::new(self.core.status()))
    }

    async fn rotate(
        &self,
        request: Request<pb::RotateRequest>,
    ) -> Result<Response<pb::RotateResponse>, Status> {
        let admin = self.authorize(&request, "Rotate")?;
        let r = request.into_inner();
        tracing::info!(admin = %admin, force = r.force, dry_run = r.dry_run, no_wait = r.no_wait, "rotation requested");
        let response = self
            .core
            .rotate(&r, self.shutdown.clone())
            .await
            .map_err(status_of)?;
        Ok(Response::new(response))
    }

    async fn sync(
        &self,
        request: Request<pb::SyncRequest>,
    ) -> Result<Response<pb::SyncResponse>, Status> {
        let admin = self.authorize(&request, "Sync")?;
        tracing::info!(admin = %admin, "sync requested");
        let wait = match request.get_ref().wait_ms {
            0 => self.core.fanout.ack_wait,
            ms => Duration::from_millis(ms),
        };
        let agents = self.core.sync(wait, self.shutdown.clone()).await;
        Ok(Response::new(pb::SyncResponse { agents }))
    }

    async fn list_agents(
        &self,
        request: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        self.authorize(&request, "ListAgents")?;
        Ok(Response::new(pb::ListAgentsResponse {
            agents: self.core.agent_statuses(),
        }))
    }

    type WatchStream = tokio_stream::wrappers::ReceiverStream<Result<pb::Event, Status>>;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.authorize(&request, "Watch")?;
        let mut events = self.core.subscribe();
        let mut shutdown = self.shutdown.clone();
        let (tx, rx) = mpsc::channel(64);
        // Ends with the client or the rotator, so a graceful shutdown never waits
        // on an open stream.
        tokio::spawn(async move {
            loop {
                let item = tokio::select! {
                    e = events.recv() => match e {
                        Ok(event) => Ok(event),
                        Err(broadcast::error::RecvError::Lagged(n)) => Ok(pb::Event {
                            unix_ms: crate::rotator::core::now_ms(),
                            kind: "lagged".into(),
                            message: format!("{n} events dropped: this watcher was too slow"),
                            ..Default::default()
                        }),
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                    _ = crate::rotator::stopped(&mut shutdown) => return,
                    _ = tx.closed() => return,
                };
                if tx.send(item).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }
}

// ---------------------------------------------------------------- client

/// What stops `fernetd admin` from talking to the rotator.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("TLS set-up failed")]
    Tls(#[source] crate::tls::TlsError),
    /// The status, described on one line (its transport causes included).
    #[error("call to the rotator failed: {0}")]
    Call(String),
}

/// A gRPC status as one line: code, message, and the root cause when the
/// message does not already say it (a refused certificate shows up there).
pub(crate) fn describe(status: &Status) -> String {
    let mut text = format!("{:?}: {}", status.code(), status.message());
    let mut root = None;
    let mut source = std::error::Error::source(status);
    while let Some(s) = source {
        root = Some(s.to_string());
        source = s.source();
    }
    if let Some(root) = root.filter(|r| !text.contains(r.as_str())) {
        let _ = write!(text, ": {root}");
    }
    text
}

/// A client of the rotator's Admin API over mTLS, as `admin.toml` describes.
pub fn connect(config: &AdminConfig) -> Result<AdminClient<Channel>, AdminError> {
    let tls = crate::tls::ClientTls::load(&config.tls).map_err(AdminError::Tls)?;
    let channel = tls
        .channel(&config.rotator, &config.rotator_identity)
        .map_err(AdminError::Tls)?;
    Ok(AdminClient::new(channel))
}

/// `fernetd admin ...`.
pub async fn main(args: &AdminArgs) -> Result<Answer, CliError> {
    let config: AdminConfig = crate::config::load(&args.config).map_err(CliError::usage)?;
    let mut client = connect(&config).map_err(CliError::usage)?;
    let call = |s: Status| CliError::runtime(AdminError::Call(describe(&s)));
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
                && status.agents.iter().all(|a| a.digest_match);
            if args.json {
                out = json(&StatusView::from(&status));
            } else {
                render_status(&mut out, &status);
            }
            healthy
        }
        AdminCommand::Rotate {
            force,
            dry_run,
            no_wait,
            wait,
        } => {
            let request = pb::RotateRequest {
                force: *force,
                dry_run: *dry_run,
                no_wait: *no_wait,
                wait_ms: wait.saturating_mul(1000),
                repositories: Vec::new(),
            };
            let response = client.rotate(request).await.map_err(call)?.into_inner();
            // Exit 1 when blocked, or when a region has not acknowledged in time.
            let ok = response
                .outcomes
                .iter()
                .all(|o| (o.rotated || *dry_run) && o.pending_regions.is_empty());
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

fn json<T: Serialize>(value: &T) -> String {
    // Serialising plain structs of strings and numbers cannot fail.
    let mut s = serde_json::to_string_pretty(value).unwrap_or_default();
    s.push('\n');
    s
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
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
}

/// `--json` view of one agent and repository.
#[derive(Debug, Serialize)]
pub struct AgentView {
    pub region: String,
    pub endpoint: String,
    pub repository: String,
    pub generation: u64,
    pub digest_match: bool,
    pub lag: u64,
    pub last_ack_age_ms: Option<i64>,
    pub last_error: Option<String>,
    pub connected: bool,
}

/// `--json` view of `admin status`.
#[derive(Debug, Serialize)]
pub struct StatusView {
    pub version: String,
    pub repositories: Vec<RepositoryView>,
    pub agents: Vec<AgentView>,
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
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

impl From<&pb::AgentStatus> for AgentView {
    fn from(a: &pb::AgentStatus) -> Self {
        AgentView {
            region: a.region.clone(),
            endpoint: a.endpoint.clone(),
            repository: a.repository.clone(),
            generation: a.acked_generation,
            digest_match: a.digest_match,
            lag: a.lag,
            last_ack_age_ms: (a.last_ack_age_ms >= 0).then_some(a.last_ack_age_ms),
            last_error: non_empty(&a.last_error),
            connected: a.connected,
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
                    digest: hex(&r.digest),
                    indices: r.indices.clone(),
                    blocked_reason: non_empty(&r.blocked_reason),
                    blocking_regions: r.blocking_regions.clone(),
                    next_rotation: unix_ms_to_rfc3339(r.next_rotation_unix_ms),
                })
                .collect(),
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
            digest: hex(&o.digest),
            indices: o.indices.clone(),
            pending_regions: o.pending_regions.clone(),
            rejecting_regions: o.rejecting_regions.clone(),
            message: o.message.clone(),
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
    for r in &status.repositories {
        let digest = hex(&r.digest);
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
        if !r.blocked_reason.is_empty() {
            let _ = writeln!(out, "  BLOCKED: {}", r.blocked_reason);
        }
    }
    render_agents(out, &status.agents);
}

/// Renders per-agent rows as an aligned table.
pub fn render_agents(out: &mut String, agents: &[pb::AgentStatus]) {
    let width = agents
        .iter()
        .map(|a| a.region.len())
        .max()
        .unwrap_or(6)
        .max(6);
    let _ = writeln!(
        out,
        "{:<width$}  {:<10}  {:>6}  {:>4}  {:<8}  {:>9}  {:<5}  ERROR",
        "REGION", "REPOSITORY", "GEN", "LAG", "DIGEST", "LAST ACK", "LINK"
    );
    for a in agents {
        let _ = writeln!(
            out,
            "{:<width$}  {:<10}  {:>6}  {:>4}  {:<8}  {:>9}  {:<5}  {}",
            a.region,
            a.repository,
            a.acked_generation,
            a.lag,
            if a.digest_match { "match" } else { "DIFFERS" },
            age(a.last_ack_age_ms),
            if a.connected { "up" } else { "down" },
            a.last_error
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
