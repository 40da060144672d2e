//! Helpers shared by the benchmarks and the soak.

use std::time::Duration;

use cqrs::BoxError;

pub use cqrs_test_support::{KafkaCluster, KafkaServer};

/// This process's resident set size in KiB (`VmRSS` of `/proc/self/status`; 0 where there is
/// none).
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU time process `pid` ("self" for this one) has used so far: user + system, all threads,
/// from `/proc/<pid>/stat`, in clock ticks of 10 ms; zero where there is none.
pub fn cpu_time(pid: &str) -> Duration {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the command name (which may hold spaces) start at state (field 3);
            // utime and stime are fields 14 and 15.
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
            Some(Duration::from_millis(ticks * 10))
        })
        .unwrap_or_default()
}

/// Kafka for a benchmark: the cluster at `KAFKA_BROKERS` if set, else an Apache Kafka of its own
/// (`scripts/kafka`, [`own_kafka`]), stopped when the guard drops; topics it creates get
/// `partitions`.
pub fn bench_kafka(
    partitions: i32,
) -> Result<(Option<KafkaServer>, cqrs::kafka::KafkaConfig), BoxError> {
    use cqrs::kafka::KafkaConfig;
    if let Ok(brokers) = std::env::var("KAFKA_BROKERS") {
        return Ok((None, KafkaConfig::new(brokers).partitions(partitions)));
    }
    let server = own_kafka()?;
    let config = KafkaConfig::new(server.brokers()).partitions(partitions);
    Ok((Some(server), config))
}

/// An Apache Kafka of a benchmark's own, its log under `BENCH_KAFKA_DIR`, else `/dev/shm` where
/// there is one, else the temporary directory. In memory, what a benchmark writes (~800 MB a
/// round of `bench_kafka`) is not written back to disk while the next figure runs: on disk, the
/// kernel wrote back up to 1.4 GB a second in bursts during a run (`vmstat 1`), beside both sides
/// on the two cores.
pub fn own_kafka() -> Result<KafkaServer, BoxError> {
    let shm = std::path::Path::new("/dev/shm");
    let parent = match std::env::var_os("BENCH_KAFKA_DIR") {
        Some(dir) => dir.into(),
        None if shm.is_dir() => shm.to_owned(),
        None => std::env::temp_dir(),
    };
    Ok(KafkaServer::start_under(&parent, &[])?)
}

/// Waits, at most `timeout`, until this process has no librdkafka client left: none of its
/// threads is one of librdkafka's (named `rdk:...`). Clients close on threads of their own (a
/// consumer's poll thread, ours that drop clients), after whatever dropped them returned.
pub fn await_kafka_clients_gone(timeout: Duration) {
    let clients_left = || {
        std::fs::read_dir("/proc/self/task").is_ok_and(|tasks| {
            tasks.flatten().any(|t| {
                std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with("rdk:"))
            })
        })
    };
    let start = std::time::Instant::now();
    while clients_left() && start.elapsed() < timeout {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The dead-letter topics a processor makes (one a group), from its `manifest()`: for a
/// benchmark to delete after its run.
pub fn dead_letter_topics(manifest: cqrs::Manifest) -> Vec<String> {
    manifest
        .groups
        .into_iter()
        .map(|g| g.dead_letter_topic)
        .collect()
}

/// An admin client of the Kafka cluster at `brokers`, for [`delete_kafka_topics`].
pub fn kafka_admin(
    brokers: &str,
) -> Result<
    cqrs::kafka::rdkafka::admin::AdminClient<cqrs::kafka::rdkafka::client::DefaultClientContext>,
    BoxError,
> {
    Ok(cqrs::kafka::rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?)
}

/// Deletes `topics`: those a benchmark made, named by it (nothing else on a cluster kept between
/// runs, `KAFKA_BROKERS`). A topic the cluster does not delete is said on stderr; the figures
/// stand without it.
pub async fn delete_kafka_topics(
    admin: &cqrs::kafka::rdkafka::admin::AdminClient<
        cqrs::kafka::rdkafka::client::DefaultClientContext,
    >,
    topics: &[impl AsRef<str>],
) -> Result<(), BoxError> {
    use cqrs::kafka::rdkafka::admin::AdminOptions;
    if topics.is_empty() {
        return Ok(());
    }
    let topics: Vec<&str> = topics.iter().map(AsRef::as_ref).collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in admin.delete_topics(&topics, &options).await? {
        if let Err((topic, e)) = result {
            eprintln!("deleting {topic} failed: {e}");
        }
    }
    Ok(())
}

/// `fetch.wait.max.ms` for the benchmarks' Kafka clients: `BENCH_KAFKA_FETCH_WAIT_MS`, else our
/// default (100 ms).
pub fn kafka_fetch_wait_ms() -> u64 {
    std::env::var("BENCH_KAFKA_FETCH_WAIT_MS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100)
}

/// The event the benchmarks send: keyed over 1,000 keys, ~200 bytes of JSON.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, cqrs::Event)]
pub struct Sample {
    /// The ordering key (one of 1,000).
    #[event(key)]
    pub key: String,
    /// Its number in the run.
    pub seq: u64,
    /// Padding.
    pub note: String,
}

/// Sample number `seq`.
pub fn sample(seq: u64) -> Sample {
    Sample {
        key: format!("key-{:04}", seq % 1000),
        seq,
        note: "x".repeat(150),
    }
}

/// A topic namer that sends every event to `topic`.
pub fn one_topic(topic: &str) -> cqrs::TopicNamer {
    let topic = topic.to_owned();
    cqrs::TopicNamer::new(move |_| topic.clone())
}

/// Logs to stderr, at the level `RUST_LOG` says (`warn` by default): every binary of this
/// package starts with it.
pub fn init_logs() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        // Plain text in a file (the soaks read their consumers' logs), colours on a terminal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// The command line of a tool's role: `--name value` pairs and positional arguments (the
/// soaks' processes take theirs this way).
pub struct Args {
    /// The arguments that are not `--name value` pairs, in order.
    pub positional: Vec<String>,
    named: std::collections::HashMap<String, String>,
}

impl Args {
    /// Reads `args` (the command line after the role).
    pub fn parse(args: impl Iterator<Item = String>) -> Result<Args, BoxError> {
        let mut positional = Vec::new();
        let mut named = std::collections::HashMap::new();
        let mut args = args.peekable();
        while let Some(a) = args.next() {
            match a.strip_prefix("--") {
                Some(name) => {
                    let value = args
                        .next()
                        .ok_or_else(|| format!("--{name} needs a value"))?;
                    named.insert(name.to_owned(), value);
                }
                None => positional.push(a),
            }
        }
        Ok(Args { positional, named })
    }

    /// The value of `--name`, or `default` when it is absent.
    pub fn get<T: std::str::FromStr>(&self, name: &str, default: T) -> Result<T, BoxError> {
        match self.named.get(name) {
            Some(v) => v
                .parse()
                .map_err(|_| format!("--{name}: `{v}` is not valid").into()),
            None => Ok(default),
        }
    }

    /// The value of `--name`, which is required.
    pub fn text(&self, name: &str) -> Result<String, BoxError> {
        self.named
            .get(name)
            .cloned()
            .ok_or_else(|| format!("--{name} is required").into())
    }
}

/// The environment variable `name` parsed; `None` when it is unset or does not parse.
pub fn env<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Measures `raw` and `ours` twice each, as A, B, B, A (A is `ours` when `ours_first`), and
/// returns each side's mean time (raw, ours). Each call is told which of its side's two runs it
/// is (0 or 1), for a topic or stream of its own; the first two runs and the last two are pairs.
/// Both orders, because the side measured second in a pair ran faster (docs/benchmarks.md, "Both
/// orders each round").
pub async fn both_orders<R, RF, O, OF>(
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
    let (mut r, mut o) = (Duration::ZERO, Duration::ZERO);
    for (run, ours_turn) in [
        (0, ours_first),
        (0, !ours_first),
        (1, !ours_first),
        (1, ours_first),
    ] {
        if ours_turn {
            o += ours(run).await?;
        } else {
            r += raw(run).await?;
        }
    }
    Ok((r / 2, o / 2))
}

/// `f`'s result, with the CPU this process used while it ran added to `spent`: a side's CPU
/// over its runs of [`both_orders`].
pub async fn adding_cpu<T>(
    spent: &std::cell::Cell<Duration>,
    f: impl std::future::Future<Output = Result<T, BoxError>>,
) -> Result<T, BoxError> {
    let before = cpu_time("self");
    let t = f.await?;
    spent.set(spent.get() + (cpu_time("self") - before));
    Ok(t)
}

/// The librdkafka settings in environment variable `var` (`key=value,key=value`), for
/// experiments (`bench_kafka`'s `BENCH_KAFKA_SET` and `BENCH_RAW_SET`, `bench_backlog`'s
/// `BENCH_KAFKA_SET`).
pub fn env_settings(var: &str) -> Vec<(String, String)> {
    std::env::var(var)
        .unwrap_or_default()
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// The environment variable `name` parsed, or `default` when it is unset or does not parse.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    env(name).unwrap_or(default)
}

/// Calls `call(0)`, ..., `call(n - 1)` (as many as divide evenly) from `tasks` tasks, each
/// awaiting one call before its next: how a web service publishes, one event per request.
/// Returns how long it took.
pub async fn one_by_one<F, Fut>(n: usize, tasks: usize, call: F) -> Result<Duration, BoxError>
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<(), BoxError>> + Send,
{
    let per_task = n / tasks;
    let start = std::time::Instant::now();
    let mut running = Vec::new();
    for t in 0..tasks {
        let call = call.clone();
        running.push(tokio::spawn(async move {
            for i in 0..per_task {
                call((t * per_task + i) as u64).await?;
            }
            Ok::<_, BoxError>(())
        }));
    }
    for r in running {
        r.await??;
    }
    Ok(start.elapsed())
}

/// [`one_by_one`] with `EventBus::publish` of `event(i)`.
pub async fn publish_one_by_one<E: cqrs::Event + serde::Serialize + serde::de::DeserializeOwned>(
    bus: &cqrs::EventBus,
    n: usize,
    tasks: usize,
    event: fn(u64) -> E,
) -> Result<Duration, BoxError> {
    let bus = bus.clone();
    one_by_one(n, tasks, move |i| {
        let bus = bus.clone();
        async move { Ok(bus.publish(&event(i)).await?) }
    })
    .await
}
