//! A real three-member etcd cluster on loopback for the HA tests: Debian's
//! `etcd-server` (installed here when `etcd` is missing; a failed install
//! fails the test, it never skips), ports chosen at run time, one data
//! directory per member in the test's temporary directory, every member
//! killed when dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::daemon::{free_addr, logs_dir, poll_until};

/// The `etcd` binary, installed from Debian's `etcd-server` when missing.
pub fn etcd_bin() -> PathBuf {
    let found = |p: &str| Path::new(p).exists().then(|| PathBuf::from(p));
    super::debian::ensure("etcd-server", || found("/usr/bin/etcd").is_some());
    found("/usr/bin/etcd").expect("etcd-server installed /usr/bin/etcd")
}

struct Member {
    name: String,
    client: SocketAddr,
    peer: SocketAddr,
    data: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// Three etcd members on loopback.
pub struct Etcd {
    members: Vec<Member>,
    cluster: String,
}

impl Etcd {
    /// Starts three members in `dir` and waits until the cluster answers.
    pub async fn start(dir: &Path) -> Etcd {
        let bin = etcd_bin();
        let members: Vec<Member> = (0..3)
            .map(|i| Member {
                name: format!("m{i}"),
                client: free_addr(),
                peer: free_addr(),
                data: dir.join(format!("etcd-m{i}")),
                log: logs_dir().join(format!(
                    "etcd-m{i}-{}-{}.log",
                    std::process::id(),
                    rand::random::<u32>()
                )),
                child: None,
            })
            .collect();
        let cluster = members
            .iter()
            .map(|m| format!("{}=http://{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let mut etcd = Etcd { members, cluster };
        for i in 0..3 {
            etcd.spawn(&bin, i);
        }
        etcd.wait_ready().await;
        etcd
    }

    fn spawn(&mut self, bin: &Path, i: usize) {
        let cluster = self.cluster.clone();
        let m = &mut self.members[i];
        std::fs::create_dir_all(logs_dir()).expect("log directory");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)
            .expect("etcd log");
        let err = out.try_clone().expect("clone log");
        let child = Command::new(bin)
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&m.data)
            .args([
                "--listen-client-urls",
                &format!("http://{}", m.client),
                "--advertise-client-urls",
                &format!("http://{}", m.client),
                "--listen-peer-urls",
                &format!("http://{}", m.peer),
                "--initial-advertise-peer-urls",
                &format!("http://{}", m.peer),
                "--initial-cluster",
                &cluster,
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                "fernetd-test",
                "--heartbeat-interval",
                "50",
                "--election-timeout",
                "500",
            ])
            .env_clear()
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn etcd");
        m.child = Some(child);
    }

    /// The client URLs, for `[ha] endpoints`.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://{}", m.client))
            .collect()
    }

    /// A client of the cluster, for the tests' own reads.
    pub async fn client(&self) -> etcd_client::Client {
        let options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5));
        etcd_client::Client::connect(self.endpoints(), Some(options))
            .await
            .expect("connect to etcd")
    }

    async fn wait_ready(&self) {
        poll_until(Duration::from_secs(60), "etcd to answer", || async {
            let mut client = etcd_client::Client::connect(
                self.endpoints(),
                Some(
                    etcd_client::ConnectOptions::new()
                        .with_connect_timeout(Duration::from_millis(500))
                        .with_timeout(Duration::from_secs(1)),
                ),
            )
            .await
            .ok()?;
            client.put("/fernetd-test/ready", "1", None).await.ok()
        })
        .await;
    }

    /// Sends `signal` to every member (SIGSTOP makes etcd unreachable
    /// without losing its data; SIGCONT brings it back).
    pub fn signal_all(&self, signal: rustix::process::Signal) {
        for m in &self.members {
            if let Some(child) = &m.child {
                let pid = rustix::process::Pid::from_raw(child.id() as i32).expect("pid");
                let _ = rustix::process::kill_process(pid, signal);
            }
        }
    }

    /// Waits until the cluster answers again.
    pub async fn wait_answering(&self) {
        self.wait_ready().await;
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.signal_all(rustix::process::Signal::CONT);
        for m in &mut self.members {
            if let Some(mut child) = m.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}
