//! The core of [`cqrs`](https://docs.rs/cqrs): traits, the message envelope, codecs, the event and
//! command buses, processors, middleware and the in-memory broker.
//!
//! Backend authors depend on this crate alone and implement the traits in [`backend`]; the
//! [`conformance`] suite checks that a backend behaves as buses and processors expect. Users
//! depend on the `cqrs` facade crate instead.

#[cfg(feature = "asyncapi")]
pub mod asyncapi;
pub mod backend;
pub mod bus;
pub mod codec;
pub mod conformance;
pub mod dead_letter;
mod error;
mod event;
pub mod handler;
pub mod memory;
mod message;
pub mod middleware;
#[cfg(feature = "otel")]
pub mod otel;
pub mod processor;
pub mod telemetry;
pub mod wire;

pub use backend::{Backend, Delivery, StartFrom, Subscription};
pub use bus::{CommandBus, EventBus, TopicNamer};
pub use dead_letter::{DeadLetter, DeadLetterStore};
pub use error::{BoxError, CodecError, Error, Result};
pub use event::{validate_topic, Command, Event};
pub use handler::{
    permanent, retry_after, BatchError, BatchHandler, Context, Handler, Permanent, RetryAfter,
};
pub use message::{new_message_id, Message, Metadata};
pub use processor::{
    CommandProcessor, DeliveryMode, EventGroupProcessor, EventProcessor, GroupNamer, GroupState,
    GroupStatus, HandlerOptions, Manifest, RestartPolicy, RetryPolicy, RunningProcessor,
    UnknownEvent,
};
pub use tokio_util::sync::CancellationToken;
