//! Concurrency above 1: workers take jobs from one queue, a settler acks in batches, and a key's
//! next message waits until the one before it is done.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::job::handle_job;
use super::settle::settle_loop;
use super::{GroupSpec, Job, Services, Settle};
use crate::{Error, Result};

/// The workers for concurrency above 1, and a settler.
///
/// Workers take jobs from one queue, so a slow message (or one waiting out its retry backoff)
/// holds back only the messages of its own key, never a whole share of the traffic. Order per
/// key holds because a key's next message becomes ready only when the one before it is done
/// ([`Ready`]).
pub(super) struct Lanes {
    ready: Arc<Ready>,
    /// Bounds the jobs held (waiting, ready or running), which bounds memory under a backlog.
    room: Arc<Semaphore>,
    tasks: JoinSet<()>,
    settler: tokio::task::JoinHandle<()>,
    /// Why a worker stopped the group (a panic, a message that could not be dead-lettered).
    failed: Arc<OnceLock<String>>,
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

/// What a job's order is kept within: a hash of its key, or of its shard (a broker's partition)
/// when it has none; `None` when neither (no order to keep).
pub(super) fn order_of(job: &Job) -> Option<u64> {
    match (&job.message().key, job.shard()) {
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
    }
}

impl Lanes {
    pub(super) fn start(spec: &Arc<GroupSpec>, n: usize, token: &CancellationToken) -> Self {
        let (settle_tx, settle_rx) = mpsc::channel::<Settle>(4096);
        let settler = tokio::spawn(settle_loop(settle_rx));
        let ready = Arc::new(Ready {
            state: std::sync::Mutex::default(),
            changed: Notify::new(),
        });
        let failed = Arc::new(OnceLock::new());
        let mut tasks = JoinSet::new();
        for _ in 0..n {
            tasks.spawn(worker_loop(
                spec.clone(),
                ready.clone(),
                settle_tx.clone(),
                token.clone(),
                failed.clone(),
            ));
        }
        Lanes {
            ready,
            room: Arc::new(Semaphore::new(n * spec.options.batch_size.max(16))),
            tasks,
            settler,
            failed,
        }
    }

    /// Room for one more job, waiting while the workers hold as many as they may.
    pub(super) async fn reserve(&self) -> Option<OwnedSemaphorePermit> {
        self.room.clone().acquire_owned().await.ok()
    }

    /// Queues a job with the room reserved for it.
    pub(super) fn push(&self, job: Job, room: OwnedSemaphorePermit) {
        let order = order_of(&job);
        self.ready.push(Queued {
            job,
            order,
            _room: room,
        });
    }

    /// Queues a job once there is room; `false` if the workers are gone.
    pub(super) async fn send(&mut self, job: Job) -> bool {
        match self.reserve().await {
            Some(room) => {
                self.push(job, room);
                true
            }
            None => false,
        }
    }

    /// Lets running handlers finish within the shutdown deadline and settles their outcome.
    pub(super) async fn finish(mut self, spec: &GroupSpec) -> Result<()> {
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
        match self.failed.get() {
            Some(why) => Err(Error::fatal("the group stopped", why.clone())),
            None => Ok(()),
        }
    }
}

async fn worker_loop(
    spec: Arc<GroupSpec>,
    ready: Arc<Ready>,
    settle: mpsc::Sender<Settle>,
    token: CancellationToken,
    failed: Arc<OnceLock<String>>,
) {
    let mut services = Services::of(&spec);
    while let Some(Queued { job, order, _room }) = ready.next().await {
        let outcome = if token.is_cancelled() && !job.is_acked() {
            // Queued but not started: hand it back for prompt redelivery. A message acked
            // before handling (at-most-once) still runs, within the shutdown deadline.
            job.into_delivery().map(|d| Settle::Nack(d, Duration::ZERO))
        } else {
            // Handlers' panics are caught inside; one that escapes is the engine's or a
            // backend's: its message goes back (dropped unsettled), its key is freed, and the
            // group stops with the panic as its error instead of waiting on that key for ever.
            use futures_util::FutureExt;
            match std::panic::AssertUnwindSafe(handle_job(&spec, &mut services, job, &token))
                .catch_unwind()
                .await
            {
                Ok(outcome) => outcome,
                Err(panic) => {
                    let why = crate::middleware::panic_message(&*panic);
                    tracing::error!(group = %spec.group, error = %why, "a worker panicked; stopping the group");
                    ready.done(order);
                    failed.get_or_init(|| format!("a worker panicked: {why}"));
                    token.cancel();
                    continue;
                }
            }
        };
        // Done (retries included): the key's next message may run.
        ready.done(order);
        match outcome {
            Some(Settle::Fail(d, why)) => {
                // Neither handled nor dead-lettered: it goes back, and the group stops.
                drop(d);
                failed.get_or_init(|| format!("a message could not be dead-lettered: {why}"));
                token.cancel();
            }
            Some(outcome) => {
                let _ = settle.send(outcome).await;
            }
            None => {}
        }
    }
}
