//! Prometheus metrics for both daemons and the small HTTP endpoint that serves them
//! (`GET /metrics`, text exposition format). Each daemon registers its own metrics
//! in a `Registry`; this module only serves it. The endpoint is plain HTTP, as
//! Prometheus scrapes are; bind it to loopback or a management network.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// The `repository` label that both daemons' per-repository metrics carry.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct RepoLabel {
    pub repository: String,
}

impl RepoLabel {
    pub fn new(repository: &str) -> Self {
        RepoLabel {
            repository: repository.to_owned(),
        }
    }
}

/// Registers a clone of each metric (clones share their values) in a registry:
/// `register!(registry, metric => "name", "help"; ...)`, one line per metric.
macro_rules! register {
    ($registry:expr, $($metric:expr => $name:literal, $help:literal;)+) => {
        $($registry.register($name, $help, $metric.clone());)+
    };
}
pub(crate) use register;

/// Connections served at once; one more is closed at once. A scrape is one
/// connection; the cap keeps a flood from taking descriptors and memory.
pub const MAX_CONNECTIONS: usize = 32;

/// How long a client may take to send its request headers, and to be served.
pub const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
pub const CONNECTION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Serves `registry` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, _) = tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    // Out of descriptors and the like: keep serving once it passes.
                    tracing::warn!(%error, "metrics endpoint: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!("metrics endpoint: connection limit reached, connection closed");
            continue;
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req| {
                let registry = registry.clone();
                async move { Ok::<_, Infallible>(respond(&registry, &req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    tracing::debug!(%error, "metrics endpoint: connection ended with an error");
                }
                Err(_) => tracing::debug!("metrics endpoint: connection timed out"),
            }
        });
    }
}

fn respond<B>(registry: &Registry, req: &Request<B>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET || req.uri().path() != "/metrics" {
        return plain(
            StatusCode::NOT_FOUND,
            "not found; try GET /metrics\n".into(),
        );
    }
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, registry) {
        Ok(()) => {
            let mut response = plain(StatusCode::OK, body);
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            response
        }
        Err(_) => plain(
            StatusCode::INTERNAL_SERVER_ERROR,
            "encoding failed\n".into(),
        ),
    }
}

fn plain(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        stream.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_registered_metrics_and_404s_elsewhere() {
        let mut registry = Registry::default();
        let counter = Counter::<u64>::default();
        registry.register(
            "fernetd_test_events",
            "Events seen by the test",
            counter.clone(),
        );
        counter.inc_by(7);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, Arc::new(registry), async {
            let _ = stopped.await;
        }));

        let ok = get(addr, "/metrics").await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(ok.contains("fernetd_test_events_total 7"), "{ok}");
        let missing = get(addr, "/other").await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");

        stop.send(()).unwrap();
        server.await.unwrap();
    }

    /// Silent clients beyond the cap are closed at once, and the silent ones
    /// are closed at the header timeout, after which a scrape gets through.
    #[tokio::test]
    async fn silent_clients_are_capped_and_timed_out() {
        use std::time::Duration;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(
            listener,
            Arc::new(Registry::default()),
            std::future::pending(),
        ));
        let mut silent = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            silent.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        let mut extra = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(2), extra.read_to_end(&mut buf))
            .await
            .expect("a connection beyond the cap is closed at once")
            .unwrap();
        assert!(buf.is_empty());
        for mut s in silent {
            let mut buf = Vec::new();
            let closed =
                tokio::time::timeout(HEADER_READ_TIMEOUT * 3, s.read_to_end(&mut buf)).await;
            assert!(
                closed.is_ok(),
                "a silent client outlived the header timeout"
            );
        }
        let ok = get(addr, "/metrics").await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        server.abort();
    }
}
