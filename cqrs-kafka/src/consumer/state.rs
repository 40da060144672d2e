//! What a member knows of each partition it holds, and the messages waiting for redelivery.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use cqrs_core::Message;

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
}

impl PartitionState {
    pub(super) fn new(since: u64) -> Self {
        PartitionState {
            since,
            pending: Pending::default(),
            next: None,
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
    #[cfg(test)]
    pub(super) fn iter(&self) -> impl Iterator<Item = &i64> {
        self.offsets
            .iter()
            .filter(|(_, settled)| !settled)
            .map(|(offset, _)| offset)
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

/// How many messages were acked above an offset still pending on their partition (a message
/// being handled, or waiting for a retry): their offsets cannot be stored, so no commit records
/// them yet. Offsets without a record (transaction markers) count as acked: an overcount, on
/// the safe side.
pub(super) fn held(offsets: &Offsets) -> u64 {
    offsets
        .values()
        .map(|s| match (s.pending.first(), s.next) {
            (Some(first), Some(next)) => u64::try_from(next - first)
                .unwrap_or(0)
                .saturating_sub(s.pending.len() as u64),
            _ => 0,
        })
        .sum()
}

/// Takes `parts` (topic, partition, start if known) as this member's in a new rebalance epoch:
/// the whole assignment, or (`incremental`) added to it. Called with `offsets` locked: a record
/// polled before, of a partition given again, is stale for `KafkaConsumer::delivery`, which
/// checks under the same lock.
pub(super) fn assign(
    offsets: &mut Offsets,
    epoch: &AtomicU64,
    incremental: bool,
    parts: impl IntoIterator<Item = (Arc<str>, i32, Option<i64>)>,
) {
    let epoch = epoch.fetch_add(1, Ordering::SeqCst) + 1;
    if !incremental {
        offsets.clear();
    }
    for (topic, partition, start) in parts {
        let mut state = PartitionState::new(epoch);
        // A known start is the partition's position until a record is handed out: a revocation
        // before then keeps it (a resumed position the group has not recorded must survive a
        // second rebalance whose commit is refused too).
        state.next = start;
        offsets.insert((topic, partition), state);
    }
}

/// Drops the states of the partitions `is_revoked` names, in a new rebalance epoch, and returns
/// their positions (everything below each is settled). Called with `offsets` locked: from then
/// on an ack stores nothing for them, and their records still queued are stale.
pub(super) fn revoke(
    offsets: &mut Offsets,
    epoch: &AtomicU64,
    is_revoked: impl Fn(&str, i32) -> bool,
) -> Vec<((String, i32), i64)> {
    epoch.fetch_add(1, Ordering::SeqCst);
    let positions = offsets
        .iter()
        .filter(|((t, p), _)| is_revoked(t, *p))
        .filter_map(|((t, p), state)| Some(((t.to_string(), *p), state.position()?)))
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
        assert_eq!(p.iter().copied().collect::<Vec<_>>(), [5, 6, 7, 8, 9]);
        for o in [9, 7, 5, 8, 6] {
            assert!(p.remove(&o));
        }
        assert_eq!((p.first(), p.len()), (None, 0));
    }
}
