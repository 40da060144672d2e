//! The `cqrs` binary against a real redis-server (`REDIS_URL`, default database 15 on
//! 127.0.0.1:6379): dead letters made by a real processor are listed, redriven (one, after a dry
//! run that changes nothing) and purged; inspect and trim see the streams; bad input exits
//! non-zero with a clear message and no password.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use assert_cmd::Command;
use cqrs::redis::{redis, RedisBackend};
use cqrs::{permanent, CancellationToken, Event, EventBus, EventProcessor, TopicNamer};
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
    let namer = {
        let t = topic.clone();
        move || {
            let t = t.clone();
            TopicNamer::new(move |_| t.clone())
        }
    };
    // Orders 1 and 3 are refused for good: two dead letters.
    let mut p = EventProcessor::new(backend.clone(), service.as_str()).topics(namer());
    p.handle("book", |o: Order| async move {
        if o.n % 2 == 1 {
            Err(permanent(format!("order {} is refused", o.n)))
        } else {
            Ok(())
        }
    })
    .unwrap();
    let running = p.start(CancellationToken::new()).await.unwrap();
    let orders: Vec<Order> = (0..4).map(|n| Order { n }).collect();
    EventBus::new(backend.clone())
        .topics(namer())
        .publish_all(&orders)
        .await
        .unwrap();
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
    let stream = inspected["streams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stream"] == topic.as_str())
        .unwrap()
        .clone();
    assert_eq!(stream["length"], 4);
    assert_eq!(stream["groups"][0]["name"], group.as_str());
    assert_eq!(stream["groups"][0]["pending"], 0);
    assert_eq!(stream["groups"][0]["lag"], 0);

    // A dry run changes nothing.
    let dry = cqrs_json(&["dead-letters", "redrive", &group, "--all", "--dry-run"]);
    assert_eq!(dry["redriven"].as_array().unwrap().len(), 2);
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
    assert_eq!(purged["deleted"], 1);
    assert!(entries(&dead_stream).await.is_empty());
    let listed = cqrs_json(&["dead-letters", "list", &group]);
    assert_eq!(listed["dead_letters"].as_array().unwrap().len(), 0);

    // Every group acked all five (the redriven one too, once a member reads it): trim
    // removes what all groups acknowledged, here the four the group handled.
    let trimmed = cqrs_json(&["trim"]);
    let removed = trimmed["trimmed"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["stream"] == topic.as_str())
        .unwrap()["removed"]
        .clone();
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
    let s = inspected["streams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stream"] == stream.as_str())
        .unwrap()
        .clone();
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
    use cqrs::kafka::{KafkaBackend, KafkaConfig};
    let brokers = std::env::var("KAFKA_BROKERS")
        .ok()
        .filter(|b| !b.is_empty())
        .unwrap_or_else(|| "127.0.0.1:9092".to_owned());
    let backend = KafkaBackend::connect(
        KafkaConfig::new(&brokers)
            .partitions(1)
            .fetch_wait(Duration::from_millis(10))
            .set("batch.num.messages", "1"),
    )
    .await
    .unwrap();
    let topic = cqrs::conformance::unique("cli-kafka");
    let service = cqrs::conformance::unique("svc");
    let namer = {
        let t = topic.clone();
        move || {
            let t = t.clone();
            TopicNamer::new(move |_| t.clone())
        }
    };
    let handled = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut p = EventProcessor::new(backend.clone(), service.as_str()).topics(namer());
    let h = handled.clone();
    p.handle("book", move |_: Order| {
        h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async { Ok::<_, String>(()) }
    })
    .unwrap();
    let running = p.start(CancellationToken::new()).await.unwrap();
    let bus = EventBus::new(backend.clone()).topics(namer());
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
    let t = inspected["topics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["topic"] == topic.as_str())
        .unwrap()
        .clone();
    assert_eq!(t["groups"][0]["name"], format!("{service}.book"), "{t}");
    assert_eq!(t["groups"][0]["lag"], 2, "{t}");

    let out = cqrs(&["--kafka", &brokers, "dead-letters", "list", "g"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("on Kafka only `inspect` works"));
}
