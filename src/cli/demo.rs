//! `fernetd demo`: runs the demo fleet in this process and narrates it (every
//! rotation, each region's acknowledgement, the status table and a cross-region
//! token check), or with `--config-only` writes its files and prints the
//! commands that start each process.

use std::time::Duration;

use anyhow::anyhow;

use super::admin::{render_agents, render_status};
use super::{Answer, CliError, DemoArgs};
use crate::demo::{CrossRegion, DEMO_MAX_ACTIVE_KEYS, Fleet, Running};
use crate::pb;

pub(super) async fn main(args: &DemoArgs) -> Result<Answer, CliError> {
    if args.regions == 0 || args.regions > 100 {
        return Err(CliError::usage(anyhow!(
            "--regions must be between 1 and 100"
        )));
    }
    let (dir, temporary) = match &args.dir {
        Some(d) => (d.clone(), false),
        None if args.config_only => {
            return Err(CliError::usage(anyhow!("--config-only needs --dir DIR")));
        }
        None => (
            std::env::temp_dir().join(format!("fernetd-demo-{}", std::process::id())),
            true,
        ),
    };
    if args.controllers == 0 || args.controllers > 10 {
        return Err(CliError::usage(anyhow!(
            "--controllers must be between 1 and 10"
        )));
    }
    let layout = crate::demo::prepare_with(&dir, args.regions, args.controllers)
        .map_err(CliError::runtime)?;
    if args.config_only {
        println!(
            "Wrote the demo CA, certificates and configuration to {}.",
            layout.dir.display()
        );
        println!("Start each process (the ports were free a moment ago):\n");
        print!("{}", layout.commands());
        return Ok(Answer::Yes);
    }
    let result = run(layout, args.rotations).await;
    // The agents' previous sets and spares go before the process does.
    tokio::task::spawn_blocking(crate::install::settle)
        .await
        .map_err(CliError::runtime)?;
    if temporary {
        // Safe at once: `agent::run` returns only after its file watches are gone.
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

/// Runs the fleet until `rotations` rotations have reached every region, or Ctrl-C.
async fn run(layout: crate::demo::Layout, rotations: u64) -> Result<Answer, CliError> {
    let (mut fleet, running) = Fleet::start(layout).map_err(CliError::runtime)?;
    introduce(&running);
    let watched = tokio::select! {
        r = watch_rotations(&running, rotations) => r,
        _ = tokio::signal::ctrl_c() => {
            println!("\ninterrupted");
            Ok(Answer::Yes)
        }
        e = fleet.failed() => Err(CliError::runtime(e)),
    };
    fleet.stop().await;
    watched
}

fn introduce(running: &Running) {
    println!(
        "fernetd demo: a rotator and {} agents on loopback, mutual TLS everywhere",
        running.agents.len()
    );
    println!("  files:    {}", running.dir.display());
    println!(
        "  schedule: `{}` (UTC), max_active_keys {}",
        running.rotator.schedule.cron, DEMO_MAX_ACTIVE_KEYS
    );
    if let Some(m) = running.rotator.metrics_listen {
        println!("  metrics:  http://{m}/metrics");
    }
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "fernetd".into());
    println!(
        "  try:      {exe} admin --config {}/admin.toml status\n",
        running.dir.display()
    );
}

/// Follows the rotator's events, printing each rotation and, once every region
/// holds it, the status table and a cross-region token check.
async fn watch_rotations(running: &Running, rotations: u64) -> Result<Answer, CliError> {
    let (admin, agents) = (&running.admin, &running.agents);
    let mut client = crate::rotator::admin::connect(admin).map_err(CliError::runtime)?;
    let call = |s: tonic::Status| {
        CliError::runtime(anyhow!(
            "the rotator did not answer: {}",
            crate::describe_status(&s)
        ))
    };
    // The rotator is starting: poll its status until it answers.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        match client.status(pb::StatusRequest {}).await {
            Ok(r) => break r.into_inner(),
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(call(e)),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let mut events = client
        .watch(pb::WatchRequest {})
        .await
        .map_err(call)?
        .into_inner();
    let synced = client
        .sync(pb::SyncRequest { wait_ms: 10_000 })
        .await
        .map_err(call)?
        .into_inner();
    println!(
        "initial distribution (generation {}):",
        status.repositories.first().map_or(0, |r| r.generation)
    );
    let mut out = String::new();
    render_agents(&mut out, &synced.agents);
    println!("{out}");

    let mut cross = CrossRegion::default();
    let mut seen = 0;
    // The generation being distributed and the regions that acknowledged it.
    let mut target = 0;
    let mut acked: Vec<String> = Vec::new();
    while seen < rotations {
        let event = match events.message().await.map_err(call)? {
            Some(e) => e,
            None => return Err(CliError::runtime(anyhow!("the event stream ended"))),
        };
        let time = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(event.unix_ms)
            .map(|t| t.format("%H:%M:%S%.3f").to_string())
            .unwrap_or_default();
        match event.kind.as_str() {
            "rotated" => {
                println!("{time}  rotated to generation {}", event.generation);
                target = event.generation;
                acked.clear();
            }
            "acknowledged" if event.generation == target => {
                let who = if event.agent.is_empty() || event.agent == event.region {
                    event.region.clone()
                } else {
                    format!("{} ({})", event.agent, event.region)
                };
                println!("{time}    {who} installed it and decrypted the canaries");
                acked.push(who);
            }
            // Acknowledgements of the initial distribution, already shown above.
            "acknowledged" => {}
            _ => {
                let msg = if event.message.is_empty() {
                    String::new()
                } else {
                    format!(": {}", event.message)
                };
                println!(
                    "{time}  {} {} generation {}{msg}",
                    event.kind, event.region, event.generation
                );
            }
        }
        if target == 0 || acked.len() < agents.len() {
            continue;
        }
        seen += 1;
        let status = client
            .status(pb::StatusRequest {})
            .await
            .map_err(call)?
            .into_inner();
        let mut out = String::new();
        render_status(&mut out, &status);
        println!("\n{out}");
        print_cross_region(&mut cross, running, target)?;
        println!();
        target = 0;
    }
    let plural = if rotations == 1 { "" } else { "s" };
    println!("{rotations} rotation{plural} reached every region; stopping.");
    Ok(Answer::Yes)
}

/// Issues a token in the first region and shows which regions accept it and
/// every earlier one.
fn print_cross_region(
    cross: &mut CrossRegion,
    running: &Running,
    generation: u64,
) -> Result<(), CliError> {
    let agents = &running.agents;
    let (first, verdicts) = cross
        .check(agents, &running.names, generation)
        .map_err(CliError::runtime)?;
    if verdicts.is_empty() {
        return Ok(());
    }
    println!(
        "tokens issued in {first} (by generation), accepted by every region's repository on disk:"
    );
    let regions = agents.iter().filter(|a| !a.repositories.is_empty()).count();
    for v in verdicts {
        let verdict = if v.accepted_by.len() == regions {
            "accepted everywhere".to_owned()
        } else if v.accepted_by.is_empty() {
            format!(
                "rejected everywhere: its key was purged (max_active_keys {DEMO_MAX_ACTIVE_KEYS})"
            )
        } else {
            format!("accepted only by {}", v.accepted_by.join(", "))
        };
        println!("  generation {:>3}: {verdict}", v.generation);
    }
    Ok(())
}
