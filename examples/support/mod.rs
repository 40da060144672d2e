//! Helpers shared by the benchmarks (included with `#[path]`; not an example of its own).

// Each benchmark uses some of them.
#![allow(dead_code)]

use std::time::Duration;

use cqrs::BoxError;

/// A tansu broker on a free port, stopped on drop.
pub struct Tansu {
    pub brokers: String,
    child: std::process::Child,
}

impl Tansu {
    pub async fn start() -> Result<Self, BoxError> {
        let bin = std::env::var("TANSU_BIN").unwrap_or_else(|_| {
            format!(
                "{}/.cache/tansu-0.6.0/bin/tansu",
                std::env::var("HOME").unwrap_or_default()
            )
        });
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let url = format!("tcp://127.0.0.1:{port}");
        let child = std::process::Command::new(bin)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Ok(Tansu {
                    brokers: format!("127.0.0.1:{port}"),
                    child,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err("tansu did not start".into())
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

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

#[cfg(feature = "kafka")]
/// The child side of [`MockKafka`]: serves a one-broker librdkafka mock cluster with `topics`
/// (the mock has no CreateTopics), prints its bootstrap address, and runs until stdin closes.
pub fn serve_mock_kafka(topics: &[&str], partitions: i32) -> Result<(), BoxError> {
    use std::io::{BufRead, Write};
    let cluster = cqrs::kafka::rdkafka::mocking::MockCluster::new(1)?;
    for topic in topics {
        cluster.create_topic(topic, partitions, 1)?;
    }
    println!("{}", cluster.bootstrap_servers());
    std::io::stdout().flush()?;
    let mut line = String::new();
    while std::io::stdin().lock().read_line(&mut line)? > 0 {
        line.clear();
    }
    drop(cluster);
    Ok(())
}

/// librdkafka's mock cluster served by a process of its own (this program run with `args`, which
/// must call [`serve_mock_kafka`]), stopped on drop. The benchmarks that publish in bulk use it:
/// tansu 0.6 keeps one record of the first multi-record batch each partition receives (2,000
/// records published in two batches of 1,000 leave 1,003, with the raw rdkafka producer too).
pub struct MockKafka {
    pub brokers: String,
    child: std::process::Child,
}

#[cfg(feature = "kafka")]
impl MockKafka {
    pub fn start(args: &[&str]) -> Result<Self, BoxError> {
        use std::io::BufRead;
        let mut child = std::process::Command::new(std::env::current_exe()?)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut brokers = String::new();
        std::io::BufReader::new(stdout).read_line(&mut brokers)?;
        let brokers = brokers.trim().to_owned();
        if brokers.is_empty() {
            let _ = child.kill();
            return Err("the mock Kafka cluster did not start".into());
        }
        Ok(MockKafka { brokers, child })
    }
}

#[cfg(feature = "kafka")]
impl Drop for MockKafka {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(feature = "kafka")]
/// Kafka for a benchmark: the cluster at `KAFKA_BROKERS` if set, else a [`MockKafka`] holding
/// `topics` with `partitions` each, served by this program run as
/// `kafka-broker <partitions> <topic>...` (see [`kafka_broker_role`]). Keep the guard alive.
pub fn bench_kafka(
    topics: &[String],
    partitions: i32,
) -> Result<(Option<MockKafka>, cqrs::kafka::KafkaConfig), BoxError> {
    use cqrs::kafka::KafkaConfig;
    if let Ok(brokers) = std::env::var("KAFKA_BROKERS") {
        return Ok((None, KafkaConfig::new(brokers).partitions(partitions)));
    }
    let partitions_arg = partitions.to_string();
    let mut args = vec!["kafka-broker", partitions_arg.as_str()];
    args.extend(topics.iter().map(String::as_str));
    let mock = MockKafka::start(&args)?;
    let config = KafkaConfig::new(mock.brokers.as_str()).create_topics(false);
    Ok((Some(mock), config))
}

#[cfg(feature = "kafka")]
/// Runs the `kafka-broker <partitions> <topic>...` role if `args` (without the program name)
/// ask for it: `None` otherwise.
pub fn kafka_broker_role(args: &[String]) -> Option<Result<(), BoxError>> {
    let [role, partitions, topics @ ..] = args else {
        return None;
    };
    if role != "kafka-broker" {
        return None;
    }
    let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
    Some(match partitions.parse() {
        Ok(partitions) => serve_mock_kafka(&topics, partitions),
        Err(e) => Err(e.into()),
    })
}

/// `fetch.wait.max.ms` for the benchmarks' Kafka clients: `BENCH_KAFKA_FETCH_WAIT_MS`, else our
/// default (100 ms). The mock cluster holds every fetch that long and answers it with one record
/// batch per partition, so it sets both latency and drain rate there.
pub fn kafka_fetch_wait_ms() -> u64 {
    std::env::var("BENCH_KAFKA_FETCH_WAIT_MS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100)
}

/// The event the benchmarks send: keyed over 1,000 keys, ~200 bytes of JSON.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, cqrs::Event)]
pub struct Sample {
    #[event(key)]
    pub key: String,
    pub seq: u64,
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
