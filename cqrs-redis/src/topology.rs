//! Named Redis pools, the streams each holds and the consumer groups of each stream; in code or
//! from YAML.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};

/// Where streams live: named pools, each with its streams and their consumer groups.
///
/// Stream names are unique across pools.
///
/// ```
/// use cqrs_redis::Topology;
///
/// let mut topology = Topology::new();
/// topology
///     .pool("default", "localhost:6379:0")?
///     .stream("default", "stream-a", ["read-group-a", "read-group-ab"])?
///     .stream("default", "stream-b", ["read-group-ab"])?
///     .pool("second", "192.168.1.20:6379:3")?
///     .stream("second", "stream-c", ["read-group-c"])?;
/// let err = topology.stream("second", "stream-a", ["x"]).unwrap_err();
/// assert_eq!(
///     err.to_string(),
///     "stream with name stream-a already exists in pool `default` (registering it in pool `second`)"
/// );
/// # Ok::<(), cqrs_redis::Error>(())
/// ```
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Topology {
    pub(crate) pools: Vec<PoolSpec>,
}

/// One named pool: a Redis server and database, or a Redis Cluster, and its streams.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolSpec {
    /// The pool's name.
    pub name: String,
    /// Where its streams live.
    pub servers: Servers,
    /// Streams with their consumer groups.
    pub streams: BTreeMap<String, StreamSpec>,
}

/// Where a pool's streams live. `Display` hides passwords.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Servers {
    /// One Redis server and database (`redis://[user:password@]host:port/db`, `rediss://` for
    /// TLS).
    One(RedisUrl),
    /// A Redis Cluster, reached through these seed nodes (any of its masters or replicas; the
    /// client learns the rest). Each stream, with its consumer groups, lives on the master that
    /// holds its key's slot.
    Cluster(Vec<RedisUrl>),
}

impl fmt::Display for Servers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Servers::One(url) => url.fmt(f),
            Servers::Cluster(nodes) => {
                f.write_str("cluster ")?;
                for (i, node) in nodes.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    node.fmt(f)?;
                }
                Ok(())
            }
        }
    }
}

impl fmt::Debug for Servers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// One stream's settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StreamSpec {
    /// Consumer groups created when the backend connects.
    pub groups: Vec<String>,
    /// Approximate trimming on publish (`MAXLEN ~ n`).
    pub max_len: Option<usize>,
}

impl Topology {
    /// An empty topology.
    pub fn new() -> Self {
        Self::default()
    }

    /// The pool `default` of one address as [`crate::RedisBackend::connect`] takes it: one
    /// server, or a comma-separated list of a Redis Cluster's seed nodes. A comma that does not
    /// separate addresses (one in a password) leaves the address whole; an error shows it
    /// whole and redacted, never a fragment of it.
    pub fn of_address(address: &str) -> Result<Self> {
        let mut topology = Topology::new();
        if address.contains(',') {
            let nodes: Vec<&str> = address.split(',').map(str::trim).collect();
            // A cluster's nodes are TCP addresses: a socket path is one server whose password
            // holds the comma.
            let tcp = |n: &&str| !(n.starts_with("unix:") || n.starts_with("redis+unix:"));
            if nodes.iter().all(|n| tcp(n) && RedisUrl::parse(n).is_ok()) {
                topology.cluster("default", nodes)?;
                return Ok(topology);
            }
        }
        topology.pool("default", address)?;
        Ok(topology)
    }

    /// Adds a pool on one server. `address` is a URL (`redis://`, `rediss://`) or
    /// `host:port[:db]`.
    pub fn pool(&mut self, name: &str, address: &str) -> Result<&mut Self> {
        let url = RedisUrl::parse(address)?;
        self.add_pool(name, Servers::One(url))
    }

    /// Adds a pool on a Redis Cluster, reached through `nodes` (addresses as for
    /// [`Topology::pool`], database 0: a cluster has no other).
    ///
    /// ```
    /// use cqrs_redis::Topology;
    ///
    /// let mut topology = Topology::new();
    /// topology
    ///     .cluster("events", ["redis://10.0.0.1:7000", "redis://10.0.0.2:7000"])?
    ///     .stream("events", "orders.placed", ["svc-billing.charge"])?;
    /// let err = topology.cluster("other", ["redis://10.0.0.3:7000/2"]).unwrap_err();
    /// assert_eq!(
    ///     err.to_string(),
    ///     "invalid Redis address `redis://10.0.0.3:7000/2`: a Redis Cluster has only database 0"
    /// );
    /// # Ok::<(), cqrs_redis::Error>(())
    /// ```
    pub fn cluster<A: AsRef<str>>(
        &mut self,
        name: &str,
        nodes: impl IntoIterator<Item = A>,
    ) -> Result<&mut Self> {
        let nodes = nodes
            .into_iter()
            .map(|a| RedisUrl::parse_cluster_node(a.as_ref()))
            .collect::<Result<Vec<_>>>()?;
        if nodes.is_empty() {
            return Err(Error::InvalidPool {
                pool: name.to_owned(),
                reason: "a cluster needs at least one seed node".to_owned(),
            });
        }
        self.add_pool(name, Servers::Cluster(nodes))
    }

    fn add_pool(&mut self, name: &str, servers: Servers) -> Result<&mut Self> {
        if self.pools.iter().any(|p| p.name == name) {
            return Err(Error::DuplicatePool(name.to_owned()));
        }
        self.pools.push(PoolSpec {
            name: name.to_owned(),
            servers,
            streams: BTreeMap::new(),
        });
        Ok(self)
    }

    /// Adds a stream with its consumer groups to a pool. A stream name that already exists in any
    /// pool is an error naming both pools.
    pub fn stream<G: Into<String>>(
        &mut self,
        pool: &str,
        stream: &str,
        groups: impl IntoIterator<Item = G>,
    ) -> Result<&mut Self> {
        cqrs_core::validate_topic(stream).map_err(Error::InvalidStream)?;
        if let Some(existing) = self.pool_of(stream) {
            return Err(Error::DuplicateStream {
                stream: stream.to_owned(),
                existing_pool: existing.to_owned(),
                pool: pool.to_owned(),
            });
        }
        let spec = self
            .pools
            .iter_mut()
            .find(|p| p.name == pool)
            .ok_or_else(|| Error::UnknownPool {
                pool: pool.to_owned(),
                stream: stream.to_owned(),
            })?;
        spec.streams.insert(
            stream.to_owned(),
            StreamSpec {
                groups: groups.into_iter().map(Into::into).collect(),
                max_len: None,
            },
        );
        Ok(self)
    }

    /// Trims `stream` approximately to `max_len` entries on every publish.
    pub fn max_len(&mut self, stream: &str, max_len: usize) -> Result<&mut Self> {
        let spec = self
            .pools
            .iter_mut()
            .find_map(|p| p.streams.get_mut(stream))
            .ok_or_else(|| Error::NoPool(stream.to_owned()))?;
        spec.max_len = Some(max_len);
        Ok(self)
    }

    /// The pool that holds `stream`, if registered.
    pub fn pool_of(&self, stream: &str) -> Option<&str> {
        self.pools
            .iter()
            .find(|p| p.streams.contains_key(stream))
            .map(|p| p.name.as_str())
    }

    /// The pools, in the order they were added.
    pub fn pools(&self) -> &[PoolSpec] {
        &self.pools
    }

    /// Reads a topology from YAML:
    ///
    /// ```yaml
    /// default:
    ///   redis: localhost:6379:0
    ///   streams:
    ///     stream-a: [read-group-a, read-group-ab]
    ///     stream-b: [read-group-ab]
    /// second:
    ///   redis: 192.168.1.20:6379:3
    ///   streams:
    ///     stream-c: [read-group-c]
    /// events:
    ///   cluster: [redis://10.0.0.1:7000, redis://10.0.0.2:7000]
    ///   streams:
    ///     orders.placed: [svc-billing.charge]
    /// ```
    ///
    /// A pool has `redis` (one server) or `cluster` (seed nodes of a Redis Cluster). Unknown keys
    /// and bad addresses are errors with their line and column.
    pub fn from_yaml(text: &str) -> Result<Self> {
        let raw: serde_yaml::Mapping = serde_yaml::from_str(text)?;
        // Deserialize again as typed pools, keeping the document's order of pools.
        let typed: BTreeMap<String, YamlPool> = serde_yaml::from_str(text)?;
        let mut topology = Topology::new();
        for key in raw.keys() {
            let Some(name) = key.as_str() else { continue };
            let Some(pool) = typed.get(name) else {
                continue;
            };
            let servers = match (&pool.redis, &pool.cluster) {
                (Some(url), None) => Servers::One(url.clone()),
                (None, Some(nodes)) if !nodes.is_empty() => Servers::Cluster(nodes.clone()),
                (redis, cluster) => {
                    return Err(Error::InvalidPool {
                        pool: name.to_owned(),
                        reason: match (redis, cluster) {
                            (Some(_), Some(_)) => "it has both `redis` and `cluster`: give one",
                            (None, Some(_)) => "its `cluster` lists no seed node",
                            _ => "it needs `redis: <address>` (one server) or `cluster: [<address>, ...]` (a Redis Cluster)",
                        }
                        .to_owned(),
                    })
                }
            };
            if let Servers::Cluster(nodes) = &servers {
                for node in nodes {
                    RedisUrl::parse_cluster_node(node.expose())?;
                }
            }
            topology.add_pool(name, servers)?;
            for (stream, groups) in &pool.streams {
                topology.stream(name, stream, groups.iter().cloned())?;
            }
            for (stream, n) in &pool.max_len {
                topology.max_len(stream, *n)?;
            }
        }
        Ok(topology)
    }

    /// Reads a topology from a YAML file; see [`Topology::from_yaml`].
    pub fn from_yaml_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_yaml(&text)
    }
}

impl fmt::Debug for Topology {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(&self.pools).finish()
    }
}

impl fmt::Debug for PoolSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolSpec")
            .field("name", &self.name)
            .field("servers", &self.servers)
            .field("streams", &self.streams)
            .finish()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct YamlPool {
    #[serde(default)]
    redis: Option<RedisUrl>,
    #[serde(default)]
    cluster: Option<Vec<RedisUrl>>,
    #[serde(default)]
    streams: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    max_len: BTreeMap<String, usize>,
}

/// A Redis URL. Its `Display` and `Debug` hide the password.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl(String);

impl RedisUrl {
    /// Parses a URL (`redis://`, `rediss://`, `unix://`) or `host:port[:db]`.
    pub fn parse(address: &str) -> Result<Self> {
        let url = if address.contains("://") {
            address.to_owned()
        } else {
            let parts: Vec<&str> = address.split(':').collect();
            let invalid = |reason: &str| Error::InvalidAddress {
                address: redact(address),
                reason: reason.to_owned(),
            };
            let (host, port, db) = match parts.as_slice() {
                [host, port] => (*host, *port, "0"),
                [host, port, db] => (*host, *port, *db),
                _ => return Err(invalid("expected `host:port[:db]` or a redis:// URL")),
            };
            if host.is_empty() {
                return Err(invalid("the host is empty"));
            }
            if port.parse::<u16>().is_err() {
                return Err(invalid("the port is not a number from 0 to 65535"));
            }
            if db.parse::<u32>().is_err() {
                return Err(invalid("the database is not a number"));
            }
            format!("redis://{host}:{port}/{db}")
        };
        redis::Client::open(url.as_str()).map_err(|e| Error::InvalidAddress {
            address: redact(&url),
            reason: e.to_string(),
        })?;
        Ok(RedisUrl(url))
    }

    /// Parses the address of a cluster node: as [`RedisUrl::parse`], refusing a database other
    /// than 0.
    pub fn parse_cluster_node(address: &str) -> Result<Self> {
        let url = Self::parse(address)?;
        let db = redis::Client::open(url.expose())
            .map(|c| c.get_connection_info().redis_settings().db())
            .unwrap_or(0);
        if db != 0 {
            return Err(Error::InvalidAddress {
                address: url.to_string(),
                reason: "a Redis Cluster has only database 0".to_owned(),
            });
        }
        Ok(url)
    }

    /// The full URL, password included: for connecting, never for printing.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact(&self.0))
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RedisUrl({})", redact(&self.0))
    }
}

impl<'de> Deserialize<'de> for RedisUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        RedisUrl::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// An address with its secrets hidden: `scheme://user:password@host` → `scheme://user:***@host`,
/// `user:password@host:port` → `user:***@host:port`, and the value of a `pass` or `password`
/// query parameter (`unix:///run/redis.sock?pass=...`, which redis-rs reads) → `***`.
///
/// The user information ends at the *last* `@`: a password may hold `/`, `?`, `#`, `,` or `@`
/// unencoded, and everything before that `@` is hidden but the user name.
pub fn redact(url: &str) -> String {
    // A scheme is letters, digits, `+`, `-` and `.`: a `://` after anything else is inside the
    // user information.
    let scheme = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    };
    let start = match url.find("://") {
        Some(i) if scheme(&url[..i]) => i + 3,
        _ => 0,
    };
    // The parts to hide, as byte ranges: the password (all the user information but the user
    // name), and each `pass` / `password` query value.
    let mut hidden: Vec<(usize, usize)> = Vec::new();
    if let Some(at) = url[start..].rfind('@').map(|at| start + at) {
        let from = url[start..at]
            .find(':')
            .map_or(start, |colon| start + colon + 1);
        hidden.push((from, at));
    }
    let lower = url.to_ascii_lowercase();
    for key in ["pass=", "password="] {
        for (i, _) in lower.match_indices(key) {
            if !matches!(url[..i].chars().last(), Some('?' | '&')) {
                continue;
            }
            let from = i + key.len();
            // To the next parameter redis-rs knows, or the end: a password may hold `&`.
            let to = ["&db=", "&user=", "&username=", "&protocol="]
                .iter()
                .filter_map(|next| lower[from..].find(next).map(|j| from + j))
                .min()
                .unwrap_or(url.len());
            hidden.push((from, to));
        }
    }
    hidden.sort_unstable();
    let mut out = String::with_capacity(url.len());
    let mut at = 0;
    for (from, to) in hidden {
        if to <= at {
            continue;
        }
        let from = from.max(at);
        out.push_str(&url[at..from]);
        out.push_str("***");
        at = to;
    }
    out.push_str(&url[at..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = "\
default:
  redis: localhost:6379:0
  streams:
    stream-a: [read-group-a, read-group-ab]
    stream-b: [read-group-ab]
second:
  redis: 192.168.1.20:6379:3
  streams:
    stream-c: [read-group-c]
";

    #[test]
    fn seed_yaml_loads_like_the_code() {
        let from_yaml = Topology::from_yaml(SEED).unwrap();
        let mut in_code = Topology::new();
        in_code
            .pool("default", "localhost:6379:0")
            .unwrap()
            .stream("default", "stream-a", ["read-group-a", "read-group-ab"])
            .unwrap()
            .stream("default", "stream-b", ["read-group-ab"])
            .unwrap()
            .pool("second", "192.168.1.20:6379:3")
            .unwrap()
            .stream("second", "stream-c", ["read-group-c"])
            .unwrap();
        assert_eq!(from_yaml, in_code);
        assert_eq!(
            from_yaml.pools()[1].servers.to_string(),
            "redis://192.168.1.20:6379/3"
        );
    }

    #[test]
    fn yaml_typos_are_errors_with_lines() {
        let typo = SEED.replace("  streams:\n    stream-c", "  strems:\n    stream-c");
        let err = Topology::from_yaml(&typo).unwrap_err().to_string();
        assert!(err.contains("unknown field `strems`"), "{err}");
        assert!(err.contains("at line 8 column 3"), "{err}");
    }

    #[test]
    fn yaml_bad_address_is_an_error_with_line() {
        let bad = SEED.replace("192.168.1.20:6379:3", "192.168.1.20:http:3");
        let err = Topology::from_yaml(&bad).unwrap_err().to_string();
        assert!(
            err.contains("invalid Redis address `192.168.1.20:http:3`"),
            "{err}"
        );
        assert!(err.contains("the port is not a number"), "{err}");
        assert!(err.contains("line 7"), "{err}");
    }

    #[test]
    fn yaml_duplicate_stream_across_pools() {
        let dup = SEED.replace("stream-c:", "stream-a:");
        let err = Topology::from_yaml(&dup).unwrap_err().to_string();
        assert_eq!(
            err,
            "stream with name stream-a already exists in pool `default` (registering it in pool `second`)"
        );
    }

    #[test]
    fn passwords_never_print() {
        let url = RedisUrl::parse("redis://app:s3cret@cache:6380/2").unwrap();
        assert_eq!(url.to_string(), "redis://app:***@cache:6380/2");
        assert_eq!(format!("{url:?}"), "RedisUrl(redis://app:***@cache:6380/2)");
        assert_eq!(redact("rediss://:hunter2@h/0"), "rediss://:***@h/0");
        assert_eq!(redact("redis://h:1/0"), "redis://h:1/0");
        let err = RedisUrl::parse("redis://app:s3cret@cache:notaport/2")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("s3cret"), "{err}");
    }

    /// Every URL shape with a password holding each character a URL gives a meaning to: no
    /// piece of the password shows in `Display`, `Debug`, an error, or a topology (the pools a
    /// backend reports and the manifest shows), whether the address parses or not.
    #[test]
    fn no_piece_of_a_password_prints_for_any_shape() {
        // Two halves that must never show, around a character that cuts a naive parser.
        let (a, b) = ("S3cAq", "T7kBz");
        let separators = [
            "",
            "/",
            "?",
            "#",
            "@",
            ",",
            ":",
            "&",
            "=",
            "%",
            "%2F",
            " ",
            "//",
            "?pass=",
            ",redis://",
        ];
        let shapes = [
            "redis://app:{pw}@cache:6380/2",
            "redis://:{pw}@cache:6380",
            "rediss://app:{pw}@cache:6380/0",
            "redis://app:{pw}@cache:notaport/2",
            "redis://app:{pw}@",
            "app:{pw}@cache:6379",
            "unix:///run/redis.sock?pass={pw}",
            "unix:///run/redis.sock?db=1&password={pw}",
            "redis+unix:///run/redis.sock?db=2&pass={pw}",
            "redis://:{pw}@10.0.0.1:7000,redis://10.0.0.2:7000",
            "redis://10.0.0.1:7000,redis://:{pw}@10.0.0.2:7000",
        ];
        let mut checked = 0;
        for shape in shapes {
            for sep in separators {
                let pw = format!("{a}{sep}{b}");
                let url = shape.replace("{pw}", &pw);
                let mut said = vec![redact(&url)];
                match RedisUrl::parse(&url) {
                    Ok(u) => {
                        said.push(u.to_string());
                        said.push(format!("{u:?}"));
                    }
                    Err(e) => said.push(e.to_string()),
                }
                match Topology::of_address(&url) {
                    Ok(t) => {
                        said.push(format!("{t:?}"));
                        for pool in t.pools() {
                            said.push(pool.servers.to_string());
                        }
                    }
                    Err(e) => said.push(e.to_string()),
                }
                for text in said {
                    assert!(
                        !text.contains(a) && !text.contains(b),
                        "{url:?} printed a piece of its password: {text}"
                    );
                }
                checked += 1;
            }
        }
        assert_eq!(checked, shapes.len() * separators.len());
        // What is not secret still shows.
        assert_eq!(
            redact("unix:///run/redis.sock?db=1&pass=x"),
            "unix:///run/redis.sock?db=1&pass=***"
        );
        assert_eq!(redact("redis://app:p/w?x@h:1/0"), "redis://app:***@h:1/0");
        assert_eq!(redact("app:pw@h:1"), "app:***@h:1");
    }

    #[test]
    fn a_cluster_pool_in_yaml() {
        let yaml = "\
events:
  cluster: [\"redis://:pw@10.0.0.1:7000\", 10.0.0.2:7000]
  streams:
    orders.placed: [svc-billing.charge]
";
        let t = Topology::from_yaml(yaml).unwrap();
        assert_eq!(
            t.pools()[0].servers.to_string(),
            "cluster redis://:***@10.0.0.1:7000,redis://10.0.0.2:7000/0"
        );
        assert_eq!(t.pool_of("orders.placed"), Some("events"));
        let mut in_code = Topology::new();
        in_code
            .cluster("events", ["redis://:pw@10.0.0.1:7000", "10.0.0.2:7000"])
            .unwrap()
            .stream("events", "orders.placed", ["svc-billing.charge"])
            .unwrap();
        assert_eq!(t, in_code);
    }

    #[test]
    fn a_pool_needs_one_server_or_a_cluster() {
        let err = |yaml: &str| Topology::from_yaml(yaml).unwrap_err().to_string();
        assert_eq!(
            err("a:\n  streams: {s: [g]}\n"),
            "pool `a`: it needs `redis: <address>` (one server) or `cluster: [<address>, ...]` (a Redis Cluster)"
        );
        assert_eq!(
            err("a:\n  redis: h:1\n  cluster: [h:2]\n"),
            "pool `a`: it has both `redis` and `cluster`: give one"
        );
        assert_eq!(
            err("a:\n  cluster: []\n"),
            "pool `a`: its `cluster` lists no seed node"
        );
        assert_eq!(
            err("a:\n  cluster: [h:7000:1]\n"),
            "invalid Redis address `redis://h:7000/1`: a Redis Cluster has only database 0"
        );
        let typo = err("a:\n  clustr: [h:2]\n");
        assert!(typo.contains("unknown field `clustr`"), "{typo}");
    }

    #[test]
    fn duplicate_pool_and_unknown_pool() {
        let mut t = Topology::new();
        t.pool("a", "localhost:6379").unwrap();
        assert_eq!(
            t.pool("a", "localhost:6379").unwrap_err().to_string(),
            "pool `a` is already registered"
        );
        assert_eq!(
            t.stream("b", "s", ["g"]).unwrap_err().to_string(),
            "no pool named `b` (for stream s)"
        );
    }
}
