//! `fernetd completions SHELL` and `fernetd man --dir DIR`: shell completion
//! scripts and man pages generated from the same clap definitions as the
//! parser, so they cannot disagree with it. The Debian package runs both at
//! build time and installs the results in their standard places.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, CommandFactory as _};

use super::{Answer, Cli, CliError};

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(Debug, Args)]
pub struct ManArgs {
    /// Directory to write fernetd.1 and one page per subcommand into (created
    /// when missing).
    #[arg(long)]
    pub dir: PathBuf,
}

/// Prints the completion script for `args.shell` on standard output.
pub fn completions(args: &CompletionsArgs) -> Result<Answer, CliError> {
    let mut command = Cli::command();
    clap_complete::generate(args.shell, &mut command, "fernetd", &mut std::io::stdout());
    Ok(Answer::Yes)
}

/// Writes `fernetd.1` and `fernetd-SUBCOMMAND.1` (recursively) into `args.dir`.
pub fn man(args: &ManArgs) -> Result<Answer, CliError> {
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create {}", args.dir.display()))
        .map_err(CliError::runtime)?;
    clap_mangen::generate_to(Cli::command(), &args.dir)
        .with_context(|| format!("cannot write man pages into {}", args.dir.display()))
        .map_err(CliError::runtime)?;
    Ok(Answer::Yes)
}
