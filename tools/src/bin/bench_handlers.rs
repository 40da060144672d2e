//! Benchmark: the handler a user writes first (`async fn(E) -> Result<()>`, default options)
//! beside the tuned one, on Redis Streams, Kafka and the in-memory broker.
//!
//! Run with: `cargo run --release -p cqrs-tools --bin bench_handlers`
//! (needs redis-server on 127.0.0.1:6379, or `REDIS_URL`; Kafka at `KAFKA_BROKERS`, else an
//! Apache Kafka of its own started by `scripts/kafka` (`support::own_kafka`), topics of 4
//! partitions). `BENCH_N` sets the events of the runs without I/O (default 200,000); the runs
//! whose handler awaits 1 ms get fewer events, sized to take a few seconds. `BENCH_BACKENDS`
//! picks from `redis,memory,kafka` (default `redis,memory`).
//!
//! Each run publishes its events first (keyed, 1,000 keys, ~200 bytes of JSON) to a new stream
//! or topic, then starts `members` processors of a new service (one consumer group; each member
//! its own connection) and times until every event is handled. On Kafka the topics and the
//! dead-letter topics the runs made are deleted after. "1 ms I/O" is a handler that awaits
//! `tokio::time::sleep(1 ms)`, standing for a database call. Printed: events/s for the run and
//! per member.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cqrs::kafka::KafkaBackend;
use cqrs::memory::MemoryBroker;
use cqrs::redis::{redis, RedisBackend};
use cqrs::{Backend, BoxError, CancellationToken, EventBus, EventProcessor};

use cqrs_tools::support;
use support::Sample;

/// One row of the table: a handler configuration and how many members run it.
struct Case {
    handler: &'static str,
    concurrency: Option<usize>,
    batch_size: Option<usize>,
    io: Option<Duration>,
    /// A batch handler (`handle_batch`): `io` is awaited once per batch.
    batch: bool,
    members: usize,
    /// Events per member (the run publishes `members` times this).
    per_member: usize,
}

fn cases(n: usize) -> Vec<Case> {
    let ms = Some(Duration::from_millis(1));
    let case = |handler, concurrency, batch_size, io, members, per_member| Case {
        handler,
        concurrency,
        batch_size,
        io,
        batch: false,
        members,
        per_member,
    };
    // A batch handler whose batch awaits 5 ms (a multi-row insert), one batch at a time or 8.
    let batches = |handler, concurrency| Case {
        handler,
        concurrency,
        batch_size: None,
        io: Some(Duration::from_millis(5)),
        batch: true,
        members: 1,
        per_member: 20_000,
    };
    vec![
        batches("batch handler, 5 ms I/O a batch", None),
        batches("batch handler, concurrency(8), 5 ms I/O a batch", Some(8)),
        case(
            "tuned: batch_size(500), no I/O",
            None,
            Some(500),
            None,
            1,
            n,
        ),
        case("plain, default options, no I/O", None, None, None, 1, n),
        case("plain, default options, no I/O", None, None, None, 2, n / 2),
        case("plain, concurrency(16), no I/O", Some(16), None, None, 1, n),
        case("plain, default options, 1 ms I/O", None, None, ms, 1, 3_000),
        case("plain, default options, 1 ms I/O", None, None, ms, 2, 3_000),
        case(
            "plain, concurrency(16), 1 ms I/O",
            Some(16),
            None,
            ms,
            1,
            50_000,
        ),
        case(
            "plain, concurrency(16), 1 ms I/O",
            Some(16),
            None,
            ms,
            2,
            50_000,
        ),
        case(
            "plain, concurrency(32), 1 ms I/O",
            Some(32),
            None,
            ms,
            1,
            50_000,
        ),
    ]
}

/// Publishes the case's events, then times `members` processors draining them. Returns the
/// rate and the dead-letter topics of the processors' groups.
async fn run(
    backend: impl Backend + Clone,
    topic: &str,
    case: &Case,
) -> Result<(f64, Vec<String>), BoxError> {
    let total = case.members * case.per_member;
    let namer = support::one_topic(topic);
    let bus = EventBus::new(backend.clone()).topics(namer.clone());
    let events: Vec<Sample> = (0..total as u64).map(support::sample).collect();
    for chunk in events.chunks(1000) {
        bus.publish_all(chunk).await?;
    }

    let handled = Arc::new(AtomicUsize::new(0));
    let token = CancellationToken::new();
    let service = cqrs::conformance::unique("bench-handlers");
    let mut dead_letters = Vec::new();
    let start = Instant::now();
    let mut running = Vec::new();
    for _ in 0..case.members {
        let mut p = EventProcessor::new(backend.clone(), &service).topics(namer.clone());
        let (h, io) = (handled.clone(), case.io);
        let options = if case.batch {
            p.handle_batch("on-orders", move |samples: Vec<Sample>| {
                let h = h.clone();
                async move {
                    if let Some(io) = io {
                        tokio::time::sleep(io).await;
                    }
                    h.fetch_add(samples.len(), Ordering::Relaxed);
                    Ok::<_, cqrs::BatchError>(())
                }
            })?
        } else {
            // The handler a user writes: an async fn of the event.
            p.handle("on-order", move |_sample: Sample| {
                let h = h.clone();
                async move {
                    if let Some(io) = io {
                        tokio::time::sleep(io).await;
                    }
                    h.fetch_add(1, Ordering::Relaxed);
                    Ok::<_, BoxError>(())
                }
            })?
        };
        if let Some(c) = case.concurrency {
            options.concurrency(c);
        }
        if let Some(b) = case.batch_size {
            options.batch_size(b);
        }
        if dead_letters.is_empty() {
            dead_letters = support::dead_letter_topics(p.manifest());
        }
        running.push(p.start(token.clone()).await?);
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    while handled.load(Ordering::Relaxed) < total {
        if Instant::now() > deadline {
            return Err(format!(
                "{} of {total} handled in 300 s",
                handled.load(Ordering::Relaxed)
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = start.elapsed();
    token.cancel();
    for r in running {
        r.wait().await?;
    }
    Ok((total as f64 / elapsed.as_secs_f64(), dead_letters))
}

/// What `concurrency` tasks that do nothing but await `tokio::time::sleep(1 ms)` manage per
/// second: the ceiling of a member whose handler does, and how long such a sleep really takes.
async fn sleep_ceiling(concurrency: usize) -> (f64, Duration) {
    const ROUNDS: u32 = 500;
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        tasks.spawn(async {
            for _ in 0..ROUNDS {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = start.elapsed();
    let rate = concurrency as f64 * f64::from(ROUNDS) / elapsed.as_secs_f64();
    (rate, elapsed / ROUNDS)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    cqrs_tools::support::init_logs();
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into());
    let n: usize = support::env_or("BENCH_N", 200_000);
    let backends = std::env::var("BENCH_BACKENDS").unwrap_or_else(|_| "redis,memory".into());
    println!("| backend | handler | members | events | events/s | per member |");
    println!("|---|---|---:|---:|---:|---:|");
    for name in backends.split(',').map(str::trim) {
        // One broker and one admin client for every case (an Apache Kafka of its own unless
        // `KAFKA_BROKERS`). The server last: its clients are dropped before it stops.
        let kafka = match name {
            "kafka" => {
                let (server, config) = support::bench_kafka(4)?;
                let admin = support::kafka_admin(config.brokers())?;
                Some((KafkaBackend::connect(config).await?, admin, server))
            }
            _ => None,
        };
        for case in cases(n) {
            let rate = match (name, &kafka) {
                ("redis", _) => {
                    let stream = cqrs::conformance::unique("bench-handlers");
                    let rate = run(RedisBackend::connect(&url).await?, &stream, &case).await;
                    let mut conn = redis::Client::open(url.as_str())?
                        .get_multiplexed_async_connection()
                        .await?;
                    redis::cmd("DEL")
                        .arg(&stream)
                        .query_async::<()>(&mut conn)
                        .await?;
                    rate?.0
                }
                ("memory", _) => run(MemoryBroker::new(), "bench-handlers", &case).await?.0,
                ("kafka", Some((backend, admin, _))) => {
                    let topic = cqrs::conformance::unique("bench-handlers");
                    backend.ensure_topics(std::slice::from_ref(&topic)).await?;
                    let result = run(backend.clone(), &topic, &case).await;
                    let mut made = vec![topic];
                    if let Ok((_, dead_letters)) = &result {
                        made.extend(dead_letters.iter().cloned());
                    }
                    support::delete_kafka_topics(admin, &made).await?;
                    result?.0
                }
                (other, _) => {
                    return Err(format!("unknown backend {other:?} in BENCH_BACKENDS").into())
                }
            };
            println!(
                "| {name} | {} | {} | {} | {:.0} | {:.0} |",
                case.handler,
                case.members,
                case.members * case.per_member,
                rate,
                rate / case.members as f64
            );
        }
    }
    for c in [1, 16, 32] {
        let (rate, each) = sleep_ceiling(c).await;
        println!(
            "ceiling: {c} tasks awaiting sleep(1 ms) in a loop: {rate:.0}/s (one sleep takes {:.2} ms)",
            each.as_secs_f64() * 1000.0
        );
    }
    Ok(())
}
