//! The transactional outbox of [`cqrs`](https://docs.rs/cqrs) on PostgreSQL, with `sqlx`.
//!
//! A command's state change and the events about it commit together: the events are stored in
//! the same database transaction as the change ([`OutboxStore::insert`], or typed through
//! `cqrs::postgres::Outbox`), and nothing is sent before that transaction commits. An
//! [`OutboxRelay`] then forwards committed events to any backend (in-memory, Redis, Kafka)
//! through its [`Publisher`](cqrs_core::backend::Publisher), and deletes them only once the broker has taken them.
//!
//! - **Order.** Events of one key are stored in commit order: storing one takes a transaction
//!   lock on its key (`pg_advisory_xact_lock`), so a second transaction with the same key waits
//!   for the first to commit. The relay sends them in that order.
//! - **Several relays.** A service's replicas may all run a relay: one at a time sends (it holds
//!   a session lock, `pg_try_advisory_lock`, on a connection of its own), the others wait to take
//!   over. No event is sent twice in normal operation; a relay that dies between sending and
//!   deleting leaves its last batch to be sent again by the next (at least once).
//! - **Latency.** Storing an event notifies the relay (`NOTIFY`, delivered at commit); the relay
//!   also polls ([`OutboxRelay::poll_interval`]) in case a notification is missed.
//! - **Schema.** Tables live in a schema of their own (`cqrs` unless [`OutboxStore::schema`]
//!   names another), created by [`OutboxStore::migrate`].

mod cursor;
mod relay;
mod store;

pub use relay::OutboxRelay;
pub use sqlx;
pub use store::{OutboxStatus, OutboxStore};

/// What can go wrong with the outbox.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A schema name that is not a plain lowercase SQL identifier.
    #[error(
        "`{0}` is not a valid schema name: use lowercase ASCII letters, digits and `_`, starting with a letter"
    )]
    InvalidSchema(String),
    /// A database operation failed.
    #[error("{context}")]
    Database {
        /// What was being done.
        context: String,
        /// Why.
        #[source]
        source: sqlx::Error,
    },
    /// The backend did not take messages the relay sent; they stay in the outbox.
    #[error("relaying to {topic} failed; the messages stay in the outbox")]
    Publish {
        /// The topic.
        topic: String,
        /// Why.
        #[source]
        source: Box<cqrs_core::Error>,
    },
    /// A stored row could not be read back as a message.
    #[error("outbox row {seq}: {why}")]
    BadRow {
        /// The row.
        seq: i64,
        /// Why.
        why: String,
    },
}

impl Error {
    fn db(context: impl Into<String>, source: sqlx::Error) -> Self {
        Error::Database {
            context: context.into(),
            source,
        }
    }
}

impl From<Error> for cqrs_core::Error {
    fn from(e: Error) -> Self {
        match e {
            e @ (Error::InvalidSchema(_) | Error::BadRow { .. }) => {
                cqrs_core::Error::Config(e.to_string())
            }
            Error::Database { context, source } => {
                cqrs_core::Error::retryable(format!("postgres: {context}"), source)
            }
            Error::Publish { source, .. } => *source,
        }
    }
}

/// A `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    #[test]
    fn schema_names_are_plain_identifiers() {
        assert!(super::OutboxStore::new().schema("orders_outbox").is_ok());
        for bad in ["", "Orders", "1x", "a-b", "a;drop", "a b"] {
            assert!(super::OutboxStore::new().schema(bad).is_err(), "{bad}");
        }
    }
}
