//! A reply from a Redis server (or anything that answers on its port), as the consumer's own
//! connection reads it (`resp`): scanned whole or in two parts, to the same items, with no
//! panic and nothing read past its end.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (u16, &[u8])| {
    let (cut, bytes) = input;
    if let Some(len) = cqrs_redis::fuzzing::scan_reply(bytes, usize::from(cut)) {
        assert!(len <= bytes.len());
    }
});
