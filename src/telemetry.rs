//! Metrics, through the [`metrics`](https://docs.rs/metrics) facade (feature `metrics`).
//!
//! With the feature on, buses and processors record the metrics named in [`names`] to whatever
//! recorder the application installed (a Prometheus exporter, StatsD, ...). A processor
//! registers each handler's instruments with the recorder at the handler's first message on a
//! topic and keeps them, so a message costs no label strings and no lookup: install the recorder
//! before starting processors. Without the feature nothing is recorded and the `metrics` crate
//! is not built.
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
    /// Gauge: messages committed to a transactional outbox and not sent yet, per `schema`
    /// (feature `postgres`, [`crate::postgres::sample_status`]).
    pub const OUTBOX_DEPTH: &str = "cqrs.outbox.depth";
    /// Gauge, seconds: how long the oldest of them has waited (0 when none waits).
    pub const OUTBOX_OLDEST: &str = "cqrs.outbox.oldest";
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
    // Looked up at every message: SipHash cost ~250 instructions a message here.
    use foldhash::HashMap;
    use std::sync::{Arc, OnceLock, PoisonError, RwLock};

    use super::{names, Consuming, DeadReason};

    fn labels(c: &Consuming<'_>) -> [(&'static str, String); 4] {
        [
            ("backend", c.backend.to_owned()),
            ("group", c.group.to_owned()),
            ("handler", c.handler.to_owned()),
            ("topic", c.topic.to_owned()),
        ]
    }

    /// A bus's sent counter on one topic, registered at its first publish there and kept:
    /// built per publish, its key (labels, hash) cost ~320 instructions a message
    /// (`docs/benchmarks.md`). Registered with the recorder installed then: install it before
    /// publishing.
    pub(crate) struct Sent(metrics::Counter);

    impl Sent {
        pub(crate) fn new(backend: &'static str, topic: &str) -> Self {
            Sent(metrics::counter!(names::SENT, "backend" => backend, "topic" => topic.to_owned()))
        }

        pub(crate) fn add(&self, n: usize) {
            self.0.increment(n as u64);
        }
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

    /// One handler's instruments per topic.
    type ByTopic = HashMap<Arc<str>, Arc<Instruments>>;

    /// A group's instruments per handler and topic, registered at the first message of each
    /// and kept: a message then costs no label strings and no lookup in the recorder (which
    /// cost a tenth of a consumer's time, in a dozen allocations a message). Registered with
    /// the recorder installed at that first message: install it before starting processors.
    pub(crate) struct Meters {
        backend: &'static str,
        group: Arc<str>,
        by_handler: RwLock<HashMap<Arc<str>, ByTopic>>,
    }

    impl Meters {
        pub(crate) fn new(backend: &'static str, group: Arc<str>) -> Self {
            Meters {
                backend,
                group,
                by_handler: RwLock::default(),
            }
        }

        /// The instruments of `handler` (empty: no handler took the message) on `topic`.
        pub(crate) fn of(&self, handler: &str, topic: &str) -> Arc<Instruments> {
            let known = self
                .by_handler
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .get(handler)
                .and_then(|topics| topics.get(topic))
                .cloned();
            if let Some(known) = known {
                return known;
            }
            let made = Arc::new(Instruments::new(&Consuming {
                backend: self.backend,
                group: &self.group,
                handler,
                topic,
            }));
            self.by_handler
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(Arc::from(handler))
                .or_default()
                .entry(Arc::from(topic))
                .or_insert(made)
                .clone()
        }

        /// [`Meters::of`] through `last`, a runner's own memory of the topic it last looked up
        /// for one handler: a handler's messages mostly come from one topic, and the shared
        /// map's lock and the `Arc`'s count, touched by every runner at every message, cost
        /// ~200 instructions a message (callgrind).
        pub(crate) fn of_cached<'l>(
            &self,
            handler: &str,
            topic: &Arc<str>,
            last: &'l mut Last,
        ) -> &'l Instruments {
            // The same name is mostly the same `Arc` (the runner's copy, `Services::context`).
            if last
                .0
                .as_ref()
                .is_some_and(|(t, _)| !Arc::ptr_eq(t, topic) && **t != **topic)
            {
                last.0 = None;
            }
            &last
                .0
                .get_or_insert_with(|| (topic.clone(), self.of(handler, topic)))
                .1
        }
    }

    /// What [`Meters::of_cached`] remembers for one handler of one runner.
    #[derive(Default)]
    pub(crate) struct Last(Option<(Arc<str>, Arc<Instruments>)>);

    /// The instruments of one handler on one topic. The error ones are registered at the first
    /// error, so that a handler that never failed shows no error series.
    pub(crate) struct Instruments {
        labels: [(&'static str, String); 4],
        consumed: metrics::Counter,
        ok: metrics::Histogram,
        error: OnceLock<metrics::Histogram>,
        panics: OnceLock<metrics::Counter>,
        in_flight: metrics::Gauge,
    }

    impl Instruments {
        fn new(c: &Consuming<'_>) -> Self {
            let labels = labels(c);
            let ok = metrics::histogram!(names::PROCESS_DURATION, &labels_and(c, "outcome", "ok"));
            Instruments {
                consumed: metrics::counter!(names::CONSUMED, &labels),
                ok,
                error: OnceLock::new(),
                panics: OnceLock::new(),
                in_flight: metrics::gauge!(names::IN_FLIGHT, &labels[..3]),
                labels,
            }
        }

        /// `n` messages taken from the broker.
        pub(crate) fn consumed(&self, n: usize) {
            self.consumed.increment(n as u64);
        }

        /// One handler attempt that took `seconds`.
        pub(crate) fn attempt(&self, seconds: f64, ok: bool, panicked: bool) {
            if ok {
                self.ok.record(seconds);
                return;
            }
            self.error
                .get_or_init(|| {
                    let [a, b, c, d] = self.labels.clone();
                    let l = [a, b, c, d, ("outcome", "error".to_owned())];
                    metrics::histogram!(names::PROCESS_DURATION, &l)
                })
                .record(seconds);
            if panicked {
                self.panics
                    .get_or_init(|| metrics::counter!(names::HANDLER_PANICS, &self.labels))
                    .increment(1);
            }
        }

        /// Counts `n` messages in flight for the guard's life.
        pub(crate) fn in_flight(&self, n: usize) -> InFlight {
            self.in_flight.increment(n as f64);
            InFlight(self.in_flight.clone(), n as f64)
        }
    }

    /// Counts messages in flight for its life.
    pub(crate) struct InFlight(metrics::Gauge, f64);

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

    pub(crate) struct Sent;
    impl Sent {
        pub(crate) fn new(_: &'static str, _: &str) -> Self {
            Sent
        }
        pub(crate) fn add(&self, _: usize) {}
    }
    pub(crate) fn retried(_: &Consuming<'_>) {}
    pub(crate) fn dead_lettered(_: &Consuming<'_>, _: DeadReason) {}
    pub(crate) struct Meters;
    impl Meters {
        pub(crate) fn new(_: &'static str, _: std::sync::Arc<str>) -> Self {
            Meters
        }
        pub(crate) fn of(&self, _: &str, _: &str) -> Instruments {
            Instruments
        }
        pub(crate) fn of_cached<'l>(
            &self,
            _: &str,
            _: &std::sync::Arc<str>,
            _: &'l mut Last,
        ) -> &'l Instruments {
            &Instruments
        }
    }
    #[derive(Default)]
    pub(crate) struct Last(());
    pub(crate) struct Instruments;
    impl Instruments {
        pub(crate) fn consumed(&self, _: usize) {}
        pub(crate) fn attempt(&self, _: f64, _: bool, _: bool) {}
        pub(crate) fn in_flight(&self, _: usize) -> InFlight {
            InFlight
        }
    }
    pub(crate) struct InFlight;
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
