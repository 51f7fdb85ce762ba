//! "Pods" as Linux network namespaces, for the transparent interception tests (root only).
//!
//! A [`Network`] is a bridge inside its own "hub" namespace (so the host's firewall, which may
//! drop bridged or forwarded traffic, never sees pod-to-pod packets) plus a veth into the
//! root namespace whose end there is the gateway, where the test's own processes (tern-control,
//! a server outside the mesh) listen. Each [`Pod`] is a namespace with one `eth0` on the bridge,
//! its own IP and a default route via the gateway; its processes run through `ip netns exec`,
//! the sidecar as UID [`PROXY_UID`] through `setpriv`, as a kubelet would run an injected pod.
//! Dropping the network deletes every namespace it made (and with them their interfaces).
//!
//! The network is dual-stack: besides its IPv4 /24, a /64 of IPv6 unique local addresses
//! (fd74:6e::/32), with the gateway at `::1` and each pod at `::<n>` as well.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{anyhow, bail, Context as _, Result};
use serde_json::Value;

use crate::mtls::MeshCa;
use crate::process::{binary, Proc, START_TIMEOUT};

/// The UID (and GID) the sidecar runs as: what `tern-init` exempts by default.
pub const PROXY_UID: u32 = 2102;

/// What the interception tests need; the first thing missing, if any.
pub fn missing_prerequisite() -> Option<String> {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(str::to_string))
        });
    if uid.as_deref() != Some("0") {
        return Some("the interception tests need root (network namespaces, iptables)".into());
    }
    for tool in [
        "ip",
        "iptables",
        "iptables-save",
        "iptables-legacy",
        "ip6tables",
        "ip6tables-save",
        "ip6tables-legacy",
        "setpriv",
    ] {
        let found = Command::new(tool).arg("--version").output().is_ok();
        if !found {
            return Some(format!(
                "`{tool}` is not installed (iproute2, iptables, util-linux)"
            ));
        }
    }
    None
}

/// Runs `program args...`, failing with its stderr when it fails.
pub fn run(program: &str, args: &[&str]) -> Result<Output> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program} {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// A bridge in a hub namespace, the gateway in the root namespace, and the pods on it.
pub struct Network {
    id: String,
    prefix: [u8; 3],
    namespaces: Vec<String>,
    pods: u8,
}

impl Network {
    /// A new network with a /24 of its own (10.X.Y.0/24, X and Y from the process and a counter).
    pub fn create() -> Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let id = format!("{:x}", (pid % 0x10000) * 16 + n % 16);
        let prefix = [10, 100 + (pid % 100) as u8, (n % 250) as u8 + 1];
        let mut net = Self {
            id,
            prefix,
            namespaces: Vec::new(),
            pods: 0,
        };
        let hub = net.netns("hub")?;
        let root_if = format!("tn{}r", net.id);
        run("ip", &["-n", &hub, "link", "add", "br0", "type", "bridge"])?;
        run("ip", &["-n", &hub, "link", "set", "br0", "up"])?;
        run(
            "ip",
            &[
                "link", "add", &root_if, "type", "veth", "peer", "name", "gw", "netns", &hub,
            ],
        )?;
        run(
            "ip",
            &["-n", &hub, "link", "set", "gw", "master", "br0", "up"],
        )?;
        let gateway = format!("{}/24", net.gateway());
        run("ip", &["addr", "add", &gateway, "dev", &root_if])?;
        let gateway6 = format!("{}/64", net.gateway6());
        run(
            "ip",
            &["-6", "addr", "add", &gateway6, "dev", &root_if, "nodad"],
        )?;
        run("ip", &["link", "set", &root_if, "up"])?;
        Ok(net)
    }

    /// The root namespace's IPv6 address on the network.
    pub fn gateway6(&self) -> Ipv6Addr {
        self.ip6(1)
    }

    /// `fd74:6e:X:Y::n`, X and Y the bytes that make the IPv4 /24 unique.
    fn ip6(&self, n: u16) -> Ipv6Addr {
        let [_, b, c] = self.prefix;
        Ipv6Addr::new(0xfd74, 0x6e, b.into(), c.into(), 0, 0, 0, n)
    }

    /// The root namespace's address on the network (where tern-control listens).
    pub fn gateway(&self) -> Ipv4Addr {
        let [a, b, c] = self.prefix;
        Ipv4Addr::new(a, b, c, 1)
    }

    /// Creates a namespace named after this network and `suffix`, deleted with it.
    pub fn netns(&mut self, suffix: &str) -> Result<String> {
        let name = format!("tern-{}-{suffix}", self.id);
        run("ip", &["netns", "add", &name])?;
        self.namespaces.push(name.clone());
        run("ip", &["-n", &name, "link", "set", "lo", "up"])?;
        Ok(name)
    }

    /// A pod on the bridge, with the next free addresses (IPv4 and IPv6).
    pub fn pod(&mut self, name: &str) -> Result<Pod> {
        self.pod_with(name, true)
    }

    /// A pod with an IPv6 address only (its `ip` is unspecified), like a pod in an IPv6-only
    /// cluster: IPv4 exists only on its loopback.
    pub fn pod_ipv6_only(&mut self, name: &str) -> Result<Pod> {
        self.pod_with(name, false)
    }

    fn pod_with(&mut self, name: &str, ipv4: bool) -> Result<Pod> {
        self.pods += 1;
        let k = self.pods;
        let ns = self.netns(name)?;
        let hub = format!("tern-{}-hub", self.id);
        let (veth, peer) = (format!("tn{}p{k}", self.id), format!("p{k}"));
        run(
            "ip",
            &[
                "link", "add", &veth, "type", "veth", "peer", "name", &peer, "netns", &hub,
            ],
        )?;
        run(
            "ip",
            &["-n", &hub, "link", "set", &peer, "master", "br0", "up"],
        )?;
        run("ip", &["link", "set", &veth, "netns", &ns])?;
        run("ip", &["-n", &ns, "link", "set", &veth, "name", "eth0"])?;
        run("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
        let [a, b, c] = self.prefix;
        let ip = match ipv4 {
            true => Ipv4Addr::new(a, b, c, 1 + k),
            false => Ipv4Addr::UNSPECIFIED,
        };
        if ipv4 {
            let cidr = format!("{ip}/24");
            run("ip", &["-n", &ns, "addr", "add", &cidr, "dev", "eth0"])?;
            let gateway = self.gateway().to_string();
            run(
                "ip",
                &["-n", &ns, "route", "add", "default", "via", &gateway],
            )?;
        }
        // IPv6 too, without duplicate address detection (it would delay the address).
        let ip6 = self.ip6(u16::from(1 + k));
        let cidr6 = format!("{ip6}/64");
        run(
            "ip",
            &[
                "-n", &ns, "-6", "addr", "add", &cidr6, "dev", "eth0", "nodad",
            ],
        )?;
        let gateway6 = self.gateway6().to_string();
        run(
            "ip",
            &["-n", &ns, "-6", "route", "add", "default", "via", &gateway6],
        )?;
        Ok(Pod { ns, ip, ip6 })
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        // Deleting a namespace deletes its interfaces, and a veth takes its peer with it.
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// One pod: a network namespace and its IPv4 and IPv6 addresses.
#[derive(Clone, Debug)]
pub struct Pod {
    pub ns: String,
    pub ip: Ipv4Addr,
    pub ip6: Ipv6Addr,
}

impl Pod {
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.ip, port))
    }

    pub fn addr6(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.ip6, port))
    }

    /// Runs `program args...` in the pod (as root) and waits for it.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<Output> {
        let mut all = vec!["netns", "exec", self.ns.as_str(), program];
        all.extend_from_slice(args);
        Command::new("ip")
            .args(&all)
            .output()
            .with_context(|| format!("running {program} in {}", self.ns))
    }

    /// Like [`Pod::exec`], as UID and GID [`PROXY_UID`].
    pub fn exec_as_proxy(&self, program: &str, args: &[&str]) -> Result<Output> {
        let ids = PROXY_UID.to_string();
        let mut all = vec![
            "--reuid",
            &ids,
            "--regid",
            &ids,
            "--clear-groups",
            "--",
            program,
        ];
        all.extend_from_slice(args);
        self.exec("setpriv", &all)
    }

    /// `iptables-save` (or `ip6tables-save`...) of the nat table without comments and counters:
    /// equal after an idempotent rerun.
    pub fn nat_rules(&self, save: &str) -> Result<String> {
        let out = self.exec(save, &["-t", "nat"])?;
        if !out.status.success() {
            bail!("{save} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| match l.rsplit_once(" [") {
                Some((chain, _)) if l.starts_with(':') => chain.to_string(),
                _ => l.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n"))
    }

    /// Starts a workspace binary in the pod (as the sidecar's UID when `as_proxy`).
    pub fn spawn(
        &self,
        dir: &Path,
        label: &str,
        bin: &str,
        args: &[String],
        as_proxy: bool,
    ) -> Result<Proc> {
        let program = binary(bin)?;
        let mut all: Vec<String> = vec!["netns".into(), "exec".into(), self.ns.clone()];
        if as_proxy {
            let ids = PROXY_UID.to_string();
            all.extend(
                [
                    "setpriv",
                    "--reuid",
                    &ids,
                    "--regid",
                    &ids,
                    "--clear-groups",
                    "--",
                ]
                .map(String::from),
            );
        }
        all.push(program.display().to_string());
        all.extend(args.iter().cloned());
        Proc::spawn(dir, label, Path::new("ip"), &all)
    }

    /// Runs `tern-init ARGS` in the pod (as root); its stdout, or the failure.
    pub fn tern_init(&self, args: &[&str]) -> Result<String> {
        let init = binary("tern-init")?.display().to_string();
        let out = self.exec(&init, args)?;
        if !out.status.success() {
            bail!(
                "tern-init {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The pod's app: runs `mesh-client ARGS` (as root, or as the sidecar's UID) and returns
    /// its JSON report, or the report as an error when it failed.
    pub async fn client(&self, args: &[&str], as_proxy: bool) -> Result<Value> {
        let program = binary("mesh-client")?.display().to_string();
        let pod = self.clone();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let out = tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            match as_proxy {
                true => pod.exec_as_proxy(&program, &args),
                false => pod.exec(&program, &args),
            }
        })
        .await??;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let report: Value = serde_json::from_str(stdout.trim()).with_context(|| {
            format!(
                "mesh-client printed {stdout:?}; stderr {:?}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        if !out.status.success() {
            return Err(anyhow!("mesh-client failed: {report}"));
        }
        Ok(report)
    }

    /// Starts the pod's sidecar as UID [`PROXY_UID`] with the identity of service account `sa`,
    /// subscribed to `ca`'s control plane, its admin port on the pod IP (4191); waits until
    /// it is ready.
    pub async fn sidecar(&self, dir: &Path, ca: &MeshCa, sa: &str, extra: &[&str]) -> Result<Proc> {
        let anchors = readable_copy(dir, &ca.anchors, "anchors.pem")?;
        let token = readable_copy(dir, &ca.token_file(sa)?, &format!("{sa}.token"))?;
        let url = format!("https://{}", ca.grpc());
        let mut args: Vec<String> = [
            "--service-name",
            sa,
            "--control-plane",
            &url,
            "--identity-server",
            &url,
            "--identity-trust-anchors",
            &anchors,
            "--identity-token-file",
            &token,
            "--service-account",
            sa,
            "--admin-listen",
            "0.0.0.0:4191",
        ]
        .map(String::from)
        .to_vec();
        args.extend(extra.iter().map(|a| a.to_string()));
        let mut proc = self.spawn(dir, &format!("proxy-{sa}"), "tern-proxy", &args, true)?;
        proc.wait_for_line("tern-proxy ready: ", START_TIMEOUT)
            .await?;
        Ok(proc)
    }

    /// Waits (5s at most) until [`Pod::metric`] is `want`: a connection's numbers are
    /// recorded when the sidecar has finished with it, a moment after the app has.
    pub async fn expect_metric(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        want: f64,
    ) -> Result<()> {
        crate::eventually(std::time::Duration::from_secs(5), || async {
            let n = self.metric(name, labels).await?;
            Ok((n != want).then(|| format!("{name} {labels:?} = {n}, want {want}")))
        })
        .await
    }

    /// The sidecar's `GET /config`, asked from the pod's own loopback: the only peer it answers
    /// without `--admin-expose-config`.
    pub async fn local_config(&self) -> Result<String> {
        let url = "http://127.0.0.1:4191/config";
        let out = self.exec("curl", &["-sS", "--fail", "--max-time", "5", url])?;
        if !out.status.success() {
            return Err(anyhow!(
                "curl {url} in {}: {}",
                self.ns,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The sidecar's admin port (4191), on the pod's IPv4 address, or its IPv6 one in an
    /// IPv6-only pod.
    pub fn admin(&self) -> SocketAddr {
        match self.ip.is_unspecified() {
            true => self.addr6(4191),
            false => self.addr(4191),
        }
    }

    /// The sum of the samples of `name` with `labels` on the sidecar's admin port (4191).
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        let text = crate::http1::get(self.admin(), "/metrics").await?.text();
        Ok(crate::metrics::sum(
            &crate::metrics::parse(&text)?,
            name,
            labels,
        ))
    }
}

/// A copy of `from` that a sidecar running as UID [`PROXY_UID`] can read (the test directory
/// itself may not be), in `dir/pods/`.
pub fn readable_copy(dir: &Path, from: &Path, name: &str) -> Result<String> {
    let pods = dir.join("pods");
    std::fs::create_dir_all(&pods)?;
    std::fs::set_permissions(&pods, std::fs::Permissions::from_mode(0o755))?;
    let to = pods.join(name);
    std::fs::copy(from, &to).with_context(|| format!("copying {}", from.display()))?;
    std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o644))?;
    Ok(to.display().to_string())
}

/// Runs `mesh-client ARGS` in the root namespace: a client outside the mesh.
pub fn host_client(args: &[&str]) -> Result<Value> {
    let out = Command::new(binary("mesh-client")?)
        .args(args)
        .output()
        .context("running mesh-client")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(stdout.trim())
        .with_context(|| format!("mesh-client printed {stdout:?}"))?;
    match out.status.success() {
        true => Ok(report),
        false => Err(anyhow!("mesh-client failed: {report}")),
    }
}

/// The first access-log line in `stdout` (a sidecar's output) with `protocol` and `direction`.
pub fn log_line(stdout: &Path, protocol: &str, direction: &str) -> Result<Value> {
    let text = std::fs::read_to_string(stdout)?;
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["protocol"] == protocol && v["direction"] == direction)
        .ok_or_else(|| anyhow!("no {direction} {protocol} line in {text}"))
}
