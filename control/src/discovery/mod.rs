//! Services discovered outside the config directory: today, Kubernetes
//! (`--discovery kubernetes`).
//!
//! The Kubernetes source watches Services, EndpointSlices and Pods through
//! the cluster's API ([`cluster`], with kube-rs watchers), keeps them in a
//! cache that turns each watch event — a relist included — into the set of
//! services it touched ([`cache`]), translates each touched service into a
//! [`Discovered`] service ([`translate`]) and hands the batch to
//! a [`Sink`] — [`crate::state::Mesh::set_discovered`] — which lays it over the directory's
//! documents by name ([`overlay`]) and wakes only the sidecars watching what
//! changed.
//!
//! The directory and self-registration keep working beside it: `tern.dev`
//! documents (TrafficPolicy, AuthorizationPolicy, Service, Endpoints) apply
//! to a Kubernetes Service of the same name; see [`overlay`] for the rule.

pub mod cache;
pub mod cluster;
pub mod metrics;
pub mod overlay;
pub mod translate;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::ServiceKey;
use metrics::DiscoveryMetrics;

pub use overlay::Overlay;

/// Where services come from besides the config directory and registration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Discovery {
    /// Only the config directory and the sidecars' own registration.
    #[default]
    Config,
    /// Also the cluster's Services, EndpointSlices and Pods (kube config from the
    /// environment: in-cluster, or `KUBECONFIG`).
    Kubernetes,
}

impl Discovery {
    /// Whether documents may name services no Service document declares
    /// (they may come from the cluster).
    pub fn services_elsewhere(self) -> bool {
        self == Discovery::Kubernetes
    }
}

/// Where discovered services go: the live state (`crate::state::Mesh`
/// implements it), kept behind a trait so this module does not depend on the
/// state that depends on it.
pub trait Sink: Send + Sync + 'static {
    /// Sets discovered services (`None`: gone); returns how many views changed.
    fn set_discovered(
        &self,
        changes: Vec<(ServiceKey, Option<Discovered>)>,
        since: Instant,
    ) -> usize;
    /// The keys of every discovered service in force.
    fn discovered_keys(&self) -> BTreeSet<ServiceKey>;
}

/// Starts the `kind` source, if it is more than the directory: its watchers
/// run until `stop`. Fails when the cluster's API cannot be configured.
/// The receiver turns true once the source has published its first complete
/// picture (at once for the directory alone): `/ready` waits for it, so a
/// sidecar is not served a mesh without the cluster's services.
pub async fn start<S: Sink>(
    kind: Discovery,
    trust_domain: String,
    sink: Arc<S>,
    metrics: Arc<DiscoveryMetrics>,
    stop: CancellationToken,
) -> anyhow::Result<watch::Receiver<bool>> {
    if kind == Discovery::Config {
        return Ok(watch::channel(true).1);
    }
    let client = cluster::client().await?;
    let (listed, rx) = watch::channel(false);
    tokio::spawn(cluster::run(
        client,
        sink,
        metrics,
        trust_domain,
        listed,
        stop,
    ));
    Ok(rx)
}

/// One service as a discovery source sees it, before any `tern.dev`
/// document is laid over it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Discovered {
    /// Its virtual IPs (ClusterIPs, the primary first); empty for a headless service.
    pub virtual_ips: Vec<IpAddr>,
    pub ports: Vec<DiscoveredPort>,
    /// Ready endpoints, sorted by address.
    pub endpoints: Vec<DiscoveredEndpoint>,
    /// `http` when a port's appProtocol says so; otherwise gRPC, as for a Service document.
    pub http: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DiscoveredPort {
    pub name: Option<String>,
    /// The port callers dial on a virtual IP.
    pub port: u16,
    /// The workload's port behind it (Kubernetes targetPort, a named one
    /// resolved through the EndpointSlice); `None` when unresolved.
    pub target_port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DiscoveredEndpoint {
    /// `pod-ip:inbound-port` for a pod with the Tern sidecar (mTLS),
    /// `pod-ip:target-port` for one without (plaintext).
    pub address: SocketAddr,
    /// The pod's labels (TrafficPolicy backends select by them).
    pub labels: BTreeMap<String, String>,
    /// The SPIFFE id of the pod's service account, for a pod with the
    /// sidecar; `None` for a plaintext endpoint.
    pub identity: Option<String>,
    /// Where it came from, for `/state`: `EndpointSlice <ns>/<name>`.
    pub source: String,
    /// Service port → the port this endpoint's pod serves it on (its
    /// targetPort, resolved through its own slice), where they differ.
    pub target_ports: BTreeMap<u16, u16>,
}
