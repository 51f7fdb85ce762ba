//! Scale benchmark (not a test): many simulated sidecars against a real
//! `tern-control`, measuring how long a config file change takes to reach
//! and be acknowledged by every one of them, and the control plane's memory.
//!
//! ```text
//! cargo build --release -p tern-control
//! cargo run --release -p tern-control --example scale -- --subscribers 1000
//! ```
//!
//! Each simulated sidecar has its own connection, registers an endpoint,
//! calls `pay` plus one other service, and ACKs every snapshot as soon as it
//! arrives. Each round rewrites `pay.yaml` with a new timeout; a round ends
//! when every sidecar has ACKed the snapshot carrying it. A last change
//! touches one small service to show that only its callers are pushed to.
//!
//! Two more scenarios (`--scenario`) measure discovery at scale:
//! `endpoint-change` (a 10,000-service mesh, 1,000 sidecars using 10
//! services each: one endpoint change → every watcher's ACK, bytes pushed,
//! RSS; see `scale/endpoints.rs`) and `sidecar` (a real tern-proxy's RSS in
//! a 10,000-service mesh against a 10-service one, and the first call to a
//! service it never saw; see `scale/sidecar.rs`, which needs tern-proxy
//! built beside tern-control).
//!
//! ```text
//! cargo build --release -p tern-control -p tern-proxy
//! cargo run --release -p tern-control --example scale -- --scenario endpoint-change
//! cargo run --release -p tern-control --example scale -- --scenario sidecar
//! ```

#[path = "scale/endpoints.rs"]
mod endpoints;
#[path = "scale/sidecar.rs"]
mod sidecar;
#[path = "../tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use clap::Parser;
use support::{hello, ControlPlane, Sidecar};
use tokio::sync::{mpsc, Semaphore};

#[derive(Parser)]
#[command(about = "tern-control scale benchmark: config change → every ACK, and control-plane RSS")]
struct Args {
    /// What to measure.
    #[arg(long, value_enum, default_value_t = Scenario::ConfigChange)]
    scenario: Scenario,
    /// endpoint-change, sidecar: services in the mesh.
    #[arg(long, default_value_t = 10_000)]
    mesh_services: usize,
    /// endpoint-change: static endpoints per service.
    #[arg(long, default_value_t = 3)]
    endpoints: usize,
    /// endpoint-change, sidecar: services each sidecar (app) uses.
    #[arg(long, default_value_t = 10)]
    calls: usize,
    /// endpoint-change: the sidecars ask for complete snapshots (as before
    /// incremental ones), for comparison.
    #[arg(long)]
    complete: bool,
    /// Simulated sidecars, each on its own connection.
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    /// Services the sidecars are spread over (besides pay, which all call).
    #[arg(long, default_value_t = 50)]
    services: usize,
    /// Config changes to time.
    #[arg(long, default_value_t = 50)]
    rounds: usize,
    /// Passed to tern-control's --debounce (its default is 100ms).
    #[arg(long, default_value = "100ms")]
    debounce: String,
    /// Passed to tern-control's --worker-threads [default: its own default, one per core].
    #[arg(long)]
    worker_threads: Option<usize>,
    /// The tern-control binary [default: next to this example's directory].
    #[arg(long)]
    control_bin: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Scenario {
    /// A TrafficPolicy change pushed to every subscriber.
    ConfigChange,
    /// One endpoint change in a large mesh, to the watchers of its service.
    EndpointChange,
    /// A real sidecar's memory and first-call latency in a large mesh.
    Sidecar,
}

/// (sidecar index, pay's timeout in the snapshot, when it was ACKed)
type Acked = (usize, u64, Instant);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bin = match &args.control_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()?
            .parent()
            .and_then(Path::parent)
            .map(|d| d.join("tern-control"))
            .ok_or_else(|| anyhow!("cannot locate tern-control; pass --control-bin"))?,
    };
    if !bin.exists() {
        bail!("{} not found: run `cargo build --release -p tern-control` first, or pass --control-bin", bin.display());
    }
    match args.scenario {
        Scenario::EndpointChange => return endpoints::run(&args, &bin).await,
        Scenario::Sidecar => return sidecar::run(&args, &bin).await,
        Scenario::ConfigChange => {}
    }
    let (n, services) = (args.subscribers, args.services.max(1));
    let tmp = tempfile::tempdir()?;
    let config = tmp.path().join("mesh");
    std::fs::create_dir(&config)?;
    std::fs::write(config.join("services.yaml"), services_yaml(services))?;
    std::fs::write(config.join("pay.yaml"), pay_yaml(1000))?;
    let threads = args.worker_threads.map(|n| n.to_string());
    let mut flags = vec!["--debounce", &args.debounce, "--log", "warn"];
    if let Some(n) = &threads {
        flags.extend(["--worker-threads", n]);
    }
    let cp = ControlPlane::start(&bin, &config, tmp.path(), &flags).await?;
    let pid = cp.pid();
    println!(
        "tern-control scale benchmark: {n} subscribers (one connection each), {services} services, {} rounds, debounce {}, {} cores",
        args.rounds,
        args.debounce,
        std::thread::available_parallelism().map(|p| p.get()).unwrap_or(1)
    );
    let rss_empty = rss_kib(pid)?;

    // Connect everyone, 64 handshakes at a time.
    let started = Instant::now();
    let (acked_tx, mut acked) = mpsc::unbounded_channel::<Acked>();
    let connecting = Arc::new(Semaphore::new(64));
    for i in 0..n {
        let me = format!("svc-{}", i % services);
        let other = format!("svc-{}", (i + 1) % services);
        let h = hello(
            &me,
            &format!("127.0.0.1:{}", 20_000 + i),
            "v1",
            &["pay", &other],
        );
        let (grpc, tx, connecting) = (cp.grpc, acked_tx.clone(), Arc::clone(&connecting));
        tokio::spawn(async move {
            let permit = connecting.acquire_owned().await;
            let mut sidecar = match Sidecar::connect(grpc, h).await {
                Ok(s) => s,
                Err(e) => return eprintln!("sidecar {i}: {e:#}"),
            };
            drop(permit);
            while let Ok(snap) = sidecar.next(Duration::from_secs(3600)).await {
                if sidecar.ack(snap.version).await.is_err() {
                    break;
                }
                let _ = tx.send((i, pay_timeout(&snap), Instant::now()));
            }
        });
    }
    drop(acked_tx);
    collect(&mut acked, n, 1000, started, Duration::from_secs(120)).await?;
    let setup = started.elapsed();
    // Registrations keep waking callers of each service for a while; let it settle.
    quiet(&mut acked, Duration::from_millis(500)).await;
    let rss_idle = rss_kib(pid)?;
    let cpu_before = cpu_ms(pid)?;
    let bench_cpu_before = cpu_ms(std::process::id())?;

    let mut first = Vec::new();
    let mut spread = Vec::new();
    let mut all = Vec::new();
    let mut each = Vec::new();
    for round in 1..=args.rounds {
        let timeout = 1000 + round as u64;
        let changed = Instant::now();
        std::fs::write(config.join("pay.yaml"), pay_yaml(timeout))?;
        let r = collect(&mut acked, n, timeout, changed, Duration::from_secs(30))
            .await
            .with_context(|| format!("round {round}; control-plane log:\n{}", cp.log()))?;
        first.push(r.first);
        spread.push(r.last.saturating_sub(r.first));
        all.push(r.last);
        each.extend(r.each);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cpu_rounds = cpu_ms(pid)? - cpu_before;
    let bench_cpu_rounds = cpu_ms(std::process::id())? - bench_cpu_before;

    // A change to svc-0 alone: only the sidecars that call it are pushed to.
    let pushes_before = cp.metric("tern_control_pushes_total").await?;
    let svc0 = "apiVersion: tern.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: svc-0}\nspec: {service: svc-0, timeout: 5s}\n";
    std::fs::write(config.join("svc-0.yaml"), svc0)?;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let selective = cp.metric("tern_control_pushes_total").await? - pushes_before;
    let callers = (0..n).filter(|i| (i + 1) % services == 0).count();
    let (rss_now, rss_peak) = (rss_kib(pid)?, hwm_kib(pid)?);

    println!(
        "setup: {n} subscribers connected and served their first snapshot in {:.2} s",
        setup.as_secs_f64()
    );
    println!(
        "file change → first snapshot received:   {}",
        summary(&mut first)
    );
    println!(
        "first snapshot → last ACK (fan-out):      {}",
        summary(&mut spread)
    );
    println!(
        "file change → every subscriber ACKed:    {}",
        summary(&mut all)
    );
    println!(
        "file change → one subscriber's ACK (all {} ACKs): {}",
        each.len(),
        summary(&mut each)
    );
    println!(
        "selective change (svc-0's policy): {selective} pushes; {callers} subscribers call svc-0, {} do not",
        n - callers
    );
    println!(
        "control-plane RSS: {:.1} MiB empty, {:.1} MiB with {n} subscribers, {:.1} MiB after the rounds, peak {:.1} MiB",
        mib(rss_empty),
        mib(rss_idle),
        mib(rss_now),
        mib(rss_peak)
    );
    let rounds = args.rounds.max(1) as f64;
    println!(
        "CPU per change pushed to {n} subscribers: control plane {:.1} ms, the simulated sidecars {:.1} ms (same 2 cores)",
        cpu_rounds / rounds,
        bench_cpu_rounds / rounds
    );
    Ok(())
}

struct Round {
    first: Duration,
    last: Duration,
    each: Vec<Duration>,
}

/// Waits until all `n` sidecars ACKed a snapshot whose pay timeout is `want`.
async fn collect(
    acked: &mut mpsc::UnboundedReceiver<Acked>,
    n: usize,
    want: u64,
    since: Instant,
    limit: Duration,
) -> anyhow::Result<Round> {
    let mut seen = vec![false; n];
    let mut each = Vec::with_capacity(n);
    let deadline = tokio::time::Instant::now() + limit;
    while each.len() < n {
        let (i, timeout, at) = tokio::time::timeout_at(deadline, acked.recv())
            .await
            .map_err(|_| anyhow!("only {} of {n} sidecars ACKed within {limit:?}", each.len()))?
            .ok_or_else(|| anyhow!("every sidecar task ended"))?;
        if timeout == want && !seen[i] {
            seen[i] = true;
            each.push(at.saturating_duration_since(since));
        }
    }
    let first = each.iter().min().copied().unwrap_or_default();
    let last = each.iter().max().copied().unwrap_or_default();
    Ok(Round { first, last, each })
}

async fn quiet(acked: &mut mpsc::UnboundedReceiver<Acked>, period: Duration) {
    while let Ok(Some(_)) = tokio::time::timeout(period, acked.recv()).await {}
}

fn pay_timeout(s: &tern_proto::control::v1::Snapshot) -> u64 {
    s.services
        .iter()
        .find(|v| v.name == "pay")
        .and_then(|v| v.traffic.as_ref()?.routes.last()?.timeout_ms)
        .unwrap_or(0)
}

fn services_yaml(services: usize) -> String {
    let mut out = String::from(
        "apiVersion: tern.dev/v1alpha1\nkind: Service\nmetadata: {name: pay}\nspec: {ports: [{name: grpc, port: 50051}]}\n",
    );
    for i in 0..services {
        out.push_str(&format!(
            "---\napiVersion: tern.dev/v1alpha1\nkind: Service\nmetadata: {{name: svc-{i}}}\nspec: {{ports: [{{name: grpc, port: 50051}}]}}\n"
        ));
    }
    out
}

fn pay_yaml(timeout_ms: u64) -> String {
    format!(
        "apiVersion: tern.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: pay}}\nspec:\n  service: pay\n  timeout: {timeout_ms}ms\n  retries: {{maxAttempts: 3, retryableCodes: [UNAVAILABLE], perTryTimeout: 300ms}}\n  loadBalancer: P2C_EWMA\n"
    )
}

fn summary(v: &mut [Duration]) -> String {
    v.sort();
    let p = |q: f64| {
        let idx = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len().max(1)) - 1;
        v.get(idx).map(|d| d.as_secs_f64() * 1e3).unwrap_or(0.0)
    };
    format!(
        "p50 {:7.1} ms   p99 {:7.1} ms   max {:7.1} ms",
        p(0.5),
        p(0.99),
        p(1.0)
    )
}

fn proc_status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .ok_or_else(|| anyhow!("{field} missing"))?;
    Ok(line.split_whitespace().nth(1).unwrap_or("0").parse()?)
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    proc_status_kib(pid, "VmRSS:")
}

fn hwm_kib(pid: u32) -> anyhow::Result<u64> {
    proc_status_kib(pid, "VmHWM:")
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// User + system CPU time of `pid`, in milliseconds.
fn cpu_ms(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields.get(11).unwrap_or(&"0").parse::<f64>()?
        + fields.get(12).unwrap_or(&"0").parse::<f64>()?;
    let hz = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse::<f64>()
                .ok()
        })
        .unwrap_or(100.0);
    Ok(ticks * 1000.0 / hz)
}
