//! Middleware for handler pipelines, as tower layers.
//!
//! Handler pipelines are tower [`Service`]s over [`Context`](crate::Context), so any tower layer
//! whose error converts into [`BoxError`] applies: [`TimeoutLayer`] from tower is re-exported here.
//! Processors always catch panics in handlers (as [`CatchPanicLayer`] does for any service); retries and the dead-letter topic are
//! the processor's failure policy ([`RetryPolicy`](crate::processor::RetryPolicy)) because they
//! work with the broker's redelivery.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};

use futures_util::FutureExt;
use tower::{Layer, Service};

use crate::BoxError;

pub use tower::timeout::TimeoutLayer;

/// A handler panicked; the panic was caught and counted as a failure.
#[derive(Debug, thiserror::Error)]
#[error("handler panicked: {0}")]
pub struct HandlerPanicked(pub String);

/// Turns a panic in the wrapped service into a [`HandlerPanicked`] error.
#[derive(Debug, Clone, Copy, Default)]
pub struct CatchPanicLayer;

impl<S> Layer<S> for CatchPanicLayer {
    type Service = CatchPanic<S>;
    fn layer(&self, inner: S) -> CatchPanic<S> {
        CatchPanic { inner }
    }
}

/// The service made by [`CatchPanicLayer`].
#[derive(Debug, Clone)]
pub struct CatchPanic<S> {
    inner: S,
}

impl<S, R> Service<R> for CatchPanic<S>
where
    S: Service<R>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: R) -> Self::Future {
        match std::panic::catch_unwind(AssertUnwindSafe(|| self.inner.call(request))) {
            Ok(fut) => Box::pin(async move {
                match AssertUnwindSafe(fut).catch_unwind().await {
                    Ok(result) => result.map_err(Into::into),
                    Err(panic) => {
                        Err(Box::new(HandlerPanicked(panic_message(&*panic))) as BoxError)
                    }
                }
            }),
            Err(panic) => {
                let error = HandlerPanicked(panic_message(&*panic));
                Box::pin(async move { Err(Box::new(error) as BoxError) })
            }
        }
    }
}

pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}
