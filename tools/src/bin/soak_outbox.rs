//! The outbox's fault-injection soak: commands from several writer processes change account rows
//! and store events through the outbox in one transaction (some rolled back on purpose); relay
//! processes forward them to Redis; consumer processes apply each event's effect through the
//! inbox. Relays and consumers are SIGKILLed in turn every `--kill-every` seconds (default 5: a
//! relay every 10 s, a consumer every 10 s), PostgreSQL is
//! restarted once (fast shutdown) and the broker's client connections are cut once (on Kafka,
//! `--kafka-brokers`: the broker is SIGKILLed and started again). Then:
//!
//! - lost: events of committed commands with no effect (must be 0);
//! - phantoms: effects of events whose transaction was rolled back (must be 0);
//! - duplicate effects: an event's effect applied more than once (must be 0: the inbox);
//! - redelivered: events the broker delivered more than once (counted, allowed);
//! - broker order: events of one account that the stream holds out of their commit order
//!   (must be 0: the relay sends in commit order per key);
//! - applied order: effects of one account applied out of commit order (counted: members of a
//!   Redis group do not share keys, so two members may apply one account's events side by side);
//! - uncertain: commands whose commit's outcome the writer could not know (a connection cut at
//!   the commit); their events may or may not arrive, and neither counts against the run.
//!
//! Run it with `scripts/soak outbox [N] [options]`, which starts PostgreSQL and Redis, or
//! `scripts/soak outbox-kafka [N] [options]` (PostgreSQL and Apache Kafka). By hand:
//! `soak_outbox run --database-url URL --pg-dir DIR --redis-url URL --commands N`, or with
//! `--kafka-brokers ADDR --kafka-dir DIR` in place of `--redis-url`.

use std::collections::{HashMap, HashSet};
use std::io::Write as _;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cqrs::kafka::{KafkaBackend, KafkaConfig};
use cqrs::memory::MemoryBroker;
use cqrs::postgres::sqlx::{self, postgres::PgPoolOptions, PgPool, Row};
use cqrs::postgres::{Inbox, Outbox, OutboxRelay, OutboxStore};
use cqrs::redis::RedisBackend;
use cqrs::{
    Backend, BoxError, CancellationToken, Context, Event, EventBus, EventProcessor, TopicNamer,
};
use cqrs_tools::support::Args;
use serde::{Deserialize, Serialize};
use tokio::process::{Child, Command};

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(name = "soak.Deposited")]
struct Deposited {
    #[event(key)]
    account: String,
    /// `w{writer}-{command}-{n}`: one per event.
    id: String,
    /// The account's version after the command (one per command, rising in commit order).
    version: i64,
}

const ACCOUNTS: usize = 40;

/// What every process of one run shares.
#[derive(Clone)]
struct Setup {
    database_url: String,
    /// The broker: `redis://...`, or `kafka://host:port` for Apache Kafka.
    broker: String,
    schema: String,
    topic: String,
    service: String,
}

impl Setup {
    fn from(args: &Args) -> Result<Self, BoxError> {
        Ok(Setup {
            database_url: args.text("database-url")?,
            broker: args.text("broker")?,
            schema: args.text("schema")?,
            topic: args.text("topic")?,
            service: args.text("service")?,
        })
    }

    fn args(&self) -> Vec<String> {
        [
            ("--database-url", &self.database_url),
            ("--broker", &self.broker),
            ("--schema", &self.schema),
            ("--topic", &self.topic),
            ("--service", &self.service),
        ]
        .into_iter()
        .flat_map(|(k, v)| [k.to_owned(), v.clone()])
        .collect()
    }

    async fn pool(&self, connections: u32) -> Result<PgPool, BoxError> {
        Ok(PgPoolOptions::new()
            .max_connections(connections)
            .acquire_timeout(Duration::from_secs(5))
            .connect(&self.database_url)
            .await?)
    }

    fn store(&self) -> Result<OutboxStore, BoxError> {
        Ok(OutboxStore::new().schema(&self.schema)?)
    }

    /// The bus an outbox encodes with (it sends nothing: the relays do).
    fn bus(&self) -> EventBus {
        let t = self.topic.clone();
        EventBus::new(MemoryBroker::new()).topics(TopicNamer::new(move |_| t.clone()))
    }

    fn kafka(&self) -> Option<&str> {
        self.broker.strip_prefix("kafka://")
    }
}

/// Runs `$body` with `$b` bound to the run's backend (Redis or Kafka).
macro_rules! with_backend {
    ($setup:expr, $b:ident => $body:expr) => {
        match $setup.kafka() {
            Some(brokers) => {
                let $b = KafkaBackend::connect(KafkaConfig::new(brokers).partitions(4)).await?;
                $body
            }
            None => {
                let $b = RedisBackend::connect(&$setup.broker).await?;
                $body
            }
        }
    };
}

/// A line-per-record log, flushed at each line (the process may be killed at any time).
struct Log(std::fs::File);

impl Log {
    fn create(path: &Path) -> Result<Self, BoxError> {
        Ok(Log(std::fs::File::create(path)?))
    }

    fn line(&mut self, line: &str) -> Result<(), BoxError> {
        self.0.write_all(format!("{line}\n").as_bytes())?;
        Ok(())
    }
}

/// A writer: `--commands` commands at `--rate` per second, each in a transaction that bumps one
/// account's version and stores one or two events; `--rollback-pct` of them rolled back after
/// storing. Logs `committed ID`, `rolledback ID` and `uncertain ID` per event.
async fn write(args: &Args) -> Result<(), BoxError> {
    let setup = Setup::from(args)?;
    let index: usize = args.get("index", 0)?;
    let commands: usize = args.get("commands", 1000)?;
    let rate: f64 = args.get("rate", 200.0)?;
    let rollback_pct: u64 = args.get("rollback-pct", 10)?;
    let mut log = Log::create(Path::new(&args.text("out")?))?;
    let pool = setup.pool(4).await?;
    let outbox = Outbox::new(setup.bus(), setup.store()?);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for c in 0..commands {
        tick.tick().await;
        // A cheap spread of accounts, event counts and rollbacks, the same on every run.
        let h = (c as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (index as u64) << 7;
        let account = format!("acct-{:02}", h % ACCOUNTS as u64);
        let events = 1 + (h >> 8) % 2;
        let roll_back = (h >> 16) % 100 < rollback_pct;
        let ids: Vec<String> = (0..events).map(|n| format!("w{index}-{c}-{n}")).collect();
        let outcome = async {
            let mut tx = pool.begin().await?;
            let version: i64 = sqlx::query_scalar(&format!(
                "UPDATE {}.accounts SET version = version + 1 WHERE id = $1 RETURNING version",
                setup.schema
            ))
            .bind(&account)
            .fetch_one(&mut *tx)
            .await?;
            for id in &ids {
                let e = Deposited {
                    account: account.clone(),
                    id: id.clone(),
                    version,
                };
                outbox.publish(&mut tx, &e).await?;
            }
            if roll_back {
                tx.rollback().await?;
                return Ok::<_, BoxError>("rolledback");
            }
            // Past this point a failure leaves the outcome unknown.
            match tx.commit().await {
                Ok(()) => Ok("committed"),
                Err(_) => Ok("uncertain"),
            }
        }
        .await;
        // Failed before the commit (the database restarting): nothing was committed.
        let word = outcome.unwrap_or("failed");
        for id in &ids {
            log.line(&format!("{word} {id}"))?;
        }
    }
    Ok(())
}

/// A relay until killed.
async fn relay(args: &Args) -> Result<(), BoxError> {
    let setup = Setup::from(args)?;
    let pool = setup.pool(2).await?;
    let store = setup.store()?;
    with_backend!(setup, backend => {
        println!("ready");
        OutboxRelay::new(pool, store, backend)
            .poll_interval(Duration::from_millis(500))
            .run(CancellationToken::new())
            .await?;
    });
    Ok(())
}

/// A consumer until killed: logs every delivery, applies each event's effect through the inbox.
async fn consume(args: &Args) -> Result<(), BoxError> {
    let setup = Setup::from(args)?;
    with_backend!(setup, backend => consume_on(args, &setup, backend).await)
}

async fn consume_on<B: Backend + Clone>(
    args: &Args,
    setup: &Setup,
    backend: B,
) -> Result<(), BoxError> {
    let pool = setup.pool(8).await?;
    let log = Arc::new(Mutex::new(Log::create(Path::new(&args.text("out")?))?));
    let inbox = Inbox::new(pool.clone(), setup.store()?);
    let effects = format!("{}.effects", setup.schema);
    let once = inbox.once(move |e: Deposited, mut tx, _ctx| {
        let effects = effects.clone();
        async move {
            sqlx::query(&format!(
                "INSERT INTO {effects} (event_id, account, version) VALUES ($1, $2, $3)"
            ))
            .bind(&e.id)
            .bind(&e.account)
            .bind(e.version)
            .execute(&mut *tx)
            .await?;
            Ok(tx)
        }
    });
    let mut processor = EventProcessor::new(backend, &setup.service).topics({
        let t = setup.topic.clone();
        TopicNamer::new(move |_| t.clone())
    });
    processor
        .handle("effects", move |e: Deposited, ctx: Context| {
            if let Ok(mut log) = log.lock() {
                let _ = log.line(&e.id);
            }
            once(e, ctx)
        })?
        .claim_idle(Some(Duration::from_secs(3)));
    let running = processor.start(CancellationToken::new()).await?;
    println!("ready");
    running.wait().await?;
    Ok(())
}

/// A process of the run, respawned after each kill.
struct Proc {
    role: &'static str,
    index: usize,
    generation: usize,
    child: Child,
}

async fn spawn(
    role: &'static str,
    index: usize,
    generation: usize,
    setup: &Setup,
    dir: &Path,
) -> Result<Proc, BoxError> {
    let name = format!("{role}-{index}-{generation}");
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg(role).args(setup.args());
    if role == "consume" {
        cmd.arg("--out").arg(dir.join(format!("{name}.log")));
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join(format!("{name}.err")))?)
        .kill_on_drop(true)
        .spawn()?;
    // Ready once started (a consumer once its group is joined).
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    match tokio::time::timeout(Duration::from_secs(60), lines.next_line()).await {
        Ok(Ok(Some(l))) if l == "ready" => {}
        _ => return Err(format!("{name} did not start; see {}", dir.display()).into()),
    }
    Ok(Proc {
        role,
        index,
        generation,
        child,
    })
}

fn kafka_script(args: &[&str]) -> Result<(), BoxError> {
    let status = std::process::Command::new("bash")
        .arg("scripts/kafka")
        .args(args)
        .stdout(Stdio::null())
        .status()?;
    if !status.success() {
        return Err(format!("scripts/kafka {} failed", args.join(" ")).into());
    }
    Ok(())
}

fn pg_script(dir: &str, verb: &str) -> Result<(), BoxError> {
    let status = std::process::Command::new("bash")
        .arg("scripts/postgres")
        .arg(verb)
        .arg(dir)
        .stdout(Stdio::null())
        .status()?;
    if !status.success() {
        return Err(format!("scripts/postgres {verb} {dir} failed").into());
    }
    Ok(())
}

#[derive(Default)]
struct Outcomes {
    committed: HashSet<String>,
    rolled_back: HashSet<String>,
    uncertain: HashSet<String>,
    failed: usize,
}

fn read_writer_logs(dir: &Path) -> Result<Outcomes, BoxError> {
    let mut o = Outcomes::default();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if !(name.starts_with("writer-") && name.ends_with(".log")) {
            continue;
        }
        for line in std::fs::read_to_string(&path)?.lines() {
            match line.split_once(' ') {
                Some(("committed", id)) => o.committed.insert(id.to_owned()),
                Some(("rolledback", id)) => o.rolled_back.insert(id.to_owned()),
                Some(("uncertain", id)) => o.uncertain.insert(id.to_owned()),
                Some(("failed", _)) => {
                    o.failed += 1;
                    true
                }
                _ => false,
            };
        }
    }
    Ok(o)
}

async fn run(args: &Args) -> Result<(), BoxError> {
    let commands: usize = args.get("commands", 20_000)?;
    let writers: usize = args.get("writers", 2)?;
    let relays: usize = args.get("relays", 2)?;
    let consumers: usize = args.get("consumers", 2)?;
    let rate: f64 = args.get("rate", 400.0)?;
    let kill_every: f64 = args.get("kill-every", 5.0)?;
    let rollback_pct: u64 = args.get("rollback-pct", 10)?;
    let pg_restart = args.get("pg-restart", "yes".to_owned())? == "yes";
    let pg_dir = args.text("pg-dir")?;
    let id = std::process::id();
    let kafka_dir = args.text("kafka-dir").ok();
    let setup = Setup {
        database_url: args.text("database-url")?,
        broker: match args.text("kafka-brokers") {
            Ok(brokers) => format!("kafka://{brokers}"),
            Err(_) => args.text("redis-url")?,
        },
        schema: format!("soak_{id}"),
        topic: format!("soak-outbox-{id}"),
        service: format!("svc-soak-{id}"),
    };
    let dir = std::env::temp_dir().join(format!("cqrs-soak-outbox-{id}"));
    std::fs::create_dir_all(&dir)?;
    eprintln!("soak-outbox: files in {}", dir.display());
    // The schema: the outbox's tables, the accounts and the effects (no unique key: a second
    // effect of one event must show).
    {
        let pool = setup.pool(2).await?;
        setup.store()?.migrate(&pool).await?;
        let s = &setup.schema;
        sqlx::query(&format!(
            "CREATE TABLE {s}.accounts (id TEXT PRIMARY KEY, version BIGINT NOT NULL)"
        ))
        .execute(&pool)
        .await?;
        sqlx::query(&format!(
            "CREATE TABLE {s}.effects (seq BIGSERIAL PRIMARY KEY, event_id TEXT NOT NULL, account TEXT NOT NULL, version BIGINT NOT NULL)"
        ))
        .execute(&pool)
        .await?;
        for a in 0..ACCOUNTS {
            sqlx::query(&format!("INSERT INTO {s}.accounts VALUES ($1, 0)"))
                .bind(format!("acct-{a:02}"))
                .execute(&pool)
                .await?;
        }
    }
    let mut procs = Vec::new();
    for i in 0..consumers {
        procs.push(spawn("consume", i, 0, &setup, &dir).await?);
    }
    for i in 0..relays {
        procs.push(spawn("relay", i, 0, &setup, &dir).await?);
    }
    let started = Instant::now();
    let per_writer = commands / writers.max(1);
    let mut writer_procs = Vec::new();
    for i in 0..writers {
        let child = Command::new(std::env::current_exe()?)
            .arg("write")
            .args(setup.args())
            .args(["--index", &i.to_string()])
            .args(["--commands", &per_writer.to_string()])
            .args(["--rate", &(rate / writers as f64).to_string()])
            .args(["--rollback-pct", &rollback_pct.to_string()])
            .arg("--out")
            .arg(dir.join(format!("writer-{i}.log")))
            .stderr(std::fs::File::create(dir.join(format!("writer-{i}.err")))?)
            .kill_on_drop(true)
            .spawn()?;
        writer_procs.push(child);
    }
    let expected = Duration::from_secs_f64(commands as f64 / rate);
    let (mut kills, mut pg_restarts, mut conn_kills) = (0usize, 0usize, 0usize);
    let mut next_kill = Instant::now() + Duration::from_secs_f64(kill_every);
    let mut turn = 0usize;
    // Faults while the writers write.
    loop {
        let mut done = true;
        for w in &mut writer_procs {
            if w.try_wait()?.is_none() {
                done = false;
            }
        }
        if done {
            break;
        }
        let elapsed = started.elapsed();
        if pg_restart && pg_restarts == 0 && elapsed >= expected.mul_f64(0.4) {
            eprintln!("soak-outbox: restarting PostgreSQL (fast shutdown)");
            pg_script(&pg_dir, "stop")?;
            tokio::time::sleep(Duration::from_secs(2)).await;
            pg_script(&pg_dir, "start")?;
            pg_restarts += 1;
        }
        if conn_kills == 0 && elapsed >= expected.mul_f64(0.6) {
            match &kafka_dir {
                Some(dir) => {
                    eprintln!("soak-outbox: SIGKILL of the Kafka broker, then started again");
                    kafka_script(&["stop", dir, "--kill"])?;
                    kafka_script(&["start", dir])?;
                }
                None => {
                    eprintln!("soak-outbox: cutting the broker's client connections");
                    let _ = std::process::Command::new("redis-cli")
                        .args(["-u", &setup.broker, "CLIENT", "KILL", "TYPE", "normal"])
                        .stdout(Stdio::null())
                        .status();
                }
            }
            conn_kills += 1;
        }
        if Instant::now() >= next_kill {
            // Relays and consumers in turn.
            let role = if turn % 2 == 0 { "relay" } else { "consume" };
            let pick = procs
                .iter()
                .enumerate()
                .filter(|(_, p)| p.role == role)
                .map(|(i, _)| i)
                .nth(turn / 2 % if role == "relay" { relays } else { consumers });
            if let Some(i) = pick {
                let p = &mut procs[i];
                p.child.start_kill()?;
                let _ = p.child.wait().await;
                kills += 1;
                let (role, index, generation) = (p.role, p.index, p.generation + 1);
                eprintln!("soak-outbox: SIGKILL {role}-{index} ({kills})");
                procs[i] = spawn(role, index, generation, &setup, &dir).await?;
            }
            turn += 1;
            next_kill = Instant::now() + Duration::from_secs_f64(kill_every);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for w in &mut writer_procs {
        let status = w.wait().await?;
        if !status.success() {
            return Err(format!("a writer failed; see {}", dir.display()).into());
        }
    }
    eprintln!(
        "soak-outbox: writers done in {:.0} s; draining",
        started.elapsed().as_secs_f64()
    );
    let outcomes = read_writer_logs(&dir)?;
    let pool = setup.pool(2).await?;
    let s = &setup.schema;
    // Drained: the outbox empty and every committed event's effect in, or a minute with no
    // progress.
    let mut last = (i64::MIN, Instant::now());
    loop {
        let depth: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {s}.outbox"))
            .fetch_one(&pool)
            .await?;
        let applied: i64 =
            sqlx::query_scalar(&format!("SELECT count(DISTINCT event_id) FROM {s}.effects"))
                .fetch_one(&pool)
                .await?;
        if depth == 0 && applied as usize >= outcomes.committed.len() {
            break;
        }
        if applied != last.0 {
            last = (applied, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(60) {
            eprintln!("soak-outbox: no progress for 60 s (outbox depth {depth})");
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Give redeliveries of the last messages a moment to show as duplicates if they would.
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(procs);
    let rows = sqlx::query(&format!(
        "SELECT event_id, account, version FROM {s}.effects ORDER BY seq"
    ))
    .fetch_all(&pool)
    .await?;
    let mut applied: HashMap<String, usize> = HashMap::new();
    let mut last_version: HashMap<String, i64> = HashMap::new();
    let mut out_of_order = 0usize;
    for row in &rows {
        let (id, account, version): (String, String, i64) = (row.get(0), row.get(1), row.get(2));
        *applied.entry(id).or_default() += 1;
        let last = last_version.entry(account).or_insert(0);
        if version < *last {
            out_of_order += 1;
        }
        *last = (*last).max(version);
    }
    let stream_out_of_order = broker_order(&setup).await?;
    let lost = outcomes
        .committed
        .iter()
        .filter(|id| !applied.contains_key(*id))
        .count();
    let phantoms = applied
        .keys()
        .filter(|id| outcomes.rolled_back.contains(*id))
        .count();
    let duplicate_effects: usize = applied.values().map(|n| n - 1).sum();
    let mut delivered: HashMap<String, usize> = HashMap::new();
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with("consume-") && name.ends_with(".log") {
            for line in std::fs::read_to_string(&path)?.lines() {
                *delivered.entry(line.to_owned()).or_default() += 1;
            }
        }
    }
    let redelivered = delivered.values().filter(|n| **n > 1).count();
    let uncertain_arrived = outcomes
        .uncertain
        .iter()
        .filter(|id| applied.contains_key(*id))
        .count();
    println!(
        "soak-outbox: broker={} committed={} rolled_back={} uncertain={} (arrived {uncertain_arrived}) failed_before_commit={} lost={lost} phantoms={phantoms} duplicate_effects={duplicate_effects} redelivered={redelivered} broker_out_of_order={stream_out_of_order} applied_out_of_order={out_of_order} relay_and_consumer_kills={kills} pg_restarts={pg_restarts} broker_connection_cuts={conn_kills} seconds={:.0}",
        if setup.kafka().is_some() { "kafka" } else { "redis" },
        outcomes.committed.len(),
        outcomes.rolled_back.len(),
        outcomes.uncertain.len(),
        outcomes.failed,
        started.elapsed().as_secs_f64()
    );
    let failed = lost > 0
        || phantoms > 0
        || duplicate_effects > 0
        || stream_out_of_order > 0
        || outcomes.committed.is_empty();
    sqlx::query(&format!("DROP SCHEMA {s} CASCADE"))
        .execute(&pool)
        .await?;
    if failed {
        return Err(format!("the soak failed; its files: {}", dir.display()).into());
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Events of one account that the stream holds out of their commit order (each event's first
/// copy; a relay killed between sending and deleting sends a batch again, later).
async fn broker_order(setup: &Setup) -> Result<usize, BoxError> {
    let events = match setup.kafka() {
        Some(brokers) => kafka_events(brokers, &setup.topic)?,
        None => redis_events(setup).await?,
    };
    let (mut seen, mut last, mut out_of_order) = (HashSet::new(), HashMap::new(), 0);
    for e in events {
        if !seen.insert(e.id.clone()) {
            continue;
        }
        let last = last.entry(e.account).or_insert(0i64);
        if e.version < *last {
            out_of_order += 1;
        }
        *last = (*last).max(e.version);
    }
    Ok(out_of_order)
}

/// The events the topic holds, partition after partition, each in its order (an account's
/// events are in one partition: its key's).
fn kafka_events(brokers: &str, topic: &str) -> Result<Vec<Deposited>, BoxError> {
    use cqrs::kafka::rdkafka::consumer::{BaseConsumer, Consumer};
    use cqrs::kafka::rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
    let client: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("soak-reader-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .create()?;
    let timeout = Duration::from_secs(10);
    let metadata = client.fetch_metadata(Some(topic), timeout)?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut events = Vec::new();
    for p in partitions {
        let (low, high) = client.fetch_watermarks(topic, p, timeout)?;
        if high <= low {
            continue;
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, p, Offset::Offset(low))?;
        client.assign(&tpl)?;
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut next = low;
        while next < high {
            if Instant::now() > deadline {
                return Err(format!("reading {topic}/{p}: stuck at {next} of {high}").into());
            }
            let Some(m) = client.poll(Duration::from_millis(500)) else {
                continue;
            };
            let m = m?;
            next = m.offset() + 1;
            if let Some(e) = m
                .payload()
                .and_then(|b| serde_json::from_slice::<Deposited>(b).ok())
            {
                events.push(e);
            }
        }
    }
    Ok(events)
}

/// The events the stream holds, in order.
async fn redis_events(setup: &Setup) -> Result<Vec<Deposited>, BoxError> {
    use cqrs::redis::redis::{self, AsyncCommands};
    let client = redis::Client::open(setup.broker.as_str())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    // Read in pages: one reply of the whole stream outlasts the client's response timeout.
    let mut entries = Vec::new();
    let mut from = "-".to_owned();
    loop {
        let page: redis::streams::StreamRangeReply =
            conn.xrange_count(&setup.topic, &from, "+", 1000).await?;
        let Some(next) = page.ids.last().map(|e| format!("({}", e.id)) else {
            break;
        };
        from = next;
        entries.extend(page.ids);
    }
    // The payload is the field that decodes as the event.
    Ok(entries
        .into_iter()
        .filter_map(|entry| {
            entry.map.values().find_map(|v| match v {
                redis::Value::BulkString(b) => serde_json::from_slice::<Deposited>(b).ok(),
                _ => None,
            })
        })
        .collect())
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    cqrs_tools::support::init_logs();
    let mut argv = std::env::args().skip(1);
    let command = argv.next().unwrap_or_default();
    let args = Args::parse(argv)?;
    if let Some(a) = args.positional.first() {
        return Err(format!("unexpected argument `{a}`").into());
    }
    match command.as_str() {
        "run" => run(&args).await,
        "write" => write(&args).await,
        "relay" => relay(&args).await,
        "consume" => consume(&args).await,
        other => Err(format!("unknown command `{other}` (run, write, relay, consume)").into()),
    }
}
