//! The outbox table: migrations, storing a message in the caller's transaction, reading and
//! deleting what was sent.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use cqrs_core::{Message, Metadata};
use sqlx::postgres::{PgArguments, PgRow, Postgres};
use sqlx::query::Query;
use sqlx::{Column, PgConnection, PgPool, Row, Type, TypeInfo};

use crate::{Error, Result};

/// Where the outbox lives, and how messages are stored in it.
#[derive(Debug, Clone)]
pub struct OutboxStore {
    schema: String,
}

impl Default for OutboxStore {
    fn default() -> Self {
        OutboxStore {
            schema: "cqrs".to_owned(),
        }
    }
}

/// How far the relay is behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct OutboxStatus {
    /// Messages committed and not yet sent.
    pub depth: u64,
    /// How long the oldest of them has waited (`None`: none waits).
    pub oldest: Option<Duration>,
}

/// A stored message, read back by the relay.
pub(crate) struct Stored {
    pub seq: i64,
    pub topic: Arc<str>,
    pub message: Message,
}

/// The migrations, in order; each runs once per schema (`{s}` is the schema).
const MIGRATIONS: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS {s}.outbox (
        seq BIGSERIAL PRIMARY KEY,
        topic TEXT NOT NULL,
        msg_key TEXT,
        message_id TEXT NOT NULL,
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        payload BYTEA NOT NULL,
        correlation_id TEXT,
        causation_id TEXT,
        created_at_ms BIGINT NOT NULL,
        content_type TEXT NOT NULL,
        headers JSONB NOT NULL,
        stored_at TIMESTAMPTZ NOT NULL DEFAULT now()
    )",
    "CREATE TABLE IF NOT EXISTS {s}.inbox (
        consumer_group TEXT NOT NULL,
        message_id TEXT NOT NULL,
        handled_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        PRIMARY KEY (consumer_group, message_id)
    )",
    "CREATE TABLE IF NOT EXISTS {s}.outbox_dead (
        LIKE {s}.outbox,
        reason TEXT NOT NULL,
        buried_at TIMESTAMPTZ NOT NULL DEFAULT now()
    )",
];

impl OutboxStore {
    /// The outbox in schema `cqrs`.
    pub fn new() -> Self {
        Self::default()
    }

    /// The outbox in schema `name` (lowercase ASCII letters, digits and `_`, starting with a
    /// letter; at most 63 characters).
    pub fn schema(mut self, name: &str) -> Result<Self> {
        let ok = !name.is_empty()
            && name.len() <= 63
            && name.starts_with(|c: char| c.is_ascii_lowercase())
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !ok {
            return Err(Error::InvalidSchema(name.to_owned()));
        }
        self.schema = name.to_owned();
        Ok(self)
    }

    /// The schema's name.
    pub fn schema_name(&self) -> &str {
        &self.schema
    }

    /// The channel the relay listens on.
    pub(crate) fn channel(&self) -> String {
        format!("{}_outbox", self.schema)
    }

    /// The first key of the advisory locks of this outbox (the second is a message key's hash,
    /// or 0 for the relay's lock).
    pub(crate) fn lock_class(&self) -> String {
        format!("hashtext('{}.outbox')", self.schema)
    }

    /// Creates the schema and its tables, or brings them up to date. Safe to run from several
    /// processes at once.
    pub async fn migrate(&self, pool: &PgPool) -> Result<()> {
        let s = &self.schema;
        let mut tx = pool
            .begin()
            .await
            .map_err(|e| Error::db("starting the migration", e))?;
        // One migrating process at a time.
        sqlx::query(&format!(
            "SELECT pg_advisory_xact_lock(hashtext('{s}.migrate'))"
        ))
        .execute(&mut *tx)
        .await
        .map_err(|e| Error::db("locking the migration", e))?;
        sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS {s}"))
            .execute(&mut *tx)
            .await
            .map_err(|e| Error::db(format!("creating schema {s}"), e))?;
        sqlx::query(&format!(
            "CREATE TABLE IF NOT EXISTS {s}.migrations (version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        ))
        .execute(&mut *tx)
        .await
        .map_err(|e| Error::db("creating the migrations table", e))?;
        let done: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {s}.migrations"))
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| Error::db("reading the migrations", e))?;
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(done.max(0) as usize) {
            sqlx::query(&sql.replace("{s}", s))
                .execute(&mut *tx)
                .await
                .map_err(|e| Error::db(format!("migration {} of schema {s}", i + 1), e))?;
            sqlx::query(&format!("INSERT INTO {s}.migrations (version) VALUES ($1)"))
                .bind(i as i32 + 1)
                .execute(&mut *tx)
                .await
                .map_err(|e| Error::db("recording a migration", e))?;
        }
        tx.commit()
            .await
            .map_err(|e| Error::db("committing the migration", e))
    }

    /// Stores `message` for `topic` in the caller's transaction (pass `&mut *tx`): it is sent
    /// only if, and after, that transaction commits. Messages with a key wait for an earlier
    /// uncommitted transaction that stored one with the same key, so that they are stored in
    /// commit order.
    pub async fn insert(
        &self,
        conn: &mut PgConnection,
        topic: &str,
        message: &Message,
    ) -> Result<()> {
        let s = &self.schema;
        if let Some(key) = &message.key {
            sqlx::query(&format!(
                "SELECT pg_advisory_xact_lock({}, hashtext($1))",
                self.lock_class()
            ))
            .bind(format!("{topic}/{key}"))
            .execute(&mut *conn)
            .await
            .map_err(|e| Error::db("locking the message key", e))?;
        }
        let m = &message.metadata;
        let headers = serde_json::to_string(&m.headers).map_err(|e| Error::BadRow {
            seq: 0,
            why: format!("headers: {e}"),
        })?;
        sqlx::query(&format!(
            "INSERT INTO {s}.outbox (topic, msg_key, message_id, name, version, payload, correlation_id, causation_id, created_at_ms, content_type, headers)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11::jsonb)
             RETURNING pg_notify($12, '')::text"
        ))
        .bind(topic)
        .bind(message.key.as_deref())
        .bind(&*message.id)
        .bind(&*message.name)
        .bind(message.version as i32)
        .bind(&message.payload[..])
        .bind(m.correlation_id.as_deref())
        .bind(m.causation_id.as_deref())
        .bind(m.created_at as i64)
        .bind(m.content_type.as_ref())
        .bind(headers)
        // The relay's notification (delivered at commit) in the same round trip.
        .bind(self.channel())
        .execute(&mut *conn)
        .await
        .map_err(|e| Error::db(format!("storing message {} in {s}.outbox", message.id), e))?;
        Ok(())
    }

    /// Deletes `sent` (messages the broker took), then reads the oldest `limit` committed
    /// messages with a `seq` above `from`, but those of `excluded` (being sent now, or in `sent`:
    /// the statement's snapshot still sees them), in the order they were stored.
    pub(crate) async fn oldest(
        &self,
        conn: &mut PgConnection,
        sent: &[i64],
        from: i64,
        excluded: &[i64],
        limit: usize,
    ) -> Result<Vec<Stored>> {
        let s = &self.schema;
        // One round trip: the rows sent already go, and the next ones are read. The scan starts
        // at `from` (an index range), not at the table's first row: below the relay's cursor are
        // the rows it deleted, which stay in the index until a vacuum, and walking them made a
        // read cost ~30 us a row (10,000 rows relayed: 213 ms in the database, 52 ms from the
        // cursor).
        let gone = Gone::of(sent);
        let sql = format!(
            "WITH gone AS (DELETE FROM {s}.outbox WHERE {})
             SELECT seq, topic, msg_key, message_id, name, version, payload, correlation_id, causation_id, created_at_ms, content_type, headers::text AS headers
             FROM {s}.outbox WHERE seq > $1 AND seq <> ALL($2) ORDER BY seq LIMIT $3",
            gone.condition(4)
        );
        let query = sqlx::query(&sql)
            .bind(from)
            .bind(excluded)
            .bind(limit as i64);
        let rows = gone
            .bind(query)
            .fetch_all(&mut *conn)
            .await
            .map_err(|e| Error::db(format!("reading {s}.outbox"), e))?;
        if let Some(first) = rows.first() {
            check_columns(first)?;
        }
        let mut read: Vec<Stored> = Vec::with_capacity(rows.len());
        for row in &rows {
            let stored = stored(row, read.last().map(|s| &s.topic))?;
            read.push(stored);
        }
        Ok(read)
    }

    /// The database's transaction horizon now: the oldest transaction still running (`xmin`)
    /// and the next transaction id to be given (`xmax`), as 64-bit ids.
    pub(crate) async fn horizon(&self, conn: &mut PgConnection) -> Result<(i64, i64)> {
        sqlx::query_as(
            "SELECT pg_snapshot_xmin(s)::text::bigint, pg_snapshot_xmax(s)::text::bigint
             FROM pg_current_snapshot() AS s",
        )
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| Error::db("reading the transaction horizon", e))
    }

    /// Deletes the sent messages `seqs`.
    pub(crate) async fn delete(&self, conn: &mut PgConnection, seqs: &[i64]) -> Result<()> {
        let s = &self.schema;
        let gone = Gone::of(seqs);
        let sql = format!("DELETE FROM {s}.outbox WHERE {}", gone.condition(1));
        gone.bind(sqlx::query(&sql))
            .execute(&mut *conn)
            .await
            .map_err(|e| Error::db(format!("deleting sent messages from {s}.outbox"), e))?;
        Ok(())
    }

    /// Records in the caller's transaction that `group` handled `message_id`; `false` if it
    /// already had (the row exists, committed). A second transaction claiming the same message
    /// waits until the first commits (then `false`) or rolls back (then `true`).
    pub async fn claim_inbox(
        &self,
        conn: &mut PgConnection,
        group: &str,
        message_id: &str,
    ) -> Result<bool> {
        let s = &self.schema;
        let done = sqlx::query(&format!(
            "INSERT INTO {s}.inbox (consumer_group, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING"
        ))
        .bind(group)
        .bind(message_id)
        .execute(&mut *conn)
        .await
        .map_err(|e| Error::db(format!("recording message {message_id} in {s}.inbox"), e))?;
        Ok(done.rows_affected() == 1)
    }

    /// [`OutboxStore::claim_inbox`] for many messages of `group` at once (a batch): the ids this
    /// call recorded; the others `group` had handled already (an id given twice is recorded
    /// once). Recorded in id order, so that two batches claiming some of the same ids wait on
    /// each other instead of deadlocking.
    pub async fn claim_inbox_many(
        &self,
        conn: &mut PgConnection,
        group: &str,
        message_ids: &[&str],
    ) -> Result<std::collections::HashSet<String>> {
        let s = &self.schema;
        let recorded: Vec<String> = sqlx::query_scalar(&format!(
            "INSERT INTO {s}.inbox (consumer_group, message_id)
             SELECT DISTINCT $1::text, id FROM unnest($2::text[]) AS t(id) ORDER BY id
             ON CONFLICT DO NOTHING RETURNING message_id"
        ))
        .bind(group)
        .bind(message_ids)
        .fetch_all(&mut *conn)
        .await
        .map_err(|e| {
            Error::db(
                format!("recording {} messages in {s}.inbox", message_ids.len()),
                e,
            )
        })?;
        Ok(recorded.into_iter().collect())
    }

    /// Deletes the inbox rows older than `age`: a message redelivered after that would run its
    /// handler again. Returns how many went.
    pub async fn purge_inbox(&self, pool: &PgPool, age: Duration) -> Result<u64> {
        let s = &self.schema;
        let done = sqlx::query(&format!(
            "DELETE FROM {s}.inbox WHERE handled_at < now() - make_interval(secs => $1)"
        ))
        .bind(age.as_secs_f64())
        .execute(pool)
        .await
        .map_err(|e| Error::db(format!("purging {s}.inbox"), e))?;
        Ok(done.rows_affected())
    }

    /// Moves rows the broker refused for good to `outbox_dead`, with the reason, in one
    /// statement (they leave the outbox and arrive there together).
    pub(crate) async fn bury(
        &self,
        conn: &mut PgConnection,
        seqs: &[i64],
        reason: &str,
    ) -> Result<()> {
        let s = &self.schema;
        sqlx::query(&format!(
            "WITH moved AS (DELETE FROM {s}.outbox WHERE seq = ANY($1) RETURNING *)
             INSERT INTO {s}.outbox_dead SELECT moved.*, $2 FROM moved"
        ))
        .bind(seqs)
        .bind(reason)
        .execute(&mut *conn)
        .await
        .map_err(|e| Error::db(format!("moving refused messages to {s}.outbox_dead"), e))?;
        Ok(())
    }

    /// The messages the broker refused for good, with the reason, oldest first: (message id,
    /// topic, reason).
    pub async fn dead_letters(&self, pool: &PgPool) -> Result<Vec<(String, String, String)>> {
        let s = &self.schema;
        sqlx::query_as(&format!(
            "SELECT message_id, topic, reason FROM {s}.outbox_dead ORDER BY seq"
        ))
        .fetch_all(pool)
        .await
        .map_err(|e| Error::db(format!("reading {s}.outbox_dead"), e))
    }

    /// Moves messages the broker refused for good back into the outbox, to be sent again (once
    /// what refused them is fixed: the topic created, the size limit raised): those of
    /// `message_ids`, or every one when it is empty. They go after the messages waiting, in the
    /// order they were stored (a key's later messages, sent meanwhile, stay ahead of them, as
    /// with a dead letter redriven). Returns how many moved; the relay is woken.
    pub async fn redrive_dead(&self, pool: &PgPool, message_ids: &[String]) -> Result<u64> {
        let s = &self.schema;
        let columns = "topic, msg_key, message_id, name, version, payload, correlation_id, causation_id, created_at_ms, content_type, headers";
        let mut tx = pool
            .begin()
            .await
            .map_err(|e| Error::db("redriving dead outbox messages", e))?;
        let moved = sqlx::query(&format!(
            "WITH moved AS (
                 DELETE FROM {s}.outbox_dead WHERE cardinality($1::text[]) = 0 OR message_id = ANY($1)
                 RETURNING seq, {columns})
             INSERT INTO {s}.outbox ({columns}) SELECT {columns} FROM moved ORDER BY seq"
        ))
        .bind(message_ids)
        .execute(&mut *tx)
        .await
        .map_err(|e| Error::db(format!("moving {s}.outbox_dead back into {s}.outbox"), e))?
        .rows_affected();
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(self.channel())
            .execute(&mut *tx)
            .await
            .map_err(|e| Error::db("waking the relay", e))?;
        tx.commit()
            .await
            .map_err(|e| Error::db("redriving dead outbox messages", e))?;
        Ok(moved)
    }

    /// How many messages the broker refused for good wait in `outbox_dead`.
    pub async fn dead_count(&self, pool: &PgPool) -> Result<u64> {
        let s = &self.schema;
        let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {s}.outbox_dead"))
            .fetch_one(pool)
            .await
            .map_err(|e| Error::db(format!("counting {s}.outbox_dead"), e))?;
        Ok(n.max(0) as u64)
    }

    /// How far the relay is behind: messages waiting, and the age of the oldest.
    pub async fn status(&self, pool: &PgPool) -> Result<OutboxStatus> {
        let s = &self.schema;
        let row = sqlx::query(&format!(
            "SELECT count(*) AS depth, extract(epoch FROM now() - min(stored_at))::float8 AS oldest FROM {s}.outbox"
        ))
        .fetch_one(pool)
        .await
        .map_err(|e| Error::db(format!("reading the status of {s}.outbox"), e))?;
        let depth: i64 = row.get("depth");
        let oldest: Option<f64> = row.get("oldest");
        Ok(OutboxStatus {
            depth: depth.max(0) as u64,
            oldest: oldest.map(|s| Duration::from_secs_f64(s.max(0.0))),
        })
    }
}

/// Which sent rows to delete: sent in a batch, they are nearly always every `seq` of a range,
/// deleted as that range (an index range: 1.0 ms for 500 rows in `EXPLAIN ANALYZE`, against
/// 1.9 ms as a list, an index search each); otherwise (a `seq` in between not sent: a row
/// committed after the read) as the list.
enum Gone<'a> {
    Range(i64, i64),
    List(&'a [i64]),
}

impl<'a> Gone<'a> {
    fn of(seqs: &'a [i64]) -> Self {
        match contiguous(seqs) {
            Some((first, last)) => Gone::Range(first, last),
            None => Gone::List(seqs),
        }
    }

    /// The condition on `seq`, its parameters numbered from `$n`.
    fn condition(&self, n: usize) -> String {
        match self {
            Gone::Range(..) => format!("seq BETWEEN ${n} AND ${}", n + 1),
            Gone::List(_) => format!("seq = ANY(${n})"),
        }
    }

    /// Binds the condition's parameters, after those `query` has.
    fn bind<'q>(&self, query: Query<'q, Postgres, PgArguments>) -> Query<'q, Postgres, PgArguments>
    where
        'a: 'q,
    {
        match *self {
            Gone::Range(first, last) => query.bind(first).bind(last),
            Gone::List(seqs) => query.bind(seqs),
        }
    }
}

/// The first and last of `seqs` when they are every number between the two (in any order, none
/// twice), so that deleting the range deletes exactly them.
fn contiguous(seqs: &[i64]) -> Option<(i64, i64)> {
    let first = *seqs.iter().min()?;
    let last = *seqs.iter().max()?;
    if last - first + 1 != seqs.len() as i64 {
        return None;
    }
    let mut seen = vec![false; seqs.len()];
    for seq in seqs {
        let slot = &mut seen[(seq - first) as usize];
        if std::mem::replace(slot, true) {
            return None;
        }
    }
    Some((first, last))
}

/// Checks that the columns of [`OutboxStore::oldest`]'s query are, at each position, the one
/// [`stored`] takes there (the query's column list and these positions are written apart), with
/// a type it decodes (a table altered by hand may not have): otherwise a [`Error::BadRow`]
/// naming it, not a panic. Once per read, as every row of it has the same columns: checked at
/// each value, the types cost ~1,100 instructions a row (callgrind), a fifth of the relay's
/// reading.
fn check_columns(row: &PgRow) -> Result<()> {
    fn compatible<T: Type<Postgres>>(row: &PgRow, i: usize, name: &'static str) -> Result<()> {
        let column = row.columns().get(i).ok_or_else(|| Error::BadRow {
            seq: 0,
            why: format!("column {i} ({name}) missing"),
        })?;
        if column.name() != name {
            return Err(Error::BadRow {
                seq: 0,
                why: format!("column {i} is `{}`, read as {name}", column.name()),
            });
        }
        if T::compatible(column.type_info()) {
            return Ok(());
        }
        Err(Error::BadRow {
            seq: row.try_get_unchecked(0).unwrap_or(0),
            why: format!(
                "column {i} ({name}): its SQL type {} does not decode as `{}`",
                column.type_info().name(),
                std::any::type_name::<T>()
            ),
        })
    }
    compatible::<i64>(row, 0, "seq")?;
    compatible::<String>(row, 1, "topic")?;
    compatible::<Option<String>>(row, 2, "msg_key")?;
    compatible::<String>(row, 3, "message_id")?;
    compatible::<String>(row, 4, "name")?;
    compatible::<i32>(row, 5, "version")?;
    compatible::<Vec<u8>>(row, 6, "payload")?;
    compatible::<Option<String>>(row, 7, "correlation_id")?;
    compatible::<Option<String>>(row, 8, "causation_id")?;
    compatible::<i64>(row, 9, "created_at_ms")?;
    compatible::<String>(row, 10, "content_type")?;
    compatible::<&str>(row, 11, "headers")
}

/// A row of [`OutboxStore::oldest`]'s query, its columns taken by position (in the order that
/// query selects them: cheaper than by name, per row), their types checked by [`check_columns`]
/// once per read. A value that does not decode (text that is not UTF-8) is a [`Error::BadRow`].
/// `topic` is the topic of the row before, shared when this row's is the same.
fn stored(row: &PgRow, topic: Option<&Arc<str>>) -> Result<Stored> {
    let seq: i64 = row.try_get_unchecked(0).map_err(|e| Error::BadRow {
        seq: 0,
        why: format!("seq: {e}"),
    })?;
    let bad = |why: String| Error::BadRow { seq, why };
    let column = |i: usize, name: &'static str| {
        move |e: sqlx::Error| Error::BadRow {
            seq,
            why: format!("column {i} ({name}): {e}"),
        }
    };
    let headers: &str = row.try_get_unchecked(11).map_err(column(11, "headers"))?;
    let headers: BTreeMap<String, String> = if headers == "{}" {
        BTreeMap::new()
    } else {
        serde_json::from_str(headers).map_err(|e| bad(format!("headers: {e}")))?
    };
    let mut metadata = Metadata::default();
    metadata.correlation_id = row
        .try_get_unchecked(7)
        .map_err(column(7, "correlation_id"))?;
    metadata.causation_id = row
        .try_get_unchecked(8)
        .map_err(column(8, "causation_id"))?;
    metadata.created_at = row
        .try_get_unchecked::<i64, _>(9)
        .map_err(column(9, "created_at_ms"))?
        .max(0) as u64;
    let content_type: &str = row
        .try_get_unchecked(10)
        .map_err(column(10, "content_type"))?;
    // Nearly always JSON: not a string of its own per row.
    metadata.content_type = match content_type {
        "application/json" => Cow::Borrowed("application/json"),
        other => Cow::Owned(other.to_owned()),
    };
    metadata.headers = headers;
    let version: i32 = row.try_get_unchecked(5).map_err(column(5, "version"))?;
    let topic_name: &str = row.try_get_unchecked(1).map_err(column(1, "topic"))?;
    let topic = match topic {
        Some(t) if **t == *topic_name => t.clone(),
        _ => Arc::from(topic_name),
    };
    Ok(Stored {
        seq,
        topic,
        message: Message::from_parts(
            row.try_get_unchecked::<String, _>(3)
                .map_err(column(3, "message_id"))?
                .into(),
            row.try_get_unchecked::<String, _>(4)
                .map_err(column(4, "name"))?
                .into(),
            u32::try_from(version).map_err(|_| bad(format!("version {version}")))?,
            row.try_get_unchecked::<Option<String>, _>(2)
                .map_err(column(2, "msg_key"))?
                .map(Into::into),
            row.try_get_unchecked::<Vec<u8>, _>(6)
                .map_err(column(6, "payload"))?,
            metadata,
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::contiguous;

    #[test]
    fn a_range_is_found_only_when_every_number_of_it_is_there_once() {
        assert_eq!(contiguous(&[]), None);
        assert_eq!(contiguous(&[7]), Some((7, 7)));
        assert_eq!(contiguous(&[3, 4, 5, 6]), Some((3, 6)));
        assert_eq!(contiguous(&[6, 4, 3, 5]), Some((3, 6)));
        // A gap: 5 was not sent (a row committed after the read), so it must stay.
        assert_eq!(contiguous(&[3, 4, 6]), None);
        // As many numbers as the range holds, but one twice and one missing.
        assert_eq!(contiguous(&[3, 4, 4, 6]), None);
    }
}
