//! Integration tests: rotator.
