//! The rebalance callbacks: partitions assigned (started where the subscription says, or where
//! this member had handled up to) and revoked (committed first), and commit answers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cqrs_core::redelivery::Redeliveries;
use cqrs_core::StartFrom;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer as _, ConsumerContext, RebalanceProtocol,
};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::watch;

use super::handled::Handled;
use super::state::{self, lock, Kept, Offsets, Retry};
use crate::access::Refusals;
use crate::commit_gate::CommitGate;

/// Per partition (topic, partition), the offsets above its committed one its commit's metadata
/// names handled.
type HandledAbove = Vec<((String, i32), Handled)>;

/// A partition's committed offset, with the offsets above it its metadata names handled.
type Committed = (String, i32, Offset, Option<Handled>);

/// Commits what was handled before partitions go, starts new partitions where the subscription
/// says, and reports finished rebalances.
pub(crate) struct Ctx {
    pub(super) offsets: Arc<Mutex<Offsets>>,
    pub(super) retries: Arc<Mutex<Redeliveries<Retry>>>,
    /// Raised on every assignment and revocation; each partition keeps the one it was assigned
    /// in, and each polled record the one it was polled in.
    pub(super) epoch: Arc<AtomicU64>,
    /// Whether the poll thread has paused fetching (the handlers are behind): partitions
    /// assigned meanwhile are paused too.
    pub(super) paused: Arc<AtomicBool>,
    pub(super) rebalances: watch::Sender<u64>,
    pub(super) start: StartFrom,
    pub(super) timeout: Duration,
    /// Per partition, what this member had handled when the commit at its revocation was
    /// refused (a broker may refuse commits while its group rebalances) or could not be made (the
    /// partition lost): the position it had handled everything below, and the offsets above it
    /// handled too. If the next assignment gives the partition back, it resumes at that position,
    /// not from the older committed offset, and passes the others over.
    pub(super) unrecorded: Mutex<HashMap<(String, i32), Kept>>,
    pub(super) gate: Arc<CommitGate>,
    /// The brokers refusing this member (credentials, ACLs), for `KafkaConsumer::start`.
    pub(super) refusals: Refusals,
}

impl ClientContext for Ctx {
    fn error(&self, error: KafkaError, reason: &str) {
        if matches!(
            error.rdkafka_error_code(),
            Some(RDKafkaErrorCode::BrokerTransportFailure | RDKafkaErrorCode::AllBrokersDown)
        ) {
            self.gate.connection_lost();
        }
        self.refusals.record(&error, reason);
    }
}

/// Whether the group's protocol changes assignments incrementally (cooperative-sticky, KIP-848)
/// rather than all at once.
fn incremental(consumer: &BaseConsumer<Ctx>) -> bool {
    matches!(
        consumer.rebalance_protocol(),
        RebalanceProtocol::Cooperative
    )
}

impl Ctx {
    /// Gives every assigned partition an explicit start: its committed offset, or (when the group
    /// has none) the beginning or the current end. Resolving the end here, before the assignment
    /// completes, means nothing published after `subscribe` returns is skipped.
    ///
    /// Returns the partitions resumed from a position this member handled beyond the committed
    /// offset (see `unrecorded`), to be stored once assigned, and the offsets above each
    /// committed offset its metadata names handled ([`Handled`]).
    fn resolve_start(
        &self,
        consumer: &BaseConsumer<Self>,
        tpl: &mut TopicPartitionList,
    ) -> (TopicPartitionList, HandledAbove) {
        // Unreadable (the coordinator busy with the rebalance): librdkafka reads them itself
        // (`Offset::Invalid`), but a position this member handled beyond them still counts.
        let (parts, known): (Vec<Committed>, bool) = match consumer
            .committed_offsets(tpl.clone(), self.timeout)
        {
            Ok(committed) => {
                let parts = committed
                    .elements()
                    .iter()
                    .map(|e| {
                        let handled = match e.offset() {
                            Offset::Offset(c) => Handled::parse(c, e.metadata()),
                            _ => None,
                        };
                        (e.topic().to_owned(), e.partition(), e.offset(), handled)
                    })
                    .collect();
                drop(committed);
                (parts, true)
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading committed offsets failed; librdkafka reads them");
                let parts = tpl
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_owned(), e.partition(), Offset::Invalid, None))
                    .collect();
                (parts, false)
            }
        };
        // Only the next assignment uses them: kept longer, a position could outlive its topic.
        let mut unrecorded = std::mem::take(&mut *lock(&self.unrecorded));
        let mut to_store = TopicPartitionList::new();
        let mut handled_above = Vec::new();
        for (topic, partition, offset, committed_above) in parts {
            let kept = unrecorded.remove(&(topic.clone(), partition));
            // What this member handled is true of the partition only as far as it goes: a topic
            // deleted and made again (shorter) starts over.
            let end = || consumer.fetch_watermarks(&topic, partition, self.timeout);
            let (handled, kept_above) = match kept {
                Some(Kept { position, above }) => {
                    let last = above.as_ref().and_then(Handled::end).unwrap_or(position);
                    // Nothing past what the group recorded: nothing to add, and no end asked.
                    let past_committed = !matches!(offset, Offset::Offset(c) if c >= last);
                    match past_committed.then(end) {
                        Some(Ok((_, high))) if last <= high => (Some(position), above),
                        _ => (None, None),
                    }
                }
                None => (None, None),
            };
            let above = Handled::joined(committed_above, kept_above);
            if let Some(above) = above {
                tracing::debug!(%topic, partition, ?above, "offsets handled above the committed one");
                handled_above.push(((topic.clone(), partition), above));
            }
            // Handled further than the group recorded: resume there, and record it.
            let resume = handled.filter(|h| !matches!(offset, Offset::Offset(c) if c >= *h));
            let start = match (resume, offset, self.start) {
                (Some(h), _, _) => {
                    if let Err(e) =
                        to_store.add_partition_offset(&topic, partition, Offset::Offset(h))
                    {
                        tracing::warn!(error = %e, %topic, partition, "keeping the resumed position failed");
                    }
                    Offset::Offset(h)
                }
                (None, Offset::Offset(_), _) => offset,
                (None, _, _) if !known => Offset::Invalid,
                (None, _, StartFrom::Latest) => {
                    match consumer.fetch_watermarks(&topic, partition, self.timeout) {
                        Ok((_, high)) => Offset::Offset(high),
                        Err(e) => {
                            tracing::warn!(error = %e, %topic, partition, "reading the end offset failed");
                            Offset::End
                        }
                    }
                }
                _ => Offset::Beginning,
            };
            tracing::debug!(%topic, partition, committed = ?offset, ?handled, start = ?start, "partition start");
            if let Err(e) = tpl.set_partition_offset(&topic, partition, start) {
                tracing::warn!(error = %e, %topic, partition, "setting the start offset failed");
            }
        }
        (to_store, handled_above)
    }

    /// Stores (for the next commit) the positions `resolve_start` resumed from that the group
    /// had not recorded; called once the partitions are assigned.
    fn store_resumed(&self, consumer: &BaseConsumer<Self>, resumed: &TopicPartitionList) {
        if resumed.count() == 0 {
            return;
        }
        if let Err(e) = consumer.store_offsets(resumed) {
            tracing::warn!(error = %e, "storing the resumed positions failed");
        }
    }

    /// Takes `tpl` (resolved by `resolve_start`) as this member's: eagerly (the whole
    /// assignment) or incrementally (added to it), as the group's protocol says; `handled`
    /// names offsets of its partitions handled already.
    fn assign(
        &self,
        consumer: &BaseConsumer<Self>,
        tpl: &TopicPartitionList,
        mut handled: HandledAbove,
    ) {
        let incremental = incremental(consumer);
        let parts = tpl.elements().into_iter().map(|e| {
            let start = match e.offset() {
                Offset::Offset(start) => Some(start),
                _ => None,
            };
            let of = handled
                .iter()
                .position(|((t, p), _)| t == e.topic() && *p == e.partition())
                .map(|i| handled.swap_remove(i).1);
            (Arc::from(e.topic()), e.partition(), start, of)
        });
        state::assign(&mut lock(&self.offsets), &self.epoch, incremental, parts);
        let assigned = if incremental {
            consumer.incremental_assign(tpl)
        } else {
            consumer.assign(tpl)
        };
        if let Err(e) = assigned {
            tracing::error!(error = %e, incremental, "assigning partitions failed");
        }
        // The poll thread pauses what is assigned when it pauses; these came after. Resumed
        // otherwise: librdkafka keeps a partition's pause across its revocation, so a partition
        // paused, then lost (the broker away), then assigned again was never fetched again (a
        // member that caught up after a broker restart stalled for good on it).
        let paused = self.paused.load(Ordering::SeqCst);
        let switched = if paused {
            consumer.pause(tpl)
        } else {
            consumer.resume(tpl)
        };
        if let Err(e) = switched {
            tracing::warn!(error = %e, paused, "pausing or resuming newly assigned partitions failed");
        }
        if incremental {
            wake_fetchers_of_kept(consumer, tpl);
        }
    }

    /// Gives up `tpl`: what was handled on them is committed (unless they are lost: the group
    /// already gave them to another member), their state and waiting retries are dropped, and
    /// they leave the assignment (all of it under the eager protocol).
    fn revoke(&self, consumer: &BaseConsumer<Self>, tpl: &TopicPartitionList, lost: bool) {
        let incremental = incremental(consumer);
        let revoked: Vec<(String, i32)> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_owned(), e.partition()))
            .collect();
        let is_revoked = |t: &str, p: i32| revoked.iter().any(|(rt, rp)| rt == t && *rp == p);
        // The offsets stored carry their metadata (`Handled`): librdkafka commits a removed
        // partition's stored offset as it unassigns it, whether or not it moved.
        let positions = state::revoke(&mut lock(&self.offsets), &self.epoch, is_revoked);
        lock(&self.retries).retain(|r| !is_revoked(&r.topic, r.partition));
        // Lost (this member was out of its group, its coordinator away): a commit would be
        // refused. What they handled since the last commit is handled again by their next
        // owner, unless that is this member again (a broker restart), which resumes where it was.
        let committed = if lost {
            Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::AssignmentLost))
        } else {
            consumer.commit_consumer_state(CommitMode::Sync)
        };
        match committed {
            Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => {
                tracing::warn!(error = %e, partitions = revoked.len(), "partitions revoked without a commit; their positions are kept in case they come back");
                let mut unrecorded = lock(&self.unrecorded);
                for (key, kept) in positions {
                    // Both true (handled stays handled): the further position, and what either
                    // names above.
                    let known = match unrecorded.remove(&key) {
                        Some(before) => Kept {
                            position: before.position.max(kept.position),
                            above: Handled::joined(before.above, kept.above),
                        },
                        None => kept,
                    };
                    unrecorded.insert(key, known);
                }
            }
        }
        // What this member handled on them is recorded or no longer its to record.
        self.gate.all_recorded();
        let unassigned = if incremental {
            consumer.incremental_unassign(tpl)
        } else {
            consumer.unassign()
        };
        if let Err(e) = unassigned {
            tracing::error!(error = %e, incremental, "unassigning partitions failed");
        }
    }
}

/// Wakes the fetchers of the partitions this member kept through an incremental rebalance
/// (those assigned, other than `added`); see [`wake_fetchers`].
fn wake_fetchers_of_kept(consumer: &BaseConsumer<Ctx>, added: &TopicPartitionList) {
    let Ok(assigned) = consumer.assignment() else {
        return;
    };
    let assigned = assigned.elements();
    let kept = assigned
        .iter()
        .filter(|e| added.find_partition(e.topic(), e.partition()).is_none());
    wake_fetchers(consumer, kept.map(|e| (e.topic(), e.partition())));
}

/// Wakes the threads fetching `partitions` from their leaders, after they were resumed.
///
/// librdkafka (2.12) does not wake a leader's thread when a partition is resumed; a thread with
/// nothing else to fetch (every partition it serves paused, no fetch in flight) looks again only
/// after a second. It pauses every assigned partition while a rebalance is served and resumes
/// them after, so whenever a member joined or left, the others stopped fetching the partitions
/// they kept for up to a second (two members of a new group on Kafka took 1.3 s for 100,000
/// records instead of 0.5 s: docs/benchmarks.md); the poll thread's own pause, when handlers
/// fall behind, ended the same way. A request to the leader wakes its thread, which then
/// fetches: here one request for the partitions' latest offsets, which librdkafka sends to each
/// leader at once and waits for together.
///
/// It asked each partition's offsets one after another before: two requests a partition, each
/// waited for. On a loaded machine that took 30-130 ms for four partitions, and a CI run's
/// member waited 300 ms and more for records after catching up.
///
/// An error (the brokers away) is only logged: the callers, a rebalance callback and the poll
/// thread, go on, and the fetchers look again at their next second.
pub(super) fn wake_fetchers<'a, C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    partitions: impl IntoIterator<Item = (&'a str, i32)>,
) {
    let mut latest = TopicPartitionList::new();
    for (topic, partition) in partitions {
        // The offset field carries the timestamp asked about: -1 is the latest.
        if let Err(e) = latest.add_partition_offset(topic, partition, Offset::End) {
            tracing::debug!(error = %e, %topic, partition, "a partition to wake left out");
        }
    }
    if latest.count() == 0 {
        return;
    }
    if let Err(e) = consumer.offsets_for_times(latest, WAKE_WAITS_AT_MOST) {
        tracing::debug!(error = %e, "waking the resumed partitions' fetchers failed");
    }
}

/// How long [`wake_fetchers`] waits for the leaders' answers.
const WAKE_WAITS_AT_MOST: Duration = Duration::from_millis(500);

impl ConsumerContext for Ctx {
    /// The answer to a commit librdkafka made on its own (the gate's are answered on its
    /// committer thread).
    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        self.gate.periodic_answer(&result);
    }

    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let (resumed, handled) = self.resolve_start(consumer, tpl);
                self.assign(consumer, tpl, handled);
                self.store_resumed(consumer, &resumed);
                tracing::debug!(partitions = tpl.count(), "partitions assigned");
                self.rebalances.send_modify(|n| *n += 1);
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.revoke(consumer, tpl, consumer.assignment_lost());
                tracing::debug!(partitions = tpl.count(), "partitions revoked");
            }
            other => {
                let code: RDKafkaErrorCode = other.into();
                tracing::warn!(error = %code, "rebalance error");
                self.revoke(consumer, tpl, true);
            }
        }
    }
}
