//! The pay topology the resilience tests share: every pay replica behind its own inbound
//! sidecar, one client sidecar in front whose `--upstream` port for `pay` balances over the pay
//! sidecars, optionally with `order` behind the client sidecar as in the demo.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, Result};
use nix::sys::signal::Signal;

use crate::demo::{Order, Pay, PayCounts, PAY_SERVICE, PAY_STOP};
use crate::process::{free_addr, TestDir};
use crate::proxy::{Proxy, ProxySpec};

/// Pay replicas each behind an inbound sidecar; a client sidecar with an `--upstream` port for
/// `pay` whose static endpoints are the pay sidecars. Optionally `order` sits behind the client
/// sidecar, which is then order's own sidecar: loadgen → its inbound port → order → its `pay`
/// port → the pay sidecars, the demo's chain.
///
/// Fields drop in order: processes stop before their log directory goes away.
pub struct PayMesh {
    pub client: Proxy,
    pub order: Option<Order>,
    pub sidecars: Vec<Proxy>,
    pub pays: Vec<Pay>,
    /// The client sidecar's upstream port for `pay`: where the test's calls go.
    pub target: SocketAddr,
    pub dir: TestDir,
}

/// How a [`PayMesh`] is set up beyond its replicas.
#[derive(Clone, Debug)]
pub struct MeshOptions<'a> {
    /// Extra flags of the client sidecar (retry, timeout and accrual settings).
    pub client_args: &'a [&'a str],
    /// More `pay` endpoints the client sidecar is given beyond the pay sidecars started with
    /// the mesh: where a replica started later will listen.
    pub spare_endpoints: &'a [SocketAddr],
    /// Put `order` behind the client sidecar.
    pub order: bool,
    /// The pay sidecars' `--drain-grace`.
    pub sidecar_grace: Duration,
}

impl Default for MeshOptions<'_> {
    fn default() -> Self {
        Self {
            client_args: &[],
            spare_endpoints: &[],
            order: false,
            sidecar_grace: Duration::from_secs(1),
        }
    }
}

impl PayMesh {
    /// `replicas`: each pay replica's name and flags; `client_args`: extra flags of the client
    /// sidecar.
    pub async fn start(
        label: &str,
        replicas: &[(&str, &[&str])],
        client_args: &[&str],
    ) -> Result<Self> {
        let options = MeshOptions {
            client_args,
            ..MeshOptions::default()
        };
        Self::start_with(label, replicas, &options).await
    }

    pub async fn start_with(
        label: &str,
        replicas: &[(&str, &[&str])],
        options: &MeshOptions<'_>,
    ) -> Result<Self> {
        let dir = TestDir::new(label)?;
        let mut pays = Vec::with_capacity(replicas.len());
        let mut sidecars = Vec::with_capacity(replicas.len());
        for (name, flags) in replicas {
            let pay = Pay::start(dir.path(), name, flags).await?;
            let spec = ProxySpec::new(&format!("{name}-sidecar"), PAY_SERVICE)
                .inbound(pay.addr)
                .drain_grace(options.sidecar_grace);
            sidecars.push(Proxy::start(dir.path(), spec).await?);
            pays.push(pay);
        }
        let mut endpoints: Vec<SocketAddr> = sidecars.iter().map(|p| p.inbound).collect();
        endpoints.extend_from_slice(options.spare_endpoints);
        let target = free_addr()?;
        let order = match options.order {
            true => Some(Order::start(dir.path(), target).await?),
            false => None,
        };
        let (label, service) = match &order {
            Some(_) => ("order-sidecar", "order"),
            None => ("client-sidecar", "client"),
        };
        let mut spec = ProxySpec::new(label, service)
            .upstream(PAY_SERVICE, target)
            .endpoints(PAY_SERVICE, &endpoints);
        if let Some(order) = &order {
            spec = spec.inbound(order.addr);
        }
        spec.extra_args = options
            .client_args
            .iter()
            .map(ToString::to_string)
            .collect();
        let client = Proxy::start(dir.path(), spec).await?;
        Ok(Self {
            client,
            order,
            sidecars,
            pays,
            target,
            dir,
        })
    }

    /// Starts one more replica; its sidecar listens on `inbound` (one of the spare endpoints).
    pub async fn add_replica(
        &mut self,
        name: &str,
        flags: &[&str],
        inbound: SocketAddr,
        grace: Duration,
    ) -> Result<()> {
        let pay = Pay::start(self.dir.path(), name, flags).await?;
        let spec = ProxySpec::new(&format!("{name}-sidecar"), PAY_SERVICE)
            .inbound(pay.addr)
            .inbound_listen(inbound)
            .drain_grace(grace);
        self.sidecars
            .push(Proxy::start(self.dir.path(), spec).await?);
        self.pays.push(pay);
        Ok(())
    }

    /// SIGKILLs replica `i`'s sidecar and then its app, and waits until both are gone.
    pub async fn kill_replica(&mut self, i: usize) -> Result<()> {
        let sidecar = self.sidecars.get_mut(i).context("no such sidecar")?;
        sidecar.proc.signal(Signal::SIGKILL)?;
        let pay = self.pays.get_mut(i).context("no such replica")?;
        pay.proc.signal(Signal::SIGKILL)?;
        pay.proc.wait_exit(PAY_STOP).await?;
        let sidecar = self.sidecars.get_mut(i).context("no such sidecar")?;
        sidecar.proc.wait_exit(PAY_STOP).await?;
        Ok(())
    }

    /// Starts replica `i` again, app and sidecar on the addresses they had, with the same flags.
    pub async fn restart_replica(&mut self, i: usize) -> Result<()> {
        let old = self.pays.get(i).context("no such replica")?;
        let (replica, addr, flags) = (old.replica.clone(), old.addr, old.flags.clone());
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let label = format!("{replica}-restarted");
        let pay = Pay::start_on(self.dir.path(), &label, &replica, addr, &flags).await?;
        let old_sidecar = self.sidecars.get(i).context("no such sidecar")?;
        let mut spec = old_sidecar.spec.clone();
        spec.label = format!("{replica}-sidecar-restarted");
        spec.inbound_listen = Some(old_sidecar.inbound);
        let sidecar = Proxy::start(self.dir.path(), spec).await?;
        self.pays[i] = pay;
        self.sidecars[i] = sidecar;
        Ok(())
    }

    /// `name{service="pay", matching...}` on the client sidecar.
    pub async fn client_metric(&self, name: &str, matching: &[(&str, &str)]) -> Result<f64> {
        let mut labels = vec![("service", PAY_SERVICE)];
        labels.extend_from_slice(matching);
        self.client.metric(name, &labels).await
    }

    /// Stops every pay replica (they drain their calls) and returns their counts in order.
    pub async fn stop_pays(&mut self) -> Result<Vec<PayCounts>> {
        for pay in &mut self.pays {
            pay.proc.begin_stop();
        }
        let mut counts = Vec::with_capacity(self.pays.len());
        for pay in &mut self.pays {
            counts.push(pay.stop().await?);
        }
        Ok(counts)
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
        let mut out: Vec<String> = self.pays.iter().map(|p| p.proc.diagnostics()).collect();
        out.extend(self.order.iter().map(|o| o.proc.diagnostics()));
        for proxy in self.sidecars.iter().chain([&self.client]) {
            out.push(proxy.proc.diagnostics());
        }
        out.join("\n")
    }
}

impl Drop for PayMesh {
    fn drop(&mut self) {
        self.client.proc.begin_stop();
        if let Some(order) = &mut self.order {
            order.proc.begin_stop();
        }
        for proxy in &mut self.sidecars {
            proxy.proc.begin_stop();
        }
        for pay in &mut self.pays {
            pay.proc.begin_stop();
        }
    }
}
