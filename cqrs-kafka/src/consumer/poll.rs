//! The poll thread: polls all the time (serving rebalances and commit answers), decodes records
//! and hands them over in batches; pauses fetching when the handlers fall behind.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cqrs_core::wire::{Entry, Layout};
use cqrs_core::Message;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::error::KafkaResult;
use rdkafka::message::{BorrowedMessage, Headers, Message as _};
use tokio::sync::mpsc;

use super::rebalance::Ctx;

/// Messages fetched ahead of the handlers, per consumer.
pub(super) const PREFETCH: usize = 2048;

/// How long the poll thread waits, without polling, for the handlers to make room before it
/// pauses fetching and polls again (which serves rebalances and `max.poll.interval.ms`).
const PAUSE_AFTER: Duration = Duration::from_millis(500);

/// The poll thread's wait for records just after some came (see `poll_loop`).
const BUSY_TICK: Duration = Duration::from_millis(5);

/// The poll thread's longest wait for records, reached while none come.
const IDLE_TICK: Duration = Duration::from_millis(100);

/// A record as the poll thread decoded it.
pub(super) struct Record {
    pub(super) topic: Arc<str>,
    pub(super) partition: i32,
    pub(super) offset: i64,
    pub(super) message: Message,
    /// Why the message is malformed, if it is.
    pub(super) malformed: Option<String>,
}

/// A polled record (or a consumer error) with the rebalance epoch it was polled in.
pub(super) type Polled = (KafkaResult<Record>, u64);

/// The most records the poll thread sends at once. They go in batches so that the thread
/// handing them over and the one taking them wake each other once a batch, not once a record.
pub(super) const POLL_BATCH: usize = 256;

/// The message a record carries, and why it is malformed if it is (`docs/wire-format.md`); a
/// record without a message id gets `topic/partition/offset`.
pub(crate) fn decode(m: &impl rdkafka::message::Message) -> (Message, Option<String>) {
    let headers = m.headers();
    let entry = || Entry {
        // Made below only when the record has no id: a record carries one in nearly every
        // case, and formatting it for every record cost a tenth of the poll thread's time.
        id: "",
        time_ms: record_time_ms(m),
    };
    let payload = || m.payload().map(<[u8]>::to_vec);
    // rdkafka unwraps a header's name as text: a record whose header name is not UTF-8 (which
    // any client speaking the protocol may write) panicked the poll thread, and the group,
    // restarted, met it again. Caught, it is malformed: dead-lettered with its other headers.
    let decoded = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let fields = headers
            .iter()
            .flat_map(|h| h.iter())
            .filter_map(|h| Some((h.key, h.value?)));
        Layout::KAFKA.decode(fields, entry(), m.key(), payload())
    }));
    let (mut message, malformed) = match decoded {
        Ok(decoded) => decoded,
        Err(_) => {
            let readable = headers.into_iter().flat_map(|h| {
                (0..h.count()).filter_map(move |i| {
                    let header = std::panic::catch_unwind(AssertUnwindSafe(|| h.try_get(i)));
                    let header = header.ok().flatten()?;
                    Some((header.key, header.value?))
                })
            });
            let (message, _) = Layout::KAFKA.decode(readable, entry(), m.key(), payload());
            (
                message,
                Some("malformed message: a header name is not UTF-8".to_owned()),
            )
        }
    };
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
pub(super) fn poll_loop(
    consumer: &BaseConsumer<Ctx>,
    tx: &mpsc::Sender<Vec<Polled>>,
    stop: &AtomicBool,
    epoch: &AtomicU64,
    paused_flag: &AtomicBool,
    held_count: &AtomicUsize,
) {
    // How long a poll waits when nothing comes: short after records came, doubling up to
    // `IDLE_TICK` while none come. Closing waits for the poll thread to see `stop`, which it
    // does when its poll returns: with one tick of 100 ms throughout, a member stopped just
    // after its last records waited ~96 ms there (librdkafka has no wake-up this crate can
    // reach without unsafe code); an idle member wakes 10 times a second, not 100.
    let mut tick = BUSY_TICK;
    let mut topics: HashMap<String, Arc<str>> = HashMap::new();
    // The topic of the record before: records come in runs of one partition.
    let mut last: Option<Arc<str>> = None;
    let mut polled = |r: KafkaResult<BorrowedMessage<'_>>| -> Polled {
        let record = r.map(|m| {
            let topic = match last.as_ref().filter(|t| ***t == *m.topic()) {
                Some(t) => t.clone(),
                None => {
                    let t = topics
                        .entry(m.topic().to_owned())
                        .or_insert_with(|| Arc::from(m.topic()))
                        .clone();
                    last = Some(t.clone());
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
    let mut held: Vec<Polled> = Vec::with_capacity(POLL_BATCH);
    let mut paused = false;
    let mut full_since: Option<std::time::Instant> = None;
    while !stop.load(Ordering::SeqCst) {
        if !held.is_empty() {
            match tx.try_send(std::mem::take(&mut held)) {
                // Sized for a batch: grown from empty, the batch was copied eight times.
                Ok(()) => held.reserve(POLL_BATCH),
                Err(mpsc::error::TrySendError::Full(batch)) => held = batch,
                Err(mpsc::error::TrySendError::Closed(_)) => return,
            }
        }
        held_count.store(held.len(), Ordering::Relaxed);
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
                    } else if !full {
                        let resumed = assigned.elements();
                        super::rebalance::wake_fetchers(
                            consumer,
                            resumed.iter().map(|e| (e.topic(), e.partition())),
                        );
                    }
                    tracing::debug!(
                        paused = full,
                        partitions = assigned.count(),
                        held = held.len(),
                        "fetching paused or resumed"
                    );
                    paused = full;
                }
                Err(e) => tracing::warn!(error = %e, "reading the assignment failed"),
            }
        }
        let Some(r) = consumer.poll(tick) else {
            tick = (tick * 2).min(IDLE_TICK);
            continue;
        };
        tick = BUSY_TICK;
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
