//! A Kafka record's headers, key and payload, as any producer may have written them, decoded
//! into a message: no panic, and a bounded reason when it is malformed.
#![no_main]

use arbitrary::Arbitrary;
use cqrs_core::wire::{Entry, Layout};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Record {
    headers: Vec<(String, Option<Vec<u8>>)>,
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    time_ms: Option<u64>,
}

fuzz_target!(|r: Record| {
    // As the consumer does: a header without a value is no field.
    let fields = r
        .headers
        .iter()
        .filter_map(|(k, v)| Some((k.as_str(), v.as_deref()?)));
    let (message, malformed) = Layout::KAFKA.decode(
        fields,
        Entry {
            id: "",
            time_ms: r.time_ms,
        },
        r.key.as_deref(),
        r.payload.map(Into::into),
    );
    let _ = message;
    if let Some(reason) = malformed {
        assert!(reason.len() <= 4096, "a reason of {} bytes", reason.len());
    }
});
