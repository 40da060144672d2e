//! The benchmarks (`bench_*`, `docs/benchmarks.md`) and the fault-injection soak (`soak`,
//! `docs/reliability.md`) of cqrs, as binaries of this package, apart from `examples/` (which
//! holds what a user would copy). `support` has what they share.
//!
//! ```sh
//! cargo run --release -p cqrs-tools --bin bench_kafka
//! scripts/soak kafka
//! ```

pub mod support;
