//! `ternctl demo`: the meshed order → pay chain on loopback, without root.
//!
//! Two pay replicas and one order app, each behind its own tern-proxy;
//! order dials its sidecar's pay port exactly as it would dial pay, and the
//! sidecar balances every call across the pay sidecars. loadgen calls order
//! through order's sidecar. A live line per second; with `--duration` a JSON
//! summary is the last line and the exit code says whether the chain worked.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::{json, Value};

use crate::procs::{free_port, Proc};

const START_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Run this long, then print a JSON summary and exit (0 only if every call succeeded
    /// and both pay replicas served). Without it the demo runs until Ctrl-C.
    #[arg(long, value_parser = humantime_or_secs)]
    duration: Option<Duration>,
    /// Calls per second loadgen sends to order.
    #[arg(long, default_value_t = 50)]
    rate: u32,
    /// Directory for access logs (default: a fresh directory under the system temp dir).
    #[arg(long)]
    log_dir: Option<PathBuf>,
}

/// `10` means ten seconds; `1m`, `500ms` are read as durations.
fn humantime_or_secs(s: &str) -> Result<Duration, String> {
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}"))
}

struct Sidecar {
    proc: Proc,
    admin: String,
}

fn addr(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

async fn start_sidecar(
    name: &str,
    log_dir: &std::path::Path,
    args: Vec<String>,
) -> anyhow::Result<Sidecar> {
    let admin = addr(free_port()?);
    let mut all = vec![
        "--admin-listen".to_string(),
        admin.clone(),
        "--outbound-listen".into(),
        addr(free_port()?),
        "--access-log".into(),
        log_dir
            .join(format!("{name}.access.log"))
            .display()
            .to_string(),
        "--drain-grace".into(),
        "5s".into(),
    ];
    all.extend(args);
    let mut proc = Proc::spawn(name, "tern-proxy", &all)?;
    proc.wait_for_line("tern-proxy ready", START_TIMEOUT)
        .await?;
    Ok(Sidecar { proc, admin })
}

async fn start_pay(replica: &str) -> anyhow::Result<(Proc, String)> {
    let app = addr(free_port()?);
    let mut p = Proc::spawn(
        replica,
        "pay",
        &[
            "--listen".into(),
            app.clone(),
            "--replica".into(),
            replica.into(),
            "--version".into(),
            "v1".into(),
        ],
    )?;
    p.wait_for_line("pay listening", START_TIMEOUT).await?;
    Ok((p, app))
}

pub async fn run(args: DemoArgs) -> anyhow::Result<i32> {
    let log_dir = match &args.log_dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("tern-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&log_dir).with_context(|| format!("creating {}", log_dir.display()))?;

    // pay replicas, each behind a sidecar whose inbound port is the pay endpoint.
    let mut procs = Vec::new();
    let mut sidecars = Vec::new();
    let mut pay_endpoints = Vec::new();
    for replica in ["pay-1", "pay-2"] {
        let (pay, app) = start_pay(replica).await?;
        procs.push(pay);
        let inbound = addr(free_port()?);
        let sc = start_sidecar(
            &format!("{replica}-proxy"),
            &log_dir,
            vec![
                "--service-name".into(),
                "pay".into(),
                "--inbound-listen".into(),
                inbound.clone(),
                "--inbound-app".into(),
                app,
            ],
        )
        .await?;
        pay_endpoints.push(inbound);
        sidecars.push(sc);
    }

    // order, dialling pay at its sidecar's explicit pay port.
    let pay_port = free_port()?;
    let order_app = addr(free_port()?);
    let mut order = Proc::spawn(
        "order",
        "order",
        &[
            "--listen".into(),
            order_app.clone(),
            "--pay-host".into(),
            "127.0.0.1".into(),
            "--pay-port".into(),
            pay_port.to_string(),
        ],
    )?;
    order
        .wait_for_line("order listening", START_TIMEOUT)
        .await?;
    procs.push(order);
    let order_inbound = addr(free_port()?);
    let order_sc = start_sidecar(
        "order-proxy",
        &log_dir,
        vec![
            "--service-name".into(),
            "order".into(),
            "--inbound-listen".into(),
            order_inbound.clone(),
            "--inbound-app".into(),
            order_app,
            "--upstream".into(),
            format!("pay={}", addr(pay_port)),
            "--endpoints".into(),
            format!("pay={}", pay_endpoints.join(",")),
        ],
    )
    .await?;
    sidecars.insert(0, order_sc);

    println!("Tern demo: loadgen → order-proxy → order → order-proxy → {{pay-1-proxy → pay-1, pay-2-proxy → pay-2}}");
    for (sc, name) in sidecars
        .iter()
        .zip(["order-proxy", "pay-1-proxy", "pay-2-proxy"])
    {
        println!(
            "  {name:<12} metrics: http://{}/metrics   config: http://{}/config",
            sc.admin, sc.admin
        );
    }
    println!("  access logs: {}", log_dir.display());
    println!();

    let duration = args
        .duration
        .unwrap_or(Duration::from_secs(365 * 24 * 3600));
    let mut loadgen = Proc::spawn(
        "loadgen",
        "loadgen",
        &[
            "--target".into(),
            order_inbound,
            "--rate".into(),
            args.rate.to_string(),
            "--duration".into(),
            format!("{}s", duration.as_secs().max(1)),
            "--progress-json".into(),
        ],
    )?;

    let summary = follow(&mut loadgen).await;
    for sc in &mut sidecars {
        sc.proc.stop(Duration::from_secs(6)).await;
    }
    for p in &mut procs {
        p.stop(Duration::from_secs(3)).await;
    }
    let summary = summary?;
    let out = demo_summary(&summary);
    let ok = out["failed"].as_u64() == Some(0)
        && out["calls"].as_u64().unwrap_or(0) > 0
        && ["pay-1", "pay-2"]
            .iter()
            .all(|r| out["by_replica"][r].as_u64().unwrap_or(0) > 0);
    println!("{out}");
    Ok(if ok { 0 } else { 1 })
}

/// Prints loadgen's progress as the live view until its summary line arrives.
/// Ctrl-C stops loadgen early; it still prints its summary.
async fn follow(loadgen: &mut Proc) -> anyhow::Result<Value> {
    let mut ctrl_c = Box::pin(tokio::signal::ctrl_c());
    let mut interrupted = false;
    let lines = loadgen.stdout.as_mut().context("loadgen stdout")?;
    loop {
        let line = tokio::select! {
            l = lines.next_line() => l?,
            _ = &mut ctrl_c, if !interrupted => {
                interrupted = true;
                if let Some(pid) = loadgen.child.id().and_then(|p| i32::try_from(p).ok()) {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGINT);
                }
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
            Some("progress") => println!("{}", live_line(&v)),
            Some("summary") => return Ok(v),
            _ => {}
        }
    }
}

fn live_line(v: &Value) -> String {
    let sent = v["sent"].as_u64().unwrap_or(0);
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
        sent,
        replicas.join(" "),
    )
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
