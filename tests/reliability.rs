//! At-least-once and at-most-once defects, each caught by a test that failed before its fix:
//! retries and order per key, permanent errors behind wrappers, at-most-once shutdown, transient
//! errors at start, errors of several groups, retention of the
//! in-memory broker.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use common::{eventually, keyed, Keyed, WAIT};
use cqrs::backend::{Consumer, Delivery, Publisher, Subscriber, Subscription};
use cqrs::memory::MemoryBroker;
use cqrs::processor::dead_letter_headers as dlq;
use cqrs::{
    permanent, BoxError, CancellationToken, Context, Error, EventBus, EventProcessor, Message,
    RestartPolicy, RetryPolicy,
};

mod common;

/// One message of a key fails once; the key's later messages must wait for its retry.
async fn retried_message_keeps_its_place(concurrency: usize) {
    let broker = MemoryBroker::new();
    let seen: Arc<Mutex<BTreeMap<String, Vec<u32>>>> = Arc::default();
    let failed_once = Arc::new(AtomicUsize::new(0));
    let mut p = EventProcessor::new(broker.clone(), "svc");
    let (s, f) = (seen.clone(), failed_once.clone());
    p.handle("ordered", move |e: Keyed| {
        let r = if e.seq % 10 == 3 && f.fetch_add(1, Ordering::SeqCst) < 4 {
            Err(format!("{} not yet", e.seq))
        } else {
            s.lock().unwrap().entry(e.key).or_default().push(e.seq);
            Ok(())
        };
        std::future::ready(r)
    })
    .unwrap()
    .concurrency(concurrency)
    .retry(RetryPolicy::attempts(5).backoff(Duration::from_millis(30), 1.0));
    EventBus::new(broker.clone())
        .publish_all(&keyed(40, 2))
        .await
        .unwrap();
    let running = p.start(CancellationToken::new()).await.unwrap();
    eventually("all handled", || {
        seen.lock().unwrap().values().map(Vec::len).sum::<usize>() == 40
    })
    .await;
    running.shutdown().await.unwrap();
    for (key, seqs) in seen.lock().unwrap().iter() {
        let mut sorted = seqs.clone();
        sorted.sort_unstable();
        assert_eq!(seqs, &sorted, "order of {key} broken by a retry");
    }
    assert!(failed_once.load(Ordering::SeqCst) >= 4, "retries happened");
}

#[tokio::test]
async fn order_per_key_holds_when_a_message_is_retried_concurrently() {
    retried_message_keeps_its_place(4).await;
}

#[tokio::test]
async fn order_holds_when_a_message_is_retried_inline() {
    retried_message_keeps_its_place(1).await;
}

#[derive(Debug, thiserror::Error)]
#[error("charging the card")]
struct Wrapped(#[source] BoxError);

#[tokio::test]
async fn an_error_wrapping_a_permanent_one_is_dead_lettered_at_once() {
    let broker = MemoryBroker::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let mut p = EventProcessor::new(broker.clone(), "svc");
    let c = calls.clone();
    p.handle("charge", move |_: Keyed| {
        c.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Err::<(), _>(Wrapped(permanent("card expired"))))
    })
    .unwrap()
    .retry(RetryPolicy::attempts(5).backoff(Duration::from_millis(10), 1.0));
    let running = p.start(CancellationToken::new()).await.unwrap();
    EventBus::new(broker.clone())
        .publish(&keyed(1, 1)[0])
        .await
        .unwrap();
    eventually("the dead letter", || {
        broker.messages("svc.charge.dead-letter").len() == 1
    })
    .await;
    running.shutdown().await.unwrap();
    let dead = &broker.messages("svc.charge.dead-letter")[0];
    assert_eq!(
        dead.metadata.headers[dlq::REASON],
        "charging the card: card expired"
    );
    assert_eq!(dead.metadata.headers[dlq::ATTEMPTS], "1");
    assert_eq!(calls.load(Ordering::SeqCst), 1, "not retried");
}

/// Under at-most-once, a batch is acked before it is handled: shutdown must handle what it
/// acked (within the deadline), not drop it.
async fn at_most_once_shutdown_handles_what_was_acked(concurrency: usize) {
    let broker = MemoryBroker::new();
    let handled = Arc::new(Mutex::new(Vec::new()));
    let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut p = EventProcessor::new(broker.clone(), "svc");
    let h = handled.clone();
    p.handle("audit", move |e: Keyed| {
        let (h, tx) = (h.clone(), started_tx.clone());
        async move {
            let _ = tx.send(());
            tokio::time::sleep(Duration::from_millis(20)).await;
            h.lock().unwrap().push(e.seq);
            Ok::<_, String>(())
        }
    })
    .unwrap()
    .at_most_once()
    .concurrency(concurrency)
    .batch_size(10)
    .shutdown_timeout(Duration::from_secs(5));
    // One key: every message waits in one lane behind the first.
    EventBus::new(broker.clone())
        .publish_all(&keyed(10, 1))
        .await
        .unwrap();
    let running = p.start(CancellationToken::new()).await.unwrap();
    tokio::time::timeout(WAIT, started.recv()).await.unwrap();
    running.shutdown().await.unwrap();
    assert!(
        broker.pending("Keyed", "svc.audit").is_empty(),
        "acked before handling"
    );
    let handled = handled.lock().unwrap().clone();
    assert_eq!(
        handled,
        (0..10).collect::<Vec<_>>(),
        "every acked message was handled before shutdown returned"
    );
}

#[tokio::test]
async fn at_most_once_shutdown_handles_acked_messages_inline() {
    at_most_once_shutdown_handles_what_was_acked(1).await;
}

#[tokio::test]
async fn at_most_once_shutdown_handles_acked_messages_in_lanes() {
    at_most_once_shutdown_handles_what_was_acked(4).await;
}

/// A backend whose `subscribe` fails a number of times first, then works (or fails for good),
/// and whose consumers can be made to fail.
#[derive(Clone)]
struct Flaky {
    inner: MemoryBroker,
    failures_left: Arc<AtomicUsize>,
    retryable: bool,
    consumers_fail: bool,
}

#[async_trait]
impl Publisher for Flaky {
    async fn publish(&self, topic: &str, messages: &[Message]) -> cqrs::Result<()> {
        self.inner.publish(topic, messages).await
    }
}

#[async_trait]
impl Subscriber for Flaky {
    async fn subscribe(&self, s: &Subscription) -> cqrs::Result<Box<dyn Consumer>> {
        let left = self.failures_left.load(Ordering::SeqCst);
        if left > 0 {
            self.failures_left.store(left - 1, Ordering::SeqCst);
            let cause = std::io::Error::from(std::io::ErrorKind::BrokenPipe);
            return Err(if self.retryable {
                Error::retryable("XGROUP CREATE", cause)
            } else {
                Error::fatal("authentication", cause)
            });
        }
        if self.consumers_fail {
            return Ok(Box::new(Failing(s.group.clone())));
        }
        self.inner.subscribe(s).await
    }
}

struct Failing(String);

#[async_trait]
impl Consumer for Failing {
    async fn receive(&mut self, _max: usize) -> cqrs::Result<Vec<Delivery>> {
        Err(Error::fatal(
            format!("reading for {}", self.0),
            std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        ))
    }
}

fn flaky(failures: usize, retryable: bool, consumers_fail: bool) -> Flaky {
    Flaky {
        inner: MemoryBroker::new(),
        failures_left: Arc::new(AtomicUsize::new(failures)),
        retryable,
        consumers_fail,
    }
}

#[tokio::test]
async fn start_retries_transient_errors() {
    let backend = flaky(3, true, false);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u32>();
    let mut p = EventProcessor::new(backend.clone(), "svc");
    p.handle("h", move |e: Keyed| std::future::ready(tx.send(e.seq)))
        .unwrap();
    let running = tokio::time::timeout(WAIT, p.start(CancellationToken::new()))
        .await
        .expect("start gave up")
        .expect("a transient error failed the start");
    assert_eq!(backend.failures_left.load(Ordering::SeqCst), 0);
    EventBus::new(backend)
        .publish(&keyed(1, 1)[0])
        .await
        .unwrap();
    assert_eq!(
        tokio::time::timeout(WAIT, rx.recv()).await.unwrap(),
        Some(0)
    );
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn start_fails_at_once_on_permanent_errors() {
    let backend = flaky(1, false, false);
    let mut p = EventProcessor::new(backend, "svc");
    p.handle("h", |_: Keyed| std::future::ready(Ok::<_, String>(())))
        .unwrap();
    let err = tokio::time::timeout(WAIT, p.start(CancellationToken::new()))
        .await
        .expect("a permanent error must not be retried")
        .unwrap_err();
    assert!(err.to_string().contains("authentication"), "{err}");
}

#[tokio::test]
async fn wait_reports_every_failed_group() {
    let backend = flaky(0, true, true);
    let mut p = EventProcessor::new(backend, "svc");
    p.handle("first", |_: Keyed| std::future::ready(Ok::<_, String>(())))
        .unwrap();
    p.handle("second", |_: Keyed, _: Context| {
        std::future::ready(Ok::<_, String>(()))
    })
    .unwrap();
    let running = p.start(CancellationToken::new()).await.unwrap();
    let err = cqrs_test_support::failure(running, WAIT).await;
    let Error::Groups(groups) = &err else {
        panic!("expected every group's error, got {err}");
    };
    let mut names: Vec<&str> = groups.iter().map(|(g, _)| g.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["svc.first", "svc.second"]);
    assert!(err.to_string().contains("reading for svc.second"), "{err}");
}

#[tokio::test]
async fn acked_entries_are_trimmed_and_a_lagging_group_keeps_its_own() {
    let broker = MemoryBroker::with_retention(5);
    let bus = EventBus::new(broker.clone());
    let mut fast = broker
        .subscribe(&Subscription::new("fast", ["Keyed"]))
        .await
        .unwrap();
    let _slow = broker
        .subscribe(&Subscription::new("slow", ["Keyed"]))
        .await
        .unwrap();
    bus.publish_all(&keyed(100, 1)).await.unwrap();
    let got = fast.receive(100).await.unwrap();
    Delivery::ack_all(got).await.map_err(|(e, _)| e).unwrap();
    assert_eq!(
        broker.messages("Keyed").len(),
        100,
        "the slow group has read nothing"
    );
    let mut slow = broker
        .subscribe(&Subscription::new("slow", ["Keyed"]))
        .await
        .unwrap();
    let got = slow.receive(100).await.unwrap();
    Delivery::ack_all(got).await.map_err(|(e, _)| e).unwrap();
    assert_eq!(
        broker.messages("Keyed").len(),
        5,
        "only the retained newest entries are left"
    );
}

#[tokio::test]
async fn a_handler_can_say_when_to_retry() {
    let broker = MemoryBroker::new();
    let calls: Arc<Mutex<Vec<tokio::time::Instant>>> = Arc::default();
    let mut p = EventProcessor::new(broker.clone(), "svc");
    let c = calls.clone();
    p.handle("rate-limited", move |_: Keyed, ctx: Context| {
        c.lock().unwrap().push(tokio::time::Instant::now());
        let r = if ctx.attempt() == 1 {
            Err(cqrs::retry_after(
                Duration::from_millis(300),
                "429 Too Many Requests",
            ))
        } else {
            Ok(())
        };
        std::future::ready(r)
    })
    .unwrap()
    .retry(RetryPolicy::attempts(3).backoff(Duration::from_millis(1), 1.0));
    let running = p.start(CancellationToken::new()).await.unwrap();
    EventBus::new(broker.clone())
        .publish(&keyed(1, 1)[0])
        .await
        .unwrap();
    eventually("the second attempt", || calls.lock().unwrap().len() == 2).await;
    eventually("acked", || {
        broker.pending("Keyed", "svc.rate-limited").is_empty()
    })
    .await;
    running.shutdown().await.unwrap();
    let calls = calls.lock().unwrap().clone();
    assert!(
        calls[1] - calls[0] >= Duration::from_millis(300),
        "retried after {:?}, not after the asked 300 ms",
        calls[1] - calls[0]
    );
    assert!(broker.messages("svc.rate-limited.dead-letter").is_empty());
}

/// An event whose serialization fails for `seq == 2`.
#[derive(Debug, serde::Deserialize)]
struct Fragile {
    seq: u32,
}

impl serde::Serialize for Fragile {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.seq == 2 {
            return Err(serde::ser::Error::custom("seq 2 cannot be written"));
        }
        s.serialize_u32(self.seq)
    }
}

impl cqrs::Event for Fragile {
    const NAME: &'static str = "Fragile";
}

#[tokio::test]
async fn publish_all_with_an_event_that_does_not_encode_sends_none_to_the_memory_broker() {
    let broker = MemoryBroker::new();
    let bus = EventBus::new(broker.clone());
    let events: Vec<Fragile> = (0..4).map(|seq| Fragile { seq }).collect();
    let err = bus.publish_all(&events).await.unwrap_err();
    assert!(
        matches!(&err, Error::Encode { name, .. } if name == "Fragile"),
        "{err}"
    );
    let source = std::error::Error::source(&err).map(ToString::to_string);
    assert!(
        source.is_some_and(|s| s.contains("seq 2 cannot be written")),
        "{err}"
    );
    assert_eq!(broker.messages("Fragile").len(), 0);
    bus.publish_all(&events[..2]).await.unwrap();
    assert_eq!(broker.messages("Fragile").len(), 2);
}

/// The in-memory broker, whose first consumer of `group` fails on its first read.
#[derive(Clone)]
struct FailsOnce {
    inner: MemoryBroker,
    group: &'static str,
    subscribed: Arc<AtomicUsize>,
}

#[async_trait]
impl Publisher for FailsOnce {
    async fn publish(&self, topic: &str, messages: &[Message]) -> cqrs::Result<()> {
        self.inner.publish(topic, messages).await
    }
}

#[async_trait]
impl Subscriber for FailsOnce {
    async fn subscribe(&self, s: &Subscription) -> cqrs::Result<Box<dyn Consumer>> {
        if s.group == self.group && self.subscribed.fetch_add(1, Ordering::SeqCst) == 0 {
            return Ok(Box::new(Failing(s.group.clone())));
        }
        self.inner.subscribe(s).await
    }
}

#[tokio::test]
async fn a_failed_group_with_a_restart_policy_is_restarted_and_its_sibling_keeps_running() {
    let backend = FailsOnce {
        inner: MemoryBroker::new(),
        group: "svc.flaky",
        subscribed: Arc::default(),
    };
    let seen: Arc<Mutex<BTreeMap<&'static str, Vec<u32>>>> = Arc::default();
    let mut p = EventProcessor::new(backend.clone(), "svc");
    for name in ["flaky", "steady"] {
        let s = seen.clone();
        let options = p
            .handle(name, move |e: Keyed| {
                s.lock().unwrap().entry(name).or_default().push(e.seq);
                std::future::ready(Ok::<_, BoxError>(()))
            })
            .unwrap();
        if name == "flaky" {
            options.restart_on_failure(
                RestartPolicy::up_to(3)
                    .backoff(Duration::from_millis(10), Duration::from_millis(10)),
            );
        }
    }
    let running = p.start(CancellationToken::new()).await.unwrap();
    EventBus::new(backend.clone())
        .publish_all(&keyed(10, 2))
        .await
        .unwrap();
    eventually("both groups handled all ten", || {
        let seen = seen.lock().unwrap();
        ["flaky", "steady"]
            .iter()
            .all(|g| seen.get(g).map_or(0, Vec::len) == 10)
    })
    .await;
    let status = running.status();
    let flaky = status.iter().find(|s| s.group == "svc.flaky").unwrap();
    assert_eq!(flaky.restarts, 1);
    assert_eq!(flaky.state, cqrs::GroupState::Running);
    assert!(
        flaky
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("reading for svc.flaky")),
        "{flaky:?}"
    );
    let steady = status.iter().find(|s| s.group == "svc.steady").unwrap();
    assert_eq!(steady.restarts, 0);
    assert_eq!(backend.subscribed.load(Ordering::SeqCst), 2);
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_group_that_keeps_failing_stops_the_processor_once_its_restarts_run_out() {
    let backend = flaky(0, false, true);
    let mut p = EventProcessor::new(backend.clone(), "svc");
    p.handle("h", |_: Keyed| std::future::ready(Ok::<_, BoxError>(())))
        .unwrap()
        .restart_on_failure(
            RestartPolicy::up_to(2).backoff(Duration::from_millis(5), Duration::from_millis(5)),
        );
    let running = p.start(CancellationToken::new()).await.unwrap();
    eventually("two restarts, then failed", || {
        let s = &running.status()[0];
        s.restarts == 2 && s.state == cqrs::GroupState::Failed
    })
    .await;
    let err = cqrs_test_support::failure(running, WAIT).await;
    assert!(err.to_string().contains("reading for svc.h"), "{err}");
}

/// The in-memory broker, refusing the first `refusals` publishes to dead-letter topics.
#[derive(Clone)]
struct RefusesDeadLetters {
    inner: MemoryBroker,
    refusals: Arc<AtomicUsize>,
}

#[async_trait]
impl Publisher for RefusesDeadLetters {
    async fn publish(&self, topic: &str, messages: &[Message]) -> cqrs::Result<()> {
        if topic.ends_with(".dead-letter")
            && self
                .refusals
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        {
            return Err(Error::retryable(
                "publishing a dead letter",
                BoxError::from("refused (injected)"),
            ));
        }
        self.inner.publish(topic, messages).await
    }
}

#[async_trait]
impl Subscriber for RefusesDeadLetters {
    async fn subscribe(&self, s: &Subscription) -> cqrs::Result<Box<dyn Consumer>> {
        self.inner.subscribe(s).await
    }
}

/// A dead letter that cannot be published is published again; the handler, done with the
/// message, does not run again (it used to be nacked and handled from scratch, for ever while
/// the dead-letter topic could not be written).
#[tokio::test]
async fn a_dead_letter_publish_that_fails_is_retried_not_the_handler() {
    let backend = RefusesDeadLetters {
        inner: MemoryBroker::new(),
        refusals: Arc::new(AtomicUsize::new(3)),
    };
    let calls = Arc::new(AtomicUsize::new(0));
    let mut p = EventProcessor::new(backend.clone(), "svc");
    let c = calls.clone();
    p.handle("h", move |_: Keyed| {
        c.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Err::<(), _>("always fails".to_owned()))
    })
    .unwrap()
    .retry(RetryPolicy::attempts(2).backoff(Duration::from_millis(5), 1.0));
    let running = p.start(CancellationToken::new()).await.unwrap();
    EventBus::new(backend.clone())
        .publish_all(&keyed(1, 1))
        .await
        .unwrap();
    eventually("the dead letter", || {
        backend.inner.messages("svc.h.dead-letter").len() == 1
    })
    .await;
    running.shutdown().await.unwrap();
    assert_eq!(backend.refusals.load(Ordering::SeqCst), 0, "three refused");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "the handler ran its two attempts only"
    );
}
