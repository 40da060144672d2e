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

impl Drop for KafkaServer {
    fn drop(&mut self) {
        let _ = self.stop_with(&["--kill"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
