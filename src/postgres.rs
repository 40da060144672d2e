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
