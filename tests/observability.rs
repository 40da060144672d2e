//! Metrics (feature `prometheus`): a processor and a bus record to a Prometheus exporter, and a
//! scrape of its HTTP endpoint shows the counters moved, on the in-memory broker, Redis and
//! Kafka.

#![allow(clippy::unwrap_used)]

use cqrs_test_support as support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use cqrs::backend::Backend;
use cqrs::prometheus::PrometheusBuilder;
use cqrs::{permanent, CancellationToken, Event, EventBus, EventProcessor, RetryPolicy};
use serde::{Deserialize, Serialize};
use support::{eventually, unique};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
struct Booked {
    #[event(key)]
    ticket: String,
    n: u32,
}

/// The exporter's address: one recorder per process, installed on a thread of its own (with its
/// own runtime) so it outlives each test's runtime.
fn exporter() -> &'static str {
    static ADDR: OnceLock<String> = OnceLock::new();
    ADDR.get_or_init(|| {
        let addr = format!("127.0.0.1:{}", support::free_port());
        let listen: std::net::SocketAddr = addr.parse().unwrap();
        std::thread::spawn(move || {
            PrometheusBuilder::new()
                .with_http_listener(listen)
                .install()
        })
        .join()
        .unwrap()
        .unwrap();
        addr
    })
}

/// The body of `GET /metrics`.
async fn scrape() -> String {
    let mut stream = tokio::net::TcpStream::connect(exporter()).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

/// The value of the series `name` whose labels include every one of `labels`.
fn value(body: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    body.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Five events on `backend`: three handled, one failing for good, one panicking (one attempt
/// allowed), so sent, consumed, processing time, dead letters and panics all move.
async fn counters_move(backend: impl Backend + Clone, system: &str) {
    exporter();
    let topic = unique("metrics");
    let service = unique("svc");
    let group = format!("{service}.book");
    let handled = Arc::new(AtomicUsize::new(0));
    let mut p =
        EventProcessor::new(backend.clone(), service.as_str()).topics(support::one_topic(&topic));
    let h = handled.clone();
    p.handle("book", move |e: Booked| {
        let h = h.clone();
        async move {
            h.fetch_add(1, Ordering::SeqCst);
            match e.n {
                3 => Err(permanent("sold out")),
                4 => panic!("the printer caught fire"),
                _ => Ok(()),
            }
        }
    })
    .unwrap()
    .retry(RetryPolicy::attempts(1))
    .sample_backlog_every(Some(Duration::from_millis(200)));
    let running = p.start(CancellationToken::new()).await.unwrap();
    let events: Vec<Booked> = (0..5)
        .map(|n| Booked {
            ticket: format!("t{n}"),
            n,
        })
        .collect();
    EventBus::new(backend.clone())
        .topics(support::one_topic(&topic))
        .publish_all(&events)
        .await
        .unwrap();
    let labels = [
        ("backend", system),
        ("group", group.as_str()),
        ("handler", "book"),
        ("topic", topic.as_str()),
    ];
    eventually(
        "five consumed, two dead-lettered and no lag, as scraped",
        || async {
            let body = scrape().await;
            let dead = |reason: &str| {
                let mut l = labels.to_vec();
                l.push(("reason", reason));
                value(&body, "cqrs_dead_lettered", &l)
            };
            // The broker's view, sampled: the group has nothing left.
            let lag = value(&body, "cqrs_consumer_lag", &[("group", group.as_str())]);
            value(&body, "messaging_client_consumed_messages", &labels) == Some(5.0)
                && dead("permanent") == Some(1.0)
                && dead("attempts_exhausted") == Some(1.0)
                && lag == Some(0.0)
        },
    )
    .await;
    running.shutdown().await.unwrap();
    let body = scrape().await;
    let sent = [("backend", system), ("topic", topic.as_str())];
    assert_eq!(
        value(&body, "messaging_client_sent_messages", &sent),
        Some(5.0)
    );
    assert_eq!(
        value(&body, "cqrs_handler_panics", &labels),
        Some(1.0),
        "{body}"
    );
    let mut ok = labels.to_vec();
    ok.push(("outcome", "ok"));
    let mut failed = labels.to_vec();
    failed.push(("outcome", "error"));
    assert_eq!(
        value(&body, "messaging_process_duration_count", &ok),
        Some(3.0)
    );
    assert_eq!(
        value(&body, "messaging_process_duration_count", &failed),
        Some(2.0)
    );
    assert_eq!(value(&body, "cqrs_in_flight", &labels[..3]), Some(0.0));
    assert!(
        value(&body, "cqrs_consumer_pending", &[("group", group.as_str())]).is_some(),
        "the group's pending entries are sampled: {body}"
    );
    assert_eq!(handled.load(Ordering::SeqCst), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_move_on_the_in_memory_broker() {
    counters_move(cqrs::memory::MemoryBroker::new(), "memory").await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_move_on_redis() {
    let backend = cqrs::redis::RedisBackend::connect(&support::redis_url())
        .await
        .unwrap();
    counters_move(backend, "redis").await;
}

#[cfg(feature = "kafka")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_move_on_kafka() {
    use cqrs::kafka::{KafkaBackend, KafkaConfig};
    let backend = KafkaBackend::connect(
        KafkaConfig::new(support::kafka_brokers())
            .partitions(1)
            .fetch_wait(Duration::from_millis(10))
            .commit_interval(Duration::from_millis(100)),
    )
    .await
    .unwrap();
    counters_move(backend, "kafka").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_with_sampling_off_has_no_backlog_gauges() {
    exporter();
    let backend = cqrs::memory::MemoryBroker::new();
    let topic = unique("metrics-off");
    let service = unique("svc");
    let group = format!("{service}.book");
    let mut p =
        EventProcessor::new(backend.clone(), service.as_str()).topics(support::one_topic(&topic));
    p.handle("book", |_: Booked| async { Ok::<_, String>(()) })
        .unwrap()
        .sample_backlog_every(None);
    let running = p.start(CancellationToken::new()).await.unwrap();
    EventBus::new(backend)
        .topics(support::one_topic(&topic))
        .publish(&Booked {
            ticket: "t".into(),
            n: 0,
        })
        .await
        .unwrap();
    let consumed = [("group", group.as_str())];
    eventually("one consumed, as scraped", || async {
        value(
            &scrape().await,
            "messaging_client_consumed_messages",
            &consumed,
        ) == Some(1.0)
    })
    .await;
    running.shutdown().await.unwrap();
    let body = scrape().await;
    assert_eq!(value(&body, "cqrs_consumer_lag", &consumed), None, "{body}");
    assert_eq!(value(&body, "cqrs_consumer_pending", &consumed), None);
}
