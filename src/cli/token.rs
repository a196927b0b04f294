//! `fernetd token inspect|validate`.

use super::{Answer, CliError, TokenArgs};

pub fn run(args: &TokenArgs) -> Result<Answer, CliError> {
    let _ = args;
    Err(CliError::runtime(anyhow::anyhow!(
        "`fernetd token` is being built (issue 3)"
    )))
}
