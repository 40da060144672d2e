//! Processors run handlers as members of consumer groups.
//!
//! - [`EventProcessor`]: each handler is its own consumer group, named from the service and the
//!   handler name (`svc-tickets.notify-on-booking` by default), so every handler sees every event
//!   once and several instances of one service share the work.
//! - [`EventGroupProcessor`]: several handlers (of event types on one topic) in one group,
//!   dispatched by event name.
//! - [`CommandProcessor`]: one handler per command type.
//!
//! Each handler has [`HandlerOptions`]: delivery semantics, concurrency, retries and dead letters,
//! middleware. Processors stop gracefully when their cancellation token is cancelled.

mod engine;
mod health;
mod manifest;
mod options;

use std::fmt;
use std::sync::Arc;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use engine::dead_letter_headers;
pub(crate) use engine::error_chain;
pub use health::{GroupState, GroupStatus};
pub use manifest::{GroupManifest, HandlerManifest, Manifest, Published};
pub use options::{DeliveryMode, HandlerOptions, RestartPolicy, RetryPolicy, UnknownEvent};

use crate::backend::{unique_consumer_name, Backend, Consumer, Publisher, Subscriber};
use crate::bus::TopicNamer;
use crate::codec::{Codec, DefaultCodec};
use crate::error::{Error, Result};
use crate::event::{validate_topic, Command, Descriptor, Event, Versions};
use crate::handler::{
    batch_pipeline, BatchHandler, BatchPipeline, Handler, HandlerService, Pipeline,
};
use engine::{BatchRoute, GroupSpec, Route};

/// Names consumer groups from the service name and the handler name.
///
/// The default is `"{service}.{handler}"`, e.g. `svc-tickets.notify-on-booking`.
#[derive(Clone)]
pub struct GroupNamer(Arc<NameFn>);

type NameFn = dyn Fn(&str, &str) -> String + Send + Sync;

impl GroupNamer {
    /// A namer from a function of (service, handler).
    pub fn new(name: impl Fn(&str, &str) -> String + Send + Sync + 'static) -> Self {
        GroupNamer(Arc::new(name))
    }

    /// The group of `handler` in `service`.
    pub fn group(&self, service: &str, handler: &str) -> String {
        (self.0)(service, handler)
    }
}

impl Default for GroupNamer {
    fn default() -> Self {
        GroupNamer::new(|service, handler| format!("{service}.{handler}"))
    }
}

impl fmt::Debug for GroupNamer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("GroupNamer(..)")
    }
}

type SubscriberConstructor = Arc<dyn Fn(&str) -> Arc<dyn Subscriber> + Send + Sync>;

/// What the three processors share.
struct Core<C> {
    service: String,
    publisher: Arc<dyn Publisher>,
    subscriber: Arc<dyn Subscriber>,
    codec: Arc<C>,
    topics: TopicNamer,
    groups: GroupNamer,
    subscriber_constructor: Option<SubscriberConstructor>,
    defaults: HandlerOptions,
    consumer_name: String,
}

impl<C> Core<C> {
    fn new(backend: impl Backend, service: String, codec: C) -> Self {
        let backend = Arc::new(backend);
        Core {
            service,
            publisher: backend.clone(),
            subscriber: backend,
            codec: Arc::new(codec),
            topics: TopicNamer::default(),
            groups: GroupNamer::default(),
            subscriber_constructor: None,
            defaults: HandlerOptions::default(),
            consumer_name: unique_consumer_name(),
        }
    }

    /// Builds the spec of one group from its handlers.
    fn spec(
        &self,
        handler_name: &str,
        topics: Vec<String>,
        handlers: Vec<(String, Arc<str>, Pipeline)>,
        options: HandlerOptions,
    ) -> Result<GroupSpec> {
        let group = self.groups.group(&self.service, handler_name);
        if group.is_empty() {
            return Err(Error::Config(format!(
                "the group name of handler `{handler_name}` is empty"
            )));
        }
        for topic in &topics {
            validate_topic(topic).map_err(Error::Config)?;
        }
        if let Some(dlq) = &options.dead_letter_topic {
            validate_topic(dlq).map_err(Error::Config)?;
        }
        let routes = handlers
            .into_iter()
            .map(|(event, handler, service)| {
                let service = if options.layers.is_empty() {
                    service
                } else {
                    let layered = options
                        .layers
                        .iter()
                        .fold(service.into_service(), |s, layer| layer(s));
                    Pipeline::Tower(layered)
                };
                (event, Route { handler, service })
            })
            .collect();
        let (publisher, subscriber) = match &options.backend {
            Some((p, s)) => (p.clone(), s.clone()),
            None => match &self.subscriber_constructor {
                Some(make) => (self.publisher.clone(), make(handler_name)),
                None => (self.publisher.clone(), self.subscriber.clone()),
            },
        };
        let consumer_name = options
            .consumer_name
            .clone()
            .unwrap_or_else(|| self.consumer_name.clone());
        Ok(GroupSpec {
            group: Arc::from(group),
            topics,
            routes,
            options,
            publisher,
            subscriber,
            consumer_name,
            no_handler: Arc::from(""),
            batch: None,
            health: Arc::default(),
        })
    }
}

impl<C> Core<C> {
    /// Registers a handler (one group of its own) at the end of `handlers`; returns its options.
    fn register<'h>(
        &self,
        handlers: &'h mut Vec<EventRegistration>,
        name: &str,
        d: Descriptor,
        service: Registered,
    ) -> Result<&'h mut HandlerOptions> {
        check_handler_name(name)?;
        if handlers.iter().any(|h| h.name == name) {
            return Err(Error::DuplicateHandler(name.to_owned()));
        }
        handlers.push(EventRegistration {
            name: name.to_owned(),
            event: d.name,
            version: d.version,
            topic: self.topics.topic_of(&d),
            service,
            options: self.defaults.clone(),
        });
        let last = handlers.len() - 1;
        Ok(&mut handlers[last].options)
    }

    /// The manifest of one group per registration.
    fn manifest_of(&self, handlers: &[EventRegistration]) -> Manifest {
        Manifest {
            publishes: Vec::new(),
            service: self.service.clone(),
            groups: handlers
                .iter()
                .map(|h| {
                    let handler = HandlerManifest {
                        name: h.name.clone(),
                        event: h.event.to_owned(),
                        version: h.version,
                        batch: matches!(h.service, Registered::Batch(_)),
                    };
                    self.locate(
                        GroupManifest::new(
                            self.groups.group(&self.service, &h.name),
                            vec![h.topic.clone()],
                            vec![handler],
                            &h.options,
                        ),
                        &h.options,
                    )
                })
                .collect(),
        }
    }

    /// Fills in where the group's topics live, from the subscriber it will use (unknown when a
    /// subscriber constructor picks it at start).
    fn locate(&self, mut group: GroupManifest, options: &HandlerOptions) -> GroupManifest {
        let subscriber = match (&options.backend, &self.subscriber_constructor) {
            (Some((_, s)), _) => Some(s),
            (None, None) => Some(&self.subscriber),
            (None, Some(_)) => None,
        };
        group.location = subscriber.and_then(|s| {
            let mut places: Vec<String> =
                group.topics.iter().filter_map(|t| s.location(t)).collect();
            places.dedup();
            (!places.is_empty()).then(|| places.join(", "))
        });
        group
    }

    /// Starts one group per registration.
    async fn start_each(
        &self,
        handlers: Vec<EventRegistration>,
        token: CancellationToken,
    ) -> Result<RunningProcessor> {
        self.manifest_of(&handlers).validate()?;
        let specs = handlers
            .into_iter()
            .map(|h| {
                let handler: Arc<str> = Arc::from(h.name.as_str());
                match h.service {
                    Registered::One(service) => self.spec(
                        &h.name,
                        vec![h.topic],
                        vec![(h.event.to_owned(), handler, service)],
                        h.options,
                    ),
                    Registered::Batch(pipeline) => {
                        let mut spec = self.spec(&h.name, vec![h.topic], Vec::new(), h.options)?;
                        spec.batch = Some(BatchRoute {
                            event: h.event.to_owned(),
                            handler,
                            pipeline,
                        });
                        Ok(spec)
                    }
                }
            })
            .collect::<Result<Vec<_>>>()?;
        start(&self.service, specs, token).await
    }
}

fn check_handler_name(name: &str) -> Result<()> {
    if name.trim().is_empty() {
        return Err(Error::Config("a handler name cannot be empty".into()));
    }
    Ok(())
}

/// Subscribes every group, then runs each in its own task.
async fn start(
    service: &str,
    specs: Vec<GroupSpec>,
    token: CancellationToken,
) -> Result<RunningProcessor> {
    let token = token.child_token();
    let mut tasks = JoinSet::new();
    let warnings = abandoned_groups(service, &specs).await;
    for warning in &warnings {
        tracing::warn!("{warning}");
    }
    let mut health = Vec::with_capacity(specs.len());
    for spec in specs {
        let consumer = match subscribe(&spec, &token).await {
            Ok(c) => c,
            Err(e) => {
                token.cancel();
                while tasks.join_next().await.is_some() {}
                return Err(e);
            }
        };
        tracing::debug!(group = %spec.group, topics = ?spec.topics, consumer = %spec.consumer_name, "subscribed");
        let group = spec.group.clone();
        health.push((group.clone(), spec.health.clone()));
        let run = supervise(Arc::new(spec), consumer, token.clone());
        tasks.spawn(async move { (group, run.await) });
    }
    Ok(RunningProcessor {
        tasks,
        token,
        warnings,
        health,
    })
}

/// Groups named like this service's (`service.` then anything) on the topics of `specs` that no
/// spec uses and that still hold messages, each described in a sentence naming the groups that
/// read the topic now.
async fn abandoned_groups(service: &str, specs: &[GroupSpec]) -> Vec<String> {
    let ours: std::collections::HashSet<&str> = specs.iter().map(|s| &*s.group).collect();
    let prefix = format!("{service}.");
    let mut seen = std::collections::HashSet::new();
    let mut warnings = Vec::new();
    for spec in specs {
        for topic in &spec.topics {
            if !seen.insert(topic.as_str()) {
                continue;
            }
            let groups = match spec.subscriber.groups(topic, &prefix).await {
                Ok(groups) => groups,
                Err(e) => {
                    tracing::debug!(topic, error = %e.report(), "cannot list the topic's groups");
                    continue;
                }
            };
            for g in groups {
                let left = g.pending + g.lag.unwrap_or(0);
                if left == 0 || !g.group.starts_with(&prefix) || ours.contains(g.group.as_str()) {
                    continue;
                }
                let readers: Vec<&str> = specs
                    .iter()
                    .filter(|s| s.topics.contains(topic))
                    .map(|s| &*s.group)
                    .collect();
                warnings.push(format!(
                    "consumer group `{}` on `{topic}` holds {} pending and {} undelivered \
                     messages, but no handler of service `{service}` reads it now (this \
                     processor reads `{topic}` as {}): if a handler was renamed, those \
                     messages wait in the old group; handle them, or delete the group",
                    g.group,
                    g.pending,
                    g.lag
                        .map_or_else(|| "an unknown number of".to_owned(), |n| n.to_string()),
                    readers
                        .iter()
                        .map(|r| format!("`{r}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
    }
    warnings
}

/// Runs one group; when it fails and its options say so, subscribes and runs it again after
/// the restart policy's backoff, until the restarts run out or `token` is cancelled.
async fn supervise(
    spec: Arc<GroupSpec>,
    consumer: Box<dyn Consumer>,
    token: CancellationToken,
) -> Result<()> {
    let mut consumer = Some(consumer);
    let mut restarts = 0u32;
    loop {
        let c = match consumer.take() {
            Some(c) => c,
            None => {
                let c = subscribe(&spec, &token).await?;
                spec.health.running();
                c
            }
        };
        let Err(e) = engine::run_group(spec.clone(), c, token.clone()).await else {
            return Ok(());
        };
        let policy = match spec.options.restart {
            Some(p) if restarts < p.max_restarts && !token.is_cancelled() => p,
            _ => return Err(e),
        };
        restarts += 1;
        let delay = policy.delay(restarts);
        tracing::warn!(group = %spec.group, error = %e.report(), restarts, max = policy.max_restarts, "the group failed; restarting it in {delay:?}");
        spec.health.restarting(e.report(), restarts);
        tokio::select! {
            _ = token.cancelled() => return Err(e),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Subscribes one group, retrying errors worth retrying (a connection cut, a broker restarting)
/// with backoff until `token` is cancelled; fails at once on the others (a bad address, a
/// refused login, an invalid topic).
async fn subscribe(spec: &GroupSpec, token: &CancellationToken) -> Result<Box<dyn Consumer>> {
    let subscription = spec.subscription();
    let mut backoff = std::time::Duration::from_millis(100);
    loop {
        match spec.subscriber.subscribe(&subscription).await {
            Ok(c) => return Ok(c),
            Err(e) if e.is_retryable() && !token.is_cancelled() => {
                tracing::warn!(group = %spec.group, error = %e.report(), "subscribing failed; retrying in {backoff:?}");
                tokio::select! {
                    _ = token.cancelled() => return Err(e),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
            }
            Err(e) => return Err(e),
        }
    }
}

/// A started processor: its groups are subscribed and running.
///
/// Dropping it leaves the groups running until the token is cancelled, with nobody to see their
/// errors: keep it and call [`RunningProcessor::wait`] or [`RunningProcessor::shutdown`].
#[derive(Debug)]
#[must_use = "the processor runs until its token is cancelled; call `wait()` or `shutdown()` to see its errors"]
pub struct RunningProcessor {
    tasks: JoinSet<(Arc<str>, Result<()>)>,
    token: CancellationToken,
    warnings: Vec<String>,
    health: Vec<(Arc<str>, Arc<health::Health>)>,
}

impl RunningProcessor {
    /// What looked wrong at start, also logged as warnings: a consumer group of this service
    /// on one of its topics that no handler reads any more but that still holds messages (the
    /// sign of a renamed handler, whose new group started from its own start position).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Each group's health: running, reconnecting to the broker, stopped or failed, with the
    /// last error, how many messages it handled and when the last one was, and how many are in
    /// flight. For a readiness probe: [`RunningProcessor::is_ready`].
    pub fn status(&self) -> Vec<GroupStatus> {
        self.health
            .iter()
            .map(|(group, health)| health.status(group))
            .collect()
    }

    /// Whether every group is running (none reconnecting, stopped or failed).
    pub fn is_ready(&self) -> bool {
        self.status().iter().all(|s| s.state == GroupState::Running)
    }

    /// The token that stops this processor (a child of the one it was started with).
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// Waits until every group has stopped. If one fails, the others are stopped too. One
    /// group's error is returned as it is; when several fail, [`Error::Groups`] holds each
    /// group's error.
    pub async fn wait(mut self) -> Result<()> {
        let mut failed: Vec<(String, Error)> = Vec::new();
        while let Some(joined) = self.tasks.join_next().await {
            let (group, result) = match joined {
                Ok((group, r)) => (group.to_string(), r),
                Err(e) => (
                    "(unknown)".to_owned(),
                    Err(Error::fatal("a consumer group task panicked", e)),
                ),
            };
            if let Err(e) = result {
                self.token.cancel();
                failed.push((group, e));
            }
        }
        match failed.len() {
            0 => Ok(()),
            1 => Err(failed.remove(0).1),
            _ => Err(Error::Groups(failed)),
        }
    }

    /// Stops fetching, lets running handlers finish (within each handler's shutdown timeout),
    /// settles what finished and returns.
    pub async fn shutdown(self) -> Result<()> {
        self.token.cancel();
        self.wait().await
    }
}

/// Shared builder methods of the processors.
macro_rules! processor_config {
    () => {
        /// Replaces how topics are named; use the same namer as the bus.
        pub fn topics(mut self, namer: TopicNamer) -> Self {
            self.core.topics = namer;
            self
        }

        /// Replaces how consumer groups are named from (service, handler).
        pub fn group_names(mut self, namer: GroupNamer) -> Self {
            self.core.groups = namer;
            self
        }

        /// Builds the subscriber of each handler from its name (Watermill's
        /// `SubscriberConstructor`), instead of using the processor's backend.
        pub fn subscriber_constructor(
            mut self,
            make: impl Fn(&str) -> Arc<dyn Subscriber> + Send + Sync + 'static,
        ) -> Self {
            self.core.subscriber_constructor = Some(Arc::new(make));
            self
        }

        /// The options every handler registered from now on starts with.
        pub fn defaults(&mut self) -> &mut HandlerOptions {
            &mut self.core.defaults
        }

        /// The service name groups are named from.
        pub fn service(&self) -> &str {
            &self.core.service
        }

        /// Subscribes, then runs until `token` is cancelled; see [`RunningProcessor::wait`].
        pub async fn run(self, token: CancellationToken) -> Result<()> {
            self.start(token).await?.wait().await
        }
    };
}

struct EventRegistration {
    name: String,
    event: &'static str,
    version: u32,
    topic: String,
    service: Registered,
    options: HandlerOptions,
}

/// A handler of one message at a time, or of a batch.
enum Registered {
    One(Pipeline),
    Batch(BatchPipeline),
}

/// Runs event handlers, each in its own consumer group.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> cqrs_core::Result<()> {
/// use cqrs_core::{memory::MemoryBroker, BoxError, Event, EventBus, EventProcessor};
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
    /// order per key holds across batches (`concurrency` does not apply; nor do tower layers).
    /// Within a batch the handler sees events in order; an event it reports as failed is retried
    /// after the others of its batch, so if a later event of the same key must wait for it,
    /// report that one as failed too.
    ///
    /// ```
    /// # use cqrs_core::{BatchError, EventProcessor, Event, memory::MemoryBroker};
    /// # #[derive(serde::Serialize, serde::Deserialize)]
    /// # struct Reading { sensor: String, value: f64 }
    /// # impl Event for Reading { const NAME: &'static str = "Reading"; }
    /// # fn main() -> cqrs_core::Result<()> {
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
    pub fn handle_batch<E, H>(&mut self, name: &str, handler: H) -> Result<&mut HandlerOptions>
    where
        E: Event,
        H: BatchHandler<E>,
        C: Codec<E>,
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

    /// Subscribes every handler's group (so errors show here), then runs them until `token` is
    /// cancelled.
    pub async fn start(self, token: CancellationToken) -> Result<RunningProcessor> {
        self.core.start_each(self.handlers, token).await
    }
}

/// Runs several event handlers in one consumer group, dispatching by event name.
///
/// Messages whose event name has no handler follow [`HandlerOptions::on_unknown`].
pub struct EventGroupProcessor<C = DefaultCodec> {
    core: Core<C>,
    group: String,
    topics: Vec<String>,
    handlers: Vec<(String, Arc<str>, Pipeline)>,
    /// The event version of each handler, in the order of `handlers`.
    versions: Vec<u32>,
    options: HandlerOptions,
}

impl<C> fmt::Debug for EventGroupProcessor<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventGroupProcessor")
            .field("service", &self.core.service)
            .field("group", &self.group)
            .field("topics", &self.topics)
            .finish_non_exhaustive()
    }
}

impl EventGroupProcessor {
    /// A group named from (`service`, `group`) on `backend` with the default codec.
    pub fn new(
        backend: impl Backend,
        service: impl Into<String>,
        group: impl Into<String>,
    ) -> Self {
        EventGroupProcessor::with_codec(backend, service, group, DefaultCodec::default())
    }
}

impl<C> EventGroupProcessor<C> {
    /// A group named from (`service`, `group`) on `backend` with `codec`.
    pub fn with_codec(
        backend: impl Backend,
        service: impl Into<String>,
        group: impl Into<String>,
        codec: C,
    ) -> Self {
        EventGroupProcessor {
            core: Core::new(backend, service.into(), codec),
            group: group.into(),
            topics: Vec::new(),
            handlers: Vec::new(),
            versions: Vec::new(),
            options: HandlerOptions::default(),
        }
    }

    processor_config!();

    /// The group's options.
    pub fn options(&mut self) -> &mut HandlerOptions {
        &mut self.options
    }

    /// Adds `handler` for events of type `E` to the group. Names must be unique, and one event
    /// type has one handler in a group.
    pub fn handle<E, H, Args>(&mut self, name: &str, handler: H) -> Result<&mut Self>
    where
        E: Event,
        H: Handler<E, Args>,
        Args: 'static,
        C: Codec<E>,
    {
        check_handler_name(name)?;
        if self.handlers.iter().any(|(_, n, _)| &**n == name) {
            return Err(Error::DuplicateHandler(name.to_owned()));
        }
        let d = Descriptor::event::<E>();
        if let Some((_, other, _)) = self.handlers.iter().find(|(e, _, _)| e == d.name) {
            return Err(Error::Config(format!(
                "event `{}` already has handler `{other}` in group `{}`",
                d.name, self.group
            )));
        }
        let topic = self.core.topics.topic_of(&d);
        if !self.topics.contains(&topic) {
            self.topics.push(topic);
        }
        self.handlers.push((
            d.name.to_owned(),
            Arc::from(name),
            HandlerService::pipeline(handler, self.core.codec.clone(), Versions::event()),
        ));
        self.versions.push(d.version);
        Ok(self)
    }

    /// What `start` will run: the group, its handlers and topics.
    pub fn manifest(&self) -> Manifest {
        let handlers = self
            .handlers
            .iter()
            .zip(&self.versions)
            .map(|((event, name, _), version)| HandlerManifest {
                name: name.to_string(),
                event: event.clone(),
                version: *version,
                batch: false,
            })
            .collect();
        Manifest {
            publishes: Vec::new(),
            service: self.core.service.clone(),
            groups: vec![self.core.locate(
                GroupManifest::new(
                    self.core.groups.group(&self.core.service, &self.group),
                    self.topics.clone(),
                    handlers,
                    &self.options,
                ),
                &self.options,
            )],
        }
    }

    /// Subscribes the group, then runs it until `token` is cancelled.
    pub async fn start(self, token: CancellationToken) -> Result<RunningProcessor> {
        if self.handlers.is_empty() {
            return Err(Error::Config(format!(
                "group `{}` has no handler",
                self.group
            )));
        }
        let spec = self
            .core
            .spec(&self.group, self.topics, self.handlers, self.options)?;
        start(&self.core.service, vec![spec], token).await
    }
}

/// Runs command handlers: exactly one per command type, each in its own consumer group named from
/// the service and the command name.
pub struct CommandProcessor<C = DefaultCodec> {
    core: Core<C>,
    handlers: Vec<EventRegistration>,
}

impl<C> fmt::Debug for CommandProcessor<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommandProcessor")
            .field("service", &self.core.service)
            .field(
                "commands",
                &self.handlers.iter().map(|h| h.event).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl CommandProcessor {
    /// A processor for `service` on `backend` with the default codec.
    pub fn new(backend: impl Backend, service: impl Into<String>) -> Self {
        CommandProcessor::with_codec(backend, service, DefaultCodec::default())
    }
}

impl<C> CommandProcessor<C> {
    /// A processor for `service` on `backend` with `codec`.
    pub fn with_codec(backend: impl Backend, service: impl Into<String>, codec: C) -> Self {
        CommandProcessor {
            core: Core::new(backend, service.into(), codec),
            handlers: Vec::new(),
        }
    }

    processor_config!();

    /// Registers the handler of command `T`; a second one for the same command is an error.
    pub fn handle<T, H, Args>(&mut self, handler: H) -> Result<&mut HandlerOptions>
    where
        T: Command,
        H: Handler<T, Args>,
        Args: 'static,
        C: Codec<T>,
    {
        let d = Descriptor::command::<T>();
        let pipeline =
            HandlerService::pipeline(handler, self.core.codec.clone(), Versions::command());
        self.core
            .register(&mut self.handlers, d.name, d, Registered::One(pipeline))
    }

    /// What `start` will run: one group per command handler.
    pub fn manifest(&self) -> Manifest {
        self.core.manifest_of(&self.handlers)
    }

    /// Subscribes every command's group, then runs them until `token` is cancelled.
    pub async fn start(self, token: CancellationToken) -> Result<RunningProcessor> {
        self.core.start_each(self.handlers, token).await
    }
}
