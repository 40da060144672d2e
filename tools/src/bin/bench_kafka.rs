//! Benchmark: plain `rdkafka` against our typed bus and processor, in one run, on the same
//! Kafka-protocol broker.
//!
//! Run with: `cargo run --release -p cqrs-tools --bin bench_kafka`: on the broker at
//! `KAFKA_BROKERS` if set, else on an Apache Kafka of its own (`scripts/kafka`, installed on first
//! use). `BENCH_N` sets the event count (default 100,000), `BENCH_ROUNDS` the rounds (default 3);
//! The raw producer sends the two headers ours sends (`cqrs-id`, `cqrs-name`; `RAW_HEADERS=0`:
//! none), and the raw consumer reads the name, as ours does to choose the handler.
//! `BENCH_FRESH_BROKER=1` starts a fresh Apache Kafka for every round. A broker of its own keeps
//! its log in `/dev/shm` where there is one (`BENCH_KAFKA_DIR` sets the directory). Each run
//! begins with `BENCH_WARMUP` rounds (default 1; 0 with `BENCH_FRESH_BROKER`) that measure every
//! figure and count none.
//! `BENCH_PUBLISH_ONLY=1` runs the publishing figure alone. `BENCH_TIMINGS=1` prints when our
//! processors started, handled their first event and handled all of them;
//! `BENCH_PROFILE_CONSUME=1` publishes, then runs our consumer alone after a 3 s pause (for a
//! profiler attached by pid). `BENCH_KAFKA_MAX_UNRECORDED`, `BENCH_KAFKA_COMMIT_EVERY` and `BENCH_KAFKA_PROTOCOL`
//! (`eager`, `cooperative`) change our backend's settings for experiments; `BENCH_KAFKA_DEBUG`
//! sets librdkafka's `debug` (its lines show with `RUST_LOG=librdkafka=debug`);
//! `BENCH_KAFKA_SET=key=value,key=value` sets any librdkafka setting of ours (producer and
//! consumer), `BENCH_RAW_SET` of the raw consumers. `BENCH_RATE=R` publishes in batches at R
//! events a second on both sides (publishing in batches and end to end): what an event costs in
//! CPU (this process's, and the broker's read from `/proc`) at a rate both keep up with, rather
//! than how fast each goes on two cores it shares with the broker. `BENCH_COMMIT_COST=R` (with
//! `BENCH_BROKER_PID`) measures what R offset commits a second cost the broker's CPU, against
//! none (`commit_cost`). `BENCH_E2E_WARM=W` runs end to end with its consumer running first,
//! as the OpenMessaging Benchmark does before it measures: W events (numbered after the timed
//! ones) are published and handled before the clock starts, and the figure is from the timed
//! publishing's start to the last event handled. The group's join and our dead-letter topic's
//! creation are then outside it. 0, the default: consumer and publisher start at once, timed
//! from the consumer's start (end to end's figure in docs/benchmarks.md). It applies to the
//! full run's end to end and to `BENCH_ONLY=e2e-raw|e2e-ours`, not to the mixed `e2e-*` phases.
//!
//! `BENCH_ONLY=publish-raw|publish-ours|publish-one-raw|publish-one-ours|consume-raw|consume-ours|consume-backend|e2e-raw|e2e-ours|e2e-raw-ours|e2e-ours-raw`
//! with `BENCH_TOPIC=T` runs one phase alone, for an instruction count (`valgrind
//! --tool=callgrind`, at two sizes so that the set-up cancels out): `publish-*` puts `BENCH_N`
//! events on `T` (`publish-one-*` one per call from 64 tasks); each `consume-*` reads
//! `BENCH_N` of them in a new group (from a topic with exactly that many, published by ours),
//! with `BENCH_MEMBERS` members (1 unless set; `BENCH_BATCH` sets ours' batch size, 500 unless
//! set, `BENCH_CONCURRENCY` its handler's concurrency, 1 unless set); `consume-backend` is our
//! backend's consumer alone, without the processor (one member);
//! `consume-raw-threaded` is a raw consumer built as ours is (a poll thread handing batches to a
//! task, `Bench::raw_threaded_consume`), for experiments;
//! `e2e-*` publishes and consumes `BENCH_N` at once on a new topic named from `T` (deleted after),
//! and prints when the publishing ended and the last event was handled (`e2e-raw-ours`: raw
//! publishing, our consuming; `e2e-ours-raw` the other way round; `e2e-raw-threaded` raw
//! publishing, the threaded raw consumer; `e2e-raw-backend` raw publishing, our backend's
//! consumer alone), with this process's CPU since it started, and with `BENCH_BROKER_PID` (the
//! broker's process id, on this machine) the CPU the broker spent in the phase.
//!
//! Each round measures every figure in both orders, A, B, B, A (A is raw in odd rounds), and
//! gives each side the mean of its two runs (`support::both_orders`); a run that publishes does
//! so on topics of its own, made with the others of its figure before the first run. The side
//! measured second ran faster. In 21 rounds that measured each figure once, raw and ours taking
//! turns to go first by round, ours/raw for publishing in batches was 0.92 in the rounds where
//! ours went first and 1.23 where raw did; one per call 0.94 and 1.10; end to end 0.84 and 1.08;
//! and three rounds gave the second place to ours twice. Publishing in pairs on fresh topics, six
//! rounds each way, raw took 568 ms (median) and ours 502 with raw first, 571 and 549 with ours
//! first. Neither a pause of one second before each side (publishing 0.97 and 1.12 over 21
//! rounds; this process and the broker, sampled every 100 ms, were all but idle in it) nor a
//! second between making the topics and publishing (1.06 and 1.21 over 12) nor a record written
//! to every partition first removed it. What the first run leaves for the second is not known,
//! so both orders are measured.
//!
//! Each round also prints the CPU time this process spent publishing on each side (a run's).
//!
//! Every group the benchmark makes, raw's and ours', gets the broker's group setting
//! `consumer.heartbeat.interval.ms=100` before its members start (`BENCH_GROUP_SET=key=value,...`
//! sets others; empty: none). At the test broker's 500 ms, the heartbeats' phase decided the
//! two-member figure on both sides: the first member is told to give up two partitions at once
//! or a heartbeat later, and the second gets them only at its own next heartbeat, so a round ran
//! at ~135,000/s or ~380,000/s by lottery.
//!
//! Events are ~1 KiB of JSON, on topics of 4 partitions. Both sides use the same producer settings
//! (idempotent, `linger.ms=0`; `BENCH_KAFKA_LINGER_MS` sets it for both; each connected, the
//! cluster's metadata fetched, before it is timed) and consumer settings (`fetch.wait.max.ms=10`, KIP-848's group
//! protocol, offsets stored per record and committed every 100 ms). Raw publishing
//! queues 1,000 `FutureRecord`s (JSON-encoded, keyed) and awaits their deliveries; ours calls
//! `EventBus::publish_all` with 1,000 events. Publishing one per call, 64 tasks each send one
//! record and await its delivery (`FutureProducer::send`) before the next; ours, 64 tasks each
//! call `EventBus::publish` (on fresh topics, after the other figures of the round). Raw consuming is a `StreamConsumer` that decodes
//! each payload into the event type and stores its offset; ours is an `EventProcessor` handler.
//!
//! Ours also commits once 250 are handled since its last commit (`KafkaConfig::commit_every`,
//! one commit at a time): what bounds the work a member killed at full speed leaves to be done
//! again. The raw consumers make the same commits, from a thread of their own as ours does
//! (`Bench::raw_consume_members`): the same acknowledgements, for the same bound.
//! `BENCH_RAW_COMMIT_EVERY=0` leaves them the 100 ms interval alone, as before 2026-12-05's
//! twenty-second session (end to end read ~0.95 of raw either way over 26 runs and 13,
//! docs/benchmarks.md); `BENCH_KAFKA_COMMIT_EVERY` sets the count for both.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cqrs::kafka::{rdkafka, KafkaBackend, KafkaConfig};
use cqrs::{BoxError, CancellationToken, Event, EventBus, EventProcessor, TopicNamer};
use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize};

use cqrs_tools::support;

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
struct Reading {
    #[event(key)]
    sensor: String,
    seq: u64,
    blob: String,
}

fn event(i: u64) -> Reading {
    let mut r = Reading {
        sensor: format!("sensor-{:03}", i % 100),
        seq: i,
        blob: String::new(),
    };
    let len = serde_json::to_vec(&r).map(|v| v.len()).unwrap_or(0);
    r.blob = "x".repeat(1024usize.saturating_sub(len));
    r
}

const CHUNK: usize = 1000;

/// A count of events handled that a consuming run announces: end to end's warm-up.
#[derive(Clone)]
struct Mark {
    at: usize,
    reached: Arc<tokio::sync::Notify>,
}

impl Mark {
    fn new(at: usize) -> Self {
        Mark {
            at,
            reached: Arc::new(tokio::sync::Notify::new()),
        }
    }
}

/// A consuming run's times: from its start to the last event handled, and that moment.
struct Consumed {
    elapsed: Duration,
    last: Instant,
}

/// End to end's figure from its consumer's times and its publishing's
/// ([`Bench::warmed_up`]): from the timed publishing's start to the last event handled, or
/// without a warm-up the consumer's own time (started with the publishing). With the time the
/// timed publishing took.
fn end_to_end(
    c: Consumed,
    (start, published): (Option<Instant>, Duration),
) -> (Duration, Duration) {
    (start.map_or(c.elapsed, |s| c.last - s), published)
}

/// Our consumer's count-based commits in this benchmark: `BENCH_KAFKA_COMMIT_EVERY`, else
/// `KafkaConfig::new`'s default (250, `KafkaConfig::commit_every`). The raw consumers make the
/// same unless `BENCH_RAW_COMMIT_EVERY` says otherwise.
fn ours_commit_every() -> usize {
    support::env_or("BENCH_KAFKA_COMMIT_EVERY", 250)
}

/// The raw consumers' count-based commits ([`Bench::raw_consume_members`]):
/// `BENCH_RAW_COMMIT_EVERY` (0: none, the 100 ms interval only), else ours'.
fn raw_commit_every() -> usize {
    support::env_or("BENCH_RAW_COMMIT_EVERY", ours_commit_every())
}

/// The most records a consumer here takes at once: ours' batch size (`BENCH_BATCH` sets it for
/// ours), our backend's alone and the threaded raw consumer's.
const BATCH: usize = 500;

/// The tasks publishing one event per call (as a web service does, one per request).
const TASKS: usize = 64;

/// The raw side's record of `e`: keyed by its sensor, with the two headers ours writes
/// (`cqrs-id`, `cqrs-name`) unless `headers` is off.
fn raw_record<'a>(
    topic: &'a str,
    e: &'a Reading,
    payload: &'a [u8],
    headers: bool,
) -> FutureRecord<'a, String, [u8]> {
    let record = FutureRecord::to(topic).key(&e.sensor).payload(payload);
    if !headers {
        return record;
    }
    let id = cqrs::new_message_id();
    record.headers(
        rdkafka::message::OwnedHeaders::new()
            .insert(rdkafka::message::Header {
                key: "cqrs-id",
                value: Some(id.as_str()),
            })
            .insert(rdkafka::message::Header {
                key: "cqrs-name",
                value: Some(<Reading as Event>::NAME),
            }),
    )
}

/// The producers' `linger.ms`, both sides: `BENCH_KAFKA_LINGER_MS`, else 0 (ours's default).
fn linger_ms() -> String {
    std::env::var("BENCH_KAFKA_LINGER_MS").unwrap_or_else(|_| "0".to_owned())
}

/// Whether the raw side writes and reads the headers ours does (`RAW_HEADERS=0`: not).
fn raw_headers() -> bool {
    std::env::var("RAW_HEADERS").as_deref() != Ok("0")
}

struct Bench {
    brokers: String,
    n: usize,
    /// Sets each group's settings ([`Bench::group_settings`]) and deletes the topics made: one
    /// client for all of it.
    admin: AdminClient<DefaultClientContext>,
    /// `BENCH_RATE`, read once: events a second both sides publish at ([`Bench::paced`]).
    rate: Option<f64>,
    /// `BENCH_E2E_WARM`, read once: the events an end-to-end run's consumer handles before its
    /// clock starts ([`Bench::raw_end_to_end`]; 0: none, consumer and publisher start at once).
    warm: usize,
}

impl Bench {
    fn new(brokers: &str, n: usize) -> Result<Self, BoxError> {
        let admin = support::kafka_admin(brokers)?;
        Ok(Bench {
            brokers: brokers.to_owned(),
            n,
            admin,
            rate: support::env::<f64>("BENCH_RATE").filter(|r| *r > 0.0),
            warm: support::env_or("BENCH_E2E_WARM", 0),
        })
    }

    /// The raw producer, connected: it has fetched the cluster's metadata, as
    /// `KafkaBackend::connect` has before ours publishes. Created cold, right before its phase
    /// (as `BENCH_ONLY` runs did until the sixteenth session), its first records waited for the
    /// connection: publishing one per call alone took raw 1.84-2.41 s against ours' 1.36-1.90
    /// (three runs each, 100,000 events).
    async fn producer(&self) -> Result<FutureProducer, BoxError> {
        let producer: FutureProducer = raw_client(&self.brokers)
            .set("enable.idempotence", "true")
            .set("linger.ms", linger_ms())
            .set("message.timeout.ms", "30000")
            .create()?;
        let connecting = producer.clone();
        tokio::task::spawn_blocking(move || {
            connecting
                .client()
                .fetch_metadata(None, Duration::from_secs(10))
                .map(|_| ())
        })
        .await??;
        Ok(producer)
    }

    /// With `BENCH_RATE` (events a second) set, waits until `done` events are due since
    /// `start`: publishing in batches at a set rate, both sides alike, for the CPU an event costs
    /// at that rate (this process's and the broker's) rather than how fast a side goes on two
    /// cores it shares with the broker.
    async fn paced(&self, start: Instant, done: usize) {
        if let Some(rate) = self.rate {
            let due = start + Duration::from_secs_f64(done as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
        }
    }

    async fn raw_publish(
        &self,
        producer: &FutureProducer,
        topic: &str,
    ) -> Result<Duration, BoxError> {
        self.raw_publish_events(producer, topic, 0..self.n as u64)
            .await
    }

    /// [`Bench::raw_publish`] of the events numbered `events`.
    async fn raw_publish_events(
        &self,
        producer: &FutureProducer,
        topic: &str,
        events: std::ops::Range<u64>,
    ) -> Result<Duration, BoxError> {
        let events: Vec<Reading> = events.map(event).collect();
        let headers = raw_headers();
        let start = Instant::now();
        for (i, chunk) in events.chunks(CHUNK).enumerate() {
            let mut pending = Vec::with_capacity(chunk.len());
            for e in chunk {
                let payload = serde_json::to_vec(e)?;
                let mut record = raw_record(topic, e, &payload, headers);
                loop {
                    match producer.send_result(record) {
                        Ok(d) => break pending.push(d),
                        Err((e, r))
                            if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) =>
                        {
                            record = r;
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                        Err((e, _)) => return Err(e.into()),
                    }
                }
            }
            for d in pending {
                d.await?.map_err(|(e, _)| e)?;
            }
            self.paced(start, i * CHUNK + chunk.len()).await;
        }
        Ok(start.elapsed())
    }

    /// One awaited send per event from [`TASKS`] tasks, on one producer: the record as in
    /// [`Bench::raw_publish`], each task waiting for its record's delivery before the next.
    async fn raw_publish_one_by_one(
        &self,
        producer: &FutureProducer,
        topic: &str,
    ) -> Result<Duration, BoxError> {
        let headers = raw_headers();
        let (producer, topic) = (producer.clone(), topic.to_owned());
        support::one_by_one(self.n, TASKS, move |i| {
            let (producer, topic) = (producer.clone(), topic.clone());
            async move {
                let e = event(i);
                let payload = serde_json::to_vec(&e)?;
                let record = raw_record(&topic, &e, &payload, headers);
                // Waits for room when librdkafka's queue is full, as ours does.
                producer
                    .send(record, rdkafka::util::Timeout::Never)
                    .await
                    .map_err(|(e, _)| e)?;
                Ok(())
            }
        })
        .await
    }

    /// Raw publishing and consuming `n` at once on `topic` (new, empty): how long until the
    /// last record was handled, and until the last was published (both start at once).
    async fn raw_end_to_end(
        &self,
        producer: &FutureProducer,
        topic: &str,
    ) -> Result<(Duration, Duration), BoxError> {
        let warm = Mark::new(self.warm);
        let (c, p) = tokio::join!(
            self.raw_consume_marked(topic, self.warm + self.n, 1, Some(&warm)),
            self.warmed_up(&warm, |events| self
                .raw_publish_events(producer, topic, events))
        );
        let (c, p) = end_to_end(c?, p?);
        if std::env::var("BENCH_TIMINGS").is_ok() {
            eprintln!("raw end to end: published in {p:?}, last handled after {c:?}");
        }
        Ok((c, p))
    }

    /// End to end's publishing: the [`Bench::warm`] events numbered from `n` first, then, once
    /// the consumer has handled them (`warm`), the `n` timed ones. When the timed publishing
    /// started (`None` without a warm-up: the figure is then the consumer's own time, started
    /// with it), and how long it took.
    async fn warmed_up<F>(
        &self,
        warm: &Mark,
        publish: impl Fn(std::ops::Range<u64>) -> F,
    ) -> Result<(Option<Instant>, Duration), BoxError>
    where
        F: std::future::Future<Output = Result<Duration, BoxError>>,
    {
        let n = self.n as u64;
        if warm.at == 0 {
            return Ok((None, publish(0..n).await?));
        }
        publish(n..n + warm.at as u64).await?;
        warm.reached.notified().await;
        let start = Instant::now();
        Ok((Some(start), publish(0..n).await?))
    }

    /// [`Bench::raw_end_to_end`] with our bus and processor.
    async fn ours_end_to_end(
        &self,
        backend: &KafkaBackend,
        topic: &str,
    ) -> Result<(Duration, Duration), BoxError> {
        let bus = bus_on(backend, topic);
        let warm = Mark::new(self.warm);
        let (c, p) = tokio::join!(
            self.ours_consume_marked(backend, topic, self.warm + self.n, 1, Some(&warm)),
            self.warmed_up(&warm, |events| self.ours_publish_events(&bus, events))
        );
        let (c, p) = end_to_end(c?, p?);
        if std::env::var("BENCH_TIMINGS").is_ok() {
            eprintln!("ours end to end: published in {p:?}, last handled after {c:?}");
        }
        Ok((c, p))
    }

    /// One `EventBus::publish` per event from [`TASKS`] tasks.
    async fn ours_publish_one_by_one(&self, bus: &EventBus) -> Result<Duration, BoxError> {
        support::publish_one_by_one(bus, self.n, TASKS, event).await
    }

    async fn ours_publish(&self, bus: &EventBus) -> Result<Duration, BoxError> {
        self.ours_publish_events(bus, 0..self.n as u64).await
    }

    /// [`Bench::ours_publish`] of the events numbered `events`.
    async fn ours_publish_events(
        &self,
        bus: &EventBus,
        events: std::ops::Range<u64>,
    ) -> Result<Duration, BoxError> {
        let events: Vec<Reading> = events.map(event).collect();
        let start = Instant::now();
        for (i, chunk) in events.chunks(CHUNK).enumerate() {
            bus.publish_all(chunk).await?;
            self.paced(start, i * CHUNK + chunk.len()).await;
        }
        Ok(start.elapsed())
    }

    async fn raw_consume(&self, topic: &str, n: usize) -> Result<Duration, BoxError> {
        self.raw_consume_members(topic, n, 1).await
    }

    /// The raw consumers' settings, a member of `group`: our backend's (KIP-848's group
    /// protocol, offsets stored per handled record and committed every 100 ms).
    fn raw_consumer(&self, group: &str) -> ClientConfig {
        let mut c = raw_client(&self.brokers);
        c.set("group.id", group)
            .set("group.protocol", "consumer")
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "100")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", "10");
        for (k, v) in support::env_settings("BENCH_RAW_SET") {
            c.set(k, v);
        }
        c
    }

    /// A raw consumer built as ours is, for experiments (`BENCH_ONLY=consume-raw-threaded|
    /// e2e-raw-threaded`): a thread of its own polls a `BaseConsumer` (settings as
    /// [`Bench::raw_consumer`]) and hands the records over in batches of up to 500,
    /// copied into one buffer a batch (payload and name); a task takes the batches, decodes each
    /// payload whose name is the event's and stores its offset. No envelope, no engine: what
    /// the handover between a poll thread and a task costs on its own.
    async fn raw_threaded_consume(&self, topic: &str, n: usize) -> Result<Duration, BoxError> {
        use rdkafka::consumer::BaseConsumer;
        use std::sync::atomic::AtomicBool;
        struct Batch {
            bytes: Vec<u8>,
            /// Partition, offset, payload's end, name's end (each after the one before).
            records: Vec<(i32, i64, usize, usize)>,
        }
        let group = cqrs::conformance::unique("raw-threaded");
        self.group_settings(&group).await?;
        let consumer: Arc<BaseConsumer> = Arc::new(self.raw_consumer(&group).create()?);
        consumer.subscribe(&[topic])?;
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Batch>(4);
        let poller = {
            let (consumer, stop) = (consumer.clone(), stop.clone());
            std::thread::spawn(move || {
                let new_batch = || Batch {
                    bytes: Vec::with_capacity(1 << 20),
                    records: Vec::with_capacity(BATCH),
                };
                let mut batch = new_batch();
                while !stop.load(Ordering::Relaxed) {
                    let mut next = consumer.poll(Duration::from_millis(5));
                    while let Some(Ok(m)) = next {
                        batch
                            .bytes
                            .extend_from_slice(m.payload().unwrap_or_default());
                        let payload_end = batch.bytes.len();
                        let name = m.headers().and_then(|h| {
                            h.iter()
                                .find(|h| h.key == "cqrs-name")
                                .and_then(|h| h.value)
                        });
                        batch.bytes.extend_from_slice(name.unwrap_or_default());
                        batch.records.push((
                            m.partition(),
                            m.offset(),
                            payload_end,
                            batch.bytes.len(),
                        ));
                        if batch.records.len() == BATCH {
                            break;
                        }
                        next = consumer.poll(Duration::ZERO);
                    }
                    if !batch.records.is_empty()
                        && tx
                            .blocking_send(std::mem::replace(&mut batch, new_batch()))
                            .is_err()
                    {
                        return;
                    }
                }
            })
        };
        let start = Instant::now();
        let (mut got, mut elapsed) = (0, None);
        let topic_name = topic.to_owned();
        while let Some(batch) = rx.recv().await {
            let mut at = 0;
            for &(partition, offset, payload_end, name_end) in &batch.records {
                let (payload, name) = (
                    &batch.bytes[at..payload_end],
                    &batch.bytes[payload_end..name_end],
                );
                at = name_end;
                if name == <Reading as Event>::NAME.as_bytes() {
                    let _: Reading = serde_json::from_slice(payload)?;
                }
                consumer.store_offset(&topic_name, partition, offset)?;
                got += 1;
            }
            if got >= n {
                elapsed = Some(start.elapsed());
                break;
            }
        }
        stop.store(true, Ordering::Relaxed);
        drop(rx);
        poller.join().map_err(|_| "the poll thread panicked")?;
        elapsed.ok_or_else(|| "the poll thread ended before the last record".into())
    }

    /// `members` raw consumers of one new group read `n` records between them: our backend's
    /// consumer settings (KIP-848's group protocol, offsets stored per handled record and
    /// committed every 100 ms), and ours' count-based commits ([`raw_commit_every`]): a
    /// thread of each member's own commits its stored offsets once that many records are
    /// handled since it was last asked, one commit at a time, as our backend's committer does.
    async fn raw_consume_members(
        &self,
        topic: &str,
        n: usize,
        members: usize,
    ) -> Result<Duration, BoxError> {
        Ok(self
            .raw_consume_marked(topic, n, members, None)
            .await?
            .elapsed)
    }

    /// [`Bench::raw_consume_members`], announcing `mark` when reached, with the moment the last
    /// record was handled (end to end's).
    async fn raw_consume_marked(
        &self,
        topic: &str,
        n: usize,
        members: usize,
        mark: Option<&Mark>,
    ) -> Result<Consumed, BoxError> {
        let commit_every = raw_commit_every();
        let group = cqrs::conformance::unique("raw");
        self.group_settings(&group).await?;
        let got = Arc::new(AtomicUsize::new(0));
        let start = Instant::now();
        let cpu = support::cpu_time("self");
        let mut tasks = Vec::new();
        // The committers' threads: joined before this returns, so that a consumer whose last
        // reference one holds is closed here, not during the next figure.
        let mut committers = Vec::new();
        for _ in 0..members {
            let consumer: Arc<StreamConsumer> = Arc::new(self.raw_consumer(&group).create()?);
            consumer.subscribe(&[topic])?;
            let got = got.clone();
            let mark = mark.cloned();
            let headers = raw_headers();
            let committer = (commit_every > 0).then(|| {
                let (ask, busy, thread) = raw_committer(consumer.clone());
                committers.push(thread);
                (ask, busy)
            });
            tasks.push(tokio::spawn(async move {
                let (mut first, mut last) = (None, None);
                // Handled since a commit was last asked for.
                let mut since = 0;
                while got.load(Ordering::Relaxed) < n {
                    let m = match tokio::time::timeout(Duration::from_millis(50), consumer.recv())
                        .await
                    {
                        Ok(m) => m?,
                        Err(_) => continue,
                    };
                    // The name chooses what to decode, as in ours.
                    let named = m.headers().is_some_and(|h| {
                        h.iter().any(|h| {
                            h.key == "cqrs-name"
                                && h.value == Some(<Reading as Event>::NAME.as_bytes())
                        })
                    });
                    if named || !headers {
                        let _: Reading = serde_json::from_slice(m.payload().unwrap_or_default())?;
                    }
                    consumer.store_offset_from_message(&m)?;
                    since += 1;
                    if let Some((ask, busy)) = &committer {
                        if since >= commit_every && !busy.swap(true, Ordering::Relaxed) {
                            since = 0;
                            ask.send(()).map_err(|_| "the raw committer ended")?;
                        }
                    }
                    first.get_or_insert_with(|| start.elapsed());
                    let handled = got.fetch_add(1, Ordering::Relaxed) + 1;
                    if handled == n {
                        last = Some(Instant::now());
                    }
                    if let Some(m) = mark.as_ref().filter(|m| handled == m.at) {
                        m.reached.notify_one();
                    }
                }
                Ok::<_, BoxError>((first, last))
            }));
        }
        let (mut first, mut last) = (None, None);
        for t in tasks {
            let (f, l) = t.await??;
            // A member that handled nothing (the other drained the topic first) has no first.
            first = match (first, f) {
                (Some(a), Some(b)) => Some(std::cmp::min(a, b)),
                (a, b) => a.or(b),
            };
            last = last.or(l);
        }
        // The tasks are done, so their senders are dropped and the threads end.
        tokio::task::spawn_blocking(move || {
            committers
                .into_iter()
                .try_for_each(|t| t.join().map_err(|_| "a raw committer panicked"))
        })
        .await??;
        // Timed to the last record handled, as ours is: the consumers' close (rdkafka's `Drop`,
        // ~100 ms) is not in the figure, as our processors' stop is not.
        let last: Instant = last.ok_or("no member handled the last record")?;
        let elapsed = last - start;
        if std::env::var("BENCH_TIMINGS").is_ok() {
            eprintln!(
                "raw, {members} member(s): first handled after {first:?}, all after {elapsed:?}, closed after {:?}, CPU {:?}",
                start.elapsed(),
                support::cpu_time("self") - cpu
            );
        }
        Ok(Consumed { elapsed, last })
    }

    async fn ours_consume(
        &self,
        backend: &KafkaBackend,
        topic: &str,
        n: usize,
    ) -> Result<Duration, BoxError> {
        self.ours_consume_members(backend, topic, n, 1).await
    }

    /// `members` processors of one service (one group) handle `n` events between them.
    async fn ours_consume_members(
        &self,
        backend: &KafkaBackend,
        topic: &str,
        n: usize,
        members: usize,
    ) -> Result<Duration, BoxError> {
        Ok(self
            .ours_consume_marked(backend, topic, n, members, None)
            .await?
            .elapsed)
    }

    /// [`Bench::ours_consume_members`], announcing `mark` when reached, with the moment the
    /// last event was handled (end to end's).
    async fn ours_consume_marked(
        &self,
        backend: &KafkaBackend,
        topic: &str,
        n: usize,
        members: usize,
        mark: Option<&Mark>,
    ) -> Result<Consumed, BoxError> {
        let handled = Arc::new(AtomicUsize::new(0));
        let (first, all) = (
            Arc::new(tokio::sync::Notify::new()),
            Arc::new(tokio::sync::Notify::new()),
        );
        let token = CancellationToken::new();
        let service = cqrs::conformance::unique("ours");
        self.group_settings(&format!("{service}.count")).await?;
        let start = Instant::now();
        let cpu = support::cpu_time("self");
        // Started together, as the raw side's members are.
        let mut starting = Vec::new();
        // The dead-letter topics its processors make (a new one a run, as the group is new).
        let mut dead_letters = Vec::new();
        for _ in 0..members {
            let t = topic.to_owned();
            let mut p = EventProcessor::new(backend.clone(), &service)
                .topics(TopicNamer::new(move |_| t.clone()));
            let (h, first, all) = (handled.clone(), first.clone(), all.clone());
            let mark = mark.cloned();
            p.handle("count", move |_: Reading| {
                // The handlers say when the first and the last event are handled: no polling,
                // which would wake a thread every millisecond.
                let before = h.fetch_add(1, Ordering::Relaxed);
                if before == 0 {
                    first.notify_one();
                }
                if before + 1 == n {
                    all.notify_one();
                }
                if let Some(m) = mark.as_ref().filter(|m| before + 1 == m.at) {
                    m.reached.notify_one();
                }
                std::future::ready(Ok::<_, BoxError>(()))
            })?
            .batch_size(support::env_or("BENCH_BATCH", BATCH))
            .concurrency(support::env_or("BENCH_CONCURRENCY", 1));
            if dead_letters.is_empty() {
                dead_letters = support::dead_letter_topics(p.manifest());
            }
            let token = token.clone();
            starting.push(tokio::spawn(async move { p.start(token).await }));
        }
        // Timed until every event is handled, as the raw side is: a member whose start waits
        // for its partitions (a group rebalancing for the second member) does not stop the
        // first from handling meanwhile.
        first.notified().await;
        let first = start.elapsed();
        all.notified().await;
        let last = Instant::now();
        let elapsed = last - start;
        let mut running = Vec::new();
        for s in starting {
            running.push(s.await??);
        }
        if std::env::var("BENCH_TIMINGS").is_ok() {
            eprintln!(
                "ours, {members} member(s): first handled after {first:?}, all after {elapsed:?}, every member started after {:?}, CPU {:?}",
                start.elapsed(),
                support::cpu_time("self") - cpu
            );
        }
        let stopping = Instant::now();
        token.cancel();
        for r in running {
            r.wait().await?;
        }
        if std::env::var("BENCH_TIMINGS").is_ok() {
            eprintln!(
                "ours, {members} member(s): stopped in {:?}",
                stopping.elapsed()
            );
        }
        // On a broker kept between runs (`KAFKA_BROKERS`) they piled up, 62 of them (248
        // partitions) after a day's profiling. Not timed.
        self.delete_topics(&dead_letters).await?;
        Ok(Consumed { elapsed, last })
    }

    /// Our backend's consumer alone, without the processor: one member of a new group takes
    /// batches of 500 (`Consumer::receive`), decodes each payload into the event type as the raw
    /// side does, and acks each batch (`Delivery::ack_all`). Tells the backend's cost from the
    /// engine's (`BENCH_ONLY=consume-backend`).
    async fn backend_consume(
        &self,
        backend: &KafkaBackend,
        topic: &str,
        n: usize,
    ) -> Result<Duration, BoxError> {
        use cqrs::backend::Subscriber as _;
        let subscription = cqrs::Subscription::new(cqrs::conformance::unique("backend"), [topic]);
        self.group_settings(&subscription.group).await?;
        let start = Instant::now();
        let cpu = support::cpu_time("self");
        let mut consumer = backend.subscribe(&subscription).await?;
        let (mut got, mut first) = (0, None);
        while got < n {
            let batch = consumer.receive(BATCH).await?;
            for d in &batch {
                let _: Reading = serde_json::from_slice(&d.message().payload)?;
            }
            got += batch.len();
            first.get_or_insert_with(|| start.elapsed());
            cqrs::Delivery::ack_all(batch).await.map_err(|(e, _)| e)?;
        }
        let elapsed = start.elapsed();
        if std::env::var("BENCH_TIMINGS").is_ok() {
            eprintln!(
                "backend, 1 member(s): first handled after {first:?}, all after {elapsed:?}, CPU {:?}",
                support::cpu_time("self") - cpu
            );
        }
        consumer.close().await?;
        Ok(elapsed)
    }

    /// Sets the group settings (`BENCH_GROUP_SET`, else [`GROUP_SETTINGS`]; `key=value,...`, empty
    /// for none) on `group` before its members start. A broker that refuses them (one without
    /// KIP-848's group configs, or whose bounds exclude them) is said on stderr and the run goes on
    /// without them.
    async fn group_settings(&self, group: &str) -> Result<(), BoxError> {
        use rdkafka::admin::{AdminOptions, AlterConfig, ResourceSpecifier};
        let set = std::env::var("BENCH_GROUP_SET").unwrap_or_else(|_| GROUP_SETTINGS.to_owned());
        if set.is_empty() {
            return Ok(());
        }
        let mut alter = AlterConfig::new(ResourceSpecifier::Group(group));
        for kv in set.split(',') {
            let (k, v) = kv
                .split_once('=')
                .ok_or("BENCH_GROUP_SET is key=value,...")?;
            alter = alter.set(k, v);
        }
        let refused = match self
            .admin
            .alter_configs([&alter], &AdminOptions::new())
            .await
        {
            Ok(results) => results
                .into_iter()
                .find_map(|r| r.err().map(|(_, e)| e.to_string())),
            Err(e) => Some(e.to_string()),
        };
        if let Some(e) = refused {
            eprintln!("the broker refused the group settings {set:?} ({e}): running without them");
        }
        Ok(())
    }

    /// Deletes `topics` (those this run made, by name: nothing else on the broker).
    async fn delete_topics(&self, topics: &[impl AsRef<str>]) -> Result<(), BoxError> {
        support::delete_kafka_topics(&self.admin, topics).await
    }
}

/// A thread that commits `consumer`'s stored offsets each time it is asked, synchronously (as
/// our backend's committer does), and clears the flag once the commit is answered; it ends when
/// the sender is dropped.
fn raw_committer(
    consumer: Arc<StreamConsumer>,
) -> (
    std::sync::mpsc::Sender<()>,
    Arc<AtomicBool>,
    std::thread::JoinHandle<()>,
) {
    let (ask, asked) = std::sync::mpsc::channel::<()>();
    let busy = Arc::new(AtomicBool::new(false));
    let answered = busy.clone();
    let thread = std::thread::spawn(move || {
        while asked.recv().is_ok() {
            if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
                eprintln!("raw commit failed: {e}");
            }
            answered.store(false, Ordering::Relaxed);
        }
    });
    (ask, busy, thread)
}

/// The raw side's client settings before its own: the brokers, and librdkafka's `debug` when
/// `BENCH_KAFKA_DEBUG` sets it for ours (its lines are logged at `RUST_LOG=librdkafka=debug`).
fn raw_client(brokers: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    if let Ok(debug) = std::env::var("BENCH_KAFKA_DEBUG") {
        c.set("debug", debug);
    }
    c
}

/// Our backend's settings: the benchmark's, and those the environment sets for experiments.
fn config(brokers: &str) -> KafkaConfig {
    let mut config = KafkaConfig::new(brokers)
        .partitions(4)
        .fetch_wait(Duration::from_millis(10));
    // For experiments: the commit gate's limit (0: off) and the commit count.
    if let Some(n) = support::env::<usize>("BENCH_KAFKA_MAX_UNRECORDED") {
        config = config.max_unrecorded(n);
    }
    if let Some(n) = support::env::<usize>("BENCH_KAFKA_COMMIT_EVERY") {
        config = config.commit_every(n);
    }
    config = config.set("linger.ms", linger_ms());
    // For experiments: librdkafka settings of our producer and consumer, `key=value,key=value`.
    for (k, v) in support::env_settings("BENCH_KAFKA_SET") {
        config = config.set(k, v);
    }
    if let Ok(debug) = std::env::var("BENCH_KAFKA_DEBUG") {
        config = config.set("debug", debug);
    }
    match std::env::var("BENCH_KAFKA_PROTOCOL").as_deref() {
        Ok("eager") => config = config.group_protocol(cqrs::kafka::GroupProtocol::Eager),
        Ok("cooperative") => {
            config = config.group_protocol(cqrs::kafka::GroupProtocol::Cooperative)
        }
        _ => {}
    }
    config
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), BoxError> {
    cqrs_tools::support::init_logs();
    let fresh = std::env::var("BENCH_FRESH_BROKER").is_ok();
    // One broker for every round unless each round gets a fresh one.
    let own = match std::env::var("KAFKA_BROKERS") {
        Ok(_) => None,
        Err(_) if fresh => None,
        Err(_) => Some(support::own_kafka()?),
    };
    let shared = match (&own, std::env::var("KAFKA_BROKERS")) {
        (Some(server), _) => server.brokers().to_owned(),
        (None, Ok(brokers)) => brokers,
        (None, Err(_)) => String::new(),
    };
    let runtime = tokio::runtime::Runtime::new()?;
    let result = runtime.block_on(run(shared, fresh));
    // The clients go first: stopped under them (closing on threads of their own, after the
    // runtime), the broker had each log that all brokers were down.
    drop(runtime);
    if own.is_some() {
        support::await_kafka_clients_gone(Duration::from_secs(5));
    }
    drop(own);
    result
}

async fn run(shared: String, fresh: bool) -> Result<(), BoxError> {
    let n: usize = support::env_or("BENCH_N", 100_000);
    let rounds: usize = support::env_or("BENCH_ROUNDS", 3);
    // A fresh broker each round is cold each round: warming one up first measures nothing.
    let warmup: usize = support::env_or("BENCH_WARMUP", if fresh { 0 } else { 1 });
    let publish_only = std::env::var("BENCH_PUBLISH_ONLY").is_ok();
    let place = if fresh {
        "a fresh Apache Kafka per round".to_owned()
    } else {
        format!("Apache Kafka at {shared}")
    };
    if let Some(groups) = support::env::<usize>("BENCH_SAMPLING_GROUPS") {
        return sampling(&shared, groups, rounds).await;
    }
    if let Some(rate) = support::env::<u32>("BENCH_COMMIT_COST") {
        return commit_cost(&shared, rate, rounds).await;
    }
    if let Ok(only) = std::env::var("BENCH_ONLY") {
        return one_phase(&shared, n, &only).await;
    }
    println!(
        "{n} events of ~1 KiB of JSON on 4 partitions, {place}, {warmup} warm-up round(s), {rounds} rounds"
    );
    println!(
        "commits every 100 ms, and once this many are handled since the last (0: none): raw {}, ours {}",
        raw_commit_every(),
        ours_commit_every()
    );
    let names = [
        "publish, batches of 1000",
        "consume, 1 member",
        "consume, 2 members",
        "publish + consume, end to end",
        "publish, 1 per call from 64 tasks",
    ];
    let mut results: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); names.len()];
    let mut cpu_ms = Vec::new();
    // Warm-up rounds (numbered 0 and below) run every figure and count none: the first round
    // on a broker just started ran at about half the rate of the next ones on both sides (its
    // JVM compiling as it goes), and put a round of other conditions in the median.
    for round in (1 - warmup as isize)..=rounds as isize {
        let broker = if fresh {
            Some(support::own_kafka()?)
        } else {
            None
        };
        let brokers = broker
            .as_ref()
            .map_or(shared.clone(), |t| t.brokers().to_owned());
        let b = Bench::new(&brokers, n)?;
        let backend = KafkaBackend::connect(config(&brokers)).await?;
        let producer = b.producer().await?;
        // Each figure is measured in both orders ([`support::both_orders`]), which comes first
        // alternating by round; each run that publishes does so on fresh topics.
        let ours_first = round.rem_euclid(2) == 0;
        let mut figures = Vec::new();
        let mut topics: Vec<String> = Vec::new();
        let mut fresh_pairs = async |suffix: &str| -> Result<[(String, String); 2], BoxError> {
            let pairs = [
                fresh_topics(&backend, suffix).await?,
                fresh_topics(&backend, suffix).await?,
            ];
            for (r, o) in &pairs {
                topics.extend([r.clone(), o.clone()]);
            }
            Ok(pairs)
        };
        // Publish, with the CPU time this process spent on each side.
        let published = fresh_pairs("").await?;
        let (raw_cpu, ours_cpu) = (Cell::new(Duration::ZERO), Cell::new(Duration::ZERO));
        figures.push(
            support::both_orders(
                ours_first,
                |run| support::adding_cpu(&raw_cpu, b.raw_publish(&producer, &published[run].0)),
                |run| {
                    let (b, backend, topic) = (&b, &backend, &published[run].1);
                    support::adding_cpu(&ours_cpu, async move {
                        b.ours_publish(&bus_on(backend, topic)).await
                    })
                },
            )
            .await?,
        );
        if round > 0 {
            cpu_ms.push((
                raw_cpu.get().as_secs_f64() * 5e2,
                ours_cpu.get().as_secs_f64() * 5e2,
            ));
        }
        // The topics of the second pair are consumed next.
        let (raw_t, ours_t) = &published[1];
        if std::env::var("BENCH_PROFILE_CONSUME").is_ok() {
            // For a profiler attached to this process: our consumer alone, after a pause.
            eprintln!("profile: consuming in 3 s (pid {})", std::process::id());
            tokio::time::sleep(Duration::from_secs(3)).await;
            b.ours_consume(&backend, ours_t, n).await?;
            eprintln!("profile: consumed");
            return Ok(());
        }
        if !publish_only {
            // Consume what was published: one member, then two of one group; each run a new
            // group.
            for members in [1, 2] {
                figures.push(
                    support::both_orders(
                        ours_first,
                        |_| b.raw_consume_members(raw_t, n, members),
                        |_| b.ours_consume_members(&backend, ours_t, n, members),
                    )
                    .await?,
                );
            }
            // End to end: publishing and consuming at once, timed to the last event handled.
            let e2e = fresh_pairs("-e2e").await?;
            figures.push(
                support::both_orders(
                    ours_first,
                    |run| {
                        let (b, producer, topic) = (&b, &producer, &e2e[run].0);
                        async move { Ok(b.raw_end_to_end(producer, topic).await?.0) }
                    },
                    |run| {
                        let (b, backend, topic) = (&b, &backend, &e2e[run].1);
                        async move { Ok(b.ours_end_to_end(backend, topic).await?.0) }
                    },
                )
                .await?,
            );
            // One event per call from 64 tasks.
            let one = fresh_pairs("-one").await?;
            figures.push(
                support::both_orders(
                    ours_first,
                    |run| b.raw_publish_one_by_one(&producer, &one[run].0),
                    |run| {
                        let (b, backend, topic) = (&b, &backend, &one[run].1);
                        async move { b.ours_publish_one_by_one(&bus_on(backend, topic)).await }
                    },
                )
                .await?,
            );
        }
        // ~800 MB a round: kept, a few dozen runs filled the disk of a broker of its own.
        let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
        b.delete_topics(&topics).await?;
        drop((producer, backend, broker));
        if round > 0 {
            println!("round {round}");
            print_round(n, &names, figures, Some(&mut results));
        } else {
            println!("warm-up round (not counted)");
            print_round(n, &names, figures, None);
        }
    }
    println!("\nmedian of the rounds");
    println!(
        "{:<36} {:>10} {:>10} {:>6}",
        "figure (msg/s)", "raw", "ours", "ratio"
    );
    for (i, (rs, os)) in results.into_iter().enumerate() {
        if rs.is_empty() {
            continue;
        }
        let (r, o) = (median(rs), median(os));
        println!("{:<36} {r:>10.0} {o:>10.0} {:>6.2}", names[i], o / r);
    }
    let (rc, oc): (Vec<f64>, Vec<f64>) = cpu_ms.into_iter().unzip();
    let (rc, oc) = (median(rc), median(oc));
    println!(
        "{:<36} {rc:>10.0} {oc:>10.0} {:>6.2}",
        "publish: this process's CPU ms",
        oc / rc.max(1e-9)
    );
    Ok(())
}

/// The broker's settings of every group this benchmark makes, raw's and ours' alike (see the
/// module's docs): heartbeats every 100 ms, not the test broker's 500 ms.
const GROUP_SETTINGS: &str = "consumer.heartbeat.interval.ms=100";

/// Prints one round's figures (raw, ours, ratio; msg/s) and adds them to `results` (`None`: a
/// round not counted).
fn print_round(
    n: usize,
    names: &[&str],
    figures: Vec<(Duration, Duration)>,
    mut results: Option<&mut Vec<(Vec<f64>, Vec<f64>)>>,
) {
    for (i, (r, o)) in figures.into_iter().enumerate() {
        let (r, o) = (rate(n, r), rate(n, o));
        println!("  {:<34} {r:>10.0} {o:>10.0} {:>6.2}", names[i], o / r);
        if let Some(results) = results.as_mut() {
            results[i].0.push(r);
            results[i].1.push(o);
        }
    }
}

/// What the `metrics` feature's backlog sampling costs on Kafka: `groups` consumer groups with
/// committed offsets on one topic, each asked for its backlog as its sampler does every 5 s
/// (`Subscriber::groups(topic, group)`), `rounds` times; prints each round's wall and CPU time.
async fn sampling(brokers: &str, groups: usize, rounds: usize) -> Result<(), BoxError> {
    use cqrs::backend::{Publisher, Subscriber};
    use cqrs::kafka::rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
    use cqrs::kafka::rdkafka::{ClientConfig, Offset, TopicPartitionList};
    let backend = KafkaBackend::connect(KafkaConfig::new(brokers).partitions(4)).await?;
    let topic = format!("bench-sampling-{}", std::process::id());
    let messages: Vec<cqrs::Message> = (0..100)
        .map(|i| cqrs::Message::new("X", format!("{i}").into_bytes()))
        .collect();
    backend.publish(&topic, &messages).await?;
    // Of one length: none is a prefix of another (a sampler asks by prefix).
    let names: Vec<String> = (0..groups).map(|g| format!("{topic}.g{g:04}")).collect();
    for name in &names {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", name)
            .create()?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..4 {
            tpl.add_partition_offset(&topic, p, Offset::Offset(1))?;
        }
        c.commit(&tpl, CommitMode::Sync)?;
    }
    println!("backlog sampling: {groups} groups on {topic}, each asked once a round");
    for round in 1..=rounds {
        let (start, cpu) = (Instant::now(), support::cpu_time("self"));
        for name in &names {
            let backlog = backend.groups(&topic, name).await?;
            if !backlog.iter().any(|g| g.group == *name) {
                return Err(format!("{name} not found on {topic}").into());
            }
        }
        println!(
            "round {round}: {:.0} ms, CPU {:.0} ms",
            start.elapsed().as_secs_f64() * 1e3,
            (support::cpu_time("self") - cpu).as_secs_f64() * 1e3
        );
    }
    Ok(())
}

/// What an offset commit costs the broker: one member of a new group (KIP-848's protocol) on a
/// topic of 4 partitions, polling every millisecond, for 8 s without committing, then for 8 s
/// committing its 4 partitions' offsets at `rate` a second (each commit waiting for its answer,
/// as our committer's do), `rounds` times; prints the broker's CPU in each (`/proc`, the pid
/// from `BENCH_BROKER_PID`) and, per commit, the difference. The member is polled on this
/// task's thread (it blocks the runtime's worker: nothing else runs meanwhile).
async fn commit_cost(brokers: &str, rate: u32, rounds: usize) -> Result<(), BoxError> {
    use cqrs::kafka::rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
    use cqrs::kafka::rdkafka::{ClientConfig, Offset, TopicPartitionList};
    const SPAN: Duration = Duration::from_secs(8);
    let pid = std::env::var("BENCH_BROKER_PID")
        .map_err(|_| "BENCH_COMMIT_COST needs BENCH_BROKER_PID, the broker's process")?;
    let topic = cqrs::conformance::unique("bench-commits");
    let backend = KafkaBackend::connect(KafkaConfig::new(brokers).partitions(4)).await?;
    backend.ensure_topics(std::slice::from_ref(&topic)).await?;
    let member: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", cqrs::conformance::unique("bench-commits"))
        .set("group.protocol", "consumer")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()?;
    member.subscribe(&[&topic])?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while member.assignment()?.count() < 4 {
        if Instant::now() > deadline {
            return Err("the member was not given the topic's 4 partitions".into());
        }
        member.poll(Duration::from_millis(10));
    }
    let mut offset = 0;
    let mut span = |rate: u32| -> Result<(u32, Duration), BoxError> {
        let (start, cpu) = (Instant::now(), support::cpu_time(&pid));
        let mut commits = 0;
        while start.elapsed() < SPAN {
            member.poll(Duration::from_millis(1));
            if f64::from(commits) < start.elapsed().as_secs_f64() * f64::from(rate) {
                offset += 1;
                let mut tpl = TopicPartitionList::new();
                for p in 0..4 {
                    tpl.add_partition_offset(&topic, p, Offset::Offset(offset))?;
                }
                member.commit(&tpl, CommitMode::Sync)?;
                commits += 1;
            }
        }
        Ok((commits, support::cpu_time(&pid).saturating_sub(cpu)))
    };
    println!("offset commits on {topic}: the broker's CPU in {SPAN:?}, without and with commits");
    for round in 1..=rounds {
        let (_, idle) = span(0)?;
        let (commits, busy) = span(rate)?;
        println!(
            "round {round}: none {:.0} ms; {commits} commits {:.0} ms; {:.3} ms a commit",
            idle.as_secs_f64() * 1e3,
            busy.as_secs_f64() * 1e3,
            busy.saturating_sub(idle).as_secs_f64() * 1e3 / f64::from(commits.max(1))
        );
    }
    drop(member);
    support::delete_kafka_topics(&support::kafka_admin(brokers)?, &[topic]).await?;
    Ok(())
}

/// Two new topics for a figure, raw's and ours (`bench-raw<suffix>-...`, `bench-ours<suffix>-...`),
/// made on the broker.
async fn fresh_topics(backend: &KafkaBackend, suffix: &str) -> Result<(String, String), BoxError> {
    let (raw, ours) = (
        cqrs::conformance::unique(&format!("bench-raw{suffix}")),
        cqrs::conformance::unique(&format!("bench-ours{suffix}")),
    );
    backend.ensure_topics(&[raw.clone(), ours.clone()]).await?;
    Ok((raw, ours))
}

/// A bus of `backend` that puts every event on `topic`.
fn bus_on(backend: &KafkaBackend, topic: &str) -> EventBus {
    let topic = topic.to_owned();
    EventBus::new(backend.clone()).topics(TopicNamer::new(move |_| topic.clone()))
}

/// One phase alone, on the topic `BENCH_TOPIC` (see the module's docs).
async fn one_phase(brokers: &str, n: usize, only: &str) -> Result<(), BoxError> {
    let topic = std::env::var("BENCH_TOPIC").map_err(|_| "BENCH_ONLY needs BENCH_TOPIC")?;
    let b = Bench::new(brokers, n)?;
    let backend = KafkaBackend::connect(config(brokers)).await?;
    // The members of the group consuming alone.
    let members: usize = support::env_or("BENCH_MEMBERS", 1);
    let took = match only {
        "publish-ours" => {
            backend.ensure_topics(std::slice::from_ref(&topic)).await?;
            b.ours_publish(&bus_on(&backend, &topic)).await?
        }
        "publish-raw" => {
            backend.ensure_topics(std::slice::from_ref(&topic)).await?;
            b.raw_publish(&b.producer().await?, &topic).await?
        }
        "publish-one-ours" => {
            backend.ensure_topics(std::slice::from_ref(&topic)).await?;
            b.ours_publish_one_by_one(&bus_on(&backend, &topic))
                .await?
        }
        "publish-one-raw" => {
            backend.ensure_topics(std::slice::from_ref(&topic)).await?;
            b.raw_publish_one_by_one(&b.producer().await?, &topic).await?
        }
        "consume-raw" => b.raw_consume_members(&topic, n, members).await?,
        "consume-raw-threaded" => b.raw_threaded_consume(&topic, n).await?,
        "consume-backend" => b.backend_consume(&backend, &topic, n).await?,
        "consume-ours" => {
            b.ours_consume_members(&backend, &topic, n, members)
                .await?
        }
        // End to end on a new topic named from `BENCH_TOPIC`: publishing and consuming at once,
        // timed to the last event handled.
        // `e2e-raw-ours`: raw publishing, our consuming; `e2e-ours-raw`: the other way round
        // (which side's consumer slows which publisher).
        "e2e-raw" | "e2e-ours" | "e2e-raw-ours" | "e2e-ours-raw" | "e2e-raw-threaded"
        | "e2e-raw-backend" => {
            let topic = cqrs::conformance::unique(&topic);
            backend.ensure_topics(std::slice::from_ref(&topic)).await?;
            // The raw producer, connected before the phase as ours is.
            let producer = match only {
                "e2e-raw" | "e2e-raw-ours" | "e2e-raw-threaded" | "e2e-raw-backend" => {
                    Some(b.producer().await?)
                }
                _ => None,
            };
            // The broker's process and its CPU before the phase, and this process's.
            let broker = std::env::var("BENCH_BROKER_PID")
                .ok()
                .map(|pid| (support::cpu_time(&pid), pid));
            let cpu = support::cpu_time("self");
            let raw_producer = || producer.as_ref().ok_or("no raw producer for this phase");
            let (c, p) = match only {
                "e2e-raw" => b.raw_end_to_end(raw_producer()?, &topic).await?,
                "e2e-ours" => b.ours_end_to_end(&backend, &topic).await?,
                // Raw publishing, and one of the other consumers.
                "e2e-raw-ours" | "e2e-raw-threaded" | "e2e-raw-backend" => {
                    let producer = raw_producer()?;
                    let consume = async {
                        match only {
                            "e2e-raw-threaded" => b.raw_threaded_consume(&topic, n).await,
                            "e2e-raw-backend" => b.backend_consume(&backend, &topic, n).await,
                            _ => b.ours_consume(&backend, &topic, n).await,
                        }
                    };
                    let (c, p) = tokio::join!(consume, b.raw_publish(producer, &topic));
                    (c?, p?)
                }
                _ => {
                    let bus = bus_on(&backend, &topic);
                    let (c, p) = tokio::join!(b.raw_consume(&topic, n), b.ours_publish(&bus));
                    (c?, p?)
                }
            };
            let broker = broker.map_or_else(String::new, |(before, pid)| {
                format!(", the broker's CPU in it {:?}", support::cpu_time(&pid) - before)
            });
            let cpu_now = support::cpu_time("self");
            eprintln!(
                "{only}: published in {p:?}, last handled after {c:?}, CPU {cpu_now:?} (in the phase {:?}){broker}",
                cpu_now - cpu
            );
            b.delete_topics(&[&topic]).await?;
            c
        }
        other => {
            return Err(format!(
                "BENCH_ONLY={other}: publish-raw, publish-ours, publish-one-raw, publish-one-ours, consume-raw, consume-raw-threaded, consume-ours, consume-backend, e2e-raw, e2e-ours, e2e-raw-ours, e2e-ours-raw, e2e-raw-threaded or e2e-raw-backend"
            )
            .into())
        }
    };
    println!("{only}: {n} events on {topic} in {took:?}");
    Ok(())
}
