//! Redis Streams backend for [`cqrs`](https://docs.rs/cqrs), with consumer groups.
//!
//! - Publishing is `XADD` in the layout of `docs/wire-format.md`; a batch is one pipelined round
//!   trip, and concurrent publishers share one multiplexed connection per pool. A publish the
//!   connection's loss interrupts sends again only what the server did not take (see
//!   [`RedisOptions::publish_timeout`]).
//! - Each consumer reads with `XREADGROUP ... BLOCK` on its own connection, first resuming its own
//!   pending entries. On one server (over TCP, a Unix socket, or TLS as a `rediss://` URL sets
//!   it) that connection is the backend's own (RESP2, replies decoded where they lie in one
//!   buffer); on a cluster it is the `redis` crate's. It acks in batches (`XACK` with many ids),
//!   redelivers nacked entries after their backoff (`XCLAIM`, which raises the delivery count the
//!   retry policy reads), and claims the entries of dead members idle longer than the
//!   subscription's `claim_idle`.
//! - Streams live in named pools ([`Topology`], in code or YAML); [`RedisBackend::stats`] reports
//!   lengths, lag and pending entries; [`RedisBackend::trim_acknowledged`] deletes what every group
//!   has acked.
//!
//! ```no_run
//! # async fn run() -> Result<(), cqrs_core::BoxError> {
//! use cqrs_redis::RedisBackend;
//!
//! // Through the `cqrs` crate (feature `redis`) this is `cqrs::redis`: `EventBus::new` and
//! // `EventProcessor::new` take the backend as they take any other.
//! let backend = RedisBackend::connect("redis://127.0.0.1:6379/0").await?;
//! # Ok(()) }
//! ```

mod admin;
mod conn;
mod consumer;
mod dead_letters;
mod error;
mod publish;
mod resp;
mod topology;
mod value;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use cqrs_core::backend::{Consumer, Publisher, Subscriber, Subscription};
use cqrs_core::wire::Layout;
use cqrs_core::{Message, StartFrom};

use crate::conn::{Conn, Connector};

/// Entry points for the fuzz targets in `fuzz/`: decoders of what comes from the server.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    /// The message in a stream entry (its id and fields as the server sent them), and why it is
    /// malformed if it is.
    pub fn decode_entry(
        id: &str,
        fields: Vec<(Vec<u8>, Vec<u8>)>,
    ) -> (cqrs_core::Message, Option<String>) {
        crate::consumer::decode_pairs(id, fields)
    }

    /// Scans `bytes` as a reply arriving in two parts (cut at `cut`), checks that the parts
    /// scan to the items the whole does, and walks them; the reply's length once complete.
    pub fn scan_reply(bytes: &[u8], cut: usize) -> Option<usize> {
        crate::resp::scan_in_two(bytes, cut)
    }
}

pub use admin::{ConsumerStats, GroupStats, PendingEntry, StreamStats};
pub use cqrs_core::dead_letter::{DeadLetter, DeadLetterStore, REDRIVEN_FROM};
pub use error::{Error, Result};
/// The `redis` client crate this backend is built on, for raw commands beside it (admin
/// scripts, tests), at the version the backend uses.
pub use redis;
pub use topology::{redact, PoolSpec, RedisUrl, Servers, StreamSpec, Topology};

/// Tuning of the backend; the defaults suit most services.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RedisOptions {
    /// How long one `XREADGROUP` blocks waiting for entries (default 1 s).
    pub block: Duration,
    /// Consumers idle this long with no pending entries are removed from their group
    /// (default 1 hour). Consumers that own pending entries are never removed.
    pub remove_idle_consumers_after: Duration,
    /// Timeout of one command on the shared connection (default 5 s).
    pub response_timeout: Duration,
    /// How long a publish goes on after the connection went down during it (default 10 s).
    /// It looks in the stream for the messages the server took before it lost the connection
    /// and sends only the others, so a connection cut neither loses nor duplicates them. Past
    /// this time the error is returned, and publishing again may duplicate some.
    pub publish_timeout: Duration,
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions {
            block: Duration::from_secs(1),
            remove_idle_consumers_after: Duration::from_secs(3600),
            response_timeout: Duration::from_secs(5),
            publish_timeout: Duration::from_secs(10),
        }
    }
}

/// The Redis Streams backend. Clones share the connections.
#[derive(Clone)]
pub struct RedisBackend {
    inner: Arc<Inner>,
}

struct Inner {
    pools: Vec<Pool>,
    /// Stream name to index in `pools`.
    streams: HashMap<String, usize>,
    default_pool: Option<usize>,
    options: RedisOptions,
}

pub(crate) struct Pool {
    name: String,
    servers: Servers,
    connector: Connector,
    conn: Conn,
    max_len: HashMap<String, usize>,
}

impl RedisBackend {
    /// Connects to one Redis server as the pool `default`; every stream lives there.
    ///
    /// A comma-separated list of addresses (`redis://10.0.0.1:7000,redis://10.0.0.2:7000`) is
    /// the seed nodes of a Redis Cluster, as [`RedisBackend::connect_cluster`].
    pub async fn connect(url: &str) -> Result<Self> {
        Self::from_topology(&Topology::of_address(url)?).await
    }

    /// Connects to a Redis Cluster through its seed `nodes` as the pool `default`: each stream
    /// lives on the master of its slot, commands follow `MOVED` and `ASK`, and a group reading
    /// streams of several slots reads each slot's streams from its master.
    pub async fn connect_cluster<A: AsRef<str>>(
        nodes: impl IntoIterator<Item = A>,
    ) -> Result<Self> {
        let mut topology = Topology::new();
        topology.cluster("default", nodes)?;
        Self::from_topology(&topology).await
    }

    /// Connects every pool of `topology` and creates its streams' consumer groups.
    pub async fn from_topology(topology: &Topology) -> Result<Self> {
        Self::with_options(topology, RedisOptions::default()).await
    }

    /// Like [`RedisBackend::from_topology`], with options.
    pub async fn with_options(topology: &Topology, options: RedisOptions) -> Result<Self> {
        let mut pools = Vec::new();
        let mut streams = HashMap::new();
        for (i, spec) in topology.pools.iter().enumerate() {
            let connector = connector(&spec.servers)?;
            let conn = connector
                .connect(options.response_timeout)
                .await
                .map_err(|e| {
                    Error::redis(
                        format!("connect to pool `{}` at {}", spec.name, spec.servers),
                        e,
                    )
                })?;
            let mut max_len = HashMap::new();
            for (stream, s) in &spec.streams {
                streams.insert(stream.clone(), i);
                if let Some(n) = s.max_len {
                    max_len.insert(stream.clone(), n);
                }
            }
            pools.push(Pool {
                name: spec.name.clone(),
                servers: spec.servers.clone(),
                connector,
                conn,
                max_len,
            });
        }
        let default_pool = pools
            .iter()
            .position(|p| p.name == "default")
            .or(if pools.len() == 1 { Some(0) } else { None });
        let backend = RedisBackend {
            inner: Arc::new(Inner {
                pools,
                streams,
                default_pool,
                options,
            }),
        };
        for spec in &topology.pools {
            for (stream, s) in &spec.streams {
                for group in &s.groups {
                    backend
                        .create_group(stream, group, StartFrom::Beginning)
                        .await?;
                }
            }
        }
        Ok(backend)
    }

    pub(crate) fn pool_for(&self, stream: &str) -> Result<&Pool> {
        let i = self
            .inner
            .streams
            .get(stream)
            .copied()
            .or(self.inner.default_pool)
            .ok_or_else(|| Error::NoPool(stream.to_owned()))?;
        Ok(&self.inner.pools[i])
    }

    /// Creates `group` on `stream` (and the stream) unless it exists.
    pub async fn create_group(&self, stream: &str, group: &str, start: StartFrom) -> Result<()> {
        let pool = self.pool_for(stream)?;
        create_group(&mut pool.conn.clone(), stream, group, start).await
    }

    /// The options in force.
    pub fn options(&self) -> &RedisOptions {
        &self.inner.options
    }
}

impl fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pools: Vec<String> = self
            .inner
            .pools
            .iter()
            .map(|p| format!("{}={}", p.name, p.servers))
            .collect();
        f.debug_struct("RedisBackend")
            .field("pools", &pools)
            .finish_non_exhaustive()
    }
}

/// The client of a pool's servers; an address the client refuses is an error without its
/// password.
fn connector(servers: &Servers) -> Result<Connector> {
    let invalid = |url: &RedisUrl, e: redis::RedisError| Error::InvalidAddress {
        address: url.to_string(),
        reason: e.to_string(),
    };
    Ok(match servers {
        Servers::One(url) => Connector::One(Box::new(
            redis::Client::open(url.expose()).map_err(|e| invalid(url, e))?,
        )),
        Servers::Cluster(nodes) => Connector::Cluster(
            nodes
                .iter()
                .map(|url| {
                    redis::IntoConnectionInfo::into_connection_info(url.expose())
                        .map_err(|e| invalid(url, e))
                })
                .collect::<Result<_>>()?,
        ),
    })
}

pub(crate) async fn create_group(
    conn: &mut Conn,
    stream: &str,
    group: &str,
    start: StartFrom,
) -> Result<()> {
    create_group_at(conn, stream, group, start_id(start)).await
}

/// The entry id a new group starts after: `$` (the stream's end) or `0` (its beginning).
pub(crate) fn start_id(start: StartFrom) -> &'static str {
    match start {
        StartFrom::Latest => "$",
        _ => "0",
    }
}

/// Creates `group` on `stream` (and the stream) from entry `id` unless it exists.
pub(crate) async fn create_group_at(
    conn: &mut Conn,
    stream: &str,
    group: &str,
    id: &str,
) -> Result<()> {
    let created: redis::RedisResult<()> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg(group)
        .arg(id)
        .arg("MKSTREAM")
        .query_async(conn)
        .await;
    match created {
        Ok(()) => Ok(()),
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        Err(e) => Err(Error::redis(format!("XGROUP CREATE {stream} {group}"), e)),
    }
}

/// The XADD of `message`.
pub(crate) fn xadd(stream: &str, max_len: Option<usize>, message: &Message) -> redis::Cmd {
    // Sized up front: grown from empty, the command's buffers were reallocated ~10 times a
    // message (`xadd` took 4,186 instructions a publish, 1,005 sized; docs/benchmarks.md). The
    // command's own arguments: XADD, the stream, MAXLEN ~ n and `*`.
    let (fields, bytes) = Layout::REDIS.size_hint(message);
    let mut cmd = redis::Cmd::with_capacity(6 + 2 * fields, 48 + stream.len() + bytes);
    cmd.arg("XADD");
    cmd.arg(stream);
    if let Some(n) = max_len {
        cmd.arg("MAXLEN").arg("~").arg(n);
    }
    cmd.arg("*");
    Layout::REDIS.write(message, |k, v| {
        cmd.arg(k).arg(v);
    });
    cmd
}

#[async_trait]
impl Publisher for RedisBackend {
    fn system(&self) -> &'static str {
        "redis"
    }

    async fn publish(&self, topic: &str, messages: &[Message]) -> cqrs_core::Result<()> {
        if messages.is_empty() {
            return Ok(());
        }
        let pool = self.pool_for(topic)?;
        let max_len = pool.max_len.get(topic).copied();
        let mut conn = pool.conn.clone();
        // When the send fails, `publish::recover` needs to know since when to look for what
        // the server took: ~25 instructions a publish.
        let started = std::time::Instant::now();
        let sent = if let [message] = messages {
            xadd(topic, max_len, message)
                .query_async::<redis::Value>(&mut conn)
                .await
                .map(drop)
        } else {
            let mut pipe = redis::pipe();
            for m in messages {
                pipe.add_command(xadd(topic, max_len, m)).ignore();
            }
            pipe.query_async::<()>(&mut conn).await
        };
        match sent {
            Ok(()) => Ok(()),
            Err(lost) => {
                let timeout = self.inner.options.publish_timeout;
                Box::pin(publish::recover(
                    &mut conn, topic, max_len, messages, started, lost, timeout,
                ))
                .await
                .map_err(Into::into)
            }
        }
    }
}

#[async_trait]
impl Subscriber for RedisBackend {
    fn location(&self, topic: &str) -> Option<String> {
        self.pool_for(topic)
            .ok()
            .map(|pool| format!("redis pool `{}` at {}", pool.name, pool.servers))
    }

    async fn groups(
        &self,
        topic: &str,
        prefix: &str,
    ) -> cqrs_core::Result<Vec<cqrs_core::backend::GroupBacklog>> {
        let stats = self.stats(topic).await?;
        Ok(stats
            .groups
            .into_iter()
            .filter(|g| g.name.starts_with(prefix))
            .map(|g| cqrs_core::backend::GroupBacklog {
                group: g.name,
                pending: g.pending,
                lag: g.lag,
            })
            .collect())
    }

    async fn subscribe(&self, subscription: &Subscription) -> cqrs_core::Result<Box<dyn Consumer>> {
        // At least one topic, or an error naming the group.
        subscription.check()?;
        let first = &subscription.topics[0];
        let pool = self.pool_for(first)?;
        if let Some(dead) = &subscription.dead_letter {
            if self.pool_for(dead).is_err() {
                return Err(cqrs_core::Error::Config(format!(
                    "the dead-letter stream `{dead}` of group `{}` is in no pool: list it in a \
                     pool of the topology or name one pool `default`",
                    subscription.group
                )));
            }
        }
        for topic in &subscription.topics[1..] {
            let other = self.pool_for(topic)?;
            if other.name != pool.name {
                return Err(Error::StreamsInTwoPools(format!(
                    "{first} is in `{}`, {topic} in `{}`",
                    pool.name, other.name
                ))
                .into());
            }
        }
        let mut conn = pool.conn.clone();
        for topic in &subscription.topics {
            create_group(&mut conn, topic, &subscription.group, subscription.start).await?;
        }
        let options = &self.inner.options;
        let response_timeout = options.block + Duration::from_secs(5);
        let failed = |e| {
            Error::redis(
                format!("connect to pool `{}` at {}", pool.name, pool.servers),
                e,
            )
        };
        // One server (TCP, a Unix socket, TLS with `tls`): reads on a connection of the
        // consumer's own whose replies are decoded where they lie (`resp`); other commands on
        // the pool's. A cluster: reads the same way, from the node holding the streams, and
        // the consumer's own connection of the client library does the rest (reads during a
        // slot's move too). Otherwise that connection does it all.
        let (own, reader) = match &pool.connector {
            Connector::One(client) if resp::Reader::serves(client.get_connection_info().addr()) => {
                let reader = resp::Reader::connect(client.get_connection_info(), response_timeout)
                    .await
                    .map_err(failed)?;
                (pool.conn.clone(), Some(reader))
            }
            Connector::Cluster(nodes) if nodes.iter().all(|n| resp::Reader::serves(n.addr())) => {
                let own = pool
                    .connector
                    .connect(response_timeout)
                    .await
                    .map_err(failed)?;
                let reader = resp::Reader::connect_cluster(nodes, response_timeout)
                    .await
                    .map_err(failed)?;
                (own, Some(reader))
            }
            connector => (
                connector.connect(response_timeout).await.map_err(failed)?,
                None,
            ),
        };
        Ok(Box::new(consumer::RedisConsumer::new(
            own,
            reader,
            pool.conn.clone(),
            subscription,
            options.clone(),
        )))
    }
}
