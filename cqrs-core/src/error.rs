//! The error type of `cqrs-core`.

use std::time::Duration;

/// A boxed error, as handlers, codecs and backends return them.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `Result` with [`Error`] as its default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong in a bus, a processor or a backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A value could not be encoded with the codec.
    #[error("failed to encode `{name}` with the {codec} codec")]
    Encode {
        /// The event or command name.
        name: String,
        /// The codec's content type.
        codec: String,
        /// Why the codec failed.
        #[source]
        source: CodecError,
    },
    /// A payload could not be decoded into the event or command type.
    #[error("failed to decode `{name}` with the {codec} codec")]
    Decode {
        /// The event or command name.
        name: String,
        /// The codec's content type.
        codec: String,
        /// Why the codec failed.
        #[source]
        source: CodecError,
    },
    /// A message of a version newer than the handler's type knows (a producer deployed before
    /// its consumers); it is dead-lettered.
    #[error("unknown version {version} of {name} (handler knows up to {known})")]
    UnknownVersion {
        /// The event or command name.
        name: String,
        /// The message's version.
        version: u32,
        /// The handler type's version.
        known: u32,
    },
    /// A message of an older version with no upcast to the handler's (see `Event::upcast`);
    /// it is dead-lettered.
    #[error("no upcast from version {version} of {name} to version {known}")]
    NoUpcast {
        /// The event or command name.
        name: String,
        /// The message's version.
        version: u32,
        /// The handler type's version.
        known: u32,
    },
    /// Two handlers were registered under one name (or two for one command).
    #[error("a handler named `{0}` is already registered")]
    DuplicateHandler(String),
    /// A configuration or topology value is not valid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A broker operation failed.
    #[error("{context}")]
    Backend {
        /// What was being done.
        context: String,
        /// Whether trying again may succeed (a dropped connection, a timeout).
        retryable: bool,
        /// The backend's error.
        #[source]
        source: BoxError,
    },
    /// The consumer or publisher was closed.
    #[error("the consumer or publisher is closed")]
    Closed,
    /// Graceful shutdown did not finish within its deadline.
    #[error("shutdown did not finish within {0:?}; unfinished messages stay pending")]
    ShutdownTimeout(Duration),
    /// Several consumer groups of one processor failed: each group with its error.
    #[error("{} consumer groups failed: {}", .0.len(), groups_text(.0))]
    Groups(Vec<(String, Error)>),
}

fn groups_text(groups: &[(String, Error)]) -> String {
    groups
        .iter()
        .map(|(g, e)| format!("`{g}`: {}", e.report()))
        .collect::<Vec<_>>()
        .join("; ")
}

impl Error {
    /// A backend error that may succeed when tried again.
    pub fn retryable(context: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Error::Backend {
            context: context.into(),
            retryable: true,
            source: source.into(),
        }
    }

    /// A backend error that will fail again.
    pub fn fatal(context: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Error::Backend {
            context: context.into(),
            retryable: false,
            source: source.into(),
        }
    }

    /// The error with its causes, `error: cause: cause`, for logs.
    pub fn report(&self) -> String {
        error_chain(self)
    }

    /// Whether trying the same operation again may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::Backend {
                retryable: true,
                ..
            }
        )
    }
}

/// A codec failed to encode or decode a value.
///
/// It displays as the codec library's own error.
#[derive(Debug)]
pub struct CodecError(BoxError);

impl CodecError {
    /// A codec error wrapping the codec library's error.
    pub fn new(source: impl Into<BoxError>) -> Self {
        CodecError(source.into())
    }
}

impl std::fmt::Display for CodecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for CodecError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// An error with its causes, `error: cause: cause`, each source once (for logs and dead-letter
/// reasons).
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.ends_with(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}
