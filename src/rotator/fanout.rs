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

use tokio_util::sync::CancellationToken;

use super::calls::{get_state, install};
use super::core::Core;
use super::types::AgentId;

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
    // A quarantined agent is read back before anything is sent: a push that
    // may land pins a key, and one that cannot answer should not.
    let probe = {
        let st = agent.lock();
        st.probe || st.quarantined.is_some()
    };
    if probe {
        // Boxed: a read-back is rare, and its tonic call would otherwise
        // size every push's task (a spawned future is copied in whole).
        // It names the current generations, which confirm an agent already
        // holding them (its readiness gate).
        let state = Box::pin(async {
            let generations: Vec<_> = core.repos().map(|(_, r)| (r, r.current())).collect();
            let current: Vec<_> = generations
                .iter()
                .map(|(repo, generation)| (repo.name.as_str(), &**generation))
                .collect();
            get_state(&agent, core.fanout.call_timeout, &current).await
        })
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
        if agent.is_quarantined() {
            Box::pin(core.pin_delivery(i, r, &generation)).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
