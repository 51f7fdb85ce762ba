//! `ternctl demo`: the meshed order → pay chain on loopback, without root.
//!
//! tern-control, two pay replicas and one order app, each app behind its own
//! tern-proxy; order dials its sidecar's pay port exactly as it would dial
//! pay, and the sidecar balances every call across the pay replicas that
//! registered with tern-control. loadgen calls order through order's
//! sidecar. A live line per second; with `--duration` a JSON summary is the
//! last line and the exit code says whether the chain worked. Scenario
//! switches show the mesh at work: `--faults` makes pay-1 fail 30% of its
//! calls, `--kill` kills pay-1 (app and sidecar) mid-run and restarts it,
//! `--canary` adds a pay v2 replica and pushes a 90/10 split midway. The
//! dashboard (`ternctl dashboard`) runs inside the demo on a loopback port it
//! prints.

mod mesh;
mod trace;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use nix::sys::signal::Signal;
use serde_json::{json, Value};

use crate::procs::Proc;
use mesh::Mesh;

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Run this long (e.g. 20 or 1m), then print a JSON summary and exit: 0 only if every
    /// call succeeded and both pay replicas served. Without it the demo runs until Ctrl-C.
    #[arg(long, value_parser = humantime_or_secs)]
    duration: Option<Duration>,
    /// Calls per second loadgen sends to order.
    #[arg(long, default_value_t = 50)]
    rate: u32,
    /// pay-1 answers 30% of its calls with UNAVAILABLE; the mesh retries them on pay-2.
    #[arg(long)]
    faults: bool,
    /// Kill pay-1 (app and sidecar, SIGKILL) a third into the run and restart it 2 s later.
    #[arg(long)]
    kill: bool,
    /// Start a pay v2 replica that takes no traffic, then push a 90/10 split halfway through.
    #[arg(long)]
    canary: bool,
    /// Export spans from every sidecar to a receiver ternctl runs, sample some of loadgen's
    /// calls at order's sidecar, and print one call's trace as a tree at the end.
    #[arg(long)]
    trace: bool,
    /// Directory for access logs (default: a fresh directory under the system temp dir).
    #[arg(long)]
    log_dir: Option<PathBuf>,
    /// Lifetime of the workload certificates tern-control issues (e.g. 2m, to watch sidecars
    /// renew them).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "24h")]
    pub cert_lifetime: Duration,
}

/// `10` means ten seconds; `1m`, `500ms` are read as durations.
fn humantime_or_secs(s: &str) -> Result<Duration, String> {
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}"))
}

pub async fn run(args: DemoArgs) -> anyhow::Result<i32> {
    crate::procs::build_siblings().await?;
    let log_dir = match &args.log_dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("tern-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
    let sink = match args.trace {
        true => {
            let sink = crate::trace_sink::TraceSink::start(true).context("the trace receiver")?;
            mesh::set_trace(sink.addr);
            Some(sink)
        }
        false => None,
    };
    let mut mesh = mesh::start(&args, &log_dir).await?;
    let dashboard = crate::dashboard::start(
        &mesh.control_admin,
        std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        false,
        Duration::from_secs(2),
    )
    .await?;

    println!("Tern demo: loadgen → order-proxy → order → order-proxy → {{pay-1-proxy → pay-1, pay-2-proxy → pay-2}}");
    println!(
        "  tern-control  state: http://{}/state   mesh config: {}",
        mesh.control_admin,
        mesh.config_dir.display()
    );
    println!(
        "  dashboard     http://{dashboard}/   (ternctl check / stat --control {})",
        mesh.control_admin
    );
    for (sc, admin) in &mesh.sidecars {
        println!(
            "  {:<12} metrics: http://{admin}/metrics   config: http://{admin}/config",
            sc.name
        );
    }
    println!("  access logs: {}", log_dir.display());
    println!(
        "  identities: order = {}, pay = {} (certificates from tern-control's CA, trust anchor {})",
        mesh::ORDER_ID,
        mesh::PAY_ID,
        mesh.identities.anchors.display()
    );
    if args.faults {
        println!("  scenario: pay-1 fails 30% of calls with UNAVAILABLE");
    }
    if args.kill {
        println!("  scenario: pay-1 (app and sidecar) is killed a third into the run and restarted 2 s later");
    }
    if args.canary {
        println!("  scenario: pay-v2 (version: v2) starts with 0% of calls; a 90/10 split is pushed halfway");
    }
    println!();

    let duration = args
        .duration
        .unwrap_or(Duration::from_secs(365 * 24 * 3600));
    let mut loadgen = Proc::spawn(
        "loadgen",
        "loadgen",
        &[
            "--target".into(),
            mesh.order_inbound.clone(),
            "--rate".into(),
            args.rate.to_string(),
            "--duration".into(),
            format!("{}ms", duration.as_millis().max(1000)),
            "--progress-json".into(),
        ],
    )?;
    let order_admin = mesh.sidecars[0].1.clone();
    let kill_at = args
        .kill
        .then(|| duration.mul_f64(1.0 / 3.0).min(Duration::from_secs(20)));
    let canary_at = args
        .canary
        .then(|| duration.mul_f64(0.5).min(Duration::from_secs(30)));
    let summary = follow(
        &mut loadgen,
        &mut mesh,
        &order_admin,
        &log_dir,
        kill_at,
        canary_at,
    )
    .await;
    let retries = scrape_sum(&order_admin, "tern_retries_total").await;
    let hop = Hop::read(&log_dir);

    for (sc, _) in &mut mesh.sidecars {
        sc.stop(Duration::from_secs(6)).await;
    }
    for app in &mut mesh.apps {
        app.stop(Duration::from_secs(3)).await;
    }
    mesh.control.stop(Duration::from_secs(3)).await;
    if let Some(sink) = &sink {
        let kept = sink.kept();
        println!(
            "{}",
            trace::render(&kept).unwrap_or_else(|| trace::nothing(sink.spans()))
        );
    }
    let summary = summary?;
    let mut out = demo_summary(&summary);
    out["retries"] = json!(retries);
    out["mtls"] = json!({
        "order_to_pay": hop.tls,
        "order_sees": hop.order_sees,
        "pay_sees": hop.pay_sees,
    });
    out["scenarios"] = json!({"faults": args.faults, "kill": args.kill, "canary": args.canary});
    let mut must_serve = vec!["pay-1", "pay-2"];
    if args.canary {
        must_serve.push("pay-v2");
    }
    let ok = out["failed"].as_u64() == Some(0)
        && hop.is_mutual()
        && out["calls"].as_u64().unwrap_or(0) > 0
        && must_serve
            .iter()
            .all(|r| out["by_replica"][r].as_u64().unwrap_or(0) > 0);
    println!("{out}");
    Ok(if ok { 0 } else { 1 })
}

/// Prints loadgen's progress as the live view until its summary line arrives,
/// running the kill scenario on the way. Ctrl-C stops loadgen early; it still
/// prints its summary.
async fn follow(
    loadgen: &mut Proc,
    mesh: &mut Mesh,
    order_admin: &str,
    log_dir: &Path,
    kill_at: Option<Duration>,
    canary_at: Option<Duration>,
) -> anyhow::Result<Value> {
    let mut ctrl_c = Box::pin(tokio::signal::ctrl_c());
    let mut interrupted = false;
    let started = tokio::time::Instant::now();
    let kill = async {
        match kill_at {
            Some(at) => tokio::time::sleep_until(started + at).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(kill);
    let canary = async {
        match canary_at {
            Some(at) => tokio::time::sleep_until(started + at).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(canary);
    let mut canary_pushed = false;
    let mut killed = false;
    let mut restart_at = None;
    loop {
        let restart = async {
            match restart_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let lines = loadgen.stdout.as_mut().context("loadgen stdout")?;
        let line = tokio::select! {
            l = lines.next_line() => l?,
            _ = &mut ctrl_c, if !interrupted => {
                interrupted = true;
                loadgen.signal(Signal::SIGINT);
                continue;
            }
            _ = &mut kill, if !killed => {
                killed = true;
                // pay-1 is sidecars[1] and apps[0]: the whole "pod" goes at once.
                mesh.sidecars[1].0.kill();
                mesh.apps[0].kill();
                println!(">>> killed pay-1 and its sidecar (SIGKILL)");
                restart_at = Some(tokio::time::Instant::now() + Duration::from_secs(2));
                continue;
            }
            _ = &mut canary, if !canary_pushed => {
                canary_pushed = true;
                mesh::write_atomically(&mesh.config_dir.join("pay-traffic.yaml"), &mesh::pay_policy(Some(10)))?;
                println!(">>> pushed a 90/10 split: 10% of Pay calls to version v2");
                continue;
            }
            _ = restart => {
                restart_at = None;
                mesh.apps[0].restart().await?;
                mesh.sidecars[1].0.restart().await?;
                println!(">>> restarted pay-1 and its sidecar");
                continue;
            }
        };
        let Some(line) = line else {
            anyhow::bail!("loadgen ended without a summary");
        };
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        match v["type"].as_str() {
            Some("progress") => {
                let retries = scrape_sum(order_admin, "tern_retries_total").await;
                let version = scrape_sum(order_admin, "tern_config_version").await;
                let hop = Hop::read(log_dir);
                println!(
                    "{}  retries={retries}  config=v{version}  {}",
                    live_line(&v),
                    hop.live()
                );
            }
            Some("summary") => return Ok(v),
            _ => {}
        }
    }
}

fn live_line(v: &Value) -> String {
    let ok = v["ok"].as_u64().unwrap_or(0);
    // Calls still in flight are neither success nor failure yet.
    let done = ok + v["failed"].as_u64().unwrap_or(0);
    let success = if done == 0 {
        100.0
    } else {
        ok as f64 * 100.0 / done as f64
    };
    let replicas: Vec<String> = v["by_replica"]
        .as_object()
        .map(|m| m.iter().map(|(k, n)| format!("{k}={n}")).collect())
        .unwrap_or_default();
    format!(
        "t={:>4}s  rate={:>6.1}/s  success={:>6.2}%  p50={:>6.2}ms  p99={:>6.2}ms  calls={}  [{}]",
        v["elapsed_s"].as_f64().unwrap_or(0.0).round(),
        v["rate"].as_f64().unwrap_or(0.0),
        success,
        v["p50_ms"].as_f64().unwrap_or(0.0),
        v["p99_ms"].as_f64().unwrap_or(0.0),
        done,
        replicas.join(" "),
    )
}

/// Sum of every sample of `metric` on a sidecar's admin port (0 when unreachable).
async fn scrape_sum(admin: &str, metric: &str) -> u64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(admin).await.ok()?;
        let req = format!("GET /metrics HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).await.ok()?;
        Some(text)
    };
    let Ok(Some(text)) = tokio::time::timeout(Duration::from_millis(500), fetch).await else {
        return 0;
    };
    text.lines()
        .filter(|l| l.starts_with(metric) && l[metric.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// The demo's summary keys: `calls`, `ok`, `failed`, `by_replica`, `p50_ms`, `p99_ms` (stable);
/// more may be added, none renamed.
fn demo_summary(s: &Value) -> Value {
    let by_replica: BTreeMap<String, u64> = s["by_replica"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default();
    json!({
        "calls": s["sent"],
        "ok": s["ok"],
        "failed": s["failed"],
        "by_replica": by_replica,
        "p50_ms": s["p50_ms"],
        "p90_ms": s["p90_ms"],
        "p99_ms": s["p99_ms"],
        "max_ms": s["max_ms"],
        "errors": s["errors"],
        "duration_s": s["duration_s"],
    })
}

/// What the last logged order→pay call shows of its hop: the TLS version and
/// the identity each side verified (from order-proxy's outbound and pay-1-proxy's
/// inbound access logs).
#[derive(Default)]
struct Hop {
    tls: Option<String>,
    order_sees: Option<String>,
    pay_sees: Option<String>,
}

impl Hop {
    fn read(log_dir: &Path) -> Self {
        let order = last_line(&log_dir.join("order-proxy.access.log"), "outbound");
        let pay = last_line(&log_dir.join("pay-1-proxy.access.log"), "inbound")
            .or_else(|| last_line(&log_dir.join("pay-2-proxy.access.log"), "inbound"));
        let text =
            |v: &Option<Value>, k: &str| v.as_ref().and_then(|v| v[k].as_str()).map(str::to_string);
        Self {
            tls: text(&order, "tls"),
            order_sees: text(&order, "peer_identity"),
            pay_sees: text(&pay, "peer_identity"),
        }
    }

    fn is_mutual(&self) -> bool {
        self.tls.as_deref() == Some("TLSv1.3")
            && self.order_sees.as_deref() == Some(mesh::PAY_ID)
            && self.pay_sees.as_deref() == Some(mesh::ORDER_ID)
    }

    fn live(&self) -> String {
        let short = |id: &Option<String>| {
            id.as_deref()
                .map(|i| i.rsplit("/ns/").next().unwrap_or(i).to_string())
                .unwrap_or_else(|| "-".into())
        };
        format!(
            "order→pay={} (order sees {}, pay sees {})",
            self.tls.as_deref().unwrap_or("plaintext"),
            short(&self.order_sees),
            short(&self.pay_sees)
        )
    }
}

/// The last JSON line of `direction` in the tail of an access log file.
fn last_line(path: &Path, direction: &str) -> Option<Value> {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let mut f = std::fs::File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(16 * 1024)))
        .ok()?;
    let mut tail = String::new();
    f.read_to_string(&mut tail).ok()?;
    tail.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["direction"] == direction)
}
