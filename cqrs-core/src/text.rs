//! [`Text`]: a message's id, name and key, shared rather than copied.

use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;

use bytes::Bytes;
use bytestring::ByteString;

/// Immutable UTF-8 text, cheap to clone: a message's id, name and key.
///
/// It reads as `&str` (through `Deref`, or [`as_str`](Text::as_str)) and compares with `&str`
/// and `String`. Cloning it shares it. A backend may make it a part of the buffer a batch of
/// records came in, as the payload ([`Bytes`]) is: a consumed message then costs no allocation
/// for its id, name and key (Kafka does this). `String::from(text)` or `text.to_string()` makes
/// an owned copy.
///
/// A part of a buffer keeps the whole buffer, as a payload does: text kept long after its
/// message is handled (an id put in a map, say) may be kept as a copy of its own,
/// `Text::from(text.as_str())` or a `String`.
///
/// ```
/// use cqrs_core::{Message, Text};
///
/// let m = Message::new("tickets.Booked", b"{}".to_vec()).with_key(Some("booking-7".into()));
/// assert_eq!(m.name, "tickets.Booked");
/// let key: &str = m.key.as_deref().unwrap_or_default();
/// assert_eq!(key, "booking-7");
/// let name: String = m.name.to_string();
/// assert_eq!(Text::from(name), m.name);
/// ```
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Text(ByteString);

impl Text {
    /// Empty text.
    pub const fn new() -> Self {
        Text(ByteString::new())
    }

    /// Static text, neither copied nor allocated.
    pub const fn from_static(text: &'static str) -> Self {
        Text(ByteString::from_static(text))
    }

    /// The text as `&str`.
    #[inline]
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this is the only reference to its bytes: not a part of a buffer others share,
    /// not static (as [`Bytes::is_unique`]). A backend keeping a message long (for a retry)
    /// copies the parts that are not, so that they do not keep a whole batch's buffer.
    pub fn is_unique(&self) -> bool {
        self.0.as_bytes().is_unique()
    }

    /// The text's bytes, shared.
    pub fn into_bytes(self) -> Bytes {
        self.0.into_bytes()
    }
}

impl Deref for Text {
    type Target = str;

    #[inline]
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Text {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl AsRef<[u8]> for Text {
    fn as_ref(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl Borrow<str> for Text {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self.as_str(), f)
    }
}

impl fmt::Debug for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl From<String> for Text {
    /// Moved, not copied.
    #[inline]
    fn from(text: String) -> Self {
        Text(ByteString::from(text))
    }
}

impl From<&str> for Text {
    /// Copied ([`Text::from_static`] does not copy).
    #[inline]
    fn from(text: &str) -> Self {
        Text(ByteString::from(text))
    }
}

impl From<Box<str>> for Text {
    fn from(text: Box<str>) -> Self {
        Text(ByteString::from(text))
    }
}

impl From<std::borrow::Cow<'_, str>> for Text {
    fn from(text: std::borrow::Cow<'_, str>) -> Self {
        match text {
            std::borrow::Cow::Borrowed(t) => t.into(),
            std::borrow::Cow::Owned(t) => t.into(),
        }
    }
}

impl From<Text> for String {
    fn from(text: Text) -> Self {
        text.as_str().to_owned()
    }
}

impl TryFrom<Bytes> for Text {
    type Error = std::str::Utf8Error;

    /// `bytes` kept as they are (not copied) when they are UTF-8.
    #[inline]
    fn try_from(bytes: Bytes) -> Result<Self, Self::Error> {
        ByteString::try_from(bytes).map(Text)
    }
}

impl PartialEq<str> for Text {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Text {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<String> for Text {
    fn eq(&self, other: &String) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<Text> for str {
    fn eq(&self, other: &Text) -> bool {
        self == other.as_str()
    }
}

impl PartialEq<Text> for &str {
    fn eq(&self, other: &Text) -> bool {
        *self == other.as_str()
    }
}

impl PartialEq<Text> for String {
    fn eq(&self, other: &Text) -> bool {
        self == other.as_str()
    }
}

impl serde::Serialize for Text {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for Text {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Text::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_from_bytes_shares_them_and_refuses_what_is_not_utf8() {
        let buf = Bytes::from_static(b"id-1 rest");
        let text = Text::try_from(buf.slice(0..4)).expect("UTF-8");
        assert_eq!(text, "id-1");
        assert_eq!(text.into_bytes().as_ptr(), buf.as_ptr());
        assert!(Text::try_from(Bytes::from_static(b"\xff")).is_err());
        let (part, other) = (
            Text::try_from(buf.slice(0..2)).expect("UTF-8"),
            buf.slice(2..),
        );
        assert!(!part.is_unique(), "a part of a shared buffer");
        drop(other);
        assert!(Text::from("own").is_unique() && !Text::from_static("static").is_unique());
    }

    #[test]
    fn text_compares_hashes_and_serializes_as_its_str() {
        use std::collections::HashMap;
        let t = Text::from("a.B".to_owned());
        let (s, owned): (&str, String) = ("a.B", "a.B".into());
        assert_eq!(t, s);
        assert_eq!(s, t);
        assert_eq!(t, *s);
        assert_eq!(t, owned);
        assert_eq!(owned, t);
        assert_ne!(t, "a.C");
        assert_eq!(format!("{t} {t:?}"), "a.B \"a.B\"");
        let map: HashMap<Text, u8> = [(t.clone(), 1)].into();
        assert_eq!(map.get("a.B"), Some(&1));
        #[cfg(feature = "json")]
        {
            let json = serde_json::to_string(&t).expect("serializes");
            assert_eq!(json, "\"a.B\"");
            assert_eq!(
                serde_json::from_str::<Text>(&json).expect("deserializes"),
                t
            );
        }
        assert_eq!(Text::from_static("x").as_str(), "x");
        assert_eq!(String::from(Text::from("y")), "y");
    }
}
