//! Mutual TLS 1.3 for every connection: server and client configurations built from
//! PEM files, re-read when the files change and swapped in through a `watch`
//! channel, and the peer identity (certificate SAN) checked by handlers.
//!
//! We terminate TLS ourselves with tokio-rustls rather than through tonic's
//! `ServerTlsConfig`/`ClientTlsConfig`, because those freeze the certificates at
//! start-up: an operator replacing an expiring certificate must not have to restart
//! a rotator in the middle of a fan-out. Each new connection takes the current
//! configuration; established HTTP/2 connections keep theirs until they reconnect.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::config::TlsConfig;
use crate::fswatch::FileWatch;

mod connection;
pub use connection::{Connection, ConnectionError, grpc_frame};

/// How long a client's dial (TCP and the TLS handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A client's HTTP/2 pings on an idle connection, so a region's connection
/// stays open between rotations and a dead one is noticed.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The transport limits of our gRPC servers (agent and rotator), so that no
/// peer, with or without a certificate, can take a server away from the peers
/// it exists for. Documented with their reasons in docs/hardening.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// TLS handshakes in progress at once; a connection beyond is closed at once
    /// (queueing it would let idle connections starve the rotator's).
    pub handshakes: usize,
    /// How long a peer may take to finish its handshake.
    pub handshake_timeout: Duration,
    /// Established connections at once; a connection beyond is closed after
    /// its handshake.
    pub connections: usize,
    /// Of `connections`, how many only the server's privileged peers (the
    /// agent's rotator, the rotator's admins) may take: strangers holding
    /// every other slot cannot lock them out.
    pub reserved_connections: usize,
    /// How long an established connection may go without a request its peer
    /// is allowed to make (the first one, refusals not counting) before it is
    /// closed: a peer of the CA that completes its handshake and then sends
    /// nothing (no HTTP/2 preface, no request) gives its slot back.
    pub first_request_timeout: Duration,
    /// HTTP/2 streams one connection may have open.
    pub streams_per_connection: u32,
    /// How long a request may take to produce its response.
    pub request_timeout: Duration,
    /// HTTP/2 pings on idle connections, and how long an answer may take.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// After this long a connection is asked to go away (the client reconnects),
    /// and gets `max_connection_age_grace` to finish its calls.
    pub max_connection_age: Duration,
    pub max_connection_age_grace: Duration,
    /// The size of the request headers a peer may send.
    pub max_header_bytes: u32,
    /// How long in-flight requests get after shutdown begins.
    pub drain_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            handshakes: 64,
            handshake_timeout: Duration::from_secs(5),
            connections: 256,
            reserved_connections: 16,
            first_request_timeout: crate::config::DEFAULT_FIRST_REQUEST_TIMEOUT,
            streams_per_connection: 16,
            request_timeout: crate::config::DEFAULT_REQUEST_TIMEOUT,
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            max_connection_age: Duration::from_secs(3600),
            max_connection_age_grace: Duration::from_secs(60),
            max_header_bytes: 16 * 1024,
            drain_timeout: Duration::from_secs(10),
        }
    }
}

impl Limits {
    /// A tonic server builder with the HTTP/2 limits applied.
    pub fn server(&self) -> tonic::transport::Server {
        tonic::transport::Server::builder()
            .max_concurrent_streams(self.streams_per_connection)
            .timeout(self.request_timeout)
            .http2_keepalive_interval(Some(self.keepalive_interval))
            .http2_keepalive_timeout(Some(self.keepalive_timeout))
            .max_connection_age(self.max_connection_age)
            .max_connection_age_grace(self.max_connection_age_grace)
            .http2_max_header_list_size(self.max_header_bytes)
    }

    /// Runs `serve` until it ends, or until `drain_timeout` after `stop` is
    /// cancelled: a peer that never answers the GOAWAY (a stopped rotator, an
    /// Admin `watch` left open) must not keep a daemon from exiting.
    pub async fn drained<E>(
        &self,
        serve: impl std::future::Future<Output = Result<(), E>>,
        stop: &tokio_util::sync::CancellationToken,
    ) -> Result<(), E> {
        tokio::pin!(serve);
        tokio::select! {
            served = &mut serve => served,
            () = async {
                stop.cancelled().await;
                tokio::time::sleep(self.drain_timeout).await;
            } => {
                tracing::warn!(timeout = ?self.drain_timeout, "connections still open after the drain timeout: closing them");
                Ok(())
            }
        }
    }
}

/// Which identities may call which gRPC paths, checked from the peer
/// certificate before the request body is read or decoded. A path no rule
/// names is refused: a new service must be given its callers explicitly.
#[derive(Clone, Default)]
pub struct Authorization {
    /// The first rule whose prefix matches decides.
    rules: Arc<Vec<Rule>>,
    /// Told of every refusal (a metric), with the path refused.
    on_refusal: Option<RefusalHook>,
}

/// Paths starting with `prefix` are open to `identities`, known as `role`.
#[derive(Debug, Clone)]
struct Rule {
    prefix: String,
    role: &'static str,
    identities: Arc<[String]>,
}

type RefusalHook = Arc<dyn Fn(&str) + Send + Sync>;

impl std::fmt::Debug for Authorization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authorization")
            .field("rules", &self.rules)
            .finish_non_exhaustive()
    }
}

impl Authorization {
    /// Adds a rule: paths starting with `prefix` (`/package.Service/` or a
    /// whole method path) are open to `identities` only.
    pub fn allow(mut self, prefix: &str, role: &'static str, identities: &[String]) -> Self {
        Arc::make_mut(&mut self.rules).push(Rule {
            prefix: prefix.to_string(),
            role,
            identities: Arc::from(identities),
        });
        self
    }

    /// Calls `f` with the path of every refused request.
    pub fn on_refusal(mut self, f: impl Fn(&str) + Send + Sync + 'static) -> Self {
        self.on_refusal = Some(Arc::new(f));
        self
    }

    /// Whether the peer of a request to `path` may make it.
    pub fn decide(&self, path: &str, peer: Option<&PeerInfo>) -> Result<(), tonic::Status> {
        let Some(peer) = peer else {
            return Err(tonic::Status::unauthenticated(
                "no verified client certificate on this connection",
            ));
        };
        let rule = self
            .rules
            .iter()
            .find(|rule| path.starts_with(rule.prefix.as_str()));
        match rule {
            Some(rule) if rule.identities.iter().any(|a| peer.identity.matches(a)) => Ok(()),
            // The path comes from the peer: Debug-quoted, never a label.
            Some(Rule { role, .. }) => Err(tonic::Status::permission_denied(format!(
                "peer identity {} is not an allowed {role} identity for {path:?}",
                peer.identity
            ))),
            None => Err(tonic::Status::permission_denied(format!(
                "peer identity {} may not call {path:?}",
                peer.identity
            ))),
        }
    }
}

impl<S> tower::Layer<S> for Authorization {
    type Service = Authorized<S>;

    fn layer(&self, inner: S) -> Authorized<S> {
        Authorized {
            inner,
            policy: self.clone(),
        }
    }
}

/// The service [`Authorization`] wraps: a refused request is answered with
/// its status and its body dropped unread.
#[derive(Debug, Clone)]
pub struct Authorized<S> {
    inner: S,
    policy: Authorization,
}

impl<S, B> tower::Service<http::Request<B>> for Authorized<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let peer = request.extensions().get::<PeerInfo>();
        match self.policy.decide(request.uri().path(), peer) {
            Ok(()) => {
                if let Some(peer) = peer {
                    peer.admitted.admit();
                }
                Box::pin(self.inner.call(request))
            }
            Err(status) => {
                if let Some(on_refusal) = &self.policy.on_refusal {
                    on_refusal(request.uri().path());
                }
                tracing::info!(
                    remote = ?peer.and_then(|p| p.remote_addr),
                    error = %status.message(),
                    "request refused before reading it"
                );
                Box::pin(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

/// Per-method call deadlines, a tower layer on a server: every call gets
/// `default`, the methods given longer bounds get theirs (the server's own
/// `timeout`, [`Limits::request_timeout`], must be at least [`Deadlines::longest`]).
/// A call past its deadline is answered `DEADLINE_EXCEEDED` and its handler
/// dropped. An agent's credential migrate runs for minutes where an install
/// takes milliseconds: one bound for both either cut the migrate short or
/// left stuck installs hanging.
#[derive(Debug, Clone)]
pub struct Deadlines {
    default: Duration,
    longer: Arc<Vec<(String, Duration)>>,
}

impl Deadlines {
    pub fn new(default: Duration) -> Self {
        Deadlines {
            default,
            longer: Arc::new(Vec::new()),
        }
    }

    /// Gives calls to paths starting with `prefix` `deadline` instead.
    pub fn allow(mut self, prefix: &str, deadline: Duration) -> Self {
        Arc::make_mut(&mut self.longer).push((prefix.to_string(), deadline));
        self
    }

    /// The deadline of a call to `path`.
    pub fn of(&self, path: &str) -> Duration {
        self.longer
            .iter()
            .find(|(prefix, _)| path.starts_with(prefix.as_str()))
            .map_or(self.default, |(_, d)| *d)
    }

    /// The longest deadline of any call.
    pub fn longest(&self) -> Duration {
        self.longer
            .iter()
            .map(|(_, d)| *d)
            .fold(self.default, Duration::max)
    }
}

impl<S> tower::Layer<S> for Deadlines {
    type Service = WithDeadline<S>;

    fn layer(&self, inner: S) -> WithDeadline<S> {
        WithDeadline {
            inner,
            deadlines: self.clone(),
        }
    }
}

/// The service [`Deadlines`] wraps.
#[derive(Debug, Clone)]
pub struct WithDeadline<S> {
    inner: S,
    deadlines: Deadlines,
}

impl<S, B> tower::Service<http::Request<B>> for WithDeadline<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let deadline = self.deadlines.of(request.uri().path());
        let call = self.inner.call(request);
        Box::pin(async move {
            match tokio::time::timeout(deadline, call).await {
                Ok(answer) => answer,
                Err(_) => Ok(tonic::Status::deadline_exceeded(format!(
                    "no answer within {}",
                    crate::config::duration::format(&deadline)
                ))
                .into_http()),
            }
        })
    }
}

/// How often certificate files are compared with what is loaded, in case a file
/// event was missed (network filesystems, some secret-mount schemes).
const RELOAD_POLL: Duration = Duration::from_secs(30);

/// Why a TLS identity could not be loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} from {path}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{path} holds no {what}")]
    Empty { what: &'static str, path: PathBuf },
    #[error("CA certificate in {path} is not usable")]
    BadCa {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("cannot build the TLS configuration from {cert} and {key}")]
    Config {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("cannot build the client certificate verifier")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    #[error("invalid peer identity {0:?}: expected a DNS name or a URI, without wildcards")]
    ServerName(String),
    #[error("invalid endpoint {endpoint:?}: {reason}")]
    Endpoint { endpoint: String, reason: String },
}

impl TlsError {
    /// Whether the operator must fix the configuration (exit 2): a certificate,
    /// key or CA named there is missing, unreadable, unparseable or mismatched,
    /// or an endpoint is malformed. Every variant is; following the files never
    /// fails a start (it falls back to polling, see `fswatch`).
    pub fn is_config(&self) -> bool {
        true
    }
}

/// A configured peer identity: a DNS name or a URI (a SPIFFE ID, say), each
/// matched only against subject alternative names of its own type, so a URI
/// SAN `rotator.example.net` is never taken for the DNS name. Written
/// `dns:NAME` or `uri:URI`, or without a prefix, when the form says which: a
/// URI has `://`, anything else is a DNS name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    Dns(String),
    Uri(String),
}

impl Identity {
    /// The identity `configured` names, if it is a valid one: a DNS name
    /// without wildcards, or an absolute URI with a host.
    pub fn parse(configured: &str) -> Option<Identity> {
        let (explicit, rest) = match configured.split_once(':') {
            Some(("dns", rest)) => (Some(false), rest),
            Some(("uri", rest)) => (Some(true), rest),
            _ => (None, configured),
        };
        if rest.contains('*') || rest.is_empty() {
            return None;
        }
        match explicit {
            // Said to be a URI: taken as written, matched byte for byte.
            Some(true) => (!rest.chars().any(|c| c.is_whitespace() || c.is_control()))
                .then(|| Identity::Uri(rest.to_string())),
            None if rest.contains("://") => rest
                .parse::<http::Uri>()
                .is_ok_and(|u| u.scheme().is_some() && u.host().is_some())
                .then(|| Identity::Uri(rest.to_string())),
            _ => matches!(
                ServerName::try_from(rest.to_string()),
                Ok(ServerName::DnsName(_))
            )
            .then(|| Identity::Dns(rest.to_string())),
        }
    }
}

/// The names a verified peer certificate carries: its DNS and URI subject
/// alternative names, kept apart. Roles are granted by these names
/// (ARCHITECTURE.md, "Identities").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    dns: Vec<String>,
    uris: Vec<String>,
}

impl PeerIdentity {
    /// Reads the SANs of a DER certificate. Only called on certificates that
    /// rustls has already verified against our CA.
    pub fn from_der(der: &[u8]) -> Option<Self> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let (mut dns, mut uris) = (Vec::new(), Vec::new());
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    x509_parser::extensions::GeneralName::DNSName(n) => dns.push(n.to_string()),
                    x509_parser::extensions::GeneralName::URI(n) => uris.push(n.to_string()),
                    _ => {}
                }
            }
        }
        Some(PeerIdentity { dns, uris })
    }

    /// Every DNS and URI name, DNS names first.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.dns.iter().chain(&self.uris).map(String::as_str)
    }

    /// Whether the certificate carries `expected` (see [`Identity`]) among
    /// its names of the same type. Exact match (DNS names without regard to
    /// ASCII case, as DNS compares them): identities are configured, never
    /// guessed, so no wildcards. An invalid identity matches nothing.
    pub fn matches(&self, expected: &str) -> bool {
        match Identity::parse(expected) {
            Some(Identity::Dns(name)) => self.dns.iter().any(|n| n.eq_ignore_ascii_case(&name)),
            Some(Identity::Uri(uri)) => self.uris.contains(&uri),
            None => false,
        }
    }
}

impl std::fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.names().collect();
        if names.is_empty() {
            f.write_str("<certificate without DNS or URI names>")
        } else {
            f.write_str(&names.join(","))
        }
    }
}

/// What tonic puts in every request's extensions for connections accepted by
/// [`ServerTls::incoming`].
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub remote_addr: Option<SocketAddr>,
    pub identity: Arc<PeerIdentity>,
    /// Set by [`Authorization`] when it admits a request on this connection.
    admitted: Admitted,
}

/// Whether a connection has made a request its peer may make; shared by the
/// connection and every request's [`PeerInfo`].
#[derive(Debug, Clone, Default)]
struct Admitted(Arc<std::sync::atomic::AtomicBool>);

impl Admitted {
    fn admit(&self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    fn is_admitted(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// The verified identity of the peer that sent `request`.
pub fn peer_identity<T>(request: &tonic::Request<T>) -> Option<&PeerIdentity> {
    request
        .extensions()
        .get::<PeerInfo>()
        .map(|info| &*info.identity)
}

/// Admits `request` only when its peer certificate carries one of `allowed`;
/// otherwise `PERMISSION_DENIED` naming what the peer presented.
pub fn authorize<'r, T>(
    request: &'r tonic::Request<T>,
    allowed: &[String],
    role: &str,
) -> Result<&'r PeerIdentity, tonic::Status> {
    match peer_identity(request) {
        Some(identity) if allowed.iter().any(|a| identity.matches(a)) => Ok(identity),
        Some(identity) => Err(tonic::Status::permission_denied(format!(
            "peer identity {identity} is not an allowed {role} identity"
        ))),
        None => Err(tonic::Status::unauthenticated(
            "no verified client certificate on this connection",
        )),
    }
}

struct Material {
    ca: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Material {
    fn load(files: &TlsConfig) -> Result<Self, TlsError> {
        let certs = |what, path: &Path| -> Result<Vec<CertificateDer<'static>>, TlsError> {
            let read = |source| TlsError::Read {
                what,
                path: path.to_path_buf(),
                source,
            };
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(read)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(read)?;
            if certs.is_empty() {
                return Err(TlsError::Empty {
                    what,
                    path: path.to_path_buf(),
                });
            }
            Ok(certs)
        };
        let ca = certs("CA certificates", &files.ca)?;
        let chain = certs("certificates", &files.cert)?;
        let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|source| TlsError::Read {
            what: "a private key",
            path: files.key.clone(),
            source,
        })?;
        Ok(Material { ca, chain, key })
    }

    fn roots(&self, files: &TlsConfig) -> Result<RootCertStore, TlsError> {
        let mut roots = RootCertStore::empty();
        for cert in &self.ca {
            roots.add(cert.clone()).map_err(|source| TlsError::BadCa {
                path: files.ca.clone(),
                source,
            })?;
        }
        Ok(roots)
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn config_error(files: &TlsConfig) -> impl FnOnce(rustls::Error) -> TlsError + '_ {
    |source| TlsError::Config {
        cert: files.cert.clone(),
        key: files.key.clone(),
        source,
    }
}

fn build_server(files: &TlsConfig) -> Result<Arc<ServerConfig>, TlsError> {
    let material = Material::load(files)?;
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(material.roots(files)?), provider())
            .build()
            .map_err(TlsError::Verifier)?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(config_error(files))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(material.chain, material.key)
        .map_err(config_error(files))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    // No session tickets and no session cache: see `build_client`. No fernetd
    // client could resume, so tickets were two more records per handshake and
    // sessions kept in memory that would let whoever held one resume as the
    // peer whose certificate opened it.
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(Arc::new(config))
}

/// The client configuration and the roots its per-peer verifiers check against.
struct ClientSide {
    config: Arc<ClientConfig>,
    roots: Arc<RootCertStore>,
}

fn build_client(files: &TlsConfig) -> Result<Arc<ClientSide>, TlsError> {
    let material = Material::load(files)?;
    let roots = Arc::new(material.roots(files)?);
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(config_error(files))?
        .with_root_certificates(roots.clone())
        .with_client_auth_cert(material.chain, material.key)
        .map_err(config_error(files))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    // No TLS session resumption. rustls resumes a session only with the very
    // verifier that checked the first handshake, and each dial here gets its
    // own (`Connector::client_config`: this peer's exact identity, against the
    // certificates current at the dial), so a stored ticket was never used:
    // the client kept up to 256 servers' tickets, resumption secrets that let
    // their holder resume as this client, for nothing. A rotator's
    // connections live for hours (an agent's `max_connection_age`), and a
    // reconnect is a full handshake, as it was.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(ClientSide {
        config: Arc::new(config),
        roots,
    }))
}

/// Whether `identity` can be configured as a peer's identity (see [`Identity`]).
pub fn valid_identity(identity: &str) -> bool {
    Identity::parse(identity).is_some()
}

/// The client's check of a server certificate: the chain to our CA (as
/// web PKI, for server use), then one SAN equal to the configured identity,
/// DNS or URI. No wildcard or hostname rules: a `*.agents` certificate is
/// not every region's, and identities are configured, never derived.
#[derive(Debug)]
struct ExactIdentity {
    roots: Arc<RootCertStore>,
    expected: String,
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl rustls::client::danger::ServerCertVerifier for ExactIdentity {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        match PeerIdentity::from_der(end_entity) {
            Some(identity) if identity.matches(&self.expected) => {
                Ok(rustls::client::danger::ServerCertVerified::assertion())
            }
            _ => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A configuration that follows its files: the current value in a `watch`
/// channel, replaced when the files change and the new ones build. A change that
/// does not build (a half-copied key, a key that does not match its certificate)
/// is logged and the previous configuration stays in force.
struct Reloading<C> {
    current: watch::Receiver<Arc<C>>,
}

impl<C> Clone for Reloading<C> {
    fn clone(&self) -> Self {
        Reloading {
            current: self.current.clone(),
        }
    }
}

impl<C: Send + Sync + 'static> Reloading<C> {
    /// A configuration that never changes, for one-shot commands: they finish
    /// long before a certificate is replaced, and must not spend one of the
    /// user's few inotify instances on files they never re-read.
    fn fixed(config: Arc<C>) -> Self {
        let (_, rx) = watch::channel(config);
        Reloading { current: rx }
    }

    /// Must be called within a Tokio runtime: the reload task is spawned on it and
    /// ends, releasing its watches, when the last clone of the returned value is
    /// dropped.
    fn start(
        files: &TlsConfig,
        build: fn(&TlsConfig) -> Result<Arc<C>, TlsError>,
        watcher: &FileWatch,
    ) -> Result<Self, TlsError> {
        let initial = build(files)?;
        let (tx, rx) = watch::channel(initial);
        // Watch the directories, not the files: certificate rotation tools replace
        // files by rename (or swap a symlinked directory), which a file watch misses.
        let mut dirs: Vec<PathBuf> = [&files.ca, &files.cert, &files.key]
            .iter()
            .map(|p| match p.parent() {
                Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                _ => PathBuf::from("."),
            })
            .collect();
        dirs.sort();
        dirs.dedup();
        let (events_tx, mut events) = mpsc::unbounded_channel::<()>();
        // The watcher is shared with every other follower in the process: only
        // events in our directories concern us.
        let ours = dirs.clone();
        let subscription = watcher.subscribe(move |event: &notify::Event| {
            let concerns = event.paths.iter().any(|p| {
                ours.iter()
                    .any(|d| p == d || p.parent().is_some_and(|parent| parent == d))
            });
            if concerns {
                let _ = events_tx.send(());
            }
        });
        let mut watched = Vec::with_capacity(dirs.len());
        for dir in dirs {
            match watcher.watch(&dir) {
                Ok(()) => watched.push(dir),
                // The periodic comparison below still picks changes up.
                Err(error) => tracing::warn!(
                    dir = %dir.display(),
                    error = %crate::error_chain(&error),
                    poll = ?RELOAD_POLL,
                    "cannot watch the certificate directory; checking it periodically instead"
                ),
            }
        }
        let files = files.clone();
        let watcher = watcher.clone();
        tokio::spawn(async move {
            let _subscription = subscription;
            let mut fingerprint = fingerprint(&files);
            let mut poll = tokio::time::interval(RELOAD_POLL);
            poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = tx.closed() => break,
                    event = events.recv() => {
                        if event.is_none() {
                            break;
                        }
                        // Editors and copy tools write in several steps: let them finish.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        while events.try_recv().is_ok() {}
                        // Nobody left to serve (the files' owner may be removing them).
                        if tx.is_closed() {
                            break;
                        }
                    }
                    _ = poll.tick() => {}
                }
                let now = fingerprint_of(&files).await;
                if now == fingerprint {
                    continue;
                }
                match build(&files) {
                    Ok(config) => {
                        fingerprint = now;
                        tx.send_replace(config);
                        tracing::info!(cert = %files.cert.display(), "TLS certificates reloaded");
                    }
                    Err(error) => {
                        tracing::warn!(error = %crate::error_chain(&error), "TLS certificate change not applied; keeping the previous certificates");
                    }
                }
            }
            // `unwatch` waits for the watcher's thread: keep it off the runtime.
            let _ = tokio::task::spawn_blocking(move || {
                for dir in &watched {
                    watcher.unwatch(dir);
                }
            })
            .await;
        });
        Ok(Reloading { current: rx })
    }

    fn get(&self) -> Arc<C> {
        self.current.borrow().clone()
    }
}

/// SHA-256 of each file: enough to see a change, and no private-key bytes
/// kept in memory between reloads.
type Fingerprint = Vec<Option<[u8; 32]>>;

fn fingerprint(files: &TlsConfig) -> Fingerprint {
    use sha2::Digest as _;
    [&files.ca, &files.cert, &files.key]
        .iter()
        .map(|p| {
            std::fs::read(p)
                .ok()
                .map(zeroize::Zeroizing::new)
                .map(|bytes| sha2::Sha256::digest(bytes.as_slice()).into())
        })
        .collect()
}

async fn fingerprint_of(files: &TlsConfig) -> Fingerprint {
    let files = files.clone();
    tokio::task::spawn_blocking(move || fingerprint(&files))
        .await
        .unwrap_or_default()
}

/// The server side: TLS 1.3 only, client certificates required and verified
/// against the configured CA.
#[derive(Clone)]
pub struct ServerTls {
    config: Reloading<ServerConfig>,
}

impl ServerTls {
    /// Loads the files and starts following them with the process's shared
    /// watcher. Call within a Tokio runtime.
    pub fn load(files: &TlsConfig) -> Result<Self, TlsError> {
        Self::load_watched(files, FileWatch::shared())
    }

    /// As [`ServerTls::load`], following the files with `watcher`.
    pub fn load_watched(files: &TlsConfig, watcher: &FileWatch) -> Result<Self, TlsError> {
        Ok(ServerTls {
            config: Reloading::start(files, build_server, watcher)?,
        })
    }

    /// Accepts connections on `listener` and yields those whose TLS handshake
    /// succeeded, ready for `Server::serve_with_incoming_shutdown`. Handshakes run
    /// concurrently so one slow peer never delays the others.
    pub fn incoming(
        &self,
        listener: TcpListener,
    ) -> impl tokio_stream::Stream<Item = Result<TlsConn, io::Error>> + Send + 'static {
        self.incoming_with(listener, Limits::default())
    }

    /// [`ServerTls::incoming`] with `limits` on handshakes and connections.
    pub fn incoming_with(
        &self,
        listener: TcpListener,
        limits: Limits,
    ) -> impl tokio_stream::Stream<Item = Result<TlsConn, io::Error>> + Send + 'static {
        self.incoming_reserving(listener, limits, &[])
    }

    /// [`ServerTls::incoming_with`], keeping `limits.reserved_connections` of
    /// the connection slots for peers carrying one of `privileged`.
    pub fn incoming_reserving(
        &self,
        listener: TcpListener,
        limits: Limits,
        privileged: &[String],
    ) -> impl tokio_stream::Stream<Item = Result<TlsConn, io::Error>> + Send + 'static {
        let (tx, rx) = mpsc::channel(64);
        let config = self.config.clone();
        let privileged: Arc<[String]> = Arc::from(privileged);
        // Without privileged peers nobody could use a reserved slot.
        let reserved = if privileged.is_empty() {
            0
        } else {
            limits.reserved_connections.min(limits.connections)
        };
        let handshakes = Arc::new(tokio::sync::Semaphore::new(limits.handshakes));
        let connections = Arc::new(tokio::sync::Semaphore::new(limits.connections - reserved));
        let reserve = Arc::new(tokio::sync::Semaphore::new(reserved));
        tokio::spawn(async move {
            loop {
                let (tcp, remote) = tokio::select! {
                    () = tx.closed() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(pair) => pair,
                        Err(error) => {
                            // EMFILE and friends: back off instead of spinning.
                            tracing::warn!(%error, "accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                };
                let Ok(handshake) = handshakes.clone().try_acquire_owned() else {
                    tracing::debug!(%remote, "too many TLS handshakes in progress: connection closed");
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = tokio_rustls::TlsAcceptor::from(config.get());
                let tx = tx.clone();
                let (connections, reserve) = (connections.clone(), reserve.clone());
                let privileged = privileged.clone();
                tokio::spawn(async move {
                    let accepted =
                        tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await;
                    drop(handshake);
                    match accepted {
                        Ok(Ok(stream)) => {
                            let identity = stream
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|certs| certs.first())
                                .and_then(|cert| PeerIdentity::from_der(cert));
                            let Some(identity) = identity else {
                                tracing::warn!(%remote, "TLS peer without a readable certificate dropped");
                                return;
                            };
                            // A privileged peer takes a reserved slot first,
                            // so the shared ones stay for everyone else.
                            let slot = if privileged.iter().any(|p| identity.matches(p)) {
                                reserve
                                    .try_acquire_owned()
                                    .or_else(|_| connections.try_acquire_owned())
                            } else {
                                connections.try_acquire_owned()
                            };
                            let Ok(slot) = slot else {
                                tracing::warn!(%remote, %identity, "connection limit reached: connection closed");
                                return;
                            };
                            let admitted = Admitted::default();
                            let conn = TlsConn {
                                stream,
                                _slot: slot,
                                first_request: Some(FirstRequest {
                                    deadline: Box::pin(tokio::time::sleep(
                                        limits.first_request_timeout,
                                    )),
                                    admitted: admitted.clone(),
                                    timeout: limits.first_request_timeout,
                                }),
                                info: PeerInfo {
                                    remote_addr: Some(remote),
                                    identity: Arc::new(identity),
                                    admitted,
                                },
                            };
                            let _ = tx.send(Ok(conn)).await;
                        }
                        Ok(Err(error)) => {
                            tracing::info!(%remote, %error, "TLS handshake refused");
                        }
                        Err(_) => {
                            tracing::info!(%remote, "TLS handshake timed out");
                        }
                    }
                });
            }
        });
        ReceiverStream::new(rx)
    }
}

/// A server-side TLS connection with its verified peer identity.
pub struct TlsConn {
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    /// Counts against [`Limits::connections`] until the connection is dropped.
    _slot: tokio::sync::OwnedSemaphorePermit,
    /// Until a request is admitted: when the connection is closed without one.
    first_request: Option<FirstRequest>,
    info: PeerInfo,
}

/// The [`Limits::first_request_timeout`] of one connection.
struct FirstRequest {
    deadline: Pin<Box<tokio::time::Sleep>>,
    admitted: Admitted,
    timeout: Duration,
}

impl TlsConn {
    /// An error once the connection has gone `first_request_timeout` without
    /// an admitted request. Polled from `poll_read`, which the server polls
    /// whenever it waits for the peer, so the timer wakes the connection and
    /// the read fails: the server then closes it.
    fn check_first_request(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let Some(first) = &mut self.first_request else {
            return Ok(());
        };
        if first.admitted.is_admitted() {
            self.first_request = None;
            return Ok(());
        }
        if first.deadline.as_mut().poll(cx).is_pending() {
            return Ok(());
        }
        tracing::info!(
            remote = ?self.info.remote_addr,
            identity = %self.info.identity,
            timeout = ?first.timeout,
            "no request within the first-request timeout: connection closed"
        );
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "no request within the first-request timeout",
        ))
    }
}

impl Connected for TlsConn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.check_first_request(cx)?;
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The client side: presents our certificate and verifies the server's against
/// the configured CA and the name we expect it to have.
#[derive(Clone)]
pub struct ClientTls {
    config: Reloading<ClientSide>,
}

impl ClientTls {
    /// Loads the files and starts following them with the process's shared
    /// watcher. Call within a Tokio runtime.
    pub fn load(files: &TlsConfig) -> Result<Self, TlsError> {
        Self::load_watched(files, FileWatch::shared())
    }

    /// As [`ClientTls::load`], following the files with `watcher`.
    pub fn load_watched(files: &TlsConfig, watcher: &FileWatch) -> Result<Self, TlsError> {
        Ok(ClientTls {
            config: Reloading::start(files, build_client, watcher)?,
        })
    }

    /// Loads the files once and never re-reads them, for one-shot commands
    /// (`fernetd admin`): no watcher, no task, no runtime needed.
    pub fn load_once(files: &TlsConfig) -> Result<Self, TlsError> {
        Ok(ClientTls {
            config: Reloading::fixed(build_client(files)?),
        })
    }

    /// A lazily connecting channel to `endpoint` (`https://host:port` or
    /// `host:port`) whose server certificate must carry `server_name` (a DNS
    /// or URI SAN, matched exactly), with HTTP/2
    /// keep-alive so an idle connection to a region stays open between rotations
    /// and a dead one is noticed.
    pub fn channel(&self, endpoint: &str, server_name: &str) -> Result<Channel, TlsError> {
        Ok(self
            .endpoint(endpoint)?
            .connect_with_connector_lazy(self.connector(server_name)?))
    }

    /// The tonic endpoint for `endpoint`, with our defaults.
    pub fn endpoint(&self, endpoint: &str) -> Result<Endpoint, TlsError> {
        Ok(Endpoint::from(origin(endpoint)?)
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(KEEP_ALIVE_INTERVAL)
            .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
            .keep_alive_while_idle(true))
    }

    /// A lazily dialled connection to `endpoint` whose server certificate must
    /// carry `identity`: the light form of [`ClientTls::channel`] for a client
    /// of thousands of peers (see [`Connection`]).
    pub fn connection(&self, endpoint: &str, identity: &str) -> Result<Connection, TlsError> {
        Ok(Connection::new(
            self.connector(identity)?,
            origin(endpoint)?,
        ))
    }

    /// The connector that dials TCP and runs the TLS handshake with the current
    /// certificates, verifying the server as `identity` (see [`ExactIdentity`]).
    pub fn connector(&self, identity: &str) -> Result<Connector, TlsError> {
        // SNI carries the identity when it is a DNS name; a URI has no SNI form.
        let sni = match Identity::parse(identity) {
            Some(Identity::Dns(name)) => ServerName::try_from(name).ok(),
            Some(Identity::Uri(_)) => None,
            None => return Err(TlsError::ServerName(identity.to_string())),
        };
        Ok(Connector {
            config: self.config.clone(),
            expected: Arc::from(identity),
            sni,
        })
    }
}

/// `http://host:port` for `https://host:port` or `host:port`: TLS is ours (see
/// the module comment), so the HTTP/2 layer must see a plain scheme.
fn origin(endpoint: &str) -> Result<Uri, TlsError> {
    let authority = endpoint
        .strip_prefix("https://")
        .unwrap_or(endpoint)
        .trim_end_matches('/');
    let endpoint_error = |reason: String| TlsError::Endpoint {
        endpoint: endpoint.to_string(),
        reason,
    };
    if authority.contains("://") || authority.contains('/') || authority.is_empty() {
        return Err(endpoint_error("expected https://HOST:PORT".into()));
    }
    let uri: Uri = format!("http://{authority}")
        .parse()
        .map_err(|e: http::uri::InvalidUri| endpoint_error(e.to_string()))?;
    if uri.port_u16().is_none() {
        return Err(endpoint_error("no port".into()));
    }
    Ok(uri)
}

/// A `tower::Service<Uri>` for `Endpoint::connect_with_connector*`.
#[derive(Clone)]
pub struct Connector {
    config: Reloading<ClientSide>,
    expected: Arc<str>,
    sni: Option<ServerName<'static>>,
}

impl Connector {
    /// The current client configuration with this peer's exact identity check.
    fn client_config(&self) -> Arc<ClientConfig> {
        let side = self.config.get();
        let mut config = (*side.config).clone();
        config.enable_sni = self.sni.is_some();
        let algorithms = config.crypto_provider().signature_verification_algorithms;
        config
            .dangerous()
            .set_certificate_verifier(Arc::new(ExactIdentity {
                roots: side.roots.clone(),
                expected: self.expected.to_string(),
                algorithms,
            }));
        Arc::new(config)
    }
}

type TlsClientStream = tokio_rustls::client::TlsStream<TcpStream>;
type ClientStream = hyper_util::rt::TokioIo<TlsClientStream>;

impl Connector {
    /// TCP to `uri`'s host and port, then the TLS handshake with the current
    /// certificates and this peer's identity check.
    fn dial(&self, uri: Uri) -> impl Future<Output = io::Result<TlsClientStream>> + Send + 'static {
        let connector = tokio_rustls::TlsConnector::from(self.client_config());
        let sni = self.sni.clone();
        async move {
            let host = uri
                .host()
                .ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidInput, "endpoint without host")
                })?
                .trim_start_matches('[')
                .trim_end_matches(']');
            // Without SNI the name only feeds the verifier, which ignores it.
            let name = match sni {
                Some(name) => name,
                None => ServerName::try_from(host.to_string()).map_err(|_| {
                    io::Error::new(io::ErrorKind::InvalidInput, "endpoint host is no name")
                })?,
            };
            let port = uri.port_u16().unwrap_or(443);
            let tcp = TcpStream::connect((host, port)).await?;
            tcp.set_nodelay(true)?;
            connector.connect(name, tcp).await
        }
    }
}

impl tower::Service<Uri> for Connector {
    type Response = ClientStream;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<ClientStream>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let dial = self.dial(uri);
        Box::pin(async move { Ok(hyper_util::rt::TokioIo::new(dial.await?)) })
    }
}

/// A throwaway certificate authority for `fernetd demo` and tests: makes a CA and
/// issues leaf certificates with given DNS/URI names. Production deployments bring
/// their own PKI; nothing here is persisted except what the caller writes.
pub struct Authority {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    cert_pem: String,
}

/// A certificate and its private key, PEM encoded. The key is wiped on drop.
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: zeroize::Zeroizing<String>,
}

impl std::fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IssuedCert(<redacted key>)")
    }
}

impl Authority {
    pub fn new(common_name: &str) -> Result<Self, rcgen::Error> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let key = rcgen::KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Authority {
            issuer: rcgen::Issuer::new(params, key),
            cert_pem: cert.pem(),
        })
    }

    /// The CA certificate, for every peer's `ca` file.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A leaf certificate for both TLS client and server use, carrying `names`
    /// (DNS names, or URIs when they contain "://") as subject alternative names.
    pub fn issue(&self, names: &[&str]) -> Result<IssuedCert, rcgen::Error> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        for name in names {
            let san = if name.contains("://") {
                rcgen::SanType::URI((*name).try_into()?)
            } else {
                rcgen::SanType::DnsName((*name).try_into()?)
            };
            params.subject_alt_names.push(san);
        }
        if let Some(first) = names.first() {
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, *first);
        }
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = rcgen::KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: zeroize::Zeroizing::new(key.serialize_pem()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_matching_is_exact() {
        let id = PeerIdentity {
            dns: vec!["rotator.fernetd".into()],
            uris: vec!["spiffe://cloud/rotator".into()],
        };
        assert!(id.matches("rotator.fernetd"));
        assert!(id.matches("spiffe://cloud/rotator"));
        assert!(!id.matches("rotator"));
        assert!(!id.matches("*.fernetd"));
    }

    fn write_identity(dir: &Path, name: &str, ca: &Authority, sans: &[&str]) -> TlsConfig {
        let issued = ca.issue(sans).unwrap();
        let files = TlsConfig {
            ca: dir.join(format!("{name}-ca.pem")),
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
        };
        std::fs::write(&files.ca, ca.cert_pem()).unwrap();
        std::fs::write(&files.cert, &issued.cert_pem).unwrap();
        std::fs::write(&files.key, issued.key_pem.as_bytes()).unwrap();
        files
    }

    /// A health server behind `ServerTls` that answers with the caller's identity
    /// in the status message, so the test sees what handlers see.
    async fn start_server(files: &TlsConfig) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
        start_server_watched(files, FileWatch::shared()).await
    }

    async fn start_server_watched(
        files: &TlsConfig,
        watcher: &FileWatch,
    ) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tls = ServerTls::load_watched(files, watcher).unwrap();
        let (health, service) = tonic_health::server::health_reporter();
        health
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .layer(tower::util::MapRequestLayer::new(
                    |req: http::Request<tonic::body::Body>| {
                        let peer = req.extensions().get::<PeerInfo>().cloned();
                        assert!(peer.is_some(), "every request carries the peer identity");
                        req
                    },
                ))
                .add_service(service)
                .serve_with_incoming_shutdown(tls.incoming(listener), async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        (addr, stop)
    }

    async fn check(client: &ClientTls, addr: SocketAddr, name: &str) -> Result<(), tonic::Status> {
        let channel = client.channel(&format!("https://{addr}"), name).unwrap();
        tonic_health::pb::health_client::HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .map(|_| ())
    }

    #[tokio::test]
    async fn mutual_tls_accepts_our_ca_only_and_checks_the_server_name() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::new("test CA").unwrap();
        let other_ca = Authority::new("other CA").unwrap();
        let server = write_identity(dir.path(), "agent", &ca, &["agent-1.test"]);
        let (addr, _stop) = start_server(&server).await;

        let good = write_identity(dir.path(), "rotator", &ca, &["rotator.test"]);
        let good = ClientTls::load(&good).unwrap();
        check(&good, addr, "agent-1.test").await.unwrap();
        // The server's certificate does not carry this name: refused by the client.
        assert!(check(&good, addr, "agent-2.test").await.is_err());

        // A client certificate from another CA: refused by the server.
        let mut stranger = write_identity(dir.path(), "stranger", &other_ca, &["rotator.test"]);
        stranger.ca = server.ca.clone();
        let stranger = ClientTls::load(&stranger).unwrap();
        assert!(check(&stranger, addr, "agent-1.test").await.is_err());
    }

    /// Two full handshakes between `server` and `client` (one verifier
    /// instance for both, so that only the session stores decide whether the
    /// second resumes): how the second went and how many tickets the client
    /// was sent in all.
    async fn two_handshakes(
        server: ServerConfig,
        mut client: ClientConfig,
        roots: Arc<RootCertStore>,
    ) -> (rustls::HandshakeKind, u32) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let mut tls = acceptor.accept(tcp).await.unwrap();
                // Behind the tickets, if any: the client reads up to here.
                tls.write_all(b"x").await.unwrap();
                let _ = tls.read(&mut [0u8; 1]).await;
            }
        });
        let algorithms = client.crypto_provider().signature_verification_algorithms;
        client
            .dangerous()
            .set_certificate_verifier(Arc::new(ExactIdentity {
                roots,
                expected: "agent-1.test".into(),
                algorithms,
            }));
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let mut tickets = 0;
        let mut kind = None;
        for _ in 0..2 {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let name = ServerName::try_from("agent-1.test").unwrap();
            let mut tls = connector.connect(name, tcp).await.unwrap();
            let mut byte = [0u8; 1];
            tls.read_exact(&mut byte).await.unwrap();
            tickets += tls.get_ref().1.tls13_tickets_received();
            kind = tls.get_ref().1.handshake_kind();
        }
        (kind.unwrap(), tickets)
    }

    /// No TLS session is ever resumed, from either side: our server sends no
    /// ticket (even to a client that would keep it), our client keeps none
    /// (even from a server that sends them). The control pair, a server that
    /// sends tickets and a client that keeps them, resumes.
    #[tokio::test]
    async fn tls_sessions_are_never_resumed() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::new("test CA").unwrap();
        let server =
            build_server(&write_identity(dir.path(), "agent", &ca, &["agent-1.test"])).unwrap();
        let client = build_client(&write_identity(
            dir.path(),
            "rotator",
            &ca,
            &["rotator.test"],
        ))
        .unwrap();
        let issuing = || {
            let mut config = (*server).clone();
            config.send_tls13_tickets = 2;
            config.session_storage = rustls::server::ServerSessionMemoryCache::new(16);
            config
        };
        let keeping = || {
            let mut config = (*client.config).clone();
            config.resumption = rustls::client::Resumption::in_memory_sessions(16);
            config
        };
        let roots = || client.roots.clone();

        let (kind, tickets) = two_handshakes(issuing(), keeping(), roots()).await;
        assert_eq!(
            (kind, tickets),
            (rustls::HandshakeKind::Resumed, 4),
            "control"
        );

        let (kind, tickets) = two_handshakes((*server).clone(), keeping(), roots()).await;
        assert_eq!(
            (kind, tickets),
            (rustls::HandshakeKind::Full, 0),
            "our server"
        );

        let ours = (*client.config).clone();
        let (kind, tickets) = two_handshakes(issuing(), ours, roots()).await;
        assert_eq!(
            (kind, tickets),
            (rustls::HandshakeKind::Full, 4),
            "our client"
        );
    }

    /// The fan-out's bare connection: calls go through, a wrong identity is
    /// UNAVAILABLE, and a server that sends its connections away after an age
    /// limit (GOAWAY, then close) sees the client dial again, no call lost.
    #[tokio::test]
    async fn a_connection_dials_lazily_checks_the_identity_and_redials() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::new("test CA").unwrap();
        let server = write_identity(dir.path(), "agent", &ca, &["agent-1.test"]);
        let client = write_identity(dir.path(), "rotator", &ca, &["rotator.test"]);
        let client = ClientTls::load(&client).unwrap();
        let tls = ServerTls::load(&server).unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        // A health server on `listener` counting the connections it accepts,
        // until told to stop (gracefully: it ends once its connections have).
        let serve = |listener: TcpListener| {
            let counted = accepted.clone();
            let incoming = tokio_stream::StreamExt::map(tls.incoming(listener), move |c| {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                c
            });
            let (_, health) = tonic_health::server::health_reporter();
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let server = tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(health)
                    .serve_with_incoming_shutdown(incoming, async {
                        let _ = stopped.await;
                    }),
            );
            (stop, server)
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, server) = serve(listener);

        let check = |connection: &Connection| {
            let mut client = tonic_health::pb::health_client::HealthClient::new(connection.clone());
            async move {
                client
                    .check(tonic_health::pb::HealthCheckRequest::default())
                    .await
            }
        };
        let wrong = client
            .connection(&format!("https://{addr}"), "agent-2.test")
            .unwrap();
        let refused = check(&wrong).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
        let accepted_count = || accepted.load(std::sync::atomic::Ordering::SeqCst);
        let before = accepted_count();

        let connection = client
            .connection(&format!("https://{addr}"), "agent-1.test")
            .unwrap();
        assert!(
            !connection.is_open(),
            "nothing dialled before the first call"
        );
        for call in 0..5 {
            check(&connection)
                .await
                .unwrap_or_else(|s| panic!("call {call}: {s:?}"));
        }
        assert_eq!(accepted_count() - before, 1, "five calls, one connection");

        // The agent restarts: its connection closes, the next call dials anew.
        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while connection.is_open() {
            assert!(
                std::time::Instant::now() < deadline,
                "the close is never seen"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (_stop, _server) = serve(TcpListener::bind(addr).await.unwrap());
        check(&connection).await.expect("a call after the restart");
        assert!(connection.is_open());
        assert_eq!(accepted_count() - before, 2, "one more dial");
    }

    #[tokio::test]
    async fn the_agent_certificate_must_carry_the_configured_identity_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::new("test CA").unwrap();
        let client = write_identity(dir.path(), "rotator", &ca, &["rotator.test"]);
        let client = ClientTls::load(&client).unwrap();

        // A wildcard certificate is not every region's certificate.
        let wildcard = write_identity(dir.path(), "wild", &ca, &["*.agents.test"]);
        let (addr, _stop) = start_server(&wildcard).await;
        assert!(
            check(&client, addr, "region-one.agents.test")
                .await
                .is_err()
        );
        assert!(client.connector("*.agents.test").is_err());

        // A URI identity works, and only the one configured.
        let uri = write_identity(dir.path(), "uri", &ca, &["spiffe://cloud/agent/region-one"]);
        let (addr, _stop) = start_server(&uri).await;
        check(&client, addr, "spiffe://cloud/agent/region-one")
            .await
            .unwrap();
        assert!(
            check(&client, addr, "spiffe://cloud/agent/region-two")
                .await
                .is_err()
        );
    }

    #[test]
    fn the_reload_fingerprint_keeps_no_key_bytes_and_sees_changes() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::new("test CA").unwrap();
        let files = write_identity(dir.path(), "agent", &ca, &["agent-1.test"]);
        let key = std::fs::read(&files.key).unwrap();
        let before = fingerprint(&files);
        for part in before.iter().flatten() {
            let part: &[u8] = part.as_ref();
            assert!(
                !key.windows(16).any(|w| part.windows(16).any(|p| p == w)),
                "the fingerprint holds private-key bytes"
            );
            assert!(part.len() <= 32);
        }
        write_identity(dir.path(), "agent", &ca, &["agent-1.test"]);
        assert_ne!(fingerprint(&files), before);
    }

    #[tokio::test]
    async fn peer_identity_comes_from_the_client_certificate() {
        let id = PeerIdentity::from_der(
            &CertificateDer::from_pem_slice(
                Authority::new("ca")
                    .unwrap()
                    .issue(&["admin.test", "spiffe://cloud/admin"])
                    .unwrap()
                    .cert_pem
                    .as_bytes(),
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(
            id.names().collect::<Vec<_>>(),
            ["admin.test", "spiffe://cloud/admin"]
        );
    }

    /// A URI SAN spelled like a host name is no DNS name: it matched a DNS
    /// identity when both kinds of SAN were one list.
    #[test]
    fn uri_and_dns_names_are_separate_namespaces() {
        let ca = Authority::new("ca").unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![
            rcgen::SanType::URI("rotator.example.net".try_into().unwrap()),
            rcgen::SanType::DnsName("spiffe.example.net".try_into().unwrap()),
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &ca.issuer).unwrap();
        let id = PeerIdentity::from_der(cert.der()).unwrap();
        assert!(
            !id.matches("rotator.example.net"),
            "a URI SAN matched a DNS identity"
        );
        assert!(!id.matches("dns:rotator.example.net"));
        assert!(id.matches("uri:rotator.example.net"));
        assert!(id.matches("spiffe.example.net"));
        assert!(
            id.matches("dns:SPIFFE.example.net"),
            "DNS names compare without case"
        );
        assert!(!id.matches("uri:spiffe.example.net"));

        let spiffe = PeerIdentity {
            dns: vec![],
            uris: vec!["spiffe://cloud/rotator".into()],
        };
        assert!(spiffe.matches("spiffe://cloud/rotator"));
        assert!(spiffe.matches("uri:spiffe://cloud/rotator"));
        assert!(!spiffe.matches("spiffe://cloud/ROTATOR"), "URIs are exact");
        assert!(!spiffe.matches("dns:spiffe://cloud/rotator"));
    }

    #[test]
    fn identities_are_typed_by_prefix_or_form() {
        assert_eq!(
            Identity::parse("rotator.example.net"),
            Some(Identity::Dns("rotator.example.net".into()))
        );
        assert_eq!(
            Identity::parse("dns:rotator.example.net"),
            Some(Identity::Dns("rotator.example.net".into()))
        );
        assert_eq!(
            Identity::parse("spiffe://cloud/rotator"),
            Some(Identity::Uri("spiffe://cloud/rotator".into()))
        );
        assert_eq!(
            Identity::parse("uri:spiffe://cloud/rotator"),
            Some(Identity::Uri("spiffe://cloud/rotator".into()))
        );
        for bad in [
            "",
            "dns:",
            "*.example.net",
            "dns:*.example.net",
            "dns:spiffe://x/y",
            "uri:",
        ] {
            assert_eq!(Identity::parse(bad), None, "{bad}");
            assert!(!valid_identity(bad), "{bad}");
        }
    }

    #[tokio::test]
    async fn certificates_are_reloaded_without_restart() {
        reload_is_seen(FileWatch::shared()).await;
    }

    /// Where no inotify instance can be had ("Too many open files"), the daemon
    /// still starts and a replaced certificate is still picked up, by polling.
    #[tokio::test]
    async fn certificates_are_reloaded_by_polling_when_inotify_is_unavailable() {
        let watcher = FileWatch::start(
            |_| {
                Err(notify::Error::io(io::Error::from_raw_os_error(
                    rustix::io::Errno::MFILE.raw_os_error(),
                )))
            },
            Duration::from_millis(50),
        );
        assert!(watcher.is_polling());
        reload_is_seen(&watcher).await;
    }

    async fn reload_is_seen(watcher: &FileWatch) {
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::new("test CA").unwrap();
        let new_ca = Authority::new("new CA").unwrap();
        let server = write_identity(dir.path(), "agent", &ca, &["agent-1.test"]);
        let (addr, _stop) = start_server_watched(&server, watcher).await;

        // A client of the new CA is refused until the server trusts the new CA.
        let client = write_identity(dir.path(), "rotator", &new_ca, &["rotator.test"]);
        std::fs::write(&client.ca, ca.cert_pem()).unwrap();
        let client = ClientTls::load_once(&client).unwrap();
        assert!(check(&client, addr, "agent-1.test").await.is_err());

        let both = format!("{}{}", ca.cert_pem(), new_ca.cert_pem());
        let staging = dir.path().join("agent-ca.pem.new");
        std::fs::write(&staging, both).unwrap();
        std::fs::rename(&staging, &server.ca).unwrap();

        // Poll until the watcher has swapped the configuration in (bounded).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if check(&client, addr, "agent-1.test").await.is_ok() {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "reload not seen in 10 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
