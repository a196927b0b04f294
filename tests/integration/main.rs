//! The one integration test target: each module exercises one area against the
//! real `fernetd` binary and, where it matters, real Keystone 30.0.0.

mod agent;
mod cloud;
mod common;
mod completions;
mod credential;
mod docs;
mod keystone_e2e;
mod keystone_vip;
mod monitoring;
mod package;
mod repo;
mod rotator;
mod systemd;
mod token;
mod watch;
