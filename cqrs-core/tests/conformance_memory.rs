//! The conformance suite on the in-memory broker.

cqrs_core::conformance_suite!(async { cqrs_core::memory::MemoryBroker::new() });
