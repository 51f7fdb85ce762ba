//! Child processes of the demo and the benchmark: found beside `ternctl`,
//! started with piped output, stopped on drop so nothing outlives ternctl.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context as _};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

/// A binary built beside `ternctl` (same target directory and profile).
pub fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating ternctl")?;
    let dir = exe.parent().context("ternctl has no directory")?;
    let path = dir.join(name);
    if !path.exists() {
        bail!(
            "{} not found; build the workspace first (cargo build --release --workspace --bins)",
            path.display()
        );
    }
    Ok(path)
}

/// Under `cargo run`, builds the binaries ternctl starts (proxy, demo apps) with the same
/// profile first, so the demo never runs stale or missing siblings. Outside cargo it does
/// nothing: an installed ternctl uses the binaries installed beside it.
pub async fn build_siblings() -> anyhow::Result<()> {
    let Some(cargo) = std::env::var_os("CARGO") else {
        return Ok(());
    };
    let exe = std::env::current_exe().context("locating ternctl")?;
    let release = exe
        .parent()
        .and_then(|d| d.file_name())
        .is_some_and(|n| n == "release");
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "--quiet",
        "-p",
        "tern-proxy",
        "-p",
        "tern-control",
        "-p",
        "tern-demo",
        "--bins",
    ]);
    if release {
        cmd.arg("--release");
    }
    eprintln!("ternctl: building tern-proxy, tern-control and the demo services ...");
    let status = cmd.status().await.context("running cargo build")?;
    if !status.success() {
        bail!("cargo build of tern-proxy, tern-control and tern-demo failed ({status})");
    }
    Ok(())
}

/// A running child; SIGTERM then SIGKILL when dropped.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub stdout: Option<Lines<BufReader<ChildStdout>>>,
}

impl Proc {
    pub fn spawn(name: &str, bin: &str, args: &[String]) -> anyhow::Result<Self> {
        let mut child = Command::new(sibling(bin)?)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let stdout = child.stdout.take().map(|s| BufReader::new(s).lines());
        Ok(Self {
            name: name.to_string(),
            child,
            stdout,
        })
    }

    /// Like [`Proc::spawn`], for a program that is not part of the workspace
    /// (the reference proxy the benchmark compares against).
    pub fn spawn_program(
        name: &str,
        program: &std::path::Path,
        args: &[String],
    ) -> anyhow::Result<Self> {
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {name} ({})", program.display()))?;
        let stdout = child.stdout.take().map(|s| BufReader::new(s).lines());
        Ok(Self {
            name: name.to_string(),
            child,
            stdout,
        })
    }

    /// Waits for a stdout line containing `needle`; returns it.
    pub async fn wait_for_line(
        &mut self,
        needle: &str,
        timeout: Duration,
    ) -> anyhow::Result<String> {
        let name = self.name.clone();
        let lines = self.stdout.as_mut().context("stdout not captured")?;
        let found = tokio::time::timeout(timeout, async {
            while let Some(line) = lines.next_line().await? {
                if line.contains(needle) {
                    return Ok::<_, std::io::Error>(Some(line));
                }
            }
            Ok(None)
        })
        .await;
        match found {
            Ok(Ok(Some(line))) => Ok(line),
            Ok(Ok(None)) => bail!("{name} exited before printing {needle:?}"),
            Ok(Err(e)) => bail!("{name}: reading stdout: {e}"),
            Err(_) => bail!("{name} did not print {needle:?} within {timeout:?}"),
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    pub fn signal(&self, sig: Signal) {
        if let Some(pid) = self.child.id().and_then(|p| i32::try_from(p).ok()) {
            let _ = kill(Pid::from_raw(pid), sig);
        }
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub async fn stop(&mut self, grace: Duration) {
        self.signal(Signal::SIGTERM);
        if tokio::time::timeout(grace, self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.signal(Signal::SIGTERM);
        }
    }
}

/// A free loopback port (bound then released; fine on a quiet loopback).
pub fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

/// Peak RSS (VmHWM) and CPU seconds (utime+stime) of a process, from /proc.
pub fn peak_rss_and_cpu(pid: u32) -> Option<(u64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let hwm_kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some((hwm_kb * 1024, ticks / 100.0))
}
