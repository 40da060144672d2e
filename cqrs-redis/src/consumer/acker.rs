//! Settling deliveries on Redis: acks (`XACK`, one pipeline per slot), nacks (a redelivery
//! time, the entry stays pending) and deliveries no longer this member's.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use cqrs_core::backend::{Acknowledge, Delivery};

use super::*;
use crate::conn::{by_slot, Conn};

pub(crate) struct RedisAcker {
    pub(super) conn: Conn,
    pub(super) group: String,
    pub(super) local: Arc<Mutex<Local>>,
}

#[async_trait]
impl Acknowledge for RedisAcker {
    async fn ack(&self, deliveries: &[Delivery]) -> cqrs_core::Result<()> {
        let mut by_stream: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for d in deliveries {
            by_stream.entry(d.topic()).or_default().push(d.broker_id());
        }
        // One pipeline per slot: a cluster routes a pipeline whole, to one master.
        for streams in by_slot(&self.conn, by_stream.keys().copied()) {
            let mut pipe = redis::pipe();
            for stream in streams {
                pipe.cmd("XACK")
                    .arg(stream)
                    .arg(&self.group)
                    .arg(&by_stream[stream])
                    .ignore();
            }
            pipe.query_async::<()>(&mut self.conn.clone())
                .await
                .map_err(|e| Error::redis("XACK", e))?;
        }
        let mut local = lock(&self.local);
        for d in deliveries {
            local
                .inflight
                .remove(&entry_key(d.topic_arc(), d.broker_id()));
        }
        Ok(())
    }

    fn release(&self, delivery: &Delivery) {
        let mut local = lock(&self.local);
        let key = entry_key(delivery.topic_arc(), delivery.broker_id());
        if local.inflight.remove(&key) {
            local.retries.push(
                Instant::now(),
                Retry {
                    stream: delivery.topic_arc().clone(),
                    id: delivery.broker_id().to_owned(),
                    attempt: delivery.attempt(),
                    min_idle: Duration::ZERO,
                },
            );
        }
    }

    async fn nack(&self, delivery: &Delivery, redeliver_after: Duration) -> cqrs_core::Result<()> {
        let mut local = lock(&self.local);
        local
            .inflight
            .remove(&entry_key(delivery.topic_arc(), delivery.broker_id()));
        local.retries.push(
            Instant::now() + redeliver_after,
            Retry {
                stream: delivery.topic_arc().clone(),
                id: delivery.broker_id().to_owned(),
                attempt: delivery.attempt(),
                min_idle: redeliver_after,
            },
        );
        Ok(())
    }
}
