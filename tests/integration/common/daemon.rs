//! Spawning real `fernetd` daemons for tests: each process logs to its own file
//! (kept under the cargo target tmpdir so a failed test can be read afterwards
//! and a suite-wide test can search every log), is polled for readiness through
//! the standard gRPC health service over mTLS, and is killed when dropped.

use std::ffi::OsStr;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// How long a daemon gets to become ready, or to exit after SIGTERM.
pub const STARTUP: Duration = Duration::from_secs(30);

/// Where every daemon log of this test build is written.
pub fn logs_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("daemon-logs")
}

/// A loopback address with a port free at this moment. The port is released
/// before returning so the daemon can bind it; the kernel does not hand the same
/// ephemeral port out again immediately, which keeps the window small.
pub fn free_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local address")
}

/// A running `fernetd` process.
pub struct Daemon {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    /// Starts `fernetd ARGS...` with standard output and error appended to a
    /// fresh log file named after `name`.
    pub fn spawn<I, S>(name: &str, args: I) -> Daemon
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Daemon::spawn_with_env(name, args, &[])
    }

    /// [`Daemon::spawn`] with extra environment variables (a preloaded
    /// library, a clock offset).
    pub fn spawn_with_env<I, S>(name: &str, args: I, env: &[(String, String)]) -> Daemon
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Daemon::spawn_wrapped(name, &[], args, env)
    }

    /// [`Daemon::spawn_with_env`] through `wrapper` (a command and its
    /// arguments, say `setpriv --reuid=...`) that ends by running fernetd.
    pub fn spawn_wrapped<I, S>(
        name: &str,
        wrapper: &[&str],
        args: I,
        env: &[(String, String)],
    ) -> Daemon
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let dir = logs_dir();
        std::fs::create_dir_all(&dir).expect("create the daemon log directory");
        let log = dir.join(format!(
            "{name}-{}-{}.log",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let out = std::fs::File::create(&log).expect("create daemon log");
        let err = out.try_clone().expect("clone log handle");
        let mut command = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(super::fernetd_bin());
                c
            }
            None => Command::new(super::fernetd_bin()),
        };
        let child = command
            .args(args)
            .env("FERNETD_LOG", "info,fernetd=debug")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn fernetd");
        Daemon {
            name: name.to_string(),
            child: Some(child),
            log,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything the process has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon already reaped").id()
    }

    /// Sends `signal` (SIGTERM, SIGSTOP, SIGCONT, SIGKILL ...).
    pub fn signal(&self, signal: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.pid() as i32).expect("non-zero pid");
        rustix::process::kill_process(pid, signal).expect("signal the daemon");
    }

    /// The exit status, if the process has exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().expect("poll the daemon")
    }

    /// Waits up to `timeout` for the process to exit. Async so that this
    /// test's own gRPC connections keep being served meanwhile (a draining
    /// daemon waits for its peers to answer its GOAWAY).
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then waits for a clean exit and returns its status; panics with
    /// the log when the daemon does not stop in time.
    pub async fn stop(&mut self) -> ExitStatus {
        self.signal(rustix::process::Signal::TERM);
        match self.wait_exit(STARTUP).await {
            Some(status) => status,
            None => panic!(
                "{} did not exit after SIGTERM; log:\n{}",
                self.name,
                self.log()
            ),
        }
    }

    /// SIGKILL and reap, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Polls `grpc.health.v1.Health/Check(service)` at `addr` over mTLS until it
    /// answers SERVING; panics with the log if the process exits or `STARTUP`
    /// passes first.
    pub async fn wait_healthy(&mut self, addr: SocketAddr, tls: ClientTlsConfig, service: &str) {
        let deadline = Instant::now() + STARTUP;
        loop {
            if let Some(status) = self.try_exit() {
                panic!(
                    "{} exited ({status}) before it was ready; log:\n{}",
                    self.name,
                    self.log()
                );
            }
            let last = match health_check(addr, tls.clone(), service).await {
                Ok(ServingStatus::Serving) => return,
                Ok(other) => format!("status {other:?}"),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                panic!(
                    "{} not ready at {addr} after {STARTUP:?} ({last}); log:\n{}",
                    self.name,
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A channel to `addr` over TLS, connected now (so errors show up here).
pub async fn connect(
    addr: SocketAddr,
    tls: ClientTlsConfig,
) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_shared(format!("https://{addr}"))
        .expect("endpoint URI")
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        // Generous: an install fsyncs, and a loaded CI disk can stall for seconds.
        .timeout(Duration::from_secs(30))
        .connect()
        .await
}

/// One health check; the error is a printable reason.
pub async fn health_check(
    addr: SocketAddr,
    tls: ClientTlsConfig,
    service: &str,
) -> Result<ServingStatus, String> {
    let channel = connect(addr, tls)
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_string(),
        })
        .await
        .map_err(|s| format!("check: {s}"))?;
    Ok(response.into_inner().status())
}

/// Polls `check` every 20 ms until it returns `Some`, or panics with `what`
/// after `timeout`.
pub async fn poll_until<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
