//! The consumer's own connection for `XREADGROUP` on one server.
//!
//! The client library parses every reply into a tree of values: for a read of 500 entries,
//! some 4,500 of them, each field and value in an allocation of its own, made on the
//! connection's task and freed on the handler's. That parse was a third of a consumed event's
//! instructions, and the frees from another thread contended for the allocator's lock (docs/
//! benchmarks.md). This connection reads replies into one buffer, checks a reply's framing once,
//! and hands out its strings where they lie. A reply handed out is split off the buffer, shared
//! ([`Bytes`]): the messages' ids, names, keys and payloads are parts of it, not copies, and it
//! is freed when the last of them is dropped.
//!
//! It speaks RESP2 and nothing but the commands given to it, over TCP, a Unix socket or (feature
//! `tls`) TLS as a `rediss://` URL sets it. On a cluster it reads from the node that holds the
//! streams: it follows `MOVED`, and turns to the next node given when its node goes away; a read
//! answered with `ASK` or `TRYAGAIN` (a slot being moved) is left to the client library. All
//! other commands of the consumer stay with the client library (`conn`).

use std::io;
use std::pin::Pin;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use cqrs_core::wire::Part;
use redis::{Cmd, ConnectionAddr, ConnectionInfo, RedisError, RedisResult};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::is_gone;

/// How long connecting and the handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The most of its buffer a connection keeps between replies (a read of 500 entries of ~1 KB
/// fits in it; larger replies get a larger buffer, given back after).
const KEPT: usize = 1 << 20;

trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// One RESP2 item of a reply, its bytes given as a range of the reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Token {
    /// `*n`: the next `n` items are its elements; `*-1` (nil) is `None`.
    Array(Option<usize>),
    /// `$n` and its bytes; `$-1` (nil) is `None`.
    Bulk(Option<(usize, usize)>),
    /// `+text`.
    Simple(usize, usize),
    /// `-CODE detail`: the whole line, `\r\n` included.
    Error(usize, usize),
    /// `:n`.
    Int(i64),
}

/// Why a reply's bytes are not RESP2, or not the shape its command answers with.
pub(crate) fn malformed(why: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}

/// Where the scan of a reply arriving in parts stands: each part is scanned once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Scan {
    /// The start of the first item not scanned yet.
    pos: usize,
    /// Items still to scan: the reply, then each array's elements.
    owed: usize,
}

impl Default for Scan {
    fn default() -> Self {
        Scan { pos: 0, owed: 1 }
    }
}

/// Scans the first reply in `buf` on from `scan`, appending its items to `tokens`: its length
/// in bytes once it is complete, `None` while `buf` holds only part of it (call again with
/// more, the same `scan` and `tokens`).
pub(crate) fn tokenize(
    buf: &[u8],
    tokens: &mut Vec<Token>,
    scan: &mut Scan,
) -> io::Result<Option<usize>> {
    while scan.owed > 0 {
        let pos = scan.pos;
        let Some(line_len) = buf[pos..].iter().position(|&b| b == b'\n') else {
            return Ok(None);
        };
        let end = pos + line_len + 1;
        if line_len < 2 || buf[end - 2] != b'\r' {
            return Err(malformed("a line not ended by CRLF"));
        }
        let body = &buf[pos + 1..end - 2];
        let mut next = end;
        let mut more = 0;
        let token = match buf[pos] {
            b'*' => match number(body)? {
                -1 => Token::Array(None),
                n if n >= 0 => {
                    more = n as usize;
                    Token::Array(Some(n as usize))
                }
                _ => return Err(malformed("a negative array length")),
            },
            b'$' => match number(body)? {
                -1 => Token::Bulk(None),
                n if n >= 0 => {
                    let data_end = end
                        .checked_add(n as usize)
                        .and_then(|e| e.checked_add(2))
                        .ok_or_else(|| malformed("a string too long"))?;
                    if buf.len() < data_end {
                        return Ok(None);
                    }
                    if &buf[data_end - 2..data_end] != b"\r\n" {
                        return Err(malformed("a string not ended by CRLF"));
                    }
                    next = data_end;
                    Token::Bulk(Some((end, data_end - 2)))
                }
                _ => return Err(malformed("a negative string length")),
            },
            b'+' => Token::Simple(pos + 1, end - 2),
            b'-' => Token::Error(pos, end),
            b':' => Token::Int(number(body)?),
            _ => return Err(malformed("an unknown RESP2 type")),
        };
        tokens.push(token);
        scan.owed = (scan.owed - 1)
            .checked_add(more)
            .ok_or_else(|| malformed("an array too long"))?;
        scan.pos = next;
    }
    Ok(Some(scan.pos))
}

/// A length or an integer: optional `-`, then decimal digits (read by hand: `str::parse` cost
/// ~45 instructions an item more, callgrind).
fn number(digits: &[u8]) -> io::Result<i64> {
    let bad = || malformed("a length or integer that is not a number");
    let (negative, digits) = match digits {
        [b'-', rest @ ..] => (true, rest),
        _ => (false, digits),
    };
    if digits.is_empty() {
        return Err(bad());
    }
    let mut n: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return Err(bad());
        }
        n = n
            .checked_mul(10)
            .and_then(|n| n.checked_add(i64::from(d - b'0')))
            .ok_or_else(bad)?;
    }
    Ok(if negative { -n } else { n })
}

/// A TCP connection to `host:port`, without Nagle's delay (a command is one write).
async fn tcp(host: &str, port: u16) -> io::Result<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect((host, port)).await?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// A TLS failure (a refused certificate, say) as a connection error that says what it was.
#[cfg(feature = "tls")]
fn tls_error(e: native_tls::Error) -> RedisError {
    io::Error::new(io::ErrorKind::ConnectionRefused, format!("TLS: {e}")).into()
}

/// A reply read: its tokens over its bytes, walked in order.
pub(crate) struct Reply<'a> {
    buf: &'a Bytes,
    tokens: &'a [Token],
    at: usize,
}

impl<'a> Reply<'a> {
    pub(crate) fn new(buf: &'a Bytes, tokens: &'a [Token]) -> Self {
        Reply { buf, tokens, at: 0 }
    }

    fn next(&mut self) -> io::Result<Token> {
        let t = self
            .tokens
            .get(self.at)
            .copied()
            .ok_or_else(|| malformed("a reply shorter than its shape"))?;
        self.at += 1;
        Ok(t)
    }

    /// The next item, an array: its length, `None` for nil. An error reply is returned as the
    /// server's error.
    pub(crate) fn array(&mut self) -> RedisResult<Option<usize>> {
        match self.next()? {
            Token::Array(n) => Ok(n),
            Token::Error(start, end) => Err(server_error(&self.buf[start..end])),
            _ => Err(malformed("an unexpected item where an array belongs").into()),
        }
    }

    /// The next item, a string: its bytes, `None` for nil.
    pub(crate) fn bulk(&mut self) -> RedisResult<Option<&'a [u8]>> {
        match self.next()? {
            Token::Bulk(range) => Ok(range.map(|(s, e)| &self.buf[s..e])),
            Token::Simple(s, e) => Ok(Some(&self.buf[s..e])),
            Token::Error(start, end) => Err(server_error(&self.buf[start..end])),
            _ => Err(malformed("an unexpected item where a string belongs").into()),
        }
    }

    /// The next item, a string, as a part of the reply (kept without a copy): `None` for nil.
    pub(crate) fn bulk_part(&mut self) -> RedisResult<Option<Part<'a>>> {
        let buf = self.buf;
        Ok(self.bulk()?.map(|part| Part::new(buf, part)))
    }

    /// Skips the next item, elements included.
    pub(crate) fn skip(&mut self) -> io::Result<()> {
        let mut owed = 1usize;
        while owed > 0 {
            owed -= 1;
            if let Token::Array(Some(n)) = self.next()? {
                owed += n;
            }
        }
        Ok(())
    }
}

/// The server's error line (`-CODE detail\r\n`) as the client library reports it: the same
/// kinds and codes (`NOGROUP`, `NOPERM`, `LOADING`, ...) as on its connections.
fn server_error(line: &[u8]) -> RedisError {
    match redis::parse_redis_value(line).and_then(|v| v.extract_error()) {
        Err(e) => e,
        Ok(_) => malformed("an error reply that does not read as one").into(),
    }
}

/// How many `MOVED` a query follows before it returns the last one as its reply.
const MOST_MOVES: usize = 5;

/// A connection to one server for the replies of one kind of command: see the module's doc.
pub(crate) struct Reader {
    /// The node it connects to.
    info: ConnectionInfo,
    response_timeout: Duration,
    wire: Option<Wire>,
    /// On a cluster: its nodes as given, for when the node read from goes away; `None` on one
    /// server.
    seeds: Option<Seeds>,
}

/// A cluster's nodes as given, and the one to turn to next.
#[derive(Clone)]
struct Seeds {
    nodes: Vec<ConnectionInfo>,
    next: usize,
}

struct Wire {
    io: Pin<Box<dyn Io>>,
    /// Bytes read and not yet taken by a reply. Its allocation is taken up again once the
    /// replies split off it are dropped, so reads of the same size need no new one.
    buf: BytesMut,
    /// The last reply handed out, split off `buf` (empty before the first).
    reply: Bytes,
    /// The last reply's items, over `reply`.
    tokens: Vec<Token>,
    /// How far the reply being read was scanned.
    scan: Scan,
    /// Replies owed by the server: commands written whose reply was not read (a read
    /// abandoned midway). They are read and dropped before the next command.
    owed: usize,
    /// A command's write was abandoned midway: the server may hold half a command.
    torn: bool,
}

impl Reader {
    /// Whether a reader can serve `addr`: TCP, Unix sockets, and with the feature `tls` TLS
    /// as a `rediss://` URL sets it (the system's CAs, or none checked with `#insecure`).
    pub(crate) fn serves(addr: &ConnectionAddr) -> bool {
        match addr {
            ConnectionAddr::Tcp(..) => true,
            #[cfg(unix)]
            ConnectionAddr::Unix(_) => true,
            #[cfg(feature = "tls")]
            ConnectionAddr::TcpTls {
                tls_params: None, ..
            } => true,
            _ => false,
        }
    }

    /// Connects (and authenticates) now, so that a wrong address or password fails here.
    pub(crate) async fn connect(
        info: &ConnectionInfo,
        response_timeout: Duration,
    ) -> RedisResult<Self> {
        let mut reader = Reader {
            info: info.clone(),
            response_timeout,
            wire: None,
            seeds: None,
        };
        reader.wire().await?;
        Ok(reader)
    }

    /// A reader of a cluster whose nodes are `nodes` (each one [`Reader::serves`]), connected
    /// now to the first that answers, so that a wrong password fails here. Its first read is
    /// sent there and follows `MOVED` to the node that holds the streams.
    pub(crate) async fn connect_cluster(
        nodes: &[ConnectionInfo],
        response_timeout: Duration,
    ) -> RedisResult<Self> {
        let first = nodes
            .first()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no cluster node given"))?;
        let mut reader = Reader {
            info: first.clone(),
            response_timeout,
            wire: None,
            seeds: Some(Seeds {
                nodes: nodes.to_vec(),
                next: 1,
            }),
        };
        let mut failed = None;
        for _ in nodes {
            match reader.wire().await {
                Ok(_) => return Ok(reader),
                // A wrong password is wrong on every node.
                Err(e) if !is_gone(&e) => return Err(e),
                Err(e) => {
                    failed = Some(e);
                    reader.turn_to_next_node();
                }
            }
        }
        Err(failed.unwrap_or_else(|| io::Error::other("no cluster node answered").into()))
    }

    /// A reader like this one, not connected yet (it connects at its first query).
    pub(crate) fn another(&self) -> Reader {
        Reader {
            info: self.info.clone(),
            response_timeout: self.response_timeout,
            wire: None,
            seeds: self.seeds.clone(),
        }
    }

    /// On a cluster, connects next to the node after the last turned to (which follows `MOVED`
    /// to the streams' node): the node read from went away.
    fn turn_to_next_node(&mut self) {
        if let Some(seeds) = &mut self.seeds {
            if let Some(node) = seeds.nodes.get(seeds.next % seeds.nodes.len().max(1)) {
                self.info = node.clone();
                self.wire = None;
            }
            seeds.next = seeds.next.wrapping_add(1);
        }
    }

    async fn wire(&mut self) -> RedisResult<&mut Wire> {
        if self.wire.as_ref().is_some_and(|w| w.torn) {
            self.wire = None;
        }
        if self.wire.is_none() {
            let wire = tokio::time::timeout(CONNECT_TIMEOUT, Wire::open(&self.info))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connecting timed out"))??;
            self.wire = Some(wire);
        }
        self.wire
            .as_mut()
            .ok_or_else(|| io::Error::other("no connection").into())
    }

    /// Sends `cmd` and reads its reply. An error of the connection closes it (the next query
    /// connects again, on a cluster to the next node given); an error reply of the server leaves
    /// it open. On a cluster a `MOVED` reply is followed: the query is sent again to the node
    /// it names, which is read from from then on.
    pub(crate) async fn query(&mut self, cmd: &Cmd) -> RedisResult<Reply<'_>> {
        let mut moves = 0;
        loop {
            if let Err(e) = self.exchange(cmd).await {
                if is_gone(&e) {
                    self.turn_to_next_node();
                }
                return Err(e);
            }
            let moved = match (&self.seeds, &self.wire) {
                (Some(_), Some(w)) if moves < MOST_MOVES => w.moved_to(self.info.addr()),
                _ => None,
            };
            let Some(addr) = moved else { break };
            tracing::debug!(to = %addr, "the streams' slot moved; reading from the node holding it");
            self.info = self.info.clone().set_addr(addr);
            self.wire = None;
            moves += 1;
        }
        match &self.wire {
            Some(w) => Ok(w.reply()),
            None => Err(io::Error::other("no connection").into()),
        }
    }

    /// Sends `cmd` and reads its reply into the wire; on an error of the connection, closes it.
    async fn exchange(&mut self, cmd: &Cmd) -> RedisResult<()> {
        let timeout = self.response_timeout;
        let result = async {
            let wire = self.wire().await?;
            tokio::time::timeout(timeout, wire.exchange(cmd))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no reply in time"))?
        }
        .await;
        if result.is_err() {
            // Its state is unknown: a late reply would answer the next command.
            self.wire = None;
        }
        result
    }

    /// Reads what the server still owes (the reply of a read abandoned midway), so that a
    /// command on another connection comes after that read. Closes the connection if that
    /// fails or takes longer than a reply may.
    pub(crate) async fn settle(&mut self) {
        let timeout = self.response_timeout;
        let Some(wire) = self.wire.as_mut() else {
            return;
        };
        if wire.torn {
            self.wire = None;
            return;
        }
        match tokio::time::timeout(timeout, wire.read_owed()).await {
            Ok(Ok(())) => {}
            _ => self.wire = None,
        }
    }
}

impl Wire {
    async fn open(info: &ConnectionInfo) -> RedisResult<Wire> {
        let io: Pin<Box<dyn Io>> = match info.addr() {
            ConnectionAddr::Tcp(host, port) => Box::pin(tcp(host, *port).await?),
            #[cfg(unix)]
            ConnectionAddr::Unix(path) => Box::pin(tokio::net::UnixStream::connect(path).await?),
            // As the `redis` crate connects with native-tls.
            #[cfg(feature = "tls")]
            ConnectionAddr::TcpTls {
                host,
                port,
                insecure,
                tls_params: None,
            } => {
                let mut builder = native_tls::TlsConnector::builder();
                if *insecure {
                    builder
                        .danger_accept_invalid_certs(true)
                        .danger_accept_invalid_hostnames(true)
                        .use_sni(false);
                }
                let tls = tokio_native_tls::TlsConnector::from(builder.build().map_err(tls_error)?);
                let tcp = tcp(host, *port).await?;
                Box::pin(tls.connect(host, tcp).await.map_err(tls_error)?)
            }
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "an address the consumer's own connection does not serve",
                )
                .into())
            }
        };
        let mut wire = Wire {
            io,
            buf: BytesMut::new(),
            reply: Bytes::new(),
            tokens: Vec::new(),
            scan: Scan::default(),
            owed: 0,
            torn: false,
        };
        // The client library's handshake on RESP2: AUTH, then SELECT.
        let settings = info.redis_settings();
        let mut hello = Vec::new();
        if let Some(password) = settings.password() {
            let mut auth = redis::cmd("AUTH");
            if let Some(user) = settings.username() {
                auth.arg(user);
            }
            auth.arg(password);
            hello.push(auth);
        }
        if settings.db() != 0 {
            let mut select = redis::cmd("SELECT");
            select.arg(settings.db());
            hello.push(select);
        }
        for cmd in &hello {
            wire.exchange(cmd).await?;
            wire.reply().bulk()?;
        }
        Ok(wire)
    }

    /// The last reply read.
    fn reply(&self) -> Reply<'_> {
        Reply::new(&self.reply, &self.tokens)
    }

    /// Where the last reply, a cluster's `MOVED`, says to go: `now` with the host and port it
    /// names (its host when it names none). `None` for any other reply.
    fn moved_to(&self, now: &ConnectionAddr) -> Option<ConnectionAddr> {
        let Some(Token::Error(start, end)) = self.tokens.first() else {
            return None;
        };
        moved_to(self.reply.get(*start..*end)?, now)
    }

    /// Writes `cmd` and reads its reply into `reply` and `tokens`.
    async fn exchange(&mut self, cmd: &Cmd) -> RedisResult<()> {
        self.read_owed().await?;
        self.torn = true;
        self.io.write_all(&cmd.get_packed_command()).await?;
        self.torn = false;
        self.owed += 1;
        self.read_reply().await
    }

    /// Reads and drops the replies owed.
    async fn read_owed(&mut self) -> RedisResult<()> {
        while self.owed > 0 {
            self.read_reply().await?;
        }
        Ok(())
    }

    /// Reads the next reply: its bytes become `reply`, its items `tokens`.
    async fn read_reply(&mut self) -> RedisResult<()> {
        // The last reply handed out is done with here (its messages may keep parts of it).
        if !self.reply.is_empty() {
            self.reply = Bytes::new();
            self.tokens.clear();
            self.scan = Scan::default();
            // A read of large entries grew the buffer: not kept at that size for the next.
            if self.buf.capacity() > KEPT && self.buf.len() < KEPT {
                self.buf = BytesMut::from(&self.buf[..]);
                self.tokens.shrink_to(KEPT / 64);
            }
        }
        loop {
            if let Some(len) = tokenize(&self.buf, &mut self.tokens, &mut self.scan)? {
                self.reply = self.buf.split_to(len).freeze();
                self.owed -= 1;
                return Ok(());
            }
            if self.buf.capacity() - self.buf.len() < 16 * 1024 {
                self.buf.reserve(64 * 1024);
            }
            if self.io.read_buf(&mut self.buf).await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "the server closed the connection",
                )
                .into());
            }
        }
    }
}

/// Where a cluster's `MOVED` error line (`-MOVED slot host:port\r\n`) says to go, as an
/// address like `now`: the same kind (TLS or not), its host when the line names none.
fn moved_to(line: &[u8], now: &ConnectionAddr) -> Option<ConnectionAddr> {
    let line = std::str::from_utf8(line).ok()?.trim_end();
    let mut words = line.strip_prefix("-MOVED ")?.split(' ');
    let (_slot, endpoint) = (words.next()?, words.next()?);
    let (host, port) = endpoint.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    // A node that does not know its own address names none: the one connected to.
    let host_or = |now: &str| {
        if host.is_empty() || host == "?" {
            now.to_owned()
        } else {
            host.to_owned()
        }
    };
    match now {
        ConnectionAddr::Tcp(now, _) => Some(ConnectionAddr::Tcp(host_or(now), port)),
        #[cfg(feature = "tls")]
        ConnectionAddr::TcpTls {
            host: now,
            insecure,
            ..
        } => Some(ConnectionAddr::TcpTls {
            host: host_or(now),
            port,
            insecure: *insecure,
            tls_params: None,
        }),
        _ => None,
    }
}

/// [`crate::fuzzing::scan_reply`].
#[cfg(feature = "fuzzing")]
pub(crate) fn scan_in_two(bytes: &[u8], cut: usize) -> Option<usize> {
    let mut whole = Vec::new();
    let len = tokenize(bytes, &mut whole, &mut Scan::default()).ok()??;
    let (mut parts, mut scan) = (Vec::new(), Scan::default());
    let first = tokenize(&bytes[..cut.min(bytes.len())], &mut parts, &mut scan);
    if first.ok()?.is_none() {
        assert_eq!(tokenize(bytes, &mut parts, &mut scan).ok()?, Some(len));
    }
    assert_eq!(parts, whole);
    let bytes = Bytes::copy_from_slice(&bytes[..len]);
    let mut reply = Reply::new(&bytes, &whole);
    reply.skip().ok()?;
    assert!(reply.bulk().is_err(), "items past the reply's end");
    Some(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(bytes: &[u8]) -> io::Result<Option<(usize, Vec<Token>)>> {
        let mut t = Vec::new();
        Ok(tokenize(bytes, &mut t, &mut Scan::default())?.map(|n| (n, t)))
    }

    #[test]
    fn a_moved_reply_names_the_node_to_read_from_next() {
        let now = ConnectionAddr::Tcp("10.0.0.1".into(), 7000);
        let to = |line: &[u8]| moved_to(line, &now);
        assert_eq!(
            to(b"-MOVED 3999 127.0.0.1:6381\r\n"),
            Some(ConnectionAddr::Tcp("127.0.0.1".into(), 6381))
        );
        // A node that does not know its address names none: the same host, another port.
        assert_eq!(
            to(b"-MOVED 3999 :6382\r\n"),
            Some(ConnectionAddr::Tcp("10.0.0.1".into(), 6382))
        );
        assert_eq!(
            to(b"-MOVED 1 [::1]:6383\r\n"),
            Some(ConnectionAddr::Tcp("::1".into(), 6383))
        );
        for other in [
            &b"-ASK 3999 127.0.0.1:6381\r\n"[..],
            b"-MOVED 3999\r\n",
            b"-MOVED 3999 127.0.0.1:port\r\n",
            b"-ERR unknown command\r\n",
        ] {
            assert_eq!(to(other), None, "{}", String::from_utf8_lossy(other));
        }
        let unix = ConnectionAddr::Unix("/tmp/redis.sock".into());
        assert_eq!(moved_to(b"-MOVED 1 127.0.0.1:6381\r\n", &unix), None);
    }

    /// An XREADGROUP reply: one stream, two entries (one deleted), then a next reply's start.
    const READ: &[u8] = b"*1\r\n*2\r\n$1\r\ns\r\n*2\r\n*2\r\n$3\r\n1-0\r\n*4\r\n$2\r\nid\r\n$0\r\n\r\n$7\r\npayload\r\n$4\r\na\r\nb\r\n*2\r\n$3\r\n2-0\r\n*-1\r\n+OK\r\n";

    #[test]
    fn a_reply_reads_whole_and_only_whole() {
        let whole = READ.len() - b"+OK\r\n".len();
        let (n, t) = tokens(READ).unwrap().unwrap();
        assert_eq!(n, whole);
        let read = Bytes::from_static(&READ[..n]);
        let mut r = Reply::new(&read, &t);
        assert_eq!(r.array().unwrap(), Some(1));
        assert_eq!(r.array().unwrap(), Some(2));
        assert_eq!(r.bulk().unwrap(), Some(&b"s"[..]));
        assert_eq!(r.array().unwrap(), Some(2));
        assert_eq!(r.array().unwrap(), Some(2));
        assert_eq!(r.bulk().unwrap(), Some(&b"1-0"[..]));
        assert_eq!(r.array().unwrap(), Some(4));
        assert_eq!(r.bulk().unwrap(), Some(&b"id"[..]));
        assert_eq!(r.bulk().unwrap(), Some(&b""[..]));
        assert_eq!(r.bulk().unwrap(), Some(&b"payload"[..]));
        // A value may hold CRLF: its length, not a line, ends it.
        assert_eq!(r.bulk().unwrap(), Some(&b"a\r\nb"[..]));
        assert_eq!(r.array().unwrap(), Some(2));
        assert_eq!(r.bulk().unwrap(), Some(&b"2-0"[..]));
        assert_eq!(r.array().unwrap(), None);
        assert!(r.bulk().is_err(), "past its end");
        // Cut anywhere before its end, it is not a reply yet; given the rest, the scan goes on
        // from where it stopped to the same items.
        for cut in 0..whole {
            assert_eq!(tokens(&READ[..cut]).unwrap(), None, "cut at {cut}");
            let (mut part, mut scan) = (Vec::new(), Scan::default());
            assert_eq!(tokenize(&READ[..cut], &mut part, &mut scan).unwrap(), None);
            assert_eq!(tokenize(READ, &mut part, &mut scan).unwrap(), Some(whole));
            assert_eq!(part, t, "cut at {cut}");
        }
    }

    #[test]
    fn skip_passes_an_item_and_its_elements() {
        let (n, t) = tokens(READ).unwrap().unwrap();
        let read = Bytes::from_static(&READ[..n]);
        let mut r = Reply::new(&read, &t);
        r.skip().unwrap();
        assert!(r.bulk().is_err());
    }

    #[test]
    fn nil_replies_and_server_errors() {
        let (_, t) = tokens(b"*-1\r\n").unwrap().unwrap();
        let nil = Bytes::from_static(b"*-1\r\n");
        assert_eq!(Reply::new(&nil, &t).array().unwrap(), None);
        let line = b"-NOGROUP No such key 's' or consumer group 'g'\r\n";
        let (n, t) = tokens(line).unwrap().unwrap();
        assert_eq!(n, line.len());
        let line = Bytes::from_static(line);
        let e = Reply::new(&line, &t).array().unwrap_err();
        assert_eq!(e.code(), Some("NOGROUP"), "{e}");
        let (_, t) = tokens(b":12\r\n").unwrap().unwrap();
        assert_eq!(t, [Token::Int(12)]);
        let (_, t) = tokens(b":-9223372036854775807\r\n").unwrap().unwrap();
        assert_eq!(t, [Token::Int(-i64::MAX)]);
    }

    #[test]
    fn what_is_not_resp2_is_an_error_not_a_panic() {
        for bad in [
            &b"?1\r\n"[..],
            b"*x\r\n",
            b"*\r\n",
            b"*-\r\n",
            b":1-\r\n",
            b":99999999999999999999\r\n",
            b"*-2\r\n",
            b"$-5\r\n",
            b"$1\r\nab\r\n",
            b"+OK\n",
            b"\n",
            b"$99999999999999999999\r\n",
            b"*9223372036854775807\r\n*9223372036854775807\r\n*9223372036854775807\r\n",
        ] {
            assert!(tokens(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
