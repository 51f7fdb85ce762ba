//! Child processes for the e2e tests: where the workspace binaries are, and (from
//! `tern-test-support`) the guard that captures a process's output to files and always stops
//! it, the per-test log directory and free ports.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{anyhow, bail, Context as _, Result};

pub use tern_test_support::{free_addr, Proc, TestDir, START_TIMEOUT};

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
}
