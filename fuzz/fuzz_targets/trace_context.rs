//! W3C trace context headers (`traceparent`, `tracestate`) as any publisher may have set them:
//! read without a panic.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Headers {
    traceparent: String,
    tracestate: Option<String>,
}

fuzz_target!(|h: Headers| {
    let _ = cqrs::fuzzing::trace_context(&h.traceparent, h.tracestate.as_deref());
});
