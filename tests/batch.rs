//! Batch handlers on the in-memory broker: batches, per-event outcomes, whole-batch failures,
//! undecodable payloads, order per key across batches.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{eventually, keyed, Keyed};
use cqrs::backend::Publisher;
use cqrs::memory::MemoryBroker;
use cqrs::processor::dead_letter_headers as dlq;
use cqrs::{
    permanent, BatchError, CancellationToken, EventBus, EventProcessor, Message, RetryPolicy,
};

mod common;

type Calls = Arc<Mutex<Vec<Vec<u32>>>>;
/// Each call's events as (key, seq).
type KeyedCalls = Arc<Mutex<Vec<Vec<(String, u32)>>>>;

fn fast_retries() -> RetryPolicy {
    RetryPolicy::attempts(3).backoff(Duration::from_millis(5), 1.0)
}

/// A codec that panics on one payload: decoding runs user code.
#[derive(Clone, Copy)]
struct PanicsOnSeven;

impl cqrs::codec::Codec<Keyed> for PanicsOnSeven {
    fn content_type(&self) -> &'static str {
        "application/json"
    }
    fn encode(&self, value: &Keyed) -> Result<Vec<u8>, cqrs::CodecError> {
        cqrs::codec::Json.encode(value)
    }
    fn decode(&self, bytes: &[u8]) -> Result<Keyed, cqrs::CodecError> {
        let k: Keyed = cqrs::codec::Json.decode(bytes)?;
        assert!(k.seq != 7, "the codec cannot take seven");
        Ok(k)
    }
}

/// A panic while decoding a batch (a codec's, an upcaster's) fails that message, which is
/// retried and dead-lettered as a panicking handler's would be; the others are handled, and the
/// group goes on.
#[tokio::test]
async fn a_panic_while_decoding_a_batch_fails_that_message_not_the_group() {
    let broker = MemoryBroker::new();
    let calls: Calls = Arc::default();
    let mut p = EventProcessor::with_codec(broker.clone(), "svc", PanicsOnSeven);
    let c = calls.clone();
    p.handle_batch("store", move |events: Vec<Keyed>| {
        c.lock()
            .unwrap()
            .push(events.iter().map(|e| e.seq).collect());
        async { Ok::<(), BatchError>(()) }
    })
    .unwrap()
    .batch_size(10)
    .retry(fast_retries());
    EventBus::new(broker.clone())
        .publish_all(&keyed(10, 10))
        .await
        .unwrap();
    let running = p.start(CancellationToken::new()).await.unwrap();
    eventually("seven dead-lettered", || {
        broker.messages("svc.store.dead-letter").len() == 1
    })
    .await;
    let dead = &broker.messages("svc.store.dead-letter")[0];
    assert!(
        dead.metadata.headers[dlq::REASON].contains("the codec cannot take seven"),
        "{:?}",
        dead.metadata.headers
    );
    // Published after the panics: the group still handles.
    EventBus::new(broker.clone())
        .publish_all(&keyed(1, 1))
        .await
        .unwrap();
    eventually("everything handled", || {
        calls.lock().unwrap().iter().flatten().count() >= 10
    })
    .await;
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_batch_handler_settles_each_event_by_its_outcome() {
    let broker = MemoryBroker::new();
    let calls: Calls = Arc::default();
    let failed_once: Arc<Mutex<HashSet<u32>>> = Arc::default();
    let mut p = EventProcessor::new(broker.clone(), "svc");
    let (c, f) = (calls.clone(), failed_once.clone());
    p.handle_batch("store", move |events: Vec<Keyed>| {
        let (c, f) = (c.clone(), f.clone());
        async move {
            c.lock()
                .unwrap()
                .push(events.iter().map(|e| e.seq).collect());
            let mut failed = BatchError::none();
            for (i, e) in events.iter().enumerate() {
                if e.seq == 3 && f.lock().unwrap().insert(3) {
                    failed.fail(i, "deadlock, try again");
                }
                if e.seq == 7 {
                    failed.fail(i, permanent("seven is not allowed"));
                }
            }
            failed.into_result()
        }
    })
    .unwrap()
    .batch_size(10)
    .retry(fast_retries());
    // All 20 are there before the processor starts: batches of 10.
    EventBus::new(broker.clone())
        .publish_all(&keyed(20, 20))
        .await
        .unwrap();
    let running = p.start(CancellationToken::new()).await.unwrap();
    eventually("everything settled", || {
        broker.pending("Keyed", "svc.store").is_empty()
            && broker.messages("svc.store.dead-letter").len() == 1
            && calls.lock().unwrap().len() >= 3
    })
    .await;
    running.shutdown().await.unwrap();

    let calls = calls.lock().unwrap().clone();
    assert_eq!(
        calls[0],
        (0..10).collect::<Vec<_>>(),
        "one call per fetched batch"
    );
    assert_eq!(calls[1], [3], "the failed event retried alone");
    assert_eq!(calls[2], (10..20).collect::<Vec<_>>());
    assert_eq!(calls.len(), 3, "{calls:?}");
    let dead = &broker.messages("svc.store.dead-letter")[0];
    assert_eq!(dead.key.as_deref(), Some("k7"));
    assert_eq!(dead.metadata.headers[dlq::REASON], "seven is not allowed");
    assert_eq!(
        dead.metadata.headers[dlq::ATTEMPTS],
        "1",
        "permanent: not retried"
    );
}

#[tokio::test]
async fn a_whole_batch_failure_retries_the_batch_then_dead_letters_it() {
    let broker = MemoryBroker::new();
    let calls: Calls = Arc::default();
    let mut p = EventProcessor::new(broker.clone(), "svc");
    let c = calls.clone();
    p.handle_batch("store", move |events: Vec<Keyed>| {
        let c = c.clone();
        async move {
            c.lock()
                .unwrap()
                .push(events.iter().map(|e| e.seq).collect());
            // `?` on any error fails the whole batch.
            Err::<(), _>(std::io::Error::other("database down"))?;
            Ok(())
        }
    })
    .unwrap()
    .batch_size(10)
    .retry(fast_retries());
    EventBus::new(broker.clone())
        .publish_all(&keyed(4, 4))
        .await
        .unwrap();
    let running = p.start(CancellationToken::new()).await.unwrap();
    eventually("all dead-lettered", || {
        broker.messages("svc.store.dead-letter").len() == 4
            && broker.pending("Keyed", "svc.store").is_empty()
    })
    .await;
    running.shutdown().await.unwrap();
    assert_eq!(
        *calls.lock().unwrap(),
        vec![vec![0, 1, 2, 3]; 3],
        "3 attempts"
    );
    let dead = broker.messages("svc.store.dead-letter");
    assert_eq!(
        dead[0].metadata.headers[dlq::REASON],
        "its batch failed: database down"
    );
    assert_eq!(dead[0].metadata.headers[dlq::ATTEMPTS], "3");
}

#[tokio::test]
async fn an_undecodable_event_is_dead_lettered_and_its_batch_goes_on() {
    let broker = MemoryBroker::new();
    let calls: Calls = Arc::default();
    let mut p = EventProcessor::new(broker.clone(), "svc");
    let c = calls.clone();
    p.handle_batch("store", move |events: Vec<Keyed>| {
        c.lock()
            .unwrap()
            .push(events.iter().map(|e| e.seq).collect());
        std::future::ready(Ok::<_, BatchError>(()))
    })
    .unwrap();
    let bus = EventBus::new(broker.clone());
    bus.publish_all(&keyed(2, 2)).await.unwrap();
    broker
        .publish("Keyed", &[Message::new("Keyed", b"{not json".to_vec())])
        .await
        .unwrap();
    bus.publish(&Keyed {
        key: "k".into(),
        seq: 9,
    })
    .await
    .unwrap();
    let running = p.start(CancellationToken::new()).await.unwrap();
    eventually("settled", || {
        broker.pending("Keyed", "svc.store").is_empty()
            && broker.messages("svc.store.dead-letter").len() == 1
    })
    .await;
    running.shutdown().await.unwrap();
    assert_eq!(*calls.lock().unwrap(), [vec![0, 1, 9]]);
    let dead = &broker.messages("svc.store.dead-letter")[0];
    assert!(
        dead.metadata.headers[dlq::REASON].starts_with("failed to decode `Keyed`"),
        "{}",
        dead.metadata.headers[dlq::REASON]
    );
}

#[tokio::test]
async fn a_panicking_batch_handler_fails_its_batch_and_loses_nothing() {
    let broker = MemoryBroker::new();
    let handled: Arc<Mutex<Vec<u32>>> = Arc::default();
    let panicked = Arc::new(Mutex::new(false));
    let mut p = EventProcessor::new(broker.clone(), "svc");
    let (h, once) = (handled.clone(), panicked.clone());
    p.handle_batch("store", move |events: Vec<Keyed>| {
        let first = !std::mem::replace(&mut *once.lock().unwrap(), true);
        assert!(!first, "the first batch panics");
        h.lock().unwrap().extend(events.iter().map(|e| e.seq));
        std::future::ready(Ok::<_, BatchError>(()))
    })
    .unwrap()
    .retry(fast_retries());
    EventBus::new(broker.clone())
        .publish_all(&keyed(5, 5))
        .await
        .unwrap();
    let running = p.start(CancellationToken::new()).await.unwrap();
    eventually("handled after the panic", || {
        handled.lock().unwrap().len() == 5
    })
    .await;
    eventually("acked", || broker.pending("Keyed", "svc.store").is_empty()).await;
    running.shutdown().await.unwrap();
    assert!(broker.messages("svc.store.dead-letter").is_empty());
}

/// `concurrency(4)` on a batch handler: four batches' worth is fetched and split by key into 4
/// parts handled at once (seen running together), each in batches of at most `batch_size`; a
/// key's events stay in one part, so they reach the handler in the order published, across
/// fetches too; each event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_handler_with_concurrency_runs_batches_of_different_keys_at_once_in_order_per_key()
{
    use std::sync::atomic::{AtomicUsize, Ordering};
    let broker = MemoryBroker::new();
    let calls: KeyedCalls = Arc::default();
    let (running, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut p = EventProcessor::new(broker.clone(), "svc");
    let (c, r, m) = (calls.clone(), running.clone(), most.clone());
    p.handle_batch("store", move |events: Vec<Keyed>| {
        let (c, r, m) = (c.clone(), r.clone(), m.clone());
        async move {
            let now = r.fetch_add(1, Ordering::SeqCst) + 1;
            m.fetch_max(now, Ordering::SeqCst);
            c.lock()
                .unwrap()
                .push(events.iter().map(|e| (e.key.clone(), e.seq)).collect());
            // A database call's time, so that the batches of one fetch overlap.
            tokio::time::sleep(Duration::from_millis(30)).await;
            r.fetch_sub(1, Ordering::SeqCst);
            Ok::<(), BatchError>(())
        }
    })
    .unwrap()
    .batch_size(40)
    .concurrency(4);
    EventBus::new(broker.clone())
        .publish_all(&keyed(200, 16))
        .await
        .unwrap();
    let running_p = p.start(CancellationToken::new()).await.unwrap();
    eventually("every event handled", || {
        calls.lock().unwrap().iter().flatten().count() >= 200
            && broker.pending("Keyed", "svc.store").is_empty()
    })
    .await;
    running_p.shutdown().await.unwrap();

    let calls = calls.lock().unwrap().clone();
    let most = most.load(Ordering::SeqCst);
    assert!((2..=4).contains(&most), "{most} batches at once");
    assert!(calls.iter().all(|b| b.len() <= 40));
    let mut seqs: Vec<u32> = calls.iter().flatten().map(|(_, s)| *s).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (0..200).collect::<Vec<_>>(), "each once");
    let mut last: std::collections::HashMap<String, u32> = Default::default();
    for (key, seq) in calls.iter().flatten() {
        if let Some(before) = last.insert(key.clone(), *seq) {
            assert!(before < *seq, "{key}: {seq} after {before}");
        }
    }
}
