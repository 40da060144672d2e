//! The traits a backend implements: [`Publisher`], [`Subscriber`], [`Consumer`] and [`Acknowledge`].
//!
//! A backend is a broker client with consumer groups. The in-memory broker ([`crate::memory`]),
//! Redis Streams and Kafka implement these traits and nothing else; buses and processors are written
//! against them. `cqrs::conformance` checks that a backend behaves as buses and processors expect.

use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;

use crate::error::{Error, Result};
use crate::message::Message;

/// Sends messages to topics.
#[async_trait]
pub trait Publisher: Send + Sync + 'static {
    /// Appends `messages` to `topic`, in order, in as few round trips as the backend can.
    ///
    /// Returns once the broker has accepted every message.
    async fn publish(&self, topic: &str, messages: &[Message]) -> Result<()>;

    /// The kind of broker, as metrics label it (OpenTelemetry's `messaging.system`): `memory`,
    /// `redis`, `kafka`. The default is `unknown`.
    fn system(&self) -> &'static str {
        "unknown"
    }

    /// Appends the messages `messages` yields to `topic`, in order, stopping at the first error it
    /// yields (an event that failed to encode), which is returned.
    ///
    /// The buses' `publish_all` encodes through this, so a backend whose client queues records
    /// (Kafka) can send the first messages while the rest are still being encoded. The default
    /// collects every message first and then calls [`Publisher::publish`]: nothing is sent when
    /// the iterator yields an error. A backend that overrides it may have sent the messages
    /// before the error.
    async fn publish_iter(
        &self,
        topic: &str,
        messages: &mut (dyn Iterator<Item = Result<Message>> + Send),
    ) -> Result<()> {
        let all = messages.collect::<Result<Vec<_>>>()?;
        self.publish(topic, &all).await
    }
}

/// Opens consumers that read topics as members of a consumer group.
#[async_trait]
pub trait Subscriber: Send + Sync + 'static {
    /// Joins `subscription.group` (creating it, and the topics, when missing) as
    /// `subscription.consumer`.
    async fn subscribe(&self, subscription: &Subscription) -> Result<Box<dyn Consumer>>;

    /// The consumer groups on `topic` whose names start with `prefix`, and what each has not
    /// finished: delivered and not acked, and not yet delivered. Processors read it at start
    /// (once per topic, with their service's prefix) to warn about a group of their service
    /// that no handler reads any more but that still holds messages (a handler renamed, which
    /// starts a new group). The default knows none.
    async fn groups(&self, topic: &str, prefix: &str) -> Result<Vec<GroupBacklog>> {
        let _ = (topic, prefix);
        Ok(Vec::new())
    }

    /// Where `topic` lives, in words, for manifests: the broker, or the pool of brokers, with
    /// no secret in it (`redis pool "orders" at redis://cache:6379/0`). The default knows
    /// nothing.
    fn location(&self, topic: &str) -> Option<String> {
        let _ = topic;
        None
    }
}

/// One consumer group on a topic, as [`Subscriber::groups`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupBacklog {
    /// The group's name.
    pub group: String,
    /// Messages delivered to it and not acked.
    pub pending: u64,
    /// Messages not delivered to it yet (`None` where the broker cannot tell).
    pub lag: Option<u64>,
}

/// A publisher and a subscriber in one value; every backend is one.
pub trait Backend: Publisher + Subscriber {}

impl<T: Publisher + Subscriber> Backend for T {}

/// One member of a consumer group.
#[async_trait]
pub trait Consumer: Send + 'static {
    /// Waits until at least one delivery is available and returns up to `max` of them.
    ///
    /// Each message of a topic is delivered to one member of the group; a delivery stays pending,
    /// owned by this consumer, until it is acked. Dropping the returned future before it completes
    /// loses nothing: what was taken stays pending and is redelivered.
    async fn receive(&mut self, max: usize) -> Result<Vec<Delivery>>;

    /// Leaves the group cleanly; pending deliveries stay pending.
    async fn close(&mut self) -> Result<()> {
        Ok(())
    }
}

/// Settles deliveries with the broker. Backends implement it once per consumer.
#[async_trait]
pub trait Acknowledge: Send + Sync + 'static {
    /// Marks every delivery in `deliveries` as handled, in as few round trips as possible.
    async fn ack(&self, deliveries: &[Delivery]) -> Result<()>;

    /// Leaves `delivery` pending and has it delivered again no sooner than `redeliver_after`,
    /// with its attempt count raised.
    async fn nack(&self, delivery: &Delivery, redeliver_after: Duration) -> Result<()>;

    /// Whether `delivery` no longer belongs to this consumer (its Kafka partition was revoked in a
    /// rebalance): running its handler would only do work the partition's next owner does again.
    /// Processors drop stale deliveries that have not started. The default: never.
    fn is_stale(&self, delivery: &Delivery) -> bool {
        let _ = delivery;
        false
    }

    /// Whether the handler of `delivery`, not started yet, should wait: what it does could not
    /// be recorded now (Kafka: a connection to a broker was lost and no commit has succeeded
    /// since), and if the member loses its partitions meanwhile their next owner handles the
    /// message again. Processors ask before a handler starts and, while this holds, ask again
    /// every few milliseconds, until it does not or the delivery is stale (then it is dropped,
    /// not run); a group stopping meanwhile hands the delivery back. Asked before every handler
    /// call: it must be cheap. The default: never.
    fn must_wait(&self, delivery: &Delivery) -> bool {
        let _ = delivery;
        false
    }

    /// Called when `delivery` is dropped without being acked or nacked (an ack that failed for
    /// good, a handler stopped at the shutdown deadline): the backend stops counting it as in
    /// flight and delivers it again, as it would after a nack with no delay. It must not block.
    ///
    /// The default does nothing, for brokers that redeliver such entries on their own.
    fn release(&self, delivery: &Delivery) {
        let _ = delivery;
    }
}

/// A message handed to one consumer of a group, not yet acked.
pub struct Delivery {
    topic: Arc<str>,
    message: Arc<Message>,
    attempt: u32,
    /// Given by the backend, or made from `position` when first asked for.
    broker_id: EntryId,
    acker: Arc<dyn Acknowledge>,
    /// Boxed text, not a `String` (see [`EntryId`]: 8 bytes fewer a delivery).
    malformed: Option<Box<str>>,
    shard: Option<u32>,
    position: Option<LogPosition>,
    /// Acked or nacked: nothing to hand back when dropped.
    settled: bool,
}

/// Where an entry sits in a partitioned log: a Kafka partition and offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LogPosition {
    /// The partition.
    pub partition: i32,
    /// The offset in the partition.
    pub offset: i64,
}

impl LogPosition {
    /// The entry's id, `partition:offset`.
    pub fn id(&self) -> String {
        format!("{}:{}", self.partition, self.offset)
    }
}

/// An entry's id: given by the backend (a stream entry id), or made from the entry's position
/// (`partition:offset`) the first time it is asked for (empty when there is no position
/// either).
///
/// A given id is kept as it is, not in a [`OnceLock`]: setting one, and cloning a set one,
/// each went through its `Once` (~200 instructions), three times a message on Redis (the
/// delivery, its context, the handler's copy).
///
/// One or the other, not both: a delivery is moved several times a message, and at 144 bytes
/// each move was a call to `memcpy` (~30 instructions); at 128 it is a few moves in line.
#[derive(Debug, Clone)]
pub struct EntryId(Id);

#[derive(Debug, Clone)]
enum Id {
    Given(Arc<str>),
    Made(OnceLock<Arc<str>>),
}

impl Default for EntryId {
    fn default() -> Self {
        EntryId(Id::Made(OnceLock::new()))
    }
}

impl EntryId {
    /// An id the backend gives.
    #[inline]
    pub fn given(id: Arc<str>) -> Self {
        EntryId(Id::Given(id))
    }

    /// An id made from the entry's position when first asked for.
    #[inline]
    pub fn from_position() -> Self {
        EntryId::default()
    }

    /// The id: the given one, or the one made from `position`.
    #[inline]
    pub fn get(&self, position: Option<LogPosition>) -> &Arc<str> {
        match &self.0 {
            Id::Given(id) => id,
            Id::Made(made) => {
                made.get_or_init(|| position.map(|p| p.id()).unwrap_or_default().into())
            }
        }
    }
}

// Moved several times a message: up to 128 bytes a move is a few moves in line, past it a call
// to `memcpy` (see `EntryId`).
const _: () = assert!(std::mem::size_of::<Delivery>() <= 128);

/// A delivery dropped unsettled is handed back to its consumer ([`Acknowledge::release`]), so
/// it is delivered again rather than held as in flight for ever.
impl Drop for Delivery {
    fn drop(&mut self) {
        if !self.settled {
            self.acker.release(self);
        }
    }
}

impl Delivery {
    /// Made by backends: `broker_id` is the backend's own id of the entry (a stream entry id, a
    /// `partition:offset`), `attempt` counts deliveries starting at 1.
    #[inline]
    pub fn new(
        topic: Arc<str>,
        message: Message,
        attempt: u32,
        broker_id: impl Into<Arc<str>>,
        acker: Arc<dyn Acknowledge>,
    ) -> Self {
        Delivery::shared(topic, Arc::new(message), attempt, broker_id, acker)
    }

    /// Like [`Delivery::new`], with a message already shared (a backend redelivering a message
    /// it keeps).
    #[inline]
    pub fn shared(
        topic: Arc<str>,
        message: Arc<Message>,
        attempt: u32,
        broker_id: impl Into<Arc<str>>,
        acker: Arc<dyn Acknowledge>,
    ) -> Self {
        Delivery::with_id(
            topic,
            message,
            attempt,
            EntryId::given(broker_id.into()),
            acker,
        )
    }

    #[inline]
    fn with_id(
        topic: Arc<str>,
        message: Arc<Message>,
        attempt: u32,
        broker_id: EntryId,
        acker: Arc<dyn Acknowledge>,
    ) -> Self {
        Delivery {
            topic,
            message,
            attempt,
            broker_id,
            acker,
            malformed: None,
            shard: None,
            position: None,
            settled: false,
        }
    }

    /// Made by backends of partitioned logs: the entry at `position`, whose id
    /// ([`Delivery::broker_id`]) is `partition:offset`, made only if asked for (see
    /// [`Delivery::with_position`] for what the position is used for).
    #[inline]
    pub fn at(
        topic: Arc<str>,
        message: Arc<Message>,
        attempt: u32,
        position: LogPosition,
        acker: Arc<dyn Acknowledge>,
    ) -> Self {
        Delivery::with_id(topic, message, attempt, EntryId::from_position(), acker)
            .with_position(position)
    }

    /// Marks the delivery as an entry that could not be read as a message (see
    /// [`crate::wire::Layout::decode`]); processors dead-letter it with `reason` at once.
    #[inline]
    pub fn with_malformed(mut self, reason: impl Into<String>) -> Self {
        self.malformed = Some(reason.into().into_boxed_str());
        self
    }

    /// Tells processors which broker-side shard (a Kafka partition) the entry came from, so that
    /// entries without a key keep their shard's order when handled concurrently.
    #[inline]
    pub fn with_shard(mut self, shard: u32) -> Self {
        self.shard = Some(shard);
        self
    }

    /// Tells processors where the entry sits in a partitioned log (Kafka): its partition, which
    /// is also its shard ([`Delivery::with_shard`]), and its offset, for spans and for the
    /// backend's own acks (no id string parsed back).
    #[inline]
    pub fn with_position(mut self, position: LogPosition) -> Self {
        self.shard = Some(position.partition.unsigned_abs());
        self.position = Some(position);
        self
    }

    /// Where the entry sits in a partitioned log, if the backend has one.
    #[inline]
    pub fn position(&self) -> Option<LogPosition> {
        self.position
    }

    /// The broker-side shard, if the backend has them.
    #[inline]
    pub fn shard(&self) -> Option<u32> {
        self.shard
    }

    /// Why the entry could not be read as a message, if it could not.
    #[inline]
    pub fn malformed(&self) -> Option<&str> {
        self.malformed.as_deref()
    }

    /// The topic the message was read from.
    #[inline]
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The topic, shared.
    #[inline]
    pub fn topic_arc(&self) -> &Arc<str> {
        &self.topic
    }

    /// The message.
    #[inline]
    pub fn message(&self) -> &Message {
        &self.message
    }

    /// The message, shared.
    #[inline]
    pub fn message_arc(&self) -> &Arc<Message> {
        &self.message
    }

    /// How many times this message has been delivered to the group, starting at 1.
    #[inline]
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Whether the delivery no longer belongs to its consumer (see [`Acknowledge::is_stale`]).
    #[inline]
    pub fn is_stale(&self) -> bool {
        self.acker.is_stale(self)
    }

    /// Whether its handler should wait before it starts (see [`Acknowledge::must_wait`]).
    #[inline]
    pub fn must_wait(&self) -> bool {
        self.acker.must_wait(self)
    }

    /// The backend's id of this entry.
    #[inline]
    pub fn broker_id(&self) -> &str {
        self.broker_id_arc()
    }

    /// The backend's id of this entry, shared.
    #[inline]
    pub fn broker_id_arc(&self) -> &Arc<str> {
        self.broker_id.get(self.position)
    }

    /// The backend's id of this entry, given or made already or not, and its position: what a
    /// copy of its id needs, without making one (see [`EntryId`]).
    #[inline]
    pub fn broker_id_cell(&self) -> (EntryId, Option<LogPosition>) {
        (self.broker_id.clone(), self.position)
    }

    /// Marks the message as handled. On failure the delivery is handed back with the error.
    pub async fn ack(mut self) -> std::result::Result<(), (crate::Error, Self)> {
        let acker = self.acker.clone();
        match acker.ack(std::slice::from_ref(&self)).await {
            Ok(()) => {
                self.settled = true;
                Ok(())
            }
            Err(e) => Err((e, self)),
        }
    }

    /// Leaves the message pending for redelivery after `redeliver_after`. On failure the delivery
    /// is handed back with the error.
    pub async fn nack(
        mut self,
        redeliver_after: Duration,
    ) -> std::result::Result<(), (crate::Error, Self)> {
        let acker = self.acker.clone();
        match acker.nack(&self, redeliver_after).await {
            Ok(()) => {
                self.settled = true;
                Ok(())
            }
            Err(e) => Err((e, self)),
        }
    }

    /// Acks many deliveries, one call per consumer they came from. On failure the deliveries of
    /// the failed call and of the calls not made are handed back.
    pub async fn ack_all(
        mut deliveries: Vec<Delivery>,
    ) -> std::result::Result<(), (crate::Error, Vec<Delivery>)> {
        while !deliveries.is_empty() {
            let acker = deliveries[0].acker.clone();
            let split = deliveries
                .iter()
                .position(|d| !Arc::ptr_eq(&d.acker, &acker))
                .unwrap_or(deliveries.len());
            let rest = deliveries.split_off(split);
            if let Err(e) = acker.ack(&deliveries).await {
                deliveries.extend(rest);
                return Err((e, deliveries));
            }
            for d in &mut deliveries {
                d.settled = true;
            }
            deliveries = rest;
        }
        Ok(())
    }
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("topic", &self.topic)
            .field("broker_id", &self.broker_id())
            .field("attempt", &self.attempt)
            .field("message", &self.message)
            .finish_non_exhaustive()
    }
}

/// Where a new consumer group starts reading.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum StartFrom {
    /// Every message still held (Kafka `earliest`, Redis `0`). The default.
    #[default]
    Beginning,
    /// Only messages published after the group was created (Kafka `latest`, Redis `$`).
    Latest,
}

/// How long a member may hold a delivery without acking before others claim it, by default.
pub const DEFAULT_CLAIM_IDLE: Duration = Duration::from_secs(30);

/// What a consumer joins: a group, on some topics, under a consumer name.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Subscription {
    /// The consumer group.
    pub group: String,
    /// This member's name, unique within the group. Reusing a name after a restart resumes that
    /// member's pending deliveries.
    pub consumer: String,
    /// The topics read.
    pub topics: Vec<String>,
    /// Where the group starts when it is created; ignored when it exists.
    pub start: StartFrom,
    /// Take over pending deliveries other members have held this long without acking (members
    /// that died). `None` never claims.
    pub claim_idle: Option<Duration>,
    /// Where the group's processor publishes what fails for good; a backend checks at
    /// subscription that it can publish there.
    pub dead_letter: Option<String>,
}

impl Subscription {
    /// A subscription of `group` to `topics` under a fresh, unique consumer name.
    pub fn new<T: Into<String>>(
        group: impl Into<String>,
        topics: impl IntoIterator<Item = T>,
    ) -> Self {
        Subscription {
            group: group.into(),
            consumer: unique_consumer_name(),
            topics: topics.into_iter().map(Into::into).collect(),
            start: StartFrom::Beginning,
            claim_idle: Some(DEFAULT_CLAIM_IDLE),
            dead_letter: None,
        }
    }

    /// Checks what every backend needs of a subscription before it subscribes: at least one
    /// topic. A backend calls it first in [`Subscriber::subscribe`].
    pub fn check(&self) -> Result<()> {
        if self.topics.is_empty() {
            return Err(Error::Config(format!(
                "group `{}` subscribes to no topic",
                self.group
            )));
        }
        Ok(())
    }

    /// Sets the consumer name.
    pub fn consumer(mut self, name: impl Into<String>) -> Self {
        self.consumer = name.into();
        self
    }

    /// Sets where a new group starts.
    pub fn start(mut self, start: StartFrom) -> Self {
        self.start = start;
        self
    }

    /// Sets the idle time after which other members' pending deliveries are claimed.
    pub fn claim_idle(mut self, idle: Option<Duration>) -> Self {
        self.claim_idle = idle;
        self
    }

    /// Names the group's dead-letter topic.
    pub fn dead_letter(mut self, topic: impl Into<String>) -> Self {
        self.dead_letter = Some(topic.into());
        self
    }
}

/// A consumer name unique to this process and call: `c-<pid>-<random>`.
pub fn unique_consumer_name() -> String {
    let id = uuid::Uuid::now_v7().simple().to_string();
    format!("c-{}-{}", std::process::id(), &id[id.len() - 10..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_id_is_the_given_one_or_made_once_from_the_position() {
        let given = EntryId::given("1700000000000-3".into());
        let at = Some(LogPosition {
            partition: 2,
            offset: 41,
        });
        assert_eq!(&**given.get(at), "1700000000000-3", "a given id wins");
        assert_eq!(&**given.clone().get(None), "1700000000000-3");
        let lazy = EntryId::from_position();
        let copy = lazy.clone();
        let made = lazy.get(at).clone();
        assert_eq!(&*made, "2:41");
        // Made once: asked again (with another position), the same id.
        assert!(Arc::ptr_eq(lazy.get(None), &made));
        // A copy taken after it was made keeps it; one taken before makes its own.
        assert!(Arc::ptr_eq(lazy.clone().get(None), &made));
        assert_eq!(&**copy.get(at), "2:41");
        assert_eq!(&**EntryId::from_position().get(None), "");
    }
}
