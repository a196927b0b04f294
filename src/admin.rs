//! The rotator's Admin gRPC service and the `fernetd admin` client: status,
//! rotation (with `--force`, `--dry-run`, waiting for acknowledgements), sync,
//! agent listing and the event stream.

/// `fernetd admin ...`.
pub async fn main(
    args: &crate::cli::AdminArgs,
) -> Result<crate::cli::Answer, crate::cli::CliError> {
    let _ = args;
    Err(crate::cli::CliError::runtime(anyhow::anyhow!(
        "`fernetd admin` is being built (issue 4)"
    )))
}
