//! kafka backend for `cqrs` (work in progress).
