//! Drift detection: a `notify` watch on each repository and its parent directory
//! wakes a per-repository task, which waits for the burst of events to settle and
//! compares the disk with what the agent installed (`Managed::check_drift`).
//! Events are only a trigger; the comparison of digests under the install lock
//! is what decides, so the agent's own installs never count as drift. A slow
//! periodic check backs up file systems where inotify misses changes.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use notify::event::{AccessKind, EventKind};
use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::{Notify, watch};

use super::managed::Managed;

/// How long a burst of file events must be quiet before the check runs.
const SETTLE: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum DriftError {
    #[error("cannot start watching the file system")]
    Watcher(#[source] notify::Error),
    #[error("cannot watch {path} for changes")]
    Watch {
        path: PathBuf,
        #[source]
        source: notify::Error,
    },
}

/// Keeps the watcher alive; dropping it stops the watch.
pub struct DriftWatch {
    _watcher: Arc<Mutex<RecommendedWatcher>>,
}

/// Whether an event can mean a change: opening or reading a key (Keystone does
/// it on every token operation, and so does the check itself) cannot.
fn is_change(kind: &EventKind) -> bool {
    !matches!(
        kind,
        EventKind::Access(
            AccessKind::Open(_) | AccessKind::Read | AccessKind::Any | AccessKind::Other
        ) | EventKind::Access(AccessKind::Close(notify::event::AccessMode::Read))
    )
}

fn concerns(event_path: &Path, repo: &Path) -> bool {
    event_path.starts_with(repo) || event_path.parent() == repo.parent()
}

async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    // A closed channel means the agent is gone: stop as well.
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Starts watching every repository; checks run until `shutdown` turns true.
pub fn spawn(
    repos: Vec<Arc<Managed>>,
    restore: bool,
    poll: Duration,
    shutdown: watch::Receiver<bool>,
) -> Result<DriftWatch, DriftError> {
    let wakers: Vec<(PathBuf, Arc<Notify>)> = repos
        .iter()
        .map(|r| (r.path.clone(), Arc::new(Notify::new())))
        .collect();
    let routes = wakers.clone();
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if !is_change(&event.kind) {
            return;
        }
        for (path, waker) in &routes {
            if event.paths.iter().any(|p| concerns(p, path)) {
                waker.notify_one();
            }
        }
    })
    .map_err(DriftError::Watcher)?;
    let watcher = Arc::new(Mutex::new(watcher));
    for repo in &repos {
        let parent = repo.path.parent().unwrap_or(Path::new("/")).to_path_buf();
        let mut w = watcher.lock().unwrap_or_else(|p| p.into_inner());
        w.watch(&parent, RecursiveMode::NonRecursive)
            .map_err(|source| DriftError::Watch {
                path: parent,
                source,
            })?;
        // The repository itself may not exist yet (first install creates it).
        let _ = w.watch(&repo.path, RecursiveMode::NonRecursive);
    }
    for (repo, (_, waker)) in repos.into_iter().zip(wakers) {
        let watcher = watcher.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(poll);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = waker.notified() => tokio::time::sleep(SETTLE).await,
                    _ = tick.tick() => {}
                    _ = stopped(&mut shutdown) => break,
                }
                repo.check_drift(restore).await;
                // An install swaps the directory inode; watch the one now in place.
                let mut w = watcher.lock().unwrap_or_else(|p| p.into_inner());
                let _ = w.watch(&repo.path, RecursiveMode::NonRecursive);
            }
        });
    }
    Ok(DriftWatch { _watcher: watcher })
}
