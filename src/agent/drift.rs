//! Drift detection: a watch on each repository and its parent directory, through
//! the process's one shared watcher (`fswatch`), wakes a per-repository task, which waits for the burst of events to settle and
//! compares the disk with what the agent installed (`Managed::check_drift`).
//! Events are only a trigger; the comparison of digests under the install lock
//! is what decides, so the agent's own installs never count as drift. A slow
//! periodic check backs up file systems where inotify misses changes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::managed::Managed;
use crate::fswatch::{FileWatch, Subscription};

/// How long a burst of file events must be quiet before the check runs.
const SETTLE: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum DriftError {
    #[error("cannot watch {path} for changes")]
    Watch {
        path: PathBuf,
        #[source]
        source: notify::Error,
    },
}

/// The running watch: a subscription to the shared watcher and one check task
/// per repository. [`DriftWatch::stop`] ends both in order; dropping it instead
/// aborts the tasks at their next await and leaves the watches in place.
pub struct DriftWatch {
    watcher: FileWatch,
    subscription: Option<Subscription>,
    /// Every path handed to `watch`, so `stop` can unwatch them all.
    paths: Vec<PathBuf>,
    tasks: tokio::task::JoinSet<()>,
}

impl DriftWatch {
    /// Waits for the check tasks (the caller has already cancelled `shutdown`),
    /// then removes every watch before returning. `unwatch` is answered
    /// by notify's event thread, so once this returns no event of ours is in
    /// flight: a repository removed afterwards (a test, the demo's temporary
    /// directory) is neither checked nor reported, and notify does not try to
    /// remove watches the kernel already dropped.
    pub async fn stop(mut self) {
        while self.tasks.join_next().await.is_some() {}
        drop(self.subscription.take());
        let (watcher, paths) = (self.watcher.clone(), std::mem::take(&mut self.paths));
        // `unwatch` blocks on a reply from notify's thread; keep it off the runtime.
        let _ = tokio::task::spawn_blocking(move || {
            for path in &paths {
                watcher.unwatch(path);
            }
        })
        .await;
    }
}

fn concerns(event_path: &Path, repo: &Path) -> bool {
    event_path.starts_with(repo) || event_path.parent() == repo.parent()
}

/// Starts watching every repository with `watcher` (the process's shared one,
/// `FileWatch::shared()`, outside tests); checks run until `shutdown` is cancelled.
pub fn spawn(
    watcher: &FileWatch,
    repos: Vec<Arc<Managed>>,
    restore: bool,
    poll: Duration,
    shutdown: CancellationToken,
    audit: Option<Arc<crate::audit::AuditLog>>,
) -> Result<DriftWatch, DriftError> {
    let wakers: Vec<(PathBuf, Arc<Notify>)> = repos
        .iter()
        .map(|r| (r.path.clone(), Arc::new(Notify::new())))
        .collect();
    let routes = wakers.clone();
    let subscription = watcher.subscribe(move |event: &notify::Event| {
        for (path, waker) in &routes {
            if event.paths.iter().any(|p| concerns(p, path)) {
                waker.notify_one();
            }
        }
    });
    let mut paths: Vec<PathBuf> = Vec::with_capacity(repos.len());
    let mut watching = Vec::with_capacity(repos.len());
    for repo in &repos {
        let parent = repo.path.parent().unwrap_or(Path::new("/")).to_path_buf();
        if let Err(source) = watcher.watch(&parent) {
            for path in paths.iter().chain(
                repos
                    .iter()
                    .zip(&watching)
                    .filter(|(_, w)| **w)
                    .map(|(r, _)| &r.path),
            ) {
                watcher.unwatch(path);
            }
            return Err(DriftError::Watch {
                path: parent,
                source,
            });
        }
        paths.push(parent);
        // The repository itself may not exist yet (first install creates it);
        // its task watches it once it does.
        watching.push(watcher.watch(&repo.path).is_ok());
    }
    let mut tasks = tokio::task::JoinSet::new();
    for ((repo, (_, waker)), mut watched) in repos.into_iter().zip(wakers).zip(watching) {
        let watcher = watcher.clone();
        let shutdown = shutdown.clone();
        let audit = audit.clone();
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(poll);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                // Biased: once stopping, a pending event or tick must not win
                // the draw and start one more check.
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => break,
                    _ = waker.notified() => {
                        tokio::select! {
                            biased;
                            _ = shutdown.cancelled() => break,
                            _ = tokio::time::sleep(SETTLE) => {}
                        }
                    }
                    _ = tick.tick() => {}
                }
                if let Some(seen) = repo.check_drift(restore).await {
                    let (outcome, detail) = match seen.restored {
                        None => ("reported", seen.detail),
                        Some(Ok(())) => ("restored", seen.detail),
                        Some(Err(e)) => ("restore failed", format!("{}; {e}", seen.detail)),
                    };
                    crate::audit::maybe_append(
                        audit.as_ref(),
                        crate::audit::Entry {
                            actor: "agent".into(),
                            event: "drift",
                            repository: repo.name.clone(),
                            generation: seen.generation,
                            digest: seen.digest.to_hex(),
                            outcome,
                            detail,
                            ..Default::default()
                        },
                    )
                    .await;
                }
                // An install swaps the directory inode; watch the one now in place.
                if watched {
                    watcher.rewatch(&repo.path);
                } else {
                    watched = watcher.watch(&repo.path).is_ok();
                }
            }
            if watched {
                let path = repo.path.clone();
                // `unwatch` blocks on a reply from notify's thread.
                let _ = tokio::task::spawn_blocking(move || watcher.unwatch(&path)).await;
            }
        });
    }
    Ok(DriftWatch {
        watcher: watcher.clone(),
        subscription: Some(subscription),
        paths,
        tasks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::metrics::AgentMetrics;
    use crate::install;
    use crate::repository::Stamp;
    use crate::repository::{Key, KeySet};

    /// Once `stop` returns, no check task holds the repository any more, so
    /// nothing can check (or report) it again however soon it is removed; and a
    /// change pending as the stop arrives starts no further check.
    #[tokio::test]
    async fn stop_ends_every_check_before_returning() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("keys");
        let set = KeySet::from_keys((0..3).map(|i| (i, Key::generate())));
        let stamp = Stamp {
            generation: 1,
            digest: set.digest(),
            promoted: Default::default(),
            agent: true,
        };
        install::install(&path, &set, Some(&stamp), None).expect("install");
        let metrics = AgentMetrics::register(&mut Default::default());
        let repo =
            Arc::new(Managed::open("tokens".into(), path.clone(), None, metrics).expect("open"));
        let stop = CancellationToken::new();
        let watch = spawn(
            FileWatch::shared(),
            vec![repo.clone()],
            false,
            Duration::from_secs(60),
            stop.clone(),
            None,
        )
        .expect("watch");
        // Drift the checks would report, and the interval's first tick, are both
        // ready when the stop arrives: the stop must win.
        std::fs::remove_file(path.join("1")).expect("remove a key");
        stop.cancel();
        watch.stop().await;
        assert_eq!(Arc::strong_count(&repo), 1, "a check task outlived stop");
        assert_eq!(repo.view().drift, None, "a check ran after the stop");
    }
}
