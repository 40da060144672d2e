//! Messages a consumer holds until their redelivery time: nacked ones (the handler asked for a
//! retry after a backoff) and released ones (dropped unsettled, due at once). Both backends keep
//! theirs here; each item is whatever the backend needs to hand the message out again.

use tokio::time::Instant;

/// Items waiting for their redelivery time.
#[derive(Debug)]
pub struct Redeliveries<T> {
    waiting: Vec<(Instant, T)>,
}

impl<T> Default for Redeliveries<T> {
    fn default() -> Self {
        Redeliveries {
            waiting: Vec::new(),
        }
    }
}

impl<T> Redeliveries<T> {
    /// An empty queue.
    pub fn new() -> Self {
        Self::default()
    }

    /// Waits `item` until `due`.
    pub fn push(&mut self, due: Instant, item: T) {
        self.waiting.push((due, item));
    }

    /// Takes out up to `max` items due at `now` (in no particular order).
    pub fn take_due(&mut self, now: Instant, max: usize) -> Vec<T> {
        let mut due = Vec::new();
        let mut i = 0;
        while i < self.waiting.len() && due.len() < max {
            if self.waiting[i].0 <= now {
                due.push(self.waiting.swap_remove(i).1);
            } else {
                i += 1;
            }
        }
        due
    }

    /// When the next item comes due, if any waits.
    pub fn next_due(&self) -> Option<Instant> {
        self.waiting.iter().map(|(due, _)| *due).min()
    }

    /// Keeps only the items `keep` is true for (those of partitions revoked, or of entries
    /// claimed by another member, go).
    pub fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) {
        self.waiting.retain(|(_, item)| keep(item));
    }

    /// The items waiting.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.waiting.iter().map(|(_, item)| item)
    }

    /// How many items wait.
    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    /// Whether none waits.
    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn only_what_is_due_comes_out_and_at_most_max() {
        let now = Instant::now();
        let mut q = Redeliveries::new();
        q.push(now + Duration::from_secs(5), "later");
        q.push(now, "a");
        q.push(now, "b");
        q.push(now, "c");
        assert_eq!(q.next_due(), Some(now));
        let mut first = q.take_due(now, 2);
        first.sort();
        assert_eq!(first.len(), 2);
        assert_eq!(q.len(), 2);
        q.retain(|i| *i != "later");
        assert_eq!(q.take_due(now, 10).len(), 1);
        assert!(q.is_empty());
        assert_eq!(q.next_due(), None);
    }
}
