//! Handlers: plain `async fn`s or closures that take an event (and optionally its [`Context`]).

use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;

use futures_util::future::BoxFuture;

use crate::codec::Codec;
use crate::versions::Versions;
use crate::{BoxError, Error};
use crate::{Message, Metadata};

/// What a handler knows about the message it is handling.
#[derive(Debug, Clone)]
pub struct Context {
    pub(crate) message: Arc<Message>,
    pub(crate) topic: Arc<str>,
    pub(crate) group: Arc<str>,
    pub(crate) handler: Arc<str>,
    pub(crate) attempt: u32,
    /// Made from `position` when first asked for if the backend gave none.
    pub(crate) broker_id: cqrs_core::backend::EntryId,
    pub(crate) position: Option<crate::LogPosition>,
}

impl Context {
    /// The whole message: id, name, version, key, payload, metadata.
    pub fn message(&self) -> &Message {
        &self.message
    }

    /// The message id.
    pub fn message_id(&self) -> &str {
        &self.message.id
    }

    /// The metadata: correlation and causation ids, creation time, headers.
    pub fn metadata(&self) -> &Metadata {
        &self.message.metadata
    }

    /// Metadata for messages this handler publishes in reaction: same correlation id, causation
    /// id set to this message.
    pub fn caused_metadata(&self) -> Metadata {
        Metadata::caused_by(&self.message)
    }

    /// The topic the message came from.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The consumer group handling it.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// The handler's name.
    pub fn handler(&self) -> &str {
        &self.handler
    }

    /// The broker's id of this delivery: a Redis stream entry id, a Kafka `partition:offset`, an
    /// in-memory sequence number.
    pub fn broker_id(&self) -> &str {
        self.broker_id.get(self.position)
    }

    /// Where the message sits in a partitioned log (a Kafka partition and offset), if it does.
    pub fn position(&self) -> Option<crate::LogPosition> {
        self.position
    }

    /// How many times the group has been handed this message, starting at 1.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }
}

/// Marks a handler error as permanent: the message goes to the dead-letter topic at once, without
/// retries.
///
/// ```
/// # use cqrs::{permanent, BoxError};
/// fn check(seats: u32) -> Result<(), BoxError> {
///     if seats == 0 {
///         return Err(permanent("a booking needs at least one seat"));
///     }
///     Ok(())
/// }
/// assert!(check(0).is_err());
/// ```
pub fn permanent(error: impl Into<BoxError>) -> BoxError {
    Box::new(Permanent(error.into()))
}

/// Asks for the message to be retried after `delay` instead of the retry policy's backoff (a
/// rate-limited API's `Retry-After`, a dependency that says when it is back). The attempt still
/// counts toward the policy's `max_attempts`; anywhere in an error's chain of sources, it is
/// found.
///
/// ```
/// # use std::time::Duration;
/// # use cqrs::{retry_after, BoxError};
/// fn charge(status: u16) -> Result<(), BoxError> {
///     if status == 429 {
///         return Err(retry_after(Duration::from_secs(2), "payment API rate limit"));
///     }
///     Ok(())
/// }
/// assert!(charge(429).is_err());
/// ```
pub fn retry_after(delay: std::time::Duration, error: impl Into<BoxError>) -> BoxError {
    Box::new(RetryAfter {
        delay,
        error: error.into(),
    })
}

/// A handler error that says when to retry; see [`retry_after`]. It displays as the error it
/// wraps.
#[derive(Debug)]
pub struct RetryAfter {
    /// How long to wait before the next attempt.
    pub delay: std::time::Duration,
    /// Why the attempt failed.
    pub error: BoxError,
}

impl std::fmt::Display for RetryAfter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl std::error::Error for RetryAfter {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.error.source()
    }
}

/// The delay a [`RetryAfter`] in the error's chain asks for.
pub(crate) fn requested_delay(error: &BoxError) -> Option<std::time::Duration> {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(&**error);
    while let Some(e) = next {
        if let Some(r) = e.downcast_ref::<RetryAfter>() {
            return Some(r.delay);
        }
        next = e.source();
    }
    None
}

/// A handler error that retrying cannot fix; see [`permanent`].
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct Permanent(pub BoxError);

/// Whether retrying cannot help: a [`Permanent`] error or a payload that cannot be read (it did
/// not decode, or its version is unknown or has no upcast), at the
/// top of the error or anywhere in its chain of sources (an error that wraps a permanent one is
/// permanent too).
pub(crate) fn is_permanent(error: &BoxError) -> bool {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(&**error);
    while let Some(e) = next {
        let unreadable = matches!(
            e.downcast_ref::<Error>(),
            Some(Error::Decode { .. } | Error::UnknownVersion { .. } | Error::NoUpcast { .. })
        );
        if e.is::<Permanent>() || unreadable {
            return true;
        }
        next = e.source();
    }
    false
}

/// An async function or closure that handles values of `T`.
///
/// Implemented for `Fn(T) -> impl Future<Output = Result<(), E>>` and
/// `Fn(T, Context) -> impl Future<Output = Result<(), E>>` where `E: Into<BoxError>` (any error
/// type, `String`, `&str`, `anyhow::Error`). `Args` only tells the two shapes apart.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a handler for `{T}`",
    note = "a handler is an `async fn(T) -> Result<(), E>` or `async fn(T, Context) -> Result<(), E>` (or a closure returning such a future) that is `Clone + Send + Sync + 'static`, where `E: Into<BoxError>`"
)]
pub trait Handler<T, Args>: Clone + Send + Sync + 'static {
    /// Handles one value.
    fn call(&self, value: T, ctx: Context) -> BoxFuture<'static, Result<(), BoxError>>;
}

impl<F, Fut, T, E> Handler<T, (T,)> for F
where
    F: Fn(T) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Into<BoxError>,
{
    fn call(&self, value: T, _ctx: Context) -> BoxFuture<'static, Result<(), BoxError>> {
        let fut = self(value);
        Box::pin(async move { fut.await.map_err(Into::into) })
    }
}

impl<F, Fut, T, E> Handler<T, (T, Context)> for F
where
    F: Fn(T, Context) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Into<BoxError>,
{
    fn call(&self, value: T, ctx: Context) -> BoxFuture<'static, Result<(), BoxError>> {
        let fut = self(value, ctx);
        Box::pin(async move { fut.await.map_err(Into::into) })
    }
}

/// A type-erased handler pipeline: decoding, the handler and its middleware.
pub type BoxHandlerService = tower::util::BoxCloneSyncService<Context, (), BoxError>;

type DirectFn = Arc<dyn Fn(Context) -> BoxFuture<'static, Result<(), BoxError>> + Send + Sync>;

/// A handler with its codec, called directly (no middleware: one allocation per message) or
/// through tower layers.
#[derive(Clone)]
pub(crate) enum Pipeline {
    Direct(DirectFn),
    Tower(BoxHandlerService),
}

impl Pipeline {
    /// The pipeline as a tower service, to put layers around.
    pub(crate) fn into_service(self) -> BoxHandlerService {
        match self {
            Pipeline::Direct(f) => BoxHandlerService::new(tower::service_fn(move |ctx| f(ctx))),
            Pipeline::Tower(s) => s,
        }
    }
}

/// A handler with its codec: decodes the payload, then calls the handler.
pub(crate) struct HandlerService<H, T, Args, C> {
    handler: H,
    codec: Arc<C>,
    versions: Versions<T>,
    _marker: PhantomData<fn() -> (T, Args)>,
}

impl<H, T, Args, C> HandlerService<H, T, Args, C>
where
    H: Handler<T, Args>,
    T: Send + 'static,
    Args: 'static,
    C: Codec<T>,
{
    /// The handler as a pipeline without middleware.
    pub(crate) fn pipeline(handler: H, codec: Arc<C>, versions: Versions<T>) -> Pipeline {
        let service = HandlerService {
            handler,
            codec,
            versions,
            _marker: PhantomData,
        };
        Pipeline::Direct(Arc::new(move |ctx| service.call_direct(ctx)))
    }

    fn call_direct(&self, ctx: Context) -> BoxFuture<'static, Result<(), BoxError>> {
        match read(&*self.codec, &self.versions, &ctx) {
            Ok(value) => self.handler.call(value, ctx),
            Err(error) => Box::pin(async move { Err(Box::new(error) as BoxError) }),
        }
    }
}

/// Reads a payload as the handler's version: decoded as it is, upcast from an older version, or
/// refused (a newer version, or an older one with no upcast).
fn read<T, C: Codec<T> + ?Sized>(codec: &C, v: &Versions<T>, ctx: &Context) -> Result<T, Error> {
    read_message(codec, v, &ctx.message)
}

/// [`read`] of a message: what a handler of `T` gets from it.
pub(crate) fn read_message<T, C: Codec<T> + ?Sized>(
    codec: &C,
    v: &Versions<T>,
    message: &Message,
) -> Result<T, Error> {
    let version = message.version;
    let decoded = if version == v.current {
        codec.decode(&message.payload)
    } else if version > v.current {
        return Err(Error::UnknownVersion {
            name: v.name.to_owned(),
            version,
            known: v.current,
        });
    } else {
        match (v.upcast)(version, &message.payload) {
            Some(decoded) => decoded,
            None => {
                return Err(Error::NoUpcast {
                    name: v.name.to_owned(),
                    version,
                    known: v.current,
                })
            }
        }
    };
    decoded.map_err(|source| Error::Decode {
        name: message.name.to_string(),
        codec: codec.content_type().to_owned(),
        source,
    })
}

/// What a batch handler reports when not every event of its batch succeeded: the whole batch
/// failed (any error turns into this with `?`), or some events did, by their index in the
/// batch. The events not named succeeded and are acked; the failed ones are retried by the
/// retry policy (alone, after the backoff) and dead-lettered when they run out of attempts, or
/// at once when the error is [`permanent`].
///
/// ```
/// use cqrs::{permanent, BatchError};
///
/// fn check(amounts: &[i64]) -> Result<(), BatchError> {
///     let mut failed = BatchError::none();
///     for (i, amount) in amounts.iter().enumerate() {
///         if *amount < 0 {
///             failed.fail(i, permanent(format!("negative amount {amount}")));
///         }
///     }
///     failed.into_result()
/// }
/// assert!(check(&[1, 2]).is_ok());
/// assert_eq!(check(&[1, -2]).unwrap_err().failed().count(), 1);
/// ```
#[derive(Debug, Default)]
pub struct BatchError {
    whole: Option<BoxError>,
    items: Vec<(usize, BoxError)>,
}

impl BatchError {
    /// No failure yet: add them with [`BatchError::fail`].
    pub fn none() -> Self {
        BatchError::default()
    }

    /// Marks the event at `index` of the batch as failed.
    pub fn fail(&mut self, index: usize, error: impl Into<BoxError>) -> &mut Self {
        self.items.push((index, error.into()));
        self
    }

    /// The indexes marked as failed.
    pub fn failed(&self) -> impl Iterator<Item = usize> + '_ {
        self.items.iter().map(|(i, _)| *i)
    }

    /// One error for the whole batch: its own, or one naming how many events failed and the
    /// first one's error (for a batch whose transaction rolled back, so every event is retried).
    #[cfg(feature = "postgres")]
    pub(crate) fn into_whole(self) -> BoxError {
        match self.whole {
            Some(whole) => whole,
            None => {
                let n = self.items.len();
                let first = self
                    .items
                    .into_iter()
                    .next()
                    .map(|(i, e)| format!("; event {i}: {e}"))
                    .unwrap_or_default();
                format!("{n} events of the batch failed{first}").into()
            }
        }
    }

    /// `Ok(())` if nothing was marked as failed.
    pub fn into_result(self) -> Result<(), BatchError> {
        if self.whole.is_none() && self.items.is_empty() {
            Ok(())
        } else {
            Err(self)
        }
    }
}

impl<E: Into<BoxError>> From<E> for BatchError {
    fn from(error: E) -> Self {
        BatchError {
            whole: Some(error.into()),
            items: Vec::new(),
        }
    }
}

/// The error of one event whose whole batch failed: the batch's error, shared by its events
/// (its source chain is the batch error's, so [`permanent`] and [`retry_after`] still apply).
#[derive(Debug, thiserror::Error)]
#[error("its batch failed")]
pub(crate) struct BatchFailed(#[source] pub(crate) Arc<dyn std::error::Error + Send + Sync>);

/// An async function or closure that handles a batch of `T`s at once; see
/// `EventProcessor::handle_batch`. It takes the values (`Fn(Vec<T>)`), or the values and their
/// [`Context`]s (`Fn(Vec<T>, Vec<Context>)`, `contexts[i]` for `values[i]`: message ids,
/// attempts, metadata; what `postgres::Inbox::once_batch` needs). `Args` tells the two apart;
/// it is inferred.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a batch handler for `{T}`",
    note = "a batch handler is an `async fn(Vec<T>) -> Result<(), BatchError>` or an `async fn(Vec<T>, Vec<Context>) -> Result<(), BatchError>` (or a closure returning such a future) that is `Clone + Send + Sync + 'static`"
)]
pub trait BatchHandler<T, Args = (Vec<T>,)>: Clone + Send + Sync + 'static {
    /// Handles the values of one batch, in the order the broker delivered them; `contexts[i]`
    /// is the context of `values[i]`.
    fn call(
        &self,
        values: Vec<T>,
        contexts: Vec<Context>,
    ) -> BoxFuture<'static, Result<(), BatchError>>;
}

impl<F, Fut, T> BatchHandler<T, (Vec<T>,)> for F
where
    F: Fn(Vec<T>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), BatchError>> + Send + 'static,
{
    fn call(
        &self,
        values: Vec<T>,
        _contexts: Vec<Context>,
    ) -> BoxFuture<'static, Result<(), BatchError>> {
        Box::pin(self(values))
    }
}

impl<F, Fut, T> BatchHandler<T, (Vec<T>, Vec<Context>)> for F
where
    F: Fn(Vec<T>, Vec<Context>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), BatchError>> + Send + 'static,
{
    fn call(
        &self,
        values: Vec<T>,
        contexts: Vec<Context>,
    ) -> BoxFuture<'static, Result<(), BatchError>> {
        Box::pin(self(values, contexts))
    }
}

/// A batch handler with its codec: decodes each payload, calls the handler once with those that
/// decoded, and returns one outcome per context, in order.
pub(crate) type BatchPipeline =
    Arc<dyn Fn(Vec<Context>) -> BoxFuture<'static, Vec<Result<(), BoxError>>> + Send + Sync>;

pub(crate) fn batch_pipeline<T, H, C, Args>(
    handler: H,
    codec: Arc<C>,
    versions: Versions<T>,
) -> BatchPipeline
where
    T: Send + 'static,
    H: BatchHandler<T, Args>,
    C: Codec<T>,
    Args: 'static,
{
    Arc::new(move |contexts: Vec<Context>| {
        let mut outcomes: Vec<Option<Result<(), BoxError>>> = Vec::with_capacity(contexts.len());
        let (mut values, mut positions) = (Vec::new(), Vec::new());
        let mut kept = Vec::new();
        for (i, ctx) in contexts.into_iter().enumerate() {
            // Decoding and upcasting run user code (a codec, an upcaster): a panic there fails
            // that message, as a panicking handler does, not the group's worker.
            let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                read(&*codec, &versions, &ctx)
            }));
            match decoded {
                Ok(Ok(value)) => {
                    values.push(value);
                    positions.push(i);
                    kept.push(ctx);
                    outcomes.push(None);
                }
                Ok(Err(e)) => outcomes.push(Some(Err(Box::new(e)))),
                Err(panic) => outcomes.push(Some(Err(Box::new(
                    crate::middleware::HandlerPanicked(crate::middleware::panic_message(&*panic)),
                )))),
            }
        }
        let handler = handler.clone();
        Box::pin(async move {
            let result = if values.is_empty() {
                Ok(())
            } else {
                use futures_util::FutureExt;
                // The call inside the caught future: a closure that panics before its future
                // exists is caught too.
                match std::panic::AssertUnwindSafe(async move { handler.call(values, kept).await })
                    .catch_unwind()
                    .await
                {
                    Ok(result) => result,
                    Err(panic) => Err(BatchError::from(crate::middleware::HandlerPanicked(
                        crate::middleware::panic_message(&*panic),
                    ))),
                }
            };
            if let Err(BatchError { whole, items }) = result {
                let shared: Option<Arc<dyn std::error::Error + Send + Sync>> = whole.map(Arc::from);
                for (index, error) in items {
                    if let Some(&at) = positions.get(index) {
                        outcomes[at] = Some(Err(error));
                    }
                }
                if let Some(shared) = shared {
                    for &at in &positions {
                        if outcomes[at].is_none() {
                            outcomes[at] = Some(Err(Box::new(BatchFailed(shared.clone()))));
                        }
                    }
                }
            }
            outcomes.into_iter().map(|o| o.unwrap_or(Ok(()))).collect()
        })
    })
}
