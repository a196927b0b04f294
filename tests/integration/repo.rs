//! Integration tests for the key repository engine, the atomic installer and `fernetd repo`.
