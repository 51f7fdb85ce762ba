//! `tern-control` as a test process: its config directory, the guard that starts it and reads
//! its ready line, its admin endpoints, and what a sidecar's `/config` says about the snapshot
//! it applied.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use nix::sys::signal::Signal;
use serde_json::Value;

use crate::http1;
use crate::process::{binary, repo_root, Proc, START_TIMEOUT};

const CONTROL_READY: &str = "tern-control ready: ";

/// The dev-only flag that lets sidecars without a client certificate subscribe: for the tests
/// about routing, policies and faults, whose sidecars speak plaintext. Who may subscribe is
/// tested in `tests/zero_trust.rs`, without it.
pub const INSECURE_PLAINTEXT: &str = "--insecure-plaintext-subscribers";
/// How long a SIGKILLed control plane may take to be gone.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);

/// A directory of mesh config YAML that `tern-control` watches.
#[derive(Clone, Debug)]
pub struct ConfigDir {
    path: PathBuf,
}

impl ConfigDir {
    /// Creates `parent/mesh/` holding a copy of the demo's `services.yaml` (the `pay` and
    /// `order` Services, no policies) without their declared identities: tern-control lets only
    /// a sidecar with a client certificate for a Service's declared identity register an
    /// endpoint for it, and the sidecars these tests start have none (they subscribe in
    /// plaintext, under [`INSECURE_PLAINTEXT`]).
    pub fn with_demo_services(parent: &Path) -> Result<Self> {
        let text = demo_services()?;
        let text: Vec<&str> = text
            .lines()
            .filter(|l| !l.trim_start().starts_with("identity:"))
            .collect();
        Self::with_services(parent, &(text.join("\n") + "\n"))
    }

    /// Creates `parent/mesh/` holding `services` as `services.yaml`.
    pub fn with_services(parent: &Path, services: &str) -> Result<Self> {
        let path = parent.join("mesh");
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        let dir = Self { path };
        dir.write("services.yaml", services)?;
        Ok(dir)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Replaces (or creates) `name` atomically: the text goes to a hidden temporary file, which
    /// is then renamed over `name`, so the watcher never reads a half-written document.
    pub fn write(&self, name: &str, text: &str) -> Result<()> {
        let tmp = self.path.join(format!(".{name}.tmp"));
        let dest = self.path.join(name);
        std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &dest)
            .with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))
    }

    pub fn remove(&self, name: &str) -> Result<()> {
        let file = self.path.join(name);
        std::fs::remove_file(&file).with_context(|| format!("removing {}", file.display()))
    }
}

/// The demo's `services.yaml` as it is (`pay` and `order`, each declaring its identity).
pub fn demo_services() -> Result<String> {
    let services = repo_root().join("control/examples/mesh/services.yaml");
    std::fs::read_to_string(&services).with_context(|| format!("reading {}", services.display()))
}

/// A TrafficPolicy document for `pay` (named `pay`, namespace `default`) whose `spec` is
/// `service: pay` followed by `spec` (YAML indented by two spaces, as under `spec:`).
pub fn pay_policy(spec: &str) -> String {
    format!(
        "apiVersion: tern.dev/v1alpha1\nkind: TrafficPolicy\nmetadata:\n  name: pay\n  \
         namespace: default\nspec:\n  service: pay\n{spec}"
    )
}

/// A running `tern-control`.
pub struct Control {
    pub proc: Proc,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    pub config_dir: ConfigDir,
    /// The extra flags it was started with, for a restart.
    pub extra_args: Vec<String>,
    /// Its `--state-dir`: the generated CA and token key, kept across restarts.
    pub state_dir: PathBuf,
}

impl Control {
    /// Starts `tern-control --config-dir DIR` with both listeners on free ports (port 0) and
    /// waits for its ready line.
    pub async fn start(
        dir: &Path,
        label: &str,
        config_dir: &ConfigDir,
        extra_args: &[&str],
    ) -> Result<Self> {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        let extra: Vec<String> = extra_args.iter().map(ToString::to_string).collect();
        Self::start_on(dir, label, config_dir, any, &extra).await
    }

    /// Like [`Control::start`] with the gRPC listener on `grpc` (a restart on the same port).
    /// Unless `extra_args` name a `--state-dir`, the CA and token key go to
    /// `dir/control-state`, which a restart in the same directory reuses.
    pub async fn start_on(
        dir: &Path,
        label: &str,
        config_dir: &ConfigDir,
        grpc: SocketAddr,
        extra_args: &[String],
    ) -> Result<Self> {
        Self::start_with_env(dir, label, config_dir, grpc, extra_args, &[]).await
    }

    /// Like [`Control::start_on`], with `env` set in its environment (`KUBECONFIG`, say).
    pub async fn start_with_env(
        dir: &Path,
        label: &str,
        config_dir: &ConfigDir,
        grpc: SocketAddr,
        extra_args: &[String],
        env: &[(&str, String)],
    ) -> Result<Self> {
        let state_dir = match arg_value(extra_args, "--state-dir") {
            Some(given) => PathBuf::from(given),
            None => dir.join("control-state"),
        };
        let mut args = vec![
            "--config-dir".to_string(),
            config_dir.path().display().to_string(),
            "--grpc-listen".to_string(),
            grpc.to_string(),
            "--worker-threads".to_string(),
            "1".to_string(),
        ];
        if arg_value(extra_args, "--admin-listen").is_none() {
            args.push("--admin-listen".to_string());
            args.push("127.0.0.1:0".to_string());
        }
        if arg_value(extra_args, "--state-dir").is_none() {
            args.push("--state-dir".to_string());
            args.push(state_dir.display().to_string());
        }
        args.extend(extra_args.iter().cloned());
        let mut proc = Proc::spawn_with_env(dir, label, &binary("tern-control")?, &args, env)?;
        let rest = proc.wait_for_line(CONTROL_READY, START_TIMEOUT).await?;
        let (grpc, admin) =
            parse_ready(&rest).with_context(|| format!("{label} ready line {rest:?}"))?;
        Ok(Self {
            proc,
            grpc,
            admin,
            config_dir: config_dir.clone(),
            extra_args: extra_args.to_vec(),
            state_dir,
        })
    }

    /// The trust anchor tern-control generated in its state directory: what clients trust.
    pub fn trust_anchor(&self) -> PathBuf {
        self.state_dir.join("trust-anchor.pem")
    }

    /// Starts another `tern-control` on this one's gRPC address, config directory and flags
    /// (this one must be gone).
    pub async fn restart(&self, dir: &Path, label: &str) -> Result<Self> {
        Self::start_on(dir, label, &self.config_dir, self.grpc, &self.extra_args).await
    }

    /// What a sidecar's `--control-plane` is given.
    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// SIGKILL, and wait until the process is gone.
    pub async fn kill(&mut self) -> Result<()> {
        self.proc.signal(Signal::SIGKILL)?;
        self.proc.wait_exit(KILL_TIMEOUT).await?;
        Ok(())
    }

    async fn get(&self, path: &str) -> Result<String> {
        let response = http1::get(self.admin, path)
            .await
            .with_context(|| format!("GET {path} on {}", self.proc.label()))?;
        if response.status != 200 {
            bail!(
                "{} {path} answered {}: {}",
                self.proc.label(),
                response.status,
                response.text()
            );
        }
        Ok(response.text())
    }

    /// The sum of the samples of `name` whose labels include every pair in `matching`.
    pub async fn metric(&self, name: &str, matching: &[(&str, &str)]) -> Result<f64> {
        let samples = crate::metrics::parse(&self.get("/metrics").await?)?;
        Ok(crate::metrics::sum(&samples, name, matching))
    }

    /// `GET /state` as JSON.
    pub async fn state(&self) -> Result<Value> {
        let text = self.get("/state").await?;
        serde_json::from_str(&text).with_context(|| format!("/state is not JSON: {text}"))
    }
}

/// The value of a `FLAG VALUE` or `FLAG=VALUE` among `args`.
fn arg_value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == flag {
            return it.next().map(String::as_str);
        }
        if let Some(v) = a.strip_prefix(flag).and_then(|v| v.strip_prefix('=')) {
            return Some(v);
        }
    }
    None
}

/// Reads `grpc=ADDR admin=ADDR`.
fn parse_ready(rest: &str) -> Result<(SocketAddr, SocketAddr)> {
    let mut grpc = None;
    let mut admin = None;
    for field in rest.split_whitespace() {
        match field.split_once('=') {
            Some(("grpc", a)) => grpc = Some(a.parse().context("grpc address")?),
            Some(("admin", a)) => admin = Some(a.parse().context("admin address")?),
            _ => {}
        }
    }
    match (grpc, admin) {
        (Some(g), Some(a)) => Ok((g, a)),
        _ => bail!("no grpc= and admin= addresses"),
    }
}

/// A sidecar's `/config`, read for what it says about the control plane's snapshot.
#[derive(Clone, Debug)]
pub struct SidecarView(pub Value);

impl SidecarView {
    /// The snapshot version in force; `None` while only the bootstrap config is.
    pub fn version(&self) -> Option<u64> {
        self.0["version"].as_u64()
    }

    fn applied(&self) -> &Value {
        &self.0["control_plane"]["applied"]
    }

    /// The mesh config generation the snapshot in force was built from.
    pub fn config_version(&self) -> Option<u64> {
        self.applied()["config_version"].as_u64()
    }

    /// When the snapshot in force was applied (changes with every snapshot applied, even one
    /// whose version number happens to repeat an earlier one).
    pub fn applied_at(&self) -> Option<&str> {
        self.applied()["applied_at"].as_str()
    }

    pub fn connected(&self) -> bool {
        self.0["control_plane"]["connected"] == true
    }

    pub fn service(&self, name: &str) -> Option<&Value> {
        self.0["services"]
            .as_array()?
            .iter()
            .find(|s| s["name"] == name)
    }

    /// The addresses of `service`'s endpoints, sorted.
    pub fn endpoints(&self, service: &str) -> Vec<String> {
        let mut out: Vec<String> = self
            .service(service)
            .and_then(|s| s["endpoints"].as_array())
            .map(|list| {
                list.iter()
                    .filter_map(|e| e["address"].as_str().map(ToString::to_string))
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    }

    /// The names of `service`'s route rules, in order.
    pub fn routes(&self, service: &str) -> Vec<String> {
        self.service(service)
            .and_then(|s| s["routes"]["rules"].as_array())
            .map(|rules| {
                rules
                    .iter()
                    .filter_map(|r| r["name"].as_str().map(ToString::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn load_balancer(&self, service: &str) -> Option<String> {
        self.service(service)
            .and_then(|s| s["load_balancer"].as_str())
            .map(ToString::to_string)
    }

    /// A one-line summary for messages.
    pub fn summary(&self, service: &str) -> String {
        format!(
            "version {:?}, config_version {:?}, connected {}, {service}: endpoints {:?} from {}, \
             routes {:?}, balancer {:?}, last_error {}",
            self.version(),
            self.config_version(),
            self.connected(),
            self.endpoints(service),
            self.service(service)
                .map(|s| s["endpoints_from"].to_string())
                .unwrap_or_default(),
            self.routes(service),
            self.load_balancer(service),
            self.0["control_plane"]["last_error"]
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn reads_the_ready_line() {
        let (g, a) = parse_ready("grpc=127.0.0.1:8090 admin=127.0.0.1:9990").unwrap();
        assert_eq!(g.port(), 8090);
        assert_eq!(a.port(), 9990);
        assert!(parse_ready("grpc=127.0.0.1:8090").is_err());
    }

    #[test]
    fn finds_a_given_state_dir() {
        let args = |a: &[&str]| a.iter().map(ToString::to_string).collect::<Vec<_>>();
        let flag = "--state-dir";
        assert_eq!(arg_value(&args(&["--x", "1"]), flag), None);
        assert_eq!(arg_value(&args(&["--state-dir", "/s"]), flag), Some("/s"));
        assert_eq!(arg_value(&args(&["--state-dir=/t"]), flag), Some("/t"));
        assert_eq!(arg_value(&args(&["--state-dirx=/t"]), flag), None);
    }

    #[test]
    fn demo_services_lose_their_identities() {
        let dir = tempfile::tempdir().unwrap();
        let config = ConfigDir::with_demo_services(dir.path()).unwrap();
        let text = std::fs::read_to_string(config.path().join("services.yaml")).unwrap();
        assert!(text.contains("name: pay") && text.contains("name: order"));
        assert!(!text.contains("identity: spiffe://"), "{text}");
        assert!(demo_services().unwrap().contains("identity: spiffe://"));
    }

    #[test]
    fn reads_a_sidecar_config() {
        let view = SidecarView(serde_json::json!({
            "version": 7,
            "control_plane": {"connected": true, "applied": {"version": 7, "config_version": 2}},
            "services": [{"name": "pay", "load_balancer": "p2c_ewma",
                "endpoints": [{"address": "127.0.0.1:2"}, {"address": "127.0.0.1:1"}],
                "routes": {"rules": [{"name": "split"}, {"name": "default"}]}}]
        }));
        assert_eq!(view.version(), Some(7));
        assert_eq!(view.config_version(), Some(2));
        assert!(view.connected());
        assert_eq!(view.endpoints("pay"), ["127.0.0.1:1", "127.0.0.1:2"]);
        assert_eq!(view.routes("pay"), ["split", "default"]);
        assert_eq!(view.load_balancer("pay").as_deref(), Some("p2c_ewma"));
        let bootstrap = SidecarView(serde_json::json!({"version": "bootstrap"}));
        assert_eq!(bootstrap.version(), None);
    }
}
