//! The backend's producer: one count of records in flight per publish call, not a channel per
//! record.
//!
//! rdkafka's `FutureProducer` gives every record a `oneshot` channel and boxes its sender (two
//! allocations a record, freed after the delivery report, and a wake-up per report awaited).
//! Here a publish call's records share one [`InFlight`]: the delivery callback keeps the first
//! failure and counts the records down, and the call wakes once, when the count reaches zero.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;

use futures_util::task::AtomicWaker;
use rdkafka::error::KafkaError;
use rdkafka::producer::{DeliveryResult, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;

use crate::access::Watched;
use crate::lock;

/// The backend's producer.
pub(crate) type Producer = ThreadedProducer<Producing>;

/// The producer's context: librdkafka's global errors go to [`Watched`] (refusals kept), delivery
/// reports to the [`InFlight`] of the call that queued the record.
pub(crate) struct Producing {
    pub(crate) watched: Watched,
}

impl ClientContext for Producing {
    fn error(&self, error: KafkaError, reason: &str) {
        self.watched.error(error, reason);
    }
}

impl ProducerContext for Producing {
    type DeliveryOpaque = Arc<InFlight>;

    fn delivery(&self, result: &DeliveryResult<'_>, in_flight: Arc<InFlight>) {
        if let Err((e, _)) = result {
            lock(&in_flight.failed).get_or_insert_with(|| e.clone());
        }
        in_flight.settled();
    }
}

/// The records one publish call has queued and not yet seen reported, and the first failure
/// reported. It starts at one, held by the call while it queues ([`InFlight::wait`] gives it
/// back), so that it cannot reach zero before the last record is queued.
///
/// The one waiting call is woken through an [`AtomicWaker`], not a `tokio::sync::Notify`
/// (whose waiter list is locked to wait and to wake: ~250 instructions a publish of one event,
/// docs/benchmarks.md).
#[derive(Debug)]
pub(crate) struct InFlight {
    left: AtomicUsize,
    failed: Mutex<Option<KafkaError>>,
    done: AtomicWaker,
}

impl InFlight {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(InFlight {
            left: AtomicUsize::new(1),
            failed: Mutex::new(None),
            done: AtomicWaker::new(),
        })
    }

    /// One more record queued: its delivery report will count it down.
    pub(crate) fn queued(self: &Arc<Self>) -> Arc<Self> {
        self.left.fetch_add(1, Ordering::Relaxed);
        self.clone()
    }

    /// A record queued with [`InFlight::queued`] that the producer did not take after all.
    pub(crate) fn not_queued(&self) {
        self.left.fetch_sub(1, Ordering::Relaxed);
    }

    fn settled(&self) {
        // AcqRel: the failure stored before is seen by the waiter that sees zero.
        if self.left.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.done.wake();
        }
    }

    /// Gives back the call's own count and waits until every queued record is reported; the
    /// first failure reported, if any.
    pub(crate) async fn wait(&self) -> Result<(), KafkaError> {
        if self.left.fetch_sub(1, Ordering::AcqRel) != 1 {
            // The count is read again after the waker is registered: a last report between the
            // count above and the registration (its `wake` finding no waker) is not missed.
            std::future::poll_fn(|cx| {
                if self.left.load(Ordering::Acquire) == 0 {
                    return Poll::Ready(());
                }
                self.done.register(cx.waker());
                if self.left.load(Ordering::Acquire) == 0 {
                    Poll::Ready(())
                } else {
                    Poll::Pending
                }
            })
            .await;
        }
        match lock(&self.failed).take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rdkafka::types::RDKafkaErrorCode;

    use super::*;

    #[tokio::test]
    async fn a_call_waits_for_every_record_it_queued_and_gets_the_first_failure() {
        let in_flight = InFlight::new();
        let records: Vec<_> = (0..3).map(|_| in_flight.queued()).collect();
        let waiting = tokio::spawn({
            let in_flight = in_flight.clone();
            async move { in_flight.wait().await }
        });
        let first = KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut);
        lock(&records[0].failed).get_or_insert_with(|| first.clone());
        records[0].settled();
        records[1].settled();
        // The test's runtime has one thread: the waiting task runs until it waits, here.
        tokio::task::yield_now().await;
        // Two of three reported: the call still waits, and only the last report wakes it.
        assert!(!waiting.is_finished());
        records[2].settled();
        let result = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the call is woken by the last report")
            .expect("the waiting task does not panic");
        assert_eq!(result.map_err(|e| e.to_string()), Err(first.to_string()));
    }

    #[tokio::test]
    async fn reports_that_come_before_the_call_waits_are_not_missed() {
        let in_flight = InFlight::new();
        let record = in_flight.queued();
        record.settled();
        tokio::time::timeout(Duration::from_secs(5), in_flight.wait())
            .await
            .expect("nothing left to wait for")
            .expect("no failure reported");
        // A call that queued nothing does not wait either.
        tokio::time::timeout(Duration::from_secs(5), InFlight::new().wait())
            .await
            .expect("nothing queued")
            .expect("no failure");
    }
}
