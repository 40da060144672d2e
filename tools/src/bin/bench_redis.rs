//! Benchmark: the raw `redis` client against our typed bus and processor, in one run, on the same
//! Redis server.
//!
//! Run with: `cargo run --release -p cqrs-tools --bin bench_redis`
//! (needs redis-server on 127.0.0.1:6379, or `REDIS_URL`; `BENCH_N` sets the event count).
//!
//! Each figure is msg/s for 200-byte JSON events; `ratio` is ours / raw. The raw client encodes
//! each event with serde_json and does `XADD` (a message id, a UUIDv7 as ours writes; name,
//! content type, payload) pipelined by 100, or one awaited `XADD` per event from 64 tasks; it
//! consumes with `XREADGROUP COUNT 500`, decodes each payload into the event type and sends one
//! `XACK` per batch. Ours does the same work through `EventBus` and `EventProcessor` (which also
//! read the version and creation time). Each round measures every figure in both orders (ours
//! then raw, raw then ours) and gives each side the mean of its two runs: the side measured
//! second ran faster ([`cqrs_tools::support::both_orders`]).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cqrs::redis::{redis, RedisBackend};
use cqrs::{BoxError, CancellationToken, Event, EventBus, EventProcessor, TopicNamer};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
struct Packet {
    device: String,
    counter: u64,
    error: String,
}

fn event(i: u64) -> Packet {
    // 200 bytes of JSON.
    let mut p = Packet {
        device: format!("router-{:04}", i % 1000),
        counter: i,
        error: String::new(),
    };
    let len = serde_json::to_vec(&p).map(|v| v.len()).unwrap_or(0);
    p.error = "x".repeat(200usize.saturating_sub(len));
    p
}

const TASKS: usize = 64;

/// A UUIDv7 message id, hyphenated (the raw side's, written as cheaply as ours is).
fn message_id(buf: &mut [u8; 36]) -> &str {
    uuid::Uuid::now_v7().hyphenated().encode_lower(buf)
}

struct Bench {
    url: String,
    n: usize,
    run: String,
}

impl Bench {
    fn stream(&self, what: &str) -> String {
        format!("bench-{}-{what}", self.run)
    }

    /// The streams of a figure measured in both orders: raw's two, ours' two (one a run).
    fn streams(&self, what: &str) -> ([String; 2], [String; 2]) {
        let two = |side: &str| [0, 1].map(|run| self.stream(&format!("{side}-{what}{run}")));
        (two("raw"), two("ours"))
    }

    async fn conn(&self) -> Result<redis::aio::MultiplexedConnection, BoxError> {
        Ok(redis::Client::open(self.url.as_str())?
            .get_multiplexed_async_connection()
            .await?)
    }

    async fn cleanup(&self, streams: &[String]) -> Result<(), BoxError> {
        let mut c = self.conn().await?;
        redis::cmd("DEL")
            .arg(streams)
            .query_async::<()>(&mut c)
            .await?;
        Ok(())
    }

    /// XADDs `n` events with the same fields our bus writes, pipelined by 100.
    async fn raw_fill(&self, stream: &str) -> Result<Duration, BoxError> {
        let mut c = self.conn().await?;
        let events: Vec<Packet> = (0..self.n as u64).map(event).collect();
        let start = Instant::now();
        for chunk in events.chunks(100) {
            let mut pipe = redis::pipe();
            for e in chunk {
                let p = serde_json::to_vec(e)?;
                let cmd = pipe.cmd("XADD").arg(stream).arg("*");
                cmd.arg("id")
                    .arg(message_id(&mut [0; 36]))
                    .arg("name")
                    .arg("Packet")
                    .arg("content-type")
                    .arg("application/json")
                    .arg("payload")
                    .arg(p)
                    .ignore();
            }
            pipe.query_async::<()>(&mut c).await?;
        }
        Ok(start.elapsed())
    }

    /// One awaited `XADD` per event from `TASKS` tasks, each on its own clone of a multiplexed
    /// connection. `BENCH_RAW_CM=task|call` publishes through a `ConnectionManager` instead
    /// (what our backend holds), cloned once per task or per publish as our bus does: whether
    /// the manager, not our code, costs what ours lacks.
    async fn raw_publish_one_by_one(&self, stream: &str) -> Result<Duration, BoxError> {
        let client = redis::Client::open(self.url.as_str())?;
        match std::env::var("BENCH_RAW_CM").ok().as_deref() {
            None => {
                let c = client.get_multiplexed_async_connection().await?;
                self.raw_one_by_one(stream, c, false).await
            }
            Some(how @ ("task" | "call")) => {
                let c = client.get_connection_manager().await?;
                self.raw_one_by_one(stream, c, how == "call").await
            }
            Some(other) => Err(format!("BENCH_RAW_CM={other}: task or call").into()),
        }
    }

    /// [`Bench::raw_publish_one_by_one`] on `conn`, cloned per task, or per publish when
    /// `per_call`.
    async fn raw_one_by_one<C>(
        &self,
        stream: &str,
        conn: C,
        per_call: bool,
    ) -> Result<Duration, BoxError>
    where
        C: redis::aio::ConnectionLike + Clone + Send + 'static,
    {
        let per_task = self.n / TASKS;
        let start = Instant::now();
        let mut tasks = Vec::new();
        for t in 0..TASKS {
            let (mut c, conn) = (conn.clone(), conn.clone());
            let stream = stream.to_owned();
            tasks.push(tokio::spawn(async move {
                for i in 0..per_task {
                    if per_call {
                        c = conn.clone();
                    }
                    let p = serde_json::to_vec(&event((t * per_task + i) as u64))?;
                    redis::cmd("XADD")
                        .arg(&stream)
                        .arg("*")
                        .arg("id")
                        .arg(message_id(&mut [0; 36]))
                        .arg("name")
                        .arg("Packet")
                        .arg("content-type")
                        .arg("application/json")
                        .arg("payload")
                        .arg(p)
                        .query_async::<String>(&mut c)
                        .await?;
                }
                Ok::<_, BoxError>(())
            }));
        }
        for t in tasks {
            t.await??;
        }
        Ok(start.elapsed())
    }

    /// `members` raw consumers of one group drain `n` entries with XREADGROUP COUNT 500 + XACK.
    async fn raw_consume(
        &self,
        stream: &str,
        members: usize,
        n: usize,
    ) -> Result<Duration, BoxError> {
        // From before the group is made, as ours is timed from before its processors start.
        let start = Instant::now();
        // A group of its own each time: a figure reads its stream more than once.
        let group = cqrs::conformance::unique(&format!("raw-{members}-{}", self.run));
        let mut c = self.conn().await?;
        let _: Result<(), _> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(stream)
            .arg(&group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut c)
            .await;
        let done = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for m in 0..members {
            let mut c = self.conn().await?;
            let (stream, group, done) = (stream.to_owned(), group.clone(), done.clone());
            tasks.push(tokio::spawn(async move {
                let mut last = None;
                while done.load(Ordering::SeqCst) < n {
                    let reply: redis::Value = redis::cmd("XREADGROUP")
                        .arg("GROUP")
                        .arg(&group)
                        .arg(format!("m{m}"))
                        .arg("COUNT")
                        .arg(500)
                        .arg("BLOCK")
                        .arg(100)
                        .arg("STREAMS")
                        .arg(&stream)
                        .arg(">")
                        .query_async(&mut c)
                        .await?;
                    let (ids, payloads) = entries(&reply);
                    if ids.is_empty() {
                        continue;
                    }
                    for p in payloads {
                        let _: Packet = serde_json::from_slice(&p)?;
                    }
                    let _: i64 = redis::cmd("XACK")
                        .arg(&stream)
                        .arg(&group)
                        .arg(&ids)
                        .query_async(&mut c)
                        .await?;
                    let before = done.fetch_add(ids.len(), Ordering::SeqCst);
                    if before < n && before + ids.len() >= n {
                        last = Some(start.elapsed());
                    }
                }
                Ok::<_, BoxError>(last)
            }));
        }
        let mut elapsed = None;
        for t in tasks {
            elapsed = elapsed.or(t.await??);
        }
        // Timed to the last event handled, as ours is: not the other member's last
        // `BLOCK`, as ours does not count its processors' stop.
        Ok(elapsed.ok_or("no member handled the last event")?)
    }

    async fn ours_publish_batched(&self, bus: &EventBus) -> Result<Duration, BoxError> {
        let events: Vec<Packet> = (0..self.n as u64).map(event).collect();
        let start = Instant::now();
        for chunk in events.chunks(100) {
            bus.publish_all(chunk).await?;
        }
        Ok(start.elapsed())
    }

    async fn ours_publish_one_by_one(&self, bus: &EventBus) -> Result<Duration, BoxError> {
        cqrs_tools::support::publish_one_by_one(bus, self.n, TASKS, event).await
    }

    /// `members` processors of one service drain `n` events.
    async fn ours_consume(
        &self,
        backend: &RedisBackend,
        stream: &str,
        members: usize,
        n: usize,
    ) -> Result<Duration, BoxError> {
        let handled = Arc::new(AtomicUsize::new(0));
        let all = Arc::new(tokio::sync::Notify::new());
        let token = CancellationToken::new();
        // A service (so a group) of its own each time: a figure reads its stream more than once.
        let service = cqrs::conformance::unique(&format!("ours-{members}-{}", self.run));
        let start = Instant::now();
        let mut running = Vec::new();
        for _ in 0..members {
            let topic = stream.to_owned();
            let mut p = EventProcessor::new(backend.clone(), service.clone())
                .topics(TopicNamer::new(move |_| topic.clone()));
            let (h, all) = (handled.clone(), all.clone());
            p.handle("count", move |_: Packet| {
                // The handler that handles the last event says so: the clock stops then, as
                // the raw side's does (no polling, which would wake a thread every millisecond).
                if h.fetch_add(1, Ordering::Relaxed) + 1 == n {
                    all.notify_one();
                }
                std::future::ready(Ok::<_, BoxError>(()))
            })?
            .batch_size(500);
            running.push(p.start(token.clone()).await?);
        }
        all.notified().await;
        let elapsed = start.elapsed();
        token.cancel();
        for r in running {
            r.wait().await?;
        }
        Ok(elapsed)
    }
}

/// The ids and payloads of an XREADGROUP reply.
fn entries(v: &redis::Value) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    use redis::Value::{Array, BulkString};
    let (mut ids, mut payloads) = (Vec::new(), Vec::new());
    let Array(streams) = v else {
        return (ids, payloads);
    };
    for s in streams {
        let Array(parts) = s else { continue };
        let Some(Array(entries)) = parts.get(1) else {
            continue;
        };
        for e in entries {
            let Array(e) = e else { continue };
            if let Some(BulkString(id)) = e.first() {
                ids.push(id.clone());
            }
            if let Some(Array(fields)) = e.get(1) {
                for kv in fields.chunks_exact(2) {
                    if let (BulkString(k), BulkString(v)) = (&kv[0], &kv[1]) {
                        if k == b"payload" {
                            payloads.push(v.clone());
                        }
                    }
                }
            }
        }
    }
    (ids, payloads)
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Per figure, the msg/s of every round: (name, raw, ours).
#[derive(Default)]
struct Table(Vec<(String, Vec<f64>, Vec<f64>)>);

impl Table {
    fn add(&mut self, name: &str, n: usize, raw: Duration, ours: Duration) {
        let (r, o) = (rate(n, raw), rate(n, ours));
        println!("  {name:<38} {r:>10.0} {o:>10.0} {:>6.2}", o / r);
        match self.0.iter_mut().find(|(k, _, _)| k == name) {
            Some((_, rs, os)) => {
                rs.push(r);
                os.push(o);
            }
            None => self.0.push((name.to_owned(), vec![r], vec![o])),
        }
    }

    fn print(&self) {
        println!("\nmedian of the rounds");
        println!(
            "{:<40} {:>10} {:>10} {:>6}",
            "figure (msg/s)", "raw", "ours", "ratio"
        );
        for (name, rs, os) in &self.0 {
            let (r, o) = (median(rs.clone()), median(os.clone()));
            println!("{name:<40} {r:>10.0} {o:>10.0} {:>6.2}", o / r);
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    cqrs_tools::support::init_logs();
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into());
    let n: usize = cqrs_tools::support::env_or("BENCH_N", 200_000);
    let rounds: usize = cqrs_tools::support::env_or("BENCH_ROUNDS", 3);
    let backend = RedisBackend::connect(&url).await?;
    // One phase alone, for counting instructions (`perf stat -e instructions:u`, callgrind):
    // `publish-one-raw` or `publish-one-ours` (one event per call from 64 tasks); or, on the
    // stream `BENCH_STREAM`, `fill` (ours, in batches of 100), then `consume-raw` or
    // `consume-ours` (`BENCH_MEMBERS` members, default 1, of a new group read `BENCH_N` events,
    // which stay).
    if let Ok(only) = std::env::var("BENCH_ONLY") {
        let b = Bench {
            url: url.clone(),
            n,
            run: cqrs::conformance::unique("only"),
        };
        if let Ok(stream) = std::env::var("BENCH_STREAM") {
            let members = cqrs_tools::support::env_or("BENCH_MEMBERS", 1);
            let took = match only.as_str() {
                "fill" => b.ours_publish_batched(&bus_for(&backend, &stream)).await?,
                "consume-raw" => b.raw_consume(&stream, members, n).await?,
                "consume-ours" => b.ours_consume(&backend, &stream, members, n).await?,
                other => {
                    return Err(format!(
                        "BENCH_ONLY={other} with BENCH_STREAM: fill, consume-raw or consume-ours"
                    )
                    .into())
                }
            };
            println!("{only}: {n} events on {stream} in {took:?}");
            return Ok(());
        }
        let stream = b.stream(&only);
        let took = match only.as_str() {
            "publish-one-raw" => b.raw_publish_one_by_one(&stream).await?,
            "publish-one-ours" => {
                b.ours_publish_one_by_one(&bus_for(&backend, &stream))
                    .await?
            }
            other => {
                return Err(
                    format!("BENCH_ONLY={other}: publish-one-raw or publish-one-ours").into(),
                )
            }
        };
        println!("{only}: {n} events in {took:?}");
        b.cleanup(&[stream]).await?;
        return Ok(());
    }
    println!(
        "{n} events of ~200 bytes of JSON, Redis at {}, {rounds} rounds",
        cqrs::redis::redact(&url)
    );
    let mut table = Table::default();
    for round in 1..=rounds {
        println!("round {round}");
        let b = Bench {
            url: url.clone(),
            n,
            run: cqrs::conformance::unique("r"),
        };
        one_round(&b, &backend, &mut table, round % 2 == 0).await?;
    }
    table.print();
    Ok(())
}

fn bus_for(backend: &RedisBackend, stream: &str) -> EventBus {
    let s = stream.to_owned();
    EventBus::new(backend.clone()).topics(TopicNamer::new(move |_| s.clone()))
}

/// [`cqrs_tools::support::both_orders`] (each figure in both orders, each side the mean of its
/// two runs), and with `BENCH_TIMINGS` set, prints the CPU each side used in a run: this
/// process's, and the server's when `BENCH_SERVER_PID` names it (redis-server is one thread:
/// where it is the bottleneck, the commands a side sends decide its rate).
async fn pair<R, RF, O, OF>(
    ours_first: bool,
    mut raw: RF,
    mut ours: OF,
) -> Result<(Duration, Duration), BoxError>
where
    RF: FnMut(usize) -> R,
    OF: FnMut(usize) -> O,
    R: std::future::Future<Output = Result<Duration, BoxError>>,
    O: std::future::Future<Output = Result<Duration, BoxError>>,
{
    let zero = (Duration::ZERO, Duration::ZERO);
    let (raw_cpu, ours_cpu) = (std::cell::Cell::new(zero), std::cell::Cell::new(zero));
    let times = cqrs_tools::support::both_orders(
        ours_first,
        |run| adding_cpu(&raw_cpu, raw(run)),
        |run| adding_cpu(&ours_cpu, ours(run)),
    )
    .await?;
    if std::env::var_os("BENCH_TIMINGS").is_some() {
        let ms = |d: Duration| d.as_millis() / 2;
        let (r, o) = (raw_cpu.get(), ours_cpu.get());
        println!(
            "    CPU ms a run, this process / the server: raw {} / {}, ours {} / {}",
            ms(r.0),
            ms(r.1),
            ms(o.0),
            ms(o.1)
        );
    }
    Ok(times)
}

/// Awaits `f`, with the CPU this process and the server (`BENCH_SERVER_PID`) used meanwhile.
async fn with_cpu<T>(
    f: impl std::future::Future<Output = Result<T, BoxError>>,
) -> Result<(T, (Duration, Duration)), BoxError> {
    let server = std::env::var("BENCH_SERVER_PID").ok();
    let server_cpu = || {
        server
            .as_deref()
            .map_or(Duration::ZERO, cqrs_tools::support::cpu_time)
    };
    let (me, them) = (cqrs_tools::support::cpu_time("self"), server_cpu());
    let t = f.await?;
    Ok((
        t,
        (
            cqrs_tools::support::cpu_time("self") - me,
            server_cpu() - them,
        ),
    ))
}

/// `f`'s result, with the CPU this process and the server used meanwhile ([`with_cpu`]) added
/// to `spent`.
async fn adding_cpu<T>(
    spent: &std::cell::Cell<(Duration, Duration)>,
    f: impl std::future::Future<Output = Result<T, BoxError>>,
) -> Result<T, BoxError> {
    let (t, (me, server)) = with_cpu(f).await?;
    let (a, b) = spent.get();
    spent.set((a + me, b + server));
    Ok(t)
}

/// One round of every figure, each measured in both orders ([`pair`]); rounds alternate which
/// order comes first.
async fn one_round(
    b: &Bench,
    backend: &RedisBackend,
    table: &mut Table,
    ours_first: bool,
) -> Result<(), BoxError> {
    let n = b.n;
    // Publish, pipelined by 100, each run on a stream of its own.
    let (raw_s, ours_s) = b.streams("pub");
    let (raw, ours) = pair(
        ours_first,
        |run| b.raw_fill(&raw_s[run]),
        |run| {
            let ours_s = &ours_s;
            async move {
                b.ours_publish_batched(&bus_for(backend, &ours_s[run]))
                    .await
            }
        },
    )
    .await?;
    table.add("publish, batches of 100", n, raw, ours);

    // Consume what was just published: 1 member, then 2 members; each run a new group.
    for (members, figure) in [(1, "consume, 1 member"), (2, "consume, 2 members")] {
        let (raw, ours) = pair(
            ours_first,
            |_| b.raw_consume(&raw_s[0], members, n),
            |_| b.ours_consume(backend, &ours_s[0], members, n),
        )
        .await?;
        table.add(figure, n, raw, ours);
    }
    b.cleanup(&[raw_s, ours_s].concat()).await?;

    // Publish one event per call from 64 tasks.
    let (raw_s, ours_s) = b.streams("one");
    let (raw, ours) = pair(
        ours_first,
        |run| b.raw_publish_one_by_one(&raw_s[run]),
        |run| {
            let ours_s = &ours_s;
            async move {
                b.ours_publish_one_by_one(&bus_for(backend, &ours_s[run]))
                    .await
            }
        },
    )
    .await?;
    table.add(
        &format!("publish, 1 per call from {TASKS} tasks"),
        n / TASKS * TASKS,
        raw,
        ours,
    );
    b.cleanup(&[raw_s, ours_s].concat()).await?;

    // End to end: a consumer running while the publisher publishes.
    let (raw_s, ours_s) = b.streams("e2e");
    let (raw, ours) = pair(
        ours_first,
        |run| {
            let s = &raw_s[run];
            async move {
                let (c, p) = tokio::join!(b.raw_consume(s, 1, n), b.raw_fill(s));
                p?;
                // From the first publish to the last event handled (both start at once).
                c
            }
        },
        |run| {
            let s = &ours_s[run];
            async move {
                let bus = bus_for(backend, s);
                let (c, p) = tokio::join!(
                    b.ours_consume(backend, s, 1, n),
                    b.ours_publish_batched(&bus)
                );
                p?;
                c
            }
        },
    )
    .await?;
    table.add("publish + consume, end to end", n, raw, ours);
    b.cleanup(&[raw_s, ours_s].concat()).await?;
    Ok(())
}
