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
pub fn read_stamp(target: &Path) -> Result<Option<Stamp>, StampError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = target.join(STAMP_FILE);
    // Never through a link, never more than a stamp can hold.
    let read = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(&path)
        .and_then(|file| super::read_capped(file, MAX_STAMP_BYTES));
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
}
