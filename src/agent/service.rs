//! The gRPC face of the agent: `fernetd.v1.Distribution` (`Install`, `GetState`).
//! The transport refuses other callers before a body is read
//! ([`crate::tls::Authorization`]); handlers check again, route to
//! the named repository, and turn refusals into gRPC statuses; the work itself
//! lives in `managed`.

use std::collections::BTreeMap;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::check;
use super::managed::{Managed, Refusal};
use super::metrics::AgentMetrics;
use crate::error_chain;
use crate::pb;
use crate::tls;

/// The Distribution service of one agent.
pub struct Distribution {
    pub region: String,
    pub rotator_identity: String,
    /// Who may read `GetState`: the rotator and the configured monitors.
    pub readers: Vec<String>,
    pub repositories: BTreeMap<String, Arc<Managed>>,
    pub metrics: AgentMetrics,
    pub audit: Option<Arc<crate::audit::AuditLog>>,
}

impl Distribution {
    /// The metric label for a requested repository name. Unknown names are not
    /// used as labels: a client could otherwise create unbounded series.
    fn label<'a>(&self, name: &'a str) -> &'a str {
        if self.repositories.contains_key(name) {
            name
        } else {
            ""
        }
    }
}

/// The refusal of an Install for a repository this agent does not manage;
/// the keys it carried are wiped first.
fn unknown_repository(request: &mut pb::InstallRequest) -> Refusal {
    check::wipe(&mut request.keys);
    Refusal::UnknownRepository(request.repository.clone())
}

#[tonic::async_trait]
impl pb::distribution_server::Distribution for Distribution {
    async fn install(
        &self,
        request: Request<pb::InstallRequest>,
    ) -> Result<Response<pb::InstallResponse>, Status> {
        let name = request.get_ref().repository.clone();
        let generation = request.get_ref().generation;
        if let Err(status) = tls::authorize(
            &request,
            std::slice::from_ref(&self.rotator_identity),
            "rotator",
        ) {
            check::wipe(&mut request.into_inner().keys);
            self.metrics.refused(self.label(&name), "permission");
            // Debug-quoted: the name comes from the client.
            tracing::warn!(repository = ?name, generation, error = %status.message(), "install refused");
            return Err(status);
        }
        let mut request = request.into_inner();
        let outcome = match self.repositories.get(&name) {
            None => Err(unknown_repository(&mut request)),
            Some(repo) => repo.install(request).await,
        };
        // On disk before the rotator hears the answer.
        let entry = match &outcome {
            Ok(done) if !done.unchanged => Some(crate::audit::Entry {
                event: "install",
                generation: done.generation,
                digest: done.digest.to_hex(),
                keys: done.indices.clone(),
                outcome: "installed",
                ..Default::default()
            }),
            Ok(_) => None,
            Err(refusal) => Some(crate::audit::Entry {
                event: "refusal",
                generation,
                outcome: "refused",
                detail: format!("{}: {}", refusal.reason(), error_chain(refusal)),
                ..Default::default()
            }),
        };
        if let Some(entry) = entry {
            let entry = crate::audit::Entry {
                actor: self.rotator_identity.clone(),
                // Debug-quoted: the name comes from the client.
                repository: format!("{name:?}").trim_matches('"').to_owned(),
                ..entry
            };
            crate::audit::maybe_append(self.audit.as_ref(), entry).await;
        }
        match outcome {
            Ok(done) => Ok(Response::new(pb::InstallResponse {
                repository: name,
                generation: done.generation,
                digest: done.digest.0.to_vec(),
                canaries_valid: done.canaries_valid,
                indices: done.indices,
                unchanged: done.unchanged,
                install_micros: done.micros,
            })),
            Err(refusal) => {
                self.metrics.refused(self.label(&name), refusal.reason());
                tracing::warn!(
                    repository = ?name,
                    generation,
                    reason = refusal.reason(),
                    error = %error_chain(&refusal),
                    "install refused"
                );
                Err(refusal.to_status())
            }
        }
    }

    async fn get_state(
        &self,
        request: Request<pb::GetStateRequest>,
    ) -> Result<Response<pb::GetStateResponse>, Status> {
        // Also refused by the transport's authorization layer; kept here so the
        // service is safe wherever it is mounted.
        tls::authorize(&request, &self.readers, "rotator or monitor")?;
        let repositories = self
            .repositories
            .values()
            .map(|repo| {
                let view = repo.view();
                pb::RepositoryState {
                    name: repo.name.clone(),
                    generation: view.generation,
                    digest: view.digest.map(|d| d.0.to_vec()).unwrap_or_default(),
                    indices: view.indices,
                    last_install_unix_ms: view.last_install_unix_ms,
                    drift: view.drift.is_some(),
                    drift_detail: view.drift.unwrap_or_default(),
                    problem: view.problem.unwrap_or_default(),
                }
            })
            .collect();
        Ok(Response::new(pb::GetStateResponse {
            region: self.region.clone(),
            repositories,
            version: crate::VERSION.to_string(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_keys_of_an_install_for_an_unknown_repository_are_wiped() {
        let set = crate::repository::init(3).expect("init");
        let mut request = pb::InstallRequest {
            repository: "nobody-manages-this".into(),
            generation: 1,
            keys: check::to_wire(&set),
            ..Default::default()
        };
        assert!(
            request
                .keys
                .iter()
                .any(|k| k.material.iter().any(|b| *b != 0))
        );
        let refusal = unknown_repository(&mut request);
        assert_eq!(refusal.reason(), "unknown_repository");
        assert!(
            request
                .keys
                .iter()
                .all(|k| k.material.iter().all(|b| *b == 0)),
            "key bytes left in memory"
        );
    }
}
