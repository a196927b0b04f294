//! The duties of the rotator that leads: the fan-out's dispatcher, the
//! read-back of every agent (at once, then every `reconcile_interval`), the
//! cron schedule and the credential repository's own schedule. A single
//! rotator runs them from start to shutdown; under `[ha]` they run for each
//! term of leadership (`leader.rs`). One copy for both.

use std::sync::Arc;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::core::Core;
use super::schedule::Schedule;
use super::types::now_ms;

/// Starts every duty on `tasks`, until `stop`. Every agent is read back first:
/// acknowledgements remembered in the store are only a hint.
pub(super) fn spawn(
    core: &Arc<Core>,
    schedule: Schedule,
    stop: &CancellationToken,
    tasks: &mut JoinSet<()>,
) {
    tasks.spawn(super::fanout::dispatch(core.clone(), stop.clone()));
    core.fleet.reconcile_all(true);
    tasks.spawn(reconcile_loop(core.clone(), stop.clone()));
    tasks.spawn(schedule_loop(core.clone(), schedule, stop.clone()));
    tasks.spawn(credential_schedule(core.clone(), stop.clone()));
}

/// Periodic read-back of every agent, and lazy recording of acknowledgements.
async fn reconcile_loop(core: Arc<Core>, stop: CancellationToken) {
    let mut reconcile = tokio::time::interval(core.fanout.reconcile_interval);
    reconcile.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    reconcile.tick().await;
    let mut flush = tokio::time::interval(std::time::Duration::from_secs(1));
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = reconcile.tick() => core.fleet.reconcile_all(false),
            _ = flush.tick() => {
                core.flush_acks().await;
                core.review_quarantine().await;
                core.flush_ledgers().await;
            }
            _ = stop.cancelled() => return,
        }
    }
}

/// Rotates at each cron occurrence. A scheduled rotation that is blocked (an
/// agent behind) or held (it would purge a key a valid token may need) is owed,
/// and performed once: as soon as every agent caught up, or at the purge-safe
/// time. A cron tick less than one interval after such a late rotation is
/// deferred to one interval after it, so no key lives an interval less than
/// the schedule promises.
async fn schedule_loop(core: Arc<Core>, schedule: Schedule, stop: CancellationToken) {
    let mut progress = core.progress();
    loop {
        let now = chrono::Utc::now();
        let Some((next, delay)) = schedule.delay_from(now) else {
            tracing::warn!(
                schedule = schedule.expr(),
                "the schedule has no further occurrence"
            );
            return;
        };
        let interval = schedule.rotation_interval(now);
        for repo in core.repos.iter().filter(|r| r.kind.signs_tokens()) {
            repo.next_rotation_ms.store(
                next.timestamp_millis(),
                std::sync::atomic::Ordering::Release,
            );
        }
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            let held = until(core.held_until_ms());
            tokio::select! {
                _ = &mut sleep => {
                    core.scheduled_tick(interval, stop.clone()).await;
                    break;
                }
                _ = held => {
                    tracing::info!("purge-safe time reached: performing the rotation that was held");
                    core.scheduled_rotation(true, stop.clone()).await;
                }
                changed = progress.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    // Demotions are recorded as soon as every agent holds a
                    // generation: the key-lifetime rule counts from then.
                    for (r, _) in core.repos() {
                        core.note_demotions(r);
                    }
                    core.refresh_blocked();
                    if core.owed_now() {
                        tracing::info!("every agent caught up: performing the rotation that was blocked");
                        core.scheduled_rotation(true, stop.clone()).await;
                    }
                }
                _ = stop.cancelled() => return,
            }
        }
    }
}

/// Sleeps until the Unix time `at_ms`; pending forever when there is none.
async fn until(at_ms: Option<i64>) {
    let Some(at_ms) = at_ms else {
        return std::future::pending().await;
    };
    let wait = u64::try_from(at_ms.saturating_sub(now_ms())).unwrap_or(0);
    // A little after, so the purge-safe comparison has certainly passed.
    tokio::time::sleep(std::time::Duration::from_millis(wait + 5)).await;
}

/// Rotates the credential repository on its own cron, when it has one.
/// Never on `[schedule]`: a tick there skips it.
async fn credential_schedule(core: Arc<Core>, stop: CancellationToken) {
    let Some((r, schedule)) = core.credential_schedule() else {
        return;
    };
    loop {
        let Some((next, delay)) = schedule.delay_from(chrono::Utc::now()) else {
            return;
        };
        core.repos[r].next_rotation_ms.store(
            next.timestamp_millis(),
            std::sync::atomic::Ordering::Release,
        );
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.cancelled() => return,
        }
        let request = super::types::RotateOrder {
            no_wait: true,
            repositories: vec![core.repos[r].name.clone()],
            ..Default::default()
        };
        if let Err(e) = core.rotate(&request, "schedule", stop.clone()).await {
            tracing::error!(error = %crate::error_chain(&e), "scheduled credential rotation failed");
        }
    }
}
