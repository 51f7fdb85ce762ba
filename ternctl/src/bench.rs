//! `ternctl bench`: the same gRPC unary workload direct, through one
//! tern-proxy, through two, and through haproxy in the same shapes, in one run.
//!
//! Per path: the most requests/s at a fixed number of calls in flight, latency
//! at a fixed moderate rate, latency with one call in flight (what a sidecar
//! adds to a quiet request), and each proxy's peak RSS and CPU per request.
//! The load generator runs in this process on a one-thread runtime of its own,
//! so it takes at most one core from pay and the proxies. Beside it: h2load's
//! figures when it is installed, instructions and allocations per request
//! under callgrind when valgrind is, and memory per open connection.
//! docs/PERFORMANCE.md states the method and the targets.

mod callgrind;
mod conns;
mod cpu;
mod h2load;
mod load;
mod paths;
mod report;
mod targets;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use serde::Serialize;

use crate::procs;
use cpu::Snapshot;
use load::Phase;
use paths::{PathKind, Topology};

/// Calls at full concurrency before measuring: connections, windows and
/// allocator pools settle.
const WARMUP: Duration = Duration::from_secs(1);

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// How long each measured phase runs (e.g. 5, 5s, 1500ms).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    duration: Duration,
    /// Calls in flight in the throughput phase, all on one HTTP/2 connection.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    concurrency: u32,
    /// Calls per second in the latency phase (open loop).
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    rate: u32,
    /// Measure only these paths (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', value_name = "PATHS")]
    only: Vec<PathKind>,
    /// Calls counted per path under callgrind (instructions and allocations
    /// per request); 0 skips it. Needs valgrind.
    #[arg(long, default_value_t = 500)]
    callgrind_calls: u64,
    /// Open client HTTP/2 connections at which each tern-proxy's memory is
    /// measured, in rising order (comma-separated); 0 skips it.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    connections: Vec<usize>,
    /// Do not drive load with h2load even when it is installed.
    #[arg(long)]
    no_h2load: bool,
    /// Print only the final JSON line.
    #[arg(long)]
    json_only: bool,
    /// Turn tracing on in every tern-proxy, exporting to an OTLP receiver ternctl runs,
    /// with this share (0–1) of the bench's calls (which carry no traceparent) sampled.
    #[arg(long, value_name = "RATE")]
    trace_sample_rate: Option<f64>,
}

/// What the run was asked to do, as the report and the JSON line show it.
#[derive(Clone, Debug, Serialize)]
pub struct Settings {
    pub duration_s: f64,
    pub warmup_s: f64,
    pub concurrency: u32,
    pub rate: u32,
    pub cpus: usize,
    pub client_threads: u32,
    pub proxy_threads: u32,
    /// The machine's 1-minute load average at the start: other work skews results.
    pub load_average: Option<f64>,
}

/// A quantity per measured phase.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct PerPhase {
    /// Closed loop at full concurrency.
    pub load: f64,
    /// Open loop at the fixed rate.
    pub rate: f64,
    /// Closed loop, one call in flight.
    pub single: f64,
}

#[derive(Debug, Serialize)]
pub struct SidecarResult {
    pub name: String,
    /// VmHWM once the path has carried one call: start-up plus one connection each way.
    pub rss_idle_bytes: u64,
    /// VmHWM after every phase.
    pub rss_peak_bytes: u64,
    pub cpu_seconds: PerPhase,
    pub cpu_us_per_req: PerPhase,
}

#[derive(Debug, Serialize)]
pub struct PathResult {
    pub path: PathKind,
    pub description: &'static str,
    pub load: Phase,
    pub rate: Phase,
    pub single: Phase,
    pub sidecars: Vec<SidecarResult>,
    /// All of the path's proxies together; absent for the direct path.
    pub cpu_us_per_req: Option<PerPhase>,
    /// Everyone's CPU per phase: is the proxy, the client or a neighbour the limit?
    pub cpu_seconds: cpu::Breakdown,
    /// The same calls driven by h2load, when installed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub h2load: Option<h2load::H2loadPhase>,
    /// Instructions and allocations per request, under callgrind.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost: Option<callgrind::PathCost>,
    /// RSS with many open connections (tern-proxy paths).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conn_memory: Option<conns::ConnMemory>,
}

/// A path that was asked for but not measured.
#[derive(Debug, Serialize)]
pub struct Skipped {
    pub path: PathKind,
    pub reason: String,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<i32> {
    crate::procs::build_siblings().await?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    // The caller's runtime has a worker per core; the load generator gets a
    // single-threaded one so it competes for one core at most.
    std::thread::Builder::new()
        .name("tern-bench".into())
        .spawn(move || {
            let result = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the load generator's runtime")
                .and_then(|rt| {
                    rt.block_on(async {
                        tokio::select! {
                            r = bench(args) => r,
                            // Dropping the run drops every child, which stops it.
                            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
                        }
                    })
                });
            let _ = tx.send(result);
        })
        .context("starting the load generator thread")?;
    rx.await.context("the load generator thread failed")?
}

async fn bench(args: BenchArgs) -> anyhow::Result<i32> {
    let kinds: Vec<PathKind> = PathKind::ALL
        .into_iter()
        .filter(|k| args.only.is_empty() || args.only.contains(k))
        .collect();
    let settings = Settings {
        duration_s: args.duration.as_secs_f64(),
        warmup_s: WARMUP.as_secs_f64(),
        concurrency: args.concurrency,
        rate: args.rate,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        client_threads: 1,
        proxy_threads: 1,
        load_average: cpu::load_average(),
    };
    let verbose = !args.json_only;
    let h2load = if args.no_h2load {
        None
    } else {
        h2load::H2load::find()?
    };
    let callgrind = if args.callgrind_calls == 0 {
        None
    } else {
        callgrind::Callgrind::find()?.map(Arc::new)
    };

    // Missing binaries fail before anything starts.
    procs::sibling("pay").context("ternctl bench needs the demo's pay server")?;
    if kinds
        .iter()
        .any(|k| matches!(k, PathKind::One | PathKind::Two | PathKind::TwoMtls))
    {
        procs::sibling("tern-proxy").context("ternctl bench needs tern-proxy")?;
    }
    if kinds.contains(&PathKind::TwoMtls) {
        procs::sibling("tern-control")
            .context("ternctl bench needs tern-control for the mTLS path's certificates")?;
    }
    let mut skipped = Vec::new();
    let haproxy = paths::find_haproxy();
    let kinds: Vec<PathKind> = kinds
        .into_iter()
        .filter(|k| {
            let missing = k.is_haproxy() && haproxy.is_none();
            if missing {
                skipped.push(Skipped {
                    path: *k,
                    reason: "haproxy is not installed (apt-get install haproxy)".into(),
                });
            }
            !missing
        })
        .collect();
    if verbose {
        let with_haproxy = kinds.iter().any(|k| k.is_haproxy());
        report::print_header(&settings, haproxy.as_deref().filter(|_| with_haproxy));
        if haproxy.is_none() && skipped.iter().any(|s| s.path.is_haproxy()) {
            println!("note: haproxy not found on PATH; skipping the haproxy paths");
        }
        match &h2load {
            Some(h) => println!(
                "  h2load ({}): -t1 -c{} -m{} for {}s per path, after the phases above",
                h.path().display(),
                h2load::CONNECTIONS,
                h2load::STREAMS,
                args.duration.as_secs().max(1)
            ),
            None if !args.no_h2load => {
                println!("note: h2load not found (apt-get install nghttp2-client); its figures are skipped")
            }
            None => {}
        }
        if callgrind.is_none() && args.callgrind_calls > 0 {
            println!("note: valgrind not found (apt-get install valgrind); no instruction counts");
        }
    }
    let levels: Vec<usize> = args
        .connections
        .iter()
        .copied()
        .filter(|&n| n > 0)
        .collect();
    let max_level = levels.iter().copied().max().unwrap_or(0);
    let fd_limit = conns::raise_fd_limit(conns::fds_needed(max_level));
    let fit = conns::max_connections(fd_limit);
    if max_level > fit && verbose {
        println!(
            "note: the open-file limit ({fd_limit}) allows {fit} client connections per proxy, \
             not {max_level}: measuring at {fit}, and the target at {max_level} by extrapolation"
        );
    }
    let mut levels: Vec<usize> = levels.into_iter().map(|n| n.min(fit)).collect();
    levels.dedup();
    let extras = Extras {
        h2load: h2load.as_ref(),
        levels: &levels,
    };

    let sink = match args.trace_sample_rate {
        Some(rate) => {
            let sink = crate::trace_sink::TraceSink::start(false).context("the trace receiver")?;
            paths::set_trace(sink.addr, rate);
            Some(sink)
        }
        None => None,
    };
    let (mut pay, pay_addr) = paths::start_pay().await?;
    let pay_pid = pay.pid().context("pay exited at start")?;
    let measured = measure_all(
        &kinds,
        (pay_addr, pay_pid),
        haproxy.as_deref(),
        &args,
        &extras,
        &mut skipped,
    )
    .await;
    let measured = match (measured, &callgrind) {
        (Ok(mut results), Some(cg)) => {
            callgrind::count_all(
                &mut results,
                pay_addr,
                haproxy.as_deref(),
                cg,
                (args.callgrind_calls, args.json_only),
            )
            .await;
            Ok(results)
        }
        (r, _) => r,
    };
    pay.stop(paths::GRACE).await;
    let results = measured?;
    if let (Some(sink), true) = (&sink, verbose) {
        println!(
            "tracing on: {} spans received by the OTLP receiver",
            sink.spans()
        );
    }

    if verbose {
        report::print_tables(&settings, &results, &skipped);
    }
    println!("{}", report::json_line(&settings, &results, &skipped));
    Ok(0)
}

/// The optional measurements, and what they need.
struct Extras<'a> {
    h2load: Option<&'a h2load::H2load>,
    /// Connection counts for the memory figures; empty: none.
    levels: &'a [usize],
}

async fn measure_all(
    kinds: &[PathKind],
    (pay, pay_pid): (SocketAddr, u32),
    haproxy: Option<&Path>,
    args: &BenchArgs,
    extras: &Extras<'_>,
    skipped: &mut Vec<Skipped>,
) -> anyhow::Result<Vec<PathResult>> {
    let mut results = Vec::new();
    for &kind in kinds {
        if !args.json_only {
            eprintln!("measuring {:<11} {}", kind.key(), kind.describe());
        }
        let outcome = match Topology::start(kind, pay, haproxy, None).await {
            Ok(topo) => {
                let r = measure(kind, &topo, pay_pid, args, extras).await;
                topo.stop().await;
                r
            }
            Err(e) => Err(e),
        };
        match outcome {
            Ok(r) => results.push(r),
            // haproxy is only the reference: a run without it still says
            // what Tern does.
            Err(e) if kind.is_haproxy() => {
                if !args.json_only {
                    eprintln!("skipping {}: {e:#}", kind.key());
                }
                skipped.push(Skipped {
                    path: kind,
                    reason: format!("{e:#}"),
                });
            }
            Err(e) => return Err(e.context(format!("path {}", kind.key()))),
        }
    }
    Ok(results)
}

async fn measure(
    kind: PathKind,
    topo: &Topology,
    pay_pid: u32,
    args: &BenchArgs,
    extras: &Extras<'_>,
) -> anyhow::Result<PathResult> {
    let snap = || Snapshot::take(&topo.sidecars, pay_pid);
    let client = load::connect(topo.target).await?;
    load::check(&client).await?;
    let idle = snap()?;
    let concurrency = usize::try_from(args.concurrency).unwrap_or(1);
    load::closed_loop(&client, concurrency, WARMUP).await;

    let s0 = snap()?;
    let load = load::closed_loop(&client, concurrency, args.duration).await;
    let s1 = snap()?;
    let rate = load::open_loop(&client, args.rate, args.duration).await;
    let s2 = snap()?;
    let single = load::closed_loop(&client, 1, args.duration).await;
    let s3 = snap()?;
    drop(client);
    let h2load = match extras.h2load {
        Some(h) => {
            let before = snap()?;
            let mut r = h.run(topo.target, args.duration).await?;
            let after = snap()?;
            if !topo.sidecars.is_empty() {
                let cpu: f64 = (0..topo.sidecars.len())
                    .map(|i| after.sidecars[i].1 - before.sidecars[i].1)
                    .sum();
                // CPU is read around the whole run, warm-up included.
                let calls = r.rps * (r.seconds + 1.0);
                r.proxies_cpu_us_per_req = Some(cpu * 1e6 / calls.max(1.0));
            }
            Some(r)
        }
        None => None,
    };
    let conn_memory = if kind.is_tern() && !extras.levels.is_empty() {
        if !args.json_only {
            eprintln!(
                "memory     {:<11} with {:?} open connections",
                kind.key(),
                extras.levels
            );
        }
        match conns::measure(topo.target, &topo.sidecars, extras.levels).await {
            Ok(m) => Some(m),
            Err(e) => {
                eprintln!("no connection memory for {}: {e:#}", kind.key());
                None
            }
        }
    } else {
        None
    };
    let (u0, u1, u2, u3) = (&s0.sidecars, &s1.sidecars, &s2.sidecars, &s3.sidecars);

    for (phase, p) in [
        ("throughput", &load),
        ("rate", &rate),
        ("single-stream", &single),
    ] {
        if p.requests == 0 {
            anyhow::bail!(
                "no call succeeded in the {phase} phase: {}",
                p.first_error.as_deref().unwrap_or("no calls were made")
            );
        }
    }
    let sidecars: Vec<SidecarResult> = topo
        .sidecars
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let cpu = |a: &[(u64, f64)], b: &[(u64, f64)]| b[i].1 - a[i].1;
            let cpu_seconds = PerPhase {
                load: cpu(u0, u1),
                rate: cpu(u1, u2),
                single: cpu(u2, u3),
            };
            SidecarResult {
                name: s.name.clone(),
                rss_idle_bytes: idle.sidecars[i].0,
                rss_peak_bytes: u3[i].0,
                cpu_us_per_req: per_request(cpu_seconds, &load, &rate, &single),
                cpu_seconds,
            }
        })
        .collect();
    let cpu_us_per_req = (!sidecars.is_empty()).then(|| {
        let total = sidecars.iter().fold(PerPhase::default(), |t, s| PerPhase {
            load: t.load + s.cpu_seconds.load,
            rate: t.rate + s.cpu_seconds.rate,
            single: t.single + s.cpu_seconds.single,
        });
        per_request(total, &load, &rate, &single)
    });
    Ok(PathResult {
        path: kind,
        description: kind.describe(),
        load,
        rate,
        single,
        sidecars,
        cpu_us_per_req,
        cpu_seconds: cpu::breakdown([&s0, &s1, &s2, &s3]),
        h2load,
        cost: None,
        conn_memory,
    })
}

fn per_request(cpu: PerPhase, load: &Phase, rate: &Phase, single: &Phase) -> PerPhase {
    let us = |s: f64, p: &Phase| s * 1e6 / (p.requests.max(1) as f64);
    PerPhase {
        load: us(cpu.load, load),
        rate: us(cpu.rate, rate),
        single: us(cpu.single, single),
    }
}

/// Seconds as a bare number (`3`, `0.5`) or a humantime duration (`3s`, `1500ms`).
fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = match s.parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs > 0.0 && secs <= 86_400.0 => {
            Duration::from_secs_f64(secs)
        }
        Ok(_) => return Err(format!("{s:?}: give more than 0 and at most 86400 seconds")),
        Err(_) => humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}"))?,
    };
    if d.is_zero() {
        return Err("the duration must be positive".into());
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_with_and_without_units() {
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("0.5"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("0s").is_err());
    }
}
