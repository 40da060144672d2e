//! The Redis Streams backend against a real Redis Cluster of three masters.
//!
//! Uses `REDIS_CLUSTER_NODES` (comma-separated seed URLs), which `scripts/test` sets after
//! starting a local cluster (`ensure_redis_cluster` in `scripts/brokers.sh`). Every test names its
//! streams at random, so the tests share the cluster.

#![allow(clippy::unwrap_used)]

use cqrs_test_support as support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cqrs::backend::{Publisher, Subscriber};
use cqrs::{CancellationToken, Delivery, Event, EventBus, EventProcessor, Message, Subscription};
use cqrs_redis::{redis, RedisBackend, Topology};
use serde::{Deserialize, Serialize};
use support::{eventually, one_topic, unique};

fn nodes() -> Vec<String> {
    let nodes = std::env::var("REDIS_CLUSTER_NODES").unwrap_or_default();
    assert!(
        !nodes.is_empty(),
        "REDIS_CLUSTER_NODES is not set: start a cluster with \
         `bash -c 'source scripts/brokers.sh; ensure_redis_cluster; echo $REDIS_CLUSTER_NODES; sleep infinity'` \
         or run scripts/test"
    );
    nodes.split(',').map(str::to_owned).collect()
}

async fn cluster() -> RedisBackend {
    RedisBackend::connect_cluster(nodes()).await.unwrap()
}

cqrs::conformance_suite!(async {
    RedisBackend::connect(&std::env::var("REDIS_CLUSTER_NODES").unwrap_or_default())
        .await
        .expect("a Redis Cluster at REDIS_CLUSTER_NODES (scripts/test starts one)")
});

/// A plain connection to one node (not following redirections).
async fn node(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// The node that holds `key`: the one master that answers for it without `MOVED`.
async fn owner(key: &str) -> String {
    let mut owners = holders(nodes(), key).await;
    assert_eq!(owners.len(), 1, "{key} is held by {owners:?}");
    owners.remove(0)
}

/// The nodes among `urls` that answer for `key` without `MOVED` (its master; none while no
/// master holds it).
async fn holders(urls: impl IntoIterator<Item = String>, key: &str) -> Vec<String> {
    let mut owners = Vec::new();
    for url in urls {
        let answered: redis::RedisResult<i64> = redis::cmd("EXISTS")
            .arg(key)
            .query_async(&mut node(&url).await)
            .await;
        if answered == Ok(1) {
            owners.push(url);
        }
    }
    owners
}

async fn receive_n(consumer: &mut dyn cqrs::backend::Consumer, n: usize) -> Vec<Delivery> {
    cqrs::conformance::receive_n(consumer, n).await
}

/// `Ping` messages with these payloads.
fn pings<T: std::fmt::Display>(payloads: impl IntoIterator<Item = T>) -> Vec<Message> {
    payloads
        .into_iter()
        .map(|p| Message::new("Ping", p.to_string().into_bytes()))
        .collect()
}

/// The payloads of `got`, as text.
/// The message ids (the `id` field) of every entry of `stream`, oldest first.
async fn ids_held(stream: &str) -> Vec<String> {
    let mut conn = redis::cluster::ClusterClient::new(nodes())
        .unwrap()
        .get_async_connection()
        .await
        .unwrap();
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    reply
        .ids
        .iter()
        .map(|e| e.get::<String>("id").unwrap_or_default())
        .collect()
}

fn payloads(got: &[Delivery]) -> Vec<String> {
    got.iter()
        .map(|d| String::from_utf8_lossy(&d.message().payload).into_owned())
        .collect()
}

#[tokio::test]
async fn streams_spread_over_the_masters_and_one_group_reads_them_all() {
    let backend = cluster().await;
    let streams: Vec<String> = (0..8).map(|i| unique(&format!("spread-{i}"))).collect();
    for (i, s) in streams.iter().enumerate() {
        let batch = pings((0..3).map(|j| format!("{i}.{j}")));
        backend.publish(s, &batch).await.unwrap();
    }
    let mut by_master: BTreeMap<String, usize> = BTreeMap::new();
    for s in &streams {
        *by_master.entry(owner(s).await).or_default() += 1;
    }
    assert!(
        by_master.len() >= 2,
        "8 random stream names all landed on one master: {by_master:?}"
    );

    // One group over all eight streams: each slot's streams are read from their master.
    let mut consumer = backend
        .subscribe(&Subscription::new(unique("g"), &streams))
        .await
        .unwrap();
    let got = receive_n(&mut *consumer, 24).await;
    let distinct: BTreeSet<String> = payloads(&got).into_iter().collect();
    assert_eq!(distinct.len(), 24, "each entry once: {distinct:?}");
    Delivery::ack_all(got).await.map_err(|(e, _)| e).unwrap();
    cqrs::conformance::receive_none(&mut *consumer).await;
    for s in &streams {
        let stats = backend.stats(s).await.unwrap();
        assert_eq!(
            (stats.length, stats.groups[0].pending),
            (3, 0),
            "{s}: all acked on its master"
        );
    }
}

#[tokio::test]
async fn a_group_reading_several_slots_gets_new_entries_of_each_while_it_waits() {
    let backend = cluster().await;
    let (a, b) = (unique("wait-a"), unique("wait-b"));
    let mut consumer = backend
        .subscribe(&Subscription::new(unique("g"), [&a, &b]))
        .await
        .unwrap();
    cqrs::conformance::receive_none(&mut *consumer).await;
    for (stream, body) in [(&b, "b"), (&a, "a"), (&b, "b2")] {
        backend
            .publish(stream, &[Message::new("Ping", body.as_bytes().to_vec())])
            .await
            .unwrap();
        let got = receive_n(&mut *consumer, 1).await;
        assert_eq!(&got[0].message().payload[..], body.as_bytes());
        assert_eq!(got[0].topic(), stream.as_str());
        Delivery::ack_all(got).await.map_err(|(e, _)| e).unwrap();
    }
}

#[tokio::test]
async fn a_stopped_members_entries_are_claimed_on_their_master() {
    let backend = cluster().await;
    let stream = unique("claim");
    let group = unique("g");
    let batch: Vec<Message> = (0..5)
        .map(|i| Message::new("Ping", i.to_string().into_bytes()))
        .collect();
    backend.publish(&stream, &batch).await.unwrap();
    let mut dead = backend
        .subscribe(
            &Subscription::new(&group, [&stream])
                .consumer("dead")
                .claim_idle(None),
        )
        .await
        .unwrap();
    drop(receive_n(&mut *dead, 5).await);
    drop(dead);
    let mut alive = backend
        .subscribe(
            &Subscription::new(&group, [&stream])
                .consumer("alive")
                .claim_idle(Some(Duration::from_millis(200))),
        )
        .await
        .unwrap();
    let got = receive_n(&mut *alive, 5).await;
    assert!(got.iter().all(|d| d.attempt() == 2));
    Delivery::ack_all(got).await.map_err(|(e, _)| e).unwrap();
    assert_eq!(backend.stats(&stream).await.unwrap().groups[0].pending, 0);
}

/// Moves `key`'s slot (with its keys) from its master to another one, the way `redis-cli
/// --cluster reshard` does: IMPORTING / MIGRATING, MIGRATE of its keys, then SETSLOT NODE on
/// every master. Returns the new owner.
/// Moves the slot of `key` to another master; returns that master.
async fn move_slot_of(key: &str) -> String {
    let moving = start_moving_slot_of(key).await;
    moving.finish().await;
    moving.to
}

/// A slot halfway through a move: its keys are on `to`, but `from` still holds the slot and
/// answers for it with `ASK` (`to` takes them after `ASKING`).
struct Moving {
    slot: u16,
    from: String,
    to: String,
    to_id: String,
}

impl Moving {
    /// Hands the slot to `to` on every node.
    async fn finish(&self) {
        for url in nodes() {
            redis::cmd("CLUSTER")
                .arg("SETSLOT")
                .arg(self.slot)
                .arg("NODE")
                .arg(&self.to_id)
                .query_async::<()>(&mut node(&url).await)
                .await
                .unwrap();
        }
    }
}

async fn start_moving_slot_of(key: &str) -> Moving {
    let from = owner(key).await;
    let to = nodes().into_iter().find(|n| *n != from).unwrap();
    let (mut src, mut dst) = (node(&from).await, node(&to).await);
    let slot: u16 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(key)
        .query_async(&mut src)
        .await
        .unwrap();
    let id = |mut c: redis::aio::MultiplexedConnection| async move {
        redis::cmd("CLUSTER")
            .arg("MYID")
            .query_async::<String>(&mut c)
            .await
            .unwrap()
    };
    let (src_id, dst_id) = (id(src.clone()).await, id(dst.clone()).await);
    let setslot = |state: &str, id: &str| {
        let mut c = redis::cmd("CLUSTER");
        c.arg("SETSLOT").arg(slot).arg(state).arg(id);
        c
    };
    setslot("IMPORTING", &src_id)
        .query_async::<()>(&mut dst)
        .await
        .unwrap();
    setslot("MIGRATING", &dst_id)
        .query_async::<()>(&mut src)
        .await
        .unwrap();
    let (host, port) = to
        .trim_start_matches("redis://")
        .split_once(':')
        .map(|(h, p)| (h.to_owned(), p.trim_end_matches('/').to_owned()))
        .unwrap();
    loop {
        let keys: Vec<String> = redis::cmd("CLUSTER")
            .arg("GETKEYSINSLOT")
            .arg(slot)
            .arg(100)
            .query_async(&mut src)
            .await
            .unwrap();
        if keys.is_empty() {
            break;
        }
        redis::cmd("MIGRATE")
            .arg(&host)
            .arg(&port)
            .arg("")
            .arg(0)
            .arg(5000)
            .arg("KEYS")
            .arg(&keys)
            .query_async::<()>(&mut src)
            .await
            .unwrap();
    }
    Moving {
        slot,
        from,
        to,
        to_id: dst_id,
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
struct Booked {
    #[event(key)]
    room: String,
    n: u32,
}

#[tokio::test]
async fn a_stream_moved_to_another_master_is_followed_by_publishers_and_its_group() {
    let backend = cluster().await;
    let topic = unique("moving");
    let bus = EventBus::new(backend.clone()).topics(one_topic(&topic));
    let seen = Arc::new(Mutex::new(BTreeSet::new()));
    let mut p = EventProcessor::new(backend.clone(), unique("svc")).topics(one_topic(&topic));
    let s = seen.clone();
    p.handle("record", move |e: Booked| {
        let s = s.clone();
        async move {
            s.lock().unwrap().insert(e.n);
            Ok::<_, String>(())
        }
    })
    .unwrap();
    let running = p.start(CancellationToken::new()).await.unwrap();
    let publish = |range: std::ops::Range<u32>| {
        let bus = bus.clone();
        async move {
            for n in range {
                bus.publish(&Booked {
                    room: format!("r{}", n % 4),
                    n,
                })
                .await
                .unwrap();
            }
        }
    };
    publish(0..50).await;
    eventually("the first 50 handled", || async {
        seen.lock().unwrap().len() == 50
    })
    .await;

    let before = owner(&topic).await;
    let after = move_slot_of(&topic).await;
    assert_ne!(before, after);
    assert_eq!(
        owner(&topic).await,
        after,
        "the stream now lives on {after}"
    );

    // Both the bus's connection and the group's reader still point at the old master: they get
    // MOVED, follow it, and carry on against the stream (with its group) on the new one.
    publish(50..100).await;
    eventually("all 100 handled after the move", || async {
        seen.lock().unwrap().len() == 100
    })
    .await;
    let stats = backend.stats(&topic).await.unwrap();
    assert_eq!((stats.length, stats.groups[0].pending), (100, 0));
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_group_reads_a_stream_whose_slot_is_halfway_through_a_move() {
    let backend = cluster().await;
    let topic = unique("asking");
    let first = pings((0..3).map(|i| format!("before {i}")));
    backend.publish(&topic, &first).await.unwrap();
    let mut consumer = backend
        .subscribe(&Subscription::new(unique("g"), [&topic]))
        .await
        .unwrap();
    let got = receive_n(&mut *consumer, 3).await;
    Delivery::ack_all(got).await.map_err(|(e, _)| e).unwrap();

    // Three more, not read yet. Then the stream goes to the new master while the old one,
    // still holding the slot, answers the group's reads with ASK.
    let next = pings((0..3).map(|i| format!("during {i}")));
    backend.publish(&topic, &next).await.unwrap();
    let moving = start_moving_slot_of(&topic).await;
    let answered: redis::RedisResult<redis::Value> = redis::cmd("XLEN")
        .arg(&topic)
        .query_async(&mut node(&moving.from).await)
        .await;
    assert_eq!(
        answered.unwrap_err().kind(),
        redis::ErrorKind::Server(redis::ServerErrorKind::Ask),
        "the slot's holder redirects with ASK"
    );
    let got = receive_n(&mut *consumer, 3).await;
    assert_eq!(payloads(&got), ["during 0", "during 1", "during 2"]);
    Delivery::ack_all(got).await.map_err(|(e, _)| e).unwrap();

    // A batch published meanwhile. The client library follows ASK for a pipeline with one
    // ASKING: its first command is written (twice: the library tries it again), the others get
    // MOVED. The publish finds what was written and sends the rest one command at a time (as a
    // pipeline, the first of them would be written twice and the next not): it succeeds, and
    // every message of the batch is in the stream, the first once or twice.
    let batch = [
        Message::new("Ping", b"a".to_vec()),
        Message::new("Ping", b"b".to_vec()),
        Message::new("Ping", b"c".to_vec()),
    ];
    backend.publish(&topic, &batch).await.unwrap();
    let held = ids_held(&topic).await;
    let counts: Vec<usize> = batch
        .iter()
        .map(|m| held.iter().filter(|id| **id == m.id.as_str()).count())
        .collect();
    assert!(
        (1..=2).contains(&counts[0]) && counts[1..] == [1, 1],
        "the batch's messages held {counts:?} times"
    );

    moving.finish().await;
    let after = pings((0..2).map(|i| format!("after {i}")));
    backend.publish(&topic, &after).await.unwrap();
    let written = backend.stats(&topic).await.unwrap().length - 6;
    assert_eq!(
        written as usize,
        held.len() - 6 + 2,
        "the batch after the move, once"
    );
    let got = receive_n(&mut *consumer, written as usize).await;
    Delivery::ack_all(got).await.map_err(|(e, _)| e).unwrap();
    let stats = backend.stats(&topic).await.unwrap();
    assert_eq!(stats.groups[0].pending, 0);
}

#[tokio::test]
async fn a_group_reads_through_the_seed_nodes_that_answer() {
    // The first seed given answers nothing (a free port): the group's reader turns to the
    // next, which sends it to the stream's master.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let seeds = std::iter::once(format!("redis://{dead}")).chain(nodes());
    let backend = RedisBackend::connect_cluster(seeds).await.unwrap();
    let topic = unique("seeds");
    let sent = pings(0..5);
    backend.publish(&topic, &sent).await.unwrap();
    let mut consumer = backend
        .subscribe(&Subscription::new(unique("g"), [&topic]))
        .await
        .unwrap();
    let got = receive_n(&mut *consumer, 5).await;
    assert_eq!(payloads(&got), ["0", "1", "2", "3", "4"]);
    Delivery::ack_all(got).await.map_err(|(e, _)| e).unwrap();
    assert_eq!(backend.stats(&topic).await.unwrap().groups[0].pending, 0);
}

/// Receives `n` deliveries as a processor does: a receive that fails with a retryable error
/// (a connection cut, a node gone) is tried again; at most `most_in_row` such in a row.
async fn receive_through_cuts(
    consumer: &mut dyn cqrs::backend::Consumer,
    n: usize,
    most_in_row: usize,
) -> Vec<Delivery> {
    let mut out = Vec::new();
    let mut failed_in_row = 0;
    tokio::time::timeout(Duration::from_secs(10), async {
        while out.len() < n {
            match consumer.receive(n - out.len()).await {
                Ok(batch) => {
                    failed_in_row = 0;
                    out.extend(batch);
                }
                Err(e) => {
                    assert!(e.is_retryable(), "{e}");
                    failed_in_row += 1;
                    assert!(
                        failed_in_row <= most_in_row,
                        "{failed_in_row} failed receives in a row: {e}"
                    );
                }
            }
        }
    })
    .await
    .expect("the deliveries within 10 s");
    out
}

#[tokio::test]
async fn a_group_reads_on_after_its_connections_to_the_streams_master_are_cut() {
    // A user of this test's own on every node: cutting its connections (`CLIENT KILL USER`)
    // touches no other test's.
    let user = unique("cut");
    for url in nodes() {
        redis::cmd("ACL")
            .arg("SETUSER")
            .arg(&user)
            .arg("on")
            .arg(">pw")
            .arg("~*")
            .arg("&*")
            .arg("+@all")
            .query_async::<()>(&mut node(&url).await)
            .await
            .unwrap();
    }
    let seeds = nodes()
        .into_iter()
        .map(|n| n.replace("redis://", &format!("redis://{user}:pw@")));
    let backend = RedisBackend::connect_cluster(seeds).await.unwrap();
    let topic = unique("cut");
    let mut consumer = backend
        .subscribe(&Subscription::new(unique("g"), [&topic]))
        .await
        .unwrap();
    let mut expected = Vec::new();
    for round in 0..3 {
        let sent = pings((0..3).map(|i| format!("{round}.{i}")));
        backend.publish(&topic, &sent).await.unwrap();
        expected.extend((0..3).map(|i| format!("{round}.{i}")));
        let got = receive_through_cuts(&mut *consumer, 3, 1).await;
        assert_eq!(
            payloads(&got),
            expected[expected.len() - 3..],
            "round {round}"
        );
        Delivery::ack_all(got).await.map_err(|(e, _)| e).unwrap();
        // Every connection of the user to the stream's master, the group's reader among them.
        let killed: i64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("USER")
            .arg(&user)
            .query_async(&mut node(&owner(&topic).await).await)
            .await
            .unwrap();
        assert!(killed > 0, "round {round}: no connection of {user} to cut");
    }
    let stats = backend.stats(&topic).await.unwrap();
    assert_eq!((stats.length, stats.groups[0].pending), (9, 0));
    for url in nodes() {
        redis::cmd("ACL")
            .arg("DELUSER")
            .arg(&user)
            .query_async::<()>(&mut node(&url).await)
            .await
            .unwrap();
    }
}

/// A Redis Cluster of the test's own: three masters, each with a replica, on free ports;
/// stopped on drop. Nodes give up on a silent peer after 1 s (`cluster-node-timeout`), so a
/// replica takes over a killed master within a few seconds.
struct OwnCluster {
    nodes: Vec<(u16, Option<std::process::Child>)>,
    dir: std::path::PathBuf,
}

impl OwnCluster {
    async fn start() -> Self {
        use std::process::{Command, Stdio};
        let dir = std::env::temp_dir().join(unique("cqrs-own-cluster"));
        let mut cluster = OwnCluster {
            nodes: Vec::new(),
            dir,
        };
        for _ in 0..6 {
            let (port, bus) = (support::free_port(), support::free_port());
            let node_dir = cluster.dir.join(port.to_string());
            std::fs::create_dir_all(&node_dir).unwrap();
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args([
                    "--cluster-enabled",
                    "yes",
                    "--cluster-port",
                    &bus.to_string(),
                ])
                .args([
                    "--cluster-node-timeout",
                    "1000",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .arg("--dir")
                .arg(&node_dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server is installed (scripts/test installs it)");
            cluster.nodes.push((port, Some(child)));
        }
        for url in cluster.urls() {
            eventually("a node to answer", || {
                let url = url.clone();
                async move {
                    let Ok(client) = redis::Client::open(url) else {
                        return false;
                    };
                    client.get_multiplexed_async_connection().await.is_ok()
                }
            })
            .await;
        }
        let created = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(cluster.nodes.iter().map(|(p, _)| format!("127.0.0.1:{p}")))
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli is installed (scripts/test installs it)");
        assert!(created.success(), "redis-cli --cluster create failed");
        cluster.settled().await;
        cluster
    }

    fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|(p, _)| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    /// The URLs of the nodes still running.
    fn running(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|(_, child)| child.is_some())
            .map(|(p, _)| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    /// Waits until every node still running says the cluster is whole (`cluster_state:ok`).
    async fn settled(&self) {
        for url in self.running() {
            eventually("the cluster to be whole", || {
                let url = url.clone();
                async move {
                    let info: redis::RedisResult<String> = redis::cmd("CLUSTER")
                        .arg("INFO")
                        .query_async(&mut node(&url).await)
                        .await;
                    info.is_ok_and(|i| i.contains("cluster_state:ok"))
                }
            })
            .await;
        }
    }

    /// Kills (SIGKILL) the node at `url`.
    fn kill(&mut self, url: &str) {
        for (port, child) in &mut self.nodes {
            if url.ends_with(&format!(":{port}")) {
                if let Some(mut c) = child.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
            }
        }
    }

    /// The master that answers for `key` without redirecting, among the nodes running.
    async fn owner(&self, key: &str) -> Option<String> {
        let mut owners = holders(self.running(), key).await;
        assert!(owners.len() <= 1, "{key} is held by {owners:?}");
        owners.pop()
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        for (_, child) in &mut self.nodes {
            if let Some(mut c) = child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn a_group_reads_on_after_its_streams_master_is_killed_and_its_replica_takes_over() {
    let mut cluster = OwnCluster::start().await;
    let backend = RedisBackend::connect_cluster(cluster.urls()).await.unwrap();
    let topic = unique("failover");
    backend.publish(&topic, &pings(0..3)).await.unwrap();
    let mut consumer = backend
        .subscribe(&Subscription::new(unique("g"), [&topic]))
        .await
        .unwrap();
    let got = receive_n(&mut *consumer, 3).await;
    assert_eq!(payloads(&got), ["0", "1", "2"]);
    Delivery::ack_all(got).await.map_err(|(e, _)| e).unwrap();

    // The entries and the group's acks reached the master's replica before the master dies.
    let master = cluster.owner(&topic).await.unwrap();
    eventually("the replica to have all the master wrote", || async {
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query_async(&mut node(&master).await)
            .await
            .unwrap();
        let field = |name: &str| {
            info.split(['\r', '\n', ','])
                .find_map(|f| f.strip_prefix(name))
                .and_then(|v| v.parse::<u64>().ok())
        };
        // `slave0:ip=...,port=...,state=online,offset=N,lag=0` and `master_repl_offset:N`.
        info.contains("state=online")
            && field("offset=").is_some()
            && field("offset=") == field("master_repl_offset:")
    })
    .await;
    cluster.kill(&master);
    eventually("a replica to hold the stream", || async {
        cluster.owner(&topic).await.is_some()
    })
    .await;
    cluster.settled().await;
    assert_ne!(cluster.owner(&topic).await.unwrap(), master);

    // The publisher follows the cluster's new map; the group's reader, its node gone, turns to
    // the next node given (the killed one among them) and follows MOVED to the new master.
    backend.publish(&topic, &pings(3..6)).await.unwrap();
    // One failed receive (its node gone), two if the next node given is the killed one.
    let got = receive_through_cuts(&mut *consumer, 3, 2).await;
    assert_eq!(payloads(&got), ["3", "4", "5"]);
    Delivery::ack_all(got).await.map_err(|(e, _)| e).unwrap();
    let stats = backend.stats(&topic).await.unwrap();
    assert_eq!((stats.length, stats.groups[0].pending), (6, 0));
}

#[tokio::test]
async fn a_yaml_topology_with_a_cluster_pool_beside_a_single_server() {
    let (local, clustered) = (unique("local"), unique("clustered"));
    let yaml = format!(
        "default:\n  redis: {}\n  streams:\n    {local}: [svc.a]\nevents:\n  cluster: [{}]\n  streams:\n    {clustered}: [svc.b]\n",
        support::redis_url(),
        nodes().join(", "),
    );
    let topology = Topology::from_yaml(&yaml).unwrap();
    let backend = RedisBackend::from_topology(&topology).await.unwrap();
    assert_eq!(
        backend.location(&clustered).unwrap(),
        format!("redis pool `events` at cluster {}", nodes().join(","))
    );
    backend
        .publish(&clustered, &[Message::new("B", b"b".to_vec())])
        .await
        .unwrap();
    // The group listed in the YAML was created on the stream's master at connect.
    let stats = backend.stats(&clustered).await.unwrap();
    assert_eq!(
        (
            stats.pool.as_str(),
            stats.groups[0].name.as_str(),
            stats.groups[0].lag
        ),
        ("events", "svc.b", Some(1))
    );
    let mut consumer = backend
        .subscribe(&Subscription::new("svc.b", [&clustered]))
        .await
        .unwrap();
    let got = receive_n(&mut *consumer, 1).await;
    assert_eq!(&got[0].message().payload[..], b"b");
    Delivery::ack_all(got).await.map_err(|(e, _)| e).unwrap();
    backend.delete_stream(&local).await.unwrap();
}
