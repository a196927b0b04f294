//! Redaction of secrets from text that fernetd did not write but passes on:
//! the last line of a tool's error output (`keystone-manage credential_migrate`,
//! the credential row check) becomes a migrate's failure reason, which is kept
//! in the rotator's state and shown in logs, the audit log, `status` and
//! `Watch`. A database error from SQLAlchemy can quote the connection URL, with
//! its password, and a driver can echo `password=...` settings: both are
//! replaced by [`MASK`] before the text is stored or shown anywhere.

/// What a redacted secret reads as.
pub const MASK: &str = "***";

/// Setting names whose values are secrets (matched without regard to case, as
/// the end of a longer name too: `db_password=`, `X-Auth-Token:`).
const SECRET_NAMES: &[&str] = &[
    "password", "passwd", "pwd", "secret", "token", "api_key", "apikey",
];

/// `text` with the password of every URL (`scheme://user:password@host`) and
/// the value of every `password=...` / `password: ...`-like setting masked.
pub fn redact(text: &str) -> String {
    redact_settings(&redact_urls(text))
}

/// Characters that end a URL or a value in running text.
fn ends_token(c: char) -> bool {
    c.is_whitespace()
        || matches!(
            c,
            '"' | '\'' | '`' | '<' | '>' | ',' | ';' | ')' | ']' | '}'
        )
}

/// Masks the userinfo's password of every `scheme://user:password@host`. The
/// userinfo runs to the last `@` before the URL ends, as a password may hold
/// `@`, `/` or `:` itself; a user without a password is left as it is.
fn redact_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (head, tail) = rest.split_at(at + 3);
        out.push_str(head);
        let end = tail.find(ends_token).unwrap_or(tail.len());
        let url = &tail[..end];
        match url.rfind('@') {
            Some(userinfo_end) => {
                let userinfo = &url[..userinfo_end];
                match userinfo.split_once(':') {
                    Some((user, _password)) => {
                        out.push_str(user);
                        out.push(':');
                        out.push_str(MASK);
                    }
                    None => out.push_str(userinfo),
                }
                out.push_str(&url[userinfo_end..]);
            }
            None => out.push_str(url),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// Masks the value after every `NAME=`, `NAME: ` or `"NAME": ` whose name
/// ends with one of [`SECRET_NAMES`]; a quoted value is masked to its closing
/// quote, an unquoted one to the end of the word.
fn redact_settings(text: &str) -> String {
    // Bytes, not `str` slices: `i` walks every byte, not only char boundaries.
    let lower = text.to_ascii_lowercase().into_bytes();
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut i = 0;
    while i < bytes.len() {
        let Some(name) = SECRET_NAMES
            .iter()
            .find(|n| lower[i..].starts_with(n.as_bytes()))
            .map(|n| n.len())
        else {
            i += 1;
            continue;
        };
        // The rest of the name (`password_hash` is a name too), then an
        // optional closing quote, spaces, the separator and spaces.
        let mut j = i + name;
        while j < bytes.len() && (bytes[j].is_ascii_alphanumeric() || bytes[j] == b'_') {
            j += 1;
        }
        if j < bytes.len() && matches!(bytes[j], b'"' | b'\'') {
            j += 1;
        }
        while j < bytes.len() && bytes[j] == b' ' {
            j += 1;
        }
        if j >= bytes.len() || !matches!(bytes[j], b'=' | b':') {
            i += name;
            continue;
        }
        j += 1;
        while j < bytes.len() && bytes[j] == b' ' {
            j += 1;
        }
        let value_end = match bytes.get(j) {
            Some(&q @ (b'"' | b'\'')) => {
                j += 1;
                text[j..].find(q as char).map_or(text.len(), |e| j + e)
            }
            _ => text[j..].find(ends_token).map_or(text.len(), |e| j + e),
        };
        if value_end > j {
            out.push_str(&text[copied..j]);
            out.push_str(MASK);
            copied = value_end;
        }
        i = value_end.max(i + name);
    }
    out.push_str(&text[copied..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_password_and_keep_the_rest() {
        assert_eq!(
            redact(
                "(pymysql.err.OperationalError) can't connect: mysql+pymysql://keystone:S3cr3t@db.example:3306/keystone?charset=utf8"
            ),
            "(pymysql.err.OperationalError) can't connect: mysql+pymysql://keystone:***@db.example:3306/keystone?charset=utf8"
        );
        // A password holding '@', ':' and '/' is masked whole.
        assert_eq!(
            redact("url 'mysql://ks:p@ss:w/rd@10.0.0.1/keystone' refused"),
            "url 'mysql://ks:***@10.0.0.1/keystone' refused"
        );
        assert_eq!(
            redact("see https://docs.example/errors/e3q8 and ftp://anon@host/x"),
            "see https://docs.example/errors/e3q8 and ftp://anon@host/x"
        );
    }

    #[test]
    fn password_like_settings_are_masked() {
        for (text, want) in [
            (
                "password=hunter2 user=keystone",
                "password=*** user=keystone",
            ),
            ("DB_PASSWORD = 'two words' next", "DB_PASSWORD = '***' next"),
            (
                "{\"password\": \"x y\", \"user\": \"k\"}",
                "{\"password\": \"***\", \"user\": \"k\"}",
            ),
            ("X-Auth-Token: gAAAAAB; rest", "X-Auth-Token: ***; rest"),
            ("connect(passwd=abc,host=db)", "connect(passwd=***,host=db)"),
            ("secret:abc", "secret:***"),
            ("Passwort ä password=ü€x ö", "Passwort ä password=*** ö"),
        ] {
            assert_eq!(redact(text), want, "{text}");
        }
    }

    #[test]
    fn text_without_secrets_is_unchanged() {
        for text in [
            "keystone-manage credential_migrate failed (exit status: 1): Unhandled error",
            "Access denied for user 'keystone'@'10.0.0.1' (using password",
            "the token is expired",
            "",
            "password",
            "password=",
            "überprüfung fehlgeschlagen: Schlüssel ungültig",
        ] {
            assert_eq!(redact(text), text);
        }
    }
}
