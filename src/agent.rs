//! The regional agent: serves the Distribution API over mTLS, validates and
//! atomically installs key sets (no rollback, no fork), proves the installed
//! repository by decrypting canaries, and reports drift it did not cause.

/// `fernetd agent --config FILE`: runs until SIGTERM or SIGINT.
pub async fn main(config: &std::path::Path) -> Result<crate::cli::Answer, crate::cli::CliError> {
    let _ = config;
    Err(crate::cli::CliError::runtime(anyhow::anyhow!(
        "`fernetd agent` is being built (issue 4)"
    )))
}
