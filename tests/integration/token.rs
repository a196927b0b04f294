//! Integration tests: token.
