//! A CQRS ticket service on Redis Streams: commands, events, and each event handler in the group
//! `svc-tickets.<handler>`, reading the stream named after its event.
//!
//! Run with: `cargo run --example tickets --features redis` (needs redis-server on
//! 127.0.0.1:6379, or `REDIS_URL`).
//!
//! `BookTicket` is handled by exactly one handler, which publishes `TicketBooked`. Two event
//! handlers react to it, each in its own consumer group, so each sees every booking once. The
//! `print-receipt` handler fails the first time for each ticket: the retry policy redelivers it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cqrs::redis::RedisBackend;
use cqrs::{
    BoxError, CancellationToken, Command, CommandBus, CommandProcessor, Context, Event, EventBus,
    EventProcessor, GroupNamer, RetryPolicy,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

#[derive(Debug, Clone, Command, Serialize, Deserialize)]
#[command(name = "tickets.BookTicket")]
struct BookTicket {
    ticket_id: String,
    seats: u32,
}

#[derive(Debug, Clone, Event, Serialize, Deserialize)]
#[event(name = "tickets.TicketBooked")]
struct TicketBooked {
    #[event(key)]
    ticket_id: String,
    seats: u32,
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into());
    let backend = RedisBackend::connect(&url).await?;
    for s in ["tickets.BookTicket", "tickets.TicketBooked"] {
        backend.delete_stream(s).await?;
    }
    let token = CancellationToken::new();
    let events = EventBus::new(backend.clone());
    let (done, mut handled) = mpsc::unbounded_channel::<String>();

    let mut commands = CommandProcessor::new(backend.clone(), "svc-tickets");
    let bus = events.clone();
    commands.handle(move |c: BookTicket, ctx: Context| {
        let bus = bus.clone();
        async move {
            println!(
                "[command]                  booking {} ({} seats)",
                c.ticket_id, c.seats
            );
            bus.publish_with(
                &TicketBooked {
                    ticket_id: c.ticket_id,
                    seats: c.seats,
                },
                ctx.caused_metadata(),
            )
            .await
        }
    })?;

    // Each handler gets the group "svc-tickets." + its name; the topic is the event's name.
    let mut processor = EventProcessor::new(backend.clone(), "tickets").group_names(
        GroupNamer::new(|service, handler| format!("svc-{service}.{handler}")),
    );
    let tx = done.clone();
    processor.handle("notify-on-booking", move |e: TicketBooked, ctx: Context| {
        println!("[{}] notify: {} booked", ctx.group(), e.ticket_id);
        std::future::ready(tx.send(format!("notified {}", e.ticket_id)))
    })?;
    let tx = done.clone();
    let failed_once = Arc::new(AtomicBool::new(false));
    processor
        .handle("print-receipt", move |e: TicketBooked, ctx: Context| {
            let first = !failed_once.swap(true, Ordering::SeqCst);
            let result = if first {
                println!(
                    "[{}]     printer jammed on {} (attempt {})",
                    ctx.group(),
                    e.ticket_id,
                    ctx.attempt()
                );
                Err("printer jammed".to_string())
            } else {
                println!(
                    "[{}]     receipt for {} (attempt {})",
                    ctx.group(),
                    e.ticket_id,
                    ctx.attempt()
                );
                tx.send(format!("receipt {}", e.ticket_id))
                    .map_err(|e| e.to_string())
            };
            std::future::ready(result)
        })?
        .retry(RetryPolicy::attempts(3).backoff(Duration::from_millis(200), 2.0));

    let running = [
        commands.start(token.clone()).await?,
        processor.start(token.clone()).await?,
    ];
    let send = CommandBus::new(backend.clone());
    send.send(&BookTicket {
        ticket_id: "t-1".into(),
        seats: 2,
    })
    .await?;
    send.send(&BookTicket {
        ticket_id: "t-2".into(),
        seats: 1,
    })
    .await?;

    for _ in 0..4 {
        tokio::time::timeout(Duration::from_secs(10), handled.recv())
            .await?
            .ok_or("handlers stopped")?;
    }
    token.cancel();
    for r in running {
        r.wait().await?;
    }
    for s in ["tickets.BookTicket", "tickets.TicketBooked"] {
        let stats = backend.stats(s).await?;
        for g in &stats.groups {
            println!("{s}: group {} has {} pending", g.name, g.pending);
        }
        backend.delete_stream(s).await?;
    }
    Ok(())
}
