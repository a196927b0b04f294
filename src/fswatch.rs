//! One file-system watcher per process, shared by everything a daemon follows on
//! disk: the certificate files of every TLS configuration and the agent's drift
//! watch. Each inotify instance counts against a small per-user limit (128 by
//! default), so a host running a hundred daemons, or a container sharing the
//! host's user, runs out when each component opens its own; one-shot commands
//! open none (they load their certificates without following them). When no
//! inotify instance or watch can be had, the paths are polled instead and a
//! warning says so: a daemon that notices changes a little later beats one that
//! refuses to start.
//!
//! Subscribers receive every event that can mean a change and pick their own
//! paths out. Opening or reading a file cannot: Keystone opens its keys on
//! every token operation, a certificate check reads the certificates, and a
//! follower that took those for changes would look again, see its own look,
//! and never rest (a hundred agents sharing one certificate directory kept
//! each other busy that way). Watched paths are reference counted, since the
//! rotator's client and server TLS follow the same directory and one
//! unwatching it must not blind the other.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, EventKind};
use notify::{Event, PollWatcher, RecommendedWatcher, RecursiveMode, Watcher};

/// How often polled paths are scanned when inotify is unavailable: changes
/// (certificate replacement, drift) are rare, and a scan only stats a few
/// directories, so a couple of seconds costs nothing and still reacts quickly.
pub const FALLBACK_POLL: Duration = Duration::from_secs(2);

type Callback = Arc<dyn Fn(&Event) + Send + Sync>;

#[derive(Default)]
struct Subscribers {
    next: u64,
    list: Vec<(u64, Callback)>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Backend {
    Inotify,
    Polling,
}

struct State {
    inotify: Option<RecommendedWatcher>,
    polling: Option<PollWatcher>,
    /// Every watched path: how many callers asked, and who watches it.
    watched: HashMap<PathBuf, (usize, Backend)>,
}

struct Inner {
    state: Mutex<State>,
    subscribers: Arc<Mutex<Subscribers>>,
    poll_interval: Duration,
}

/// A handle on the process's watcher; clones share it.
#[derive(Clone)]
pub struct FileWatch {
    inner: Arc<Inner>,
}

/// Receives events until dropped.
pub struct Subscription {
    id: u64,
    subscribers: Arc<Mutex<Subscribers>>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        lock(&self.subscribers)
            .list
            .retain(|(id, _)| *id != self.id);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panicking subscriber must not disable every other watch of the process.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether `error` means the kernel's watch resources are exhausted or absent
/// (instances, watches, memory, no inotify at all), as opposed to a path that is
/// missing or unreadable, which polling would not fix either.
fn is_resource_limit(error: &notify::Error) -> bool {
    match &error.kind {
        notify::ErrorKind::MaxFilesWatch => true,
        notify::ErrorKind::Io(io) => {
            let limits = [
                rustix::io::Errno::MFILE,
                rustix::io::Errno::NFILE,
                rustix::io::Errno::NOSPC,
                rustix::io::Errno::NOMEM,
                rustix::io::Errno::NOSYS,
            ];
            io.raw_os_error()
                .is_some_and(|code| limits.iter().any(|e| e.raw_os_error() == code))
        }
        _ => false,
    }
}

impl FileWatch {
    /// The process's watcher, created on first use.
    pub fn shared() -> &'static FileWatch {
        static SHARED: OnceLock<FileWatch> = OnceLock::new();
        SHARED.get_or_init(|| FileWatch::start(notify::recommended_watcher, FALLBACK_POLL))
    }

    /// A watcher whose inotify instance comes from `create`; when that fails,
    /// every path is polled every `poll_interval`. Tests inject the failure here.
    pub fn start<F>(create: F, poll_interval: Duration) -> FileWatch
    where
        F: FnOnce(Box<dyn Fn(notify::Result<Event>) + Send>) -> notify::Result<RecommendedWatcher>,
    {
        let subscribers = Arc::new(Mutex::new(Subscribers::default()));
        let inotify = match create(handler(&subscribers)) {
            Ok(w) => Some(w),
            Err(error) => {
                tracing::warn!(
                    error = %crate::error_chain(&error),
                    poll = ?poll_interval,
                    "cannot create an inotify instance; following files by polling instead"
                );
                None
            }
        };
        FileWatch {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    inotify,
                    polling: None,
                    watched: HashMap::new(),
                }),
                subscribers,
                poll_interval,
            }),
        }
    }

    /// Calls `callback` for every event of every watched path, on the watcher's
    /// own thread: it must be quick and must not call back into this watcher.
    pub fn subscribe(&self, callback: impl Fn(&Event) + Send + Sync + 'static) -> Subscription {
        let mut subs = lock(&self.inner.subscribers);
        let id = subs.next;
        subs.next += 1;
        subs.list.push((id, Arc::new(callback)));
        Subscription {
            id,
            subscribers: self.inner.subscribers.clone(),
        }
    }

    /// Whether paths are polled rather than watched through inotify.
    pub fn is_polling(&self) -> bool {
        lock(&self.inner.state).inotify.is_none()
    }

    /// Starts watching `path` (not recursively), or counts one more interest in
    /// it. Falls back to polling it when the inotify limits are reached. Blocks
    /// briefly on the watcher's thread.
    pub fn watch(&self, path: &Path) -> notify::Result<()> {
        let mut state = lock(&self.inner.state);
        if let Some((count, _)) = state.watched.get_mut(path) {
            *count += 1;
            return Ok(());
        }
        let backend = match state.inotify.as_mut() {
            Some(w) => match w.watch(path, RecursiveMode::NonRecursive) {
                Ok(()) => Backend::Inotify,
                Err(error) if is_resource_limit(&error) => {
                    tracing::warn!(
                        path = %path.display(),
                        error = %crate::error_chain(&error),
                        poll = ?self.inner.poll_interval,
                        "inotify watch limit reached; polling this path instead"
                    );
                    Backend::Polling
                }
                Err(error) => return Err(error),
            },
            None => Backend::Polling,
        };
        if backend == Backend::Polling {
            self.polling(&mut state)?
                .watch(path, RecursiveMode::NonRecursive)?;
        }
        state.watched.insert(path.to_path_buf(), (1, backend));
        Ok(())
    }

    /// Watches `path` again if it is watched through inotify: a watch follows an
    /// inode, so after a directory was swapped for another (an install), the
    /// new one must be watched. Polling follows paths and needs nothing.
    pub fn rewatch(&self, path: &Path) {
        let mut state = lock(&self.inner.state);
        if state.watched.get(path).map(|(_, b)| *b) != Some(Backend::Inotify) {
            return;
        }
        if let Some(w) = state.inotify.as_mut() {
            // Gone for the moment (mid-swap): the next check watches it again.
            let _ = w.watch(path, RecursiveMode::NonRecursive);
        }
    }

    /// Drops one interest in `path`; the last one removes the watch. Blocks on the
    /// watcher's thread: call it off the async runtime.
    pub fn unwatch(&self, path: &Path) {
        let mut state = lock(&self.inner.state);
        let Some((count, backend)) = state.watched.get_mut(path) else {
            return;
        };
        *count -= 1;
        if *count > 0 {
            return;
        }
        let backend = *backend;
        state.watched.remove(path);
        // The kernel may have dropped the watch already (the path was removed or
        // swapped away): nothing left to undo then.
        let _ = match backend {
            Backend::Inotify => state.inotify.as_mut().map(|w| w.unwatch(path)),
            Backend::Polling => state.polling.as_mut().map(|w| w.unwatch(path)),
        };
    }

    fn polling<'s>(&self, state: &'s mut State) -> notify::Result<&'s mut PollWatcher> {
        if state.polling.is_none() {
            let config = notify::Config::default().with_poll_interval(self.inner.poll_interval);
            state.polling = Some(PollWatcher::new(handler(&self.inner.subscribers), config)?);
        }
        state
            .polling
            .as_mut()
            .ok_or_else(|| notify::Error::generic("polling watcher unavailable"))
    }
}

/// Whether an event can mean a change: opening, reading or closing a file
/// that was only read cannot (inotify reports every open).
fn is_change(kind: &EventKind) -> bool {
    !matches!(
        kind,
        EventKind::Access(
            AccessKind::Open(_)
                | AccessKind::Read
                | AccessKind::Any
                | AccessKind::Other
                | AccessKind::Close(AccessMode::Read)
        )
    )
}

fn handler(subscribers: &Arc<Mutex<Subscribers>>) -> Box<dyn Fn(notify::Result<Event>) + Send> {
    let subscribers = subscribers.clone();
    Box::new(move |event: notify::Result<Event>| {
        let Ok(event) = event else { return };
        if !is_change(&event.kind) {
            return;
        }
        // Snapshot, so a subscriber dropping its subscription meanwhile cannot deadlock.
        let list: Vec<Callback> = lock(&subscribers)
            .list
            .iter()
            .map(|(_, c)| c.clone())
            .collect();
        for callback in list {
            callback(&event);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failing(_: Box<dyn Fn(notify::Result<Event>) + Send>) -> notify::Result<RecommendedWatcher> {
        Err(notify::Error::io(std::io::Error::from_raw_os_error(
            rustix::io::Errno::MFILE.raw_os_error(),
        )))
    }

    /// Without inotify ("Too many open files"), a change is still reported, by
    /// polling.
    #[tokio::test]
    async fn falls_back_to_polling_when_inotify_cannot_be_created() {
        let dir = tempfile::tempdir().expect("tempdir");
        let watch = FileWatch::start(failing, Duration::from_millis(20));
        assert!(watch.is_polling());
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let _sub = watch.subscribe(move |e| {
            let _ = tx.send(e.paths.clone());
        });
        watch.watch(dir.path()).expect("polling watch");
        std::fs::write(dir.path().join("cert.pem"), b"x").expect("write");
        let seen = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let paths = rx.recv().await.expect("watcher alive");
                if paths.iter().any(|p| p.ends_with("cert.pem")) {
                    return;
                }
            }
        })
        .await;
        assert!(seen.is_ok(), "no event for the new file within 10 s");
    }

    /// Reading a watched file reaches no subscriber; writing one does. Events
    /// arrive in order, so once the write's is in, the read's would have been.
    #[tokio::test]
    async fn opening_and_reading_a_file_is_not_a_change() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cert = dir.path().join("ca.pem");
        std::fs::write(&cert, b"before").expect("write");
        let watch = FileWatch::start(notify::recommended_watcher, Duration::from_secs(60));
        assert!(!watch.is_polling(), "this test needs inotify");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let _sub = watch.subscribe(move |e| {
            let _ = tx.send((e.kind, e.paths.clone()));
        });
        watch.watch(dir.path()).expect("watch");
        for _ in 0..3 {
            assert_eq!(std::fs::read(&cert).expect("read"), b"before");
        }
        std::fs::write(dir.path().join("other.pem"), b"x").expect("write");
        let seen = tokio::time::timeout(Duration::from_secs(10), async {
            let mut seen = Vec::new();
            loop {
                let (kind, paths) = rx.recv().await.expect("watcher alive");
                let done = paths.iter().any(|p| p.ends_with("other.pem"));
                seen.push((kind, paths));
                if done {
                    return seen;
                }
            }
        })
        .await
        .expect("the write is reported within 10 s");
        let reads: Vec<_> = seen
            .iter()
            .filter(|(_, paths)| paths.iter().any(|p| p.ends_with("ca.pem")))
            .collect();
        assert!(reads.is_empty(), "reads reported as changes: {reads:?}");
    }

    /// Two interests in one directory: the first unwatch keeps the watch.
    #[test]
    fn watches_are_counted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let watch = FileWatch::start(failing, Duration::from_secs(60));
        watch.watch(dir.path()).expect("watch");
        watch.watch(dir.path()).expect("watch again");
        watch.unwatch(dir.path());
        assert!(lock(&watch.inner.state).watched.contains_key(dir.path()));
        watch.unwatch(dir.path());
        assert!(!lock(&watch.inner.state).watched.contains_key(dir.path()));
    }
}
