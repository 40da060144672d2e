//! An in-process broker with real consumer-group semantics; the default backend.
//!
//! Topics are append-only streams. Each consumer group has its own position and its own list of
//! pending entries (delivered, not yet acked) with delivery counts, as in Redis Streams: messages
//! fan out across groups and are shared among the members of a group; nacked entries come back
//! after their delay; entries a member held idle too long are claimed by another member; a member
//! that reopens under the same name gets its own pending entries back. Of the entries every group
//! has acked only the newest [`MemoryBroker::DEFAULT_RETAIN_ACKED`] are kept (see
//! [`MemoryBroker::with_retention`]), so memory is bounded by what the groups have not finished;
//! a group created later with [`StartFrom::Beginning`] starts at the oldest entry still held.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> cqrs_core::Result<()> {
//! use cqrs_core::backend::{Publisher, Subscriber, Subscription};
//! use cqrs_core::{memory::MemoryBroker, Message};
//!
//! let broker = MemoryBroker::new();
//! broker.publish("orders", &[Message::new("OrderPlaced", b"{}".to_vec())]).await?;
//! let mut consumer = broker.subscribe(&Subscription::new("billing", ["orders"])).await?;
//! let deliveries = consumer.receive(10).await?;
//! assert_eq!(deliveries[0].message().name, "OrderPlaced");
//! cqrs_core::Delivery::ack_all(deliveries).await.map_err(|(e, _)| e)?;
//! assert_eq!(broker.pending("orders", "billing").len(), 0);
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::backend::{
    Acknowledge, Consumer, Delivery, Publisher, StartFrom, Subscriber, Subscription,
};
use crate::error::{Error, Result};
use crate::message::Message;

/// How often a waiting consumer looks for idle entries to claim when nothing else wakes it.
const CLAIM_POLL: Duration = Duration::from_millis(50);

/// The in-memory broker. Cloning it gives another handle to the same broker.
#[derive(Clone, Default)]
pub struct MemoryBroker {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    notify: Notify,
    /// Acked entries kept per topic (the newest ones).
    retain_acked: usize,
}

impl Default for Shared {
    fn default() -> Self {
        Shared {
            state: Mutex::default(),
            notify: Notify::new(),
            retain_acked: MemoryBroker::DEFAULT_RETAIN_ACKED,
        }
    }
}

#[derive(Default)]
struct State {
    streams: HashMap<String, Stream>,
}

#[derive(Default)]
struct Stream {
    entries: BTreeMap<u64, Message>,
    last_seq: u64,
    groups: HashMap<String, Group>,
}

struct Group {
    last_delivered: u64,
    pending: BTreeMap<u64, Pending>,
}

impl Stream {
    /// Drops the entries every group has acked (those before each group's oldest pending entry
    /// and at or before its last delivered one), except the newest `retain`. A stream no group
    /// reads keeps everything.
    fn trim(&mut self, retain: usize) {
        let keep_from = self
            .groups
            .values()
            .map(|g| {
                g.pending
                    .keys()
                    .next()
                    .copied()
                    .unwrap_or(g.last_delivered + 1)
            })
            .min();
        if let Some(keep_from) = keep_from {
            let keep_from = keep_from.min((self.last_seq + 1).saturating_sub(retain as u64));
            if self.entries.keys().next().is_some_and(|&s| s < keep_from) {
                self.entries = self.entries.split_off(&keep_from);
            }
        }
    }
}

struct Pending {
    consumer: String,
    deliveries: u32,
    delivered_at: Instant,
    /// Set by a nack (or a reopen): the owner gets the entry again from this time on.
    ready_at: Option<Instant>,
}

/// A pending entry as [`MemoryBroker::pending`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PendingEntry {
    /// The message id.
    pub message_id: String,
    /// The member that holds it.
    pub consumer: String,
    /// How many times it was delivered.
    pub deliveries: u32,
}

impl MemoryBroker {
    /// How many acked entries each topic keeps by default (the newest ones).
    pub const DEFAULT_RETAIN_ACKED: usize = 10_000;

    /// A new, empty broker.
    pub fn new() -> Self {
        Self::default()
    }

    /// A new broker whose topics keep at most `n` entries that every group has acked (the
    /// newest); older acked entries are dropped. Entries a group has not acked are always kept.
    pub fn with_retention(n: usize) -> Self {
        MemoryBroker {
            shared: Arc::new(Shared {
                retain_acked: n,
                ..Shared::default()
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while the lock was held cannot leave the state half-written (every update is a
        // single insert or remove), so a poisoned lock is still usable.
        self.shared
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Every message the topic holds, oldest first.
    pub fn messages(&self, topic: &str) -> Vec<Message> {
        self.lock()
            .streams
            .get(topic)
            .map(|s| s.entries.values().cloned().collect())
            .unwrap_or_default()
    }

    /// The entries `group` holds pending on `topic`, oldest first.
    pub fn pending(&self, topic: &str, group: &str) -> Vec<PendingEntry> {
        let state = self.lock();
        let Some(stream) = state.streams.get(topic) else {
            return Vec::new();
        };
        let Some(g) = stream.groups.get(group) else {
            return Vec::new();
        };
        g.pending
            .iter()
            .map(|(seq, p)| PendingEntry {
                message_id: stream
                    .entries
                    .get(seq)
                    .map(|m| m.id.to_string())
                    .unwrap_or_default(),
                consumer: p.consumer.clone(),
                deliveries: p.deliveries,
            })
            .collect()
    }

    /// Every group of every topic with work left, read at one instant: messages not delivered to
    /// it yet (`lag`) or delivered and not acked (`pending`, a nacked one waiting for its time
    /// included), as `(topic, backlog)` sorted by topic and group. Empty when every group has
    /// acked everything (what `cqrs::testing` waits for).
    pub fn unfinished(&self) -> Vec<(String, crate::backend::GroupBacklog)> {
        let state = self.lock();
        let mut out: Vec<(String, crate::backend::GroupBacklog)> = state
            .streams
            .iter()
            .flat_map(|(topic, stream)| {
                stream.groups.iter().filter_map(move |(name, g)| {
                    let lag = stream.last_seq.saturating_sub(g.last_delivered);
                    (lag > 0 || !g.pending.is_empty()).then(|| {
                        (
                            topic.clone(),
                            crate::backend::GroupBacklog {
                                group: name.clone(),
                                pending: g.pending.len() as u64,
                                lag: Some(lag),
                            },
                        )
                    })
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.0, &a.1.group).cmp(&(&b.0, &b.1.group)));
        out
    }

    /// The topics that exist, sorted.
    pub fn topics(&self) -> Vec<String> {
        let mut topics: Vec<String> = self.lock().streams.keys().cloned().collect();
        topics.sort();
        topics
    }
}

impl std::fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBroker")
            .field("topics", &self.topics())
            .finish()
    }
}

#[async_trait]
impl Publisher for MemoryBroker {
    fn system(&self) -> &'static str {
        "memory"
    }

    async fn publish(&self, topic: &str, messages: &[Message]) -> Result<()> {
        if topic.is_empty() {
            return Err(Error::Config("a topic cannot be empty".into()));
        }
        {
            let mut state = self.lock();
            let stream = state.streams.entry(topic.to_owned()).or_default();
            for message in messages {
                stream.last_seq += 1;
                let seq = stream.last_seq;
                stream.entries.insert(seq, message.clone());
            }
        }
        self.shared.notify.notify_waiters();
        Ok(())
    }
}

#[async_trait]
impl Subscriber for MemoryBroker {
    fn location(&self, _topic: &str) -> Option<String> {
        Some("the in-memory broker".to_owned())
    }

    async fn groups(&self, topic: &str, prefix: &str) -> Result<Vec<crate::backend::GroupBacklog>> {
        let state = self.lock();
        let Some(stream) = state.streams.get(topic) else {
            return Ok(Vec::new());
        };
        let mut groups: Vec<_> = stream
            .groups
            .iter()
            .filter(|(name, _)| name.starts_with(prefix))
            .map(|(name, g)| crate::backend::GroupBacklog {
                group: name.clone(),
                pending: g.pending.len() as u64,
                lag: Some(stream.last_seq.saturating_sub(g.last_delivered)),
            })
            .collect();
        groups.sort_by(|a, b| a.group.cmp(&b.group));
        Ok(groups)
    }

    async fn subscribe(&self, subscription: &Subscription) -> Result<Box<dyn Consumer>> {
        subscription.check()?;
        {
            let now = Instant::now();
            let mut state = self.lock();
            for topic in &subscription.topics {
                let stream = state.streams.entry(topic.clone()).or_default();
                let start = match subscription.start {
                    StartFrom::Beginning => 0,
                    StartFrom::Latest => stream.last_seq,
                };
                let group = stream
                    .groups
                    .entry(subscription.group.clone())
                    .or_insert_with(|| Group {
                        last_delivered: start,
                        pending: BTreeMap::new(),
                    });
                // A member that comes back under its old name resumes its unfinished work.
                for p in group.pending.values_mut() {
                    if p.consumer == subscription.consumer {
                        p.ready_at = Some(now);
                    }
                }
            }
        }
        let acker = Arc::new(MemoryAcker {
            broker: self.clone(),
            group: subscription.group.clone(),
            consumer: subscription.consumer.clone(),
        });
        Ok(Box::new(MemoryConsumer {
            broker: self.clone(),
            topics: subscription
                .topics
                .iter()
                .map(|t| Arc::from(t.as_str()))
                .collect(),
            subscription: subscription.clone(),
            acker,
        }))
    }
}

struct MemoryConsumer {
    broker: MemoryBroker,
    topics: Vec<Arc<str>>,
    subscription: Subscription,
    acker: Arc<MemoryAcker>,
}

impl MemoryConsumer {
    /// Takes up to `max` deliveries; returns when the next one may become available.
    fn take(&self, max: usize) -> (Vec<Delivery>, Option<Instant>) {
        let now = Instant::now();
        let me = &self.subscription.consumer;
        let claim_idle = self.subscription.claim_idle;
        let mut out = Vec::new();
        let mut wake: Option<Instant> = None;
        let mut earliest = |t: Instant| {
            wake = Some(wake.map_or(t, |w| w.min(t)));
        };
        let mut state = self.broker.lock();
        for topic in &self.topics {
            let Some(stream) = state.streams.get_mut(&**topic) else {
                continue;
            };
            let Some(group) = stream.groups.get_mut(&self.subscription.group) else {
                continue;
            };
            // Redeliveries: own entries that were nacked or resumed, and other members' idle ones.
            for (seq, p) in group.pending.iter_mut() {
                if out.len() >= max {
                    break;
                }
                let due = if p.consumer == *me {
                    match p.ready_at {
                        Some(t) if t <= now => true,
                        Some(t) => {
                            earliest(t);
                            false
                        }
                        None => false,
                    }
                } else if let Some(idle) = claim_idle {
                    let at = p.delivered_at + idle;
                    let at = p.ready_at.map_or(at, |r| r.max(at));
                    if at <= now {
                        true
                    } else {
                        earliest(at);
                        false
                    }
                } else {
                    false
                };
                if !due {
                    continue;
                }
                let Some(message) = stream.entries.get(seq) else {
                    continue;
                };
                p.consumer.clone_from(me);
                p.deliveries += 1;
                p.delivered_at = now;
                p.ready_at = None;
                out.push(self.delivery(topic, *seq, message.clone(), p.deliveries));
            }
            // New entries.
            while out.len() < max && group.last_delivered < stream.last_seq {
                let Some((&seq, message)) = stream.entries.range(group.last_delivered + 1..).next()
                else {
                    break;
                };
                group.last_delivered = seq;
                group.pending.insert(
                    seq,
                    Pending {
                        consumer: me.clone(),
                        deliveries: 1,
                        delivered_at: now,
                        ready_at: None,
                    },
                );
                out.push(self.delivery(topic, seq, message.clone(), 1));
            }
        }
        (out, wake)
    }

    fn delivery(&self, topic: &Arc<str>, seq: u64, message: Message, attempt: u32) -> Delivery {
        Delivery::new(
            topic.clone(),
            message,
            attempt,
            seq.to_string(),
            self.acker.clone(),
        )
    }
}

#[async_trait]
impl Consumer for MemoryConsumer {
    async fn receive(&mut self, max: usize) -> Result<Vec<Delivery>> {
        let max = max.max(1);
        loop {
            let notified = self.broker.shared.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (out, wake) = self.take(max);
            if !out.is_empty() {
                return Ok(out);
            }
            let mut deadline = wake.unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
            if self.subscription.claim_idle.is_some() {
                deadline = deadline.min(Instant::now() + CLAIM_POLL);
            }
            let _ = tokio::time::timeout_at(deadline, notified).await;
        }
    }
}

struct MemoryAcker {
    broker: MemoryBroker,
    group: String,
    consumer: String,
}

impl MemoryAcker {
    fn seq(delivery: &Delivery) -> Result<u64> {
        delivery
            .broker_id()
            .parse()
            .map_err(|e| Error::fatal("delivery id is not from the in-memory broker", e))
    }
}

#[async_trait]
impl Acknowledge for MemoryAcker {
    async fn ack(&self, deliveries: &[Delivery]) -> Result<()> {
        let mut state = self.broker.lock();
        let mut touched: Vec<&str> = Vec::new();
        for d in deliveries {
            let seq = Self::seq(d)?;
            if let Some(group) = state
                .streams
                .get_mut(d.topic())
                .and_then(|s| s.groups.get_mut(&self.group))
            {
                group.pending.remove(&seq);
                if !touched.contains(&d.topic()) {
                    touched.push(d.topic());
                }
            }
        }
        for topic in touched {
            if let Some(stream) = state.streams.get_mut(topic) {
                stream.trim(self.broker.shared.retain_acked);
            }
        }
        Ok(())
    }

    fn release(&self, delivery: &Delivery) {
        if let Ok(seq) = Self::seq(delivery) {
            self.ready_again(delivery.topic(), seq, Instant::now());
        }
    }

    async fn nack(&self, delivery: &Delivery, redeliver_after: Duration) -> Result<()> {
        let seq = Self::seq(delivery)?;
        self.ready_again(delivery.topic(), seq, Instant::now() + redeliver_after);
        Ok(())
    }
}

impl MemoryAcker {
    /// Has this member's pending entry `seq` of `topic` delivered to it again from `at` on.
    fn ready_again(&self, topic: &str, seq: u64, at: Instant) {
        {
            let mut state = self.broker.lock();
            if let Some(p) = state
                .streams
                .get_mut(topic)
                .and_then(|s| s.groups.get_mut(&self.group))
                .and_then(|g| g.pending.get_mut(&seq))
            {
                if p.consumer == self.consumer {
                    p.ready_at = Some(at);
                }
            }
        }
        self.broker.shared.notify.notify_waiters();
    }
}
