//! The performance targets (docs/PERFORMANCE.md), each checked against what
//! this run measured: ratios against haproxy in the same run, added latency
//! over direct, and memory.

use serde::Serialize;

use super::paths::PathKind;
use super::PathResult;

const MIB: f64 = 1024.0 * 1024.0;

/// Two mTLS sidecars' CPU per request, at most this share of haproxy's two
/// plaintext hops; one sidecar against one hop likewise.
const CPU_RATIO: f64 = 0.8;
/// Throughput through two mTLS sidecars, at least this share of haproxy's two hops.
const THROUGHPUT_RATIO: f64 = 1.0;
/// Added latency at one call in flight, two mTLS sidecars over direct.
const ADDED_P50_US: i64 = 50;
const ADDED_P99_US: i64 = 150;
const IDLE_RSS_MIB: f64 = 8.0;
/// RSS of one sidecar with this many open, idle client connections (with a
/// call in flight on each, the figure is printed without a target).
const CONN_RSS_MIB: [(usize, f64); 2] = [(1_000, 30.0), (10_000, 100.0)];

/// One target and how this run compares.
#[derive(Debug, Serialize)]
pub struct Check {
    pub what: String,
    pub measured: String,
    pub target: String,
    pub met: bool,
    /// How far from the target, in its own unit ("+0.35x", "-12 µs").
    pub margin: String,
}

fn find(results: &[PathResult], kind: PathKind) -> Option<&PathResult> {
    results.iter().find(|r| r.path == kind)
}

/// Every target this run has the figures for.
pub fn checks(results: &[PathResult]) -> Vec<Check> {
    let mut out = Vec::new();
    let mtls = find(results, PathKind::TwoMtls);
    let direct = find(results, PathKind::Direct);
    let ha_two = find(results, PathKind::HaproxyTwo);
    let ratio_max = |out: &mut Vec<Check>, what: &str, got: f64, max: f64| {
        out.push(Check {
            what: what.into(),
            measured: format!("{got:.2}x"),
            target: format!("<= {max:.2}x"),
            met: got <= max,
            margin: format!("{:+.2}x", got - max),
        });
    };
    let cpu = |r: &PathResult| r.cpu_us_per_req.map(|c| c.load);
    let h2cpu = |r: &PathResult| r.h2load.as_ref().and_then(|h| h.proxies_cpu_us_per_req);
    let h2rps = |r: &PathResult| r.h2load.as_ref().map(|h| h.rps);
    for (label, get) in [
        ("", &cpu as &dyn Fn(&PathResult) -> Option<f64>),
        (" (h2load)", &h2cpu),
    ] {
        if let (Some(a), Some(b)) = (mtls.and_then(get), ha_two.and_then(get)) {
            let what = format!("CPU/req two-mtls vs haproxy-two{label}");
            ratio_max(&mut out, &what, a / b.max(1e-9), CPU_RATIO);
        }
        let one = find(results, PathKind::One).and_then(get);
        let ha_one = find(results, PathKind::HaproxyOne).and_then(get);
        if let (Some(a), Some(b)) = (one, ha_one) {
            let what = format!("CPU/req one vs haproxy-one{label}");
            ratio_max(&mut out, &what, a / b.max(1e-9), CPU_RATIO);
        }
    }
    for (label, get) in [
        (
            "",
            &(|r: &PathResult| Some(r.load.rps)) as &dyn Fn(&PathResult) -> Option<f64>,
        ),
        (" (h2load)", &h2rps),
    ] {
        if let (Some(a), Some(b)) = (mtls.and_then(get), ha_two.and_then(get)) {
            let got = a / b.max(1e-9);
            out.push(Check {
                what: format!("throughput two-mtls vs haproxy-two{label}"),
                measured: format!("{got:.2}x"),
                target: format!(">= {THROUGHPUT_RATIO:.2}x"),
                met: got >= THROUGHPUT_RATIO,
                margin: format!("{:+.2}x", got - THROUGHPUT_RATIO),
            });
        }
    }
    if let (Some(m), Some(d)) = (mtls, direct) {
        let added = |a: u32, b: u32| i64::from(a) - i64::from(b);
        for (what, got, max) in [
            (
                "added p50, 1 call in flight",
                added(m.single.p50_us, d.single.p50_us),
                ADDED_P50_US,
            ),
            (
                "added p99, 1 call in flight",
                added(m.single.p99_us, d.single.p99_us),
                ADDED_P99_US,
            ),
        ] {
            out.push(latency(what, got, max, format!("<= +{max} µs")));
        }
        if let Some(h) = ha_two {
            let ours = added(m.rate.p99_us, d.rate.p99_us);
            let theirs = added(h.rate.p99_us, d.rate.p99_us);
            out.push(latency(
                "added p99 at the fixed rate",
                ours,
                theirs,
                format!("<= haproxy-two {theirs:+} µs"),
            ));
        }
    }
    if let Some(m) = mtls {
        let idle = m
            .sidecars
            .iter()
            .map(|s| s.rss_idle_bytes)
            .max()
            .unwrap_or(0) as f64
            / MIB;
        out.push(mib(
            "idle RSS with mTLS, largest sidecar",
            idle,
            IDLE_RSS_MIB,
        ));
    }
    // Memory per connection: the mTLS path when it was measured, else any.
    let with_conns = [PathKind::TwoMtls, PathKind::Two, PathKind::One]
        .into_iter()
        .find_map(|k| find(results, k).and_then(|r| Some((k, r.conn_memory.as_ref()?))));
    if let Some((kind, mem)) = with_conns {
        for (n, max) in CONN_RSS_MIB {
            // Measured at n, or extrapolated from the largest count the
            // open-file limit allowed (at least half of n).
            let Some(l) = mem
                .levels
                .iter()
                .filter(|l| l.connections <= n && l.connections * 2 >= n)
                .max_by_key(|l| l.connections)
            else {
                continue;
            };
            let scale = n as f64 / l.connections as f64;
            let most = (0..l.rss_idle_bytes.len())
                .map(|i| {
                    let before = mem.rss_before_bytes.get(i).copied().unwrap_or(0) as f64;
                    before + (l.rss_idle_bytes[i] as f64 - before) * scale
                })
                .fold(0.0, f64::max)
                / MIB;
            let what = if l.connections == n {
                format!("RSS, {n} idle connections ({})", kind.key())
            } else {
                format!(
                    "RSS, {n} idle conns ({}, from {})",
                    kind.key(),
                    l.connections
                )
            };
            out.push(mib(&what, most, max));
        }
        let slack = super::conns::RECOVERY_SLACK * 100.0;
        let limit = super::conns::RECOVERY_LIMIT.as_secs_f64();
        out.push(Check {
            what: format!("RSS back within {slack:.0}% after close"),
            measured: mem
                .recovered_after_s
                .map_or(format!("not in {limit:.0} s"), |s| format!("{s:.0} s")),
            target: format!("<= {limit:.0} s"),
            met: mem.recovered_after_s.is_some(),
            margin: mem
                .recovered_after_s
                .map_or_else(|| "-".into(), |s| format!("{:+.0} s", s - limit)),
        });
    }
    out
}

fn latency(what: &str, got: i64, max: i64, target: String) -> Check {
    Check {
        what: what.into(),
        measured: format!("{got:+} µs"),
        target,
        met: got <= max,
        margin: format!("{:+} µs", got - max),
    }
}

fn mib(what: &str, got: f64, max: f64) -> Check {
    Check {
        what: what.into(),
        measured: format!("{got:.1} MiB"),
        target: format!("<= {max:.0} MiB"),
        met: got <= max,
        margin: format!("{:+.1} MiB", got - max),
    }
}

pub fn print(checks: &[Check]) {
    if checks.is_empty() {
        return;
    }
    println!();
    println!("targets (docs/PERFORMANCE.md)");
    for c in checks {
        let mark = if c.met { "met" } else { "MISSED" };
        println!(
            "  {:<44} {:>12}   target {:<24} {mark:<6} {}",
            c.what, c.measured, c.target, c.margin
        );
    }
}
