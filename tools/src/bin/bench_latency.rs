//! Benchmark: how long an event takes from `publish` to its handler, at a fixed rate, for our
//! bus and processor and for the raw client doing the same: `redis` (XADD, XREADGROUP BLOCK,
//! XACK) and `rdkafka` (a `FutureProducer` and a `StreamConsumer` with our backend's settings),
//! plus the in-memory broker.
//!
//! Run with: `cargo run --release -p cqrs-tools --bin bench_latency`
//! (Redis at `REDIS_URL`, default 127.0.0.1:6379; Kafka at `KAFKA_BROKERS`, else an Apache Kafka
//! of its own started by `scripts/kafka`, its log in `/dev/shm` unless `BENCH_KAFKA_DIR` says
//! where (`support::own_kafka`; before 2026-12-03 on disk), 4 partitions). `BENCH_SECS` sets each run's length
//! (default 30), `BENCH_RATES` the rates (default `1000,10000` events/s), `BENCH_BACKENDS` the
//! backends (default `redis,memory,kafka`), `BENCH_KAFKA_FETCH_WAIT_MS` Kafka's
//! `fetch.wait.max.ms` for both clients (default 100, ours). Each run first sends one event and waits for it, so
//! group joins and connections are not measured. On Kafka one broker serves every rate, and both
//! sides run on it unmeasured first for `BENCH_WARMUP_SECS` (default 10) at the first rate.
//!
//! Every millisecond the publisher sends `rate / 1000` events stamped with the send time; the
//! handler records now minus that time. Printed per run: p50, p99, p99.9 and max in
//! microseconds, and ours / raw at p99.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cqrs::kafka::{rdkafka, KafkaBackend};
use cqrs::memory::MemoryBroker;
use cqrs::redis::{redis, RedisBackend};
use cqrs::{Backend, BoxError, CancellationToken, Event, EventBus, EventProcessor};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize};

use cqrs_tools::support;

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
struct Ping {
    sent_us: u64,
    seq: u64,
    pad: String,
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

type Samples = Arc<Mutex<Vec<u64>>>;

fn record(samples: &Samples, sent_us: u64) {
    let lat = now_us().saturating_sub(sent_us);
    samples.lock().unwrap_or_else(|p| p.into_inner()).push(lat);
}

/// Sends `rate` events per second for `secs`, in batches every millisecond. Each batch is sent
/// by a task of its own, so a send that waits (Kafka's `linger.ms`, a delivery report) does not
/// slow the rate down.
async fn drive<F, Fut>(rate: u64, secs: u64, mut send: F) -> Result<u64, BoxError>
where
    F: FnMut(Vec<Ping>) -> Fut,
    Fut: std::future::Future<Output = Result<(), BoxError>> + Send + 'static,
{
    let per_tick = (rate / 1000).max(1);
    let ticks = secs * 1000 * rate.min(1000) / 1000;
    let every = Duration::from_micros(1_000_000 * per_tick / rate);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sends = tokio::task::JoinSet::new();
    let mut seq = 0;
    for _ in 0..ticks {
        tick.tick().await;
        let sent_us = now_us();
        let batch = (0..per_tick)
            .map(|_| {
                seq += 1;
                Ping {
                    sent_us,
                    seq,
                    pad: "x".repeat(120),
                }
            })
            .collect();
        sends.spawn(send(batch));
        while let Some(done) = sends.try_join_next() {
            done??;
        }
    }
    while let Some(done) = sends.join_next().await {
        done??;
    }
    Ok(seq)
}

/// Sends one event and waits until it is handled, then forgets its sample: the consumer has
/// joined its group and the connections are warm before the measured run starts.
async fn warm_up<F, Fut>(samples: &Samples, mut send: F) -> Result<(), BoxError>
where
    F: FnMut(Vec<Ping>) -> Fut,
    Fut: std::future::Future<Output = Result<(), BoxError>>,
{
    let ping = Ping {
        sent_us: now_us(),
        seq: 0,
        pad: String::new(),
    };
    send(vec![ping]).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while samples.lock().map_or(0, |s| s.len()) < 1 {
        if tokio::time::Instant::now() > deadline {
            return Err("the warm-up event was not handled in 60 s".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    samples.lock().map_err(|_| "poisoned")?.clear();
    Ok(())
}

async fn wait_for(samples: &Samples, n: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while samples.lock().map_or(0, |s| s.len() as u64) < n && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Ours: `EventBus::publish_all` per tick, one `EventProcessor` handler with default options.
/// Its latencies, and the dead-letter topics its processor made (for the run to delete).
async fn ours(
    backend: impl Backend + Clone,
    topic: &str,
    rate: u64,
    secs: u64,
) -> Result<(Vec<u64>, Vec<String>), BoxError> {
    let samples: Samples = Arc::default();
    let namer = support::one_topic(topic);
    let mut p = EventProcessor::new(backend.clone(), "bench-latency").topics(namer.clone());
    let s = samples.clone();
    p.handle(&cqrs::conformance::unique("h"), move |e: Ping| {
        record(&s, e.sent_us);
        std::future::ready(Ok::<_, BoxError>(()))
    })?;
    let dead_letters = support::dead_letter_topics(p.manifest());
    let running = p.start(CancellationToken::new()).await?;
    let bus = EventBus::new(backend).topics(namer);
    let send = |batch: Vec<Ping>| {
        let bus = bus.clone();
        async move { Ok(bus.publish_all(&batch).await?) }
    };
    warm_up(&samples, send).await?;
    let sent = drive(rate, secs, send).await?;
    wait_for(&samples, sent).await;
    running.shutdown().await?;
    let out = samples.lock().map_or_else(|_| Vec::new(), |s| s.clone());
    Ok((out, dead_letters))
}

/// Raw: XADD pipelined per tick; one consumer looping XREADGROUP COUNT 100 BLOCK 100, decoding
/// each payload and XACKing each batch.
async fn raw_redis(url: &str, stream: &str, rate: u64, secs: u64) -> Result<Vec<u64>, BoxError> {
    let client = redis::Client::open(url)?;
    let mut publisher = client.get_multiplexed_async_connection().await?;
    let mut reader = client.get_multiplexed_async_connection().await?;
    redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg("g")
        .arg("$")
        .arg("MKSTREAM")
        .query_async::<()>(&mut publisher)
        .await?;
    let samples: Samples = Arc::default();
    let token = CancellationToken::new();
    let consumer = {
        let (samples, token, stream) = (samples.clone(), token.clone(), stream.to_owned());
        tokio::spawn(async move {
            while !token.is_cancelled() {
                let reply: redis::Value = match redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg("g")
                    .arg("c")
                    .arg("COUNT")
                    .arg(100)
                    .arg("BLOCK")
                    .arg(100)
                    .arg("STREAMS")
                    .arg(&stream)
                    .arg(">")
                    .query_async(&mut reader)
                    .await
                {
                    Ok(v) => v,
                    Err(_) => continue,
                };
                let read: redis::streams::StreamReadReply = match redis::from_redis_value(reply) {
                    Ok(r) => r,
                    Err(_) => continue,
                };
                let mut ids = Vec::new();
                for key in read.keys {
                    for entry in key.ids {
                        if let Some(redis::Value::BulkString(p)) = entry.map.get("payload") {
                            if let Ok(ping) = serde_json::from_slice::<Ping>(p) {
                                record(&samples, ping.sent_us);
                            }
                        }
                        ids.push(entry.id);
                    }
                }
                if !ids.is_empty() {
                    let _ = redis::cmd("XACK")
                        .arg(&stream)
                        .arg("g")
                        .arg(&ids)
                        .query_async::<()>(&mut reader)
                        .await;
                }
            }
        })
    };
    let send = |batch: Vec<Ping>| {
        let mut conn = publisher.clone();
        let stream = stream.to_owned();
        async move {
            let mut pipe = redis::pipe();
            for e in &batch {
                pipe.cmd("XADD")
                    .arg(&stream)
                    .arg("*")
                    .arg("name")
                    .arg("Ping")
                    .arg("payload")
                    .arg(serde_json::to_vec(e)?)
                    .ignore();
            }
            pipe.query_async::<()>(&mut conn).await?;
            Ok(())
        }
    };
    warm_up(&samples, send).await?;
    let sent = drive(rate, secs, send).await?;
    wait_for(&samples, sent).await;
    token.cancel();
    let _ = consumer.await;
    let out = samples.lock().map_or_else(|_| Vec::new(), |s| s.clone());
    Ok(out)
}

/// p50, p99, p99.9, max in microseconds.
fn percentiles(mut v: Vec<u64>) -> [u64; 4] {
    if v.is_empty() {
        return [0; 4];
    }
    v.sort_unstable();
    let at = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)];
    [at(0.5), at(0.99), at(0.999), v[v.len() - 1]]
}

fn row(name: &str, rate: u64, v: Vec<u64>) -> [u64; 4] {
    let n = v.len();
    let p = percentiles(v);
    println!(
        "| {name} | {rate} | {n} | {} | {} | {} | {} |",
        p[0], p[1], p[2], p[3]
    );
    p
}

/// Raw Kafka: a `FutureProducer` with our producer settings (idempotent, `linger.ms=0`) sends
/// each tick's records and awaits their deliveries; a `StreamConsumer` with our consumer settings
/// (`fetch.wait.max.ms` as ours, offsets stored after handling, auto commit every second) decodes
/// each payload.
async fn raw_kafka(brokers: &str, topic: &str, rate: u64, secs: u64) -> Result<Vec<u64>, BoxError> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "0")
        .set("message.timeout.ms", "30000")
        .create()?;
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", cqrs::conformance::unique("raw"))
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set("auto.commit.interval.ms", "1000")
        .set("auto.offset.reset", "earliest")
        .set(
            "fetch.wait.max.ms",
            support::kafka_fetch_wait_ms().to_string(),
        )
        .set("enable.partition.eof", "false")
        .create()?;
    consumer.subscribe(&[topic])?;
    let samples: Samples = Arc::default();
    let token = CancellationToken::new();
    let reader = {
        let (samples, token) = (samples.clone(), token.clone());
        tokio::spawn(async move {
            loop {
                let m = tokio::select! {
                    _ = token.cancelled() => break,
                    m = consumer.recv() => m,
                };
                let Ok(m) = m else { continue };
                if let Ok(ping) = serde_json::from_slice::<Ping>(m.payload().unwrap_or_default()) {
                    record(&samples, ping.sent_us);
                }
                let _ = consumer.store_offset_from_message(&m);
            }
        })
    };
    let send = |batch: Vec<Ping>| {
        let (producer, topic) = (producer.clone(), topic.to_owned());
        async move {
            let mut deliveries = Vec::with_capacity(batch.len());
            for e in &batch {
                let payload = serde_json::to_vec(e)?;
                let key = e.seq.to_string();
                let record = FutureRecord::to(&topic).key(&key).payload(&payload);
                deliveries.push(producer.send_result(record).map_err(|(e, _)| e)?);
            }
            for d in deliveries {
                d.await?.map_err(|(e, _)| e)?;
            }
            Ok(())
        }
    };
    warm_up(&samples, send).await?;
    let sent = drive(rate, secs, send).await?;
    wait_for(&samples, sent).await;
    token.cancel();
    let _ = reader.await;
    let out = samples.lock().map_or_else(|_| Vec::new(), |s| s.clone());
    Ok(out)
}

/// How long each side runs, unmeasured, on a broker of the benchmark's own before the first
/// Kafka run: `BENCH_WARMUP_SECS`, default 10.
///
/// Each rate had a new broker, and the raw side ran first on it: its JVM not warmed up yet, the
/// raw side's p99 at 1,000 events/s was 94 ms and ours 5 ms (ours / raw 0.05), where both were
/// ~8-10 ms on a broker that had run before (docs/benchmarks.md).
async fn warm_kafka(config: &cqrs::kafka::KafkaConfig, rate: u64) -> Result<(), BoxError> {
    let secs: u64 = cqrs_tools::support::env_or("BENCH_WARMUP_SECS", 10);
    if secs > 0 {
        kafka_runs(config, rate, secs).await?;
    }
    Ok(())
}

/// A run of the raw side, then one of ours, each on a new topic of the broker `config` names:
/// their latencies. The topics the runs made are deleted after (a broker kept between runs,
/// `KAFKA_BROKERS`, kept them all, the dead-letter topic of each run's new group too).
async fn kafka_runs(
    config: &cqrs::kafka::KafkaConfig,
    rate: u64,
    secs: u64,
) -> Result<(Vec<u64>, Vec<u64>), BoxError> {
    let (raw_t, ours_t) = (
        cqrs::conformance::unique("bench-latency-raw"),
        cqrs::conformance::unique("bench-latency-ours"),
    );
    let backend = KafkaBackend::connect(config.clone()).await?;
    backend
        .ensure_topics(&[raw_t.clone(), ours_t.clone()])
        .await?;
    let raw = raw_kafka(config.brokers(), &raw_t, rate, secs).await?;
    let (ours, dead_letters) = ours(backend, &ours_t, rate, secs).await?;
    let made: Vec<&String> = [&raw_t, &ours_t].into_iter().chain(&dead_letters).collect();
    support::delete_kafka_topics(&support::kafka_admin(config.brokers())?, &made).await?;
    Ok((raw, ours))
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    cqrs_tools::support::init_logs();
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into());
    let secs: u64 = cqrs_tools::support::env_or("BENCH_SECS", 30);
    let rates: Vec<u64> = std::env::var("BENCH_RATES")
        .unwrap_or_else(|_| "1000,10000".into())
        .split(',')
        .filter_map(|r| r.trim().parse().ok())
        .collect();
    let backends = std::env::var("BENCH_BACKENDS").unwrap_or_else(|_| "redis,memory,kafka".into());
    println!("publish-to-handler latency, microseconds, {secs} s per run");
    println!("| run | events/s | handled | p50 | p99 | p99.9 | max |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let mut ratios = Vec::new();
    // The Kafka broker of the runs (its own, unless `KAFKA_BROKERS` names one), and its settings.
    let mut kafka = None;
    for backend in backends.split(',').map(str::trim) {
        for &rate in &rates {
            match backend {
                "redis" => {
                    let ours_backend = RedisBackend::connect(&url).await?;
                    let stream = cqrs::conformance::unique("bench-latency-raw");
                    let r = row(
                        "redis raw",
                        rate,
                        raw_redis(&url, &stream, rate, secs).await?,
                    );
                    let ours_stream = cqrs::conformance::unique("bench-latency-ours");
                    let (o, dead_letters) = ours(ours_backend, &ours_stream, rate, secs).await?;
                    let o = row("redis ours", rate, o);
                    ratios.push(("Redis", rate, o[1] as f64 / r[1].max(1) as f64));
                    let mut conn = redis::Client::open(url.as_str())?
                        .get_multiplexed_async_connection()
                        .await?;
                    redis::cmd("DEL")
                        .arg(&stream)
                        .arg(&ours_stream)
                        .arg(&dead_letters)
                        .query_async::<()>(&mut conn)
                        .await?;
                }
                "memory" => {
                    let (o, _) = ours(MemoryBroker::new(), "bench-latency", rate, secs).await?;
                    row("in-memory ours", rate, o);
                }
                "kafka" => {
                    // One broker for every rate, warmed up first (see `warm_kafka`).
                    if kafka.is_none() {
                        let (server, config) = support::bench_kafka(4)?;
                        let config = config
                            .fetch_wait(Duration::from_millis(support::kafka_fetch_wait_ms()));
                        warm_kafka(&config, rate).await?;
                        kafka = Some((server, config));
                    }
                    let Some((_, config)) = &kafka else {
                        return Err("no Kafka broker".into());
                    };
                    let (raw, ours) = kafka_runs(config, rate, secs).await?;
                    let r = row("kafka raw", rate, raw);
                    let o = row("kafka ours", rate, ours);
                    ratios.push(("Kafka", rate, o[1] as f64 / r[1].max(1) as f64));
                }
                other => return Err(format!("unknown backend {other:?} in BENCH_BACKENDS").into()),
            }
        }
    }
    for (backend, rate, ratio) in ratios {
        println!("ours / raw at p99, {rate}/s on {backend}: {ratio:.2}");
    }
    Ok(())
}
