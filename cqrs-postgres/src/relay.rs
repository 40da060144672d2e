//! The relay: forwards committed messages to a backend, one relay at a time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cqrs_core::backend::Publisher;
use cqrs_core::Message;
use sqlx::postgres::PgListener;
use sqlx::{Connection, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use crate::cursor::Cursor;
use crate::store::{OutboxStore, Stored};
use crate::{Error, Result};

/// Forwards the messages committed to an [`OutboxStore`] to a backend, in the order they were
/// stored, and deletes each batch once the backend has taken it.
pub struct OutboxRelay {
    pool: PgPool,
    store: OutboxStore,
    publisher: Arc<dyn Publisher>,
    batch: usize,
    poll: Duration,
}

impl std::fmt::Debug for OutboxRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboxRelay")
            .field("schema", &self.store.schema_name())
            .field("batch", &self.batch)
            .field("poll", &self.poll)
            .finish_non_exhaustive()
    }
}

impl OutboxRelay {
    /// A relay from `store` (in `pool`'s database) to `publisher`: batches of 500, polling every
    /// second besides notifications.
    pub fn new(pool: PgPool, store: OutboxStore, publisher: impl Publisher) -> Self {
        OutboxRelay {
            pool,
            store,
            publisher: Arc::new(publisher),
            batch: 500,
            poll: Duration::from_secs(1),
        }
    }

    /// The most messages sent and deleted at once.
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch = n.max(1);
        self
    }

    /// How often the relay looks for messages when no notification came (and how often a relay
    /// waiting for its turn asks for it).
    pub fn poll_interval(mut self, every: Duration) -> Self {
        self.poll = every;
        self
    }

    /// Runs until `token` is cancelled: waits for its turn (another relay of the same outbox
    /// may be sending), then sends. A database or broker error is retried with backoff
    /// (1 s doubling to 30 s), taking a new connection; nothing is deleted that was not sent.
    pub async fn run(self, token: CancellationToken) -> Result<()> {
        let mut backoff = Duration::from_secs(1);
        while !token.is_cancelled() {
            match self.lead(&token).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::warn!(schema = %self.store.schema_name(), error = %cqrs_core::error_chain(&e), "outbox relay failed; starting again in {backoff:?}");
                    tokio::select! {
                        _ = token.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
        Ok(())
    }

    /// Takes the relay's lock on a connection of its own (released by the server if this
    /// process dies), then sends until cancelled.
    async fn lead(&self, token: &CancellationToken) -> Result<()> {
        let options = self.pool.connect_options();
        let mut conn = PgConnection::connect_with(&options)
            .await
            .map_err(|e| Error::db("connecting the relay", e))?;
        let mut listener = PgListener::connect_with(&self.pool)
            .await
            .map_err(|e| Error::db("connecting the relay's listener", e))?;
        listener
            .listen(&self.store.channel())
            .await
            .map_err(|e| Error::db("listening for stored messages", e))?;
        let lock = format!(
            "SELECT pg_try_advisory_lock({}, 0)",
            self.store.lock_class()
        );
        loop {
            let mine: bool = sqlx::query_scalar(&lock)
                .fetch_one(&mut conn)
                .await
                .map_err(|e| Error::db("taking the relay's turn", e))?;
            if mine {
                break;
            }
            tokio::select! {
                _ = token.cancelled() => return Ok(()),
                _ = tokio::time::sleep(self.poll) => {}
            }
        }
        tracing::debug!(schema = %self.store.schema_name(), "outbox relay sending");
        // Sent and not deleted yet: deleted with the next read (one round trip a batch), or
        // before waiting. Read and not sent yet: the next batch.
        let mut sent: Vec<i64> = Vec::new();
        let mut ready: Vec<Stored> = Vec::new();
        let mut reads = Reads::default();
        loop {
            if ready.is_empty() {
                ready = self.read(&mut conn, &mut reads, &sent, &[]).await?;
                sent.clear();
            }
            if ready.is_empty() {
                // Caught up: wait for a notification or the poll interval.
                tokio::select! {
                    _ = token.cancelled() => return Ok(()),
                    n = listener.try_recv() => {
                        n.map_err(|e| Error::db("waiting for stored messages", e))?;
                    }
                    _ = tokio::time::sleep(self.poll) => {}
                }
                continue;
            }
            // A full batch: more may wait, so the next one is read (and the last one deleted)
            // while the broker takes this one. It is sent only after this one is acknowledged,
            // so a key's messages keep their order across batches.
            let full = ready.len() == self.batch;
            let sending: Vec<i64> = ready.iter().map(|r| r.seq).collect();
            let deleting = std::mem::take(&mut sent);
            let publishing = self.publish_batch(std::mem::take(&mut ready));
            let (published, next) = if full {
                let reading = self.read(&mut conn, &mut reads, &deleting, &sending);
                let (p, n) = tokio::join!(publishing, reading);
                (p, Some(n))
            } else {
                (publishing.await, None)
            };
            let Published {
                acked,
                refused,
                failed,
            } = published;
            match next {
                Some(Ok(rows)) => ready = rows,
                // Not deleted: they go with the next delete.
                Some(Err(e)) => {
                    sent = deleting;
                    sent.extend(acked);
                    let _ = self.store.delete(&mut conn, &sent).await;
                    return Err(e);
                }
                None => sent = deleting,
            }
            sent.extend(acked);
            for (seqs, reason) in refused {
                self.store.bury(&mut conn, &seqs, &reason).await?;
            }
            if let Some(e) = failed {
                // What the broker took before the failure is not sent again, if the database
                // still answers.
                if !sent.is_empty() {
                    let _ = self.store.delete(&mut conn, &sent).await;
                }
                return Err(e);
            }
            if ready.is_empty() && !sent.is_empty() {
                self.store.delete(&mut conn, &sent).await?;
                sent.clear();
            }
        }
    }

    /// Deletes `sent`, then reads the next batch from where `reads` says, leaving out
    /// `sending`; the cursor takes what was read.
    async fn read(
        &self,
        conn: &mut PgConnection,
        reads: &mut Reads,
        sent: &[i64],
        sending: &[i64],
    ) -> Result<Vec<Stored>> {
        let cursor = &mut reads.cursor;
        // Read before the rows and applied after them (`Cursor::horizon` says why).
        let horizon = if cursor.has_gaps()
            && reads
                .horizon_at
                .is_none_or(|at| at.elapsed() >= HORIZON_EVERY)
        {
            let read = self.store.horizon(conn).await?;
            let now = Instant::now();
            reads.horizon_at = Some(now);
            Some((read, now))
        } else {
            None
        };
        let from = cursor.from();
        // Rows at or below the cursor were read: only a scan from below it (a gap) meets those
        // still being sent or deleted.
        let excluded: Vec<i64> = sent
            .iter()
            .chain(sending)
            .copied()
            .filter(|seq| *seq > from)
            .collect();
        let rows = self
            .store
            .oldest(conn, sent, from, &excluded, self.batch)
            .await?;
        let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
        cursor.read(&seqs, Instant::now());
        if let Some(((xmin, xmax), at)) = horizon {
            // A full batch may have stopped below some gaps.
            let covered = match seqs.last() {
                Some(last) if rows.len() >= self.batch => *last,
                _ => i64::MAX,
            };
            cursor.horizon(xmin, xmax, at, covered);
        }
        Ok(rows)
    }

    /// Sends `batch`, one publish per run of messages of one topic, stopping at the first
    /// failure worth retrying.
    async fn publish_batch(&self, batch: Vec<Stored>) -> Published {
        let mut out = Published::default();
        let mut run: Vec<Stored> = Vec::new();
        for s in batch {
            if run.last().is_some_and(|r| r.topic != s.topic)
                && !self.send_run(std::mem::take(&mut run), &mut out).await
            {
                return out;
            }
            run.push(s);
        }
        if !run.is_empty() {
            self.send_run(run, &mut out).await;
        }
        out
    }

    /// Publishes one run; false if it failed in a way worth retrying (said in `out.failed`).
    async fn send_run(&self, run: Vec<Stored>, out: &mut Published) -> bool {
        let topic = run[0].topic.clone();
        let seqs: Vec<i64> = run.iter().map(|s| s.seq).collect();
        let messages: Vec<Message> = run.into_iter().map(|s| s.message).collect();
        match self.publisher.publish(&topic, &messages).await {
            Ok(()) => {
                out.acked.extend(seqs);
                true
            }
            // Refused for good (a topic the broker will not take, a message too large): the
            // rows go to the dead letters with the reason, and the others go on.
            Err(e) if !e.is_retryable() => {
                let reason = e.report();
                tracing::error!(schema = %self.store.schema_name(), %topic, count = seqs.len(), reason = %reason, "the broker refused outbox messages for good; they are moved to the dead letters");
                out.refused.push((seqs, reason));
                true
            }
            Err(e) => {
                out.failed = Some(Error::Publish {
                    topic: topic.to_string(),
                    source: Box::new(e),
                });
                false
            }
        }
    }
}

/// How often the relay reads the database's transaction horizon while gaps wait.
const HORIZON_EVERY: Duration = Duration::from_millis(100);

/// Where a leading relay reads from.
#[derive(Default)]
struct Reads {
    cursor: Cursor,
    /// When the horizon was last read.
    horizon_at: Option<Instant>,
}

/// What sending a batch came to.
#[derive(Default)]
struct Published {
    /// Taken by the broker: to delete.
    acked: Vec<i64>,
    /// Refused for good, with the reason: to move to the dead letters.
    refused: Vec<(Vec<i64>, String)>,
    /// A failure worth retrying, after which nothing more was sent.
    failed: Option<Error>,
}
