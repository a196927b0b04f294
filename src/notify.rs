//! systemd's notify protocol (`sd_notify(3)`), as `Type=notify` services speak
//! it: newline-separated `KEY=value` assignments in one AF_UNIX datagram sent to
//! the socket named by `$NOTIFY_SOCKET`, a file-system path or, when it starts
//! with `@`, a name in Linux's abstract namespace. std's `UnixDatagram` does it
//! without unsafe code and without a dependency; a supervisor that set no
//! socket (a container, a test, a shell) gets nothing sent.

use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Why `$NOTIFY_SOCKET` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("NOTIFY_SOCKET {0:?} is neither an absolute path nor an abstract name (@...)")]
    Address(String),
    #[error("NOTIFY_SOCKET {socket:?}")]
    Io {
        socket: String,
        #[source]
        source: std::io::Error,
    },
}

/// The supervisor's notification socket.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
    name: String,
}

impl Notifier {
    /// The socket `$NOTIFY_SOCKET` names; `Ok(None)` when it is unset or empty.
    pub fn from_env() -> Result<Option<Self>, NotifyError> {
        match std::env::var_os("NOTIFY_SOCKET") {
            None => Ok(None),
            Some(name) if name.is_empty() => Ok(None),
            Some(name) => Self::to(&name.to_string_lossy()).map(Some),
        }
    }

    /// A notifier sending to `name` (a path, or `@abstract`).
    pub fn to(name: &str) -> Result<Self, NotifyError> {
        let io = |source| NotifyError::Io {
            socket: name.to_owned(),
            source,
        };
        let addr = if let Some(abstract_name) = name.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(abstract_name.as_bytes()).map_err(io)?
        } else if name.starts_with('/') {
            SocketAddr::from_pathname(name).map_err(io)?
        } else {
            return Err(NotifyError::Address(name.to_owned()));
        };
        let socket = UnixDatagram::unbound().map_err(io)?;
        // A supervisor that stopped reading must never block the agent.
        socket.set_nonblocking(true).map_err(io)?;
        Ok(Notifier {
            socket,
            addr,
            name: name.to_owned(),
        })
    }

    /// Sends `state` (for example `"READY=1\nSTATUS=serving"`) in one datagram.
    pub fn send(&self, state: &str) -> Result<(), NotifyError> {
        self.socket
            .send_to_addr(state.as_bytes(), &self.addr)
            .map(drop)
            .map_err(|source| NotifyError::Io {
                socket: self.name.clone(),
                source,
            })
    }
}

/// One line of a `STATUS=` value: the protocol separates assignments by
/// newlines, so a newline in free text would start a bogus one.
pub fn status_text(text: &str) -> String {
    text.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagrams_reach_path_and_abstract_sockets() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let receiver = UnixDatagram::bind(&path).expect("bind");
        let notifier = Notifier::to(path.to_str().expect("utf-8")).expect("path socket");
        notifier.send("READY=1\nSTATUS=up").expect("sent");
        let mut buf = [0u8; 64];
        let n = receiver.recv(&mut buf).expect("received");
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=up");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("fernetd-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract");
        let receiver = UnixDatagram::bind_addr(&addr).expect("bind abstract");
        Notifier::to(&format!("@{name}"))
            .expect("abstract socket")
            .send("STATUS=waiting")
            .expect("sent");
        let n = receiver.recv(&mut buf).expect("received");
        assert_eq!(&buf[..n], b"STATUS=waiting");
    }

    #[test]
    fn relative_names_are_refused_and_status_stays_one_line() {
        assert!(matches!(
            Notifier::to("notify.sock"),
            Err(NotifyError::Address(_))
        ));
        assert_eq!(status_text("a\nb\rc"), "a b c");
    }
}
