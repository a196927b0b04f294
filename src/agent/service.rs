//! The gRPC face of the agent: `fernetd.v1.Distribution` (`Install`, `GetState`,
//! `MigrateCredentials`).
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
use super::readiness::Readiness;
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
    /// How to run Keystone's credential migrate; None without `[credential]`.
    pub migrator: Option<super::credential::Migrator>,
    /// One migrate at a time: two would race on the same rows.
    pub migrating: tokio::sync::Mutex<()>,
    /// Opened by the rotator's installs and confirmations.
    pub readiness: Arc<Readiness>,
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

impl Distribution {
    /// The current generations a reconcile's `GetState` names: from the
    /// rotator's identity, each one this agent holds on disk (same number and
    /// digest, no drift) confirms it; a monitor's, or any other caller's, is
    /// ignored, so no certificate but the rotator's can open the gate.
    fn confirmations(&self, request: &Request<pb::GetStateRequest>) {
        let current = &request.get_ref().current;
        if current.is_empty() {
            return;
        }
        if tls::authorize(
            request,
            std::slice::from_ref(&self.rotator_identity),
            "rotator",
        )
        .is_err()
        {
            let peer = tls::peer_identity(request)
                .map(|p| p.to_string())
                .unwrap_or_default();
            tracing::warn!(%peer, "GetState names current generations but does not come from the rotator: not a confirmation");
            return;
        }
        for name in self.repositories.keys() {
            if !current.iter().any(|c| &c.name == name) {
                self.readiness.rotator_lacks(name);
            }
        }
        for named in current {
            let Some(repo) = self.repositories.get(&named.name) else {
                continue;
            };
            let view = repo.view();
            match view.digest {
                Some(digest)
                    if view.generation == named.generation
                        && digest.0[..] == named.digest[..]
                        && view.drift.is_none() =>
                {
                    self.readiness
                        .confirmed(&repo.name, named.generation, digest, "confirmation")
                }
                _ => self.readiness.rotator_named(&repo.name, named.generation),
            }
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
            Ok(done) => {
                // Only the rotator's identity gets here: what it installs or
                // re-pushes is its current generation.
                self.readiness.confirmed(
                    &name,
                    done.generation,
                    done.digest,
                    if done.unchanged { "re-push" } else { "install" },
                );
                Ok(Response::new(pb::InstallResponse {
                    repository: name,
                    generation: done.generation,
                    digest: done.digest.0.to_vec(),
                    canaries_valid: done.canaries_valid,
                    indices: done.indices,
                    unchanged: done.unchanged,
                    install_micros: done.micros,
                }))
            }
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

    async fn migrate_credentials(
        &self,
        request: Request<pb::MigrateCredentialsRequest>,
    ) -> Result<Response<pb::MigrateCredentialsResponse>, Status> {
        tls::authorize(
            &request,
            std::slice::from_ref(&self.rotator_identity),
            "rotator",
        )?;
        let request = request.into_inner();
        let Some(migrator) = &self.migrator else {
            return Err(Status::failed_precondition(
                "this agent has no [credential] keystone_manage: it cannot migrate credentials",
            ));
        };
        let Some(repo) = self.repositories.get(&request.repository) else {
            return Err(Status::not_found(format!(
                "repository {:?} is not managed by this agent",
                request.repository
            )));
        };
        let _one = self.migrating.lock().await;
        // Migrating re-encrypts under this region's primary: only the one the
        // rotator means, or rows would move to a key other regions may lack.
        let view = repo.view();
        let digest = view.digest.map(|d| d.0.to_vec()).unwrap_or_default();
        if view.generation != request.generation || digest != request.digest || view.drift.is_some()
        {
            return Err(Status::failed_precondition(format!(
                "this agent holds generation {} of `{}`{}, not generation {}: migrating now would encrypt under another primary key",
                view.generation,
                repo.name,
                if view.drift.is_some() {
                    " with drift"
                } else {
                    ""
                },
                request.generation
            )));
        }
        let started = std::time::Instant::now();
        let report = migrator.migrate().await;
        let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let rows = |r: &Option<pb::CredentialRows>| {
            r.as_ref().map_or_else(
                || "unknown".to_owned(),
                |r| {
                    format!(
                        "{} rows: {} primary, {} other, {} all-zero, {} undecryptable",
                        r.total, r.primary, r.other, r.null_key, r.undecryptable
                    )
                },
            )
        };
        let detail = format!(
            "before: {}; after: {}{}",
            rows(&report.before),
            rows(&report.after),
            report
                .failure
                .as_ref()
                .map(|f| format!("; {f}"))
                .unwrap_or_default()
        );
        match &report.failure {
            None => {
                tracing::info!(repository = %repo.name, generation = request.generation, micros, %detail, "credentials migrated")
            }
            Some(_) => {
                tracing::warn!(repository = %repo.name, generation = request.generation, micros, %detail, "credential migrate failed")
            }
        }
        let entry = crate::audit::Entry {
            actor: self.rotator_identity.clone(),
            event: "credential_migrate",
            repository: repo.name.clone(),
            region: self.region.clone(),
            generation: request.generation,
            digest: hex::encode(&request.digest),
            outcome: if report.failure.is_none() {
                "passed"
            } else {
                "failed"
            },
            detail,
            ..Default::default()
        };
        crate::audit::maybe_append(self.audit.as_ref(), entry).await;
        Ok(Response::new(pb::MigrateCredentialsResponse {
            passed: report.failure.is_none(),
            reason: report.failure.unwrap_or_default(),
            before: report.before,
            after: report.after,
            micros,
        }))
    }

    async fn get_state(
        &self,
        request: Request<pb::GetStateRequest>,
    ) -> Result<Response<pb::GetStateResponse>, Status> {
        // Also refused by the transport's authorization layer; kept here so the
        // service is safe wherever it is mounted.
        tls::authorize(&request, &self.readers, "rotator or monitor")?;
        self.confirmations(&request);
        let readiness = self.readiness.reason().as_str();
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
                    confirmed: self.readiness.is_confirmed(&repo.name),
                    readiness: readiness.to_owned(),
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
