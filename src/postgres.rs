//! The transactional outbox on PostgreSQL (feature `postgres`): a command's state change and the
//! events about it commit together, and a relay sends the events after the commit
//! (`cqrs-postgres`, re-exported here, says how).
//!
//! ```no_run
//! # async fn run(pool: cqrs::postgres::sqlx::PgPool) -> Result<(), cqrs::BoxError> {
//! use cqrs::memory::MemoryBroker;
//! use cqrs::postgres::{Outbox, OutboxRelay, OutboxStore};
//! use cqrs::{CancellationToken, Event, EventBus};
//!
//! #[derive(serde::Serialize, serde::Deserialize, Event)]
//! struct SeatBooked { #[event(key)] show: String, seat: u32 }
//!
//! let broker = MemoryBroker::new();
//! let store = OutboxStore::new();
//! store.migrate(&pool).await?;
//! let outbox = Outbox::new(EventBus::new(broker.clone()), store.clone());
//!
//! let mut tx = pool.begin().await?;
//! // ... the state change, in `tx` ...
//! outbox.publish(&mut tx, &SeatBooked { show: "s1".into(), seat: 7 }).await?;
//! tx.commit().await?; // only now can the event be sent
//!
//! let relay = OutboxRelay::new(pool.clone(), store, broker);
//! tokio::spawn(relay.run(CancellationToken::new()));
//! # Ok(()) }
//! ```

pub use cqrs_postgres::*;

/// Samples the status of `store`'s outbox every `every` until `token` is cancelled: with the
/// `metrics` feature, as the gauges [`crate::telemetry::names::OUTBOX_DEPTH`] and
/// [`crate::telemetry::names::OUTBOX_OLDEST`] (label `schema`); a sample that fails (the
/// database away) is logged and tried again at the next tick. Without the feature it returns at
/// once. The `cqrs outbox status` command reads the same figures.
pub async fn sample_status(
    pool: sqlx::PgPool,
    store: OutboxStore,
    every: std::time::Duration,
    token: crate::CancellationToken,
) {
    #[cfg(feature = "metrics")]
    {
        use crate::telemetry::names;
        let labels = [("schema", store.schema_name().to_owned())];
        let depth = metrics::gauge!(names::OUTBOX_DEPTH, &labels);
        let oldest = metrics::gauge!(names::OUTBOX_OLDEST, &labels);
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = token.cancelled() => return,
                _ = tick.tick() => {}
            }
            match store.status(&pool).await {
                Ok(status) => {
                    depth.set(status.depth as f64);
                    oldest.set(status.oldest.map_or(0.0, |d| d.as_secs_f64()));
                }
                Err(e) => {
                    tracing::warn!(schema = %store.schema_name(), error = %cqrs_core::error_chain(&e), "sampling the outbox's status failed");
                }
            }
        }
    }
    #[cfg(not(feature = "metrics"))]
    {
        let _ = (pool, store, every, token);
    }
}

use crate::codec::{Codec, DefaultCodec};
use crate::{Event, EventBus, Metadata};

/// Stores typed events in the caller's database transaction, encoded as its bus would publish
/// them (name, version, key, metadata, trace context); a relay ([`OutboxRelay`]) sends them
/// after the commit.
#[derive(Debug, Clone)]
pub struct Outbox<C = DefaultCodec> {
    bus: EventBus<C>,
    store: OutboxStore,
}

impl<C> Outbox<C> {
    /// An outbox storing into `store` what `bus` would publish (its codec, its topic namer).
    pub fn new(bus: EventBus<C>, store: OutboxStore) -> Self {
        Outbox { bus, store }
    }

    /// Stores `event` in `tx` (pass `&mut tx` of a `sqlx` transaction): sent only if, and
    /// after, `tx` commits.
    pub async fn publish<E: Event>(
        &self,
        tx: &mut sqlx::PgConnection,
        event: &E,
    ) -> crate::Result<()>
    where
        C: Codec<E>,
    {
        self.publish_with(tx, event, Metadata::now()).await
    }

    /// [`Outbox::publish`] with the given metadata (correlation id, headers, ...).
    pub async fn publish_with<E: Event>(
        &self,
        tx: &mut sqlx::PgConnection,
        event: &E,
        metadata: Metadata,
    ) -> crate::Result<()>
    where
        C: Codec<E>,
    {
        let (topic, message) = self.bus.encode(event, metadata)?;
        self.store.insert(tx, &topic, &message).await?;
        Ok(())
    }

    /// Stores many events in `tx`, in order.
    pub async fn publish_all<'a, E: Event + 'a>(
        &self,
        tx: &mut sqlx::PgConnection,
        events: impl IntoIterator<Item = &'a E>,
    ) -> crate::Result<()>
    where
        C: Codec<E>,
    {
        for event in events {
            self.publish(&mut *tx, event).await?;
        }
        Ok(())
    }
}

/// Makes a handler take effect once per consumer group, even when the broker delivers a message
/// twice: the handler runs in a database transaction together with a row keyed by (group,
/// message id), and a message whose row exists is acked without running the handler again.
/// The handler's own writes (and events it stores through an [`Outbox`] in the same
/// transaction) commit or roll back with that row. Rows older than the retention are purged by
/// [`OutboxStore::purge_inbox`].
///
/// ```no_run
/// # async fn run(pool: cqrs::postgres::sqlx::PgPool) -> Result<(), cqrs::BoxError> {
/// use cqrs::postgres::{Inbox, OutboxStore};
/// use cqrs::{memory::MemoryBroker, Event, EventProcessor};
///
/// #[derive(serde::Serialize, serde::Deserialize, Event)]
/// struct SeatBooked { seat: u32 }
///
/// let inbox = Inbox::new(pool, OutboxStore::new());
/// let mut processor = EventProcessor::new(MemoryBroker::new(), "svc-tickets");
/// processor.handle("count-seats", inbox.once(|e: SeatBooked, mut tx, _ctx| async move {
///     sqlx::query("UPDATE shows SET booked = booked + 1").execute(&mut *tx).await?;
///     Ok(tx)
/// }))?;
/// # use cqrs::postgres::sqlx; Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Inbox {
    pool: sqlx::PgPool,
    store: OutboxStore,
}

/// A transaction of the pool an [`Inbox`] runs handlers in.
pub type Transaction = sqlx::Transaction<'static, sqlx::Postgres>;

impl Inbox {
    /// An inbox in `store`'s schema (migrated by [`OutboxStore::migrate`]), its transactions
    /// from `pool`.
    pub fn new(pool: sqlx::PgPool, store: OutboxStore) -> Self {
        Inbox { pool, store }
    }

    /// A handler (for `EventProcessor::handle` and the like) that runs `handler` once per
    /// (group, message id): inside a transaction that also records the message, which
    /// `handler` takes and hands back to be committed. An error from `handler` (or a dropped
    /// transaction) rolls everything back, and the message is retried as any failure is.
    pub fn once<E, F, Fut>(
        &self,
        handler: F,
    ) -> impl Fn(
        E,
        crate::Context,
    ) -> futures_util::future::BoxFuture<'static, Result<(), crate::BoxError>>
           + Clone
           + Send
           + Sync
           + 'static
    where
        E: Send + 'static,
        F: Fn(E, Transaction, crate::Context) -> Fut + Clone + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<Transaction, crate::BoxError>> + Send + 'static,
    {
        let inbox = self.clone();
        move |event: E, ctx: crate::Context| {
            let (inbox, handler) = (inbox.clone(), handler.clone());
            Box::pin(async move {
                let mut tx = inbox.pool.begin().await?;
                let first = inbox
                    .store
                    .claim_inbox(&mut tx, ctx.group(), ctx.message_id())
                    .await?;
                if !first {
                    tracing::debug!(group = %ctx.group(), message_id = %ctx.message_id(), "handled already (inbox); acked without running the handler");
                    tx.rollback().await?;
                    return Ok(());
                }
                let tx = handler(event, tx, ctx).await?;
                tx.commit().await?;
                Ok(())
            })
        }
    }

    /// [`Inbox::once`] for a batch handler (`EventProcessor::handle_batch`): one transaction per
    /// batch records every message of it; `handler` gets those its group had not handled yet
    /// (with their contexts, in order) and the transaction, and hands the transaction back to be
    /// committed. The others are acked without reaching it.
    ///
    /// The batch commits or rolls back as one: an error from `handler` (a whole-batch one, or
    /// events it marked as failed) rolls back every event's writes and records, so the whole
    /// batch fails and each of its events is retried (then dead-lettered) as the retry policy
    /// says.
    ///
    /// ```no_run
    /// # async fn run(pool: cqrs::postgres::sqlx::PgPool) -> Result<(), cqrs::BoxError> {
    /// use cqrs::postgres::{Inbox, OutboxStore};
    /// use cqrs::{memory::MemoryBroker, Context, Event, EventProcessor};
    ///
    /// #[derive(serde::Serialize, serde::Deserialize, Event)]
    /// struct SeatBooked { seat: i32 }
    ///
    /// let inbox = Inbox::new(pool, OutboxStore::new());
    /// let mut processor = EventProcessor::new(MemoryBroker::new(), "svc-tickets");
    /// processor.handle_batch(
    ///     "seats",
    ///     inbox.once_batch(|batch: Vec<(SeatBooked, Context)>, mut tx| async move {
    ///         let seats: Vec<i32> = batch.iter().map(|(e, _)| e.seat).collect();
    ///         sqlx::query("INSERT INTO seats SELECT unnest($1::int[])")
    ///             .bind(&seats)
    ///             .execute(&mut *tx)
    ///             .await?;
    ///         Ok(tx)
    ///     }),
    /// )?;
    /// # use cqrs::postgres::sqlx; Ok(()) }
    /// ```
    pub fn once_batch<E, F, Fut>(
        &self,
        handler: F,
    ) -> impl Fn(
        Vec<E>,
        Vec<crate::Context>,
    ) -> futures_util::future::BoxFuture<'static, Result<(), crate::BatchError>>
           + Clone
           + Send
           + Sync
           + 'static
    where
        E: Send + 'static,
        F: Fn(Vec<(E, crate::Context)>, Transaction) -> Fut + Clone + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<Transaction, crate::BatchError>> + Send + 'static,
    {
        let inbox = self.clone();
        move |values: Vec<E>, contexts: Vec<crate::Context>| {
            let (inbox, handler) = (inbox.clone(), handler.clone());
            Box::pin(async move {
                let batch: Vec<(E, crate::Context)> = values.into_iter().zip(contexts).collect();
                let Some(group) = batch.first().map(|(_, ctx)| ctx.group().to_owned()) else {
                    return Ok(());
                };
                let mut tx = inbox.pool.begin().await?;
                let ids: Vec<&str> = batch.iter().map(|(_, ctx)| ctx.message_id()).collect();
                let mut fresh = inbox.store.claim_inbox_many(&mut tx, &group, &ids).await?;
                let seen = batch.len();
                // The first copy of each message recorded now; later copies and messages
                // handled before are acked.
                let batch: Vec<(E, crate::Context)> = batch
                    .into_iter()
                    .filter(|(_, ctx)| fresh.remove(ctx.message_id()))
                    .collect();
                if batch.len() < seen {
                    tracing::debug!(%group, skipped = seen - batch.len(), "handled already (inbox); acked without running the handler");
                }
                if batch.is_empty() {
                    tx.rollback().await?;
                    return Ok(());
                }
                match handler(batch, tx).await {
                    Ok(tx) => {
                        tx.commit().await?;
                        Ok(())
                    }
                    // The transaction (dropped with the handler's future) rolled back: every
                    // event of the batch failed, whatever the handler marked.
                    Err(e) => Err(crate::BatchError::from(e.into_whole())),
                }
            })
        }
    }
}
