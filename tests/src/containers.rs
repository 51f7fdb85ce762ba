//! Pods as real containers on the machine's Docker engine, run the way a kubelet runs an
//! injected pod: a pause container holding the pod's network namespace (and its IP on a private
//! bridge), the `tern-init` init container installing the iptables redirects and exiting, then
//! the tern-proxy sidecar and the app, all in that one namespace.
//!
//! Images come from `docker/build-images.sh --profile debug`: the binaries this suite already
//! built, nothing pulled. Tools the tests need inside pods (the echo and greeter servers, the mesh
//! client, and Redis when the machine has it) go into a `tern-e2e/tools` image made the same way.
//! Every container and the network carry a label naming this run and are removed on drop.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};

use crate::process::{repo_root, target_profile_dir};

pub const VERSION: &str = "0.1.0";
/// tern-proxy's user in its image; tern-init leaves its traffic alone.
pub const PROXY_UID: u32 = 2102;
/// tern-control's user in its image.
pub const CONTROL_UID: u32 = 2103;

/// Runs `docker ARGS`, failing with its stderr when it exits non-zero.
pub async fn docker(args: &[&str]) -> Result<String> {
    let out = docker_output(args).await?;
    if !out.status.success() {
        bail!(
            "docker {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub async fn docker_output(args: &[&str]) -> Result<Output> {
    tokio::process::Command::new("docker")
        .args(args)
        .output()
        .await
        .with_context(|| format!("running docker {}", args.join(" ")))
}

/// Whether a Docker engine answers and this process may drive iptables in containers (root).
pub async fn engine_available() -> bool {
    let root = nix::unistd::Uid::effective().is_root();
    root && docker_output(&["info", "--format", "{{.ServerVersion}}"])
        .await
        .is_ok_and(|o| o.status.success())
}

/// Builds tern/{proxy,init,control,demo} from this profile's binaries, and the tools image.
pub async fn build_images() -> Result<()> {
    let profile = target_profile_dir()?;
    let name = profile
        .file_name()
        .and_then(|n| n.to_str())
        .context("target profile directory")?
        .to_string();
    let script = repo_root().join("docker/build-images.sh");
    let out = tokio::process::Command::new("bash")
        .arg(&script)
        .args(["--no-cargo", "--profile", &name])
        .output()
        .await
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "{} failed:\n{}{}",
            script.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    build_tools_image(&profile).await
}

/// `tern-e2e/tools`: echo-server, mesh-client and tcp-greeter from this suite, and redis-server
/// and redis-cli from the machine when installed.
async fn build_tools_image(profile: &Path) -> Result<()> {
    let root = profile.join("images/e2e-tools");
    let mut programs: Vec<(PathBuf, String)> = ["echo-server", "mesh-client", "tcp-greeter"]
        .iter()
        .map(|b| (profile.join(b), format!("/usr/local/bin/{b}")))
        .collect();
    for redis in ["redis-server", "redis-cli"] {
        if let Some(path) = which(redis) {
            programs.push((path, format!("/usr/local/bin/{redis}")));
        }
    }
    let mut script = format!(
        "set -euo pipefail\nrm -rf '{r}'\nmkdir -p '{r}/rootfs/tmp' '{r}/rootfs/etc'\nchmod 1777 '{r}/rootfs/tmp'\n\
         printf 'root:x:0:0::/:/sbin/nologin\\nnobody:x:65534:65534::/:/sbin/nologin\\n' > '{r}/rootfs/etc/passwd'\n",
        r = root.display()
    );
    for (src, dest) in &programs {
        script.push_str(&format!(
            "install -D -m 0755 '{src}' '{r}/rootfs{dest}'\nstrip --strip-all '{r}/rootfs{dest}' || true\n\
             ldd '{src}' | awk '/=> \\//{{print $3}} /^[ \\t]*\\/lib/{{print $1}}' | while read -r lib; do install -D -m 0755 \"$(readlink -f \"$lib\")\" '{r}/rootfs'\"$lib\"; done\n",
            src = src.display(),
            r = root.display(),
        ));
    }
    script.push_str(&format!(
        "printf 'FROM scratch\\nCOPY rootfs/ /\\nUSER 65534:65534\\n' > '{r}/Dockerfile'\n\
         docker build -q -t tern-e2e/tools:latest '{r}' >/dev/null\n",
        r = root.display()
    ));
    let out = tokio::process::Command::new("bash")
        .args(["-c", &script])
        .output()
        .await
        .context("building the tools image")?;
    if !out.status.success() {
        bail!(
            "building tern-e2e/tools failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// A private bridge network, and every container of this run; all removed on drop.
pub struct Cluster {
    pub network: String,
    /// The host side of the bridge, for captures.
    pub bridge: String,
    pub label: String,
    /// 172.N.0: the network's first three octets.
    prefix: [u8; 3],
}

impl Cluster {
    pub async fn create(name: &str) -> Result<Self> {
        let id = std::process::id();
        // A /24 per run from the pid, so concurrent runs do not collide.
        let prefix = [172, 29, (id % 250) as u8 + 1];
        let network = format!("tern-e2e-{name}-{id}");
        let bridge = format!("terne2e{}", id % 100_000);
        let label = format!("tern-e2e={network}");
        let subnet = format!("{}.{}.{}.0/24", prefix[0], prefix[1], prefix[2]);
        let bridge_opt = format!("com.docker.network.bridge.name={bridge}");
        docker(&[
            "network",
            "create",
            "--driver",
            "bridge",
            "--subnet",
            &subnet,
            "--label",
            &label,
            "-o",
            &bridge_opt,
            &network,
        ])
        .await?;
        Ok(Self {
            network,
            bridge,
            label,
            prefix,
        })
    }

    pub fn ip(&self, last: u8) -> Ipv4Addr {
        Ipv4Addr::new(self.prefix[0], self.prefix[1], self.prefix[2], last)
    }

    /// `docker run -d` of a labelled container; returns its name.
    pub async fn run(&self, name: &str, args: &[&str]) -> Result<String> {
        let mut all = vec!["run", "-d", "--name", name, "--label", &self.label];
        all.extend_from_slice(args);
        docker(&all).await?;
        Ok(name.to_string())
    }

    /// `docker run --rm` in the foreground; returns (success, stdout, stderr).
    pub async fn run_once(&self, args: &[&str]) -> Result<(bool, String, String)> {
        let mut all = vec!["run", "--rm", "--label", &self.label];
        all.extend_from_slice(args);
        let out = docker_output(&all).await?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        ))
    }

    /// Everything each container of this run printed, for a failing assertion.
    pub async fn diagnostics(&self) -> String {
        let filter = format!("label={}", self.label);
        let names = docker(&[
            "ps",
            "-a",
            "--filter",
            &filter,
            "--format",
            "{{.Names}} {{.Status}}",
        ])
        .await
        .unwrap_or_default();
        let mut out = vec![format!("containers:\n{names}")];
        for line in names.lines() {
            let name = line.split_whitespace().next().unwrap_or_default();
            if let Ok(o) = docker_output(&["logs", "--tail", "40", name]).await {
                out.push(format!(
                    "--- {name}\n{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                ));
            }
        }
        out.join("\n")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let filter = format!("label={}", self.label);
        let ids = std::process::Command::new("docker")
            .args(["ps", "-aq", "--filter", &filter])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default();
        let ids: Vec<&str> = ids.split_whitespace().collect();
        if !ids.is_empty() {
            let _ = std::process::Command::new("docker")
                .args(["rm", "-f"])
                .args(&ids)
                .output();
        }
        let _ = std::process::Command::new("docker")
            .args(["network", "rm", &self.network])
            .output();
    }
}

/// How long a proxy in a container may take to become ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
