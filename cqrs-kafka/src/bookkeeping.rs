//! The bookkeeping of a Kafka dead-letter topic: what was redriven or purged on a partition, as
//! a committed offset and its metadata (see [`crate::dead_letters`]). Free of the client, so that
//! the parser of metadata read from the broker can be fuzzed on its own (`fuzz/`).

use std::collections::BTreeSet;

/// The format of the offsets' metadata: this prefix, then ranges `a-b` and single offsets,
/// comma-separated.
pub(crate) const FORMAT: &str = "v1:";
/// Kafka keeps at most `offset.metadata.max.bytes` (4 KiB by default) per committed offset.
pub(crate) const MAX_METADATA: usize = 4000;

/// What is done on one partition: every record below `next`, and those in `above`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Done {
    pub(crate) next: i64,
    pub(crate) above: BTreeSet<i64>,
}

impl Done {
    /// The state a committed `offset` with `metadata` describes; `low` is the partition's first
    /// record (those below it are gone anyway), `high` one past its last. Offsets at or past
    /// `high` hold no record: ranges are cut there (metadata such as `v1:0-9000000000000000000`
    /// would otherwise be expanded offset by offset), and a committed offset past it means the
    /// topic was made again since, so nothing of it is done.
    pub(crate) fn parse(
        committed: Option<i64>,
        metadata: &str,
        low: i64,
        high: i64,
    ) -> std::result::Result<Done, String> {
        let next = match committed {
            Some(o) if o > high => {
                return Ok(Done {
                    next: low,
                    above: BTreeSet::new(),
                })
            }
            Some(o) => o.max(low),
            None => low,
        };
        let mut above = BTreeSet::new();
        if !metadata.is_empty() {
            // Read from the broker: echoed in part (Kafka keeps up to 4 KiB of it).
            let shown = || cqrs_core::dead_letter::bounded(metadata, 64);
            let ranges = metadata
                .strip_prefix(FORMAT)
                .ok_or_else(|| format!("metadata `{}` is not in the {FORMAT} format", shown()))?;
            for part in ranges.split(',').filter(|p| !p.is_empty()) {
                let bad = || {
                    let part = cqrs_core::dead_letter::bounded(part, 64);
                    format!("`{part}` in metadata `{}` is not an offset range", shown())
                };
                let (a, b) = part.split_once('-').unwrap_or((part, part));
                let (a, b): (i64, i64) =
                    (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
                if a > b {
                    return Err(bad());
                }
                above.extend(a.max(next)..=b.min(high - 1));
            }
        }
        Ok(Done { next, above })
    }

    pub(crate) fn contains(&self, offset: i64) -> bool {
        offset < self.next || self.above.contains(&offset)
    }

    /// Marks `offset` done, then moves `next` past every done offset (read up to `end` or not)
    /// and every offset below `end` that holds no record (`records`: the partition's records
    /// from `next` to `end`).
    pub(crate) fn mark(&mut self, offset: i64, records: &BTreeSet<i64>, end: i64) {
        if offset >= self.next {
            self.above.insert(offset);
        }
        while self.above.contains(&self.next) || (self.next < end && !records.contains(&self.next))
        {
            self.above.remove(&self.next);
            self.next += 1;
        }
    }

    /// `v1:` and the offsets above `next`, as ranges.
    pub(crate) fn metadata(&self) -> String {
        if self.above.is_empty() {
            return String::new();
        }
        let mut out = String::from(FORMAT);
        let mut it = self.above.iter().copied().peekable();
        while let Some(start) = it.next() {
            let mut end = start;
            while it.peek() == Some(&(end + 1)) {
                end += 1;
                it.next();
            }
            if out.len() > FORMAT.len() {
                out.push(',');
            }
            if start == end {
                out.push_str(&start.to_string());
            } else {
                out.push_str(&format!("{start}-{end}"));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(r: std::ops::Range<i64>) -> BTreeSet<i64> {
        r.collect()
    }

    #[test]
    fn marking_in_order_moves_the_offset_and_out_of_order_writes_ranges() {
        let all = records(10..20);
        let mut d = Done::parse(None, "", 10, 100).unwrap();
        d.mark(10, &all, 20);
        assert_eq!((d.next, d.metadata()), (11, String::new()));
        for o in [13, 14, 15, 17] {
            d.mark(o, &all, 20);
        }
        assert_eq!((d.next, d.metadata().as_str()), (11, "v1:13-15,17"));
        assert_eq!(Done::parse(Some(11), "v1:13-15,17", 0, 100), Ok(d.clone()));
        d.mark(12, &all, 20);
        d.mark(11, &all, 20);
        assert_eq!((d.next, d.metadata().as_str()), (16, "v1:17"));
        assert!(d.contains(17) && d.contains(3) && !d.contains(16));
    }

    #[test]
    fn offsets_done_beyond_what_was_read_move_the_offset_too() {
        // 11 and 12 were redriven ahead of 10; a read by id of 10 alone ends at 11.
        let mut d = Done::parse(Some(10), "v1:11-12,14", 0, 100).unwrap();
        d.mark(10, &records(10..11), 11);
        assert_eq!((d.next, d.metadata()), (13, "v1:14".to_owned()));
    }

    #[test]
    fn offsets_without_a_record_do_not_hold_the_offset_back() {
        // 12 is a transaction marker: no record there.
        let some: BTreeSet<i64> = [10, 11, 13].into();
        let mut d = Done::parse(Some(10), "", 0, 100).unwrap();
        d.mark(11, &some, 14);
        d.mark(13, &some, 14);
        assert_eq!((d.next, d.metadata()), (10, "v1:11,13".to_owned()));
        d.mark(10, &some, 14);
        assert_eq!((d.next, d.metadata()), (14, String::new()));
    }

    #[test]
    fn bad_metadata_is_an_error_and_offsets_below_the_log_start_are_done() {
        assert!(Done::parse(Some(1), "garbage", 0, 100).is_err());
        assert!(Done::parse(Some(1), "v1:9-3", 0, 100).is_err());
        assert!(Done::parse(Some(1), "v1:x", 0, 100).is_err());
        let d = Done::parse(Some(1), "v1:2,8", 5, 100).unwrap();
        assert_eq!((d.next, d.metadata()), (5, "v1:8".to_owned()));
    }

    /// Hostile or stale bookkeeping: a range to the end of time is cut at the partition's end
    /// (it was expanded offset by offset: a hang), and an offset past the end (the topic made
    /// again) counts nothing as done.
    #[test]
    fn ranges_stop_at_the_partitions_end_and_an_offset_past_it_is_a_new_topic() {
        let started = std::time::Instant::now();
        let d = Done::parse(Some(1), "v1:0-9000000000000000000", 0, 100).unwrap();
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        assert_eq!((d.next, d.above.len()), (1, 99));
        assert!(d.contains(99) && !d.contains(100));
        let d = Done::parse(Some(500), "v1:600-700", 0, 40).unwrap();
        assert_eq!((d.next, d.above.len()), (0, 0));
        assert!(!d.contains(0));
    }
}
