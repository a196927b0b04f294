//! The one integration test target: each module exercises one area against the
//! real `fernetd` binary and, where it matters, real Keystone 30.0.0.

mod common;
mod repo;
mod token;
mod agent;
mod rotator;
mod keystone_e2e;
