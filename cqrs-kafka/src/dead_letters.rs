//! Dead letters on Kafka: listed, redriven and purged ([`DeadLetterStore`]).
//!
//! Kafka cannot delete one record, so what was redriven or purged is written down as the
//! committed offsets of a consumer group of its own, [`bookkeeping_group`]: per partition, every
//! record below the committed offset is done, and the offset's metadata lists the done ones above
//! it (a dead letter redriven by id ahead of older ones). Listing reads each partition from its
//! committed offset and leaves the done ones out. `cqrs inspect --kafka` shows that group's lag:
//! the dead letters left.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cqrs_core::dead_letter::{redrive_each, DeadLetter, DeadLetterStore, EachDeadLetter, Redrive};
use cqrs_core::Message;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _};
use rdkafka::error::KafkaError;
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};

use crate::bookkeeping::{Done, FORMAT, MAX_METADATA};
use crate::error::{Error, Result};
use crate::{KafkaBackend, KafkaConfig};

/// The consumer group whose committed offsets record what was redriven or purged from the
/// dead-letter topic `topic`.
pub fn bookkeeping_group(topic: &str) -> String {
    format!("cqrs-dead-letters.{topic}")
}

/// The consumer group a redrive or purge of the dead-letter topic `topic` is a member of while
/// it runs: one run per topic at a time (a second run, finding another member there, is refused).
pub fn run_lock_group(topic: &str) -> String {
    format!("cqrs-dead-letters.{topic}.running")
}

/// Notes that the lock member has joined its group (a rebalance ended).
#[derive(Default)]
struct Joined(AtomicBool);

impl rdkafka::ClientContext for Joined {}

impl rdkafka::consumer::ConsumerContext for Joined {
    fn post_rebalance(&self, _: &BaseConsumer<Self>, _: &rdkafka::consumer::Rebalance<'_>) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// One redrive or purge of a dead-letter topic at a time. A second run, while one runs, would
/// list the same letters and publish them again (Kafka keeps the bookkeeping as committed
/// offsets: the last commit wins). Kafka has no lock, so a run joins a consumer group of its own
/// ([`run_lock_group`]; classic protocol, reading nothing) and goes on only if it is the group's
/// one member; a run that dies leaves it after its session times out (6 s). Two runs starting
/// at the same instant may both see two members: both are refused, none publishes twice.
struct RunLock {
    stop: Arc<AtomicBool>,
    member: Option<std::thread::JoinHandle<()>>,
}

impl RunLock {
    fn take(config: &KafkaConfig, topic: &str) -> Result<RunLock> {
        let group = run_lock_group(topic);
        let timeout = config.timeout;
        let context = |what: &str| format!("{what} {group}, the lock of the runs on {topic}");
        let mut c = config.admin_config();
        c.set("group.id", &group)
            .set("group.protocol", "classic")
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "500")
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "latest");
        let member: BaseConsumer<Joined> = c
            .create_with_context(Joined::default())
            .map_err(|e| Error::kafka(context("joining"), e))?;
        member
            .subscribe(&[topic])
            .map_err(|e| Error::kafka(context("joining"), e))?;
        let deadline = Instant::now() + timeout * 3;
        while !member.context().0.load(Ordering::SeqCst) {
            if Instant::now() >= deadline {
                return Err(Error::kafka(
                    context("joining"),
                    KafkaError::AdminOp(rdkafka::types::RDKafkaErrorCode::OperationTimedOut),
                ));
            }
            Self::idle(&member);
        }
        let members = member
            .fetch_group_list(Some(&group), timeout)
            .map_err(|e| Error::kafka(context("describing"), e))?
            .groups()
            .iter()
            .find(|g| g.name() == group)
            .map_or(0, |g| g.members().len());
        if members > 1 {
            return Err(Error::Busy {
                topic: topic.to_owned(),
                group,
                members,
            });
        }
        // Stays a member (heartbeats, rebalances) until the run ends.
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("cqrs-kafka-run-lock".into())
                .spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        Self::idle(&member);
                    }
                    member.unsubscribe();
                })
                .map_err(|e| Error::Io("starting the run lock's thread", e))?
        };
        Ok(RunLock {
            stop,
            member: Some(thread),
        })
    }

    /// Polls the member (which serves its group) and keeps it from reading anything.
    fn idle(member: &BaseConsumer<Joined>) {
        let _ = member.poll(Duration::from_millis(100));
        if let Ok(assigned) = member.assignment() {
            if assigned.count() > 0 {
                let _ = member.pause(&assigned);
            }
        }
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // The member leaves its group on its thread, which is not waited for.
        drop(self.member.take());
    }
}

/// One partition of a dead-letter topic as read.
struct Partition {
    done: Done,
    /// One past the last record read.
    end: i64,
    /// The offsets of the records read, done or not.
    records: BTreeSet<i64>,
    /// The records not done, oldest first.
    letters: Vec<(i64, DeadLetter)>,
}

/// A dead-letter topic as read, with the client that records what gets done.
struct Read {
    topic: String,
    client: Arc<BaseConsumer>,
    partitions: BTreeMap<i32, Partition>,
    /// Each partition's end (high watermark) when it was read.
    highs: BTreeMap<i32, i64>,
    timeout: Duration,
}

/// How far [`Read::window`] reads.
#[derive(Default)]
struct Window {
    /// From after this partition and offset (from each partition's committed offset when
    /// `None`).
    after: Option<(i32, i64)>,
    /// Until this many dead letters are read (every partition to its end when `None`).
    limit: Option<usize>,
    /// Only these partitions, each until this offset (exclusive) or its end, whichever comes
    /// first (every partition to its end when `None`).
    until: Option<BTreeMap<i32, i64>>,
}

/// A Kafka dead letter's id, `partition:offset`, read back.
fn parse_id(id: &str) -> Option<(i32, i64)> {
    id.split_once(':')
        .and_then(|(p, o)| Some((p.parse().ok()?, o.parse().ok()?)))
}

fn id(partition: i32, offset: i64) -> String {
    format!("{partition}:{offset}")
}

impl Read {
    /// Reads `topic` by partition, then offset, as far as `window` says.
    fn window(config: &KafkaConfig, topic: &str, window: &Window) -> Result<Read> {
        let Window {
            after,
            limit,
            ref until,
        } = *window;
        let timeout = config.timeout;
        let context = |what: &str| format!("{what} of the dead letters on {topic}");
        let mut c = config.admin_config();
        c.set("group.id", bookkeeping_group(topic))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .set("auto.offset.reset", "earliest");
        let client: BaseConsumer = c
            .create()
            .map_err(|e| Error::kafka(context("creating the reader"), e))?;
        let metadata = client
            .fetch_metadata(Some(topic), timeout)
            .map_err(|e| Error::kafka(context("reading the partitions"), e))?;
        let ids: Vec<i32> = metadata
            .topics()
            .iter()
            .flat_map(|t| t.partitions())
            .map(|p| p.id())
            .collect();
        let mut all = TopicPartitionList::new();
        for p in &ids {
            all.add_partition(topic, *p);
        }
        let committed = client
            .committed_offsets(all, timeout)
            .map_err(|e| Error::kafka(context("reading what was done"), e))?;
        let mut partitions = BTreeMap::new();
        let mut highs = BTreeMap::new();
        // The partitions to read: (partition, start, end).
        let mut starts: Vec<(i32, i64, i64)> = Vec::new();
        for p in ids {
            let (low, high) = client
                .fetch_watermarks(topic, p, timeout)
                .map_err(|e| Error::kafka(context("reading the watermarks"), e))?;
            highs.insert(p, high);
            let done = match committed.find_partition(topic, p) {
                Some(e) => {
                    if matches!(e.offset(), Offset::Offset(o) if o > high) {
                        tracing::warn!(topic, partition = p, committed = ?e.offset(), high, "the redrive bookkeeping is past the partition's end (the topic was made again?): every dead letter there counts as not done");
                    }
                    let committed = match e.offset() {
                        Offset::Offset(o) => Some(o),
                        _ => None,
                    };
                    Done::parse(committed, e.metadata(), low, high)
                }
                None => Ok(Done {
                    next: low,
                    above: BTreeSet::new(),
                }),
            }
            .map_err(|why| Error::Bookkeeping {
                group: bookkeeping_group(topic),
                partition: p,
                why,
            })?;
            let start = match after {
                Some((ap, _)) if p < ap => high,
                Some((ap, ao)) if p == ap => done.next.max(ao + 1),
                _ => done.next,
            };
            let end = match until {
                None => high,
                Some(until) => until.get(&p).map_or(start, |u| high.min(*u)),
            };
            if start < end {
                starts.push((p, start, end));
            }
            partitions.insert(
                p,
                Partition {
                    end: start,
                    done,
                    records: BTreeSet::new(),
                    letters: Vec::new(),
                },
            );
        }
        starts.sort_unstable();
        // Every partition at once, or (a page) one after the other, in order.
        let batches: Vec<Vec<(i32, i64, i64)>> = match limit {
            None => vec![starts],
            Some(_) => starts.into_iter().map(|s| vec![s]).collect(),
        };
        let deadline = Instant::now() + timeout * 3;
        for batch in batches {
            let mut assign = TopicPartitionList::new();
            for (p, start, _) in &batch {
                assign
                    .add_partition_offset(topic, *p, Offset::Offset(*start))
                    .map_err(|e| Error::kafka(context("choosing the offsets"), e))?;
            }
            client
                .assign(&assign)
                .map_err(|e| Error::kafka(context("assigning the partitions"), e))?;
            let ends: BTreeMap<i32, i64> = batch.iter().map(|(p, _, end)| (*p, *end)).collect();
            Self::read_until(&client, topic, &ends, &mut partitions, limit, deadline)?;
            let read: usize = partitions.values().map(|p| p.letters.len()).sum();
            if limit.is_some_and(|l| read >= l) {
                break;
            }
        }
        Ok(Read {
            topic: topic.to_owned(),
            client: Arc::new(client),
            partitions,
            highs,
            timeout,
        })
    }

    /// Polls the assigned partitions until each of `ends` reached its end (the offset given,
    /// exclusive: nothing from there on is taken), or `limit` dead letters are read in all.
    fn read_until(
        client: &BaseConsumer,
        topic: &str,
        ends: &BTreeMap<i32, i64>,
        partitions: &mut BTreeMap<i32, Partition>,
        limit: Option<usize>,
        deadline: Instant,
    ) -> Result<()> {
        let context = |what: &str| format!("{what} of the dead letters on {topic}");
        let mut left = ends.clone();
        let mut read: usize = partitions.values().map(|p| p.letters.len()).sum();
        while !left.is_empty() && limit.is_none_or(|l| read < l) {
            if Instant::now() > deadline {
                return Err(Error::kafka(
                    context(&format!("reading partitions {:?}", left.keys())),
                    KafkaError::Canceled,
                ));
            }
            let m = match client.poll(Duration::from_millis(100)) {
                None => continue,
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    left.remove(&p);
                    continue;
                }
                Some(Err(e)) => return Err(Error::kafka(context("reading"), e)),
                Some(Ok(m)) => m,
            };
            let (p, offset) = (m.partition(), m.offset());
            if left.get(&p).is_some_and(|high| offset + 1 >= *high) {
                left.remove(&p);
            }
            let Some(part) = partitions.get_mut(&p) else {
                continue;
            };
            if offset < part.end || ends.get(&p).is_none_or(|end| offset >= *end) {
                continue;
            }
            part.end = offset + 1;
            part.records.insert(offset);
            if part.done.contains(offset) {
                continue;
            }
            let (message, _) = crate::consumer::decode(&m);
            let stored_at = crate::consumer::record_time_ms(&m);
            part.letters
                .push((offset, DeadLetter::new(id(p, offset), message, stored_at)));
            read += 1;
        }
        Ok(())
    }

    fn letters(&self) -> impl Iterator<Item = (i32, i64, &DeadLetter)> {
        self.partitions
            .iter()
            .flat_map(|(p, part)| part.letters.iter().map(move |(o, d)| (*p, *o, d)))
    }

    /// The dead letters with an id in `ids` (all when `None`), with their partition and offset.
    fn chosen(&self, ids: Option<&[String]>) -> Vec<(i32, i64, DeadLetter)> {
        self.letters()
            .filter(|(_, _, d)| ids.is_none_or(|ids| ids.contains(&d.id)))
            .map(|(p, o, d)| (p, o, d.clone()))
            .collect()
    }

    /// Marks `offset` of `partition` done (not yet committed).
    fn mark(&mut self, partition: i32, offset: i64) {
        if let Some(part) = self.partitions.get_mut(&partition) {
            part.done.mark(offset, &part.records, part.end);
        }
    }

    /// Fails, before anything moves, if marking `chosen` done cannot be recorded: it would need
    /// more offset metadata than Kafka keeps, or any at all on a broker that drops it.
    async fn check_recordable(&self, chosen: &[(i32, i64, DeadLetter)]) -> Result<()> {
        let mut after: BTreeMap<i32, Done> = BTreeMap::new();
        for (p, o, _) in chosen {
            if let Some(part) = self.partitions.get(p) {
                after.entry(*p).or_insert_with(|| part.done.clone()).mark(
                    *o,
                    &part.records,
                    part.end,
                );
            }
        }
        let refuse = |partition: i32, why: &str| Error::Bookkeeping {
            group: bookkeeping_group(&self.topic),
            partition,
            why: why.to_owned(),
        };
        if let Some((p, _)) = after
            .iter()
            .find(|(_, d)| d.metadata().len() > MAX_METADATA)
        {
            return Err(refuse(
                *p,
                "too many dead letters redriven or purged ahead of older ones on this partition \
                 to record; redrive or purge the older ones first",
            ));
        }
        let Some(p) = after
            .iter()
            .find(|(_, d)| !d.above.is_empty())
            .map(|(p, _)| *p)
        else {
            return Ok(());
        };
        // Commit this partition's state unchanged (`v1:` alone lists nothing) and read it back.
        let Some(done) = self.partitions.get(&p).map(|part| part.done.clone()) else {
            return Ok(());
        };
        let probe = match done.metadata() {
            m if m.is_empty() => FORMAT.to_owned(),
            m => m,
        };
        let (client, topic, timeout) = (self.client.clone(), self.topic.clone(), self.timeout);
        let context = format!("checking that the broker keeps offset metadata on {topic}");
        let kept = tokio::task::spawn_blocking(move || -> Result<bool> {
            let context = |e| Error::kafka(context.clone(), e);
            let mut tpl = TopicPartitionList::new();
            let mut e = tpl.add_partition(&topic, p);
            e.set_offset(Offset::Offset(done.next)).map_err(context)?;
            e.set_metadata(&probe);
            client.commit(&tpl, CommitMode::Sync).map_err(context)?;
            let read = client.committed_offsets(tpl, timeout).map_err(context)?;
            Ok(read
                .find_partition(&topic, p)
                .is_some_and(|e| e.metadata() == probe))
        })
        .await
        .map_err(|_| Error::kafka("checking offset metadata", KafkaError::Canceled))??;
        if kept {
            Ok(())
        } else {
            Err(refuse(
                p,
                "this broker does not keep the metadata of committed offsets, where dead letters \
                 redriven or purged ahead of older ones are recorded; redrive or purge the oldest \
                 first (or --all)",
            ))
        }
    }

    /// Commits what is done on `partitions` as the bookkeeping group's offsets.
    async fn commit(&self, partitions: &BTreeSet<i32>) -> Result<()> {
        let context = || format!("recording what was done on {}", self.topic);
        let mut tpl = TopicPartitionList::new();
        for p in partitions {
            let Some(part) = self.partitions.get(p) else {
                continue;
            };
            let mut e = tpl.add_partition(&self.topic, *p);
            e.set_offset(Offset::Offset(part.done.next))
                .map_err(|e| Error::kafka(context(), e))?;
            e.set_metadata(part.done.metadata());
        }
        let client = self.client.clone();
        tokio::task::spawn_blocking(move || client.commit(&tpl, CommitMode::Sync))
            .await
            .map_err(|_| Error::kafka(context(), KafkaError::Canceled))?
            .map_err(|e| Error::kafka(context(), e))
    }
}

impl KafkaBackend {
    async fn run_lock(&self, topic: &str) -> Result<RunLock> {
        let config = self.inner.config.clone();
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || RunLock::take(&config, &topic))
            .await
            .map_err(|_| Error::kafka("taking the run lock", KafkaError::Canceled))?
    }

    /// Reads `topic` as far as a window made by `window` says (on a blocking thread).
    async fn read_window(&self, topic: &str, window: Window) -> Result<Read> {
        let config = self.inner.config.clone();
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || Read::window(&config, &topic, &window))
            .await
            .map_err(|_| Error::kafka("reading dead letters", KafkaError::Canceled))?
    }

    /// Reads what the dead letters `ids` of `topic` need: each partition they name, from its
    /// committed offset to the highest offset named; every partition to its end when `None`.
    async fn read_chosen(&self, topic: &str, ids: Option<&[String]>) -> Result<Read> {
        let until = ids.map(|ids| {
            let mut until: BTreeMap<i32, i64> = BTreeMap::new();
            for (p, o) in ids.iter().filter_map(|id| parse_id(id)) {
                let end = until.entry(p).or_insert(0);
                *end = (*end).max(o.saturating_add(1));
            }
            until
        });
        let window = Window {
            until,
            ..Window::default()
        };
        self.read_window(topic, window).await
    }
}

/// Redriving from a dead-letter topic: a dead letter is recorded as done (in the bookkeeping
/// group) once it is back on its topic.
struct Redriving<'a> {
    backend: &'a KafkaBackend,
    read: &'a mut Read,
}

#[async_trait]
impl Redrive for Redriving<'_> {
    type Key = (i32, i64);

    async fn publish(&mut self, topic: &str, message: Message) -> cqrs_core::Result<()> {
        self.backend
            .send_all(topic, std::iter::once(Ok(message)))
            .await
    }

    async fn done(
        &mut self,
        &(partition, offset): &(i32, i64),
        _: &DeadLetter,
    ) -> cqrs_core::Result<()> {
        self.read.mark(partition, offset);
        self.read.commit(&BTreeSet::from([partition])).await?;
        Ok(())
    }
}

#[async_trait]
impl DeadLetterStore for KafkaBackend {
    async fn has_dead_letters(&self, topic: &str) -> cqrs_core::Result<bool> {
        Ok(self.topics_on_broker().await?.iter().any(|t| t == topic))
    }

    /// Reads every partition from the bookkeeping group's committed offset to its end, leaving
    /// out what was redriven or purged. Ids are `partition:offset`.
    async fn dead_letters(&self, topic: &str) -> cqrs_core::Result<Vec<DeadLetter>> {
        let read = self.read_chosen(topic, None).await?;
        Ok(read.letters().map(|(_, _, d)| d.clone()).collect())
    }

    /// Reads partitions one after the other, from after `after` (`partition:offset`), until
    /// `limit` dead letters are read: what a page costs is bounded by it, not by the topic.
    async fn dead_letters_page(
        &self,
        topic: &str,
        after: Option<&str>,
        limit: usize,
    ) -> cqrs_core::Result<Vec<DeadLetter>> {
        let after = match after {
            None => None,
            Some(id) => Some(parse_id(id).ok_or_else(|| {
                cqrs_core::Error::fatal(
                    format!("listing the dead letters on {topic}"),
                    format!(
                        "`{}` is not a Kafka dead letter's id (partition:offset)",
                        cqrs_core::dead_letter::bounded(id, 64)
                    ),
                )
            })?),
        };
        let window = Window {
            after,
            limit: Some(limit.max(1)),
            until: None,
        };
        let read = self.read_window(topic, window).await?;
        Ok(read
            .letters()
            .map(|(_, _, d)| d.clone())
            .take(limit)
            .collect())
    }

    /// Reads each partition the ids name from its committed offset to the highest offset
    /// named.
    async fn dead_letters_by_id(
        &self,
        topic: &str,
        ids: &[String],
    ) -> cqrs_core::Result<Vec<DeadLetter>> {
        let read = self.read_chosen(topic, Some(ids)).await?;
        Ok(read
            .chosen(Some(ids))
            .into_iter()
            .map(|(_, _, d)| d)
            .collect())
    }

    /// Publishes each chosen dead letter back and waits for the broker's acknowledgement, then
    /// records it as done (a commit of the bookkeeping group). With ids, reads only what they
    /// name (see [`DeadLetterStore::dead_letters_by_id`]).
    async fn redrive(
        &self,
        topic: &str,
        ids: Option<&[String]>,
    ) -> cqrs_core::Result<Vec<DeadLetter>> {
        let _lock = self.run_lock(topic).await?;
        let mut read = self.read_chosen(topic, ids).await?;
        Ok(self.redrive_read(topic, &mut read, ids).await?)
    }

    /// Records the chosen dead letters as done, in one commit of the bookkeeping group. With
    /// ids, reads only what they name.
    async fn purge(&self, topic: &str, ids: Option<&[String]>) -> cqrs_core::Result<u64> {
        let _lock = self.run_lock(topic).await?;
        let mut read = self.read_chosen(topic, ids).await?;
        let chosen = read.chosen(ids);
        Ok(purge_read(&mut read, &chosen).await?)
    }

    /// Pages read from the bookkeeping group's committed offsets, each up to the partitions'
    /// ends when it started, each redriven as [`DeadLetterStore::redrive`] does, under one run
    /// lock.
    async fn redrive_all(
        &self,
        topic: &str,
        page: usize,
        each: &mut EachDeadLetter<'_>,
    ) -> cqrs_core::Result<u64> {
        let _lock = self.run_lock(topic).await?;
        let mut pages = Pages::new(page);
        let mut done = 0;
        while let Some(mut read) = pages.next(self, topic).await? {
            for d in self.redrive_read(topic, &mut read, None).await? {
                each(&d);
                done += 1;
            }
        }
        Ok(done)
    }

    /// Pages as [`DeadLetterStore::redrive_all`] reads them, each recorded as done in one
    /// commit.
    async fn purge_all(
        &self,
        topic: &str,
        page: usize,
        each: &mut EachDeadLetter<'_>,
    ) -> cqrs_core::Result<u64> {
        let _lock = self.run_lock(topic).await?;
        let mut pages = Pages::new(page);
        let mut removed = 0;
        while let Some(mut read) = pages.next(self, topic).await? {
            let chosen = read.chosen(None);
            removed += purge_read(&mut read, &chosen).await?;
            for (_, _, d) in &chosen {
                each(d);
            }
        }
        Ok(removed)
    }
}

impl KafkaBackend {
    /// Redrives the dead letters of `read` with an id in `ids` (all when `None`).
    async fn redrive_read(
        &self,
        topic: &str,
        read: &mut Read,
        ids: Option<&[String]>,
    ) -> cqrs_core::Result<Vec<DeadLetter>> {
        let chosen = read.chosen(ids);
        read.check_recordable(&chosen).await?;
        let chosen = chosen.into_iter().map(|(p, o, d)| ((p, o), d)).collect();
        let mut redrive = Redriving {
            backend: self,
            read,
        };
        redrive_each(topic, chosen, &mut redrive).await
    }
}

/// Records `chosen` of `read` as done, in one commit; returns how many.
async fn purge_read(read: &mut Read, chosen: &[(i32, i64, DeadLetter)]) -> Result<u64> {
    read.check_recordable(chosen).await?;
    for (p, o, _) in chosen {
        read.mark(*p, *o);
    }
    let touched: BTreeSet<i32> = chosen.iter().map(|(p, _, _)| *p).collect();
    if !touched.is_empty() {
        read.commit(&touched).await?;
    }
    Ok(chosen.len() as u64)
}

/// A dead-letter topic read a page at a time, up to where each partition ended when the first
/// page was read, each page after the last one's last letter (so even a page whose bookkeeping
/// did not move is not read twice).
struct Pages {
    size: usize,
    until: Option<BTreeMap<i32, i64>>,
    after: Option<(i32, i64)>,
}

impl Pages {
    fn new(size: usize) -> Pages {
        Pages {
            size: size.max(1),
            until: None,
            after: None,
        }
    }

    /// The next page, `None` once there are no dead letters left in the span.
    async fn next(&mut self, backend: &KafkaBackend, topic: &str) -> Result<Option<Read>> {
        let window = Window {
            after: self.after,
            limit: Some(self.size),
            until: self.until.clone(),
        };
        let read = backend.read_window(topic, window).await?;
        if self.until.is_none() {
            self.until = Some(read.highs.clone());
        }
        let Some((p, o, _)) = read.letters().last() else {
            return Ok(None);
        };
        self.after = Some((p, o));
        Ok(Some(read))
    }
}
