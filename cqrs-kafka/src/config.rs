//! [`KafkaConfig`]: connection and behaviour settings, and the librdkafka settings each client
//! gets from them.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use cqrs_core::backend::Subscription;
use rdkafka::config::ClientConfig;

use crate::error::{Error, Result};

/// Connection and behaviour settings.
#[derive(Clone)]
pub struct KafkaConfig {
    pub(crate) brokers: String,
    pub(crate) settings: BTreeMap<String, String>,
    pub(crate) create_topics: bool,
    /// `None`: the broker's `num.partitions`.
    pub(crate) partitions: Option<i32>,
    /// `None`: the broker's `default.replication.factor`.
    pub(crate) replication: Option<i32>,
    pub(crate) fetch_wait: Duration,
    pub(crate) commit_interval: Duration,
    pub(crate) commit_every: usize,
    pub(crate) max_unrecorded: usize,
    pub(crate) timeout: Duration,
    pub(crate) publish_timeout: Duration,
    pub(crate) protocol: GroupProtocol,
    pub(crate) instance_id: Option<String>,
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

/// The longest librdkafka waits between two attempts to connect to a broker (`reconnect.backoff.max.ms`;
/// [`KafkaConfig::set`] changes it).
const RECONNECT_BACKOFF_MAX_MS: &str = "1000";

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
            max_unrecorded: 10_000,
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
    /// them with [`Error::Reserved`]. Some settings the backend chooses where librdkafka's
    /// defaults do not suit it, and these win over them: `reconnect.backoff.max.ms` is 1,000
    /// (librdkafka's 10,000 let a member find its restarted broker 10 s late), and consumers get
    /// `fetch.queue.backoff.ms` 10 (librdkafka: 1,000) and `queued.max.messages.kbytes` 16,384
    /// (librdkafka: 65,536).
    ///
    /// Each handler has a consumer of its own, and `queued.max.messages.kbytes` is what it
    /// fetches ahead: draining a backlog of 200-byte events, a member's memory peaked at ~105 MiB
    /// with 16,384 and ~37 MiB with 4,096 at the same rate on 16 partitions, while 1 KiB events
    /// from 4 partitions drained ~14% slower at 4,096 (`docs/performance.md`).
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
    ///
    /// Each commit costs the broker CPU (~0.7-0.9 ms on a local Kafka 4.1), and a member
    /// handling messages at full speed commits back to back, one every 6-7 ms: a larger count,
    /// or 0, trades work redone after a crash for a lighter broker (docs/reliability.md and
    /// docs/benchmarks.md have both measured).
    pub fn commit_every(mut self, messages: usize) -> Self {
        self.commit_every = messages;
        self
    }

    /// How many handled messages a consumer may have that its group has not recorded (a commit
    /// succeeded after them) before it hands out no more and waits for a commit (default
    /// 10,000; 0: no limit). A broker refuses commits while the group rebalances (librdkafka's
    /// mock cluster for the whole rebalance; Kafka only once the members have rejoined) and
    /// cannot take them while its coordinator is away: without a limit the member keeps
    /// working, and its partitions' next owner does all that work again. While commits fail the
    /// limit is `commit_every`.
    ///
    /// Commits are made one at a time, and a member's unrecorded count peaks at what it handles
    /// in about two of them. Kafka 4.1's group coordinator holds every commit for
    /// `group.coordinator.append.linger.ms` (5 ms) before it answers, so each takes 6-7 ms on a
    /// local broker: a limit of 4,000 (the default before) held one member to ~300,000
    /// messages a second. At 10,000 a member handling a backlog at ~700,000 a second still
    /// reaches the limit between answers and waits, a tenth of its time (docs/benchmarks.md);
    /// a member that does not need the bound that tight may raise it.
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

    pub(crate) fn client(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        // librdkafka's default is 10 s: after an outage of some seconds, its attempts were
        // 10 s apart, and a broker back found its clients 10 s later (a member then came back
        // to a group that had expired it). 1 s, the Java client's default.
        c.set("reconnect.backoff.max.ms", RECONNECT_BACKOFF_MAX_MS);
        c
    }

    pub(crate) fn apply(&self, c: &mut ClientConfig) {
        for (k, v) in &self.settings {
            c.set(k, v);
        }
    }

    pub(crate) fn producer_config(&self) -> ClientConfig {
        let mut c = self.client();
        // No lingering: a publish waits for its acknowledgement, so librdkafka's default 5 ms
        // only delayed each one; under load, records queued while requests are in flight go
        // out together anyway. Measured (docs/benchmarks.md): 16 tasks publishing one event at
        // a time 2,440/s -> 9,898/s, batches of 1,000 99-101k/s -> 124-130k/s, the outbox's
        // commit-to-handler p99 at 1,000/s 23 ms -> 10 ms; at ~1.5x the CPU per record sent.
        c.set("enable.idempotence", "true")
            .set("linger.ms", "0")
            .set(
                "message.timeout.ms",
                self.publish_timeout.as_millis().max(1).to_string(),
            );
        self.apply(&mut c);
        c
    }

    pub(crate) fn admin_config(&self) -> ClientConfig {
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
    pub(crate) fn check(&self) -> Result<()> {
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
