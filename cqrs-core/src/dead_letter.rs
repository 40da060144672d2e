//! Dead letters: the messages a processor gave up on, and how to look at them, send them back to
//! their topic (redrive) or drop them (purge).
//!
//! A processor publishes a message it gives up on to its group's dead-letter topic with the
//! headers of [`headers`]. A backend that can manage those topics implements
//! [`DeadLetterStore`]; the `cqrs` command-line tool is built on it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;

use crate::{Message, Result};

/// The longest reason a dead letter carries, in bytes (see [`bounded`]).
pub const MAX_REASON: usize = 1024;

/// `text` cut to at most `max` bytes (at a character boundary), saying how much was cut: what a
/// dead letter's reason or a log line may echo of input that came from outside. A reason that
/// repeated a 500 KB header in full made a dead letter larger than the broker takes, so the
/// message was never settled.
///
/// ```
/// use cqrs_core::dead_letter::bounded;
/// assert_eq!(bounded("short", 10), "short");
/// assert_eq!(bounded(&"x".repeat(100), 10), "xxxxxxxxxx... (90 more bytes)");
/// ```
pub fn bounded(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    std::borrow::Cow::Owned(format!(
        "{}... ({} more bytes)",
        &text[..end],
        text.len() - end
    ))
}

/// The headers a processor writes on a dead letter, beside the message's own.
pub mod headers {
    /// Why the message was dead-lettered.
    pub const REASON: &str = "x-dead-letter-reason";
    /// The handler that failed.
    pub const HANDLER: &str = "x-dead-letter-handler";
    /// The consumer group.
    pub const GROUP: &str = "x-dead-letter-group";
    /// The topic the message came from.
    pub const TOPIC: &str = "x-dead-letter-topic";
    /// How many deliveries were made.
    pub const ATTEMPTS: &str = "x-dead-letter-attempts";
    /// When it was dead-lettered, in milliseconds since the Unix epoch.
    pub const TIME: &str = "x-dead-letter-time";
    /// The prefix every one of them starts with.
    pub const PREFIX: &str = "x-dead-letter-";
}

/// The header a redriven message carries: the id of the dead letter it came from.
pub const REDRIVEN_FROM: &str = "x-redriven-from";

/// The dead-letter topic of `group` unless its handler names another: `{group}.dead-letter`.
/// Processors publish there and the `cqrs` CLI reads there.
pub fn topic_of(group: &str) -> String {
    format!("{group}.dead-letter")
}

/// One message on a dead-letter topic, with what the processor wrote about its failure.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DeadLetter {
    /// Its id on the dead-letter topic: the Redis entry id, or `partition:offset` on Kafka.
    pub id: String,
    /// The message as it was dead-lettered (its headers hold the `x-dead-letter-*` fields).
    pub message: Message,
    /// Why it was dead-lettered.
    pub reason: Option<String>,
    /// The handler that failed (empty when none took it).
    pub handler: Option<String>,
    /// The consumer group.
    pub group: Option<String>,
    /// The topic it came from, where a redrive publishes it.
    pub topic: Option<String>,
    /// Deliveries made before it was dead-lettered.
    pub attempts: Option<u32>,
    /// Time since it was dead-lettered.
    pub age: Option<Duration>,
}

impl DeadLetter {
    /// Reads the processor's headers of `message`, found on a dead-letter topic under `id`.
    /// `stored_at_ms` (milliseconds since the Unix epoch) is when the broker took it, for dead
    /// letters written before processors stamped [`headers::TIME`].
    pub fn new(id: impl Into<String>, message: Message, stored_at_ms: Option<u64>) -> Self {
        let header = |k: &str| message.metadata.headers.get(k).cloned();
        let at_ms = header(headers::TIME)
            .and_then(|t| t.parse().ok())
            .or(stored_at_ms);
        let age = at_ms.and_then(|ms| {
            let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?;
            now.checked_sub(Duration::from_millis(ms))
        });
        DeadLetter {
            id: id.into(),
            reason: header(headers::REASON),
            handler: header(headers::HANDLER),
            group: header(headers::GROUP),
            topic: header(headers::TOPIC),
            attempts: header(headers::ATTEMPTS).and_then(|a| a.parse().ok()),
            age,
            message,
        }
    }

    /// The message a redrive publishes: this one without its `x-dead-letter-*` headers, with
    /// [`REDRIVEN_FROM`] set to the dead letter's id.
    pub fn redriven(&self) -> Message {
        let mut message = self.message.clone();
        let headers = &mut message.metadata.headers;
        headers.retain(|k, _| !k.starts_with(headers::PREFIX));
        headers.insert(REDRIVEN_FROM.to_owned(), self.id.clone());
        message
    }
}

/// What [`DeadLetterStore::redrive_all`] and [`DeadLetterStore::purge_all`] call with each dead
/// letter they moved or removed (to print it, say).
pub type EachDeadLetter<'a> = dyn for<'d> FnMut(&'d DeadLetter) + Send + 'a;

/// A backend whose dead-letter topics can be listed, redriven and purged.
///
/// Implemented by the Redis backend (entries are deleted from the stream) and the Kafka backend
/// (records cannot be deleted, so what was redriven or purged is recorded as the committed
/// offsets of a consumer group of its own).
#[async_trait]
pub trait DeadLetterStore: Send + Sync {
    /// Whether the dead-letter topic `topic` exists.
    async fn has_dead_letters(&self, topic: &str) -> Result<bool>;

    /// The dead letters on `topic` that were neither redriven nor purged, oldest first (on Kafka:
    /// by partition, then offset).
    async fn dead_letters(&self, topic: &str) -> Result<Vec<DeadLetter>>;

    /// At most `limit` of [`DeadLetterStore::dead_letters`], in the same order, after the one
    /// whose id is `after` (from the first when `None`): a page, for topics too large to read
    /// whole. The backends read only the page; this default reads the whole list.
    async fn dead_letters_page(
        &self,
        topic: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>> {
        let all = self.dead_letters(topic).await?;
        let from = match after {
            None => 0,
            Some(after) => all
                .iter()
                .position(|d| d.id == after)
                .map_or(all.len(), |i| i + 1),
        };
        Ok(all.into_iter().skip(from).take(limit).collect())
    }

    /// The dead letters on `topic` with an id in `ids`, in the order of
    /// [`DeadLetterStore::dead_letters`]; an id that is not there (redriven, purged, never was) is
    /// left out. The backends read only what the ids point at; this default reads the whole
    /// list.
    async fn dead_letters_by_id(&self, topic: &str, ids: &[String]) -> Result<Vec<DeadLetter>> {
        let mut all = self.dead_letters(topic).await?;
        all.retain(|d| ids.contains(&d.id));
        Ok(all)
    }

    /// Publishes each dead letter of `topic` (those with an id in `ids`, or all) back to the
    /// topic it came from as [`DeadLetter::redriven`] makes it, then removes it from `topic`.
    /// One at a time, in that order: a failure leaves a message either not yet redriven or
    /// redriven and still listed (redriven again next time), never lost. A dead letter without
    /// its original topic is an error before anything moves. Returns what was redriven.
    async fn redrive(&self, topic: &str, ids: Option<&[String]>) -> Result<Vec<DeadLetter>>;

    /// Removes the dead letters of `topic` with an id in `ids`, or all of them; returns how many
    /// went.
    async fn purge(&self, topic: &str, ids: Option<&[String]>) -> Result<u64>;

    /// Redrives, as [`DeadLetterStore::redrive`] does, every dead letter on `topic` that is
    /// there when it starts, `page` at a time: what it holds is bounded by `page`, not by the
    /// topic. A letter dead-lettered while it runs (a redriven message failing again) is left
    /// for the next run, so it ends. `each` sees each letter once it is back on its topic.
    /// Returns how many were redriven. The backends read a page at a time; this default reads
    /// the whole list.
    async fn redrive_all(
        &self,
        topic: &str,
        page: usize,
        each: &mut EachDeadLetter<'_>,
    ) -> Result<u64> {
        let _ = page;
        let done = self.redrive(topic, None).await?;
        for d in &done {
            each(d);
        }
        Ok(done.len() as u64)
    }

    /// Removes, as [`DeadLetterStore::purge`] does, every dead letter on `topic` that is there
    /// when it starts, `page` at a time, and only those: a letter dead-lettered meanwhile stays.
    /// `each` sees each letter removed. Returns how many went. The backends read a page at a
    /// time; this default reads the whole list.
    async fn purge_all(
        &self,
        topic: &str,
        page: usize,
        each: &mut EachDeadLetter<'_>,
    ) -> Result<u64> {
        let _ = page;
        let dead = self.dead_letters(topic).await?;
        let ids: Vec<String> = dead.iter().map(|d| d.id.clone()).collect();
        let removed = self.purge(topic, Some(&ids)).await?;
        for d in &dead {
            each(d);
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_headers_and_redrives_without_them() {
        let mut m = Message::new("tickets.Booked", b"{}".to_vec());
        let h = &mut m.metadata.headers;
        h.insert(headers::REASON.into(), "refused".into());
        h.insert(headers::TOPIC.into(), "tickets".into());
        h.insert(headers::ATTEMPTS.into(), "3".into());
        h.insert(headers::TIME.into(), "1".into());
        h.insert("traceparent".into(), "00-abc".into());
        let d = DeadLetter::new("0:7", m, None);
        assert_eq!(d.reason.as_deref(), Some("refused"));
        assert_eq!(d.topic.as_deref(), Some("tickets"));
        assert_eq!(d.attempts, Some(3));
        assert!(d.age.is_some_and(|a| a > Duration::from_secs(3600)));
        let back = d.redriven();
        let keys: Vec<&str> = back.metadata.headers.keys().map(String::as_str).collect();
        assert_eq!(keys, ["traceparent", REDRIVEN_FROM]);
        assert_eq!(back.metadata.headers[REDRIVEN_FROM], "0:7");
        assert_eq!(back.payload, d.message.payload);
    }
}

/// Why a redrive stopped, the same on every backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RedriveError {
    /// A chosen dead letter has no `x-dead-letter-topic` header: where it goes back to is
    /// unknown, and nothing was redriven.
    #[error("dead letter {id} on {dead_letters} has no x-dead-letter-topic header: its topic is unknown")]
    NoTopic {
        /// The dead-letter topic.
        dead_letters: String,
        /// The dead letter's id on it.
        id: String,
    },
    /// Publishing a dead letter back to its topic failed: it, and those after it, are still dead
    /// letters.
    #[error(
        "redriving dead letter {id} of {dead_letters} to {topic} failed; it is still a dead letter"
    )]
    Publish {
        /// The dead-letter topic.
        dead_letters: String,
        /// The dead letter's id on it.
        id: String,
        /// The topic it was going back to.
        topic: String,
        /// Why.
        #[source]
        source: Box<crate::Error>,
    },
}

impl From<RedriveError> for crate::Error {
    fn from(e: RedriveError) -> Self {
        match e {
            e @ RedriveError::NoTopic { .. } => crate::Error::Config(e.to_string()),
            RedriveError::Publish { ref source, .. } => {
                let retryable = source.is_retryable();
                if retryable {
                    crate::Error::retryable("redriving dead letters", e)
                } else {
                    crate::Error::fatal("redriving dead letters", e)
                }
            }
        }
    }
}

/// What a backend does for each dead letter [`redrive_each`] sends back.
#[async_trait]
pub trait Redrive: Send {
    /// How the backend finds a dead letter again (a stream entry id, a partition and offset).
    type Key: Send + Sync;

    /// Publishes `message` to `topic`, returning once the broker took it.
    async fn publish(&mut self, topic: &str, message: Message) -> Result<()>;

    /// Deletes or records the dead letter `key`, once it is back on its topic.
    async fn done(&mut self, key: &Self::Key, dead: &DeadLetter) -> Result<()>;
}

/// Redrives the `chosen` dead letters of `dead_letters`, in order, as every backend does: first
/// checks that each names its original topic (if one does not, nothing is redriven); then, for
/// each, publishes it back ([`DeadLetter::redriven`]) and only once that succeeded calls
/// [`Redrive::done`] (delete it, record it), so a failure leaves it, and those after it, where
/// they were. Returns the dead letters redriven.
pub async fn redrive_each<R: Redrive>(
    dead_letters: &str,
    chosen: Vec<(R::Key, DeadLetter)>,
    backend: &mut R,
) -> Result<Vec<DeadLetter>> {
    if let Some((_, d)) = chosen.iter().find(|(_, d)| d.topic.is_none()) {
        return Err(RedriveError::NoTopic {
            dead_letters: dead_letters.to_owned(),
            id: d.id.clone(),
        }
        .into());
    }
    let mut redriven = Vec::with_capacity(chosen.len());
    for (key, d) in chosen {
        let to = d.topic.clone().unwrap_or_default();
        if let Err(e) = backend.publish(&to, d.redriven()).await {
            return Err(RedriveError::Publish {
                dead_letters: dead_letters.to_owned(),
                id: d.id.clone(),
                topic: to,
                source: Box::new(e),
            }
            .into());
        }
        backend.done(&key, &d).await?;
        redriven.push(d);
    }
    Ok(redriven)
}
