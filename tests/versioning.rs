//! Versions and upcasting on the in-memory broker: older versions reach a newer handler through a
//! chain of upcasts; a newer version, or an older one with no upcast, is dead-lettered with the
//! reason and never reaches the handler.

#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};

use common::eventually;
use cqrs::codec::{Codec, Json};
use cqrs::memory::MemoryBroker;
use cqrs::processor::dead_letter_headers as dlq;
use cqrs::{CancellationToken, CodecError, Event, EventBus, EventProcessor};
use serde::{Deserialize, Serialize};

mod common;

/// Version 1: the total in euros.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PlacedV1 {
    order_id: String,
    total: f64,
}
impl Event for PlacedV1 {
    const NAME: &'static str = "orders.OrderPlaced";
    const TOPIC: Option<&'static str> = Some("orders");
}

/// Version 2: the total in cents.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PlacedV2 {
    order_id: String,
    total_cents: u64,
}
impl Event for PlacedV2 {
    const NAME: &'static str = "orders.OrderPlaced";
    const TOPIC: Option<&'static str> = Some("orders");
    const VERSION: u32 = 2;
    fn upcast(version: u32, payload: &[u8]) -> Option<Result<Self, CodecError>> {
        (version == 1).then(|| {
            Codec::<PlacedV1>::decode(&Json, payload).map(|v1| PlacedV2 {
                order_id: v1.order_id,
                total_cents: (v1.total * 100.0).round() as u64,
            })
        })
    }
}

/// Version 3: with a currency; reads 2 directly and 1 through 2.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Placed {
    order_id: String,
    total_cents: u64,
    currency: String,
}
impl Event for Placed {
    const NAME: &'static str = "orders.OrderPlaced";
    const TOPIC: Option<&'static str> = Some("orders");
    const VERSION: u32 = 3;
    fn upcast(version: u32, payload: &[u8]) -> Option<Result<Self, CodecError>> {
        let v2 = if version == 2 {
            Codec::<PlacedV2>::decode(&Json, payload)
        } else {
            PlacedV2::upcast(version, payload)?
        };
        Some(v2.map(|v2| Placed {
            order_id: v2.order_id,
            total_cents: v2.total_cents,
            currency: "EUR".into(),
        }))
    }
}

/// Version 4, which the handler does not know yet.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PlacedV4 {
    order_id: String,
}
impl Event for PlacedV4 {
    const NAME: &'static str = "orders.OrderPlaced";
    const TOPIC: Option<&'static str> = Some("orders");
    const VERSION: u32 = 4;
}

/// An event at version 2 with no upcast from 1.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Shipped {
    order_id: String,
}
impl Event for Shipped {
    const NAME: &'static str = "orders.Shipped";
    const TOPIC: Option<&'static str> = Some("orders");
    const VERSION: u32 = 2;
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ShippedV1 {
    order_id: String,
}
impl Event for ShippedV1 {
    const NAME: &'static str = "orders.Shipped";
    const TOPIC: Option<&'static str> = Some("orders");
}

/// A processor with a v3 `Placed` handler and a v2 `Shipped` handler, recording what they get.
async fn start(
    broker: &MemoryBroker,
) -> (
    cqrs::RunningProcessor,
    Arc<Mutex<Vec<Placed>>>,
    Arc<Mutex<Vec<String>>>,
) {
    let placed: Arc<Mutex<Vec<Placed>>> = Arc::default();
    let shipped: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut p = EventProcessor::new(broker.clone(), "svc");
    let seen = placed.clone();
    p.handle("on-placed", move |e: Placed| {
        seen.lock().unwrap().push(e);
        std::future::ready(Ok::<_, String>(()))
    })
    .unwrap();
    let seen = shipped.clone();
    p.handle("on-shipped", move |e: Shipped| {
        seen.lock().unwrap().push(e.order_id);
        std::future::ready(Ok::<_, String>(()))
    })
    .unwrap();
    let running = p.start(CancellationToken::new()).await.unwrap();
    (running, placed, shipped)
}

#[tokio::test]
async fn older_versions_reach_a_newer_handler_through_the_chain() {
    let broker = MemoryBroker::new();
    let (running, placed, _) = start(&broker).await;
    let bus = EventBus::new(broker.clone());
    bus.publish(&PlacedV1 {
        order_id: "o-1".into(),
        total: 12.5,
    })
    .await
    .unwrap();
    bus.publish(&PlacedV2 {
        order_id: "o-2".into(),
        total_cents: 700,
    })
    .await
    .unwrap();
    bus.publish(&Placed {
        order_id: "o-3".into(),
        total_cents: 42,
        currency: "USD".into(),
    })
    .await
    .unwrap();
    let versions: Vec<u32> = broker
        .messages("orders")
        .iter()
        .map(|m| m.version)
        .collect();
    assert_eq!(versions, [1, 2, 3], "each written with its own version");
    eventually("three handled", || placed.lock().unwrap().len() == 3).await;
    let got = placed.lock().unwrap().clone();
    let placed = |id: &str, cents, currency: &str| Placed {
        order_id: id.into(),
        total_cents: cents,
        currency: currency.into(),
    };
    assert_eq!(
        got,
        [
            placed("o-1", 1250, "EUR"),
            placed("o-2", 700, "EUR"),
            placed("o-3", 42, "USD")
        ]
    );
    eventually("all acked", || {
        broker.pending("orders", "svc.on-placed").is_empty()
    })
    .await;
    running.shutdown().await.unwrap();
    assert!(broker.messages("svc.on-placed.dead-letter").is_empty());
}

#[tokio::test]
async fn a_newer_version_is_dead_lettered_with_the_reason() {
    let broker = MemoryBroker::new();
    let (running, placed, _) = start(&broker).await;
    EventBus::new(broker.clone())
        .publish(&PlacedV4 {
            order_id: "o-4".into(),
        })
        .await
        .unwrap();
    eventually("dead-lettered", || {
        broker.messages("svc.on-placed.dead-letter").len() == 1
    })
    .await;
    let dead = &broker.messages("svc.on-placed.dead-letter")[0];
    assert_eq!(
        dead.metadata.headers[dlq::REASON],
        "unknown version 4 of orders.OrderPlaced (handler knows up to 3)"
    );
    assert_eq!(dead.version, 4, "the message is kept as it was written");
    assert_eq!(dead.metadata.headers[dlq::ATTEMPTS], "1", "not retried");
    eventually("acked", || {
        broker.pending("orders", "svc.on-placed").is_empty()
    })
    .await;
    running.shutdown().await.unwrap();
    assert!(placed.lock().unwrap().is_empty());
}

#[tokio::test]
async fn an_older_version_with_no_upcast_is_dead_lettered_with_the_reason() {
    let broker = MemoryBroker::new();
    let (running, _, shipped) = start(&broker).await;
    let bus = EventBus::new(broker.clone());
    bus.publish(&ShippedV1 {
        order_id: "o-5".into(),
    })
    .await
    .unwrap();
    bus.publish(&Shipped {
        order_id: "o-6".into(),
    })
    .await
    .unwrap();
    eventually("dead-lettered", || {
        broker.messages("svc.on-shipped.dead-letter").len() == 1
    })
    .await;
    let dead = &broker.messages("svc.on-shipped.dead-letter")[0];
    assert_eq!(
        dead.metadata.headers[dlq::REASON],
        "no upcast from version 1 of orders.Shipped to version 2"
    );
    eventually("the v2 one handled", || shipped.lock().unwrap().len() == 1).await;
    assert_eq!(*shipped.lock().unwrap(), ["o-6"]);
    running.shutdown().await.unwrap();
}
