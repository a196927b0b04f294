//! Which key to try first for a token. Keystone tries every key of the
//! repository, primary first, until one authenticates the token, so a token of
//! the sixth key costs six HMACs. The Fernet header carries the issue time, and a
//! token is normally signed by the key that was primary at that time: the stamp
//! says when each key was promoted ([`Promotions`]), and without a stamp the
//! keys that opened earlier tokens of about the same time are a good guess
//! ([`Learned`]). A guess is only tried first; when it fails, the remaining keys
//! follow in Keystone's order, so the answer never depends on the guess.

use std::collections::BTreeMap;

/// A stamp's promotion times in the order `Stamp::primary_at` ranks them.
#[derive(Debug, Clone, Default)]
pub(crate) struct Promotions {
    /// (Unix seconds, key index), ascending: the primary at `t` is the last
    /// entry at or before `t`.
    by_time: Vec<(i64, u32)>,
}

impl Promotions {
    pub(crate) fn new(promoted: &BTreeMap<u32, i64>) -> Self {
        let mut by_time: Vec<(i64, u32)> = promoted.iter().map(|(&i, &at)| (at, i)).collect();
        by_time.sort_unstable();
        Promotions { by_time }
    }

    /// The key the stamp says was primary at `issued_at`, exactly as
    /// `Stamp::primary_at` answers.
    pub(crate) fn primary_at(&self, issued_at: u64) -> Option<u32> {
        let t = i64::try_from(issued_at).ok()?;
        let after = self.by_time.partition_point(|&(at, _)| at <= t);
        after.checked_sub(1).map(|i| self.by_time[i].1)
    }
}

/// What the keys that opened earlier tokens of a batch suggest: each key's span
/// of issue times. Tokens issued while a key was primary were signed by it, so
/// a token falls, most of the time, in the span of the key that signed it.
#[derive(Debug, Clone, Default)]
pub struct Learned {
    spans: Vec<Span>,
}

#[derive(Debug, Clone, Copy)]
struct Span {
    index: u32,
    first: u64,
    last: u64,
}

/// Keys remembered at most; a repository holds a handful, and keys that left
/// it are forgotten first.
const MAX_SPANS: usize = 32;

impl Learned {
    pub fn new() -> Self {
        Self::default()
    }

    /// The key whose span is nearest `issued_at` (containing it when one does);
    /// between equals, the key that started signing later, as the newer key is
    /// the one whose tokens keep coming.
    pub(crate) fn guess(&self, issued_at: u64) -> Option<u32> {
        self.spans
            .iter()
            .min_by_key(|s| {
                let distance = s
                    .first
                    .saturating_sub(issued_at)
                    .max(issued_at.saturating_sub(s.last));
                (distance, std::cmp::Reverse(s.first))
            })
            .map(|s| s.index)
    }

    /// Key `index` opened a token issued at `issued_at`.
    pub(crate) fn record(&mut self, index: u32, issued_at: u64) {
        if let Some(s) = self.spans.iter_mut().find(|s| s.index == index) {
            s.first = s.first.min(issued_at);
            s.last = s.last.max(issued_at);
            return;
        }
        if self.spans.len() >= MAX_SPANS {
            // Forget the key that signed nothing for the longest time.
            if let Some(oldest) = (0..self.spans.len()).min_by_key(|&i| self.spans[i].last) {
                self.spans.swap_remove(oldest);
            }
        }
        self.spans.push(Span {
            index,
            first: issued_at,
            last: issued_at,
        });
    }
}

#[cfg(test)]
mod tests {
    //! The oracle is Keystone's order: a keyring without promotion times and
    //! without a batch's memory tries the keys exactly as `MultiFernet` does
    //! (checked against real Keystone by the vector and mutation tests).

    use proptest::prelude::*;

    use super::*;
    use crate::repository::{Key, KeySet, Stamp};
    use crate::token::{Keyring, Payload, PayloadConfig, encrypt_with, payload};

    #[test]
    fn promotions_answer_as_the_stamp_does() {
        let promoted = BTreeMap::from([(1, 100), (2, 200), (3, 200), (4, -5), (7, 50)]);
        let stamp = Stamp {
            generation: 1,
            digest: KeySet::new().digest(),
            promoted: promoted.clone(),
            agent: false,
        };
        let p = Promotions::new(&promoted);
        for t in [0u64, 49, 50, 99, 100, 150, 199, 200, 201, 1 << 40, u64::MAX] {
            let expected = i64::try_from(t).ok().and_then(|t| stamp.primary_at(t));
            assert_eq!(p.primary_at(t), expected, "{t}");
        }
        assert_eq!(Promotions::new(&BTreeMap::new()).primary_at(5), None);
    }

    #[test]
    fn learned_guesses_the_span_of_the_issue_time() {
        let mut l = Learned::new();
        assert_eq!(l.guess(10), None);
        l.record(3, 100);
        l.record(3, 200);
        l.record(4, 300);
        l.record(4, 400);
        assert_eq!(l.guess(150), Some(3));
        assert_eq!(l.guess(10), Some(3));
        assert_eq!(l.guess(260), Some(4));
        assert_eq!(l.guess(240), Some(3));
        assert_eq!(l.guess(10_000), Some(4));
        for i in 0..100 {
            l.record(i + 10, 1000 + u64::from(i));
        }
        assert_eq!(l.spans.len(), MAX_SPANS);
    }

    /// What a token is made of: which key (of the pool, or a hybrid of two
    /// pool keys' halves, or a foreign key), when, and what it carries.
    #[derive(Debug, Clone)]
    struct Made {
        signer: usize,
        encrypter: usize,
        issued_at: u64,
        body: Body,
        mutation: Option<(prop::sample::Index, u8)>,
    }

    #[derive(Debug, Clone)]
    enum Body {
        /// A valid unscoped payload expiring at this offset from "now".
        Valid(i64),
        /// Bytes Keystone's decoder refuses.
        Garbage(Vec<u8>),
    }

    const NOW: i64 = 1_900_000_000;
    /// Issue times and promotion times share this window, so tokens fall
    /// before, between and after promotions.
    const SPAN: i64 = 10_000;

    fn made() -> impl Strategy<Value = Made> {
        let body = prop_oneof![
            4 => (-100i64..100).prop_map(Body::Valid),
            1 => prop::collection::vec(any::<u8>(), 0..40).prop_map(Body::Garbage),
        ];
        (
            0usize..10,
            0usize..10,
            any::<bool>(),
            0..SPAN,
            body,
            prop::option::weighted(0.15, (any::<prop::sample::Index>(), any::<u8>())),
        )
            .prop_map(|(signer, other, hybrid, t, body, mutation)| Made {
                signer,
                // Mostly a real key; sometimes one key's signing half with
                // another's encryption half (good HMAC, bad padding).
                encrypter: if hybrid { other } else { signer },
                issued_at: (NOW - SPAN + t) as u64,
                body,
                mutation,
            })
    }

    /// A repository: distinct indices from a small range (0 is staged), each
    /// naming a pool key; pool keys may repeat (two files with the same key) and
    /// pool keys 0 and 1 share their signing half.
    fn repository() -> impl Strategy<Value = Vec<(u32, usize)>> {
        prop::collection::btree_map(0u32..9, 0usize..8, 1..7).prop_map(|m| m.into_iter().collect())
    }

    /// Promotion times, for indices in the repository or not, anywhere around
    /// the tokens' issue times: a stamp that may lie.
    fn promoted() -> impl Strategy<Value = BTreeMap<u32, i64>> {
        prop::collection::btree_map(0u32..12, (NOW - SPAN - 100)..(NOW + 100), 0..8)
    }

    fn pool(seed: u8) -> Vec<Key> {
        let mut keys: Vec<Key> = (0..10u8)
            .map(|i| Key::from_bytes([seed.wrapping_add(i.wrapping_mul(37)); 32]))
            .collect();
        let mut shared = *keys[1].as_bytes();
        shared[..16].copy_from_slice(keys[0].signing_key());
        keys[1] = Key::from_bytes(shared);
        keys
    }

    fn token(keys: &[Key], m: &Made, n: usize) -> String {
        let mut bytes = [0u8; 32];
        bytes[..16].copy_from_slice(keys[m.signer].signing_key());
        bytes[16..].copy_from_slice(keys[m.encrypter].encryption_key());
        let plaintext = match &m.body {
            Body::Valid(offset) => {
                let mut audit_ids = payload::AuditIds::default();
                audit_ids.push(&[n as u8; 16]);
                payload::encode(
                    &Payload {
                        version: 0,
                        user_id: Some(payload::Id::Uuid([n as u8; 16])),
                        methods: 1,
                        audit_ids,
                        expires_at: NOW + offset,
                        ..Payload::default()
                    },
                    payload::Encoding::Current,
                )
                .unwrap()
            }
            Body::Garbage(b) => b.clone(),
        };
        let mut t = encrypt_with(
            &Key::from_bytes(bytes),
            &plaintext,
            m.issued_at,
            [n as u8; 16],
        )
        .into_bytes();
        if let Some((at, c)) = m.mutation {
            let i = at.index(t.len());
            t[i] = b"AZaz09-_=!"[usize::from(c) % 10];
        }
        String::from_utf8(t).unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// Guessing by promotion time, by what the batch learned, or both, gives
        /// every token exactly the answer of Keystone's order: which key, which
        /// role, which payload, which error.
        #[test]
        fn guided_orders_agree_with_keystone_order(
            seed in any::<u8>(),
            repo in repository(),
            promoted in promoted(),
            tokens in prop::collection::vec(made(), 1..60),
        ) {
            let keys = pool(seed);
            let set = KeySet::from_keys(repo.iter().map(|&(i, k)| (i, keys[k].clone())));
            let keystone = Keyring::new(&set);
            let stamped = Keyring::with_promotions(&set, &promoted);
            let config = PayloadConfig::default();
            let mut learned_alone = Learned::new();
            let mut learned_stamped = Learned::new();
            for (n, m) in tokens.iter().enumerate() {
                let t = token(&keys, m, n);
                let expected = keystone.inspect(&t, &config);
                prop_assert_eq!(&stamped.inspect(&t, &config), &expected, "stamp, {:?}", m);
                prop_assert_eq!(
                    &keystone.inspect_learning(&t, &config, &mut learned_alone),
                    &expected,
                    "learned, {:?}", m
                );
                prop_assert_eq!(
                    &stamped.inspect_learning(&t, &config, &mut learned_stamped),
                    &expected,
                    "stamp and learned, {:?}", m
                );
                // Expiry is judged after decoding, on the same token.
                if let Ok(tok) = &expected {
                    prop_assert_eq!(
                        stamped.validate(&t, &config, NOW).is_ok(),
                        NOW < tok.payload.expires_at
                    );
                }
            }
        }
    }
}
