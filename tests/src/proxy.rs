//! A `tern-proxy` sidecar started for a test, configured only through its documented flags.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use crate::http1;
use crate::process::{binary, free_addr, Proc, START_TIMEOUT};

/// What a test wants from one sidecar. Ports left unset are picked free at start.
#[derive(Clone, Debug)]
pub struct ProxySpec {
    pub label: String,
    pub service_name: String,
    /// The local app; gives the sidecar an inbound listener.
    pub inbound_app: Option<SocketAddr>,
    pub inbound_listen: Option<SocketAddr>,
    /// `--upstream NAME=ADDR`: connections accepted on ADDR go to service NAME.
    pub upstreams: Vec<(String, SocketAddr)>,
    /// `--endpoints NAME=ADDR,...`: static endpoints.
    pub endpoints: Vec<(String, Vec<SocketAddr>)>,
    pub drain_grace: Duration,
    /// `--access-log`: `stdout` unless a test turns it off to save CPU under heavy load.
    pub access_log: String,
    pub extra_args: Vec<String>,
}

impl ProxySpec {
    pub fn new(label: &str, service_name: &str) -> Self {
        Self {
            label: label.to_string(),
            service_name: service_name.to_string(),
            inbound_app: None,
            inbound_listen: None,
            upstreams: Vec::new(),
            endpoints: Vec::new(),
            // Short, so that tearing a test down never waits long on a drain.
            drain_grace: Duration::from_secs(1),
            access_log: "stdout".to_string(),
            extra_args: Vec::new(),
        }
    }

    /// An inbound sidecar in front of `app`.
    pub fn inbound(mut self, app: SocketAddr) -> Self {
        self.inbound_app = Some(app);
        self
    }

    pub fn inbound_listen(mut self, addr: SocketAddr) -> Self {
        self.inbound_listen = Some(addr);
        self
    }

    pub fn upstream(mut self, service: &str, listen: SocketAddr) -> Self {
        self.upstreams.push((service.to_string(), listen));
        self
    }

    pub fn endpoints(mut self, service: &str, addrs: &[SocketAddr]) -> Self {
        self.endpoints.push((service.to_string(), addrs.to_vec()));
        self
    }

    pub fn drain_grace(mut self, grace: Duration) -> Self {
        self.drain_grace = grace;
        self
    }

    pub fn access_log(mut self, target: &str) -> Self {
        self.access_log = target.to_string();
        self
    }

    /// Appends flags to the command line.
    pub fn args(mut self, args: &[&str]) -> Self {
        self.extra_args.extend(args.iter().map(ToString::to_string));
        self
    }
}

/// A running sidecar and the addresses of its listeners.
pub struct Proxy {
    pub proc: Proc,
    pub inbound: SocketAddr,
    pub outbound: SocketAddr,
    pub admin: SocketAddr,
    pub spec: ProxySpec,
}

impl Proxy {
    /// Starts the sidecar and waits until its admin `/ready` answers 200.
    ///
    /// Ports are probed free and then bound by the proxy, so another process can win the race;
    /// a start that fails with "address in use" is retried on new ports.
    pub async fn start(dir: &Path, spec: ProxySpec) -> Result<Self> {
        let mut last_error = None;
        for attempt in 0..3 {
            match Self::start_once(dir, &spec, attempt).await {
                Ok(proxy) => return Ok(proxy),
                Err(e) if format!("{e:#}").to_lowercase().contains("in use") => {
                    last_error = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        match last_error {
            Some(e) => Err(e),
            None => bail!("{} did not start", spec.label),
        }
    }

    async fn start_once(dir: &Path, spec: &ProxySpec, attempt: u32) -> Result<Self> {
        let program = binary("tern-proxy")?;
        let inbound = match spec.inbound_listen {
            Some(addr) => addr,
            None => free_addr()?,
        };
        let outbound = free_addr()?;
        let admin = free_addr()?;
        let mut args = vec![
            "--service-name".to_string(),
            spec.service_name.clone(),
            "--inbound-listen".to_string(),
            inbound.to_string(),
            "--outbound-listen".to_string(),
            outbound.to_string(),
            "--admin-listen".to_string(),
            admin.to_string(),
            "--drain-grace".to_string(),
            format!("{}ms", spec.drain_grace.as_millis()),
            "--access-log".to_string(),
            spec.access_log.clone(),
            "--log".to_string(),
            "info".to_string(),
        ];
        if let Some(app) = spec.inbound_app {
            args.push("--inbound-app".to_string());
            args.push(app.to_string());
        }
        for (service, listen) in &spec.upstreams {
            args.push("--upstream".to_string());
            args.push(format!("{service}={listen}"));
        }
        for (service, addrs) in &spec.endpoints {
            let list: Vec<String> = addrs.iter().map(ToString::to_string).collect();
            args.push("--endpoints".to_string());
            args.push(format!("{service}={}", list.join(",")));
        }
        args.extend(spec.extra_args.iter().cloned());
        let label = if attempt == 0 {
            spec.label.clone()
        } else {
            format!("{}-retry{attempt}", spec.label)
        };
        let mut proc = Proc::spawn(dir, &label, &program, &args)?;
        wait_ready(&mut proc, admin).await?;
        Ok(Self {
            proc,
            inbound,
            outbound,
            admin,
            spec: spec.clone(),
        })
    }

    /// The listen address of the `--upstream` port for `service`.
    pub fn upstream(&self, service: &str) -> Result<SocketAddr> {
        self.spec
            .upstreams
            .iter()
            .find(|(name, _)| name == service)
            .map(|(_, addr)| *addr)
            .with_context(|| format!("{} has no upstream port for {service}", self.spec.label))
    }

    /// The Prometheus text of `GET /metrics` on the admin port.
    pub async fn metrics(&self) -> Result<String> {
        let response = http1::get(self.admin, "/metrics")
            .await
            .with_context(|| format!("scraping {} /metrics", self.spec.label))?;
        if response.status != 200 {
            bail!(
                "{} /metrics answered {}: {}",
                self.spec.label,
                response.status,
                response.text()
            );
        }
        Ok(response.text())
    }

    /// The JSON of `GET /config` on the admin port.
    pub async fn config(&self) -> Result<serde_json::Value> {
        let response = http1::get(self.admin, "/config")
            .await
            .with_context(|| format!("reading {} /config", self.spec.label))?;
        if response.status != 200 {
            bail!(
                "{} /config answered {}: {}",
                self.spec.label,
                response.status,
                response.text()
            );
        }
        serde_json::from_slice(&response.body).with_context(|| {
            format!(
                "{} /config is not JSON: {}",
                self.spec.label,
                response.text()
            )
        })
    }

    /// The sum of the samples of `name` whose labels include every pair in `matching`, read
    /// from `/metrics` now (0 when there is no such sample yet).
    pub async fn metric(&self, name: &str, matching: &[(&str, &str)]) -> Result<f64> {
        let samples = crate::metrics::parse(&self.metrics().await?)?;
        Ok(crate::metrics::sum(&samples, name, matching))
    }
}

async fn wait_ready(proc: &mut Proc, admin: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(status) = proc.try_status()? {
            bail!(
                "{} exited ({status}) before becoming ready\n{}",
                proc.label(),
                proc.diagnostics()
            );
        }
        let last = match http1::get(admin, "/ready").await {
            Ok(response) if response.status == 200 => return Ok(()),
            Ok(response) => format!("/ready answered {}", response.status),
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() >= deadline {
            bail!(
                "{} not ready on {admin} within {START_TIMEOUT:?} ({last})\n{}",
                proc.label(),
                proc.diagnostics()
            );
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
