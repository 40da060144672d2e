//! The loop that runs one consumer group: fetch, dispatch to lanes, settle with the broker.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use std::panic::AssertUnwindSafe;
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tower::{Service, ServiceExt};
use tracing::Instrument;

use super::health::Health;
use super::options::{DeliveryMode, HandlerOptions, UnknownEvent};
use crate::backend::{Consumer, Delivery, Publisher, Subscriber, Subscription};
use crate::error::{BoxError, Error, Result};
use crate::handler::{is_permanent, requested_delay, BatchPipeline, Context, Pipeline};
use crate::message::Message;
use crate::middleware::{panic_message, HandlerPanicked};
use crate::telemetry::{self, Consuming, DeadReason};

/// The headers a processor writes on a dead letter ([`crate::dead_letter::headers`]).
pub use crate::dead_letter::headers as dead_letter_headers;

/// One handler inside a group, found by event name.
pub(crate) struct Route {
    pub handler: Arc<str>,
    pub service: Pipeline,
}

/// A group's batch handler, for the events named `event`.
pub(crate) struct BatchRoute {
    pub event: String,
    pub handler: Arc<str>,
    pub pipeline: BatchPipeline,
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
    /// The handler name of a context before a handler took it.
    pub no_handler: Arc<str>,
    /// A batch handler: the group's one route, run a fetched batch at a time.
    pub batch: Option<BatchRoute>,
    /// What the group reports about itself.
    pub health: Arc<Health>,
}

impl GroupSpec {
    pub(crate) fn subscription(&self) -> Subscription {
        Subscription::new(self.group.to_string(), self.topics.iter().cloned())
            .consumer(self.consumer_name.clone())
            .start(self.options.start)
            .claim_idle(self.options.claim_idle)
            .dead_letter(self.dead_letter_topic())
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
    /// The broker-side shard, which orders messages without a key.
    shard: Option<u32>,
    /// Why the entry could not be read as a message.
    malformed: Option<String>,
    /// `None` when the message was acked before handling (at-most-once).
    delivery: Option<Delivery>,
    /// Set for a message acked before handling: if the job is dropped before it runs (the
    /// shutdown deadline passed), the loss is logged, never silent.
    unhandled: Option<Unhandled>,
}

/// Logs an at-most-once message that was acked and will never be handled.
struct Unhandled {
    group: Arc<str>,
    message_id: String,
}

impl Drop for Unhandled {
    fn drop(&mut self) {
        tracing::error!(
            group = %self.group,
            message_id = %self.message_id,
            "at-most-once message acked but not handled before the shutdown deadline; it is lost"
        );
    }
}

impl Unhandled {
    /// The job runs: nothing to report.
    fn disarm(self) {
        std::mem::forget(self);
    }
}

enum Settle {
    Ack(Delivery),
    Nack(Delivery, Duration),
}

/// Runs the group until `token` is cancelled or the consumer fails for good.
///
/// With a concurrency of 1 each fetched batch is handled in order in this task and acked with one
/// call, as a hand-written consumer loop would. With more, that many workers take messages from
/// one queue (a key's next message waits until the one before it is done, so order per key
/// holds) and a settler task acks in batches.
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
        let Some(jobs) = jobs(&spec, deliveries).await else {
            continue;
        };
        match &mut lanes {
            Some(lanes) => {
                let mut jobs = jobs.into_iter();
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
                        if job.unhandled.is_some() {
                            let _ = tokio::time::timeout_at(deadline, lanes.send(job)).await;
                        }
                    }
                    break 'fetch;
                }
            }
            None => {
                let handled = match &spec.batch {
                    Some(route) => handle_batch(&spec, route, &mut services, jobs, &token).await,
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
        Err(e) => tracing::error!(group = %spec.group, error = %e, "the fetch task failed"),
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
    loop {
        let received = tokio::select! {
            biased;
            _ = token.cancelled() => break,
            r = consumer.receive(spec.options.batch_size) => r,
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
/// the messages stay pending and come back).
async fn jobs(spec: &GroupSpec, deliveries: Vec<Delivery>) -> Option<Vec<Job>> {
    match spec.options.delivery {
        DeliveryMode::AtLeastOnce => Some(
            deliveries
                .into_iter()
                .map(|d| Job {
                    ctx: context(spec, &d),
                    shard: d.shard(),
                    malformed: d.malformed().map(str::to_owned),
                    delivery: Some(d),
                    unhandled: None,
                })
                .collect(),
        ),
        DeliveryMode::AtMostOnce => {
            let jobs: Vec<Job> = deliveries
                .iter()
                .map(|d| Job {
                    ctx: context(spec, d),
                    shard: d.shard(),
                    malformed: d.malformed().map(str::to_owned),
                    delivery: None,
                    unhandled: None,
                })
                .collect();
            if let Err((e, back)) = Delivery::ack_all(deliveries).await {
                // Not acked, so not handled: dropping them hands them back for redelivery.
                tracing::warn!(group = %spec.group, error = %e.report(), count = back.len(), "ack before handling failed; the messages stay pending");
                return None;
            }
            Some(
                jobs.into_iter()
                    .map(|mut j| {
                        j.unhandled = Some(Unhandled {
                            group: spec.group.clone(),
                            message_id: j.ctx.message.id.clone(),
                        });
                        j
                    })
                    .collect(),
            )
        }
    }
}

/// Handles a batch in order in the calling task, then settles it: one ack call for the batch.
/// After cancellation the running handler gets the shutdown deadline, and so do messages acked
/// before handling (at-most-once); the rest of the batch is handed back.
async fn handle_inline(
    spec: &GroupSpec,
    services: &mut Services,
    jobs: Vec<Job>,
    token: &CancellationToken,
) -> Result<()> {
    let mut acks = Vec::with_capacity(jobs.len());
    let mut deadline = None;
    let mut timed_out = false;
    for job in jobs {
        if token.is_cancelled() || timed_out {
            let deadline = *deadline
                .get_or_insert_with(|| tokio::time::Instant::now() + spec.options.shutdown_timeout);
            match job.delivery {
                // Not started: back to the broker.
                Some(d) => nack(d, Duration::ZERO).await,
                // Acked already: run it within the deadline (dropped, it logs its loss).
                None if !timed_out => {
                    if tokio::time::timeout_at(deadline, handle_job(spec, services, job, token))
                        .await
                        .is_err()
                    {
                        timed_out = true;
                    }
                }
                None => drop(job),
            }
            continue;
        }
        let run = handle_job(spec, services, job, token);
        tokio::pin!(run);
        // Most handlers finish at their first poll: only a pending one waits on the token.
        let first = std::future::poll_fn(|cx| Poll::Ready(run.as_mut().poll(cx))).await;
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
            None => {}
        }
    }
    if !acks.is_empty() {
        ack_with_retries(acks).await;
    }
    if timed_out {
        tracing::warn!(group = %spec.group, "shutdown deadline passed; the unfinished message stays pending");
        return Err(Error::ShutdownTimeout(spec.options.shutdown_timeout));
    }
    Ok(())
}

/// Runs a batch handler on one fetched batch: its events go to the handler in one call; the
/// failed ones are retried together after the longest of their backoffs (as a smaller batch)
/// until they succeed or are dead-lettered. Other messages (malformed, other events, stale)
/// settle as with a one-at-a-time handler.
async fn handle_batch(
    spec: &GroupSpec,
    route: &BatchRoute,
    services: &mut Services,
    jobs: Vec<Job>,
    token: &CancellationToken,
) -> Result<()> {
    let mut acks = Vec::with_capacity(jobs.len());
    let mut todo: Vec<(Context, Option<Delivery>)> = Vec::with_capacity(jobs.len());
    for job in jobs {
        let ours = job.malformed.is_none()
            && job.ctx.message.name == route.event
            && !job.delivery.as_ref().is_some_and(Delivery::is_stale);
        if !ours {
            match handle_job(spec, services, job, token).await {
                Some(Settle::Ack(d)) => acks.push(d),
                Some(Settle::Nack(d, delay)) => nack(d, delay).await,
                None => {}
            }
            continue;
        }
        let Job {
            mut ctx,
            delivery,
            unhandled,
            ..
        } = job;
        if let Some(u) = unhandled {
            u.disarm();
        }
        ctx.handler = route.handler.clone();
        telemetry::consumed(&consuming(spec, &route.handler, &ctx.topic), 1);
        todo.push((ctx, delivery));
    }
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
        let labels = consuming(spec, &route.handler, &topic);
        let metered =
            telemetry::InFlight::enter(labels.backend, &spec.group, &route.handler, todo.len());
        let started = Instant::now();
        let outcomes = (route.pipeline)(contexts).instrument(span.clone()).await;
        telemetry::attempt(
            &labels,
            started.elapsed().as_secs_f64(),
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
                spec.health.handled();
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
                Failed::Settled(None) => continue,
            };
            wait = wait.max(delay);
            ctx.attempt = attempt + 1;
            retry.push((ctx, Some(d)));
        }
        // What succeeded is acked before the retries wait.
        if !acks.is_empty() {
            ack_with_retries(std::mem::take(&mut acks)).await;
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
        ack_with_retries(acks).await;
    }
    Ok(())
}

async fn nack(d: Delivery, delay: Duration) {
    if let Err((e, d)) = d.nack(delay).await {
        tracing::warn!(error = %e.report(), message_id = %d.message().id, "nack failed; the message stays pending");
    }
}

/// The workers for concurrency above 1, and a settler.
///
/// Workers take jobs from one queue, so a slow message (or one waiting out its retry backoff)
/// holds back only the messages of its own key, never a whole share of the traffic. Order per
/// key holds because a key's next message becomes ready only when the one before it is done
/// ([`Ready`]).
struct Lanes {
    ready: Arc<Ready>,
    /// Bounds the jobs held (waiting, ready or running), which bounds memory under a backlog.
    room: Arc<Semaphore>,
    tasks: JoinSet<()>,
    settler: tokio::task::JoinHandle<()>,
}

/// A job, the ordering key it holds (its message key, else its shard; `None`: unordered) and
/// its share of the room.
struct Queued {
    job: Job,
    order: Option<u64>,
    _room: OwnedSemaphorePermit,
}

/// Jobs ready to run, and per busy ordering key the jobs behind its ready or running one.
struct Ready {
    state: std::sync::Mutex<ReadyState>,
    changed: Notify,
}

#[derive(Default)]
struct ReadyState {
    queue: VecDeque<Queued>,
    /// An entry exists while the key has a job ready or running; it holds the ones after it.
    behind: HashMap<u64, VecDeque<Queued>>,
    closed: bool,
}

impl Ready {
    fn lock(&self) -> std::sync::MutexGuard<'_, ReadyState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a job: ready at once unless its key is busy, then behind the key's others.
    fn push(&self, queued: Queued) {
        let mut state = self.lock();
        if let Some(order) = queued.order {
            if let Some(behind) = state.behind.get_mut(&order) {
                behind.push_back(queued);
                return;
            }
            state.behind.insert(order, VecDeque::new());
        }
        state.queue.push_back(queued);
        drop(state);
        self.changed.notify_one();
    }

    /// The next ready job; `None` once closed and nothing is ready (a worker still running a
    /// job makes its key's next one ready itself, and takes it then).
    async fn next(&self) -> Option<Queued> {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let mut state = self.lock();
                if let Some(queued) = state.queue.pop_front() {
                    return Some(queued);
                }
                if state.closed {
                    return None;
                }
            }
            changed.await;
        }
    }

    /// A job of `order` is done: the key's next job, if any, becomes ready.
    fn done(&self, order: Option<u64>) {
        let Some(order) = order else { return };
        let mut state = self.lock();
        let next = match state.behind.get_mut(&order) {
            Some(behind) => behind.pop_front(),
            None => return,
        };
        match next {
            Some(next) => {
                state.queue.push_back(next);
                drop(state);
                self.changed.notify_one();
            }
            None => {
                state.behind.remove(&order);
            }
        }
    }

    /// No more jobs come: workers stop once the ready ones are done.
    fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_waiters();
    }
}

impl Lanes {
    fn start(spec: &Arc<GroupSpec>, n: usize, token: &CancellationToken) -> Self {
        let (settle_tx, settle_rx) = mpsc::channel::<Settle>(4096);
        let settler = tokio::spawn(settle_loop(settle_rx));
        let ready = Arc::new(Ready {
            state: std::sync::Mutex::default(),
            changed: Notify::new(),
        });
        let mut tasks = JoinSet::new();
        for _ in 0..n {
            tasks.spawn(worker_loop(
                spec.clone(),
                ready.clone(),
                settle_tx.clone(),
                token.clone(),
            ));
        }
        Lanes {
            ready,
            room: Arc::new(Semaphore::new(n * spec.options.batch_size.max(16))),
            tasks,
            settler,
        }
    }

    /// Room for one more job, waiting while the workers hold as many as they may.
    async fn reserve(&self) -> Option<OwnedSemaphorePermit> {
        self.room.clone().acquire_owned().await.ok()
    }

    /// Queues a job with the room reserved for it.
    fn push(&self, job: Job, room: OwnedSemaphorePermit) {
        let order = match (&job.ctx.message.key, job.shard) {
            (Some(key), _) => {
                let mut h = DefaultHasher::new();
                key.hash(&mut h);
                Some(h.finish())
            }
            (None, Some(shard)) => {
                let mut h = DefaultHasher::new();
                (u8::MAX, shard).hash(&mut h);
                Some(h.finish())
            }
            (None, None) => None,
        };
        self.ready.push(Queued {
            job,
            order,
            _room: room,
        });
    }

    /// Queues a job once there is room; `false` if the workers are gone.
    async fn send(&mut self, job: Job) -> bool {
        match self.reserve().await {
            Some(room) => {
                self.push(job, room);
                true
            }
            None => false,
        }
    }

    /// Lets running handlers finish within the shutdown deadline and settles their outcome.
    async fn finish(mut self, spec: &GroupSpec) -> Result<()> {
        self.ready.close();
        let deadline = spec.options.shutdown_timeout;
        let tasks = &mut self.tasks;
        let settler = &mut self.settler;
        let drained = tokio::time::timeout(deadline, async {
            while tasks.join_next().await.is_some() {}
            let _ = settler.await;
        })
        .await;
        if drained.is_err() {
            self.tasks.abort_all();
            tracing::warn!(group = %spec.group, "shutdown deadline passed; unfinished messages stay pending");
            return Err(Error::ShutdownTimeout(deadline));
        }
        Ok(())
    }
}

fn context(spec: &GroupSpec, d: &Delivery) -> Context {
    Context {
        message: d.message_arc().clone(),
        topic: d.topic_arc().clone(),
        group: spec.group.clone(),
        handler: spec.no_handler.clone(),
        attempt: d.attempt(),
        broker_id: d.broker_id_arc().clone(),
    }
}

async fn worker_loop(
    spec: Arc<GroupSpec>,
    ready: Arc<Ready>,
    settle: mpsc::Sender<Settle>,
    token: CancellationToken,
) {
    let mut services = Services::of(&spec);
    while let Some(Queued { job, order, _room }) = ready.next().await {
        let outcome = if token.is_cancelled() && job.unhandled.is_none() {
            // Queued but not started: hand it back for prompt redelivery. A message acked
            // before handling (at-most-once) still runs, within the shutdown deadline.
            job.delivery.map(|d| Settle::Nack(d, Duration::ZERO))
        } else {
            handle_job(&spec, &mut services, job, &token).await
        };
        // Done (retries included): the key's next message may run.
        ready.done(order);
        if let Some(outcome) = outcome {
            let _ = settle.send(outcome).await;
        }
    }
}

/// Each runner's own handles on the handler pipelines, cloned once rather than per message.
/// A group has a handful of handlers: a list compared by name beats hashing.
struct Services(Vec<(String, Arc<str>, Pipeline)>);

impl Services {
    fn of(spec: &GroupSpec) -> Self {
        Services(
            spec.routes
                .iter()
                .map(|(name, r)| (name.clone(), r.handler.clone(), r.service.clone()))
                .collect(),
        )
    }

    fn get(&mut self, event: &str) -> Option<(&Arc<str>, &mut Pipeline)> {
        self.0
            .iter_mut()
            .find(|(name, _, _)| name == event)
            .map(|(_, handler, pipeline)| (&*handler, pipeline))
    }
}

/// Runs a handler's future, turning a panic into an error.
async fn caught(run: impl Future<Output = Result<(), BoxError>>) -> Result<(), BoxError> {
    match AssertUnwindSafe(run).catch_unwind().await {
        Ok(result) => result,
        Err(panic) => Err(Box::new(HandlerPanicked(panic_message(&*panic)))),
    }
}

/// Runs one job; returns how to settle it with the broker (`None`: nothing to settle).
///
/// A failure worth retrying is retried here, after the policy's backoff, holding the job's lane:
/// later messages of its key wait, so order per key survives retries. Cancellation ends the
/// wait and hands the message back to the broker.
async fn handle_job(
    spec: &GroupSpec,
    services: &mut Services,
    job: Job,
    token: &CancellationToken,
) -> Option<Settle> {
    let Job {
        mut ctx,
        malformed,
        mut delivery,
        unhandled,
        ..
    } = job;
    if let Some(u) = unhandled {
        u.disarm();
    }
    if delivery.as_ref().is_some_and(Delivery::is_stale) {
        // Its partition went to another member in a rebalance: that member handles it.
        tracing::debug!(group = %spec.group, message_id = %ctx.message.id, "dropping a delivery whose partition was revoked");
        return None;
    }
    if let Some(reason) = malformed {
        return reject(spec, ctx, delivery, &reason, DeadReason::Malformed).await;
    }
    let Some((handler, pipeline)) = services.get(&ctx.message.name) else {
        if spec.options.on_unknown == UnknownEvent::DeadLetter {
            let reason = format!(
                "no handler for event `{}` in group `{}`",
                ctx.message.name, spec.group
            );
            return reject(spec, ctx, delivery, &reason, DeadReason::UnknownEvent).await;
        }
        telemetry::consumed(&consuming(spec, "", &ctx.topic), 1);
        tracing::debug!(group = %spec.group, event = %ctx.message.name, "no handler for this event; acked");
        return delivery.map(Settle::Ack);
    };
    ctx.handler = handler.clone();
    let _in_flight = spec.health.enter();
    let topic = ctx.topic.clone();
    let labels = consuming(spec, handler, &topic);
    telemetry::consumed(&labels, 1);
    let _metered = telemetry::InFlight::enter(labels.backend, &spec.group, handler, 1);
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
            messaging.system = labels.backend,
            messaging.destination.name = %ctx.topic,
            messaging.consumer.group.name = %spec.group,
            messaging.message.id = %ctx.message.id,
            messaging.operation.name = "process",
            messaging.operation.type = "process",
            messaging.destination.partition.id = tracing::field::Empty,
            messaging.kafka.offset = tracing::field::Empty,
            error.type = tracing::field::Empty,
        );
        if labels.backend == "kafka" && !span.is_disabled() {
            // A Kafka delivery's broker id is `partition:offset`.
            if let Some((partition, offset)) = ctx.broker_id.split_once(':') {
                span.record("messaging.destination.partition.id", partition);
                if let Ok(offset) = offset.parse::<i64>() {
                    span.record("messaging.kafka.offset", offset);
                }
            }
        }
        #[cfg(feature = "otel")]
        crate::otel::join(
            &span,
            &ctx.message.metadata.headers,
            spec.options.trace_as_child,
        );
        let run = async {
            match &mut *pipeline {
                Pipeline::Direct(call) => call(ctx.clone()).await,
                Pipeline::Tower(service) => {
                    service.ready().await?;
                    service.call(ctx.clone()).await
                }
            }
        };
        let started = Instant::now();
        let result = caught(run).instrument(span.clone()).await;
        telemetry::attempt(
            &labels,
            started.elapsed().as_secs_f64(),
            result.is_ok(),
            matches!(&result, Err(e) if e.is::<HandlerPanicked>()),
        );
        let Err(error) = result else {
            spec.health.handled();
            return delivery.map(Settle::Ack);
        };
        span.record("error.type", error_type(&error));
        let attempt = ctx.attempt;
        let (d, delay) = match after_failure(spec, handler, &ctx, delivery.take(), &error)
            .instrument(span)
            .await
        {
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
        ctx.attempt = attempt + 1;
        delivery = Some(d);
    }
}

/// What a failed attempt leads to.
enum Failed {
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
async fn after_failure(
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
                // No longer this consumer's: its next owner has it.
                Err(_) => Settle::Nack(d, Duration::ZERO),
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
async fn reject(
    spec: &GroupSpec,
    ctx: Context,
    delivery: Option<Delivery>,
    reason: &str,
    why: DeadReason,
) -> Option<Settle> {
    tracing::warn!(group = %spec.group, message_id = %ctx.message.id, reason, "dead-lettering the message");
    let labels = consuming(spec, "", &ctx.topic);
    telemetry::consumed(&labels, 1);
    let published = match &delivery {
        Some(d) => dead_letter_delivery(spec, "", d, ctx.attempt, reason).await,
        None => dead_letter(spec, "", &ctx.topic, &ctx.message, ctx.attempt, reason).await,
    };
    if let Err(e) = published {
        tracing::error!(group = %spec.group, error = %e.report(), "dead-letter publish failed; the message stays pending");
        return delivery.map(|d| Settle::Nack(d, Duration::ZERO));
    }
    telemetry::dead_lettered(&labels, why);
    delivery.map(Settle::Ack)
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
fn consuming<'a>(spec: &'a GroupSpec, handler: &'a str, topic: &'a str) -> Consuming<'a> {
    Consuming {
        backend: spec.publisher.system(),
        group: &spec.group,
        handler,
        topic,
    }
}

/// Publishes the dead letter of `d`. A publish that fails is tried again (backoff doubling from
/// 100 ms to 5 s), not the handler, which is done with the message: until it succeeds or `d`
/// is no longer this consumer's (a rebalance gave it to another member; the error is then
/// returned). Later messages of its key wait meanwhile, so order per key holds.
async fn dead_letter_delivery(
    spec: &GroupSpec,
    handler: &str,
    d: &Delivery,
    attempts: u32,
    reason: &str,
) -> Result<()> {
    let mut backoff = Duration::from_millis(100);
    loop {
        let e = match dead_letter(spec, handler, d.topic(), d.message(), attempts, reason).await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if d.is_stale() {
            return Err(e);
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
    use dead_letter_headers as h;
    let mut dead = message.clone();
    let headers = &mut dead.metadata.headers;
    headers.insert(h::REASON.into(), reason.into());
    headers.insert(h::HANDLER.into(), handler.into());
    headers.insert(h::GROUP.into(), spec.group.to_string());
    headers.insert(h::TOPIC.into(), topic.into());
    headers.insert(h::ATTEMPTS.into(), attempts.to_string());
    headers.insert(h::TIME.into(), crate::message::now_millis().to_string());
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
                Settle::Nack(d, delay) => nack(d, delay).await,
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
                    // Dropping them hands them back to their consumer, which delivers them
                    // again (at-least-once) instead of holding them as in flight.
                    tracing::error!(error = %e.report(), count = back.len(), "ack failed; the messages will be redelivered");
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
