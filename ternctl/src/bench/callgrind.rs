//! Instructions and allocations per request, counted by valgrind's callgrind.
//!
//! Wall-clock CPU time on a shared 2-core machine varies by tens of percent
//! between runs; the instructions a proxy executes per request do not, so two
//! commits can be compared by them. Each proxy of a path runs under callgrind;
//! after a warm-up the counters are zeroed, a fixed number of calls is made,
//! and a dump is read: its total instructions, and the calls into the
//! allocator (`malloc` and friends, jemalloc's `_rjem_` entry points included).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context as _};
use serde::Serialize;

use super::paths::{PathKind, Topology};
use super::{load, PathResult};

/// Calls before the counters are zeroed: connections, pools and caches settle.
const WARMUP_CALLS: u64 = 50;

/// What one proxy executed for the measured calls.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub struct Counts {
    pub instructions: u64,
    /// `malloc`, `calloc`, `mallocx`, `aligned_alloc`, `posix_memalign`.
    pub allocations: u64,
    /// `realloc`, `rallocx`.
    pub reallocations: u64,
}

/// Functions whose calls count as allocations or reallocations; jemalloc
/// (tern-proxy) exports them with the `_rjem_` prefix, glibc (haproxy) plainly.
const ALLOC: [&str; 6] = [
    "malloc",
    "calloc",
    "mallocx",
    "aligned_alloc",
    "posix_memalign",
    "memalign",
];
const REALLOC: [&str; 2] = ["realloc", "rallocx"];

/// One path's proxies, per request.
#[derive(Clone, Debug, Serialize)]
pub struct PathCost {
    /// Calls counted (after the warm-up), all successful.
    pub calls: u64,
    /// Calls in flight while counting.
    pub concurrency: usize,
    /// All the path's proxies together, per call.
    pub instructions_per_req: f64,
    pub allocations_per_req: f64,
    pub reallocations_per_req: f64,
    /// Each proxy's totals over `calls`.
    pub sidecars: Vec<(String, Counts)>,
}

/// Each measured proxy path again, under callgrind; a failure leaves that
/// path without the figures and says why.
pub async fn count_all(
    results: &mut [PathResult],
    pay: SocketAddr,
    haproxy: Option<&Path>,
    cg: &Arc<Callgrind>,
    (calls, quiet): (u64, bool),
) {
    for r in results.iter_mut().filter(|r| r.path != PathKind::Direct) {
        if !quiet {
            eprintln!(
                "counting   {:<11} {} calls under callgrind",
                r.path.key(),
                calls
            );
        }
        match measure(r.path, pay, haproxy, cg, calls, 1).await {
            Ok(cost) => r.cost = Some(cost),
            Err(e) => eprintln!("no instruction counts for {}: {e:#}", r.path.key()),
        }
    }
}

/// Starts `kind` with its proxies under callgrind and counts `calls` calls.
pub async fn measure(
    kind: PathKind,
    pay: SocketAddr,
    haproxy: Option<&Path>,
    cg: &Arc<Callgrind>,
    calls: u64,
    concurrency: usize,
) -> anyhow::Result<PathCost> {
    let topo = Topology::start(kind, pay, haproxy, Some(Arc::clone(cg))).await?;
    let r = count(&topo, cg, calls, concurrency).await;
    topo.stop().await;
    r
}

async fn count(
    topo: &Topology,
    cg: &Callgrind,
    calls: u64,
    concurrency: usize,
) -> anyhow::Result<PathCost> {
    let client = load::connect(topo.target).await?;
    load::check(&client).await?;
    load::fixed_count(&client, concurrency, WARMUP_CALLS).await;
    for s in &topo.sidecars {
        cg.zero(s.pid).await?;
    }
    let phase = load::fixed_count(&client, concurrency, calls).await;
    if phase.errors > 0 {
        bail!(
            "{} of {calls} calls failed under callgrind: {}",
            phase.errors,
            phase.first_error.as_deref().unwrap_or("-")
        );
    }
    let mut sidecars = Vec::new();
    for s in &topo.sidecars {
        sidecars.push((s.name.clone(), cg.dump(&s.slug, s.pid).await?));
    }
    let per = |f: fn(&Counts) -> u64| {
        sidecars.iter().map(|(_, c)| f(c)).sum::<u64>() as f64 / calls.max(1) as f64
    };
    Ok(PathCost {
        calls,
        concurrency,
        instructions_per_req: per(|c| c.instructions),
        allocations_per_req: per(|c| c.allocations),
        reallocations_per_req: per(|c| c.reallocations),
        sidecars,
    })
}

/// valgrind and callgrind_control, and a directory for the dumps.
pub struct Callgrind {
    valgrind: PathBuf,
    control: PathBuf,
    dir: tempfile::TempDir,
}

impl Callgrind {
    /// `None` when valgrind is not installed (Debian: valgrind).
    pub fn find() -> anyhow::Result<Option<Self>> {
        let (Some(valgrind), Some(control)) = (on_path("valgrind"), on_path("callgrind_control"))
        else {
            return Ok(None);
        };
        let dir = tempfile::tempdir().context("creating a directory for callgrind's dumps")?;
        Ok(Some(Self {
            valgrind,
            control,
            dir,
        }))
    }

    /// The program and arguments that run `program args` under callgrind.
    pub fn wrap(&self, slug: &str, program: &Path, args: &[String]) -> (PathBuf, Vec<String>) {
        let out = self.dir.path().join(format!("{slug}.%p"));
        let mut all = vec![
            "--tool=callgrind".to_string(),
            format!("--callgrind-out-file={}", out.display()),
            // Names in full, so the dump can be read without its tables.
            "--compress-strings=no".into(),
            "--compress-pos=no".into(),
            program.display().to_string(),
        ];
        all.extend_from_slice(args);
        (self.valgrind.clone(), all)
    }

    pub async fn zero(&self, pid: u32) -> anyhow::Result<()> {
        self.control(&["--zero", &pid.to_string()]).await
    }

    /// Dumps what `pid` counted since it was zeroed and reads it back.
    pub async fn dump(&self, slug: &str, pid: u32) -> anyhow::Result<Counts> {
        let before = self.dumps(slug, pid)?;
        self.control(&["--dump", &pid.to_string()]).await?;
        // The dump is written by the target process after the command returns.
        for _ in 0..100 {
            let now = self.dumps(slug, pid)?;
            if let Some(newest) = now.iter().filter(|p| !before.contains(p)).max() {
                let text = std::fs::read_to_string(newest)
                    .with_context(|| format!("reading {}", newest.display()))?;
                if text.contains("\ntotals:") {
                    return parse(&text);
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        bail!("callgrind wrote no dump for pid {pid}")
    }

    fn dumps(&self, slug: &str, pid: u32) -> anyhow::Result<Vec<PathBuf>> {
        let prefix = format!("{slug}.{pid}.");
        let entries = std::fs::read_dir(self.dir.path()).context("listing callgrind's dumps")?;
        Ok(entries
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&prefix))
            })
            .collect())
    }

    async fn control(&self, args: &[&str]) -> anyhow::Result<()> {
        let out = tokio::process::Command::new(&self.control)
            .args(args)
            .output()
            .await
            .context("running callgrind_control")?;
        if !out.status.success() {
            bail!(
                "callgrind_control {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout).trim()
            );
        }
        Ok(())
    }
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Total instructions and allocator calls of one dump written with
/// `--compress-strings=no`: a `calls=N …` line counts N calls into the
/// function named by the `cfn=` line before it.
fn parse(text: &str) -> anyhow::Result<Counts> {
    let mut counts = Counts::default();
    let mut callee = "";
    let mut totals = None;
    for line in text.lines() {
        if let Some(name) = line.strip_prefix("cfn=") {
            callee = name;
        } else if let Some(rest) = line.strip_prefix("calls=") {
            let n: u64 = rest
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            let base = callee
                .trim_start_matches("_rjem_")
                .trim_start_matches("__libc_");
            if ALLOC.contains(&base) {
                counts.allocations += n;
            } else if REALLOC.contains(&base) {
                counts.reallocations += n;
            }
        } else if let Some(n) = line.strip_prefix("totals:") {
            totals = n.split_whitespace().next().and_then(|n| n.parse().ok());
        }
    }
    counts.instructions = totals.context("the dump has no totals: line")?;
    Ok(counts)
}

/// Instructions and allocations per request, one row per path counted.
pub fn print(results: &[PathResult]) {
    if results.iter().all(|p| p.cost.is_none()) {
        return;
    }
    println!();
    println!(
        "under callgrind, per call, all the path's proxies (repeatable: compare commits by these)"
    );
    println!(
        "{:<12} {:>7} {:>14} {:>12} {:>10}   per proxy: instructions/req",
        "path", "calls", "instructions", "allocations", "reallocs"
    );
    for p in results {
        if let Some(c) = &p.cost {
            let each: Vec<String> = c
                .sidecars
                .iter()
                .map(|(name, n)| {
                    format!(
                        "{name} {:.0}",
                        n.instructions as f64 / c.calls.max(1) as f64
                    )
                })
                .collect();
            println!(
                "{:<12} {:>7} {:>14.0} {:>12.1} {:>10.1}   {}",
                p.path.key(),
                c.calls,
                c.instructions_per_req,
                c.allocations_per_req,
                c.reallocations_per_req,
                each.join(", ")
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_instructions_and_allocator_calls() {
        let dump = "events: Ir\nfn=main\n0 10\ncfn=_rjem_malloc\ncalls=3 0\n0 30\n\
                    cfn=_rjem_rallocx\ncalls=2 0\n0 5\ncfn=free\ncalls=4 0\n0 4\n\
                    fn=other\ncfn=malloc\ncalls=1 0\n0 9\ncfn=malloc_usable_size\ncalls=7 0\n0 1\n\
                    totals: 1234\n";
        assert_eq!(
            parse(dump).ok(),
            Some(Counts {
                instructions: 1234,
                allocations: 4,
                reallocations: 2,
            })
        );
        assert!(parse("events: Ir\n").is_err());
    }
}
