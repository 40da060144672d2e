//! [`EventGroupProcessor`]: several handlers in one consumer group.

use std::fmt;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::running::start;
use super::{
    check_handler_name, Core, GroupManifest, GroupNamer, HandlerManifest, HandlerOptions, Manifest,
    RunningProcessor,
};
use crate::backend::{Backend, Subscriber};
use crate::bus::TopicNamer;
use crate::codec::{Codec, DefaultCodec};
use crate::handler::{Handler, HandlerService, Pipeline};
use crate::versions::{Descriptor, Versions};
use crate::Event;
use crate::{Error, Result};

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

    /// Wraps every handler registered so far in `layer`, outermost (the test kit's probe).
    #[cfg(feature = "testing")]
    pub(crate) fn layer_every(&mut self, layer: super::options::LayerFn) {
        self.options.layers.push(layer);
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
