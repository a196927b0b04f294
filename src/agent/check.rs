//! Structural checks of an incoming key set before anything touches the disk:
//! exact key length, a staged key, at least two keys, no duplicate or absurd
//! index, and a digest that matches what the sender claims. These checks are
//! pure so they can be tested without a server, and every error names indices
//! and lengths, never key bytes.

use zeroize::Zeroize;

use crate::pb;
use crate::repository::{Digest, KEY_LEN, Key, KeySet};

/// More keys than any sane `max_active_keys`; Keystone's own default is 3 and
/// an operator keeping a week of hourly keys needs about 170.
pub const MAX_KEYS: usize = 1024;

/// Why a key set was refused before installing.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Malformed {
    #[error("key set has {0} keys; at least 2 are required (a staged key 0 and a primary)")]
    TooFewKeys(usize),
    #[error("key set has {0} keys; at most {MAX_KEYS} are accepted")]
    TooManyKeys(usize),
    #[error("key set has no staged key (index 0)")]
    NoStagedKey,
    #[error("key {index} is {len} bytes; Fernet keys are exactly {KEY_LEN} bytes")]
    KeyLength { index: u32, len: usize },
    #[error("index {0} appears more than once")]
    DuplicateIndex(u32),
    #[error("index {0} is not a sane key file name (Keystone's indices stay far below {max})", max = MAX_INDEX)]
    IndexTooLarge(u32),
    #[error("digest is {0} bytes; expected 32 (SHA-256)")]
    DigestLength(usize),
    #[error("digest mismatch: the keys sent hash to {computed}, the request claims {claimed}")]
    DigestMismatch { computed: Digest, claimed: Digest },
    #[error("generation 0 is reserved for \"never installed\"")]
    GenerationZero,
}

/// Indices grow by one per rotation: a billion rotations is more than a
/// thousand years at one a minute, so anything above is a corrupt request.
pub const MAX_INDEX: u32 = 1_000_000_000;

/// A key set that passed every structural check, with its verified digest.
#[derive(Debug)]
pub struct Checked {
    pub set: KeySet,
    pub digest: Digest,
}

/// Turns the wire keys into a [`KeySet`], wiping the request's copies of the
/// key bytes as it goes, and verifies the claimed digest.
pub fn key_set(generation: u64, keys: &mut [pb::Key], digest: &[u8]) -> Result<Checked, Malformed> {
    let result = build(generation, keys, digest);
    for key in keys.iter_mut() {
        key.material.zeroize();
    }
    result
}

/// Wipes the key bytes of a request that will not be looked at (refused
/// before its keys were read): dropping a `Vec` leaves its bytes in memory.
pub fn wipe(keys: &mut [pb::Key]) {
    for key in keys.iter_mut() {
        key.material.zeroize();
    }
}

fn build(generation: u64, keys: &[pb::Key], digest: &[u8]) -> Result<Checked, Malformed> {
    if generation == 0 {
        return Err(Malformed::GenerationZero);
    }
    if keys.len() < 2 {
        return Err(Malformed::TooFewKeys(keys.len()));
    }
    if keys.len() > MAX_KEYS {
        return Err(Malformed::TooManyKeys(keys.len()));
    }
    let claimed = Digest::from_slice(digest).ok_or(Malformed::DigestLength(digest.len()))?;
    let mut set = KeySet::new();
    for key in keys {
        if key.index > MAX_INDEX {
            return Err(Malformed::IndexTooLarge(key.index));
        }
        let bytes: [u8; KEY_LEN] =
            key.material
                .as_slice()
                .try_into()
                .map_err(|_| Malformed::KeyLength {
                    index: key.index,
                    len: key.material.len(),
                })?;
        if set.insert(key.index, Key::from_bytes(bytes)).is_some() {
            return Err(Malformed::DuplicateIndex(key.index));
        }
    }
    if set.staged().is_none() {
        return Err(Malformed::NoStagedKey);
    }
    let computed = set.digest();
    if computed != claimed {
        return Err(Malformed::DigestMismatch { computed, claimed });
    }
    Ok(Checked {
        set,
        digest: computed,
    })
}

/// Key material never reaches `Debug` output, even through a logged request
/// (`build.rs` tells prost not to derive this one).
impl std::fmt::Debug for pb::Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("index", &self.index)
            .field(
                "material",
                &format_args!("<{} bytes redacted>", self.material.len()),
            )
            .finish()
    }
}

/// The wire form of `set`, for tests and the rotator.
pub fn to_wire(set: &KeySet) -> Vec<pb::Key> {
    set.iter()
        .map(|(index, key)| pb::Key {
            index,
            material: key.as_bytes().to_vec(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: u32) -> KeySet {
        KeySet::from_keys((0..n).map(|i| (i, Key::generate())))
    }

    #[test]
    fn accepts_a_well_formed_set_and_wipes_the_request() {
        let set = sample(3);
        let mut wire = to_wire(&set);
        let checked = key_set(7, &mut wire, &set.digest().0).expect("valid");
        assert_eq!(checked.set, set);
        assert_eq!(checked.digest, set.digest());
        assert!(wire.iter().all(|k| k.material.iter().all(|b| *b == 0)));
    }

    #[test]
    fn refuses_each_malformation() {
        let set = sample(3);
        let digest = set.digest().0;

        let mut short = to_wire(&set);
        short[1].material.truncate(31);
        assert_eq!(
            key_set(1, &mut short, &digest).unwrap_err(),
            Malformed::KeyLength { index: 1, len: 31 }
        );

        let mut no_staged = to_wire(&set);
        no_staged.remove(0);
        assert_eq!(
            key_set(1, &mut no_staged, &digest).unwrap_err(),
            Malformed::NoStagedKey
        );

        let mut one = to_wire(&set);
        one.truncate(1);
        assert_eq!(
            key_set(1, &mut one, &digest).unwrap_err(),
            Malformed::TooFewKeys(1)
        );

        let mut dup = to_wire(&set);
        dup[2].index = 1;
        assert_eq!(
            key_set(1, &mut dup, &digest).unwrap_err(),
            Malformed::DuplicateIndex(1)
        );

        let mut huge = to_wire(&set);
        huge[2].index = u32::MAX;
        assert_eq!(
            key_set(1, &mut huge, &digest).unwrap_err(),
            Malformed::IndexTooLarge(u32::MAX)
        );

        let mut wire = to_wire(&set);
        assert_eq!(
            key_set(1, &mut wire, &digest[..16]).unwrap_err(),
            Malformed::DigestLength(16)
        );
        assert_eq!(
            key_set(0, &mut wire, &digest).unwrap_err(),
            Malformed::GenerationZero
        );

        let mut wire = to_wire(&set);
        let other = sample(3).digest();
        assert!(matches!(
            key_set(1, &mut wire, &other.0).unwrap_err(),
            Malformed::DigestMismatch { claimed, .. } if claimed == other
        ));
    }

    #[test]
    fn requests_never_debug_print_key_bytes() {
        let set = sample(3);
        let request = pb::InstallRequest {
            keys: to_wire(&set),
            ..Default::default()
        };
        let printed = format!("{request:?}");
        assert!(printed.contains("<32 bytes redacted>"), "{printed}");
        assert!(!printed.contains("material: ["), "{printed}");
    }

    #[test]
    fn errors_never_contain_key_bytes() {
        let set = sample(2);
        let mut wire = to_wire(&set);
        wire[1].material.push(0);
        let message = key_set(1, &mut wire, &set.digest().0)
            .unwrap_err()
            .to_string();
        for (_, key) in set.iter() {
            assert!(!message.contains(key.to_base64().as_str()));
        }
    }
}
