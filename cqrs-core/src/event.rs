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
    /// The schema version carried in the metadata. A handler of this type refuses messages of a
    /// newer version ([`crate::Error::UnknownVersion`]) and reads older ones through
    /// [`Event::upcast`].
    const VERSION: u32 = 1;
    /// The partition / ordering key of this value.
    fn key(&self) -> Option<String> {
        None
    }
    /// Reads a payload written as an older `version` of this event (upcasting): `None` when no
    /// path leads from that version to this one (the message is dead-lettered with
    /// [`crate::Error::NoUpcast`]). The default knows no older version.
    ///
    /// `#[derive(Event)]` with `#[event(upcast_from = "PreviousType")]` writes it: a payload of
    /// `PreviousType::VERSION` is decoded as that type with the default codec and converted
    /// with `From`, an older one goes through `PreviousType::upcast` first, so versions chain.
    /// By hand, for a `serde_json::Value` migration:
    ///
    /// ```
    /// # use cqrs_core::{CodecError, Event};
    /// #[derive(serde::Serialize, serde::Deserialize)]
    /// struct OrderPlaced { order_id: String, total_cents: u64 }
    ///
    /// impl Event for OrderPlaced {
    ///     const NAME: &'static str = "orders.OrderPlaced";
    ///     const VERSION: u32 = 2;
    ///     fn upcast(version: u32, payload: &[u8]) -> Option<Result<Self, CodecError>> {
    ///         // Version 1 had `total` in euros.
    ///         (version == 1).then(|| {
    ///             let mut v: serde_json::Value = serde_json::from_slice(payload).map_err(CodecError::new)?;
    ///             let euros = v["total"].as_f64().unwrap_or_default();
    ///             v["total_cents"] = serde_json::json!((euros * 100.0).round() as u64);
    ///             serde_json::from_value(v).map_err(CodecError::new)
    ///         })
    ///     }
    /// }
    /// let old = br#"{"order_id":"o-1","total":12.5}"#;
    /// let order = OrderPlaced::upcast(1, old).unwrap().unwrap();
    /// assert_eq!(order.total_cents, 1250);
    /// ```
    fn upcast(version: u32, payload: &[u8]) -> Option<Result<Self, crate::CodecError>>
    where
        Self: Sized,
    {
        let _ = (version, payload);
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
