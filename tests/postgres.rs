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

/// Waits until the relay has sent (and deleted) everything committed to `store`.
async fn emptied(store: &OutboxStore, pool: &PgPool) {
    eventually("the outbox emptied", || {
        let (store, pool) = (store.clone(), pool.clone());
        async move { store.status(&pool).await.unwrap().depth == 0 }
    })
    .await;
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
    emptied(&store, &pool).await;
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

/// Rows become visible when their transaction commits, not in `seq` order, and the relay reads
/// from a cursor: a row whose transaction commits after rows stored later were relayed is
/// relayed too, once. Its transaction stays open past the cursor's settling time (the skipped
/// `seq` must be kept while a transaction that may write it runs), and a rolled-back row's `seq`
/// does not stop the relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_committed_after_later_rows_were_relayed_is_relayed_too() {
    let pool = pool().await;
    let broker = MemoryBroker::new();
    let topic = unique("seats");
    let (store, outbox) = outbox(&pool, &broker, &topic).await;
    let token = CancellationToken::new();
    // Woken by the commits' notifications only (the poll is far away), so that what the relay
    // reads, and when, follows the test's steps.
    let relay = tokio::spawn(
        OutboxRelay::new(pool.clone(), store.clone(), broker.clone())
            .poll_interval(Duration::from_secs(60))
            .run(token.clone()),
    );
    let seat = |show: &str, seat| SeatBooked {
        show: show.into(),
        seat,
    };
    let relayed = |show: &'static str| {
        let (broker, topic) = (broker.clone(), topic.clone());
        move || {
            let n = seats(&broker, &topic)
                .iter()
                .filter(|(s, _)| s == show)
                .count();
            async move { n }
        }
    };
    let mut slow = pool.begin().await.unwrap();
    outbox.publish(&mut slow, &seat("slow", 0)).await.unwrap();
    let mut rolled = pool.begin().await.unwrap();
    outbox.publish(&mut rolled, &seat("gone", 0)).await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    for n in 0..3 {
        outbox.publish(&mut tx, &seat("fast", n)).await.unwrap();
    }
    tx.commit().await.unwrap();
    eventually("the later rows relayed", || {
        let count = relayed("fast")();
        async move { count.await == 3 }
    })
    .await;
    // The open transaction outlives the cursor's settling time (1 s): its row's `seq` must not
    // be given up meanwhile. Time passing is the point here, not a wait for something.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    rolled.rollback().await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    for n in 3..6 {
        outbox.publish(&mut tx, &seat("fast", n)).await.unwrap();
    }
    tx.commit().await.unwrap();
    eventually("rows after a rolled-back one relayed", || {
        let count = relayed("fast")();
        async move { count.await == 6 }
    })
    .await;
    // The relay reads the transaction horizon at most every 100 ms: past that, the read the
    // commit wakes reads it too, and sees the slow transaction ended. Applied before that read
    // (the bug fixed by fb641d7), it dropped the row's gap and the read started above the row.
    tokio::time::sleep(Duration::from_millis(300)).await;
    slow.commit().await.unwrap();
    eventually("the row committed last relayed", || {
        let count = relayed("slow")();
        async move { count.await == 1 }
    })
    .await;
    emptied(&store, &pool).await;
    let all = seats(&broker, &topic);
    assert_eq!(
        all.len(),
        7,
        "each once, the rolled-back one never: {all:?}"
    );
    assert!(!all.iter().any(|(show, _)| show == "gone"));
    token.cancel();
    relay.await.unwrap().unwrap();
}

/// A row the relay cannot read (here a column whose type was changed by hand) is an error the
/// relay reports (`BadRow`, naming the column) and retries, not a panic: the row stays in the
/// outbox. Runs on the test's thread, so that its warning is captured.
#[tokio::test]
async fn a_row_the_relay_cannot_read_is_reported_and_stays() {
    let pool = pool().await;
    let broker = MemoryBroker::new();
    let topic = unique("seats");
    let (store, outbox) = outbox(&pool, &broker, &topic).await;
    let schema = store.schema_name().to_owned();
    sqlx_query(
        &pool,
        &format!("ALTER TABLE {schema}.outbox ALTER COLUMN version TYPE bigint"),
    )
    .await;
    let mut tx = pool.begin().await.unwrap();
    let e = SeatBooked {
        show: "s1".into(),
        seat: 1,
    };
    outbox.publish(&mut tx, &e).await.unwrap();
    tx.commit().await.unwrap();
    let (_guard, logs) = cqrs_test_support::captured_warnings();
    let relay = OutboxRelay::new(pool.clone(), store.clone(), broker.clone())
        .poll_interval(Duration::from_millis(50))
        .run(CancellationToken::new());
    // It keeps retrying (with backoff) for as long as the row cannot be read: stopped here.
    let stopped = tokio::time::timeout(Duration::from_millis(1500), relay).await;
    assert!(stopped.is_err(), "the relay ended: {stopped:?}");
    let text = logs.text();
    assert!(
        text.contains("outbox relay failed") && text.contains("column 5 (version)"),
        "{text}"
    );
    assert_eq!(store.status(&pool).await.unwrap().depth, 1, "the row stays");
    assert!(broker.messages(&topic).is_empty());
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
    emptied(&store, &pool).await;
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
    // And deleted: killed between the broker's ack and its delete, a's seat 1 is sent again by b
    // (at least once), which this test does not look at (a CI run met it: 3 messages for 2).
    emptied(&store, &pool).await;
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

/// A processor whose handler records each seat in a table of its own, through the inbox; it
/// fails the first attempt at seat 2 after writing (that write must roll back).
async fn seat_counter(
    pool: &PgPool,
    store: &OutboxStore,
    broker: &MemoryBroker,
    topic: &str,
    calls: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> cqrs::RunningProcessor {
    use cqrs::postgres::Inbox;
    use std::sync::atomic::Ordering;
    let table = table(pool, store, "seats", "seat INTEGER NOT NULL").await;
    let inbox = Inbox::new(pool.clone(), store.clone());
    let t = topic.to_owned();
    let mut p = cqrs::EventProcessor::new(broker.clone(), unique("svc"))
        .topics(TopicNamer::new(move |_| t.clone()));
    p.handle(
        "count",
        inbox.once(move |e: SeatBooked, mut tx, ctx: cqrs::Context| {
            let (table, calls) = (table.clone(), calls.clone());
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                cqrs::postgres::sqlx::query(&format!("INSERT INTO {table} (seat) VALUES ($1)"))
                    .bind(e.seat as i32)
                    .execute(&mut *tx)
                    .await?;
                if e.seat == 2 && ctx.attempt() == 1 {
                    return Err("the first attempt at seat 2 fails after its write".into());
                }
                Ok(tx)
            }
        }),
    )
    .unwrap()
    .retry(cqrs::RetryPolicy::attempts(3).backoff(Duration::from_millis(10), 1.0));
    p.start(CancellationToken::new()).await.unwrap()
}

/// `SeatBooked` of show `s1` for each of `seats`, encoded as a bus publishes them (each with an
/// id of its own), for a test to publish as it likes (twice, as a broker redelivers).
fn seats_booked(seats: std::ops::RangeInclusive<u32>) -> Vec<cqrs::Message> {
    let bus = EventBus::new(MemoryBroker::new());
    seats
        .map(|seat| {
            let e = SeatBooked {
                show: "s1".into(),
                seat,
            };
            bus.encode(&e, cqrs::Metadata::now()).unwrap().1
        })
        .collect()
}

/// Waits until `topic` has groups and each has been delivered everything and acked it.
async fn settled(broker: &MemoryBroker, topic: &str) {
    eventually(&format!("every message of {topic} settled"), || {
        let (broker, topic) = (broker.clone(), topic.to_owned());
        async move {
            use cqrs::backend::Subscriber;
            let groups = broker.groups(&topic, "").await.unwrap();
            !groups.is_empty() && groups.iter().all(|g| g.pending == 0 && g.lag == Some(0))
        }
    })
    .await;
}

/// Creates the table `name` (`columns`) in `store`'s schema; returns its qualified name.
async fn table(pool: &PgPool, store: &OutboxStore, name: &str, columns: &str) -> String {
    let table = format!("{}.{name}", store.schema_name());
    sqlx_query(pool, &format!("CREATE TABLE {table} ({columns})")).await;
    table
}

async fn sqlx_query(pool: &PgPool, sql: &str) {
    cqrs::postgres::sqlx::query(sql)
        .execute(pool)
        .await
        .unwrap();
}

async fn seats_in(pool: &PgPool, store: &OutboxStore) -> Vec<i32> {
    cqrs::postgres::sqlx::query_scalar(&format!(
        "SELECT seat FROM {}.seats ORDER BY seat",
        store.schema_name()
    ))
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inbox_runs_a_handler_once_per_message_even_when_it_is_delivered_twice() {
    use cqrs::backend::Publisher;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let pool = pool().await;
    let broker = MemoryBroker::new();
    let topic = unique("seats");
    let (store, _) = outbox(&pool, &broker, &topic).await;
    let calls = std::sync::Arc::new(AtomicUsize::new(0));
    let running = seat_counter(&pool, &store, &broker, &topic, calls.clone()).await;
    // Each message published twice with the same id: as a broker redelivers after a lost ack.
    let messages: Vec<cqrs::Message> = seats_booked(1..=3)
        .into_iter()
        .flat_map(|m| [m.clone(), m])
        .collect();
    broker.publish(&topic, &messages).await.unwrap();
    eventually("every copy handled or skipped, and acked", || {
        let (pool, store, broker, topic) =
            (pool.clone(), store.clone(), broker.clone(), topic.clone());
        async move {
            use cqrs::backend::Subscriber;
            let groups = broker.groups(&topic, "").await.unwrap();
            seats_in(&pool, &store).await.len() >= 3
                && !groups.is_empty()
                && groups.iter().all(|g| g.pending == 0 && g.lag == Some(0))
        }
    })
    .await;
    running.shutdown().await.unwrap();
    // Once each, though delivered twice; seat 2's failed first attempt left nothing behind.
    assert_eq!(seats_in(&pool, &store).await, vec![1, 2, 3]);
    // Seats 1 and 3 once, seat 2 twice (its failed attempt and its retry); the copies never.
    assert_eq!(calls.load(Ordering::SeqCst), 4);
    let purged = store.purge_inbox(&pool, Duration::ZERO).await.unwrap();
    assert_eq!(purged, 3);
}

/// A backend that refuses one topic for good, as a broker refuses a topic it will not create.
#[derive(Clone)]
struct Refusing {
    inner: MemoryBroker,
    refused: String,
}

#[async_trait::async_trait]
impl cqrs::backend::Publisher for Refusing {
    async fn publish(&self, topic: &str, messages: &[cqrs::Message]) -> cqrs::Result<()> {
        if topic == self.refused {
            return Err(cqrs::Error::Config(format!("topic {topic} is refused")));
        }
        self.inner.publish(topic, messages).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_the_broker_refuses_for_good_go_to_the_dead_letters_and_the_others_go_on() {
    let pool = pool().await;
    let broker = MemoryBroker::new();
    let (good, refused) = (unique("seats"), unique("refused"));
    let (store, to_good) = outbox(&pool, &broker, &good).await;
    let r = refused.clone();
    let to_refused = Outbox::new(
        EventBus::new(broker.clone()).topics(TopicNamer::new(move |_| r.clone())),
        store.clone(),
    );
    let mut tx = pool.begin().await.unwrap();
    for seat in 0..6 {
        let e = SeatBooked {
            show: "s1".into(),
            seat,
        };
        let outbox = if seat % 3 == 1 { &to_refused } else { &to_good };
        outbox.publish(&mut tx, &e).await.unwrap();
    }
    tx.commit().await.unwrap();
    let token = CancellationToken::new();
    let relay = tokio::spawn(
        OutboxRelay::new(
            pool.clone(),
            store.clone(),
            Refusing {
                inner: broker.clone(),
                refused: refused.clone(),
            },
        )
        .poll_interval(Duration::from_millis(50))
        .run(token.clone()),
    );
    emptied(&store, &pool).await;
    token.cancel();
    relay.await.unwrap().unwrap();
    assert_eq!(
        seats(&broker, &good),
        [0, 2, 3, 5].map(|s| ("s1".to_owned(), s)).to_vec()
    );
    assert!(broker.messages(&refused).is_empty());
    let dead = store.dead_letters(&pool).await.unwrap();
    assert_eq!(dead.len(), 2, "{dead:?}");
    for (_, topic, reason) in &dead {
        assert_eq!(topic, &refused);
        assert!(reason.contains("is refused"), "{reason}");
    }
    assert_eq!(store.dead_count(&pool).await.unwrap(), 2);

    // The topic accepted now: one redriven by id, then the rest; a relay sends them in order.
    let first = store
        .redrive_dead(&pool, std::slice::from_ref(&dead[0].0))
        .await
        .unwrap();
    assert_eq!(first, 1);
    assert_eq!(store.dead_count(&pool).await.unwrap(), 1);
    assert_eq!(store.redrive_dead(&pool, &[]).await.unwrap(), 1);
    assert_eq!(store.dead_count(&pool).await.unwrap(), 0);
    assert_eq!(store.status(&pool).await.unwrap().depth, 2);
    let token = CancellationToken::new();
    let relay = tokio::spawn(
        OutboxRelay::new(pool.clone(), store.clone(), broker.clone()).run(token.clone()),
    );
    emptied(&store, &pool).await;
    token.cancel();
    relay.await.unwrap().unwrap();
    assert_eq!(
        seats(&broker, &refused),
        [1, 4].map(|s| ("s1".to_owned(), s)).to_vec()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_that_does_not_encode_fails_publish_inside_the_transaction() {
    let pool = pool().await;
    let broker = MemoryBroker::new();
    let (store, outbox) = outbox(&pool, &broker, &unique("seats")).await;
    // JSON cannot encode a map with non-string keys.
    #[derive(Serialize, Deserialize, Event)]
    struct Odd {
        map: BTreeMap<(u8, u8), u8>,
    }
    let mut tx = pool.begin().await.unwrap();
    let e = Odd {
        map: BTreeMap::from([((1, 2), 3)]),
    };
    let err = outbox.publish(&mut tx, &e).await.unwrap_err();
    assert!(matches!(err, cqrs::Error::Encode { .. }), "{err:?}");
    // The transaction is still the caller's to roll back (or to go on with).
    tx.rollback().await.unwrap();
    assert_eq!(store.status(&pool).await.unwrap().depth, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_wakes_at_the_commit_not_at_its_poll() {
    let pool = pool().await;
    let broker = MemoryBroker::new();
    let topic = unique("seats");
    let (store, outbox) = outbox(&pool, &broker, &topic).await;
    let token = CancellationToken::new();
    // A poll longer than the test waits: only the notification can bring the events.
    let relay = tokio::spawn(
        OutboxRelay::new(pool.clone(), store.clone(), broker.clone())
            .poll_interval(Duration::from_secs(600))
            .run(token.clone()),
    );
    for seat in 1..=2 {
        let mut tx = pool.begin().await.unwrap();
        let e = SeatBooked {
            show: "s1".into(),
            seat,
        };
        outbox.publish(&mut tx, &e).await.unwrap();
        tx.commit().await.unwrap();
        eventually("the event relayed after its commit", || {
            let n = broker.messages(&topic).len();
            async move { n == seat as usize }
        })
        .await;
    }
    token.cancel();
    relay.await.unwrap().unwrap();
}

/// The outbox's depth and the age of its oldest message as gauges (`sample_status`, feature
/// `metrics`): 3 waiting with no relay, then 0 once a relay sent them.
#[cfg(feature = "prometheus")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_depth_and_age_are_gauges() {
    let handle = cqrs::prometheus::PrometheusBuilder::new()
        .install_recorder()
        .unwrap();
    let pool = pool().await;
    let broker = MemoryBroker::new();
    let (store, outbox) = outbox(&pool, &broker, &unique("seats")).await;
    let mut tx = pool.begin().await.unwrap();
    for seat in 0..3 {
        let e = SeatBooked {
            show: "s1".into(),
            seat,
        };
        outbox.publish(&mut tx, &e).await.unwrap();
    }
    tx.commit().await.unwrap();
    let token = CancellationToken::new();
    tokio::spawn(cqrs::postgres::sample_status(
        pool.clone(),
        store.clone(),
        Duration::from_millis(20),
        token.clone(),
    ));
    let depth = |n: u32| {
        format!(
            "cqrs_outbox_depth{{schema=\"{}\"}} {n}",
            store.schema_name()
        )
    };
    eventually("the depth shows 3", || {
        let (handle, want) = (handle.clone(), depth(3));
        async move { handle.render().contains(&want) }
    })
    .await;
    assert!(
        handle.render().contains(&format!(
            "cqrs_outbox_oldest{{schema=\"{}\"}}",
            store.schema_name()
        )),
        "{}",
        handle.render()
    );
    tokio::spawn(OutboxRelay::new(pool.clone(), store.clone(), broker.clone()).run(token.clone()));
    eventually("the depth back to 0", || {
        let (handle, want) = (handle.clone(), depth(0));
        async move { handle.render().contains(&want) }
    })
    .await;
    token.cancel();
}

#[derive(Debug, Clone, Serialize, Deserialize, cqrs::Command)]
struct OpenAccount {
    #[command(key)]
    id: String,
    /// Fails after writing its row and storing its event: both must roll back.
    fail_after_write: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
struct AccountOpened {
    #[event(key)]
    id: String,
}

/// A command handler takes its transaction from `Inbox::once`: the aggregate's row and the events
/// it stores through the outbox commit together, or not at all when the handler fails after
/// writing; a command delivered twice (the same message) changes the state once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_handler_commits_its_row_and_its_events_together_once_per_command() {
    use cqrs::backend::Publisher;
    use cqrs::postgres::Inbox;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let pool = pool().await;
    let broker = MemoryBroker::new();
    let events = unique("accounts");
    let (store, outbox) = outbox(&pool, &broker, &events).await;
    let accounts = table(&pool, &store, "accounts", "id TEXT PRIMARY KEY").await;

    let commands = unique("open-account");
    let namer = {
        let commands = commands.clone();
        TopicNamer::new(move |_| commands.clone())
    };
    let calls = std::sync::Arc::new(AtomicUsize::new(0));
    let inbox = Inbox::new(pool.clone(), store.clone());
    let mut p =
        cqrs::CommandProcessor::new(broker.clone(), unique("svc-accounts")).topics(namer.clone());
    let (table, c) = (accounts.clone(), calls.clone());
    p.handle(inbox.once(move |cmd: OpenAccount, mut tx, _ctx| {
        let (table, outbox, calls) = (table.clone(), outbox.clone(), c.clone());
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            cqrs::postgres::sqlx::query(&format!("INSERT INTO {table} (id) VALUES ($1)"))
                .bind(&cmd.id)
                .execute(&mut *tx)
                .await?;
            outbox
                .publish(&mut tx, &AccountOpened { id: cmd.id.clone() })
                .await?;
            if cmd.fail_after_write {
                return Err(cqrs::permanent("the bank is closed"));
            }
            Ok(tx)
        }
    }))
    .unwrap();
    let running = p.start(CancellationToken::new()).await.unwrap();
    let token = CancellationToken::new();
    let relay = tokio::spawn(
        OutboxRelay::new(pool.clone(), store.clone(), broker.clone()).run(token.clone()),
    );

    let bus = cqrs::CommandBus::new(broker.clone()).topics(namer);
    for (id, fail_after_write) in [("a", false), ("closed", true), ("b", false)] {
        bus.send(&OpenAccount {
            id: id.into(),
            fail_after_write,
        })
        .await
        .unwrap();
    }
    // The first command again, as a broker redelivers it after a lost ack.
    let first = broker.messages(&commands)[0].clone();
    broker.publish(&commands, &[first]).await.unwrap();

    settled(&broker, &commands).await;
    emptied(&store, &pool).await;
    running.shutdown().await.unwrap();
    token.cancel();
    relay.await.unwrap().unwrap();

    let rows: Vec<String> =
        cqrs::postgres::sqlx::query_scalar(&format!("SELECT id FROM {accounts} ORDER BY id"))
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(rows, ["a", "b"], "the failed command's row rolled back");
    let opened: Vec<String> = broker
        .messages(&events)
        .iter()
        .map(|m| {
            serde_json::from_slice::<AccountOpened>(&m.payload)
                .unwrap()
                .id
        })
        .collect();
    assert_eq!(opened, ["a", "b"], "its event too, and the copy made none");
    assert_eq!(calls.load(Ordering::SeqCst), 3, "the copy never ran");
}

/// `Inbox::once_batch`: a batch's events take effect once per group, though each is delivered
/// twice (in one batch or two); a batch whose handler fails after its writes rolls back whole
/// and is retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_batch_inbox_runs_each_event_once_even_when_it_is_delivered_twice() {
    use cqrs::backend::Publisher;
    use cqrs::postgres::Inbox;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let pool = pool().await;
    let broker = MemoryBroker::new();
    let topic = unique("seats");
    let (store, _) = outbox(&pool, &broker, &topic).await;
    let table = table(&pool, &store, "seats", "seat INTEGER NOT NULL").await;
    let inbox = Inbox::new(pool.clone(), store.clone());
    let t = topic.clone();
    let mut p = cqrs::EventProcessor::new(broker.clone(), unique("svc"))
        .topics(TopicNamer::new(move |_| t.clone()));
    // Every event the handler got, and how many batches failed after writing.
    let handled = std::sync::Arc::new(AtomicUsize::new(0));
    let failed = std::sync::Arc::new(AtomicUsize::new(0));
    let (h, f) = (handled.clone(), failed.clone());
    p.handle_batch(
        "count",
        inbox.once_batch(move |batch: Vec<(SeatBooked, cqrs::Context)>, mut tx| {
            let (table, handled, failed) = (table.clone(), h.clone(), f.clone());
            async move {
                handled.fetch_add(batch.len(), Ordering::SeqCst);
                let seats: Vec<i32> = batch.iter().map(|(e, _)| e.seat as i32).collect();
                cqrs::postgres::sqlx::query(&format!(
                    "INSERT INTO {table} SELECT unnest($1::int[])"
                ))
                .bind(&seats)
                .execute(&mut *tx)
                .await?;
                // The first batch holding seat 2 fails after its writes.
                if seats.contains(&2) && failed.fetch_add(1, Ordering::SeqCst) == 0 {
                    let mut e = cqrs::BatchError::none();
                    e.fail(0, "the first batch with seat 2 fails after its writes");
                    return Err(e);
                }
                Ok(tx)
            }
        }),
    )
    .unwrap()
    .batch_size(4)
    .retry(cqrs::RetryPolicy::attempts(3).backoff(Duration::from_millis(10), 1.0));
    let running = p.start(CancellationToken::new()).await.unwrap();

    let messages = seats_booked(1..=5);
    // 1 2 3 4 | 5 1 2 3 | 4 5 ...: copies in the same batch and in later ones.
    let mut twice = messages.clone();
    twice.extend(messages);
    broker.publish(&topic, &twice).await.unwrap();
    settled(&broker, &topic).await;
    running.shutdown().await.unwrap();
    assert_eq!(seats_in(&pool, &store).await, vec![1, 2, 3, 4, 5]);
    assert_eq!(
        failed.load(Ordering::SeqCst),
        2,
        "seat 2's batch failed once, then passed"
    );
    let purged = store.purge_inbox(&pool, Duration::ZERO).await.unwrap();
    assert_eq!(purged, 5);
    // The copies never reached the handler: 5 events, and the failed batch's again.
    let failed_batch = handled.load(Ordering::SeqCst) - 5;
    assert!(
        (1..=4).contains(&failed_batch),
        "{failed_batch} handled twice"
    );
}

/// The test kit with the outbox: a command handler's events wait in the outbox until the relay
/// sends them; `run_until_idle` waits for that too (`idle_when`), then for their handler.
#[cfg(feature = "testing")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_test_kit_waits_for_the_outbox_and_what_its_events_cause() {
    use cqrs::postgres::Inbox;
    use cqrs::testing::TestKit;
    let pool = pool().await;
    let mut kit = TestKit::new();
    let schema = unique("kit").replace('-', "_");
    let store = OutboxStore::new().schema(&schema).unwrap();
    store.migrate(&pool).await.unwrap();
    let accounts = table(&pool, &store, "accounts", "id TEXT PRIMARY KEY").await;
    let outbox = Outbox::new(EventBus::new(kit.broker()), store.clone());

    let inbox = Inbox::new(pool.clone(), store.clone());
    let mut commands = cqrs::CommandProcessor::new(kit.broker(), "svc-accounts");
    let table = accounts.clone();
    commands
        .handle(inbox.once(move |cmd: OpenAccount, mut tx, _ctx| {
            let (table, outbox) = (table.clone(), outbox.clone());
            async move {
                cqrs::postgres::sqlx::query(&format!("INSERT INTO {table} (id) VALUES ($1)"))
                    .bind(&cmd.id)
                    .execute(&mut *tx)
                    .await?;
                outbox
                    .publish(&mut tx, &AccountOpened { id: cmd.id })
                    .await?;
                if cmd.fail_after_write {
                    return Err(cqrs::permanent("the bank is closed"));
                }
                Ok(tx)
            }
        }))
        .unwrap();
    let mut events = cqrs::EventProcessor::new(kit.broker(), "svc-mail");
    events
        .handle("welcome", |_: AccountOpened| async { Ok::<_, String>(()) })
        .unwrap();
    kit.start(commands).await.unwrap();
    kit.start(events).await.unwrap();
    let token = CancellationToken::new();
    // A relay that starts late (busy, or its replica restarting): the events wait in the
    // outbox meanwhile, where only `idle_when` sees them.
    let late = OutboxRelay::new(pool.clone(), store.clone(), kit.broker());
    let t = token.clone();
    let relay = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        late.run(t).await
    });
    let (p, s) = (pool.clone(), store.clone());
    kit.idle_when("the outbox is sent", move || {
        let (pool, store) = (p.clone(), s.clone());
        Box::pin(async move { store.status(&pool).await.is_ok_and(|s| s.depth == 0) })
    });

    let bus = cqrs::CommandBus::new(kit.broker());
    for (id, fail_after_write) in [("a", false), ("closed", true), ("b", false)] {
        bus.send(&OpenAccount {
            id: id.into(),
            fail_after_write,
        })
        .await
        .unwrap();
    }
    kit.run_until_idle().await;

    let opened = |v: Vec<AccountOpened>| v.into_iter().map(|e| e.id).collect::<Vec<_>>();
    assert_eq!(opened(kit.published::<AccountOpened>()), ["a", "b"]);
    assert_eq!(opened(kit.handled::<AccountOpened>("welcome")), ["a", "b"]);
    assert_eq!(
        kit.dead_letter("OpenAccount", "the bank is closed")
            .attempts,
        1
    );
    token.cancel();
    relay.await.unwrap().unwrap();
    kit.shutdown().await.unwrap();
}
