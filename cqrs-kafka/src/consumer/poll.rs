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

/// A record as the poll thread copied it (decoded into a message on a runtime worker).
pub(super) struct Record {
    pub(super) topic: Arc<str>,
    pub(super) partition: i32,
    pub(super) offset: i64,
    pub(super) copied: Copied,
}

/// A polled record (or a consumer error) with the rebalance epoch it was polled in.
pub(super) type Polled = (KafkaResult<Record>, u64);

/// The most records the poll thread sends at once. They go in batches so that the thread
/// handing them over and the one taking them wake each other once a batch, not once a record.
pub(super) const POLL_BATCH: usize = 256;

/// What the message of a record is made of, copied out of librdkafka in one allocation: the
/// payload, then the key, then each header (`u32` name length, name, `u32` value length or
/// `u32::MAX` for none, value). [`Copied::decode`] makes the message, the buffer becoming its
/// payload.
///
/// The poll thread copies; a runtime worker decodes. The message's fields decoded on the poll
/// thread were four allocations there (payload, id, name, key), each freed on a worker: a
/// thread that only allocates finds its glibc cache always empty and takes the allocator's
/// slow path, under the lock of the arena the workers free into (docs/benchmarks.md).
pub(crate) struct Copied {
    buf: Vec<u8>,
    /// The payload's length; `None` for a record without a payload.
    payload: Option<usize>,
    /// The key's length; `None` for a record without a key.
    key: Option<usize>,
    time_ms: Option<u64>,
    /// Why the record is malformed, found while copying.
    malformed: Option<&'static str>,
}

/// A header value's length in [`Copied`] when it has none.
const NO_VALUE: u32 = u32::MAX;

impl Copied {
    /// Copies what `m`'s message is made of.
    pub(crate) fn of(m: &impl rdkafka::message::Message) -> Copied {
        let payload = m.payload();
        let key = m.key();
        let headers = m.headers();
        let size = payload.map_or(0, <[u8]>::len)
            + key.map_or(0, <[u8]>::len)
            // A header: its two lengths (8 bytes) and a name and value of typical size.
            + headers.as_ref().map_or(0, |h| h.count() * 48);
        let mut buf = Vec::with_capacity(size);
        buf.extend_from_slice(payload.unwrap_or_default());
        buf.extend_from_slice(key.unwrap_or_default());
        let put = |buf: &mut Vec<u8>, name: &str, value: Option<&[u8]>| {
            buf.extend_from_slice(&(name.len() as u32).to_le_bytes());
            buf.extend_from_slice(name.as_bytes());
            match value {
                Some(v) => {
                    buf.extend_from_slice(&(v.len() as u32).to_le_bytes());
                    buf.extend_from_slice(v);
                }
                None => buf.extend_from_slice(&NO_VALUE.to_le_bytes()),
            }
        };
        let start = buf.len();
        // rdkafka unwraps a header's name as text: a record whose header name is not UTF-8
        // (which any client speaking the protocol may write) panicked the poll thread, and the
        // group, restarted, met it again. Caught, it is malformed: dead-lettered with its other
        // headers.
        let copied = std::panic::catch_unwind(AssertUnwindSafe(|| {
            for h in headers.iter().flat_map(|h| h.iter()) {
                put(&mut buf, h.key, h.value);
            }
        }));
        let malformed = match copied {
            Ok(()) => None,
            Err(_) => {
                buf.truncate(start);
                for h in headers.iter() {
                    for i in 0..h.count() {
                        let header = std::panic::catch_unwind(AssertUnwindSafe(|| h.try_get(i)));
                        if let Some(header) = header.ok().flatten() {
                            put(&mut buf, header.key, header.value);
                        }
                    }
                }
                Some("malformed message: a header name is not UTF-8")
            }
        };
        Copied {
            buf,
            payload: payload.map(<[u8]>::len),
            key: key.map(<[u8]>::len),
            time_ms: record_time_ms(m),
            malformed,
        }
    }

    /// The message (`docs/wire-format.md`) and why it is malformed, if it is; a record without a
    /// message id gets `topic/partition/offset`.
    pub(crate) fn decode(
        self,
        topic: &str,
        partition: i32,
        offset: i64,
    ) -> (Message, Option<String>) {
        let Copied {
            mut buf,
            payload,
            key,
            time_ms,
            malformed,
        } = self;
        let payload_len = payload.unwrap_or(0);
        let rest = buf.get(payload_len..).unwrap_or_default();
        let (key_bytes, mut headers) = rest.split_at(key.unwrap_or(0).min(rest.len()));
        let mut broken = false;
        let fields = std::iter::from_fn(|| {
            if headers.is_empty() {
                return None;
            }
            let mut take = |n: usize| -> Option<&[u8]> {
                let (taken, left) = headers.split_at_checked(n)?;
                headers = left;
                Some(taken)
            };
            let field = (|| {
                let len = |b: &[u8]| b.try_into().ok().map(u32::from_le_bytes);
                let name_len = len(take(4)?)?;
                let name = take(name_len as usize)?;
                let value = match len(take(4)?)? {
                    NO_VALUE => None,
                    n => Some(take(n as usize)?),
                };
                Some((std::str::from_utf8(name).ok()?, value))
            })();
            if field.is_none() {
                // Not written by `of`: nothing more is read.
                broken = true;
                headers = &[];
            }
            field
        })
        .filter_map(|(name, value)| Some((name, value?)));
        let entry = Entry {
            // Made below only when the record has no id: a record carries one in nearly every
            // case, and formatting it for every record cost a tenth of the poll thread's time.
            id: "",
            time_ms,
        };
        // The payload is put in after: `buf`, cut to it, becomes the message's payload (an
        // empty `Vec` stands in meanwhile, allocating nothing).
        let (mut message, mut why) = Layout::KAFKA.decode(
            fields,
            entry,
            key.map(|_| key_bytes),
            payload.map(|_| Vec::new()),
        );
        if payload.is_some() {
            buf.truncate(payload_len);
            message.payload = buf;
        }
        if let Some(m) = malformed {
            why = Some(m.to_owned());
        } else if broken && why.is_none() {
            why = Some("malformed message: its headers could not be read".to_owned());
        }
        if message.id.is_empty() {
            message.id = format!("{topic}/{partition}/{offset}");
        }
        (message, why)
    }
}

/// The message a record carries, and why it is malformed if it is (`docs/wire-format.md`); a
/// record without a message id gets `topic/partition/offset`.
pub(crate) fn decode(m: &impl rdkafka::message::Message) -> (Message, Option<String>) {
    Copied::of(m).decode(m.topic(), m.partition(), m.offset())
}

/// The record's timestamp, in milliseconds since the Unix epoch.
pub(crate) fn record_time_ms(m: &impl rdkafka::message::Message) -> Option<u64> {
    m.timestamp()
        .to_millis()
        .and_then(|t| u64::try_from(t).ok())
}

/// Polls until `stop`: records go to `tx` decoded, in batches, tagged with the rebalance epoch;
/// `only` is the topic when the subscription is to one (not a pattern).
/// When the handlers fall behind and `tx` is full, the assigned partitions are paused and
/// polling goes on, serving the group (rebalances, `max.poll.interval.ms`) without fetching more.
pub(super) fn poll_loop(
    consumer: &BaseConsumer<Ctx>,
    only: Option<Arc<str>>,
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
            // Subscribed to one topic, every record is of it: its name is not read (the name,
            // measured and compared with the last one's, cost a twentieth of this thread's time).
            let known = only
                .as_ref()
                .or_else(|| last.as_ref().filter(|t| ***t == *m.topic()));
            let topic = match known {
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
            Record {
                topic,
                partition: m.partition(),
                offset: m.offset(),
                copied: Copied::of(&m),
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

#[cfg(test)]
mod tests {
    use rdkafka::message::{Header, OwnedHeaders, OwnedMessage};
    use rdkafka::Timestamp;

    use super::*;

    fn record(payload: Option<&[u8]>, key: Option<&[u8]>, headers: OwnedHeaders) -> OwnedMessage {
        OwnedMessage::new(
            payload.map(<[u8]>::to_vec),
            key.map(<[u8]>::to_vec),
            "orders".to_owned(),
            Timestamp::CreateTime(1_700_000_000_123),
            3,
            7,
            Some(headers),
        )
    }

    #[test]
    fn a_copied_record_decodes_to_its_message_and_the_buffer_becomes_the_payload() {
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "cqrs-id",
                value: Some("id-1"),
            })
            .insert(Header {
                key: "cqrs-name",
                value: Some("orders.Placed"),
            })
            .insert(Header {
                key: "cqrs-version",
                value: Some("2"),
            })
            .insert(Header {
                key: "tenant",
                value: Some("acme"),
            })
            .insert(Header::<&str> {
                key: "empty",
                value: None,
            })
            .insert(Header {
                key: "cqrs-correlation-id",
                value: Some("c-9"),
            });
        let m = record(Some(b"{\"n\":1}"), Some(b"k-1"), headers);
        let (message, malformed) = decode(&m);
        assert_eq!(malformed, None);
        assert_eq!(message.id, "id-1");
        assert_eq!(message.name, "orders.Placed");
        assert_eq!(message.version, 2);
        assert_eq!(message.key.as_deref(), Some("k-1"));
        assert_eq!(message.payload, b"{\"n\":1}");
        assert_eq!(message.metadata.correlation_id.as_deref(), Some("c-9"));
        assert_eq!(message.metadata.created_at, 1_700_000_000_123);
        assert_eq!(
            message.metadata.headers.iter().collect::<Vec<_>>(),
            [(&"tenant".to_owned(), &"acme".to_owned())]
        );
    }

    #[test]
    fn a_record_without_payload_key_or_id_is_malformed_and_named_by_its_position() {
        let headers = OwnedHeaders::new().insert(Header {
            key: "cqrs-name",
            value: Some("orders.Placed"),
        });
        let (message, malformed) = decode(&record(None, None, headers));
        assert_eq!(message.id, "orders/3/7");
        assert_eq!(message.key, None);
        assert!(message.payload.is_empty());
        assert_eq!(
            malformed.as_deref(),
            Some("malformed message: field `cqrs-payload` is missing")
        );
        // An empty payload is a payload.
        let headers = OwnedHeaders::new().insert(Header {
            key: "cqrs-name",
            value: Some("orders.Placed"),
        });
        let (message, malformed) = decode(&record(Some(b""), Some(b""), headers));
        assert_eq!((malformed, message.key.as_deref()), (None, Some("")));
    }
}
