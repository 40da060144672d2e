//! An Apache Kafka broker of a test's (or a benchmark's, or the soak's) own, started through
//! `scripts/kafka` from a directory of its own on free loopback ports. Shared with `#[path]` by
//! the root tests, the CLI's tests and the examples.

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
        KafkaServer::start_under(&std::env::temp_dir(), settings)
    }

    /// [`KafkaServer::start`] from a fresh directory under `parent`: a benchmark's broker on a
    /// memory-backed file system (`/dev/shm`) writes no log to disk.
    pub fn start_under(parent: &Path, settings: &[&str]) -> Result<Self, String> {
        KafkaServer::start_in(
            fresh_dir(parent, "cqrs-kafka"),
            with_settings(Vec::new(), settings),
        )
    }

    /// Starts a broker from `dir` (created if missing) with `args` for `scripts/kafka start`.
    fn start_in(dir: PathBuf, args: Vec<String>) -> Result<Self, String> {
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
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

    /// SIGKILLs the broker and waits until it is gone.
    pub fn kill(&self) -> Result<(), String> {
        let dir = self.dir.to_string_lossy();
        run_script(&["stop", &dir, "--kill"]).map(|_| ())
    }

    /// Starts the broker again from its directory (same ports, same data); returns once it
    /// answers metadata requests.
    pub fn restart(&self) -> Result<(), String> {
        run_start(&self.dir, &[]).map(|_| ())
    }
}

fn run_start(dir: &Path, args: &[String]) -> Result<String, String> {
    let dir = dir.to_string_lossy();
    let mut all = vec!["start", &dir];
    all.extend(args.iter().map(String::as_str));
    run_script(&all)
}

/// Runs `scripts/kafka args...`; returns what it printed (its log goes to this stderr).
fn run_script(args: &[&str]) -> Result<String, String> {
    let out = Command::new("bash")
        .arg(script())
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("running scripts/kafka {}: {e}", args[0]))?;
    if !out.status.success() {
        return Err(format!(
            "scripts/kafka {} failed: {}",
            args.join(" "),
            out.status
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// A fresh directory name under `parent`.
fn fresh_dir(parent: &Path, prefix: &str) -> PathBuf {
    parent.join(cqrs::conformance::unique(prefix))
}

/// `args` and a `--set key=value` for each of `settings`.
fn with_settings(mut args: Vec<String>, settings: &[&str]) -> Vec<String> {
    for s in settings {
        args.push("--set".into());
        args.push((*s).into());
    }
    args
}

/// A KRaft cluster of `n` nodes (each a broker and a controller) on loopback, every node from a
/// directory of its own; each node can be killed and restarted alone.
pub struct KafkaCluster {
    /// The nodes, in node id order.
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
        let cluster_id = run_script(&["cluster-id"])?;
        let starts: Vec<_> = ports
            .iter()
            .enumerate()
            .map(|(i, (port, cport))| {
                let dir = fresh_dir(&std::env::temp_dir(), &format!("cqrs-kafka-node{}", i + 1));
                let args: Vec<String> = [
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
                let args = with_settings(args, settings);
                std::thread::spawn(move || KafkaServer::start_in(dir, args))
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

impl Drop for KafkaServer {
    fn drop(&mut self) {
        let _ = self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
