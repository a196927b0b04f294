//! Shared harness for the integration tests.
#![allow(dead_code)]

pub mod keystone;

use std::path::PathBuf;

/// The `fernetd` binary cargo built for this test run.
pub fn fernetd_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_fernetd"))
}
pub mod daemon;
pub mod debian;
pub mod etcd;
pub mod pki;
pub mod proxy;
