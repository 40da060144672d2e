//! The backend's producer: one count of records in flight per publish call, not a channel per
//! record.
//!
//! rdkafka's `FutureProducer` gives every record a `oneshot` channel and boxes its sender (two
//! allocations a record, freed after the delivery report, and a wake-up per report awaited).
//! Here a publish call's records share one [`InFlight`]: the delivery callback keeps the first
//! failure and counts the records down, and the call wakes once, when the count reaches zero.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rdkafka::error::KafkaError;
use rdkafka::producer::{DeliveryResult, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;
use tokio::sync::Notify;

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
#[derive(Debug)]
pub(crate) struct InFlight {
    left: AtomicUsize,
    failed: Mutex<Option<KafkaError>>,
    done: Notify,
}

impl InFlight {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(InFlight {
            left: AtomicUsize::new(1),
            failed: Mutex::new(None),
            done: Notify::new(),
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
            self.done.notify_one();
        }
    }

    /// Gives back the call's own count and waits until every queued record is reported; the
    /// first failure reported, if any.
    pub(crate) async fn wait(&self) -> Result<(), KafkaError> {
        if self.left.fetch_sub(1, Ordering::AcqRel) != 1 {
            // `notify_one` keeps a permit when no one waits yet: a report between the count
            // and this await is not missed.
            self.done.notified().await;
        }
        match lock(&self.failed).take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}
