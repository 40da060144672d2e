//! The poll thread: polls all the time (serving rebalances and commit answers), decodes records
//! and hands them over in batches; pauses fetching when the handlers fall behind.

use std::borrow::Cow;
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cqrs_core::wire::{Entry, FieldValue, Layout, Part, DEFAULT_CONTENT_TYPE};
use cqrs_core::{Bytes, Message, Metadata, Text};
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

/// The bytes after which the poll thread sends a batch before it holds [`POLL_BATCH`] records:
/// a batch's buffer stays this size or a record's.
const BATCH_BYTES: usize = 1 << 20;

/// Records the poll thread sends at once, what their messages are made of in one buffer (see
/// [`Copied`]). Their messages' payloads, ids, names and keys are parts of that buffer, shared
/// ([`Bytes`], [`Text`], not copied out: a copy and an allocation a record, on a runtime worker,
/// were a tenth of consuming's CPU; the id's, name's and key's ~1,400 instructions of ~17,900).
/// The buffer goes back to the poll thread when the last of them is dropped
/// ([`Buffers::shared`]): the thread allocates nothing a record.
///
/// A buffer a record was the poll thread's allocation until then, freed on a runtime worker: a
/// thread that only allocates finds glibc's cache always empty and takes the allocator's slow
/// path, under the lock of the arena the workers free into (a fifth of the thread's time).
pub(super) struct Batch {
    pub(super) bytes: Vec<u8>,
    pub(super) polled: Vec<Polled>,
}

/// Where the poll thread hands batches over: the queue, the buffers given back, and how many
/// records it holds that the queue had no room for (read by tests).
#[derive(Clone, Copy)]
pub(super) struct Handover<'a> {
    pub(super) tx: &'a mpsc::Sender<Batch>,
    pub(super) buffers: &'a Buffers,
    pub(super) held: &'a AtomicUsize,
}

/// Buffers given back by the consumer, for the poll thread's next batches.
#[derive(Default)]
pub(super) struct Buffers(std::sync::Mutex<Vec<Vec<u8>>>);

impl Buffers {
    /// As many as are in flight at most: the queue's batches, one held, one being taken, and
    /// as many again whose messages are being handled.
    const KEPT: usize = 2 * (PREFETCH / POLL_BATCH) + 2;

    /// `bytes` shared: given back to `buffers` when the last part of it is dropped.
    ///
    /// A message waiting for a retry is given parts of its own ([`detached`]). One held
    /// otherwise (behind another of its key, or by the handler) keeps its batch's buffer; the
    /// commit gate bounds how far a member runs ahead of its oldest unsettled message
    /// (`KafkaConfig::max_unrecorded`), and so how many buffers are kept.
    pub(super) fn shared(buffers: &Arc<Buffers>, bytes: Vec<u8>) -> Bytes {
        /// Gives its buffer back when dropped.
        struct Lent(Vec<u8>, Arc<Buffers>);
        impl AsRef<[u8]> for Lent {
            fn as_ref(&self) -> &[u8] {
                &self.0
            }
        }
        impl Drop for Lent {
            fn drop(&mut self) {
                self.1.give(std::mem::take(&mut self.0));
            }
        }
        Bytes::from_owner(Lent(bytes, buffers.clone()))
    }

    /// A buffer for the next batch, of `at_least` bytes: one given back, or a new one. One
    /// given back smaller than that is replaced, not grown: growing it (`reserve`) copied all
    /// its old bytes, unread once it is emptied, ~300 KB a time, while the largest batch's
    /// size rose through a run (~190 instructions a record consuming 20,000, docs/benchmarks.md).
    fn take(&self, at_least: usize) -> Vec<u8> {
        match crate::lock(&self.0).pop() {
            Some(bytes) if bytes.capacity() >= at_least => bytes,
            _ => Vec::with_capacity(at_least),
        }
    }

    /// Gives `bytes` back, emptied; one grown past a batch's usual size (by a large record) is
    /// dropped, not kept.
    pub(super) fn give(&self, mut bytes: Vec<u8>) {
        if bytes.capacity() > 2 * BATCH_BYTES {
            return;
        }
        bytes.clear();
        let mut kept = crate::lock(&self.0);
        if kept.len() < Self::KEPT {
            kept.push(bytes);
        }
    }
}

/// `message` with a payload, an id, a name and a key of its own, not parts of its batch's
/// buffer: a message kept for a retry (seconds, minutes) would keep the whole buffer (see
/// [`Buffers::shared`]), one for each message waiting. Copied once: a message whose parts are
/// its own already (a message retried before) is shared, not copied again.
pub(super) fn detached(message: &Arc<Message>) -> Arc<Message> {
    let own = |t: &Text| t.is_empty() || t.is_unique();
    let own_payload = message.payload.is_empty() || message.payload.is_unique();
    if own_payload && own(&message.id) && own(&message.name) && message.key.as_ref().is_none_or(own)
    {
        return message.clone();
    }
    let copy = |t: &Text| {
        if own(t) {
            t.clone()
        } else {
            Text::from(t.as_str())
        }
    };
    let mut m = Message::clone(message);
    if !own_payload {
        m.payload = Bytes::copy_from_slice(&message.payload);
    }
    m.id = copy(&message.id);
    m.name = copy(&message.name);
    m.key = message.key.as_ref().map(copy);
    Arc::new(m)
}

/// What the message of a record is made of, copied out of librdkafka into its batch's buffer at
/// `at`: the payload, then the key, then each header (`u32` name length, name, `u32` value
/// length or `u32::MAX` for none, value). [`Copied::decode`] makes the message.
///
/// The poll thread copies; a runtime worker decodes, allocating the message's parts where they
/// are freed (why the poll thread allocates nothing: [`Batch`]).
pub(crate) struct Copied {
    at: usize,
    /// The payload's length; `None` for a record without a payload.
    payload: Option<usize>,
    /// The key's length; `None` for a record without a key.
    key: Option<usize>,
    /// The length of the headers' bytes.
    headers: usize,
    time_ms: Option<u64>,
    /// Why the record is malformed, found while copying.
    malformed: Option<&'static str>,
}

/// A header value's length in [`Copied`] when it has none.
const NO_VALUE: u32 = u32::MAX;

impl Copied {
    /// Copies what `m`'s message is made of to the end of `buf`.
    pub(crate) fn of(m: &impl rdkafka::message::Message, buf: &mut Vec<u8>) -> Copied {
        let at = buf.len();
        let payload = m.payload();
        let key = m.key();
        let headers = m.headers();
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
                put(buf, h.key, h.value);
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
                            put(buf, header.key, header.value);
                        }
                    }
                }
                Some("malformed message: a header name is not UTF-8")
            }
        };
        Copied {
            at,
            payload: payload.map(<[u8]>::len),
            key: key.map(<[u8]>::len),
            headers: buf.len() - start,
            time_ms: record_time_ms(m),
            malformed,
        }
    }

    /// The message (`docs/wire-format.md`) and why it is malformed, if it is, from `buf`, the
    /// buffer it was copied to; a record without a message id gets `topic/partition/offset`.
    pub(crate) fn decode(
        self,
        buf: &Bytes,
        topic: &str,
        partition: i32,
        offset: i64,
    ) -> (Message, Option<String>) {
        match self.plain(buf) {
            Some(message) => (message, None),
            None => self.decode_fields(buf, || format!("{topic}/{partition}/{offset}")),
        }
    }

    /// Its payload's, key's and headers' bytes in `buf`.
    fn parts<'b>(&self, buf: &'b Bytes) -> (&'b [u8], &'b [u8], &'b [u8]) {
        let payload_len = self.payload.unwrap_or(0);
        let len = payload_len + self.key.unwrap_or(0) + self.headers;
        let bytes = buf.get(self.at..self.at + len).unwrap_or_default();
        let (payload, rest) = bytes.split_at(payload_len.min(bytes.len()));
        let (key, headers) = rest.split_at(self.key.unwrap_or(0).min(rest.len()));
        (payload, key, headers)
    }

    /// The message of a record with a payload whose only headers are its id and name, both
    /// text and not empty: what our producer writes for a message with the default metadata.
    /// Made as [`Copied::decode_fields`] makes it, without reading the headers as fields (that
    /// was ~500 of the ~1,000 instructions decoding took a record, docs/benchmarks.md). `None`
    /// for any other record.
    fn plain(&self, buf: &Bytes) -> Option<Message> {
        if self.malformed.is_some() || self.payload.is_none() {
            return None;
        }
        let (payload, key, headers) = self.parts(buf);
        let (id, name) = id_and_name(headers)?;
        if id.is_empty() || name.is_empty() {
            return None;
        }
        let id = Part::new(buf, id).into_shared().ok()?;
        let name = Part::new(buf, name).into_shared().ok()?;
        let key = self.key.map(|_| Part::new(buf, key).into_key());
        let mut metadata = Metadata::default();
        metadata.created_at = self.time_ms.unwrap_or(0);
        metadata.content_type = Cow::Borrowed(DEFAULT_CONTENT_TYPE);
        let payload = buf.slice_ref(payload);
        Some(Message::from_parts(id, name, 1, key, payload, metadata))
    }

    /// [`Copied::decode`], its headers read as the message's fields; `position` names a record
    /// without a message id.
    fn decode_fields(
        self,
        buf: &Bytes,
        position: impl FnOnce() -> String,
    ) -> (Message, Option<String>) {
        let (payload_bytes, key_bytes, mut headers) = self.parts(buf);
        let Copied {
            payload,
            key,
            time_ms,
            malformed,
            ..
        } = self;
        let mut broken = false;
        let fields = std::iter::from_fn(|| {
            if headers.is_empty() {
                return None;
            }
            // The name taken as bytes: written from text by `of`, it is not checked again.
            let field = next_header(&mut headers)
                .map(|(name, value)| (name, value.map(|part| Part::new(buf, part))));
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
        let (mut message, mut why) = Layout::KAFKA.decode(
            fields,
            entry,
            key.map(|_| Part::new(buf, key_bytes)),
            // A part of the batch's buffer, not a copy (see `Batch`).
            payload.map(|_| buf.slice_ref(payload_bytes)),
        );
        if let Some(m) = malformed {
            why = Some(m.to_owned());
        } else if broken && why.is_none() {
            why = Some("malformed message: its headers could not be read".to_owned());
        }
        if message.id.is_empty() {
            message.id = position().into();
        }
        (message, why)
    }
}

/// The next header of `headers` as [`Copied::of`] wrote it, taken off the front: its name and
/// its value (`None`: a header without one); `None` when what is left is not a header.
fn next_header<'b>(headers: &mut &'b [u8]) -> Option<(&'b [u8], Option<&'b [u8]>)> {
    let mut take = |n: usize| {
        let (taken, left) = headers.split_at_checked(n)?;
        *headers = left;
        Some(taken)
    };
    let len = |b: &[u8]| b.try_into().ok().map(u32::from_le_bytes);
    let name_len = len(take(4)?)?;
    let name = take(name_len as usize)?;
    let value = match len(take(4)?)? {
        NO_VALUE => None,
        n => Some(take(n as usize)?),
    };
    Some((name, value))
}

/// The values of the headers `cqrs-id` and `cqrs-name` as [`Copied::of`] wrote them, when they
/// are the only two, in either order, each with a value.
fn id_and_name(mut headers: &[u8]) -> Option<(&[u8], &[u8])> {
    const ID: &[u8] = b"cqrs-id";
    const NAME: &[u8] = b"cqrs-name";
    let first = next_header(&mut headers)?;
    let second = next_header(&mut headers)?;
    if !headers.is_empty() {
        return None;
    }
    match (first, second) {
        ((ID, Some(id)), (NAME, Some(name))) | ((NAME, Some(name)), (ID, Some(id))) => {
            Some((id, name))
        }
        _ => None,
    }
}

/// The message a record carries, and why it is malformed if it is (`docs/wire-format.md`); a
/// record without a message id gets `topic/partition/offset`.
pub(crate) fn decode(m: &impl rdkafka::message::Message) -> (Message, Option<String>) {
    let mut buf = Vec::new();
    let copied = Copied::of(m, &mut buf);
    copied.decode(&Bytes::from(buf), m.topic(), m.partition(), m.offset())
}

/// The record's timestamp, in milliseconds since the Unix epoch.
pub(crate) fn record_time_ms(m: &impl rdkafka::message::Message) -> Option<u64> {
    m.timestamp()
        .to_millis()
        .and_then(|t| u64::try_from(t).ok())
}

/// Polls until `stop`: records go to `tx` copied, in batches, tagged with the rebalance epoch;
/// `only` is the topic when the subscription is to one (not a pattern).
/// When the handlers fall behind and `tx` is full, the assigned partitions are paused and
/// polling goes on, serving the group (rebalances, `max.poll.interval.ms`) without fetching more.
pub(super) fn poll_loop(
    consumer: &BaseConsumer<Ctx>,
    only: Option<Arc<str>>,
    handover: &Handover<'_>,
    stop: &AtomicBool,
    epoch: &AtomicU64,
    paused_flag: &AtomicBool,
) {
    let Handover {
        tx,
        buffers,
        held: held_count,
    } = *handover;
    // How long a poll waits when nothing comes: short after records came, doubling up to
    // `IDLE_TICK` while none come. Closing waits for the poll thread to see `stop`, which it
    // does when its poll returns: with one tick of 100 ms throughout, a member stopped just
    // after its last records waited ~96 ms there (librdkafka has no wake-up this crate can
    // reach without unsafe code); an idle member wakes 10 times a second, not 100.
    let mut tick = BUSY_TICK;
    let mut topics: HashMap<String, Arc<str>> = HashMap::new();
    // The topic of the record before: records come in runs of one partition.
    let mut last: Option<Arc<str>> = None;
    let mut polled = |r: KafkaResult<BorrowedMessage<'_>>, bytes: &mut Vec<u8>| -> Polled {
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
                copied: Copied::of(&m, bytes),
            }
        });
        // Read after the poll: a rebalance it served is in the epoch.
        (record, epoch.load(Ordering::SeqCst))
    };
    // Polled and not sent yet: the queue had no room. Sized for a batch: grown from empty, the
    // list of records was copied eight times, and a new buffer (none given back yet) as often
    // (~60 instructions a record, docs/benchmarks.md): it gets the largest batch's size so far.
    let mut sized = 0;
    let new_batch = |sized: usize| Batch {
        bytes: buffers.take(sized),
        polled: Vec::with_capacity(POLL_BATCH),
    };
    let mut held = new_batch(sized);
    let mut paused = false;
    let mut full_since: Option<std::time::Instant> = None;
    while !stop.load(Ordering::SeqCst) {
        if !held.polled.is_empty() {
            match tx.try_reserve() {
                Ok(room) => {
                    sized = sized.max(held.bytes.len()).min(BATCH_BYTES);
                    room.send(std::mem::replace(&mut held, new_batch(sized)))
                }
                Err(mpsc::error::TrySendError::Full(())) => {}
                Err(mpsc::error::TrySendError::Closed(())) => return,
            }
        }
        held_count.store(held.polled.len(), Ordering::Relaxed);
        let full = !held.polled.is_empty();
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
                    held.polled.push(polled(r, &mut held.bytes));
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
                        held = held.polled.len(),
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
        held.polled.push(polled(r, &mut held.bytes));
        // Then what is there at once, up to a batch (paused: nothing more is fetched).
        while !paused && held.polled.len() < POLL_BATCH && held.bytes.len() < BATCH_BYTES {
            match consumer.poll(Duration::ZERO) {
                Some(r) => held.polled.push(polled(r, &mut held.bytes)),
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
        assert_eq!(&message.payload[..], b"{\"n\":1}");
        assert_eq!(message.metadata.correlation_id.as_deref(), Some("c-9"));
        assert_eq!(message.metadata.created_at, 1_700_000_000_123);
        assert_eq!(
            message.metadata.headers.iter().collect::<Vec<_>>(),
            [(&"tenant".to_owned(), &"acme".to_owned())]
        );
    }

    /// The headers of a record with message id `id` and name `name`.
    fn header(id: &str, name: &str) -> OwnedHeaders {
        OwnedHeaders::new()
            .insert(Header {
                key: "cqrs-id",
                value: Some(id),
            })
            .insert(Header {
                key: "cqrs-name",
                value: Some(name),
            })
    }

    /// A record with a payload whose only headers are its id and name (what our producer writes
    /// for a message with the default metadata) is decoded without reading its headers as
    /// fields, to the message that reading them gives; every other record is read as before.
    #[test]
    fn a_record_with_only_an_id_and_a_name_decodes_as_reading_its_fields_does() {
        let written = {
            let m = Message::new("orders.Placed", b"{}".to_vec());
            let mut headers = OwnedHeaders::new();
            Layout::KAFKA.write(&m, |k, v| {
                headers = std::mem::take(&mut headers).insert(Header {
                    key: k,
                    value: Some(v),
                });
            });
            record(Some(b"{}"), None, headers)
        };
        let mut buf = Vec::new();
        let copied = Copied::of(&written, &mut buf);
        assert!(
            copied.plain(&Bytes::from(buf)).is_some(),
            "what our producer writes is plain"
        );
        let texts: [Option<&[u8]>; 4] = [Some(b"a.B"), Some(b""), Some(&[0xff, b'a']), None];
        let keys: [Option<&[u8]>; 4] = [None, Some(b""), Some(b"k-1"), Some(&[0xfe])];
        let payloads: [Option<&[u8]>; 3] = [None, Some(b""), Some(b"{\"n\":1}")];
        /// A header's name and value (`None`: a header without one).
        type Field<'a> = (&'a str, Option<&'a [u8]>);
        let extras: [&[Field]; 5] = [
            &[],
            &[("tenant", Some(b"acme"))],
            &[("cqrs-id", Some(b"id-2"))],
            &[("cqrs-name", None)],
            &[("cqrs-created-at", Some(b"5"))],
        ];
        let (mut cases, mut plain) = (0, 0);
        for id in texts {
            for name in texts {
                for key in keys {
                    for payload in payloads {
                        for extra in extras {
                            for name_first in [false, true] {
                                // An id or a name of `None` is a record without that header.
                                let mut fields: Vec<Field> = [("cqrs-id", id), ("cqrs-name", name)]
                                    .into_iter()
                                    .filter(|(_, v)| v.is_some())
                                    .collect();
                                if name_first {
                                    fields.reverse();
                                }
                                fields.extend_from_slice(extra);
                                let headers =
                                    fields.iter().fold(OwnedHeaders::new(), |h, (k, v)| {
                                        h.insert(Header { key: k, value: *v })
                                    });
                                let r = record(payload, key, headers);
                                // Not at the buffer's start, as a batch's second record is.
                                let mut buf = b"before".to_vec();
                                let (fast, general) =
                                    (Copied::of(&r, &mut buf), Copied::of(&r, &mut buf));
                                let buf = Bytes::from(buf);
                                let text = |v: &Option<&[u8]>| {
                                    v.is_some_and(|v| {
                                        !v.is_empty() && std::str::from_utf8(v).is_ok()
                                    })
                                };
                                let one = |k: &str| {
                                    fields.iter().filter(|(n, v)| *n == k && text(v)).count() == 1
                                };
                                let expected = fields.len() == 2
                                    && one("cqrs-id")
                                    && one("cqrs-name")
                                    && payload.is_some();
                                let case = format!("{fields:?}, key {key:?}, payload {payload:?}");
                                assert_eq!(fast.plain(&buf).is_some(), expected, "{case}");
                                plain += usize::from(expected);
                                assert_eq!(
                                    fast.decode(&buf, "orders", 3, 7),
                                    general.decode_fields(&buf, || "orders/3/7".to_owned()),
                                    "{case}"
                                );
                                cases += 1;
                            }
                        }
                    }
                }
            }
        }
        assert_eq!((cases, plain), (1920, 2 * 4 * 2 * 2));
    }

    /// Records copied one after another into a batch's buffer each decode to their own message,
    /// whatever came before them in it.
    #[test]
    fn records_copied_into_one_buffer_decode_each_to_its_own_message() {
        let records = [
            record(
                Some(b"{\"n\":1}"),
                Some(b"k-1"),
                header("id-1", "orders.Placed"),
            ),
            record(None, None, header("id-2", "orders.Empty")),
            record(Some(&[0xff; 3000]), Some(b""), header("id-3", "orders.Big")),
            record(Some(b""), None, OwnedHeaders::new()),
        ];
        let mut buf = Vec::new();
        let copied: Vec<Copied> = records.iter().map(|r| Copied::of(r, &mut buf)).collect();
        let buf = Bytes::from(buf);
        let decoded: Vec<_> = copied
            .into_iter()
            .map(|c| c.decode(&buf, "orders", 3, 7))
            .collect();
        let each = decoded
            .iter()
            .map(|(m, why)| {
                (
                    m.id.as_str(),
                    m.name.as_str(),
                    m.key.as_deref(),
                    m.payload.len(),
                    why.is_some(),
                )
            })
            .collect::<Vec<_>>();
        assert_eq!(
            each,
            [
                ("id-1", "orders.Placed", Some("k-1"), 7, false),
                ("id-2", "orders.Empty", None, 0, true),
                ("id-3", "orders.Big", Some(""), 3000, false),
                ("orders/3/7", "", None, 0, true),
            ]
        );
        assert_eq!(&decoded[0].0.payload[..], b"{\"n\":1}");
        assert!(decoded[2].0.payload.iter().all(|b| *b == 0xff));
    }

    #[test]
    fn a_batch_buffer_goes_back_to_the_poll_thread_when_its_last_message_is_dropped() {
        let buffers = Arc::new(Buffers::default());
        let mut buf = Vec::with_capacity(4096);
        let records = [
            record(Some(b"{\"n\":1}"), None, header("id-1", "orders.Placed")),
            record(Some(b"{\"n\":2}"), None, header("id-2", "orders.Placed")),
        ];
        let copied: Vec<Copied> = records.iter().map(|r| Copied::of(r, &mut buf)).collect();
        let at = buf.as_ptr();
        let shared = Buffers::shared(&buffers, buf);
        let mut messages: Vec<Message> = copied
            .into_iter()
            .map(|c| c.decode(&shared, "orders", 0, 1).0)
            .collect();
        drop(shared);
        assert_eq!(&messages[0].payload[..], b"{\"n\":1}");
        assert_eq!(&messages[1].payload[..], b"{\"n\":2}");
        assert_eq!(
            messages[0].payload.as_ptr(),
            at,
            "a part of the buffer, not a copy"
        );
        // The id, name and key are parts of it too: not copied, and holding it as the payload
        // does.
        let within = |p: *const u8| (at as usize..at as usize + 4096).contains(&(p as usize));
        assert!(within(messages[0].id.as_ptr()) && within(messages[0].name.as_ptr()));
        messages.pop();
        assert!(
            crate::lock(&buffers.0).is_empty(),
            "a message still holds it"
        );
        let id = messages[0].id.clone();
        drop(messages);
        assert!(crate::lock(&buffers.0).is_empty(), "its id still holds it");
        drop(id);
        let back = buffers.take(0);
        assert_eq!((back.as_ptr(), back.capacity(), back.len()), (at, 4096, 0));
    }

    /// A message kept for a retry does not keep its batch's buffer.
    #[test]
    fn a_detached_message_lets_its_batch_buffer_go_back() {
        let buffers = Arc::new(Buffers::default());
        let mut buf = Vec::with_capacity(4096);
        let copied = Copied::of(
            &record(Some(b"{}"), Some(b"k"), header("id-1", "a.B")),
            &mut buf,
        );
        let at = buf.as_ptr();
        let message = Arc::new(copied.decode(&Buffers::shared(&buffers, buf), "t", 0, 1).0);
        let kept = detached(&message);
        assert_eq!(*kept, *message);
        assert_ne!(kept.payload.as_ptr(), message.payload.as_ptr());
        assert_ne!(kept.id.as_ptr(), message.id.as_ptr());
        assert_ne!(kept.name.as_ptr(), message.name.as_ptr());
        drop(message);
        let back = buffers.take(0);
        assert_eq!(
            back.as_ptr(),
            at,
            "given back while the detached one is kept"
        );
        assert_eq!(&kept.payload[..], b"{}");
        assert!(
            Arc::ptr_eq(&detached(&kept), &kept),
            "detached once, then shared"
        );
    }

    #[test]
    fn buffers_given_back_are_kept_emptied_up_to_a_bound_and_never_when_grown_large() {
        let buffers = Buffers::default();
        buffers.give(Vec::with_capacity(4 * BATCH_BYTES));
        assert_eq!(buffers.take(0).capacity(), 0, "a grown buffer is not kept");
        for _ in 0..Buffers::KEPT + 3 {
            buffers.give(vec![7; 100]);
        }
        assert_eq!(crate::lock(&buffers.0).len(), Buffers::KEPT);
        let b = buffers.take(100);
        assert!(b.is_empty() && b.capacity() >= 100);
        // One smaller than asked for is dropped and a new one made, not grown from it.
        let b = buffers.take(1000);
        assert!(b.is_empty() && b.capacity() >= 1000);
        assert_eq!(crate::lock(&buffers.0).len(), Buffers::KEPT - 2);
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
