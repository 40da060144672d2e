//! An Apache Kafka broker of a test's (or a benchmark's, or the soak's) own, started through
//! `scripts/kafka` from a directory of its own on free loopback ports. Shared with `#[path]` by
//! the root tests, the CLI's tests and the examples.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// `scripts/kafka` of this workspace.
fn script() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let here = manifest.join("scripts/kafka");
    if here.exists() {
        return here;
    }
    manifest.join("../scripts/kafka")
}

/// A single-node Apache Kafka (KRaft) from a directory of its own; stopped, and its directory
/// removed, on drop. Its data is on disk: a restart (after [`KafkaServer::kill`] too) keeps it.
pub struct KafkaServer {
    dir: PathBuf,
    brokers: String,
}

impl KafkaServer {
    /// Formats a fresh directory and starts a broker from it; `settings` are extra server
    /// properties (`key=value`).
    pub fn start(settings: &[&str]) -> Result<Self, String> {
        let dir =
            std::env::temp_dir().join(format!("cqrs-kafka-{}-{}", std::process::id(), uuid_like()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let mut args: Vec<String> = Vec::new();
        for s in settings {
            args.push("--set".into());
            args.push((*s).into());
        }
        let brokers = run_start(&dir, &args)?;
        Ok(KafkaServer { dir, brokers })
    }

    /// The bootstrap address (`127.0.0.1:port`).
    pub fn brokers(&self) -> &str {
        &self.brokers
    }

    /// The directory it runs from (its log is `server.log` there).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The broker's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.join("pid"))
            .ok()
            .and_then(|p| p.trim().parse().ok())
    }

    /// SIGKILLs the broker and waits until it is gone.
    pub fn kill(&self) -> Result<(), String> {
        self.stop_with(&["--kill"])
    }

    /// Stops the broker cleanly (SIGTERM) and waits until it is gone.
    pub fn stop(&self) -> Result<(), String> {
        self.stop_with(&[])
    }

    fn stop_with(&self, extra: &[&str]) -> Result<(), String> {
        let status = Command::new("bash")
            .arg(script())
            .arg("stop")
            .arg(&self.dir)
            .args(extra)
            .stdout(Stdio::null())
            .status()
            .map_err(|e| format!("running scripts/kafka stop: {e}"))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("scripts/kafka stop failed: {status}"))
        }
    }

    /// Starts the broker again from its directory (same ports, same data); returns once it
    /// answers metadata requests.
    pub fn restart(&self) -> Result<(), String> {
        run_start(&self.dir, &[]).map(|_| ())
    }
}

fn run_start(dir: &Path, args: &[String]) -> Result<String, String> {
    let out = Command::new("bash")
        .arg(script())
        .arg("start")
        .arg(dir)
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("running scripts/kafka start: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "scripts/kafka start {} failed: {}",
            dir.display(),
            out.status
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// A name part unique enough for a temporary directory.
fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{nanos:x}-{}", N.fetch_add(1, Ordering::Relaxed))
}

/// A KRaft cluster of `n` nodes (each a broker and a controller) on loopback, every node from a
/// directory of its own; each node can be killed and restarted alone.
pub struct KafkaCluster {
    pub nodes: Vec<KafkaServer>,
}

impl KafkaCluster {
    /// Starts `n` nodes at once (a quorum needs a majority to answer) with `settings` on each;
    /// returns once every node sees `n` brokers.
    pub fn start(n: usize, settings: &[&str]) -> Result<Self, String> {
        let free_port = || -> Result<u16, String> {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .map_err(|e| format!("no free port: {e}"))
        };
        let ports: Vec<(u16, u16)> = (0..n)
            .map(|_| Ok((free_port()?, free_port()?)))
            .collect::<Result<_, String>>()?;
        let voters: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, c))| format!("{}@127.0.0.1:{c}", i + 1))
            .collect();
        let voters = voters.join(",");
        // 16 random bytes, base64url without padding: a cluster id.
        let cluster_id = {
            use std::hash::{BuildHasher, Hasher};
            let mut bytes = Vec::with_capacity(16);
            for i in 0..2u64 {
                let mut h = std::collections::hash_map::RandomState::new().build_hasher();
                h.write_u64(i);
                bytes.extend_from_slice(&h.finish().to_le_bytes());
            }
            base64url(&bytes)
        };
        let starts: Vec<_> = ports
            .iter()
            .enumerate()
            .map(|(i, (port, cport))| {
                let dir = std::env::temp_dir().join(format!(
                    "cqrs-kafka-{}-{}-node{}",
                    std::process::id(),
                    uuid_like(),
                    i + 1
                ));
                let mut args: Vec<String> = [
                    "--port",
                    &port.to_string(),
                    "--controller-port",
                    &cport.to_string(),
                    "--node-id",
                    &(i + 1).to_string(),
                    "--voters",
                    &voters,
                    "--cluster-id",
                    &cluster_id,
                    "--brokers",
                    &n.to_string(),
                ]
                .iter()
                .map(|s| s.to_string())
                .collect();
                for s in settings {
                    args.push("--set".into());
                    args.push((*s).into());
                }
                std::thread::spawn(move || {
                    std::fs::create_dir_all(&dir)
                        .map_err(|e| format!("creating {}: {e}", dir.display()))?;
                    let brokers = run_start(&dir, &args)?;
                    Ok::<_, String>(KafkaServer { dir, brokers })
                })
            })
            .collect();
        let mut nodes = Vec::new();
        let mut failed = None;
        for s in starts {
            match s.join().map_err(|_| "a start thread panicked".to_owned()) {
                Ok(Ok(node)) => nodes.push(node),
                Ok(Err(e)) | Err(e) => failed = Some(e),
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(KafkaCluster { nodes }),
        }
    }

    /// Every node's address, comma-separated.
    pub fn brokers(&self) -> String {
        self.nodes
            .iter()
            .map(KafkaServer::brokers)
            .collect::<Vec<_>>()
            .join(",")
    }
}

fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

impl Drop for KafkaServer {
    fn drop(&mut self) {
        let _ = self.stop_with(&["--kill"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
