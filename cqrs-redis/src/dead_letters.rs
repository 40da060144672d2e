//! The dead letters' store: list, redrive (publish first, then delete) and purge the entries of
//! a dead-letter stream.

use async_trait::async_trait;
use cqrs_core::backend::Publisher;
use cqrs_core::dead_letter::{redrive_each, DeadLetter, DeadLetterStore, EachDeadLetter, Redrive};
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

    /// `XRANGE id id` for each id, in one pipeline; an id that is not an entry id matches
    /// nothing.
    async fn dead_letters_by_id(
        &self,
        topic: &str,
        ids: &[String],
    ) -> cqrs_core::Result<Vec<DeadLetter>> {
        let mut ids: Vec<(u64, u64)> = ids.iter().filter_map(|id| parse_id(id)).collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for (ms, seq) in &ids {
            let id = format!("{ms}-{seq}");
            pipe.cmd("XRANGE").arg(topic).arg(&id).arg(&id);
        }
        let replies: Vec<Value> = pipe
            .query_async(&mut self.pool_for(topic)?.conn.clone())
            .await
            .map_err(|e| Error::redis(format!("XRANGE {topic} (by id)"), e))?;
        Ok(replies
            .into_iter()
            .flat_map(value::entries)
            .filter_map(dead_letter)
            .collect())
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
        let mut lock = RedriveLock::take(self, topic).await?;
        let result = async {
            let chosen = match ids {
                Some(ids) => self.dead_letters_by_id(topic, ids).await?,
                None => self.dead_letters(topic).await?,
            };
            self.redrive_chosen(topic, chosen).await
        }
        .await;
        lock.release().await;
        result
    }

    /// Pages of `XRANGE` up to the last entry there was when it started, each redriven as
    /// [`DeadLetterStore::redrive`] does, under the same lock (its ten minutes renewed at each
    /// page).
    async fn redrive_all(
        &self,
        topic: &str,
        page: usize,
        each: &mut EachDeadLetter<'_>,
    ) -> cqrs_core::Result<u64> {
        let mut lock = RedriveLock::take(self, topic).await?;
        let result = async {
            let mut done = 0;
            let mut pages = Pages::start(self, topic, page).await?;
            while let Some(chosen) = pages.next(self, topic).await? {
                for d in self.redrive_chosen(topic, chosen).await? {
                    each(&d);
                    done += 1;
                }
                lock.renew().await?;
            }
            Ok(done)
        }
        .await;
        lock.release().await;
        result
    }

    /// Pages of `XRANGE` up to the last entry there was when it started, each deleted with
    /// `XDEL`.
    async fn purge_all(
        &self,
        topic: &str,
        page: usize,
        each: &mut EachDeadLetter<'_>,
    ) -> cqrs_core::Result<u64> {
        let mut removed = 0;
        let mut pages = Pages::start(self, topic, page).await?;
        while let Some(chosen) = pages.next(self, topic).await? {
            let ids: Vec<String> = chosen.iter().map(|d| d.id.clone()).collect();
            removed += self.purge(topic, Some(&ids)).await?;
            for d in &chosen {
                each(d);
            }
        }
        Ok(removed)
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
        self.dead_letters_range(topic, from, "+", count).await
    }

    /// The dead letters of `topic` from `from` to `to` (`XRANGE` syntax), at most `count`.
    async fn dead_letters_range(
        &self,
        topic: &str,
        from: &str,
        to: &str,
        count: Option<usize>,
    ) -> cqrs_core::Result<Vec<DeadLetter>> {
        let pool = self.pool_for(topic)?;
        let mut cmd = redis::cmd("XRANGE");
        cmd.arg(topic).arg(from).arg(to);
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

    /// The id of the last entry of `topic` (`XREVRANGE + - COUNT 1`), `None` when it has none.
    async fn last_id(&self, topic: &str) -> cqrs_core::Result<Option<String>> {
        let reply: Value = redis::cmd("XREVRANGE")
            .arg(topic)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut self.pool_for(topic)?.conn.clone())
            .await
            .map_err(|e| Error::redis(format!("XREVRANGE {topic}"), e))?;
        Ok(value::entries(reply).into_iter().next().map(|e| e.id))
    }

    /// Redrives `chosen`, in order, once the lock is held.
    async fn redrive_chosen(
        &self,
        topic: &str,
        chosen: Vec<DeadLetter>,
    ) -> cqrs_core::Result<Vec<DeadLetter>> {
        let conn = self.pool_for(topic)?.conn.clone();
        let mut redrive = Redriving {
            backend: self,
            topic,
            conn,
        };
        let chosen = chosen.into_iter().map(|d| ((), d)).collect();
        redrive_each(topic, chosen, &mut redrive).await
    }
}

/// A dead-letter stream read `size` entries at a time (`XRANGE` from after the last page's last
/// entry), up to the last entry it had when the first page was asked for.
struct Pages {
    size: usize,
    /// `(id` of the last entry read (`-` before the first page).
    from: String,
    /// The stream's last entry at the start; `None`: it had none.
    last: Option<String>,
}

impl Pages {
    async fn start(backend: &RedisBackend, topic: &str, size: usize) -> cqrs_core::Result<Pages> {
        Ok(Pages {
            size: size.max(1),
            from: "-".to_owned(),
            last: backend.last_id(topic).await?,
        })
    }

    /// The next page, `None` once the span is read.
    async fn next(
        &mut self,
        backend: &RedisBackend,
        topic: &str,
    ) -> cqrs_core::Result<Option<Vec<DeadLetter>>> {
        let Some(last) = &self.last else {
            return Ok(None);
        };
        let page = backend
            .dead_letters_range(topic, &self.from, last, Some(self.size))
            .await?;
        let Some(end) = page.last() else {
            return Ok(None);
        };
        self.from = format!("({}", end.id);
        Ok(Some(page))
    }
}

/// The lock one redrive of a dead-letter stream holds (`SET cqrs:redrive-lock:<topic> NX PX`):
/// ten minutes, renewed by a run that pages.
struct RedriveLock {
    conn: crate::conn::Conn,
    topic: String,
    key: String,
    token: String,
}

/// How long the lock holds without a renewal.
const LOCK_MS: u64 = 600_000;

impl RedriveLock {
    /// Takes the lock of `topic`, or says who holds it for how long.
    async fn take(backend: &RedisBackend, topic: &str) -> cqrs_core::Result<RedriveLock> {
        let mut conn = backend.pool_for(topic)?.conn.clone();
        let key = format!("cqrs:redrive-lock:{topic}");
        let token = format!("{}-{}", std::process::id(), cqrs_core::now_millis());
        let taken: Option<String> = redis::cmd("SET")
            .arg(&key)
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(LOCK_MS)
            .query_async(&mut conn)
            .await
            .map_err(|e| Error::redis(format!("SET {key} NX"), e))?;
        if taken.is_none() {
            let left: i64 = redis::cmd("PTTL")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap_or(-1);
            return Err(cqrs_core::Error::fatal(
                format!("redriving {topic}"),
                format!(
                    "another redrive of {topic} is running (it holds {key} for {left} ms more); a second one would publish the same letters again"
                ),
            ));
        }
        Ok(RedriveLock {
            conn,
            topic: topic.to_owned(),
            key,
            token,
        })
    }

    /// Gives the lock its ten minutes again; fails if it is not this run's any more (it
    /// expired, and another run may have taken it).
    async fn renew(&mut self) -> cqrs_core::Result<()> {
        let renewed: i64 = redis::cmd("EVAL")
            .arg("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end")
            .arg(1)
            .arg(&self.key)
            .arg(&self.token)
            .arg(LOCK_MS)
            .query_async(&mut self.conn)
            .await
            .map_err(|e| Error::redis(format!("PEXPIRE {}", self.key), e))?;
        if renewed == 1 {
            return Ok(());
        }
        Err(cqrs_core::Error::fatal(
            format!("redriving {}", self.topic),
            format!(
                "the redrive lock {} expired between two pages; stopped so that two runs do not publish the same letters",
                self.key
            ),
        ))
    }

    /// Releases the lock if it is still this run's (it may have expired and been taken by
    /// another).
    async fn release(&mut self) {
        let released = redis::cmd("EVAL")
            .arg("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end")
            .arg(1)
            .arg(&self.key)
            .arg(&self.token)
            .query_async::<i64>(&mut self.conn)
            .await;
        if let Err(e) = released {
            let topic = &self.topic;
            tracing::warn!(%topic, error = %e, "releasing the redrive lock failed; it expires in ten minutes");
        }
    }
}

/// A dead letter from its stream entry; its age counts from the entry id's time when the
/// processor did not stamp one.
fn dead_letter(entry: value::Entry) -> Option<DeadLetter> {
    let (message, _) = crate::consumer::decode(&entry.id, &mut entry.fields?);
    let stored_at_ms = parse_id(&entry.id).map(|(ms, _)| ms);
    Some(DeadLetter::new(entry.id, message, stored_at_ms))
}
