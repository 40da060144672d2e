//! Topics (created on first use) and the consumer groups of a service with their backlog.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminOptions, NewTopic, TopicReplication};
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::Producer;

use crate::error::{Error, Result};
use crate::{lock, Inner, KafkaBackend, KafkaConfig};

impl KafkaBackend {
    /// The topics the cluster has.
    pub async fn topics_on_broker(&self) -> Result<Vec<String>> {
        self.metadata_topics(self.inner.config.timeout).await
    }

    /// The topics the cluster has, asked with `timeout`.
    pub(crate) async fn metadata_topics(&self, timeout: Duration) -> Result<Vec<String>> {
        let producer = self.inner.producer.clone();
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

    /// Whether this backend has made or seen `topic` already ([`KafkaBackend::ensure_topics`]
    /// has nothing to do for it).
    pub(crate) fn topic_known(&self, topic: &str) -> bool {
        lock(&self.inner.known_topics).contains(topic)
    }

    /// Makes sure `topics` exist: creates the missing ones, or fails naming the first missing
    /// one when creation is off.
    pub async fn ensure_topics<T: AsRef<str>>(&self, topics: &[T]) -> Result<()> {
        let missing: Vec<&str> = {
            let known = lock(&self.inner.known_topics);
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
        self.await_leaders(&missing).await;
        lock(&self.inner.known_topics).extend(missing.iter().map(|t| (*t).to_owned()));
        Ok(())
    }

    /// Waits (up to the configured timeout) until every partition of `topics` has a leader that
    /// answers for it. A topic just made (here, or by another task or process) takes a moment to
    /// get there; records sent before are refused and retried, and that retry can lose one: seen
    /// here, 2 records of 200 acknowledged and never written when 8 tasks published to a new
    /// topic. The idempotent producer's first request for a partition failed unpersisted, its
    /// next was accepted (the broker takes any first sequence from a producer it does not know),
    /// and librdkafka then counted the first as persisted.
    async fn await_leaders(&self, topics: &[&str]) {
        let producer = self.inner.producer.clone();
        let topics: Vec<String> = topics.iter().map(|t| (*t).to_owned()).collect();
        let timeout = self.inner.config.timeout;
        let waited = tokio::task::spawn_blocking(move || {
            let client = producer.client();
            let deadline = std::time::Instant::now() + timeout;
            let pause = || std::thread::sleep(Duration::from_millis(20));
            for topic in &topics {
                // Its partition count, from a broker that knows the topic.
                let partitions = loop {
                    let known = client
                        .fetch_metadata(Some(topic), timeout)
                        .ok()
                        .and_then(|m| {
                            let t = m.topics().first()?;
                            (t.error().is_none() && !t.partitions().is_empty())
                                .then(|| t.partitions().len())
                        });
                    match known {
                        Some(n) => break n,
                        None if std::time::Instant::now() >= deadline => return Err(topic.clone()),
                        None => pause(),
                    }
                };
                // Each partition's leader answers for it (ListOffsets) once it leads it.
                for partition in 0..i32::try_from(partitions).unwrap_or(i32::MAX) {
                    while client.fetch_watermarks(topic, partition, timeout).is_err() {
                        if std::time::Instant::now() >= deadline {
                            return Err(format!("{topic}/{partition}"));
                        }
                        pause();
                    }
                }
            }
            Ok(())
        })
        .await;
        if let Ok(Err(what)) = waited {
            tracing::warn!(%what, ?timeout, "a new topic's partition has no leader yet; publishing anyway");
        }
    }
}

impl KafkaBackend {
    /// For each of `topics`, the consumer groups named with `prefix` that have committed offsets
    /// on it, with their lag ([`Subscriber::groups`](cqrs_core::backend::Subscriber::groups) for many topics at once: the groups are
    /// listed and each one's offsets fetched once for all of them). A topic whose partitions
    /// cannot be read (being created or deleted) gets its own error; the others are answered.
    pub async fn backlogs(
        &self,
        topics: Vec<String>,
        prefix: &str,
    ) -> Result<Vec<(String, Result<Vec<cqrs_core::backend::GroupBacklog>>)>> {
        let inner = self.inner.clone();
        let prefix = prefix.to_owned();
        tokio::task::spawn_blocking(move || group_backlogs(&inner, topics, &prefix))
            .await
            .map_err(|_| {
                Error::kafka(
                    "listing consumer groups",
                    rdkafka::error::KafkaError::Canceled,
                )
            })?
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

/// Clients that read one consumer group's committed offsets, kept between calls. OffsetFetch is
/// asked as the group (a client with its `group.id` that never joins it), and a metrics sampler
/// asks every 5 s for each group: a client made each time (its connections, its metadata, ~100 ms
/// to destroy) cost what `docs/benchmarks.md` shows with 50 groups. At most [`KEEP_READERS`] are
/// kept, and one unused for [`READER_IDLE`] goes.
#[derive(Default)]
pub(crate) struct OffsetReaders {
    clients: Mutex<HashMap<String, (Arc<BaseConsumer>, Instant)>>,
}

/// The most offset readers a backend keeps.
const KEEP_READERS: usize = 256;

/// How long an offset reader is kept unused.
const READER_IDLE: Duration = Duration::from_secs(600);

impl OffsetReaders {
    /// The reader of `group`, made if there is none.
    fn get(&self, config: &KafkaConfig, group: &str) -> Result<Arc<BaseConsumer>, Error> {
        let now = Instant::now();
        let mut clients = lock(&self.clients);
        clients.retain(|_, (client, used)| {
            let keep = now.duration_since(*used) < READER_IDLE;
            if !keep {
                drop_in_background(client.clone());
            }
            keep
        });
        if let Some((client, used)) = clients.get_mut(group) {
            *used = now;
            return Ok(client.clone());
        }
        if clients.len() >= KEEP_READERS {
            let oldest = clients
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(g, _)| g.clone());
            if let Some((client, _)) = oldest.and_then(|g| clients.remove(&g)) {
                drop_in_background(client);
            }
        }
        let mut c = config.admin_config();
        c.set("group.id", group).set("enable.auto.commit", "false");
        let client: Arc<BaseConsumer> = Arc::new(
            c.create()
                .map_err(|e| Error::kafka("creating a client to read consumer groups", e))?,
        );
        clients.insert(group.to_owned(), (client.clone(), now));
        Ok(client)
    }

    /// Forgets the reader of `group` (it failed: the next call makes a new one).
    fn forget(&self, group: &str) {
        if let Some((client, _)) = lock(&self.clients).remove(group) {
            drop_in_background(client);
        }
    }
}

impl Drop for OffsetReaders {
    /// Each client is destroyed on a thread of its own (~100 ms each), not where the backend
    /// is dropped.
    fn drop(&mut self) {
        for (_, (client, _)) in lock(&self.clients).drain() {
            drop_in_background(client);
        }
    }
}

/// The group id of the kept client that lists groups and reads topics' partitions and
/// watermarks. A consumer's, not the producer's: librdkafka lets a producer's metadata request
/// create a topic it names (`allow.auto.create.topics` is true for producers), and a processor
/// starting up asks about its topics before it creates them with their configured partitions
/// (a CLI test found a topic made with the broker's default of 3 instead of 1).
const PROBE: &str = "cqrs-groups-probe";

/// Per topic, the groups named with `prefix` that have committed offsets on it, with their lag:
/// with a kept probe client, one ListGroups and per topic its partitions and watermarks; per
/// group one OffsetFetch for every topic, by its kept reader.
#[allow(clippy::type_complexity)]
fn group_backlogs(
    inner: &Inner,
    topics: Vec<String>,
    prefix: &str,
) -> Result<Vec<(String, Result<Vec<cqrs_core::backend::GroupBacklog>, Error>)>, Error> {
    use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
    let config = &inner.config;
    let timeout = config.timeout;
    let probe = inner.readers.get(config, PROBE)?;
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
    // Asked in lists of at most 256 partitions: librdkafka matches each answer to its request by
    // walking the list, so one request for every partition of every topic is quadratic (`cqrs
    // inspect` took 98 s of CPU on a broker with a thousand topics and a few hundred groups).
    let partitions: Vec<(&str, i32)> = out
        .iter()
        .flat_map(|(topic, _, ends)| ends.iter().map(move |&(p, _, _)| (topic.as_str(), p)))
        .collect();
    let lists: Vec<TopicPartitionList> = partitions
        .chunks(256)
        .map(|chunk| {
            let mut list = TopicPartitionList::new();
            for &(topic, p) in chunk {
                list.add_partition(topic, p);
            }
            list
        })
        .collect();
    for g in listed.groups() {
        // A group that only commits offsets (no member ever joined it) has no protocol type.
        let consumer_group = matches!(g.protocol_type(), "consumer" | "");
        if lists.is_empty() || !g.name().starts_with(prefix) || !consumer_group {
            continue;
        }
        let reader = inner.readers.get(config, g.name())?;
        // By topic, then partition: looked up without making a key per partition.
        let mut committed: HashMap<String, HashMap<i32, Offset>> = HashMap::new();
        let mut failed = None;
        for list in &lists {
            match reader.committed_offsets(list.clone(), timeout) {
                Ok(answer) => {
                    for e in answer.elements() {
                        committed
                            .entry(e.topic().to_owned())
                            .or_default()
                            .insert(e.partition(), e.offset());
                    }
                }
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = failed {
            inner.readers.forget(g.name());
            return Err(Error::kafka(
                format!("reading the committed offsets of {}", g.name()),
                e,
            ));
        }
        for (topic, backlog, ends) in &mut out {
            let Ok(backlog) = backlog else { continue };
            let mut reads_topic = false;
            let mut lag = 0;
            for &(p, low, high) in ends.iter() {
                let at = match committed.get(topic.as_str()).and_then(|c| c.get(&p)) {
                    Some(Offset::Offset(o)) => {
                        reads_topic = true;
                        *o
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
