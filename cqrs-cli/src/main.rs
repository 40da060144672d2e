//! `cqrs`: look inside the streams and consumer groups of a service, and deal with its dead
//! letters. Redis Streams (a server or the pools of a YAML topology) or Kafka (`trim` is
//! Redis-only: Kafka deletes records by retention).
//!
//! ```text
//! cqrs --redis redis://127.0.0.1:6379 inspect
//! cqrs --redis redis://127.0.0.1:6379 dead-letters list svc-tickets.print-receipt
//! cqrs --redis redis://127.0.0.1:6379 dead-letters redrive svc-tickets.print-receipt --all --dry-run
//! cqrs --topology topology.yaml trim --json
//! cqrs --kafka 127.0.0.1:9092 inspect
//! cqrs --kafka 127.0.0.1:9092 dead-letters redrive svc-tickets.print-receipt --id 0:42
//! cqrs --kafka broker:9093 --kafka-config client.properties inspect
//! cqrs --kafka broker:9093 -X security.protocol=SASL_SSL -X sasl.mechanism=SCRAM-SHA-512 \
//!      -X sasl.username=ops -X sasl.password="$PASSWORD" inspect
//! ```
//!
//! Tables for people, `--json` for scripts. Exit code 0 on success, 1 on an error (a message on
//! stderr; URLs never print their password), 2 on bad usage.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use cqrs::kafka::{KafkaBackend, KafkaConfig};
use cqrs::redis::{RedisBackend, Topology};
use cqrs::{DeadLetter, DeadLetterStore};
use serde_json::{json, Value};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Parser)]
#[command(
    name = "cqrs",
    version,
    about = "Inspect consumer groups and redrive dead letters"
)]
struct Cli {
    /// The Redis server (`redis://[:password@]host:port[/db]`); also `CQRS_REDIS_URL`.
    #[arg(
        long,
        global = true,
        env = "CQRS_REDIS_URL",
        hide_env_values = true,
        conflicts_with = "topology"
    )]
    redis: Option<String>,
    /// A YAML topology naming the Redis pools and their streams, instead of `--redis`.
    #[arg(long, global = true)]
    topology: Option<std::path::PathBuf>,
    /// Kafka bootstrap servers (`host:port,...`), instead of Redis; also `CQRS_KAFKA_BROKERS`.
    #[arg(
        long,
        global = true,
        env = "CQRS_KAFKA_BROKERS",
        hide_env_values = true,
        conflicts_with_all = ["redis", "topology"]
    )]
    kafka: Option<String>,
    /// librdkafka settings for `--kafka` from a file of `key=value` lines (`#` starts a comment):
    /// TLS and SASL (`security.protocol`, `sasl.mechanism`, `sasl.username`, `sasl.password`,
    /// `ssl.ca.location`, ...); also `CQRS_KAFKA_CONFIG`. Values are never printed.
    #[arg(
        long,
        global = true,
        env = "CQRS_KAFKA_CONFIG",
        value_name = "FILE",
        requires = "kafka"
    )]
    kafka_config: Option<std::path::PathBuf>,
    /// One librdkafka setting for `--kafka`, `key=value` (repeatable; after `--kafka-config`),
    /// as kcat's `-X`. Values are never printed.
    #[arg(
        short = 'X',
        global = true,
        value_name = "KEY=VALUE",
        requires = "kafka"
    )]
    kafka_setting: Vec<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Streams, their consumer groups (lag, pending, oldest pending) and each group's consumers.
    Inspect {
        /// Also list each group's oldest pending entries (owner, idle time, deliveries), up to
        /// this many per group.
        #[arg(long, value_name = "N")]
        pending: Option<usize>,
    },
    /// The dead letters of a consumer group.
    #[command(subcommand)]
    DeadLetters(DeadLetters),
    /// Deletes the entries every group of a stream has acknowledged, once, on every stream
    /// (Redis only).
    Trim,
    /// A transactional outbox on PostgreSQL (`cqrs::postgres`): its relay's backlog and the
    /// messages the broker refused for good.
    Outbox(OutboxArgs),
}

#[derive(Args)]
struct OutboxArgs {
    /// The database (`postgres://user[:password]@host:port/db`); also `CQRS_DATABASE_URL`.
    #[arg(long, env = "CQRS_DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// The outbox's schema.
    #[arg(long, default_value = "cqrs")]
    schema: String,
    #[command(subcommand)]
    command: OutboxCommand,
}

#[derive(Subcommand)]
enum OutboxCommand {
    /// Messages waiting for the relay, the oldest one's age, and the dead ones.
    Status,
    /// The messages the broker refused for good: message id, topic, reason.
    DeadLetters,
    /// Moves dead messages back into the outbox for the relay to send again.
    Redrive {
        /// The messages to move, by message id (repeatable).
        #[arg(long = "id", required_unless_present = "all", conflicts_with = "all")]
        ids: Vec<String>,
        /// Every dead message.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Subcommand)]
enum DeadLetters {
    /// Each dead letter: id, reason, attempts, handler, original topic, age.
    List(Listing),
    /// Publishes dead letters back to their original topic (without the dead-letter headers,
    /// with `x-redriven-from`), then removes them from the dead letters (on Kafka: records them
    /// as done in the group `cqrs-dead-letters.<dead-letter topic>`).
    Redrive(Select),
    /// Removes dead letters without redriving them.
    Purge(Select),
}

#[derive(Args)]
struct Group {
    /// The consumer group, e.g. `svc-tickets.print-receipt`.
    group: String,
    /// Its dead-letter topic, when not `<group>.dead-letter`.
    #[arg(long)]
    dead_letter_topic: Option<String>,
}

#[derive(Args)]
struct Listing {
    #[command(flatten)]
    group: Group,
    /// The most dead letters to show (a page: only that many are read from the broker).
    #[arg(long, default_value_t = 100)]
    limit: usize,
    /// Show those after this id (the `next` a page ended with).
    #[arg(long)]
    after: Option<String>,
}

#[derive(Args)]
struct Select {
    #[command(flatten)]
    group: Group,
    /// The dead letters to act on, by id (repeatable): the entry id on Redis,
    /// `partition:offset` on Kafka.
    #[arg(long = "id", required_unless_present = "all", conflicts_with = "all")]
    ids: Vec<String>,
    /// Every dead letter of the group.
    #[arg(long)]
    all: bool,
    /// Say what would be done and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// With `--all`, how many dead letters are read and acted on at a time: what the command
    /// holds in memory is bounded by it, not by the topic.
    #[arg(long, value_name = "N", default_value_t = 500)]
    page: usize,
}

impl Group {
    fn topic(&self) -> String {
        self.dead_letter_topic
            .clone()
            .unwrap_or_else(|| cqrs::dead_letter::topic_of(&self.group))
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut text = format!("error: {e}");
            let mut source = e.source();
            while let Some(s) = source {
                text.push_str(&format!(": {s}"));
                source = s.source();
            }
            eprintln!("{text}");
            ExitCode::FAILURE
        }
    }
}

async fn connect(cli: &Cli) -> Result<RedisBackend, BoxError> {
    let backend = match (&cli.redis, &cli.topology) {
        (_, Some(path)) => RedisBackend::from_topology(&Topology::from_yaml_file(path)?).await?,
        (Some(url), None) => RedisBackend::connect(url).await?,
        (None, None) => {
            return Err("give --redis URL (or CQRS_REDIS_URL) or --topology FILE".into())
        }
    };
    Ok(backend)
}

/// `config` with the settings of `--kafka-config` and then `-X`. An error names the file, the
/// line or the key, never a value.
fn kafka_settings(cli: &Cli, mut config: KafkaConfig) -> Result<KafkaConfig, BoxError> {
    let mut settings: Vec<(String, String)> = Vec::new();
    if let Some(path) = &cli.kafka_config {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading {}: {e}", path.display()))?;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (key, value) = line
                .split_once('=')
                .ok_or_else(|| format!("{} line {}: expected key=value", path.display(), n + 1))?;
            settings.push((key.trim().to_owned(), value.trim().to_owned()));
        }
    }
    for setting in &cli.kafka_setting {
        let (key, value) = setting
            .split_once('=')
            .ok_or("-X takes key=value (the value is not shown)")?;
        settings.push((key.trim().to_owned(), value.to_owned()));
    }
    for (key, value) in settings {
        config = config.set(key, value);
    }
    Ok(config)
}

async fn run(cli: Cli) -> Result<(), BoxError> {
    if let Command::Outbox(o) = &cli.command {
        print!("{}", outbox(o, cli.json).await?);
        return Ok(());
    }
    if let Some(brokers) = &cli.kafka {
        let config = kafka_settings(&cli, KafkaConfig::new(brokers).create_topics(false))?;
        let backend = KafkaBackend::connect(config).await?;
        let out = match &cli.command {
            Command::Inspect { .. } => inspect_kafka(&backend, cli.json).await?,
            Command::DeadLetters(d) => dead_letters(&backend, d, cli.json).await?,
            Command::Trim => {
                return Err(
                    "trim works on Redis streams; Kafka deletes records by retention \
                            (the topic's retention.ms and retention.bytes)"
                        .into(),
                )
            }
            Command::Outbox(_) => return Ok(()),
        };
        print!("{out}");
        return Ok(());
    }
    let backend = connect(&cli).await?;
    let out = match &cli.command {
        Command::Inspect { pending } => inspect(&backend, *pending, cli.json).await?,
        Command::Trim => trim(&backend, cli.json).await?,
        Command::DeadLetters(d) => dead_letters(&backend, d, cli.json).await?,
        Command::Outbox(_) => return Ok(()),
    };
    print!("{out}");
    Ok(())
}

async fn outbox(args: &OutboxArgs, as_json: bool) -> Result<String, BoxError> {
    use cqrs::postgres::{sqlx::postgres::PgPoolOptions, OutboxStore};
    let store = OutboxStore::new().schema(&args.schema)?;
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(10))
        .connect(&args.database_url)
        .await
        // sqlx's error, not the URL: it may hold a password.
        .map_err(|e| format!("connecting to the database: {e}"))?;
    match &args.command {
        OutboxCommand::Status => {
            let status = store.status(&pool).await?;
            let dead = store.dead_count(&pool).await?;
            if as_json {
                return Ok(pretty(&json!({
                    "schema": args.schema,
                    "depth": status.depth,
                    "oldest_ms": status.oldest.map(ms),
                    "dead": dead,
                })));
            }
            Ok(format!(
                "outbox {}: {} waiting (oldest {}), {} dead\n",
                args.schema,
                status.depth,
                status.oldest.map_or_else(|| "-".to_owned(), human),
                dead
            ))
        }
        OutboxCommand::DeadLetters => {
            let dead = store.dead_letters(&pool).await?;
            if as_json {
                let rows: Vec<Value> = dead
                    .iter()
                    .map(|(id, topic, reason)| json!({"id": id, "topic": topic, "reason": reason}))
                    .collect();
                return Ok(pretty(&Value::Array(rows)));
            }
            let mut text = format!("outbox {}: {} dead\n", args.schema, dead.len());
            for (id, topic, reason) in &dead {
                text.push_str(&format!("  {id}  {topic}  {reason}\n"));
            }
            Ok(text)
        }
        OutboxCommand::Redrive { ids, all } => {
            let ids: &[String] = if *all { &[] } else { ids };
            let moved = store.redrive_dead(&pool, ids).await?;
            if as_json {
                return Ok(pretty(&json!({ "redriven": moved })));
            }
            Ok(format!(
                "redriven {moved} dead message(s) into outbox {}\n",
                args.schema
            ))
        }
    }
}

async fn dead_letters(
    store: &dyn DeadLetterStore,
    command: &DeadLetters,
    as_json: bool,
) -> Result<String, BoxError> {
    match command {
        DeadLetters::List(g) => list(store, g, as_json).await,
        DeadLetters::Redrive(s) => act(store, s, as_json, Act::Redrive).await,
        DeadLetters::Purge(s) => act(store, s, as_json, Act::Purge).await,
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `1h2m`, `3m4s`, `5.6s`, `78ms`.
fn human(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}h{}m", s / 3600, s % 3600 / 60)
    } else if s >= 60 {
        format!("{}m{}s", s / 60, s % 60)
    } else if s > 0 {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        format!("{}ms", d.as_millis())
    }
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).map_or_else(|_| v.to_string(), |s| s + "\n")
}

async fn inspect(
    backend: &RedisBackend,
    pending: Option<usize>,
    as_json: bool,
) -> Result<String, BoxError> {
    let mut streams = Vec::new();
    let mut text = String::new();
    for name in backend.streams().await? {
        let stats = backend.stats(&name).await?;
        text.push_str(&format!(
            "stream {}  (pool {}, {} entries)\n",
            stats.stream, stats.pool, stats.length
        ));
        let mut groups = Vec::new();
        for g in &stats.groups {
            let consumers = backend.consumers(&name, &g.name).await?;
            text.push_str(&format!(
                "  group {:<40} lag {:>8}  pending {:>8}  oldest pending {:>8}  last delivered {}\n",
                g.name,
                g.lag.map_or("?".to_owned(), |l| l.to_string()),
                g.pending,
                g.oldest_pending_idle.map_or("-".to_owned(), human),
                g.last_delivered_id
            ));
            if g.trimmed_unread > 0 {
                text.push_str(&format!(
                    "    WARNING: {} entries were trimmed (MAXLEN) before this group read them\n",
                    g.trimmed_unread
                ));
            }
            for c in &consumers {
                text.push_str(&format!(
                    "    consumer {:<38} pending {:>8}  idle {:>8}\n",
                    c.name,
                    c.pending,
                    human(c.idle)
                ));
            }
            let entries = match pending {
                Some(n) if g.pending > 0 => backend.pending(&name, &g.name, n).await?,
                _ => Vec::new(),
            };
            for p in &entries {
                text.push_str(&format!(
                    "    pending {:<20} owner {:<30} idle {:>8}  deliveries {}\n",
                    p.id,
                    p.owner,
                    human(p.idle),
                    p.deliveries
                ));
            }
            groups.push(json!({
                "pending_entries": entries.iter().map(|p| json!({
                    "id": p.id, "owner": p.owner, "idle_ms": ms(p.idle), "deliveries": p.deliveries,
                })).collect::<Vec<_>>(),
                "name": g.name,
                "lag": g.lag,
                "pending": g.pending,
                "oldest_pending_idle_ms": g.oldest_pending_idle.map(ms),
                "last_delivered_id": g.last_delivered_id,
                "trimmed_unread": g.trimmed_unread,
                "consumers": consumers.iter().map(|c| json!({
                    "name": c.name, "pending": c.pending, "idle_ms": ms(c.idle),
                })).collect::<Vec<_>>(),
            }));
        }
        streams.push(json!({
            "stream": stats.stream, "pool": stats.pool, "length": stats.length, "groups": groups,
        }));
    }
    if as_json {
        return Ok(pretty(&json!({ "streams": streams })));
    }
    if streams.is_empty() {
        text.push_str("no streams\n");
    }
    Ok(text)
}

/// Kafka's topics (internal ones left out) with the consumer groups that committed offsets on
/// each, and their lag.
async fn inspect_kafka(backend: &KafkaBackend, as_json: bool) -> Result<String, BoxError> {
    let mut topics = backend.topics_on_broker().await?;
    topics.retain(|t| !t.starts_with("__"));
    topics.sort();
    let mut text = String::new();
    let mut out = Vec::new();
    for (topic, groups) in backend.backlogs(topics, "").await? {
        text.push_str(&format!("topic {topic}\n"));
        // A topic being created or deleted meanwhile is reported, not fatal for the others.
        let groups = match groups {
            Ok(groups) => groups,
            Err(e) => {
                let e = cqrs::Error::from(e).report();
                text.push_str(&format!("  cannot read its groups: {e}\n"));
                out.push(json!({ "topic": topic, "error": e }));
                continue;
            }
        };
        for g in &groups {
            text.push_str(&format!(
                "  group {:<40} lag {:>8}\n",
                g.group,
                g.lag.map_or("?".to_owned(), |l| l.to_string())
            ));
        }
        out.push(json!({
            "topic": topic,
            "groups": groups.iter().map(|g| json!({ "name": g.group, "lag": g.lag })).collect::<Vec<_>>(),
        }));
    }
    if as_json {
        return Ok(pretty(&json!({ "topics": out })));
    }
    if out.is_empty() {
        text.push_str("no topics\n");
    }
    Ok(text)
}

/// The dead-letter topic of `group`, which must exist.
async fn dead_letter_topic(store: &dyn DeadLetterStore, group: &Group) -> Result<String, BoxError> {
    let topic = group.topic();
    if !store.has_dead_letters(&topic).await? {
        return Err(format!(
            "group `{}` has no dead letters: there is no topic `{topic}`",
            group.group
        )
        .into());
    }
    Ok(topic)
}

fn dead_json(d: &DeadLetter) -> Value {
    json!({
        "id": d.id,
        "message_id": d.message.id,
        "event": d.message.name,
        "reason": d.reason,
        "attempts": d.attempts,
        "handler": d.handler,
        "group": d.group,
        "topic": d.topic,
        "age_ms": d.age.map(ms),
    })
}

fn dead_line(d: &DeadLetter) -> String {
    format!(
        "{:<17} {:<24} attempts {:>2}  handler {:<20} topic {:<24} age {:>8}  reason: {}\n",
        d.id,
        d.message.name,
        d.attempts.map_or("?".to_owned(), |a| a.to_string()),
        d.handler.as_deref().unwrap_or("?"),
        d.topic.as_deref().unwrap_or("?"),
        d.age.map_or("?".to_owned(), human),
        d.reason.as_deref().unwrap_or("?"),
    )
}

async fn list(
    store: &dyn DeadLetterStore,
    listing: &Listing,
    as_json: bool,
) -> Result<String, BoxError> {
    let topic = dead_letter_topic(store, &listing.group).await?;
    let limit = listing.limit.max(1);
    // One more than shown: whether there is a next page.
    let mut dead = store
        .dead_letters_page(&topic, listing.after.as_deref(), limit + 1)
        .await?;
    let more = dead.len() > limit;
    dead.truncate(limit);
    let next = more.then(|| dead.last().map(|d| d.id.clone())).flatten();
    if as_json {
        return Ok(pretty(&json!({
            "topic": topic,
            "dead_letters": dead.iter().map(dead_json).collect::<Vec<_>>(),
            "next": next,
        })));
    }
    let mut text = match &next {
        Some(_) => format!(
            "{} dead letters on {topic} (a page; more follow)\n",
            dead.len()
        ),
        None => format!("{} dead letters on {topic}\n", dead.len()),
    };
    for d in &dead {
        text.push_str(&dead_line(d));
    }
    if let Some(next) = next {
        text.push_str(&format!("next page: --after {next}\n"));
    }
    Ok(text)
}

/// The output of `redrive` and `purge`, written as it goes (a topic can hold more dead letters
/// than fit in memory): a line per dead letter and a summary (text), or one JSON object whose
/// list is written a dead letter at a time.
struct Progress {
    out: std::io::BufWriter<std::io::Stdout>,
    json: bool,
    items: u64,
    /// The first write that failed; reported at [`Progress::finish`].
    failed: Option<std::io::Error>,
}

impl Progress {
    /// Starts the output; in JSON, the object up to its list `key`.
    fn start(json: bool, topic: &str, dry_run: bool, key: &str) -> Progress {
        let mut p = Progress {
            out: std::io::BufWriter::new(std::io::stdout()),
            json,
            items: 0,
            failed: None,
        };
        if json {
            let head = format!(
                "{{\"topic\": {}, \"dry_run\": {dry_run}, \"{key}\": [",
                Value::from(topic)
            );
            p.write(&head);
        }
        p
    }

    fn write(&mut self, text: &str) {
        use std::io::Write as _;
        if self.failed.is_none() {
            if let Err(e) = self.out.write_all(text.as_bytes()) {
                self.failed = Some(e);
            }
        }
    }

    fn item(&mut self, d: &DeadLetter) {
        let text = if self.json {
            let sep = if self.items == 0 { "\n  " } else { ",\n  " };
            format!("{sep}{}", dead_json(d))
        } else {
            dead_line(d)
        };
        self.items += 1;
        self.write(&text);
    }

    /// Ends the output: in JSON, the list and `key: n`; in text, `summary`.
    fn finish(mut self, key: &str, n: u64, summary: &str) -> Result<String, BoxError> {
        use std::io::Write as _;
        let tail = if self.json {
            format!("\n], \"{key}\": {n}}}\n")
        } else {
            format!("{summary}\n")
        };
        self.write(&tail);
        if let Err(e) = self.out.flush() {
            self.failed.get_or_insert(e);
        }
        match self.failed {
            Some(e) => Err(format!("writing the output: {e}").into()),
            None => Ok(String::new()),
        }
    }
}

/// The dead letters chosen by id, each of which must be there.
async fn by_id(
    store: &dyn DeadLetterStore,
    topic: &str,
    ids: &[String],
) -> Result<Vec<DeadLetter>, BoxError> {
    let dead = store.dead_letters_by_id(topic, ids).await?;
    if let Some(missing) = ids.iter().find(|id| !dead.iter().any(|d| &d.id == *id)) {
        return Err(format!("no dead letter with id {missing} on {topic}").into());
    }
    Ok(dead)
}

/// Every dead letter of `topic`, a page at a time, to `each` (what a dry run of `--all` shows).
async fn each_page(
    store: &dyn DeadLetterStore,
    topic: &str,
    size: usize,
    mut each: impl FnMut(&DeadLetter),
) -> Result<u64, BoxError> {
    let size = size.max(1);
    let mut after: Option<String> = None;
    let mut n = 0;
    loop {
        let page = store
            .dead_letters_page(topic, after.as_deref(), size)
            .await?;
        for d in &page {
            each(d);
            n += 1;
        }
        match page.last() {
            Some(last) if page.len() == size => after = Some(last.id.clone()),
            _ => return Ok(n),
        }
    }
}

/// What `redrive` and `purge` do to the dead letters they choose.
#[derive(Clone, Copy)]
enum Act {
    Redrive,
    Purge,
}

/// `redrive` or `purge`: the dead letters chosen by id (each must be there before anything
/// moves) or all of them (a page at a time, only those there when it starts: a letter
/// dead-lettered since is not touched unseen), each printed as it is done; a dry run lists them.
async fn act(
    store: &dyn DeadLetterStore,
    s: &Select,
    as_json: bool,
    what: Act,
) -> Result<String, BoxError> {
    let topic = dead_letter_topic(store, &s.group).await?;
    let chosen = if s.all {
        None
    } else {
        Some(by_id(store, &topic, &s.ids).await?)
    };
    // The JSON's list and count, and the verb of the summary (dry run or not).
    let (list, count, verbs) = match what {
        Act::Redrive => ("redriven", "count", ("would redrive", "redrove")),
        Act::Purge => ("purged", "removed", ("would remove", "removed")),
    };
    let mut out = Progress::start(as_json, &topic, s.dry_run, list);
    let n = match (chosen, s.dry_run, what) {
        (Some(chosen), true, _) => {
            chosen.iter().for_each(|d| out.item(d));
            chosen.len() as u64
        }
        (None, true, _) => each_page(store, &topic, s.page, |d| out.item(d)).await?,
        (Some(_), false, Act::Redrive) => {
            let done = store.redrive(&topic, Some(&s.ids)).await?;
            done.iter().for_each(|d| out.item(d));
            done.len() as u64
        }
        (Some(chosen), false, Act::Purge) => {
            let n = store.purge(&topic, Some(&s.ids)).await?;
            chosen.iter().for_each(|d| out.item(d));
            n
        }
        (None, false, Act::Redrive) => {
            store
                .redrive_all(&topic, s.page, &mut |d| out.item(d))
                .await?
        }
        (None, false, Act::Purge) => {
            store
                .purge_all(&topic, s.page, &mut |d| out.item(d))
                .await?
        }
    };
    let verb = if s.dry_run { verbs.0 } else { verbs.1 };
    out.finish(count, n, &format!("{verb} {n} dead letters from {topic}"))
}

async fn trim(backend: &RedisBackend, as_json: bool) -> Result<String, BoxError> {
    let mut text = String::new();
    let mut trimmed = Vec::new();
    for stream in backend.streams().await? {
        let n = backend.trim_acknowledged(&stream).await?;
        text.push_str(&format!("{stream:<48} removed {n}\n"));
        trimmed.push(json!({ "stream": stream, "removed": n }));
    }
    if as_json {
        return Ok(pretty(&json!({ "trimmed": trimmed })));
    }
    Ok(text)
}
