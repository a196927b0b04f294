//! `fernetd agent --config FILE [--check | --ready [--require-current]]`:
//! checks the configuration once (exit 2 when refused), binds, and runs the
//! agent until SIGTERM or SIGINT; with `--check`, prints every start-up check
//! and stops there; with `--ready`, answers from the running agent's readiness
//! record whether Keystone may serve (a probe: 0 yes, 1 no). The
//! configuration's `log_format` wins over the `--log-format` flag.

use super::{AgentArgs, Answer, CliError, daemon};
use crate::agent;
use crate::config::{AgentConfig, LogFormat};

pub(super) async fn main(args: &AgentArgs, log_format: LogFormat) -> Result<Answer, CliError> {
    if args.ready {
        return ready(args);
    }
    let args = &args.daemon;
    let loaded: Result<AgentConfig, _> = crate::config::load(&args.config);
    daemon::init_logging(
        loaded
            .as_ref()
            .ok()
            .and_then(|c| c.log_format)
            .unwrap_or(log_format),
    );
    if args.check {
        return daemon::report_checks(&args.config, |note| {
            let config = loaded.map_err(CliError::usage)?;
            note("the file parses; no unknown key".into());
            agent::preflight(config, note)
                .map(drop)
                .map_err(CliError::role)
        });
    }
    daemon::hangup_is_reload("agent");
    let checked = agent::check(loaded.map_err(CliError::usage)?).map_err(CliError::role)?;
    let listener = daemon::bind(checked.config().listen).await?;
    let metrics = daemon::bind_optional(checked.config().metrics).await?;
    let ran = agent::run(checked, listener, metrics, daemon::termination()).await;
    // The previous sets of the last installs go before the process does.
    tokio::task::spawn_blocking(crate::install::settle)
        .await
        .map_err(CliError::runtime)?;
    ran.map_err(CliError::role)?;
    Ok(Answer::Yes)
}

/// `--ready`: one line on standard output, 0 when ready; the reason on
/// standard error and 1 when not (2 when the configuration has no record).
fn ready(args: &AgentArgs) -> Result<Answer, CliError> {
    let config: AgentConfig = crate::config::load(&args.daemon.config).map_err(CliError::usage)?;
    config.validate().map_err(CliError::usage)?;
    match agent::readiness::check_record(&config, args.require_current) {
        Ok(text) => {
            println!("{text}");
            Ok(Answer::Yes)
        }
        Err(e) if e.is_config() => Err(CliError::usage(e)),
        Err(e) => {
            println!("not ready: {}", crate::error_chain(&e));
            Ok(Answer::No)
        }
    }
}
