//! A test kit for a service's handlers (feature `testing`): its real processors, registered by
//! the same code as in production, on an in-memory broker; [`TestKit::run_until_idle`] instead of
//! sleeps; typed assertions on what was published, handled and dead-lettered; faults on demand.
//!
//! ```
//! use cqrs::testing::TestKit;
//! use cqrs::{Event, EventBus, EventProcessor, RetryPolicy};
//! use std::time::Duration;
//!
//! #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, Event)]
//! struct SeatBooked { seat: u32 }
//!
//! #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, Event)]
//! struct ReceiptPrinted { seat: u32 }
//!
//! // What the service registers in production, given any backend.
//! fn register(processor: &mut EventProcessor, bus: EventBus) -> cqrs::Result<()> {
//!     processor
//!         .handle("print-receipt", move |e: SeatBooked| {
//!             let bus = bus.clone();
//!             async move { bus.publish(&ReceiptPrinted { seat: e.seat }).await }
//!         })?
//!         .retry(RetryPolicy::attempts(5).backoff(Duration::from_secs(1), 2.0));
//!     Ok(())
//! }
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> cqrs::Result<()> {
//! // In a `#[tokio::test(start_paused = true)]`: retries' backoffs take no time.
//! let mut kit = TestKit::new();
//! let bus = EventBus::new(kit.broker());
//! let mut processor = EventProcessor::new(kit.broker(), "svc-tickets");
//! register(&mut processor, bus.clone())?;
//! kit.start(processor).await?;
//!
//! kit.fail_next("print-receipt", 2, "printer jammed");
//! bus.publish(&SeatBooked { seat: 7 }).await?;
//! kit.run_until_idle().await;
//!
//! assert_eq!(kit.published::<ReceiptPrinted>(), [ReceiptPrinted { seat: 7 }]);
//! assert_eq!(kit.handled::<SeatBooked>("print-receipt"), [SeatBooked { seat: 7 }]);
//! assert_eq!(kit.calls("print-receipt").len(), 3, "two failures, then the call that worked");
//! assert!(kit.dead_letters().is_empty());
//! # kit.shutdown().await }
//! ```
//!
//! What the kit sees of one-at-a-time handlers it sees through a layer it puts around each
//! handler at [`TestKit::start`] (outermost, so every attempt passes it); batch handlers are seen
//! through the broker only (what they acked, what they dead-lettered).

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use tower::ServiceExt;

use crate::codec::{Codec, DefaultCodec};
use crate::dead_letter::headers as dlq;
use crate::handler::BoxHandlerService;
use crate::memory::MemoryBroker;
use crate::processor::RunningProcessor;
use crate::{
    BoxError, CancellationToken, Command, CommandProcessor, Context, Event, EventBus,
    EventGroupProcessor, EventProcessor, Message, Result,
};

/// A processor the kit can start: [`EventProcessor`], [`CommandProcessor`] and
/// [`EventGroupProcessor`].
pub trait Startable: sealed::Sealed + Send {
    #[doc(hidden)]
    fn start_observed(
        self,
        layer: crate::processor::LayerFn,
        token: CancellationToken,
    ) -> BoxFuture<'static, Result<RunningProcessor>>;
}

mod sealed {
    pub trait Sealed {}
    impl<C> Sealed for crate::EventProcessor<C> {}
    impl<C> Sealed for crate::CommandProcessor<C> {}
    impl<C> Sealed for crate::EventGroupProcessor<C> {}
}

macro_rules! startable {
    ($($t:ident),*) => {$(
        impl<C: Send + Sync + 'static> Startable for $t<C> {
            fn start_observed(
                mut self,
                layer: crate::processor::LayerFn,
                token: CancellationToken,
            ) -> BoxFuture<'static, Result<RunningProcessor>> {
                self.layer_every(layer);
                Box::pin(self.start(token))
            }
        }
    )*};
}
startable!(EventProcessor, CommandProcessor, EventGroupProcessor);

/// One call of a one-at-a-time handler, as the kit saw it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Call {
    /// The consumer group.
    pub group: String,
    /// The handler's name (a command handler's is the command's name).
    pub handler: String,
    /// The message it was given.
    pub message: Message,
    /// Which attempt this was (1 for the first).
    pub attempt: u32,
    /// How it ended: `Err` with the error's report when it failed (a failure the kit made
    /// with [`TestKit::fail_next`] too).
    pub outcome: std::result::Result<(), String>,
}

/// A message a processor dead-lettered, read from its dead-letter topic.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DeadLetter {
    /// The dead-letter topic it is on.
    pub topic: String,
    /// The topic it came from.
    pub from_topic: String,
    /// The consumer group that gave up on it.
    pub group: String,
    /// The handler that gave up on it (empty when no handler took it: it did not decode, or
    /// no handler knows its event).
    pub handler: String,
    /// Why.
    pub reason: String,
    /// How many attempts were made.
    pub attempts: u32,
    /// The message, with the dead-letter headers.
    pub message: Message,
}

/// How a message ended up, for one group ([`TestKit::outcome`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// A handler's call succeeded after `attempts` attempts.
    Handled {
        /// The handler.
        handler: String,
        /// Attempts made, the last one successful.
        attempts: u32,
    },
    /// It was dead-lettered.
    DeadLettered {
        /// The handler (empty when none took it).
        handler: String,
        /// Why.
        reason: String,
        /// Attempts made.
        attempts: u32,
    },
    /// Neither, yet: not handled, or failing and waiting for its next attempt.
    Unsettled,
}

/// How much of tokio's clock [`TestKit::run_until_idle`] lets pass at most (with paused time it
/// passes at once).
const PAUSED_PATIENCE: Duration = Duration::from_secs(3600);

/// Why [`TestKit::try_run_until_idle`] gave up.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum NotIdle {
    /// Work was left after the kit's patience ran out: what each unfinished group held.
    Timeout {
        /// How long the kit waited (of real time, or of tokio's clock when it is paused).
        waited: Duration,
        /// `topic / group: N not delivered, M pending` for each group with work left, and
        /// the jobs still in the processors' hands.
        left: Vec<String>,
    },
    /// A group stopped with an error: it will not finish its work.
    GroupFailed {
        /// The group.
        group: String,
        /// Its error.
        error: String,
    },
}

impl fmt::Display for NotIdle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NotIdle::Timeout { waited, left } => write!(
                f,
                "not idle after {waited:?}; work left: {}",
                left.join("; ")
            ),
            NotIdle::GroupFailed { group, error } => {
                write!(f, "group `{group}` stopped with an error: {error}")
            }
        }
    }
}

impl std::error::Error for NotIdle {}

/// What the handlers' layer records and the failures it is told to make.
#[derive(Default)]
struct Probe {
    faults: Mutex<HashMap<String, VecDeque<String>>>,
    calls: Mutex<Vec<Call>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Probe {
    fn take_fault(&self, handler: &str) -> Option<String> {
        lock(&self.faults).get_mut(handler)?.pop_front()
    }

    fn record(&self, ctx: &Context, outcome: &std::result::Result<(), BoxError>) {
        lock(&self.calls).push(Call {
            group: ctx.group().to_owned(),
            handler: ctx.handler().to_owned(),
            message: ctx.message().clone(),
            attempt: ctx.attempt(),
            outcome: outcome.as_ref().map(|_| ()).map_err(|e| report(&**e)),
        });
    }

    /// The layer put around every handler: makes the failures asked for, records every call.
    fn layer(self: &Arc<Self>) -> crate::processor::LayerFn {
        let probe = self.clone();
        Arc::new(move |inner: BoxHandlerService| {
            let probe = probe.clone();
            BoxHandlerService::new(tower::service_fn(move |ctx: Context| {
                let (probe, inner) = (probe.clone(), inner.clone());
                async move {
                    let outcome = match probe.take_fault(ctx.handler()) {
                        Some(error) => Err(BoxError::from(error)),
                        None => {
                            // A panic is the engine's to report as it always does; caught here
                            // only to be recorded, and handed on as the engine's own error.
                            match std::panic::AssertUnwindSafe(inner.oneshot(ctx.clone()))
                                .catch_unwind()
                                .await
                            {
                                Ok(outcome) => outcome,
                                Err(panic) => Err(Box::new(crate::middleware::HandlerPanicked(
                                    crate::middleware::panic_message(&*panic),
                                )) as BoxError),
                            }
                        }
                    };
                    probe.record(&ctx, &outcome);
                    outcome
                }
            }))
        })
    }
}

/// An error and its sources, `: `-separated.
fn report(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// The test kit: an in-memory broker, the processors started on it, and what they did. See the
/// [module docs](self).
pub struct TestKit {
    broker: MemoryBroker,
    token: CancellationToken,
    running: Vec<RunningProcessor>,
    probe: Arc<Probe>,
    patience: Duration,
    /// More work the kit waits for (an outbox's rows not sent yet), by name.
    also: Vec<(String, IdleCheck)>,
}

/// A condition [`TestKit::run_until_idle`] also waits for; see [`TestKit::idle_when`].
type IdleCheck = Arc<dyn Fn() -> BoxFuture<'static, bool> + Send + Sync>;

impl Default for TestKit {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for TestKit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestKit")
            .field("broker", &self.broker)
            .field("processors", &self.running.len())
            .finish_non_exhaustive()
    }
}

impl TestKit {
    /// A kit with a fresh in-memory broker that keeps every message (none trimmed), so that
    /// everything published stays visible to the assertions.
    pub fn new() -> Self {
        TestKit {
            broker: MemoryBroker::with_retention(usize::MAX),
            token: CancellationToken::new(),
            running: Vec::new(),
            probe: Arc::default(),
            patience: Duration::from_secs(30),
            also: Vec::new(),
        }
    }

    /// Makes [`TestKit::run_until_idle`] also wait until `check` holds: work the kit does not
    /// see, such as an outbox whose relay has rows to send (`what` names it in a timeout's
    /// message).
    ///
    // The example needs the outbox (feature `postgres`): without it, it is not compiled.
    #[cfg_attr(feature = "postgres", doc = "```no_run")]
    #[cfg_attr(not(feature = "postgres"), doc = "```ignore")]
    /// # async fn f(kit: &mut cqrs::testing::TestKit, pool: cqrs::postgres::sqlx::PgPool, store: cqrs::postgres::OutboxStore) {
    /// kit.idle_when("the outbox is sent", move || {
    ///     let (pool, store) = (pool.clone(), store.clone());
    ///     Box::pin(async move { store.status(&pool).await.is_ok_and(|s| s.depth == 0) })
    /// });
    /// # }
    /// ```
    pub fn idle_when<F>(&mut self, what: &str, check: F)
    where
        F: Fn() -> BoxFuture<'static, bool> + Send + Sync + 'static,
    {
        self.also.push((what.to_owned(), Arc::new(check)));
    }

    /// The broker: give it to the buses and processors the code under test builds.
    pub fn broker(&self) -> MemoryBroker {
        self.broker.clone()
    }

    /// How long [`TestKit::run_until_idle`] waits for the work to finish: 30 s by default, of
    /// real time. With tokio's time paused (`#[tokio::test(start_paused = true)]`, tokio's
    /// `test-util` feature), retries' backoffs and `retry_after` delays pass at once, and the kit
    /// gives up after an hour of tokio's clock, which also passes at once.
    pub fn patience(mut self, patience: Duration) -> Self {
        self.patience = patience;
        self
    }

    /// Starts `processor` on the kit (its groups subscribe now), with the kit's layer around
    /// each of its handlers. Stopped by [`TestKit::shutdown`] (or when the kit is dropped).
    pub async fn start(&mut self, processor: impl Startable) -> Result<()> {
        let running = processor
            .start_observed(self.probe.layer(), self.token.clone())
            .await?;
        self.running.push(running);
        Ok(())
    }

    /// Lets the processors work until nothing is left: every group of every topic has been
    /// delivered every message and has settled it (handled, dead-lettered), no message waits
    /// for a retry, no handler runs. Panics, showing what was left, when that takes longer
    /// than the kit's patience or a group stops with an error; see
    /// [`TestKit::try_run_until_idle`].
    pub async fn run_until_idle(&self) {
        if let Err(e) = self.try_run_until_idle().await {
            panic!("{e}");
        }
    }

    /// [`TestKit::run_until_idle`], returning why it could not instead of panicking.
    pub async fn try_run_until_idle(&self) -> std::result::Result<(), NotIdle> {
        let (wall, clock) = (std::time::Instant::now(), tokio::time::Instant::now());
        // Looks again after a pause that doubles while nothing happens: up to 100 ms on a
        // running clock; with paused time (tokio's clock ahead of the wall's), up to a minute
        // of it, which passes at once when nothing else is due.
        let mut step = Duration::from_millis(1);
        let mut last = self.jobs();
        loop {
            self.check_groups()?;
            // Jobs made before the broker is read and after, the same and none alive: no
            // handler ran meanwhile, so the broker's picture holds (a handler publishes before
            // its message is acked, an at-most-once message is a job before it is acked).
            // The other conditions first: what they wait for (an outbox's rows) becomes
            // messages the broker's picture then shows.
            let mut waiting = Vec::new();
            for (what, check) in &self.also {
                if !check().await {
                    waiting.push(what.clone());
                }
            }
            let before = self.jobs();
            let unfinished = self.broker.unfinished();
            let after = self.jobs();
            if waiting.is_empty() && unfinished.is_empty() && before == after && after.1 == 0 {
                return Ok(());
            }
            let paused = clock.elapsed() > wall.elapsed() + Duration::from_secs(1);
            if wall.elapsed() >= self.patience || clock.elapsed() >= PAUSED_PATIENCE {
                let mut left: Vec<String> = unfinished
                    .iter()
                    .map(|(topic, g)| {
                        format!(
                            "{topic} / {}: {} not delivered, {} pending",
                            g.group,
                            g.lag.unwrap_or(0),
                            g.pending
                        )
                    })
                    .collect();
                if after.1 > 0 {
                    left.push(format!("{} messages in the handlers' hands", after.1));
                }
                left.extend(waiting.into_iter().map(|w| format!("not yet: {w}")));
                return Err(NotIdle::Timeout {
                    waited: if paused {
                        clock.elapsed()
                    } else {
                        wall.elapsed()
                    },
                    left,
                });
            }
            if after != last {
                last = after;
                step = Duration::from_millis(1);
            }
            tokio::time::sleep(step).await;
            let most = if paused {
                Duration::from_secs(60)
            } else {
                Duration::from_millis(100)
            };
            step = (step * 2).min(most);
        }
    }

    fn jobs(&self) -> (u64, usize) {
        self.running.iter().fold((0, 0), |(made, alive), r| {
            let (m, a) = r.jobs();
            (made + m, alive + a)
        })
    }

    fn check_groups(&self) -> std::result::Result<(), NotIdle> {
        for running in &self.running {
            for status in running.status() {
                if status.state == crate::GroupState::Failed {
                    return Err(NotIdle::GroupFailed {
                        group: status.group,
                        error: status.last_error.unwrap_or_default(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Every message on every topic with its topic, oldest first per topic, dead letters (those
    /// with a dead-letter reason) only or left out.
    fn messages_where(&self, dead: bool) -> Vec<(String, Message)> {
        self.broker
            .topics()
            .into_iter()
            .flat_map(|topic| {
                self.broker
                    .messages(&topic)
                    .into_iter()
                    .map(move |m| (topic.clone(), m))
            })
            .filter(|(_, m)| m.metadata.headers.contains_key(dlq::REASON) == dead)
            .collect()
    }

    /// The events of type `E` published (by the test, by handlers, by an outbox's relay), on
    /// any topic, in publish order per topic: those of `E`'s name and version (an older or
    /// newer version of the event is its own type's). Panics, naming the message, on one that
    /// does not decode.
    pub fn published<E: Event>(&self) -> Vec<E>
    where
        DefaultCodec: Codec<E>,
    {
        self.of_type(E::NAME, E::VERSION)
    }

    /// The commands of type `C` sent (of its name and version), in send order per topic.
    pub fn sent<C: Command>(&self) -> Vec<C>
    where
        DefaultCodec: Codec<C>,
    {
        self.of_type(C::NAME, C::VERSION)
    }

    /// The messages named `name` at `version` on any topic (dead letters left out), decoded.
    fn of_type<T>(&self, name: &str, version: u32) -> Vec<T>
    where
        DefaultCodec: Codec<T>,
    {
        self.messages_where(false)
            .into_iter()
            .filter(|(_, m)| m.name == name && m.version == version)
            .map(|(topic, m)| decode::<T>(&topic, &m))
            .collect()
    }

    /// Every call of `handler` the kit saw (each attempt), in order; a message that does not
    /// decode counts as a failed call (the decode error), though the handler's code did not
    /// run. Panics, listing the handlers it saw, when it saw none of `handler`.
    pub fn calls(&self, handler: &str) -> Vec<Call> {
        let calls = lock(&self.probe.calls);
        let mine: Vec<Call> = calls
            .iter()
            .filter(|c| c.handler == handler)
            .cloned()
            .collect();
        if mine.is_empty() {
            let mut seen: Vec<&str> = calls.iter().map(|c| c.handler.as_str()).collect();
            seen.sort_unstable();
            seen.dedup();
            panic!("no call of handler `{handler}` was seen; handlers called: {seen:?}");
        }
        mine
    }

    /// The events `handler` handled (its calls that succeeded), in order, as it got them (an
    /// older version upcast). Panics like [`TestKit::calls`].
    pub fn handled<E: Event>(&self, handler: &str) -> Vec<E>
    where
        DefaultCodec: Codec<E>,
    {
        self.handled_as(handler, &crate::versions::Versions::event())
    }

    /// The commands `handler` (a command handler: the command's name) handled, as it got them.
    pub fn handled_commands<C: Command>(&self, handler: &str) -> Vec<C>
    where
        DefaultCodec: Codec<C>,
    {
        self.handled_as(handler, &crate::versions::Versions::command())
    }

    fn handled_as<T>(&self, handler: &str, versions: &crate::versions::Versions<T>) -> Vec<T>
    where
        DefaultCodec: Codec<T>,
    {
        self.calls(handler)
            .into_iter()
            .filter(|c| c.outcome.is_ok())
            .map(|c| {
                crate::handler::read_message(&DefaultCodec::default(), versions, &c.message)
                    .unwrap_or_else(|e| {
                        panic!(
                            "handler `{handler}` handled message {} ({} v{}), which does not \
                             read as the type asked for: {e}",
                            c.message.id, c.message.name, c.message.version
                        )
                    })
            })
            .collect()
    }

    /// Every dead letter on any topic, oldest first per dead-letter topic.
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        self.messages_where(true)
            .into_iter()
            .map(|(topic, m)| {
                let h = |k: &str| m.metadata.headers.get(k).cloned().unwrap_or_default();
                DeadLetter {
                    topic,
                    from_topic: h(dlq::TOPIC),
                    group: h(dlq::GROUP),
                    handler: h(dlq::HANDLER),
                    reason: h(dlq::REASON),
                    attempts: h(dlq::ATTEMPTS).parse().unwrap_or(0),
                    message: m,
                }
            })
            .collect()
    }

    /// The dead letter of `handler` whose reason contains `reason`. Panics, listing the dead
    /// letters there are, when there is none.
    pub fn dead_letter(&self, handler: &str, reason: &str) -> DeadLetter {
        let all = self.dead_letters();
        match all
            .iter()
            .find(|d| d.handler == handler && d.reason.contains(reason))
        {
            Some(d) => d.clone(),
            None => {
                let seen: Vec<String> = all
                    .iter()
                    .map(|d| {
                        format!(
                            "{} (handler `{}`, {} attempts): {}",
                            d.message.name, d.handler, d.attempts, d.reason
                        )
                    })
                    .collect();
                panic!(
                    "no dead letter of handler `{handler}` with a reason containing {reason:?}; \
                     dead letters: {seen:?}"
                )
            }
        }
    }

    /// How the message `message_id` ended up in `group`: handled (by which handler, after how
    /// many attempts), dead-lettered (why) or neither yet.
    pub fn outcome(&self, group: &str, message_id: &str) -> Outcome {
        if let Some(d) = self
            .dead_letters()
            .into_iter()
            .find(|d| d.group == group && d.message.id == message_id)
        {
            return Outcome::DeadLettered {
                handler: d.handler,
                reason: d.reason,
                attempts: d.attempts,
            };
        }
        let calls = lock(&self.probe.calls);
        match calls
            .iter()
            .find(|c| c.group == group && c.message.id == message_id && c.outcome.is_ok())
        {
            Some(c) => Outcome::Handled {
                handler: c.handler.clone(),
                attempts: c.attempt,
            },
            None => Outcome::Unsettled,
        }
    }

    /// Makes the next `times` calls of `handler` fail with `error` (before the handler runs),
    /// as if it had returned it: they are retried, and dead-lettered, as its retry policy says.
    pub fn fail_next(&self, handler: &str, times: usize, error: impl Into<String>) {
        let error = error.into();
        lock(&self.probe.faults)
            .entry(handler.to_owned())
            .or_default()
            .extend(std::iter::repeat_n(error, times));
    }

    /// Publishes `event` through `bus` twice as one message (the same id), as a broker
    /// delivers a message again after a lost ack: what an idempotent handler must absorb.
    /// Returns the message id.
    pub async fn publish_twice<E: Event, C: Codec<E>>(
        &self,
        bus: &EventBus<C>,
        event: &E,
    ) -> Result<String> {
        use crate::backend::Publisher;
        let (topic, message) = bus.encode(event, crate::Metadata::now())?;
        let id = message.id.to_string();
        self.broker
            .publish(&topic, &[message.clone(), message])
            .await?;
        Ok(id)
    }

    /// Publishes, on the topic `bus` sends `E` to, a message named and versioned as `E` whose
    /// payload does not decode: its handlers' groups dead-letter it at once. Returns the
    /// message id.
    pub async fn publish_undecodable<E: Event, C>(&self, bus: &EventBus<C>) -> Result<String> {
        use crate::backend::Publisher;
        let mut message = Message::new(E::NAME, b"\xff not a payload".to_vec());
        message.version = E::VERSION;
        message.metadata.content_type = "application/json".into();
        let id = message.id.to_string();
        self.broker
            .publish(&bus.topic_of::<E>(), &[message])
            .await?;
        Ok(id)
    }

    /// Stops the processors (their handlers finish first) and returns the first group error.
    pub async fn shutdown(mut self) -> Result<()> {
        self.token.cancel();
        let mut first = Ok(());
        for running in self.running.drain(..) {
            let r = running.wait().await;
            if first.is_ok() {
                first = r;
            }
        }
        first
    }
}

impl Drop for TestKit {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

fn decode<T>(topic: &str, m: &Message) -> T
where
    DefaultCodec: Codec<T>,
{
    match DefaultCodec::default().decode(&m.payload) {
        Ok(v) => v,
        Err(e) => panic!(
            "message {} ({} on {topic}) does not decode: {e}; payload: {}",
            m.id,
            m.name,
            String::from_utf8_lossy(&m.payload)
        ),
    }
}
