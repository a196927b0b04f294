//! `fernetd rotator --config FILE [--check] [--fresh-start] [--adopt-clear-state]`: checks the configuration once
//! (exit 2 when refused), binds, and runs the rotator until SIGTERM or SIGINT,
//! re-reading its `[[agents]]` on SIGHUP; with `--check`, prints every
//! start-up check and stops there.

use super::{Answer, CliError, RotatorArgs, daemon};
use crate::config::RotatorConfig;
use crate::rotator;

pub(super) async fn main(args: &RotatorArgs) -> Result<Answer, CliError> {
    let (fresh_start, adopt_clear_state) = (args.fresh_start, args.adopt_clear_state);
    let args = &args.daemon;
    let loaded: Result<RotatorConfig, _> = crate::config::load(&args.config);
    if args.check {
        return daemon::report_checks(&args.config, |note| {
            let config = loaded.map_err(CliError::usage)?;
            note("the file parses; no unknown key".into());
            rotator::preflight(config, note)
                .map(drop)
                .map_err(CliError::role)
        });
    }
    daemon::hangup_is_reload("rotator");
    let checked = rotator::check(loaded.map_err(CliError::usage)?)
        .map_err(CliError::usage)?
        .reloaded_from(&args.config)
        .fresh_start(fresh_start)
        .adopt_clear_state(adopt_clear_state);
    let listener = daemon::bind(checked.config().listen).await?;
    let metrics = daemon::bind_optional(checked.config().metrics_listen).await?;
    rotator::run(checked, listener, metrics, daemon::termination())
        .await
        .map_err(CliError::role)?;
    Ok(Answer::Yes)
}
