//! No piece of a Redis password surfaces anywhere an address can, on a service that really runs
//! with it: generated passwords (each holding a character an address treats specially), each an
//! ACL user's of a real redis-server, are used end to end (a bus publishes, a processor retries
//! and dead-letters), and everything the service shows is searched for them: the logs at every
//! level (span fields included), the metrics as Prometheus renders them, the manifest, the
//! AsyncAPI document, and a refused login's error (`Display`, the report, `Debug`). The address
//! shapes a `RedisBackend` parses, with their errors, `Display` and `Debug`, are covered by
//! `cqrs-redis`'s `no_piece_of_a_password_prints_for_any_shape`; the CLI's output by its tests.

#![allow(clippy::unwrap_used)]

use cqrs_test_support as support;

use cqrs::asyncapi::Document;
use cqrs::prometheus::PrometheusBuilder;
use cqrs::redis::RedisBackend;
use cqrs::{permanent, CancellationToken, Event, EventBus, EventProcessor, RetryPolicy};
use serde::{Deserialize, Serialize};
use support::{eventually, unique, RedisServer};

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
struct Booked {
    #[event(key)]
    ticket: String,
    n: u32,
}

/// Passwords holding each character an address treats specially, with a random part.
fn passwords() -> Vec<String> {
    let id = cqrs::conformance::unique("x");
    let tail = &id[id.len() - 6..];
    ["/", "?", "#", ",", ":", "@", "&", "=", "+", "%", ";", "!"]
        .iter()
        .enumerate()
        .map(|(i, sep)| format!("Pw{i}{sep}Sec{sep}ret{tail}"))
        .collect()
}

/// The password as the userinfo of a URL carries it (RFC 3986 percent-encoding).
fn encoded(password: &str) -> String {
    password
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The pieces of `password` none of which may show: itself, encoded, and each half.
fn pieces(password: &str) -> Vec<String> {
    let half = password.len() / 2;
    vec![
        password.to_owned(),
        encoded(password),
        password[..half].to_owned(),
        password[half..].to_owned(),
    ]
}

#[tokio::test]
async fn no_piece_of_a_password_shows_in_logs_metrics_manifests_asyncapi_or_errors() {
    let passwords = passwords();
    let users: Vec<String> = passwords
        .iter()
        .enumerate()
        .map(|(i, p)| format!("user{i} on >{p} ~* &* +@all"))
        .collect();
    let server =
        RedisServer::start_with_users(&users.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let (_logs_guard, logs) = support::captured_logs(tracing::Level::TRACE);
    let recorder = PrometheusBuilder::new().build_recorder();
    let metrics = recorder.handle();
    let _metrics_guard = metrics::set_default_local_recorder(&recorder);

    let mut shown = Vec::new();
    for (i, password) in passwords.iter().enumerate() {
        let url = format!(
            "redis://user{i}:{}@127.0.0.1:{}/0",
            encoded(password),
            server.port
        );
        let backend = RedisBackend::connect(&url).await.unwrap();
        let topic = unique("secret-orders");
        let service = unique("svc");
        let mut processor = EventProcessor::new(backend.clone(), service.as_str())
            .topics(support::one_topic(&topic));
        processor
            .handle("book", |e: Booked| async move {
                match e.n {
                    0 => Ok(()),
                    1 => Err(permanent("sold out")),
                    _ => Err("the printer is down".into()),
                }
            })
            .unwrap()
            .retry(RetryPolicy::attempts(2).backoff(std::time::Duration::from_millis(10), 1.0));
        let manifest = processor.manifest();
        shown.push(format!("{manifest}"));
        shown.push(format!("{manifest:?}"));
        shown.push(
            Document::new("secrets")
                .manifest(manifest.clone())
                .to_json()
                .to_string(),
        );
        let running = processor.start(CancellationToken::new()).await.unwrap();
        let events: Vec<Booked> = (0..3)
            .map(|n| Booked {
                ticket: format!("t{n}"),
                n,
            })
            .collect();
        EventBus::new(backend.clone())
            .topics(support::one_topic(&topic))
            .publish_all(&events)
            .await
            .unwrap();
        // Handled, dead-lettered for good, and dead-lettered after its retries.
        let dead = topic.clone();
        eventually("the three settled", || {
            let backend = backend.clone();
            let topic = dead.clone();
            async move {
                let stats = backend.stats(&topic).await.unwrap();
                stats
                    .groups
                    .iter()
                    .all(|g| g.pending == 0 && g.lag == Some(0))
                    && !stats.groups.is_empty()
            }
        })
        .await;
        running.shutdown().await.unwrap();

        // A refused login: its error, every way it prints.
        let wrong = format!(
            "redis://user{i}:{}x@127.0.0.1:{}/0",
            encoded(password),
            server.port
        );
        let refused = cqrs::Error::from(RedisBackend::connect(&wrong).await.unwrap_err());
        shown.push(format!("{refused}"));
        shown.push(refused.report());
        shown.push(format!("{refused:?}"));
    }
    shown.push(logs.text());
    shown.push(metrics.render());

    let everything = shown.join("\n");
    // What is searched holds what it should: the handlers' failures (logs), the address
    // (manifest, AsyncAPI), the counters (metrics).
    for expected in [
        "sold out",
        "the printer is down",
        "redis pool",
        "127.0.0.1",
        "cqrs_dead_lettered",
    ] {
        assert!(
            everything.contains(expected),
            "`{expected}` shows nowhere: is the test looking at anything?"
        );
    }
    for password in &passwords {
        for piece in pieces(password) {
            if let Some(at) = everything.find(&piece) {
                let from = at.saturating_sub(80);
                panic!(
                    "`{piece}` of a password shows: ...{}...",
                    &everything[from..(at + piece.len() + 40).min(everything.len())]
                );
            }
        }
    }
}
