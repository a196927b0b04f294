//! Keystone Fernet tokens, compatible with Keystone 30.0.0 for every payload
//! version (0 to 10): a [`Keyring`] parsed once per repository state decrypts
//! tokens at millions per second per core, [`payload`] decodes and mints payloads
//! exactly as `keystone/token/token_formatters.py` does, and [`canary`] mints the
//! short-lived tokens the rotator sends to prove a repository works.

mod fernet;
pub mod live;
pub mod msgpack;
mod order;
pub mod payload;

use std::time::{SystemTime, UNIX_EPOCH};

pub use fernet::{Decrypted, Keyring, Opened, encrypt, encrypt_with, urlsafe_b64decode};
pub use live::LiveKeyring;
pub use order::Learned;
pub use payload::{AuditIds, Encoding, Id, Methods, Payload, PayloadConfig};

use crate::repository::{Key, Role};

/// Why a token was refused or could not be minted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a Fernet token at all; Keystone says "Could not recognize Fernet token".
    #[error("malformed token ({0}): Could not recognize Fernet token")]
    Malformed(&'static str),
    /// Well-formed, but no key of the repository authenticates it.
    #[error("Could not recognize Fernet token (no key in the repository decrypts it)")]
    Unrecognized,
    /// The repository holds no key (Keystone answers HTTP 500).
    #[error("the key repository holds no key")]
    NoKeys,
    /// Authenticated, but the payload's version is not one Keystone knows.
    #[error("This is not a recognized Fernet payload version: {0}")]
    UnsupportedVersion(String),
    /// Authenticated, but Keystone's decoder fails on the payload (HTTP 500).
    #[error("undecodable token payload ({0}); Keystone fails on it with HTTP 500")]
    BadPayload(&'static str),
    /// Decoded, and expired (Keystone: 404 "Failed to validate token").
    #[error("token expired at {}", iso_time(*.expires_at).unwrap_or_else(|| expires_at.to_string()))]
    Expired { expires_at: i64 },
    /// Minting asked for a payload Keystone could not have made.
    #[error("cannot mint this payload: {0}")]
    Unmintable(&'static str),
}

/// The latest Fernet timestamp Keystone can show (9999-12-31T23:59:59Z); later
/// ones make `creation_time` fail (HTTP 500).
const MAX_ISSUED_AT: u64 = payload::MAX_EXPIRY as u64;

/// A token that a key of the repository opened and whose payload decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub key_index: u32,
    pub role: Role,
    /// The Fernet timestamp, seconds since the epoch.
    pub issued_at: u64,
    pub payload: Payload,
}

impl Token {
    /// Keystone's view of the token (`validate_token`'s fields) plus which key
    /// opened it, ready for JSON or text output.
    pub fn describe(&self, methods: &Methods) -> Description {
        let p = &self.payload;
        let id = |i: &Option<Id>| i.as_ref().map(Id::to_string);
        Description {
            version: p.version,
            payload_class: p.class_name(),
            key_index: self.key_index,
            role: self.role,
            user_id: id(&p.user_id),
            methods: methods
                .decode(p.methods)
                .into_iter()
                .map(str::to_string)
                .collect(),
            audit_ids: p.audit_ids.to_strings(),
            system: p.system.as_deref().map(str::to_string),
            domain_id: id(&p.domain_id),
            project_id: id(&p.project_id),
            trust_id: id(&p.trust_id),
            federated_group_ids: p
                .federated_group_ids
                .as_ref()
                .map(|g| g.iter().map(|i| GroupId { id: id(i) }).collect()),
            identity_provider_id: id(&p.identity_provider_id),
            protocol_id: p.protocol_id.as_deref().map(str::to_string),
            access_token_id: id(&p.access_token_id),
            app_cred_id: id(&p.app_cred_id),
            thumbprint: id(&p.thumbprint),
            issued_at: iso_time(self.issued_at as i64).unwrap_or_default(),
            expires_at: iso_time(p.expires_at).unwrap_or_default(),
        }
    }
}

/// A federated group as Keystone returns it: `{"id": ...}`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GroupId {
    pub id: Option<String>,
}

/// A decoded token in Keystone's terms; field names are `validate_token`'s.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Description {
    pub version: u8,
    pub payload_class: &'static str,
    pub key_index: u32,
    pub role: Role,
    pub user_id: Option<String>,
    pub methods: Vec<String>,
    pub audit_ids: Vec<String>,
    pub system: Option<String>,
    pub domain_id: Option<String>,
    pub project_id: Option<String>,
    pub trust_id: Option<String>,
    pub federated_group_ids: Option<Vec<GroupId>>,
    pub identity_provider_id: Option<String>,
    pub protocol_id: Option<String>,
    pub access_token_id: Option<String>,
    pub app_cred_id: Option<String>,
    pub thumbprint: Option<String>,
    pub issued_at: String,
    pub expires_at: String,
}

/// Keystone's `isotime(subsecond=True)`: `2030-01-01T00:00:00.000000Z`.
pub fn iso_time(secs: i64) -> Option<String> {
    chrono::DateTime::from_timestamp(secs, 0)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%S.000000Z").to_string())
}

/// Seconds since the epoch, now.
pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Keyring {
    /// Decrypts and decodes `token` as Keystone's `TokenFormatter.validate_token`
    /// does, without looking at the clock.
    pub fn inspect(&self, token: &str, config: &PayloadConfig) -> Result<Token, TokenError> {
        self.decode(token, config, None, None)
    }

    /// [`Keyring::inspect`], then Keystone's expiry check: valid while `now`
    /// (seconds since the epoch) is before the expiry.
    pub fn validate(
        &self,
        token: &str,
        config: &PayloadConfig,
        now: i64,
    ) -> Result<Token, TokenError> {
        self.decode(token, config, Some(now), None)
    }

    /// [`Keyring::inspect`] for a batch: keys are guessed from the stamp's
    /// promotion times and from what `learned` saw of earlier tokens (and this
    /// token teaches it). Same answers, fewer HMACs for tokens of older keys.
    pub fn inspect_learning(
        &self,
        token: &str,
        config: &PayloadConfig,
        learned: &mut Learned,
    ) -> Result<Token, TokenError> {
        self.decode(token, config, None, Some(learned))
    }

    // One closure builds the answer where it ends up: a `Token` is a few hundred
    // bytes, and copying it between layers showed in profiles.
    fn decode(
        &self,
        token: &str,
        config: &PayloadConfig,
        now: Option<i64>,
        learned: Option<&mut Learned>,
    ) -> Result<Token, TokenError> {
        self.open_learning(token, learned, |opened, plaintext| {
            let payload = payload::decode(plaintext, config)?;
            if opened.issued_at > MAX_ISSUED_AT {
                return Err(TokenError::BadPayload(
                    "Fernet timestamp beyond the year 9999",
                ));
            }
            if now.is_some_and(|now| now >= payload.expires_at) {
                return Err(TokenError::Expired {
                    expires_at: payload.expires_at,
                });
            }
            Ok(Token {
                key_index: opened.key_index,
                role: opened.role,
                issued_at: opened.issued_at,
                payload,
            })
        })
        .and_then(|decoded| decoded)
    }
}

/// Mints a token for `payload` with `key`, as Keystone's `create_token` would
/// (timestamped now, random IV).
pub fn mint(key: &Key, payload: &Payload) -> Result<String, TokenError> {
    Ok(encrypt(key, &payload::encode(payload, Encoding::Current)?))
}

/// How long a canary stays valid: long enough to cross a slow fan-out, short
/// enough that a leaked canary is worthless.
pub const CANARY_LIFETIME_SECS: i64 = 300;

/// Mints a Keystone-valid unscoped (version 0) token with `key`: a random user
/// id, the `password` method, a random audit id and an expiry
/// [`CANARY_LIFETIME_SECS`] from now. `TokenFormatter.validate_token` accepts it
/// wherever `key` is in the repository.
pub fn canary(key: &Key) -> String {
    let mut user = [0u8; 16];
    let mut audit = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut user);
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut audit);
    let mut audit_ids = AuditIds::default();
    audit_ids.push(&audit);
    let payload = Payload {
        version: 0,
        user_id: Some(Id::Uuid(user)),
        methods: Methods::default().encode(["password"]),
        audit_ids,
        expires_at: now() + CANARY_LIFETIME_SECS,
        ..Payload::default()
    };
    // A version 0 payload with a UUID user always encodes.
    encrypt(
        key,
        &payload::encode(&payload, Encoding::Current).unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repository::KeySet;

    #[test]
    fn canary_validates_and_expires() {
        let key = Key::generate();
        let ring = Keyring::new(&KeySet::from_keys([(0, Key::generate()), (1, key.clone())]));
        let config = PayloadConfig::default();
        let t = ring.validate(&canary(&key), &config, now()).unwrap();
        assert_eq!(
            (t.key_index, t.role, t.payload.version),
            (1, Role::Primary, 0)
        );
        assert_eq!(t.describe(&config.methods).methods, ["password"]);
        let later = now() + CANARY_LIFETIME_SECS + 1;
        assert!(matches!(
            ring.validate(&canary(&key), &config, later),
            Err(TokenError::Expired { .. })
        ));
    }
}

#[cfg(test)]
mod proptests {
    //! Whatever arrives, decoding answers and never panics.

    use proptest::prelude::*;

    use super::*;
    use crate::repository::KeySet;

    fn ring_and_key() -> (Keyring, Key) {
        let key = Key::from_bytes([7; 32]);
        let set = KeySet::from_keys([(0, Key::from_bytes([1; 32])), (1, key.clone())]);
        (Keyring::new(&set), key)
    }

    /// A msgpack-ish document: valid item headers in random order, so the
    /// decoder gets past the first byte far more often than with plain noise.
    fn msgpack_ish() -> impl Strategy<Value = Vec<u8>> {
        let item = prop_oneof![
            (0u8..=0x7f).prop_map(|b| vec![b]),
            (0u8..=15).prop_map(|n| vec![0x90 | n]),
            Just(vec![0xc0]),
            Just(vec![0xc2]),
            Just(vec![0xc3]),
            any::<[u8; 16]>().prop_map(|b| [&[0xc4, 16][..], &b].concat()),
            any::<f64>().prop_map(|f| [&[0xcb][..], &f.to_be_bytes()].concat()),
            "[a-z]{0,10}".prop_map(|s| [&[0xa0 | s.len() as u8][..], s.as_bytes()].concat()),
            any::<Vec<u8>>().prop_map(|b| b.into_iter().take(8).collect()),
        ];
        prop::collection::vec(item, 0..24).prop_map(|v| {
            // Start with an array and a known version most of the time.
            let mut doc = vec![0x96, 0x02];
            doc.extend(v.into_iter().flatten());
            doc
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn arbitrary_text_never_panics(s in any::<String>()) {
            let (ring, _) = ring_and_key();
            let _ = ring.inspect(&s, &PayloadConfig::default());
        }

        #[test]
        fn arbitrary_bytes_never_panic(b in any::<Vec<u8>>()) {
            let (ring, _) = ring_and_key();
            let _ = ring.inspect(&String::from_utf8_lossy(&b), &PayloadConfig::default());
            let _ = payload::decode(&b, &PayloadConfig::default());
        }

        #[test]
        fn authenticated_garbage_never_panics(doc in msgpack_ish()) {
            let (ring, key) = ring_and_key();
            let t = encrypt(&key, &doc);
            // The keys accept it; only the payload decoder can refuse it.
            let refused = matches!(
                ring.inspect(&t, &PayloadConfig::default()),
                Err(TokenError::Malformed(_) | TokenError::Unrecognized | TokenError::NoKeys)
            );
            prop_assert!(!refused, "the Fernet layer refused a token of its own key");
        }

        #[test]
        fn mutated_tokens_never_panic(
            edits in prop::collection::vec((any::<prop::sample::Index>(), any::<char>(), 0u8..3), 1..6),
        ) {
            let (ring, key) = ring_and_key();
            let mut chars: Vec<char> = canary(&key).chars().collect();
            for (at, c, op) in edits {
                let i = at.index(chars.len().max(1));
                match op {
                    0 if !chars.is_empty() => chars[i] = c,
                    1 if !chars.is_empty() => {
                        chars.remove(i);
                    }
                    _ => chars.insert(i.min(chars.len()), c),
                }
            }
            let s: String = chars.into_iter().collect();
            let _ = ring.validate(&s, &PayloadConfig::default(), now());
        }

        #[test]
        fn base64_decodes_what_it_should(b in prop::collection::vec(any::<u8>(), 0..300)) {
            use base64::Engine as _;
            let (ring, key) = ring_and_key();
            let t = encrypt(&key, &b);
            prop_assert_eq!(&ring.decrypt(&t).unwrap().plaintext, &b);
            let std = base64::engine::general_purpose::STANDARD.encode(base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(&t).unwrap());
            prop_assert_eq!(&ring.decrypt(&std).unwrap().plaintext, &b);
        }
    }
}
