//! The fast tier: `cargo test --test quick` (after `cargo test --lib`) runs in
//! about a minute and needs no Keystone, etcd, package install nor long fault
//! or soak run. Every module it mounts is listed here.

mod architecture;
