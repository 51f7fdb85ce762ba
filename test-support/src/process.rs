//! A guard for a child process of a test: its stdout and stderr go to files in the test's
//! directory, it can wait for a line the process prints, and it always stops the process
//! (SIGTERM, then SIGKILL) when dropped, whatever the test did.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use nix::sys::signal::kill;
pub use nix::sys::signal::Signal;
use nix::unistd::Pid;

/// How long a process may take to print its "listening" line or become ready.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a guard waits after SIGTERM before it sends SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(3);
const POLL: Duration = Duration::from_millis(20);

/// A temporary directory for one test's logs; kept on disk when `TERN_E2E_KEEP=1`.
pub struct TestDir {
    dir: tempfile::TempDir,
}

impl TestDir {
    pub fn new(label: &str) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("tern-e2e-{label}-"))
            .tempdir()
            .context("creating the test directory")?;
        Ok(Self { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::env::var("TERN_E2E_KEEP").is_ok_and(|v| v == "1") {
            let path = self.dir.path().to_path_buf();
            eprintln!("keeping test directory {}", path.display());
            // Disabling cleanup leaves the files where they are for inspection.
            self.dir.disable_cleanup(true);
        }
    }
}

/// A running child process whose stdout and stderr go to files in the test directory.
pub struct Proc {
    label: String,
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
    status: Option<ExitStatus>,
}

impl Proc {
    /// Starts `program args...` with stdin closed and any inherited `TERN_*` variable removed,
    /// so a developer's environment cannot change what the test configures.
    pub fn spawn(dir: &Path, label: &str, program: &Path, args: &[String]) -> Result<Self> {
        Self::spawn_with_env(dir, label, program, args, &[])
    }

    pub fn spawn_with_env(
        dir: &Path,
        label: &str,
        program: &Path,
        args: &[String],
        env: &[(&str, String)],
    ) -> Result<Self> {
        Self::spawn_with_env_removed(dir, label, program, args, env, &[])
    }

    /// Like [`Proc::spawn_with_env`], and the variables named in `remove` are not inherited
    /// either (`CARGO`, say, which makes `ternctl` build its siblings first).
    pub fn spawn_with_env_removed(
        dir: &Path,
        label: &str,
        program: &Path,
        args: &[String],
        env: &[(&str, String)],
        remove: &[&str],
    ) -> Result<Self> {
        let stdout = dir.join(format!("{label}.stdout"));
        let stderr = dir.join(format!("{label}.stderr"));
        let out =
            File::create(&stdout).with_context(|| format!("creating {}", stdout.display()))?;
        let err =
            File::create(&stderr).with_context(|| format!("creating {}", stderr.display()))?;
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("TERN_") {
                cmd.env_remove(key);
            }
        }
        for key in remove {
            cmd.env_remove(key);
        }
        for (key, value) in env {
            cmd.env(key, value);
        }
        let child = cmd.spawn().with_context(|| {
            format!("starting {label}: {} {}", program.display(), args.join(" "))
        })?;
        Ok(Self {
            label: label.to_string(),
            child,
            stdout,
            stderr,
            status: None,
        })
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// The end of both outputs, for error messages.
    pub fn diagnostics(&self) -> String {
        fn tail(text: &str) -> &str {
            let start = text.len().saturating_sub(3000);
            let start = (start..text.len())
                .find(|i| text.is_char_boundary(*i))
                .unwrap_or(text.len());
            &text[start..]
        }
        format!(
            "--- {} stderr ---\n{}\n--- {} stdout ---\n{}",
            self.label,
            tail(&self.stderr()),
            self.label,
            tail(&self.stdout())
        )
    }

    /// The exit status if the process has ended.
    pub fn try_status(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self.child.try_wait().context("polling a child")?;
        }
        Ok(self.status)
    }

    /// Waits for a stdout line starting with `prefix` and returns the rest of that line.
    pub async fn wait_for_line(&mut self, prefix: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.stdout().lines().find(|l| l.starts_with(prefix)) {
                return Ok(line[prefix.len()..].trim().to_string());
            }
            if let Some(status) = self.try_status()? {
                bail!(
                    "{} exited ({status}) before printing {prefix:?}\n{}",
                    self.label,
                    self.diagnostics()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not print {prefix:?} within {timeout:?}\n{}",
                    self.label,
                    self.diagnostics()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Sends SIGTERM unless the process already ended; the guard's drop then only waits. Lets a
    /// group of processes drain at the same time instead of one after another.
    pub fn begin_stop(&mut self) {
        if matches!(self.try_status(), Ok(None)) {
            let _ = self.signal(Signal::SIGTERM);
        }
    }

    pub fn signal(&self, signal: Signal) -> Result<()> {
        let pid = i32::try_from(self.child.id()).context("pid out of range")?;
        kill(Pid::from_raw(pid), signal)
            .with_context(|| format!("sending {signal} to {}", self.label))
    }

    /// Waits (bounded) for the process to exit and returns its status.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} still running {timeout:?} later\n{}",
                    self.label,
                    self.diagnostics()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.status.is_some() || matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        // Repeating SIGTERM after begin_stop is harmless: a draining process ignores it.
        let _ = self.signal(Signal::SIGTERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(POLL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
