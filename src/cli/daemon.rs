//! What `fernetd rotator` and `fernetd agent` share before and after their role
//! runs: logging, the tokio runtime, binding listeners, the shutdown future
//! that SIGTERM or SIGINT resolves, and SIGHUP's meaning (reload, never death).

use std::net::SocketAddr;

use anyhow::Context as _;
use tokio::net::TcpListener;

use super::CliError;
use crate::config::LogFormat;

/// A multi-threaded runtime, for the commands that serve many peers at once
/// (the rotator: thousands of handshakes at start) or run a fleet (the demo).
pub(super) fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(CliError::runtime)
}

/// A runtime on the calling thread, for the commands that talk to a few peers:
/// an agent (its rotator, an admin, a metrics scraper; file work goes to
/// blocking threads as before) and a one-shot admin command. Worker threads
/// would only hand each other wake-ups: with a hundred agents on one host,
/// those context switches were a large part of a rotation's cost.
pub(super) fn single_thread_runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CliError::runtime)
}

pub(super) fn init_logging(format: LogFormat) {
    // notify logs its own bookkeeping at info and warn ("unable to remove watch
    // descriptor") whenever a watched directory is swapped out, i.e. on every
    // install; the watch errors that matter reach us as `Result`s instead.
    init_logging_with(format, "info,notify=error")
}

/// Logging with `default` as the filter when `FERNETD_LOG` is not set.
pub(super) fn init_logging_with(format: LogFormat, default: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("FERNETD_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second initialisation (tests calling `run` twice) is harmless: keep the first.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Binds a listener; a taken or forbidden address is the environment's (exit 3).
pub(super) async fn bind(addr: SocketAddr) -> Result<TcpListener, CliError> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))
        .map_err(CliError::runtime)
}

/// Binds the optional metrics listener.
pub(super) async fn bind_optional(
    addr: Option<SocketAddr>,
) -> Result<Option<TcpListener>, CliError> {
    match addr {
        Some(addr) => bind(addr).await.map(Some),
        None => Ok(None),
    }
}

/// `--check`: runs `checks`, printing each check that passed as it passes, then
/// `ok` or the refusal (and returns it, so the exit code is the daemon's own:
/// 2 for a configuration it would refuse).
pub(super) fn report_checks(
    config: &std::path::Path,
    checks: impl FnOnce(&mut dyn FnMut(String)) -> Result<(), CliError>,
) -> Result<super::Answer, CliError> {
    println!("checking {}", config.display());
    let mut note = |line: String| println!("  ok    {line}");
    match checks(&mut note) {
        Ok(()) => {
            println!("every start-up check passed; nothing was written");
            Ok(super::Answer::Yes)
        }
        Err(e) => {
            println!("  FAIL  {e}");
            Err(e)
        }
    }
}

/// Resolves on SIGTERM or SIGINT: what the daemons get as their shutdown future.
pub(super) async fn termination() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the process still ends on the default action.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}

/// Makes SIGHUP mean "reload" for the whole life of a daemon, whatever its
/// configuration: the default action of SIGHUP is to end the process, and a
/// daemon whose roles have nothing to reload (an agent without `audit_log`), or
/// that gets the signal before its role installed its own listener, would die
/// of `systemctl reload` or logrotate's postrotate (exit 129, which
/// `Restart=on-failure` would not even restart). Tokio installs the process's
/// handler once and keeps it, and each listener gets every signal, so the
/// roles' own reload listeners still see it. Must be called inside the runtime.
pub(super) fn hangup_is_reload(role: &'static str) {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::hangup()) {
        Ok(mut hup) => {
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    tracing::info!(role, "SIGHUP: reload requested");
                }
            });
        }
        Err(error) => tracing::warn!(%error, "cannot listen for SIGHUP: it would end the process"),
    }
}
