//! Settling deliveries: acks store offsets (never past one still pending), nacks wait for their
//! redelivery time; a delivery of a partition revoked since is stale.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use cqrs_core::backend::{Acknowledge, Delivery};
use cqrs_core::redelivery::Redeliveries;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::TopicPartitionList;
use tokio::time::Instant;

use super::handled::Handled;
use super::rebalance::Ctx;
use super::state::{add_position, lock, Offsets, Partition, PartitionState, Retry};
use crate::commit_gate::CommitGate;
use crate::error::Error;

pub(crate) struct KafkaAcker {
    /// Taken out by `close`, so that the consumer leaves its group before `close` returns.
    /// Shared by the ackers of every epoch.
    pub(super) consumer: Arc<Mutex<Option<Arc<BaseConsumer<Ctx>>>>>,
    pub(super) offsets: Arc<Mutex<Offsets>>,
    pub(super) retries: Arc<Mutex<Redeliveries<Retry>>>,
    /// The consumer's rebalance epoch, and the one this acker's deliveries were made in.
    pub(super) epoch: Arc<AtomicU64>,
    pub(super) of_epoch: u64,
    /// Shared by every epoch's acker.
    pub(super) gate: Arc<CommitGate>,
}

impl KafkaAcker {
    pub(super) fn for_epoch(&self, epoch: u64) -> Self {
        KafkaAcker {
            consumer: self.consumer.clone(),
            offsets: self.offsets.clone(),
            retries: self.retries.clone(),
            epoch: self.epoch.clone(),
            of_epoch: epoch,
            gate: self.gate.clone(),
        }
    }

    /// Delivers `delivery` again from `due` on.
    pub(super) fn retry_at(&self, delivery: &Delivery, partition: i32, offset: i64, due: Instant) {
        lock(&self.retries).push(
            due,
            Retry {
                topic: delivery.topic_arc().clone(),
                partition,
                offset,
                message: super::poll::detached(delivery.message_arc()),
                attempt: delivery.attempt(),
            },
        );
    }

    /// The state of `partition` of `topic` if the deliveries of this acker still belong to its
    /// assignment: not revoked since they were made (and maybe assigned again, from the
    /// committed offset).
    fn owned<'a>(
        &self,
        offsets: &'a mut Offsets,
        topic: &Arc<str>,
        partition: i32,
    ) -> Option<&'a mut PartitionState> {
        offsets
            .get_mut(&Partition(topic, partition))
            .filter(|s| s.owns(self.of_epoch))
    }

    /// Notes `handled`, acked on `partition` of `topic` after this acker's assignment of it was
    /// revoked: in its state if this member holds it again (its records not handed out again
    /// yet are passed over), else with what this member kept of it when its commit could not be
    /// made (`Ctx::unrecorded`, for the next assignment). A partition revoked with a commit
    /// keeps nothing: it most likely went to another member.
    fn handled_after_revocation(
        &self,
        offsets: &mut Offsets,
        consumer: &BaseConsumer<Ctx>,
        topic: &Arc<str>,
        partition: i32,
        handled: &Handled,
    ) {
        if handled.is_empty() {
            return;
        }
        if let Some(state) = offsets.get_mut(&Partition(topic, partition)) {
            state.handled_before(handled);
            return;
        }
        let mut kept = lock(&consumer.context().unrecorded);
        if let Some(kept) = kept.get_mut(&(topic.to_string(), partition)) {
            kept.above = Handled::joined(kept.above.take(), Some(handled.clone()));
        }
    }

    /// Whether `delivery`'s partition still belongs to this acker's assignment and `check`
    /// holds for its state.
    fn owns(
        &self,
        delivery: &Delivery,
        partition: i32,
        check: impl FnOnce(&PartitionState) -> bool,
    ) -> bool {
        let mut offsets = lock(&self.offsets);
        self.owned(&mut offsets, delivery.topic_arc(), partition)
            .is_some_and(|s| check(s))
    }
}

/// Says which partitions of `tpl` librdkafka refused to store offsets for (the others were
/// stored), with what librdkafka holds as assigned: their progress is not recorded.
fn warn_refused(consumer: &BaseConsumer<Ctx>, tpl: &TopicPartitionList) {
    let refused: Vec<String> = tpl
        .elements()
        .iter()
        .filter_map(|e| {
            let error = e.error().err()?;
            Some(format!(
                "{}[{}] at {:?}: {error}",
                e.topic(),
                e.partition(),
                e.offset()
            ))
        })
        .collect();
    if refused.is_empty() {
        return;
    }
    let assigned: Vec<String> = consumer
        .assignment()
        .map(|a| {
            a.elements()
                .iter()
                .map(|e| format!("{}[{}]", e.topic(), e.partition()))
                .collect()
        })
        .unwrap_or_default();
    tracing::warn!(
        ?refused,
        ?assigned,
        "storing some offsets refused: their progress is not recorded"
    );
}

/// The partition and offset of a delivery this consumer made (each carries its position).
fn position(d: &Delivery) -> cqrs_core::Result<(i32, i64)> {
    d.position()
        .map(|p| (p.partition, p.offset))
        .ok_or_else(|| {
            cqrs_core::Error::fatal(
                "a Kafka delivery without a partition and offset",
                d.broker_id().to_owned(),
            )
        })
}

#[async_trait]
impl Acknowledge for KafkaAcker {
    async fn ack(&self, deliveries: &[Delivery]) -> cqrs_core::Result<()> {
        let Some(consumer) = lock(&self.consumer).clone() else {
            return Err(cqrs_core::Error::Closed);
        };
        let mut tpl = TopicPartitionList::new();
        let mut acked = 0;
        {
            let mut offsets = lock(&self.offsets);
            let mut touched: Vec<(Arc<str>, i32)> = Vec::new();
            // Deliveries come in runs of one partition: its state is looked up once a run.
            let partition_of = |d: &Delivery| d.position().map(|p| p.partition);
            let runs = deliveries.chunk_by(|a, b| {
                partition_of(a) == partition_of(b) && Arc::ptr_eq(a.topic_arc(), b.topic_arc())
            });
            for run in runs {
                let (partition, _) = position(&run[0])?;
                let topic = run[0].topic_arc();
                // A partition revoked since: its next owner (maybe this member again) reads it
                // from the committed offset. What was handled stays handled, though: this member
                // passes it over if the partition comes back to it.
                let Some(state) = self.owned(&mut offsets, topic, partition) else {
                    let handled =
                        Handled::of(run.iter().filter_map(|d| d.position()).map(|p| p.offset));
                    self.handled_after_revocation(
                        &mut offsets,
                        &consumer,
                        topic,
                        partition,
                        &handled,
                    );
                    continue;
                };
                for d in run {
                    state.pending.remove(&position(d)?.1);
                    acked += 1;
                }
                let key = (topic.clone(), partition);
                if !touched.contains(&key) {
                    touched.push(key);
                }
            }
            for key in touched {
                if let Some(state) = offsets.get_mut(&key) {
                    // With the offsets above it handled already, if any (`Handled`).
                    add_position(&mut tpl, &key.0, key.1, state);
                }
            }
            if tpl.count() == 0 {
                return Ok(());
            }
            // Stored under the lock: a revocation (which takes it first) cannot come between
            // the check above and the store, so nothing is stored for a partition given away.
            match consumer.store_offsets(&tpl) {
                // librdkafka answers an error only when it stored none of them: the others say
                // theirs in the list itself.
                Ok(()) => warn_refused(&consumer, &tpl),
                Err(KafkaError::StoreOffset(RDKafkaErrorCode::State)) => {
                    // librdkafka does not hold these partitions as assigned, though this
                    // member does: their progress is not recorded. Said, not silent: a soak
                    // run (docs/reliability.md) re-handled ~4,000 events of one member whose
                    // progress went unrecorded for 7 s with no commit refused.
                    tracing::warn!(
                        acked,
                        partitions = tpl.count(),
                        "storing offsets refused (Local: Erroneous state): this progress is not recorded"
                    );
                    warn_refused(&consumer, &tpl);
                    return Ok(());
                }
                Err(e) => return Err(Error::kafka("storing offsets", e).into()),
            }
        }
        self.gate.acked(acked);
        Ok(())
    }

    async fn nack(&self, delivery: &Delivery, redeliver_after: Duration) -> cqrs_core::Result<()> {
        let (partition, offset) = position(delivery)?;
        if self.owns(delivery, partition, |_| true) {
            // The offset stays pending, so nothing at or after it is committed until it is
            // handled.
            self.retry_at(
                delivery,
                partition,
                offset,
                Instant::now() + redeliver_after,
            );
        }
        Ok(())
    }

    fn must_wait(&self, _delivery: &Delivery) -> bool {
        // A broker connection lost, no commit succeeded since (`CommitGate::is_down`).
        self.gate.is_down()
    }

    fn is_stale(&self, delivery: &Delivery) -> bool {
        // Every assignment and revocation starts an epoch: in the one its delivery was made in,
        // the partition is still this member's (checked when the delivery was made), with no
        // lock taken. Asked before every handler call, so this is the common case.
        if self.epoch.load(Ordering::SeqCst) == self.of_epoch {
            return false;
        }
        let Ok((partition, _)) = position(delivery) else {
            return false;
        };
        !self.owns(delivery, partition, |_| true)
    }

    fn release(&self, delivery: &Delivery) {
        let Ok((partition, offset)) = position(delivery) else {
            return;
        };
        // Only while this member still owns the partition; otherwise its new owner reads it.
        if self.owns(delivery, partition, |s| s.pending.contains(&offset)) {
            self.retry_at(delivery, partition, offset, Instant::now());
        }
    }
}
