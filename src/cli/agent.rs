//! `fernetd agent --config FILE`: checks the configuration once (exit 2 when
//! refused), binds, and runs the agent until SIGTERM or SIGINT. The
//! configuration's `log_format` wins over the `--log-format` flag.

use std::path::Path;

use super::{Answer, CliError, daemon};
use crate::agent;
use crate::config::{AgentConfig, LogFormat};

pub(super) async fn main(config: &Path, log_format: LogFormat) -> Result<Answer, CliError> {
    let loaded: Result<AgentConfig, _> = crate::config::load(config);
    daemon::init_logging(
        loaded
            .as_ref()
            .ok()
            .and_then(|c| c.log_format)
            .unwrap_or(log_format),
    );
    let checked = agent::check(loaded.map_err(CliError::usage)?).map_err(CliError::role)?;
    let listener = daemon::bind(checked.config().listen).await?;
    let metrics = daemon::bind_optional(checked.config().metrics).await?;
    agent::run(checked, listener, metrics, daemon::termination())
        .await
        .map_err(CliError::role)?;
    Ok(Answer::Yes)
}
