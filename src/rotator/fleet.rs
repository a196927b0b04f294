//! The fleet: every enrolled agent, what each was last seen holding, and
//! where each is in the dispatcher's hands. The agent table is append-only (a
//! reload retires slots and appends new ones, `enrol.rs`), so an [`AgentId`]
//! held by a queue or an in-flight call never names another agent. The work
//! queue holds agent ids only: a ready queue, a timer heap for backoffs, and
//! the permits that bound concurrent calls; each agent's [`Phase`] says which
//! of them holds it, so an agent is queued at most once. The fan-out
//! (`fanout.rs`) drives it.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;

use super::ledger::Quarantined;
use super::schedule::Backoff;
use super::types::{AgentId, Generation, Held, RepoId};
use crate::config::{AgentEndpoint, FanoutConfig};

/// Where an agent is in the dispatcher's hands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// Nothing to do, in no queue.
    Idle,
    /// In the ready queue.
    Queued,
    /// In the timer heap until this instant (backoff).
    Waiting(Instant),
    /// A call task is running; `again` = more work arrived meanwhile.
    Running { again: bool },
}

/// The dispatcher's queues.
pub(super) struct WorkQueue {
    ready: Mutex<VecDeque<AgentId>>,
    delayed: Mutex<BinaryHeap<Reverse<(Instant, AgentId)>>>,
    wake: Notify,
    permits: Arc<Semaphore>,
}

impl WorkQueue {
    pub(super) fn new(concurrency: usize) -> Self {
        WorkQueue {
            ready: Mutex::new(VecDeque::new()),
            delayed: Mutex::new(BinaryHeap::new()),
            wake: Notify::new(),
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
        }
    }
}

/// Per-agent mutable state: a few words, whatever the number of agents.
#[derive(Debug)]
pub(super) struct AgentState {
    pub(super) phase: Phase,
    /// Read the agent's state back before pushing.
    pub(super) probe: bool,
    pub(super) failures: u32,
    pub(super) last_error: Option<String>,
    pub(super) connected: bool,
    pub(super) held: Vec<Held>,
    /// Since when it has not held every current generation (Unix ms), as
    /// last looked at by `Core::review_quarantine`; restarts with the process.
    pub(super) behind_since_ms: Option<i64>,
    /// In quarantine: it blocks no token repository's rotation.
    pub(super) quarantined: Option<Quarantined>,
}

/// One enrolled agent: its own name (a controller) and the region it serves.
pub(super) struct AgentSlot {
    pub(super) name: String,
    pub(super) region: String,
    pub(super) endpoint: String,
    /// The SAN its certificate must carry: a reload that changes it reconnects.
    pub(super) identity: String,
    pub(super) channel: crate::tls::Connection,
    state: Mutex<AgentState>,
}

impl AgentSlot {
    pub(super) fn new(
        config: &AgentEndpoint,
        channel: crate::tls::Connection,
        repos: usize,
    ) -> Self {
        AgentSlot {
            name: config.name().to_owned(),
            region: config.region.clone(),
            endpoint: config.endpoint.clone(),
            identity: config.identity.clone(),
            channel,
            state: Mutex::new(AgentState {
                phase: Phase::Idle,
                probe: true,
                failures: 0,
                last_error: None,
                connected: false,
                held: vec![Held::default(); repos],
                behind_since_ms: None,
                quarantined: None,
            }),
        }
    }

    /// How lists of agents name it: the region alone when the agent is the
    /// region's only one (its name is the region), else `name (region)`.
    pub(super) fn label(&self) -> String {
        if self.name == self.region {
            self.region.clone()
        } else {
            format!("{} ({})", self.name, self.region)
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, AgentState> {
        lock(&self.state)
    }

    /// Whether it holds `generation` of repository `r` (same number and
    /// digest, no drift, confirmed by the agent since this process started).
    pub(super) fn holds(&self, r: RepoId, generation: &Generation) -> bool {
        confirmed(&self.lock().held[r], generation)
    }
}

impl AgentSlot {
    /// Whether it keeps `generation` of repository `r` from rotating: it does
    /// not hold it and is not quarantined (`quarantine_applies`: the
    /// repository signs tokens; a credential repository never skips anyone).
    pub(super) fn blocks(
        &self,
        r: RepoId,
        generation: &Generation,
        quarantine_applies: bool,
    ) -> bool {
        let st = self.lock();
        if quarantine_applies && st.quarantined.is_some() {
            return false;
        }
        !confirmed(&st.held[r], generation)
    }

    pub(super) fn is_quarantined(&self) -> bool {
        self.lock().quarantined.is_some()
    }
}

/// `held` is `generation` (same number and digest, no drift), confirmed by
/// the agent since this process started.
fn confirmed(held: &Held, generation: &Generation) -> bool {
    held.generation == generation.number
        && held.digest == Some(generation.digest)
        && !held.drift
        && !held.restored
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The enrolled agents, by [`AgentId`]; `None` marks a retired slot.
pub(super) struct AgentTable {
    slots: RwLock<Arc<Vec<Option<Arc<AgentSlot>>>>>,
}

/// The table as it was at one instant: iterating it takes no lock.
pub(super) struct Snapshot(Arc<Vec<Option<Arc<AgentSlot>>>>);

impl Snapshot {
    /// Every enrolled agent, in table order (configuration order, then
    /// enrolment order).
    pub(super) fn iter(&self) -> impl Iterator<Item = (AgentId, &Arc<AgentSlot>)> {
        self.iter_from(AgentId(0))
    }

    /// Every enrolled agent from slot `start` on.
    pub(super) fn iter_from(
        &self,
        start: AgentId,
    ) -> impl Iterator<Item = (AgentId, &Arc<AgentSlot>)> {
        self.0
            .iter()
            .enumerate()
            .skip(start.0)
            .filter_map(|(i, slot)| slot.as_ref().map(|a| (AgentId(i), a)))
    }

    /// The number of slots, retired ones included: ids are below it.
    pub(super) fn slots(&self) -> usize {
        self.0.len()
    }

    pub(super) fn get(&self, i: AgentId) -> Option<&Arc<AgentSlot>> {
        self.0.get(i.0).and_then(Option::as_ref)
    }
}

impl AgentTable {
    pub(super) fn new(agents: Vec<AgentSlot>) -> Self {
        AgentTable {
            slots: RwLock::new(Arc::new(
                agents.into_iter().map(|a| Some(Arc::new(a))).collect(),
            )),
        }
    }

    pub(super) fn snapshot(&self) -> Snapshot {
        Snapshot(self.slots.read().unwrap_or_else(|p| p.into_inner()).clone())
    }

    pub(super) fn get(&self, i: AgentId) -> Option<Arc<AgentSlot>> {
        self.slots
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(i.0)
            .and_then(Option::clone)
    }

    /// Ids of every enrolled agent, from a snapshot.
    pub(super) fn ids(&self) -> impl Iterator<Item = AgentId> + use<> {
        let snapshot = self.snapshot();
        (0..snapshot.slots())
            .map(AgentId)
            .filter(move |&i| snapshot.get(i).is_some())
    }

    /// How many agents are enrolled.
    pub(super) fn len(&self) -> usize {
        self.snapshot().iter().count()
    }

    /// Retires `retire` and appends `add`, as one step for every reader.
    pub(super) fn replace(&self, retire: &[AgentId], add: Vec<Arc<AgentSlot>>) -> Vec<AgentId> {
        let mut slots = self.slots.write().unwrap_or_else(|p| p.into_inner());
        let mut next: Vec<Option<Arc<AgentSlot>>> = slots.as_ref().clone();
        for i in retire {
            if let Some(slot) = next.get_mut(i.0) {
                *slot = None;
            }
        }
        let mut added = Vec::with_capacity(add.len());
        for agent in add {
            added.push(AgentId(next.len()));
            next.push(Some(agent));
        }
        *slots = Arc::new(next);
        added
    }
}

/// What a reload changed: the new slots of added and changed agents, the
/// retired slots of removed ones.
#[derive(Default)]
pub(super) struct Enrolment {
    pub(super) added: Vec<Arc<AgentSlot>>,
    pub(super) removed: Vec<Arc<AgentSlot>>,
    pub(super) changed: Vec<Arc<AgentSlot>>,
}

impl Enrolment {
    pub(super) fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

/// The change that makes the enrolled agents those of `wanted`: new names
/// are enrolled, missing ones retired, and one whose region, endpoint or
/// identity changed is reconnected with a fresh state (it counts again once
/// read back). `connect` builds a slot; the first failure is returned.
pub(super) fn plan<E>(
    current: &Snapshot,
    wanted: &[AgentEndpoint],
    connect: impl Fn(&AgentEndpoint) -> Result<AgentSlot, E>,
) -> Result<Plan, E> {
    let mut change = Enrolment::default();
    let mut retire = Vec::new();
    let mut add = Vec::new();
    for a in wanted {
        let existing = current.iter().find(|(_, slot)| slot.name == a.name());
        match existing {
            Some((_, slot))
                if slot.region == a.region
                    && slot.endpoint == a.endpoint
                    && slot.identity == a.identity => {}
            Some((i, _)) => {
                retire.push(i);
                let slot = Arc::new(connect(a)?);
                change.changed.push(slot.clone());
                add.push(slot);
            }
            None => {
                let slot = Arc::new(connect(a)?);
                change.added.push(slot.clone());
                add.push(slot);
            }
        }
    }
    for (i, slot) in current.iter() {
        if !wanted.iter().any(|a| a.name() == slot.name) {
            retire.push(i);
            change.removed.push(slot.clone());
        }
    }
    Ok(Plan {
        change,
        retire,
        add,
    })
}

/// A change of the agent table ([`plan`]): what it changes, the slots to
/// retire and the slots to append.
pub(super) struct Plan {
    pub(super) change: Enrolment,
    pub(super) retire: Vec<AgentId>,
    pub(super) add: Vec<Arc<AgentSlot>>,
}

/// The agent table and the dispatcher's queues.
pub(super) struct Fleet {
    pub(super) agents: AgentTable,
    queue: WorkQueue,
    backoff: Backoff,
}

impl Fleet {
    pub(super) fn new(agents: Vec<AgentSlot>, fanout: &FanoutConfig) -> Self {
        Fleet {
            agents: AgentTable::new(agents),
            queue: WorkQueue::new(fanout.concurrency),
            backoff: Backoff {
                base: fanout.backoff_base,
                max: fanout.backoff_max,
            },
        }
    }

    /// Enrolled agent `i`; `None` once a reload removed it.
    pub(super) fn agent(&self, i: AgentId) -> Option<Arc<AgentSlot>> {
        self.agents.get(i)
    }

    /// Asks for agent `i` to be worked on: now when `urgent` (a new generation,
    /// an admin sync), or after its current backoff otherwise.
    pub(super) fn enqueue(&self, i: AgentId, urgent: bool) {
        let Some(agent) = self.agent(i) else {
            return;
        };
        let mut st = agent.lock();
        match st.phase {
            Phase::Idle => {}
            Phase::Queued => return,
            Phase::Waiting(_) if urgent => {}
            Phase::Waiting(_) => return,
            Phase::Running { .. } => {
                st.phase = Phase::Running { again: true };
                return;
            }
        }
        st.phase = Phase::Queued;
        drop(st);
        lock(&self.queue.ready).push_back(i);
        self.queue.wake.notify_one();
    }

    /// Marks every agent for a state read-back and queues it.
    pub(super) fn reconcile_all(&self, urgent: bool) {
        for (i, agent) in self.agents.snapshot().iter() {
            agent.lock().probe = true;
            self.enqueue(i, urgent);
        }
    }

    /// Queues every agent: each visit pushes what it does not hold.
    pub(super) fn push_all(&self) {
        for i in self.agents.ids() {
            self.enqueue(i, true);
        }
    }

    /// The next queued agent, if any.
    pub(super) fn next_ready(&self) -> Option<AgentId> {
        lock(&self.queue.ready).pop_front()
    }

    /// The permits that bound concurrent calls.
    pub(super) fn permits(&self) -> Arc<Semaphore> {
        self.queue.permits.clone()
    }

    /// Resolves when an agent was queued since.
    pub(super) async fn woken(&self) {
        self.queue.wake.notified().await
    }

    /// Takes queued agent `i` into a call: `None` when it was retired or is
    /// no longer queued (requeued urgently, or already running).
    pub(super) fn start(&self, i: AgentId) -> Option<Arc<AgentSlot>> {
        let agent = self.agent(i)?;
        let mut st = agent.lock();
        if st.phase != Phase::Queued {
            return None;
        }
        st.phase = Phase::Running { again: false };
        drop(st);
        Some(agent)
    }

    /// Moves agents whose backoff has passed to the ready queue; returns when the
    /// next one is due.
    pub(super) fn release_due_timers(&self) -> Option<Instant> {
        let now = Instant::now();
        let mut heap = lock(&self.queue.delayed);
        while let Some(Reverse((t, i))) = heap.peek().copied() {
            if t > now {
                return Some(t);
            }
            heap.pop();
            let Some(agent) = self.agent(i) else {
                continue;
            };
            let mut st = agent.lock();
            // A stale entry (the agent was requeued urgently since) is skipped.
            if st.phase == Phase::Waiting(t) {
                st.phase = Phase::Queued;
                drop(st);
                lock(&self.queue.ready).push_back(i);
            }
        }
        None
    }

    /// Records the end of a call task: requeue, back off, or go idle. Returns
    /// whether the call failed.
    pub(super) fn finish(&self, i: AgentId, outcome: Result<(), String>) -> bool {
        let Some(agent) = self.agent(i) else {
            return false;
        };
        let mut st = agent.lock();
        let again = matches!(st.phase, Phase::Running { again: true });
        match outcome {
            Ok(()) => {
                st.failures = 0;
                st.last_error = None;
                if again {
                    st.phase = Phase::Queued;
                    drop(st);
                    lock(&self.queue.ready).push_back(i);
                    self.queue.wake.notify_one();
                } else {
                    st.phase = Phase::Idle;
                }
                false
            }
            Err(error) => {
                st.failures = st.failures.saturating_add(1);
                let delay = self.backoff.delay_random(st.failures);
                let at = Instant::now() + delay;
                tracing::warn!(
                    agent = %agent.name,
                    region = %agent.region,
                    failures = st.failures,
                    retry_in_ms = delay.as_millis() as u64,
                    "agent call failed: {error}"
                );
                st.last_error = Some(error);
                st.phase = Phase::Waiting(at);
                drop(st);
                lock(&self.queue.delayed).push(Reverse((at, i)));
                self.queue.wake.notify_one();
                true
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// An agent of `region` behind a channel that is never dialled.
    pub(in crate::rotator) fn never_dialled(region: &str) -> AgentSlot {
        let endpoint = AgentEndpoint {
            name: None,
            region: region.into(),
            endpoint: "https://127.0.0.1:9".into(),
            identity: format!("{region}.agent"),
        };
        AgentSlot::new(&endpoint, crate::tls::Connection::never_dialled(), 1)
    }

    /// With the clock paused: a failed agent waits out a jittered, doubling,
    /// capped delay before the dispatcher takes it again; an urgent request
    /// (a new generation) does not wait.
    #[tokio::test(start_paused = true)]
    async fn a_failed_agent_is_retried_after_a_growing_jittered_backoff() {
        let fanout = FanoutConfig::default();
        let core = Fleet::new(vec![never_dialled("RegionOne")], &fanout);
        let first = core.agents.ids().next().expect("one agent");
        let base = fanout.backoff_base;
        let max = fanout.backoff_max;
        let mut expected_nominal = base;
        for failure in 1..=10u32 {
            core.agent(first).expect("enrolled").lock().phase = Phase::Running { again: false };
            let failed_at = Instant::now();
            assert!(core.finish(first, Err("unreachable".into())));
            let Phase::Waiting(at) = core.agent(first).expect("enrolled").lock().phase else {
                panic!("not waiting after failure {failure}");
            };
            let delay = at - failed_at;
            assert!(
                delay >= expected_nominal / 2 && delay <= expected_nominal,
                "failure {failure}: {delay:?} outside [{:?}, {expected_nominal:?}]",
                expected_nominal / 2
            );
            // Not released before its time, released at it.
            tokio::time::advance(delay / 2).await;
            assert_eq!(core.release_due_timers(), Some(at));
            assert_eq!(lock(&core.queue.ready).len(), 0);
            tokio::time::advance(at - Instant::now()).await;
            assert_eq!(core.release_due_timers(), None);
            assert_eq!(lock(&core.queue.ready).pop_front(), Some(first));
            assert_eq!(
                core.agent(first).expect("enrolled").lock().phase,
                Phase::Queued
            );
            expected_nominal = (expected_nominal * 2).min(max);
        }
        assert_eq!(core.agent(first).expect("enrolled").lock().failures, 10);
        assert_eq!(
            core.agent(first)
                .expect("enrolled")
                .lock()
                .last_error
                .as_deref(),
            Some("unreachable")
        );

        // A new generation while backing off: queued at once, the old timer ignored.
        core.agent(first).expect("enrolled").lock().phase = Phase::Running { again: false };
        assert!(core.finish(first, Err("unreachable".into())));
        core.enqueue(first, true);
        assert_eq!(
            core.agent(first).expect("enrolled").lock().phase,
            Phase::Queued
        );
        assert_eq!(lock(&core.queue.ready).pop_front(), Some(first));
        tokio::time::advance(max).await;
        core.release_due_timers();
        assert!(
            lock(&core.queue.ready).is_empty(),
            "the stale timer released nothing"
        );

        // Success clears the failure count and the error.
        core.agent(first).expect("enrolled").lock().phase = Phase::Running { again: true };
        assert!(!core.finish(first, Ok(())));
        let agent = core.agent(first).expect("enrolled");
        let st = agent.lock();
        assert_eq!(
            (st.failures, st.last_error.is_none(), st.phase),
            (0, true, Phase::Queued)
        );
    }
}
