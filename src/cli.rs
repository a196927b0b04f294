//! The command line: argument types (clap derive), one `main` per subcommand
//! (`cli/*.rs`), the daemons' shared bootstrap (`cli/daemon.rs`: logging,
//! listeners, signals) and the mapping of outcomes to exit codes (0 success,
//! 1 a negative answer, 2 usage or configuration error, 3 runtime failure).
//! This is the binary's edge: the only module that knows clap, `anyhow` and exit
//! codes, and nothing in the library imports it.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::builder::{PossibleValuesParser, TypedValueParser as _};
use clap::{Args, Parser, Subcommand};

use crate::config::LogFormat;

mod admin;
mod agent;
mod completions;
mod daemon;
mod demo;
mod repo;
mod rotator;
mod token;

/// Rotate Keystone Fernet keys and distribute them to every region, safely.
#[derive(Debug, Parser)]
#[command(name = "fernetd", version, about)]
pub struct Cli {
    /// Log format on standard error.
    #[arg(
        long,
        global = true,
        default_value = "text",
        env = "FERNETD_LOG_FORMAT",
        value_parser = PossibleValuesParser::new(["text", "json"]).map(|s| match s.as_str() {
            "json" => LogFormat::Json,
            _ => LogFormat::Text,
        })
    )]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the primary rotator.
    Rotator(RotatorArgs),
    /// Run a regional agent.
    Agent(AgentArgs),
    /// Talk to the rotator's Admin API.
    Admin(AdminArgs),
    /// Manage a local key repository.
    Repo(RepoArgs),
    /// Inspect or validate Keystone Fernet tokens.
    Token(TokenArgs),
    /// Run a rotator and agents on loopback (or write their configuration).
    Demo(DemoArgs),
    /// Print a shell completion script on standard output.
    Completions(completions::CompletionsArgs),
    /// Write the man pages (fernetd.1 and one per subcommand) into a directory.
    #[command(hide = true)]
    Man(completions::ManArgs),
}

#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// Configuration file (TOML).
    #[arg(long, short)]
    pub config: PathBuf,
    /// Run every start-up check, print each, write nothing and exit: 0 when the
    /// daemon would start, 2 when it would refuse the configuration.
    #[arg(long)]
    pub check: bool,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    #[command(flatten)]
    pub daemon: DaemonArgs,
    /// Answer whether the running agent reported ready (its `[readiness]
    /// record`), for a container's readiness probe: exit 0 when the rotator
    /// confirmed every repository, or the configured wait ran out, and the
    /// repositories on disk still hold what it reported; 1 otherwise.
    #[arg(long, conflicts_with = "check")]
    pub ready: bool,
    /// With --ready: a readiness reached only because the wait ran out
    /// (rotator unreachable) answers 1.
    #[arg(long, requires = "ready")]
    pub require_current: bool,
}

#[derive(Debug, Args)]
pub struct RotatorArgs {
    #[command(flatten)]
    pub daemon: DaemonArgs,
    /// Start at generation 1 even though there is no state and enrolled agents
    /// hold generations (they will refuse it as a rollback until restored). The
    /// way back from a lost state directory is `import`, which continues at the
    /// generation of the imported repository's stamp.
    #[arg(long)]
    pub fresh_start: bool,
    /// With `seal_key` (or `[ha]`), adopt a state file found in the clear and
    /// seal it at once, instead of refusing it: for moving a clear state to
    /// sealing or into etcd on purpose. Logged; use it for one start only.
    #[arg(long)]
    pub adopt_clear_state: bool,
}

#[derive(Debug, Args)]
pub struct AdminArgs {
    /// Admin client configuration file (TOML).
    #[arg(long, short)]
    pub config: PathBuf,
    /// Print machine-readable JSON.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: AdminCommand,
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Generations, digests and per-agent state.
    Status,
    /// Rotate now.
    Rotate {
        /// Rotate although some agents have not acknowledged the current
        /// generation (they will reject tokens of the new primary); asks for
        /// confirmation unless --yes.
        #[arg(long)]
        force: bool,
        /// Confirm --force without a prompt.
        #[arg(long)]
        yes: bool,
        /// Only this repository (repeatable); default: every repository.
        #[arg(long = "repository", value_name = "NAME")]
        repositories: Vec<String>,
        /// Say what would happen without changing anything.
        #[arg(long)]
        dry_run: bool,
        /// Return once committed, without waiting for acknowledgements.
        #[arg(long)]
        no_wait: bool,
        /// How long to wait for every acknowledgement, in seconds.
        #[arg(long, default_value_t = 60)]
        wait: u64,
    },
    /// Emergency: remove one (compromised) key from every region now. Every
    /// token it signed stops validating; asks for confirmation unless --yes.
    PurgeKey {
        /// The repository holding the key.
        #[arg(long)]
        repository: String,
        /// The key's index (its file name).
        #[arg(long)]
        index: u32,
        /// Confirm without a prompt.
        #[arg(long)]
        yes: bool,
        /// Purge although some agents have not acknowledged the current generation.
        #[arg(long)]
        force: bool,
        /// How long to wait for every acknowledgement, in seconds.
        #[arg(long, default_value_t = 60)]
        wait: u64,
    },
    /// Stop pinning the keys of a quarantined agent that will not come back
    /// (`[fanout] quarantine_after`); they are then purged by the usual
    /// key-lifetime rule. Asks for confirmation unless --yes.
    Evict {
        /// The agent's name (its region when it is the region's only agent).
        agent: String,
        /// Confirm without a prompt.
        #[arg(long)]
        yes: bool,
    },
    /// Re-push the current generation to every agent that differs.
    Sync {
        /// How long to wait, in seconds.
        #[arg(long, default_value_t = 60)]
        wait: u64,
    },
    /// List enrolled agents.
    Agents,
    /// The credential repository's migrate workflow: rows of the shared
    /// credential table by key, the last migrate, the next safe rotation.
    Credentials,
}

#[derive(Debug, Args)]
pub struct RepoArgs {
    #[command(subcommand)]
    pub command: RepoCommand,
    /// The key repository directory.
    #[arg(long, global = true)]
    pub repository: Option<PathBuf>,
    /// Keys to keep, the staged key included (Keystone's `max_active_keys`;
    /// default: keystone.conf's with --keystone-conf, else 3).
    #[arg(long, global = true)]
    pub max_active_keys: Option<usize>,
    /// The region's keystone.conf: `max_active_keys` is read from it.
    #[arg(long, global = true)]
    pub keystone_conf: Option<PathBuf>,
    /// Rotate a repository a fernetd agent manages (it carries its stamp): the
    /// stamp is dropped and the rotator's next push puts its generation back.
    #[arg(long, global = true)]
    pub force: bool,
    /// Owner of written files, as USER:GROUP (names or numeric ids).
    #[arg(long, global = true)]
    pub owner: Option<String>,
    /// Print machine-readable JSON.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, Subcommand)]
pub enum RepoCommand {
    /// Create a repository with a staged and a primary key (`keystone-manage fernet_setup`).
    Init,
    /// Rotate once (`keystone-manage fernet_rotate`).
    Rotate,
    /// Show each key's index and role, and the digest (never the keys).
    Show,
    /// Check the repository as Keystone would use it; exit 1 on any problem.
    Verify,
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    #[command(subcommand)]
    pub command: TokenCommand,
    /// The key repository directory.
    #[arg(long, global = true)]
    pub repository: Option<PathBuf>,
    /// Print machine-readable JSON.
    #[arg(long, global = true)]
    pub json: bool,
    /// Keystone's `[auth] methods`, comma-separated, in order.
    #[arg(long, global = true)]
    pub methods: Option<String>,
    /// The clock to check expiry against (RFC 3339), instead of now.
    #[arg(long, global = true)]
    pub now: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Decode a token and show its payload, even when expired.
    Inspect {
        /// The token, or `-` to read one per line from standard input.
        token: String,
    },
    /// Validate a token: exit 0 when valid, 1 when invalid or expired.
    Validate {
        /// The token, or `-` to read one per line from standard input.
        token: String,
    },
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Where to put the CA, configuration and repositories (default: a temporary directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// How many regions.
    #[arg(long, default_value_t = 3)]
    pub regions: usize,
    /// Agents (controllers, each with its own repository) per region.
    #[arg(long, default_value_t = 1)]
    pub controllers: usize,
    /// Only write the files and print the commands that start each process.
    #[arg(long)]
    pub config_only: bool,
    /// Stop after this many rotations have reached every region (the fourth
    /// shows the first demo token expiring with its key).
    #[arg(long, default_value_t = 4)]
    pub rotations: u64,
}

/// Why a command failed, and so which exit code it gets.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad flags or configuration: exit 2.
    #[error("{0:#}")]
    Usage(anyhow::Error),
    /// Anything that went wrong while doing the work: exit 3.
    #[error("{0:#}")]
    Runtime(anyhow::Error),
}

impl CliError {
    pub fn usage(e: impl Into<anyhow::Error>) -> Self {
        CliError::Usage(e.into())
    }

    pub fn runtime(e: impl Into<anyhow::Error>) -> Self {
        CliError::Runtime(e.into())
    }

    /// A role's error: the operator's configuration to fix when it says so
    /// (exit 2), the environment's otherwise (exit 3).
    fn role<E: RoleError>(e: E) -> Self {
        if e.is_config() {
            CliError::Usage(e.into())
        } else {
            CliError::Runtime(e.into())
        }
    }

    fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => 2,
            CliError::Runtime(_) => 3,
        }
    }
}

/// A role's error, which knows whether the configuration is at fault.
trait RoleError: std::error::Error + Send + Sync + 'static {
    fn is_config(&self) -> bool;
}

impl RoleError for crate::rotator::RotatorError {
    fn is_config(&self) -> bool {
        crate::rotator::RotatorError::is_config(self)
    }
}

impl RoleError for crate::agent::AgentError {
    fn is_config(&self) -> bool {
        crate::agent::AgentError::is_config(self)
    }
}

/// What a command that ran to completion answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Exit 0.
    Yes,
    /// Exit 1: invalid token, verification failed.
    No,
}

/// Runs a parsed command line to completion and returns the process exit code.
pub fn run(cli: Cli) -> ExitCode {
    let format = cli.log_format;
    // The agent may name its log format in its configuration file, so it
    // initialises logging itself once that file is read.
    match cli.command {
        Command::Agent(_) => {}
        // The demo narrates on standard output; its daemons' logs would drown it.
        Command::Demo(_) => daemon::init_logging_with(format, "warn,notify=error"),
        _ => daemon::init_logging(format),
    }
    match dispatch(cli.command, format) {
        Ok(Answer::Yes) => ExitCode::SUCCESS,
        Ok(Answer::No) => ExitCode::from(1),
        Err(error) => {
            eprintln!("fernetd: error: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}

fn dispatch(command: Command, log_format: LogFormat) -> Result<Answer, CliError> {
    match command {
        Command::Repo(args) => repo::run(&args),
        Command::Token(args) => token::run(&args),
        Command::Rotator(args) => daemon::runtime()?.block_on(rotator::main(&args)),
        Command::Agent(args) => {
            daemon::single_thread_runtime()?.block_on(agent::main(&args, log_format))
        }
        Command::Admin(args) => daemon::single_thread_runtime()?.block_on(admin::main(&args)),
        Command::Demo(args) => daemon::runtime()?.block_on(demo::main(&args)),
        Command::Completions(args) => completions::completions(&args),
        Command::Man(args) => completions::man(&args),
    }
}
