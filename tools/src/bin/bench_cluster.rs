//! Benchmark: how the Redis backend's throughput changes with the number of Redis Cluster
//! masters, on this machine.
//!
//! Run with: `cargo run --release -p cqrs-tools --bin bench_cluster`
//! (needs `redis-server` on the PATH; `BENCH_N` sets the event count, default 300,000;
//! `BENCH_STREAMS` the streams, default 12; `BENCH_ROUNDS` the rounds, default 3).
//!
//! Each round starts fresh servers, on free ports, for each layout: one plain redis-server, a
//! cluster of one master holding all 16,384 slots, and a cluster of three masters. On each, the
//! same work goes through the backend: `BENCH_STREAMS` streams, one publisher task per stream
//! publishing ~200-byte messages in pipelined batches of 100 (`Publisher::publish`), then one
//! consumer group per stream draining it (`receive(500)`, then `XACK` of the batch). It prints
//! msg/s for publishing and for draining, and the ratio to the plain server, per round and the
//! median, with how many cores the benchmark process and the servers kept busy.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cqrs::backend::{Publisher, Subscriber};
use cqrs::redis::{redis, RedisBackend};
use cqrs::{BoxError, Delivery, Message, Subscription};

use cqrs_tools::support;
use support::cpu_time;

/// redis-server processes, stopped (and their directory removed) on drop.
struct Servers {
    children: Vec<Child>,
    urls: Vec<String>,
    dir: PathBuf,
}

impl Drop for Servers {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A free port whose cluster-bus port (+10,000) is free too.
fn free_port() -> Result<u16, BoxError> {
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        if port < 55_000 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return Ok(port);
        }
    }
}

async fn conn(url: &str) -> Result<redis::aio::MultiplexedConnection, BoxError> {
    Ok(redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await?)
}

/// Starts `n` servers; with `cluster`, makes them one cluster with the slots split evenly.
async fn start(n: usize, cluster: bool) -> Result<Servers, BoxError> {
    let dir = std::env::temp_dir().join(format!("cqrs-bench-cluster-{}", cqrs::new_message_id()));
    std::fs::create_dir_all(&dir)?;
    let mut servers = Servers {
        children: Vec::new(),
        urls: Vec::new(),
        dir,
    };
    for _ in 0..n {
        let port = free_port()?;
        let node_dir = servers.dir.join(port.to_string());
        std::fs::create_dir_all(&node_dir)?;
        let mut cmd = Command::new("redis-server");
        cmd.current_dir(&node_dir)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if cluster {
            cmd.args(["--cluster-enabled", "yes"]);
        }
        servers.children.push(cmd.spawn()?);
        servers.urls.push(format!("redis://127.0.0.1:{port}"));
    }
    let mut conns = Vec::new();
    for url in &servers.urls {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match conn(url).await {
                Ok(c) => break conns.push(c),
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) => return Err(e),
            }
        }
    }
    if !cluster {
        return Ok(servers);
    }
    const SLOTS: usize = 16_384;
    for (i, c) in conns.iter_mut().enumerate() {
        let (from, to) = (i * SLOTS / n, (i + 1) * SLOTS / n - 1);
        redis::cmd("CLUSTER")
            .arg("ADDSLOTSRANGE")
            .arg(from)
            .arg(to)
            .query_async::<()>(c)
            .await?;
    }
    for url in &servers.urls[1..] {
        let port = url.rsplit(':').next().unwrap_or_default();
        redis::cmd("CLUSTER")
            .arg("MEET")
            .arg("127.0.0.1")
            .arg(port)
            .query_async::<()>(&mut conns[0])
            .await?;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for c in &mut conns {
        loop {
            let info: String = redis::cmd("CLUSTER").arg("INFO").query_async(c).await?;
            if info.contains("cluster_state:ok")
                && info.contains(&format!("cluster_known_nodes:{n}"))
            {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("the cluster of {n} did not form: {info}").into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(servers)
}

struct Figures {
    publish: f64,
    drain: f64,
}

impl Servers {
    fn cpu_time(&self) -> Duration {
        self.children
            .iter()
            .map(|c| cpu_time(&c.id().to_string()))
            .sum()
    }
}

async fn run(backend: RedisBackend, n: usize, streams: usize) -> Result<Figures, BoxError> {
    let names: Vec<String> = (0..streams)
        .map(|i| format!("bench-{i}-{}", cqrs::new_message_id()))
        .collect();
    let per = n / streams;
    let payload = vec![b'x'; 200];
    let start = Instant::now();
    let mut tasks = Vec::new();
    for name in &names {
        let (backend, name, payload) = (backend.clone(), name.clone(), payload.clone());
        tasks.push(tokio::spawn(async move {
            let mut sent = 0;
            while sent < per {
                let batch: Vec<Message> = (0..100.min(per - sent))
                    .map(|_| Message::new("Packet", payload.clone()))
                    .collect();
                backend.publish(&name, &batch).await?;
                sent += batch.len();
            }
            Ok::<_, cqrs::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let publish = (per * streams) as f64 / start.elapsed().as_secs_f64();

    let start = Instant::now();
    let mut tasks = Vec::new();
    for name in &names {
        let backend = backend.clone();
        let mut consumer = backend
            .subscribe(&Subscription::new("bench", [name]).claim_idle(None))
            .await?;
        tasks.push(tokio::spawn(async move {
            let mut got = 0;
            while got < per {
                let batch = consumer.receive(500).await?;
                got += batch.len();
                Delivery::ack_all(batch).await.map_err(|(e, _)| e)?;
            }
            Ok::<_, cqrs::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let drain = (per * streams) as f64 / start.elapsed().as_secs_f64();
    Ok(Figures { publish, drain })
}

/// How many of the servers hold at least one of the benchmark's streams.
async fn masters_used(servers: &Servers) -> Result<usize, BoxError> {
    let mut used = 0;
    for url in &servers.urls {
        let keys: i64 = redis::cmd("DBSIZE")
            .query_async(&mut conn(url).await?)
            .await?;
        used += usize::from(keys > 0);
    }
    Ok(used)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    cqrs_tools::support::init_logs();
    let env = cqrs_tools::support::env_or::<usize>;
    let (n, streams, rounds) = (
        env("BENCH_N", 300_000),
        env("BENCH_STREAMS", 12),
        env("BENCH_ROUNDS", 3),
    );
    println!(
        "{n} messages of 200 bytes over {streams} streams, {rounds} rounds, {} cores",
        std::thread::available_parallelism().map_or(0, |p| p.get())
    );
    let layouts: [(&str, usize, bool); 3] = [
        ("one server", 1, false),
        ("cluster, 1 master", 1, true),
        ("cluster, 3 masters", 3, true),
    ];
    let mut all: Vec<Vec<Figures>> = layouts.iter().map(|_| Vec::new()).collect();
    for round in 1..=rounds {
        println!("round {round}");
        for (i, (name, servers_n, cluster)) in layouts.iter().enumerate() {
            let servers = start(*servers_n, *cluster).await?;
            let backend = if *cluster {
                RedisBackend::connect_cluster(&servers.urls).await?
            } else {
                RedisBackend::connect(&format!("{}/0", servers.urls[0])).await?
            };
            let (client_cpu, servers_cpu, wall) =
                (cpu_time("self"), servers.cpu_time(), Instant::now());
            let f = run(backend, n, streams).await?;
            let wall = wall.elapsed().as_secs_f64();
            let busy = |cpu: Duration| cpu.as_secs_f64() / wall;
            println!(
                "  {name:<20} publish {:>9.0} msg/s   drain {:>9.0} msg/s   cores busy: client {:.2}, servers {:.2}   (streams on {} server(s))",
                f.publish,
                f.drain,
                busy(cpu_time("self") - client_cpu),
                busy(servers.cpu_time() - servers_cpu),
                masters_used(&servers).await?
            );
            all[i].push(f);
        }
    }
    println!("\nmedian of the rounds");
    println!(
        "{:<20} {:>14} {:>8} {:>14} {:>8}",
        "layout", "publish msg/s", "ratio", "drain msg/s", "ratio"
    );
    let base_p = median(all[0].iter().map(|f| f.publish).collect());
    let base_d = median(all[0].iter().map(|f| f.drain).collect());
    for ((name, _, _), figures) in layouts.iter().zip(&all) {
        let p = median(figures.iter().map(|f| f.publish).collect());
        let d = median(figures.iter().map(|f| f.drain).collect());
        println!(
            "{name:<20} {p:>14.0} {:>8.2} {d:>14.0} {:>8.2}",
            p / base_p,
            d / base_d
        );
    }
    Ok(())
}
