//! The Python grpcio side of the interoperability tests: checking that grpcio is installed,
//! generating the Echo stubs from the repository's .proto, and running the scripts in
//! `tests/python/`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use tokio::process::Command;

use crate::mesh::App;
use crate::process::{repo_root, Proc};
use crate::within;

/// Bound on the whole Python client run: a dozen calls, each bounded by the script at 5 s.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

pub fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_string())
}

pub fn script(name: &str) -> PathBuf {
    repo_root().join("tests").join("python").join(name)
}

/// Whether `import grpc, grpc_tools` works.
pub async fn grpcio_installed() -> bool {
    let status = Command::new(python())
        .args(["-c", "import grpc, grpc_tools"])
        .kill_on_drop(true)
        .output();
    matches!(within(Duration::from_secs(30), status).await, Ok(Ok(out)) if out.status.success())
}

/// Generates `tern/test/v1/echo_pb2*.py` under `dir/gen` with grpcio-tools and returns the
/// directory to put on `PYTHONPATH`.
pub async fn generate_stubs(dir: &Path) -> Result<PathBuf> {
    let out = dir.join("gen");
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let proto_root = repo_root().join("proto").join("proto");
    let output = Command::new(python())
        .arg("-m")
        .arg("grpc_tools.protoc")
        .arg(format!("-I{}", proto_root.display()))
        .arg(format!("--python_out={}", out.display()))
        .arg(format!("--grpc_python_out={}", out.display()))
        .arg("tern/test/v1/echo.proto")
        .kill_on_drop(true)
        .output();
    let output = within(Duration::from_secs(60), output)
        .await?
        .context("running grpc_tools.protoc")?;
    if !output.status.success() {
        bail!(
            "grpc_tools.protoc failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(out)
}

fn pythonpath(stubs: &Path) -> String {
    match std::env::var("PYTHONPATH") {
        Ok(existing) if !existing.is_empty() => format!("{}:{existing}", stubs.display()),
        _ => stubs.display().to_string(),
    }
}

/// Starts `echo_server.py` on a free port.
pub async fn start_server(dir: &Path, stubs: &Path, name: &str) -> Result<App> {
    let args = [
        "-u".to_string(),
        script("echo_server.py").display().to_string(),
        "--listen".to_string(),
        "127.0.0.1:0".to_string(),
        "--name".to_string(),
        name.to_string(),
    ];
    let program = PathBuf::from(python());
    App::start_with_env(
        dir,
        name,
        &program,
        &args,
        &[("PYTHONPATH", pythonpath(stubs))],
    )
    .await
}

/// Runs `echo_client.py` against `target` (reading `Stats` from `direct`) and returns its report.
/// Output goes to files in `dir`, so even a run cut short by the time bound shows how far it got.
pub async fn run_client(
    dir: &Path,
    stubs: &Path,
    target: SocketAddr,
    direct: SocketAddr,
    server: &str,
) -> Result<String> {
    let args = [
        "-u".to_string(),
        script("echo_client.py").display().to_string(),
        "--target".to_string(),
        target.to_string(),
        "--direct".to_string(),
        direct.to_string(),
        "--server".to_string(),
        server.to_string(),
    ];
    let program = PathBuf::from(python());
    let env = [("PYTHONPATH", pythonpath(stubs))];
    let mut proc = Proc::spawn_with_env(dir, "echo_client.py", &program, &args, &env)?;
    let status = proc.wait_exit(CLIENT_TIMEOUT).await?;
    let report = format!("{}{}", proc.stdout(), proc.stderr());
    if !status.success() {
        bail!("echo_client.py failed ({status}):\n{report}");
    }
    Ok(report)
}
