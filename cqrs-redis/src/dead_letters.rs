//! The dead letters' store: list, redrive (publish first, then delete) and purge the entries of
//! a dead-letter stream.

use async_trait::async_trait;
use cqrs_core::backend::Publisher;
use cqrs_core::dead_letter::{redrive_each, DeadLetter, DeadLetterStore, Redrive};
use cqrs_core::Message;
use redis::Value;

use crate::error::Error;
use crate::value::{self, parse_id};
use crate::RedisBackend;

/// Redriving from the dead-letter stream `topic`: an entry is deleted (`XDEL`) once it is back
/// on its stream.
struct Redriving<'a> {
    backend: &'a RedisBackend,
    topic: &'a str,
    conn: crate::conn::Conn,
}

#[async_trait]
impl Redrive for Redriving<'_> {
    type Key = ();

    async fn publish(&mut self, topic: &str, message: Message) -> cqrs_core::Result<()> {
        self.backend
            .publish(topic, std::slice::from_ref(&message))
            .await
    }

    async fn done(&mut self, _: &(), dead: &DeadLetter) -> cqrs_core::Result<()> {
        let topic = self.topic;
        redis::cmd("XDEL")
            .arg(topic)
            .arg(&dead.id)
            .query_async::<u64>(&mut self.conn)
            .await
            .map_err(|e| Error::redis(format!("XDEL {topic} {}", dead.id), e))?;
        Ok(())
    }
}

#[async_trait]
impl DeadLetterStore for RedisBackend {
    async fn has_dead_letters(&self, topic: &str) -> cqrs_core::Result<bool> {
        let pool = self.pool_for(topic)?;
        let exists: bool = redis::cmd("EXISTS")
            .arg(topic)
            .query_async(&mut pool.conn.clone())
            .await
            .map_err(|e| Error::redis(format!("EXISTS {topic}"), e))?;
        Ok(exists)
    }

    /// `XRANGE` from after `after` (exclusive), `COUNT limit`.
    async fn dead_letters_page(
        &self,
        topic: &str,
        after: Option<&str>,
        limit: usize,
    ) -> cqrs_core::Result<Vec<DeadLetter>> {
        let from = after.map_or_else(|| "-".to_owned(), |id| format!("({id}"));
        self.dead_letters_from(topic, &from, Some(limit.max(1)))
            .await
    }

    /// The entries of the dead-letter stream `topic`, oldest first.
    async fn dead_letters(&self, topic: &str) -> cqrs_core::Result<Vec<DeadLetter>> {
        self.dead_letters_from(topic, "-", None).await
    }

    /// Publishes each chosen dead letter back, then deletes its entry (`XDEL`). One redrive of
    /// a topic at a time: a second, while one runs, would publish the same letters again (it
    /// lists them before the first deletes them), so it is refused, naming the lock
    /// (`cqrs:redrive-lock:<topic>`, held for at most ten minutes).
    async fn redrive(
        &self,
        topic: &str,
        ids: Option<&[String]>,
    ) -> cqrs_core::Result<Vec<DeadLetter>> {
        let mut conn = self.pool_for(topic)?.conn.clone();
        let lock = format!("cqrs:redrive-lock:{topic}");
        let token = format!("{}-{}", std::process::id(), cqrs_core::now_millis());
        let taken: Option<String> = redis::cmd("SET")
            .arg(&lock)
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(600_000)
            .query_async(&mut conn)
            .await
            .map_err(|e| Error::redis(format!("SET {lock} NX"), e))?;
        if taken.is_none() {
            let left: i64 = redis::cmd("PTTL")
                .arg(&lock)
                .query_async(&mut conn)
                .await
                .unwrap_or(-1);
            return Err(cqrs_core::Error::fatal(
                format!("redriving {topic}"),
                format!(
                    "another redrive of {topic} is running (it holds {lock} for {left} ms more); a second one would publish the same letters again"
                ),
            ));
        }
        let result = self.redrive_locked(topic, ids).await;
        // Released only if still this run's (it may have expired and been taken by another).
        let released = redis::cmd("EVAL")
            .arg("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end")
            .arg(1)
            .arg(&lock)
            .arg(&token)
            .query_async::<i64>(&mut conn)
            .await;
        if let Err(e) = released {
            tracing::warn!(%topic, error = %e, "releasing the redrive lock failed; it expires in ten minutes");
        }
        result
    }

    /// Deletes the chosen entries (`XDEL`), or all of them (`XTRIM MAXLEN 0`: the stream stays,
    /// empty).
    async fn purge(&self, topic: &str, ids: Option<&[String]>) -> cqrs_core::Result<u64> {
        let pool = self.pool_for(topic)?;
        let mut conn = pool.conn.clone();
        let removed = match ids {
            Some([]) => Ok(0),
            Some(ids) => redis::cmd("XDEL")
                .arg(topic)
                .arg(ids)
                .query_async(&mut conn)
                .await
                .map_err(|e| Error::redis(format!("XDEL {topic}"), e)),
            None => redis::cmd("XTRIM")
                .arg(topic)
                .arg("MAXLEN")
                .arg(0)
                .query_async(&mut conn)
                .await
                .map_err(|e| Error::redis(format!("XTRIM {topic} MAXLEN 0"), e)),
        };
        Ok(removed?)
    }
}

impl RedisBackend {
    /// The dead letters of `topic` from the id `from` (`XRANGE` syntax: `-`, or `(id` for after
    /// it), at most `count` of them.
    async fn dead_letters_from(
        &self,
        topic: &str,
        from: &str,
        count: Option<usize>,
    ) -> cqrs_core::Result<Vec<DeadLetter>> {
        let pool = self.pool_for(topic)?;
        let mut cmd = redis::cmd("XRANGE");
        cmd.arg(topic).arg(from).arg("+");
        if let Some(n) = count {
            cmd.arg("COUNT").arg(n);
        }
        let reply: Value = cmd
            .query_async(&mut pool.conn.clone())
            .await
            .map_err(|e| Error::redis(format!("XRANGE {topic}"), e))?;
        Ok(value::entries(reply)
            .into_iter()
            .filter_map(dead_letter)
            .collect())
    }

    /// [`DeadLetterStore::redrive`] once its lock is held.
    async fn redrive_locked(
        &self,
        topic: &str,
        ids: Option<&[String]>,
    ) -> cqrs_core::Result<Vec<DeadLetter>> {
        let chosen: Vec<((), DeadLetter)> = self
            .dead_letters(topic)
            .await?
            .into_iter()
            .filter(|d| ids.is_none_or(|ids| ids.contains(&d.id)))
            .map(|d| ((), d))
            .collect();
        let conn = self.pool_for(topic)?.conn.clone();
        let mut redrive = Redriving {
            backend: self,
            topic,
            conn,
        };
        redrive_each(topic, chosen, &mut redrive).await
    }
}

/// A dead letter from its stream entry; its age counts from the entry id's time when the
/// processor did not stamp one.
fn dead_letter(entry: value::Entry) -> Option<DeadLetter> {
    let (message, _) = crate::consumer::decode(&entry.id, entry.fields?);
    let stored_at_ms = parse_id(&entry.id).map(|(ms, _)| ms);
    Some(DeadLetter::new(entry.id, message, stored_at_ms))
}
