//! Publishing: `XADD`s in one round trip, and what to do when the connection goes down during it.
//!
//! A connection lost (or a reply timed out) after the commands were written leaves it open
//! whether the server took them: all, none, or the first of a pipeline. So does an error the
//! server gives while it cannot take writes for a moment (`LOADING` after a restart, a cluster's
//! failover): a pipeline's first commands may get it and the rest not. Sending them again would
//! add a second entry for each one it took, a duplicate every consumer group then handles. So
//! the publish looks in the stream first: it pages through the entries added since the commands
//! were sent, by the server's clock, for the messages' ids (the `id` field), and sends only the
//! messages it did not find, in their order (one at a time after a cluster's `ASK` or `MOVED`).
//! It goes on until every message is in the stream or
//! [`RedisOptions::publish_timeout`](crate::RedisOptions) has passed; then the error is returned
//! and it is open again which messages arrived.
//!
//! What it cannot see: commands still unread in the server's socket when the check runs (the
//! first check waits 50 ms; a server busy longer than that, as a reply that timed out suggests,
//! may take them after it), and entries trimmed by `MAXLEN` meanwhile. Those are sent again: a
//! duplicate, as every publish that fails could make before.

use std::borrow::Borrow;
use std::collections::HashSet;
use std::time::{Duration, Instant};

use cqrs_core::Message;
use redis::Value;

use crate::conn::Conn;
use crate::error::{is_transient, Error};
use crate::value;

/// Entries read a page while looking for the messages.
const PAGE: usize = 1_000;
/// Entries looked through at most. Past it, the messages not found count as unknown: the
/// publish fails rather than send them again.
const MAX_SCANNED: usize = 100_000;
/// Taken off the server's clock for the first entry that can be ours: its clock may step back a
/// little (NTP), and in a cluster the node that answers `TIME` may not be the stream's.
const CLOCK_MARGIN_MS: u64 = 1_000;

/// After sending `messages` (at `started`) failed with `lost`. When that leaves it open what the
/// server took, finds what it took and sends the rest, again and again, until all arrived or
/// `timeout` passed (see the module's documentation).
///
/// The publish calls it only when its send failed, in a box of its own: the publish's own future
/// stays as small as it was without it (a future within it took ~150 instructions a publish
/// more, callgrind).
pub(crate) async fn recover(
    conn: &mut Conn,
    stream: &str,
    max_len: Option<usize>,
    messages: &[Message],
    started: Instant,
    mut lost: redis::RedisError,
    timeout: Duration,
) -> Result<(), Error> {
    let failed = |e| Error::redis(format!("XADD to {stream}"), e);
    let mut unsent: Vec<&Message> = messages.iter().collect();
    let mut sent_at = started;
    let mut delay = Duration::from_millis(50);
    loop {
        if !is_transient(&lost) {
            return Err(failed(lost));
        }
        // What the server took is open: find it before sending anything again.
        loop {
            if started.elapsed() + delay > timeout {
                return Err(failed(lost));
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(1));
            match missing(conn, stream, sent_at.elapsed(), &unsent).await {
                Ok(Some(missing)) => {
                    unsent.retain(|m| missing.contains(m.id.as_str()));
                    break;
                }
                // Too much was added since: whether they arrived stays open.
                Ok(None) => return Err(failed(lost)),
                // Gone again, or still loading its data after a restart.
                Err(e) if is_transient(&e) => {}
                // The server answered, with an error (an ACL without XRANGE or TIME, ...).
                Err(e) => {
                    tracing::warn!(
                        stream,
                        error = %e,
                        "cannot look for the messages of a publish cut by a lost connection"
                    );
                    return Err(failed(lost));
                }
            }
        }
        if unsent.is_empty() {
            return Ok(());
        }
        tracing::debug!(
            stream,
            count = unsent.len(),
            "the connection went down during a publish; sending what the server did not take"
        );
        sent_at = Instant::now();
        let sent = if matches!(lost.code(), Some("ASK" | "MOVED")) {
            // A slot halfway through a move: the client library follows `ASK` for one command,
            // not for a pipeline (its first command is written, the others get `MOVED`).
            send_one_by_one(conn, stream, max_len, &unsent).await
        } else {
            send(conn, stream, max_len, &unsent).await
        };
        match sent {
            Ok(()) => return Ok(()),
            Err(e) => lost = e,
        }
    }
}

/// One `XADD` a round trip, in order, up to the first that fails.
async fn send_one_by_one(
    conn: &mut Conn,
    stream: &str,
    max_len: Option<usize>,
    messages: &[&Message],
) -> redis::RedisResult<()> {
    for m in messages {
        send(conn, stream, max_len, std::slice::from_ref(m)).await?;
    }
    Ok(())
}

/// One `XADD`, or a pipeline of them: one round trip. `Publisher::publish` (in `lib.rs`) has
/// the same send written inline: awaited there as a call, it cost ~150 instructions a publish.
async fn send<M: Borrow<Message>>(
    conn: &mut Conn,
    stream: &str,
    max_len: Option<usize>,
    messages: &[M],
) -> redis::RedisResult<()> {
    if let [message] = messages {
        crate::xadd(stream, max_len, message.borrow())
            .query_async::<Value>(conn)
            .await
            .map(drop)
    } else {
        let mut pipe = redis::pipe();
        for m in messages {
            pipe.add_command(crate::xadd(stream, max_len, m.borrow()))
                .ignore();
        }
        pipe.query_async::<()>(conn).await
    }
}

/// The ids among `messages` that are not entries of `stream` added in the last `since` (by the
/// server's clock), or `None` when more than [`MAX_SCANNED`] entries were added since.
async fn missing<'m>(
    conn: &mut Conn,
    stream: &str,
    since: Duration,
    messages: &[&'m Message],
) -> redis::RedisResult<Option<HashSet<&'m str>>> {
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(conn).await?;
    let now_ms = secs * 1_000 + micros / 1_000;
    let since_ms = u64::try_from(since.as_millis()).unwrap_or(u64::MAX);
    let first = now_ms.saturating_sub(since_ms.saturating_add(CLOCK_MARGIN_MS));
    let mut missing: HashSet<&'m str> = messages.iter().map(|m| m.id.as_str()).collect();
    let mut from = first.to_string();
    let mut scanned = 0;
    while !missing.is_empty() {
        let page: Value = redis::cmd("XRANGE")
            .arg(stream)
            .arg(&from)
            .arg("+")
            .arg("COUNT")
            .arg(PAGE)
            .query_async(conn)
            .await?;
        let entries = value::entries(page);
        for entry in &entries {
            let id = entry
                .fields
                .as_ref()
                .and_then(|f| value::get(f, cqrs_core::wire::field::ID))
                .and_then(value::bytes)
                .and_then(|id| std::str::from_utf8(id).ok());
            if let Some(id) = id {
                missing.remove(id);
            }
        }
        scanned += entries.len();
        match entries.last() {
            Some(last) if entries.len() == PAGE => {
                if scanned >= MAX_SCANNED {
                    return Ok(None);
                }
                from = format!("({}", last.id);
            }
            _ => break,
        }
    }
    Ok(Some(missing))
}
