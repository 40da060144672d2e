//! Refusals: the brokers rejecting this client's credentials (authentication, TLS) or its
//! principal's access (ACLs). librdkafka reports them as global errors and keeps trying; the
//! backend turns them into permanent errors that say what was refused, at once.

use std::sync::{Arc, Mutex};

use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;

use crate::error::Error;
use crate::lock;

/// A refusal librdkafka reported: its code and librdkafka's reason (which names the broker and
/// the mechanism, never a credential).
#[derive(Clone, Debug)]
pub(crate) struct Refusal {
    pub(crate) code: RDKafkaErrorCode,
    pub(crate) reason: String,
}

/// The error code of `e`, an admin operation's too (which `rdkafka_error_code` leaves out).
pub(crate) fn code(e: &KafkaError) -> Option<RDKafkaErrorCode> {
    match e {
        KafkaError::AdminOp(code) => Some(*code),
        e => e.rdkafka_error_code(),
    }
}

/// Whether `code` says the brokers refuse this client's credentials.
pub(crate) fn is_authentication(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::Authentication
            | RDKafkaErrorCode::SaslAuthenticationFailed
            | RDKafkaErrorCode::UnsupportedSASLMechanism
            | RDKafkaErrorCode::IllegalSASLState
            | RDKafkaErrorCode::SSL
    )
}

/// Whether `code` says the broker's ACLs refuse this principal something.
pub(crate) fn is_authorization(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::GroupAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed
            | RDKafkaErrorCode::TransactionalIdAuthorizationFailed
            | RDKafkaErrorCode::DelegationTokenAuthorizationFailed
    )
}

/// The last refusal a client reported, shared between its context and the code waiting on it.
#[derive(Clone, Default)]
pub(crate) struct Refusals(Arc<Mutex<Option<Refusal>>>);

impl Refusals {
    /// What a client context's `error` does: logs the error, and keeps it if it is a refusal.
    pub(crate) fn record(&self, error: &KafkaError, reason: &str) {
        tracing::error!(error = %error, reason, "librdkafka error");
        if let Some(code) = error.rdkafka_error_code() {
            if is_authentication(code) || is_authorization(code) {
                *lock(&self.0) = Some(Refusal {
                    code,
                    reason: reason.to_owned(),
                });
            }
        }
    }

    /// The last refusal, if any.
    pub(crate) fn last(&self) -> Option<Refusal> {
        lock(&self.0).clone()
    }
}

impl Refusal {
    /// The error to return for it: what was refused, from whom, and librdkafka's reason.
    /// `group` and `topics` are what the refused client works on.
    pub(crate) fn into_error(self, brokers: &str, group: Option<&str>, topics: &[String]) -> Error {
        if is_authentication(self.code) {
            return Error::Authentication {
                brokers: brokers.to_owned(),
                reason: self.reason,
            };
        }
        let what = match (self.code, group) {
            (RDKafkaErrorCode::GroupAuthorizationFailed, Some(g)) => format!("reading group `{g}`"),
            (RDKafkaErrorCode::TopicAuthorizationFailed, _) if !topics.is_empty() => {
                format!("using topics {topics:?}")
            }
            (RDKafkaErrorCode::ClusterAuthorizationFailed, _) => "using the cluster".to_owned(),
            _ => "the operation".to_owned(),
        };
        Error::NotAuthorized {
            what,
            source: KafkaError::Global(self.code),
        }
    }
}

/// The context of the backend's producer and admin client: librdkafka's global errors logged,
/// refusals kept for [`crate::KafkaBackend::connect`].
#[derive(Clone, Default)]
pub(crate) struct Watched {
    pub(crate) refusals: Refusals,
}

impl ClientContext for Watched {
    fn error(&self, error: KafkaError, reason: &str) {
        self.refusals.record(&error, reason);
    }
}
