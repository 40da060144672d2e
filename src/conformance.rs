//! The behaviours every backend must show, generic over the backend traits.
//!
//! A backend proves itself by running the whole suite in its tests:
//!
//! ```ignore
//! cqrs::conformance_suite!(async { my_backend::connect("...").await.unwrap() });
//! ```
//!
//! A backend whose broker counts no deliveries (Kafka) says so, and its claimed messages are
//! expected at attempt 1 instead of 2: `conformance_suite!(make_backend(), uncounted)`.
//!
//! The macro expands to one `#[tokio::test]` per behaviour (the calling crate needs `tokio` with
//! the `macros` and `rt-multi-thread` features). Every test uses fresh random topic and group
//! names, so the tests run in parallel against one broker. Each function here is also public, to
//! run one behaviour on its own.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::backend::{Backend, Consumer, Delivery, StartFrom, Subscription};
use crate::Message;

/// How long a test waits for something that should happen.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// How long a test watches for something that should not happen.
pub const QUIET: Duration = Duration::from_millis(700);

/// A fresh name with `prefix`, unique across processes and test runs.
pub fn unique(prefix: &str) -> String {
    let id = uuid::Uuid::now_v7().simple().to_string();
    format!("{prefix}-{}", &id[id.len() - 12..])
}

/// `n` JSON messages named `Ping` whose payloads are `0`, `1`, ... with keys from `key`.
pub fn messages(n: usize, key: impl Fn(usize) -> Option<String>) -> Vec<Message> {
    (0..n)
        .map(|i| {
            let mut m =
                Message::new("Ping", i.to_string().into_bytes()).with_key(key(i).map(Into::into));
            m.metadata.content_type = "application/json".into();
            m
        })
        .collect()
}

fn payload(d: &Delivery) -> String {
    String::from_utf8_lossy(&d.message().payload).into_owned()
}

/// Receives until `n` deliveries arrived; panics after [`PATIENCE`].
pub async fn receive_n(consumer: &mut dyn Consumer, n: usize) -> Vec<Delivery> {
    let mut out = Vec::new();
    let gathered = tokio::time::timeout(PATIENCE, async {
        while out.len() < n {
            let batch = consumer
                .receive(n - out.len())
                .await
                .expect("receive failed");
            out.extend(batch);
        }
    })
    .await;
    assert!(
        gathered.is_ok(),
        "expected {n} deliveries, got {} within {PATIENCE:?}",
        out.len()
    );
    out
}

/// Asserts that nothing is delivered for [`QUIET`].
pub async fn receive_none(consumer: &mut dyn Consumer) {
    if let Ok(r) = tokio::time::timeout(QUIET, consumer.receive(10)).await {
        let got: Vec<String> = r
            .expect("receive failed")
            .iter()
            .map(|d| {
                format!(
                    "{} (attempt {}, {} {})",
                    payload(d),
                    d.attempt(),
                    d.topic(),
                    d.broker_id()
                )
            })
            .collect();
        panic!("expected no delivery, got {got:?}");
    }
}

async fn ack(deliveries: Vec<Delivery>) {
    Delivery::ack_all(deliveries)
        .await
        .map_err(|(e, _)| e)
        .expect("ack failed");
}

async fn subscribe<B: Backend>(backend: &B, subscription: Subscription) -> Box<dyn Consumer> {
    backend
        .subscribe(&subscription)
        .await
        .expect("subscribe failed")
}

/// Messages published before a group starts from the beginning reach it, in order, with their
/// fields intact; once acked they are not delivered again.
pub async fn publish_subscribe<B: Backend>(backend: B) {
    let topic = unique("conf-pubsub");
    let group = unique("g");
    let mut sent = messages(3, |i| Some(format!("k{i}")));
    sent[0].metadata = sent[0]
        .metadata
        .clone()
        .correlation_id("corr-1")
        .causation_id("cause-1")
        .header("tenant", "acme");
    sent[0].metadata.content_type = "application/msgpack".into();
    sent[0].version = 3;
    sent[1].metadata.created_at -= 3_600_000;
    backend
        .publish(&topic, &sent)
        .await
        .expect("publish failed");

    let mut consumer = subscribe(&backend, Subscription::new(&group, [&topic])).await;
    let mut got = receive_n(&mut *consumer, 3).await;
    // Three keys: order is only kept per key, so compare in publishing order.
    got.sort_by_key(payload);
    // A backend may carry the creation time at millisecond precision of its own clock when it
    // is within a second of publishing (Redis: the entry id); older times travel exactly.
    let received: Vec<Message> = got
        .iter()
        .zip(&sent)
        .map(|(d, s)| {
            let mut m = d.message().clone();
            let drift = m.metadata.created_at.abs_diff(s.metadata.created_at);
            assert!(drift < 1000, "created-at drifted by {drift} ms");
            m.metadata.created_at = s.metadata.created_at;
            m
        })
        .collect();
    assert_eq!(received, sent);
    assert_eq!(
        got[1].message().metadata.created_at,
        sent[1].metadata.created_at
    );
    assert!(got.iter().all(|d| d.attempt() == 1 && d.topic() == topic));
    ack(got).await;

    let mut again = subscribe(
        &backend,
        Subscription::new(&group, [&topic]).claim_idle(Some(Duration::from_millis(100))),
    )
    .await;
    receive_none(&mut *again).await;
}

/// Two groups each receive every message.
pub async fn fan_out_to_groups<B: Backend>(backend: B) {
    let topic = unique("conf-fanout");
    backend
        .publish(&topic, &messages(10, |_| None))
        .await
        .expect("publish failed");
    for group in [unique("ga"), unique("gb")] {
        let mut consumer = subscribe(&backend, Subscription::new(&group, [&topic])).await;
        let got = receive_n(&mut *consumer, 10).await;
        let mut payloads: Vec<usize> = got
            .iter()
            .map(|d| payload(d).parse().expect("a number"))
            .collect();
        payloads.sort_unstable();
        assert_eq!(payloads, (0..10).collect::<Vec<_>>());
        ack(got).await;
    }
}

/// Two members of one group share the messages: each is delivered to one member, once. (The
/// messages have distinct keys, so that a partitioned backend spreads them.)
pub async fn members_share_the_work<B: Backend>(backend: B) {
    let topic = unique("conf-share");
    let group = unique("g");
    let n = 60;
    let mut a = subscribe(&backend, Subscription::new(&group, [&topic])).await;
    let mut b = subscribe(&backend, Subscription::new(&group, [&topic])).await;
    backend
        .publish(&topic, &messages(n, |i| Some(format!("k{i}"))))
        .await
        .expect("publish failed");
    let (mut seen_a, mut seen_b) = (Vec::new(), Vec::new());
    let shared = tokio::time::timeout(PATIENCE, async {
        while seen_a.len() + seen_b.len() < n {
            for (consumer, seen) in [(&mut a, &mut seen_a), (&mut b, &mut seen_b)] {
                if let Ok(r) =
                    tokio::time::timeout(Duration::from_millis(200), consumer.receive(5)).await
                {
                    let batch = r.expect("receive failed");
                    seen.extend(batch.iter().map(payload));
                    ack(batch).await;
                }
            }
        }
    })
    .await;
    assert!(
        shared.is_ok(),
        "only {} of {n} delivered",
        seen_a.len() + seen_b.len()
    );
    let all: HashSet<&String> = seen_a.iter().chain(&seen_b).collect();
    assert_eq!(all.len(), n, "a message was delivered twice");
    assert_eq!(
        seen_a.len() + seen_b.len(),
        n,
        "a message was delivered twice"
    );
    assert!(
        !seen_a.is_empty() && !seen_b.is_empty(),
        "one member got everything: {} / {}",
        seen_a.len(),
        seen_b.len()
    );
}

/// A nacked message comes back with a higher attempt count.
pub async fn nack_redelivers<B: Backend>(backend: B) {
    let topic = unique("conf-nack");
    let group = unique("g");
    backend
        .publish(&topic, &messages(1, |_| None))
        .await
        .expect("publish failed");
    let mut consumer = subscribe(&backend, Subscription::new(&group, [&topic])).await;
    let first = receive_n(&mut *consumer, 1).await.remove(0);
    let id = first.message().id.clone();
    assert_eq!(first.attempt(), 1);
    first
        .nack(Duration::from_millis(50))
        .await
        .map_err(|(e, _)| e)
        .expect("nack failed");
    let second = receive_n(&mut *consumer, 1).await.remove(0);
    assert_eq!(second.message().id, id);
    assert_eq!(second.attempt(), 2);
    ack(vec![second]).await;
    receive_none(&mut *consumer).await;
}

/// What a member took and never acked (it stopped) reaches another member of the group, as
/// its second delivery (brokers that count deliveries: Redis, in-memory).
pub async fn stopped_member_work_is_claimed<B: Backend>(backend: B) {
    stopped_member_work_reaches_another(backend, 2).await;
}

/// Like [`stopped_member_work_is_claimed`], for brokers without delivery counts (Kafka), where
/// a partition's new owner starts counting again at 1.
pub async fn stopped_member_work_is_claimed_uncounted<B: Backend>(backend: B) {
    stopped_member_work_reaches_another(backend, 1).await;
}

async fn stopped_member_work_reaches_another<B: Backend>(backend: B, attempt: u32) {
    let topic = unique("conf-claim");
    let group = unique("g");
    backend
        .publish(&topic, &messages(5, |_| None))
        .await
        .expect("publish failed");
    let mut dead = subscribe(
        &backend,
        Subscription::new(&group, [&topic]).claim_idle(None),
    )
    .await;
    let taken = receive_n(&mut *dead, 5).await;
    assert_eq!(taken.len(), 5);
    drop(taken);
    drop(dead);

    let mut survivor = subscribe(
        &backend,
        Subscription::new(&group, [&topic]).claim_idle(Some(Duration::from_millis(300))),
    )
    .await;
    let got = receive_n(&mut *survivor, 5).await;
    let mut payloads: Vec<String> = got.iter().map(payload).collect();
    payloads.sort();
    assert_eq!(payloads, ["0", "1", "2", "3", "4"]);
    let attempts: Vec<u32> = got.iter().map(Delivery::attempt).collect();
    assert_eq!(
        attempts, [attempt; 5],
        "attempt numbers of the claimed deliveries"
    );
    ack(got).await;
    receive_none(&mut *survivor).await;
}

/// A delivery dropped without an ack or a nack (its handler was stopped, its ack failed for
/// good) is delivered again to the same member, without waiting for another member to claim it.
pub async fn dropped_delivery_comes_back<B: Backend>(backend: B) {
    let topic = unique("conf-dropped");
    let group = unique("g");
    backend
        .publish(&topic, &messages(1, |_| None))
        .await
        .expect("publish failed");
    let mut consumer = subscribe(
        &backend,
        Subscription::new(&group, [&topic]).claim_idle(None),
    )
    .await;
    let first = receive_n(&mut *consumer, 1).await.remove(0);
    let id = first.message().id.clone();
    drop(first);
    let again = receive_n(&mut *consumer, 1).await.remove(0);
    assert_eq!(again.message().id, id);
    ack(vec![again]).await;
    receive_none(&mut *consumer).await;
}

/// A `receive` dropped while it waits (a shutdown, a `select!`) loses nothing: a message that
/// arrives afterwards is delivered by the next `receive`.
pub async fn dropped_receive_loses_nothing<B: Backend>(backend: B) {
    let topic = unique("conf-dropped-receive");
    let group = unique("g");
    let mut consumer = subscribe(
        &backend,
        Subscription::new(&group, [&topic]).claim_idle(None),
    )
    .await;
    let waited = tokio::time::timeout(Duration::from_millis(300), consumer.receive(10)).await;
    assert!(waited.is_err(), "nothing was published yet");
    backend
        .publish(&topic, &messages(1, |_| None))
        .await
        .expect("publish failed");
    let got = receive_n(&mut *consumer, 1).await;
    assert_eq!(payload(&got[0]), "0");
    ack(got).await;
}

/// Messages with one key arrive in the order they were published.
pub async fn order_kept_per_key<B: Backend>(backend: B) {
    let topic = unique("conf-order");
    let group = unique("g");
    let n = 100;
    let sent = messages(n, |i| Some(format!("key-{}", i % 3)));
    for chunk in sent.chunks(10) {
        backend
            .publish(&topic, chunk)
            .await
            .expect("publish failed");
    }
    let mut consumer = subscribe(&backend, Subscription::new(&group, [&topic])).await;
    let got = receive_n(&mut *consumer, n).await;
    let mut per_key: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for d in &got {
        let i: usize = payload(d).parse().expect("payload is a number");
        per_key
            .entry(d.message().key.as_deref().unwrap_or_default().to_owned())
            .or_default()
            .push(i);
    }
    assert_eq!(per_key.len(), 3);
    for (key, seq) in per_key {
        let mut sorted = seq.clone();
        sorted.sort_unstable();
        assert_eq!(seq, sorted, "order broken for {key}");
    }
    ack(got).await;
}

/// A new group starting from the beginning reads old messages; one starting from the latest
/// reads only what is published after it was created.
pub async fn start_positions<B: Backend>(backend: B) {
    let topic = unique("conf-start");
    let key = || Some("one-key".to_owned());
    backend
        .publish(&topic, &messages(3, |_| key()))
        .await
        .expect("publish failed");
    let mut early = subscribe(&backend, Subscription::new(unique("early"), [&topic])).await;
    let mut late = subscribe(
        &backend,
        Subscription::new(unique("late"), [&topic]).start(StartFrom::Latest),
    )
    .await;
    let new = vec![Message::new("Ping", b"new".to_vec()).with_key(key().map(Into::into))];
    backend.publish(&topic, &new).await.expect("publish failed");

    let got = receive_n(&mut *early, 4).await;
    let payloads: Vec<String> = got.iter().map(payload).collect();
    assert_eq!(payloads, ["0", "1", "2", "new"]);
    ack(got).await;

    let got = receive_n(&mut *late, 1).await;
    assert_eq!(payload(&got[0]), "new");
    ack(got).await;
    receive_none(&mut *late).await;
}

/// A member that closes without acking and reopens under its name gets its messages back; what
/// it acked stays acked.
pub async fn close_and_reopen<B: Backend>(backend: B) {
    let topic = unique("conf-reopen");
    let group = unique("g");
    let name = unique("member");
    let key = || Some("one-key".to_owned());
    backend
        .publish(&topic, &messages(4, |_| key()))
        .await
        .expect("publish failed");
    let subscription = Subscription::new(&group, [&topic])
        .consumer(&name)
        .claim_idle(None);
    let mut consumer = subscribe(&backend, subscription.clone()).await;
    let mut got = receive_n(&mut *consumer, 4).await;
    let unacked = got.split_off(2);
    ack(got).await;
    drop(unacked);
    consumer.close().await.expect("close failed");
    drop(consumer);

    let mut reopened = subscribe(&backend, subscription).await;
    let got = receive_n(&mut *reopened, 2).await;
    let payloads: Vec<String> = got.iter().map(payload).collect();
    assert_eq!(payloads, ["2", "3"]);
    ack(got).await;
    backend
        .publish(
            &topic,
            &[Message::new("Ping", b"4".to_vec()).with_key(key().map(Into::into))],
        )
        .await
        .expect("publish failed");
    let got = receive_n(&mut *reopened, 1).await;
    assert_eq!(payload(&got[0]), "4");
    ack(got).await;
    receive_none(&mut *reopened).await;
}

/// Many tasks publishing at once lose nothing and duplicate nothing.
pub async fn concurrent_publishers<B: Backend + Clone>(backend: B) {
    let topic = unique("conf-concurrent");
    let group = unique("g");
    let tasks: Vec<_> = (0..8)
        .map(|t| {
            let backend = backend.clone();
            let topic = topic.clone();
            tokio::spawn(async move {
                for i in 0..25 {
                    let m = Message::new("Ping", format!("{t}-{i}").into_bytes());
                    backend.publish(&topic, &[m]).await.expect("publish failed");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("publisher task panicked");
    }
    let mut consumer = subscribe(&backend, Subscription::new(&group, [&topic])).await;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, async {
        while got.len() < 200 {
            got.extend(
                consumer
                    .receive(200 - got.len())
                    .await
                    .expect("receive failed"),
            );
        }
    })
    .await;
    let unique_payloads: HashSet<String> = got.iter().map(payload).collect();
    if unique_payloads.len() != 200 || got.len() != 200 {
        // Which ones, and where the others came from: the tail of each publisher's, or the
        // records of one place in the log (a partition's offsets)?
        let missing: Vec<String> = (0..8)
            .flat_map(|t| (0..25).map(move |i| format!("{t}-{i}")))
            .filter(|p| !unique_payloads.contains(p))
            .collect();
        let mut seen: Vec<String> = got
            .iter()
            .map(|d| format!("{}@{}", payload(d), d.broker_id()))
            .collect();
        seen.sort();
        panic!(
            "{} deliveries, {} distinct, within {PATIENCE:?}; missing {missing:?}; received {seen:?}",
            got.len(),
            unique_payloads.len()
        );
    }
    ack(got).await;
    receive_none(&mut *consumer).await;
}

/// Through the processor: a handler that keeps failing is retried up to the limit, then its
/// message lands on the dead-letter topic with the reason; a payload that does not decode goes
/// there at once.
pub async fn retries_then_dead_letter<B: Backend + Clone>(backend: B) {
    use crate::processor::{dead_letter_headers as h, RetryPolicy};

    #[derive(serde::Serialize, serde::Deserialize)]
    struct Doomed {
        n: u32,
    }
    impl crate::Event for Doomed {
        const NAME: &'static str = "Doomed";
    }

    let service = unique("svc");
    let topic = unique("conf-dlq");
    let dlq = unique("conf-dead");
    let calls = Arc::new(AtomicU32::new(0));
    let namer = crate::TopicNamer::new({
        let topic = topic.clone();
        move |_| topic.clone()
    });
    let mut processor = crate::EventProcessor::new(backend.clone(), &service).topics(namer.clone());
    let counter = calls.clone();
    processor
        .handle("always-fails", move |_: Doomed| {
            counter.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), _>("the seat map is locked") }
        })
        .expect("register")
        .retry(RetryPolicy::attempts(3).backoff(Duration::from_millis(20), 2.0))
        .dead_letter_topic(&dlq);
    let token = crate::CancellationToken::new();
    let running = processor.start(token.clone()).await.expect("start");

    let bus = crate::EventBus::new(backend.clone()).topics(namer);
    bus.publish(&Doomed { n: 1 }).await.expect("publish");
    let mut garbage = Message::new("Doomed", b"{not json".to_vec());
    garbage.metadata.content_type = "application/json".into();
    backend.publish(&topic, &[garbage]).await.expect("publish");

    let mut dead = subscribe(&backend, Subscription::new(unique("dlq-reader"), [&dlq])).await;
    let got = receive_n(&mut *dead, 2).await;
    let failed = got
        .iter()
        .find(|d| d.message().payload[..] != *b"{not json")
        .expect("the failing message is dead-lettered");
    let headers = &failed.message().metadata.headers;
    assert_eq!(headers[h::REASON], "the seat map is locked");
    assert_eq!(headers[h::ATTEMPTS], "3");
    assert_eq!(headers[h::HANDLER], "always-fails");
    assert_eq!(headers[h::TOPIC], topic);
    assert_eq!(calls.load(Ordering::SeqCst), 3);

    let undecodable = got
        .iter()
        .find(|d| d.message().payload[..] == *b"{not json")
        .expect("the undecodable message is dead-lettered");
    let headers = &undecodable.message().metadata.headers;
    assert_eq!(headers[h::ATTEMPTS], "1", "decode errors are not retried");
    assert!(
        headers[h::REASON].starts_with("failed to decode `Doomed` with the application/json codec"),
        "{}",
        headers[h::REASON]
    );
    ack(got).await;
    running.shutdown().await.expect("shutdown");
}

/// Runs one behaviour with a backend made by `make`.
pub async fn run<B, F, Fut>(make: F, behaviour: fn(B) -> Fut)
where
    F: Future<Output = B>,
    Fut: Future<Output = ()>,
{
    behaviour(make.await).await;
}

/// Expands to one `#[tokio::test]` per conformance behaviour, each with a backend from `$make`
/// (an expression evaluating to a future of the backend).
#[macro_export]
macro_rules! conformance_suite {
    ($make:expr) => {
        $crate::conformance_suite!(@common $make);
        $crate::conformance_suite!(@tests $make; stopped_member_work_is_claimed);
    };
    // Brokers without delivery counts (Kafka): a claimed message starts again at attempt 1.
    ($make:expr, uncounted) => {
        $crate::conformance_suite!(@common $make);
        $crate::conformance_suite!(@tests $make; stopped_member_work_is_claimed_uncounted);
    };
    (@common $make:expr) => {
        $crate::conformance_suite!(@tests $make;
            publish_subscribe, fan_out_to_groups, members_share_the_work, nack_redelivers,
            order_kept_per_key, start_positions, close_and_reopen, concurrent_publishers,
            retries_then_dead_letter, dropped_delivery_comes_back, dropped_receive_loses_nothing);
    };
    (@tests $make:expr; $($name:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                $crate::conformance::run($make, $crate::conformance::$name).await;
            }
        )*
    };
}
