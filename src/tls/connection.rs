//! One lazily dialled HTTP/2 connection to one peer, for a client that talks to
//! thousands of peers one call at a time (the rotator's fan-out).
//!
//! tonic's `Channel` puts a `tower::buffer` in front of every connection: an mpsc
//! channel (its first block alone is 8 KiB), a worker task, a reconnect layer and
//! a copy of the endpoint's settings, all per peer, and one more task hop per
//! call. The fan-out has at most one call in flight per agent and needs none of
//! that: a shared hyper `SendRequest` is already cloneable and safe to call from
//! any task. So a [`Connection`] dials on first use through the same
//! [`Connector`] as before (TCP, the TLS handshake with the current certificates,
//! the exact identity check), keeps the `SendRequest`, and dials again when the
//! connection has closed (the peer went away, a GOAWAY for its age limit, a
//! failed keep-alive). Dropping the last clone closes the connection.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tonic::body::Body;
use tonic::transport::Uri;
use tower::Service as _;

use super::{CONNECT_TIMEOUT, Connector, KEEP_ALIVE_INTERVAL, KEEP_ALIVE_TIMEOUT};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A lazily dialled HTTP/2 connection; clones share it. A `tower::Service` for
/// tonic's generated clients and `tonic::client::Grpc`.
#[derive(Clone)]
pub struct Connection {
    inner: Arc<Inner>,
}

struct Inner {
    /// `None`: a connection that never dials (tests of the rotator's core).
    connector: Option<Connector>,
    /// `http://host:port`: TLS is ours, so HTTP/2 sees a plain scheme, as with
    /// tonic's channel before.
    origin: Uri,
    sender: tokio::sync::Mutex<Option<http2::SendRequest<Body>>>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Connection({})", self.inner.origin)
    }
}

/// Why a call could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("cannot connect to {peer}")]
    Connect {
        peer: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot connect to {peer}: no answer within {CONNECT_TIMEOUT:?}")]
    ConnectTimeout { peer: String },
    #[error("HTTP/2 handshake with {peer} failed")]
    Handshake {
        peer: String,
        #[source]
        source: hyper::Error,
    },
    #[error("{peer} is never dialled")]
    NeverDialled { peer: String },
}

impl Connection {
    pub(super) fn new(connector: Connector, origin: Uri) -> Self {
        Connection::with(Some(connector), origin)
    }

    /// A connection whose every call fails without dialling: for tests that
    /// build a rotator's state around agents that are never reached.
    pub fn never_dialled() -> Self {
        Connection::with(None, Uri::from_static("http://127.0.0.1:9"))
    }

    fn with(connector: Option<Connector>, origin: Uri) -> Self {
        Connection {
            inner: Arc::new(Inner {
                connector,
                origin,
                sender: tokio::sync::Mutex::new(None),
            }),
        }
    }

    /// The open connection's sender, dialling when there is none or it closed.
    /// Callers of one connection wait for one dial, not one each.
    async fn sender(&self, stale: bool) -> Result<http2::SendRequest<Body>, ConnectionError> {
        let inner = &self.inner;
        let mut slot = inner.sender.lock().await;
        if let Some(sender) = slot.as_ref().filter(|s| !stale && !s.is_closed()) {
            return Ok(sender.clone());
        }
        *slot = None;
        let Some(mut connector) = inner.connector.clone() else {
            return Err(ConnectionError::NeverDialled { peer: self.peer() });
        };
        let peer = self.peer();
        let dial = connector.call(inner.origin.clone());
        let io = match tokio::time::timeout(CONNECT_TIMEOUT, dial).await {
            Ok(Ok(io)) => io,
            Ok(Err(source)) => return Err(ConnectionError::Connect { peer, source }),
            Err(_) => return Err(ConnectionError::ConnectTimeout { peer }),
        };
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(KEEP_ALIVE_INTERVAL)
            .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            // No HPACK dynamic table for what agents answer: hyper's server
            // sends a `date` that changes every second, and each new value
            // was indexed into a 4 KiB table per connection (80 MiB more at
            // 10,000 agents after a few rotations).
            .header_table_size(0)
            .handshake(io)
            .await
            .map_err(|source| ConnectionError::Handshake {
                peer: peer.clone(),
                source,
            })?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%peer, %error, "connection closed");
            }
        });
        *slot = Some(sender.clone());
        Ok(sender)
    }

    /// Sends `request` on the open connection; when that connection turned out
    /// to be closing before the request left (a GOAWAY, a reset the pool had not
    /// noticed yet), dials once more and sends it there.
    async fn send(
        self,
        mut request: http::Request<Body>,
    ) -> Result<http::Response<Incoming>, BoxError> {
        *request.uri_mut() = self.absolute(request.uri())?;
        let mut stale = false;
        loop {
            // Not reaching the peer is UNAVAILABLE, as gRPC clients say it.
            let mut sender = self.sender(stale).await.map_err(|e| -> BoxError {
                Box::new(tonic::Status::unavailable(crate::error_chain(&e)))
            })?;
            if sender.ready().await.is_err() && !stale {
                stale = true;
                continue;
            }
            match sender.try_send_request(request).await {
                Ok(response) => return Ok(response),
                Err(mut error) => match error.take_message() {
                    Some(unsent) if !stale => {
                        request = unsent;
                        stale = true;
                    }
                    _ => return Err(error.into_error().into()),
                },
            }
        }
    }

    /// `host:port`, for messages.
    fn peer(&self) -> String {
        self.inner
            .origin
            .authority()
            .map_or_else(String::new, |a| a.to_string())
    }

    /// `http://host:port` and the request's path.
    fn absolute(&self, uri: &Uri) -> Result<Uri, BoxError> {
        let mut parts = self.inner.origin.clone().into_parts();
        parts.path_and_query = uri.path_and_query().cloned();
        Ok(Uri::from_parts(parts)?)
    }
}

impl tower::Service<http::Request<Body>> for Connection {
    type Response = http::Response<Incoming>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Readiness is the connection's, awaited in `send`: a lazy connection
        // is always willing to try.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        Box::pin(self.clone().send(request))
    }
}
