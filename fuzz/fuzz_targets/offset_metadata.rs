//! The bookkeeping of a Kafka dead-letter topic, read from the broker (a committed offset and
//! its metadata): no panic, work and memory bounded by the partition's size, errors that echo
//! a bounded part, and what is written back reads back the same.
#![no_main]

#[allow(dead_code)]
#[path = "../../cqrs-kafka/src/bookkeeping.rs"]
mod bookkeeping;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Committed {
    offset: Option<i64>,
    metadata: String,
    /// The partition's first offset, and how many offsets it holds (up to 100,000 here: a
    /// reader holds that many records of it anyway).
    low: u32,
    len: u32,
}

fuzz_target!(|c: Committed| {
    let low = i64::from(c.low);
    let high = low + i64::from(c.len % 100_001);
    match bookkeeping::Done::parse(c.offset, &c.metadata, low, high) {
        Ok(done) => {
            assert!(done.above.len() as i64 <= high - low);
            let written = done.metadata();
            let again = bookkeeping::Done::parse(Some(done.next), &written, low, high)
                .expect("what is written reads back");
            assert_eq!(again, done);
        }
        Err(why) => assert!(why.len() <= 512, "an error of {} bytes", why.len()),
    }
});
