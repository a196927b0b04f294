//! `fernetd demo`: a throwaway CA, a rotator and N agents on loopback, rotating on
//! a short schedule; or, with `--config-only`, the same files written to disk with
//! the commands that start each process.

/// `fernetd demo ...`.
pub async fn main(args: &crate::cli::DemoArgs) -> Result<crate::cli::Answer, crate::cli::CliError> {
    let _ = args;
    Err(crate::cli::CliError::runtime(anyhow::anyhow!(
        "`fernetd demo` is being built (issue 4)"
    )))
}
