//! Inbound: mesh traffic for the local app.
//!
//! The app is a target with one static endpoint, so inbound requests go
//! through the same stack (metrics, access log, pooled connections) as
//! outbound ones. The caller's sidecar owns retries, so the local hop makes
//! one attempt and never ejects the app.
//!
//! With transparent interception the app may listen on several ports: a
//! connection iptables redirected here, a request whose caller named the
//! port it dialed ([`crate::router::DST_PORT`]) or an opaque connection's
//! header names the port. [`AppPorts`] forwards only to the ports the app
//! serves (`--inbound-ports` and `--inbound-app`'s) and refuses the others,
//! the sidecar's own among them; and it forwards to the address the
//! connection came in on (the pod IP), never to loopback, so that a listener
//! the app bound to 127.0.0.1 (a debug or admin server) stays private, as it
//! is without the mesh. `--inbound-app` is the one exception: its port goes
//! where it says.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use prometheus::IntCounter;

use crate::balance::{Balancer, ClientParams};
use crate::config::limits::ClientLimits;
use crate::config::policy::ServicePolicy;
use crate::config::ports::PortSet;
use crate::discovery;
use crate::metrics::Metrics;
use crate::router::Target;
use crate::routes::Routes;
use crate::warn_limit::WarnLimiter;

/// The local app at `addr`, as a target.
pub fn app_target(
    service_name: &str,
    addr: SocketAddr,
    client: ClientLimits,
    metrics: &Metrics,
) -> Arc<Target> {
    let service: Arc<str> = Arc::from(service_name);
    let policy = ServicePolicy::local_app();
    let params =
        ClientParams::for_service(metrics, service_name, client, policy.accrual.clone(), false);
    let balancer = Balancer::spawn(
        Arc::clone(&service),
        tokio::sync::watch::channel(discovery::fixed(&[addr])).1,
        params,
    );
    Arc::new(Target::new(
        service,
        balancer,
        Routes::single("local app", policy),
    ))
}

/// The local app's ports, each a target made on first use.
pub struct AppPorts {
    service_name: String,
    client: ClientLimits,
    metrics: Arc<Metrics>,
    /// The ports the app serves, less the sidecar's own (no loops).
    served: PortSet,
    /// `--inbound-app`: its port goes there, whatever address was dialed.
    app: Option<(SocketAddr, Arc<Target>)>,
    /// By address: at most the served ports on each of the pod's IPs.
    targets: Mutex<HashMap<SocketAddr, Arc<Target>>>,
    refused: IntCounter,
    warn: WarnLimiter,
}

impl AppPorts {
    /// `served`: the ports the app serves (`--inbound-app`'s included);
    /// `reserved`: the sidecar's own ports, never forwarded to whatever
    /// `served` says.
    pub fn new(
        service_name: &str,
        client: ClientLimits,
        metrics: Arc<Metrics>,
        served: &PortSet,
        reserved: &[u16],
        app: Option<(SocketAddr, Arc<Target>)>,
    ) -> Arc<Self> {
        let mut served = served.clone();
        for port in reserved {
            served.remove(*port);
        }
        let refused = metrics
            .protocol_rejections
            .with_label_values(&["inbound", "port_not_served"]);
        Arc::new(Self {
            service_name: service_name.to_string(),
            client,
            metrics,
            served,
            app,
            targets: Mutex::new(HashMap::new()),
            refused,
            warn: WarnLimiter::default(),
        })
    }

    /// Whether `port` is one the app serves (and not one of the sidecar's).
    pub fn serves(&self, port: u16) -> bool {
        self.served.contains(port)
    }

    /// Where a connection to `dialed` (the address it came in on, with the
    /// port it names) goes: `--inbound-app` for its port, else `dialed`
    /// itself (an IPv4-mapped address as IPv4).
    pub fn address(&self, dialed: SocketAddr) -> SocketAddr {
        match &self.app {
            Some((app, _)) if app.port() == dialed.port() => *app,
            _ => SocketAddr::new(dialed.ip().to_canonical(), dialed.port()),
        }
    }

    /// The app at [`AppPorts::address`]`(dialed)`; `None` for a port the app
    /// does not serve (the caller refuses it with [`AppPorts::refuse`]).
    pub fn get(&self, dialed: SocketAddr) -> Option<Arc<Target>> {
        if !self.serves(dialed.port()) {
            return None;
        }
        let addr = self.address(dialed);
        if let Some((app, target)) = &self.app {
            if *app == addr {
                return Some(Arc::clone(target));
            }
        }
        let mut targets = self.targets.lock().unwrap_or_else(|p| p.into_inner());
        let target = targets
            .entry(addr)
            .or_insert_with(|| app_target(&self.service_name, addr, self.client, &self.metrics));
        Some(Arc::clone(target))
    }

    /// Counts a refused `port` and says so, at most once a second: anyone
    /// who reaches the inbound port can cause this at will. `how`: what
    /// named the port.
    pub fn refuse(&self, peer: SocketAddr, port: u16, how: &'static str) {
        self.refused.inc();
        if let Some(suppressed) = self.warn.allow() {
            tracing::warn!(
                %peer,
                port,
                named_by = how,
                suppressed,
                "refused: port not served (not the app's, see --inbound-ports)"
            );
        }
    }
}
