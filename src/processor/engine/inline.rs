//! Concurrency 1: a fetched batch handled in order in the group's task, then acked with one
//! call, as a hand-written consumer loop would.

use std::future::Future;
use std::task::Poll;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::job::handle_job;
use super::settle::{ack_until_stopped, nack, stop_on_failure};
use super::{GroupSpec, Job, Services, Settle};
use crate::{Error, Result};

/// How long a batch's slow handlers' acks wait at most before they are made (see
/// [`handle_inline`]): the Kafka backend's commit interval.
const ACK_WITHIN: Duration = Duration::from_millis(100);

/// Handles a batch in order in the calling task, then settles it: one ack call for the batch
/// (and one every [`ACK_WITHIN`] while its handlers are slow).
/// After cancellation the running handler gets the shutdown deadline, and so do messages acked
/// before handling (at-most-once); the rest of the batch is handed back.
pub(super) async fn handle_inline(
    spec: &GroupSpec,
    services: &mut Services,
    jobs: impl ExactSizeIterator<Item = Job>,
    token: &CancellationToken,
) -> Result<()> {
    let mut acks = Vec::with_capacity(jobs.len());
    let mut deadline = None;
    let mut timed_out = false;
    // Since when the acks collected have waited, counted from the first handler that did not
    // finish at once (fast handlers read no clock).
    let mut waiting_since: Option<tokio::time::Instant> = None;
    for job in jobs {
        if token.is_cancelled() || timed_out {
            let deadline = *deadline
                .get_or_insert_with(|| tokio::time::Instant::now() + spec.options.shutdown_timeout);
            if !job.is_acked() {
                // Not started: back to the broker.
                if let Some(d) = job.into_delivery() {
                    nack(d, Duration::ZERO).await;
                }
            } else if !timed_out {
                // Acked already: run it within the deadline (dropped past it, it logs its loss).
                if tokio::time::timeout_at(deadline, handle_job(spec, services, job, token))
                    .await
                    .is_err()
                {
                    timed_out = true;
                }
            }
            continue;
        }
        // A job its backend holds (Kafka: a broker connection lost) may wait long: what the
        // batch handled before it is acked first. Acked only at the batch's end, it was not
        // counted as handled when the partition was lost meanwhile (the broker away too long),
        // and the partition's next owner, this member again, handled it a second time.
        if !acks.is_empty() && job.must_wait() {
            ack_until_stopped(
                std::mem::take(&mut acks),
                token,
                spec.options.shutdown_timeout,
            )
            .await;
        }
        let mut run = std::pin::pin!(handle_job(spec, services, job, token));
        // Most handlers finish at their first poll: only a pending one waits on the token.
        let first = std::future::poll_fn(|cx| Poll::Ready(run.as_mut().poll(cx))).await;
        let slow = first.is_pending();
        if slow && waiting_since.is_none() {
            waiting_since = Some(tokio::time::Instant::now());
        }
        let outcome = match first {
            Poll::Ready(o) => o,
            Poll::Pending => tokio::select! {
                biased;
                o = &mut run => o,
                _ = token.cancelled() => {
                    let at = *deadline.get_or_insert_with(|| {
                        tokio::time::Instant::now() + spec.options.shutdown_timeout
                    });
                    match tokio::time::timeout_at(at, &mut run).await {
                        Ok(o) => o,
                        Err(_) => {
                            timed_out = true;
                            None
                        }
                    }
                }
            },
        };
        match outcome {
            Some(Settle::Ack(d)) => acks.push(d),
            Some(Settle::Nack(d, delay)) => nack(d, delay).await,
            // What came before is settled; this one and the rest go back.
            Some(Settle::Fail(d, why)) => return Err(stop_on_failure(d, acks, &why).await),
            None => {}
        }
        // Slow handlers: what they handled is acked every `ACK_WITHIN`, not only at the batch's
        // end, so that a partition revoked meanwhile (a rebalance) is committed with it and its
        // next owner does not handle it again.
        if slow
            && !acks.is_empty()
            && waiting_since.is_some_and(|since| since.elapsed() >= ACK_WITHIN)
        {
            ack_until_stopped(
                std::mem::take(&mut acks),
                token,
                spec.options.shutdown_timeout,
            )
            .await;
            waiting_since = Some(tokio::time::Instant::now());
        }
    }
    if !acks.is_empty() {
        ack_until_stopped(acks, token, spec.options.shutdown_timeout).await;
    }
    if timed_out {
        tracing::warn!(group = %spec.group, "shutdown deadline passed; the unfinished message stays pending");
        return Err(Error::ShutdownTimeout(spec.options.shutdown_timeout));
    }
    Ok(())
}
