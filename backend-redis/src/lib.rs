//! redis backend for `cqrs` (work in progress).
