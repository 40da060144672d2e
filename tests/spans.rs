//! Spans of messages handled concurrently never nest. Alone in its test binary: the subscriber
//! it installs for its thread must be the only one tracing's callsites have seen.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::{eventually, keyed, Keyed};
use cqrs::memory::MemoryBroker;
use cqrs::{permanent, CancellationToken, EventBus, EventProcessor};

mod common;

/// Records, for every `handle` span, whether it was opened inside another `handle` span.
#[derive(Clone, Default)]
struct Nesting {
    nested: Arc<AtomicUsize>,
    spans: Arc<AtomicUsize>,
}

impl<S> tracing_subscriber::Layer<S> for Nesting
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if attrs.metadata().name() != "handle" {
            return;
        }
        self.spans.fetch_add(1, Ordering::SeqCst);
        let Some(span) = ctx.span(id) else { return };
        if span.scope().skip(1).any(|s| s.name() == "handle") {
            self.nested.fetch_add(1, Ordering::SeqCst);
        }
    }
}

#[test]
fn message_spans_never_nest() {
    use tracing_subscriber::layer::SubscriberExt;
    let nesting = Nesting::default();
    let subscriber = tracing_subscriber::registry().with(nesting.clone());
    let _default = tracing::subscriber::set_default(subscriber);
    // One thread: every task's span stack is the same thread's.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let broker = MemoryBroker::new();
        let done = Arc::new(AtomicUsize::new(0));
        let mut p = EventProcessor::new(broker.clone(), "svc");
        let d = done.clone();
        p.handle("h", move |e: Keyed| {
            let d = d.clone();
            async move {
                tokio::task::yield_now().await;
                d.fetch_add(1, Ordering::SeqCst);
                if e.seq % 3 == 0 {
                    // Dead-lettered: the settling awaits too.
                    return Err(permanent("no"));
                }
                Ok(())
            }
        })
        .unwrap()
        .concurrency(16);
        EventBus::new(broker.clone())
            .publish_all(&keyed(200, 50))
            .await
            .unwrap();
        let running = p.start(CancellationToken::new()).await.unwrap();
        eventually("all handled", || done.load(Ordering::SeqCst) == 200).await;
        eventually("all settled", || {
            broker.pending("Keyed", "svc.h").is_empty()
        })
        .await;
        running.shutdown().await.unwrap();
    });
    assert!(nesting.spans.load(Ordering::SeqCst) >= 200);
    assert_eq!(
        nesting.nested.load(Ordering::SeqCst),
        0,
        "a message's span was opened inside another message's span"
    );
}
