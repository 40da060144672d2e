//! The error type of `cqrs-redis`.

/// `Result` with [`Error`] as its default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong setting up or talking to Redis.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A stream name was registered twice.
    #[error("stream with name {stream} already exists in pool `{existing_pool}` (registering it in pool `{pool}`)")]
    DuplicateStream {
        /// The stream.
        stream: String,
        /// The pool that has it.
        existing_pool: String,
        /// The pool it was registered in again.
        pool: String,
    },
    /// A pool name was registered twice.
    #[error("pool `{0}` is already registered")]
    DuplicatePool(String),
    /// A stream was registered in a pool that does not exist.
    #[error("no pool named `{pool}` (for stream {stream})")]
    UnknownPool {
        /// The pool named.
        pool: String,
        /// The stream being registered.
        stream: String,
    },
    /// A stream has no pool and there is no default pool.
    #[error("stream {0} is in no pool and there is no pool named `default`")]
    NoPool(String),
    /// One subscription names streams of different pools.
    #[error("one consumer cannot read streams of two pools: {0}")]
    StreamsInTwoPools(String),
    /// A Redis address that does not parse. The address is shown without its password.
    #[error("invalid Redis address `{address}`: {reason}")]
    InvalidAddress {
        /// The address, redacted.
        address: String,
        /// Why it is invalid.
        reason: String,
    },
    /// A pool whose servers are not given right (in YAML: neither or both of `redis` and
    /// `cluster`; a cluster without seed nodes).
    #[error("pool `{pool}`: {reason}")]
    InvalidPool {
        /// The pool.
        pool: String,
        /// What is wrong.
        reason: String,
    },
    /// A stream name that cannot be used.
    #[error("invalid stream name: {0}")]
    InvalidStream(String),
    /// The YAML topology does not parse; the message has the line and column.
    #[error("invalid topology YAML: {0}")]
    Yaml(#[from] serde_yaml::Error),
    /// The topology file could not be read.
    #[error("cannot read topology file `{path}`")]
    Io {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A Redis command failed.
    #[error("redis {context} failed")]
    Redis {
        /// What was being done.
        context: String,
        /// The client's error.
        #[source]
        source: redis::RedisError,
    },
}

impl Error {
    pub(crate) fn redis(context: impl Into<String>, source: redis::RedisError) -> Self {
        Error::Redis {
            context: context.into(),
            source,
        }
    }

    /// The server's error code (`NOGROUP`, `BUSYGROUP`, ...), if the server answered with one.
    pub fn redis_code(&self) -> Option<&str> {
        match self {
            Error::Redis { source, .. } => source.code(),
            _ => None,
        }
    }

    /// Whether trying again may succeed (a dropped connection, a timeout, a server loading, a
    /// cluster slot moving).
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Redis { source, .. } => is_transient(source),
            _ => false,
        }
    }
}

/// Whether `e` says the server is gone or unreachable (not that it refused the command).
pub(crate) fn is_gone(e: &redis::RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout()
}

pub(crate) fn is_transient(e: &redis::RedisError) -> bool {
    is_gone(e)
        || matches!(
            e.code(),
            // A cluster's redirections: its slots moving (a reshard, a failover).
            Some("LOADING" | "TRYAGAIN" | "BUSY" | "MASTERDOWN" | "CLUSTERDOWN" | "MOVED" | "ASK")
        )
}

impl From<Error> for cqrs_core::Error {
    fn from(e: Error) -> Self {
        match e {
            e @ (Error::DuplicateStream { .. }
            | Error::DuplicatePool(_)
            | Error::UnknownPool { .. }
            | Error::NoPool(_)
            | Error::StreamsInTwoPools(_)
            | Error::InvalidAddress { .. }
            | Error::InvalidPool { .. }
            | Error::InvalidStream(_)
            | Error::Yaml(_)
            | Error::Io { .. }) => cqrs_core::Error::Config(e.to_string()),
            Error::Redis { context, source } => {
                let context = format!("redis {context} failed");
                if is_transient(&source) {
                    cqrs_core::Error::retryable(context, source)
                } else {
                    cqrs_core::Error::fatal(context, source)
                }
            }
        }
    }
}
