//! The [`Event`] and [`Command`] traits, usually derived.

/// A typed event: its name, topic, schema version and ordering key.
///
/// Derive it with `#[derive(Event)]` from the `cqrs` crate rather than writing it by hand:
///
/// ```
/// # use cqrs_core::Event;
/// # #[derive(serde::Serialize, serde::Deserialize)]
/// struct BookingConfirmed { booking_id: String }
///
/// impl Event for BookingConfirmed {
///     const NAME: &'static str = "tickets.BookingConfirmed";
///     fn key(&self) -> Option<String> { Some(self.booking_id.clone()) }
/// }
/// assert_eq!(BookingConfirmed::TOPIC, None);
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an event",
    note = "add `#[derive(cqrs::Event, serde::Serialize, serde::Deserialize)]` to `{Self}`"
)]
pub trait Event: Send + Sync + 'static {
    /// The event name carried in every message, e.g. `tickets.BookingConfirmed`.
    const NAME: &'static str;
    /// A pinned topic; `None` lets the bus generate one from [`Event::NAME`].
    const TOPIC: Option<&'static str> = None;
    /// The schema version carried in the metadata.
    const VERSION: u32 = 1;
    /// The partition / ordering key of this value.
    fn key(&self) -> Option<String> {
        None
    }
}

/// A typed command: like [`Event`], but handled by exactly one handler.
///
/// Derive it with `#[derive(Command)]` from the `cqrs` crate.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a command",
    note = "add `#[derive(cqrs::Command, serde::Serialize, serde::Deserialize)]` to `{Self}`"
)]
pub trait Command: Send + Sync + 'static {
    /// The command name carried in every message.
    const NAME: &'static str;
    /// A pinned topic; `None` lets the bus generate one from [`Command::NAME`].
    const TOPIC: Option<&'static str> = None;
    /// The schema version carried in the metadata.
    const VERSION: u32 = 1;
    /// The partition / ordering key of this value.
    fn key(&self) -> Option<String> {
        None
    }
}

/// The static description shared by events and commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Descriptor {
    pub name: &'static str,
    pub topic: Option<&'static str>,
    pub version: u32,
}

impl Descriptor {
    pub(crate) fn event<E: Event>() -> Self {
        Descriptor {
            name: E::NAME,
            topic: E::TOPIC,
            version: E::VERSION,
        }
    }

    pub(crate) fn command<C: Command>() -> Self {
        Descriptor {
            name: C::NAME,
            topic: C::TOPIC,
            version: C::VERSION,
        }
    }
}

/// Checks that `topic` can be used as a topic or stream name on every backend: 1 to 249 characters of
/// ASCII letters, digits, `.`, `_` and `-`.
pub fn validate_topic(topic: &str) -> Result<(), String> {
    if topic.is_empty() {
        return Err("a topic cannot be empty".into());
    }
    if topic.len() > 249 {
        return Err(format!("topic `{topic}` is longer than 249 characters"));
    }
    if topic == "." || topic == ".." {
        return Err(format!("`{topic}` is not a valid topic"));
    }
    if let Some(c) = topic
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "topic `{topic}` contains `{c}`; use ASCII letters, digits, `.`, `_` and `-`"
        ));
    }
    Ok(())
}
