//! Atomic installation of a complete key set into a Keystone key repository. The
//! new repository is built in a temporary sibling directory on the same filesystem
//! (every file created exclusively, mode 0600, owned by the Keystone user, written
//! and fsynced; the directory 0700 and fsynced), then swapped in with one
//! `renameat2(RENAME_EXCHANGE)`, or a symlink flip when the repository is a
//! symlink, so that a crash at any moment leaves either the old or the new set on
//! disk. The generation and digest are recorded inside the new directory, in a
//! file whose name is not an integer (Keystone skips it), so keys and generation
//! always change together. Where the kernel or filesystem cannot exchange (an old
//! kernel, a repository that is itself a mount point) the installer falls back to
//! an ordered in-place update and says so. These are blocking std-fs functions;
//! async callers use `spawn_blocking`.
//!
//! The previous set is not removed at the swap but [`RETIRE_GRACE`] later, by
//! one reaper thread per process: Keystone lists a repository by path
//! (`opendir`, then `readdir`), and a listing that opened the old directory
//! just before the swap would otherwise read it after its files were removed,
//! and find no key at all. A process that exits right after installing calls
//! [`settle`] first; a crash leaves the old set to [`clean_leftovers`].
//!
//! A rotation changes one key and renames one: the others are byte for byte
//! in the live set already. When the live set was installed here (it holds our
//! stamp, so its files were flushed), the new directory hard-links those files
//! instead of writing copies, after checking each one's content, mode and
//! owner through the very inode it links. A new file costs an inode allocation
//! and an fsync; on a filesystem without a journal, allocating scans past every
//! inode freed in the last half minute, which made file creation most of an
//! agent's CPU at a fast rotation cadence. Anything that does not match exactly
//! is written fresh, as before.
//!
//! For the same reason the previous set is not deleted after its grace but
//! stripped: names linked elsewhere are unlinked, the inodes only it held (the
//! purged key, the old stamp) are truncated to nothing, and the directory is
//! kept, in memory as one of this repository's spares (at most
//! [`SPARE_SETS`]), for a later install to build in. A steady rotation then
//! allocates and frees no inode at all. A spare
//! left by a process that stopped is a leftover like any other: it holds no
//! key, and [`clean_leftovers`] removes it.

use std::fs::File;
use std::io::{self, Write as _};
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustix::fs::{AtFlags, FlockOperation, Mode, OFlags, RenameFlags};
use rustix::io::Errno;

use crate::repository::{self, Digest, KeySet, STAMP_FILE, Stamp};

/// Mode of every key file and of the stamp, as `keystone-manage` makes them.
const FILE_MODE: u32 = 0o600;
/// Mode of the repository directory.
const DIR_MODE: u32 = 0o700;
/// Prefix of temporary files inside a repository during an in-place update.
const INPLACE_TMP_PREFIX: &str = ".fernetd-tmp-";

/// How long the previous set stays on disk (under a name of ours) after a swap:
/// far longer than a listing in flight takes, short enough that a purged key
/// does not linger.
pub const RETIRE_GRACE: Duration = Duration::from_secs(1);

/// Most files a spare keeps: a rotation writes one new key and the stamp.
const SPARE_FILES: usize = 4;
/// Most spares a repository keeps. Two, so that installs about a grace apart
/// still find one: with a single spare, a strip that landed just after the
/// next install left that install none (it made new inodes), and the strip
/// after it found the slot full and freed a whole set, so every other install
/// of a fast series paid for new inodes.
const SPARE_SETS: usize = 2;
/// Name of a kept inode inside a spare; not an integer, so never a key.
const SPARE_PREFIX: &str = ".fernetd-spare-";

/// What the reaper thread is asked to do, in order.
enum Reap {
    /// Strip `retired`, the previous set of repository `target`, at the deadline.
    Retire {
        at: Instant,
        retired: PathBuf,
        target: PathBuf,
    },
    Flush(std::sync::mpsc::Sender<()>),
}

/// Each repository's spare directories, stripped of keys (see the module
/// documentation), oldest first; taken by the next installs, under the
/// parent's lock.
static SPARES: std::sync::Mutex<std::collections::BTreeMap<PathBuf, Vec<PathBuf>>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

fn spares() -> std::sync::MutexGuard<'static, std::collections::BTreeMap<PathBuf, Vec<PathBuf>>> {
    SPARES.lock().unwrap_or_else(|p| p.into_inner())
}

static REAPER: std::sync::OnceLock<Option<std::sync::mpsc::Sender<Reap>>> =
    std::sync::OnceLock::new();

/// The process's reaper, started on first use; `None` if no thread could be started.
fn reaper() -> Option<&'static std::sync::mpsc::Sender<Reap>> {
    REAPER
        .get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::channel::<Reap>();
            let spawned = std::thread::Builder::new()
                .name("fernetd-reaper".into())
                .spawn(move || {
                    // Deadlines arrive in order (one grace for all), so
                    // handling them one after another is never late.
                    for reap in rx {
                        match reap {
                            Reap::Retire {
                                at,
                                retired,
                                target,
                            } => {
                                std::thread::sleep(at.saturating_duration_since(Instant::now()));
                                recycle(&target, &retired);
                            }
                            Reap::Flush(done) => {
                                let _ = done.send(());
                            }
                        }
                    }
                });
            spawned.ok().map(|_| tx)
        })
        .as_ref()
}

fn remove_retired(path: &Path) {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove the previous key directory");
        }
        _ => {}
    }
}

/// Strips the previous set at `retired` into one of `target`'s spares, or
/// removes it when it cannot be stripped.
fn recycle(target: &Path, retired: &Path) {
    match strip(retired) {
        Ok(()) => {
            let oldest = {
                let mut spares = spares();
                let kept = spares.entry(target.to_path_buf()).or_default();
                kept.push(retired.to_path_buf());
                (kept.len() > SPARE_SETS).then(|| kept.remove(0))
            };
            if let Some(oldest) = oldest {
                remove_retired(&oldest);
            }
        }
        Err(e) => {
            tracing::debug!(path = %retired.display(), error = %e, "previous key directory not kept as a spare");
            remove_retired(retired);
        }
    }
}

/// Unlinks every name in `dir`; the regular files nothing else links (the only
/// ones whose inode an unlink would free) are truncated and kept under
/// [`SPARE_PREFIX`] names instead, up to [`SPARE_FILES`].
fn strip(dir: &Path) -> io::Result<()> {
    let fd = rustix::fs::open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let names = std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<io::Result<Vec<_>>>()?;
    let mut kept = 0;
    for name in names {
        let st = rustix::fs::statat(&fd, name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW)?;
        let sole = is_regular(&st) && st.st_nlink == 1;
        if sole && kept < SPARE_FILES {
            // Renamed first, so that a (very) late reader of the old name
            // finds it gone, as after an unlink; then truncated, so the purged
            // key leaves the disk as an unlink would have taken it.
            let spare = format!("{SPARE_PREFIX}{kept}");
            rustix::fs::renameat_with(
                &fd,
                name.as_os_str(),
                &fd,
                spare.as_str(),
                RenameFlags::NOREPLACE,
            )?;
            kept += 1;
            // Truncated only once the descriptor shows the inode just
            // inspected: the directory belongs to the Keystone user, who may
            // have swapped a FIFO or another file's hard link in meanwhile.
            let file = rustix::fs::openat(
                &fd,
                spare.as_str(),
                OFlags::WRONLY | OFlags::NONBLOCK | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            let now = rustix::fs::fstat(&file)?;
            if !(is_regular(&now)
                && now.st_nlink == 1
                && (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino))
            {
                return Err(io::Error::other(
                    "a spare file was replaced while it was kept",
                ));
            }
            rustix::fs::ftruncate(&file, 0)?;
        } else {
            rustix::fs::unlinkat(&fd, name.as_os_str(), AtFlags::empty())?;
        }
    }
    Ok(())
}

/// Hands the previous set at `retired` to the reaper, or removes it now when
/// there is none.
fn retire(target: PathBuf, retired: PathBuf) {
    let at = Instant::now() + RETIRE_GRACE;
    match reaper() {
        Some(tx) => {
            if let Err(std::sync::mpsc::SendError(Reap::Retire { retired, .. })) =
                tx.send(Reap::Retire {
                    at,
                    retired,
                    target,
                })
            {
                remove_retired(&retired);
            }
        }
        None => remove_retired(&retired),
    }
}

/// Waits until the reaper has handled every set retired so far.
fn flush_reaper() {
    if let Some(Some(tx)) = REAPER.get() {
        let (done, wait) = std::sync::mpsc::channel();
        if tx.send(Reap::Flush(done)).is_ok() {
            let _ = wait.recv();
        }
    }
}

/// Waits until every previous set this process retired is gone (at most
/// [`RETIRE_GRACE`]), spares included; for a process about to exit.
pub fn settle() {
    flush_reaper();
    let drained = std::mem::take(&mut *spares());
    for spare in drained.into_values().flatten() {
        remove_retired(&spare);
    }
}

/// [`settle`] for the repository at `target` only: tests run side by side in
/// one process, and one must not take another's spare away.
#[cfg(test)]
fn settle_one(target: &Path) {
    flush_reaper();
    let kept = split(target).and_then(|(path, name)| spares().remove(&path.join(name)));
    for spare in kept.into_iter().flatten() {
        remove_retired(&spare);
    }
}

/// A repository path's parent directory and file name.
fn split(target: &Path) -> Option<(PathBuf, String)> {
    let name = target.file_name()?.to_str()?.to_owned();
    let path = match target.parent()? {
        p if p.as_os_str().is_empty() => PathBuf::from("."),
        p => p.to_path_buf(),
    };
    Some((path, name))
}

/// Who owns the files of a repository (Keystone's `--keystone-user`/`--keystone-group`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

impl Owner {
    /// Parses `USER:GROUP` (names or numeric ids). A bare `USER` takes that user's
    /// primary group.
    pub fn parse(spec: &str) -> Result<Owner, InstallError> {
        let bad = |reason: &str| InstallError::Owner {
            spec: spec.to_owned(),
            reason: reason.to_owned(),
        };
        let (user, group) = match spec.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (spec, None),
        };
        if user.is_empty() || group.is_some_and(str::is_empty) {
            return Err(bad("expected USER:GROUP"));
        }
        let (uid, primary_gid) = match user.parse::<u32>() {
            Ok(uid) => (uid, None),
            Err(_) => match nix::unistd::User::from_name(user) {
                Ok(Some(u)) => (u.uid.as_raw(), Some(u.gid.as_raw())),
                Ok(None) => return Err(bad("no such user")),
                Err(e) => return Err(bad(&format!("cannot look up the user: {e}"))),
            },
        };
        let gid = match group {
            Some(g) => match g.parse::<u32>() {
                Ok(gid) => gid,
                Err(_) => match nix::unistd::Group::from_name(g) {
                    Ok(Some(gr)) => gr.gid.as_raw(),
                    Ok(None) => return Err(bad("no such group")),
                    Err(e) => return Err(bad(&format!("cannot look up the group: {e}"))),
                },
            },
            None => primary_gid.ok_or_else(|| bad("a numeric user needs a group: USER:GROUP"))?,
        };
        Ok(Owner { uid, gid })
    }
}

/// How the new set was put in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// `renameat2(RENAME_EXCHANGE)` of the repository directory.
    Exchange,
    /// A new directory and an atomic rename of the repository symlink.
    SymlinkFlip,
    /// The repository did not exist; it was created with one rename.
    Created,
    /// The exchange is not supported here: files were replaced one by one,
    /// new keys first, purged keys last. Readers may briefly see a mix.
    InPlace,
}

/// What [`install`] did.
#[derive(Debug, Clone)]
pub struct InstallOutcome {
    pub method: Method,
    pub digest: Digest,
    /// Wall time from the first write to the parent directory's fsync.
    pub elapsed: Duration,
}

/// Why a key set cannot be installed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unusable {
    #[error("the key set is empty (Keystone answers HTTP 500 with no keys)")]
    Empty,
    #[error("the key set has no staged key 0 (the next rotation would fail)")]
    NoStagedKey,
}

/// What went wrong installing or inspecting a repository. In every case the
/// target repository is left as it was.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("refusing to install into {target}: {reason}")]
    Refused {
        target: PathBuf,
        #[source]
        reason: Unusable,
    },
    #[error("stamp digest {stamp} does not match the key set's digest {set}")]
    StampMismatch { stamp: Digest, set: Digest },
    #[error("{path} exists and is not a directory (nor a symlink to one)")]
    NotADirectory { path: PathBuf },
    #[error("{path} has no parent directory or no file name")]
    NoParent { path: PathBuf },
    #[error("cannot {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Stamp(#[from] repository::StampError),
    #[error("invalid owner {spec:?}: {reason}")]
    Owner { spec: String, reason: String },
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> InstallError + use<> {
    let path = path.to_path_buf();
    move |source| InstallError::Io { op, path, source }
}

fn errno_err(op: &'static str, path: &Path) -> impl FnOnce(Errno) -> InstallError + use<> {
    let path = path.to_path_buf();
    move |e| InstallError::Io {
        op,
        path,
        source: e.into(),
    }
}

/// Checks that Keystone can use `set`.
pub fn check_usable(set: &KeySet) -> Result<(), Unusable> {
    if set.is_empty() {
        Err(Unusable::Empty)
    } else if set.staged().is_none() {
        Err(Unusable::NoStagedKey)
    } else {
        Ok(())
    }
}

/// The repository's parent directory, held open and locked so that two installers
/// (or an installer and [`clean_leftovers`]) never work on the same target at once.
struct Parent {
    path: PathBuf,
    name: String,
    fd: OwnedFd,
}

impl Parent {
    fn open(target: &Path) -> Result<Parent, InstallError> {
        let no_parent = || InstallError::NoParent {
            path: target.to_path_buf(),
        };
        let (path, name) = split(target).ok_or_else(no_parent)?;
        let fd = rustix::fs::open(
            &path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(errno_err("open the parent directory of", target))?;
        rustix::fs::flock(&fd, FlockOperation::LockExclusive)
            .map_err(errno_err("lock the parent directory of", target))?;
        Ok(Parent { path, name, fd })
    }

    fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// The repository's path, as the spare registry knows it.
    fn target(&self) -> PathBuf {
        self.path.join(&self.name)
    }

    /// Renames this repository's newest spare, if it has a usable one, to
    /// `name`; returns the names of the inodes it kept.
    fn take_spare(&self, name: &str) -> Option<Vec<String>> {
        let spare = {
            let mut spares = spares();
            let target = self.target();
            let kept = spares.get_mut(&target)?;
            let spare = kept.pop();
            if kept.is_empty() {
                spares.remove(&target);
            }
            spare?
        };
        let usable = spare.parent() == Some(self.path.as_path())
            && spare
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|from| {
                    rustix::fs::renameat_with(
                        &self.fd,
                        from,
                        &self.fd,
                        name,
                        RenameFlags::NOREPLACE,
                    )
                    .is_ok()
                });
        if !usable {
            remove_retired(&spare);
            return None;
        }
        let listed: Option<Vec<String>> = std::fs::read_dir(self.join(name))
            .ok()?
            .map(|e| {
                let n = e.ok()?.file_name().into_string().ok()?;
                n.starts_with(SPARE_PREFIX).then_some(n)
            })
            .collect();
        if listed.is_none() {
            remove_retired(&self.join(name));
        }
        listed
    }

    /// Siblings this installer makes, all hidden and non-numeric.
    fn sibling(&self, kind: &str) -> String {
        format!(".{}.fernetd-{kind}-{}", self.name, unique())
    }

    fn is_ours(&self, entry: &str) -> bool {
        let prefix = format!(".{}.fernetd-", self.name);
        entry.strip_prefix(&prefix).is_some_and(|rest| {
            ["tmp-", "link-", "data-"]
                .iter()
                .any(|k| rest.starts_with(k))
        })
    }

    /// Whether `target` (described by `meta`) is on another filesystem than its parent.
    fn is_mount_point(&self, meta: &std::fs::Metadata) -> Result<bool, InstallError> {
        let st = rustix::fs::fstat(&self.fd).map_err(errno_err("inspect", &self.path))?;
        Ok(st.st_dev != meta.dev())
    }

    fn fsync(&self) -> Result<(), InstallError> {
        rustix::fs::fsync(&self.fd).map_err(errno_err("fsync", &self.path))
    }

    /// Once the new set is in place, an error would wrongly say the target is
    /// unchanged; a failed fsync only means the swap may not survive a power loss.
    fn fsync_after_swap(&self, target: &Path) {
        if let Err(e) = rustix::fs::fsync(&self.fd) {
            tracing::error!(
                repository = %target.display(),
                error = %e,
                "the new key set is in place but its directory entry could not be made durable"
            );
        }
    }
}

fn unique() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{}-{nanos:x}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Whether `st` describes a regular file (not a symlink, directory or device).
fn is_regular(st: &rustix::fs::Stat) -> bool {
    rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::RegularFile
}

/// Gives a file or directory exactly `mode` and, when configured, its owner.
fn set_mode_and_owner(
    fd: &OwnedFd,
    path: &Path,
    mode: u32,
    owner: Option<Owner>,
) -> Result<(), InstallError> {
    rustix::fs::fchmod(fd, Mode::from_raw_mode(mode))
        .map_err(errno_err("set the mode of", path))?;
    if let Some(o) = owner {
        std::os::unix::fs::fchown(fd, Some(o.uid), Some(o.gid))
            .map_err(io_err("change the owner of", path))?;
    }
    Ok(())
}

/// The owner a file made here gets: the configured one, or this process's.
fn wanted_owner(owner: Option<Owner>) -> (u32, u32) {
    match owner {
        Some(o) => (o.uid, o.gid),
        None => (
            rustix::process::geteuid().as_raw(),
            rustix::process::getegid().as_raw(),
        ),
    }
}

/// Writes `name` like [`write_new_file`], into the kept inode `spare` (renamed
/// to `name` once written) when it is still a regular file nothing else links
/// and can be given the owner a new file would get.
fn write_file(
    dir: &OwnedFd,
    dir_path: &Path,
    name: &str,
    content: &[u8],
    owner: Option<Owner>,
    spare: Option<String>,
) -> Result<(), InstallError> {
    let Some(spare) = spare else {
        return write_new_file(dir, dir_path, name, content, owner);
    };
    // Not truncated at open: what is at the name is only known from the
    // descriptor's fstat (a FIFO or another file's hard link must not be
    // waited on or emptied), and only a regular file nothing else links is.
    let reusable = rustix::fs::openat(
        dir,
        spare.as_str(),
        OFlags::WRONLY | OFlags::NONBLOCK | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ok()
    .filter(|fd| {
        rustix::fs::fstat(fd).is_ok_and(|st| {
            is_regular(&st)
                && st.st_nlink == 1
                // A configured owner is set below; this process's own cannot
                // always be taken back from another.
                && (owner.is_some() || (st.st_uid, st.st_gid) == wanted_owner(None))
        })
    })
    .filter(|fd| rustix::fs::ftruncate(fd, 0).is_ok());
    let Some(fd) = reusable else {
        let _ = rustix::fs::unlinkat(dir, spare.as_str(), AtFlags::empty());
        return write_new_file(dir, dir_path, name, content, owner);
    };
    let path = dir_path.join(name);
    fill(fd, &path, content, owner)?;
    rustix::fs::renameat_with(dir, spare.as_str(), dir, name, RenameFlags::NOREPLACE)
        .map_err(errno_err("create", &path))
}

/// Makes the open file `fd` (at `path`) exactly 0600 with `owner`, writes
/// `content` and fsyncs it.
fn fill(
    fd: OwnedFd,
    path: &Path,
    content: &[u8],
    owner: Option<Owner>,
) -> Result<(), InstallError> {
    // The umask may have narrowed the mode; Keystone expects exactly 0600.
    set_mode_and_owner(&fd, path, FILE_MODE, owner)?;
    let mut file = File::from(fd);
    file.write_all(content).map_err(io_err("write", path))?;
    file.sync_all().map_err(io_err("fsync", path))
}

/// Creates `name` in `dir` exclusively, owned and 0600, writes `content`, fsyncs.
fn write_new_file(
    dir: &OwnedFd,
    dir_path: &Path,
    name: &str,
    content: &[u8],
    owner: Option<Owner>,
) -> Result<(), InstallError> {
    let path = dir_path.join(name);
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(FILE_MODE),
    )
    .map_err(errno_err("create", &path))?;
    fill(fd, &path, content, owner)
}

/// The live repository as a source of files to hard-link into a new set; see
/// the module documentation. Every failure here only means "write it fresh".
struct Reusable {
    dir: OwnedFd,
}

impl Reusable {
    /// The live directory, when it holds our stamp: its files were written and
    /// flushed by an install like this one.
    fn open(live: &Path) -> Option<Reusable> {
        let dir = rustix::fs::open(
            live,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .ok()?;
        let stamp = rustix::fs::statat(&dir, STAMP_FILE, AtFlags::SYMLINK_NOFOLLOW).ok()?;
        is_regular(&stamp).then_some(Reusable { dir })
    }

    /// Links into `dest/name` the live file holding exactly `content` (Keystone
    /// keeps a key's index, except the staged key 0, which becomes the new
    /// primary), if it is a regular 0600 file with the owner a fresh file
    /// would get. The check reads the file through one descriptor and the link
    /// must land on that same inode, so a name swapped in between is refused.
    fn link_same(
        &self,
        index: u32,
        content: &[u8],
        owner: Option<Owner>,
        dest: &OwnedFd,
        name: &str,
    ) -> bool {
        let (uid, gid) = wanted_owner(owner);
        let candidates = [Some(name), (index != 0).then_some("0")];
        candidates.into_iter().flatten().any(|source| {
            let Ok(fd) = rustix::fs::openat(
                &self.dir,
                source,
                OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
                Mode::empty(),
            ) else {
                return false;
            };
            let Ok(st) = rustix::fs::fstat(&fd) else {
                return false;
            };
            let exact = is_regular(&st)
                && st.st_mode & 0o7777 == FILE_MODE
                && (st.st_uid, st.st_gid) == (uid, gid)
                && usize::try_from(st.st_size).is_ok_and(|n| n == content.len());
            if !exact {
                return false;
            }
            let mut held = zeroize::Zeroizing::new(vec![0u8; content.len() + 1]);
            let same =
                matches!(rustix::io::read(&fd, &mut held[..]), Ok(n) if held[..n] == *content);
            if !same || rustix::fs::linkat(&self.dir, source, dest, name, AtFlags::empty()).is_err()
            {
                return false;
            }
            let landed = rustix::fs::statat(dest, name, AtFlags::SYMLINK_NOFOLLOW)
                .is_ok_and(|l| (l.st_dev, l.st_ino) == (st.st_dev, st.st_ino));
            if !landed {
                let _ = rustix::fs::unlinkat(dest, name, AtFlags::empty());
            }
            landed
        })
    }
}

/// A directory being built; removed on drop unless it was put in service.
struct Staging<'p> {
    parent: &'p Parent,
    name: String,
    armed: bool,
}

impl Drop for Staging<'_> {
    fn drop(&mut self) {
        if self.armed {
            let _ = std::fs::remove_dir_all(self.parent.join(&self.name));
        }
    }
}

/// Builds the complete repository for `set` as a new sibling directory.
fn build<'p>(
    parent: &'p Parent,
    kind: &str,
    set: &KeySet,
    stamp: Option<&Stamp>,
    owner: Option<Owner>,
    live: Option<&Path>,
) -> Result<Staging<'p>, InstallError> {
    let name = parent.sibling(kind);
    let path = parent.join(&name);
    let mut spare = match parent.take_spare(&name) {
        Some(files) => files,
        None => {
            rustix::fs::mkdirat(&parent.fd, name.as_str(), Mode::from_raw_mode(DIR_MODE))
                .map_err(errno_err("create", &path))?;
            Vec::new()
        }
    };
    let staging = Staging {
        parent,
        name,
        armed: true,
    };
    let dir = rustix::fs::openat(
        &parent.fd,
        staging.name.as_str(),
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(errno_err("open", &path))?;
    set_mode_and_owner(&dir, &path, DIR_MODE, owner)?;
    let live = live.and_then(Reusable::open);
    for (index, key) in set.iter() {
        let name = index.to_string();
        let content = key.to_base64();
        let linked = live
            .as_ref()
            .is_some_and(|l| l.link_same(index, content.as_bytes(), owner, &dir, &name));
        if !linked {
            write_file(&dir, &path, &name, content.as_bytes(), owner, spare.pop())?;
        }
    }
    // The stamp stays the agent's: the Keystone user must not be able to
    // rewrite the generation (and block every later install as a rollback).
    if let Some(stamp) = stamp {
        write_file(&dir, &path, STAMP_FILE, &stamp.encode(), None, spare.pop())?;
    }
    for unused in spare {
        rustix::fs::unlinkat(&dir, unused.as_str(), AtFlags::empty())
            .map_err(errno_err("remove", &path.join(&unused)))?;
    }
    rustix::fs::fsync(&dir).map_err(errno_err("fsync", &path))?;
    Ok(staging)
}

/// Whether a rename error means "this filesystem or kernel cannot do that here",
/// as opposed to a real failure.
fn exchange_unsupported(e: Errno) -> bool {
    [
        Errno::INVAL,
        Errno::NOSYS,
        Errno::OPNOTSUPP,
        Errno::XDEV,
        Errno::BUSY,
    ]
    .contains(&e)
}

/// Puts `set` (with `stamp`, when given) into the repository at `target`
/// atomically; see the module documentation. `target` may be missing (it is
/// created), a directory, or a symlink to a directory. On error the target is
/// left as it was, except in the in-place fallback ([`Method::InPlace`]), where a
/// failure part-way may leave the new keys added and the purged ones not yet
/// removed (a superset Keystone can still use).
pub fn install(
    target: &Path,
    set: &KeySet,
    stamp: Option<&Stamp>,
    owner: Option<Owner>,
) -> Result<InstallOutcome, InstallError> {
    check_usable(set).map_err(|reason| InstallError::Refused {
        target: target.to_path_buf(),
        reason,
    })?;
    let digest = set.digest();
    if let Some(s) = stamp {
        if s.digest != digest {
            return Err(InstallError::StampMismatch {
                stamp: s.digest,
                set: digest,
            });
        }
    }
    let started = Instant::now();
    let parent = Parent::open(target)?;
    let existing = match std::fs::symlink_metadata(target) {
        Ok(m) => Some(m),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_err("inspect", target)(e)),
    };
    let method = match existing {
        None => {
            let staging = build(&parent, "tmp", set, stamp, owner, None)?;
            create(&parent, staging, target)?
        }
        Some(m) if m.file_type().is_symlink() => {
            let resolved =
                std::fs::metadata(target).map_err(io_err("follow the symlink", target))?;
            if !resolved.is_dir() {
                return Err(InstallError::NotADirectory {
                    path: target.to_path_buf(),
                });
            }
            let staging = build(&parent, "data", set, stamp, owner, Some(target))?;
            flip(&parent, staging, target)?
        }
        Some(m) if m.is_dir() && parent.is_mount_point(&m)? => {
            // A repository that is a mount point (a container volume) cannot be
            // renamed, and its parent may be read-only: update it in place.
            in_place(target, "the repository is a mount point", set, stamp, owner)?
        }
        Some(m) if m.is_dir() => match build(&parent, "tmp", set, stamp, owner, Some(target)) {
            Ok(staging) => exchange(&parent, staging, target, set, stamp, owner)?,
            // A read-only parent above a writable bind-mounted repository.
            Err(InstallError::Io { source, .. })
                if source.raw_os_error() == Some(Errno::ROFS.raw_os_error()) =>
            {
                in_place(
                    target,
                    "its parent directory is read-only",
                    set,
                    stamp,
                    owner,
                )?
            }
            Err(e) => return Err(e),
        },
        Some(_) => {
            return Err(InstallError::NotADirectory {
                path: target.to_path_buf(),
            });
        }
    };
    Ok(InstallOutcome {
        method,
        digest,
        elapsed: started.elapsed(),
    })
}

fn create(
    parent: &Parent,
    mut staging: Staging<'_>,
    target: &Path,
) -> Result<Method, InstallError> {
    let moved = rustix::fs::renameat_with(
        &parent.fd,
        staging.name.as_str(),
        &parent.fd,
        parent.name.as_str(),
        RenameFlags::NOREPLACE,
    );
    match moved {
        Err(e) if exchange_unsupported(e) && e != Errno::BUSY => rustix::fs::renameat(
            &parent.fd,
            staging.name.as_str(),
            &parent.fd,
            parent.name.as_str(),
        ),
        other => other,
    }
    .map_err(errno_err("create the repository", target))?;
    staging.armed = false;
    parent.fsync_after_swap(target);
    Ok(Method::Created)
}

fn exchange(
    parent: &Parent,
    staging: Staging<'_>,
    target: &Path,
    set: &KeySet,
    stamp: Option<&Stamp>,
    owner: Option<Owner>,
) -> Result<Method, InstallError> {
    match rustix::fs::renameat_with(
        &parent.fd,
        staging.name.as_str(),
        &parent.fd,
        parent.name.as_str(),
        RenameFlags::EXCHANGE,
    ) {
        Ok(()) => {
            // The staging name now holds the old repository: retired, not
            // removed, so a listing in flight still finds it whole.
            let mut staging = staging;
            staging.armed = false;
            parent.fsync_after_swap(target);
            retire(parent.target(), parent.join(&staging.name));
            Ok(Method::Exchange)
        }
        Err(e) if exchange_unsupported(e) => {
            drop(staging);
            in_place(target, &e.to_string(), set, stamp, owner)
        }
        Err(e) => Err(errno_err("swap in the new repository at", target)(e)),
    }
}

/// The fallback, with the warning an operator needs to see.
fn in_place(
    target: &Path,
    why: &str,
    set: &KeySet,
    stamp: Option<&Stamp>,
    owner: Option<Owner>,
) -> Result<Method, InstallError> {
    tracing::warn!(
        repository = %target.display(),
        reason = why,
        "atomic directory exchange not possible here; updating the repository in place \
         (new keys first, purged keys last): Keystone may briefly read a mix of old and new keys"
    );
    update_in_place(target, set, stamp, owner)?;
    Ok(Method::InPlace)
}

fn flip(parent: &Parent, mut staging: Staging<'_>, target: &Path) -> Result<Method, InstallError> {
    let old = std::fs::read_link(target).map_err(io_err("read the symlink", target))?;
    let link = parent.sibling("link");
    rustix::fs::symlinkat(staging.name.as_str(), &parent.fd, link.as_str())
        .map_err(errno_err("create a symlink next to", target))?;
    if let Err(e) =
        rustix::fs::renameat(&parent.fd, link.as_str(), &parent.fd, parent.name.as_str())
    {
        let _ = rustix::fs::unlinkat(&parent.fd, link.as_str(), AtFlags::empty());
        return Err(errno_err("replace the symlink", target)(e));
    }
    staging.armed = false;
    parent.fsync_after_swap(target);
    // Remove the previous data directory only when this installer made it; a
    // directory the operator pointed the link at is theirs to delete.
    let old_name = old
        .to_str()
        .filter(|n| !n.contains('/') && parent.is_ours(n));
    match old_name {
        Some(n) => retire(parent.target(), parent.join(n)),
        None => tracing::warn!(
            repository = %target.display(),
            previous = %old.display(),
            "the symlink pointed at a directory fernetd did not create; left it in place (it still holds the old keys)"
        ),
    }
    Ok(Method::SymlinkFlip)
}

/// The fallback: replace files one by one inside the live directory. New and
/// changed keys go first (each through a temporary file and a rename), then the
/// stamp, then purged keys, so Keystone always finds every key it may need.
fn update_in_place(
    target: &Path,
    set: &KeySet,
    stamp: Option<&Stamp>,
    owner: Option<Owner>,
) -> Result<(), InstallError> {
    let dir = rustix::fs::open(
        target,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(errno_err("open", target))?;
    let place = |name: &str, content: &[u8], owner: Option<Owner>| -> Result<(), InstallError> {
        let tmp = format!("{INPLACE_TMP_PREFIX}{}", unique());
        write_new_file(&dir, target, &tmp, content, owner)?;
        rustix::fs::renameat(&dir, tmp.as_str(), &dir, name).map_err(|e| {
            let _ = rustix::fs::unlinkat(&dir, tmp.as_str(), AtFlags::empty());
            errno_err("replace", &target.join(name))(e)
        })
    };
    // Highest first: the new primary (already every node's staged key) before the new staged key.
    for (index, key) in set.iter().rev() {
        place(&index.to_string(), key.to_base64().as_bytes(), owner)?;
    }
    if let Some(s) = stamp {
        place(STAMP_FILE, &s.encode(), None)?;
    }
    rustix::fs::fsync(&dir).map_err(errno_err("fsync", target))?;
    let wanted: Vec<String> = set.indices().iter().map(u32::to_string).collect();
    for entry in std::fs::read_dir(target).map_err(io_err("list", target))? {
        let entry = entry.map_err(io_err("list", target))?;
        let name = entry.file_name();
        let is_key = repository::classify_name(&name) != repository::FileName::Ignored;
        let stale_key = is_key && !name.to_str().is_some_and(|n| wanted.iter().any(|w| w == n));
        if stale_key || (stamp.is_none() && name == STAMP_FILE) {
            rustix::fs::unlinkat(&dir, name.as_os_str(), AtFlags::empty())
                .map_err(errno_err("remove", &entry.path()))?;
        }
    }
    set_mode_and_owner(&dir, target, DIR_MODE, owner)?;
    rustix::fs::fsync(&dir).map_err(errno_err("fsync", target))?;
    Ok(())
}

/// Removes what an interrupted install left behind: temporary sibling
/// directories and symlinks, data directories the repository symlink no longer
/// points at, and temporary files of an in-place update. Returns how many
/// entries were removed. Safe to run while no install is in progress on `target`
/// (it takes the same lock as [`install`]).
pub fn clean_leftovers(target: &Path) -> Result<usize, InstallError> {
    let parent = Parent::open(target)?;
    let live = std::fs::read_link(target).ok();
    let mut removed = 0;
    for entry in std::fs::read_dir(&parent.path).map_err(io_err("list", &parent.path))? {
        let entry = entry.map_err(io_err("list", &parent.path))?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if !parent.is_ours(&name) || live.as_deref() == Some(Path::new(&name)) {
            continue;
        }
        let path = entry.path();
        let is_dir = entry
            .file_type()
            .map_err(io_err("inspect", &path))?
            .is_dir();
        if is_dir {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        }
        .map_err(io_err("remove", &path))?;
        removed += 1;
    }
    if std::fs::metadata(target).is_ok_and(|m| m.is_dir()) {
        for entry in std::fs::read_dir(target).map_err(io_err("list", target))? {
            let entry = entry.map_err(io_err("list", target))?;
            if !entry
                .file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(INPLACE_TMP_PREFIX))
            {
                continue;
            }
            // The Keystone user owns the repository and may have made an
            // entry with our prefix: only a file or link (what an in-place
            // update leaves) is ours to remove; anything else is left, and a
            // drift check reports it, rather than stopping the agent.
            let kind = entry
                .file_type()
                .map_err(io_err("inspect", &entry.path()))?;
            if !(kind.is_file() || kind.is_symlink()) {
                tracing::warn!(path = %entry.path().display(), "not a leftover of ours (not a file): left in place");
                continue;
            }
            std::fs::remove_file(entry.path()).map_err(io_err("remove", &entry.path()))?;
            removed += 1;
        }
    }
    if removed > 0 {
        parent.fsync()?;
    }
    Ok(removed)
}

/// The owner and mode a repository directory has; used by tests and `verify`.
pub fn owner_of(path: &Path) -> io::Result<(u32, u32, u32)> {
    let m = std::fs::metadata(path)?;
    Ok((m.uid(), m.gid(), m.mode() & 0o7777))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repository::{Key, read_stamp};

    fn set_of(indices: &[u32]) -> KeySet {
        KeySet::from_keys(indices.iter().map(|&i| (i, Key::generate())))
    }

    fn repo_with_two_keys() -> (tempfile::TempDir, PathBuf, KeySet) {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("keys");
        let a = set_of(&[0, 1]);
        install(&target, &a, None, None).unwrap();
        (tmp, target, a)
    }

    fn stamp(generation: u64, set: &KeySet) -> Stamp {
        Stamp {
            generation,
            digest: set.digest(),
            promoted: Default::default(),
            agent: false,
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    /// A listing that opened the old directory just before the swap reads it
    /// after: it must still be whole then, and gone once settled.
    #[test]
    fn the_previous_set_stays_whole_for_the_grace_then_goes() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("keys");
        let a = set_of(&[0, 1]);
        install(&target, &a, None, None).unwrap();
        let listing = std::fs::read_dir(&target).unwrap();
        install(&target, &set_of(&[0, 1, 2]), None, None).unwrap();
        let listed: Vec<String> = listing
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(listed.len(), 2, "the old listing was emptied: {listed:?}");
        settle_one(&target);
        assert_eq!(names(tmp.path()), vec!["keys"]);
    }

    #[test]
    fn creates_exchanges_and_leaves_nothing_behind() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("keys");
        let a = set_of(&[0, 1]);
        let out = install(&target, &a, Some(&stamp(1, &a)), None).unwrap();
        assert_eq!(out.method, Method::Created);
        assert_eq!(repository::load(&target).unwrap(), a);
        assert_eq!(read_stamp(&target).unwrap(), Some(stamp(1, &a)));
        assert_eq!(owner_of(&target).unwrap().2, 0o700);
        assert_eq!(owner_of(&target.join("0")).unwrap().2, 0o600);
        assert_eq!(std::fs::read(target.join("1")).unwrap().len(), 44);

        let b = set_of(&[0, 1, 2]);
        let out = install(&target, &b, Some(&stamp(2, &b)), None).unwrap();
        assert_eq!(out.method, Method::Exchange);
        assert_eq!(repository::load(&target).unwrap(), b);
        assert_eq!(read_stamp(&target).unwrap().map(|s| s.generation), Some(2));
        settle_one(&target);
        assert_eq!(names(tmp.path()), vec!["keys"]);
        assert_eq!(names(&target), vec![".fernetd-stamp", "0", "1", "2"]);
    }

    #[test]
    fn flips_a_symlinked_repository() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("operator-dir");
        let target = tmp.path().join("keys");
        let a = set_of(&[0, 1]);
        install(&real, &a, None, None).unwrap();
        std::os::unix::fs::symlink("operator-dir", &target).unwrap();

        let b = set_of(&[0, 1, 2]);
        let out = install(&target, &b, Some(&stamp(7, &b)), None).unwrap();
        assert_eq!(out.method, Method::SymlinkFlip);
        assert_eq!(repository::load(&target).unwrap(), b);
        assert!(
            std::fs::symlink_metadata(&target)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        // The operator's directory is left alone; our own previous directory is not.
        assert_eq!(repository::load(&real).unwrap(), a);
        let c = set_of(&[0, 2, 3]);
        install(&target, &c, None, None).unwrap();
        assert_eq!(repository::load(&target).unwrap(), c);
        settle_one(&target);
        let ours: Vec<String> = names(tmp.path())
            .into_iter()
            .filter(|n| n.contains("fernetd-data"))
            .collect();
        assert_eq!(ours.len(), 1, "{ours:?}");
        assert_eq!(std::fs::read_link(&target).unwrap(), Path::new(&ours[0]));
        assert_eq!(clean_leftovers(&target).unwrap(), 0);
    }

    #[test]
    fn refuses_unusable_sets_and_bad_targets_without_touching_anything() {
        let (tmp, target, a) = repo_with_two_keys();
        let before = names(&target);
        for (bad, want) in [
            (KeySet::new(), Unusable::Empty),
            (set_of(&[1, 2]), Unusable::NoStagedKey),
        ] {
            match install(&target, &bad, None, None) {
                Err(InstallError::Refused { reason, .. }) => assert_eq!(reason, want),
                other => panic!("expected a refusal, got {other:?}"),
            }
        }
        let b = set_of(&[0, 1, 2]);
        assert!(matches!(
            install(&target, &b, Some(&stamp(1, &a)), None),
            Err(InstallError::StampMismatch { .. })
        ));
        assert_eq!(repository::load(&target).unwrap(), a);
        assert_eq!(names(&target), before);

        let file = tmp.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(
            install(&file, &a, None, None),
            Err(InstallError::NotADirectory { .. })
        ));
        assert_eq!(std::fs::read(&file).unwrap(), b"x");
        assert_eq!(names(tmp.path()), vec!["file", "keys"]);
    }

    #[test]
    fn in_place_fallback_puts_new_keys_first_and_purges_last() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("keys");
        let a = set_of(&[0, 1, 2]);
        install(&target, &a, Some(&stamp(1, &a)), None).unwrap();
        std::fs::write(target.join("01"), a.get(1).unwrap().to_base64().as_bytes()).unwrap();
        let b = KeySet::from_keys([
            (0, Key::generate()),
            (2, a.get(2).unwrap().clone()),
            (3, a.get(0).unwrap().clone()),
        ]);
        update_in_place(&target, &b, None, None).unwrap();
        assert_eq!(repository::load(&target).unwrap(), b);
        assert_eq!(names(&target), vec!["0", "2", "3"]);
    }

    #[test]
    fn cleans_interrupted_installs() {
        let (tmp, target, a) = repo_with_two_keys();
        std::fs::create_dir(tmp.path().join(".keys.fernetd-tmp-1-2-3")).unwrap();
        std::fs::write(tmp.path().join(".keys.fernetd-tmp-1-2-3/0"), b"x").unwrap();
        std::fs::write(target.join(".fernetd-tmp-9"), b"x").unwrap();
        std::fs::create_dir(tmp.path().join(".other.fernetd-tmp-1")).unwrap();
        assert_eq!(clean_leftovers(&target).unwrap(), 2);
        assert_eq!(names(tmp.path()), vec![".other.fernetd-tmp-1", "keys"]);
        assert_eq!(repository::load(&target).unwrap(), a);
    }

    /// The Keystone user owns the repository: a directory with the prefix of
    /// our in-place temporaries is not ours to remove, and stopped the agent.
    #[test]
    fn a_directory_with_our_temporary_prefix_is_left_not_fatal() {
        let (_tmp, target, a) = repo_with_two_keys();
        std::fs::create_dir(target.join(".fernetd-tmp-x")).unwrap();
        std::fs::write(target.join(".fernetd-tmp-x/0"), b"x").unwrap();
        std::fs::write(target.join(".fernetd-tmp-9"), b"x").unwrap();
        assert_eq!(clean_leftovers(&target).unwrap(), 1);
        assert_eq!(names(&target), vec![".fernetd-tmp-x", "0", "1"]);
        assert_eq!(repository::load(&target).unwrap(), a);
    }

    /// A spare file swapped for a FIFO (which an `O_WRONLY` open waits on) or
    /// for a hard link to another file (which `O_TRUNC` emptied before the
    /// link count was checked) is neither waited on nor emptied.
    #[test]
    fn a_spare_swapped_for_a_fifo_or_a_link_is_not_opened_for_truncation() {
        let (tmp, target, b) = stamped_repo_and_its_rotation();
        install(&target, &b, Some(&stamp(2, &b)), None).unwrap();
        let victim = tmp.path().join("victim");
        std::fs::write(&victim, b"someone else's data").unwrap();
        type Plant<'a> = Box<dyn Fn(&Path) + 'a>;
        let fifo: Plant<'_> = Box::new(|at| {
            rustix::fs::mknodat(
                rustix::fs::CWD,
                at,
                rustix::fs::FileType::Fifo,
                Mode::from_raw_mode(0o600),
                0,
            )
            .unwrap()
        });
        let link: Plant<'_> = Box::new(|at| std::fs::hard_link(&victim, at).unwrap());
        let mut set = b;
        for (generation, plant) in [(3, fifo), (4, link)] {
            flush_reaper();
            let spare = names(tmp.path())
                .into_iter()
                .find(|n| n != "keys" && n != "victim")
                .unwrap();
            let spare_dir = tmp.path().join(&spare);
            let kept = names(&spare_dir);
            assert!(!kept.is_empty(), "no spare file kept");
            for name in &kept {
                std::fs::remove_file(spare_dir.join(name)).unwrap();
                plant(&spare_dir.join(name));
            }
            let next = repository::rotate(&set, 4).unwrap();
            let (tx, rx) = std::sync::mpsc::channel();
            let (t, n) = (target.clone(), next.clone());
            std::thread::spawn(move || {
                let _ = tx.send(install(&t, &n, Some(&stamp(generation, &n)), None).map(drop));
            });
            rx.recv_timeout(Duration::from_secs(10))
                .expect("the install hung on a FIFO in a spare")
                .unwrap();
            assert_eq!(repository::load(&target).unwrap(), next);
            assert_eq!(
                read_stamp(&target).unwrap().map(|s| s.generation),
                Some(generation)
            );
            set = next;
        }
        assert_eq!(std::fs::read(&victim).unwrap(), b"someone else's data");
        settle_one(&target);
    }

    #[test]
    fn owner_parsing() {
        assert_eq!(Owner::parse("0:0").unwrap(), Owner { uid: 0, gid: 0 });
        assert_eq!(Owner::parse("root:root").unwrap(), Owner { uid: 0, gid: 0 });
        assert_eq!(Owner::parse("root").unwrap(), Owner { uid: 0, gid: 0 });
        assert!(Owner::parse("12").is_err());
        assert!(Owner::parse("no-such-user-here:root").is_err());
        assert!(Owner::parse("root:").is_err());
    }

    #[test]
    fn chowns_before_the_swap() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("keys");
        let owner = Owner {
            uid: 4242,
            gid: 4343,
        };
        let a = set_of(&[0, 1]);
        // Only root may give files away; as another user this is a clean error.
        match install(&target, &a, Some(&stamp(1, &a)), Some(owner)) {
            Ok(_) => {
                for name in ["", "0", "1"] {
                    let (uid, gid, _) = owner_of(&target.join(name)).unwrap();
                    assert_eq!((uid, gid), (4242, 4343), "{name}");
                }
                // The stamp is the agent's, not the Keystone user's.
                let (uid, _, _) = owner_of(&target.join(STAMP_FILE)).unwrap();
                assert_eq!(uid, rustix::process::geteuid().as_raw(), "stamp");
            }
            Err(InstallError::Io { op, .. }) => {
                assert_eq!(op, "change the owner of");
                assert!(!target.exists());
            }
            Err(e) => panic!("{e}"),
        }
    }

    fn inode(path: &Path) -> u64 {
        std::fs::symlink_metadata(path).unwrap().ino()
    }

    /// A repository holding three keys, stamped, and the set its next
    /// rotation makes (not yet installed).
    fn stamped_repo_and_its_rotation() -> (tempfile::TempDir, PathBuf, KeySet) {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("keys");
        let a = set_of(&[0, 1, 2]);
        install(&target, &a, Some(&stamp(1, &a)), None).unwrap();
        let b = repository::rotate(&a, 4).unwrap();
        (tmp, target, b)
    }

    #[test]
    fn a_rotation_links_the_keys_it_keeps_and_writes_only_the_new_one() {
        let (_tmp, target, b) = stamped_repo_and_its_rotation();
        let before: Vec<(String, u64)> = ["0", "1", "2", STAMP_FILE]
            .iter()
            .map(|n| (n.to_string(), inode(&target.join(n))))
            .collect();
        install(&target, &b, Some(&stamp(2, &b)), None).unwrap();
        assert_eq!(repository::load(&target).unwrap(), b);
        let now = |n: &str| inode(&target.join(n));
        let was = |n: &str| before.iter().find(|(m, _)| m == n).unwrap().1;
        // 1 and 2 kept their index, the staged 0 became the primary 3.
        assert_eq!(now("1"), was("1"));
        assert_eq!(now("2"), was("2"));
        assert_eq!(now("3"), was("0"));
        assert!(
            before.iter().all(|(_, i)| *i != now("0")),
            "the new staged key is a new file"
        );
        assert!(
            before.iter().all(|(_, i)| *i != now(STAMP_FILE)),
            "the stamp is rewritten"
        );
        for n in ["0", "1", "2", "3"] {
            let (_, _, mode) = owner_of(&target.join(n)).unwrap();
            assert_eq!(mode, 0o600, "{n}");
        }
        settle_one(&target);
    }

    #[test]
    fn a_live_file_that_is_not_exactly_the_key_is_written_fresh() {
        use std::os::unix::fs::PermissionsExt as _;
        let (tmp, target, b) = stamped_repo_and_its_rotation();
        // 1: other bytes of the same length; 2: a looser mode; 0 (the future
        // 3): a symlink to a file holding exactly the right key.
        std::fs::write(target.join("1"), Key::generate().to_base64().as_bytes()).unwrap();
        std::fs::set_permissions(target.join("2"), std::fs::Permissions::from_mode(0o640)).unwrap();
        let outside = tmp.path().join("outside");
        std::fs::write(&outside, b.get(3).unwrap().to_base64().as_bytes()).unwrap();
        std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::remove_file(target.join("0")).unwrap();
        std::os::unix::fs::symlink(&outside, target.join("0")).unwrap();
        let tampered = [inode(&target.join("1")), inode(&target.join("2"))];
        install(&target, &b, Some(&stamp(2, &b)), None).unwrap();
        assert_eq!(repository::load(&target).unwrap(), b);
        for n in ["1", "2", "3"] {
            let meta = std::fs::symlink_metadata(target.join(n)).unwrap();
            assert!(meta.file_type().is_file(), "{n}");
            assert_eq!(meta.mode() & 0o7777, 0o600, "{n}");
            assert!(!tampered.contains(&meta.ino()), "{n}");
            assert_ne!(meta.ino(), inode(&outside), "{n}");
        }
        settle_one(&target);
    }

    #[test]
    fn a_set_without_our_stamp_lends_no_file() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("keys");
        let a = set_of(&[0, 1, 2]);
        // As keystone-manage leaves it: keys only.
        install(&target, &a, None, None).unwrap();
        let before = [inode(&target.join("1")), inode(&target.join("2"))];
        let b = repository::rotate(&a, 4).unwrap();
        install(&target, &b, Some(&stamp(2, &b)), None).unwrap();
        assert_eq!(repository::load(&target).unwrap(), b);
        for n in ["1", "2", "3"] {
            assert!(!before.contains(&inode(&target.join(n))), "{n}");
        }
        settle_one(&target);
    }

    #[test]
    fn a_new_owner_gets_new_files() {
        let (_tmp, target, b) = stamped_repo_and_its_rotation();
        let before = inode(&target.join("1"));
        let owner = Owner {
            uid: 4242,
            gid: 4343,
        };
        match install(&target, &b, Some(&stamp(2, &b)), Some(owner)) {
            Ok(_) => {
                assert_ne!(inode(&target.join("1")), before);
                for n in ["0", "1", "2", "3"] {
                    let (uid, gid, _) = owner_of(&target.join(n)).unwrap();
                    assert_eq!((uid, gid), (4242, 4343), "{n}");
                }
            }
            // Only root may give files away.
            Err(InstallError::Io { op, .. }) => assert_eq!(op, "change the owner of"),
            Err(e) => panic!("{e}"),
        }
        settle_one(&target);
    }

    /// Every file under `dir`, with its content.
    fn all_files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                out.extend(all_files(&path));
            } else {
                let content = std::fs::read(&path).unwrap();
                out.push((path, content));
            }
        }
        out
    }

    #[test]
    fn the_previous_set_is_stripped_of_keys_and_built_over_by_the_next_install() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("keys");
        // Three keys at most: b drops a's key 1, c drops b's key 2.
        let a = set_of(&[0, 1, 2]);
        install(&target, &a, Some(&stamp(1, &a)), None).unwrap();
        let b = repository::rotate(&a, 3).unwrap();
        let c = repository::rotate(&b, 3).unwrap();
        install(&target, &b, Some(&stamp(2, &b)), None).unwrap();
        let live_b = inode(&target);
        flush_reaper();
        // The retired set (a) is a spare: no name of a, no byte of any key.
        let spare: Vec<String> = names(tmp.path())
            .into_iter()
            .filter(|n| n != "keys")
            .collect();
        assert_eq!(spare.len(), 1, "{spare:?}");
        let spare_dir = tmp.path().join(&spare[0]);
        let spare_inode = inode(&spare_dir);
        let kept = names(&spare_dir);
        assert!(
            !kept.is_empty() && kept.iter().all(|n| n.starts_with(SPARE_PREFIX)),
            "{kept:?}"
        );
        let kept_inodes: Vec<u64> = kept.iter().map(|n| inode(&spare_dir.join(n))).collect();
        for (path, content) in all_files(&spare_dir) {
            assert!(content.is_empty(), "{} still holds data", path.display());
        }
        // The next install builds in the spare: its directory and its inodes.
        install(&target, &c, Some(&stamp(3, &c)), None).unwrap();
        assert_eq!(repository::load(&target).unwrap(), c);
        assert_eq!(read_stamp(&target).unwrap().map(|s| s.generation), Some(3));
        assert_eq!(inode(&target), spare_inode);
        let reused = ["0", STAMP_FILE]
            .iter()
            .filter(|n| kept_inodes.contains(&inode(&target.join(n))))
            .count();
        assert_eq!(
            reused, 2,
            "the new key and the stamp are written into kept inodes"
        );
        assert_eq!(names(&target), vec![".fernetd-stamp", "0", "3", "4"]);
        for n in ["0", "3", "4", STAMP_FILE] {
            assert_eq!(owner_of(&target.join(n)).unwrap().2, 0o600, "{n}");
        }
        // b is retired in turn; once settled nothing but the repository is left.
        assert_ne!(inode(&target), live_b);
        settle_one(&target);
        assert_eq!(names(tmp.path()), vec!["keys"]);
        // No key of a that c dropped is left on disk anywhere.
        let every: Vec<Vec<u8>> = all_files(tmp.path()).into_iter().map(|(_, c)| c).collect();
        for (index, key) in a.iter() {
            if c.iter().all(|(_, k)| k != key) {
                let text = key.to_base64();
                assert!(
                    !every.iter().any(|c| c == text.as_bytes()),
                    "purged key {index} lingers"
                );
            }
        }
    }

    /// Installs less than a grace apart (a fast series of rotations) still
    /// build in spares: with one spare per repository, a strip that landed
    /// after the next install left that install none, and every other install
    /// of such a series made new inodes.
    #[test]
    fn installs_less_than_a_grace_apart_still_build_in_spares() {
        let (tmp, target, b) = stamped_repo_and_its_rotation();
        let c = repository::rotate(&b, 4).unwrap();
        let d = repository::rotate(&c, 4).unwrap();
        let e = repository::rotate(&d, 4).unwrap();
        install(&target, &b, Some(&stamp(2, &b)), None).unwrap();
        install(&target, &c, Some(&stamp(3, &c)), None).unwrap();
        flush_reaper();
        // Both retired sets were stripped after their grace, and both are kept.
        let spares: Vec<u64> = names(tmp.path())
            .into_iter()
            .filter(|n| n != "keys")
            .map(|n| inode(&tmp.path().join(n)))
            .collect();
        assert_eq!(spares.len(), 2, "{:?}", names(tmp.path()));
        install(&target, &d, Some(&stamp(4, &d)), None).unwrap();
        let first = inode(&target);
        install(&target, &e, Some(&stamp(5, &e)), None).unwrap();
        let second = inode(&target);
        assert!(
            spares.contains(&first) && spares.contains(&second) && first != second,
            "both installs build in a spare: {first} and {second} among {spares:?}"
        );
        assert_eq!(repository::load(&target).unwrap(), e);
        assert_eq!(read_stamp(&target).unwrap().map(|s| s.generation), Some(5));
        settle_one(&target);
        assert_eq!(names(tmp.path()), vec!["keys"]);
    }

    #[test]
    fn a_spare_with_anything_unexpected_in_it_is_not_used() {
        let (tmp, target, b) = stamped_repo_and_its_rotation();
        install(&target, &b, Some(&stamp(2, &b)), None).unwrap();
        flush_reaper();
        let spare = names(tmp.path()).into_iter().find(|n| n != "keys").unwrap();
        let spare_dir = tmp.path().join(&spare);
        std::fs::write(spare_dir.join("7"), b"planted").unwrap();
        let c = repository::rotate(&b, 4).unwrap();
        install(&target, &c, Some(&stamp(3, &c)), None).unwrap();
        assert_eq!(repository::load(&target).unwrap(), c);
        assert_eq!(names(&target), vec![".fernetd-stamp", "0", "2", "3", "4"]);
        assert!(!spare_dir.exists());
        settle_one(&target);
        assert_eq!(names(tmp.path()), vec!["keys"]);
    }
}
