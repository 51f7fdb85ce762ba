//! Discovery: turns a service name into a live set of endpoints.
//!
//! Each source (static bootstrap config, DNS) publishes the whole current set on a
//! `tokio::sync::watch` channel; the balancer subscribes and swaps its endpoint list
//! when the set changes, so requests already in flight to a removed endpoint finish.

pub mod dns;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

/// Endpoint labels such as `version: v2`; routes select subsets by them.
pub type Labels = BTreeMap<String, String>;

/// Service port → the port an endpoint's app serves it on.
pub type TargetPorts = BTreeMap<u16, u16>;

/// One instance of a service.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub labels: Labels,
    /// The identity the endpoint must present (checked once mTLS is on).
    pub identity: Option<Arc<str>>,
    /// Service port → the port the endpoint's app serves it on, where they
    /// differ (the control plane's `Endpoint.target_ports`).
    pub target_ports: TargetPorts,
}

impl Endpoint {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            labels: BTreeMap::new(),
            identity: None,
            target_ports: BTreeMap::new(),
        }
    }

    /// The port the endpoint's app serves the Service port `port` on.
    pub fn target_port(&self, port: u16) -> u16 {
        self.target_ports.get(&port).copied().unwrap_or(port)
    }
}

/// The endpoints of one service at one moment, sorted by address.
pub type EndpointSet = Arc<Vec<Endpoint>>;

/// `set` with every endpoint expected to present `identity` (mTLS), when given.
pub fn with_identity(set: EndpointSet, identity: Option<&Arc<str>>) -> EndpointSet {
    match identity {
        None => set,
        Some(id) => Arc::new(
            set.iter()
                .map(|e| Endpoint {
                    identity: Some(Arc::clone(id)),
                    ..e.clone()
                })
                .collect(),
        ),
    }
}

/// Static endpoints from bootstrap config.
pub fn fixed(addrs: &[SocketAddr]) -> EndpointSet {
    let mut set: Vec<Endpoint> = addrs.iter().copied().map(Endpoint::new).collect();
    set.sort();
    set.dedup();
    Arc::new(set)
}
