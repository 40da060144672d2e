//! A stream registry: three streams in two named Redis pools with three consumer groups, written
//! in code and loaded from YAML, and the error a duplicate stream name gets.
//!
//! Run with: `cargo run --example streams_registry --features redis` (needs redis-server on
//! 127.0.0.1:6379, or `REDIS_URL`; the second pool is database 3 of the same server).
//!
//! Streams must be unique across pools: registering `stream-a` in a second pool is a validation
//! error that names the stream and both pools. The group `read-group-ab` reads `stream-a` and
//! `stream-b` in one consumer.

use std::time::Duration;

use cqrs::backend::{Publisher, Subscriber};
use cqrs::redis::{RedisBackend, Topology};
use cqrs::{BoxError, Delivery, Message, Subscription};

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let server = std::env::var("REDIS_URL")
        .ok()
        .and_then(|u| {
            u.strip_prefix("redis://")
                .map(|s| s.split('/').next().unwrap_or("").to_owned())
        })
        .unwrap_or_else(|| "127.0.0.1:6379".into());

    // In code.
    let mut topology = Topology::new();
    topology
        .pool("default", &format!("{server}:0"))?
        .stream("default", "stream-a", ["read-group-a", "read-group-ab"])?
        .stream("default", "stream-b", ["read-group-ab"])?
        .pool("second", &format!("{server}:3"))?
        .stream("second", "stream-c", ["read-group-c"])?;
    match topology.stream("second", "stream-a", ["read-group-x"]) {
        Err(e) => println!("duplicate stream rejected: {e}"),
        Ok(_) => return Err("a duplicate stream was accepted".into()),
    }

    // The same from YAML.
    let yaml = format!(
        "default:\n  redis: {server}:0\n  streams:\n    stream-a: [read-group-a, read-group-ab]\n    stream-b: [read-group-ab]\nsecond:\n  redis: {server}:3\n  streams:\n    stream-c: [read-group-c]\n"
    );
    println!("YAML:\n{yaml}");
    let from_yaml = Topology::from_yaml(&yaml)?;
    assert_eq!(from_yaml, topology);
    println!("the YAML gives the same topology as the code");
    let typo = yaml.replace("streams:\n    stream-c", "strems:\n    stream-c");
    if let Err(e) = Topology::from_yaml(&typo) {
        println!("a typo in YAML: {e}");
    }

    let backend = RedisBackend::from_topology(&from_yaml).await?;
    for s in ["stream-a", "stream-b", "stream-c"] {
        backend.delete_stream(s).await?;
    }
    let backend = RedisBackend::from_topology(&from_yaml).await?; // creates the groups again
    backend
        .publish("stream-a", &[Message::new("A", b"{}".to_vec())])
        .await?;
    backend
        .publish("stream-b", &[Message::new("B", b"{}".to_vec())])
        .await?;
    backend
        .publish("stream-c", &[Message::new("C", b"{}".to_vec())])
        .await?;

    let mut ab = backend
        .subscribe(&Subscription::new(
            "read-group-ab",
            ["stream-a", "stream-b"],
        ))
        .await?;
    let mut got = Vec::new();
    while got.len() < 2 {
        let batch = tokio::time::timeout(Duration::from_secs(10), ab.receive(10)).await??;
        got.extend(batch);
    }
    for d in &got {
        println!(
            "read-group-ab got `{}` from {}",
            d.message().name,
            d.topic()
        );
    }
    Delivery::ack_all(got).await.map_err(|(e, _)| e)?;

    for s in ["stream-a", "stream-b", "stream-c"] {
        let stats = backend.stats(s).await?;
        let groups: Vec<String> = stats
            .groups
            .iter()
            .map(|g| format!("{} (lag {:?}, pending {})", g.name, g.lag, g.pending))
            .collect();
        println!(
            "{s} in pool `{}`: {} entries, groups {}",
            stats.pool,
            stats.length,
            groups.join(", ")
        );
        backend.delete_stream(s).await?;
    }
    Ok(())
}
