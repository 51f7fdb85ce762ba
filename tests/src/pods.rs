//! Meshed pods on a [`Cluster`], started the way a kubelet starts an injected pod: a pause
//! container holding the network namespace and the pod IP, `tern-init` installing the iptables
//! redirects (it must exit 0), the tern-proxy sidecar (read-only root, no capabilities), then
//! the app. The sidecar's identity comes from a bootstrap token in `tokens/<sa>.token`, checked
//! against the trust anchor in `state/trust-anchor.pem`.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;

use anyhow::{ensure, Context as _, Result};
use serde_json::Value;

use crate::containers::{Cluster, READY_TIMEOUT, VERSION};
use crate::{eventually, http1};

pub fn image(name: &str) -> String {
    format!("tern/{name}:{VERSION}")
}

/// One pod: its pause container's name (the network namespace) and IP.
pub struct Pod {
    pub name: String,
    pub ip: Ipv4Addr,
}

impl Pod {
    /// `--network` value of a container joining this pod.
    pub fn ns(&self) -> String {
        format!("container:{}", self.name)
    }

    /// The sidecar's admin listener.
    pub fn admin(&self) -> SocketAddr {
        SocketAddr::from((self.ip, 4191))
    }

    /// The sum of metric `name`'s samples matching the labels, from the sidecar.
    pub async fn metric(&self, name: &str, matching: &[(&str, &str)]) -> Result<f64> {
        let text = http1::get(self.admin(), "/metrics").await?.text();
        let samples = crate::metrics::parse(&text)?;
        Ok(crate::metrics::sum(&samples, name, matching))
    }

    /// The sidecar's `/config` (needs `TERN_ADMIN_EXPOSE_CONFIG=true`: the test is no loopback peer).
    pub async fn config(&self) -> Result<Value> {
        let rsp = http1::get(self.admin(), "/config").await?;
        ensure!(rsp.status == 200, "/config answered {}", rsp.status);
        serde_json::from_str(&rsp.text()).context("/config is not JSON")
    }
}

pub struct PodSpec<'a> {
    pub name: &'a str,
    pub last_octet: u8,
    pub service: &'a str,
    pub service_account: &'a str,
    /// The app's command in the `tern/demo` image; empty: a pod without an app container.
    pub app: &'a [&'a str],
    /// The ports the app serves, comma-separated; the first is `--inbound-app`'s.
    pub ports: &'a str,
    /// `TERN_CONTROL_PLANE`.
    pub control_plane: &'a str,
    pub extra_env: &'a [&'a str],
    /// `--add-host` entries (`name:ip`) of the pod.
    pub hosts: &'a [&'a str],
    /// More containers sharing the pod: name suffix, then `docker run` arguments (image, command).
    pub sidecars: &'a [(&'a str, &'a [&'a str])],
}

/// Starts the pod and waits for its sidecar's `/ready`.
pub async fn start(c: &Cluster, dir: &Path, spec: &PodSpec<'_>) -> Result<Pod> {
    let pod = Pod {
        name: format!("{}-{}", c.network, spec.name),
        ip: c.ip(spec.last_octet),
    };
    let ip = pod.ip.to_string();
    let mut args = vec!["--network", &c.network, "--ip", &ip];
    let hosts: Vec<String> = spec
        .hosts
        .iter()
        .map(|h| format!("--add-host={h}"))
        .collect();
    args.extend(hosts.iter().map(String::as_str));
    let init_image = image("init");
    args.extend(["--entrypoint", "/usr/local/bin/tern-pause", &init_image]);
    c.run(&pod.name, &args).await?;

    let ns = pod.ns();
    let (ok, out, err) = c
        .run_once(&[
            "--network",
            &ns,
            "--cap-drop",
            "ALL",
            "--cap-add",
            "NET_ADMIN",
            "--cap-add",
            "NET_RAW",
            &init_image,
            "--proxy-uid",
            "2102",
        ])
        .await?;
    ensure!(ok, "tern-init in {} failed:\n{out}\n{err}", spec.name);

    let mut env = vec![
        format!("TERN_SERVICE_NAME={}", spec.service),
        format!("TERN_SERVICE_ACCOUNT={}", spec.service_account),
        format!("TERN_CONTROL_PLANE={}", spec.control_plane),
        "TERN_IDENTITY_TRUST_ANCHORS=/var/lib/tern/trust-anchor.pem".into(),
        format!(
            "TERN_IDENTITY_TOKEN_FILE=/var/run/tern/{}.token",
            spec.service_account
        ),
        "TERN_INBOUND_LISTEN=0.0.0.0:4143".into(),
        "TERN_INBOUND_TRANSPARENT=true".into(),
        format!("TERN_INBOUND_PORTS={}", spec.ports),
        format!(
            "TERN_INBOUND_APP=127.0.0.1:{}",
            spec.ports.split(',').next().unwrap_or("80")
        ),
        "TERN_OUTBOUND_LISTEN=127.0.0.1:4140".into(),
        "TERN_ADMIN_LISTEN=0.0.0.0:4191".into(),
        "TERN_DRAIN_GRACE=5s".into(),
        "TERN_LOG=info".into(),
    ];
    env.extend(spec.extra_env.iter().map(ToString::to_string));
    let state = dir.join("state");
    let tokens = dir.join("tokens");
    let mut args: Vec<String> = vec![
        "--network".into(),
        ns.clone(),
        "--read-only".into(),
        "--cap-drop".into(),
        "ALL".into(),
        "-v".into(),
        format!("{}:/var/lib/tern:ro", state.display()),
        "-v".into(),
        format!("{}:/var/run/tern:ro", tokens.display()),
    ];
    for e in &env {
        args.extend(["-e".into(), e.clone()]);
    }
    args.push(image("proxy"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    c.run(&format!("{}-proxy", pod.name), &args).await?;

    for (suffix, command) in spec.sidecars {
        let mut args = vec!["--network", ns.as_str()];
        args.extend_from_slice(command);
        c.run(&format!("{}-{suffix}", pod.name), &args).await?;
    }
    if !spec.app.is_empty() {
        let demo = image("demo");
        let mut args = vec!["--network", ns.as_str(), demo.as_str()];
        args.extend_from_slice(spec.app);
        c.run(&format!("{}-app", pod.name), &args).await?;
    }
    let admin = pod.admin();
    eventually(READY_TIMEOUT, || async move {
        let status = http1::get(admin, "/ready").await.map(|r| r.status);
        Ok((!matches!(status, Ok(200))).then(|| format!("{admin}/ready: {status:?}")))
    })
    .await
    .with_context(|| format!("the {} pod's sidecar never became ready", spec.name))?;
    Ok(pod)
}

/// loadgen from outside the mesh calling `target` at 40 calls a second for `secs`; returns its
/// JSON summary (`failed`, `by_replica`, ...).
pub async fn load(c: &Cluster, target: &str, secs: u32) -> Result<Value> {
    let duration = format!("{secs}s");
    let (_, out, err) = c
        .run_once(&[
            "--network",
            &c.network,
            &image("demo"),
            "/usr/local/bin/loadgen",
            "--target",
            target,
            "--rate",
            "40",
            "--duration",
            &duration,
        ])
        .await?;
    let last = out.lines().last().unwrap_or_default();
    serde_json::from_str(last).with_context(|| format!("loadgen printed {out:?} {err:?}"))
}

/// Calls that failed in a loadgen summary (all of them when it has no count).
pub fn failed(summary: &Value) -> u64 {
    summary["failed"].as_u64().unwrap_or(u64::MAX)
}

/// [`load`] while tcpdump records the sidecars' inbound port (4143) on the cluster's bridge
/// into `pcap`, for [`ensure_tls_only`].
pub async fn load_captured(c: &Cluster, target: &str, secs: u32, pcap: &Path) -> Result<Value> {
    let mut capture = tokio::process::Command::new("tcpdump")
        .args(["-i", &c.bridge, "-U", "-w"])
        .arg(pcap)
        .args(["tcp", "port", "4143"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting tcpdump")?;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let summary = load(c, target, secs).await;
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(capture.id().unwrap_or(0) as i32),
        nix::sys::signal::Signal::SIGINT,
    );
    let _ = capture.wait().await;
    summary
}

/// The capture holds TLS application data between the sidecars, and never the gRPC method or
/// the HTTP/2 preface in the clear.
pub fn ensure_tls_only(pcap: &Path) -> Result<()> {
    let bytes = std::fs::read(pcap).context("reading the capture")?;
    let contains = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    ensure!(
        bytes.len() > 10_000,
        "the capture is nearly empty ({} bytes)",
        bytes.len()
    );
    ensure!(
        !contains(b"PayService") && !contains(b"PRI * HTTP/2.0"),
        "gRPC in plaintext on the bridge"
    );
    ensure!(
        contains(&[0x17, 0x03, 0x03]),
        "no TLS application data on the bridge"
    );
    Ok(())
}

/// No call failed, and pay-1 and pay-2 answered about half each; their counts.
pub fn ensure_round_robin(summary: &Value) -> Result<(u64, u64)> {
    ensure!(failed(summary) == 0, "calls failed: {summary}");
    let by = |r: &str| summary["by_replica"][r].as_u64().unwrap_or(0);
    let (p1, p2) = (by("pay-1"), by("pay-2"));
    ensure!(
        p1 > 0 && p2 > 0 && p1.abs_diff(p2) <= 2 + (p1 + p2) / 20,
        "not round robin over the pay pods: {summary}"
    );
    Ok((p1, p2))
}
