//! Child processes for the e2e tests: where the binaries are, a per-test log directory, and a
//! guard that captures output to files and always stops its process (SIGTERM, then SIGKILL).

use std::collections::HashSet;
use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context as _, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How long a process may take to print its "listening" line or become ready.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a guard waits after SIGTERM before it sends SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(3);
const POLL: Duration = Duration::from_millis(20);

/// The repository root (the workspace directory).
pub fn repo_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// `target/<profile>/`: where cargo put the test executable's sibling binaries.
///
/// Test executables live in `target/<profile>/deps/`; binaries of every workspace crate built
/// with the same profile sit one level up.
pub fn target_profile_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the test executable")?;
    let deps = exe
        .parent()
        .ok_or_else(|| anyhow!("test executable {} has no parent", exe.display()))?;
    let dir = if deps.file_name().is_some_and(|n| n == "deps") {
        deps.parent().unwrap_or(deps)
    } else {
        deps
    };
    Ok(dir.to_path_buf())
}

/// Path of a workspace binary (`tern-proxy`, `order`, `pay`, `echo-server`, ...).
///
/// Cargo only builds the binaries of the crate under test before its integration tests, so the
/// others must come from `cargo build --workspace --bins` (the documented test command). A missing
/// or stale binary is an error naming that command rather than a confusing test failure.
pub fn binary(name: &str) -> Result<PathBuf> {
    let path = target_profile_dir()?.join(name);
    if !path.is_file() {
        bail!(
            "binary {} not found: build the workspace binaries first with \
             `cargo build --workspace --bins` (same profile as the tests)",
            path.display()
        );
    }
    check_fresh(&path)?;
    Ok(path)
}

/// Fails when a workspace source the binary was built from is newer than the binary, as cargo
/// would rebuild it then: a stale proxy would make every test result meaningless. The sources
/// are the ones cargo itself recorded in the binary's dep-info file (`target/<profile>/NAME.d`).
fn check_fresh(binary: &Path) -> Result<()> {
    let dep_info = binary.with_extension("d");
    let Ok(text) = std::fs::read_to_string(&dep_info) else {
        return Ok(());
    };
    let built = modified(binary)?;
    let root = repo_root();
    let sources = text
        .split_once(": ")
        .map(|(_, deps)| deps)
        .unwrap_or_default();
    for source in split_dep_paths(sources) {
        let source = PathBuf::from(source);
        if !source.starts_with(&root) {
            continue;
        }
        let newer = match std::fs::metadata(&source).and_then(|m| m.modified()) {
            Ok(time) => time > built,
            // Deleted or renamed since the build.
            Err(_) => true,
        };
        if newer {
            bail!(
                "{} is older than {}: rebuild with `cargo build --workspace --bins`",
                binary.display(),
                source.display()
            );
        }
    }
    Ok(())
}

/// Splits a Makefile dependency list on unescaped whitespace (`\ ` is a space in a path).
fn split_dep_paths(deps: &str) -> Vec<String> {
    let mut paths = Vec::new();
    let mut current = String::new();
    let mut chars = deps.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some('\n') | None => {}
                Some(next) => current.push(next),
            },
            c if c.is_whitespace() => {
                if !current.is_empty() {
                    paths.push(std::mem::take(&mut current));
                }
            }
            c => current.push(c),
        }
    }
    if !current.is_empty() {
        paths.push(current);
    }
    paths
}

fn modified(path: &Path) -> Result<SystemTime> {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .with_context(|| format!("reading mtime of {}", path.display()))
}

/// A free loopback port. Ports handed out once are never handed out again by this process, so
/// tests running in parallel threads cannot pick the same one between the probe and the bind.
pub fn free_addr() -> Result<SocketAddr> {
    static GIVEN: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let given = GIVEN.get_or_init(Mutex::default);
    for _ in 0..100 {
        let listener = TcpListener::bind("127.0.0.1:0").context("probing for a free port")?;
        let addr = listener.local_addr().context("reading the probed port")?;
        let mut given = given.lock().unwrap_or_else(|p| p.into_inner());
        if given.insert(addr.port()) {
            return Ok(addr);
        }
    }
    bail!("no free loopback port found")
}

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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn dep_paths_split_on_unescaped_spaces() {
        let deps = "/a/b.rs /c/with\\ space.rs\n /d.rs";
        assert_eq!(
            split_dep_paths(deps),
            ["/a/b.rs", "/c/with space.rs", "/d.rs"]
        );
    }

    #[test]
    fn free_addrs_are_never_repeated() {
        let ports: HashSet<u16> = (0..50).map(|_| free_addr().unwrap().port()).collect();
        assert_eq!(ports.len(), 50);
    }
}
