//! Quick start: two events, one command, an event bus and processors on the in-memory broker.
//!
//! Run with: `cargo run --example quickstart` (no server needed).
//!
//! A `BookTicket` command is handled by exactly one handler, which publishes `BookingConfirmed`.
//! Two event handlers, each in its own consumer group (`svc-tickets.notify-on-booking` and
//! `svc-tickets.release-seats`), react to the events. Switching to Redis or Kafka changes the
//! `MemoryBroker::new()` line only.

use std::time::Duration;

use cqrs::memory::MemoryBroker;
use cqrs::{
    BoxError, CancellationToken, Command, CommandBus, CommandProcessor, Context, Event, EventBus,
    EventProcessor,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

#[derive(Debug, Event, Serialize, Deserialize)]
#[event(name = "tickets.BookingConfirmed")]
struct BookingConfirmed {
    #[event(key)]
    booking_id: String,
    seats: u32,
}

#[derive(Debug, Event, Serialize, Deserialize)]
#[event(name = "tickets.BookingCancelled")]
struct BookingCancelled {
    #[event(key)]
    booking_id: String,
}

#[derive(Debug, Command, Serialize, Deserialize)]
struct BookTicket {
    booking_id: String,
    seats: u32,
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let broker = MemoryBroker::new();
    let events = EventBus::new(broker.clone());
    let commands = CommandBus::new(broker.clone());
    let (done, mut handled) = mpsc::unbounded_channel::<()>();
    let token = CancellationToken::new();

    // Commands: one handler per command type.
    let mut command_processor = CommandProcessor::new(broker.clone(), "svc-tickets");
    let bus = events.clone();
    command_processor.handle(move |cmd: BookTicket, ctx: Context| {
        let bus = bus.clone();
        async move {
            println!(
                "[BookTicket]        booking {} for {} seats",
                cmd.booking_id, cmd.seats
            );
            let event = BookingConfirmed {
                booking_id: cmd.booking_id,
                seats: cmd.seats,
            };
            bus.publish_with(&event, ctx.caused_metadata()).await
        }
    })?;

    // Events: each handler in its own consumer group, so each sees every event once.
    let mut event_processor = EventProcessor::new(broker.clone(), "svc-tickets");
    let tx = done.clone();
    event_processor.handle(
        "notify-on-booking",
        move |e: BookingConfirmed, ctx: Context| {
            println!(
                "[{}] {} seats for {} (correlation {})",
                ctx.group(),
                e.seats,
                e.booking_id,
                ctx.metadata().correlation_id.as_deref().unwrap_or("-")
            );
            let sent = tx.send(());
            async move { sent.map_err(|_| "main has stopped listening") }
        },
    )?;
    let tx = done.clone();
    event_processor.handle("release-seats", move |e: BookingCancelled, ctx: Context| {
        println!(
            "[{}]     releasing the seats of {}",
            ctx.group(),
            e.booking_id
        );
        let sent = tx.send(());
        async move { sent.map_err(|_| "main has stopped listening") }
    })?;

    let running = [
        command_processor.start(token.clone()).await?,
        event_processor.start(token.clone()).await?,
    ];

    commands
        .send(&BookTicket {
            booking_id: "b-1".into(),
            seats: 2,
        })
        .await?;
    commands
        .send(&BookTicket {
            booking_id: "b-2".into(),
            seats: 4,
        })
        .await?;
    events
        .publish(&BookingCancelled {
            booking_id: "b-1".into(),
        })
        .await?;

    for _ in 0..3 {
        tokio::time::timeout(Duration::from_secs(10), handled.recv())
            .await?
            .ok_or("handlers stopped")?;
    }
    token.cancel();
    for r in running {
        r.wait().await?;
    }
    println!("done: 2 commands and 3 events handled");
    Ok(())
}
