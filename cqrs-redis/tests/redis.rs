//! The Redis Streams backend against a real redis-server.
//!
//! Uses `REDIS_URL` (default `redis://127.0.0.1:6379/15`); tests that restart a server or need a
//! second pool start their own `redis-server` on a free port.

#![allow(clippy::unwrap_used)]

use cqrs_test_support as support;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cqrs::backend::{Publisher, Subscriber};
use cqrs::processor::dead_letter_headers as dlq;
use cqrs::{
    CancellationToken, Context, Delivery, Event, EventBus, EventProcessor, Message, RetryPolicy,
    StartFrom, Subscription,
};
use cqrs_redis::{redis, RedisBackend, Topology};
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

/// Waits until `stream` holds `n` entries (a dead letter arriving, say).
async fn holds(backend: &RedisBackend, stream: &str, n: u64, what: &str) {
    eventually(what, || {
        let (backend, stream) = (backend.clone(), stream.to_owned());
        async move {
            backend
                .stats(&stream)
                .await
                .map(|s| s.length == n)
                .unwrap_or(false)
        }
    })
    .await;
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

/// A member of group `g` on `stream`, reading from its start, with no claiming of idle entries.
async fn member_of_g(backend: &RedisBackend, stream: &str) -> Box<dyn cqrs::backend::Consumer> {
    backend
        .subscribe(&Subscription::new("g", [stream]).claim_idle(None))
        .await
        .unwrap()
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
    let namer = support::one_topic(&topic);
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
    holds(&backend, &dead, 1, "the dead letter").await;
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

/// Publishes `event`, retrying as an application would while the server is away.
async fn publish_until_accepted(bus: &EventBus, event: &Reading) {
    let mut tries = 0;
    while let Err(e) = bus.publish(event).await {
        tries += 1;
        assert!(
            e.is_retryable() && tries < 100,
            "publish failed for good: {e}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_server_restart_is_survived() {
    // A durable server: what it accepted before the restart is still there after it.
    let mut server = RedisServer::start_durable().await;
    let backend = RedisBackend::connect(&server.url()).await.unwrap();
    let seen: Arc<Mutex<Vec<u32>>> = Arc::default();
    let mut p = EventProcessor::new(backend.clone(), "svc");
    let s = seen.clone();
    p.handle("logger", move |r: Reading| {
        s.lock().unwrap().push(r.n);
        async { Ok::<_, String>(()) }
    })
    .unwrap()
    .concurrency(4);
    let running = p.start(CancellationToken::new()).await.unwrap();
    let bus = EventBus::new(backend.clone());
    for n in 0..200u32 {
        if n == 100 {
            server.restart().await;
        }
        let event = Reading {
            sensor: format!("s{}", n % 4),
            n,
        };
        publish_until_accepted(&bus, &event).await;
    }
    // Each event published once (an accepted publish is never repeated): every one of them
    // must be handled, the ones in flight at the restart included.
    eventually("all 200 events handled", || {
        let all = seen.lock().unwrap().iter().collect::<BTreeSet<_>>().len() == 200;
        async move { all }
    })
    .await;
    running.shutdown().await.unwrap();
    let mut conn = raw(&server.url()).await;
    let pending: redis::Value = redis::cmd("XPENDING")
        .arg("Reading")
        .arg("svc.logger")
        .query_async(&mut conn)
        .await
        .unwrap();
    let redis::Value::Array(summary) = pending else {
        panic!("XPENDING summary: {pending:?}");
    };
    assert_eq!(
        summary.first(),
        Some(&redis::Value::Int(0)),
        "nothing pending"
    );
}

#[tokio::test]
async fn a_handler_slower_than_the_claim_time_runs_once() {
    let server = RedisServer::start().await;
    let backend = RedisBackend::connect(&server.url()).await.unwrap();
    let calls: Arc<Mutex<Vec<u32>>> = Arc::default();
    let token = CancellationToken::new();
    let mut running = Vec::new();
    // Two members of one group: the one not busy looks for idle entries to claim.
    for _ in 0..2 {
        let mut p = EventProcessor::new(backend.clone(), "svc");
        let c = calls.clone();
        p.handle("slow", move |r: Reading| {
            c.lock().unwrap().push(r.n);
            async move {
                if r.n == 0 {
                    tokio::time::sleep(Duration::from_millis(3500)).await;
                }
                Ok::<_, String>(())
            }
        })
        .unwrap()
        .claim_idle(Some(Duration::from_secs(1)));
        running.push(p.start(token.clone()).await.unwrap());
    }
    let bus = EventBus::new(backend.clone());
    for n in 0..10 {
        bus.publish(&Reading {
            sensor: format!("s{n}"),
            n,
        })
        .await
        .unwrap();
    }
    let mut conn = raw(&server.url()).await;
    eventually("everything acked", || {
        let mut conn = conn.clone();
        let calls = calls.lock().unwrap().len();
        async move {
            let pending: redis::Value = redis::cmd("XPENDING")
                .arg("Reading")
                .arg("svc.slow")
                .query_async(&mut conn)
                .await
                .unwrap();
            calls >= 10
                && matches!(pending, redis::Value::Array(ref s) if s.first() == Some(&redis::Value::Int(0)))
        }
    })
    .await;
    token.cancel();
    for r in running {
        r.wait().await.unwrap();
    }
    let mut calls = calls.lock().unwrap().clone();
    calls.sort_unstable();
    assert_eq!(
        calls,
        (0..10).collect::<Vec<_>>(),
        "the slow entry was claimed from a live member and run twice"
    );
    let _ = &mut conn;
}

#[tokio::test]
async fn an_entry_waiting_for_its_retry_is_not_redelivered_early_after_a_connection_error() {
    let server = RedisServer::start().await;
    let backend = RedisBackend::connect(&server.url()).await.unwrap();
    let stream = unique("retry-wait");
    backend
        .publish(&stream, &[Message::new("X", b"x".to_vec())])
        .await
        .unwrap();
    let mut consumer = member_of_g(&backend, &stream).await;
    let first = receive_n(&mut *consumer, 1).await.remove(0);
    let nacked_at = tokio::time::Instant::now();
    let backoff = Duration::from_secs(3);
    first.nack(backoff).await.map_err(|(e, _)| e).unwrap();
    // Cut every connection: the consumer's next read fails and it re-reads its own entries.
    let mut admin = raw(&server.url()).await;
    let _: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .query_async(&mut admin)
        .await
        .unwrap();
    let again = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Ok(mut got) = consumer.receive(1).await {
                if !got.is_empty() {
                    return got.remove(0);
                }
            }
        }
    })
    .await
    .expect("the nacked entry came back");
    assert!(
        nacked_at.elapsed() >= backoff,
        "redelivered after {:?}, before its backoff of {backoff:?}",
        nacked_at.elapsed()
    );
    assert_eq!(again.attempt(), 2);
}

/// A nack longer than the keeper's refresh period (a third of `claim_idle`) comes back after
/// its delay: the keeper resets a waiting entry's idle time, and the redelivery asked for that
/// much idle time, so it came back only when the entry was claimed as idle, `claim_idle` later.
#[tokio::test]
async fn a_nack_longer_than_the_keepers_period_comes_back_on_time() {
    let server = RedisServer::start().await;
    let backend = RedisBackend::connect(&server.url()).await.unwrap();
    let stream = unique("long-nack");
    backend
        .publish(&stream, &[Message::new("X", b"x".to_vec())])
        .await
        .unwrap();
    // The keeper refreshes every 2 s; the nack waits 3 s.
    let mut consumer = backend
        .subscribe(&Subscription::new("g", [&stream]).claim_idle(Some(Duration::from_secs(6))))
        .await
        .unwrap();
    let first = receive_n(&mut *consumer, 1).await.remove(0);
    let nacked_at = tokio::time::Instant::now();
    first
        .nack(Duration::from_secs(3))
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    let again = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let mut got = consumer.receive(1).await.unwrap();
            if !got.is_empty() {
                return got.remove(0);
            }
        }
    })
    .await
    .expect("the nacked entry came back");
    let after = nacked_at.elapsed();
    assert!(
        after >= Duration::from_secs(3) && after < Duration::from_secs(5),
        "redelivered after {after:?}: its delay is 3 s"
    );
    assert_eq!(again.attempt(), 2);
}

#[tokio::test]
async fn a_group_created_again_keeps_its_start_position() {
    let backend = backend().await;
    let stream = unique("nogroup-latest");
    let mut keys = Keys::new(&redis_url());
    keys.add(&stream);
    backend
        .publish(&stream, &[Message::new("Old", b"old".to_vec())])
        .await
        .unwrap();
    let mut consumer = backend
        .subscribe(&Subscription::new("g", [&stream]).start(StartFrom::Latest))
        .await
        .unwrap();
    backend
        .publish(&stream, &[Message::new("New", b"new".to_vec())])
        .await
        .unwrap();
    let got = receive_n(&mut *consumer, 1).await;
    assert_eq!(payloads(&got), ["new"]);
    Delivery::ack_all(got).await.map_err(|(e, _)| e).unwrap();
    // The group vanishes (an operator's XGROUP DESTROY): it is created again from the latest
    // entry, as the subscription asked, not from the beginning.
    let mut conn = raw(&redis_url()).await;
    let _: i64 = redis::cmd("XGROUP")
        .arg("DESTROY")
        .arg(&stream)
        .arg("g")
        .query_async(&mut conn)
        .await
        .unwrap();
    let waited = tokio::time::timeout(Duration::from_millis(1500), consumer.receive(10)).await;
    if let Ok(Ok(got)) = waited {
        panic!("old entries delivered again: {:?}", payloads(&got));
    }
    backend
        .publish(&stream, &[Message::new("Later", b"later".to_vec())])
        .await
        .unwrap();
    assert_eq!(payloads(&receive_n(&mut *consumer, 1).await), ["later"]);
}

#[tokio::test]
async fn a_stream_deleted_under_a_blocked_read_is_read_again_not_failed() {
    let server = RedisServer::start().await;
    let backend = RedisBackend::connect(&server.url()).await.unwrap();
    let stream = unique("deleted");
    let mut consumer = backend
        .subscribe(&Subscription::new("g", [&stream]))
        .await
        .unwrap();
    let reading = tokio::spawn(async move {
        let got = receive_n(&mut *consumer, 1).await;
        payloads(&got)
    });
    // The server answers a blocked XREADGROUP whose stream is deleted with an `UNBLOCKED`
    // error (as a cluster master does when a reshard moves the stream away).
    let mut conn = raw(&server.url()).await;
    eventually("the consumer blocked in XREADGROUP", || {
        let mut conn = conn.clone();
        async move {
            let info: String = redis::cmd("INFO")
                .arg("clients")
                .query_async(&mut conn)
                .await
                .unwrap();
            info.contains("blocked_clients:1")
        }
    })
    .await;
    let _: i64 = redis::cmd("DEL")
        .arg(&stream)
        .query_async(&mut conn)
        .await
        .unwrap();
    backend
        .publish(&stream, &[Message::new("After", b"after".to_vec())])
        .await
        .unwrap();
    assert_eq!(reading.await.unwrap(), ["after"]);
}

#[tokio::test]
async fn a_dead_letter_stream_in_no_pool_is_refused_at_start() {
    let (one, two) = (RedisServer::start().await, RedisServer::start().await);
    let mut topology = Topology::new();
    topology.pool("sensors", &one.url()).unwrap();
    topology.pool("other", &two.url()).unwrap();
    topology
        .stream("sensors", "Reading", Vec::<String>::new())
        .unwrap();
    let backend = RedisBackend::from_topology(&topology).await.unwrap();
    let mut p = EventProcessor::new(backend, "svc");
    p.handle("logger", |_: Reading| async { Ok::<_, String>(()) })
        .unwrap();
    let err = p.start(CancellationToken::new()).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid configuration: the dead-letter stream `svc.logger.dead-letter` of group \
         `svc.logger` is in no pool: list it in a pool of the topology or name one pool `default`"
    );
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
    let namer = support::one_topic(&topic);
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
    holds(&backend, &dead, 1, "the malformed entry dead-lettered").await;
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
    assert_eq!(&d[0].message().payload[..], br#"{"sensor":"s9","n":8}"#);
}

/// A header whose name is not UTF-8 (any client may write one) makes its entry malformed, said
/// in the reason (so it is dead-lettered, as on Kafka), the header kept under its lossy name:
/// not dropped in silence, as it was.
#[tokio::test]
async fn a_header_name_that_is_not_utf8_is_said_in_the_reason_not_dropped() {
    let url = redis_url();
    let mut keys = Keys::new(&url);
    let stream = keys.add(&unique("binary-names"));
    let backend = backend().await;
    let mut conn = raw(&url).await;
    let _: String = redis::cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg("name")
        .arg("a.B")
        .arg(&b"h.\xffx"[..])
        .arg("v")
        .arg("h.tenant")
        .arg("acme")
        .arg("payload")
        .arg("{}")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut member = member_of_g(&backend, &stream).await;
    let d = receive_n(&mut *member, 1).await;
    assert_eq!(
        d[0].malformed(),
        Some("malformed message: header name `\u{fffd}x` is not UTF-8")
    );
    let m = d[0].message();
    assert_eq!((&*m.name, &m.payload[..]), ("a.B", &b"{}"[..]));
    assert_eq!(
        m.metadata.headers.iter().collect::<Vec<_>>(),
        [
            (&"tenant".to_owned(), &"acme".to_owned()),
            (&"\u{fffd}x".to_owned(), &"v".to_owned())
        ]
    );
}

#[tokio::test]
async fn a_v1_message_written_by_redis_cli_reaches_a_v3_handler_and_a_v4_is_dead_lettered() {
    use support::versions::{OrderPlaced, V4_REASON};
    let url = redis_url();
    let mut keys = Keys::new(&url);
    let topic = keys.add(&unique("orders"));
    let service = unique("svc");
    let dead = keys.add(&format!("{service}.billing.dead-letter"));
    let backend = backend().await;
    let got: Arc<Mutex<Vec<OrderPlaced>>> = Arc::default();
    let namer = support::one_topic(&topic);
    let mut p = EventProcessor::new(backend.clone(), &service).topics(namer);
    let g = got.clone();
    p.handle("billing", move |o: OrderPlaced| {
        g.lock().unwrap().push(o);
        async { Ok::<_, String>(()) }
    })
    .unwrap();
    let running = p.start(CancellationToken::new()).await.unwrap();

    // Written as an older service (or a script) would, in the documented layout
    // (docs/wire-format.md): version 1 of the event, then a version 4 nobody reads yet.
    for (version, payload) in [
        ("1", r#"{"order_id":"o-1","total":12.5}"#),
        ("4", r#"{"order_id":"o-4","lines":[]}"#),
    ] {
        let out = std::process::Command::new("redis-cli")
            .args([
                "-u",
                &url,
                "XADD",
                &topic,
                "*",
                "name",
                "orders.OrderPlaced",
            ])
            .args(["version", version, "payload", payload])
            .output()
            .expect("redis-cli is installed (scripts/test installs it)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    eventually("the v1 entry handled as v3", || {
        let n = got.lock().unwrap().len();
        async move { n == 1 }
    })
    .await;
    assert_eq!(
        got.lock().unwrap()[0],
        OrderPlaced {
            order_id: "o-1".into(),
            total_cents: 1250,
            currency: "EUR".into()
        }
    );
    holds(&backend, &dead, 1, "the v4 entry dead-lettered").await;
    eventually("both acked", || {
        let (backend, topic) = (backend.clone(), topic.clone());
        async move {
            backend
                .stats(&topic)
                .await
                .map(|s| s.groups.iter().all(|g| g.pending == 0))
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
    assert_eq!(d[0].message().metadata.headers[dlq::REASON], V4_REASON);
    assert_eq!(d[0].message().version, 4, "kept as it was written");
    assert_eq!(
        got.lock().unwrap().len(),
        1,
        "the v4 entry never reached the handler"
    );
}

#[tokio::test]
async fn a_batch_handler_gets_fetched_batches_and_a_failed_event_is_retried_alone() {
    let url = redis_url();
    let mut keys = Keys::new(&url);
    let topic = keys.add(&unique("batch"));
    let service = unique("svc");
    let backend = backend().await;
    let namer = support::one_topic(&topic);
    EventBus::new(backend.clone())
        .topics(namer.clone())
        .publish_all(&support::scenarios::jobs(30))
        .await
        .unwrap();
    let (running, calls) =
        support::scenarios::batch_failing_12_once(backend.clone(), namer, &service).await;
    eventually("all acked", || {
        let (backend, topic, group) = (backend.clone(), topic.clone(), format!("{service}.store"));
        async move {
            backend
                .stats(&topic)
                .await
                .map(|s| {
                    s.groups
                        .iter()
                        .any(|g| g.name == group && g.pending == 0 && g.lag == Some(0))
                })
                .unwrap_or(false)
        }
    })
    .await;
    running.shutdown().await.unwrap();
    let calls = calls.lock().unwrap().clone();
    assert_eq!(
        calls,
        [
            (0..10).collect::<Vec<_>>(),
            (10..20).collect(),
            vec![12],
            (20..30).collect()
        ],
        "one call per XREADGROUP batch, the failed event alone before the next batch"
    );
}

#[tokio::test]
async fn a_renamed_handler_is_warned_about_the_entries_its_old_group_holds() {
    let url = redis_url();
    let mut keys = Keys::new(&url);
    let topic = keys.add(&unique("renamed"));
    let service = unique("svc");
    let backend = backend().await;
    let namer = support::one_topic(&topic);
    let start = |handler: &'static str| {
        let mut p = EventProcessor::new(backend.clone(), &service).topics(namer.clone());
        p.handle(handler, |_: Reading| async { Ok::<_, String>(()) })
            .unwrap();
        p.start(CancellationToken::new())
    };
    // The service as deployed first; stopped; then entries arrive.
    start("notify").await.unwrap().shutdown().await.unwrap();
    let events: Vec<Reading> = (0..3)
        .map(|n| Reading {
            sensor: "s".into(),
            n,
        })
        .collect();
    EventBus::new(backend.clone())
        .topics(namer.clone())
        .publish_all(&events)
        .await
        .unwrap();
    // Deployed again with the handler renamed: a new group, XINFO GROUPS shows the old one.
    let running = start("notify-customer").await.unwrap();
    assert_eq!(
        running.warnings(),
        [format!(
            "consumer group `{service}.notify` on `{topic}` holds 0 pending and 3 undelivered \
             messages, but no handler of service `{service}` reads it now (this processor reads \
             `{topic}` as `{service}.notify-customer`): if a handler was renamed, those \
             messages wait in the old group; handle them, or delete the group"
        )]
    );
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_handler_decides_how_its_message_settles() {
    let url = redis_url();
    let mut keys = Keys::new(&url);
    let topic = keys.add(&unique("decide"));
    let service = unique("svc");
    let dead = keys.add(&format!("{service}.decide.dead-letter"));
    let backend = backend().await;
    let namer = support::one_topic(&topic);
    support::scenarios::handler_decides(backend, namer, &service, &dead).await;
}

#[tokio::test]
async fn the_manifest_names_the_pool_each_group_reads() {
    let mut p = EventProcessor::new(backend().await, "svc");
    p.handle("h", |_: Reading| async { Ok::<_, String>(()) })
        .unwrap();
    let location = p.manifest().groups[0].location.clone().unwrap();
    // The URL prints as RedisUrl does: never with a password (debug_output_hides_passwords).
    assert_eq!(location, format!("redis pool `default` at {}", redis_url()));
    assert!(p.manifest().to_string().contains(&location));
}

#[tokio::test]
async fn status_shows_a_group_reconnecting_while_its_server_is_down() {
    let mut server = RedisServer::start_durable().await;
    let backend = RedisBackend::connect(&server.url()).await.unwrap();
    let mut p = EventProcessor::new(backend.clone(), "svc");
    p.handle("logger", |_: Reading| async { Ok::<_, String>(()) })
        .unwrap();
    let running = p.start(CancellationToken::new()).await.unwrap();
    let bus = EventBus::new(backend.clone());
    let reading = |n| Reading {
        sensor: "s".into(),
        n,
    };
    bus.publish(&reading(1)).await.unwrap();
    eventually("one handled", || {
        let handled = running.status()[0].handled;
        async move { handled == 1 }
    })
    .await;
    assert!(running.is_ready());

    server.stop();
    eventually("reconnecting, with the error", || {
        let s = running.status()[0].clone();
        async move { s.state == cqrs::GroupState::Reconnecting && s.last_error.is_some() }
    })
    .await;
    assert!(!running.is_ready());

    server.restart().await;
    publish_until_accepted(&bus, &reading(2)).await;
    eventually("running again, the next one handled", || {
        let s = running.status()[0].clone();
        async move { s.state == cqrs::GroupState::Running && s.handled == 2 }
    })
    .await;
    assert!(running.is_ready());
    running.shutdown().await.unwrap();
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

    let mut options = cqrs_redis::RedisOptions::default();
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

/// One redrive of a dead-letter stream at a time: a second, while the first runs, would list
/// the same letters before the first deletes them and publish them again. It is refused, naming
/// the lock; once the lock is free the redrive runs.
#[tokio::test]
async fn a_second_redrive_of_a_topic_while_one_runs_is_refused() {
    use cqrs::DeadLetterStore;
    let backend = RedisBackend::connect(&redis_url()).await.unwrap();
    let (topic, dead) = (unique("orders"), unique("orders-dead"));
    let mut letter = Message::new("X", b"x".to_vec());
    letter
        .metadata
        .headers
        .insert(dlq::TOPIC.into(), topic.clone());
    backend.publish(&dead, &[letter]).await.unwrap();
    // Another run holds the lock.
    let mut conn = raw(&redis_url()).await;
    let lock = format!("cqrs:redrive-lock:{dead}");
    let _: () = redis::cmd("SET")
        .arg(&lock)
        .arg("another-run")
        .arg("PX")
        .arg(60_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    let err = backend.redrive(&dead, None).await.unwrap_err();
    assert!(
        err.report().contains("another redrive") && err.report().contains(&lock),
        "{}",
        err.report()
    );
    assert_eq!(
        backend.dead_letters(&dead).await.unwrap().len(),
        1,
        "nothing redriven"
    );
    let _: () = redis::cmd("DEL")
        .arg(&lock)
        .query_async(&mut conn)
        .await
        .unwrap();
    let redriven = backend.redrive(&dead, None).await.unwrap();
    assert_eq!(redriven.len(), 1);
    assert!(backend.dead_letters(&dead).await.unwrap().is_empty());
    let len: usize = redis::cmd("XLEN")
        .arg(&topic)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(len, 1, "back on its topic once");
    let held: Option<String> = redis::cmd("GET")
        .arg(&lock)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(held, None, "the lock is released");
}

/// Redis over TLS (`rediss://`, feature `tls`): a redis-server with a TLS port and a
/// certificate from a CA of the test's own. Without that CA trusted, connecting fails (the
/// certificate is refused, and the error says so); with it (`SSL_CERT_FILE`, which OpenSSL
/// reads), events go through end to end.
#[cfg(feature = "tls")]
#[tokio::test]
async fn rediss_connects_through_tls_with_the_servers_ca_and_not_without() {
    let server = RedisServer::start_tls(&[]).await;
    let url = server.tls_url(None);

    // The system's CAs do not know the test's: refused, and said.
    let refused = cqrs::Error::from(
        RedisBackend::connect(&url)
            .await
            .expect_err("an untrusted certificate is refused"),
    );
    assert!(
        refused.report().to_lowercase().contains("certificate"),
        "{}",
        refused.report()
    );

    std::env::set_var("SSL_CERT_FILE", server.ca());
    let backend = RedisBackend::connect(&url).await.unwrap();
    let stream = unique("tls");
    let mut member = member_of_g(&backend, &stream).await;
    backend
        .publish(&stream, &[Message::new("X", b"over tls".to_vec())])
        .await
        .unwrap();
    let got = receive_n(&mut *member, 1).await;
    assert_eq!(&got[0].message().payload[..], b"over tls");
    Delivery::ack_all(got).await.map_err(|(e, _)| e).unwrap();
}

/// Redis ACL users with key patterns: an authorized user works end to end; a wrong password
/// fails at once with an error that says so and does not print it; a user without access to a
/// stream gets an error naming the stream, and its messages stay where they are.
#[tokio::test]
async fn acl_users_work_a_wrong_password_fails_at_once_and_a_stream_without_access_is_named() {
    let server = RedisServer::start().await;
    let mut admin = raw(&server.url()).await;
    for (user, pattern) in [("app", "~app-*"), ("other", "~other-*")] {
        let _: () = redis::cmd("ACL")
            .arg("SETUSER")
            .arg(user)
            .arg("on")
            .arg(">Pw-7x!q")
            .arg(pattern)
            .arg("+@all")
            .query_async(&mut admin)
            .await
            .unwrap();
    }
    let url = |user: &str, password: &str| {
        format!("redis://{user}:{password}@127.0.0.1:{}/0", server.port)
    };
    // Authorized: end to end on its own streams.
    let app = RedisBackend::connect(&url("app", "Pw-7x!q")).await.unwrap();
    let stream = unique("app-orders");
    let mut member = member_of_g(&app, &stream).await;
    app.publish(&stream, &[Message::new("X", b"mine".to_vec())])
        .await
        .unwrap();
    let got = receive_n(&mut *member, 1).await;
    Delivery::ack_all(got).await.map_err(|(e, _)| e).unwrap();

    // A wrong password: refused at once, said, not printed.
    let started = std::time::Instant::now();
    let wrong = cqrs::Error::from(
        RedisBackend::connect(&url("app", "Wrong-Secret-9"))
            .await
            .expect_err("a wrong password is refused"),
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let said = wrong.report();
    assert!(!said.contains("Wrong-Secret-9"), "{said}");
    assert!(
        said.contains("WRONGPASS") || said.to_lowercase().contains("auth"),
        "{said}"
    );
    assert!(
        !wrong.is_retryable(),
        "a wrong password is not worth retrying: {said}"
    );

    // No access to another user's streams: the error names the stream; nothing moves.
    let theirs = unique("other-orders");
    let other = RedisBackend::connect(&url("other", "Pw-7x!q"))
        .await
        .unwrap();
    other
        .publish(&theirs, &[Message::new("X", b"theirs".to_vec())])
        .await
        .unwrap();
    let denied = match app
        .subscribe(&Subscription::new("g", [&theirs]).claim_idle(None))
        .await
    {
        Err(e) => e,
        Ok(_) => panic!("subscribing to a stream without access succeeded"),
    };
    assert!(denied.report().contains(&theirs), "{}", denied.report());
    let denied = app
        .publish(&theirs, &[Message::new("X", b"intruder".to_vec())])
        .await
        .expect_err("publishing without access is refused");
    assert!(denied.report().contains(&theirs), "{}", denied.report());
    let len: usize = redis::cmd("XLEN")
        .arg(&theirs)
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(len, 1, "only its owner's message");
}

/// `MAXLEN` trimming with a group behind drops entries the group never got. Redis says nothing;
/// the group's stats count them (`trimmed_unread`) and its member warns. A group made after them
/// neither counts them nor warns.
#[tokio::test]
async fn trimming_past_a_group_shows_in_its_stats_and_its_member_warns() {
    let (_guard, logs) = support::captured_warnings();
    let url = redis_url();
    let mut keys = Keys::new(&url);
    let stream = keys.add(&unique("trimmed"));
    let (behind, fresh) = (unique("behind"), unique("fresh"));
    let mut topology = Topology::new();
    topology
        .pool("default", &url)
        .unwrap()
        .stream("default", &stream, Vec::<String>::new())
        .unwrap()
        .max_len(&stream, 10)
        .unwrap();
    let backend = RedisBackend::from_topology(&topology).await.unwrap();
    const WARNING: &str = "deleted before this group read them";
    let group = |name: &str| {
        let backend = backend.clone();
        let stream = stream.clone();
        let name = name.to_owned();
        async move {
            let stats = backend.stats(&stream).await.unwrap();
            stats.groups.into_iter().find(|g| g.name == name).unwrap()
        }
    };

    // The group exists from the beginning; nobody reads while 1,000 entries come.
    drop(
        backend
            .subscribe(&Subscription::new(&behind, [&stream]))
            .await
            .unwrap(),
    );
    for from in [0, 500] {
        let batch: Vec<Message> = (from..from + 500)
            .map(|i| Message::new("Ping", i.to_string().into_bytes()))
            .collect();
        backend.publish(&stream, &batch).await.unwrap();
    }
    let length = backend.stats(&stream).await.unwrap().length;
    assert!(length < 1000, "{length} entries kept: not trimmed");
    let lost = group(&behind).await.trimmed_unread;
    assert_eq!(lost, 1000 - length, "entries lost to the group behind");

    // A group made now, at the end, is behind nothing: no flag, and its member does not warn.
    let mut latest = backend
        .subscribe(&Subscription::new(&fresh, [&stream]).start(StartFrom::Latest))
        .await
        .unwrap();
    cqrs::conformance::receive_none(&mut *latest).await;
    assert_eq!(group(&fresh).await.trimmed_unread, 0);
    assert!(!logs.text().contains(WARNING), "{}", logs.text());

    // The group behind starts reading: its member warns, naming the stream and the group.
    let mut late = backend
        .subscribe(&Subscription::new(&behind, [&stream]))
        .await
        .unwrap();
    let got = receive_n(&mut *late, length as usize).await;
    Delivery::ack_all(got).await.map_err(|(e, _)| e).unwrap();
    let text = logs.text();
    let warning = text
        .lines()
        .find(|l| l.contains(WARNING))
        .unwrap_or_else(|| panic!("no warning; logged: {text}"));
    assert!(
        warning.contains(&stream) && warning.contains(&behind),
        "{warning}"
    );
}

/// Dead letters listed in pages (`XRANGE` from after the last one, `COUNT`) come out as the whole
/// list does, each once.
#[tokio::test]
async fn dead_letters_read_in_pages_are_the_whole_list() {
    let url = redis_url();
    let mut keys = Keys::new(&url);
    let dead = keys.add(&unique("paged-dead"));
    let backend = RedisBackend::connect(&url).await.unwrap();
    let letters: Vec<Message> = (0..11)
        .map(|i| Message::new("X", format!("{i}").into_bytes()))
        .collect();
    backend.publish(&dead, &letters).await.unwrap();
    for size in [1, 3, 4, 11, 20] {
        support::pages_match_the_whole_list(&backend, &dead, size).await;
    }
}

/// `redrive_all` and `purge_all` read `XRANGE` pages up to the last entry there was when they
/// started: every letter there then is redriven or purged once, in order, and one dead-lettered
/// meanwhile stays. By id, `XRANGE id id` reads only those.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_redriven_and_purged_in_pages_are_those_there_at_the_start() {
    let url = redis_url();
    let mut keys = Keys::new(&url);
    let backend = RedisBackend::connect(&url).await.unwrap();
    for size in [1, 3, 7] {
        let dead = keys.add(&unique("paged-redrive-dead"));
        let origin = keys.add(&unique("paged-redrive-origin"));
        support::paged_redrive_and_purge_take_only_what_was_there(
            &backend, &dead, &origin, size, "1-1",
        )
        .await;
    }
}

/// A consumer's read of many large entries, every field of the message set, reads them as they
/// were published: replies far larger than one read from the socket, payloads that hold CRLF
/// and bytes that are not UTF-8, a key, headers and correlation ids.
#[tokio::test]
async fn large_reads_with_every_field_come_back_as_published() {
    let backend = backend().await;
    let stream = unique("large-reads");
    let sent: Vec<Message> = (0..1200u32)
        .map(|i| {
            let mut payload = format!("{i:05}\r\n*2\r\n$3\r\n").into_bytes();
            payload.extend((0..2000u32).map(|b| (b * 7 + i) as u8));
            Message::new(format!("Event{}", i % 3), payload)
                .with_version(1 + i % 4)
                .with_key((i % 5 != 0).then(|| format!("key-{}", i % 7).into()))
                .with_metadata(
                    cqrs::Metadata::now()
                        .correlation_id(format!("corr-{i}"))
                        .causation_id("cause")
                        .header("tenant", format!("t{}", i % 2))
                        .header("crlf", "a\r\nb"),
                )
        })
        .collect();
    for chunk in sent.chunks(100) {
        backend.publish(&stream, chunk).await.unwrap();
    }
    let mut consumer = member_of_g(&backend, &stream).await;
    let mut got = Vec::new();
    while got.len() < sent.len() {
        let read = tokio::time::timeout(Duration::from_secs(10), consumer.receive(1000))
            .await
            .expect("a read in time")
            .unwrap();
        assert!(read.len() <= 1000);
        got.extend(read);
    }
    assert_eq!(got.len(), sent.len());
    for (d, m) in got.iter().zip(&sent) {
        let r = d.message();
        assert_eq!(d.malformed(), None, "{}", m.id);
        assert_eq!(
            (&r.id, &r.name, r.version, &r.key, &r.payload),
            (&m.id, &m.name, m.version, &m.key, &m.payload)
        );
        assert_eq!(r.metadata.correlation_id, m.metadata.correlation_id);
        assert_eq!(r.metadata.causation_id, m.metadata.causation_id);
        assert_eq!(r.metadata.headers, m.metadata.headers);
        assert_eq!(d.attempt(), 1);
    }
    Delivery::ack_all(got).await.map_err(|(e, _)| e).unwrap();
    let pending: redis::Value = redis::cmd("XPENDING")
        .arg(&stream)
        .arg("g")
        .query_async(&mut raw(&redis_url()).await)
        .await
        .unwrap();
    assert_eq!(
        cqrs_redis::redis::from_redis_value::<(u64, Option<String>, Option<String>, redis::Value)>(
            pending
        )
        .unwrap()
        .0,
        0,
        "all acked"
    );
    let _: () = redis::cmd("DEL")
        .arg(&stream)
        .query_async(&mut raw(&redis_url()).await)
        .await
        .unwrap();
}

/// A server on a Unix socket with a password (`requirepass`) and a database other than 0: a
/// consumer reads there on the backend's own connection (AUTH and SELECT as the `redis` crate
/// sends them), and a wrong password fails at subscribe or before, not at the first read.
#[tokio::test]
async fn a_unix_socket_with_a_password_and_a_database() {
    let server = RedisServer::start_unix().await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("Sock-Pw-3")
        .query_async(&mut raw(&server.url()).await)
        .await
        .unwrap();
    let socket = server.unix_socket();
    let url = format!("unix://{}?db=3&pass=Sock-Pw-3", socket.display());
    let backend = RedisBackend::connect(&url).await.unwrap();
    let stream = unique("unix");
    backend
        .publish(&stream, &[Message::new("X", b"over a socket".to_vec())])
        .await
        .unwrap();
    let mut consumer = member_of_g(&backend, &stream).await;
    let got = receive_n(&mut *consumer, 1).await;
    assert_eq!(&got[0].message().payload[..], b"over a socket");
    Delivery::ack_all(got).await.map_err(|(e, _)| e).unwrap();
    // In database 3, not 0.
    let len: usize = redis::cmd("XLEN")
        .arg(&stream)
        .query_async(&mut raw(&url).await)
        .await
        .unwrap();
    assert_eq!(len, 1);
    let wrong = format!("unix://{}?db=3&pass=Wrong-Pw-9", socket.display());
    let refused = match RedisBackend::connect(&wrong).await {
        Err(e) => cqrs::Error::from(e),
        Ok(b) => match b
            .subscribe(&Subscription::new("g2", [&stream]).claim_idle(None))
            .await
        {
            Err(e) => e,
            Ok(_) => panic!("a wrong password was accepted"),
        },
    };
    assert!(
        !refused.report().contains("Wrong-Pw-9"),
        "{}",
        refused.report()
    );
    assert!(!refused.is_retryable(), "{}", refused.report());
}

/// The `id` and `payload` fields of every entry of `stream`, oldest first: what the server holds.
async fn ids_and_payloads(url: &str, stream: &str) -> Vec<(String, String)> {
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query_async(&mut raw(url).await)
        .await
        .unwrap();
    reply
        .ids
        .iter()
        .map(|e| {
            let field = |name| e.get::<String>(name).unwrap_or_default();
            (field("id"), field("payload"))
        })
        .collect()
}

/// The connection is lost while the server's replies to a publish are on their way (a proxy cuts
/// it): the server took some or all of the `XADD`s and the publisher was not told. The publish
/// looks for them in the stream and sends only the others: every message is there once, in the
/// order published, and the publish succeeds. A batch (one pipeline) and a single message.
#[tokio::test]
async fn a_publish_whose_replies_are_lost_leaves_each_message_in_the_stream_once_in_order() {
    let server = RedisServer::start().await;
    let proxy = support::CuttingProxy::start(server.port).await;
    let backend = RedisBackend::connect(&format!("redis://127.0.0.1:{}/0", proxy.port))
        .await
        .unwrap();
    let stream = unique("cut");
    let batch: Vec<Message> = (0..50)
        .map(|i| Message::new("Ping", i.to_string().into_bytes()))
        .collect();
    let one = Message::new("Ping", b"50".to_vec());

    proxy.arm();
    backend.publish(&stream, &batch).await.unwrap();
    assert_eq!(proxy.cuts(), 1, "the batch's replies were cut");
    proxy.arm();
    backend
        .publish(&stream, std::slice::from_ref(&one))
        .await
        .unwrap();
    assert_eq!(proxy.cuts(), 2, "the single message's reply was cut");

    let expected: Vec<(String, String)> = batch
        .iter()
        .chain([&one])
        .map(|m| {
            (
                m.id.to_string(),
                String::from_utf8(m.payload.to_vec()).unwrap(),
            )
        })
        .collect();
    assert_eq!(ids_and_payloads(&server.url(), &stream).await, expected);
}

/// A server that stays away: the publish stops trying after `publish_timeout` and returns the
/// connection's error.
#[tokio::test]
async fn a_publish_to_a_server_that_stays_away_fails_after_its_timeout() {
    let mut server = RedisServer::start().await;
    let mut options = cqrs_redis::RedisOptions::default();
    options.publish_timeout = Duration::from_millis(500);
    let topology = Topology::of_address(&server.url()).unwrap();
    let backend = RedisBackend::with_options(&topology, options)
        .await
        .unwrap();
    server.stop();
    let (stream, message) = (unique("away"), [Message::new("Ping", b"1".to_vec())]);
    let publish = backend.publish(&stream, &message);
    let err = tokio::time::timeout(Duration::from_secs(30), publish)
        .await
        .expect("the publish gave up")
        .unwrap_err();
    assert!(err.to_string().contains("XADD"), "{err}");
}

/// A publish cut the same way, by a user whose ACL denies `XRANGE` and `TIME`: it cannot look
/// for what the server took, so it says so and returns the connection's error rather than send
/// again. The server holds the message once; the password is in no log and no error.
#[tokio::test]
async fn a_cut_publish_by_a_user_who_cannot_read_the_stream_fails_and_sends_nothing_again() {
    let server = RedisServer::start().await;
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("writer")
        .arg("on")
        .arg(">Wr1te-only!")
        .arg("~*")
        .arg("+@all")
        .arg("-xrange")
        .arg("-time")
        .query_async(&mut raw(&server.url()).await)
        .await
        .unwrap();
    let proxy = support::CuttingProxy::start(server.port).await;
    let backend = RedisBackend::connect(&format!(
        "redis://writer:Wr1te-only!@127.0.0.1:{}/0",
        proxy.port
    ))
    .await
    .unwrap();
    let stream = unique("cut-acl");
    let message = Message::new("Ping", b"once".to_vec());

    let (_guard, logs) = support::captured_warnings();
    proxy.arm();
    let err = backend
        .publish(&stream, std::slice::from_ref(&message))
        .await
        .unwrap_err();
    assert_eq!(proxy.cuts(), 1);
    assert!(err.to_string().contains("XADD"), "{err}");
    let logged = logs.text();
    assert!(
        logged.contains("cannot look for the messages of a publish cut by a lost connection"),
        "{logged}"
    );
    for text in [format!("{err:?}"), logged] {
        assert!(!text.contains("Wr1te-only!"), "{text}");
    }
    assert_eq!(
        ids_and_payloads(&server.url(), &stream).await,
        [(message.id.to_string(), "once".to_owned())]
    );
}

/// A group's one handler (concurrency 1) on `topic`: its first call waits for `release`, a
/// second one (a redelivery) does not.
struct Held {
    calls: Arc<std::sync::atomic::AtomicU32>,
    release: Arc<tokio::sync::Notify>,
}

impl Held {
    fn calls(&self) -> u32 {
        self.calls.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Starts a group with a [`Held`] handler, publishes one event and waits until the handler has
/// it.
async fn held_on_its_first_message(
    backend: &RedisBackend,
    topic: &str,
    shutdown_timeout: Option<Duration>,
) -> (cqrs::RunningProcessor, Held) {
    let held = Held {
        calls: Arc::default(),
        release: Arc::default(),
    };
    let mut p = EventProcessor::new(backend.clone(), "svc").topics(support::one_topic(topic));
    let (c, r) = (held.calls.clone(), held.release.clone());
    let options = p
        .handle("once", move |_: Reading| {
            let (c, r) = (c.clone(), r.clone());
            async move {
                if c.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                    r.notified().await;
                }
                Ok::<_, String>(())
            }
        })
        .unwrap();
    if let Some(timeout) = shutdown_timeout {
        options.shutdown_timeout(timeout);
    }
    let running = p.start(CancellationToken::new()).await.unwrap();
    EventBus::new(backend.clone())
        .topics(support::one_topic(topic))
        .publish(&Reading {
            sensor: "s".into(),
            n: 1,
        })
        .await
        .unwrap();
    eventually("the handler called", || {
        let called = held.calls() == 1;
        async move { called }
    })
    .await;
    (running, held)
}

/// The server restarts while a message is being handled, and answers `LOADING` for ~7 s while
/// it loads its data (300 keys of 2 KiB, 25 ms each): far longer than a few quick retries. The
/// message's ack goes out meanwhile, is tried again until the server has loaded, and lands; the
/// message is handled once, not handed back to its member and handled again.
#[tokio::test]
async fn an_ack_outlasts_a_server_loading_its_data_and_the_message_is_handled_once() {
    let mut server = RedisServer::start_slow_loading(Duration::from_millis(25)).await;
    let mut admin = raw(&server.url()).await;
    let mut fill = redis::pipe();
    for i in 0..300 {
        fill.set(format!("fill-{i}"), "x".repeat(2048)).ignore();
    }
    fill.query_async::<()>(&mut admin).await.unwrap();
    let backend = RedisBackend::connect(&server.url()).await.unwrap();
    let topic = unique("ack-loading");
    let (_guard, logs) = support::captured_warnings();
    let (running, held) = held_on_its_first_message(&backend, &topic, None).await;
    // The entry, delivered and not acked, is in what the server loads again.
    let _: () = redis::cmd("SAVE").query_async(&mut admin).await.unwrap();

    // Started again; once it answers `LOADING`, the handler finishes and its ack goes out.
    let url = server.url();
    let loading = async {
        eventually("the server answering LOADING", || {
            let url = url.clone();
            async move {
                let Ok(client) = redis::Client::open(url) else {
                    return false;
                };
                let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
                    return false;
                };
                let ping: redis::RedisResult<String> =
                    redis::cmd("PING").query_async(&mut conn).await;
                ping.is_err_and(|e| e.code() == Some("LOADING"))
            }
        })
        .await;
        held.release.notify_one();
    };
    tokio::join!(server.restart(), loading);
    let url = server.url();
    eventually("nothing pending", || {
        let (url, topic) = (url.clone(), topic.clone());
        async move {
            let pending: redis::RedisResult<redis::Value> = redis::cmd("XPENDING")
                .arg(&topic)
                .arg("svc.once")
                .query_async(&mut raw(&url).await)
                .await;
            matches!(pending, Ok(redis::Value::Array(s)) if s.first() == Some(&redis::Value::Int(0)))
        }
    })
    .await;
    running.shutdown().await.unwrap();
    assert_eq!(held.calls(), 1, "handled once");
    let logged = logs.text();
    assert!(
        !logged.contains("ack failed; the messages will be redelivered"),
        "{logged}"
    );
}

/// A group of concurrency 1 stops while its server is away, with a handled message whose ack
/// is being retried: the retries get the shutdown deadline (1 s here), not their 30 s. The
/// message stays pending, for redelivery.
#[tokio::test]
async fn a_group_stopping_while_its_server_is_away_stops_at_its_shutdown_deadline() {
    let mut server = RedisServer::start().await;
    let backend = RedisBackend::connect(&server.url()).await.unwrap();
    let topic = unique("stop-away");
    let (_guard, logs) = support::captured_warnings();
    let shutdown = Some(Duration::from_secs(1));
    let (running, held) = held_on_its_first_message(&backend, &topic, shutdown).await;

    server.stop();
    held.release.notify_one();
    eventually("an ack failing", || {
        let failing = logs.text().contains("ack failed; retrying");
        async move { failing }
    })
    .await;
    tokio::time::timeout(Duration::from_secs(10), running.shutdown())
        .await
        .expect("stopped within its shutdown deadline, not the ack retries' 30 s")
        .unwrap();
    assert!(
        logs.text()
            .contains("shutdown deadline passed while acking; the messages will be redelivered"),
        "{}",
        logs.text()
    );
}
