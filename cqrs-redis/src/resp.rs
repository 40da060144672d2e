//! The consumer's own connection for `XREADGROUP` on one server.
//!
//! The client library parses every reply into a tree of values: for a read of 500 entries,
//! some 4,500 of them, each field and value in an allocation of its own, made on the
//! connection's task and freed on the handler's. That parse was a third of a consumed event's
//! instructions, and the frees from another thread contended for the allocator's lock (docs/
//! benchmarks.md). This connection reads a reply into one buffer that lives as long as the
//! connection, checks its framing once, and hands out its strings where they lie: the decoder
//! copies only the message's id, name, key and payload out of it.
//!
//! It speaks RESP2 and nothing but the commands given to it, over TCP, a Unix socket or (feature
//! `tls`) TLS as a `rediss://` URL sets it; clusters stay with the client library (`conn`), as
//! do all other commands of the consumer.

use std::io;
use std::pin::Pin;
use std::time::Duration;

use redis::{Cmd, ConnectionAddr, ConnectionInfo, RedisError, RedisResult};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

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

/// A reply read: its tokens over the connection's buffer, walked in order.
pub(crate) struct Reply<'a> {
    buf: &'a [u8],
    tokens: &'a [Token],
    at: usize,
}

impl<'a> Reply<'a> {
    pub(crate) fn new(buf: &'a [u8], tokens: &'a [Token]) -> Self {
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

/// A connection to one server for the replies of one kind of command: see the module's doc.
pub(crate) struct Reader {
    info: ConnectionInfo,
    response_timeout: Duration,
    wire: Option<Wire>,
}

struct Wire {
    io: Pin<Box<dyn Io>>,
    /// Bytes read and not yet taken by a reply; kept between replies, so a read of the same
    /// size needs no allocation.
    buf: Vec<u8>,
    /// The bytes at the start of `buf` that belong to the last reply handed out.
    taken: usize,
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
        };
        reader.wire().await?;
        Ok(reader)
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
    /// connects again); an error reply of the server leaves it open.
    pub(crate) async fn query(&mut self, cmd: &Cmd) -> RedisResult<Reply<'_>> {
        let timeout = self.response_timeout;
        let result = async {
            let wire = self.wire().await?;
            tokio::time::timeout(timeout, wire.exchange(cmd))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no reply in time"))?
        }
        .await;
        match result {
            Ok(()) => {}
            Err(e) => {
                // Its state is unknown: a late reply would answer the next command.
                self.wire = None;
                return Err(e);
            }
        }
        match &self.wire {
            Some(w) => Ok(w.reply()),
            None => Err(io::Error::other("no connection").into()),
        }
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
            buf: Vec::new(),
            taken: 0,
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
        Reply::new(&self.buf[..self.taken], &self.tokens)
    }

    /// Writes `cmd` and reads its reply into `buf[..taken]` and `tokens`.
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

    /// Reads the next reply: its bytes become `buf[..taken]`, its items `tokens`.
    async fn read_reply(&mut self) -> RedisResult<()> {
        // The last reply handed out is done with.
        if self.taken > 0 {
            self.buf.drain(..self.taken);
            self.taken = 0;
            self.tokens.clear();
            self.scan = Scan::default();
            // A read of large entries grew the buffer: not kept at that size for the next.
            if self.buf.capacity() > KEPT && self.buf.len() < KEPT {
                self.buf.shrink_to(KEPT);
                self.tokens.shrink_to(KEPT / 64);
            }
        }
        loop {
            if let Some(len) = tokenize(&self.buf, &mut self.tokens, &mut self.scan)? {
                self.taken = len;
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
    let mut reply = Reply::new(&bytes[..len], &whole);
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

    /// An XREADGROUP reply: one stream, two entries (one deleted), then a next reply's start.
    const READ: &[u8] = b"*1\r\n*2\r\n$1\r\ns\r\n*2\r\n*2\r\n$3\r\n1-0\r\n*4\r\n$2\r\nid\r\n$0\r\n\r\n$7\r\npayload\r\n$4\r\na\r\nb\r\n*2\r\n$3\r\n2-0\r\n*-1\r\n+OK\r\n";

    #[test]
    fn a_reply_reads_whole_and_only_whole() {
        let whole = READ.len() - b"+OK\r\n".len();
        let (n, t) = tokens(READ).unwrap().unwrap();
        assert_eq!(n, whole);
        let mut r = Reply::new(&READ[..n], &t);
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
        let mut r = Reply::new(&READ[..n], &t);
        r.skip().unwrap();
        assert!(r.bulk().is_err());
    }

    #[test]
    fn nil_replies_and_server_errors() {
        let (_, t) = tokens(b"*-1\r\n").unwrap().unwrap();
        assert_eq!(Reply::new(b"*-1\r\n", &t).array().unwrap(), None);
        let line = b"-NOGROUP No such key 's' or consumer group 'g'\r\n";
        let (n, t) = tokens(line).unwrap().unwrap();
        assert_eq!(n, line.len());
        let e = Reply::new(line, &t).array().unwrap_err();
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
