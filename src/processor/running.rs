//! Starting a processor's groups, and the handle on them while they run.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use tokio::task::JoinSet;

use super::engine::{self, GroupSpec};
use super::health::Health;
use super::{GroupState, GroupStatus};
use crate::backend::Consumer;
use crate::{Error, Result};

/// Subscribes every group, then runs each in its own task.
pub(super) async fn start(
    service: &str,
    specs: Vec<GroupSpec>,
    token: CancellationToken,
) -> Result<RunningProcessor> {
    let token = token.child_token();
    let mut tasks = JoinSet::new();
    let mut health = Vec::with_capacity(specs.len());
    // What the look for abandoned groups needs, taken before the specs go to their tasks.
    let read: Vec<Read> = specs
        .iter()
        .map(|s| Read {
            group: s.group.clone(),
            topics: s.topics.clone(),
            subscriber: s.subscriber.clone(),
        })
        .collect();
    // Looked for while the groups subscribe and run, not before: on Kafka the listing takes
    // 100-500 ms, which every start waited for, and members of one service started together
    // began handling that far apart (docs/benchmarks.md).
    let abandoned = tokio::spawn({
        let service = service.to_owned();
        async move { abandoned_groups(&service, &read).await }
    });
    for spec in specs {
        let consumer = match subscribe(&spec, &token).await {
            Ok(c) => c,
            Err(e) => {
                abandoned.abort();
                token.cancel();
                while tasks.join_next().await.is_some() {}
                return Err(e);
            }
        };
        tracing::debug!(group = %spec.group, topics = ?spec.topics, consumer = %spec.consumer_name, "subscribed");
        let group = spec.group.clone();
        health.push((group.clone(), spec.health.clone()));
        let run = supervise(Arc::new(spec), consumer, token.clone());
        tasks.spawn(async move { (group, run.await) });
    }
    let warnings = match abandoned.await {
        Ok(w) => w,
        // A panic, as if it had run in this task (it is aborted only on the way out above).
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    };
    for warning in &warnings {
        tracing::warn!("{warning}");
    }
    Ok(RunningProcessor {
        tasks,
        token,
        warnings,
        health,
    })
}

/// What [`abandoned_groups`] reads of a group's spec.
struct Read {
    group: Arc<str>,
    topics: Vec<String>,
    subscriber: Arc<dyn crate::backend::Subscriber>,
}

/// Groups named like this service's (`service.` then anything) on the topics of `specs` that no
/// spec uses and that still hold messages, each described in a sentence naming the groups that
/// read the topic now.
async fn abandoned_groups(service: &str, specs: &[Read]) -> Vec<String> {
    let ours: std::collections::HashSet<&str> = specs.iter().map(|s| &*s.group).collect();
    let prefix = format!("{service}.");
    let mut seen = std::collections::HashSet::new();
    let mut warnings = Vec::new();
    for spec in specs {
        for topic in &spec.topics {
            if !seen.insert(topic.as_str()) {
                continue;
            }
            let groups = match spec.subscriber.groups(topic, &prefix).await {
                Ok(groups) => groups,
                Err(e) => {
                    tracing::debug!(topic, error = %e.report(), "cannot list the topic's groups");
                    continue;
                }
            };
            for g in groups {
                let left = g.pending + g.lag.unwrap_or(0);
                if left == 0 || !g.group.starts_with(&prefix) || ours.contains(g.group.as_str()) {
                    continue;
                }
                let readers: Vec<&str> = specs
                    .iter()
                    .filter(|s| s.topics.contains(topic))
                    .map(|s| &*s.group)
                    .collect();
                warnings.push(format!(
                    "consumer group `{}` on `{topic}` holds {} pending and {} undelivered \
                     messages, but no handler of service `{service}` reads it now (this \
                     processor reads `{topic}` as {}): if a handler was renamed, those \
                     messages wait in the old group; handle them, or delete the group",
                    g.group,
                    g.pending,
                    g.lag
                        .map_or_else(|| "an unknown number of".to_owned(), |n| n.to_string()),
                    readers
                        .iter()
                        .map(|r| format!("`{r}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
    }
    warnings
}

/// Runs one group; when it fails and its options say so, subscribes and runs it again after
/// the restart policy's backoff, until the restarts run out or `token` is cancelled.
async fn supervise(
    spec: Arc<GroupSpec>,
    consumer: Box<dyn Consumer>,
    token: CancellationToken,
) -> Result<()> {
    let mut consumer = Some(consumer);
    let mut restarts = 0u32;
    loop {
        let c = match consumer.take() {
            Some(c) => c,
            None => {
                let c = subscribe(&spec, &token).await?;
                spec.health.running();
                c
            }
        };
        let Err(e) = engine::run_group(spec.clone(), c, token.clone()).await else {
            return Ok(());
        };
        let policy = match spec.options.restart {
            Some(p) if restarts < p.max_restarts && !token.is_cancelled() => p,
            _ => return Err(e),
        };
        restarts += 1;
        let delay = policy.delay(restarts);
        tracing::warn!(group = %spec.group, error = %e.report(), restarts, max = policy.max_restarts, "the group failed; restarting it in {delay:?}");
        spec.health.restarting(e.report(), restarts);
        tokio::select! {
            _ = token.cancelled() => return Err(e),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Subscribes one group, retrying errors worth retrying (a connection cut, a broker restarting)
/// with backoff until `token` is cancelled; fails at once on the others (a bad address, a
/// refused login, an invalid topic).
async fn subscribe(spec: &GroupSpec, token: &CancellationToken) -> Result<Box<dyn Consumer>> {
    let subscription = spec.subscription();
    let mut backoff = std::time::Duration::from_millis(100);
    loop {
        match spec.subscriber.subscribe(&subscription).await {
            Ok(c) => return Ok(c),
            Err(e) if e.is_retryable() && !token.is_cancelled() => {
                tracing::warn!(group = %spec.group, error = %e.report(), "subscribing failed; retrying in {backoff:?}");
                tokio::select! {
                    _ = token.cancelled() => return Err(e),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
            }
            Err(e) => return Err(e),
        }
    }
}

/// A started processor: its groups are subscribed and running.
///
/// Dropping it leaves the groups running until the token is cancelled, with nobody to see their
/// errors: keep it and call [`RunningProcessor::wait`] or [`RunningProcessor::shutdown`].
#[derive(Debug)]
#[must_use = "the processor runs until its token is cancelled; call `wait()` or `shutdown()` to see its errors"]
pub struct RunningProcessor {
    tasks: JoinSet<(Arc<str>, Result<()>)>,
    token: CancellationToken,
    warnings: Vec<String>,
    health: Vec<(Arc<str>, Arc<Health>)>,
}

impl RunningProcessor {
    /// What looked wrong at start, also logged as warnings: a consumer group of this service
    /// on one of its topics that no handler reads any more but that still holds messages (the
    /// sign of a renamed handler, whose new group started from its own start position).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Each group's health: running, reconnecting to the broker, stopped or failed, with the
    /// last error, how many messages it handled and when the last one was, and how many are in
    /// flight. For a readiness probe: [`RunningProcessor::is_ready`].
    pub fn status(&self) -> Vec<GroupStatus> {
        self.health
            .iter()
            .map(|(group, health)| health.status(group))
            .collect()
    }

    /// Jobs its groups made so far, and those not finished (the test kit's idleness).
    #[cfg(feature = "testing")]
    pub(crate) fn jobs(&self) -> (u64, usize) {
        self.health.iter().fold((0, 0), |(made, alive), (_, h)| {
            let (m, a) = h.jobs();
            (made + m, alive + a)
        })
    }

    /// Whether every group is running (none reconnecting, stopped or failed).
    pub fn is_ready(&self) -> bool {
        self.status().iter().all(|s| s.state == GroupState::Running)
    }

    /// The token that stops this processor (a child of the one it was started with).
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// Waits until every group has stopped. If one fails, the others are stopped too. One
    /// group's error is returned as it is; when several fail, [`Error::Groups`] holds each
    /// group's error.
    pub async fn wait(mut self) -> Result<()> {
        let mut failed: Vec<(String, Error)> = Vec::new();
        while let Some(joined) = self.tasks.join_next().await {
            let (group, result) = match joined {
                Ok((group, r)) => (group.to_string(), r),
                Err(e) => (
                    "(unknown)".to_owned(),
                    Err(Error::fatal("a consumer group task panicked", e)),
                ),
            };
            if let Err(e) = result {
                self.token.cancel();
                failed.push((group, e));
            }
        }
        match failed.len() {
            0 => Ok(()),
            1 => Err(failed.remove(0).1),
            _ => Err(Error::Groups(failed)),
        }
    }

    /// Stops fetching, lets running handlers finish (within each handler's shutdown timeout),
    /// settles what finished and returns.
    pub async fn shutdown(self) -> Result<()> {
        self.token.cancel();
        self.wait().await
    }
}
