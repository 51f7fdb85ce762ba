//! The pay topology run by the control plane: `tern-control` watching a config directory, pay
//! replicas each behind a sidecar that registers them (with a `version` label), and a client
//! sidecar whose `--upstream` port for `pay` has no endpoints of its own: they come only from
//! the control plane. The sidecars have no identity and subscribe in plaintext, which
//! tern-control allows only with [`INSECURE_PLAINTEXT`].

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use nix::sys::signal::Signal;

use crate::control::{ConfigDir, Control, SidecarView, INSECURE_PLAINTEXT};
use crate::demo::{Pay, PAY_SERVICE, PAY_STOP};
use crate::metrics;
use crate::process::{free_addr, TestDir};
use crate::proxy::{Proxy, ProxySpec};
use crate::relay::Relay;

/// The file the tests keep `pay`'s TrafficPolicy in.
pub const POLICY: &str = "pay-traffic.yaml";

/// One pay replica: its name (answered in `PayReply.replica`), its `version` label and the
/// pay app's flags (faults, latency).
#[derive(Clone, Copy, Debug)]
pub struct Replica<'a> {
    pub name: &'a str,
    pub version: &'a str,
    pub flags: &'a [&'a str],
}

impl<'a> Replica<'a> {
    pub fn new(name: &'a str, version: &'a str) -> Self {
        Self {
            name,
            version,
            flags: &[],
        }
    }

    pub fn flags(mut self, flags: &'a [&'a str]) -> Self {
        self.flags = flags;
        self
    }
}

/// How a [`ControlMesh`] is set up beyond its replicas.
#[derive(Clone, Copy, Debug, Default)]
pub struct Setup<'a> {
    /// Extra flags of `tern-control`.
    pub control_args: &'a [&'a str],
    /// Extra flags of the client sidecar.
    pub client_args: &'a [&'a str],
    /// Connect the replicas' sidecars and the client sidecar to the control plane through one
    /// [`Relay`] each, so a test can choose who reaches it first.
    pub relays: bool,
}

/// The relays between the sidecars and the control plane.
pub struct Relays {
    pub replicas: Relay,
    pub client: Relay,
}

/// Fields drop in order: processes stop before their directory goes away.
pub struct ControlMesh {
    pub client: Proxy,
    pub sidecars: Vec<Proxy>,
    pub pays: Vec<Pay>,
    pub control: Control,
    pub relays: Option<Relays>,
    /// The client sidecar's upstream port for `pay`: where the test's calls go.
    pub target: SocketAddr,
    pub config: ConfigDir,
    pub dir: TestDir,
}

impl ControlMesh {
    /// Starts the control plane, then the replicas and their sidecars, then the client sidecar
    /// (flags and relays as `setup` says), and waits until the client sidecar knows every
    /// replica.
    pub async fn start(label: &str, replicas: &[Replica<'_>], setup: &Setup<'_>) -> Result<Self> {
        let dir = TestDir::new(label)?;
        let config = ConfigDir::with_demo_services(dir.path())?;
        // The sidecars here have no identity: these tests are about routing and faults.
        let mut control_args = vec![INSECURE_PLAINTEXT];
        control_args.extend_from_slice(setup.control_args);
        let control = Control::start(dir.path(), "tern-control", &config, &control_args).await?;
        let relays = match setup.relays {
            true => Some(Relays {
                replicas: Relay::start(control.grpc).await?,
                client: Relay::start(control.grpc).await?,
            }),
            false => None,
        };
        let replica_url = match &relays {
            Some(r) => format!("http://{}", r.replicas.addr),
            None => control.url(),
        };
        let mut pays = Vec::with_capacity(replicas.len());
        let mut sidecars = Vec::with_capacity(replicas.len());
        for replica in replicas {
            let (pay, sidecar) = start_replica(&dir, &replica_url, replica).await?;
            pays.push(pay);
            sidecars.push(sidecar);
        }
        let target = free_addr()?;
        let client_url = match &relays {
            Some(r) => format!("http://{}", r.client.addr),
            None => control.url(),
        };
        let spec = ProxySpec::new("client-sidecar", "order")
            .upstream(PAY_SERVICE, target)
            .access_log("off")
            .args(&["--control-plane", &client_url])
            .args(setup.client_args);
        let client = Proxy::start(dir.path(), spec).await?;
        let mesh = Self {
            client,
            sidecars,
            pays,
            control,
            relays,
            target,
            config,
            dir,
        };
        let expected = mesh.replica_addrs();
        mesh.wait_client(Duration::from_secs(5), |view| {
            view.endpoints(PAY_SERVICE) == expected
        })
        .await?;
        Ok(mesh)
    }

    /// The inbound addresses of every replica's sidecar started so far (killed ones included),
    /// sorted as `/config` lists them.
    pub fn replica_addrs(&self) -> Vec<String> {
        let mut addrs: Vec<String> = self
            .sidecars
            .iter()
            .map(|s| s.inbound.to_string())
            .collect();
        addrs.sort();
        addrs
    }

    /// Starts one more replica and its sidecar; returns when the sidecar is ready (it has
    /// registered and applied its first snapshot).
    pub async fn add_replica(&mut self, replica: &Replica<'_>) -> Result<()> {
        let url = match &self.relays {
            Some(r) => format!("http://{}", r.replicas.addr),
            None => self.control.url(),
        };
        let (pay, sidecar) = start_replica(&self.dir, &url, replica).await?;
        self.pays.push(pay);
        self.sidecars.push(sidecar);
        Ok(())
    }

    /// SIGKILLs replica `i`'s sidecar and then its app, and waits until both are gone.
    pub async fn kill_replica(&mut self, i: usize) -> Result<()> {
        let sidecar = self.sidecars.get_mut(i).context("no such sidecar")?;
        sidecar.proc.signal(Signal::SIGKILL)?;
        sidecar.proc.wait_exit(PAY_STOP).await?;
        let pay = self.pays.get_mut(i).context("no such replica")?;
        pay.proc.signal(Signal::SIGKILL)?;
        pay.proc.wait_exit(PAY_STOP).await?;
        Ok(())
    }

    /// The client sidecar's `/config`.
    pub async fn client_view(&self) -> Result<SidecarView> {
        Ok(SidecarView(self.client.config().await?))
    }

    /// Polls the client sidecar's `/config` until `check` accepts it (bounded by `limit`) and
    /// returns that view.
    pub async fn wait_client<F>(&self, limit: Duration, mut check: F) -> Result<SidecarView>
    where
        F: FnMut(&SidecarView) -> bool,
    {
        let deadline = Instant::now() + limit;
        loop {
            let last = match self.client_view().await {
                Ok(view) if check(&view) => return Ok(view),
                Ok(view) => view.summary(PAY_SERVICE),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                bail!("the client sidecar's /config not as expected within {limit:?}; last seen: {last}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Writes `name` into the config directory and waits until the client sidecar applies a
    /// snapshot built from a newer config generation than `before`'s whose `pay` routes are
    /// `routes`. Returns the view and when it was first seen.
    pub async fn push(
        &self,
        name: &str,
        text: &str,
        before: &SidecarView,
        routes: &[&str],
    ) -> Result<(SidecarView, Instant)> {
        let written = Instant::now();
        self.config.write(name, text)?;
        let view = self
            .wait_client(Duration::from_secs(3), |view| {
                view.config_version() > before.config_version()
                    && view.routes(PAY_SERVICE) == routes
            })
            .await
            .with_context(|| format!("pushing {name} with routes {routes:?}"))?;
        let seen = Instant::now();
        eprintln!(
            "{name} written; the client sidecar applied it {:?} later: {}",
            seen - written,
            view.summary(PAY_SERVICE)
        );
        Ok((view, seen))
    }

    /// `name{matching...}` on the client sidecar.
    pub async fn client_metric(&self, name: &str, matching: &[(&str, &str)]) -> Result<f64> {
        self.client.metric(name, matching).await
    }

    /// `tern_endpoints{service="pay"}` on the client sidecar.
    pub async fn client_endpoints_gauge(&self) -> Result<f64> {
        let samples = metrics::parse(&self.client.metrics().await?)?;
        Ok(metrics::sum(
            &samples,
            "tern_endpoints",
            &[("service", PAY_SERVICE)],
        ))
    }

    /// Unwraps a test step's result, or panics with the error and every process's output.
    #[track_caller]
    pub fn ok<T>(&self, result: Result<T>) -> T {
        match result {
            Ok(value) => value,
            Err(e) => panic!("{e:#}\n\n{}", self.diagnostics()),
        }
    }

    /// Everything every process printed, for a failing assertion's message.
    pub fn diagnostics(&self) -> String {
        let mut out = vec![self.control.proc.diagnostics()];
        out.extend(self.pays.iter().map(|p| p.proc.diagnostics()));
        for proxy in self.sidecars.iter().chain([&self.client]) {
            out.push(proxy.proc.diagnostics());
        }
        out.join("\n")
    }
}

/// Starts a pay replica and its sidecar, which subscribes to the control plane at `url`.
async fn start_replica(dir: &TestDir, url: &str, replica: &Replica<'_>) -> Result<(Pay, Proxy)> {
    let mut flags = vec!["--version", replica.version];
    flags.extend_from_slice(replica.flags);
    let pay = Pay::start(dir.path(), replica.name, &flags).await?;
    let label = format!("version={}", replica.version);
    let spec = ProxySpec::new(&format!("{}-sidecar", replica.name), PAY_SERVICE)
        .inbound(pay.addr)
        .access_log("off")
        .args(&["--control-plane", url, "--label", &label]);
    let sidecar = Proxy::start(dir.path(), spec).await?;
    Ok((pay, sidecar))
}

impl Drop for ControlMesh {
    fn drop(&mut self) {
        self.client.proc.begin_stop();
        for proxy in &mut self.sidecars {
            proxy.proc.begin_stop();
        }
        for pay in &mut self.pays {
            pay.proc.begin_stop();
        }
        self.control.proc.begin_stop();
    }
}
