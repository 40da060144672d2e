//! Benchmark: how long an event takes from `publish` to its handler, at a fixed rate, for our
//! bus and processor and for the raw `redis` client doing the same (XADD, XREADGROUP BLOCK, XACK),
//! plus the in-memory broker.
//!
//! Run with: `cargo run --release --example bench_latency --features redis`
//! (needs redis-server on 127.0.0.1:6379, or `REDIS_URL`). `BENCH_SECS` sets each run's length
//! (default 30), `BENCH_RATES` the rates (default `1000,10000` events/s).
//!
//! Every millisecond the publisher sends `rate / 1000` events stamped with the send time; the
//! handler records now minus that time. Printed per run: p50, p99, p99.9 and max in
//! microseconds, and ours / raw at p99.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cqrs::memory::MemoryBroker;
use cqrs::redis::{redis, RedisBackend};
use cqrs::{Backend, BoxError, CancellationToken, Event, EventBus, EventProcessor, TopicNamer};
use serde::{Deserialize, Serialize};

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

/// Sends `rate` events per second for `secs`, in batches every millisecond.
async fn drive<F, Fut>(rate: u64, secs: u64, mut send: F) -> Result<(), BoxError>
where
    F: FnMut(Vec<Ping>) -> Fut,
    Fut: std::future::Future<Output = Result<(), BoxError>>,
{
    let per_tick = (rate / 1000).max(1);
    let ticks = secs * 1000 * rate.min(1000) / 1000;
    let every = Duration::from_micros(1_000_000 * per_tick / rate);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
        send(batch).await?;
    }
    Ok(())
}

async fn wait_for(samples: &Samples, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while samples.lock().map_or(0, |s| s.len()) < n && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Ours: `EventBus::publish_all` per tick, one `EventProcessor` handler with default options.
async fn ours(
    backend: impl Backend + Clone,
    topic: &str,
    rate: u64,
    secs: u64,
) -> Result<Vec<u64>, BoxError> {
    let samples: Samples = Arc::default();
    let t = topic.to_owned();
    let namer = TopicNamer::new(move |_| t.clone());
    let mut p = EventProcessor::new(backend.clone(), "bench-latency").topics(namer.clone());
    let s = samples.clone();
    p.handle(&cqrs::conformance::unique("h"), move |e: Ping| {
        record(&s, e.sent_us);
        std::future::ready(Ok::<_, BoxError>(()))
    })?;
    let running = p.start(CancellationToken::new()).await?;
    let bus = EventBus::new(backend).topics(namer);
    let mut sent = 0;
    drive(rate, secs, |batch| {
        sent += batch.len();
        let bus = bus.clone();
        async move { Ok(bus.publish_all(&batch).await?) }
    })
    .await?;
    wait_for(&samples, sent).await;
    running.shutdown().await?;
    let out = samples.lock().map_or_else(|_| Vec::new(), |s| s.clone());
    Ok(out)
}

/// Raw: XADD pipelined per tick; one consumer looping XREADGROUP COUNT 100 BLOCK 100, decoding
/// each payload and XACKing each batch.
async fn raw(url: &str, stream: &str, rate: u64, secs: u64) -> Result<Vec<u64>, BoxError> {
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
    let mut sent = 0;
    drive(rate, secs, |batch| {
        sent += batch.len();
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
    })
    .await?;
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

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into());
    let secs: u64 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let rates: Vec<u64> = std::env::var("BENCH_RATES")
        .unwrap_or_else(|_| "1000,10000".into())
        .split(',')
        .filter_map(|r| r.trim().parse().ok())
        .collect();
    let backend = RedisBackend::connect(&url).await?;
    println!("publish-to-handler latency, microseconds, {secs} s per run");
    println!("| run | events/s | handled | p50 | p99 | p99.9 | max |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let mut ratios = Vec::new();
    for rate in rates {
        let stream = cqrs::conformance::unique("bench-latency-raw");
        let r = row("redis raw", rate, raw(&url, &stream, rate, secs).await?);
        let ours_stream = cqrs::conformance::unique("bench-latency-ours");
        let o = row(
            "redis ours",
            rate,
            ours(backend.clone(), &ours_stream, rate, secs).await?,
        );
        row(
            "in-memory ours",
            rate,
            ours(MemoryBroker::new(), "bench-latency", rate, secs).await?,
        );
        ratios.push((rate, o[1] as f64 / r[1].max(1) as f64));
        let mut conn = redis::Client::open(url.as_str())?
            .get_multiplexed_async_connection()
            .await?;
        redis::cmd("DEL")
            .arg(&stream)
            .arg(&ours_stream)
            .query_async::<()>(&mut conn)
            .await?;
    }
    for (rate, ratio) in ratios {
        println!("ours / raw at p99, {rate}/s on Redis: {ratio:.2}");
    }
    Ok(())
}
