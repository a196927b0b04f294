//! The stamp: a small JSON file inside a repository that records the
//! generation and digest of the key set it holds. Keystone skips it because its
//! name is not an integer; the installer writes it with the keys, so keys and
//! generation always change together.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use super::Digest;

/// The file, inside a repository, that records its generation and digest.
pub const STAMP_FILE: &str = ".fernetd-stamp";

/// The most a stamp may hold (its promotion times grow with the key count).
const MAX_STAMP_BYTES: u64 = 64 * 1024;

/// The generation and digest a repository holds, recorded in [`STAMP_FILE`],
/// and when each of its keys became primary (as far as the rotator knows).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamp {
    pub generation: u64,
    pub digest: Digest,
    /// Key index → Unix time (seconds) it was first promoted to primary. A key
    /// that is still staged, or whose time is unknown, has no entry.
    pub promoted: BTreeMap<u32, i64>,
    /// Written by a fernetd agent: the repository belongs to the rotator, and
    /// `fernetd repo rotate` leaves it alone unless forced.
    pub agent: bool,
}

#[derive(serde::Deserialize, serde::Serialize)]
struct StampFile {
    generation: u64,
    digest: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    promoted: BTreeMap<u32, i64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    agent: bool,
}

/// Why a repository's stamp cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum StampError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("stamp file {path} is malformed: {reason}")]
    Malformed { path: PathBuf, reason: String },
}

impl Stamp {
    /// One line of JSON, as [`read_stamp`] reads it back.
    pub fn encode(&self) -> Vec<u8> {
        let file = StampFile {
            generation: self.generation,
            digest: self.digest.to_hex(),
            promoted: self.promoted.clone(),
            agent: self.agent,
        };
        // A struct of numbers and strings always serializes.
        let mut line = serde_json::to_vec(&file).unwrap_or_default();
        line.push(b'\n');
        line
    }

    /// The key that was primary at `unix` (seconds), when the stamp knows.
    pub fn primary_at(&self, unix: i64) -> Option<u32> {
        self.promoted
            .iter()
            .filter(|(_, at)| **at <= unix)
            .max_by_key(|(index, at)| (**at, **index))
            .map(|(index, _)| *index)
    }

    fn decode(bytes: &[u8]) -> Result<Stamp, String> {
        let file: StampFile = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        let digest = Digest::from_hex(&file.digest).ok_or("digest is not 64 hex digits")?;
        Ok(Stamp {
            generation: file.generation,
            digest,
            promoted: file.promoted,
            agent: file.agent,
        })
    }
}

/// Reads the generation and digest recorded in the repository, if any.
///
/// Whoever owns the repository (the Keystone user) can put anything at the
/// stamp's name: the file is opened without following a link and without
/// blocking (a FIFO would otherwise hang the reader until someone opened its
/// other end), and only a regular file, checked on the open descriptor, is read.
pub fn read_stamp(target: &Path) -> Result<Option<Stamp>, StampError> {
    use rustix::fs::{FileType, Mode, OFlags};
    let path = target.join(STAMP_FILE);
    let read = rustix::fs::open(
        &path,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(io::Error::from)
    .and_then(|fd| {
        let st = rustix::fs::fstat(&fd)?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not a regular file",
            ));
        }
        super::read_capped(std::fs::File::from(fd), MAX_STAMP_BYTES)
    });
    match read {
        Ok(bytes) => Stamp::decode(&bytes)
            .map(Some)
            .map_err(|reason| StampError::Malformed { path, reason }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StampError::Read { path, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamp_is_not_read_through_a_link_nor_past_its_cap() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let elsewhere = tmp.path().join("elsewhere");
        let stamp = Stamp {
            generation: 3,
            digest: Digest([7; 32]),
            promoted: BTreeMap::new(),
            agent: false,
        };
        std::fs::write(&elsewhere, stamp.encode()).expect("write");
        let repo = tmp.path().join("repo");
        std::fs::create_dir(&repo).expect("mkdir");
        std::os::unix::fs::symlink(&elsewhere, repo.join(STAMP_FILE)).expect("link");
        assert!(matches!(read_stamp(&repo), Err(StampError::Read { .. })));
        std::fs::remove_file(repo.join(STAMP_FILE)).expect("unlink");
        std::fs::write(repo.join(STAMP_FILE), vec![b' '; 1 << 20]).expect("write");
        assert!(matches!(read_stamp(&repo), Err(StampError::Read { .. })));
        std::fs::write(repo.join(STAMP_FILE), stamp.encode()).expect("write");
        assert_eq!(read_stamp(&repo).expect("read"), Some(stamp));
    }

    /// A FIFO at the stamp's name hung every reader (the agent at start, and
    /// every install behind the drift check) until its other end was opened.
    #[test]
    fn a_fifo_or_directory_at_the_stamp_is_refused_without_blocking() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let fifo = tmp.path().join(STAMP_FILE);
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .expect("mkfifo");
        let (tx, rx) = std::sync::mpsc::channel();
        let dir = tmp.path().to_path_buf();
        std::thread::spawn(move || tx.send(read_stamp(&dir).map(|_| ())).ok());
        let read = rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("read_stamp blocked on a FIFO");
        assert!(matches!(read, Err(StampError::Read { .. })), "{read:?}");
        std::fs::remove_file(&fifo).expect("rm fifo");
        std::fs::create_dir(&fifo).expect("mkdir");
        assert!(matches!(
            read_stamp(tmp.path()),
            Err(StampError::Read { .. })
        ));
    }
}
