//! The offsets a commit's metadata names handled above its offset: the form read and written.
//!
//! Only the standard library here: the fuzz target `offset_handled` (in `fuzz/`) builds this
//! file on its own, as it reads what any member of a group (or any other client) may have
//! committed.

use std::collections::VecDeque;
use std::fmt::Write as _;

/// Offsets of a partition handled above its committed offset, as a commit's metadata carries
/// them: Kafka records one offset a partition, below which everything is handled, so a message
/// waiting for a retry holds back the record of everything handled after it on its partition.
/// Without more, a member that dies (or loses its partitions with the broker) has its
/// partitions' next owner handle all of that again: in the Kafka soak, hundreds of messages
/// behind one being retried (docs/reliability.md). The metadata names them, and the next owner
/// passes them over.
///
/// The form: `cqrs-handled:1:` then the offset it starts at (the position it was written for),
/// then pairs of run lengths from there, all in decimal and separated by `,`: so many offsets
/// not handled, then so many handled, and so on (`cqrs-handled:1:100,1,49,2,300`: 100 is not
/// handled, 101-149 are, 150-151 are not, 152-451 are; from 452 on nothing is known). What it
/// names stays true once written (a handled message stays handled), so metadata written for an
/// older position may go with a newer one: the runs below the committed offset are let go. That
/// lets an ack store the metadata made a few milliseconds before instead of making it again.
/// Metadata of another form says nothing (its offsets are handled again: the at-least-once of
/// before); so does a commit without metadata, as any other tool writes (an offset reset). A
/// description that would pass [`METADATA_MAX`] bytes ends before it: the offsets it leaves
/// out are handled again.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Handled(VecDeque<(i64, i64)>);

/// What a commit's metadata begins with when it names offsets handled (see [`Handled`]).
const HANDLED_PREFIX: &str = "cqrs-handled:1:";

/// The longest metadata a commit carries: well under the 4,096 bytes Kafka takes by default
/// (`offset.metadata.max.bytes`); a few hundred runs.
pub(crate) const METADATA_MAX: usize = 2048;

impl Handled {
    /// The offsets at or above `committed` that `metadata`, committed with it, names handled;
    /// `None` for metadata of another form, or naming none there.
    ///
    /// The runs come out in increasing order, each `start..end` with `start < end`, none
    /// overlapping the next, all at or above `committed`, and no more of them than `metadata`
    /// has bytes over 4 (each run takes two numbers and two commas).
    pub(crate) fn parse(committed: i64, metadata: &str) -> Option<Handled> {
        let rest = metadata.strip_prefix(HANDLED_PREFIX)?;
        let mut numbers = rest.split(',');
        let base: i64 = numbers.next()?.parse().ok()?;
        if base < 0 {
            return None;
        }
        let mut ranges = VecDeque::new();
        let mut at = base;
        while let Some(skip) = numbers.next() {
            let skip: i64 = skip.parse().ok()?;
            let run: i64 = numbers.next()?.parse().ok()?;
            if skip < 0 || run <= 0 {
                return None;
            }
            let start = at.checked_add(skip)?;
            at = start.checked_add(run)?;
            if at > committed {
                ranges.push_back((start.max(committed), at));
            }
        }
        (!ranges.is_empty()).then_some(Handled(ranges))
    }

    /// Whether `offset` is handled; the runs below it are let go (records come in increasing
    /// order).
    pub(crate) fn contains(&mut self, offset: i64) -> bool {
        while let Some(&(start, end)) = self.0.front() {
            if offset < start {
                return false;
            }
            if offset < end {
                return true;
            }
            self.0.pop_front();
        }
        false
    }

    /// Whether every run has been let go.
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The runs not let go yet, `start..end` each, in increasing order.
    pub(crate) fn runs(&self) -> impl Iterator<Item = (i64, i64)> + '_ {
        self.0.iter().copied()
    }

    /// The offsets `offsets` lists (in increasing order), in runs.
    pub(crate) fn of(offsets: impl IntoIterator<Item = i64>) -> Handled {
        let mut runs: VecDeque<(i64, i64)> = VecDeque::new();
        for offset in offsets {
            match runs.back_mut() {
                Some(last) if offset == last.1 => last.1 += 1,
                Some(last) if offset < last.1 => {}
                _ => runs.push_back((offset, offset.saturating_add(1))),
            }
        }
        Handled(runs)
    }

    /// The offsets either names: their runs in increasing order, overlapping or touching ones
    /// joined.
    pub(crate) fn union(&self, other: &Handled) -> Handled {
        let mut all: Vec<(i64, i64)> = self.runs().chain(other.runs()).collect();
        all.sort_unstable();
        let mut joined: VecDeque<(i64, i64)> = VecDeque::with_capacity(all.len());
        for (start, end) in all {
            match joined.back_mut() {
                Some(last) if start <= last.1 => last.1 = last.1.max(end),
                _ => joined.push_back((start, end)),
            }
        }
        Handled(joined)
    }

    /// The offsets `a` or `b` names, if either names any.
    pub(crate) fn joined(a: Option<Handled>, b: Option<Handled>) -> Option<Handled> {
        match (a, b) {
            (Some(a), Some(b)) => Some(a.union(&b)),
            (a, b) => a.or(b),
        }
    }

    /// Where the last run ends (`None`: no run).
    pub(crate) fn end(&self) -> Option<i64> {
        self.0.back().map(|&(_, end)| end)
    }
}

/// Writes [`Handled`]'s form, a run at a time, within [`METADATA_MAX`].
pub(crate) struct Encoder {
    text: String,
    /// Where the last run handled ended.
    at: i64,
    runs: usize,
}

impl Encoder {
    /// Metadata for a commit of offset `position`.
    pub(crate) fn new(position: i64) -> Self {
        let mut text = String::with_capacity(64);
        text.push_str(HANDLED_PREFIX);
        let _ = write!(text, "{position}");
        Encoder {
            text,
            at: position,
            runs: 0,
        }
    }

    /// Adds offsets `start..end` as handled (`start` at or after the last run's end, or the
    /// position for the first); false when the metadata is full (this run is left out, and so
    /// must every later one be).
    pub(crate) fn push(&mut self, start: i64, end: i64) -> bool {
        let len = self.text.len();
        let _ = write!(self.text, ",{},{}", start - self.at, end - start);
        if self.text.len() > METADATA_MAX {
            self.text.truncate(len);
            return false;
        }
        self.at = end;
        self.runs += 1;
        true
    }

    /// The metadata, if it names any run.
    pub(crate) fn finish(self) -> Option<String> {
        (self.runs > 0).then_some(self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_made_for_an_older_position_names_what_is_at_or_above_the_committed_offset() {
        let good = "cqrs-handled:1:10,1,4,2,3";
        let ranges = |committed| Handled::parse(committed, good).map(|h| Vec::from(h.0));
        assert_eq!(ranges(10), Some(vec![(11, 15), (17, 20)]));
        assert_eq!(ranges(12), Some(vec![(12, 15), (17, 20)]));
        assert_eq!(ranges(16), Some(vec![(17, 20)]));
        assert_eq!(ranges(20), None);
        // Made for a later position than the committed one (a commit that went back): the
        // same offsets.
        assert_eq!(ranges(3), Some(vec![(11, 15), (17, 20)]));
    }

    #[test]
    fn metadata_of_another_form_names_nothing() {
        let good = "cqrs-handled:1:10,1,4,2,3";
        assert!(Handled::parse(10, good).is_some());
        for (committed, bad) in [
            (10, ""),
            (10, "something else"),
            (10, "cqrs-handled:2:10,1,4"),
            (10, "cqrs-handled:1:10"),
            (10, "cqrs-handled:1:10,1"),
            (10, "cqrs-handled:1:10,1,0"),
            (10, "cqrs-handled:1:10,-1,4"),
            (10, "cqrs-handled:1:10,1,x"),
            (10, "cqrs-handled:1:10,9223372036854775807,4"),
            (10, "cqrs-handled:1:-1,1,4"),
        ] {
            assert_eq!(Handled::parse(committed, bad), None, "{bad} at {committed}");
        }
    }

    #[test]
    fn a_union_names_the_offsets_either_names_in_joined_runs() {
        let a = Handled::parse(0, "cqrs-handled:1:10,1,4,2,3").unwrap(); // 11-14, 17-19
        let b = Handled::parse(0, "cqrs-handled:1:14,1,2,10,1").unwrap(); // 15-16, 27
        let u = a.union(&b);
        assert_eq!(u.runs().collect::<Vec<_>>(), [(11, 20), (27, 28)]);
        assert_eq!(u.end(), Some(28));
        assert_eq!(u, b.union(&a));
        assert_eq!(a.union(&Handled::default()), a);
        let listed = Handled::of([3, 4, 5, 7, 9, 10]);
        assert_eq!(listed.runs().collect::<Vec<_>>(), [(3, 6), (7, 8), (9, 11)]);
    }

    #[test]
    fn what_the_encoder_writes_reads_back_as_its_runs_until_it_is_full() {
        let mut encoder = Encoder::new(100);
        let mut pushed = Vec::new();
        // Runs of 2 every 5 offsets from 101: far more than fit.
        for i in 0..10_000_i64 {
            let start = 101 + 5 * i;
            if !encoder.push(start, start + 2) {
                break;
            }
            pushed.push((start, start + 2));
        }
        assert!(
            pushed.len() > 100 && pushed.len() < 10_000,
            "{}",
            pushed.len()
        );
        let metadata = encoder.finish().unwrap();
        assert!(metadata.len() <= METADATA_MAX, "{}", metadata.len());
        let read = Handled::parse(100, &metadata).unwrap();
        assert_eq!(read.runs().collect::<Vec<_>>(), pushed);
        assert_eq!(Encoder::new(7).finish(), None, "no run, no metadata");
    }
}
