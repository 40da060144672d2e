//! A bank on the outbox and the inbox (docs/outbox.md): commands change the accounts and store
//! their events in the same transaction; a relay sends the events after the commit; a
//! projection keeps a read model through the inbox, so a redelivered event counts once.
//!
//! Run: `DATABASE_URL=postgres://... cargo run --example bank --features postgres`
//! (`scripts/postgres start DIR` prints a URL). The events go through the in-memory broker here;
//! `RedisBackend::connect` or `KafkaBackend::connect` in its place changes nothing else.

use std::time::Duration;

use cqrs::memory::MemoryBroker;
use cqrs::postgres::sqlx::{self, postgres::PgPoolOptions, PgPool};
use cqrs::postgres::{Inbox, Outbox, OutboxRelay, OutboxStore};
use cqrs::{BoxError, CancellationToken, Event, EventBus, EventProcessor};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(name = "bank.MoneyMoved")]
struct MoneyMoved {
    #[event(key)]
    from: String,
    to: String,
    cents: i64,
}

/// The command: moves `cents` from one account to another, and says so, in one transaction.
/// Fails (and changes nothing, sends nothing) when the money is not there.
async fn move_money(
    pool: &PgPool,
    outbox: &Outbox,
    schema: &str,
    from: &str,
    to: &str,
    cents: i64,
) -> Result<(), BoxError> {
    let mut tx = pool.begin().await?;
    let left: Option<i64> = sqlx::query_scalar(&format!(
        "UPDATE {schema}.accounts SET balance = balance - $1 WHERE id = $2 AND balance >= $1 RETURNING balance"
    ))
    .bind(cents)
    .bind(from)
    .fetch_optional(&mut *tx)
    .await?;
    if left.is_none() {
        // Dropping `tx` rolls it back: nothing changed, nothing will be sent.
        return Err(format!("{from} cannot pay {cents}").into());
    }
    sqlx::query(&format!(
        "UPDATE {schema}.accounts SET balance = balance + $1 WHERE id = $2"
    ))
    .bind(cents)
    .bind(to)
    .execute(&mut *tx)
    .await?;
    let event = MoneyMoved {
        from: from.into(),
        to: to.into(),
        cents,
    };
    outbox.publish(&mut tx, &event).await?;
    tx.commit().await?;
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

    // The read model: how much went out of each account, once per event.
    let inbox = Inbox::new(pool.clone(), store.clone());
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

    move_money(&pool, &outbox, &schema, "alice", "bob", 2500).await?;
    move_money(&pool, &outbox, &schema, "bob", "alice", 1000).await?;
    let refused = move_money(&pool, &outbox, &schema, "bob", "alice", 1_000_000).await;
    println!(
        "a transfer bob cannot pay: {}",
        refused.err().map(|e| e.to_string()).unwrap_or_default()
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
    relay.await??;
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&pool)
        .await?;
    if rows != [("alice".to_owned(), 2500), ("bob".to_owned(), 1000)] {
        return Err(format!("the read model shows {rows:?}").into());
    }
    Ok(())
}
