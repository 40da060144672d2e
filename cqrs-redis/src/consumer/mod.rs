//! One member of a consumer group on Redis Streams.
//!
//! - [`acker`]: acks (`XACK`), nacks and stale deliveries;
//! - [`claim`]: taking over what this member held before a restart and what dead members held
//!   (`XCLAIM`, `XAUTOCLAIM`), and removing members idle for good;
//! - here: reading new entries (`XREADGROUP`), redelivery times, and decoding stream entries.

mod acker;
mod claim;

pub(crate) use acker::RedisAcker;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use cqrs_core::backend::{Consumer, Delivery, Subscription};
use cqrs_core::redelivery::Redeliveries;
use cqrs_core::wire::{Entry, FieldValue, Layout, Part};
use cqrs_core::StartFrom;
use redis::{ErrorKind, ServerErrorKind, Value};
use tokio::time::Instant;

use crate::conn::{by_slot, Conn};
use crate::error::Error;
use crate::resp::{malformed, Reader, Reply};
use crate::value::{self, Entry as StreamEntry};
use crate::{create_group_at, start_id, RedisOptions};

/// How often consumers look for members to remove.
const CLEANUP_EVERY: Duration = Duration::from_secs(60);

/// How often a member looks whether its streams were trimmed past its group (see
/// `warn_if_trimmed_unread`).
const TRIM_CHECK_EVERY: Duration = Duration::from_secs(10);

/// How long a read of a group whose streams are in several cluster slots blocks on one slot
/// before looking at the others.
const MULTI_SLOT_BLOCK: Duration = Duration::from_millis(50);

/// What the consumer and its acker share: entries handed out and not settled, and nacked
/// entries waiting for their redelivery time.
#[derive(Default)]
struct Local {
    /// Looked up twice a message (handed out, settled): with foldhash, not SipHash (~500
    /// instructions a message less, callgrind).
    inflight: foldhash::HashSet<EntryKey>,
    retries: Redeliveries<Retry>,
}

/// An entry: its stream and its id's two numbers.
type EntryKey = (Arc<str>, u64, u64);

impl Local {
    /// Whether this member holds the entry: handling it, or waiting out a nack's backoff.
    fn holds(&self, stream: &Arc<str>, id: &str) -> bool {
        self.inflight.contains(&entry_key(stream, id))
            || self
                .retries
                .iter()
                .any(|r| r.stream == *stream && r.id == id)
    }
}

fn entry_key(stream: &Arc<str>, id: &str) -> EntryKey {
    key_of(stream, value::parse_id(id))
}

fn key_of(stream: &Arc<str>, id: Option<(u64, u64)>) -> EntryKey {
    let (ms, seq) = id.unwrap_or((u64::MAX, u64::MAX));
    (stream.clone(), ms, seq)
}

struct Retry {
    stream: Arc<str>,
    id: String,
    attempt: u32,
    min_idle: Duration,
}

fn lock(local: &Mutex<Local>) -> MutexGuard<'_, Local> {
    // Every update is a single insert or remove: a poisoned lock is still consistent.
    local.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) struct RedisConsumer {
    /// Every command but `XREADGROUP` when there are `readers`; all of them otherwise.
    conn: Conn,
    /// `XREADGROUP` over TCP, a Unix socket or TLS with the feature `tls`: the consumer's own
    /// connections, whose replies are decoded where they lie (`resp`), one a slot of `slots`
    /// (each reads from the cluster node holding its streams). Empty otherwise: `conn` is the
    /// consumer's own connection and reads too.
    readers: Vec<Reader>,
    streams: Vec<Arc<str>>,
    /// The streams by cluster slot (one group on a single server): one `XREADGROUP` reads one
    /// slot's streams.
    slots: Vec<Vec<Arc<str>>>,
    /// The slot whose streams the next read looks at first.
    next_slot: usize,
    group: String,
    me: String,
    start: StartFrom,
    claim_idle: Option<Duration>,
    /// Per stream, where the next look for idle entries of other members continues.
    claim_cursor: HashMap<Arc<str>, String>,
    /// Per stream, the newest entry id this member read: a group that vanished is created again
    /// from there.
    last_read: HashMap<Arc<str>, String>,
    /// Keeps the idle time of this member's entries fresh while it holds them.
    keeper: Option<tokio::task::JoinHandle<()>>,
    /// An `XREADGROUP` was sent and its reply not read: the receive was dropped mid-read, and
    /// the server may have handed this member entries whose reply is gone.
    read_in_flight: bool,
    options: RedisOptions,
    /// Per stream, where the re-read of this member's own pending entries continues; `None`
    /// once done. Set again after a connection error.
    resume: Option<BTreeMap<Arc<str>, String>>,
    local: Arc<Mutex<Local>>,
    acker: Arc<RedisAcker>,
    next_claim: Instant,
    next_cleanup: Instant,
    next_trim_check: Instant,
    /// Per stream, how many entries lost to trimming this member last warned of.
    trim_warned: HashMap<Arc<str>, u64>,
}

impl RedisConsumer {
    pub(crate) fn new(
        conn: Conn,
        reader: Option<Reader>,
        shared: Conn,
        subscription: &Subscription,
        options: RedisOptions,
    ) -> Self {
        let local = Arc::new(Mutex::new(Local::default()));
        let streams: Vec<Arc<str>> = subscription
            .topics
            .iter()
            .map(|t| Arc::from(t.as_str()))
            .collect();
        let slots = by_slot(&conn, streams.iter().cloned());
        // One reader a slot: on a cluster, slots on different nodes read by one would move it
        // from node to node at every read.
        let readers = match reader {
            Some(first) => {
                let mut readers: Vec<Reader> = (1..slots.len()).map(|_| first.another()).collect();
                readers.insert(0, first);
                readers
            }
            None => Vec::new(),
        };
        let keeper = subscription.claim_idle.map(|idle| {
            tokio::spawn(keep_fresh(
                shared.clone(),
                subscription.group.clone(),
                subscription.consumer.clone(),
                local.clone(),
                (idle / 3).clamp(Duration::from_millis(100), Duration::from_secs(10)),
            ))
        });
        let mut consumer = RedisConsumer {
            conn,
            readers,
            group: subscription.group.clone(),
            me: subscription.consumer.clone(),
            start: subscription.start,
            claim_idle: subscription.claim_idle,
            claim_cursor: HashMap::new(),
            last_read: HashMap::new(),
            keeper,
            read_in_flight: false,
            options,
            resume: None,
            acker: Arc::new(RedisAcker {
                conn: shared,
                group: subscription.group.clone(),
                local: local.clone(),
            }),
            local,
            next_claim: Instant::now(),
            next_cleanup: Instant::now(),
            next_trim_check: Instant::now(),
            trim_warned: HashMap::new(),
            streams,
            slots,
            next_slot: 0,
        };
        consumer.restart_resume();
        consumer
    }

    fn restart_resume(&mut self) {
        self.resume = Some(
            self.streams
                .iter()
                .map(|s| (s.clone(), "-".to_owned()))
                .collect(),
        );
    }

    /// The delivery of `entry`; its key goes in `taken`, for the caller to put in `inflight`
    /// under one lock for all the entries of a read.
    fn delivery(
        &self,
        stream: &Arc<str>,
        entry: StreamEntry,
        attempt: u32,
        taken: &mut Vec<EntryKey>,
    ) -> Option<Delivery> {
        Some(delivery(
            &self.acker,
            stream,
            &entry.id,
            value::fields(&mut entry.fields?),
            attempt,
            taken,
        ))
    }

    async fn query(&mut self, cmd: &redis::Cmd, what: &str) -> Result<Value, Error> {
        cmd.query_async(&mut self.conn)
            .await
            .map_err(|e| Error::redis(what.to_owned(), e))
    }

    /// Redelivers nacked entries whose backoff has passed.
    async fn redeliver_due(&mut self, max: usize, out: &mut Vec<Delivery>) -> Result<(), Error> {
        let now = Instant::now();
        let due = lock(&self.local)
            .retries
            .take_due(now, max.saturating_sub(out.len()));
        let mut due = due.into_iter();
        while let Some(r) = due.next() {
            let ids = [(r.id.clone(), r.attempt + 1)];
            // The keeper, when there is one, has kept resetting the entry's idle time while it
            // waited: its idle time is not its wait, and asking for that much claimed nothing
            // (it then came back only by the claim of idle entries, `claim_idle` later).
            let min_idle = if self.keeper.is_some() {
                Duration::ZERO
            } else {
                r.min_idle
            };
            if let Err(e) = self.claim_ids(&r.stream, min_idle, &ids, out).await {
                // Not claimed: they wait again, due at once.
                let mut local = lock(&self.local);
                for r in std::iter::once(r).chain(due) {
                    local.retries.push(now, r);
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Reads up to `count` new entries, blocking up to `block` when given and nothing came.
    ///
    /// Streams in several cluster slots cannot be read by one command: each slot's streams are
    /// read in turn without blocking, starting with a different slot each time, and only when
    /// all were empty the read blocks, on one slot for at most [`MULTI_SLOT_BLOCK`].
    async fn read_new(
        &mut self,
        count: usize,
        block: Option<Duration>,
        out: &mut Vec<Delivery>,
    ) -> Result<(), Error> {
        let n = self.slots.len();
        if n <= 1 {
            return self.read_slot(0, count, block, out).await;
        }
        let first = self.next_slot % n;
        self.next_slot = first + 1;
        let limit = out.len() + count;
        for k in 0..n {
            if out.len() >= limit {
                return Ok(());
            }
            self.read_slot((first + k) % n, limit - out.len(), None, out)
                .await?;
        }
        if out.is_empty() {
            if let Some(block) = block {
                let block = block.min(MULTI_SLOT_BLOCK);
                self.read_slot(first, count, Some(block), out).await?;
            }
        }
        Ok(())
    }

    /// Reads new entries of the streams of `self.slots[slot]`, blocking up to `block` when given.
    async fn read_slot(
        &mut self,
        slot: usize,
        count: usize,
        block: Option<Duration>,
        out: &mut Vec<Delivery>,
    ) -> Result<(), Error> {
        let streams = &self.slots[slot];
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.group)
            .arg(&self.me)
            .arg("COUNT")
            .arg(count);
        if let Some(block) = block {
            cmd.arg("BLOCK").arg((block.as_millis() as u64).max(1));
        }
        cmd.arg("STREAMS");
        for s in streams {
            cmd.arg(&**s);
        }
        for _ in streams {
            cmd.arg(">");
        }
        if let Some(reader) = self.readers.get_mut(slot) {
            self.read_in_flight = true;
            let reply = reader.query(&cmd).await;
            self.read_in_flight = false;
            let read = reply.and_then(|mut reply| {
                read_reply(
                    &mut reply,
                    &self.streams,
                    &self.acker,
                    &self.local,
                    &mut self.last_read,
                    out,
                )
            });
            match read {
                // A cluster's slot being moved: the client library follows `ASK` (and waits
                // out `TRYAGAIN`), the reader does not.
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::Server(ServerErrorKind::Ask | ServerErrorKind::TryAgain)
                    ) =>
                {
                    tracing::debug!(group = %self.group, error = %e, "a read during a slot's move; read by the client library");
                }
                read => {
                    return self
                        .unblocked(read.map_err(|e| Error::redis("XREADGROUP", e)))
                        .map(drop)
                }
            }
        }
        self.read_in_flight = true;
        let reply = self.query(&cmd, "XREADGROUP").await;
        self.read_in_flight = false;
        let Some(reply) = self.unblocked(reply)? else {
            return Ok(());
        };
        for (name, entries) in value::streams(reply) {
            let Some(stream) = self.streams.iter().find(|s| ***s == *name).cloned() else {
                continue;
            };
            if let Some(last) = entries.last() {
                self.last_read.insert(stream.clone(), last.id.clone());
            }
            let mut taken = Vec::with_capacity(entries.len());
            for entry in entries {
                if let Some(d) = self.delivery(&stream, entry, 1, &mut taken) {
                    out.push(d);
                }
            }
            lock(&self.local).inflight.extend(taken);
        }
        Ok(())
    }

    /// A read's result, `None` if the server ended the blocked read: the stream went away
    /// under it (deleted, or moved to another cluster master by a reshard). Nothing was read;
    /// the next read finds it (following `MOVED`) or creates the group again (`NOGROUP`).
    fn unblocked<T>(&self, read: Result<T, Error>) -> Result<Option<T>, Error> {
        match read {
            Err(e) if e.redis_code() == Some("UNBLOCKED") => {
                tracing::info!(group = %self.group, error = %e, "blocked read ended by the server; reading again");
                Ok(None)
            }
            read => read.map(Some),
        }
    }

    /// How long the next read may block: until the next redelivery or claim is due.
    fn block_for(&self) -> Duration {
        let now = Instant::now();
        let mut until = now + self.options.block;
        if let Some(r) = lock(&self.local).retries.next_due() {
            until = until.min(r);
        }
        if self.claim_idle.is_some() {
            until = until.min(self.next_claim);
        }
        until.saturating_duration_since(now)
    }

    /// Forgets what this call took (it stays pending in Redis) and re-reads own pending entries
    /// next time.
    fn forget(&mut self, out: Vec<Delivery>) {
        let mut local = lock(&self.local);
        for d in &out {
            local
                .inflight
                .remove(&entry_key(d.topic_arc(), d.broker_id()));
        }
        drop(local);
        self.restart_resume();
    }

    fn fail(&mut self, out: Vec<Delivery>, e: Error) -> cqrs_core::Error {
        self.forget(out);
        e.into()
    }

    async fn gather(&mut self, max: usize, out: &mut Vec<Delivery>) -> Result<(), Error> {
        self.resume_own(max, out).await?;
        if out.len() < max {
            self.redeliver_due(max, out).await?;
        }
        let now = Instant::now();
        if let Some(idle) = self.claim_idle {
            if out.len() < max && now >= self.next_claim {
                self.claim_idle_entries(idle, max, out).await?;
                let every = (idle / 2).clamp(Duration::from_millis(50), Duration::from_secs(5));
                self.next_claim = now + every;
            }
        }
        if now >= self.next_cleanup {
            self.next_cleanup = now + CLEANUP_EVERY;
            if let Err(e) = self.remove_idle_consumers().await {
                tracing::warn!(group = %self.group, error = %e, "removing idle consumers failed");
            }
        }
        if now >= self.next_trim_check {
            self.next_trim_check = now + TRIM_CHECK_EVERY;
            if let Err(e) = self.warn_if_trimmed_unread().await {
                tracing::debug!(group = %self.group, error = %e, "looking for trimmed entries failed");
            }
        }
        if out.len() < max {
            let block = if out.is_empty() {
                let b = self.block_for();
                (!b.is_zero()).then_some(b)
            } else {
                None
            };
            self.read_new(max - out.len(), block, out).await?;
        }
        Ok(())
    }
}

#[async_trait]
impl Consumer for RedisConsumer {
    async fn receive(&mut self, max: usize) -> cqrs_core::Result<Vec<Delivery>> {
        let max = max.max(1);
        if self.read_in_flight {
            // The last receive was dropped mid-read. Its entries are pending for this member;
            // re-read them (on this connection, so after the abandoned read has finished; with
            // a reader of its own, once that has read the abandoned reply).
            for reader in &mut self.readers {
                reader.settle().await;
            }
            // Cleared after: a receive dropped during the settle settles again.
            self.read_in_flight = false;
            self.restart_resume();
        }
        loop {
            let mut out = Vec::new();
            match self.gather(max, &mut out).await {
                Ok(()) => {}
                Err(e) if e.redis_code() == Some("NOGROUP") => {
                    // The stream or group vanished (a server restart without persistence, a
                    // DEL, an XGROUP DESTROY): create it again after the last entry this member
                    // read (nothing old comes back, nothing newer is skipped), else where the
                    // subscription starts.
                    tracing::warn!(group = %self.group, "consumer group missing; creating it again");
                    self.forget(out);
                    for s in self.streams.clone() {
                        let from = self
                            .last_read
                            .get(&s)
                            .map_or(start_id(self.start), String::as_str)
                            .to_owned();
                        if let Err(e) =
                            create_group_at(&mut self.conn, &s, &self.group, &from).await
                        {
                            return Err(e.into());
                        }
                    }
                    continue;
                }
                Err(e) => return Err(self.fail(out, e)),
            }
            if !out.is_empty() {
                return Ok(out);
            }
        }
    }
}

impl Drop for RedisConsumer {
    fn drop(&mut self) {
        if let Some(keeper) = self.keeper.take() {
            keeper.abort();
        }
    }
}

/// Every `every`, resets the idle time of the entries this member holds (being handled, or
/// waiting for a retry) with `XCLAIM ... JUSTID`, which leaves their delivery counts alone: a
/// live member's entries are never idle long enough for another member to claim them, however
/// long they wait in its queues or its handler runs.
async fn keep_fresh(
    mut conn: Conn,
    group: String,
    me: String,
    local: Arc<Mutex<Local>>,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let held: BTreeMap<Arc<str>, Vec<String>> = {
            let local = lock(&local);
            let mut held: BTreeMap<Arc<str>, Vec<String>> = BTreeMap::new();
            for (stream, ms, seq) in &local.inflight {
                held.entry(stream.clone())
                    .or_default()
                    .push(format!("{ms}-{seq}"));
            }
            for r in local.retries.iter() {
                held.entry(r.stream.clone()).or_default().push(r.id.clone());
            }
            held
        };
        for (stream, ids) in held {
            for chunk in ids.chunks(500) {
                let mut cmd = redis::cmd("XCLAIM");
                cmd.arg(&*stream).arg(&group).arg(&me).arg(0).arg(chunk);
                cmd.arg("JUSTID");
                if let Err(e) = cmd.query_async::<Value>(&mut conn).await {
                    tracing::warn!(%stream, %group, error = %e, "refreshing held entries failed");
                }
            }
        }
    }
}

/// The message in a stream entry's fields as the server sent them (their values moved into it
/// rather than copied), and the reason when it is malformed.
pub(crate) fn decode(id: &str, fields: &mut redis::Value) -> (cqrs_core::Message, Option<String>) {
    decode_at(
        id,
        value::parse_id(id).map(|(ms, _)| ms),
        value::fields(fields),
    )
}

/// [`decode`] of fields given as byte pairs (the fuzz targets').
#[cfg(feature = "fuzzing")]
pub(crate) fn decode_pairs(
    id: &str,
    mut fields: Vec<(Vec<u8>, Vec<u8>)>,
) -> (cqrs_core::Message, Option<String>) {
    let fields = fields.iter_mut().map(|(k, v)| (&k[..], std::mem::take(v)));
    decode_at(id, value::parse_id(id).map(|(ms, _)| ms), fields)
}

/// [`decode`] with the time of the entry's id, read already. The values are moved into the
/// message, not copied: the reply's buffers become its id, name, key and payload.
fn decode_at<'a, V: FieldValue>(
    id: &str,
    time_ms: Option<u64>,
    fields: impl IntoIterator<Item = (&'a [u8], V)>,
) -> (cqrs_core::Message, Option<String>) {
    Layout::REDIS.decode(fields, Entry { id, time_ms }, None::<&[u8]>, None)
}

/// The delivery of the entry `id` of `stream` with `fields`; its key goes in `taken`, for the
/// caller to put in `inflight` under one lock for all the entries of a read.
fn delivery<'a, V: FieldValue>(
    acker: &Arc<RedisAcker>,
    stream: &Arc<str>,
    id: &str,
    fields: impl IntoIterator<Item = (&'a [u8], V)>,
    attempt: u32,
    taken: &mut Vec<EntryKey>,
) -> Delivery {
    // Read once for the message's time and the entry's key.
    let parsed = value::parse_id(id);
    let (message, malformed) = decode_at(id, parsed.map(|(ms, _)| ms), fields);
    taken.push(key_of(stream, parsed));
    let d = Delivery::new(stream.clone(), message, attempt, id, acker.clone());
    match malformed {
        Some(reason) => d.with_malformed(reason),
        None => d,
    }
}

/// The deliveries of an `XREADGROUP` reply read by a [`Reader`]: `[[stream, [[id, [field,
/// value, ...]], ...]], ...]`, nil when nothing came. Entries of streams not read and deleted
/// entries (nil fields) are passed over; fields whose name is not text too.
fn read_reply(
    reply: &mut Reply<'_>,
    streams: &[Arc<str>],
    acker: &Arc<RedisAcker>,
    local: &Mutex<Local>,
    last_read: &mut HashMap<Arc<str>, String>,
    out: &mut Vec<Delivery>,
) -> redis::RedisResult<()> {
    for _ in 0..reply.array()?.unwrap_or(0) {
        if reply.array()? != Some(2) {
            return Err(malformed("a stream's entry is not [name, entries]").into());
        }
        let name = reply.bulk()?.unwrap_or_default();
        let stream = streams.iter().find(|s| s.as_bytes() == name).cloned();
        let n = reply.array()?.unwrap_or(0);
        let Some(stream) = stream else {
            for _ in 0..n {
                reply.skip()?;
            }
            continue;
        };
        let mut taken = Vec::with_capacity(n);
        let mut last = None;
        for _ in 0..n {
            if reply.array()? != Some(2) {
                return Err(malformed("an entry is not [id, fields]").into());
            }
            let id = std::str::from_utf8(reply.bulk()?.unwrap_or_default())
                .map_err(|_| malformed("an entry id that is not text"))?;
            // The newest read, deleted or not (as on the client library's path).
            last = Some(id);
            let Some(len) = reply.array()? else {
                // Deleted since it was added to the group's pending list.
                continue;
            };
            // Read where they lie, not gathered into a list first.
            let mut fields = Fields {
                reply: &mut *reply,
                left: len,
                failed: None,
            };
            let d = delivery(acker, &stream, id, &mut fields, 1, &mut taken);
            fields.finish()?;
            out.push(d);
        }
        if let Some(last) = last {
            last_read.insert(stream.clone(), last.to_owned());
        }
        lock(local).inflight.extend(taken);
    }
    Ok(())
}

/// An entry's fields in a [`Reply`], `(name, value)`: those whose value is not nil (a name is
/// not checked as text here: see [`value::fields`]). A value is a part of the reply: the message
/// keeps it without a copy.
struct Fields<'r, 'a> {
    reply: &'r mut Reply<'a>,
    /// Items of the field list not read yet.
    left: usize,
    failed: Option<redis::RedisError>,
}

impl<'a> Iterator for Fields<'_, 'a> {
    type Item = (&'a [u8], Part<'a>);

    fn next(&mut self) -> Option<Self::Item> {
        while self.left >= 2 && self.failed.is_none() {
            self.left -= 2;
            match (self.reply.bulk(), self.reply.bulk_part()) {
                (Ok(Some(k)), Ok(Some(v))) => return Some((k, v)),
                (Err(e), _) | (_, Err(e)) => self.failed = Some(e),
                _ => continue,
            }
        }
        None
    }
}

impl Fields<'_, '_> {
    /// Passes over what the decoder did not read; the first error reading them, if any.
    fn finish(mut self) -> redis::RedisResult<()> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        for _ in 0..self.left {
            self.reply.skip()?;
        }
        Ok(())
    }
}
