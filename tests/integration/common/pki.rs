//! Test PKI made at run time: certificate authorities and leaf certificates
//! with chosen SANs (both server and client usage), written as PEM files in the
//! layout `config::TlsConfig` expects. Nothing here is checked in, so
//! no test depends on a certificate that expires or leaks.

use std::path::{Path, PathBuf};

use fernetd::tls::Authority;

/// A certificate authority that can issue leaf certificates (the library's
/// throwaway [`Authority`], with test-friendly panics and file helpers).
pub struct Ca {
    authority: Authority,
}

impl Ca {
    /// A fresh self-signed CA whose subject common name is `name`.
    pub fn new(name: &str) -> Ca {
        Ca {
            authority: Authority::new(name).expect("make a test CA"),
        }
    }

    /// The CA certificate (PEM), what peers put in their trust store.
    pub fn cert_pem(&self) -> &str {
        self.authority.cert_pem()
    }

    /// A leaf certificate valid for TLS server and client authentication with
    /// the given SANs (DNS names, or URIs when they contain "://").
    pub fn issue(&self, sans: &[&str]) -> Leaf {
        let issued = self
            .authority
            .issue(sans)
            .expect("issue a test certificate");
        Leaf {
            cert_pem: issued.cert_pem.clone(),
            key_pem: issued.key_pem.to_string(),
        }
    }

    /// Writes the CA certificate to `path` (parents created) and returns it.
    pub fn write(&self, path: &Path) -> PathBuf {
        write_file(path, self.cert_pem());
        path.to_path_buf()
    }
}

/// A leaf certificate and its private key, both PEM.
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Leaf {
    /// Writes `DIR/NAME.pem` and `DIR/NAME.key` and returns their paths.
    pub fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let cert = dir.join(format!("{name}.pem"));
        let key = dir.join(format!("{name}.key"));
        write_file(&cert, &self.cert_pem);
        write_file(&key, &self.key_pem);
        (cert, key)
    }

    /// A tonic client identity for this certificate.
    pub fn identity(&self) -> tonic::transport::Identity {
        tonic::transport::Identity::from_pem(&self.cert_pem, &self.key_pem)
    }
}

/// The three files of one TLS endpoint, as `config::TlsConfig` names them.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// Writes `ca`'s certificate and `leaf` under `dir` as `ca.pem`, `NAME.pem`,
    /// `NAME.key`.
    pub fn write(dir: &Path, name: &str, ca: &Ca, leaf: &Leaf) -> TlsFiles {
        let ca = ca.write(&dir.join("ca.pem"));
        let (cert, key) = leaf.write(dir, name);
        TlsFiles { ca, cert, key }
    }

    /// The same files as the daemons' configuration type.
    pub fn to_config(&self) -> fernetd::config::TlsConfig {
        fernetd::config::TlsConfig {
            ca: self.ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
        }
    }
}

/// Writes through a temporary sibling and a rename, so a daemon watching the
/// file never reads it half-written.
pub fn write_file(path: &Path, content: &str) {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).expect("create PEM directory");
    }
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, content).expect("write PEM");
    std::fs::rename(&tmp, path).expect("rename PEM into place");
}

/// A client TLS configuration for tonic: trusts `ca_pem`, presents `identity`
/// (or no certificate at all), and expects the server to be `server_name`.
pub fn client_tls(
    ca_pem: &str,
    identity: Option<&Leaf>,
    server_name: &str,
) -> tonic::transport::ClientTlsConfig {
    let mut tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca_pem))
        .domain_name(server_name);
    if let Some(leaf) = identity {
        tls = tls.identity(leaf.identity());
    }
    tls
}
