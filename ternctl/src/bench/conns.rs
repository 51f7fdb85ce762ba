//! Memory per connection: each proxy's RSS with 1,000 and 10,000 open client
//! HTTP/2 connections, idle and with one call in flight on each, and how soon
//! it comes back after they close.
//!
//! The calls are held in flight by the client: it sends the request head and
//! keeps the body open, so every proxy on the path holds the stream and its
//! upstream stream until the client sends the message and the call completes.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use prost::Message as _;
use serde::Serialize;
use tokio::task::JoinSet;

use super::paths::Sidecar;
use super::{load, PathResult};

/// After the connections close, RSS must come back within this share of its
/// value before they opened, within [`RECOVERY_LIMIT`].
pub const RECOVERY_SLACK: f64 = 0.2;
pub const RECOVERY_LIMIT: Duration = Duration::from_secs(60);
const MIB: f64 = 1024.0 * 1024.0;

/// Connections opened at once: a burst larger than the proxy's accept
/// backlog on a busy machine gets connections reset.
const OPEN_BATCH: usize = 50;
/// Attempts to open each connection.
const OPEN_ATTEMPTS: usize = 3;

#[derive(Clone, Debug, Serialize)]
pub struct ConnMemory {
    /// Each proxy's RSS before any connection opened.
    pub rss_before_bytes: Vec<u64>,
    pub levels: Vec<Level>,
    /// Each proxy's RSS once back within the slack, or at the limit.
    pub rss_after_close_bytes: Vec<u64>,
    /// Seconds after closing until every proxy was back within the slack;
    /// `None`: not within [`RECOVERY_LIMIT`].
    pub recovered_after_s: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Level {
    pub connections: usize,
    /// Each proxy's RSS with the connections open and idle.
    pub rss_idle_bytes: Vec<u64>,
    /// … and with one call in flight on each.
    pub rss_in_flight_bytes: Vec<u64>,
    /// Calls that completed once released (each level's calls all should).
    pub calls_ok: usize,
}

type Sender = h2::client::SendRequest<Bytes>;

/// Opens connections to `target` up to each of `levels` in turn.
pub async fn measure(
    target: SocketAddr,
    sidecars: &[Sidecar],
    levels: &[usize],
) -> anyhow::Result<ConnMemory> {
    let rss = || -> anyhow::Result<Vec<u64>> {
        sidecars
            .iter()
            .map(|s| current_rss(s.pid).with_context(|| format!("{} is gone", s.name)))
            .collect()
    };
    let rss_before_bytes = settled(&rss).await?;
    let mut drivers = JoinSet::new();
    let mut conns: Vec<Sender> = Vec::new();
    let mut out = Vec::new();
    for &n in levels {
        open(target, n, &mut conns, &mut drivers).await?;
        let rss_idle_bytes = settled(&rss).await?;
        let held = hold_calls(&conns).await?;
        let rss_in_flight_bytes = settled(&rss).await?;
        let calls_ok = release(held).await;
        out.push(Level {
            connections: n,
            rss_idle_bytes,
            rss_in_flight_bytes,
            calls_ok,
        });
    }
    drop(conns);
    drivers.shutdown().await;
    let closed = Instant::now();
    let (recovered_after_s, rss_after_close_bytes) = loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = rss()?;
        let back = now
            .iter()
            .zip(&rss_before_bytes)
            .all(|(n, b)| *n as f64 <= *b as f64 * (1.0 + RECOVERY_SLACK));
        if back {
            break (Some(closed.elapsed().as_secs_f64()), now);
        }
        if closed.elapsed() >= RECOVERY_LIMIT {
            break (None, now);
        }
    };
    Ok(ConnMemory {
        rss_before_bytes,
        levels: out,
        rss_after_close_bytes,
        recovered_after_s,
    })
}

/// Descriptors a proxy needs for `n` client connections: tern-proxy lets
/// downstream connections take half of its limit less a reserve (each may
/// need an upstream one), and this process holds the client ends.
pub fn fds_needed(n: usize) -> u64 {
    2 * n as u64 + 512
}

/// The most client connections [`fds_needed`] allows under `fd_limit`.
pub fn max_connections(fd_limit: u64) -> usize {
    usize::try_from(fd_limit.saturating_sub(512) / 2).unwrap_or(usize::MAX)
}

/// Raises this process's open-file limit, which the proxies it starts
/// inherit, to `want` (beyond the hard limit only with the privilege to),
/// else to the hard limit; returns the soft limit in force.
pub fn raise_fd_limit(want: u64) -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    if soft >= want {
        return soft;
    }
    if setrlimit(Resource::RLIMIT_NOFILE, want, hard.max(want)).is_ok() {
        return want;
    }
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return hard;
    }
    soft
}

async fn open(
    target: SocketAddr,
    n: usize,
    conns: &mut Vec<Sender>,
    drivers: &mut JoinSet<()>,
) -> anyhow::Result<()> {
    while conns.len() < n {
        let batch = (n - conns.len()).min(OPEN_BATCH);
        let mut opening = JoinSet::new();
        for _ in 0..batch {
            opening.spawn(async move {
                let mut last = None;
                for _ in 0..OPEN_ATTEMPTS {
                    match open_one(target).await {
                        Ok(c) => return Ok(c),
                        Err(e) => last = Some(e),
                    }
                }
                Err(last.unwrap_or_else(|| std::io::Error::other("no attempt made")))
            });
        }
        while let Some(r) = opening.join_next().await {
            let (tx, conn) = r
                .context("a connecting task failed")?
                .with_context(|| format!("opening connection {} to {target}", conns.len() + 1))?;
            drivers.spawn(conn);
            conns.push(tx);
        }
    }
    Ok(())
}

/// A connection the proxy has answered: a PING came back over it, so it is
/// accepted and its HTTP/2 handshake done. Returns its sender and a task
/// driving it.
async fn open_one(
    target: SocketAddr,
) -> std::io::Result<(Sender, impl std::future::Future<Output = ()> + Send)> {
    let tcp = tokio::net::TcpStream::connect(target).await?;
    tcp.set_nodelay(true)?;
    let (tx, mut conn) = h2::client::handshake(tcp)
        .await
        .map_err(std::io::Error::other)?;
    let mut ping = conn
        .ping_pong()
        .ok_or_else(|| std::io::Error::other("no ping handle"))?;
    let pong = ping.ping(h2::Ping::opaque());
    tokio::pin!(pong);
    // The connection must be driven for the PONG to arrive.
    tokio::select! {
        r = &mut pong => {
            r.map_err(std::io::Error::other)?;
        }
        r = &mut conn => {
            r.map_err(std::io::Error::other)?;
            return Err(std::io::Error::other("closed before answering a PING"));
        }
    }
    Ok((tx, async move {
        let _ = conn.await;
    }))
}

type Held = Vec<(h2::client::ResponseFuture, h2::SendStream<Bytes>)>;

/// One call on each connection: the head sent, the body left open.
async fn hold_calls(conns: &[Sender]) -> anyhow::Result<Held> {
    let mut held = Vec::with_capacity(conns.len());
    for tx in conns {
        let mut tx = tx.clone().ready().await.context("a connection closed")?;
        let req = http::Request::post("/tern.demo.v1.PayService/Pay")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .context("building the request")?;
        held.push(tx.send_request(req, false).context("sending a call")?);
    }
    Ok(held)
}

/// Sends each held call its message and waits for every response to end;
/// returns how many got HTTP 200 and grpc-status 0.
async fn release(held: Held) -> usize {
    let msg = load::request().encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&u32::try_from(msg.len()).unwrap_or(0).to_be_bytes());
    frame.extend_from_slice(&msg);
    let frame = Bytes::from(frame);
    let mut calls = JoinSet::new();
    for (rsp, mut body) in held {
        let frame = frame.clone();
        calls.spawn(async move {
            body.send_data(frame, true).ok()?;
            let rsp = rsp.await.ok()?;
            let ok_head = rsp.status() == http::StatusCode::OK;
            let mut body = rsp.into_body();
            while let Some(chunk) = body.data().await {
                let chunk = chunk.ok()?;
                let _ = body.flow_control().release_capacity(chunk.len());
            }
            let trailers = body.trailers().await.ok()??;
            let ok = ok_head && trailers.get("grpc-status").is_some_and(|s| s == "0");
            ok.then_some(())
        });
    }
    let mut ok = 0;
    while let Some(r) = calls.join_next().await {
        if matches!(r, Ok(Some(()))) {
            ok += 1;
        }
    }
    ok
}

/// RSS once it stops moving: read every 250 ms until two readings differ by
/// under 1%, for at most 5 s.
async fn settled(rss: &impl Fn() -> anyhow::Result<Vec<u64>>) -> anyhow::Result<Vec<u64>> {
    let start = Instant::now();
    let mut last = rss()?;
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = rss()?;
        let still = now
            .iter()
            .zip(&last)
            .all(|(a, b)| (*a as f64 - *b as f64).abs() <= *b as f64 * 0.01);
        if still || start.elapsed() > Duration::from_secs(5) {
            return Ok(now);
        }
        last = now;
    }
}

/// VmRSS of a process, in bytes.
fn current_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Each proxy's RSS at each connection count, one row per proxy.
pub fn print(results: &[PathResult]) {
    if results.iter().all(|p| p.conn_memory.is_none()) {
        return;
    }
    println!();
    println!("memory per connection: RSS (MiB) of each proxy, open client HTTP/2 connections idle / with one call in flight each");
    for p in results {
        let Some(m) = &p.conn_memory else { continue };
        for (i, sc) in p.sidecars.iter().enumerate() {
            let mib = |v: &[u64]| {
                v.get(i)
                    .map_or("-".into(), |b| format!("{:.1}", *b as f64 / MIB))
            };
            let levels: Vec<String> = m
                .levels
                .iter()
                .map(|l| {
                    format!(
                        "{}: {} / {}",
                        l.connections,
                        mib(&l.rss_idle_bytes),
                        mib(&l.rss_in_flight_bytes)
                    )
                })
                .collect();
            println!(
                "  {:<10} {:<22} before {:>5}   {}   after close {}",
                p.path.key(),
                sc.name,
                mib(&m.rss_before_bytes),
                levels.join("   "),
                mib(&m.rss_after_close_bytes),
            );
        }
        let calls: Vec<String> = m
            .levels
            .iter()
            .map(|l| format!("{}/{}", l.calls_ok, l.connections))
            .collect();
        println!(
            "  {:<10} held calls completed OK: {}; back within 20% of before: {}",
            p.path.key(),
            calls.join(", "),
            m.recovered_after_s
                .map_or("not within 60 s".into(), |s| format!("after {s:.0} s"))
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process_rss() {
        assert!(current_rss(std::process::id()).is_some_and(|b| b > 0));
        assert_eq!(current_rss(u32::MAX), None);
    }
}
