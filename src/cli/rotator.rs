//! `fernetd rotator --config FILE`: checks the configuration once (exit 2 when
//! refused), binds, and runs the rotator until SIGTERM or SIGINT.

use std::path::Path;

use super::{Answer, CliError, daemon};
use crate::config::RotatorConfig;
use crate::rotator;

pub(super) async fn main(config: &Path) -> Result<Answer, CliError> {
    let config: RotatorConfig = crate::config::load(config).map_err(CliError::usage)?;
    let checked = rotator::check(config).map_err(CliError::usage)?;
    let listener = daemon::bind(checked.config().listen).await?;
    let metrics = daemon::bind_optional(checked.config().metrics_listen).await?;
    rotator::run(checked, listener, metrics, daemon::termination())
        .await
        .map_err(CliError::role)?;
    Ok(Answer::Yes)
}
