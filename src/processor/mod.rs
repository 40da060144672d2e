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

mod command_processor;
mod engine;
mod event_processor;
mod group_processor;
mod health;
mod manifest;
mod options;
mod running;

use std::fmt;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

pub use command_processor::CommandProcessor;
pub use engine::dead_letter_headers;
pub use event_processor::EventProcessor;
pub use group_processor::EventGroupProcessor;
pub use health::{GroupState, GroupStatus};
pub use manifest::{GroupManifest, HandlerManifest, Manifest, Published};
#[cfg(feature = "testing")]
pub(crate) use options::LayerFn;
pub use options::{DeliveryMode, HandlerOptions, RestartPolicy, RetryPolicy, UnknownEvent};
pub use running::RunningProcessor;

use crate::backend::{unique_consumer_name, Backend, Publisher, Subscriber};
use crate::bus::TopicNamer;
use crate::handler::{BatchPipeline, Pipeline};
use crate::validate_topic;
use crate::versions::Descriptor;
use crate::{Error, Result};
use engine::{BatchRoute, GroupSpec, Route};
use running::start;

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
        let group: Arc<str> = Arc::from(group);
        Ok(GroupSpec {
            meters: crate::telemetry::Meters::new(publisher.system(), group.clone()),
            group,
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

/// A handler as registered, before its group is built.
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
