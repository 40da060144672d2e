//! What each running group reports about itself: `RunningProcessor::status`.

use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

/// The state of one consumer group of a running processor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum GroupState {
    /// Fetching and handling messages.
    Running,
    /// The broker cannot be reached; retrying with backoff (see `last_error`).
    Reconnecting,
    /// Stopped after a shutdown.
    Stopped,
    /// Stopped by an error that retrying cannot fix (see `last_error`).
    Failed,
    /// It failed and waits to be started again ([`crate::processor::RestartPolicy`]).
    Restarting,
}

/// One consumer group's health, as [`crate::RunningProcessor::status`] reports it: enough for a
/// readiness probe (`state`) and a look at whether work moves (`handled`, `last_handled_at`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupStatus {
    /// The consumer group.
    pub group: String,
    /// What it is doing.
    pub state: GroupState,
    /// The last broker or group error, if any (kept after a recovery).
    pub last_error: Option<String>,
    /// Messages handled successfully since start.
    pub handled: u64,
    /// When the last one was.
    pub last_handled_at: Option<SystemTime>,
    /// Messages being handled now.
    pub in_flight: usize,
    /// Times it failed and was started again ([`crate::processor::RestartPolicy`]).
    pub restarts: u32,
}

const RUNNING: u8 = 0;
const RECONNECTING: u8 = 1;
const STOPPED: u8 = 2;
const FAILED: u8 = 3;
const RESTARTING: u8 = 4;

/// Shared between a group's tasks and its `RunningProcessor`; updated with atomics on the hot
/// path (one increment and one store per handled message).
#[derive(Debug, Default)]
pub(crate) struct Health {
    state: AtomicU8,
    last_error: Mutex<Option<String>>,
    handled: AtomicU64,
    /// Milliseconds from `origin` to the last handled message, plus one (0: none yet).
    last_handled_ms: AtomicU64,
    origin: Origin,
    in_flight: AtomicUsize,
    restarts: std::sync::atomic::AtomicU32,
    /// Jobs (messages taken from the broker) made, and those not finished yet: what the test kit
    /// reads to know nothing is in the group's hands (counted with the `testing` feature only:
    /// three atomic operations and a reference count a message that nothing else reads).
    #[cfg(feature = "testing")]
    jobs_made: AtomicU64,
    #[cfg(feature = "testing")]
    jobs_alive: AtomicUsize,
}

/// When a group's health was made, on the monotonic clock and on the system's: a message's
/// time is told from the monotonic reading its handler was timed with, not read again (the
/// system clock, read once a message, was a tenth of the engine's own time on Kafka). A system
/// clock set afterwards does not move the times reported.
#[derive(Debug)]
struct Origin(Instant, SystemTime);

impl Default for Origin {
    fn default() -> Self {
        Origin(Instant::now(), SystemTime::now())
    }
}

impl Health {
    /// Counts a message handled successfully at `at` (when its handler finished).
    pub(crate) fn handled(&self, at: Instant) {
        self.handled.fetch_add(1, Ordering::Relaxed);
        let ms = at.saturating_duration_since(self.origin.0).as_millis() as u64;
        self.last_handled_ms.store(ms + 1, Ordering::Relaxed);
    }

    /// Counts a job (a message taken from the broker, acked or not) until the guard drops.
    #[cfg(feature = "testing")]
    pub(crate) fn job(self: &std::sync::Arc<Self>) -> Outstanding {
        self.jobs_made.fetch_add(1, Ordering::SeqCst);
        self.jobs_alive.fetch_add(1, Ordering::SeqCst);
        Outstanding(self.clone())
    }

    /// Without the `testing` feature nothing reads the count: nothing to do.
    #[cfg(not(feature = "testing"))]
    pub(crate) fn job(self: &std::sync::Arc<Self>) -> Outstanding {
        Outstanding
    }

    /// Jobs made so far, and those alive.
    #[cfg(feature = "testing")]
    pub(crate) fn jobs(&self) -> (u64, usize) {
        (
            self.jobs_made.load(Ordering::SeqCst),
            self.jobs_alive.load(Ordering::SeqCst),
        )
    }

    /// Counts a message in flight until the guard drops.
    pub(crate) fn enter(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self)
    }

    pub(crate) fn running(&self) {
        self.state.store(RUNNING, Ordering::Relaxed);
    }

    pub(crate) fn reconnecting(&self, error: String) {
        self.set_error(error);
        self.state.store(RECONNECTING, Ordering::Relaxed);
    }

    pub(crate) fn stopped(&self, error: Option<String>) {
        let state = match error {
            Some(e) => {
                self.set_error(e);
                FAILED
            }
            None => STOPPED,
        };
        self.state.store(state, Ordering::Relaxed);
    }

    pub(crate) fn restarting(&self, error: String, restarts: u32) {
        self.set_error(error);
        self.restarts.store(restarts, Ordering::Relaxed);
        self.state.store(RESTARTING, Ordering::Relaxed);
    }

    fn set_error(&self, error: String) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(error);
    }

    pub(crate) fn status(&self, group: &str) -> GroupStatus {
        let state = match self.state.load(Ordering::Relaxed) {
            RUNNING => GroupState::Running,
            RECONNECTING => GroupState::Reconnecting,
            STOPPED => GroupState::Stopped,
            RESTARTING => GroupState::Restarting,
            _ => GroupState::Failed,
        };
        let ms = self.last_handled_ms.load(Ordering::Relaxed);
        GroupStatus {
            group: group.to_owned(),
            state,
            last_error: self
                .last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            handled: self.handled.load(Ordering::Relaxed),
            last_handled_at: (ms > 0).then(|| self.origin.1 + Duration::from_millis(ms - 1)),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            restarts: self.restarts.load(Ordering::Relaxed),
        }
    }
}

/// A job not finished; see [`Health::job`].
#[cfg(feature = "testing")]
pub(crate) struct Outstanding(std::sync::Arc<Health>);

/// A job not finished; see [`Health::job`] (nothing counted).
#[cfg(not(feature = "testing"))]
pub(crate) struct Outstanding;

#[cfg(feature = "testing")]
impl Drop for Outstanding {
    fn drop(&mut self) {
        self.0.jobs_alive.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A message being handled; see [`Health::enter`].
pub(crate) struct InFlight<'a>(&'a Health);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}
