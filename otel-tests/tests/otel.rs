//! The `otel` feature end to end: a publish inside a traced request carries its context in the
//! message headers, and the handler's `process` span joins it (as a child with
//! `trace_as_child`, by a link otherwise), on the in-memory broker, Redis and Kafka. Spans go
//! through `tracing-opentelemetry` to the SDK's in-memory exporter.

#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use cqrs::backend::Backend;
use cqrs::{CancellationToken, Event, EventBus, EventProcessor};
use opentelemetry::trace::{SpanKind, TraceContextExt, TraceId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use serde::{Deserialize, Serialize};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
struct Ping {
    n: u32,
}

/// The spans finished so far, from the one global subscriber of this test binary.
fn exporter() -> &'static InMemorySpanExporter {
    static EXPORTER: OnceLock<InMemorySpanExporter> = OnceLock::new();
    EXPORTER.get_or_init(|| {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("otel-tests"));
        tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer))
            .unwrap();
        exporter
    })
}

fn attribute(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.to_string())
}

/// The finished span named `name` whose `messaging.destination.name` is `topic`.
async fn finished(name: &str, topic: &str) -> SpanData {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let spans = exporter().get_finished_spans().unwrap();
        if let Some(s) = spans.into_iter().find(|s| {
            s.name == name && attribute(s, "messaging.destination.name").as_deref() == Some(topic)
        }) {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no finished span `{name}`"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Publishes one event inside a `request` span and checks how the handler's span joined it.
async fn handler_joins_the_request(backend: impl Backend + Clone, system: &str, child: bool) {
    exporter();
    let topic = cqrs::conformance::unique("otel");
    let service = cqrs::conformance::unique("svc");
    let one_topic = {
        let t = topic.clone();
        move || {
            let t = t.clone();
            cqrs::TopicNamer::new(move |_| t.clone())
        }
    };
    let seen: Arc<Mutex<Option<TraceId>>> = Arc::default();
    let mut p = EventProcessor::new(backend.clone(), service.as_str()).topics(one_topic());
    let s = seen.clone();
    let options = p
        .handle("trace", move |_: Ping| {
            let current = tracing::Span::current().context();
            *s.lock().unwrap() = Some(current.span().span_context().trace_id());
            async { Ok::<_, String>(()) }
        })
        .unwrap();
    if child {
        options.trace_as_child();
    }
    let running = p.start(CancellationToken::new()).await.unwrap();

    let request = tracing::info_span!("request");
    let request_trace = request.context().span().span_context().trace_id();
    let request_span = request.context().span().span_context().span_id();
    EventBus::new(backend.clone())
        .topics(one_topic())
        .publish(&Ping { n: 1 })
        .instrument(request.clone())
        .await
        .unwrap();
    drop(request);

    let send = finished(&format!("send {topic}"), &topic).await;
    let process = finished(&format!("process {topic}"), &topic).await;
    running.shutdown().await.unwrap();
    let handler_trace = seen.lock().unwrap().expect("the handler ran");

    assert_eq!(send.span_kind, SpanKind::Producer);
    assert_eq!(send.span_context.trace_id(), request_trace);
    assert_eq!(send.parent_span_id, request_span);
    assert_eq!(process.span_kind, SpanKind::Consumer);
    assert_eq!(
        attribute(&process, "messaging.system").as_deref(),
        Some(system)
    );
    assert_eq!(
        attribute(&process, "messaging.consumer.group.name"),
        Some(format!("{service}.trace"))
    );
    assert_eq!(
        attribute(&process, "messaging.operation.type").as_deref(),
        Some("process")
    );
    if system == "kafka" {
        // One partition, one record: partition 0, offset 0.
        assert_eq!(
            attribute(&process, "messaging.destination.partition.id").as_deref(),
            Some("0")
        );
        assert_eq!(
            attribute(&process, "messaging.kafka.offset").as_deref(),
            Some("0")
        );
    }
    assert!(
        process
            .links
            .iter()
            .any(|l| l.span_context.span_id() == send.span_context.span_id()
                && l.span_context.trace_id() == request_trace),
        "the process span links to the send span: {:?}",
        process.links
    );
    if child {
        assert_eq!(process.span_context.trace_id(), request_trace);
        assert_eq!(process.parent_span_id, send.span_context.span_id());
        assert_eq!(handler_trace, request_trace);
    } else {
        assert_ne!(process.span_context.trace_id(), request_trace);
        assert_eq!(handler_trace, process.span_context.trace_id());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_memory_handler_is_a_child_of_the_send_span() {
    handler_joins_the_request(cqrs::memory::MemoryBroker::new(), "memory", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_memory_handler_links_to_the_send_span_by_default() {
    handler_joins_the_request(cqrs::memory::MemoryBroker::new(), "memory", false).await;
}

fn redis_url() -> String {
    std::env::var("REDIS_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "redis://127.0.0.1:6379/15".to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_handler_is_a_child_of_the_send_span() {
    let backend = cqrs::redis::RedisBackend::connect(&redis_url())
        .await
        .unwrap();
    handler_joins_the_request(backend, "redis", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_handler_is_a_child_of_the_send_span() {
    let brokers = std::env::var("KAFKA_BROKERS")
        .ok()
        .filter(|b| !b.is_empty())
        .unwrap_or_else(|| "127.0.0.1:9092".to_owned());
    let backend = cqrs::kafka::KafkaBackend::connect(
        cqrs::kafka::KafkaConfig::new(&brokers)
            .partitions(1)
            .fetch_wait(Duration::from_millis(10))
            .set("batch.num.messages", "1"),
    )
    .await
    .unwrap();
    handler_joins_the_request(backend, "kafka", true).await;
}
