//! Middleware for handler pipelines, as tower layers.
//!
//! Handler pipelines are tower [`Service`](tower::Service)s over [`Context`](crate::Context), so any tower layer
//! whose error converts into [`BoxError`](crate::BoxError) applies: [`TimeoutLayer`] from tower is re-exported here.
//! Processors always catch panics in handlers (a [`HandlerPanicked`] failure, retried and
//! dead-lettered like any other); retries and the dead-letter topic are the processor's failure
//! policy ([`RetryPolicy`](crate::processor::RetryPolicy)) because they work with the broker's
//! redelivery.

pub use tower::timeout::TimeoutLayer;

/// A handler panicked; the panic was caught and counted as a failure.
#[derive(Debug, thiserror::Error)]
#[error("handler panicked: {0}")]
pub struct HandlerPanicked(pub String);

pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}
