//! The message envelope every backend carries.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::text::Text;

/// One message on the wire: an encoded event or command with its metadata.
///
/// `docs/wire-format.md` says how each backend lays these fields out.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Message {
    /// Unique, time-ordered id (a UUIDv7 in its hyphenated form).
    ///
    /// The id, the name and the key are [`Text`]: they read as `&str` and are shared, not
    /// copied, when a message is cloned; a backend may hand them out as parts of the buffer a
    /// batch of records came in, as it does the payload (and, as with the payload, one kept long
    /// after the message is handled keeps that buffer: see [`Text`]).
    pub id: Text,
    /// The event or command name, e.g. `tickets.BookingConfirmed`.
    pub name: Text,
    /// The schema version of the payload.
    pub version: u32,
    /// The partition / ordering key, if any.
    pub key: Option<Text>,
    /// The encoded payload. Shared, not copied: a backend may hand out the payloads of a batch
    /// of records as parts of one buffer (Kafka does), and cloning a message does not copy it.
    /// It reads as `&[u8]` (`&message.payload[..]`, or through `Deref`). A part of a buffer
    /// keeps the whole buffer: a message kept long after it is handled may keep its payload
    /// alone with `Bytes::copy_from_slice(&message.payload)`.
    pub payload: Bytes,
    /// Correlation, causation, time, content type and user headers.
    pub metadata: Metadata,
}

impl Message {
    /// A new message with a fresh id and `created_at` set to now.
    pub fn new(name: impl Into<Text>, payload: impl Into<Bytes>) -> Self {
        let (id, created_at) = new_message_id_and_millis();
        Message {
            id: id.into(),
            name: name.into(),
            version: 1,
            key: None,
            payload: payload.into(),
            metadata: Metadata {
                created_at,
                ..Metadata::default()
            },
        }
    }

    /// A message from all its parts, as a bus makes one from an encoded event (`Message` is
    /// `#[non_exhaustive]`: fields may be added without breaking this).
    #[inline]
    pub fn from_parts(
        id: Text,
        name: Text,
        version: u32,
        key: Option<Text>,
        payload: impl Into<Bytes>,
        metadata: Metadata,
    ) -> Self {
        Message {
            id,
            name,
            version,
            key,
            payload: payload.into(),
            metadata,
        }
    }

    /// Sets the schema version.
    pub fn with_version(mut self, version: u32) -> Self {
        self.version = version;
        self
    }

    /// Sets the ordering key.
    pub fn with_key(mut self, key: Option<Text>) -> Self {
        self.key = key;
        self
    }

    /// Sets the metadata.
    pub fn with_metadata(mut self, metadata: Metadata) -> Self {
        self.metadata = metadata;
        self
    }
}

/// Metadata carried beside the payload.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Metadata {
    /// Ties together every message caused by one request.
    pub correlation_id: Option<String>,
    /// The id of the message that caused this one.
    pub causation_id: Option<String>,
    /// Milliseconds since the Unix epoch when the message was created.
    pub created_at: u64,
    /// The payload's content type, e.g. `application/json`.
    pub content_type: Cow<'static, str>,
    /// User headers.
    pub headers: BTreeMap<String, String>,
}

impl Metadata {
    /// Empty metadata stamped with the current time.
    pub fn now() -> Self {
        Metadata {
            created_at: now_millis(),
            ..Metadata::default()
        }
    }

    /// Sets the correlation id.
    pub fn correlation_id(mut self, id: impl Into<String>) -> Self {
        self.correlation_id = Some(id.into());
        self
    }

    /// Sets the causation id.
    pub fn causation_id(mut self, id: impl Into<String>) -> Self {
        self.causation_id = Some(id.into());
        self
    }

    /// Adds a user header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Metadata for a message caused by `cause`: same correlation id (or the cause's id when it had
    /// none), causation id set to the cause's id.
    pub fn caused_by(cause: &Message) -> Self {
        Metadata {
            correlation_id: Some(
                cause
                    .metadata
                    .correlation_id
                    .clone()
                    .unwrap_or_else(|| cause.id.to_string()),
            ),
            causation_id: Some(cause.id.to_string()),
            ..Metadata::now()
        }
    }
}

/// A fresh unique, time-ordered message id.
#[inline]
pub fn new_message_id() -> String {
    hyphenated(uuid::Uuid::now_v7())
}

/// A fresh message id (as [`new_message_id`]) and the time it carries, in milliseconds since
/// the Unix epoch: a message's `created_at` without reading the clock a second time.
#[inline]
pub fn new_message_id_and_millis() -> (String, u64) {
    let id = uuid::Uuid::now_v7();
    let millis = id.get_timestamp().map_or_else(now_millis, |t| {
        let (secs, nanos) = t.to_unix();
        secs * 1000 + u64::from(nanos / 1_000_000)
    });
    (hyphenated(id), millis)
}

/// `id` as a message id: hyphenated, lower case.
#[inline]
fn hyphenated(id: uuid::Uuid) -> String {
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    id.hyphenated().encode_lower(&mut buf).to_owned()
}

/// Milliseconds since the Unix epoch, now (0 before 1970).
#[inline]
pub fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The time given with an id is the id's own (a UUIDv7 carries its milliseconds in its first
    /// 48 bits), read from the clock between the two reads around it.
    #[test]
    fn an_ids_time_is_the_time_it_was_made_and_the_time_it_carries() {
        let before = now_millis();
        let (id, millis) = new_message_id_and_millis();
        let after = now_millis();
        assert!(
            before <= millis && millis <= after,
            "{before} <= {millis} <= {after}"
        );
        let uuid = uuid::Uuid::parse_str(&id).expect("a UUID");
        assert_eq!(uuid.get_version_num(), 7);
        let carried = u64::from_str_radix(&id.replace('-', "")[..12], 16).expect("hex");
        assert_eq!(carried, millis);
        let m = Message::new("A", Vec::new());
        let carried = u64::from_str_radix(&m.id.replace('-', "")[..12], 16).expect("hex");
        assert_eq!(m.metadata.created_at, carried);
    }
}
