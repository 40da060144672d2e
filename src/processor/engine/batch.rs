//! Batch handlers: the events of a fetched batch go to the handler in one call; the failed ones
//! are retried together.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::failure::{after_failure, Failed};
use super::job::handle_job;
use super::settle::{ack_until_stopped, nack, stop_on_failure};
use super::{BatchRoute, GroupSpec, Job, Services, Settle};
use crate::backend::Delivery;
use crate::handler::Context;
use crate::middleware::HandlerPanicked;
use crate::telemetry;
use crate::Result;

/// A batch handler's fetch (up to n batches' worth for `concurrency(n)`; one by default) split by
/// key (or shard) into `services.len()` parts handled at once, each in batches of at most
/// `batch_size`, one after another. A key's events stay in one part, in the order fetched, and
/// the next fetch waits until all parts are done, so order per key holds as with one. Events
/// with neither key nor shard are spread over the parts. The first error is returned once every
/// part has settled.
pub(super) async fn handle_batches(
    spec: &GroupSpec,
    route: &BatchRoute,
    services: &mut [Services],
    jobs: Vec<Job>,
    token: &CancellationToken,
) -> Result<()> {
    let n = services.len().max(1);
    let mut parts: Vec<Vec<Job>> = (0..n).map(|_| Vec::new()).collect();
    let mut spread = 0;
    for job in jobs {
        let i = match super::lanes::order_of(&job) {
            Some(order) => (order % n as u64) as usize,
            None => {
                spread = (spread + 1) % n;
                spread
            }
        };
        parts[i].push(job);
    }
    let size = spec.options.batch_size.max(1);
    let running = services
        .iter_mut()
        .zip(parts)
        .filter(|(_, part)| !part.is_empty())
        .map(|(services, part)| async move {
            let mut part = part.into_iter();
            loop {
                let batch: Vec<Job> = part.by_ref().take(size).collect();
                if batch.is_empty() {
                    return Ok(());
                }
                handle_batch(spec, route, services, batch, token).await?;
            }
        });
    futures_util::future::join_all(running)
        .await
        .into_iter()
        .collect::<Result<Vec<()>>>()
        .map(|_| ())
}

/// Before a batch's first call: while its backend says its handlers should wait
/// (`Acknowledge::must_wait`; Kafka: a broker connection lost, no commit succeeded since), the
/// batch waits, asking again every [`super::job::HOLD_TICK`], until it does not or the group
/// stops; then the deliveries gone stale meanwhile (their partitions lost: their next owner
/// handles them) are dropped, not handled.
async fn wait_while_held(todo: &mut Vec<(Context, Option<Delivery>)>, token: &CancellationToken) {
    let held = |todo: &Vec<(Context, Option<Delivery>)>| {
        todo.iter()
            .any(|(_, d)| d.as_ref().is_some_and(|d| d.must_wait() && !d.is_stale()))
    };
    if !held(todo) {
        return;
    }
    loop {
        tokio::select! {
            biased;
            _ = token.cancelled() => break,
            _ = tokio::time::sleep(super::job::HOLD_TICK) => {}
        }
        if !held(todo) {
            break;
        }
    }
    todo.retain(|(_, d)| !d.as_ref().is_some_and(Delivery::is_stale));
}

/// Runs a batch handler on one fetched batch: its events go to the handler in one call; the
/// failed ones are retried together after the longest of their backoffs (as a smaller batch)
/// until they succeed or are dead-lettered. Other messages (malformed, other events, stale)
/// settle as with a one-at-a-time handler.
pub(super) async fn handle_batch(
    spec: &GroupSpec,
    route: &BatchRoute,
    services: &mut Services,
    jobs: Vec<Job>,
    token: &CancellationToken,
) -> Result<()> {
    let mut acks = Vec::with_capacity(jobs.len());
    let mut todo: Vec<(Context, Option<Delivery>)> = Vec::with_capacity(jobs.len());
    // The jobs count as unfinished until the batch is done with them.
    let mut outstanding = Vec::with_capacity(jobs.len());
    // The batch's messages nearly always share a topic: its instruments are looked up once.
    let mut last = telemetry::Last::default();
    for mut job in jobs {
        let ours =
            job.malformed().is_none() && job.message().name == route.event && !job.is_stale();
        if !ours {
            match handle_job(spec, services, job, token).await {
                Some(Settle::Ack(d)) => acks.push(d),
                Some(Settle::Nack(d, delay)) => nack(d, delay).await,
                Some(Settle::Fail(d, why)) => return Err(stop_on_failure(d, acks, &why).await),
                None => {}
            }
            continue;
        }
        let mut ctx = job.context(services);
        let (delivery, o) = job.into_parts();
        outstanding.push(o);
        ctx.handler = route.handler.clone();
        spec.meters
            .of_cached(&route.handler, &ctx.topic, &mut last)
            .consumed(1);
        todo.push((ctx, delivery));
    }
    wait_while_held(&mut todo, token).await;
    while !todo.is_empty() {
        if token.is_cancelled() {
            // Not started: back to the broker (at-most-once ones were acked; they are lost,
            // and said so).
            for (ctx, delivery) in todo {
                match delivery {
                    Some(d) => nack(d, Duration::ZERO).await,
                    None => {
                        tracing::warn!(group = %spec.group, message_id = %ctx.message.id, "at-most-once message acked but not handled before shutdown; it is lost")
                    }
                }
            }
            break;
        }
        let span = tracing::info_span!(
            parent: None,
            "handle_batch",
            handler = %route.handler,
            group = %spec.group,
            event = %route.event,
            size = todo.len(),
        );
        #[cfg(feature = "otel")]
        for (ctx, _) in &todo {
            crate::otel::join(&span, &ctx.message.metadata.headers, false);
        }
        let contexts: Vec<Context> = todo.iter().map(|(ctx, _)| ctx.clone()).collect();
        let in_flight: Vec<_> = contexts.iter().map(|_| spec.health.enter()).collect();
        let topic = contexts[0].topic.clone();
        let meters = spec.meters.of(&route.handler, &topic);
        let metered = meters.in_flight(todo.len());
        let started = Instant::now();
        let outcomes = (route.pipeline)(contexts).instrument(span.clone()).await;
        let finished = Instant::now();
        meters.attempt(
            finished.saturating_duration_since(started).as_secs_f64(),
            outcomes.iter().all(Result::is_ok),
            outcomes
                .iter()
                .any(|o| matches!(o, Err(e) if e.is::<HandlerPanicked>())),
        );
        drop((in_flight, metered));
        let mut retry = Vec::new();
        let mut wait = Duration::ZERO;
        for ((mut ctx, delivery), outcome) in todo.into_iter().zip(outcomes) {
            let Err(error) = outcome else {
                spec.health.handled(finished);
                acks.extend(delivery);
                continue;
            };
            let attempt = ctx.attempt;
            let (d, delay) = match after_failure(spec, &route.handler, &ctx, delivery, &error)
                .instrument(span.clone())
                .await
            {
                Failed::Retry(d, delay) => (d, delay),
                Failed::Settled(Some(Settle::Ack(d))) => {
                    acks.push(d);
                    continue;
                }
                Failed::Settled(Some(Settle::Nack(d, delay))) => {
                    nack(d, delay).await;
                    continue;
                }
                // The rest of the batch goes back (dropped unsettled).
                Failed::Settled(Some(Settle::Fail(d, why))) => {
                    return Err(stop_on_failure(d, acks, &why).await)
                }
                Failed::Settled(None) => continue,
            };
            wait = wait.max(delay);
            ctx.attempt = attempt + 1;
            retry.push((ctx, Some(d)));
        }
        // What succeeded is acked before the retries wait.
        if !acks.is_empty() {
            ack_until_stopped(
                std::mem::take(&mut acks),
                token,
                spec.options.shutdown_timeout,
            )
            .await;
        }
        if !retry.is_empty() {
            tokio::select! {
                biased;
                _ = token.cancelled() => {}
                _ = tokio::time::sleep(wait) => {}
            }
            retry.retain(|(_, d)| !d.as_ref().is_some_and(Delivery::is_stale));
        }
        todo = retry;
    }
    if !acks.is_empty() {
        ack_until_stopped(acks, token, spec.options.shutdown_timeout).await;
    }
    drop(outstanding);
    Ok(())
}
