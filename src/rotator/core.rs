//! The rotator's shared state and its operations: the current generation of each
//! repository, what each agent holds, the safety rule that gates a rotation, and
//! the events it emits. The Admin service, the scheduler, the metrics and the
//! fan-out dispatcher all act through [`Core`]; its fields stay private to the
//! rotator's modules.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use super::RotatorError;
use super::credential::{Gate, MigrateRecord};
use super::fleet::{AgentSlot, Enrolment, Fleet, Plan, plan};
use super::ledger::{
    Ledger, QUARANTINE, QuarantineRecord, Quarantined, Unsafe, possible_signing_keys,
};
use super::metrics::Metrics;
use super::state::{AckRecord, Acks};
use super::store::{CREDENTIAL_MIGRATE, EMERGENCY_PURGE, EmergencyPurge, Store, StoreError};
use super::types::{
    AgentId, Answer, Blocked, Event, Generation, Held, Outcome, PurgeOrder, Purged, RepoId,
    RepoSlot, Report, RotateOrder, now_ms, rfc3339,
};
use crate::config::{AgentEndpoint, CREDENTIAL_REPOSITORY, FanoutConfig, RepoKind};
use crate::repository::{self, Digest, KeySet};

/// One repository's rotation: the outcome the admin is shown and, when a
/// purge-safe time holds it, why, so the scheduler records it without reading
/// the message.
pub(super) struct Rotation {
    pub(super) outcome: Outcome,
    pub(super) hold: Option<String>,
}

impl Rotation {
    /// An outcome that is not held.
    fn shown(outcome: Outcome) -> Self {
        Rotation {
            outcome,
            hold: None,
        }
    }
}

/// Everything the rotator knows, shared by its tasks.
pub(super) struct Core {
    pub(super) repos: Vec<RepoSlot>,
    /// The enrolled agents and the dispatcher's queues.
    pub(super) fleet: Fleet,
    /// Where every durable write goes (files, or etcd under `[ha]`), chosen at start.
    pub(super) store: Store,
    pub(super) fanout: FanoutConfig,
    pub(super) metrics: Metrics,
    /// Token expiration + `allow_expired_window` + token cache time: how long
    /// after its last token a key must stay in every region.
    pub(super) key_lifetime: Duration,
    pub(super) audit: Option<Arc<crate::audit::AuditLog>>,
    /// The credential repository's migrate gate (`credential.rs`), if any.
    pub(super) credential: Option<Gate>,
    events: broadcast::Sender<Event>,
    progress: watch::Sender<u64>,
    pub(super) rotation: tokio::sync::Mutex<()>,
    pub(super) acks_dirty: AtomicBool,
}

impl Core {
    pub(super) fn new(
        repos: Vec<RepoSlot>,
        agents: Vec<AgentSlot>,
        store: Store,
        fanout: FanoutConfig,
        metrics: Metrics,
        key_lifetime: Duration,
    ) -> Self {
        let core = Core {
            repos,
            fleet: Fleet::new(agents, &fanout),
            store,
            fanout,
            metrics,
            key_lifetime,
            audit: None,
            credential: None,
            events: broadcast::channel(1024).0,
            progress: watch::channel(0).0,
            rotation: tokio::sync::Mutex::new(()),
            acks_dirty: AtomicBool::new(false),
        };
        for repo in &core.repos {
            core.metrics
                .set_generation(&repo.name, repo.current().number);
            core.metrics.set_blocked(&repo.name, false);
        }
        core
    }

    /// Enrolled agent `i`; `None` once a reload removed it.
    pub(super) fn agent(&self, i: AgentId) -> Option<Arc<AgentSlot>> {
        self.fleet.agents.get(i)
    }

    /// Every managed repository, with its slot.
    pub(super) fn repos(&self) -> impl Iterator<Item = (RepoId, &RepoSlot)> {
        self.repos
            .iter()
            .enumerate()
            .map(|(r, repo)| (RepoId(r), repo))
    }

    /// Restores what agents acknowledged before a restart. Only a hint: it
    /// counts for the safety rule once the agent was read back (`restored`).
    pub(super) fn restore_acks(&self, acks: &Acks) {
        for (r, repo) in self.repos() {
            let Some(by_region) = acks.get(&repo.name) else {
                continue;
            };
            for (_, agent) in self.fleet.agents.snapshot().iter() {
                if let Some(rec) = by_region.get(&agent.name) {
                    agent.lock().held[r] = Held {
                        generation: rec.generation,
                        digest: Digest::from_hex(&rec.digest),
                        unix_ms: rec.unix_ms,
                        drift: false,
                        restored: true,
                    };
                }
            }
        }
    }

    /// Writes acknowledgements when they changed since the last call.
    pub(super) async fn flush_acks(self: &Arc<Self>) {
        if !self.acks_dirty.swap(false, Ordering::AcqRel) {
            return;
        }
        let mut acks = Acks::new();
        for (r, repo) in self.repos() {
            let by_region = acks.entry(repo.name.clone()).or_default();
            for (_, agent) in self.fleet.agents.snapshot().iter() {
                let held = agent.lock().held[r];
                if let Some(digest) = held.digest {
                    by_region.insert(
                        agent.name.clone(),
                        AckRecord {
                            generation: held.generation,
                            digest: digest.to_hex(),
                            unix_ms: held.unix_ms,
                        },
                    );
                }
            }
        }
        if let Err(e) = self.store.save_acks(acks).await {
            self.acks_dirty.store(true, Ordering::Release);
            tracing::warn!(error = %crate::error_chain(&e), "cannot record acknowledgements");
        }
    }

    /// Takes what the store holds now: the generations and ledgers another
    /// rotator committed (a standby following the leader, a new term), the
    /// acknowledgements, and the last credential migrate.
    pub(super) async fn refresh(&self) -> Result<(), StoreError> {
        for (r, repo) in self.repos() {
            let Some((committed, ledger)) = self.store.load(&repo.name).await? else {
                continue;
            };
            if committed.generation == repo.current().number {
                continue;
            }
            let emergency = self
                .store
                .marked_emergency(&repo.name, committed.generation)
                .await;
            let Ok((generation, ledger, _)) =
                super::store::generation_of(&repo.name, committed, ledger, emergency)
            else {
                continue;
            };
            tracing::debug!(repository = %repo.name, generation = generation.number, "following the store");
            self.adopt_committed(r, generation, ledger);
        }
        let acks = self.store.load_acks().await?;
        self.restore_acks(&acks);
        self.load_quarantine().await?;
        self.refresh_credential_record().await
    }

    /// Makes the enrolled agents those of `wanted` (`enrol::plan`); the first
    /// slot `connect` cannot build is returned and nothing changes. Runs
    /// between rotations, so a safety check never sees half of it.
    pub(super) async fn enrol(
        &self,
        wanted: &[AgentEndpoint],
        connect: impl Fn(&AgentEndpoint) -> Result<AgentSlot, RotatorError>,
    ) -> Result<Enrolment, RotatorError> {
        let _between_rotations = self.rotation.lock().await;
        let Plan {
            change,
            retire,
            add,
        } = plan(&self.fleet.agents.snapshot(), wanted, connect)?;
        if change.is_empty() {
            return Ok(change);
        }
        let added = self.fleet.agents.replace(&retire, add);
        for (_, repo) in self.repos() {
            repo.reset_demotion_cursor();
        }
        self.acks_dirty.store(true, Ordering::Release);
        for i in added {
            self.fleet.enqueue(i, true);
        }
        // A removed agent may have been the one blocking: let the scheduler
        // and `wait_in_sync` look again.
        self.refresh_blocked();
        self.bump_progress();
        Ok(change)
    }

    pub(super) fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    pub(super) fn progress(&self) -> watch::Receiver<u64> {
        self.progress.subscribe()
    }

    pub(super) fn emit(
        &self,
        kind: &str,
        repository: &str,
        agent: Option<&AgentSlot>,
        generation: u64,
        message: String,
    ) {
        let _ = self.events.send(Event {
            unix_ms: now_ms(),
            kind: kind.to_owned(),
            repository: repository.to_owned(),
            region: agent.map(|a| a.region.clone()).unwrap_or_default(),
            generation,
            message,
            agent: agent.map(|a| a.name.clone()).unwrap_or_default(),
        });
    }

    /// Announces a reload's change of one agent to `Watch` clients.
    pub(super) fn emit_enrolment(&self, agent: &AgentSlot, outcome: &str) {
        self.emit(
            "enrolment",
            "",
            Some(agent),
            0,
            format!("{outcome} by a configuration reload ({})", agent.endpoint),
        );
    }

    pub(super) fn bump_progress(&self) {
        self.progress.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Whether agent `i` holds `generation` of repository `r` (same number and digest).
    /// A reason not to push: the agent holds a newer generation than the
    /// rotator (lost rotator state, or a second rotator), or the same number with
    /// other keys. Pushing would be refused; an operator must look.
    pub(super) fn agent_ahead(
        &self,
        i: AgentId,
        r: RepoId,
        generation: &Generation,
    ) -> Option<String> {
        let held = self.agent(i)?.lock().held[r];
        if held.generation > generation.number {
            Some(format!(
                "agent holds generation {} of `{}`, newer than the rotator's {} (lost rotator state, a second rotator, or tampering): restore the rotator's state or restore the agent",
                held.generation, self.repos[r].name, generation.number
            ))
        } else if held.generation == generation.number
            && held.digest.is_some_and(|d| d != generation.digest)
        {
            Some(format!(
                "agent holds generation {} of `{}` with another digest (fork)",
                held.generation, self.repos[r].name
            ))
        } else {
            None
        }
    }

    fn record_held(&self, i: AgentId, r: RepoId, held: Held) {
        // A call that was in flight when a reload removed its agent.
        let Some(agent) = self.agent(i) else {
            return;
        };
        let agent = &*agent;
        let repo = &self.repos[r];
        let current = repo.current();
        let now_holds =
            held.generation == current.number && held.digest == Some(current.digest) && !held.drift;
        let previously = std::mem::replace(&mut agent.lock().held[r], held);
        self.acks_dirty.store(true, Ordering::Release);
        if previously.unix_ms == 0
            && let Some(log) = self.audit.clone()
        {
            // First seen by this rotator (never acknowledged in its state).
            let entry = crate::audit::Entry {
                actor: "rotator".into(),
                event: "enrolment",
                repository: repo.name.clone(),
                agent: agent.name.clone(),
                region: agent.region.clone(),
                generation: held.generation,
                digest: held.digest.map(|d| d.to_hex()).unwrap_or_default(),
                outcome: "seen",
                ..Default::default()
            };
            tokio::spawn(async move { crate::audit::maybe_append(Some(&log), entry).await });
        }
        if now_holds
            && (previously.generation != held.generation || previously.digest != held.digest)
        {
            tracing::info!(agent = %agent.name, region = %agent.region, repository = %repo.name, generation = held.generation, "agent acknowledged");
            self.emit(
                "acknowledged",
                &repo.name,
                Some(agent),
                held.generation,
                String::new(),
            );
        }
        self.bump_progress();
    }

    /// Learns from an agent's `GetState` answer what it holds.
    pub(super) fn observe_state(&self, i: AgentId, state: &Report) -> Result<(), String> {
        let Some(agent) = self.agent(i) else {
            return Ok(());
        };
        let agent = &*agent;
        if state.region != agent.region {
            return Err(format!(
                "agent at {} answers as region `{}`, enrolled as `{}`",
                agent.endpoint, state.region, agent.region
            ));
        }
        for (r, repo) in self.repos() {
            let Some(rs) = state.repositories.iter().find(|s| s.name == repo.name) else {
                return Err(format!("agent does not manage repository `{}`", repo.name));
            };
            if rs.drift && !agent.lock().held[r].drift {
                tracing::warn!(agent = %agent.name, region = %agent.region, repository = %repo.name, "agent reports drift: {}", rs.drift_detail);
                self.emit(
                    "drift",
                    &repo.name,
                    Some(agent),
                    rs.generation,
                    rs.drift_detail.clone(),
                );
            }
            self.record_held(
                i,
                r,
                Held {
                    generation: rs.generation,
                    digest: Digest::from_slice(&rs.digest),
                    unix_ms: now_ms(),
                    drift: rs.drift,
                    restored: false,
                },
            );
        }
        Ok(())
    }

    /// Checks an Install answer against what was sent and records the acknowledgement.
    pub(super) fn observe_install(
        &self,
        i: AgentId,
        r: RepoId,
        generation: &Generation,
        response: &Answer,
    ) -> Result<(), String> {
        let digest = Digest::from_slice(&response.digest);
        if response.generation != generation.number || digest != Some(generation.digest) {
            return Err(format!(
                "agent answered generation {} digest {} for generation {} digest {}",
                response.generation,
                digest.map(|d| d.to_hex()).unwrap_or_default(),
                generation.number,
                generation.digest
            ));
        }
        if !response.canaries_valid {
            return Err(format!(
                "agent installed generation {} but could not decrypt the canaries",
                generation.number
            ));
        }
        self.record_held(
            i,
            r,
            Held {
                generation: generation.number,
                digest,
                unix_ms: now_ms(),
                drift: false,
                restored: false,
            },
        );
        Ok(())
    }

    /// Regions that do not hold `generation` of repository `r`, quarantined
    /// agents apart (they do not block).
    fn regions_missing(&self, r: RepoId, generation: &Generation) -> Vec<String> {
        let applies = self.repos[r].kind.signs_tokens();
        self.fleet
            .agents
            .snapshot()
            .iter()
            .filter(|(_, a)| a.blocks(r, generation, applies))
            .map(|(_, a)| a.label())
            .collect()
    }

    /// Whether repository `r` may rotate now under the safety rule.
    pub(super) fn may_rotate(&self, r: RepoId) -> bool {
        let current = self.repos[r].current();
        let applies = self.repos[r].kind.signs_tokens();
        self.fleet
            .agents
            .snapshot()
            .iter()
            .all(|(_, a)| !a.blocks(r, &current, applies))
    }

    /// Rotates the selected repositories (all when `request.repositories` is
    /// empty), one after another, and waits for acknowledgements unless told not to.
    pub(super) async fn rotate(
        self: &Arc<Self>,
        request: &RotateOrder,
        actor: &str,
        shutdown: CancellationToken,
    ) -> Result<Vec<Outcome>, RotatorError> {
        let outcomes = self
            .rotations(request, actor, shutdown)
            .await?
            .into_iter()
            .map(|r| r.outcome)
            .collect();
        Ok(outcomes)
    }

    /// [`Core::rotate`], each outcome with why it was held (typed).
    async fn rotations(
        self: &Arc<Self>,
        request: &RotateOrder,
        actor: &str,
        shutdown: CancellationToken,
    ) -> Result<Vec<Rotation>, RotatorError> {
        let selected = self.select(&request.repositories)?;
        // Commits (state saved, then taken into memory) run in a task of their
        // own: a cancelled Admin call must not leave a save running beside the
        // next rotation, nor a saved generation that memory never took.
        let this = Arc::clone(self);
        let (force, dry_run) = (request.force, request.dry_run);
        let actor = actor.to_owned();
        let (mut outcomes, committed) = tokio::spawn(async move {
            let _one_at_a_time = this.rotation.lock().await;
            let mut outcomes = Vec::with_capacity(selected.len());
            let mut committed = Vec::new();
            for r in selected {
                let rotation = this.rotate_one(r, force, dry_run).await?;
                if !dry_run {
                    this.audit_outcome(&actor, "rotation", force, &rotation.outcome)
                        .await;
                }
                if rotation.outcome.rotated {
                    committed.push((r, outcomes.len()));
                }
                outcomes.push(rotation);
            }
            Ok::<_, RotatorError>((outcomes, committed))
        })
        .await
        .map_err(|e| RotatorError::Task(e.to_string()))??;
        if !request.no_wait && !request.dry_run && !committed.is_empty() {
            let wait = match request.wait_ms {
                0 => self.fanout.ack_wait,
                ms => Duration::from_millis(ms),
            };
            let repos: Vec<RepoId> = committed.iter().map(|(r, _)| *r).collect();
            self.wait_in_sync(&repos, wait, false, shutdown).await;
            for (r, o) in committed {
                let generation = self.repos[r].current();
                if generation.number == outcomes[o].outcome.generation {
                    outcomes[o].outcome.pending_regions = self.regions_missing(r, &generation);
                }
            }
        }
        Ok(outcomes)
    }

    fn select(&self, names: &[String]) -> Result<Vec<RepoId>, RotatorError> {
        if names.is_empty() {
            // "All" never includes the credential repository: it is named or left alone.
            return Ok(self
                .repos()
                .filter(|(_, repo)| repo.kind.signs_tokens())
                .map(|(r, _)| r)
                .collect());
        }
        names
            .iter()
            .map(|n| {
                self.repos()
                    .find(|(_, repo)| &repo.name == n)
                    .map(|(r, _)| r)
                    .ok_or_else(|| RotatorError::UnknownRepository(n.clone()))
            })
            .collect()
    }

    async fn rotate_one(
        &self,
        r: RepoId,
        force: bool,
        dry_run: bool,
    ) -> Result<Rotation, RotatorError> {
        let repo = &self.repos[r];
        let current = repo.current();
        let mut outcome = self.outcome_of(r, &current);
        if let Some(blocked) = self.check_safety_rule(r, &current, force, dry_run, &mut outcome) {
            return Ok(Rotation::shown(blocked));
        }
        // The credential repository: a migrate, not the key ledger, makes its purge safe.
        let credential = repo.kind == RepoKind::Credential;
        if let Some(refused) = self.credential_gate(r, &current, dry_run, &outcome).await? {
            return Ok(refused);
        }
        let missing = std::mem::take(&mut outcome.pending_regions);
        let pinned = repo.quarantine().pinned(now_ms());
        let next_keys = repository::rotate_keeping(&current.keys, repo.max_active_keys, &pinned)?;
        if next_keys.len() > repo.max_active_keys {
            // Pins are kept in addition to max_active_keys: Keystone loads
            // every key file whatever their number.
            tracing::warn!(repository = %repo.name, keys = next_keys.len(), max_active_keys = repo.max_active_keys, pinned = ?pinned, "keys pinned for quarantined agents are kept beyond max_active_keys");
        }
        let next_number = current.number + 1;
        if force {
            outcome.rejecting_regions = missing.clone();
        }
        // The key-lifetime rule holds for every path, `--force` included: a key is
        // purged only once no valid token can need it.
        self.note_demotions(r);
        let now = now_ms();
        let (purges, unsafe_) =
            repo.ledger()
                .check_purge(&current.keys, &next_keys, self.key_lifetime, now);
        let unsafe_ = unsafe_.filter(|_| !credential);
        outcome.promoted_index = next_keys.primary_index().unwrap_or(0);
        outcome.purged = purges
            .iter()
            .map(|p| Purged {
                index: p.index,
                demoted_unix_ms: p.demoted_ms.unwrap_or(0),
                safe_unix_ms: p.safe_ms.unwrap_or(0),
            })
            .collect();
        if let Some(unsafe_) = unsafe_ {
            return Ok(self.held(r, &current, &unsafe_, dry_run, outcome));
        }
        if dry_run {
            outcome.generation = next_number;
            outcome.digest.clear();
            outcome.indices = next_keys.indices();
            outcome.message = format!(
                "dry run: would commit generation {next_number} with indices {:?}, promoting key {}{}{}",
                next_keys.indices(),
                outcome.promoted_index,
                purge_note(&purges, now),
                rejecting_note(&missing, force)
            );
            return Ok(Rotation::shown(outcome));
        }
        let next = self.commit(r, &current, next_keys, now, false).await?;
        self.announce(r, &next, &mut outcome, &purges, &missing, force);
        self.publish(r, next);
        Ok(Rotation::shown(outcome))
    }

    /// A rotation the key-lifetime rule holds: why, until when, announced
    /// unless a dry run.
    fn held(
        &self,
        r: RepoId,
        current: &Generation,
        unsafe_: &Unsafe,
        dry_run: bool,
        mut outcome: Outcome,
    ) -> Rotation {
        let repo = &self.repos[r];
        let reason = self.held_reason(r, current, unsafe_);
        outcome.held_for_lifetime = true;
        outcome.safe_unix_ms = unsafe_.safe_ms().unwrap_or(0);
        outcome.message = if dry_run {
            format!("dry run: would be held: {reason}")
        } else {
            format!("held: {reason}")
        };
        if !dry_run {
            tracing::warn!(repository = %repo.name, key = unsafe_.index(), "rotation held: {reason}");
            self.emit("held", &repo.name, None, current.number, reason.clone());
        }
        Rotation {
            outcome,
            hold: Some(reason),
        }
    }

    /// Fills `outcome` with the committed generation `next`, logs and
    /// announces it.
    fn announce(
        &self,
        r: RepoId,
        next: &Generation,
        outcome: &mut Outcome,
        purges: &[super::ledger::Purge],
        missing: &[String],
        force: bool,
    ) {
        let repo = &self.repos[r];
        outcome.generation = next.number;
        outcome.digest = next.digest.0.to_vec();
        outcome.indices = next.keys.indices();
        outcome.rotated = true;
        outcome.message = format!(
            "committed generation {}{}",
            next.number,
            rejecting_note(missing, force)
        );
        tracing::info!(
            repository = %repo.name,
            generation = next.number,
            digest = %next.digest,
            indices = ?outcome.indices,
            promoted = outcome.promoted_index,
            purged = ?purges.iter().map(|p| p.index).collect::<Vec<_>>(),
            forced = force && !missing.is_empty(),
            "rotated"
        );
        if force && !missing.is_empty() {
            tracing::warn!(
                repository = %repo.name,
                "forced rotation: {} will reject tokens made with the new primary until they catch up",
                missing.join(", ")
            );
        }
        self.emit(
            "rotated",
            &repo.name,
            None,
            next.number,
            outcome.message.clone(),
        );
    }

    /// Records what a rotation or purge did in the audit log, on disk before
    /// the caller is answered.
    async fn audit_outcome(&self, actor: &str, event: &'static str, force: bool, o: &Outcome) {
        let outcome = match (o.rotated, o.held_for_lifetime) {
            (true, _) if force && !o.rejecting_regions.is_empty() => "forced",
            (true, _) => "committed",
            (false, true) => "held",
            (false, false) => "blocked",
        };
        let entry = crate::audit::Entry {
            actor: actor.to_owned(),
            event,
            repository: o.repository.clone(),
            generation: o.generation,
            digest: hex::encode(&o.digest),
            keys: o.indices.clone(),
            outcome,
            detail: o.message.clone(),
            ..Default::default()
        };
        crate::audit::maybe_append(self.audit.as_ref(), entry).await;
    }

    /// An outcome that describes the current generation of `r`, unchanged.
    fn outcome_of(&self, r: RepoId, current: &Generation) -> Outcome {
        Outcome {
            repository: self.repos[r].name.clone(),
            generation: current.number,
            digest: current.digest.0.to_vec(),
            indices: current.keys.indices(),
            ..Default::default()
        }
    }

    /// The safety rule: `Some(outcome)` when the change is blocked because an
    /// agent does not hold `current` (recorded unless `dry_run`); otherwise the
    /// lagging regions are left in `outcome.pending_regions` for `--force`.
    fn check_safety_rule(
        &self,
        r: RepoId,
        current: &Generation,
        force: bool,
        dry_run: bool,
        outcome: &mut Outcome,
    ) -> Option<Outcome> {
        let repo = &self.repos[r];
        let missing = self.regions_missing(r, current);
        if missing.is_empty() || force {
            outcome.pending_regions = missing;
            return None;
        }
        let reason = format!(
            "{} of {} agents have not acknowledged generation {}: {}",
            missing.len(),
            self.fleet.agents.len(),
            current.number,
            missing.join(", ")
        );
        let mut blocked = outcome.clone();
        blocked.message = format!("blocked: {reason}");
        blocked.pending_regions = missing.clone();
        if !dry_run {
            let was_blocked = repo.blocked().is_some();
            repo.set_blocked(Some(Blocked {
                reason: reason.clone(),
                regions: missing,
                until_ms: None,
            }));
            self.metrics.set_blocked(&repo.name, true);
            if !was_blocked {
                tracing::warn!(repository = %repo.name, "rotation blocked: {reason}");
            }
            self.emit("blocked", &repo.name, None, current.number, reason);
        }
        Some(blocked)
    }

    /// Why purging `unsafe_` now would break a valid token, in the operator's words.
    fn held_reason(&self, r: RepoId, current: &Generation, unsafe_: &Unsafe) -> String {
        let name = &self.repos[r].name;
        match unsafe_ {
            Unsafe::StillPrimary { index } => format!(
                "rotating `{name}` would purge key {index}, which may still be primary in a region: \
                 it becomes purge-safe {} after every region holds generation {} (see status)",
                crate::config::duration::format(&self.key_lifetime),
                current.number
            ),
            Unsafe::TooYoung {
                index,
                demoted_ms,
                safe_ms,
            } => format!(
                "rotating `{name}` would purge key {index}, whose last tokens (issued up to {}) may be \
                 valid until {}, its purge-safe time; the next rotation of `{name}` can happen then",
                rfc3339(*demoted_ms),
                rfc3339(*safe_ms)
            ),
        }
    }

    /// Durably commits `next_keys` as the generation after `current` (ledger,
    /// then state: what an agent may hold is on disk before anything is sent).
    async fn commit(
        &self,
        r: RepoId,
        current: &Generation,
        next_keys: KeySet,
        now: i64,
        emergency_purge: bool,
    ) -> Result<Generation, RotatorError> {
        let repo = &self.repos[r];
        let mut ledger = repo.ledger().clone();
        ledger.record_commit(&current.keys, &next_keys, now);
        let next = Generation::build_with(
            &repo.name,
            current.number + 1,
            next_keys,
            ledger.promoted_unix(),
            emergency_purge,
        )?;
        let committed = self
            .store
            .commit(&repo.name, &ledger, &next.committed())
            .await;
        if committed.as_ref().is_err_and(StoreError::is_fork) {
            // The store holds this generation with other keys (an earlier
            // commit of ours landed unanswered): take what it holds, so the
            // next rotation continues from there instead of forking again.
            if let Err(e) = self.refresh().await {
                tracing::warn!(error = %crate::error_chain(&e), "cannot read the committed state back");
            }
            self.fleet.push_all();
        }
        committed?;
        *repo.ledger() = ledger;
        Ok(next)
    }

    /// Makes a committed generation current and sends it to every agent.
    fn publish(&self, r: RepoId, next: Generation) {
        let repo = &self.repos[r];
        let number = next.number;
        repo.set_current(next);
        repo.demotion_cursor.store(0, Ordering::Release);
        repo.set_blocked(None);
        repo.overdue.store(false, Ordering::Release);
        self.metrics.set_blocked(&repo.name, false);
        self.metrics.set_generation(&repo.name, number);
        self.metrics.count_rotation(&repo.name);
        // With no agent enrolled, every agent holds it at once.
        self.note_demotions(r);
        self.bump_progress();
        self.fleet.push_all();
    }

    /// Records in the ledger that keys of `r` stopped being primary everywhere,
    /// once every agent holds the current generation. Cheap when nothing is
    /// pending, so it runs on every flush tick and before every rotation.
    pub(super) fn note_demotions(&self, r: RepoId) {
        let repo = &self.repos[r];
        let current = repo.current();
        let primary = current.keys.primary_index();
        let pending = repo
            .ledger()
            .keys
            .iter()
            .any(|(index, t)| Some(*index) != primary && t.demoted_ms.is_none());
        if pending && self.all_hold_current(r) && repo.ledger().record_all_hold(primary, now_ms()) {
            repo.ledger_dirty.store(true, Ordering::Release);
        }
    }

    /// Whether every agent holds the current generation of `r`, checked from
    /// where the last check found the first agent behind: acknowledgements
    /// arrive in dispatch order, so the checks of one fan-out cost O(agents) in
    /// all rather than per acknowledgement. A full pass confirms before `true`.
    fn all_hold_current(&self, r: RepoId) -> bool {
        let repo = &self.repos[r];
        let current = repo.current();
        let start = repo.demotion_cursor.load(Ordering::Acquire);
        let agents = self.fleet.agents.snapshot();
        let applies = repo.kind.signs_tokens();
        if let Some((i, _)) = agents
            .iter_from(AgentId(start))
            .find(|(_, a)| a.blocks(r, &current, applies))
        {
            repo.demotion_cursor.store(i.0, Ordering::Release);
            return false;
        }
        if self.may_rotate(r) {
            return true;
        }
        repo.demotion_cursor.store(0, Ordering::Release);
        false
    }

    /// Writes the ledgers that changed since the last call. A demotion written
    /// late only makes keys live longer, so this may lag by a flush interval.
    pub(super) async fn flush_ledgers(&self) {
        for (r, repo) in self.repos() {
            self.note_demotions(r);
            if !repo.ledger_dirty.swap(false, Ordering::AcqRel) {
                continue;
            }
            let ledger = repo.ledger().clone();
            let generation = repo.current().number;
            if self
                .store
                .save_ledger(&repo.name, generation, &ledger)
                .await
                .is_err()
            {
                repo.ledger_dirty.store(true, Ordering::Release);
                tracing::warn!(repository = %repo.name, "cannot record the key ledger; retrying");
            }
        }
    }

    /// When the next rotation of `r` would purge no key a valid token may need
    /// (Unix ms): 0 when that is now, or when it purges nothing.
    pub(super) fn purge_safe_ms(&self, r: RepoId) -> i64 {
        let repo = &self.repos[r];
        let current = repo.current();
        let pinned = repo.quarantine().pinned(now_ms());
        let Ok(next) = repository::rotate_keeping(&current.keys, repo.max_active_keys, &pinned)
        else {
            return 0;
        };
        if repo.kind == RepoKind::Credential {
            return 0;
        }
        let now = now_ms();
        let (purges, _) = repo
            .ledger()
            .check_purge(&current.keys, &next, self.key_lifetime, now);
        purges
            .iter()
            .map(|p| p.safe_ms.unwrap_or(i64::MAX))
            .max()
            .filter(|safe| *safe > now)
            .unwrap_or(0)
    }

    /// The emergency path for a compromised key: a new generation without key
    /// `index` of `repository`, committed now whatever the key-lifetime rule says
    /// (every token it signed stops validating), and distributed like any other.
    /// A compromised primary is replaced by the staged key, a compromised staged
    /// key by a new one.
    pub(super) async fn purge_key(
        self: &Arc<Self>,
        request: &PurgeOrder,
        actor: &str,
        shutdown: CancellationToken,
    ) -> Result<Vec<Outcome>, RotatorError> {
        let r = *self
            .select(std::slice::from_ref(&request.repository))?
            .first()
            .ok_or_else(|| RotatorError::UnknownRepository(request.repository.clone()))?;
        let outcome = {
            let _one_at_a_time = self.rotation.lock().await;
            let repo = &self.repos[r];
            let current = repo.current();
            let index = request.index;
            let Some(next_keys) =
                repository::without_key(&current.keys, index, repository::Key::generate())
            else {
                return Err(RotatorError::UnknownKey {
                    repository: repo.name.clone(),
                    index,
                    indices: current.keys.indices(),
                });
            };
            let mut outcome = self.outcome_of(r, &current);
            if let Some(blocked) =
                self.check_safety_rule(r, &current, request.force, false, &mut outcome)
            {
                self.audit_outcome(actor, "purge", request.force, &blocked)
                    .await;
                return Ok(vec![blocked]);
            }
            let missing = std::mem::take(&mut outcome.pending_regions);
            let primary = current.keys.primary_index();
            let now = now_ms();
            self.note_demotions(r);
            let times = repo.ledger().keys.get(&index).copied().unwrap_or_default();
            let range = invalidated_range(
                &times,
                index == 0,
                Some(index) == primary,
                now,
                self.key_lifetime,
            );
            // Recorded before the commit, so that a re-push after a restart
            // or a failover is still marked.
            let marked = EmergencyPurge {
                generation: current.number + 1,
            };
            self.store
                .save_record(&repo.name, EMERGENCY_PURGE, &marked)
                .await?;
            let next = self.commit(r, &current, next_keys, now, true).await?;
            outcome.generation = next.number;
            outcome.digest = next.digest.0.to_vec();
            outcome.indices = next.keys.indices();
            outcome.promoted_index = next.keys.primary_index().unwrap_or(0);
            outcome.purged = vec![Purged {
                index,
                demoted_unix_ms: times.demoted_ms.unwrap_or(0),
                safe_unix_ms: 0,
            }];
            outcome.rotated = true;
            if request.force {
                outcome.rejecting_regions = missing.clone();
            }
            outcome.message = format!(
                "committed generation {} without key {index}: {range}{}",
                next.number,
                rejecting_note(&missing, request.force)
            );
            tracing::warn!(repository = %repo.name, generation = next.number, key = index, "key purged: {range}");
            self.emit(
                "purged",
                &repo.name,
                None,
                next.number,
                outcome.message.clone(),
            );
            self.publish(r, next);
            self.audit_outcome(actor, "purge", request.force, &outcome)
                .await;
            outcome
        };
        let mut outcomes = vec![outcome];
        let wait = match request.wait_ms {
            0 => self.fanout.ack_wait,
            ms => Duration::from_millis(ms),
        };
        self.wait_in_sync(&[r], wait, false, shutdown).await;
        let generation = self.repos[r].current();
        if generation.number == outcomes[0].generation {
            outcomes[0].pending_regions = self.regions_missing(r, &generation);
        }
        Ok(outcomes)
    }

    /// Waits until every agent holds the current generation of every repository
    /// in `repos` (after a fresh read-back when `fresh`), or `wait` passes.
    pub(super) async fn wait_in_sync(
        &self,
        repos: &[RepoId],
        wait: Duration,
        fresh: bool,
        shutdown: CancellationToken,
    ) -> bool {
        let mut progress = self.progress();
        let deadline = tokio::time::Instant::now() + wait;
        // Acknowledgements arrive in dispatch order: each wake-up resumes at
        // the first agent found behind, so a fan-out costs O(agents) checks in
        // all, not per acknowledgement. A full pass confirms before `true`.
        let mut from = 0;
        loop {
            progress.borrow_and_update();
            let agents = self.fleet.agents.snapshot();
            let currents: Vec<(RepoId, Arc<Generation>)> = repos
                .iter()
                .map(|&r| (r, self.repos[r].current()))
                .collect();
            let done = |agent: &AgentSlot| {
                (!fresh || !agent.lock().probe || agent.is_quarantined())
                    && currents.iter().all(|(r, current)| {
                        !agent.blocks(*r, current, self.repos[*r].kind.signs_tokens())
                    })
            };
            let behind = |from: usize| {
                agents
                    .iter_from(AgentId(from))
                    .find(|(_, agent)| !done(agent))
                    .map(|(i, _)| i.0)
            };
            match behind(from).or_else(|| behind(0)) {
                None => return true,
                Some(i) => from = i,
            }
            tokio::select! {
                changed = progress.changed() => if changed.is_err() { return false },
                _ = tokio::time::sleep_until(deadline) => return false,
                _ = shutdown.cancelled() => return false,
            }
        }
    }

    /// Reads every agent back now and re-pushes where needed; waits up to `wait`.
    pub(super) async fn sync(&self, wait: Duration, shutdown: CancellationToken) {
        self.fleet.reconcile_all(true);
        let all: Vec<RepoId> = self.repos().map(|(r, _)| r).collect();
        self.wait_in_sync(&all, wait, true, shutdown).await;
    }

    /// A scheduled rotation, or a retry of one that was blocked or held. Never
    /// forced. A held one (the key-lifetime rule) is owed and retried once its
    /// purge-safe time has passed; `late` marks one performed after its tick.
    pub(super) async fn scheduled_rotation(
        self: &Arc<Self>,
        only_overdue: bool,
        shutdown: CancellationToken,
    ) {
        let names: Vec<String> = self
            .repos
            .iter()
            .filter(|r| !only_overdue || r.overdue.load(Ordering::Acquire))
            .map(|r| r.name.clone())
            .collect();
        self.scheduled_rotation_of(names, only_overdue, shutdown)
            .await;
    }

    async fn scheduled_rotation_of(
        self: &Arc<Self>,
        names: Vec<String>,
        only_overdue: bool,
        shutdown: CancellationToken,
    ) {
        if names.is_empty() {
            return;
        }
        let request = RotateOrder {
            no_wait: true,
            repositories: names,
            ..Default::default()
        };
        match self.rotations(&request, "schedule", shutdown).await {
            Ok(rotations) => {
                for Rotation { outcome: o, hold } in rotations {
                    let Some(repo) = self.repos.iter().find(|r| r.name == o.repository) else {
                        continue;
                    };
                    repo.overdue.store(!o.rotated, Ordering::Release);
                    if o.rotated && !repo.deferred.swap(false, Ordering::AcqRel) && only_overdue {
                        repo.late_rotation_ms.store(now_ms(), Ordering::Release);
                    }
                    if let Some(reason) = hold {
                        repo.set_blocked(Some(Blocked {
                            reason,
                            regions: Vec::new(),
                            until_ms: Some(o.safe_unix_ms),
                        }));
                        self.metrics.set_blocked(&repo.name, true);
                    }
                }
            }
            Err(e) => tracing::error!("scheduled rotation failed: {}", crate::error_chain(&e)),
        }
    }

    /// A cron tick: every repository rotates, except one whose owed rotation
    /// was performed late less than `interval` ago: that one is deferred to a
    /// full interval after it.
    pub(super) async fn scheduled_tick(
        self: &Arc<Self>,
        interval: Duration,
        shutdown: CancellationToken,
    ) {
        let now = now_ms();
        let interval_ms = i64::try_from(interval.as_millis()).unwrap_or(i64::MAX);
        let mut names = Vec::new();
        // The credential repository has its own schedule, if any.
        for repo in self.repos.iter().filter(|r| r.kind.signs_tokens()) {
            let late = repo.late_rotation_ms.load(Ordering::Acquire);
            if late > 0 && now.saturating_sub(late) < interval_ms {
                // Deferred, not dropped: a full interval after the late one.
                let until = late.saturating_add(interval_ms);
                let reason = format!(
                    "the previous scheduled rotation was performed late, at {}; the next waits one full interval, until {}",
                    rfc3339(late),
                    rfc3339(until)
                );
                tracing::info!(repository = %repo.name, "cron tick deferred: {reason}");
                repo.overdue.store(true, Ordering::Release);
                repo.deferred.store(true, Ordering::Release);
                repo.set_blocked(Some(Blocked {
                    reason,
                    regions: Vec::new(),
                    until_ms: Some(until),
                }));
                continue;
            }
            names.push(repo.name.clone());
        }
        self.scheduled_rotation_of(names, false, shutdown).await;
    }

    /// Whether an owed scheduled rotation may be retried now: every agent holds
    /// the current generation and no purge-safe time is still ahead.
    pub(super) fn owed_now(&self) -> bool {
        let now = now_ms();
        self.repos().any(|(r, repo)| {
            repo.overdue.load(Ordering::Acquire)
                && repo
                    .blocked()
                    .and_then(|b| b.until_ms)
                    .is_none_or(|until| until <= now)
                && self.may_rotate(r)
        })
    }

    /// The earliest time a held scheduled rotation becomes safe (Unix ms).
    pub(super) fn held_until_ms(&self) -> Option<i64> {
        self.repos
            .iter()
            .filter(|r| r.overdue.load(Ordering::Acquire))
            .filter_map(|r| r.blocked().and_then(|b| b.until_ms))
            .filter(|until| *until > 0)
            .min()
    }

    /// Re-evaluates blocked repositories: cleared once every agent caught up.
    pub(super) fn refresh_blocked(&self) {
        for (r, repo) in self.repos() {
            // A rotation held by the key-lifetime rule clears when it is performed.
            if repo.blocked().is_some_and(|b| b.until_ms.is_none()) && self.may_rotate(r) {
                repo.set_blocked(None);
                self.metrics.set_blocked(&repo.name, false);
                tracing::info!(repository = %repo.name, "no longer blocked: every agent holds the current generation");
            }
        }
    }
}

// ---- quarantine ([fanout] quarantine_after): an agent away for that long
// stops blocking token rotations; the keys it may sign with are pinned.
impl Core {
    /// Takes the quarantine records from the store (start, a new term).
    pub(super) async fn load_quarantine(&self) -> Result<(), StoreError> {
        let agents = self.fleet.agents.snapshot();
        for (_, agent) in agents.iter() {
            agent.lock().quarantined = None;
        }
        for (_, repo) in self.repos() {
            let record: QuarantineRecord = self
                .store
                .load_record(&repo.name, QUARANTINE)
                .await?
                .unwrap_or_default();
            for (_, agent) in agents.iter() {
                if let Some(q) = record.agents.get(&agent.name) {
                    agent.lock().quarantined = Some(*q);
                }
            }
            *repo.quarantine() = record;
        }
        Ok(())
    }

    /// Stores `records` (one per repository, in order), then makes them current.
    async fn store_quarantine(&self, records: Vec<QuarantineRecord>) -> Result<(), StoreError> {
        for ((_, repo), record) in self.repos().zip(&records) {
            if *repo.quarantine() != *record {
                self.store
                    .save_record(&repo.name, QUARANTINE, record)
                    .await?;
            }
        }
        for ((_, repo), record) in self.repos().zip(records) {
            *repo.quarantine() = record;
        }
        Ok(())
    }

    /// Once a second: notes since when each agent is behind, quarantines one
    /// behind for `quarantine_after` (its possible signing keys pinned, the
    /// record stored before any commit can skip it), lets one that holds
    /// every current generation again leave (its pins kept until their
    /// tokens expired), and drops pins whose time has passed.
    pub(super) async fn review_quarantine(&self) {
        let after = self.fanout.quarantine_after;
        if after.is_none() && self.repos.iter().all(|r| r.quarantine().is_empty()) {
            return;
        }
        let _between_rotations = self.rotation.lock().await;
        let now = now_ms();
        let mut records: Vec<QuarantineRecord> =
            self.repos.iter().map(|r| r.quarantine().clone()).collect();
        let mut entered = Vec::new();
        let mut left = Vec::new();
        let agents = self.fleet.agents.snapshot();
        for (_, agent) in agents.iter() {
            let behind = self
                .repos()
                .any(|(r, repo)| agent.blocks(r, &repo.current(), false));
            let (since, quarantined) = {
                let mut st = agent.lock();
                if !behind {
                    st.behind_since_ms = None;
                } else if st.behind_since_ms.is_none() {
                    st.behind_since_ms = Some(now);
                }
                (st.behind_since_ms, st.quarantined)
            };
            match (quarantined, since) {
                (Some(_), None) => {
                    for ((_, repo), record) in self.repos().zip(records.iter_mut()) {
                        let released = record.release(&agent.name, now, self.key_lifetime);
                        let primary = repo.current().keys.primary_index();
                        let mut ledger = repo.ledger();
                        for index in released {
                            if ledger.demote_no_earlier(index, primary, now) {
                                repo.ledger_dirty.store(true, Ordering::Release);
                            }
                        }
                    }
                    left.push(agent.clone());
                }
                (None, Some(since))
                    if after.is_some_and(|after| {
                        now.saturating_sub(since)
                            >= i64::try_from(after.as_millis()).unwrap_or(i64::MAX)
                    }) =>
                {
                    let mut pinned = Vec::new();
                    for ((r, repo), record) in self.repos().zip(records.iter_mut()) {
                        record.agents.insert(
                            agent.name.clone(),
                            Quarantined {
                                since_ms: since,
                                evicted_ms: None,
                            },
                        );
                        if !repo.kind.signs_tokens() {
                            continue;
                        }
                        let current = repo.current();
                        let held = agent.lock().held[r].generation;
                        for index in possible_signing_keys(&current.keys, current.number, held) {
                            record.pin(&agent.name, index, &current.keys);
                            pinned.push(format!("{}:{index}", repo.name));
                        }
                    }
                    entered.push((agent.clone(), since, pinned));
                }
                _ => {}
            }
        }
        let mut expired = false;
        let enrolled: std::collections::BTreeSet<&str> =
            agents.iter().map(|(_, a)| a.name.as_str()).collect();
        for record in &mut records {
            expired |= record.expire(now);
            // An agent a reload removed is gone for good: nothing stays
            // pinned for it (as after `evict`).
            if record.forget_except(&enrolled) {
                tracing::info!("keys pinned for agents no longer enrolled are released");
                expired = true;
            }
        }
        if entered.is_empty() && left.is_empty() && !expired {
            return;
        }
        if let Err(e) = self.store_quarantine(records).await {
            tracing::warn!(error = %crate::error_chain(&e), "cannot record the quarantine; retrying");
            return;
        }
        for (agent, since, pinned) in entered {
            agent.lock().quarantined = Some(Quarantined {
                since_ms: since,
                evicted_ms: None,
            });
            let detail = format!(
                "no acknowledgement of the current generation since {}: no longer blocks rotations; keys pinned: {}",
                rfc3339(since),
                if pinned.is_empty() {
                    "none".to_owned()
                } else {
                    pinned.join(", ")
                }
            );
            tracing::warn!(agent = %agent.name, region = %agent.region, pinned = ?pinned, "agent quarantined: {detail}");
            self.emit("quarantined", "", Some(&agent), 0, detail.clone());
            self.audit_agent(&agent, "rotator", "quarantine", "quarantined", detail)
                .await;
        }
        for agent in left {
            agent.lock().quarantined = None;
            let detail = format!(
                "holds every current generation again: leaves quarantine; its pinned keys are kept until {}",
                rfc3339(now.saturating_add(
                    i64::try_from(self.key_lifetime.as_millis()).unwrap_or(i64::MAX)
                ))
            );
            tracing::info!(agent = %agent.name, region = %agent.region, "agent left quarantine: {detail}");
            self.emit("unquarantined", "", Some(&agent), 0, detail.clone());
            self.audit_agent(&agent, "rotator", "quarantine", "left", detail)
                .await;
        }
        self.refresh_blocked();
        self.bump_progress();
    }

    /// Before generation `generation` of `r` is sent to a quarantined agent:
    /// its primary is pinned for it, durably, since the agent may sign with
    /// it from the moment it installs it. An error when the pin could not be
    /// stored: then nothing is sent.
    pub(super) async fn pin_delivery(
        &self,
        i: AgentId,
        r: RepoId,
        generation: &Generation,
    ) -> Result<(), String> {
        let Some(agent) = self.agent(i) else {
            return Ok(());
        };
        let repo = &self.repos[r];
        let quarantined = agent.lock().quarantined;
        if quarantined.is_none_or(|q| q.evicted_ms.is_some()) || !repo.kind.signs_tokens() {
            return Ok(());
        }
        let Some(primary) = generation.keys.primary_index() else {
            return Ok(());
        };
        let _one_writer = self.rotation.lock().await;
        let mut record = repo.quarantine().clone();
        if !record.pin(&agent.name, primary, &generation.keys) {
            return Ok(());
        }
        self.store
            .save_record(&repo.name, QUARANTINE, &record)
            .await
            .map_err(|e| {
                format!(
                    "cannot record the pin of key {primary} before pushing to a quarantined agent: {}",
                    crate::error_chain(&e)
                )
            })?;
        *repo.quarantine() = record;
        Ok(())
    }

    /// `fernetd admin evict`: a quarantined agent that will not come back
    /// no longer has keys pinned; they are purged by the usual rule. It stays
    /// out of the safety rule until it acknowledges again. Returns the
    /// released keys as `repository:index`.
    pub(super) async fn evict(&self, name: &str, actor: &str) -> Result<Vec<String>, RotatorError> {
        let _between_rotations = self.rotation.lock().await;
        let agent = self
            .fleet
            .agents
            .snapshot()
            .iter()
            .find(|(_, a)| a.name == name)
            .map(|(_, a)| a.clone())
            .ok_or_else(|| RotatorError::UnknownAgent(name.to_owned()))?;
        let Some(quarantined) = agent.lock().quarantined else {
            return Err(RotatorError::NotQuarantined(name.to_owned()));
        };
        let now = now_ms();
        let mut released = Vec::new();
        let mut records: Vec<QuarantineRecord> =
            self.repos.iter().map(|r| r.quarantine().clone()).collect();
        for ((_, repo), record) in self.repos().zip(records.iter_mut()) {
            for index in record.evict(name, now) {
                released.push(format!("{}:{index}", repo.name));
            }
        }
        self.store_quarantine(records).await?;
        agent.lock().quarantined = Some(Quarantined {
            evicted_ms: Some(quarantined.evicted_ms.unwrap_or(now)),
            ..quarantined
        });
        let detail = format!(
            "evicted from quarantine; keys no longer pinned: {}",
            if released.is_empty() {
                "none".to_owned()
            } else {
                released.join(", ")
            }
        );
        tracing::warn!(agent = %agent.name, region = %agent.region, admin = %actor, "{detail}");
        self.emit("evicted", "", Some(&agent), 0, detail.clone());
        self.audit_agent(&agent, actor, "evict", "evicted", detail)
            .await;
        self.bump_progress();
        Ok(released)
    }

    /// Records a change of one agent's standing in the audit log.
    async fn audit_agent(
        &self,
        agent: &AgentSlot,
        actor: &str,
        event: &'static str,
        outcome: &'static str,
        detail: String,
    ) {
        let entry = crate::audit::Entry {
            actor: actor.to_owned(),
            event,
            agent: agent.name.clone(),
            region: agent.region.clone(),
            outcome,
            detail,
            ..Default::default()
        };
        crate::audit::maybe_append(self.audit.as_ref(), entry).await;
    }
}

// ---- issue 14 (HA): a standby, and a leader at the start of its term, take
// the committed state from etcd.
impl Core {
    /// Makes `generation` (committed elsewhere, read from etcd) and its ledger
    /// current for `r` without pushing anything.
    pub(super) fn adopt_committed(&self, r: RepoId, generation: Generation, ledger: Ledger) {
        let repo = &self.repos[r];
        if repo.current().number != generation.number {
            self.emit(
                "rotated",
                &repo.name,
                None,
                generation.number,
                String::new(),
            );
        }
        self.metrics.set_generation(&repo.name, generation.number);
        repo.set_current(generation);
        *repo.ledger() = ledger;
        repo.demotion_cursor.store(0, Ordering::Release);
        self.bump_progress();
    }
}

impl Core {
    /// The credential repository's id, when this rotator manages one.
    fn credential_repo(&self) -> Option<RepoId> {
        self.repos()
            .find(|(_, repo)| repo.kind == RepoKind::Credential)
            .map(|(r, _)| r)
    }

    /// The hook in `rotate_one`, after the safety rule: `Some(outcome)` when
    /// the credential rotation may not be committed now (migrate needed and
    /// failed, or the cache time still running); `None` to go on and commit.
    async fn credential_gate(
        &self,
        r: RepoId,
        current: &Generation,
        dry_run: bool,
        outcome: &Outcome,
    ) -> Result<Option<Rotation>, RotatorError> {
        let Some(gate) = self.credential.as_ref() else {
            return Ok(None);
        };
        let repo = &self.repos[r];
        if repo.kind != RepoKind::Credential {
            return Ok(None);
        }
        let mut refused = outcome.clone();
        // `--force` skips the safety rule, never this: a region without the
        // current generation may hold rows under a key the purge removes.
        if !self.may_rotate(r) {
            refused.message = format!(
                "blocked: a credential rotation is never forced: every agent must hold generation {} first",
                current.number
            );
            return Ok(Some(Rotation::shown(refused)));
        }
        let now = now_ms();
        let safe = match gate.safe_ms(current) {
            Some(safe) => safe,
            None if dry_run => {
                refused.message = gate.dry_run_message(current);
                return Ok(Some(Rotation::shown(refused)));
            }
            None => {
                let agents = self.fleet.agents.snapshot();
                let record = super::credential::migrate(
                    gate,
                    &agents,
                    &repo.name,
                    current,
                    self.fanout.call_timeout,
                )
                .await;
                self.record_migrate(gate, &record).await;
                if !record.passed {
                    let reason = record.refusal();
                    tracing::warn!(repository = %repo.name, "credential rotation blocked: {reason}");
                    self.emit("blocked", &repo.name, None, current.number, reason.clone());
                    refused.message = format!("blocked: {reason}");
                    return Ok(Some(Rotation::shown(refused)));
                }
                gate.safe_after(&record)
            }
        };
        if now >= safe {
            return Ok(None);
        }
        let reason = gate.held_reason(current, safe);
        refused.held_for_lifetime = true;
        refused.safe_unix_ms = safe;
        refused.message = if dry_run {
            format!("dry run: would be held: {reason}")
        } else {
            format!("held: {reason}")
        };
        if !dry_run {
            // Owed: the scheduler performs it at the safe time.
            repo.overdue.store(true, Ordering::Release);
            repo.set_blocked(Some(Blocked {
                reason: reason.clone(),
                regions: Vec::new(),
                until_ms: Some(safe),
            }));
            self.metrics.set_blocked(&repo.name, true);
            self.emit("held", &repo.name, None, current.number, reason.clone());
            self.bump_progress();
        }
        Ok(Some(Rotation {
            outcome: refused,
            hold: Some(reason),
        }))
    }

    /// Records a migrate in the store (so a restart or the next leader knows
    /// it), shows, audits and announces it.
    pub(super) async fn record_migrate(&self, gate: &Gate, record: &MigrateRecord) {
        if let Err(e) = self
            .store
            .save_record(CREDENTIAL_REPOSITORY, CREDENTIAL_MIGRATE, record)
            .await
        {
            tracing::warn!(
                error = %crate::error_chain(&e),
                "cannot record the credential migrate; status shows it until a restart"
            );
        }
        gate.take(record.clone(), true);
        crate::audit::maybe_append(self.audit.as_ref(), record.audit_entry()).await;
        self.emit(
            "credential_migrate",
            CREDENTIAL_REPOSITORY,
            None,
            record.generation,
            record.event_message(),
        );
    }

    /// Takes the last migrate the store holds (recorded by another leader).
    async fn refresh_credential_record(&self) -> Result<(), StoreError> {
        let Some(gate) = &self.credential else {
            return Ok(());
        };
        let record: Option<MigrateRecord> = self
            .store
            .load_record(CREDENTIAL_REPOSITORY, CREDENTIAL_MIGRATE)
            .await?;
        if let Some(record) = record {
            gate.take(record, false);
        }
        Ok(())
    }

    /// After a restart: a passed migrate of the current generation whose cache
    /// time has not run out yet is owed again, so the scheduler commits it.
    pub(super) fn resume_credential_hold(&self) {
        let (Some(gate), Some(r)) = (self.credential.as_ref(), self.credential_repo()) else {
            return;
        };
        let repo = &self.repos[r];
        if let Some(safe) = gate.safe_ms(&repo.current()) {
            repo.overdue.store(true, Ordering::Release);
            repo.set_blocked(Some(Blocked {
                reason: format!(
                    "credentials migrated; the rotation purging the previous key is committed at {}",
                    rfc3339(safe)
                ),
                regions: Vec::new(),
                until_ms: Some(safe),
            }));
            self.metrics.set_blocked(&repo.name, true);
        }
    }

    /// The credential repository's own schedule, when it has one.
    pub(super) fn credential_schedule(&self) -> Option<(RepoId, super::schedule::Schedule)> {
        let (Some(gate), Some(r)) = (self.credential.as_ref(), self.credential_repo()) else {
            return None;
        };
        Some((r, gate.schedule()?))
    }
}

/// The keys a rotation purges, each with the age of the youngest token it can
/// have signed.
fn purge_note(purges: &[super::ledger::Purge], now: i64) -> String {
    let parts: Vec<String> = purges
        .iter()
        .map(|p| match p.demoted_ms {
            Some(d) => format!(
                "key {} (youngest token it can have signed: {} old, purge-safe since {})",
                p.index,
                crate::config::duration::format(&Duration::from_millis(
                    u64::try_from(now.saturating_sub(d)).unwrap_or(0) / 1000 * 1000
                )),
                p.safe_ms.map(rfc3339).unwrap_or_default()
            ),
            None => format!("key {}", p.index),
        })
        .collect();
    if parts.is_empty() {
        ", purging no key".into()
    } else {
        format!(", purging {}", parts.join(", "))
    }
}

/// Which tokens purging a key invalidates, in the operator's words.
fn invalidated_range(
    times: &super::ledger::KeyTimes,
    staged: bool,
    primary: bool,
    now: i64,
    lifetime: Duration,
) -> String {
    if staged {
        return "the staged key signed no token; nothing is invalidated".into();
    }
    let from = times
        .promoted_ms
        .map(rfc3339)
        .unwrap_or_else(|| "an unknown time (before the ledger)".into());
    let until = if primary {
        now
    } else {
        times.demoted_ms.unwrap_or(now)
    };
    let valid_until = until.saturating_add(i64::try_from(lifetime.as_millis()).unwrap_or(i64::MAX));
    if valid_until <= now {
        format!(
            "it signed tokens from {from} to {}; all of them had expired already",
            rfc3339(until)
        )
    } else {
        format!(
            "every token issued with it from {from} to {} stops validating now (they were valid up to {}); \
             flush the regions' token caches (memcached) so cached validations go too",
            rfc3339(until),
            rfc3339(valid_until)
        )
    }
}

fn rejecting_note(missing: &[String], force: bool) -> String {
    if force && !missing.is_empty() {
        format!(
            "; forced: {} will reject tokens made with the new primary until they catch up",
            missing.join(", ")
        )
    } else {
        String::new()
    }
}

#[cfg(test)]
mod credential_tests;

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::config::AgentEndpoint;
    use crate::rotator::types::RepoReport;

    /// A core over a memory store with `regions` agents behind channels that
    /// are never dialled (no dispatcher runs), so the tests drive
    /// acknowledgements by hand.
    pub(in crate::rotator) fn core(regions: &[&str]) -> Arc<Core> {
        core_with(regions, 3, Duration::ZERO)
    }

    /// A core as [`core`] with `max_active_keys` and a key lifetime.
    fn core_with(regions: &[&str], max_active_keys: usize, key_lifetime: Duration) -> Arc<Core> {
        core_fanout(
            regions,
            max_active_keys,
            key_lifetime,
            FanoutConfig::default(),
        )
    }

    /// A core as [`core_with`] with its `[fanout]`.
    fn core_fanout(
        regions: &[&str],
        max_active_keys: usize,
        key_lifetime: Duration,
        fanout: FanoutConfig,
    ) -> Arc<Core> {
        let store = Store::memory();
        let keys = repository::init(max_active_keys).expect("init");
        let ledger = Ledger::fresh(&keys, now_ms());
        let first = Generation::build("tokens", 1, keys, ledger.promoted_unix()).expect("build");
        store.put_committed("tokens", first.committed(), ledger.clone());
        let repos = vec![RepoSlot::new(
            "tokens".into(),
            max_active_keys,
            first,
            ledger,
        )];
        let agents = regions
            .iter()
            .map(|r| {
                let channel = crate::tls::Connection::never_dialled();
                let endpoint = AgentEndpoint {
                    name: None,
                    region: (*r).into(),
                    endpoint: "https://127.0.0.1:9".into(),
                    identity: format!("{r}.agent"),
                };
                AgentSlot::new(&endpoint, channel, 1)
            })
            .collect();
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = Metrics::new(&mut registry);
        Arc::new(Core::new(
            repos,
            agents,
            store,
            fanout,
            metrics,
            key_lifetime,
        ))
    }

    /// What the store holds for `tokens`.
    async fn stored(core: &Core) -> crate::rotator::state::Committed {
        core.store
            .committed("tokens")
            .await
            .expect("load")
            .expect("state")
    }

    pub(in crate::rotator) fn ack(core: &Core, i: AgentId) {
        let current = core.repos[0].current();
        let response = Answer {
            generation: current.number,
            digest: current.digest.0.to_vec(),
            canaries_valid: true,
        };
        core.observe_install(i, RepoId(0), &current, &response)
            .expect("acknowledged");
    }

    fn request(force: bool, dry_run: bool) -> RotateOrder {
        RotateOrder {
            force,
            dry_run,
            no_wait: true,
            ..Default::default()
        }
    }

    /// Quarantine: an agent behind for `quarantine_after` stops blocking; the
    /// keys it may sign with stay in every generation committed meanwhile,
    /// the record is in the store; once it acknowledges it leaves, and an
    /// evicted agent's keys are purged by the next rotation.
    #[tokio::test]
    async fn a_quarantined_agent_stops_blocking_and_its_keys_stay_until_it_returns() {
        let fanout = FanoutConfig {
            quarantine_after: Some(Duration::from_secs(1)),
            ..FanoutConfig::default()
        };
        let core = core_fanout(&["RegionOne", "RegionTwo"], 3, Duration::ZERO, fanout);
        let stop = CancellationToken::new();
        let (one, two) = (AgentId(0), AgentId(1));
        ack(&core, one);
        ack(&core, two);
        let rotate = |core: Arc<Core>| {
            let stop = stop.clone();
            async move {
                core.rotate(&request(false, false), "test", stop)
                    .await
                    .expect("rotate")
                    .remove(0)
            }
        };
        assert!(rotate(core.clone()).await.rotated);
        ack(&core, one);
        // RegionTwo holds generation 1 (primary 1) and was sent 2 (primary 2).
        assert!(!rotate(core.clone()).await.rotated, "blocked by RegionTwo");
        core.review_quarantine().await;
        assert!(!core.agent(two).unwrap().is_quarantined(), "not yet");
        core.agent(two).unwrap().lock().behind_since_ms = Some(now_ms() - 5_000);
        core.review_quarantine().await;
        assert!(core.agent(two).unwrap().is_quarantined());
        let stored: QuarantineRecord = core
            .store
            .load_record("tokens", QUARANTINE)
            .await
            .expect("load")
            .expect("stored before it counts");
        assert!(stored.agents.contains_key("RegionTwo"));
        assert_eq!(core.repos[0].quarantine().pinned(now_ms()), [1, 2].into());
        // A restart (or a new leader) takes both from the store.
        core.agent(two).unwrap().lock().quarantined = None;
        *core.repos[0].quarantine() = QuarantineRecord::default();
        core.load_quarantine().await.expect("load");
        assert!(core.agent(two).unwrap().is_quarantined());
        assert_eq!(core.repos[0].quarantine().pinned(now_ms()), [1, 2].into());
        for round in 0..5 {
            let o = rotate(core.clone()).await;
            assert!(o.rotated, "round {round}: {}", o.message);
            ack(&core, one);
            let keys = core.repos[0].current().keys.indices();
            assert!(
                keys.contains(&1) && keys.contains(&2),
                "round {round}: {keys:?}"
            );
        }
        // RegionTwo comes back and acknowledges: it leaves quarantine, and
        // (token lifetime 0 here) its keys go with the next rotation.
        ack(&core, two);
        core.review_quarantine().await;
        assert!(!core.agent(two).unwrap().is_quarantined());
        core.review_quarantine().await;
        assert!(core.repos[0].quarantine().is_empty());
        assert!(rotate(core.clone()).await.rotated);
        let keys = core.repos[0].current().keys.indices();
        assert!(!keys.contains(&1) && !keys.contains(&2), "{keys:?}");
        ack(&core, one);
        ack(&core, two);
        // Away again, then evicted: its pins go, and so do its keys.
        assert!(rotate(core.clone()).await.rotated);
        ack(&core, one);
        core.agent(two).unwrap().lock().behind_since_ms = Some(now_ms() - 5_000);
        core.review_quarantine().await;
        let pinned = core.repos[0].quarantine().pinned(now_ms());
        assert!(!pinned.is_empty());
        assert!(matches!(
            core.evict("RegionOne", "admin").await,
            Err(RotatorError::NotQuarantined(_))
        ));
        let released = core.evict("RegionTwo", "admin").await.expect("evict");
        assert_eq!(released.len(), pinned.len());
        assert!(core.repos[0].quarantine().pinned(now_ms()).is_empty());
        assert!(
            core.agent(two).unwrap().is_quarantined(),
            "still not blocking"
        );
        for _ in 0..3 {
            assert!(rotate(core.clone()).await.rotated);
            ack(&core, one);
        }
        let keys = core.repos[0].current().keys.indices();
        assert!(
            pinned.iter().all(|p| !keys.contains(p)),
            "{keys:?} {pinned:?}"
        );
    }

    #[tokio::test]
    async fn no_rotation_while_a_region_has_not_acknowledged_the_current_generation() {
        let core = core(&["RegionOne", "RegionTwo"]);
        let stop = CancellationToken::new();
        ack(&core, AgentId(0));
        let r = core
            .rotate(&request(false, false), "test", stop.clone())
            .await
            .expect("rotate");
        let o = &r[0];
        assert!(!o.rotated);
        assert_eq!(o.generation, 1);
        assert_eq!(o.pending_regions, vec!["RegionTwo".to_owned()]);
        assert_eq!(core.repos[0].current().number, 1);
        let blocked = core.repos[0].blocked().expect("blocked");
        assert!(blocked.reason.contains("RegionTwo"));
        assert_eq!(blocked.regions, vec!["RegionTwo".to_owned()]);
        // Nothing was written: the state still holds generation 1.
        let on_disk = stored(&core).await;
        assert_eq!(on_disk.generation, 1);

        ack(&core, AgentId(1));
        core.refresh_blocked();
        assert!(core.repos[0].blocked().is_none());
        let r = core
            .rotate(&request(false, false), "test", stop)
            .await
            .expect("rotate");
        assert!(r[0].rotated);
        assert_eq!(r[0].generation, 2);
        // Durable before anything could be sent.
        let on_disk = stored(&core).await;
        assert_eq!(on_disk.generation, 2);
        assert_eq!(on_disk.keys.digest(), core.repos[0].current().digest);
    }

    #[tokio::test]
    async fn dry_run_changes_nothing_and_force_names_the_regions_that_will_reject_tokens() {
        let core = core(&["RegionOne", "RegionTwo", "RegionThree"]);
        let stop = CancellationToken::new();
        ack(&core, AgentId(0));
        let before = core.repos[0].current().digest;
        let r = core
            .rotate(&request(true, true), "test", stop.clone())
            .await
            .expect("dry run");
        let o = &r[0];
        assert!(!o.rotated && o.message.starts_with("dry run"), "{o:?}");
        assert_eq!(
            o.rejecting_regions,
            vec!["RegionTwo".to_owned(), "RegionThree".to_owned()]
        );
        assert_eq!(core.repos[0].current().digest, before);
        assert_eq!(stored(&core).await.generation, 1);

        let r = core
            .rotate(&request(true, false), "test", stop)
            .await
            .expect("forced");
        let o = &r[0];
        assert!(o.rotated);
        assert_eq!(
            o.rejecting_regions,
            vec!["RegionTwo".to_owned(), "RegionThree".to_owned()]
        );
        assert!(
            o.message
                .contains("RegionTwo, RegionThree will reject tokens"),
            "{}",
            o.message
        );
        assert_eq!(core.repos[0].current().number, 2);
    }

    #[tokio::test]
    async fn an_answer_that_does_not_match_what_was_sent_is_not_an_acknowledgement() {
        let core = core(&["RegionOne"]);
        let current = core.repos[0].current();
        let good = Answer {
            generation: 1,
            digest: current.digest.0.to_vec(),
            canaries_valid: true,
        };
        let wrong_digest = Answer {
            digest: vec![0; 32],
            ..good.clone()
        };
        let no_canaries = Answer {
            canaries_valid: false,
            ..good.clone()
        };
        assert!(
            core.observe_install(AgentId(0), RepoId(0), &current, &wrong_digest)
                .is_err()
        );
        assert!(
            core.observe_install(AgentId(0), RepoId(0), &current, &no_canaries)
                .is_err()
        );
        assert!(
            !core
                .agent(AgentId(0))
                .expect("enrolled")
                .holds(RepoId(0), &current)
        );
        core.observe_install(AgentId(0), RepoId(0), &current, &good)
            .expect("acknowledged");
        assert!(
            core.agent(AgentId(0))
                .expect("enrolled")
                .holds(RepoId(0), &current)
        );
        let held = core.agent(AgentId(0)).expect("enrolled").lock().held[RepoId(0)];
        assert!(
            held.generation == current.number
                && held.digest == Some(current.digest)
                && !held.drift
                && held.unix_ms > 0
        );
    }

    /// Admin `rotate` calls cancelled at random points (the client gave up):
    /// once the rotation lock is free, the state on disk and the generation in
    /// memory agree and keep agreeing; no save runs on orphaned.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancelled_rotate_never_leaves_disk_and_memory_apart() {
        let core = core(&["RegionOne"]);
        let stop = CancellationToken::new();
        for round in 0..40 {
            ack(&core, AgentId(0));
            let call = tokio::spawn({
                let (core, stop) = (core.clone(), stop.clone());
                async move { core.rotate(&request(false, false), "test", stop).await }
            });
            tokio::time::sleep(Duration::from_micros(rand::random_range(0..3000))).await;
            call.abort();
            let _ = call.await;
            drop(core.rotation.lock().await);
            let window = std::time::Instant::now() + Duration::from_millis(30);
            while std::time::Instant::now() < window {
                let on_disk = stored(&core).await;
                let current = core.repos[0].current();
                assert_eq!(
                    (on_disk.generation, on_disk.keys.digest()),
                    (current.number, current.digest),
                    "round {round}: a save went on after its call was cancelled"
                );
                tokio::task::yield_now().await;
            }
        }
    }

    #[tokio::test]
    async fn acknowledgements_from_disk_do_not_count_until_the_agent_is_read_back() {
        let core = core(&["RegionOne"]);
        let current = core.repos[0].current();
        let mut acks = Acks::new();
        acks.entry("tokens".into()).or_default().insert(
            "RegionOne".into(),
            AckRecord {
                generation: current.number,
                digest: current.digest.to_hex(),
                unix_ms: 1,
            },
        );
        core.restore_acks(&acks);
        assert!(
            !core
                .agent(AgentId(0))
                .expect("enrolled")
                .holds(RepoId(0), &current)
        );
        assert!(!core.may_rotate(RepoId(0)));
        let state = Report {
            region: "RegionOne".into(),
            repositories: vec![RepoReport {
                name: "tokens".into(),
                generation: current.number,
                digest: current.digest.0.to_vec(),
                ..Default::default()
            }],
        };
        core.observe_state(AgentId(0), &state).expect("observed");
        assert!(core.may_rotate(RepoId(0)));
    }

    #[tokio::test]
    async fn an_agent_ahead_of_the_rotator_or_forked_is_reported_not_overwritten() {
        let core = core(&["RegionOne"]);
        let current = core.repos[0].current();
        let state = |generation: u64, digest: Vec<u8>| Report {
            region: "RegionOne".into(),
            repositories: vec![RepoReport {
                name: "tokens".into(),
                generation,
                digest,
                ..Default::default()
            }],
        };
        core.observe_state(AgentId(0), &state(7, vec![1; 32]))
            .expect("observed");
        assert!(
            core.agent_ahead(AgentId(0), RepoId(0), &current)
                .is_some_and(|r| r.contains("newer"))
        );
        core.observe_state(AgentId(0), &state(1, vec![1; 32]))
            .expect("observed");
        assert!(
            core.agent_ahead(AgentId(0), RepoId(0), &current)
                .is_some_and(|r| r.contains("fork"))
        );
        let wrong_region = Report {
            region: "RegionNine".into(),
            ..state(1, current.digest.0.to_vec())
        };
        assert!(core.observe_state(AgentId(0), &wrong_region).is_err());
        core.observe_state(AgentId(0), &state(1, current.digest.0.to_vec()))
            .expect("observed");
        assert!(
            core.agent(AgentId(0))
                .expect("enrolled")
                .holds(RepoId(0), &current)
        );
    }
}
