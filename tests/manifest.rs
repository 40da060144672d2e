//! The manifest a processor builds from its registrations, the checks `start` makes with it, and
//! the warning about a group a renamed handler left behind (in-memory broker).

#![allow(clippy::unwrap_used)]

use common::{keyed, Keyed};
use cqrs::memory::MemoryBroker;
use cqrs::processor::{GroupManifest, HandlerManifest};
use cqrs::{
    BatchError, CancellationToken, DeliveryMode, Error, EventBus, EventGroupProcessor,
    EventProcessor, GroupNamer,
};

mod common;

fn ok(_: Keyed) -> std::future::Ready<Result<(), String>> {
    std::future::ready(Ok(()))
}

#[test]
fn the_manifest_lists_each_group_with_its_handlers_topics_and_dead_letters() {
    let mut p = EventProcessor::new(MemoryBroker::new(), "svc-stats");
    p.handle("count", ok).unwrap().concurrency(4);
    p.handle_batch("store", |_: Vec<Keyed>| async { Ok::<_, BatchError>(()) })
        .unwrap()
        .dead_letter_topic("stats.failed")
        .at_most_once();
    let m = p.manifest();
    let handler = |name: &str, batch| HandlerManifest {
        name: name.into(),
        event: "Keyed".into(),
        version: 1,
        batch,
    };
    assert_eq!(m.service, "svc-stats");
    assert_eq!(
        m.groups,
        [
            GroupManifest {
                group: "svc-stats.count".into(),
                topics: vec!["Keyed".into()],
                handlers: vec![handler("count", false)],
                dead_letter_topic: "svc-stats.count.dead-letter".into(),
                delivery: DeliveryMode::AtLeastOnce,
                concurrency: 4,
                location: Some("the in-memory broker".into()),
            },
            GroupManifest {
                group: "svc-stats.store".into(),
                topics: vec!["Keyed".into()],
                handlers: vec![handler("store", true)],
                dead_letter_topic: "stats.failed".into(),
                delivery: DeliveryMode::AtMostOnce,
                concurrency: 1,
                location: Some("the in-memory broker".into()),
            },
        ]
    );
    assert_eq!(m.readers_of("Keyed").count(), 2);
    assert!(m.validate().is_ok());

    let mut g = EventGroupProcessor::new(MemoryBroker::new(), "svc-stats", "ledger");
    g.handle("count", ok).unwrap();
    assert_eq!(
        g.manifest().to_string(),
        "service svc-stats\n  group svc-stats.ledger (at-least-once, concurrency 1) on the \
         in-memory broker\n    \
         handler count: Keyed from Keyed\n    dead letters to svc-stats.ledger.dead-letter\n"
    );
}

#[tokio::test]
async fn two_handlers_mapped_to_one_group_are_refused_at_start() {
    let mut p = EventProcessor::new(MemoryBroker::new(), "svc")
        // A namer that forgets the handler name.
        .group_names(GroupNamer::new(|service, _handler| {
            format!("{service}-consumers")
        }));
    p.handle("mail", ok).unwrap();
    p.handle("audit", ok).unwrap();
    let err = p.start(CancellationToken::new()).await.unwrap_err();
    assert!(matches!(err, Error::Config(_)));
    assert_eq!(
        err.to_string(),
        "invalid configuration: handlers `mail` and `audit` of service `svc` map to one \
         consumer group `svc-consumers`: each would see only part of the messages; give each \
         its own group (check the group namer) or put them in one EventGroupProcessor"
    );
}

#[tokio::test]
async fn a_renamed_handler_warns_about_the_messages_its_old_group_holds() {
    let broker = MemoryBroker::new();
    let bus = EventBus::new(broker.clone());
    // Version 1 of the service: handler `notify`, stopped with work left.
    let mut v1 = EventProcessor::new(broker.clone(), "svc");
    v1.handle("notify", ok).unwrap();
    let running = v1.start(CancellationToken::new()).await.unwrap();
    assert!(running.warnings().is_empty());
    running.shutdown().await.unwrap();
    bus.publish_all(&keyed(3, 3)).await.unwrap();

    // Version 2 renamed it `notify-customer`: a new group, and the old one still holds 3.
    let mut v2 = EventProcessor::new(broker.clone(), "svc");
    v2.handle("notify-customer", ok).unwrap();
    let running = v2.start(CancellationToken::new()).await.unwrap();
    assert_eq!(
        running.warnings(),
        [
            "consumer group `svc.notify` on `Keyed` holds 0 pending and 3 undelivered messages, \
          but no handler of service `svc` reads it now (this processor reads `Keyed` as \
          `svc.notify-customer`): if a handler was renamed, those messages wait in the old \
          group; handle them, or delete the group"
        ]
    );
    running.shutdown().await.unwrap();

    // Another service's groups, and groups with nothing left, are not ours to warn about.
    let mut other = EventProcessor::new(broker.clone(), "svc-other");
    other.handle("notify", ok).unwrap();
    let running = other.start(CancellationToken::new()).await.unwrap();
    assert!(running.warnings().is_empty(), "{:?}", running.warnings());
    running.shutdown().await.unwrap();
}

#[test]
fn a_bus_declares_what_it_publishes_and_merges_with_the_processors() {
    let broker = MemoryBroker::new();
    let mut p = EventProcessor::new(broker.clone(), "svc");
    p.handle("count", ok).unwrap();
    let bus = EventBus::new(broker)
        .topics(cqrs::TopicNamer::new(|name| format!("t.{name}")))
        .declare::<Keyed>()
        .declare::<Keyed>();
    let all = p.manifest().merge(bus.manifest());
    assert_eq!(
        all.to_string(),
        "service svc\n  group svc.count (at-least-once, concurrency 1) on the in-memory \
         broker\n    handler count: Keyed \
         from Keyed\n    dead letters to svc.count.dead-letter\n  publishes Keyed v1 to t.Keyed\n"
    );
}

#[test]
fn a_declaration_on_a_clone_of_a_bus_leaves_the_bus_as_it_was() {
    let bus = EventBus::new(MemoryBroker::new());
    let declared = bus.clone().declare::<Keyed>();
    assert!(
        !bus.manifest().to_string().contains("publishes"),
        "{}",
        bus.manifest()
    );
    assert!(
        declared
            .manifest()
            .to_string()
            .contains("publishes Keyed v1 to Keyed"),
        "{}",
        declared.manifest()
    );
}
