//! Per-handler options: delivery semantics, concurrency, retries, dead letters, middleware.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tower::{Layer, Service};

use crate::backend::{Backend, Publisher, StartFrom, Subscriber};
use crate::handler::{BoxHandlerService, Context};
use crate::BoxError;

/// When a message is acked relative to running its handler.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeliveryMode {
    /// Ack after the handler succeeded; a failure is retried, then dead-lettered. The default.
    #[default]
    AtLeastOnce,
    /// Ack before the handler runs; a failure is not retried, only dead-lettered and logged.
    AtMostOnce,
}

/// What a processor does with a message whose event name has no handler in its group.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum UnknownEvent {
    /// Ack it and move on (several event types share the topic). The default.
    #[default]
    Ack,
    /// Publish it to the dead-letter topic, then ack it.
    DeadLetter,
}

/// Whether a consumer group that fails (a fatal broker error, a consumer that gives up) is
/// started again instead of stopping the processor: up to `max_restarts` times, after a backoff
/// that starts at `backoff` and doubles up to `max_backoff`. Its siblings keep running
/// meanwhile, and [`crate::RunningProcessor::status`] shows it `Restarting` with the error and
/// the restarts so far. Messages it had not acked are delivered again (at-least-once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct RestartPolicy {
    /// Restarts before the group's failure stops the processor.
    pub max_restarts: u32,
    /// The wait before the first restart.
    pub backoff: Duration,
    /// The longest wait.
    pub max_backoff: Duration,
}

impl RestartPolicy {
    /// Up to `max_restarts` restarts, waiting 100 ms, then twice as long each time, up to 30 s.
    pub fn up_to(max_restarts: u32) -> Self {
        RestartPolicy {
            max_restarts,
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
        }
    }

    /// Sets the first wait and the longest.
    pub fn backoff(mut self, first: Duration, max: Duration) -> Self {
        self.backoff = first;
        self.max_backoff = max.max(first);
        self
    }

    /// The wait before restart number `n` (from 1).
    pub fn delay(&self, n: u32) -> Duration {
        let factor = 2u32.saturating_pow(n.saturating_sub(1));
        self.backoff.saturating_mul(factor).min(self.max_backoff)
    }
}

/// Retries with exponential backoff, then the dead-letter topic.
///
/// A failed message is retried where it is, after `initial * multiplier^(n-1)` (at most
/// `max_delay`) for attempt `n`, or with jitter (the default) a random delay up to that, while
/// the message stays unacked with the broker. A handler can ask for its own delay with
/// [`crate::retry_after`]. Later messages of its key wait meanwhile (messages of other keys go
/// on), so order per key survives retries. When attempt `max_attempts` fails, it is published to
/// the dead-letter topic and acked.
///
/// Attempts start from the broker's delivery count (Redis and the in-memory broker count
/// deliveries; Kafka does not), so a message redelivered after a crash or a claim goes on
/// counting from its deliveries, not from the retries made in the process that died: those are
/// kept in memory only. A shutdown during the wait hands the message back to the broker.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct RetryPolicy {
    /// Deliveries before the message is dead-lettered (at least 1).
    pub max_attempts: u32,
    /// Delay before the second delivery.
    pub initial: Duration,
    /// Growth of the delay per attempt.
    pub multiplier: f64,
    /// Longest delay.
    pub max_delay: Duration,
    /// Whether each delay is drawn at random between zero and the computed one ("full
    /// jitter"), so that handlers failing on one dependency do not retry in lockstep. On by
    /// default.
    pub jitter: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            initial: Duration::from_millis(100),
            multiplier: 2.0,
            max_delay: Duration::from_secs(30),
            jitter: true,
        }
    }
}

impl RetryPolicy {
    /// `max_attempts` deliveries with the default backoff.
    pub fn attempts(max_attempts: u32) -> Self {
        RetryPolicy {
            max_attempts: max_attempts.max(1),
            ..RetryPolicy::default()
        }
    }

    /// Sets the backoff: first delay and growth factor.
    pub fn backoff(mut self, initial: Duration, multiplier: f64) -> Self {
        self.initial = initial;
        self.multiplier = multiplier.max(1.0);
        self
    }

    /// Sets the longest delay.
    pub fn max_delay(mut self, max_delay: Duration) -> Self {
        self.max_delay = max_delay;
        self
    }

    /// Turns jitter on or off.
    pub fn jitter(mut self, on: bool) -> Self {
        self.jitter = on;
        self
    }

    /// The longest delay before retrying a message that failed on attempt `attempt` (1-based):
    /// `initial * multiplier^(attempt-1)`, at most `max_delay`.
    ///
    /// Never panics: a product past `max_delay` (or past what a `Duration` holds: `initial *
    /// 10^21` at attempt 22 of a factor of 10; attempts count the broker's deliveries too) is
    /// `max_delay`, and so is one that is not a number (a multiplier set to NaN or infinity).
    pub fn backoff_cap(&self, attempt: u32) -> Duration {
        let factor = self
            .multiplier
            .powi(attempt.saturating_sub(1).min(64) as i32);
        let secs = self.initial.as_secs_f64() * factor;
        if secs.is_nan() || secs >= self.max_delay.as_secs_f64() {
            return self.max_delay;
        }
        Duration::try_from_secs_f64(secs).map_or(self.max_delay, |d| d.min(self.max_delay))
    }

    /// The delay before retrying a message that failed on attempt `attempt` (1-based): the
    /// [`RetryPolicy::backoff_cap`], or with jitter a random share of it.
    pub fn delay(&self, attempt: u32) -> Duration {
        let cap = self.backoff_cap(attempt);
        if self.jitter {
            cap.mul_f64(unit_random())
        } else {
            cap
        }
    }
}

/// A number in `[0, 1)`, from a per-thread splitmix64 generator seeded by the clock; enough to
/// spread retries, not for anything secret.
fn unit_random() -> f64 {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0x2545_F491_4F6C_DD1D, |d| d.as_nanos() as u64),
        );
    }
    STATE.with(|state| {
        let next = state.get().wrapping_add(0x9E37_79B9_7F4A_7C15);
        state.set(next);
        let mut z = next;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_and_jitter_draws_below_it() {
        let policy = RetryPolicy::attempts(10)
            .backoff(Duration::from_millis(100), 2.0)
            .max_delay(Duration::from_secs(1));
        let caps: Vec<u64> = (1..=6)
            .map(|a| policy.backoff_cap(a).as_millis() as u64)
            .collect();
        assert_eq!(caps, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(policy.jitter(false).delay(3), Duration::from_millis(400));
        let drawn: Vec<Duration> = (0..200).map(|_| policy.delay(3)).collect();
        assert!(drawn.iter().all(|d| *d < Duration::from_millis(400)));
        let distinct: std::collections::BTreeSet<Duration> = drawn.iter().copied().collect();
        assert!(distinct.len() > 150, "jitter spreads the delays");
        let mean = drawn.iter().sum::<Duration>() / 200;
        assert!(
            mean > Duration::from_millis(120) && mean < Duration::from_millis(280),
            "full jitter averages half the cap: {mean:?}"
        );
    }

    #[test]
    fn a_backoff_past_what_a_duration_holds_is_the_max_delay_not_a_panic() {
        // 100 ms * 10^21 at attempt 22: more seconds than a Duration holds.
        let policy = RetryPolicy::attempts(30).backoff(Duration::from_millis(100), 10.0);
        let max = policy.max_delay;
        for attempt in [21, 22, 30, 64, 65, u32::MAX] {
            assert_eq!(policy.backoff_cap(attempt), max, "attempt {attempt}");
            assert!(policy.delay(attempt) <= max);
        }
        // Fields set directly to what no builder gives.
        for multiplier in [f64::INFINITY, f64::NAN, 1e308] {
            let mut odd = policy;
            odd.multiplier = multiplier;
            assert_eq!(odd.backoff_cap(5), max, "multiplier {multiplier}");
        }
        let mut huge = policy;
        huge.initial = Duration::MAX;
        huge.max_delay = Duration::MAX;
        assert_eq!(huge.backoff_cap(3), Duration::MAX);
    }
}

pub(crate) type LayerFn = Arc<dyn Fn(BoxHandlerService) -> BoxHandlerService + Send + Sync>;

/// Options of one handler (of one consumer group).
///
/// Processors return it from `handle`, so options chain after registration:
/// `processor.handle("audit", audit)?.at_most_once().concurrency(8);`.
#[derive(Clone)]
pub struct HandlerOptions {
    pub(crate) delivery: DeliveryMode,
    pub(crate) concurrency: usize,
    pub(crate) batch_size: usize,
    pub(crate) retry: RetryPolicy,
    pub(crate) start: StartFrom,
    pub(crate) claim_idle: Option<Duration>,
    pub(crate) dead_letter_topic: Option<String>,
    pub(crate) shutdown_timeout: Duration,
    pub(crate) consumer_name: Option<String>,
    pub(crate) on_unknown: UnknownEvent,
    pub(crate) trace_as_child: bool,
    pub(crate) restart: Option<RestartPolicy>,
    pub(crate) sample_backlog: Option<Duration>,
    pub(crate) layers: Vec<LayerFn>,
    pub(crate) backend: Option<(Arc<dyn Publisher>, Arc<dyn Subscriber>)>,
}

impl Default for HandlerOptions {
    fn default() -> Self {
        HandlerOptions {
            delivery: DeliveryMode::AtLeastOnce,
            concurrency: 1,
            batch_size: 100,
            retry: RetryPolicy::default(),
            start: StartFrom::Beginning,
            claim_idle: Some(crate::backend::DEFAULT_CLAIM_IDLE),
            dead_letter_topic: None,
            shutdown_timeout: Duration::from_secs(30),
            consumer_name: None,
            on_unknown: UnknownEvent::Ack,
            trace_as_child: false,
            restart: None,
            sample_backlog: Some(crate::telemetry::SAMPLE_EVERY),
            layers: Vec::new(),
            backend: None,
        }
    }
}

impl fmt::Debug for HandlerOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerOptions")
            .field("delivery", &self.delivery)
            .field("concurrency", &self.concurrency)
            .field("batch_size", &self.batch_size)
            .field("retry", &self.retry)
            .field("start", &self.start)
            .field("claim_idle", &self.claim_idle)
            .field("dead_letter_topic", &self.dead_letter_topic)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("consumer_name", &self.consumer_name)
            .field("on_unknown", &self.on_unknown)
            .field("trace_as_child", &self.trace_as_child)
            .field("restart", &self.restart)
            .field("sample_backlog", &self.sample_backlog)
            .field("layers", &self.layers.len())
            .field("own_backend", &self.backend.is_some())
            .finish()
    }
}

impl HandlerOptions {
    /// Ack after the handler succeeds (the default).
    pub fn at_least_once(&mut self) -> &mut Self {
        self.delivery = DeliveryMode::AtLeastOnce;
        self
    }

    /// Ack before the handler runs.
    pub fn at_most_once(&mut self) -> &mut Self {
        self.delivery = DeliveryMode::AtMostOnce;
        self
    }

    /// Sets the delivery mode.
    pub fn delivery(&mut self, mode: DeliveryMode) -> &mut Self {
        self.delivery = mode;
        self
    }

    /// Messages handled at once (default 1). Messages with one key (else, on Kafka, of one
    /// partition) are handled in order, one at a time; a slow or retrying message holds back only
    /// the later messages of its key. A handler that awaits I/O wants more than 1: a member
    /// handles about `n / handler time` messages per second.
    ///
    /// For a batch handler ([`EventProcessor::handle_batch`](crate::EventProcessor::handle_batch)):
    /// `n` batches' worth (`n x batch_size`) is fetched at once and split by key (else
    /// partition) into `n` parts handled at once, each in batches of at most `batch_size`; a
    /// key's events stay in one part, in order, and the next fetch waits for all of them, so
    /// order per key holds as with 1.
    pub fn concurrency(&mut self, n: usize) -> &mut Self {
        self.concurrency = n.max(1);
        self
    }

    /// Messages fetched per broker round trip (default 100).
    pub fn batch_size(&mut self, n: usize) -> &mut Self {
        self.batch_size = n.max(1);
        self
    }

    /// Sets the retry and dead-letter policy.
    pub fn retry(&mut self, policy: RetryPolicy) -> &mut Self {
        self.retry = policy;
        self
    }

    /// Where the group starts when it is created (default: the beginning).
    pub fn start_from(&mut self, start: StartFrom) -> &mut Self {
        self.start = start;
        self
    }

    /// Claim messages other members held this long without acking (default 30 s; `None` never).
    pub fn claim_idle(&mut self, idle: Option<Duration>) -> &mut Self {
        self.claim_idle = idle;
        self
    }

    /// The dead-letter topic (default: `<group>.dead-letter`).
    pub fn dead_letter_topic(&mut self, topic: impl Into<String>) -> &mut Self {
        self.dead_letter_topic = Some(topic.into());
        self
    }

    /// How long shutdown waits for running handlers (default 30 s).
    pub fn shutdown_timeout(&mut self, timeout: Duration) -> &mut Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// This instance's member name in the group (default: unique per processor). Keep it stable
    /// across restarts to resume pending messages at once instead of having them claimed.
    pub fn consumer_name(&mut self, name: impl Into<String>) -> &mut Self {
        self.consumer_name = Some(name.into());
        self
    }

    /// With the `otel` feature, makes each message's `process` span a child of the publisher's
    /// `send` span (one trace from request to handler) instead of a root span linked to it (the
    /// default, as OpenTelemetry's messaging conventions advise). Batch handlers always link.
    pub fn trace_as_child(&mut self) -> &mut Self {
        self.trace_as_child = true;
        self
    }

    /// With the `metrics` feature, how often the group's lag and pending entries are read from
    /// the broker for the `cqrs.consumer.lag` and `cqrs.consumer.pending` gauges (default
    /// [`crate::telemetry::SAMPLE_EVERY`], 5 s; `None`: never). Each sample asks the broker
    /// about every topic of the group: on Kafka it lists the groups (ListGroups, metadata and
    /// watermarks, through one client the backend keeps for that) and fetches this one's offsets
    /// (OffsetFetch, through a client per group the backend keeps between samples).
    pub fn sample_backlog_every(&mut self, every: Option<Duration>) -> &mut Self {
        self.sample_backlog = every;
        self
    }

    /// Starts the group again when it fails, per `policy`, instead of stopping the processor
    /// (the default: a failed group stops its siblings and [`crate::RunningProcessor::wait`]
    /// returns the error).
    pub fn restart_on_failure(&mut self, policy: RestartPolicy) -> &mut Self {
        self.restart = Some(policy);
        self
    }

    /// What to do with event names that have no handler in the group (default: ack).
    pub fn on_unknown(&mut self, policy: UnknownEvent) -> &mut Self {
        self.on_unknown = policy;
        self
    }

    /// Wraps the handler in a tower layer; the last one added is the outermost.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use cqrs::{middleware::TimeoutLayer, processor::HandlerOptions};
    /// HandlerOptions::default().layer(TimeoutLayer::new(Duration::from_secs(5)));
    /// ```
    pub fn layer<L>(&mut self, layer: L) -> &mut Self
    where
        L: Layer<BoxHandlerService> + Send + Sync + 'static,
        L::Service: Service<Context, Response = ()> + Clone + Send + Sync + 'static,
        <L::Service as Service<Context>>::Error: Into<BoxError>,
        <L::Service as Service<Context>>::Future: Send + 'static,
    {
        self.layers.push(Arc::new(move |inner| {
            BoxHandlerService::new(tower::util::MapErr::new(layer.layer(inner), Into::into))
        }));
        self
    }

    /// Runs this handler on another backend (another cluster or Redis server) than the
    /// processor's; its dead letters go there too.
    pub fn backend(&mut self, backend: impl Backend) -> &mut Self {
        let backend = Arc::new(backend);
        self.backend = Some((backend.clone(), backend));
        self
    }
}
