//! `fernetd token inspect|validate`: decode and validate Keystone Fernet tokens
//! against a key repository as Keystone 30.0.0 would, one token from the command
//! line or a stream of them from standard input (one result line per line, keys
//! reloaded when the repository changes, checked once per block of input read).

use std::io::Write as _;

use anyhow::{Context as _, anyhow};

use super::{Answer, CliError, TokenArgs, TokenCommand};
use crate::repository::Role;
use crate::token::{self, Id, Learned, LiveKeyring, Methods, PayloadConfig, Token, TokenError};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Inspect,
    Validate,
}

pub fn run(args: &TokenArgs) -> Result<Answer, CliError> {
    let dir = args
        .repository
        .as_deref()
        .ok_or_else(|| CliError::usage(anyhow!("--repository DIR is required")))?;
    let now = args
        .now
        .as_deref()
        .map(parse_now)
        .transpose()
        .map_err(CliError::usage)?;
    let mut config = PayloadConfig::default();
    if let Some(list) = &args.methods {
        config.methods = Methods::parse(list);
        if config.methods.names().is_empty() {
            return Err(CliError::usage(anyhow!("--methods lists no method")));
        }
    }
    let (mode, token) = match &args.command {
        TokenCommand::Inspect { token } => (Mode::Inspect, token),
        TokenCommand::Validate { token } => (Mode::Validate, token),
    };
    let mut live = LiveKeyring::open(dir)
        .with_context(|| format!("cannot load the key repository {}", dir.display()))
        .map_err(CliError::runtime)?;
    if live.keyring().is_empty() {
        return Err(CliError::runtime(anyhow!(
            "{}: the repository holds no key (Keystone answers HTTP 500)",
            dir.display()
        )));
    }
    let check = Check {
        config,
        now,
        json: args.json,
        mode,
    };
    if token == "-" {
        stream(&mut live, &check)
    } else {
        let (answer, text) = check.one(live.keyring(), token.trim(), false);
        println!("{text}");
        Ok(answer)
    }
}

/// `--now`: RFC 3339, or seconds since the epoch.
fn parse_now(s: &str) -> anyhow::Result<i64> {
    if let Ok(secs) = s.parse::<i64>() {
        return Ok(secs);
    }
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.timestamp())
        .map_err(|e| anyhow!("--now {s:?} is neither RFC 3339 nor seconds since the epoch: {e}"))
}

struct Check {
    config: PayloadConfig,
    now: Option<i64>,
    json: bool,
    mode: Mode,
}

impl Check {
    /// Checks one token; returns the answer and the output (one line when
    /// `line` or `--json`).
    fn one(&self, keyring: &token::Keyring, text: &str, line: bool) -> (Answer, String) {
        let now = self.now.unwrap_or_else(token::now);
        let decoded = keyring.inspect(text, &self.config);
        let expired = matches!(&decoded, Ok(t) if now >= t.payload.expires_at);
        let answer = if decoded.is_ok() && !expired {
            Answer::Yes
        } else {
            Answer::No
        };
        let status = match (&decoded, expired) {
            (Ok(_), false) => "valid",
            (Ok(_), true) => "expired",
            (Err(_), _) => "invalid",
        };
        let out = if self.json {
            self.json_line(status, &decoded)
        } else if line {
            self.text_line(status, &decoded)
        } else {
            self.text_block(status, &decoded)
        };
        (answer, out)
    }

    /// Checks one token of a stream and appends its result line to `out`. The
    /// answer of `validate` (text) is written without allocating; the other
    /// modes and refusals are formatted as [`Check::one`] does.
    fn line(
        &self,
        keyring: &token::Keyring,
        learned: &mut Learned,
        text: &str,
        now: i64,
        out: &mut Vec<u8>,
    ) -> Answer {
        let decoded = keyring.inspect_learning(text, &self.config, learned);
        let expired = matches!(&decoded, Ok(t) if now >= t.payload.expires_at);
        let (answer, status) = match (&decoded, expired) {
            (Ok(_), false) => (Answer::Yes, "valid"),
            (Ok(_), true) => (Answer::No, "expired"),
            (Err(_), _) => (Answer::No, "invalid"),
        };
        match &decoded {
            Ok(t) if self.mode == Mode::Validate && !self.json => {
                verdict_line(status, t, out);
            }
            _ => {
                let line = if self.json {
                    self.json_line(status, &decoded)
                } else {
                    self.text_line(status, &decoded)
                };
                out.extend_from_slice(line.as_bytes());
            }
        }
        out.push(b'\n');
        answer
    }

    fn json_line(&self, status: &'static str, decoded: &Result<Token, TokenError>) -> String {
        let line = JsonLine {
            status,
            valid: status == "valid",
            token: decoded
                .as_ref()
                .ok()
                .map(|t| t.describe(&self.config.methods)),
            error: decoded.as_ref().err().map(ToString::to_string),
            keystone: decoded.as_ref().err().map(keystone_answer),
        };
        // Plain data with string keys: serialising cannot fail.
        serde_json::to_string(&line).unwrap_or_default()
    }

    /// One line per token, for streams: the verdict, then the fields that are set.
    fn text_line(&self, status: &'static str, decoded: &Result<Token, TokenError>) -> String {
        match decoded {
            Ok(t) => {
                let fields = self.fields(t);
                let fields = match self.mode {
                    Mode::Inspect => fields,
                    // A verdict with the facts an operator checks first.
                    Mode::Validate => fields
                        .into_iter()
                        .filter(|(k, _)| matches!(*k, "key" | "payload" | "user_id" | "expires_at"))
                        .collect(),
                };
                let mut s = status.to_string();
                for (k, v) in fields {
                    s.push_str(&format!(" {k}={v}"));
                }
                s
            }
            Err(e) => format!("{status} error={:?}", e.to_string()),
        }
    }

    fn text_block(&self, status: &'static str, decoded: &Result<Token, TokenError>) -> String {
        match decoded {
            Ok(t) if self.mode == Mode::Inspect => {
                let mut s = format!("{:<21} {status}", "status:");
                for (k, v) in self.fields(t) {
                    s.push_str(&format!("\n{:<21} {v}", format!("{k}:")));
                }
                s
            }
            Ok(_) => self.text_line(status, decoded),
            Err(e) => format!("invalid: {e}"),
        }
    }

    /// The fields Keystone returns that are set, in `validate_token`'s order.
    fn fields(&self, t: &Token) -> Vec<(&'static str, String)> {
        let d = t.describe(&self.config.methods);
        let mut out = vec![
            ("key", format!("{}({})", d.key_index, d.role)),
            ("payload", format!("{}({})", d.version, d.payload_class)),
        ];
        let mut push = |k, v: Option<String>| {
            if let Some(v) = v {
                out.push((k, v));
            }
        };
        push("user_id", d.user_id);
        push("methods", Some(d.methods.join(",")));
        push("audit_ids", Some(d.audit_ids.join(",")));
        push("system", d.system);
        push("domain_id", d.domain_id);
        push("project_id", d.project_id);
        push("trust_id", d.trust_id);
        push(
            "federated_group_ids",
            d.federated_group_ids.map(|g| {
                g.into_iter()
                    .map(|g| g.id.unwrap_or_else(|| "None".into()))
                    .collect::<Vec<_>>()
                    .join(",")
            }),
        );
        push("identity_provider_id", d.identity_provider_id);
        push("protocol_id", d.protocol_id);
        push("access_token_id", d.access_token_id);
        push("app_cred_id", d.app_cred_id);
        push("thumbprint", d.thumbprint);
        push("issued_at", Some(d.issued_at));
        push("expires_at", Some(d.expires_at));
        out
    }
}

/// One token's result as JSON, fields in a stable order.
#[derive(serde::Serialize)]
struct JsonLine {
    status: &'static str,
    valid: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<token::Description>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    /// What Keystone's API answers for this token.
    #[serde(skip_serializing_if = "Option::is_none")]
    keystone: Option<String>,
}

/// What Keystone's API says for a refused token.
fn keystone_answer(e: &TokenError) -> String {
    match e {
        TokenError::Malformed(_) | TokenError::Unrecognized => {
            "404 Could not recognize Fernet token".into()
        }
        TokenError::UnsupportedVersion(_) => format!("404 {e}"),
        TokenError::Expired { .. } => "404 Failed to validate token".into(),
        TokenError::NoKeys | TokenError::BadPayload(_) | TokenError::Unmintable(_) => "500".into(),
    }
}

/// How much standard input is read, and standard output written, at once.
const CHUNK: usize = 1 << 20;

/// Reads tokens from standard input, one per line, and writes one result line per
/// input line. Input is read and output written in large blocks; the keys are
/// reloaded if the repository changed, and the clock read, once per block read.
/// Output is written whenever input runs dry (a read returns less than asked), so
/// a pipe that asks one token at a time gets its answer at once.
fn stream(live: &mut LiveKeyring, check: &Check) -> Result<Answer, CliError> {
    use std::io::Read as _;
    let mut stdin = std::io::stdin().lock();
    let mut stdout = std::io::stdout().lock();
    let mut input = vec![0u8; CHUNK];
    let mut out = Vec::with_capacity(CHUNK + CHUNK / 4);
    // Lines not yet answered are input[start..end].
    let (mut start, mut end) = (0, 0);
    let mut learned = Learned::new();
    let mut answer = Answer::Yes;
    loop {
        input.copy_within(start..end, 0);
        end -= start;
        start = 0;
        if end == input.len() {
            // One line longer than the buffer.
            input.resize(2 * input.len(), 0);
        }
        let asked = input.len() - end;
        let n = loop {
            match stdin.read(&mut input[end..]) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                read => break read,
            }
        }
        .context("cannot read standard input")
        .map_err(CliError::runtime)?;
        end += n;
        let eof = n == 0;
        // A failed reload keeps the last good keys: Keystone, reading the same
        // broken repository, would fail every request instead.
        if let Err(e) = live.refresh() {
            tracing::warn!(error = %e, "the key repository cannot be reloaded; keeping the keys loaded before");
        }
        let now = check.now.unwrap_or_else(token::now);
        let mut result = Ok(());
        while start < end {
            let rest = &input[start..end];
            let line = match rest.iter().position(|&b| b == b'\n') {
                Some(i) => &rest[..=i],
                // The last line may lack its newline.
                None if eof => rest,
                None => break,
            };
            start += line.len();
            let Ok(text) = std::str::from_utf8(line) else {
                result = Err(anyhow!("stream did not contain valid UTF-8"));
                break;
            };
            if check.line(live.keyring(), &mut learned, text.trim(), now, &mut out) == Answer::No {
                answer = Answer::No;
            }
        }
        if eof || n < asked || out.len() >= CHUNK || result.is_err() {
            if let Err(e) = stdout.write_all(&out).and_then(|()| stdout.flush()) {
                // The reader went away (`| head`): stop quietly, as Unix filters do.
                if e.kind() == std::io::ErrorKind::BrokenPipe {
                    return Ok(answer);
                }
                return Err(CliError::runtime(
                    anyhow!(e).context("cannot write standard output"),
                ));
            }
            out.clear();
        }
        result
            .context("cannot read standard input")
            .map_err(CliError::runtime)?;
        if eof {
            return Ok(answer);
        }
    }
}

/// `validate`'s result line for a decoded token, as [`Check::text_line`] writes
/// it (`valid key=I(role) payload=V(Class) user_id=U expires_at=T`), appended
/// to `out` without allocating.
fn verdict_line(status: &str, t: &Token, out: &mut Vec<u8>) {
    let p = &t.payload;
    out.extend_from_slice(status.as_bytes());
    out.extend_from_slice(b" key=");
    push_decimal(out, u64::from(t.key_index));
    out.push(b'(');
    out.extend_from_slice(match t.role {
        Role::Staged => b"staged".as_slice(),
        Role::Primary => b"primary",
        Role::Secondary => b"secondary",
    });
    out.extend_from_slice(b") payload=");
    push_decimal(out, u64::from(p.version));
    out.push(b'(');
    out.extend_from_slice(p.class_name().as_bytes());
    out.push(b')');
    if let Some(id) = &p.user_id {
        out.extend_from_slice(b" user_id=");
        match id {
            Id::Uuid(bytes) => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                for b in bytes {
                    out.extend_from_slice(&[HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
                }
            }
            Id::Text(text) => out.extend_from_slice(text.as_bytes()),
        }
    }
    out.extend_from_slice(b" expires_at=");
    push_iso_time(out, p.expires_at);
}

fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// [`token::iso_time`] (`2030-01-01T00:00:00.000000Z`, empty when out of range)
/// without allocating for the years 1970 to 9999, which hold every expiry
/// Keystone can make from now on.
fn push_iso_time(out: &mut Vec<u8>, secs: i64) {
    if !(0..=token::payload::MAX_EXPIRY).contains(&secs) {
        out.extend_from_slice(token::iso_time(secs).unwrap_or_default().as_bytes());
        return;
    }
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days, for days since 1970-01-01 (non-negative).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let two = |n: i64| [b'0' + (n / 10) as u8, b'0' + (n % 10) as u8];
    out.extend_from_slice(&two(year / 100));
    out.extend_from_slice(&two(year % 100));
    out.push(b'-');
    out.extend_from_slice(&two(month));
    out.push(b'-');
    out.extend_from_slice(&two(day));
    out.push(b'T');
    out.extend_from_slice(&two(rem / 3600));
    out.push(b':');
    out.extend_from_slice(&two(rem / 60 % 60));
    out.push(b':');
    out.extend_from_slice(&two(rem % 60));
    out.extend_from_slice(b".000000Z");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_time_without_allocating_matches_chrono() {
        let mut samples = vec![
            -1,
            0,
            1,
            86_399,
            86_400,
            951_782_400, // 2000-02-29
            4_107_542_400,
            token::payload::MAX_EXPIRY,
            token::payload::MAX_EXPIRY + 1,
            i64::MIN,
            i64::MAX,
        ];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..100_000 {
            // xorshift: spread over the whole range Keystone can show.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            samples.push((x % (token::payload::MAX_EXPIRY as u64 + 1)) as i64);
        }
        for secs in samples {
            let mut out = Vec::new();
            push_iso_time(&mut out, secs);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                token::iso_time(secs).unwrap_or_default(),
                "{secs}"
            );
        }
    }

    /// The allocation-free line is the line `text_line` writes.
    #[test]
    fn verdict_line_is_text_line() {
        let check = Check {
            config: PayloadConfig::default(),
            now: None,
            json: false,
            mode: Mode::Validate,
        };
        let users = [
            None,
            Some(Id::Uuid([0xa5; 16])),
            Some(Id::Text("ldap_üser".into())),
        ];
        for (n, user_id) in users.into_iter().enumerate() {
            for (key_index, role) in [
                (0, Role::Staged),
                (3, Role::Secondary),
                (70_000, Role::Primary),
            ] {
                for version in [0u8, 2, 9] {
                    let t = Token {
                        key_index,
                        role,
                        issued_at: 1_700_000_000,
                        payload: token::Payload {
                            version,
                            user_id: user_id.clone(),
                            expires_at: [-5, 0, 1_700_003_600, token::payload::MAX_EXPIRY + 1][n],
                            ..token::Payload::default()
                        },
                    };
                    for status in ["valid", "expired"] {
                        let mut out = Vec::new();
                        verdict_line(status, &t, &mut out);
                        let want = check.text_line(status, &Ok(t.clone()));
                        assert_eq!(String::from_utf8(out).unwrap(), want);
                    }
                }
            }
        }
    }

    #[test]
    fn decimal() {
        for n in [0, 1, 9, 10, 99, 100, 4_294_967_295, u64::MAX] {
            let mut out = Vec::new();
            push_decimal(&mut out, n);
            assert_eq!(String::from_utf8(out).unwrap(), n.to_string());
        }
    }
}
