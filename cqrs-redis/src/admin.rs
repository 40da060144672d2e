//! Statistics and group-aware retention.

use std::time::Duration;

use redis::Value;

use crate::error::{Error, Result};
use crate::value::{self, parse_id};
use crate::RedisBackend;

/// One stream's figures.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StreamStats {
    /// The pool it lives in.
    pub pool: String,
    /// The stream.
    pub stream: String,
    /// Entries held.
    pub length: u64,
    /// Its consumer groups.
    pub groups: Vec<GroupStats>,
}

/// One consumer group's figures on one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct GroupStats {
    /// The group.
    pub name: String,
    /// Entries not yet delivered to the group (`None` when Redis cannot tell).
    pub lag: Option<u64>,
    /// Entries delivered and not acked.
    pub pending: u64,
    /// How long the oldest pending entry has waited since its last delivery.
    pub oldest_pending_idle: Option<Duration>,
    /// Members of the group.
    pub consumers: u64,
    /// The last id delivered to the group.
    pub last_delivered_id: String,
    /// Entries deleted from the stream before this group read them (`MAXLEN` trimming with the
    /// group behind): lost to it. From the group's read counter (Redis 7 and later; 0 when Redis
    /// cannot tell).
    pub trimmed_unread: u64,
}

impl RedisBackend {
    /// Figures of `stream`: length, and per group lag, pending entries, the oldest pending
    /// entry's idle time and members (from `XLEN`, `XINFO GROUPS` and `XPENDING`).
    pub async fn stats(&self, stream: &str) -> Result<StreamStats> {
        let pool = self.pool_for(stream)?;
        let mut conn = pool.conn.clone();
        let length: u64 = redis::cmd("XLEN")
            .arg(stream)
            .query_async(&mut conn)
            .await
            .map_err(|e| Error::redis(format!("XLEN {stream}"), e))?;
        let added = added_and_length(&mut conn, stream).await?;
        let mut groups = Vec::new();
        for g in group_infos(&mut conn, stream).await? {
            let name = value::get(&g, "name")
                .and_then(value::text)
                .unwrap_or_default();
            let pending = value::get(&g, "pending").and_then(value::int).unwrap_or(0) as u64;
            let oldest_pending_idle = if pending > 0 {
                let reply: Value = redis::cmd("XPENDING")
                    .arg(stream)
                    .arg(&name)
                    .arg("-")
                    .arg("+")
                    .arg(1)
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| Error::redis(format!("XPENDING {stream} {name}"), e))?;
                value::array(&reply)
                    .first()
                    .and_then(|row| value::array(row).get(2).and_then(value::int))
                    .map(|ms| Duration::from_millis(ms.max(0) as u64))
            } else {
                None
            };
            groups.push(GroupStats {
                trimmed_unread: group_deleted_unread(added, &g),
                lag: value::get(&g, "lag")
                    .and_then(value::int)
                    .map(|l| l.max(0) as u64),
                pending,
                oldest_pending_idle,
                consumers: value::get(&g, "consumers")
                    .and_then(value::int)
                    .unwrap_or(0) as u64,
                last_delivered_id: value::get(&g, "last-delivered-id")
                    .and_then(value::text)
                    .unwrap_or_default(),
                name,
            });
        }
        Ok(StreamStats {
            pool: pool.name.clone(),
            stream: stream.to_owned(),
            length,
            groups,
        })
    }

    /// Deletes the entries of `stream` that every consumer group has acknowledged (`XTRIM
    /// MINID`), and returns how many went. An entry a group has not read, or read and not acked,
    /// stays. A stream without groups is left alone.
    pub async fn trim_acknowledged(&self, stream: &str) -> Result<u64> {
        let pool = self.pool_for(stream)?;
        let mut conn = pool.conn.clone();
        let groups = group_infos(&mut conn, stream).await?;
        if groups.is_empty() {
            return Ok(0);
        }
        let mut keep_from: Option<(u64, u64)> = None;
        for g in &groups {
            let name = value::get(g, "name")
                .and_then(value::text)
                .unwrap_or_default();
            let pending = value::get(g, "pending").and_then(value::int).unwrap_or(0);
            // The first entry this group still needs: its oldest pending one, else the one after
            // the last it was given.
            let needed = if pending > 0 {
                let reply: Value = redis::cmd("XPENDING")
                    .arg(stream)
                    .arg(&name)
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| Error::redis(format!("XPENDING {stream} {name}"), e))?;
                value::array(&reply)
                    .get(1)
                    .and_then(value::text)
                    .and_then(|id| parse_id(&id))
            } else {
                value::get(g, "last-delivered-id")
                    .and_then(value::text)
                    .and_then(|id| parse_id(&id))
                    .map(|(ms, seq)| match seq.checked_add(1) {
                        Some(seq) => (ms, seq),
                        None => (ms + 1, 0),
                    })
            };
            let Some(needed) = needed else {
                return Ok(0);
            };
            keep_from = Some(keep_from.map_or(needed, |k| k.min(needed)));
        }
        let Some((ms, seq)) = keep_from else {
            return Ok(0);
        };
        redis::cmd("XTRIM")
            .arg(stream)
            .arg("MINID")
            .arg(format!("{ms}-{seq}"))
            .query_async(&mut conn)
            .await
            .map_err(|e| Error::redis(format!("XTRIM {stream}"), e))
    }

    /// Deletes `stream` with its groups and pending entries.
    pub async fn delete_stream(&self, stream: &str) -> Result<()> {
        let pool = self.pool_for(stream)?;
        redis::cmd("DEL")
            .arg(stream)
            .query_async::<()>(&mut pool.conn.clone())
            .await
            .map_err(|e| Error::redis(format!("DEL {stream}"), e))
    }

    /// Runs [`RedisBackend::trim_acknowledged`] on `streams` every `every` until `token` is
    /// cancelled.
    pub fn spawn_trimmer(
        &self,
        streams: Vec<String>,
        every: Duration,
        token: tokio_util::sync::CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let backend = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tokio::time::sleep(every) => {}
                }
                for s in &streams {
                    match backend.trim_acknowledged(s).await {
                        Ok(0) => {}
                        Ok(n) => {
                            tracing::debug!(stream = %s, removed = n, "trimmed acknowledged entries")
                        }
                        Err(e) => tracing::warn!(stream = %s, error = %e, "trimming failed"),
                    }
                }
            }
        })
    }
}

/// `XINFO STREAM|GROUPS stream`; `None` when the stream does not exist.
async fn xinfo(conn: &mut crate::conn::Conn, what: &str, stream: &str) -> Result<Option<Value>> {
    let reply: redis::RedisResult<Value> = redis::cmd("XINFO")
        .arg(what)
        .arg(stream)
        .query_async(conn)
        .await;
    match reply {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.to_string().contains("no such key") => Ok(None),
        Err(e) => Err(Error::redis(format!("XINFO {what} {stream}"), e)),
    }
}

/// `entries-added` and `length` of `stream` (`XINFO STREAM`, Redis 7 and later: `None` before,
/// or when the stream does not exist).
pub(crate) async fn added_and_length(
    conn: &mut crate::conn::Conn,
    stream: &str,
) -> Result<Option<(i64, i64)>> {
    Ok(xinfo(conn, "STREAM", stream).await?.and_then(|v| {
        value::get(&v, "entries-added")
            .and_then(value::int)
            .zip(value::get(&v, "length").and_then(value::int))
    }))
}

/// How many entries deleted from `stream` the group `g` (a row of `XINFO GROUPS`) never read
/// (see [`value::deleted_unread`]); 0 when Redis cannot tell.
pub(crate) fn group_deleted_unread(added_and_length: Option<(i64, i64)>, g: &Value) -> u64 {
    let Some((added, length)) = added_and_length else {
        return 0;
    };
    let delivered = value::get(g, "last-delivered-id")
        .and_then(value::text)
        .unwrap_or_default();
    let read = value::get(g, "entries-read").and_then(value::int);
    value::deleted_unread(added, length, read, &delivered).unwrap_or(0)
}

pub(crate) async fn group_infos(conn: &mut crate::conn::Conn, stream: &str) -> Result<Vec<Value>> {
    Ok(xinfo(conn, "GROUPS", stream)
        .await?
        .map_or_else(Vec::new, |v| value::array(&v).to_vec()))
}

/// One member of a consumer group.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConsumerStats {
    /// The consumer's name.
    pub name: String,
    /// Entries delivered to it and not acked.
    pub pending: u64,
    /// Time since it last read or claimed.
    pub idle: Duration,
}

/// One entry delivered to a consumer group and not acked yet (a row of `XPENDING`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PendingEntry {
    /// The entry id.
    pub id: String,
    /// The consumer that holds it.
    pub owner: String,
    /// Time since it was last delivered.
    pub idle: Duration,
    /// How many times it was delivered.
    pub deliveries: u64,
}

impl RedisBackend {
    /// The streams this backend can see: every stream on each single-server pool (`SCAN` with
    /// `TYPE stream`), and the streams the topology names for a cluster pool. Sorted.
    pub async fn streams(&self) -> Result<Vec<String>> {
        let mut out = std::collections::BTreeSet::new();
        for (i, pool) in self.inner.pools.iter().enumerate() {
            if matches!(pool.servers, crate::topology::Servers::Cluster(_)) {
                out.extend(
                    self.inner
                        .streams
                        .iter()
                        .filter(|(_, p)| **p == i)
                        .map(|(s, _)| s.clone()),
                );
                continue;
            }
            let mut conn = pool.conn.clone();
            let mut cursor: u64 = 0;
            loop {
                let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("COUNT")
                    .arg(1000)
                    .arg("TYPE")
                    .arg("stream")
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| Error::redis(format!("SCAN in pool {}", pool.name), e))?;
                out.extend(keys);
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(out.into_iter().collect())
    }

    /// The members of `group` on `stream` (`XINFO CONSUMERS`).
    pub async fn consumers(&self, stream: &str, group: &str) -> Result<Vec<ConsumerStats>> {
        let pool = self.pool_for(stream)?;
        let reply: Value = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(stream)
            .arg(group)
            .query_async(&mut pool.conn.clone())
            .await
            .map_err(|e| Error::redis(format!("XINFO CONSUMERS {stream} {group}"), e))?;
        Ok(value::array(&reply)
            .iter()
            .map(|c| ConsumerStats {
                name: value::get(c, "name")
                    .and_then(value::text)
                    .unwrap_or_default(),
                pending: value::get(c, "pending").and_then(value::int).unwrap_or(0) as u64,
                idle: Duration::from_millis(
                    value::get(c, "idle")
                        .and_then(value::int)
                        .unwrap_or(0)
                        .max(0) as u64,
                ),
            })
            .collect())
    }

    /// The oldest `count` entries `group` holds on `stream` without an ack (`XPENDING`).
    pub async fn pending(
        &self,
        stream: &str,
        group: &str,
        count: usize,
    ) -> Result<Vec<PendingEntry>> {
        let pool = self.pool_for(stream)?;
        let reply: Value = redis::cmd("XPENDING")
            .arg(stream)
            .arg(group)
            .arg("-")
            .arg("+")
            .arg(count)
            .query_async(&mut pool.conn.clone())
            .await
            .map_err(|e| Error::redis(format!("XPENDING {stream} {group}"), e))?;
        Ok(value::array(&reply)
            .iter()
            .filter_map(|row| {
                let row = value::array(row);
                Some(PendingEntry {
                    id: value::text(row.first()?)?,
                    owner: value::text(row.get(1)?)?,
                    idle: Duration::from_millis(value::int(row.get(2)?)?.max(0) as u64),
                    deliveries: value::int(row.get(3)?)?.max(0) as u64,
                })
            })
            .collect())
    }
}
