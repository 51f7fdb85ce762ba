//! Inbound: mesh traffic for the local app.
//!
//! The app is a target with one static endpoint, so inbound requests go
//! through the same stack (metrics, access log, pooled connections) as
//! outbound ones. The caller's sidecar owns retries, so the local hop makes
//! one attempt and never ejects the app.
//!
//! With transparent interception the app may listen on several ports: a
//! connection iptables redirected here, or a request whose caller named the
//! port it dialed ([`crate::router::DST_PORT`]), goes to
//! `127.0.0.1:<that port>` ([`AppPorts`]); the sidecar's own ports are never
//! such a destination.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use crate::balance::{Balancer, ClientParams};
use crate::config::limits::ClientLimits;
use crate::config::policy::ServicePolicy;
use crate::discovery;
use crate::metrics::Metrics;
use crate::router::Target;
use crate::routes::Routes;

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
    /// The sidecar's own listener ports: never forwarded to (no loops).
    reserved: Vec<u16>,
    targets: Mutex<HashMap<u16, Arc<Target>>>,
}

impl AppPorts {
    /// `app`: the `--inbound-app` target, reused for its port on loopback.
    pub fn new(
        service_name: &str,
        client: ClientLimits,
        metrics: Arc<Metrics>,
        reserved: Vec<u16>,
        app: Option<(SocketAddr, Arc<Target>)>,
    ) -> Arc<Self> {
        let mut targets = HashMap::new();
        if let Some((addr, target)) = app.filter(|(a, _)| a.ip().is_loopback()) {
            targets.insert(addr.port(), target);
        }
        Arc::new(Self {
            service_name: service_name.to_string(),
            client,
            metrics,
            reserved,
            targets: Mutex::new(targets),
        })
    }

    /// Whether `port` may be forwarded to: not 0, not one of the sidecar's.
    pub fn allowed(&self, port: u16) -> bool {
        port != 0 && !self.reserved.contains(&port)
    }

    /// The app on `127.0.0.1:port`; `None` for a port that is not allowed.
    pub fn get(&self, port: u16) -> Option<Arc<Target>> {
        if !self.allowed(port) {
            return None;
        }
        let mut targets = self.targets.lock().unwrap_or_else(|p| p.into_inner());
        let target = targets.entry(port).or_insert_with(|| {
            app_target(
                &self.service_name,
                SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
                self.client,
                &self.metrics,
            )
        });
        Some(Arc::clone(target))
    }
}
