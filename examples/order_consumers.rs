//! Two consumers in one Kafka consumer group, `order-consumer-group`, splitting one topic's
//! partitions: each order is handled by exactly one of them.
//!
//! Run with: `cargo run --example order_consumers --features kafka`, with a Kafka broker on
//! `KAFKA_BROKERS` (default 127.0.0.1:9092). Start an Apache Kafka with
//! `scripts/kafka start /tmp/kafka-a --port 9092` (it installs Kafka from Maven Central on first
//! use; `scripts/kafka stop /tmp/kafka-a` stops it).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use cqrs::kafka::{KafkaBackend, KafkaConfig};
use cqrs::{BoxError, CancellationToken, Context, Event, EventBus, EventProcessor, GroupNamer};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

#[derive(Debug, Clone, Event, Serialize, Deserialize)]
#[event(name = "shop.OrderPlaced", topic = "orders")]
struct OrderPlaced {
    #[event(key)]
    customer: String,
    order: u32,
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let brokers = std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let backend = KafkaBackend::connect(KafkaConfig::new(&brokers).partitions(4)).await?;
    let token = CancellationToken::new();
    let (tx, mut rx) = mpsc::unbounded_channel::<(&'static str, String, u32)>();

    let mut running = Vec::new();
    for consumer in ["consumer-1", "consumer-2"] {
        // Both use the group `order-consumer-group`, whatever the handler is called.
        let mut p = EventProcessor::new(backend.clone(), "shop")
            .group_names(GroupNamer::new(|_, _| "order-consumer-group".to_owned()));
        let tx = tx.clone();
        p.handle("orders", move |o: OrderPlaced, ctx: Context| {
            let partition = ctx.broker_id().split(':').next().unwrap_or("?").to_owned();
            println!(
                "[{consumer}] partition {partition}: order {} of {}",
                o.order, o.customer
            );
            std::future::ready(tx.send((consumer, partition, o.order)))
        })?;
        running.push(p.start(token.clone()).await?);
    }

    let orders: Vec<OrderPlaced> = (1..=20)
        .map(|order| OrderPlaced {
            customer: format!("customer-{}", order % 6),
            order,
        })
        .collect();
    EventBus::new(backend.clone()).publish_all(&orders).await?;

    let mut partitions: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    let mut handled = BTreeSet::new();
    while handled.len() < orders.len() {
        let (consumer, partition, order) = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await?
            .ok_or("consumers stopped")?;
        partitions.entry(consumer).or_default().insert(partition);
        handled.insert(order);
    }
    token.cancel();
    for r in running {
        r.wait().await?;
    }
    for (consumer, parts) in &partitions {
        println!("{consumer} read partitions {parts:?}");
    }
    println!("{} orders, each handled once by the group", handled.len());
    Ok(())
}
