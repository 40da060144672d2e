//! The `cqrs` binary against a real redis-server (`REDIS_URL`, default database 15 on
//! 127.0.0.1:6379): dead letters made by a real processor are listed, redriven (one, after a dry
//! run that changes nothing) and purged; inspect and trim see the streams; bad input exits
//! non-zero with a clear message and no password.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use assert_cmd::Command;
use cqrs::kafka::{KafkaBackend, KafkaConfig};
use cqrs::redis::{redis, RedisBackend};
use cqrs::{permanent, CancellationToken, Event, EventBus, EventProcessor, TopicNamer};
use cqrs_test_support as support;

use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
struct Order {
    n: u32,
}

fn redis_url() -> String {
    std::env::var("REDIS_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "redis://127.0.0.1:6379/15".to_owned())
}

/// Runs `cqrs args...` and returns what it did.
fn cqrs(args: &[&str]) -> std::process::Output {
    Command::cargo_bin("cqrs")
        .unwrap()
        .args(args)
        .output()
        .unwrap()
}

/// The element of the JSON array `list` whose `field` is `value`; panics naming what it saw.
fn member(list: &Value, field: &str, value: &str) -> Value {
    list.as_array()
        .unwrap_or_else(|| panic!("not an array: {list}"))
        .iter()
        .find(|e| e[field] == value)
        .unwrap_or_else(|| panic!("no {field} = {value} in {list}"))
        .clone()
}

/// Runs `cqrs --redis URL --json args...` and parses what it printed; it must succeed.
fn cqrs_json(args: &[&str]) -> Value {
    let url = redis_url();
    let out = cqrs(&[&["--redis", url.as_str(), "--json"], args].concat());
    assert!(
        out.status.success(),
        "cqrs {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn kafka_brokers() -> String {
    std::env::var("KAFKA_BROKERS")
        .ok()
        .filter(|b| !b.is_empty())
        .unwrap_or_else(|| "127.0.0.1:9092".to_owned())
}

/// The Kafka broker (`KAFKA_BROKERS`, default 127.0.0.1:9092) and a backend on it that creates
/// one-partition topics.
async fn kafka() -> (String, KafkaBackend) {
    let brokers = kafka_brokers();
    let backend = KafkaBackend::connect(
        KafkaConfig::new(&brokers)
            .partitions(1)
            .fetch_wait(Duration::from_millis(10)),
    )
    .await
    .unwrap();
    (brokers, backend)
}

/// Runs `cqrs --kafka BROKERS --json args...` and parses what it printed; it must succeed.
fn cqrs_kafka_json(brokers: &str, args: &[&str]) -> Value {
    let out = cqrs(&[&["--kafka", brokers, "--json"], args].concat());
    assert!(
        out.status.success(),
        "cqrs {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Every record of the one-partition Kafka `topic`: its payload and headers.
fn records(brokers: &str, topic: &str) -> Vec<(String, Vec<(String, String)>)> {
    use cqrs::kafka::rdkafka::consumer::{BaseConsumer, Consumer};
    use cqrs::kafka::rdkafka::message::{Headers, Message};
    use cqrs::kafka::rdkafka::{ClientConfig, Offset, TopicPartitionList};
    let client: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", cqrs::conformance::unique("cli-reader"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let (low, high) = support::kafka_watermarks(brokers, topic, 0);
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Offset(low))
        .unwrap();
    client.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while out.len() < (high - low) as usize {
        assert!(
            std::time::Instant::now() < deadline,
            "read {out:?} of {topic}"
        );
        let Some(m) = client.poll(Duration::from_millis(100)) else {
            continue;
        };
        let m = m.unwrap();
        let headers = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| {
                        let v = String::from_utf8_lossy(h.value.unwrap_or_default());
                        (h.key.to_owned(), v.into_owned())
                    })
                    .collect()
            })
            .unwrap_or_default();
        let payload = String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned();
        out.push((payload, headers));
    }
    out
}

/// Starts a processor of `service` on `topic` whose handler `book` refuses odd orders for good
/// (each a dead letter of the group `<service>.book`), and publishes orders `0..n`.
async fn refuse_odd_orders<B: cqrs::Backend + Clone>(
    backend: &B,
    topic: &str,
    service: &str,
    n: u32,
) -> cqrs::RunningProcessor {
    let mut p = EventProcessor::new(backend.clone(), service).topics(one_topic(topic));
    p.handle("book", |o: Order| async move {
        if o.n % 2 == 1 {
            Err(permanent(format!("order {} is refused", o.n)))
        } else {
            Ok(())
        }
    })
    .unwrap();
    let running = p.start(CancellationToken::new()).await.unwrap();
    let orders: Vec<Order> = (0..n).map(|n| Order { n }).collect();
    EventBus::new(backend.clone())
        .topics(one_topic(topic))
        .publish_all(&orders)
        .await
        .unwrap();
    running
}

fn one_topic(topic: &str) -> TopicNamer {
    let topic = topic.to_owned();
    TopicNamer::new(move |_| topic.clone())
}

/// The entries of `stream`, each as its field map.
async fn entries(stream: &str) -> Vec<(String, Vec<(String, String)>)> {
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_redriven_and_purged() {
    let topic = cqrs::conformance::unique("cli-orders");
    let service = cqrs::conformance::unique("svc");
    let group = format!("{service}.book");
    let dead_stream = format!("{group}.dead-letter");
    let backend = RedisBackend::connect(&redis_url()).await.unwrap();
    // Orders 1 and 3 are refused for good: two dead letters.
    let running = refuse_odd_orders(&backend, &topic, &service, 4).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while entries(&dead_stream).await.len() < 2 {
        assert!(tokio::time::Instant::now() < deadline, "no dead letters");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    running.shutdown().await.unwrap();

    let listed = cqrs_json(&["dead-letters", "list", &group]);
    let dead = listed["dead_letters"].as_array().unwrap().clone();
    assert_eq!(dead.len(), 2, "{listed}");
    assert_eq!(dead[0]["reason"], "order 1 is refused");
    assert_eq!(dead[0]["topic"], topic.as_str());
    assert_eq!(dead[0]["handler"], "book");
    assert_eq!(dead[0]["attempts"], 1);
    let first = dead[0]["id"].as_str().unwrap().to_owned();

    let inspected = cqrs_json(&["inspect"]);
    let stream = member(&inspected["streams"], "stream", &topic);
    assert_eq!(stream["length"], 4);
    assert_eq!(stream["groups"][0]["name"], group.as_str());
    assert_eq!(stream["groups"][0]["pending"], 0);
    assert_eq!(stream["groups"][0]["lag"], 0);

    // A dry run changes nothing.
    let dry = cqrs_json(&["dead-letters", "redrive", &group, "--all", "--dry-run"]);
    assert_eq!(dry["redriven"].as_array().unwrap().len(), 2);
    let text = cqrs(&[
        "--redis",
        &redis_url(),
        "dead-letters",
        "redrive",
        &group,
        "--all",
        "--dry-run",
        "--page",
        "1",
    ]);
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(lines[0].starts_with(&first), "{text}");
    assert!(lines[1].contains("order 3 is refused"), "{text}");
    assert_eq!(
        lines[2],
        format!("would redrive 2 dead letters from {dead_stream}")
    );
    assert_eq!(entries(&dead_stream).await.len(), 2);
    assert_eq!(entries(&topic).await.len(), 4);

    // Redrive the first: back on its topic, clean, marked; gone from the dead letters.
    let redriven = cqrs_json(&["dead-letters", "redrive", &group, "--id", &first]);
    assert_eq!(redriven["redriven"][0]["id"], first.as_str());
    let on_topic = entries(&topic).await;
    assert_eq!(on_topic.len(), 5);
    let fields = &on_topic[4].1;
    let field = |k: &str| fields.iter().find(|(f, _)| f == k).map(|(_, v)| v.clone());
    assert_eq!(field("h.x-redriven-from"), Some(first.clone()));
    assert!(
        !fields
            .iter()
            .any(|(f, _)| f.starts_with("h.x-dead-letter-")),
        "{fields:?}"
    );
    assert_eq!(field("payload").as_deref(), Some(r#"{"n":1}"#));
    let left = entries(&dead_stream).await;
    assert_eq!(left.len(), 1);
    assert_ne!(left[0].0, first);

    // An id that is not there is an error, and nothing moves.
    let missing = cqrs(&[
        "--redis",
        &redis_url(),
        "dead-letters",
        "redrive",
        &group,
        "--id",
        &first,
    ]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr)
        .contains(&format!("no dead letter with id {first}")));
    assert_eq!(entries(&topic).await.len(), 5);

    let purged = cqrs_json(&["dead-letters", "purge", &group, "--all"]);
    assert_eq!(purged["removed"], 1);
    assert!(entries(&dead_stream).await.is_empty());
    let listed = cqrs_json(&["dead-letters", "list", &group]);
    assert_eq!(listed["dead_letters"].as_array().unwrap().len(), 0);

    // Every group acked all five (the redriven one too, once a member reads it): trim
    // removes what all groups acknowledged, here the four the group handled.
    let trimmed = cqrs_json(&["trim"]);
    let removed = member(&trimmed["trimmed"], "stream", &topic)["removed"].clone();
    assert_eq!(removed, 4);
    assert_eq!(entries(&topic).await.len(), 1);

    backend.delete_stream(&topic).await.unwrap();
    backend.delete_stream(&dead_stream).await.unwrap();
}

#[test]
fn help_lists_the_commands_and_never_the_url_from_the_environment() {
    let out = Command::cargo_bin("cqrs")
        .unwrap()
        .env("CQRS_REDIS_URL", "redis://:s3cret@127.0.0.1:6379/0")
        .arg("--help")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("s3cret"), "{text}");
    for command in ["inspect", "dead-letters", "trim"] {
        assert!(text.contains(command), "{text}");
    }
    let out = cqrs(&["dead-letters", "--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for command in ["list", "redrive", "purge"] {
        assert!(text.contains(command), "{text}");
    }
}

#[test]
fn a_bad_url_or_an_unknown_group_exits_non_zero_without_the_password() {
    let out = cqrs(&["--redis", "redis://:s3cret@127.0.0.1:1/0", "inspect"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(!err.contains("s3cret"), "{err}");

    let out = cqrs(&["--redis", "http://nowhere", "inspect"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid Redis address"));

    let out = cqrs(&[
        "--redis",
        &redis_url(),
        "dead-letters",
        "list",
        "no-such-group",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("group `no-such-group` has no dead letters"),
        "{err}"
    );

    let out = cqrs(&["--redis", &redis_url(), "dead-letters", "redrive", "g"]);
    assert_eq!(out.status.code(), Some(2), "--id or --all is required");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_shows_who_holds_the_pending_entries() {
    let stream = cqrs::conformance::unique("cli-pending");
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    for n in 0..3 {
        let _: String = redis::cmd("XADD")
            .arg(&stream)
            .arg("*")
            .arg("n")
            .arg(n)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg("g")
        .arg("0")
        .query_async(&mut conn)
        .await
        .unwrap();
    // worker-1 reads two and acks neither.
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("g")
        .arg("worker-1")
        .arg("COUNT")
        .arg(2)
        .arg("STREAMS")
        .arg(&stream)
        .arg(">")
        .query_async(&mut conn)
        .await
        .unwrap();
    let inspected = cqrs_json(&["inspect", "--pending", "10"]);
    let s = member(&inspected["streams"], "stream", &stream);
    let g = &s["groups"][0];
    assert_eq!(g["pending"], 2, "{s}");
    assert_eq!(g["lag"], 1);
    assert_eq!(g["consumers"][0]["name"], "worker-1");
    assert_eq!(g["consumers"][0]["pending"], 2);
    let entries = g["pending_entries"].as_array().unwrap();
    assert_eq!(entries.len(), 2);
    assert!(entries
        .iter()
        .all(|e| e["owner"] == "worker-1" && e["deliveries"] == 1));
    let _: () = redis::cmd("DEL")
        .arg(&stream)
        .query_async(&mut conn)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_on_kafka_shows_each_groups_lag() {
    let (brokers, backend) = kafka().await;
    let topic = cqrs::conformance::unique("cli-kafka");
    let service = cqrs::conformance::unique("svc");
    let handled = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut p = EventProcessor::new(backend.clone(), service.as_str()).topics(one_topic(&topic));
    let h = handled.clone();
    p.handle("book", move |_: Order| {
        h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async { Ok::<_, String>(()) }
    })
    .unwrap();
    let running = p.start(CancellationToken::new()).await.unwrap();
    let bus = EventBus::new(backend.clone()).topics(one_topic(&topic));
    let orders: Vec<Order> = (0..3).map(|n| Order { n }).collect();
    bus.publish_all(&orders).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while handled.load(std::sync::atomic::Ordering::SeqCst) < 3 {
        assert!(tokio::time::Instant::now() < deadline, "not handled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    running.shutdown().await.unwrap();
    bus.publish_all(&orders[..2]).await.unwrap();

    let out = cqrs(&["--kafka", &brokers, "--json", "inspect"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let inspected: Value = serde_json::from_slice(&out.stdout).unwrap();
    let t = member(&inspected["topics"], "topic", &topic);
    assert_eq!(t["groups"][0]["name"], format!("{service}.book"), "{t}");
    assert_eq!(t["groups"][0]["lag"], 2, "{t}");

    let out = cqrs(&["--kafka", &brokers, "trim"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Kafka deletes records by retention"));
}

/// Runs a processor of `service` on `topic` that refuses orders 1, 3 and 5 for good, publishes
/// orders 0 to 5, and waits until `cqrs dead-letters list` shows the three dead letters (at
/// `0:0`, `0:1` and `0:2` of the one-partition dead-letter topic); returns the group.
async fn three_dead_letters(
    brokers: &str,
    backend: &KafkaBackend,
    topic: &str,
    service: &str,
) -> String {
    let group = format!("{service}.book");
    let running = refuse_odd_orders(backend, topic, service, 6).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let out = cqrs(&["--kafka", brokers, "--json", "dead-letters", "list", &group]);
        if out.status.success() {
            let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
            if listed["dead_letters"].as_array().unwrap().len() == 3 {
                break;
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "no dead letters");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    running.shutdown().await.unwrap();
    group
}

/// The ids `cqrs dead-letters list GROUP` shows.
fn listed_ids(brokers: &str, group: &str) -> Vec<String> {
    cqrs_kafka_json(brokers, &["dead-letters", "list", group])["dead_letters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_owned())
        .collect()
}

/// The lag `cqrs inspect` shows for the dead letters' bookkeeping group: what is left.
fn bookkeeping_lag(brokers: &str, dead_topic: &str) -> Value {
    let inspected = cqrs_kafka_json(brokers, &["inspect"]);
    let t = member(&inspected["topics"], "topic", dead_topic);
    member(
        &t["groups"],
        "name",
        &cqrs::kafka::bookkeeping_group(dead_topic),
    )["lag"]
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_on_kafka_are_listed_redriven_and_purged() {
    let (brokers, backend) = kafka().await;
    let topic = cqrs::conformance::unique("cli-kafka-orders");
    let service = cqrs::conformance::unique("svc");
    let group = three_dead_letters(&brokers, &backend, &topic, &service).await;
    let dead_topic = format!("{group}.dead-letter");

    let listed = cqrs_kafka_json(&brokers, &["dead-letters", "list", &group]);
    let dead = listed["dead_letters"].as_array().unwrap().clone();
    let ids: Vec<&str> = dead.iter().map(|d| d["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["0:0", "0:1", "0:2"], "{listed}");
    assert_eq!(dead[0]["reason"], "order 1 is refused");
    assert_eq!(dead[0]["topic"], topic.as_str());
    assert_eq!(dead[0]["handler"], "book");
    assert_eq!(dead[0]["attempts"], 1);
    assert!(dead[0]["age_ms"].as_u64().unwrap() < 60_000, "{listed}");

    // A dry run changes nothing (read in pages of 2: all three, each once).
    let dry = cqrs_kafka_json(
        &brokers,
        &[
            "dead-letters",
            "redrive",
            &group,
            "--all",
            "--dry-run",
            "--page",
            "2",
        ],
    );
    let ids: Vec<&str> = dry["redriven"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["0:0", "0:1", "0:2"], "{dry}");
    assert_eq!(dry["count"], 3);
    assert_eq!(records(&brokers, &topic).len(), 6);

    // The oldest: back on its topic, clean and marked; the committed offset moves past it.
    let redriven = cqrs_kafka_json(
        &brokers,
        &["dead-letters", "redrive", &group, "--id", "0:0"],
    );
    assert_eq!(redriven["redriven"][0]["id"], "0:0");
    let on_topic = records(&brokers, &topic);
    assert_eq!(on_topic.len(), 7);
    let (payload, headers) = &on_topic[6];
    assert_eq!(payload, r#"{"n":1}"#);
    assert!(
        headers.contains(&("x-redriven-from".to_owned(), "0:0".to_owned())),
        "{headers:?}"
    );
    assert!(
        !headers.iter().any(|(k, _)| k.starts_with("x-dead-letter-")),
        "{headers:?}"
    );
    assert_eq!(listed_ids(&brokers, &group), ["0:1", "0:2"]);
    assert_eq!(bookkeeping_lag(&brokers, &dead_topic), 2);

    // An id already redriven is not there any more, and nothing moves.
    let again = cqrs(&[
        "--kafka",
        &brokers,
        "dead-letters",
        "redrive",
        &group,
        "--id",
        "0:0",
    ]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("no dead letter with id 0:0"));
    assert_eq!(records(&brokers, &topic).len(), 7);

    let purged = cqrs_kafka_json(
        &brokers,
        &["dead-letters", "purge", &group, "--all", "--page", "1"],
    );
    assert_eq!(purged["removed"], 2);
    assert_eq!(purged["purged"][1]["id"], "0:2", "{purged}");
    assert!(listed_ids(&brokers, &group).is_empty());
    assert_eq!(bookkeeping_lag(&brokers, &dead_topic), 0);
    assert_eq!(
        records(&brokers, &topic).len(),
        7,
        "a purge publishes nothing"
    );

    let out = cqrs(&["--kafka", &brokers, "dead-letters", "list", "no-such-group"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("has no dead letters"));
}

/// Kafka keeps offset metadata: a dead letter redriven or purged ahead of older ones is recorded
/// there, and listing leaves it out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_kafka_dead_letters_redriven_out_of_order_are_recorded_in_the_offset_metadata() {
    use cqrs::kafka::rdkafka::consumer::{BaseConsumer, Consumer};
    use cqrs::kafka::rdkafka::{ClientConfig, Offset, TopicPartitionList};
    let (brokers, backend) = kafka().await;
    let topic = cqrs::conformance::unique("cli-kafka-orders");
    let service = cqrs::conformance::unique("svc");
    let dead_topic = format!("{service}.book.dead-letter");
    let group = three_dead_letters(&brokers, &backend, &topic, &service).await;
    let committed = || {
        let client: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", cqrs::kafka::bookkeeping_group(&dead_topic))
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&dead_topic, 0);
        let c = client
            .committed_offsets(tpl, Duration::from_secs(10))
            .unwrap();
        let e = c.find_partition(&dead_topic, 0).unwrap();
        (e.offset(), e.metadata().to_owned())
    };

    cqrs_kafka_json(
        &brokers,
        &["dead-letters", "redrive", &group, "--id", "0:1"],
    );
    assert_eq!(listed_ids(&brokers, &group), ["0:0", "0:2"]);
    assert_eq!(committed(), (Offset::Offset(0), "v1:1".to_owned()));
    assert_eq!(records(&brokers, &topic).len(), 7);

    // The oldest: the offset moves past both, and the metadata empties.
    cqrs_kafka_json(
        &brokers,
        &["dead-letters", "redrive", &group, "--id", "0:0"],
    );
    assert_eq!(listed_ids(&brokers, &group), ["0:2"]);
    assert_eq!(committed(), (Offset::Offset(2), String::new()));

    let purged = cqrs_kafka_json(&brokers, &["dead-letters", "purge", &group, "--id", "0:2"]);
    assert_eq!(purged["removed"], 1);
    assert!(listed_ids(&brokers, &group).is_empty());
    assert_eq!(committed(), (Offset::Offset(3), String::new()));
    let redriven: Vec<String> = records(&brokers, &topic)[6..]
        .iter()
        .map(|(payload, _)| payload.clone())
        .collect();
    assert_eq!(redriven, [r#"{"n":3}"#, r#"{"n":1}"#]);
}

/// `cqrs outbox`: the relay's backlog, the dead messages, and a redrive moving them back, on a
/// real PostgreSQL (`DATABASE_URL`); a wrong password fails without printing it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_status_dead_letters_and_redrive() {
    use cqrs::postgres::sqlx::{self, postgres::PgPoolOptions};
    use cqrs::postgres::{Outbox, OutboxStore};
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://cqrs@127.0.0.1:5432/postgres".to_owned());
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect(&url)
        .await
        .expect("PostgreSQL at DATABASE_URL (scripts/test starts one)");
    let schema = cqrs::conformance::unique("cli_outbox").replace('-', "_");
    let store = OutboxStore::new().schema(&schema).unwrap();
    store.migrate(&pool).await.unwrap();
    let outbox = Outbox::new(
        EventBus::new(cqrs::memory::MemoryBroker::new()),
        store.clone(),
    );
    let mut tx = pool.begin().await.unwrap();
    for n in 0..3 {
        outbox.publish(&mut tx, &Order { n }).await.unwrap();
    }
    tx.commit().await.unwrap();
    // Two of them refused for good, as the relay would record them.
    sqlx::query(&format!(
        "WITH moved AS (DELETE FROM {schema}.outbox WHERE seq IN (SELECT seq FROM {schema}.outbox ORDER BY seq LIMIT 2) RETURNING *)
         INSERT INTO {schema}.outbox_dead SELECT moved.*, 'topic refused' FROM moved"
    ))
    .execute(&pool)
    .await
    .unwrap();
    let run = |args: &[&str]| -> Value {
        let out = cqrs(
            &[
                &[
                    "--json",
                    "outbox",
                    "--database-url",
                    url.as_str(),
                    "--schema",
                    schema.as_str(),
                ],
                args,
            ]
            .concat(),
        );
        assert!(
            out.status.success(),
            "cqrs outbox {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let status = run(&["status"]);
    assert_eq!(
        (status["depth"].as_u64(), status["dead"].as_u64()),
        (Some(1), Some(2)),
        "{status}"
    );
    let dead = run(&["dead-letters"]);
    let ids: Vec<String> = dead
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            assert_eq!(d["reason"], "topic refused", "{d}");
            d["id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(ids.len(), 2, "{dead}");
    assert_eq!(run(&["redrive", "--id", &ids[0]])["redriven"], 1);
    let status = run(&["status"]);
    assert_eq!(
        (status["depth"].as_u64(), status["dead"].as_u64()),
        (Some(2), Some(1)),
        "{status}"
    );
    assert_eq!(run(&["redrive", "--all"])["redriven"], 1);
    let status = run(&["status"]);
    assert_eq!(
        (status["depth"].as_u64(), status["dead"].as_u64()),
        (Some(3), Some(0)),
        "{status}"
    );

    // A password that is wrong (trust on loopback accepts any, so a user that does not exist)
    // fails, and the password is not printed.
    let bad = url.replacen("postgres://cqrs@", "postgres://nobody:s3cret-pw@", 1);
    let out = cqrs(&["outbox", "--database-url", bad.as_str(), "status"]);
    assert!(!out.status.success());
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!said.contains("s3cret-pw"), "{said}");
    assert!(said.contains("connecting to the database"), "{said}");
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&pool)
        .await
        .unwrap();
}

/// The CLI on Kafka over SASL_SSL with ACLs (the secure broker of `scripts/test`): settings from
/// `--kafka-config` and `-X`, dead letters listed and redriven as alice; a wrong password fails at
/// once with exit code 1; no password is ever printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_over_sasl_ssl_takes_its_settings_from_a_file_and_x_and_prints_no_password() {
    let broker = support::SecureKafka::shared();
    let brokers = broker.get("SASL_SSL").to_owned();
    let password = broker.get("ALICE_PASSWORD").to_owned();
    let backend = KafkaBackend::connect(
        KafkaConfig::new(&brokers)
            .partitions(1)
            .set("security.protocol", "SASL_SSL")
            .set("sasl.mechanism", "SCRAM-SHA-512")
            .set("sasl.username", "alice")
            .set("sasl.password", &password)
            .set("ssl.ca.location", broker.get("CA")),
    )
    .await
    .unwrap();
    let topic = cqrs::conformance::unique("ok-cli-orders");
    let service = cqrs::conformance::unique("ok-svc");
    let group = format!("{service}.book");

    let file = std::env::temp_dir().join(cqrs::conformance::unique("client.properties"));
    std::fs::write(
        &file,
        format!(
            "# alice\nsecurity.protocol=SASL_SSL\nsasl.mechanism=SCRAM-SHA-512\n\
             sasl.username=alice\nsasl.password={password}\nssl.ca.location={}\n",
            broker.get("CA")
        ),
    )
    .unwrap();
    let file = file.to_string_lossy().into_owned();
    let from_file = |args: &[&str]| {
        cqrs(
            &[
                &[
                    "--kafka",
                    brokers.as_str(),
                    "--kafka-config",
                    file.as_str(),
                    "--json",
                ],
                args,
            ]
            .concat(),
        )
    };
    let sasl_password = format!("sasl.password={password}");
    let ca = format!("ssl.ca.location={}", broker.get("CA"));
    let with_x = |args: &[&str]| {
        cqrs(
            &[
                &[
                    "--kafka",
                    brokers.as_str(),
                    "-X",
                    "security.protocol=SASL_SSL",
                    "-X",
                    "sasl.mechanism=SCRAM-SHA-256",
                    "-X",
                    "sasl.username=alice",
                    "-X",
                    sasl_password.as_str(),
                    "-X",
                    ca.as_str(),
                    "--json",
                ],
                args,
            ]
            .concat(),
        )
    };
    let printed = |out: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };

    let running = refuse_odd_orders(&backend, &topic, &service, 6).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let out = from_file(&["dead-letters", "list", &group]);
        assert!(!printed(&out).contains(&password), "{}", printed(&out));
        if out.status.success() {
            let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
            if listed["dead_letters"].as_array().unwrap().len() == 3 {
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no dead letters: {}",
            printed(&out)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    running.shutdown().await.unwrap();

    let out = with_x(&["dead-letters", "redrive", &group, "--id", "0:0"]);
    assert!(out.status.success(), "{}", printed(&out));
    assert!(!printed(&out).contains(&password));
    let out = with_x(&["dead-letters", "list", &group]);
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<&str> = listed["dead_letters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["0:1", "0:2"]);
    let out = with_x(&["inspect"]);
    assert!(out.status.success(), "{}", printed(&out));
    assert!(printed(&out).contains(&topic));

    let wrong = "Wr0ng-but-close";
    let started = std::time::Instant::now();
    let out = cqrs(&[
        "--kafka",
        &brokers,
        "--kafka-config",
        &file,
        "-X",
        &format!("sasl.password={wrong}"),
        "inspect",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", printed(&out));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        printed(&out).contains("authenticating"),
        "{}",
        printed(&out)
    );
    assert!(!printed(&out).contains(wrong) && !printed(&out).contains(&password));
    let _ = std::fs::remove_file(&file);
}

/// A settings file line or a `-X` without `=` is refused naming the line or the option, never
/// echoing what it holds (which may be a password pasted in the wrong place).
#[test]
fn a_malformed_kafka_setting_is_refused_without_echoing_it() {
    let file = std::env::temp_dir().join(cqrs::conformance::unique("bad.properties"));
    std::fs::write(&file, "security.protocol=SASL_SSL\nHunter2-pasted-here\n").unwrap();
    let file = file.to_string_lossy().into_owned();
    let out = cqrs(&["--kafka", "127.0.0.1:1", "--kafka-config", &file, "inspect"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("line 2: expected key=value"), "{err}");
    assert!(!err.contains("Hunter2"), "{err}");
    let out = cqrs(&[
        "--kafka",
        "127.0.0.1:1",
        "-X",
        "Hunter2-pasted-here",
        "inspect",
    ]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("-X takes key=value") && !err.contains("Hunter2"),
        "{err}"
    );
    let _ = std::fs::remove_file(&file);
}

/// The CLI on Redis over TLS with ACL users (`rediss://user:password@`): it trusts the CA
/// `SSL_CERT_FILE` names and refuses the certificate without it; an authorized user inspects; a
/// wrong password fails at once and a user without access to a stream gets an error naming the
/// stream; no password is ever printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_over_tls_with_acl_users_inspects_and_refusals_are_clear_without_the_password() {
    let (app_pw, limited_pw, wrong_pw) = ("App-pw_7x9Q", "Lim-pw_3k2Z", "Wrong-pw_5m1T");
    let server = support::RedisServer::start_tls(&[
        &format!("app on >{app_pw} ~app-* +@all"),
        &format!("limited on >{limited_pw} ~nothing-* +@all"),
    ])
    .await;
    let stream = cqrs::conformance::unique("app-orders");
    let mut admin = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: String = redis::cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg("name")
        .arg("Order")
        .query_async(&mut admin)
        .await
        .unwrap();
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg("g")
        .arg("0")
        .query_async(&mut admin)
        .await
        .unwrap();
    let run = |user: &str, password: &str, trust: bool, args: &[&str]| {
        let url = server.tls_url(Some((user, password)));
        let mut cmd = Command::cargo_bin("cqrs").unwrap();
        cmd.args(["--redis", url.as_str()]).args(args);
        if trust {
            cmd.env("SSL_CERT_FILE", server.ca());
        } else {
            cmd.env_remove("SSL_CERT_FILE");
        }
        let started = std::time::Instant::now();
        let out = cmd.output().unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        for secret in [app_pw, limited_pw, wrong_pw] {
            assert!(
                !stdout.contains(secret) && !stderr.contains(secret),
                "a password printed: {stdout}{stderr}"
            );
        }
        (out.status.code(), stdout, stderr, started.elapsed())
    };

    // The CA not trusted: the certificate is refused, and said.
    let (code, _, err, _) = run("app", app_pw, false, &["inspect"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.to_lowercase().contains("certificate"), "{err}");

    // Trusted, authorized: the stream and its group.
    let (code, out, err, _) = run("app", app_pw, true, &["--json", "inspect"]);
    assert_eq!(code, Some(0), "{err}");
    let json: Value = serde_json::from_str(&out).unwrap();
    let shown = member(&json["streams"], "stream", &stream);
    member(&shown["groups"], "name", "g");

    // A wrong password: refused at once.
    let (code, _, err, took) = run("app", wrong_pw, true, &["inspect"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("WRONGPASS") || err.to_lowercase().contains("auth"),
        "{err}"
    );
    assert!(took < Duration::from_secs(5), "{took:?}");

    // No access to the stream: the error names it.
    let (code, _, err, _) = run("limited", limited_pw, true, &["inspect"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(&stream), "{err}");
}

/// `dead-letters list` shows a page (`--limit`, 100 by default) and the id to go on from
/// (`next`, then `--after`); the pages together are the whole list, each letter once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_in_pages() {
    let group = cqrs::conformance::unique("svc.paged");
    let mut keys = support::Keys::new(&redis_url());
    let dead = keys.add(&format!("{group}.dead-letter"));
    let backend = RedisBackend::connect(&redis_url()).await.unwrap();
    let letters: Vec<cqrs::Message> = (0..5)
        .map(|i| cqrs::Message::new("X", format!("{i}").into_bytes()))
        .collect();
    cqrs::backend::Publisher::publish(&backend, &dead, &letters)
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    for expected in [2, 2, 1] {
        let mut args = vec!["dead-letters", "list", group.as_str(), "--limit", "2"];
        if let Some(a) = &after {
            args.extend(["--after", a.as_str()]);
        }
        let page = cqrs_json(&args);
        let ids: Vec<String> = page["dead_letters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(ids.len(), expected, "{page}");
        after = page["next"].as_str().map(str::to_owned);
        assert_eq!(after.is_some(), expected == 2, "{page}");
        seen.extend(ids);
    }
    let whole = cqrs_json(&["dead-letters", "list", group.as_str()]);
    let whole: Vec<String> = whole["dead_letters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(seen, whole);
    // The text says where the next page starts.
    let out = cqrs(&[
        "--redis",
        &redis_url(),
        "dead-letters",
        "list",
        &group,
        "--limit",
        "3",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("next page: --after {}", whole[2])),
        "{text}"
    );
}
