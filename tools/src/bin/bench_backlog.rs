//! Benchmark: the memory of a processor while it drains a large backlog.
//!
//! Run with: `cargo run --release -p cqrs-tools --bin bench_backlog`
//! (Redis at `REDIS_URL`, default 127.0.0.1:6379; Kafka at `KAFKA_BROKERS`, else an Apache
//! Kafka of its own started by `scripts/kafka`, its log in `/dev/shm` unless `BENCH_KAFKA_DIR`
//! says where (`support::own_kafka`; before 2026-12-03 on disk), 16 partitions;
//! `BENCH_KAFKA_FETCH_WAIT_MS` sets the consumer's `fetch.wait.max.ms`, default 100;
//! `BENCH_KAFKA_SET=key=value,...` sets librdkafka settings of the draining consumer, e.g.
//! `queued.max.messages.kbytes=4096`). `BENCH_N` sets the backlog (default 1,000,000 events of
//! ~200 bytes; on Kafka `BENCH_KAFKA_N`, default 200,000), `BENCH_BACKENDS` picks from
//! `memory,redis,kafka` (default all three).
//!
//! Per backend the backlog is published first; then a process of its own (this program with
//! `drain`) starts one processor with one handler and samples its resident set size (RSS) every
//! second until every event is handled. It does so twice on the same backlog, with a new
//! consumer group each time: default options (concurrency 1, batch 100), then concurrency 16.
//! For the in-memory broker the broker lives in the draining process, so that process publishes
//! the backlog itself and its RSS holds the backlog too. Printed per run: RSS when the processor
//! starts, its peak and at the end, in MiB, and the drain rate.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cqrs::kafka::{KafkaBackend, KafkaConfig};
use cqrs::memory::MemoryBroker;
use cqrs::redis::{redis, RedisBackend};
use cqrs::{Backend, BoxError, CancellationToken, EventBus, EventProcessor};

use cqrs_tools::support;

/// Publishes `n` events in chunks of 1,000.
async fn fill(backend: impl Backend, topic: &str, n: u64) -> Result<(), BoxError> {
    let bus = EventBus::new(backend).topics(support::one_topic(topic));
    let mut start = 0;
    while start < n {
        let end = (start + 1000).min(n);
        let chunk: Vec<support::Sample> = (start..end).map(support::sample).collect();
        bus.publish_all(&chunk).await?;
        start = end;
    }
    Ok(())
}

/// The draining process: prints `rss <ms> <handled> <kib>` at start and every second, then
/// `done <ms>` when `n` events are handled, and after it stops `dead-letter <topic>` for each
/// dead-letter topic its processor made (for the run to delete).
async fn drain(
    backend: impl Backend + Clone,
    topic: &str,
    n: u64,
    concurrency: usize,
) -> Result<(), BoxError> {
    let handled = Arc::new(AtomicU64::new(0));
    let mut p = EventProcessor::new(backend, "bench-backlog").topics(support::one_topic(topic));
    let h = handled.clone();
    p.handle(
        &cqrs::conformance::unique("drain"),
        move |_s: support::Sample| {
            h.fetch_add(1, Ordering::Relaxed);
            std::future::ready(Ok::<_, BoxError>(()))
        },
    )?
    .concurrency(concurrency);
    let dead_letters = support::dead_letter_topics(p.manifest());
    let start = Instant::now();
    println!("rss 0 0 {}", support::rss_kib());
    let running = p.start(CancellationToken::new()).await?;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut next_sample = Duration::from_secs(1);
    loop {
        tick.tick().await;
        let done = handled.load(Ordering::Relaxed);
        let at = start.elapsed();
        if done >= n {
            println!("rss {} {done} {}", at.as_millis(), support::rss_kib());
            println!("done {}", at.as_millis());
            break;
        }
        if at >= next_sample {
            println!("rss {} {done} {}", at.as_millis(), support::rss_kib());
            next_sample += Duration::from_secs(1);
        }
        if at > Duration::from_secs(600) {
            return Err(format!("{done} of {n} handled in 600 s").into());
        }
    }
    running.shutdown().await?;
    for topic in dead_letters {
        println!("dead-letter {topic}");
    }
    Ok(())
}

/// The `drain` role: `drain <backend> <url> <topic> <n> <concurrency>`.
async fn drain_role(args: &[String]) -> Result<(), BoxError> {
    let [backend, url, topic, n, concurrency] = args else {
        return Err("usage: bench_backlog drain <backend> <url> <topic> <n> <concurrency>".into());
    };
    let (n, concurrency): (u64, usize) = (n.parse()?, concurrency.parse()?);
    match backend.as_str() {
        "memory" => {
            let broker = MemoryBroker::new();
            fill(broker.clone(), topic, n).await?;
            drain(broker, topic, n, concurrency).await
        }
        "redis" => drain(RedisBackend::connect(url).await?, topic, n, concurrency).await,
        "kafka" => {
            let wait = Duration::from_millis(support::kafka_fetch_wait_ms());
            let mut config = KafkaConfig::new(url.as_str()).fetch_wait(wait);
            for (k, v) in support::env_settings("BENCH_KAFKA_SET") {
                config = config.set(k, v);
            }
            let backend = KafkaBackend::connect(config).await?;
            drain(backend, topic, n, concurrency).await
        }
        other => Err(format!("unknown backend {other:?}").into()),
    }
}

/// Runs one `drain` process and prints its row; the dead-letter topics it made.
fn measure(
    backend: &str,
    url: &str,
    topic: &str,
    n: u64,
    concurrency: usize,
) -> Result<Vec<String>, BoxError> {
    let mut child = Command::new(std::env::current_exe()?)
        .args(["drain", backend, url, topic])
        .arg(n.to_string())
        .arg(concurrency.to_string())
        .stdout(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let (mut samples, mut done_ms, mut dead_letters) = (Vec::new(), None, Vec::new());
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["rss", ms, handled, kib] => {
                let (ms, handled, kib): (u64, u64, u64) =
                    (ms.parse()?, handled.parse()?, kib.parse()?);
                // Live, so a slow drain shows its progress.
                eprintln!(
                    "  {backend} c={concurrency}: {:.0} s, {handled} handled, RSS {:.1} MiB",
                    ms as f64 / 1000.0,
                    kib as f64 / 1024.0
                );
                samples.push((ms, handled, kib));
            }
            ["done", ms] => done_ms = Some(ms.parse::<u64>()?),
            ["dead-letter", topic] => dead_letters.push((*topic).to_owned()),
            _ => eprintln!("{line}"),
        }
    }
    let status = child.wait()?;
    let done_ms = done_ms.ok_or_else(|| format!("drain of {backend} did not finish: {status}"))?;
    let mib = |kib: u64| kib as f64 / 1024.0;
    let first = samples.first().map_or(0, |s| s.2);
    let peak = samples.iter().map(|s| s.2).max().unwrap_or(0);
    let last = samples.last().map_or(0, |s| s.2);
    let options = if concurrency == 1 {
        "default options".to_owned()
    } else {
        format!("concurrency({concurrency})")
    };
    println!(
        "| {backend} | {options} | {n} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} |",
        mib(first),
        mib(peak),
        mib(last),
        done_ms as f64 / 1000.0,
        n as f64 * 1000.0 / done_ms.max(1) as f64
    );
    Ok(dead_letters)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    cqrs_tools::support::init_logs();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("drain") {
        return drain_role(&args[1..]).await;
    }
    let n: u64 = support::env_or("BENCH_N", 1_000_000);
    let kafka_n: u64 = support::env_or("BENCH_KAFKA_N", 200_000);
    let backends = std::env::var("BENCH_BACKENDS").unwrap_or_else(|_| "memory,redis,kafka".into());
    println!("| backend | handler | backlog | RSS at start MiB | peak MiB | end MiB | drain s | events/s |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    for backend in backends.split(',').map(str::trim) {
        match backend {
            "memory" => {
                for c in [1, 16] {
                    measure("memory", "-", "bench-backlog", n, c)?;
                }
            }
            "redis" => {
                let url = std::env::var("REDIS_URL")
                    .unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into());
                let stream = cqrs::conformance::unique("bench-backlog");
                fill(RedisBackend::connect(&url).await?, &stream, n).await?;
                let mut made = vec![stream.clone()];
                let result = [1, 16].into_iter().try_for_each(|c| {
                    made.extend(measure("redis", &url, &stream, n, c)?);
                    Ok::<_, BoxError>(())
                });
                let mut conn = redis::Client::open(url.as_str())?
                    .get_multiplexed_async_connection()
                    .await?;
                redis::cmd("DEL")
                    .arg(&made)
                    .query_async::<()>(&mut conn)
                    .await?;
                result?;
            }
            "kafka" => {
                let n = kafka_n;
                let topic = cqrs::conformance::unique("bench-backlog");
                let (_broker, config) = support::bench_kafka(16)?;
                let brokers = config.brokers().to_owned();
                let backend = KafkaBackend::connect(config).await?;
                backend.ensure_topics(std::slice::from_ref(&topic)).await?;
                fill(backend, &topic, n).await?;
                // Deleted after, with the dead-letter topics the drains made: a cluster kept
                // between runs (`KAFKA_BROKERS`) kept them all.
                let mut made = vec![topic.clone()];
                let result = [1, 16].into_iter().try_for_each(|c| {
                    made.extend(measure("kafka", &brokers, &topic, n, c)?);
                    Ok::<_, BoxError>(())
                });
                support::delete_kafka_topics(&support::kafka_admin(&brokers)?, &made).await?;
                result?;
            }
            other => return Err(format!("unknown backend {other:?} in BENCH_BACKENDS").into()),
        }
    }
    Ok(())
}
