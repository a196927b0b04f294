//! Certificate expiry for monitoring: the not-after time of the leaf of a PEM
//! certificate chain file, and a Prometheus collector that exports it as
//! `fernetd_certificate_expiry_timestamp_seconds` at scrape time. The file is
//! read on every scrape because certificates are replaced on disk while the
//! daemons run (`tls` reloads them), and an alert must see the new one.

use std::path::{Path, PathBuf};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

/// Why a certificate's expiry could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cannot read certificate file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path}: the first certificate is not valid PEM")]
    Pem {
        path: PathBuf,
        #[source]
        source: x509_parser::error::PEMError,
    },
    #[error("{path}: the first certificate is not valid X.509")]
    X509 {
        path: PathBuf,
        #[source]
        source: x509_parser::nom::Err<x509_parser::error::X509Error>,
    },
}

/// The not-after time (Unix seconds) of the first certificate in a PEM chain
/// file: the leaf, by the convention every TLS chain file follows.
pub fn leaf_not_after(path: &Path) -> Result<i64, CertError> {
    let bytes = std::fs::read(path).map_err(|source| CertError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    not_after_of_pem(&bytes).map_err(|e| e.at(path))
}

/// A parse failure before the path is known.
enum ParseError {
    None,
    Pem(x509_parser::error::PEMError),
    X509(x509_parser::nom::Err<x509_parser::error::X509Error>),
}

impl ParseError {
    fn at(self, path: &Path) -> CertError {
        let path = path.to_path_buf();
        match self {
            ParseError::None => CertError::NoCertificate { path },
            ParseError::Pem(source) => CertError::Pem { path, source },
            ParseError::X509(source) => CertError::X509 { path, source },
        }
    }
}

fn not_after_of_pem(bytes: &[u8]) -> Result<i64, ParseError> {
    // Skip anything that is not a certificate (a key bundled in the same file).
    for pem in x509_parser::pem::Pem::iter_from_buffer(bytes) {
        let pem = pem.map_err(ParseError::Pem)?;
        if pem.label != "CERTIFICATE" {
            continue;
        }
        let (_, cert) =
            x509_parser::parse_x509_certificate(&pem.contents).map_err(ParseError::X509)?;
        return Ok(cert.validity().not_after.timestamp());
    }
    Err(ParseError::None)
}

/// Exports the expiry of the certificate in `path`, read at each scrape.
#[derive(Debug)]
struct ExpiryCollector {
    path: PathBuf,
}

impl Collector for ExpiryCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let not_after = match leaf_not_after(&self.path) {
            Ok(t) => t,
            Err(error) => {
                // No sample rather than a wrong one; the log says why.
                tracing::warn!("certificate expiry metric: {}", crate::error_chain(&error));
                return Ok(());
            }
        };
        let path = self.path.display().to_string();
        let mut family = encoder.encode_descriptor(
            "fernetd_certificate_expiry_timestamp_seconds",
            "Not-after time (Unix seconds) of this daemon's own TLS certificate",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(not_after as f64).encode(family.encode_family(&[("path", path.as_str())])?)
    }
}

/// Registers the scrape-time certificate expiry gauge for `cert` in `registry`
/// (a registry without prefix: the name is the same for every daemon).
pub fn register_expiry(registry: &mut Registry, cert: &Path) {
    registry.register_collector(Box::new(ExpiryCollector {
        path: cert.to_path_buf(),
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_leaf_not_after_and_refuses_garbage() {
        let mut params = rcgen::CertificateParams::new(vec!["leaf.test".into()]).expect("params");
        params.not_after = rcgen::date_time_ymd(2031, 5, 17);
        let key = rcgen::KeyPair::generate().expect("key");
        let leaf = params.self_signed(&key).expect("leaf");
        let mut other = rcgen::CertificateParams::new(vec!["ca.test".into()]).expect("params");
        other.not_after = rcgen::date_time_ymd(2040, 1, 1);
        let ca = other.self_signed(&key).expect("ca");

        let dir = tempfile::tempdir().expect("tempdir");
        let chain = dir.path().join("chain.pem");
        std::fs::write(&chain, format!("{}{}", leaf.pem(), ca.pem())).expect("write");
        // 2031-05-17T00:00:00Z
        assert_eq!(leaf_not_after(&chain).expect("expiry"), 1_936_742_400);

        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").expect("write");
        assert!(matches!(
            leaf_not_after(&junk),
            Err(CertError::NoCertificate { .. })
        ));
        assert!(matches!(
            leaf_not_after(&dir.path().join("missing.pem")),
            Err(CertError::Read { .. })
        ));
    }

    #[test]
    fn the_collector_exports_the_expiry() {
        let mut params = rcgen::CertificateParams::new(vec!["leaf.test".into()]).expect("params");
        params.not_after = rcgen::date_time_ymd(2031, 5, 17);
        let key = rcgen::KeyPair::generate().expect("key");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cert.pem");
        std::fs::write(&path, params.self_signed(&key).expect("cert").pem()).expect("write");
        let mut root = Registry::default();
        register_expiry(&mut root, &path);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &root).expect("encode");
        assert!(
            text.contains("fernetd_certificate_expiry_timestamp_seconds{path=")
                && text.contains("} 1936742400"),
            "{text}"
        );
    }
}
