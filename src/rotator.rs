//! The rotator: owns the canonical repositories and their durable generation
//! state, rotates on a cron schedule, pushes every generation to all agents, and
//! never commits generation G+1 while an enrolled agent has not acknowledged G.

/// `fernetd rotator --config FILE`: runs until SIGTERM or SIGINT.
pub async fn main(config: &std::path::Path) -> Result<crate::cli::Answer, crate::cli::CliError> {
    let _ = config;
    Err(crate::cli::CliError::runtime(anyhow::anyhow!(
        "`fernetd rotator` is being built (issue 4)"
    )))
}
