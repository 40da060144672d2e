//! What the processor tests share: a keyed event and a wait for a condition.
#![allow(dead_code)]

use std::time::Duration;

use cqrs::Event;
use serde::{Deserialize, Serialize};

/// How long a test waits for something that should happen.
pub const WAIT: Duration = Duration::from_secs(10);

/// An event with a key, so that order per key can be checked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Keyed {
    pub key: String,
    pub seq: u32,
}

impl Event for Keyed {
    const NAME: &'static str = "Keyed";
    fn key(&self) -> Option<String> {
        Some(self.key.clone())
    }
}

/// `n` events numbered from 0, over `keys` keys.
pub fn keyed(n: u32, keys: u32) -> Vec<Keyed> {
    (0..n)
        .map(|seq| Keyed {
            key: format!("k{}", seq % keys),
            seq,
        })
        .collect()
}

/// Waits until `check` holds, polling; panics after [`WAIT`].
pub async fn eventually(what: &str, check: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
