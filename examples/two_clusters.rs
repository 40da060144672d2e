//! One application consuming the same event type from two Kafka clusters with one handler.
//!
//! Run with: `cargo run --example two_clusters --features kafka`, with brokers on
//! `KAFKA_BROKERS_A` (default 127.0.0.1:9092) and `KAFKA_BROKERS_B` (default 127.0.0.1:9093).
//! Start two independent Apache Kafka brokers with
//! `scripts/kafka start /tmp/kafka-a --port 9092` and `scripts/kafka start /tmp/kafka-b --port 9093`.
//!
//! The handler is registered twice in one processor: once on the processor's backend (cluster A)
//! and once bound to cluster B with `.backend(..)`. Each registration is its own consumer group.

use std::time::Duration;

use cqrs::kafka::{KafkaBackend, KafkaConfig};
use cqrs::{BoxError, CancellationToken, Context, Event, EventBus, EventProcessor};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

#[derive(Debug, Clone, Event, Serialize, Deserialize)]
#[event(name = "fleet.PositionReported")]
struct PositionReported {
    #[event(key)]
    truck: String,
    km: u32,
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let a = std::env::var("KAFKA_BROKERS_A").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let b = std::env::var("KAFKA_BROKERS_B").unwrap_or_else(|_| "127.0.0.1:9093".into());
    let cluster_a = KafkaBackend::connect(KafkaConfig::new(&a)).await?;
    let cluster_b = KafkaBackend::connect(KafkaConfig::new(&b)).await?;
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();

    let handler = move |p: PositionReported, ctx: Context| {
        println!("[{}] truck {} at km {}", ctx.handler(), p.truck, p.km);
        std::future::ready(tx.send(()))
    };
    let service = cqrs::conformance::unique("svc-fleet");
    let mut processor = EventProcessor::new(cluster_a.clone(), service);
    processor.handle("cluster-a", handler.clone())?;
    processor
        .handle("cluster-b", handler)?
        .backend(cluster_b.clone());
    let token = CancellationToken::new();
    let running = processor.start(token.clone()).await?;

    EventBus::new(cluster_a)
        .publish(&PositionReported {
            truck: "t-1".into(),
            km: 120,
        })
        .await?;
    EventBus::new(cluster_b)
        .publish(&PositionReported {
            truck: "t-2".into(),
            km: 87,
        })
        .await?;
    for _ in 0..2 {
        tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await?
            .ok_or("stopped")?;
    }
    token.cancel();
    running.wait().await?;
    println!("one handler, two clusters");
    Ok(())
}
