//! OpenTelemetry (feature `otel`): the W3C trace context travels in message headers, and the
//! spans of publishing and handling carry the messaging attributes, through
//! [`tracing-opentelemetry`](https://docs.rs/tracing-opentelemetry).
//!
//! Publishing opens a `send` span (kind producer, named `send <topic>`) and writes its context
//! into each message's `traceparent` (and `tracestate`) header: a Redis field `h.traceparent`, a
//! Kafka header `traceparent`. Handling opens a `process` span per message (kind consumer, named
//! `process <topic>`) with `messaging.system`, `messaging.destination.name`,
//! `messaging.consumer.group.name`, `messaging.message.id`, `messaging.operation.name`/`type`
//! and the attempt (on Kafka also `messaging.destination.partition.id` and
//! `messaging.kafka.offset`), and `error.type` when the attempt fails. The `process` span links to the
//! context it finds in the headers; with [`crate::processor::HandlerOptions::trace_as_child`]
//! it is that context's child, so the handler runs in the publisher's trace.
//!
//! Nothing here installs a tracer: install `tracing-opentelemetry`'s layer with your
//! `opentelemetry_sdk` tracer, as for any `tracing` span. Without that layer the headers are
//! still read and written (a span with no OpenTelemetry context writes none).

use std::collections::BTreeMap;

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The W3C header carrying the trace and span id.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C header carrying vendor trace state.
pub const TRACESTATE: &str = "tracestate";

/// Writes the context of `span` into `headers` (nothing when it has no valid context).
pub(crate) fn inject(span: &tracing::Span, headers: &mut BTreeMap<String, String>) {
    // A disabled span has no context (`context` would give an empty one): nothing to carry.
    if span.is_disabled() {
        return;
    }
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    if !sc.is_valid() {
        return;
    }
    headers.insert(
        TRACEPARENT.to_owned(),
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        ),
    );
    let state = sc.trace_state().header();
    if !state.is_empty() {
        headers.insert(TRACESTATE.to_owned(), state);
    }
}

/// The remote span context in `headers`, if a valid `traceparent` is there.
pub(crate) fn extract(headers: &BTreeMap<String, String>) -> Option<SpanContext> {
    let mut parts = headers.get(TRACEPARENT)?.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version.len() != 2 || version == "ff" || trace.len() != 32 || span.len() != 16 {
        return None;
    }
    let flags = u8::from_str_radix(flags, 16).ok()?;
    let state = headers
        .get(TRACESTATE)
        .and_then(|s| s.parse::<TraceState>().ok())
        .unwrap_or_default();
    let sc = SpanContext::new(
        TraceId::from_hex(trace).ok()?,
        SpanId::from_hex(span).ok()?,
        TraceFlags::new(flags),
        true,
        state,
    );
    sc.is_valid().then_some(sc)
}

/// Joins `span` to the publisher's context found in `headers`: as its child when `child`, and
/// always by a link.
pub(crate) fn join(span: &tracing::Span, headers: &BTreeMap<String, String>, child: bool) {
    // A disabled span takes neither a parent nor a link: the headers need not be read.
    if span.is_disabled() {
        return;
    }
    let Some(sc) = extract(headers) else { return };
    if child {
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(sc.clone()));
    }
    span.add_link(sc);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_reads_back_and_bad_ones_do_not() {
        let mut h = BTreeMap::new();
        h.insert(
            TRACEPARENT.to_owned(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned(),
        );
        h.insert(TRACESTATE.to_owned(), "congo=t61rcWkgMzE".to_owned());
        let sc = extract(&h).expect("valid");
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        assert!(sc.is_sampled() && sc.is_remote());
        assert_eq!(sc.trace_state().header(), "congo=t61rcWkgMzE");
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-xyz-00f067aa0ba902b7-01",
        ] {
            h.insert(TRACEPARENT.to_owned(), bad.to_owned());
            assert!(extract(&h).is_none(), "{bad}");
        }
    }
}
