//! Outbound: the local app's calls into the mesh.
//!
//! Each configured service gets a balancer fed by its discovery source. A
//! request names its service in one of two ways: by the listener it arrived
//! on (an explicit upstream port) or by its `:authority`/`Host` on the
//! generic outbound port.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::balance::{Balancer, ClientParams};
use crate::config::{Config, DiscoveryConfig};
use crate::discovery::{self, dns};
use crate::metrics::Metrics;
use crate::router::{RouteTable, Target};

pub struct Outbound {
    /// Authority routing on the generic outbound listener.
    pub table: Arc<RouteTable>,
    /// Explicit upstream ports: listener address → target.
    pub upstreams: Vec<(SocketAddr, Arc<Target>)>,
    pub targets: Vec<Arc<Target>>,
}

pub fn build(config: &Config, metrics: &Metrics) -> Result<Outbound, dns::DnsError> {
    let needs_dns = config
        .services
        .iter()
        .any(|s| matches!(s.discovery, DiscoveryConfig::Dns { .. }));
    let resolver = if needs_dns {
        let ns = match config.dns_nameserver {
            Some(a) => dns::Nameserver::Addr(a),
            None => dns::Nameserver::System,
        };
        Some(dns::resolver(&ns)?)
    } else {
        None
    };

    let mut table = RouteTable::default();
    let mut upstreams = Vec::new();
    let mut targets = Vec::new();
    for svc in &config.services {
        let service: Arc<str> = Arc::from(svc.name.as_str());
        let updates = match (&svc.discovery, &resolver) {
            (DiscoveryConfig::Static(addrs), _) => discovery::fixed(addrs),
            (DiscoveryConfig::Dns { host, port }, Some(r)) => {
                let (tx, rx) = tokio::sync::watch::channel(Arc::new(Vec::new()));
                dns::spawn_watch(r.clone(), svc.name.clone(), host.clone(), *port, tx);
                rx
            }
            (DiscoveryConfig::Dns { .. }, None) => discovery::fixed(&[]),
        };
        let params = ClientParams {
            connect_timeout: config.connect_timeout,
            open_connections: metrics
                .upstream_open_connections
                .with_label_values(&[&svc.name]),
            endpoints_gauge: Some(metrics.endpoints.with_label_values(&[&svc.name])),
            accrual: svc.policy.accrual.clone(),
            ejections: metrics.ejections.with_label_values(&[&svc.name]),
            ejected: metrics.ejected.with_label_values(&[&svc.name]),
        };
        let balancer = Balancer::spawn(Arc::clone(&service), updates, params);
        let target = Arc::new(Target::new(service, balancer, svc.policy.clone()));
        table.insert(&svc.namespace, Arc::clone(&target));
        if let Some(addr) = svc.upstream {
            upstreams.push((addr, Arc::clone(&target)));
        }
        targets.push(target);
    }
    Ok(Outbound {
        table: Arc::new(table),
        upstreams,
        targets,
    })
}
