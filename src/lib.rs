//! fernetd rotates OpenStack Keystone Fernet keys on one rotator and distributes
//! every generation over mutual-TLS gRPC to an agent in each region, promoting a key
//! only once every region holds it. See DESIGN.md for the contract; each module
//! below owns one responsibility.
#![forbid(unsafe_code)]

pub mod admin;
pub mod agent;
pub mod cli;
pub mod config;
pub mod demo;
pub mod install;
pub mod metrics;
pub mod policy;
pub mod repository;
pub mod rotator;
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

/// The version every daemon reports in `GetState` and `Status`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
