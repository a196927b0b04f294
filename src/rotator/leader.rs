//! Leadership under `[ha]`: terms of an etcd lease (`ha.rs` campaigns, renews
//! and resigns). As a standby a rotator follows what the leader commits and
//! campaigns every third of the lease; as the leader it runs the leader's
//! duties (`duties.rs`) for the term, renewing the lease meanwhile, and stops
//! them the moment the term ends.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::core::Core;
use super::ha::EtcdState;

/// Terms of leadership until `stop`: as a standby, follow etcd and campaign
/// every third of the lease; as the leader, run the schedule, the fan-out and
/// the reconcile until the term ends, renewing the lease meanwhile.
pub(super) async fn terms(
    core: Arc<Core>,
    ha: Arc<EtcdState>,
    schedule: super::schedule::Schedule,
    stop: CancellationToken,
) {
    let tick = ha.ttl / 3;
    loop {
        if stop.is_cancelled() {
            return;
        }
        if !ha.is_leader() {
            follow(&core).await;
            if let Err(e) = ha.campaign().await {
                ha.unreachable(&e);
            }
            if !ha.is_leader() {
                tokio::select! {
                    _ = tokio::time::sleep(tick) => {}
                    _ = stop.cancelled() => {}
                }
                continue;
            }
        }
        // A new term: take what the last leader committed, read every agent back.
        if let Err(e) = core.refresh().await {
            ha.lose(&format!(
                "cannot read the state at the start of the term: {}",
                crate::error_chain(&e)
            ));
            continue;
        }
        let term = ha.term_token();
        let term_stop = stop.child_token();
        let mut tasks = tokio::task::JoinSet::new();
        super::duties::spawn(&core, schedule.clone(), &term_stop, &mut tasks);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(tick) => ha.renew().await,
                _ = term.cancelled() => break,
                _ = stop.cancelled() => break,
            }
            if !ha.is_leader() {
                break;
            }
        }
        term_stop.cancel();
        while tasks.join_next().await.is_some() {}
    }
}

/// A standby's refresh: the generations, ledgers, acknowledgements and
/// records the leader wrote.
async fn follow(core: &Core) {
    if let Err(e) = core.refresh().await {
        tracing::debug!(error = %crate::error_chain(&e), "cannot follow etcd");
    }
}
