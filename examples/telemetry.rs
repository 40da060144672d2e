//! Telemetry on Redis Streams: a logger and an alerter, each its own consumer group; two alerter
//! instances share the alerts between them.
//!
//! Run with: `cargo run --example telemetry --features redis` (needs redis-server on
//! 127.0.0.1:6379, or `REDIS_URL`).
//!
//! Every `PacketCounterError` reaches the logger once (group `svc-telemetry.logger`) and the
//! alerter once (group `svc-telemetry.alerter`); the alerter runs as two instances of the service,
//! which split the stream between them.

use std::collections::BTreeMap;
use std::time::Duration;

use cqrs::redis::RedisBackend;
use cqrs::{BoxError, CancellationToken, Event, EventBus, EventProcessor};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

#[derive(Debug, Clone, Event, Serialize, Deserialize)]
#[event(name = "telemetry.PacketCounterError", topic = "telemetry")]
struct PacketCounterError {
    #[event(key)]
    device: String,
    errors: u64,
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into());
    let backend = RedisBackend::connect(&url).await?;
    backend.delete_stream("telemetry").await?;
    let token = CancellationToken::new();
    let (seen_tx, mut seen) = mpsc::unbounded_channel::<(String, u64)>();

    let mut running = Vec::new();
    // The logger: one instance.
    let mut logger = EventProcessor::new(backend.clone(), "svc-telemetry");
    let tx = seen_tx.clone();
    logger.handle("logger", move |e: PacketCounterError| {
        println!("[logger]     {} reported {} errors", e.device, e.errors);
        std::future::ready(tx.send(("logger".into(), e.errors)))
    })?;
    running.push(logger.start(token.clone()).await?);
    // The alerter: two instances of the service, sharing its group.
    for instance in ["alerter-1", "alerter-2"] {
        let mut alerter = EventProcessor::new(backend.clone(), "svc-telemetry");
        let tx = seen_tx.clone();
        alerter
            .handle("alerter", move |e: PacketCounterError| {
                println!("[{instance}]  ALERT: {} has {} errors", e.device, e.errors);
                std::future::ready(tx.send((instance.into(), e.errors)))
            })?
            .batch_size(1);
        running.push(alerter.start(token.clone()).await?);
    }

    let bus = EventBus::new(backend.clone());
    let events: Vec<PacketCounterError> = (1..=10)
        .map(|i| PacketCounterError {
            device: format!("router-{}", i % 4),
            errors: i,
        })
        .collect();
    bus.publish_all(&events).await?;

    let mut per_handler: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..20 {
        let (who, _) = tokio::time::timeout(Duration::from_secs(10), seen.recv())
            .await?
            .ok_or("handlers stopped")?;
        *per_handler.entry(who).or_default() += 1;
    }
    token.cancel();
    for r in running {
        r.wait().await?;
    }
    println!("\nhandled: {per_handler:?}");
    println!("the logger saw all 10; the two alerters shared 10 between them");
    backend.delete_stream("telemetry").await?;
    Ok(())
}
