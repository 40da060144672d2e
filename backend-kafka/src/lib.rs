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
//! use backend_kafka::{KafkaBackend, KafkaConfig};
//!
//! // Through the `cqrs` crate (feature `kafka`) this is `cqrs::kafka`: `EventBus::new` and
//! // `EventProcessor::new` take the backend as they take any other.
//! let backend = KafkaBackend::connect(KafkaConfig::new("127.0.0.1:9092").partitions(4)).await?;
//! # Ok(()) }
//! ```

mod commit_gate;
mod consumer;
mod dead_letters;
mod error;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use cqrs_core::backend::{Consumer, Publisher, Subscriber, Subscription};
use cqrs_core::wire::Layout;
use cqrs_core::Message;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};

pub use cqrs_core::dead_letter::{DeadLetter, DeadLetterStore, REDRIVEN_FROM};
pub use dead_letters::bookkeeping_group;
pub use error::{Error, Result};
/// The `rdkafka` client crate this backend is built on, for raw clients beside it (admin tools,
/// tests, librdkafka's mock cluster), at the version the backend uses.
pub use rdkafka;

/// Connection and behaviour settings.
#[derive(Clone)]
pub struct KafkaConfig {
    brokers: String,
    settings: BTreeMap<String, String>,
    create_topics: bool,
    /// `None`: the broker's `num.partitions`.
    partitions: Option<i32>,
    /// `None`: the broker's `default.replication.factor`.
    replication: Option<i32>,
    fetch_wait: Duration,
    commit_interval: Duration,
    commit_every: usize,
    max_unrecorded: usize,
    timeout: Duration,
    publish_timeout: Duration,
    protocol: GroupProtocol,
    instance_id: Option<String>,
}

/// How a consumer group shares out partitions when members join or leave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum GroupProtocol {
    /// The classic protocol with an eager assignor (`range,roundrobin`): every rebalance takes
    /// every partition from every member and hands them out again.
    Eager,
    /// The classic protocol with the `cooperative-sticky` assignor (KIP-429): a rebalance moves
    /// only the partitions that change owner; the others are never stopped.
    Cooperative,
    /// KIP-848's consumer protocol (`group.protocol=consumer`; Kafka 4.0+, where brokers enable
    /// it by default): the broker assigns partitions incrementally, one member at a time, and
    /// members heartbeat to it; session and heartbeat times are the broker's
    /// `group.consumer.*` settings. The default: in the soak it held events up least and handled
    /// fewest twice when members die (`docs/reliability.md`). A broker without it (before 4.0)
    /// needs [`GroupProtocol::Cooperative`] or [`GroupProtocol::Eager`].
    #[default]
    Consumer,
}

/// Settings the backend's guarantees rest on: [`KafkaConfig::set`] may not change them.
const RESERVED: [&str; 3] = ["group.id", "enable.auto.commit", "enable.auto.offset.store"];

impl KafkaConfig {
    /// Settings for the cluster at `brokers` (`host:port[,host:port...]`).
    pub fn new(brokers: impl Into<String>) -> Self {
        KafkaConfig {
            brokers: brokers.into(),
            settings: BTreeMap::new(),
            create_topics: true,
            partitions: None,
            replication: None,
            fetch_wait: Duration::from_millis(100),
            commit_interval: Duration::from_millis(100),
            commit_every: 250,
            max_unrecorded: 4000,
            timeout: Duration::from_secs(10),
            publish_timeout: Duration::from_secs(30),
            protocol: GroupProtocol::default(),
            instance_id: None,
        }
    }

    /// Passes a librdkafka setting to producers and consumers (`security.protocol`, `sasl.*`,
    /// `enable.idempotence`, `linger.ms`, ...). Later settings win. `group.id`,
    /// `enable.auto.commit` and `enable.auto.offset.store` are the backend's own (a processor
    /// names its groups, and offsets are stored only for handled messages): `connect` refuses
    /// them with [`Error::Reserved`].
    pub fn set(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.settings.insert(key.into(), value.into());
        self
    }

    /// The consumer group protocol (default [`GroupProtocol::Consumer`]; see
    /// `docs/reliability.md` for what each costs when a member dies). Settings given through
    /// [`KafkaConfig::set`] (`group.protocol`, `partition.assignment.strategy`) win.
    pub fn group_protocol(mut self, protocol: GroupProtocol) -> Self {
        self.protocol = protocol;
        self
    }

    /// Static membership (KIP-345): each consumer joins as `group.instance.id = {id}.{group}`.
    /// A member that restarts under the same id within the session timeout gets its partitions
    /// back without a rebalance. `id` must be unique per process (a pod name, a host name) and
    /// stable across its restarts.
    pub fn instance_id(mut self, id: impl Into<String>) -> Self {
        self.instance_id = Some(id.into());
        self
    }

    /// Whether missing topics are created (default: yes).
    pub fn create_topics(mut self, create: bool) -> Self {
        self.create_topics = create;
        self
    }

    /// Partitions of topics this backend creates (default: the broker's `num.partitions`).
    pub fn partitions(mut self, partitions: i32) -> Self {
        self.partitions = Some(partitions.max(1));
        self
    }

    /// Replication factor of topics this backend creates (default: the broker's
    /// `default.replication.factor`).
    pub fn replication(mut self, replication: i32) -> Self {
        self.replication = Some(replication.max(1));
        self
    }

    /// How long the broker may hold a fetch waiting for data (`fetch.wait.max.ms`, default
    /// 100 ms).
    pub fn fetch_wait(mut self, wait: Duration) -> Self {
        self.fetch_wait = wait;
        self
    }

    /// How often stored offsets are committed (`auto.commit.interval.ms`, default 100 ms). What
    /// a member handled after its last commit is handled again by its partitions' next owner
    /// if it dies: this bounds that by time (a commit is one small request to the group's
    /// coordinator).
    pub fn commit_interval(mut self, every: Duration) -> Self {
        self.commit_interval = every;
        self
    }

    /// Also commit, without waiting, once a consumer has handled this many messages since its
    /// last commit (default 250; 0: on the interval only). A member that dies, or whose
    /// commit is refused while its group rebalances, leaves what it handled since its last
    /// commit to be handled again: this bounds that by a count, where the interval alone lets
    /// it grow with the rate (a member catching up on a backlog handles thousands a second).
    pub fn commit_every(mut self, messages: usize) -> Self {
        self.commit_every = messages;
        self
    }

    /// How many handled messages a consumer may have that its group has not recorded (a commit
    /// succeeded after them) before it hands out no more and waits for a commit (default 4,000;
    /// 0: no limit). A broker refuses commits while the group rebalances (librdkafka's mock
    /// cluster for the whole rebalance; Kafka only once the members have rejoined) and cannot
    /// take them while its coordinator is away: without a limit the member keeps working, and
    /// its partitions' next owner does all that work again.
    pub fn max_unrecorded(mut self, messages: usize) -> Self {
        self.max_unrecorded = messages;
        self
    }

    /// Timeout of admin and metadata calls (default 10 s): creating a topic that gets no
    /// answer in that time fails, naming the topic.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How long a published message may wait for the broker's acknowledgement, retries
    /// included (`message.timeout.ms`, default 30 s): past it, `publish` fails naming the topic
    /// (a topic that does not exist and cannot be created, a partition without a leader).
    pub fn publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout;
        self
    }

    /// The bootstrap servers.
    pub fn brokers(&self) -> &str {
        &self.brokers
    }

    fn client(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        c
    }

    fn apply(&self, c: &mut ClientConfig) {
        for (k, v) in &self.settings {
            c.set(k, v);
        }
    }

    fn producer_config(&self) -> ClientConfig {
        let mut c = self.client();
        c.set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .set(
                "message.timeout.ms",
                self.publish_timeout.as_millis().max(1).to_string(),
            );
        self.apply(&mut c);
        c
    }

    fn admin_config(&self) -> ClientConfig {
        let mut c = self.client();
        self.apply(&mut c);
        // Settings only producers or consumers take would make the admin client complain.
        for key in ["enable.idempotence", "linger.ms", "message.timeout.ms"] {
            c.remove(key);
        }
        c
    }

    pub(crate) fn consumer_config(&self, subscription: &Subscription) -> ClientConfig {
        let mut c = self.client();
        let reset = match subscription.start {
            cqrs_core::StartFrom::Latest => "latest",
            _ => "earliest",
        };
        match self.protocol {
            GroupProtocol::Eager => {
                c.set("partition.assignment.strategy", "range,roundrobin");
            }
            GroupProtocol::Cooperative => {
                c.set("partition.assignment.strategy", "cooperative-sticky");
            }
            GroupProtocol::Consumer => {
                c.set("group.protocol", "consumer");
            }
        }
        if let Some(id) = &self.instance_id {
            c.set("group.instance.id", format!("{id}.{}", subscription.group));
        }
        c.set("group.id", &subscription.group)
            .set("client.id", &subscription.consumer)
            .set("enable.auto.commit", "true")
            .set("enable.auto.offset.store", "false")
            .set(
                "auto.commit.interval.ms",
                self.commit_interval.as_millis().to_string(),
            )
            .set("auto.offset.reset", reset)
            .set("fetch.wait.max.ms", self.fetch_wait.as_millis().to_string())
            // librdkafka stops fetching a partition for `fetch.queue.backoff.ms` (1 s by
            // default) once its queue of records fetched ahead passes `queued.min.messages` or
            // `queued.max.messages.kbytes`: a consumer that takes records as fast as they come
            // then sits idle with an empty queue (measured: ~0.8 s stalls, consuming at 110k/s
            // instead of 245k/s). Ask again soon, and hold less ahead (16 MiB, not 64 MiB:
            // every handler has a consumer of its own).
            .set("fetch.queue.backoff.ms", "10")
            .set("queued.max.messages.kbytes", "16384")
            .set("enable.partition.eof", "false");
        self.apply(&mut c);
        for key in ["enable.idempotence", "linger.ms", "message.timeout.ms"] {
            c.remove(key);
        }
        // The consumer protocol takes no client-side assignor or session settings.
        if c.get("group.protocol")
            .is_some_and(|p| p.eq_ignore_ascii_case("consumer"))
        {
            for key in [
                "partition.assignment.strategy",
                "session.timeout.ms",
                "heartbeat.interval.ms",
            ] {
                c.remove(key);
            }
        }
        c
    }

    /// Refuses settings the backend's guarantees rest on.
    fn check(&self) -> Result<()> {
        match RESERVED.iter().find(|k| self.settings.contains_key(**k)) {
            Some(key) => Err(Error::Reserved((*key).to_owned())),
            None => Ok(()),
        }
    }
}

/// Setting names whose values never print.
fn is_secret(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    [
        "password",
        "secret",
        "token",
        "sasl.jaas",
        "ssl.key.pem",
        "private",
    ]
    .iter()
    .any(|s| k.contains(s))
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let settings: BTreeMap<&str, &str> = self
            .settings
            .iter()
            .map(|(k, v)| (k.as_str(), if is_secret(k) { "***" } else { v.as_str() }))
            .collect();
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("settings", &settings)
            .field("create_topics", &self.create_topics)
            .field("partitions", &self.partitions)
            .field("replication", &self.replication)
            .field("protocol", &self.protocol)
            .field("instance_id", &self.instance_id)
            .finish_non_exhaustive()
    }
}

/// The Kafka backend: a producer, an admin client and the settings for consumers. Clones share
/// them.
#[derive(Clone)]
pub struct KafkaBackend {
    inner: Arc<Inner>,
}

struct Inner {
    config: KafkaConfig,
    producer: FutureProducer,
    admin: AdminClient<DefaultClientContext>,
    known_topics: Mutex<HashSet<String>>,
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
        let producer: FutureProducer = config
            .producer_config()
            .create()
            .map_err(|e| Error::kafka("creating the producer", e))?;
        let admin: AdminClient<DefaultClientContext> = config
            .admin_config()
            .create()
            .map_err(|e| Error::kafka("creating the admin client", e))?;
        let backend = KafkaBackend {
            inner: Arc::new(Inner {
                config,
                producer,
                admin,
                known_topics: Mutex::new(HashSet::new()),
            }),
        };
        backend.topics_on_broker().await.map_err(|e| match e {
            Error::Kafka { source, .. } => Error::Unreachable {
                brokers: backend.inner.config.brokers.clone(),
                source,
            },
            other => other,
        })?;
        Ok(backend)
    }

    /// The settings.
    pub fn config(&self) -> &KafkaConfig {
        &self.inner.config
    }

    /// The topics the cluster has.
    pub async fn topics_on_broker(&self) -> Result<Vec<String>> {
        let producer = self.inner.producer.clone();
        let timeout = self.inner.config.timeout;
        tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(None, timeout)
                .map(|m| m.topics().iter().map(|t| t.name().to_owned()).collect())
        })
        .await
        .map_err(|_| Error::kafka("fetching metadata", rdkafka::error::KafkaError::Canceled))?
        .map_err(|e| Error::kafka("fetching metadata", e))
    }

    /// Makes sure `topics` exist: creates the missing ones, or fails naming the first missing
    /// one when creation is off.
    pub async fn ensure_topics<T: AsRef<str>>(&self, topics: &[T]) -> Result<()> {
        let missing: Vec<&str> = {
            let known = self
                .inner
                .known_topics
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            topics
                .iter()
                .map(AsRef::as_ref)
                .filter(|t| !known.contains(*t))
                .collect()
        };
        if missing.is_empty() {
            return Ok(());
        }
        let existing: HashSet<String> = self.topics_on_broker().await?.into_iter().collect();
        let to_create: Vec<&str> = missing
            .iter()
            .copied()
            .filter(|t| !existing.contains(*t))
            .collect();
        if !to_create.is_empty() {
            if !self.inner.config.create_topics {
                return Err(Error::MissingTopic(to_create[0].to_owned()));
            }
            let config = &self.inner.config;
            let new: Vec<NewTopic<'_>> = to_create
                .iter()
                .map(|t| {
                    NewTopic::new(
                        t,
                        // -1: the broker's default (CreateTopics v4, KIP-464).
                        config.partitions.unwrap_or(-1),
                        TopicReplication::Fixed(config.replication.unwrap_or(-1)),
                    )
                })
                .collect();
            let opts = AdminOptions::new()
                .operation_timeout(Some(config.timeout))
                .request_timeout(Some(config.timeout));
            // A broker without CreateTopics may leave the request unanswered.
            let results = tokio::time::timeout(
                config.timeout + Duration::from_secs(1),
                self.inner.admin.create_topics(&new, &opts),
            )
            .await
            .map_err(|_| {
                Error::kafka(
                    format!(
                        "creating topics {to_create:?} (no answer in {:?})",
                        config.timeout
                    ),
                    rdkafka::error::KafkaError::AdminOp(RDKafkaErrorCode::OperationTimedOut),
                )
            })?
            .map_err(|e| Error::kafka(format!("creating topics {to_create:?}"), e))?;
            for r in results {
                match r {
                    Ok(_) => {}
                    Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                    Err((topic, code)) => {
                        return Err(Error::kafka(
                            format!("creating topic `{topic}`"),
                            rdkafka::error::KafkaError::AdminOp(code),
                        ))
                    }
                }
            }
            tracing::debug!(topics = ?to_create, "created topics");
        }
        self.inner
            .known_topics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(missing.iter().map(|t| (*t).to_owned()));
        Ok(())
    }
}

/// The headers of `message` per the wire format.
pub(crate) fn headers(message: &Message) -> OwnedHeaders {
    let mut headers = Some(OwnedHeaders::new_with_capacity(
        4 + message.metadata.headers.len(),
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
    /// Hands `m` to the producer's queue; a full queue waits for deliveries to make room.
    async fn queue(&self, topic: &str, m: &Message) -> cqrs_core::Result<DeliveryFuture> {
        let mut record = FutureRecord::to(topic)
            .payload(&m.payload)
            .headers(headers(m))
            .timestamp(i64::try_from(m.metadata.created_at).unwrap_or(i64::MAX));
        if let Some(key) = &m.key {
            record = record.key(key.as_str());
        }
        loop {
            match self.inner.producer.send_result(record) {
                Ok(delivery) => return Ok(delivery),
                Err((e, back)) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) => {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => return Err(Error::kafka(format!("producing to {topic}"), e).into()),
            }
        }
    }

    /// Waits until the broker acknowledged every queued record.
    async fn delivered(topic: &str, pending: Vec<DeliveryFuture>) -> cqrs_core::Result<()> {
        for delivery in pending {
            match delivery.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => {
                    return Err(Error::kafka(format!("producing to {topic}"), e).into())
                }
                Err(_) => {
                    return Err(Error::kafka(
                        format!("producing to {topic}"),
                        rdkafka::error::KafkaError::Canceled,
                    )
                    .into())
                }
            }
        }
        Ok(())
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

    /// Queues each message as soon as it comes: librdkafka's `linger.ms` clock of a partition
    /// starts with its first record, so encoding the rest overlaps the wait instead of preceding
    /// it. An error from `messages` stops the queueing and is returned once the records already
    /// queued are delivered (they are sent).
    async fn publish_iter(
        &self,
        topic: &str,
        messages: &mut (dyn Iterator<Item = cqrs_core::Result<Message>> + Send),
    ) -> cqrs_core::Result<()> {
        self.send_all(topic, messages).await
    }
}

impl KafkaBackend {
    /// For each of `topics`, the consumer groups named with `prefix` that have committed offsets
    /// on it, with their lag ([`Subscriber::groups`] for many topics at once: the groups are
    /// listed and each one's offsets fetched once for all of them). A topic whose partitions
    /// cannot be read (being created or deleted) gets its own error; the others are answered.
    pub async fn backlogs(
        &self,
        topics: Vec<String>,
        prefix: &str,
    ) -> Result<Vec<(String, Result<Vec<cqrs_core::backend::GroupBacklog>>)>> {
        let config = self.inner.config.clone();
        let prefix = prefix.to_owned();
        tokio::task::spawn_blocking(move || group_backlogs(&config, topics, &prefix))
            .await
            .map_err(|_| {
                Error::kafka(
                    "listing consumer groups",
                    rdkafka::error::KafkaError::Canceled,
                )
            })?
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
        self.ensure_topics(&[topic]).await?;
        let mut pending = Vec::with_capacity(messages.size_hint().0);
        let mut failed = None;
        for m in messages {
            match m {
                Ok(m) => pending.push(self.queue(topic, m.borrow()).await?),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        Self::delivered(topic, pending).await?;
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
        // The dead-letter topic too: a message out of attempts must have somewhere to go.
        let mut topics = subscription.topics.clone();
        topics.extend(subscription.dead_letter.iter().cloned());
        self.ensure_topics(&topics).await?;
        let consumer = consumer::KafkaConsumer::start(&self.inner.config, subscription).await?;
        Ok(Box::new(consumer))
    }
}

/// Drops a short-lived client on a thread of its own: librdkafka takes about 100 ms to destroy
/// a client with a group id (measured), which the caller need not wait for (a processor's start
/// read the groups of its service one client each, so it waited that long per group).
fn drop_in_background<T: Send + 'static>(client: T) {
    // If no thread can be started, the client is dropped here (the closure is).
    let _ = std::thread::Builder::new()
        .name("cqrs-kafka-drop".into())
        .spawn(move || drop(client));
}

/// Per topic, the groups named with `prefix` that have committed offsets on it, with their lag:
/// one probe client, one ListGroups, per topic its partitions and watermarks, per group one
/// OffsetFetch for every topic.
#[allow(clippy::type_complexity)]
fn group_backlogs(
    config: &KafkaConfig,
    topics: Vec<String>,
    prefix: &str,
) -> Result<Vec<(String, Result<Vec<cqrs_core::backend::GroupBacklog>, Error>)>, Error> {
    use rdkafka::consumer::{BaseConsumer, Consumer as _};
    use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
    let timeout = config.timeout;
    let client = |group: &str| -> Result<BaseConsumer, Error> {
        let mut c = config.admin_config();
        c.set("group.id", group).set("enable.auto.commit", "false");
        c.create()
            .map_err(|e| Error::kafka("creating a client to read consumer groups", e))
    };
    let probe = client(&format!("{prefix}cqrs-groups-probe"))?;
    // Per topic: (partition, low, high) of each partition, or why they cannot be read.
    let ends = |topic: &str| -> Result<Vec<(i32, i64, i64)>, Error> {
        let context = |what: &str| format!("{what} for the groups of {topic}");
        let metadata = probe
            .fetch_metadata(Some(topic), timeout)
            .map_err(|e| Error::kafka(context("reading metadata"), e))?;
        let mut ends = Vec::new();
        for p in metadata.topics().iter().flat_map(|t| t.partitions()) {
            let (low, high) = probe
                .fetch_watermarks(topic, p.id(), timeout)
                .map_err(|e| Error::kafka(context("reading watermarks"), e))?;
            ends.push((p.id(), low, high));
        }
        Ok(ends)
    };
    let mut out: Vec<(String, Result<Vec<_>, Error>, Vec<(i32, i64, i64)>)> = topics
        .into_iter()
        .map(|t| match ends(&t) {
            Ok(e) => (t, Ok(Vec::new()), e),
            Err(err) => (t, Err(err), Vec::new()),
        })
        .collect();
    // After the metadata above: librdkafka's ListGroups on a client that has none yet waits
    // for a broker state change first (1-2 s, measured), not for the metadata itself.
    let listed = probe
        .fetch_group_list(None, timeout)
        .map_err(|e| Error::kafka("listing consumer groups", e))?;
    let mut tpl = TopicPartitionList::new();
    for (topic, _, ends) in &out {
        for &(p, _, _) in ends {
            tpl.add_partition(topic, p);
        }
    }
    for g in listed.groups() {
        // A group that only commits offsets (no member ever joined it) has no protocol type.
        let consumer_group = matches!(g.protocol_type(), "consumer" | "");
        if tpl.count() == 0 || !g.name().starts_with(prefix) || !consumer_group {
            continue;
        }
        let reader = client(g.name())?;
        let committed = reader.committed_offsets(tpl.clone(), timeout);
        drop_in_background(reader);
        let committed = committed.map_err(|e| {
            Error::kafka(format!("reading the committed offsets of {}", g.name()), e)
        })?;
        for (topic, backlog, ends) in &mut out {
            let Ok(backlog) = backlog else { continue };
            let mut reads_topic = false;
            let mut lag = 0;
            for &(p, low, high) in ends.iter() {
                let at = match committed.find_partition(topic, p).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => {
                        reads_topic = true;
                        o
                    }
                    _ => low,
                };
                lag += (high - at).max(0) as u64;
            }
            if reads_topic {
                backlog.push(cqrs_core::backend::GroupBacklog {
                    group: g.name().to_owned(),
                    pending: 0,
                    lag: Some(lag),
                });
            }
        }
    }
    drop_in_background(probe);
    Ok(out
        .into_iter()
        .map(|(topic, backlog, _)| {
            let backlog = backlog.map(|mut b| {
                b.sort_by(|x, y| x.group.cmp(&y.group));
                b
            });
            (topic, backlog)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_secrets() {
        let c = KafkaConfig::new("b:9092")
            .set("sasl.username", "svc")
            .set("sasl.password", "hunter2")
            .set("ssl.key.password", "also-secret");
        let text = format!("{c:?}");
        assert!(
            !text.contains("hunter2") && !text.contains("also-secret"),
            "{text}"
        );
        assert!(text.contains("\"sasl.username\": \"svc\""), "{text}");
    }

    #[test]
    fn consumer_settings_follow_the_subscription() {
        let sub = Subscription::new("svc.h", ["t"]).start(cqrs_core::StartFrom::Latest);
        let c = KafkaConfig::new("b:9092")
            .set("fetch.min.bytes", "1")
            .consumer_config(&sub);
        assert_eq!(c.get("group.id"), Some("svc.h"));
        assert_eq!(c.get("auto.offset.reset"), Some("latest"));
        assert_eq!(c.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(c.get("fetch.min.bytes"), Some("1"));
        assert_eq!(c.get("enable.idempotence"), None);
    }
}
