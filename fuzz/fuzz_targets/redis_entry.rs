//! A Redis stream entry, as any client may have written it (`XADD` with any fields), decoded into
//! a message: no panic, and a bounded reason when it is malformed.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Entry {
    id: String,
    fields: Vec<(Vec<u8>, Vec<u8>)>,
}

fuzz_target!(|e: Entry| {
    let (_, malformed) = cqrs_redis::fuzzing::decode_entry(&e.id, e.fields);
    if let Some(reason) = malformed {
        assert!(reason.len() <= 4096, "a reason of {} bytes", reason.len());
    }
});
