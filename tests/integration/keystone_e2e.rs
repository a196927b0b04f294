//! Integration tests: keystone_e2e.
