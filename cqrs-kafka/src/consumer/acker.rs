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

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use cqrs_core::backend::LogPosition;
    use cqrs_core::{Message, StartFrom};
    use rdkafka::ClientConfig;

    use super::super::state::Kept;
    use super::*;
    use crate::access::Refusals;

    /// An acker of deliveries made in rebalance epoch 1, the member now in epoch 2 (a
    /// revocation came between), with a consumer that asks no broker anything here.
    fn acker_after_a_revocation() -> KafkaAcker {
        let (gate, _requests) = CommitGate::new(250, 10_000);
        let gate = Arc::new(gate);
        let offsets: Arc<Mutex<Offsets>> = Arc::default();
        let retries: Arc<Mutex<Redeliveries<Retry>>> = Arc::default();
        let epoch = Arc::new(AtomicU64::new(2));
        let ctx = Ctx {
            offsets: offsets.clone(),
            retries: retries.clone(),
            epoch: epoch.clone(),
            paused: Arc::new(AtomicBool::new(false)),
            rebalances: tokio::sync::watch::channel(0).0,
            start: StartFrom::Beginning,
            timeout: Duration::from_secs(1),
            unrecorded: Mutex::default(),
            gate: gate.clone(),
            refusals: Refusals::default(),
        };
        let consumer: BaseConsumer<Ctx> = ClientConfig::new()
            .set("bootstrap.servers", "127.0.0.1:1")
            .set("group.id", "g")
            .create_with_context(ctx)
            .unwrap();
        KafkaAcker {
            consumer: Arc::new(Mutex::new(Some(Arc::new(consumer)))),
            offsets,
            retries,
            epoch,
            of_epoch: 1,
            gate,
        }
    }

    fn delivery_at(acker: &Arc<KafkaAcker>, topic: &Arc<str>, offset: i64) -> Delivery {
        let acker: Arc<dyn Acknowledge> = acker.clone();
        Delivery::at(
            topic.clone(),
            Arc::new(Message::new("X", Vec::new())),
            1,
            LogPosition {
                partition: 0,
                offset,
            },
            acker,
        )
    }

    fn runs(handled: Option<&Handled>) -> Vec<(i64, i64)> {
        handled.map(|h| h.runs().collect()).unwrap_or_default()
    }

    /// Acks landing after their partition was lost (its commit could not be made, so what was
    /// handled was kept for the next assignment) join what was kept: if the partition comes back,
    /// they are passed over, not handled again (the broker-return test: 1,509-1,592 handlings of
    /// 1,508 events before).
    #[tokio::test]
    async fn acks_after_a_partition_was_lost_join_what_was_kept_of_it() {
        let acker = Arc::new(acker_after_a_revocation());
        let topic: Arc<str> = Arc::from("orders");
        let consumer = lock(&acker.consumer).clone().unwrap();
        lock(&consumer.context().unrecorded).insert(
            ("orders".to_owned(), 0),
            Kept {
                position: 10,
                above: Some(Handled::of([15])),
            },
        );
        let late = vec![
            delivery_at(&acker, &topic, 10),
            delivery_at(&acker, &topic, 11),
            delivery_at(&acker, &topic, 13),
        ];
        Delivery::ack_all(late).await.map_err(|(e, _)| e).unwrap();
        let kept = lock(&consumer.context().unrecorded);
        let kept = &kept[&("orders".to_owned(), 0)];
        assert_eq!(kept.position, 10);
        assert_eq!(
            runs(kept.above.as_ref()),
            [(10, 12), (13, 14), (15, 16)],
            "the late acks joined to what was kept"
        );
        assert_eq!(
            acker.gate.acked_count(),
            0,
            "not counted as this member's progress"
        );
    }

    /// Acks landing after their partition came back to this member (revoked, then assigned
    /// again in a later epoch) go into its new state: its records not handed out again yet are
    /// passed over.
    #[tokio::test]
    async fn acks_after_a_partition_came_back_pass_its_records_over() {
        let acker = Arc::new(acker_after_a_revocation());
        let topic: Arc<str> = Arc::from("orders");
        let mut again = PartitionState::new(2);
        // Handed out again up to 11 in the new assignment.
        again.next = Some(12);
        lock(&acker.offsets).insert((topic.clone(), 0), again);
        let late = vec![
            delivery_at(&acker, &topic, 12),
            delivery_at(&acker, &topic, 14),
        ];
        Delivery::ack_all(late).await.map_err(|(e, _)| e).unwrap();
        let mut offsets = lock(&acker.offsets);
        let state = offsets.get_mut(&Partition("orders", 0)).unwrap();
        assert!(state.handled_already(12), "12 is passed over");
        assert!(!state.handled_already(13), "13 was not handled");
        assert!(state.handled_already(14), "14 is passed over");
    }
}
