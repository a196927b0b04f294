//! fernetd rotates OpenStack Keystone Fernet keys on one rotator and distributes
//! every generation over mutual-TLS gRPC to an agent in each region, promoting a key
//! only once every region holds it. Each module below owns one responsibility, and
//! dependencies run one way (ARCHITECTURE.md): formats (`repository`, `token`,
//! `policy`, `config`, `redact`) → mechanisms (`install`, `fswatch`, `tls`, `certs`, `metrics`,
//! `audit`, `seal`) → roles
//! (`rotator`, `agent`) → `demo` → `cli`, the binary's edge.
#![forbid(unsafe_code)]

pub mod agent;
pub mod audit;
pub mod certs;
pub mod cli;
pub mod config;
pub mod demo;
pub mod fswatch;
pub mod install;
pub mod metrics;
pub mod notify;
pub mod policy;
pub mod redact;
pub mod repository;
pub mod rotator;
pub mod seal;
pub mod tls;
pub mod token;

/// Generated gRPC types and services for `proto/fernetd/v1/fernetd.proto`.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("fernetd.v1");
}

/// Formats an error with its sources on one line, for log fields and gRPC
/// status messages (module errors keep their causes in `#[source]`).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        out.push_str(": ");
        out.push_str(&e.to_string());
        source = e.source();
    }
    out
}

/// A gRPC status as one line: code, message, and the root cause when the
/// message does not already say it (a refused certificate shows up there).
pub fn describe_status(status: &tonic::Status) -> String {
    let mut text = format!("{:?}: {}", status.code(), status.message());
    let mut root = None;
    let mut source = std::error::Error::source(status);
    while let Some(s) = source {
        root = Some(s.to_string());
        source = s.source();
    }
    if let Some(root) = root.filter(|r| !text.contains(r.as_str())) {
        text.push_str(": ");
        text.push_str(&root);
    }
    text
}

/// The version every daemon reports in `GetState` and `Status`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
