//! What a member knows of each partition it holds, and the messages waiting for redelivery.

use std::collections::BTreeSet;
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
    pub(super) pending: BTreeSet<i64>,
    /// One past the highest offset handed out in this assignment (`None`: none yet).
    pub(super) next: Option<i64>,
}

impl PartitionState {
    pub(super) fn new(since: u64) -> Self {
        PartitionState {
            since,
            pending: BTreeSet::new(),
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

/// Looked up for every record handed out and every ack: with foldhash, not SipHash (which cost
/// ~650 instructions a record).
pub(super) type Offsets = foldhash::HashMap<(Arc<str>, i32), PartitionState>;

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
}
