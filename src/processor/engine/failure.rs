//! What a failed attempt leads to (a retry, a dead letter) and the dead letters themselves.

use std::time::Duration;

use super::job::consuming;
use super::{GroupSpec, Settle};
use crate::backend::Delivery;
use crate::handler::{is_permanent, requested_delay, Context};
use crate::telemetry::{self, DeadReason};
use crate::Message;
use crate::{error_chain, BoxError, Result};

/// What a failed attempt leads to.
pub(super) enum Failed {
    /// Worth another attempt, after this delay.
    Retry(Delivery, Duration),
    /// Done with: dead-lettered (acked, or nacked when the dead letter could not be published),
    /// or acked before handling (at-most-once) so nothing is left to settle.
    Settled(Option<Settle>),
}

/// Decides what a handler's failure leads to: retried after the policy's backoff or the
/// handler's requested delay; dead-lettered when permanent or out of attempts; dead-lettered
/// without retry when the message was acked before handling (at-most-once), so it is never lost
/// silently.
pub(super) async fn after_failure(
    spec: &GroupSpec,
    handler: &str,
    ctx: &Context,
    delivery: Option<Delivery>,
    error: &BoxError,
) -> Failed {
    let attempt = ctx.attempt;
    let reason = error_chain(&**error);
    let labels = consuming(spec, handler, &ctx.topic);
    let Some(d) = delivery else {
        tracing::warn!(error = %reason, "handler failed under at-most-once delivery; dead-lettering");
        let published =
            dead_letter(spec, handler, &ctx.topic, &ctx.message, attempt, &reason).await;
        match published {
            Ok(()) => telemetry::dead_lettered(&labels, DeadReason::AtMostOnce),
            Err(e) => {
                tracing::error!(error = %e.report(), message_id = %ctx.message.id, "dead-letter publish failed; the message is lost (at-most-once)");
            }
        }
        return Failed::Settled(None);
    };
    let permanent = is_permanent(error);
    if permanent || attempt >= spec.options.retry.max_attempts {
        tracing::warn!(error = %reason, attempt, message_id = %ctx.message.id, "dead-lettering the message");
        let why = if permanent {
            DeadReason::Permanent
        } else {
            DeadReason::AttemptsExhausted
        };
        return Failed::Settled(Some(
            match dead_letter_delivery(spec, handler, &d, attempt, &reason).await {
                Ok(()) => {
                    telemetry::dead_lettered(&labels, why);
                    Settle::Ack(d)
                }
                Err(DeadLetterFailed::Refused(e)) => Settle::Fail(d, e.report()),
                // No longer this consumer's: its next owner has it.
                Err(DeadLetterFailed::Stale) => Settle::Nack(d, Duration::ZERO),
            },
        ));
    }
    let delay = requested_delay(error).unwrap_or_else(|| spec.options.retry.delay(attempt));
    tracing::info!(error = %reason, attempt, message_id = %ctx.message.id, "handler failed; retrying in {delay:?}");
    telemetry::retried(&labels);
    Failed::Retry(d, delay)
}

/// Dead-letters a message no handler can take, then acks it; if the dead letter cannot be
/// published, the message stays pending.
pub(super) async fn reject(
    spec: &GroupSpec,
    ctx: Context,
    delivery: Option<Delivery>,
    reason: &str,
    why: DeadReason,
) -> Option<Settle> {
    tracing::warn!(group = %spec.group, message_id = %ctx.message.id, reason, "dead-lettering the message");
    let labels = consuming(spec, "", &ctx.topic);
    spec.meters.of("", &ctx.topic).consumed(1);
    let published = match &delivery {
        Some(d) => dead_letter_delivery(spec, "", d, ctx.attempt, reason).await,
        None => dead_letter(spec, "", &ctx.topic, &ctx.message, ctx.attempt, reason)
            .await
            .map_err(DeadLetterFailed::Refused),
    };
    match published {
        Ok(()) => {}
        Err(DeadLetterFailed::Refused(e)) => {
            tracing::error!(group = %spec.group, error = %e.report(), "dead-letter publish refused for good; the message stays pending and the group stops");
            return delivery.map(|d| Settle::Fail(d, e.report()));
        }
        Err(DeadLetterFailed::Stale) => {
            return delivery.map(|d| Settle::Nack(d, Duration::ZERO));
        }
    }
    telemetry::dead_lettered(&labels, why);
    delivery.map(Settle::Ack)
}

/// Why a dead letter was not published.
enum DeadLetterFailed {
    /// Its delivery is no longer this consumer's.
    Stale,
    /// The broker refused it for good (an error not worth retrying).
    Refused(crate::Error),
}

/// Publishes the dead letter of `d`. A publish that fails is tried again (backoff doubling from
/// 100 ms to 5 s), not the handler, which is done with the message: until it succeeds, `d` is
/// no longer this consumer's (a rebalance gave it to another member), or the broker refuses it
/// for good (then the group stops: publishing it again would loop for ever). Later messages of
/// its key wait meanwhile, so order per key holds.
async fn dead_letter_delivery(
    spec: &GroupSpec,
    handler: &str,
    d: &Delivery,
    attempts: u32,
    reason: &str,
) -> std::result::Result<(), DeadLetterFailed> {
    let mut backoff = Duration::from_millis(100);
    loop {
        let e = match dead_letter(spec, handler, d.topic(), d.message(), attempts, reason).await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if d.is_stale() {
            return Err(DeadLetterFailed::Stale);
        }
        if !e.is_retryable() {
            tracing::error!(group = %spec.group, message_id = %d.message().id, error = %e.report(), "dead-letter publish refused for good; the message stays pending and the group stops");
            return Err(DeadLetterFailed::Refused(e));
        }
        tracing::error!(
            group = %spec.group,
            message_id = %d.message().id,
            error = %e.report(),
            "dead-letter publish failed; publishing it again in {backoff:?}"
        );
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Publishes `message` to the group's dead-letter topic with the reason in its headers.
async fn dead_letter(
    spec: &GroupSpec,
    handler: &str,
    topic: &str,
    message: &Message,
    attempts: u32,
    reason: &str,
) -> Result<()> {
    use crate::dead_letter::headers as h;
    let mut dead = message.clone();
    let headers = &mut dead.metadata.headers;
    headers.insert(
        h::REASON.into(),
        crate::dead_letter::bounded(reason, crate::dead_letter::MAX_REASON).into_owned(),
    );
    headers.insert(h::HANDLER.into(), handler.into());
    headers.insert(h::GROUP.into(), spec.group.to_string());
    headers.insert(h::TOPIC.into(), topic.into());
    headers.insert(h::ATTEMPTS.into(), attempts.to_string());
    headers.insert(h::TIME.into(), crate::now_millis().to_string());
    spec.publisher
        .publish(&spec.dead_letter_topic(), std::slice::from_ref(&dead))
        .await
}
