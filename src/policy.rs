//! Keystone's token policy and the rule it imposes on rotation: how long tokens
//! live (`[token] expiration`, `[token] allow_expired_window`), how many keys a
//! repository keeps (`[fernet_tokens] max_active_keys`), and Keystone's own
//! minimum, `ceil((expiration + allow_expired_window) / rotation_interval) + 2`.
//! A key must survive as a secondary until every token it encrypted is past its
//! expiry and the allowed window; fewer keys make valid tokens fail with 404.
//! The policy is read from a region's `keystone.conf` with oslo.config's INI
//! rules, so the rotator and agents check the schedule against what Keystone
//! actually runs with rather than against a second, drifting copy of it.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Keystone's default `[token] expiration`: one hour.
pub const DEFAULT_TOKEN_EXPIRATION: Duration = Duration::from_secs(3600);
/// Keystone's default `[token] allow_expired_window`: two days.
pub const DEFAULT_ALLOW_EXPIRED_WINDOW: Duration = Duration::from_secs(48 * 60 * 60);
/// Keystone's default `[fernet_tokens] max_active_keys`.
pub const DEFAULT_MAX_ACTIVE_KEYS: usize = 3;
/// Keystone's default `[fernet_tokens] key_repository` (also `[fernet_receipts]`).
pub const DEFAULT_KEY_REPOSITORY: &str = "/etc/keystone/fernet-keys/";
/// Keystone's default `[credential] key_repository`.
pub const DEFAULT_CREDENTIAL_KEY_REPOSITORY: &str = "/etc/keystone/credential-keys/";
/// oslo.cache's default `[cache] expiration_time`, in seconds.
const DEFAULT_CACHE_EXPIRATION: u64 = 600;

/// The part of Keystone's configuration that constrains rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// `[token] expiration`: how long a token is valid after it is issued.
    pub token_expiration: Duration,
    /// `[token] allow_expired_window`: how long after expiry a service may still
    /// fetch a token with `allow_expired=true`.
    pub allow_expired_window: Duration,
    /// `[fernet_tokens] max_active_keys`: keys kept, the staged key included.
    pub max_active_keys: usize,
}

impl Default for Policy {
    /// Keystone 30.0.0's defaults.
    fn default() -> Self {
        Policy {
            token_expiration: DEFAULT_TOKEN_EXPIRATION,
            allow_expired_window: DEFAULT_ALLOW_EXPIRED_WINDOW,
            max_active_keys: DEFAULT_MAX_ACTIVE_KEYS,
        }
    }
}

impl Policy {
    /// The fewest keys a repository rotated every `rotation_interval` needs so no
    /// token this policy allows is left without its key.
    pub fn min_active_keys(&self, rotation_interval: Duration) -> usize {
        min_active_keys(
            self.token_expiration,
            self.allow_expired_window,
            rotation_interval,
        )
    }

    /// Checks that `max_active_keys` keeps every key long enough for a rotation
    /// every `rotation_interval` (the shortest gap between two rotations).
    pub fn check(&self, rotation_interval: Duration) -> Result<(), PolicyError> {
        self.check_keys(self.max_active_keys, rotation_interval)
    }

    /// Checks a `max_active_keys` configured elsewhere (the rotator's own) against
    /// this policy's token lifetimes.
    pub fn check_keys(
        &self,
        max_active_keys: usize,
        rotation_interval: Duration,
    ) -> Result<(), PolicyError> {
        if rotation_interval.is_zero() {
            return Err(PolicyError::ZeroInterval);
        }
        let minimum = self.min_active_keys(rotation_interval);
        if max_active_keys < minimum {
            return Err(PolicyError::TooFewKeys {
                max_active_keys,
                minimum,
                token_expiration: Seconds(self.token_expiration),
                allow_expired_window: Seconds(self.allow_expired_window),
                rotation_interval: Seconds(rotation_interval),
            });
        }
        Ok(())
    }
}

/// Keystone's formula: `ceil((token_expiration + allow_expired_window) / rotation_interval) + 2`.
///
/// The `+ 2` are the staged key (never encrypted anything yet) and the primary;
/// the rest are secondaries that each cover one rotation interval of issued
/// tokens. A zero interval needs unboundedly many keys: `usize::MAX`.
pub fn min_active_keys(
    token_expiration: Duration,
    allow_expired_window: Duration,
    rotation_interval: Duration,
) -> usize {
    let interval = rotation_interval.as_nanos();
    if interval == 0 {
        return usize::MAX;
    }
    let lifetime = token_expiration.as_nanos() + allow_expired_window.as_nanos();
    let secondaries = lifetime.div_ceil(interval);
    usize::try_from(secondaries)
        .ok()
        .and_then(|n| n.checked_add(2))
        .unwrap_or(usize::MAX)
}

/// A duration shown in whole seconds, as keystone.conf writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seconds(pub Duration);

impl fmt::Display for Seconds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        if d.subsec_nanos() == 0 {
            write!(f, "{} s", d.as_secs())
        } else {
            write!(f, "{:.3} s", d.as_secs_f64())
        }
    }
}

/// What keystone.conf says about tokens, their keys and their cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeystoneConf {
    /// The file it was read from.
    pub path: PathBuf,
    /// `[token] expiration`, `[token] allow_expired_window`, `[fernet_tokens] max_active_keys`.
    pub policy: Policy,
    /// `[token] provider` (`fernet` unless set).
    pub token_provider: String,
    /// `[fernet_tokens] key_repository`.
    pub token_key_repository: PathBuf,
    /// `[fernet_receipts] key_repository`.
    pub receipt_key_repository: PathBuf,
    /// `[fernet_receipts] max_active_keys`.
    pub receipt_max_active_keys: usize,
    /// `[credential] key_repository`.
    pub credential_key_repository: PathBuf,
    /// How long a token validation stays memoized, or `None` when tokens are not
    /// cached (`[cache] enabled = false` or `[token] caching = false`). It is
    /// `[token] cache_time`, falling back to `[cache] expiration_time`.
    pub token_cache_ttl: Option<Duration>,
}

impl KeystoneConf {
    /// Reads `path` as Keystone would (oslo.config), keeping only the options above.
    pub fn load(path: &Path) -> Result<KeystoneConf, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.to_owned(),
            source,
        })?;
        KeystoneConf::parse(path, &text)
    }

    /// Parses keystone.conf text; `path` only names it in errors.
    pub fn parse(path: &Path, text: &str) -> Result<KeystoneConf, PolicyError> {
        let values = parse_ini(path, text)?;
        let get = |section: &'static str, key: &'static str| values.get(section, key);
        let int = |section: &'static str,
                   key: &'static str,
                   min: i64|
         -> Result<Option<u64>, PolicyError> {
            let Some(v) = get(section, key) else {
                return Ok(None);
            };
            let bad = |expected: &'static str| PolicyError::Value {
                path: path.to_owned(),
                line: v.line,
                section,
                key,
                value: v.text.clone(),
                expected,
            };
            // oslo.config's Integer type: surrounding spaces allowed, empty means unset.
            let text = v.text.trim();
            if text.is_empty() {
                return Ok(None);
            }
            let n: i64 = text.parse().map_err(|_| bad("an integer"))?;
            if n < min {
                return Err(bad(if min == 0 {
                    "an integer >= 0"
                } else {
                    "an integer >= 1"
                }));
            }
            Ok(Some(n.unsigned_abs()))
        };
        let boolean = |section: &'static str,
                       key: &'static str,
                       default: bool|
         -> Result<bool, PolicyError> {
            let Some(v) = get(section, key) else {
                return Ok(default);
            };
            match v.text.trim().to_ascii_lowercase().as_str() {
                "" => Ok(default),
                "true" | "1" | "on" | "yes" => Ok(true),
                "false" | "0" | "off" | "no" => Ok(false),
                _ => Err(PolicyError::Value {
                    path: path.to_owned(),
                    line: v.line,
                    section,
                    key,
                    value: v.text.clone(),
                    expected: "a boolean (true/false, on/off, yes/no, 1/0)",
                }),
            }
        };
        let dir = |section: &'static str, default: &str| -> Result<PathBuf, PolicyError> {
            match get(section, "key_repository") {
                None => Ok(PathBuf::from(default)),
                Some(v) if v.text.is_empty() || v.text.contains('\n') => Err(PolicyError::Value {
                    path: path.to_owned(),
                    line: v.line,
                    section,
                    key: "key_repository",
                    value: v.text.clone(),
                    expected: "a directory path on one line",
                }),
                Some(v) => Ok(PathBuf::from(&v.text)),
            }
        };
        let secs = |n: Option<u64>, default: Duration| n.map_or(default, Duration::from_secs);
        // Saturating: a count beyond the address space passes every check anyway.
        let keys = |n: Option<u64>| {
            n.map_or(DEFAULT_MAX_ACTIVE_KEYS, |n| {
                usize::try_from(n).unwrap_or(usize::MAX)
            })
        };

        let policy = Policy {
            token_expiration: secs(int("token", "expiration", 0)?, DEFAULT_TOKEN_EXPIRATION),
            // Keystone accepts a negative window, but it means "none" and makes the formula meaningless.
            allow_expired_window: secs(
                int("token", "allow_expired_window", 0)?,
                DEFAULT_ALLOW_EXPIRED_WINDOW,
            ),
            max_active_keys: keys(int("fernet_tokens", "max_active_keys", 1)?),
        };
        let receipt_max_active_keys = keys(int("fernet_receipts", "max_active_keys", 1)?);
        let cache_enabled = boolean("cache", "enabled", false)?;
        let token_caching = boolean("token", "caching", true)?;
        let cache_expiration =
            int("cache", "expiration_time", 1)?.unwrap_or(DEFAULT_CACHE_EXPIRATION);
        let token_cache_time = int("token", "cache_time", 0)?;
        let token_cache_ttl = (cache_enabled && token_caching)
            .then(|| Duration::from_secs(token_cache_time.unwrap_or(cache_expiration)));
        let token_provider = get("token", "provider")
            .map(|v| v.text.trim().to_owned())
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| "fernet".to_owned());

        Ok(KeystoneConf {
            path: path.to_owned(),
            policy,
            token_provider,
            token_key_repository: dir("fernet_tokens", DEFAULT_KEY_REPOSITORY)?,
            receipt_key_repository: dir("fernet_receipts", DEFAULT_KEY_REPOSITORY)?,
            receipt_max_active_keys,
            credential_key_repository: dir("credential", DEFAULT_CREDENTIAL_KEY_REPOSITORY)?,
            token_cache_ttl,
        })
    }

    /// The rule for a token cache in front of this repository: a validation that
    /// answered "valid" must leave the cache before the token's key leaves the
    /// repository. The last "valid" answer for a token comes at most
    /// `expiration + allow_expired_window` after the end of its key's primary
    /// period and is then kept `ttl` longer, while the key stays
    /// `(max_active_keys - 2) * rotation_interval` after it stops being primary.
    /// So the cache TTL counts as extra token lifetime in Keystone's formula.
    pub fn check_cache(
        &self,
        max_active_keys: usize,
        rotation_interval: Duration,
    ) -> Result<(), PolicyError> {
        let Some(ttl) = self.token_cache_ttl else {
            return Ok(());
        };
        if rotation_interval.is_zero() {
            return Err(PolicyError::ZeroInterval);
        }
        let p = &self.policy;
        let minimum = min_active_keys(
            p.token_expiration,
            p.allow_expired_window + ttl,
            rotation_interval,
        );
        if max_active_keys < minimum {
            return Err(PolicyError::CacheOutlivesKey {
                max_active_keys,
                minimum,
                cache_ttl: Seconds(ttl),
                rotation_interval: Seconds(rotation_interval),
            });
        }
        Ok(())
    }

    /// The rotator's start-up check against the Keystone it serves. Refuses
    /// (`Err`, a configuration error) when fernetd's token lifetimes differ from
    /// Keystone's or when a repository keeps too few keys for the schedule by
    /// Keystone's formula; returns warnings for what is merely inconsistent: a
    /// `max_active_keys` that differs from keystone.conf's (Keystone only uses it
    /// in `keystone-manage fernet_rotate`), a token cache that could outlive a
    /// key, a provider other than fernet.
    pub fn check_rotator(
        &self,
        token_expiration: Duration,
        allow_expired_window: Duration,
        repositories: &[(&str, usize)],
        rotation_interval: Duration,
    ) -> Result<Vec<String>, PolicyError> {
        for (option, keystone, fernetd) in [
            ("expiration", self.policy.token_expiration, token_expiration),
            (
                "allow_expired_window",
                self.policy.allow_expired_window,
                allow_expired_window,
            ),
        ] {
            if keystone != fernetd {
                return Err(PolicyError::LifetimeMismatch {
                    path: self.path.clone(),
                    option,
                    keystone: Seconds(keystone),
                    fernetd: Seconds(fernetd),
                });
            }
        }
        let mut warnings = self.provider_warning().into_iter().collect::<Vec<_>>();
        for &(name, max_active_keys) in repositories {
            self.policy.check_keys(max_active_keys, rotation_interval)?;
            let keystone_keys = match name {
                "tokens" => Some(("fernet_tokens", self.policy.max_active_keys)),
                "receipts" => Some(("fernet_receipts", self.receipt_max_active_keys)),
                _ => None,
            };
            if let Some((section, keys)) =
                keystone_keys.filter(|&(_, keys)| keys != max_active_keys)
            {
                warnings.push(format!(
                    "repository `{name}` keeps {max_active_keys} keys but {} sets [{section}] \
                     max_active_keys = {keys}; only keystone-manage fernet_rotate reads it, set it \
                     to {max_active_keys} so the two cannot be confused",
                    self.path.display()
                ));
            }
            if name == "tokens" {
                if let Err(e) = self.check_cache(max_active_keys, rotation_interval) {
                    warnings.push(e.to_string());
                }
            }
        }
        Ok(warnings)
    }

    /// The agent's start-up check against its region's Keystone: every managed
    /// repository Keystone knows by name (`tokens`, `receipts`, `credential`)
    /// must be the directory Keystone reads, or Keystone would go on using keys
    /// nobody updates. Returns warnings for what does not stop it.
    pub fn check_agent(&self, repositories: &[(&str, &Path)]) -> Result<Vec<String>, PolicyError> {
        for &(name, target) in repositories {
            let (section, keystone) = match name {
                "tokens" => ("fernet_tokens", &self.token_key_repository),
                "receipts" => ("fernet_receipts", &self.receipt_key_repository),
                "credential" => ("credential", &self.credential_key_repository),
                _ => continue,
            };
            if !same_dir(target, keystone) {
                return Err(PolicyError::RepositoryMismatch {
                    path: self.path.clone(),
                    name: name.to_owned(),
                    section,
                    agent: target.to_owned(),
                    keystone: keystone.clone(),
                });
            }
        }
        Ok(self.provider_warning().into_iter().collect())
    }

    fn provider_warning(&self) -> Option<String> {
        (self.token_provider != "fernet").then(|| {
            format!(
                "{} sets [token] provider = {}: Keystone does not use the fernet keys for tokens",
                self.path.display(),
                self.token_provider
            )
        })
    }
}

/// Whether two spellings name the same directory: by identity when both exist
/// (symlinks, `..`), else lexically up to trailing slashes.
fn same_dir(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a.components().eq(b.components()),
    }
}

/// Why a keystone.conf could not be used, or why a schedule breaks its policy.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read Keystone configuration {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The line itself is not quoted: keystone.conf holds database passwords.
    #[error("{}:{line}: {message} (oslo.config would refuse this file)", path.display())]
    Syntax {
        path: PathBuf,
        line: usize,
        message: &'static str,
    },
    #[error("{}:{line}: [{section}] {key} = {value:?} must be {expected}", path.display())]
    Value {
        path: PathBuf,
        line: usize,
        section: &'static str,
        key: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error(
        "max_active_keys = {max_active_keys} is too few: tokens live {token_expiration} \
         (expiration) + {allow_expired_window} (allow_expired_window) and keys rotate every \
         {rotation_interval}, so Keystone's formula ceil((expiration + allow_expired_window) / \
         rotation interval) + 2 needs at least {minimum}; raise max_active_keys or rotate less often"
    )]
    TooFewKeys {
        max_active_keys: usize,
        minimum: usize,
        token_expiration: Seconds,
        allow_expired_window: Seconds,
        rotation_interval: Seconds,
    },
    #[error(
        "max_active_keys = {max_active_keys} lets a cached token validation ({cache_ttl}, \
         [token] cache_time or [cache] expiration_time) outlive its key when rotating every \
         {rotation_interval}: with the cache time added to the token lifetime, the formula \
         needs at least {minimum}; shorten the cache time or keep more keys"
    )]
    CacheOutlivesKey {
        max_active_keys: usize,
        minimum: usize,
        cache_ttl: Seconds,
        rotation_interval: Seconds,
    },
    #[error("the rotation interval is zero: a schedule must leave time between rotations")]
    ZeroInterval,
    #[error(
        "{} sets [token] {option} = {keystone} but fernetd's policy says {fernetd}: \
         the schedule would be checked against the wrong token lifetime; make them equal",
        path.display()
    )]
    LifetimeMismatch {
        path: PathBuf,
        option: &'static str,
        keystone: Seconds,
        fernetd: Seconds,
    },
    #[error(
        "repository `{name}` is written to {} but Keystone reads [{section}] key_repository = {} \
         (from {}): Keystone would never see the keys fernetd installs",
        agent.display(),
        keystone.display(),
        path.display()
    )]
    RepositoryMismatch {
        path: PathBuf,
        name: String,
        section: &'static str,
        agent: PathBuf,
        keystone: PathBuf,
    },
}

/// One option's raw value and the line it started on.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RawValue {
    line: usize,
    text: String,
}

/// The options this module reads, by (normalized section, key). Other options are
/// parsed for syntax but not kept: keystone.conf holds secrets we have no use for.
#[derive(Debug, Default)]
struct Wanted(Vec<(&'static str, &'static str, RawValue)>);

const WANTED: &[(&str, &str)] = &[
    ("token", "expiration"),
    ("token", "allow_expired_window"),
    ("token", "provider"),
    ("token", "caching"),
    ("token", "cache_time"),
    ("fernet_tokens", "max_active_keys"),
    ("fernet_tokens", "key_repository"),
    ("fernet_receipts", "max_active_keys"),
    ("fernet_receipts", "key_repository"),
    ("credential", "key_repository"),
    ("cache", "enabled"),
    ("cache", "expiration_time"),
];

impl Wanted {
    fn get(&self, section: &str, key: &str) -> Option<&RawValue> {
        // oslo.config keeps every assignment and uses the last one.
        self.0
            .iter()
            .rev()
            .find(|(s, k, _)| *s == section && *k == key)
            .map(|(_, _, v)| v)
    }

    fn assign(&mut self, section: &str, key: &str, value: RawValue) {
        if let Some(&(s, k)) = WANTED.iter().find(|(s, k)| *s == section && *k == key) {
            self.0.push((s, k, value));
        }
    }
}

/// oslo.config's INI dialect (`oslo_config.iniparser` + `cfg.ConfigParser`):
/// `#`/`;` comments on their own line only, `key = value` or `key: value` split at
/// the first of either, one pair of matching quotes stripped, indented lines
/// continue the previous value (joined with `\n`), blank lines end it, section
/// names lower-cased except `DEFAULT`, and an assignment before any section is an
/// error. `[DEFAULT]` options never apply to other sections.
fn parse_ini(path: &Path, text: &str) -> Result<Wanted, PolicyError> {
    let syntax = |line: usize, message: &'static str| PolicyError::Syntax {
        path: path.to_owned(),
        line,
        message,
    };
    let mut wanted = Wanted::default();
    let mut section: Option<String> = None;
    // The assignment being built: its key, first line and value lines.
    let mut pending: Option<(String, usize, Vec<String>)> = None;
    let flush = |pending: &mut Option<(String, usize, Vec<String>)>,
                 section: &Option<String>,
                 wanted: &mut Wanted|
     -> Result<(), PolicyError> {
        if let Some((key, line, value)) = pending.take() {
            let Some(section) = section else {
                return Err(syntax(line, "an option appears before any [section]"));
            };
            wanted.assign(
                section,
                &key,
                RawValue {
                    line,
                    text: value.join("\n"),
                },
            );
        }
        Ok(())
    };
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let line = raw.trim_end();
        if line.is_empty() {
            flush(&mut pending, &section, &mut wanted)?;
            continue;
        }
        if line.starts_with([' ', '\t']) {
            match pending.as_mut() {
                Some((_, _, value)) => value.push(line.trim_start().to_owned()),
                None => return Err(syntax(n, "an indented continuation line follows no option")),
            }
            continue;
        }
        flush(&mut pending, &section, &mut wanted)?;
        if line.starts_with('[') {
            if !line.ends_with(']') {
                return Err(syntax(n, "a section header must end with ]"));
            }
            if line.len() <= 2 {
                return Err(syntax(n, "a section header has no name"));
            }
            let name = &line[1..line.len() - 1];
            section = Some(if name == "DEFAULT" {
                name.to_owned()
            } else {
                name.to_lowercase()
            });
        } else if line.starts_with(['#', ';']) {
            continue;
        } else {
            let split = match (line.find('='), line.find(':')) {
                (Some(e), Some(c)) => e.min(c),
                (Some(e), None) => e,
                (None, Some(c)) => c,
                (None, None) => {
                    return Err(syntax(
                        n,
                        "a line is neither a section, a comment nor `key = value`",
                    ));
                }
            };
            let key = line[..split].trim();
            if key.is_empty() {
                return Err(syntax(n, "an option has an empty name"));
            }
            let mut value = line[split + 1..].trim();
            if value.len() >= 2
                && (value.starts_with('"') || value.starts_with('\''))
                && value.ends_with(&value[..1])
            {
                value = &value[1..value.len() - 1];
            } else if value == "\"" || value == "'" {
                // Python's value[1:-1] on a lone quote: the empty string.
                value = "";
            }
            pending = Some((key.to_owned(), n, vec![value.to_owned()]));
        }
    }
    flush(&mut pending, &section, &mut wanted)?;
    Ok(wanted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<KeystoneConf, PolicyError> {
        KeystoneConf::parse(Path::new("/etc/keystone/keystone.conf"), text)
    }

    const HOUR: Duration = Duration::from_secs(3600);
    const DAY: Duration = Duration::from_secs(86400);

    #[test]
    fn formula_matches_keystone_docs() {
        // Keystone's FAQ example: 1 h tokens... with defaults (1 h + 48 h) rotated daily.
        assert_eq!(min_active_keys(HOUR, 2 * DAY, DAY), 3 + 2);
        // Exactly divisible: no rounding up.
        assert_eq!(min_active_keys(HOUR, Duration::ZERO, HOUR), 3);
        // One second over: one more key.
        assert_eq!(
            min_active_keys(HOUR + Duration::from_secs(1), Duration::ZERO, HOUR),
            4
        );
        // Hourly rotation with Keystone's defaults needs 51 keys.
        assert_eq!(min_active_keys(HOUR, 2 * DAY, HOUR), 51);
        // No lifetime at all still needs the staged key and the primary.
        assert_eq!(min_active_keys(Duration::ZERO, Duration::ZERO, HOUR), 2);
        assert_eq!(min_active_keys(HOUR, HOUR, Duration::ZERO), usize::MAX);
        // Sub-second intervals (tests) round like everything else.
        assert_eq!(
            min_active_keys(
                Duration::from_secs(10),
                Duration::ZERO,
                Duration::from_millis(1500)
            ),
            7 + 2
        );
    }

    #[test]
    fn check_states_the_minimum() {
        let policy = Policy::default();
        assert!(policy.check(Duration::from_secs(176_400)).is_ok());
        let err = policy.check(DAY).unwrap_err();
        match &err {
            PolicyError::TooFewKeys {
                max_active_keys,
                minimum,
                ..
            } => {
                assert_eq!((*max_active_keys, *minimum), (3, 5));
            }
            other => panic!("unexpected {other:?}"),
        }
        let text = err.to_string();
        assert!(text.contains("at least 5"), "{text}");
        assert!(text.contains("86400 s"), "{text}");
        assert!(text.contains("172800 s"), "{text}");
        assert!(policy.check_keys(5, DAY).is_ok());
        assert!(matches!(
            policy.check(Duration::ZERO),
            Err(PolicyError::ZeroInterval)
        ));
    }

    #[test]
    fn defaults_when_options_are_absent() {
        let conf = parse("[DEFAULT]\ndebug = true\n").unwrap();
        assert_eq!(conf.policy, Policy::default());
        assert_eq!(conf.token_provider, "fernet");
        assert_eq!(conf.token_key_repository, Path::new(DEFAULT_KEY_REPOSITORY));
        assert_eq!(
            conf.receipt_key_repository,
            Path::new(DEFAULT_KEY_REPOSITORY)
        );
        assert_eq!(
            conf.credential_key_repository,
            Path::new(DEFAULT_CREDENTIAL_KEY_REPOSITORY)
        );
        assert_eq!(conf.receipt_max_active_keys, 3);
        assert_eq!(conf.token_cache_ttl, None);
        assert_eq!(parse("").unwrap().policy, Policy::default());
    }

    #[test]
    fn reads_the_policy_like_oslo_config() {
        let conf = parse(
            "# keystone.conf\n\
             [DEFAULT]\n\
             # DEFAULT options never apply to other groups\n\
             expiration = 1\n\
             max_active_keys = 1\n\
             \n\
             [TOKEN]\n\
             expiration=7200\n\
             ; a comment\n\
             allow_expired_window : 3600\n\
             provider = \"fernet\"\n\
             [fernet_tokens]\n\
             key_repository = '/var/lib/fernetd/tokens'\n\
             max_active_keys = 4\n\
             max_active_keys =   9   \n\
             [fernet_receipts]\n\
             key_repository = /var/lib/fernetd/receipts\n\
             [credential]\n\
             key_repository = /var/lib/fernetd/credential\n",
        )
        .unwrap();
        assert_eq!(
            conf.policy,
            Policy {
                token_expiration: Duration::from_secs(7200),
                allow_expired_window: HOUR,
                max_active_keys: 9,
            }
        );
        assert_eq!(
            conf.token_key_repository,
            Path::new("/var/lib/fernetd/tokens")
        );
        assert_eq!(
            conf.receipt_key_repository,
            Path::new("/var/lib/fernetd/receipts")
        );
        assert_eq!(
            conf.credential_key_repository,
            Path::new("/var/lib/fernetd/credential")
        );
    }

    #[test]
    fn the_first_separator_wins_and_inline_hashes_are_values() {
        // `a: b = c` splits at ':'; oslo.config has no inline comments.
        let err = parse("[token]\nexpiration = 3600 # one hour\n").unwrap_err();
        match err {
            PolicyError::Value {
                line,
                value,
                section,
                key,
                ..
            } => {
                assert_eq!((line, section, key), (2, "token", "expiration"));
                assert_eq!(value, "3600 # one hour");
            }
            other => panic!("unexpected {other:?}"),
        }
        let conf = parse("[fernet_tokens]\nkey_repository: /srv/a=b\n").unwrap();
        assert_eq!(conf.token_key_repository, Path::new("/srv/a=b"));
    }

    #[test]
    fn continuation_lines_join_and_blank_lines_end_them() {
        let err = parse("[token]\nexpiration = 3600\n  7200\n").unwrap_err();
        assert!(matches!(err, PolicyError::Value { line: 2, .. }), "{err:?}");
        let conf =
            parse("[token]\nprovider = fernet\n\n[fernet_tokens]\nmax_active_keys = 5\n").unwrap();
        assert_eq!(conf.policy.max_active_keys, 5);
        let err = parse("[fernet_tokens]\nkey_repository = /a\n  /b\n").unwrap_err();
        assert!(
            matches!(
                err,
                PolicyError::Value {
                    key: "key_repository",
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn syntax_errors_name_the_line_but_never_quote_it() {
        let cases: &[(&str, usize)] = &[
            ("[database]\npassword s3cret\n", 2),
            ("expiration = 5\n[token]\n", 1),
            ("[token\nexpiration = 5\n", 1),
            ("[]\n", 1),
            ("  indented = 1\n", 1),
            ("[token]\n= 5\n", 2),
        ];
        for (text, want) in cases {
            match parse(text) {
                Err(PolicyError::Syntax { line, .. }) => assert_eq!(line, *want, "{text:?}"),
                other => panic!("{text:?}: unexpected {other:?}"),
            }
        }
        let err = parse("[database]\npassword s3cret\n").unwrap_err();
        let shown = err.to_string();
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(
            shown.starts_with("/etc/keystone/keystone.conf:2: "),
            "{shown}"
        );
    }

    #[test]
    fn bad_values_say_what_was_expected() {
        for (text, key) in [
            ("[token]\nexpiration = an hour\n", "expiration"),
            ("[token]\nexpiration = -1\n", "expiration"),
            (
                "[token]\nallow_expired_window = -5\n",
                "allow_expired_window",
            ),
            ("[fernet_tokens]\nmax_active_keys = 0\n", "max_active_keys"),
            (
                "[fernet_tokens]\nmax_active_keys = 3.5\n",
                "max_active_keys",
            ),
            ("[cache]\nenabled = maybe\n", "enabled"),
        ] {
            let err = parse(text).unwrap_err();
            assert!(
                matches!(err, PolicyError::Value { key: k, line: 2, .. } if k == key),
                "{text:?}: {err:?}"
            );
            assert!(err.to_string().contains("must be"), "{err}");
        }
        // An empty integer is oslo.config's "unset".
        assert_eq!(
            parse("[token]\nexpiration =\n")
                .unwrap()
                .policy
                .token_expiration,
            HOUR
        );
    }

    #[test]
    fn cache_ttl_follows_oslo_cache_and_token_options() {
        assert_eq!(
            parse("[cache]\nenabled = false\n").unwrap().token_cache_ttl,
            None
        );
        assert_eq!(
            parse("[cache]\nenabled = True\n").unwrap().token_cache_ttl,
            Some(Duration::from_secs(600))
        );
        assert_eq!(
            parse("[cache]\nenabled = on\nexpiration_time = 120\n")
                .unwrap()
                .token_cache_ttl,
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse("[cache]\nenabled = yes\nexpiration_time = 120\n[token]\ncache_time = 30\n")
                .unwrap()
                .token_cache_ttl,
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse("[cache]\nenabled = 1\n[token]\ncaching = false\n")
                .unwrap()
                .token_cache_ttl,
            None
        );
    }

    #[test]
    fn cache_time_counts_as_token_lifetime() {
        // Daily rotation with Keystone's default lifetimes: 5 keys leave a margin of
        // 3 days - 49 h = 23 h, so a 10 min cache fits and a 1 day cache does not.
        let conf = parse("[cache]\nenabled = true\nexpiration_time = 600\n").unwrap();
        assert!(conf.check_cache(5, DAY).is_ok());
        let conf = parse("[cache]\nenabled = true\nexpiration_time = 86400\n").unwrap();
        let err = conf.check_cache(5, DAY).unwrap_err();
        assert!(
            matches!(err, PolicyError::CacheOutlivesKey { minimum: 6, .. }),
            "{err:?}"
        );
        // Without a cache there is nothing to outlive.
        assert!(parse("").unwrap().check_cache(3, DAY).is_ok());
    }

    #[test]
    fn rotator_refuses_other_lifetimes_and_too_few_keys() {
        let conf = parse("[token]\nexpiration = 7200\nallow_expired_window = 0\n[fernet_tokens]\nmax_active_keys = 4\n").unwrap();
        let two_h = Duration::from_secs(7200);
        // Same lifetimes, 4 keys every hour: ceil(2 h / 1 h) + 2 = 4, fine, nothing to say.
        assert_eq!(
            conf.check_rotator(two_h, Duration::ZERO, &[("tokens", 4)], HOUR)
                .unwrap(),
            Vec::<String>::new()
        );
        let err = conf
            .check_rotator(HOUR, Duration::ZERO, &[("tokens", 4)], HOUR)
            .unwrap_err();
        assert!(
            matches!(
                err,
                PolicyError::LifetimeMismatch {
                    option: "expiration",
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string().contains("7200 s") && err.to_string().contains("3600 s"),
            "{err}"
        );
        let err = conf
            .check_rotator(two_h, HOUR, &[("tokens", 4)], HOUR)
            .unwrap_err();
        assert!(
            matches!(
                err,
                PolicyError::LifetimeMismatch {
                    option: "allow_expired_window",
                    ..
                }
            ),
            "{err}"
        );
        let err = conf
            .check_rotator(two_h, Duration::ZERO, &[("tokens", 3)], HOUR)
            .unwrap_err();
        assert!(
            matches!(err, PolicyError::TooFewKeys { minimum: 4, .. }),
            "{err}"
        );
        // More keys than keystone.conf says: works, but say so.
        let warnings = conf
            .check_rotator(two_h, Duration::ZERO, &[("tokens", 6)], HOUR)
            .unwrap();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("max_active_keys = 4"), "{warnings:?}");
    }

    #[test]
    fn rotator_warns_about_a_cache_that_outlives_keys() {
        let conf = parse("[token]\nexpiration = 3600\nallow_expired_window = 0\ncache_time = 600\n[fernet_tokens]\nmax_active_keys = 3\n[cache]\nenabled = true\n").unwrap();
        let warnings = conf
            .check_rotator(HOUR, Duration::ZERO, &[("tokens", 3)], HOUR)
            .unwrap();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("at least 4"), "{warnings:?}");
    }

    #[test]
    fn agent_refuses_a_repository_keystone_does_not_read() {
        let tmp = tempfile::tempdir().unwrap();
        let tokens = tmp.path().join("tokens");
        std::fs::create_dir(&tokens).unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&tokens, &link).unwrap();
        let text = format!(
            "[fernet_tokens]\nkey_repository = {}/\n[token]\nprovider = jws\n",
            link.display()
        );
        let conf = parse(&text).unwrap();
        // The same directory through a symlink and a trailing slash.
        let warnings = conf
            .check_agent(&[("tokens", &tokens), ("other", Path::new("/x"))])
            .unwrap();
        assert_eq!(warnings.len(), 1, "the jws provider: {warnings:?}");
        let err = conf
            .check_agent(&[("tokens", &tmp.path().join("elsewhere"))])
            .unwrap_err();
        assert!(
            matches!(
                err,
                PolicyError::RepositoryMismatch {
                    section: "fernet_tokens",
                    ..
                }
            ),
            "{err}"
        );
        // Keystone's defaults for receipts and credentials apply when unset.
        let err = conf.check_agent(&[("credential", &tokens)]).unwrap_err();
        assert!(
            err.to_string().contains("/etc/keystone/credential-keys/"),
            "{err}"
        );
    }

    #[test]
    fn load_reports_the_path_it_could_not_read() {
        let err = KeystoneConf::load(Path::new("/nonexistent/keystone.conf")).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/keystone.conf"),
            "{err}"
        );
    }
}
