//! Outbound: the local app's calls into the mesh.
//!
//! Every configured service becomes a target fed by its discovery source. A
//! request names its service in one of three ways: by the listener it arrived
//! on (an explicit upstream port), by its `:authority`/`Host` on the generic
//! outbound port, or, for connections iptables redirected to that port, by
//! their original destination (a virtual IP or an endpoint's IP, see
//! [`crate::intercept`]). The control plane can add targets and replace
//! their endpoints and routes later (see [`crate::control`]).

use std::net::SocketAddr;
use std::sync::Arc;

use crate::config::{Config, DiscoveryConfig};
use crate::discovery::{self, dns};
use crate::identity::Identity;
use crate::metrics::Metrics;
use crate::router::Target;
use crate::targets::Targets;

pub struct Outbound {
    pub targets: Arc<Targets>,
    /// Explicit upstream ports: listener address → target.
    pub upstreams: Vec<(SocketAddr, Arc<Target>)>,
}

pub fn build(
    config: &Config,
    metrics: &Arc<Metrics>,
    identity: Option<Arc<Identity>>,
) -> Result<Outbound, dns::DnsError> {
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

    let targets = Targets::new(
        Arc::clone(metrics),
        config.client_limits(),
        &config.namespace,
        identity,
    );
    let mut upstreams = Vec::new();
    for svc in &config.services {
        let entry = targets.ensure(&svc.name, &svc.namespace, &svc.policy);
        entry.set_bootstrap_vip(svc.virtual_ip);
        match (&svc.discovery, &resolver) {
            (DiscoveryConfig::Static(addrs), _) => {
                entry.set_local(discovery::with_identity(
                    discovery::fixed(addrs),
                    svc.identity.as_ref(),
                ));
            }
            (DiscoveryConfig::Dns { host, port }, Some(r)) => {
                let (tx, mut rx) = tokio::sync::watch::channel(Arc::new(Vec::new()));
                dns::spawn_watch(r.clone(), svc.name.clone(), host.clone(), *port, tx);
                let entry = Arc::clone(&entry);
                let identity = svc.identity.clone();
                tokio::spawn(async move {
                    while rx.changed().await.is_ok() {
                        let set = rx.borrow_and_update().clone();
                        entry.set_local(discovery::with_identity(set, identity.as_ref()));
                    }
                });
            }
            (DiscoveryConfig::Dns { .. }, None) | (DiscoveryConfig::None, _) => {}
        }
        if let Some(addr) = svc.upstream {
            upstreams.push((addr, Arc::clone(&entry.target)));
        }
    }
    Ok(Outbound { targets, upstreams })
}
