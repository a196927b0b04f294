//! Fan-out: getting every generation onto every agent. One dispatcher task owns
//! a ready queue and a timer heap of agent indices; it starts at most
//! `concurrency` short-lived call tasks at a time (a semaphore), so 10,000 agents
//! cost 10,000 small fixed-size records and a lazily connected HTTP/2 channel
//! each, not 10,000 idle tasks. A failed agent waits out an exponential backoff
//! with jitter; a reconcile pass reads every agent's state back (`GetState`) and
//! re-pushes to any whose digest differs. Each generation's `InstallRequest` is
//! encoded once, gRPC prefix included, and the same bytes are written to every
//! agent by a bare unary call on its connection (`tls::Connection::unary`):
//! tonic's per-call encoder, decoder and status machinery cost more than the
//! rest of a push once the connection is open.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use zeroize::Zeroizing;

use super::core::{AgentId, AgentSlot, Core, Generation};
use crate::pb;

/// An `InstallRequest` encoded once, with its gRPC prefix, shared by every
/// push of its generation (as the owner of a `Bytes`). It holds key material:
/// wiped when the last push and the generation are gone.
pub(super) struct EncodedInstall(pub(super) Zeroizing<Vec<u8>>);

impl AsRef<[u8]> for EncodedInstall {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

const INSTALL: &str = "/fernetd.v1.Distribution/Install";

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

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these small locks leaves consistent data.
    m.lock().unwrap_or_else(|p| p.into_inner())
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

impl Core {
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

    /// Queues every agent that does not hold the current generation of every
    /// repository.
    pub(super) fn push_all(&self) {
        for i in self.agent_ids() {
            self.enqueue(i, true);
        }
    }

    /// The dispatcher: runs until `shutdown` turns true.
    pub(super) async fn dispatch(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            let next_timer = self.release_due_timers();
            loop {
                let Some(i) = lock(&self.queue.ready).pop_front() else {
                    break;
                };
                let permit = tokio::select! {
                    p = self.queue.permits.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => return,
                    },
                    _ = shutdown.cancelled() => return,
                };
                {
                    // Retired by a reload while queued: nothing to do.
                    let Some(agent) = self.agent(i) else {
                        continue;
                    };
                    let mut st = agent.lock();
                    if st.phase != Phase::Queued {
                        continue;
                    }
                    st.phase = Phase::Running { again: false };
                }
                let core = self.clone();
                tokio::spawn(async move {
                    let outcome = core.work(i).await;
                    core.finish(i, outcome);
                    drop(permit);
                });
            }
            let sleep = async {
                match next_timer {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = self.queue.wake.notified() => {}
                _ = sleep => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// Moves agents whose backoff has passed to the ready queue; returns when the
    /// next one is due.
    fn release_due_timers(&self) -> Option<Instant> {
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

    /// Records the end of a call task: requeue, back off, or go idle.
    fn finish(&self, i: AgentId, outcome: Result<(), String>) {
        let Some(agent) = self.agent(i) else {
            return;
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
                self.metrics.push_failures.inc();
            }
        }
    }

    /// One visit to agent `i`: read its state back if asked, then push every
    /// repository it does not hold at the current generation.
    async fn work(&self, i: AgentId) -> Result<(), String> {
        let Some(agent) = self.agent(i) else {
            return Ok(());
        };
        let probe = agent.lock().probe;
        if probe {
            // Boxed: a read-back is rare, and its tonic call would otherwise
            // size every push's task (a spawned future is copied in whole).
            let state = Box::pin(self.get_state(&agent))
                .await
                .inspect_err(|_| agent.lock().connected = false)?;
            agent.lock().connected = true;
            self.observe_state(i, &state)?;
            agent.lock().probe = false;
        }
        for (r, repo) in self.repos() {
            let generation = repo.current();
            if agent.holds(r, &generation) {
                continue;
            }
            if let Some(reason) = self.agent_ahead(i, r, &generation) {
                return Err(reason);
            }
            let started = std::time::Instant::now();
            let result = self.install(&agent, &generation).await;
            agent.lock().connected = result.is_ok();
            let response = result?;
            self.metrics
                .push_seconds
                .observe(started.elapsed().as_secs_f64());
            self.observe_install(i, r, &generation, &response)?;
        }
        Ok(())
    }

    async fn install(
        &self,
        agent: &AgentSlot,
        generation: &Generation,
    ) -> Result<pb::InstallResponse, String> {
        let channel = &agent.channel;
        let timeout = self.fanout.call_timeout;
        let call = || async move {
            let answer = channel
                .unary(INSTALL, generation.encoded(), timeout)
                .await
                .map_err(|s| crate::describe_status(&s))?;
            <pb::InstallResponse as prost::Message>::decode(answer)
                .map_err(|e| format!("Install: undecodable answer: {e}"))
        };
        with_deadline(timeout, "Install", call).await
    }

    pub(super) async fn get_state(
        &self,
        agent: &AgentSlot,
    ) -> Result<pb::GetStateResponse, String> {
        let mut client = pb::distribution_client::DistributionClient::new(agent.channel.clone());
        let timeout = self.fanout.call_timeout;
        // The current generations: an agent holding them takes this read-back,
        // from the rotator's identity only, as the confirmation that opens its
        // readiness gate (a restarted agent that needs no push).
        let current = self
            .repos()
            .map(|(_, repo)| {
                let generation = repo.current();
                pb::RepositoryGeneration {
                    name: repo.name.clone(),
                    generation: generation.number,
                    digest: generation.digest.0.to_vec(),
                }
            })
            .collect();
        let call = || async move {
            let mut request = tonic::Request::new(pb::GetStateRequest { current });
            request.set_timeout(timeout);
            client
                .get_state(request)
                .await
                .map(tonic::Response::into_inner)
                .map_err(|s| crate::describe_status(&s))
        };
        with_deadline(timeout, "GetState", call).await
    }
}

/// The future `call` makes, failed with a message naming `what` when it has not
/// finished within `timeout`. It takes the maker, not the future: an async
/// fn's argument keeps its slot for the whole call, so a future passed in
/// would be held twice (as the argument and inside the timeout), and the call
/// task that awaits this is copied in whole when spawned.
async fn with_deadline<T, F: std::future::Future<Output = Result<T, String>>>(
    timeout: Duration,
    what: &str,
    call: impl FnOnce() -> F,
) -> Result<T, String> {
    let call = tokio::time::timeout(timeout, call());
    call.await.unwrap_or_else(|_| {
        Err(format!(
            "{what}: no answer within {}ms",
            timeout.as_millis()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_described_with_their_code() {
        let s = tonic::Status::failed_precondition("generation 3 is older than 5");
        assert_eq!(
            crate::describe_status(&s),
            "FailedPrecondition: generation 3 is older than 5"
        );
    }

    /// With the clock paused: a failed agent waits out a jittered, doubling,
    /// capped delay before the dispatcher takes it again; an urgent request
    /// (a new generation) does not wait.
    #[tokio::test(start_paused = true)]
    async fn a_failed_agent_is_retried_after_a_growing_jittered_backoff() {
        let dir = tempfile::tempdir().expect("tempdir");
        let core = crate::rotator::core::tests::core(dir.path(), &["RegionOne"]);
        let first = core.agent_ids().next().expect("one agent");
        let base = core.fanout.backoff_base;
        let max = core.fanout.backoff_max;
        let mut expected_nominal = base;
        for failure in 1..=10u32 {
            core.agent(first).expect("enrolled").lock().phase = Phase::Running { again: false };
            let failed_at = Instant::now();
            core.finish(first, Err("unreachable".into()));
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
        core.finish(first, Err("unreachable".into()));
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
        core.finish(first, Ok(()));
        let agent = core.agent(first).expect("enrolled");
        let st = agent.lock();
        assert_eq!(
            (st.failures, st.last_error.is_none(), st.phase),
            (0, true, Phase::Queued)
        );
    }

    /// Every push runs in a task of its own, and spawning copies the future
    /// into the task whole: the rare paths (a dial with its TLS handshake, a
    /// state read-back through tonic, the deadline's wrapper holding its
    /// future twice) once made it 7 KB, and that copy was 4 % of the
    /// rotator's CPU at 10,000 agents. They are boxed or restructured; this
    /// keeps them so.
    #[test]
    fn a_push_task_stays_small() {
        let dir = tempfile::tempdir().expect("tempdir");
        let core = crate::rotator::core::tests::core(dir.path(), &["RegionOne"]);
        let first = core.agent_ids().next().expect("one agent");
        let size = std::mem::size_of_val(&core.work(first));
        assert!(size <= 1280, "a push's future takes {size} bytes");
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_without_answer_fails_at_its_deadline() {
        let started = Instant::now();
        let r: Result<(), String> =
            with_deadline(Duration::from_secs(3), "Install", std::future::pending).await;
        assert_eq!(r, Err("Install: no answer within 3000ms".to_owned()));
        assert_eq!(started.elapsed(), Duration::from_secs(3));
    }
}
