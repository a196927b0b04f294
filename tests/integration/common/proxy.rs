//! A fault-injecting TCP proxy for the chaos tests. The kernel these tests run
//! on has no netem, so network faults between the rotator and an agent are
//! made here: the rotator is enrolled with the proxy's address, and TLS runs
//! through it end to end (the proxy only moves bytes, so identities are
//! unaffected).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does to the connections through it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Bytes flow.
    Pass,
    /// A partition that loses packets: bytes are held (in both directions, on
    /// existing and new connections) until the fault is lifted, as TCP would
    /// deliver them after retransmission.
    Stall,
    /// Existing connections are closed (FIN) and new ones closed on accept.
    Drop,
    /// Existing connections are reset (RST) and new ones reset on accept.
    Reset,
    /// Every chunk is delayed by this much.
    Delay(Duration),
    /// Requests flow, answers are held until the fault is lifted: what a
    /// client sees when its request lands and the answer is lost.
    Deaf,
}

impl Fault {
    fn cuts(self) -> bool {
        matches!(self, Fault::Drop | Fault::Reset)
    }
}

/// One proxy in front of one upstream address; stops when dropped.
pub struct Proxy {
    addr: SocketAddr,
    mode: watch::Sender<Fault>,
    connections: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on a fresh loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let (mode, rx) = watch::channel(Fault::Pass);
        let connections = Arc::new(AtomicU64::new(0));
        let count = connections.clone();
        let task = tokio::spawn(async move {
            // Dropping the set (when the proxy is dropped and this task aborted)
            // aborts every connection task with it.
            let mut open = tokio::task::JoinSet::new();
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                while open.try_join_next().is_some() {}
                count.fetch_add(1, Ordering::Relaxed);
                open.spawn(forward(client, upstream, rx.clone()));
            }
        });
        Proxy {
            addr,
            mode,
            connections,
            task,
        }
    }

    /// Where the rotator should connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn set(&self, fault: Fault) {
        self.mode.send_replace(fault);
    }

    pub fn fault(&self) -> Fault {
        *self.mode.borrow()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Why a direction stopped.
enum End {
    Closed,
    Cut(Fault),
}

async fn forward(client: TcpStream, upstream: SocketAddr, mut mode: watch::Receiver<Fault>) {
    let fault = *mode.borrow_and_update();
    if fault.cuts() {
        close(&client, fault);
        return;
    }
    let Ok(server) = TcpStream::connect(upstream).await else {
        // The agent is down: the rotator sees the connection close, as it
        // would see a refusal.
        return;
    };
    let (mut client, mut server) = (client, server);
    let end = {
        let (mut cr, mut cw) = client.split();
        let (mut sr, mut sw) = server.split();
        tokio::select! {
            end = pump(&mut cr, &mut sw, mode.clone(), false) => end,
            end = pump(&mut sr, &mut cw, mode.clone(), true) => end,
        }
    };
    if let End::Cut(fault) = end {
        close(&client, fault);
        close(&server, fault);
    }
    let _ = client.shutdown().await;
    let _ = server.shutdown().await;
}

/// With linger zero, dropping the socket sends RST instead of FIN.
fn close(stream: &TcpStream, fault: Fault) {
    if fault == Fault::Reset {
        let _ = stream.set_zero_linger();
    }
}

/// Moves bytes one way; `answers`: from the upstream to the client.
async fn pump<R, W>(
    from: &mut R,
    to: &mut W,
    mut mode: watch::Receiver<Fault>,
    answers: bool,
) -> End
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return End::Closed,
                Ok(n) => n,
            },
            changed = mode.changed() => {
                if changed.is_err() {
                    return End::Closed;
                }
                let fault = *mode.borrow_and_update();
                if fault.cuts() {
                    return End::Cut(fault);
                }
                continue;
            }
        };
        loop {
            let fault = *mode.borrow_and_update();
            match fault {
                Fault::Pass => break,
                Fault::Deaf if !answers => break,
                Fault::Drop | Fault::Reset => return End::Cut(fault),
                Fault::Delay(d) => {
                    tokio::time::sleep(d).await;
                    break;
                }
                Fault::Stall | Fault::Deaf => {
                    if mode.changed().await.is_err() {
                        return End::Closed;
                    }
                }
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return End::Closed;
        }
    }
}
