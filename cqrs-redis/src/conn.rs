//! One connection type for a single server and for a Redis Cluster.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::Slot;
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};

/// How a pool connects: to one server, or to a cluster through its seed nodes.
#[derive(Clone)]
pub(crate) enum Connector {
    One(Box<redis::Client>),
    Cluster(Vec<redis::ConnectionInfo>),
}

impl Connector {
    /// A connection whose commands time out after `response_timeout` (a blocking read's
    /// connection needs more than its block time).
    pub(crate) async fn connect(&self, response_timeout: Duration) -> RedisResult<Conn> {
        match self {
            Connector::One(client) => {
                let config = ConnectionManagerConfig::new()
                    .set_response_timeout(Some(response_timeout))
                    .set_connection_timeout(Some(Duration::from_secs(5)))
                    .set_number_of_retries(3)
                    .set_max_delay(Duration::from_secs(2));
                ConnectionManager::new_with_config((**client).clone(), config)
                    .await
                    .map(Conn::One)
            }
            Connector::Cluster(nodes) => {
                // MOVED and ASK replies are followed by the client; a node that went away is
                // reconnected and the slot map refreshed.
                let client = ClusterClient::builder(nodes.iter().cloned())
                    .response_timeout(response_timeout)
                    .connection_timeout(Duration::from_secs(5))
                    .retries(3)
                    .build()?;
                client.get_async_connection().await.map(Conn::Cluster)
            }
        }
    }
}

/// A connection to a pool: one server (reconnecting) or a cluster (routing each command to the
/// master of its key's slot).
#[derive(Clone)]
pub(crate) enum Conn {
    One(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Conn {
    /// What a command's keys must share to go in one command or one pipeline: in a cluster their
    /// slot, on one server nothing (every key is in the one "slot" `None`).
    pub(crate) fn slot(&self, key: &str) -> Option<Slot> {
        match self {
            Conn::One(_) => None,
            Conn::Cluster(_) => Some(Slot::for_key(key)),
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::One(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::One(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::One(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Groups `keys` by slot (see [`Conn::slot`]), keeping their order within a group and the order
/// of the groups' first keys.
pub(crate) fn by_slot<K: AsRef<str>>(
    conn: &Conn,
    keys: impl IntoIterator<Item = K>,
) -> Vec<Vec<K>> {
    let mut groups: Vec<(Option<Slot>, Vec<K>)> = Vec::new();
    for key in keys {
        let slot = conn.slot(key.as_ref());
        match groups.iter_mut().find(|(s, _)| *s == slot) {
            Some((_, group)) => group.push(key),
            None => groups.push((slot, vec![key])),
        }
    }
    groups.into_iter().map(|(_, group)| group).collect()
}
