//! A [`Keyring`] that follows a key repository on disk: keys are parsed once per
//! repository state and reloaded when the repository changes. The check between
//! tokens is one `stat` of the directory (its identity and change times move on
//! every rename, create, unlink and directory swap, which is how Keystone,
//! `keystone-manage` and fernetd's installer change a repository), plus, for a
//! short while after a change, a full re-read: timestamps are only as fine as the
//! kernel's clock tick, so two changes within one tick would otherwise look like
//! one (git's "racy" index problem). The stamp's promotion times, when the
//! repository has a stamp, come with the keys: they tell the keyring which key
//! to try first for a token, and only speed it up.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::repository::{self, Digest, RepositoryError};

use super::Keyring;

/// Within this time of the directory's last change, its timestamps cannot prove
/// that nothing changed since: re-read the repository instead.
const RACY_WINDOW: Duration = Duration::from_millis(50);

/// What `stat` says about the directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DirState {
    dev: u64,
    ino: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

fn dir_state(dir: &Path) -> std::io::Result<(DirState, SystemTime)> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(dir)?;
    let state = DirState {
        dev: m.dev(),
        ino: m.ino(),
        mtime: (m.mtime(), m.mtime_nsec()),
        ctime: (m.ctime(), m.ctime_nsec()),
    };
    Ok((state, m.modified()?))
}

/// The keys of one repository directory, kept current.
#[derive(Debug)]
pub struct LiveKeyring {
    dir: PathBuf,
    keyring: Keyring,
    digest: Digest,
    promoted: BTreeMap<u32, i64>,
    state: DirState,
    /// Until when the timestamps are not trusted (see [`RACY_WINDOW`]).
    racy_until: Option<SystemTime>,
    reloads: u64,
}

impl LiveKeyring {
    /// Loads the repository at `dir` as Keystone reads it.
    pub fn open(dir: &Path) -> Result<Self, RepositoryError> {
        let io = |source| RepositoryError::Io {
            path: dir.to_path_buf(),
            source,
        };
        let (state, modified) = dir_state(dir).map_err(io)?;
        let set = repository::load(dir)?;
        let promoted = promotions(dir);
        Ok(LiveKeyring {
            dir: dir.to_path_buf(),
            keyring: Keyring::with_promotions(&set, &promoted),
            digest: set.digest(),
            promoted,
            state,
            racy_until: racy_until(modified),
            reloads: 0,
        })
    }

    /// The keyring for the repository as it is now, reloaded if it changed since
    /// the last call. On a failed reload the previous keys stay in use and the
    /// error is returned.
    pub fn current(&mut self) -> Result<&Keyring, RepositoryError> {
        self.refresh()?;
        Ok(&self.keyring)
    }

    /// The keyring as last loaded, without checking the disk.
    pub fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    /// The digest of the key set in use.
    pub fn digest(&self) -> Digest {
        self.digest
    }

    /// How many times the key set was found changed and reloaded.
    pub fn reloads(&self) -> u64 {
        self.reloads
    }

    /// Reloads when the directory changed; returns whether the key set changed.
    pub fn refresh(&mut self) -> Result<bool, RepositoryError> {
        let io = |source| RepositoryError::Io {
            path: self.dir.clone(),
            source,
        };
        let (state, modified) = dir_state(&self.dir).map_err(io)?;
        let racy = self
            .racy_until
            .is_some_and(|until| SystemTime::now() < until);
        if state == self.state && !racy {
            self.racy_until = None;
            return Ok(false);
        }
        let set = repository::load(&self.dir)?;
        let promoted = promotions(&self.dir);
        self.state = state;
        self.racy_until = racy_until(modified);
        let digest = set.digest();
        if digest == self.digest && promoted == self.promoted {
            return Ok(false);
        }
        self.keyring = Keyring::with_promotions(&set, &promoted);
        self.promoted = promoted;
        let changed = digest != self.digest;
        if changed {
            self.digest = digest;
            self.reloads += 1;
        }
        Ok(changed)
    }
}

/// The stamp's promotion times. A repository without a readable stamp (one made
/// by `keystone-manage`) has none: they only order the keys, and Keystone itself
/// ignores the file, so a broken stamp must not stop validation.
fn promotions(dir: &Path) -> BTreeMap<u32, i64> {
    match repository::read_stamp(dir) {
        Ok(Some(stamp)) => stamp.promoted,
        Ok(None) | Err(_) => BTreeMap::new(),
    }
}

/// When a directory modified at `modified` stops being "racy".
fn racy_until(modified: SystemTime) -> Option<SystemTime> {
    let until = modified.checked_add(RACY_WINDOW)?;
    (SystemTime::now() < until).then_some(until)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repository::{Key, KeySet};
    use crate::token::encrypt;

    fn write(dir: &Path, set: &KeySet) {
        for entry in std::fs::read_dir(dir).unwrap() {
            std::fs::remove_file(entry.unwrap().path()).unwrap();
        }
        for (i, k) in set.iter() {
            std::fs::write(dir.join(i.to_string()), k.to_base64().as_bytes()).unwrap();
        }
    }

    #[test]
    fn follows_changes_at_once() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b, c) = (Key::generate(), Key::generate(), Key::generate());
        write(
            tmp.path(),
            &KeySet::from_keys([(0, a.clone()), (1, b.clone())]),
        );
        let mut live = LiveKeyring::open(tmp.path()).unwrap();
        let tc = encrypt(&c, b"x");
        assert!(live.current().unwrap().decrypt(&tc).is_err());
        // Changed immediately, within one clock tick of the first write.
        write(
            tmp.path(),
            &KeySet::from_keys([(0, c.clone()), (1, a.clone()), (2, b.clone())]),
        );
        assert_eq!(live.current().unwrap().decrypt(&tc).unwrap().key_index, 0);
        assert_eq!(live.reloads(), 1);
        assert!(!live.refresh().unwrap());
    }
}
