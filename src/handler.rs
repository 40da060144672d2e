//! Handlers: plain `async fn`s or closures that take an event (and optionally its [`Context`]).

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

use futures_util::future::BoxFuture;
use tower::Service;

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

    /// What one of a processor's runners calls the handler through, one value at a time (not
    /// part of the API: the processor's own). By default each call's future is boxed
    /// ([`Handler::call`]); the functions and closures this trait is implemented for keep their
    /// future in one box they reuse (a box allocated and freed a message, avoided).
    #[doc(hidden)]
    fn caller(&self) -> Box<dyn Caller<T>>
    where
        T: 'static,
        Args: 'static,
    {
        let handler = self.clone();
        Box::new(Reusing {
            call: move |value, ctx| handler.call(value, ctx),
            slot: None,
        })
    }
}

/// Calls a handler, one value at a time, for one runner (see [`Handler::caller`]; not part of
/// the API). A run's future is kept by the caller until it finishes, when it is dropped at once,
/// or until [`Caller::stop`] drops it unfinished (the shutdown deadline passed), as a boxed
/// future would be.
#[doc(hidden)]
pub trait Caller<T>: Send {
    /// Starts the handler on `value`: [`Caller::poll_run`] runs it.
    fn start(&mut self, value: T, ctx: Context);
    /// Polls the run started last; drops its future once it finishes.
    fn poll_run(&mut self, cx: &mut std::task::Context<'_>) -> Poll<Result<(), BoxError>>;
    /// Drops the run's future, finished or not.
    fn stop(&mut self);
}

/// A run polled before it was started or after it finished (a caller does neither).
const NOT_STARTED: &str = "the handler's run was not started";

/// A caller that keeps each call's future in the box of the call before: allocated at the
/// first call, the future dropped in place (`Pin::set` to `None`) when it finishes and the next
/// one written there. A handler implemented by hand is called through it too, its futures
/// (boxed by [`Handler::call`]) kept in that box.
struct Reusing<C, W> {
    call: C,
    slot: Option<Pin<Box<Option<W>>>>,
}

impl<T, C, W> Caller<T> for Reusing<C, W>
where
    C: Fn(T, Context) -> W + Send,
    W: Future<Output = Result<(), BoxError>> + Send,
{
    fn start(&mut self, value: T, ctx: Context) {
        let run = (self.call)(value, ctx);
        match &mut self.slot {
            Some(kept) => kept.as_mut().set(Some(run)),
            None => self.slot = Some(Box::pin(Some(run))),
        }
    }

    fn poll_run(&mut self, cx: &mut std::task::Context<'_>) -> Poll<Result<(), BoxError>> {
        let Some(run) = self.slot.as_mut().and_then(|b| b.as_mut().as_pin_mut()) else {
            return Poll::Ready(Err(NOT_STARTED.into()));
        };
        let polled = run.poll(cx);
        if polled.is_ready() {
            self.stop();
        }
        polled
    }

    fn stop(&mut self) {
        if let Some(kept) = &mut self.slot {
            kept.as_mut().set(None);
        }
    }
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

    fn caller(&self) -> Box<dyn Caller<T>>
    where
        T: 'static,
    {
        let f = self.clone();
        Box::new(Reusing {
            call: move |value, _ctx| {
                let run = f(value);
                async move { run.await.map_err(Into::into) }
            },
            slot: None,
        })
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

    fn caller(&self) -> Box<dyn Caller<T>>
    where
        T: 'static,
    {
        let f = self.clone();
        Box::new(Reusing {
            call: move |value, ctx| {
                let run = f(value, ctx);
                async move { run.await.map_err(Into::into) }
            },
            slot: None,
        })
    }
}

/// A type-erased handler pipeline: decoding, the handler and its middleware.
pub type BoxHandlerService = tower::util::BoxCloneSyncService<Context, (), BoxError>;

/// A handler with its codec, called directly (no middleware: see [`Runner`]) or through tower
/// layers. What a group's handlers are; each of its runners makes its own [`Runner`] of each.
#[derive(Clone)]
pub(crate) enum Pipeline {
    Direct(Arc<dyn MakeDirect>),
    Tower(BoxHandlerService),
}

impl Pipeline {
    /// The pipeline as a tower service, to put layers around.
    pub(crate) fn into_service(self) -> BoxHandlerService {
        match self {
            Pipeline::Direct(f) => {
                BoxHandlerService::new(tower::service_fn(move |ctx| f.call_boxed(ctx)))
            }
            Pipeline::Tower(s) => s,
        }
    }

    /// A runner's own handle on the pipeline.
    pub(crate) fn runner(&self) -> Runner {
        match self {
            Pipeline::Direct(f) => Runner::Direct(f.runner()),
            Pipeline::Tower(s) => Runner::Tower(s.clone()),
        }
    }
}

/// One runner's handle on a [`Pipeline`]: a handler without middleware is decoded for and called
/// with no allocation a message (its future kept in a box the runner reuses, see
/// [`Handler::caller`]); one with middleware through its tower service.
pub(crate) enum Runner {
    Direct(Box<dyn DirectRun>),
    Tower(BoxHandlerService),
}

/// Makes the runners of a handler without middleware.
pub(crate) trait MakeDirect: Send + Sync {
    /// A runner's own caller.
    fn runner(&self) -> Box<dyn DirectRun>;
    /// One call, its future boxed (for tower layers).
    fn call_boxed(&self, ctx: Context) -> BoxFuture<'static, Result<(), BoxError>>;
}

/// A runner's caller of a handler without middleware.
pub(crate) trait DirectRun: Send {
    /// Decodes the message and starts the handler on it (`Err`: the payload could not be read).
    fn start(&mut self, ctx: Context) -> Result<(), BoxError>;
    /// Polls the run started last ([`Caller::poll_run`]).
    fn poll_run(&mut self, cx: &mut std::task::Context<'_>) -> Poll<Result<(), BoxError>>;
    /// Drops the run's future ([`Caller::stop`]).
    fn stop(&mut self);
}

/// A call a [`Runner`] started, polled through it ([`Runner::poll_call`]). It is the runner's
/// state, not a future of its own: the engine keeps it beside the runner it borrows, and
/// starts the next attempt on that runner after a failure.
pub(crate) enum Call {
    /// None running: not started, finished, or stopped.
    Idle,
    /// A handler without middleware: its future is in the runner's reused box.
    Direct,
    /// Middleware that was not ready: the context waits for it (boxed: rare).
    Unready(Box<Context>),
    /// Middleware's future.
    Tower(BoxFuture<'static, Result<(), BoxError>>),
    /// Failed before it ran (the payload could not be read, the middleware failed to get
    /// ready): told at the next poll.
    Failed(BoxError),
}

impl Runner {
    /// Starts a call on `ctx`: decoded and started at once without middleware; with it, called
    /// once the service is ready (which is polled now).
    pub(crate) fn start(&mut self, ctx: Context, cx: &mut std::task::Context<'_>) -> Call {
        match self {
            Runner::Direct(run) => match run.start(ctx) {
                Ok(()) => Call::Direct,
                Err(e) => Call::Failed(e),
            },
            Runner::Tower(service) => match service.poll_ready(cx) {
                Poll::Ready(Ok(())) => Call::Tower(service.call(ctx)),
                Poll::Ready(Err(e)) => Call::Failed(e),
                Poll::Pending => Call::Unready(Box::new(ctx)),
            },
        }
    }

    /// Polls `call`, which this runner started; it is [`Call::Idle`] again once it finishes.
    pub(crate) fn poll_call(
        &mut self,
        call: &mut Call,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Result<(), BoxError>> {
        let polled = match (&mut *self, &mut *call) {
            (_, Call::Idle) => Poll::Ready(Err(NOT_STARTED.into())),
            (Runner::Direct(run), Call::Direct) => run.poll_run(cx),
            (Runner::Tower(service), Call::Unready(_)) => match service.poll_ready(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    let Call::Unready(ctx) = std::mem::replace(call, Call::Idle) else {
                        return Poll::Ready(Err(NOT_STARTED.into()));
                    };
                    *call = Call::Tower(service.call(*ctx));
                    return self.poll_call(call, cx);
                }
            },
            (_, Call::Tower(f)) => f.as_mut().poll(cx),
            (_, Call::Failed(_)) => match std::mem::replace(call, Call::Idle) {
                Call::Failed(e) => Poll::Ready(Err(e)),
                _ => Poll::Ready(Err(NOT_STARTED.into())),
            },
            // A call of the other kind: not this runner's.
            (Runner::Tower(_), Call::Direct) | (Runner::Direct(_), Call::Unready(_)) => {
                Poll::Ready(Err(NOT_STARTED.into()))
            }
        };
        if polled.is_ready() {
            *call = Call::Idle;
        }
        polled
    }

    /// Drops `call`'s future, finished or not (its handler's future, in the runner's box
    /// without middleware).
    pub(crate) fn stop(&mut self, call: &mut Call) {
        if let (Runner::Direct(run), Call::Direct) = (&mut *self, &*call) {
            run.stop();
        }
        *call = Call::Idle;
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
        Pipeline::Direct(Arc::new(HandlerService {
            handler,
            codec,
            versions,
            _marker: PhantomData,
        }))
    }
}

impl<H, T, Args, C> MakeDirect for HandlerService<H, T, Args, C>
where
    H: Handler<T, Args>,
    T: Send + 'static,
    Args: 'static,
    C: Codec<T>,
{
    fn runner(&self) -> Box<dyn DirectRun> {
        Box::new(DirectRunner {
            caller: self.handler.caller(),
            codec: self.codec.clone(),
            versions: self.versions,
        })
    }

    fn call_boxed(&self, ctx: Context) -> BoxFuture<'static, Result<(), BoxError>> {
        match read(&*self.codec, &self.versions, &ctx) {
            Ok(value) => self.handler.call(value, ctx),
            Err(error) => Box::pin(async move { Err(Box::new(error) as BoxError) }),
        }
    }
}

/// A runner's caller of a handler without middleware: its codec and its [`Caller`].
struct DirectRunner<T, C> {
    caller: Box<dyn Caller<T>>,
    codec: Arc<C>,
    versions: Versions<T>,
}

impl<T: Send + 'static, C: Codec<T>> DirectRun for DirectRunner<T, C> {
    fn start(&mut self, ctx: Context) -> Result<(), BoxError> {
        let value = read(&*self.codec, &self.versions, &ctx)?;
        self.caller.start(value, ctx);
        Ok(())
    }

    fn poll_run(&mut self, cx: &mut std::task::Context<'_>) -> Poll<Result<(), BoxError>> {
        self.caller.poll_run(cx)
    }

    fn stop(&mut self) {
        self.caller.stop();
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

#[cfg(test)]
mod tests {
    use std::task::Waker;

    use super::*;

    /// A handler's future that finishes at its first poll (or never if not `finishes`) and
    /// holds `held` until it is dropped.
    struct Holding {
        #[expect(dead_code, reason = "held to be counted, never read")]
        held: Arc<()>,
        finishes: bool,
    }

    impl Future for Holding {
        type Output = Result<(), BoxError>;
        fn poll(self: Pin<&mut Self>, _: &mut std::task::Context<'_>) -> Poll<Self::Output> {
            if self.finishes {
                Poll::Ready(Ok(()))
            } else {
                Poll::Pending
            }
        }
    }

    fn ctx() -> Context {
        Context {
            message: Arc::new(Message::new("n", Vec::new())),
            topic: Arc::from("t"),
            group: Arc::from("g"),
            handler: Arc::from("h"),
            attempt: 1,
            broker_id: cqrs_core::backend::EntryId::default(),
            position: None,
        }
    }

    fn poll(caller: &mut dyn Caller<bool>) -> Poll<Result<(), BoxError>> {
        caller.poll_run(&mut std::task::Context::from_waker(Waker::noop()))
    }

    /// What a caller does with the future of a run that finishes and of one stopped before it
    /// finishes: `caller` calls a handler that returns `Holding(held, finishes)`.
    /// (The handlers hold `held` too: counts are told from what they hold.)
    fn drops_each_run_when_done(mut caller: Box<dyn Caller<bool>>, held: &Arc<()>) {
        let base = Arc::strong_count(held);
        for _ in 0..3 {
            caller.start(true, ctx());
            assert_eq!(
                Arc::strong_count(held),
                base + 1,
                "the caller holds the run's future"
            );
            assert!(matches!(poll(&mut *caller), Poll::Ready(Ok(()))));
            assert_eq!(
                Arc::strong_count(held),
                base,
                "a finished future is dropped at once"
            );
            assert!(
                matches!(poll(&mut *caller), Poll::Ready(Err(_))),
                "a finished run is not polled again"
            );

            caller.start(false, ctx());
            assert!(poll(&mut *caller).is_pending());
            assert_eq!(Arc::strong_count(held), base + 1);
            caller.stop();
            assert_eq!(
                Arc::strong_count(held),
                base,
                "a run stopped unfinished drops its future"
            );
        }
    }

    #[test]
    fn a_closure_s_caller_drops_each_future_when_it_finishes_or_is_dropped() {
        let held = Arc::new(());
        let h = held.clone();
        let handler = move |finishes: bool| Holding {
            held: h.clone(),
            finishes,
        };
        drops_each_run_when_done(Handler::<bool, (bool,)>::caller(&handler), &held);

        let held = Arc::new(());
        let h = held.clone();
        let handler = move |finishes: bool, _: Context| Holding {
            held: h.clone(),
            finishes,
        };
        drops_each_run_when_done(Handler::<bool, (bool, Context)>::caller(&handler), &held);
    }

    #[test]
    fn a_handler_implemented_by_hand_is_called_through_its_boxed_futures() {
        #[derive(Clone)]
        struct ByHand(Arc<()>);
        impl Handler<bool, ()> for ByHand {
            fn call(&self, finishes: bool, _: Context) -> BoxFuture<'static, Result<(), BoxError>> {
                Box::pin(Holding {
                    held: self.0.clone(),
                    finishes,
                })
            }
        }
        let held = Arc::new(());
        let by_hand = ByHand(held.clone());
        let caller = by_hand.caller();
        drop(by_hand);
        drops_each_run_when_done(caller, &held);
    }
}
