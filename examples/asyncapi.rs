//! Prints the AsyncAPI 3.0 document of the tickets service: its command and event channels, what
//! it sends, what each handler receives (with its consumer group), and the payload schemas.
//!
//! Run with: `cargo run --example asyncapi --features asyncapi`. `scripts/test` checks the output
//! with the official AsyncAPI parser (`scripts/asyncapi-validate.mjs`).

use cqrs::asyncapi::{schemars, Document};
use cqrs::memory::MemoryBroker;
use cqrs::{BoxError, Command, CommandBus, CommandProcessor, Event, EventBus, EventProcessor};
use serde::{Deserialize, Serialize};

/// Books seats for a ticket.
#[derive(Debug, Clone, Command, Serialize, Deserialize, schemars::JsonSchema)]
#[command(name = "tickets.BookTicket")]
#[schemars(crate = "cqrs::asyncapi::schemars")]
struct BookTicket {
    /// The ticket.
    ticket_id: String,
    /// How many seats.
    seats: u32,
}

/// Seats were booked.
#[derive(Debug, Clone, Event, Serialize, Deserialize, schemars::JsonSchema)]
#[event(name = "tickets.TicketBooked", version = 2)]
#[schemars(crate = "cqrs::asyncapi::schemars")]
struct TicketBooked {
    /// The ticket, also the ordering key.
    #[event(key)]
    ticket_id: String,
    /// How many seats.
    seats: u32,
    /// Where the receipt goes, if anywhere.
    email: Option<String>,
}

fn main() -> Result<(), BoxError> {
    let broker = MemoryBroker::new();
    let events = EventBus::new(broker.clone()).declare::<TicketBooked>();
    let commands_out = CommandBus::new(broker.clone()).declare::<BookTicket>();
    let mut commands = CommandProcessor::new(broker.clone(), "svc-tickets");
    commands.handle(|_: BookTicket| async { Ok::<_, BoxError>(()) })?;
    let mut handlers = EventProcessor::new(broker, "svc-tickets");
    handlers.handle("notify-on-booking", |_: TicketBooked| async {
        Ok::<_, BoxError>(())
    })?;
    handlers
        .handle("print-receipt", |_: TicketBooked| async {
            Ok::<_, BoxError>(())
        })?
        .concurrency(4);
    let doc = Document::new("svc-tickets")
        .description("Books tickets and tells the customer.")
        .manifest(events.manifest())
        .manifest(commands_out.manifest())
        .manifest(commands.manifest())
        .manifest(handlers.manifest())
        .command_schema::<BookTicket>()
        .schema::<TicketBooked>()
        .to_json();
    println!("{}", serde_json::to_string_pretty(&doc)?);
    Ok(())
}
