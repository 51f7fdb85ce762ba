//! Where the CPU went during each phase: the proxies (what is measured), and
//! also pay, the load generator and everything else on the machine, so a
//! reader can tell a proxy limit from a client limit or a busy neighbour.

use std::time::Instant;

use anyhow::Context as _;
use serde::Serialize;

use super::paths::Sidecar;
use super::PerPhase;
use crate::procs;

/// Counters read between phases.
pub struct Snapshot {
    at: Instant,
    /// Peak RSS and CPU seconds of each sidecar, in order.
    pub sidecars: Vec<(u64, f64)>,
    pay: f64,
    loadgen: f64,
    /// Busy CPU seconds of the whole machine, all cores.
    system: Option<f64>,
}

impl Snapshot {
    pub fn take(sidecars: &[Sidecar], pay_pid: u32) -> anyhow::Result<Self> {
        let sidecars = sidecars
            .iter()
            .map(|s| {
                procs::peak_rss_and_cpu(s.pid)
                    .with_context(|| format!("{} (pid {}) is gone", s.name, s.pid))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let cpu = |pid| procs::peak_rss_and_cpu(pid).map(|(_, c)| c);
        Ok(Snapshot {
            at: Instant::now(),
            sidecars,
            pay: cpu(pay_pid).context("pay is gone")?,
            loadgen: cpu(std::process::id()).unwrap_or(0.0),
            system: system_busy_seconds(),
        })
    }
}

/// CPU seconds per phase of each party on the machine.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Breakdown {
    /// Wall-clock seconds between the readings around each phase.
    pub wall: PerPhase,
    pub loadgen: PerPhase,
    pub pay: PerPhase,
    pub proxies: PerPhase,
    /// Busy time of the machine not accounted for by the above; absent
    /// without /proc/stat.
    pub others: Option<PerPhase>,
}

/// From the four readings taken before the throughput phase and after each
/// phase.
pub fn breakdown(s: [&Snapshot; 4]) -> Breakdown {
    let per = |f: &dyn Fn(&Snapshot) -> f64| PerPhase {
        load: f(s[1]) - f(s[0]),
        rate: f(s[2]) - f(s[1]),
        single: f(s[3]) - f(s[2]),
    };
    let proxies = per(&|x| x.sidecars.iter().map(|(_, c)| c).sum());
    let loadgen = per(&|x| x.loadgen);
    let pay = per(&|x| x.pay);
    let others = s.iter().all(|x| x.system.is_some()).then(|| {
        let system = per(&|x| x.system.unwrap_or(0.0));
        let rest = |sys: f64, a: f64, b: f64, c: f64| (sys - a - b - c).max(0.0);
        PerPhase {
            load: rest(system.load, loadgen.load, pay.load, proxies.load),
            rate: rest(system.rate, loadgen.rate, pay.rate, proxies.rate),
            single: rest(system.single, loadgen.single, pay.single, proxies.single),
        }
    });
    let secs = |a: &Snapshot, b: &Snapshot| b.at.duration_since(a.at).as_secs_f64();
    Breakdown {
        wall: PerPhase {
            load: secs(s[0], s[1]),
            rate: secs(s[1], s[2]),
            single: secs(s[2], s[3]),
        },
        loadgen,
        pay,
        proxies,
        others,
    }
}

/// Busy time of all CPUs (everything but idle and iowait) from /proc/stat.
fn system_busy_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    let idle = ticks.get(3)? + ticks.get(4)?;
    let total: u64 = ticks.iter().sum();
    // USER_HZ is 100 on every Linux ABI in practice, as procs assumes too.
    Some(total.saturating_sub(idle) as f64 / 100.0)
}

/// The machine's 1-minute load average, to flag a noisy run.
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
