//! Metrics, through the [`metrics`](https://docs.rs/metrics) facade (feature `metrics`).
//!
//! With the feature on, buses and processors record the metrics named in [`names`] to whatever
//! recorder the application installed (a Prometheus exporter, StatsD, ...); with no recorder
//! installed they cost a label lookup each. Without the feature nothing is recorded and the
//! `metrics` crate is not built.
//!
//! Labels: `backend` (`memory`, `redis`, `kafka`, see [`crate::backend::Publisher::system`]),
//! `topic`, and on the consuming side `group` and `handler` (empty when no handler took the
//! message). Names follow the OpenTelemetry messaging conventions where they have one; a
//! Prometheus exporter writes the dots as underscores (`messaging_client_sent_messages`).
//!
//! ```
//! # #[cfg(feature = "metrics")] {
//! use cqrs::telemetry::names;
//! assert_eq!(names::SENT, "messaging.client.sent.messages");
//! # }
//! ```

/// The metric names.
pub mod names {
    /// Counter: messages a bus published (accepted by the broker).
    pub const SENT: &str = "messaging.client.sent.messages";
    /// Counter: messages a processor took from the broker, once per message (not per attempt).
    pub const CONSUMED: &str = "messaging.client.consumed.messages";
    /// Histogram, seconds: one handler attempt; label `outcome` is `ok` or `error`.
    pub const PROCESS_DURATION: &str = "messaging.process.duration";
    /// Counter: failed attempts that will be retried.
    pub const RETRIES: &str = "cqrs.retries";
    /// Counter: messages moved to the dead-letter topic; label `reason` is `permanent`,
    /// `attempts_exhausted`, `at_most_once`, `malformed` or `unknown_event`.
    pub const DEAD_LETTERED: &str = "cqrs.dead_lettered";
    /// Counter: handler attempts that panicked (each is also an `error` attempt).
    pub const HANDLER_PANICS: &str = "cqrs.handler.panics";
    /// Gauge: messages being handled now, per group and handler.
    pub const IN_FLIGHT: &str = "cqrs.in_flight";
    /// Gauge: messages on the topic the group has not been given yet, sampled from the broker
    /// every [`super::SAMPLE_EVERY`] unless the handler's options say otherwise
    /// ([`crate::HandlerOptions::sample_backlog_every`]; absent where the broker cannot tell).
    pub const LAG: &str = "cqrs.consumer.lag";
    /// Gauge: messages given to the group and not acked, sampled from the broker.
    pub const PENDING: &str = "cqrs.consumer.pending";
}

/// How often a running processor samples each group's lag and pending entries, by default.
pub const SAMPLE_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Why a message went to the dead-letter topic, as the `reason` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DeadReason {
    Permanent,
    AttemptsExhausted,
    AtMostOnce,
    Malformed,
    UnknownEvent,
}

#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
impl DeadReason {
    fn label(self) -> &'static str {
        match self {
            DeadReason::Permanent => "permanent",
            DeadReason::AttemptsExhausted => "attempts_exhausted",
            DeadReason::AtMostOnce => "at_most_once",
            DeadReason::Malformed => "malformed",
            DeadReason::UnknownEvent => "unknown_event",
        }
    }
}

/// The labels of a message being consumed.
#[derive(Clone, Copy)]
#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
pub(crate) struct Consuming<'a> {
    pub backend: &'static str,
    pub group: &'a str,
    pub handler: &'a str,
    pub topic: &'a str,
}

#[cfg(feature = "metrics")]
mod imp {
    use super::{names, Consuming, DeadReason};

    fn labels(c: &Consuming<'_>) -> [(&'static str, String); 4] {
        [
            ("backend", c.backend.to_owned()),
            ("group", c.group.to_owned()),
            ("handler", c.handler.to_owned()),
            ("topic", c.topic.to_owned()),
        ]
    }

    pub(crate) fn sent(backend: &'static str, topic: &str, n: usize) {
        metrics::counter!(names::SENT, "backend" => backend, "topic" => topic.to_owned())
            .increment(n as u64);
    }

    pub(crate) fn consumed(c: &Consuming<'_>, n: usize) {
        metrics::counter!(names::CONSUMED, &labels(c)).increment(n as u64);
    }

    /// The labels of `c` and one more.
    fn labels_and(
        c: &Consuming<'_>,
        key: &'static str,
        value: &str,
    ) -> [(&'static str, String); 5] {
        let [backend, group, handler, topic] = labels(c);
        [backend, group, handler, topic, (key, value.to_owned())]
    }

    pub(crate) fn attempt(c: &Consuming<'_>, seconds: f64, ok: bool, panicked: bool) {
        let outcome = if ok { "ok" } else { "error" };
        metrics::histogram!(names::PROCESS_DURATION, &labels_and(c, "outcome", outcome))
            .record(seconds);
        if panicked {
            metrics::counter!(names::HANDLER_PANICS, &labels(c)).increment(1);
        }
    }

    pub(crate) fn retried(c: &Consuming<'_>) {
        metrics::counter!(names::RETRIES, &labels(c)).increment(1);
    }

    pub(crate) fn dead_lettered(c: &Consuming<'_>, reason: DeadReason) {
        metrics::counter!(
            names::DEAD_LETTERED,
            &labels_and(c, "reason", reason.label())
        )
        .increment(1);
    }

    /// Counts `n` messages in flight for the guard's life.
    pub(crate) struct InFlight(metrics::Gauge, f64);

    impl InFlight {
        pub(crate) fn enter(backend: &'static str, group: &str, handler: &str, n: usize) -> Self {
            let g = metrics::gauge!(names::IN_FLIGHT,
                "backend" => backend, "group" => group.to_owned(), "handler" => handler.to_owned());
            g.increment(n as f64);
            InFlight(g, n as f64)
        }
    }

    impl Drop for InFlight {
        fn drop(&mut self) {
            self.0.decrement(self.1);
        }
    }

    pub(crate) fn backlog(
        backend: &'static str,
        group: &str,
        topic: &str,
        pending: u64,
        lag: Option<u64>,
    ) {
        let l = [
            ("backend", backend.to_owned()),
            ("group", group.to_owned()),
            ("topic", topic.to_owned()),
        ];
        metrics::gauge!(names::PENDING, &l).set(pending as f64);
        if let Some(lag) = lag {
            metrics::gauge!(names::LAG, &l).set(lag as f64);
        }
    }
}

#[cfg(not(feature = "metrics"))]
mod imp {
    use super::{Consuming, DeadReason};

    pub(crate) fn sent(_: &'static str, _: &str, _: usize) {}
    pub(crate) fn consumed(_: &Consuming<'_>, _: usize) {}
    pub(crate) fn attempt(_: &Consuming<'_>, _: f64, _: bool, _: bool) {}
    pub(crate) fn retried(_: &Consuming<'_>) {}
    pub(crate) fn dead_lettered(_: &Consuming<'_>, _: DeadReason) {}
    pub(crate) struct InFlight;
    impl InFlight {
        pub(crate) fn enter(_: &'static str, _: &str, _: &str, _: usize) -> Self {
            InFlight
        }
    }
}

pub(crate) use imp::*;

/// Samples the lag and pending entries of `group` on each of `topics` every `every` until
/// `token` is cancelled (only with the feature on).
#[cfg(feature = "metrics")]
pub(crate) async fn sample_backlog(
    subscriber: std::sync::Arc<dyn crate::backend::Subscriber>,
    backend: &'static str,
    group: std::sync::Arc<str>,
    topics: Vec<String>,
    every: std::time::Duration,
    token: tokio_util::sync::CancellationToken,
) {
    loop {
        for topic in &topics {
            match subscriber.groups(topic, &group).await {
                Ok(groups) => {
                    for g in groups.iter().filter(|g| *g.group == *group) {
                        imp::backlog(backend, &group, topic, g.pending, g.lag);
                    }
                }
                Err(e) => {
                    tracing::debug!(group = %group, topic, error = %e, "sampling the backlog failed")
                }
            }
        }
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}
