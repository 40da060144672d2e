//! What a processor will run, described before it runs: its groups, their handlers, events,
//! topics and dead-letter topics.

use std::fmt;

use super::options::{DeliveryMode, HandlerOptions};

/// The topology of one processor: every consumer group it will join, with what it handles.
///
/// Built from the registrations by `EventProcessor::manifest` (and the other processors'); the
/// same checks run at `start`. Its `Display` is a readable listing:
///
/// ```
/// # use cqrs::{Event, EventProcessor, memory::MemoryBroker};
/// # #[derive(serde::Serialize, serde::Deserialize)]
/// # struct Booked { id: u32 }
/// # impl Event for Booked { const NAME: &'static str = "tickets.Booked"; }
/// let mut p = EventProcessor::new(MemoryBroker::new(), "svc-mail");
/// p.handle("confirm", |_: Booked| async { Ok::<_, String>(()) }).unwrap();
/// assert_eq!(
///     p.manifest().to_string(),
///     "service svc-mail\n  group svc-mail.confirm (at-least-once, concurrency 1) on the \
///      in-memory broker\n    \
///      handler confirm: tickets.Booked from tickets.Booked\n    dead letters to svc-mail.confirm.dead-letter\n"
/// );
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Manifest {
    /// The service the groups belong to (empty in a bus's manifest).
    pub service: String,
    /// One entry per consumer group.
    pub groups: Vec<GroupManifest>,
    /// What the service publishes: the events (and commands) declared on its buses.
    pub publishes: Vec<Published>,
}

/// An event or command a bus publishes, and where ([`crate::EventBus::declare`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The event or command name.
    pub name: String,
    /// The version it is written with.
    pub version: u32,
    /// The topic it goes to.
    pub topic: String,
}

/// One consumer group of a [`Manifest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupManifest {
    /// The group's name, as the broker knows it.
    pub group: String,
    /// The topics it reads.
    pub topics: Vec<String>,
    /// Its handlers, each with the event it takes.
    pub handlers: Vec<HandlerManifest>,
    /// Where messages that fail for good go.
    pub dead_letter_topic: String,
    /// When messages are acked.
    pub delivery: DeliveryMode,
    /// Messages handled at once (1 for a batch handler).
    pub concurrency: usize,
    /// Where its topics live (the backend's words: a Redis pool, a Kafka cluster), when the
    /// backend says.
    pub location: Option<String>,
}

/// One handler of a [`GroupManifest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerManifest {
    /// The handler's name.
    pub name: String,
    /// The event (or command) name it handles.
    pub event: String,
    /// The version of the event it reads (older ones are upcast).
    pub version: u32,
    /// Whether it takes batches.
    pub batch: bool,
}

impl GroupManifest {
    pub(crate) fn new(
        group: String,
        topics: Vec<String>,
        handlers: Vec<HandlerManifest>,
        options: &HandlerOptions,
    ) -> Self {
        let batch = handlers.iter().any(|h| h.batch);
        GroupManifest {
            dead_letter_topic: options
                .dead_letter_topic
                .clone()
                .unwrap_or_else(|| crate::dead_letter::topic_of(&group)),
            group,
            topics,
            handlers,
            delivery: options.delivery,
            concurrency: if batch { 1 } else { options.concurrency },
            location: None,
        }
    }
}

impl Manifest {
    /// Checks what would go wrong at run time: two handlers that map to one consumer group
    /// (a group namer that ignores the handler name) would share their messages instead of
    /// each seeing every one.
    pub fn validate(&self) -> crate::Result<()> {
        for (i, a) in self.groups.iter().enumerate() {
            if let Some(b) = self.groups[i + 1..].iter().find(|b| b.group == a.group) {
                let names = |g: &GroupManifest| {
                    g.handlers
                        .iter()
                        .map(|h| format!("`{}`", h.name))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                return Err(crate::Error::Config(format!(
                    "handlers {} and {} of service `{}` map to one consumer group `{}`: each would \
                     see only part of the messages; give each its own group (check the group \
                     namer) or put them in one EventGroupProcessor",
                    names(a),
                    names(b),
                    self.service,
                    a.group
                )));
            }
        }
        Ok(())
    }

    /// This manifest with `other`'s groups and published events added: a service's whole
    /// topology from its processors and buses.
    ///
    /// ```
    /// # use cqrs::{CommandBus, Event, EventBus, EventProcessor, memory::MemoryBroker};
    /// # #[derive(serde::Serialize, serde::Deserialize)]
    /// # struct Booked { id: u32 }
    /// # impl Event for Booked { const NAME: &'static str = "tickets.Booked"; }
    /// let broker = MemoryBroker::new();
    /// let mut p = EventProcessor::new(broker.clone(), "svc-mail");
    /// p.handle("confirm", |_: Booked| async { Ok::<_, String>(()) }).unwrap();
    /// let bus = EventBus::new(broker).declare::<Booked>();
    /// let all = p.manifest().merge(bus.manifest());
    /// assert_eq!(all.publishes[0].topic, "tickets.Booked");
    /// assert_eq!(all.readers_of("tickets.Booked").count(), 1);
    /// ```
    pub fn merge(mut self, other: Manifest) -> Manifest {
        if self.service.is_empty() {
            self.service = other.service;
        }
        self.groups.extend(other.groups);
        for p in other.publishes {
            if !self.publishes.contains(&p) {
                self.publishes.push(p);
            }
        }
        self
    }

    /// The groups that read `topic`.
    pub fn readers_of<'a>(&'a self, topic: &'a str) -> impl Iterator<Item = &'a GroupManifest> {
        self.groups
            .iter()
            .filter(move |g| g.topics.iter().any(|t| t == topic))
    }
}

impl fmt::Display for Manifest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.service.is_empty() {
            writeln!(f, "service {}", self.service)?;
        }
        for g in &self.groups {
            let delivery = match g.delivery {
                DeliveryMode::AtLeastOnce => "at-least-once",
                DeliveryMode::AtMostOnce => "at-most-once",
            };
            let location = g
                .location
                .as_ref()
                .map_or_else(String::new, |l| format!(" on {l}"));
            writeln!(
                f,
                "  group {} ({delivery}, concurrency {}){location}",
                g.group, g.concurrency
            )?;
            for h in &g.handlers {
                let batch = if h.batch { " (batches)" } else { "" };
                let version = if h.version == 1 {
                    String::new()
                } else {
                    format!(" v{}", h.version)
                };
                writeln!(
                    f,
                    "    handler {}{batch}: {}{version} from {}",
                    h.name,
                    h.event,
                    g.topics.join(", ")
                )?;
            }
            writeln!(f, "    dead letters to {}", g.dead_letter_topic)?;
        }
        for p in &self.publishes {
            writeln!(f, "  publishes {} v{} to {}", p.name, p.version, p.topic)?;
        }
        Ok(())
    }
}

impl Manifest {
    /// The manifest of a bus: what it publishes, and nothing else.
    fn publishing(declared: Vec<(&'static str, u32, String)>) -> Manifest {
        Manifest {
            publishes: declared
                .into_iter()
                .map(|(name, version, topic)| Published {
                    name: name.to_owned(),
                    version,
                    topic,
                })
                .collect(),
            ..Default::default()
        }
    }
}

// The buses' manifests are made here, so that the bus does not depend on the processor (the
// processor depends on the bus for the topic namer).
impl<C> crate::EventBus<C> {
    /// What this bus was declared to publish, with each topic (from the current topic namer), as
    /// a [`Manifest`] to merge with the processors'.
    pub fn manifest(&self) -> Manifest {
        Manifest::publishing(self.declared())
    }
}

impl<C> crate::CommandBus<C> {
    /// What this bus was declared to send, with each topic (from the current topic namer), as a
    /// [`Manifest`] to merge with the processors'.
    pub fn manifest(&self) -> Manifest {
        Manifest::publishing(self.declared())
    }
}
