//! Real Keystone 30.0.0 for tests: the project's virtualenv, made on first use by
//! `keystone/setup-venv.sh`. A test that needs Keystone fails loudly when it cannot
//! be set up; it never skips.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The virtualenv directory, set up once per test process.
pub fn venv() -> &'static Path {
    static VENV: OnceLock<PathBuf> = OnceLock::new();
    VENV.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let out = Command::new("bash")
            .arg(root.join("keystone/setup-venv.sh"))
            .output()
            .expect("run keystone/setup-venv.sh");
        assert!(
            out.status.success(),
            "Keystone virtualenv set-up failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8(out.stdout).expect("utf-8 path").trim())
    })
}

/// The virtualenv's Python interpreter.
pub fn python() -> PathBuf {
    venv().join("bin/python")
}

/// `keystone-manage` from the virtualenv.
pub fn keystone_manage() -> PathBuf {
    venv().join("bin/keystone-manage")
}

/// Runs `python -c SCRIPT ARGS...` in the virtualenv and returns its output,
/// panicking with stderr when it fails.
pub fn run_python(script: &str, args: &[&str]) -> Output {
    let out = Command::new(python())
        .arg("-c")
        .arg(script)
        .args(args)
        .env("PYTHONWARNINGS", "ignore")
        .output()
        .expect("start the virtualenv's python");
    assert!(
        out.status.success(),
        "python failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

// ---------------------------------------------------------------------------
// A regional Keystone served by the bundle (keystone/run-keystone.sh under
// gunicorn), its configuration rendered from keystone/keystone.conf.template,
// and a tiny HTTP/1.1 client to talk to it.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// The bundle directory, `keystone/` at the crate root.
pub fn bundle() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("keystone")
}

/// Runs `cmd` to completion, panicking with its output unless it succeeds.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("start {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Renders the bundle's template with `keystone/render-conf.sh NAME=VALUE...` into
/// `out`, then appends `extra` (test-only sections; oslo.config merges repeated
/// sections, later values winning).
pub fn render_conf(out: &Path, values: &[(&str, &str)], extra: &str) {
    let mut text = run_ok(
        Command::new("bash")
            .arg(bundle().join("render-conf.sh"))
            .args(values.iter().map(|(k, v)| format!("{k}={v}"))),
    )
    .stdout;
    text.extend_from_slice(extra.as_bytes());
    std::fs::write(out, text).expect("write keystone.conf");
}

/// Runs `keystone-manage --config-file CONF ARGS...`, panicking with its output on failure.
pub fn manage(conf: &Path, args: &[&str]) {
    run_ok(
        Command::new(keystone_manage())
            .arg("--config-file")
            .arg(conf)
            .args(args)
            .env("PYTHONWARNINGS", "ignore"),
    );
}

/// The admin user `bootstrap` creates, and its password.
pub const ADMIN: (&str, &str) = ("admin", "fernetd-e2e-password");

/// Creates the shared identity database: schema, credential keys, the admin
/// user, project and role. Keystone's bootstrap needs the configured receipts
/// repository to be usable already.
pub fn bootstrap(conf: &Path) {
    manage(conf, &["db_sync"]);
    manage(
        conf,
        &[
            "bootstrap",
            "--bootstrap-password",
            ADMIN.1,
            "--bootstrap-region-id",
            "RegionOne",
        ],
    );
}

/// One gunicorn-served Keystone on 127.0.0.1 at a port the kernel chose; SIGTERM
/// (then SIGKILL) on drop.
pub struct Keystone {
    child: Child,
    pub addr: SocketAddr,
    pub log: PathBuf,
}

impl Keystone {
    /// Starts `keystone/run-keystone.sh --config CONF` with `workers` sync workers
    /// and waits for `GET /v3` to answer 200.
    pub fn start(conf: &Path, log: &Path, workers: u32) -> Keystone {
        let log_file = std::fs::File::create(log).expect("create Keystone log");
        let child = Command::new("bash")
            .arg(bundle().join("run-keystone.sh"))
            .arg("--config")
            .arg(conf)
            .args(["--bind", "127.0.0.1:0", "--workers", &workers.to_string()])
            .arg("--venv")
            .arg(venv())
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("clone log handle"))
            .stderr(log_file)
            .spawn()
            .expect("start keystone/run-keystone.sh");
        let mut keystone = Keystone {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            log: log.to_owned(),
        };
        keystone.addr = keystone.wait_listening();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match http(keystone.addr, "GET", "/v3", &[], None) {
                Ok(r) if r.status == 200 => break,
                other => {
                    keystone.assert_running();
                    assert!(
                        Instant::now() < deadline,
                        "Keystone never answered GET /v3: {other:?}\n{}",
                        keystone.log_text()
                    );
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        keystone
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("Keystone exited ({status}):\n{}", self.log_text());
        }
    }

    /// gunicorn logs `Listening at: http://127.0.0.1:PORT` once bound.
    fn wait_listening(&mut self) -> SocketAddr {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = self.log_text();
            if let Some(rest) = text.split("Listening at: http://").nth(1) {
                let addr = rest.split_whitespace().next().unwrap_or_default();
                return addr
                    .parse()
                    .unwrap_or_else(|e| panic!("gunicorn address {addr:?}: {e}"));
            }
            self.assert_running();
            assert!(
                Instant::now() < deadline,
                "gunicorn never listened:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A client for this Keystone (copyable to other threads).
    pub fn client(&self) -> Client {
        Client::new(self.addr)
    }
}

/// Talks to one Keystone's public API.
#[derive(Debug, Clone, Copy)]
pub struct Client {
    pub addr: SocketAddr,
}

impl Client {
    pub fn new(addr: SocketAddr) -> Client {
        Client { addr }
    }

    /// Issues a token for the bootstrap admin by password: project-scoped to
    /// `project`, or unscoped (validated without role look-ups, about 20 times
    /// cheaper for Keystone, and encrypted with the same key).
    pub fn issue(&self, project: Option<&str>) -> Result<String, String> {
        let mut auth = serde_json::json!({
            "identity": {"methods": ["password"], "password": {"user": {
                "name": ADMIN.0, "domain": {"id": "default"}, "password": ADMIN.1}}}
        });
        if let Some(project) = project {
            auth["scope"] =
                serde_json::json!({"project": {"name": project, "domain": {"id": "default"}}});
        }
        let body = serde_json::json!({ "auth": auth }).to_string();
        let r = http(
            self.addr,
            "POST",
            "/v3/auth/tokens",
            &[("Content-Type", "application/json")],
            Some(&body),
        )
        .map_err(|e| format!("POST /v3/auth/tokens at {}: {e}", self.addr))?;
        match (r.status, r.header("x-subject-token")) {
            (201, Some(token)) => Ok(token.to_owned()),
            _ => Err(format!(
                "POST /v3/auth/tokens at {}: {} {}",
                self.addr, r.status, r.body
            )),
        }
    }

    /// `GET /v3/auth/tokens?nocatalog` for `subject`, authenticated by `auth`.
    pub fn validate(&self, auth: &str, subject: &str) -> std::io::Result<Response> {
        http(
            self.addr,
            "GET",
            "/v3/auth/tokens?nocatalog",
            &[("X-Auth-Token", auth), ("X-Subject-Token", subject)],
            None,
        )
    }
}

impl Drop for Keystone {
    fn drop(&mut self) {
        let pid = rustix::process::Pid::from_child(&self.child);
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP response: status, headers (names lower-cased) and body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request with `Connection: close` (so the body ends at EOF).
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> std::io::Result<Response> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAccept: application/json\r\n"
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    let body = body.unwrap_or("");
    request.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    stream.write_all(request.as_bytes())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let bad = |what: &str| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("malformed HTTP response: {what}"),
        )
    };
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| bad("no header end"))?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("status line"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok(Response {
        status,
        headers,
        body: body.to_owned(),
    })
}

/// The token policy rendered into every test region's keystone.conf.
#[derive(Debug, Clone, Copy)]
pub struct TestPolicy {
    pub expiration: u64,
    pub allow_expired_window: u64,
    pub max_active_keys: usize,
}

/// Regions sharing one SQLite identity database, each Keystone reading its own
/// key repository. Bootstrapped through the first region's configuration, whose
/// repository must already hold keys.
pub struct Regions {
    pub confs: Vec<PathBuf>,
    pub keystones: Vec<Keystone>,
}

impl Regions {
    /// Renders one keystone.conf per region, each reading its own repository
    /// and all sharing `dir/keystone.db` and `dir/credential-keys`.
    pub fn configure(dir: &Path, repos: &[PathBuf], policy: TestPolicy) -> Vec<PathBuf> {
        let db = dir.join("keystone.db");
        let credential = dir.join("credential-keys");
        std::fs::create_dir_all(&credential).expect("create credential repository");
        repos
            .iter()
            .enumerate()
            .map(|(i, repo)| {
                let conf = dir.join(format!("keystone-{i}.conf"));
                region_conf(&conf, &db, repo, &credential, policy);
                conf
            })
            .collect()
    }

    /// Sets up the shared database through the first region's configuration
    /// (whose repository must hold keys by now) and starts every Keystone.
    pub fn launch(dir: &Path, confs: Vec<PathBuf>, workers: u32) -> Regions {
        let user = nix::unistd::User::from_uid(nix::unistd::getuid())
            .ok()
            .flatten()
            .map_or_else(|| "root".to_owned(), |u| u.name);
        let group = nix::unistd::Group::from_gid(nix::unistd::getgid())
            .ok()
            .flatten()
            .map_or_else(|| "root".to_owned(), |g| g.name);
        manage(
            &confs[0],
            &[
                "credential_setup",
                "--keystone-user",
                &user,
                "--keystone-group",
                &group,
            ],
        );
        bootstrap(&confs[0]);
        let keystones = confs
            .iter()
            .enumerate()
            .map(|(i, conf)| Keystone::start(conf, &dir.join(format!("keystone-{i}.log")), workers))
            .collect::<Vec<_>>();
        // One login per region, one at a time, before any concurrent traffic: the
        // first login of the day writes the user's `last_active_at`, and three
        // first logins at once deadlock on the shared SQLite file ("database is
        // locked", HTTP 500) — a test artefact a real shared database does not have.
        for k in &keystones {
            if let Err(e) = k.client().issue(None) {
                panic!("warm-up login at {}: {e}", k.addr);
            }
        }
        Regions { confs, keystones }
    }

    /// [`Regions::configure`] then [`Regions::launch`].
    pub fn start(dir: &Path, repos: &[PathBuf], policy: TestPolicy, workers: u32) -> Regions {
        let confs = Regions::configure(dir, repos, policy);
        Regions::launch(dir, confs, workers)
    }

    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.keystones.iter().map(|k| k.addr).collect()
    }
}

/// Renders one region's keystone.conf at `conf`: the shared SQLite database
/// `db`, its token repository `tokens` and credential repository `credential`,
/// the token `policy`, and no cache.
pub fn region_conf(conf: &Path, db: &Path, tokens: &Path, credential: &Path, policy: TestPolicy) {
    render_conf(
        conf,
        &[
            // Every password login writes `last_active_at`; with three Keystones on one
            // SQLite file, writers must wait for the lock rather than fail after 5 s.
            (
                "DATABASE_CONNECTION",
                &format!("sqlite:///{}?timeout=60", db.display()),
            ),
            ("KEY_REPOSITORY", &tokens.display().to_string()),
            (
                "CREDENTIAL_KEY_REPOSITORY",
                &credential.display().to_string(),
            ),
            ("TOKEN_EXPIRATION", &policy.expiration.to_string()),
            (
                "ALLOW_EXPIRED_WINDOW",
                &policy.allow_expired_window.to_string(),
            ),
            ("MAX_ACTIVE_KEYS", &policy.max_active_keys.to_string()),
            // A cache would hide key problems from the test (KEYSTONE-NOTES).
            ("CACHE_ENABLED", "false"),
        ],
        // The cheapest bcrypt Keystone allows: password checks are not under test.
        "\n[identity]\npassword_hash_rounds = 4\n",
    );
}

/// Polls `check` every 100 ms until it returns `Some`, or panics with `what`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Serializes the tests that run several Keystones: on two cores, two of them
/// at once would starve each other into timeouts.
pub fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());
    HEAVY
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
