//! A fault-injection soak: nothing is lost while consumers are SIGKILLed, connections are cut and
//! the broker restarts.
//!
//! Run with: `scripts/soak redis [N]` or `scripts/soak kafka [N]` (the script builds this example
//! with every feature and runs `soak run BACKEND --events N`). It needs `redis-server` (Redis) or
//! a JDK and Maven (Kafka: an Apache Kafka of its own, started through `scripts/kafka`).
//!
//! One process plays the orchestrator. It starts the broker (its own `redis-server` with AOF and
//! `appendfsync always` on a free port, or its own Apache Kafka with its log on disk), a publisher
//! process that
//! publishes N keyed events with a sequence number at a steady rate, and three consumer processes
//! of one service (one handler, concurrency 8). Each consumer appends every event it handled to a
//! file of its own, outside the broker. Handlers fail 10% of the time (retried) and every
//! hundredth event is poison (a permanent error, dead-lettered). While events flow the
//! orchestrator SIGKILLs one consumer every `--kill-every` seconds and starts it again; on Redis it
//! also kills every client connection every `--conn-kill-every` seconds. The broker is restarted
//! once, halfway through publishing (Redis: `SHUTDOWN`; Kafka: SIGKILL), unless
//! `--broker-restart no`. On Kafka `--protocol eager|cooperative|consumer` picks the group
//! protocol (the classic one with an eager or the cooperative-sticky assignor, or KIP-848's, the
//! default); `--cluster 3` runs on a 3-node cluster and SIGKILLs a partition leader. When the publisher is done it waits until the group has
//! nothing left, reads the dead-letter topic with the raw client and prints one line:
//!
//! `soak: backend=redis events=N lost=0 duplicates=D (P%) dead_lettered=X poison_missing=0 ...`
//!
//! ending, when events were handled twice, with `handled_again=3-1>0-2:151,...`: the pairs of
//! consumers (`index-generation`, as their files are named) that handled the same events, the one
//! that handled them first and the one that handled them again, with how many, the largest first.
//! A member killed with work handled and not acked shows as one large pair.
//!
//! `acks_given_up=lines:messages` counts the acks the consumers gave up on (their stderr). With
//! `--keep-files yes` the files stay where the first line says.
//!
//! It exits non-zero if anything was lost, a poison event is missing from the dead-letter topic,
//! or duplicates pass `--max-duplicates-pct`.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cqrs::kafka::{rdkafka, GroupProtocol, KafkaBackend, KafkaConfig};
use cqrs::redis::{redis, RedisBackend};
use cqrs::{
    permanent, Backend, BoxError, CancellationToken, Event, EventBus, EventProcessor, RetryPolicy,
};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};

use cqrs_tools::support::{self, Args};
const TOPIC: &str = "soak.ticks";
const SERVICE: &str = "soak";
const HANDLER: &str = "record";
const GROUP: &str = "soak.record";
const DEAD_LETTER: &str = "soak.record.dead-letter";
const CONSUMERS: usize = 3;
const KAFKA_PARTITIONS: i32 = 8;
/// One event in this many is poison.
const POISON_EVERY: u64 = 100;
/// Percent of handler calls that fail with a transient error.
const TRANSIENT_FAILURE_PCT: u64 = 10;

#[derive(Debug, Clone, Event, Serialize, Deserialize)]
#[event(name = "soak.Tick", topic = "soak.ticks")]
struct Tick {
    seq: u64,
    #[event(key)]
    key: String,
    /// When it was published, in milliseconds since the Unix epoch.
    #[serde(default)]
    at_ms: u64,
}

fn is_poison(seq: u64) -> bool {
    seq % POISON_EVERY == 0
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    cqrs_tools::support::init_logs();
    let mut args = std::env::args().skip(1);
    let role = args.next().unwrap_or_default();
    let args = Args::parse(args)?;
    match role.as_str() {
        "run" => orchestrate(args).await,
        "publish" => publish(args).await,
        "consume" => consume(args).await,
        other => Err(format!(
            "unknown role `{other}`: use `soak run redis|kafka [--events N] [--rate R] \
             [--kill-every S] [--conn-kill-every S] [--claim-idle-ms MS] [--max-duplicates-pct P]`"
        )
        .into()),
    }
}

// ---------------------------------------------------------------------------------------------
// Children: publisher, consumer.

/// Connects the backend named `--backend` at `--url` and runs `f` with it.
macro_rules! with_backend {
    ($args:expr, |$b:ident| $body:expr) => {{
        let url = $args.text("url")?;
        match $args.text("backend")?.as_str() {
            "redis" => {
                let $b = RedisBackend::connect(&url).await?;
                $body
            }
            "kafka" => {
                let commit = Duration::from_millis($args.get("commit-interval-ms", 100)?);
                let protocol: String = $args.get("protocol", "consumer".to_owned())?;
                let config = kafka_config(&url, commit, &protocol)?
                    .commit_every($args.get("commit-every", 250)?)
                    .max_unrecorded($args.get("max-unrecorded", 10_000)?);
                let $b = KafkaBackend::connect(config).await?;
                $body
            }
            other => Err(BoxError::from(format!("unknown backend `{other}`"))),
        }
    }};
}

/// The soak's Kafka settings for group protocol `protocol`. The session timeout is 6 s on every
/// protocol (KIP-848's is the broker's `group.consumer.session.timeout.ms`, which
/// `scripts/kafka` sets to 6 s).
fn kafka_config(
    brokers: &str,
    commit_interval: Duration,
    protocol: &str,
) -> Result<KafkaConfig, BoxError> {
    let mut config = KafkaConfig::new(brokers)
        .partitions(KAFKA_PARTITIONS)
        .commit_interval(commit_interval);
    // librdkafka's own debug contexts (`cgrp`, `protocol`, ...), for a run under investigation.
    if let Ok(debug) = std::env::var("SOAK_KAFKA_DEBUG") {
        config = config.set("debug", debug);
    }
    let classic = |config: KafkaConfig, protocol| {
        config
            .group_protocol(protocol)
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "500")
    };
    Ok(match protocol {
        "eager" => classic(config, GroupProtocol::Eager),
        "cooperative" => classic(config, GroupProtocol::Cooperative),
        "consumer" => config.group_protocol(GroupProtocol::Consumer),
        other => return Err(format!("--protocol {other}: eager, cooperative or consumer").into()),
    })
}

/// Publishes `--events` ticks at `--rate` per second, retrying each batch until the broker takes
/// it; prints `published K` as it goes.
async fn publish(args: Args) -> Result<(), BoxError> {
    let events: u64 = args.get("events", 10_000)?;
    let rate: u64 = args.get("rate", 5_000)?;
    with_backend!(args, |b| publish_on(b, events, rate).await)
}

async fn publish_on(backend: impl Backend, events: u64, rate: u64) -> Result<(), BoxError> {
    let bus = EventBus::new(backend);
    const BATCH: u64 = 50;
    let mut ticker =
        tokio::time::interval(Duration::from_secs_f64(BATCH as f64 / rate.max(1) as f64));
    let mut failures = 0u64;
    let mut reported = 0;
    let mut start = 0;
    while start < events {
        ticker.tick().await;
        let end = (start + BATCH).min(events);
        let batch: Vec<Tick> = (start..end)
            .map(|seq| Tick {
                seq,
                at_ms: now_millis(),
                key: format!("k{}", seq % 1000),
            })
            .collect();
        let mut delay = Duration::from_millis(50);
        while let Err(e) = bus.publish_all(&batch).await {
            failures += 1;
            eprintln!("publish failed ({e}); retrying in {delay:?}");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
        start = end;
        if start * 20 / events > reported {
            reported = start * 20 / events;
            println!("published {start}");
        }
    }
    println!("done {events} failures {failures}");
    Ok(())
}

/// Runs the service's one handler until killed; records each handled event in `--out`.
async fn consume(args: Args) -> Result<(), BoxError> {
    let out = args.text("out")?;
    let claim_idle = Duration::from_millis(args.get("claim-idle-ms", 10_000)?);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&out)?;
    // Each line is one write(2): a SIGKILL loses no line the handler finished.
    let file = Arc::new(Mutex::new(file));
    let seed = u64::from(std::process::id()) ^ now_nanos();
    let rng = Arc::new(AtomicU64::new(seed));
    with_backend!(args, |b| consume_on(b, file, rng, claim_idle).await)
}

async fn consume_on(
    backend: impl Backend,
    file: Arc<Mutex<std::fs::File>>,
    rng: Arc<AtomicU64>,
    claim_idle: Duration,
) -> Result<(), BoxError> {
    let mut processor = EventProcessor::new(backend, SERVICE);
    processor
        .handle(HANDLER, move |t: Tick| {
            let result = if is_poison(t.seq) {
                Err(permanent(format!("poison event {}", t.seq)))
            } else if next_random(&rng) % 100 < TRANSIENT_FAILURE_PCT {
                Err(BoxError::from("transient failure (injected)"))
            } else {
                let mut f = file.lock().unwrap_or_else(|p| p.into_inner());
                let now = now_millis();
                let waited = now.saturating_sub(t.at_ms);
                // seq, delay, and when (ms since the epoch: the order of a run's handlings).
                writeln!(f, "{} {waited} {now}", t.seq).map_err(BoxError::from)
            };
            std::future::ready(result)
        })?
        .concurrency(8)
        .retry(
            RetryPolicy::attempts(20)
                .backoff(Duration::from_millis(20), 2.0)
                .max_delay(Duration::from_millis(500)),
        )
        .claim_idle(Some(claim_idle));
    let running = processor.start(CancellationToken::new()).await?;
    println!("ready");
    running.wait().await?;
    Ok(())
}

fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// splitmix64: enough randomness to pick failures.
fn next_random(state: &AtomicU64) -> u64 {
    let mut z = state
        .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

// ---------------------------------------------------------------------------------------------
// The orchestrator.

struct Plan {
    backend: String,
    events: u64,
    rate: u64,
    kill_every: Duration,
    conn_kill_every: Duration,
    claim_idle_ms: u64,
    commit_interval_ms: u64,
    commit_every: usize,
    max_unrecorded: usize,
    protocol: String,
    broker_restart: bool,
    /// Kafka: brokers in the cluster (1, or 3 with replication factor 3).
    cluster: usize,
    max_duplicates_pct: f64,
    drain_timeout: Duration,
    /// Keep the consumers' files and logs after a run that passed (`--keep-files yes`).
    keep_files: bool,
    dir: PathBuf,
}

async fn orchestrate(args: Args) -> Result<(), BoxError> {
    let backend = args
        .positional
        .first()
        .cloned()
        .ok_or("which backend: `soak run redis` or `soak run kafka`")?;
    let default_events = if backend == "kafka" {
        200_000
    } else {
        1_000_000
    };
    let dir = std::env::temp_dir().join(format!("cqrs-soak-{backend}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let plan = Plan {
        events: args.get("events", default_events)?,
        rate: args.get("rate", if backend == "kafka" { 2_000 } else { 5_000 })?,
        kill_every: Duration::from_secs_f64(args.get("kill-every", 10.0)?),
        conn_kill_every: Duration::from_secs_f64(args.get("conn-kill-every", 5.0)?),
        claim_idle_ms: args.get("claim-idle-ms", 10_000)?,
        commit_interval_ms: args.get("commit-interval-ms", 100)?,
        commit_every: args.get("commit-every", 250)?,
        max_unrecorded: args.get("max-unrecorded", 10_000)?,
        protocol: args.get("protocol", "consumer".to_owned())?,
        broker_restart: args.get::<String>("broker-restart", "yes".to_owned())? != "no",
        cluster: args.get("cluster", 1)?,
        max_duplicates_pct: args.get("max-duplicates-pct", 100.0)?,
        drain_timeout: Duration::from_secs(args.get("drain-timeout", 300)?),
        keep_files: args.get::<String>("keep-files", "no".to_owned())? == "yes",
        dir,
        backend,
    };
    eprintln!(
        "soak: {} events on {} at {}/s; files in {}",
        plan.events,
        plan.backend,
        plan.rate,
        plan.dir.display()
    );
    let mut broker = match plan.backend.as_str() {
        "redis" => Broker::start_redis(&plan.dir).await?,
        "kafka" => Broker::start_kafka(&plan.protocol, plan.cluster).await?,
        other => return Err(format!("unknown backend `{other}`").into()),
    };
    let result = soak(&plan, &mut broker).await;
    broker.stop().await;
    let report = result?;
    println!("{}", report.line(&plan));
    if report.lost > 0 || report.poison_missing > 0 {
        return Err("events were lost".into());
    }
    if report.duplicate_pct(&plan) > plan.max_duplicates_pct {
        return Err(format!(
            "duplicates above {}% of the events",
            plan.max_duplicates_pct
        )
        .into());
    }
    // Keep the files only when something went wrong, or when asked to.
    if !plan.keep_files {
        let _ = std::fs::remove_dir_all(&plan.dir);
    }
    Ok(())
}

#[derive(Default)]
struct Report {
    lost: u64,
    duplicates: u64,
    dead_lettered: u64,
    poison_missing: u64,
    consumer_kills: u64,
    consumer_exits: u64,
    connection_kills: u64,
    broker_restarts: u64,
    seconds: f64,
    /// Publish to handled, first handling of each event: p50, p99, max (ms).
    delay_ms: [u64; 3],
    /// The most events handled again by one pair of consumers, `first>again:count`, the
    /// largest first (at most five pairs).
    handled_again: Vec<String>,
    /// Acks the consumers gave up on (their messages go back and are handled again), from the
    /// `ack failed; the messages will be redelivered` lines of their stderr: lines, messages.
    acks_given_up: (u64, u64),
}

impl Report {
    fn duplicate_pct(&self, plan: &Plan) -> f64 {
        self.duplicates as f64 * 100.0 / plan.events.max(1) as f64
    }

    fn line(&self, plan: &Plan) -> String {
        format!(
            "soak: backend={} events={} lost={} duplicates={} ({:.3}%) dead_lettered={} \
             poison_missing={} consumer_kills={} consumer_exits={} connection_kills={} \
             broker_restarts={} seconds={:.0} delay_ms_p50={} delay_ms_p99={} delay_ms_max={}{}{}{}",
            plan.backend,
            plan.events,
            self.lost,
            self.duplicates,
            self.duplicate_pct(plan),
            self.dead_lettered,
            self.poison_missing,
            self.consumer_kills,
            self.consumer_exits,
            self.connection_kills,
            self.broker_restarts,
            self.seconds,
            self.delay_ms[0],
            self.delay_ms[1],
            self.delay_ms[2],
            if plan.backend == "kafka" {
                format!(" protocol={}", plan.protocol)
            } else {
                String::new()
            },
            if self.handled_again.is_empty() {
                String::new()
            } else {
                format!(" handled_again={}", self.handled_again.join(","))
            },
            match self.acks_given_up {
                (0, _) => String::new(),
                (lines, messages) => format!(" acks_given_up={lines}:{messages}"),
            }
        )
    }
}

/// The broker under test, in a process of its own.
enum Broker {
    Redis {
        port: u16,
        dir: PathBuf,
        child: Box<Child>,
    },
    Kafka {
        cluster: Arc<support::KafkaCluster>,
    },
}

fn free_port() -> Result<u16, BoxError> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Broker {
    async fn start_redis(dir: &Path) -> Result<Broker, BoxError> {
        let port = free_port()?;
        let child = Box::new(spawn_redis(port, dir)?);
        let broker = Broker::Redis {
            port,
            dir: dir.to_owned(),
            child,
        };
        wait_for_redis(&broker.url()).await?;
        Ok(broker)
    }

    /// An Apache Kafka of its own (`scripts/kafka`): one node, or a cluster of `nodes` with
    /// replication factor 3 and `min.insync.replicas=2` (the producer is idempotent, so
    /// `acks=all`); the soak's topics made.
    async fn start_kafka(protocol: &str, nodes: usize) -> Result<Broker, BoxError> {
        let cluster = tokio::task::spawn_blocking(move || {
            if nodes > 1 {
                support::KafkaCluster::start(
                    nodes,
                    &[
                        "default.replication.factor=3",
                        "min.insync.replicas=2",
                        "transaction.state.log.min.isr=2",
                    ],
                )
            } else {
                support::KafkaServer::start(&[])
                    .map(|node| support::KafkaCluster { nodes: vec![node] })
            }
        })
        .await??;
        eprintln!(
            "soak: Apache Kafka on {} (logs: {})",
            cluster.brokers(),
            cluster
                .nodes
                .iter()
                .map(|n| format!("{}/server.log", n.dir().display()))
                .collect::<Vec<_>>()
                .join(" ")
        );
        let mut config = kafka_config(&cluster.brokers(), Duration::from_secs(1), protocol)?;
        if nodes > 1 {
            config = config.replication(3);
        }
        KafkaBackend::connect(config)
            .await?
            .ensure_topics(&[TOPIC, DEAD_LETTER])
            .await?;
        Ok(Broker::Kafka {
            cluster: Arc::new(cluster),
        })
    }

    fn url(&self) -> String {
        match self {
            Broker::Redis { port, .. } => format!("redis://127.0.0.1:{port}/0"),
            Broker::Kafka { cluster } => cluster.brokers(),
        }
    }

    /// `SHUTDOWN` (the AOF is fsynced on every write) and start again on the same port and files.
    async fn restart_redis(&mut self) -> Result<(), BoxError> {
        let Broker::Redis { port, dir, child } = self else {
            return Ok(());
        };
        let url = format!("redis://127.0.0.1:{port}/0");
        let mut conn = redis::Client::open(url.as_str())?
            .get_multiplexed_async_connection()
            .await?;
        // The server closes the connection as it goes down: no reply to wait for.
        let _ = redis::cmd("SHUTDOWN").query_async::<()>(&mut conn).await;
        child.wait().await?;
        **child = spawn_redis(*port, dir)?;
        wait_for_redis(&url).await
    }

    /// SIGKILLs a broker (the leader of partition 0 of the soak's topic, in a cluster) and
    /// starts it again from the same directory and ports. In a cluster the others take over
    /// meanwhile; the node stays down for `down` first. Its log is on disk.
    async fn restart_kafka(&mut self, down: Duration) -> Result<(), BoxError> {
        let Broker::Kafka { cluster } = self else {
            return Ok(());
        };
        let victim = if cluster.nodes.len() > 1 {
            let leader = partition_leader(&cluster.brokers(), TOPIC, 0)?;
            usize::try_from(leader - 1).map_err(|_| format!("no leader: {leader}"))?
        } else {
            0
        };
        eprintln!("soak: SIGKILL of Kafka node {}", victim + 1);
        let cluster = cluster.clone();
        tokio::task::spawn_blocking(move || {
            let node = &cluster.nodes[victim];
            node.kill()?;
            std::thread::sleep(down);
            node.restart()
        })
        .await??;
        Ok(())
    }

    async fn restart(&mut self) -> Result<(), BoxError> {
        match self {
            Broker::Redis { .. } => self.restart_redis().await,
            Broker::Kafka { cluster } => {
                let down = if cluster.nodes.len() > 1 {
                    Duration::from_secs(10)
                } else {
                    Duration::ZERO
                };
                self.restart_kafka(down).await
            }
        }
    }

    async fn stop(&mut self) {
        match self {
            Broker::Redis { child, .. } => {
                let _ = child.kill().await;
            }
            Broker::Kafka { cluster } => {
                let cluster = cluster.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    for node in &cluster.nodes {
                        let _ = node.kill();
                    }
                })
                .await;
            }
        }
    }
}

fn spawn_redis(port: u16, dir: &Path) -> Result<Child, BoxError> {
    Ok(Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args([
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
        ])
        .arg("--dir")
        .arg(dir)
        .args(["--logfile", "redis.log"])
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start redis-server (scripts/soak installs it): {e}"))?)
}

async fn wait_for_redis(url: &str) -> Result<(), BoxError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut conn) = redis_conn(url).await {
            if redis::cmd("PING")
                .query_async::<String>(&mut conn)
                .await
                .is_ok()
            {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err(format!("redis-server at {url} did not answer").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn redis_conn(url: &str) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
    redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await
}

/// A consumer process in one of the three slots.
struct Slot {
    index: usize,
    generation: usize,
    child: Child,
}

fn spawn_consumer(
    plan: &Plan,
    url: &str,
    index: usize,
    generation: usize,
) -> Result<Slot, BoxError> {
    let out = plan.dir.join(format!("handled-{index}-{generation}.log"));
    let err = std::fs::File::create(plan.dir.join(format!("consumer-{index}-{generation}.err")))?;
    let child = Command::new(std::env::current_exe()?)
        .arg("consume")
        .args(["--backend", &plan.backend, "--url", url])
        .arg("--out")
        .arg(out)
        .args(["--claim-idle-ms", &plan.claim_idle_ms.to_string()])
        .args(["--commit-interval-ms", &plan.commit_interval_ms.to_string()])
        .args(["--commit-every", &plan.commit_every.to_string()])
        .args(["--max-unrecorded", &plan.max_unrecorded.to_string()])
        .args(["--protocol", &plan.protocol])
        .stdout(Stdio::piped())
        .stderr(err)
        .kill_on_drop(true)
        .spawn()?;
    Ok(Slot {
        index,
        generation,
        child,
    })
}

async fn soak(plan: &Plan, broker: &mut Broker) -> Result<Report, BoxError> {
    let started = Instant::now();
    let url = broker.url();
    let mut report = Report::default();
    let mut slots = (0..CONSUMERS)
        .map(|i| spawn_consumer(plan, &url, i, 0))
        .collect::<Result<Vec<_>, _>>()?;
    // Faults start once the service is up: every consumer has joined its group.
    for slot in &mut slots {
        let stdout = slot.child.stdout.take().ok_or("no stdout")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(Duration::from_secs(60), lines.next_line()).await;
        if !matches!(ready, Ok(Ok(Some(ref l))) if l == "ready") {
            return Err(format!(
                "consumer {} did not start; see {}",
                slot.index,
                plan.dir.display()
            )
            .into());
        }
    }

    let mut publisher = Command::new(std::env::current_exe()?)
        .arg("publish")
        .args(["--backend", &plan.backend, "--url", &url])
        .args(["--events", &plan.events.to_string()])
        .args(["--rate", &plan.rate.to_string()])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(plan.dir.join("publisher.err"))?)
        .kill_on_drop(true)
        .spawn()?;
    let mut progress =
        tokio::io::BufReader::new(publisher.stdout.take().ok_or("no stdout")?).lines();

    let mut kill = tokio::time::interval(plan.kill_every);
    // A kill missed while the broker restarted comes late, not in a burst with the next.
    kill.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    kill.tick().await;
    let mut conn_kill = tokio::time::interval(plan.conn_kill_every);
    conn_kill.tick().await;
    let mut check = tokio::time::interval(Duration::from_millis(200));
    let is_redis = matches!(broker, Broker::Redis { .. });
    let mut next_victim = 0;
    // While the publisher runs: faults.
    loop {
        tokio::select! {
            line = progress.next_line() => match line? {
                Some(line) => {
                    eprintln!("soak: {line} ({:.0} s)", started.elapsed().as_secs_f64());
                    let published: u64 = line
                        .strip_prefix("published ")
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(0);
                    if plan.broker_restart && report.broker_restarts == 0 && published * 2 >= plan.events {
                        eprintln!("soak: restarting the broker");
                        let down = Instant::now();
                        broker.restart().await?;
                        eprintln!("soak: the broker is back after {:.1} s", down.elapsed().as_secs_f64());
                        report.broker_restarts += 1;
                    }
                }
                None => break,
            },
            _ = kill.tick() => {
                let slot = &mut slots[next_victim];
                next_victim = (next_victim + 1) % CONSUMERS;
                slot.child.kill().await?;
                report.consumer_kills += 1;
                *slot = spawn_consumer(plan, &url, slot.index, slot.generation + 1)?;
            }
            _ = conn_kill.tick(), if is_redis => {
                match kill_connections(&url).await {
                    Ok(_) => report.connection_kills += 1,
                    Err(e) => eprintln!("soak: CLIENT KILL failed: {e}"),
                }
            }
            _ = check.tick() => {
                report.consumer_exits += respawn_exited(plan, &url, &mut slots)?;
            }
        }
    }
    let status = publisher.wait().await?;
    if !status.success() {
        return Err(format!(
            "the publisher failed ({status}); see {}",
            plan.dir.display()
        )
        .into());
    }
    eprintln!(
        "soak: all published in {:.0} s; waiting for the group to drain",
        started.elapsed().as_secs_f64()
    );

    // Drain: no faults, consumers that exit on their own are still restarted.
    let deadline = Instant::now() + plan.drain_timeout;
    loop {
        report.consumer_exits += respawn_exited(plan, &url, &mut slots)?;
        let left = match broker {
            Broker::Redis { .. } => redis_left(&url).await,
            Broker::Kafka { .. } => kafka_left(&url),
        };
        match left {
            Ok(0) => break,
            Ok(n) if Instant::now() > deadline => {
                return Err(format!("the group did not drain: {n} left").into())
            }
            Ok(_) => {}
            Err(e) => eprintln!("soak: checking the group failed: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    report.seconds = started.elapsed().as_secs_f64();
    for slot in &mut slots {
        let _ = slot.child.kill().await;
    }

    let Handled {
        counts: handled,
        delays,
        pairs,
    } = read_handled(&plan.dir)?;
    let mut pairs: Vec<_> = pairs.into_iter().collect();
    pairs.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    report.handled_again = pairs
        .into_iter()
        .take(5)
        .map(|((first, again), n)| format!("{first}>{again}:{n}"))
        .collect();
    let at = |q: f64| {
        delays
            .get(((delays.len() as f64 * q) as usize).min(delays.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    report.delay_ms = [at(0.5), at(0.99), delays.last().copied().unwrap_or(0)];
    report.acks_given_up = acks_given_up(&plan.dir)?;
    let dead = match broker {
        Broker::Redis { .. } => redis_dead_letters(&url).await?,
        Broker::Kafka { .. } => kafka_dead_letters(&url)?,
    };
    tally(plan, &handled, &dead, &mut report);
    Ok(report)
}

/// The files of `dir` named `prefix`NAME`suffix`, by name: (NAME, path).
fn files(dir: &Path, prefix: &str, suffix: &str) -> Result<Vec<(String, PathBuf)>, BoxError> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix(prefix))
            .and_then(|n| n.strip_suffix(suffix))
            .map(str::to_owned);
        if let Some(name) = name {
            found.push((name, path));
        }
    }
    found.sort();
    Ok(found)
}

/// The acks the consumers gave up on, from their stderr (`consumer-*.err`): how many times, and
/// how many messages (the `count` each line gives).
fn acks_given_up(dir: &Path) -> Result<(u64, u64), BoxError> {
    let (mut lines, mut messages) = (0, 0);
    for (_, path) in files(dir, "consumer-", ".err")? {
        for line in std::fs::read_to_string(&path)?.lines() {
            if !line.contains("ack failed; the messages will be redelivered") {
                continue;
            }
            lines += 1;
            messages += line
                .split_whitespace()
                .find_map(|field| field.strip_prefix("count="))
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Ok((lines, messages))
}

/// Restarts consumers that exited by themselves; returns how many did.
fn respawn_exited(plan: &Plan, url: &str, slots: &mut [Slot]) -> Result<u64, BoxError> {
    let mut exits = 0;
    for slot in slots.iter_mut() {
        if let Some(status) = slot.child.try_wait()? {
            eprintln!(
                "soak: consumer {}-{} exited by itself ({status}); starting it again",
                slot.index, slot.generation
            );
            exits += 1;
            *slot = spawn_consumer(plan, url, slot.index, slot.generation + 1)?;
        }
    }
    Ok(exits)
}

/// What the consumers' files say: how many times each sequence number was handled, every first
/// handling's delay (sorted), and the events handled twice or more by which two consumers (see
/// [`Handled::pairs`]).
struct Handled {
    counts: HashMap<u64, u32>,
    delays: Vec<u64>,
    /// Events handled again, by the consumer that handled them first and the one that handled
    /// them again, as `index-generation` (the file's name): a member killed with work handled
    /// and not acked shows as one pair with its replacement or the member that claimed it.
    pairs: HashMap<(String, String), u64>,
}

/// Reads every consumer's file. Each line: the event's sequence number and how long it took
/// from publish to the handler's success, in milliseconds.
fn read_handled(dir: &Path) -> Result<Handled, BoxError> {
    let mut names: Vec<String> = Vec::new();
    // Per sequence number: how many times, and the earliest handling so far (its file and its
    // delay: one event's handlings are told apart in time by their delays from its publish).
    let mut seen: HashMap<u64, (u32, usize, u64)> = HashMap::new();
    // Per pair of files (by their place in `names`): the events handled in both.
    let mut by_files: HashMap<(usize, usize), u64> = HashMap::new();
    for (name, path) in files(dir, "handled-", ".log")? {
        let file = names.len();
        names.push(name);
        for line in std::fs::read_to_string(&path)?.lines() {
            let mut fields = line.split(' ');
            if let Some(Ok(seq)) = fields.next().map(str::parse::<u64>) {
                let delay = fields.next().and_then(|d| d.parse::<u64>().ok());
                let at = delay.unwrap_or(u64::MAX);
                let (count, first, first_at) = seen.entry(seq).or_insert((0, file, at));
                *count += 1;
                if *count == 1 {
                    continue;
                }
                // The earlier of the two handled it first.
                let (before, after) = if at < *first_at {
                    let earlier_seen = std::mem::replace(first, file);
                    *first_at = at;
                    (file, earlier_seen)
                } else {
                    (*first, file)
                };
                *by_files.entry((before, after)).or_insert(0) += 1;
            }
        }
    }
    // Each event's first handling (the least delay).
    let mut delays: Vec<u64> = seen
        .values()
        .map(|&(_, _, at)| at)
        .filter(|&at| at != u64::MAX)
        .collect();
    delays.sort_unstable();
    let counts = seen.into_iter().map(|(seq, (n, _, _))| (seq, n)).collect();
    let pairs = by_files
        .into_iter()
        .map(|((before, after), n)| ((names[before].clone(), names[after].clone()), n))
        .collect();
    Ok(Handled {
        counts,
        delays,
        pairs,
    })
}

fn now_millis() -> u64 {
    now_nanos() / 1_000_000
}

/// A dead letter: the event's sequence number and the reason header.
struct DeadLetter {
    seq: u64,
    reason: String,
}

fn tally(plan: &Plan, handled: &HashMap<u64, u32>, dead: &[DeadLetter], report: &mut Report) {
    let mut dead_by_seq: HashMap<u64, u32> = HashMap::new();
    for d in dead {
        *dead_by_seq.entry(d.seq).or_insert(0) += 1;
    }
    report.dead_lettered = dead.len() as u64;
    for seq in 0..plan.events {
        let h = handled.get(&seq).copied().unwrap_or(0);
        let d = dead_by_seq.get(&seq).copied().unwrap_or(0);
        if h + d == 0 {
            report.lost += 1;
        } else {
            report.duplicates += u64::from(h + d - 1);
        }
        if is_poison(seq) {
            let ok = dead
                .iter()
                .any(|x| x.seq == seq && x.reason.contains("poison event"));
            if !ok && d == 0 {
                report.poison_missing += 1;
            }
        }
    }
    // A poison event in the dead letters with another reason is missing its reason.
    report.poison_missing += dead
        .iter()
        .filter(|x| is_poison(x.seq) && !x.reason.contains("poison event"))
        .count() as u64;
}

async fn kill_connections(url: &str) -> Result<u64, BoxError> {
    let mut conn = redis_conn(url).await?;
    let killed: u64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .query_async(&mut conn)
        .await?;
    Ok(killed)
}

/// Reads a flat `[k, v, k, v, ...]` or map reply into a map.
fn fields(v: &redis::Value) -> HashMap<String, redis::Value> {
    let mut out = HashMap::new();
    match v {
        redis::Value::Array(items) => {
            for pair in items.chunks(2) {
                if let [k, v] = pair {
                    if let Ok(k) = redis::from_redis_value::<String>(k.clone()) {
                        out.insert(k, v.clone());
                    }
                }
            }
        }
        redis::Value::Map(items) => {
            for (k, v) in items {
                if let Ok(k) = redis::from_redis_value::<String>(k.clone()) {
                    out.insert(k, v.clone());
                }
            }
        }
        _ => {}
    }
    out
}

fn text(v: Option<&redis::Value>) -> String {
    v.and_then(|v| redis::from_redis_value::<String>(v.clone()).ok())
        .unwrap_or_default()
}

/// What the group still has to do: pending entries, plus 1 while its last-delivered id is behind
/// the stream's last id. (XINFO's `lag` is wrong on Redis 7.0 after restarts and claims.)
async fn redis_left(url: &str) -> Result<u64, BoxError> {
    let mut conn = redis_conn(url).await?;
    let stream: redis::Value = redis::cmd("XINFO")
        .arg("STREAM")
        .arg(TOPIC)
        .query_async(&mut conn)
        .await?;
    let last = text(fields(&stream).get("last-generated-id"));
    let groups: Vec<redis::Value> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(TOPIC)
        .query_async(&mut conn)
        .await?;
    for g in &groups {
        let g = fields(g);
        if text(g.get("name")) != GROUP {
            continue;
        }
        let pending: u64 = g
            .get("pending")
            .and_then(|v| redis::from_redis_value(v.clone()).ok())
            .unwrap_or(0);
        let behind = u64::from(text(g.get("last-delivered-id")) != last);
        return Ok(pending + behind);
    }
    Err(format!("no group {GROUP} on {TOPIC}").into())
}

async fn redis_dead_letters(url: &str) -> Result<Vec<DeadLetter>, BoxError> {
    let mut conn = redis_conn(url).await?;
    let mut out = Vec::new();
    let mut from = "-".to_owned();
    loop {
        let page: Vec<(String, HashMap<String, Vec<u8>>)> = redis::cmd("XRANGE")
            .arg(DEAD_LETTER)
            .arg(&from)
            .arg("+")
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await?;
        let Some((last, _)) = page.last() else {
            break;
        };
        from = format!("({last}");
        for (id, f) in &page {
            let payload = f
                .get("payload")
                .ok_or_else(|| format!("{id}: no payload"))?;
            let tick: Tick = serde_json::from_slice(payload)?;
            let reason = f
                .get("h.x-dead-letter-reason")
                .map(|r| String::from_utf8_lossy(r).into_owned())
                .unwrap_or_default();
            out.push(DeadLetter {
                seq: tick.seq,
                reason,
            });
        }
    }
    Ok(out)
}

fn kafka_client(brokers: &str, group: &str) -> Result<rdkafka::consumer::BaseConsumer, BoxError> {
    Ok(rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()?)
}

/// Records the group has not committed, over every partition of the topic.
/// The node id of the leader of `partition` of `topic`.
fn partition_leader(brokers: &str, topic: &str, partition: i32) -> Result<i32, BoxError> {
    use rdkafka::consumer::Consumer;
    let client = kafka_client(brokers, "soak-metadata")?;
    let metadata = client.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    metadata
        .topics()
        .iter()
        .flat_map(|t| t.partitions())
        .find(|p| p.id() == partition)
        .map(|p| p.leader())
        .ok_or_else(|| format!("no partition {partition} of {topic}").into())
}

fn kafka_left(brokers: &str) -> Result<u64, BoxError> {
    use rdkafka::consumer::Consumer;
    use rdkafka::{Offset, TopicPartitionList};
    let client = kafka_client(brokers, GROUP)?;
    let timeout = Duration::from_secs(10);
    let mut tpl = TopicPartitionList::new();
    for p in 0..KAFKA_PARTITIONS {
        tpl.add_partition(TOPIC, p);
    }
    let committed: Vec<(i32, Offset)> = client
        .committed_offsets(tpl, timeout)?
        .elements()
        .iter()
        .map(|e| (e.partition(), e.offset()))
        .collect();
    let mut left = 0;
    for (p, offset) in committed {
        let (_, high) = client.fetch_watermarks(TOPIC, p, timeout)?;
        let at = match offset {
            Offset::Offset(o) => o,
            _ => 0,
        };
        left += (high - at).max(0) as u64;
    }
    Ok(left)
}

fn kafka_dead_letters(brokers: &str) -> Result<Vec<DeadLetter>, BoxError> {
    use rdkafka::consumer::Consumer;
    use rdkafka::message::{Headers, Message};
    use rdkafka::{Offset, TopicPartitionList};
    let client = kafka_client(brokers, "soak-reader")?;
    let timeout = Duration::from_secs(10);
    let mut tpl = TopicPartitionList::new();
    let mut ends = HashMap::new();
    for p in 0..KAFKA_PARTITIONS {
        let (low, high) = client.fetch_watermarks(DEAD_LETTER, p, timeout)?;
        if high > low {
            tpl.add_partition_offset(DEAD_LETTER, p, Offset::Offset(low))?;
            ends.insert(p, high);
        }
    }
    client.assign(&tpl)?;
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ends.is_empty() {
        if Instant::now() > deadline {
            return Err("reading the dead-letter topic timed out".into());
        }
        let Some(m) = client.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = m?;
        if ends
            .get(&m.partition())
            .is_some_and(|end| m.offset() + 1 >= *end)
        {
            ends.remove(&m.partition());
        }
        let tick: Tick = serde_json::from_slice(m.payload().unwrap_or_default())?;
        let reason = m
            .headers()
            .and_then(|h| {
                h.iter()
                    .find(|h| h.key == "x-dead-letter-reason")
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            })
            .unwrap_or_default();
        out.push(DeadLetter {
            seq: tick.seq,
            reason,
        });
    }
    Ok(out)
}
