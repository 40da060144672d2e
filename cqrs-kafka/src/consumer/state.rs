//! What a member knows of each partition it holds, and the messages waiting for redelivery.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use cqrs_core::Message;

use super::handled::{Encoder, Handled};

pub(super) use crate::lock;

/// Per assigned partition: when it was assigned, offsets handed to handlers and not settled, and
/// one past the highest handed out.
pub(super) struct PartitionState {
    /// The rebalance epoch it was assigned in. Records polled, and deliveries made, in an earlier
    /// epoch belong to an earlier assignment of the partition (or to none): they are stale.
    pub(super) since: u64,
    pub(super) pending: Pending,
    /// One past the highest offset handed out in this assignment (`None`: none yet).
    pub(super) next: Option<i64>,
    /// Offsets at or above `next` the group handled already, read from the committed offset's
    /// metadata when the partition was assigned: their records are passed over, not handed out
    /// (see [`Handled`]).
    pub(super) handled: Option<Handled>,
    /// The metadata last made for an ack, and when (see [`METADATA_REFRESH`]).
    stored: Option<(std::time::Instant, String)>,
}

impl PartitionState {
    pub(super) fn new(since: u64) -> Self {
        PartitionState {
            since,
            pending: Pending::default(),
            next: None,
            handled: None,
            stored: None,
        }
    }

    /// Whether the record at `offset`, about to be handed out, was handled already (see
    /// [`Handled`]): if so it is passed over, and the partition's position moves past it.
    pub(super) fn handled_already(&mut self, offset: i64) -> bool {
        let Some(handled) = self.handled.as_mut() else {
            return false;
        };
        let passed = handled.contains(offset);
        if handled.is_empty() {
            self.handled = None;
        }
        if passed {
            self.next = Some(offset + 1);
        }
        passed
    }

    /// The metadata to commit with [`PartitionState::position`]: the offsets above it handled
    /// already (acked above a message still pending, or known handled from the last owner's
    /// commit and not read again yet), in [`Handled`]'s form. `None` when there are none: the
    /// common case, told without looking through the pending offsets.
    pub(super) fn metadata(&self) -> Option<String> {
        let position = self.position()?;
        let next = self.next.unwrap_or(position);
        if self.handled.is_none() && self.held() == 0 {
            return None;
        }
        let mut encoder = Encoder::new(position);
        // Below `next`: every offset not pending was handled (or holds no record).
        let mut from = position;
        for offset in self.pending.unsettled() {
            if offset > from && !encoder.push(from, offset) {
                return encoder.finish();
            }
            from = offset + 1;
        }
        if next > from && !encoder.push(from, next) {
            return encoder.finish();
        }
        // From `next` on: what the last owner handled, not read again yet.
        for (start, end) in self.handled.iter().flat_map(Handled::runs) {
            let start = start.max(next);
            if end > start && !encoder.push(start, end) {
                break;
            }
        }
        encoder.finish()
    }

    /// [`PartitionState::metadata`] for an ack to store: the one made for an earlier ack if it
    /// is younger than [`METADATA_REFRESH`] (what it names is still handled).
    fn metadata_to_store(&mut self) -> Option<String> {
        if self.handled.is_none() && self.held() == 0 {
            self.stored = None;
            return None;
        }
        let now = std::time::Instant::now();
        if let Some((at, metadata)) = &self.stored {
            if now.duration_since(*at) < METADATA_REFRESH {
                return Some(metadata.clone());
            }
        }
        let metadata = self.metadata()?;
        self.stored = Some((now, metadata.clone()));
        Some(metadata)
    }

    /// Notes `handled` (acked in an earlier assignment of the partition, after it was revoked):
    /// those of its records not handed out again yet are passed over.
    pub(super) fn handled_before(&mut self, handled: &Handled) {
        if self.next.is_none() {
            // Its start is librdkafka's to find: which records are still to come is not known.
            return;
        }
        self.handled = Handled::joined(self.handled.take(), Some(handled.clone()));
    }

    /// How many messages were acked above an offset still pending (see [`held`]).
    fn held(&self) -> u64 {
        match (self.pending.first(), self.next) {
            (Some(first), Some(next)) => u64::try_from(next - first)
                .unwrap_or(0)
                .saturating_sub(self.pending.len() as u64),
            _ => 0,
        }
    }

    /// The offset to commit: the oldest unsettled one, else one past the last handed out
    /// (`None`: nothing handed out in this assignment).
    pub(super) fn position(&self) -> Option<i64> {
        self.pending.first().copied().or(self.next)
    }

    /// Whether a record polled, or a delivery made, in rebalance epoch `epoch` belongs to this
    /// assignment of the partition.
    pub(super) fn owns(&self, epoch: u64) -> bool {
        self.since <= epoch
    }
}

/// The offsets of a partition handed to handlers and not settled. They are handed out in
/// increasing order and mostly settled in that order too, so they are kept in a sorted queue:
/// one settled is marked, and the marked ones at the front leave it. Each operation is a binary
/// search at most, where a `BTreeSet` allocated nodes and cost ~575 instructions a record for
/// an insert and a remove (callgrind).
#[derive(Default)]
pub(super) struct Pending {
    /// Ascending; `true` once settled. The front is never settled (it leaves at once).
    offsets: VecDeque<(i64, bool)>,
    /// Not settled.
    count: usize,
}

impl Pending {
    /// Adds `offset`.
    pub(super) fn insert(&mut self, offset: i64) {
        if self.offsets.back().is_none_or(|(last, _)| *last < offset) {
            self.offsets.push_back((offset, false));
            self.count += 1;
            return;
        }
        // Not above every offset here (never, as records are handed out).
        match self.find(offset) {
            Ok(i) => {
                if std::mem::replace(&mut self.offsets[i].1, false) {
                    self.count += 1;
                }
            }
            Err(i) => {
                self.offsets.insert(i, (offset, false));
                self.count += 1;
            }
        }
    }

    /// Settles `offset`; false if it was not pending.
    pub(super) fn remove(&mut self, offset: &i64) -> bool {
        let Ok(i) = self.find(*offset) else {
            return false;
        };
        if std::mem::replace(&mut self.offsets[i].1, true) {
            return false;
        }
        self.count -= 1;
        while self.offsets.front().is_some_and(|(_, settled)| *settled) {
            self.offsets.pop_front();
        }
        true
    }

    /// Whether `offset` is pending.
    pub(super) fn contains(&self, offset: &i64) -> bool {
        self.find(*offset).is_ok_and(|i| !self.offsets[i].1)
    }

    /// The lowest offset pending.
    pub(super) fn first(&self) -> Option<&i64> {
        self.offsets.front().map(|(offset, _)| offset)
    }

    /// How many are pending.
    pub(super) fn len(&self) -> usize {
        self.count
    }

    /// The offsets pending, ascending.
    pub(super) fn unsettled(&self) -> impl Iterator<Item = i64> + '_ {
        self.offsets
            .iter()
            .filter(|(_, settled)| !settled)
            .map(|(offset, _)| *offset)
    }

    fn find(&self, offset: i64) -> Result<usize, usize> {
        // Offsets are nearly always consecutive: first where that puts it.
        if let Some((front, _)) = self.offsets.front() {
            let guess = usize::try_from(offset - front).ok();
            if let Some(i) =
                guess.filter(|i| self.offsets.get(*i).is_some_and(|(o, _)| *o == offset))
            {
                return Ok(i);
            }
        }
        self.offsets.binary_search_by_key(&offset, |(o, _)| *o)
    }
}

#[cfg(test)]
impl<const N: usize> From<[i64; N]> for Pending {
    fn from(offsets: [i64; N]) -> Self {
        let mut pending = Pending::default();
        for offset in offsets {
            pending.insert(offset);
        }
        pending
    }
}

/// Looked up for every record handed out and every ack: with foldhash, not SipHash (which cost
/// ~650 instructions a record), and by [`Partition`], not by a key made for the lookup.
pub(super) type Offsets =
    hashbrown::HashMap<(Arc<str>, i32), PartitionState, foldhash::fast::RandomState>;

/// A partition to look up in [`Offsets`] without making its key: the topic's name borrowed.
/// It hashes as the key does (a tuple hashes its fields in turn).
#[derive(Hash)]
pub(super) struct Partition<'a>(pub(super) &'a str, pub(super) i32);

impl hashbrown::Equivalent<(Arc<str>, i32)> for Partition<'_> {
    fn equivalent(&self, key: &(Arc<str>, i32)) -> bool {
        self.1 == key.1 && self.0 == &*key.0
    }
}

/// How long an ack may store the metadata made for an earlier one of its partition instead of
/// making it again: making it reads every offset handed out and not yet passed by the
/// position (hundreds, with handlers running in parallel), each ack. What an ack stores names
/// at most this much less than it could (those are handled again if the member dies before
/// the next); the member's own commits make it afresh.
const METADATA_REFRESH: std::time::Duration = std::time::Duration::from_millis(10);

/// How many messages were acked above an offset still pending on their partition (a message
/// being handled, or waiting for a retry): their offsets cannot be stored, so no commit records
/// them yet. Offsets without a record (transaction markers) count as acked: an overcount, on
/// the safe side.
pub(super) fn held(offsets: &Offsets) -> u64 {
    offsets.values().map(PartitionState::held).sum()
}

/// Every partition's position with its metadata ([`PartitionState::metadata`], made afresh), to
/// commit.
pub(super) fn to_commit(offsets: &Offsets) -> rdkafka::TopicPartitionList {
    let mut tpl = rdkafka::TopicPartitionList::new();
    for ((topic, partition), state) in offsets {
        if let Some(position) = state.position() {
            put(&mut tpl, topic, *partition, position, state.metadata());
        }
    }
    tpl
}

/// Adds `state`'s position on `partition` of `topic`, with its metadata, to `tpl` (nothing
/// without a position), for an ack to store (see [`METADATA_REFRESH`]).
pub(super) fn add_position(
    tpl: &mut rdkafka::TopicPartitionList,
    topic: &str,
    partition: i32,
    state: &mut PartitionState,
) {
    if let Some(position) = state.position() {
        let metadata = state.metadata_to_store();
        put(tpl, topic, partition, position, metadata);
    }
}

/// Adds `position` on `partition` of `topic`, with `metadata` if any, to `tpl`.
fn put(
    tpl: &mut rdkafka::TopicPartitionList,
    topic: &str,
    partition: i32,
    position: i64,
    metadata: Option<String>,
) {
    let mut e = tpl.add_partition(topic, partition);
    // An absolute offset is always one librdkafka takes.
    let _ = e.set_offset(rdkafka::Offset::Offset(position));
    if let Some(metadata) = metadata {
        e.set_metadata(metadata);
    }
}

/// Takes `parts` (topic, partition, start if known) as this member's in a new rebalance epoch:
/// the whole assignment, or (`incremental`) added to it. Called with `offsets` locked: a record
/// polled before, of a partition given again, is stale for `KafkaConsumer::delivery`, which
/// checks under the same lock.
pub(super) fn assign(
    offsets: &mut Offsets,
    epoch: &AtomicU64,
    incremental: bool,
    parts: impl IntoIterator<Item = (Arc<str>, i32, Option<i64>, Option<Handled>)>,
) {
    let epoch = epoch.fetch_add(1, Ordering::SeqCst) + 1;
    if !incremental {
        offsets.clear();
    }
    for (topic, partition, start, handled) in parts {
        let mut state = PartitionState::new(epoch);
        // A known start is the partition's position until a record is handed out: a revocation
        // before then keeps it (a resumed position the group has not recorded must survive a
        // second rebalance whose commit is refused too).
        state.next = start;
        state.handled = handled;
        offsets.insert((topic, partition), state);
    }
}

/// What a member knew it had handled on a partition when it gave the partition up: everything
/// below `position`, and what `above` names (acked above a message still pending, or told by
/// the last owner and not read again yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Kept {
    pub(super) position: i64,
    pub(super) above: Option<Handled>,
}

/// Drops the states of the partitions `is_revoked` names, in a new rebalance epoch, and returns
/// what each had handled ([`Kept`]). Called with `offsets` locked: from then on an ack stores
/// nothing for them, and their records still queued are stale.
pub(super) fn revoke(
    offsets: &mut Offsets,
    epoch: &AtomicU64,
    is_revoked: impl Fn(&str, i32) -> bool,
) -> Vec<((String, i32), Kept)> {
    epoch.fetch_add(1, Ordering::SeqCst);
    let positions = offsets
        .iter()
        .filter(|((t, p), _)| is_revoked(t, *p))
        .filter_map(|((t, p), state)| {
            let position = state.position()?;
            // In the form a commit carries it, read back: made once a revocation, not per ack.
            let above = state
                .metadata()
                .and_then(|metadata| Handled::parse(position, &metadata));
            Some(((t.to_string(), *p), Kept { position, above }))
        })
        .collect();
    offsets.retain(|(t, p), _| !is_revoked(t, *p));
    positions
}

/// A nacked (or released) message waiting for its redelivery time (in a
/// [`cqrs_core::redelivery::Redeliveries`]). It shares the message with the delivery it came
/// from; there is at most one per delivery handed out.
pub(super) struct Retry {
    pub(super) topic: Arc<str>,
    pub(super) partition: i32,
    pub(super) offset: i64,
    pub(super) message: Arc<Message>,
    pub(super) attempt: u32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consumer::handled::METADATA_MAX;

    #[test]
    fn acks_above_a_pending_offset_are_held_and_none_once_it_settles() {
        let mut offsets = Offsets::default();
        let mut s = PartitionState::new(0);
        // 10..20 handed out; 10 waits for a retry, 15 and 16 are being handled.
        s.next = Some(20);
        s.pending = [10, 15, 16].into();
        offsets.insert((Arc::from("t"), 0), s);
        let mut other = PartitionState::new(0);
        other.next = Some(7);
        offsets.insert((Arc::from("t"), 1), other);
        assert_eq!(held(&offsets), 7, "11-14 and 17-19");
        if let Some(s) = offsets.get_mut(&(Arc::from("t"), 0)) {
            s.pending.remove(&10);
        }
        // 11-14 can be stored now; 17-19 wait behind 15 and 16.
        assert_eq!(held(&offsets), 3);
    }

    /// 10..20 handed out; 10 waits for a retry, 15 and 16 are being handled, the rest acked.
    fn held_at_ten() -> PartitionState {
        let mut s = PartitionState::new(0);
        s.next = Some(20);
        s.pending = [10, 15, 16].into();
        s
    }

    #[test]
    fn a_commit_names_what_was_handled_above_its_offset_and_the_next_owner_passes_it_over() {
        let s = held_at_ten();
        assert_eq!(s.position(), Some(10));
        let metadata = s.metadata().unwrap();
        assert_eq!(metadata, "cqrs-handled:1:10,1,4,2,3", "11-14 and 17-19");
        // The next owner starts at the committed offset, 10.
        let mut next = PartitionState::new(1);
        next.next = Some(10);
        next.handled = Handled::parse(10, &metadata);
        let handed: Vec<i64> = (10..25).filter(|o| !next.handled_already(*o)).collect();
        assert_eq!(handed, [10, 15, 16, 20, 21, 22, 23, 24]);
        assert!(next.handled.is_none(), "let go once passed");
    }

    #[test]
    fn a_new_owner_commits_what_it_was_told_and_has_not_read_again() {
        let mut s = PartitionState::new(1);
        s.next = Some(10);
        s.handled = Handled::parse(10, "cqrs-handled:1:10,1,4,2,3");
        // It hands out 10 and 15 (passing 11-14 over) and has read no further.
        for offset in [10, 11, 12, 13, 14, 15] {
            if !s.handled_already(offset) {
                s.pending.insert(offset);
                s.next = Some(offset + 1);
            }
        }
        assert_eq!(s.next, Some(16));
        // 17-19 it was told of and has not read: still named.
        assert_eq!(s.metadata().unwrap(), "cqrs-handled:1:10,1,4,2,3");
        // 10 handled: the position moves to 15, and what is above it is named from there.
        s.pending.remove(&10);
        assert_eq!(s.position(), Some(15));
        assert_eq!(s.metadata().unwrap(), "cqrs-handled:1:15,2,3");
        // Nothing pending, nothing told left: no metadata.
        s.pending.remove(&15);
        assert_eq!(
            (s.position(), s.metadata()),
            (Some(16), Some("cqrs-handled:1:16,1,3".to_owned()))
        );
        for offset in 16..20 {
            assert_eq!(s.handled_already(offset), offset >= 17);
        }
        assert_eq!((s.position(), s.metadata()), (Some(20), None));
    }

    #[test]
    fn a_revocation_keeps_what_was_handled_above_the_position_and_later_acks_are_noted() {
        let mut offsets = Offsets::default();
        offsets.insert((Arc::from("t"), 0), held_at_ten());
        let epoch = AtomicU64::new(0);
        let kept = revoke(&mut offsets, &epoch, |_, _| true);
        let above = Handled::parse(10, "cqrs-handled:1:10,1,4,2,3");
        assert_eq!(
            kept,
            [(
                ("t".to_owned(), 0),
                Kept {
                    position: 10,
                    above
                }
            )]
        );
        // Assigned again from 10; 15 and 16, being handled when it was revoked, are acked after.
        let mut s = PartitionState::new(1);
        s.next = Some(10);
        s.handled = Handled::parse(10, "cqrs-handled:1:10,1,4,2,3");
        s.handled_before(&Handled::of([15, 16]));
        let handed: Vec<i64> = (10..22).filter(|o| !s.handled_already(*o)).collect();
        assert_eq!(handed, [10, 20, 21]);
        // Its start not known yet: nothing noted.
        let mut unknown = PartitionState::new(1);
        unknown.handled_before(&Handled::of([15]));
        assert!(unknown.handled.is_none());
    }

    #[test]
    fn acks_in_order_need_no_metadata() {
        let mut s = PartitionState::new(0);
        s.next = Some(20);
        s.pending = [17, 18, 19].into();
        assert_eq!((s.position(), s.metadata()), (Some(17), None));
    }

    #[test]
    fn an_ack_stores_the_metadata_made_moments_before_and_makes_it_again_after() {
        let mut s = held_at_ten();
        let first = s.metadata_to_store().unwrap();
        assert_eq!(first, "cqrs-handled:1:10,1,4,2,3");
        // 15 handled: within METADATA_REFRESH the metadata made before is stored again (true
        // still, naming 15 or not).
        s.pending.remove(&15);
        assert_eq!(s.metadata_to_store().unwrap(), first);
        std::thread::sleep(METADATA_REFRESH);
        assert_eq!(s.metadata_to_store().unwrap(), "cqrs-handled:1:10,1,5,1,3");
        // Nothing held: none.
        s.pending.remove(&10);
        s.pending.remove(&16);
        assert_eq!(s.metadata_to_store(), None);
    }

    #[test]
    fn metadata_stays_within_its_bound_and_what_it_leaves_out_is_handled_again() {
        // Every other offset of 10,000 pending.
        let mut s = PartitionState::new(0);
        for offset in (0..10_000).step_by(2) {
            s.pending.insert(offset);
        }
        s.next = Some(10_000);
        let metadata = s.metadata().unwrap();
        assert!(metadata.len() <= METADATA_MAX, "{}", metadata.len());
        let mut next = PartitionState::new(1);
        next.handled = Handled::parse(0, &metadata);
        let passed: Vec<i64> = (0..10_000).filter(|o| next.handled_already(*o)).collect();
        assert!(passed.len() > 100, "{} passed over", passed.len());
        // Only odd offsets, and from the start without a gap: none beyond what it named.
        assert!(passed
            .iter()
            .enumerate()
            .all(|(i, o)| *o == 2 * i as i64 + 1));
    }

    #[test]
    fn a_commit_of_given_offsets_carries_each_partitions_metadata() {
        let mut offsets = Offsets::default();
        offsets.insert((Arc::from("t"), 0), held_at_ten());
        let mut in_order = PartitionState::new(0);
        in_order.next = Some(7);
        offsets.insert((Arc::from("t"), 1), in_order);
        offsets.insert((Arc::from("t"), 2), PartitionState::new(0));
        let tpl = to_commit(&offsets);
        assert_eq!(tpl.count(), 2, "partition 2 has no position");
        let e = tpl.find_partition("t", 0).unwrap();
        assert_eq!(e.offset(), rdkafka::Offset::Offset(10));
        assert_eq!(e.metadata(), "cqrs-handled:1:10,1,4,2,3");
        let e = tpl.find_partition("t", 1).unwrap();
        assert_eq!((e.offset(), e.metadata()), (rdkafka::Offset::Offset(7), ""));
    }

    #[test]
    fn pending_offsets_settled_in_any_order_leave_the_lowest_unsettled_first() {
        let mut p = Pending::default();
        for o in [3, 4, 5, 7, 9] {
            p.insert(o);
        }
        assert_eq!((p.first(), p.len()), (Some(&3), 5));
        assert!(p.remove(&5) && !p.remove(&5) && !p.remove(&6));
        assert!(!p.contains(&5) && p.contains(&4));
        assert_eq!((p.first(), p.len()), (Some(&3), 4));
        assert!(p.remove(&3));
        assert_eq!(p.first(), Some(&4));
        assert!(p.remove(&4));
        // 5 was settled already: 7 is the lowest pending.
        assert_eq!((p.first(), p.len()), (Some(&7), 2));
        // Out of order: below the highest, between two, and one settled before.
        p.insert(6);
        p.insert(8);
        p.insert(5);
        assert_eq!(p.unsettled().collect::<Vec<_>>(), [5, 6, 7, 8, 9]);
        for o in [9, 7, 5, 8, 6] {
            assert!(p.remove(&o));
        }
        assert_eq!((p.first(), p.len()), (None, 0));
    }
}
