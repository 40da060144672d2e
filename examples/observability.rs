//! The tickets service with its metrics served to Prometheus and its spans printed to stdout.
//!
//! Run with: `cargo run --example observability --features prometheus`, then
//! `curl -s 127.0.0.1:9464/metrics` (`METRICS_ADDR` sets the address). With `--once` it scrapes
//! its own endpoint after the work is done, prints the `messaging_*` and `cqrs_*` lines (without the quantiles), and
//! exits. The in-memory broker keeps it self-contained; with `--features redis` or `kafka` only
//! the backend line changes, and the metrics say `backend="redis"` or `"kafka"`.
//!
//! `BookTicket` is handled by one command handler, which publishes `TicketBooked`; two event
//! handlers react in their own groups. `print-receipt` fails once per ticket (a retry), and
//! ticket `t-13` is refused for good (a dead letter), so every counter moves.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cqrs::memory::MemoryBroker;
use cqrs::prometheus::PrometheusBuilder;
use cqrs::{
    permanent, BoxError, CancellationToken, Command, CommandBus, CommandProcessor, Event, EventBus,
    EventProcessor,
};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing_subscriber::fmt::format::FmtSpan;

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

/// The body of `GET /metrics` on `addr`.
async fn scrape(addr: &str) -> std::io::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    Ok(response
        .split_once("\r\n\r\n")
        .map_or(response.clone(), |(_, body)| body.to_owned()))
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let once = std::env::args().any(|a| a == "--once");
    let addr = std::env::var("METRICS_ADDR").unwrap_or_else(|_| "127.0.0.1:9464".into());
    // Spans to stdout: one line when each message's `handle` span closes, with its fields.
    tracing_subscriber::fmt()
        .with_span_events(FmtSpan::CLOSE)
        .with_target(false)
        .with_env_filter("cqrs=info")
        .init();
    PrometheusBuilder::new()
        .with_http_listener(addr.parse::<std::net::SocketAddr>()?)
        .install()?;
    println!("metrics on http://{addr}/metrics");

    let broker = MemoryBroker::new();
    let events = EventBus::new(broker.clone());
    let token = CancellationToken::new();

    let mut commands = CommandProcessor::new(broker.clone(), "svc-tickets");
    let bus = events.clone();
    commands.handle(move |c: BookTicket| {
        let bus = bus.clone();
        async move {
            if c.ticket_id == "t-13" {
                return Err(permanent("ticket t-13 is not for sale"));
            }
            bus.publish(&TicketBooked {
                ticket_id: c.ticket_id,
                seats: c.seats,
            })
            .await
            .map_err(BoxError::from)
        }
    })?;

    let mut handlers = EventProcessor::new(broker.clone(), "svc-tickets");
    let notified = Arc::new(Mutex::new(HashSet::new()));
    let n = notified.clone();
    handlers.handle("notify-on-booking", move |e: TicketBooked| {
        n.lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(e.ticket_id);
        async { Ok::<_, BoxError>(()) }
    })?;
    let failed_once = Arc::new(Mutex::new(HashSet::new()));
    let printed = Arc::new(Mutex::new(HashSet::new()));
    let (f, p) = (failed_once.clone(), printed.clone());
    handlers
        .handle("print-receipt", move |e: TicketBooked| {
            let first = f
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(e.ticket_id.clone());
            if !first {
                p.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(e.ticket_id);
            }
            async move {
                if first {
                    Err("printer warming up".into())
                } else {
                    Ok::<_, BoxError>(())
                }
            }
        })?
        .retry(cqrs::RetryPolicy::default().backoff(Duration::from_millis(20), 2.0));

    let running_commands = commands.start(token.clone()).await?;
    let running_handlers = handlers.start(token.clone()).await?;
    let send = CommandBus::new(broker.clone());
    for i in 10..16 {
        send.send(&BookTicket {
            ticket_id: format!("t-{i}"),
            seats: 2,
        })
        .await?;
    }
    // Five tickets are sold (t-13 is dead-lettered): wait for both handlers to finish them.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let done = |s: &Mutex<HashSet<String>>| s.lock().map_or(0, |s| s.len());
        if done(&notified) == 5 && done(&printed) == 5 {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            return Err("the tickets were not handled within 10 s".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("5 tickets booked and printed, 1 refused (dead-lettered)");

    if once {
        let body = scrape(&addr).await?;
        for line in body
            .lines()
            .filter(|l| l.starts_with("messaging_") || l.starts_with("cqrs_"))
            .filter(|l| !l.contains("quantile="))
        {
            println!("{line}");
        }
    } else {
        println!("serving metrics until Ctrl-C");
        tokio::signal::ctrl_c().await?;
    }
    running_handlers.shutdown().await?;
    running_commands.shutdown().await?;
    Ok(())
}
