//! The field layout backends use to put a [`Message`] on the wire as named fields (Redis stream
//! entry fields, Kafka headers). `docs/wire-format.md` describes it for other languages.
//!
//! Reserved fields are written as `prefix + name`; user headers as `header_prefix + header`.
//! Only `name` and the payload are required when reading: a program in another language (or
//! `redis-cli`) can publish `name` + `payload` and our handlers accept it.

use std::borrow::Cow;
use std::collections::BTreeMap;

use bytes::Bytes;

use crate::message::{Message, Metadata};
use crate::text::Text;

/// Reserved field names, without prefix.
pub mod field {
    /// The message id.
    pub const ID: &str = "id";
    /// The event or command name (required).
    pub const NAME: &str = "name";
    /// The schema version (default 1).
    pub const VERSION: &str = "version";
    /// The ordering key.
    pub const KEY: &str = "key";
    /// The payload's content type.
    pub const CONTENT_TYPE: &str = "content-type";
    /// The correlation id.
    pub const CORRELATION_ID: &str = "correlation-id";
    /// The causation id.
    pub const CAUSATION_ID: &str = "causation-id";
    /// Milliseconds since the Unix epoch.
    pub const CREATED_AT: &str = "created-at";
    /// The payload, where the backend carries it as a field (Redis).
    pub const PAYLOAD: &str = "payload";
}

/// How one backend names the fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Put before every reserved field name (`""` for Redis, `"cqrs-"` for Kafka headers).
    pub prefix: &'static str,
    /// Put before every user header name (`"h."` for Redis, `""` for Kafka).
    pub header_prefix: &'static str,
    /// Whether the payload and key travel as fields (Redis) or beside them (Kafka value and key).
    pub payload_in_fields: bool,
    /// Leave out what a reader infers: version 1, content type `application/json`, and a
    /// creation time within a second of publishing (read back from the entry's own time, see
    /// [`Entry::time_ms`]).
    pub compact: bool,
}

#[derive(Clone, Copy)]
enum Field {
    Id,
    Name,
    Version,
    Key,
    ContentType,
    CorrelationId,
    CausationId,
    CreatedAt,
    Payload,
}

/// What a backend knows of an entry besides its fields.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    /// The backend's id of the entry, the message id when the message carries none.
    pub id: &'a str,
    /// The entry's time in milliseconds since the Unix epoch (a Redis entry id's first part, a
    /// Kafka record's timestamp): the creation time when the message carries none.
    pub time_ms: Option<u64>,
}

/// A field's value as [`Layout::decode`] takes it: borrowed bytes, copied where the message
/// keeps them, or owned ones (a reply the backend owns already), moved into the message.
pub trait FieldValue: AsRef<[u8]> + Sized {
    /// The value as text (UTF-8), or the value back when it is not text.
    fn into_text(self) -> Result<String, Self>;
    /// The value as bytes.
    fn into_bytes(self) -> Bytes;
    /// The value as shared text (a message's id, name and key), or the value back when it is
    /// not text. By default the text made by [`into_text`](FieldValue::into_text), moved
    /// without a copy; a value that is a part of a shared buffer may be kept as that part.
    fn into_shared(self) -> Result<Text, Self> {
        self.into_text().map(Text::from)
    }
    /// The value as a message's key: shared text, or lossy text when it is not UTF-8 (a key
    /// that is not text is kept, and not reported). Checked as text first: the lossy
    /// conversion walks it byte by byte.
    fn into_key(self) -> Text {
        self.into_shared()
            .unwrap_or_else(|k| String::from_utf8_lossy(k.as_ref()).into_owned().into())
    }
}

impl FieldValue for &[u8] {
    fn into_text(self) -> Result<String, Self> {
        std::str::from_utf8(self)
            .map(str::to_owned)
            .map_err(|_| self)
    }
    fn into_bytes(self) -> Bytes {
        Bytes::copy_from_slice(self)
    }
}

impl FieldValue for Vec<u8> {
    fn into_text(self) -> Result<String, Self> {
        String::from_utf8(self).map_err(std::string::FromUtf8Error::into_bytes)
    }
    fn into_bytes(self) -> Bytes {
        Bytes::from(self)
    }
}

/// A field's value that lies in a buffer the backend shares ([`Bytes`]): kept as that part of
/// it, not copied. A message's id, name, key and payload then share the buffer the backend read
/// them into, which is freed when the last of them is dropped (a copy and an allocation each
/// were a tenth of consuming's instructions on Kafka, docs/benchmarks.md).
#[derive(Debug, Clone, Copy)]
pub struct Part<'a> {
    buf: &'a Bytes,
    part: &'a [u8],
}

impl<'a> Part<'a> {
    /// `part`, a slice of `buf`. A `part` that does not lie in `buf` is copied where it is kept.
    #[inline]
    pub fn new(buf: &'a Bytes, part: &'a [u8]) -> Self {
        Part { buf, part }
    }

    /// Whether `part` lies in `buf` (and can be kept as a part of it).
    fn in_buf(&self) -> bool {
        let (start, at) = (self.buf.as_ptr() as usize, self.part.as_ptr() as usize);
        at >= start && at + self.part.len() <= start + self.buf.len()
    }
}

impl AsRef<[u8]> for Part<'_> {
    fn as_ref(&self) -> &[u8] {
        self.part
    }
}

impl FieldValue for Part<'_> {
    fn into_text(self) -> Result<String, Self> {
        self.part.into_text().map_err(|_| self)
    }
    fn into_bytes(self) -> Bytes {
        if self.in_buf() {
            self.buf.slice_ref(self.part)
        } else {
            Bytes::copy_from_slice(self.part)
        }
    }
    fn into_shared(self) -> Result<Text, Self> {
        Text::try_from(self.into_bytes()).map_err(|_| self)
    }
}

/// The content type assumed when a message carries none.
pub const DEFAULT_CONTENT_TYPE: &str = "application/json";

/// The most problems a malformed message's reason lists; the rest are counted ("and 3 more").
const PROBLEMS_LISTED: usize = 8;

/// A field's name or value as a reason echoes it: at most 64 bytes of it. They come from any
/// producer, of any size and number: a fuzzed entry of many headers, their names not UTF-8,
/// made a reason of 4,212 bytes.
fn shown(text: &str) -> std::borrow::Cow<'_, str> {
    crate::dead_letter::bounded(text, 64)
}

impl Layout {
    /// Redis Streams: `name`, `payload`, ... and `h.<header>`.
    pub const REDIS: Layout = Layout {
        prefix: "",
        header_prefix: "h.",
        payload_in_fields: true,
        compact: true,
    };

    /// Kafka: headers `cqrs-name`, ...; user headers as they are; key and value are the record's.
    pub const KAFKA: Layout = Layout {
        prefix: "cqrs-",
        header_prefix: "",
        payload_in_fields: false,
        compact: true,
    };

    /// The full name of a reserved field: static for the layouts defined here.
    fn reserved(&self, name: &'static str) -> Cow<'static, str> {
        const KAFKA: [(&str, &str); 9] = [
            (field::ID, "cqrs-id"),
            (field::NAME, "cqrs-name"),
            (field::VERSION, "cqrs-version"),
            (field::KEY, "cqrs-key"),
            (field::CONTENT_TYPE, "cqrs-content-type"),
            (field::CORRELATION_ID, "cqrs-correlation-id"),
            (field::CAUSATION_ID, "cqrs-causation-id"),
            (field::CREATED_AT, "cqrs-created-at"),
            (field::PAYLOAD, "cqrs-payload"),
        ];
        match self.prefix {
            "" => Cow::Borrowed(name),
            "cqrs-" => KAFKA
                .iter()
                .find(|(short, _)| *short == name)
                .map(|(_, full)| Cow::Borrowed(*full))
                .unwrap_or_else(|| Cow::Owned(format!("cqrs-{name}"))),
            prefix => Cow::Owned(format!("{prefix}{name}")),
        }
    }

    /// At most how many fields [`Layout::write`] puts for `message`, and at most how many bytes
    /// their names and values take together: for a backend to size its command or header list
    /// up front (grown from empty, a Redis command's buffers were reallocated ~10 times a
    /// message, copying the payload each time).
    pub fn size_hint(&self, message: &Message) -> (usize, usize) {
        let m = &message.metadata;
        let len = |s: Option<&str>| s.map_or(0, str::len);
        // Every reserved field, as if none were left out; numbers at their longest.
        let reserved = [
            field::ID,
            field::NAME,
            field::KEY,
            field::CONTENT_TYPE,
            field::CORRELATION_ID,
            field::CAUSATION_ID,
            field::VERSION,
            field::CREATED_AT,
            field::PAYLOAD,
        ];
        let names: usize = reserved.iter().map(|f| self.prefix.len() + f.len()).sum();
        let values = message.id.len()
            + message.name.len()
            + len(message.key.as_deref())
            + m.content_type.len()
            + len(m.correlation_id.as_deref())
            + len(m.causation_id.as_deref())
            + 10
            + 20
            + if self.payload_in_fields {
                message.payload.len()
            } else {
                0
            };
        let headers: usize = m
            .headers
            .iter()
            .map(|(k, v)| self.header_prefix.len() + k.len() + v.len())
            .sum();
        (reserved.len() + m.headers.len(), names + values + headers)
    }

    /// Calls `put` with every field of `message`, in a stable order, leaving out what a reader
    /// infers (see [`Layout::compact`]). Allocates nothing for the usual fields.
    pub fn write(&self, message: &Message, mut put: impl FnMut(&str, &[u8])) {
        let m = &message.metadata;
        put(&self.reserved(field::ID), message.id.as_bytes());
        put(&self.reserved(field::NAME), message.name.as_bytes());
        if self.payload_in_fields {
            if let Some(key) = &message.key {
                put(&self.reserved(field::KEY), key.as_bytes());
            }
        }
        let implied = self.compact && m.content_type == DEFAULT_CONTENT_TYPE;
        if !(m.content_type.is_empty() || implied) {
            put(
                &self.reserved(field::CONTENT_TYPE),
                m.content_type.as_bytes(),
            );
        }
        if let Some(c) = &m.correlation_id {
            put(&self.reserved(field::CORRELATION_ID), c.as_bytes());
        }
        if let Some(c) = &m.causation_id {
            put(&self.reserved(field::CAUSATION_ID), c.as_bytes());
        }
        if !(self.compact && message.version == 1) {
            put(
                &self.reserved(field::VERSION),
                message.version.to_string().as_bytes(),
            );
        }
        let created = m.created_at;
        if !(self.compact && crate::message::now_millis().abs_diff(created) < 1000) {
            put(
                &self.reserved(field::CREATED_AT),
                created.to_string().as_bytes(),
            );
        }
        for (k, v) in &m.headers {
            put(&format!("{}{k}", self.header_prefix), v.as_bytes());
        }
        if self.payload_in_fields {
            put(&self.reserved(field::PAYLOAD), &message.payload);
        }
    }

    /// Which reserved field `name` is, comparing bytes only when the length fits.
    fn classify(&self, name: &[u8]) -> Option<Field> {
        let rest = name.strip_prefix(self.prefix.as_bytes())?;
        let (field, expected) = match rest.len() {
            2 => (Field::Id, field::ID),
            3 => (Field::Key, field::KEY),
            4 => (Field::Name, field::NAME),
            7 if rest[0] == b'v' => (Field::Version, field::VERSION),
            7 => (Field::Payload, field::PAYLOAD),
            10 => (Field::CreatedAt, field::CREATED_AT),
            12 if rest[0] == b'c' && rest[1] == b'o' => (Field::ContentType, field::CONTENT_TYPE),
            12 => (Field::CausationId, field::CAUSATION_ID),
            14 => (Field::CorrelationId, field::CORRELATION_ID),
            _ => return None,
        };
        (rest == expected.as_bytes()).then_some(field)
    }

    /// Rebuilds a message from its fields and what the backend knows of the entry: its own id
    /// and time (used when the message carries none), and the record's key and payload when the
    /// backend carries them beside the fields (or the caller took the payload out already).
    ///
    /// Returns the message and, when it is malformed (no name, no payload, a version that is not
    /// a number, text that is not UTF-8), the reason, beside the best message that could be made,
    /// so that it can be dead-lettered rather than lost.
    ///
    /// A field's name is text or bytes (`&str`, `&[u8]`): a reserved one is recognised by its
    /// bytes, and only a header's name is checked as text. A field's value is borrowed bytes
    /// (copied where the message keeps them) or owned ones (moved into the message's text without
    /// a copy): see [`FieldValue`].
    pub fn decode<N: AsRef<[u8]>, V: FieldValue, K: FieldValue>(
        &self,
        fields: impl IntoIterator<Item = (N, V)>,
        entry: Entry<'_>,
        key: Option<K>,
        payload: Option<Bytes>,
    ) -> (Message, Option<String>) {
        let mut problems: Vec<String> = Vec::new();
        fn text<V: FieldValue>(name: &[u8], v: V, problems: &mut Vec<String>) -> String {
            match v.into_text() {
                Ok(s) => s,
                Err(v) => {
                    let name = String::from_utf8_lossy(name);
                    problems.push(format!("field `{}` is not UTF-8", shown(&name)));
                    String::from_utf8_lossy(v.as_ref()).into_owned()
                }
            }
        }
        /// A message's id, name or key: shared, lossy when it is not text.
        fn shared<V: FieldValue>(name: &[u8], v: V, problems: &mut Vec<String>) -> Text {
            v.into_shared()
                .unwrap_or_else(|v| text(name, v, problems).into())
        }
        fn number<N: std::str::FromStr, V: FieldValue>(
            name: &[u8],
            v: V,
            problems: &mut Vec<String>,
        ) -> Option<N> {
            // Parsed where it lies: made into text only to report it.
            if let Some(n) = std::str::from_utf8(v.as_ref())
                .ok()
                .and_then(|t| t.trim().parse().ok())
            {
                return Some(n);
            }
            let v = text(name, v, problems);
            // Echoed in part: the value came from outside and may be of any size.
            let name = String::from_utf8_lossy(name);
            problems.push(format!(
                "field `{}` is not a number: `{}`",
                shown(&name),
                shown(&v)
            ));
            None
        }
        let mut has_payload = payload.is_some();
        let mut message = Message {
            id: Text::new(),
            name: Text::new(),
            version: 1,
            key: key.map(FieldValue::into_key),
            payload: payload.unwrap_or_default(),
            metadata: Metadata {
                correlation_id: None,
                causation_id: None,
                created_at: 0,
                content_type: Cow::Borrowed(""),
                headers: BTreeMap::new(),
            },
        };
        for (name, value) in fields {
            let name = name.as_ref();
            match self.classify(name) {
                Some(Field::Id) => message.id = shared(name, value, &mut problems),
                Some(Field::Name) => message.name = shared(name, value, &mut problems),
                Some(Field::Version) => {
                    if let Some(n) = number(name, value, &mut problems) {
                        message.version = n;
                    }
                }
                Some(Field::Key) if self.payload_in_fields => {
                    message.key = Some(shared(name, value, &mut problems));
                }
                Some(Field::ContentType) => {
                    message.metadata.content_type =
                        if value.as_ref() == DEFAULT_CONTENT_TYPE.as_bytes() {
                            Cow::Borrowed(DEFAULT_CONTENT_TYPE)
                        } else {
                            Cow::Owned(text(name, value, &mut problems))
                        };
                }
                Some(Field::CorrelationId) => {
                    message.metadata.correlation_id = Some(text(name, value, &mut problems));
                }
                Some(Field::CausationId) => {
                    message.metadata.causation_id = Some(text(name, value, &mut problems));
                }
                Some(Field::CreatedAt) => {
                    if let Some(n) = number(name, value, &mut problems) {
                        message.metadata.created_at = n;
                    }
                }
                Some(Field::Payload) if self.payload_in_fields => {
                    message.payload = value.into_bytes();
                    has_payload = true;
                }
                _ => {
                    if let Some(header) = name.strip_prefix(self.header_prefix.as_bytes()) {
                        let v = text(name, value, &mut problems);
                        let header = match std::str::from_utf8(header) {
                            Ok(header) => header.to_owned(),
                            Err(_) => {
                                let lossy = String::from_utf8_lossy(header).into_owned();
                                problems
                                    .push(format!("header name `{}` is not UTF-8", shown(&lossy)));
                                lossy
                            }
                        };
                        message.metadata.headers.insert(header, v);
                    }
                }
            }
        }
        if message.id.is_empty() {
            message.id = entry.id.into();
        }
        if message.metadata.content_type.is_empty() {
            message.metadata.content_type = Cow::Borrowed(DEFAULT_CONTENT_TYPE);
        }
        if message.metadata.created_at == 0 {
            message.metadata.created_at = entry.time_ms.unwrap_or(0);
        }
        if message.name.is_empty() {
            problems.push(format!("field `{}{}` is missing", self.prefix, field::NAME));
        }
        if !has_payload {
            problems.push(format!(
                "field `{}{}` is missing",
                self.prefix,
                field::PAYLOAD
            ));
        }
        let reason = (!problems.is_empty()).then(|| {
            let listed = problems.len().min(PROBLEMS_LISTED);
            let mut reason = format!("malformed message: {}", problems[..listed].join("; "));
            if problems.len() > listed {
                reason += &format!("; and {} more", problems.len() - listed);
            }
            reason
        });
        (message, reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_part_of_the_buffer_is_kept_as_that_part_and_any_other_is_copied() {
        let buf = Bytes::from_static(b"id-1tickets.Booked\xff");
        let payload = Part::new(&buf, &buf[4..18]).into_bytes();
        assert_eq!(&payload[..], b"tickets.Booked");
        assert_eq!(payload.as_ptr(), buf[4..].as_ptr(), "shared, not copied");
        let id = Part::new(&buf, &buf[..4]).into_shared().expect("UTF-8");
        assert_eq!(id, "id-1");
        assert_eq!(id.into_bytes().as_ptr(), buf.as_ptr());
        // Not text: given back, as a borrowed value's would be.
        let not_text = Part::new(&buf, &buf[18..]);
        assert!(not_text.into_shared().is_err() && not_text.into_text().is_err());
        // A slice of another buffer: copied where it is kept (no panic).
        let other = b"elsewhere".to_vec();
        let copied = Part::new(&buf, &other[..]).into_bytes();
        assert_eq!(&copied[..], b"elsewhere");
        assert_ne!(copied.as_ptr(), other.as_ptr());
        assert!(Part::new(&buf, &[]).into_bytes().is_empty());
    }

    fn sample() -> Message {
        let mut m = Message::new("tickets.Booked", b"{\"id\":1}".to_vec())
            .with_version(3)
            .with_key(Some("k-1".into()))
            .with_metadata(
                Metadata::now()
                    .correlation_id("c")
                    .causation_id("d")
                    .header("tenant", "acme"),
            );
        m.metadata.content_type = "application/json".into();
        m
    }

    fn written(layout: Layout, m: &Message) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        layout.write(m, |k, v| out.push((k.to_owned(), v.to_vec())));
        out
    }

    fn roundtrip(layout: Layout, m: &Message) -> (Message, Option<String>) {
        let owned = written(layout, m);
        let fields: Vec<(&str, &[u8])> = owned.iter().map(|(k, v)| (k.as_str(), &v[..])).collect();
        let (key, payload) = if layout.payload_in_fields {
            (None, None)
        } else {
            (m.key.as_deref().map(str::as_bytes), Some(m.payload.clone()))
        };
        let entry_id = format!("{}-0", m.metadata.created_at);
        let entry = Entry {
            id: &entry_id,
            time_ms: Some(m.metadata.created_at),
        };
        layout.decode(fields, entry, key, payload)
    }

    #[test]
    fn both_layouts_roundtrip() {
        let m = sample();
        assert_eq!(roundtrip(Layout::REDIS, &m), (m.clone(), None));
        assert_eq!(roundtrip(Layout::KAFKA, &m), (m, None));
    }

    /// The hint is an upper bound of what `write` puts, with every field written (an old
    /// creation time, a version and a content type a reader does not infer, headers).
    #[test]
    fn the_size_hint_bounds_what_is_written() {
        let mut m = sample();
        m.metadata.created_at = u64::MAX;
        m.version = u32::MAX;
        m.metadata.content_type = "application/msgpack".into();
        for layout in [Layout::REDIS, Layout::KAFKA] {
            let fields = written(layout, &m);
            let bytes: usize = fields.iter().map(|(k, v)| k.len() + v.len()).sum();
            let (most_fields, most_bytes) = layout.size_hint(&m);
            assert!(fields.len() <= most_fields, "{layout:?}: {fields:?}");
            assert!(bytes <= most_bytes, "{layout:?}: {bytes} > {most_bytes}");
        }
    }

    #[test]
    fn compact_layout_leaves_out_defaults_but_keeps_old_times() {
        let mut m = Message::new("A", b"{}".to_vec());
        m.metadata.content_type = "application/json".into();
        let names = |layout: Layout, m: &Message| -> Vec<String> {
            written(layout, m).into_iter().map(|(k, _)| k).collect()
        };
        assert_eq!(names(Layout::REDIS, &m), ["id", "name", "payload"]);
        assert_eq!(names(Layout::KAFKA, &m), ["cqrs-id", "cqrs-name"]);
        m.metadata.created_at -= 60_000;
        m.version = 2;
        m.metadata.headers.insert("tenant".into(), "acme".into());
        assert_eq!(
            names(Layout::REDIS, &m),
            ["id", "name", "version", "created-at", "h.tenant", "payload"]
        );
        assert_eq!(
            names(Layout::KAFKA, &m),
            [
                "cqrs-id",
                "cqrs-name",
                "cqrs-version",
                "cqrs-created-at",
                "tenant"
            ]
        );
    }

    #[test]
    fn owned_values_decode_as_borrowed_ones_do() {
        let m = sample();
        for layout in [Layout::REDIS, Layout::KAFKA] {
            let mut owned = written(layout, &m);
            let (key, payload) = if layout.payload_in_fields {
                (None, None)
            } else {
                (m.key.as_deref().map(str::as_bytes), Some(m.payload.clone()))
            };
            let entry = Entry {
                id: "0-0",
                time_ms: Some(m.metadata.created_at),
            };
            let fields = owned
                .iter_mut()
                .map(|(k, v)| (k.as_str(), std::mem::take(v)));
            assert_eq!(
                layout.decode(fields, entry, key, payload),
                roundtrip(layout, &m),
                "{layout:?}"
            );
        }
        // Not text, or not a number: the same reasons, the value shown lossily.
        let fields = |version: &[u8]| {
            vec![
                ("name", b"A\xff".to_vec()),
                ("version", version.to_vec()),
                ("payload", b"{}".to_vec()),
            ]
        };
        let entry = || Entry {
            id: "1-0",
            time_ms: None,
        };
        let owned: Vec<(&str, Vec<u8>)> = fields(b"x\xff");
        let (m, owned_reason) = Layout::REDIS.decode(owned.clone(), entry(), None::<&[u8]>, None);
        let (_, borrowed_reason) = Layout::REDIS.decode(
            owned.iter().map(|(k, v)| (*k, &v[..])),
            entry(),
            None::<&[u8]>,
            None,
        );
        assert_eq!(m.name, "A\u{fffd}");
        assert_eq!(owned_reason, borrowed_reason);
        assert_eq!(
            owned_reason.as_deref(),
            Some(
                "malformed message: field `name` is not UTF-8; field `version` is not UTF-8; \
                 field `version` is not a number: `x\u{fffd}`"
            )
        );
        let (m, reason) = Layout::REDIS.decode(fields(b" 7 "), entry(), None::<&[u8]>, None);
        assert_eq!(
            (m.version, reason.is_some()),
            (7, true),
            "7 parsed, the name not UTF-8"
        );
    }

    #[test]
    fn a_key_beside_the_fields_is_taken_as_text_and_one_not_utf8_lossily() {
        let fields: Vec<(&str, &[u8])> = vec![("name", b"Booked")];
        let entry = || Entry {
            id: "0:1",
            time_ms: None,
        };
        let key = |k: &[u8]| {
            let (m, _) = Layout::KAFKA.decode(fields.clone(), entry(), Some(k), Some(Bytes::new()));
            m.key
        };
        assert_eq!(key(b"seat-12").as_deref(), Some("seat-12"));
        assert_eq!(key(b"seat-\xff").as_deref(), Some("seat-\u{fffd}"));
    }

    #[test]
    fn names_given_as_bytes_decode_as_text_does_and_a_header_name_not_utf8_is_said() {
        let entry = || Entry {
            id: "1-0",
            time_ms: None,
        };
        let fields: Vec<(&[u8], &[u8])> = vec![
            (b"name", b"Booked"),
            (b"payload", b"{}"),
            (b"h.tenant", b"acme"),
        ];
        let (m, reason) = Layout::REDIS.decode(fields, entry(), None::<&[u8]>, None);
        assert_eq!(reason, None);
        assert_eq!(m.name, "Booked");
        assert_eq!(
            m.metadata.headers.get("tenant").map(String::as_str),
            Some("acme")
        );
        let fields: Vec<(&[u8], &[u8])> = vec![
            (b"name", b"Booked"),
            (b"payload", b"{}"),
            (b"h.t\xff", b"v"),
        ];
        let (m, reason) = Layout::REDIS.decode(fields, entry(), None::<&[u8]>, None);
        assert_eq!(
            reason.as_deref(),
            Some("malformed message: header name `t\u{fffd}` is not UTF-8")
        );
        assert_eq!(
            m.metadata.headers.get("t\u{fffd}").map(String::as_str),
            Some("v")
        );
    }

    /// What a producer writes is of any size and number: the reason echoes 64 bytes of a name or
    /// value and lists eight problems, then counts the rest (a fuzzed entry made one of 4,212
    /// bytes). Every header is still kept.
    #[test]
    fn a_reason_echoes_bounded_parts_of_a_bounded_number_of_problems() {
        let long = |i: usize| {
            let mut name = b"h.".to_vec();
            name.extend(std::iter::repeat_n(b'n', 500));
            name.extend(i.to_string().as_bytes());
            name.push(0xff);
            name
        };
        let names: Vec<Vec<u8>> = (0..20).map(long).collect();
        let mut fields: Vec<(&[u8], &[u8])> = vec![(b"name", b"Booked"), (b"payload", b"{}")];
        fields.extend(names.iter().map(|n| (&n[..], &b"\xff"[..])));
        fields.push((b"version", &[b'9'; 300]));
        let entry = Entry {
            id: "1-0",
            time_ms: None,
        };
        let (m, reason) = Layout::REDIS.decode(fields, entry, None::<&[u8]>, None);
        let reason = reason.expect("malformed");
        assert!(reason.len() < 2_000, "{} bytes: {reason}", reason.len());
        // Each header twice (its value, then its name, not UTF-8), and the version.
        assert!(
            reason.starts_with(
                "malformed message: field `h.nnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnn... (442 more bytes)` is not UTF-8; header name `nnnn"
            ),
            "{reason}"
        );
        assert!(reason.ends_with("; and 33 more"), "{reason}");
        assert_eq!(m.metadata.headers.len(), 20, "every header kept");
    }

    #[test]
    fn name_and_payload_are_enough() {
        let fields: Vec<(&str, &[u8])> = vec![("name", b"Booked"), ("payload", b"{}")];
        let (m, reason) = Layout::REDIS.decode(
            fields,
            Entry {
                id: "1700-0",
                time_ms: Some(1700),
            },
            None::<&[u8]>,
            None,
        );
        assert_eq!(reason, None);
        assert_eq!((&*m.id, &*m.name, m.version), ("1700-0", "Booked", 1));
        assert_eq!(&m.payload[..], b"{}");
    }

    #[test]
    fn a_malformed_field_of_any_size_is_echoed_in_part() {
        let huge = "9x".repeat(250_000);
        let fields: Vec<(&str, &[u8])> = vec![
            ("name", b"A"),
            ("version", huge.as_bytes()),
            ("payload", b"{}"),
        ];
        let entry = Entry {
            id: "1-0",
            time_ms: Some(1),
        };
        let (_, reason) = Layout::REDIS.decode(fields, entry, None::<&[u8]>, None);
        let reason = reason.unwrap_or_default();
        assert!(reason.len() < 200, "{} bytes", reason.len());
        assert!(reason.contains("is not a number: `9x9x"), "{reason}");
        assert!(reason.contains("(499936 more bytes)"), "{reason}");
    }

    #[test]
    fn malformed_messages_say_why() {
        let fields: Vec<(&str, &[u8])> = vec![("version", b"two"), ("payload", b"{}")];
        let (m, reason) = Layout::REDIS.decode(
            fields,
            Entry {
                id: "1-0",
                time_ms: Some(1),
            },
            None::<&[u8]>,
            None,
        );
        assert_eq!(m.id, "1-0");
        assert_eq!(
            reason.as_deref().unwrap_or_default(),
            "malformed message: field `version` is not a number: `two`; field `name` is missing"
        );
        let fields: Vec<(&str, &[u8])> = vec![("name", b"A")];
        let (_, reason) = Layout::REDIS.decode(
            fields,
            Entry {
                id: "1-0",
                time_ms: Some(1),
            },
            None::<&[u8]>,
            None,
        );
        assert_eq!(
            reason.as_deref(),
            Some("malformed message: field `payload` is missing")
        );
    }
}
