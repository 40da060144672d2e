//! Helpers shared by the benchmarks (included with `#[path]`; not an example of its own).

// Each benchmark uses some of them.
#![allow(dead_code)]

use std::time::Duration;

use cqrs::BoxError;

/// A tansu broker on a free port, stopped on drop.
pub struct Tansu {
    pub brokers: String,
    child: std::process::Child,
}

impl Tansu {
    pub async fn start() -> Result<Self, BoxError> {
        let bin = std::env::var("TANSU_BIN").unwrap_or_else(|_| {
            format!(
                "{}/.cache/tansu-0.6.0/bin/tansu",
                std::env::var("HOME").unwrap_or_default()
            )
        });
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let url = format!("tcp://127.0.0.1:{port}");
        let child = std::process::Command::new(bin)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Ok(Tansu {
                    brokers: format!("127.0.0.1:{port}"),
                    child,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err("tansu did not start".into())
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// This process's resident set size in KiB (`VmRSS` of `/proc/self/status`; 0 where there is
/// none).
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}
