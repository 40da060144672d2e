//! Runs one consumer group: a fetch loop ahead of the handling, jobs made of what it fetched,
//! and the stop (running handlers get the shutdown deadline; what is left goes back).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::batch::handle_batches;
use super::inline::handle_inline;
use super::lanes::Lanes;
use super::settle::nack;
use super::{GroupSpec, Job, Services};
use crate::backend::{Consumer, Delivery};
use crate::handler::Context;
use crate::processor::options::DeliveryMode;
use crate::Result;

/// Runs the group until `token` is cancelled or the consumer fails for good.
///
/// With a concurrency of 1 each fetched batch is handled in order in this task and acked with one
/// call, as a hand-written consumer loop would. With more, that many workers take messages from
/// one queue (a key's next message waits until the one before it is done, so order per key
/// holds) and a settler task acks in batches. A batch handler with a concurrency of n fetches n
/// batches' worth and splits it by key into n parts handled at once (`handle_batches`).
pub(crate) async fn run_group(
    spec: Arc<GroupSpec>,
    consumer: Box<dyn Consumer>,
    token: CancellationToken,
) -> Result<()> {
    // This group's own token: a group that fails stops its fetcher and lanes, not its siblings
    // (the processor decides that).
    let token = token.child_token();
    #[cfg(feature = "metrics")]
    let _stop_sampling = spec.options.sample_backlog.map(|every| {
        let sampling = token.child_token();
        tokio::spawn(crate::telemetry::sample_backlog(
            spec.subscriber.clone(),
            spec.publisher.system(),
            spec.group.clone(),
            spec.topics.clone(),
            every,
            sampling.clone(),
        ));
        sampling.drop_guard()
    });
    let lanes_n = if spec.batch.is_some() {
        1
    } else {
        spec.options.concurrency.max(1)
    };
    let mut lanes = if lanes_n > 1 {
        Some(Lanes::start(&spec, lanes_n, &token))
    } else {
        None
    };
    // The next batch is fetched while this one is handled.
    let (batches_tx, mut batches) = mpsc::channel(1);
    let fetcher = tokio::spawn(fetch_loop(
        spec.clone(),
        consumer,
        batches_tx,
        token.clone(),
    ));

    let mut services = Services::of(&spec);
    // A batch handler: `concurrency` batches at once (1 by default), each with its services.
    let mut batch_services: Vec<Services> = match &spec.batch {
        Some(_) => (0..spec.options.concurrency.max(1))
            .map(|_| Services::of(&spec))
            .collect(),
        None => Vec::new(),
    };
    let mut result = Ok(());
    'fetch: loop {
        let received = tokio::select! {
            biased;
            _ = token.cancelled() => break,
            r = batches.recv() => r,
        };
        let deliveries = match received {
            Some(Ok(d)) => d,
            Some(Err(e)) => {
                result = Err(e);
                break;
            }
            None => break,
        };
        let Some(mut jobs) = jobs(&spec, &mut services, deliveries).await else {
            continue;
        };
        match &mut lanes {
            Some(lanes) => {
                while let Some(job) = jobs.next() {
                    tokio::select! {
                        biased;
                        room = lanes.reserve() => match room {
                            Some(room) => {
                                lanes.push(job, room);
                                continue;
                            }
                            None => break 'fetch,
                        },
                        _ = token.cancelled() => {}
                    }
                    // Stopping: jobs not queued that were acked first (at-most-once) still get
                    // the shutdown deadline to run; the others are dropped, which hands them
                    // back to the broker for redelivery.
                    let deadline = tokio::time::Instant::now() + spec.options.shutdown_timeout;
                    for job in std::iter::once(job).chain(jobs) {
                        if job.is_acked() {
                            let _ = tokio::time::timeout_at(deadline, lanes.send(job)).await;
                        }
                    }
                    break 'fetch;
                }
            }
            None => {
                let handled = match &spec.batch {
                    Some(route) => {
                        let jobs = jobs.collect();
                        handle_batches(&spec, route, &mut batch_services, jobs, &token).await
                    }
                    None => handle_inline(&spec, &mut services, jobs, &token).await,
                };
                if let Err(e) = handled {
                    result = Err(e);
                    break;
                }
            }
        }
    }

    // Stop: no new jobs; running handlers finish within the deadline, then their outcome is settled.
    token.cancel();
    if let Some(lanes) = lanes.take() {
        if let Err(e) = lanes.finish(&spec).await {
            if result.is_ok() {
                result = Err(e);
            }
        }
    }
    // A batch fetched ahead and not handled goes back for prompt redelivery.
    batches.close();
    while let Some(batch) = batches.recv().await {
        for d in batch.into_iter().flatten() {
            nack(d, Duration::ZERO).await;
        }
    }
    match fetcher.await {
        Ok(mut consumer) => {
            if let Err(e) = consumer.close().await {
                tracing::warn!(group = %spec.group, error = %e.report(), "closing the consumer failed");
            }
        }
        // A task that dies is the group's failure, not a stop that reports success.
        Err(e) => {
            let why = if e.is_panic() {
                crate::middleware::panic_message(&*e.into_panic())
            } else {
                e.to_string()
            };
            tracing::error!(group = %spec.group, error = %why, "the fetch task failed");
            if result.is_ok() {
                result = Err(crate::Error::fatal("the group's fetch task failed", why));
            }
        }
    }
    spec.health
        .stopped(result.as_ref().err().map(crate::Error::report));
    result
}

/// Fetches batches until `token` is cancelled or the consumer fails for good (the error is
/// passed on); retries errors worth retrying with backoff. Hands the consumer back to be closed.
async fn fetch_loop(
    spec: Arc<GroupSpec>,
    mut consumer: Box<dyn Consumer>,
    batches: mpsc::Sender<Result<Vec<Delivery>>>,
    token: CancellationToken,
) -> Box<dyn Consumer> {
    let mut backoff = Duration::from_millis(100);
    // A batch handler with `concurrency(n)` handles up to n batches at once: fetched together.
    let fetch = match spec.batch {
        Some(_) => spec.options.batch_size * spec.options.concurrency.max(1),
        None => spec.options.batch_size,
    };
    loop {
        let received = tokio::select! {
            biased;
            _ = token.cancelled() => break,
            r = consumer.receive(fetch) => r,
        };
        match received {
            Ok(d) => {
                backoff = Duration::from_millis(100);
                spec.health.running();
                if let Err(unsent) = batches.send(Ok(d)).await {
                    // The group stopped: hand them back.
                    for d in unsent.0.into_iter().flatten() {
                        nack(d, Duration::ZERO).await;
                    }
                    break;
                }
            }
            Err(e) if e.is_retryable() => {
                tracing::warn!(group = %spec.group, error = %e.report(), "receive failed; retrying in {backoff:?}");
                spec.health.reconnecting(e.report());
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Err(e) => {
                tracing::error!(group = %spec.group, error = %e.report(), "receive failed; stopping the group");
                let _ = batches.send(Err(e)).await;
                break;
            }
        }
    }
    consumer
}

/// Turns deliveries into jobs; under at-most-once, acks them all first (`None` if that failed:
/// the messages stay pending and come back) and keeps their contexts (made on `services`'
/// names). Each job is made as it is taken: a list of them made first moved every delivery (or
/// what was kept of it) once more.
async fn jobs<'a>(
    spec: &'a GroupSpec,
    services: &mut Services,
    deliveries: Vec<Delivery>,
) -> Option<Jobs<'a>> {
    match spec.options.delivery {
        DeliveryMode::AtLeastOnce => Some(Jobs::Delivered(deliveries.into_iter(), spec)),
        DeliveryMode::AtMostOnce => {
            let kept: Vec<_> = deliveries
                .iter()
                .map(|d| {
                    let malformed = d.malformed().map(str::to_owned);
                    let outstanding = spec.health.job();
                    (services.context(d), d.shard(), malformed, outstanding)
                })
                .collect();
            if let Err((e, back)) = Delivery::ack_all(deliveries).await {
                // Not acked, so not handled: dropping them hands them back for redelivery.
                tracing::warn!(group = %spec.group, error = %e.report(), count = back.len(), "ack before handling failed; the messages stay pending");
                return None;
            }
            Some(Jobs::Acked(kept.into_iter(), spec))
        }
    }
}

/// What a job of a message acked before handling is made of ([`Job::acked`]): its context,
/// shard, malformed reason and health count.
type Kept = (
    Context,
    Option<u32>,
    Option<String>,
    crate::processor::health::Outstanding,
);

/// A fetched batch's jobs, made as they are taken ([`jobs`]).
enum Jobs<'a> {
    Delivered(std::vec::IntoIter<Delivery>, &'a GroupSpec),
    Acked(std::vec::IntoIter<Kept>, &'a GroupSpec),
}

impl Iterator for Jobs<'_> {
    type Item = Job;

    fn next(&mut self) -> Option<Job> {
        match self {
            Jobs::Delivered(deliveries, spec) => deliveries.next().map(|d| Job::delivered(d, spec)),
            Jobs::Acked(kept, spec) => kept.next().map(|(ctx, shard, malformed, outstanding)| {
                Job::acked(ctx, shard, malformed, outstanding, &spec.group)
            }),
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        match self {
            Jobs::Delivered(deliveries, _) => deliveries.size_hint(),
            Jobs::Acked(kept, _) => kept.size_hint(),
        }
    }
}

impl ExactSizeIterator for Jobs<'_> {}
