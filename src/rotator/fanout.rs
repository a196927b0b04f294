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

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::core::Core;
use super::fleet::AgentSlot;
use super::types::{AgentId, Generation};
use crate::pb;

const INSTALL: &str = "/fernetd.v1.Distribution/Install";

/// The dispatcher: runs until `shutdown` turns true.
pub(super) async fn dispatch(core: Arc<Core>, shutdown: CancellationToken) {
    let fleet = &core.fleet;
    loop {
        let next_timer = fleet.release_due_timers();
        while let Some(i) = fleet.next_ready() {
            let permit = tokio::select! {
                p = fleet.permits().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
                _ = shutdown.cancelled() => return,
            };
            // Retired by a reload while queued, or no longer queued: nothing to do.
            if fleet.start(i).is_none() {
                continue;
            }
            let core = core.clone();
            tokio::spawn(async move {
                let outcome = work(&core, i).await;
                if core.fleet.finish(i, outcome) {
                    core.metrics.push_failures.inc();
                }
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
            _ = fleet.woken() => {}
            _ = sleep => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// One visit to agent `i`: read its state back if asked, then push every
/// repository it does not hold at the current generation.
async fn work(core: &Core, i: AgentId) -> Result<(), String> {
    let Some(agent) = core.fleet.agent(i) else {
        return Ok(());
    };
    let probe = agent.lock().probe;
    if probe {
        // Boxed: a read-back is rare, and its tonic call would otherwise
        // size every push's task (a spawned future is copied in whole).
        let state = Box::pin(get_state(&agent, core.fanout.call_timeout))
            .await
            .inspect_err(|_| agent.lock().connected = false)?;
        agent.lock().connected = true;
        core.observe_state(i, &state)?;
        agent.lock().probe = false;
    }
    for (r, repo) in core.repos() {
        let generation = repo.current();
        if agent.holds(r, &generation) {
            continue;
        }
        if let Some(reason) = core.agent_ahead(i, r, &generation) {
            return Err(reason);
        }
        let started = std::time::Instant::now();
        let result = install(&agent, &generation, core.fanout.call_timeout).await;
        agent.lock().connected = result.is_ok();
        let response = result?;
        core.metrics
            .push_seconds
            .observe(started.elapsed().as_secs_f64());
        core.observe_install(i, r, &generation, &response)?;
    }
    Ok(())
}

async fn install(
    agent: &AgentSlot,
    generation: &Generation,
    timeout: Duration,
) -> Result<pb::InstallResponse, String> {
    let channel = &agent.channel;
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

/// Reads agent `agent`'s state back (`GetState`).
pub(super) async fn get_state(
    agent: &AgentSlot,
    timeout: Duration,
) -> Result<pb::GetStateResponse, String> {
    let mut client = pb::distribution_client::DistributionClient::new(agent.channel.clone());
    let call = || async move {
        let mut request = tonic::Request::new(pb::GetStateRequest {});
        request.set_timeout(timeout);
        client
            .get_state(request)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| crate::describe_status(&s))
    };
    with_deadline(timeout, "GetState", call).await
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
    use tokio::time::Instant;

    #[test]
    fn statuses_are_described_with_their_code() {
        let s = tonic::Status::failed_precondition("generation 3 is older than 5");
        assert_eq!(
            crate::describe_status(&s),
            "FailedPrecondition: generation 3 is older than 5"
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
        let core = crate::rotator::core::tests::core(&["RegionOne"]);
        let first = core.fleet.agents.ids().next().expect("one agent");
        let size = std::mem::size_of_val(&work(&core, first));
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
