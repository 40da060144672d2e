//! The offsets a Kafka commit's metadata names handled above its offset (`cqrs-handled:1:`), read
//! when a processor's member is assigned a partition: the metadata is whatever any member of the
//! group, or any other client, committed. No panic; runs in increasing order, none empty or
//! overlapping the next, all at or above the committed offset, no more of them than the
//! metadata has bytes over 4 (memory bounded by the input); what the writer writes stays
//! within its bound and reads back as the runs it took; and a union keeps every run of both.
#![no_main]

#[allow(dead_code)]
#[path = "../../cqrs-kafka/src/consumer/handled.rs"]
mod handled;

use arbitrary::Arbitrary;
use handled::{Encoder, Handled, METADATA_MAX};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    committed: i64,
    /// Read as a committed offset's metadata, with `committed` (some inputs get the form's
    /// prefix, so that the numbers are read).
    metadata: String,
    prefixed: bool,
    /// Written: a position, then (offsets skipped, offsets handled) runs from there.
    position: u32,
    runs: Vec<(u16, u16)>,
}

fuzz_target!(|input: Input| {
    let metadata = if input.prefixed {
        format!("cqrs-handled:1:{}", input.metadata)
    } else {
        input.metadata
    };
    if let Some(mut read) = Handled::parse(input.committed, &metadata) {
        let runs: Vec<(i64, i64)> = read.runs().collect();
        assert!(!runs.is_empty());
        assert!(runs.len() <= metadata.len() / 4, "{} runs", runs.len());
        let mut at = input.committed;
        for &(start, end) in &runs {
            assert!(at <= start && start < end, "{runs:?} at {}", input.committed);
            at = end;
        }
        // Asked in increasing order, it names the offsets of its runs and not those between.
        let mut gap = None;
        for &(start, end) in &runs {
            if let Some(between) = gap.filter(|&g| g < start) {
                assert!(!read.contains(between), "{between} in {runs:?}");
            }
            assert!(read.contains(start) && read.contains(end - 1), "{runs:?}");
            gap = Some(end);
        }
        assert!(!read.contains(at) && read.is_empty());
    }

    let position = i64::from(input.position);
    let mut encoder = Encoder::new(position);
    let (mut at, mut taken) = (position, Vec::new());
    for (skip, run) in input.runs {
        let start = at + i64::from(skip);
        let end = start + i64::from(run) + 1;
        if !encoder.push(start, end) {
            break;
        }
        taken.push((start, end));
        at = end;
    }
    match encoder.finish() {
        Some(written) => {
            assert!(written.len() <= METADATA_MAX, "{} bytes", written.len());
            let read = Handled::parse(position, &written).expect("what is written reads back");
            assert_eq!(read.runs().collect::<Vec<_>>(), taken);
        }
        None => assert!(taken.is_empty()),
    }

    // What was read joined with offsets listed one by one (acks after a revocation): runs in
    // order, apart (touching ones joined), each run of either inside one of them.
    let read = Handled::parse(input.committed, &metadata).unwrap_or_default();
    let listed = Handled::of(taken.iter().flat_map(|&(start, end)| start..end).take(10_000));
    let joined: Vec<(i64, i64)> = read.union(&listed).runs().collect();
    for pair in joined.windows(2) {
        assert!(pair[0].0 < pair[0].1 && pair[0].1 < pair[1].0, "{joined:?}");
    }
    for (start, end) in read.runs().chain(listed.runs()) {
        let at = joined.partition_point(|&(_, e)| e < end);
        assert!(
            joined.get(at).is_some_and(|&(s, e)| s <= start && end <= e),
            "{start}..{end} not in {joined:?}"
        );
    }
});
