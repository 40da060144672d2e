//! The loop that runs one consumer group: fetch, dispatch to lanes, settle with the broker.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use tracing::Instrument;

use super::options::{DeliveryMode, HandlerOptions, UnknownEvent};
use crate::backend::{Consumer, Delivery, Publisher, Subscriber, Subscription};
use crate::error::{Error, Result};
use crate::handler::{is_permanent, BoxHandlerService, Context};
use crate::message::Message;

/// Header names written on dead-lettered messages.
pub mod dead_letter_headers {
    /// Why the message was dead-lettered.
    pub const REASON: &str = "x-dead-letter-reason";
    /// The handler that failed.
    pub const HANDLER: &str = "x-dead-letter-handler";
    /// The consumer group.
    pub const GROUP: &str = "x-dead-letter-group";
    /// The topic the message came from.
    pub const TOPIC: &str = "x-dead-letter-topic";
    /// How many deliveries were made.
    pub const ATTEMPTS: &str = "x-dead-letter-attempts";
}

/// One handler inside a group, found by event name.
pub(crate) struct Route {
    pub handler: Arc<str>,
    pub service: BoxHandlerService,
}

/// Everything needed to run one consumer group.
pub(crate) struct GroupSpec {
    pub group: Arc<str>,
    pub topics: Vec<String>,
    pub routes: HashMap<String, Route>,
    pub options: HandlerOptions,
    pub publisher: Arc<dyn Publisher>,
    pub subscriber: Arc<dyn Subscriber>,
    pub consumer_name: String,
}

impl GroupSpec {
    pub(crate) fn subscription(&self) -> Subscription {
        Subscription::new(self.group.to_string(), self.topics.iter().cloned())
            .consumer(self.consumer_name.clone())
            .start(self.options.start)
            .claim_idle(self.options.claim_idle)
    }

    fn dead_letter_topic(&self) -> String {
        self.options
            .dead_letter_topic
            .clone()
            .unwrap_or_else(|| format!("{}.dead-letter", self.group))
    }
}

struct Job {
    ctx: Context,
    /// Why the entry could not be read as a message.
    malformed: Option<String>,
    /// `None` when the message was acked before handling (at-most-once).
    delivery: Option<Delivery>,
}

enum Settle {
    Ack(Delivery),
    Nack(Delivery, Duration),
}

/// Runs the group until `token` is cancelled or the consumer fails for good.
pub(crate) async fn run_group(
    spec: Arc<GroupSpec>,
    mut consumer: Box<dyn Consumer>,
    token: CancellationToken,
) -> Result<()> {
    let lanes_n = spec.options.concurrency.max(1);
    let (settle_tx, settle_rx) = mpsc::channel::<Settle>(4096);
    let settler = tokio::spawn(settle_loop(settle_rx));
    let mut lanes = Vec::with_capacity(lanes_n);
    let mut lane_tasks = JoinSet::new();
    for _ in 0..lanes_n {
        let (tx, rx) = mpsc::channel::<Job>(spec.options.batch_size.max(16));
        lanes.push(tx);
        lane_tasks.spawn(lane_loop(
            spec.clone(),
            rx,
            settle_tx.clone(),
            token.clone(),
        ));
    }
    drop(settle_tx);

    let mut result = Ok(());
    let mut round_robin = 0usize;
    let mut backoff = Duration::from_millis(100);
    'fetch: loop {
        let received = tokio::select! {
            biased;
            _ = token.cancelled() => break,
            r = consumer.receive(spec.options.batch_size) => r,
        };
        let deliveries = match received {
            Ok(d) => {
                backoff = Duration::from_millis(100);
                d
            }
            Err(e) if e.is_retryable() => {
                tracing::warn!(group = %spec.group, error = %e.report(), "receive failed; retrying in {backoff:?}");
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
            Err(e) => {
                tracing::error!(group = %spec.group, error = %e.report(), "receive failed; stopping the group");
                result = Err(e);
                break;
            }
        };
        let jobs = match spec.options.delivery {
            DeliveryMode::AtLeastOnce => deliveries
                .into_iter()
                .map(|d| Job {
                    ctx: context(&spec, &d),
                    malformed: d.malformed().map(str::to_owned),
                    delivery: Some(d),
                })
                .collect::<Vec<_>>(),
            DeliveryMode::AtMostOnce => {
                let ctxs: Vec<(Context, Option<String>)> = deliveries
                    .iter()
                    .map(|d| (context(&spec, d), d.malformed().map(str::to_owned)))
                    .collect();
                if let Err((e, back)) = Delivery::ack_all(deliveries).await {
                    // Not acked, so not handled: the broker delivers them again.
                    tracing::warn!(group = %spec.group, error = %e.report(), count = back.len(), "ack before handling failed; the messages stay pending");
                    continue;
                }
                ctxs.into_iter()
                    .map(|(ctx, malformed)| Job {
                        ctx,
                        malformed,
                        delivery: None,
                    })
                    .collect()
            }
        };
        for job in jobs {
            let lane = match &job.ctx.message.key {
                Some(key) => {
                    let mut h = DefaultHasher::new();
                    key.hash(&mut h);
                    (h.finish() % lanes_n as u64) as usize
                }
                None => {
                    round_robin = round_robin.wrapping_add(1);
                    round_robin % lanes_n
                }
            };
            tokio::select! {
                // Jobs not yet queued are dropped unacked: they stay pending in the broker.
                _ = token.cancelled() => break 'fetch,
                sent = lanes[lane].send(job) => if sent.is_err() { break 'fetch },
            }
        }
    }

    // Stop: no new jobs; running handlers finish within the deadline, then their outcome is settled.
    drop(lanes);
    let deadline = spec.options.shutdown_timeout;
    let drained = tokio::time::timeout(deadline, async {
        while lane_tasks.join_next().await.is_some() {}
        let _ = settler.await;
    })
    .await;
    if let Err(e) = consumer.close().await {
        tracing::warn!(group = %spec.group, error = %e.report(), "closing the consumer failed");
    }
    if drained.is_err() {
        lane_tasks.abort_all();
        tracing::warn!(group = %spec.group, "shutdown deadline passed; unfinished messages stay pending");
        if result.is_ok() {
            result = Err(Error::ShutdownTimeout(deadline));
        }
    }
    result
}

fn context(spec: &GroupSpec, d: &Delivery) -> Context {
    let handler = spec
        .routes
        .get(&d.message().name)
        .map(|r| r.handler.clone())
        .unwrap_or_else(|| Arc::from(""));
    Context {
        message: d.message_arc().clone(),
        topic: d.topic_arc().clone(),
        group: spec.group.clone(),
        handler,
        attempt: d.attempt(),
    }
}

async fn lane_loop(
    spec: Arc<GroupSpec>,
    mut jobs: mpsc::Receiver<Job>,
    settle: mpsc::Sender<Settle>,
    token: CancellationToken,
) {
    while let Some(job) = jobs.recv().await {
        if token.is_cancelled() {
            // Queued but not started: hand it back for prompt redelivery.
            if let Some(d) = job.delivery {
                let _ = settle.send(Settle::Nack(d, Duration::ZERO)).await;
            }
            continue;
        }
        handle_job(&spec, job, &settle).await;
    }
}

async fn handle_job(spec: &GroupSpec, job: Job, settle: &mpsc::Sender<Settle>) {
    let Job {
        ctx,
        malformed,
        delivery,
    } = job;
    if let Some(reason) = malformed {
        reject(spec, ctx, delivery, settle, &reason).await;
        return;
    }
    let Some(route) = spec.routes.get(&ctx.message.name) else {
        if spec.options.on_unknown == UnknownEvent::DeadLetter {
            let reason = format!(
                "no handler for event `{}` in group `{}`",
                ctx.message.name, spec.group
            );
            reject(spec, ctx, delivery, settle, &reason).await;
        } else {
            tracing::debug!(group = %spec.group, event = %ctx.message.name, "no handler for this event; acked");
            if let Some(d) = delivery {
                let _ = settle.send(Settle::Ack(d)).await;
            }
        }
        return;
    };
    let span = tracing::info_span!(
        "handle",
        handler = %route.handler,
        group = %spec.group,
        event = %ctx.message.name,
        message_id = %ctx.message.id,
        attempt = ctx.attempt,
    );
    let service = route.service.clone();
    let result = service.oneshot(ctx.clone()).instrument(span.clone()).await;
    let _enter = span.enter();
    match (result, delivery) {
        (Ok(()), Some(d)) => {
            let _ = settle.send(Settle::Ack(d)).await;
        }
        (Ok(()), None) => {}
        (Err(error), None) => {
            // Acked already: no retry. The dead-letter topic keeps it from being lost silently.
            let reason = error_chain(&*error);
            tracing::warn!(error = %reason, "handler failed under at-most-once delivery; dead-lettering");
            let published = dead_letter(
                spec,
                &route.handler,
                &ctx.topic,
                &ctx.message,
                ctx.attempt,
                &reason,
            )
            .await;
            if let Err(e) = published {
                tracing::error!(error = %e.report(), message_id = %ctx.message.id, "dead-letter publish failed; the message is lost (at-most-once)");
            }
        }
        (Err(error), Some(d)) => {
            let attempt = d.attempt();
            if is_permanent(&error) || attempt >= spec.options.retry.max_attempts {
                let reason = error_chain(&*error);
                tracing::warn!(error = %reason, attempt, "dead-lettering the message");
                match dead_letter(
                    spec,
                    &route.handler,
                    d.topic(),
                    d.message(),
                    attempt,
                    &reason,
                )
                .await
                {
                    Ok(()) => {
                        let _ = settle.send(Settle::Ack(d)).await;
                    }
                    Err(e) => {
                        tracing::error!(error = %e.report(), "dead-letter publish failed; the message stays pending");
                        let delay = spec.options.retry.delay(attempt);
                        let _ = settle.send(Settle::Nack(d, delay)).await;
                    }
                }
            } else {
                let delay = spec.options.retry.delay(attempt);
                tracing::info!(error = %error_chain(&*error), attempt, "handler failed; retrying in {delay:?}");
                let _ = settle.send(Settle::Nack(d, delay)).await;
            }
        }
    }
}

/// Dead-letters a message no handler can take, then acks it; if the dead letter cannot be
/// published, the message stays pending.
async fn reject(
    spec: &GroupSpec,
    ctx: Context,
    delivery: Option<Delivery>,
    settle: &mpsc::Sender<Settle>,
    reason: &str,
) {
    tracing::warn!(group = %spec.group, message_id = %ctx.message.id, reason, "dead-lettering the message");
    if let Err(e) = dead_letter(spec, "", &ctx.topic, &ctx.message, ctx.attempt, reason).await {
        tracing::error!(group = %spec.group, error = %e.report(), "dead-letter publish failed; the message stays pending");
        if let Some(d) = delivery {
            let _ = settle
                .send(Settle::Nack(d, spec.options.retry.delay(ctx.attempt)))
                .await;
        }
        return;
    }
    if let Some(d) = delivery {
        let _ = settle.send(Settle::Ack(d)).await;
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
    use dead_letter_headers as h;
    let mut dead = message.clone();
    let headers = &mut dead.metadata.headers;
    headers.insert(h::REASON.into(), reason.into());
    headers.insert(h::HANDLER.into(), handler.into());
    headers.insert(h::GROUP.into(), spec.group.to_string());
    headers.insert(h::TOPIC.into(), topic.into());
    headers.insert(h::ATTEMPTS.into(), attempts.to_string());
    spec.publisher
        .publish(&spec.dead_letter_topic(), std::slice::from_ref(&dead))
        .await
}

/// `error: cause: cause`, each source once.
pub(crate) fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.ends_with(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

/// Acks in batches, nacks one by one; retries a failed ack a few times, then leaves the messages
/// pending (they are redelivered: at-least-once).
async fn settle_loop(mut rx: mpsc::Receiver<Settle>) {
    let mut acks = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(item) = next.take() {
            match item {
                Settle::Ack(d) => acks.push(d),
                Settle::Nack(d, delay) => {
                    if let Err((e, d)) = d.nack(delay).await {
                        tracing::warn!(error = %e.report(), message_id = %d.message().id, "nack failed; the message stays pending");
                    }
                }
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

async fn ack_with_retries(mut batch: Vec<Delivery>) {
    let mut delay = Duration::from_millis(50);
    for attempt in 1..=5 {
        match Delivery::ack_all(batch).await {
            Ok(()) => return,
            Err((e, back)) => {
                if attempt == 5 {
                    tracing::error!(error = %e.report(), count = back.len(), "ack failed; the messages stay pending and will be redelivered");
                    return;
                }
                tracing::warn!(error = %e.report(), "ack failed; retrying");
                batch = back;
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
        }
    }
}
