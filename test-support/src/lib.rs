//! What the broker tests of cqrs share (the backends' own tests, the root package's, the tools):
//! servers the tests start, waiting for a condition, unique names, and scenarios every broker
//! test file runs the same way.
#![allow(missing_docs)]
// Test code: a panic is a failed test.
#![allow(clippy::unwrap_used)]

use std::future::Future;
use std::net::TcpListener;
#[cfg(feature = "redis")]
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

#[cfg(feature = "redis")]
use cqrs_redis::redis;

#[cfg(feature = "kafka")]
mod mock_kafka;
#[cfg(feature = "kafka")]
pub use mock_kafka::{serve_mock_kafka, MockKafka};
#[cfg(feature = "kafka")]
mod kafka_server;
#[cfg(feature = "kafka")]
pub use kafka_server::{KafkaCluster, KafkaServer};

/// A topic namer that sends every event to `topic`.
pub fn one_topic(topic: &str) -> cqrs::TopicNamer {
    let topic = topic.to_owned();
    cqrs::TopicNamer::new(move |_| topic.clone())
}

/// How long a test waits for something that should happen.
pub const WAIT: Duration = Duration::from_secs(30);

/// Polls `check` until it holds; panics after [`WAIT`].
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Logs to the test's output as `RUST_LOG` says (nothing when it is unset); once per process.
pub fn logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// What is logged at WARN and above on this thread while the guard lives, as text: for a test on
/// tokio's current-thread runtime (its tasks run on this thread) that asserts a warning.
pub fn captured_warnings() -> (tracing::subscriber::DefaultGuard, CapturedLogs) {
    captured_logs(tracing::Level::WARN)
}

/// What is logged at `level` and above on this thread while the guard lives (spans' fields
/// included), as text; see [`captured_warnings`].
pub fn captured_logs(level: tracing::Level) -> (tracing::subscriber::DefaultGuard, CapturedLogs) {
    let logs = CapturedLogs::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_ansi(false)
        .with_writer(logs.clone())
        .finish();
    (tracing::subscriber::set_default(subscriber), logs)
}

/// Log text gathered by [`captured_warnings`].
#[derive(Clone, Default)]
pub struct CapturedLogs(Arc<std::sync::Mutex<Vec<u8>>>);

impl CapturedLogs {
    /// Everything written so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for CapturedLogs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for CapturedLogs {
    type Writer = CapturedLogs;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// The error `running` ends with, within `within`; panics when it does not end in time, or ends
/// with `Ok`.
pub async fn failure(running: cqrs::RunningProcessor, within: Duration) -> cqrs::Error {
    tokio::time::timeout(within, running.wait())
        .await
        .expect("the processor did not stop in time")
        .expect_err("the processor stopped with Ok, not an error")
}

/// A fresh name with `prefix`.
pub fn unique(prefix: &str) -> String {
    cqrs::conformance::unique(prefix)
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port")
}

#[cfg(feature = "redis")]
/// A redis-server of the test's own, on a free port; stopped on drop.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    /// With an append-only file in this folder, fsynced on every write.
    aof: Option<std::path::PathBuf>,
    /// A TLS port beside the plain one, with the certificates in this folder.
    tls: Option<(u16, std::path::PathBuf)>,
    /// ACL users, each a rule as `ACL SETUSER` takes it.
    users: Vec<String>,
    /// A Unix socket beside the port, `redis.sock` in this folder.
    unix: Option<std::path::PathBuf>,
    /// An RDB file (`dump.rdb`) in this folder, written by `SAVE` and loaded at start this many
    /// microseconds a key (`key-load-delay`): a server that answers `LOADING` for a while.
    slow_load: Option<(std::path::PathBuf, u64)>,
}

#[cfg(feature = "redis")]
impl RedisServer {
    pub async fn start() -> Self {
        Self::plain().started().await
    }

    /// A server on a free port with nothing beside it, not started yet: the constructors set
    /// what they add, then start it ([`RedisServer::started`]).
    fn plain() -> Self {
        RedisServer {
            port: free_port(),
            child: None,
            aof: None,
            tls: None,
            users: Vec::new(),
            unix: None,
            slow_load: None,
        }
    }

    /// Starts the server and waits until it answers.
    async fn started(mut self) -> Self {
        self.spawn().await;
        self
    }

    /// A server with the ACL users `users` (see [`RedisServer::start_tls`]), without TLS.
    pub async fn start_with_users(users: &[&str]) -> Self {
        let mut server = Self::plain();
        server.users = users.iter().map(|u| (*u).to_owned()).collect();
        server.started().await
    }

    /// A server with a TLS port beside its plain one (certificates made by `scripts/certs`, for
    /// `localhost` and 127.0.0.1; clients need not present one) and the ACL users `users`, each
    /// a rule as `ACL SETUSER` takes it (`app on >secret ~app-* +@all`; no spaces in a word).
    /// The default user stays, without a password, for the test's own set-up on the plain port.
    pub async fn start_tls(users: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(unique("cqrs-redis-tls"));
        let certs = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/certs");
        let made = Command::new("bash")
            .arg(certs)
            .arg(&dir)
            .arg("server")
            .status()
            .expect("bash");
        assert!(made.success(), "scripts/certs failed");
        let mut server = Self::plain();
        server.tls = Some((free_port(), dir));
        server.users = users.iter().map(|u| (*u).to_owned()).collect();
        server.started().await
    }

    /// A server that listens on a Unix socket ([`RedisServer::unix_socket`]) beside its port.
    pub async fn start_unix() -> Self {
        let dir = std::env::temp_dir().join(unique("cqrs-redis-unix"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut server = Self::plain();
        server.unix = Some(dir);
        server.started().await
    }

    /// The Unix socket of [`RedisServer::start_unix`].
    pub fn unix_socket(&self) -> std::path::PathBuf {
        let dir = self
            .unix
            .as_ref()
            .expect("a server started with start_unix");
        dir.join("redis.sock")
    }

    /// `rediss://[user:password@]localhost:PORT/0` to the TLS port of [`RedisServer::start_tls`].
    pub fn tls_url(&self, credentials: Option<(&str, &str)>) -> String {
        let (port, _) = self.tls.as_ref().expect("a server started with start_tls");
        let userinfo = credentials.map_or(String::new(), |(u, p)| format!("{u}:{p}@"));
        format!("rediss://{userinfo}localhost:{port}/0")
    }

    /// The CA that signed the TLS port's certificate, for `SSL_CERT_FILE`.
    pub fn ca(&self) -> std::path::PathBuf {
        let (_, dir) = self.tls.as_ref().expect("a server started with start_tls");
        dir.join("ca.pem")
    }

    /// A server that keeps what `SAVE` writes (an RDB file) and, started again
    /// ([`RedisServer::restart`]), takes `per_key` to load each key, answering `LOADING`
    /// meanwhile: fill it with keys of 1 KiB or more (it answers after each KiB loaded) to make
    /// the loading last.
    pub async fn start_slow_loading(per_key: Duration) -> Self {
        let dir = std::env::temp_dir().join(unique("cqrs-redis-rdb"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut server = Self::plain();
        server.slow_load = Some((dir, per_key.as_micros() as u64));
        server.started().await
    }

    /// A server that keeps every write in an append-only file (`appendfsync always`), so that
    /// a restart, even after SIGKILL, loses nothing it acknowledged.
    pub async fn start_durable() -> Self {
        let dir = std::env::temp_dir().join(unique("cqrs-redis-aof"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut server = Self::plain();
        server.aof = Some(dir);
        server.started().await
    }

    async fn spawn(&mut self) {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"]);
        match &self.aof {
            Some(dir) => {
                cmd.args([
                    "--save",
                    "",
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    "always",
                ])
                .arg("--dir")
                .arg(dir);
            }
            None => {
                cmd.args(["--save", "", "--appendonly", "no"]);
            }
        }
        if let Some((port, dir)) = &self.tls {
            cmd.args(["--tls-port", &port.to_string(), "--tls-auth-clients", "no"])
                .arg("--tls-cert-file")
                .arg(dir.join("server.pem"))
                .arg("--tls-key-file")
                .arg(dir.join("server.key"))
                .arg("--tls-ca-cert-file")
                .arg(dir.join("ca.pem"));
        }
        for user in &self.users {
            cmd.arg("--user").args(user.split_whitespace());
        }
        if let Some(dir) = &self.unix {
            cmd.arg("--unixsocket").arg(dir.join("redis.sock"));
        }
        if let Some((dir, per_key)) = &self.slow_load {
            cmd.arg("--dir")
                .arg(dir)
                .args(["--dbfilename", "dump.rdb"])
                .args(["--key-load-delay", &per_key.to_string()])
                // Clients are served (with `LOADING`) after every KiB loaded, not every 2 MiB;
                // values are stored as they are (compressed, a KiB of one letter is 30 bytes).
                .args(["--loading-process-events-interval-bytes", "1024"])
                .args(["--rdbcompression", "no"]);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/test installs it)");
        self.child = Some(child);
        let url = self.url();
        eventually("redis-server to answer", || {
            let url = url.clone();
            async move { ping(&url).await }
        })
        .await;
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Kills the server and starts it again on the same port: empty, or with what its
    /// append-only file holds.
    pub async fn restart(&mut self) {
        self.stop();
        self.spawn().await;
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[cfg(feature = "redis")]
impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        if let Some(dir) = &self.aof {
            let _ = std::fs::remove_dir_all(dir);
        }
        if let Some((_, dir)) = &self.tls {
            let _ = std::fs::remove_dir_all(dir);
        }
        if let Some(dir) = &self.unix {
            let _ = std::fs::remove_dir_all(dir);
        }
        if let Some((dir, _)) = &self.slow_load {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

#[cfg(feature = "redis")]
async fn ping(url: &str) -> bool {
    let Ok(client) = redis::Client::open(url) else {
        return false;
    };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return false;
    };
    redis::cmd("PING")
        .query_async::<String>(&mut conn)
        .await
        .is_ok()
}

/// The shared Kafka broker of the test run: `KAFKA_BROKERS`, or 127.0.0.1:9092.
pub fn kafka_brokers() -> String {
    std::env::var("KAFKA_BROKERS")
        .ok()
        .filter(|b| !b.is_empty())
        .unwrap_or_else(|| "127.0.0.1:9092".to_owned())
}

/// The low and high watermarks of `topic`'s `partition` from a fresh client at `brokers`. A topic
/// just created may answer "not leader" (or "unknown") until its partitions' leaders are known to
/// every listener: asked again until [`WAIT`].
#[cfg(feature = "kafka")]
pub fn kafka_watermarks(brokers: &str, topic: &str, partition: i32) -> (i64, i64) {
    use cqrs_kafka::rdkafka::consumer::{BaseConsumer, Consumer};
    let client: BaseConsumer = cqrs_kafka::rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        match client.fetch_watermarks(topic, partition, Duration::from_secs(10)) {
            Ok(marks) => return marks,
            Err(e) => assert!(
                std::time::Instant::now() < deadline,
                "the watermarks of {topic}/{partition}: {e}"
            ),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The shared Redis of the test run: `REDIS_URL`, or database 15 on 127.0.0.1:6379.
pub fn redis_url() -> String {
    std::env::var("REDIS_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "redis://127.0.0.1:6379/15".to_owned())
}

#[cfg(feature = "redis")]
/// Deletes the keys it holds when dropped.
pub struct Keys {
    url: String,
    keys: Vec<String>,
}

#[cfg(feature = "redis")]
impl Keys {
    pub fn new(url: &str) -> Self {
        Keys {
            url: url.to_owned(),
            keys: Vec::new(),
        }
    }

    pub fn add(&mut self, key: &str) -> String {
        self.keys.push(key.to_owned());
        key.to_owned()
    }
}

#[cfg(feature = "redis")]
impl Drop for Keys {
    fn drop(&mut self) {
        if self.keys.is_empty() {
            return;
        }
        if let Ok(client) = redis::Client::open(self.url.as_str()) {
            if let Ok(mut conn) = client.get_connection() {
                let _ = redis::cmd("DEL").arg(&self.keys).query::<()>(&mut conn);
            }
        }
    }
}

/// The second, independent Kafka broker of the test run (`KAFKA_BROKERS_B`, started by
/// `scripts/test`), for the two-cluster test.
pub fn kafka_brokers_b() -> String {
    std::env::var("KAFKA_BROKERS_B")
        .ok()
        .filter(|b| !b.is_empty())
        .unwrap_or_else(|| "127.0.0.1:9093".to_owned())
}

/// Three versions of one event, as a service's history leaves them: version 3 reads 2 directly
/// and 1 through 2 (`upcast_from`).
pub mod versions {
    use serde::{Deserialize, Serialize};

    /// Version 1: the total in euros.
    #[derive(Debug, Clone, Serialize, Deserialize, cqrs::Event)]
    #[event(name = "orders.OrderPlaced", version = 1)]
    pub struct OrderPlacedV1 {
        pub order_id: String,
        pub total: f64,
    }

    /// Version 2: the total in cents.
    #[derive(Debug, Clone, Serialize, Deserialize, cqrs::Event)]
    #[event(
        name = "orders.OrderPlaced",
        version = 2,
        upcast_from = "OrderPlacedV1"
    )]
    pub struct OrderPlacedV2 {
        pub order_id: String,
        pub total_cents: u64,
    }

    impl From<OrderPlacedV1> for OrderPlacedV2 {
        fn from(v1: OrderPlacedV1) -> Self {
            OrderPlacedV2 {
                order_id: v1.order_id,
                total_cents: (v1.total * 100.0).round() as u64,
            }
        }
    }

    /// Version 3: with its currency.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, cqrs::Event)]
    #[event(
        name = "orders.OrderPlaced",
        version = 3,
        upcast_from = "OrderPlacedV2"
    )]
    pub struct OrderPlaced {
        pub order_id: String,
        pub total_cents: u64,
        pub currency: String,
    }

    impl From<OrderPlacedV2> for OrderPlaced {
        fn from(v2: OrderPlacedV2) -> Self {
            OrderPlaced {
                order_id: v2.order_id,
                total_cents: v2.total_cents,
                currency: "EUR".into(),
            }
        }
    }

    /// The reason a version 4 message is dead-lettered with, by a version 3 handler.
    pub const V4_REASON: &str = "unknown version 4 of orders.OrderPlaced (handler knows up to 3)";
}

/// Scenarios every broker test file runs the same way.
pub mod scenarios {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use cqrs::processor::dead_letter_headers as dlq;
    use cqrs::{
        Backend, CancellationToken, Context, EventBus, EventProcessor, RetryPolicy, Subscription,
        TopicNamer,
    };
    use serde::{Deserialize, Serialize};

    use super::{eventually, unique};

    /// A job numbered `n`.
    #[derive(Debug, Clone, Serialize, Deserialize, cqrs::Event)]
    pub struct Job {
        #[event(key)]
        pub n: u32,
    }

    /// `n` jobs numbered from 0.
    pub fn jobs(n: u32) -> Vec<Job> {
        (0..n).map(|n| Job { n }).collect()
    }

    /// The numbers of the jobs of each call of a batch handler.
    pub type Calls = Arc<Mutex<Vec<Vec<u32>>>>;

    /// Starts batch handler `store` of `service` on `namer`'s topic (batches of 10), which
    /// records each call and fails job 12 the first time it sees it.
    pub async fn batch_failing_12_once(
        backend: impl Backend + Clone,
        namer: TopicNamer,
        service: &str,
    ) -> (cqrs::RunningProcessor, Calls) {
        let calls: Calls = Arc::default();
        let mut p = EventProcessor::new(backend, service).topics(namer);
        let c = calls.clone();
        p.handle_batch("store", move |batch: Vec<Job>| {
            let c = c.clone();
            async move {
                let mut calls = c.lock().unwrap();
                let first_time = !calls.iter().flatten().any(|n| *n == 12);
                calls.push(batch.iter().map(|j| j.n).collect());
                let mut failed = cqrs::BatchError::none();
                if let Some(i) = batch.iter().position(|j| j.n == 12) {
                    if first_time {
                        failed.fail(i, "try 12 again");
                    }
                }
                failed.into_result()
            }
        })
        .unwrap()
        .batch_size(10)
        .retry(RetryPolicy::attempts(3).backoff(Duration::from_millis(10), 1.0));
        (p.start(CancellationToken::new()).await.unwrap(), calls)
    }

    /// The outcomes a handler decides: `Ok` acks, an error from `cqrs::retry_after` is retried
    /// after the handler's delay (not the 5 ms backoff), one from `cqrs::permanent` is
    /// dead-lettered at once with its reason. Handler `decide` of `service` on `namer`'s topic,
    /// whose dead letters go to `dead`.
    pub async fn handler_decides(
        backend: impl Backend + Clone,
        namer: TopicNamer,
        service: &str,
        dead: &str,
    ) {
        let service = service.to_owned();
        let dead = dead.to_owned();
        type Tries = Arc<Mutex<Vec<(u32, u32, std::time::Instant)>>>;
        let tries: Tries = Arc::default();
        let mut p = EventProcessor::new(backend.clone(), &service).topics(namer.clone());
        let t = tries.clone();
        p.handle("decide", move |r: Job, ctx: Context| {
            t.lock()
                .unwrap()
                .push((r.n, ctx.attempt(), std::time::Instant::now()));
            let decision: Result<(), cqrs::BoxError> = match (r.n, ctx.attempt()) {
                // A rate-limited call: the handler names the delay (say, from `Retry-After`).
                (1, 1) => Err(cqrs::retry_after(
                    Duration::from_millis(400),
                    "429 Too Many Requests",
                )),
                // Retrying cannot help: straight to the dead letter, with the reason.
                (2, _) => Err(cqrs::permanent("unknown account")),
                _ => Ok(()),
            };
            async move { decision }
        })
        .unwrap()
        .retry(RetryPolicy::attempts(5).backoff(Duration::from_millis(5), 1.0));
        let running = p.start(CancellationToken::new()).await.unwrap();
        EventBus::new(backend.clone())
            .topics(namer)
            .publish_all(&jobs(3))
            .await
            .unwrap();
        let mut reader = backend
            .subscribe(&Subscription::new(unique("r"), [&dead]))
            .await
            .unwrap();
        let d = cqrs::conformance::receive_n(&mut *reader, 1).await;
        assert_eq!(
            d[0].message().metadata.headers[dlq::REASON],
            "unknown account"
        );
        assert_eq!(d[0].message().metadata.headers[dlq::ATTEMPTS], "1");
        eventually("the rate-limited event retried", || {
            let n = tries.lock().unwrap().iter().filter(|t| t.0 == 1).count();
            async move { n == 2 }
        })
        .await;
        running.shutdown().await.unwrap();
        let tries = tries.lock().unwrap().clone();
        let of = |n: u32| -> Vec<(u32, std::time::Instant)> {
            tries
                .iter()
                .filter(|t| t.0 == n)
                .map(|t| (t.1, t.2))
                .collect()
        };
        assert_eq!(of(0).len(), 1, "acked at once: {tries:?}");
        assert_eq!(of(2).len(), 1, "not retried: {tries:?}");
        let rate_limited = of(1);
        assert_eq!((rate_limited[0].0, rate_limited[1].0), (1, 2));
        let waited = rate_limited[1].1 - rate_limited[0].1;
        assert!(
            waited >= Duration::from_millis(400),
            "the handler's delay, not the 5 ms backoff: {waited:?}"
        );
    }
}

/// The secure Kafka broker of the test run (`scripts/kafka start DIR --secure`, started by
/// `scripts/test` with `KAFKA_SECURE_DIR` naming its directory): its listeners, CA, client
/// certificate and users' passwords, read from `DIR/secure.env`.
#[cfg(feature = "kafka")]
pub struct SecureKafka {
    vars: std::collections::HashMap<String, String>,
}

#[cfg(feature = "kafka")]
impl SecureKafka {
    /// The broker `KAFKA_SECURE_DIR` names; panics, saying how to start one, when it is unset.
    pub fn shared() -> Self {
        let dir = std::env::var("KAFKA_SECURE_DIR").ok().filter(|d| !d.is_empty()).expect(
            "KAFKA_SECURE_DIR is not set: run the tests through scripts/test, or start a broker \
             with `scripts/kafka start DIR --secure` and set KAFKA_SECURE_DIR=DIR",
        );
        let path = std::path::Path::new(&dir).join("secure.env");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let vars = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        SecureKafka { vars }
    }

    /// Changes the broker's ACLs as the super user (`scripts/kafka acl`, Kafka's AclCommand:
    /// `--add`/`--remove --force` and what it takes); panics if that fails.
    pub fn acl(&self, args: &[&str]) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/kafka");
        let out = std::process::Command::new("bash")
            .arg(script)
            .args(["acl", self.get("PLAINTEXT")])
            .args(args)
            .output()
            .expect("bash");
        assert!(
            out.status.success(),
            "scripts/kafka acl {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// One of `PLAINTEXT` (the super user's listener), `SASL_SSL`, `SSL`, `CA`, `CLIENT_CERT`,
    /// `CLIENT_KEY`, `ALICE_PASSWORD`, `MALLORY_PASSWORD`.
    pub fn get(&self, key: &str) -> &str {
        self.vars
            .get(key)
            .unwrap_or_else(|| panic!("secure.env has no {key}"))
    }
}

/// Reads the dead letters of `topic` in pages of `size` and checks them against the whole list:
/// the same letters in the same order, none twice, each page full but the last; returns how many
/// pages it took.
pub async fn pages_match_the_whole_list(
    store: &dyn cqrs::DeadLetterStore,
    topic: &str,
    size: usize,
) -> usize {
    let whole: Vec<String> = store
        .dead_letters(topic)
        .await
        .expect("listing")
        .into_iter()
        .map(|d| d.id)
        .collect();
    let (mut paged, mut after, mut pages) = (Vec::new(), None::<String>, 0);
    loop {
        let page = store
            .dead_letters_page(topic, after.as_deref(), size)
            .await
            .expect("a page");
        assert!(page.len() <= size, "a page of {} for {size}", page.len());
        pages += 1;
        assert!(pages <= whole.len() + 1, "paging does not end: {paged:?}");
        let Some(last) = page.last() else { break };
        after = Some(last.id.clone());
        let full = page.len() == size;
        paged.extend(page.into_iter().map(|d| d.id));
        if !full {
            break;
        }
    }
    assert_eq!(paged, whole, "pages of {size} against the whole list");
    pages
}

/// Dead letters for `dead`, each from `origin` (with the headers a processor writes), keyed
/// `k0`, `k1`, ... so that a Kafka topic spreads them over its partitions.
pub fn dead_letters_from(origin: &str, n: usize, tag: &str) -> Vec<cqrs::Message> {
    use cqrs::dead_letter::headers;
    (0..n)
        .map(|i| {
            let mut m = cqrs::Message::new("X", format!("{tag}{i}").into_bytes())
                .with_key(Some(format!("k{i}").into()));
            let h = &mut m.metadata.headers;
            h.insert(headers::TOPIC.into(), origin.into());
            h.insert(headers::REASON.into(), "refused".into());
            m
        })
        .collect()
}

/// `publish` from inside a synchronous callback (the `each` of `redrive_all`): the test's
/// runtime must be multi-threaded.
fn publish_now<S: cqrs::backend::Publisher>(store: &S, topic: &str, messages: &[cqrs::Message]) {
    tokio::task::block_in_place(|| {
        tokio::runtime::Handle::current()
            .block_on(store.publish(topic, messages))
            .expect("publishing from inside the callback");
    });
}

/// `redrive_all` and `purge_all` in pages of `size` act on the dead letters that were on `dead`
/// when they started, each once, in the list's order; a letter dead-lettered while they run
/// (here, from inside their first callback) stays listed. Redriven letters are on `origin`
/// with `x-redriven-from`. `dead_letters_by_id` finds the ids asked for, in the list's order,
/// and leaves out `absent` (an id of the backend's form that is not there) and one that is not
/// an id at all. Each of `dead` and `origin` must be a new topic.
pub async fn paged_redrive_and_purge_take_only_what_was_there<S>(
    store: &S,
    dead: &str,
    origin: &str,
    size: usize,
    absent: &str,
) where
    S: cqrs::DeadLetterStore + cqrs::backend::Publisher,
{
    let ids = |list: Vec<cqrs::DeadLetter>| list.into_iter().map(|d| d.id).collect::<Vec<_>>();
    store
        .publish(dead, &dead_letters_from(origin, 7, "first-"))
        .await
        .unwrap();
    let before = ids(store.dead_letters(dead).await.unwrap());
    assert_eq!(before.len(), 7);

    let asked = [
        before[4].clone(),
        absent.to_owned(),
        before[1].clone(),
        "not an id".to_owned(),
    ];
    let found = ids(store.dead_letters_by_id(dead, &asked).await.unwrap());
    assert_eq!(found, [before[1].clone(), before[4].clone()], "by id");

    let mut seen = Vec::new();
    let redriven = store
        .redrive_all(dead, size, &mut |d| {
            if seen.is_empty() {
                publish_now(store, dead, &dead_letters_from(origin, 1, "late-"));
            }
            seen.push(d.id.clone());
        })
        .await
        .unwrap();
    assert_eq!(seen, before, "redrive_all in pages of {size}");
    assert_eq!(redriven, 7);
    let left = store.dead_letters(dead).await.unwrap();
    assert_eq!(
        left.len(),
        1,
        "the late letter stays: {:?}",
        ids(left.clone())
    );
    assert_eq!(&left[0].message.payload[..], b"late-0");
    let mut back: Vec<String> = store
        .dead_letters(origin)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.message.metadata.headers[cqrs::dead_letter::REDRIVEN_FROM].clone())
        .collect();
    back.sort();
    let mut expected = before.clone();
    expected.sort();
    assert_eq!(back, expected, "what is back on {origin}");

    store
        .publish(dead, &dead_letters_from(origin, 4, "second-"))
        .await
        .unwrap();
    let before = ids(store.dead_letters(dead).await.unwrap());
    assert_eq!(before.len(), 5);
    let mut seen = Vec::new();
    let removed = store
        .purge_all(dead, size, &mut |d| {
            if seen.is_empty() {
                publish_now(store, dead, &dead_letters_from(origin, 1, "later-"));
            }
            seen.push(d.id.clone());
        })
        .await
        .unwrap();
    assert_eq!(seen, before, "purge_all in pages of {size}");
    assert_eq!(removed, 5);
    let left = store.dead_letters(dead).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(&left[0].message.payload[..], b"later-0");
}

/// A TCP proxy on a free loopback port to a server at `127.0.0.1:target`. Once armed, the next
/// connection to get bytes back from the server is closed at both ends before they are passed
/// on: the server did what it was asked, and the client never hears of it (a connection lost
/// while its reply was on the way). Stopped on drop.
pub struct CuttingProxy {
    /// The port clients connect to.
    pub port: u16,
    armed: Arc<std::sync::atomic::AtomicBool>,
    cuts: Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl CuttingProxy {
    pub async fn start(target: u16) -> Self {
        use std::sync::atomic::{AtomicBool, AtomicU64};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a free loopback port");
        let port = listener.local_addr().expect("a bound listener").port();
        let armed = Arc::new(AtomicBool::new(false));
        let cuts = Arc::new(AtomicU64::new(0));
        let (a, c) = (armed.clone(), cuts.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else {
                    continue;
                };
                tokio::spawn(Self::relay(client, server, a.clone(), c.clone()));
            }
        });
        CuttingProxy {
            port,
            armed,
            cuts,
            task,
        }
    }

    /// Cuts the next connection the server answers on.
    pub fn arm(&self) {
        self.armed.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// How many connections were cut.
    pub fn cuts(&self) -> u64 {
        self.cuts.load(std::sync::atomic::Ordering::SeqCst)
    }

    async fn relay(
        client: tokio::net::TcpStream,
        server: tokio::net::TcpStream,
        armed: Arc<std::sync::atomic::AtomicBool>,
        cuts: Arc<std::sync::atomic::AtomicU64>,
    ) {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client_read, mut client_write) = client.into_split();
        let (mut server_read, mut server_write) = server.into_split();
        let up = tokio::io::copy(&mut client_read, &mut server_write);
        let down = async {
            let mut buf = vec![0; 64 * 1024];
            loop {
                let n = server_read.read(&mut buf).await?;
                if n == 0 {
                    return Ok::<_, std::io::Error>(());
                }
                if armed.swap(false, Ordering::SeqCst) {
                    cuts.fetch_add(1, Ordering::SeqCst);
                    return Ok(());
                }
                client_write.write_all(&buf[..n]).await?;
            }
        };
        // Either side done (or the cut): every half is dropped, both connections close.
        tokio::select! {
            _ = up => {}
            _ = down => {}
        }
    }
}

impl Drop for CuttingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
