//! The Redis Streams backend against a real redis-server.
//!
//! Uses `REDIS_URL` (default `redis://127.0.0.1:6379/15`); tests that restart a server or need a
//! second pool start their own `redis-server` on a free port.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cqrs::backend::{Publisher, Subscriber};
use cqrs::processor::dead_letter_headers as dlq;
use cqrs::redis::{RedisBackend, Topology};
use cqrs::{
    CancellationToken, Context, Delivery, Event, EventBus, EventProcessor, Message, RetryPolicy,
    StartFrom, Subscription,
};
use serde::{Deserialize, Serialize};
use support::{eventually, redis_url, unique, Keys, RedisServer};

cqrs::conformance_suite!(async {
    RedisBackend::connect(&support::redis_url())
        .await
        .expect("redis is running (scripts/test starts it)")
});

async fn backend() -> RedisBackend {
    RedisBackend::connect(&redis_url()).await.unwrap()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
struct Reading {
    #[event(key)]
    sensor: String,
    n: u32,
}

async fn raw(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn receive_n(consumer: &mut dyn cqrs::backend::Consumer, n: usize) -> Vec<Delivery> {
    cqrs::conformance::receive_n(consumer, n).await
}

fn payloads(ds: &[Delivery]) -> Vec<String> {
    ds.iter()
        .map(|d| String::from_utf8_lossy(&d.message().payload).into_owned())
        .collect()
}

#[tokio::test]
async fn one_group_reads_two_streams() {
    let url = redis_url();
    let mut keys = Keys::new(&url);
    let (a, b) = (keys.add(&unique("stream-a")), keys.add(&unique("stream-b")));
    let backend = backend().await;
    backend
        .publish(&a, &[Message::new("A", b"a".to_vec())])
        .await
        .unwrap();
    backend
        .publish(&b, &[Message::new("B", b"b".to_vec())])
        .await
        .unwrap();
    let mut consumer = backend
        .subscribe(&Subscription::new("read-group-ab", [&a, &b]))
        .await
        .unwrap();
    let mut got = receive_n(&mut *consumer, 2).await;
    got.sort_by(|x, y| x.topic().cmp(y.topic()));
    assert_eq!((got[0].topic(), got[1].topic()), (a.as_str(), b.as_str()));
    assert_eq!(payloads(&got), ["a", "b"]);
    Delivery::ack_all(got).await.map_err(|(e, _)| e).unwrap();
    let stats = backend.stats(&a).await.unwrap();
    assert_eq!(stats.groups[0].pending, 0);
}

#[tokio::test]
async fn pending_entries_of_a_stopped_consumer_are_claimed_and_handled_once_more() {
    let url = redis_url();
    let mut keys = Keys::new(&url);
    let stream = keys.add(&unique("claim"));
    let backend = backend().await;
    let group = unique("g");
    for i in 0..5 {
        backend
            .publish(&stream, &[Message::new("Ping", i.to_string().into_bytes())])
            .await
            .unwrap();
    }
    let mut dead = backend
        .subscribe(
            &Subscription::new(&group, [&stream])
                .consumer("dead")
                .claim_idle(None),
        )
        .await
        .unwrap();
    let taken = receive_n(&mut *dead, 5).await;
    drop(taken);
    drop(dead);
    let stats = backend.stats(&stream).await.unwrap();
    assert_eq!(
        stats.groups[0].pending, 5,
        "the dead consumer left 5 pending"
    );

    let mut alive = backend
        .subscribe(
            &Subscription::new(&group, [&stream])
                .consumer("alive")
                .claim_idle(Some(Duration::from_millis(200))),
        )
        .await
        .unwrap();
    let got = receive_n(&mut *alive, 5).await;
    assert!(got.iter().all(|d| d.attempt() == 2));
    Delivery::ack_all(got).await.map_err(|(e, _)| e).unwrap();
    cqrs::conformance::receive_none(&mut *alive).await;
    let stats = backend.stats(&stream).await.unwrap();
    assert_eq!(stats.groups[0].pending, 0);
}

#[tokio::test]
async fn restart_resumes_own_pending_with_higher_delivery_count() {
    let url = redis_url();
    let mut keys = Keys::new(&url);
    let stream = keys.add(&unique("resume"));
    let backend = backend().await;
    let group = unique("g");
    backend
        .publish(&stream, &[Message::new("Ping", b"x".to_vec())])
        .await
        .unwrap();
    let sub = Subscription::new(&group, [&stream])
        .consumer("worker-1")
        .claim_idle(None);
    let mut first = backend.subscribe(&sub).await.unwrap();
    let taken = receive_n(&mut *first, 1).await;
    assert_eq!(taken[0].attempt(), 1);
    drop((taken, first));
    let mut again = backend.subscribe(&sub).await.unwrap();
    let got = receive_n(&mut *again, 1).await;
    assert_eq!(got[0].attempt(), 2);
    assert_eq!(payloads(&got), ["x"]);
    Delivery::ack_all(got).await.map_err(|(e, _)| e).unwrap();
}

#[tokio::test]
async fn nacks_redeliver_with_rising_count_then_dead_letter() {
    let url = redis_url();
    let mut keys = Keys::new(&url);
    let topic = keys.add(&unique("readings"));
    let dead = keys.add(&unique("dead"));
    let backend = backend().await;
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let namer = cqrs::TopicNamer::new({
        let topic = topic.clone();
        move |_| topic.clone()
    });
    let mut p = EventProcessor::new(backend.clone(), unique("svc")).topics(namer.clone());
    let seen = attempts.clone();
    p.handle("alerter", move |_: Reading, ctx: Context| {
        seen.lock().unwrap().push(ctx.attempt());
        async { Err::<(), _>("pager unreachable") }
    })
    .unwrap()
    .retry(RetryPolicy::attempts(3).backoff(Duration::from_millis(20), 2.0))
    .dead_letter_topic(&dead);
    let running = p.start(CancellationToken::new()).await.unwrap();
    EventBus::new(backend.clone())
        .topics(namer)
        .publish(&Reading {
            sensor: "s1".into(),
            n: 1,
        })
        .await
        .unwrap();
    eventually("the dead letter", || {
        let backend = backend.clone();
        let dead = dead.clone();
        async move {
            backend
                .stats(&dead)
                .await
                .map(|s| s.length == 1)
                .unwrap_or(false)
        }
    })
    .await;
    running.shutdown().await.unwrap();
    assert_eq!(*attempts.lock().unwrap(), [1, 2, 3]);
    let stats = backend.stats(&topic).await.unwrap();
    assert_eq!(stats.groups[0].pending, 0, "dead-lettered, then acked");

    let mut reader = backend
        .subscribe(&Subscription::new("dlq-reader", [&dead]))
        .await
        .unwrap();
    let got = receive_n(&mut *reader, 1).await;
    let headers = &got[0].message().metadata.headers;
    assert_eq!(headers[dlq::REASON], "pager unreachable");
    assert_eq!(headers[dlq::ATTEMPTS], "3");
    assert_eq!(got[0].message().key.as_deref(), Some("s1"));
}

#[tokio::test]
async fn trimming_keeps_what_a_lagging_group_has_not_acked() {
    let url = redis_url();
    let mut keys = Keys::new(&url);
    let stream = keys.add(&unique("trim"));
    let backend = backend().await;
    for g in ["fast", "slow"] {
        backend
            .create_group(&stream, g, StartFrom::Beginning)
            .await
            .unwrap();
    }
    let all: Vec<Message> = (0..10)
        .map(|i| Message::new("Ping", i.to_string().into_bytes()))
        .collect();
    backend.publish(&stream, &all).await.unwrap();
    assert_eq!(
        backend.trim_acknowledged(&stream).await.unwrap(),
        0,
        "nobody read anything"
    );

    let mut fast = backend
        .subscribe(&Subscription::new("fast", [&stream]))
        .await
        .unwrap();
    let got = receive_n(&mut *fast, 10).await;
    Delivery::ack_all(got).await.map_err(|(e, _)| e).unwrap();
    let mut slow = backend
        .subscribe(&Subscription::new("slow", [&stream]))
        .await
        .unwrap();
    let mut got = receive_n(&mut *slow, 6).await;
    let unacked = got.split_off(4);
    Delivery::ack_all(got).await.map_err(|(e, _)| e).unwrap();

    assert_eq!(backend.trim_acknowledged(&stream).await.unwrap(), 4);
    let stats = backend.stats(&stream).await.unwrap();
    assert_eq!(stats.length, 6, "2 pending + 4 unread by `slow` stay");

    Delivery::ack_all(unacked)
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    let rest = receive_n(&mut *slow, 4).await;
    assert_eq!(
        payloads(&rest),
        ["6", "7", "8", "9"],
        "nothing slow needed was trimmed"
    );
    Delivery::ack_all(rest).await.map_err(|(e, _)| e).unwrap();
    assert_eq!(backend.trim_acknowledged(&stream).await.unwrap(), 6);
    assert_eq!(backend.stats(&stream).await.unwrap().length, 0);
}

#[tokio::test]
async fn stats_report_lag_pending_and_consumers() {
    let url = redis_url();
    let mut keys = Keys::new(&url);
    let stream = keys.add(&unique("stats"));
    let backend = backend().await;
    let all: Vec<Message> = (0..5)
        .map(|_| Message::new("Ping", b"{}".to_vec()))
        .collect();
    backend.publish(&stream, &all).await.unwrap();
    let mut c = backend
        .subscribe(&Subscription::new("g", [&stream]).consumer("c1"))
        .await
        .unwrap();
    let got = c.receive(2).await.unwrap();
    assert_eq!(got.len(), 2);
    let stats = backend.stats(&stream).await.unwrap();
    assert_eq!(stats.length, 5);
    let g = &stats.groups[0];
    assert_eq!(
        (g.name.as_str(), g.pending, g.lag, g.consumers),
        ("g", 2, Some(3), 1)
    );
    assert!(g.oldest_pending_idle.is_some());
}

#[tokio::test]
async fn two_pools_from_yaml_and_duplicate_stream_error() {
    let second = RedisServer::start().await;
    let (a, c) = (unique("stream-a"), unique("stream-c"));
    let mut keys = Keys::new(&redis_url());
    keys.add(&a);
    let yaml = format!(
        "default:\n  redis: {}\n  streams:\n    {a}: [read-group-a, read-group-ab]\nsecond:\n  redis: 127.0.0.1:{}:3\n  streams:\n    {c}: [read-group-c]\n",
        redis_url(),
        second.port
    );
    let topology = Topology::from_yaml(&yaml).unwrap();
    let backend = RedisBackend::from_topology(&topology).await.unwrap();
    backend
        .publish(&c, &[Message::new("C", b"c".to_vec())])
        .await
        .unwrap();

    // The entry is on the second server, database 3, where the group was created at connect.
    let mut conn = raw(&format!("redis://127.0.0.1:{}/3", second.port)).await;
    let len: u64 = redis::cmd("XLEN")
        .arg(&c)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(len, 1);
    let stats = backend.stats(&c).await.unwrap();
    assert_eq!(
        (stats.pool.as_str(), stats.groups[0].name.as_str()),
        ("second", "read-group-c")
    );
    assert_eq!(backend.stats(&a).await.unwrap().groups.len(), 2);

    let dup = yaml.replace(&format!("{c}:"), &format!("{a}:"));
    let err = Topology::from_yaml(&dup).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("stream with name {a} already exists in pool `default` (registering it in pool `second`)")
    );
}

#[tokio::test]
async fn killed_connections_lose_no_event() {
    let server = RedisServer::start().await;
    let backend = RedisBackend::connect(&server.url()).await.unwrap();
    let seen: Arc<Mutex<BTreeSet<u32>>> = Arc::default();
    let mut p = EventProcessor::new(backend.clone(), "svc-telemetry");
    let s = seen.clone();
    p.handle("logger", move |r: Reading| {
        s.lock().unwrap().insert(r.n);
        async { Ok::<_, String>(()) }
    })
    .unwrap()
    .claim_idle(Some(Duration::from_millis(500)));
    let running = p.start(CancellationToken::new()).await.unwrap();
    let bus = EventBus::new(backend.clone());
    let mut admin = raw(&server.url()).await;
    for n in 0..300u32 {
        if n % 50 == 25 {
            // Kill every client connection but this one: the consumer's blocking read and the
            // shared connection both drop.
            let _: redis::RedisResult<i64> = redis::cmd("CLIENT")
                .arg("KILL")
                .arg("TYPE")
                .arg("normal")
                .arg("SKIPME")
                .arg("yes")
                .query_async(&mut admin)
                .await;
        }
        let event = Reading {
            sensor: format!("s{}", n % 4),
            n,
        };
        // A publish that failed with the connection is retried, as an application would.
        let mut tries = 0;
        while let Err(e) = bus.publish(&event).await {
            tries += 1;
            assert!(
                e.is_retryable() && tries < 50,
                "publish failed for good: {e}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    eventually("all 300 events handled", || {
        let n = seen.lock().unwrap().len();
        async move { n == 300 }
    })
    .await;
    running.shutdown().await.unwrap();
    assert_eq!(*seen.lock().unwrap(), (0..300).collect::<BTreeSet<_>>());
}

#[tokio::test]
async fn a_server_restart_is_survived() {
    let mut server = RedisServer::start().await;
    let backend = RedisBackend::connect(&server.url()).await.unwrap();
    let seen: Arc<Mutex<BTreeSet<u32>>> = Arc::default();
    let mut p = EventProcessor::new(backend.clone(), "svc");
    let s = seen.clone();
    p.handle("logger", move |r: Reading| {
        s.lock().unwrap().insert(r.n);
        async { Ok::<_, String>(()) }
    })
    .unwrap();
    let running = p.start(CancellationToken::new()).await.unwrap();
    let bus = EventBus::new(backend.clone());
    bus.publish(&Reading {
        sensor: "a".into(),
        n: 1,
    })
    .await
    .unwrap();
    eventually("the first event", || {
        let n = seen.lock().unwrap().len();
        async move { n == 1 }
    })
    .await;
    server.restart().await;
    // The restarted server is empty: the group is created again and later events flow.
    eventually("the second event after the restart", || {
        let bus = bus.clone();
        let seen = seen.clone();
        async move {
            let _ = bus
                .publish(&Reading {
                    sensor: "a".into(),
                    n: 2,
                })
                .await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            seen.lock().unwrap().contains(&2)
        }
    })
    .await;
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn redis_cli_publishes_in_the_documented_format_and_malformed_entries_are_dead_lettered() {
    let url = redis_url();
    let mut keys = Keys::new(&url);
    let topic = keys.add(&unique("cli"));
    let service = unique("svc");
    let dead = keys.add(&format!("{service}.reader.dead-letter"));
    let backend = backend().await;
    type Seen = Arc<Mutex<Vec<(Reading, Option<String>)>>>;
    let got: Seen = Arc::default();
    let namer = cqrs::TopicNamer::new({
        let topic = topic.clone();
        move |_| topic.clone()
    });
    let mut p = EventProcessor::new(backend.clone(), &service).topics(namer);
    let g = got.clone();
    p.handle("reader", move |r: Reading, ctx: Context| {
        g.lock()
            .unwrap()
            .push((r, ctx.metadata().correlation_id.clone()));
        async { Ok::<_, String>(()) }
    })
    .unwrap();
    let running = p.start(CancellationToken::new()).await.unwrap();

    let cli = |args: &[&str]| {
        let out = std::process::Command::new("redis-cli")
            .arg("-u")
            .arg(&url)
            .args(args)
            .output()
            .expect("redis-cli is installed (scripts/test installs it)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    cli(&[
        "XADD",
        &topic,
        "*",
        "name",
        "Reading",
        "content-type",
        "application/json",
        "correlation-id",
        "from-cli",
        "payload",
        r#"{"sensor":"s9","n":7}"#,
    ]);
    cli(&["XADD", &topic, "*", "payload", r#"{"sensor":"s9","n":8}"#]);

    eventually("the redis-cli event handled", || {
        let n = got.lock().unwrap().len();
        async move { n == 1 }
    })
    .await;
    assert_eq!(
        got.lock().unwrap()[0],
        (
            Reading {
                sensor: "s9".into(),
                n: 7
            },
            Some("from-cli".to_owned())
        )
    );
    eventually("the malformed entry dead-lettered", || {
        let backend = backend.clone();
        let dead = dead.clone();
        async move {
            backend
                .stats(&dead)
                .await
                .map(|s| s.length == 1)
                .unwrap_or(false)
        }
    })
    .await;
    running.shutdown().await.unwrap();
    let mut reader = backend
        .subscribe(&Subscription::new("r", [&dead]))
        .await
        .unwrap();
    let d = receive_n(&mut *reader, 1).await;
    assert_eq!(
        d[0].message().metadata.headers[dlq::REASON],
        "malformed message: field `name` is missing"
    );
    assert_eq!(d[0].message().payload, br#"{"sensor":"s9","n":8}"#);
}

#[test]
fn debug_output_hides_passwords() {
    let mut t = Topology::new();
    t.pool("default", "redis://svc:hunter2@10.0.0.1:6379/0")
        .unwrap();
    let text = format!("{t:?}");
    assert!(!text.contains("hunter2"), "{text}");
    assert!(text.contains("svc:***@10.0.0.1"), "{text}");
}

#[tokio::test]
async fn approximate_trimming_on_publish() {
    let url = redis_url();
    let mut keys = Keys::new(&url);
    let stream = keys.add(&unique("capped"));
    let mut topology = Topology::new();
    topology
        .pool("default", &url)
        .unwrap()
        .stream("default", &stream, ["g"])
        .unwrap()
        .max_len(&stream, 10)
        .unwrap();
    let backend = RedisBackend::from_topology(&topology).await.unwrap();
    for chunk in 0..20 {
        let batch: Vec<Message> = (0..50)
            .map(|i| Message::new("Ping", format!("{chunk}-{i}").into_bytes()))
            .collect();
        backend.publish(&stream, &batch).await.unwrap();
    }
    let length = backend.stats(&stream).await.unwrap().length;
    // `MAXLEN ~` trims whole nodes of the stream: it keeps at least 10, far fewer than 1000.
    assert!((10..=250).contains(&length), "{length} entries kept");
}

#[tokio::test]
async fn idle_consumers_without_pending_entries_are_removed_and_owners_are_kept() {
    let url = redis_url();
    let mut keys = Keys::new(&url);
    let stream = keys.add(&unique("members"));
    let backend = backend().await;
    backend
        .publish(&stream, &[Message::new("Ping", b"x".to_vec())])
        .await
        .unwrap();
    let mut holder = backend
        .subscribe(
            &Subscription::new("g", [&stream])
                .consumer("holder")
                .claim_idle(None),
        )
        .await
        .unwrap();
    let held = receive_n(&mut *holder, 1).await;
    // A member that joined and never got anything.
    let _: i64 = redis::cmd("XGROUP")
        .arg("CREATECONSUMER")
        .arg(&stream)
        .arg("g")
        .arg("empty")
        .query_async(&mut raw(&url).await)
        .await
        .unwrap();
    drop(holder);

    let mut options = cqrs::redis::RedisOptions::default();
    options.remove_idle_consumers_after = Duration::from_millis(100);
    options.block = Duration::from_millis(50);
    let mut topology = Topology::new();
    topology.pool("default", &url).unwrap();
    let sweeper = RedisBackend::with_options(&topology, options)
        .await
        .unwrap();
    let members = || async {
        let mut c = raw(&url).await;
        let reply: redis::Value = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(&stream)
            .arg("g")
            .query_async(&mut c)
            .await
            .unwrap();
        let mut names: Vec<String> = match reply {
            redis::Value::Array(cs) => cs
                .iter()
                .filter_map(|c| match c {
                    redis::Value::Array(kv) => kv.chunks(2).find_map(|p| match (&p[0], &p[1]) {
                        (redis::Value::BulkString(k), redis::Value::BulkString(v))
                            if k == b"name" =>
                        {
                            Some(String::from_utf8_lossy(v).into_owned())
                        }
                        _ => None,
                    }),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        names.sort();
        names
    };
    assert_eq!(members().await, ["empty", "holder"]);
    eventually("the idle member without entries to be removed", || async {
        let mut c = sweeper
            .subscribe(
                &Subscription::new("g", [&stream])
                    .consumer(unique("sweeper"))
                    .claim_idle(None),
            )
            .await
            .unwrap();
        let _ = tokio::time::timeout(Duration::from_millis(100), c.receive(1)).await;
        !members().await.contains(&"empty".to_owned())
    })
    .await;
    assert!(
        members().await.contains(&"holder".to_owned()),
        "a member owning entries stays"
    );
    drop(held);
}
