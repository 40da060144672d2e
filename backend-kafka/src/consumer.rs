//! One member of a consumer group on Kafka.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use cqrs_core::backend::{Acknowledge, Consumer, Delivery, Subscription};
use cqrs_core::wire::{Entry, Layout};
use cqrs_core::Message;
use cqrs_core::StartFrom;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer as _, ConsumerContext, RebalanceProtocol,
};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{BorrowedMessage, Headers, Message as _};
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::commit_gate::{spawn_committer, CommitGate};
use crate::error::Error;
use crate::KafkaConfig;

/// Messages fetched ahead of the handlers, per consumer.
const PREFETCH: usize = 2048;

/// How long the poll thread waits, without polling, for the handlers to make room before it
/// pauses fetching and polls again (which serves rebalances and `max.poll.interval.ms`).
const PAUSE_AFTER: Duration = Duration::from_millis(500);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update is a single insert or remove: a poisoned lock is still consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Per assigned partition: when it was assigned, offsets handed to handlers and not settled, and
/// one past the highest handed out.
struct PartitionState {
    /// The rebalance epoch it was assigned in. Records polled, and deliveries made, in an earlier
    /// epoch belong to an earlier assignment of the partition (or to none): they are stale.
    since: u64,
    pending: BTreeSet<i64>,
    /// One past the highest offset handed out in this assignment (`None`: none yet).
    next: Option<i64>,
}

impl PartitionState {
    fn new(since: u64) -> Self {
        PartitionState {
            since,
            pending: BTreeSet::new(),
            next: None,
        }
    }

    /// The offset to commit: the oldest unsettled one, else one past the last handed out
    /// (`None`: nothing handed out in this assignment).
    fn position(&self) -> Option<i64> {
        self.pending.first().copied().or(self.next)
    }

    /// Whether a record polled, or a delivery made, in rebalance epoch `epoch` belongs to this
    /// assignment of the partition.
    fn owns(&self, epoch: u64) -> bool {
        self.since <= epoch
    }
}

type Offsets = HashMap<(Arc<str>, i32), PartitionState>;

/// How long the gate stays closed (no commit that would open it succeeds) before `receive`
/// reports it as an error (the group shows as reconnecting, with the refusal), and how often it
/// says so again.
const REPORT_REFUSALS_AFTER: Duration = Duration::from_secs(3);

/// How long the gate holds new work back at most: then it lets a window more through.
const GATE_HOLDS_AT_MOST: Duration = Duration::from_secs(30);

/// A nacked (or released) message waiting for its redelivery time. It shares the message with
/// the delivery it came from; there is at most one per delivery handed out.
struct Retry {
    topic: Arc<str>,
    partition: i32,
    offset: i64,
    message: Arc<Message>,
    attempt: u32,
    due: Instant,
}

/// Commits what was handled before partitions go, starts new partitions where the subscription
/// says, and reports finished rebalances.
pub(crate) struct Ctx {
    offsets: Arc<Mutex<Offsets>>,
    retries: Arc<Mutex<Vec<Retry>>>,
    /// Raised on every assignment and revocation; each partition keeps the one it was assigned
    /// in, and each polled record the one it was polled in.
    epoch: Arc<AtomicU64>,
    /// Whether the poll thread has paused fetching (the handlers are behind): partitions
    /// assigned meanwhile are paused too.
    paused: Arc<AtomicBool>,
    rebalances: watch::Sender<u64>,
    start: StartFrom,
    timeout: Duration,
    /// Per partition, the position this member had handled everything below when the commit
    /// at its revocation was refused (a broker may refuse commits while its group rebalances):
    /// if the next assignment gives the partition back, it resumes there, not from the older
    /// committed offset.
    unrecorded: Mutex<HashMap<(String, i32), i64>>,
    gate: Arc<CommitGate>,
}

impl ClientContext for Ctx {}

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
    /// offset (see `unrecorded`), to be stored once assigned.
    fn resolve_start(
        &self,
        consumer: &BaseConsumer<Self>,
        tpl: &mut TopicPartitionList,
    ) -> TopicPartitionList {
        // Unreadable (the coordinator busy with the rebalance): librdkafka reads them itself
        // (`Offset::Invalid`), but a position this member handled beyond them still counts.
        let (parts, known): (Vec<(String, i32, Offset)>, bool) = match consumer
            .committed_offsets(tpl.clone(), self.timeout)
        {
            Ok(committed) => {
                let parts = committed
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_owned(), e.partition(), e.offset()))
                    .collect();
                drop(committed);
                (parts, true)
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading committed offsets failed; librdkafka reads them");
                let parts = tpl
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_owned(), e.partition(), Offset::Invalid))
                    .collect();
                (parts, false)
            }
        };
        // Only the next assignment uses them: kept longer, a position could outlive its topic.
        let mut unrecorded = std::mem::take(&mut *lock(&self.unrecorded));
        let mut to_store = TopicPartitionList::new();
        for (topic, partition, offset) in parts {
            let handled = unrecorded.remove(&(topic.clone(), partition));
            // Handled further than the group recorded: resume there, and record it. Not past
            // the partition's end (a topic deleted and made again starts over).
            let resume = handled
                .filter(|h| !matches!(offset, Offset::Offset(c) if c >= *h))
                .filter(|h| {
                    let end = consumer.fetch_watermarks(&topic, partition, self.timeout);
                    matches!(end, Ok((_, high)) if *h <= high)
                });
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
        to_store
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
    /// assignment) or incrementally (added to it), as the group's protocol says.
    fn assign(&self, consumer: &BaseConsumer<Self>, tpl: &TopicPartitionList) {
        let incremental = incremental(consumer);
        {
            // Under the lock: a record polled before this, of a partition it gives again, is
            // seen as stale by `delivery`, which checks under the same lock.
            let mut offsets = lock(&self.offsets);
            let epoch = self.epoch.fetch_add(1, Ordering::SeqCst) + 1;
            if !incremental {
                offsets.clear();
            }
            for e in tpl.elements() {
                let mut state = PartitionState::new(epoch);
                // A known start is the partition's position until a record is handed out: a
                // revocation before then keeps it (a resumed position the group has not
                // recorded must survive a second rebalance whose commit is refused too).
                if let Offset::Offset(start) = e.offset() {
                    state.next = Some(start);
                }
                offsets.insert((Arc::from(e.topic()), e.partition()), state);
            }
        }
        let assigned = if incremental {
            consumer.incremental_assign(tpl)
        } else {
            consumer.assign(tpl)
        };
        if let Err(e) = assigned {
            tracing::error!(error = %e, incremental, "assigning partitions failed");
        }
        // The poll thread pauses what is assigned when it pauses; these came after.
        if self.paused.load(Ordering::SeqCst) {
            if let Err(e) = consumer.pause(tpl) {
                tracing::warn!(error = %e, "pausing newly assigned partitions failed");
            }
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
        // Everything below each position is settled (handled or dead-lettered). The states go
        // first, under the lock: an ack from now on stores nothing for these partitions, and
        // their records still queued for the handlers are stale.
        let positions: Vec<((String, i32), i64)> = {
            let mut offsets = lock(&self.offsets);
            self.epoch.fetch_add(1, Ordering::SeqCst);
            let positions = offsets
                .iter()
                .filter(|((t, p), _)| is_revoked(t, *p))
                .filter_map(|((t, p), state)| Some(((t.to_string(), *p), state.position()?)))
                .collect();
            offsets.retain(|(t, p), _| !is_revoked(t, *p));
            positions
        };
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
                for (key, position) in positions {
                    let kept = unrecorded.entry(key).or_insert(position);
                    *kept = (*kept).max(position);
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
                let resumed = self.resolve_start(consumer, tpl);
                self.assign(consumer, tpl);
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

/// A record as the poll thread decoded it.
struct Record {
    topic: Arc<str>,
    partition: i32,
    offset: i64,
    message: Message,
    /// Why the message is malformed, if it is.
    malformed: Option<String>,
}

/// A polled record (or a consumer error) with the rebalance epoch it was polled in.
type Polled = (KafkaResult<Record>, u64);

/// The most records the poll thread sends at once. They go in batches so that the thread
/// handing them over and the one taking them wake each other once a batch, not once a record.
const POLL_BATCH: usize = 256;

pub(crate) struct KafkaConsumer {
    rx: mpsc::Receiver<Vec<Polled>>,
    /// Taken from `rx` and not handed out yet.
    polled: VecDeque<Polled>,
    poller: Option<std::thread::JoinHandle<()>>,
    /// Makes the commits the gate asks for (see [`CommitGate`]).
    committer: Option<std::thread::JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    /// The acker of the newest rebalance epoch seen; it holds the consumer's epoch counter.
    acker: Arc<KafkaAcker>,
    /// Since when `receive` has found the commit gate closed.
    closed_since: Option<Instant>,
    /// When `receive` last reported refused commits.
    reported_at: Option<Instant>,
}

impl KafkaConsumer {
    pub(crate) async fn start(
        config: &KafkaConfig,
        subscription: &Subscription,
    ) -> Result<Self, Error> {
        let offsets: Arc<Mutex<Offsets>> = Arc::default();
        let retries: Arc<Mutex<Vec<Retry>>> = Arc::default();
        let epoch = Arc::new(AtomicU64::new(0));
        let paused = Arc::new(AtomicBool::new(false));
        let (gate, commit_requests) = CommitGate::new(config.commit_every, config.max_unrecorded);
        let gate = Arc::new(gate);
        let (rebalances, mut rebalanced) = watch::channel(0u64);
        let ctx = Ctx {
            offsets: offsets.clone(),
            retries: retries.clone(),
            epoch: epoch.clone(),
            paused: paused.clone(),
            rebalances,
            start: subscription.start,
            timeout: config.timeout,
            unrecorded: Mutex::default(),
            gate: gate.clone(),
        };
        let client_config = config.consumer_config(subscription);
        let consumer: BaseConsumer<Ctx> = client_config
            .create_with_context(ctx)
            .map_err(|e| Error::kafka("creating a consumer", e))?;
        let topics: Vec<&str> = subscription.topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .map_err(|e| Error::kafka(format!("subscribing to {topics:?}"), e))?;
        let consumer = Arc::new(consumer);

        // Poll all the time on a thread of its own, so that rebalances (whose callback blocks on
        // the broker) are served even while handlers are busy, and never on a runtime worker.
        let (tx, rx) = mpsc::channel(PREFETCH / POLL_BATCH);
        let stop = Arc::new(AtomicBool::new(false));
        let poller = {
            let (consumer, stop, epoch) = (consumer.clone(), stop.clone(), epoch.clone());
            std::thread::Builder::new()
                .name(format!("cqrs-kafka-poll-{}", subscription.group))
                .spawn(move || poll_loop(&consumer, &tx, &stop, &epoch, &paused))
                .map_err(|e| Error::Io("starting the poll thread", e))?
        };
        let committer = spawn_committer(
            Arc::downgrade(&gate),
            Arc::downgrade(&consumer),
            commit_requests,
            format!("cqrs-kafka-commit-{}", subscription.group),
        )
        .map_err(|e| Error::Io("starting the commit thread", e))?;

        // Wait until the group has given this member its partitions, with their start offsets
        // resolved (see `Ctx::resolve_start`).
        let ready = async {
            while *rebalanced.borrow_and_update() == 0 {
                if rebalanced.changed().await.is_err() {
                    return;
                }
            }
        };
        if tokio::time::timeout(config.timeout * 3, ready)
            .await
            .is_err()
        {
            tracing::warn!(group = %subscription.group, "no partition assignment yet; consuming anyway");
        }
        Ok(KafkaConsumer {
            rx,
            poller: Some(poller),
            committer: Some(committer),
            stop,
            acker: Arc::new(KafkaAcker {
                consumer: Arc::new(Mutex::new(Some(consumer))),
                offsets,
                retries,
                epoch: epoch.clone(),
                of_epoch: 0,
                gate,
            }),
            polled: VecDeque::new(),
            closed_since: None,
            reported_at: None,
        })
    }

    /// The acker of rebalance epoch `epoch`: deliveries keep the acker of the epoch they were
    /// made in, which knows them as stale once their partition is revoked (and maybe assigned
    /// again, in a later epoch).
    fn acker(&mut self, epoch: u64) -> Arc<KafkaAcker> {
        if self.acker.of_epoch != epoch {
            self.acker = Arc::new(self.acker.for_epoch(epoch));
        }
        self.acker.clone()
    }

    fn current_epoch(&self) -> u64 {
        self.acker.epoch.load(Ordering::SeqCst)
    }

    /// The next polled record, taken already or from the poll thread, without waiting.
    fn try_next(&mut self) -> cqrs_core::Result<Option<Polled>> {
        if self.polled.is_empty() {
            match self.rx.try_recv() {
                Ok(batch) => self.polled.extend(batch),
                Err(mpsc::error::TryRecvError::Empty) => {}
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    return Err(cqrs_core::Error::Closed)
                }
            }
        }
        Ok(self.polled.pop_front())
    }

    /// The delivery of a polled record; `None` for a record of a partition revoked since it was
    /// polled, or an offset this member already handed out since it got the partition (some
    /// brokers answer a fetch with records before the fetch offset).
    fn delivery(&mut self, record: Record, epoch: u64) -> Option<Delivery> {
        let Record {
            topic,
            partition,
            offset,
            message,
            malformed,
        } = record;
        {
            // Under the lock the rebalance callback changes the assignment under: the record
            // is this member's to hand out only if its partition was assigned before it was
            // polled, and is still.
            let mut offsets = lock(&self.acker.offsets);
            let Some(state) = offsets
                .get_mut(&(topic.clone(), partition))
                .filter(|s| s.owns(epoch))
            else {
                tracing::debug!(%topic, partition, offset, "dropping a record of a partition revoked since it was fetched");
                return None;
            };
            if state.next.is_some_and(|next| offset < next) {
                tracing::debug!(%topic, partition, offset, "skipping a message fetched twice");
                return None;
            }
            state.pending.insert(offset);
            state.next = Some(offset + 1);
        }
        let acker = self.acker(epoch);
        // Every delivery carries its partition: unkeyed records of one partition keep their
        // order across the processor's workers.
        let d = Delivery::new(topic, message, 1, format!("{partition}:{offset}"), acker)
            .with_shard(partition.unsigned_abs());
        Some(match malformed {
            Some(reason) => d.with_malformed(reason),
            None => d,
        })
    }

    /// Nacked messages whose time has come, as new deliveries.
    fn due_retries(&mut self, max: usize, out: &mut Vec<Delivery>) -> Option<Instant> {
        let acker = self.acker(self.current_epoch());
        let now = Instant::now();
        let mut retries = lock(&self.acker.retries);
        let mut next = None;
        let mut i = 0;
        while i < retries.len() {
            if retries[i].due <= now && out.len() < max {
                let r = retries.swap_remove(i);
                out.push(
                    Delivery::shared(
                        r.topic,
                        r.message,
                        r.attempt + 1,
                        format!("{}:{}", r.partition, r.offset),
                        acker.clone(),
                    )
                    .with_shard(r.partition.unsigned_abs()),
                );
            } else {
                let due = retries[i].due;
                next = Some(next.map_or(due, |n: Instant| n.min(due)));
                i += 1;
            }
        }
        next
    }
}

/// The message a record carries, and why it is malformed if it is (`docs/wire-format.md`); a
/// record without a message id gets `topic/partition/offset`.
pub(crate) fn decode(m: &impl rdkafka::message::Message) -> (Message, Option<String>) {
    let headers = m.headers();
    let fields = headers
        .iter()
        .flat_map(|h| h.iter())
        .filter_map(|h| Some((h.key, h.value?)));
    let (mut message, malformed) = Layout::KAFKA.decode(
        fields,
        Entry {
            // Made below only when the record has no id: a record carries one in nearly every
            // case, and formatting it for every record cost a tenth of the poll thread's time.
            id: "",
            time_ms: record_time_ms(m),
        },
        m.key(),
        m.payload().map(<[u8]>::to_vec),
    );
    if message.id.is_empty() {
        message.id = format!("{}/{}/{}", m.topic(), m.partition(), m.offset());
    }
    (message, malformed)
}

/// The record's timestamp, in milliseconds since the Unix epoch.
pub(crate) fn record_time_ms(m: &impl rdkafka::message::Message) -> Option<u64> {
    m.timestamp()
        .to_millis()
        .and_then(|t| u64::try_from(t).ok())
}

/// Polls until `stop`: records go to `tx` decoded, in batches, tagged with the rebalance epoch.
/// When the handlers fall behind and `tx` is full, the assigned partitions are paused and
/// polling goes on, serving the group (rebalances, `max.poll.interval.ms`) without fetching more.
fn poll_loop(
    consumer: &BaseConsumer<Ctx>,
    tx: &mpsc::Sender<Vec<Polled>>,
    stop: &AtomicBool,
    epoch: &AtomicU64,
    paused_flag: &AtomicBool,
) {
    let tick = Duration::from_millis(100);
    let mut topics: HashMap<String, Arc<str>> = HashMap::new();
    let mut polled = |r: KafkaResult<BorrowedMessage<'_>>| -> Polled {
        let record = r.map(|m| {
            let topic = match topics.get(m.topic()) {
                Some(t) => t.clone(),
                None => {
                    let t: Arc<str> = Arc::from(m.topic());
                    topics.insert(m.topic().to_owned(), t.clone());
                    t
                }
            };
            let (message, malformed) = decode(&m);
            Record {
                topic,
                partition: m.partition(),
                offset: m.offset(),
                message,
                malformed,
            }
        });
        // Read after the poll: a rebalance it served is in the epoch.
        (record, epoch.load(Ordering::SeqCst))
    };
    // Polled and not sent yet: the queue had no room.
    let mut held: Vec<Polled> = Vec::new();
    let mut paused = false;
    let mut full_since: Option<std::time::Instant> = None;
    while !stop.load(Ordering::SeqCst) {
        if !held.is_empty() {
            match tx.try_send(std::mem::take(&mut held)) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(batch)) => held = batch,
                Err(mpsc::error::TrySendError::Closed(_)) => return,
            }
        }
        let full = !held.is_empty();
        // A full queue first waits, polling only what comes at once: librdkafka keeps what it
        // fetched ahead.
        // Pausing drops that (it fetches again from the last polled offset on resume), which
        // cost consuming most of its speed; it is kept for handlers that stay behind, so that
        // the poll goes on serving the group.
        if full {
            let since = *full_since.get_or_insert_with(std::time::Instant::now);
            if !paused && since.elapsed() < PAUSE_AFTER {
                std::thread::sleep(Duration::from_millis(1));
                // A poll that does not wait still serves the group's callbacks (commit answers,
                // rebalances); what it returns is held: one record a millisecond at most.
                if let Some(r) = consumer.poll(Duration::ZERO) {
                    held.push(polled(r));
                }
                continue;
            }
        } else {
            full_since = None;
        }
        if full != paused {
            // Set first: a partition assigned from here on is paused by the callback too.
            paused_flag.store(full, Ordering::SeqCst);
            match consumer.assignment() {
                Ok(assigned) => {
                    let switched = if full {
                        consumer.pause(&assigned)
                    } else {
                        consumer.resume(&assigned)
                    };
                    if let Err(e) = switched {
                        tracing::warn!(error = %e, paused = full, "pausing or resuming fetching failed");
                    }
                    paused = full;
                }
                Err(e) => tracing::warn!(error = %e, "reading the assignment failed"),
            }
        }
        let Some(r) = consumer.poll(tick) else {
            continue;
        };
        held.push(polled(r));
        // Then what is there at once, up to a batch (paused: nothing more is fetched).
        while !paused && held.len() < POLL_BATCH {
            match consumer.poll(Duration::ZERO) {
                Some(r) => held.push(polled(r)),
                None => break,
            }
        }
    }
}

impl KafkaConsumer {
    /// Stops the poll and commit threads and waits for them, so that `close` holds the last
    /// handle on the consumer.
    async fn stop_polling(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.acker.gate.stop_committer();
        let threads = [self.poller.take(), self.committer.take()];
        let _ = tokio::task::spawn_blocking(move || {
            for thread in threads.into_iter().flatten() {
                let _ = thread.join();
            }
        })
        .await;
    }
}

impl Drop for KafkaConsumer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.acker.gate.stop_committer();
    }
}

#[async_trait]
impl Consumer for KafkaConsumer {
    async fn receive(&mut self, max: usize) -> cqrs_core::Result<Vec<Delivery>> {
        let max = max.max(1);
        loop {
            let mut out = Vec::new();
            let next_retry = self.due_retries(max, &mut out);
            let gate = self.acker.gate.clone();
            while out.len() < max && !gate.closed() {
                match self.try_next()? {
                    Some((Ok(record), epoch)) => out.extend(self.delivery(record, epoch)),
                    Some((Err(e), _)) => {
                        if out.is_empty() {
                            return Err(Error::kafka("consuming", e).into());
                        }
                        tracing::warn!(error = %e, "kafka consumer error");
                    }
                    None => break,
                }
            }
            if !out.is_empty() {
                self.closed_since = None;
                return Ok(out);
            }
            let wait = next_retry.unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
            if !gate.closed() {
                self.closed_since = None;
            } else {
                // Closed, and the commits that would open it refused for a while: the group
                // does not take this member's commits (a coordinator that refuses them for
                // good). Said as an error, so that the group shows it (reconnecting, with the
                // refusal) while the commits are asked for again.
                let since = *self.closed_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= GATE_HOLDS_AT_MOST {
                    // The gate limits duplicates; it must not stop a member for good (a
                    // coordinator that never answers, a rejoin that does not finish).
                    tracing::warn!(
                        unrecorded = gate.unrecorded(),
                        "no commit succeeded for {GATE_HOLDS_AT_MOST:?}; taking new work again (what is not recorded is handled again if this member dies)"
                    );
                    gate.all_recorded();
                    self.closed_since = None;
                    continue;
                }
                if since.elapsed() >= REPORT_REFUSALS_AFTER
                    && self
                        .reported_at
                        .is_none_or(|at| at.elapsed() >= REPORT_REFUSALS_AFTER)
                {
                    self.reported_at = Some(Instant::now());
                    // librdkafka may hold the answer to a refused commit back: no answer in
                    // that time is as good as a refusal.
                    let reason = gate
                        .refusal()
                        .unwrap_or_else(|| "no commit succeeded in time".to_owned());
                    return Err(Error::CommitsRefused {
                        unrecorded: gate.unrecorded(),
                        reason,
                    }
                    .into());
                }
                // Registered before the check: a commit answered in between still wakes it.
                let recorded = gate.changed.notified();
                if gate.closed() {
                    gate.ask();
                    // Ask again if this one is refused; a retry may come due meanwhile.
                    let wait = wait.min(Instant::now() + Duration::from_millis(200));
                    tokio::select! {
                        _ = recorded => {}
                        _ = tokio::time::sleep_until(wait) => {}
                    }
                }
                continue;
            }
            tokio::select! {
                batch = self.rx.recv() => match batch {
                    Some(batch) => self.polled.extend(batch),
                    None => return Err(cqrs_core::Error::Closed),
                },
                _ = tokio::time::sleep_until(wait) => {}
            }
        }
    }

    /// Commits what was handled and leaves the group before returning, so that the partitions
    /// go to the other members at once.
    async fn close(&mut self) -> cqrs_core::Result<()> {
        self.stop_polling().await;
        // Shared by every epoch's acker: taken out for all of them.
        let Some(consumer) = lock(&self.acker.consumer).take() else {
            return Ok(());
        };
        tokio::task::spawn_blocking(move || {
            let committed = consumer.commit_consumer_state(CommitMode::Sync);
            // The last handle: dropping it leaves the group, serving the revocation.
            drop(consumer);
            match committed {
                Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => Ok(()),
                Err(e) => Err(Error::kafka("committing offsets at close", e).into()),
            }
        })
        .await
        .map_err(|e| cqrs_core::Error::fatal("closing the consumer", e))?
    }
}

pub(crate) struct KafkaAcker {
    /// Taken out by `close`, so that the consumer leaves its group before `close` returns.
    /// Shared by the ackers of every epoch.
    consumer: Arc<Mutex<Option<Arc<BaseConsumer<Ctx>>>>>,
    offsets: Arc<Mutex<Offsets>>,
    retries: Arc<Mutex<Vec<Retry>>>,
    /// The consumer's rebalance epoch, and the one this acker's deliveries were made in.
    epoch: Arc<AtomicU64>,
    of_epoch: u64,
    /// Shared by every epoch's acker.
    gate: Arc<CommitGate>,
}

impl KafkaAcker {
    fn for_epoch(&self, epoch: u64) -> Self {
        KafkaAcker {
            consumer: self.consumer.clone(),
            offsets: self.offsets.clone(),
            retries: self.retries.clone(),
            epoch: self.epoch.clone(),
            of_epoch: epoch,
            gate: self.gate.clone(),
        }
    }

    /// Delivers `delivery` again from `due` on.
    fn retry_at(&self, delivery: &Delivery, partition: i32, offset: i64, due: Instant) {
        lock(&self.retries).push(Retry {
            topic: delivery.topic_arc().clone(),
            partition,
            offset,
            message: delivery.message_arc().clone(),
            attempt: delivery.attempt(),
            due,
        });
    }

    /// The state of `partition` of `topic` if the deliveries of this acker still belong to its
    /// assignment: not revoked since they were made (and maybe assigned again, from the
    /// committed offset).
    fn owned<'a>(
        &self,
        offsets: &'a mut Offsets,
        topic: &Arc<str>,
        partition: i32,
    ) -> Option<&'a mut PartitionState> {
        offsets
            .get_mut(&(topic.clone(), partition))
            .filter(|s| s.owns(self.of_epoch))
    }

    /// Whether `delivery`'s partition still belongs to this acker's assignment and `check`
    /// holds for its state.
    fn owns(
        &self,
        delivery: &Delivery,
        partition: i32,
        check: impl FnOnce(&PartitionState) -> bool,
    ) -> bool {
        let mut offsets = lock(&self.offsets);
        self.owned(&mut offsets, delivery.topic_arc(), partition)
            .is_some_and(|s| check(s))
    }
}

fn parse_id(d: &Delivery) -> cqrs_core::Result<(i32, i64)> {
    d.broker_id()
        .split_once(':')
        .and_then(|(p, o)| Some((p.parse().ok()?, o.parse().ok()?)))
        .ok_or_else(|| {
            cqrs_core::Error::fatal(
                "delivery id is not `partition:offset`",
                d.broker_id().to_owned(),
            )
        })
}

#[async_trait]
impl Acknowledge for KafkaAcker {
    async fn ack(&self, deliveries: &[Delivery]) -> cqrs_core::Result<()> {
        let Some(consumer) = lock(&self.consumer).clone() else {
            return Err(cqrs_core::Error::Closed);
        };
        let mut tpl = TopicPartitionList::new();
        let mut acked = 0;
        {
            let mut offsets = lock(&self.offsets);
            let mut touched: Vec<(Arc<str>, i32)> = Vec::new();
            for d in deliveries {
                let (partition, offset) = parse_id(d)?;
                // A partition revoked since: its next owner (maybe this member again) reads it
                // from the committed offset.
                if let Some(state) = self.owned(&mut offsets, d.topic_arc(), partition) {
                    state.pending.remove(&offset);
                    acked += 1;
                    let key = (d.topic_arc().clone(), partition);
                    if !touched.contains(&key) {
                        touched.push(key);
                    }
                }
            }
            for key in touched {
                if let Some(position) = offsets.get(&key).and_then(PartitionState::position) {
                    tpl.add_partition_offset(&key.0, key.1, Offset::Offset(position))
                        .map_err(|e| Error::kafka("building the offsets to store", e))?;
                }
            }
            if tpl.count() == 0 {
                return Ok(());
            }
            // Stored under the lock: a revocation (which takes it first) cannot come between
            // the check above and the store, so nothing is stored for a partition given away.
            match consumer.store_offsets(&tpl) {
                Ok(()) => {}
                Err(KafkaError::StoreOffset(RDKafkaErrorCode::State)) => return Ok(()),
                Err(e) => return Err(Error::kafka("storing offsets", e).into()),
            }
        }
        self.gate.acked(acked);
        Ok(())
    }

    async fn nack(&self, delivery: &Delivery, redeliver_after: Duration) -> cqrs_core::Result<()> {
        let (partition, offset) = parse_id(delivery)?;
        if self.owns(delivery, partition, |_| true) {
            // The offset stays pending, so nothing at or after it is committed until it is
            // handled.
            self.retry_at(
                delivery,
                partition,
                offset,
                Instant::now() + redeliver_after,
            );
        }
        Ok(())
    }

    fn is_stale(&self, delivery: &Delivery) -> bool {
        let Ok((partition, _)) = parse_id(delivery) else {
            return false;
        };
        !self.owns(delivery, partition, |_| true)
    }

    fn release(&self, delivery: &Delivery) {
        let Ok((partition, offset)) = parse_id(delivery) else {
            return;
        };
        // Only while this member still owns the partition; otherwise its new owner reads it.
        if self.owns(delivery, partition, |s| s.pending.contains(&offset)) {
            self.retry_at(delivery, partition, offset, Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partition_with_a_known_start_has_a_position_before_any_record() {
        let mut state = PartitionState::new(3);
        assert_eq!(state.position(), None);
        state.next = Some(10);
        assert_eq!(state.position(), Some(10));
        state.pending.insert(10);
        state.next = Some(11);
        assert_eq!(state.position(), Some(10));
        assert!(state.owns(3) && state.owns(4) && !state.owns(2));
    }
}
