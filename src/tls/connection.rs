//! One lazily dialled HTTP/2 connection to one peer, for a client that talks to
//! thousands of peers one call at a time (the rotator's fan-out).
//!
//! tonic's `Channel` puts a `tower::buffer` in front of every connection (an
//! mpsc channel, a worker task, a reconnect layer), and hyper's HTTP/2 client
//! under it keeps one more unbounded channel per connection (its first block,
//! 32 request slots, is 7.7 KiB) and spawns a task per request to pipe the
//! body. At 10,000 agents with at most one call in flight each, none of that
//! earns its memory, so this speaks HTTP/2 through `h2` directly: a
//! [`Connection`] dials on first use through the same [`Connector`] (TCP, the
//! TLS handshake with the current certificates, the exact identity check),
//! keeps h2's `SendRequest` (cloneable, safe from any task), and one task per
//! connection drives it and sends the keep-alive pings. It dials again when
//! the connection has closed (the peer went away, a GOAWAY for its age limit,
//! an unanswered ping). Dropping the last clone closes the connection.
//!
//! Requests are unary gRPC: the body (one small message) is collected and
//! sent with the headers in one go.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::Frame;
use http_body_util::BodyExt as _;
use tonic::body::Body;
use tonic::transport::Uri;

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
    /// tonic's channel.
    origin: Uri,
    sender: tokio::sync::Mutex<Option<Open>>,
}

/// The open connection: its sender, and whether its driving task has ended.
struct Open {
    sender: h2::client::SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
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
        source: h2::Error,
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

    /// The open connection's sender, dialling when there is none or `stale`
    /// says the last one failed. Callers of one connection wait for one dial,
    /// not one each.
    async fn sender(&self, stale: bool) -> Result<h2::client::SendRequest<Bytes>, ConnectionError> {
        let mut slot = self.inner.sender.lock().await;
        if let Some(open) = slot
            .as_ref()
            .filter(|o| !stale && !o.closed.load(Ordering::Acquire))
        {
            return Ok(open.sender.clone());
        }
        *slot = None;
        // Boxed: the dial (TCP, TLS, HTTP/2 handshakes) is rare and its future
        // large; inline, it would size every call's future, and the fan-out
        // copies each call's task in whole when it spawns it.
        let open = Box::pin(self.dial()).await?;
        let sender = open.sender.clone();
        *slot = Some(open);
        Ok(sender)
    }

    /// A new connection, its driving task started.
    async fn dial(&self) -> Result<Open, ConnectionError> {
        let inner = &self.inner;
        let Some(connector) = inner.connector.as_ref() else {
            return Err(ConnectionError::NeverDialled { peer: self.peer() });
        };
        let peer = self.peer();
        let io = match tokio::time::timeout(CONNECT_TIMEOUT, connector.dial(inner.origin.clone()))
            .await
        {
            Ok(Ok(io)) => io,
            Ok(Err(source)) => return Err(ConnectionError::Connect { peer, source }),
            Err(_) => return Err(ConnectionError::ConnectTimeout { peer }),
        };
        let (sender, connection) = h2::client::Builder::new()
            // No HPACK dynamic table for what agents answer: their server
            // sends a `date` that changes every second, each new value indexed
            // into a table of up to 4 KiB per connection.
            .header_table_size(0)
            .handshake::<_, Bytes>(io)
            .await
            .map_err(|source| ConnectionError::Handshake {
                peer: peer.clone(),
                source,
            })?;
        let closed = Arc::new(AtomicBool::new(false));
        tokio::spawn(drive(connection, peer, closed.clone()));
        Ok(Open { sender, closed })
    }

    /// Sends `request` (through tonic's generated clients).
    async fn send(
        self,
        request: http::Request<Body>,
    ) -> Result<http::Response<ResponseBody>, BoxError> {
        let uri = self.absolute(request.uri().path_and_query().cloned())?;
        let (parts, body) = request.into_parts();
        let data = body.collect().await?.to_bytes();
        let head = || {
            let mut head = http::Request::new(());
            *head.method_mut() = parts.method.clone();
            *head.uri_mut() = uri.clone();
            *head.headers_mut() = parts.headers.clone();
            head
        };
        let response = self.exchange(head, data).await?;
        Ok(response.map(|recv| ResponseBody {
            recv,
            data_done: false,
        }))
    }

    /// A unary gRPC call without tonic's per-call machinery, for the fan-out's
    /// thousands of identical calls: `framed` is the request message with its
    /// 5-byte gRPC prefix ([`grpc_frame`]), sent as it is; the answer is the
    /// response message without its prefix, or the status the peer (or the
    /// connection) gave. `timeout` is sent as `grpc-timeout`; the caller
    /// enforces it too.
    pub async fn unary(
        &self,
        path: &'static str,
        framed: Bytes,
        timeout: std::time::Duration,
    ) -> Result<Bytes, tonic::Status> {
        let uri = self
            .absolute(Some(http::uri::PathAndQuery::from_static(path)))
            .map_err(|e| tonic::Status::internal(e.to_string()))?;
        // At most 8 digits (gRPC over HTTP/2): milliseconds cover 27 hours.
        let deadline =
            http::HeaderValue::try_from(format!("{}m", timeout.as_millis().min(99_999_999)))
                .map_err(|e| tonic::Status::internal(e.to_string()))?;
        let head = || {
            let mut head = http::Request::new(());
            *head.method_mut() = http::Method::POST;
            *head.uri_mut() = uri.clone();
            let headers = head.headers_mut();
            headers.insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/grpc"),
            );
            headers.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
            headers.insert("grpc-timeout", deadline.clone());
            head
        };
        let response = self
            .exchange(head, framed)
            .await
            .map_err(tonic::Status::from_error)?;
        let (parts, mut recv) = response.into_parts();
        // A trailers-only answer (an error before any message) carries its
        // status in the headers.
        grpc_status(&parts.headers)?;
        if parts.status != http::StatusCode::OK {
            return Err(tonic::Status::unknown(format!(
                "HTTP status {} from {}",
                parts.status,
                self.peer()
            )));
        }
        let mut body = bytes::BytesMut::new();
        while let Some(chunk) = recv.data().await {
            let chunk = chunk.map_err(h2_status)?;
            // Fails only when the stream is already gone.
            let _ = recv.flow_control().release_capacity(chunk.len());
            if body.len() + chunk.len() > MAX_RESPONSE {
                return Err(tonic::Status::out_of_range(format!(
                    "answer from {} over {MAX_RESPONSE} bytes",
                    self.peer()
                )));
            }
            body.extend_from_slice(&chunk);
        }
        match recv.trailers().await.map_err(h2_status)? {
            Some(trailers) if trailers.contains_key(GRPC_STATUS) => grpc_status(&trailers)?,
            _ if parts.headers.contains_key(GRPC_STATUS) => {}
            _ => {
                return Err(tonic::Status::internal(format!(
                    "no grpc-status from {}",
                    self.peer()
                )));
            }
        }
        unframe(body.freeze()).ok_or_else(|| {
            tonic::Status::internal(format!(
                "answer from {} is not one uncompressed gRPC message",
                self.peer()
            ))
        })
    }

    /// Sends the request `head()` builds, with `data` as its body, on the open
    /// connection; when that connection turned out to be closed or closing
    /// before the request left (a GOAWAY, a reset not noticed yet), dials once
    /// more and sends it there.
    async fn exchange(
        &self,
        head: impl Fn() -> http::Request<()>,
        data: Bytes,
    ) -> Result<http::Response<h2::RecvStream>, BoxError> {
        let mut stale = false;
        loop {
            // Not reaching the peer is UNAVAILABLE, as gRPC clients say it.
            let sender = self.sender(stale).await.map_err(|e| -> BoxError {
                Box::new(tonic::Status::unavailable(crate::error_chain(&e)))
            })?;
            let sent = match sender.ready().await {
                Ok(mut sender) => sender.send_request(head(), data.is_empty()),
                Err(error) => Err(error),
            };
            let (response, mut stream) = match sent {
                Ok(sent) => sent,
                Err(_) if !stale => {
                    stale = true;
                    continue;
                }
                Err(error) => return Err(error.into()),
            };
            if !data.is_empty() {
                stream.send_data(data.clone(), true)?;
            }
            match response.await {
                Ok(response) => return Ok(response),
                // Refused unprocessed: safe to send again, once.
                Err(error) if !stale && refused_unprocessed(&error) => stale = true,
                Err(error) => return Err(error.into()),
            }
        }
    }

    /// Whether a dialled connection is open (its task still drives it).
    #[cfg(test)]
    pub(crate) fn is_open(&self) -> bool {
        self.inner.sender.try_lock().is_ok_and(|o| {
            o.as_ref()
                .is_some_and(|o| !o.closed.load(Ordering::Acquire))
        })
    }

    /// `host:port`, for messages.
    fn peer(&self) -> String {
        self.inner
            .origin
            .authority()
            .map_or_else(String::new, |a| a.to_string())
    }

    /// `http://host:port` and `path`.
    fn absolute(
        &self,
        path: Option<http::uri::PathAndQuery>,
    ) -> Result<Uri, http::uri::InvalidUriParts> {
        let mut parts = self.inner.origin.clone().into_parts();
        parts.path_and_query = path;
        Uri::from_parts(parts)
    }
}

/// The largest answer [`Connection::unary`] takes (tonic's default limit).
const MAX_RESPONSE: usize = 4 * 1024 * 1024;

const GRPC_STATUS: &str = "grpc-status";

/// `message` with the 5-byte gRPC prefix (uncompressed, its length), ready
/// for [`Connection::unary`].
pub fn grpc_frame(message: &[u8]) -> Vec<u8> {
    let mut framed = Vec::with_capacity(5 + message.len());
    framed.push(0);
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(message);
    framed
}

/// The message of one uncompressed gRPC frame that fills `body` exactly.
fn unframe(mut body: Bytes) -> Option<Bytes> {
    let prefix = body.get(..5)?;
    let length = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
    (prefix[0] == 0 && body.len() - 5 == length).then(|| body.split_off(5))
}

/// `Ok` when `headers` carry no status or status 0, the peer's status otherwise.
fn grpc_status(headers: &http::HeaderMap) -> Result<(), tonic::Status> {
    match headers.get(GRPC_STATUS) {
        None => Ok(()),
        Some(code) if code.as_bytes() == b"0" => Ok(()),
        Some(_) => {
            // tonic panics on undecodable binary details; they are not used here.
            let mut headers = headers.clone();
            headers.remove("grpc-status-details-bin");
            Err(tonic::Status::from_header_map(&headers)
                .unwrap_or_else(|| tonic::Status::unknown("no grpc-status")))
        }
    }
}

fn h2_status(error: h2::Error) -> tonic::Status {
    tonic::Status::from_error(Box::new(error))
}

/// Whether the peer said it did not process the request: a GOAWAY that
/// stopped short of the stream, or a REFUSED_STREAM reset (RFC 9113 §8.7).
fn refused_unprocessed(error: &h2::Error) -> bool {
    (error.is_go_away() && error.is_remote()) || error.reason() == Some(h2::Reason::REFUSED_STREAM)
}

/// Drives one connection until it closes, pinging every
/// [`KEEP_ALIVE_INTERVAL`] so an idle connection to a region stays open
/// between rotations and a dead one is noticed: a ping unanswered within
/// [`KEEP_ALIVE_TIMEOUT`] drops the connection, and its sender fails over to a
/// new dial.
fn drive<T>(
    mut connection: h2::client::Connection<T, Bytes>,
    peer: String,
    closed: Arc<AtomicBool>,
) -> impl Future<Output = ()>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    // Taken once, here: never `None`.
    let ping_pong = connection.ping_pong();
    async move {
        // However this ends, the next call dials anew.
        let _closed = Closed(closed);
        // Polled through `&mut`: the connection (2.3 KiB) is kept once in this
        // task. Moved into the select, as an async fn's argument, it was kept
        // twice, since an argument's slot outlives the move.
        tokio::select! {
            closed = &mut connection => if let Err(error) = closed {
                tracing::debug!(%peer, %error, "connection closed");
            },
            why = keep_alive(ping_pong) => tracing::debug!(%peer, reason = %why, "connection dropped"),
        }
    }
}

/// Marks a connection closed when its task ends, however it ends.
struct Closed(Arc<AtomicBool>);

impl Drop for Closed {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Pings every [`KEEP_ALIVE_INTERVAL`]; returns why the connection is to be
/// dropped.
async fn keep_alive(ping_pong: Option<h2::PingPong>) -> String {
    let Some(mut ping_pong) = ping_pong else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(KEEP_ALIVE_INTERVAL).await;
        let pong = tokio::time::timeout(KEEP_ALIVE_TIMEOUT, ping_pong.ping(h2::Ping::opaque()));
        match pong.await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => return format!("keep-alive ping failed: {error}"),
            Err(_) => return format!("keep-alive ping unanswered within {KEEP_ALIVE_TIMEOUT:?}"),
        }
    }
}

/// A response's body: h2's stream, its flow-control window handed back as
/// each chunk is taken.
pub struct ResponseBody {
    recv: h2::RecvStream,
    data_done: bool,
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if !self.data_done {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Fails only when the stream is already gone.
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(error)) => return Poll::Ready(Some(Err(error))),
                None => self.data_done = true,
            }
        }
        Poll::Ready(
            ready!(self.recv.poll_trailers(cx))
                .transpose()
                .map(|t| t.map(Frame::trailers)),
        )
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }
}

impl tower::Service<http::Request<Body>> for Connection {
    type Response = http::Response<ResponseBody>;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn output_size<A, R, F: Fn(A) -> R>(_: &F) -> usize {
        std::mem::size_of::<R>()
    }

    /// What `unary` sends is one uncompressed gRPC frame; what it takes back
    /// must be exactly one, or the answer is refused rather than misread.
    #[test]
    fn grpc_frames_round_trip_and_malformed_answers_are_refused() {
        let framed = Bytes::from(grpc_frame(b"message"));
        assert_eq!(&framed[..5], &[0, 0, 0, 0, 7]);
        assert_eq!(unframe(framed.clone()).as_deref(), Some(&b"message"[..]));
        assert_eq!(
            unframe(Bytes::from(grpc_frame(b""))).as_deref(),
            Some(&b""[..])
        );
        // Compressed, short, trailing bytes, too short for a prefix.
        let mut compressed = framed.to_vec();
        compressed[0] = 1;
        assert_eq!(unframe(Bytes::from(compressed)), None);
        assert_eq!(unframe(framed.slice(..framed.len() - 1)), None);
        let mut longer = framed.to_vec();
        longer.push(0);
        assert_eq!(unframe(Bytes::from(longer)), None);
        assert_eq!(unframe(Bytes::from_static(&[0, 0, 0])), None);
    }

    #[test]
    fn a_peers_status_is_taken_from_its_headers() {
        let mut headers = http::HeaderMap::new();
        assert!(grpc_status(&headers).is_ok(), "no status yet");
        headers.insert(GRPC_STATUS, http::HeaderValue::from_static("0"));
        assert!(grpc_status(&headers).is_ok());
        headers.insert(GRPC_STATUS, http::HeaderValue::from_static("9"));
        headers.insert(
            "grpc-message",
            http::HeaderValue::from_static("generation%203"),
        );
        // Undecodable details must not panic (tonic's parser would).
        headers.insert(
            "grpc-status-details-bin",
            http::HeaderValue::from_static("%%%"),
        );
        let status = grpc_status(&headers).expect_err("an error status");
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert_eq!(status.message(), "generation 3");
    }

    /// The rotator keeps one connection task per agent: its future must hold
    /// the connection once (it held it twice, 7.3 KiB a task, when the
    /// connection was an async fn's argument moved into the select).
    #[test]
    fn the_connection_task_holds_its_connection_once() {
        type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;
        type Conn = h2::client::Connection<Tls, Bytes>;
        let task = |c: Conn| drive(c, String::new(), Arc::new(AtomicBool::new(false)));
        let connection = std::mem::size_of::<Conn>();
        let task = output_size(&task);
        assert!(
            task < connection + 1024,
            "the connection task takes {task} bytes for a connection of {connection}"
        );
    }
}
