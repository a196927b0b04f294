//! The one integration test target: each module exercises one area against the
//! real `fernetd` binary and, where it matters, real Keystone 30.0.0. Every
//! module it mounts is listed here.
//!
//! The fast tier (`scripts/fast-tests`) runs the modules marked "quick" below
//! (and `cargo test --lib`): they start no Keystone, etcd or package install
//! and no long fault or soak run. `cargo test` runs everything.

// quick
mod architecture;
mod audit;
mod check;
mod completions;
mod controllers;
mod docs;
mod enrolment;
mod lifetimes;
mod readiness;
mod recovery;
mod watch;

// slow: Keystone, etcd, packages, or long fault and soak runs
mod agent;
mod chaos;
mod cloud;
mod credential;
mod faults;
mod ha;
mod keystone_e2e;
mod keystone_vip;
mod monitoring;
mod package;
mod quarantine;
mod repo;
mod rotator;
mod skew;
mod soak;
mod systemd;
mod token;

mod common;
