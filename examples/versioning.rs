//! Schema evolution: a service still on version 1 of `orders.OrderPlaced` and one already on
//! version 2 publish to the same topic; one handler, written for version 2, reads both (version 1
//! is upcast through `From`). A version 3 from a producer deployed too early is dead-lettered
//! with the reason, not dropped.
//!
//! Run with: `cargo run --example versioning` (in-memory broker, no server). The rules are in
//! `docs/versioning.md`.

use std::time::Duration;

use cqrs::memory::MemoryBroker;
use cqrs::processor::dead_letter_headers;
use cqrs::{BoxError, CancellationToken, Event, EventBus, EventProcessor};
use serde::{Deserialize, Serialize};

/// Version 1, as the older service still writes it: the total in euros.
#[derive(Debug, Serialize, Deserialize, Event)]
#[event(name = "orders.OrderPlaced", topic = "orders", version = 1)]
struct OrderPlacedV1 {
    order_id: String,
    total: f64,
}

/// Version 2: the total in cents, and the customer. Reads version 1 through `From`.
#[derive(Debug, Serialize, Deserialize, Event)]
#[event(
    name = "orders.OrderPlaced",
    topic = "orders",
    version = 2,
    upcast_from = "OrderPlacedV1"
)]
struct OrderPlaced {
    order_id: String,
    total_cents: u64,
    #[serde(default)]
    customer: Option<String>,
}

impl From<OrderPlacedV1> for OrderPlaced {
    fn from(v1: OrderPlacedV1) -> Self {
        OrderPlaced {
            order_id: v1.order_id,
            total_cents: (v1.total * 100.0).round() as u64,
            customer: None,
        }
    }
}

/// Version 3, published before any consumer knows it.
#[derive(Debug, Serialize, Deserialize, Event)]
#[event(name = "orders.OrderPlaced", topic = "orders", version = 3)]
struct OrderPlacedV3 {
    order_id: String,
    lines: Vec<String>,
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let broker = MemoryBroker::new();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();

    let mut billing = EventProcessor::new(broker.clone(), "svc-billing");
    billing.handle("invoice", move |order: OrderPlaced| {
        let sent = tx.send(format!(
            "invoice {} for {} cents (customer: {})",
            order.order_id,
            order.total_cents,
            order.customer.as_deref().unwrap_or("unknown")
        ));
        async move { sent.map_err(BoxError::from) }
    })?;
    let running = billing.start(CancellationToken::new()).await?;

    // Two producers, one not upgraded yet, on the same topic.
    let bus = EventBus::new(broker.clone());
    bus.publish(&OrderPlacedV1 {
        order_id: "o-1".into(),
        total: 19.99,
    })
    .await?;
    bus.publish(&OrderPlaced {
        order_id: "o-2".into(),
        total_cents: 4500,
        customer: Some("c-7".into()),
    })
    .await?;
    bus.publish(&OrderPlacedV3 {
        order_id: "o-3".into(),
        lines: vec!["book".into()],
    })
    .await?;

    for _ in 0..2 {
        let line = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await?
            .ok_or("handler stopped")?;
        println!("{line}");
    }
    let dead_letters = "svc-billing.invoice.dead-letter";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while broker.messages(dead_letters).is_empty() {
        if tokio::time::Instant::now() > deadline {
            return Err("the version 3 message was not dead-lettered".into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for dead in broker.messages(dead_letters) {
        println!(
            "dead-lettered {} v{}: {}",
            dead.name,
            dead.version,
            dead.metadata.headers[dead_letter_headers::REASON]
        );
    }
    running.shutdown().await?;
    Ok(())
}
