//! The benchmark's output: a header saying how it was measured, one table of
//! paths, one of proxies, comparisons against direct and against haproxy of
//! the same shape, h2load's figures, instructions and allocations per request,
//! memory per connection, the targets, and the JSON line.

use std::path::Path;

use serde::Serialize;

use super::paths::PathKind;
use super::{targets, PathResult, Settings, Skipped};

const MIB: f64 = 1024.0 * 1024.0;

/// One path against a baseline: ratios above 1 and deltas above 0 mean "more".
#[derive(Debug, Serialize)]
struct Comparison {
    path: PathKind,
    against: PathKind,
    throughput_ratio: f64,
    /// p50, p99, p99.9 at the fixed rate.
    rate_delta_us: [i64; 3],
    /// p50, p99, p99.9 with one call in flight.
    single_delta_us: [i64; 3],
    #[serde(skip_serializing_if = "Option::is_none")]
    cpu_per_req_ratio: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    peak_rss_ratio: Option<f64>,
}

fn compare(a: &PathResult, b: &PathResult) -> Comparison {
    let d = |x: u32, y: u32| i64::from(x) - i64::from(y);
    let ratio = |x: f64, y: f64| if y > 0.0 { x / y } else { 0.0 };
    let cpu = match (a.cpu_us_per_req, b.cpu_us_per_req) {
        (Some(x), Some(y)) => Some(ratio(x.load, y.load)),
        _ => None,
    };
    let rss = (!a.sidecars.is_empty() && !b.sidecars.is_empty())
        .then(|| ratio(max_peak_rss(a) as f64, max_peak_rss(b) as f64));
    Comparison {
        path: a.path,
        against: b.path,
        throughput_ratio: ratio(a.load.rps, b.load.rps),
        rate_delta_us: [
            d(a.rate.p50_us, b.rate.p50_us),
            d(a.rate.p99_us, b.rate.p99_us),
            d(a.rate.p999_us, b.rate.p999_us),
        ],
        single_delta_us: [
            d(a.single.p50_us, b.single.p50_us),
            d(a.single.p99_us, b.single.p99_us),
            d(a.single.p999_us, b.single.p999_us),
        ],
        cpu_per_req_ratio: cpu,
        peak_rss_ratio: rss,
    }
}

fn max_peak_rss(r: &PathResult) -> u64 {
    r.sidecars
        .iter()
        .map(|s| s.rss_peak_bytes)
        .max()
        .unwrap_or(0)
}

fn find(results: &[PathResult], kind: PathKind) -> Option<&PathResult> {
    results.iter().find(|r| r.path == kind)
}

fn vs_direct(results: &[PathResult]) -> Vec<Comparison> {
    let Some(direct) = find(results, PathKind::Direct) else {
        return Vec::new();
    };
    results
        .iter()
        .filter(|r| r.path != PathKind::Direct)
        .map(|r| compare(r, direct))
        .collect()
}

fn vs_haproxy(results: &[PathResult]) -> Vec<Comparison> {
    results
        .iter()
        .filter_map(|r| Some(compare(r, find(results, r.path.haproxy_peer()?)?)))
        .collect()
}

pub fn print_header(s: &Settings, haproxy: Option<&Path>) {
    println!(
        "Tern bench: gRPC unary tern.demo.v1.PayService/Pay, h2c from the client and to pay, on loopback; between the sidecars plaintext (two) or mTLS 1.3 (two-mtls)"
    );
    println!(
        "  load generator: this process, {} tokio worker thread, one HTTP/2 connection per path; \
         it shares the machine's {} CPUs with pay and the proxies (nothing pinned)",
        s.client_threads, s.cpus
    );
    println!(
        "  proxies: {} worker thread each (tern-proxy --worker-threads 1{})",
        s.proxy_threads,
        if haproxy.is_some() {
            ", haproxy nbthread 1"
        } else {
            ""
        }
    );
    println!(
        "  per path: {}s warm-up, then {}s each of: {} calls in flight (closed loop), \
         {} calls/s (open loop), 1 call in flight",
        s.warmup_s, s.duration_s, s.concurrency, s.rate
    );
    if let Some(l) = s.load_average {
        let busy = if l >= 1.0 {
            "; other work is competing, expect noise"
        } else {
            ""
        };
        println!("  load average at start: {l:.2}{busy}");
    }
}

pub fn print_tables(s: &Settings, results: &[PathResult], skipped: &[Skipped]) {
    let row = |cols: [&str; 10]| {
        let [a, b, c, d, e, f, g, h, i, j] = cols;
        println!("{a:<12} {b:>10}  {c:>7} {d:>7} {e:>7}  {f:>7} {g:>7} {h:>7}  {i:>8} {j:>9}");
    };
    println!();
    let group_rate = format!("── {}/s open loop µs ──", s.rate);
    println!(
        "{:<12} {:>10}  {group_rate:^23}  {:^23}  {:^18}",
        "", "throughput", "─ 1 call in flight µs ─", "──── proxies ────"
    );
    let c = format!("req/s c={}", s.concurrency);
    row([
        "path", &c, "p50", "p99", "p99.9", "p50", "p99", "p99.9", "µs/req", "peak RSS",
    ]);
    for p in results {
        let cpu = p
            .cpu_us_per_req
            .map_or("-".to_string(), |c| format!("{:.1}", c.load));
        let rss = if p.sidecars.is_empty() {
            "-".to_string()
        } else {
            format!("{:.1} MiB", max_peak_rss(p) as f64 / MIB)
        };
        let n = |v: u32| v.to_string();
        row([
            p.path.key(),
            &format!("{:.0}", p.load.rps),
            &n(p.rate.p50_us),
            &n(p.rate.p99_us),
            &n(p.rate.p999_us),
            &n(p.single.p50_us),
            &n(p.single.p99_us),
            &n(p.single.p999_us),
            &cpu,
            &rss,
        ]);
    }
    println!(
        "  latencies in µs; proxies' µs/req: CPU of all the path's proxies per call in the \
         throughput phase; peak RSS: the largest proxy's VmHWM"
    );
    for p in results {
        for (name, ph) in [
            ("throughput", &p.load),
            ("rate", &p.rate),
            ("c=1", &p.single),
        ] {
            if ph.errors > 0 || ph.dropped > 0 {
                println!(
                    "  {} {name}: {} errors, {} not sent (too many in flight); first error: {}",
                    p.path.key(),
                    ph.errors,
                    ph.dropped,
                    ph.first_error.as_deref().unwrap_or("-")
                );
            }
        }
    }

    if results.iter().any(|p| !p.sidecars.is_empty()) {
        println!();
        println!(
            "{:<12} {:<24} {:>9} {:>9} {:>22} {:>22}",
            "path", "proxy", "idle RSS", "peak RSS", "CPU s load/rate/c=1", "µs/req load/rate/c=1"
        );
        for p in results {
            for sc in &p.sidecars {
                let (cs, us) = (sc.cpu_seconds, sc.cpu_us_per_req);
                println!(
                    "{:<12} {:<24} {:>5.1} MiB {:>5.1} MiB {:>22} {:>22}",
                    p.path.key(),
                    sc.name,
                    sc.rss_idle_bytes as f64 / MIB,
                    sc.rss_peak_bytes as f64 / MIB,
                    format!("{:.2} / {:.2} / {:.2}", cs.load, cs.rate, cs.single),
                    format!("{:.1} / {:.1} / {:.1}", us.load, us.rate, us.single),
                );
            }
        }
        println!("  idle RSS: VmHWM after start-up and one call; CPU from /proc (10 ms ticks)");
    }

    print_cpu(s, results);
    print_comparisons("against direct", &vs_direct(results), false);
    print_comparisons(
        "tern-proxy against haproxy, same shape",
        &vs_haproxy(results),
        true,
    );
    super::h2load::print(results);
    super::callgrind::print(results);
    super::conns::print(results);
    targets::print(&targets::checks(results));
    for sk in skipped {
        println!("skipped {}: {}", sk.path.key(), sk.reason);
    }
    println!();
}

fn print_comparisons(title: &str, rows: &[Comparison], resources: bool) {
    if rows.is_empty() {
        return;
    }
    println!();
    println!("{title}");
    let extra = if resources {
        "   CPU/req  peak RSS"
    } else {
        ""
    };
    println!(
        "{:<26} {:>10}  {:>24}  {:>24}{extra}",
        "", "throughput", "Δ p50/p99/p99.9 at rate", "Δ p50/p99/p99.9 at c=1"
    );
    for c in rows {
        let [a, b, d] = c.rate_delta_us;
        let [e, f, g] = c.single_delta_us;
        let extra = match (resources, c.cpu_per_req_ratio, c.peak_rss_ratio) {
            (true, Some(cpu), Some(rss)) => format!("   {cpu:>6.2}x  {rss:>7.2}x"),
            _ => String::new(),
        };
        println!(
            "{:<26} {:>9.2}x  {:>24}  {:>24}{extra}",
            format!("{} vs {}", c.path.key(), c.against.key()),
            c.throughput_ratio,
            format!("{a:+} / {b:+} / {d:+} µs"),
            format!("{e:+} / {f:+} / {g:+} µs"),
        );
    }
}

/// Who used the cores while the path ran flat out: a load generator near 100%
/// means the client, not the path, set the throughput.
fn print_cpu(s: &Settings, results: &[PathResult]) {
    println!();
    println!(
        "CPU during the c={} phase, % of one core ({} cores = {}%)",
        s.concurrency,
        s.cpus,
        s.cpus * 100
    );
    println!(
        "{:<12} {:>8} {:>8} {:>8} {:>8}",
        "path", "loadgen", "pay", "proxies", "others"
    );
    for p in results {
        let b = &p.cpu_seconds;
        let pct = |v: f64| {
            if b.wall.load > 0.0 {
                format!("{:.0}%", v / b.wall.load * 100.0)
            } else {
                "-".into()
            }
        };
        println!(
            "{:<12} {:>8} {:>8} {:>8} {:>8}",
            p.path.key(),
            pct(b.loadgen.load),
            pct(b.pay.load),
            if p.sidecars.is_empty() {
                "-".into()
            } else {
                pct(b.proxies.load)
            },
            b.others.map_or("-".into(), |o| pct(o.load)),
        );
    }
}

/// Everything in one line, last on stdout, for scripts; `type` comes first so
/// a reader can pick the line out by its prefix.
pub fn json_line(s: &Settings, results: &[PathResult], skipped: &[Skipped]) -> String {
    #[derive(Serialize)]
    struct Line<'a> {
        r#type: &'static str,
        settings: &'a Settings,
        paths: &'a [PathResult],
        vs_direct: Vec<Comparison>,
        vs_haproxy: Vec<Comparison>,
        targets: Vec<targets::Check>,
        skipped: &'a [Skipped],
    }
    let line = Line {
        r#type: "bench",
        settings: s,
        paths: results,
        vs_direct: vs_direct(results),
        vs_haproxy: vs_haproxy(results),
        targets: targets::checks(results),
        skipped,
    };
    serde_json::to_string(&line).unwrap_or_else(|e| {
        serde_json::json!({"type": "bench", "error": e.to_string()}).to_string()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::load::Phase;
    use crate::bench::{PerPhase, SidecarResult};

    fn path(kind: PathKind, rps: f64, p50: u32, cpu_s: f64) -> PathResult {
        let phase = Phase {
            requests: 1000,
            rps,
            p50_us: p50,
            p99_us: p50 * 2,
            p999_us: p50 * 3,
            ..Phase::default()
        };
        let sidecars = if kind == PathKind::Direct {
            Vec::new()
        } else {
            vec![SidecarResult {
                name: "proxy".into(),
                rss_idle_bytes: 1 << 20,
                rss_peak_bytes: 2 << 20,
                cpu_seconds: PerPhase::default(),
                cpu_us_per_req: PerPhase::default(),
            }]
        };
        PathResult {
            path: kind,
            description: kind.describe(),
            load: phase.clone(),
            rate: phase.clone(),
            single: phase,
            cpu_us_per_req: (!sidecars.is_empty()).then_some(PerPhase {
                load: cpu_s,
                rate: cpu_s,
                single: cpu_s,
            }),
            sidecars,
            cpu_seconds: Default::default(),
            h2load: None,
            cost: None,
            conn_memory: None,
        }
    }

    #[test]
    fn compares_against_direct_and_haproxy() {
        let results = [
            path(PathKind::Direct, 1000.0, 40, 0.0),
            path(PathKind::Two, 500.0, 100, 20.0),
            path(PathKind::HaproxyTwo, 800.0, 90, 10.0),
        ];
        let d = vs_direct(&results);
        assert_eq!(d.len(), 2);
        assert!((d[0].throughput_ratio - 0.5).abs() < 1e-9);
        assert_eq!(d[0].single_delta_us, [60, 120, 180]);
        let h = vs_haproxy(&results);
        assert_eq!(h.len(), 1);
        assert_eq!(h[0].against, PathKind::HaproxyTwo);
        assert_eq!(h[0].cpu_per_req_ratio, Some(2.0));
    }

    #[test]
    fn json_line_starts_with_its_type() {
        let settings = Settings {
            duration_s: 1.0,
            warmup_s: 1.0,
            concurrency: 32,
            rate: 1000,
            cpus: 2,
            client_threads: 1,
            proxy_threads: 1,
            load_average: None,
        };
        let line = json_line(&settings, &[path(PathKind::Direct, 1.0, 1, 0.0)], &[]);
        assert!(line.starts_with(r#"{"type":"bench","settings":"#), "{line}");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        assert_eq!(v["paths"][0]["path"], "direct");
    }
}
