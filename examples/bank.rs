//! A bank on the outbox and the inbox (docs/outbox.md): a command handler changes the accounts
//! and stores its events in one transaction (which `Inbox::once` gives it, so a command
//! delivered twice moves the money once); a relay sends the events after the commit; a
//! projection keeps a read model through the inbox, so a redelivered event counts once.
//!
//! Run: `DATABASE_URL=postgres://... cargo run --example bank --features postgres`
//! (`scripts/postgres start DIR` prints a URL). The events go through the in-memory broker here;
//! `RedisBackend::connect` or `KafkaBackend::connect` in its place changes nothing else.

use std::time::Duration;

use cqrs::memory::MemoryBroker;
use cqrs::postgres::sqlx::{self, postgres::PgPoolOptions, PgConnection};
use cqrs::postgres::{Inbox, Outbox, OutboxRelay, OutboxStore};
use cqrs::{
    permanent, BoxError, CancellationToken, Command, CommandBus, CommandProcessor, Event, EventBus,
    EventProcessor, RetryPolicy,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(name = "bank.MoneyMoved")]
struct MoneyMoved {
    #[event(key)]
    from: String,
    to: String,
    cents: i64,
}

/// The command: move `cents` from one account to another.
#[derive(Debug, Clone, Serialize, Deserialize, Command)]
#[command(name = "bank.MoveMoney")]
struct MoveMoney {
    #[command(key)]
    from: String,
    to: String,
    cents: i64,
}

/// The command's handler, inside the transaction `tx`: moves the money and says so. Fails for
/// good (and `tx` rolls back: nothing changed, nothing will be sent) when the money is not there.
async fn move_money(
    tx: &mut PgConnection,
    outbox: &Outbox,
    schema: &str,
    cmd: MoveMoney,
) -> Result<(), BoxError> {
    let MoveMoney { from, to, cents } = cmd;
    let left: Option<i64> = sqlx::query_scalar(&format!(
        "UPDATE {schema}.accounts SET balance = balance - $1 WHERE id = $2 AND balance >= $1 RETURNING balance"
    ))
    .bind(cents)
    .bind(&from)
    .fetch_optional(&mut *tx)
    .await?;
    if left.is_none() {
        return Err(permanent(format!("{from} cannot pay {cents}")));
    }
    sqlx::query(&format!(
        "UPDATE {schema}.accounts SET balance = balance + $1 WHERE id = $2"
    ))
    .bind(cents)
    .bind(&to)
    .execute(&mut *tx)
    .await?;
    outbox.publish(tx, &MoneyMoved { from, to, cents }).await?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let url = std::env::var("DATABASE_URL")
        .map_err(|_| "set DATABASE_URL (scripts/postgres start DIR prints one)")?;
    let pool = PgPoolOptions::new()
        .max_connections(10)
        .connect(&url)
        .await?;
    // A schema of this run's own, dropped at the end.
    let schema = format!("bank_{}", std::process::id());
    let store = OutboxStore::new().schema(&schema)?;
    store.migrate(&pool).await?;
    for sql in [
        format!("CREATE TABLE {schema}.accounts (id TEXT PRIMARY KEY, balance BIGINT NOT NULL)"),
        format!(
            "CREATE TABLE {schema}.statements (account TEXT PRIMARY KEY, moved BIGINT NOT NULL)"
        ),
        format!("INSERT INTO {schema}.accounts VALUES ('alice', 10000), ('bob', 500)"),
    ] {
        sqlx::query(&sql).execute(&pool).await?;
    }

    let broker = MemoryBroker::new();
    let outbox = Outbox::new(EventBus::new(broker.clone()), store.clone());
    let token = CancellationToken::new();
    let relay = tokio::spawn(
        OutboxRelay::new(pool.clone(), store.clone(), broker.clone())
            .poll_interval(Duration::from_millis(200))
            .run(token.clone()),
    );

    let inbox = Inbox::new(pool.clone(), store.clone());

    // The commands: each one's writes and events in one transaction, once per command; one at a
    // time (the default concurrency), in the order sent.
    let mut commands = CommandProcessor::new(broker.clone(), "svc-bank");
    let (o, sc) = (outbox.clone(), schema.clone());
    commands
        .handle(inbox.once(move |cmd: MoveMoney, mut tx, _ctx| {
            let (outbox, schema) = (o.clone(), sc.clone());
            async move {
                move_money(&mut tx, &outbox, &schema, cmd).await?;
                Ok(tx)
            }
        }))?
        .retry(RetryPolicy::attempts(3).backoff(Duration::from_millis(50), 2.0));
    let commands = commands.start(token.clone()).await?;

    // The read model: how much went out of each account, once per event.
    let mut processor = EventProcessor::new(broker.clone(), "svc-bank");
    let statements = format!("{schema}.statements");
    processor.handle(
        "statements",
        inbox.once(move |e: MoneyMoved, mut tx, _ctx| {
            let statements = statements.clone();
            async move {
                sqlx::query(&format!(
                    "INSERT INTO {statements} VALUES ($1, $2)
                     ON CONFLICT (account) DO UPDATE SET moved = {statements}.moved + $2"
                ))
                .bind(&e.from)
                .bind(e.cents)
                .execute(&mut *tx)
                .await?;
                Ok(tx)
            }
        }),
    )?;
    let running = processor.start(token.clone()).await?;

    let bus = CommandBus::new(broker.clone());
    for (from, to, cents) in [
        ("alice", "bob", 2500),
        ("bob", "alice", 1000),
        ("bob", "alice", 1_000_000),
    ] {
        bus.send(&MoveMoney {
            from: from.into(),
            to: to.into(),
            cents,
        })
        .await?;
    }
    // The transfer bob cannot pay ends in the command's dead letters, with the reason.
    let dead = "svc-bank.bank.MoveMoney.dead-letter";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let refused = loop {
        if let Some(m) = broker.messages(dead).first() {
            break m
                .metadata
                .headers
                .get(cqrs::processor::dead_letter_headers::REASON)
                .cloned();
        }
        if tokio::time::Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!(
        "a transfer bob cannot pay: {}",
        refused.as_deref().unwrap_or("(not dead-lettered)")
    );

    // Wait for the read model to show both transfers (and only them).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let rows = loop {
        let rows: Vec<(String, i64)> = sqlx::query_as(&format!(
            "SELECT account, moved FROM {schema}.statements ORDER BY account"
        ))
        .fetch_all(&pool)
        .await?;
        if rows.len() == 2 || tokio::time::Instant::now() > deadline {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let balances: Vec<(String, i64)> = sqlx::query_as(&format!(
        "SELECT id, balance FROM {schema}.accounts ORDER BY id"
    ))
    .fetch_all(&pool)
    .await?;
    println!("balances: {balances:?}");
    println!("moved out, from the events: {rows:?}");
    println!(
        "events sent: {}, waiting in the outbox: {}",
        broker.messages("bank.MoneyMoved").len(),
        store.status(&pool).await?.depth
    );

    token.cancel();
    running.wait().await?;
    commands.wait().await?;
    relay.await??;
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&pool)
        .await?;
    if rows != [("alice".to_owned(), 2500), ("bob".to_owned(), 1000)] {
        return Err(format!("the read model shows {rows:?}").into());
    }
    if refused.is_none() {
        return Err("the transfer bob cannot pay was not dead-lettered".into());
    }
    Ok(())
}
