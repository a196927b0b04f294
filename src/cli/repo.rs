//! `fernetd repo init|rotate|show|verify`: a local key repository managed with
//! `keystone-manage`'s semantics, but written through the atomic installer so
//! Keystone never reads a half-rotated repository, and checked the way Keystone
//! would read it.

use std::path::Path;

use anyhow::{Context as _, anyhow};
use serde_json::json;

use super::{Answer, CliError, RepoArgs, RepoCommand};
use crate::install::{self, InstallOutcome, Owner};
use crate::repository::{self, KeySet, Severity, Stamp};

pub fn run(args: &RepoArgs) -> Result<Answer, CliError> {
    let dir = args
        .repository
        .as_deref()
        .ok_or_else(|| CliError::usage(anyhow!("--repository DIR is required")))?;
    let max_active_keys = max_active_keys(dir, args)?;
    let owner = args
        .owner
        .as_deref()
        .map(Owner::parse)
        .transpose()
        .map_err(CliError::usage)?;
    match args.command {
        RepoCommand::Init => init(dir, args, owner, max_active_keys),
        RepoCommand::Rotate => rotate(dir, args, owner, max_active_keys),
        RepoCommand::Show => show(dir, args.json),
        RepoCommand::Verify => verify(dir, owner, args.json),
    }
}

/// `--max-active-keys`, or keystone.conf's for this repository, or Keystone's
/// default; the two sources must agree when both are given.
fn max_active_keys(dir: &Path, args: &RepoArgs) -> Result<usize, CliError> {
    let from_conf = match &args.keystone_conf {
        Some(path) => {
            let conf = crate::policy::KeystoneConf::load(path).map_err(CliError::usage)?;
            Some(if dir == conf.receipt_key_repository {
                conf.receipt_max_active_keys
            } else {
                conf.policy.max_active_keys
            })
        }
        None => None,
    };
    let keys = match (args.max_active_keys, from_conf) {
        (Some(flag), Some(conf)) if flag != conf => {
            return Err(CliError::usage(anyhow!(
                "--max-active-keys {flag} disagrees with keystone.conf's max_active_keys = {conf}"
            )));
        }
        (Some(n), _) | (None, Some(n)) => n,
        (None, None) => crate::policy::DEFAULT_MAX_ACTIVE_KEYS,
    };
    if keys == 0 {
        return Err(CliError::usage(anyhow!(
            "--max-active-keys must be at least 1 (Keystone's minimum)"
        )));
    }
    Ok(keys)
}

/// Keys as `[{"index", "role"}]`, highest first as Keystone orders them.
fn keys_json(set: &KeySet) -> serde_json::Value {
    set.keystone_order()
        .map(|(index, _)| json!({ "index": index, "role": set.role(index) }))
        .collect()
}

fn keys_text(set: &KeySet) -> String {
    set.keystone_order()
        .map(|(index, _)| {
            format!(
                "{index} ({})",
                set.role(index).map(|r| r.to_string()).unwrap_or_default()
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn init(
    dir: &Path,
    args: &RepoArgs,
    owner: Option<Owner>,
    max_active_keys: usize,
) -> Result<Answer, CliError> {
    // keystone-manage's test: a file named 0 means the repository is initialised.
    if dir.join("0").exists() {
        if args.json {
            println!(
                "{}",
                json!({ "repository": dir, "action": "none", "reason": "already initialized" })
            );
        } else {
            println!(
                "{}: already initialized (key 0 exists); nothing to do",
                dir.display()
            );
        }
        return Ok(Answer::Yes);
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))
            .map_err(CliError::runtime)?;
    }
    let existing = load_existing(dir)?;
    // As keystone-manage: a first key becomes 0, then one rotation; keys already
    // present (without a 0) are kept and take part in that rotation.
    let mut seeded = existing.unwrap_or_default();
    seeded.insert(0, repository::Key::generate());
    let set = repository::rotate(&seeded, max_active_keys).map_err(CliError::runtime)?;
    write(dir, "init", &set, args, owner)
}

fn rotate(
    dir: &Path,
    args: &RepoArgs,
    owner: Option<Owner>,
    max_active_keys: usize,
) -> Result<Answer, CliError> {
    let current = load_existing(dir)?.ok_or_else(|| {
        CliError::runtime(anyhow!(
            "{} does not exist; run `fernetd repo init` first",
            dir.display()
        ))
    })?;
    // An agent's repository belongs to the rotator: a local rotation would purge
    // keys without its key-lifetime rule and fork this region from the others.
    if let Some(stamp) = repository::read_stamp(dir)
        .map_err(CliError::runtime)?
        .filter(|s| s.agent)
    {
        if !args.force {
            return Err(CliError::usage(anyhow!(
                "{} is managed by a fernetd agent (generation {}): rotate it with \
                 `fernetd admin rotate`, which keeps every region in step and never purges a \
                 key a valid token needs; --force rotates it here anyway",
                dir.display(),
                stamp.generation
            )));
        }
        tracing::warn!(repository = %dir.display(), generation = stamp.generation, "forced local rotation of an agent's repository: its stamp is dropped, and the agent reports drift until the rotator puts its generation back");
    }
    let set = repository::rotate(&current, max_active_keys)
        .with_context(|| format!("cannot rotate {}", dir.display()))
        .map_err(CliError::runtime)?;
    write(dir, "rotate", &set, args, owner)
}

/// The repository as Keystone reads it, or `None` when it does not exist.
fn load_existing(dir: &Path) -> Result<Option<KeySet>, CliError> {
    if !dir.exists() {
        return Ok(None);
    }
    repository::load(dir)
        .with_context(|| format!("{} is not usable; see `fernetd repo verify`", dir.display()))
        .map(Some)
        .map_err(CliError::runtime)
}

fn write(
    dir: &Path,
    action: &str,
    set: &KeySet,
    args: &RepoArgs,
    owner: Option<Owner>,
) -> Result<Answer, CliError> {
    let removed = install::clean_leftovers(dir).map_err(CliError::runtime)?;
    if removed > 0 {
        tracing::info!(repository = %dir.display(), removed, "removed leftovers of an interrupted install");
    }
    // The generation keeps moving when fernetd already stamped this repository;
    // a fresh repository starts at 1, a Keystone-made one stays unstamped.
    let previous = repository::read_stamp(dir).map_err(CliError::runtime)?;
    let generation = match (previous, action) {
        // Forced on an agent's repository: the keys are no longer the rotator's
        // generation, so they carry none.
        (Some(s), "rotate") if s.agent => None,
        (Some(s), _) => Some(
            s.generation
                .checked_add(1)
                .ok_or_else(|| CliError::runtime(anyhow!("generation overflow")))?,
        ),
        (None, "init") => Some(1),
        (None, _) => None,
    };
    let stamp = generation.map(|generation| Stamp {
        generation,
        digest: set.digest(),
        promoted: Default::default(),
        agent: false,
    });
    let outcome: InstallOutcome =
        install::install(dir, set, stamp.as_ref(), owner).map_err(CliError::runtime)?;
    // This command exits next: the previous set must not outlive it on disk.
    install::settle();
    if args.json {
        println!(
            "{}",
            json!({
                "repository": dir,
                "action": action,
                "generation": generation,
                "digest": outcome.digest.to_hex(),
                "keys": keys_json(set),
                "method": outcome.method,
                "elapsed_ms": outcome.elapsed.as_secs_f64() * 1e3,
            })
        );
    } else {
        let generation = generation
            .map(|g| format!(", generation {g}"))
            .unwrap_or_default();
        println!(
            "{action}: {}: keys {}{generation}\ndigest {}\ninstalled by {:?} in {:.2} ms",
            dir.display(),
            keys_text(set),
            outcome.digest,
            outcome.method,
            outcome.elapsed.as_secs_f64() * 1e3
        );
    }
    Ok(Answer::Yes)
}

fn show(dir: &Path, as_json: bool) -> Result<Answer, CliError> {
    let set = repository::load(dir)
        .with_context(|| format!("cannot read {}; see `fernetd repo verify`", dir.display()))
        .map_err(CliError::runtime)?;
    let stamp = repository::read_stamp(dir).map_err(CliError::runtime)?;
    if as_json {
        println!(
            "{}",
            json!({
                "repository": dir,
                "digest": set.digest().to_hex(),
                "generation": stamp.as_ref().map(|s| s.generation),
                "stamp_matches": stamp.as_ref().map(|s| s.digest == set.digest()),
                "keys": keys_json(&set),
            })
        );
        return Ok(Answer::Yes);
    }
    println!("repository {}", dir.display());
    match stamp {
        Some(s) if s.digest == set.digest() => println!("generation {}", s.generation),
        Some(s) => println!(
            "generation {} (stamp digest {} does not match the keys: changed outside fernetd)",
            s.generation, s.digest
        ),
        None => println!("generation - (not stamped by fernetd)"),
    }
    println!("digest {}", set.digest());
    if set.is_empty() {
        println!("no keys (Keystone answers HTTP 500)");
    }
    for (index, _) in set.keystone_order() {
        println!(
            "{index:>6}  {}",
            set.role(index).map(|r| r.to_string()).unwrap_or_default()
        );
    }
    Ok(Answer::Yes)
}

fn verify(dir: &Path, owner: Option<Owner>, as_json: bool) -> Result<Answer, CliError> {
    let report = repository::verify(dir, owner.map(|o| (o.uid, o.gid)));
    if as_json {
        let problems: Vec<_> = report
            .problems
            .iter()
            .map(
                |p| json!({ "code": p.code(), "severity": p.severity(), "message": p.to_string() }),
            )
            .collect();
        println!(
            "{}",
            json!({
                "repository": dir,
                "ok": report.is_ok(),
                "digest": report.keys.as_ref().map(|s| s.digest().to_hex()),
                "keys": report.keys.as_ref().map(keys_json),
                "problems": problems,
            })
        );
    } else {
        for p in &report.problems {
            let level = match p.severity() {
                Severity::Error => "error",
                Severity::Warning => "warning",
            };
            println!("{level}: {}: {p}", dir.display());
        }
        if let (true, Some(set)) = (report.is_ok(), &report.keys) {
            println!(
                "ok: {}: keys {}; digest {}",
                dir.display(),
                keys_text(set),
                set.digest()
            );
        }
    }
    Ok(if report.is_ok() {
        Answer::Yes
    } else {
        Answer::No
    })
}
