//! At-least-once (post-commit) against at-most-once (pre-commit) on Kafka, with a handler that
//! fails the first time.
//!
//! Run with: `cargo run --example delivery_semantics --features kafka`, with a Kafka-protocol
//! broker on `KAFKA_BROKERS` (default 127.0.0.1:9092); see `examples/order_consumers.rs` for how to
//! start one.
//!
//! Post-commit stores the offset only after the handler succeeded, so the failed payment is
//! delivered again and then handled. Pre-commit stores it when the message arrives: the failure is
//! not retried; the message goes to the dead-letter topic instead of being lost silently.

use std::time::Duration;

use cqrs::kafka::{KafkaBackend, KafkaConfig};
use cqrs::{
    BoxError, CancellationToken, Context, DeliveryMode, Event, EventBus, EventProcessor,
    RetryPolicy, TopicNamer,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

#[derive(Debug, Clone, Event, Serialize, Deserialize)]
#[event(name = "billing.PaymentReceived")]
struct PaymentReceived {
    #[event(key)]
    invoice: String,
    cents: u64,
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let brokers = std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let backend = KafkaBackend::connect(KafkaConfig::new(&brokers)).await?;
    let run = cqrs::conformance::unique("run");

    for mode in [DeliveryMode::AtLeastOnce, DeliveryMode::AtMostOnce] {
        let label = match mode {
            DeliveryMode::AtLeastOnce => "post-commit (at-least-once)",
            _ => "pre-commit (at-most-once)",
        };
        println!("== {label}");
        let topic = format!(
            "payments-{run}-{}",
            if mode == DeliveryMode::AtLeastOnce {
                "post"
            } else {
                "pre"
            }
        );
        let namer = {
            let topic = topic.clone();
            TopicNamer::new(move |_| topic.clone())
        };
        let (tx, mut rx) = mpsc::unbounded_channel::<&'static str>();
        let mut p = EventProcessor::new(backend.clone(), format!("svc-billing-{run}"))
            .topics(namer.clone());
        let dead_letters = format!("payments-{run}-dead-letter");
        p.handle("book-payment", move |e: PaymentReceived, ctx: Context| {
            let r = if ctx.attempt() == 1 {
                println!(
                    "  attempt {}: booking {} failed (ledger locked)",
                    ctx.attempt(),
                    e.invoice
                );
                let _ = tx.send("failed");
                Err("ledger locked")
            } else {
                println!(
                    "  attempt {}: booked {} ({} cents)",
                    ctx.attempt(),
                    e.invoice,
                    e.cents
                );
                let _ = tx.send("booked");
                Ok(())
            };
            std::future::ready(r)
        })?
        .delivery(mode)
        .retry(RetryPolicy::attempts(3).backoff(Duration::from_millis(100), 2.0))
        .dead_letter_topic(&dead_letters);
        let token = CancellationToken::new();
        let running = p.start(token.clone()).await?;
        EventBus::new(backend.clone())
            .topics(namer)
            .publish(&PaymentReceived {
                invoice: "inv-7".into(),
                cents: 4200,
            })
            .await?;
        let first = tokio::time::timeout(Duration::from_secs(30), rx.recv()).await?;
        assert_eq!(first, Some("failed"));
        match tokio::time::timeout(Duration::from_secs(2), rx.recv()).await {
            Ok(Some(outcome)) => println!("  -> redelivered and {outcome}"),
            _ => println!("  -> not redelivered: the payment went to `{dead_letters}`"),
        }
        token.cancel();
        running.wait().await?;
    }
    Ok(())
}
