//! The transactional outbox on PostgreSQL (`DATABASE_URL`, a cluster `scripts/test` starts with
//! `scripts/postgres`), relayed to the in-memory broker. Each test has a schema of its own.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use cqrs::memory::MemoryBroker;
use cqrs::postgres::sqlx::postgres::PgPoolOptions;
use cqrs::postgres::sqlx::PgPool;
use cqrs::postgres::{Outbox, OutboxRelay, OutboxStore};
use cqrs::{CancellationToken, Event, EventBus, TopicNamer};
use cqrs_test_support::{eventually, unique};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
struct SeatBooked {
    #[event(key)]
    show: String,
    seat: u32,
}

async fn pool() -> PgPool {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://cqrs@127.0.0.1:5432/postgres".to_owned());
    PgPoolOptions::new()
        .max_connections(20)
        .connect(&url)
        .await
        .expect("PostgreSQL at DATABASE_URL (scripts/test starts one)")
}

/// A store in a fresh schema, migrated, and an outbox sending every event to `topic`.
async fn outbox(pool: &PgPool, broker: &MemoryBroker, topic: &str) -> (OutboxStore, Outbox) {
    let schema = unique("outbox").replace('-', "_");
    let store = OutboxStore::new().schema(&schema).unwrap();
    store.migrate(pool).await.unwrap();
    // Twice: a second migration finds nothing to do.
    store.migrate(pool).await.unwrap();
    let topic = topic.to_owned();
    let bus = EventBus::new(broker.clone()).topics(TopicNamer::new(move |_| topic.clone()));
    (store.clone(), Outbox::new(bus, store))
}

fn seats(broker: &MemoryBroker, topic: &str) -> Vec<(String, u32)> {
    broker
        .messages(topic)
        .iter()
        .map(|m| {
            let e: SeatBooked = serde_json::from_slice(&m.payload).unwrap();
            (e.show, e.seat)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_transaction_sends_nothing_and_a_committed_one_is_relayed_in_order() {
    let pool = pool().await;
    let broker = MemoryBroker::new();
    let topic = unique("seats");
    let (store, outbox) = outbox(&pool, &broker, &topic).await;

    let mut tx = pool.begin().await.unwrap();
    for seat in 0..3 {
        let e = SeatBooked {
            show: "rolled-back".into(),
            seat,
        };
        outbox.publish(&mut tx, &e).await.unwrap();
    }
    tx.rollback().await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    let committed: Vec<SeatBooked> = (0..5)
        .map(|seat| SeatBooked {
            show: "s1".into(),
            seat,
        })
        .collect();
    outbox.publish_all(&mut tx, &committed).await.unwrap();
    // Not sent before the commit, relay or not: it cannot see them.
    assert_eq!(store.status(&pool).await.unwrap().depth, 0);
    tx.commit().await.unwrap();
    let status = store.status(&pool).await.unwrap();
    assert_eq!(status.depth, 5);
    assert!(status.oldest.is_some());

    let token = CancellationToken::new();
    let relay = tokio::spawn(
        OutboxRelay::new(pool.clone(), store.clone(), broker.clone())
            .poll_interval(Duration::from_millis(100))
            .run(token.clone()),
    );
    eventually("the committed events relayed", || {
        let n = broker.messages(&topic).len();
        async move { n >= 5 }
    })
    .await;
    eventually("the outbox emptied", || {
        let (store, pool) = (store.clone(), pool.clone());
        async move { store.status(&pool).await.unwrap().depth == 0 }
    })
    .await;
    assert_eq!(
        seats(&broker, &topic),
        (0..5).map(|s| ("s1".to_owned(), s)).collect::<Vec<_>>()
    );
    // The envelope as the bus writes it.
    let m = &broker.messages(&topic)[0];
    assert_eq!(m.name, "SeatBooked");
    assert_eq!(m.key.as_deref(), Some("s1"));
    token.cancel();
    relay.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_send_each_event_once_in_commit_order_per_key() {
    let pool = pool().await;
    let broker = MemoryBroker::new();
    let topic = unique("seats");
    let (store, outbox) = outbox(&pool, &broker, &topic).await;
    let token = CancellationToken::new();
    let relays: Vec<_> = (0..2)
        .map(|_| {
            tokio::spawn(
                OutboxRelay::new(pool.clone(), store.clone(), broker.clone())
                    .batch_size(7)
                    .poll_interval(Duration::from_millis(50))
                    .run(token.clone()),
            )
        })
        .collect();
    // Ten writers at once, each committing its own transactions for five shows.
    let writers: Vec<_> = (0..10u32)
        .map(|w| {
            let (pool, outbox) = (pool.clone(), outbox.clone());
            tokio::spawn(async move {
                for t in 0..10u32 {
                    let mut tx = pool.begin().await.unwrap();
                    for i in 0..3u32 {
                        let e = SeatBooked {
                            show: format!("show-{}", (w + t) % 5),
                            seat: w * 1000 + t * 10 + i,
                        };
                        outbox.publish(&mut tx, &e).await.unwrap();
                    }
                    tx.commit().await.unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    eventually("300 events relayed", || {
        let n = broker.messages(&topic).len();
        async move { n >= 300 }
    })
    .await;
    eventually("the outbox emptied", || {
        let (store, pool) = (store.clone(), pool.clone());
        async move { store.status(&pool).await.unwrap().depth == 0 }
    })
    .await;
    let got = seats(&broker, &topic);
    let distinct: HashSet<_> = got.iter().collect();
    assert_eq!((got.len(), distinct.len()), (300, 300), "each once");
    // Per show, each writer's events in its commit order.
    let mut last: BTreeMap<(String, u32), u32> = BTreeMap::new();
    for (show, seat) in &got {
        let writer = seat / 1000;
        if let Some(before) = last.insert((show.clone(), writer), *seat) {
            assert!(before < *seat, "{show}: {before} then {seat}");
        }
    }
    token.cancel();
    for r in relays {
        r.await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_dies_is_taken_over() {
    let pool = pool().await;
    let broker = MemoryBroker::new();
    let topic = unique("seats");
    let (store, outbox) = outbox(&pool, &broker, &topic).await;
    let first = CancellationToken::new();
    let a = tokio::spawn(
        OutboxRelay::new(pool.clone(), store.clone(), broker.clone())
            .poll_interval(Duration::from_millis(50))
            .run(first.clone()),
    );
    let publish = |seat: u32| {
        let (pool, outbox) = (pool.clone(), outbox.clone());
        async move {
            let mut tx = pool.begin().await.unwrap();
            let e = SeatBooked {
                show: "s1".into(),
                seat,
            };
            outbox.publish(&mut tx, &e).await.unwrap();
            tx.commit().await.unwrap();
        }
    };
    publish(1).await;
    eventually("relay a sending", || {
        let n = broker.messages(&topic).len();
        async move { n == 1 }
    })
    .await;
    // a dies without a word: its task is gone and its connection with it (the server releases
    // its lock).
    a.abort();
    let _ = a.await;
    let second = CancellationToken::new();
    let b = tokio::spawn(
        OutboxRelay::new(pool.clone(), store.clone(), broker.clone())
            .poll_interval(Duration::from_millis(50))
            .run(second.clone()),
    );
    publish(2).await;
    eventually("relay b took over", || {
        let n = broker.messages(&topic).len();
        async move { n == 2 }
    })
    .await;
    assert_eq!(
        seats(&broker, &topic),
        vec![("s1".to_owned(), 1), ("s1".to_owned(), 2)]
    );
    second.cancel();
    b.await.unwrap().unwrap();
}
