//! The rotator's Admin API: the gRPC service (status, rotation with `--force`
//! and `--dry-run`, sync, agent listing, the event stream) and the protobuf views
//! of [`Core`] it answers with, plus [`connect`], the client constructor that the
//! command line and the demo share. Only the certificate identities listed in
//! `admin_identities` may call it.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use super::RotatorError;
use super::core::Core;
use super::types::{Event, Outcome, PurgeOrder, RotateOrder, now_ms};
use crate::config::AdminConfig;
use crate::pb;
use crate::pb::admin_client::AdminClient;
use crate::tls::{ClientTls, TlsError};

/// The Admin service, served by the rotator next to the health service.
pub struct AdminService {
    core: Arc<Core>,
    admins: Vec<String>,
    shutdown: CancellationToken,
    /// Under `[ha]`: a standby answers reads and refuses mutations.
    ha: Option<Arc<super::ha::EtcdState>>,
}

impl AdminService {
    pub(super) fn new(core: Arc<Core>, admins: Vec<String>, shutdown: CancellationToken) -> Self {
        AdminService {
            core,
            admins,
            shutdown,
            ha: None,
        }
    }

    pub(super) fn with_ha(mut self, ha: Option<Arc<super::ha::EtcdState>>) -> Self {
        self.ha = ha;
        self
    }

    /// Refuses a mutation on a standby: "not the leader; the leader is X".
    fn leader_only(&self) -> Result<(), Status> {
        match &self.ha {
            Some(ha) => ha
                .require_leader()
                .map_err(|e| Status::failed_precondition(e.to_string())),
            None => Ok(()),
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

fn status_of(e: RotatorError) -> Status {
    use RotatorError as E;
    match e {
        E::UnknownRepository(_) | E::UnknownKey { .. } | E::UnknownAgent(_) => {
            Status::not_found(e.to_string())
        }
        E::NotQuarantined(_) => Status::failed_precondition(e.to_string()),
        E::Ha(super::ha::HaError::NotLeader { .. }) => Status::failed_precondition(e.to_string()),
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
        let mut status = super::views::status(&self.core);
        status.ha = self.ha.as_ref().map(|ha| ha.status());
        Ok(Response::new(status))
    }

    async fn rotate(
        &self,
        request: Request<pb::RotateRequest>,
    ) -> Result<Response<pb::RotateResponse>, Status> {
        let admin = self.authorize(&request, "Rotate")?;
        self.leader_only()?;
        let r = request.into_inner();
        tracing::info!(admin = %admin, force = r.force, dry_run = r.dry_run, no_wait = r.no_wait, "rotation requested");
        let response = self
            .core
            .rotate(&rotate_order(r), &admin, self.shutdown.clone())
            .await
            .map_err(status_of)?;
        Ok(Response::new(rotate_response(response)))
    }

    async fn purge_key(
        &self,
        request: Request<pb::PurgeKeyRequest>,
    ) -> Result<Response<pb::RotateResponse>, Status> {
        let admin = self.authorize(&request, "PurgeKey")?;
        self.leader_only()?;
        let r = request.into_inner();
        tracing::warn!(admin = %admin, repository = %r.repository, key = r.index, force = r.force, "key purge requested");
        let response = self
            .core
            .purge_key(&purge_order(r), &admin, self.shutdown.clone())
            .await
            .map_err(status_of)?;
        Ok(Response::new(rotate_response(response)))
    }

    async fn evict(
        &self,
        request: Request<pb::EvictRequest>,
    ) -> Result<Response<pb::EvictResponse>, Status> {
        let admin = self.authorize(&request, "Evict")?;
        self.leader_only()?;
        let agent = request.into_inner().agent;
        tracing::warn!(admin = %admin, agent = %agent, "eviction requested");
        let released = self.core.evict(&agent, &admin).await.map_err(status_of)?;
        let message = format!(
            "`{agent}` evicted: {} no longer pinned; they are purged by the usual key-lifetime rule",
            if released.is_empty() {
                "no key".to_owned()
            } else {
                released.join(", ")
            }
        );
        Ok(Response::new(pb::EvictResponse { released, message }))
    }

    async fn sync(
        &self,
        request: Request<pb::SyncRequest>,
    ) -> Result<Response<pb::SyncResponse>, Status> {
        let admin = self.authorize(&request, "Sync")?;
        self.leader_only()?;
        tracing::info!(admin = %admin, "sync requested");
        let wait = match request.get_ref().wait_ms {
            0 => self.core.fanout.ack_wait,
            ms => Duration::from_millis(ms),
        };
        self.core.sync(wait, self.shutdown.clone()).await;
        let agents = super::views::agent_statuses(&self.core);
        Ok(Response::new(pb::SyncResponse { agents }))
    }

    async fn list_agents(
        &self,
        request: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        self.authorize(&request, "ListAgents")?;
        Ok(Response::new(pb::ListAgentsResponse {
            agents: super::views::agent_statuses(&self.core),
        }))
    }

    type WatchStream = tokio_stream::wrappers::ReceiverStream<Result<pb::Event, Status>>;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.authorize(&request, "Watch")?;
        let mut events = self.core.subscribe();
        let shutdown = self.shutdown.clone();
        let (tx, rx) = mpsc::channel(64);
        // Ends with the client or the rotator, so a graceful shutdown never waits
        // on an open stream.
        tokio::spawn(async move {
            loop {
                let item = tokio::select! {
                    e = events.recv() => match e {
                        Ok(event) => Ok(event_of(event)),
                        Err(broadcast::error::RecvError::Lagged(n)) => Ok(pb::Event {
                            unix_ms: now_ms(),
                            kind: "lagged".into(),
                            message: format!("{n} events dropped: this watcher was too slow"),
                            ..Default::default()
                        }),
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                    _ = shutdown.cancelled() => return,
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

/// A client of the rotator's Admin API over mTLS, as `admin.toml` describes.
/// The certificates are read once: a one-shot command follows no files.
pub fn connect(config: &AdminConfig) -> Result<AdminClient<Channel>, TlsError> {
    let tls = ClientTls::load_once(&config.tls)?;
    let channel = tls.channel(config.rotator.first(), &config.rotator_identity)?;
    Ok(AdminClient::new(channel))
}

/// With several rotator endpoints (`[ha]`), a client of the one that leads:
/// each is asked its status in turn; without a leader in reach, the first
/// that answered (a standby says who leads when asked to act), else the first.
pub async fn connect_leader(config: &AdminConfig) -> Result<AdminClient<Channel>, TlsError> {
    if config.rotator.0.len() <= 1 {
        return connect(config);
    }
    let tls = ClientTls::load_once(&config.tls)?;
    let mut answered = None;
    let mut first = None;
    for endpoint in &config.rotator.0 {
        let mut client = AdminClient::new(tls.channel(endpoint, &config.rotator_identity)?);
        first.get_or_insert_with(|| client.clone());
        let mut request = Request::new(pb::StatusRequest {});
        request.set_timeout(LEADER_PROBE_TIMEOUT);
        let status = tokio::time::timeout(LEADER_PROBE_TIMEOUT, client.status(request)).await;
        let Ok(Ok(status)) = status else {
            continue;
        };
        if status
            .get_ref()
            .ha
            .as_ref()
            .is_none_or(|ha| ha.role == "leader")
        {
            return Ok(client);
        }
        answered.get_or_insert(client);
    }
    Ok(answered
        .or(first)
        .unwrap_or_else(|| unreachable!("at least two endpoints")))
}

/// The least time an Admin call gets before the server's request timeout.
const ADMIN_REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// Serves the Admin API (and gRPC health) on `listener` until `stop`, then
/// drains the calls in flight.
pub(super) async fn serve(
    core: Arc<Core>,
    config: &crate::config::RotatorConfig,
    leadership: Option<Arc<super::ha::EtcdState>>,
    server_tls: &crate::tls::ServerTls,
    listener: tokio::net::TcpListener,
    stop: &CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<pb::admin_server::AdminServer<AdminService>>()
        .await;
    let admin = AdminService::new(core.clone(), config.admin_identities.clone(), stop.clone())
        .with_ha(leadership);
    // Admin calls may wait for acknowledgements (`rotate --wait`, `sync`):
    // the request timeout leaves them that time, beyond the default wait.
    let limits = crate::tls::Limits {
        request_timeout: config.fanout.ack_wait.max(ADMIN_REQUEST_TIMEOUT)
            + std::time::Duration::from_secs(60),
        ..crate::tls::Limits::default()
    };
    let authorization = crate::tls::Authorization::default()
        .allow("/fernetd.v1.Admin/", "admin", &config.admin_identities)
        .allow("/grpc.health.v1.Health/", "admin", &config.admin_identities);
    let serve = limits
        .server()
        .layer(authorization)
        .add_service(health_service)
        .add_service(pb::admin_server::AdminServer::new(admin))
        .serve_with_incoming_shutdown(
            // Admins keep connection slots of their own (tls::Limits).
            server_tls.incoming_reserving(listener, limits, &config.admin_identities),
            stop.clone().cancelled_owned(),
        );
    limits.drained(serve, stop).await
}

/// The domain's order for a `Rotate` call.
fn rotate_order(r: pb::RotateRequest) -> RotateOrder {
    RotateOrder {
        repositories: r.repositories,
        force: r.force,
        dry_run: r.dry_run,
        no_wait: r.no_wait,
        wait_ms: r.wait_ms,
    }
}

/// The domain's order for a `PurgeKey` call.
fn purge_order(r: pb::PurgeKeyRequest) -> PurgeOrder {
    PurgeOrder {
        repository: r.repository,
        index: r.index,
        force: r.force,
        wait_ms: r.wait_ms,
    }
}

/// The answer to `Rotate` and `PurgeKey`.
fn rotate_response(outcomes: Vec<Outcome>) -> pb::RotateResponse {
    pb::RotateResponse {
        outcomes: outcomes
            .into_iter()
            .map(|o| pb::RotateOutcome {
                repository: o.repository,
                rotated: o.rotated,
                generation: o.generation,
                digest: o.digest,
                indices: o.indices,
                pending_regions: o.pending_regions,
                rejecting_regions: o.rejecting_regions,
                message: o.message,
                promoted_index: o.promoted_index,
                purged: o
                    .purged
                    .into_iter()
                    .map(|p| pb::PurgedKey {
                        index: p.index,
                        demoted_unix_ms: p.demoted_unix_ms,
                        safe_unix_ms: p.safe_unix_ms,
                    })
                    .collect(),
                safe_unix_ms: o.safe_unix_ms,
                held_for_lifetime: o.held_for_lifetime,
            })
            .collect(),
    }
}

/// An event as `Watch` streams it.
fn event_of(e: Event) -> pb::Event {
    pb::Event {
        unix_ms: e.unix_ms,
        kind: e.kind,
        repository: e.repository,
        region: e.region,
        generation: e.generation,
        message: e.message,
        agent: e.agent,
    }
}

/// How long the leader search waits for each rotator.
const LEADER_PROBE_TIMEOUT: Duration = Duration::from_secs(3);
