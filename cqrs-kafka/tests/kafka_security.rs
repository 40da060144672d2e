//! The Kafka backend against Apache Kafka with TLS, SASL and ACLs (`scripts/kafka start DIR
//! --secure`, started by `scripts/test`; `KAFKA_SECURE_DIR` names its directory). The broker's
//! ACLs: `alice` may do everything on topics and groups named `ok-*` and only read and describe
//! topics named `ro-*`; `mallory` may nothing. Its PLAINTEXT listener is the super user's, for
//! setting up and for looking at what the broker holds.
#![cfg(feature = "ssl")]
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cqrs::backend::{Publisher, Subscriber, Subscription};
use cqrs::processor::dead_letter_headers as dlq;
use cqrs::{CancellationToken, Event, EventBus, EventProcessor, Message};
use cqrs_kafka::{Error, KafkaBackend, KafkaConfig};
use cqrs_test_support::{self as support, eventually, unique, SecureKafka, WAIT};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Paid {
    n: u32,
}

impl Event for Paid {
    const NAME: &'static str = "Paid";
}

/// `user` over SASL_SSL with `mechanism`, trusting the broker's CA.
fn sasl(broker: &SecureKafka, mechanism: &str, user: &str, password: &str) -> KafkaConfig {
    KafkaConfig::new(broker.get("SASL_SSL"))
        .partitions(2)
        .set("security.protocol", "SASL_SSL")
        .set("sasl.mechanism", mechanism)
        .set("sasl.username", user)
        .set("sasl.password", password)
        .set("ssl.ca.location", broker.get("CA"))
}

/// alice over TLS with her client certificate (the broker maps its CN to `User:alice`).
fn mutual_tls(broker: &SecureKafka) -> KafkaConfig {
    KafkaConfig::new(broker.get("SSL"))
        .partitions(2)
        .set("security.protocol", "SSL")
        .set("ssl.ca.location", broker.get("CA"))
        .set("ssl.certificate.location", broker.get("CLIENT_CERT"))
        .set("ssl.key.location", broker.get("CLIENT_KEY"))
}

/// alice, signed in over SASL_SSL with `mechanism`.
async fn alice(broker: &SecureKafka, mechanism: &str) -> KafkaBackend {
    let password = broker.get("ALICE_PASSWORD");
    KafkaBackend::connect(sasl(broker, mechanism, "alice", password))
        .await
        .unwrap()
}

/// The super user, over the PLAINTEXT listener.
async fn super_user(broker: &SecureKafka) -> KafkaBackend {
    KafkaBackend::connect(KafkaConfig::new(broker.get("PLAINTEXT")).partitions(2))
        .await
        .unwrap()
}

/// The messages `group` has not consumed on `topic`, as the broker holds them (its committed
/// offsets against the partitions' ends), seen by the super user.
async fn lag(broker: &SecureKafka, topic: &str, group: &str) -> Option<u64> {
    let groups = super_user(broker).await.groups(topic, group).await.unwrap();
    groups
        .iter()
        .find(|g| g.group == group)
        .and_then(|g| g.lag.map(|lag| lag + g.pending))
}

/// For each way alice can sign in (SCRAM-SHA-256, SCRAM-SHA-512, PLAIN, a client certificate):
/// events published, handled, the failing one dead-lettered with its reason, and the group's
/// offsets committed past all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authorized_user_publishes_consumes_commits_and_dead_letters_over_each_mechanism() {
    support::logs();
    let broker = SecureKafka::shared();
    let password = broker.get("ALICE_PASSWORD").to_owned();
    let ways = [
        (
            "SCRAM-SHA-256",
            sasl(&broker, "SCRAM-SHA-256", "alice", &password),
        ),
        (
            "SCRAM-SHA-512",
            sasl(&broker, "SCRAM-SHA-512", "alice", &password),
        ),
        ("PLAIN", sasl(&broker, "PLAIN", "alice", &password)),
        ("mutual TLS", mutual_tls(&broker)),
    ];
    for (way, config) in ways {
        let backend = KafkaBackend::connect(config).await.unwrap();
        let topic = unique("ok-paid");
        let service = unique("ok-svc");
        let handled = Arc::new(AtomicU32::new(0));
        let mut p =
            EventProcessor::new(backend.clone(), &service).topics(support::one_topic(&topic));
        let h = handled.clone();
        p.handle("ledger", move |e: Paid| {
            let h = h.clone();
            async move {
                if e.n == 13 {
                    return Err(cqrs::permanent("unlucky"));
                }
                h.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        })
        .unwrap();
        let running = p.start(CancellationToken::new()).await.unwrap();
        let bus = EventBus::new(backend.clone()).topics(support::one_topic(&topic));
        for n in [1, 13, 2] {
            bus.publish(&Paid { n }).await.unwrap();
        }
        let dead = format!("{service}.ledger.dead-letter");
        let mut reader = backend
            .subscribe(&Subscription::new(unique("ok-reader"), [&dead]))
            .await
            .unwrap();
        let d = cqrs::conformance::receive_n(&mut *reader, 1).await;
        assert_eq!(
            d[0].message().metadata.headers[dlq::REASON],
            "unlucky",
            "{way}"
        );
        eventually(&format!("{way}: two events handled"), || {
            let n = handled.load(Ordering::SeqCst);
            async move { n == 2 }
        })
        .await;
        let group = format!("{service}.ledger");
        running.shutdown().await.unwrap();
        assert_eq!(
            lag(&broker, &topic, &group).await,
            Some(0),
            "{way}: all committed"
        );
    }
}

/// A wrong password (SCRAM and PLAIN), a user the broker does not know, and a CA the client does
/// not trust each fail `connect` at once with a permanent error that says the brokers refused the
/// client; no password is in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_fail_connect_at_once_with_a_permanent_error() {
    support::logs();
    let broker = SecureKafka::shared();
    let wrong = "wr0ng/pass?word=sec";
    let cases = [
        (
            "wrong SCRAM password",
            sasl(&broker, "SCRAM-SHA-256", "alice", wrong),
        ),
        (
            "wrong PLAIN password",
            sasl(&broker, "PLAIN", "alice", wrong),
        ),
        (
            "unknown user",
            sasl(&broker, "SCRAM-SHA-512", "nobody", wrong),
        ),
        (
            "untrusted broker certificate",
            sasl(&broker, "SCRAM-SHA-256", "alice", wrong).set("ssl.ca.location", "probe"),
        ),
    ];
    for (case, config) in cases {
        let started = Instant::now();
        let err = KafkaBackend::connect(config).await.unwrap_err();
        let took = started.elapsed();
        assert!(
            matches!(err, Error::Authentication { .. }),
            "{case}: {err:?}"
        );
        assert!(!err.is_retryable(), "{case}");
        eprintln!("{case}: refused after {took:?}");
        // Not the request timeout (10 s), which waiting for an answer would take.
        // Measured: 0.23-0.42 s (the broker delays a failed authentication by 100 ms).
        assert!(took < Duration::from_secs(2), "{case}: took {took:?}");
        let shown = format!("{err} {err:?}");
        let shown = format!("{shown} {}", cqrs::Error::from(err).report());
        assert!(!shown.contains(wrong), "{case}: {shown}");
    }
}

/// alice may read but not write `ro-*` topics: publishing there fails at once with an error that
/// names the topic and is not retried, and nothing reaches the topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_without_write_on_the_topic_fails_naming_it() {
    support::logs();
    let broker = SecureKafka::shared();
    let topic = unique("ro-prices");
    super_user(&broker)
        .await
        .ensure_topics(&[&topic])
        .await
        .unwrap();
    let alice = alice(&broker, "SCRAM-SHA-256").await;
    let err = alice
        .publish(&topic, &[Message::new("Ping", b"1".to_vec())])
        .await
        .unwrap_err();
    assert!(!err.is_retryable(), "{err:?}");
    let report = err.report();
    assert!(
        report.contains(&topic) && report.contains("not authorized"),
        "{report}"
    );
    let (low, high) = support::kafka_watermarks(broker.get("PLAINTEXT"), &topic, 0);
    let (low1, high1) = support::kafka_watermarks(broker.get("PLAINTEXT"), &topic, 1);
    assert_eq!((high - low) + (high1 - low1), 0, "nothing was written");
}

/// A group alice may not read: `subscribe` fails within seconds with an error naming the group;
/// a processor whose group it is does not start, and says which group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consuming_without_read_on_the_group_fails_naming_it() {
    support::logs();
    let broker = SecureKafka::shared();
    let alice = alice(&broker, "SCRAM-SHA-256").await;
    let topic = unique("ok-orders");
    alice.ensure_topics(&[&topic]).await.unwrap();
    let group = unique("other-team");
    let started = Instant::now();
    let err = match alice.subscribe(&Subscription::new(&group, [&topic])).await {
        Ok(_) => panic!("subscribed to a group alice may not read"),
        Err(e) => e,
    };
    assert!(started.elapsed() < WAIT / 3, "took {:?}", started.elapsed());
    assert!(!err.is_retryable(), "{err:?}");
    assert!(
        err.report().contains(&group) && err.report().contains("not authorized"),
        "{}",
        err.report()
    );

    let service = unique("other-svc");
    let mut p = EventProcessor::new(alice.clone(), &service).topics(support::one_topic(&topic));
    p.handle("audit", |_: Paid| async { Ok::<_, String>(()) })
        .unwrap();
    let err = match p.start(CancellationToken::new()).await {
        Ok(_) => panic!("a processor started in a group alice may not read"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains(&format!("{service}.audit")), "{err}");
}

/// A dead-letter topic alice may not make (`ro-*`, missing): the processor does not start, and
/// says which topic. The group's member, started while the topic was being made, leaves with the
/// failed start: the group's next member gets every event published before (on each of the
/// topic's partitions), and nothing was committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_topic_that_cannot_be_made_fails_start_and_leaves_the_group_alone() {
    support::logs();
    let broker = SecureKafka::shared();
    let alice = alice(&broker, "SCRAM-SHA-256").await;
    let topic = unique("ok-invoices");
    let dead = unique("ro-invoices-dead");
    let paid: Vec<Paid> = (0..30).map(|n| Paid { n }).collect();
    EventBus::new(alice.clone())
        .topics(support::one_topic(&topic))
        .publish_all(&paid)
        .await
        .unwrap();
    let service = unique("ok-svc");
    let mut p = EventProcessor::new(alice.clone(), &service).topics(support::one_topic(&topic));
    p.handle("bill", |_: Paid| async { Ok::<_, String>(()) })
        .unwrap()
        .dead_letter_topic(&dead);
    let err = match p.start(CancellationToken::new()).await {
        Ok(_) => panic!("a processor started without its dead-letter topic"),
        Err(e) => e,
    };
    assert!(
        err.report().contains(&dead) && err.report().contains("not authorized"),
        "{}",
        err.report()
    );
    assert!(
        !super_user(&broker)
            .await
            .topics_on_broker()
            .await
            .unwrap()
            .contains(&dead),
        "the dead-letter topic was made"
    );
    let mut next = super_user(&broker)
        .await
        .subscribe(&Subscription::new(format!("{service}.bill"), [&topic]))
        .await
        .unwrap();
    let got = cqrs::conformance::receive_n(&mut *next, paid.len()).await;
    assert_eq!(got.len(), paid.len());
    let partitions: std::collections::BTreeSet<_> = got
        .iter()
        .filter_map(|d| Some(d.position()?.partition))
        .collect();
    assert!(
        partitions.len() > 1,
        "all on {partitions:?}: a test that cannot fail"
    );
    assert_eq!(lag(&broker, &topic, &format!("{service}.bill")).await, None);
}

/// A dead-letter topic alice may not write: the failed message's group stops with that error,
/// and the message stays unconsumed in the group (nothing lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_topic_without_write_stops_the_group_and_loses_nothing() {
    support::logs();
    let broker = SecureKafka::shared();
    let alice = alice(&broker, "SCRAM-SHA-512").await;
    let topic = unique("ok-refunds");
    let dead = unique("ro-refunds-dead");
    super_user(&broker)
        .await
        .ensure_topics(&[&dead])
        .await
        .unwrap();
    let service = unique("ok-svc");
    let mut p = EventProcessor::new(alice.clone(), &service).topics(support::one_topic(&topic));
    p.handle("refund", |_: Paid| async {
        Err::<(), _>(cqrs::permanent("card expired"))
    })
    .unwrap()
    .dead_letter_topic(&dead);
    let running = p.start(CancellationToken::new()).await.unwrap();
    EventBus::new(alice.clone())
        .topics(support::one_topic(&topic))
        .publish(&Paid { n: 1 })
        .await
        .unwrap();
    let err = support::failure(running, WAIT).await;
    assert!(
        err.report().contains(&dead) && err.report().contains("not authorized"),
        "{}",
        err.report()
    );
    // The group's next member (the super user's) gets the message: it was never committed.
    let group = format!("{service}.refund");
    let mut next = super_user(&broker)
        .await
        .subscribe(&Subscription::new(&group, [&topic]))
        .await
        .unwrap();
    let got = cqrs::conformance::receive_n(&mut *next, 1).await;
    assert_eq!(got[0].message().name, "Paid");
}

/// alice's READ on a topic taken away while her member consumes it (a DENY added by the super
/// user): `receive` fails with an error naming the topic (the member stays, retrying); given
/// back, the member goes on and every event is handled, none skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_taken_away_while_a_member_runs_is_an_error_naming_the_topic_and_loses_nothing() {
    support::logs();
    let broker = SecureKafka::shared();
    let alice = alice(&broker, "SCRAM-SHA-256").await;
    let topic = unique("ok-revoked");
    alice.ensure_topics(&[&topic]).await.unwrap();
    let group = unique("ok-revoked-g");
    let mut member = alice
        .subscribe(&Subscription::new(&group, [&topic]))
        .await
        .unwrap();
    let publish = |from: u32| {
        let alice = alice.clone();
        let topic = topic.clone();
        async move {
            let batch: Vec<Message> = (from..from + 10)
                .map(|n| Message::new("Paid", n.to_string().into_bytes()))
                .collect();
            alice.publish(&topic, &batch).await.unwrap();
        }
    };
    // Each payload seen, and the deliveries acked.
    async fn take(
        seen: &mut std::collections::BTreeSet<String>,
        got: Vec<cqrs::backend::Delivery>,
    ) {
        seen.extend(
            got.iter()
                .map(|d| String::from_utf8_lossy(&d.message().payload).into_owned()),
        );
        cqrs::backend::Delivery::ack_all(got)
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
    let mut seen = std::collections::BTreeSet::new();
    publish(0).await;
    while seen.len() < 10 {
        let got = tokio::time::timeout(WAIT, member.receive(10))
            .await
            .expect("the first ten")
            .unwrap();
        take(&mut seen, got).await;
    }

    let deny = [
        "--deny-principal",
        "User:alice",
        "--operation",
        "Read",
        "--topic",
        topic.as_str(),
    ];
    broker.acl(&[&["--add"][..], &deny[..]].concat());
    publish(10).await;
    let deadline = Instant::now() + WAIT;
    let refused = loop {
        assert!(
            Instant::now() < deadline,
            "no error in {WAIT:?} without READ"
        );
        match tokio::time::timeout(Duration::from_secs(1), member.receive(10)).await {
            Err(_) => {}
            Ok(Err(e)) => break e,
            // Fetched before the ACL changed, if any.
            Ok(Ok(got)) => {
                take(&mut seen, got).await;
            }
        }
    };
    assert!(
        refused.report().contains(&topic) && refused.report().contains("not authorized"),
        "{}",
        refused.report()
    );

    broker.acl(&[&["--remove", "--force"][..], &deny[..]].concat());
    let deadline = Instant::now() + WAIT;
    while seen.len() < 20 {
        assert!(
            Instant::now() < deadline,
            "after READ came back, only {seen:?}"
        );
        // Refused (an error) until the broker has the ACL back.
        if let Ok(Ok(got)) = tokio::time::timeout(Duration::from_secs(1), member.receive(10)).await
        {
            take(&mut seen, got).await;
        }
    }
    let expected: std::collections::BTreeSet<String> = (0..20).map(|n| n.to_string()).collect();
    assert_eq!(seen, expected);
    member.close().await.unwrap();
}
