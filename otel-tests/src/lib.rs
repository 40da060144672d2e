//! Nothing but tests: see `tests/otel.rs`.
