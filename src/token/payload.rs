//! Keystone 30.0.0 token payloads, versions 0 to 10, decoded and minted exactly as
//! `keystone/token/token_formatters.py` does: flagged id pairs (`[true, 16 bytes]`
//! for a UUID, `[false, text]` otherwise), the methods bitmask over the
//! configured `[auth] methods`, a float or integer expiry truncated to the
//! second, audit ids as raw bytes, and the legacy msgpack<1.0 form whose strings
//! are raw bytes (`unpackb(raw=True)`). Where Keystone's own decoder would fail
//! with an exception (HTTP 500), decoding fails with [`TokenError::BadPayload`].
//!
//! Decoding a project-scoped token with UUID ids allocates nothing: ids are kept
//! as 16 bytes and the first two audit ids inline.

use std::fmt;

use super::TokenError;
use super::msgpack::{self, Item, Reader, Writer};

/// The highest payload version Keystone 30.0.0 knows.
pub const MAX_VERSION: u8 = 10;

/// Keystone's payload class name for each version.
pub const CLASS_NAMES: [&str; 11] = [
    "UnscopedPayload",
    "DomainScopedPayload",
    "ProjectScopedPayload",
    "TrustScopedPayload",
    "FederatedUnscopedPayload",
    "FederatedProjectScopedPayload",
    "FederatedDomainScopedPayload",
    "OauthScopedPayload",
    "SystemScopedPayload",
    "ApplicationCredentialScopedPayload",
    "Oauth2CredentialsScopedPayload",
];

/// Keystone's default `[auth] methods`, in order: bit `1 << i` is the i-th.
pub const DEFAULT_METHODS: [&str; 7] = [
    "external",
    "password",
    "token",
    "oauth1",
    "mapped",
    "application_credential",
    "ec2credential",
];

/// Seconds since the epoch of 1000-01-01T00:00:00Z and 9999-12-31T23:59:59Z:
/// Keystone formats an expiry with an unpadded year and parses it back, which
/// fails outside these years (HTTP 500).
pub const MIN_EXPIRY: i64 = -30_610_224_000;
pub const MAX_EXPIRY: i64 = 253_402_300_799;

/// An identifier as Keystone stores it in a payload.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum Id {
    /// Anything `uuid.UUID()` parses, stored as its 16 bytes and shown as
    /// lowercase hex without hyphens.
    Uuid([u8; 16]),
    /// Any other text, stored as it is.
    Text(Box<str>),
}

impl Id {
    /// `attempt_convert_uuid_hex_to_bytes`: a UUID when Python's `uuid.UUID`
    /// accepts the text, the text itself otherwise.
    pub fn keystone(s: &str) -> Id {
        match parse_uuid(s) {
            Some(bytes) => Id::Uuid(bytes),
            None => Id::Text(s.into()),
        }
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Id::Uuid(b) => b.iter().try_for_each(|x| write!(f, "{x:02x}")),
            Id::Text(t) => f.write_str(t),
        }
    }
}

impl fmt::Debug for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.to_string())
    }
}

/// Python's `uuid.UUID(text).bytes`: `urn:` and `uuid:` removed, braces stripped,
/// hyphens removed, then exactly 32 characters that `int(_, 16)` accepts
/// (surrounding whitespace, a `+`, a `0x` prefix and single underscores between
/// digits included). Non-ASCII digits, which `int` also accepts, are refused.
pub fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let s = s.replace("urn:", "").replace("uuid:", "");
    let s = s.trim_matches(|c| c == '{' || c == '}').replace('-', "");
    if s.chars().count() != 32 || !s.is_ascii() {
        return None;
    }
    let t = s.trim_matches(|c: char| c.is_ascii_whitespace() || c == '\x0b' || c == '\x0c');
    let t = t.strip_prefix('+').unwrap_or(t);
    let t = t
        .strip_prefix("0x")
        .or_else(|| t.strip_prefix("0X"))
        .map_or(t, |r| r.strip_prefix('_').unwrap_or(r));
    let bytes = t.as_bytes();
    if bytes.is_empty() || bytes[0] == b'_' || bytes[bytes.len() - 1] == b'_' {
        return None;
    }
    let mut value: u128 = 0;
    let mut prev_underscore = false;
    for &c in bytes {
        if c == b'_' {
            if prev_underscore {
                return None;
            }
            prev_underscore = true;
            continue;
        }
        prev_underscore = false;
        let digit = (c as char).to_digit(16)?;
        // At most 32 characters: never overflows 128 bits.
        value = (value << 4) | u128::from(digit);
    }
    Some(value.to_be_bytes())
}

/// Audit ids as the raw bytes Keystone packs (`urlsafe_b64decode(id + "==")`),
/// the usual one or two 16-byte ids kept inline.
#[derive(Clone, PartialEq, Eq)]
pub enum AuditIds {
    Inline { ids: [[u8; 16]; 2], len: u8 },
    Heap(Vec<Box<[u8]>>),
}

impl Default for AuditIds {
    fn default() -> Self {
        AuditIds::Inline {
            ids: [[0; 16]; 2],
            len: 0,
        }
    }
}

impl AuditIds {
    pub fn push(&mut self, id: &[u8]) {
        match self {
            AuditIds::Inline { ids, len } if (*len as usize) < ids.len() && id.len() == 16 => {
                ids[*len as usize].copy_from_slice(id);
                *len += 1;
            }
            AuditIds::Inline { ids, len } => {
                let mut v: Vec<Box<[u8]>> =
                    ids[..*len as usize].iter().map(|i| i[..].into()).collect();
                v.push(id.into());
                *self = AuditIds::Heap(v);
            }
            AuditIds::Heap(v) => v.push(id.into()),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        let (inline, heap): (&[[u8; 16]], &[Box<[u8]>]) = match self {
            AuditIds::Inline { ids, len } => (&ids[..*len as usize], &[]),
            AuditIds::Heap(v) => (&[], v),
        };
        inline
            .iter()
            .map(|i| &i[..])
            .chain(heap.iter().map(|b| &b[..]))
    }

    pub fn len(&self) -> usize {
        match self {
            AuditIds::Inline { len, .. } => *len as usize,
            AuditIds::Heap(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// As Keystone shows them: url-safe base64 without padding.
    pub fn to_strings(&self) -> Vec<String> {
        use base64::Engine as _;
        self.iter()
            .map(|b| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b))
            .collect()
    }

    /// From Keystone's text form, as `random_urlsafe_str_to_bytes` decodes it.
    pub fn from_strings<'a>(ids: impl IntoIterator<Item = &'a str>) -> Result<Self, TokenError> {
        let mut out = AuditIds::default();
        for id in ids {
            let padded = format!("{id}==");
            let mut buf = vec![0u8; padded.len() / 4 * 3 + 3];
            let n = super::fernet::urlsafe_b64decode(padded.as_bytes(), &mut buf)
                .map_err(|_| TokenError::Unmintable("an audit id is not url-safe base64"))?;
            out.push(&buf[..n]);
        }
        Ok(out)
    }
}

impl fmt::Debug for AuditIds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.to_strings()).finish()
    }
}

/// Keystone's `[auth] methods`: the i-th name is bit `1 << i` of a token's methods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Methods(Vec<String>);

impl Default for Methods {
    fn default() -> Self {
        Methods(DEFAULT_METHODS.iter().map(|m| m.to_string()).collect())
    }
}

impl Methods {
    pub fn new(names: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Methods(names.into_iter().map(Into::into).collect())
    }

    /// A comma-separated list as oslo.config reads a `ListOpt` (items trimmed,
    /// empty items dropped).
    pub fn parse(list: &str) -> Self {
        Methods::new(list.split(',').map(str::trim).filter(|m| !m.is_empty()))
    }

    pub fn names(&self) -> &[String] {
        &self.0
    }

    /// `convert_integer_to_method_list`: from the highest configured bit down,
    /// a bit is taken when the remainder is at least it and below twice it; bits
    /// beyond the configured methods are silently lost.
    pub fn decode(&self, mut bits: i128) -> Vec<&str> {
        let mut out = Vec::new();
        if bits == 0 {
            return out;
        }
        for (i, name) in self.0.iter().enumerate().take(126).rev() {
            let m = 1i128 << i;
            if m <= bits && bits < 2 * m {
                out.push(name.as_str());
                bits -= m;
            }
        }
        out
    }

    /// `convert_method_list_to_integer`: the sum of the bits of every configured
    /// method equal to each name (unknown names add nothing).
    pub fn encode<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> i128 {
        let mut sum = 0i128;
        for name in names {
            for (i, m) in self.0.iter().enumerate().take(126) {
                if m == name {
                    sum += 1i128 << i;
                }
            }
        }
        sum
    }
}

/// What decoding needs from Keystone's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayloadConfig {
    /// `[auth] methods`.
    pub methods: Methods,
    /// `[identity] default_domain_id`, the one non-UUID domain a version 1
    /// payload may carry.
    pub default_domain_id: String,
}

impl Default for PayloadConfig {
    fn default() -> Self {
        PayloadConfig {
            methods: Methods::default(),
            default_domain_id: "default".into(),
        }
    }
}

/// A decoded payload: the fields `TokenFormatter.validate_token` returns, `None`
/// where Keystone returns `None`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Payload {
    pub version: u8,
    pub user_id: Option<Id>,
    /// The raw methods bitmask; names come from [`Methods::decode`].
    pub methods: i128,
    pub audit_ids: AuditIds,
    pub system: Option<Box<str>>,
    pub domain_id: Option<Id>,
    pub project_id: Option<Id>,
    pub trust_id: Option<Id>,
    /// Federated group ids (each `{"id": ...}` in Keystone).
    pub federated_group_ids: Option<Vec<Option<Id>>>,
    pub identity_provider_id: Option<Id>,
    pub protocol_id: Option<Box<str>>,
    pub access_token_id: Option<Id>,
    pub app_cred_id: Option<Id>,
    pub thumbprint: Option<Id>,
    /// Whole seconds since the epoch, as Keystone reports it (sub-seconds dropped).
    pub expires_at: i64,
}

impl Payload {
    pub fn class_name(&self) -> &'static str {
        CLASS_NAMES
            .get(self.version as usize)
            .copied()
            .unwrap_or("unknown")
    }
}

fn bad(reason: &'static str) -> TokenError {
    TokenError::BadPayload(reason)
}

impl From<msgpack::MsgpackError> for TokenError {
    fn from(e: msgpack::MsgpackError) -> Self {
        TokenError::BadPayload(match e {
            msgpack::MsgpackError::Truncated => "msgpack document ends early",
            msgpack::MsgpackError::ExtraData => "msgpack document has data after its value",
            msgpack::MsgpackError::Unsupported => "msgpack map or extension type",
        })
    }
}

/// Elements of the payload array, read in order.
struct Fields<'a> {
    r: Reader<'a>,
    /// Keystone's `unpackb(raw=True)` retry: every str is bytes.
    raw: bool,
    /// A str read so far is not UTF-8 (so Keystone would have used `raw`).
    bad_utf8: bool,
    /// Top-level elements after the ones the version uses, which Keystone
    /// ignores once `unpackb` accepted them.
    rest: usize,
}

impl<'a> Fields<'a> {
    fn new(buf: &'a [u8], raw: bool) -> Self {
        Fields {
            r: Reader::new(buf),
            raw,
            bad_utf8: false,
            rest: 0,
        }
    }

    fn item(&mut self) -> Result<Item<'a>, TokenError> {
        let item = self.r.item()?;
        if let Item::Str(s) = item {
            self.bad_utf8 |= !self.raw && std::str::from_utf8(s).is_err();
        }
        Ok(item)
    }

    /// Skips `n` whole values.
    fn skip(&mut self, n: usize) -> Result<(), TokenError> {
        let mut pending = n;
        while pending > 0 {
            pending -= 1;
            if let Item::Array(k) = self.item()? {
                pending = pending
                    .checked_add(k)
                    .ok_or(bad("msgpack document ends early"))?;
            }
        }
        Ok(())
    }

    /// Reads the ignored elements and checks that the document ends there.
    fn finish(&mut self) -> Result<(), TokenError> {
        self.skip(self.rest)?;
        if self.r.is_at_end() {
            Ok(())
        } else {
            Err(msgpack::MsgpackError::ExtraData.into())
        }
    }

    /// Python truthiness of the next value, consuming it whole.
    fn truthy(&mut self) -> Result<bool, TokenError> {
        Ok(match self.item()? {
            Item::Nil => false,
            Item::Bool(b) => b,
            Item::Int(i) => i != 0,
            Item::Float(f) => f != 0.0,
            Item::Str(s) | Item::Bin(s) => !s.is_empty(),
            Item::Array(n) => {
                self.skip(n)?;
                n > 0
            }
        })
    }

    fn bytes_of(&self, item: Item<'a>) -> Option<&'a [u8]> {
        match item {
            Item::Bin(b) => Some(b),
            Item::Str(b) if self.raw => Some(b),
            _ => None,
        }
    }

    /// A value Keystone keeps as text: str as it is, bytes decoded as UTF-8, nil.
    fn text_of(item: Item<'a>) -> Result<Option<Box<str>>, TokenError> {
        match item {
            Item::Nil => Ok(None),
            Item::Str(b) | Item::Bin(b) => std::str::from_utf8(b)
                .map(|s| Some(s.into()))
                .map_err(|_| bad("text is not UTF-8")),
            _ => Err(bad("a text field holds neither text nor nil")),
        }
    }

    /// `convert_uuid_bytes_to_hex`: exactly 16 bytes.
    fn uuid_bytes(&self, item: Item<'a>) -> Result<[u8; 16], TokenError> {
        self.bytes_of(item)
            .and_then(|b| <[u8; 16]>::try_from(b).ok())
            .ok_or(bad("a UUID field does not hold 16 bytes"))
    }

    /// `(is_stored_as_bytes, value) = pair; _convert_or_decode(...)`.
    fn flagged(&mut self) -> Result<Option<Id>, TokenError> {
        if self.item()? != Item::Array(2) {
            return Err(bad("an id is not a [flag, value] pair"));
        }
        let as_bytes = self.truthy()?;
        let value = self.item()?;
        if as_bytes {
            Ok(Some(Id::Uuid(self.uuid_bytes(value)?)))
        } else {
            Ok(Self::text_of(value)?.map(Id::Text))
        }
    }

    fn methods(&mut self) -> Result<i128, TokenError> {
        match self.item()? {
            Item::Int(i) => Ok(i),
            Item::Bool(b) => Ok(b.into()),
            _ => Err(bad("methods is not an integer")),
        }
    }

    /// `_convert_float_to_time_string` then `parse_isotime`: the timestamp
    /// rounded half-even to microseconds as `datetime.fromtimestamp` does, the
    /// microseconds then dropped.
    fn expiry(&mut self) -> Result<i64, TokenError> {
        let secs = match self.item()? {
            Item::Int(i) => i64::try_from(i).map_err(|_| bad("expiry out of range"))?,
            Item::Bool(b) => b.into(),
            Item::Float(f) => float_expiry(f)?,
            _ => return Err(bad("expiry is not a number")),
        };
        if (MIN_EXPIRY..=MAX_EXPIRY).contains(&secs) {
            Ok(secs)
        } else {
            Err(bad("expiry outside the years 1000 to 9999"))
        }
    }

    /// An array Python iterates; an empty str or bytes iterates as empty too.
    fn list_len(&mut self) -> Result<usize, TokenError> {
        match self.item()? {
            Item::Array(n) => Ok(n),
            Item::Str(b) | Item::Bin(b) if b.is_empty() => Ok(0),
            _ => Err(bad("a list field is not a list")),
        }
    }

    fn audit_ids(&mut self) -> Result<AuditIds, TokenError> {
        let n = self.list_len()?;
        let mut ids = AuditIds::default();
        for _ in 0..n {
            let item = self.item()?;
            ids.push(self.bytes_of(item).ok_or(bad("an audit id is not bytes"))?);
        }
        Ok(ids)
    }

    fn groups(&mut self) -> Result<Vec<Option<Id>>, TokenError> {
        let n = self.list_len()?;
        (0..n).map(|_| self.flagged()).collect()
    }

    /// Version 1's domain, stored without a flag: 16 bytes, or the configured
    /// default domain id.
    fn raw_domain(&mut self, default_domain_id: &str) -> Result<Id, TokenError> {
        let item = self.item()?;
        if let Some(bytes) = self.bytes_of(item) {
            if let Ok(uuid) = <[u8; 16]>::try_from(bytes) {
                return Ok(Id::Uuid(uuid));
            }
        }
        let text = match item {
            // `uuid.UUID(bytes=<str of 16 characters>)` fails its type assertion.
            Item::Str(b)
                if b.len() == 16
                    && std::str::from_utf8(b).is_ok_and(|s| s.chars().count() == 16) =>
            {
                return Err(bad("domain is a 16-character str"));
            }
            Item::Str(b) | Item::Bin(b) => {
                std::str::from_utf8(b).map_err(|_| bad("text is not UTF-8"))?
            }
            _ => return Err(bad("domain is neither 16 bytes nor text")),
        };
        if text == default_domain_id {
            Ok(Id::Text(text.into()))
        } else {
            Err(bad("domain is neither a UUID nor the default domain id"))
        }
    }
}

fn float_expiry(f: f64) -> Result<i64, TokenError> {
    if !f.is_finite() {
        return Err(bad("expiry is not finite"));
    }
    let int = f.trunc();
    let us = ((f - int) * 1e6).round_ties_even();
    let secs = if us >= 1e6 {
        int + 1.0
    } else if us < 0.0 {
        int - 1.0
    } else {
        int
    };
    if secs.abs() > 1e15 {
        return Err(bad("expiry out of range"));
    }
    Ok(secs as i64)
}

/// The payload version as Python compares it (`version == payload_class.version`,
/// so `True` is 1 and `2.0` is 2), or Keystone's "not recognized" error.
fn version(item: Item<'_>, raw: bool) -> Result<u8, TokenError> {
    let shown = match item {
        Item::Int(i) => {
            return u8::try_from(i)
                .ok()
                .filter(|v| *v <= MAX_VERSION)
                .ok_or_else(|| TokenError::UnsupportedVersion(i.to_string()));
        }
        Item::Bool(b) => return Ok(b.into()),
        Item::Float(f) if f.fract() == 0.0 && (0.0..=f64::from(MAX_VERSION)).contains(&f) => {
            return Ok(f as u8);
        }
        Item::Float(f) => py_float_repr(f),
        Item::Nil => "None".to_string(),
        Item::Str(s) if !raw => String::from_utf8_lossy(s).into_owned(),
        Item::Str(b) | Item::Bin(b) => py_bytes_repr(b),
        Item::Array(_) => return Err(bad("the payload version is a list")),
    };
    Err(TokenError::UnsupportedVersion(shown))
}

/// Python's `repr` of a float, as `%s` shows it.
fn py_float_repr(f: f64) -> String {
    if f.is_nan() {
        "nan".into()
    } else if f.is_infinite() {
        if f > 0.0 { "inf".into() } else { "-inf".into() }
    } else {
        let s = format!("{f:?}");
        match s.split_once('e') {
            Some((m, e)) if !e.starts_with('-') => format!("{m}e+{e:0>2}"),
            Some((m, e)) => format!("{m}e-{:0>2}", &e[1..]),
            None => s,
        }
    }
}

/// Python's `repr` of bytes, as `%s` shows it.
fn py_bytes_repr(b: &[u8]) -> String {
    let quote = if b.contains(&b'\'') && !b.contains(&b'"') {
        '"'
    } else {
        '\''
    };
    let mut s = format!("b{quote}");
    for &c in b {
        match c {
            b'\\' => s.push_str("\\\\"),
            b'\t' => s.push_str("\\t"),
            b'\n' => s.push_str("\\n"),
            b'\r' => s.push_str("\\r"),
            c if c == quote as u8 => {
                s.push('\\');
                s.push(c as char);
            }
            0x20..=0x7e => s.push(c as char),
            _ => s.push_str(&format!("\\x{c:02x}")),
        }
    }
    s.push(quote);
    s
}

/// Decodes a token's plaintext as `TokenFormatter.validate_token` does.
pub fn decode(plaintext: &[u8], config: &PayloadConfig) -> Result<Payload, TokenError> {
    // One pass for the usual case: a well-formed document whose strs are all
    // UTF-8 decodes the same whether `unpackb` ran first or not.
    let mut f = Fields::new(plaintext, false);
    if let Ok(p) = decode_fields(&mut f, config) {
        if f.finish().is_ok() && !f.bad_utf8 {
            return Ok(p);
        }
    }
    // Exactly Keystone's order otherwise: `unpackb` checks the whole document
    // (retrying with raw=True on bad UTF-8), then the payload class reads it.
    let raw = msgpack::scan(plaintext)?.invalid_utf8;
    decode_fields(&mut Fields::new(plaintext, raw), config)
}

fn decode_fields(f: &mut Fields<'_>, config: &PayloadConfig) -> Result<Payload, TokenError> {
    let raw = f.raw;
    let len = match f.item()? {
        Item::Array(n) if n > 0 => n,
        _ => return Err(bad("the payload is not a non-empty list")),
    };
    let version = version(f.item()?, raw)?;
    const FIELDS: [usize; 11] = [4, 5, 5, 6, 7, 8, 8, 6, 5, 6, 7];
    f.rest = (len - 1)
        .checked_sub(FIELDS[version as usize])
        .ok_or(bad("the payload has too few fields for its version"))?;
    let mut p = Payload {
        version,
        user_id: f.flagged()?,
        methods: f.methods()?,
        ..Payload::default()
    };
    match version {
        0 => {
            p.expires_at = f.expiry()?;
            p.audit_ids = f.audit_ids()?;
        }
        1 => {
            p.domain_id = Some(f.raw_domain(&config.default_domain_id)?);
            p.expires_at = f.expiry()?;
            p.audit_ids = f.audit_ids()?;
        }
        2 | 3 | 9 => {
            p.project_id = f.flagged()?;
            p.expires_at = f.expiry()?;
            p.audit_ids = f.audit_ids()?;
            match version {
                3 => {
                    let item = f.item()?;
                    p.trust_id = Some(Id::Uuid(f.uuid_bytes(item)?));
                }
                9 => p.app_cred_id = f.flagged()?,
                _ => {}
            }
        }
        4..=6 => {
            let scope = if version == 4 { None } else { f.flagged()? };
            match version {
                5 => p.project_id = scope,
                6 => p.domain_id = scope,
                _ => {}
            }
            p.federated_group_ids = Some(f.groups()?);
            p.identity_provider_id = f.flagged()?;
            p.protocol_id = Fields::text_of(f.item()?)?;
            p.expires_at = f.expiry()?;
            p.audit_ids = f.audit_ids()?;
        }
        7 => {
            p.project_id = f.flagged()?;
            p.access_token_id = f.flagged()?;
            p.expires_at = f.expiry()?;
            p.audit_ids = f.audit_ids()?;
        }
        8 => {
            p.system = Fields::text_of(f.item()?)?;
            p.expires_at = f.expiry()?;
            p.audit_ids = f.audit_ids()?;
        }
        _ => {
            p.project_id = f.flagged()?;
            p.domain_id = f.flagged()?;
            p.expires_at = f.expiry()?;
            p.audit_ids = f.audit_ids()?;
            p.thumbprint = f.flagged()?;
        }
    }
    Ok(p)
}

/// How to write strings and bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// `msgpack.packb` since 1.0 (use_bin_type=True), as Keystone 30.0.0 writes.
    Current,
    /// msgpack<1.0: bytes written as raw strings, read back by Keystone's
    /// `raw=True` retry. For compatibility tests.
    Legacy,
}

struct Out {
    w: Writer,
    enc: Encoding,
}

impl Out {
    fn bytes(&mut self, b: &[u8]) {
        match self.enc {
            Encoding::Current => self.w.bin(b),
            Encoding::Legacy => self.w.raw(b),
        }
    }

    fn text(&mut self, t: Option<&str>) {
        match t {
            Some(t) => self.w.str(t),
            None => self.w.nil(),
        }
    }

    fn flagged(&mut self, id: Option<&Id>) {
        self.w.array(2);
        match id {
            Some(Id::Uuid(b)) => {
                self.w.bool(true);
                self.bytes(b);
            }
            Some(Id::Text(t)) => {
                self.w.bool(false);
                self.w.str(t);
            }
            None => {
                self.w.bool(false);
                self.w.nil();
            }
        }
    }

    fn methods(&mut self, m: i128) -> Result<(), TokenError> {
        if let Ok(v) = u64::try_from(m) {
            self.w.uint(v);
        } else {
            self.w.int(
                i64::try_from(m).map_err(|_| TokenError::Unmintable("methods beyond 64 bits"))?,
            );
        }
        Ok(())
    }

    fn audit_ids(&mut self, ids: &AuditIds) {
        self.w.array(ids.len());
        for id in ids.iter() {
            self.bytes(id);
        }
    }
}

/// The inverse of [`decode`]: the msgpack payload Keystone's `assemble` and
/// `msgpack.packb` would write for these fields (the expiry as a float).
pub fn encode(p: &Payload, enc: Encoding) -> Result<Vec<u8>, TokenError> {
    const FIELDS: [usize; 11] = [4, 5, 5, 6, 7, 8, 8, 6, 5, 6, 7];
    let n = *FIELDS
        .get(p.version as usize)
        .ok_or(TokenError::UnsupportedVersion(p.version.to_string()))?;
    let mut o = Out {
        w: Writer::new(),
        enc,
    };
    o.w.array(n + 1);
    o.w.uint(p.version.into());
    o.flagged(p.user_id.as_ref());
    o.methods(p.methods)?;
    let expires = p.expires_at as f64;
    match p.version {
        0 => {
            o.w.f64(expires);
            o.audit_ids(&p.audit_ids);
        }
        1 => {
            match &p.domain_id {
                Some(Id::Uuid(b)) => o.bytes(b),
                Some(Id::Text(t)) => o.w.str(t),
                None => {
                    return Err(TokenError::Unmintable(
                        "a domain-scoped payload needs a domain",
                    ));
                }
            }
            o.w.f64(expires);
            o.audit_ids(&p.audit_ids);
        }
        2 | 3 | 9 => {
            o.flagged(p.project_id.as_ref());
            o.w.f64(expires);
            o.audit_ids(&p.audit_ids);
            match p.version {
                3 => match &p.trust_id {
                    Some(Id::Uuid(b)) => o.bytes(b),
                    _ => return Err(TokenError::Unmintable("a trust id must be a UUID")),
                },
                9 => o.flagged(p.app_cred_id.as_ref()),
                _ => {}
            }
        }
        4..=6 => {
            match p.version {
                5 => o.flagged(p.project_id.as_ref()),
                6 => o.flagged(p.domain_id.as_ref()),
                _ => {}
            }
            let groups = p.federated_group_ids.as_deref().unwrap_or_default();
            o.w.array(groups.len());
            for g in groups {
                o.flagged(g.as_ref());
            }
            o.flagged(p.identity_provider_id.as_ref());
            o.text(p.protocol_id.as_deref());
            o.w.f64(expires);
            o.audit_ids(&p.audit_ids);
        }
        7 => {
            o.flagged(p.project_id.as_ref());
            o.flagged(p.access_token_id.as_ref());
            o.w.f64(expires);
            o.audit_ids(&p.audit_ids);
        }
        8 => {
            o.text(p.system.as_deref());
            o.w.f64(expires);
            o.audit_ids(&p.audit_ids);
        }
        _ => {
            o.flagged(p.project_id.as_ref());
            o.flagged(p.domain_id.as_ref());
            o.w.f64(expires);
            o.audit_ids(&p.audit_ids);
            o.flagged(p.thumbprint.as_ref());
        }
    }
    Ok(o.w.into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_parsing_follows_python() {
        let hex = "abf852aa45ee4a4a9ff9c249c607d21e";
        let want = Id::keystone(hex);
        assert!(matches!(want, Id::Uuid(_)));
        assert_eq!(want.to_string(), hex);
        for form in [
            "ABF852AA-45EE-4A4A-9FF9-C249C607D21E",
            "{abf852aa-45ee-4a4a-9ff9-c249c607d21e}",
            "urn:uuid:abf852aa-45ee-4a4a-9ff9-c249c607d21e",
        ] {
            assert_eq!(Id::keystone(form), want, "{form}");
        }
        assert_eq!(
            Id::keystone(&format!("0x{}", &hex[2..])).to_string(),
            format!("00{}", &hex[2..])
        );
        assert_eq!(
            Id::keystone(&format!("  {}", &hex[2..])).to_string(),
            format!("00{}", &hex[2..])
        );
        for text in [
            "ldap_user_01",
            "default",
            "",
            &hex[1..],
            "g".repeat(32).as_str(),
        ] {
            assert_eq!(Id::keystone(text), Id::Text(text.into()), "{text}");
        }
    }

    #[test]
    fn methods_follow_keystone() {
        let m = Methods::default();
        assert_eq!(m.decode(6), vec!["token", "password"]);
        assert_eq!(m.decode(0), Vec::<&str>::new());
        assert_eq!(m.decode(128 + 2), Vec::<&str>::new());
        assert_eq!(m.decode(-2), Vec::<&str>::new());
        assert_eq!(m.encode(["password", "totp"]), 2);
        assert_eq!(Methods::parse(" a, b ,,c").names(), ["a", "b", "c"]);
    }

    #[test]
    fn unknown_versions_are_shown_as_python_does() {
        let shown = |item, raw| match version(item, raw) {
            Err(TokenError::UnsupportedVersion(s)) => s,
            other => panic!("{other:?}"),
        };
        assert_eq!(shown(Item::Int(99), false), "99");
        assert_eq!(shown(Item::Float(99.5), false), "99.5");
        assert_eq!(shown(Item::Float(1e20), false), "1e+20");
        assert_eq!(shown(Item::Str(b"\x02"), true), "b'\\x02'");
        assert_eq!(shown(Item::Str(b"ab"), false), "ab");
        assert_eq!(version(Item::Bool(true), false), Ok(1));
        assert_eq!(version(Item::Float(2.0), false), Ok(2));
    }

    #[test]
    fn float_expiry_rounds_like_datetime() {
        assert_eq!(float_expiry(1893456000.654321).unwrap(), 1893456000);
        assert_eq!(float_expiry(1893456000.9999996).unwrap(), 1893456001);
        assert_eq!(float_expiry(-1.5).unwrap(), -2);
        assert!(float_expiry(f64::NAN).is_err());
    }

    #[test]
    fn every_version_round_trips() {
        let config = PayloadConfig::default();
        for version in 0..=MAX_VERSION {
            let mut audit = AuditIds::default();
            // Bytes that are not UTF-8, so the legacy form takes Keystone's raw retry.
            audit.push(&[0xf1; 16]);
            audit.push(&[0xf2; 16]);
            audit.push(&[0xf3; 5]);
            let uuid = Some(Id::Uuid([0xf9; 16]));
            let text = Some(Id::Text("x-y".into()));
            let p = Payload {
                version,
                user_id: uuid.clone(),
                methods: 6,
                audit_ids: audit,
                system: (version == 8).then(|| "all".into()),
                domain_id: match version {
                    1 => Some(Id::Text("default".into())),
                    6 | 10 => text.clone(),
                    _ => None,
                },
                project_id: matches!(version, 2 | 3 | 5 | 7 | 9 | 10)
                    .then(|| uuid.clone())
                    .flatten(),
                trust_id: (version == 3).then(|| uuid.clone()).flatten(),
                federated_group_ids: (4..=6)
                    .contains(&version)
                    .then(|| vec![uuid.clone(), text.clone(), None]),
                identity_provider_id: (4..=6).contains(&version).then(|| text.clone()).flatten(),
                protocol_id: (4..=6).contains(&version).then(|| "saml2".into()),
                access_token_id: (version == 7).then(|| uuid.clone()).flatten(),
                app_cred_id: (version == 9).then(|| text.clone()).flatten(),
                thumbprint: (version == 10).then(|| text.clone()).flatten(),
                expires_at: 1893456000,
            };
            for enc in [Encoding::Current, Encoding::Legacy] {
                let bytes = encode(&p, enc).unwrap();
                assert_eq!(
                    decode(&bytes, &config).unwrap(),
                    p,
                    "version {version} {enc:?}"
                );
            }
        }
    }
}
