//! `fernetd token inspect|validate`: decode and validate Keystone Fernet tokens
//! against a key repository as Keystone 30.0.0 would, one token from the command
//! line or a stream of them from standard input (one result line per line, keys
//! reloaded whenever the repository changes).

use std::io::{BufRead as _, Write as _};

use anyhow::{Context as _, anyhow};

use super::{Answer, CliError, TokenArgs, TokenCommand};
use crate::token::{self, LiveKeyring, Methods, PayloadConfig, Token, TokenError};

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

/// Reads tokens from standard input, one per line, and writes one result line per
/// input line; output is flushed whenever input runs dry so a pipe gets answers
/// as it asks.
fn stream(live: &mut LiveKeyring, check: &Check) -> Result<Answer, CliError> {
    // Our own buffer (bigger than stdin's, so reads bypass that one) tells
    // whether more input is already waiting.
    let mut input = std::io::BufReader::with_capacity(64 * 1024, std::io::stdin().lock());
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut answer = Answer::Yes;
    let mut line = String::new();
    loop {
        line.clear();
        let n = input
            .read_line(&mut line)
            .context("cannot read standard input")
            .map_err(CliError::runtime)?;
        if n == 0 {
            break;
        }
        // A failed reload keeps the last good keys: Keystone, reading the same
        // broken repository, would fail every request instead.
        if let Err(e) = live.refresh() {
            tracing::warn!(error = %e, "the key repository cannot be reloaded; keeping the keys loaded before");
        }
        let (a, text) = check.one(live.keyring(), line.trim(), true);
        if a == Answer::No {
            answer = Answer::No;
        }
        let write = writeln!(out, "{text}").and_then(|()| {
            if input.buffer().is_empty() {
                out.flush()
            } else {
                Ok(())
            }
        });
        if let Err(e) = write {
            // The reader went away (`| head`): stop quietly, as Unix filters do.
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                return Ok(answer);
            }
            return Err(CliError::runtime(
                anyhow!(e).context("cannot write standard output"),
            ));
        }
    }
    out.flush()
        .context("cannot write standard output")
        .map_err(CliError::runtime)?;
    Ok(answer)
}
