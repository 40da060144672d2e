//! [`EventBus`] publishes typed events; [`CommandBus`] sends typed commands.

use std::fmt;
use std::sync::{Arc, PoisonError, RwLock};

use crate::backend::Publisher;
use crate::codec::{Codec, DefaultCodec};
use crate::versions::Descriptor;
use crate::{Command, Event};
use crate::{Error, Result};
use crate::{Message, Metadata};

/// Maps event and command names to topics.
///
/// A pinned topic (`#[event(topic = "...")]`) is used as it is; otherwise the name goes through the
/// generator, which by default returns the name unchanged (Watermill's `GenerateTopic`). Give the
/// same generator to buses and processors. A bus asks it once per event or command type, at the
/// type's first publish, and keeps the answer: it must give the same topic every time.
#[derive(Clone)]
pub struct TopicNamer(Arc<dyn Fn(&str) -> String + Send + Sync>);

impl TopicNamer {
    /// A namer that applies `generate` to names without a pinned topic.
    pub fn new(generate: impl Fn(&str) -> String + Send + Sync + 'static) -> Self {
        TopicNamer(Arc::new(generate))
    }

    /// The topic of an event or command with this name and pinned topic.
    pub fn topic(&self, name: &str, pinned: Option<&str>) -> String {
        match pinned {
            Some(topic) => topic.to_owned(),
            None => (self.0)(name),
        }
    }

    pub(crate) fn topic_of(&self, d: &Descriptor) -> String {
        self.topic(d.name, d.topic)
    }
}

impl Default for TopicNamer {
    fn default() -> Self {
        TopicNamer::new(str::to_owned)
    }
}

impl fmt::Debug for TopicNamer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TopicNamer(..)")
    }
}

/// What both buses share: a publisher, a codec and a topic namer.
struct Outbox<C> {
    publisher: Arc<dyn Publisher>,
    codec: Arc<C>,
    topics: TopicNamer,
    /// What the bus was told it publishes, for its manifest. Shared by clones and copied on
    /// a `declare` only: a bus is cloned per request where a web framework's state holds it,
    /// and a copy per clone was an allocation per request.
    declared: Arc<Vec<Descriptor>>,
    /// Per event or command type, where it goes, found at its first publish (the namer, a
    /// user function, was called and its `String` made for every publish). Shared by clones;
    /// a new namer starts a new one.
    routes: Arc<RwLock<Routes>>,
}

/// A type's route by its name and pinned topic.
/// Looked up at every publish: with foldhash, not SipHash (~260 instructions a message).
type Routes = foldhash::HashMap<(&'static str, Option<&'static str>), Arc<Route>>;

/// Where one type's messages go: its topic and the sent counter there.
struct Route {
    topic: String,
    sent: crate::telemetry::Sent,
}

impl<C> Clone for Outbox<C> {
    fn clone(&self) -> Self {
        Outbox {
            publisher: self.publisher.clone(),
            codec: self.codec.clone(),
            topics: self.topics.clone(),
            declared: self.declared.clone(),
            routes: self.routes.clone(),
        }
    }
}

impl<C> Outbox<C> {
    /// Adds `d` to what the bus declares, once.
    fn declare(&mut self, d: Descriptor) {
        if !self.declared.contains(&d) {
            Arc::make_mut(&mut self.declared).push(d);
        }
    }

    /// Where messages of `d` go.
    fn route(&self, d: &Descriptor) -> Arc<Route> {
        let key = (d.name, d.topic);
        if let Some(route) = self
            .routes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
        {
            return route.clone();
        }
        let topic = self.topics.topic_of(d);
        let route = Arc::new(Route {
            sent: crate::telemetry::Sent::new(self.publisher.system(), &topic),
            topic,
        });
        self.routes
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key)
            .or_insert(route)
            .clone()
    }

    /// Encodes `value` into a message; with the `otel` feature its headers carry the context of
    /// `span` (the `send` span).
    fn encode<T>(
        &self,
        d: &Descriptor,
        value: &T,
        key: Option<String>,
        mut metadata: Metadata,
        span: &tracing::Span,
    ) -> Result<Message>
    where
        C: Codec<T>,
    {
        let payload = self.codec.encode(value).map_err(|source| Error::Encode {
            name: d.name.to_owned(),
            codec: self.codec.content_type().to_owned(),
            source,
        })?;
        // `created_at` unset (the bus's own metadata leaves it 0) is the id's time: one read of
        // the clock a message, not two.
        let (id, millis) = crate::new_message_id_and_millis();
        if metadata.created_at == 0 {
            metadata.created_at = millis;
        }
        metadata.content_type = std::borrow::Cow::Borrowed(self.codec.content_type());
        #[cfg(feature = "otel")]
        crate::otel::inject(span, &mut metadata.headers);
        #[cfg(not(feature = "otel"))]
        let _ = span;
        Ok(Message::from_parts(
            id.into(),
            // Static: shared, not copied, into every message.
            cqrs_core::Text::from_static(d.name),
            d.version,
            key.map(Into::into),
            payload,
            metadata,
        ))
    }

    /// The `send` span of publishing `n` messages to `topic` (OpenTelemetry's producer span);
    /// none when nothing records spans of its level. Made and entered for every publish, a span
    /// nothing records still cost ~470 instructions a message (of ~21,600; `tracing`'s `log`
    /// feature looks at the `log` crate's level at each step), `docs/benchmarks.md`.
    fn span(&self, topic: &str, n: usize) -> tracing::Span {
        if !tracing::level_enabled!(tracing::Level::INFO) {
            return tracing::Span::none();
        }
        tracing::info_span!(
            "send",
            otel.name = %format_args!("send {topic}"),
            otel.kind = "producer",
            messaging.system = self.publisher.system(),
            messaging.destination.name = %topic,
            messaging.operation.name = "send",
            messaging.operation.type = "send",
            messaging.batch.message_count = n,
        )
    }

    /// Encodes `events` and publishes them through [`Publisher::publish_iter`], so a backend
    /// can send the first while the rest are encoded.
    async fn encode_and_send<E: Event>(&self, d: &Descriptor, events: &[&E]) -> Result<()>
    where
        C: Codec<E>,
    {
        if events.is_empty() {
            return Ok(());
        }
        let route = self.route(d);
        let span = self.span(&route.topic, events.len());
        let mut messages = events
            .iter()
            .map(|e| self.encode(d, *e, e.key(), Metadata::default(), &span));
        crate::in_span(
            span.clone(),
            self.publisher.publish_iter(&route.topic, &mut messages),
        )
        .await?;
        route.sent.add(events.len());
        Ok(())
    }

    /// Encodes `value` and publishes it.
    async fn encode_and_send_one<T>(
        &self,
        d: &Descriptor,
        value: &T,
        key: Option<String>,
        metadata: Metadata,
    ) -> Result<()>
    where
        C: Codec<T>,
    {
        let route = self.route(d);
        let span = self.span(&route.topic, 1);
        let message = self.encode(d, value, key, metadata, &span)?;
        crate::in_span(
            span,
            self.publisher
                .publish(&route.topic, std::slice::from_ref(&message)),
        )
        .await?;
        route.sent.add(1);
        Ok(())
    }
}

/// What both buses share: cloning, `Debug`, constructors and the topic namer.
macro_rules! bus_plumbing {
    ($bus:ident, $verb:literal) => {
        impl<C> Clone for $bus<C> {
            fn clone(&self) -> Self {
                $bus {
                    outbox: self.outbox.clone(),
                }
            }
        }

        impl<C> fmt::Debug for $bus<C> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_struct(stringify!($bus)).finish_non_exhaustive()
            }
        }

        impl $bus {
            #[doc = concat!("A bus ", $verb, " through `publisher` with the default codec.")]
            pub fn new(publisher: impl Publisher) -> Self {
                $bus::with_codec(publisher, DefaultCodec::default())
            }
        }

        impl<C> $bus<C> {
            #[doc = concat!("A bus ", $verb, " through `publisher` with `codec`.")]
            pub fn with_codec(publisher: impl Publisher, codec: C) -> Self {
                $bus {
                    outbox: Outbox {
                        publisher: Arc::new(publisher),
                        codec: Arc::new(codec),
                        topics: TopicNamer::default(),
                        declared: Arc::default(),
                        routes: Arc::default(),
                    },
                }
            }

            /// What this bus was declared to publish: name, version and topic (from the
            /// current topic namer), for its manifest (`processor/manifest.rs`).
            pub(crate) fn declared(&self) -> Vec<(&'static str, u32, String)> {
                self.outbox
                    .declared
                    .iter()
                    .map(|d| (d.name, d.version, self.outbox.topics.topic_of(d)))
                    .collect()
            }

            /// Replaces how topics are named.
            pub fn topics(mut self, namer: TopicNamer) -> Self {
                self.outbox.topics = namer;
                self.outbox.routes = Arc::default();
                self
            }
        }
    };
}

/// Publishes typed events.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> cqrs::Result<()> {
/// # use cqrs::{Event, EventBus, memory::MemoryBroker};
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct SeatReserved { seat: u32 }
/// impl Event for SeatReserved { const NAME: &'static str = "SeatReserved"; }
///
/// let broker = MemoryBroker::new();
/// let bus = EventBus::new(broker.clone());
/// bus.publish(&SeatReserved { seat: 7 }).await?;
/// bus.publish_all(&[SeatReserved { seat: 8 }, SeatReserved { seat: 9 }]).await?;
/// assert_eq!(broker.messages("SeatReserved").len(), 3);
/// # Ok(()) }
/// ```
pub struct EventBus<C = DefaultCodec> {
    outbox: Outbox<C>,
}

bus_plumbing!(EventBus, "publishing");

impl<C> EventBus<C> {
    /// Declares that this bus publishes `E`, for its [`EventBus::manifest`] (publishing does
    /// not need it).
    pub fn declare<E: Event>(mut self) -> Self {
        self.outbox.declare(Descriptor::event::<E>());
        self
    }

    /// The topic events of type `E` go to.
    pub fn topic_of<E: Event>(&self) -> String {
        self.outbox.topics.topic_of(&Descriptor::event::<E>())
    }

    /// Publishes one event with fresh metadata.
    pub async fn publish<E: Event>(&self, event: &E) -> Result<()>
    where
        C: Codec<E>,
    {
        self.publish_with(event, Metadata::default()).await
    }

    /// Publishes one event with the given metadata (correlation id, headers, ...).
    pub async fn publish_with<E: Event>(&self, event: &E, metadata: Metadata) -> Result<()>
    where
        C: Codec<E>,
    {
        let d = Descriptor::event::<E>();
        self.outbox
            .encode_and_send_one(&d, event, event.key(), metadata)
            .await
    }

    /// The topic and the message [`EventBus::publish_with`] would send, without sending it: for
    /// an outbox that stores the message in a database transaction and sends it after the
    /// commit (`cqrs::postgres::Outbox`). With the `otel` feature the message carries the
    /// current span's trace context.
    pub fn encode<E: Event>(&self, event: &E, metadata: Metadata) -> Result<(String, Message)>
    where
        C: Codec<E>,
    {
        let d = Descriptor::event::<E>();
        let topic = self.outbox.topics.topic_of(&d);
        let message =
            self.outbox
                .encode(&d, event, event.key(), metadata, &tracing::Span::current())?;
        Ok((topic, message))
    }

    /// Publishes many events of one type in one broker round trip where the backend can.
    ///
    /// Events are encoded as they are handed to the backend, so on Kafka the first records are
    /// on their way while the rest are encoded. An event that fails to encode ends the call with
    /// [`Error::Encode`]: the in-memory broker and Redis then send none of the events, Kafka may
    /// have sent those before it. Any error leaves it open which events arrived, as with every
    /// publish: publish again (consumers may see an event twice).
    pub async fn publish_all<'a, E: Event>(
        &self,
        events: impl IntoIterator<Item = &'a E>,
    ) -> Result<()>
    where
        C: Codec<E>,
    {
        let d = Descriptor::event::<E>();
        let events: Vec<&E> = events.into_iter().collect();
        self.outbox.encode_and_send(&d, &events).await
    }
}

/// Sends typed commands to the one handler of each command type.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> cqrs::Result<()> {
/// # use cqrs::{Command, CommandBus, memory::MemoryBroker};
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct BookRoom { room: u32 }
/// impl Command for BookRoom { const NAME: &'static str = "BookRoom"; }
///
/// let broker = MemoryBroker::new();
/// CommandBus::new(broker.clone()).send(&BookRoom { room: 7 }).await?;
/// assert_eq!(broker.messages("BookRoom").len(), 1);
/// # Ok(()) }
/// ```
pub struct CommandBus<C = DefaultCodec> {
    outbox: Outbox<C>,
}

bus_plumbing!(CommandBus, "sending");

impl<C> CommandBus<C> {
    /// Declares that this bus sends `T`, for its [`CommandBus::manifest`].
    pub fn declare<T: Command>(mut self) -> Self {
        self.outbox.declare(Descriptor::command::<T>());
        self
    }

    /// Sends one command.
    pub async fn send<T: Command>(&self, command: &T) -> Result<()>
    where
        C: Codec<T>,
    {
        self.send_with(command, Metadata::default()).await
    }

    /// Sends one command with the given metadata.
    pub async fn send_with<T: Command>(&self, command: &T, metadata: Metadata) -> Result<()>
    where
        C: Codec<T>,
    {
        let d = Descriptor::command::<T>();
        self.outbox
            .encode_and_send_one(&d, command, command.key(), metadata)
            .await
    }
}
