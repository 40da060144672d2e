//! The loop that runs one consumer group: fetch, dispatch to lanes, settle with the broker.
//!
//! One policy per file:
//! - [`group`]: runs a group (its fetch loop, and jobs made of what it fetched);
//! - [`inline`]: handles a fetched batch in order in the group's task (concurrency 1);
//! - [`lanes`]: workers for concurrency above 1, order per key kept;
//! - [`batch`]: batch handlers, a fetched batch per call;
//! - [`job`]: one message through its handler, with its retries;
//! - [`failure`]: what a failed attempt leads to, and dead letters;
//! - [`settle`]: acks and nacks with the broker.

mod batch;
mod failure;
mod group;
mod inline;
mod job;
mod lanes;
mod settle;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::health::Health;
use super::options::HandlerOptions;
use crate::backend::{Delivery, Publisher, Subscriber, Subscription};
use crate::handler::{BatchPipeline, Context, Pipeline, Runner};
use crate::telemetry;

pub(crate) use group::run_group;

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
    /// Its metrics' instruments, per handler and topic.
    pub meters: crate::telemetry::Meters,
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
            .unwrap_or_else(|| crate::dead_letter::topic_of(&self.group))
    }
}

/// One message for a runner to handle.
pub(super) struct Job {
    taken: Taken,
    /// Counts the job in its group's health until it is finished (the test kit's idleness).
    outstanding: super::health::Outstanding,
}

/// A job's message: its delivery, or (acked before handling) what was kept of it.
///
/// The context is made when the job runs, by the runner that runs it: a job made with it was
/// ~350 bytes, moved several times a message (into the list of jobs, into the handling future).
enum Taken {
    Delivered(Delivery),
    /// Boxed: at-most-once is the rarer mode, and a job moves as often as it runs.
    Acked(Box<Acked>),
}

/// A message acked before handling (at-most-once): its delivery is settled, so its context,
/// shard and malformation are kept, and what reports its loss if it is dropped before it runs
/// (the shutdown deadline passed), so the loss is logged, never silent.
struct Acked {
    ctx: Context,
    shard: Option<u32>,
    malformed: Option<String>,
    /// Taken (disarmed) when the job starts.
    unhandled: Option<Unhandled>,
}

impl Job {
    fn delivered(d: Delivery, spec: &GroupSpec) -> Job {
        Job {
            taken: Taken::Delivered(d),
            outstanding: spec.health.job(),
        }
    }

    /// A job of a message acked before handling, with the context its delivery gave.
    fn acked(
        ctx: Context,
        shard: Option<u32>,
        malformed: Option<String>,
        outstanding: super::health::Outstanding,
        group: &Arc<str>,
    ) -> Job {
        let unhandled = Unhandled {
            group: group.clone(),
            message_id: ctx.message.id.clone(),
        };
        Job {
            taken: Taken::Acked(Box::new(Acked {
                ctx,
                shard,
                malformed,
                unhandled: Some(unhandled),
            })),
            outstanding,
        }
    }

    pub(super) fn message(&self) -> &crate::Message {
        match &self.taken {
            Taken::Delivered(d) => d.message(),
            Taken::Acked(a) => &a.ctx.message,
        }
    }

    /// The broker-side shard, which orders messages without a key.
    pub(super) fn shard(&self) -> Option<u32> {
        match &self.taken {
            Taken::Delivered(d) => d.shard(),
            Taken::Acked(a) => a.shard,
        }
    }

    /// Why the entry could not be read as a message.
    pub(super) fn malformed(&self) -> Option<&str> {
        match &self.taken {
            Taken::Delivered(d) => d.malformed(),
            Taken::Acked(a) => a.malformed.as_deref(),
        }
    }

    /// Whether its delivery is stale (its partition went to another member since).
    pub(super) fn is_stale(&self) -> bool {
        matches!(&self.taken, Taken::Delivered(d) if d.is_stale())
    }

    /// Whether its handler should wait before it starts (`Acknowledge::must_wait`): never
    /// once it was acked before handling (at-most-once).
    pub(super) fn must_wait(&self) -> bool {
        matches!(&self.taken, Taken::Delivered(d) if d.must_wait())
    }

    /// Whether it was acked before handling (at-most-once).
    pub(super) fn is_acked(&self) -> bool {
        matches!(self.taken, Taken::Acked(_))
    }

    /// Its delivery, to hand back unhandled; `None` when it was acked before handling.
    pub(super) fn into_delivery(self) -> Option<Delivery> {
        match self.taken {
            Taken::Delivered(d) => Some(d),
            Taken::Acked(_) => None,
        }
    }

    /// Its context, for a handler to take: made on `services`' names for a delivery (which
    /// stays in the job until it is settled); a copy of the one kept for a message acked
    /// before handling, which from now on no longer reports its loss: it runs.
    pub(super) fn context(&mut self, services: &mut Services) -> Context {
        match &mut self.taken {
            Taken::Delivered(d) => services.context(d),
            Taken::Acked(a) => {
                if let Some(unhandled) = a.unhandled.take() {
                    unhandled.disarm();
                }
                a.ctx.clone()
            }
        }
    }

    /// Its context again after a failed attempt (numbered `attempt`) of `handler`: made from
    /// its delivery, or a copy of the one kept for a message acked before handling.
    pub(super) fn context_again(
        &self,
        group: &Arc<str>,
        handler: &Arc<str>,
        attempt: u32,
    ) -> Context {
        match &self.taken {
            Taken::Delivered(d) => context_again(d, group, handler, attempt),
            Taken::Acked(a) => {
                let mut kept = a.ctx.clone();
                kept.handler = handler.clone();
                kept.attempt = attempt;
                kept
            }
        }
    }

    /// Its delivery (`None`: acked before handling), and its count in the group's health, to
    /// keep until the message is done with.
    pub(super) fn into_parts(self) -> (Option<Delivery>, super::health::Outstanding) {
        match self.taken {
            Taken::Delivered(d) => (Some(d), self.outstanding),
            Taken::Acked(_) => (None, self.outstanding),
        }
    }
}

/// Logs an at-most-once message that was acked and will never be handled.
struct Unhandled {
    group: Arc<str>,
    message_id: cqrs_core::Text,
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

pub(super) enum Settle {
    Ack(Delivery),
    Nack(Delivery, Duration),
    /// Neither handled nor dead-lettered: its dead letter was refused for good (larger than
    /// the broker takes, a topic it will not create). The group stops with this error rather
    /// than handle the message again and again; the message stays pending.
    Fail(Delivery, String),
}

/// Each runner's own handles on the handler pipelines, cloned once rather than per message,
/// with the instruments each handler used last. A group has a handful of handlers: a list
/// compared by name beats hashing.
///
/// It holds its own copies of the names its contexts carry (the group, each handler, the
/// topics): a context counts references on them, up when made and down when dropped, and on
/// copies shared with the group's other tasks (the topic's, made by the backend's fetch) every
/// count moved a cache line between cores, which cost more than the rest of making a context.
pub(super) struct Services {
    routes: Vec<(String, Arc<str>, Runner, telemetry::Last)>,
    group: Arc<str>,
    no_handler: Arc<str>,
    /// A delivery's topic name and this runner's copy of it.
    topics: Vec<(Arc<str>, Arc<str>)>,
}

impl Services {
    /// The most topics whose names a runner keeps copies of.
    const TOPICS_KEPT: usize = 8;

    pub(super) fn of(spec: &GroupSpec) -> Self {
        Services {
            routes: spec
                .routes
                .iter()
                .map(|(name, r)| {
                    let last = telemetry::Last::default();
                    let handler = Arc::from(&*r.handler);
                    (name.clone(), handler, r.service.runner(), last)
                })
                .collect(),
            group: Arc::from(&*spec.group),
            no_handler: Arc::from(&*spec.no_handler),
            topics: Vec::new(),
        }
    }

    /// The handler of `event`, its pipeline and its instruments' memory
    /// ([`telemetry::Meters::of_cached`]).
    pub(super) fn get(
        &mut self,
        event: &str,
    ) -> Option<(&Arc<str>, &mut Runner, &mut telemetry::Last)> {
        self.routes
            .iter_mut()
            .find(|(name, ..)| name == event)
            .map(|(_, handler, pipeline, last)| (&*handler, pipeline, last))
    }

    /// The context of a delivery, before a handler takes it, on this runner's copies of the
    /// names.
    pub(super) fn context(&mut self, d: &Delivery) -> Context {
        let theirs = d.topic_arc();
        let topic = match self
            .topics
            .iter()
            .find(|(t, _)| Arc::ptr_eq(t, theirs) || **t == **theirs)
        {
            Some((_, ours)) => ours.clone(),
            None if self.topics.len() < Self::TOPICS_KEPT => {
                let ours: Arc<str> = Arc::from(&**theirs);
                self.topics.push((theirs.clone(), ours.clone()));
                ours
            }
            // A group reading many topics (a pattern): looked up in a list, they would cost
            // more than they save.
            None => theirs.clone(),
        };
        context(d, topic, self.group.clone(), self.no_handler.clone())
    }
}

/// The context of `handler`'s attempt numbered `attempt` at a delivery, made again after the
/// one before failed (on the delivery's own copy of its topic's name).
pub(super) fn context_again(
    d: &Delivery,
    group: &Arc<str>,
    handler: &Arc<str>,
    attempt: u32,
) -> Context {
    let mut made = context(d, d.topic_arc().clone(), group.clone(), handler.clone());
    made.attempt = attempt;
    made
}

/// The context of a delivery on the names given (`topic`, the group's and the handler's).
pub(super) fn context(
    d: &Delivery,
    topic: Arc<str>,
    group: Arc<str>,
    handler: Arc<str>,
) -> Context {
    let (broker_id, position) = d.broker_id_cell();
    Context {
        message: d.message_arc().clone(),
        topic,
        group,
        handler,
        attempt: d.attempt(),
        broker_id,
        position,
    }
}
