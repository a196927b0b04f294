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

/// The version every daemon reports in `GetState` and `Status`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
