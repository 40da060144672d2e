//! What a member knows of each partition it holds, and the messages waiting for redelivery.

use std::collections::{BTreeSet, HashMap};
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

pub(super) type Offsets = HashMap<(Arc<str>, i32), PartitionState>;

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
