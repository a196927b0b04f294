//! `fernetd repo init|rotate|show|verify`.

use super::{Answer, CliError, RepoArgs};

pub fn run(args: &RepoArgs) -> Result<Answer, CliError> {
    let _ = args;
    Err(CliError::runtime(anyhow::anyhow!(
        "`fernetd repo` is being built (issue 2)"
    )))
}
