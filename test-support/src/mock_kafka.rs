//! librdkafka's mock cluster served from a process of its own, for the faults Apache Kafka does
//! not produce on demand (commits refused by injection, a broker without CreateTopics): the
//! `mock_cluster_*` tests of `cqrs-kafka/tests/kafka.rs`. The test binary that uses it defines an ignored
//! pseudo-test `mock_kafka_server` that calls [`serve_mock_kafka`].

use std::process::{Child, Command, Stdio};

/// librdkafka's mock cluster in a process of its own (this test binary run again as
/// `mock_kafka_server`), serving on loopback TCP; killed on drop.
pub struct MockKafka {
    brokers: String,
    child: Child,
}

impl MockKafka {
    /// Starts the cluster with `topics` (name, partitions) created.
    pub async fn start(topics: &[(&str, i32)]) -> Self {
        Self::start_refusing_commits(topics, 0).await
    }

    /// Starts the cluster with `topics` created; it answers the first `commits` offset commits
    /// with `REBALANCE_IN_PROGRESS`, as a group that is rebalancing does.
    pub async fn start_refusing_commits(topics: &[(&str, i32)], commits: usize) -> Self {
        use std::io::BufRead;
        let spec: Vec<String> = topics.iter().map(|(t, p)| format!("{t}:{p}")).collect();
        let mut child = Command::new(std::env::current_exe().expect("test binary"))
            .args(["--ignored", "--exact", "mock_kafka_server", "--nocapture"])
            .env("CQRS_MOCK_KAFKA_TOPICS", spec.join(","))
            .env("CQRS_MOCK_KAFKA_REFUSE_COMMITS", commits.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot run the test binary again");
        let stdout = child.stdout.take().expect("stdout");
        let brokers = tokio::task::spawn_blocking(move || {
            std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .find_map(|l| l.strip_prefix("mock-kafka-bootstrap=").map(str::to_owned))
        })
        .await
        .expect("reader")
        .expect("the mock cluster did not start");
        MockKafka { brokers, child }
    }

    pub fn brokers(&self) -> &str {
        &self.brokers
    }
}

impl Drop for MockKafka {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The body of the `mock_kafka_server` pseudo-test: serves until stdin closes.
pub fn serve_mock_kafka() {
    use std::io::{BufRead, Write};
    let Ok(spec) = std::env::var("CQRS_MOCK_KAFKA_TOPICS") else {
        return;
    };
    let cluster = cqrs_kafka::rdkafka::mocking::MockCluster::new(1).expect("mock cluster");
    for topic in spec.split(',').filter(|t| !t.is_empty()) {
        let (name, partitions) = topic.split_once(':').expect("topic:partitions");
        cluster
            .create_topic(name, partitions.parse().expect("partitions"), 1)
            .expect("create_topic");
    }
    let refused: usize = std::env::var("CQRS_MOCK_KAFKA_REFUSE_COMMITS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    if refused > 0 {
        use cqrs_kafka::rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
        cluster.request_errors(
            RDKafkaApiKey::OffsetCommit,
            &vec![RDKafkaRespErr::RD_KAFKA_RESP_ERR_REBALANCE_IN_PROGRESS; refused],
        );
    }
    println!("mock-kafka-bootstrap={}", cluster.bootstrap_servers());
    std::io::stdout().flush().expect("stdout");
    let mut line = String::new();
    while std::io::stdin().lock().read_line(&mut line).unwrap_or(0) > 0 {
        line.clear();
    }
}
