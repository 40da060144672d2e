//! The test kit (`cqrs::testing`), as a user writes tests with it: each assertion and each fault,
//! and the quick start's behaviour. Time is paused: retries' backoffs pass at once.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cqrs::testing::{NotIdle, Outcome, TestKit};
use cqrs::{
    permanent, retry_after, BatchError, Command, CommandBus, CommandProcessor, Context, Event,
    EventBus, EventProcessor, RetryPolicy,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Event, Serialize, Deserialize)]
#[event(name = "tickets.BookingConfirmed")]
struct BookingConfirmed {
    #[event(key)]
    booking_id: String,
    seats: u32,
}

#[derive(Debug, Clone, PartialEq, Event, Serialize, Deserialize)]
#[event(name = "tickets.BookingCancelled")]
struct BookingCancelled {
    #[event(key)]
    booking_id: String,
}

#[derive(Debug, Clone, PartialEq, Command, Serialize, Deserialize)]
struct BookTicket {
    booking_id: String,
    seats: u32,
}

/// The quick start's registration (`examples/quickstart.rs`), given any backend's buses.
fn quickstart(
    commands: &mut CommandProcessor,
    events: &mut EventProcessor,
    bus: EventBus,
) -> cqrs::Result<()> {
    commands.handle(move |cmd: BookTicket, ctx: Context| {
        let bus = bus.clone();
        async move {
            let event = BookingConfirmed {
                booking_id: cmd.booking_id,
                seats: cmd.seats,
            };
            bus.publish_with(&event, ctx.caused_metadata()).await
        }
    })?;
    events.handle("notify-on-booking", |_: BookingConfirmed| async {
        Ok::<_, String>(())
    })?;
    events.handle("release-seats", |_: BookingCancelled| async {
        Ok::<_, String>(())
    })?;
    Ok(())
}

/// The quick start without a channel or a sleep: two commands and a cancellation, then what
/// was sent, published and handled, each handler in its own group.
#[tokio::test(start_paused = true)]
async fn the_quick_start_sends_publishes_and_handles_as_it_says() {
    let mut kit = TestKit::new();
    let (events, commands) = (EventBus::new(kit.broker()), CommandBus::new(kit.broker()));
    let mut command_processor = CommandProcessor::new(kit.broker(), "svc-tickets");
    let mut event_processor = EventProcessor::new(kit.broker(), "svc-tickets");
    quickstart(&mut command_processor, &mut event_processor, events.clone()).unwrap();
    kit.start(command_processor).await.unwrap();
    kit.start(event_processor).await.unwrap();

    for (id, seats) in [("b-1", 2), ("b-2", 4)] {
        commands
            .send(&BookTicket {
                booking_id: id.into(),
                seats,
            })
            .await
            .unwrap();
    }
    events
        .publish(&BookingCancelled {
            booking_id: "b-1".into(),
        })
        .await
        .unwrap();
    kit.run_until_idle().await;

    assert_eq!(kit.sent::<BookTicket>().len(), 2);
    let confirmed = vec![
        BookingConfirmed {
            booking_id: "b-1".into(),
            seats: 2,
        },
        BookingConfirmed {
            booking_id: "b-2".into(),
            seats: 4,
        },
    ];
    assert_eq!(kit.published::<BookingConfirmed>(), confirmed);
    assert_eq!(
        kit.handled::<BookingConfirmed>("notify-on-booking"),
        confirmed
    );
    assert_eq!(
        kit.handled::<BookingCancelled>("release-seats"),
        [BookingCancelled {
            booking_id: "b-1".into()
        }]
    );
    let calls = kit.calls("notify-on-booking");
    assert!(calls
        .iter()
        .all(|c| c.group == "svc-tickets.notify-on-booking"));
    // The command's correlation carried into its event.
    let sent = kit.calls("BookTicket");
    assert_eq!(
        calls[0].message.metadata.correlation_id.as_deref(),
        Some(sent[0].message.id.as_str())
    );
    assert!(kit.dead_letters().is_empty());
    kit.shutdown().await.unwrap();
}

/// `fail_next` fails a handler's next calls; a retry policy of 5 attempts with backoffs of
/// 10 s, 20 s, 40 s gets through on the fourth, and the test takes milliseconds: time is paused.
#[tokio::test(start_paused = true)]
async fn failures_on_demand_are_retried_with_backoff_at_once() {
    let mut kit = TestKit::new();
    let bus = EventBus::new(kit.broker());
    let mut p = EventProcessor::new(kit.broker(), "svc");
    p.handle("notify", |_: BookingConfirmed| async {
        Ok::<_, String>(())
    })
    .unwrap()
    .retry(
        RetryPolicy::attempts(5)
            .backoff(Duration::from_secs(10), 2.0)
            .max_delay(Duration::from_secs(60))
            .jitter(false),
    );
    kit.start(p).await.unwrap();
    kit.fail_next("notify", 3, "mail server down");

    let (wall, clock) = (std::time::Instant::now(), tokio::time::Instant::now());
    bus.publish(&booking("b-1")).await.unwrap();
    kit.run_until_idle().await;
    assert!(
        clock.elapsed() >= Duration::from_secs(70),
        "{:?}",
        clock.elapsed()
    );
    assert!(
        wall.elapsed() < Duration::from_secs(5),
        "{:?}",
        wall.elapsed()
    );

    let calls = kit.calls("notify");
    let seen: Vec<(u32, bool)> = calls
        .iter()
        .map(|c| (c.attempt, c.outcome.is_ok()))
        .collect();
    assert_eq!(seen, [(1, false), (2, false), (3, false), (4, true)]);
    assert_eq!(calls[0].outcome, Err("mail server down".to_owned()));
    let id = calls[0].message.id.clone();
    assert_eq!(
        kit.outcome("svc.notify", &id),
        Outcome::Handled {
            handler: "notify".into(),
            attempts: 4
        }
    );
    kit.shutdown().await.unwrap();
}

/// A handler that keeps failing is dead-lettered after its attempts, with the reason; a
/// permanent error at once; `retry_after` waits as asked (on the paused clock).
#[tokio::test(start_paused = true)]
async fn dead_letters_carry_the_reason_and_the_attempts() {
    let mut kit = TestKit::new();
    let bus = EventBus::new(kit.broker());
    let mut p = EventProcessor::new(kit.broker(), "svc");
    p.handle("charge", |e: BookingConfirmed| async move {
        match e.booking_id.as_str() {
            "card-expired" => Err(permanent("card expired")),
            "busy" => Err(retry_after(Duration::from_secs(600), "bank busy")),
            _ => Err("bank down".into()),
        }
    })
    .unwrap()
    .retry(RetryPolicy::attempts(3).backoff(Duration::from_secs(1), 2.0));
    kit.start(p).await.unwrap();
    for id in ["card-expired", "busy", "down"] {
        bus.publish(&booking(id)).await.unwrap();
    }
    let clock = tokio::time::Instant::now();
    kit.run_until_idle().await;
    assert!(
        clock.elapsed() >= Duration::from_secs(1200),
        "two waits of 600 s"
    );

    let expired = kit.dead_letter("charge", "card expired");
    assert_eq!(expired.attempts, 1);
    assert_eq!(expired.group, "svc.charge");
    assert_eq!(expired.message.name, "tickets.BookingConfirmed");
    assert_eq!(kit.dead_letter("charge", "bank busy").attempts, 3);
    assert_eq!(kit.dead_letter("charge", "bank down").attempts, 3);
    assert_eq!(
        kit.outcome("svc.charge", &expired.message.id),
        Outcome::DeadLettered {
            handler: "charge".into(),
            reason: "card expired".into(),
            attempts: 1
        }
    );
    assert!(kit.handled::<BookingConfirmed>("charge").is_empty());
    kit.shutdown().await.unwrap();
}

/// A message delivered twice reaches the handler twice (what an idempotent handler must
/// absorb); a payload that does not decode is dead-lettered without reaching it.
#[tokio::test(start_paused = true)]
async fn twice_delivered_and_undecodable_messages_on_demand() {
    let mut kit = TestKit::new();
    let bus = EventBus::new(kit.broker());
    let seen = Arc::new(AtomicU32::new(0));
    let mut p = EventProcessor::new(kit.broker(), "svc");
    let s = seen.clone();
    p.handle("count", move |_: BookingConfirmed| {
        s.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, String>(()) }
    })
    .unwrap();
    kit.start(p).await.unwrap();

    let id = kit.publish_twice(&bus, &booking("b-1")).await.unwrap();
    let bad = kit
        .publish_undecodable::<BookingConfirmed, _>(&bus)
        .await
        .unwrap();
    kit.run_until_idle().await;

    let calls = kit.calls("count");
    let ids: Vec<(&str, bool)> = calls
        .iter()
        .map(|c| (c.message.id.as_str(), c.outcome.is_ok()))
        .collect();
    assert_eq!(
        ids,
        [
            (id.as_str(), true),
            (id.as_str(), true),
            (bad.as_str(), false)
        ]
    );
    assert_eq!(
        seen.load(Ordering::SeqCst),
        2,
        "the handler's code saw the copies only"
    );
    let dead = kit.dead_letters();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].message.id, bad);
    assert!(dead[0].reason.contains("decode"), "{}", dead[0].reason);
    kit.shutdown().await.unwrap();
}

/// `run_until_idle` waits for an at-most-once handler that is still running after its message
/// was acked, and for a batch handler's retries.
#[tokio::test(start_paused = true)]
async fn idle_means_no_handler_runs_even_after_an_early_ack() {
    let mut kit = TestKit::new();
    let bus = EventBus::new(kit.broker());
    let slow_done = Arc::new(AtomicU32::new(0));
    let mut p = EventProcessor::new(kit.broker(), "svc");
    let done = slow_done.clone();
    p.handle("slow", move |_: BookingConfirmed| {
        let done = done.clone();
        async move {
            tokio::time::sleep(Duration::from_secs(60)).await;
            done.fetch_add(1, Ordering::SeqCst);
            Ok::<_, String>(())
        }
    })
    .unwrap()
    .at_most_once();
    let batches = Arc::new(AtomicU32::new(0));
    let b = batches.clone();
    p.handle_batch("archive", move |events: Vec<BookingConfirmed>| {
        let b = b.clone();
        async move {
            // The first batch fails whole, and is retried.
            if b.fetch_add(1, Ordering::SeqCst) == 0 {
                return Err(BatchError::from("archive offline"));
            }
            assert!(!events.is_empty());
            Ok(())
        }
    })
    .unwrap()
    .retry(RetryPolicy::attempts(3).backoff(Duration::from_secs(30), 1.0));
    kit.start(p).await.unwrap();
    bus.publish(&booking("b-1")).await.unwrap();
    kit.run_until_idle().await;
    assert_eq!(slow_done.load(Ordering::SeqCst), 1);
    assert_eq!(batches.load(Ordering::SeqCst), 2);
    kit.shutdown().await.unwrap();
}

/// A test that waits for work that never finishes fails saying which group holds what; the
/// assertions' failures say what was seen instead.
#[tokio::test(start_paused = true)]
async fn failures_say_what_was_seen() {
    let mut kit = TestKit::new();
    let bus = EventBus::new(kit.broker());
    let mut p = EventProcessor::new(kit.broker(), "svc");
    p.handle("stuck", |_: BookingConfirmed| async {
        std::future::pending::<()>().await;
        Ok::<_, String>(())
    })
    .unwrap();
    kit.start(p).await.unwrap();
    bus.publish(&booking("b-1")).await.unwrap();
    let wall = std::time::Instant::now();
    let err = kit.try_run_until_idle().await.unwrap_err();
    assert!(
        matches!(err, NotIdle::Timeout { waited, .. } if waited >= Duration::from_secs(3600)),
        "{err}"
    );
    assert!(
        wall.elapsed() < Duration::from_secs(10),
        "{:?}",
        wall.elapsed()
    );
    let text = err.to_string();
    assert!(
        text.contains("svc.stuck: 0 not delivered, 1 pending")
            && text.contains("1 messages in the handlers' hands"),
        "{text}"
    );

    let no_calls = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| kit.calls("other")));
    let shown = panic_text(no_calls.unwrap_err());
    assert!(shown.contains("no call of handler `other`"), "{shown}");
    let none = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        kit.dead_letter("stuck", "anything")
    }));
    let shown = panic_text(none.unwrap_err());
    assert!(shown.contains("dead letters: []"), "{shown}");
}

fn panic_text(panic: Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_default()
}

fn booking(id: &str) -> BookingConfirmed {
    BookingConfirmed {
        booking_id: id.into(),
        seats: 1,
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(name = "orders.OrderPlaced", topic = "orders", version = 1)]
struct OrderPlacedV1 {
    order_id: String,
    total: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(name = "orders.OrderPlaced", topic = "orders", version = 3)]
struct OrderPlacedV3 {
    order_id: String,
    lines: Vec<String>,
}

/// `examples/versioning.rs`'s behaviour: a handler of version 2 gets version 1 upcast and
/// version 2 as it is; version 3 is dead-lettered with the reason.
#[tokio::test(start_paused = true)]
async fn the_versioning_example_upcasts_and_dead_letters_as_it_says() {
    let mut kit = TestKit::new();
    let bus = EventBus::new(kit.broker());
    let mut billing = EventProcessor::new(kit.broker(), "svc-billing");
    billing
        .handle("invoice", |_: OrderPlaced| async { Ok::<_, String>(()) })
        .unwrap();
    kit.start(billing).await.unwrap();
    let v1 = OrderPlacedV1 {
        order_id: "o-1".into(),
        total: 19.99,
    };
    let v2 = OrderPlaced {
        order_id: "o-2".into(),
        total_cents: 4500,
        customer: Some("c-7".into()),
    };
    bus.publish(&v1).await.unwrap();
    bus.publish(&v2).await.unwrap();
    bus.publish(&OrderPlacedV3 {
        order_id: "o-3".into(),
        lines: vec!["book".into()],
    })
    .await
    .unwrap();
    kit.run_until_idle().await;

    assert_eq!(kit.published::<OrderPlacedV1>(), [v1]);
    assert_eq!(kit.published::<OrderPlaced>(), std::slice::from_ref(&v2));
    assert_eq!(
        kit.handled::<OrderPlaced>("invoice"),
        [
            OrderPlaced {
                order_id: "o-1".into(),
                total_cents: 1999,
                customer: None
            },
            v2
        ]
    );
    let dead = kit.dead_letter("invoice", "version 3");
    assert_eq!((dead.message.version, dead.attempts), (3, 1));
    kit.shutdown().await.unwrap();
}

#[derive(Debug, Clone, PartialEq, Command, Serialize, Deserialize)]
#[command(name = "tickets.BookTicket")]
struct BookTicketCmd {
    ticket_id: String,
    seats: u32,
}

#[derive(Debug, Clone, PartialEq, Event, Serialize, Deserialize)]
#[event(name = "tickets.TicketBooked")]
struct TicketBooked {
    #[event(key)]
    ticket_id: String,
    seats: u32,
}

/// `examples/tickets.rs`'s behaviour (there on Redis; the registration does not change): the
/// command publishes `TicketBooked`, each handler's group is named by the `GroupNamer`, and the
/// receipt printer's first failure is retried.
#[tokio::test(start_paused = true)]
async fn the_tickets_example_books_notifies_and_retries_the_receipt() {
    let mut kit = TestKit::new();
    let events = EventBus::new(kit.broker());
    let mut commands = CommandProcessor::new(kit.broker(), "svc-tickets");
    let bus = events.clone();
    commands
        .handle(move |c: BookTicketCmd, ctx: Context| {
            let bus = bus.clone();
            async move {
                let e = TicketBooked {
                    ticket_id: c.ticket_id,
                    seats: c.seats,
                };
                bus.publish_with(&e, ctx.caused_metadata()).await
            }
        })
        .unwrap();
    let mut processor = EventProcessor::new(kit.broker(), "tickets").group_names(
        cqrs::GroupNamer::new(|service, handler| format!("svc-{service}.{handler}")),
    );
    processor
        .handle("notify-on-booking", |_: TicketBooked| async {
            Ok::<_, String>(())
        })
        .unwrap();
    let failed_once = Arc::new(std::sync::atomic::AtomicBool::new(false));
    processor
        .handle("print-receipt", move |_: TicketBooked| {
            let first = !failed_once.swap(true, Ordering::SeqCst);
            std::future::ready(if first {
                Err("printer jammed".to_owned())
            } else {
                Ok(())
            })
        })
        .unwrap()
        .retry(RetryPolicy::attempts(3).backoff(Duration::from_millis(200), 2.0));
    kit.start(commands).await.unwrap();
    kit.start(processor).await.unwrap();

    let send = CommandBus::new(kit.broker());
    for (id, seats) in [("t-1", 2), ("t-2", 1)] {
        send.send(&BookTicketCmd {
            ticket_id: id.into(),
            seats,
        })
        .await
        .unwrap();
    }
    kit.run_until_idle().await;

    let booked = [
        TicketBooked {
            ticket_id: "t-1".into(),
            seats: 2,
        },
        TicketBooked {
            ticket_id: "t-2".into(),
            seats: 1,
        },
    ];
    assert_eq!(kit.published::<TicketBooked>(), booked);
    assert_eq!(kit.handled::<TicketBooked>("notify-on-booking"), booked);
    let receipts = kit.calls("print-receipt");
    let seen: Vec<(&str, u32, bool)> = receipts
        .iter()
        .map(|c| (c.group.as_str(), c.attempt, c.outcome.is_ok()))
        .collect();
    assert_eq!(
        seen,
        [
            ("svc-tickets.print-receipt", 1, false),
            ("svc-tickets.print-receipt", 2, true),
            ("svc-tickets.print-receipt", 1, true)
        ]
    );
    assert_eq!(kit.handled::<TicketBooked>("print-receipt").len(), 2);
    kit.shutdown().await.unwrap();
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(name = "shop.OrderPlaced", topic = "orders")]
struct ShopOrder {
    #[event(key)]
    customer: String,
    order: u32,
}

/// `examples/order_consumers.rs`'s behaviour (there on Kafka): two members of one group named by
/// the `GroupNamer` share the orders, each order handled exactly once by the group.
#[tokio::test(start_paused = true)]
async fn the_order_consumers_example_handles_each_order_once_in_the_group() {
    let mut kit = TestKit::new();
    for _member in ["consumer-1", "consumer-2"] {
        let mut p =
            EventProcessor::new(kit.broker(), "shop").group_names(cqrs::GroupNamer::new(|_, _| {
                "order-consumer-group".to_owned()
            }));
        p.handle("orders", |_: ShopOrder| async { Ok::<_, String>(()) })
            .unwrap();
        kit.start(p).await.unwrap();
    }
    let orders: Vec<ShopOrder> = (1..=20)
        .map(|order| ShopOrder {
            customer: format!("customer-{}", order % 6),
            order,
        })
        .collect();
    EventBus::new(kit.broker())
        .publish_all(&orders)
        .await
        .unwrap();
    kit.run_until_idle().await;

    let calls = kit.calls("orders");
    assert!(calls
        .iter()
        .all(|c| c.group == "order-consumer-group" && c.outcome.is_ok()));
    let mut handled: Vec<u32> = kit
        .handled::<ShopOrder>("orders")
        .into_iter()
        .map(|o| o.order)
        .collect();
    handled.sort_unstable();
    assert_eq!(handled, (1..=20).collect::<Vec<_>>(), "each once");
    kit.shutdown().await.unwrap();
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(name = "billing.PaymentReceived")]
struct PaymentReceived {
    #[event(key)]
    invoice: String,
    cents: u64,
}

/// `examples/delivery_semantics.rs`'s behaviour (there on Kafka), a handler failing its first
/// attempt: at-least-once retries it and books the payment; at-most-once does not retry, and the
/// payment goes to the dead-letter topic with the reason.
#[tokio::test(start_paused = true)]
async fn the_delivery_semantics_example_retries_at_least_once_and_dead_letters_at_most_once() {
    let mut kit = TestKit::new();
    let bus = EventBus::new(kit.broker());
    for (name, mode) in [
        ("post-commit", cqrs::DeliveryMode::AtLeastOnce),
        ("pre-commit", cqrs::DeliveryMode::AtMostOnce),
    ] {
        let mut p = EventProcessor::new(kit.broker(), "svc-billing");
        p.handle(name, |_: PaymentReceived, ctx: Context| {
            std::future::ready(if ctx.attempt() == 1 {
                Err("ledger locked")
            } else {
                Ok(())
            })
        })
        .unwrap()
        .delivery(mode)
        .retry(RetryPolicy::attempts(3).backoff(Duration::from_millis(100), 2.0));
        kit.start(p).await.unwrap();
    }
    let id = {
        bus.publish(&PaymentReceived {
            invoice: "inv-7".into(),
            cents: 4200,
        })
        .await
        .unwrap();
        kit.run_until_idle().await;
        kit.calls("post-commit")[0].message.id.clone()
    };

    let attempts = |h: &str| -> Vec<(u32, bool)> {
        kit.calls(h)
            .iter()
            .map(|c| (c.attempt, c.outcome.is_ok()))
            .collect()
    };
    assert_eq!(attempts("post-commit"), [(1, false), (2, true)]);
    assert_eq!(
        kit.outcome("svc-billing.post-commit", &id),
        Outcome::Handled {
            handler: "post-commit".into(),
            attempts: 2
        }
    );
    assert_eq!(attempts("pre-commit"), [(1, false)]);
    let dead = kit.dead_letter("pre-commit", "ledger locked");
    assert_eq!((dead.attempts, dead.message.id.as_str()), (1, id.as_str()));
    kit.shutdown().await.unwrap();
}
