//! [`EventProcessor`]: each handler its own consumer group.

use std::fmt;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::HandlerOptions;
use super::{Core, EventRegistration, GroupNamer, Manifest, Registered, RunningProcessor};
use crate::backend::{Backend, Subscriber};
use crate::bus::TopicNamer;
use crate::codec::{Codec, DefaultCodec};
use crate::handler::{batch_pipeline, BatchHandler, Handler, HandlerService};
use crate::versions::{Descriptor, Versions};
use crate::Event;
use crate::Result;

/// Runs event handlers, each in its own consumer group.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> cqrs::Result<()> {
/// use cqrs::{memory::MemoryBroker, BoxError, Event, EventBus, EventProcessor};
/// use tokio_util::sync::CancellationToken;
///
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct BookingConfirmed { seats: u32 }
/// impl Event for BookingConfirmed { const NAME: &'static str = "BookingConfirmed"; }
///
/// let broker = MemoryBroker::new();
/// let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
/// let mut processor = EventProcessor::new(broker.clone(), "svc-tickets");
/// processor.handle("notify-on-booking", move |e: BookingConfirmed| {
///     let tx = tx.clone();
///     async move { tx.send(e.seats).map_err(|_| "receiver gone") }
/// })?;
/// let running = processor.start(CancellationToken::new()).await?;
///
/// EventBus::new(broker.clone()).publish(&BookingConfirmed { seats: 2 }).await?;
/// assert_eq!(rx.recv().await, Some(2));
/// running.shutdown().await?;
/// assert!(broker.pending("BookingConfirmed", "svc-tickets.notify-on-booking").is_empty());
/// # Ok(()) }
/// ```
pub struct EventProcessor<C = DefaultCodec> {
    core: Core<C>,
    handlers: Vec<EventRegistration>,
}

impl<C> fmt::Debug for EventProcessor<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventProcessor")
            .field("service", &self.core.service)
            .field(
                "handlers",
                &self.handlers.iter().map(|h| &h.name).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl EventProcessor {
    /// A processor for `service` on `backend` with the default codec.
    pub fn new(backend: impl Backend, service: impl Into<String>) -> Self {
        EventProcessor::with_codec(backend, service, DefaultCodec::default())
    }
}

impl<C> EventProcessor<C> {
    /// A processor for `service` on `backend` with `codec`.
    pub fn with_codec(backend: impl Backend, service: impl Into<String>, codec: C) -> Self {
        EventProcessor {
            core: Core::new(backend, service.into(), codec),
            handlers: Vec::new(),
        }
    }

    processor_config!();

    /// Registers `handler` for events of type `E` under `name`, in its own consumer group.
    ///
    /// Returns its options to adjust; a second handler with the same name is an error.
    pub fn handle<E, H, Args>(&mut self, name: &str, handler: H) -> Result<&mut HandlerOptions>
    where
        E: Event,
        H: Handler<E, Args>,
        Args: 'static,
        C: Codec<E>,
    {
        let pipeline =
            HandlerService::pipeline(handler, self.core.codec.clone(), Versions::event());
        let d = Descriptor::event::<E>();
        self.core
            .register(&mut self.handlers, name, d, Registered::One(pipeline))
    }

    /// Registers a handler of batches of `E` under `name`, in its own consumer group: it gets up
    /// to `batch_size` events at once (those of one broker fetch, in the order delivered) and
    /// reports which failed, if any ([`crate::BatchError`]).
    ///
    /// The events it did not name as failed are acked; the failed ones are retried by the retry
    /// policy, alone, after the backoff, then dead-lettered; a payload that does not decode is
    /// dead-lettered without reaching the handler. Batches of a group run one after another, so
    /// order per key holds across batches; with `concurrency(n)`, `n` batches' worth is fetched
    /// and split by key into `n` parts handled at once (each in batches of at most
    /// `batch_size`), a key's events staying in one part (tower layers do not apply).
    /// Within a batch the handler sees events in order; an event it reports as failed is retried
    /// after the others of its batch, so if a later event of the same key must wait for it,
    /// report that one as failed too.
    ///
    /// ```
    /// # use cqrs::{BatchError, EventProcessor, Event, memory::MemoryBroker};
    /// # #[derive(serde::Serialize, serde::Deserialize)]
    /// # struct Reading { sensor: String, value: f64 }
    /// # impl Event for Reading { const NAME: &'static str = "Reading"; }
    /// # fn main() -> cqrs::Result<()> {
    /// let mut processor = EventProcessor::new(MemoryBroker::new(), "svc-metrics");
    /// processor
    ///     .handle_batch("store", |readings: Vec<Reading>| async move {
    ///         // One INSERT for the whole batch; `?` would fail the whole batch.
    ///         println!("storing {} readings", readings.len());
    ///         Ok::<_, BatchError>(())
    ///     })?
    ///     .batch_size(500);
    /// # Ok(())
    /// # }
    /// ```
    pub fn handle_batch<E, H, Args>(
        &mut self,
        name: &str,
        handler: H,
    ) -> Result<&mut HandlerOptions>
    where
        E: Event,
        H: BatchHandler<E, Args>,
        C: Codec<E>,
        Args: 'static,
    {
        let pipeline = batch_pipeline(handler, self.core.codec.clone(), Versions::event());
        let d = Descriptor::event::<E>();
        self.core
            .register(&mut self.handlers, name, d, Registered::Batch(pipeline))
    }

    /// What `start` will run: one group per handler, with its event, topic and dead-letter
    /// topic. `start` refuses what [`Manifest::validate`] refuses.
    pub fn manifest(&self) -> Manifest {
        self.core.manifest_of(&self.handlers)
    }

    /// Wraps every handler registered so far in `layer`, outermost (the test kit's probe).
    #[cfg(feature = "testing")]
    pub(crate) fn layer_every(&mut self, layer: super::options::LayerFn) {
        for h in &mut self.handlers {
            h.options.layers.push(layer.clone());
        }
    }

    /// Subscribes every handler's group (so errors show here), then runs them until `token` is
    /// cancelled.
    pub async fn start(self, token: CancellationToken) -> Result<RunningProcessor> {
        self.core.start_each(self.handlers, token).await
    }
}
