#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]
//!
//! # Derive attributes
//!
//! `#[derive(Event)]` (and `#[derive(Command)]` with `#[command(...)]`) reads, all optional:
//!
//! | attribute | meaning |
//! |---|---|
//! | `#[event(name = "tickets.BookingConfirmed")]` | the event name (default: the type's name) |
//! | `#[event(topic = "tickets")]` | pins the topic (default: generated from the name by the bus's [`TopicNamer`]) |
//! | `#[event(version = 2)]` | the schema version carried in the metadata (default 1) |
//! | `#[event(version = 3, upcast_from = "OrderPlacedV2")]` | reads older versions: a payload of the named type's version is decoded as that type and converted with `From` (older ones chain through its own `upcast_from`); see `docs/versioning.md` |
//! | `#[event(key)]` on a field, or `#[event(key = "field")]` | the ordering / partition key (the field's `to_string()`) |
//! | `#[event(crate = "path")]` | where the `cqrs` crate is, if renamed |

// The contract (backend traits, envelope, errors, events, codecs, the in-memory broker) lives in
// `cqrs-core`, which a backend author depends on alone; the runtime a user meets (buses,
// processors, handlers, telemetry) lives here, where the user meets it (docs/architecture.md).
pub use cqrs_core::*;

#[cfg(feature = "asyncapi")]
#[cfg_attr(docsrs, doc(cfg(feature = "asyncapi")))]
pub mod asyncapi;
pub mod bus;
pub mod conformance;
pub mod handler;
pub mod middleware;
#[cfg(feature = "otel")]
#[cfg_attr(docsrs, doc(cfg(feature = "otel")))]
pub mod otel;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub mod postgres;
pub mod processor;
pub mod telemetry;
#[cfg(feature = "testing")]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub mod testing;
mod versions;

pub use bus::{CommandBus, EventBus, TopicNamer};
pub use handler::{
    permanent, retry_after, BatchError, BatchHandler, Context, Handler, Permanent, RetryAfter,
};
pub use processor::{
    CommandProcessor, DeliveryMode, EventGroupProcessor, EventProcessor, GroupNamer, GroupState,
    GroupStatus, HandlerOptions, Manifest, RestartPolicy, RetryPolicy, RunningProcessor,
    UnknownEvent,
};

#[cfg(feature = "derive")]
pub use cqrs_derive::{Command, Event};

#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use cqrs_redis as redis;

#[cfg(feature = "kafka")]
#[cfg_attr(docsrs, doc(cfg(feature = "kafka")))]
pub use cqrs_kafka as kafka;

#[cfg(feature = "prometheus")]
#[cfg_attr(docsrs, doc(cfg(feature = "prometheus")))]
pub use metrics_exporter_prometheus as prometheus;

/// Awaits `f` in `span`. A disabled span (nothing records its level) is not entered: entering
/// and leaving one still cost ~140 instructions a message (`tracing`'s `log` feature looks at the
/// `log` crate's level at each step). Buses publish and processors handle through it.
pub(crate) fn in_span<F: std::future::Future>(
    span: tracing::Span,
    f: F,
) -> futures_util::future::Either<F, tracing::instrument::Instrumented<F>> {
    // A function, not an `async fn`: that held `f` twice (as its argument and as the future it
    // awaited), doubling the size of every future around it.
    use futures_util::future::Either;
    use tracing::Instrument;
    if span.is_disabled() {
        Either::Left(f)
    } else {
        Either::Right(f.instrument(span))
    }
}

/// Entry points for the fuzz targets in `fuzz/`: decoders of what comes from outside.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    /// Whether the W3C trace context in these header values reads as a valid remote context.
    pub fn trace_context(traceparent: &str, tracestate: Option<&str>) -> bool {
        let mut headers = std::collections::BTreeMap::new();
        headers.insert(crate::otel::TRACEPARENT.to_owned(), traceparent.to_owned());
        if let Some(state) = tracestate {
            headers.insert(crate::otel::TRACESTATE.to_owned(), state.to_owned());
        }
        crate::otel::extract(&headers).is_some()
    }
}

#[doc(hidden)]
pub mod __private {
    pub use cqrs_core::codec::{Codec, DefaultCodec};
    pub use cqrs_core::{CodecError, Command, Event};
    pub use std::string::{String, ToString};
}
