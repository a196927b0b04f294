//! Mutual TLS 1.3 for every connection: server and client configurations built from
//! PEM files, re-read when the files change and swapped in through a `watch`
//! channel, and the peer identity (certificate SAN) checked by handlers.
