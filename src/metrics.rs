//! Prometheus metrics for both daemons and the small HTTP endpoint that serves them.
