//! `--scenario sidecar`: one real tern-proxy subscribed to a tern-control
//! holding a mesh of `--mesh-services` services (3 endpoints each), its app
//! calling `--calls` of them by name (HTTP/1, `Host: svc-k`) through the
//! sidecar's outbound port; the same again with a mesh of `--calls`
//! services. Reports the sidecar's RSS in both, and what the first call to a
//! service the sidecar has never seen (one on-demand lookup) costs over a
//! call to a known one.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use tern_test_support::Proc;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use super::support::ControlPlane;
use super::{mib, rss_kib, Args};

/// Calls per service after the first.
const LATER_CALLS: usize = 50;

pub async fn run(args: &Args, control_bin: &Path) -> anyhow::Result<()> {
    let proxy_bin = control_bin.with_file_name("tern-proxy");
    if !proxy_bin.exists() {
        bail!("{} not found: build tern-proxy too", proxy_bin.display());
    }
    // One port per called service: an address is an endpoint of one service only.
    let mut apps = Vec::with_capacity(args.calls);
    for _ in 0..args.calls {
        apps.push(responder().await?);
    }
    let small = measure(control_bin, &proxy_bin, args.calls, args, &apps).await?;
    let large = measure(control_bin, &proxy_bin, args.mesh_services, args, &apps).await?;
    for m in [&small, &large] {
        println!(
            "mesh of {:>6} services × 3 endpoints, app calls {}: sidecar RSS {:.1} MiB; first call to a new service p50 {:.2} ms (its lookup held it {:.2} ms on average), later calls p50 {:.2} ms",
            m.services,
            args.calls,
            mib(m.rss_kib),
            m.first_ms,
            m.held_ms,
            m.later_ms,
        );
    }
    println!(
        "sidecar RSS difference: {:.2} MiB",
        mib(large.rss_kib) - mib(small.rss_kib)
    );
    Ok(())
}

struct Measured {
    services: usize,
    rss_kib: u64,
    first_ms: f64,
    later_ms: f64,
    /// Mean wait of a found lookup, from the sidecar's own histogram.
    held_ms: f64,
}

async fn measure(
    control_bin: &Path,
    proxy_bin: &Path,
    services: usize,
    args: &Args,
    apps: &[SocketAddr],
) -> anyhow::Result<Measured> {
    let tmp = tempfile::tempdir()?;
    let config = tmp.path().join("mesh");
    std::fs::create_dir(&config)?;
    std::fs::write(config.join("services.yaml"), mesh_yaml(services, apps))?;
    let cp = ControlPlane::start(control_bin, &config, tmp.path(), &["--log", "warn"]).await?;
    let proxy_args: Vec<String> = [
        "--service-name",
        "app",
        "--control-plane",
        &format!("http://{}", cp.grpc),
        "--outbound-listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--access-log",
        "off",
        "--log",
        "warn",
    ]
    .map(String::from)
    .to_vec();
    let mut proxy = Proc::spawn(tmp.path(), "proxy", proxy_bin, &proxy_args)?;
    let ready = proxy
        .wait_for_line("tern-proxy ready: ", Duration::from_secs(30))
        .await?;
    let outbound: SocketAddr = ready
        .split_whitespace()
        .find_map(|f| f.strip_prefix("outbound="))
        .ok_or_else(|| anyhow!("no outbound= in {ready:?}"))?
        .parse()?;
    let (mut first, mut later) = (Vec::new(), Vec::new());
    for k in 1..=args.calls {
        let host = format!("svc-{k}");
        let t = Instant::now();
        get(outbound, &host)
            .await
            .with_context(|| format!("first call to {host}"))?;
        first.push(t.elapsed());
        for _ in 0..LATER_CALLS {
            let t = Instant::now();
            get(outbound, &host).await?;
            later.push(t.elapsed());
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss = rss_kib(proxy.pid())?;
    let admin: SocketAddr = ready
        .split_whitespace()
        .find_map(|f| f.strip_prefix("admin="))
        .ok_or_else(|| anyhow!("no admin= in {ready:?}"))?
        .parse()?;
    let metrics = http_get(admin, "/metrics").await?;
    let sample = |name: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(name) && l.contains("result=\"found\""))
            .and_then(|l| l.split_whitespace().last()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let held = sample("tern_lookup_duration_seconds_sum") * 1e3
        / sample("tern_lookup_duration_seconds_count").max(1.0);
    let p50 = |v: &mut Vec<Duration>| {
        v.sort();
        v.get(v.len() / 2)
            .map(|d| d.as_secs_f64() * 1e3)
            .unwrap_or(0.0)
    };
    Ok(Measured {
        services,
        rss_kib: rss,
        first_ms: p50(&mut first),
        later_ms: p50(&mut later),
        held_ms: held,
    })
}

/// The body of `GET path` from `addr` (HTTP/1.1, connection: close).
async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut c = TcpStream::connect(addr).await?;
    let req = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
    c.write_all(req.as_bytes()).await?;
    let mut rsp = Vec::new();
    c.read_to_end(&mut rsp).await?;
    Ok(String::from_utf8_lossy(&rsp).into_owned())
}

/// One `GET /` with `Host: host` on a new connection; fails unless 200.
async fn get(proxy: SocketAddr, host: &str) -> anyhow::Result<()> {
    let mut c = TcpStream::connect(proxy).await?;
    c.set_nodelay(true)?;
    let req = format!("GET / HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n");
    c.write_all(req.as_bytes()).await?;
    let mut rsp = Vec::new();
    c.read_to_end(&mut rsp).await?;
    let head = String::from_utf8_lossy(&rsp);
    if !head.starts_with("HTTP/1.1 200") {
        bail!("{host}: {}", head.lines().next().unwrap_or("no response"));
    }
    Ok(())
}

/// The app the called services' endpoints point at: 200 to every request.
async fn responder() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("0.0.0.0:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let mut seen = Vec::new();
                while let Ok(n) = c.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buf[..n]);
                    while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        seen.drain(..end + 4);
                        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if c.write_all(ok).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    Ok(SocketAddr::from(([127, 0, 0, 1], port)))
}

/// `services` services with 3 endpoints each; the called ones (svc-1 ..,
/// one per app) have theirs on the loopback responders, the rest on
/// addresses never dialed.
fn mesh_yaml(services: usize, apps: &[SocketAddr]) -> String {
    let called = apps.len();
    let mut out = super::endpoints::mesh_yaml(services.saturating_sub(called).max(1), 3)
        .replace("name: svc-", "name: other-")
        .replace("service: svc-", "service: other-");
    for (k, app) in (1..=called).zip(apps) {
        let eps: Vec<String> = (1..=3)
            .map(|h| format!("{{address: \"127.0.0.{h}:{}\"}}", app.port()))
            .collect();
        out.push_str(&format!(
            "---\napiVersion: tern.dev/v1alpha1\nkind: Service\nmetadata: {{name: svc-{k}}}\nspec: {{ports: [{{name: http, port: 8080}}]}}\n---\napiVersion: tern.dev/v1alpha1\nkind: Endpoints\nmetadata: {{name: svc-{k}}}\nspec: {{service: svc-{k}, endpoints: [{}]}}\n",
            eps.join(", ")
        ));
    }
    out
}
