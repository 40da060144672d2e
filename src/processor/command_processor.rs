//! [`CommandProcessor`]: one handler per command.

use std::fmt;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::{
    Core, EventRegistration, GroupNamer, HandlerOptions, Manifest, Registered, RunningProcessor,
};
use crate::backend::{Backend, Subscriber};
use crate::bus::TopicNamer;
use crate::codec::{Codec, DefaultCodec};
use crate::handler::{Handler, HandlerService};
use crate::versions::{Descriptor, Versions};
use crate::Command;
use crate::Result;

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

    /// Wraps every handler registered so far in `layer`, outermost (the test kit's probe).
    #[cfg(feature = "testing")]
    pub(crate) fn layer_every(&mut self, layer: super::options::LayerFn) {
        for h in &mut self.handlers {
            h.options.layers.push(layer.clone());
        }
    }

    /// Subscribes every command's group, then runs them until `token` is cancelled.
    pub async fn start(self, token: CancellationToken) -> Result<RunningProcessor> {
        self.core.start_each(self.handlers, token).await
    }
}
