//! Benchmark: the outbox (a transaction per event, then the relay) against publishing directly
//! with the bus, in one run, per backend; and commit-to-handler latency at a fixed rate.
//!
//! Run with: `DATABASE_URL=postgres://... cargo run --release -p cqrs-tools --bin bench_outbox`
//! (`scripts/postgres start DIR` prints a URL). The in-memory broker always; Redis when
//! `REDIS_URL` is set, Kafka when `KAFKA_BROKERS` is. `BENCH_N` sets the events of the throughput
//! figure (default 20,000), `BENCH_WRITERS` the tasks writing them (default 16), `BENCH_RATE`
//! and `BENCH_SECONDS` the latency figure's rate (default 1,000/s) and length (default 5 s),
//! `BENCH_ROUNDS` the rounds (default 3), `BENCH_KAFKA_LINGER_MS` the Kafka producer's
//! `linger.ms` (default 0, ours's).
//!
//! Throughput, one event per call from `BENCH_WRITERS` tasks, as a service handling one
//! command per request writes them:
//! - direct: `EventBus::publish`, each awaiting the broker's acknowledgement;
//! - relay: an `OutboxRelay` (batches of 500) sending rows committed already, until the broker
//!   acknowledged and the relay deleted every one (the figure compared with direct);
//! - outbox writes: a transaction per event (`Outbox::publish`, commit), beside plain writes:
//!   the same bytes inserted into a table of their own, a transaction each (PostgreSQL's pace).
//!
//! Latency: events written at `BENCH_RATE` per second; the time from the writer's commit (or,
//! directly, from the call to `publish`) to the handler of an `EventProcessor` on the same
//! backend: p50, p99, max. One event goes through first and is not counted (the relay
//! connecting, the producer finding the partitions' leaders).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cqrs::backend::{Publisher, Subscriber};
use cqrs::memory::MemoryBroker;
use cqrs::postgres::sqlx::postgres::PgPoolOptions;
use cqrs::postgres::sqlx::PgPool;
use cqrs::postgres::{Outbox, OutboxRelay, OutboxStore};
use cqrs::{BoxError, CancellationToken, Event, EventBus, EventProcessor, TopicNamer};
use cqrs_tools::support::env_or;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(name = "bench.AccountOpened")]
struct AccountOpened {
    #[event(key)]
    account: String,
    seq: u64,
    owner: String,
}

fn event(seq: u64) -> AccountOpened {
    AccountOpened {
        account: format!("acct-{:04}", seq % 1000),
        seq,
        owner: "x".repeat(200),
    }
}

/// A backend under test: what the bus, the relay and the processor take.
#[derive(Clone)]
struct Backend<B> {
    name: &'static str,
    backend: B,
}

struct Settings {
    n: usize,
    writers: usize,
    rate: usize,
    seconds: usize,
    batch: usize,
}

/// A schema of its own for one figure, dropped after.
async fn fresh_store(pool: &PgPool, tag: &str) -> Result<OutboxStore, BoxError> {
    let schema = cqrs::conformance::unique(&format!("bench_{tag}")).replace('-', "_");
    let store = OutboxStore::new().schema(&schema)?;
    store.migrate(pool).await?;
    Ok(store)
}

async fn drop_store(pool: &PgPool, store: &OutboxStore) -> Result<(), BoxError> {
    cqrs::postgres::sqlx::query(&format!(
        "DROP SCHEMA IF EXISTS {} CASCADE",
        store.schema_name()
    ))
    .execute(pool)
    .await?;
    Ok(())
}

fn bus_on<B: Publisher + Clone>(backend: &B, topic: &str) -> EventBus {
    let t = topic.to_owned();
    EventBus::new(backend.clone()).topics(TopicNamer::new(move |_| t.clone()))
}

/// `writers` tasks call `write(seq)` for `n` sequence numbers between them.
async fn write_all<F, Fut>(n: usize, writers: usize, write: F) -> Result<(), BoxError>
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<(), BoxError>> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..writers {
        let (next, write) = (next.clone(), write.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let seq = next.fetch_add(1, Ordering::Relaxed);
                if seq >= n {
                    return Ok::<_, BoxError>(());
                }
                write(seq as u64).await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

async fn direct_throughput<B>(b: &Backend<B>, s: &Settings) -> Result<Duration, BoxError>
where
    B: Publisher + Subscriber + Clone + 'static,
{
    let topic = cqrs::conformance::unique("bench-direct");
    let bus = bus_on(&b.backend, &topic);
    let start = Instant::now();
    write_all(s.n, s.writers, move |seq| {
        let bus = bus.clone();
        async move { Ok(bus.publish(&event(seq)).await?) }
    })
    .await?;
    Ok(start.elapsed())
}

/// What the outbox measures take: the writers' time to commit `n` transactions of one event
/// each, the relay's time to send them once committed (started after the writers), and the
/// time to commit the same rows into a plain table (the database's own pace, no outbox).
struct OutboxTimes {
    write: Duration,
    relay: Duration,
    plain: Duration,
}

async fn outbox_throughput<B>(
    b: &Backend<B>,
    s: &Settings,
    pool: &PgPool,
) -> Result<OutboxTimes, BoxError>
where
    B: Publisher + Subscriber + Clone + 'static,
{
    let topic = cqrs::conformance::unique("bench-outbox");
    let store = fresh_store(pool, "tp").await?;
    let outbox = Outbox::new(bus_on(&b.backend, &topic), store.clone());
    // The plain table: the same bytes per row, in the same schema.
    let plain = format!("{}.plain", store.schema_name());
    cqrs::postgres::sqlx::query(&format!(
        "CREATE TABLE {plain} (seq BIGSERIAL PRIMARY KEY, body BYTEA NOT NULL)"
    ))
    .execute(pool)
    .await?;
    let start = Instant::now();
    {
        let (pool, plain) = (pool.clone(), plain.clone());
        write_all(s.n, s.writers, move |seq| {
            let (pool, plain) = (pool.clone(), plain.clone());
            async move {
                let body = serde_json::to_vec(&event(seq))?;
                let mut tx = pool.begin().await?;
                cqrs::postgres::sqlx::query(&format!("INSERT INTO {plain} (body) VALUES ($1)"))
                    .bind(body)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(())
            }
        })
        .await?;
    }
    let plain_time = start.elapsed();
    let start = Instant::now();
    {
        let (pool, outbox) = (pool.clone(), outbox.clone());
        write_all(s.n, s.writers, move |seq| {
            let (pool, outbox) = (pool.clone(), outbox.clone());
            async move {
                let mut tx = pool.begin().await?;
                outbox.publish(&mut tx, &event(seq)).await?;
                tx.commit().await?;
                Ok(())
            }
        })
        .await?;
    }
    let write = start.elapsed();
    // The relay, on rows committed already: until it has sent (and deleted) every one.
    let token = CancellationToken::new();
    let start = Instant::now();
    let relay = tokio::spawn(
        OutboxRelay::new(pool.clone(), store.clone(), b.backend.clone())
            .batch_size(s.batch)
            .run(token.clone()),
    );
    // Asked every 5 ms for the first row left, from the one found last time: an index range
    // that starts past the rows deleted already. An `EXISTS` over the table (and `status`'s
    // `count(*)`) scanned every row deleted so far at each ask, ~10% of the two cores' time
    // while the relay ran (`perf record -a`), which the direct figure does not pay.
    let first_left = format!(
        "SELECT min(seq) FROM {}.outbox WHERE seq >= $1",
        store.schema_name()
    );
    let mut from = 0_i64;
    while let Some(first) = cqrs::postgres::sqlx::query_scalar::<_, Option<i64>>(&first_left)
        .bind(from)
        .fetch_one(pool)
        .await?
    {
        from = first;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let relay_time = start.elapsed();
    token.cancel();
    relay.await??;
    drop_store(pool, &store).await?;
    Ok(OutboxTimes {
        write,
        relay: relay_time,
        plain: plain_time,
    })
}

/// Writes `e` in a transaction of its own through `outbox` when there is one, else publishes it
/// with `bus`; `mark` gets the instant its latency counts from (just before the commit, or the
/// call to `publish`).
async fn write(
    bus: &EventBus,
    outbox: Option<&Outbox>,
    pool: Option<&PgPool>,
    e: &AccountOpened,
    mark: impl FnOnce(Instant),
) -> Result<(), BoxError> {
    match (outbox, pool) {
        (Some(outbox), Some(pool)) => {
            let mut tx = pool.begin().await?;
            outbox.publish(&mut tx, e).await?;
            // Marked before the commit: the relay may send it before `commit` returns.
            mark(Instant::now());
            tx.commit().await?;
        }
        _ => {
            mark(Instant::now());
            bus.publish(e).await?;
        }
    }
    Ok(())
}

/// Commit-to-handler latencies (microseconds) at `s.rate` per second for `s.seconds`, through
/// the outbox (`pool` given) or directly.
async fn latency<B>(
    b: &Backend<B>,
    s: &Settings,
    pool: Option<&PgPool>,
) -> Result<Vec<u64>, BoxError>
where
    B: Publisher + Subscriber + Clone + 'static,
{
    let topic = cqrs::conformance::unique("bench-latency");
    let total = s.rate * s.seconds;
    let sent: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; total]));
    let got: Arc<Mutex<Vec<(u64, Instant)>>> = Arc::new(Mutex::new(Vec::with_capacity(total)));
    let token = CancellationToken::new();
    let mut processor = EventProcessor::new(b.backend.clone(), cqrs::conformance::unique("svc"))
        .topics(TopicNamer::new({
            let t = topic.clone();
            move |_| t.clone()
        }));
    {
        let got = got.clone();
        processor.handle("latency", move |e: AccountOpened| {
            let now = Instant::now();
            got.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push((e.seq, now));
            std::future::ready(Ok::<_, BoxError>(()))
        })?;
    }
    let running = processor.start(token.clone()).await?;
    let bus = bus_on(&b.backend, &topic);
    let store = match pool {
        Some(pool) => Some(fresh_store(pool, "lat").await?),
        None => None,
    };
    let relay = match (pool, &store) {
        (Some(pool), Some(store)) => Some(tokio::spawn(
            OutboxRelay::new(pool.clone(), store.clone(), b.backend.clone()).run(token.clone()),
        )),
        _ => None,
    };
    let outbox = store
        .as_ref()
        .map(|st| Outbox::new(bus.clone(), st.clone()));
    // One event first, not counted, through the same path: the latency is that of a service
    // running, not of its relay connecting or its producer finding the leaders.
    {
        write(&bus, outbox.as_ref(), pool, &event(total as u64), |_| {}).await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let arrived = {
                let mut got = got
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let arrived = got.iter().any(|(seq, _)| *seq == total as u64);
                if arrived {
                    got.clear();
                }
                arrived
            };
            if arrived {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("{}: the first event not handled in 60 s", b.name).into());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let every = Duration::from_secs_f64(1.0 / s.rate as f64);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut writes = tokio::task::JoinSet::new();
    for seq in 0..total as u64 {
        tick.tick().await;
        let (bus, outbox, pool, sent) = (bus.clone(), outbox.clone(), pool.cloned(), sent.clone());
        writes.spawn(async move {
            let mark = |at: Instant| {
                sent.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)[seq as usize] = Some(at);
            };
            write(&bus, outbox.as_ref(), pool.as_ref(), &event(seq), mark).await
        });
    }
    while let Some(w) = writes.join_next().await {
        w??;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while got
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .len()
        < total
    {
        if Instant::now() > deadline {
            return Err(format!("{}: not every event handled in 60 s", b.name).into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    token.cancel();
    running.wait().await?;
    if let Some(relay) = relay {
        relay.await??;
    }
    if let (Some(pool), Some(store)) = (pool, &store) {
        drop_store(pool, store).await?;
    }
    let sent = sent
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let got = got
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if std::env::var("BENCH_WINDOWS").is_ok() {
        // The worst latency of each tenth of the run, in sending order.
        let mut by_seq: Vec<(u64, u64)> = got
            .iter()
            .filter_map(|(seq, at)| {
                let s = sent.get(*seq as usize).copied().flatten()?;
                Some((*seq, at.saturating_duration_since(s).as_micros() as u64))
            })
            .collect();
        by_seq.sort_unstable();
        let tenth = (by_seq.len() / 10).max(1);
        let worst: Vec<u64> = by_seq
            .chunks(tenth)
            .map(|c| c.iter().map(|(_, l)| *l).max().unwrap_or(0))
            .collect();
        eprintln!("{}: worst latency (us) per tenth: {worst:?}", b.name);
    }
    Ok(got
        .iter()
        .filter_map(|(seq, at)| {
            let s = sent.get(*seq as usize).copied().flatten()?;
            Some(at.saturating_duration_since(s).as_micros() as u64)
        })
        .collect())
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

async fn run<B>(b: Backend<B>, s: &Settings, pool: &PgPool, rounds: usize) -> Result<(), BoxError>
where
    B: Publisher + Subscriber + Clone + 'static,
{
    let mut rows: Vec<[f64; 4]> = Vec::new();
    for round in 1..=rounds {
        // Alternating which goes first.
        let (d, o) = if round % 2 == 1 {
            let d = direct_throughput(&b, s).await?;
            (d, outbox_throughput(&b, s, pool).await?)
        } else {
            let o = outbox_throughput(&b, s, pool).await?;
            (direct_throughput(&b, s).await?, o)
        };
        let rate = |t: Duration| s.n as f64 / t.as_secs_f64();
        let row = [rate(d), rate(o.relay), rate(o.write), rate(o.plain)];
        println!(
            "{:<8} round {round}: direct {:>8.0}/s  relay {:>8.0}/s ({:.2})  outbox writes {:>6.0}/s  plain writes {:>6.0}/s ({:.2})",
            b.name,
            row[0],
            row[1],
            row[1] / row[0],
            row[2],
            row[3],
            row[2] / row[3]
        );
        rows.push(row);
    }
    let col = |i: usize| median(rows.iter().map(|r| r[i]).collect());
    let ratio = |a: usize, b: usize| median(rows.iter().map(|r| r[a] / r[b]).collect());
    println!(
        "{:<8} median: direct {:>8.0}/s  relay {:>8.0}/s ({:.2})  outbox writes {:>6.0}/s  plain writes {:>6.0}/s ({:.2})  [{} writers, {} events]",
        b.name,
        col(0),
        col(1),
        ratio(1, 0),
        col(2),
        col(3),
        ratio(2, 3),
        s.writers,
        s.n
    );
    for (label, pool) in [("direct", None), ("outbox", Some(pool))] {
        let mut l = latency(&b, s, pool).await?;
        l.sort_unstable();
        println!(
            "{:<8} latency {label:<6} at {}/s: n {} p50 {} us  p99 {} us  max {} us",
            b.name,
            s.rate,
            l.len(),
            percentile(&l, 0.5),
            percentile(&l, 0.99),
            l.last().copied().unwrap_or(0)
        );
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    cqrs_tools::support::init_logs();
    let url = std::env::var("DATABASE_URL")
        .map_err(|_| "set DATABASE_URL (scripts/postgres start DIR prints one)")?;
    let s = Settings {
        n: env_or("BENCH_N", 20_000),
        writers: env_or("BENCH_WRITERS", 16),
        rate: env_or("BENCH_RATE", 1_000),
        seconds: env_or("BENCH_SECONDS", 5),
        batch: env_or("BENCH_RELAY_BATCH", 500),
    };
    let rounds = env_or("BENCH_ROUNDS", 3);
    // A connection per writer, and the relay's own (its lock and LISTEN take two more).
    let pool = PgPoolOptions::new()
        .max_connections(s.writers as u32 + 4)
        .connect(&url)
        .await?;
    run(
        Backend {
            name: "memory",
            backend: MemoryBroker::new(),
        },
        &s,
        &pool,
        rounds,
    )
    .await?;
    if let Ok(url) = std::env::var("REDIS_URL") {
        let backend = cqrs::redis::RedisBackend::connect(&url).await?;
        run(
            Backend {
                name: "redis",
                backend,
            },
            &s,
            &pool,
            rounds,
        )
        .await?;
    }
    if let Ok(brokers) = std::env::var("KAFKA_BROKERS") {
        // Fetches answered within 10 ms, as in bench_kafka and bench_latency.
        let mut config =
            cqrs::kafka::KafkaConfig::new(&brokers).fetch_wait(Duration::from_millis(10));
        // The producer's `linger.ms` (ours: 0), for both sides.
        if let Ok(linger) = std::env::var("BENCH_KAFKA_LINGER_MS") {
            config = config.set("linger.ms", linger);
        }
        let backend = cqrs::kafka::KafkaBackend::connect(config).await?;
        run(
            Backend {
                name: "kafka",
                backend,
            },
            &s,
            &pool,
            rounds,
        )
        .await?;
    }
    Ok(())
}
