//! The contract of [`cqrs`](https://docs.rs/cqrs) that a backend author needs, and nothing more:
//! the backend traits ([`backend`]), the message envelope and its wire layout ([`wire`]), errors,
//! dead-letter records and redrive ([`dead_letter`]), events, commands and codecs ([`codec`]),
//! and the in-memory broker ([`memory`]), the default backend.
//!
//! A third-party backend depends on this crate alone; the conformance suite that checks it
//! behaves as buses and processors expect is `cqrs::conformance`, for its tests (a
//! dev-dependency). Users depend on the `cqrs` crate, which has the runtime (buses, processors,
//! telemetry) and re-exports all of this.

pub mod backend;
pub mod codec;
pub mod dead_letter;
mod error;
mod event;
pub mod memory;
mod message;
pub mod redelivery;
mod text;
pub mod wire;

pub use backend::{Backend, Delivery, LogPosition, StartFrom, Subscription};
/// The type of [`Message::payload`]: cheaply cloned, shared bytes (the `bytes` crate's).
pub use bytes::Bytes;
pub use dead_letter::{DeadLetter, DeadLetterStore};
pub use error::{error_chain, BoxError, CodecError, Error, Result};
pub use event::{validate_topic, Command, Event};
pub use message::{new_message_id, new_message_id_and_millis, now_millis, Message, Metadata};
pub use text::Text;
pub use tokio_util::sync::CancellationToken;
