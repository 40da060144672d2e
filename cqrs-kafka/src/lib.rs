//! Kafka backend for [`cqrs`](https://docs.rs/cqrs), on `rdkafka`.
//!
//! - Publishing sends each event to its topic with the event's key (one key, one partition, in
//!   order) and the metadata as headers (`docs/wire-format.md`). The idempotent producer is on by
//!   default. `publish` resolves when the broker acknowledged the message; a batch is queued at
//!   once and awaited together.
//! - Topics are created on first use through the admin API, dead-letter topics too, with the
//!   broker's default partitions and replication unless [`KafkaConfig::partitions`] and
//!   [`KafkaConfig::replication`] set them; with creation off, a missing topic is an error
//!   naming it.
//! - Each subscription is one consumer whose `group.id` is the processor's group, on KIP-848's
//!   consumer group protocol by default ([`KafkaConfig::group_protocol`]: rebalances move only
//!   the partitions that change owner; `cooperative-sticky` and the eager assignors on the
//!   classic protocol are options), with static membership if [`KafkaConfig::instance_id`] is
//!   set. Offsets are stored only for handled messages, and a partition's stored offset never
//!   passes a message still being handled or waiting for a retry; stored offsets are committed
//!   every 100 ms ([`KafkaConfig::commit_interval`]), every [`KafkaConfig::commit_every`]
//!   handled messages, when partitions are revoked in a rebalance and when the consumer closes.
//!   Each commit's metadata names the messages handled above its offset (acked after one still
//!   pending), and a member given the partition passes them over instead of handling them
//!   again (`cqrs-handled:1:...`, at most 2 KiB; Kafka takes 4 KiB by default,
//!   `offset.metadata.max.bytes`). While a broker connection is lost, and until a commit
//!   succeeds, handlers not started wait (`Acknowledge::must_wait`): what they would do could
//!   not be recorded, and the partitions' next owner would do it again.
//!   A consumer with [`KafkaConfig::max_unrecorded`] handled messages not yet committed (its
//!   commits refused) hands out no more until a commit succeeds (30 s at most, saying so every
//!   3 s), and a partition that comes back to it after a refused commit, or after it was lost,
//!   resumes where it had handled up to.
//! - Each consumer fetches ahead up to 16 MiB (`queued.max.messages.kbytes`) and asks for more
//!   10 ms after reaching it (`fetch.queue.backoff.ms`; librdkafka waits 1 s by default, which
//!   stalled consuming); [`KafkaConfig::set`] changes either.
//! - Every librdkafka setting passes through ([`KafkaConfig::set`]); `Debug` hides secrets.
//!
//! ```no_run
//! # async fn run() -> Result<(), cqrs_core::BoxError> {
//! use cqrs_kafka::{KafkaBackend, KafkaConfig};
//!
//! // Through the `cqrs` crate (feature `kafka`) this is `cqrs::kafka`: `EventBus::new` and
//! // `EventProcessor::new` take the backend as they take any other.
//! let backend = KafkaBackend::connect(KafkaConfig::new("127.0.0.1:9092").partitions(4)).await?;
//! # Ok(()) }
//! ```

mod access;
mod admin;
mod bookkeeping;
mod commit_gate;
mod config;
mod consumer;
mod dead_letters;
mod error;
mod producer;

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use cqrs_core::backend::{Consumer, Publisher, Subscriber, Subscription};
use cqrs_core::wire::Layout;
use cqrs_core::Message;
use rdkafka::admin::AdminClient;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::BaseRecord;

use producer::{InFlight, Producer, Producing};

pub use config::{GroupProtocol, KafkaConfig};
pub use cqrs_core::dead_letter::{DeadLetter, DeadLetterStore, REDRIVEN_FROM};
pub use dead_letters::{bookkeeping_group, run_lock_group};
pub use error::{Error, Result};
/// Locks `m`. Every update under these locks leaves the state consistent, so a lock poisoned by
/// a panic elsewhere is still used.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The `rdkafka` client crate this backend is built on, for raw clients beside it (admin tools,
/// tests, librdkafka's mock cluster), at the version the backend uses.
pub use rdkafka;

/// The Kafka backend: a producer, an admin client and the settings for consumers. Clones share
/// them.
#[derive(Clone)]
pub struct KafkaBackend {
    inner: Arc<Inner>,
}

struct Inner {
    config: KafkaConfig,
    producer: Producer,
    admin: AdminClient<access::Watched>,
    /// Looked up at every publish: with foldhash, not SipHash (in callgrind's profile of
    /// publishing one event per call, the lookup's hashing took ~230 instructions a message
    /// with SipHash, ~76 with foldhash).
    known_topics: Mutex<HashSet<String, foldhash::fast::RandomState>>,
    /// The clients that read consumer groups' offsets (`backlogs`), kept between calls.
    readers: admin::OffsetReaders,
}

impl fmt::Debug for KafkaBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaBackend")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl KafkaBackend {
    /// Creates the clients and checks that the brokers answer.
    pub async fn connect(config: KafkaConfig) -> Result<Self> {
        config.check()?;
        let watched = access::Watched::default();
        let producer: Producer = config
            .producer_config()
            .create_with_context(Producing {
                watched: watched.clone(),
            })
            .map_err(|e| Error::kafka("creating the producer", e))?;
        let admin: AdminClient<access::Watched> = config
            .admin_config()
            .create_with_context(watched.clone())
            .map_err(|e| Error::kafka("creating the admin client", e))?;
        let backend = KafkaBackend {
            inner: Arc::new(Inner {
                config,
                producer,
                admin,
                known_topics: Mutex::new(HashSet::default()),
                readers: admin::OffsetReaders::default(),
            }),
        };
        // The brokers answer a metadata request, or refuse this client (librdkafka reports that
        // as an error and tries again until the request times out): asked in growing steps, so
        // that a refusal ends `connect` at once and leaves no request waiting behind it.
        let brokers = backend.inner.config.brokers.clone();
        let deadline = tokio::time::Instant::now() + backend.inner.config.timeout;
        let mut step = Duration::from_millis(250);
        loop {
            let now = tokio::time::Instant::now();
            let answered = backend.metadata_topics(step.min(deadline - now)).await;
            if let Some(refusal) = watched.refusals.last() {
                return Err(refusal.into_error(&brokers, None, &[]));
            }
            match answered {
                Ok(_) => break,
                Err(Error::Kafka { source, .. }) if tokio::time::Instant::now() >= deadline => {
                    return Err(Error::Unreachable { brokers, source })
                }
                Err(Error::Kafka { .. }) => step *= 2,
                Err(other) => return Err(other),
            }
        }
        Ok(backend)
    }

    /// The settings.
    pub fn config(&self) -> &KafkaConfig {
        &self.inner.config
    }
}

/// The headers of `message` per the wire format.
pub(crate) fn headers(message: &Message) -> OwnedHeaders {
    let mut headers = Some(OwnedHeaders::new_with_capacity(
        Layout::KAFKA.size_hint(message).0,
    ));
    Layout::KAFKA.write(message, |key, value| {
        headers = headers.take().map(|h| {
            h.insert(Header {
                key,
                value: Some(value),
            })
        });
    });
    headers.unwrap_or_default()
}

impl KafkaBackend {
    /// Hands `m` to the producer's queue, counted in `in_flight`; a full queue waits for
    /// deliveries to make room.
    async fn queue(
        &self,
        topic: &str,
        m: &Message,
        in_flight: &Arc<InFlight>,
    ) -> cqrs_core::Result<()> {
        let mut record = BaseRecord::with_opaque_to(topic, in_flight.queued())
            .payload(&m.payload[..])
            .headers(headers(m))
            .timestamp(i64::try_from(m.metadata.created_at).unwrap_or(i64::MAX));
        if let Some(key) = &m.key {
            record = record.key(&**key);
        }
        loop {
            match self.inner.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((e, back)) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) => {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => {
                    in_flight.not_queued();
                    return Err(Error::kafka(format!("producing to {topic}"), e).into());
                }
            }
        }
    }
}

#[async_trait]
impl Publisher for KafkaBackend {
    fn system(&self) -> &'static str {
        "kafka"
    }

    async fn publish(&self, topic: &str, messages: &[Message]) -> cqrs_core::Result<()> {
        if messages.is_empty() {
            return Ok(());
        }
        self.send_all(topic, messages.iter().map(Ok)).await
    }

    /// Queues each message as soon as it comes: the first records are sent (or, with a
    /// `linger.ms` set, its clock starts) while the rest are encoded. An error from `messages`
    /// stops the queueing and is returned once the records already queued are delivered (they
    /// are sent).
    async fn publish_iter(
        &self,
        topic: &str,
        messages: &mut (dyn Iterator<Item = cqrs_core::Result<Message>> + Send),
    ) -> cqrs_core::Result<()> {
        self.send_all(topic, messages).await
    }
}

impl KafkaBackend {
    /// Queues every message as it comes, then awaits the deliveries together; an error from
    /// `messages` stops the queueing and is returned after the queued ones are delivered.
    async fn send_all<M: std::borrow::Borrow<Message> + Send>(
        &self,
        topic: &str,
        messages: impl Iterator<Item = cqrs_core::Result<M>> + Send,
    ) -> cqrs_core::Result<()> {
        if !self.topic_known(topic) {
            // The first publish to a topic only. Boxed, so that every publish's future (itself
            // boxed by `async_trait`) does not carry the admin calls' state.
            Box::pin(self.ensure_topics(&[topic])).await?;
        }
        let in_flight = InFlight::new();
        let mut failed = None;
        for m in messages {
            let queued = match m {
                Ok(m) => self.queue(topic, m.borrow(), &in_flight).await,
                Err(e) => Err(e),
            };
            if let Err(e) = queued {
                failed = Some(e);
                break;
            }
        }
        // The records queued are delivered (or fail) whatever stopped the queueing.
        in_flight
            .wait()
            .await
            .map_err(|e| Error::kafka(format!("producing to {topic}"), e))?;
        failed.map_or(Ok(()), Err)
    }
}

#[async_trait]
impl Subscriber for KafkaBackend {
    fn location(&self, _topic: &str) -> Option<String> {
        Some(format!("kafka at {}", self.inner.config.brokers()))
    }

    /// Lists the cluster's consumer groups (ListGroups), keeps those named with `prefix`, and
    /// reads each one's committed offsets on `topic` (OffsetFetch): a group with none there does
    /// not read it. `lag` is the records between its committed offsets and the log end; Kafka
    /// has no pending entries (`pending` is 0).
    async fn groups(
        &self,
        topic: &str,
        prefix: &str,
    ) -> cqrs_core::Result<Vec<cqrs_core::backend::GroupBacklog>> {
        let mut backlogs = self.backlogs(vec![topic.to_owned()], prefix).await?;
        match backlogs.pop() {
            Some((_, result)) => result.map_err(Into::into),
            None => Ok(Vec::new()),
        }
    }

    async fn subscribe(&self, subscription: &Subscription) -> cqrs_core::Result<Box<dyn Consumer>> {
        subscription.check()?;
        // The dead-letter topic too, before this returns: a message out of attempts must have
        // somewhere to go.
        let dead_letter = subscription.dead_letter.as_slice();
        if self.inner.config.create_topics {
            self.ensure_topics(&subscription.topics).await?;
        } else {
            // A missing topic fails the start here, before the consumer joins its group.
            let mut topics = subscription.topics.clone();
            topics.extend_from_slice(dead_letter);
            self.ensure_topics(&topics).await?;
        }
        // Made while the consumer joins its group, not before: a new group's dead-letter topic
        // (~40 ms to make and see led on one local broker) no longer delays its first message
        // (docs/benchmarks.md). A topic the cluster has already is found, not made.
        let (made, started) = tokio::join!(
            self.ensure_topics(dead_letter),
            consumer::KafkaConsumer::start(&self.inner.config, subscription)
        );
        // If the topic could not be made, a consumer that started leaves as it drops (its
        // threads see `stop`).
        let consumer = started?;
        made?;
        Ok(Box::new(consumer))
    }
}
