//! The `fernetd` binary: parses the command line and hands it to the library.
#![forbid(unsafe_code)]

use clap::Parser;

fn main() -> std::process::ExitCode {
    fernetd::cli::run(fernetd::cli::Cli::parse())
}
