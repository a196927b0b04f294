//! Integration tests for Keystone token validation and minting (`fernetd::token`
//! and `fernetd token`), checked against real Keystone 30.0.0's `TokenFormatter`
//! and against the vectors real Keystone made (tests/data).

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use fernetd::repository::{self, Key, KeySet};
use fernetd::token::{self, AuditIds, Id, Keyring, Methods, Payload, PayloadConfig, TokenError};
use rand::rngs::StdRng;
use rand::{Rng as _, RngCore as _, SeedableRng as _};
use serde_json::{Value, json};

use crate::common::{self, keystone};

const KEYSTONE_SCRIPT: &str = include_str!("token_keystone.py");
const VECTORS: &str = include_str!("../data/keystone-30.0.0-token-vectors.json");

/// Writes `set` as a Keystone key repository at `dir`.
fn write_repository(dir: &Path, set: &KeySet) {
    std::fs::create_dir_all(dir).unwrap();
    for (index, key) in set.iter() {
        std::fs::write(dir.join(index.to_string()), key.to_base64().as_bytes()).unwrap();
    }
    assert_eq!(&repository::load(dir).unwrap(), set);
}

/// Runs batches of mint/validate requests through Keystone's `TokenFormatter`,
/// all in one Python process.
fn keystone_batches(batches: &[Value]) -> Vec<Value> {
    let tmp = tempfile::tempdir().unwrap();
    let script = tmp.path().join("token_keystone.py");
    std::fs::write(&script, KEYSTONE_SCRIPT).unwrap();
    let req = tmp.path().join("request.json");
    std::fs::write(
        &req,
        serde_json::to_vec(&json!({ "batches": batches })).unwrap(),
    )
    .unwrap();
    let out = keystone::run_python(
        "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')",
        &[script.to_str().unwrap(), req.to_str().unwrap()],
    );
    serde_json::from_slice(&out.stdout).expect("the Keystone script prints JSON")
}

/// A seeded generator; the seed is in every failure message.
struct Gen {
    rng: StdRng,
    seed: u64,
}

impl Gen {
    fn new() -> Self {
        let seed = rand::rng().next_u64();
        Gen {
            rng: StdRng::seed_from_u64(seed),
            seed,
        }
    }

    fn bytes16(&mut self) -> [u8; 16] {
        let mut b = [0u8; 16];
        self.rng.fill_bytes(&mut b);
        b
    }

    fn hex(&mut self) -> String {
        hex::encode(self.bytes16())
    }

    fn key_set(&mut self, n: u32) -> KeySet {
        KeySet::from_keys((0..n).map(|i| {
            let mut b = [0u8; 32];
            self.rng.fill_bytes(&mut b);
            (i, Key::from_bytes(b))
        }))
    }

    /// An id as Keystone meets them: plain UUID hex, a hyphenated upper-case UUID
    /// (stored as a UUID, shown as hex), or free text (LDAP, federation).
    fn id(&mut self) -> String {
        match self.rng.random_range(0..10) {
            0..=4 => self.hex(),
            5 => {
                let h = self.hex().to_uppercase();
                format!(
                    "{}-{}-{}-{}-{}",
                    &h[..8],
                    &h[8..12],
                    &h[12..16],
                    &h[16..20],
                    &h[20..]
                )
            }
            6 => format!("{}{}", self.hex(), self.hex()),
            7 => format!("ldap_user_{}", self.rng.random_range(0..100_000)),
            8 => "ünïcode-grüppe".to_string(),
            _ => format!("idp-{}", self.rng.random_range(0..1000)),
        }
    }

    fn audit_id(&mut self) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(self.bytes16())
    }

    /// Keystone's expiry text, often with microseconds, from 2001 to 2099 (so
    /// some are expired).
    fn expires_at(&mut self) -> String {
        let secs = self.rng.random_range(978_307_200i64..4_102_444_800);
        let us = if self.rng.random_bool(0.5) {
            self.rng.random_range(0..1_000_000)
        } else {
            0
        };
        let t = chrono::DateTime::from_timestamp(secs, 0).unwrap();
        format!("{}.{us:06}Z", t.format("%Y-%m-%dT%H:%M:%S"))
    }

    fn methods(&mut self, all: &[&str]) -> Vec<String> {
        let mut m: Vec<String> = all
            .iter()
            .filter(|_| self.rng.random_bool(0.4))
            .map(|s| s.to_string())
            .collect();
        if self.rng.random_bool(0.2) {
            m.push("totp".into()); // not configured: lost, as in Keystone
        }
        m
    }

    /// `create_token` keyword arguments for a payload of `version`.
    fn fields(&mut self, version: u8, methods: &[&str]) -> Value {
        let audit: Vec<String> = (0..self.rng.random_range(1..=2))
            .map(|_| self.audit_id())
            .collect();
        let mut f = json!({
            "user_id": self.id(),
            "expires_at": self.expires_at(),
            "audit_ids": audit,
            "methods": self.methods(methods),
        });
        let groups = |g: &mut Gen| -> Value {
            (0..g.rng.random_range(0..4))
                .map(|_| json!({ "id": g.id() }))
                .collect()
        };
        match version {
            1 => {
                f["domain_id"] = json!(if self.rng.random_bool(0.3) {
                    "default".to_string()
                } else {
                    self.hex()
                })
            }
            2 => f["project_id"] = json!(self.id()),
            3 => {
                f["project_id"] = json!(self.id());
                f["trust_id"] = json!(self.hex());
            }
            4..=6 => {
                f["federated_group_ids"] = groups(self);
                f["identity_provider_id"] = json!(self.id());
                f["protocol_id"] =
                    json!(["saml2", "openid", "mapped"][self.rng.random_range(0..3)]);
                match version {
                    5 => f["project_id"] = json!(self.id()),
                    6 => f["domain_id"] = json!(self.id()),
                    _ => {}
                }
            }
            7 => {
                f["project_id"] = json!(self.id());
                f["access_token_id"] = json!(self.id());
            }
            8 => f["system"] = json!("all"),
            9 => {
                f["project_id"] = json!(self.id());
                f["app_cred_id"] = json!(self.id());
            }
            10 => {
                if self.rng.random_bool(0.5) {
                    f["project_id"] = json!(self.id());
                } else {
                    f["domain_id"] = json!(self.id());
                }
                f["thumbprint"] = json!(self.audit_id());
            }
            _ => {}
        }
        f
    }
}

/// The payload Keystone's `assemble` makes of `create_token` arguments, for
/// fernetd to mint.
fn payload_from_fields(version: u8, f: &Value, methods: &Methods) -> Payload {
    let id = |k: &str| f[k].as_str().map(Id::keystone);
    let expires = f["expires_at"].as_str().unwrap();
    let expires_at = chrono::DateTime::parse_from_rfc3339(expires)
        .unwrap()
        .timestamp();
    let names: Vec<&str> = f["methods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    let audit: Vec<&str> = f["audit_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    Payload {
        version,
        user_id: id("user_id"),
        methods: methods.encode(names),
        audit_ids: AuditIds::from_strings(audit).unwrap(),
        system: f["system"].as_str().map(Into::into),
        domain_id: id("domain_id"),
        project_id: id("project_id"),
        trust_id: id("trust_id"),
        federated_group_ids: f["federated_group_ids"].as_array().map(|g| {
            g.iter()
                .map(|g| g["id"].as_str().map(Id::keystone))
                .collect()
        }),
        identity_provider_id: id("identity_provider_id"),
        protocol_id: f["protocol_id"].as_str().map(Into::into),
        access_token_id: id("access_token_id"),
        app_cred_id: id("app_cred_id"),
        // Keystone stores the thumbprint as text, never as a UUID.
        thumbprint: f["thumbprint"].as_str().map(|t| Id::Text(t.into())),
        expires_at,
    }
}

/// fernetd's answer in the shape of the Keystone script's results.
fn as_keystone(result: &Result<token::Token, TokenError>, methods: &Methods) -> Value {
    match result {
        Ok(t) => {
            json!({ "ok": keystone_fields(serde_json::to_value(t.describe(methods)).unwrap()) })
        }
        Err(TokenError::Malformed(_) | TokenError::Unrecognized) => {
            json!({ "error": "ValidationError", "message": "Could not recognize Fernet token" })
        }
        Err(e @ TokenError::UnsupportedVersion(_)) => {
            json!({ "error": "ValidationError", "message": e.to_string() })
        }
        Err(e) => json!({ "error": "fernetd", "message": e.to_string() }),
    }
}

/// Drops what fernetd adds to `validate_token`'s fields.
fn keystone_fields(mut description: Value) -> Value {
    let obj = description.as_object_mut().unwrap();
    for extra in ["version", "payload_class", "key_index", "role"] {
        obj.remove(extra);
    }
    description
}

/// Keystone and fernetd agree on a token: same fields, or the same refusal; where
/// Keystone fails with an exception (HTTP 500), fernetd reports a bad payload.
fn assert_agree(keystone: &Value, ours: &Value, context: &str) {
    if ours["error"] == "fernetd" {
        assert!(
            keystone["error"].is_string() && keystone["error"] != "ValidationError",
            "{context}: fernetd refused ({}), Keystone said {keystone}",
            ours["message"]
        );
    } else {
        assert_eq!(keystone, ours, "{context}");
    }
}

fn run_cli(args: &[&str], stdin: &str) -> (i32, String, String) {
    let mut child = Command::new(common::fernetd_bin())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Written from another thread: the binary answers while it reads, and a
    // large input would otherwise fill both pipes.
    let mut input = child.stdin.take().unwrap();
    let stdin = stdin.to_string();
    let writer = std::thread::spawn(move || input.write_all(stdin.as_bytes()));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn canaries_from_every_key_are_accepted_by_keystone() {
    let tmp = tempfile::tempdir().unwrap();
    let set = Gen::new().key_set(4);
    write_repository(tmp.path(), &set);
    let canaries: Vec<String> = set.iter().map(|(_, key)| token::canary(key)).collect();
    let ring = Keyring::new(&set);
    for (canary, (index, _)) in canaries.iter().zip(set.iter()) {
        assert_eq!(ring.decrypt(canary).unwrap().key_index, index);
    }
    let mut all = canaries.clone();
    all.push(token::canary(&Key::generate()));
    let out = keystone_batches(&[json!({ "repository": tmp.path(), "validate": all })]);
    let results = out[0]["validate"].as_array().unwrap();
    let now = chrono::Utc::now().timestamp();
    for r in &results[..canaries.len()] {
        let ok = &r["ok"];
        assert_eq!(ok["methods"], json!(["password"]), "{r}");
        assert_eq!(ok["user_id"].as_str().unwrap().len(), 32, "{r}");
        assert_eq!(ok["audit_ids"].as_array().unwrap().len(), 1, "{r}");
        assert_eq!(ok["project_id"], Value::Null);
        let expires = chrono::DateTime::parse_from_rfc3339(ok["expires_at"].as_str().unwrap())
            .unwrap()
            .timestamp();
        assert!(
            (now..=now + token::CANARY_LIFETIME_SECS + 5).contains(&expires),
            "{r}"
        );
    }
    assert_eq!(
        results[canaries.len()],
        json!({"error": "ValidationError", "message": "Could not recognize Fernet token"})
    );
}

fn vectors() -> (Value, PathBuf, tempfile::TempDir) {
    let v: Value = serde_json::from_str(VECTORS).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("keys");
    std::fs::create_dir(&dir).unwrap();
    for (name, key) in v["key_repository"]["files"].as_object().unwrap() {
        std::fs::write(dir.join(name), key.as_str().unwrap()).unwrap();
    }
    (v, dir, tmp)
}

#[test]
fn every_vector_decodes_as_keystone_said() {
    let (v, dir, _tmp) = vectors();
    let ring = Keyring::new(&repository::load(&dir).unwrap());
    let config = PayloadConfig::default();
    let methods = Methods::new(
        v["config"]["auth_methods"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_str().unwrap()),
    );
    assert_eq!(
        methods, config.methods,
        "the vectors were made with Keystone's default [auth] methods"
    );
    let mut tokens = Vec::new();
    let mut expected = Vec::new();
    for vector in v["vectors"].as_array().unwrap() {
        let name = vector["name"].as_str().unwrap();
        let t = vector["token"].as_str().unwrap();
        let decrypted = ring.decrypt(t).unwrap();
        let hex = hex::encode(&decrypted.plaintext);
        assert_eq!(hex, vector["msgpack_hex"].as_str().unwrap(), "{name}");
        let want_key: u32 = vector["encrypted_with_key_file"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(decrypted.key_index, want_key, "{name}");
        assert_eq!(
            decrypted.issued_at,
            vector["fernet"]["timestamp"].as_u64().unwrap(),
            "{name}"
        );

        let decoded = ring.inspect(t, &config);
        let got = as_keystone(&decoded, &config.methods);
        assert_eq!(got, json!({ "ok": vector["expected"] }), "{name}");
        let decoded = decoded.unwrap();
        assert_eq!(
            decoded.payload.version,
            vector["version"].as_u64().unwrap() as u8,
            "{name}"
        );
        assert_eq!(
            decoded.payload.class_name(),
            vector["payload_class"].as_str().unwrap(),
            "{name}"
        );

        // Minting is the inverse: Keystone's own inputs give Keystone's bytes.
        let input = &vector["input"];
        let payload = payload_from_fields(decoded.payload.version, input, &config.methods);
        let bytes = token::payload::encode(&payload, token::Encoding::Current).unwrap();
        if input["expires_at"].as_str().unwrap().ends_with(".000000Z") {
            assert_eq!(bytes, decrypted.plaintext, "{name}");
        } else {
            // fernetd mints whole seconds; Keystone kept the microseconds it then drops.
            assert_eq!(
                token::payload::decode(&bytes, &config).unwrap(),
                decoded.payload,
                "{name}"
            );
        }
        tokens.push(t.to_string());
        expected.push(json!({ "ok": vector["expected"] }));
    }
    for extra in v["extra"].as_array().unwrap() {
        let name = extra["name"].as_str().unwrap();
        let t = extra["token"].as_str().unwrap();
        let got = as_keystone(&ring.inspect(t, &config), &config.methods);
        assert_eq!(got, extra["result"], "{name}");
        tokens.push(t.to_string());
        expected.push(extra["result"].clone());
    }

    // The expired vector decodes (validate_token ignores expiry) but does not validate.
    let expired = v["vectors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == "project_scoped_expired")
        .unwrap();
    let now = chrono::Utc::now().timestamp();
    assert!(matches!(
        ring.validate(expired["token"].as_str().unwrap(), &config, now),
        Err(TokenError::Expired {
            expires_at: 978_307_200
        })
    ));

    // The command line says the same, one JSON line per token.
    let stdin = tokens.join("\n") + "\n";
    let (code, stdout, stderr) = run_cli(
        &[
            "token",
            "inspect",
            "--json",
            "--repository",
            dir.to_str().unwrap(),
            "-",
        ],
        &stdin,
    );
    assert_eq!(code, 1, "some vectors are invalid or expired: {stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), tokens.len());
    for ((line, want), t) in lines.iter().zip(&expected).zip(&tokens) {
        let got: Value = serde_json::from_str(line).unwrap();
        match &got["token"] {
            Value::Object(_) => assert_eq!(
                json!({ "ok": keystone_fields(got["token"].clone()) }),
                *want,
                "{t}"
            ),
            _ => assert!(
                got["keystone"]
                    .as_str()
                    .unwrap()
                    .ends_with(want["message"].as_str().unwrap()),
                "{t}"
            ),
        }
    }
}

const CLASSES: [&str; 11] = token::payload::CLASS_NAMES;

/// Keystone mints tokens of every version, with random ids, by random keys of
/// repositories of 3 to 7 keys; `fernetd token inspect` decodes every one as
/// Keystone's `validate_token` does and names the key that made it.
#[test]
fn keystone_minted_tokens_decode_identically() {
    let mut g = Gen::new();
    let tmp = tempfile::tempdir().unwrap();
    let mut batches = Vec::new();
    let mut keys_used = Vec::new();
    for n in 3..=7u32 {
        let repo = tmp.path().join(format!("repo{n}"));
        let set = g.key_set(n);
        write_repository(&repo, &set);
        // Keystone encrypts with the highest index: a one-key repository per key.
        for (index, key) in set.iter() {
            write_repository(
                &tmp.path().join(format!("single{n}-{index}")),
                &KeySet::from_keys([(0, key.clone())]),
            );
        }
        // Every other repository uses a custom `[auth] methods` order.
        let custom = [
            "password",
            "token",
            "totp",
            "mapped",
            "application_credential",
            "oauth1",
        ];
        let methods: Vec<&str> = if n % 2 == 0 {
            custom.to_vec()
        } else {
            token::payload::DEFAULT_METHODS.to_vec()
        };
        let mut mint = Vec::new();
        let mut used = Vec::new();
        for version in 0..=10u8 {
            for _ in 0..3 {
                let index = g.rng.random_range(0..n);
                used.push(index);
                mint.push(json!({
                    "class": CLASSES[version as usize],
                    "repository": tmp.path().join(format!("single{n}-{index}")),
                    "fields": g.fields(version, &methods),
                }));
            }
        }
        let methods_arg = (n % 2 == 0).then(|| methods.join(","));
        batches.push((repo, methods_arg, json!({ "repository": tmp.path().join(format!("repo{n}")), "methods": methods, "mint": mint })));
        keys_used.push(used);
    }
    let out = keystone_batches(&batches.iter().map(|b| b.2.clone()).collect::<Vec<_>>());
    let mut checked = 0;
    for (((repo, methods_arg, _), result), used) in batches.iter().zip(&out).zip(&keys_used) {
        let tokens: Vec<&str> = result["mint"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        let mut args = vec![
            "token",
            "inspect",
            "--json",
            "--repository",
            repo.to_str().unwrap(),
        ];
        if let Some(m) = methods_arg {
            args.extend(["--methods", m]);
        }
        args.push("-");
        let (_, stdout, stderr) = run_cli(&args, &(tokens.join("\n") + "\n"));
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(lines.len(), tokens.len(), "{stderr}");
        for (i, line) in lines.iter().enumerate() {
            let ctx = format!(
                "seed {} repo {} token {} {}",
                g.seed,
                repo.display(),
                i,
                tokens[i]
            );
            let got: Value = serde_json::from_str(line).unwrap();
            assert!(got["token"].is_object(), "{ctx}: {got}");
            assert_eq!(got["token"]["key_index"], json!(used[i]), "{ctx}");
            assert_eq!(got["token"]["version"], json!(i / 3), "{ctx}");
            assert_eq!(
                json!({ "ok": keystone_fields(got["token"].clone()) }),
                result["minted"][i],
                "{ctx}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 5 * 11 * 3);
}

/// fernetd mints tokens of every version with random keys of the repository;
/// Keystone's `validate_token` accepts every one with the fields fernetd reads.
#[test]
fn fernetd_minted_tokens_are_accepted_by_keystone() {
    let mut g = Gen::new();
    let tmp = tempfile::tempdir().unwrap();
    let n = g.rng.random_range(3..=7);
    let set = g.key_set(n);
    write_repository(tmp.path(), &set);
    let ring = Keyring::new(&set);
    let config = PayloadConfig::default();
    let names = token::payload::DEFAULT_METHODS;
    let mut tokens = Vec::new();
    let mut ours = Vec::new();
    for version in 0..=10u8 {
        for _ in 0..4 {
            let payload = payload_from_fields(version, &g.fields(version, &names), &config.methods);
            let index = g.rng.random_range(0..set.len() as u32);
            let t = token::mint(set.get(index).unwrap(), &payload).unwrap();
            let decoded = ring.inspect(&t, &config).unwrap();
            assert_eq!(
                (decoded.key_index, &decoded.payload),
                (index, &payload),
                "seed {}",
                g.seed
            );
            ours.push(as_keystone(&Ok(decoded), &config.methods));
            tokens.push(t);
        }
    }
    // The legacy msgpack<1.0 form, read through Keystone's raw=True retry.
    let legacy = Payload {
        version: 2,
        user_id: Some(Id::Uuid([0xff; 16])),
        project_id: Some(Id::Text("legacy".into())),
        methods: 2,
        audit_ids: AuditIds::from_strings(["x1DNOtPoR8m44mXdTkH2LA"]).unwrap(),
        expires_at: 1_893_456_000,
        ..Payload::default()
    };
    let plain = token::payload::encode(&legacy, token::Encoding::Legacy).unwrap();
    let t = token::encrypt(set.primary().unwrap(), &plain);
    ours.push(as_keystone(&ring.inspect(&t, &config), &config.methods));
    tokens.push(t);

    let out = keystone_batches(&[json!({ "repository": tmp.path(), "validate": tokens })]);
    for (i, (keystone, ours)) in out[0]["validate"]
        .as_array()
        .unwrap()
        .iter()
        .zip(&ours)
        .enumerate()
    {
        assert!(
            keystone["ok"].is_object(),
            "seed {} token {i}: {keystone}",
            g.seed
        );
        assert_eq!(keystone, ours, "seed {} token {i} {}", g.seed, tokens[i]);
    }
}

/// Mutated tokens (changed, dropped and inserted characters, padding, the other
/// base64 alphabet, non-ASCII) get the same answer from fernetd as from Keystone.
#[test]
fn mutated_tokens_get_keystone_answers() {
    let mut g = Gen::new();
    let tmp = tempfile::tempdir().unwrap();
    let set = g.key_set(3);
    write_repository(tmp.path(), &set);
    let ring = Keyring::new(&set);
    let config = PayloadConfig::default();
    let alphabet: Vec<char> = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_+/"
        .chars()
        .collect();
    let junk = ['=', ' ', '!', '\n', '.', 'é', '\u{3000}', '+', '/', '-'];
    let mut tokens = Vec::new();
    for version in 0..=10u8 {
        let payload = payload_from_fields(
            version,
            &g.fields(version, &token::payload::DEFAULT_METHODS),
            &config.methods,
        );
        let t = token::mint(set.get(g.rng.random_range(0..3)).unwrap(), &payload).unwrap();
        for _ in 0..30 {
            let mut c: Vec<char> = t.chars().collect();
            for _ in 0..g.rng.random_range(1..=3) {
                let at = g.rng.random_range(0..c.len());
                match g.rng.random_range(0..8) {
                    0 => c[at] = alphabet[g.rng.random_range(0..alphabet.len())],
                    // Never the last character: the next mutation needs one.
                    1 => {
                        if c.len() > 1 {
                            c.remove(at);
                        }
                    }
                    2 => c.insert(at, junk[g.rng.random_range(0..junk.len())]),
                    3 => c.extend(std::iter::repeat_n('=', g.rng.random_range(1..4))),
                    4 => c.truncate(at.max(1)),
                    5 => {
                        c = c
                            .iter()
                            .map(|&x| match x {
                                '-' => '+',
                                '_' => '/',
                                x => x,
                            })
                            .collect()
                    }
                    // The last character's unused bits.
                    6 => {
                        let last = c.len() - 1;
                        c[last] = alphabet[g.rng.random_range(0..64)];
                    }
                    _ => c.push(junk[g.rng.random_range(0..junk.len())]),
                }
            }
            tokens.push(c.into_iter().collect::<String>());
        }
    }
    let out = keystone_batches(&[json!({ "repository": tmp.path(), "validate": tokens })]);
    let mut accepted = 0;
    for (t, keystone) in tokens.iter().zip(out[0]["validate"].as_array().unwrap()) {
        let ours = as_keystone(&ring.inspect(t, &config), &config.methods);
        assert_agree(keystone, &ours, &format!("seed {} token {t:?}", g.seed));
        accepted += usize::from(keystone["ok"].is_object());
    }
    // Both kinds occur: the test cannot pass by refusing everything.
    assert!(
        accepted > 0 && accepted < tokens.len(),
        "{accepted} of {}",
        tokens.len()
    );
}

#[test]
fn exit_codes() {
    let tmp = tempfile::tempdir().unwrap();
    let set = Gen::new().key_set(3);
    write_repository(tmp.path(), &set);
    let repo = tmp.path().to_str().unwrap();
    let good = token::canary(set.primary().unwrap());
    let foreign = token::canary(&Key::generate());
    let run = |args: &[&str]| run_cli(args, "").0;
    assert_eq!(run(&["token", "validate", "--repository", repo, &good]), 0);
    assert_eq!(run(&["token", "inspect", "--repository", repo, &good]), 0);
    assert_eq!(
        run(&["token", "validate", "--repository", repo, &foreign]),
        1
    );
    assert_eq!(
        run(&["token", "validate", "--repository", repo, "gAAAA"]),
        1
    );
    // A canary lives five minutes: valid now, expired in 2100.
    assert_eq!(
        run(&[
            "token",
            "validate",
            "--repository",
            repo,
            "--now",
            "2100-01-01T00:00:00Z",
            &good
        ]),
        1
    );
    assert_eq!(
        run(&[
            "token",
            "validate",
            "--repository",
            repo,
            "--now",
            "yesterday",
            &good
        ]),
        2
    );
    assert_eq!(run(&["token", "validate", &good]), 2);
    let missing = tmp.path().join("missing");
    assert_eq!(
        run(&[
            "token",
            "validate",
            "--repository",
            missing.to_str().unwrap(),
            &good
        ]),
        3
    );
    // All valid on stdin: 0; one bad line: 1, with one result line per input line.
    let (code, out, _) = run_cli(
        &["token", "validate", "--repository", repo, "-"],
        &format!("{good}\n{good}\n"),
    );
    assert_eq!((code, out.lines().count()), (0, 2));
    let (code, out, _) = run_cli(
        &["token", "validate", "--repository", repo, "-"],
        &format!("{good}\n\n{foreign}\n"),
    );
    assert_eq!((code, out.lines().count()), (1, 3));
    assert!(out.lines().nth(2).unwrap().starts_with("invalid"), "{out}");
}

/// A running `fernetd token validate -` picks up a new key set as soon as the
/// repository changes, through the atomic installer's directory exchange.
#[test]
fn stream_follows_repository_changes() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("keys");
    let mut g = Gen::new();
    let first = g.key_set(3);
    fernetd::install::install(&repo, &first, None, None).unwrap();
    let mut child = Command::new(common::fernetd_bin())
        .args([
            "token",
            "validate",
            "--repository",
            repo.to_str().unwrap(),
            "-",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut ask = |t: &str| {
        writeln!(stdin, "{t}").unwrap();
        stdin.flush().unwrap();
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        line
    };
    let mut set = first.clone();
    for round in 0..5 {
        // Rotate: the new staged key is unknown to the running validator until installed.
        let next = repository::rotate(&set, 4).unwrap();
        let newcomer = next.staged().unwrap();
        let t = token::canary(newcomer);
        assert!(ask(&t).starts_with("invalid"), "round {round}");
        fernetd::install::install(&repo, &next, None, None).unwrap();
        let answer = ask(&t);
        assert!(
            answer.starts_with("valid key=0(staged)"),
            "round {round}: {answer}"
        );
        set = next;
    }
    drop(stdin);
    assert_eq!(child.wait().unwrap().code(), Some(1));
}

/// The line `fernetd token validate -` has always written for a token: the
/// verdict of Keystone's key order (a keyring without promotion times or batch
/// memory), formatted as before the batch path existed.
fn expected_validate_line(ring: &Keyring, t: &str, now: i64) -> String {
    let methods = Methods::default();
    match ring.inspect(t.trim(), &PayloadConfig::default()) {
        Ok(tok) => {
            let d = tok.describe(&methods);
            let status = if now >= tok.payload.expires_at {
                "expired"
            } else {
                "valid"
            };
            let mut line = format!(
                "{status} key={}({}) payload={}({})",
                d.key_index, d.role, d.version, d.payload_class
            );
            if let Some(u) = d.user_id {
                line.push_str(&format!(" user_id={u}"));
            }
            line + &format!(" expires_at={}", d.expires_at)
        }
        Err(e) => format!("invalid error={:?}", e.to_string()),
    }
}

/// A batch of tokens from every key of a rotated 6-key repository (each issued
/// while its key was primary, the staged key's from a region that already
/// promoted it), mixed with expired, foreign, mangled and empty lines, a line
/// longer than the read buffer and a last line without newline: the binary
/// answers every line exactly as before, from a repository whose stamp gives
/// the promotion times, from one whose stamp lies, and from the same keys
/// without a stamp (as `keystone-manage` leaves them).
#[test]
fn mixed_key_batch_answers_as_keystone_order_with_and_without_stamp() {
    let mut g = Gen::new();
    let tmp = tempfile::tempdir().unwrap();
    let indices = [0u32, 3, 4, 5, 6, 7];
    let set = KeySet::from_keys(indices.iter().map(|&i| {
        let mut b = [0u8; 32];
        g.rng.fill_bytes(&mut b);
        (i, Key::from_bytes(b))
    }));
    let now = chrono::Utc::now().timestamp();
    let hour = 3600;
    let promoted: std::collections::BTreeMap<u32, i64> = (3..=7u32)
        .map(|i| (i, now - i64::from(8 - i) * hour))
        .collect();
    let stamp = |promoted| repository::Stamp {
        generation: 9,
        digest: set.digest(),
        promoted,
        agent: true,
    };
    let stamped = tmp.path().join("stamped");
    fernetd::install::install(&stamped, &set, Some(&stamp(promoted.clone())), None).unwrap();
    // A stamp that lies: wrong keys at wrong times, a key the repository lacks.
    let lying = tmp.path().join("lying");
    let lies = [
        (0, now - 9 * hour),
        (4, now - 30),
        (6, now - 5 * hour),
        (42, now - 2 * hour),
    ];
    fernetd::install::install(&lying, &set, Some(&stamp(lies.into_iter().collect())), None)
        .unwrap();
    let plain = tmp.path().join("plain");
    write_repository(&plain, &set);
    assert!(repository::read_stamp(&plain).unwrap().is_none());
    assert_eq!(
        repository::read_stamp(&stamped).unwrap().unwrap().promoted,
        promoted
    );

    let foreign = Key::generate();
    let mut lines = Vec::new();
    for n in 0..9000 {
        let index = indices[g.rng.random_range(0..indices.len())];
        let issued_at = match index {
            0 => now - g.rng.random_range(0..600),
            // Some issued before any promotion the stamp knows.
            i if g.rng.random_bool(0.05) => now - 10 * hour - i64::from(i),
            i => promoted[&i] + g.rng.random_range(0..hour),
        };
        let key = if g.rng.random_bool(0.03) {
            &foreign
        } else {
            set.get(index).unwrap()
        };
        let mut audit_ids = AuditIds::default();
        audit_ids.push(&g.bytes16());
        let payload = Payload {
            version: 2,
            user_id: Some(Id::Uuid(g.bytes16())),
            project_id: Some(Id::Uuid(g.bytes16())),
            methods: 2,
            audit_ids,
            // One in ten expired.
            expires_at: now + if n % 10 == 0 { -60 } else { 86_400 },
            ..Payload::default()
        };
        let plaintext = token::payload::encode(&payload, token::Encoding::Current).unwrap();
        let mut t = token::encrypt_with(key, &plaintext, issued_at as u64, g.bytes16());
        match g.rng.random_range(0..100) {
            0 => t.truncate(t.len() - 5),
            1 => t.replace_range(40..41, if &t[40..41] == "A" { "B" } else { "A" }),
            2 => t = String::new(),
            3 => t = format!("  {t}\t"),
            _ => {}
        }
        lines.push(t);
    }
    lines.insert(4321, "A".repeat(1_500_000));
    let stdin = lines.join("\n");
    let ring = Keyring::new(&set);
    let expected: Vec<String> = lines
        .iter()
        .map(|t| expected_validate_line(&ring, t, now))
        .collect();
    assert!(expected.iter().filter(|l| l.starts_with("valid")).count() > 7000);
    assert!(
        expected
            .iter()
            .any(|l| l.starts_with("valid key=0(staged)"))
    );
    assert!(expected.iter().any(|l| l.starts_with("expired")));
    for repo in [&stamped, &lying, &plain] {
        let (code, stdout, stderr) = run_cli(
            &[
                "token",
                "validate",
                "--now",
                &now.to_string(),
                "--repository",
                repo.to_str().unwrap(),
                "-",
            ],
            &stdin,
        );
        assert_eq!(code, 1, "{}: {stderr}", repo.display());
        let got: Vec<&str> = stdout.lines().collect();
        assert_eq!(got.len(), expected.len(), "{}", repo.display());
        for (i, (got, want)) in got.iter().zip(&expected).enumerate() {
            assert_eq!(
                got,
                want,
                "seed {} repository {} line {i}: {:?}",
                g.seed,
                repo.display(),
                lines[i].get(..60)
            );
        }
    }
}
