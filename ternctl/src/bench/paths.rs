//! What each measured path needs running: the `pay` server, tern-proxy
//! sidecars, and haproxy as the reference a user could pick instead.
//!
//! The mTLS path is the real mesh hop: a tern-control CA (in a temporary
//! state directory) issues both sidecars their certificates, and the client
//! side checks the server side's SPIFFE id.
//!
//! Every listener Tern binds uses port 0 and is read back from the process's
//! ready line, so concurrent runs on one machine cannot collide; haproxy does
//! not report its ports, so it gets a free port picked beforehand.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde::Serialize;

use super::callgrind::Callgrind;
use crate::procs::{self, Proc};

/// How long a stopped child may drain before it is killed.
pub const GRACE: Duration = Duration::from_secs(3);
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Start-up under callgrind runs some 50 times slower.
const READY_TIMEOUT_CALLGRIND: Duration = Duration::from_secs(90);

/// One way from the load generator to `pay`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PathKind {
    Direct,
    One,
    Two,
    TwoMtls,
    HaproxyOne,
    HaproxyTwo,
}

impl PathKind {
    pub const ALL: [PathKind; 6] = [
        PathKind::Direct,
        PathKind::One,
        PathKind::Two,
        PathKind::TwoMtls,
        PathKind::HaproxyOne,
        PathKind::HaproxyTwo,
    ];

    pub fn key(self) -> &'static str {
        match self {
            PathKind::Direct => "direct",
            PathKind::One => "one",
            PathKind::Two => "two",
            PathKind::TwoMtls => "two-mtls",
            PathKind::HaproxyOne => "haproxy-one",
            PathKind::HaproxyTwo => "haproxy-two",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            PathKind::Direct => "client → pay",
            PathKind::One => "client → tern-proxy (outbound) → pay",
            PathKind::Two => "client → tern-proxy (outbound) → tern-proxy (inbound) → pay",
            PathKind::TwoMtls => {
                "client → tern-proxy (outbound) =mTLS=> tern-proxy (inbound) → pay"
            }
            PathKind::HaproxyOne => "client → haproxy → pay",
            PathKind::HaproxyTwo => "client → haproxy → haproxy → pay",
        }
    }

    /// A path through tern-proxy sidecars.
    pub fn is_tern(self) -> bool {
        matches!(self, PathKind::One | PathKind::Two | PathKind::TwoMtls)
    }

    pub fn is_haproxy(self) -> bool {
        matches!(self, PathKind::HaproxyOne | PathKind::HaproxyTwo)
    }

    /// The haproxy path of the same shape as a Tern path.
    pub fn haproxy_peer(self) -> Option<PathKind> {
        match self {
            PathKind::One => Some(PathKind::HaproxyOne),
            PathKind::Two | PathKind::TwoMtls => Some(PathKind::HaproxyTwo),
            _ => None,
        }
    }
}

/// A proxy process whose memory and CPU are measured.
pub struct Sidecar {
    pub name: String,
    pub pid: u32,
    /// The name as a file name (callgrind's dumps).
    pub slug: String,
}

/// The processes of one path, and the address the load generator dials.
pub struct Topology {
    pub target: SocketAddr,
    pub sidecars: Vec<Sidecar>,
    procs: Vec<Proc>,
    /// Every proxy runs under callgrind (see [`super::callgrind`]).
    callgrind: Option<Arc<Callgrind>>,
    /// tern-control for the mTLS path: not measured, stopped last.
    ca: Option<Proc>,
    // haproxy's config, or the CA's state; removed when the path is done.
    _dir: Option<tempfile::TempDir>,
}

impl Topology {
    pub async fn start(
        kind: PathKind,
        pay: SocketAddr,
        haproxy: Option<&Path>,
        callgrind: Option<Arc<Callgrind>>,
    ) -> anyhow::Result<Self> {
        let mut t = Topology {
            target: pay,
            sidecars: Vec::new(),
            procs: Vec::new(),
            callgrind,
            ca: None,
            _dir: None,
        };
        match kind {
            PathKind::Direct => {}
            PathKind::One => {
                t.target = t.tern_outbound("tern-proxy (outbound)", pay, &[]).await?;
            }
            PathKind::Two => {
                let inbound = t.tern_inbound("tern-proxy (inbound)", pay, &[]).await?;
                t.target = t
                    .tern_outbound("tern-proxy (outbound)", inbound, &[])
                    .await?;
            }
            PathKind::TwoMtls => {
                let dir = tempfile::tempdir().context("creating the CA's state directory")?;
                let (ca, grpc) = start_ca(dir.path()).await?;
                t.ca = Some(ca);
                let server = identity_args(dir.path(), grpc, "pay")?;
                let inbound = t.tern_inbound("tern-proxy (inbound)", pay, &server).await?;
                let mut client = identity_args(dir.path(), grpc, "client")?;
                client.extend([
                    "--endpoint-identity".into(),
                    "pay=spiffe://cluster.local/ns/default/sa/pay".to_string(),
                ]);
                t.target = t
                    .tern_outbound("tern-proxy (outbound)", inbound, &client)
                    .await?;
                t._dir = Some(dir);
            }
            PathKind::HaproxyOne | PathKind::HaproxyTwo => {
                let bin = haproxy.context("haproxy is not installed")?;
                let dir =
                    tempfile::tempdir().context("creating a directory for haproxy's config")?;
                let mut next = pay;
                // Started from the app outwards, so each hop's upstream is listening.
                let hops = if kind == PathKind::HaproxyTwo { 2 } else { 1 };
                for hop in (0..hops).rev() {
                    let name = if hop == 0 {
                        "haproxy (client side)"
                    } else {
                        "haproxy (server side)"
                    };
                    next = t.haproxy(name, bin, dir.path(), hop, next).await?;
                }
                t.target = next;
                t._dir = Some(dir);
            }
        }
        Ok(t)
    }

    /// Stops the proxies, the one nearest the client first, so no hop sees its
    /// upstream vanish while it still has a caller.
    pub async fn stop(mut self) {
        for p in self.procs.iter_mut().rev() {
            p.stop(GRACE).await;
        }
        if let Some(ca) = self.ca.as_mut() {
            ca.stop(GRACE).await;
        }
    }

    fn keep(&mut self, p: Proc) -> anyhow::Result<()> {
        let pid = p
            .pid()
            .with_context(|| format!("{} exited at start", p.name))?;
        self.sidecars.push(Sidecar {
            name: p.name.clone(),
            pid,
            slug: slug(&p.name),
        });
        self.procs.push(p);
        Ok(())
    }

    /// A client-side sidecar whose explicit upstream port leads to `endpoint`.
    async fn tern_outbound(
        &mut self,
        name: &str,
        endpoint: SocketAddr,
        extra: &[String],
    ) -> anyhow::Result<SocketAddr> {
        let mut args = common_tern_args();
        args.extend_from_slice(extra);
        args.extend([
            "--upstream".into(),
            "pay=127.0.0.1:0".into(),
            "--endpoints".into(),
            format!("pay={endpoint}"),
        ]);
        let (p, line) = self.start_tern(name, &args).await?;
        self.keep(p)?;
        ready_addr(&line, "upstream")
    }

    /// A server-side sidecar whose inbound listener forwards to `app`.
    async fn tern_inbound(
        &mut self,
        name: &str,
        app: SocketAddr,
        extra: &[String],
    ) -> anyhow::Result<SocketAddr> {
        let mut args = common_tern_args();
        args.extend_from_slice(extra);
        args.extend([
            "--inbound-listen".into(),
            "127.0.0.1:0".into(),
            "--inbound-app".into(),
            app.to_string(),
            "--service-name".into(),
            "pay".into(),
        ]);
        let (p, line) = self.start_tern(name, &args).await?;
        self.keep(p)?;
        ready_addr(&line, "inbound")
    }

    async fn haproxy(
        &mut self,
        name: &str,
        bin: &Path,
        dir: &Path,
        hop: usize,
        upstream: SocketAddr,
    ) -> anyhow::Result<SocketAddr> {
        let listen = SocketAddr::from(([127, 0, 0, 1], procs::free_port()?));
        let cfg = dir.join(format!("hop{hop}.cfg"));
        std::fs::write(&cfg, haproxy_config(listen, upstream))
            .with_context(|| format!("writing {}", cfg.display()))?;
        let cfg_arg = cfg.display().to_string();
        // haproxy's complaints go to stderr, which a running child does not
        // keep; a check run first turns a bad config into a readable error.
        let check = tokio::process::Command::new(bin)
            .args(["-c", "-f", &cfg_arg])
            .output()
            .await
            .with_context(|| format!("running {} -c", bin.display()))?;
        if !check.status.success() {
            bail!(
                "haproxy rejected its config {}: {}",
                cfg.display(),
                String::from_utf8_lossy(&check.stderr).trim()
            );
        }
        let mut p = self.spawn(name, bin, &["-db".into(), "-f".into(), cfg_arg])?;
        wait_listening(&mut p, listen, self.ready_timeout()).await?;
        self.keep(p)?;
        Ok(listen)
    }
}

/// tern-control with its CA in `dir` and an empty mesh config; returns it
/// with its gRPC address.
async fn start_ca(dir: &Path) -> anyhow::Result<(Proc, SocketAddr)> {
    let config = dir.join("mesh");
    std::fs::create_dir_all(&config).with_context(|| format!("creating {}", config.display()))?;
    let args: Vec<String> = vec![
        "--config-dir".into(),
        config.display().to_string(),
        "--state-dir".into(),
        dir.join("state").display().to_string(),
        "--grpc-listen".into(),
        "127.0.0.1:0".into(),
        "--admin-listen".into(),
        "127.0.0.1:0".into(),
        "--worker-threads".into(),
        "1".into(),
        "--log".into(),
        "warn".into(),
    ];
    let mut p = Proc::spawn("tern-control", "tern-control", &args)?;
    let line = p
        .wait_for_line("tern-control ready:", READY_TIMEOUT)
        .await?;
    let grpc = ready_addr(&line, "grpc")?;
    Ok((p, grpc))
}

/// The flags giving a sidecar the identity of service account `sa`, with a
/// token minted from the CA's key.
fn identity_args(dir: &Path, grpc: SocketAddr, sa: &str) -> anyhow::Result<Vec<String>> {
    let state = dir.join("state");
    let token = dir.join(format!("{sa}.token"));
    std::fs::write(&token, crate::token::mint(&state, "default", sa)?)
        .with_context(|| format!("writing {}", token.display()))?;
    Ok(vec![
        "--identity-server".into(),
        format!("https://{grpc}"),
        "--identity-trust-anchors".into(),
        state.join("trust-anchor.pem").display().to_string(),
        "--identity-token-file".into(),
        token.display().to_string(),
        "--service-account".into(),
        sa.into(),
    ])
}

/// Starts `pay` on a free port; returns it with its address.
pub async fn start_pay() -> anyhow::Result<(Proc, SocketAddr)> {
    let args: Vec<String> = ["--listen", "127.0.0.1:0", "--replica", "bench"]
        .map(String::from)
        .into();
    let mut p = Proc::spawn("pay", "pay", &args)?;
    let line = p.wait_for_line("pay listening on ", READY_TIMEOUT).await?;
    let addr = line
        .split_whitespace()
        .nth(3)
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("pay printed an unexpected line: {line:?}"))?;
    Ok((p, addr))
}

/// The haproxy binary: on PATH, or where Debian installs it (not on a
/// non-root user's PATH).
pub fn find_haproxy() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|d| d.join("haproxy"))
        .find(|p| p.is_file())
}

/// `--trace-collector` and `--trace-sample-rate` for every tern-proxy, when the bench
/// measures with tracing on; set once before any path starts.
static TRACE_ARGS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();

pub fn set_trace(collector: SocketAddr, rate: f64) {
    let _ = TRACE_ARGS.set(vec![
        "--trace-collector".into(),
        collector.to_string(),
        "--trace-sample-rate".into(),
        rate.to_string(),
    ]);
}

fn common_tern_args() -> Vec<String> {
    let mut args = base_tern_args();
    args.extend(TRACE_ARGS.get().into_iter().flatten().cloned());
    args
}

fn base_tern_args() -> Vec<String> {
    [
        "--outbound-listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--access-log",
        "off",
        "--worker-threads",
        "1",
        "--drain-grace",
        "1s",
        "--log",
        "warn",
    ]
    .map(String::from)
    .into()
}

impl Topology {
    async fn start_tern(&self, name: &str, args: &[String]) -> anyhow::Result<(Proc, String)> {
        let bin = procs::sibling("tern-proxy")?;
        let mut p = self.spawn(name, &bin, args)?;
        let line = p
            .wait_for_line("tern-proxy ready:", self.ready_timeout())
            .await?;
        Ok((p, line))
    }

    fn spawn(&self, name: &str, program: &Path, args: &[String]) -> anyhow::Result<Proc> {
        match &self.callgrind {
            Some(cg) => {
                let (valgrind, args) = cg.wrap(&slug(name), program, args);
                Proc::spawn_program(name, &valgrind, &args)
            }
            None => Proc::spawn_program(name, program, args),
        }
    }

    fn ready_timeout(&self) -> Duration {
        if self.callgrind.is_some() {
            READY_TIMEOUT_CALLGRIND
        } else {
            READY_TIMEOUT
        }
    }
}

/// `tern-proxy (outbound)` → `tern-proxy-outbound`.
fn slug(name: &str) -> String {
    let mut s = String::new();
    for c in name.chars() {
        if c.is_ascii_alphanumeric() {
            s.push(c);
        } else if !s.ends_with('-') {
            s.push('-');
        }
    }
    s.trim_matches('-').to_string()
}

/// `key=ADDR` from `tern-proxy ready: outbound=… upstream=… inbound=… admin=…`.
fn ready_addr(line: &str, key: &str) -> anyhow::Result<SocketAddr> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, a)| a.parse().ok())
        .with_context(|| format!("no {key}=ADDR in tern-proxy's ready line {line:?}"))
}

/// HTTP/2 without TLS on both sides, one thread, connections to the server
/// reused across requests: the same shape as a Tern hop.
fn haproxy_config(listen: SocketAddr, upstream: SocketAddr) -> String {
    format!(
        "global
    nbthread 1
    maxconn 4096
    tune.h2.max-concurrent-streams 1000

defaults
    mode http
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    http-reuse always

frontend bench
    bind {listen} proto h2
    default_backend app

backend app
    server app {upstream} proto h2
"
    )
}

/// haproxy prints nothing when ready: wait until its port accepts.
async fn wait_listening(p: &mut Proc, addr: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        if let Ok(Some(status)) = p.child.try_wait() {
            bail!("{} exited at start ({status})", p.name);
        }
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if start.elapsed() > timeout {
            bail!("{} did not listen on {addr} within {timeout:?}", p.name);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_addresses_from_the_ready_line() {
        let line = "tern-proxy ready: outbound=127.0.0.1:4140 upstream=127.0.0.1:39001 \
                    inbound=127.0.0.1:39002 admin=127.0.0.1:4191";
        assert_eq!(
            ready_addr(line, "upstream").ok(),
            Some(SocketAddr::from(([127, 0, 0, 1], 39001)))
        );
        assert_eq!(
            ready_addr(line, "inbound").ok(),
            Some(SocketAddr::from(([127, 0, 0, 1], 39002)))
        );
        assert!(ready_addr("tern-proxy ready: admin=x", "admin").is_err());
    }

    #[test]
    fn slugs_are_file_names() {
        assert_eq!(slug("tern-proxy (outbound)"), "tern-proxy-outbound");
        assert_eq!(slug("haproxy (client side)"), "haproxy-client-side");
    }
}
