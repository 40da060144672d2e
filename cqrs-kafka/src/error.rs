//! The error type of `cqrs-kafka`.

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// `Result` with [`Error`] as its default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong setting up or talking to Kafka.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A topic does not exist and topic creation is off.
    #[error("topic `{0}` does not exist and topic creation is off")]
    MissingTopic(String),
    /// The brokers could not be reached in time.
    #[error("cannot reach the Kafka brokers at {brokers}")]
    Unreachable {
        /// The bootstrap servers.
        brokers: String,
        /// The client's error.
        #[source]
        source: KafkaError,
    },
    /// The brokers refuse this client's credentials: a wrong password or user, a mechanism they
    /// do not offer, a certificate one side does not trust, a TLS failure. Not retried: the
    /// settings must change. The reason is librdkafka's; it never holds a credential.
    #[error("authenticating with the Kafka brokers at {brokers} failed: {reason}")]
    Authentication {
        /// The bootstrap servers.
        brokers: String,
        /// librdkafka's reason.
        reason: String,
    },
    /// The broker's ACLs do not let this client's principal do something (write to a topic,
    /// read a group, create a topic). Not retried: the ACLs must change; nothing was consumed
    /// or committed by the refused operation.
    #[error("{what}: not authorized (the broker's ACLs refuse this principal)")]
    NotAuthorized {
        /// What was refused (`producing to t`, `reading group `g``), naming the topic or group.
        what: String,
        /// The client's error.
        #[source]
        source: KafkaError,
    },
    /// A setting asks for something this backend does not do.
    #[error("not supported: {0}")]
    Unsupported(String),
    /// A system call failed (starting the poll thread).
    #[error("{0} failed")]
    Io(&'static str, #[source] std::io::Error),
    /// Another redrive or purge of the dead-letter topic is running (its lock group has other
    /// members): a second would publish the same letters again.
    #[error("another redrive or purge of {topic} is running ({members} members in {group}); a second one would publish the same letters again")]
    Busy {
        /// The dead-letter topic.
        topic: String,
        /// The lock group ([`crate::dead_letters::run_lock_group`]).
        group: String,
        /// Its members, this run's included.
        members: usize,
    },
    /// The record of what was redriven or purged from a dead-letter topic (the offsets of its
    /// bookkeeping group) cannot be read or written.
    #[error("dead-letter bookkeeping of group {group}, partition {partition}: {why}")]
    Bookkeeping {
        /// The bookkeeping group.
        group: String,
        /// The partition.
        partition: i32,
        /// What is wrong.
        why: String,
    },
    /// The group's coordinator refuses this member's commits: it hands out no more work until
    /// one succeeds ([`crate::KafkaConfig::max_unrecorded`]). Retryable: commits are asked for
    /// again.
    #[error(
        "the group refuses this member's offset commits ({reason}); {unrecorded} handled \
         messages are not recorded, and no new work is taken until a commit succeeds"
    )]
    CommitsRefused {
        /// Handled messages not covered by a successful commit.
        unrecorded: u64,
        /// The broker's answer to the last commit.
        reason: String,
    },
    /// A setting the backend's guarantees rest on was given through [`crate::KafkaConfig::set`].
    #[error(
        "the setting `{0}` cannot be changed: the backend sets it (consumer groups are named by \
         the processor; offsets are stored and committed only for handled messages)"
    )]
    Reserved(String),
    /// A Kafka operation failed.
    #[error("kafka {context} failed")]
    Kafka {
        /// What was being done.
        context: String,
        /// The client's error.
        #[source]
        source: KafkaError,
    },
}

impl Error {
    /// `source` while doing `context`; an ACL refusal becomes [`Error::NotAuthorized`] to do
    /// `context`.
    pub(crate) fn kafka(context: impl Into<String>, source: KafkaError) -> Self {
        match crate::access::code(&source) {
            Some(code) if crate::access::is_authorization(code) => Error::NotAuthorized {
                what: context.into(),
                source,
            },
            _ => Error::Kafka {
                context: context.into(),
                source,
            },
        }
    }

    /// Whether trying again may succeed (a broker down, a timeout, a rebalance).
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::MissingTopic(_)
            | Error::Unsupported(_)
            | Error::Io(..)
            | Error::Bookkeeping { .. }
            | Error::Busy { .. }
            | Error::Reserved(_)
            | Error::Authentication { .. }
            | Error::NotAuthorized { .. } => false,
            Error::CommitsRefused { .. } => true,
            Error::Unreachable { .. } => true,
            Error::Kafka { source, .. } => is_transient(source),
        }
    }
}

pub(crate) fn is_transient(e: &KafkaError) -> bool {
    match e.rdkafka_error_code() {
        Some(code) => matches!(
            code,
            RDKafkaErrorCode::BrokerTransportFailure
                | RDKafkaErrorCode::AllBrokersDown
                | RDKafkaErrorCode::OperationTimedOut
                | RDKafkaErrorCode::RequestTimedOut
                | RDKafkaErrorCode::MessageTimedOut
                | RDKafkaErrorCode::QueueFull
                | RDKafkaErrorCode::NetworkException
                | RDKafkaErrorCode::LeaderNotAvailable
                | RDKafkaErrorCode::NotLeaderForPartition
                | RDKafkaErrorCode::NotCoordinator
                | RDKafkaErrorCode::CoordinatorNotAvailable
                | RDKafkaErrorCode::CoordinatorLoadInProgress
                | RDKafkaErrorCode::RebalanceInProgress
                | RDKafkaErrorCode::UnknownTopicOrPartition
                | RDKafkaErrorCode::Resolve
                | RDKafkaErrorCode::TimedOutQueue
                | RDKafkaErrorCode::UnknownMemberId
                | RDKafkaErrorCode::IllegalGeneration
                | RDKafkaErrorCode::PollExceeded
        ),
        None => matches!(e, KafkaError::Canceled),
    }
}

impl From<Error> for cqrs_core::Error {
    fn from(e: Error) -> Self {
        match e {
            e @ (Error::MissingTopic(_)
            | Error::Unsupported(_)
            | Error::Reserved(_)
            | Error::Bookkeeping { .. }) => cqrs_core::Error::Config(e.to_string()),
            e => {
                let retryable = e.is_retryable();
                let context = e.to_string();
                let source: cqrs_core::BoxError = match e {
                    Error::Kafka { source, .. }
                    | Error::Unreachable { source, .. }
                    | Error::NotAuthorized { source, .. } => Box::new(source),
                    other => Box::new(other),
                };
                if retryable {
                    cqrs_core::Error::retryable(context, source)
                } else {
                    cqrs_core::Error::fatal(context, source)
                }
            }
        }
    }
}
