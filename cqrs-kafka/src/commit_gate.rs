//! How far a member may run ahead of what its group recorded, and the thread that asks for the
//! commits that record it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Mutex, Weak};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _, ConsumerContext};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::TopicPartitionList;

use crate::lock;

/// How long the gate holds new work back at most (`KafkaConsumer::receive`), and handlers not
/// started wait at most after a broker connection was lost ([`CommitGate::is_down`]): they
/// limit duplicates, and must not stop a member for good.
pub(crate) const HOLDS_AT_MOST: Duration = Duration::from_secs(30);

/// How long the gate waits for the answer to a commit it asked for before asking again.
const ASK_AGAIN_AFTER: Duration = Duration::from_secs(1);

/// How far a member has run ahead of what its group recorded: messages acked against those
/// covered by the last successful commit. An ack above an offset still pending on its partition
/// (a message waiting for a retry) is not covered by the offset of any commit until that one is
/// settled: the committer counts such acks as unrecorded (see [`spawn_committer`]), though the
/// commit's metadata names them (`consumer::state::Handled`) so that the partition's next owner
/// passes them over. It asks for a commit every
/// `every` acks, and `receive` hands out nothing new while `limit` acks are unrecorded, so a
/// member whose commits are refused (its group rebalancing, the coordinator away) stops instead
/// of piling up work that its partitions' next owner would do again.
///
/// The commits it asks for are made by a thread of their own ([`spawn_committer`]), each
/// waiting for its answer: the answer to an asynchronous commit comes through the consumer's
/// queue, behind every record librdkafka fetched ahead (up to `queued.min.messages` per
/// partition), so it came hundreds of milliseconds late and held the gate closed meanwhile.
pub(crate) struct CommitGate {
    acked: AtomicU64,
    recorded: AtomicU64,
    /// Of the acks counted when the last commit was made, those held above an offset still
    /// pending (not recorded by its offset).
    held: AtomicU64,
    /// When the last commit it asked for was asked, in milliseconds since `born` (0: answered).
    /// An answer that does not come is given up on after [`ASK_AGAIN_AFTER`].
    asked_at: AtomicU64,
    born: std::time::Instant,
    /// Woken when a commit succeeds or partitions are revoked.
    pub(crate) changed: tokio::sync::Notify,
    every: u64,
    limit: u64,
    /// The refusals since the last commit that succeeded (`None`: it succeeded).
    refused: Mutex<Option<Refusals>>,
    /// The last commit answered was refused: the gate closes at `every` unrecorded acks, not
    /// at `limit`.
    failing: AtomicBool,
    /// When a broker connection was lost with no commit succeeded since, in milliseconds since
    /// `born` plus one (0: none): handlers not started wait ([`CommitGate::is_down`]).
    down_at: AtomicU64,
    /// Wakes the committer thread; one request waits at most. Taken out to end the thread.
    asks: Mutex<Option<SyncSender<()>>>,
}

impl CommitGate {
    /// A gate and the receiving end of its requests, for [`spawn_committer`].
    pub(crate) fn new(every: usize, limit: usize) -> (Self, Receiver<()>) {
        let (asks, requests) = sync_channel(1);
        let gate = CommitGate {
            acked: AtomicU64::new(0),
            recorded: AtomicU64::new(0),
            held: AtomicU64::new(0),
            asked_at: AtomicU64::new(0),
            born: std::time::Instant::now(),
            changed: tokio::sync::Notify::new(),
            every: every as u64,
            limit: limit as u64,
            refused: Mutex::new(None),
            failing: AtomicBool::new(false),
            down_at: AtomicU64::new(0),
            asks: Mutex::new(Some(asks)),
        };
        (gate, requests)
    }

    pub(crate) fn unrecorded(&self) -> u64 {
        self.acked
            .load(Ordering::SeqCst)
            .saturating_sub(self.recorded.load(Ordering::SeqCst))
    }

    /// Counts `n` acks; asks for a commit (without waiting) when `every` are unrecorded and no
    /// asked-for commit is waiting for its answer.
    pub(crate) fn acked(&self, n: usize) {
        self.acked.fetch_add(n as u64, Ordering::SeqCst);
        if self.every > 0 && self.unrecorded() >= self.every {
            self.ask();
        }
    }

    /// Milliseconds since the gate was made, plus one: never 0, which the fields read as "none".
    fn now_ms(&self) -> u64 {
        self.born.elapsed().as_millis() as u64 + 1
    }

    /// Asks the committer thread for a commit, unless one asked for less than
    /// [`ASK_AGAIN_AFTER`] ago has not been answered yet.
    pub(crate) fn ask(&self) {
        let now = self.now_ms();
        let asked_at = self.asked_at.load(Ordering::SeqCst);
        if !should_ask(now, asked_at)
            || self
                .asked_at
                .compare_exchange(asked_at, now, Ordering::SeqCst, Ordering::SeqCst)
                .is_err()
        {
            return;
        }
        let sent = match lock(&self.asks).as_ref() {
            Some(asks) => asks.try_send(()),
            None => Err(TrySendError::Disconnected(())),
        };
        match sent {
            // Full: a request waits already, and the commit it makes covers this one's acks.
            Ok(()) | Err(TrySendError::Full(())) => {}
            // The committer has ended (the consumer is closing).
            Err(TrySendError::Disconnected(())) => self.asked_at.store(0, Ordering::SeqCst),
        }
    }

    /// Ends the committer thread once the commit it is making, if any, is answered.
    pub(crate) fn stop_committer(&self) {
        lock(&self.asks).take();
    }

    /// Everything acked so far is recorded (a commit succeeded), or no longer this member's to
    /// record (its partitions were revoked).
    pub(crate) fn all_recorded(&self) {
        self.recorded_up_to(self.acked.load(Ordering::SeqCst));
    }

    fn recorded_up_to(&self, acked: u64) {
        self.recorded.fetch_max(acked, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    /// Whether new work must wait for a commit: `limit` acks are unrecorded, or `every` are
    /// while commits fail (the last one was refused, or asked for [`ASK_AGAIN_AFTER`] ago and
    /// not answered: a broker away). Work handled while commits fail is handled again if the
    /// member dies before one succeeds: a soak run lost the record of 2,000 messages in one
    /// member killed a second after the broker restarted, its commits refused (stale member
    /// epoch) until it rejoined.
    pub(crate) fn closed(&self) -> bool {
        self.closed_with(|| self.failing())
    }

    /// [`CommitGate::closed`], with whether commits fail told by `failing`, called only when it
    /// matters: a caller taking many records in a row asks that once, not the clock once a
    /// record (an eighth of `receive`'s samples in a profile of a drain).
    pub(crate) fn closed_with(&self, failing: impl FnOnce() -> bool) -> bool {
        if self.limit == 0 {
            return false;
        }
        let unrecorded = self.unrecorded();
        unrecorded >= self.limit || (unrecorded >= self.every.max(1) && failing())
    }

    /// Whether commits fail: the last one answered was refused, or the one asked for has had no
    /// answer for [`ASK_AGAIN_AFTER`].
    pub(crate) fn failing(&self) -> bool {
        if self.failing.load(Ordering::SeqCst) {
            return true;
        }
        let asked_at = self.asked_at.load(Ordering::SeqCst);
        let now = self.now_ms();
        asked_at != 0 && now.saturating_sub(asked_at) >= ASK_AGAIN_AFTER.as_millis() as u64
    }

    /// The acks counted so far.
    pub(crate) fn acked_count(&self) -> u64 {
        self.acked.load(Ordering::SeqCst)
    }

    /// Takes the answer to a commit made when `acked` acks had been counted, of which `held`
    /// were above an offset still pending (their offsets not stored): the others are recorded if
    /// it succeeded.
    ///
    /// Then asks for the next commit if `every` acks were counted while this one was made: they
    /// asked for none (one was waiting for its answer), and nothing else would until the next
    /// ack or `commit_interval`. A batch acked at once just after a commit was sent waited so
    /// (a test whose interval was 10 minutes waited for good, 2 runs in 15); a member killed
    /// meanwhile left all of it to be handled again. Acks held behind a pending message, counted
    /// before this commit, do not ask again: that would commit back to back for as long as the
    /// message waits for its retry.
    fn answer(&self, result: &KafkaResult<()>, acked: u64, held: u64) {
        tracing::debug!(
            ?result,
            acked,
            unrecorded = self.unrecorded(),
            "the answer to a commit the gate asked for"
        );
        self.asked_at.store(0, Ordering::SeqCst);
        self.held.store(held, Ordering::SeqCst);
        if self.refusal_of(result) {
            self.recorded_up_to(acked.saturating_sub(held));
            let since = self.acked.load(Ordering::SeqCst).saturating_sub(acked);
            if self.every > 0 && since >= self.every {
                self.ask();
            }
        }
    }

    /// Takes the answer to a commit librdkafka made on its own (`auto.commit.interval.ms`): it
    /// says whether commits are refused, but not which acks it covers (it comes late, behind
    /// the records fetched ahead).
    pub(crate) fn periodic_answer(&self, result: &KafkaResult<()>) {
        tracing::debug!(
            ?result,
            unrecorded = self.unrecorded(),
            "the answer to a periodic commit"
        );
        self.refusal_of(result);
    }

    /// The connection to a broker failed (librdkafka reports it, then tries again): commits
    /// may fail until one succeeds, so the gate closes at `every` unrecorded acks meanwhile. A
    /// member far behind holds thousands of records fetched ahead; without this it handled
    /// them all while the broker was away (a soak run: 4,000, the gate's limit, in one member,
    /// all handled again when it died before the broker came back).
    ///
    /// Handlers not started wait too, until a commit succeeds ([`CommitGate::is_down`]): work
    /// already handed out ran on after the broker died (a member's lanes, ~1,300 messages in
    /// 260 ms in a soak run), none of it could be recorded, and the partitions' next owner
    /// handled it all again. The committer commits every `commit_interval` meanwhile, so the
    /// first commit that succeeds ends the wait even when nothing new was acked.
    pub(crate) fn connection_lost(&self) {
        let now = self.now_ms();
        let _ = self
            .down_at
            .compare_exchange(0, now, Ordering::SeqCst, Ordering::SeqCst);
        if !self.failing.swap(true, Ordering::SeqCst) {
            tracing::debug!(
                unrecorded = self.unrecorded(),
                "a broker connection failed; new work and handlers not started wait until a commit succeeds"
            );
        }
    }

    /// Whether a broker connection was lost and no commit has succeeded since: handlers not
    /// started wait (`Acknowledge::must_wait`), for [`HOLDS_AT_MOST`] at most.
    pub(crate) fn is_down(&self) -> bool {
        let since = self.down_at.load(Ordering::Relaxed);
        if since == 0 {
            return false;
        }
        let now = self.now_ms();
        if now.saturating_sub(since) < HOLDS_AT_MOST.as_millis() as u64 {
            return true;
        }
        // The wait limits duplicates; it must not stop a member for good (commits that never
        // succeed again).
        if self.down_at.swap(0, Ordering::SeqCst) != 0 {
            tracing::warn!(
                "no commit succeeded for {HOLDS_AT_MOST:?} after a broker connection was lost; handlers start again (what they do is handled again if this member dies before a commit succeeds)"
            );
        }
        false
    }

    /// Notes whether `result` refused a commit; true if it succeeded. `NoOffset` (nothing new
    /// to commit) records what was acked, and says nothing of whether commits fail.
    fn refusal_of(&self, result: &KafkaResult<()>) -> bool {
        match result {
            Ok(()) => {
                *lock(&self.refused) = None;
                self.failing.store(false, Ordering::SeqCst);
                self.down_at.store(0, Ordering::SeqCst);
                true
            }
            Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => true,
            Err(e) => {
                self.failing.store(true, Ordering::SeqCst);
                let warns = {
                    let mut refused = lock(&self.refused);
                    let run = refused.get_or_insert_with(|| Refusals {
                        in_row: 0,
                        first_stale: matches!(
                            e,
                            KafkaError::ConsumerCommit(RDKafkaErrorCode::StaleMemberEpoch)
                        ),
                        last: String::new(),
                    });
                    run.in_row += 1;
                    run.last = e.to_string();
                    run.warns()
                };
                if warns {
                    tracing::warn!(error = %e, unrecorded = self.unrecorded(), "a commit was refused");
                } else {
                    tracing::debug!(error = %e, unrecorded = self.unrecorded(), "a commit was refused");
                }
                false
            }
        }
    }

    /// Why commits are refused, while the last one was.
    pub(crate) fn refusal(&self) -> Option<String> {
        lock(&self.refused).as_ref().map(|r| r.last.clone())
    }

    /// Why the gate holds when no commit was refused: acks held behind a message still pending
    /// (one being retried), if the last commit found any.
    pub(crate) fn held_behind(&self) -> Option<String> {
        match self.held.load(Ordering::SeqCst) {
            0 => None,
            held => Some(format!(
                "{held} messages handled after one still pending (being retried) on their \
                 partition wait for it: a commit's offset cannot record them before it"
            )),
        }
    }
}

/// The commits refused in a row since the last that succeeded.
struct Refusals {
    in_row: u64,
    /// The first of them was refused for a stale member epoch.
    first_stale: bool,
    /// Why the last of them was refused.
    last: String,
}

impl Refusals {
    /// Whether the last refusal is said as a warning. Refusals come in runs while a group
    /// rebalances: the first of a run is worth one (a closed gate reports a run that does not end:
    /// `receive`), and the rest are not. Under KIP-848's protocol a commit sent just before the
    /// member's epoch moved on (the group gave it partitions or took some) is refused once for a
    /// stale member epoch, and the next, with the new epoch, succeeds: each member did so at every
    /// rebalance (two members joining one group: one such refusal a run, a commit 7 ms later
    /// succeeding). Such a first refusal is not warned of; a second in a row is (a member that lost
    /// its place: after a broker restart a soak's member had its commits refused so until it
    /// rejoined).
    fn warns(&self) -> bool {
        self.in_row == 1 && !self.first_stale || self.in_row == 2 && self.first_stale
    }
}

/// Whether a commit may be asked for at `now` when the last one was asked at `asked_at` (0:
/// answered); both in milliseconds since the gate was made. `asked_at` may be later than `now`
/// (another thread asked after `now` was read).
fn should_ask(now: u64, asked_at: u64) -> bool {
    asked_at == 0 || now.saturating_sub(asked_at) >= ASK_AGAIN_AFTER.as_millis() as u64
}

/// Starts the thread that makes the commits `gate` asks for, one at a time, each waiting for
/// its answer (a commit of the offsets stored so far, NoOffset when nothing stored is
/// uncommitted). Before each, `snapshot` reads the acks counted, how many of them are held
/// above an offset still pending, and the offsets to commit when they are not the stored ones,
/// in one instant (under the lock the acker stores offsets with): a held ack is not recorded by
/// the commit's offset, however it is answered (its metadata names it, for the partition's next
/// owner). A soak run re-did 861 messages a member had handled in 220 ms while catching up, its
/// commits "recording" them while a message at its partition's head waited for a retry and held
/// the stored offset back, until the broker died. While acks are held it also commits every
/// `interval` (librdkafka's own periodic commits send a stored offset only when it moved, so
/// they would not send the metadata); those commits count in the gate as librdkafka's do. It
/// holds neither the gate nor the consumer: it ends when either is gone, or when the gate's
/// requests end.
pub(crate) fn spawn_committer<C: ConsumerContext + 'static>(
    gate: Weak<CommitGate>,
    consumer: Weak<BaseConsumer<C>>,
    requests: Receiver<()>,
    snapshot: impl Fn(&CommitGate) -> (u64, u64, Option<TopicPartitionList>) + Send + 'static,
    interval: Duration,
    name: String,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name(name).spawn(move || {
        // The acks counted at the last commit of given offsets.
        let mut last_given = None;
        loop {
            // Asked, or every `interval` for acks held behind a pending message (librdkafka's
            // own commits, every `interval`, commit the stored offsets only when they moved), or
            // while a broker connection is lost.
            let asked = match requests.recv_timeout(interval) {
                Ok(()) => true,
                Err(RecvTimeoutError::Timeout) => false,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            let (Some(gate), Some(consumer)) = (gate.upgrade(), consumer.upgrade()) else {
                return;
            };
            let (acked, held, explicit) = snapshot(&gate);
            // Given (acks held behind a pending message), the offsets are committed as given,
            // with their metadata.
            let result = match explicit {
                Some(offsets) if offsets.count() > 0 => {
                    // Again while a broker connection is lost: the commit that succeeds ends
                    // the handlers' wait.
                    if !asked && last_given == Some(acked) && !gate.is_down() {
                        continue;
                    }
                    last_given = Some(acked);
                    consumer.commit(&offsets, CommitMode::Sync)
                }
                _ if asked => consumer.commit_consumer_state(CommitMode::Sync),
                _ => continue,
            };
            if asked {
                gate.answer(&result, acked, held);
            } else {
                // As librdkafka's own periodic commits: it says whether commits fail, and the
                // gate counts as recorded only what the commits it asked for record.
                gate.periodic_answer(&result);
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commit_asked_after_now_was_read_is_waited_for_not_an_underflow() {
        let again = ASK_AGAIN_AFTER.as_millis() as u64;
        assert!(should_ask(5_000, 0), "answered: ask");
        assert!(!should_ask(5_000, 4_500), "asked 0.5 s ago: wait");
        assert!(
            should_ask(5_000 + again, 5_000),
            "asked long ago: ask again"
        );
        // Another thread asked after this one read its clock: wait (no panic).
        assert!(!should_ask(5_000, 5_003));
    }

    #[test]
    fn handlers_wait_from_a_lost_connection_until_a_commit_succeeds() {
        let (gate, _requests) = CommitGate::new(2, 4);
        let refused = || {
            Err(KafkaError::ConsumerCommit(
                RDKafkaErrorCode::RebalanceInProgress,
            ))
        };
        gate.periodic_answer(&refused());
        assert!(
            !gate.is_down(),
            "a refused commit alone does not hold the handlers"
        );
        gate.connection_lost();
        assert!(gate.is_down());
        gate.periodic_answer(&refused());
        assert!(gate.is_down(), "a refusal does not end the wait");
        gate.periodic_answer(&Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)));
        assert!(gate.is_down(), "nothing to commit does not end it");
        gate.periodic_answer(&Ok(()));
        assert!(!gate.is_down(), "a commit that succeeded ends it");
    }

    #[test]
    fn acks_counted_while_a_commit_was_made_ask_for_the_next_when_it_is_answered() {
        let (gate, requests) = CommitGate::new(5, 100);
        gate.acked(5);
        assert!(requests.try_recv().is_ok(), "5 of every 5: asked");
        // A batch acked while that commit waits for its answer: no second request meanwhile.
        gate.acked(14);
        assert!(requests.try_recv().is_err(), "one commit at a time");
        gate.answer(&Ok(()), 5, 0);
        assert!(
            requests.try_recv().is_ok(),
            "14 acked since the commit was made: the next is asked for at its answer"
        );
        // Answered with fewer than `every` acked since: nothing asked.
        gate.acked(2);
        gate.answer(&Ok(()), 19, 0);
        assert!(requests.try_recv().is_err(), "2 since, of every 5");
        // Acks held behind a pending message (counted before the commit) do not ask again.
        let (gate, requests) = CommitGate::new(5, 100);
        gate.acked(19);
        assert!(requests.try_recv().is_ok());
        gate.answer(&Ok(()), 19, 18);
        assert_eq!(gate.unrecorded(), 18);
        assert!(requests.try_recv().is_err(), "nothing new: no commit");
        // A refused commit does not ask again at once (the gate's other asks retry it).
        gate.acked(10);
        assert!(requests.try_recv().is_ok());
        gate.acked(10);
        gate.answer(
            &Err(KafkaError::ConsumerCommit(
                RDKafkaErrorCode::RebalanceInProgress,
            )),
            29,
            18,
        );
        assert!(
            requests.try_recv().is_err(),
            "refused: not asked again here"
        );
    }

    #[test]
    fn a_commit_records_the_acks_counted_before_it_not_those_after() {
        let (gate, requests) = CommitGate::new(2, 4);
        gate.acked(3);
        assert!(
            requests.try_recv().is_ok(),
            "3 unrecorded of every 2: asked"
        );
        gate.acked(2);
        assert!(gate.closed(), "5 unrecorded of 4");
        // The commit was made when 3 were acked.
        gate.answer(&Ok(()), 3, 0);
        assert_eq!(gate.unrecorded(), 2);
        assert!(!gate.closed());
        // A late answer of an older commit does not move it back.
        gate.answer(&Ok(()), 1, 0);
        assert_eq!(gate.unrecorded(), 2);
        // A refusal records nothing and says why.
        gate.answer(
            &Err(KafkaError::ConsumerCommit(
                RDKafkaErrorCode::RebalanceInProgress,
            )),
            5,
            0,
        );
        assert_eq!(gate.unrecorded(), 2);
        assert!(gate.refusal().is_some());
        gate.periodic_answer(&Ok(()));
        assert!(gate.refusal().is_none());
        assert_eq!(gate.unrecorded(), 2, "a periodic answer records nothing");
    }

    #[test]
    fn acks_held_behind_a_pending_offset_stay_unrecorded_through_commits() {
        let (gate, _requests) = CommitGate::new(2, 10);
        gate.acked(8);
        // The commit was made with 8 acked, 6 of them above a message waiting for a retry.
        gate.answer(&Ok(()), 8, 6);
        assert_eq!(gate.unrecorded(), 6);
        assert!(gate
            .held_behind()
            .is_some_and(|why| why.starts_with("6 messages")));
        gate.acked(4);
        assert!(
            gate.closed(),
            "10 unrecorded of 10, though every commit succeeded"
        );
        // The retried message settled: the next commit records them all.
        gate.answer(
            &Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)),
            12,
            0,
        );
        assert_eq!(gate.unrecorded(), 0);
        assert!(!gate.closed());
        assert!(gate.held_behind().is_none());
    }

    #[test]
    fn while_commits_are_refused_the_gate_closes_at_every_not_at_the_limit() {
        let (gate, _requests) = CommitGate::new(5, 1000);
        gate.acked(5);
        assert!(!gate.closed(), "commits not refused: open until 1000");
        gate.answer(
            &Err(KafkaError::ConsumerCommit(
                RDKafkaErrorCode::StaleMemberEpoch,
            )),
            5,
            0,
        );
        assert!(gate.closed(), "refused with 5 unrecorded: closed");
        // Revoked partitions: nothing left to record, so open, until `every` more.
        gate.all_recorded();
        assert!(!gate.closed());
        gate.acked(5);
        assert!(gate.closed(), "still refused: closed again at 5");
        gate.answer(&Ok(()), 10, 0);
        assert!(!gate.closed(), "a commit succeeded");
        gate.acked(5);
        assert!(!gate.closed(), "commits succeed: open until 1000");
    }

    #[test]
    fn a_stale_epoch_is_warned_of_from_its_second_refusal_in_a_row_other_refusals_at_their_first() {
        let stale = || {
            Err(KafkaError::ConsumerCommit(
                RDKafkaErrorCode::StaleMemberEpoch,
            ))
        };
        let other = || {
            Err(KafkaError::ConsumerCommit(
                RDKafkaErrorCode::GroupAuthorizationFailed,
            ))
        };
        let (gate, _requests) = CommitGate::new(5, 1000);
        // What each answer, in turn, logged at WARN.
        let warned: Vec<bool> = [stale(), stale(), stale(), Ok(()), other(), other(), stale()]
            .iter()
            .map(|r| {
                let (_guard, logs) = cqrs_test_support::captured_warnings();
                gate.refusal_of(r);
                logs.text().contains("a commit was refused")
            })
            .collect();
        assert_eq!(
            warned,
            [false, true, false, false, true, false, false],
            "a stale epoch once is the rebalance; twice a member that lost its place"
        );
        gate.refusal_of(&stale());
        assert!(gate.failing(), "refused: failing, warned or not");
    }

    #[test]
    fn a_lost_connection_closes_the_gate_at_every_until_a_commit_succeeds() {
        let (gate, _requests) = CommitGate::new(5, 1000);
        gate.connection_lost();
        gate.acked(4);
        assert!(!gate.closed(), "4 of every 5");
        gate.acked(1);
        assert!(
            gate.closed(),
            "the connection failed: closed at 5, not 1000"
        );
        // Nothing new to commit says nothing of the broker.
        gate.answer(
            &Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)),
            5,
            0,
        );
        gate.acked(5);
        assert!(gate.closed(), "closed again at 5");
        gate.answer(&Ok(()), 10, 0);
        gate.acked(5);
        assert!(!gate.closed(), "a commit succeeded: open until 1000");
    }

    #[test]
    fn a_commit_unanswered_for_a_while_counts_as_refused() {
        let (gate, _requests) = CommitGate::new(5, 1000);
        gate.acked(6);
        assert!(!gate.closed(), "asked just now");
        // Asked long ago, no answer (a broker away).
        gate.asked_at.store(1, Ordering::SeqCst);
        let again = ASK_AGAIN_AFTER.as_millis() as u64;
        while gate.born.elapsed().as_millis() as u64 <= again {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(gate.closed());
    }
}
