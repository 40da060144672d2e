//! Settling with the broker: acks in batches with a few retries, nacks one by one.

use std::time::Duration;

use tokio::sync::mpsc;

use super::Settle;
use crate::backend::Delivery;

pub(super) async fn nack(d: Delivery, delay: Duration) {
    if let Err((e, d)) = d.nack(delay).await {
        tracing::warn!(error = %e.report(), message_id = %d.message().id, "nack failed; the message stays pending");
    }
}

/// Acks in batches, nacks one by one; retries a failed ack (see [`ack_with_retries`]), then
/// leaves the messages pending (they are redelivered: at-least-once).
pub(super) async fn settle_loop(mut rx: mpsc::Receiver<Settle>) {
    let mut acks = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(item) = next.take() {
            match item {
                Settle::Ack(d) => acks.push(d),
                Settle::Nack(d, delay) => nack(d, delay).await,
                // Workers stop the group on these before they come here; the message goes back.
                Settle::Fail(d, _) => drop(d),
            }
            if acks.len() < 1000 {
                next = rx.try_recv().ok();
            }
        }
        if !acks.is_empty() {
            ack_with_retries(std::mem::take(&mut acks)).await;
        }
    }
}

/// Stops a runner on a message that could not be dead-lettered ([`Settle::Fail`]): what was
/// handled before it is acked, it goes back (dropped unsettled), and the group's error says why.
pub(super) async fn stop_on_failure(d: Delivery, acks: Vec<Delivery>, why: &str) -> crate::Error {
    drop(d);
    if !acks.is_empty() {
        ack_with_retries(acks).await;
    }
    crate::Error::fatal(
        "a message could not be dead-lettered; stopping the group",
        why.to_owned(),
    )
}

/// [`ack_with_retries`] in a group's own task (concurrency 1, batch handlers): once the group is
/// stopping, its retries get the shutdown deadline and no more, and what is left unacked then is
/// redelivered. (The workers' settler is bounded by the deadline of [`super::lanes`]' finish.)
pub(super) async fn ack_until_stopped(
    batch: Vec<Delivery>,
    token: &tokio_util::sync::CancellationToken,
    shutdown_timeout: Duration,
) {
    let mut acking = std::pin::pin!(ack_with_retries(batch));
    tokio::select! {
        biased;
        () = &mut acking => return,
        () = token.cancelled() => {}
    }
    if tokio::time::timeout(shutdown_timeout, acking)
        .await
        .is_err()
    {
        tracing::warn!("shutdown deadline passed while acking; the messages will be redelivered");
    }
}

/// How long a failed ack is tried again while its error says that may succeed (the connection
/// lost, the broker restarting or loading its data, a failover): longer than a broker takes to
/// come back, as the messages are handled again once it is given up.
const ACK_RETRY_FOR: Duration = Duration::from_secs(30);
/// Tries of an ack whose error does not say that trying again may succeed.
const ACK_TRIES: u32 = 5;

/// Acks `batch`, trying again after a failure: waits 50 ms, doubled up to 1 s. An error that
/// may pass ([`crate::Error::is_retryable`]) is tried again for up to [`ACK_RETRY_FOR`], another
/// [`ACK_TRIES`] times in all; then the messages are left to be redelivered.
///
/// Before, every error got five tries, 0.75 s of waits: a Redis restarting under load answered
/// `LOADING` longer than that, and its members handled their own acked-too-late messages again
/// (the soak's `acks_given_up=`, docs/reliability.md).
pub(super) async fn ack_with_retries(mut batch: Vec<Delivery>) {
    let started = tokio::time::Instant::now();
    let mut delay = Duration::from_millis(50);
    let mut tries = 0;
    loop {
        tries += 1;
        match Delivery::ack_all(batch).await {
            Ok(()) => return,
            Err((e, back)) => {
                let give_up = if e.is_retryable() {
                    started.elapsed() + delay > ACK_RETRY_FOR
                } else {
                    tries >= ACK_TRIES
                };
                if give_up {
                    // Dropping them hands them back to their consumer, which delivers them
                    // again (at-least-once) instead of holding them as in flight.
                    tracing::error!(error = %e.report(), count = back.len(), "ack failed; the messages will be redelivered");
                    return;
                }
                tracing::warn!(error = %e.report(), "ack failed; retrying");
                batch = back;
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
        }
    }
}
