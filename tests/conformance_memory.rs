//! The conformance suite on the in-memory broker.

cqrs::conformance_suite!(async { cqrs::memory::MemoryBroker::new() });
