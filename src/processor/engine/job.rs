//! One message through its handler: stale and malformed deliveries, unknown events, the
//! handler's span and metrics, a panic caught, and retries after the policy's backoff.
//!
//! A message's first attempt is a future written by hand ([`Handling`]), not an `async fn`:
//! the compiler's future kept room for the job twice, for the context and for the rare paths'
//! values, ~1 KB moved once a message. The rare paths (a malformed message, an unknown event, a
//! retry) are `async fn`s, boxed when taken.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::failure::{after_failure, reject, Failed};
use super::{GroupSpec, Job, Services, Settle};
use crate::backend::Delivery;
use crate::handler::{is_permanent, Call, Context, Runner};
use crate::middleware::{panic_message, HandlerPanicked};
use crate::processor::health;
use crate::processor::options::UnknownEvent;
use crate::telemetry::{self, Consuming, DeadReason};
use crate::BoxError;

/// Runs one job; resolves to how to settle it with the broker (`None`: nothing to settle).
///
/// A failure worth retrying is retried here, after the policy's backoff, holding the job's lane:
/// later messages of its key wait, so order per key survives retries. Cancellation ends the
/// wait and hands the message back to the broker. Nothing runs until the first poll: a panic
/// of the engine's is raised inside the future, where its caller catches it.
pub(super) fn handle_job<'a>(
    spec: &'a GroupSpec,
    services: &'a mut Services,
    job: Job,
    token: &'a CancellationToken,
) -> Handling<'a> {
    Handling {
        spec,
        token,
        services: Some(services),
        job: Some(job),
        run: Run::Start,
    }
}

/// The future of [`handle_job`]. It is polled in place: the job (with its delivery) stays in
/// it until it is settled, and the attempt is made in it.
pub(super) struct Handling<'a> {
    spec: &'a GroupSpec,
    token: &'a CancellationToken,
    /// Lent to the attempt when it starts.
    services: Option<&'a mut Services>,
    /// Taken when it is settled, or when a rare path takes it.
    job: Option<Job>,
    run: Run<'a>,
}

enum Run<'a> {
    /// Not polled yet.
    Start,
    /// Waiting before it starts, while the backend says to (`Acknowledge::must_wait`), until
    /// the tick is over and it is asked again.
    Held(Pin<Box<tokio::time::Sleep>>),
    /// The first attempt.
    Attempt(Attempt<'a>),
    /// A rare path: a malformed message, an unknown event, retries.
    Slow(BoxFuture<'a, Option<Settle>>),
    /// Finished.
    Done,
}

/// A message's attempt at its handler: the handler's runner and instruments, the counts of
/// the message in health and metrics, and the attempt's span, start and call.
struct Attempt<'a> {
    handler: &'a Arc<str>,
    runner: &'a mut Runner,
    meters: &'a telemetry::Instruments,
    attempt: u32,
    span: tracing::Span,
    /// When the running attempt started (`None` before the first).
    started: Option<Instant>,
    call: Call,
    _in_flight: health::InFlight<'a>,
    _metered: telemetry::InFlight,
}

impl Future for Handling<'_> {
    type Output = Option<Settle>;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Option<Settle>> {
        let this = self.get_mut();
        if let Run::Held(tick) = &mut this.run {
            if tick.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            this.run = Run::Start;
        }
        if let Run::Start = this.run {
            if this.held(cx) {
                return Poll::Pending;
            }
            if !this.begin(cx) {
                return Poll::Ready(None);
            }
        }
        if let Run::Attempt(attempt) = &mut this.run {
            let Poll::Ready(result) = attempt.poll_once(this.spec, cx) else {
                return Poll::Pending;
            };
            match result {
                Ok(()) => {
                    this.run = Run::Done;
                    let delivery = this.job.take().and_then(Job::into_delivery);
                    return Poll::Ready(delivery.map(Settle::Ack));
                }
                Err(error) => this.failed(error),
            }
        }
        match &mut this.run {
            Run::Slow(slow) => {
                let polled = slow.as_mut().poll(cx);
                if polled.is_ready() {
                    this.run = Run::Done;
                }
                polled
            }
            // Polled after it finished: nothing more to settle.
            Run::Start | Run::Held(_) | Run::Attempt(_) | Run::Done => Poll::Ready(None),
        }
    }
}

/// How long a job the backend holds ([`Acknowledge::must_wait`](crate::backend::Acknowledge))
/// waits before it is asked again.
pub(super) const HOLD_TICK: Duration = Duration::from_millis(10);

impl<'a> Handling<'a> {
    /// Whether the job waits before its handler starts, as its backend says (Kafka: a broker
    /// connection lost, no commit succeeded since). A stale job does not wait (`begin` drops
    /// it). A group stopping hands a waiting job back to the broker: dropped unsettled, it is
    /// delivered again (`Acknowledge::release`), and `begin` finds nothing to do.
    fn held(&mut self, cx: &mut std::task::Context<'_>) -> bool {
        let Some(job) = &self.job else {
            return false;
        };
        if !job.must_wait() || job.is_stale() {
            return false;
        }
        if self.token.is_cancelled() {
            self.job = None;
            return false;
        }
        let mut tick = Box::pin(tokio::time::sleep(HOLD_TICK));
        if tick.as_mut().poll(cx).is_ready() {
            cx.waker().wake_by_ref();
        }
        self.run = Run::Held(tick);
        true
    }

    /// Everything up to the handler's first poll: the context, the handler's instruments, the
    /// attempt started. A malformed message or an unknown event takes a boxed slow path.
    /// Returns whether the message goes on: `false` when it is done already, with nothing to
    /// settle (a stale delivery).
    fn begin(&mut self, cx: &mut std::task::Context<'_>) -> bool {
        let spec = self.spec;
        let (Some(job), Some(services)) = (&mut self.job, self.services.take()) else {
            return false;
        };
        if job.is_stale() {
            // Its partition went to another member in a rebalance: that member handles it.
            tracing::debug!(group = %spec.group, message_id = %job.message().id, "dropping a delivery whose partition was revoked");
            self.run = Run::Done;
            return false;
        }
        let mut ctx = job.context(services);
        if let Some(reason) = job.malformed().map(str::to_owned) {
            let parts = self.job.take().map(Job::into_parts);
            self.run = Run::Slow(Box::pin(async move {
                let (delivery, _outstanding) = parts?;
                reject(spec, ctx, delivery, &reason, DeadReason::Malformed).await
            }));
            return true;
        }
        let Some((handler, runner, last)) = services.get(&ctx.message.name) else {
            let parts = self.job.take().map(Job::into_parts);
            self.run = Run::Slow(Box::pin(async move {
                let (delivery, _outstanding) = parts?;
                unknown(spec, ctx, delivery).await
            }));
            return true;
        };
        ctx.handler = handler.clone();
        let in_flight = spec.health.enter();
        let meters = spec.meters.of_cached(handler, &ctx.topic, last);
        meters.consumed(1);
        let metered = meters.in_flight(1);
        self.run = Run::Attempt(Attempt {
            handler,
            runner,
            meters,
            // The attempt's number, span and start are set when it starts.
            attempt: 0,
            span: tracing::Span::none(),
            started: None,
            call: Call::Idle,
            _in_flight: in_flight,
            _metered: metered,
        });
        if let Run::Attempt(attempt) = &mut self.run {
            attempt.start(spec, ctx, cx);
        }
        true
    }

    /// The first attempt failed: the rest (a retry, a dead letter) is a boxed slow path, which
    /// takes the attempt and the job.
    fn failed(&mut self, error: BoxError) {
        let (Run::Attempt(attempt), Some(job)) =
            (std::mem::replace(&mut self.run, Run::Done), self.job.take())
        else {
            return;
        };
        self.run = Run::Slow(Box::pin(retry(self.spec, self.token, attempt, job, error)));
    }
}

/// A message whose event no handler of the group takes: dead-lettered or acked, as the
/// group's options say.
async fn unknown(spec: &GroupSpec, ctx: Context, delivery: Option<Delivery>) -> Option<Settle> {
    if spec.options.on_unknown == UnknownEvent::DeadLetter {
        let reason = format!(
            "no handler for event `{}` in group `{}`",
            ctx.message.name, spec.group
        );
        return reject(spec, ctx, delivery, &reason, DeadReason::UnknownEvent).await;
    }
    spec.meters.of("", &ctx.topic).consumed(1);
    tracing::debug!(group = %spec.group, event = %ctx.message.name, "no handler for this event; acked");
    delivery.map(Settle::Ack)
}

impl Attempt<'_> {
    /// Starts an attempt on `ctx`: its span (a root: spans of messages handled one after
    /// another, or side by side on one thread, never nest), the trace it continues, then the
    /// handler, inside the span, a panic caught. The handler takes the context, not a clone of
    /// it (five reference counts up, and down again, a message): a retry or a dead letter
    /// makes it again from the job.
    fn start(&mut self, spec: &GroupSpec, ctx: Context, cx: &mut std::task::Context<'_>) {
        let span = tracing::info_span!(
            parent: None,
            "handle",
            handler = %self.handler,
            group = %spec.group,
            event = %ctx.message.name,
            message_id = %ctx.message.id,
            attempt = ctx.attempt,
            otel.name = %format_args!("process {}", ctx.topic),
            otel.kind = "consumer",
            messaging.system = spec.publisher.system(),
            messaging.destination.name = %ctx.topic,
            messaging.consumer.group.name = %spec.group,
            messaging.message.id = %ctx.message.id,
            messaging.operation.name = "process",
            messaging.operation.type = "process",
            messaging.destination.partition.id = tracing::field::Empty,
            messaging.kafka.offset = tracing::field::Empty,
            error.type = tracing::field::Empty,
        );
        if let Some(position) = ctx.position.filter(|_| !span.is_disabled()) {
            let partition = position.partition.to_string();
            span.record("messaging.destination.partition.id", partition.as_str());
            span.record("messaging.kafka.offset", position.offset);
        }
        #[cfg(feature = "otel")]
        crate::otel::join(
            &span,
            &ctx.message.metadata.headers,
            spec.options.trace_as_child,
        );
        self.attempt = ctx.attempt;
        self.span = span;
        // A span that nothing records is not entered.
        let _entered = (!self.span.is_disabled()).then(|| self.span.enter());
        self.started = Some(Instant::now());
        let runner = &mut *self.runner;
        self.call = match std::panic::catch_unwind(AssertUnwindSafe(|| runner.start(ctx, cx))) {
            Ok(call) => call,
            Err(panic) => Call::Failed(panicked(&*panic)),
        };
    }

    /// Polls the running attempt inside its span, a panic caught; once it finishes, records
    /// its time and outcome.
    fn poll_once(
        &mut self,
        spec: &GroupSpec,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Result<(), BoxError>> {
        let polled = {
            let _entered = (!self.span.is_disabled()).then(|| self.span.enter());
            let (runner, call) = (&mut *self.runner, &mut self.call);
            match std::panic::catch_unwind(AssertUnwindSafe(|| runner.poll_call(call, cx))) {
                Ok(polled) => polled,
                Err(panic) => {
                    self.runner.stop(&mut self.call);
                    Poll::Ready(Err(panicked(&*panic)))
                }
            }
        };
        let Poll::Ready(result) = polled else {
            return Poll::Pending;
        };
        let finished = Instant::now();
        let took = self
            .started
            .map_or(Duration::ZERO, |s| finished.saturating_duration_since(s));
        self.meters.attempt(
            took.as_secs_f64(),
            result.is_ok(),
            matches!(&result, Err(e) if e.is::<HandlerPanicked>()),
        );
        if result.is_ok() {
            spec.health.handled(finished);
        }
        Poll::Ready(result)
    }
}

impl Drop for Attempt<'_> {
    /// An attempt dropped unfinished (the shutdown deadline passed) drops its handler's future,
    /// kept in the runner's box.
    fn drop(&mut self) {
        self.runner.stop(&mut self.call);
    }
}

/// A handler's panic as the attempt's error.
fn panicked(panic: &(dyn std::any::Any + Send)) -> BoxError {
    Box::new(HandlerPanicked(panic_message(panic)))
}

/// After a failed attempt: retried after the policy's backoff or the handler's requested
/// delay, holding the message's lane; or dead-lettered; or, when cancelled while waiting,
/// handed back to the broker.
async fn retry(
    spec: &GroupSpec,
    token: &CancellationToken,
    mut a: Attempt<'_>,
    job: Job,
    mut error: BoxError,
) -> Option<Settle> {
    let mut ctx = job.context_again(&spec.group, a.handler, a.attempt);
    let (mut delivery, _outstanding) = job.into_parts();
    loop {
        a.span.record("error.type", error_type(&error));
        let failed = after_failure(spec, a.handler, &ctx, delivery.take(), &error)
            .instrument(a.span.clone())
            .await;
        let (d, delay) = match failed {
            Failed::Retry(d, delay) => (d, delay),
            Failed::Settled(settle) => return settle,
        };
        tokio::select! {
            biased;
            _ = token.cancelled() => return Some(Settle::Nack(d, Duration::ZERO)),
            _ = tokio::time::sleep(delay) => {}
        }
        if d.is_stale() {
            return None;
        }
        ctx.attempt = a.attempt + 1;
        let mut next = Some(ctx);
        let result = std::future::poll_fn(|cx| {
            if let Some(ctx) = next.take() {
                a.start(spec, ctx, cx);
            }
            a.poll_once(spec, cx)
        })
        .await;
        match result {
            Ok(()) => return Some(Settle::Ack(d)),
            Err(e) => error = e,
        }
        ctx = super::context_again(&d, &spec.group, a.handler, a.attempt);
        delivery = Some(d);
    }
}

/// OpenTelemetry's `error.type` of a failed attempt: `panic`, `permanent` or `error`.
fn error_type(error: &BoxError) -> &'static str {
    if error.is::<HandlerPanicked>() {
        "panic"
    } else if is_permanent(error) {
        "permanent"
    } else {
        "error"
    }
}

/// The metric labels of a message of `topic` taken by `handler` of `spec`'s group.
pub(super) fn consuming<'a>(
    spec: &'a GroupSpec,
    handler: &'a str,
    topic: &'a str,
) -> Consuming<'a> {
    Consuming {
        backend: spec.publisher.system(),
        group: &spec.group,
        handler,
        topic,
    }
}
