//! Codecs turn typed values into payload bytes and back.
//!
//! [`Json`] is the default. [`MsgPack`] is behind the `msgpack` feature. Implement [`Codec`] for your
//! own format (protobuf, Avro, ...): a codec is per type, so it need not use serde.

#[cfg(feature = "json")]
use std::cell::Cell;

use crate::error::CodecError;

/// Encodes and decodes values of `T`.
///
/// ```
/// use cqrs_core::codec::Codec;
/// use cqrs_core::CodecError;
///
/// /// Carries UTF-8 strings as they are.
/// #[derive(Clone, Default)]
/// struct Text;
///
/// impl Codec<String> for Text {
///     fn content_type(&self) -> &'static str { "text/plain" }
///     fn encode(&self, value: &String) -> Result<Vec<u8>, CodecError> { Ok(value.clone().into_bytes()) }
///     fn decode(&self, bytes: &[u8]) -> Result<String, CodecError> {
///         String::from_utf8(bytes.to_vec()).map_err(CodecError::new)
///     }
/// }
/// assert_eq!(Text.decode(b"hi").unwrap(), "hi");
/// ```
pub trait Codec<T>: Send + Sync + 'static {
    /// The content type written in the metadata, e.g. `application/json`.
    fn content_type(&self) -> &'static str;
    /// Encodes `value`.
    fn encode(&self, value: &T) -> Result<Vec<u8>, CodecError>;
    /// Decodes a payload.
    fn decode(&self, bytes: &[u8]) -> Result<T, CodecError>;
}

#[cfg(feature = "json")]
thread_local! {
    static JSON_SIZE_HINT: Cell<usize> = const { Cell::new(128) };
}

/// JSON through `serde_json`; content type `application/json`.
#[cfg(feature = "json")]
#[derive(Debug, Clone, Copy, Default)]
pub struct Json;

#[cfg(feature = "json")]
impl<T: serde::Serialize + serde::de::DeserializeOwned> Codec<T> for Json {
    fn content_type(&self) -> &'static str {
        "application/json"
    }
    fn encode(&self, value: &T) -> Result<Vec<u8>, CodecError> {
        // Start at the size of the last payload this thread encoded: one allocation instead of
        // growing from 128 bytes for every event.
        let mut out = Vec::with_capacity(JSON_SIZE_HINT.with(Cell::get));
        serde_json::to_writer(&mut out, value).map_err(CodecError::new)?;
        JSON_SIZE_HINT.with(|hint| hint.set(out.len().clamp(64, 16 * 1024)));
        Ok(out)
    }
    fn decode(&self, bytes: &[u8]) -> Result<T, CodecError> {
        serde_json::from_slice(bytes).map_err(CodecError::new)
    }
}

/// MessagePack through `rmp-serde`, structs as maps; content type `application/msgpack`.
#[cfg(feature = "msgpack")]
#[derive(Debug, Clone, Copy, Default)]
pub struct MsgPack;

#[cfg(feature = "msgpack")]
impl<T: serde::Serialize + serde::de::DeserializeOwned> Codec<T> for MsgPack {
    fn content_type(&self) -> &'static str {
        "application/msgpack"
    }
    fn encode(&self, value: &T) -> Result<Vec<u8>, CodecError> {
        rmp_serde::to_vec_named(value).map_err(CodecError::new)
    }
    fn decode(&self, bytes: &[u8]) -> Result<T, CodecError> {
        rmp_serde::from_slice(bytes).map_err(CodecError::new)
    }
}

/// The codec buses and processors use unless told otherwise: [`Json`] with the `json` feature.
#[cfg(feature = "json")]
pub type DefaultCodec = Json;

/// The codec buses and processors use unless told otherwise. Without the `json` feature there is
/// none: every use fails with an error asking for one.
#[cfg(not(feature = "json"))]
pub type DefaultCodec = NoCodec;

/// Stands in when no default codec is compiled in; every call fails with a clear error.
#[cfg(not(feature = "json"))]
#[derive(Debug, Clone, Copy, Default)]
pub struct NoCodec;

#[cfg(not(feature = "json"))]
impl<T> Codec<T> for NoCodec {
    fn content_type(&self) -> &'static str {
        "none"
    }
    fn encode(&self, _: &T) -> Result<Vec<u8>, CodecError> {
        Err(CodecError::new(
            "no codec: enable the `json` feature or pass a codec with `with_codec`",
        ))
    }
    fn decode(&self, _: &[u8]) -> Result<T, CodecError> {
        Err(CodecError::new(
            "no codec: enable the `json` feature or pass a codec with `with_codec`",
        ))
    }
}
