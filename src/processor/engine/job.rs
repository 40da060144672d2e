//! One message through its handler: stale and malformed deliveries, unknown events, the
//! handler's span and metrics, a panic caught, and retries after the policy's backoff.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use tokio_util::sync::CancellationToken;
use tower::{Service, ServiceExt};
use tracing::Instrument;

use super::failure::{after_failure, reject, Failed};
use super::{GroupSpec, Job, Services, Settle};
use crate::handler::{is_permanent, Runner};
use crate::middleware::{panic_message, HandlerPanicked};
use crate::processor::options::UnknownEvent;
use crate::telemetry::{Consuming, DeadReason};
use crate::BoxError;

/// Runs a handler's future, turning a panic into an error (a combinator, not an `async fn`,
/// which held `run` twice).
fn caught(
    run: impl Future<Output = Result<(), BoxError>>,
) -> impl Future<Output = Result<(), BoxError>> {
    AssertUnwindSafe(run)
        .catch_unwind()
        .map(|caught| match caught {
            Ok(result) => result,
            Err(panic) => Err(Box::new(HandlerPanicked(panic_message(&*panic))) as BoxError),
        })
}

/// Runs one job; returns how to settle it with the broker (`None`: nothing to settle).
///
/// A failure worth retrying is retried here, after the policy's backoff, holding the job's lane:
/// later messages of its key wait, so order per key survives retries. Cancellation ends the
/// wait and hands the message back to the broker.
pub(super) async fn handle_job(
    spec: &GroupSpec,
    services: &mut Services,
    job: Job,
    token: &CancellationToken,
) -> Option<Settle> {
    if job.is_stale() {
        // Its partition went to another member in a rebalance: that member handles it.
        tracing::debug!(group = %spec.group, message_id = %job.message().id, "dropping a delivery whose partition was revoked");
        return None;
    }
    let (mut ctx, malformed, mut delivery, _outstanding) = job.start(services);
    // The rare paths' futures are boxed: held inline, they made this function's future (moved
    // once a message) ~2 KB, most of it never used.
    if let Some(reason) = malformed {
        return Box::pin(reject(spec, ctx, delivery, &reason, DeadReason::Malformed)).await;
    }
    let Some((handler, pipeline, last)) = services.get(&ctx.message.name) else {
        if spec.options.on_unknown == UnknownEvent::DeadLetter {
            let reason = format!(
                "no handler for event `{}` in group `{}`",
                ctx.message.name, spec.group
            );
            return Box::pin(reject(
                spec,
                ctx,
                delivery,
                &reason,
                DeadReason::UnknownEvent,
            ))
            .await;
        }
        spec.meters.of("", &ctx.topic).consumed(1);
        tracing::debug!(group = %spec.group, event = %ctx.message.name, "no handler for this event; acked");
        return delivery.map(Settle::Ack);
    };
    ctx.handler = handler.clone();
    let _in_flight = spec.health.enter();
    let topic = ctx.topic.clone();
    let meters = spec.meters.of_cached(handler, &topic, last);
    meters.consumed(1);
    let _metered = meters.in_flight(1);
    loop {
        // Each message's span is a root: spans of messages handled one after another (or side
        // by side on one thread) never nest.
        let span = tracing::info_span!(
            parent: None,
            "handle",
            handler = %handler,
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
        // The handler takes the context, not a clone of it (five reference counts up, and down
        // again, a message). A retry or a dead letter makes it again from the delivery; only a
        // message acked before handling (no delivery) keeps a copy.
        let attempt = ctx.attempt;
        let kept = delivery.is_none().then(|| Box::new(ctx.clone()));
        let run = async {
            match &mut *pipeline {
                Runner::Direct(run) => run.start(ctx)?.await,
                Runner::Tower(service) => {
                    service.ready().await?;
                    service.call(ctx).await
                }
            }
        };
        let started = Instant::now();
        let result = crate::in_span(span.clone(), caught(run)).await;
        let finished = Instant::now();
        meters.attempt(
            finished.saturating_duration_since(started).as_secs_f64(),
            result.is_ok(),
            matches!(&result, Err(e) if e.is::<HandlerPanicked>()),
        );
        let Err(error) = result else {
            spec.health.handled(finished);
            return delivery.map(Settle::Ack);
        };
        span.record("error.type", error_type(&error));
        let remade = kept.map(|kept| *kept).or_else(|| {
            delivery.as_ref().map(|d| {
                let topic = d.topic_arc().clone();
                let mut made = super::context(d, topic, spec.group.clone(), handler.clone());
                made.attempt = attempt;
                made
            })
        });
        // One of the two is always there: a delivery, or the copy kept without one.
        ctx = remade?;
        let (d, delay) = match Box::pin(
            after_failure(spec, handler, &ctx, delivery.take(), &error).instrument(span),
        )
        .await
        {
            Failed::Retry(d, delay) => (d, delay),
            Failed::Settled(settle) => return settle,
        };
        tokio::select! {
            biased;
            _ = token.cancelled() => return Some(Settle::Nack(d, Duration::ZERO)),
            _ = Box::pin(tokio::time::sleep(delay)) => {}
        }
        if d.is_stale() {
            return None;
        }
        ctx.attempt = attempt + 1;
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
