//! The grpc-go echo server (`tests/go/echo-server`), built with Debian's Go toolchain and its
//! packaged grpc-go and protobuf sources (`golang-go`, `golang-google-grpc-dev`,
//! `golang-google-protobuf-dev`), offline, in GOPATH mode. The binary is kept in the target
//! directory and rebuilt when its source is newer.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use tokio::process::Command;

use crate::mesh::App;
use crate::process::{repo_root, target_profile_dir};
use crate::within;

/// Where Debian installs Go library sources.
const DEBIAN_GOPATH: &str = "/usr/share/gocode";
const BUILD_TIMEOUT: Duration = Duration::from_secs(300);

fn source() -> PathBuf {
    repo_root().join("tests/go/echo-server/main.go")
}

/// What is missing to build the server, if anything.
pub async fn missing_prerequisite() -> Option<String> {
    let grpc = Path::new(DEBIAN_GOPATH).join("src/google.golang.org/grpc");
    let protobuf = Path::new(DEBIAN_GOPATH).join("src/google.golang.org/protobuf");
    let go = Command::new("go")
        .arg("version")
        .kill_on_drop(true)
        .output()
        .await;
    if !matches!(go, Ok(ref out) if out.status.success()) || !grpc.is_dir() || !protobuf.is_dir() {
        return Some(
            "grpc-go (apt-get install golang-go golang-google-grpc-dev golang-google-protobuf-dev)"
                .to_string(),
        );
    }
    None
}

/// The server binary, built first if it is missing or older than its source.
pub async fn echo_server_binary() -> Result<PathBuf> {
    let target = target_profile_dir()?.join("echo-server-go");
    let src = source();
    let fresh = match (std::fs::metadata(&target), std::fs::metadata(&src)) {
        (Ok(t), Ok(s)) => t.modified()? >= s.modified()?,
        _ => false,
    };
    if fresh {
        return Ok(target);
    }
    let work = target_profile_dir()?.join("go");
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let gopath = format!("{}:{DEBIAN_GOPATH}", work.join("path").display());
    let build = Command::new("go")
        .arg("build")
        .arg("-o")
        .arg(&target)
        .arg(&src)
        .env("GO111MODULE", "off")
        .env("GOPATH", gopath)
        .env("GOCACHE", work.join("cache"))
        .env("GOFLAGS", "")
        .env("GOPROXY", "off")
        .kill_on_drop(true)
        .output();
    let out = within(BUILD_TIMEOUT, build)
        .await?
        .context("running go build")?;
    if !out.status.success() {
        bail!(
            "go build {} failed:\n{}",
            src.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(target)
}

/// Starts the grpc-go echo server on a free port.
pub async fn start_server(dir: &Path, name: &str) -> Result<App> {
    let program = echo_server_binary().await?;
    let args = [
        "-listen".to_string(),
        "127.0.0.1:0".to_string(),
        "-name".to_string(),
        name.to_string(),
    ];
    App::start(dir, name, &program, &args).await
}
