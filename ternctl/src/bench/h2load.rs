//! A second load generator: nghttp2's h2load, written in C and driving many
//! connections from one thread, so a slow client cannot pass for a slow proxy.
//! It sends the same unary call as a gRPC request body it does not parse; a
//! call counts as succeeded on HTTP 200 (the bench's own client checks the
//! gRPC status first).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};
use prost::Message as _;
use serde::Serialize;

use super::{load, PathResult};

/// h2load's shape: connections, and streams in flight on each.
pub const CONNECTIONS: u32 = 8;
pub const STREAMS: u32 = 16;

/// What one h2load run measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct H2loadPhase {
    pub connections: u32,
    pub streams_per_connection: u32,
    pub seconds: f64,
    pub rps: f64,
    pub succeeded: u64,
    pub failed: u64,
    pub mean_us: f64,
    /// CPU of all the path's proxies per succeeded call.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxies_cpu_us_per_req: Option<f64>,
}

/// h2load and the request body it sends.
pub struct H2load {
    bin: PathBuf,
    body: tempfile::NamedTempFile,
}

impl H2load {
    /// `None` when h2load is not installed (Debian: nghttp2-client).
    pub fn find() -> anyhow::Result<Option<Self>> {
        let Some(bin) = std::env::var_os("PATH").and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("h2load"))
                .find(|p| p.is_file())
        }) else {
            return Ok(None);
        };
        let mut body = tempfile::NamedTempFile::new().context("creating h2load's request body")?;
        std::io::Write::write_all(&mut body, &grpc_frame(&load::request().encode_to_vec()))
            .context("writing h2load's request body")?;
        Ok(Some(Self { bin, body }))
    }

    pub fn path(&self) -> &Path {
        &self.bin
    }

    /// Unary calls at `target` for `duration` after a second of warm-up.
    pub async fn run(&self, target: SocketAddr, duration: Duration) -> anyhow::Result<H2loadPhase> {
        let secs = duration.as_secs().max(1).to_string();
        let out = tokio::process::Command::new(&self.bin)
            .args([
                "-t1",
                "-c",
                &CONNECTIONS.to_string(),
                "-m",
                &STREAMS.to_string(),
                "-D",
                &secs,
                "--warm-up-time=1",
                "-d",
                &self.body.path().display().to_string(),
                "-H",
                "content-type: application/grpc",
                "-H",
                "te: trailers",
                &format!("http://{target}/tern.demo.v1.PayService/Pay"),
            ])
            .kill_on_drop(true)
            .output()
            .await
            .context("running h2load")?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!("h2load failed ({}): {}", out.status, text.trim());
        }
        parse(&text).with_context(|| format!("reading h2load's output: {text}"))
    }
}

/// A gRPC message: uncompressed flag, big-endian length, the message.
fn grpc_frame(msg: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(msg.len() + 5);
    v.push(0);
    v.extend_from_slice(&u32::try_from(msg.len()).unwrap_or(u32::MAX).to_be_bytes());
    v.extend_from_slice(msg);
    v
}

/// From `finished in 5.00s, 12345.67 req/s, …`, `requests: N total, …,
/// N succeeded, N failed, …` and `time for request: min max mean sd …`.
fn parse(text: &str) -> anyhow::Result<H2loadPhase> {
    let mut p = H2loadPhase {
        connections: CONNECTIONS,
        streams_per_connection: STREAMS,
        ..H2loadPhase::default()
    };
    let mut seen = 0;
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("finished in ") {
            let mut parts = rest.split(", ");
            p.seconds = parts.next().and_then(duration_us).context("finished in")? / 1e6;
            p.rps = parts
                .next()
                .and_then(|r| r.strip_suffix(" req/s"))
                .and_then(|r| r.parse().ok())
                .context("req/s")?;
            seen += 1;
        } else if let Some(rest) = line.strip_prefix("requests: ") {
            for part in rest.split(", ") {
                match part.split_once(' ') {
                    Some((n, "succeeded")) => p.succeeded = n.parse().context("succeeded")?,
                    Some((n, "failed")) => p.failed = n.parse().context("failed")?,
                    _ => {}
                }
            }
            seen += 1;
        } else if let Some(rest) = line.strip_prefix("time for request:") {
            p.mean_us = rest
                .split_whitespace()
                .nth(2)
                .and_then(duration_us)
                .context("mean time for request")?;
            seen += 1;
        }
    }
    if seen < 3 {
        bail!("missing lines");
    }
    Ok(p)
}

/// `523us`, `1.02ms`, `5.00s` in µs.
fn duration_us(s: &str) -> Option<f64> {
    let (n, scale) = if let Some(n) = s.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1e3)
    } else {
        (s.strip_suffix('s')?, 1e6)
    };
    n.parse::<f64>().ok().map(|v| v * scale)
}

/// h2load's table, one row per path it drove.
pub fn print(results: &[PathResult]) {
    if results.iter().all(|p| p.h2load.is_none()) {
        return;
    }
    println!();
    println!("h2load, same calls (HTTP 200 counts as success)");
    println!(
        "{:<12} {:>10} {:>10} {:>9} {:>14}",
        "path", "req/s", "mean µs", "failed", "proxies µs/req"
    );
    for p in results {
        if let Some(h) = &p.h2load {
            println!(
                "{:<12} {:>10.0} {:>10.0} {:>9} {:>14}",
                p.path.key(),
                h.rps,
                h.mean_us,
                h.failed,
                h.proxies_cpu_us_per_req
                    .map_or("-".into(), |c| format!("{c:.1}"))
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_h2load_output() {
        let out = "starting benchmark...\n\
            finished in 5.00s, 41234.50 req/s, 2.10MB/s\n\
            requests: 206172 total, 206172 started, 206172 done, 206100 succeeded, 72 failed, 0 errored, 0 timeout\n\
            status codes: 206100 2xx, 0 3xx, 0 4xx, 72 5xx\n\
                                 min         max         mean         sd        +/- sd\n\
            time for request:      123us     12.40ms      3.09ms       1.2ms    70.00%\n";
        let p = parse(out).ok();
        let p = p.as_ref();
        assert_eq!(p.map(|p| (p.succeeded, p.failed)), Some((206_100, 72)));
        assert!(p.is_some_and(|p| (p.rps - 41234.5).abs() < 1e-6));
        assert!(p.is_some_and(|p| (p.mean_us - 3090.0).abs() < 1e-6));
        assert!(p.is_some_and(|p| (p.seconds - 5.0).abs() < 1e-9));
        assert!(parse("nothing").is_err());
    }

    #[test]
    fn frames_a_grpc_message() {
        assert_eq!(grpc_frame(b"ab"), vec![0, 0, 0, 0, 2, b'a', b'b']);
    }
}
