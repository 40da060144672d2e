//! Taking over pending entries: this member's own after a restart, those dead members left idle
//! (`XCLAIM`, `XAUTOCLAIM`), and removing members idle for good.

use super::*;

impl RedisConsumer {
    /// `XCLAIM`s `ids` (with their attempt numbers) to this member.
    pub(super) async fn claim_ids(
        &mut self,
        stream: &Arc<str>,
        min_idle: Duration,
        ids: &[(String, u32)],
        out: &mut Vec<Delivery>,
    ) -> Result<(), Error> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut cmd = redis::cmd("XCLAIM");
        cmd.arg(&**stream)
            .arg(&self.group)
            .arg(&self.me)
            .arg(min_idle.as_millis() as u64);
        for (id, _) in ids {
            cmd.arg(id);
        }
        let reply = self.query(&cmd, &format!("XCLAIM on {stream}")).await?;
        let attempts: HashMap<&str, u32> = ids.iter().map(|(id, a)| (id.as_str(), *a)).collect();
        let mut taken = Vec::new();
        for entry in value::entries(reply) {
            let attempt = attempts.get(entry.id.as_str()).copied().unwrap_or(2);
            if let Some(d) = self.delivery(stream, entry, attempt, &mut taken) {
                out.push(d);
            }
        }
        lock(&self.local).inflight.extend(taken);
        Ok(())
    }

    /// Pending entries of `stream`: `(id, owner, idle, deliveries)`.
    pub(super) async fn pending(
        &mut self,
        stream: &Arc<str>,
        idle: Option<Duration>,
        start: &str,
        count: usize,
        owner: Option<&str>,
    ) -> Result<Vec<(String, String, u32)>, Error> {
        let mut cmd = redis::cmd("XPENDING");
        cmd.arg(&**stream).arg(&self.group);
        if let Some(idle) = idle {
            cmd.arg("IDLE").arg(idle.as_millis() as u64);
        }
        cmd.arg(start).arg("+").arg(count);
        if let Some(owner) = owner {
            cmd.arg(owner);
        }
        let reply = self.query(&cmd, &format!("XPENDING on {stream}")).await?;
        Ok(value::array(&reply)
            .iter()
            .filter_map(|row| {
                let row = value::array(row);
                Some((
                    value::text(row.first()?)?,
                    value::text(row.get(1)?)?,
                    u32::try_from(value::int(row.get(3)?)?).ok()?,
                ))
            })
            .collect())
    }

    /// Re-reads this member's own pending entries (a restart, or a reply lost to a dropped
    /// connection), skipping those it is handling now.
    pub(super) async fn resume_own(
        &mut self,
        max: usize,
        out: &mut Vec<Delivery>,
    ) -> Result<(), Error> {
        let Some(cursors) = self.resume.clone() else {
            return Ok(());
        };
        let me = self.me.clone();
        let mut next = BTreeMap::new();
        for (stream, cursor) in cursors {
            if out.len() >= max {
                next.insert(stream, cursor);
                continue;
            }
            let rows = self
                .pending(&stream, None, &cursor, max - out.len(), Some(&me))
                .await?;
            let Some((last, _, _)) = rows.last() else {
                continue;
            };
            next.insert(stream.clone(), format!("({last}"));
            let ids: Vec<(String, u32)> = {
                let local = lock(&self.local);
                rows.into_iter()
                    .filter(|(id, _, _)| !local.holds(&stream, id))
                    .map(|(id, _, count)| (id, count + 1))
                    .collect()
            };
            self.claim_ids(&stream, Duration::ZERO, &ids, out).await?;
        }
        self.resume = if next.is_empty() { None } else { Some(next) };
        Ok(())
    }

    /// Claims entries other members (or a lost reply of this one) left idle too long.
    pub(super) async fn claim_idle_entries(
        &mut self,
        idle: Duration,
        max: usize,
        out: &mut Vec<Delivery>,
    ) -> Result<(), Error> {
        for stream in self.streams.clone() {
            if out.len() >= max {
                break;
            }
            // Page through the pending list from where the last look stopped, so that entries
            // far down it (a dead member's) are reached even when the first page is all skipped.
            let from = self
                .claim_cursor
                .get(&stream)
                .cloned()
                .unwrap_or_else(|| "-".to_owned());
            let count = max - out.len();
            let rows = self
                .pending(&stream, Some(idle), &from, count, None)
                .await?;
            match rows.last() {
                Some((last, _, _)) if rows.len() == count => {
                    self.claim_cursor.insert(stream.clone(), format!("({last}"));
                }
                _ => {
                    self.claim_cursor.remove(&stream);
                }
            }
            let ids: Vec<(String, u32)> = {
                let mut local = lock(&self.local);
                let ids: Vec<(String, u32)> = rows
                    .into_iter()
                    .filter(|(id, owner, _)| *owner != self.me || !local.holds(&stream, id))
                    .map(|(id, _, count)| (id, count + 1))
                    .collect();
                local
                    .retries
                    .retain(|r| !(r.stream == stream && ids.iter().any(|(id, _)| *id == r.id)));
                ids
            };
            if !ids.is_empty() {
                tracing::info!(stream = %stream, group = %self.group, count = ids.len(), "claiming idle entries");
            }
            self.claim_ids(&stream, idle, &ids, out).await?;
        }
        Ok(())
    }

    /// Removes members idle for long that own nothing.
    pub(super) async fn remove_idle_consumers(&mut self) -> Result<(), Error> {
        let limit = self.options.remove_idle_consumers_after.as_millis() as i64;
        for stream in self.streams.clone() {
            let mut cmd = redis::cmd("XINFO");
            cmd.arg("CONSUMERS").arg(&*stream).arg(&self.group);
            let reply = self
                .query(&cmd, &format!("XINFO CONSUMERS on {stream}"))
                .await?;
            for c in value::array(&reply) {
                let name = value::get(c, "name").and_then(value::text);
                let pending = value::get(c, "pending").and_then(value::int);
                let idle = value::get(c, "idle").and_then(value::int);
                if let (Some(name), Some(0), Some(idle)) = (name, pending, idle) {
                    if name != self.me && idle >= limit {
                        let mut del = redis::cmd("XGROUP");
                        del.arg("DELCONSUMER")
                            .arg(&*stream)
                            .arg(&self.group)
                            .arg(&name);
                        self.query(&del, "XGROUP DELCONSUMER").await?;
                        tracing::info!(stream = %stream, group = %self.group, consumer = %name, "removed idle consumer");
                    }
                }
            }
        }
        Ok(())
    }

    /// Warns when a stream lost entries this group had not read: `MAXLEN` trimming
    /// (`Topology::max_len`) with the group behind. Redis drops them whether or not groups read
    /// them, and says nothing. Once per stream, and again if more are lost.
    pub(super) async fn warn_if_trimmed_unread(&mut self) -> Result<(), Error> {
        for stream in self.streams.clone() {
            let added = crate::admin::added_and_length(&mut self.conn, &stream).await?;
            if added.is_none_or(|(added, length)| added <= length) {
                continue;
            }
            let groups = crate::admin::group_infos(&mut self.conn, &stream).await?;
            let lost = groups
                .iter()
                .find(|g| {
                    value::get(g, "name").and_then(value::text).as_deref() == Some(&self.group)
                })
                .map_or(0, |g| crate::admin::group_deleted_unread(added, g));
            if lost > self.trim_warned.get(&stream).copied().unwrap_or(0) {
                tracing::warn!(
                    %stream,
                    group = %self.group,
                    lost,
                    "entries of the stream were deleted before this group read them (MAXLEN trimming with the group behind): they are lost to it; set max_len above the longest backlog, or trim with `cqrs trim`"
                );
                self.trim_warned.insert(stream.clone(), lost);
            }
        }
        Ok(())
    }
}
