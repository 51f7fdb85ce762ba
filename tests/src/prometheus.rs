//! A real Prometheus server (Debian's `prometheus`) for tests: its own directory, a free
//! port, a 1 s scrape and rule interval, file-based discovery of the given sidecars with the
//! labels the Kubernetes scrape config's relabelling gives (namespace, pod, app), the rules of
//! `manifests/prometheus/rules.yaml`, and PromQL over its HTTP API.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _, Result};
use serde_json::Value;

use crate::process::{free_addr, Proc};
use crate::{eventually, http1};

pub const PROMETHEUS: &str = "/usr/bin/prometheus";
pub const PROMTOOL: &str = "/usr/bin/promtool";

/// `manifests/prometheus/` of this repository.
pub fn manifests() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/prometheus")
}

/// One scrape target: a sidecar's admin address and the labels Kubernetes would give it.
pub struct Target<'a> {
    pub admin: SocketAddr,
    pub pod: &'a str,
    pub app: &'a str,
}

pub struct Prometheus {
    pub proc: Proc,
    pub addr: SocketAddr,
}

impl Prometheus {
    pub async fn start(dir: &Path, targets: &[Target<'_>]) -> Result<Self> {
        let sd = dir.join("tern-proxies.json");
        std::fs::write(&sd, file_sd(targets).to_string())?;
        let rules = manifests().join("rules.yaml");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files: [{rules:?}]\n\
             scrape_configs:\n  - job_name: tern-proxies\n    metrics_path: /metrics\n    \
             file_sd_configs:\n      - files: [{sd:?}]\n        refresh_interval: 1s\n"
        );
        let config_file = dir.join("prometheus.yml");
        std::fs::write(&config_file, config)?;
        let addr = free_addr()?;
        let args = [
            format!("--config.file={}", config_file.display()),
            format!("--storage.tsdb.path={}", dir.join("tsdb").display()),
            format!("--web.listen-address={addr}"),
            "--log.level=warn".to_string(),
        ];
        let proc = Proc::spawn(dir, "prometheus", Path::new(PROMETHEUS), &args)?;
        let prometheus = Self { proc, addr };
        let ready = eventually(Duration::from_secs(30), || async {
            let r = http1::get(addr, "/-/ready").await?;
            Ok((r.status != 200).then(|| format!("/-/ready answered {}", r.status)))
        })
        .await;
        if let Err(e) = ready {
            bail!(
                "prometheus not ready: {e:#}\n{}",
                prometheus.proc.diagnostics()
            );
        }
        Ok(prometheus)
    }

    /// An instant query at `at` (now if `None`): each result's labels and value.
    pub async fn query(&self, promql: &str, at: Option<SystemTime>) -> Result<Vec<(Value, f64)>> {
        let mut path = format!("/api/v1/query?query={}", encode(promql));
        if let Some(t) = at {
            let secs = t.duration_since(UNIX_EPOCH)?.as_secs_f64();
            path.push_str(&format!("&time={secs:.3}"));
        }
        let r = http1::get(self.addr, &path).await?;
        let body: Value = serde_json::from_slice(&r.body)
            .with_context(|| format!("{promql}: HTTP {} {:?}", r.status, r.body))?;
        if body["status"] != "success" {
            bail!("{promql}: {body}");
        }
        let result = body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        result
            .into_iter()
            .map(|s| {
                let v = s["value"][1]
                    .as_str()
                    .and_then(|v| v.parse::<f64>().ok())
                    .with_context(|| format!("{promql}: bad sample {s}"))?;
                Ok((s["metric"].clone(), v))
            })
            .collect()
    }

    /// The value of a query that must give exactly one series.
    pub async fn one(&self, promql: &str, at: Option<SystemTime>) -> Result<f64> {
        let got = self.query(promql, at).await?;
        match got.as_slice() {
            [(_, v)] => Ok(*v),
            _ => bail!("{promql}: expected one series, got {got:?}"),
        }
    }
}

/// The file_sd document: one group per target, labelled like the Kubernetes relabelling does.
fn file_sd(targets: &[Target<'_>]) -> Value {
    targets
        .iter()
        .map(|t| {
            serde_json::json!({
                "targets": [t.admin.to_string()],
                "labels": {"namespace": "default", "pod": t.pod, "app": t.app},
            })
        })
        .collect()
}

/// Percent-encodes a query parameter (everything but unreserved characters).
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
